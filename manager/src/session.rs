//! One session: the hello on the control stream, then, for a client, a task per stream
//! (flows, DNS queries, intercept requests) and one task that routes QUIC datagrams to
//! UDP flows; for a node agent, its captures ([`crate::intercepts`]) and a task per
//! connection it captured. A session's tasks end with it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tpvpn_tunnel::datagram::Datagram;
use tpvpn_tunnel::handshake::{Negotiated, Peer, ServerHandshake, ServerStep, TokenKind, FEATURE_REVOKE};
use tpvpn_tunnel::io::{read_message, read_message_max, write_message, Offered};
use tpvpn_tunnel::quic::{self, Class};
use tpvpn_tunnel::{
    relay, ErrorCode, FlowStatus, Message, Protocol, Role, CLOSE_REFUSED, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::auth::access::{Denied, Permission};
use crate::auth::signer::{identity_of, key_and_expiry, Identity};
use crate::auth::AgentAuth;
use crate::intercepts::{Captured, Hub};
use crate::metrics::{self, Gauge};
use crate::policy::{Kind, Usage};
use crate::udp::UdpFlows;
use crate::{Config, Error, Shared, HELLO_TIMEOUT, MAX_HELLO};

/// Accepts clients on `endpoint`, made with `server`, until it is closed (QUIC over UDP
/// only). See [`Server`].
pub async fn serve(endpoint: quinn::Endpoint, server: quinn::ServerConfig, config: crate::Config) {
    Server::new(config).serve_quic(endpoint, server).await
}

/// The manager's sessions, whichever carrier brought them: QUIC over UDP
/// ([`Server::serve_quic`]) or QUIC over TCP streams ([`Server::serve_tcp`], what the
/// API server's port-forward reaches). Connections are admitted by [`Admission`]: a cap
/// on all connections and one on those not yet authenticated; QUIC address validation
/// (Retry) for a new UDP one while many are unauthenticated, in all or from its source.
/// A source address is never refused as such: clients behind one NAT (a NodePort's SNAT)
/// or the port-forward (loopback) share it, and peers that never authenticate must not
/// lock them out.
pub struct Server {
    config: Shared,
    hub: Arc<Hub>,
    admission: Arc<Admission>,
}

impl Server {
    pub fn new(config: crate::Config) -> Arc<Server> {
        let config: Shared = Arc::new(config);
        let hub = Hub::new(config.views.objects.clone(), config.intercept_namespaces.clone());
        tokio::spawn(crate::intercepts::maintain(Arc::downgrade(&hub)));
        let admission = Arc::new(Admission::new(config.limits.clone()));
        Arc::new(Server { config, hub, admission })
    }

    fn refused(&self, remote: SocketAddr, why: &str) {
        metrics::add(&self.config.metrics.refused_total, 1);
        debug!(client = %remote, why, "connection refused");
    }

    /// Accepts clients on `endpoint`, made with `server`, until it is closed.
    pub async fn serve_quic(self: Arc<Self>, endpoint: quinn::Endpoint, server: quinn::ServerConfig) {
        let intercepts = Arc::new(quic::server_config_for(&server, Class::Intercepts, false));
        while let Some(incoming) = endpoint.accept().await {
            let remote = incoming.remote_address();
            let ticket = match self.admission.admit(remote.ip(), incoming.remote_address_validated()) {
                Admit::Yes(ticket) => ticket,
                Admit::Retry => {
                    debug!(client = %remote, "many unauthenticated connections: asking for address validation");
                    if incoming.retry().is_err() {
                        debug!(client = %remote, "retry not possible; refusing");
                    }
                    continue;
                }
                Admit::No(why) => {
                    self.refused(remote, why);
                    incoming.refuse();
                    continue;
                }
            };
            let class = Class::of(&incoming.orig_dst_cid());
            let span = info_span!("session", client = %remote, transport = "quic");
            tokio::spawn(self.clone().run(accept(incoming, class, &intercepts), class, ticket).instrument(span));
        }
    }

    /// Accepts TCP connections on `listener`, each a stream carrying QUIC packets
    /// ([`tpvpn_tunnel::stream`]) with `server`'s TLS and limits. A TCP connection is
    /// admitted like a QUIC one (it counts as unauthenticated until its hello is
    /// accepted); one that brings no QUIC connection within [`HELLO_TIMEOUT`] is closed.
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener, server: quinn::ServerConfig) {
        let intercepts = Arc::new(quic::server_config_for(&server, Class::Intercepts, true));
        let server = quic::server_config_for(&server, Class::Tunnel, true);
        let mut backoff = Duration::from_millis(10);
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => {
                    backoff = Duration::from_millis(10);
                    accepted
                }
                Err(e) => {
                    // Out of descriptors, say: wait, and let sessions end, instead of spinning.
                    warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Some(ticket) = self.admit_stream(remote) else { continue };
            let _ = stream.set_nodelay(true);
            let span = info_span!("session", client = %remote, transport = "tcp");
            let configs = (server.clone(), intercepts.clone());
            tokio::spawn(self.clone().serve_stream(stream, remote, configs, ticket).instrument(span));
        }
    }

    /// Admits a connection arriving over TCP, which has proven its address (no Retry).
    fn admit_stream(&self, remote: SocketAddr) -> Option<Ticket> {
        match self.admission.admit(remote.ip(), true) {
            Admit::Yes(ticket) => Some(ticket),
            Admit::No(why) => {
                self.refused(remote, why);
                None
            }
            Admit::Retry => None,
        }
    }

    /// One TCP connection: its QUIC connections, one after the other, until it closes.
    async fn serve_stream(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        (server, intercepts): (quinn::ServerConfig, Arc<quinn::ServerConfig>),
        ticket: Ticket,
    ) {
        let local = stream.local_addr().unwrap_or_else(|_| (std::net::Ipv4Addr::UNSPECIFIED, 0).into());
        let (endpoint, socket) = match tpvpn_tunnel::stream::server_endpoint(stream, local, remote, server) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot make an endpoint for a TCP connection");
                return;
            }
        };
        let watcher = {
            let (endpoint, socket) = (endpoint.clone(), socket.clone());
            AbortOnDrop(tokio::spawn(async move {
                let why = socket.closed().await;
                debug!(%why, "the TCP connection ended");
                endpoint.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"the carrying TCP connection ended");
            }))
        };
        let mut ticket = Some(ticket);
        // A client's tunnel connection and its intercepts connection share the stream; while
        // none runs, the next must come within the hello's deadline.
        let mut sessions = tokio::task::JoinSet::new();
        loop {
            let idle = sessions.is_empty();
            let next = async {
                if idle {
                    tokio::time::timeout(HELLO_TIMEOUT, endpoint.accept()).await
                } else {
                    Ok(endpoint.accept().await)
                }
            };
            let incoming = tokio::select! {
                next = next => match next {
                    Ok(Some(incoming)) => incoming,
                    Ok(None) => break,
                    Err(_) => {
                        debug!("no QUIC connection on the TCP connection in time");
                        break;
                    }
                },
                Some(_) = sessions.join_next(), if !idle => continue,
            };
            let Some(ticket) = ticket.take().or_else(|| self.admit_stream(remote)) else {
                incoming.refuse();
                continue;
            };
            let class = Class::of(&incoming.orig_dst_cid());
            sessions.spawn(self.clone().run(accept(incoming, class, &intercepts), class, ticket).in_current_span());
        }
        sessions.shutdown().await;
        drop(watcher);
        socket.close("done".into());
        endpoint.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"done");
    }

    async fn run(
        self: Arc<Self>,
        connecting: Result<quinn::Connecting, quinn::ConnectionError>,
        class: Class,
        ticket: Ticket,
    ) {
        let connecting = match connecting {
            Ok(c) => c,
            Err(e) => return info!(error = %e, "handshake failed"),
        };
        // The handshake is bounded like the hello: a peer that starts one and never
        // finishes holds its unauthenticated slot no longer (dropped, it is closed).
        match tokio::time::timeout(HELLO_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => match session(conn, class, self.config.clone(), ticket, self.hub.clone()).await {
                Ok(()) => info!("client disconnected"),
                Err(e) => info!(error = %e, "session ended"),
            },
            Ok(Err(e)) => info!(error = %e, "handshake failed"),
            Err(_) => info!("handshake not done within {HELLO_TIMEOUT:?}"),
        }
    }
}

/// Accepts `incoming` with the transport parameters of the class its peer asked for.
fn accept(
    incoming: quinn::Incoming,
    class: Class,
    intercepts: &Arc<quinn::ServerConfig>,
) -> Result<quinn::Connecting, quinn::ConnectionError> {
    match class {
        Class::Tunnel => incoming.accept(),
        Class::Intercepts => incoming.accept_with(intercepts.clone()),
    }
}

/// Limits on connections, before and after authentication.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections at once, authenticated or not.
    pub max_connections: usize,
    /// Connections not yet authenticated, in all.
    pub max_unauthenticated: usize,
    /// Past this many unauthenticated connections from one source address, a new one
    /// from there must prove its address (QUIC Retry; a TCP one has).
    pub max_unauthenticated_per_source: usize,
    /// Above this many unauthenticated connections, a new one must first prove its
    /// address (QUIC Retry).
    pub retry_above: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            max_unauthenticated: 256,
            max_unauthenticated_per_source: 16,
            retry_above: 32,
        }
    }
}

/// Counts connections for admission; a [`Ticket`] held by each connection gives its
/// counts back when it is dropped.
struct Admission {
    limits: ConnectionLimits,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    connections: usize,
    unauthenticated: usize,
    by_source: HashMap<IpAddr, usize>,
}

enum Admit {
    Yes(Ticket),
    Retry,
    No(&'static str),
}

/// One admitted connection. Unauthenticated until [`Ticket::authenticated`].
struct Ticket {
    admission: Arc<Admission>,
    source: IpAddr,
    unauthenticated: bool,
}

impl Admission {
    fn new(limits: ConnectionLimits) -> Self {
        Admission { limits, counts: Mutex::default() }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(self: &Arc<Self>, source: IpAddr, validated: bool) -> Admit {
        let mut c = self.counts();
        let l = &self.limits;
        if c.connections >= l.max_connections {
            return Admit::No("too many connections");
        }
        if c.unauthenticated >= l.max_unauthenticated {
            return Admit::No("too many unauthenticated connections");
        }
        let from_source = c.by_source.get(&source).copied().unwrap_or(0);
        if !validated && (c.unauthenticated >= l.retry_above || from_source >= l.max_unauthenticated_per_source) {
            return Admit::Retry;
        }
        c.connections += 1;
        c.unauthenticated += 1;
        *c.by_source.entry(source).or_default() += 1;
        Admit::Yes(Ticket { admission: self.clone(), source, unauthenticated: true })
    }
}

impl Ticket {
    /// The connection's token was accepted: it no longer counts as unauthenticated.
    fn authenticated(&mut self) {
        if std::mem::take(&mut self.unauthenticated) {
            self.admission.release_unauthenticated(self.source);
        }
    }
}

impl Admission {
    fn release_unauthenticated(&self, source: IpAddr) {
        let mut c = self.counts();
        c.unauthenticated -= 1;
        if let Some(n) = c.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&source);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.authenticated();
        self.admission.counts().connections -= 1;
    }
}

async fn refuse(conn: &quinn::Connection, send: &mut quinn::SendStream, reply: Message) {
    let Message::Error { code, message, .. } = &reply else { return };
    warn!(%message, "refusing client");
    let close = tpvpn_tunnel::refusal_close_code(*code);
    let reason = message.clone();
    let _ = write_message(send, &reply).await;
    let _ = send.finish();
    // Give the error frame a moment to arrive; the close code and reason repeat it.
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(close.into(), reason.as_bytes());
}

/// Why a client without a certificate is refused by a manager that takes no shared token.
const IDENTITY_ONLY: &str = "this manager accepts laptops by their Kubernetes identity only: connect with a kubeconfig (tpvpn up --context NAME), with a tpvpn at least as new as the manager";

/// Reads and checks the hello (the sans-IO [`ServerHandshake`]): the accepted peer with
/// the handshake (for its reply) and the identity of its certificate, if any; or `None`
/// when it was refused (already told).
async fn hello(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    config: &Config,
) -> Result<Option<(Peer, ServerHandshake, Option<Identity>)>, Error> {
    let mut handshake = ServerHandshake::new((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), config.features());
    let mut presented = Vec::new();
    // A laptop's certificate from this manager's signer, verified in the TLS handshake,
    // stands for the client token; its user is the one the API server authenticated.
    let identity = quic::peer_certificate(conn).and_then(|der| identity_of(&der));
    loop {
        let Some(msg) = read_message_max(recv, MAX_HELLO).await? else {
            return Err(Error::BadHello("end of stream".into()));
        };
        let kind = |t: &[u8]| {
            presented = t.to_vec();
            match &identity {
                Some(_) if t.is_empty() => Some(TokenKind::Client),
                _ => config.token_kind(t),
            }
        };
        match handshake.on_message(msg, kind) {
            ServerStep::NeedMore => continue,
            ServerStep::Accept(mut peer) => {
                if let Some(identity) = &identity {
                    info!(user = %identity.username, claimed = %peer.user, "client certificate accepted");
                    peer.user = identity.username.clone();
                }
                // An agent in `--auth kubernetes`: the API server says whose token it is.
                if let (Role::Agent { node }, AgentAuth::Kubernetes(reviewer)) = (&peer.role, &config.agents) {
                    if let Err(r) = reviewer.agent(&presented, node).await {
                        metrics::add(&config.metrics.refused_total, 1);
                        let reply = Message::Error { code: r.code, version: PROTOCOL_VERSION, message: r.message };
                        refuse(conn, send, reply).await;
                        return Ok(None);
                    }
                }
                return Ok(Some((peer, handshake, identity)));
            }
            ServerStep::Refuse { mut reply } => {
                metrics::add(&config.metrics.refused_total, 1);
                // No shared token here: a laptop is known by its certificate alone.
                if let Message::Error { code: ErrorCode::Unauthorized, message, .. } = &mut reply {
                    if config.token.is_empty() && identity.is_none() && config.access.is_some() {
                        *message = IDENTITY_ONLY.into();
                    }
                }
                refuse(conn, send, reply).await;
                return Ok(None);
            }
            ServerStep::Invalid(why) => return Err(Error::BadHello(why)),
        }
    }
}

async fn session(
    conn: quinn::Connection,
    class: Class,
    config: Shared,
    mut ticket: Ticket,
    hub: Arc<Hub>,
) -> Result<(), Error> {
    // The whole hello, from accepting its stream to the token check, has one deadline.
    let greeting = async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let accepted = hello(&conn, &mut send, &mut recv, &config).await?;
        Ok::<_, Error>(accepted.map(|(peer, handshake, identity)| (send, recv, peer, handshake, identity)))
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(HELLO_TIMEOUT, greeting) => r,
        // A client sends datagrams only for UDP flows, after the hello: one before it is
        // not a client, and quinn would buffer its packets at the rate it sends them.
        _ = conn.read_datagram() => {
            conn.close(CLOSE_REFUSED.into(), b"datagram before the hello");
            return Err(Error::BadHello("a datagram".into()));
        }
    };
    let (mut send, recv, peer, handshake, identity) = match outcome {
        Err(_) => {
            conn.close(CLOSE_REFUSED.into(), b"no hello in time");
            return Err(Error::HandshakeTimeout);
        }
        Ok(Err(e)) => {
            conn.close(CLOSE_REFUSED.into(), b"bad hello");
            return Err(e);
        }
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(accepted))) => accepted,
    };
    ticket.authenticated();
    let mut grant = quic::grant_full_limits(&conn, class);
    let mut cluster = config.views.cluster.clone();
    let view = cluster.borrow_and_update().clone();
    for frame in handshake.accept_frames(peer.version, view) {
        write_message(&mut send, &frame).await?;
    }
    let id = hub.session_id();
    let owner = owner_key(&peer.client_id, identity.as_ref());
    if peer.role == Role::Intercepts {
        return intercepts_session(conn, class, &owner, send, hub).await;
    }
    if let Role::Agent { node } = &peer.role {
        info!(version = peer.version.number(), %node, ?class, "agent authenticated");
        return agent_session(conn, id, (node.clone(), peer.version, peer.features), (send, recv), hub, grant).await;
    }
    let mut catalog = config.views.catalog.clone();
    let version = peer.version;
    let first = catalog.borrow_and_update().clone();
    write_catalog(&mut send, &first, None, version).await?;
    let mut sent = first.number;
    info!(version = peer.version.number(), user = %peer.user, host = %peer.host, "client authenticated");
    let _session_gauge = Gauge::new(&config.metrics.sessions, &config.metrics.sessions_total);
    let who = if peer.user.is_empty() && peer.host.is_empty() {
        conn.remote_address().to_string()
    } else {
        format!("{}@{}", peer.user, peer.host)
    };
    // A client that takes notices (`Revoke`: an intercept of its ended) gets them on its
    // control stream.
    let (notices, mut notices_rx) = if peer.features & FEATURE_REVOKE != 0 {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    hub.client_connected(id, conn.clone(), &owner, who, notices);
    let _registered = OnDrop(|| hub.client_gone(id));

    let udp_flows: UdpFlows = Arc::default();
    let _datagrams = AbortOnDrop(tokio::spawn(route_datagrams(conn.clone(), udp_flows.clone()).in_current_span()));
    // The control stream stays open for the session: changes are pushed on it.
    let _push = AbortOnDrop(tokio::spawn(
        async move {
            let _recv = recv;
            let (mut cluster_open, mut catalog_open) = (true, true);
            while cluster_open || catalog_open || notices_rx.is_some() {
                let sent = tokio::select! {
                    m = next_notice(&mut notices_rx) => match m {
                        Some(m) => write_message(&mut send, &m).await,
                        None => { notices_rx = None; Ok(()) }
                    },
                    r = cluster.changed(), if cluster_open => match r {
                        Ok(()) => {
                            let view = cluster.borrow_and_update().clone();
                            write_message(&mut send, &Message::ClusterUpdate { cluster: view }).await
                        }
                        Err(_) => { cluster_open = false; Ok(()) }
                    },
                    r = catalog.changed(), if catalog_open => match r {
                        Ok(()) => {
                            let v = catalog.borrow_and_update().clone();
                            let r = write_catalog(&mut send, &v, Some(sent), version).await;
                            sent = v.number;
                            r
                        }
                        Err(_) => { catalog_open = false; Ok(()) }
                    },
                };
                if sent.is_err() {
                    return;
                }
            }
            // Nothing will change any more (a fixed view): keep the stream open.
            std::future::pending::<()>().await
        }
        .in_current_span(),
    ));
    // Every flow is the session's: when it ends, the JoinSet aborts them all, and their
    // sockets close.
    let mut flows = tokio::task::JoinSet::new();
    // A session on a certificate lasts as long as its certificate (renewals extend it).
    let expiry = quic::peer_certificate(&conn).and_then(|der| key_and_expiry(&der)).map(|(_, t)| t);
    let (expires, mut expiry_rx) = tokio::sync::watch::channel(expiry.filter(|_| identity.is_some()));
    let ctx = Arc::new(Ctx {
        conn: conn.clone(),
        config: config.clone(),
        udp_flows,
        hub: hub.clone(),
        session: id,
        version: peer.version,
        usage: Arc::default(),
        identity: Mutex::new(identity),
        expires,
    });
    let result = loop {
        tokio::select! {
            () = until_expired(&mut expiry_rx) => {
                let who = ctx.identity().map(|i| i.username).unwrap_or_default();
                info!(user = %who, "the laptop's certificate expired: session ended");
                let reason = format!("the certificate of {who} expired");
                conn.close(tpvpn_tunnel::refusal_close_code(ErrorCode::Unauthorized).into(), reason.as_bytes());
                break Ok(());
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    flows.spawn(stream(ctx.clone(), send, recv).in_current_span());
                    grant.in_use(&conn, flows.len());
                }
                Err(quinn::ConnectionError::ApplicationClosed(_)) | Err(quinn::ConnectionError::LocallyClosed) => {
                    break Ok(())
                }
                Err(e) => break Err(e.into()),
            },
            // Reap finished flows so that the set holds only live ones.
            Some(_) = flows.join_next(), if !flows.is_empty() => {}
        }
    };
    result
}

/// What every stream task of a client session shares.
struct Ctx {
    conn: quinn::Connection,
    config: Shared,
    udp_flows: UdpFlows,
    hub: Arc<Hub>,
    session: u64,
    version: Negotiated,
    /// This session's flows against `config.session_limits`.
    usage: Arc<Usage>,
    /// Who the laptop is, when it presented a certificate: what it may do is asked of
    /// the API server. A renewal may bring new groups.
    identity: Mutex<Option<Identity>>,
    /// When the session's certificate expires (none: the shared token).
    expires: tokio::sync::watch::Sender<Option<std::time::SystemTime>>,
}

impl Ctx {
    fn identity(&self) -> Option<Identity> {
        self.identity.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Returns once the time in `expiry` has come (never while it is `None`); follows changes.
async fn until_expired(expiry: &mut tokio::sync::watch::Receiver<Option<std::time::SystemTime>>) {
    loop {
        let at = *expiry.borrow_and_update();
        let wait = async {
            match at {
                Some(t) => tokio::time::sleep(t.duration_since(std::time::SystemTime::now()).unwrap_or_default()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait => return,
            changed = expiry.changed() => if changed.is_err() { std::future::pending::<()>().await },
        }
    }
}

/// A new certificate for the session's identity, on the live connection: valid from
/// this manager's client CA, the same user and uid, and proof that this end of the
/// connection holds its key. The session then lasts until it expires.
async fn renew(ctx: &Ctx, der: Vec<u8>, proof: Vec<u8>) -> Result<String, crate::intercepts::Refusal> {
    let refuse = |message: String| crate::intercepts::Refusal { code: ErrorCode::Unauthorized, message };
    let (Some(current), Some(cas)) = (ctx.identity(), ctx.config.client_cas.as_ref()) else {
        return Err(crate::intercepts::Refusal {
            code: ErrorCode::Unsupported,
            message: "this session has no certificate to renew (it connected with the shared token)".into(),
        });
    };
    cas.verify(&der).map_err(|e| refuse(format!("the new certificate is not valid: {e}")))?;
    let (who, (key, expires)) = identity_of(&der)
        .zip(key_and_expiry(&der))
        .ok_or_else(|| refuse("the new certificate is not one of this manager's".into()))?;
    if (who.username.as_str(), who.uid.as_str()) != (current.username.as_str(), current.uid.as_str()) {
        return Err(refuse(format!("the new certificate is {}'s, this session {}'s", who.username, current.username)));
    }
    let binding = quic::renewal_binding(&ctx.conn, &der).map_err(|e| refuse(e.to_string()))?;
    if !quic::verify(&key, &binding, &proof) {
        return Err(refuse("the proof of the new certificate's key does not verify on this connection".into()));
    }
    let until = k8s_openapi::jiff::Timestamp::try_from(expires).map(|t| t.to_string()).unwrap_or_default();
    info!(user = %who.username, %until, "the laptop's certificate renewed");
    *ctx.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(who);
    ctx.expires.send_replace(Some(expires));
    Ok(format!("renewed until {until}"))
}

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The next notice for a client's control stream; never, when it takes none.
async fn next_notice(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Message>>) -> Option<Message> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A node agent's session: its control stream carries `Capture`/`Release` to it and
/// `CaptureStatus` back; each stream it opens is one connection it captured.
async fn agent_session(
    conn: quinn::Connection,
    id: u64,
    (node, version, features): (String, Negotiated, u64),
    (mut send, recv): (quinn::SendStream, quinn::RecvStream),
    hub: Arc<Hub>,
    mut grant: tpvpn_tunnel::quic::StreamGrant,
) -> Result<(), Error> {
    let mut control = tpvpn_tunnel::io::frames(recv);
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    hub.agent_connected(&node, (id, conn.clone()), (version, features), tx);
    let _registered = OnDrop(|| hub.agent_gone(&node, id));
    let _writer = AbortOnDrop(tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match write_message(&mut send, &m).await {
                Ok(()) => {}
                Err(tpvpn_tunnel::Error::Stream(_)) => return,
                // One message that cannot be encoded is dropped; the stream, and with it
                // every capture of the node, goes on.
                Err(e) => warn!(kind = m.kind(), error = %e, "a message to the agent cannot be sent: dropped"),
            }
        }
    }));
    let mut captured = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            msg = control.recv() => match msg.unwrap_or(Ok(None)) {
                Ok(Some(Message::CaptureStatus { id: capture, ok, message, meshed, env })) => {
                    let result = if ok { Ok(Captured { meshed, env, note: message }) } else { Err(message) };
                    hub.capture_status(&node, capture, result);
                }
                Ok(Some(other)) => warn!(kind = other.kind(), "unexpected message from the agent"),
                Ok(None) | Err(_) => return Ok(()),
            },
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    captured.spawn(intercepted(hub.clone(), node.clone(), send, recv).in_current_span());
                    grant.in_use(&conn, captured.len());
                }
                Err(quinn::ConnectionError::ApplicationClosed(_)) | Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
                Err(e) => return Err(e.into()),
            },
            Some(_) = captured.join_next(), if !captured.is_empty() => {}
        }
    }
}

/// A client's intercepts connection: the streams of its captured connections go on it
/// (the manager opens them) until it or the client's session ends. It carries nothing
/// else: the client may open no stream on it.
async fn intercepts_session(
    conn: quinn::Connection,
    class: Class,
    client_id: &[u8],
    _control: quinn::SendStream,
    hub: Arc<Hub>,
) -> Result<(), Error> {
    conn.set_max_concurrent_bi_streams(0u32.into());
    let Some(session) = hub.intercepts_connected(client_id, conn.clone()) else {
        conn.close(CLOSE_REFUSED.into(), b"no session of this client to join");
        return Err(Error::BadHello("an intercepts connection without a session".into()));
    };
    info!(session, ?class, "the client's intercepts connection joined its session");
    let why = conn.closed().await;
    hub.intercepts_gone(session, &conn, matches!(why, quinn::ConnectionError::TimedOut));
    debug!(%why, "the intercepts connection ended");
    Ok(())
}

/// How long the owner of an intercept may take to answer for a captured connection.
const OWNER_ANSWER: Duration = Duration::from_secs(3);

/// One connection an agent captured: to the intercept's owner, whose `FlowReply` (its
/// dial of the laptop's port) goes back to the agent, then the two streams are joined.
/// Without an owner the agent is told `Denied` and hands the connection to the pod.
async fn intercepted(
    hub: Arc<Hub>,
    node: String,
    mut agent_send: quinn::SendStream,
    mut agent_recv: quinn::RecvStream,
) {
    let Ok(Some(Message::InterceptOpen { id, src, dst })) = read_message(&mut agent_recv).await else {
        let _ = agent_send.reset(tpvpn_tunnel::RESET_CODE.into());
        return;
    };
    let span = info_span!("intercepted", capture = id, %src, %dst);
    async move {
        let deny = |message: &str| Message::FlowReply { status: FlowStatus::Denied, message: message.to_string() };
        let Some((intercept, owner)) = hub.route(&node, id) else {
            let _ = write_message(&mut agent_send, &deny("the intercept has no owner")).await;
            let _ = agent_send.finish();
            return;
        };
        // A live client answers at once (its dial is on its own loopback); one that does not
        // may be gone without the connection knowing yet: the caller goes to the pod.
        let toward_client = tpvpn_tunnel::io::open_intercept(&owner, intercept, src, dst);
        match tokio::time::timeout(OWNER_ANSWER, toward_client).await {
            Ok(Ok(Offered { send, recv, status, message })) => {
                let ok = status == FlowStatus::Ok;
                if write_message(&mut agent_send, &Message::FlowReply { status, message }).await.is_err() {
                    return;
                }
                if ok {
                    let end = relay::streams((agent_send, agent_recv), (send, recv)).await;
                    debug!(?end, "intercepted connection ended");
                } else {
                    let _ = agent_send.finish();
                }
            }
            other => {
                debug!(?other, "the owner did not answer");
                let _ = write_message(&mut agent_send, &deny("the owner did not answer")).await;
                let _ = agent_send.finish();
            }
        }
    }
    .instrument(span)
    .await
}

/// Aborts a task when dropped, so that it ends with its owner on every path.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends what brings the client from catalog version `sent` to `v`: a v2 client the
/// delta or a snapshot in chunks, a v1 client the whole catalog (while it fits a frame).
/// The frames are shared by every session.
async fn write_catalog(
    send: &mut quinn::SendStream,
    v: &crate::catalog::Version,
    sent: Option<u64>,
    version: Negotiated,
) -> Result<(), tpvpn_tunnel::Error> {
    let frames = if version.intercepts() { Some(v.frames_since(sent)) } else { v.v1_frames() };
    for f in frames.into_iter().flatten() {
        send.write_chunk(f.clone()).await.map_err(|e| tpvpn_tunnel::Error::Stream(e.to_string()))?;
    }
    Ok(())
}

async fn route_datagrams(conn: quinn::Connection, flows: UdpFlows) {
    while let Ok(d) = conn.read_datagram().await {
        let Ok(dg) = Datagram::parse(&d) else {
            debug!("dropping malformed datagram");
            continue;
        };
        let tx = flows.lock().ok().and_then(|f| f.get(&dg.flow_id).cloned());
        match tx {
            Some(tx) => {
                // A full queue drops the datagram, as a congested link would.
                let _ = tx.try_send(d.slice(d.len() - dg.payload.len()..));
            }
            None => debug!(flow = dg.flow_id, "datagram for unknown udp flow"),
        }
    }
}

/// One stream a client opened: a flow, a DNS query, or an intercept request.
async fn stream(ctx: Arc<Ctx>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let open = match read_message(&mut recv).await {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(e) => {
            debug!(error = %e, "bad stream header");
            let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
            return;
        }
    };
    let config = &ctx.config;
    match open {
        Message::DnsQuery { query } => match ctx.usage.take(Kind::Dns, &config.session_limits) {
            Ok(_permit) => crate::dns::answer(send, query, config).await,
            Err(why) => {
                metrics::add(&config.metrics.flows_denied_limit, 1);
                let reply = Message::Error { code: ErrorCode::Limit, version: ctx.version.number(), message: why };
                let _ = write_message(&mut send, &reply).await;
                let _ = send.finish();
            }
        },
        Message::FlowOpen { protocol, flow_id, src, dst } => {
            let span = info_span!("flow", proto = ?protocol, %src, %dst, id = flow_id);
            flow(&ctx, send, recv, protocol, flow_id, dst).instrument(span).await
        }
        Message::Renew { certificate, proof } => {
            let reply = match renew(&ctx, certificate, proof).await {
                Ok(message) => Message::Ack { message },
                Err(r) => {
                    warn!(why = %r.message, "a certificate renewal refused");
                    Message::Error { code: r.code, version: ctx.version.number(), message: r.message }
                }
            };
            if write_message(&mut send, &reply).await.is_ok() {
                let _ = send.finish();
            }
        }
        Message::FilesOpen { namespace, service, writable, handles, .. } => {
            let span = info_span!("files", %namespace, %service, write = !writable.is_empty());
            files(&ctx, (send, recv), (&namespace, &service), &writable, handles).instrument(span).await
        }
        request @ (Message::InterceptRequest { .. }
        | Message::Leave { .. }
        | Message::Revoke { .. }
        | Message::InterceptList) => {
            let reply = if !ctx.version.intercepts() {
                Err(crate::intercepts::Refusal {
                    code: ErrorCode::Unsupported,
                    message: "intercepts need tpvpn protocol v2: upgrade the client".into(),
                })
            } else {
                intercept_request(&ctx, request).await
            };
            let replies = match reply {
                // A table of every Service goes in frames of bounded size.
                Ok(Message::InterceptTable { rows }) => table_frames(rows),
                Ok(m) => vec![m],
                Err(r) => vec![Message::Error { code: r.code, version: ctx.version.number(), message: r.message }],
            };
            for m in &replies {
                if let Err(e) = write_message(&mut send, m).await {
                    debug!(error = %e, "reply not sent");
                    break;
                }
            }
            let _ = send.finish();
        }
        _ => {
            let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
        }
    }
}

/// How long the manager waits for an agent to open a container's files (less than the
/// laptop waits for the manager, so that the laptop hears why).
const AGENT_ANSWER: Duration = Duration::from_secs(10);

/// A stream of file requests for the client's intercept of `namespace/service`
/// (`intercept --mount`; `asked`: where it asks to write, `--mount-readwrite`; `handles`:
/// the client opens files, and understands `FilesReady`): checked, then joined to a
/// stream to the agent of a captured pod, which answers them; the manager only relays
/// the bytes after the answer.
async fn files(
    ctx: &Ctx,
    (mut send, recv): (quinn::SendStream, quinn::RecvStream),
    (namespace, service): (&str, &str),
    asked: &[String],
    handles: bool,
) {
    let opened = async {
        if !ctx.version.intercepts() {
            return Err(crate::intercepts::Refusal {
                code: ErrorCode::Unsupported,
                message: "files need tpvpn protocol v2: upgrade the client".into(),
            });
        }
        let write = !asked.is_empty();
        for verb in if write { &["get", "update"][..] } else { &["get"] } {
            let permission =
                Permission { verb, resource: "intercepts/files", namespace: Some(namespace), name: Some(service) };
            allowed(ctx, &permission).await?;
        }
        let target = ctx.hub.files(ctx.session, namespace, service, write)?;
        let spec = target.spec.as_deref();
        let secrets = ctx.identity().is_some();
        let crate::targets::VolumeMounts { served: mounts, writable, left_out } =
            spec.map(|p| crate::targets::volume_mounts(p, &target.pod.container, secrets)).unwrap_or_default();
        let writable: Vec<String> =
            writable.into_iter().filter(|m| asked.iter().any(|a| std::path::Path::new(m).starts_with(a))).collect();
        let unavailable = |e: String| crate::intercepts::Refusal { code: ErrorCode::Unavailable, message: e };
        let (mut to_agent, mut from_agent) = target.agent.open_bi().await.map_err(|e| unavailable(e.to_string()))?;
        // Only to an agent that takes it (an older one would refuse the frame).
        let handles = handles && target.agent_features & tpvpn_tunnel::handshake::FEATURE_FILE_HANDLES != 0;
        let open = Message::FilesOpen {
            namespace: namespace.into(),
            service: service.into(),
            container_id: target.pod.container_id.clone(),
            mounts: mounts.clone(),
            writable: writable.clone(),
            handles,
        };
        write_message(&mut to_agent, &open).await.map_err(|e| unavailable(e.to_string()))?;
        match tokio::time::timeout(AGENT_ANSWER, read_message(&mut from_agent)).await {
            Ok(Ok(Some(Message::Ack { .. }))) => {}
            Ok(Ok(Some(Message::Error { code, message, .. }))) => {
                return Err(crate::intercepts::Refusal { code, message: format!("pod {}: {message}", target.pod.name) })
            }
            Err(_) => {
                let _ = to_agent.reset(tpvpn_tunnel::RESET_CODE.into());
                return Err(unavailable(format!(
                    "the agent of node {} did not open the files within {} s",
                    target.pod.node,
                    AGENT_ANSWER.as_secs()
                )));
            }
            Ok(other) => {
                return Err(unavailable(format!("the agent of node {} did not answer: {other:?}", target.pod.node)))
            }
        }
        let mut said =
            format!("files of pod {}/{} (container {})", target.pod.namespace, target.pod.name, target.pod.container);
        let shown: Vec<String> =
            mounts.iter().map(|m| if writable.contains(m) { format!("{m} (read-write)") } else { m.clone() }).collect();
        said.push_str(&format!(": {}", if shown.is_empty() { "no volume mounts".into() } else { shown.join(", ") }));
        if write && writable.is_empty() {
            said.push_str("; none may be written (only emptyDir and PVC volumes not mounted readOnly)");
        }
        if !left_out.is_empty() {
            said.push_str(&format!("; left out: {}", left_out.join("; ")));
        }
        Ok((to_agent, from_agent, said, handles))
    };
    let (to_agent, from_agent, said, agent_handles) = match opened.await {
        Ok(joined) => joined,
        Err(r) => {
            let _ = write_message(
                &mut send,
                &Message::Error { code: r.code, version: ctx.version.number(), message: r.message },
            )
            .await;
            let _ = send.finish();
            return;
        }
    };
    let ready = if handles {
        Message::FilesReady { message: said, handles: agent_handles }
    } else {
        Message::Ack { message: said }
    };
    if write_message(&mut send, &ready).await.is_err() {
        return;
    }
    // Requests one way, answers the other; an end or a reset passes through.
    let end = tpvpn_tunnel::relay::streams((send, recv), (to_agent, from_agent)).await;
    debug!(?end, "file stream ended");
}

/// Bytes of intercept-table rows per frame.
const TABLE_BYTES: usize = 256 * 1024;

/// `rows` in frames of at most [`TABLE_BYTES`] of rows each (at least one frame).
fn table_frames(rows: Vec<tpvpn_tunnel::InterceptRow>) -> Vec<Message> {
    let mut frames = vec![Vec::new()];
    let mut size = 0;
    for row in rows {
        let len = 2 + row.namespace.len() + 2 + row.service.len() + 1 + 2 + row.holder.len() + 2 + 8 + 1;
        if size + len > TABLE_BYTES && size > 0 {
            frames.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(f) = frames.last_mut() {
            f.push(row);
        }
    }
    frames.into_iter().map(|rows| Message::InterceptTable { rows }).collect()
}

/// Whom a session's intercepts belong to: the laptop's own 16-byte id (which it states)
/// and, with a certificate, the identity the API server authenticated, so that another
/// user stating the same id can neither re-claim its intercepts nor join its session.
/// Each kind has its own first byte, so that no stated id equals an identity's key. No
/// stable id (an old client): empty, and the claims key the session instead.
fn owner_key(client_id: &[u8], identity: Option<&Identity>) -> Vec<u8> {
    if client_id.len() != 16 {
        return Vec::new();
    }
    match identity {
        None => [&[0u8][..], client_id].concat(),
        Some(who) => [&[1u8][..], client_id, b"\0", who.username.as_bytes(), b"\0", who.uid.as_bytes()].concat(),
    }
}

/// Whether the session's identity has `permission` (a session without one, on the shared
/// token, may do anything the token may: single-tenant).
async fn allowed(ctx: &Ctx, permission: &Permission<'_>) -> Result<(), crate::intercepts::Refusal> {
    let (Some(who), Some(access)) = (ctx.identity(), &ctx.config.access) else { return Ok(()) };
    access.check(&who, permission).await.map_err(|denied| crate::intercepts::Refusal {
        code: match denied {
            Denied::NotAllowed { .. } => ErrorCode::Forbidden,
            Denied::Unavailable(_) => ErrorCode::Unavailable,
        },
        message: denied.to_string(),
    })
}

async fn intercept_request(ctx: &Ctx, request: Message) -> Result<Message, crate::intercepts::Refusal> {
    match request {
        Message::InterceptRequest { namespace, service, port, local_port, container, matchers } => {
            let matchers = crate::intercepts::rules::checked(&matchers)
                .map_err(|message| crate::intercepts::Refusal { code: ErrorCode::Protocol, message })?;
            let may = |verb, resource| Permission { verb, resource, namespace: Some(&namespace), name: Some(&service) };
            allowed(ctx, &may("create", "intercepts")).await?;
            // Containers' environments may hold Secret values: a right of their own.
            let environment = allowed(ctx, &may("get", "intercepts/environment")).await;
            let req = crate::intercepts::Request {
                namespace: namespace.clone(),
                service: service.clone(),
                port,
                local_port,
                container,
                matchers,
            };
            let mut reply = ctx.hub.intercept(ctx.session, req).await?;
            if let (Err(denied), Message::InterceptReply { env, warnings, .. }) = (environment, &mut reply) {
                env.clear();
                warnings.push(format!("{}{}", tpvpn_tunnel::ENVIRONMENT_WITHHELD, denied.message));
            }
            Ok(reply)
        }
        Message::Leave { namespace, service } => {
            ctx.hub.leave(ctx.session, &namespace, &service).map(|message| Message::Ack { message })
        }
        Message::Revoke { namespace, service } => {
            let end = Permission {
                verb: "delete",
                resource: "intercepts",
                namespace: Some(&namespace),
                name: Some(&service),
            };
            allowed(ctx, &end).await?;
            let by = ctx.identity.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|i| i.username.clone());
            let by = by.unwrap_or_else(|| "a client with the shared token".into());
            ctx.hub.revoke(&namespace, &service, &by).map(|message| Message::Ack { message })
        }
        // O(Services + Pods) of work: on a blocking thread, not the session's worker.
        _ => {
            let (hub, session) = (ctx.hub.clone(), ctx.session);
            tokio::task::spawn_blocking(move || hub.table(session))
                .await
                .unwrap_or_else(|e| {
                    Err(crate::intercepts::Refusal {
                        code: ErrorCode::Unavailable,
                        message: format!("listing failed: {e}"),
                    })
                })
                .map(|rows| Message::InterceptTable { rows })
        }
    }
}

async fn flow(
    ctx: &Ctx,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    protocol: Protocol,
    flow_id: u64,
    dst: std::net::SocketAddr,
) {
    let config = &ctx.config;
    let kind = match protocol {
        Protocol::Tcp => Kind::Tcp,
        Protocol::Udp => Kind::Udp,
        Protocol::Other(p) => return deny(&mut send, format!("protocol {p} is not supported")).await,
    };
    if let Err(why) = config.policy.check(dst) {
        metrics::add(&config.metrics.flows_denied_policy, 1);
        debug!(%why, "denied by the destination policy");
        return deny(&mut send, why).await;
    }
    let _permit = match ctx.usage.take(kind, &config.session_limits) {
        Ok(p) => p,
        Err(why) => {
            metrics::add(&config.metrics.flows_denied_limit, 1);
            debug!(%why, "over the session's limit");
            return deny(&mut send, why).await;
        }
    };
    match kind {
        Kind::Tcp => {
            let _g = Gauge::new(&config.metrics.tcp_flows, &config.metrics.tcp_flows_total);
            crate::tcp::relay(send, recv, dst, config).await
        }
        _ => {
            let _g = Gauge::new(&config.metrics.udp_flows, &config.metrics.udp_flows_total);
            crate::udp::relay(ctx.conn.clone(), send, recv, flow_id, dst, config, ctx.udp_flows.clone()).await
        }
    }
}

/// Answers a flow the manager will not dial: `Denied`, with the reason.
async fn deny(send: &mut quinn::SendStream, message: String) {
    let _ = write_message(send, &Message::FlowReply { status: FlowStatus::Denied, message }).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercepts_belong_to_the_laptop_and_its_authenticated_user() {
        let alice = Identity { username: "alice".into(), uid: "u-1".into(), ..Identity::default() };
        let mallory = Identity { username: "mallory".into(), uid: "u-2".into(), ..Identity::default() };
        let id = b"laptop-id-16-byte".as_slice()[..16].to_vec();
        let id = id.as_slice();
        assert!(owner_key(id, None).ends_with(id), "the shared token: the id alone, as before");
        assert_eq!(owner_key(id, Some(&alice)), owner_key(id, Some(&alice.clone())));
        assert_ne!(owner_key(id, Some(&alice)), owner_key(id, Some(&mallory)), "another user stating alice's id");
        assert_ne!(owner_key(id, Some(&alice)), owner_key(id, None), "the token stating alice's id");
        assert!(owner_key(b"", Some(&alice)).is_empty(), "no id, no re-claim");
        // A token client stating as its id what alice's key is.
        let forged = &owner_key(id, Some(&alice))[..];
        assert_ne!(owner_key(&forged[..16], None), owner_key(id, Some(&alice)));
        assert!(owner_key(forged, None).is_empty(), "not a 16-byte id");
        // Both keys are stable ones for the claims.
        assert!(owner_key(id, None).len() >= 16 && owner_key(id, Some(&alice)).len() >= 16);
    }

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 4,
            max_unauthenticated: 3,
            max_unauthenticated_per_source: 2,
            retry_above: 1,
        }
    }

    #[test]
    fn admission_caps_unauthenticated_per_source_and_in_all_and_asks_for_retry_under_load() {
        let a = Arc::new(Admission::new(limits()));
        let (x, y): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let Admit::Yes(mut t1) = a.admit(x, false) else { panic!("first connection admitted") };
        // One connection is in its hello: a new unvalidated address must prove itself.
        assert!(matches!(a.admit(y, false), Admit::Retry));
        let Admit::Yes(_t2) = a.admit(x, true) else { panic!("validated connection admitted") };
        // Past the count of its source, an unvalidated connection proves its address; a
        // source as such is never refused (a NAT's clients share it).
        let lax = Arc::new(Admission::new(ConnectionLimits { retry_above: 100, ..limits() }));
        let held: Vec<_> = (0..2).map(|_| lax.admit(x, false)).collect();
        assert!(held.iter().all(|h| matches!(h, Admit::Yes(_))));
        assert!(matches!(lax.admit(x, false), Admit::Retry), "a third unvalidated one from one source");
        assert!(matches!(lax.admit(x, true), Admit::Yes(_)), "validated, admitted past its source's count");
        let Admit::Yes(_t3) = a.admit(y, true) else { panic!("another source admitted") };
        assert!(matches!(a.admit(y, true), Admit::No(_)), "over the unauthenticated total");
        // Authenticating frees its unauthenticated slot but keeps counting it.
        t1.authenticated();
        let Admit::Yes(t4) = a.admit(x, true) else { panic!("slot given back by authentication") };
        assert!(matches!(a.admit(y, true), Admit::No("too many connections")));
        drop(t4);
        drop(t1);
        let c = a.counts();
        assert_eq!((c.connections, c.unauthenticated), (2, 2));
        assert_eq!(c.by_source.get(&x), Some(&1));
    }
}
