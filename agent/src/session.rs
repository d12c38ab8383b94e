//! The agent's connection to the manager: the hello as `Role::Agent`, then `Capture`
//! and `Release` from the manager on the control stream, each answered with a
//! `CaptureStatus`. Captures of the same pod port (a global intercept and personal
//! ones) share one capture there, each a [`Route`] of it. When the connection is lost every capture is stopped (the pods get
//! their traffic back) and the agent connects again with backoff.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::sync::mpsc;
use tpvpn_tunnel::handshake::{ClientHandshake, ClientStep, Hello, INTERCEPT_VERSION};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::quic::{client_config_for, parse_certs, Class, SERVER_NAME};
use tpvpn_tunnel::{Matchers, Message, Role, PROTOCOL_VERSION};
use tracing::{info, warn};

use crate::capture::{self, Node, Request};
use crate::route::Route;
use crate::{Error, Result};

/// How the agent reaches the manager.
#[derive(Debug, Clone)]
pub struct Config {
    pub manager: String,
    pub ca_pem: Vec<u8>,
    pub token: Vec<u8>,
    pub node_name: String,
    pub node: Node,
}

/// Connects, serves, and connects again, until `stop` resolves; then every capture is
/// removed.
pub async fn run(config: Config, stop: impl std::future::Future<Output = ()>) {
    for t in remove_stale(&config).await {
        info!(table = %t, "removed a capture table an earlier agent left");
    }
    let mut captures = Captures::default();
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    loop {
        let served = async {
            match connect(&config).await {
                Ok((conn, control)) => {
                    backoff = Duration::from_millis(200);
                    info!(manager = %config.manager, node = %config.node_name, "connected to the manager");
                    let why = serve(&config, conn, control, &mut captures).await;
                    warn!(%why, "lost the manager; stopping every capture");
                }
                Err(e) => warn!(error = %e, "cannot connect to the manager"),
            }
        };
        tokio::select! {
            _ = served => {}
            _ = &mut stop => break,
        }
        captures.stop_all().await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    captures.stop_all().await;
    // And the replies tables of connections that outlived their captures (they end with
    // the agent).
    remove_stale(&config).await;
    info!("stopped; every capture removed");
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
    let qc = client_config_for(certs[0].clone(), false, Class::Intercepts).map_err(|e| Error::Config(e.to_string()))?;
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        endpoint.connect_with(qc, addr, SERVER_NAME).map_err(|e| Error::Config(e.to_string()))?,
    )
    .await
    .map_err(|_| Error::Manager(format!("no answer from {addr} within 5 s")))??;
    let mut hs = ClientHandshake::new(Hello {
        token: config.token.clone(),
        role: Role::Agent { node: config.node_name.clone() },
        user: String::new(),
        host: config.node_name.clone(),
        client_id: Vec::new(),
        features: 0,
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
        ClientStep::Refused(r) => Err(Error::Manager(match r.code {
            tpvpn_tunnel::ErrorCode::VersionMismatch => hs.upgrade_hint(&r),
            _ => r.message,
        })),
        ClientStep::Retry { version } => Err(Error::Manager(format!(
            "the manager speaks tpvpn protocol v{version}, which has no agents: upgrade the manager"
        ))),
        other => Err(Error::Manager(format!("{other:?}"))),
    }
}

/// A captured pod port: starting (the captures waiting for it), or in place.
enum Port {
    Starting(Vec<(u64, Matchers)>),
    Running(capture::Started),
}

/// A pod port: the pod's IP, the port, and the container (a pod recreated with the same
/// IP is another).
type PortKey = (IpAddr, u16, String);

/// What the agent captures: by pod port, and each capture id's port.
#[derive(Default)]
pub struct Captures {
    ports: HashMap<PortKey, Port>,
    ids: HashMap<u64, PortKey>,
}

impl Captures {
    async fn stop_all(&mut self) {
        self.ids.clear();
        for (_, p) in self.ports.drain() {
            if let Port::Running(s) = p {
                s.capture.stop().await;
            }
        }
    }

    /// Ends capture `id`: its route, and the port's capture once no route is left.
    async fn release(&mut self, id: u64) {
        let Some(key) = self.ids.remove(&id) else { return };
        let emptied = match self.ports.get_mut(&key) {
            Some(Port::Starting(waiting)) => {
                waiting.retain(|(w, _)| *w != id);
                false
            }
            Some(Port::Running(s)) => !s.capture.remove_route(id),
            None => false,
        };
        if emptied {
            if let Some(Port::Running(s)) = self.ports.remove(&key) {
                s.capture.stop().await;
                info!(id, "capture released");
            }
        }
    }
}

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
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<(PortKey, Result<capture::Started>)>();
    loop {
        tokio::select! {
            msg = control.recv() => match msg.unwrap_or(Ok(None)) {
                Ok(Some(Message::Capture { id, pod_namespace, pod_name, pod_ip, port, host_ip, container: _, container_id, matchers })) => {
                    captures.release(id).await;
                    let key = (pod_ip, port, container_id.clone());
                    captures.ids.insert(id, key.clone());
                    match captures.ports.get_mut(&key) {
                        Some(Port::Starting(waiting)) => waiting.push((id, matchers)),
                        Some(Port::Running(s)) => {
                            s.capture.set_route(Route { id, matchers });
                            let _ = status_tx.send(ok_status(id, s));
                        }
                        None => {
                            captures.ports.insert(key.clone(), Port::Starting(vec![(id, matchers)]));
                            let req = Request { id, pod: format!("{pod_namespace}/{pod_name}"), pod_ip, port, host_ip, container_id };
                            let (node, conn, tx) = (config.node.clone(), conn.clone(), started_tx.clone());
                            tokio::spawn(async move {
                                let r = capture::start(&node, conn, req).await;
                                let _ = tx.send((key, r));
                            });
                        }
                    }
                }
                Ok(Some(Message::Release { id })) => captures.release(id).await,
                Ok(Some(other)) => warn!(kind = other.kind(), "unexpected message from the manager"),
                Ok(None) => return "the manager closed the control stream".into(),
                Err(e) => return format!("control stream: {e}"),
            },
            Some((key, result)) = started_rx.recv() => {
                let waiting = match captures.ports.remove(&key) {
                    Some(Port::Starting(w)) => w,
                    _ => Vec::new(),
                };
                match result {
                    // Every capture of the port was released while it started.
                    Ok(s) if waiting.is_empty() => s.capture.stop().await,
                    Ok(s) => {
                        for (id, matchers) in waiting {
                            s.capture.set_route(Route { id, matchers });
                            let _ = status_tx.send(ok_status(id, &s));
                        }
                        captures.ports.insert(key, Port::Running(s));
                    }
                    Err(e) => {
                        warn!(pod_ip = %key.0, port = key.1, error = %e, "cannot capture");
                        for (id, _) in waiting {
                            captures.ids.remove(&id);
                            let _ = status_tx.send(Message::CaptureStatus { id, ok: false, message: e.to_string(), meshed: false, env: vec![] });
                        }
                    }
                }
            }
            _ = &mut writer => return "the control stream failed".into(),
            e = conn.closed() => return format!("connection closed: {e}"),
        }
    }
}
