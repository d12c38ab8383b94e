//! tpvpn's resolver: decides, for each DNS query of the laptop, whether the name is a
//! cluster name and answers it the way the cluster's DNS would.
//!
//! Layer and I/O contract: [`Resolver`] is sans-IO. It owns no socket and reads no
//! clock: the caller passes each query's wire bytes with its transport and the current
//! [`Instant`] to [`Resolver::query`] and performs the returned [`Action`]: send a
//! [`Action::Reply`] to the client, send [`Action::Cluster`]'s query to the cluster DNS
//! through the tunnel and hand its answer to [`Resolver::cluster_answer`] (or report the
//! failure with [`Resolver::cluster_failed`]), relay the client's packet unchanged to the
//! laptop's own servers for [`Action::Upstream`], or send nothing for [`Action::Drop`].
//! The namespace list and the Service table are pushed in by the caller
//! ([`Resolver::set_namespaces`], [`Resolver::set_services`]) whenever the manager sends them.
//!
//! Services with ClusterIPs are answered from the table (A, AAAA, SRV, PTR); every other
//! cluster name (headless Services, pods, other types) goes to the cluster DNS with its
//! FQDN, and the answer is rewritten back to the client's question and cached. Namespaces
//! whose name is an ICANN public suffix (`rs`, `dev`, …) never become routing domains, so
//! `docs.rs` keeps resolving on the Internet. Under a namespace, a name is the cluster's
//! only when the Service it names exists (`jira.corp` with no Service `jira` in namespace
//! `corp` goes upstream, as the search path in a pod would have it); the cluster domain's
//! own forms (`*.svc`, `*.svc.cluster.local`) keep the cluster's NXDOMAIN. Malformed
//! network input never panics.
//!
//! With feature `io` (the client and the manager), [`upstream`] exchanges DNS messages
//! with nameservers over UDP and TCP: the I/O that forwards what the resolver decides.

mod cache;
pub mod names;
mod psl;
mod replies;
#[cfg(feature = "io")]
pub mod upstream;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tpvpn_tunnel::{Protocol, ServiceInfo};

pub use psl::Psl;

use cache::{Cache, Entry, Key};
use replies::Replies;

/// EDNS UDP payload size this resolver advertises and asks the cluster DNS for.
pub const EDNS_PAYLOAD: u16 = 1232;
/// Most entries the answer cache holds; the oldest is evicted first.
pub const CACHE_CAPACITY: usize = 10_000;
/// Largest DNS message over TCP (two-byte length prefix).
const TCP_MAX: usize = 65_535;
/// Largest reply to a UDP client without EDNS (RFC 1035).
const UDP_MAX_NO_EDNS: usize = 512;

/// Errors of this crate (loading a Public Suffix List).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read public suffix list {path}: {source}")]
    PslRead { path: String, source: std::io::Error },
    #[error("invalid public suffix list: {source}")]
    PslParse { source: publicsuffix::Error },
}

/// Resolver settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The cluster domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// The connected namespace: single-label names of its Services resolve.
    pub namespace: String,
    /// Suffixes always routed to the cluster DNS (sent as asked, not rewritten).
    pub include_suffixes: Vec<String>,
    /// Suffixes never routed to the cluster; wins over every other rule.
    pub exclude_suffixes: Vec<String>,
    /// TTL of answers built from the Service table.
    pub local_ttl: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            namespace: "default".into(),
            include_suffixes: Vec::new(),
            exclude_suffixes: Vec::new(),
            local_ttl: 5,
        }
    }
}

/// How the client's query arrived: UDP replies are truncated to the client's payload
/// size (TC set, sections stripped, the client retries over TCP); TCP replies never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one client query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes back to the client (answered from the table, the cache, or an error reply).
    Reply(Vec<u8>),
    /// Send `query` (the FQDN question, a fresh id) to the cluster DNS through the tunnel;
    /// give its answer to [`Resolver::cluster_answer`], or call [`Resolver::cluster_failed`].
    Cluster { query: Vec<u8>, pending: Pending },
    /// Not a cluster name: forward the client's packet unchanged to the laptop's upstream
    /// servers and relay their answer unchanged.
    Upstream,
    /// Send nothing (unreadable header, or a response rather than a query).
    Drop,
}

/// A query waiting for the cluster DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    client: Client,
    cluster_id: u16,
    fqdn: Name,
}

impl Pending {
    /// The client's message id.
    pub fn client_id(&self) -> u16 {
        self.client.id
    }

    /// The id of the query sent to the cluster DNS.
    pub fn cluster_id(&self) -> u16 {
        self.cluster_id
    }

    /// The question exactly as the client asked it.
    pub fn question(&self) -> &Query {
        // Invariant: a `Pending` is only made for a query with exactly one question.
        &self.client.queries[0]
    }

    /// The FQDN asked of the cluster DNS (lowercase).
    pub fn fqdn(&self) -> &Name {
        &self.fqdn
    }

    /// The client's transport. When the cluster's answer is truncated and the client came
    /// over TCP, the caller may repeat the cluster query over TCP before answering.
    pub fn transport(&self) -> Transport {
        self.client.transport
    }

    /// The client's EDNS UDP payload size, `None` if its query had no EDNS.
    pub fn client_payload(&self) -> Option<u16> {
        self.client.edns.map(|e| e.payload)
    }
}

/// What a reply needs to know about the query it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Client {
    id: u16,
    op_code: OpCode,
    recursion_desired: bool,
    checking_disabled: bool,
    edns: Option<ClientEdns>,
    transport: Transport,
    /// Echoed in the reply; exactly one for anything but an error reply.
    queries: Vec<Query>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientEdns {
    payload: u16,
    dnssec_ok: bool,
}

impl Client {
    fn size_limit(&self) -> usize {
        match self.transport {
            Transport::Tcp => TCP_MAX,
            Transport::Udp => self.edns.map_or(UDP_MAX_NO_EDNS, |e| usize::from(e.payload).max(UDP_MAX_NO_EDNS)),
        }
    }
}

/// A reply's content, before the header and EDNS of the client are added.
#[derive(Debug, Default)]
struct Answer {
    response_code: ResponseCode,
    authoritative: bool,
    truncated: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Answer {
    fn error(response_code: ResponseCode) -> Self {
        Self { response_code, ..Self::default() }
    }
}

type Labels = Vec<Vec<u8>>;

/// A Service of the table, keyed by lowercase namespace and name.
#[derive(Debug, Clone)]
struct Service {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
    ports: Vec<tpvpn_tunnel::ServicePort>,
}

/// Where a question goes.
enum Route {
    Upstream,
    /// Known ClusterIP: answer the PTR with this Service FQDN.
    Ptr(Labels),
    /// Cluster name, normalised to this FQDN.
    Cluster(Labels),
}

/// The DNS decision engine. See the crate documentation.
pub struct Resolver {
    config: Config,
    domain: Labels,
    namespace: Vec<u8>,
    psl: Psl,
    namespaces: HashSet<Labels>,
    filtered: Vec<String>,
    include: HashSet<Labels>,
    exclude: HashSet<Labels>,
    services: HashMap<(Vec<u8>, Vec<u8>), Service>,
    by_ip: HashMap<IpAddr, (Vec<u8>, Vec<u8>)>,
    cache: Cache,
    /// Table replies by query bytes; emptied whenever what they were built from changes.
    replies: Replies,
    rng: u64,
    /// Whether the tunnel to the cluster is up; while it is not, cluster names fail fast.
    connected: bool,
    /// Virtual addresses of cluster ranges the laptop routes elsewhere.
    vnat: tpvpn_vnat::Table,
}

impl Resolver {
    pub fn new(config: Config, psl: Psl) -> Self {
        let domain = split_labels(&config.cluster_domain);
        let namespace = split_labels(&config.namespace).concat();
        let include = config.include_suffixes.iter().map(|s| split_labels(s)).filter(|l| !l.is_empty()).collect();
        let exclude = config.exclude_suffixes.iter().map(|s| split_labels(s)).filter(|l| !l.is_empty()).collect();
        let seed = RandomState::new().build_hasher().finish();
        Self {
            config,
            domain,
            namespace,
            psl,
            namespaces: HashSet::new(),
            filtered: Vec::new(),
            include,
            exclude,
            services: HashMap::new(),
            by_ip: HashMap::new(),
            cache: Cache::new(CACHE_CAPACITY),
            replies: Replies::default(),
            // xorshift needs a non-zero state.
            rng: seed | 1,
            connected: true,
            vnat: tpvpn_vnat::Table::default(),
        }
    }

    /// From now on, cluster addresses in a range of `table` are answered with their
    /// virtual addresses (A and AAAA records of the table, of the cluster DNS and in SRV
    /// answers' additionals), a PTR query for a virtual address is answered for the
    /// cluster address it stands for, and one for a cluster address in a mapped range goes
    /// upstream (on this laptop that address is the other network's). The cache keeps the
    /// cluster's own addresses, so a new table applies to cached answers too.
    pub fn set_vnat(&mut self, table: tpvpn_vnat::Table) {
        self.replies.clear();
        self.vnat = table;
    }

    /// `answer` with every A and AAAA address in a mapped cluster range made virtual.
    fn translated(&self, mut answer: Answer) -> Answer {
        if self.vnat.is_empty() {
            return answer;
        }
        for r in answer.answers.iter_mut().chain(answer.additionals.iter_mut()) {
            let virtual_ip = match &r.data {
                RData::A(A(ip)) => self.vnat.to_virtual(IpAddr::V4(*ip)),
                RData::AAAA(AAAA(ip)) => self.vnat.to_virtual(IpAddr::V6(*ip)),
                _ => continue,
            };
            r.data = match virtual_ip {
                IpAddr::V4(ip) => RData::A(A(ip)),
                IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
            };
        }
        answer
    }

    /// Tells the resolver whether the tunnel is up. While it is down every name routed to
    /// the cluster (table, cache and PTR answers included) gets SERVFAIL at once, since
    /// nothing in the cluster is reachable; names that go upstream are unaffected. Going
    /// down empties the cache: after a reconnect the cluster is asked afresh.
    pub fn set_connected(&mut self, connected: bool) {
        if !connected {
            self.cache = Cache::new(CACHE_CAPACITY);
        }
        self.replies.clear();
        self.connected = connected;
    }

    /// The cluster's namespaces, as pushed by the manager; replaces the previous list.
    /// Names that are ICANN public suffixes are kept out of routing ([`Self::filtered_namespaces`]).
    pub fn set_namespaces(&mut self, names: Vec<String>) {
        self.replies.clear();
        self.namespaces.clear();
        let mut filtered = Vec::new();
        for name in names {
            let labels = split_labels(&name);
            if labels.is_empty() {
                continue;
            }
            let text = join_labels(&labels);
            if self.psl.is_icann_suffix(&text) {
                filtered.push(text);
            } else {
                self.namespaces.insert(labels);
            }
        }
        filtered.sort();
        filtered.dedup();
        self.filtered = filtered;
    }

    /// The cluster's Services, as pushed by the manager; replaces the previous table.
    pub fn set_services(&mut self, services: Vec<ServiceInfo>) {
        self.replies.clear();
        self.services.clear();
        self.by_ip.clear();
        for s in services {
            let key = (s.namespace.to_ascii_lowercase().into_bytes(), s.name.to_ascii_lowercase().into_bytes());
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            for ip in &s.cluster_ips {
                match ip {
                    IpAddr::V4(a) => v4.push(*a),
                    IpAddr::V6(a) => v6.push(*a),
                }
                self.by_ip.entry(*ip).or_insert_with(|| key.clone());
            }
            self.services.insert(key, Service { v4, v6, ports: s.ports });
        }
    }

    /// The suffixes the system resolver should send here: the cluster domain, the
    /// namespaces that are not public suffixes and the include suffixes, minus anything
    /// under an exclude suffix; sorted, without duplicates.
    pub fn routing_domains(&self) -> Vec<String> {
        let mut out: Vec<String> = std::iter::once(&self.domain)
            .chain(self.namespaces.iter())
            .chain(self.include.iter())
            .filter(|l| !l.is_empty() && !self.excluded(l))
            .map(|l| join_labels(l))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Namespaces left out of routing because they are ICANN public suffixes, sorted.
    pub fn filtered_namespaces(&self) -> Vec<String> {
        self.filtered.clone()
    }

    /// Decides what to do with one DNS query (the client's wire bytes).
    pub fn query(&mut self, packet: &[u8], transport: Transport, now: Instant) -> Action {
        if let Some(reply) = self.replies.get(packet, transport) {
            return Action::Reply(reply);
        }
        let Some(header) = packet.get(..4) else { return Action::Drop };
        let id = u16::from_be_bytes([header[0], header[1]]);
        if header[2] & 0x80 != 0 {
            return Action::Drop;
        }
        let op_code = OpCode::from_u8((header[2] >> 3) & 0x0f);
        let mut client = Client {
            id,
            op_code,
            recursion_desired: header[2] & 0x01 != 0,
            checking_disabled: header[3] & 0x10 != 0,
            edns: None,
            transport,
            queries: Vec::new(),
        };
        let msg = Message::from_vec(packet);
        if let Ok(msg) = &msg {
            client.queries.clone_from(&msg.queries);
            client.edns =
                msg.edns.as_ref().map(|e| ClientEdns { payload: e.max_payload(), dnssec_ok: e.flags().dnssec_ok });
        }
        if op_code != OpCode::Query {
            return Action::Reply(reply(&client, Answer::error(ResponseCode::NotImp)));
        }
        let msg = match msg {
            Ok(msg) => msg,
            Err(_) => return Action::Reply(reply(&client, Answer::error(ResponseCode::FormErr))),
        };
        if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Action::Reply(reply(&client, Answer::error(ResponseCode::BADVERS)));
        }
        if msg.queries.len() != 1 {
            return Action::Reply(reply(&client, Answer::error(ResponseCode::FormErr)));
        }
        let q = &msg.queries[0];
        let labels = lower_labels(&q.name);
        match self.route(&labels, q.query_type, q.query_class) {
            Route::Upstream => Action::Upstream,
            Route::Ptr(_) | Route::Cluster(_) if !self.connected => {
                Action::Reply(reply(&client, Answer::error(ResponseCode::ServFail)))
            }
            Route::Ptr(target) => {
                let answer = match to_name(&target) {
                    Some(target) => Answer {
                        authoritative: true,
                        answers: vec![Record::from_rdata(
                            q.name.clone(),
                            self.config.local_ttl,
                            RData::PTR(PTR(target)),
                        )],
                        ..Answer::default()
                    },
                    None => Answer::error(ResponseCode::ServFail),
                };
                Action::Reply(self.table_reply(packet, &client, answer))
            }
            Route::Cluster(fqdn) => {
                let Some(fqdn_name) = to_name(&fqdn) else {
                    // Longer than a DNS name may be: it cannot exist in the cluster.
                    let answer = Answer { response_code: ResponseCode::NXDomain, ..self.nodata() };
                    return Action::Reply(reply(&client, answer));
                };
                if let Some(answer) = self.local(&fqdn, q) {
                    let answer = self.translated(answer);
                    return Action::Reply(self.table_reply(packet, &client, answer));
                }
                let key = Key { name: fqdn_name.to_ascii(), rtype: q.query_type, class: q.query_class };
                if let Some(entry) = self.cache.get(&key, now) {
                    let answer = self.translated(client_answer(entry, &fqdn_name, &q.name, false));
                    return Action::Reply(reply(&client, answer));
                }
                let cluster_id = self.next_id();
                let mut out = Message::new(cluster_id, MessageType::Query, OpCode::Query);
                out.metadata.recursion_desired = true;
                let mut fq = q.clone();
                fq.name = fqdn_name.clone();
                out.add_query(fq);
                let mut edns = Edns::new();
                edns.set_max_payload(EDNS_PAYLOAD);
                out.set_edns(edns);
                match out.to_vec() {
                    Ok(query) => Action::Cluster { query, pending: Pending { client, cluster_id, fqdn: fqdn_name } },
                    Err(_) => Action::Reply(reply(&client, Answer::error(ResponseCode::ServFail))),
                }
            }
        }
    }

    /// The reply to the client for the cluster DNS's `answer` to `pending`'s query. An
    /// answer that does not parse or does not match the query becomes SERVFAIL.
    pub fn cluster_answer(&mut self, pending: &Pending, answer: &[u8], now: Instant) -> Vec<u8> {
        let client = &pending.client;
        let question = pending.question();
        let msg = match Message::from_vec(answer) {
            Ok(m) => m,
            Err(_) => return self.cluster_failed(pending),
        };
        let matches = msg.metadata.id == pending.cluster_id
            && msg.metadata.message_type == MessageType::Response
            && msg.queries.len() <= 1
            && msg.queries.iter().all(|a| {
                a.name == pending.fqdn && a.query_type == question.query_type && a.query_class == question.query_class
            });
        if !matches {
            return self.cluster_failed(pending);
        }
        let truncated = msg.metadata.truncation;
        let entry = Entry {
            response_code: msg.metadata.response_code,
            authoritative: msg.metadata.authoritative,
            answers: msg.answers,
            authorities: msg.authorities,
            additionals: msg.additionals,
        };
        if !truncated {
            let key = Key { name: pending.fqdn.to_ascii(), rtype: question.query_type, class: question.query_class };
            self.cache.insert(key, entry.clone(), now);
        }
        reply(client, self.translated(client_answer(entry, &pending.fqdn, &question.name, truncated)))
    }

    /// SERVFAIL for the query `packet`, which the caller will not carry out (too many
    /// queries in flight already); `None` for what is no query.
    pub fn servfail(packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let msg = Message::from_vec(packet).ok()?;
        if msg.metadata.message_type != MessageType::Query {
            return None;
        }
        let client = Client {
            id: msg.metadata.id,
            op_code: msg.metadata.op_code,
            recursion_desired: msg.metadata.recursion_desired,
            checking_disabled: msg.metadata.checking_disabled,
            edns: msg.edns.as_ref().map(|e| ClientEdns { payload: e.max_payload(), dnssec_ok: e.flags().dnssec_ok }),
            transport,
            queries: msg.queries,
        };
        Some(reply(&client, Answer::error(ResponseCode::ServFail)))
    }

    /// The SERVFAIL reply for a query the cluster DNS did not answer (tunnel down, timeout).
    pub fn cluster_failed(&self, pending: &Pending) -> Vec<u8> {
        reply(&pending.client, Answer::error(ResponseCode::ServFail))
    }

    /// The reply to `packet` from the Service table, remembered for the same query bytes.
    fn table_reply(&mut self, packet: &[u8], client: &Client, answer: Answer) -> Vec<u8> {
        let bytes = reply(client, answer);
        self.replies.insert(packet, client.transport, &bytes);
        bytes
    }

    fn next_id(&mut self) -> u16 {
        // xorshift64*: plenty for message ids, which only need to be hard to guess from outside.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 48) as u16
    }

    fn under(set: &HashSet<Labels>, labels: &[Vec<u8>], proper: bool) -> bool {
        let start = usize::from(proper);
        (start..labels.len()).any(|i| set.contains(&labels[i..]))
    }

    fn excluded(&self, labels: &[Vec<u8>]) -> bool {
        Self::under(&self.exclude, labels, false)
    }

    fn route(&self, labels: &[Vec<u8>], qtype: RecordType, class: DNSClass) -> Route {
        if labels.is_empty() || self.excluded(labels) {
            return Route::Upstream;
        }
        if qtype == RecordType::PTR && class == DNSClass::IN {
            if let Some(ip) = reverse_ip(labels) {
                if self.vnat.is_shadowed(ip) {
                    return Route::Upstream;
                }
                let cluster_ip = self.vnat.to_cluster(ip);
                if let Some(target) = self.by_ip.get(&cluster_ip).and_then(|key| self.service_fqdn(&key.1, &key.0)) {
                    return Route::Ptr(target);
                }
                if cluster_ip != ip {
                    // A virtual address of no Service: the cluster DNS knows its real one.
                    return Route::Cluster(reverse_labels(cluster_ip));
                }
            }
        }
        let d = self.domain.len();
        if labels.len() >= d && labels[labels.len() - d..] == self.domain[..] {
            return Route::Cluster(labels.to_vec());
        }
        let last = labels[labels.len() - 1].as_slice();
        if labels.len() >= 3 && (last == b"svc" || last == b"pod") {
            return Route::Cluster(self.with_domain(labels.to_vec()));
        }
        if let Some(i) = (1..labels.len()).find(|&i| self.namespaces.contains(&labels[i..])) {
            // As in a pod, where `NAME.NS` goes through the search path: the cluster's
            // only when Service NAME exists in NS (`NS.svc.<domain>` answers it, and so
            // its SRV names and the pods of a headless NAME); otherwise the name as
            // written, upstream. A namespace `corp` must not take `jira.corp` away.
            if !self.services.contains_key(&(labels[i..].join(&b'.'), labels[i - 1].clone())) {
                return Route::Upstream;
            }
            let mut fqdn = labels.to_vec();
            fqdn.push(b"svc".to_vec());
            return Route::Cluster(self.with_domain(fqdn));
        }
        if Self::under(&self.include, labels, false) {
            return Route::Cluster(labels.to_vec());
        }
        if labels.len() == 1 && self.services.contains_key(&(self.namespace.clone(), labels[0].clone())) {
            if let Some(fqdn) = self.service_fqdn(&labels[0], &self.namespace) {
                return Route::Cluster(fqdn);
            }
        }
        Route::Upstream
    }

    fn with_domain(&self, mut labels: Labels) -> Labels {
        labels.extend(self.domain.iter().cloned());
        labels
    }

    fn service_fqdn(&self, name: &[u8], namespace: &[u8]) -> Option<Labels> {
        if namespace.is_empty() {
            return None;
        }
        Some(self.with_domain(vec![name.to_vec(), namespace.to_vec(), b"svc".to_vec()]))
    }

    /// An answer from the Service table, or `None` to ask the cluster DNS: only Services
    /// with ClusterIPs are answered here (A, AAAA, and SRV of a named port).
    fn local(&self, fqdn: &[Vec<u8>], q: &Query) -> Option<Answer> {
        let d = self.domain.len();
        if q.query_class != DNSClass::IN || d == 0 || fqdn.len() < d || fqdn[fqdn.len() - d..] != self.domain[..] {
            return None;
        }
        let ttl = self.config.local_ttl;
        match &fqdn[..fqdn.len() - d] {
            [name, ns, svc] if svc == b"svc" => {
                let s = self.services.get(&(ns.clone(), name.clone()))?;
                if s.v4.is_empty() && s.v6.is_empty() {
                    return None;
                }
                let answers: Vec<Record> = match q.query_type {
                    RecordType::A => {
                        s.v4.iter().map(|ip| Record::from_rdata(q.name.clone(), ttl, RData::A(A(*ip)))).collect()
                    }
                    RecordType::AAAA => {
                        s.v6.iter().map(|ip| Record::from_rdata(q.name.clone(), ttl, RData::AAAA(AAAA(*ip)))).collect()
                    }
                    _ => return None,
                };
                if answers.is_empty() {
                    return Some(self.nodata());
                }
                Some(Answer { authoritative: true, answers, ..Answer::default() })
            }
            [port, proto, name, ns, svc] if svc == b"svc" && q.query_type == RecordType::SRV => {
                let port = port.strip_prefix(b"_")?;
                let protocol = match proto.as_slice() {
                    b"_tcp" => Protocol::Tcp,
                    b"_udp" => Protocol::Udp,
                    b"_sctp" => Protocol::Other(132),
                    _ => return None,
                };
                let s = self.services.get(&(ns.clone(), name.clone()))?;
                if s.v4.is_empty() && s.v6.is_empty() {
                    return None;
                }
                let target = to_name(&fqdn[2..])?;
                let answers: Vec<Record> = s
                    .ports
                    .iter()
                    .filter(|p| p.protocol == protocol && p.name.as_bytes().eq_ignore_ascii_case(port))
                    .map(|p| {
                        Record::from_rdata(q.name.clone(), ttl, RData::SRV(SRV::new(0, 100, p.port, target.clone())))
                    })
                    .collect();
                if answers.is_empty() {
                    return None;
                }
                let additionals =
                    s.v4.iter()
                        .map(|ip| Record::from_rdata(target.clone(), ttl, RData::A(A(*ip))))
                        .chain(s.v6.iter().map(|ip| Record::from_rdata(target.clone(), ttl, RData::AAAA(AAAA(*ip)))))
                        .collect();
                Some(Answer { authoritative: true, answers, additionals, ..Answer::default() })
            }
            _ => None,
        }
    }

    /// An authoritative NOERROR without answers, with the cluster domain's SOA.
    fn nodata(&self) -> Answer {
        let ttl = self.config.local_ttl;
        let soa = (|| {
            let zone = to_name(&self.domain)?;
            let mname = Name::from_ascii("ns.dns").ok()?.append_domain(&zone).ok()?;
            let rname = Name::from_ascii("hostmaster").ok()?.append_domain(&zone).ok()?;
            let soa = SOA::new(mname, rname, 1, 7200, 1800, 86400, ttl);
            Some(Record::from_rdata(zone, ttl, RData::SOA(soa)))
        })();
        Answer { authoritative: true, authorities: soa.into_iter().collect(), ..Answer::default() }
    }
}

/// Turns a cached or fresh cluster answer into the client's: records owned by the FQDN
/// (the head of a CNAME chain) are renamed to the name the client asked.
fn client_answer(entry: Entry, fqdn: &Name, asked: &Name, truncated: bool) -> Answer {
    let mut answer = Answer {
        response_code: entry.response_code,
        authoritative: entry.authoritative,
        truncated,
        answers: entry.answers,
        authorities: entry.authorities,
        additionals: entry.additionals,
    };
    for r in answer.answers.iter_mut().chain(answer.authorities.iter_mut()).chain(answer.additionals.iter_mut()) {
        if r.name == *fqdn {
            r.name = asked.clone();
        }
    }
    answer
}

/// Encodes the reply to `client`: its id, opcode, RD, CD and questions, EDNS if it sent
/// EDNS. A reply larger than the client accepts goes out with TC set and no sections.
fn reply(client: &Client, answer: Answer) -> Vec<u8> {
    let limit = client.size_limit();
    match build(client, &answer, false) {
        Ok(bytes) if bytes.len() <= limit => return bytes,
        Ok(_) => {}
        Err(_) => {
            if let Ok(bytes) = build(client, &Answer::error(ResponseCode::ServFail), false) {
                if bytes.len() <= limit {
                    return bytes;
                }
            }
        }
    }
    match build(client, &answer, true) {
        Ok(bytes) if bytes.len() <= limit => bytes,
        _ => header_only(client, answer.response_code),
    }
}

fn build(client: &Client, answer: &Answer, strip: bool) -> Result<Vec<u8>, hickory_proto::ProtoError> {
    let mut m = Message::response(client.id, client.op_code);
    m.metadata.recursion_desired = client.recursion_desired;
    m.metadata.checking_disabled = client.checking_disabled;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = answer.authoritative;
    m.metadata.truncation = answer.truncated || strip;
    m.metadata.response_code = answer.response_code;
    m.add_queries(client.queries.iter().cloned());
    if !strip {
        m.add_answers(answer.answers.iter().cloned());
        m.add_authorities(answer.authorities.iter().cloned());
        m.add_additionals(answer.additionals.iter().cloned());
    }
    if let Some(e) = client.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns.set_dnssec_ok(e.dnssec_ok);
        m.set_edns(edns);
    }
    m.to_vec()
}

/// The last resort: a bare header (no question), TC set.
fn header_only(client: &Client, response_code: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&client.id.to_be_bytes());
    out[2] = 0x80 | (u8::from(client.op_code) & 0x0f) << 3 | 0x02 | u8::from(client.recursion_desired);
    out[3] = 0x80 | (response_code.low() & 0x0f);
    out
}

/// Lowercase labels of a config string; `.` and empty strings give no labels.
fn split_labels(s: &str) -> Labels {
    s.trim().to_ascii_lowercase().split('.').filter(|l| !l.is_empty()).map(|l| l.as_bytes().to_vec()).collect()
}

fn join_labels(labels: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&labels.join(&b'.')).into_owned()
}

fn lower_labels(name: &Name) -> Labels {
    name.iter().map(|l| l.to_ascii_lowercase()).collect()
}

/// The FQDN of these labels, `None` if they do not make a valid DNS name (too long).
fn to_name(labels: &[Vec<u8>]) -> Option<Name> {
    let mut name = Name::from_labels(labels.iter().map(|l| l.as_slice())).ok()?;
    name.set_fqdn(true);
    // `from_labels` checks each label; the 255-byte wire limit is checked here.
    (name.len() <= 255).then_some(name)
}

/// The reverse name of `ip` (`4.3.2.1.in-addr.arpa`, 32 nibbles + `ip6.arpa`).
fn reverse_labels(ip: IpAddr) -> Labels {
    let mut labels: Labels = match ip {
        IpAddr::V4(a) => a.octets().iter().rev().map(|o| o.to_string().into_bytes()).collect(),
        IpAddr::V6(a) => {
            a.octets().iter().rev().flat_map(|o| [o & 0x0f, o >> 4]).map(|n| format!("{n:x}").into_bytes()).collect()
        }
    };
    let tail: &[&[u8]] = if ip.is_ipv4() { &[b"in-addr", b"arpa"] } else { &[b"ip6", b"arpa"] };
    labels.extend(tail.iter().map(|l| l.to_vec()));
    labels
}

/// The address of a reverse name (`4.3.2.1.in-addr.arpa`, 32 nibbles + `ip6.arpa`).
fn reverse_ip(labels: &[Vec<u8>]) -> Option<IpAddr> {
    match labels {
        [d, c, b, a, inaddr, arpa] if inaddr == b"in-addr" && arpa == b"arpa" => {
            let octet = |l: &Vec<u8>| -> Option<u8> {
                if l.is_empty() || l.len() > 3 || !l.iter().all(u8::is_ascii_digit) || (l.len() > 1 && l[0] == b'0') {
                    return None;
                }
                std::str::from_utf8(l).ok()?.parse().ok()
            };
            Some(IpAddr::V4(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?)))
        }
        [nibbles @ .., ip6, arpa] if nibbles.len() == 32 && ip6 == b"ip6" && arpa == b"arpa" => {
            let mut v: u128 = 0;
            for l in nibbles.iter().rev() {
                let [c] = l.as_slice() else { return None };
                v = v << 4 | u128::from((*c as char).to_digit(16)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(v)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
