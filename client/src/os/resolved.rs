//! `--dns-mode resolved`: systemd-resolved sends only the cluster's names to tpvpn.
//!
//! tpvpn configures its TUN link in systemd-resolved over D-Bus (the system bus, or
//! `DBUS_SYSTEM_BUS_ADDRESS`), through `busctl`, systemd's own D-Bus client, which is
//! present wherever systemd-resolved is:
//! - `SetLinkDNS`: tpvpn's DNS server is the link's server;
//! - `SetLinkDomains`: the connected namespace's search path (`ns.svc.<domain>`,
//!   `svc.<domain>`, `<domain>`) as search domains, every other routing domain as a
//!   routing-only `~domain` entry;
//! - `SetLinkDefaultRoute(false)`: no other name is ever sent to the link.
//!
//! Names outside those domains never reach tpvpn; resolved sends them to the laptop's own
//! servers as before. `RevertLink` undoes it all (and resolved forgets a link's settings
//! when the link disappears, which covers a crashed daemon).

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use crate::Error;

const DEST: &str = "org.freedesktop.resolve1";
const PATH: &str = "/org/freedesktop/resolve1";
const MANAGER: &str = "org.freedesktop.resolve1.Manager";

/// Runs `busctl --system <args>`; returns its stdout.
fn busctl(args: &[String]) -> Result<String, Error> {
    // `--` ends busctl's options: its getopt permutes, so a value such as a domain named
    // `--address=unixexec:...` would otherwise be taken as an option.
    let out = Command::new("busctl")
        .args(["--system", "--timeout=5"])
        .args(args.iter().take_while(|a| a.starts_with("--")))
        .arg("--")
        .args(args.iter().skip_while(|a| a.starts_with("--")))
        .output()
        .map_err(|e| Error::System(format!("cannot run busctl (systemd's D-Bus client): {e}")))?;
    if !out.status.success() {
        return Err(Error::System(format!(
            "systemd-resolved over D-Bus: busctl {}: {}",
            args.first().map_or("", String::as_str),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn call(method: &str, signature: &str, args: Vec<String>) -> Result<(), Error> {
    let mut all: Vec<String> = ["call", DEST, PATH, MANAGER, method, signature].map(String::from).to_vec();
    all.extend(args);
    busctl(&all).map(drop)
}

/// The DNS servers systemd-resolved knows, as `(ifindex, address)` (ifindex 0: global).
fn servers() -> Result<Vec<(u32, IpAddr)>, Error> {
    let args = ["--json=short", "get-property", DEST, PATH, MANAGER, "DNS"].map(String::from);
    parse_servers(&busctl(&args)?)
}

/// Parses busctl's JSON for the `DNS` property, `a(iiay)`: ifindex, family, address bytes.
fn parse_servers(json: &str) -> Result<Vec<(u32, IpAddr)>, Error> {
    let bad = || Error::System(format!("unexpected DNS property from systemd-resolved: {json}"));
    let v: serde_json::Value = serde_json::from_str(json).map_err(|_| bad())?;
    let mut out = Vec::new();
    for entry in v["data"].as_array().ok_or_else(bad)? {
        let ifindex = entry[0].as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad)?;
        let bytes: Vec<u8> = entry[2]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let ip = match bytes.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(bytes).map_err(|_| bad())?),
            16 => IpAddr::from(<[u8; 16]>::try_from(bytes).map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        out.push((ifindex, ip));
    }
    Ok(out)
}

/// Whether systemd-resolved answers on the bus.
pub fn available() -> bool {
    servers().is_ok()
}

/// Where names under excluded suffixes go: resolved's servers on other links and global
/// ones (never its own stub, never tpvpn's link).
pub fn upstreams(ours: u32) -> Result<Vec<SocketAddr>, Error> {
    Ok(servers()?
        .into_iter()
        .filter(|(ifindex, ip)| *ifindex != ours && !ip.is_loopback())
        .map(|(_, ip)| SocketAddr::new(ip, 53))
        .collect())
}

/// The interface index of `device` (in this network namespace).
pub fn ifindex(device: &str) -> Result<u32, Error> {
    let path = format!("/sys/class/net/{device}/ifindex");
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::System(format!("cannot read {path}")))
}

/// tpvpn's link in systemd-resolved.
#[derive(Debug, Clone)]
pub struct Link {
    pub ifindex: u32,
    /// The connected namespace's search path.
    pub search: Vec<String>,
}

impl Link {
    /// Sets the link's domains for the resolver's current `routing` domains.
    pub fn set_domains(&self, routing: &[String]) -> Result<(), Error> {
        set_domains(self.ifindex, &link_domains(&self.search, routing))
    }
}

/// The `SetLinkDomains` entries: `search` as search domains, the rest of `routing`
/// as routing-only domains; each domain once.
pub fn link_domains(search: &[String], routing: &[String]) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = search.iter().map(|d| (d.clone(), false)).collect();
    for d in routing {
        if !out.iter().any(|(s, _)| s == d) {
            out.push((d.clone(), true));
        }
    }
    out
}

/// Points `link` at `server` for its search path and the `routing` domains only.
pub fn set_link(link: &Link, server: IpAddr, routing: &[String]) -> Result<(), Error> {
    let ifindex = link.ifindex;
    let (family, bytes) = match server {
        IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
    };
    let mut args = vec![ifindex.to_string(), "1".into(), family.to_string(), bytes.len().to_string()];
    args.extend(bytes.iter().map(u8::to_string));
    call("SetLinkDNS", "ia(iay)", args)?;
    link.set_domains(routing)?;
    call("SetLinkDefaultRoute", "ib", vec![ifindex.to_string(), "false".into()])
}

fn set_domains(ifindex: u32, domains: &[(String, bool)]) -> Result<(), Error> {
    let mut args = vec![ifindex.to_string(), domains.len().to_string()];
    for (d, routing_only) in domains {
        args.push(d.clone());
        args.push(routing_only.to_string());
    }
    call("SetLinkDomains", "ia(sb)", args)
}

/// Drops everything tpvpn set on link `ifindex`.
pub fn revert(ifindex: u32) -> Result<(), Error> {
    call("RevertLink", "i", vec![ifindex.to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_property_parses_v4_and_v6_with_their_links() {
        let json = r#"{"type":"a(iiay)","data":[[0,2,[10,250,2,1]],[7,10,[253,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1]],[9,2,[198,18,0,2]]]}"#;
        let s = parse_servers(json).unwrap();
        assert_eq!(
            s,
            vec![
                (0, "10.250.2.1".parse().unwrap()),
                (7, "fd00::1".parse().unwrap()),
                (9, "198.18.0.2".parse().unwrap())
            ]
        );
    }

    #[test]
    fn bad_dns_property_is_an_error_not_a_panic() {
        for json in ["", "{}", r#"{"data":[[0,2,[1,2,3]]]}"#, r#"{"data":[[0,2,[300,0,0,1]]]}"#, r#"{"data":[["x"]]}"#]
        {
            assert!(parse_servers(json).is_err(), "{json}");
        }
    }

    #[test]
    fn search_domains_first_then_routing_only_without_duplicates() {
        let search = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"].map(String::from);
        let routing = ["cluster.local", "default", "kube-system"].map(String::from);
        assert_eq!(
            link_domains(&search, &routing),
            vec![
                ("default.svc.cluster.local".into(), false),
                ("svc.cluster.local".into(), false),
                ("cluster.local".into(), false),
                ("default".into(), true),
                ("kube-system".into(), true),
            ]
        );
    }
}
