//! Personal intercepts (protocol v3): a captured pod port served per HTTP request, with
//! hyper.
//!
//! Once a personal intercept holds a port, the first bytes of each captured connection
//! are read ([`read_prefix`], [`crate::route::sniff`]): an HTTP/1.x request line or the
//! HTTP/2 preface is served here, and every request (every HTTP/2 stream) goes where
//! [`crate::route::Routes::choose`] says: the most specific personal intercept that
//! matches, else the global one, else the pod's own server. Anything else (TLS, a binary
//! protocol, a caller that says nothing for [`SNIFF_TIMEOUT`]) goes whole to the global
//! intercept or the pod, untouched ([`crate::capture`]).
//!
//! Upstream connections ([`crate::upstream`]: to the pod from the caller's own address,
//! to a laptop over a tunnel stream) are kept per caller connection, destination and
//! protocol, and end with it: never shared between caller connections (a laptop that
//! vanished, or a caller's stalled HTTP/2 stream, holds up no other caller; one caller's
//! framing, read differently by the app, never meets another caller's request: audit
//! B-11). Requests pass with their method, path, `Host` and end-to-end headers unchanged
//! (HTTP/1 header case kept), less what was for the hop to the agent only
//! ([`crate::route::for_next_hop`]); toward a laptop the caller's address is added to
//! `X-Forwarded-For` (the pod sees it as the connection's source). An `Upgrade`
//! (WebSocket) answered with 101 joins the two upgraded connections; an offer to upgrade
//! to HTTP/2 ([`crate::route::decline_h2c`]) is declined, so the connection stays routed
//! per request. A laptop whose intercept has no owner any more (`FlowReply` denied, or no
//! manager) gives its requests to the pod; a kept connection found closed as a request
//! goes out is replaced once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, UPGRADE, VARY};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::route::{decline_h2c, for_next_hop, sniff, Dest, Route, Routes, Sniff};
use crate::upstream::{DialError, Tunnel, Upstream};

/// How long a captured connection may take to show its first bytes.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle HTTP/1 connections a caller connection keeps per destination.
const POOL_MAX: usize = 32;
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

/// The routes of one captured pod port and where its connections go on to.
pub struct Router {
    routes: RwLock<Routes>,
    upstream: Upstream,
}

/// One caller connection served per request: its addresses, its protocol, and its own
/// upstream connections.
struct Caller {
    src: SocketAddr,
    dst: SocketAddr,
    h2: bool,
    own: Pools,
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
    pub fn new(upstream: Upstream) -> Arc<Router> {
        Arc::new(Router { routes: RwLock::default(), upstream })
    }

    /// Where the port's connections go on to.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    fn routes(&self) -> std::sync::RwLockWriteGuard<'_, Routes> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) route `route.id`.
    pub fn set_route(&self, route: Route) {
        self.routes().set(route);
    }

    /// Removes route `id`; whether any is left.
    pub fn remove_route(&self, id: u64) -> bool {
        self.routes().remove(id)
    }

    /// Removes every route: the requests of connections still open go to the pod.
    pub fn clear(&self) {
        self.routes().clear();
    }

    /// The global route's capture id, and whether any personal route is in place.
    pub fn snapshot(&self) -> (Option<u64>, bool) {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        (routes.global(), routes.has_personal())
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
        let caller = Arc::new(Caller { src, dst, h2, own: Pools::default() });
        let svc = hyper::service::service_fn(move |req| router.clone().forward(req, caller.clone()));
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
        caller: Arc<Caller>,
    ) -> Result<Response<Body>, Infallible> {
        let (h2, src) = (caller.h2, caller.src);
        let (mut dest, vary) =
            self.routes.read().unwrap_or_else(|e| e.into_inner()).choose(req.headers(), req.uri().path());
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
        let sender = match self.sender(&caller, dest).await {
            Err(e @ (DialError::NoOwner | DialError::Busy)) if dest != Dest::Pod => {
                debug!(%e, "on to the pod");
                dest = Dest::Pod;
                self.sender(&caller, dest).await
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
        let mut response = send(sender, req, &caller.own, dest).await;
        // A kept connection the server closed as the request went out: the request was
        // not sent, so once more on a new connection (HTTP/2: the one the caller
        // connection's other streams retry on too).
        if let Err(Some(req)) = response.as_mut().map_err(|e| e.take_message()) {
            let again = if h2 { self.sender(&caller, dest).await } else { self.dial(&caller, dest).await };
            response = match again {
                Ok(s) => send(s, req, &caller.own, dest).await,
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
    async fn sender(self: &Arc<Self>, caller: &Arc<Caller>, dest: Dest) -> Result<Sender, DialError> {
        if let Some(s) = caller.own.take_own(dest, caller.h2).await {
            return Ok(s);
        }
        self.dial(caller, dest).await
    }

    /// A new connection to `dest`. An HTTP/2 one is kept in `own` at once, to be shared,
    /// and made once for the streams that ask while it is being made (a gRPC client's
    /// first calls arrive together): a shared future per destination.
    async fn dial(self: &Arc<Self>, caller: &Arc<Caller>, dest: Dest) -> Result<Sender, DialError> {
        use futures::FutureExt;
        let failed = |e: hyper::Error| DialError::Failed(e.to_string());
        let (src, dst) = (caller.src, caller.dst);
        if !caller.h2 {
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
            let mut dials = caller.own.h2_dials.lock().unwrap_or_else(|e| e.into_inner());
            let make = || {
                // A task of its own, so that it goes on when the streams waiting for it are
                // cancelled; it holds no more than a `Weak` to the caller that holds it.
                let (router, weak) = (self.clone(), Arc::downgrade(caller));
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
                    if let Some(caller) = weak.upgrade() {
                        if let Ok(s) = &made {
                            caller.own.put(dest, true, Sender::H2(s.clone()));
                        }
                        caller.own.h2_dials.lock().unwrap_or_else(|e| e.into_inner()).remove(&dest);
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
            Dest::Pod => Either::Left(self.upstream.app(dst, src).await.map_err(|e| DialError::Failed(e.to_string()))?),
            Dest::Laptop(id) => Either::Right(self.upstream.laptop(id, src, dst).await?),
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
