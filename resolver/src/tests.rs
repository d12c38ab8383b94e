//! Tests of the decision engine with realistic packets built with hickory-proto.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tpvpn_tunnel::{Protocol, ServiceInfo, ServicePort};

use super::*;

const ID: u16 = 0x1234;

fn psl() -> Psl {
    static PSL: OnceLock<Psl> = OnceLock::new();
    PSL.get_or_init(Psl::embedded).clone()
}

fn svc(ns: &str, name: &str, ips: &[&str]) -> ServiceInfo {
    ServiceInfo {
        namespace: ns.into(),
        name: name.into(),
        cluster_ips: ips.iter().map(|ip| IpAddr::from_str(ip).unwrap()).collect(),
        ports: vec![
            ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80 },
            ServicePort { name: "dns".into(), protocol: Protocol::Udp, port: 53 },
        ],
    }
}

fn resolver_with(config: Config) -> Resolver {
    let mut r = Resolver::new(config, psl());
    r.set_namespaces(["default", "kube-system", "rs", "dev", "co.uk"].map(String::from).to_vec());
    let many: Vec<String> = (0..100).map(|i| format!("10.97.0.{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    r.set_services(vec![
        svc("default", "frontend", &["10.96.0.10", "fd00::10"]),
        svc("default", "v4only", &["10.96.0.11"]),
        svc("default", "v6only", &["fd00::20"]),
        svc("default", "headless", &[]),
        // An ExternalName Service: no ClusterIP, a CNAME from the cluster DNS.
        svc("default", "ext", &[]),
        svc("default", "many", &many),
        svc("rs", "svc", &["10.96.1.1"]),
    ]);
    r
}

fn resolver() -> Resolver {
    resolver_with(Config::default())
}

fn query_msg(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::new(ID, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m
}

fn q(name: &str, rtype: RecordType) -> Vec<u8> {
    query_msg(name, rtype).to_vec().unwrap()
}

fn q_edns(name: &str, rtype: RecordType, payload: u16) -> Vec<u8> {
    let mut m = query_msg(name, rtype);
    let mut e = Edns::new();
    e.set_max_payload(payload);
    m.set_edns(e);
    m.to_vec().unwrap()
}

fn now() -> Instant {
    Instant::now()
}

fn ask(r: &mut Resolver, packet: &[u8], t: Instant) -> Action {
    r.query(packet, Transport::Udp, t)
}

fn reply_msg(action: Action) -> Message {
    match action {
        Action::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn cluster(action: Action) -> (Message, Pending) {
    match action {
        Action::Cluster { query, pending } => (Message::from_vec(&query).unwrap(), pending),
        other => panic!("expected Cluster, got {other:?}"),
    }
}

fn a_ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// A name as it reads on the wire (always fully qualified).
fn n(s: &str) -> Name {
    let mut name = Name::from_ascii(s).unwrap();
    name.set_fqdn(true);
    name
}

#[test]
fn local_a_for_every_form() {
    let mut r = resolver();
    for name in [
        "frontend.default",
        "frontend.default.",
        "frontend.default.svc",
        "frontend.default.svc.cluster.local",
        "frontend.default.svc.cluster.local.",
        "frontend",
        "FrontEnd.DEFAULT.",
        "frontend.Default.SVC.Cluster.Local.",
    ] {
        let m = reply_msg(ask(&mut r, &q(name, RecordType::A), now()));
        assert_eq!(m.metadata.id, ID, "{name}");
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.metadata.authoritative && m.metadata.recursion_desired && !m.metadata.truncation);
        assert_eq!(m.queries.len(), 1);
        // The question is echoed exactly, case included.
        assert!(m.queries[0].name.eq_case(&n(name)), "{name}");
        assert_eq!(a_ips(&m), vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))], "{name}");
        assert!(m.answers[0].name.eq_case(&n(name)), "owner is the name as asked: {name}");
        assert_eq!(m.answers[0].ttl, 5);
        assert!(m.edns.is_none(), "no EDNS in, none out");
    }
}

#[test]
fn local_aaaa_and_nodata() {
    let mut r = resolver();
    let m = reply_msg(ask(&mut r, &q("frontend.default", RecordType::AAAA), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::V6(Ipv6Addr::from_str("fd00::10").unwrap())]);

    for (name, rtype) in [("v6only.default", RecordType::A), ("v4only.default.svc", RecordType::AAAA)] {
        let m = reply_msg(ask(&mut r, &q(name, rtype), now()));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty(), "{name}");
        assert_eq!(m.authorities.len(), 1);
        let RData::SOA(soa) = &m.authorities[0].data else { panic!("SOA expected") };
        assert_eq!(m.authorities[0].name, n("cluster.local."));
        assert_eq!(soa.minimum, 5);
    }
    let m = reply_msg(ask(&mut r, &q("v6only.default", RecordType::AAAA), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::V6(Ipv6Addr::from_str("fd00::20").unwrap())]);
}

#[test]
fn local_srv() {
    let mut r = resolver();
    for name in ["_http._tcp.frontend.default", "_HTTP._tcp.frontend.default.svc.cluster.local."] {
        let m = reply_msg(ask(&mut r, &q(name, RecordType::SRV), now()));
        assert_eq!(m.answers.len(), 1, "{name}");
        assert!(m.answers[0].name.eq_case(&n(name)));
        let RData::SRV(srv) = &m.answers[0].data else { panic!("SRV expected") };
        assert_eq!((srv.priority, srv.weight, srv.port), (0, 100, 80));
        assert_eq!(srv.target, n("frontend.default.svc.cluster.local."));
        let extra: Vec<IpAddr> = m
            .additionals
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => panic!("unexpected additional"),
            })
            .collect();
        assert_eq!(extra, vec![IpAddr::from_str("10.96.0.10").unwrap(), IpAddr::from_str("fd00::10").unwrap()]);
        assert!(m.additionals.iter().all(|r| r.name == srv.target));
    }
    let m = reply_msg(ask(&mut r, &q("_dns._udp.frontend.default.svc", RecordType::SRV), now()));
    let RData::SRV(srv) = &m.answers[0].data else { panic!("SRV expected") };
    assert_eq!(srv.port, 53);
    // A port the table does not know, or the wrong protocol: the cluster decides.
    cluster(ask(&mut r, &q("_dns._tcp.frontend.default", RecordType::SRV), now()));
    cluster(ask(&mut r, &q("_grpc._tcp.frontend.default", RecordType::SRV), now()));
}

#[test]
fn local_ptr() {
    let mut r = resolver();
    let m = reply_msg(ask(&mut r, &q("10.0.96.10.in-addr.arpa.", RecordType::PTR), now()));
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].name, n("10.0.96.10.in-addr.arpa."));
    assert_eq!(m.answers[0].data, RData::PTR(PTR(n("frontend.default.svc.cluster.local."))));
    let v6 = "0.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
    let m = reply_msg(ask(&mut r, &q(v6, RecordType::PTR), now()));
    assert_eq!(m.answers[0].data, RData::PTR(PTR(n("v6only.default.svc.cluster.local."))));
    let m = reply_msg(ask(&mut r, &q("1.1.96.10.IN-ADDR.ARPA", RecordType::PTR), now()));
    assert_eq!(m.answers[0].data, RData::PTR(PTR(n("svc.rs.svc.cluster.local."))));
    // Not in the table: upstream.
    assert_eq!(ask(&mut r, &q("99.0.96.10.in-addr.arpa.", RecordType::PTR), now()), Action::Upstream);
    assert_eq!(ask(&mut r, &q("010.0.96.10.in-addr.arpa.", RecordType::PTR), now()), Action::Upstream);
    assert_eq!(ask(&mut r, &q("1.1.1.1.in-addr.arpa.", RecordType::PTR), now()), Action::Upstream);
}

#[test]
fn public_suffix_namespaces_never_route() {
    let mut r = resolver();
    assert_eq!(r.filtered_namespaces(), vec!["co.uk", "dev", "rs"]);
    assert_eq!(r.routing_domains(), vec!["cluster.local", "default", "kube-system"]);
    for name in ["docs.rs", "crates.io", "web.dev", "bbc.co.uk", "svc.rs", "printer", "example.com"] {
        assert_eq!(ask(&mut r, &q(name, RecordType::A), now()), Action::Upstream, "{name}");
    }
    let m = reply_msg(ask(&mut r, &q("svc.rs.svc.cluster.local", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("10.96.1.1").unwrap()]);
    let m = reply_msg(ask(&mut r, &q("svc.rs.svc", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("10.96.1.1").unwrap()]);
}

#[test]
fn name_dot_namespace_is_the_clusters_only_when_that_service_exists() {
    let mut r = resolver();
    r.set_namespaces(vec!["default".into(), "corp".into()]);
    r.set_services(vec![svc("default", "frontend", &["10.96.0.10"]), svc("corp", "web", &[])]);
    // As in a pod: `jira.corp` is not a Service of namespace corp, so it is the internet's.
    for name in ["jira.corp", "JIRA.corp.", "wiki.jira.corp", "nope.default", "_http._tcp.nope.default"] {
        assert_eq!(ask(&mut r, &q(name, RecordType::A), now()), Action::Upstream, "{name}");
    }
    let m = reply_msg(ask(&mut r, &q("frontend.default", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("10.96.0.10").unwrap()]);
    // A headless Service's name, its pods' names and SRV names under it: the cluster's.
    for (name, fqdn) in [
        ("web.corp", "web.corp.svc.cluster.local."),
        ("pod-0.web.corp", "pod-0.web.corp.svc.cluster.local."),
        ("_http._tcp.web.corp", "_http._tcp.web.corp.svc.cluster.local."),
    ] {
        let (m, _) = cluster(ask(&mut r, &q(name, RecordType::A), now()));
        assert_eq!(m.queries[0].name, n(fqdn));
    }
    // The cluster's own forms keep NXDOMAIN for missing names (asked of the cluster DNS).
    for name in ["jira.corp.svc", "jira.corp.svc.cluster.local"] {
        cluster(ask(&mut r, &q(name, RecordType::A), now()));
    }
    // A Service created later makes its name the cluster's.
    r.set_services(vec![svc("corp", "jira", &["10.96.5.5"])]);
    let m = reply_msg(ask(&mut r, &q("jira.corp", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("10.96.5.5").unwrap()]);
}

#[test]
fn namespaces_change_at_runtime() {
    let mut r = resolver();
    assert_eq!(ask(&mut r, &q("api.staging", RecordType::A), now()), Action::Upstream);
    r.set_namespaces(vec!["default".into(), "Staging.".into(), "io".into()]);
    r.set_services(vec![svc("staging", "api", &[])]);
    let (m, _) = cluster(ask(&mut r, &q("api.staging", RecordType::A), now()));
    assert_eq!(m.queries[0].name, n("api.staging.svc.cluster.local."));
    assert_eq!(r.routing_domains(), vec!["cluster.local", "default", "staging"]);
    assert_eq!(r.filtered_namespaces(), vec!["io"]);
    // kube-system is gone now.
    assert_eq!(ask(&mut r, &q("kube-dns.kube-system", RecordType::A), now()), Action::Upstream);
}

#[test]
fn include_and_exclude_suffixes() {
    let config = Config {
        include_suffixes: vec!["Corp.Example.".into()],
        exclude_suffixes: vec!["kube-system".into(), "internal.corp.example".into()],
        ..Config::default()
    };
    let mut r = resolver_with(config);
    assert_eq!(r.routing_domains(), vec!["cluster.local", "corp.example", "default"]);
    let (m, p) = cluster(ask(&mut r, &q("db.corp.example", RecordType::A), now()));
    assert_eq!(m.queries[0].name, n("db.corp.example."), "include suffixes are asked as is");
    assert_eq!(p.fqdn(), &n("db.corp.example."));
    for name in ["x.internal.corp.example", "kube-dns.kube-system"] {
        assert_eq!(ask(&mut r, &q(name, RecordType::A), now()), Action::Upstream, "{name}");
    }
    // An exclude suffix is a DNS suffix: the FQDN under the cluster domain is not under it.
    cluster(ask(&mut r, &q("kube-dns.kube-system.svc.cluster.local", RecordType::A), now()));
    // Excluding the cluster domain wins even over the Service table.
    let config = Config { exclude_suffixes: vec!["cluster.local".into()], ..Config::default() };
    let mut r = resolver_with(config);
    assert_eq!(ask(&mut r, &q("frontend.default.svc.cluster.local", RecordType::A), now()), Action::Upstream);
    assert!(!r.routing_domains().contains(&"cluster.local".to_string()));
}

#[test]
fn other_cluster_domain() {
    let config = Config { cluster_domain: "k8s.example.internal.".into(), ..Config::default() };
    let mut r = resolver_with(config);
    let m = reply_msg(ask(&mut r, &q("frontend.default.svc.k8s.example.internal", RecordType::A), now()));
    assert_eq!(a_ips(&m).len(), 1);
    let (m, _) = cluster(ask(&mut r, &q("headless.default", RecordType::A), now()));
    assert_eq!(m.queries[0].name, n("headless.default.svc.k8s.example.internal."));
}

/// The cluster DNS's answer to `query`: records built by `f` with the query's name.
fn cluster_reply(query: &Message, rcode: ResponseCode, f: impl FnOnce(&Name) -> (Vec<Record>, Vec<Record>)) -> Vec<u8> {
    let mut m = Message::response(query.metadata.id, OpCode::Query);
    m.metadata.response_code = rcode;
    m.metadata.authoritative = true;
    m.metadata.recursion_available = true;
    m.add_queries(query.queries.clone());
    let (answers, authorities) = f(&query.queries[0].name);
    m.add_answers(answers);
    m.add_authorities(authorities);
    m.to_vec().unwrap()
}

fn soa(ttl: u32, minimum: u32) -> Record {
    let zone = n("cluster.local.");
    Record::from_rdata(zone.clone(), ttl, RData::SOA(SOA::new(zone.clone(), zone, 1, 7200, 1800, 86400, minimum)))
}

#[test]
fn headless_goes_to_cluster_and_answer_is_rewritten() {
    let mut r = resolver();
    let packet = q_edns("Headless.Default", RecordType::A, 4096);
    let (cq, pending) = cluster(ask(&mut r, &packet, now()));
    assert!(cq.metadata.recursion_desired);
    assert_eq!(cq.metadata.message_type, MessageType::Query);
    assert_eq!(cq.queries.len(), 1);
    assert_eq!(cq.queries[0].name, n("headless.default.svc.cluster.local."));
    assert_eq!((cq.queries[0].query_type, cq.queries[0].query_class), (RecordType::A, DNSClass::IN));
    assert_eq!(cq.edns.as_ref().unwrap().max_payload(), 1232);
    assert_eq!(pending.cluster_id(), cq.metadata.id);
    assert_eq!(pending.client_id(), ID);
    assert_eq!(pending.client_payload(), Some(4096));

    let answer = cluster_reply(&cq, ResponseCode::NoError, |name| {
        (
            vec![
                Record::from_rdata(name.clone(), 30, RData::A(A::new(10, 244, 0, 5))),
                Record::from_rdata(name.clone(), 20, RData::A(A::new(10, 244, 0, 6))),
            ],
            vec![],
        )
    });
    let t0 = now();
    let m = Message::from_vec(&r.cluster_answer(&pending, &answer, t0)).unwrap();
    assert_eq!(m.metadata.id, ID);
    assert!(m.queries[0].name.eq_case(&n("Headless.Default.")));
    assert!(m.answers.iter().all(|a| a.name.eq_case(&n("Headless.Default."))));
    assert_eq!(m.answers.iter().map(|a| a.ttl).collect::<Vec<_>>(), vec![30, 20]);
    assert_eq!(m.edns.as_ref().unwrap().max_payload(), 1232, "EDNS answered with EDNS");

    // Positive cache: same FQDN, another form, the TTL counted down.
    let m = reply_msg(ask(&mut r, &q("headless.default.svc", RecordType::A), t0 + Duration::from_secs(12)));
    assert_eq!(m.metadata.id, ID);
    assert!(m.answers.iter().all(|a| a.name.eq_case(&n("headless.default.svc."))));
    assert_eq!(m.answers.iter().map(|a| a.ttl).collect::<Vec<_>>(), vec![18, 8]);
    assert!(m.edns.is_none());
    // Expired by the lowest TTL.
    cluster(ask(&mut r, &q("headless.default", RecordType::A), t0 + Duration::from_secs(20)));
    // Another type is another key.
    cluster(ask(&mut r, &q("headless.default", RecordType::AAAA), t0));
}

#[test]
fn cname_chain_only_first_owner_rewritten() {
    let mut r = resolver();
    let (cq, pending) = cluster(ask(&mut r, &q("ext.default", RecordType::A), now()));
    let target = n("db.example.com.");
    let answer = cluster_reply(&cq, ResponseCode::NoError, |name| {
        (
            vec![
                Record::from_rdata(name.clone(), 30, RData::CNAME(CNAME(target.clone()))),
                Record::from_rdata(target.clone(), 60, RData::A(A::new(192, 0, 2, 1))),
            ],
            vec![],
        )
    });
    let m = Message::from_vec(&r.cluster_answer(&pending, &answer, now())).unwrap();
    assert_eq!(m.answers[0].name, n("ext.default."));
    assert_eq!(m.answers[0].data, RData::CNAME(CNAME(target.clone())));
    assert_eq!(m.answers[1].name, target);
}

#[test]
fn nxdomain_passes_through_and_is_cached_by_soa_minimum() {
    let mut r = resolver();
    let (cq, pending) = cluster(ask(&mut r, &q("nope.default.svc", RecordType::A), now()));
    let answer = cluster_reply(&cq, ResponseCode::NXDomain, |_| (vec![], vec![soa(30, 10)]));
    let t0 = now();
    let m = Message::from_vec(&r.cluster_answer(&pending, &answer, t0)).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.metadata.id, ID);
    assert_eq!(m.authorities.len(), 1);
    let m = reply_msg(ask(&mut r, &q("NOPE.default.svc", RecordType::A), t0 + Duration::from_secs(4)));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.queries[0].name.eq_case(&n("NOPE.default.svc.")));
    assert_eq!(m.authorities[0].ttl, 26);
    let m = reply_msg(ask(&mut r, &q("nope.default.svc", RecordType::A), t0 + Duration::from_millis(9999)));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    cluster(ask(&mut r, &q("nope.default.svc", RecordType::A), t0 + Duration::from_secs(10)));

    // NODATA without SOA: 5 s.
    let (cq, pending) = cluster(ask(&mut r, &q("headless.default", RecordType::TXT), t0));
    let answer = cluster_reply(&cq, ResponseCode::NoError, |_| (vec![], vec![]));
    r.cluster_answer(&pending, &answer, t0);
    assert!(matches!(
        ask(&mut r, &q("headless.default", RecordType::TXT), t0 + Duration::from_secs(4)),
        Action::Reply(_)
    ));
    cluster(ask(&mut r, &q("headless.default", RecordType::TXT), t0 + Duration::from_secs(5)));
}

#[test]
fn cluster_failures() {
    let mut r = resolver();
    let (cq, pending) = cluster(ask(&mut r, &q_edns("headless.default", RecordType::A, 1400), now()));
    let m = Message::from_vec(&r.cluster_failed(&pending)).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.metadata.id, ID);
    assert_eq!(m.queries, vec![pending.question().clone()]);
    assert!(m.edns.is_some());
    // Garbage, a wrong id, a wrong question: SERVFAIL, nothing cached.
    let good = cluster_reply(&cq, ResponseCode::NoError, |name| {
        (vec![Record::from_rdata(name.clone(), 30, RData::A(A::new(10, 244, 0, 5)))], vec![])
    });
    let mut wrong_id = good.clone();
    wrong_id[0] ^= 0xff;
    let mut other = cq.clone();
    other.queries[0].name = n("other.default.svc.cluster.local.");
    let wrong_q = cluster_reply(&other, ResponseCode::NoError, |_| (vec![], vec![]));
    for bad in [&b"\x00"[..], &wrong_id, &wrong_q, &cq.to_vec().unwrap()] {
        let m = Message::from_vec(&r.cluster_answer(&pending, bad, now())).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.metadata.id, ID);
    }
    cluster(ask(&mut r, &q("headless.default", RecordType::A), now()));
}

#[test]
fn truncated_cluster_answer_keeps_tc_and_is_not_cached() {
    let mut r = resolver();
    let (cq, pending) = cluster(ask(&mut r, &q("headless.default", RecordType::A), now()));
    let mut m = Message::from_vec(&cluster_reply(&cq, ResponseCode::NoError, |_| (vec![], vec![]))).unwrap();
    m.metadata.truncation = true;
    let out = Message::from_vec(&r.cluster_answer(&pending, &m.to_vec().unwrap(), now())).unwrap();
    assert!(out.metadata.truncation);
    cluster(ask(&mut r, &q("headless.default", RecordType::A), now()));
}

#[test]
fn big_local_answer_truncated_over_udp_whole_over_tcp() {
    let mut r = resolver();
    for packet in [q("many.default", RecordType::A), q_edns("many.default", RecordType::A, 1232)] {
        let m = reply_msg(r.query(&packet, Transport::Udp, now()));
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert_eq!(m.metadata.id, ID);
        assert_eq!(m.queries[0].name, n("many.default."));
    }
    let Action::Reply(bytes) = r.query(&q_edns("many.default", RecordType::A, 4096), Transport::Udp, now()) else {
        panic!("reply expected")
    };
    assert!(bytes.len() <= 4096);
    assert_eq!(Message::from_vec(&bytes).unwrap().answers.len(), 100);
    let m = reply_msg(r.query(&q("many.default", RecordType::A), Transport::Tcp, now()));
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
}

#[test]
fn cluster_answer_too_big_for_udp_client_is_truncated() {
    let mut r = resolver();
    let (cq, pending) = cluster(ask(&mut r, &q("headless.default", RecordType::A), now()));
    let answer = cluster_reply(&cq, ResponseCode::NoError, |name| {
        let recs = (0..60).map(|i| Record::from_rdata(name.clone(), 30, RData::A(A::new(10, 244, 1, i)))).collect();
        (recs, vec![])
    });
    let m = Message::from_vec(&r.cluster_answer(&pending, &answer, now())).unwrap();
    assert!(m.metadata.truncation && m.answers.is_empty());
    // The full answer was cached; a TCP client gets it whole.
    let m = reply_msg(r.query(&q("headless.default", RecordType::A), Transport::Tcp, now()));
    assert_eq!(m.answers.len(), 60);
}

#[test]
fn malformed_and_unsupported() {
    let mut r = resolver();
    // Unreadable header, or a response: nothing is sent.
    assert_eq!(ask(&mut r, b"", now()), Action::Drop);
    assert_eq!(ask(&mut r, b"\x12\x34\x01", now()), Action::Drop);
    let mut resp = q("frontend.default", RecordType::A);
    resp[2] |= 0x80;
    assert_eq!(ask(&mut r, &resp, now()), Action::Drop);
    // Readable id, broken body: FORMERR with that id.
    let mut broken = q("frontend.default", RecordType::A);
    broken.truncate(broken.len() - 3);
    for packet in [broken, b"\x12\x34\x01\x00".to_vec(), b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00".to_vec()] {
        let m = reply_msg(ask(&mut r, &packet, now()));
        assert_eq!(m.metadata.id, ID);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }
    // Zero or two questions.
    let mut none = query_msg("x.default.svc", RecordType::A);
    none.queries.clear();
    let m = reply_msg(ask(&mut r, &none.to_vec().unwrap(), now()));
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let mut two = query_msg("frontend.default", RecordType::A);
    two.add_query(Query::query(n("frontend."), RecordType::A));
    let m = reply_msg(ask(&mut r, &two.to_vec().unwrap(), now()));
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(m.queries, Message::from_vec(&two.to_vec().unwrap()).unwrap().queries, "questions echoed");
    // Other opcodes.
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut m = query_msg("frontend.default", RecordType::A);
        m.metadata.op_code = op;
        let out = reply_msg(ask(&mut r, &m.to_vec().unwrap(), now()));
        assert_eq!(out.metadata.response_code, ResponseCode::NotImp);
        assert_eq!(out.metadata.op_code, op);
        assert_eq!(out.metadata.id, ID);
    }
    // EDNS version 1.
    let mut m = query_msg("frontend.default", RecordType::A);
    let mut e = Edns::new();
    e.set_version(1);
    m.set_edns(e);
    let out = reply_msg(ask(&mut r, &m.to_vec().unwrap(), now()));
    // 16 is BADVERS in an OPT record; hickory decodes the number as its TSIG twin BADSIG.
    assert_eq!(u16::from(out.metadata.response_code), 16);
    assert_eq!(out.edns.as_ref().unwrap().version(), 0);
}

#[test]
fn single_labels_and_other_forms() {
    let mut r = resolver();
    // Not a Service of the connected namespace: a LAN name.
    assert_eq!(ask(&mut r, &q("printer", RecordType::A), now()), Action::Upstream);
    assert_eq!(ask(&mut r, &q("default", RecordType::A), now()), Action::Upstream);
    // A headless Service of the connected namespace: the cluster decides.
    let (m, _) = cluster(ask(&mut r, &q("headless", RecordType::A), now()));
    assert_eq!(m.queries[0].name, n("headless.default.svc.cluster.local."));
    // `.svc` / `.pod` forms, known or unknown namespace.
    let (m, _) = cluster(ask(&mut r, &q("x.other-ns.svc", RecordType::A), now()));
    assert_eq!(m.queries[0].name, n("x.other-ns.svc.cluster.local."));
    let (m, _) = cluster(ask(&mut r, &q("10-244-0-5.default.pod", RecordType::A), now()));
    assert_eq!(m.queries[0].name, n("10-244-0-5.default.pod.cluster.local."));
    // Other types and classes of a known Service go to the cluster.
    cluster(ask(&mut r, &q("frontend.default", RecordType::TXT), now()));
    let mut ch = query_msg("frontend.default", RecordType::A);
    ch.queries[0].query_class = DNSClass::CH;
    let (m, _) = cluster(ask(&mut r, &ch.to_vec().unwrap(), now()));
    assert_eq!(m.queries[0].query_class, DNSClass::CH);
    // The cluster domain itself and unknown Services under a known namespace.
    cluster(ask(&mut r, &q("cluster.local", RecordType::SOA), now()));
    cluster(ask(&mut r, &q("unknown.default.svc", RecordType::A), now()));
}

#[test]
fn fresh_ids() {
    let mut r = resolver();
    let ids: std::collections::HashSet<u16> =
        (0..64).map(|_| cluster(ask(&mut r, &q("headless.default", RecordType::A), now())).1.cluster_id()).collect();
    assert!(ids.len() > 50, "ids repeat too often: {}", ids.len());
}

/// Rule 7: whatever the bytes, no panic; a reply keeps the id and, when the query
/// parsed with one question, the question.
#[test]
fn mutated_queries_never_panic() {
    let mut r = resolver();
    let seeds = [
        q("frontend.default", RecordType::A),
        q_edns("_http._tcp.frontend.default", RecordType::SRV, 1232),
        q("10.0.96.10.in-addr.arpa", RecordType::PTR),
        q("headless.default", RecordType::AAAA),
        q("docs.rs", RecordType::A),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000 {
        let mut p = seeds[i % seeds.len()].clone();
        for _ in 0..(1 + rnd() % 4) {
            match rnd() % 3 {
                0 if !p.is_empty() => {
                    let at = (rnd() as usize) % p.len();
                    p[at] = rnd() as u8;
                }
                1 if !p.is_empty() => p.truncate((rnd() as usize) % p.len()),
                _ => p.push(rnd() as u8),
            }
        }
        let transport = if i % 2 == 0 { Transport::Udp } else { Transport::Tcp };
        match r.query(&p, transport, now()) {
            Action::Reply(bytes) => {
                let m = Message::from_vec(&bytes).expect("replies parse");
                assert_eq!(&bytes[..2], &p[..2]);
                assert_eq!(m.metadata.message_type, MessageType::Response);
                if let Ok(qm) = Message::from_vec(&p) {
                    if qm.queries.len() == 1 {
                        assert_eq!(m.queries, qm.queries);
                    }
                }
            }
            Action::Cluster { query, pending } => {
                let cq = Message::from_vec(&query).expect("cluster queries parse");
                assert_eq!(cq.queries.len(), 1);
                let failed = Message::from_vec(&r.cluster_failed(&pending)).unwrap();
                assert_eq!(&r.cluster_failed(&pending)[..2], &p[..2]);
                assert_eq!(failed.queries.len(), 1);
            }
            Action::Upstream | Action::Drop => {}
        }
    }
}

#[test]
fn disconnected_cluster_names_fail_fast_and_others_go_upstream() {
    let mut r = resolver();
    r.set_connected(false);
    for (name, rtype) in [
        ("frontend.default", RecordType::A),
        ("frontend", RecordType::A),
        ("missing.default.svc.cluster.local", RecordType::A),
        ("10.0.96.10.in-addr.arpa", RecordType::PTR),
    ] {
        let m = reply_msg(ask(&mut r, &q(name, rtype), now()));
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "{name}");
        assert_eq!(m.metadata.id, ID);
        assert!(m.answers.is_empty(), "{name}");
    }
    assert_eq!(ask(&mut r, &q("docs.rs", RecordType::A), now()), Action::Upstream);
    r.set_connected(true);
    let m = reply_msg(ask(&mut r, &q("frontend.default", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))]);
}

#[test]
fn remembered_table_replies_equal_fresh_ones_and_follow_the_table() {
    let with_id = |mut packet: Vec<u8>, id: u16| {
        packet[..2].copy_from_slice(&id.to_be_bytes());
        packet
    };
    let queries = [
        (q("frontend.default", RecordType::A), Transport::Udp),
        (q("FrontEnd.Default.svc.cluster.local", RecordType::AAAA), Transport::Udp),
        (q_edns("frontend", RecordType::A, 4096), Transport::Udp),
        (q("_http._tcp.frontend.default.svc.cluster.local", RecordType::SRV), Transport::Udp),
        (q("10.0.96.10.in-addr.arpa", RecordType::PTR), Transport::Udp),
        (q("v4only.default", RecordType::AAAA), Transport::Udp),
        (q("many.default", RecordType::A), Transport::Udp),
        (q("many.default", RecordType::A), Transport::Tcp),
    ];
    let mut r = resolver();
    for (packet, transport) in &queries {
        r.query(&with_id(packet.clone(), 1), *transport, now());
    }
    assert_eq!(r.replies.len(), queries.len(), "every table reply is remembered");
    for (packet, transport) in &queries {
        let remembered = r.query(&with_id(packet.clone(), 0xbeef), *transport, now());
        let fresh = resolver().query(&with_id(packet.clone(), 0xbeef), *transport, now());
        assert_eq!(remembered, fresh, "{:?}", Message::from_vec(packet).unwrap().queries);
    }
    // Udp and Tcp replies differ (truncation) and are kept apart.
    let udp = reply_msg(r.query(&q("many.default", RecordType::A), Transport::Udp, now()));
    assert!(udp.metadata.truncation);

    // Every change of state is seen at once.
    r.set_services(vec![svc("default", "frontend", &["10.96.0.99"])]);
    let m = reply_msg(r.query(&queries[0].0, Transport::Udp, now()));
    assert_eq!(a_ips(&m), vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 99))]);
    r.set_connected(false);
    let m = reply_msg(r.query(&queries[0].0, Transport::Udp, now()));
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    r.set_connected(true);
    reply_msg(r.query(&queries[0].0, Transport::Udp, now()));
    r.set_namespaces(vec!["kube-system".into()]);
    assert_eq!(r.query(&queries[0].0, Transport::Udp, now()), Action::Upstream);
}

#[test]
fn servfail_for_a_query_not_carried_out() {
    let m = Message::from_vec(&Resolver::servfail(&q("docs.rs", RecordType::A), Transport::Udp).unwrap()).unwrap();
    assert_eq!((m.metadata.id, m.metadata.response_code), (ID, ResponseCode::ServFail));
    assert_eq!(m.queries[0].name, n("docs.rs."));
    assert_eq!(Resolver::servfail(b"\x12", Transport::Udp), None);
}

/// The resolver of [`resolver`] with `10.96.0.0/12` and `fd00::/112` mapped (always), as
/// the daemon maps them.
fn resolver_with_vnat() -> Resolver {
    let mut r = resolver();
    let cluster: Vec<ipnet::IpNet> = ["10.96.0.0/12", "10.244.0.0/16", "fd00::/112"].map(|c| c.parse().unwrap()).into();
    let routes: Vec<ipnet::IpNet> = ["10.96.0.0/12", "fd00::/64"].map(|c| c.parse().unwrap()).into();
    let t = tpvpn_vnat::plan(&Default::default(), &cluster, &routes, &Default::default(), tpvpn_vnat::Mode::Auto);
    r.set_vnat(t.unwrap());
    r
}

#[test]
fn mapped_cluster_addresses_are_answered_virtual_and_their_ptr_works_both_ways() {
    let mut r = resolver();
    // Before the table is set: cluster addresses (and a cached reply of the table).
    let m = reply_msg(ask(&mut r, &q("frontend.default", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("10.96.0.10").unwrap()]);
    let mut r = resolver_with_vnat();
    let m = reply_msg(ask(&mut r, &q("frontend.default", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("240.0.0.10").unwrap()]);
    let m = reply_msg(ask(&mut r, &q("frontend.default", RecordType::AAAA), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("fd74:7076:8000::10").unwrap()]);
    // SRV: the target's addresses in the additionals are virtual too.
    let m = reply_msg(ask(&mut r, &q("_http._tcp.frontend.default", RecordType::SRV), now()));
    assert!(m.additionals.iter().all(|a| !matches!(&a.data, RData::A(a) if a.0.octets()[0] == 10)), "{m:?}");
    // PTR of a virtual address: the Service; of the shadowed cluster address: upstream,
    // which owns it on this laptop.
    let m = reply_msg(ask(&mut r, &q("10.0.0.240.in-addr.arpa.", RecordType::PTR), now()));
    assert!(m.queries[0].name.eq_case(&n("10.0.0.240.in-addr.arpa.")));
    assert_eq!(m.answers[0].data, RData::PTR(PTR(n("frontend.default.svc.cluster.local."))));
    assert_eq!(ask(&mut r, &q("10.0.96.10.in-addr.arpa.", RecordType::PTR), now()), Action::Upstream);
    // A virtual address of no Service: the cluster DNS is asked for the real one and its
    // answer renamed to the question.
    let (cq, pending) = cluster(ask(&mut r, &q("5.0.0.240.in-addr.arpa.", RecordType::PTR), now()));
    assert_eq!(cq.queries[0].name, n("5.0.96.10.in-addr.arpa."));
    let answer = cluster_reply(&cq, ResponseCode::NoError, |name| {
        (vec![Record::from_rdata(name.clone(), 30, RData::PTR(PTR(n("pod.default.svc.cluster.local."))))], vec![])
    });
    let m = Message::from_vec(&r.cluster_answer(&pending, &answer, now())).unwrap();
    assert!(m.answers[0].name.eq_case(&n("5.0.0.240.in-addr.arpa.")), "{m:?}");
    // Unmapped ranges and other names are untouched: a pod address of a headless Service.
    let (cq, pending) = cluster(ask(&mut r, &q("headless.default", RecordType::A), now()));
    let answer = cluster_reply(&cq, ResponseCode::NoError, |name| {
        (
            vec![
                Record::from_rdata(name.clone(), 30, RData::A(A::new(10, 244, 0, 5))),
                Record::from_rdata(name.clone(), 30, RData::A(A::new(10, 96, 3, 4))),
            ],
            vec![],
        )
    });
    let m = Message::from_vec(&r.cluster_answer(&pending, &answer, now())).unwrap();
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("10.244.0.5").unwrap(), IpAddr::from_str("240.0.3.4").unwrap()]);
    // The cache holds the cluster's addresses: a new table applies to it.
    r.set_vnat(tpvpn_vnat::Table::default());
    let m = reply_msg(ask(&mut r, &q("headless.default", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("10.244.0.5").unwrap(), IpAddr::from_str("10.96.3.4").unwrap()]);
    let m = reply_msg(ask(&mut r, &q("frontend.default", RecordType::A), now()));
    assert_eq!(a_ips(&m), vec![IpAddr::from_str("10.96.0.10").unwrap()]);
}
