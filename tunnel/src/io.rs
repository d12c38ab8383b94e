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
