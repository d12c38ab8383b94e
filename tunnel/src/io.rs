//! Thin async helpers that move [`Message`]s and [`UdpRecord`]s over quinn streams.
//! All parsing is done by the sans-IO types; these only read exact lengths.

use quinn::{ReadExactError, RecvStream, SendStream};

use crate::frame::{Frame, FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD};
use crate::{Error, Message, Result, UdpRecord};

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first.
async fn read_exact_or_end(recv: &mut RecvStream, buf: &mut [u8]) -> Result<bool> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(true),
        Err(ReadExactError::FinishedEarly(0)) => Ok(false),
        Err(ReadExactError::FinishedEarly(_)) => Err(Error::UnexpectedEnd),
        Err(ReadExactError::ReadError(quinn::ReadError::Reset(code))) => Err(Error::Reset(code.into_inner())),
        Err(ReadExactError::ReadError(e)) => Err(Error::Stream(e.to_string())),
    }
}

/// Reads one frame; `Ok(None)` when the stream ends cleanly before it.
pub async fn read_message(recv: &mut RecvStream) -> Result<Option<Message>> {
    read_message_max(recv, MAX_FRAME_PAYLOAD).await
}

/// [`read_message`] for a frame whose payload may be at most `max` bytes (a hello from
/// a peer not yet authenticated). Memory grows with the bytes that arrive, never with
/// the length a header claims.
pub async fn read_message_max(recv: &mut RecvStream, max: usize) -> Result<Option<Message>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    if !read_exact_or_end(recv, &mut header).await? {
        return Ok(None);
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > max.min(MAX_FRAME_PAYLOAD) {
        return Err(Error::TooLong(len));
    }
    let total = FRAME_HEADER_LEN + len;
    let mut buf = Vec::with_capacity(total.min(READ_STEP));
    buf.extend_from_slice(&header);
    while buf.len() < total {
        match recv.read_chunk(total - buf.len(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(Error::UnexpectedEnd),
            Err(quinn::ReadError::Reset(code)) => return Err(Error::Reset(code.into_inner())),
            Err(e) => return Err(Error::Stream(e.to_string())),
        }
    }
    Message::parse(&Frame::new_checked(&buf[..])?).map(Some)
}

/// What a frame's buffer starts with before its bytes arrive.
const READ_STEP: usize = 16 * 1024;

/// Reads frames from `recv` in a task of its own and hands them over a channel, ended by
/// the stream's end (`Ok(None)`) or its first error. A read of a frame is not safe to
/// cancel (the bytes of a half-read frame would be lost), so code that waits for frames
/// among other things waits on this channel instead.
pub fn frames(mut recv: RecvStream) -> tokio::sync::mpsc::Receiver<Result<Option<Message>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let r = read_message(&mut recv).await;
            let last = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

/// Writes one frame.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<()> {
    send.write_all(&msg.to_vec()?).await.map_err(|e| Error::Stream(e.to_string()))
}

/// The far side's answer to an intercepted connection offered with [`open_intercept`].
#[derive(Debug)]
pub struct Offered {
    pub send: SendStream,
    pub recv: RecvStream,
    pub status: crate::FlowStatus,
    pub message: String,
}

/// Offers an intercepted connection from `src` to `dst`, for intercept `id`, on a new
/// stream of `conn` (the agent to the manager, the manager to the laptop): `InterceptOpen`,
/// then the far side's `FlowReply`. With `FlowStatus::Ok` the stream then carries the
/// connection's bytes. Bounded by nothing: the caller sets the deadline.
pub async fn open_intercept(
    conn: &quinn::Connection,
    id: u64,
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
) -> Result<Offered> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| Error::Stream(e.to_string()))?;
    write_message(&mut send, &Message::InterceptOpen { id, src, dst }).await?;
    match read_message(&mut recv).await? {
        Some(Message::FlowReply { status, message }) => Ok(Offered { send, recv, status, message }),
        Some(other) => Err(Error::Stream(format!("expected a FlowReply, got {}", other.kind()))),
        None => Err(Error::UnexpectedEnd),
    }
}

/// Reads one UDP record into `buf` (replacing its contents); `Ok(false)` at a clean end.
pub async fn read_udp_record(recv: &mut RecvStream, buf: &mut Vec<u8>) -> Result<bool> {
    let mut header = [0u8; UdpRecord::HEADER_LEN];
    if !read_exact_or_end(recv, &mut header).await? {
        return Ok(false);
    }
    let len = usize::from(u16::from_be_bytes(header));
    buf.clear();
    buf.resize(len, 0);
    if len > 0 && !read_exact_or_end(recv, buf).await? {
        return Err(Error::UnexpectedEnd);
    }
    Ok(true)
}

/// Writes one UDP record.
pub async fn write_udp_record(send: &mut SendStream, payload: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(payload.len() + UdpRecord::HEADER_LEN);
    UdpRecord { payload }.emit(&mut out)?;
    send.write_all(&out).await.map_err(|e| Error::Stream(e.to_string()))
}

/// DNS message exchange over UDP and TCP, used by both ends to forward DNS: the client
/// to the laptop's original nameservers, the manager to the cluster DNS.
pub mod dns {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpStream, UdpSocket};

    /// Whether `answer` has the TC (truncated) flag.
    pub fn truncated(answer: &[u8]) -> bool {
        answer.get(2).is_some_and(|flags| flags & 0x02 != 0)
    }

    fn timed_out(server: SocketAddr) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer from {server}"))
    }

    /// Sends `query` to `server` over UDP (`tries` times, `timeout` each) and returns the
    /// first answer with the query's id.
    pub async fn over_udp(server: SocketAddr, query: &[u8], timeout: Duration, tries: u32) -> std::io::Result<Vec<u8>> {
        let bind: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(server).await?;
        let mut buf = vec![0u8; 65_535];
        for _ in 0..tries {
            socket.send(query).await?;
            let deadline = tokio::time::Instant::now() + timeout;
            while let Ok(r) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                let n = r?;
                if n >= 12 && query.len() >= 2 && buf[..2] == query[..2] {
                    return Ok(buf[..n].to_vec());
                }
            }
        }
        Err(timed_out(server))
    }

    /// Writes one length-prefixed DNS message (RFC 1035, 4.2.2).
    pub async fn write_framed(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
        let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("dns message over 65535 bytes"))?;
        let mut out = Vec::with_capacity(msg.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(msg);
        s.write_all(&out).await
    }

    /// Reads one length-prefixed DNS message; `Ok(None)` at a clean end of stream.
    pub async fn read_framed(s: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 2];
        match s.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut msg).await?;
        Ok(Some(msg))
    }

    /// Sends `query` to `server` over TCP and returns the answer, within `timeout`.
    pub async fn over_tcp(server: SocketAddr, query: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
        let exchange = async {
            let mut s = TcpStream::connect(server).await?;
            write_framed(&mut s, query).await?;
            read_framed(&mut s).await?.ok_or_else(|| std::io::Error::other("closed before answering"))
        };
        tokio::time::timeout(timeout, exchange).await.unwrap_or_else(|_| Err(timed_out(server)))
    }
}
