//! Personal intercepts (protocol v3): a captured pod port routed per HTTP request.
//!
//! A pod port may be taken by several intercepts at once: at most one global (every
//! connection) and any number of personal ones (requests matching their
//! [`Matchers`]). While only a global one holds it, a captured connection goes whole to
//! its laptop (as in v2, any protocol). Once a personal one holds it, the first bytes
//! of each connection are read ([`sniff`]): an HTTP/1.x request line or the HTTP/2
//! preface is served by hyper, and every request (every HTTP/2 stream) is sent where
//! its headers say: the most specific personal intercept that matches, else the global
//! one, else the pod's own server. Anything else (TLS, a binary protocol, a caller that
//! says nothing for [`SNIFF_TIMEOUT`]) goes whole to the global intercept or the pod,
//! untouched.
//!
//! Upstream connections are kept per caller connection, destination and protocol, and
//! end with it: never shared between caller connections (a laptop that vanished, or a
//! caller's stalled HTTP/2 stream, holds up no other caller; one caller's framing, read
//! differently by the app, never meets another caller's request: audit B-11). To the
//! pod: from a socket in its namespace that capture lets through (the agent's mark),
//! from the caller's own address (see [`crate::replies`]); to a laptop: over a tunnel
//! stream (`InterceptOpen` with the personal intercept's capture id, the manager's
//! `FlowReply`, then a byte stream to the laptop's server). Requests pass with their
//! method, path, `Host` and end-to-end headers unchanged (HTTP/1 header case kept), less
//! what was for the hop to the agent only ([`for_next_hop`]); toward a laptop the
//! caller's address is added to `X-Forwarded-For` (the pod sees it as the connection's
//! source). An `Upgrade` (WebSocket)
//! answered with 101 joins the two upgraded connections; an offer to upgrade to HTTP/2
//! ([`decline_h2c`]) is declined, so the connection stays routed per request. A laptop
//! whose intercept has no owner any more (`FlowReply` denied, or no manager) gives its
//! requests to the pod; a kept connection found closed as a request goes out is replaced
//! once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TE, UPGRADE, VARY};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::{FlowStatus, Matchers, Message};
use tracing::debug;

/// The HTTP/2 connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a captured connection may take to show its first bytes.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest method name taken for HTTP.
const METHOD_MAX: usize = 20;
/// Idle HTTP/1 connections a caller connection keeps per destination.
const POOL_MAX: usize = 32;
/// How long a laptop may take to answer for a request's connection.
const LAPTOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams toward one intercept's laptop a captured pod port may have open at once (one
/// per upstream HTTP/1 connection or HTTP/2 connection, or per whole connection of a
/// global intercept). Past it, connections and requests for that laptop go to the pod:
/// callers that stall many streams (asking for answers they never read) hold these,
/// never the node's other intercepts' share of the agent's connection.
pub const LAPTOP_STREAMS: usize = 256;
/// How long a caller's connection may take to send a request head, counted (as hyper
/// does) from when the agent waits for it: it also ends a keep-alive connection idle that
/// long. nginx's own `keepalive_timeout`, which callers of such apps already live with.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);
/// The most an HTTP/1 connection buffers (a request head must fit): bounded memory per
/// parsed connection (hyper's default is about 400 KiB).
const H1_MAX_BUF: usize = 64 * 1024;
/// HTTP/2 streams a caller may have open at once on one connection, and the windows of
/// every HTTP/2 connection the agent holds (caller and upstream): a peer that never reads
/// pins at most these, not hyper's defaults of several MiB per connection.
const H2_STREAMS: u32 = 128;
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Too few bytes to tell.
    NeedMore,
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 preface (prior knowledge, as h2c and gRPC clients send it).
    Http2,
    /// Anything else (a TLS handshake, another protocol).
    Other,
}

/// Longest first line taken for an HTTP/1 request line (nginx's default limit); a
/// connection whose first line is longer passes whole.
pub const REQUEST_LINE_MAX: usize = 8 * 1024;

/// Classifies the first bytes of a connection. Only tells the protocol apart: hyper
/// parses. Once it is not [`Sniff::NeedMore`], more bytes never change the answer. HTTP/1
/// is a whole first line `METHOD TARGET HTTP/1.x` (within [`REQUEST_LINE_MAX`]): other
/// client-first text that starts like one (a PROXY protocol preamble, `SET key value`)
/// is not, and passes whole.
pub fn sniff(b: &[u8]) -> Sniff {
    if b.is_empty() {
        return Sniff::NeedMore;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Sniff::Http2 } else { Sniff::NeedMore };
    }
    // A method (an upper-case token), one space, and a request target.
    for (i, &c) in b.iter().enumerate().take(METHOD_MAX + 1) {
        if c == b' ' {
            return match (i, b.get(i + 1)) {
                (0, _) => Sniff::Other,
                (_, None) => Sniff::NeedMore,
                (_, Some(t)) if *t == b'/' || *t == b'*' || t.is_ascii_alphanumeric() => request_line(b),
                _ => Sniff::Other,
            };
        }
        if !(c.is_ascii_uppercase() || c == b'-' || c == b'_') {
            return Sniff::Other;
        }
    }
    if b.len() > METHOD_MAX {
        Sniff::Other
    } else {
        Sniff::NeedMore
    }
}

/// Whether the first line of `b` (which starts like a request line) ends as one.
fn request_line(b: &[u8]) -> Sniff {
    let head = &b[..b.len().min(REQUEST_LINE_MAX + 1)];
    match head.iter().position(|&c| c == b'\n') {
        Some(end) => {
            let line = head[..end].strip_suffix(b"\r").unwrap_or(&head[..end]);
            if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                Sniff::Http1
            } else {
                Sniff::Other
            }
        }
        None if b.len() > REQUEST_LINE_MAX => Sniff::Other,
        None => Sniff::NeedMore,
    }
}

/// Reads from `caller` until [`sniff`] can tell (or [`SNIFF_TIMEOUT`], or the end:
/// then it is [`Sniff::Other`]); the bytes read, to be passed on first.
pub async fn read_prefix(caller: &mut TcpStream) -> (Sniff, Vec<u8>) {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let s = sniff(&buf);
        if s != Sniff::NeedMore {
            return (s, buf);
        }
        let mut chunk = [0u8; 2048];
        match tokio::time::timeout_at(deadline, caller.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (Sniff::Other, buf),
        }
    }
}

/// One intercept of a pod port, as the agent routes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The manager's capture id (what `InterceptOpen` names).
    pub id: u64,
    pub matchers: Matchers,
}

/// Whether a request with `headers` and `path` matches: every header has a value equal
/// to the matcher's (names are case-insensitive), and the path starts with the prefix.
pub fn matches(m: &Matchers, headers: &HeaderMap, path: &str) -> bool {
    m.headers
        .iter()
        .all(|(name, value)| headers.get_all(name.as_str()).iter().any(|v| v.as_bytes() == value.as_bytes()))
        && path.starts_with(&m.path_prefix)
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// The pod's own server.
    Pod,
    /// The laptop of capture `id`.
    Laptop(u64),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Pod => f.write_str("the pod"),
            Dest::Laptop(id) => write!(f, "the laptop of capture {id}"),
        }
    }
}

/// A request's destination: the first personal route that matches (routes are kept most
/// specific first), else the global one, else the pod.
pub fn choose(routes: &[Route], headers: &HeaderMap, path: &str) -> Dest {
    routes
        .iter()
        .find(|r| !r.matchers.is_empty() && matches(&r.matchers, headers, path))
        .or_else(|| routes.iter().find(|r| r.matchers.is_empty()))
        .map_or(Dest::Pod, |r| Dest::Laptop(r.id))
}

/// The `Vary` value for an answer from `dest`: the header names of the personal route
/// that chose it (none for the pod or the global route).
fn vary_of(routes: &[Route], dest: Dest) -> Option<HeaderValue> {
    let Dest::Laptop(id) = dest else { return None };
    let route = routes.iter().find(|r| r.id == id && !r.matchers.is_empty())?;
    let names: Vec<&str> = route.matchers.headers.iter().map(|(k, _)| k.as_str()).collect();
    HeaderValue::from_str(&names.join(", ")).ok().filter(|_| !names.is_empty())
}

/// Declines an HTTP/1.1 request's offer to upgrade to HTTP/2 (`Upgrade: h2c`, with its
/// `HTTP2-Settings` and their `Connection` tokens): whichever server accepted it would
/// get the connection whole, every later request on it past the routing. The request
/// goes on as HTTP/1.1, as RFC 9110 lets any intermediary do (and Envoy does); other
/// upgrades (WebSocket) stay.
pub fn decline_h2c(headers: &mut HeaderMap) {
    let tokens = |h: &HeaderMap, name| -> Vec<String> {
        let values = h.get_all(name).iter().filter_map(|v| v.to_str().ok());
        values.flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect()
    };
    let without = |tokens: Vec<String>, gone: &[&str]| -> Vec<String> {
        tokens.into_iter().filter(|t| !gone.iter().any(|g| t.eq_ignore_ascii_case(g))).collect()
    };
    let put = |h: &mut HeaderMap, name, tokens: Vec<String>| {
        h.remove(&name);
        if let Ok(v) = HeaderValue::from_str(&tokens.join(", ")) {
            if !tokens.is_empty() {
                h.insert(name, v);
            }
        }
    };
    let offered = tokens(headers, UPGRADE);
    if !offered.iter().any(|t| t.eq_ignore_ascii_case("h2c")) {
        return;
    }
    let upgrades = without(offered, &["h2c"]);
    let mut gone = vec!["http2-settings"];
    if upgrades.is_empty() {
        gone.push("upgrade");
    }
    let connection = without(tokens(headers, CONNECTION), &gone);
    headers.remove("http2-settings");
    put(headers, UPGRADE, upgrades);
    put(headers, CONNECTION, connection);
}

/// Readies a request's headers for the hop from the agent to the app or a laptop, as an
/// intermediary does (RFC 9110 7.6.1; audit B-11): removes the headers `Connection`
/// names (never `Host`), `Connection` itself, `Keep-Alive`, `Proxy-Connection`, `Expect`
/// (hyper has answered `100 Continue` to the caller as it reads the body, which it sends
/// on whole), `TE` other than `trailers` (gRPC's), `Upgrade` unless the request
/// `upgrade`s (then `Connection: upgrade` is all that is left of `Connection`), and
/// every header whose name has an `_` (servers that read it as `-` would see a second
/// `Content-Length` or `Transfer-Encoding` no one else saw). The framing headers are
/// hyper's own: `Content-Length` is written anew from the body's length.
pub fn for_next_hop(headers: &mut HeaderMap, upgrade: bool) {
    let nominated: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| *n != HOST && !(upgrade && *n == UPGRADE))
        .collect();
    for name in nominated {
        headers.remove(name);
    }
    for name in [CONNECTION, EXPECT, HeaderName::from_static("keep-alive"), HeaderName::from_static("proxy-connection")]
    {
        headers.remove(name);
    }
    let trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")));
    headers.remove(TE);
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    let underscored: Vec<HeaderName> = headers.keys().filter(|n| n.as_str().contains('_')).cloned().collect();
    for name in underscored {
        headers.remove(name);
    }
    if upgrade && headers.contains_key(UPGRADE) {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// Why an upstream connection could not be had.
#[derive(Debug, Clone)]
pub(crate) enum DialError {
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

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(H2Sender),
}

type H2Sender = hyper::client::conn::http2::SendRequest<Incoming>;

/// A new HTTP/2 connection being made, awaited by every stream that asks meanwhile.
type H2Dial = futures::future::Shared<Pin<Box<dyn std::future::Future<Output = Result<H2Sender, DialError>> + Send>>>;

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

type Body = Either<Incoming, Full<Bytes>>;

/// The routes of one captured pod port and its upstream connections.
pub struct Router {
    conn: quinn::Connection,
    /// The pod's network namespace (where pod connections are made from).
    ns: PathBuf,
    /// In place while connections to the pod come from their callers' addresses
    /// ([`crate::replies`]); without it, from the pod's own.
    replies: Option<crate::replies::Replies>,
    routes: RwLock<Vec<Route>>,
    laptop_streams: LaptopStreams,
}

/// Upstream connections by destination and protocol (HTTP/2 or not), and the HTTP/2
/// connections being made.
#[derive(Default)]
struct Pools {
    conns: Mutex<HashMap<(Dest, bool), Vec<Sender>>>,
    h2_dials: Mutex<HashMap<Dest, H2Dial>>,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Dest, bool), Vec<Sender>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This caller connection's connection to `dest`: an HTTP/1 one once its last
    /// response is done (the caller sends a request after the answer to the one before),
    /// the HTTP/2 one shared.
    async fn take_own(&self, dest: Dest, h2: bool) -> Option<Sender> {
        loop {
            let s = {
                let mut pools = self.lock();
                let list = pools.get_mut(&(dest, h2))?;
                list.retain(|s| !s.is_closed());
                match list.first() {
                    Some(Sender::H2(s)) => return Some(Sender::H2(s.clone())),
                    Some(Sender::H1(_)) => list.pop()?,
                    None => return None,
                }
            };
            if let Sender::H1(mut s) = s {
                if s.ready().await.is_ok() {
                    return Some(Sender::H1(s));
                }
            }
        }
    }

    fn put(&self, dest: Dest, h2: bool, s: Sender) {
        let mut pools = self.lock();
        let list = pools.entry((dest, h2)).or_default();
        if list.len() < POOL_MAX && !s.is_closed() {
            list.push(s);
        }
    }
}

impl Router {
    pub fn new(conn: quinn::Connection, ns: PathBuf, replies: Option<crate::replies::Replies>) -> Arc<Router> {
        Arc::new(Router { conn, ns, replies, routes: RwLock::default(), laptop_streams: LaptopStreams::default() })
    }

    /// The address a connection to the pod for a caller at `src` comes from: the
    /// caller's, or (without the policy route) the pod's own.
    pub(crate) fn source_of(&self, src: SocketAddr) -> Option<IpAddr> {
        self.replies.as_ref().map(|_| src.ip())
    }

    /// Opens a stream to the laptop of intercept `id` through the manager and asks for
    /// the connection from `src` to `dst` (the manager's reply: the laptop's dial).
    /// [`DialError::Busy`] past [`LAPTOP_STREAMS`]; [`DialError::NoOwner`] without a
    /// manager or an owner. Bounded by [`LAPTOP_TIMEOUT`].
    async fn open_laptop(&self, id: u64, src: SocketAddr, dst: SocketAddr) -> Result<Tunnel, DialError> {
        let permit = self.laptop_streams.permit(id).ok_or(DialError::Busy)?;
        let opened = async {
            // Without the manager no laptop can be reached: the connection is the pod's.
            let lost = |_| DialError::NoOwner;
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(lost)?;
            write_message(&mut send, &Message::InterceptOpen { id, src, dst }).await.map_err(|_| DialError::NoOwner)?;
            match read_message(&mut recv).await.map_err(|_| DialError::NoOwner)? {
                Some(Message::FlowReply { status: FlowStatus::Ok, .. }) => Ok(Tunnel { send, recv, permit }),
                Some(Message::FlowReply { status: FlowStatus::Denied, .. }) => Err(DialError::NoOwner),
                Some(Message::FlowReply { message, .. }) => Err(DialError::Refused(message)),
                other => Err(DialError::Failed(format!("unexpected reply {:?}", other.as_ref().map(Message::kind)))),
            }
        };
        tokio::time::timeout(LAPTOP_TIMEOUT, opened).await.map_err(|_| DialError::Timeout)?
    }

    /// A whole connection to the laptop of global intercept `id`: the stream's two
    /// halves (and its share of [`LAPTOP_STREAMS`]), or why not ([`Router::open_laptop`]).
    pub(crate) async fn open_whole(
        &self,
        id: u64,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, OwnedSemaphorePermit), DialError> {
        self.open_laptop(id, src, dst).await.map(|t| (t.send, t.recv, t.permit))
    }

    pub fn ns(&self) -> &PathBuf {
        &self.ns
    }

    /// Adds (or replaces) route `id`; routes with more matchers come first.
    pub fn set_route(&self, route: Route) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        routes.retain(|r| r.id != route.id);
        routes.push(route);
        routes.sort_by_key(|r| {
            std::cmp::Reverse(r.matchers.headers.len() + usize::from(!r.matchers.path_prefix.is_empty()))
        });
    }

    /// Removes route `id`; whether any is left.
    pub fn remove_route(&self, id: u64) -> bool {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        routes.retain(|r| r.id != id);
        !routes.is_empty()
    }

    /// Removes every route: the requests of connections still open go to the pod.
    pub fn clear(&self) {
        self.routes.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The global route's capture id, and whether any personal route is in place.
    pub fn snapshot(&self) -> (Option<u64>, bool) {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        (routes.iter().find(|r| r.matchers.is_empty()).map(|r| r.id), routes.iter().any(|r| !r.matchers.is_empty()))
    }

    /// Serves one captured connection with hyper (`prefix`: the bytes already read).
    pub async fn serve(
        self: Arc<Self>,
        caller: TcpStream,
        prefix: Vec<u8>,
        h2: bool,
        src: SocketAddr,
        dst: SocketAddr,
    ) {
        let _ = caller.set_nodelay(true);
        let io = TokioIo::new(Prefixed { prefix: Bytes::from(prefix), inner: caller });
        let router = self.clone();
        let own = Arc::new(Pools::default());
        let pools = own.clone();
        let svc = hyper::service::service_fn(move |req| router.clone().forward(req, h2, src, dst, pools.clone()));
        let result = if h2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(H2_STREAMS)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .max_send_buf_size(H2_STREAM_WINDOW as usize)
                .serve_connection(io, svc)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(H1_MAX_BUF)
                .preserve_header_case(true)
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        };
        if let Err(e) = result {
            debug!(error = %e, "caller connection ended with an error");
        }
    }

    /// One request: to the laptop it matches or to the pod.
    async fn forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        h2: bool,
        src: SocketAddr,
        dst: SocketAddr,
        own: Arc<Pools>,
    ) -> Result<Response<Body>, Infallible> {
        let (mut dest, vary) = {
            let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
            let dest = choose(&routes, req.headers(), req.uri().path());
            (dest, vary_of(&routes, dest))
        };
        if !h2 {
            decline_h2c(req.headers_mut());
        }
        let upgrading = !h2 && req.headers().contains_key(UPGRADE);
        for_next_hop(req.headers_mut(), upgrading);
        match hyper::body::Body::size_hint(req.body()).exact() {
            Some(n) if req.headers().contains_key(CONTENT_LENGTH) => {
                req.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
            _ => drop(req.headers_mut().remove(CONTENT_LENGTH)),
        }
        let upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
        let sender = match self.sender(&own, dest, h2, src, dst).await {
            Err(e @ (DialError::NoOwner | DialError::Busy)) if dest != Dest::Pod => {
                debug!(%e, "on to the pod");
                dest = Dest::Pod;
                self.sender(&own, dest, h2, src, dst).await
            }
            other => other,
        };
        // A laptop sees the connection come from the tunnel: it learns the caller here.
        if let Dest::Laptop(_) = dest {
            let forwarded = match req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(before) => format!("{before}, {}", src.ip()),
                None => src.ip().to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&forwarded) {
                req.headers_mut().insert("x-forwarded-for", v);
            }
        }
        let sender = match sender {
            Ok(s) => s,
            Err(e) => return Ok(bad_gateway(&format!("{dest}: {e}"))),
        };
        debug!(?dest, method = %req.method(), path = req.uri().path(), "request");
        let mut response = send(sender, req, &own, dest).await;
        // A kept connection the server closed as the request went out: the request was
        // not sent, so once more on a new connection (HTTP/2: the one the caller
        // connection's other streams retry on too).
        if let Err(Some(req)) = response.as_mut().map_err(|e| e.take_message()) {
            let again = if h2 {
                self.sender(&own, dest, h2, src, dst).await
            } else {
                self.dial(dest, h2, src, dst, &own).await
            };
            response = match again {
                Ok(s) => send(s, req, &own, dest).await,
                Err(e) => return Ok(bad_gateway(&format!("{dest}: {e}"))),
            };
        }
        let response = response.map_err(|e| e.into_error());
        match response {
            Ok(mut resp) => {
                if let (StatusCode::SWITCHING_PROTOCOLS, Some(ours)) = (resp.status(), upgrade) {
                    let theirs = hyper::upgrade::on(&mut resp);
                    tokio::spawn(async move {
                        if let (Ok(a), Ok(b)) = (ours.await, theirs.await) {
                            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
                        }
                    });
                }
                // A laptop's answer is for the requests that carry its header: shared caches
                // (a CDN, an ingress cache) must not serve it to anyone else.
                if let (Dest::Laptop(_), Some(v)) = (dest, &vary) {
                    resp.headers_mut().append(VARY, v.clone());
                }
                Ok(resp.map(Either::Left))
            }
            Err(e) => Ok(bad_gateway(&format!("{dest}: {e}"))),
        }
    }

    /// A connection to `dest` that can take a request now: this caller connection's own,
    /// or a new one.
    async fn sender(
        self: &Arc<Self>,
        own: &Arc<Pools>,
        dest: Dest,
        h2: bool,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Sender, DialError> {
        if let Some(s) = own.take_own(dest, h2).await {
            return Ok(s);
        }
        self.dial(dest, h2, src, dst, own).await
    }

    /// A new connection to `dest`. An HTTP/2 one is kept in `own` at once, to be shared,
    /// and made once for the streams that ask while it is being made (a gRPC client's
    /// first calls arrive together): a shared future per destination.
    async fn dial(
        self: &Arc<Self>,
        dest: Dest,
        h2: bool,
        src: SocketAddr,
        dst: SocketAddr,
        own: &Arc<Pools>,
    ) -> Result<Sender, DialError> {
        use futures::FutureExt;
        let failed = |e: hyper::Error| DialError::Failed(e.to_string());
        if !h2 {
            let io = self.connect(dest, src, dst).await?;
            let (s, conn) = hyper::client::conn::http1::Builder::new()
                .preserve_header_case(true)
                .handshake(io)
                .await
                .map_err(failed)?;
            tokio::spawn(conn.with_upgrades());
            return Ok(Sender::H1(s));
        }
        let dial = {
            let mut dials = own.h2_dials.lock().unwrap_or_else(|e| e.into_inner());
            let make = || {
                // A task of its own, so that it goes on when the streams waiting for it are
                // cancelled; it holds no more than a `Weak` to the pools that hold it.
                let (router, own) = (self.clone(), Arc::downgrade(own));
                let task = tokio::spawn(async move {
                    let made = async {
                        let io = router.connect(dest, src, dst).await?;
                        let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                            .timer(TokioTimer::new())
                            .initial_stream_window_size(H2_STREAM_WINDOW)
                            .initial_connection_window_size(H2_CONNECTION_WINDOW)
                            .max_send_buf_size(H2_STREAM_WINDOW as usize)
                            .handshake(io)
                            .await
                            .map_err(failed)?;
                        tokio::spawn(conn);
                        Ok(s)
                    }
                    .await;
                    if let Some(own) = own.upgrade() {
                        if let Ok(s) = &made {
                            own.put(dest, true, Sender::H2(s.clone()));
                        }
                        own.h2_dials.lock().unwrap_or_else(|e| e.into_inner()).remove(&dest);
                    }
                    made
                });
                let joined: Pin<Box<dyn std::future::Future<Output = _> + Send>> = Box::pin(async move {
                    task.await.unwrap_or_else(|e| Err(DialError::Failed(format!("the dial failed: {e}"))))
                });
                joined.shared()
            };
            dials.entry(dest).or_insert_with(make).clone()
        };
        dial.await.map(Sender::H2)
    }

    /// A new byte stream to `dest`: a socket in the pod's namespace, or a tunnel stream.
    async fn connect(&self, dest: Dest, src: SocketAddr, dst: SocketAddr) -> Result<TokioIo<EitherIo>, DialError> {
        let io = match dest {
            Dest::Pod => Either::Left(
                crate::capture::connect_app(dst, self.ns.clone(), self.source_of(src))
                    .await
                    .map_err(|e| DialError::Failed(e.to_string()))?,
            ),
            Dest::Laptop(id) => Either::Right(self.open_laptop(id, src, dst).await?),
        };
        Ok(TokioIo::new(EitherIo(io)))
    }
}

type Sent = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Incoming>>>;

/// Sends `req` on `sender`; an HTTP/1 connection goes back to `own` (reused once its
/// response is done).
async fn send(sender: Sender, req: Request<Incoming>, own: &Pools, dest: Dest) -> Sent {
    match sender {
        Sender::H1(mut s) => {
            let sent = s.try_send_request(req);
            own.put(dest, false, Sender::H1(s));
            sent.await
        }
        Sender::H2(mut s) => s.try_send_request(req).await,
    }
}

fn bad_gateway(why: &str) -> Response<Body> {
    debug!(why, "502");
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!("tpvpn agent: no upstream: {why}\n")))));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// A connection whose first bytes were already read.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A tunnel stream as one byte stream, holding its share of [`LAPTOP_STREAMS`].
struct Tunnel {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    permit: OwnedSemaphorePermit,
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

/// A pod or a laptop connection.
struct EitherIo(Either<TcpStream, Tunnel>);

impl AsyncRead for EitherIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Either::Left(s) => Pin::new(s).poll_read(cx, buf),
            Either::Right(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EitherIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.0 {
            Either::Left(s) => Pin::new(s).poll_write(cx, buf),
            Either::Right(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Either::Left(s) => Pin::new(s).poll_flush(cx),
            Either::Right(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Either::Left(s) => Pin::new(s).poll_shutdown(cx),
            Either::Right(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_h2c_upgrade_offer_is_declined_and_nothing_else() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        let mut h = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ("x-dev", "a"),
        ]);
        decline_h2c(&mut h);
        assert_eq!(h, headers(&[("x-dev", "a")]));
        // Another upgrade offered beside it stays, and the connection's other tokens.
        let mut h = headers(&[
            ("connection", "keep-alive, upgrade"),
            ("connection", "HTTP2-Settings"),
            ("upgrade", "H2C, websocket"),
            ("http2-settings", "AAMAAABk"),
        ]);
        decline_h2c(&mut h);
        assert_eq!(h, headers(&[("connection", "keep-alive, upgrade"), ("upgrade", "websocket")]));
        let ws = headers(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-version", "13")]);
        let mut h = ws.clone();
        decline_h2c(&mut h);
        assert_eq!(h, ws, "a WebSocket upgrade is left alone");
    }

    #[test]
    fn what_was_for_the_hop_to_the_agent_stops_there() {
        let mut h = headers(&[
            ("host", "web"),
            ("connection", "keep-alive, X-Nominated, Host"),
            ("x-nominated", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("expect", "100-continue"),
            ("content_length", "5"),
            ("te", "trailers, gzip"),
            ("upgrade", "websocket"),
            ("x-dev", "a"),
        ]);
        for_next_hop(&mut h, false);
        assert_eq!(h, headers(&[("host", "web"), ("te", "trailers"), ("x-dev", "a")]));
        // A WebSocket upgrade keeps its `Upgrade`, and `Connection: upgrade` alone.
        let mut h = headers(&[("connection", "Upgrade, keep-alive"), ("upgrade", "websocket"), ("te", "gzip")]);
        for_next_hop(&mut h, true);
        assert_eq!(h, headers(&[("upgrade", "websocket"), ("connection", "upgrade")]));
    }

    #[test]
    fn sniffing_tells_http_from_the_rest() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET "), Sniff::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"OPTIONS * HTTP/1.1\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniff::NeedMore);
        assert_eq!(sniff(H2_PREFACE), Sniff::Http2);
        assert_eq!(sniff(b"\x16\x03\x01\x02\x00\x01"), Sniff::Other, "a TLS ClientHello");
        assert_eq!(sniff(b"*1\r\n$4\r\nPING\r\n"), Sniff::Other, "redis");
        assert_eq!(sniff(b"get / HTTP/1.1"), Sniff::Other);
        assert_eq!(sniff(&[b'A'; 40]), Sniff::Other);
        // Audit B-16: client-first text protocols shaped like a request line are not HTTP
        // (hyper would answer them 400): a PROXY protocol preamble (ingress controllers
        // behind a load balancer), a command of a text protocol.
        let proxy = b"PROXY TCP4 192.0.2.1 10.244.2.10 5555 8080\r\nGET / HTTP/1.1\r\nHost: web\r\n\r\n";
        assert_eq!(sniff(proxy), Sniff::Other);
        assert_eq!(sniff(b"PROXY TCP4 192.0.2.1 10.244.2.10 5555"), Sniff::NeedMore, "until the line ends");
        assert_eq!(sniff(b"\r\n\r\n\0\r\nQUIT\n\x21\x11"), Sniff::Other, "PROXY protocol v2");
        assert_eq!(sniff(b"SET key value\r\n"), Sniff::Other);
        assert_eq!(sniff(b"GET /a HTTP/1.0\n"), Sniff::Http1, "a bare LF ends a line too");
        assert_eq!(sniff(b"GET /a HTTP/1.1 \r\n"), Sniff::Other);
        let mut long = b"GET /".to_vec();
        long.resize(REQUEST_LINE_MAX + 1, b'a');
        assert_eq!(sniff(&long), Sniff::Other, "a request line past the bound passes whole");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn requests_go_to_the_most_specific_match_then_the_global_then_the_pod() {
        let m = |h: &[(&str, &str)], p: &str| Matchers {
            headers: h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            path_prefix: p.into(),
        };
        let mut routes = vec![
            Route { id: 1, matchers: m(&[("x-dev", "a")], "") },
            Route { id: 2, matchers: m(&[("x-dev", "b")], "") },
        ];
        assert_eq!(choose(&routes, &headers(&[("X-Dev", "a")]), "/"), Dest::Laptop(1));
        assert_eq!(choose(&routes, &headers(&[("x-dev", "b")]), "/x"), Dest::Laptop(2));
        assert_eq!(choose(&routes, &headers(&[("x-dev", "c")]), "/"), Dest::Pod);
        assert_eq!(choose(&routes, &headers(&[("x-dev", "A")]), "/"), Dest::Pod, "values are exact");
        assert_eq!(
            choose(&routes, &headers(&[("x-dev", "c"), ("x-dev", "b")]), "/"),
            Dest::Laptop(2),
            "any value of a repeated header"
        );
        routes.push(Route { id: 3, matchers: Matchers::default() });
        assert_eq!(choose(&routes, &headers(&[]), "/"), Dest::Laptop(3));
        routes.insert(0, Route { id: 4, matchers: m(&[("x-dev", "a")], "/api") });
        assert_eq!(choose(&routes, &headers(&[("x-dev", "a")]), "/api/v1"), Dest::Laptop(4));
        assert_eq!(choose(&routes, &headers(&[("x-dev", "a")]), "/ap"), Dest::Laptop(1));
    }
}
