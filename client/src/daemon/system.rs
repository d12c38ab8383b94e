//! The system changes the daemon makes, each recorded in the state before it is made: the
//! TUN device, the routes (diffed and applied in one batch), tpvpn's DNS server and the
//! OS resolver (resolv.conf or systemd-resolved).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use tracing::{info, warn};

use crate::control::Dns;
use crate::os::osdns;
use crate::os::routes;
use crate::state::{self, State};
use crate::Error;

use super::plan::Plan;
use super::supervisor::Update;

/// Address of the TUN device; the source of every routed flow.
pub const TUN_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// IPv6 address of the TUN device, added when an IPv6 CIDR is routed.
pub const TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd74, 0x7076, 0x706e, 0, 0, 0, 0, 1);

/// The routes on the TUN device. Every change is recorded in the state file before it
/// is made, so that a crash at any point leaves a record that undoes it.
pub(super) struct Routing<'a> {
    pub(super) device: String,
    pub(super) also: Vec<IpNet>,
    pub(super) never: Vec<IpNet>,
    pub(super) state: &'a mut State,
    pub(super) state_path: PathBuf,
    pub(super) v6_address: bool,
    pub(super) allow_conflicts: bool,
    /// `--vnat` and the pool of virtual ranges.
    pub(super) vnat_mode: tpvpn_vnat::Mode,
    pub(super) pool: tpvpn_vnat::Pool,
    /// The mappings in force, watched by the data plane.
    pub(super) vnat: tokio::sync::watch::Sender<tpvpn_vnat::Table>,
    /// The manager's CIDRs last applied, for when the laptop's own routes change.
    pub(super) cluster: Vec<IpNet>,
    /// Where the laptop's open flows went when last asked ([`Routing::apply`] keeps a
    /// route to those in a range that moved to virtual addresses).
    pub(super) destinations: Vec<IpAddr>,
    /// Host routes kept for open flows (a subset of the state's routes).
    pub(super) held: Vec<IpNet>,
    /// The search path written with the resolver files (macOS).
    pub(super) dns_search: Vec<String>,
}

impl Routing<'_> {
    /// Makes `/etc/resolver` hold one file per routing domain (macOS): every path recorded
    /// before anything is written, files no longer wanted removed (only tpvpn's).
    pub(super) fn resolver_files(&mut self, domains: &[String]) -> Result<(), Error> {
        let want = crate::os::macos::resolver_files(domains, IpAddr::V4(DNS_V4), &self.dns_search);
        let had = std::mem::take(&mut self.state.resolver_files);
        self.state.resolver_files = had.iter().cloned().chain(want.iter().map(|(p, _)| p.clone())).collect();
        self.state.resolver_files.dedup();
        self.state.save(&self.state_path)?;
        let applied = crate::os::macos::apply_resolver_files(&want, &had);
        self.state.resolver_files = want.into_iter().map(|(p, _)| p).collect();
        self.state.save(&self.state_path)?;
        applied.map_err(|e| Error::System(format!("cannot write the resolver files: {e}")))
    }

    /// Makes the device's routes those for `cluster_cidrs`: adds the new ones first,
    /// then removes the stale ones, so that no destination is unrouted in between. The
    /// manager is not trusted with the laptop's routing: its CIDRs wider than a /8 are
    /// refused (they would take over the default route), directly connected subnets and
    /// the laptop's own nameservers are never routed, and at most
    /// [`routes::MAX_ROUTES`] routes are installed. A cluster CIDR that overlaps a route
    /// of the laptop is routed as its virtual range instead (`--vnat`, [`tpvpn_vnat::plan`]);
    /// the new mappings are published before any route to them exists. Each batch is
    /// recorded in the state file before it is made, and made with one `ip -batch`.
    pub(super) fn apply(&mut self, cluster_cidrs: &[IpNet]) -> Result<Vec<IpNet>, Error> {
        let (cluster, refused) = routes::acceptable(cluster_cidrs);
        if !refused.is_empty() {
            warn!(?refused, "the manager asked to route CIDRs wider than a /8: refused");
        }
        self.cluster = cluster_cidrs.to_vec();
        let existing = routes::existing()?;
        let elsewhere: Vec<IpNet> = existing.iter().filter(|e| e.dev != self.device).map(|e| e.dst).collect();
        // `--allow-route-conflicts` takes an overlapping range from the other network, as
        // it always did; `always` maps every range anyway.
        let mode = match self.vnat_mode {
            tpvpn_vnat::Mode::Auto if self.allow_conflicts => tpvpn_vnat::Mode::Off,
            mode => mode,
        };
        // Aggregated, as the plan takes them (no address in two ranges).
        let cluster: Vec<IpNet> = IpNet::aggregate(&cluster);
        let table = tpvpn_vnat::plan(&self.vnat.borrow(), &cluster, &elsewhere, &self.pool, mode)
            .map_err(|e| Error::Config(e.to_string()))?;
        for m in table.mappings().iter().filter(|m| self.vnat.borrow().virtual_of(&m.cluster).is_none()) {
            info!(cluster = %m.cluster, virtual_range = %m.virtual_net, "a cluster range overlaps a route of this machine: reached through virtual addresses");
        }
        let routed: Vec<IpNet> = cluster.iter().map(|c| table.virtual_of(c).unwrap_or(*c)).collect();
        self.vnat.send_replace(table);
        let mut never = self.never.clone();
        never.extend(existing.iter().filter(|e| e.connected && e.dev != self.device).map(|e| e.dst));
        let mut wanted = routes::compute(&routed, &self.also, &never);
        // A connection open to a cluster address whose range just moved to virtual
        // addresses (a VPN took the range) keeps its way into the tunnel: a host route
        // each, until it ends (the next apply after it drops the route).
        let held: Vec<IpNet> = self
            .destinations
            .iter()
            .filter(|a| table_maps(&self.vnat.borrow(), a))
            .map(|a| routes::host(*a))
            .take(MAX_HELD)
            .collect();
        for h in held.iter().filter(|h| !self.held.contains(h)) {
            info!(route = %h, "a connection is open to this cluster address: its route is kept until it ends");
        }
        wanted.extend(held.iter().copied());
        self.held = held;
        if wanted.len() > routes::MAX_ROUTES {
            warn!(
                asked = wanted.len(),
                kept = routes::MAX_ROUTES,
                "the manager asked for too many routes: the rest are left out"
            );
            wanted.truncate(routes::MAX_ROUTES);
        }
        if !self.v6_address && wanted.iter().any(|r| r.addr().is_ipv6()) {
            routes::add_address(&self.device, &IpNet::from(IpAddr::V6(TUN_V6)))?;
            self.v6_address = true;
        }
        let new: Vec<IpNet> = wanted.iter().filter(|r| !self.state.routes.contains(r)).copied().collect();
        if !self.allow_conflicts && !new.is_empty() {
            let checked = new.iter().filter(|r| !self.held.contains(r));
            if let Some((r, c)) =
                checked.filter_map(|r| routes::conflict(r, &existing, &self.device).map(|c| (r, c))).next()
            {
                return Err(Error::RouteConflict(format!("route {r} overlaps the existing route {c} on this machine")));
            }
        }
        if !new.is_empty() {
            self.state.routes.extend(new.iter().copied());
            self.state.save(&self.state_path)?;
            let src = |r: &IpNet| if r.addr().is_ipv4() { IpAddr::V4(TUN_V4) } else { IpAddr::V6(TUN_V6) };
            if let Err(e) = routes::add_all(&new, &self.device, src) {
                // Keep on record what is on the device (some of the batch may be).
                let present = routes::on_device(&self.device);
                self.state.routes.retain(|r| !new.contains(r) || present.contains(r));
                self.state.save(&self.state_path)?;
                return Err(e);
            }
        }
        let stale: Vec<IpNet> = self.state.routes.iter().filter(|r| !wanted.contains(r)).copied().collect();
        if !stale.is_empty() {
            routes::remove_all(&stale, &self.device)?;
            self.state.routes.retain(|r| !stale.contains(r));
            self.state.save(&self.state_path)?;
        }
        Ok(wanted)
    }
}

/// Host routes kept at most for connections open when their range moved.
const MAX_HELD: usize = 256;

/// Whether `addr` is a cluster address in a range that `table` maps to virtual ones.
fn table_maps(table: &tpvpn_vnat::Table, addr: &IpAddr) -> bool {
    table.mappings().iter().any(|m| m.cluster.contains(addr))
}

/// The address of tpvpn's DNS server, on the TUN device.
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// The resolv.conf `resolvconf` mode replaces.
pub(super) const RESOLV_CONF: &str = "/etc/resolv.conf";

/// `--dns-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    /// `resolved` when systemd-resolved manages the resolver, else `resolvconf`.
    Auto,
    Resolved,
    Resolvconf,
    Off,
    /// macOS: one `/etc/resolver/<domain>` file per routing domain (what `auto` and
    /// `resolvconf` mean there).
    ResolverFiles,
}

impl DnsMode {
    /// What `auto` means on this machine.
    fn pick(self) -> DnsMode {
        if cfg!(target_os = "macos") && self != DnsMode::Off {
            return DnsMode::ResolverFiles;
        }
        if self != DnsMode::Auto {
            return self;
        }
        let stub =
            std::fs::read_link(RESOLV_CONF).is_ok_and(|target| target.to_string_lossy().contains("systemd/resolve"));
        auto_mode(stub, crate::os::resolved::available)
    }

    fn name(self) -> &'static str {
        match self {
            DnsMode::Auto => "auto",
            DnsMode::Resolved => "resolved",
            DnsMode::Resolvconf => "resolvconf",
            DnsMode::Off => "off",
            DnsMode::ResolverFiles => "resolver-files",
        }
    }
}

/// `auto`: systemd-resolved when it manages resolv.conf (`stub`) and answers on the bus;
/// resolv.conf otherwise; nothing when resolv.conf belongs to a resolved that does not
/// answer (rewriting it would fight resolved).
fn auto_mode(stub: bool, resolved_available: impl FnOnce() -> bool) -> DnsMode {
    match (stub, stub && resolved_available()) {
        (false, _) => DnsMode::Resolvconf,
        (true, true) => DnsMode::Resolved,
        (true, false) => {
            warn!("{RESOLV_CONF} belongs to systemd-resolved, which does not answer on the system bus: DNS is not configured (the resolver still listens on {DNS_V4}); use --dns-mode resolvconf to replace {RESOLV_CONF}");
            DnsMode::Off
        }
    }
}

/// A socket on `addr` (an address of `device`) that only this machine's own processes
/// reach: bound to `device`, which the kernel gives as the arrival device of every packet a
/// local process sends to that address (since Linux 4.13; the packet itself goes through
/// loopback). A packet another host routes to `addr` through the laptop arrives on another
/// device and finds no socket, so the laptop is no open resolver for its neighbours.
fn local_socket(device: &str, addr: std::net::SocketAddr, kind: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    #[cfg(target_os = "linux")]
    s.bind_device(Some(device.as_bytes()))?;
    // macOS has no equivalent: its IP_BOUND_IF would match the arrival interface, and a
    // local process's packets to the utun's address arrive on lo0, so it would shut the
    // Mac itself out. There the DNS server checks the source address instead.
    #[cfg(not(target_os = "linux"))]
    let _ = device;
    if kind == socket2::Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// Starts the DNS server on [`DNS_V4`] with the manager's first catalog, and (resolvconf
/// mode) points the system resolver at it, recording the original first.
pub(super) async fn start_dns(
    mode: DnsMode,
    plan: &Plan,
    cluster_domain: &str,
    conn: &quinn::Connection,
    initial: &[Update],
    routing: &mut Routing<'_>,
) -> Result<(Arc<crate::dns::Shared>, DnsMode), Error> {
    let mode = mode.pick();
    routes::add_address(&routing.device, &IpNet::from(IpAddr::V4(DNS_V4)))?;
    let original = match osdns::read_original(std::path::Path::new(RESOLV_CONF)) {
        Ok(text) if mode == DnsMode::Resolvconf && osdns::lost_original(&text) => {
            return Err(Error::Config(format!(
                "{RESOLV_CONF} was written by an older tpvpn and does not hold the original it replaced: \
                 put the original back (your network manager can rewrite it) and run tpvpn up again"
            )))
        }
        Ok(text) => osdns::original_of(&text),
        Err(e) if mode == DnsMode::Resolvconf => return Err(e),
        Err(_) => String::new(),
    };
    let parsed = osdns::parse(&original);
    let domain = if cluster_domain.is_empty() { "cluster.local".to_string() } else { cluster_domain.to_string() };
    let search = osdns::cluster_search(&plan.namespace, &domain);
    let (upstreams, resolved) = if mode == DnsMode::Resolved {
        let ifindex = crate::os::resolved::ifindex(&routing.device)?;
        (crate::os::resolved::upstreams(ifindex)?, Some(crate::os::resolved::Link { ifindex, search: search.clone() }))
    } else {
        (osdns::upstreams(&parsed, IpAddr::V4(DNS_V4)), None)
    };
    let config = tpvpn_resolver::Config {
        cluster_domain: domain.clone(),
        namespace: plan.namespace.clone(),
        include_suffixes: plan.include_suffixes.clone(),
        exclude_suffixes: plan.exclude_suffixes.clone(),
        ..Default::default()
    };
    let mut resolver = tpvpn_resolver::Resolver::new(config, tpvpn_resolver::Psl::embedded());
    resolver.set_vnat(routing.vnat.borrow().clone());
    let shared = Arc::new(crate::dns::Shared {
        resolver: std::sync::Mutex::new(resolver),
        upstreams,
        conn: std::sync::Mutex::new(Some(conn.clone())),
        resolved,
        in_flight: Arc::new(tokio::sync::Semaphore::new(crate::dns::in_flight_limit())),
    });
    for u in initial {
        match u {
            Update::Namespaces(names) => shared.resolver().set_namespaces(names.clone()),
            Update::Services(services) => shared.resolver().set_services(services.clone()),
            Update::Cluster(_) => {}
        }
    }
    let addr = std::net::SocketAddr::new(IpAddr::V4(DNS_V4), 53);
    let udp: std::net::UdpSocket = local_socket(&routing.device, addr, socket2::Type::DGRAM)
        .map_err(|e| Error::System(format!("cannot listen for DNS on udp {addr}: {e}")))?
        .into();
    let tcp = local_socket(&routing.device, addr, socket2::Type::STREAM)
        .and_then(|s| {
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(s.into())
        })
        .map_err(|e| Error::System(format!("cannot listen for DNS on tcp {addr}: {e}")))?;
    // One thread: with batched receives it outpaces dnsmasq, and leaves a core to the rest.
    let (udp_shared, runtime) = (shared.clone(), tokio::runtime::Handle::current());
    std::thread::Builder::new()
        .name("tpvpn-dns".into())
        .spawn(move || crate::dns::serve_udp(udp, udp_shared, runtime))
        .map_err(|e| Error::System(format!("cannot start the DNS thread: {e}")))?;
    tokio::spawn(crate::dns::serve_tcp(tcp, shared.clone()));
    if mode == DnsMode::Resolvconf {
        routing.state.resolv_conf = Some(state::ResolvBackup { path: RESOLV_CONF.into(), original: original.clone() });
        routing.state.save(&routing.state_path)?;
        let ours = osdns::render(IpAddr::V4(DNS_V4), &search, &original);
        osdns::write_in_place(std::path::Path::new(RESOLV_CONF), ours.as_bytes())?;
    }
    if mode == DnsMode::ResolverFiles {
        routing.dns_search = search.clone();
        let domains = shared.resolver().routing_domains();
        routing.resolver_files(&domains)?;
    }
    if let Some(link) = &shared.resolved {
        routing.state.resolved_link = Some(link.ifindex);
        routing.state.save(&routing.state_path)?;
        let domains = shared.resolver().routing_domains();
        crate::os::resolved::set_link(link, IpAddr::V4(DNS_V4), &domains)?;
    }
    Ok((shared, mode))
}

pub(super) fn dns_status(shared: &crate::dns::Shared, mode: &DnsMode) -> Dns {
    let r = shared.resolver();
    Dns {
        server: Some(DNS_V4.to_string()),
        mode: mode.name().into(),
        domains: r.routing_domains(),
        filtered_namespaces: r.filtered_namespaces(),
    }
}

/// Creates the TUN device, with checksum offload where the kernel allows it (the bool):
/// then the kernel neither computes the checksums of what the laptop sends into the
/// device nor verifies those of what the stack writes, and the stack writes TCP with
/// only its pseudo-header sum.
#[cfg(target_os = "linux")]
pub(super) fn open_tun(name: &str, mtu: u16) -> Result<(tun_rs::AsyncDevice, bool), Error> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new().name(name).ipv4(TUN_V4, 32u8, None).mtu(mtu).offload(offload).build_async()
    };
    match build(true).and_then(|tun| checksum_offload_only(&tun).map(|()| tun)) {
        Ok(tun) => return Ok((tun, true)),
        // The device created above is gone with its descriptor.
        Err(e) => warn!(device = name, "no checksum offload on the TUN device ({e}); checksums are computed"),
    }
    build(false).map(|tun| (tun, false)).map_err(|e| Error::System(format!("cannot create TUN device {name}: {e}")))
}

/// The TUN device elsewhere (macOS: a utun, no offload; a `--device` that is not
/// `utunN` lets the system pick the number).
#[cfg(not(target_os = "linux"))]
pub(super) fn open_tun(name: &str, mtu: u16) -> Result<(tun_rs::AsyncDevice, bool), Error> {
    let builder = tun_rs::DeviceBuilder::new();
    let builder = if name.starts_with("utun") { builder.name(name) } else { builder };
    builder
        .ipv4(TUN_V4, 32u8, None)
        .mtu(mtu)
        .build_async()
        .map(|tun| (tun, false))
        .map_err(|e| Error::System(format!("cannot create TUN device {name}: {e}")))
}

/// Leaves only checksum offload on (tun-rs's `offload` also turns on TCP and UDP
/// segmentation offload), so that every packet read is one packet within the MTU.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn checksum_offload_only(tun: &tun_rs::AsyncDevice) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETOFFLOAD takes its flags by value, and the descriptor is the live TUN
    // device `tun` owns.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(libc::TUN_F_CSUM)) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_resolved_only_when_it_owns_resolv_conf_and_answers() {
        assert_eq!(auto_mode(false, || panic!("not asked when resolv.conf is a plain file")), DnsMode::Resolvconf);
        assert_eq!(auto_mode(true, || true), DnsMode::Resolved);
        assert_eq!(auto_mode(true, || false), DnsMode::Off);
    }
}
