//! tpvpn's tunnel layer: the wire protocol the client (`tpvpn`) and the in-cluster
//! manager (`tpvpn-manager`) speak over one QUIC connection.
//!
//! The framing in [`frame`] and [`datagram`] is sans-IO: zero-copy views over byte
//! slices with a checked constructor, and `Repr`-style messages with `parse`/`emit`,
//! in the manner of `smoltcp::wire`. Nothing here reads a socket.
//!
//! Layout of a connection:
//! - the client opens the first bidirectional stream as the *control stream* and sends
//!   [`Message::ClientHello`] (and, from protocol v2, [`Message::ClientInfo`]); the
//!   manager answers [`Message::ServerHello`] (and [`Message::ServerInfo`]) or
//!   [`Message::Error`] (wrong token, protocol version mismatch). The version is
//!   negotiated as a range by the sans-IO [`handshake`];
//! - every TCP flow is one further bidirectional stream that starts with
//!   [`Message::FlowOpen`] (client to manager) and [`Message::FlowReply`] (back); the
//!   bytes after them are the flow's payload, a stream FIN is a TCP FIN and a stream
//!   reset with [`RESET_CODE`] is a TCP RST;
//! - every UDP flow is also a stream opened with `FlowOpen`; its payloads travel as QUIC
//!   datagrams prefixed with the flow id ([`datagram`]), or, when too large for a
//!   datagram, as length-prefixed records on the flow's stream ([`UdpRecord`]).
//!
//! - a cluster DNS query is one more stream: [`Message::DnsQuery`] (client to manager),
//!   [`Message::DnsAnswer`] back (or [`Message::Error`]), then both sides finish.
//!
//! The `quic` feature (on by default) adds [`quic`], the QUIC settings both sides use,

//! and [`io`], the small async helpers that read and write frames on quinn streams.

#[cfg(feature = "quic")]
pub mod cc;
pub mod datagram;
pub mod files;
pub mod frame;
pub mod handshake;
#[cfg(feature = "quic")]
pub mod io;
#[cfg(feature = "quic")]
pub mod quic;
#[cfg(feature = "quic")]
pub mod relay;
pub mod resume;
#[cfg(feature = "quic")]
pub mod stream;

pub use frame::{
    ClusterInfo, ErrorCode, FlowStatus, InterceptRow, InterceptState, InterceptTarget, Matchers, Message, Protocol,
    Role, ServiceInfo, ServicePort, UdpRecord, FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD,
};
pub use handshake::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// ALPN identifier of the tpvpn tunnel protocol.
pub const ALPN: &[u8] = b"tpvpn/1";

/// How a warning of an intercept reply starts when the container's environment was left
/// out (the identity may not `get` `intercepts/environment`); the client then fails
/// `--env-file`/`--env-json` with it.
pub const ENVIRONMENT_WITHHELD: &str = "environment withheld: ";

/// QUIC application error code used to reset a flow stream: a TCP RST.
pub const RESET_CODE: u32 = 1;

/// QUIC application error code a version-1 manager closes a refused connection with
/// (token, version); the reason phrase carries the human-readable message. Newer
/// managers use [`refusal_close_code`]; clients still read this one from old managers.
pub const CLOSE_REFUSED: u32 = 2;

/// QUIC application error code used when a side closes the connection normally.
pub const CLOSE_NORMAL: u32 = 0;

/// From protocol version 2 the manager closes a refused connection with a code that
/// carries the refusal's [`ErrorCode`] (this base plus the code), so that a client that
/// misses the `Error` frame still knows why, without reading words.
pub const CLOSE_REFUSED_BASE: u32 = 0x100;

/// The QUIC close code for a refusal with `code`.
pub fn refusal_close_code(code: ErrorCode) -> u32 {
    CLOSE_REFUSED_BASE + u32::from(u16::from(code))
}

/// The refusal a close code carries, if it is one of [`refusal_close_code`]'s.
pub fn refusal_code(close: u64) -> Option<ErrorCode> {
    let c = close.checked_sub(u64::from(CLOSE_REFUSED_BASE))?;
    u16::try_from(c).ok().map(ErrorCode::from)
}

/// Errors of the tunnel layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The buffer ends before the frame or field does.
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// A frame claims a payload larger than [`MAX_FRAME_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_FRAME_PAYLOAD}")]
    TooLong(usize),
    /// A field holds a value that is not allowed.
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    /// A string field is not UTF-8.
    #[error("malformed {what}: not utf-8")]
    NotUtf8 { what: &'static str },
    /// The peer sent a message that is not allowed at this point.
    #[error("unexpected message {got} (expected {expected})")]
    Unexpected { got: &'static str, expected: &'static str },
    /// The stream ended before a complete frame arrived.
    #[error("stream ended inside a frame")]
    UnexpectedEnd,
    /// The peer reset the stream with this application error code.
    #[error("stream reset by peer (code {0})")]
    Reset(u64),
    /// An I/O error on the underlying stream.
    #[error("stream error: {0}")]
    Stream(String),
}

pub type Result<T> = std::result::Result<T, Error>;
