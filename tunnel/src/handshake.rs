//! The hello on the control stream, sans-IO: messages in, a typed outcome out, in the
//! manner of quinn-proto. The async drivers (the client's `connect`, the manager's
//! session) only move the frames.
//!
//! Versions are negotiated as ranges. A peer sends [`Message::ClientHello`] with the
//! *newest* version it speaks; from version 2 on it follows with
//! [`Message::ClientInfo`] (its oldest version, role, identity, features). The manager
//! picks the newest version both speak and answers [`Message::ServerHello`] with it,
//! followed (from version 2 on) by [`Message::ServerInfo`]; or [`Message::Error`] with
//! [`ErrorCode::VersionMismatch`] and, in `version`, its own newest version when the
//! peer is too new or its oldest when the peer is too old.
//!
//! Version 1 (the first release) knows neither info frame and refuses any other
//! version with its own, 1. A newer client that meets it therefore learns "1", which it
//! still speaks, and connects again with a version-1 hello ([`ClientStep::Retry`]).
//!
//! | version | adds |
//! | --- | --- |
//! | 1 | flows, DNS, cluster pushes |
//! | 2 | the info frames (identity, client id, features), intercepts, node agents |
//! | 3 | personal intercepts: [`crate::Matchers`] trailing `InterceptRequest` and `Capture` |

use crate::frame::{ClusterInfo, ErrorCode, Message, Role};

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The first version with intercepts (and the info frames).
pub const INTERCEPT_VERSION: u16 = 2;
/// The first version with personal intercepts (per-request routing by the agent).
pub const PERSONAL_VERSION: u16 = 3;

/// The version both sides of a connection agreed on: what each may send the other. Made
/// by the handshake ([`Accepted::version`], [`Peer::version`]); every "does the peer know
/// X" is asked of it, never of a raw number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Negotiated(u16);

impl Negotiated {
    /// What a test, or a tool that skips the hello, assumes; a connection's version comes
    /// from the handshake.
    pub fn assumed(version: u16) -> Negotiated {
        Negotiated(version)
    }

    /// The version number (for logs, status and the `Error` frames that name it).
    pub fn number(self) -> u16 {
        self.0
    }

    /// The info frames, intercepts and node agents (v2).
    pub fn intercepts(self) -> bool {
        self.0 >= INTERCEPT_VERSION
    }

    /// Personal intercepts: matchers trailing `InterceptRequest` and `Capture` (v3).
    pub fn personal(self) -> bool {
        self.0 >= PERSONAL_VERSION
    }
}

impl std::fmt::Display for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// Feature bit: the manager serves intercepts (it may run without agents).
pub const FEATURE_INTERCEPTS: u64 = 1 << 0;
/// Feature bit: the manager takes a client's second connection, `Role::Intercepts`, and
/// opens that client's intercept streams on it (so that callers who stop reading never
/// hold the window of the client's tunnel; the client asks for `quic::Class::Intercepts`
/// windows on it, so neither those of its other intercepts).
pub const FEATURE_INTERCEPT_CONNECTION: u64 = 1 << 1;
/// Feature bit: the manager ends another holder's intercepts on request
/// ([`crate::Message::Revoke`], `tpvpn revoke`). From a client (`ClientInfo.features`): it
/// takes a `Revoke` on its control stream as the notice that its own intercept of that
/// Service ended, so the manager sends it one.
pub const FEATURE_REVOKE: u64 = 1 << 2;
/// Feature bit: the manager takes a new client certificate on a live session
/// ([`crate::Message::Renew`]), and ends a session whose certificate expired.
pub const FEATURE_RENEW: u64 = 1 << 3;
/// Feature bit: the manager serves the files of a client's intercept
/// ([`crate::Message::FilesOpen`], `tpvpn intercept --mount`). From an agent
/// (`ClientInfo.features`): it serves a container's volume mounts on a stream the
/// manager opens.
pub const FEATURE_FILES: u64 = 1 << 4;
/// Feature bit: the manager passes a client's ask for read-write files on
/// (`FilesOpen.writable`, `tpvpn intercept --mount-readwrite`) and says which volumes may
/// be written. From an agent: it carries out the write operations of
/// [`crate::files::FileOp`] in those volumes.
pub const FEATURE_FILES_WRITE: u64 = 1 << 5;

/// From a manager: it takes `FilesOpen.handles` and answers it with `FilesReady`. From an
/// agent: it serves open files ([`crate::files::FileOp::Open`] and the operations by
/// handle).
pub const FEATURE_FILE_HANDLES: u64 = 1 << 6;

/// What the connecting side says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub token: Vec<u8>,
    pub role: Role,
    pub user: String,
    pub host: String,
    pub client_id: Vec<u8>,
    pub features: u64,
    /// Oldest and newest version to offer.
    pub versions: (u16, u16),
}

/// The peer was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The version both speak from now on.
    pub version: Negotiated,
    pub cluster: ClusterInfo,
    /// The manager's range and features (version 1 managers: `(1, 1)`, none).
    pub manager_versions: (u16, u16),
    pub features: u64,
}

/// Why the manager refused, typed; `message` is the manager's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// The version the manager named (see the module doc).
    pub version: u16,
}

/// What the connecting side does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Read another frame.
    NeedMore,
    Accepted(Accepted),
    /// The manager speaks only `version`, which this side speaks too: connect again and
    /// send [`ClientHandshake::new`] with `versions: (version, version)`.
    Retry {
        version: u16,
    },
    /// Refused; for [`ErrorCode::VersionMismatch`], [`ClientHandshake::upgrade_hint`]
    /// says which side to upgrade.
    Refused(Refusal),
    /// The manager broke the protocol.
    Invalid(String),
}

/// The connecting side of the hello.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    hello: Hello,
    accepted: Option<(u16, ClusterInfo)>,
}

impl ClientHandshake {
    pub fn new(hello: Hello) -> Self {
        ClientHandshake { hello, accepted: None }
    }

    /// The frames to send, in order.
    pub fn hello_frames(&self) -> Vec<Message> {
        let (min, max) = self.hello.versions;
        let mut frames = vec![Message::ClientHello { version: max, token: self.hello.token.clone() }];
        if max >= INTERCEPT_VERSION {
            frames.push(Message::ClientInfo {
                min_version: min,
                role: self.hello.role.clone(),
                user: self.hello.user.clone(),
                host: self.hello.host.clone(),
                client_id: self.hello.client_id.clone(),
                features: self.hello.features,
            });
        }
        frames
    }

    /// Feeds one frame read from the control stream.
    pub fn on_message(&mut self, msg: Message) -> ClientStep {
        let (min, max) = self.hello.versions;
        match (msg, self.accepted.take()) {
            (Message::ServerHello { version, cluster }, None) => {
                if version < min || version > max {
                    return ClientStep::Invalid(format!(
                        "the manager chose protocol v{version}, outside the offered v{min}..v{max}"
                    ));
                }
                if !Negotiated(version).intercepts() {
                    return ClientStep::Accepted(Accepted {
                        version: Negotiated(version),
                        cluster,
                        manager_versions: (version, version),
                        features: 0,
                    });
                }
                self.accepted = Some((version, cluster));
                ClientStep::NeedMore
            }
            (Message::ServerInfo { min_version, max_version, features }, Some((version, cluster))) => {
                ClientStep::Accepted(Accepted {
                    version: Negotiated(version),
                    cluster,
                    manager_versions: (min_version, max_version),
                    features,
                })
            }
            (Message::Error { code: ErrorCode::VersionMismatch, version, .. }, None)
                if version >= min && version < max =>
            {
                ClientStep::Retry { version }
            }
            (Message::Error { code, version, message }, _) => ClientStep::Refused(Refusal { code, message, version }),
            (other, _) => ClientStep::Invalid(format!("the manager sent {} during the hello", other.kind())),
        }
    }

    /// For a version refusal: which side to upgrade, as a phrase for an error line.
    pub fn upgrade_hint(&self, refusal: &Refusal) -> String {
        let (min, max) = self.hello.versions;
        if refusal.version < min {
            format!(
                "the manager speaks tpvpn protocol up to v{}, this side v{min} to v{max}: upgrade the manager",
                refusal.version
            )
        } else {
            format!(
                "the manager needs tpvpn protocol v{} or newer, this side speaks up to v{max}: upgrade this side",
                refusal.version
            )
        }
    }
}

/// Which token a peer presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Client,
    Agent,
}

/// The accepting side's view of a peer it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub version: Negotiated,
    pub role: Role,
    pub user: String,
    pub host: String,
    pub client_id: Vec<u8>,
    pub features: u64,
}

/// What the accepting side does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStep {
    NeedMore,
    /// Accept: send [`ServerHandshake::accept_frames`] for `peer.version`.
    Accept(Peer),
    /// Send `reply` (an [`Message::Error`]) and close.
    Refuse {
        reply: Message,
    },
    /// Not a hello: close without a word.
    Invalid(String),
}

/// The manager's side of the hello.
#[derive(Debug, Clone)]
pub struct ServerHandshake {
    versions: (u16, u16),
    features: u64,
    pending: Option<(u16, TokenKind)>,
}

impl ServerHandshake {
    /// `versions`: the oldest and newest version to accept.
    pub fn new(versions: (u16, u16), features: u64) -> Self {
        ServerHandshake { versions, features, pending: None }
    }

    /// Feeds one frame. `token` says which token the bytes are, if any (compared by the
    /// caller in constant time).
    pub fn on_message(&mut self, msg: Message, token: impl FnOnce(&[u8]) -> Option<TokenKind>) -> ServerStep {
        let (min, max) = self.versions;
        match (msg, self.pending.take()) {
            (Message::ClientHello { version, token: presented }, None) => {
                if version < min {
                    return refuse(ErrorCode::VersionMismatch, min, format!(
                        "protocol version mismatch: the manager speaks tpvpn protocol v{min} to v{max}, the client up to v{version}: upgrade the client"
                    ));
                }
                let Some(kind) = token(&presented) else {
                    return refuse(ErrorCode::Unauthorized, max, "the client token is not valid".into());
                };
                // From version 2 on an info frame follows: its range decides.
                if version >= INTERCEPT_VERSION {
                    self.pending = Some((version, kind));
                    return ServerStep::NeedMore;
                }
                // A version-1 client: it has no role but that of a client.
                if kind != TokenKind::Client {
                    return refuse(ErrorCode::Unauthorized, max, "the client token is not valid".into());
                }
                ServerStep::Accept(Peer {
                    version: Negotiated(version),
                    role: Role::Client,
                    user: String::new(),
                    host: String::new(),
                    client_id: Vec::new(),
                    features: 0,
                })
            }
            (Message::ClientInfo { min_version, role, user, host, client_id, features }, Some((offered, kind))) => {
                let chosen = offered.min(max);
                if chosen < min_version || chosen < min {
                    let (code_version, msg) = if min_version > max {
                        (max, format!(
                            "protocol version mismatch: the manager speaks tpvpn protocol up to v{max}, the client v{min_version} to v{offered}: upgrade the manager"
                        ))
                    } else {
                        (min, format!(
                            "protocol version mismatch: the manager speaks tpvpn protocol v{min} to v{max}, the client up to v{offered}: upgrade the client"
                        ))
                    };
                    return refuse(ErrorCode::VersionMismatch, code_version, msg);
                }
                let allowed = match (&role, kind) {
                    (Role::Client | Role::Intercepts, TokenKind::Client) => true,
                    (Role::Agent { node }, TokenKind::Agent) => !node.is_empty(),
                    _ => false,
                };
                if !allowed {
                    let what = match role {
                        Role::Agent { .. } => "agent",
                        _ => "client",
                    };
                    return refuse(ErrorCode::Unauthorized, max, format!("the {what} token is not valid"));
                }
                ServerStep::Accept(Peer { version: Negotiated(chosen), role, user, host, client_id, features })
            }
            (other, _) => ServerStep::Invalid(format!("{} where a hello was expected", other.kind())),
        }
    }

    /// The frames that accept a peer at `version`.
    pub fn accept_frames(&self, version: Negotiated, cluster: ClusterInfo) -> Vec<Message> {
        let mut frames = vec![Message::ServerHello { version: version.number(), cluster }];
        if version.intercepts() {
            frames.push(Message::ServerInfo {
                min_version: self.versions.0,
                max_version: self.versions.1,
                features: self.features,
            });
        }
        frames
    }
}

fn refuse(code: ErrorCode, version: u16, message: String) -> ServerStep {
    ServerStep::Refuse { reply: Message::Error { code, version, message } }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(versions: (u16, u16)) -> Hello {
        Hello {
            token: b"t".to_vec(),
            role: Role::Client,
            user: "alice".into(),
            host: "laptop".into(),
            client_id: vec![1; 16],
            features: 0,
            versions,
        }
    }

    fn tokens(t: &[u8]) -> Option<TokenKind> {
        match t {
            b"t" => Some(TokenKind::Client),
            b"agent" => Some(TokenKind::Agent),
            _ => None,
        }
    }

    /// What the first release's manager (version 1, before this module) did with the
    /// first frame: anything but version 1 is refused naming 1; it never reads more.
    fn v1_manager(first: Message) -> Vec<Message> {
        match first {
            Message::ClientHello { version: 1, .. } => {
                vec![Message::ServerHello { version: 1, cluster: ClusterInfo::default() }]
            }
            Message::ClientHello { version, .. } => vec![Message::Error {
                code: ErrorCode::VersionMismatch,
                version: 1,
                message: format!("the manager speaks tpvpn protocol v1, the client v{version}"),
            }],
            other => panic!("{other:?}"),
        }
    }

    fn run_v1(client: (u16, u16)) -> ClientStep {
        let mut c = ClientHandshake::new(hello(client));
        let mut step = ClientStep::NeedMore;
        for r in v1_manager(c.hello_frames().remove(0)) {
            step = c.on_message(r);
        }
        step
    }

    /// Runs a whole hello between the two sans-IO sides; the client's outcome.
    fn run(client: (u16, u16), server: (u16, u16)) -> (ClientStep, Option<Peer>) {
        let mut c = ClientHandshake::new(hello(client));
        let mut s = ServerHandshake::new(server, FEATURE_INTERCEPTS);
        let mut peer = None;
        let mut replies = Vec::new();
        for m in c.hello_frames() {
            match s.on_message(m, tokens) {
                ServerStep::NeedMore => continue,
                ServerStep::Accept(p) => {
                    replies = s.accept_frames(p.version, ClusterInfo::default());
                    peer = Some(p);
                }
                ServerStep::Refuse { reply } => replies = vec![reply],
                ServerStep::Invalid(e) => panic!("{e}"),
            }
            break;
        }
        let mut step = ClientStep::NeedMore;
        for r in replies {
            step = c.on_message(r);
        }
        (step, peer)
    }

    #[test]
    fn same_range_picks_the_newest() {
        let (step, peer) = run((1, 2), (1, 2));
        let ClientStep::Accepted(a) = step else { panic!("{step:?}") };
        assert_eq!((a.version.number(), a.manager_versions, a.features), (2, (1, 2), FEATURE_INTERCEPTS));
        let p = peer.unwrap();
        assert_eq!((p.version.number(), p.user.as_str(), p.host.as_str()), (2, "alice", "laptop"));
    }

    #[test]
    fn a_client_one_version_older_connects() {
        // A version-1 client: one frame, and it accepts only a version-1 answer.
        let (step, peer) = run((1, 1), (1, 2));
        let ClientStep::Accepted(a) = step else { panic!("{step:?}") };
        assert_eq!(a.version, Negotiated(1));
        assert_eq!(peer.unwrap().role, Role::Client);
    }

    #[test]
    fn a_client_one_version_newer_falls_back_to_a_version_1_manager() {
        assert_eq!(run_v1((1, 2)), ClientStep::Retry { version: 1 });
        let again = run_v1((1, 1));
        assert!(matches!(again, ClientStep::Accepted(Accepted { version: Negotiated(1), .. })), "{again:?}");
        // A client that no longer speaks 1 is refused and told to upgrade the manager.
        let c = ClientHandshake::new(hello((2, 3)));
        let ClientStep::Refused(r) = run_v1((2, 3)) else { panic!() };
        assert!(c.upgrade_hint(&r).ends_with("upgrade the manager"));
    }

    #[test]
    fn a_future_client_one_version_newer_connects_at_ours() {
        let (step, peer) = run((2, 3), (1, 2));
        assert!(matches!(step, ClientStep::Accepted(Accepted { version: Negotiated(2), .. })), "{step:?}");
        assert_eq!(peer.unwrap().version, Negotiated(2));
    }

    #[test]
    fn disjoint_ranges_name_the_side_to_upgrade() {
        let c = ClientHandshake::new(hello((3, 4)));
        let (step, _) = run((3, 4), (1, 2));
        let ClientStep::Refused(r) = step else { panic!("{step:?}") };
        assert_eq!(r.code, ErrorCode::VersionMismatch);
        assert!(c.upgrade_hint(&r).ends_with("upgrade the manager"), "{}", c.upgrade_hint(&r));

        let c = ClientHandshake::new(hello((1, 1)));
        let (step, _) = run((1, 1), (2, 3));
        let ClientStep::Refused(r) = step else { panic!("{step:?}") };
        assert!(c.upgrade_hint(&r).ends_with("upgrade this side"), "{}", c.upgrade_hint(&r));
    }

    #[test]
    fn tokens_bind_roles() {
        let mut s = ServerHandshake::new((1, 2), 0);
        assert!(matches!(
            s.on_message(Message::ClientHello { version: 2, token: b"nope".to_vec() }, tokens),
            ServerStep::Refuse { reply: Message::Error { code: ErrorCode::Unauthorized, .. } }
        ));
        // A client token cannot act as an agent, nor an agent token as a client (or a
        // client's intercepts connection).
        for (token, role) in
            [(&b"t"[..], Role::Agent { node: "n".into() }), (b"agent", Role::Client), (b"agent", Role::Intercepts)]
        {
            let mut s = ServerHandshake::new((1, 2), 0);
            assert_eq!(
                s.on_message(Message::ClientHello { version: 2, token: token.to_vec() }, tokens),
                ServerStep::NeedMore
            );
            let info = Message::ClientInfo {
                min_version: 2,
                role,
                user: String::new(),
                host: String::new(),
                client_id: vec![],
                features: 0,
            };
            assert!(matches!(s.on_message(info, tokens), ServerStep::Refuse { .. }));
        }
        // A client's intercepts connection presents the client token.
        let mut s = ServerHandshake::new((1, 3), 0);
        s.on_message(Message::ClientHello { version: 3, token: b"t".to_vec() }, tokens);
        let info = Message::ClientInfo {
            min_version: 3,
            role: Role::Intercepts,
            user: String::new(),
            host: String::new(),
            client_id: vec![7; 16],
            features: 0,
        };
        assert!(matches!(s.on_message(info, tokens), ServerStep::Accept(Peer { role: Role::Intercepts, .. })));
        // An agent token from a version-1 hello (no role to speak of) is refused.
        let mut s = ServerHandshake::new((1, 2), 0);
        assert!(matches!(
            s.on_message(Message::ClientHello { version: 1, token: b"agent".to_vec() }, tokens),
            ServerStep::Refuse { .. }
        ));
        let mut s = ServerHandshake::new((1, 2), 0);
        assert_eq!(
            s.on_message(Message::ClientHello { version: 2, token: b"agent".to_vec() }, tokens),
            ServerStep::NeedMore
        );
        let info = Message::ClientInfo {
            min_version: 2,
            role: Role::Agent { node: "node-1".into() },
            user: String::new(),
            host: "node-1".into(),
            client_id: vec![],
            features: 0,
        };
        assert!(matches!(s.on_message(info, tokens), ServerStep::Accept(Peer { role: Role::Agent { .. }, .. })));
    }

    #[test]
    fn anything_else_is_not_a_hello() {
        let mut s = ServerHandshake::new((1, 2), 0);
        assert!(matches!(s.on_message(Message::InterceptList, tokens), ServerStep::Invalid(_)));
        let mut c = ClientHandshake::new(hello((1, 2)));
        assert!(matches!(c.on_message(Message::Namespaces { names: vec![] }), ClientStep::Invalid(_)));
        let mut c = ClientHandshake::new(hello((2, 2)));
        assert!(matches!(
            c.on_message(Message::ServerHello { version: 1, cluster: ClusterInfo::default() }),
            ClientStep::Invalid(_)
        ));
    }
}
