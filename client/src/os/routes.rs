//! Which CIDRs go into the tunnel, and installing them as routes on the TUN device.
//!
//! The routed set is the cluster's CIDRs plus `also-proxy`, minus `never-proxy` and
//! minus the manager's own address. A never-proxy CIDR inside a routed CIDR splits it
//! into the smallest set of CIDRs that covers the rest.

use std::net::IpAddr;
use std::process::Command;

use ipnet::IpNet;

use crate::Error;

/// The widest CIDR the manager may have routed: anything wider would take over the
/// laptop's default route (`0.0.0.0/1` covers half the internet).
const WIDEST_FROM_MANAGER_V4: u8 = 8;
const WIDEST_FROM_MANAGER_V6: u8 = 16;
/// The most routes a manager may have installed; more are left out with a warning.
pub const MAX_ROUTES: usize = 1024;

/// The manager's CIDRs that the laptop accepts: none wider than a /8 (IPv6: /16). The
/// others, with why, for a warning.
pub fn acceptable(cluster: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    cluster.iter().partition(|n| {
        n.prefix_len() >= if n.addr().is_ipv4() { WIDEST_FROM_MANAGER_V4 } else { WIDEST_FROM_MANAGER_V6 }
    })
}

/// Computes the CIDRs to route into the tunnel.
pub fn compute(cluster: &[IpNet], also: &[IpNet], never: &[IpNet]) -> Vec<IpNet> {
    let mut routes: Vec<IpNet> = IpNet::aggregate(&cluster.iter().chain(also).map(|n| n.trunc()).collect());
    for hole in never {
        let hole = hole.trunc();
        routes = routes.into_iter().flat_map(|r| subtract(r, hole)).collect();
    }
    IpNet::aggregate(&routes)
}

/// `net` minus `hole`, as CIDRs.
fn subtract(net: IpNet, hole: IpNet) -> Vec<IpNet> {
    if hole.contains(&net) {
        return vec![];
    }
    if !net.contains(&hole) {
        return vec![net];
    }
    // Walk down from `net` toward `hole`, keeping the sibling half at each step.
    let mut out = Vec::new();
    let mut cur = net;
    while cur.prefix_len() < hole.prefix_len() {
        // Invariant: cur is a strict supernet of hole, so it splits into two halves.
        let halves: Vec<IpNet> = cur.subnets(cur.prefix_len() + 1).expect("prefix + 1 is valid").collect();
        let (inside, outside) = if halves[0].contains(&hole) { (halves[0], halves[1]) } else { (halves[1], halves[0]) };
        out.push(outside);
        cur = inside;
    }
    out
}

/// A route already on the machine (main table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub dst: IpNet,
    pub dev: String,
    /// Made by the kernel for an address of an interface: a directly connected subnet.
    pub connected: bool,
}

impl std::fmt::Display for Existing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} dev {}", self.dst, self.dev)
    }
}

/// Parses `ip -j route show` output; default routes and unparsable entries are skipped.
pub fn parse_existing(json: &str) -> Vec<Existing> {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(json) else {
        return vec![];
    };
    items
        .iter()
        .filter_map(|r| {
            let dst = r["dst"].as_str()?;
            let dst = dst.parse::<IpNet>().ok().or_else(|| dst.parse::<IpAddr>().ok().map(IpNet::from))?;
            Some(Existing {
                dst,
                dev: r["dev"].as_str().unwrap_or("?").to_string(),
                connected: r["protocol"] == "kernel",
            })
        })
        .collect()
}

/// The machine's IPv4 and IPv6 routes of the main table.
#[cfg(target_os = "linux")]
pub fn existing() -> Result<Vec<Existing>, Error> {
    let mut all = Vec::new();
    for family in ["-4", "-6"] {
        let out = system("ip")
            .args(["-j", family, "route", "show", "table", "main"])
            .output()
            .map_err(|e| Error::System(format!("cannot run ip: {e}")))?;
        all.extend(parse_existing(&String::from_utf8_lossy(&out.stdout)));
    }
    Ok(all)
}

/// Tells when the machine's IPv4 or IPv6 routes change (a VPN coming up or going down),
/// from the kernel's route notifications (netlink, `RTMGRP_IPV4_ROUTE`,
/// `RTMGRP_IPV6_ROUTE`), so that nothing is polled.
#[cfg(target_os = "linux")]
pub struct Changes {
    socket: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

#[cfg(target_os = "linux")]
impl Changes {
    #[allow(unsafe_code)]
    pub fn new() -> std::io::Result<Changes> {
        use nix::sys::socket::{bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = (libc::RTMGRP_IPV4_ROUTE | libc::RTMGRP_IPV6_ROUTE) as u32;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        // SAFETY: the `OwnedFd` is an open socket that the `AsyncFd` owns from here on, so
        // it stays open and the same descriptor until the `AsyncFd` is dropped.
        let socket = unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(Changes { socket })
    }

    /// Waits for the next change, then takes every notification already waiting (their
    /// content does not matter: the caller reads the routes afresh). An overrun of the
    /// socket's buffer (`ENOBUFS`) is a change too.
    pub async fn changed(&self) -> std::io::Result<()> {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut ready = self.socket.readable().await?;
            let mut got = false;
            loop {
                match recv(self.socket.get_ref().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                    Ok(_) | Err(nix::errno::Errno::ENOBUFS) => got = true,
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

/// Tells when the machine's routes change, on macOS: a routing socket (`PF_ROUTE`),
/// whose messages of type `RTM_ADD`, `RTM_DELETE` or `RTM_CHANGE` are route changes.
#[cfg(target_os = "macos")]
pub struct Changes {
    socket: tokio::io::unix::AsyncFd<std::fs::File>,
}

#[cfg(target_os = "macos")]
impl Changes {
    #[allow(unsafe_code)]
    pub fn new() -> std::io::Result<Changes> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) with constant arguments; the descriptor is checked, then owned.
        let fd = unsafe { libc::socket(libc::PF_ROUTE, libc::SOCK_RAW, libc::AF_UNSPEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is an open descriptor nothing else owns; fcntl(2) only reads and
        // sets its status flags.
        let socket = unsafe {
            let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
            if libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::fs::File::from(owned)
        };
        // SAFETY: the `File` owns the open socket, which the `AsyncFd` owns from here on,
        // so it stays open and the same descriptor until the `AsyncFd` is dropped.
        let socket = unsafe { tokio::io::unix::AsyncFd::register(socket) }.map_err(std::io::Error::from)?;
        Ok(Changes { socket })
    }

    /// Waits for the next route change, then takes every message already waiting (one
    /// per read; the type is the fourth byte of its `rt_msghdr`).
    pub async fn changed(&self) -> std::io::Result<()> {
        use std::io::Read;
        let mut buf = vec![0u8; 4096];
        loop {
            let mut ready = self.socket.readable().await?;
            let mut got = false;
            loop {
                match (&*self.socket.get_ref()).read(&mut buf) {
                    Ok(n) => {
                        let kind = buf.get(..n).and_then(|m| m.get(3)).map(|t| i32::from(*t));
                        got |= kind.is_some_and(|t| [libc::RTM_ADD, libc::RTM_DELETE, libc::RTM_CHANGE].contains(&t));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => got = true,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

/// Elsewhere route changes are not followed: `changed` never returns.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub struct Changes;

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
impl Changes {
    pub fn new() -> std::io::Result<Changes> {
        Ok(Changes)
    }
    pub async fn changed(&self) -> std::io::Result<()> {
        std::future::pending().await
    }
}

/// The first existing route (not on `own_device`) that overlaps `route`.
pub fn conflict<'a>(route: &IpNet, existing: &'a [Existing], own_device: &str) -> Option<&'a Existing> {
    existing
        .iter()
        .find(|e| e.dev != own_device && (route.contains(&e.dst.network()) || e.dst.contains(&route.network())))
}

/// A system tool whose error words are matched below (`File exists`, `No such
/// process`): run in the C locale, so that they are the same words on every machine.
/// (`ip` does not call `setlocale` today, so its words are English anyway; nothing here
/// should depend on that.)
fn system(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("LC_ALL", "C").env_remove("LANGUAGE");
    c
}

/// The single-address CIDR of `ip`.
pub fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

#[cfg(target_os = "linux")]
fn ip(args: &[&str]) -> Result<(), Error> {
    let out = system("ip").args(args).output().map_err(|e| Error::System(format!("cannot run ip: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::System(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Adds `route` on `device`, with `src` as the preferred source address.
#[cfg(target_os = "linux")]
pub fn add(route: &IpNet, device: &str, src: IpAddr) -> Result<(), Error> {
    let family = if route.addr().is_ipv4() { "-4" } else { "-6" };
    let r = route.to_string();
    let s = src.to_string();
    ip(&[family, "route", "add", &r, "dev", device, "src", &s]).map_err(|e| match e {
        Error::System(m) if m.contains("File exists") => {
            Error::RouteConflict(format!("route {r} already exists on this machine"))
        }
        e => e,
    })
}

/// Adds every route of `routes` on `device` with one `ip -batch` (the preferred source
/// address of each family from `src`). Returns the routes that could not be added, with
/// `ip`'s words, when some could not.
#[cfg(target_os = "linux")]
pub fn add_all(routes: &[IpNet], device: &str, src: impl Fn(&IpNet) -> IpAddr) -> Result<(), Error> {
    batch(routes.iter().map(|r| format!("route add {r} dev {device} src {}", src(r))))
}

/// Removes every route of `routes` from `device` with one `ip -batch`; routes already
/// gone are not an error.
#[cfg(target_os = "linux")]
pub fn remove_all(routes: &[IpNet], device: &str) -> Result<(), Error> {
    batch(routes.iter().map(|r| format!("route del {r} dev {device}"))).or_else(|e| match e {
        Error::System(m) if m.contains("No such process") || m.contains("Cannot find device") => Ok(()),
        e => Err(e),
    })
}

/// Runs `ip -force -batch -` with `lines` (every line is tried; the first failure is
/// reported).
#[cfg(target_os = "linux")]
fn batch(lines: impl Iterator<Item = String>) -> Result<(), Error> {
    use std::io::Write;
    let input: String = lines.map(|l| l + "\n").collect();
    if input.is_empty() {
        return Ok(());
    }
    let mut child = system("ip")
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::System(format!("cannot run ip: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(|e| Error::System(format!("ip -batch: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| Error::System(format!("ip -batch: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().next().unwrap_or("failed").trim();
    if first.contains("File exists") {
        return Err(Error::RouteConflict(format!("a route already exists on this machine ({first})")));
    }
    Err(Error::System(format!("ip -batch: {first}")))
}

/// The routes on `device` now.
pub fn on_device(device: &str) -> Vec<IpNet> {
    existing().unwrap_or_default().into_iter().filter(|e| e.dev == device).map(|e| e.dst).collect()
}

/// Removes `route` from `device`; a route that is already gone is not an error.
#[cfg(target_os = "linux")]
pub fn remove(route: &IpNet, device: &str) -> Result<(), Error> {
    let family = if route.addr().is_ipv4() { "-4" } else { "-6" };
    match ip(&[family, "route", "del", &route.to_string(), "dev", device]) {
        Err(Error::System(m)) if m.contains("No such process") || m.contains("Cannot find device") => Ok(()),
        r => r,
    }
}

/// Adds an address to `device`.
#[cfg(target_os = "linux")]
pub fn add_address(device: &str, addr: &IpNet) -> Result<(), Error> {
    let addr_text = addr.to_string();
    let mut args = vec!["addr", "add", addr_text.as_str(), "dev", device];
    // No duplicate address detection on the TUN device (nothing else is on it): a
    // tentative address cannot be a route's source until DAD ends ("Invalid source
    // address"), and DAD's probes would only go into the tunnel.
    if addr.addr().is_ipv6() {
        args.push("nodad");
    }
    ip(&args)
}

/// Whether a network device named `device` exists.
#[cfg(target_os = "linux")]
pub fn device_exists(device: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(device).exists()
}

/// Checks `--device` before anything is recorded: a name the kernel takes, and no
/// interface of that name yet. tpvpn deletes the device it recorded when it undoes its
/// changes, so taking an existing one (`--device wg0`) would delete someone else's.
pub fn check_new_device(device: &str) -> Result<(), Error> {
    let valid = (1..16).contains(&device.len())
        && !device.starts_with('-')
        && device != "."
        && device != ".."
        && device.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(Error::Config(format!(
            "--device {device:?}: an interface name is 1 to 15 letters, digits, '-', '_' or '.'"
        )));
    }
    if device_exists(device) {
        return Err(Error::Config(format!(
            "--device {device}: an interface of that name exists; tpvpn creates its own device, choose a name not in use"
        )));
    }
    Ok(())
}

/// Deletes a network device (left behind by a crashed daemon).
#[cfg(target_os = "linux")]
pub fn delete_device(device: &str) -> Result<(), Error> {
    if device_exists(device) {
        ip(&["link", "del", device])?;
    }
    Ok(())
}

/// The machine's routes, from `netstat -rn` (macOS; not yet run on a Mac).
#[cfg(target_os = "macos")]
pub fn existing() -> Result<Vec<Existing>, Error> {
    let out =
        system("netstat").args(["-rn"]).output().map_err(|e| Error::System(format!("cannot run netstat: {e}")))?;
    Ok(crate::os::macos::parse_netstat(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .map(|r| Existing { dst: r.dst, dev: r.netif, connected: r.connected })
        .collect())
}

/// Runs one command of `crate::os::macos`'s plans.
#[cfg(target_os = "macos")]
fn run(cmd: &[String]) -> Result<(), Error> {
    let (program, args) = cmd.split_first().ok_or_else(|| Error::System("empty command".into()))?;
    let out = system(program).args(args).output().map_err(|e| Error::System(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File exists") {
        return Err(Error::RouteConflict(format!("{}: {}", cmd.join(" "), err.trim())));
    }
    Err(Error::System(format!("{}: {}", cmd.join(" "), err.trim())))
}

/// Adds every route of `routes` on the utun `device`, one `route` each (macOS).
#[cfg(target_os = "macos")]
pub fn add_all(routes: &[IpNet], device: &str, _src: impl Fn(&IpNet) -> IpAddr) -> Result<(), Error> {
    routes.iter().try_for_each(|r| run(&crate::os::macos::route_add(r, device)))
}

/// Removes every route of `routes` from `device`; routes already gone are not an error.
#[cfg(target_os = "macos")]
pub fn remove_all(routes: &[IpNet], device: &str) -> Result<(), Error> {
    routes.iter().try_for_each(|r| remove(r, device))
}

/// Removes `route` from `device`; a route that is already gone is not an error.
#[cfg(target_os = "macos")]
pub fn remove(route: &IpNet, device: &str) -> Result<(), Error> {
    match run(&crate::os::macos::route_delete(route, device)) {
        Err(Error::System(m)) if m.contains("not in table") => Ok(()),
        r => r,
    }
}

/// Adds an address to the utun `device` (macOS).
#[cfg(target_os = "macos")]
pub fn add_address(device: &str, addr: &IpNet) -> Result<(), Error> {
    run(&crate::os::macos::address_add(device, addr.addr()))
}

/// Whether a network interface named `device` exists.
#[cfg(target_os = "macos")]
pub fn device_exists(device: &str) -> bool {
    nix::net::if_::if_nametoindex(device).is_ok()
}

/// A utun device goes with the descriptor of the process that opened it: nothing to
/// delete after a crash (macOS).
#[cfg(target_os = "macos")]
pub fn delete_device(_device: &str) -> Result<(), Error> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_checked_and_existing_ones_refused() {
        for bad in ["", "-x", "..", "a/b", "a b", "sixteen-chars-xx"] {
            assert!(check_new_device(bad).is_err(), "{bad:?}");
        }
        assert!(check_new_device("lo").unwrap_err().to_string().contains("exists"));
        assert!(check_new_device("tpvpn-test-0").is_ok());
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn never_proxy_splits_a_route() {
        let r = compute(&nets(&["10.96.0.0/12"]), &[], &nets(&["10.96.0.48/28"]));
        // Covers everything but the hole, exactly.
        for probe in ["10.96.0.1", "10.96.0.47", "10.96.0.64", "10.111.255.255"] {
            assert!(r.iter().any(|n| n.contains(&probe.parse::<IpAddr>().unwrap())), "{probe} missing in {r:?}");
        }
        for probe in ["10.96.0.48", "10.96.0.50", "10.96.0.63"] {
            assert!(!r.iter().any(|n| n.contains(&probe.parse::<IpAddr>().unwrap())), "{probe} routed in {r:?}");
        }
        // One sibling half per level between /12 and /28.
        assert_eq!(r.len(), 16);
    }

    #[test]
    fn never_proxy_covering_a_route_removes_it_and_ipv6_works() {
        let r = compute(
            &nets(&["10.96.0.0/12", "fd00:10::/64"]),
            &nets(&["10.244.0.0/16"]),
            &nets(&["10.0.0.0/8", "fd00:10::1/128"]),
        );
        assert!(r.iter().all(|n| n.addr().is_ipv6()), "{r:?}");
        assert_eq!(r.len(), 64);
        assert!(!r.iter().any(|n| n.contains(&"fd00:10::1".parse::<IpAddr>().unwrap())));
        assert!(r.iter().any(|n| n.contains(&"fd00:10::2".parse::<IpAddr>().unwrap())));
    }

    #[test]
    fn existing_routes_and_conflicts() {
        let json = r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0"},
            {"dst":"192.0.2.0/24","dev":"eth0"},{"dst":"10.96.7.0/24","dev":"wg0"},
            {"dst":"10.96.0.1","dev":"eth1"},{"dst":"10.96.0.0/12","dev":"tpvpn0"}]"#;
        let e = parse_existing(json);
        assert_eq!(e.len(), 4);
        let r: IpNet = "10.96.0.0/12".parse().unwrap();
        assert_eq!(conflict(&r, &e, "tpvpn0").map(|c| c.to_string()).as_deref(), Some("10.96.7.0/24 dev wg0"));
        let wide: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(conflict(&wide, &e, "tpvpn0").is_some());
        let other: IpNet = "10.244.0.0/16".parse().unwrap();
        assert!(conflict(&other, &e, "tpvpn0").is_none());
        assert!(parse_existing("not json").is_empty());
    }

    #[test]
    fn the_manager_cannot_take_the_default_route_and_connected_subnets_are_known() {
        let (ok, refused) =
            acceptable(&nets(&["10.96.0.0/12", "0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8", "fd00::/8", "fd00:10::/64"]));
        assert_eq!(ok, nets(&["10.96.0.0/12", "10.0.0.0/8", "fd00:10::/64"]));
        assert_eq!(refused, nets(&["0.0.0.0/1", "128.0.0.0/1", "fd00::/8"]));
        let json = r#"[{"dst":"192.0.2.0/24","dev":"eth0","protocol":"kernel","scope":"link"},
            {"dst":"10.96.7.0/24","dev":"wg0","protocol":"static"}]"#;
        let e = parse_existing(json);
        assert_eq!(e.iter().map(|r| r.connected).collect::<Vec<_>>(), [true, false]);
    }

    #[test]
    fn also_proxy_adds_and_overlaps_aggregate() {
        let r = compute(&nets(&["10.96.0.0/12"]), &nets(&["10.96.1.0/24", "192.0.2.0/24"]), &[]);
        assert_eq!(r, nets(&["10.96.0.0/12", "192.0.2.0/24"]));
    }
}
