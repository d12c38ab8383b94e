//! tpvpn-manager: the in-cluster traffic manager.
//!
//! Layer and I/O contract: a QUIC server (quinn, TLS 1.3, pinned certificate on the
//! client side) that authenticates each client by token on the control stream, then
//! accepts one bidirectional stream per flow, dials the flow's destination with real
//! sockets (TCP with a dial timeout; UDP with a per-flow socket and idle timeout) and
//! relays bytes both ways with bounded buffers. TCP FIN and RST are carried as QUIC
//! stream FIN and stream reset (see `tpvpn_tunnel`).
//!
//! Cluster facts (CIDRs, DNS address, domain) come from flags and, with a Kubernetes
//! client, from watches of Services and Nodes ([`cluster`]); changes are pushed to
//! every connected client on its control stream.

pub mod auth;
pub mod catalog;
pub mod cluster;
pub mod dns;
pub mod intercepts;

pub mod metrics;
pub mod policy;
mod session;
pub mod targets;
mod tcp;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tpvpn_tunnel::handshake::TokenKind;
use tpvpn_tunnel::ClusterInfo;

pub use session::{serve, ConnectionLimits, Server};

/// A client must open its control stream and send an acceptable hello within this
/// long after the TLS handshake, or it is closed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest hello payload accepted (a token is 64 hex digits).
pub const MAX_HELLO: usize = 16 * 1024;

/// Errors of the manager library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tunnel(#[from] tpvpn_tunnel::Error),
    #[error("quic: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("client did not complete its hello within {HELLO_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("bad hello: {0}")]
    BadHello(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// What the manager serves.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shared token clients may present (empty: none is accepted; laptops then need
    /// a client certificate of this manager's signer).
    pub token: Vec<u8>,
    /// What laptops with certificates may do, asked of the API server (`--auth
    /// kubernetes`): a client for SubjectAccessReviews.
    pub access: Option<auth::access::Access>,
    /// The CA laptops' certificates must chain to (`--auth kubernetes`), for renewals.
    pub client_cas: Option<Arc<tpvpn_tunnel::quic::ClientCas>>,
    /// How node agents authenticate ([`auth`]); without a way no agent can connect.
    pub agents: auth::AgentAuth,
    /// What clients are told about the cluster; changes are pushed to them.
    pub views: cluster::Views,
    /// How long a TCP dial may take before the client is told "timed out".
    pub dial_timeout: Duration,
    /// A UDP flow without traffic for this long is closed.
    pub udp_idle_timeout: Duration,
    /// Relay buffer per direction per TCP flow.
    pub relay_buffer: usize,
    /// Health and Prometheus metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Caps on connections, before and after authentication.
    pub limits: ConnectionLimits,
    /// Which destinations are dialed.
    pub policy: policy::Policy,
    /// What one client session may hold at once.
    pub session_limits: policy::Limits,
    /// Which namespaces' Services clients may intercept.
    pub intercept_namespaces: intercepts::NamespacePolicy,
}

impl Config {
    /// A manager serving a fixed view of the cluster.
    pub fn new(token: Vec<u8>, cidrs: Vec<ipnet::IpNet>, dns: Option<IpAddr>, domain: String) -> Self {
        Self::with_views(token, cluster::fixed(ClusterInfo { cidrs, dns, domain }))
    }

    /// A manager serving the views published by [`cluster::watch`].
    pub fn with_views(token: Vec<u8>, views: cluster::Views) -> Self {
        Config {
            token,
            agents: auth::AgentAuth::None,
            access: None,
            client_cas: None,
            views,

            dial_timeout: Duration::from_secs(10),
            udp_idle_timeout: Duration::from_secs(60),
            relay_buffer: 256 * 1024,
            metrics: Arc::default(),
            limits: ConnectionLimits::default(),
            policy: policy::Policy::default(),
            session_limits: policy::Limits::default(),
            intercept_namespaces: intercepts::NamespacePolicy::default(),
        }
    }
}

impl Config {
    /// Which token `given` is, compared in constant time. With agents authenticated by
    /// Kubernetes any other token may be an agent's: the API server is asked once the
    /// hello says it is from an agent, and for which node.
    pub(crate) fn token_kind(&self, given: &[u8]) -> Option<TokenKind> {
        let agent = match &self.agents {
            auth::AgentAuth::None => false,
            auth::AgentAuth::Token(t) => token_matches(given, t),
            auth::AgentAuth::Kubernetes(_) => true,
        };
        match (token_matches(given, &self.token), agent) {
            (true, _) => Some(TokenKind::Client),
            (false, true) => Some(TokenKind::Agent),
            _ => None,
        }
    }

    /// The features this manager offers in its hello: intercepts when it watches the
    /// cluster and agents can connect.
    pub(crate) fn features(&self) -> u64 {
        use tpvpn_tunnel::handshake::{
            FEATURE_FILES, FEATURE_FILES_WRITE, FEATURE_FILE_HANDLES, FEATURE_INTERCEPTS, FEATURE_INTERCEPT_CONNECTION,
            FEATURE_RENEW, FEATURE_REVOKE,
        };
        let renew = if self.client_cas.is_some() { FEATURE_RENEW } else { 0 };
        if self.views.objects.is_some() && !matches!(self.agents, auth::AgentAuth::None) {
            FEATURE_INTERCEPTS
                | FEATURE_INTERCEPT_CONNECTION
                | FEATURE_REVOKE
                | FEATURE_FILES
                | FEATURE_FILES_WRITE
                | FEATURE_FILE_HANDLES
                | renew
        } else {
            renew
        }
    }
}

/// Binds the QUIC endpoint of the manager.
pub fn bind(listen: SocketAddr, server: quinn::ServerConfig) -> std::io::Result<quinn::Endpoint> {
    tpvpn_tunnel::quic::endpoint(listen, Some(server))
}

/// Compares tokens in time independent of where they differ.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    // No token configured: none matches (not even an empty one).
    let mut diff = (given.len() ^ expected.len()) | usize::from(expected.is_empty());
    for (i, e) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ e);
    }
    diff == 0
}

pub(crate) type Shared = Arc<Config>;

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"abcd", b"abc"));
        assert!(!token_matches(b"", b"abc"));
        // No shared token configured (`--auth kubernetes` without --token-file): none
        // matches, an empty one least of all.
        assert!(!token_matches(b"", b""));
        assert!(!token_matches(b"abc", b""));
    }
}
