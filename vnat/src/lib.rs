//! Virtual addresses for cluster ranges that the laptop already routes elsewhere (VNAT).
//!
//! A corporate VPN or a home network often routes `10.0.0.0/8` or part of it, and clusters
//! use the same private ranges. Routing such a cluster range into the tunnel would take it
//! from the other network. Instead the range gets a free virtual range of the same size:
//! the laptop's DNS answers cluster names with virtual addresses, only the virtual range is
//! routed into the tunnel, and the netstack opens a flow to a virtual address toward the
//! cluster address at the same offset. The manager never sees a virtual address.
//!
//! Layer and I/O contract: sans-IO. [`plan`] decides the mappings from plain data (the
//! cluster's ranges, the laptop's routes, the [`Pool`], the [`Mode`] and the mappings
//! made so far, which it keeps stable); a [`Table`] translates addresses both ways.

use std::net::IpAddr;

use ipnet::IpNet;

/// Errors of this crate: each one line naming the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{text} is not a network (CIDR, such as 240.0.0.0/4 or fd74:7076:8000::/33)")]
    NotCidr { text: String },
    #[error("{text} is not a network: its host bits are set (did you mean {network}?)")]
    HostBits { text: String, network: IpNet },
    #[error("unknown --vnat mode {0:?}: use auto, off or always")]
    Mode(String),
    #[error(
        "the virtual subnet {pool} overlaps the route {route} of this machine: pass a --virtual-subnet that it does not route"
    )]
    PoolOverlapsRoute { pool: IpNet, route: IpNet },
    #[error(
        "the virtual subnet {pool} overlaps the cluster range {cluster}: pass a --virtual-subnet outside the cluster"
    )]
    PoolOverlapsCluster { pool: IpNet, cluster: IpNet },
    #[error(
        "the virtual subnet {pool} is too small for the cluster range {cluster} (a /{needed} or wider is needed): pass a wider --virtual-subnet"
    )]
    PoolTooSmall { pool: IpNet, cluster: IpNet, needed: u8 },
    #[error("{count} cluster ranges would need virtual addresses, more than the {MAX_MAPPINGS} tpvpn maps: route fewer ranges (--never-proxy) or use --vnat off")]
    TooMany { count: usize },
    #[error("no free /{} is left in the virtual subnet {pool} for the cluster range {cluster}: pass a wider --virtual-subnet", cluster.prefix_len())]
    PoolExhausted { pool: IpNet, cluster: IpNet },
}

/// `--vnat`: which cluster ranges get virtual addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Only ranges that overlap a route of the laptop (other than the default route).
    #[default]
    Auto,
    /// None: an overlapping range is refused (or taken, with `--allow-route-conflicts`).
    Off,
    /// Every cluster range (for tests, and for networks whose routes change often).
    Always,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(Mode::Auto),
            "off" => Ok(Mode::Off),
            "always" => Ok(Mode::Always),
            other => Err(Error::Mode(other.to_string())),
        }
    }
}

/// The default IPv4 pool: the reserved class E range. No network is ever given addresses
/// from it, so it collides with no VPN, LAN or carrier range (100.64.0.0/10 is Tailscale's
/// and carriers'); Linux routes it as unicast since 2.6.25.
pub const DEFAULT_POOL_V4: &str = "240.0.0.0/4";
/// The default IPv6 pool: unique local addresses beside tpvpn's own (`fd74:7076:706e::/48`).
pub const DEFAULT_POOL_V6: &str = "fd74:7076:8000::/33";

/// The most cluster ranges mapped at once: a cluster has a few ranges, and a manager
/// that sends thousands overlapping the laptop's routes is refused rather than mapped.
pub const MAX_MAPPINGS: usize = 64;

/// Parses a `--virtual-subnet`: a network, with no host bits set.
pub fn parse_subnet(text: &str) -> Result<IpNet, Error> {
    let net: IpNet = text.trim().parse().map_err(|_| Error::NotCidr { text: text.to_string() })?;
    if net.trunc() != net {
        return Err(Error::HostBits { text: text.to_string(), network: net.trunc() });
    }
    Ok(net)
}

/// Where virtual ranges come from: the `--virtual-subnet`s given, and the defaults for a
/// family none was given for. A given subnet must be free (an overlap is an error); the
/// parts of a default one that the laptop routes are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    given: Vec<IpNet>,
    defaults: Vec<IpNet>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new(Vec::new())
    }
}

impl Pool {
    pub fn new(given: Vec<IpNet>) -> Pool {
        let defaults = [DEFAULT_POOL_V4, DEFAULT_POOL_V6]
            .iter()
            .filter_map(|d| d.parse::<IpNet>().ok())
            .filter(|d| !given.iter().any(|g| g.addr().is_ipv4() == d.addr().is_ipv4()))
            .collect();
        Pool { given, defaults }
    }

    fn nets(&self, v4: bool) -> impl Iterator<Item = &IpNet> {
        self.given.iter().chain(&self.defaults).filter(move |n| n.addr().is_ipv4() == v4)
    }
}

/// One cluster range and the virtual range that stands for it (same size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub cluster: IpNet,
    pub virtual_net: IpNet,
}

/// The mappings in force; translates addresses both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    maps: Vec<Mapping>,
}

impl Table {
    pub fn mappings(&self) -> &[Mapping] {
        &self.maps
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Where a flow to `ip` goes in the cluster: the cluster address of a virtual one,
    /// any other address unchanged.
    pub fn to_cluster(&self, ip: IpAddr) -> IpAddr {
        self.maps.iter().find(|m| m.virtual_net.contains(&ip)).map_or(ip, |m| shift(ip, m.virtual_net, m.cluster))
    }

    /// The address the laptop uses for the cluster address `ip`: its virtual address when
    /// its range is mapped, else `ip`.
    pub fn to_virtual(&self, ip: IpAddr) -> IpAddr {
        self.maps.iter().find(|m| m.cluster.contains(&ip)).map_or(ip, |m| shift(ip, m.cluster, m.virtual_net))
    }

    /// Whether `ip` is a virtual address.
    pub fn is_virtual(&self, ip: IpAddr) -> bool {
        self.maps.iter().any(|m| m.virtual_net.contains(&ip))
    }

    /// Whether `ip` lies in a mapped cluster range: on this laptop it is the other
    /// network's address, not the cluster's.
    pub fn is_shadowed(&self, ip: IpAddr) -> bool {
        self.maps.iter().any(|m| m.cluster.contains(&ip))
    }

    /// The virtual range standing for the cluster range `cluster`, if it is mapped.
    pub fn virtual_of(&self, cluster: &IpNet) -> Option<IpNet> {
        self.maps.iter().find(|m| m.cluster == *cluster).map(|m| m.virtual_net)
    }
}

/// `ip`, which lies in `from`, moved to the same offset in `to` (same prefix length).
fn shift(ip: IpAddr, from: IpNet, to: IpNet) -> IpAddr {
    let offset = bits(ip) - bits(from.network());
    addr(bits(to.network()) + offset, to.addr().is_ipv4())
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(u32::try_from(v).unwrap_or(u32::MAX).into())
    } else {
        IpAddr::V6(v.into())
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The mappings for `cluster` (the ranges routed to the cluster) on a laptop whose other
/// routes are `routes` (the default route and the tunnel's own routes left out). The
/// ranges are taken aggregated (`10.96.0.0/16` inside `10.96.0.0/12` is the latter, two
/// adjacent halves one range), so that no address has two mappings: pass them so.
///
/// Mappings of `current` whose cluster range is still routed are kept as they are, so
/// that addresses the laptop's programs hold stay valid; a range no longer overlapping
/// stays mapped until the next `up`. New ranges are mapped as `mode` says, each onto
/// the first free aligned range of the pool (free: outside every route, every cluster
/// range and every other virtual range).
pub fn plan(current: &Table, cluster: &[IpNet], routes: &[IpNet], pool: &Pool, mode: Mode) -> Result<Table, Error> {
    if mode == Mode::Off {
        return Ok(Table::default());
    }
    for g in &pool.given {
        if let Some(r) = routes.iter().find(|r| overlaps(g, r)) {
            return Err(Error::PoolOverlapsRoute { pool: *g, route: *r });
        }
        if let Some(c) = cluster.iter().find(|c| overlaps(g, c)) {
            return Err(Error::PoolOverlapsCluster { pool: *g, cluster: *c });
        }
    }
    let cluster = IpNet::aggregate(&cluster.to_vec());
    let mut maps: Vec<Mapping> = current.maps.iter().filter(|m| cluster.contains(&m.cluster)).copied().collect();
    // The widest first: they need the largest aligned blocks.
    let mut wanted: Vec<IpNet> = cluster
        .iter()
        .copied()
        .filter(|c| !maps.iter().any(|m| m.cluster == *c))
        .filter(|c| mode == Mode::Always || routes.iter().any(|r| overlaps(c, r)))
        .collect();
    wanted.sort_by_key(IpNet::prefix_len);
    wanted.dedup();
    if maps.len() + wanted.len() > MAX_MAPPINGS {
        return Err(Error::TooMany { count: maps.len() + wanted.len() });
    }
    for c in wanted {
        let taken: Vec<IpNet> =
            routes.iter().chain(&cluster).copied().chain(maps.iter().map(|m| m.virtual_net)).collect();
        let virtual_net = allocate(&c, pool, &taken)?;
        maps.push(Mapping { cluster: c, virtual_net });
    }
    Ok(Table { maps })
}

/// The first free block of `cluster`'s size in the pool of its family.
fn allocate(cluster: &IpNet, pool: &Pool, taken: &[IpNet]) -> Result<IpNet, Error> {
    let v4 = cluster.addr().is_ipv4();
    let mut widest_short = None;
    let mut exhausted = None;
    for p in pool.nets(v4) {
        if p.prefix_len() > cluster.prefix_len() {
            widest_short.get_or_insert(*p);
            continue;
        }
        match first_free(p, cluster.prefix_len(), taken) {
            Some(net) => return Ok(net),
            None => {
                exhausted.get_or_insert(*p);
            }
        }
    }
    match (exhausted, widest_short) {
        (Some(pool), _) => Err(Error::PoolExhausted { pool, cluster: *cluster }),
        (None, Some(pool)) => Err(Error::PoolTooSmall { pool, cluster: *cluster, needed: cluster.prefix_len() }),
        (None, None) => Err(Error::PoolExhausted { pool: *cluster, cluster: *cluster }),
    }
}

/// The lowest block `/len` inside `pool`, aligned to its size, that overlaps nothing in
/// `taken`. Jumps past each block's first obstacle, so it never walks the blocks one by one.
fn first_free(pool: &IpNet, len: u8, taken: &[IpNet]) -> Option<IpNet> {
    let v4 = pool.addr().is_ipv4();
    let width = if v4 { 32 } else { 128 };
    let size: u128 = 1u128.checked_shl(u32::from(width - len)).unwrap_or(0);
    let end = bits(pool.broadcast());
    let mut start = bits(pool.network());
    loop {
        let last = start.checked_add(size.wrapping_sub(1))?;
        if last > end {
            return None;
        }
        let block = IpNet::new(addr(start, v4), len).ok()?;
        match taken
            .iter()
            .filter(|t| t.addr().is_ipv4() == v4 && overlaps(t, &block))
            .map(|t| bits(t.broadcast()))
            .max()
        {
            None => return Some(block),
            // The next aligned block after the obstacle.
            Some(obstacle_end) => start = obstacle_end.checked_add(1)?.checked_next_multiple_of(size.max(1))?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_overlapping_range_is_mapped_and_translated_both_ways() {
        let cluster = [net("10.96.0.0/12"), net("10.244.0.0/16")];
        let routes = [net("10.96.0.0/12"), net("192.168.1.0/24")];
        let t = plan(&Table::default(), &cluster, &routes, &Pool::default(), Mode::Auto).unwrap();
        assert_eq!(t.mappings(), &[Mapping { cluster: net("10.96.0.0/12"), virtual_net: net("240.0.0.0/12") }]);
        assert_eq!(t.to_virtual(ip("10.96.0.10")), ip("240.0.0.10"));
        assert_eq!(t.to_virtual(ip("10.111.255.254")), ip("240.15.255.254"));
        assert_eq!(t.to_cluster(ip("240.0.0.10")), ip("10.96.0.10"));
        // Unmapped addresses pass unchanged, both ways.
        assert_eq!(t.to_virtual(ip("10.244.1.10")), ip("10.244.1.10"));
        assert_eq!(t.to_cluster(ip("10.244.1.10")), ip("10.244.1.10"));
        assert!(t.is_virtual(ip("240.0.0.10")) && !t.is_virtual(ip("10.96.0.10")));
        assert!(t.is_shadowed(ip("10.96.0.10")) && !t.is_shadowed(ip("10.244.1.10")));
        assert_eq!(t.virtual_of(&net("10.96.0.0/12")), Some(net("240.0.0.0/12")));
    }

    #[test]
    fn a_route_inside_or_around_a_range_counts_as_overlap_and_off_maps_nothing() {
        let cluster = [net("10.96.0.0/12")];
        for r in ["10.96.7.0/24", "10.0.0.0/8"] {
            let t = plan(&Table::default(), &cluster, &[net(r)], &Pool::default(), Mode::Auto).unwrap();
            assert_eq!(t.mappings().len(), 1, "{r}");
        }
        let t = plan(&Table::default(), &cluster, &[net("10.96.7.0/24")], &Pool::default(), Mode::Off).unwrap();
        assert!(t.is_empty());
        let t = plan(&Table::default(), &cluster, &[net("172.16.0.0/12")], &Pool::default(), Mode::Auto).unwrap();
        assert!(t.is_empty(), "no overlap, no mapping in auto");
        let t = plan(&Table::default(), &cluster, &[], &Pool::default(), Mode::Always).unwrap();
        assert_eq!(t.mappings().len(), 1);
    }

    #[test]
    fn ipv6_ranges_map_into_the_ipv6_pool() {
        let cluster = [net("fd00:10:96::/112"), net("10.96.0.0/12")];
        let t = plan(&Table::default(), &cluster, &[], &Pool::default(), Mode::Always).unwrap();
        assert_eq!(t.virtual_of(&net("fd00:10:96::/112")), Some(net("fd74:7076:8000::/112")));
        assert_eq!(t.to_cluster(ip("fd74:7076:8000::a")), ip("fd00:10:96::a"));
        assert_eq!(t.virtual_of(&net("10.96.0.0/12")), Some(net("240.0.0.0/12")));
    }

    #[test]
    fn blocks_skip_taken_space_stay_aligned_and_do_not_overlap_each_other() {
        // A route inside the default pool, and two ranges of different sizes.
        let cluster = [net("10.244.0.0/16"), net("10.96.0.0/12"), net("10.1.0.0/16")];
        let routes = [net("240.0.3.0/24")];
        let t = plan(&Table::default(), &cluster, &routes, &Pool::default(), Mode::Always).unwrap();
        // The /12 goes first, past the route's block; the /16s fill the space before it.
        assert_eq!(t.virtual_of(&net("10.96.0.0/12")), Some(net("240.16.0.0/12")));
        // (Ranges of one size in address order.)
        assert_eq!(t.virtual_of(&net("10.1.0.0/16")), Some(net("240.1.0.0/16")));
        assert_eq!(t.virtual_of(&net("10.244.0.0/16")), Some(net("240.2.0.0/16")));
        let v: Vec<IpNet> = t.mappings().iter().map(|m| m.virtual_net).collect();
        for (i, a) in v.iter().enumerate() {
            assert!(!overlaps(a, &routes[0]), "{a}");
            for b in &v[i + 1..] {
                assert!(!overlaps(a, b), "{a} {b}");
            }
        }
    }

    #[test]
    fn mappings_stay_put_across_plans_and_go_with_their_range() {
        let cluster = [net("10.96.0.0/12")];
        let first = plan(&Table::default(), &cluster, &[], &Pool::default(), Mode::Always).unwrap();
        // A route appears where the next plan would have started: the mapping stays.
        let again = plan(&first, &cluster, &[net("240.0.0.0/8")], &Pool::default(), Mode::Always);
        assert_eq!(again.unwrap(), first);
        // The overlap that caused it ends: still mapped until the next `up`.
        let later = plan(&first, &cluster, &[], &Pool::default(), Mode::Auto).unwrap();
        assert_eq!(later, first);
        // The manager stops routing the range: its mapping goes.
        let gone = plan(&first, &[net("10.244.0.0/16")], &[], &Pool::default(), Mode::Auto).unwrap();
        assert!(gone.is_empty());
    }

    #[test]
    fn a_given_pool_is_checked_and_each_problem_named() {
        let cluster = [net("10.96.0.0/12")];
        let routes = [net("10.96.0.0/12"), net("100.64.0.0/10")];
        let small = Pool::new(vec![net("100.127.0.0/16")]);
        let e = plan(&Table::default(), &cluster, &[net("10.96.0.0/12")], &small, Mode::Auto).unwrap_err();
        assert_eq!(e, Error::PoolTooSmall { pool: net("100.127.0.0/16"), cluster: net("10.96.0.0/12"), needed: 12 });
        assert!(e.to_string().contains("too small") && e.to_string().contains("/12"), "{e}");
        let on_route = Pool::new(vec![net("100.64.0.0/12")]);
        let e = plan(&Table::default(), &cluster, &routes, &on_route, Mode::Auto).unwrap_err();
        assert!(matches!(e, Error::PoolOverlapsRoute { .. }) && e.to_string().contains("100.64.0.0/10"), "{e}");
        let on_cluster = Pool::new(vec![net("10.0.0.0/8")]);
        let e = plan(&Table::default(), &cluster, &[], &on_cluster, Mode::Always).unwrap_err();
        assert!(matches!(e, Error::PoolOverlapsCluster { .. }), "{e}");
        // Exactly one block of the size: the second range finds it taken.
        let one = Pool::new(vec![net("172.16.0.0/16")]);
        let two = [net("10.1.0.0/16"), net("10.2.0.0/16")];
        let e = plan(&Table::default(), &two, &[], &one, Mode::Always).unwrap_err();
        assert!(matches!(e, Error::PoolExhausted { .. }) && e.to_string().contains("no free /16"), "{e}");
        // A given IPv4 pool leaves the IPv6 default in place.
        let t = plan(&Table::default(), &[net("fd00::/112")], &[], &one, Mode::Always).unwrap();
        assert_eq!(t.mappings().len(), 1);
    }

    #[test]
    fn nested_and_adjacent_cluster_ranges_are_one_range() {
        let cluster = [net("10.96.0.0/12"), net("10.96.0.0/16"), net("10.112.0.0/12")];
        let t = plan(&Table::default(), &cluster, &[net("10.100.0.0/16")], &Pool::default(), Mode::Auto).unwrap();
        assert_eq!(t.mappings(), &[Mapping { cluster: net("10.96.0.0/11"), virtual_net: net("240.0.0.0/11") }]);
        assert_eq!(t.to_virtual(ip("10.96.0.1")), ip("240.0.0.1"));
    }

    #[test]
    fn thousands_of_overlapping_ranges_are_refused_not_mapped() {
        let cluster: Vec<IpNet> = (0..1000u32).map(|i| IpNet::from(IpAddr::V4((0x0a00_0000 + i * 2).into()))).collect();
        let e = plan(&Table::default(), &cluster, &[net("10.0.0.0/16")], &Pool::default(), Mode::Auto).unwrap_err();
        assert_eq!(e, Error::TooMany { count: 1000 });
    }

    #[test]
    fn subnets_and_modes_parse_with_clear_errors() {
        assert_eq!(parse_subnet("240.0.0.0/4").unwrap(), net("240.0.0.0/4"));
        let e = parse_subnet("10.0.0.1/8").unwrap_err();
        assert_eq!(e.to_string(), "10.0.0.1/8 is not a network: its host bits are set (did you mean 10.0.0.0/8?)");
        assert!(parse_subnet("10.0.0.1").unwrap_err().to_string().contains("is not a network"));
        assert!(parse_subnet("banana").is_err());
        assert_eq!("always".parse::<Mode>().unwrap(), Mode::Always);
        assert!("sometimes".parse::<Mode>().unwrap_err().to_string().contains("auto, off or always"));
    }

    #[test]
    fn the_pool_end_and_the_address_space_end_are_respected() {
        // The whole IPv4 space is the pool and it is all taken but the last /24.
        let pool = Pool::new(vec![net("0.0.0.0/0")]);
        let t = plan(&Table::default(), &[net("10.0.0.0/24")], &[], &pool, Mode::Always);
        assert!(matches!(t, Err(Error::PoolOverlapsCluster { .. })));
        let taken = [net("0.0.0.0/1"), net("128.0.0.0/2"), net("192.0.0.0/3"), net("224.0.0.0/4")];
        let free = first_free(&net("0.0.0.0/0"), 4, &taken);
        assert_eq!(free, Some(net("240.0.0.0/4")));
        let full = [net("0.0.0.0/0")];
        assert_eq!(first_free(&net("0.0.0.0/0"), 24, &full), None);
        assert_eq!(first_free(&net("::/0"), 64, &[net("::/0")]), None);
    }
}
