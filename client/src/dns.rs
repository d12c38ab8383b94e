//! The laptop's DNS server: UDP and TCP on an address of the TUN device, driving the
//! sans-IO `tpvpn_resolver::Resolver`.
//!
//! Per query: answered from the service table or cache; asked of the cluster DNS through
//! the tunnel (a `DnsQuery` stream; SERVFAIL at once when the tunnel is down, never a
//! hang); or forwarded byte for byte to the laptop's original nameservers (UDP, TCP for
//! TCP clients), whose answer is relayed unchanged.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use nix::errno::Errno;
#[cfg(target_os = "linux")]
use nix::sys::socket::{MsgFlags, SockaddrStorage};
use tokio::net::TcpListener;
use tpvpn_resolver::upstream as dns;
use tpvpn_resolver::{Action, Resolver, Transport};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::Message;
use tracing::debug;

/// How long one upstream or cluster query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// What every query handler shares.
pub struct Shared {
    pub resolver: Mutex<Resolver>,
    pub upstreams: Vec<SocketAddr>,
    /// The tunnel, while connected.
    pub conn: Mutex<Option<quinn::Connection>>,
    /// `--dns-mode resolved`: the link configured in systemd-resolved.
    pub resolved: Option<crate::os::resolved::Link>,
    /// Queries being carried out (upstream or through the tunnel): beyond, SERVFAIL.
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// Upstream and cluster queries carried out at once, from the descriptor limit (an
/// upstream query holds a socket): a quarter of it, between 16 and 1,024. A local flood
/// of names gets SERVFAIL beyond, never the daemon's last descriptor.
pub fn in_flight_limit() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    usize::try_from(soft / 4).unwrap_or(1024).clamp(16, 1024)
}

/// TCP clients served at once; more wait in the listen backlog.
const TCP_CLIENTS: usize = 32;

impl Shared {
    pub fn resolver(&self) -> std::sync::MutexGuard<'_, Resolver> {
        // A poisoned lock means a panic in the resolver, which handles network input
        // without panicking; keep serving with its state.
        self.resolver.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Answers one query; `None` means no reply (dropped).
pub async fn handle(shared: &Shared, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let transport = if tcp { Transport::Tcp } else { Transport::Udp };
    let action = shared.resolver().query(packet, transport, Instant::now());
    if matches!(action, Action::Reply(_) | Action::Drop) {
        return finish(shared, action, packet, tcp).await;
    }
    let Ok(_permit) = shared.in_flight.clone().try_acquire_owned() else {
        return Resolver::servfail(packet, transport);
    };
    finish(shared, action, packet, tcp).await
}

/// Carries out the resolver's `action` for `packet`; `None` means no reply.
async fn finish(shared: &Shared, action: Action, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
    match action {
        Action::Reply(bytes) => Some(bytes),
        Action::Drop => None,
        Action::Upstream => upstream(&shared.upstreams, packet, tcp).await,
        Action::Cluster { query, pending } => {
            let conn = shared.conn.lock().ok().and_then(|c| c.clone());
            let answer = match conn {
                Some(conn) => tokio::time::timeout(QUERY_TIMEOUT, through_tunnel(&conn, query)).await.ok().flatten(),
                None => None,
            };
            let mut r = shared.resolver();
            Some(match answer {
                Some(a) => r.cluster_answer(&pending, &a, Instant::now()),
                None => r.cluster_failed(&pending),
            })
        }
    }
}

async fn through_tunnel(conn: &quinn::Connection, query: Vec<u8>) -> Option<Vec<u8>> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    write_message(&mut send, &Message::DnsQuery { query }).await.ok()?;
    let _ = send.finish();
    match read_message(&mut recv).await {
        Ok(Some(Message::DnsAnswer { answer })) => Some(answer),
        other => {
            debug!(?other, "cluster dns query failed");
            None
        }
    }
}

/// Forwards `packet` to the first upstream that answers, unchanged both ways.
async fn upstream(upstreams: &[SocketAddr], packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
    for server in upstreams {
        let r = if tcp {
            dns::over_tcp(*server, packet, QUERY_TIMEOUT).await
        } else {
            dns::over_udp(*server, packet, QUERY_TIMEOUT, 1).await
        };
        match r {
            Ok(answer) => return Some(answer),
            Err(e) => debug!(%server, error = %e, "upstream dns failed"),
        }
    }
    None
}

/// Datagrams taken from the socket per system call.
#[cfg(target_os = "linux")]
const UDP_BATCH: usize = 32;
/// Longest UDP query read; a longer one (no stub resolver sends one) is dropped.
const UDP_QUERY_MAX: usize = 4096;

/// What to do with one UDP query: the reply to send now, or `None` (dropped, or a task on
/// `runtime` answers it later: it needs the cluster or the upstream servers, and takes a
/// permit of [`Shared::in_flight`], SERVFAIL at once without one).
fn udp_query(
    resolver: &mut Resolver,
    packet: &[u8],
    from: SocketAddr,
    (socket, shared, runtime): (&Arc<std::net::UdpSocket>, &Arc<Shared>, &tokio::runtime::Handle),
    now: Instant,
) -> Option<Vec<u8>> {
    match resolver.query(packet, Transport::Udp, now) {
        Action::Reply(reply) => Some(reply),
        Action::Drop => None,
        action => {
            let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
                return Resolver::servfail(packet, Transport::Udp);
            };
            let packet = packet.to_vec();
            let (socket, shared) = (socket.clone(), shared.clone());
            runtime.spawn(async move {
                if let Some(reply) = finish(&shared, action, &packet, false).await {
                    send_udp(&socket, &reply, from);
                }
                drop(permit);
            });
            None
        }
    }
}

/// Serves DNS over UDP on the blocking `socket`, on a thread of its own for the life of
/// the process. The kernel wakes it straight out of `recvmmsg`, which takes every query
/// waiting (up to [`UDP_BATCH`]); answers from the table and cache go back together in one
/// `sendmmsg`, so under load a query costs a fraction of a system call, and when idle a
/// query is answered after one wake-up. A query that needs the cluster or the upstream
/// servers becomes a task on `runtime`.
#[cfg(target_os = "linux")]
pub fn serve_udp(socket: std::net::UdpSocket, shared: Arc<Shared>, runtime: tokio::runtime::Handle) {
    use nix::sys::socket::{recvmmsg, sendmmsg, ControlMessage, MultiHeaders};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;
    let socket = Arc::new(socket);
    let fd = socket.as_raw_fd();
    let mut bufs = vec![[0u8; UDP_QUERY_MAX]; UDP_BATCH];
    let mut rx = MultiHeaders::<SockaddrStorage>::preallocate(UDP_BATCH, None);
    let mut tx = MultiHeaders::<SockaddrStorage>::preallocate(UDP_BATCH, None);
    let mut received: Vec<(usize, Option<SockaddrStorage>)> = Vec::with_capacity(UDP_BATCH);
    let mut replies: Vec<(Vec<u8>, Option<SockaddrStorage>)> = Vec::with_capacity(UDP_BATCH);
    loop {
        received.clear();
        let result = {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            recvmmsg(fd, &mut rx, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None).map(|msgs| {
                received.extend(msgs.map(|m| {
                    let whole = !m.flags.contains(MsgFlags::MSG_TRUNC);
                    (if whole { m.bytes } else { usize::MAX }, m.address)
                }))
            })
        };
        match result {
            Ok(()) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                debug!(error = %e, "dns udp receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let now = Instant::now();
        let mut resolver = shared.resolver();
        for (buf, (n, from)) in bufs.iter().zip(&received) {
            let (Some(packet), Some(addr)) = (buf.get(..*n), from.and_then(socket_addr)) else { continue };
            if let Some(reply) = udp_query(&mut resolver, packet, addr, (&socket, &shared, &runtime), now) {
                replies.push((reply, *from));
            }
        }
        drop(resolver);
        if !replies.is_empty() {
            let iovs: Vec<[IoSlice<'_>; 1]> = replies.iter().map(|(r, _)| [IoSlice::new(r)]).collect();
            let addrs: Vec<Option<SockaddrStorage>> = replies.iter().map(|(_, a)| *a).collect();
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            // Replies the full send buffer refuses are dropped, as the network would; the
            // client asks again.
            if let Err(e) = sendmmsg(fd, &mut tx, &iovs, addrs, no_cmsgs, MsgFlags::MSG_DONTWAIT) {
                debug!(error = %e, "dns udp replies not sent");
            }
        }
        replies.clear();
    }
}

/// Whether `ip` is an address of this machine (read again when a second old). Where the
/// DNS sockets cannot be bound to the TUN device (macOS), a query from any other source
/// (a neighbour routing 198.18.0.2 through this machine) is not answered.
#[cfg(not(target_os = "linux"))]
fn from_this_machine(ip: std::net::IpAddr) -> bool {
    static READ: Mutex<Option<(Instant, Vec<std::net::IpAddr>)>> = Mutex::new(None);
    let mut r = READ.lock().unwrap_or_else(|e| e.into_inner());
    if r.as_ref().is_none_or(|(at, _)| at.elapsed() > Duration::from_secs(1)) {
        *r = Some((Instant::now(), crate::dataplane::local_addresses()));
    }
    r.as_ref().is_some_and(|(_, addrs)| addrs.contains(&ip))
}

/// [`serve_udp`] where there is no `recvmmsg` (macOS): one query per receive.
#[cfg(not(target_os = "linux"))]
pub fn serve_udp(socket: std::net::UdpSocket, shared: Arc<Shared>, runtime: tokio::runtime::Handle) {
    let socket = Arc::new(socket);
    let mut buf = [0u8; UDP_QUERY_MAX];
    loop {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!(error = %e, "dns udp receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if !from_this_machine(from.ip()) {
            continue;
        }
        let reply = udp_query(&mut shared.resolver(), &buf[..n], from, (&socket, &shared, &runtime), Instant::now());
        if let Some(reply) = reply {
            send_udp(&socket, &reply, from);
        }
    }
}

#[cfg(target_os = "linux")]
fn socket_addr(a: SockaddrStorage) -> Option<SocketAddr> {
    match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
        (Some(v4), _) => Some(SocketAddr::V4((*v4).into())),
        (_, Some(v6)) => Some(SocketAddr::V6((*v6).into())),
        _ => None,
    }
}

/// Sends one UDP reply without blocking: with the socket's send buffer full it is dropped,
/// as the network would, and the client asks again.
fn send_udp(socket: &std::net::UdpSocket, reply: &[u8], to: SocketAddr) {
    if let Err(e) = socket2::SockRef::from(socket).send_to_with_flags(reply, &to.into(), libc::MSG_DONTWAIT) {
        debug!(%to, error = %e, "dns udp reply not sent");
    }
}

/// Serves DNS over TCP on `listener`: a task per connection (at most [`TCP_CLIENTS`]),
/// queries in order.
pub async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let clients = Arc::new(tokio::sync::Semaphore::new(TCP_CLIENTS));
    loop {
        let Ok(client) = clients.clone().acquire_owned().await else { return };
        let (mut stream, _peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "dns tcp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        #[cfg(not(target_os = "linux"))]
        if !from_this_machine(_peer.ip()) {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Ok(Ok(Some(query))) =
                tokio::time::timeout(Duration::from_secs(10), dns::read_framed(&mut stream)).await
            {
                match handle(&shared, &query, true).await {
                    Some(reply) => {
                        if dns::write_framed(&mut stream, &reply).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                }
            }
        });
    }
}
