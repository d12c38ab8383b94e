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

/// The laptop's own TCP for the back-pressure test: a smoltcp interface on 127.0.0.1 whose
/// packets go through queues that the test moves to and from the memory device.
mod laptop {
    use std::collections::VecDeque;

    use smoltcp::phy::{Device, DeviceCapabilities, Medium};
    use smoltcp::time::Instant;

    #[derive(Default)]
    pub struct Queues {
        pub rx: VecDeque<Vec<u8>>,
        pub tx: VecDeque<Vec<u8>>,
    }

    pub struct Rx(Vec<u8>);
    pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

    impl smoltcp::phy::RxToken for Rx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }

    impl smoltcp::phy::TxToken for Tx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut buf = vec![0u8; len];
            let r = f(&mut buf);
            self.0.push_back(buf);
            r
        }
    }

    impl Device for Queues {
        type RxToken<'a> = Rx;
        type TxToken<'a> = Tx<'a>;
        fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
            let p = self.rx.pop_front()?;
            Some((Rx(p), Tx(&mut self.tx)))
        }
        fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
            Some(Tx(&mut self.tx))
        }
        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ip;
            caps.max_transmission_unit = 65000;
            caps
        }
    }
}

/// The byte at `offset` of what the test server sends.
fn pattern(offset: u64) -> u8 {
    ((offset % 65536) % 251) as u8
}

/// A laptop application on 127.0.0.1 (smoltcp), connected through the data plane.
struct Laptop {
    queues: laptop::Queues,
    iface: smoltcp::iface::Interface,
    sockets: smoltcp::iface::SocketSet<'static>,
    handle: smoltcp::iface::SocketHandle,
    epoch: std::time::Instant,
    /// Bytes read and checked so far.
    got: u64,
}

impl Laptop {
    fn connect(server: SocketAddr, rx_buffer: usize) -> Laptop {
        use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
        use smoltcp::socket::tcp;
        use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
        let mut queues = laptop::Queues::default();
        let epoch = std::time::Instant::now();
        let mut iface =
            Interface::new(IfaceConfig::new(HardwareAddress::Ip), &mut queues, smoltcp::time::Instant::from_micros(0));
        iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8)).unwrap());
        let mut sockets = SocketSet::new(vec![]);
        let mut sock =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx_buffer]), tcp::SocketBuffer::new(vec![0; 65536]));
        let std::net::IpAddr::V4(ip) = server.ip() else { panic!("an IPv4 server") };
        sock.connect(iface.context(), (IpAddress::from(ip), server.port()), 40100).unwrap();
        let handle = sockets.add(sock);
        Laptop { queues, iface, sockets, handle, epoch, got: 0 }
    }

    /// Polls the laptop's stack, moves packets both ways (a few ms), and reads and checks
    /// what arrived if `read`.
    async fn step(&mut self, peer: &mut MemoryPeer, read: bool) {
        let now = smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64);
        self.iface.poll(now, &mut self.queues, &mut self.sockets);
        while let Some(p) = self.queues.tx.pop_front() {
            peer.tx.send(p).await.unwrap();
        }
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(2), peer.rx.recv()).await {
            self.queues.rx.push_back(p);
            while let Ok(p) = peer.rx.try_recv() {
                self.queues.rx.push_back(p);
            }
        }
        let s = self.sockets.get_mut::<smoltcp::socket::tcp::Socket>(self.handle);
        while read && s.can_recv() {
            let start = self.got;
            let (len, ok) = s
                .recv(|buf| {
                    let ok = buf.iter().enumerate().all(|(i, b)| *b == pattern(start + i as u64));
                    (buf.len(), (buf.len(), ok))
                })
                .unwrap();
            assert!(ok, "the bytes after {start} are not the server's");
            self.got += len as u64;
        }
    }
}

#[tokio::test]
async fn a_laptop_application_that_stops_reading_holds_back_the_cluster_server() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    const TOTAL: u64 = 64 << 20;
    let (_f, mut peer, _handle) = start("dp-tcp-back", 1024).await;
    // The cluster's server: sends TOTAL bytes of a pattern, counting what its kernel took.
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let chunk: Vec<u8> = (0..65536u64).map(pattern).collect();
        while w.load(Ordering::Relaxed) < TOTAL {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
            w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });
    let mut laptop = Laptop::connect(server, 64 * 1024);
    // The application does not read for 3 s: the server is held back once the windows on
    // the way (the laptop's socket, the data plane's budget, QUIC's, the manager's and the
    // kernels' buffers) are full, far short of everything.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        laptop.step(&mut peer, false).await;
    }
    let held = written.load(Ordering::Relaxed);
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        laptop.step(&mut peer, false).await;
    }
    let later = written.load(Ordering::Relaxed);
    eprintln!("the server was held back after {held} bytes");
    assert!(held > 0, "nothing was sent");
    assert_eq!(held, later, "the server kept sending to a laptop that does not read");
    assert!(held < TOTAL / 2, "{held} bytes taken from the server for a laptop that does not read");
    // Reading again, every byte arrives, in order.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while laptop.got < TOTAL && std::time::Instant::now() < until {
        laptop.step(&mut peer, true).await;
    }
    assert_eq!(laptop.got, TOTAL, "after reading again ({held} bytes were held back)");
}
