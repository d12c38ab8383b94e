//! Connecting to the manager: QUIC with the pinned certificate, then the hello with
//! the token on the control stream (the sans-IO `tpvpn_tunnel::handshake`, versions
//! negotiated as a range; a version-1 manager is met by connecting again with a
//! version-1 hello). Every failure becomes an [`Error`] that says what is wrong and
//! what to do.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tpvpn_tunnel::handshake::{Accepted, ClientHandshake, ClientStep, Hello, Refusal};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::quic::{client_config, parse_certs, PIN_MISMATCH, SERVER_NAME};
use tpvpn_tunnel::{ClusterInfo, ErrorCode, Role, CLOSE_REFUSED, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use crate::Error;

/// How long to wait for the manager to answer the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected, authenticated session with the manager.
pub struct Session {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub manager: SocketAddr,
    pub cluster: ClusterInfo,
    /// The protocol version both speak, and the manager's range and features.
    pub version: u16,
    pub manager_versions: (u16, u16),
    pub features: u64,
    /// The control stream; kept open for the life of the session.
    pub control: (quinn::SendStream, quinn::RecvStream),
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
    /// HOST:PORT of the manager.
    pub manager: String,
    /// The manager's certificate (PEM), pinned.
    pub ca_pem: Vec<u8>,
    /// Where the certificate came from, for messages ("--manager-ca FILE").
    pub ca_source: String,
    pub token: Vec<u8>,
    /// Where the token came from, for messages.
    pub token_source: String,
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
            manager,
            ca_pem,
            ca_source: format!("--manager-ca {}", ca_file.display()),
            token: token.as_bytes().to_vec(),
            token_source: format!("--token-file {}", token_file.display()),
            identity: Identity::default(),
        })
    }
}

/// Connects and authenticates.
pub async fn connect(target: &Target) -> Result<Session, Error> {
    let certs = parse_certs(&target.ca_pem, &target.ca_source).map_err(|e| Error::Config(e.to_string()))?;
    let manager = tokio::net::lookup_host(&target.manager)
        .await
        .map_err(|e| Error::Config(format!("--manager {}: {e} (expected HOST:PORT)", target.manager)))?
        .next()
        .ok_or_else(|| Error::Config(format!("--manager {}: no address", target.manager)))?;
    let config = client_config(certs[0].clone()).map_err(|e| Error::Config(e.to_string()))?;
    let bind: SocketAddr =
        if manager.is_ipv4() { "0.0.0.0:0".parse().expect("literal") } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let endpoint = tpvpn_tunnel::quic::endpoint(bind, None)
        .map_err(|e| Error::System(format!("cannot open a UDP socket: {e}")))?;
    let mut versions = (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);
    loop {
        match attempt(&endpoint, &config, manager, target, versions).await? {
            Attempt::Accepted(conn, accepted, control) => {
                let Accepted { version, cluster, manager_versions, features } = accepted;
                return Ok(Session { endpoint, conn, manager, cluster, version, manager_versions, features, control });
            }
            // An older manager: speak its version, once.
            Attempt::Retry(version) if versions.1 != version => versions = (version, version),
            Attempt::Retry(version) => {
                return Err(Error::Protocol(format!("the manager asked for protocol v{version} twice")))
            }
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
    manager: SocketAddr,
    target: &Target,
    versions: (u16, u16),
) -> Result<Attempt, Error> {
    let unreachable = || Error::ManagerUnreachable { addr: manager, secs: CONNECT_TIMEOUT.as_secs() };
    let connecting =
        endpoint.connect_with(config.clone(), manager, SERVER_NAME).map_err(|e| Error::Config(e.to_string()))?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| unreachable())?
        .map_err(|e| map_connection_error(e, manager, target))?;
    let mut handshake = ClientHandshake::new(Hello {
        token: target.token.clone(),
        role: Role::Client,
        user: target.identity.user.clone(),
        host: target.identity.host.clone(),
        client_id: target.identity.client_id.clone(),
        features: 0,
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
    let (send, recv, step) = match tokio::time::timeout(CONNECT_TIMEOUT, exchange).await {
        Err(_) => return Err(unreachable()),
        Ok(Err(Error::Connection(e))) => return Err(map_connection_error(e, manager, target)),
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
        Some(ClientStep::NeedMore) | None => Err(map_connection_error(conn.closed().await, manager, target)),
    }
}

fn refusal(handshake: &ClientHandshake, r: Refusal, target: &Target) -> Error {
    match r.code {
        ErrorCode::Unauthorized => Error::BadToken(target.token_source.clone()),
        ErrorCode::VersionMismatch => Error::VersionMismatch(handshake.upgrade_hint(&r)),
        _ => Error::Protocol(format!("manager refused the connection: {}", r.message)),
    }
}

fn map_connection_error(e: quinn::ConnectionError, manager: SocketAddr, target: &Target) -> Error {
    match e {
        quinn::ConnectionError::TimedOut => {
            Error::ManagerUnreachable { addr: manager, secs: CONNECT_TIMEOUT.as_secs() }
        }
        quinn::ConnectionError::TransportError(t) if t.to_string().contains(PIN_MISMATCH) => {
            Error::CertificateMismatch { addr: manager, ca: target.ca_source.clone() }
        }
        quinn::ConnectionError::ApplicationClosed(c)
            if tpvpn_tunnel::refusal_code(c.error_code.into_inner()).is_some() =>
        {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            match tpvpn_tunnel::refusal_code(c.error_code.into_inner()) {
                Some(ErrorCode::Unauthorized) => Error::BadToken(target.token_source.clone()),
                Some(ErrorCode::VersionMismatch) => Error::VersionMismatch(reason),
                _ => Error::Protocol(format!("manager refused the connection: {reason}")),
            }
        }
        // A version-1 manager's refusal: one code, the reason in words.
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CLOSE_REFUSED.into() => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            if reason.contains("token") {
                Error::BadToken(target.token_source.clone())
            } else if reason.contains("version") {
                Error::VersionMismatch(reason)
            } else {
                Error::Protocol(format!("manager refused the connection: {reason}"))
            }
        }
        quinn::ConnectionError::ConnectionClosed(c) if c.to_string().contains(PIN_MISMATCH) => {
            Error::CertificateMismatch { addr: manager, ca: target.ca_source.clone() }
        }
        other => Error::Connection(other),
    }
}
