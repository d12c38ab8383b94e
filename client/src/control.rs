//! The daemon's control socket: one JSON request line, one JSON reply line.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::Error;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Down,
    List,
    Intercept(crate::intercept::Spec),
    /// Leave one's own intercepts of a Service; with `revoke`, end everyone's
    /// (`tpvpn revoke`).
    Leave {
        namespace: String,
        service: String,
        #[serde(default)]
        revoke: bool,
    },
}

/// `tpvpn status -o json`: the contract of the design brief, section 3.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub connected: bool,
    pub context: Option<String>,
    pub manager: Option<String>,
    pub tun: Option<Tun>,
    pub routes: Vec<String>,
    pub never_proxy: Vec<String>,
    pub dns: Dns,
    pub flows: Flows,
    pub pid: Option<u32>,
    /// The QUIC connection's smoothed round-trip time to the manager, µs (while connected).
    #[serde(default)]
    pub tunnel_rtt_us: Option<u64>,
    /// The connected namespace (short names and `intercept`/`leave` default to it).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The tunnel protocol version spoken with the manager.
    #[serde(default)]
    pub protocol: Option<u16>,
    /// The intercepts this daemon holds.
    #[serde(default)]
    pub intercepts: Vec<crate::intercept::Held>,
    /// How the manager is reached: `quic` or `portforward`.
    #[serde(default)]
    pub transport: Option<String>,
    /// The manager pod (`namespace/name`) when port-forwarded.
    #[serde(default)]
    pub manager_pod: Option<String>,
    /// Who the manager knows this laptop as, when it connected with a client certificate.
    #[serde(default)]
    pub identity: Option<Authenticated>,
    /// The running daemon's own version (`tpvpn version`: a daemon older than the
    /// command's binary after an upgrade).
    #[serde(default)]
    pub version: Option<String>,
    /// The protocol versions the manager speaks (its range; `protocol` is the one spoken).
    #[serde(default)]
    pub manager_protocols: Option<(u16, u16)>,
    /// Cluster ranges reached through virtual addresses (`--vnat`).
    #[serde(default)]
    pub vnat: Vec<VnatMapping>,
}

/// A cluster range and the virtual range this laptop reaches it through.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VnatMapping {
    pub cluster: String,
    #[serde(rename = "virtual")]
    pub virtual_net: String,
}

impl VnatMapping {
    pub fn all(table: &tpvpn_vnat::Table) -> Vec<VnatMapping> {
        table
            .mappings()
            .iter()
            .map(|m| VnatMapping { cluster: m.cluster.to_string(), virtual_net: m.virtual_net.to_string() })
            .collect()
    }
}

/// The identity of a client certificate: the user and groups the API server
/// authenticated, and when the certificate expires (RFC 3339).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Authenticated {
    pub user: String,
    pub groups: Vec<String>,
    pub expires: String,
}

impl Authenticated {
    pub fn of(issued: &crate::cluster::certificate::Issued) -> Authenticated {
        let expires = k8s_openapi::jiff::Timestamp::try_from(issued.expires).map(|t| t.to_string()).unwrap_or_default();
        Authenticated { user: issued.user.clone(), groups: issued.groups.clone(), expires }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tun {
    pub name: String,
    pub address: String,
    pub mtu: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dns {
    pub server: Option<String>,
    pub mode: String,
    /// Routing domains: names under them go to the cluster.
    pub domains: Vec<String>,
    /// Namespaces that are not routing domains because they are public suffixes.
    #[serde(default)]
    pub filtered_namespaces: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flows {
    pub tcp: usize,
    pub udp: usize,
    /// Flows the manager would not dial (its destination policy or a per-client limit).
    #[serde(default)]
    pub denied: u64,
}

/// `tpvpn list`: what the manager reported of the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Listing {
    pub namespaces: Vec<String>,
    pub services: Vec<ServiceRow>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<String>,
    /// `80/TCP (http)` style.
    pub ports: Vec<String>,
    /// `ready`, `intercepted by alice@laptop (you), port 80`, `no agent`, `no pods`; absent
    /// when the manager does not say (an older manager).
    #[serde(default)]
    pub intercept: Option<String>,
    /// The addresses a laptop process uses instead of `cluster_ips`, when their range is
    /// reached through virtual addresses (`--vnat`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_ips: Vec<String>,
}

impl Listing {
    /// Fills `virtual_ips` of each row with an address in a mapped range from `table`
    /// (every address of the row, as the laptop reaches it).
    pub fn with_vnat(mut self, table: &tpvpn_vnat::Table) -> Listing {
        for row in &mut self.services {
            let ips: Vec<std::net::IpAddr> = row.cluster_ips.iter().filter_map(|ip| ip.parse().ok()).collect();
            row.virtual_ips = if ips.iter().any(|ip| table.is_shadowed(*ip)) {
                ips.into_iter().map(|ip| table.to_virtual(ip).to_string()).collect()
            } else {
                vec![]
            };
        }
        self
    }
}

impl ServiceRow {
    pub fn from_info(s: &tpvpn_tunnel::ServiceInfo) -> Self {
        ServiceRow {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            cluster_ips: s.cluster_ips.iter().map(|ip| ip.to_string()).collect(),
            virtual_ips: vec![],
            ports: s
                .ports
                .iter()
                .map(|p| {
                    let proto = match p.protocol {
                        tpvpn_tunnel::Protocol::Tcp => "TCP".to_string(),
                        tpvpn_tunnel::Protocol::Udp => "UDP".to_string(),
                        tpvpn_tunnel::Protocol::Other(132) => "SCTP".to_string(),
                        tpvpn_tunnel::Protocol::Other(n) => n.to_string(),
                    };
                    if p.name.is_empty() {
                        format!("{}/{proto}", p.port)
                    } else {
                        format!("{}/{proto} ({})", p.port, p.name)
                    }
                })
                .collect(),
            intercept: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Box<Status>),
    List(Listing),
    Done { ok: bool },
    Intercepted { intercepted: Box<crate::intercept::Outcome> },
    Left { left: String },
    Failed { error: String },
}

/// Whether an I/O error on the control socket means that no daemon is there to answer:
/// no socket, nobody listening, or a daemon that died mid-exchange (a crash leaves the
/// socket file behind, and a dying process resets connections to it).
fn nobody_there(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), NotFound | ConnectionRefused | ConnectionReset | BrokenPipe)
}

/// Sends `req` to the daemon listening on `socket`. `Ok(None)` if no daemon answers (none
/// listens, or it closed or reset the connection without a reply).
pub async fn request(socket: &Path, req: Request, timeout: Duration) -> Result<Option<Reply>, Error> {
    let mut stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if nobody_there(&e) => return Ok(None),
        Err(e) => return Err(Error::System(format!("cannot connect to {}: {e}", socket.display()))),
    };
    let io_error = |e: std::io::Error| Error::System(format!("talking to the daemon on {}: {e}", socket.display()));
    let exchange = async {
        let mut line = serde_json::to_vec(&req).map_err(|e| Error::System(e.to_string()))?;
        line.push(b'\n');
        match stream.write_all(&line).await {
            Err(e) if nobody_there(&e) => return Ok(None),
            r => r.map_err(io_error)?,
        }
        let mut reply = String::new();
        match BufReader::new(&mut stream).read_line(&mut reply).await {
            Ok(0) => return Ok(None),
            Err(e) if nobody_there(&e) => return Ok(None),
            r => r.map_err(io_error)?,
        };
        serde_json::from_str(&reply).map(Some).map_err(|e| Error::Protocol(format!("bad reply from the daemon: {e}")))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::System(format!("the daemon on {} did not answer in time", socket.display())))?
}

impl Request {
    /// Whether the request changes something: only root and the user who ran `up` may.
    pub fn changes_state(&self) -> bool {
        !matches!(self, Request::Status | Request::List)
    }

    fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Down => "down",
            Request::List => "list",
            Request::Intercept(_) => "intercept",
            Request::Leave { .. } => "leave",
        }
    }
}

/// How long a control client has to send its request line, and to take its reply.
const DEADLINE: Duration = Duration::from_secs(5);
/// Longest request line read.
const REQUEST_MAX: u64 = 64 * 1024;
/// Control connections of root and the user who ran `up`, at once (their own pool, so that
/// other users cannot crowd them out).
const PRIVILEGED_CONNECTIONS: usize = 8;
/// Control connections of all other users together, and of any one of them, at once;
/// beyond, a connection is closed at once.
const OTHER_CONNECTIONS: usize = 16;
const PER_OTHER_USER: usize = 4;

/// A request read from a local client and allowed, for the daemon's supervisor to answer.
/// It holds its connection's slot until the reply is written.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    stream: UnixStream,
    _slot: Slot,
}

impl Call {
    /// Writes the reply, within [`DEADLINE`]: a client that stops reading is dropped.
    pub async fn reply(mut self, reply: &Reply) {
        write_reply(&mut self.stream, reply).await;
    }

    /// The same on a task of its own, so that the supervisor never waits for a client.
    pub fn reply_later(self, reply: Reply) {
        tokio::spawn(async move { self.reply(&reply).await });
    }
}

/// Connections held per user (other than root and the owner).
type PerUser = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>;

/// One connection's place among those served at once.
#[derive(Debug)]
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Another user's: their count, taken back on drop.
    user: Option<(u32, PerUser)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((uid, counts)) = &self.user {
            let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = c.get_mut(uid) {
                *n -= 1;
                if *n == 0 {
                    c.remove(uid);
                }
            }
        }
    }
}

/// Serves the control socket for the life of the daemon. Each connection gets a slot by
/// its peer's credentials (`SO_PEERCRED`): root and `owner` (the user who ran `up`, from
/// `SUDO_UID`) from a pool of their own, everyone else from a shared one with a cap per
/// user, so that no local user can crowd out `down`. It is then read on a task of its own
/// (one line within [`DEADLINE`]): `status` and `list` are for any local user, requests
/// that change something for root and `owner`. What passes goes to `calls`, so that a
/// silent or slow client never holds up the supervisor.
pub async fn serve(listener: tokio::net::UnixListener, owner: u32, calls: tokio::sync::mpsc::Sender<Call>) {
    let privileged = std::sync::Arc::new(tokio::sync::Semaphore::new(PRIVILEGED_CONNECTIONS));
    let others = std::sync::Arc::new(tokio::sync::Semaphore::new(OTHER_CONNECTIONS));
    let per_user: PerUser = Default::default();
    loop {
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(uid) = stream.peer_cred().map(|c| c.uid()) else { continue };
        let trusted = uid == 0 || uid == owner;
        let slot = if trusted {
            privileged.clone().try_acquire_owned().ok().map(|p| Slot { _permit: p, user: None })
        } else {
            let mut counts = per_user.lock().unwrap_or_else(|e| e.into_inner());
            let held = counts.get(&uid).copied().unwrap_or(0);
            match others.clone().try_acquire_owned() {
                Ok(p) if held < PER_OTHER_USER => {
                    counts.insert(uid, held + 1);
                    Some(Slot { _permit: p, user: Some((uid, per_user.clone())) })
                }
                _ => None,
            }
        };
        // No slot: closed at once (the client sees no daemon answer, and asks again).
        let Some(slot) = slot else { continue };
        let calls = calls.clone();
        tokio::spawn(async move {
            let Some(request) = read_request(&mut stream).await else {
                tracing::warn!("bad control request");
                return;
            };
            if request.changes_state() && !trusted {
                let error = format!(
                    "tpvpn {} needs root or the user who ran tpvpn up (uid {owner}); this is uid {uid}",
                    request.name()
                );
                write_reply(&mut stream, &Reply::Failed { error }).await;
                return;
            }
            let _ = calls.send(Call { request, stream, _slot: slot }).await;
        });
    }
}

/// Reads one request line from a control connection, within [`DEADLINE`].
async fn read_request(stream: &mut UnixStream) -> Option<Request> {
    use tokio::io::AsyncReadExt;
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(REQUEST_MAX));
    tokio::time::timeout(DEADLINE, reader.read_line(&mut line)).await.ok()?.ok()?;
    serde_json::from_str(&line).ok()
}

/// Writes one reply on a control connection, within [`DEADLINE`].
async fn write_reply(stream: &mut UnixStream, reply: &Reply) {
    if let Ok(mut line) = serde_json::to_vec(reply) {
        line.push(b'\n');
        let _ = tokio::time::timeout(DEADLINE, stream.write_all(&line)).await;
    }
}
