//! Pointing the operating system's resolver at tpvpn's DNS server.
//!
//! - `resolvconf`: tpvpn's server becomes the only nameserver of `/etc/resolv.conf`, with
//!   the connected namespace's search path in front of the original one. The original
//!   bytes are recorded in the state file before the file is touched and written back,
//!   in place (the file may be a bind mount), by `down`, on signals and after a crash.
//!   The original nameservers become tpvpn's upstream servers.
//! - macOS: one `/etc/resolver/<domain>` file per routing domain (`crate::os::macos`; built and
//!   unit-tested here, not yet used by the daemon).
//! - `resolved`: systemd-resolved over D-Bus (`resolved.rs`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::Error;

/// The first line of a resolv.conf written by tpvpn.
pub const MARKER: &str = "# written by tpvpn: `tpvpn down` restores the original";

/// The parts of a resolv.conf tpvpn uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// Parses resolv.conf text; unknown lines are ignored, as the C library does.
pub fn parse(text: &str) -> ResolvConf {
    let mut r = ResolvConf::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                // Scoped IPv6 addresses (fe80::1%eth0) lose their scope: not supported.
                if let Some(ip) = words.next().and_then(|w| w.split('%').next()).and_then(|w| w.parse().ok()) {
                    r.nameservers.push(ip);
                }
            }
            Some("search") | Some("domain") => r.search = words.map(str::to_string).collect(),
            Some("options") => r.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    r
}

/// The search path of a pod in `namespace`: `ns.svc.<domain> svc.<domain> <domain>`.
pub fn cluster_search(namespace: &str, domain: &str) -> Vec<String> {
    vec![format!("{namespace}.svc.{domain}"), format!("svc.{domain}"), domain.to_string()]
}

/// Heads the copy of the original that a resolv.conf written by tpvpn carries.
const ORIGINAL_HEADER: &str =
    "# the original, put back by tpvpn down (or by the next tpvpn up or down after a reboot):";
/// Starts each line of that copy.
const ORIGINAL_LINE: &str = "#| ";
/// Names the daemon that wrote the file.
const PID_LINE: &str = "# tpvpn pid: ";

/// The resolv.conf tpvpn writes: its server, the cluster search path then the original
/// one, the original options; and, in comments, the original text itself, so that it
/// survives a reboot while connected (the state in `TPVPN_RUNTIME_DIR`, on `/run`, does
/// not) and is never lost by recording tpvpn's own file as the original.
pub fn render(server: IpAddr, search: &[String], original_text: &str) -> String {
    let original = parse(original_text);
    let mut out = format!("{MARKER}\nnameserver {server}\n");
    let mut all: Vec<&str> = search.iter().map(String::as_str).collect();
    for s in &original.search {
        if !all.contains(&s.as_str()) {
            all.push(s);
        }
    }
    if !all.is_empty() {
        out.push_str(&format!("search {}\n", all.join(" ")));
    }
    if !original.options.is_empty() {
        out.push_str(&format!("options {}\n", original.options.join(" ")));
    }
    out.push_str(&format!("{PID_LINE}{}\n", std::process::id()));
    out.push_str(ORIGINAL_HEADER);
    out.push('\n');
    for line in original_text.split('\n') {
        out.push_str(ORIGINAL_LINE);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The original that `text` stands for: the copy inside it when tpvpn wrote it (byte for
/// byte), else `text` itself.
pub fn original_of(text: &str) -> String {
    embedded_original(text).unwrap_or_else(|| text.to_string())
}

/// Whether `text` is a resolv.conf tpvpn wrote that does not carry its original (an older
/// tpvpn's): what it replaced is lost.
pub fn lost_original(text: &str) -> bool {
    text.starts_with(MARKER) && embedded_original(text).is_none()
}

fn embedded_original(text: &str) -> Option<String> {
    if !text.starts_with(MARKER) {
        return None;
    }
    let (_, copy) = text.split_once(&format!("\n{ORIGINAL_HEADER}\n"))?;
    let lines: Option<Vec<&str>> =
        copy.strip_suffix('\n')?.split('\n').map(|l| l.strip_prefix(ORIGINAL_LINE)).collect();
    Some(lines?.join("\n"))
}

/// After a reboot while connected (no state, but tpvpn's resolv.conf at `path`, written
/// by a daemon that is not running): puts back the original it carries. A file of a
/// running daemon (say, one with another `TPVPN_RUNTIME_DIR`) is left alone. Whether it
/// put it back.
pub fn restore_left_behind(path: &Path) -> Result<bool, Error> {
    let current = std::fs::read_to_string(path).unwrap_or_default();
    let writer = current.lines().find_map(|l| l.strip_prefix(PID_LINE)?.trim().parse::<u32>().ok());
    if writer.is_some_and(|pid| pid != std::process::id() && crate::state::alive(pid)) {
        return Ok(false);
    }
    match embedded_original(&current) {
        Some(original) => write_in_place(path, original.as_bytes()).map(|()| true),
        None => Ok(false),
    }
}

/// The resolv.conf at `path` as text: missing is empty; unreadable or not UTF-8 is an
/// error (its bytes could not be restored as they were).
pub fn read_original(path: &Path) -> Result<String, Error> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| {
            Error::Config(format!(
                "{} is not UTF-8 text: tpvpn would not restore it byte for byte; use --dns-mode off",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::System(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Upstream servers (port 53) from the original resolv.conf, excluding tpvpn's own.
pub fn upstreams(original: &ResolvConf, ours: IpAddr) -> Vec<SocketAddr> {
    original.nameservers.iter().filter(|ip| **ip != ours).map(|ip| SocketAddr::new(*ip, 53)).collect()
}

/// Writes `content` into `path` in place (truncate and write, no rename: the file may be
/// a bind mount, and its inode must stay).
pub fn write_in_place(path: &Path, content: &[u8]) -> Result<(), Error> {
    std::fs::write(path, content).map_err(|e| Error::System(format!("cannot write {}: {e}", path.display())))
}

/// Puts back the original resolv.conf if the file is still the one tpvpn wrote (someone
/// else's later change is left alone).
pub fn restore(path: &Path, original: &[u8]) -> Result<(), Error> {
    let current = std::fs::read(path).unwrap_or_default();
    if current.starts_with(MARKER.as_bytes()) {
        write_in_place(path, original)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str =
        "# from dhcp\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nsearch corp.example\noptions edns0 timeout:2\n";

    #[test]
    fn parse_and_render() {
        let r = parse(ORIGINAL);
        assert_eq!(r.nameservers, vec!["192.0.2.53".parse::<IpAddr>().unwrap(), "fe80::1".parse().unwrap()]);
        assert_eq!(r.search, vec!["corp.example"]);
        assert_eq!(r.options, vec!["edns0", "timeout:2"]);
        let ours: IpAddr = "198.18.0.2".parse().unwrap();
        let text = render(ours, &cluster_search("default", "cluster.local"), ORIGINAL);
        assert!(text.starts_with(&format!("{MARKER}\nnameserver 198.18.0.2\nsearch default.svc.cluster.local svc.cluster.local cluster.local corp.example\noptions edns0 timeout:2\n{PID_LINE}{}\n{ORIGINAL_HEADER}\n#| # from dhcp\n", std::process::id())), "{text}");
        assert_eq!(parse(&text).nameservers, vec![ours]);
        assert_eq!(upstreams(&r, ours).len(), 2);
    }

    #[test]
    fn the_original_travels_inside_byte_for_byte() {
        for original in [ORIGINAL, "", "nameserver 192.0.2.1", "\n\n#| tricky\r\n", "# written by tpvpn lookalike\n"] {
            let ours = render("198.18.0.2".parse().unwrap(), &[], original);
            assert_eq!(original_of(&ours), original);
            assert_eq!(original_of(original), original, "a file tpvpn did not write is its own original");
        }
        // A damaged copy is not trusted.
        let ours = render("198.18.0.2".parse().unwrap(), &[], ORIGINAL).replace("#| search", "search");
        assert_eq!(embedded_original(&ours), None);
        assert!(lost_original(&ours) && !lost_original(ORIGINAL));
    }

    #[test]
    fn restore_only_our_file_and_byte_identical() {
        let dir = std::env::temp_dir().join(format!("tpvpn-osdns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(&path, ORIGINAL).unwrap();
        let ours = render("198.18.0.2".parse().unwrap(), &[], ORIGINAL);
        write_in_place(&path, ours.as_bytes()).unwrap();
        restore(&path, ORIGINAL.as_bytes()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), ORIGINAL.as_bytes());
        // Someone else's file is not clobbered.
        std::fs::write(&path, "nameserver 203.0.113.1\n").unwrap();
        restore(&path, ORIGINAL.as_bytes()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "nameserver 203.0.113.1\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
