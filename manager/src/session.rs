//! One client session: the hello on the control stream, then a task per flow stream
//! and one task that routes QUIC datagrams to UDP flows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tpvpn_tunnel::datagram::Datagram;
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::{ErrorCode, FlowStatus, Message, Protocol, CLOSE_REFUSED, PROTOCOL_VERSION};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::metrics::{self, Gauge};
use crate::{token_matches, Error, Shared};

/// UDP flows of one session, by flow id: where their datagrams go.
pub(crate) type UdpFlows = Arc<Mutex<HashMap<u64, mpsc::Sender<Bytes>>>>;

/// Accepts clients on `endpoint` until it is closed.
pub async fn serve(endpoint: quinn::Endpoint, config: crate::Config) {
    let config: Shared = Arc::new(config);
    while let Some(incoming) = endpoint.accept().await {
        let config = config.clone();
        let remote = incoming.remote_address();
        let span = info_span!("session", client = %remote);
        tokio::spawn(
            async move {
                match incoming.await {
                    Ok(conn) => match session(conn, config).await {
                        Ok(()) => info!("client disconnected"),
                        Err(e) => info!(error = %e, "session ended"),
                    },
                    Err(e) => info!(error = %e, "handshake failed"),
                }
            }
            .instrument(span),
        );
    }
}

async fn refuse(conn: &quinn::Connection, send: &mut quinn::SendStream, code: ErrorCode, message: String) {
    warn!(%message, "refusing client");
    let _ = write_message(send, &Message::Error { code, version: PROTOCOL_VERSION, message: message.clone() }).await;
    let _ = send.finish();
    // Give the error frame a moment to arrive; the close reason repeats it anyway.
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(CLOSE_REFUSED.into(), message.as_bytes());
}

async fn session(conn: quinn::Connection, config: Shared) -> Result<(), Error> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| Error::HandshakeTimeout)??;
    let hello = read_message(&mut recv).await?;
    match hello {
        Some(Message::ClientHello { version, token }) => {
            if version != PROTOCOL_VERSION {
                let msg = format!(
                    "protocol version mismatch: the manager speaks tpvpn protocol v{PROTOCOL_VERSION}, the client v{version}"
                );
                metrics::add(&config.metrics.refused_total, 1);
                refuse(&conn, &mut send, ErrorCode::VersionMismatch, msg).await;
                return Ok(());
            }
            if !token_matches(&token, &config.token) {
                metrics::add(&config.metrics.refused_total, 1);
                refuse(&conn, &mut send, ErrorCode::Unauthorized, "the client token is not valid".into()).await;
                return Ok(());
            }
        }
        Some(other) => return Err(Error::BadHello(other.kind())),
        None => return Err(Error::BadHello("end of stream")),
    }
    let mut cluster = config.views.cluster.clone();
    let mut catalog = config.views.catalog.clone();
    let view = cluster.borrow_and_update().clone();
    write_message(&mut send, &Message::ServerHello { version: PROTOCOL_VERSION, cluster: view }).await?;
    let cat = catalog.borrow_and_update().clone();
    write_catalog(&mut send, &cat).await?;
    info!("client authenticated");
    let _session_gauge = Gauge::new(&config.metrics.sessions, &config.metrics.sessions_total);

    let udp_flows: UdpFlows = Arc::default();
    let datagrams = tokio::spawn(route_datagrams(conn.clone(), udp_flows.clone()).in_current_span());
    // The control stream stays open for the session: changes are pushed on it.
    let push = tokio::spawn(
        async move {
            let _recv = recv;
            let (mut cluster_open, mut catalog_open) = (true, true);
            while cluster_open || catalog_open {
                let sent = tokio::select! {
                    r = cluster.changed(), if cluster_open => match r {
                        Ok(()) => {
                            let view = cluster.borrow_and_update().clone();
                            write_message(&mut send, &Message::ClusterUpdate { cluster: view }).await
                        }
                        Err(_) => { cluster_open = false; Ok(()) }
                    },
                    r = catalog.changed(), if catalog_open => match r {
                        Ok(()) => {
                            let cat = catalog.borrow_and_update().clone();
                            write_catalog(&mut send, &cat).await
                        }
                        Err(_) => { catalog_open = false; Ok(()) }
                    },
                };
                if sent.is_err() {
                    return;
                }
            }
            // Nothing will change any more (a fixed view): keep the stream open.
            std::future::pending::<()>().await
        }
        .in_current_span(),
    );
    let result = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let config = config.clone();
                let conn = conn.clone();
                let udp_flows = udp_flows.clone();
                tokio::spawn(async move { flow(conn, send, recv, config, udp_flows).await }.in_current_span());
            }
            Err(quinn::ConnectionError::ApplicationClosed(_)) | Err(quinn::ConnectionError::LocallyClosed) => {
                break Ok(())
            }
            Err(e) => break Err(e.into()),
        }
    };
    datagrams.abort();
    push.abort();
    result
}

/// Sends the namespaces and Services.
async fn write_catalog(send: &mut quinn::SendStream, cat: &crate::cluster::Catalog) -> Result<(), tpvpn_tunnel::Error> {
    write_message(send, &Message::Namespaces { names: cat.namespaces.clone() }).await?;
    write_message(send, &Message::Services { services: cat.services.clone() }).await
}

async fn route_datagrams(conn: quinn::Connection, flows: UdpFlows) {
    while let Ok(d) = conn.read_datagram().await {
        let Ok(dg) = Datagram::parse(&d) else {
            debug!("dropping malformed datagram");
            continue;
        };
        let tx = flows.lock().ok().and_then(|f| f.get(&dg.flow_id).cloned());
        match tx {
            Some(tx) => {
                // A full queue drops the datagram, as a congested link would.
                let _ = tx.try_send(d.slice(d.len() - dg.payload.len()..));
            }
            None => debug!(flow = dg.flow_id, "datagram for unknown udp flow"),
        }
    }
}

async fn flow(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    config: Shared,
    udp_flows: UdpFlows,
) {
    let open = match read_message(&mut recv).await {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(e) => {
            debug!(error = %e, "bad flow header");
            let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
            return;
        }
    };
    if let Message::DnsQuery { query } = open {
        return crate::dns::answer(send, query, &config).await;
    }
    let Message::FlowOpen { protocol, flow_id, src, dst } = open else {
        let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
        return;
    };
    let span = info_span!("flow", proto = ?protocol, %src, %dst, id = flow_id);
    async move {
        match protocol {
            Protocol::Tcp => {
                let _g = Gauge::new(&config.metrics.tcp_flows, &config.metrics.tcp_flows_total);
                crate::tcp::relay(send, recv, dst, &config).await
            }
            Protocol::Udp => {
                let _g = Gauge::new(&config.metrics.udp_flows, &config.metrics.udp_flows_total);
                crate::udp::relay(conn, send, recv, flow_id, dst, &config, udp_flows).await
            }
            Protocol::Other(p) => {
                let reply = Message::FlowReply {
                    status: FlowStatus::Denied,
                    message: format!("protocol {p} is not supported"),
                };
                let _ = write_message(&mut send, &reply).await;
                let _ = send.finish();
            }
        }
    }
    .instrument(span)
    .await
}
