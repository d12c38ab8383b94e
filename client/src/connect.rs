//! Connecting to the manager: QUIC with the pinned certificate, then the hello with
//! the token on the control stream (the sans-IO `tpvpn_tunnel::handshake`, versions
//! negotiated as a range; a version-1 manager is met by connecting again with a
//! version-1 hello). Every failure becomes an [`Error`] that says what is wrong and
//! what to do. Two carriers: QUIC over UDP, and QUIC over the API server's port-forward
//! ([`crate::cluster::portforward`], [`tpvpn_tunnel::stream`]); `--transport` picks.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tpvpn_tunnel::handshake::{
    Accepted, ClientHandshake, ClientStep, Hello, Negotiated, Refusal, FEATURE_INTERCEPT_CONNECTION,
};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::quic::{client_config_for, is_pin_mismatch, parse_certs, Class, SERVER_NAME};
use tpvpn_tunnel::{ClusterInfo, ErrorCode, Role, CLOSE_REFUSED, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tracing::{info, warn};

use crate::cluster::certificate::Issued;
use crate::cluster::portforward::{Forwarded, PortForward};
use crate::Error;

/// How long to wait for the manager to answer the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// With `--transport auto`, how long QUIC over UDP is given before the port-forward is
/// tried (a handshake takes one or two round trips).
pub const AUTO_QUIC_TIMEOUT: Duration = Duration::from_secs(2);

/// A connected, authenticated session with the manager.
pub struct Session {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    /// How the manager was reached.
    pub via: Via,
    pub cluster: ClusterInfo,
    /// The protocol version both speak, and the manager's range and features.
    pub version: Negotiated,
    pub manager_versions: (u16, u16),
    pub features: u64,
    /// The control stream; kept open for the life of the session.
    pub control: (quinn::SendStream, quinn::RecvStream),
    /// The second connection the manager opens this client's intercept streams on, when it
    /// takes one ([`FEATURE_INTERCEPT_CONNECTION`]): callers of an intercept who stop
    /// reading then hold its windows, never the tunnel's.
    pub intercepts: Option<quinn::Connection>,
}

/// Closes a session's tunnel connection and its intercepts connection.
pub fn close_all(conn: &quinn::Connection, intercepts: Option<&quinn::Connection>, reason: &[u8]) {
    conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), reason);
    if let Some(c) = intercepts {
        c.close(tpvpn_tunnel::CLOSE_NORMAL.into(), reason);
    }
}

/// The carrier of the connection to the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// QUIC over UDP to this address.
    Quic(SocketAddr),
    /// QUIC over the API server's port-forward to this pod (`namespace/name`) and port.
    PortForward { pod: String, port: u16 },
}

impl Via {
    /// `quic` or `portforward`, as `status` shows it.
    pub fn transport(&self) -> &'static str {
        match self {
            Via::Quic(_) => "quic",
            Via::PortForward { .. } => "portforward",
        }
    }

    /// The manager's UDP address, when reached over UDP.
    pub fn udp_address(&self) -> Option<SocketAddr> {
        match self {
            Via::Quic(a) => Some(*a),
            Via::PortForward { .. } => None,
        }
    }

    fn unreachable(&self, deadline: Duration) -> Error {
        let hint = match self {
            Via::Quic(_) => "check --manager and that tpvpn-manager is running and reachable over UDP; where UDP cannot reach it, use --transport portforward (through the API server)",
            Via::PortForward { .. } => "the port-forward carried no answer: check the manager pod's logs",
        };
        Error::ManagerUnreachable { addr: self.to_string(), secs: deadline.as_secs(), hint }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Quic(a) => write!(f, "{a}"),
            Via::PortForward { pod, port } => write!(f, "pod {pod} port {port} (port-forward)"),
        }
    }
}

/// Which carrier `up` uses (`--transport`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// QUIC over UDP to the manager's address; if no handshake completes within a short
    /// deadline, or there is no address, through the API server's port-forward.
    #[default]
    Auto,
    /// QUIC over UDP only.
    Quic,
    /// Through the API server's port-forward only.
    Portforward,
}

/// Who the client says it is in the hello (from version 2): what `tpvpn list` and
/// refusals show to others, and the id that lets a reconnecting daemon re-claim its
/// intercepts. Declared, not authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub host: String,
    pub client_id: Vec<u8>,
}

impl Identity {
    /// The invoking user (`SUDO_USER` under sudo, else `USER`, else the uid) and this
    /// machine's host name.
    pub fn of_this_machine(client_id: Vec<u8>) -> Identity {
        let user = ["SUDO_USER", "USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
            .or_else(|| nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name))
            .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()));
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".into());
        Identity { user, host, client_id }
    }
}

/// Where and how to reach the manager: from flags (direct mode) or from the cluster.
#[derive(Debug, Clone)]
pub struct Target {
    /// HOST:PORT of the manager's QUIC port, if known.
    pub manager: Option<String>,
    pub transport: Transport,
    /// How to reach the manager through the API server (kubeconfig mode).
    pub portforward: Option<PortForward>,
    /// The manager's certificate (PEM), pinned.
    pub ca_pem: Vec<u8>,
    /// Where the certificate came from, for messages ("--manager-ca FILE").
    pub ca_source: String,
    /// The shared client token (none with a certificate).
    pub token: Vec<u8>,
    /// Where the token or certificate came from, for messages.
    pub token_source: String,
    /// The client certificate from the manager's signer, presented instead of a token.
    pub certificate: Option<Arc<Issued>>,
    pub identity: Identity,
}

impl Target {
    /// Direct mode: the certificate and token from files.
    pub fn from_files(manager: String, ca_file: &Path, token_file: &Path) -> Result<Target, Error> {
        let ca_pem = std::fs::read(ca_file)
            .map_err(|e| Error::Config(format!("cannot read --manager-ca {}: {e}", ca_file.display())))?;
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| Error::Config(format!("cannot read token file {}: {e}", token_file.display())))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::Config(format!("token file {} is empty", token_file.display())));
        }
        Ok(Target {
            manager: Some(manager),
            transport: Transport::Quic,
            portforward: None,
            ca_pem,
            ca_source: format!("--manager-ca {}", ca_file.display()),
            token: token.as_bytes().to_vec(),
            token_source: format!("--token-file {}", token_file.display()),
            certificate: None,
            identity: Identity::default(),
        })
    }
}

/// Connects and authenticates, over the carrier `target.transport` asks for.
pub async fn connect(target: &Target) -> Result<Session, Error> {
    let certs = parse_certs(&target.ca_pem, &target.ca_source).map_err(|e| Error::Config(e.to_string()))?;
    let pinned = certs[0].clone();
    match (target.transport, target.manager.as_deref(), target.portforward.as_ref()) {
        (Transport::Portforward, _, Some(pf)) | (Transport::Auto, None, Some(pf)) => {
            via_portforward(target, pf, pinned).await
        }
        (Transport::Portforward, _, None) => Err(Error::Config(
            "--transport portforward goes through the API server: it needs a kubeconfig context, not --manager-ca/--token-file".into(),
        )),
        (Transport::Quic, Some(manager), _) | (Transport::Auto, Some(manager), None) => {
            via_quic(target, manager, pinned, CONNECT_TIMEOUT).await
        }
        (Transport::Auto, Some(manager), Some(pf)) => match via_quic(target, manager, pinned.clone(), AUTO_QUIC_TIMEOUT).await {
            Err(Error::ManagerUnreachable { .. }) => {
                info!(%manager, "no QUIC answer from the manager; reaching it through the API server's port-forward");
                via_portforward(target, pf, pinned).await
            }
            other => other,
        },
        (Transport::Quic | Transport::Auto, None, _) => Err(Error::Kubernetes(
            "no address for the manager's QUIC port (no LoadBalancer, no NodePort for port `quic`): use --transport portforward, set manager-address in the kubeconfig's tpvpn extension, or pass --manager HOST:PORT".into(),
        )),
    }
}

async fn via_quic(
    target: &Target,
    manager: &str,
    pinned: CertificateDer<'static>,
    deadline: Duration,
) -> Result<Session, Error> {
    let addr = tokio::net::lookup_host(manager)
        .await
        .map_err(|e| Error::Config(format!("--manager {manager}: {e} (expected HOST:PORT)")))?
        .next()
        .ok_or_else(|| Error::Config(format!("--manager {manager}: no address")))?;
    let config = Configs::new(pinned, false, target)?;
    let bind: SocketAddr =
        if addr.is_ipv4() { "0.0.0.0:0".parse().expect("literal") } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let endpoint = tpvpn_tunnel::quic::endpoint(bind, None)
        .map_err(|e| Error::System(format!("cannot open a UDP socket: {e}")))?;
    let peer = Peer { addr, via: Via::Quic(addr), deadline };
    handshake(endpoint, &config, &peer, target).await
}

async fn via_portforward(target: &Target, pf: &PortForward, pinned: CertificateDer<'static>) -> Result<Session, Error> {
    let Forwarded { stream, pod, port, error } = pf.open().await?;
    // What the API server says when forwarding fails (nothing listens on the port, say).
    let (said_send, said) = tokio::sync::watch::channel(None::<String>);
    tokio::spawn(async move {
        if let Some(msg) = error.await {
            let _ = said_send.send(Some(msg));
        }
    });
    let via = Via::PortForward { pod: pod.clone(), port };
    over_stream(target, stream, via, pinned, said).await.map_err(|e| match e {
        StreamError::Closed(msg) => Error::Kubernetes(format!(
            "the API server's port-forward to pod {pod} port {port} failed: {msg}; check the manager pod (kubectl -n {} logs {})",
            pf.namespace,
            pod.rsplit('/').next().unwrap_or(&pod)
        )),
        StreamError::Other(e) => e,
    })
}

/// Why connecting over a stream failed: the stream ended (with what its carrier said
/// last), or anything else.
pub enum StreamError {
    Closed(String),
    Other(Error),
}

/// Connects over `stream` (QUIC packets on a byte stream, [`tpvpn_tunnel::stream`]): the
/// port-forward's, or a TCP connection to the manager's TCP port. `said` carries what
/// the carrier reports when it fails. Once connected, the stream ending closes the
/// connection at once (QUIC alone would wait for its idle timeout).
pub async fn over_stream<S>(
    target: &Target,
    stream: S,
    via: Via,
    pinned: CertificateDer<'static>,
    said: tokio::sync::watch::Receiver<Option<String>>,
) -> Result<Session, StreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let port = match &via {
        Via::PortForward { port, .. } => *port,
        Via::Quic(a) => a.port(),
    };
    // The address quinn sees for the manager: any will do, there is one path.
    let addr: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, port).into();
    let (endpoint, socket) = tpvpn_tunnel::stream::client_endpoint(stream, addr)
        .map_err(|e| StreamError::Other(Error::System(format!("cannot make a QUIC endpoint over the stream: {e}"))))?;
    let config = Configs::new(pinned, true, target).map_err(StreamError::Other)?;
    let peer = Peer { addr, via, deadline: CONNECT_TIMEOUT };
    let failed = {
        let (socket, mut said) = (socket.clone(), said.clone());
        async move {
            let why = socket.closed().await;
            // An error frame comes just before the close.
            let _ = tokio::time::timeout(Duration::from_millis(500), said.wait_for(Option::is_some)).await;
            let msg = said.borrow().clone().unwrap_or(why);
            msg
        }
    };
    let connected = tokio::select! {
        r = handshake(endpoint, &config, &peer, target) => r.map_err(StreamError::Other),
        msg = failed => Err(StreamError::Closed(msg)),
    };
    let session = match connected {
        Ok(s) => s,
        Err(e) => {
            // The stream (a port-forward) goes at once, not when the manager gives up on it.
            socket.close("connecting failed".into());
            return Err(e);
        }
    };
    let (conn, intercepts) = (session.conn.clone(), session.intercepts.clone());
    tokio::spawn(async move {
        tokio::select! {
            why = socket.closed() => {
                let why = said.borrow().clone().unwrap_or(why);
                warn!(%why, "the stream to the manager ended");
                close_all(&conn, intercepts.as_ref(), b"the stream ended");
            }
            _ = conn.closed() => socket.close("the connection ended".into()),
        }
    });
    Ok(session)
}

/// The QUIC client configurations of a session's two connections: the tunnel's, and the
/// intercepts connection's ([`Class::Intercepts`]: small stream windows and a connection
/// window that covers every stream the manager may open, so that callers that stop
/// reading one intercept's answers never use up the room of the developer's others).
struct Configs {
    tunnel: quinn::ClientConfig,
    intercepts: quinn::ClientConfig,
}

impl Configs {
    fn new(pinned: CertificateDer<'static>, over_stream: bool, target: &Target) -> Result<Configs, Error> {
        let cert = target.certificate.as_ref().map(|c| &c.cert);
        let config = |class| {
            client_config_for(pinned.clone(), over_stream, class, cert).map_err(|e| Error::Config(e.to_string()))
        };
        Ok(Configs { tunnel: config(Class::Tunnel)?, intercepts: config(Class::Intercepts)? })
    }
}

/// Where the QUIC connection goes, and how long its handshake may take.
struct Peer {
    addr: SocketAddr,
    via: Via,
    deadline: Duration,
}

/// QUIC and the hello on `endpoint`, offering this client's versions (and once more an
/// older manager's own).
async fn handshake(
    endpoint: quinn::Endpoint,
    config: &Configs,
    peer: &Peer,
    target: &Target,
) -> Result<Session, Error> {
    let mut versions = (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);
    loop {
        match attempt(&endpoint, &config.tunnel, peer, target, versions, Role::Client).await? {
            Attempt::Accepted(conn, accepted, control) => {
                let Accepted { version, cluster, manager_versions, features } = accepted;
                let intercepts = if features & FEATURE_INTERCEPT_CONNECTION != 0 {
                    intercepts_connection(&endpoint, &config.intercepts, peer, target, version).await
                } else {
                    None
                };
                let via = peer.via.clone();
                return Ok(Session {
                    endpoint,
                    conn,
                    via,
                    cluster,
                    version,
                    manager_versions,
                    features,
                    control,
                    intercepts,
                });
            }
            // An older manager: speak its version, once.
            Attempt::Retry(version) if versions.1 != version => versions = (version, version),
            Attempt::Retry(version) => {
                return Err(Error::Protocol(format!("the manager asked for protocol v{version} twice")))
            }
        }
    }
}

/// The session's intercepts connection (`Role::Intercepts`: a second connection, of
/// [`Class::Intercepts`], so that what stalls there never stalls the tunnel, nor one
/// intercept the others); without it (a warning says why) the manager opens intercept
/// streams on the tunnel's connection.
async fn intercepts_connection(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    peer: &Peer,
    target: &Target,
    version: Negotiated,
) -> Option<quinn::Connection> {
    let version = version.number();
    match attempt(endpoint, config, peer, target, (version, version), Role::Intercepts).await {
        Ok(Attempt::Accepted(conn, ..)) => Some(conn),
        Ok(Attempt::Retry(v)) => {
            warn!(v, "the manager asked the intercepts connection for another version: intercepts share the tunnel");
            None
        }
        Err(e) => {
            warn!(error = %e, "no intercepts connection: intercepts share the tunnel");
            None
        }
    }
}

enum Attempt {
    Accepted(quinn::Connection, Accepted, (quinn::SendStream, quinn::RecvStream)),
    Retry(u16),
}

/// One QUIC connection and hello offering `versions`.
async fn attempt(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    peer: &Peer,
    target: &Target,
    versions: (u16, u16),
    role: Role,
) -> Result<Attempt, Error> {
    let unreachable = || peer.via.unreachable(peer.deadline);
    let connecting =
        endpoint.connect_with(config.clone(), peer.addr, SERVER_NAME).map_err(|e| Error::Config(e.to_string()))?;
    let conn = tokio::time::timeout(peer.deadline, connecting)
        .await
        .map_err(|_| unreachable())?
        .map_err(|e| map_connection_error(e, peer, target))?;
    // A client takes `Revoke` notices on its control stream.
    let features = if role == Role::Client { tpvpn_tunnel::handshake::FEATURE_REVOKE } else { 0 };
    let mut handshake = ClientHandshake::new(Hello {
        token: target.token.clone(),
        role,
        user: target.identity.user.clone(),
        host: target.identity.host.clone(),
        client_id: target.identity.client_id.clone(),
        features,
        versions,
    });
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        for frame in handshake.hello_frames() {
            write_message(&mut send, &frame).await?;
        }
        loop {
            let Some(reply) = read_message(&mut recv).await? else {
                return Ok::<_, Error>((send, recv, None));
            };
            match handshake.on_message(reply) {
                ClientStep::NeedMore => continue,
                step => return Ok((send, recv, Some(step))),
            }
        }
    };
    let (send, recv, step) = match tokio::time::timeout(peer.deadline, exchange).await {
        Err(_) => return Err(unreachable()),
        Ok(Err(Error::Connection(e))) => return Err(map_connection_error(e, peer, target)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(r)) => r,
    };
    match step {
        Some(ClientStep::Accepted(a)) => Ok(Attempt::Accepted(conn, a, (send, recv))),
        Some(ClientStep::Retry { version }) => {
            conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"retrying with an older version");
            Ok(Attempt::Retry(version))
        }
        Some(ClientStep::Refused(r)) => Err(refusal(&handshake, r, target)),
        Some(ClientStep::Invalid(why)) => Err(Error::Protocol(why)),
        Some(ClientStep::NeedMore) | None => Err(map_connection_error(conn.closed().await, peer, target)),
    }
}

fn refusal(handshake: &ClientHandshake, r: Refusal, target: &Target) -> Error {
    match r.code {
        ErrorCode::Unauthorized => Error::BadToken(target.token_source.clone(), r.message),
        ErrorCode::VersionMismatch => Error::VersionMismatch(handshake.upgrade_hint(&r)),
        _ => Error::Protocol(format!("manager refused the connection: {}", r.message)),
    }
}

fn map_connection_error(e: quinn::ConnectionError, peer: &Peer, target: &Target) -> Error {
    match e {
        quinn::ConnectionError::TimedOut => peer.via.unreachable(peer.deadline),
        ref e if is_pin_mismatch(e) => {
            Error::CertificateMismatch { addr: peer.via.to_string(), ca: target.ca_source.clone() }
        }
        quinn::ConnectionError::ApplicationClosed(c)
            if tpvpn_tunnel::refusal_code(c.error_code.into_inner()).is_some() =>
        {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            match tpvpn_tunnel::refusal_code(c.error_code.into_inner()) {
                Some(ErrorCode::Unauthorized) => Error::BadToken(target.token_source.clone(), reason),
                Some(ErrorCode::VersionMismatch) => Error::VersionMismatch(reason),
                _ => Error::Protocol(format!("manager refused the connection: {reason}")),
            }
        }
        // A version-1 manager's refusal: one code, the reason in words.
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CLOSE_REFUSED.into() => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            if reason.contains("token") {
                Error::BadToken(target.token_source.clone(), reason)
            } else if reason.contains("version") {
                Error::VersionMismatch(reason)
            } else {
                Error::Protocol(format!("manager refused the connection: {reason}"))
            }
        }
        other => Error::Connection(other),
    }
}
