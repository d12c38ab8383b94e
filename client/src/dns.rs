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

use tokio::net::{TcpListener, UdpSocket};
use tpvpn_resolver::{Action, Resolver, Transport};
use tpvpn_tunnel::io::dns;
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
    pub resolved: Option<crate::resolved::Link>,
}

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

/// Serves DNS over UDP on `socket`: answers from the table and cache are sent at once;
/// a query that needs the cluster or the upstream servers gets a task of its own.
pub async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        let action = shared.resolver().query(&buf[..n], Transport::Udp, Instant::now());
        match action {
            Action::Reply(reply) => {
                let _ = socket.send_to(&reply, from).await;
            }
            Action::Drop => {}
            action => {
                let packet = buf[..n].to_vec();
                let (socket, shared) = (socket.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Some(reply) = finish(&shared, action, &packet, false).await {
                        let _ = socket.send_to(&reply, from).await;
                    }
                });
            }
        }
    }
}

/// Serves DNS over TCP on `listener`: a task per connection, queries in order.
pub async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
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
