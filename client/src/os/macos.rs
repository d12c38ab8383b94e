//! macOS system changes, unit-tested on Linux: the `route` and `ifconfig` commands, routes
//! and conflicts read from `netstat -rn`, the `/etc/resolver/<domain>` files for a set of
//! routing domains and which files may be removed. The daemon uses them on macOS through
//! `routes` and `daemon::system`, recording each change in the same `State` as on Linux
//! (the utun's name once the system picked it, routes, resolver files). None of this has
//! run on a Mac (README).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::os::osdns::MARKER;

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

/// `ifconfig` adding `addr` to the utun device `device` (a point-to-point device: the
/// address is its own destination).
pub fn address_add(device: &str, addr: IpAddr) -> Vec<String> {
    let mut cmd = vec!["ifconfig".to_string(), device.into()];
    match addr {
        IpAddr::V4(a) => cmd.extend(["inet".into(), a.to_string(), a.to_string(), "alias".into()]),
        IpAddr::V6(a) => cmd.extend(["inet6".into(), a.to_string(), "prefixlen".into(), "128".into(), "alias".into()]),
    }
    cmd
}

/// A route of the routing table as `netstat -rn` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRoute {
    pub dst: IpNet,
    pub netif: String,
    /// A directly connected subnet (its gateway is the link itself, `link#N`).
    pub connected: bool,
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
        let connected = words.get(1).is_some_and(|g| g.starts_with("link#"));
        out.push(TableRoute { dst, netif: netif.to_string(), connected });
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

/// Makes the resolver directory hold `want` (written atomically) and no longer the files
/// of `had` that are not wanted and still carry tpvpn's marker.
pub fn apply_resolver_files(want: &[(PathBuf, String)], had: &[PathBuf]) -> std::io::Result<()> {
    for (path, text) in want {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::state::write_atomic(path, text.as_bytes(), 0o644)?;
    }
    let stale: Vec<PathBuf> = had.iter().filter(|p| !want.iter().any(|(w, _)| w == *p)).cloned().collect();
    remove_ours(&stale)
}

/// Removes those of `paths` that still carry tpvpn's marker.
pub fn remove_ours(paths: &[PathBuf]) -> std::io::Result<()> {
    let present: Vec<(PathBuf, String)> =
        paths.iter().filter_map(|p| std::fs::read_to_string(p).ok().map(|t| (p.clone(), t))).collect();
    for p in removable(&present) {
        std::fs::remove_file(p)?;
    }
    Ok(())
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
    fn addresses_on_the_utun_device() {
        assert_eq!(
            address_add("utun4", "198.18.0.2".parse().unwrap()).join(" "),
            "ifconfig utun4 inet 198.18.0.2 198.18.0.2 alias"
        );
        assert_eq!(
            address_add("utun4", "fd74:7076:706e::1".parse().unwrap()).join(" "),
            "ifconfig utun4 inet6 fd74:7076:706e::1 prefixlen 128 alias"
        );
    }

    #[test]
    fn netstat_destinations_in_their_short_forms() {
        let t = parse_netstat(NETSTAT);
        let has = |dst: &str, netif: &str| t.iter().any(|r| r.dst == net(dst) && r.netif == netif);
        assert!(
            t.iter().any(|r| r.dst == net("192.168.1.0/24") && r.connected),
            "link# gateways are connected subnets"
        );
        assert!(t.iter().any(|r| r.dst == net("127.0.0.1/32") && !r.connected));
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
    fn applying_resolver_files_writes_ours_and_removes_only_ours() {
        let dir = std::env::temp_dir().join(format!("tpvpn-resolver-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let f = |n: &str| dir.join(n);
        let ours = |d: &str| (f(d), format!("{MARKER}\nnameserver 198.18.0.2\nport 53\n"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(f("gone-ns"), &ours("gone-ns").1).unwrap();
        std::fs::write(f("corp.example"), "nameserver 10.0.0.53\n").unwrap();
        let want = [ours("cluster.local"), ours("default")];
        apply_resolver_files(&want, &[f("default"), f("gone-ns"), f("corp.example")]).unwrap();
        assert_eq!(std::fs::read_to_string(f("cluster.local")).unwrap(), want[0].1);
        assert!(f("default").exists());
        assert!(!f("gone-ns").exists(), "a namespace gone: its file goes");
        assert_eq!(std::fs::read_to_string(f("corp.example")).unwrap(), "nameserver 10.0.0.53\n", "not ours: kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
