//! `pods/{name}/portforward` as the API server and the kubelet serve it over WebSocket
//! (the stand-in plays both: the lab has no kubelet).
//!
//! Kept from the real thing: `GET` with an HTTP/1.1 upgrade to WebSocket, `ports=`
//! (comma-separated, or repeated), the `v4.channel.k8s.io` binary subprotocol (the one
//! the kubelet's WebSocket port-forward speaks; kube offers `v5` first and gets `v4`),
//! two channels per port (data `2i`, error `2i+1`), each first sent the port number
//! (2 bytes, little-endian), every message one channel byte and the payload. The
//! connection to the pod's port is made as the kubelet would make it from inside the
//! pod's network namespace; here, from the cluster namespace to the pod IP (the pods'
//! addresses are all reachable there). When nothing listens, the error channel carries
//! the kubelet's message and the WebSocket closes. RBAC: `create` on `pods/portforward`.
//! Not kept: SPDY, the v4 base64 variant, v5's half-close, port-forward through a
//! WebSocket-tunnelled SPDY (`portforward.k8s.io`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::*;

/// The subprotocol served.
pub const PORTFORWARD_PROTOCOL: &str = "v4.channel.k8s.io";
/// Dialing the pod's port may take this long.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the pod per WebSocket message, at most.
const CHUNK: usize = 64 * 1024;

/// `(namespace, pod)` of a `/api/v1/namespaces/{ns}/pods/{name}/portforward` path.
pub(super) fn portforward_path(path: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs[..] {
        ["api", "v1", "namespaces", ns, "pods", name, "portforward"] if !ns.is_empty() && !name.is_empty() => {
            Some((pct_decode(ns, false), pct_decode(name, false)))
        }
        _ => None,
    }
}

impl ApiServer {
    /// Serves one port-forward request: checks, the 101 answer, then the channels.
    pub(super) async fn portforward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        ns: String,
        pod: String,
    ) -> Response<Body> {
        match self.portforward_checks(&req, &ns, &pod) {
            Err(e) => error_response(&e),
            Ok((ports, ip, key)) => {
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    match upgrade.await {
                        Ok(upgraded) => {
                            let io = hyper_util::rt::TokioIo::new(upgraded);
                            let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                            forward(ws, ip, ports, &pod).await;
                        }
                        Err(e) => eprintln!("apiserver: portforward upgrade: {e}"),
                    }
                });
                let mut resp = Response::new(Full::new(Bytes::new()).boxed());
                *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let h = resp.headers_mut();
                h.insert(UPGRADE, HeaderValue::from_static("websocket"));
                h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
                h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(PORTFORWARD_PROTOCOL));
                if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
                    h.insert(SEC_WEBSOCKET_ACCEPT, v);
                }
                resp
            }
        }
    }

    /// What the API server checks before it upgrades: the user, the verb, the pod, the
    /// ports, the WebSocket request. The ports, the pod's IP and the WebSocket key.
    fn portforward_checks(
        &self,
        req: &Request<Incoming>,
        ns: &str,
        pod: &str,
    ) -> Result<(Vec<u16>, IpAddr, String), ApiError> {
        let user =
            self.authenticate(req.headers()).ok_or_else(|| ApiError::new(401, "Unauthorized", "Unauthorized"))?;
        let attrs = Attributes {
            verb: "create",
            group: "",
            resource: "pods/portforward".into(),
            namespace: Some(ns),
            name: Some(pod),
        };
        match &user {
            User::NoPortforward => {
                let msg = format!(
                    "pods \"{pod}\" is forbidden: User \"{NO_PORTFORWARD_USER}\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"{ns}\""
                );
                let mut e = ApiError::new(403, "Forbidden", msg);
                e.details = Some(serde_json::json!({"name": pod, "kind": "pods"}));
                return Err(e);
            }
            User::Rbac(u) if !self.store().authorize(u, &attrs) => return Err(rbac_forbidden(u, &attrs)),
            _ => {}
        }
        if req.method() != Method::GET && req.method() != Method::POST {
            return Err(ApiError::method_not_allowed());
        }
        let obj = self.store().get(Resource::Pods, Some(ns), pod)?;
        let query = parse_query_pairs(req.uri().query().unwrap_or(""));
        let mut ports = Vec::new();
        for v in query.iter().filter(|(k, _)| k == "ports").map(|(_, v)| v) {
            for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match p.parse::<u16>() {
                    Ok(n) if n > 0 => ports.push(n),
                    _ => return Err(ApiError::bad_request(format!("invalid port {p:?}: must be between 1 and 65535"))),
                }
            }
        }
        if ports.is_empty() {
            return Err(ApiError::bad_request("query parameter \"ports\" is required"));
        }
        // Two channels per port, numbered by one byte.
        if ports.len() > 127 {
            return Err(ApiError::bad_request(format!("{} ports: at most 127 fit the channel numbers", ports.len())));
        }
        if obj["status"]["phase"] != "Running" {
            return Err(ApiError::bad_request(format!("pod {pod} is not running (phase {})", obj["status"]["phase"])));
        }
        let ip: IpAddr = obj["status"]["podIP"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::bad_request(format!("pod {pod} has no IP")))?;
        let h = req.headers();
        let upgrade = h.get(UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let key = h.get(SEC_WEBSOCKET_KEY).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (true, Some(key)) = (upgrade, key) else {
            return Err(ApiError::bad_request(
                "Upgrade request required (the stand-in serves port-forward over WebSocket only, not SPDY)",
            ));
        };
        let offered: Vec<String> = h
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .collect();
        if !offered.iter().any(|p| p == PORTFORWARD_PROTOCOL) {
            return Err(ApiError::bad_request(format!(
                "none of the offered WebSocket subprotocols {offered:?} is supported; the stand-in speaks {PORTFORWARD_PROTOCOL}"
            )));
        }
        Ok((ports, ip, key))
    }
}

fn frame(channel: u8, payload: &[u8]) -> Message {
    let mut v = Vec::with_capacity(payload.len() + 1);
    v.push(channel);
    v.extend_from_slice(payload);
    Message::binary(v)
}

/// The kubelet's part: dial each port, send the initial frames, relay until either side ends.
async fn forward<S>(ws: WebSocketStream<S>, ip: IpAddr, ports: Vec<u16>, pod: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        let ch = (2 * i) as u8;
        for c in [ch, ch + 1] {
            if sink.send(frame(c, &port.to_le_bytes())).await.is_err() {
                return;
            }
        }
    }
    let mut writers = Vec::new();
    let (to_ws, mut from_pods) = tokio::sync::mpsc::channel::<Message>(16);
    for (i, port) in ports.iter().copied().enumerate() {
        let ch = (2 * i) as u8;
        let addr = SocketAddr::new(ip, port);
        let dialed = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
        let sock = match dialed {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let family = if ip.is_ipv4() { "tcp4" } else { "tcp6" };
                let msg = format!(
                    "an error occurred forwarding {port} -> {port}: error forwarding port {port} to pod {pod}, uid : failed to connect to {addr} inside the pod's network namespace: dial {family} {addr}: connect: {}",
                    error_text(&e)
                );
                let _ = sink.send(frame(ch + 1, msg.as_bytes())).await;
                let _ = sink.close().await;
                return;
            }
            Err(_) => {
                let msg = format!("an error occurred forwarding {port} -> {port}: dial {addr}: i/o timeout");
                let _ = sink.send(frame(ch + 1, msg.as_bytes())).await;
                let _ = sink.close().await;
                return;
            }
        };
        let _ = sock.set_nodelay(true);
        let (mut r, w) = sock.into_split();
        writers.push(w);
        let to_ws = to_ws.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_ws.send(frame(ch, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // v4 has no half-close: the pod's side ending ends the forward.
            let _ = to_ws.send(Message::Close(None)).await;
        });
    }
    drop(to_ws);
    let sender = tokio::spawn(async move {
        while let Some(m) = from_pods.recv().await {
            let close = m.is_close();
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
        let _ = sink.close().await;
    });
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Binary(b) if b.len() > 1 => {
                let ch = usize::from(b[0]);
                // Data for port i on channel 2i; anything on an error channel is ignored.
                if ch % 2 == 0 {
                    if let Some(w) = writers.get_mut(ch / 2) {
                        if w.write_all(&b[1..]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    for mut w in writers {
        let _ = w.shutdown().await;
    }
    sender.abort();
}

/// The words Go's net package uses for the common dial errors.
fn error_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::TimedOut => "connection timed out".into(),
        _ => e.to_string(),
    }
}
