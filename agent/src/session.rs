//! The agent's connection to the manager: the hello as `Role::Agent`, then `Capture`
//! and `Release` from the manager on the control stream, each answered with a
//! `CaptureStatus`. When the connection is lost every capture is stopped (the pods get
//! their traffic back) and the agent connects again with backoff.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tpvpn_tunnel::handshake::{ClientHandshake, ClientStep, Hello, INTERCEPT_VERSION};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::quic::{client_config, parse_certs, SERVER_NAME};
use tpvpn_tunnel::{Message, Role, PROTOCOL_VERSION};
use tracing::{info, warn};

use crate::capture::{self, Capture, Node, Request};
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
    let removed = {
        let node = config.node.clone();
        tokio::task::spawn_blocking(move || capture::remove_stale(&node)).await.unwrap_or_default()
    };
    for t in removed {
        info!(table = %t, "removed a capture table an earlier agent left");
    }
    let mut captures: HashMap<u64, Capture> = HashMap::new();
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
        release_all(&mut captures).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    release_all(&mut captures).await;
    info!("stopped; every capture removed");
}

async fn release_all(captures: &mut HashMap<u64, Capture>) {
    for (_, c) in captures.drain() {
        c.stop().await;
    }
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
    let qc = client_config(certs[0].clone(), false).map_err(|e| Error::Config(e.to_string()))?;
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

/// Serves one connection until it is lost; why.
async fn serve(
    config: &Config,
    conn: quinn::Connection,
    (mut send, recv): (quinn::SendStream, quinn::RecvStream),
    captures: &mut HashMap<u64, Capture>,
) -> String {
    let mut control = tpvpn_tunnel::io::frames(recv);
    // Statuses are written by one task, in the order they are produced.
    let (status_tx, mut status_rx) = mpsc::unbounded_channel::<Message>();
    let writer = async move {
        while let Some(m) = status_rx.recv().await {
            if write_message(&mut send, &m).await.is_err() {
                return;
            }
        }
    };
    tokio::pin!(writer);
    // Captures start concurrently; their results come back here.
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<(u64, Result<capture::Started>)>();
    // Captures released while they were still starting.
    let mut starting = std::collections::HashSet::new();
    let mut cancelled = std::collections::HashSet::new();
    loop {
        tokio::select! {
            msg = control.recv() => match msg.unwrap_or(Ok(None)) {
                Ok(Some(Message::Capture { id, pod_namespace, pod_name, pod_ip, port, host_ip, container: _, container_id })) => {
                    if let Some(old) = captures.remove(&id) {
                        old.stop().await;
                    }
                    starting.insert(id);
                    cancelled.remove(&id);
                    let req = Request { id, pod: format!("{pod_namespace}/{pod_name}"), pod_ip, port, host_ip, container_id };
                    let (node, conn, tx) = (config.node.clone(), conn.clone(), started_tx.clone());
                    tokio::spawn(async move {
                        let r = capture::start(&node, conn, req).await;
                        let _ = tx.send((id, r));
                    });
                }
                Ok(Some(Message::Release { id })) => {
                    if let Some(c) = captures.remove(&id) {
                        c.stop().await;
                        info!(id, "capture released");
                    } else if starting.contains(&id) {
                        cancelled.insert(id);
                    }
                }
                Ok(Some(other)) => warn!(kind = other.kind(), "unexpected message from the manager"),
                Ok(None) => return "the manager closed the control stream".into(),
                Err(e) => return format!("control stream: {e}"),
            },
            Some((id, result)) = started_rx.recv() => {
                starting.remove(&id);
                let status = match result {
                    Ok(s) if cancelled.remove(&id) => {
                        s.capture.stop().await;
                        Message::CaptureStatus { id, ok: false, message: "released while starting".into(), meshed: false, env: vec![] }
                    }
                    Ok(s) => {
                        let m = Message::CaptureStatus { id, ok: true, message: String::new(), meshed: s.meshed, env: s.env };
                        captures.insert(id, s.capture);
                        m
                    }
                    Err(e) => {
                        warn!(id, error = %e, "cannot capture");
                        Message::CaptureStatus { id, ok: false, message: e.to_string(), meshed: false, env: vec![] }
                    }
                };
                let _ = status_tx.send(status);
            }
            _ = &mut writer => return "the control stream failed".into(),
            e = conn.closed() => return format!("connection closed: {e}"),
        }
    }
}
