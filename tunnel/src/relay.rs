//! Relaying the bytes of one TCP connection carried on a QUIC stream, with TCP's
//! semantics kept both ways: a FIN is a stream FIN and back, a TCP reset is a stream
//! reset with [`RESET_CODE`] (and a `stop` of the other direction) and back. Used
//! wherever a real TCP socket meets a tunnel stream: the manager toward cluster
//! destinations, the client toward a laptop server of an intercept, the node agent
//! toward a cluster caller. [`streams`] joins two tunnel streams the same way (the
//! manager between an agent and a client).

use std::time::Duration;

use bytes::BytesMut;
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::RESET_CODE;

/// How one direction of a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Clean end of stream (FIN), passed on.
    Finished,
    /// The stream side reset: the TCP connection was reset.
    StreamReset,
    /// The TCP side reset (or failed): the stream was reset.
    TcpReset,
}

/// Which way bytes went, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the stream into the TCP socket.
    ToTcp,
    /// From the TCP socket into the stream.
    ToStream,
}

/// Relays `tcp` and the stream both ways until both directions finished or one side
/// reset; `buf_len` bytes of buffer per direction; `count` sees every chunk moved.
/// Toward the stream, what a read returns goes to quinn as it is (no copy); reads fill
/// one allocation until a quarter of it is left.
///
/// A relay that does not finish, because it is dropped (its session ended, the process
/// stops), resets `tcp`: the socket has a zero linger time until both directions have
/// finished, so its peer learns the connection is gone instead of waiting on a FIN it
/// already had (a half-closed flow left the peer in CLOSE-WAIT).
pub async fn tcp(
    mut stream: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    buf_len: usize,
    count: impl Fn(Direction, usize),
) -> End {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    let (up, down) = {
        let (mut tcp_r, mut tcp_w) = stream.split();
        let count = &count;
        let up = async {
            let mut buf = vec![0u8; buf_len];
            loop {
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        count(Direction::ToTcp, n);
                        if tcp_w.write_all(&buf[..n]).await.is_err() {
                            return End::TcpReset;
                        }
                    }
                    Ok(None) => {
                        let _ = tcp_w.shutdown().await;
                        return End::Finished;
                    }
                    Err(_) => return End::StreamReset,
                }
            }
        };
        let down = async {
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
                        count(Direction::ToStream, n);
                        if send.write_chunk(buf.split().freeze()).await.is_err() {
                            return End::StreamReset;
                        }
                    }
                    Err(_) => return End::TcpReset,
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
    if ends.contains(&Some(End::TcpReset)) {
        let _ = send.reset(RESET_CODE.into());
        let _ = recv.stop(RESET_CODE.into());
        End::TcpReset
    } else if ends.contains(&Some(End::StreamReset)) {
        // Closing with its zero linger time sends RST instead of FIN.
        let _ = send.reset(RESET_CODE.into());
        End::StreamReset
    } else {
        // Both directions finished: a graceful close from here on. Wait until the peer
        // has every byte.
        let _ = socket2::SockRef::from(&stream).set_linger(None);
        let _ = send.stopped().await;
        End::Finished
    }
}

/// Closes `stream` with a TCP reset (zero linger) instead of a FIN.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// Joins two tunnel streams (`a` and `b`, each a send and receive half) both ways: the
/// bytes as quinn hands them over (no copy), a FIN as a FIN, a reset as a reset of the
/// other side. Ends when both directions finished or either reset.
pub async fn streams(a: (SendStream, RecvStream), b: (SendStream, RecvStream)) -> End {
    let ((mut a_send, mut a_recv), (mut b_send, mut b_recv)) = (a, b);
    let (ab, ba) = {
        let a_to_b = copy(&mut a_recv, &mut b_send);
        let b_to_a = copy(&mut b_recv, &mut a_send);
        tokio::pin!(a_to_b, b_to_a);
        let (mut ab, mut ba) = (None, None);
        while ab.is_none() || ba.is_none() {
            tokio::select! {
                e = &mut a_to_b, if ab.is_none() => ab = Some(e),
                e = &mut b_to_a, if ba.is_none() => ba = Some(e),
            }
            if ab.is_some_and(|e| e != End::Finished) || ba.is_some_and(|e| e != End::Finished) {
                break;
            }
        }
        (ab, ba)
    };
    if [ab, ba].iter().any(|e| e.is_some_and(|e| e != End::Finished)) {
        for s in [&mut a_send, &mut b_send] {
            let _ = s.reset(RESET_CODE.into());
        }
        for r in [&mut a_recv, &mut b_recv] {
            let _ = r.stop(RESET_CODE.into());
        }
        End::StreamReset
    } else {
        let _ = tokio::join!(a_send.stopped(), b_send.stopped());
        End::Finished
    }
}

/// Chunks taken from a stream at once in [`streams`].
const GATHER: usize = 64;

/// One direction of [`streams`]. What the stream has ready goes on as one chunk: a lone
/// chunk as it is, several (typically one per QUIC packet received) copied into one, so
/// that quinn's send buffer holds few large chunks (walking many small ones costs its
/// sender per packet).
async fn copy(from: &mut RecvStream, to: &mut SendStream) -> End {
    let mut chunks: Vec<bytes::Bytes> = vec![bytes::Bytes::new(); GATHER];
    loop {
        match from.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                let chunk = if n == 1 {
                    std::mem::take(&mut chunks[0])
                } else {
                    let mut joined = BytesMut::with_capacity(chunks[..n].iter().map(bytes::Bytes::len).sum());
                    for c in &mut chunks[..n] {
                        joined.extend_from_slice(&std::mem::take(c));
                    }
                    joined.freeze()
                };
                if to.write_chunk(chunk).await.is_err() {
                    return End::StreamReset;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return End::Finished;
            }
            Err(_) => return End::StreamReset,
        }
    }
}
