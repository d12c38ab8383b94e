//! Finding and authenticating to the manager through the Kubernetes API.
//!
//! Credentials: where the manager signs client certificates (ConfigMap `tpvpn-trust`
//! names a client CA), its certificate from that map and a client certificate of the
//! laptop's own ([`crate::cluster::certificate`]); otherwise Secret `tpvpn-client` (`ca.crt`,
//! `token`) in the manager's namespace. The manager's address, first that applies: `--manager`; the kubeconfig
//! extension's `manager-address`; the LoadBalancer ingress of Service `tpvpn-manager`
//! (port `quic`); that Service's NodePort on the API server's host. Without one, the
//! manager is reached through the API server's port-forward ([`crate::cluster::portforward`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::Api;
use kube::config::KubeConfigOptions;

use crate::cluster::certificate::{self, Issued};
use crate::cluster::kubeconfig::Resolved;
use crate::cluster::portforward::{PortForward, MANAGER_SERVICE};
use crate::connect::{Target, Transport};
use crate::Error;

/// Name of the Secret holding the shared client token (managers in `--auth token`).
pub const CLIENT_SECRET: &str = "tpvpn-client";
/// The manager's public ConfigMap: its certificate and, when it signs laptops'
/// certificates, the client CA (the manager's `auth::csr` writes it).
pub const TRUST_CONFIGMAP: &str = "tpvpn-trust";
const TRUST_SERVER_CA: &str = "ca.crt";
const TRUST_CLIENT_CA: &str = "client-ca.crt";
/// Default namespace of the manager.
pub const MANAGER_NAMESPACE: &str = "tpvpn";
/// Time allowed for each API request.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// What discovery found.
#[derive(Debug, Clone)]
pub struct Discovered {
    pub target: Target,
    /// Addresses of the API server, never routed into the tunnel.
    pub api_server_ips: Vec<IpAddr>,
}

/// Host and port of an API server URL.
pub fn server_host_port(server: &str) -> Result<(String, u16), Error> {
    let uri: http::Uri =
        server.parse().map_err(|e| Error::Config(format!("the kubeconfig's server `{server}` is not a URL: {e}")))?;
    let host = uri.host().ok_or_else(|| Error::Config(format!("the kubeconfig's server `{server}` has no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
    Ok((host, port))
}

fn api_error(e: kube::Error, what: &str, r: &Resolved) -> Error {
    match e {
        kube::Error::Api(s) if s.code == 403 => Error::Kubernetes(format!(
            "context `{}` may not read {what}: {}; ask a cluster admin for access (the role tpvpn-client grants it)",
            r.context, s.message
        )),
        kube::Error::Api(s) if s.code == 401 => Error::Kubernetes(format!(
            "the API server {} refused the credentials of context `{}`: {}; log in again (check with kubectl get ns)",
            r.server, r.context, s.message
        )),
        kube::Error::Api(s) if s.code == 404 => Error::Kubernetes(format!(
            "{what} not found in context `{}`: is the manager installed? install it: tpvpn manager install",
            r.context
        )),
        kube::Error::Api(s) => Error::Kubernetes(format!("reading {what}: {} ({})", s.message, s.code)),
        other => {
            Error::Kubernetes(format!("cannot reach the API server {} of context `{}`: {other}", r.server, r.context))
        }
    }
}

async fn timed<T>(what: &str, r: &Resolved, f: impl std::future::Future<Output = kube::Result<T>>) -> Result<T, Error> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(api_error(e, what, r)),
        Err(_) => Err(Error::Kubernetes(format!(
            "the API server {} of context `{}` did not answer within {}s",
            r.server,
            r.context,
            API_TIMEOUT.as_secs()
        ))),
    }
}

/// A Kubernetes client for the resolved context.
pub async fn client(r: &Resolved) -> Result<kube::Client, Error> {
    let options = KubeConfigOptions { context: Some(r.context.clone()), ..Default::default() };
    let mut kubeconfig = r.kubeconfig.clone();
    crate::os::user::plugins_as_invoking_user(&mut kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| Error::Config(format!("context `{}`: {e}", r.context)))?;
    let client = if config.proxy_url.is_some() { kube::Client::try_from(config) } else { client_nodelay(config) };
    client.map_err(|e| Error::Config(format!("context `{}`: {e}", r.context)))
}

/// kube's client stack (base URI, authentication, extra headers, TLS) on a connector
/// with TCP_NODELAY, which kube's own builder leaves off: the port-forward carries QUIC,
/// whose small packets Nagle would hold behind the API server's delayed ACKs (a new
/// connection through the tunnel took 44 ms instead of ~0.3 ms). Proxied configurations
/// keep kube's own builder. (Go's net package, kubectl's, turns Nagle off by default.)
pub fn client_nodelay(config: kube::Config) -> kube::Result<kube::Client> {
    use kube::client::ConfigExt;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http)?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// Finds the manager and its credentials.
pub async fn discover(
    r: &Resolved,
    manager_flag: Option<String>,
    namespace: &str,
    transport: Transport,
    keep: Option<&Arc<Issued>>,
) -> Result<Discovered, Error> {
    let client = client(r).await?;
    let credentials = match trusted(&client, r, namespace).await? {
        Some(ca_pem) => {
            // The manager signs client certificates: a fresh one unless `keep` still is.
            let issued = match keep.filter(|c| c.fresh(SystemTime::now())) {
                Some(c) => c.clone(),
                None => certificate::request(&client, &r.context).await?,
            };
            let source = format!(
                "the certificate of {} from signer {} (context `{}`)",
                issued.user,
                certificate::SIGNER_NAME,
                r.context
            );
            let ca_source = format!("ConfigMap {namespace}/{TRUST_CONFIGMAP} (context `{}`)", r.context);
            (ca_pem, ca_source, Vec::new(), source, Some(issued))
        }
        None => {
            let secret_name = format!("Secret {namespace}/{CLIENT_SECRET}");
            let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let secret = timed(&secret_name, r, secrets.get(CLIENT_SECRET)).await?;
            let data = secret.data.unwrap_or_default();
            let field = |key: &str| {
                data.get(key).map(|b| b.0.clone()).filter(|b| !b.is_empty()).ok_or_else(|| {
                    Error::Kubernetes(format!(
                        "{secret_name} has no `{key}`; reinstall the manager: tpvpn manager install"
                    ))
                })
            };
            let token = String::from_utf8_lossy(&field("token")?).trim().as_bytes().to_vec();
            let source = format!("{secret_name} (context `{}`)", r.context);
            (field("ca.crt")?, source.clone(), token, source, None)
        }
    };
    let (ca_pem, ca_source, token, token_source, certificate) = credentials;

    let (api_host, api_port) = server_host_port(&r.server)?;
    let api_server_ips: Vec<IpAddr> = tokio::net::lookup_host((api_host.as_str(), api_port))
        .await
        .map_err(|e| Error::Kubernetes(format!("cannot resolve the API server host {api_host}: {e}")))?
        .map(|a| a.ip())
        .collect();

    // No address (no LoadBalancer, no NodePort) is fine where the port-forward is used.
    let manager = match manager_flag.or_else(|| r.extension.manager_address.clone()) {
        Some(m) => Some(m),
        None if transport == Transport::Portforward => None,
        None => {
            let services: Api<Service> = Api::namespaced(client.clone(), namespace);
            let what = format!("Service {namespace}/{MANAGER_SERVICE}");
            let svc = timed(&what, r, services.get(MANAGER_SERVICE)).await?;
            manager_address(&svc, &api_host)
        }
    };
    let portforward =
        PortForward { client, namespace: namespace.to_string(), context: r.context.clone(), server: r.server.clone() };
    Ok(Discovered {
        target: Target {
            manager,
            transport,
            portforward: Some(portforward),
            ca_pem,
            ca_source,
            token,
            token_source,
            certificate,
            identity: Default::default(),
        },
        api_server_ips,
    })
}

/// The manager's certificate from ConfigMap [`TRUST_CONFIGMAP`], when the manager signs
/// client certificates (the map names a client CA). `None` otherwise: a manager in
/// `--auth token` or older than certificates, or a context that may not read the map
/// (a 403 for a map that is absent, too): the shared token of Secret `tpvpn-client` then.
async fn trusted(client: &kube::Client, r: &Resolved, namespace: &str) -> Result<Option<Vec<u8>>, Error> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let what = format!("ConfigMap {namespace}/{TRUST_CONFIGMAP}");
    let map = timed(&what, r, async {
        match maps.get_opt(TRUST_CONFIGMAP).await {
            Err(kube::Error::Api(s)) if s.code == 403 => Ok(None),
            other => other,
        }
    })
    .await?;
    let data = map.and_then(|m| m.data).unwrap_or_default();
    let present = |k: &str| data.get(k).filter(|v| !v.trim().is_empty());
    Ok(present(TRUST_CLIENT_CA).and(present(TRUST_SERVER_CA)).map(|ca| ca.as_bytes().to_vec()))
}

/// The manager's address from its Service: LoadBalancer ingress with the `quic` port,
/// else the `quic` NodePort on the API server's host.
pub fn manager_address(svc: &Service, api_host: &str) -> Option<String> {
    let spec = svc.spec.as_ref()?;
    let port = spec.ports.as_ref()?.iter().find(|p| p.name.as_deref() == Some("quic"))?;
    let join = |host: &str, port: i32| {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    };
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    if let Some(first) = ingress.and_then(|i| i.first()) {
        if let Some(host) = first.ip.as_deref().or(first.hostname.as_deref()) {
            return Some(join(host, port.port));
        }
    }
    port.node_port.map(|np| join(api_host, np))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(json: serde_json::Value) -> Service {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn manager_address_prefers_load_balancer_then_node_port() {
        let spec = serde_json::json!({"type": "LoadBalancer", "ports": [
            {"name": "metrics", "port": 9090},
            {"name": "quic", "port": 4443, "protocol": "UDP", "nodePort": 30443}]});
        let lb =
            svc(serde_json::json!({"spec": spec, "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}}));
        assert_eq!(manager_address(&lb, "api.example").as_deref(), Some("203.0.113.7:4443"));
        let np = svc(serde_json::json!({"spec": spec}));
        assert_eq!(manager_address(&np, "api.example").as_deref(), Some("api.example:30443"));
        assert_eq!(manager_address(&np, "fd00::1").as_deref(), Some("[fd00::1]:30443"));
        let none = svc(serde_json::json!({"spec": {"ports": [{"name": "quic", "port": 4443}]}}));
        assert_eq!(manager_address(&none, "h"), None);
    }

    fn resolved() -> Resolved {
        Resolved {
            files: vec![],
            context: "prod".into(),
            cluster: "prod".into(),
            server: "https://10.0.0.1:6443".into(),
            namespace: None,
            extension: Default::default(),
            kubeconfig: Default::default(),
        }
    }

    /// A Status body as the API server sends it (recorded from a real cluster's answers).
    fn status(json: serde_json::Value) -> kube::Error {
        kube::Error::Api(Box::new(serde_json::from_value(json).unwrap()))
    }

    #[test]
    fn recorded_api_errors_become_one_line_advice() {
        let forbidden = status(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "secrets \"tpvpn-client\" is forbidden: User \"alice\" cannot get resource \"secrets\" in API group \"\" in the namespace \"tpvpn\"",
            "reason": "Forbidden", "details": {"name": "tpvpn-client", "kind": "secrets"}, "code": 403}));
        let e = api_error(forbidden, "Secret tpvpn/tpvpn-client", &resolved()).to_string();
        assert!(e.starts_with("context `prod` may not read Secret tpvpn/tpvpn-client"), "{e}");
        assert!(e.contains("User \"alice\" cannot get") && e.contains("tpvpn-client"), "{e}");

        let missing = status(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "services \"tpvpn-manager\" not found", "reason": "NotFound",
            "details": {"name": "tpvpn-manager", "kind": "services"}, "code": 404}));
        let e = api_error(missing, "Service tpvpn/tpvpn-manager", &resolved()).to_string();
        assert!(e.contains("Service tpvpn/tpvpn-manager not found") && e.contains("tpvpn manager install"), "{e}");

        let unauthorized = status(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Unauthorized", "reason": "Unauthorized", "code": 401}));
        let e = api_error(unauthorized, "Secret tpvpn/tpvpn-client", &resolved()).to_string();
        assert!(e.contains("refused the credentials of context `prod`") && e.contains("log in again"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn server_urls() {
        assert_eq!(server_host_port("https://10.0.0.1:6443").unwrap(), ("10.0.0.1".into(), 6443));
        assert_eq!(server_host_port("http://10.250.1.1:6443").unwrap(), ("10.250.1.1".into(), 6443));
        assert_eq!(server_host_port("https://[fd00::1]").unwrap(), ("fd00::1".into(), 443));
        assert!(server_host_port("not a url").is_err());
    }
}
