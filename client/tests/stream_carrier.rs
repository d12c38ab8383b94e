//! QUIC over a byte stream (the carrier behind the API server's port-forward) against a
//! real manager's TCP port on loopback: the same hello, flows and datagrams as over UDP,
//! and a stream that ends takes its connection with it. No root needed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpvpn_client::connect::{over_stream, Session, StreamError, Target, Via};
use tpvpn_client::Error;
use tpvpn_tunnel::datagram::Datagram;
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::{FlowStatus, Message, Protocol};

mod common;
use common::{start_manager, target, Fixture};

async fn connect_tcp(f: &Fixture, t: &Target, to: SocketAddr) -> Result<Session, StreamError> {
    let stream = tokio::net::TcpStream::connect(to).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let pem = std::fs::read(f.dir.join("manager.crt")).unwrap();
    let pinned = tpvpn_tunnel::quic::parse_certs(&pem, "test").unwrap().remove(0);
    let (_said, said) = tokio::sync::watch::channel(None);
    over_stream(t, stream, Via::Quic(to), pinned, said).await
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

#[tokio::test]
async fn the_tcp_port_carries_the_hello_flows_and_datagrams() {
    let f = start_manager("stream").await;
    let s = match connect_tcp(&f, &target(&f, "manager.crt", "token"), f.tcp_addr).await {
        Ok(s) => s,
        Err(StreamError::Closed(m)) => panic!("stream closed: {m}"),
        Err(StreamError::Other(e)) => panic!("{e}"),
    };
    assert_eq!(s.cluster.domain, "cluster.local");

    // 8 MiB each way through a TCP flow, byte for byte: an echo server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = sock.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
    let (mut send, mut recv) = s.conn.open_bi().await.unwrap();
    write_message(&mut send, &Message::FlowOpen { protocol: Protocol::Tcp, flow_id: 0, src, dst: server })
        .await
        .unwrap();
    assert!(matches!(read_message(&mut recv).await.unwrap(), Some(Message::FlowReply { status: FlowStatus::Ok, .. })));
    const N: usize = 8 << 20;
    let writer = tokio::spawn(async move {
        let data: Vec<u8> = (0..N).map(pattern).collect();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
    });
    let back =
        tokio::time::timeout(Duration::from_secs(60), recv.read_to_end(2 * N)).await.expect("echo in time").unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), N);
    assert!(back.iter().enumerate().all(|(i, b)| *b == pattern(i)), "the echo differs");

    // A UDP flow's datagrams.
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2000];
        let (n, from) = echo.recv_from(&mut buf).await.unwrap();
        echo.send_to(&buf[..n], from).await.unwrap();
    });
    let (mut send, mut recv) = s.conn.open_bi().await.unwrap();
    write_message(&mut send, &Message::FlowOpen { protocol: Protocol::Udp, flow_id: 7, src, dst: echo_addr })
        .await
        .unwrap();
    assert!(matches!(read_message(&mut recv).await.unwrap(), Some(Message::FlowReply { status: FlowStatus::Ok, .. })));
    let mut out = Vec::new();
    Datagram { flow_id: 7, payload: &[5u8; 1200] }.emit(&mut out);
    s.conn.send_datagram(out.into()).unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), s.conn.read_datagram()).await.unwrap().unwrap();
    assert_eq!(Datagram::parse(&d).unwrap(), Datagram { flow_id: 7, payload: &[5u8; 1200] });

    // The same authentication as the UDP port.
    match connect_tcp(&f, &target(&f, "manager.crt", "bad-token"), f.tcp_addr).await {
        Err(StreamError::Other(Error::BadToken(..))) => {}
        Err(StreamError::Other(e)) => panic!("expected a bad-token refusal, got {e}"),
        Err(StreamError::Closed(m)) => panic!("expected a bad-token refusal, got a closed stream: {m}"),
        Ok(_) => panic!("a bad token was accepted over TCP"),
    }
}

/// A TCP relay between the client and the manager that the test can cut.
async fn relay_to(to: SocketAddr) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, cut_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut a, _) = listener.accept().await.unwrap();
        let mut b = tokio::net::TcpStream::connect(to).await.unwrap();
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
            _ = cut_rx => {}
        }
        // Both sockets close here.
    });
    (addr, cut)
}

#[tokio::test]
async fn a_cut_stream_ends_the_connection_at_once_not_at_the_idle_timeout() {
    let f = start_manager("stream-cut").await;
    let (relay, cut) = relay_to(f.tcp_addr).await;
    let s = connect_tcp(&f, &target(&f, "manager.crt", "token"), relay).await.ok().expect("connects through the relay");
    cut.send(()).unwrap();
    // QUIC's idle timeout is 30 s; the stream's end is seen at once.
    let closed = tokio::time::timeout(Duration::from_secs(10), s.conn.closed()).await;
    assert!(closed.is_ok(), "the connection outlived its stream");
}

#[tokio::test]
async fn the_manager_closes_a_tcp_connection_that_brings_no_quic() {
    let f = start_manager("stream-silent").await;
    // Silent: closed after the hello deadline (5 s).
    let mut silent = tokio::net::TcpStream::connect(f.tcp_addr).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "a silent TCP connection was kept: {r:?}");
    // Garbage: a zero-length packet is not a tpvpn stream; closed.
    let mut junk = tokio::net::TcpStream::connect(f.tcp_addr).await.unwrap();
    junk.write_all(&[0, 0, 1, 2, 3]).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(15), junk.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "a garbage TCP connection was kept: {r:?}");
}
