//! Packet summaries and the few packets the netstack builds itself (TCP RST for a
//! refused dial, ICMP destination-unreachable, UDP replies), all through
//! `smoltcp::wire` views.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    checksum, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

use crate::Error;

/// IP protocol numbers the netstack handles.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// Hop limit of packets the netstack builds.
const HOP_LIMIT: u8 = 64;

/// Length of the `virtio_net_hdr` before every packet on a TUN device opened with
/// `IFF_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the device completes the checksum.
const VNET_NEEDS_CSUM: u8 = 1;
/// Offset of the checksum field in a TCP header.
const TCP_CHECKSUM_AT: usize = 16;

/// What the netstack needs to know about a packet from the TUN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (IPv4 protocol, IPv6 next header), kept whatever it is.
    pub protocol: u8,
    pub transport: Transport,
}

/// The transport header of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp(TcpInfo),
    /// A UDP datagram; `payload` is the byte range of its payload in the IP packet.
    Udp {
        src_port: u16,
        dst_port: u16,
        payload: (usize, usize),
    },
    /// Any other protocol (ICMP, SCTP, IPv6 extension headers, ...).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    pub src_port: u16,
    pub dst_port: u16,
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub ack_number: u32,
    /// Sequence space the segment occupies (payload, plus one for SYN and for FIN).
    pub seg_len: u32,
}

impl PacketInfo {
    /// Source and destination as socket addresses, for TCP and UDP.
    pub fn endpoints(&self) -> Option<(SocketAddr, SocketAddr)> {
        let (sp, dp) = match self.transport {
            Transport::Tcp(t) => (t.src_port, t.dst_port),
            Transport::Udp { src_port, dst_port, .. } => (src_port, dst_port),
            Transport::Other => return None,
        };
        Some((SocketAddr::new(self.src, sp), SocketAddr::new(self.dst, dp)))
    }
}

/// Parses the IP and transport headers of `packet`. Never panics; anything that is not a
/// whole IPv4/IPv6 packet is an error, an unknown transport is [`Transport::Other`].
pub fn parse(packet: &[u8]) -> Result<PacketInfo, Error> {
    let version = packet.first().ok_or(Error::Malformed("empty packet"))? >> 4;
    let (src, dst, protocol, offset, len) = match version {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).map_err(|_| Error::Malformed("ipv4 header"))?;
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Err(Error::Unsupported("ipv4 fragment"));
            }
            let hl = usize::from(ip.header_len());
            let total = usize::from(ip.total_len());
            (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()), u8::from(ip.next_header()), hl, total - hl)
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).map_err(|_| Error::Malformed("ipv6 header"))?;
            (
                IpAddr::V6(ip.src_addr()),
                IpAddr::V6(ip.dst_addr()),
                u8::from(ip.next_header()),
                smoltcp::wire::IPV6_HEADER_LEN,
                usize::from(ip.payload_len()),
            )
        }
        _ => return Err(Error::Malformed("ip version")),
    };
    let payload = &packet[offset..offset + len];
    let transport = match protocol {
        TCP => {
            let tcp = TcpPacket::new_checked(payload).map_err(|_| Error::Malformed("tcp header"))?;
            let data_len = payload.len() - usize::from(tcp.header_len());
            let seg_len = data_len as u32 + u32::from(tcp.syn()) + u32::from(tcp.fin());
            Transport::Tcp(TcpInfo {
                src_port: tcp.src_port(),
                dst_port: tcp.dst_port(),
                syn: tcp.syn(),
                ack: tcp.ack(),
                rst: tcp.rst(),
                fin: tcp.fin(),
                seq: tcp.seq_number().0 as u32,
                ack_number: tcp.ack_number().0 as u32,
                seg_len,
            })
        }
        UDP => {
            let udp = UdpPacket::new_checked(payload).map_err(|_| Error::Malformed("udp header"))?;
            let start = offset + smoltcp::wire::UDP_HEADER_LEN;
            let end = offset + usize::from(udp.len());
            Transport::Udp { src_port: udp.src_port(), dst_port: udp.dst_port(), payload: (start, end) }
        }
        _ => Transport::Other,
    };
    Ok(PacketInfo { src, dst, protocol, transport })
}

/// Where the TCP header of `packet` starts and the sum of its pseudo-header, if
/// `packet` is a whole, unfragmented TCP packet.
fn tcp_segment(packet: &[u8]) -> Option<(usize, u16)> {
    let info = parse(packet).ok()?;
    if !matches!(info.transport, Transport::Tcp(_)) {
        return None;
    }
    // `parse` checked both headers and the lengths.
    let length = |at: usize| usize::from(u16::from_be_bytes([packet[at], packet[at + 1]]));
    let (start, len) = match info.src {
        IpAddr::V4(_) => {
            let hl = usize::from(packet[0] & 0x0f) * 4;
            (hl, length(2) - hl)
        }
        IpAddr::V6(_) => (smoltcp::wire::IPV6_HEADER_LEN, length(4)),
    };
    let sum = checksum::pseudo_header(&info.src.into(), &info.dst.into(), IpProtocol::Tcp, len as u32);
    Some((start, sum))
}

/// Replaces the checksum of a TCP packet with the sum of its pseudo-header alone, which
/// a device with checksum offload completes (Linux's `CHECKSUM_PARTIAL`). Any other
/// packet is left as it is.
pub fn set_partial_tcp_checksum(packet: &mut [u8]) {
    if let Some((start, sum)) = tcp_segment(packet) {
        packet[start + TCP_CHECKSUM_AT..start + TCP_CHECKSUM_AT + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

/// The `virtio_net_hdr` to write before `packet` on a TUN device with checksum offload:
/// for TCP (which then carries its pseudo-header sum, see [`set_partial_tcp_checksum`])
/// "needs checksum" at the TCP checksum field; for anything else all zero, for a packet
/// whose checksums are complete. Fields are in host byte order (legacy virtio header).
pub fn vnet_header(packet: &[u8]) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    if let Some((start, _)) = tcp_segment(packet) {
        // flags, gso_type (none), hdr_len, gso_size, csum_start, csum_offset.
        h[0] = VNET_NEEDS_CSUM;
        h[2..4].copy_from_slice(&((start + TCP_CHECKSUM_AT + 2) as u16).to_ne_bytes());
        h[6..8].copy_from_slice(&(start as u16).to_ne_bytes());
        h[8..10].copy_from_slice(&(TCP_CHECKSUM_AT as u16).to_ne_bytes());
    }
    h
}

fn ip_repr(src: IpAddr, dst: IpAddr, proto: IpProtocol, payload_len: usize) -> Result<IpRepr, Error> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ok(IpRepr::Ipv4(Ipv4Repr {
            src_addr: s,
            dst_addr: d,
            next_header: proto,
            payload_len,
            hop_limit: HOP_LIMIT,
        })),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ok(IpRepr::Ipv6(Ipv6Repr {
            src_addr: s,
            dst_addr: d,
            next_header: proto,
            payload_len,
            hop_limit: HOP_LIMIT,
        })),
        _ => Err(Error::Malformed("mixed address families")),
    }
}

/// A packet buffer for `ip` with its header written; returns it and the header length.
fn with_ip_header(ip: &IpRepr, caps: &ChecksumCapabilities) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; ip.buffer_len()];
    ip.emit(&mut buf[..], caps);
    (buf, ip.header_len())
}

/// Builds the RST a host without a listener sends in answer to the segment `seg`
/// (RFC 9293, 3.10.7.1): the reply goes from `seg`'s destination back to its source.
pub fn tcp_reset_for(info: &PacketInfo, seg: &TcpInfo) -> Result<Vec<u8>, Error> {
    let (seq, ack) = if seg.ack {
        (seg.ack_number, None)
    } else {
        (0, Some(TcpSeqNumber(seg.seq.wrapping_add(seg.seg_len) as i32)))
    };
    let tcp = TcpRepr {
        src_port: seg.dst_port,
        dst_port: seg.src_port,
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack,
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = ip_repr(info.dst, info.src, IpProtocol::Tcp, tcp.buffer_len())?;
    let caps = ChecksumCapabilities::default();
    let (mut buf, hl) = with_ip_header(&ip, &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[hl..]),
        &IpAddress::from(info.dst),
        &IpAddress::from(info.src),
        &caps,
    );
    Ok(buf)
}

/// Builds an ICMP "destination unreachable" (host unreachable / address unreachable)
/// about `packet`, sent back to its source.
pub fn icmp_unreachable_for(packet: &[u8], info: &PacketInfo) -> Result<Vec<u8>, Error> {
    let caps = ChecksumCapabilities::default();
    match (info.src, info.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            let orig = Ipv4Packet::new_checked(packet).map_err(|_| Error::Malformed("ipv4 header"))?;
            let header = Ipv4Repr::parse(&orig, &caps).map_err(|_| Error::Malformed("ipv4 header"))?;
            let data = orig.payload();
            let data = &data[..data.len().min(8)];
            let icmp = Icmpv4Repr::DstUnreachable { reason: Icmpv4DstUnreachable::HostUnreachable, header, data };
            let ip = ip_repr(info.dst, info.src, IpProtocol::Icmp, icmp.buffer_len())?;
            let (mut buf, hl) = with_ip_header(&ip, &caps);
            icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[hl..]), &caps);
            Ok(buf)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let orig = Ipv6Packet::new_checked(packet).map_err(|_| Error::Malformed("ipv6 header"))?;
            let header = Ipv6Repr::parse(&orig).map_err(|_| Error::Malformed("ipv6 header"))?;
            // Quote as much of the original as fits the minimum IPv6 MTU.
            let data = orig.payload();
            let data = &data[..data.len().min(1280 - 48 - 40)];
            let icmp = Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::AddrUnreachable, header, data };
            let ip = ip_repr(info.dst, info.src, IpProtocol::Icmpv6, icmp.buffer_len())?;
            let (mut buf, hl) = with_ip_header(&ip, &caps);
            icmp.emit(&d, &s, &mut Icmpv6Packet::new_unchecked(&mut buf[hl..]), &caps);
            Ok(buf)
        }
        _ => Err(Error::Malformed("mixed address families")),
    }
}

/// Builds a UDP datagram from `src` to `dst` carrying `payload`.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let udp = UdpRepr { src_port: src.port(), dst_port: dst.port() };
    let udp_len = udp.header_len() + payload.len();
    if udp_len > usize::from(u16::MAX) {
        return Err(Error::Unsupported("udp payload larger than 65527 bytes"));
    }
    let ip = ip_repr(src.ip(), dst.ip(), IpProtocol::Udp, udp_len)?;
    let caps = ChecksumCapabilities::default();
    let (mut buf, hl) = with_ip_header(&ip, &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut buf[hl..]),
        &IpAddress::from(src.ip()),
        &IpAddress::from(dst.ip()),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &caps,
    );
    Ok(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TCP segment template: builds packets with every field under the test's control.
    pub(crate) struct Seg {
        pub src: SocketAddr,
        pub dst: SocketAddr,
        pub control: TcpControl,
        pub seq: u32,
        pub ack: Option<u32>,
        pub payload: Vec<u8>,
        pub mss: Option<u16>,
    }

    impl Seg {
        pub fn syn(src: &str, dst: &str) -> Seg {
            Seg {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                control: TcpControl::Syn,
                seq: 1000,
                ack: None,
                payload: vec![],
                mss: Some(1400),
            }
        }

        pub fn build(&self) -> Vec<u8> {
            let tcp = TcpRepr {
                src_port: self.src.port(),
                dst_port: self.dst.port(),
                control: self.control,
                seq_number: TcpSeqNumber(self.seq as i32),
                ack_number: self.ack.map(|a| TcpSeqNumber(a as i32)),
                window_len: 64000,
                window_scale: None,
                max_seg_size: self.mss,
                sack_permitted: false,
                sack_ranges: [None; 3],
                timestamp: None,
                payload: &self.payload,
            };
            let ip = ip_repr(self.src.ip(), self.dst.ip(), IpProtocol::Tcp, tcp.buffer_len()).unwrap();
            let caps = ChecksumCapabilities::default();
            let (mut buf, hl) = with_ip_header(&ip, &caps);
            tcp.emit(
                &mut TcpPacket::new_unchecked(&mut buf[hl..]),
                &IpAddress::from(self.src.ip()),
                &IpAddress::from(self.dst.ip()),
                &caps,
            );
            buf
        }
    }

    #[test]
    fn partial_tcp_checksums_are_completed_as_a_device_would() {
        for (s, d) in [("10.0.0.1:1234", "10.96.0.1:80"), ("[fd00::1]:1234", "[fd00::2]:80")] {
            for len in [0usize, 1, 2, 1399, 60_001] {
                let mut seg = Seg::syn(s, d);
                seg.control = TcpControl::Psh;
                seg.ack = Some(7);
                seg.payload = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let full = seg.build();
                let mut pkt = full.clone();
                set_partial_tcp_checksum(&mut pkt);
                let h = vnet_header(&pkt);
                assert_eq!(h[0], VNET_NEEDS_CSUM);
                let field = |h: &[u8], i: usize| usize::from(u16::from_ne_bytes([h[i], h[i + 1]]));
                let (start, offset) = (field(&h, 6), field(&h, 8));
                // What the kernel does for CHECKSUM_PARTIAL: sum from csum_start to the end,
                // complement, store at csum_start + csum_offset.
                let done = !checksum::data(&pkt[start..]);
                pkt[start + offset..start + offset + 2].copy_from_slice(&done.to_be_bytes());
                assert_eq!(pkt, full, "{s} -> {d}, {len} bytes");
                assert!(field(&h, 2) >= start + offset + 2, "hdr_len covers the checksum field");
            }
        }
    }

    #[test]
    fn only_tcp_gets_a_partial_checksum() {
        let udp = udp_packet("10.0.0.1:53".parse().unwrap(), "10.0.0.2:9".parse().unwrap(), b"hi").unwrap();
        let mut pkt = udp.clone();
        set_partial_tcp_checksum(&mut pkt);
        assert_eq!(pkt, udp);
        assert_eq!(vnet_header(&udp), [0; VNET_HDR_LEN]);
        let mut junk = vec![0x45, 0, 0, 20];
        set_partial_tcp_checksum(&mut junk);
        assert_eq!(vnet_header(&junk), [0; VNET_HDR_LEN]);
    }

    #[test]
    fn parses_tcp_syn_v4_and_v6() {
        for (s, d) in [("10.0.0.1:1234", "10.96.0.1:80"), ("[fd00::1]:1234", "[fd00::2]:80")] {
            let pkt = Seg::syn(s, d).build();
            let info = parse(&pkt).unwrap();
            let (src, dst) = info.endpoints().unwrap();
            assert_eq!((src.to_string(), dst.to_string()), (s.to_string(), d.to_string()));
            let Transport::Tcp(t) = info.transport else { panic!("not tcp") };
            assert!(t.syn && !t.ack && !t.rst);
            assert_eq!((t.seq, t.seg_len), (1000, 1));
        }
    }

    #[test]
    fn rst_for_syn_acknowledges_it() {
        let pkt = Seg::syn("10.0.0.1:1234", "10.96.0.1:81").build();
        let info = parse(&pkt).unwrap();
        let Transport::Tcp(t) = info.transport else { panic!() };
        let rst = parse(&tcp_reset_for(&info, &t).unwrap()).unwrap();
        assert_eq!(rst.src, info.dst);
        let Transport::Tcp(r) = rst.transport else { panic!() };
        assert!(r.rst && r.ack);
        assert_eq!((r.src_port, r.dst_port, r.ack_number), (81, 1234, 1001));
    }

    #[test]
    fn udp_round_trip_and_icmp() {
        let pkt = udp_packet("10.96.0.53:53".parse().unwrap(), "10.0.0.1:5000".parse().unwrap(), b"abc").unwrap();
        let info = parse(&pkt).unwrap();
        let Transport::Udp { src_port, dst_port, payload } = info.transport else { panic!() };
        assert_eq!((src_port, dst_port, &pkt[payload.0..payload.1]), (53, 5000, &b"abc"[..]));
        let icmp = icmp_unreachable_for(&pkt, &info).unwrap();
        let icmp_info = parse(&icmp).unwrap();
        assert_eq!((icmp_info.protocol, icmp_info.dst), (1, info.src));
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[0x45]).is_err());
        assert!(parse(&[0x75; 40]).is_err());
        let mut pkt = Seg::syn("10.0.0.1:1", "10.0.0.2:2").build();
        pkt.truncate(30);
        assert!(parse(&pkt).is_err());
    }
}
