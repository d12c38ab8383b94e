//! Intercepts: who holds which Service port, what each node agent captures for it, and
//! the way of each captured connection to the owning client.
//!
//! State is soft and owned by live sessions. Per Service port at most one global
//! intercept and any number of personal ones (HTTP requests matching their
//! [`Matchers`]), each client holding at most one intercept of a port; another client
//! asking for matchers that would take the holder's requests or give it theirs
//! ([`rules::overlap`]) is refused with the holder named; so is a protected namespace
//! ([`rules::NamespacePolicy`]). The agent combines
//! the captures of one pod port and routes per request (a personal match, then the
//! global intercept, then the pod). When the owning client's connection
//! ends, its captures are released at once (the pods get their traffic back) and the
//! claim is kept for [`RECLAIM`]: the same client (its `client_id`) asking again within
//! that time gets it back, anyone else is refused until it lapses. Pods that become
//! Ready later are captured too, pods that go away are released. An agent that
//! connects is sent every capture of its node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{mpsc, oneshot, watch};
use tpvpn_tunnel::handshake::PERSONAL_VERSION;
use tpvpn_tunnel::{ErrorCode, InterceptRow, InterceptState, InterceptTarget, Matchers, Message};
use tracing::{info, warn};

use crate::targets::{self, PodTarget, ServicePort};

pub mod rules;

pub use rules::NamespacePolicy;

/// How long a disconnected owner's claim is kept for it.
pub const RECLAIM: Duration = Duration::from_secs(60);
/// How long an intercept request waits for the agents to capture.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Kubernetes objects intercepts are resolved against, and a counter bumped when
/// Services or Pods change.
#[derive(Clone)]
pub struct Objects {
    pub services: Store<Service>,
    pub pods: Store<Pod>,
    pub changed: watch::Receiver<u64>,
}

/// A refusal: its code and the one line for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
}

/// What [`Hub::plan`] set up: the new intercept, the captures to wait for, the claim it
/// replaced (restored if the new one fails), and pods left out.
struct Planned {
    id: u64,
    waiting: Vec<(String, oneshot::Receiver<Result<Captured, String>>)>,
    previous: Option<Intercept>,
    warnings: Vec<String>,
}

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub namespace: String,
    pub service: String,
    pub port: String,
    pub local_port: u16,
    pub container: String,
    /// Checked and canonical ([`rules::checked`]); empty for a global intercept.
    pub matchers: Matchers,
}

/// What the agent said about one capture.
#[derive(Debug, Clone)]
struct Captured {
    meshed: bool,
    env: Vec<(String, String)>,
    /// What the agent says of the environment (variables it left out).
    note: String,
}

struct CaptureState {
    intercept: u64,
    target: PodTarget,
    matchers: Matchers,
    waiter: Option<oneshot::Sender<Result<Captured, String>>>,
}

/// Whose an intercept is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The owner's session is connected.
    Connected(u64),
    /// The owner is gone; the claim is kept for it until then.
    Dormant(Instant),
}

struct Intercept {
    namespace: String,
    service: String,
    port: ServicePort,
    container: String,
    local_port: u16,
    matchers: Matchers,
    owner_key: Vec<u8>,
    owner_who: String,
    owner: Owner,
    since: SystemTime,
    /// Pod (namespace/name) to capture id.
    captures: HashMap<String, u64>,
}

impl Intercept {
    /// Whether it intercepts Service port `port` of `namespace/service`.
    fn is_on(&self, namespace: &str, service: &str, port: u16) -> bool {
        self.namespace == namespace && self.service == service && self.port.port == port
    }
}

/// The longest `user@host` kept from a client's hello (it is shown to others).
const WHO_MAX: usize = 128;

/// The key a client's intercepts are claimed under: its 16-byte client id, or, without
/// one, its session; the two never collide.
fn owner_key(client_id: &[u8], session: u64) -> Vec<u8> {
    if client_id.len() == 16 {
        [&[0u8][..], client_id].concat()
    } else {
        [&[1u8][..], &session.to_be_bytes()[..]].concat()
    }
}

/// A connected client: where captured connections go (its intercepts connection, else
/// its tunnel's).
struct ClientLink {
    conn: quinn::Connection,
    /// Its second connection, for intercept streams only (`Role::Intercepts`).
    intercepts: Option<quinn::Connection>,
    key: Vec<u8>,
    who: String,
}

struct AgentLink {
    session: u64,
    version: u16,
    tx: mpsc::UnboundedSender<Message>,
}

impl AgentLink {
    /// Sends capture `id` to the agent, unless it is too old for it: a v2 agent cannot
    /// read a personal capture (it would drop its connection on the trailing matchers),
    /// so those pods stay uncaptured for personal intercepts until it is upgraded.
    fn send_capture(&self, id: u64, c: &CaptureState) {
        if self.version < PERSONAL_VERSION && !c.matchers.is_empty() {
            warn!(
                node = %c.target.node, pod = %c.target.name, version = self.version,
                "the agent is too old for personal intercepts: not captured until it is upgraded"
            );
            return;
        }
        let _ = self.tx.send(capture_message(id, c));
    }
}

#[derive(Default)]
struct Registry {
    next: u64,
    intercepts: HashMap<u64, Intercept>,
    captures: HashMap<u64, CaptureState>,
    agents: HashMap<String, AgentLink>,
    clients: HashMap<u64, ClientLink>,
}

/// The intercept state of one manager; shared by every session.
pub struct Hub {
    objects: Option<Objects>,
    /// Which namespaces' Services may be intercepted.
    namespaces: NamespacePolicy,
    registry: Mutex<Registry>,
    sessions: AtomicU64,
}

impl Hub {
    pub fn new(objects: Option<Objects>, namespaces: NamespacePolicy) -> Arc<Hub> {
        let hub = Arc::new(Hub { objects, namespaces, registry: Mutex::default(), sessions: AtomicU64::new(1) });
        if let Some(objects) = hub.objects.clone() {
            tokio::spawn(maintain(Arc::downgrade(&hub), objects.changed));
        }
        hub
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session id.
    pub fn session_id(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed)
    }

    /// A client connected: captured connections of its intercepts go to `conn`.
    pub fn client_connected(&self, session: u64, conn: quinn::Connection, client_id: &[u8], who: String) {
        let key = owner_key(client_id, session);
        let who: String = who.chars().take(WHO_MAX).collect();
        self.lock().clients.insert(session, ClientLink { conn, intercepts: None, key, who });
    }

    /// A client's intercepts connection (`Role::Intercepts`, the same client id as its
    /// session's): from now on its captured connections go there. Returns the session it
    /// joined (the newest with that id), or `None` when there is none (or the client has
    /// no stable id) to join.
    pub fn intercepts_connected(&self, client_id: &[u8], conn: quinn::Connection) -> Option<u64> {
        if client_id.len() != 16 {
            return None;
        }
        let key = owner_key(client_id, 0);
        let mut r = self.lock();
        let (session, link) = r.clients.iter_mut().filter(|(_, l)| l.key == key).max_by_key(|(s, _)| **s)?;
        if let Some(old) = link.intercepts.replace(conn) {
            old.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"replaced");
        }
        Some(*session)
    }

    /// The intercepts connection `conn` of `session` ended: its captured connections go on
    /// the session's own connection again. Lost (timed out, not closed by the client), it
    /// takes the session with it: both share the client's path, and the session's own
    /// connection may notice up to a keep-alive interval later, holding the captures.
    pub fn intercepts_gone(&self, session: u64, conn: &quinn::Connection, lost: bool) {
        if let Some(link) = self.lock().clients.get_mut(&session) {
            if link.intercepts.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                link.intercepts = None;
                if lost {
                    link.conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"the client is unreachable");
                }
            }
        }
    }

    /// A client's connection ended: its captures are released now, its claims kept for
    /// [`RECLAIM`].
    pub fn client_gone(&self, session: u64) {
        let mut r = self.lock();
        if let Some(intercepts) = r.clients.remove(&session).and_then(|l| l.intercepts) {
            intercepts.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"the session ended");
        }
        let now = Instant::now();
        let ids: Vec<u64> =
            r.intercepts.iter().filter(|(_, i)| i.owner == Owner::Connected(session)).map(|(id, _)| *id).collect();
        for id in ids {
            r.release_captures(id);
            if let Some(i) = r.intercepts.get_mut(&id) {
                info!(service = %format!("{}/{}", i.namespace, i.service), port = i.port.port, "owner disconnected: capture released, claim kept for {RECLAIM:?}");
                i.owner = Owner::Dormant(now + RECLAIM);
            }
        }
    }

    /// An agent connected for `node`: it gets every capture of its node.
    pub fn agent_connected(&self, node: &str, session: u64, version: u16, tx: mpsc::UnboundedSender<Message>) {
        let mut r = self.lock();
        let link = AgentLink { session, version, tx };
        for (id, c) in r.captures.iter().filter(|(_, c)| c.target.node == node) {
            link.send_capture(*id, c);
        }
        r.agents.insert(node.to_string(), link);
    }

    /// The agent of `node` (session `session`) is gone: the kernel delivers to the pods
    /// again there (the agent removed its rules, or its sockets are gone).
    pub fn agent_gone(&self, node: &str, session: u64) {
        let mut r = self.lock();
        if r.agents.get(node).is_some_and(|a| a.session == session) {
            r.agents.remove(node);
            warn!(node, "agent gone: its pods are not captured until it returns");
            // Requests waiting for its answers fail now rather than at their deadline.
            for c in r.captures.values_mut().filter(|c| c.target.node == node) {
                if let Some(w) = c.waiter.take() {
                    let _ = w.send(Err("the agent went away".into()));
                }
            }
        }
    }

    /// What an agent says of a capture.
    pub fn capture_status(
        &self,
        node: &str,
        id: u64,
        ok: bool,
        message: String,
        meshed: bool,
        env: Vec<(String, String)>,
    ) {
        let mut r = self.lock();
        let Some(c) = r.captures.get_mut(&id).filter(|c| c.target.node == node) else { return };
        let result = if ok { Ok(Captured { meshed, env, note: message.clone() }) } else { Err(message.clone()) };
        match c.waiter.take() {
            Some(w) => {
                let _ = w.send(result);
            }
            None if !ok => warn!(id, pod = %c.target.name, %message, "capture failed"),
            None => info!(id, pod = %c.target.name, "captured"),
        }
    }

    /// Intercepts a Service port for the client of `session`; once every pod is
    /// captured, the reply.
    pub async fn intercept(&self, session: u64, req: Request) -> Result<Message, Refusal> {
        let Planned { id, waiting, previous, mut warnings } = self.plan(session, &req)?;
        // One deadline for every pod, well within the client's own wait.
        let deadline = tokio::time::Instant::now() + CAPTURE_TIMEOUT;
        let mut results = Vec::new();
        for (pod, rx) in waiting {
            let r = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err("the agent went away".to_string()),
                Err(_) => Err(format!("the agent did not answer within {CAPTURE_TIMEOUT:?}")),
            };
            results.push((pod, r));
        }
        let mut r = self.lock();
        let failed =
            results.iter().find_map(|(pod, r)| r.as_ref().err().map(|why| format!("cannot capture pod {pod}: {why}")));
        let failed = failed.or_else(|| {
            (!r.intercepts.contains_key(&id)).then(|| "the intercept was released while it was set up".to_string())
        });
        if let Some(why) = failed {
            r.release_captures(id);
            r.intercepts.remove(&id);
            // A re-claim that failed keeps the claim it was to renew, for its owner (unless
            // another client took matchers overlapping those meanwhile).
            let taken = |old: &Intercept| {
                r.intercepts.values().any(|i| {
                    i.is_on(&old.namespace, &old.service, old.port.port) && rules::overlap(&i.matchers, &old.matchers)
                })
            };
            if let Some(mut old) = previous.filter(|old| !taken(old)) {
                if let Owner::Connected(_) = old.owner {
                    old.owner = Owner::Dormant(Instant::now() + RECLAIM);
                }
                r.next += 1;
                let restored = r.next;
                r.intercepts.insert(restored, old);
            }
            return Err(refuse(ErrorCode::Unavailable, why));
        }
        let Some(i) = r.intercepts.get(&id) else { unreachable!("checked above") };
        let mut targets = Vec::new();
        let mut env = Vec::new();
        for (pod, res) in &results {
            let Ok(c) = res else { continue };
            if let Some(t) = i.captures.get(pod).and_then(|cid| r.captures.get(cid)) {
                targets.push(InterceptTarget {
                    pod: t.target.name.clone(),
                    addr: (t.target.ip, t.target.port).into(),
                    meshed: c.meshed,
                });
            }
            if env.is_empty() {
                if let Some(t) = i.captures.get(pod).and_then(|cid| r.captures.get(cid)) {
                    let (kept, note) = t.target.without_secrets(c.env.clone());
                    env = kept;
                    warnings.extend(note);
                    warnings.extend(Some(c.note.clone()).filter(|n| !n.is_empty()));
                }
            }
        }
        if let Some(old) = &previous {
            warnings.push(if old.matchers == i.matchers {
                format!("re-claimed (held since {})", utc(old.since))
            } else {
                format!("replaces your intercept of this port for {}", old.matchers)
            });
        }
        info!(service = %format!("{}/{}", i.namespace, i.service), port = i.port.port, who = %i.owner_who, local_port = i.local_port, pods = targets.len(), "intercepted");
        Ok(Message::InterceptReply { id, service_port: i.port.port, targets, env, warnings })
    }

    /// Checks the request, then (nothing is changed before every check passed) claims the
    /// port and sends the captures.
    fn plan(&self, session: u64, req: &Request) -> Result<Planned, Refusal> {
        let objects = self.objects.as_ref().ok_or_else(|| {
            refuse(
                ErrorCode::Unsupported,
                "this manager runs without Kubernetes (no --kubeconfig, not in a pod): intercepts need the cluster's Services and Pods",
            )
        })?;
        let ns_name = format!("{}/{}", req.namespace, req.service);
        if let Some(why) = self.namespaces.refusal(&req.namespace) {
            return Err(refuse(ErrorCode::Forbidden, why));
        }
        let svc = objects
            .services
            .get(&ObjectRef::new(&req.service).within(&req.namespace))
            .ok_or_else(|| refuse(ErrorCode::NotFound, format!("no Service {ns_name}")))?;
        let port = targets::service_port(&svc, &req.port).map_err(|e| refuse(ErrorCode::NotFound, e))?;
        let pods = objects.pods.state();
        let mut r = self.lock();
        let me = r.clients.get(&session).ok_or_else(|| refuse(ErrorCode::Unavailable, "the session ended"))?;
        let (key, who) = (me.key.clone(), me.who.clone());
        let on_port = |i: &Intercept| i.is_on(&req.namespace, &req.service, port.port);
        // Someone else holding matchers that would take this request's traffic, or whose
        // traffic this request would take (for a global intercept: another global one).
        if let Some(i) = r
            .intercepts
            .values()
            .find(|i| on_port(i) && rules::overlap(&i.matchers, &req.matchers) && i.owner_key != key)
        {
            let gone = match i.owner {
                Owner::Dormant(until) => format!(
                    " (disconnected; released in {}s unless it reconnects)",
                    until.saturating_duration_since(Instant::now()).as_secs()
                ),
                Owner::Connected(_) => String::new(),
            };
            let what = if i.matchers.is_empty() { String::new() } else { format!(" for {}", i.matchers) };
            return Err(refuse(
                ErrorCode::Conflict,
                format!(
                    "{ns_name} port {}{what} is intercepted by {} since {}{gone}",
                    port.port,
                    i.owner_who,
                    utc(i.since)
                ),
            ));
        }
        // This client's own intercept of the port, which the new one replaces.
        let existing = r
            .intercepts
            .iter()
            .find(|(_, i)| on_port(i) && i.owner_key == key)
            .map(|(id, i)| (*id, i.owner, i.matchers == req.matchers));
        if let Some((_, Owner::Connected(s), _)) = existing {
            if s != session && r.clients.contains_key(&s) {
                return Err(refuse(
                    ErrorCode::Unavailable,
                    format!("{ns_name} port {} is held by this client's earlier connection, still open; try again once it is gone", port.port),
                ));
            }
        }
        let selected = targets::selected(&svc, &pods);
        if selected.is_empty() {
            return Err(refuse(ErrorCode::Unavailable, format!("no ready pods are selected by Service {ns_name}")));
        }
        let mut pod_targets = Vec::new();
        let mut skipped = Vec::new();
        for p in selected {
            match targets::pod_target(p, &port.target, &req.container) {
                Ok(t) => pod_targets.push(t),
                Err(e) => skipped.push(e),
            }
        }
        if pod_targets.is_empty() {
            return Err(refuse(ErrorCode::Unavailable, skipped.join("; ")));
        }
        if let Some(t) = pod_targets.iter().find(|t| !r.agents.contains_key(&t.node)) {
            return Err(refuse(
                ErrorCode::Unavailable,
                format!(
                    "no tpvpn agent on node {} (pod {}): is DaemonSet tpvpn-agent running there? (tpvpn manager install)",
                    t.node, t.name
                ),
            ));
        }
        if !req.matchers.is_empty() {
            let old = pod_targets.iter().find_map(|t| {
                r.agents.get(&t.node).filter(|a| a.version < PERSONAL_VERSION).map(|a| (&t.node, a.version))
            });
            if let Some((node, version)) = old {
                return Err(refuse(
                    ErrorCode::Unsupported,
                    format!(
                        "the tpvpn agent on node {node} speaks protocol v{version}, which has no personal intercepts (--http-header): upgrade the agents (tpvpn manager install)"
                    ),
                ));
            }
        }
        let (tls, number) = (!req.matchers.is_empty() && port.looks_like_tls(), port.port);
        let global_held = !req.matchers.is_empty()
            && r.intercepts.values().any(|i| on_port(i) && i.matchers.is_empty() && i.owner_key != key);
        // Every check passed: the old claim (this client's) gives way to the new one.
        let previous = existing.and_then(|(old, ..)| {
            r.release_captures(old);
            r.intercepts.remove(&old)
        });
        let reclaimed = existing.is_some_and(|(.., same)| same);
        r.next += 1;
        let id = r.next;
        r.intercepts.insert(
            id,
            Intercept {
                namespace: req.namespace.clone(),
                service: req.service.clone(),
                port,
                container: req.container.clone(),
                local_port: req.local_port,
                matchers: req.matchers.clone(),
                owner_key: key,
                owner_who: who,
                owner: Owner::Connected(session),
                since: previous.as_ref().filter(|_| reclaimed).map_or_else(SystemTime::now, |p| p.since),
                captures: HashMap::new(),
            },
        );
        let mut waiting = Vec::new();
        for t in pod_targets {
            let pod = t.name.clone();
            let (tx, rx) = oneshot::channel();
            r.add_capture(id, t, Some(tx));
            waiting.push((pod, rx));
        }
        let mut warnings: Vec<String> = skipped.into_iter().map(|why| format!("not captured: {why}")).collect();
        if global_held {
            warnings.push(
                "a global intercept holds this port too: connections it took before now stay with it until they close; new ones are routed per request"
                    .to_string(),
            );
        }
        if tls {
            warnings.push(format!(
                "port {number} looks like TLS: personal intercepts route cleartext HTTP only, TLS connections reach the pods untouched"
            ));
        }
        Ok(Planned { id, waiting, previous, warnings })
    }

    /// Ends the client's intercepts of a Service.
    pub fn leave(&self, session: u64, namespace: &str, service: &str) -> Result<String, Refusal> {
        let mut r = self.lock();
        let key = r.clients.get(&session).map(|c| c.key.clone()).unwrap_or_default();
        let ids: Vec<u64> = r
            .intercepts
            .iter()
            .filter(|(_, i)| i.namespace == namespace && i.service == service && i.owner_key == key)
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return Err(refuse(ErrorCode::NotFound, format!("you do not intercept {namespace}/{service}")));
        }
        let mut ports = Vec::new();
        for id in ids {
            r.release_captures(id);
            if let Some(i) = r.intercepts.remove(&id) {
                ports.push(i.port.port.to_string());
            }
        }
        info!(service = %format!("{namespace}/{service}"), "left");
        Ok(format!("left {namespace}/{service} port {}", ports.join(", ")))
    }

    /// Where a connection captured by `capture` goes: the intercept's id and its owner's
    /// connection, while it has one.
    pub fn route(&self, node: &str, capture: u64) -> Option<(u64, quinn::Connection)> {
        let r = self.lock();
        let c = r.captures.get(&capture).filter(|c| c.target.node == node)?;
        let i = r.intercepts.get(&c.intercept)?;
        let Owner::Connected(session) = i.owner else { return None };
        let owner = r.clients.get(&session)?;
        Some((c.intercept, owner.intercepts.clone().unwrap_or_else(|| owner.conn.clone())))
    }

    /// Every Service's intercept state as the client of `session` sees it.
    pub fn table(&self, session: u64) -> Result<Vec<InterceptRow>, Refusal> {
        let objects = self.objects.as_ref().ok_or_else(|| {
            refuse(ErrorCode::Unsupported, "this manager runs without Kubernetes: it knows no Services to intercept")
        })?;
        // Pods by namespace, so that each Service looks only at its own namespace's.
        let mut pods: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
        for p in objects.pods.state() {
            pods.entry(p.metadata.namespace.clone().unwrap_or_default()).or_default().push(p);
        }
        // What the registry says, taken under its lock; the rest (every Service against
        // its namespace's pods) without it, so that sessions and agents are not held up.
        let (held_rows, agents) = {
            let r = self.lock();
            let key = r.clients.get(&session).map(|c| c.key.clone()).unwrap_or_default();
            let mut held: HashMap<(String, String), Vec<InterceptRow>> = HashMap::new();
            for i in r.intercepts.values() {
                held.entry((i.namespace.clone(), i.service.clone())).or_default().push(InterceptRow {
                    namespace: i.namespace.clone(),
                    service: i.service.clone(),
                    state: InterceptState::Intercepted,
                    holder: if i.matchers.is_empty() {
                        i.owner_who.clone()
                    } else {
                        format!("{} for {}", i.owner_who, i.matchers)
                    },
                    port: i.port.port,
                    since: i.since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    mine: i.owner_key == key,
                });
            }
            (held, r.agents.keys().cloned().collect::<std::collections::HashSet<String>>())
        };
        let mut rows = Vec::new();
        for svc in objects.services.state() {
            let (Some(ns), Some(name)) = (svc.metadata.namespace.clone(), svc.metadata.name.clone()) else { continue };
            if let Some(held) = held_rows.get(&(ns.clone(), name.clone())) {
                rows.extend(held.iter().cloned());
                continue;
            }
            let selected = pods.get(&ns).map_or_else(Vec::new, |p| targets::selected(&svc, p));
            let state = if selected.is_empty() {
                InterceptState::NoPods
            } else if selected
                .iter()
                .any(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_none_or(|n| !agents.contains(n)))
            {
                InterceptState::NoAgent
            } else {
                InterceptState::Ready
            };
            rows.push(InterceptRow {
                namespace: ns,
                service: name,
                state,
                holder: String::new(),
                port: 0,
                since: 0,
                mine: false,
            });
        }
        rows.sort_by(|a, b| (&a.namespace, &a.service, a.port).cmp(&(&b.namespace, &b.service, b.port)));
        Ok(rows)
    }

    /// Follows Pods and Services: captures pods that became Ready, releases those that
    /// went; drops claims whose owner did not come back in time.
    fn reconcile(&self) {
        let Some(objects) = &self.objects else { return };
        let pods = objects.pods.state();
        let mut r = self.lock();
        let now = Instant::now();
        let expired: Vec<u64> = r
            .intercepts
            .iter()
            .filter(|(_, i)| matches!(i.owner, Owner::Dormant(t) if t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(i) = r.intercepts.remove(&id) {
                info!(service = %format!("{}/{}", i.namespace, i.service), port = i.port.port, "owner did not return: intercept ended");
            }
        }
        let live: Vec<u64> =
            r.intercepts.iter().filter(|(_, i)| matches!(i.owner, Owner::Connected(_))).map(|(id, _)| *id).collect();
        for id in live {
            let Some(i) = r.intercepts.get(&id) else { continue };
            let Some(svc) = objects.services.get(&ObjectRef::new(&i.service).within(&i.namespace)) else {
                info!(service = %format!("{}/{}", i.namespace, i.service), "Service deleted: intercept ended");
                r.release_captures(id);
                r.intercepts.remove(&id);
                continue;
            };
            let desired: HashMap<String, PodTarget> = targets::selected(&svc, &pods)
                .into_iter()
                .filter_map(|p| targets::pod_target(p, &i.port.target, &i.container).ok())
                .map(|t| (t.name.clone(), t))
                .collect();
            let current: Vec<(String, u64)> = i.captures.iter().map(|(k, v)| (k.clone(), *v)).collect();
            for (pod, cid) in &current {
                let same = desired.get(pod).zip(r.captures.get(cid)).is_some_and(|(d, c)| *d == c.target);
                if !same {
                    r.release_capture(*cid);
                    if let Some(i) = r.intercepts.get_mut(&id) {
                        i.captures.remove(pod);
                    }
                }
            }
            let have: Vec<String> =
                r.intercepts.get(&id).map(|i| i.captures.keys().cloned().collect()).unwrap_or_default();
            for (pod, t) in desired {
                if !have.contains(&pod) {
                    info!(%pod, "a new ready pod: capturing it too");
                    r.add_capture(id, t, None);
                }
            }
        }
    }
}

impl Registry {
    fn add_capture(
        &mut self,
        intercept: u64,
        target: PodTarget,
        waiter: Option<oneshot::Sender<Result<Captured, String>>>,
    ) {
        self.next += 1;
        let id = self.next;
        let pod = target.name.clone();
        let matchers = self.intercepts.get(&intercept).map(|i| i.matchers.clone()).unwrap_or_default();
        let state = CaptureState { intercept, target, matchers, waiter };
        match self.agents.get(&state.target.node) {
            Some(a) => a.send_capture(id, &state),
            None => {
                warn!(node = %state.target.node, %pod, "no agent on the pod's node: not captured until one connects")
            }
        }
        self.captures.insert(id, state);
        if let Some(i) = self.intercepts.get_mut(&intercept) {
            i.captures.insert(pod, id);
        }
    }

    fn release_capture(&mut self, id: u64) {
        if let Some(c) = self.captures.remove(&id) {
            if let Some(a) = self.agents.get(&c.target.node) {
                let _ = a.tx.send(Message::Release { id });
            }
        }
    }

    fn release_captures(&mut self, intercept: u64) {
        let ids: Vec<u64> = self
            .intercepts
            .get_mut(&intercept)
            .map(|i| i.captures.drain().map(|(_, c)| c).collect())
            .unwrap_or_default();
        for id in ids {
            self.release_capture(id);
        }
    }
}

fn capture_message(id: u64, c: &CaptureState) -> Message {
    Message::Capture {
        id,
        pod_namespace: c.target.namespace.clone(),
        pod_name: c.target.name.clone(),
        pod_ip: c.target.ip,
        port: c.target.port,
        host_ip: c.target.host_ip,
        container: c.target.container.clone(),
        container_id: c.target.container_id.clone(),
        matchers: c.matchers.clone(),
    }
}

/// Reconciles on every change of the objects, and once a second (claims lapse).
async fn maintain(hub: std::sync::Weak<Hub>, mut changed: watch::Receiver<u64>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(hub) = hub.upgrade() else { return };
        hub.reconcile();
    }
}

/// `2026-12-01 10:02:03 UTC`.
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_115_723)), "2026-12-01 09:02:03 UTC");
        assert_eq!(utc(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29 00:00:00 UTC");
    }
}
