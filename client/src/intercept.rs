//! The laptop's side of intercepts (portable code: it runs wherever the client does).
//!
//! The daemon asks the manager for an intercept on a stream of its own
//! (`InterceptRequest`, answered by `InterceptReply` once every pod is captured, or an
//! `Error`), remembers what it holds in `TPVPN_RUNTIME_DIR/intercepts.json` (so that a
//! daemon started after a crash re-claims them, as one that reconnects does), and
//! serves the connections the manager opens toward it: `InterceptOpen`, a dial of
//! `127.0.0.1:LOCAL`, the `FlowReply` that tells the cluster caller what happened
//! (refused here = reset there), then the bytes with TCP's FIN and RST kept.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tpvpn_tunnel::handshake::Negotiated;
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::{relay, ErrorCode, FlowStatus, InterceptRow, InterceptState, Matchers, Message};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::Error;

/// How long a request to the manager may take (it waits for the agents).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// How long dialing the laptop's server may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Relay buffer per direction of an intercepted connection.
const RELAY_BUFFER: usize = 256 * 1024;

/// What `tpvpn intercept` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub namespace: String,
    pub service: String,
    /// A Service port name or number; empty for its only port.
    pub port: String,
    pub local_port: u16,
    #[serde(default)]
    pub container: String,
    /// A personal intercept's headers (`NAME`, `VALUE`): only requests carrying every
    /// one (and under `path_prefix`) come here. None: every connection (global).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub path_prefix: String,
    /// Where the serving container's volume mounts are mounted (`--mount`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<PathBuf>,
    /// Writes there reach the pod's emptyDir and PVC volumes (`--mount-readwrite`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mount_readwrite: bool,
}

impl Spec {
    /// What the manager and agents match requests against.
    pub fn matchers(&self) -> Matchers {
        Matchers { headers: self.headers.clone(), path_prefix: self.path_prefix.clone() }.canonical()
    }
}

/// An intercept this daemon holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub spec: Spec,
    /// The manager's id of it (captured connections carry it).
    pub id: u64,
    pub service_port: u16,
    pub targets: Vec<Target>,
}

/// One pod captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub pod: String,
    pub addr: String,
    pub meshed: bool,
}

/// The answer to `tpvpn intercept`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub held: Held,
    pub env: Vec<(String, String)>,
    pub warnings: Vec<String>,
    /// With `--mount`: what is mounted where, and what was left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounted: Option<String>,
}

impl Outcome {
    /// Rewrites the environment's cluster addresses in a range reached through virtual
    /// addresses (`--vnat`) to those: values that are an address (`*_SERVICE_HOST`,
    /// `*_TCP_ADDR`) or `PROTO://ADDRESS:PORT` (`*_PORT`, `*_PORT_*_TCP`). Says so in a
    /// warning naming the variables.
    pub fn with_vnat(mut self, table: &tpvpn_vnat::Table) -> Outcome {
        let mut changed = Vec::new();
        for (name, value) in &mut self.env {
            if let Some(v) = virtual_value(value, table) {
                *value = v;
                changed.push(name.clone());
            }
        }
        if !changed.is_empty() {
            self.warnings.push(format!(
                "{} hold this laptop's virtual addresses for the cluster's (a cluster range overlaps a route of this machine; see `tpvpn status`)",
                changed.join(", ")
            ));
        }
        self
    }
}

/// `value` with its cluster address made virtual, when it is (or holds, as
/// `tcp://ADDRESS:PORT`) one in a mapped range.
fn virtual_value(value: &str, table: &tpvpn_vnat::Table) -> Option<String> {
    let map = |ip: std::net::IpAddr| table.is_shadowed(ip).then(|| table.to_virtual(ip));
    if let Ok(ip) = value.parse() {
        return map(ip).map(|v| v.to_string());
    }
    let (scheme, rest) = value.split_once("://")?;
    let addr: std::net::SocketAddr = rest.parse().ok()?;
    let ip = map(addr.ip())?;
    Some(format!("{scheme}://{}", std::net::SocketAddr::new(ip, addr.port())))
}

/// The intercepts of this daemon.
pub struct Intercepts {
    path: PathBuf,
    held: Mutex<Vec<Held>>,
    /// Their files mounted (`--mount`), and the connection file streams are opened on.
    pub mounts: Arc<crate::mount::Mounts>,
    conn: tokio::sync::watch::Sender<Option<(quinn::Connection, u64)>>,
}

impl Intercepts {
    /// What `path` records (left by an earlier daemon that did not exit cleanly), or
    /// nothing.
    pub fn load(path: PathBuf) -> Arc<Intercepts> {
        let held =
            crate::state::read_file(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let record = path.with_file_name("mounts.json");
        // Mounts a crashed daemon left (dead): removed, mounted again as their intercepts
        // are re-claimed.
        crate::mount::Mounts::clean_up(&record);
        let mounts = crate::mount::Mounts::new(record);
        let conn = tokio::sync::watch::Sender::new(None);
        Arc::new(Intercepts { path, held: Mutex::new(held), mounts, conn })
    }

    /// The daemon's connection to the manager is `conn` now, to a manager with
    /// `features`.
    pub fn connected(&self, conn: &quinn::Connection, features: u64) {
        self.conn.send_replace(Some((conn.clone(), features)));
    }

    /// Mounts the files of the intercept of `namespace/service` at `dir`; what is served.
    pub async fn mount(&self, spec: &Spec, dir: &std::path::Path) -> Result<String, Error> {
        let service = (spec.namespace.as_str(), spec.service.as_str());
        self.mounts.mount(self.conn.subscribe(), service, dir, spec.mount_readwrite).await
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every intercept held.
    pub fn list(&self) -> Vec<Held> {
        self.held().clone()
    }

    fn save(&self) {
        let held = self.held().clone();
        if held.is_empty() {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        let written = serde_json::to_vec_pretty(&held)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::state::write_atomic(&self.path, &b, 0o600));
        if let Err(e) = written {
            warn!(path = %self.path.display(), error = %e, "cannot record the intercepts");
        }
    }

    fn local_port(&self, id: u64) -> Option<u16> {
        self.held().iter().find(|h| h.id == id).map(|h| h.spec.local_port)
    }

    /// Asks the manager (protocol `version`) to intercept `spec`.
    pub async fn request(&self, conn: &quinn::Connection, version: Negotiated, spec: Spec) -> Result<Outcome, Error> {
        supported(version)?;
        let matchers = spec.matchers();
        if !matchers.is_empty() && !version.personal() {
            return Err(Error::Config(format!(
                "the manager speaks tpvpn protocol {version}, which has no personal intercepts (--http-header, --http-path-prefix): upgrade the manager (tpvpn manager install)"
            )));
        }
        let req = Message::InterceptRequest {
            namespace: spec.namespace.clone(),
            service: spec.service.clone(),
            port: spec.port.clone(),
            local_port: spec.local_port,
            container: spec.container.clone(),
            matchers,
        };
        match exchange(conn, &req).await? {
            Message::InterceptReply { id, service_port, targets, env, warnings } => {
                let held = Held {
                    spec,
                    id,
                    service_port,
                    targets: targets
                        .iter()
                        .map(|t| Target { pod: t.pod.clone(), addr: t.addr.to_string(), meshed: t.meshed })
                        .collect(),
                };
                {
                    let mut all = self.held();
                    all.retain(|h| {
                        !(h.spec.namespace == held.spec.namespace
                            && h.spec.service == held.spec.service
                            && h.service_port == held.service_port)
                    });
                    all.push(held.clone());
                }
                self.save();
                Ok(Outcome { held, env, warnings, mounted: None })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Ends the intercepts of a Service.
    pub async fn leave(
        &self,
        conn: &quinn::Connection,
        version: Negotiated,
        namespace: &str,
        service: &str,
    ) -> Result<String, Error> {
        supported(version)?;
        self.mounts.unmount(namespace, service);
        let req = Message::Leave { namespace: namespace.into(), service: service.into() };
        let result = match exchange(conn, &req).await {
            Ok(Message::Ack { message }) => Ok(message),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(e),
        };
        // Held or not by the manager's account, this daemon no longer serves it.
        let known = {
            let mut all = self.held();
            let before = all.len();
            all.retain(|h| !(h.spec.namespace == namespace && h.spec.service == service));
            before != all.len()
        };
        self.save();
        match result {
            Err(Error::Refused { message, .. }) if known => Ok(format!("left {namespace}/{service} ({message})")),
            r => r,
        }
    }

    /// Ends every intercept of a Service, whoever holds it (`tpvpn revoke`; the
    /// manager checks that this laptop's identity may `delete` `intercepts`).
    pub async fn revoke(
        &self,
        conn: &quinn::Connection,
        features: u64,
        namespace: &str,
        service: &str,
    ) -> Result<String, Error> {
        if features & tpvpn_tunnel::handshake::FEATURE_REVOKE == 0 {
            return Err(Error::Config(
                "this manager cannot end others' intercepts: upgrade the manager (tpvpn manager install)".into(),
            ));
        }
        let req = Message::Revoke { namespace: namespace.into(), service: service.into() };
        let message = match exchange(conn, &req).await? {
            Message::Ack { message } => message,
            other => return Err(unexpected(other)),
        };
        // This daemon's own intercepts of it ended too.
        self.held().retain(|h| !(h.spec.namespace == namespace && h.spec.service == service));
        self.save();
        self.mounts.unmount(namespace, service);
        Ok(message)
    }

    /// Leaves every intercept (on `down`), bounded in time; forgets them all.
    pub async fn leave_all(&self, conn: &quinn::Connection, version: Negotiated) {
        let services: Vec<(String, String)> =
            self.list().into_iter().map(|h| (h.spec.namespace, h.spec.service)).collect();
        for (ns, svc) in services {
            match tokio::time::timeout(Duration::from_secs(3), self.leave(conn, version, &ns, &svc)).await {
                Ok(Ok(m)) => info!("{m}"),
                Ok(Err(e)) => warn!(service = %format!("{ns}/{svc}"), error = %e, "leave failed"),
                Err(_) => warn!(service = %format!("{ns}/{svc}"), "leave timed out"),
            }
        }
        self.held().clear();
        self.save();
        self.mounts.unmount_all();
    }

    /// After (re)connecting: asks again for every intercept held, which the manager keeps
    /// for this client for [`RECLAIM`] after a disconnect. What cannot be had yet (no
    /// agent back, a pod restarting, this client's old connection not yet timed out) is
    /// asked again with backoff while the claim lasts; what the manager says is gone
    /// (another holder, no such Service) is forgotten.
    pub async fn reclaim(&self, conn: &quinn::Connection, version: Negotiated) {
        let deadline = tokio::time::Instant::now() + RECLAIM;
        let mut pending = self.list();
        let mut wait = Duration::from_millis(500);
        while !pending.is_empty() {
            let mut again = Vec::new();
            for h in pending {
                let name = format!("{}/{}", h.spec.namespace, h.spec.service);
                match self.request(conn, version, h.spec.clone()).await {
                    Ok(o) => {
                        info!(service = %name, port = o.held.service_port, "intercept re-claimed");
                        self.remount(&o.held.spec).await;
                    }
                    Err(e) if retryable(&e) && tokio::time::Instant::now() < deadline => {
                        debug!(service = %name, error = %e, "intercept not re-claimed yet; trying again");
                        again.push(h);
                    }
                    Err(e) => {
                        warn!(service = %name, error = %e, "intercept not re-claimed; it is gone");
                        self.held().retain(|x| x.id != h.id);
                        self.save();
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
            pending = again;
        }
    }

    /// Mounts the files of a re-claimed intercept again where `spec` says, if they are
    /// not mounted (the daemon that mounted them crashed; across a reconnect the mount
    /// stays and follows the new connection).
    async fn remount(&self, spec: &Spec) {
        let Some(dir) = &spec.mount else { return };
        if self.mounts.has(&spec.namespace, &spec.service) {
            return;
        }
        match self.mount(spec, dir).await {
            Ok(_) => info!(service = %spec.service, dir = %dir.display(), "files mounted again"),
            Err(e) => warn!(service = %spec.service, dir = %dir.display(), error = %e, "files not mounted again"),
        }
    }

    /// The manager ended this daemon's intercept of `namespace/service` (`tpvpn revoke` by
    /// someone allowed to): forgotten, so that it is neither shown nor re-claimed.
    pub fn revoked(&self, namespace: &str, service: &str) {
        let mut held = self.held();
        let before = held.len();
        held.retain(|h| !(h.spec.namespace == namespace && h.spec.service == service));
        let gone = before - held.len();
        drop(held);
        self.mounts.unmount(namespace, service);
        if gone > 0 {
            self.save();
            warn!(service = %format!("{namespace}/{service}"), "the intercept was revoked: its traffic goes to the pods again");
        }
    }

    /// Every Service's intercept state, for `tpvpn list`.
    pub async fn table(conn: &quinn::Connection, version: Negotiated) -> Result<Vec<InterceptRow>, Error> {
        supported(version)?;
        // The table comes in frames of bounded size, until the stream ends.
        let run = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_message(&mut send, &Message::InterceptList).await?;
            let _ = send.finish();
            let mut rows = Vec::new();
            while let Some(m) = read_message(&mut recv).await? {
                match m {
                    Message::InterceptTable { rows: more } => rows.extend(more),
                    Message::Error { code, message, .. } => return Err(refusal(code, message)),
                    other => return Err(unexpected(other)),
                }
            }
            Ok(rows)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(Error::System(format!("the manager did not answer within {REQUEST_TIMEOUT:?}"))))
    }

    /// Serves the connections the manager opens toward this client on `conn`, until the
    /// connection ends.
    pub async fn serve(self: Arc<Self>, conn: quinn::Connection) {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let this = self.clone();
            tokio::spawn(async move { this.connection(send, recv).await });
        }
    }

    async fn connection(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let Ok(Some(Message::InterceptOpen { id, src, dst })) = read_message(&mut recv).await else {
            let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
            return;
        };
        let span = info_span!("intercepted", id, %src, %dst);
        async move {
            let reply = |status, message: String| Message::FlowReply { status, message };
            let Some(port) = self.local_port(id) else {
                let _ = write_message(&mut send, &reply(FlowStatus::Denied, "no such intercept here".into())).await;
                let _ = send.finish();
                return;
            };
            match dial_local(port).await {
                Ok(stream) => {
                    if write_message(&mut send, &reply(FlowStatus::Ok, String::new())).await.is_ok() {
                        let end = relay::tcp(stream, send, recv, RELAY_BUFFER, |_, _| {}).await;
                        debug!(?end, "intercepted connection ended");
                    }
                }
                Err(e) => {
                    let status = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => FlowStatus::Refused,
                        std::io::ErrorKind::TimedOut => FlowStatus::TimedOut,
                        _ => FlowStatus::Unreachable,
                    };
                    debug!(?status, error = %e, local_port = port, "the local server did not take it");
                    let _ = write_message(&mut send, &reply(status, format!("the laptop's port {port}: {e}"))).await;
                    let _ = send.finish();
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// Dials the laptop's server: `127.0.0.1:PORT`, else `[::1]:PORT`.
async fn dial_local(port: u16) -> std::io::Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let dial = |a| async move {
        tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(a))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{a} did not answer"))))
    };
    match dial(v4).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => dial(v6).await.map_err(|_| e),
        r => r,
    }
}

/// Whether something listens on the laptop's `port`, where intercepted connections are
/// dialed (`127.0.0.1`, else `[::1]`): one connection, closed at once.
pub fn listens_locally(port: u16) -> bool {
    [SocketAddr::from((Ipv4Addr::LOCALHOST, port)), SocketAddr::from((Ipv6Addr::LOCALHOST, port))]
        .iter()
        .any(|a| std::net::TcpStream::connect_timeout(a, std::time::Duration::from_millis(500)).is_ok())
}

/// How long the manager keeps a disconnected client's claims (its `RECLAIM`).
const RECLAIM: Duration = Duration::from_secs(60);

/// Whether asking again later may succeed.
fn retryable(e: &Error) -> bool {
    match e {
        Error::Refused { code, .. } => !matches!(
            code,
            Some(
                ErrorCode::Conflict
                    | ErrorCode::NotFound
                    | ErrorCode::Unsupported
                    | ErrorCode::Forbidden
                    | ErrorCode::Protocol
            )
        ),
        Error::Config(_) => false,
        _ => true,
    }
}

/// `NAME=VALUE` (or `NAME: VALUE`) of `--http-header`: a header name (an HTTP token)
/// and a value of visible characters.
pub fn parse_header(arg: &str) -> Result<(String, String), Error> {
    let at = arg.find(['=', ':']).ok_or_else(|| Error::Config(format!("--http-header {arg}: expected NAME=VALUE")))?;
    let (name, value) = (arg[..at].trim(), arg[at + 1..].trim());
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(Error::Config(format!("--http-header {arg}: {name:?} is not an HTTP header name")));
    }
    if value.is_empty() || !value.chars().all(|c| c == ' ' || c == '\t' || c.is_ascii_graphic()) {
        return Err(Error::Config(format!(
            "--http-header {arg}: the value must be non-empty printable ASCII (it is compared exactly)"
        )));
    }
    Ok((name.to_ascii_lowercase(), value.to_string()))
}

/// `--http-path-prefix`: a path, starting with `/`, beside at least one `--http-header`
/// (alone it would take every caller's requests to that path; the manager refuses it too).
pub fn check_path_prefix(prefix: &str, headers: &[(String, String)]) -> Result<(), Error> {
    if !prefix.starts_with('/') || prefix.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(Error::Config(format!("--http-path-prefix {prefix}: expected a path starting with /")));
    }
    if headers.is_empty() {
        return Err(Error::Config(format!(
            "--http-path-prefix {prefix} needs at least one --http-header: a personal intercept is for requests that carry your header"
        )));
    }
    Ok(())
}

fn supported(version: Negotiated) -> Result<(), Error> {
    if !version.intercepts() {
        return Err(Error::Config(format!(
            "the manager speaks tpvpn protocol {version}, which has no intercepts: upgrade the manager (tpvpn manager install)"
        )));
    }
    Ok(())
}

/// One request on its own stream, one answer.
pub(crate) async fn exchange(conn: &quinn::Connection, req: &Message) -> Result<Message, Error> {
    let run = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(&mut send, req).await?;
        let _ = send.finish();
        read_message(&mut recv).await?.ok_or_else(|| Error::Protocol("the manager closed the request".into()))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, run).await {
        Err(_) => Err(Error::System(format!("the manager did not answer within {REQUEST_TIMEOUT:?}"))),
        Ok(Ok(Message::Error { code, message, .. })) => Err(refusal(code, message)),
        Ok(r) => r,
    }
}

fn refusal(code: ErrorCode, message: String) -> Error {
    Error::Refused { code: Some(code), message }
}

pub(crate) fn unexpected(m: Message) -> Error {
    Error::Protocol(format!("the manager answered {}", m.kind()))
}

/// A row's state in words, for `tpvpn list`.
pub fn state_text(row: &InterceptRow) -> String {
    match row.state {
        InterceptState::Intercepted if row.mine => format!("intercepted by {} (you), port {}", row.holder, row.port),
        InterceptState::Intercepted => format!("intercepted by {}, port {}", row.holder, row.port),
        InterceptState::Ready => "ready".into(),
        InterceptState::NoAgent => "no agent".into(),
        InterceptState::NoPods => "no pods".into(),
        InterceptState::Other(n) => format!("unknown state {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_addresses_in_mapped_ranges_become_virtual() {
        let cluster = ["10.96.0.0/16".parse().unwrap(), "fd00:96::/112".parse().unwrap()];
        let routes = ["10.96.0.0/12".parse().unwrap(), "fd00::/16".parse().unwrap()];
        let table = tpvpn_vnat::plan(&Default::default(), &cluster, &routes, &Default::default(), Default::default());
        let table = table.unwrap();
        let cases = [
            ("10.96.0.20", Some("240.0.0.20")),
            ("tcp://10.96.0.20:6379", Some("tcp://240.0.0.20:6379")),
            ("udp://[fd00:96::7]:53", Some("udp://[fd74:7076:8000::7]:53")),
            ("10.244.0.5", None),
            ("tcp://10.244.0.5:80", None),
            ("6379", None),
            ("hello 10.96.0.20", None),
        ];
        for (value, want) in cases {
            assert_eq!(virtual_value(value, &table).as_deref(), want, "{value}");
        }
    }

    #[test]
    fn header_arguments() {
        assert_eq!(parse_header("X-Dev=alice").unwrap(), ("x-dev".into(), "alice".into()));
        assert_eq!(parse_header("x-dev: a=b").unwrap(), ("x-dev".into(), "a=b".into()));
        for bad in ["x-dev", "=a", "x dev=a", "x-dev=", "x-dev=caf\u{e9}", "x(y)=1"] {
            let e = parse_header(bad).unwrap_err().to_string();
            assert!(e.contains("--http-header"), "{bad}: {e}");
        }
        let h = [("x-dev".to_string(), "a".to_string())];
        assert!(check_path_prefix("/api/", &h).is_ok());
        assert!(check_path_prefix("api", &h).is_err() && check_path_prefix("/a b", &h).is_err());
        assert!(check_path_prefix("/api/", &[]).unwrap_err().to_string().contains("at least one --http-header"));
    }

    #[test]
    fn held_intercepts_survive_in_the_runtime_dir() {
        let dir = std::env::temp_dir().join(format!("tpvpn-intercepts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("intercepts.json");
        let i = Intercepts::load(path.clone());
        assert!(i.list().is_empty());
        let h = Held {
            spec: Spec {
                namespace: "default".into(),
                service: "web".into(),
                port: "http".into(),
                local_port: 18888,
                container: String::new(),
                headers: vec![],
                path_prefix: String::new(),
                mount: None,
                mount_readwrite: false,
            },
            id: 3,
            service_port: 80,
            targets: vec![Target { pod: "web-0".into(), addr: "10.244.2.10:8080".into(), meshed: false }],
        };
        i.held().push(h.clone());
        i.save();
        assert_eq!(Intercepts::load(path.clone()).list(), vec![h]);
        assert_eq!(i.local_port(3), Some(18888));
        i.held().clear();
        i.save();
        assert!(!path.exists(), "an empty record is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
