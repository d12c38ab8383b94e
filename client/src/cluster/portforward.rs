//! Reaching the manager through the Kubernetes API server when its UDP port cannot be
//! reached: `pods/portforward` on a Ready pod of Service `tpvpn-manager` (its selector),
//! to the pod port that the Service's `tunnel` port targets, over WebSocket (kube's
//! upgrade, the channels framed here). The byte stream it gives carries QUIC
//! ([`tpvpn_tunnel::stream`]); everything above is the same connection as over UDP.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use kube::core::Resource;

use crate::Error;

/// Name of the manager's Service (and Deployment), which this transport reaches.
pub const MANAGER_SERVICE: &str = "tpvpn-manager";
/// Name of the manager Service's (and container's) port for QUIC over TCP.
pub const TUNNEL_PORT: &str = "tunnel";
/// Time allowed for each API request, the port-forward's upgrade included.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// How to open a port-forward to the manager (kubeconfig mode).
#[derive(Clone)]
pub struct PortForward {
    pub client: kube::Client,
    /// The manager's namespace.
    pub namespace: String,
    /// For messages: the context and its API server.
    pub context: String,
    pub server: String,
}

impl std::fmt::Debug for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortForward")
            .field("namespace", &self.namespace)
            .field("context", &self.context)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// An open port-forward: the byte stream to the manager's `tunnel` port, the pod, and
/// the message the API server sends if forwarding fails (say, nothing listens there).
pub struct Forwarded {
    pub stream: tokio::io::DuplexStream,
    /// `namespace/name` of the manager pod.
    pub pod: String,
    pub port: u16,
    pub error: std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>>,
}

impl PortForward {
    async fn timed<T>(&self, what: &str, f: impl std::future::Future<Output = kube::Result<T>>) -> Result<T, Error> {
        match tokio::time::timeout(API_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.api_error(e, what)),
            Err(_) => Err(Error::Kubernetes(format!(
                "the API server {} of context `{}` did not answer within {}s ({what})",
                self.server,
                self.context,
                API_TIMEOUT.as_secs()
            ))),
        }
    }

    fn api_error(&self, e: kube::Error, what: &str) -> Error {
        let ctx = &self.context;
        match e {
            kube::Error::Api(s) if s.code == 403 => Error::Kubernetes(format!(
                "context `{ctx}` may not {what}: {}; ask a cluster admin for the role tpvpn-client (it grants get/list pods and create pods/portforward in namespace {}), or use --transport quic where the manager's UDP port is reachable",
                s.message, self.namespace
            )),
            kube::Error::Api(s) if s.code == 401 => Error::Kubernetes(format!(
                "the API server {} refused the credentials of context `{ctx}`: {}; log in again (check with kubectl get ns)",
                self.server, s.message
            )),
            kube::Error::Api(s) if s.code == 404 => Error::Kubernetes(format!(
                "{what}: {} in context `{ctx}`; is the manager installed? tpvpn manager install",
                s.message
            )),
            kube::Error::Api(s) => Error::Kubernetes(format!("{what}: {} ({})", s.message, s.code)),
            other => Error::Kubernetes(format!(
                "cannot {what} through the API server {} of context `{ctx}`: {other}",
                self.server
            )),
        }
    }

    /// Finds a Ready manager pod and opens a port-forward to its `tunnel` port.
    pub async fn open(&self) -> Result<Forwarded, Error> {
        let ns = &self.namespace;
        let services: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let svc = self.timed(&format!("read Service {ns}/{MANAGER_SERVICE}"), services.get(MANAGER_SERVICE)).await?;
        let (selector, target) = tunnel_target(&svc).ok_or_else(|| {
            Error::Kubernetes(format!(
                "Service {ns}/{MANAGER_SERVICE} has no selector or no port `{TUNNEL_PORT}`: reinstall the manager (tpvpn manager install) to reach it through the API server"
            ))
        })?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let list = self
            .timed(&format!("list pods in namespace {ns}"), pods.list(&ListParams::default().labels(&selector)))
            .await?;
        let (pod, port) = list
            .items
            .iter()
            .filter(|p| is_ready(p))
            .find_map(|p| Some((p.metadata.name.clone()?, pod_port(p, &target)?)))
            .ok_or_else(|| {
                Error::Kubernetes(format!(
                    "no Ready pod of Service {ns}/{MANAGER_SERVICE} (selector {selector}) has the port `{TUNNEL_PORT}`: is the manager running? kubectl -n {ns} get pods -l {selector}"
                ))
            })?;
        let req = kube::core::Request::new(Pod::url_path(&(), Some(ns)))
            .portforward(&pod, &[port])
            .map_err(|e| Error::Kubernetes(format!("a port-forward request for pod {ns}/{pod}: {e}")))?;
        let what = format!("port-forward to pod {ns}/{pod} (pods/portforward)");
        let ws = self.timed(&what, self.client.connect(req)).await?.into_stream();
        let (stream, theirs) = tokio::io::duplex(1 << 20);
        let (said, error) = tokio::sync::oneshot::channel();
        tokio::spawn(carry(ws, theirs, port, said));
        let error = async move { error.await.ok() };
        Ok(Forwarded { stream, pod: format!("{ns}/{pod}"), port, error: Box::pin(error) })
    }
}

/// Carries `io` over the port-forward's WebSocket (one port: data on channel 0, errors
/// on channel 1, each first sent the port number) until either side ends. Toward the
/// pod each message carries up to 64 KiB (kube's own forwarder sends 4 KiB per message,
/// which held the upload rate down); the first error message goes to `said`.
async fn carry<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    io: tokio::io::DuplexStream,
    port: u16,
    said: tokio::sync::oneshot::Sender<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut sink, mut from_ws) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(io);
    let to_pod = async {
        let mut buf = vec![0u8; 1 + 64 * 1024];
        loop {
            let n = rd.read(&mut buf[1..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            // buf[0] is channel 0, the port's data.
            sink.send(Message::binary(buf[..1 + n].to_vec())).await.map_err(|e| e.to_string())?;
        }
        sink.close().await.map_err(|e| e.to_string())
    };
    let from_pod = async {
        let (mut channels, mut said) = (Channels::new(port), Some(said));
        while let Some(msg) = from_ws.next().await {
            let Message::Binary(b) = msg.map_err(|e| e.to_string())? else { continue };
            match channels.on_message(&b)? {
                FromPod::Data(data) => wr.write_all(data).await.map_err(|e| e.to_string())?,
                FromPod::Error(text) => {
                    if let Some(s) = said.take() {
                        let _ = s.send(String::from_utf8_lossy(text).into_owned());
                    }
                }
                FromPod::Nothing => {}
            }
        }
        wr.shutdown().await.map_err(|e| e.to_string())
    };
    // Either side ending ends both: dropping `io` ends the stream the QUIC side reads.
    let ended = tokio::select! {
        r = to_pod => r,
        r = from_pod => r,
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "the port-forward ended");
    }
}

/// What one binary message from the API server carries for the port (sans-IO).
#[derive(Debug, PartialEq, Eq)]
pub enum FromPod<'a> {
    /// Bytes from the pod's port (channel 0).
    Data(&'a [u8]),
    /// The error channel's text (channel 1): forwarding failed.
    Error(&'a [u8]),
    /// A channel's opening port number, or an empty message.
    Nothing,
}

/// The API server's side of one forwarded port (`v4.channel.k8s.io`): each message is a
/// channel byte and its data, channel 0 the port's data and channel 1 its errors, each
/// channel's first message the port number (two bytes, little-endian) and nothing else.
#[derive(Debug)]
pub struct Channels {
    port: u16,
    started: [bool; 2],
}

impl Channels {
    pub fn new(port: u16) -> Channels {
        Channels { port, started: [false; 2] }
    }

    /// Takes one message; an error ends the port-forward (a channel of no port of ours,
    /// or an opening that names another port).
    pub fn on_message<'a>(&mut self, msg: &'a [u8]) -> Result<FromPod<'a>, String> {
        let Some((&ch, data)) = msg.split_first() else { return Ok(FromPod::Nothing) };
        let port = self.port;
        let Some(started) = self.started.get_mut(usize::from(ch)) else {
            return Err(format!("the API server used channel {ch}, not one of port {port}'s"));
        };
        if !std::mem::replace(started, true) {
            return if data == port.to_le_bytes() {
                Ok(FromPod::Nothing)
            } else {
                Err(format!("the API server's first frame on channel {ch} does not name port {port}"))
            };
        }
        Ok(if ch == 0 { FromPod::Data(data) } else { FromPod::Error(data) })
    }
}

/// What the Service's `tunnel` port targets: a number, or a container port's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// The Service's selector (as a label selector string) and its `tunnel` port's target.
pub fn tunnel_target(svc: &Service) -> Option<(String, TargetPort)> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let spec = svc.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let mut pairs: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    let port = spec.ports.as_ref()?.iter().find(|p| p.name.as_deref() == Some(TUNNEL_PORT))?;
    let target = match &port.target_port {
        None => TargetPort::Number(u16::try_from(port.port).ok()?),
        Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
        Some(IntOrString::String(s)) => match s.parse::<u16>() {
            Ok(n) => TargetPort::Number(n),
            Err(_) => TargetPort::Name(s.clone()),
        },
    };
    Some((pairs.join(","), target))
}

/// Whether the pod is Running, Ready and not being deleted.
pub fn is_ready(p: &Pod) -> bool {
    if p.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = &p.status else { return false };
    status.phase.as_deref() == Some("Running")
        && status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The pod's port for `target`: the number, or the TCP container port of that name.
pub fn pod_port(p: &Pod, target: &TargetPort) -> Option<u16> {
    match target {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => {
            p.spec.as_ref()?.containers.iter().flat_map(|c| c.ports.iter().flatten()).find_map(|cp| {
                let tcp = cp.protocol.as_deref().unwrap_or("TCP") == "TCP";
                (tcp && cp.name.as_deref() == Some(name.as_str()))
                    .then(|| u16::try_from(cp.container_port).ok())
                    .flatten()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn channels_open_with_the_port_then_carry_data_and_errors() {
        let mut c = Channels::new(8443);
        let opening = [0, 0xfb, 0x20];
        assert_eq!(c.on_message(&opening), Ok(FromPod::Nothing));
        assert_eq!(c.on_message(&[0, 1, 2, 3]), Ok(FromPod::Data(&[1, 2, 3][..])));
        assert_eq!(c.on_message(&[0, 0xfb, 0x20]), Ok(FromPod::Data(&[0xfb, 0x20][..])), "only the first opens");
        assert_eq!(c.on_message(&[]), Ok(FromPod::Nothing));
        assert_eq!(c.on_message(&[1, 0xfb, 0x20]), Ok(FromPod::Nothing));
        assert_eq!(c.on_message(b"\x01refused"), Ok(FromPod::Error(&b"refused"[..])));
        assert!(c.on_message(&[2, 0]).unwrap_err().contains("channel 2"));
        // An opening naming another port, or carrying more than the port.
        assert!(Channels::new(8443).on_message(&[0, 0x50, 0]).unwrap_err().contains("port 8443"));
        assert!(Channels::new(8443).on_message(&[0, 0xfb, 0x20, 9]).is_err());
    }

    #[test]
    fn the_tunnel_port_and_selector_of_the_service() {
        let s = svc(serde_json::json!({"spec": {"selector": {"app": "tpvpn-manager", "tier": "x"}, "ports": [
            {"name": "quic", "port": 4443, "protocol": "UDP"},
            {"name": "tunnel", "port": 4443, "protocol": "TCP", "targetPort": "tunnel"}]}}));
        assert_eq!(tunnel_target(&s), Some(("app=tpvpn-manager,tier=x".into(), TargetPort::Name("tunnel".into()))));
        let n = svc(serde_json::json!({"spec": {"selector": {"app": "m"}, "ports": [
            {"name": "tunnel", "port": 443, "targetPort": 8443}]}}));
        assert_eq!(tunnel_target(&n), Some(("app=m".into(), TargetPort::Number(8443))));
        let same =
            svc(serde_json::json!({"spec": {"selector": {"app": "m"}, "ports": [{"name": "tunnel", "port": 443}]}}));
        assert_eq!(tunnel_target(&same).unwrap().1, TargetPort::Number(443));
        // An older install: no `tunnel` port, or no selector.
        let old =
            svc(serde_json::json!({"spec": {"selector": {"app": "m"}, "ports": [{"name": "quic", "port": 4443}]}}));
        assert_eq!(tunnel_target(&old), None);
        let headless = svc(serde_json::json!({"spec": {"ports": [{"name": "tunnel", "port": 4443}]}}));
        assert_eq!(tunnel_target(&headless), None);
    }

    #[test]
    fn ready_pods_and_named_ports() {
        let ready = pod(serde_json::json!({"metadata": {"name": "m-0"},
            "spec": {"containers": [{"name": "manager", "ports": [
                {"name": "quic", "containerPort": 4443, "protocol": "UDP"},
                {"name": "tunnel", "containerPort": 4443, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}));
        assert!(is_ready(&ready));
        assert_eq!(pod_port(&ready, &TargetPort::Name("tunnel".into())), Some(4443));
        assert_eq!(pod_port(&ready, &TargetPort::Name("quic".into())), None, "a UDP port is not a TCP target");
        assert_eq!(pod_port(&ready, &TargetPort::Number(9)), Some(9));
        let starting = pod(serde_json::json!({"metadata": {"name": "m-1"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}}));
        assert!(!is_ready(&starting));
        let deleting =
            pod(serde_json::json!({"metadata": {"name": "m-2", "deletionTimestamp": "2026-12-01T00:00:00Z"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}));
        assert!(!is_ready(&deleting));
        assert!(!is_ready(&pod(serde_json::json!({"metadata": {"name": "m-3"}}))));
    }
}
