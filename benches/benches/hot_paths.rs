//! criterion benches of the hot code: netstack packet-to-flow dispatch with 1 and 10,000
//! established flows (the cost per packet must not grow with the flow count), tunnel
//! frame encode/decode, and resolver answers from the local Service table.
//!
//! `cargo bench -p tpvpn-benches --bench hot_paths`

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use hickory_proto::op::{Message as DnsMessage, MessageType, OpCode, Query};
use hickory_proto::rr::RecordType;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, IpRepr, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
use tpvpn_netstack::wire::{parse, Transport};
use tpvpn_netstack::{Config, DialOutcome, Event, Instant, Stack, TcpRead};
use tpvpn_tunnel::{ClusterInfo, Message, Protocol, ServiceInfo, ServicePort};

/// One TCP segment from `src` to `dst`.
fn segment(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65535,
        window_scale: None,
        max_seg_size: if control == TcpControl::Syn { Some(1400) } else { None },
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip())) else {
        unreachable!("the bench uses IPv4")
    };
    let ip = IpRepr::Ipv4(Ipv4Repr {
        src_addr: s,
        dst_addr: d,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    });
    let mut buf = vec![0u8; ip.buffer_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut buf[..], &caps);
    let hl = ip.header_len();
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[hl..]),
        &IpAddress::from(src.ip()),
        &IpAddress::from(dst.ip()),
        &caps,
    );
    buf
}

/// A stack with `n` established flows; returns it with the last flow's (id, src, dst,
/// next seq, ack).
fn stack_with_flows(n: u32) -> (Stack, u64, SocketAddr, SocketAddr, u32, u32) {
    let config = Config { tcp_rx_buffer: 64 * 1024, tcp_tx_buffer: 64 * 1024, ..Default::default() };
    let mut stack = Stack::new(config);
    let dst: SocketAddr = "10.96.0.10:80".parse().expect("literal");
    let mut last = None;
    for i in 0..n {
        let src = SocketAddr::from(([198, 18, (i >> 16) as u8, 1], 10_000 + (i & 0xffff) as u16));
        stack.input(&segment(src, dst, TcpControl::Syn, 1000, None, &[]), Instant::from_millis(0)).expect("syn");
        let Some(Event::TcpConnect { id, .. }) = stack.poll_event() else { panic!("no connect event") };
        stack.dial_result(id, DialOutcome::Connected, Instant::from_millis(1)).expect("dial");
        let synack = stack.transmit().expect("syn-ack");
        let Transport::Tcp(t) = parse(&synack).expect("parse").transport else { panic!("not tcp") };
        let ack = t.seq.wrapping_add(1);
        stack.input(&segment(src, dst, TcpControl::None, 1001, Some(ack), &[]), Instant::from_millis(2)).expect("ack");
        while stack.poll_event().is_some() {}
        while stack.transmit().is_some() {}
        last = Some((id, src, ack));
    }
    let (id, src, ack) = last.expect("at least one flow");
    (stack, id, src, dst, 1001, ack)
}

fn netstack_dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("netstack: one 1400-byte segment in, read, acked");
    let payload = [7u8; 1400];
    for flows in [1u32, 10_000] {
        let (mut stack, id, src, dst, mut seq, ack) = stack_with_flows(flows);
        let mut buf = vec![0u8; 65536];
        let mut now = 10i64;
        group.bench_function(format!("{flows} flows"), |b| {
            b.iter(|| {
                now += 1;
                let pkt = segment(src, dst, TcpControl::Psh, seq, Some(ack), &payload);
                stack.input(black_box(&pkt), Instant::from_millis(now)).expect("segment");
                seq = seq.wrapping_add(payload.len() as u32);
                while stack.poll_event().is_some() {}
                while let Ok(TcpRead::Data(_)) = stack.tcp_recv(id, &mut buf, Instant::from_millis(now)) {}
                while let Some(p) = stack.transmit() {
                    stack.recycle(black_box(p));
                }
            })
        });
    }
    group.finish();
}

fn tunnel_frames(c: &mut Criterion) {
    let open = Message::FlowOpen {
        protocol: Protocol::Tcp,
        flow_id: 0,
        src: "198.18.0.1:40000".parse().expect("literal"),
        dst: "10.96.0.10:80".parse().expect("literal"),
    };
    let hello = Message::ServerHello {
        version: 1,
        cluster: ClusterInfo {
            cidrs: vec!["10.96.0.0/12".parse().expect("literal"), "10.244.0.0/16".parse().expect("literal")],
            dns: Some("10.96.0.10".parse().expect("literal")),
            domain: "cluster.local".into(),
        },
    };
    let mut out = Vec::with_capacity(256);
    c.bench_function("tunnel: encode flow-open", |b| {
        b.iter(|| {
            out.clear();
            black_box(&open).emit(&mut out).expect("fits a frame");
        })
    });
    let bytes = open.to_vec().expect("fits a frame");
    c.bench_function("tunnel: decode flow-open", |b| b.iter(|| Message::decode(black_box(&bytes)).expect("decodes")));
    let bytes = hello.to_vec().expect("fits a frame");
    c.bench_function("tunnel: decode server-hello", |b| {
        b.iter(|| Message::decode(black_box(&bytes)).expect("decodes"))
    });
}

fn resolver_answers(c: &mut Criterion) {
    let mut r = tpvpn_resolver::Resolver::new(tpvpn_resolver::Config::default(), tpvpn_resolver::Psl::embedded());
    r.set_namespaces((0..100).map(|i| format!("ns{i}")).chain(["default".to_string()]).collect());
    r.set_services(
        (0..10_000)
            .map(|i| ServiceInfo {
                namespace: format!("ns{}", i % 100),
                name: format!("svc{i}"),
                cluster_ips: vec![std::net::IpAddr::from([10, 96, (i >> 8) as u8, i as u8])],
                ports: vec![ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80 }],
            })
            .collect(),
    );
    let query = |i: usize| {
        let mut q = DnsMessage::new(0x1234, MessageType::Query, OpCode::Query);
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(format!("svc{i}.ns{}.", i % 100).parse().expect("name"), RecordType::A));
        q.to_vec().expect("encodes")
    };
    // Every Service in turn: more names than the resolver remembers replies for, so each
    // query is parsed, looked up and encoded.
    let all: Vec<Vec<u8>> = (0..10_000).map(query).collect();
    let mut next = 0;
    c.bench_function("resolver: A from the table, first asked (10,000 services)", |b| {
        b.iter(|| {
            next = (next + 1) % all.len();
            r.query(black_box(&all[next]), tpvpn_resolver::Transport::Udp, std::time::Instant::now())
        })
    });
    // The same query again (what stub resolvers and dnsperf send): the remembered reply.
    let again = query(4242);
    c.bench_function("resolver: A from the table, asked again (10,000 services)", |b| {
        b.iter(|| r.query(black_box(&again), tpvpn_resolver::Transport::Udp, std::time::Instant::now()))
    });
}

criterion_group!(benches, netstack_dispatch, tunnel_frames, resolver_answers);
criterion_main!(benches);
