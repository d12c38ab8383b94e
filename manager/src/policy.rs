//! What the manager dials for clients, and how much one client may hold at once.
//!
//! The destination policy is checked before every dial (TCP, UDP): destinations in a
//! `--deny-cidr` are denied; with `--allow-cidr`s given only destinations inside one of
//! them are dialed; without, everything is dialed except loopback, link-local (the
//! cloud metadata address 169.254.169.254 among them), unspecified and multicast
//! addresses. The manager's own listening ports on its own addresses are denied always.
//!
//! The limits are per client session: TCP flows, UDP flows and cluster DNS queries in
//! flight. Each counts while its permit lives; over a limit the new flow is answered
//! `Denied` with the reason, and the other sessions are not affected.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ipnet::IpNet;

/// Which destinations are dialed.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// The manager's own listening sockets: (its addresses, ports); never dialed.
    pub own_addresses: Vec<IpAddr>,
    pub own_ports: Vec<u16>,
    /// Dial anything (tests on loopback).
    pub allow_all: bool,
}

/// Addresses that are never a cluster destination unless allowed explicitly.
fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) if a.is_loopback() => Some("loopback"),
        IpAddr::V4(a) if a.is_link_local() => Some("link-local (cloud metadata)"),
        IpAddr::V4(a) if a.is_unspecified() || a.is_multicast() || a.is_broadcast() => Some("not a unicast host"),
        IpAddr::V6(a) if a.is_loopback() => Some("loopback"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("link-local"),
        IpAddr::V6(a) if a.is_unspecified() || a.is_multicast() => Some("not a unicast host"),
        IpAddr::V6(a) => a.to_ipv4_mapped().and_then(|v4| special(IpAddr::V4(v4))),
        IpAddr::V4(_) => None,
    }
}

impl Policy {
    /// A policy that dials everything (for tests on loopback).
    pub fn allow_all() -> Policy {
        Policy { allow_all: true, ..Policy::default() }
    }

    /// `Err(why)` when `dst` must not be dialed.
    pub fn check(&self, dst: SocketAddr) -> Result<(), String> {
        if self.allow_all {
            return Ok(());
        }
        let ip = dst.ip();
        let own = self.own_ports.contains(&dst.port())
            && (self.own_addresses.contains(&ip) || special(ip) == Some("loopback") || ip.is_unspecified());
        if own {
            return Err(format!("{dst} is the manager's own port"));
        }
        if let Some(net) = self.deny.iter().find(|n| n.contains(&ip)) {
            return Err(format!("{ip} is in a denied CIDR ({net})"));
        }
        if !self.allow.is_empty() {
            return if self.allow.iter().any(|n| n.contains(&ip)) {
                Ok(())
            } else {
                Err(format!("{ip} is outside the allowed CIDRs"))
            };
        }
        match special(ip) {
            Some(what) => Err(format!("{ip} is {what}; the manager does not dial it (--allow-cidr to allow it)")),
            None => Ok(()),
        }
    }
}

/// Per-session limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub tcp_flows: usize,
    pub udp_flows: usize,
    pub dns_queries: usize,
}

impl Default for Limits {
    /// Far above what a developer's laptop does (the scale benchmark holds 10,000 TCP
    /// flows through one client), far below what exhausts a manager.
    fn default() -> Self {
        Limits { tcp_flows: 16_384, udp_flows: 4_096, dns_queries: 512 }
    }
}

/// One session's counts against its [`Limits`].
#[derive(Debug, Default)]
pub struct Usage {
    tcp: AtomicUsize,
    udp: AtomicUsize,
    dns: AtomicUsize,
}

/// What a flow counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
    Dns,
}

/// A flow counted against its session's limit while it lives.
#[derive(Debug)]
pub struct Permit {
    usage: Arc<Usage>,
    kind: Kind,
}

impl Usage {
    fn counter(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::Tcp => &self.tcp,
            Kind::Udp => &self.udp,
            Kind::Dns => &self.dns,
        }
    }

    /// A permit for one more flow of `kind`, or why not.
    pub fn take(self: &Arc<Self>, kind: Kind, limits: &Limits) -> Result<Permit, String> {
        let limit = match kind {
            Kind::Tcp => limits.tcp_flows,
            Kind::Udp => limits.udp_flows,
            Kind::Dns => limits.dns_queries,
        };
        let c = self.counter(kind);
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).map_err(|_| {
            let what = match kind {
                Kind::Tcp => "TCP flows",
                Kind::Udp => "UDP flows",
                Kind::Dns => "DNS queries in flight",
            };
            format!("limit: at most {limit} {what} per client")
        })?;
        Ok(Permit { usage: self.clone(), kind })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.usage.counter(self.kind).fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_policy_denies_loopback_link_local_and_own_ports() {
        let p = Policy {
            own_addresses: vec!["10.244.0.5".parse().unwrap()],
            own_ports: vec![4443, 9090],
            ..Default::default()
        };
        assert!(p.check(addr("10.96.0.10:80")).is_ok());
        assert!(p.check(addr("127.0.0.1:80")).unwrap_err().contains("loopback"));
        assert!(p.check(addr("169.254.169.254:80")).unwrap_err().contains("link-local"));
        assert!(p.check(addr("[::ffff:127.0.0.1]:80")).is_err());
        assert!(p.check(addr("[fe80::1]:80")).is_err());
        assert!(p.check(addr("0.0.0.0:80")).is_err());
        assert!(p.check(addr("10.244.0.5:9090")).unwrap_err().contains("own port"));
        assert!(p.check(addr("10.244.0.5:8080")).is_ok(), "other ports of the manager's pod are a destination");
        assert!(p.check(addr("10.244.0.6:9090")).is_ok());
    }

    #[test]
    fn allow_and_deny_cidrs_shape_it() {
        let p = Policy { deny: vec!["10.96.5.0/24".parse().unwrap()], ..Default::default() };
        assert!(p.check(addr("10.96.5.1:80")).unwrap_err().contains("denied CIDR"));
        let p = Policy {
            allow: vec!["10.96.0.0/12".parse().unwrap(), "127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        assert!(p.check(addr("10.96.0.1:80")).is_ok());
        assert!(p.check(addr("127.0.0.1:80")).is_ok(), "explicitly allowed");
        assert!(p.check(addr("192.0.2.1:80")).unwrap_err().contains("outside"));
        assert!(Policy::allow_all().check(addr("127.0.0.1:1")).is_ok());
    }

    #[test]
    fn permits_count_per_session() {
        let limits = Limits { tcp_flows: 2, udp_flows: 1, dns_queries: 1 };
        let (a, b) = (Arc::new(Usage::default()), Arc::new(Usage::default()));
        let p1 = a.take(Kind::Tcp, &limits).unwrap();
        let _p2 = a.take(Kind::Tcp, &limits).unwrap();
        assert!(a.take(Kind::Tcp, &limits).unwrap_err().contains("at most 2 TCP flows"));
        assert!(b.take(Kind::Tcp, &limits).is_ok(), "another session is not affected");
        drop(p1);
        assert!(a.take(Kind::Tcp, &limits).is_ok(), "a permit given back is free again");
        let _u = a.take(Kind::Udp, &limits).unwrap();
        assert!(a.take(Kind::Udp, &limits).is_err());
    }
}
