//! A **stand-in** for the Kubernetes API server (`tpvpn-lab apiserver`).
//!
//! No real API server (etcd, kube-apiserver) can run in the lab, so this is a
//! small in-memory imitation of the few endpoints tpvpn uses, served
//! over plain HTTP/1.1 (keep-alive, chunked watch streams) so that the real
//! `kube` client works against it. It is not a Kubernetes implementation.
//!
//! Semantics kept from the real API server:
//! - A static table of resources ([`Resource`]), as plain Kubernetes JSON
//!   objects; lists are sorted by namespace and name. Core `v1` (`/api/v1`):
//!   `namespaces`, `nodes` (cluster-scoped), `services`, `pods`, `secrets`,
//!   `serviceaccounts` (namespaced); `rbac.authorization.k8s.io/v1`
//!   (`/apis/{group}/v1`): `clusterroles`, `clusterrolebindings`
//!   (cluster-scoped), `roles`, `rolebindings`; `apps/v1`: `deployments`, `daemonsets`.
//!   Other paths: 404 `the server could not find the requested resource`.
//!   Discovery: `/api`, `/api/v1`, `/apis` (APIGroupList), `/apis/{group}`,
//!   `/apis/{group}/v1` (APIResourceList); no aggregated discovery.
//! - One global `resourceVersion` counter (like etcd's revision): every
//!   create/update/delete bumps it and records an event in a bounded history
//!   ([`DEFAULT_HISTORY`] events). Server-managed metadata (`uid`,
//!   `resourceVersion`, `creationTimestamp`) is filled in.
//! - GET (one or a list, with `labelSelector` `=`/`==`/`!=`/`key`/`!key` and
//!   `fieldSelector` on `metadata.name`/`metadata.namespace`), POST (create,
//!   409 if it exists), PUT (replace, 409 on a stale `metadata.resourceVersion`),
//!   PATCH (JSON merge patch, and server-side apply, below), DELETE (returns the
//!   deleted object). Deleting a Namespace first deletes every namespaced
//!   object in it (a `DELETED` event each; no `Terminating` phase).
//! - Server-side apply (`PATCH` with `Content-Type: application/apply-patch+yaml`,
//!   what kube's `Patch::Apply` sends), approximated: `fieldManager` is
//!   required (400), `force` is ignored (no field ownership, no conflicts);
//!   the body must be JSON (YAML's JSON subset) with the URL's `apiVersion`,
//!   `kind`, name (and namespace, if given). A missing object is created
//!   (201, `ADDED`); an existing one gets the applied fields merged over it
//!   (maps merged recursively, applied values win, lists replaced, `null`
//!   removes; fields dropped from the applied configuration are NOT removed)
//!   and keeps its resourceVersion (no event) if nothing changed, so applying
//!   the same object twice is a no-op. A Service keeps its allocated
//!   clusterIP and node ports (matched by port and protocol).
//! - Deployments: `spec.replicas` defaults to 1, `metadata.generation` starts
//!   at 1 and grows when the spec changes; no status (no controllers run).
//! - Watches (`?watch=true`): no / `"0"` resourceVersion → `ADDED` for every
//!   current object, then live events; `resourceVersion=N` → replay of the
//!   events after N, then live; N older than the kept history → one `ERROR`
//!   event with a 410 `Expired` Status. Objects moving into / out of a
//!   selector's match on update are sent as `ADDED` / `DELETED`. Optional
//!   `BOOKMARK`s, `sendInitialEvents=true` (initial events, then a bookmark
//!   annotated `k8s.io/initial-events-end`), `timeoutSeconds` (default 300 s,
//!   capped at 600 s).
//! - Errors are `Status` objects with the real reasons and messages (NotFound,
//!   AlreadyExists, Conflict, Invalid, BadRequest, Unauthorized, Forbidden,
//!   MethodNotAllowed, Expired).
//! - Bearer-token authentication: an admin token (allowed everything) and an
//!   optional "no-secrets" token that gets RBAC-style 403s for `secrets`.
//! - Service defaulting: `type: ClusterIP`, port `protocol: TCP` and
//!   `targetPort`, a ClusterIP allocated from [`CLUSTER_IP_POOL`] when absent
//!   (immutable on update), node ports allocated from 30000-32767.
//!
//! Not kept: other resources and API groups, protobuf, HTTP/2, `limit`/
//! `continue` paging (everything is returned, no continue token), set-based
//! label selectors, subresources, JSON/strategic patches, `managedFields`,
//! `dryRun` (400), finalizers, garbage collection by owner references, controllers
//! (no Pods for Deployments), admission and validation.
//!
//! Stand-in only: `POST /_standin/compact` (admin token) drops all watch
//! history, so any older resourceVersion then yields 410 Gone, and ends every open
//! watch with a 410 ERROR event (a watch that fell behind), so clients must list again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Events kept for watch replay.
pub const DEFAULT_HISTORY: usize = 1000;
/// Where Services without a `spec.clusterIP` get one (`10.96.100.1`..`.254`).
pub const CLUSTER_IP_POOL: &str = "10.96.100.0/24";
/// The user name the "no-secrets" token authenticates as (in 403 messages).
pub const NO_SECRETS_USER: &str = "lab-user";
/// Default and maximum `timeoutSeconds` of a watch.
const WATCH_TIMEOUT_DEFAULT: u64 = 300;
const WATCH_TIMEOUT_MAX: u64 = 600;
/// Largest accepted request body (like the real API server's 3 MiB).
const MAX_BODY: usize = 3 << 20;

/// The resources the stand-in serves (a static table: group, version, kind, plural, scope, short names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Namespaces,
    Nodes,
    Services,
    Pods,
    Secrets,
    ServiceAccounts,
    ClusterRoles,
    ClusterRoleBindings,
    Roles,
    RoleBindings,
    Deployments,
    DaemonSets,
}

/// The API groups served besides the core group (all at version `v1`).
pub const API_GROUPS: [&str; 2] = ["apps", "rbac.authorization.k8s.io"];

impl Resource {
    pub const ALL: [Resource; 12] = [
        Resource::Namespaces,
        Resource::Nodes,
        Resource::Pods,
        Resource::Secrets,
        Resource::Services,
        Resource::ServiceAccounts,
        Resource::ClusterRoles,
        Resource::ClusterRoleBindings,
        Resource::Roles,
        Resource::RoleBindings,
        Resource::Deployments,
        Resource::DaemonSets,
    ];

    /// (group, kind, plural, namespaced, short names); the version is always `v1`.
    fn info(self) -> (&'static str, &'static str, &'static str, bool, &'static [&'static str]) {
        const RBAC: &str = "rbac.authorization.k8s.io";
        match self {
            Resource::Namespaces => ("", "Namespace", "namespaces", false, &["ns"]),
            Resource::Nodes => ("", "Node", "nodes", false, &["no"]),
            Resource::Services => ("", "Service", "services", true, &["svc"]),
            Resource::Pods => ("", "Pod", "pods", true, &["po"]),
            Resource::Secrets => ("", "Secret", "secrets", true, &[]),
            Resource::ServiceAccounts => ("", "ServiceAccount", "serviceaccounts", true, &["sa"]),
            Resource::ClusterRoles => (RBAC, "ClusterRole", "clusterroles", false, &[]),
            Resource::ClusterRoleBindings => (RBAC, "ClusterRoleBinding", "clusterrolebindings", false, &[]),
            Resource::Roles => (RBAC, "Role", "roles", true, &[]),
            Resource::RoleBindings => (RBAC, "RoleBinding", "rolebindings", true, &[]),
            Resource::Deployments => ("apps", "Deployment", "deployments", true, &["deploy"]),
            Resource::DaemonSets => ("apps", "DaemonSet", "daemonsets", true, &["ds"]),
        }
    }

    /// URL name (`services`).
    pub fn plural(self) -> &'static str {
        self.info().2
    }
    /// Object kind (`Service`).
    pub fn kind(self) -> &'static str {
        self.info().1
    }
    /// API group (`""` for core, `apps`, ...).
    pub fn group(self) -> &'static str {
        self.info().0
    }
    /// API version (always `v1`).
    pub fn version(self) -> &'static str {
        "v1"
    }
    /// The objects' `apiVersion` (`v1`, `apps/v1`).
    pub fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            g => format!("{g}/{}", self.version()),
        }
    }
    /// The name in error messages (`services`, `deployments.apps`).
    pub fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            g => format!("{}.{g}", self.plural()),
        }
    }
    pub fn namespaced(self) -> bool {
        self.info().3
    }
    fn short_names(self) -> &'static [&'static str] {
        self.info().4
    }
    /// A core-group resource by its URL name.
    pub fn from_plural(s: &str) -> Option<Resource> {
        Resource::lookup("", "v1", s)
    }
    /// A resource by group, version and URL name.
    pub fn lookup(group: &str, version: &str, plural: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.group() == group && r.version() == version && r.plural() == plural)
    }
    /// A resource by kind (kinds are unique in the table).
    pub fn from_kind(s: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.kind() == s)
    }
    /// The resources of one group version.
    fn of_group<'a>(group: &'a str, version: &'a str) -> impl Iterator<Item = Resource> + 'a {
        Resource::ALL.into_iter().filter(move |r| r.group() == group && r.version() == version)
    }
}

/// An API error, rendered as a Kubernetes `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None }
    }
    fn with_details(mut self, res: Resource, name: &str) -> ApiError {
        self.details = Some(match res.group() {
            "" => json!({"name": name, "kind": res.plural()}),
            g => json!({"name": name, "group": g, "kind": res.plural()}),
        });
        self
    }
    pub fn not_found(res: Resource, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", res.qualified())).with_details(res, name)
    }
    pub fn already_exists(res: Resource, name: &str) -> ApiError {
        ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", res.qualified()))
            .with_details(res, name)
    }
    pub fn conflict(res: Resource, name: &str) -> ApiError {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            res.qualified()
        );
        ApiError::new(409, "Conflict", msg).with_details(res, name)
    }
    pub fn invalid(res: Resource, name: &str, what: &str) -> ApiError {
        let kind = match res.group() {
            "" => res.kind().to_string(),
            g => format!("{}.{g}", res.kind()),
        };
        ApiError::new(422, "Invalid", format!("{kind} \"{name}\" is invalid: {what}")).with_details(res, name)
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }
    pub fn expired(requested: u64, oldest: u64) -> ApiError {
        ApiError::new(410, "Expired", format!("too old resource version: {requested} ({oldest})"))
    }
    fn unknown_path() -> ApiError {
        ApiError {
            details: Some(json!({})),
            ..ApiError::new(404, "NotFound", "the server could not find the requested resource")
        }
    }
    fn method_not_allowed() -> ApiError {
        ApiError {
            details: Some(json!({})),
            ..ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        }
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// One label-selector requirement (equality-based only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

/// One field-selector requirement on `metadata.name` / `metadata.namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldReq {
    pub field: String,
    pub value: String,
    pub equal: bool,
}

/// Which objects a list or watch wants: namespace (from the URL) and selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: Vec<LabelReq>,
    pub fields: Vec<FieldReq>,
}

impl Filter {
    /// Parses `labelSelector` and `fieldSelector` query values.
    pub fn parse(namespace: Option<&str>, labels: Option<&str>, fields: Option<&str>) -> Result<Filter, ApiError> {
        let mut f = Filter { namespace: namespace.map(str::to_string), ..Filter::default() };
        for part in labels.unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {part:?} (the stand-in supports only =, ==, !=, key and !key)"
                ))
            };
            let valid = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            let req = if let Some((k, v)) = part.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else {
                LabelReq::Exists(part.into())
            };
            let (LabelReq::Eq(k, _) | LabelReq::Ne(k, _) | LabelReq::Exists(k) | LabelReq::NotExists(k)) = &req;
            if !valid(k) {
                return Err(bad());
            }
            f.labels.push(req);
        }
        for part in fields.unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, equal) = if let Some((k, v)) = part.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, v, true)
            } else {
                return Err(ApiError::bad_request(format!("invalid selector: '{part}'; can't understand '{part}'")));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(ApiError::bad_request(format!("field label not supported: {field}")));
            }
            f.fields.push(FieldReq { field: field.into(), value: value.trim().into(), equal });
        }
        Ok(f)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        let ns = meta["namespace"].as_str().unwrap_or("");
        if self.namespace.as_deref().is_some_and(|want| want != ns) {
            return false;
        }
        let label = |k: &str| meta["labels"][k].as_str();
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|r| {
                let actual = if r.field == "metadata.name" { meta["name"].as_str().unwrap_or("") } else { ns };
                (actual == r.value) == r.equal
            })
    }
}

/// One recorded change.
#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    res: Resource,
    /// The object at `rv` (for DELETED: the last state, with the deletion's rv).
    obj: Value,
    /// For MODIFIED: the object before the change (selector transitions).
    prev: Option<Value>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// ADDED for every current object, then live events.
    Initial,
    /// Replay of every event after this resourceVersion, then live events.
    After(u64),
}

/// The in-memory object store with its event history.
#[derive(Debug)]
pub struct Store {
    /// (resource, namespace or "", name) → object.
    objects: BTreeMap<(Resource, String, String), Value>,
    rv: u64,
    history: VecDeque<Event>,
    history_limit: usize,
    /// Every event after this resourceVersion is still in `history`.
    compacted: u64,
    /// Compactions so far; open watches end when it changes.
    compactions: u64,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(DEFAULT_HISTORY)
    }
}

impl Store {
    /// An empty store keeping the last `history_limit` events.
    pub fn new(history_limit: usize) -> Store {
        Store { objects: BTreeMap::new(), rv: 0, history: VecDeque::new(), history_limit, compacted: 0, compactions: 0 }
    }

    /// Creates every fixture object (namespaces first); kind and namespace come from the objects.
    pub fn load(&mut self, objects: Vec<Value>) -> Result<()> {
        let mut objects = objects;
        objects.sort_by_key(|o| o["kind"] != "Namespace");
        for obj in objects {
            let kind = obj["kind"].as_str().unwrap_or("").to_string();
            let res = Resource::from_kind(&kind).with_context(|| format!("fixture of unsupported kind {kind:?}"))?;
            let ns = res.namespaced().then(|| obj["metadata"]["namespace"].as_str().unwrap_or("default").to_string());
            self.create(res, ns.as_deref(), obj).map_err(|e| anyhow::anyhow!("fixture: {}", e.message))?;
        }
        Ok(())
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Drops all watch history: any resourceVersion older than the current one then yields
    /// 410, and every open watch gets a 410 ERROR event and ends (as a watch that fell
    /// behind the API server's window does), so that clients must list again.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
        self.compactions += 1;
    }

    pub fn get(&self, res: Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects.get(&key(res, ns, name)).cloned().ok_or_else(|| ApiError::not_found(res, name))
    }

    /// A `<Kind>List` of the matching objects at the current resourceVersion.
    pub fn list(&self, res: Resource, filter: &Filter) -> Value {
        let items: Vec<&Value> = self.objects.range(range(res)).map(|(_, o)| o).filter(|o| filter.matches(o)).collect();
        json!({
            "kind": format!("{}List", res.kind()), "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()}, "items": items,
        })
    }

    /// Watch events (`{"type":..,"object":..}`) for a watch starting at `start`,
    /// and the resourceVersion the watch is then at.
    pub fn watch_events(
        &self,
        res: Resource,
        filter: &Filter,
        start: WatchStart,
    ) -> Result<(Vec<Value>, u64), ApiError> {
        match start {
            WatchStart::Initial => {
                let events = self
                    .objects
                    .range(range(res))
                    .filter(|(_, o)| filter.matches(o))
                    .map(|(_, o)| json!({"type": "ADDED", "object": o}))
                    .collect();
                Ok((events, self.rv))
            }
            WatchStart::After(after) => {
                if after < self.compacted {
                    return Err(ApiError::expired(after, self.compacted));
                }
                let events = self
                    .history
                    .iter()
                    .filter(|e| e.rv > after && e.res == res)
                    .filter_map(|e| filtered(e, filter).map(|t| json!({"type": t, "object": e.obj})))
                    .collect();
                // A resourceVersion from the future: skip events up to it.
                Ok((events, after.max(self.rv)))
            }
        }
    }

    /// Creates an object (the namespace of a namespaced one comes from the URL).
    pub fn create(&mut self, res: Resource, ns: Option<&str>, mut obj: Value) -> Result<Value, ApiError> {
        let name = self.prepare(res, ns, None, &mut obj)?;
        let k = key(res, ns, &name);
        if self.objects.contains_key(&k) {
            return Err(ApiError::already_exists(res, &name));
        }
        self.apply_defaults(res, &k, &mut obj, None)?;
        let rv = self.bump();
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(new_uid());
        meta["creationTimestamp"] = json!(rfc3339_now());
        meta["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(k, obj.clone());
        self.record(Event { rv, kind: "ADDED", res, obj: obj.clone(), prev: None });
        Ok(obj)
    }

    /// Replaces an existing object (PUT).
    pub fn replace(&mut self, res: Resource, ns: Option<&str>, name: &str, mut obj: Value) -> Result<Value, ApiError> {
        let k = key(res, ns, name);
        let Some(old) = self.objects.get(&k).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        self.prepare(res, ns, Some(name), &mut obj)?;
        match obj["metadata"]["resourceVersion"].as_str() {
            Some(rv) if !rv.is_empty() && Some(rv) != old["metadata"]["resourceVersion"].as_str() => {
                return Err(ApiError::conflict(res, name));
            }
            _ => {}
        }
        self.apply_defaults(res, &k, &mut obj, Some(&old))?;
        let meta = &mut obj["metadata"];
        meta["uid"] = old["metadata"]["uid"].clone();
        meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
        Ok(self.store_modified(res, k, obj, old))
    }

    /// Records an update of `k` from `old` to `obj` (a new resourceVersion and a MODIFIED event).
    fn store_modified(&mut self, res: Resource, k: (Resource, String, String), mut obj: Value, old: Value) -> Value {
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(k, obj.clone());
        self.record(Event { rv, kind: "MODIFIED", res, obj: obj.clone(), prev: Some(old) });
        obj
    }

    /// Server-side apply (`PATCH` with `application/apply-patch+yaml`), approximated: creates
    /// the object if it does not exist, otherwise merges the applied fields over it (maps
    /// merged recursively, applied values win, lists replaced, `null` removes). Nothing
    /// changes (same resourceVersion, no event) if the result equals the stored object.
    /// Returns the object and whether it was created.
    pub fn apply(
        &mut self,
        res: Resource,
        ns: Option<&str>,
        name: &str,
        mut applied: Value,
    ) -> Result<(Value, bool), ApiError> {
        let Some(map) = applied.as_object_mut() else {
            return Err(ApiError::bad_request("the applied configuration must be an object"));
        };
        let api_version = res.api_version();
        match map.get("apiVersion").and_then(Value::as_str) {
            Some(v) if v == api_version => {}
            None | Some("") => return Err(ApiError::bad_request("apiVersion must be set in an applied configuration")),
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the apiVersion of the applied configuration ({v}) does not match the URL ({api_version})"
                )))
            }
        }
        match map.get("kind").and_then(Value::as_str) {
            Some(k) if k == res.kind() => {}
            None | Some("") => return Err(ApiError::bad_request("kind must be set in an applied configuration")),
            Some(k) => {
                return Err(ApiError::bad_request(format!(
                    "the kind of the applied configuration ({k}) does not match the URL ({})",
                    res.kind()
                )))
            }
        }
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        match meta.get("name").and_then(Value::as_str) {
            None | Some("") => drop(meta.insert("name".into(), json!(name))),
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )))
            }
        }
        let asked_rv = meta.get("resourceVersion").and_then(Value::as_str).unwrap_or("").to_string();
        // Server-managed fields are not taken from the applied configuration.
        for f in ["uid", "resourceVersion", "creationTimestamp", "generation", "managedFields"] {
            meta.remove(f);
        }
        let k = key(res, ns, name);
        let Some(old) = self.objects.get(&k).cloned() else {
            if !asked_rv.is_empty() {
                return Err(ApiError::conflict(res, name));
            }
            return Ok((self.create(res, ns, applied)?, true));
        };
        if !asked_rv.is_empty() && Some(asked_rv.as_str()) != old["metadata"]["resourceVersion"].as_str() {
            return Err(ApiError::conflict(res, name));
        }
        let mut obj = old.clone();
        merge(&mut obj, &applied);
        self.prepare(res, ns, Some(name), &mut obj)?;
        if res == Resource::Services {
            keep_node_ports(&mut obj, &old);
        }
        self.apply_defaults(res, &k, &mut obj, Some(&old))?;
        if obj == old {
            return Ok((old, false));
        }
        Ok((self.store_modified(res, k, obj, old), false))
    }

    /// JSON merge patch (RFC 7386) of an existing object, then [`Store::replace`].
    pub fn merge_patch(
        &mut self,
        res: Resource,
        ns: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let mut obj = self.get(res, ns, name)?;
        if !patch.is_object() {
            return Err(ApiError::bad_request("a merge patch must be a JSON object"));
        }
        merge(&mut obj, patch);
        if patch["metadata"]["resourceVersion"].is_null() {
            obj["metadata"]["resourceVersion"] = Value::Null; // no optimistic-concurrency check
        }
        self.replace(res, ns, name, obj)
    }

    /// Deletes an object; returns it (with the deletion's resourceVersion). Deleting a
    /// Namespace first deletes every object in it (a DELETED event each).
    pub fn delete(&mut self, res: Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        if !self.objects.contains_key(&key(res, ns, name)) {
            return Err(ApiError::not_found(res, name));
        }
        if res == Resource::Namespaces {
            let inside: Vec<_> = self.objects.keys().filter(|(r, n, _)| r.namespaced() && n == name).cloned().collect();
            for (r, n, o) in inside {
                self.delete_one(r, Some(&n), &o)?;
            }
        }
        self.delete_one(res, ns, name)
    }

    fn delete_one(&mut self, res: Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let Some(mut obj) = self.objects.remove(&key(res, ns, name)) else {
            return Err(ApiError::not_found(res, name));
        };
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(Event { rv, kind: "DELETED", res, obj: obj.clone(), prev: None });
        Ok(obj)
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, ev: Event) {
        self.history.push_back(ev);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// Checks kind/apiVersion/name/namespace of a request body and fills them in; returns the name.
    fn prepare(
        &self,
        res: Resource,
        ns: Option<&str>,
        url_name: Option<&str>,
        obj: &mut Value,
    ) -> Result<String, ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("the request body must be a JSON object"));
        };
        match map.get("kind").and_then(Value::as_str) {
            None | Some("") => drop(map.insert("kind".into(), json!(res.kind()))),
            Some(k) if k == res.kind() => {}
            Some(k) => {
                return Err(ApiError::bad_request(format!("the kind {k:?} does not match the URL ({})", res.plural())))
            }
        }
        let api_version = res.api_version();
        match map.get("apiVersion").and_then(Value::as_str) {
            None | Some("") => drop(map.insert("apiVersion".into(), json!(api_version))),
            Some(v) if v == api_version => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the apiVersion {v:?} does not match the URL ({api_version})"
                )))
            }
        }
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        let mut name = meta.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        if name.is_empty() && url_name.is_none() {
            if let Some(g) = meta.get("generateName").and_then(Value::as_str).filter(|g| !g.is_empty()) {
                name = format!("{g}{}", &new_uid()[..5]);
                meta.insert("name".into(), json!(name));
            }
        }
        if name.is_empty() {
            return Err(ApiError::invalid(res, "", "metadata.name: Required value: name or generateName is required"));
        }
        if let Some(u) = url_name.filter(|u| *u != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({u})"
            )));
        }
        if name.contains('/') || name.len() > 253 {
            return Err(ApiError::invalid(res, &name, "metadata.name: Invalid value"));
        }
        match ns {
            Some(ns) => {
                match meta.get("namespace").and_then(Value::as_str) {
                    None | Some("") => drop(meta.insert("namespace".into(), json!(ns))),
                    Some(n) if n == ns => {}
                    Some(_) => {
                        return Err(ApiError::bad_request(
                            "the namespace of the provided object does not match the namespace sent on the request",
                        ))
                    }
                }
                if !self.objects.contains_key(&key(Resource::Namespaces, None, ns)) {
                    return Err(ApiError::not_found(Resource::Namespaces, ns));
                }
            }
            None => drop(meta.remove("namespace")),
        }
        Ok(name)
    }

    /// Server-side defaulting of the few fields tpvpn reads.
    fn apply_defaults(
        &self,
        res: Resource,
        k: &(Resource, String, String),
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let name = k.2.clone();
        match res {
            Resource::Namespaces => {
                obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
                if obj["status"]["phase"].is_null() {
                    obj["status"]["phase"] = json!("Active");
                }
            }
            Resource::Secrets => {
                if obj["type"].is_null() {
                    obj["type"] = json!("Opaque");
                }
                if let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
                    for (k, v) in sd {
                        let b = base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""));
                        obj["data"][k] = json!(b);
                    }
                }
            }
            Resource::Services => self.default_service(k, obj, old)?,
            Resource::Deployments | Resource::DaemonSets => {
                if res == Resource::Deployments && obj["spec"]["replicas"].is_null() {
                    obj["spec"]["replicas"] = json!(1);
                }
                // metadata.generation: 1 on creation, +1 on every change of the spec.
                let generation = match old {
                    None => 1,
                    Some(o) => {
                        let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                        g + i64::from(o["spec"] != obj["spec"])
                    }
                };
                obj["metadata"]["generation"] = json!(generation);
            }
            Resource::Nodes
            | Resource::Pods
            | Resource::ServiceAccounts
            | Resource::ClusterRoles
            | Resource::ClusterRoleBindings
            | Resource::Roles
            | Resource::RoleBindings => {}
        }
        Ok(())
    }

    fn default_service(
        &self,
        k: &(Resource, String, String),
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let name = k.2.as_str();
        if !obj["spec"].is_object() {
            obj["spec"] = json!({});
        }
        let others = || self.objects.range(range(Resource::Services)).filter(|(ok, _)| *ok != k).map(|(_, o)| o);
        // Node ports taken by other Services and explicitly by this one.
        let port_list = |o: &Value| o["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let used_ports: HashSet<u64> =
            others().flat_map(port_list).chain(port_list(obj)).filter_map(|p| p["nodePort"].as_u64()).collect();
        let spec = &mut obj["spec"];
        if spec["type"].is_null() {
            spec["type"] = json!("ClusterIP");
        }
        let svc_type = spec["type"].as_str().unwrap_or("").to_string();
        let node_ports = svc_type == "NodePort" || svc_type == "LoadBalancer";
        let mut next_port = 30000u64;
        if let Some(ports) = spec["ports"].as_array_mut() {
            for p in ports {
                if p["protocol"].is_null() {
                    p["protocol"] = json!("TCP");
                }
                if p["targetPort"].is_null() {
                    p["targetPort"] = p["port"].clone();
                }
                if node_ports && p["nodePort"].is_null() {
                    while used_ports.contains(&next_port) && next_port <= 32767 {
                        next_port += 1;
                    }
                    if next_port > 32767 {
                        return Err(ApiError::new(500, "InternalError", "node port range is full"));
                    }
                    p["nodePort"] = json!(next_port);
                    next_port += 1;
                }
            }
        }
        if svc_type == "ExternalName" {
            return Ok(());
        }
        let asked = spec["clusterIP"].as_str().unwrap_or("").to_string();
        let old_ip = old.and_then(|o| o["spec"]["clusterIP"].as_str()).unwrap_or("").to_string();
        let ip = if !old_ip.is_empty() {
            if !asked.is_empty() && asked != old_ip {
                return Err(ApiError::invalid(
                    Resource::Services,
                    name,
                    &format!("spec.clusterIP: Invalid value: \"{asked}\": field is immutable"),
                ));
            }
            old_ip
        } else {
            let used: HashSet<String> =
                others().filter_map(|o| o["spec"]["clusterIP"].as_str().map(str::to_string)).collect();
            if asked.is_empty() {
                (1..=254)
                    .map(|h| format!("10.96.100.{h}"))
                    .find(|ip| !used.contains(ip))
                    .ok_or_else(|| ApiError::new(500, "InternalError", format!("range {CLUSTER_IP_POOL} is full")))?
            } else if asked != "None" && used.contains(&asked) {
                return Err(ApiError::invalid(
                    Resource::Services,
                    name,
                    &format!("spec.clusterIP: Invalid value: \"{asked}\": provided IP is already allocated"),
                ));
            } else {
                asked
            }
        };
        spec["clusterIP"] = json!(ip);
        spec["clusterIPs"] = json!([ip]);
        Ok(())
    }
}

/// How event `e` looks to a watcher with `filter` (None: not sent).
fn filtered(e: &Event, filter: &Filter) -> Option<&'static str> {
    let now = filter.matches(&e.obj);
    let before = e.prev.as_ref().map(|p| filter.matches(p));
    match (e.kind, before, now) {
        ("MODIFIED", Some(true), true) => Some("MODIFIED"),
        ("MODIFIED", _, true) => Some("ADDED"),
        ("MODIFIED", Some(true), false) => Some("DELETED"),
        ("ADDED", _, true) => Some("ADDED"),
        ("DELETED", _, true) => Some("DELETED"),
        _ => None,
    }
}

fn key(res: Resource, ns: Option<&str>, name: &str) -> (Resource, String, String) {
    (res, ns.unwrap_or("").to_string(), name.to_string())
}

/// Key range of every object of `res`.
fn range(res: Resource) -> std::ops::RangeInclusive<(Resource, String, String)> {
    let max = String::from(char::MAX);
    (res, String::new(), String::new())..=(res, max.clone(), max)
}

/// Keeps the node ports of a Service's ports an apply left without one (matched by port and protocol).
fn keep_node_ports(obj: &mut Value, old: &Value) {
    let old_ports = old["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let proto = |p: &Value| p["protocol"].as_str().unwrap_or("TCP").to_string();
    if let Some(ports) = obj["spec"]["ports"].as_array_mut() {
        for p in ports.iter_mut().filter(|p| p["nodePort"].is_null()) {
            if let Some(o) = old_ports.iter().find(|o| o["port"] == p["port"] && proto(o) == proto(p)) {
                if !o["nodePort"].is_null() {
                    p["nodePort"] = o["nodePort"].clone();
                }
            }
        }
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// A random UUID (version 4 layout).
fn new_uid() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_ok();
    if !ok {
        // Fallback: time + counter; uniqueness is all that matters here.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0) as u64;
        b[..8].copy_from_slice(&t.to_be_bytes());
        b[8..].copy_from_slice(&N.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Now as `2006-01-02T15:04:05Z`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

// ---------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bearer token allowed everything.
    pub admin_token: String,
    /// Bearer token allowed everything but `secrets` (403 there).
    pub no_secrets_token: Option<String>,
    /// Interval of watch bookmarks (when the client allows them).
    pub bookmark_interval: Duration,
}

/// Who a request authenticated as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum User {
    Admin,
    NoSecrets,
}

/// The running stand-in: store, change notifications, configuration.
#[derive(Debug)]
pub struct ApiServer {
    store: Mutex<Store>,
    /// Carries the latest resourceVersion; watchers wake up on changes.
    changed: watch::Sender<u64>,
    cfg: Config,
    listen: String,
}

type Body = BoxBody<Bytes, Infallible>;

/// Runs the stand-in on `listen` with the objects of the JSON array in `fixtures`, until killed.
pub fn run(listen: SocketAddr, fixtures: &Path, cfg: Config) -> Result<()> {
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
        eprintln!("tpvpn-lab apiserver (stand-in): ready on http://{listen}");
        srv.serve(listener).await;
        Ok(())
    })
}

impl ApiServer {
    pub fn new(store: Store, cfg: Config, listen: String) -> Arc<ApiServer> {
        let (changed, _) = watch::channel(store.resource_version());
        Arc::new(ApiServer { store: Mutex::new(store), changed, cfg, listen })
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts connections forever; each is served (HTTP/1.1, keep-alive) in its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    eprintln!("apiserver: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let srv = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let srv = srv.clone();
                    async move { Ok::<_, Infallible>(srv.handle(req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(io, svc);
                if let Err(e) = conn.await {
                    eprintln!("apiserver: connection: {e}");
                }
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
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

    fn authenticate(&self, headers: &HeaderMap) -> Option<User> {
        let token = headers.get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?.trim();
        if token == self.cfg.admin_token {
            Some(User::Admin)
        } else if self.cfg.no_secrets_token.as_deref() == Some(token) {
            Some(User::NoSecrets)
        } else {
            None
        }
    }

    async fn dispatch(
        self: &Arc<Self>,
        user: User,
        method: &Method,
        path: &str,
        query: &HashMap<String, String>,
        ctype: &str,
        body: &[u8],
    ) -> Result<Response<Body>, ApiError> {
        let route = Route::parse(path);
        let q = |k: &str| query.get(k).map(String::as_str);
        let watching = matches!(q("watch"), Some("true" | "1"));
        if let Route::List { res: Resource::Secrets, ns } | Route::Item { res: Resource::Secrets, ns, .. } = &route {
            if user == User::NoSecrets {
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
                return Err(forbidden(Resource::Secrets, name, ns.as_deref(), verb));
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
                let obj = parse_body(body)?;
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
                        let obj = parse_body(body)?;
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

    /// Runs a store mutation and wakes the watchers.
    fn mutate(&self, f: impl FnOnce(&mut Store) -> Result<Value, ApiError>) -> Result<Value, ApiError> {
        self.mutate_with(f)
    }

    fn mutate_with<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let mut s = self.store();
        let r = f(&mut s);
        self.changed.send_replace(s.resource_version());
        r
    }

    /// Starts a watch: a chunked response fed by a task (one JSON event per line).
    fn watch(
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

    async fn run_watch(self: Arc<Self>, o: WatchOpts, tx: mpsc::Sender<Bytes>) {
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
struct WatchOpts {
    res: Resource,
    filter: Filter,
    start: WatchStart,
    bookmarks: bool,
    initial_events: bool,
    deadline: Instant,
}

fn bookmark(rv: u64) -> Value {
    json!({"type": "BOOKMARK", "object": {"kind": "", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}})
}

/// Sends each event as one line (one chunk); false if the client is gone or the watch timed out.
async fn send_events(tx: &mpsc::Sender<Bytes>, events: Vec<Value>, deadline: Instant) -> bool {
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
struct WatchBody(mpsc::Receiver<Bytes>);

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
enum Route {
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
    Unknown,
}

impl Route {
    fn parse(path: &str) -> Route {
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
            _ => None,
        };
        route.unwrap_or(Route::Unknown)
    }
}

/// The `APIResourceList` of `/api/v1` (group `""`) or `/apis/{group}/v1`.
fn discovery(group: &str) -> Value {
    let resources: Vec<Value> = Resource::of_group(group, "v1")
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
    let gv = if group.is_empty() { "v1".to_string() } else { format!("{group}/v1") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// One entry of the `APIGroupList` of `/apis` (only `v1` is served).
fn api_group(group: &str) -> Value {
    let v = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({"name": group, "versions": [v], "preferredVersion": v})
}

/// RBAC-style 403 (`secrets "x" is forbidden: User ... cannot get resource ...`).
fn forbidden(res: Resource, name: Option<&str>, ns: Option<&str>, verb: &str) -> ApiError {
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

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// The body of an apply patch: YAML, but the stand-in understands only its JSON subset (what kube sends).
fn parse_apply_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the stand-in accepts only JSON-formatted apply patches (YAML's JSON subset): {e}"
        ))
    })
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.status())
}

/// `a=b&c=d` → map (percent-decoded, `+` is a space; the last value of a key wins).
fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k, true), pct_decode(v, true))
        })
        .collect()
}

fn pct_decode(s: &str, plus_is_space: bool) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    }
    fn svc(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels}, "spec": {"ports": [{"name": "http", "port": 80}]}})
    }
    fn store() -> Store {
        let mut s = Store::new(DEFAULT_HISTORY);
        s.load(vec![ns("default"), ns("dev")]).unwrap();
        s
    }
    fn rv_of(v: &Value) -> u64 {
        v["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()
    }
    fn types(events: &[Value]) -> Vec<String> {
        events
            .iter()
            .map(|e| format!("{} {}", e["type"].as_str().unwrap(), e["object"]["metadata"]["name"].as_str().unwrap()))
            .collect()
    }

    #[test]
    fn list_shape_selectors_and_defaults() {
        let mut s = store();
        let a = s.create(Resource::Services, Some("default"), svc("a", json!({"app": "a", "tier": "web"}))).unwrap();
        s.create(Resource::Services, Some("default"), svc("b", json!({"app": "b"}))).unwrap();
        s.create(Resource::Services, Some("dev"), svc("c", json!({"app": "a"}))).unwrap();
        assert_eq!(a["kind"], "Service");
        assert_eq!(a["spec"]["clusterIP"], "10.96.100.1");
        assert_eq!(a["spec"]["type"], "ClusterIP");
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(a["metadata"]["uid"].as_str().unwrap().len(), 36);
        assert!(a["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));

        let all = s.list(Resource::Services, &Filter::default());
        assert_eq!(all["kind"], "ServiceList");
        assert_eq!(all["apiVersion"], "v1");
        assert_eq!(all["metadata"]["resourceVersion"], s.resource_version().to_string());
        assert_eq!(all["items"].as_array().unwrap().len(), 3);
        let names = |f: &Filter| -> Vec<String> {
            s.list(Resource::Services, f)["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(names(&Filter::parse(Some("default"), None, None).unwrap()), ["a", "b"]);
        assert_eq!(names(&Filter::parse(None, Some("app=a"), None).unwrap()), ["a", "c"]);
        assert_eq!(names(&Filter::parse(None, Some("app==a,tier=web"), None).unwrap()), ["a"]);
        assert_eq!(names(&Filter::parse(None, Some("app!=a"), None).unwrap()), ["b"]);
        assert_eq!(names(&Filter::parse(None, Some("!tier"), None).unwrap()), ["b", "c"]);
        assert_eq!(names(&Filter::parse(None, Some("tier"), None).unwrap()), ["a"]);
        assert_eq!(names(&Filter::parse(None, None, Some("metadata.name=b")).unwrap()), ["b"]);
        assert_eq!(names(&Filter::parse(None, None, Some("metadata.namespace!=default")).unwrap()), ["c"]);
        assert_eq!(Filter::parse(None, None, Some("spec.x=1")).unwrap_err().code, 400);
        assert_eq!(Filter::parse(None, Some("app in (a,b)"), None).unwrap_err().code, 400);
    }

    #[test]
    fn errors_are_kubernetes_statuses() {
        let mut s = store();
        let e = s.get(Resource::Services, Some("default"), "x").unwrap_err();
        assert_eq!(
            e.status(),
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"services \"x\" not found",
                   "reason":"NotFound","details":{"name":"x","kind":"services"},"code":404})
        );
        s.create(Resource::Services, Some("default"), svc("a", json!({}))).unwrap();
        let e = s.create(Resource::Services, Some("default"), svc("a", json!({}))).unwrap_err();
        assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
        let e = s.create(Resource::Services, Some("nope"), svc("a", json!({}))).unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (404, "namespaces \"nope\" not found"));
        let mut stale = s.get(Resource::Services, Some("default"), "a").unwrap();
        s.replace(Resource::Services, Some("default"), "a", stale.clone()).unwrap();
        let e = s.replace(Resource::Services, Some("default"), "a", stale.clone()).unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        stale["metadata"]["resourceVersion"] = Value::Null;
        stale["spec"]["clusterIP"] = json!("10.96.0.1");
        let e = s.replace(Resource::Services, Some("default"), "a", stale).unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        let e = s.delete(Resource::Pods, Some("default"), "p").unwrap_err();
        assert_eq!(e.code, 404);
        let e = s
            .create(Resource::Services, Some("default"), json!({"kind": "Pod", "metadata": {"name": "z"}}))
            .unwrap_err();
        assert_eq!(e.code, 400);
    }

    #[test]
    fn watch_initial_and_replay() {
        let mut s = store();
        s.create(Resource::Services, Some("default"), svc("a", json!({"app": "a"}))).unwrap();
        let all = Filter::default();
        let (ev, rv) = s.watch_events(Resource::Services, &all, WatchStart::Initial).unwrap();
        assert_eq!(types(&ev), ["ADDED a"]);
        assert_eq!(rv, s.resource_version());

        let mut b = s.create(Resource::Services, Some("default"), svc("b", json!({"app": "b"}))).unwrap();
        b["metadata"]["labels"]["app"] = json!("a");
        s.replace(Resource::Services, Some("default"), "b", b).unwrap();
        s.create(Resource::Pods, Some("default"), json!({"metadata": {"name": "p"}})).unwrap();
        let mut a = s.get(Resource::Services, Some("default"), "a").unwrap();
        a["metadata"]["labels"]["app"] = json!("z");
        s.replace(Resource::Services, Some("default"), "a", a).unwrap();
        let del = s.delete(Resource::Services, Some("default"), "b").unwrap();
        assert_eq!(del["metadata"]["resourceVersion"], s.resource_version().to_string());

        let (ev, _) = s.watch_events(Resource::Services, &all, WatchStart::After(rv)).unwrap();
        assert_eq!(types(&ev), ["ADDED b", "MODIFIED b", "MODIFIED a", "DELETED b"]);
        // Selector transitions: b enters app=a (ADDED), a leaves it (DELETED).
        let sel = Filter::parse(None, Some("app=a"), None).unwrap();
        let (ev, _) = s.watch_events(Resource::Services, &sel, WatchStart::After(rv)).unwrap();
        assert_eq!(types(&ev), ["ADDED b", "DELETED a", "DELETED b"]);
        let (ev, _) = s.watch_events(Resource::Pods, &all, WatchStart::After(rv)).unwrap();
        assert_eq!(types(&ev), ["ADDED p"]);
        // A resourceVersion from the future replays nothing.
        let (ev, at) = s.watch_events(Resource::Services, &all, WatchStart::After(1000)).unwrap();
        assert!(ev.is_empty());
        assert_eq!(at, 1000);
    }

    #[test]
    fn watch_too_old_is_gone() {
        let mut s = Store::new(3);
        s.load(vec![ns("default")]).unwrap(); // rv 1
        for n in ["a", "b", "c", "d"] {
            s.create(Resource::Services, Some("default"), svc(n, json!({}))).unwrap();
            // rv 2..=5
        }
        let all = Filter::default();
        // History holds rv 3..=5: watching from 2 still sees everything after it.
        let (ev, _) = s.watch_events(Resource::Services, &all, WatchStart::After(2)).unwrap();
        assert_eq!(types(&ev), ["ADDED b", "ADDED c", "ADDED d"]);
        let e = s.watch_events(Resource::Services, &all, WatchStart::After(1)).unwrap_err();
        assert_eq!(e.status()["code"], 410);
        assert_eq!(e.status()["reason"], "Expired");
        assert_eq!(e.message, "too old resource version: 1 (2)");
        s.compact();
        assert_eq!(s.watch_events(Resource::Services, &all, WatchStart::After(4)).unwrap_err().code, 410);
        assert!(s.watch_events(Resource::Services, &all, WatchStart::After(5)).unwrap().0.is_empty());
        let (ev, _) = s.watch_events(Resource::Services, &all, WatchStart::Initial).unwrap();
        assert_eq!(ev.len(), 4);
    }

    #[test]
    fn patch_secrets_and_node_ports() {
        let mut s = store();
        let sec = json!({"metadata": {"name": "s"}, "stringData": {"k": "hi"}});
        let sec = s.create(Resource::Secrets, Some("default"), sec).unwrap();
        assert_eq!((sec["type"].as_str(), sec["data"]["k"].as_str()), (Some("Opaque"), Some("aGk=")));
        let np = json!({"metadata": {"name": "np"}, "spec": {"type": "NodePort", "ports": [{"port": 1}, {"port": 2, "nodePort": 30000}]}});
        let np = s.create(Resource::Services, Some("default"), np).unwrap();
        assert_eq!(np["spec"]["ports"][0]["nodePort"], 30001);
        let p = s
            .merge_patch(Resource::Services, Some("default"), "np", &json!({"metadata": {"labels": {"x": "y"}}}))
            .unwrap();
        assert_eq!(p["metadata"]["labels"]["x"], "y");
        assert_eq!(p["spec"]["clusterIP"], np["spec"]["clusterIP"]);
    }

    #[test]
    fn routes_and_queries() {
        let item = |res, ns: Option<&str>, name: &str| Route::Item { res, ns: ns.map(Into::into), name: name.into() };
        assert_eq!(Route::parse("/api/v1/services"), Route::List { res: Resource::Services, ns: None });
        assert_eq!(
            Route::parse("/api/v1/namespaces/rs/pods/"),
            Route::List { res: Resource::Pods, ns: Some("rs".into()) }
        );
        assert_eq!(Route::parse("/api/v1/namespaces/tpvpn"), item(Resource::Namespaces, None, "tpvpn"));
        assert_eq!(Route::parse("/api/v1/nodes/n1"), item(Resource::Nodes, None, "n1"));
        assert_eq!(Route::parse("/api/v1/namespaces/a/secrets/b"), item(Resource::Secrets, Some("a"), "b"));
        assert_eq!(Route::parse("/api/v1/namespaces/a/nodes"), Route::Unknown);
        assert_eq!(Route::parse("/api/v1/services/x"), Route::Unknown);
        assert_eq!(Route::parse("/api/v1"), Route::Resources(""));
        assert_eq!(Route::parse("/apis/apps/v1"), Route::Resources("apps"));
        assert_eq!(Route::parse("/apis"), Route::Apis);
        assert_eq!(Route::parse("/apis/rbac.authorization.k8s.io"), Route::Group("rbac.authorization.k8s.io"));
        assert_eq!(
            Route::parse("/apis/apps/v1/namespaces/t/deployments/d"),
            item(Resource::Deployments, Some("t"), "d")
        );
        assert_eq!(Route::parse("/apis/apps/v1/deployments"), Route::List { res: Resource::Deployments, ns: None });
        assert_eq!(
            Route::parse("/apis/rbac.authorization.k8s.io/v1/clusterroles/c"),
            item(Resource::ClusterRoles, None, "c")
        );
        assert_eq!(
            Route::parse("/apis/rbac.authorization.k8s.io/v1/namespaces/t/rolebindings"),
            Route::List { res: Resource::RoleBindings, ns: Some("t".into()) }
        );
        assert_eq!(
            Route::parse("/api/v1/namespaces/t/serviceaccounts/s"),
            item(Resource::ServiceAccounts, Some("t"), "s")
        );
        // Unknown groups, versions, resources and scopes.
        for p in [
            "/apis/batch/v1/jobs",
            "/apis/apps/v2/deployments",
            "/apis/apps/v1/services",
            "/api/v1/deployments",
            "/apis/apps/v1/namespaces/t/clusterroles",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/c/x",
            "/apis/foo",
        ] {
            assert_eq!(Route::parse(p), Route::Unknown, "{p}");
        }
        let q = parse_query("labelSelector=a%3Db%2Cc!%3Dd&watch=1&x&y=a+b&z=%zz%");
        assert_eq!(q["labelSelector"], "a=b,c!=d");
        assert_eq!((q["watch"].as_str(), q["x"].as_str(), q["y"].as_str(), q["z"].as_str()), ("1", "", "a b", "%zz%"));
        assert_eq!(pct_decode("%4", false), "%4");
        assert_eq!(pct_decode("%41", false), "A");
    }

    /// Starts the stand-in on a free loopback port (admin token `t`); returns its address.
    async fn serve_on_loopback() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = Config { admin_token: "t".into(), no_secrets_token: None, bookmark_interval: Duration::from_secs(5) };
        let srv = ApiServer::new(store(), cfg, addr.to_string());
        tokio::spawn(srv.serve(listener));
        addr
    }

    /// Raw HTTP/1.1 on loopback: keep-alive, errors as Status, a chunked watch.
    #[test]
    fn http_keep_alive_and_chunked_watch() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let addr = serve_on_loopback().await;
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n");
            // Two requests on one connection, then a watch that times out after 1 s.
            let all = req("/version")
                + &req("/api/v1/namespaces/x?y=%")
                + &req("/api/v1/namespaces?watch=true&timeoutSeconds=1");
            c.write_all(all.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 4096];
                // Until the watch's last chunk (bounded by the timeout).
                while !buf.ends_with(b"\r\n0\r\n\r\n") {
                    let n = c.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&buf));
                    buf.extend_from_slice(&chunk[..n]);
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no complete responses: {}", String::from_utf8_lossy(&buf)));
            let text = String::from_utf8_lossy(&buf);
            assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
            assert!(text.contains("HTTP/1.1 404 Not Found") && text.contains(r#""reason":"NotFound""#), "{text}");
            assert!(text.contains("transfer-encoding: chunked"), "{text}");
            assert!(text.contains(r#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Namespace""#), "{text}");
            // The connection is still usable; no token → 401.
            c.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk)).await.unwrap().unwrap();
            assert!(String::from_utf8_lossy(&chunk[..n]).starts_with("HTTP/1.1 401"));
        });
    }

    fn deploy(image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mgr", "labels": {"app": "mgr"}},
            "spec": {"selector": {"matchLabels": {"app": "mgr"}}, "template": {
                "metadata": {"labels": {"app": "mgr"}},
                "spec": {"containers": [{"name": "m", "image": image, "args": ["a", "b"]}]}}},
        })
    }

    #[test]
    fn apply_creates_then_is_idempotent() {
        let mut s = store();
        let rv0 = s.resource_version();
        let (d, created) = s.apply(Resource::Deployments, Some("dev"), "mgr", deploy("img:1")).unwrap();
        assert!(created);
        assert_eq!((d["kind"].as_str(), d["apiVersion"].as_str()), (Some("Deployment"), Some("apps/v1")));
        assert_eq!(d["metadata"]["namespace"], "dev");
        assert_eq!(d["metadata"]["uid"].as_str().unwrap().len(), 36);
        assert!(d["metadata"]["creationTimestamp"].is_string());
        assert_eq!((d["metadata"]["generation"].as_i64(), d["spec"]["replicas"].as_i64()), (Some(1), Some(1)));
        assert_eq!(rv_of(&d), rv0 + 1);
        // The same configuration again: nothing changes, no event.
        let (again, created) = s.apply(Resource::Deployments, Some("dev"), "mgr", deploy("img:1")).unwrap();
        assert!(!created);
        assert_eq!(again, d);
        assert_eq!(s.resource_version(), rv0 + 1);
        let (ev, _) = s.watch_events(Resource::Deployments, &Filter::default(), WatchStart::After(rv0)).unwrap();
        assert_eq!(types(&ev), ["ADDED mgr"]);
        // Listed with the group's apiVersion.
        let list = s.list(Resource::Deployments, &Filter::parse(Some("dev"), Some("app=mgr"), None).unwrap());
        assert_eq!((list["kind"].as_str(), list["apiVersion"].as_str()), (Some("DeploymentList"), Some("apps/v1")));
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn apply_modifies() {
        let mut s = store();
        let (d, _) = s.apply(Resource::Deployments, Some("dev"), "mgr", deploy("img:1")).unwrap();
        let mut changed = deploy("img:2");
        changed["spec"]["template"]["spec"]["containers"][0].as_object_mut().unwrap().remove("args");
        changed["metadata"]["annotations"] = json!({"a": "b"});
        let (m, created) = s.apply(Resource::Deployments, Some("dev"), "mgr", changed).unwrap();
        assert!(!created);
        assert!(rv_of(&m) > rv_of(&d));
        assert_eq!(
            (&m["metadata"]["uid"], &m["metadata"]["creationTimestamp"]),
            (&d["metadata"]["uid"], &d["metadata"]["creationTimestamp"])
        );
        // Lists are replaced (args gone), maps merged (labels kept), generation bumped.
        assert_eq!(m["spec"]["template"]["spec"]["containers"], json!([{"name": "m", "image": "img:2"}]));
        assert_eq!((&m["metadata"]["labels"]["app"], &m["metadata"]["annotations"]["a"]), (&json!("mgr"), &json!("b")));
        assert_eq!(m["metadata"]["generation"], 2);
        let (ev, _) = s.watch_events(Resource::Deployments, &Filter::default(), WatchStart::After(rv_of(&d))).unwrap();
        assert_eq!(types(&ev), ["MODIFIED mgr"]);
        assert_eq!(s.get(Resource::Deployments, Some("dev"), "mgr").unwrap(), m);
    }

    #[test]
    fn apply_validates() {
        let mut s = store();
        let bad =
            |s: &mut Store, res, ns: Option<&str>, name: &str, obj: Value| s.apply(res, ns, name, obj).unwrap_err();
        // Kind, apiVersion and name must match the URL.
        let e = bad(&mut s, Resource::Services, Some("dev"), "mgr", deploy("i"));
        assert_eq!((e.code, e.reason), (400, "BadRequest"));
        let mut v = deploy("i");
        v["apiVersion"] = json!("v1");
        assert_eq!(bad(&mut s, Resource::Deployments, Some("dev"), "mgr", v).code, 400);
        let mut v = deploy("i");
        v.as_object_mut().unwrap().remove("kind");
        assert_eq!(bad(&mut s, Resource::Deployments, Some("dev"), "mgr", v).code, 400);
        let e = bad(&mut s, Resource::Deployments, Some("dev"), "other", deploy("i"));
        assert_eq!(e.message, "the name of the object (mgr) does not match the name on the URL (other)");
        let mut v = deploy("i");
        v["metadata"]["namespace"] = json!("default");
        assert_eq!(bad(&mut s, Resource::Deployments, Some("dev"), "mgr", v).code, 400);
        let e = bad(&mut s, Resource::Deployments, Some("nope"), "mgr", deploy("i"));
        assert_eq!((e.code, e.message.as_str()), (404, "namespaces \"nope\" not found"));
        assert_eq!(bad(&mut s, Resource::Deployments, Some("dev"), "mgr", json!([])).code, 400);
        // Errors name the group like the real API server.
        let e = s.get(Resource::Deployments, Some("dev"), "x").unwrap_err();
        assert_eq!(e.message, "deployments.apps \"x\" not found");
        assert_eq!(e.details, Some(json!({"name": "x", "group": "apps", "kind": "deployments"})));
    }

    #[test]
    fn apply_cluster_role_secret_and_service() {
        let mut s = store();
        let cr = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "tpvpn"},
            "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}],
        });
        let (c, created) = s.apply(Resource::ClusterRoles, None, "tpvpn", cr.clone()).unwrap();
        assert!(created && c["metadata"]["namespace"].is_null());
        let (c2, _) = s.apply(Resource::ClusterRoles, None, "tpvpn", cr.clone()).unwrap();
        assert_eq!(rv_of(&c2), rv_of(&c));
        assert_eq!(s.get(Resource::ClusterRoles, None, "tpvpn").unwrap()["rules"], cr["rules"]);

        // A Secret applied with stringData twice: unchanged the second time.
        let sec = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "hi"}});
        let (a, _) = s.apply(Resource::Secrets, Some("dev"), "s", sec.clone()).unwrap();
        assert_eq!(a["data"]["k"], "aGk=");
        assert_eq!(rv_of(&s.apply(Resource::Secrets, Some("dev"), "s", sec).unwrap().0), rv_of(&a));

        // A Service: allocation on create, the allocated clusterIP and nodePort kept on re-apply.
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m"},
            "spec": {"type": "NodePort", "ports": [{"name": "quic", "port": 4443, "protocol": "UDP"}]}});
        let (a, _) = s.apply(Resource::Services, Some("dev"), "m", svc.clone()).unwrap();
        assert_eq!(
            (a["spec"]["clusterIP"].as_str(), a["spec"]["ports"][0]["nodePort"].as_u64()),
            (Some("10.96.100.1"), Some(30000))
        );
        let (b, _) = s.apply(Resource::Services, Some("dev"), "m", svc.clone()).unwrap();
        assert_eq!(b, a);
        let mut other = svc.clone();
        other["spec"]["clusterIP"] = json!("10.96.0.9");
        let e = s.apply(Resource::Services, Some("dev"), "m", other).unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        assert!(e.message.starts_with("Service \"m\" is invalid: spec.clusterIP"), "{}", e.message);
    }

    #[test]
    fn namespace_delete_cascades() {
        let mut s = store();
        s.apply(Resource::Namespaces, None, "t", ns("t")).unwrap();
        s.apply(Resource::Deployments, Some("t"), "mgr", deploy("i")).unwrap();
        s.create(Resource::Services, Some("t"), svc("a", json!({}))).unwrap();
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}});
        s.apply(Resource::ServiceAccounts, Some("t"), "sa", sa).unwrap();
        let cr =
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "c"}});
        s.apply(Resource::ClusterRoles, None, "c", cr).unwrap();
        s.create(Resource::Services, Some("dev"), svc("b", json!({}))).unwrap();
        let rv = s.resource_version();
        let gone = s.delete(Resource::Namespaces, None, "t").unwrap();
        assert_eq!(gone["metadata"]["name"], "t");
        assert_eq!(rv_of(&gone), s.resource_version());
        assert!(s.get(Resource::Deployments, Some("t"), "mgr").is_err());
        assert!(s.get(Resource::ServiceAccounts, Some("t"), "sa").is_err());
        assert!(s.get(Resource::ClusterRoles, None, "c").is_ok(), "cluster-scoped objects stay");
        assert!(s.get(Resource::Services, Some("dev"), "b").is_ok(), "other namespaces stay");
        let all = Filter::default();
        let (ev, _) = s.watch_events(Resource::Services, &all, WatchStart::After(rv)).unwrap();
        assert_eq!(types(&ev), ["DELETED a"]);
        let (ev, _) = s.watch_events(Resource::Deployments, &all, WatchStart::After(rv)).unwrap();
        assert_eq!(types(&ev), ["DELETED mgr"]);
        assert_eq!(s.resource_version(), rv + 4);
        assert_eq!(s.delete(Resource::Namespaces, None, "t").unwrap_err().code, 404);
    }

    /// Discovery, unknown resources, apply over HTTP (raw HTTP/1.1 on loopback).
    #[test]
    fn http_discovery_apply_and_unknown() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let addr = serve_on_loopback().await;
            // One request per connection (Connection: close), response read to the end.
            let call = |method: &'static str, path: String, ctype: &'static str, body: String| async move {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                let req = format!(
                    "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\
                     Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                c.write_all(req.as_bytes()).await.unwrap();
                let mut buf = Vec::new();
                tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await.unwrap().unwrap();
                let text = String::from_utf8_lossy(&buf).into_owned();
                let code: u16 = text[9..12].parse().unwrap();
                let body = text.split_once("\r\n\r\n").unwrap().1;
                (code, serde_json::from_str::<Value>(body).unwrap_or(Value::Null))
            };
            let get = |p: &str| call("GET", p.to_string(), "application/json", String::new());
            let (code, v) = get("/apis").await;
            assert_eq!((code, v["kind"].as_str()), (200, Some("APIGroupList")));
            let groups: Vec<&str> =
                v["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
            assert_eq!(groups, ["apps", "rbac.authorization.k8s.io"]);
            assert_eq!(v["groups"][0]["preferredVersion"]["groupVersion"], "apps/v1");
            let (_, v) = get("/apis/rbac.authorization.k8s.io/v1").await;
            assert_eq!(v["groupVersion"], "rbac.authorization.k8s.io/v1");
            assert_eq!(v["resources"].as_array().unwrap().len(), 4);
            let (_, v) = get("/apis/apps").await;
            assert_eq!((v["kind"].as_str(), v["name"].as_str()), (Some("APIGroup"), Some("apps")));
            for p in ["/apis/batch/v1/jobs", "/apis/apps/v1/namespaces/dev/jobs/x", "/api/v1/deployments"] {
                let (code, v) = get(p).await;
                assert_eq!(
                    (code, v["message"].as_str()),
                    (404, Some("the server could not find the requested resource")),
                    "{p}"
                );
            }

            let path = "/apis/apps/v1/namespaces/dev/deployments/mgr";
            let apply = |q: &str, body: &Value| {
                call("PATCH", format!("{path}{q}"), "application/apply-patch+yaml", body.to_string())
            };
            let (code, v) = apply("", &deploy("i")).await;
            assert_eq!((code, v["message"].as_str().unwrap_or("").contains("fieldManager")), (400, true), "{v}");
            let (code, created) = apply("?fieldManager=t&force=true", &deploy("i")).await;
            assert_eq!(code, 201, "{created}");
            let (code, again) = apply("?fieldManager=t&force=true", &deploy("i")).await;
            assert_eq!((code, rv_of(&again)), (200, rv_of(&created)));
            let (code, v) = get(path).await;
            assert_eq!((code, &v), (200, &created));
            let (code, _) = apply("?fieldManager=t&dryRun=All", &deploy("i")).await;
            assert_eq!(code, 400);
            let (code, v) = call("PATCH", path.into(), "application/json-patch+json", "[]".into()).await;
            assert_eq!(code, 415, "{v}");
            let (code, v) = call("DELETE", path.into(), "application/json", String::new()).await;
            assert_eq!((code, v["metadata"]["name"].as_str()), (200, Some("mgr")));
            assert_eq!(get(path).await.0, 404);
        });
    }

    #[test]
    fn timestamp_format() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
