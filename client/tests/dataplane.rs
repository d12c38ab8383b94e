//! The data plane against a real manager on loopback, through an in-memory packet device
//! in place of the TUN device: the laptop's packets go in, the stack's come out. No root.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tpvpn_client::connect::connect;
use tpvpn_client::dataplane::{Dataplane, MemoryDevice, MemoryPeer};
use tpvpn_netstack::wire::{self, Transport};
use tpvpn_netstack::{Config, Stack};

/// A UDP echo server on loopback (the cluster's side), for the life of the test.
async fn udp_echo() -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// The next UDP packet the stack writes toward the laptop: (source, destination, payload).
async fn next_udp(peer: &mut MemoryPeer) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    let packet = tokio::time::timeout(Duration::from_secs(5), peer.rx.recv()).await.ok()??;
    let info = wire::parse(&packet).unwrap();
    let Transport::Udp { src_port, dst_port, payload } = info.transport else { panic!("not udp: {info:?}") };
    Some((
        SocketAddr::new(info.src, src_port),
        SocketAddr::new(info.dst, dst_port),
        packet[payload.0..payload.1].to_vec(),
    ))
}

async fn start(tag: &str, capacity: usize) -> (common::Fixture, MemoryPeer, tpvpn_client::dataplane::Handle) {
    let f = common::start_manager(tag).await;
    let s = connect(&common::target(&f, "manager.crt", "token")).await.unwrap();
    let (device, peer) = MemoryDevice::new(capacity);
    let dataplane = Dataplane::new(Stack::new(Config::default()), device, s.conn.clone());
    let handle = dataplane.handle();
    tokio::spawn(async move {
        let _session = s;
        dataplane.run().await
    });
    (f, peer, handle)
}

#[tokio::test]
async fn udp_datagrams_of_every_size_reach_the_cluster_and_their_answers_come_back() {
    let (_f, mut peer, handle) = start("dp-udp", 64).await;
    let echo = udp_echo().await;
    // The laptop's application (a loopback source: the stack takes only this machine's).
    let app: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    for (i, size) in [1usize, 1200, 8000, 65000].into_iter().enumerate() {
        let payload: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
        peer.tx.send(wire::udp_packet(app, echo, &payload).unwrap()).await.unwrap();
        let (src, dst, got) = next_udp(&mut peer).await.unwrap_or_else(|| panic!("no echo of {size} bytes"));
        assert_eq!((src, dst), (echo, app), "the answer comes from the server to the application");
        assert_eq!(got, payload, "{size} bytes");
    }
    // Another source port is another flow.
    let other: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    peer.tx.send(wire::udp_packet(other, echo, b"two").unwrap()).await.unwrap();
    assert_eq!(next_udp(&mut peer).await.map(|(_, dst, p)| (dst, p)), Some((other, b"two".to_vec())));
    assert_eq!(handle.flows().await.udp, 2);
}

#[tokio::test]
async fn a_laptop_that_stops_reading_loses_datagrams_not_the_data_plane() {
    // A device that holds 4 packets each way, as a short TUN queue would.
    let (_f, mut peer, handle) = start("dp-back", 4).await;
    let echo = udp_echo().await;
    let app: SocketAddr = "127.0.0.1:40002".parse().unwrap();
    // 200 datagrams sent as fast as the queue takes them while nothing reads the
    // answers: full queues drop (UDP), nothing waits forever or grows without bound.
    for i in 0..200u32 {
        let _ = peer.tx.try_send(wire::udp_packet(app, echo, &i.to_be_bytes()).unwrap());
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), peer.rx.recv()).await {
        got += 1;
    }
    assert!((1..=4).contains(&got), "{got} answers waiting in a queue of 4");
    // Reading again, the data plane is alive and exact.
    peer.tx.send(wire::udp_packet(app, echo, b"after").unwrap()).await.unwrap();
    let mut last = None;
    while let Some((_, _, p)) = next_udp(&mut peer).await {
        if p == b"after" {
            last = Some(p);
            break;
        }
    }
    assert_eq!(last.as_deref(), Some(&b"after"[..]));
    assert_eq!(handle.flows().await.udp, 1);
}
