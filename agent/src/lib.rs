//! tpvpn-agent: the node agent of intercepts.
//!
//! Layer and I/O contract: one agent per node (DaemonSet `tpvpn-agent`, privileged,
//! `hostPID`, host network), never inside a workload. It connects to the manager as
//! [`Role::Agent`](tpvpn_tunnel::Role) with the agent token, and for each `Capture` the
//! manager sends it finds the pod's network namespace ([`locate`], from the container
//! runtime's files, [`runtime`], and [`netns`]), captures the pod port there with an
//! nftables `tproxy` table of its own ([`nft`]; fails open: without the agent's listening
//! socket the rule does nothing), reads the serving container's environment, and answers
//! `CaptureStatus`. Every connection captured ([`capture`]) goes whole, or request by
//! request ([`http`], as [`route`] decides), to a laptop over a stream to the manager
//! (`InterceptOpen`, the manager's `FlowReply`, then the bytes with TCP's FIN and RST
//! kept, [`tpvpn_tunnel::relay`]) or on to the pod's own server from the caller's address
//! ([`upstream`], [`replies`]); a connection whose intercept has no owner any more goes
//! to the pod. When the manager is
//! lost, or the agent stops, every table it made is removed; a new agent first removes
//! tables an earlier one left.

pub mod addrs;
pub mod capture;
pub mod files;
pub mod http;
pub mod load;
pub mod locate;
pub mod netns;
pub mod nft;
pub mod ports;
pub mod replies;
pub mod route;
pub mod runtime;
pub mod session;
pub mod sockdiag;
pub mod upstream;
pub mod watchdog;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace: {0}")]
    Netns(String),
    #[error("nft: {0}")]
    Nft(String),
    #[error("policy routing: {0}")]
    Route(String),
    #[error("{0}")]
    Locate(String),
    #[error("environment: {0}")]
    Env(String),
    #[error("{0}")]
    Config(String),
    #[error("manager: {0}")]
    Manager(String),
    /// The manager refused this agent's credential: trying again would not help.
    #[error("the manager refused this agent: {0}")]
    Refused(String),
    #[error(transparent)]
    Tunnel(#[from] tpvpn_tunnel::Error),
    #[error("quic: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
