//! QUIC over a byte stream: the carrier for when the manager's UDP port cannot be
//! reached (the Kubernetes API server's port-forward, or the manager's TCP port).
//!
//! [`StreamSocket`] is a quinn [`AsyncUdpSocket`] whose "datagrams" are QUIC packets,
//! each written to the stream as a 2-byte big-endian length and the packet. Everything
//! above (TLS with the pinned certificate, streams, flow control, datagrams, the hello)
//! is the same QUIC connection as over UDP. Over a stream nothing is lost or reordered
//! and there is no path MTU, so the endpoints use [`STREAM_MTU`]-byte packets: fewer
//! packets, fewer encryptions.
//!
//! One socket has one peer: a client endpoint over the port-forward, or a manager
//! endpoint per accepted TCP connection. When the stream ends (EOF, error, or the
//! other side gone), [`StreamSocket::closed`] completes; the owner closes its
//! connection then, since QUIC itself would only notice at its idle timeout.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// QUIC packet size over a stream (the largest the 2-byte length allows is 65,535;
/// 16 KiB packets already make the per-packet cost small while a lost stream write
/// costs little).
pub const STREAM_MTU: u16 = 16 * 1024;
/// Packets queued toward the stream, in bytes, before quinn is told to wait.
const OUTBOX_LIMIT: usize = 2 << 20;
/// Packets read from the stream and not yet taken by quinn, in bytes, before the reader
/// stops reading (back-pressure onto the stream).
const INBOX_LIMIT: usize = 2 << 20;

#[derive(Default)]
struct Outbox {
    /// Length-prefixed packets not yet written.
    buf: BytesMut,
    writer: Option<Waker>,
    /// Tasks waiting for room ([`UdpPoller::poll_writable`]).
    waiting: Vec<Waker>,
    closed: bool,
}

#[derive(Default)]
struct Inbox {
    packets: VecDeque<Bytes>,
    bytes: usize,
    /// quinn's receive task.
    receiver: Option<Waker>,
    /// The reader task, waiting for room.
    reader: Option<Waker>,
}

/// A quinn socket over one byte stream to one peer. See the module docs.
pub struct StreamSocket {
    local: SocketAddr,
    peer: SocketAddr,
    outbox: Mutex<Outbox>,
    inbox: Mutex<Inbox>,
    closed: watch::Sender<Option<String>>,
}

impl fmt::Debug for StreamSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSocket").field("local", &self.local).field("peer", &self.peer).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StreamSocket {
    /// Carries QUIC packets over `stream`; `local` and `peer` are the addresses quinn
    /// sees (the peer's is what packets are addressed to and come from). Spawns the
    /// stream's reader and writer on the current tokio runtime.
    pub fn new<S>(stream: S, local: SocketAddr, peer: SocketAddr) -> Arc<StreamSocket>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (closed, _) = watch::channel(None);
        let socket = Arc::new(StreamSocket { local, peer, outbox: Mutex::default(), inbox: Mutex::default(), closed });
        let (read, write) = tokio::io::split(stream);
        let s = socket.clone();
        tokio::spawn(async move {
            let why = s.read_packets(read).await;
            s.close(why);
        });
        let s = socket.clone();
        tokio::spawn(async move {
            let why = s.write_packets(write).await;
            s.close(why);
        });
        socket
    }

    /// Completes with the reason once the stream has ended (either direction).
    pub async fn closed(&self) -> String {
        let mut rx = self.closed.subscribe();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the stream socket is gone".into(),
        };
        why
    }

    /// Whether the stream has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Ends both directions (the reader and writer tasks stop).
    pub fn close(&self, why: String) {
        self.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(why);
                true
            } else {
                false
            }
        });
        let mut out = lock(&self.outbox);
        out.closed = true;
        if let Some(w) = out.writer.take() {
            w.wake();
        }
        out.waiting.drain(..).for_each(Waker::wake);
        drop(out);
        let mut inbox = lock(&self.inbox);
        if let Some(w) = inbox.reader.take() {
            w.wake();
        }
    }

    async fn read_packets<R: AsyncRead + Unpin>(&self, mut read: R) -> String {
        let mut buf = BytesMut::with_capacity(256 * 1024);
        loop {
            // Whole packets first.
            loop {
                match next_packet(&mut buf) {
                    Ok(Some(packet)) => {
                        if !self.deliver(packet).await {
                            return "closed".into();
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return e.to_string(),
                }
            }
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(256 * 1024);
            }
            tokio::select! {
                r = read.read_buf(&mut buf) => match r {
                    Ok(0) => return "the stream ended".into(),
                    Ok(_) => {}
                    Err(e) => return format!("reading the stream: {e}"),
                },
                _ = self.closed() => return "closed".into(),
            }
        }
    }

    /// Queues a received packet for quinn, waiting while the inbox is full; false when
    /// the socket was closed.
    async fn deliver(&self, packet: Bytes) -> bool {
        let mut packet = Some(packet);
        std::future::poll_fn(|cx| {
            if self.is_closed() {
                return Poll::Ready(false);
            }
            let mut inbox = lock(&self.inbox);
            if inbox.bytes >= INBOX_LIMIT && !inbox.packets.is_empty() {
                inbox.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let p = packet.take().expect("delivered once");
            inbox.bytes += p.len();
            inbox.packets.push_back(p);
            if let Some(w) = inbox.receiver.take() {
                w.wake();
            }
            Poll::Ready(true)
        })
        .await
    }

    async fn write_packets<W: AsyncWrite + Unpin>(&self, mut write: W) -> String {
        loop {
            let chunk = std::future::poll_fn(|cx| {
                let mut out = lock(&self.outbox);
                if out.closed {
                    return Poll::Ready(None);
                }
                if out.buf.is_empty() {
                    out.writer = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                let chunk = out.buf.split().freeze();
                out.waiting.drain(..).for_each(Waker::wake);
                Poll::Ready(Some(chunk))
            })
            .await;
            let Some(chunk) = chunk else {
                let _ = write.shutdown().await;
                return "closed".into();
            };
            tokio::select! {
                r = async { write.write_all(&chunk).await?; write.flush().await } => {
                    if let Err(e) = r {
                        return format!("writing the stream: {e}");
                    }
                }
                _ = self.closed() => return "closed".into(),
            }
        }
    }
}

/// The stream is not a stream of length-prefixed QUIC packets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer sent an empty packet: not a tpvpn stream")]
pub struct EmptyPacket;

/// Takes the next whole packet (2-byte big-endian length, then that many bytes) off the
/// front of `buf`: `None` until one is complete (with room reserved for it). A zero
/// length is an error: no QUIC packet is empty.
pub fn next_packet(buf: &mut BytesMut) -> Result<Option<Bytes>, EmptyPacket> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if len == 0 {
        return Err(EmptyPacket);
    }
    if buf.len() < 2 + len {
        buf.reserve(2 + len - buf.len());
        return Ok(None);
    }
    buf.advance(2);
    Ok(Some(buf.split_to(len).freeze()))
}

impl AsyncUdpSocket for StreamSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller { socket: self })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let mut out = lock(&self.outbox);
        if out.closed {
            // Lost, as on a dead path. (An error here would end quinn's connection driver
            // at once, before the owner has heard from [`StreamSocket::closed`] why.)
            return Ok(());
        }
        if out.buf.len() >= OUTBOX_LIMIT {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // One datagram per transmit (`max_transmit_segments` is 1), but a segmented one
        // is split all the same.
        let seg = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        for packet in transmit.contents.chunks(seg) {
            let Ok(len) = u16::try_from(packet.len()) else {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "QUIC packet larger than 65,535 bytes"));
            };
            out.buf.extend_from_slice(&len.to_be_bytes());
            out.buf.extend_from_slice(packet);
        }
        if let Some(w) = out.writer.take() {
            w.wake();
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbox = lock(&self.inbox);
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some(packet) = inbox.packets.front() else { break };
            if packet.len() > bufs[n].len() {
                // Larger than quinn's receive buffer: not a packet it could have asked for.
                let p = inbox.packets.pop_front().expect("front exists");
                inbox.bytes -= p.len();
                continue;
            }
            let p = inbox.packets.pop_front().expect("front exists");
            inbox.bytes -= p.len();
            bufs[n][..p.len()].copy_from_slice(&p);
            meta[n] = RecvMeta { addr: self.peer, len: p.len(), stride: p.len(), ecn: None, dst_ip: None };
            n += 1;
        }
        if let Some(w) = inbox.reader.take() {
            w.wake();
        }
        if n > 0 {
            Poll::Ready(Ok(n))
        } else {
            inbox.receiver = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    // Nothing is fragmented, and no path MTU is discovered: [`STREAM_MTU`] is set.
    fn may_fragment(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct Poller {
    socket: Arc<StreamSocket>,
}

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let mut out = lock(&self.socket.outbox);
        if out.closed || out.buf.len() < OUTBOX_LIMIT {
            return Poll::Ready(Ok(()));
        }
        out.waiting.push(cx.waker().clone());
        Poll::Pending
    }
}

/// The endpoint settings for a stream carrier: packets of [`STREAM_MTU`] bytes.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    // Invariant: STREAM_MTU is within QUIC's 1,200..=65,527.
    c.max_udp_payload_size(STREAM_MTU).expect("STREAM_MTU is a valid payload size");
    c
}

/// `t` for a stream carrier: packets of [`STREAM_MTU`] bytes from the start, and an
/// initial congestion window of ten of them.
pub fn tune_transport(t: &mut quinn::TransportConfig) {
    t.initial_mtu(STREAM_MTU).min_mtu(STREAM_MTU).mtu_discovery_config(None).congestion_controller_factory(Arc::new(
        crate::cc::LossTolerantCubicConfig::with_initial_window(10 * u64::from(STREAM_MTU)),
    ));
}

/// A client endpoint whose one path is `stream`; connect to [`StreamSocket`]'s peer
/// address `peer`.
pub fn client_endpoint<S>(stream: S, peer: SocketAddr) -> io::Result<(quinn::Endpoint, Arc<StreamSocket>)>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let local: SocketAddr = ([127, 0, 0, 1], 1).into();
    let socket = StreamSocket::new(stream, local, peer);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(),
        None,
        socket.clone(),
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, socket))
}

/// A server endpoint for one accepted stream from `peer` (its address as quinn will
/// report it), with `server` adjusted by [`tune_transport`].
pub fn server_endpoint<S>(
    stream: S,
    local: SocketAddr,
    peer: SocketAddr,
    server: quinn::ServerConfig,
) -> io::Result<(quinn::Endpoint, Arc<StreamSocket>)>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let socket = StreamSocket::new(stream, local, peer);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(),
        Some(server),
        socket.clone(),
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> (quinn::ServerConfig, quinn::ClientConfig) {
        let ck = rcgen::generate_simple_self_signed(vec![crate::quic::SERVER_NAME.to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let server = crate::quic::server_config(vec![ck.cert.der().clone()], key).unwrap();
        let client = crate::quic::client_config(ck.cert.der().clone(), true).unwrap();
        (crate::quic::server_config_for(&server, crate::quic::Class::Tunnel, true), client)
    }

    /// A client and a server endpoint over an in-memory byte stream: the handshake, a
    /// stream of 4 MiB each way byte for byte, datagrams, and the end of the stream.
    #[tokio::test]
    async fn quic_runs_over_a_byte_stream() {
        tokio::time::timeout(std::time::Duration::from_secs(20), run()).await.expect("in time");
    }

    async fn run() {
        let (server_cfg, client_cfg) = configs();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client_addr: SocketAddr = ([10, 0, 0, 2], 5000).into();
        let server_addr: SocketAddr = ([10, 0, 0, 1], 4443).into();
        let (server, server_socket) = server_endpoint(b, server_addr, client_addr, server_cfg).unwrap();
        let (client, client_socket) = client_endpoint(a, server_addr).unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            assert_eq!(conn.remote_address(), client_addr);
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let got = recv.read_to_end(16 << 20).await.unwrap();
            send.write_all(&got).await.unwrap();
            send.finish().unwrap();
            let d = conn.read_datagram().await.unwrap();
            conn.send_datagram(d).unwrap();
            conn.closed().await;
        });
        let conn = client.connect_with(client_cfg, server_addr, crate::quic::SERVER_NAME).unwrap().await.unwrap();
        let data: Vec<u8> = (0..4 << 20).map(|i: usize| (i * 7 + (i >> 9)) as u8).collect();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        assert!(recv.read_to_end(16 << 20).await.unwrap() == data, "the echo differs");
        // Datagrams as large as the stream MTU allows.
        let max = conn.max_datagram_size().unwrap();
        assert!(max > 8000, "datagrams limited to {max} bytes over a stream");
        conn.send_datagram(Bytes::from(vec![9u8; max])).unwrap();
        assert_eq!(conn.read_datagram().await.unwrap().len(), max);
        conn.close(0u32.into(), b"bye");
        accept.await.unwrap();
        // The stream ends: the other side's socket is told.
        server_socket.close("test".into());
        assert_eq!(server_socket.closed().await, "test");
        assert!(!client_socket.closed().await.is_empty());
    }
}
