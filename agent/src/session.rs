//! The agent's connection to the manager: the hello as `Role::Agent`, then `Capture`
//! and `Release` from the manager on the control stream, each answered with a
//! `CaptureStatus`, as [`crate::ports`] decides (captures of the same pod port share one
//! capture there). When the connection is lost every capture is stopped (the pods get
//! their traffic back) and the agent connects again with backoff.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tpvpn_tunnel::handshake::{ClientHandshake, ClientStep, Hello, INTERCEPT_VERSION};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::quic::{client_config_for, parse_certs, Class, SERVER_NAME};
use tpvpn_tunnel::{Message, Role, PROTOCOL_VERSION};
use tracing::{info, warn};

use crate::capture::{self, Node, Request};
use crate::ports::{Effect, PortKey, Ports};
use crate::{Error, Result};

/// How the agent reaches the manager.
#[derive(Debug, Clone)]
pub struct Config {
    pub manager: String,
    pub ca_pem: Vec<u8>,
    /// The token file, read again for each connection: a projected ServiceAccount token
    /// is replaced by the kubelet before it expires.
    pub token_file: PathBuf,
    pub node_name: String,
    pub node: Node,
}

/// The token in `path` (surrounding white space removed).
pub fn read_token(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read --token-file {}: {e}", path.display())))?;
    let token = text.trim().as_bytes().to_vec();
    if token.is_empty() {
        return Err(Error::Config(format!("token file {} is empty", path.display())));
    }
    Ok(token)
}

/// Connects, serves, and connects again, until `stop` resolves; then every capture is
/// removed. Ends with an error only when the manager refuses the agent's credential.
pub async fn run(config: Config, stop: impl std::future::Future<Output = ()>) -> Result<()> {
    for t in remove_stale(&config).await {
        info!(table = %t, "removed a capture table an earlier agent left");
    }
    let mut captures = Captures::default();
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    let mut ended = Ok(());
    loop {
        let served = async {
            match connect(&config).await {
                Ok((conn, control)) => {
                    backoff = Duration::from_millis(200);
                    info!(manager = %config.manager, node = %config.node_name, "connected to the manager");
                    let why = serve(&config, conn, control, &mut captures).await;
                    warn!(%why, "lost the manager; stopping every capture");
                    Ok(())
                }
                Err(e @ Error::Refused(_)) => Err(e),
                Err(e) => {
                    warn!(error = %e, "cannot connect to the manager");
                    Ok(())
                }
            }
        };
        tokio::select! {
            r = served => if let Err(e) = r {
                ended = Err(e);
                break;
            },
            _ = &mut stop => break,
        }
        stop_all(&mut captures).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    stop_all(&mut captures).await;
    // And the replies tables of connections that outlived their captures (they end with
    // the agent).
    remove_stale(&config).await;
    info!("stopped; every capture removed");
    ended
}

/// Every tpvpn table on the node, removed ([`capture::remove_stale`]).
async fn remove_stale(config: &Config) -> Vec<String> {
    let node = config.node.clone();
    tokio::task::spawn_blocking(move || capture::remove_stale(&node.proc_root, &node.runtime_roots))
        .await
        .unwrap_or_default()
}

async fn connect(config: &Config) -> Result<(quinn::Connection, (quinn::SendStream, quinn::RecvStream))> {
    let certs = parse_certs(&config.ca_pem, "the manager CA").map_err(|e| Error::Config(e.to_string()))?;
    let addr: SocketAddr = tokio::net::lookup_host(&config.manager)
        .await
        .map_err(|e| Error::Config(format!("--manager {}: {e}", config.manager)))?
        .next()
        .ok_or_else(|| Error::Config(format!("--manager {}: no address", config.manager)))?;
    let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let endpoint = tpvpn_tunnel::quic::endpoint(bind, None)?;
    // Intercepted connections only, each its own stream: windows no set of stalled
    // streams can use up (see `Class::Intercepts`).
    let qc = client_config_for(certs[0].clone(), false, Class::Intercepts, None)
        .map_err(|e| Error::Config(e.to_string()))?;
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        endpoint.connect_with(qc, addr, SERVER_NAME).map_err(|e| Error::Config(e.to_string()))?,
    )
    .await
    .map_err(|_| Error::Manager(format!("no answer from {addr} within 5 s")))??;
    let mut hs = ClientHandshake::new(Hello {
        token: read_token(&config.token_file)?,
        role: Role::Agent { node: config.node_name.clone() },
        user: String::new(),
        host: config.node_name.clone(),
        client_id: Vec::new(),
        features: tpvpn_tunnel::handshake::FEATURE_FILES
            | tpvpn_tunnel::handshake::FEATURE_FILES_WRITE
            | tpvpn_tunnel::handshake::FEATURE_FILE_HANDLES,
        versions: (INTERCEPT_VERSION, PROTOCOL_VERSION),
    });
    let (mut send, mut recv) = conn.open_bi().await?;
    for f in hs.hello_frames() {
        write_message(&mut send, &f).await?;
    }
    let step = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match read_message(&mut recv).await? {
                Some(m) => match hs.on_message(m) {
                    ClientStep::NeedMore => continue,
                    step => return Ok::<_, Error>(step),
                },
                None => return Err(Error::Manager("the manager closed the hello".into())),
            }
        }
    })
    .await
    .map_err(|_| Error::Manager("the manager did not answer the hello".into()))??;
    match step {
        ClientStep::Accepted(_) => Ok((conn, (send, recv))),
        ClientStep::Refused(r) => Err(match r.code {
            tpvpn_tunnel::ErrorCode::VersionMismatch => Error::Manager(hs.upgrade_hint(&r)),
            tpvpn_tunnel::ErrorCode::Unauthorized => Error::Refused(r.message),
            _ => Error::Manager(r.message),
        }),
        ClientStep::Retry { version } => Err(Error::Manager(format!(
            "the manager speaks tpvpn protocol v{version}, which has no agents: upgrade the manager"
        ))),
        other => Err(Error::Manager(format!("{other:?}"))),
    }
}

/// What the agent captures.
type Captures = Ports<capture::Started>;

/// Stops every capture.
async fn stop_all(captures: &mut Captures) {
    for s in captures.stop_all() {
        s.capture.stop().await;
    }
}

/// What the core's effects are done with: the manager's connection, where started
/// captures come back, where statuses go.
struct Link<'a> {
    config: &'a Config,
    conn: &'a quinn::Connection,
    started: &'a StartedTx,
    status: &'a mpsc::UnboundedSender<Message>,
}

/// Does what the core says: starts a port's capture (with `req`, the request of the
/// `Capture` being handled), stops one, writes a status.
async fn apply(link: &Link<'_>, captures: &Captures, effects: Vec<Effect<capture::Started>>, req: Option<Request>) {
    let status = link.status;
    for effect in effects {
        match effect {
            Effect::Start { key, .. } => {
                let Some(req) = req.clone() else { continue };
                let (node, conn, tx) = (link.config.node.clone(), link.conn.clone(), link.started.clone());
                tokio::spawn(async move {
                    let r = capture::start(&node, conn, req).await.map_err(|e| e.to_string());
                    let _ = tx.send((key, r));
                });
            }
            Effect::Stop(s) => {
                let id = s.capture.id;
                s.capture.stop().await;
                info!(id, "capture released");
            }
            Effect::Ready { id } => {
                if let Some(s) = captures.running(id) {
                    let _ = status.send(ok_status(id, s));
                }
            }
            Effect::Failed { id, why } => {
                let _ = status.send(Message::CaptureStatus { id, ok: false, message: why, meshed: false, env: vec![] });
            }
        }
    }
}

/// Where started captures come back to the session.
type StartedTx = mpsc::UnboundedSender<(PortKey, std::result::Result<capture::Started, String>)>;

/// Capture `id` is in place; `message` says what was left out of the environment.
fn ok_status(id: u64, s: &capture::Started) -> Message {
    Message::CaptureStatus { id, ok: true, message: s.note.clone(), meshed: s.meshed, env: s.env.clone() }
}

/// Serves one connection until it is lost; why.
async fn serve(
    config: &Config,
    conn: quinn::Connection,
    (mut send, recv): (quinn::SendStream, quinn::RecvStream),
    captures: &mut Captures,
) -> String {
    let mut control = tpvpn_tunnel::io::frames(recv);
    // Statuses are written by one task, in the order they are produced.
    let (status_tx, mut status_rx) = mpsc::unbounded_channel::<Message>();
    let writer = async move {
        while let Some(m) = status_rx.recv().await {
            match write_message(&mut send, &m).await {
                Ok(()) => {}
                Err(tpvpn_tunnel::Error::Stream(_)) => return,
                // One status that cannot be encoded is dropped; the stream, and with it
                // every capture of the node, goes on.
                Err(e) => warn!(kind = m.kind(), error = %e, "a message to the manager cannot be sent: dropped"),
            }
        }
    };
    tokio::pin!(writer);
    // Ports start concurrently; their results come back here.
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let link = Link { config, conn: &conn, started: &started_tx, status: &status_tx };
    loop {
        tokio::select! {
            msg = control.recv() => match msg.unwrap_or(Ok(None)) {
                Ok(Some(Message::Capture { id, pod_namespace, pod_name, pod_ip, port, host_ip, container: _, container_id, matchers })) => {
                    let effects = captures.capture(id, (pod_ip, port, container_id.clone()), matchers);
                    let req = Request { id, pod: format!("{pod_namespace}/{pod_name}"), pod_ip, port, host_ip, container_id };
                    apply(&link, captures, effects, Some(req)).await;
                }
                Ok(Some(Message::Release { id })) => {
                    let effects = captures.release(id);
                    apply(&link, captures, effects, None).await;
                }
                Ok(Some(other)) => warn!(kind = other.kind(), "unexpected message from the manager"),
                Ok(None) => return "the manager closed the control stream".into(),
                Err(e) => return format!("control stream: {e}"),
            },
            Some((key, result)) = started_rx.recv() => {
                if let Err(why) = &result {
                    warn!(pod_ip = %key.0, port = key.1, error = %why, "cannot capture");
                }
                let effects = captures.started(key, result);
                apply(&link, captures, effects, None).await;
            }
            // The only streams the manager opens: a laptop's file requests (`--mount`).
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    tokio::spawn(crate::files::serve(config.node.clone(), send, recv));
                }
                Err(e) => return format!("connection closed: {e}"),
            },
            _ = &mut writer => return "the control stream failed".into(),
            e = conn.closed() => return format!("connection closed: {e}"),
        }
    }
}
