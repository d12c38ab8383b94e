//! The agent's connections onward from a captured pod port: to the pod's app (a socket
//! made in the pod's namespace, on its long-lived thread: [`crate::netns::NsHandle`]) and
//! to an intercept's laptop (a stream to the manager). Both the whole connections of
//! [`crate::capture`] and the requests of [`crate::http`] dial through [`Upstream`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tpvpn_tunnel::io::open_intercept;
use tpvpn_tunnel::FlowStatus;

use crate::netns::NsHandle;
use crate::nft::AGENT_MARK;
use crate::replies::Replies;
use crate::{sockdiag, Error, Result};

/// How long a laptop may take to answer for a connection.
pub const LAPTOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams toward one intercept's laptop a captured pod port may have open at once (one
/// per upstream HTTP/1 connection or HTTP/2 connection, or per whole connection of a
/// global intercept). Past it, connections and requests for that laptop go to the pod:
/// callers that stall many streams (asking for answers they never read) hold these,
/// never the node's other intercepts' share of the agent's connection.
pub const LAPTOP_STREAMS: usize = 256;

/// Why an upstream connection could not be had.
#[derive(Debug, Clone)]
pub enum DialError {
    /// The intercept has no owner any more: the request belongs to the pod.
    NoOwner,
    /// The intercept's laptop has [`LAPTOP_STREAMS`] streams open: the request goes to
    /// the pod.
    Busy,
    /// No answer from the laptop within [`LAPTOP_TIMEOUT`].
    Timeout,
    /// The laptop's side refused (nothing listens on its port, say).
    Refused(String),
    Failed(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::NoOwner => f.write_str("the intercept has no owner"),
            DialError::Busy => write!(f, "the laptop has {LAPTOP_STREAMS} streams open"),
            DialError::Timeout => f.write_str("the laptop did not answer"),
            DialError::Refused(why) | DialError::Failed(why) => f.write_str(why),
        }
    }
}

/// The streams toward each intercept's laptop ([`LAPTOP_STREAMS`] each).
#[derive(Default)]
struct LaptopStreams(Mutex<HashMap<u64, Arc<Semaphore>>>);

impl LaptopStreams {
    /// A stream toward the laptop of intercept `id`, if it has fewer than
    /// [`LAPTOP_STREAMS`] open; held as long as the stream.
    fn permit(&self, id: u64) -> Option<OwnedSemaphorePermit> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Intercepts that ended leave idle semaphores: drop them on the way.
        all.retain(|k, s| *k == id || s.available_permits() < LAPTOP_STREAMS);
        all.entry(id).or_insert_with(|| Arc::new(Semaphore::new(LAPTOP_STREAMS))).clone().try_acquire_owned().ok()
    }
}

/// Where a captured pod port's connections go on to.
pub struct Upstream {
    conn: quinn::Connection,
    /// The pod's network namespace, where connections to the app are made.
    ns: NsHandle,
    /// In place while connections to the app come from their callers' addresses
    /// ([`crate::replies`]); without it, from the pod's own.
    replies: Option<Replies>,
    laptop_streams: LaptopStreams,
}

impl Upstream {
    pub fn new(conn: quinn::Connection, ns: NsHandle, replies: Option<Replies>) -> Upstream {
        Upstream { conn, ns, replies, laptop_streams: LaptopStreams::default() }
    }

    /// The pod's network namespace.
    pub fn ns(&self) -> &NsHandle {
        &self.ns
    }

    /// A connection to the app at `dst` for the caller at `src`: from the caller's own
    /// address (audit B-13: the app sees its callers, not itself) while the policy route
    /// is in place, else from the pod's.
    pub async fn app(&self, dst: SocketAddr, src: SocketAddr) -> std::io::Result<TcpStream> {
        let from = self.replies.as_ref().map(|_| src.ip());
        let socket =
            self.ns.run(move || app_socket(dst, from)).await.map_err(|e| std::io::Error::other(e.to_string()))?;
        let app = TcpSocket::from_std_stream(socket).connect(dst).await?;
        let _ = app.set_nodelay(true);
        Ok(app)
    }

    /// Opens a stream to the laptop of intercept `id` through the manager and asks for
    /// the connection from `src` to `dst` (the manager's reply: the laptop's dial).
    /// [`DialError::Busy`] past [`LAPTOP_STREAMS`]; [`DialError::NoOwner`] without a
    /// manager or an owner. Bounded by [`LAPTOP_TIMEOUT`].
    pub async fn laptop(&self, id: u64, src: SocketAddr, dst: SocketAddr) -> std::result::Result<Tunnel, DialError> {
        let permit = self.laptop_streams.permit(id).ok_or(DialError::Busy)?;
        let opened = async {
            // Without the manager no laptop can be reached: the connection is the pod's.
            let o = open_intercept(&self.conn, id, src, dst).await.map_err(|_| DialError::NoOwner)?;
            match o.status {
                FlowStatus::Ok => Ok(Tunnel { send: o.send, recv: o.recv, permit }),
                FlowStatus::Denied => Err(DialError::NoOwner),
                _ => Err(DialError::Refused(o.message)),
            }
        };
        tokio::time::timeout(LAPTOP_TIMEOUT, opened).await.map_err(|_| DialError::Timeout)?
    }
}

/// Tries at most this many source ports for a transparent connection.
const SOURCE_PORT_TRIES: usize = 8;

/// A socket for a connection to the app at `dst`, in the calling thread's namespace,
/// marked; with `from`, bound to that address (`IP_TRANSPARENT`) on a port the kernel
/// picks. The caller's own connection to the app has the same addresses: a port that
/// makes the 4-tuple of a live socket there (the caller's captured connection, one it
/// opened before the capture) would land this connection's packets in that socket, so
/// such a port is passed over, kept bound meanwhile, so that the kernel offers another.
fn app_socket(dst: SocketAddr, from: Option<IpAddr>) -> Result<std::net::TcpStream> {
    let new = || -> Result<Socket> {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(AGENT_MARK)?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    let Some(from) = from else { return Ok(new()?.into()) };
    let mut passed_over = Vec::new();
    for _ in 0..SOURCE_PORT_TRIES {
        let s = new()?;
        if from.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.bind(&SocketAddr::new(from, 0).into())?;
        let local = s.local_addr()?.as_socket().ok_or_else(|| Error::Netns("a socket without an address".into()))?;
        if !sockdiag::taken(dst, local)? {
            return Ok(s.into());
        }
        passed_over.push(s);
    }
    Err(Error::Netns(format!("no free source port for {from} to {dst} in {SOURCE_PORT_TRIES} tries")))
}

/// A tunnel stream as one byte stream, holding its share of [`LAPTOP_STREAMS`].
pub struct Tunnel {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub permit: OwnedSemaphorePermit,
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}
