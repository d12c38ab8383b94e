//! The node's own addresses. The agent runs in the node's network namespace, and every
//! connection the node itself makes to a pod (a kubelet probe) comes from one of them:
//! `status.hostIP` on some CNIs, the bridge's address on bridge CNIs (flannel, kubenet),
//! `cilium_host` on Cilium. Captures exempt them all, and follow them as they change.

use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::watch;

/// How often the node's addresses are read again without a change notice from the
/// kernel (a missed or overflowed notice).
pub const POLL: Duration = Duration::from_secs(1);

/// Every address on this namespace's interfaces but loopback, sorted.
pub fn read() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut ips: Vec<IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The node's addresses, kept current by a thread of their own (in the calling thread's
/// network namespace: the node's) that reads them again on every address change the
/// kernel announces (rtnetlink) and every [`POLL`]; it ends when every receiver is gone.
pub fn follow() -> watch::Receiver<Vec<IpAddr>> {
    let (tx, rx) = watch::channel(read());
    let notices = AddressNotices::open();
    if let Err(e) = &notices {
        tracing::warn!(error = %e, "no address notices from the kernel: the node's addresses are read every second");
    }
    std::thread::Builder::new()
        .name("node-addrs".into())
        .spawn(move || {
            while !tx.is_closed() {
                match &notices {
                    Ok(n) => n.wait(),
                    Err(_) => std::thread::sleep(POLL),
                }
                let now = read();
                tx.send_if_modified(|v| {
                    let changed = *v != now;
                    if changed {
                        *v = now;
                    }
                    changed
                });
            }
        })
        .map_or_else(|e| tracing::warn!(error = %e, "cannot follow the node's addresses"), drop);
    rx
}

/// A netlink socket subscribed to address changes (IPv4 and IPv6).
struct AddressNotices(std::os::fd::OwnedFd);

impl AddressNotices {
    /// `RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR` (linux/rtnetlink.h).
    const GROUPS: u32 = 0x10 | 0x100;

    fn open() -> nix::Result<AddressNotices> {
        use nix::sys::socket::{
            bind, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        use std::os::fd::AsRawFd;
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, Self::GROUPS))?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(POLL.as_secs() as i64, 0))?;
        Ok(AddressNotices(fd))
    }

    /// Returns after a notice (its content does not matter: the addresses are read again
    /// whole), an overflow (notices were lost), or at most [`POLL`].
    fn wait(&self) {
        use nix::errno::Errno;
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 16 * 1024];
        match nix::sys::socket::recv(self.0.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty()) {
            Ok(_) | Err(Errno::EAGAIN | Errno::ENOBUFS | Errno::EINTR) => {}
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// The sources a capture of `pod_ip` exempts: the node's addresses of the pod's family,
/// and the Pod's `status.hostIP`.
pub fn exempt(node: &[IpAddr], host_ip: Option<IpAddr>, pod_ip: IpAddr) -> Vec<IpAddr> {
    let mut all: Vec<IpAddr> =
        node.iter().copied().chain(host_ip).filter(|ip| ip.is_ipv4() == pod_ip.is_ipv4()).collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exempt_is_the_pods_family_with_the_host_ip() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let node = [ip("10.250.1.1"), ip("10.244.2.1"), ip("fd00::1")];
        assert_eq!(
            exempt(&node, Some(ip("10.250.9.9")), ip("10.244.2.10")),
            [ip("10.244.2.1"), ip("10.250.1.1"), ip("10.250.9.9")]
        );
        assert_eq!(exempt(&node, Some(ip("10.250.1.1")), ip("fd00::10")), [ip("fd00::1")]);
    }

    #[test]
    fn this_namespaces_addresses_leave_loopback_out() {
        assert!(read().iter().all(|ip| !ip.is_loopback()));
    }
}
