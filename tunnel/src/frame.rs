//! Frames on the control stream and at the head of every flow stream.
//!
//! ```text
//! +-----------+---------------------+------------------------+
//! | type (u8) | payload length (u32 | payload                |
//! |           | big endian)         |                        |
//! +-----------+---------------------+------------------------+
//! ```
//!
//! [`Frame`] is the zero-copy view; [`Message`] is the parsed representation with
//! [`Message::parse`] and [`Message::emit`]. A frame of an unknown type is kept as
//! [`Message::Unknown`] so that newer peers can add frames; unknown protocol numbers,
//! status codes and error codes are kept as their raw values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::files::{FileAnswer, FileAttr, FileFailure, FileKind, FileOp};
use crate::{Error, Result};

/// Bytes before a frame's payload.
pub const FRAME_HEADER_LEN: usize = 5;
/// Largest payload a frame may carry; larger claims are refused before buffering.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;

mod ty {
    pub const CLIENT_HELLO: u8 = 0x01;
    pub const SERVER_HELLO: u8 = 0x02;
    pub const ERROR: u8 = 0x03;
    pub const CLUSTER_UPDATE: u8 = 0x04;
    pub const NAMESPACES: u8 = 0x05;
    pub const SERVICES: u8 = 0x06;
    pub const CLIENT_INFO: u8 = 0x07;
    pub const SERVER_INFO: u8 = 0x08;
    pub const CATALOG_CHUNK: u8 = 0x09;
    pub const FLOW_OPEN: u8 = 0x10;
    pub const FLOW_REPLY: u8 = 0x11;
    pub const DNS_QUERY: u8 = 0x20;
    pub const DNS_ANSWER: u8 = 0x21;
    pub const INTERCEPT_REQUEST: u8 = 0x30;
    pub const INTERCEPT_REPLY: u8 = 0x31;
    pub const LEAVE: u8 = 0x32;
    pub const ACK: u8 = 0x33;
    pub const INTERCEPT_OPEN: u8 = 0x34;
    pub const INTERCEPT_LIST: u8 = 0x35;
    pub const INTERCEPT_TABLE: u8 = 0x36;
    pub const REVOKE: u8 = 0x37;
    pub const RENEW: u8 = 0x38;
    pub const CAPTURE: u8 = 0x40;
    pub const RELEASE: u8 = 0x41;
    pub const CAPTURE_STATUS: u8 = 0x42;
    pub const FILES_OPEN: u8 = 0x50;
    pub const FILE_REQUEST: u8 = 0x51;
    pub const FILE_REPLY: u8 = 0x52;
    pub const FILES_READY: u8 = 0x53;
}

/// A zero-copy view of one frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps `buffer` after checking that it holds at least one whole frame.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < FRAME_HEADER_LEN {
            return Err(Error::Truncated { need: FRAME_HEADER_LEN, have: b.len() });
        }
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(Error::TooLong(len));
        }
        if b.len() < FRAME_HEADER_LEN + len {
            return Err(Error::Truncated { need: FRAME_HEADER_LEN + len, have: b.len() });
        }
        Ok(Frame { buffer })
    }

    pub fn frame_type(&self) -> u8 {
        self.buffer.as_ref()[0]
    }

    pub fn payload_len(&self) -> usize {
        let b = self.buffer.as_ref();
        u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize
    }

    /// Header plus payload: the bytes this frame occupies.
    pub fn total_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload_len()
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[FRAME_HEADER_LEN..self.total_len()]
    }
}

/// Transport protocol of a flow. Unknown numbers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]

pub enum Protocol {
    Tcp,
    Udp,
    Other(u8),
}

impl From<u8> for Protocol {
    fn from(v: u8) -> Self {
        match v {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            o => Protocol::Other(o),
        }
    }
}

impl From<Protocol> for u8 {
    fn from(p: Protocol) -> u8 {
        match p {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Other(o) => o,
        }
    }
}

/// Outcome of the manager's dial for a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowStatus {
    /// Connected (TCP) or socket ready (UDP).
    Ok,
    /// The destination refused the connection (TCP RST).
    Refused,
    /// No route to the destination, or it did not answer ARP/ND.
    Unreachable,
    /// The destination did not answer within the manager's dial timeout.
    TimedOut,
    /// The manager will not dial: limits, policy, unsupported protocol.
    Denied,
    Other(u8),
}

impl From<u8> for FlowStatus {
    fn from(v: u8) -> Self {
        match v {
            0 => FlowStatus::Ok,
            1 => FlowStatus::Refused,
            2 => FlowStatus::Unreachable,
            3 => FlowStatus::TimedOut,
            4 => FlowStatus::Denied,
            o => FlowStatus::Other(o),
        }
    }
}

impl From<FlowStatus> for u8 {
    fn from(s: FlowStatus) -> u8 {
        match s {
            FlowStatus::Ok => 0,
            FlowStatus::Refused => 1,
            FlowStatus::Unreachable => 2,
            FlowStatus::TimedOut => 3,
            FlowStatus::Denied => 4,
            FlowStatus::Other(o) => o,
        }
    }
}

/// Why the manager refused a client or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The client's token is wrong.
    Unauthorized,
    /// The client speaks another protocol version.
    VersionMismatch,
    /// A per-client limit was reached.
    Limit,
    /// The request was malformed.
    Protocol,
    /// What was asked for is held by someone else (an intercept of the same port).
    Conflict,
    /// What was asked for does not exist (a Service, a port, an intercept).
    NotFound,
    /// The other side's protocol version lacks the feature; `message` says which side to
    /// upgrade.
    Unsupported,
    /// It exists but cannot be served now (no ready pods, no agent on a pod's node).
    Unavailable,
    /// The manager's policy does not allow it (a protected namespace). Peers before it
    /// read it as `Other(9)`.
    Forbidden,
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(v: u16) -> Self {
        match v {
            1 => ErrorCode::Unauthorized,
            2 => ErrorCode::VersionMismatch,
            3 => ErrorCode::Limit,
            4 => ErrorCode::Protocol,
            5 => ErrorCode::Conflict,
            6 => ErrorCode::NotFound,
            7 => ErrorCode::Unsupported,
            8 => ErrorCode::Unavailable,
            9 => ErrorCode::Forbidden,
            o => ErrorCode::Other(o),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        match c {
            ErrorCode::Unauthorized => 1,
            ErrorCode::VersionMismatch => 2,
            ErrorCode::Limit => 3,
            ErrorCode::Protocol => 4,
            ErrorCode::Conflict => 5,
            ErrorCode::NotFound => 6,
            ErrorCode::Unsupported => 7,
            ErrorCode::Unavailable => 8,
            ErrorCode::Forbidden => 9,
            ErrorCode::Other(o) => o,
        }
    }
}

/// What the manager tells a client about the cluster at connect.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterInfo {
    /// CIDRs of services and pods: what the client routes into the tunnel.
    pub cidrs: Vec<IpNet>,
    /// The cluster DNS server, if known.
    pub dns: Option<IpAddr>,
    /// The cluster domain (`cluster.local`).
    pub domain: String,
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A Service as clients need it: for DNS answers and `tpvpn list`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// ClusterIPs; empty for a headless Service.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// Who is on the other end of a connection to the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A laptop's daemon.
    Client,
    /// The node agent of `node`.
    Agent { node: String },
    /// A laptop's second connection, for the streams of its intercepts only: attached
    /// to its live session with the same client id (`FEATURE_INTERCEPT_CONNECTION`).
    Intercepts,
    /// A role this version does not know, kept.
    Other(u8),
}

/// One pod an intercept captures, as `intercept` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptTarget {
    pub pod: String,
    /// The pod's IP and the container port captured there.
    pub addr: SocketAddr,
    /// Whether capture is at the plaintext hop behind a mesh sidecar.
    pub meshed: bool,
}

/// What a personal intercept takes (protocol v3): the HTTP requests carrying every
/// header given (name case-insensitive, value exact) whose path starts with
/// `path_prefix`. Empty: a global intercept (the whole connection, any protocol).
///
/// On the wire it trails [`Message::InterceptRequest`] and [`Message::Capture`], and
/// only when not empty, so that a v2 peer's frames read as before; it is never sent to
/// a v2 peer, which would refuse the trailing bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Matchers {
    pub headers: Vec<(String, String)>,
    pub path_prefix: String,
}

impl Matchers {
    /// A global intercept's.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.path_prefix.is_empty()
    }

    /// The same matchers written in one canonical order (header names lower case,
    /// sorted): two requests for the same traffic compare equal.
    pub fn canonical(&self) -> Matchers {
        let mut headers: Vec<(String, String)> =
            self.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
        headers.sort();
        headers.dedup();
        Matchers { headers, path_prefix: self.path_prefix.clone() }
    }
}

impl std::fmt::Display for Matchers {
    /// `x-dev: alice, path /api`, or `all traffic`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("all traffic");
        }
        let mut parts: Vec<String> = self.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        if !self.path_prefix.is_empty() {
            parts.push(format!("path {}*", self.path_prefix));
        }
        f.write_str(&parts.join(", "))
    }
}

/// One Service's intercept state, for `tpvpn list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptRow {
    pub namespace: String,
    pub service: String,
    pub state: InterceptState,
    /// Who holds it (`user@host`), when intercepted.
    pub holder: String,
    /// The Service port intercepted, when intercepted.
    pub port: u16,
    /// Seconds since the Unix epoch when it was claimed, when intercepted.
    pub since: u64,
    /// Whether the asking client holds it.
    pub mine: bool,
}

/// Whether a Service can be intercepted. Unknown values are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterceptState {
    /// Every ready pod sits on a node with an agent.
    Ready,
    /// Intercepted (see the row's holder).
    Intercepted,
    /// A ready pod's node has no agent.
    NoAgent,
    /// No ready pod selected (or no selector).
    NoPods,
    Other(u8),
}

impl From<u8> for InterceptState {
    fn from(v: u8) -> Self {
        match v {
            0 => InterceptState::Ready,
            1 => InterceptState::Intercepted,
            2 => InterceptState::NoAgent,
            3 => InterceptState::NoPods,
            o => InterceptState::Other(o),
        }
    }
}

impl From<InterceptState> for u8 {
    fn from(s: InterceptState) -> u8 {
        match s {
            InterceptState::Ready => 0,
            InterceptState::Intercepted => 1,
            InterceptState::NoAgent => 2,
            InterceptState::NoPods => 3,
            InterceptState::Other(o) => o,
        }
    }
}

/// A parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame of the control stream: the client's protocol version and token.
    ClientHello { version: u16, token: Vec<u8> },
    /// The manager accepts the client.
    ServerHello { version: u16, cluster: ClusterInfo },
    /// The manager's view of the cluster changed (pushed on the control stream).
    ClusterUpdate { cluster: ClusterInfo },
    /// Every namespace of the cluster (pushed at connect and on change).
    Namespaces { names: Vec<String> },
    /// Every Service of the cluster (pushed at connect and on change).
    Services { services: Vec<ServiceInfo> },
    /// The manager refuses the client or a request; `message` is for humans.
    Error { code: ErrorCode, version: u16, message: String },
    /// First frame of a flow stream.
    FlowOpen { protocol: Protocol, flow_id: u64, src: SocketAddr, dst: SocketAddr },
    /// The manager's answer to `FlowOpen`.
    FlowReply { status: FlowStatus, message: String },
    /// First frame of a DNS stream: a DNS query (wire format) for the cluster DNS.
    DnsQuery { query: Vec<u8> },
    /// The cluster DNS's answer (wire format), passed through unchanged.
    DnsAnswer { answer: Vec<u8> },
    /// Right after a [`Message::ClientHello`] whose version is 2 or more: the oldest
    /// version the peer speaks, who it is and what it supports. `user` and `host` are
    /// what the peer declares (not authenticated); `client_id` lets a daemon that
    /// reconnects re-claim its intercepts.
    ClientInfo { min_version: u16, role: Role, user: String, host: String, client_id: Vec<u8>, features: u64 },
    /// Right after a [`Message::ServerHello`] of version 2 or more: the manager's range
    /// and features.
    ServerInfo { min_version: u16, max_version: u16, features: u64 },
    /// Part of the catalog (v2): a snapshot in chunks, the first with `reset` (the client
    /// clears its tables), or a delta against what was sent before; `complete` ends a
    /// batch (the client's tables are whole again). `services` are added or changed.
    CatalogChunk {
        reset: bool,
        complete: bool,
        namespaces_added: Vec<String>,
        namespaces_removed: Vec<String>,
        services: Vec<ServiceInfo>,
        services_removed: Vec<(String, String)>,
    },
    /// First frame of a stream a client opens to intercept a Service port. `port` is a
    /// port name or number, or empty for a Service's only port.
    /// `matchers` (v3) make it personal.
    InterceptRequest {
        namespace: String,
        service: String,
        port: String,
        local_port: u16,
        container: String,
        matchers: Matchers,
    },
    /// The manager's answer: capture is in place on every target.
    InterceptReply {
        id: u64,
        service_port: u16,
        targets: Vec<InterceptTarget>,
        env: Vec<(String, String)>,
        warnings: Vec<String>,
    },
    /// First frame of a stream a client opens to end its intercept of a Service.
    Leave { namespace: String, service: String },
    /// Client → manager, on its own stream: end every intercept of the Service, whoever
    /// holds it (an identity needs `delete` on `intercepts.tpvpn.dev`); answered `Ack`
    /// naming the holders, or `Error`. Only to a manager offering
    /// [`crate::handshake::FEATURE_REVOKE`].
    Revoke { namespace: String, service: String },
    /// Client → manager, on its own stream: a new client certificate (DER) for the same
    /// identity, and the proof that this end of the connection holds its key (its
    /// signature over [`crate::quic::renewal_binding`]); answered `Ack` or `Error`. The
    /// session then lasts until the new certificate expires. Only to a manager offering
    /// [`crate::handshake::FEATURE_RENEW`].
    Renew { certificate: Vec<u8>, proof: Vec<u8> },
    /// A request was done; `message` is for humans.
    Ack { message: String },
    /// First frame of a stream carrying one captured connection: from the agent to the
    /// manager (`id` is the capture's) and from the manager to the owning client (`id`
    /// is the intercept's). `src` is the caller, `dst` the pod address it dialed.
    InterceptOpen { id: u64, src: SocketAddr, dst: SocketAddr },
    /// First frame of a stream asking for every Service's intercept state.
    InterceptList,
    /// The answer to [`Message::InterceptList`].
    InterceptTable { rows: Vec<InterceptRow> },
    /// Manager to agent: capture `port` of the pod at `pod_ip` for intercept capture `id`.
    Capture {
        id: u64,
        pod_namespace: String,
        pod_name: String,
        pod_ip: IpAddr,
        port: u16,
        /// The node's address toward its pods as the Pod reports it (`status.hostIP`):
        /// kubelet probes come from the node and are never captured.
        host_ip: Option<IpAddr>,
        /// The container serving the port and its runtime id (`containerd://...`), for
        /// its environment.
        container: String,
        container_id: String,
        /// A personal intercept's (v3): the agent routes per request.
        matchers: Matchers,
    },
    /// Manager to agent: stop capture `id`.
    Release { id: u64 },
    /// Agent to manager: capture `id` is in place (`ok`) or why not.
    CaptureStatus { id: u64, ok: bool, message: String, meshed: bool, env: Vec<(String, String)> },
    /// First frame of a stream of file requests ([`crate::files`]). Client to manager:
    /// the files of its intercept of `namespace/service` (`container_id` and `mounts`
    /// empty). Manager to agent: the volume `mounts` (their `mountPath`s) of container
    /// `container_id`. Answered by `Ack` or `Error`.
    /// `writable` (absent from the frame when empty, as before read-write mounts) and
    /// `handles` (absent when false, as before open files): see [`crate::files`].
    FilesOpen {
        namespace: String,
        service: String,
        container_id: String,
        mounts: Vec<String>,
        writable: Vec<String>,
        handles: bool,
    },
    /// Manager to client, instead of `Ack`, to a `FilesOpen` that said `handles`: the
    /// files are open (`message`: what is served), and whether their agent serves open
    /// files.
    FilesReady { message: String, handles: bool },
    /// Laptop to agent: what `op` asks of `path` (absolute, in the container).
    FileRequest { id: u32, path: String, op: FileOp },
    /// Agent to laptop: the answer to request `id`.
    FileReply { id: u32, answer: FileAnswer },
    /// A frame of a type this version does not know, kept whole.
    Unknown { frame_type: u8, payload: Vec<u8> },
}

impl ServiceInfo {
    /// Bytes this Service takes in a `Services` or `CatalogChunk` frame.
    pub fn encoded_len(&self) -> usize {
        let ip = |ip: &IpAddr| if ip.is_ipv4() { 5 } else { 17 };
        2 + self.namespace.len()
            + 2
            + self.name.len()
            + 1
            + self.cluster_ips.iter().map(ip).sum::<usize>()
            + 2
            + self.ports.iter().map(|p| 2 + p.name.len() + 3).sum::<usize>()
    }
}

impl Message {
    /// Name of the message kind, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::ClientHello { .. } => "client-hello",
            Message::ServerHello { .. } => "server-hello",
            Message::ClusterUpdate { .. } => "cluster-update",
            Message::Namespaces { .. } => "namespaces",
            Message::Services { .. } => "services",
            Message::Error { .. } => "error",
            Message::FlowOpen { .. } => "flow-open",
            Message::FlowReply { .. } => "flow-reply",
            Message::DnsQuery { .. } => "dns-query",
            Message::DnsAnswer { .. } => "dns-answer",
            Message::ClientInfo { .. } => "client-info",
            Message::ServerInfo { .. } => "server-info",
            Message::CatalogChunk { .. } => "catalog-chunk",
            Message::InterceptRequest { .. } => "intercept-request",
            Message::InterceptReply { .. } => "intercept-reply",
            Message::Leave { .. } => "leave",
            Message::Revoke { .. } => "revoke",
            Message::Renew { .. } => "renew",
            Message::Ack { .. } => "ack",
            Message::InterceptOpen { .. } => "intercept-open",
            Message::InterceptList => "intercept-list",
            Message::InterceptTable { .. } => "intercept-table",
            Message::Capture { .. } => "capture",
            Message::Release { .. } => "release",
            Message::CaptureStatus { .. } => "capture-status",
            Message::FilesOpen { .. } => "files-open",
            Message::FilesReady { .. } => "files-ready",
            Message::FileRequest { .. } => "file-request",
            Message::FileReply { .. } => "file-reply",
            Message::Unknown { .. } => "unknown",
        }
    }

    /// Parses one whole frame.
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<Message> {
        let mut r = Reader::new(frame.payload());
        let msg = match frame.frame_type() {
            ty::CLIENT_HELLO => {
                let version = r.u16()?;
                let token = r.bytes16("token")?.to_vec();
                Message::ClientHello { version, token }
            }
            ty::SERVER_HELLO => {
                let version = r.u16()?;
                Message::ServerHello { version, cluster: r.cluster()? }
            }
            ty::CLUSTER_UPDATE => Message::ClusterUpdate { cluster: r.cluster()? },
            ty::NAMESPACES => Message::Namespaces { names: r.strings32("namespace name")? },
            ty::SERVICES => {
                let n = r.u32()?;
                let mut services = Vec::with_capacity((n as usize).min(4096));
                for _ in 0..n {
                    services.push(r.service()?);
                }
                Message::Services { services }
            }
            ty::CATALOG_CHUNK => {
                let flags = r.u8()?;
                let namespaces_added = r.strings32("namespace")?;
                let namespaces_removed = r.strings32("namespace")?;
                let n = r.u32()?;
                let mut services = Vec::with_capacity((n as usize).min(4096));
                for _ in 0..n {
                    services.push(r.service()?);
                }
                let n = r.u32()?;
                let mut services_removed = Vec::with_capacity((n as usize).min(4096));
                for _ in 0..n {
                    services_removed.push((r.string16("service namespace")?, r.string16("service name")?));
                }
                Message::CatalogChunk {
                    reset: flags & 1 != 0,
                    complete: flags & 2 != 0,
                    namespaces_added,
                    namespaces_removed,
                    services,
                    services_removed,
                }
            }
            ty::ERROR => {
                let code = ErrorCode::from(r.u16()?);
                let version = r.u16()?;
                let message = r.string16("error message")?;
                Message::Error { code, version, message }
            }
            ty::FLOW_OPEN => {
                let protocol = Protocol::from(r.u8()?);
                let flow_id = r.u64()?;
                let src = r.socket_addr()?;
                let dst = r.socket_addr()?;
                Message::FlowOpen { protocol, flow_id, src, dst }
            }
            ty::FLOW_REPLY => {
                let status = FlowStatus::from(r.u8()?);
                let message = r.string16("flow reply message")?;
                Message::FlowReply { status, message }
            }
            ty::DNS_QUERY => Message::DnsQuery { query: r.bytes16("dns query")?.to_vec() },
            ty::DNS_ANSWER => Message::DnsAnswer { answer: r.bytes16("dns answer")?.to_vec() },
            ty::CLIENT_INFO => {
                let min_version = r.u16()?;
                let role = match r.u8()? {
                    0 => Role::Client,
                    1 => Role::Agent { node: r.string16("agent node")? },
                    2 => Role::Intercepts,
                    o => Role::Other(o),
                };
                Message::ClientInfo {
                    min_version,
                    role,
                    user: r.string16("user")?,
                    host: r.string16("host")?,
                    client_id: r.bytes16("client id")?.to_vec(),
                    features: r.u64()?,
                }
            }
            ty::SERVER_INFO => Message::ServerInfo { min_version: r.u16()?, max_version: r.u16()?, features: r.u64()? },
            ty::INTERCEPT_REQUEST => Message::InterceptRequest {
                namespace: r.string16("namespace")?,
                service: r.string16("service")?,
                port: r.string16("port")?,
                local_port: r.u16()?,
                container: r.string16("container")?,
                matchers: r.matchers()?,
            },
            ty::INTERCEPT_REPLY => {
                let id = r.u64()?;
                let service_port = r.u16()?;
                let n = r.u16()?;
                let mut targets = Vec::with_capacity(usize::from(n).min(256));
                for _ in 0..n {
                    let pod = r.string16("pod")?;
                    let addr = r.socket_addr()?;
                    let meshed = r.flag("meshed")?;
                    targets.push(InterceptTarget { pod, addr, meshed });
                }
                Message::InterceptReply {
                    id,
                    service_port,
                    targets,
                    env: r.pairs("env")?,
                    warnings: r.strings("warning")?,
                }
            }
            ty::LEAVE => Message::Leave { namespace: r.string16("namespace")?, service: r.string16("service")? },
            ty::REVOKE => Message::Revoke { namespace: r.string16("namespace")?, service: r.string16("service")? },
            ty::RENEW => {
                Message::Renew { certificate: r.bytes16("certificate")?.to_vec(), proof: r.bytes16("proof")?.to_vec() }
            }
            ty::ACK => Message::Ack { message: r.string16("ack message")? },
            ty::INTERCEPT_OPEN => Message::InterceptOpen { id: r.u64()?, src: r.socket_addr()?, dst: r.socket_addr()? },
            ty::INTERCEPT_LIST => Message::InterceptList,
            ty::INTERCEPT_TABLE => {
                let n = r.u32()?;
                let mut rows = Vec::with_capacity((n as usize).min(4096));
                for _ in 0..n {
                    rows.push(InterceptRow {
                        namespace: r.string16("namespace")?,
                        service: r.string16("service")?,
                        state: InterceptState::from(r.u8()?),
                        holder: r.string16("holder")?,
                        port: r.u16()?,
                        since: r.u64()?,
                        mine: r.flag("mine")?,
                    });
                }
                Message::InterceptTable { rows }
            }
            ty::CAPTURE => Message::Capture {
                id: r.u64()?,
                pod_namespace: r.string16("pod namespace")?,
                pod_name: r.string16("pod name")?,
                pod_ip: r.ip()?,
                port: r.u16()?,
                host_ip: match r.u8()? {
                    0 => None,
                    1 => Some(r.ip()?),
                    _ => return Err(Error::Malformed { what: "capture: host ip flag" }),
                },
                container: r.string16("container")?,
                container_id: r.string16("container id")?,
                matchers: r.matchers()?,
            },
            ty::RELEASE => Message::Release { id: r.u64()? },
            ty::CAPTURE_STATUS => Message::CaptureStatus {
                id: r.u64()?,
                ok: r.flag("capture ok")?,
                message: r.string16("capture message")?,
                meshed: r.flag("meshed")?,
                env: r.pairs("env")?,
            },
            ty::FILES_OPEN => Message::FilesOpen {
                namespace: r.string16("namespace")?,
                service: r.string16("service")?,
                container_id: r.string16("container id")?,
                mounts: r.strings("mounts")?,
                writable: if r.is_empty() { Vec::new() } else { r.strings("writable mounts")? },
                handles: if r.is_empty() { false } else { r.flag("handles")? },
            },
            ty::FILES_READY => Message::FilesReady { message: r.string16("files ready")?, handles: r.flag("handles")? },
            ty::FILE_REQUEST => {
                let id = r.u32()?;
                let path = r.string16("file path")?;
                let op = match r.u8()? {
                    1 => FileOp::Stat,
                    2 => FileOp::ReadDir { from: r.u32()? },
                    3 => FileOp::Read { offset: r.u64()?, len: r.u32()? },
                    4 => FileOp::ReadLink,
                    5 => FileOp::Write { offset: r.u64()?, data: r.chunk()? },
                    6 => FileOp::Create { mode: r.u32()? },
                    7 => FileOp::MakeDir { mode: r.u32()? },
                    8 => FileOp::Remove,
                    9 => FileOp::RemoveDir,
                    10 => FileOp::Rename { to: r.string16("rename target")? },
                    11 => {
                        let given = r.u8()?;
                        if given & !0b111 != 0 {
                            return Err(Error::Malformed { what: "file attributes: unknown bits" });
                        }
                        FileOp::SetAttr {
                            size: if given & 1 != 0 { Some(r.u64()?) } else { None },
                            mode: if given & 2 != 0 { Some(r.u32()?) } else { None },
                            mtime: if given & 4 != 0 { Some(r.u64()? as i64) } else { None },
                        }
                    }
                    12 => FileOp::Sync,
                    13 => FileOp::Open { write: r.flag("open for writing")?, read: r.u32()? },
                    14 => FileOp::ReadOpen { handle: r.u32()?, offset: r.u64()?, len: r.u32()? },
                    15 => {
                        let (handle, offset) = (r.u32()?, r.u64()?);
                        FileOp::WriteOpen { handle, offset, data: r.chunk()? }
                    }
                    16 => FileOp::Close { handle: r.u32()? },
                    _ => return Err(Error::Malformed { what: "file operation" }),
                };
                Message::FileRequest { id, path, op }
            }
            ty::FILE_REPLY => {
                let id = r.u32()?;
                let answer = match r.u8()? {
                    1 => FileAnswer::Attr(r.file_attr()?),
                    2 => {
                        let n = r.u32()?;
                        let mut entries = Vec::with_capacity((n as usize).min(crate::files::DIR_PAGE as usize));
                        for _ in 0..n {
                            entries.push((r.string16("file name")?, r.file_attr()?));
                        }
                        FileAnswer::Entries { entries, next: r.u32()? }
                    }
                    3 => {
                        let n = r.u32()?;
                        FileAnswer::Data(r.take(n as usize)?.to_vec())
                    }
                    4 => FileAnswer::Target(r.string16("symlink target")?),
                    6 => FileAnswer::Done,
                    7 => FileAnswer::Opened { handle: r.u32()?, attr: r.file_attr()?, data: r.chunk()? },
                    5 => {
                        FileAnswer::Failed { failure: FileFailure::from(r.u8()?), message: r.string16("file failure")? }
                    }
                    _ => return Err(Error::Malformed { what: "file answer" }),
                };
                Message::FileReply { id, answer }
            }
            other => return Ok(Message::Unknown { frame_type: other, payload: frame.payload().to_vec() }),
        };
        if !r.is_empty() {
            return Err(Error::Malformed { what: "frame: trailing bytes" });
        }
        Ok(msg)
    }

    /// Parses the first frame of `buf` if it is complete: `Ok(None)` asks for more bytes;
    /// otherwise the message and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>> {
        match Frame::new_checked(buf) {
            Ok(frame) => Ok(Some((Message::parse(&frame)?, frame.total_len()))),
            Err(Error::Truncated { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Appends the encoded frame to `out`; a frame whose payload would exceed
    /// [`MAX_FRAME_PAYLOAD`], or a field its length prefix cannot hold (a string over
    /// 65535 bytes, more items than its count), is an error and appends nothing.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut cut = false;
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        let frame_type = match self {
            Message::ClientHello { version, token } => {
                out.extend_from_slice(&version.to_be_bytes());
                put_bytes16(out, &mut cut, token);
                ty::CLIENT_HELLO
            }
            Message::ServerHello { version, cluster } => {
                out.extend_from_slice(&version.to_be_bytes());
                put_cluster(out, &mut cut, cluster);
                ty::SERVER_HELLO
            }
            Message::ClusterUpdate { cluster } => {
                put_cluster(out, &mut cut, cluster);
                ty::CLUSTER_UPDATE
            }
            Message::Namespaces { names } => {
                out.extend_from_slice(&(names.len() as u32).to_be_bytes());
                for n in names {
                    put_bytes16(out, &mut cut, n.as_bytes());
                }
                ty::NAMESPACES
            }
            Message::Services { services } => {
                out.extend_from_slice(&(services.len() as u32).to_be_bytes());
                for s in services {
                    put_service(out, &mut cut, s);
                }
                ty::SERVICES
            }
            Message::CatalogChunk {
                reset,
                complete,
                namespaces_added,
                namespaces_removed,
                services,
                services_removed,
            } => {
                out.push(u8::from(*reset) | (u8::from(*complete) << 1));
                for names in [namespaces_added, namespaces_removed] {
                    out.extend_from_slice(&(names.len() as u32).to_be_bytes());
                    for n in names {
                        put_bytes16(out, &mut cut, n.as_bytes());
                    }
                }
                out.extend_from_slice(&(services.len() as u32).to_be_bytes());
                for s in services {
                    put_service(out, &mut cut, s);
                }
                out.extend_from_slice(&(services_removed.len() as u32).to_be_bytes());
                for (ns, name) in services_removed {
                    put_bytes16(out, &mut cut, ns.as_bytes());
                    put_bytes16(out, &mut cut, name.as_bytes());
                }
                ty::CATALOG_CHUNK
            }
            Message::Error { code, version, message } => {
                out.extend_from_slice(&u16::from(*code).to_be_bytes());
                out.extend_from_slice(&version.to_be_bytes());
                put_bytes16(out, &mut cut, message.as_bytes());
                ty::ERROR
            }
            Message::FlowOpen { protocol, flow_id, src, dst } => {
                out.push(u8::from(*protocol));
                out.extend_from_slice(&flow_id.to_be_bytes());
                put_socket_addr(out, *src);
                put_socket_addr(out, *dst);
                ty::FLOW_OPEN
            }
            Message::FlowReply { status, message } => {
                out.push(u8::from(*status));
                put_bytes16(out, &mut cut, message.as_bytes());
                ty::FLOW_REPLY
            }
            Message::DnsQuery { query } => {
                put_bytes16(out, &mut cut, query);
                ty::DNS_QUERY
            }
            Message::DnsAnswer { answer } => {
                put_bytes16(out, &mut cut, answer);
                ty::DNS_ANSWER
            }
            Message::ClientInfo { min_version, role, user, host, client_id, features } => {
                out.extend_from_slice(&min_version.to_be_bytes());
                match role {
                    Role::Client => out.push(0),
                    Role::Agent { node } => {
                        out.push(1);
                        put_bytes16(out, &mut cut, node.as_bytes());
                    }
                    Role::Intercepts => out.push(2),
                    Role::Other(o) => {
                        // 0 to 2 are known roles: as `Other` they would not read back.
                        cut |= *o <= 2;
                        out.push(*o)
                    }
                }
                put_bytes16(out, &mut cut, user.as_bytes());
                put_bytes16(out, &mut cut, host.as_bytes());
                put_bytes16(out, &mut cut, client_id);
                out.extend_from_slice(&features.to_be_bytes());
                ty::CLIENT_INFO
            }
            Message::ServerInfo { min_version, max_version, features } => {
                out.extend_from_slice(&min_version.to_be_bytes());
                out.extend_from_slice(&max_version.to_be_bytes());
                out.extend_from_slice(&features.to_be_bytes());
                ty::SERVER_INFO
            }
            Message::InterceptRequest { namespace, service, port, local_port, container, matchers } => {
                put_bytes16(out, &mut cut, namespace.as_bytes());
                put_bytes16(out, &mut cut, service.as_bytes());
                put_bytes16(out, &mut cut, port.as_bytes());
                out.extend_from_slice(&local_port.to_be_bytes());
                put_bytes16(out, &mut cut, container.as_bytes());
                put_matchers(out, &mut cut, matchers);
                ty::INTERCEPT_REQUEST
            }
            Message::InterceptReply { id, service_port, targets, env, warnings } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&service_port.to_be_bytes());
                cut |= targets.len() > usize::from(u16::MAX);
                let targets = &targets[..targets.len().min(usize::from(u16::MAX))];
                out.extend_from_slice(&(targets.len() as u16).to_be_bytes());
                for t in targets {
                    put_bytes16(out, &mut cut, t.pod.as_bytes());
                    put_socket_addr(out, t.addr);
                    out.push(u8::from(t.meshed));
                }
                put_pairs(out, &mut cut, env);
                put_strings(out, &mut cut, warnings);
                ty::INTERCEPT_REPLY
            }
            Message::Leave { namespace, service } | Message::Revoke { namespace, service } => {
                put_bytes16(out, &mut cut, namespace.as_bytes());
                put_bytes16(out, &mut cut, service.as_bytes());
                if matches!(self, Message::Leave { .. }) {
                    ty::LEAVE
                } else {
                    ty::REVOKE
                }
            }
            Message::Ack { message } => {
                put_bytes16(out, &mut cut, message.as_bytes());
                ty::ACK
            }
            Message::Renew { certificate, proof } => {
                put_bytes16(out, &mut cut, certificate);
                put_bytes16(out, &mut cut, proof);
                ty::RENEW
            }
            Message::InterceptOpen { id, src, dst } => {
                out.extend_from_slice(&id.to_be_bytes());
                put_socket_addr(out, *src);
                put_socket_addr(out, *dst);
                ty::INTERCEPT_OPEN
            }
            Message::InterceptList => ty::INTERCEPT_LIST,
            Message::InterceptTable { rows } => {
                out.extend_from_slice(&(rows.len() as u32).to_be_bytes());
                for row in rows {
                    put_bytes16(out, &mut cut, row.namespace.as_bytes());
                    put_bytes16(out, &mut cut, row.service.as_bytes());
                    out.push(u8::from(row.state));
                    put_bytes16(out, &mut cut, row.holder.as_bytes());
                    out.extend_from_slice(&row.port.to_be_bytes());
                    out.extend_from_slice(&row.since.to_be_bytes());
                    out.push(u8::from(row.mine));
                }
                ty::INTERCEPT_TABLE
            }
            Message::Capture {
                id,
                pod_namespace,
                pod_name,
                pod_ip,
                port,
                host_ip,
                container,
                container_id,
                matchers,
            } => {
                out.extend_from_slice(&id.to_be_bytes());
                put_bytes16(out, &mut cut, pod_namespace.as_bytes());
                put_bytes16(out, &mut cut, pod_name.as_bytes());
                put_ip(out, *pod_ip);
                out.extend_from_slice(&port.to_be_bytes());
                match host_ip {
                    None => out.push(0),
                    Some(ip) => {
                        out.push(1);
                        put_ip(out, *ip);
                    }
                }
                put_bytes16(out, &mut cut, container.as_bytes());
                put_bytes16(out, &mut cut, container_id.as_bytes());
                put_matchers(out, &mut cut, matchers);
                ty::CAPTURE
            }
            Message::Release { id } => {
                out.extend_from_slice(&id.to_be_bytes());
                ty::RELEASE
            }
            Message::CaptureStatus { id, ok, message, meshed, env } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.push(u8::from(*ok));
                put_bytes16(out, &mut cut, message.as_bytes());
                out.push(u8::from(*meshed));
                put_pairs(out, &mut cut, env);
                ty::CAPTURE_STATUS
            }
            Message::FilesOpen { namespace, service, container_id, mounts, writable, handles } => {
                put_bytes16(out, &mut cut, namespace.as_bytes());
                put_bytes16(out, &mut cut, service.as_bytes());
                put_bytes16(out, &mut cut, container_id.as_bytes());
                put_strings(out, &mut cut, mounts);
                if !writable.is_empty() || *handles {
                    put_strings(out, &mut cut, writable);
                }
                if *handles {
                    out.push(1);
                }
                ty::FILES_OPEN
            }
            Message::FilesReady { message, handles } => {
                put_bytes16(out, &mut cut, message.as_bytes());
                out.push(u8::from(*handles));
                ty::FILES_READY
            }
            Message::FileRequest { id, path, op } => {
                out.extend_from_slice(&id.to_be_bytes());
                put_bytes16(out, &mut cut, path.as_bytes());
                match op {
                    FileOp::Stat => out.push(1),
                    FileOp::ReadDir { from } => {
                        out.push(2);
                        out.extend_from_slice(&from.to_be_bytes());
                    }
                    FileOp::Read { offset, len } => {
                        out.push(3);
                        out.extend_from_slice(&offset.to_be_bytes());
                        out.extend_from_slice(&len.to_be_bytes());
                    }
                    FileOp::ReadLink => out.push(4),
                    FileOp::Write { offset, data } => {
                        out.push(5);
                        out.extend_from_slice(&offset.to_be_bytes());
                        put_chunk(out, &mut cut, data);
                    }
                    FileOp::Create { mode } => {
                        out.push(6);
                        out.extend_from_slice(&mode.to_be_bytes());
                    }
                    FileOp::MakeDir { mode } => {
                        out.push(7);
                        out.extend_from_slice(&mode.to_be_bytes());
                    }
                    FileOp::Remove => out.push(8),
                    FileOp::RemoveDir => out.push(9),
                    FileOp::Rename { to } => {
                        out.push(10);
                        put_bytes16(out, &mut cut, to.as_bytes());
                    }
                    FileOp::SetAttr { size, mode, mtime } => {
                        out.push(11);
                        out.push(
                            u8::from(size.is_some()) | u8::from(mode.is_some()) << 1 | u8::from(mtime.is_some()) << 2,
                        );
                        if let Some(size) = size {
                            out.extend_from_slice(&size.to_be_bytes());
                        }
                        if let Some(mode) = mode {
                            out.extend_from_slice(&mode.to_be_bytes());
                        }
                        if let Some(mtime) = mtime {
                            out.extend_from_slice(&mtime.to_be_bytes());
                        }
                    }
                    FileOp::Sync => out.push(12),
                    FileOp::Open { write, read } => {
                        out.push(13);
                        out.push(u8::from(*write));
                        out.extend_from_slice(&read.to_be_bytes());
                    }
                    FileOp::ReadOpen { handle, offset, len } => {
                        out.push(14);
                        out.extend_from_slice(&handle.to_be_bytes());
                        out.extend_from_slice(&offset.to_be_bytes());
                        out.extend_from_slice(&len.to_be_bytes());
                    }
                    FileOp::WriteOpen { handle, offset, data } => {
                        out.push(15);
                        out.extend_from_slice(&handle.to_be_bytes());
                        out.extend_from_slice(&offset.to_be_bytes());
                        put_chunk(out, &mut cut, data);
                    }
                    FileOp::Close { handle } => {
                        out.push(16);
                        out.extend_from_slice(&handle.to_be_bytes());
                    }
                }
                ty::FILE_REQUEST
            }
            Message::FileReply { id, answer } => {
                out.extend_from_slice(&id.to_be_bytes());
                match answer {
                    FileAnswer::Attr(a) => {
                        out.push(1);
                        put_file_attr(out, a);
                    }
                    FileAnswer::Entries { entries, next } => {
                        out.push(2);
                        out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
                        for (name, a) in entries {
                            put_bytes16(out, &mut cut, name.as_bytes());
                            put_file_attr(out, a);
                        }
                        out.extend_from_slice(&next.to_be_bytes());
                    }
                    FileAnswer::Data(d) => {
                        out.push(3);
                        out.extend_from_slice(&(d.len() as u32).to_be_bytes());
                        out.extend_from_slice(d);
                    }
                    FileAnswer::Target(t) => {
                        out.push(4);
                        put_bytes16(out, &mut cut, t.as_bytes());
                    }
                    FileAnswer::Done => out.push(6),
                    FileAnswer::Opened { handle, attr, data } => {
                        out.push(7);
                        out.extend_from_slice(&handle.to_be_bytes());
                        put_file_attr(out, attr);
                        put_chunk(out, &mut cut, data);
                    }
                    FileAnswer::Failed { failure, message } => {
                        out.push(5);
                        out.push(u8::from(*failure));
                        put_bytes16(out, &mut cut, message.as_bytes());
                    }
                }
                ty::FILE_REPLY
            }
            Message::Unknown { frame_type, payload } => {
                out.extend_from_slice(payload);
                *frame_type
            }
        };
        let len = out.len() - start - FRAME_HEADER_LEN;
        if cut || len > MAX_FRAME_PAYLOAD {
            out.truncate(start);
            return Err(if cut {
                Error::Malformed { what: "frame: a field too long for its length" }
            } else {
                Error::TooLong(len)
            });
        }
        out[start] = frame_type;
        out[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    /// The encoded frame as a new buffer (see [`Message::emit`]).
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.emit(&mut out)?;
        Ok(out)
    }
}

/// A UDP payload on a UDP flow's stream (the fallback for payloads too large for a
/// QUIC datagram): a big-endian u16 length followed by the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRecord<'a> {
    pub payload: &'a [u8],
}

impl<'a> UdpRecord<'a> {
    pub const HEADER_LEN: usize = 2;

    /// Parses the first record of `buf` if complete: the record and the bytes it used.
    pub fn decode(buf: &'a [u8]) -> Option<(UdpRecord<'a>, usize)> {
        if buf.len() < Self::HEADER_LEN {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
        let end = Self::HEADER_LEN + len;
        (buf.len() >= end).then(|| (UdpRecord { payload: &buf[Self::HEADER_LEN..end] }, end))
    }

    /// Appends the record; fails if the payload does not fit a u16 length.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<()> {
        let len = u16::try_from(self.payload.len())
            .map_err(|_| Error::Malformed { what: "udp record: payload over 65535 bytes" })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(self.payload);
        Ok(())
    }
}

fn put_bytes16(out: &mut Vec<u8>, cut: &mut bool, b: &[u8]) {
    *cut |= b.len() > usize::from(u16::MAX);
    let n = b.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&b[..n]);
}

/// A file's attributes: kind, size, mode, mtime.
/// File bytes: their length and themselves (cut when over [`crate::files::READ_MAX`]).
fn put_chunk(out: &mut Vec<u8>, cut: &mut bool, data: &[u8]) {
    *cut |= data.len() > crate::files::READ_MAX as usize;
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn put_file_attr(out: &mut Vec<u8>, a: &FileAttr) {
    out.push(u8::from(a.kind));
    out.extend_from_slice(&a.size.to_be_bytes());
    out.extend_from_slice(&a.mode.to_be_bytes());
    out.extend_from_slice(&a.mtime.to_be_bytes());
}

/// A u16 count of strings (at most 65535 kept), each with a u16 length.
fn put_strings(out: &mut Vec<u8>, cut: &mut bool, items: &[String]) {
    *cut |= items.len() > usize::from(u16::MAX);
    let items = &items[..items.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for s in items {
        put_bytes16(out, cut, s.as_bytes());
    }
}

/// A u16 count of name/value pairs (an environment), each a pair of u16-length strings.
fn put_pairs(out: &mut Vec<u8>, cut: &mut bool, pairs: &[(String, String)]) {
    *cut |= pairs.len() > usize::from(u16::MAX);
    let pairs = &pairs[..pairs.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(pairs.len() as u16).to_be_bytes());
    for (k, v) in pairs {
        put_bytes16(out, cut, k.as_bytes());
        put_bytes16(out, cut, v.as_bytes());
    }
}

/// Trailing matchers: nothing for none (a v2 frame), else the headers as pairs and the
/// path prefix.
fn put_matchers(out: &mut Vec<u8>, cut: &mut bool, m: &Matchers) {
    if !m.is_empty() {
        put_pairs(out, cut, &m.headers);
        put_bytes16(out, cut, m.path_prefix.as_bytes());
    }
}

fn put_service(out: &mut Vec<u8>, cut: &mut bool, s: &ServiceInfo) {
    put_bytes16(out, cut, s.namespace.as_bytes());
    put_bytes16(out, cut, s.name.as_bytes());
    *cut |= s.cluster_ips.len() > usize::from(u8::MAX) || s.ports.len() > usize::from(u16::MAX);
    let ips = &s.cluster_ips[..s.cluster_ips.len().min(usize::from(u8::MAX))];
    out.push(ips.len() as u8);
    for ip in ips {
        put_ip(out, *ip);
    }
    let ports = &s.ports[..s.ports.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(ports.len() as u16).to_be_bytes());
    for p in ports {
        put_bytes16(out, cut, p.name.as_bytes());
        out.push(u8::from(p.protocol));
        out.extend_from_slice(&p.port.to_be_bytes());
    }
}

fn put_cluster(out: &mut Vec<u8>, cut: &mut bool, cluster: &ClusterInfo) {
    put_bytes16(out, cut, cluster.domain.as_bytes());
    match cluster.dns {
        None => out.push(0),
        Some(ip) => {
            out.push(1);
            put_ip(out, ip);
        }
    }
    *cut |= cluster.cidrs.len() > usize::from(u16::MAX);
    let n = cluster.cidrs.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_be_bytes());
    for net in &cluster.cidrs[..n] {
        put_ip(out, net.addr());
        out.push(net.prefix_len());
    }
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
}

fn put_socket_addr(out: &mut Vec<u8>, sa: SocketAddr) {
    put_ip(out, sa.ip());
    out.extend_from_slice(&sa.port().to_be_bytes());
}

/// A bounds-checked cursor over a frame payload.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(Error::Truncated { need: self.pos.saturating_add(n), have: self.buf.len() })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes16(&mut self, _what: &'static str) -> Result<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string16(&mut self, what: &'static str) -> Result<String> {
        let b = self.bytes16(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::NotUtf8 { what })
    }

    fn flag(&mut self, what: &'static str) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::Malformed { what }),
        }
    }

    fn service(&mut self) -> Result<ServiceInfo> {
        let namespace = self.string16("service namespace")?;
        let name = self.string16("service name")?;
        let ips = self.u8()?;
        let mut cluster_ips = Vec::with_capacity(usize::from(ips));
        for _ in 0..ips {
            cluster_ips.push(self.ip()?);
        }
        let nports = self.u16()?;
        let mut ports = Vec::with_capacity(usize::from(nports).min(256));
        for _ in 0..nports {
            let name = self.string16("port name")?;
            let protocol = Protocol::from(self.u8()?);
            ports.push(ServicePort { name, protocol, port: self.u16()? });
        }
        Ok(ServiceInfo { namespace, name, cluster_ips, ports })
    }

    fn strings32(&mut self, what: &'static str) -> Result<Vec<String>> {
        let n = self.u32()?;
        let mut v = Vec::with_capacity((n as usize).min(4096));
        for _ in 0..n {
            v.push(self.string16(what)?);
        }
        Ok(v)
    }

    fn strings(&mut self, what: &'static str) -> Result<Vec<String>> {
        let n = self.u16()?;
        let mut v = Vec::with_capacity(usize::from(n).min(256));
        for _ in 0..n {
            v.push(self.string16(what)?);
        }
        Ok(v)
    }

    /// Trailing matchers (see [`put_matchers`]); a frame that ends here has none.
    fn matchers(&mut self) -> Result<Matchers> {
        if self.is_empty() {
            return Ok(Matchers::default());
        }
        let m = Matchers { headers: self.pairs("matcher header")?, path_prefix: self.string16("path prefix")? };
        if m.is_empty() {
            return Err(Error::Malformed { what: "matchers: present but empty" });
        }
        Ok(m)
    }

    /// File bytes: at most [`crate::files::READ_MAX`].
    fn chunk(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()?;
        if n > crate::files::READ_MAX {
            return Err(Error::Malformed { what: "file write: longer than READ_MAX" });
        }
        Ok(self.take(n as usize)?.to_vec())
    }

    fn file_attr(&mut self) -> Result<FileAttr> {
        let kind = FileKind::from(self.u8()?);
        let size = self.u64()?;
        let mode = self.u32()? & 0o7777;
        Ok(FileAttr { kind, size, mode, mtime: self.u64()? as i64 })
    }

    fn pairs(&mut self, what: &'static str) -> Result<Vec<(String, String)>> {
        let n = self.u16()?;
        let mut v = Vec::with_capacity(usize::from(n).min(256));
        for _ in 0..n {
            v.push((self.string16(what)?, self.string16(what)?));
        }
        Ok(v)
    }

    fn ip(&mut self) -> Result<IpAddr> {
        match self.u8()? {
            4 => {
                let mut a = [0; 4];
                a.copy_from_slice(self.take(4)?);
                Ok(IpAddr::V4(Ipv4Addr::from(a)))
            }
            6 => {
                let mut a = [0; 16];
                a.copy_from_slice(self.take(16)?);
                Ok(IpAddr::V6(Ipv6Addr::from(a)))
            }
            _ => Err(Error::Malformed { what: "address family" }),
        }
    }

    fn cluster(&mut self) -> Result<ClusterInfo> {
        let domain = self.string16("cluster domain")?;
        let dns = match self.u8()? {
            0 => None,
            1 => Some(self.ip()?),
            _ => return Err(Error::Malformed { what: "cluster info: dns flag" }),
        };
        let n = self.u16()?;
        let mut cidrs = Vec::with_capacity(usize::from(n).min(1024));
        for _ in 0..n {
            let ip = self.ip()?;
            let prefix = self.u8()?;
            cidrs.push(IpNet::new(ip, prefix).map_err(|_| Error::Malformed { what: "cidr prefix" })?);
        }
        Ok(ClusterInfo { cidrs, dns, domain })
    }

    fn socket_addr(&mut self) -> Result<SocketAddr> {
        let ip = self.ip()?;
        Ok(SocketAddr::new(ip, self.u16()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::ClientHello { version: 1, token: b"s3cret".to_vec() },
            Message::ServerHello {
                version: 1,
                cluster: ClusterInfo {
                    cidrs: vec!["10.96.0.0/12".parse().unwrap(), "fd00:10::/64".parse().unwrap()],
                    dns: Some("10.96.0.10".parse().unwrap()),
                    domain: "cluster.local".into(),
                },
            },
            Message::ServerHello { version: 7, cluster: ClusterInfo::default() },
            Message::ClusterUpdate {
                cluster: ClusterInfo {
                    cidrs: vec!["10.244.0.0/16".parse().unwrap()],
                    dns: None,
                    domain: "example.internal".into(),
                },
            },
            Message::Error { code: ErrorCode::VersionMismatch, version: 2, message: "manager speaks 2".into() },
            Message::Error { code: ErrorCode::Other(999), version: 1, message: String::new() },
            Message::Namespaces { names: vec!["default".into(), "rs".into(), String::new()] },
            Message::Namespaces { names: vec![] },
            Message::Services {
                services: vec![
                    ServiceInfo {
                        namespace: "default".into(),
                        name: "frontend".into(),
                        cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
                        ports: vec![
                            ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80 },
                            ServicePort { name: "dns".into(), protocol: Protocol::Udp, port: 53 },
                        ],
                    },
                    ServiceInfo { namespace: "x".into(), name: "headless".into(), cluster_ips: vec![], ports: vec![] },
                ],
            },
            Message::FlowOpen {
                protocol: Protocol::Tcp,
                flow_id: 0,
                src: "198.18.0.1:40000".parse().unwrap(),
                dst: "10.96.0.10:80".parse().unwrap(),
            },
            Message::FlowOpen {
                protocol: Protocol::Other(132),
                flow_id: u64::MAX,
                src: "[fd00::1]:1".parse().unwrap(),
                dst: "[fd00::2]:65535".parse().unwrap(),
            },
            Message::FlowReply { status: FlowStatus::Refused, message: "refused".into() },
            Message::FlowReply { status: FlowStatus::Other(200), message: String::new() },
            Message::DnsQuery { query: vec![0x12, 0x34, 1, 0, 0, 1] },
            Message::DnsAnswer { answer: vec![0; 700] },
            Message::Unknown { frame_type: 0x7f, payload: vec![1, 2, 3] },
            Message::ClientInfo {
                min_version: 1,
                role: Role::Client,
                user: "alice".into(),
                host: "laptop".into(),
                client_id: vec![7; 16],
                features: 1,
            },
            Message::ClientInfo {
                min_version: 2,
                role: Role::Agent { node: "node-1".into() },
                user: String::new(),
                host: "node-1".into(),
                client_id: vec![],
                features: u64::MAX,
            },
            Message::ClientInfo {
                min_version: 3,
                role: Role::Intercepts,
                user: "alice".into(),
                host: "laptop".into(),
                client_id: vec![7; 16],
                features: 0,
            },
            Message::ClientInfo {
                min_version: 9,
                role: Role::Other(200),
                user: "u".into(),
                host: "h".into(),
                client_id: vec![1],
                features: 0,
            },
            Message::ServerInfo { min_version: 1, max_version: 2, features: 1 },
            Message::InterceptRequest {
                namespace: "default".into(),
                service: "web".into(),
                port: "http".into(),
                local_port: 18888,
                container: String::new(),
                matchers: Matchers::default(),
            },
            Message::InterceptRequest {
                namespace: "default".into(),
                service: "web".into(),
                port: String::new(),
                local_port: 1,
                container: "c".into(),
                matchers: Matchers { headers: vec![("x-dev".into(), "alice".into())], path_prefix: "/api".into() },
            },
            Message::InterceptReply {
                id: 42,
                service_port: 80,
                targets: vec![
                    InterceptTarget { pod: "web-0".into(), addr: "10.244.2.10:8080".parse().unwrap(), meshed: false },
                    InterceptTarget { pod: "web-1".into(), addr: "[fd00::1]:8080".parse().unwrap(), meshed: true },
                ],
                env: vec![("GREETING".into(), "hello world".into()), ("EMPTY".into(), String::new())],
                warnings: vec!["port looks like TLS".into()],
            },
            Message::Leave { namespace: "default".into(), service: "web".into() },
            Message::Revoke { namespace: "default".into(), service: "web".into() },
            Message::Renew { certificate: vec![0x30, 0x82, 1, 2], proof: vec![7; 72] },
            Message::Ack { message: "left".into() },
            Message::InterceptOpen {
                id: 3,
                src: "10.244.2.20:40000".parse().unwrap(),
                dst: "10.244.2.10:8080".parse().unwrap(),
            },
            Message::InterceptList,
            Message::InterceptTable {
                rows: vec![
                    InterceptRow {
                        namespace: "default".into(),
                        service: "web".into(),
                        state: InterceptState::Intercepted,
                        holder: "alice@laptop".into(),
                        port: 80,
                        since: 1_780_000_000,
                        mine: true,
                    },
                    InterceptRow {
                        namespace: "x".into(),
                        service: "y".into(),
                        state: InterceptState::Other(99),
                        holder: String::new(),
                        port: 0,
                        since: 0,
                        mine: false,
                    },
                ],
            },
            Message::Capture {
                id: 5,
                pod_namespace: "default".into(),
                pod_name: "web-0".into(),
                pod_ip: "10.244.2.10".parse().unwrap(),
                port: 8080,
                host_ip: Some("10.250.1.1".parse().unwrap()),
                container: "nginx".into(),
                container_id: "containerd://abc".into(),
                matchers: Matchers::default(),
            },
            Message::Capture {
                id: 6,
                pod_namespace: "n".into(),
                pod_name: "p".into(),
                pod_ip: "fd00::2".parse().unwrap(),
                port: 1,
                host_ip: None,
                container: String::new(),
                container_id: String::new(),
                matchers: Matchers { headers: vec![], path_prefix: "/p".into() },
            },
            Message::Release { id: 5 },
            Message::CaptureStatus {
                id: 5,
                ok: true,
                message: String::new(),
                meshed: true,
                env: vec![("A".into(), "1".into())],
            },
            Message::CaptureStatus { id: 6, ok: false, message: "no such pod".into(), meshed: false, env: vec![] },
            Message::FilesOpen {
                namespace: "default".into(),
                service: "web".into(),
                container_id: "containerd://abc".into(),
                mounts: vec!["/etc/config".into(), "/var/run/secrets/kubernetes.io/serviceaccount".into()],
                writable: vec![],
                handles: false,
            },
            Message::FilesOpen {
                namespace: "default".into(),
                service: "web".into(),
                container_id: String::new(),
                mounts: vec![],
                writable: vec!["/".into()],
                handles: false,
            },
            Message::FilesOpen {
                namespace: "default".into(),
                service: "web".into(),
                container_id: String::new(),
                mounts: vec![],
                writable: vec![],
                handles: true,
            },
            Message::FilesReady { message: "files of pod default/web-0".into(), handles: true },
            Message::FileRequest { id: 16, path: "/data/a".into(), op: FileOp::Open { write: true, read: 4096 } },
            Message::FileRequest {
                id: 17,
                path: "/data/a".into(),
                op: FileOp::ReadOpen { handle: 3, offset: 1 << 33, len: 65536 },
            },
            Message::FileRequest {
                id: 18,
                path: "/data/a".into(),
                op: FileOp::WriteOpen { handle: 3, offset: 7, data: vec![2; 300] },
            },
            Message::FileRequest { id: 19, path: "/data/a".into(), op: FileOp::Close { handle: 3 } },
            Message::FileReply {
                id: 16,
                answer: FileAnswer::Opened {
                    handle: 3,
                    attr: FileAttr { kind: FileKind::File, size: 10, mode: 0o644, mtime: 9 },
                    data: b"0123456789".to_vec(),
                },
            },
            Message::FileReply {
                id: 17,
                answer: FileAnswer::Failed { failure: FileFailure::Stale, message: "closed".into() },
            },
            Message::FileRequest { id: 1, path: "/etc/config".into(), op: FileOp::Stat },
            Message::FileRequest {
                id: 6,
                path: "/data/a".into(),
                op: FileOp::Write { offset: 9, data: vec![1; 1000] },
            },
            Message::FileRequest { id: 7, path: "/data/a".into(), op: FileOp::Create { mode: 0o640 } },
            Message::FileRequest { id: 8, path: "/data/d".into(), op: FileOp::MakeDir { mode: 0o2775 } },
            Message::FileRequest { id: 9, path: "/data/a".into(), op: FileOp::Remove },
            Message::FileRequest { id: 10, path: "/data/d".into(), op: FileOp::RemoveDir },
            Message::FileRequest { id: 11, path: "/data/a".into(), op: FileOp::Rename { to: "/data/b".into() } },
            Message::FileRequest {
                id: 12,
                path: "/data/a".into(),
                op: FileOp::SetAttr { size: Some(0), mode: None, mtime: Some(-1) },
            },
            Message::FileRequest {
                id: 13,
                path: "/data/a".into(),
                op: FileOp::SetAttr { size: None, mode: Some(0o600), mtime: None },
            },
            Message::FileRequest { id: 14, path: "/data/a".into(), op: FileOp::Sync },
            Message::FileReply { id: 14, answer: FileAnswer::Done },
            Message::FileReply {
                id: 15,
                answer: FileAnswer::Failed { failure: FileFailure::ReadOnly, message: "a configMap".into() },
            },
            Message::FileRequest { id: 2, path: "/etc/config".into(), op: FileOp::ReadDir { from: 512 } },
            Message::FileRequest {
                id: 3,
                path: "/etc/config/a".into(),
                op: FileOp::Read { offset: 1 << 40, len: 4096 },
            },
            Message::FileRequest { id: 4, path: "/etc/config/..data".into(), op: FileOp::ReadLink },
            Message::FileReply {
                id: 1,
                answer: FileAnswer::Attr(FileAttr { kind: FileKind::Dir, size: 4096, mode: 0o755, mtime: -5 }),
            },
            Message::FileReply {
                id: 2,
                answer: FileAnswer::Entries {
                    entries: vec![
                        ("..data".into(), FileAttr { kind: FileKind::Symlink, size: 31, mode: 0o777, mtime: 1 }),
                        ("fifo".into(), FileAttr { kind: FileKind::Other, size: 0, mode: 0o600, mtime: 2 }),
                    ],
                    next: 0,
                },
            },
            Message::FileReply { id: 3, answer: FileAnswer::Data(vec![7; 70_000]) },
            Message::FileReply { id: 4, answer: FileAnswer::Target("..2026_12_07".into()) },
            Message::FileReply {
                id: 5,
                answer: FileAnswer::Failed { failure: FileFailure::Denied, message: "outside the volumes".into() },
            },
            Message::CatalogChunk {
                reset: true,
                complete: false,
                namespaces_added: vec!["default".into(), "dev".into()],
                namespaces_removed: vec![],
                services: vec![ServiceInfo {
                    namespace: "default".into(),
                    name: "web".into(),
                    cluster_ips: vec!["10.96.0.90".parse().unwrap()],
                    ports: vec![ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80 }],
                }],
                services_removed: vec![],
            },
            Message::CatalogChunk {
                reset: false,
                complete: true,
                namespaces_added: vec![],
                namespaces_removed: vec!["old".into()],
                services: vec![],
                services_removed: vec![("default".into(), "gone".into())],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let buf = m.to_vec().unwrap();
            let (parsed, used) = Message::decode(&buf).unwrap().unwrap();
            assert_eq!(parsed, m);
            assert_eq!(used, buf.len());
        }
    }

    #[test]
    fn every_prefix_asks_for_more_bytes() {
        for m in samples() {
            let buf = m.to_vec().unwrap();
            for cut in 0..buf.len() {
                assert_eq!(Message::decode(&buf[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn frames_decode_back_to_back() {
        let mut buf = Vec::new();
        for m in samples() {
            m.emit(&mut buf).unwrap();
        }
        let mut pos = 0;
        for m in samples() {
            let (parsed, used) = Message::decode(&buf[pos..]).unwrap().unwrap();
            assert_eq!(parsed, m);
            pos += used;
        }
        assert_eq!(pos, buf.len());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let buf = [ty::CLIENT_HELLO, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(Message::decode(&buf), Err(Error::TooLong(u32::MAX as usize)));
    }

    #[test]
    fn malformed_fields_are_errors() {
        // Flow open with address family 5.
        let mut buf = vec![ty::FLOW_OPEN, 0, 0, 0, 16, 6, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0];
        buf.truncate(FRAME_HEADER_LEN + 16);
        assert!(matches!(Message::decode(&buf), Err(Error::Malformed { .. })));
        // A hello with trailing garbage.
        let mut hello = Message::ClientHello { version: 1, token: vec![] }.to_vec().unwrap();
        hello.push(0);
        hello[4] += 1;
        assert!(matches!(Message::decode(&hello), Err(Error::Malformed { .. })));
        // A "has dns" flag other than 0 or 1.
        let mut hello = Message::ServerHello { version: 1, cluster: ClusterInfo::default() }.to_vec().unwrap();
        hello[9] = 7; // the dns flag, after type, length, version and an empty domain
        assert!(matches!(Message::decode(&hello), Err(Error::Malformed { .. })));
        // Non-UTF-8 message.
        let mut reply = Message::FlowReply { status: FlowStatus::Ok, message: "ab".into() }.to_vec().unwrap();
        let n = reply.len();
        reply[n - 1] = 0xff;
        assert!(matches!(Message::decode(&reply), Err(Error::NotUtf8 { .. })));
    }

    #[test]
    fn emit_refuses_what_a_frame_cannot_hold() {
        let mut out = vec![9];
        let big = Message::DnsAnswer { answer: vec![0; 70_000] };
        assert!(matches!(big.emit(&mut out), Err(Error::Malformed { .. })), "a field over its u16 length");
        assert_eq!(out, [9], "nothing appended");
        let services: Vec<ServiceInfo> = (0..20_000)
            .map(|i| ServiceInfo {
                namespace: format!("team-{}", i % 97),
                name: format!("service-number-{i}"),
                cluster_ips: vec!["10.96.0.1".parse().unwrap()],
                ports: vec![ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80 }; 3],
            })
            .collect();
        let size: usize = services.iter().map(ServiceInfo::encoded_len).sum();
        assert!(size > MAX_FRAME_PAYLOAD);
        assert!(matches!(Message::Services { services: services.clone() }.emit(&mut out), Err(Error::TooLong(_))));
        // encoded_len is exact.
        let one = Message::Services { services: services[..1].to_vec() }.to_vec().unwrap();
        assert_eq!(one.len(), FRAME_HEADER_LEN + 4 + services[0].encoded_len());
    }

    #[test]
    fn matchers_trail_a_v2_frame_only_when_there_are_some() {
        let req = |matchers| Message::InterceptRequest {
            namespace: "default".into(),
            service: "web".into(),
            port: "http".into(),
            local_port: 18888,
            container: String::new(),
            matchers,
        };
        let global = req(Matchers::default()).to_vec().unwrap();
        let personal =
            req(Matchers { headers: vec![("x-dev".into(), "a".into())], path_prefix: "/api".into() }).to_vec().unwrap();
        // The global frame is byte for byte what v2 wrote: its fields and nothing after.
        let v2_payload =
            [&[0, 7][..], b"default", &[0, 3], b"web", &[0, 4], b"http", &18888u16.to_be_bytes(), &[0, 0]].concat();
        assert_eq!(&global[FRAME_HEADER_LEN..], &v2_payload[..]);
        assert_eq!(&personal[FRAME_HEADER_LEN..v2_payload.len() + FRAME_HEADER_LEN], &v2_payload[..]);
        assert_eq!(
            &personal[FRAME_HEADER_LEN + v2_payload.len()..],
            &[&[0, 1, 0, 5][..], b"x-dev", &[0, 1], b"a", &[0, 4], b"/api"].concat()[..]
        );
        // Present but empty is not a frame any encoder writes.
        let mut bad = global.clone();
        bad.extend_from_slice(&[0, 0, 0, 0]);
        let len = (bad.len() - FRAME_HEADER_LEN) as u32;
        bad[1..5].copy_from_slice(&len.to_be_bytes());
        assert!(Message::decode(&bad).is_err());
        assert_eq!(
            Matchers { headers: vec![("X-Dev".into(), "a".into())], path_prefix: String::new() }
                .canonical()
                .to_string(),
            "x-dev: a"
        );
    }

    #[test]
    fn udp_records_round_trip() {
        let mut buf = Vec::new();
        UdpRecord { payload: &[7; 3000] }.emit(&mut buf).unwrap();
        UdpRecord { payload: b"" }.emit(&mut buf).unwrap();
        let (r, n) = UdpRecord::decode(&buf).unwrap();
        assert_eq!(r.payload, &[7; 3000][..]);
        let (r2, n2) = UdpRecord::decode(&buf[n..]).unwrap();
        assert!(r2.payload.is_empty());
        assert_eq!(n + n2, buf.len());
        assert!(UdpRecord::decode(&buf[..100]).is_none());
        assert!(UdpRecord { payload: &vec![0; 70000] }.emit(&mut Vec::new()).is_err());
    }
}
