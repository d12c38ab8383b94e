//! Connecting to the manager: QUIC with the pinned certificate, then the hello with
//! the token on the control stream. Every failure becomes an [`Error`] that says what is
//! wrong and what to do.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::quic::{client_config, parse_certs, PIN_MISMATCH, SERVER_NAME};
use tpvpn_tunnel::{ClusterInfo, ErrorCode, Message, CLOSE_REFUSED, PROTOCOL_VERSION};

use crate::Error;

/// How long to wait for the manager to answer the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected, authenticated session with the manager.
pub struct Session {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub manager: SocketAddr,
    pub cluster: ClusterInfo,
    /// The control stream; kept open for the life of the session.
    pub control: (quinn::SendStream, quinn::RecvStream),
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
        })
    }
}

/// Connects and authenticates.
pub async fn connect(target: &Target) -> Result<Session, Error> {
    let certs = parse_certs(&target.ca_pem, &target.ca_source).map_err(|e| Error::Config(e.to_string()))?;
    let token = target.token.clone();
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
    let unreachable = || Error::ManagerUnreachable { addr: manager, secs: CONNECT_TIMEOUT.as_secs() };
    let connecting = endpoint.connect_with(config, manager, SERVER_NAME).map_err(|e| Error::Config(e.to_string()))?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| unreachable())?
        .map_err(|e| map_connection_error(e, manager, target))?;

    let handshake = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(&mut send, &Message::ClientHello { version: PROTOCOL_VERSION, token }).await?;
        let reply = read_message(&mut recv).await?;
        Ok::<_, Error>((send, recv, reply))
    };
    let (send, recv, reply) = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Err(_) => return Err(unreachable()),
        Ok(Err(Error::Connection(e))) => return Err(map_connection_error(e, manager, target)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(r)) => r,
    };
    match reply {
        Some(Message::ServerHello { version, cluster }) if version == PROTOCOL_VERSION => {
            Ok(Session { endpoint, conn, manager, cluster, control: (send, recv) })
        }
        Some(Message::ServerHello { version, .. }) => Err(Error::VersionMismatch(format!(
            "the manager speaks tpvpn protocol v{version}, this client v{PROTOCOL_VERSION}"
        ))),
        Some(Message::Error { code, message, .. }) => Err(refusal(code, message, target)),
        Some(other) => Err(Error::Protocol(format!("manager sent {} instead of a hello", other.kind()))),
        None => Err(map_connection_error(conn.closed().await, manager, target)),
    }
}

fn refusal(code: ErrorCode, message: String, target: &Target) -> Error {
    match code {
        ErrorCode::Unauthorized => Error::BadToken(target.token_source.clone()),
        ErrorCode::VersionMismatch => Error::VersionMismatch(message),
        _ => Error::Protocol(format!("manager refused the connection: {message}")),
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
