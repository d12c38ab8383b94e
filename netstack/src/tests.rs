//! Stack tests driven by packet templates, with virtual time.

use super::*;
use crate::wire::tests::Seg;
use crate::wire::{parse, TcpInfo, Transport};
use smoltcp::wire::TcpControl;

const APP: &str = "198.18.0.1:40000";
const SVC: &str = "10.96.0.10:80";

fn t(ms: i64) -> Instant {
    Instant::from_millis(ms)
}

fn tcp_of(pkt: &[u8]) -> TcpInfo {
    match parse(pkt).unwrap().transport {
        Transport::Tcp(t) => t,
        other => panic!("not tcp: {other:?}"),
    }
}

fn tcp_payload(pkt: &[u8]) -> Vec<u8> {
    let info = parse(pkt).unwrap();
    let ip_hl = if info.src.is_ipv4() { usize::from(pkt[0] & 0x0f) * 4 } else { 40 };
    let tcp_hl = usize::from(pkt[ip_hl + 12] >> 4) * 4;
    pkt[ip_hl + tcp_hl..].to_vec()
}

/// Opens a connection through the stack and returns (stack, flow id, our next seq,
/// the stack's next seq).
fn established() -> (Stack, FlowId, u32, u32) {
    established_with(Config::default())
}

fn established_with(config: Config) -> (Stack, FlowId, u32, u32) {
    let mut s = Stack::new(config);
    s.input(&Seg::syn(APP, SVC).build(), t(0)).unwrap();
    let Some(Event::TcpConnect { id, src, dst }) = s.poll_event() else { panic!("no connect event") };
    assert_eq!((src.to_string(), dst.to_string()), (APP.to_string(), SVC.to_string()));
    assert!(s.transmit().is_none(), "the SYN must not be answered before the dial");
    s.dial_result(id, DialOutcome::Connected, t(1)).unwrap();
    let synack = s.transmit().expect("syn-ack after dial");
    let sa = tcp_of(&synack);
    assert!(sa.syn && sa.ack);
    assert_eq!(sa.ack_number, 1001);
    let mut ack = Seg::syn(APP, SVC);
    ack.control = TcpControl::None;
    ack.seq = 1001;
    ack.ack = Some(sa.seq.wrapping_add(1));
    ack.mss = None;
    s.input(&ack.build(), t(2)).unwrap();
    while s.poll_event().is_some() {}
    (s, id, 1001, sa.seq.wrapping_add(1))
}

fn data_seg(seq: u32, ack: u32, payload: &[u8], control: TcpControl) -> Vec<u8> {
    let mut seg = Seg::syn(APP, SVC);
    seg.control = control;
    seg.seq = seq;
    seg.ack = Some(ack);
    seg.mss = None;
    seg.payload = payload.to_vec();
    seg.build()
}

#[test]
fn data_flows_both_ways_after_dial() {
    let (mut s, id, seq, ack) = established();
    s.input(&data_seg(seq, ack, b"GET / HTTP/1.0\r\n\r\n", TcpControl::Psh), t(3)).unwrap();
    assert_eq!(s.poll_event(), Some(Event::TcpActivity { id }));
    // `tcp_recv_with` shows the socket's bytes, at most `max` at a time, and consumes them.
    let mut seen = Vec::new();
    assert_eq!(s.tcp_recv_with(id, 4, t(3), |d| seen.extend_from_slice(d)).unwrap(), TcpRead::Data(4));
    assert_eq!(seen, b"GET ");
    let mut buf = [0u8; 100];
    assert_eq!(s.tcp_recv(id, &mut buf, t(3)).unwrap(), TcpRead::Data(14));
    assert_eq!(&buf[..14], b"/ HTTP/1.0\r\n\r\n");
    assert_eq!(s.tcp_recv_with(id, 4, t(3), |_| panic!("nothing left to show")).unwrap(), TcpRead::WouldBlock);
    while s.transmit().is_some() {}
    assert_eq!(s.tcp_send(id, b"HTTP/1.0 200 OK\r\n", t(4)).unwrap(), 17);
    let out = s.transmit().expect("data toward the laptop");
    assert_eq!(tcp_payload(&out), b"HTTP/1.0 200 OK\r\n");
}

#[test]
fn send_all_takes_a_prefix_and_offload_leaves_partial_checksums() {
    let config = Config { tcp_tx_buffer: 100, checksum_offload: true, ..Config::default() };
    let (mut s, id, _, _) = established_with(config);
    while let Some(p) = s.transmit() {
        s.recycle(p);
    }
    let (a, b, c) = ([1u8; 60], [2u8; 60], [3u8; 10]);
    assert_eq!(s.tcp_send_all(id, [&a[..], &b[..], &c[..]], t(3)).unwrap(), 100, "60 + 40, then stop");
    let mut pkt = s.transmit().expect("data toward the laptop");
    assert_eq!(tcp_payload(&pkt), [&a[..], &b[..40]].concat());
    // The checksum field holds the pseudo-header sum; the device completes it.
    let h = wire::vnet_header(&pkt);
    let (start, at) = (usize::from(u16::from_ne_bytes([h[6], h[7]])), usize::from(u16::from_ne_bytes([h[8], h[9]])));
    let sum = !smoltcp::wire::checksum::data(&pkt[start..]);
    pkt[start + at..start + at + 2].copy_from_slice(&sum.to_be_bytes());
    let info = parse(&pkt).unwrap();
    let tcp = smoltcp::wire::TcpPacket::new_checked(&pkt[start..]).unwrap();
    assert!(tcp.verify_checksum(&info.src.into(), &info.dst.into()));
}

#[test]
fn fin_from_laptop_is_reported_and_close_is_clean() {
    let (mut s, id, seq, ack) = established();
    s.input(&data_seg(seq, ack, b"bye", TcpControl::Fin), t(3)).unwrap();
    let mut buf = [0u8; 10];
    assert_eq!(s.tcp_recv(id, &mut buf, t(3)).unwrap(), TcpRead::Data(3));
    assert_eq!(s.tcp_recv(id, &mut buf, t(3)).unwrap(), TcpRead::Fin);
    assert!(s.tcp_status(id).unwrap().recv_finished);
    // Half-close: we can still send after the laptop's FIN.
    assert_eq!(s.tcp_send(id, b"reply", t(4)).unwrap(), 5);
    s.tcp_close(id, t(5)).unwrap();
    let mut fin_seq = None;
    while let Some(p) = s.transmit() {
        let tcp = tcp_of(&p);
        if tcp.fin {
            fin_seq = Some(tcp.seq.wrapping_add(tcp.seg_len));
        }
    }
    let fin_end = fin_seq.expect("a FIN toward the laptop");
    s.input(&data_seg(seq + 4, fin_end, b"", TcpControl::None), t(6)).unwrap();
    let st = s.tcp_status(id).unwrap();
    assert!(st.closed && !st.reset, "{st:?}");
}

#[test]
fn rst_from_laptop_is_a_reset() {
    let (mut s, id, seq, ack) = established();
    s.input(&data_seg(seq, ack, b"", TcpControl::Rst), t(3)).unwrap();
    let st = s.tcp_status(id).unwrap();
    assert!(st.reset && !st.closed, "{st:?}");
}

#[test]
fn abort_sends_rst_to_laptop() {
    let (mut s, id, _, _) = established();
    while s.transmit().is_some() {}
    s.tcp_abort(id, t(3)).unwrap();
    let rst = s.transmit().expect("rst");
    assert!(tcp_of(&rst).rst);
    assert_eq!(s.flow_counts(), (0, 0));
}

#[test]
fn refused_dial_answers_rst_and_unreachable_answers_icmp() {
    let mut s = Stack::new(Config::default());
    s.input(&Seg::syn(APP, SVC).build(), t(0)).unwrap();
    let Some(Event::TcpConnect { id, .. }) = s.poll_event() else { panic!() };
    s.dial_result(id, DialOutcome::Refused, t(1)).unwrap();
    let rst = tcp_of(&s.transmit().unwrap());
    assert!(rst.rst && rst.ack && rst.ack_number == 1001);
    assert_eq!(s.flow_counts(), (0, 0));

    s.input(&Seg::syn(APP, "10.96.0.11:80").build(), t(2)).unwrap();
    let Some(Event::TcpConnect { id, .. }) = s.poll_event() else { panic!() };
    s.dial_result(id, DialOutcome::Unreachable, t(3)).unwrap();
    let icmp = parse(&s.transmit().unwrap()).unwrap();
    assert_eq!(icmp.protocol, 1);
    assert_eq!(s.counters().tcp_refused, 1);
}

#[test]
fn retransmitted_syn_while_dialing_is_not_a_second_flow() {
    let mut s = Stack::new(Config::default());
    let syn = Seg::syn(APP, SVC).build();
    s.input(&syn, t(0)).unwrap();
    s.input(&syn, t(1000)).unwrap();
    assert!(matches!(s.poll_event(), Some(Event::TcpConnect { .. })));
    assert_eq!(s.poll_event(), None);
    assert_eq!(s.flow_counts(), (1, 0));
}

#[test]
fn stray_segment_gets_rst() {
    let mut s = Stack::new(Config::default());
    s.input(&data_seg(5, 77, b"x", TcpControl::Psh), t(0)).unwrap();
    let rst = tcp_of(&s.transmit().unwrap());
    assert!(rst.rst && rst.seq == 77);
}

#[test]
fn udp_flow_lifecycle() {
    let mut s = Stack::new(Config::default());
    let pkt = wire::udp_packet(APP.parse().unwrap(), "10.96.0.10:53".parse().unwrap(), b"q").unwrap();
    s.input(&pkt, t(0)).unwrap();
    let Some(Event::UdpOpen { id, .. }) = s.poll_event() else { panic!() };
    assert_eq!(s.poll_event(), Some(Event::UdpData { id, payload: b"q".to_vec() }));
    s.input(&pkt, t(10)).unwrap();
    assert_eq!(s.poll_event(), Some(Event::UdpData { id, payload: b"q".to_vec() }));
    s.udp_send(id, b"answer", t(20)).unwrap();
    let reply = parse(&s.transmit().unwrap()).unwrap();
    assert_eq!(reply.endpoints().unwrap().0.to_string(), "10.96.0.10:53");
    // Not yet idle at 60 s after the first packet (there was traffic at 20 ms).
    s.handle_timeout(t(60_000));
    assert_eq!(s.flow_counts(), (0, 1));
    s.handle_timeout(t(60_021));
    assert_eq!(s.poll_event(), Some(Event::UdpClosed { id }));
    assert_eq!(s.flow_counts(), (0, 0));
}

#[test]
fn garbage_is_dropped_and_counted() {
    let mut s = Stack::new(Config::default());
    assert!(s.input(&[0x45, 0, 0], t(0)).is_err());
    assert!(s.input(&[], t(0)).is_err());
    assert_eq!(s.counters().dropped_malformed, 2);
    assert!(s.transmit().is_none() && s.poll_event().is_none());
}

#[test]
fn ipv6_flow_is_terminated_too() {
    let mut s = Stack::new(Config::default());
    s.input(&Seg::syn("[fd00::1]:40000", "[fd00:96::10]:80").build(), t(0)).unwrap();
    let Some(Event::TcpConnect { id, .. }) = s.poll_event() else { panic!() };
    s.dial_result(id, DialOutcome::Connected, t(1)).unwrap();
    let sa = tcp_of(&s.transmit().unwrap());
    assert!(sa.syn && sa.ack && sa.ack_number == 1001);
}

#[test]
fn tcp_to_multicast_or_broadcast_is_refused_without_a_flow() {
    let mut s = Stack::new(Config::default());
    for dst in ["226.96.0.1:80", "255.255.255.255:80", "0.0.0.0:80", "[ff02::1]:80"] {
        let src = if dst.starts_with('[') { "[fd00::1]:1" } else { APP };
        assert!(matches!(s.input(&Seg::syn(src, dst).build(), t(0)), Err(Error::Unsupported(_))), "{dst}");
    }
    assert_eq!(s.flow_counts(), (0, 0));
    assert!(s.poll_event().is_none());
}

#[test]
fn sends_between_transmits_leave_as_one_segment_with_the_ack() {
    let (mut s, id, seq, ack) = established();
    s.input(&data_seg(seq, ack, b"request", TcpControl::Psh), t(3)).unwrap();
    let mut buf = [0u8; 100];
    assert_eq!(s.tcp_recv(id, &mut buf, t(3)).unwrap(), TcpRead::Data(7));
    for part in [&b"first "[..], b"second ", b"third"] {
        assert_eq!(s.tcp_send(id, part, t(3)).unwrap(), part.len());
    }
    assert_eq!(s.poll_timeout(), Some(t(3)), "queued bytes ask for an immediate poll");
    let out = s.transmit().expect("one segment");
    let seg = tcp_of(&out);
    assert_eq!(tcp_payload(&out), b"first second third");
    assert_eq!(seg.ack_number, seq + 7, "the segment also acknowledges the request");
    assert!(s.transmit().is_none(), "nothing else: no separate ACK, no segment per send");
}

#[test]
fn only_the_machines_own_sources_are_taken() {
    let mut s = Stack::new(Config::default());
    s.set_local_addresses(vec!["198.18.0.1".parse().unwrap(), "10.250.2.2".parse().unwrap()]);
    // Another host routing a SYN through this machine: dropped, no flow, no answer.
    let foreign = Seg::syn("10.250.2.1:40000", SVC).build();
    assert!(matches!(s.input(&foreign, t(0)), Err(Error::Unsupported(_))));
    assert!(s.poll_event().is_none() && s.transmit().is_none());
    assert_eq!((s.flow_counts(), s.counters().dropped_foreign), ((0, 0), 1));
    // This machine's own source: a flow.
    s.input(&Seg::syn(APP, SVC).build(), t(1)).unwrap();
    assert!(matches!(s.poll_event(), Some(Event::TcpConnect { .. })));
}

#[test]
fn the_udp_table_is_bounded_and_the_idlest_flows_go_first() {
    let mut s = Stack::new(Config { udp_max_flows: 16, ..Config::default() });
    let udp = |port: u16| {
        let src: std::net::SocketAddr = format!("198.18.0.1:{port}").parse().unwrap();
        wire::udp_packet(src, "10.96.0.30:7".parse().unwrap(), b"x").unwrap()
    };
    for port in 1000..1016 {
        s.input(&udp(port), t(i64::from(port))).unwrap();
    }
    while s.poll_event().is_some() {}
    let mut closed = 0;
    for port in 2000..2100 {
        // Flow 1000 keeps talking: it is never the idlest.
        s.input(&udp(1000), t(i64::from(port) * 10)).unwrap();
        s.input(&udp(port), t(i64::from(port) * 10 + 1)).unwrap();
        assert!(s.flow_counts().1 <= 16);
        while let Some(e) = s.poll_event() {
            closed += usize::from(matches!(e, Event::UdpClosed { .. }));
            assert!(!matches!(e, Event::UdpOpen { src, .. } if src.port() == 1000), "the busy flow was evicted");
        }
    }
    assert_eq!(closed, 100, "every flow that went was announced");
    assert!(s.timers.len() <= 2 * 16, "{} timers left for 16 flows", s.timers.len());
}

#[test]
fn flows_to_virtual_addresses_are_announced_with_cluster_addresses_and_answered_from_the_virtual_ones() {
    let mut s = Stack::new(Config::default());
    s.set_vnat(vnat_table("10.96.0.0/12", "240.0.0.0/12"));
    let virt = "240.0.0.10:80";
    s.input(&Seg::syn(APP, virt).build(), t(0)).unwrap();
    let Some(Event::TcpConnect { id, dst, .. }) = s.poll_event() else { panic!("no connect event") };
    assert_eq!(dst.to_string(), SVC, "the manager dials the cluster address");
    s.dial_result(id, DialOutcome::Connected, t(1)).unwrap();
    let synack = parse(&s.transmit().expect("syn-ack")).unwrap();
    assert_eq!(synack.endpoints().unwrap().0.to_string(), virt, "the laptop sees the address it used");
    // UDP: the flow is opened to the cluster address, replies come from the virtual one.
    while s.poll_event().is_some() {}
    let pkt = wire::udp_packet(APP.parse().unwrap(), "240.0.0.30:7".parse().unwrap(), b"q").unwrap();
    s.input(&pkt, t(2)).unwrap();
    let Some(Event::UdpOpen { id, dst, .. }) = s.poll_event() else { panic!("no udp open") };
    assert_eq!(dst.to_string(), "10.96.0.30:7");
    while s.poll_event().is_some() {}
    s.udp_send(id, b"echo", t(3)).unwrap();
    let reply = parse(&s.transmit().unwrap()).unwrap();
    assert_eq!(reply.endpoints().unwrap().0.to_string(), "240.0.0.30:7");
    // Addresses outside every virtual range are not touched.
    s.input(&Seg::syn(APP, SVC).build(), t(4)).unwrap();
    let Some(Event::TcpConnect { dst, .. }) = s.poll_event() else { panic!("no connect event") };
    assert_eq!(dst.to_string(), SVC);
}

/// A table mapping `cluster` onto `virt` (through the planner, as the daemon makes it).
fn vnat_table(cluster: &str, virt: &str) -> tpvpn_vnat::Table {
    let c = tpvpn_vnat::parse_subnet(cluster).unwrap();
    let pool = tpvpn_vnat::Pool::new(vec![tpvpn_vnat::parse_subnet(virt).unwrap()]);
    let t = tpvpn_vnat::plan(&tpvpn_vnat::Table::default(), &[c], &[], &pool, tpvpn_vnat::Mode::Always).unwrap();
    assert_eq!(t.virtual_of(&c).map(|v| v.to_string()).as_deref(), Some(virt));
    t
}
