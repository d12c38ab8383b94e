//! UDP flows: one connected socket per flow; datagrams from the client arrive as QUIC
//! datagrams (routed by flow id) or as records on the flow's stream; replies go back as
//! QUIC datagrams, or as records when too large for one. Idle flows are closed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tpvpn_tunnel::datagram::Datagram;
use tpvpn_tunnel::io::{read_udp_record, write_message, write_udp_record};
use tpvpn_tunnel::{FlowStatus, Message};
use tracing::debug;

use crate::metrics::add;
use crate::Config;

/// UDP flows of one session, by flow id: where their datagrams go.
pub(crate) type UdpFlows = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, mpsc::Sender<Bytes>>>>;

async fn connect(dst: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: IpAddr = if dst.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    socket.connect(dst).await?;
    Ok(socket)
}

pub(crate) async fn relay(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    flow_id: u64,
    dst: SocketAddr,
    config: &Config,
    flows: UdpFlows,
) {
    let socket = match connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            let reply = Message::FlowReply { status: FlowStatus::Unreachable, message: e.to_string() };
            let _ = write_message(&mut send, &reply).await;
            let _ = send.finish();
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
    if let Ok(mut f) = flows.lock() {
        f.insert(flow_id, tx.clone());
    }
    if write_message(&mut send, &Message::FlowReply { status: FlowStatus::Ok, message: String::new() }).await.is_err() {
        if let Ok(mut f) = flows.lock() {
            f.remove(&flow_id);
        }
        return;
    }
    // Records on the stream (the large-payload fallback) join the datagram queue.
    let from_stream = async move {
        let mut buf = Vec::new();
        while let Ok(true) = read_udp_record(&mut recv, &mut buf).await {
            if tx.send(Bytes::copy_from_slice(&buf)).await.is_err() {
                break;
            }
        }
    };
    tokio::pin!(from_stream);
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(65_600);
    let idle = tokio::time::sleep(config.udp_idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            _ = &mut from_stream => {
                debug!("client closed the udp flow");
                break;
            }
            Some(payload) = rx.recv() => {
                add(&config.metrics.bytes_to_cluster, payload.len());
                idle.as_mut().reset(tokio::time::Instant::now() + config.udp_idle_timeout);
                if let Err(e) = socket.send(&payload).await {
                    debug!(error = %e, "udp send failed");
                }
            }
            r = socket.recv(&mut buf) => {
                let n = match r {
                    Ok(n) => n,
                    // ICMP port unreachable from the destination surfaces here; keep going.
                    Err(_) => continue,
                };
                idle.as_mut().reset(tokio::time::Instant::now() + config.udp_idle_timeout);
                add(&config.metrics.bytes_from_cluster, n);
                let dg = Datagram { flow_id, payload: &buf[..n] };
                if conn.max_datagram_size().is_some_and(|max| dg.buffer_len() <= max) {
                    out.clear();
                    dg.emit(&mut out);
                    let _ = conn.send_datagram(Bytes::copy_from_slice(&out));
                } else if write_udp_record(&mut send, &buf[..n]).await.is_err() {
                    break;
                }
            }
            _ = &mut idle => {
                debug!("udp flow idle");
                break;
            }
        }
    }
    if let Ok(mut f) = flows.lock() {
        f.remove(&flow_id);
    }
    let _ = send.finish();
}
