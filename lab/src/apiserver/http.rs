//! HTTP/1.1 (hyper): routes, authentication, discovery, lists, watches (chunked
//! JSON events), and the stand-in's own endpoints.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::*;

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bearer token allowed everything.
    pub admin_token: String,
    /// Bearer token allowed everything but `secrets` (403 there).
    pub no_secrets_token: Option<String>,
    /// Bearer token allowed everything but `pods/portforward` (403 there).
    pub no_portforward_token: Option<String>,
    /// Users of a token file, allowed what RBAC grants them ([`rbac`]).
    pub users: Vec<TokenUser>,
    /// Interval of watch bookmarks (when the client allows them).
    pub bookmark_interval: Duration,
}

/// Who a request authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum User {
    Admin,
    NoSecrets,
    NoPortforward,
    /// A user of the token file: RBAC decides.
    Rbac(UserInfo),
}

/// The running stand-in: store, change notifications, configuration.
#[derive(Debug)]
pub struct ApiServer {
    pub(super) store: Mutex<Store>,
    /// Carries the latest resourceVersion; watchers wake up on changes.
    pub(super) changed: watch::Sender<u64>,
    pub(super) cfg: Config,
    pub(super) listen: String,
    /// The ServiceAccount tokens issued ([`tokens`]).
    pub(super) issued: Mutex<Vec<Issued>>,
}

pub(super) type Body = BoxBody<Bytes, Infallible>;

/// An HTTPS listener beside the plain one: what clients that send credentials only over
/// TLS (kubectl, client-go) need. HTTP/1.1 only (ALPN `http/1.1`), as a real API server
/// with HTTP/2 off.
#[derive(Debug, Clone)]
pub struct Tls {
    pub listen: SocketAddr,
    /// PEM files of the serving certificate (chain) and its key.
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl Tls {
    fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("read {}", self.cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(&self.key).with_context(|| format!("read {}", self.key.display()))?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Runs the stand-in on `listen` (and, HTTPS, on `tls`) with the objects of the JSON array
/// in `fixtures`, until killed.
pub fn run(listen: SocketAddr, tls: Option<Tls>, fixtures: &Path, cfg: Config) -> Result<()> {
    let text = std::fs::read_to_string(fixtures).with_context(|| format!("read {}", fixtures.display()))?;
    let objects: Vec<Value> = serde_json::from_str(&text).with_context(|| format!("parse {}", fixtures.display()))?;
    let mut store = Store::default();
    store.load(objects)?;
    if cfg.admin_token.is_empty() {
        bail!("the admin token must not be empty");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
        let srv = ApiServer::new(store, cfg, listen.to_string());
        if let Some(tls) = tls {
            let acceptor = tls.acceptor()?;
            let secure = TcpListener::bind(tls.listen).await.with_context(|| format!("bind {}", tls.listen))?;
            eprintln!("tpvpn-lab apiserver (stand-in): ready on https://{}", tls.listen);
            tokio::spawn(srv.clone().serve_tls(secure, acceptor));
        }
        eprintln!("tpvpn-lab apiserver (stand-in): ready on http://{listen}");
        srv.serve(listener).await;
        Ok(())
    })
}

impl ApiServer {
    pub fn new(store: Store, cfg: Config, listen: String) -> Arc<ApiServer> {
        let (changed, _) = watch::channel(store.resource_version());
        Arc::new(ApiServer { store: Mutex::new(store), changed, cfg, listen, issued: Mutex::default() })
    }

    pub(super) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts connections forever; each is served (HTTP/1.1, keep-alive) in its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.accept(listener, None).await
    }

    /// [`ApiServer::serve`] over TLS.
    pub async fn serve_tls(self: Arc<Self>, listener: TcpListener, tls: tokio_rustls::TlsAcceptor) {
        self.accept(listener, Some(tls)).await
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    eprintln!("apiserver: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Go's net package, the real API server's, turns Nagle off on every connection.
            let _ = stream.set_nodelay(true);
            let srv = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => srv.serve_connection(stream).await,
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => srv.serve_connection(stream).await,
                        Err(e) => eprintln!("apiserver: TLS handshake: {e}"),
                    },
                }
            });
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    ) {
        let svc = hyper::service::service_fn(move |req| {
            let srv = self.clone();
            async move { Ok::<_, Infallible>(srv.handle(req).await) }
        });
        let io = hyper_util::rt::TokioIo::new(stream);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(io, svc)
            .with_upgrades();
        if let Err(e) = conn.await {
            eprintln!("apiserver: connection: {e}");
        }
    }

    pub(super) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if let Some((ns, pod)) = super::portforward::portforward_path(req.uri().path()) {
            let uri = req.uri().clone();
            let resp = self.portforward(req, ns, pod).await;
            eprintln!("apiserver: portforward {uri} {}", resp.status().as_u16());
            return resp;
        }
        let (parts, body) = req.into_parts();
        let method = parts.method.clone();
        let path = parts.uri.path().to_string();
        let query = parse_query(parts.uri.query().unwrap_or(""));
        let resp = match self.authenticate(&parts.headers) {
            None => error_response(&ApiError::new(401, "Unauthorized", "Unauthorized")),
            Some(user) => {
                let body = if method == Method::POST || method == Method::PUT || method == Method::PATCH {
                    match Limited::new(body, MAX_BODY).collect().await {
                        Ok(c) => c.to_bytes(),
                        Err(_) => {
                            let e = ApiError::new(413, "RequestEntityTooLarge", "the request body is too large");
                            return error_response(&e);
                        }
                    }
                } else {
                    Bytes::new()
                };
                let ctype = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                self.dispatch(user, &method, &path, &query, &ctype, &body).await.unwrap_or_else(|e| error_response(&e))
            }
        };
        eprintln!("apiserver: {method} {} {}", parts.uri, resp.status().as_u16());
        resp
    }

    pub(super) fn authenticate(&self, headers: &HeaderMap) -> Option<User> {
        let token = headers.get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?.trim();
        if token == self.cfg.admin_token {
            Some(User::Admin)
        } else if self.cfg.no_secrets_token.as_deref() == Some(token) {
            Some(User::NoSecrets)
        } else if self.cfg.no_portforward_token.as_deref() == Some(token) {
            Some(User::NoPortforward)
        } else {
            self.cfg.users.iter().find(|u| u.token == token).map(|u| User::Rbac(u.user.clone()))
        }
    }

    pub(super) async fn dispatch(
        self: &Arc<Self>,
        user: User,
        method: &Method,
        path: &str,
        query: &HashMap<String, String>,
        ctype: &str,
        body: &[u8],
    ) -> Result<Response<Body>, ApiError> {
        // kubectl's bodies of built-in kinds: decoded, then handled as JSON.
        let decoded;
        let (ctype, body) = if ctype.starts_with("application/vnd.kubernetes.protobuf") {
            decoded = serde_json::to_vec(&protobuf::decode(body)?).unwrap_or_default();
            ("application/json", decoded.as_slice())
        } else {
            (ctype, body)
        };
        if let Some(review) = Review::of_path(path) {
            if *method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            if let (User::Rbac(u), Some(a)) = (&user, review.attributes()) {
                if !self.store().authorize(u, &a) {
                    return Err(rbac_forbidden(u, &a));
                }
            }
            let issued = self.issued.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let caller = self.requester(&user);
            let caller = UserInfo { name: caller.username, groups: caller.groups };
            let answer = review.answer(&parse_body(body)?, &caller, &self.cfg.users, &issued, &self.store())?;
            return Ok(json_response(StatusCode::CREATED, &answer));
        }
        if let Some((ns, name)) = tokens::token_request_path(path) {
            if *method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            if let User::Rbac(u) = &user {
                let a = Attributes {
                    verb: "create",
                    group: "",
                    resource: "serviceaccounts/token".into(),
                    namespace: Some(ns),
                    name: Some(name),
                };
                if !self.store().authorize(u, &a) {
                    return Err(rbac_forbidden(u, &a));
                }
            }
            let (answer, issued) = tokens::request(ns, name, &parse_body(body)?, &self.store())?;
            self.issued.lock().unwrap_or_else(|e| e.into_inner()).push(issued);
            return Ok(json_response(StatusCode::CREATED, &answer));
        }
        let route = Route::parse(path);
        if let Route::Sub { res, name, sub } = &route {
            return self.subresource(&user, method, *res, name, *sub, body);
        }
        let q = |k: &str| query.get(k).map(String::as_str);
        let watching = matches!(q("watch"), Some("true" | "1"));
        if let Route::List { res, ns } | Route::Item { res, ns, .. } = &route {
            let name = if let Route::Item { name, .. } = &route { Some(name.as_str()) } else { None };
            let verb = match *method {
                Method::GET if name.is_some() => "get",
                Method::GET if watching => "watch",
                Method::GET => "list",
                Method::POST => "create",
                Method::PUT => "update",
                Method::PATCH => "patch",
                Method::DELETE => "delete",
                _ => "access",
            };
            match &user {
                User::NoSecrets if *res == Resource::Secrets => {
                    return Err(forbidden(Resource::Secrets, name, ns.as_deref(), verb));
                }
                User::Rbac(u) => {
                    let a = Attributes {
                        verb,
                        group: res.info().0,
                        resource: res.plural().into(),
                        namespace: ns.as_deref(),
                        name,
                    };
                    if !self.store().authorize(u, &a) {
                        return Err(rbac_forbidden(u, &a));
                    }
                }
                _ => {}
            }
        }
        let get = |v: Value| Ok(json_response(StatusCode::OK, &v));
        if *method != Method::GET && q("dryRun").is_some_and(|d| !d.is_empty()) {
            return Err(ApiError::bad_request("the stand-in does not support dryRun"));
        }
        match (route, method) {
            (Route::Version, &Method::GET) => get(
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-tpvpn-standin", "platform": "linux/amd64"}),
            ),
            (Route::Api, &Method::GET) => get(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.listen}],
            })),
            (Route::Resources(group), &Method::GET) => get(discovery(group)),
            (Route::Apis, &Method::GET) => get(json!({
                "kind": "APIGroupList", "apiVersion": "v1",
                "groups": API_GROUPS.iter().map(|g| api_group(g)).collect::<Vec<_>>(),
            })),
            (Route::Group(group), &Method::GET) => {
                let mut g = api_group(group);
                g["kind"] = json!("APIGroup");
                g["apiVersion"] = json!("v1");
                get(g)
            }
            (Route::Compact, &Method::POST) => {
                if user != User::Admin {
                    return Err(ApiError::new(403, "Forbidden", "only the admin token may compact"));
                }
                let rv = {
                    let mut s = self.store();
                    s.compact();
                    s.resource_version()
                };
                // Wake the open watches so that they end with 410.
                self.changed.send_modify(|_| {});
                get(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "message": format!("stand-in: history compacted at resourceVersion {rv}"), "code": 200}))
            }
            (Route::List { res, ns }, &Method::GET) => {
                let filter = Filter::parse(ns.as_deref(), q("labelSelector"), q("fieldSelector"))?;
                if watching {
                    return self.watch(res, filter, query);
                }
                get(self.store().list(res, &filter))
            }
            (Route::List { res, ns }, &Method::POST) => {
                if res.namespaced() && ns.is_none() {
                    return Err(ApiError::method_not_allowed());
                }
                let mut obj = parse_body(body)?;
                if res == Resource::CertificateSigningRequests {
                    csr::stamp(&mut obj, &self.requester(&user))?;
                }
                let created = self.mutate(|s| s.create(res, ns.as_deref(), obj))?;
                Ok(json_response(StatusCode::CREATED, &created))
            }
            (Route::Item { res, ns, name }, &Method::PATCH) if ctype.starts_with("application/apply-patch+yaml") => {
                if q("fieldManager").unwrap_or("").is_empty() {
                    return Err(ApiError::bad_request(
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    ));
                }
                let obj = parse_apply_body(body)?;
                let (obj, created) = self.mutate_with(|s| s.apply(res, ns.as_deref(), &name, obj))?;
                Ok(json_response(if created { StatusCode::CREATED } else { StatusCode::OK }, &obj))
            }
            (Route::Item { res, ns, name }, m) => {
                let ns = ns.as_deref();
                let obj = match *m {
                    Method::GET => self.store().get(res, ns, &name)?,
                    Method::PUT => {
                        let mut obj = parse_body(body)?;
                        if res == Resource::CertificateSigningRequests {
                            csr::keep_spec_and_status(&mut obj, &self.store().get(res, ns, &name)?);
                        }
                        self.mutate(|s| s.replace(res, ns, &name, obj))?
                    }
                    Method::PATCH => {
                        if !ctype.starts_with("application/merge-patch+json") {
                            return Err(ApiError::new(
                                415,
                                "UnsupportedMediaType",
                                format!(
                                    "the stand-in supports only application/merge-patch+json and \
                                     application/apply-patch+yaml, not {ctype:?}"
                                ),
                            ));
                        }
                        let patch = parse_body(body)?;
                        if res == Resource::CertificateSigningRequests
                            && (!patch["spec"].is_null() || !patch["status"].is_null())
                        {
                            return Err(ApiError::invalid(res, &name, "spec: Forbidden: field is immutable"));
                        }
                        self.mutate(|s| s.merge_patch(res, ns, &name, &patch))?
                    }
                    Method::DELETE => self.mutate(|s| s.delete(res, ns, &name))?,
                    _ => return Err(ApiError::method_not_allowed()),
                };
                get(obj)
            }
            (Route::Unknown, _) => Err(ApiError::unknown_path()),
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    /// Who `user` is, as the API server stamps it on what it creates.
    fn requester(&self, user: &User) -> csr::Requester {
        let authenticated = "system:authenticated".to_string();
        let plain = |name: &str| csr::Requester {
            username: name.into(),
            uid: String::new(),
            groups: vec![authenticated.clone()],
        };
        match user {
            User::Admin => csr::Requester {
                username: "lab-admin".into(),
                uid: String::new(),
                groups: vec!["system:masters".into(), authenticated.clone()],
            },
            User::NoSecrets => plain(NO_SECRETS_USER),
            User::NoPortforward => plain(NO_PORTFORWARD_USER),
            User::Rbac(u) => csr::Requester {
                username: u.name.clone(),
                uid: self.cfg.users.iter().find(|t| t.user.name == u.name).map(|t| t.uid.clone()).unwrap_or_default(),
                groups: u.groups.clone(),
            },
        }
    }

    /// GET or PUT of a CertificateSigningRequest's `approval` or `status` ([`csr`]).
    fn subresource(
        &self,
        user: &User,
        method: &Method,
        res: Resource,
        name: &str,
        sub: csr::Sub,
        body: &[u8],
    ) -> Result<Response<Body>, ApiError> {
        let old = self.store().get(res, None, name)?;
        if *method == Method::GET {
            return Ok(json_response(StatusCode::OK, &old));
        }
        if *method != Method::PUT {
            return Err(ApiError::method_not_allowed());
        }
        if let User::Rbac(u) = user {
            let (resource, verb) = sub.rbac();
            let own = Attributes {
                verb: "update",
                group: res.group(),
                resource: resource.into(),
                namespace: None,
                name: Some(name),
            };
            if !self.store().authorize(u, &own) {
                return Err(rbac_forbidden(u, &own));
            }
            let signer = old["spec"]["signerName"].as_str().unwrap_or_default();
            let names = csr::signer_names(signer);
            let allowed = names.iter().any(|n| {
                let a =
                    Attributes { verb, group: res.group(), resource: "signers".into(), namespace: None, name: Some(n) };
                self.store().authorize(u, &a)
            });
            if !allowed {
                let a = Attributes {
                    verb,
                    group: res.group(),
                    resource: "signers".into(),
                    namespace: None,
                    name: Some(signer),
                };
                return Err(rbac_forbidden(u, &a));
            }
        }
        let new = sub.apply(&old, &parse_body(body)?)?;
        let updated = self.mutate(|s| s.replace(res, None, name, new))?;
        Ok(json_response(StatusCode::OK, &updated))
    }

    /// Runs a store mutation and wakes the watchers.
    pub(super) fn mutate(&self, f: impl FnOnce(&mut Store) -> Result<Value, ApiError>) -> Result<Value, ApiError> {
        self.mutate_with(f)
    }

    pub(super) fn mutate_with<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let mut s = self.store();
        let r = f(&mut s);
        self.changed.send_replace(s.resource_version());
        r
    }

    /// Starts a watch: a chunked response fed by a task (one JSON event per line).
    pub(super) fn watch(
        self: &Arc<Self>,
        res: Resource,
        filter: Filter,
        query: &HashMap<String, String>,
    ) -> Result<Response<Body>, ApiError> {
        let q = |k: &str| query.get(k).map(String::as_str);
        let initial_events = q("sendInitialEvents") == Some("true");
        let start = match q("resourceVersion") {
            _ if initial_events => WatchStart::Initial,
            None | Some("" | "0") => WatchStart::Initial,
            Some(v) => WatchStart::After(v.parse().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion: Invalid value: {v:?}: must be an integer"))
            })?),
        };
        let timeout = match q("timeoutSeconds") {
            None | Some("") => WATCH_TIMEOUT_DEFAULT,
            Some(v) => v.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {v:?}")))?,
        };
        let opts = WatchOpts {
            res,
            filter,
            start,
            bookmarks: q("allowWatchBookmarks") == Some("true"),
            initial_events,
            deadline: Instant::now() + Duration::from_secs(timeout.min(WATCH_TIMEOUT_MAX)),
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.clone().run_watch(opts, tx));
        let mut resp = Response::new(WatchBody(rx).boxed());
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(resp)
    }

    pub(super) async fn run_watch(self: Arc<Self>, o: WatchOpts, tx: mpsc::Sender<Bytes>) {
        let mut changed = self.changed.subscribe();
        let compactions = self.store().compactions;
        let first = self.store().watch_events(o.res, &o.filter, o.start);
        let mut cursor = match first {
            Ok((events, rv)) => {
                if !send_events(&tx, events, o.deadline).await {
                    return;
                }
                rv
            }
            Err(e) => {
                send_events(&tx, vec![json!({"type": "ERROR", "object": e.status()})], o.deadline).await;
                return;
            }
        };
        if o.initial_events {
            let mut b = bookmark(cursor);
            b["object"]["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            if !send_events(&tx, vec![b], o.deadline).await {
                return;
            }
        }
        let period = self.cfg.bookmark_interval.max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        let deadline = tokio::time::sleep_until(o.deadline);
        tokio::pin!(deadline);
        loop {
            let send_bookmark = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                r = changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    false
                }
                _ = ticks.tick(), if o.bookmarks => true,
            };
            let next = {
                let s = self.store();
                if s.compactions != compactions {
                    Err(ApiError::expired(cursor, s.compacted))
                } else {
                    s.watch_events(o.res, &o.filter, WatchStart::After(cursor))
                }
            };

            let mut events = match next {
                Ok((events, rv)) => {
                    cursor = rv;
                    events
                }
                Err(e) => vec![json!({"type": "ERROR", "object": e.status()})],
            };
            let failed = events.first().is_some_and(|e| e["type"] == "ERROR");
            if send_bookmark && !failed {
                events.push(bookmark(cursor));
            }
            if !send_events(&tx, events, o.deadline).await || failed {
                return;
            }
        }
    }
}

/// What a watch task needs.
#[derive(Debug)]
pub(super) struct WatchOpts {
    pub(super) res: Resource,
    pub(super) filter: Filter,
    pub(super) start: WatchStart,
    pub(super) bookmarks: bool,
    pub(super) initial_events: bool,
    pub(super) deadline: Instant,
}

pub(super) fn bookmark(rv: u64) -> Value {
    json!({"type": "BOOKMARK", "object": {"kind": "", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}})
}

/// Sends each event as one line (one chunk); false if the client is gone or the watch timed out.
pub(super) async fn send_events(tx: &mpsc::Sender<Bytes>, events: Vec<Value>, deadline: Instant) -> bool {
    for ev in events {
        // `type` first, like the real API server (serde_json would sort the keys).
        let line = format!("{{\"type\":{},\"object\":{}}}\n", ev["type"], ev["object"]);
        match tokio::time::timeout_at(deadline, tx.send(Bytes::from(line))).await {
            Ok(Ok(())) => {}
            _ => return false,
        }
    }
    true
}

/// The body of a watch response: whatever the watch task sends, until it ends.
pub(super) struct WatchBody(mpsc::Receiver<Bytes>);

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// A parsed request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    Version,
    /// `/api`: the core API versions.
    Api,
    /// `/apis`: the API groups.
    Apis,
    /// `/apis/{group}`: one API group.
    Group(&'static str),
    /// `/api/v1` (group `""`) or `/apis/{group}/v1`: the group version's resources.
    Resources(&'static str),
    Compact,
    List {
        res: Resource,
        ns: Option<String>,
    },
    Item {
        res: Resource,
        ns: Option<String>,
        name: String,
    },
    /// A CertificateSigningRequest's `approval` or `status` ([`csr`]).
    Sub {
        res: Resource,
        name: String,
        sub: csr::Sub,
    },
    Unknown,
}

impl Route {
    pub(super) fn parse(path: &str) -> Route {
        let segs: Vec<String> = path.trim_matches('/').split('/').map(|s| pct_decode(s, false)).collect();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let known_group = |g: &str| API_GROUPS.into_iter().find(|x| *x == g);
        let (group, rest): (&'static str, &[&str]) = match segs[..] {
            ["version"] => return Route::Version,
            ["api"] => return Route::Api,
            ["apis"] => return Route::Apis,
            ["_standin", "compact"] => return Route::Compact,
            ["apis", g] => return known_group(g).map_or(Route::Unknown, Route::Group),
            ["api", "v1", ref rest @ ..] => ("", rest),
            ["apis", g, "v1", ref rest @ ..] => match known_group(g) {
                Some(g) => (g, rest),
                None => return Route::Unknown,
            },
            _ => return Route::Unknown,
        };
        let lookup = |r: &str| Resource::lookup(group, "v1", r);
        let namespaced = |r: &str| lookup(r).filter(|r| r.namespaced());
        let cluster = |r: &str| lookup(r).filter(|r| !r.namespaced());
        let s = |x: &str| Some(x.to_string());
        let route = match rest {
            [] => Some(Route::Resources(group)),
            [r] => lookup(r).map(|res| Route::List { res, ns: None }),
            ["namespaces", ns, r] if !ns.is_empty() => namespaced(r).map(|res| Route::List { res, ns: s(ns) }),
            ["namespaces", ns, r, name] if !ns.is_empty() && !name.is_empty() => {
                namespaced(r).map(|res| Route::Item { res, ns: s(ns), name: name.to_string() })
            }
            [r, name] if !name.is_empty() => {
                cluster(r).map(|res| Route::Item { res, ns: None, name: name.to_string() })
            }
            [r, name, sub] if !name.is_empty() => cluster(r)
                .filter(|res| *res == Resource::CertificateSigningRequests)
                .zip(csr::Sub::parse(sub))
                .map(|(res, sub)| Route::Sub { res, name: name.to_string(), sub }),
            _ => None,
        };
        route.unwrap_or(Route::Unknown)
    }
}

/// The `APIResourceList` of `/api/v1` (group `""`) or `/apis/{group}/v1`.
pub(super) fn discovery(group: &str) -> Value {
    let mut resources: Vec<Value> = Resource::of_group(group, "v1")
        .map(|r| {
            let mut v = json!({
                "name": r.plural(), "singularName": r.kind().to_lowercase(), "namespaced": r.namespaced(),
                "kind": r.kind(), "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            });
            if !r.short_names().is_empty() {
                v["shortNames"] = json!(r.short_names());
            }
            v
        })
        .collect();
    resources.extend(Review::discovery(group));
    let gv = if group.is_empty() { "v1".to_string() } else { format!("{group}/v1") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// One entry of the `APIGroupList` of `/apis` (only `v1` is served).
pub(super) fn api_group(group: &str) -> Value {
    let v = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({"name": group, "versions": [v], "preferredVersion": v})
}

/// RBAC-style 403 (`secrets "x" is forbidden: User ... cannot get resource ...`).
pub(super) fn forbidden(res: Resource, name: Option<&str>, ns: Option<&str>, verb: &str) -> ApiError {
    let what = match name {
        Some(n) => format!("{} \"{n}\"", res.plural()),
        None => res.plural().to_string(),
    };
    let scope = match ns {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let msg = format!(
        "{what} is forbidden: User \"{NO_SECRETS_USER}\" cannot {verb} resource \"{}\" in API group \"\" {scope}",
        res.plural()
    );
    let mut e = ApiError::new(403, "Forbidden", msg);
    e.details = Some(match name {
        Some(n) => json!({"name": n, "kind": res.plural()}),
        None => json!({"kind": res.plural()}),
    });
    e
}

pub(super) fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// The body of an apply patch: YAML, but the stand-in understands only its JSON subset (what kube sends).
pub(super) fn parse_apply_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the stand-in accepts only JSON-formatted apply patches (YAML's JSON subset): {e}"
        ))
    })
}

pub(super) fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(super) fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.status())
}

/// `a=b&c=d` → map (percent-decoded, `+` is a space; the last value of a key wins).
pub(super) fn parse_query(q: &str) -> HashMap<String, String> {
    parse_query_pairs(q).into_iter().collect()
}

/// `a=b&a=c` → every pair, in order (percent-decoded, `+` is a space).
pub(super) fn parse_query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k, true), pct_decode(v, true))
        })
        .collect()
}

pub(super) fn pct_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
