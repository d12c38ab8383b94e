//! Invariants checked by the fuzz targets (`cargo fuzz run <target>`, nightly) and by
//! this crate's tests over a generated corpus (`cargo test --no-default-features`,
//! stable). Each check asserts more than "no panic".

use hickory_proto::op::{Message as DnsMessage, MessageType};
use tpvpn_netstack::{wire, Config, DialOutcome, Event, Instant, Stack};
use tpvpn_resolver::{Action, Psl, Resolver, Transport};
use tpvpn_tunnel::datagram::Datagram;
use tpvpn_tunnel::handshake::{ClientHandshake, ClientStep, Hello, ServerHandshake, ServerStep, TokenKind};
use tpvpn_tunnel::{ErrorCode, Message, Role, UdpRecord, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Tunnel frames: whatever parses re-encodes to the exact bytes it was parsed from, and
/// a parse never claims more bytes than it was given. Same for datagrams and records.
pub fn tunnel_frames(data: &[u8]) {
    let mut pos = 0;
    while pos < data.len() {
        match Message::decode(&data[pos..]) {
            Ok(Some((msg, used))) => {
                assert!(used > 0 && pos + used <= data.len());
                // Whatever parses fits a frame when encoded again.
                let again = msg.to_vec().expect("a parsed message encodes");
                // Canonical encodings round-trip byte for byte.
                assert_eq!(Message::decode(&again), Ok(Some((msg.clone(), again.len()))));
                if again.len() == used {
                    assert_eq!(&again[..], &data[pos..pos + used]);
                }
                pos += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Ok(d) = Datagram::parse(data) {
        assert!(d.payload.len() < data.len() || data.is_empty());
        let mut out = Vec::new();
        d.emit(&mut out);
        assert_eq!(Datagram::parse(&out), Ok(d));
    }
    if let Some((r, used)) = UdpRecord::decode(data) {
        assert_eq!(used, r.payload.len() + UdpRecord::HEADER_LEN);
        assert!(used <= data.len());
    }
}

/// Netstack input: a packet either parses or is rejected with an error that leaves the
/// stack empty; every packet the stack emits in answer parses back, is addressed to the
/// packet's source, and the stack never emits for a rejected packet. For checksum
/// offload: only a TCP packet gets a virtio header asking for a checksum, pointing inside
/// the packet, and marking it partial changes nothing but its two checksum bytes.
pub fn netstack_packets(data: &[u8]) {
    offload_headers(data);
    let mut stack = Stack::new(Config::default());
    let parsed = wire::parse(data);
    let result = stack.input(data, Instant::from_millis(0));
    // Unparsable packets are rejected as such; parsable ones only as unsupported
    // (not TCP or UDP, or TCP without unicast ends).
    match (&parsed, &result) {
        (Err(_), r) => assert!(r.is_err(), "accepted an unparsable packet"),
        (Ok(i), Ok(())) => assert!(i.endpoints().is_some(), "accepted a packet without ports"),
        (Ok(_), Err(e)) => assert!(matches!(e, tpvpn_netstack::Error::Unsupported(_)), "{e}"),
    }
    if result.is_err() {
        assert!(stack.transmit().is_none() && stack.poll_event().is_none());
        assert_eq!(stack.flow_counts(), (0, 0));
        return;
    }
    let info = parsed.expect("checked above");
    // Accept any TCP flow it opened, so the SYN reaches smoltcp too.
    while let Some(ev) = stack.poll_event() {
        if let Event::TcpConnect { id, .. } = ev {
            stack.dial_result(id, DialOutcome::Connected, Instant::from_millis(1)).expect("pending flow");
        }
    }
    while let Some(out) = stack.transmit() {
        let reply = wire::parse(&out).expect("the stack emits only well-formed packets");
        assert_eq!(reply.dst, info.src, "replies go back to the sender");
    }
}

fn offload_headers(data: &[u8]) {
    let tcp = matches!(wire::parse(data), Ok(i) if matches!(i.transport, wire::Transport::Tcp(_)));
    let h = wire::vnet_header(data);
    let mut partial = data.to_vec();
    wire::set_partial_tcp_checksum(&mut partial);
    if !tcp {
        assert_eq!(h, [0; wire::VNET_HDR_LEN], "a header for a packet that is not TCP");
        assert_eq!(partial, data, "changed a packet that is not TCP");
        return;
    }
    let field = |i: usize| usize::from(u16::from_ne_bytes([h[i], h[i + 1]]));
    let at = field(6) + field(8);
    assert!(h[0] == 1 && at + 2 <= data.len() && field(2) >= at + 2, "bad header {h:?}");
    let changed: Vec<usize> = (0..data.len()).filter(|&i| partial[i] != data[i]).collect();
    assert!(changed.iter().all(|&i| i == at || i == at + 1), "changed bytes {changed:?}, checksum at {at}");
}

/// Structure-aware: a message built from `data` (every kind, every field), encoded and
/// decoded again, is the same message and uses every byte; a message too large for a
/// frame is refused by `emit`, never cut.
pub fn messages(data: &[u8]) {
    let mut u = arbitrary::Unstructured::new(data);
    let Ok(m) = gen::message(&mut u) else { return };
    match m.to_vec() {
        Ok(bytes) => {
            let (back, used) = Message::decode(&bytes).expect("what emit wrote decodes").expect("a whole frame");
            assert_eq!(used, bytes.len());
            assert_eq!(back, m);
        }
        Err(e) => assert!(
            matches!(e, tpvpn_tunnel::Error::TooLong(_) | tpvpn_tunnel::Error::Malformed { .. }),
            "emit failed with {e}"
        ),
    }
}

/// Messages from unstructured bytes, in the canonical form `parse` gives (raw codes that
/// name a known value are that value).
mod gen {
    use std::net::{IpAddr, SocketAddr};

    use arbitrary::{Result, Unstructured};
    use tpvpn_tunnel::files::{FileAnswer, FileAttr, FileFailure, FileKind, FileOp};
    use tpvpn_tunnel::{
        ClusterInfo, ErrorCode, FlowStatus, InterceptRow, InterceptState, InterceptTarget, Message, Protocol, Role,
        ServiceInfo, ServicePort,
    };

    fn ip(u: &mut Unstructured) -> Result<IpAddr> {
        Ok(if u.arbitrary()? {
            IpAddr::V4(u.arbitrary::<[u8; 4]>()?.into())
        } else {
            IpAddr::V6(u.arbitrary::<[u8; 16]>()?.into())
        })
    }

    fn addr(u: &mut Unstructured) -> Result<SocketAddr> {
        Ok(SocketAddr::new(ip(u)?, u.arbitrary()?))
    }

    fn strings(u: &mut Unstructured) -> Result<Vec<String>> {
        let n = u.int_in_range(0..=8)?;
        (0..n).map(|_| u.arbitrary()).collect()
    }

    fn pairs(u: &mut Unstructured) -> Result<Vec<(String, String)>> {
        let n = u.int_in_range(0..=8)?;
        (0..n).map(|_| Ok((u.arbitrary()?, u.arbitrary()?))).collect()
    }

    fn service(u: &mut Unstructured) -> Result<ServiceInfo> {
        let ips = u.int_in_range(0..=3)?;
        let ports = u.int_in_range(0..=3)?;
        Ok(ServiceInfo {
            namespace: u.arbitrary()?,
            name: u.arbitrary()?,
            cluster_ips: (0..ips).map(|_| ip(u)).collect::<Result<_>>()?,
            ports: (0..ports)
                .map(|_| {
                    Ok(ServicePort {
                        name: u.arbitrary()?,
                        protocol: Protocol::from(u.arbitrary::<u8>()?),
                        port: u.arbitrary()?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    fn services(u: &mut Unstructured) -> Result<Vec<ServiceInfo>> {
        let n = u.int_in_range(0..=4)?;
        (0..n).map(|_| service(u)).collect()
    }

    fn cluster(u: &mut Unstructured) -> Result<ClusterInfo> {
        let n = u.int_in_range(0..=4)?;
        let mut cidrs = Vec::new();
        for _ in 0..n {
            let a = ip(u)?;
            let max = if a.is_ipv4() { 32 } else { 128 };
            cidrs.push(ipnet::IpNet::new(a, u.int_in_range(0..=max)?).expect("prefix in range"));
        }
        Ok(ClusterInfo { cidrs, dns: if u.arbitrary()? { Some(ip(u)?) } else { None }, domain: u.arbitrary()? })
    }

    fn role(u: &mut Unstructured) -> Result<Role> {
        Ok(match u.arbitrary::<u8>()? {
            0 => Role::Client,
            1 => Role::Agent { node: u.arbitrary()? },
            2 => Role::Intercepts,
            o => Role::Other(o),
        })
    }

    /// File attributes in the canonical form (`mode` within `0o7777`).
    fn file_attr(u: &mut Unstructured) -> Result<FileAttr> {
        Ok(FileAttr {
            kind: FileKind::from(u.int_in_range(1..=4)?),
            size: u.arbitrary()?,
            mode: u.arbitrary::<u32>()? & 0o7777,
            mtime: u.arbitrary()?,
        })
    }

    pub fn message(u: &mut Unstructured) -> Result<Message> {
        Ok(match u.int_in_range(0..=27)? {
            0 => Message::ClientHello { version: u.arbitrary()?, token: u.arbitrary()? },
            1 => Message::ServerHello { version: u.arbitrary()?, cluster: cluster(u)? },
            2 => Message::ClusterUpdate { cluster: cluster(u)? },
            3 => Message::Namespaces { names: strings(u)? },
            4 => Message::Services { services: services(u)? },
            5 => Message::Error {
                code: ErrorCode::from(u.arbitrary::<u16>()?),
                version: u.arbitrary()?,
                message: u.arbitrary()?,
            },
            6 => Message::FlowOpen {
                protocol: Protocol::from(u.arbitrary::<u8>()?),
                flow_id: u.arbitrary()?,
                src: addr(u)?,
                dst: addr(u)?,
            },
            7 => Message::FlowReply { status: FlowStatus::from(u.arbitrary::<u8>()?), message: u.arbitrary()? },
            8 => Message::DnsQuery { query: u.arbitrary()? },
            9 => Message::DnsAnswer { answer: u.arbitrary()? },
            10 => Message::ClientInfo {
                min_version: u.arbitrary()?,
                role: role(u)?,
                user: u.arbitrary()?,
                host: u.arbitrary()?,
                client_id: u.arbitrary()?,
                features: u.arbitrary()?,
            },
            11 => Message::ServerInfo {
                min_version: u.arbitrary()?,
                max_version: u.arbitrary()?,
                features: u.arbitrary()?,
            },
            12 => Message::CatalogChunk {
                reset: u.arbitrary()?,
                complete: u.arbitrary()?,
                namespaces_added: strings(u)?,
                namespaces_removed: strings(u)?,
                services: services(u)?,
                services_removed: pairs(u)?,
            },
            13 => Message::InterceptRequest {
                namespace: u.arbitrary()?,
                service: u.arbitrary()?,
                port: u.arbitrary()?,
                local_port: u.arbitrary()?,
                container: u.arbitrary()?,
                matchers: tpvpn_tunnel::Matchers { headers: pairs(u)?, path_prefix: u.arbitrary()? },
            },
            14 => {
                let n = u.int_in_range(0..=3)?;
                Message::InterceptReply {
                    id: u.arbitrary()?,
                    service_port: u.arbitrary()?,
                    targets: (0..n)
                        .map(|_| Ok(InterceptTarget { pod: u.arbitrary()?, addr: addr(u)?, meshed: u.arbitrary()? }))
                        .collect::<Result<_>>()?,
                    env: pairs(u)?,
                    warnings: strings(u)?,
                }
            }
            15 if u.arbitrary()? => Message::Leave { namespace: u.arbitrary()?, service: u.arbitrary()? },
            15 => Message::Revoke { namespace: u.arbitrary()?, service: u.arbitrary()? },
            16 if u.arbitrary()? => Message::Ack { message: u.arbitrary()? },
            16 => Message::Renew { certificate: u.arbitrary()?, proof: u.arbitrary()? },
            17 => Message::InterceptOpen { id: u.arbitrary()?, src: addr(u)?, dst: addr(u)? },
            18 => Message::InterceptList,
            19 => {
                let n = u.int_in_range(0..=4)?;
                Message::InterceptTable {
                    rows: (0..n)
                        .map(|_| {
                            Ok(InterceptRow {
                                namespace: u.arbitrary()?,
                                service: u.arbitrary()?,
                                state: InterceptState::from(u.arbitrary::<u8>()?),
                                holder: u.arbitrary()?,
                                port: u.arbitrary()?,
                                since: u.arbitrary()?,
                                mine: u.arbitrary()?,
                            })
                        })
                        .collect::<Result<_>>()?,
                }
            }
            20 => Message::Capture {
                id: u.arbitrary()?,
                pod_namespace: u.arbitrary()?,
                pod_name: u.arbitrary()?,
                pod_ip: ip(u)?,
                port: u.arbitrary()?,
                host_ip: if u.arbitrary()? { Some(ip(u)?) } else { None },
                container: u.arbitrary()?,
                container_id: u.arbitrary()?,
                matchers: tpvpn_tunnel::Matchers { headers: pairs(u)?, path_prefix: u.arbitrary()? },
            },
            21 => Message::Release { id: u.arbitrary()? },
            22 => Message::CaptureStatus {
                id: u.arbitrary()?,
                ok: u.arbitrary()?,
                message: u.arbitrary()?,
                meshed: u.arbitrary()?,
                env: pairs(u)?,
            },
            23 => Message::FilesOpen {
                namespace: u.arbitrary()?,
                service: u.arbitrary()?,
                container_id: u.arbitrary()?,
                mounts: strings(u)?,
                writable: strings(u)?,
                handles: u.arbitrary()?,
            },
            24 => Message::FileRequest {
                id: u.arbitrary()?,
                path: u.arbitrary()?,
                op: match u.int_in_range(0..=15)? {
                    0 => FileOp::Stat,
                    1 => FileOp::ReadDir { from: u.arbitrary()? },
                    2 => FileOp::Read { offset: u.arbitrary()?, len: u.arbitrary()? },
                    3 => FileOp::Write { offset: u.arbitrary()?, data: u.arbitrary()? },
                    4 => FileOp::Create { mode: u.arbitrary()? },
                    5 => FileOp::MakeDir { mode: u.arbitrary()? },
                    6 => FileOp::Remove,
                    7 => FileOp::RemoveDir,
                    8 => FileOp::Rename { to: u.arbitrary()? },
                    9 => FileOp::SetAttr { size: u.arbitrary()?, mode: u.arbitrary()?, mtime: u.arbitrary()? },
                    10 => FileOp::Sync,
                    11 => FileOp::Open { write: u.arbitrary()?, read: u.arbitrary()? },
                    12 => FileOp::ReadOpen { handle: u.arbitrary()?, offset: u.arbitrary()?, len: u.arbitrary()? },
                    13 => FileOp::WriteOpen { handle: u.arbitrary()?, offset: u.arbitrary()?, data: u.arbitrary()? },
                    14 => FileOp::Close { handle: u.arbitrary()? },
                    _ => FileOp::ReadLink,
                },
            },
            25 => Message::FileReply {
                id: u.arbitrary()?,
                answer: match u.int_in_range(0..=6)? {
                    0 => FileAnswer::Attr(file_attr(u)?),
                    5 => FileAnswer::Opened { handle: u.arbitrary()?, attr: file_attr(u)?, data: u.arbitrary()? },
                    4 => FileAnswer::Done,
                    1 => {
                        let n = u.int_in_range(0..=4)?;
                        FileAnswer::Entries {
                            entries: (0..n).map(|_| Ok((u.arbitrary()?, file_attr(u)?))).collect::<Result<_>>()?,
                            next: u.arbitrary()?,
                        }
                    }
                    2 => FileAnswer::Data(u.arbitrary()?),
                    3 => FileAnswer::Target(u.arbitrary()?),
                    _ => {
                        FileAnswer::Failed { failure: FileFailure::from(u.arbitrary::<u8>()?), message: u.arbitrary()? }
                    }
                },
            },
            26 => Message::FilesReady { message: u.arbitrary()?, handles: u.arbitrary()? },
            // Frame types no version has used yet: kept whole.
            _ => Message::Unknown { frame_type: u.int_in_range(0x54..=0x7f)?, payload: u.arbitrary()? },
        })
    }
}

/// The hello, both sides, fed the frames `data` holds: the manager accepts only a peer
/// that presented the token of its role and a version both speak; a refusal is always an
/// `Error` frame; the client accepts only a version it offered, and nothing panics.
pub fn handshakes(data: &[u8]) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while let Ok(Some((m, used))) = Message::decode(&data[pos..]) {
        frames.push(m);
        pos += used;
    }
    let tokens = |t: &[u8]| match t {
        b"client-token" => Some(TokenKind::Client),
        b"agent-token" => Some(TokenKind::Agent),
        _ => None,
    };
    let mut server = ServerHandshake::new((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), 0);
    let mut presented: Option<(Vec<u8>, u16)> = None;
    for m in &frames {
        if let Message::ClientHello { version, token } = m {
            presented.get_or_insert((token.clone(), *version));
        }
        match server.on_message(m.clone(), tokens) {
            ServerStep::NeedMore => continue,
            ServerStep::Accept(peer) => {
                let (token, offered) = presented.clone().expect("accepted without a ClientHello");
                let kind = tokens(&token).expect("accepted without a valid token");
                assert!(
                    peer.version.number() >= MIN_PROTOCOL_VERSION
                        && peer.version.number() <= PROTOCOL_VERSION.min(offered)
                );
                match (&peer.role, kind) {
                    (Role::Client | Role::Intercepts, TokenKind::Client) => {}
                    (Role::Agent { node }, TokenKind::Agent) => assert!(!node.is_empty()),
                    other => panic!("accepted {other:?}"),
                }
                let frames = server.accept_frames(peer.version, Default::default());
                assert!(matches!(frames[0], Message::ServerHello { version, .. } if version == peer.version.number()));
                break;
            }
            ServerStep::Refuse { reply } => {
                assert!(matches!(reply, Message::Error { .. }), "{reply:?}");
                break;
            }
            ServerStep::Invalid(_) => break,
        }
    }
    let offered = (1, 2);
    let mut client = ClientHandshake::new(Hello {
        token: b"client-token".to_vec(),
        role: Role::Client,
        user: String::new(),
        host: String::new(),
        client_id: vec![],
        features: 0,
        versions: offered,
    });
    for m in frames {
        match client.on_message(m) {
            ClientStep::NeedMore => continue,
            ClientStep::Accepted(a) => {
                assert!(a.version.number() >= offered.0 && a.version.number() <= offered.1, "accepted {}", a.version);
                break;
            }
            ClientStep::Retry { version } => {
                assert!(version >= offered.0 && version < offered.1);
                break;
            }
            ClientStep::Refused(r) => {
                if r.code == ErrorCode::VersionMismatch {
                    assert!(!client.upgrade_hint(&r).is_empty());
                }
                break;
            }
            ClientStep::Invalid(_) => break,
        }
    }
}

thread_local! {
    /// One resolver with a small table, built once (parsing the suffix list is slow).
    static RESOLVER: std::cell::RefCell<Resolver> = std::cell::RefCell::new({
        let mut r = Resolver::new(tpvpn_resolver::Config::default(), Psl::embedded());
        r.set_namespaces(vec!["default".into(), "rs".into()]);
        r.set_services(vec![tpvpn_tunnel::ServiceInfo {
            namespace: "default".into(),
            name: "frontend".into(),
            cluster_ips: vec!["10.96.0.10".parse().expect("literal")],
            ports: vec![tpvpn_tunnel::ServicePort { name: "http".into(), protocol: tpvpn_tunnel::Protocol::Tcp, port: 80 }],
        }]);
        r
    });
}

/// DNS queries to the resolver's request path: every query that parses gets either a
/// well-formed response with the same id and question, or is sent on (cluster, upstream)
/// as a well-formed query; nothing parsable is dropped, and nothing panics. The same
/// query again under another id (answered from the remembered table replies) gets the
/// same reply with that id.
pub fn dns_queries(data: &[u8]) {
    let parsed = DnsMessage::from_vec(data).ok();
    let ask = |packet: &[u8], transport| {
        RESOLVER.with(|r| r.borrow_mut().query(packet, transport, std::time::Instant::now()))
    };
    for transport in [Transport::Udp, Transport::Tcp] {
        let action = ask(data, transport);
        if let (Action::Reply(first), Some(id)) = (&action, data.get(..2)) {
            let mut again = data.to_vec();
            again[..2].copy_from_slice(&(!u16::from_be_bytes([id[0], id[1]])).to_be_bytes());
            match ask(&again, transport) {
                Action::Reply(second) => {
                    assert_eq!(second.get(2..), first.get(2..), "a repeated query gets the same reply");
                    assert_eq!(second.get(..2), Some(&again[..2]), "under its own id");
                }
                other => panic!("a repeated query got {other:?} instead of a reply"),
            }
        }
        match action {
            Action::Reply(bytes) => {
                let reply = DnsMessage::from_vec(&bytes).expect("replies parse");
                assert_eq!(reply.metadata.message_type, MessageType::Response);
                if let Some(q) = &parsed {
                    assert_eq!(reply.metadata.id, q.metadata.id, "same id");
                    if q.queries.len() == 1 && reply.queries.len() == 1 {
                        assert_eq!(reply.queries[0].name(), q.queries[0].name(), "same question");
                    }
                }
            }
            Action::Cluster { query, .. } => {
                let q = DnsMessage::from_vec(&query).expect("cluster queries parse");
                assert_eq!(q.queries.len(), 1);
            }
            Action::Upstream => assert!(parsed.is_some(), "only parsable queries go upstream"),
            Action::Drop => {
                if let Some(q) = &parsed {
                    assert_eq!(q.metadata.message_type, MessageType::Response, "a parsable query was dropped");
                }
            }
        }
        // The SERVFAIL of a query not carried out (too many in flight): for every
        // parsable query, a response under its id.
        match (tpvpn_resolver::Resolver::servfail(data, transport), &parsed) {
            (Some(bytes), Some(q)) => {
                let reply = DnsMessage::from_vec(&bytes).expect("servfail replies parse");
                assert_eq!(reply.metadata.message_type, MessageType::Response);
                assert_eq!(reply.metadata.id, q.metadata.id, "same id");
            }
            (Some(_), None) => panic!("a servfail for what does not parse"),
            (None, Some(q)) => assert_eq!(q.metadata.message_type, MessageType::Response, "no servfail for a query"),
            (None, None) => {}
        }
    }
}

/// The laptop's system texts, as the daemon reads them: resolv.conf (tpvpn's own file
/// carries the original byte for byte, and its only nameserver is tpvpn's), `netstat -rn`
/// output (every route parsed is a network address), and kubeconfigs with tpvpn's
/// extension (accepted, or refused with a message); on the node, the kernel's socket
/// diagnostics answers ([`tpvpn_agent::sockdiag::parse_reply`]).
pub fn system_texts(data: &[u8]) {
    use tpvpn_client::cluster::kubeconfig;
    use tpvpn_client::os::{macos, osdns};
    let text = String::from_utf8_lossy(data);
    let server: std::net::IpAddr = "198.18.0.2".parse().unwrap();
    let _ = osdns::parse(&text);
    let ours = osdns::render(server, &["default.svc.cluster.local".into()], &text);
    assert_eq!(osdns::original_of(&ours), text, "tpvpn's resolv.conf carries the original");
    assert_eq!(osdns::parse(&ours).nameservers, vec![server], "tpvpn's resolv.conf names only tpvpn");
    for r in macos::parse_netstat(&text) {
        assert_eq!(r.dst, r.dst.trunc(), "a parsed route is a network address");
        assert!(!r.netif.is_empty());
    }
    // The kernel's socket-diagnostics answer, as the node agent reads it: taken, free or
    // an error, and "no such socket" is free.
    let _ = tpvpn_agent::sockdiag::parse_reply(data);
    if data.len() >= 20
        && u16::from_ne_bytes([data[4], data[5]]) == 2
        && i32::from_ne_bytes([data[16], data[17], data[18], data[19]]) == -2
    {
        assert!(!tpvpn_agent::sockdiag::parse_reply(data).unwrap(), "ENOENT is a free tuple");
    }
    if let Ok(k) = kube::config::Kubeconfig::from_yaml(&text) {
        for c in k.clusters.iter().filter_map(|c| c.cluster.as_ref()) {
            if let Err(e) = kubeconfig::parse_extensions(c.extensions.as_deref().unwrap_or(&[])) {
                assert!(!e.is_empty(), "a refused extension says why");
            }
        }
    }
}

/// QUIC packets on a byte stream (the port-forward carrier): however the bytes arrive
/// in chunks (the first byte picks the chunk size), the packets taken off are exactly
/// the input's length-prefixed packets, in order, none empty; the rest waits in the
/// buffer; a zero length stops the stream there and nowhere else.
pub fn stream_packets(data: &[u8]) {
    use tpvpn_tunnel::stream::next_packet;
    let step = 1 + usize::from(data.first().copied().unwrap_or(0) % 64);
    let mut buf = bytes::BytesMut::new();
    let mut taken = Vec::new();
    let mut refused = false;
    'chunks: for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match next_packet(&mut buf) {
                Ok(Some(p)) => {
                    assert!(!p.is_empty(), "an empty packet was taken");
                    taken.extend_from_slice(&u16::try_from(p.len()).expect("a u16 length").to_be_bytes());
                    taken.extend_from_slice(&p);
                }
                Ok(None) => break,
                Err(_) => {
                    refused = true;
                    break 'chunks;
                }
            }
        }
    }
    assert_eq!(&data[..taken.len()], &taken[..], "the packets are not the input's");
    if refused {
        assert_eq!(&data[taken.len()..taken.len() + 2], &[0, 0], "refused without a zero length");
    } else {
        assert_eq!(taken.len() + buf.len(), data.len(), "bytes lost");
        let rest = &data[taken.len()..];
        let whole = rest.len() >= 2 && rest.len() >= 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        assert!(!whole, "a whole packet was left in the buffer");
    }
}

/// The agent's protocol sniffing of a captured connection's first bytes: decided once
/// (more bytes never change a decision, however they arrive), HTTP/2 only for the
/// preface, HTTP/1 only for a first line ending in ` HTTP/1.x`, and every input decided
/// once its first line ended or passed the bound.
pub fn http_sniff(data: &[u8]) {
    use tpvpn_agent::route::{sniff, Sniff, H2_PREFACE, REQUEST_LINE_MAX};
    let mut decided = None;
    for n in 0..=data.len() {
        let s = sniff(&data[..n]);
        match decided {
            Some(d) => assert_eq!(s, d, "the decision changed at {n} bytes"),
            None if s != Sniff::NeedMore => decided = Some(s),
            None => {}
        }
    }
    if decided == Some(Sniff::Http2) {
        assert!(data.starts_with(H2_PREFACE));
    }
    if decided == Some(Sniff::Http1) {
        let line = data.split(|&c| c == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"), "{line:?}");
    }
    let line_ended = data[..data.len().min(REQUEST_LINE_MAX + 1)].contains(&b'\n');
    let preface = data.starts_with(&H2_PREFACE[..data.len().min(H2_PREFACE.len())]);
    if data.len() > H2_PREFACE.len() && !preface && (line_ended || data.len() > REQUEST_LINE_MAX) {
        assert_ne!(sniff(data), Sniff::NeedMore, "undecided after {} bytes", data.len());
    }
}

/// A request's headers as the agent's router sees them, built from the input's lines
/// (`name: value`, those HTTP allows): declining an `Upgrade: h2c` offer removes exactly
/// that offer (the `h2c` token, `HTTP2-Settings`, their `Connection` tokens), leaves every
/// other header and token as it was, and changes nothing when done again; a personal
/// route made of one of the request's own headers matches it, and one asking for a value
/// it lacks does not. Readied for the next hop ([`tpvpn_agent::route::for_next_hop`]), a
/// request keeps no hop-by-hop header, `Expect`, header `Connection` names (but `Host`),
/// name with `_` or `TE` but `trailers`, keeps every other header as it was, keeps an
/// upgrade's `Upgrade` with `Connection: upgrade`, and is the same readied twice.
pub fn http_headers(data: &[u8]) {
    use tpvpn_agent::route::{choose, decline_h2c, for_next_hop, matches, Dest, Route};
    use tpvpn_tunnel::Matchers;
    let mut headers = http::HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    let tokens = |h: &http::HeaderMap, name: http::header::HeaderName| -> Vec<String> {
        let values = h.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
        values
            .iter()
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let (upgrade, connection) = (http::header::UPGRADE, http::header::CONNECTION);
    let mut declined = headers.clone();
    decline_h2c(&mut declined);
    let offered = tokens(&headers, upgrade.clone()).contains(&"h2c".to_string());
    if offered {
        assert!(!declined.contains_key("http2-settings"), "the settings stay");
        let left: Vec<String> = tokens(&headers, upgrade.clone()).into_iter().filter(|t| t != "h2c").collect();
        assert_eq!(tokens(&declined, upgrade.clone()), left, "other upgrades are kept");
        let gone: &[&str] = if left.is_empty() { &["http2-settings", "upgrade"] } else { &["http2-settings"] };
        let kept: Vec<String> =
            tokens(&headers, connection.clone()).into_iter().filter(|t| !gone.contains(&t.as_str())).collect();
        assert_eq!(tokens(&declined, connection.clone()), kept, "other connection tokens are kept");
    } else {
        assert_eq!(declined, headers, "nothing to decline, nothing changed");
    }
    for name in headers.keys().chain(declined.keys()) {
        if ![upgrade.clone(), connection.clone()].contains(name) && name != "http2-settings" {
            let before: Vec<_> = headers.get_all(name).iter().collect();
            let after: Vec<_> = declined.get_all(name).iter().collect();
            assert_eq!(before, after, "{name} changed");
        }
    }
    let mut twice = declined.clone();
    decline_h2c(&mut twice);
    assert_eq!(twice, declined, "declining again changes nothing");

    for upgrade in [false, true] {
        let mut next = headers.clone();
        for_next_hop(&mut next, upgrade);
        let nominated: Vec<String> = tokens(&headers, connection.clone())
            .into_iter()
            .filter(|t| t != "host" && !(upgrade && t == "upgrade"))
            .collect();
        let hop = ["connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"];
        for name in next.keys() {
            let n = name.as_str();
            assert!(!n.contains('_') && !nominated.iter().any(|t| t == n), "{n} passed");
            assert!(!hop.contains(&n) || (n == "te" || upgrade), "{n} passed");
        }
        if let Some(te) = next.get("te") {
            assert_eq!(te, "trailers");
        }
        if upgrade && next.contains_key("upgrade") {
            assert_eq!(next.get_all("connection").iter().collect::<Vec<_>>(), ["upgrade"]);
        }
        for name in headers.keys() {
            let n = name.as_str();
            if !hop.contains(&n) && !n.contains('_') && !nominated.iter().any(|t| t == n) {
                let before: Vec<_> = headers.get_all(name).iter().collect();
                assert_eq!(before, next.get_all(name).iter().collect::<Vec<_>>(), "{n} changed");
            }
        }
        let mut again = next.clone();
        for_next_hop(&mut again, upgrade);
        assert_eq!(again, next, "readied twice");
    }

    if let Some((name, value)) = headers.iter().find(|(_, v)| v.to_str().is_ok()) {
        let own = Matchers {
            headers: vec![(name.to_string(), value.to_str().unwrap().to_string())],
            path_prefix: "/".into(),
        };
        assert!(matches(&own, &headers, "/x"), "a request matches its own header");
        let mut lacking = own.clone();
        lacking.headers.push(("x-tpvpn-fuzz".into(), "absent".into()));
        let routes = [
            Route { id: 1, matchers: lacking },
            Route { id: 2, matchers: own },
            Route { id: 3, matchers: Matchers::default() },
        ];
        if !headers.contains_key("x-tpvpn-fuzz") {
            assert!(!matches(&routes[0].matchers, &headers, "/x"), "a header the request lacks never matches");
            assert_eq!(choose(&routes, &headers, "/x"), Dest::Laptop(2), "the most specific route that matches");
        }
        assert_eq!(choose(&routes, &headers, "nopath"), Dest::Laptop(3), "no personal route matches: the global one");
    }
}

/// The API server's port-forward channels ([`tpvpn_client::cluster::portforward::Channels`]), fed
/// messages cut from the input (each byte before a message gives its length): data comes
/// only from channel 0 after its opening, byte for byte what the message carried after
/// the channel byte; any channel but 0 and 1, and an opening other than the port's two
/// bytes, ends the port-forward; nothing else does.
pub fn portforward_channels(data: &[u8]) {
    use tpvpn_client::cluster::portforward::{Channels, FromPod};
    let port = 8443u16;
    let mut c = Channels::new(port);
    let mut opened = [false; 2];
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (msg, after) = tail.split_at(usize::from(len % 16).min(tail.len()));
        rest = after;
        let got = c.on_message(msg);
        let Some((&ch, payload)) = msg.split_first() else {
            assert_eq!(got, Ok(FromPod::Nothing), "an empty message carries nothing");
            continue;
        };
        match opened.get_mut(usize::from(ch)) {
            None => {
                assert!(got.is_err(), "channel {ch} was taken");
                return;
            }
            Some(o) if !*o => {
                *o = true;
                if payload == port.to_le_bytes() {
                    assert_eq!(got, Ok(FromPod::Nothing), "an opening is not data");
                } else {
                    assert!(got.is_err(), "a wrong opening was taken");
                    return;
                }
            }
            Some(_) if ch == 0 => assert_eq!(got, Ok(FromPod::Data(payload))),
            Some(_) => assert_eq!(got, Ok(FromPod::Error(payload))),
        }
    }
}

/// A path asked of the agent's container files ([`tpvpn_agent::files::normal`]): accepted
/// only when absolute and made of plain names, and then exactly those names' bytes
/// (unescaped), so that no `.`, `..`, empty part, `/` inside a name or NUL ever reaches
/// the kernel's resolution. And any bytes as a name travel exact: escaping and unescaping
/// gives them back, and leaves UTF-8 without escape characters as it is.
pub fn volume_paths(data: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    use tpvpn_tunnel::files::{escape, plain_name, unescape};
    let escaped = escape(data);
    assert_eq!(unescape(&escaped), data);
    if let Ok(text) = std::str::from_utf8(data) {
        if text.chars().all(|c| u32::from(c) < 0x10_FF00) {
            assert_eq!(escaped, text);
        }
    }
    let path = String::from_utf8_lossy(data);
    let Ok(rel) = tpvpn_agent::files::normal(&path) else { return };
    if path == "/" {
        assert_eq!(rel.as_os_str(), "");
        return;
    }
    let parts: Vec<Vec<u8>> = path[1..].split('/').map(unescape).collect();
    assert!(parts.iter().all(|p| plain_name(p)), "{path:?}");
    let names: Vec<&[u8]> = rel.iter().map(|c| c.as_bytes()).collect();
    assert_eq!(names, parts, "{path:?}");
    assert!(rel.components().all(|c| matches!(c, std::path::Component::Normal(_))), "{path:?}");
}

/// What the manager reads from laptops' certificates and certificate requests
/// ([`tpvpn_manager::auth::signer`]): a certificate's identity never panics to read, and
/// a request with `data` as its PEM is signed only if it is a PKCS#10 request whose
/// signature verifies with its own key.
pub fn client_certificates(data: &[u8]) {
    use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
    use tpvpn_manager::auth::signer::{decide, identity_of, Decision, SIGNER_NAME};
    let _ = identity_of(data);
    let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    let created = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 - 5).unwrap();
    let csr = CertificateSigningRequest {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created)),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(data.to_vec()),
            signer_name: SIGNER_NAME.into(),
            usages: Some(vec!["client auth".into()]),
            username: Some("alice".into()),
            groups: Some(vec!["system:authenticated".into()]),
            ..Default::default()
        },
        status: None,
    };
    if let Decision::Review { .. } = decide(&csr, now) {
        let pem = String::from_utf8_lossy(data);
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&pem).is_ok(), "{pem:?}");
    }
}

/// Virtual address plans (`tpvpn up --vnat`) from arbitrary cluster ranges, laptop routes
/// and pools (the manager and the machine choose them): `plan` never panics, and a plan it
/// makes is sound: each virtual range is as large as its cluster range and of its family,
/// overlaps no route of the laptop, no cluster range and no other virtual range; every
/// range that overlaps a route is mapped; translation there and back is the identity.
pub fn vnat_plans(data: &[u8]) {
    use std::net::{IpAddr, Ipv6Addr};
    use tpvpn_vnat::{plan, Mode, Pool, Table};
    let Some((&first, rest)) = data.split_first() else { return };
    let mode = [Mode::Auto, Mode::Always, Mode::Off][usize::from(first % 3)];
    let (mut cluster, mut routes, mut pool) = (Vec::new(), Vec::new(), Vec::new());
    for c in rest.chunks_exact(6) {
        let addr = if c[0] & 0x80 == 0 {
            IpAddr::from([c[1], c[2], c[3], c[4]])
        } else {
            IpAddr::V6(Ipv6Addr::from([0xfd, c[1], c[2], c[3], c[4], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
        };
        let len = c[5] % if addr.is_ipv4() { 33 } else { 129 };
        let Ok(net) = ipnet::IpNet::new(addr, len).map(|n| n.trunc()) else { return };
        match c[0] % 3 {
            0 => cluster.push(net),
            1 => routes.push(net),
            _ => pool.push(net),
        }
    }
    let overlaps = |a: &ipnet::IpNet, b: &ipnet::IpNet| a.contains(&b.network()) || b.contains(&a.network());
    let Ok(table) = plan(&Table::default(), &cluster, &routes, &Pool::new(pool), mode) else { return };
    let maps = table.mappings();
    for (i, m) in maps.iter().enumerate() {
        let (c, v) = (m.cluster, m.virtual_net);
        assert_eq!((c.prefix_len(), c.addr().is_ipv4()), (v.prefix_len(), v.addr().is_ipv4()), "{m:?}");
        assert!(!routes.iter().chain(&cluster).any(|r| overlaps(r, &v)), "{m:?} {routes:?} {cluster:?}");
        assert!(!maps[i + 1..].iter().any(|o| overlaps(&o.virtual_net, &v)), "{maps:?}");
        for ip in [c.network(), c.broadcast()] {
            let virtual_ip = table.to_virtual(ip);
            assert!(v.contains(&virtual_ip) && table.is_virtual(virtual_ip), "{m:?}");
            assert_eq!(table.to_cluster(virtual_ip), ip, "{m:?}");
        }
    }
    if mode != Mode::Off {
        for c in cluster.iter().filter(|c| routes.iter().any(|r| overlaps(r, c))) {
            assert!(table.is_shadowed(c.network()), "{c} overlaps a route but is not mapped: {maps:?}");
        }
    }
}

/// Every target, for the corpus tests.
#[cfg(test)]
const TARGETS: &[fn(&[u8])] = &[
    tunnel_frames,
    messages,
    handshakes,
    netstack_packets,
    dns_queries,
    system_texts,
    stream_packets,
    http_sniff,
    http_headers,
    portforward_channels,
    volume_paths,
    client_certificates,
    vnat_plans,
];

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::OpCode;

    /// A small deterministic generator, so the corpus is the same on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// A laptop's certificate request (PEM), as `tpvpn up` makes it.
    fn laptop_request() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
    }

    /// A certificate the manager's signer issued (DER).
    fn laptop_certificate() -> Vec<u8> {
        use tpvpn_manager::auth::signer::{identity_of, Ca, Identity};
        let now = std::time::SystemTime::now();
        let ca = Ca::generate(now).unwrap();
        let who = Identity { username: "alice".into(), groups: vec!["dev".into()], ..Identity::default() };
        let pem = ca.issue(&laptop_request(), &who, now, std::time::Duration::from_secs(600)).unwrap();
        let der = tpvpn_tunnel::quic::parse_certs(pem.as_bytes(), "the seed").unwrap().remove(0).to_vec();
        assert_eq!(identity_of(&der), Some(who), "the seed is a real one");
        der
    }

    fn seeds() -> Vec<Vec<u8>> {
        let dns_query = |name: &str, ty: hickory_proto::rr::RecordType| {
            let mut m = DnsMessage::new(0x4242, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = true;
            m.add_query(hickory_proto::op::Query::query(name.parse().unwrap(), ty));
            m.to_vec().unwrap()
        };
        let mut v = vec![
            dns_query("frontend.default.", hickory_proto::rr::RecordType::A),
            dns_query("docs.rs.", hickory_proto::rr::RecordType::AAAA),
            dns_query("web.default.svc.cluster.local.", hickory_proto::rr::RecordType::SRV),
            Message::ClientHello { version: 1, token: b"t".to_vec() }.to_vec().unwrap(),
            [
                Message::ClientHello { version: 2, token: b"agent-token".to_vec() },
                Message::ClientInfo {
                    min_version: 2,
                    role: Role::Agent { node: "n1".into() },
                    user: String::new(),
                    host: "n1".into(),
                    client_id: vec![],
                    features: 0,
                },
            ]
            .iter()
            .flat_map(|m| m.to_vec().unwrap())
            .collect(),
            [
                Message::ServerHello { version: 2, cluster: Default::default() },
                Message::ServerInfo { min_version: 1, max_version: 2, features: 1 },
            ]
            .iter()
            .flat_map(|m| m.to_vec().unwrap())
            .collect(),
            Message::InterceptRequest {
                namespace: "default".into(),
                service: "web".into(),
                port: "http".into(),
                local_port: 18888,
                container: String::new(),
                matchers: tpvpn_tunnel::Matchers {
                    headers: vec![("x-dev".into(), "a".into())],
                    path_prefix: "/api".into(),
                },
            }
            .to_vec()
            .unwrap(),
            Message::InterceptOpen {
                id: 1,
                src: "10.244.2.20:4000".parse().unwrap(),
                dst: "10.244.2.10:8080".parse().unwrap(),
            }
            .to_vec()
            .unwrap(),
            Message::Capture {
                id: 2,
                pod_namespace: "default".into(),
                pod_name: "web-0".into(),
                pod_ip: "10.244.2.10".parse().unwrap(),
                port: 8080,
                host_ip: Some("10.250.1.1".parse().unwrap()),
                container: "nginx".into(),
                container_id: "containerd://x".into(),
                matchers: Default::default(),
            }
            .to_vec()
            .unwrap(),
            b"GET /whoami HTTP/1.1\r\nHost: web\r\nx-dev: a\r\n\r\n".to_vec(),
            laptop_request().into_bytes(),
            laptop_certificate(),
            tpvpn_agent::route::H2_PREFACE.to_vec(),
            Message::CaptureStatus {
                id: 2,
                ok: true,
                message: String::new(),
                meshed: false,
                env: vec![("A".into(), "b".into())],
            }
            .to_vec()
            .unwrap(),
            Message::FlowOpen {
                protocol: tpvpn_tunnel::Protocol::Tcp,
                flow_id: 9,
                src: "198.18.0.1:1".parse().unwrap(),
                dst: "10.96.0.1:80".parse().unwrap(),
            }
            .to_vec()
            .unwrap(),
            wire::udp_packet("10.0.0.1:5".parse().unwrap(), "10.96.0.1:53".parse().unwrap(), b"query").unwrap(),
            wire::udp_packet("[fd00::1]:5".parse().unwrap(), "[fd00::2]:53".parse().unwrap(), b"q6").unwrap(),
        ];
        // Two QUIC packets on a stream, then half of a third.
        v.push([&[0u8, 3, 1, 2, 3, 0, 1, 9, 0, 200, 7][..], &[5u8; 40][..]].concat());
        // Request headers offering h2c (alone, and beside a WebSocket upgrade).
        v.push(b"connection: Upgrade, HTTP2-Settings\nupgrade: h2c\nhttp2-settings: AAMAAABk\nx-dev: a\n".to_vec());
        v.push(b"Connection: keep-alive, upgrade\nconnection: http2-settings\nUpgrade: websocket, H2C\nHTTP2-Settings: AA\n".to_vec());
        // Headers meant for the hop to the agent only (audit B-11).
        v.push(b"Expect: 100-continue\nKeep-Alive: timeout=5\nConnection: keep-alive, X-Nominated, Host\nX-Nominated: s\nHost: web\nContent_Length: 5\nTE: trailers, gzip\nProxy-Connection: x\n".to_vec());
        // Port-forward messages: both openings (port 8443), data, an error text.
        v.push(vec![3, 0, 0xfb, 0x20, 3, 1, 0xfb, 0x20, 4, 0, 1, 2, 3, 7, 1, b'r', b'e', b'f', b'u', b's', b'e']);
        v.push(b"/etc/config/..2026_12_07_05_00_00.1/app.conf".to_vec());
        v.push(b"/var/scratch/../../etc/passwd".to_vec());
        v.push(b"# from dhcp\nnameserver 192.0.2.53\nsearch corp.example\noptions edns0\n".to_vec());
        v.push(
            b"Destination        Gateway            Flags               Netif Expire\ndefault 192.168.1.1 UGScg en0\n10.96/16 link#20 UCS utun4\n192.168.1 link#6 UCS en0 !\nfe80::%lo0/64 fe80::1%lo0 UcI lo0\n"
                .to_vec(),
        );
        v.push(
            b"apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://x\n    extensions:\n    - name: tpvpn\n      extension:\n        never-proxy: [10.0.0.0/8]\n        dns:\n          include-suffixes: [corp]\n"
                .to_vec(),
        );
        // A TCP SYN built by the netstack's own RST builder's inverse: take a RST and flip flags.
        let syn_src =
            wire::udp_packet("10.0.0.1:5".parse().unwrap(), "10.96.0.1:80".parse().unwrap(), &[0; 20]).unwrap();
        let mut tcp = syn_src.clone();
        tcp[9] = 6; // protocol TCP; checksum is not verified on input
        tcp[20 + 12] = 0x50; // data offset 5 words
        tcp[20 + 13] = 0x02; // SYN
        v.push(tcp);
        v
    }

    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut d = seed.to_vec();
        for _ in 0..(rng.next() % 4 + 1) {
            match rng.next() % 4 {
                0 if !d.is_empty() => {
                    let i = (rng.next() as usize) % d.len();
                    d[i] = rng.next() as u8;
                }
                1 if !d.is_empty() => d.truncate((rng.next() as usize) % d.len()),
                2 => d.push(rng.next() as u8),
                _ => {
                    let n = (rng.next() % 64) as usize;
                    d.extend((0..n).map(|_| rng.next() as u8));
                }
            }
        }
        d
    }

    #[test]
    fn saved_regressions_hold() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        for entry in std::fs::read_dir(dir).expect("fuzz/regressions exists") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            for target in TARGETS {
                target(&data);
            }
        }
    }

    #[test]
    fn invariants_hold_over_a_generated_corpus() {
        let mut rng = Rng(0x7470_766e);
        let seeds = seeds();
        for seed in &seeds {
            for target in TARGETS {
                target(seed);
            }
        }
        for i in 0..100_000 {
            let d = if i % 4 == 0 {
                (0..rng.next() % 100).map(|_| rng.next() as u8).collect()
            } else {
                let s = &seeds[(rng.next() as usize) % seeds.len()];
                mutate(&mut rng, s)
            };
            for target in TARGETS {
                target(&d);
            }
        }
    }
}
