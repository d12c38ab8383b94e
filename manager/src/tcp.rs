//! TCP flows: dial the destination, answer the client with the outcome, then relay both
//! directions, keeping half-close (FIN) and reset (RST) faithful.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tpvpn_tunnel::io::write_message;
use tpvpn_tunnel::{FlowStatus, Message, RESET_CODE};
use tracing::debug;

use crate::metrics::add;
use crate::Config;

/// How one direction of a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Clean end of stream (FIN), passed on.
    Finished,
    /// The client reset its stream: reset the TCP connection.
    ClientReset,
    /// The TCP peer reset the connection (or it failed): reset the client's stream.
    ServerReset,
}

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
    let Some(mut stream) = stream else {
        let _ = send.finish();
        return;
    };
    let _ = stream.set_nodelay(true);
    let (up, down) = {
        let (mut tcp_r, mut tcp_w) = stream.split();
        let buf_len = config.relay_buffer;
        let up = async {
            // client -> destination
            let mut buf = vec![0u8; buf_len];
            loop {
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        add(&m.bytes_to_cluster, n);
                        if tcp_w.write_all(&buf[..n]).await.is_err() {
                            return End::ServerReset;
                        }
                    }
                    Ok(None) => {
                        let _ = tcp_w.shutdown().await;
                        return End::Finished;
                    }
                    Err(_) => return End::ClientReset,
                }
            }
        };
        let down = async {
            // destination -> client: what is read goes to quinn as it is, not copied;
            // reads fill the rest of one allocation until a quarter of it is left.
            let mut buf = BytesMut::new();
            loop {
                if buf.capacity() < buf_len / 4 {
                    buf = BytesMut::with_capacity(buf_len);
                }
                match tcp_r.read_buf(&mut buf).await {
                    Ok(0) => {
                        let _ = send.finish();
                        return End::Finished;
                    }
                    Ok(n) => {
                        add(&m.bytes_from_cluster, n);
                        if send.write_chunk(buf.split().freeze()).await.is_err() {
                            return End::ClientReset;
                        }
                    }
                    Err(_) => return End::ServerReset,
                }
            }
        };
        tokio::pin!(up, down);
        let (mut up_end, mut down_end) = (None, None);
        // Run both directions; the first reset ends both.
        while up_end.is_none() || down_end.is_none() {
            tokio::select! {
                e = &mut up, if up_end.is_none() => up_end = Some(e),
                e = &mut down, if down_end.is_none() => down_end = Some(e),
            }
            if up_end.is_some_and(|e| e != End::Finished) || down_end.is_some_and(|e| e != End::Finished) {
                break;
            }
        }
        (up_end, down_end)
    };
    let ends = [up, down];
    if ends.contains(&Some(End::ServerReset)) {
        debug!("destination reset the connection");
        let _ = send.reset(RESET_CODE.into());
        let _ = recv.stop(RESET_CODE.into());
    } else if ends.contains(&Some(End::ClientReset)) {
        debug!("client reset the connection");
        // Closing with a zero linger time sends RST instead of FIN.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        let _ = send.reset(RESET_CODE.into());
    } else {
        // Both directions finished: wait until the client has every byte.
        let _ = send.stopped().await;
    }
}
