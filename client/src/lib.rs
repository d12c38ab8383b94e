//! The tpvpn client: the `tpvpn` binary's library.
//!
//! Layer and I/O contract: `tpvpn up` connects to the manager ([`connect`]), creates the
//! TUN device, routes the cluster's CIDRs into it ([`os::routes`]), and runs the data plane
//! ([`dataplane`]): packets from the TUN device go through the sans-IO
//! `tpvpn_netstack::Stack`, whose flows are carried as QUIC streams and datagrams to the
//! manager. The daemon answers `tpvpn status` and `tpvpn down` on a Unix socket
//! ([`control`]) and records every change it makes to the system in
//! `TPVPN_RUNTIME_DIR` ([`state`]) so that a later `up` or `down` can undo them after a
//! crash.

pub mod cluster;
pub mod connect;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod intercept;
pub mod mount;
pub mod os;
pub mod state;

/// Errors of the client. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the manager at {addr}: no answer within {secs}s; {hint}")]
    ManagerUnreachable { addr: String, secs: u64, hint: &'static str },
    #[error("the manager at {addr} presented a certificate that is not the one from {ca}; check that certificate")]
    CertificateMismatch { addr: String, ca: String },
    #[error("the manager refused the token from {0}: {1}")]
    BadToken(String, String),
    #[error("{0}")]
    Kubernetes(String),
    #[error("{0}; install matching versions of tpvpn and tpvpn-manager")]
    VersionMismatch(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("connection to the manager failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}; exclude it with --never-proxy, reach it through virtual addresses with --vnat auto, or pass --allow-route-conflicts to route it anyway")]
    RouteConflict(String),
    #[error("{0}")]
    System(String),
    #[error(transparent)]
    Tunnel(#[from] tpvpn_tunnel::Error),
    /// The manager refused a request: its words, and its code when it gave one.
    #[error("{message}")]
    Refused { code: Option<tpvpn_tunnel::ErrorCode>, message: String },
}
