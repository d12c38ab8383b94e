//! The client's connect path and the tunnel protocol against a real manager on loopback:
//! real QUIC, real TLS, real sockets; no TUN device, so no root needed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpvpn_client::connect::{connect, Target};
use tpvpn_client::Error;
use tpvpn_tunnel::datagram::Datagram;
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::{FlowStatus, Message, Protocol};

mod common;
use common::{start_manager, start_manager_with, target, write_cert};

#[tokio::test]
async fn good_token_gets_the_cluster_and_bad_inputs_get_clear_errors() {
    let f = start_manager("hello").await;
    let s = connect(&target(&f, "manager.crt", "token")).await.expect("connects");
    assert_eq!(s.cluster.cidrs, vec!["10.96.0.0/12".parse().unwrap()]);
    assert_eq!(s.cluster.domain, "cluster.local");
    assert_eq!(s.version.number(), tpvpn_tunnel::PROTOCOL_VERSION, "both speak the newest version");

    let e = connect(&target(&f, "manager.crt", "bad-token")).await.err().expect("bad token refused");
    assert!(matches!(e, Error::BadToken(..)), "{e}");
    assert!(e.to_string().contains("--token-file"), "{e}");

    write_cert(&f.dir, "other");
    let e = connect(&target(&f, "other.crt", "token")).await.err().expect("other cert refused");
    assert!(matches!(e, Error::CertificateMismatch { .. }), "{e}");
    assert!(e.to_string().contains("--manager-ca"), "{e}");
}

#[tokio::test]
async fn a_client_too_new_is_refused_naming_both_versions() {
    let f = start_manager("version").await;
    let s = connect(&target(&f, "manager.crt", "token")).await.unwrap();
    // Speak as a future client on a fresh connection with the same settings.
    let certs = tpvpn_tunnel::quic::load_certs(&f.dir.join("manager.crt")).unwrap();
    let cfg = tpvpn_tunnel::quic::client_config(certs[0].clone(), false).unwrap();
    let conn = s.endpoint.connect_with(cfg, f.addr, "tpvpn-manager").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_message(&mut send, &Message::ClientHello { version: 99, token: b"good-token".to_vec() }).await.unwrap();
    let info = Message::ClientInfo {
        min_version: 98,
        role: tpvpn_tunnel::Role::Client,
        user: "future".into(),
        host: "laptop".into(),
        client_id: vec![],
        features: 0,
    };
    write_message(&mut send, &info).await.unwrap();
    match read_message(&mut recv).await.unwrap() {
        Some(Message::Error { code, version, message }) => {
            assert_eq!(code, tpvpn_tunnel::ErrorCode::VersionMismatch);
            assert_eq!(version, tpvpn_tunnel::PROTOCOL_VERSION, "the manager names its newest version");
            assert!(
                message.contains(&format!("v{}", tpvpn_tunnel::PROTOCOL_VERSION))
                    && message.contains("v98")
                    && message.contains("upgrade the manager"),
                "{message}"
            )
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // The close code carries the refusal too.
    let closed = conn.closed().await;
    let quinn::ConnectionError::ApplicationClosed(c) = closed else { panic!("{closed:?}") };
    assert_eq!(tpvpn_tunnel::refusal_code(c.error_code.into_inner()), Some(tpvpn_tunnel::ErrorCode::VersionMismatch));
}

#[tokio::test]
async fn tcp_flow_relays_with_half_close_and_refused_dial() {
    let f = start_manager("tcp").await;
    let s = connect(&target(&f, "manager.crt", "token")).await.unwrap();
    // A server that reads to EOF, then answers with the byte count (half-close).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut all = Vec::new();
        sock.read_to_end(&mut all).await.unwrap();
        sock.write_all(format!("got {}", all.len()).as_bytes()).await.unwrap();
    });
    let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
    let (mut send, mut recv) = s.conn.open_bi().await.unwrap();
    write_message(&mut send, &Message::FlowOpen { protocol: Protocol::Tcp, flow_id: 0, src, dst: server_addr })
        .await
        .unwrap();
    assert!(matches!(read_message(&mut recv).await.unwrap(), Some(Message::FlowReply { status: FlowStatus::Ok, .. })));
    send.write_all(&[7u8; 100_000]).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1000).await.unwrap();
    assert_eq!(reply, b"got 100000");

    // A port nobody listens on: refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (mut send, mut recv) = s.conn.open_bi().await.unwrap();
    write_message(&mut send, &Message::FlowOpen { protocol: Protocol::Tcp, flow_id: 0, src, dst: closed })
        .await
        .unwrap();
    assert!(matches!(
        read_message(&mut recv).await.unwrap(),
        Some(Message::FlowReply { status: FlowStatus::Refused, .. })
    ));
}

#[tokio::test]
async fn udp_flow_echoes_through_datagrams() {
    let f = start_manager("udp").await;
    let s = connect(&target(&f, "manager.crt", "token")).await.unwrap();
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2000];
        for _ in 0..10 {
            let (n, from) = echo.recv_from(&mut buf).await.unwrap();
            echo.send_to(&buf[..n], from).await.unwrap();
        }
    });
    let (mut send, mut recv) = s.conn.open_bi().await.unwrap();
    let src: SocketAddr = "198.18.0.1:5000".parse().unwrap();
    write_message(&mut send, &Message::FlowOpen { protocol: Protocol::Udp, flow_id: 42, src, dst: echo_addr })
        .await
        .unwrap();
    assert!(matches!(read_message(&mut recv).await.unwrap(), Some(Message::FlowReply { status: FlowStatus::Ok, .. })));
    let mut out = Vec::new();
    Datagram { flow_id: 42, payload: b"ping" }.emit(&mut out);
    s.conn.send_datagram(out.into()).unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), s.conn.read_datagram()).await.unwrap().unwrap();
    assert_eq!(Datagram::parse(&d).unwrap(), Datagram { flow_id: 42, payload: b"ping" });
}

#[tokio::test]
async fn unreachable_manager_fails_within_the_timeout() {
    let dir = std::env::temp_dir().join(format!("tpvpn-session-unreach-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_cert(&dir, "manager");
    std::fs::write(dir.join("token"), "t").unwrap();
    // A bound UDP port that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t = Target::from_files(silent.local_addr().unwrap().to_string(), &dir.join("manager.crt"), &dir.join("token"))
        .unwrap();
    let started = std::time::Instant::now();
    let e = connect(&t).await.err().expect("no manager there");
    assert!(matches!(e, Error::ManagerUnreachable { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(8));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens a flow the way the client does; the manager's reply.
async fn open(s: &tpvpn_client::connect::Session, protocol: Protocol, flow_id: u64, dst: &str) -> (FlowStatus, String) {
    let (mut send, mut recv) = s.conn.open_bi().await.unwrap();
    let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
    write_message(&mut send, &Message::FlowOpen { protocol, flow_id, src, dst: dst.parse().unwrap() }).await.unwrap();
    // The stream stays open (a UDP flow lives as long as it does).
    std::mem::forget(send);
    match read_message(&mut recv).await.unwrap() {
        Some(Message::FlowReply { status, message }) => {
            std::mem::forget(recv);
            (status, message)
        }
        other => panic!("expected a flow reply, got {other:?}"),
    }
}

#[tokio::test]
async fn the_default_destination_policy_denies_loopback_and_the_metadata_address() {
    let f = start_manager_with("policy", |_| {}).await;
    let s = connect(&target(&f, "manager.crt", "token")).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap().to_string();
    for (proto, dst, why) in [
        (Protocol::Tcp, local.as_str(), "loopback"),
        (Protocol::Udp, "127.0.0.1:53", "loopback"),
        (Protocol::Tcp, "169.254.169.254:80", "link-local"),
        (Protocol::Tcp, "[::1]:80", "loopback"),
    ] {
        let (status, message) = open(&s, proto, 1, dst).await;
        assert_eq!(status, FlowStatus::Denied, "{dst}: {message}");
        assert!(message.contains(why), "{dst}: {message}");
    }
    // Nothing was dialed: the local listener saw no connection.
    assert!(tokio::time::timeout(Duration::from_millis(200), listener.accept()).await.is_err());
}

#[tokio::test]
async fn a_client_over_its_udp_limit_is_refused_while_another_still_works() {
    let f = start_manager_with("limits", |c| {
        c.policy = tpvpn_manager::policy::Policy::allow_all();
        c.session_limits.udp_flows = 4;
    })
    .await;
    let a = connect(&target(&f, "manager.crt", "token")).await.unwrap();
    let b = connect(&target(&f, "manager.crt", "token")).await.unwrap();
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dst = echo.local_addr().unwrap().to_string();
    for id in 0..4 {
        assert_eq!(open(&a, Protocol::Udp, id, &dst).await.0, FlowStatus::Ok, "flow {id}");
    }
    let (status, message) = open(&a, Protocol::Udp, 4, &dst).await;
    assert_eq!(status, FlowStatus::Denied, "{message}");
    assert!(message.contains("at most 4 UDP flows"), "{message}");
    assert_eq!(open(&b, Protocol::Udp, 0, &dst).await.0, FlowStatus::Ok, "the other client is not affected");
}
