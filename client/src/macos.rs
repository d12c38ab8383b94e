//! macOS system changes as pure functions, unit-tested on Linux: the `route` commands of
//! a route plan, conflicts read from `netstat -rn`, the `/etc/resolver/<domain>` files for
//! a set of routing domains and which files may be removed, and the undo record. The
//! daemon does not drive them yet and none of this has run on a Mac (README).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::osdns::MARKER;

/// Where macOS looks for per-domain resolver files.
pub const RESOLVER_DIR: &str = "/etc/resolver";

/// `route -n add` of `cidr` through the utun device `device`.
pub fn route_add(cidr: &IpNet, device: &str) -> Vec<String> {
    route("add", cidr, device)
}

/// `route -n delete` of what [`route_add`] added.
pub fn route_delete(cidr: &IpNet, device: &str) -> Vec<String> {
    route("delete", cidr, device)
}

fn route(verb: &str, cidr: &IpNet, device: &str) -> Vec<String> {
    let mut cmd = vec!["route".to_string(), "-n".into(), verb.into()];
    if cidr.addr().is_ipv6() {
        cmd.push("-inet6".into());
    }
    cmd.extend(["-net".into(), cidr.trunc().to_string(), "-interface".into(), device.into()]);
    cmd
}

/// A route of the routing table as `netstat -rn` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRoute {
    pub dst: IpNet,
    pub netif: String,
}

/// The routes of `netstat -rn` output (both families): destinations in netstat's short
/// forms (`10.96/16`, `127`, `192.168.1`, a host address, `fe80::%utun0/64`), the
/// interface from the `Netif` column. `default` and lines that are not routes are left out.
pub fn parse_netstat(text: &str) -> Vec<TableRoute> {
    let mut netif_col = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"Destination") {
            netif_col = words.iter().position(|w| *w == "Netif");
            continue;
        }
        let (Some(col), Some(dst)) = (netif_col, words.first()) else { continue };
        let (Some(netif), Some(dst)) = (words.get(col), parse_destination(dst)) else { continue };
        out.push(TableRoute { dst, netif: netif.to_string() });
    }
    out
}

/// A destination in netstat's notation; `None` for `default` and what does not parse.
fn parse_destination(text: &str) -> Option<IpNet> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().ok()?)),
        None => (text, None),
    };
    // A link-local scope (`fe80::%en0`) is not part of the address.
    let addr = addr.split('%').next()?;
    if addr.contains(':') {
        let ip: std::net::Ipv6Addr = addr.parse().ok()?;
        return IpNet::new(IpAddr::V6(ip), len.unwrap_or(128)).ok().map(|n| n.trunc());
    }
    // IPv4 with octets left out: `10.96/16`, or classful `192.168.1` (the given octets).
    let octets: Vec<u8> = addr.split('.').map(|o| o.parse().ok()).collect::<Option<_>>()?;
    if octets.is_empty() || octets.len() > 4 {
        return None;
    }
    let mut full = [0u8; 4];
    full[..octets.len()].copy_from_slice(&octets);
    let len = len.unwrap_or(8 * octets.len() as u8);
    IpNet::new(IpAddr::from(full), len).ok().map(|n| n.trunc())
}

/// The routes of `wanted` that overlap a route of `table` on another interface, with it.
pub fn conflicts<'a>(wanted: &[IpNet], table: &'a [TableRoute], device: &str) -> Vec<(IpNet, &'a TableRoute)> {
    wanted
        .iter()
        .filter_map(|w| {
            table
                .iter()
                .find(|t| t.netif != device && (w.contains(&t.dst.network()) || t.dst.contains(&w.network())))
                .map(|t| (*w, t))
        })
        .collect()
}

/// The resolver files for `domains`, each sending the domain's names to `server`; the
/// cluster domain's file also carries `search` (the connected namespace's search path,
/// for short names). Each starts with tpvpn's marker.
pub fn resolver_files(domains: &[String], server: IpAddr, search: &[String]) -> Vec<(PathBuf, String)> {
    domains
        .iter()
        .map(|d| {
            let mut text = format!("{MARKER}\nnameserver {server}\nport 53\n");
            if search.last() == Some(d) {
                text.push_str(&format!("search {}\n", search.join(" ")));
            }
            (Path::new(RESOLVER_DIR).join(d), text)
        })
        .collect()
}

/// Of the files in the resolver directory (path and content), those tpvpn may remove:
/// only files that carry its marker, never another program's.
pub fn removable(files: &[(PathBuf, String)]) -> Vec<PathBuf> {
    files.iter().filter(|(_, text)| text.starts_with(MARKER)).map(|(p, _)| p.clone()).collect()
}

/// What a daemon on macOS changed, recorded before each change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undo {
    /// The utun device the system gave (`utunN`).
    pub device: Option<String>,
    pub routes: Vec<IpNet>,
    pub resolver_files: Vec<PathBuf>,
}

impl Undo {
    /// The commands that take the routes back, last added first.
    pub fn route_commands(&self) -> Vec<Vec<String>> {
        let Some(dev) = &self.device else { return vec![] };
        self.routes.iter().rev().map(|r| route_delete(r, dev)).collect()
    }

    /// The resolver files to remove: recorded ones still carrying tpvpn's marker
    /// (`read` gives a file's current content, `None` if it is gone).
    pub fn files_to_remove(&self, read: impl Fn(&Path) -> Option<String>) -> Vec<PathBuf> {
        let present: Vec<(PathBuf, String)> =
            self.resolver_files.iter().filter_map(|p| read(p).map(|t| (p.clone(), t))).collect();
        removable(&present)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn route_commands_for_both_families() {
        assert_eq!(
            route_add(&net("10.96.0.0/16"), "utun4").join(" "),
            "route -n add -net 10.96.0.0/16 -interface utun4"
        );
        assert_eq!(
            route_delete(&net("fd00:96::/112"), "utun4").join(" "),
            "route -n delete -inet6 -net fd00:96::/112 -interface utun4"
        );
    }

    const NETSTAT: &str = "Routing tables

Internet:
Destination        Gateway            Flags               Netif Expire
default            192.168.1.1        UGScg                 en0
10.96/16           link#20            UCS                 utun4
127                127.0.0.1          UCS                   lo0
127.0.0.1          127.0.0.1          UH                    lo0
169.254            link#6             UCS                   en0      !
172.17             link#21            UCS                 bridge0
192.168.1          link#6             UCS                   en0      !
192.168.1.1/32     link#6             UCS                   en0      !

Internet6:
Destination                             Gateway                                 Flags               Netif Expire
default                                 fe80::%utun0                            UGcIg               utun0
::1                                     ::1                                     UHL                   lo0
fe80::%lo0/64                           fe80::1%lo0                             UcI                   lo0
fd00:96::/112                           link#20                                 UCS                 utun4
";

    #[test]
    fn netstat_destinations_in_their_short_forms() {
        let t = parse_netstat(NETSTAT);
        let has = |dst: &str, netif: &str| t.contains(&TableRoute { dst: net(dst), netif: netif.into() });
        assert!(has("10.96.0.0/16", "utun4"));
        assert!(has("127.0.0.0/8", "lo0"));
        assert!(has("127.0.0.1/32", "lo0"));
        assert!(has("172.17.0.0/16", "bridge0"));
        assert!(has("192.168.1.0/24", "en0"));
        assert!(has("fe80::/64", "lo0"));
        assert!(has("::1/128", "lo0"));
        assert!(!t.iter().any(|r| r.dst.prefix_len() == 0), "default is no conflict");
        assert_eq!(parse_netstat("garbage\n10.0/99 x y z\n"), vec![]);
    }

    #[test]
    fn conflicts_are_overlaps_on_other_interfaces() {
        let t = parse_netstat(NETSTAT);
        let wanted = [net("10.96.0.0/16"), net("172.17.5.0/24"), net("10.244.0.0/16"), net("192.168.0.0/16")];
        let c: Vec<(IpNet, String)> =
            conflicts(&wanted, &t, "utun4").into_iter().map(|(w, r)| (w, r.netif.clone())).collect();
        assert_eq!(c, vec![(net("172.17.5.0/24"), "bridge0".into()), (net("192.168.0.0/16"), "en0".into())]);
    }

    #[test]
    fn resolver_files_per_domain_and_only_ours_removed() {
        let search = ["default.svc.cluster.local".to_string(), "svc.cluster.local".into(), "cluster.local".into()];
        let files = resolver_files(&["cluster.local".into(), "default".into()], "198.18.0.2".parse().unwrap(), &search);
        assert_eq!(files[0].0, Path::new("/etc/resolver/cluster.local"));
        assert!(files[0].1.starts_with(MARKER) && files[0].1.contains("nameserver 198.18.0.2\nport 53\n"));
        assert!(files[0].1.contains("search default.svc.cluster.local svc.cluster.local cluster.local"));
        assert!(!files[1].1.contains("search"), "{}", files[1].1);
        let mut dir = files.clone();
        dir.push(("/etc/resolver/corp.example".into(), "nameserver 10.0.0.53\n".into()));
        assert_eq!(removable(&dir), vec![files[0].0.clone(), files[1].0.clone()]);
    }

    #[test]
    fn the_undo_record_round_trips_and_takes_back_only_what_it_made() {
        let u = Undo {
            device: Some("utun4".into()),
            routes: vec![net("10.96.0.0/16"), net("fd00:96::/112")],
            resolver_files: vec![
                "/etc/resolver/cluster.local".into(),
                "/etc/resolver/default".into(),
                "/etc/resolver/corp".into(),
            ],
        };
        let back: Undo = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
        assert_eq!(back, u);
        let cmds: Vec<String> = u.route_commands().iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            cmds,
            [
                "route -n delete -inet6 -net fd00:96::/112 -interface utun4",
                "route -n delete -net 10.96.0.0/16 -interface utun4"
            ]
        );
        // Of the recorded files one is still ours, one is gone, one is someone else's now.
        let read = |p: &Path| match p.to_str() {
            Some("/etc/resolver/cluster.local") => Some(format!("{MARKER}\nnameserver 198.18.0.2\n")),
            Some("/etc/resolver/corp") => Some("nameserver 10.0.0.53\n".to_string()),
            _ => None,
        };
        assert_eq!(u.files_to_remove(read), vec![PathBuf::from("/etc/resolver/cluster.local")]);
        assert_eq!(Undo::default().route_commands(), Vec::<Vec<String>>::new());
    }
}
