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
    let mut header = [0u8; FRAME_HEADER_LEN];
    if !read_exact_or_end(recv, &mut header).await? {
        return Ok(None);
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME_PAYLOAD {
        return Err(Error::TooLong(len));
    }
    let mut buf = vec![0u8; FRAME_HEADER_LEN + len];
    buf[..FRAME_HEADER_LEN].copy_from_slice(&header);
    if len > 0 && !read_exact_or_end(recv, &mut buf[FRAME_HEADER_LEN..]).await? {
        return Err(Error::UnexpectedEnd);
    }
    Message::parse(&Frame::new_checked(&buf[..])?).map(Some)
}

/// Writes one frame.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<()> {
    send.write_all(&msg.to_vec()).await.map_err(|e| Error::Stream(e.to_string()))
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
