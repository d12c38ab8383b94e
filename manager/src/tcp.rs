//! TCP flows: dial the destination, answer the client with the outcome, then relay both
//! directions ([`relay::tcp`]), keeping half-close (FIN) and reset (RST) faithful.

use std::io::ErrorKind;
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tpvpn_tunnel::io::write_message;
use tpvpn_tunnel::relay::{self, Direction};
use tpvpn_tunnel::{FlowStatus, Message, RESET_CODE};
use tracing::debug;

use crate::metrics::add;
use crate::Config;

/// Maps a dial error to what the client's netstack should tell the application.
fn dial_status(e: &std::io::Error) -> FlowStatus {
    match e.kind() {
        ErrorKind::ConnectionRefused => FlowStatus::Refused,
        ErrorKind::TimedOut => FlowStatus::TimedOut,
        _ => FlowStatus::Unreachable,
    }
}

pub(crate) async fn relay(mut send: quinn::SendStream, mut recv: quinn::RecvStream, dst: SocketAddr, config: &Config) {
    let dial = tokio::time::timeout(config.dial_timeout, TcpStream::connect(dst)).await;
    if let Ok(Err(e)) = &dial {
        if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) {
            // The handshake completed and the destination reset at once (before the
            // connect finished here): connected, then reset, as the application would
            // have seen it.
            debug!("destination accepted and reset at once");
            if write_message(&mut send, &Message::FlowReply { status: FlowStatus::Ok, message: String::new() })
                .await
                .is_ok()
            {
                let _ = send.reset(RESET_CODE.into());
                let _ = recv.stop(RESET_CODE.into());
            }
            return;
        }
    }
    let (status, message, stream) = match dial {
        Ok(Ok(s)) => (FlowStatus::Ok, String::new(), Some(s)),
        Ok(Err(e)) => (dial_status(&e), e.to_string(), None),
        Err(_) => (FlowStatus::TimedOut, format!("no answer within {:?}", config.dial_timeout), None),
    };
    debug!(?status, %message, "dialed");
    let m = &config.metrics;
    match status {
        FlowStatus::Refused => add(&m.dial_failures_refused, 1),
        FlowStatus::TimedOut => add(&m.dial_failures_timeout, 1),
        FlowStatus::Ok => {}
        _ => add(&m.dial_failures_unreachable, 1),
    }
    if write_message(&mut send, &Message::FlowReply { status, message }).await.is_err() {
        return;
    }
    let Some(stream) = stream else {
        let _ = send.finish();
        return;
    };
    let end = relay::tcp(stream, send, recv, config.relay_buffer, |dir, n| match dir {
        Direction::ToTcp => add(&m.bytes_to_cluster, n),
        Direction::ToStream => add(&m.bytes_from_cluster, n),
    })
    .await;
    debug!(?end, "flow ended");
}
