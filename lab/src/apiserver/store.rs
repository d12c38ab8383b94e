//! The in-memory object store: objects, the global resourceVersion, the bounded
//! event history watches replay from, create/update/apply/delete with the real API
//! server's defaulting.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::*;

/// One recorded change.
#[derive(Debug, Clone)]
pub(super) struct Event {
    pub(super) rv: u64,
    pub(super) kind: &'static str,
    pub(super) res: Resource,
    /// The object at `rv` (for DELETED: the last state, with the deletion's rv).
    pub(super) obj: Value,
    /// For MODIFIED: the object before the change (selector transitions).
    pub(super) prev: Option<Value>,
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
    pub(super) objects: BTreeMap<(Resource, String, String), Value>,
    pub(super) rv: u64,
    pub(super) history: VecDeque<Event>,
    pub(super) history_limit: usize,
    /// Every event after this resourceVersion is still in `history`.
    pub(super) compacted: u64,
    /// Compactions so far; open watches end when it changes.
    pub(super) compactions: u64,
    /// Services' allocated ClusterIPs and node ports, to whom: checked on every Service
    /// written without scanning every other Service.
    pub(super) cluster_ips: HashMap<String, (Resource, String, String)>,
    pub(super) node_ports: HashMap<u64, (Resource, String, String)>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(DEFAULT_HISTORY)
    }
}

impl Store {
    /// An empty store keeping the last `history_limit` events.
    pub fn new(history_limit: usize) -> Store {
        Store {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit,
            compacted: 0,
            compactions: 0,
            cluster_ips: HashMap::new(),
            node_ports: HashMap::new(),
        }
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
        self.index(&k, None, Some(&obj));
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
    pub(super) fn store_modified(
        &mut self,
        res: Resource,
        k: (Resource, String, String),
        mut obj: Value,
        old: Value,
    ) -> Value {
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.index(&k, Some(&old), Some(&obj));
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

    pub(super) fn delete_one(&mut self, res: Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let k = key(res, ns, name);
        let Some(mut obj) = self.objects.remove(&k) else {
            return Err(ApiError::not_found(res, name));
        };
        self.index(&k, Some(&obj), None);
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(Event { rv, kind: "DELETED", res, obj: obj.clone(), prev: None });
        Ok(obj)
    }

    /// Keeps the Service indexes in step with `k` going from `old` to `new`.
    pub(super) fn index(&mut self, k: &(Resource, String, String), old: Option<&Value>, new: Option<&Value>) {
        if k.0 != Resource::Services {
            return;
        }
        let ports = |o: &Value| -> Vec<u64> {
            o["spec"]["ports"].as_array().into_iter().flatten().filter_map(|p| p["nodePort"].as_u64()).collect()
        };
        if let Some(o) = old {
            if let Some(ip) = o["spec"]["clusterIP"].as_str() {
                self.cluster_ips.remove(ip);
            }
            for p in ports(o) {
                self.node_ports.remove(&p);
            }
        }
        if let Some(o) = new {
            if let Some(ip) = o["spec"]["clusterIP"].as_str().filter(|ip| !ip.is_empty() && *ip != "None") {
                self.cluster_ips.insert(ip.to_string(), k.clone());
            }
            for p in ports(o) {
                self.node_ports.insert(p, k.clone());
            }
        }
    }

    pub(super) fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub(super) fn record(&mut self, ev: Event) {
        self.history.push_back(ev);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// Checks kind/apiVersion/name/namespace of a request body and fills them in; returns the name.
    pub(super) fn prepare(
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
    pub(super) fn apply_defaults(
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
            | Resource::RoleBindings
            | Resource::ResourceQuotas
            | Resource::ConfigMaps
            | Resource::CertificateSigningRequests => {}
        }
        Ok(())
    }

    pub(super) fn default_service(
        &self,
        k: &(Resource, String, String),
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let name = k.2.as_str();
        if !obj["spec"].is_object() {
            obj["spec"] = json!({});
        }
        // Node ports taken by other Services and explicitly by this one.
        let port_list = |o: &Value| o["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let used_ports: HashSet<u64> = self
            .node_ports
            .iter()
            .filter(|(_, owner)| *owner != k)
            .map(|(p, _)| *p)
            .chain(port_list(obj).iter().filter_map(|p| p["nodePort"].as_u64()))
            .collect();
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
            let used = |ip: &str| self.cluster_ips.get(ip).is_some_and(|owner| owner != k);
            if asked.is_empty() {
                (1..=254)
                    .map(|h| format!("10.96.100.{h}"))
                    .find(|ip| !used(ip))
                    .ok_or_else(|| ApiError::new(500, "InternalError", format!("range {CLUSTER_IP_POOL} is full")))?
            } else if asked != "None" && used(&asked) {
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
pub(super) fn filtered(e: &Event, filter: &Filter) -> Option<&'static str> {
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

pub(super) fn key(res: Resource, ns: Option<&str>, name: &str) -> (Resource, String, String) {
    (res, ns.unwrap_or("").to_string(), name.to_string())
}

/// Key range of every object of `res`.
pub(super) fn range(res: Resource) -> std::ops::RangeInclusive<(Resource, String, String)> {
    let max = String::from(char::MAX);
    (res, String::new(), String::new())..=(res, max.clone(), max)
}

/// Keeps the node ports of a Service's ports an apply left without one (matched by port and protocol).
pub(super) fn keep_node_ports(obj: &mut Value, old: &Value) {
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
pub(super) fn merge(target: &mut Value, patch: &Value) {
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
pub(super) fn new_uid() -> String {
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
pub(crate) fn rfc3339_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let t =
        i64::try_from(secs).ok().and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok()).unwrap_or_default();
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

// ---------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------
