//! The intercept control plane as a state machine (sans-IO, like `quinn-proto`): who
//! claims which Service port, which captures each node agent holds for it, which
//! requests wait for their agents. It takes the time and a plain-data [`World`] (the
//! Services and Pods) as arguments and never reads a clock, a store or a socket; what it
//! decides to send comes out as [`Effect`]s ([`Claims::poll_effect`]), and refusals as
//! typed [`Refusal`]s. [`super::Hub`] is the thin async shell around it: it owns the
//! connections, the agents' channels and the waiting requests.
//!
//! Rules: per Service port at most one global intercept and any number of personal ones
//! whose matchers do not overlap ([`rules::overlap`]), each client holding at most one
//! intercept of a port; another client asking for an overlapping one is refused with the
//! holder named. When the owner's connection ends its captures are released at once and
//! the claim is kept for [`RECLAIM`] for the same client id. A request is answered once
//! every pod's agent has answered, failed as a whole when one fails, goes away or does
//! not answer within [`CAPTURE_TIMEOUT`]; a failed re-claim keeps the claim it was to
//! renew. Pods that become Ready are captured, pods that go or change are released (and
//! re-captured as they are now); an agent that connects gets every capture of its node.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Pod, Service};
use tpvpn_tunnel::handshake::Negotiated;
use tpvpn_tunnel::{ErrorCode, InterceptRow, InterceptState, InterceptTarget, Matchers, Message};
use tracing::{info, warn};

use super::rules;
use crate::targets::{self, PodTarget, ServicePort};

/// How long a disconnected owner's claim is kept for it.
pub const RECLAIM: Duration = Duration::from_secs(60);
/// How long an intercept request waits for the agents to capture.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `user@host` kept from a client's hello (it is shown to others).
const WHO_MAX: usize = 128;

/// The Kubernetes objects as they are now: what requests and reconciliation are decided
/// against.
#[derive(Debug, Clone, Default)]
pub struct World {
    pub services: Vec<Arc<Service>>,
    pub pods: Vec<Arc<Pod>>,
}

impl World {
    fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .map(|s| &**s)
            .find(|s| s.metadata.namespace.as_deref() == Some(namespace) && s.metadata.name.as_deref() == Some(name))
    }
}

/// A refusal: its code and the one line for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

pub(crate) fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
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

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Effect {
    /// Send `message` (`Capture`, `Release`) to the agent of `node`.
    ToAgent { node: String, message: Message },
    /// The answer to intercept request `request` ([`Claims::intercept`]'s id).
    Answer { request: u64, result: Result<Message, Refusal> },
    /// Tell the client of `session` on its control stream (a `Revoke`: its intercept of
    /// that Service ended).
    ToClient { session: u64, message: Message },
}

/// What an agent says of one capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub meshed: bool,
    pub env: Vec<(String, String)>,
    /// What the agent says of the environment (variables it left out).
    pub note: String,
}

struct Capture {
    intercept: u64,
    target: PodTarget,
}

/// Whose an intercept is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The owner's session is connected.
    Connected(u64),
    /// The owner is gone; the claim is kept for it until then.
    Dormant(Instant),
}

#[derive(Debug, Clone)]
struct Intercept {
    namespace: String,
    service: String,
    port: ServicePort,
    container: String,
    matchers: Matchers,
    owner_key: Vec<u8>,
    owner_who: String,
    owner: Owner,
    since: SystemTime,
    /// Pod name to capture id.
    captures: HashMap<String, u64>,
}

impl Intercept {
    /// Whether it intercepts Service port `port` of `namespace/service`.
    fn is_on(&self, namespace: &str, service: &str, port: u16) -> bool {
        self.namespace == namespace && self.service == service && self.port.port == port
    }
}

/// A request waiting for its agents.
struct Pending {
    deadline: Instant,
    /// The pods asked, in order, with their capture ids.
    pods: Vec<(String, u64)>,
    results: HashMap<u64, Result<Captured, String>>,
    /// The claim this one replaced (restored if this one fails).
    previous: Option<Intercept>,
    warnings: Vec<String>,
}

struct Client {
    key: Vec<u8>,
    who: String,
}

struct Agent {
    session: u64,
    version: Negotiated,
}

/// The key a client's intercepts are claimed under: its stable id (at least 16 bytes: the
/// laptop's id, which the session binds to its identity), or, without one, its session;
/// the two never collide.
fn owner_key(client_id: &[u8], session: u64) -> Vec<u8> {
    if client_id.len() >= 16 {
        [&[0u8][..], client_id].concat()
    } else {
        [&[1u8][..], &session.to_be_bytes()[..]].concat()
    }
}

/// The intercept state of one manager.
#[derive(Default)]
pub struct Claims {
    /// Which namespaces' Services may be intercepted.
    namespaces: rules::NamespacePolicy,
    next: u64,
    intercepts: HashMap<u64, Intercept>,
    captures: HashMap<u64, Capture>,
    pending: HashMap<u64, Pending>,
    agents: HashMap<String, Agent>,
    clients: HashMap<u64, Client>,
    /// Intercepts revoked while their owner was away, by owner key, namespace and
    /// Service: who revoked it, and until when the owner could have re-claimed it.
    revoked: HashMap<(Vec<u8>, String, String), (String, Instant)>,
    effects: VecDeque<Effect>,
}

impl Claims {
    pub fn new(namespaces: rules::NamespacePolicy) -> Claims {
        Claims { namespaces, ..Claims::default() }
    }

    /// The next thing to do, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When [`Claims::handle_timeout`] has something to do: a request's deadline or a
    /// dormant claim's end.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let dormant = self.intercepts.values().filter_map(|i| match i.owner {
            Owner::Dormant(until) => Some(until),
            Owner::Connected(_) => None,
        });
        self.pending.values().map(|p| p.deadline).chain(dormant).min()
    }

    /// A client connected as `session` with `client_id` (16 bytes, else none) and `who`.
    pub fn client_connected(&mut self, session: u64, client_id: &[u8], who: &str) {
        let who = who.chars().take(WHO_MAX).collect();
        self.clients.insert(session, Client { key: owner_key(client_id, session), who });
    }

    /// The newest connected session of `client_id`, if it has a stable one.
    pub fn session_of(&self, client_id: &[u8]) -> Option<u64> {
        let key = (client_id.len() >= 16).then(|| owner_key(client_id, 0))?;
        self.clients.iter().filter(|(_, c)| c.key == key).map(|(s, _)| *s).max()
    }

    /// A client's connection ended: its captures are released now, its claims kept for
    /// [`RECLAIM`].
    pub fn client_gone(&mut self, now: Instant, session: u64) {
        self.clients.remove(&session);
        let ids: Vec<u64> =
            self.intercepts.iter().filter(|(_, i)| i.owner == Owner::Connected(session)).map(|(id, _)| *id).collect();
        for id in ids {
            self.release_captures(id);
            if let Some(i) = self.intercepts.get_mut(&id) {
                info!(service = %format!("{}/{}", i.namespace, i.service), port = i.port.port, "owner disconnected: capture released, claim kept for {RECLAIM:?}");
                i.owner = Owner::Dormant(now + RECLAIM);
            }
        }
    }

    /// An agent connected for `node`, speaking protocol `version`: it gets every capture
    /// of its node.
    pub fn agent_connected(&mut self, node: &str, session: u64, version: Negotiated) {
        self.agents.insert(node.to_string(), Agent { session, version });
        let mine: Vec<u64> = self.captures.iter().filter(|(_, c)| c.target.node == node).map(|(id, _)| *id).collect();
        for id in mine {
            self.send_capture(id);
        }
    }

    /// The agent of `node` (session `session`) is gone: the kernel delivers to the pods
    /// again there. Requests waiting for it fail now rather than at their deadline.
    pub fn agent_gone(&mut self, node: &str, session: u64) {
        if self.agents.get(node).is_none_or(|a| a.session != session) {
            return;
        }
        self.agents.remove(node);
        warn!(node, "agent gone: its pods are not captured until it returns");
        let lost: Vec<(u64, u64)> =
            self.captures.iter().filter(|(_, c)| c.target.node == node).map(|(id, c)| (c.intercept, *id)).collect();
        for (intercept, capture) in lost {
            self.answered(intercept, capture, Err("the agent went away".into()));
        }
    }

    /// What the agent of `node` says of capture `id`.
    pub fn capture_status(&mut self, node: &str, id: u64, result: Result<Captured, String>) {
        let Some(c) = self.captures.get(&id).filter(|c| c.target.node == node) else { return };
        match &result {
            Err(why) => warn!(id, pod = %c.target.name, %why, "capture failed"),
            Ok(_) => info!(id, pod = %c.target.name, "captured"),
        }
        let intercept = c.intercept;
        self.answered(intercept, id, result);
    }

    /// Where a connection captured by `capture` (on `node`) goes: the intercept's id and
    /// its owner's session, while it has one.
    pub fn route(&self, node: &str, capture: u64) -> Option<(u64, u64)> {
        let c = self.captures.get(&capture).filter(|c| c.target.node == node)?;
        let i = self.intercepts.get(&c.intercept)?;
        match i.owner {
            Owner::Connected(session) if self.clients.contains_key(&session) => Some((c.intercept, session)),
            _ => None,
        }
    }

    /// The pod whose files the client of `session` may read for its intercept of
    /// `namespace/service` (`intercept --mount`): a captured pod of it, on a node whose
    /// agent is connected; the first by name, so that the choice is stable.
    pub fn files_target(&self, session: u64, namespace: &str, service: &str) -> Result<&PodTarget, Refusal> {
        let held = self
            .intercepts
            .values()
            .find(|i| i.namespace == namespace && i.service == service && i.owner == Owner::Connected(session));
        let Some(held) = held else {
            return Err(refuse(
                ErrorCode::NotFound,
                format!("this client holds no intercept of {namespace}/{service}"),
            ));
        };
        let mut pods: Vec<(&String, &u64)> = held.captures.iter().collect();
        pods.sort();
        pods.into_iter()
            .filter_map(|(_, id)| self.captures.get(id))
            .map(|c| &c.target)
            .find(|t| self.agents.contains_key(&t.node))
            .ok_or_else(|| {
                refuse(
                    ErrorCode::Unavailable,
                    format!("no pod of {namespace}/{service} is captured now: no files to serve"),
                )
            })
    }

    /// Intercepts a Service port for the client of `session`. Checks everything first
    /// (nothing changes on a refusal), then claims the port and sends the captures; the
    /// answer comes as [`Effect::Answer`] with the returned id once the agents answered.
    pub fn intercept(
        &mut self,
        now: Instant,
        wall: SystemTime,
        session: u64,
        req: &Request,
        world: &World,
    ) -> Result<u64, Refusal> {
        let ns_name = format!("{}/{}", req.namespace, req.service);
        if let Some(why) = self.namespaces.refusal(&req.namespace) {
            return Err(refuse(ErrorCode::Forbidden, why));
        }
        let svc = world
            .service(&req.namespace, &req.service)
            .ok_or_else(|| refuse(ErrorCode::NotFound, format!("no Service {ns_name}")))?;
        let port = targets::service_port(svc, &req.port).map_err(|e| refuse(ErrorCode::NotFound, e))?;
        let me = self.clients.get(&session).ok_or_else(|| refuse(ErrorCode::Unavailable, "the session ended"))?;
        let (key, who) = (me.key.clone(), me.who.clone());
        // Revoked while this client was away: its daemon's re-claim is refused, once.
        if let Some((by, until)) = self.revoked.remove(&(key.clone(), req.namespace.clone(), req.service.clone())) {
            if until > now {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("the intercept of {ns_name} was revoked by {by} while this client was away: intercept it again to take it back"),
                ));
            }
        }
        let on_port = |i: &Intercept| i.is_on(&req.namespace, &req.service, port.port);
        // Someone else holding matchers that would take this request's traffic, or whose
        // traffic this request would take (for a global intercept: another global one).
        if let Some(i) = self
            .intercepts
            .values()
            .find(|i| on_port(i) && rules::overlap(&i.matchers, &req.matchers) && i.owner_key != key)
        {
            let gone = match i.owner {
                Owner::Dormant(until) => format!(
                    " (disconnected; released in {}s unless it reconnects)",
                    until.saturating_duration_since(now).as_secs()
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
        let existing =
            self.intercepts.iter().find(|(_, i)| on_port(i) && i.owner_key == key).map(|(id, i)| (*id, i.owner));
        if let Some((_, Owner::Connected(s))) = existing {
            if s != session && self.clients.contains_key(&s) {
                return Err(refuse(
                    ErrorCode::Unavailable,
                    format!("{ns_name} port {} is held by this client's earlier connection, still open; try again once it is gone", port.port),
                ));
            }
        }
        let selected = targets::selected(svc, &world.pods);
        if selected.is_empty() {
            return Err(refuse(ErrorCode::Unavailable, format!("no ready pods are selected by Service {ns_name}")));
        }
        let (mut pods, mut skipped) = (Vec::new(), Vec::new());
        for p in selected {
            match targets::pod_target(p, &port.target, &req.container) {
                Ok(t) => pods.push(t),
                Err(e) => skipped.push(e),
            }
        }
        if pods.is_empty() {
            return Err(refuse(ErrorCode::Unavailable, skipped.join("; ")));
        }
        if let Some(t) = pods.iter().find(|t| !self.agents.contains_key(&t.node)) {
            return Err(refuse(
                ErrorCode::Unavailable,
                format!(
                    "no tpvpn agent on node {} (pod {}): is DaemonSet tpvpn-agent running there? (tpvpn manager install)",
                    t.node, t.name
                ),
            ));
        }
        if !req.matchers.is_empty() {
            let old = pods
                .iter()
                .find_map(|t| self.agents.get(&t.node).filter(|a| !a.version.personal()).map(|a| (&t.node, a.version)));
            if let Some((node, version)) = old {
                return Err(refuse(
                    ErrorCode::Unsupported,
                    format!(
                        "the tpvpn agent on node {node} speaks protocol {version}, which has no personal intercepts (--http-header): upgrade the agents (tpvpn manager install)"
                    ),
                ));
            }
        }
        // Every check passed: the old claim (this client's) gives way to the new one.
        let mut warnings: Vec<String> = skipped.into_iter().map(|why| format!("not captured: {why}")).collect();
        if !req.matchers.is_empty()
            && self.intercepts.values().any(|i| on_port(i) && i.matchers.is_empty() && i.owner_key != key)
        {
            warnings.push(
                "a global intercept holds this port too: connections it took before now stay with it until they close; new ones are routed per request"
                    .to_string(),
            );
        }
        if !req.matchers.is_empty() && port.looks_like_tls() {
            warnings.push(format!(
                "port {} looks like TLS: personal intercepts route cleartext HTTP only, TLS connections reach the pods untouched",
                port.port
            ));
        }
        let previous = existing.and_then(|(old, _)| {
            // An earlier request for it still waiting gives way (and restores nothing).
            self.fail_pending(old, "replaced by a newer request for the same port");
            self.remove(old)
        });
        let since = previous.as_ref().filter(|p| p.matchers == req.matchers).map_or(wall, |p| p.since);
        let id = self.next_id();
        self.intercepts.insert(
            id,
            Intercept {
                namespace: req.namespace.clone(),
                service: req.service.clone(),
                port,
                container: req.container.clone(),
                matchers: req.matchers.clone(),
                owner_key: key,
                owner_who: who,
                owner: Owner::Connected(session),
                since,
                captures: HashMap::new(),
            },
        );
        let pods = pods.into_iter().map(|t| (t.name.clone(), self.add_capture(id, t))).collect();
        let deadline = now + CAPTURE_TIMEOUT;
        self.pending.insert(id, Pending { deadline, pods, results: HashMap::new(), previous, warnings });
        Ok(id)
    }

    /// Ends the intercepts of `namespace/service` that the client of `session` holds.
    pub fn leave(&mut self, session: u64, namespace: &str, service: &str) -> Result<String, Refusal> {
        let key = self.clients.get(&session).map(|c| c.key.clone()).unwrap_or_default();
        let ended = self.end(namespace, service, Some(&key), "left while the intercept was being set up");
        if ended.is_empty() {
            return Err(refuse(ErrorCode::NotFound, format!("you do not intercept {namespace}/{service}")));
        }
        info!(service = %format!("{namespace}/{service}"), "left");
        let ports: Vec<String> = ended.iter().map(|(port, _)| port.to_string()).collect();
        Ok(format!("left {namespace}/{service} port {}", ports.join(", ")))
    }

    /// Ends every intercept of a Service, whoever holds it (the caller checked that the
    /// asker may: `tpvpn revoke`). Its holders' sessions go on; their captures end.
    ///
    /// Each holder is told: a connected one at once ([`Effect::ToClient`]), one that is
    /// away when its daemon comes back to re-claim (refused once, naming `by`).
    pub fn revoke(&mut self, now: Instant, namespace: &str, service: &str, by: &str) -> Result<String, Refusal> {
        let mut told = HashSet::new();
        for i in self.intercepts.values().filter(|i| i.namespace == namespace && i.service == service) {
            match i.owner {
                Owner::Connected(session) if told.insert(session) => {
                    let message = Message::Revoke { namespace: namespace.into(), service: service.into() };
                    self.effects.push_back(Effect::ToClient { session, message });
                }
                Owner::Connected(_) => {}
                Owner::Dormant(until) => {
                    let key = (i.owner_key.clone(), namespace.to_string(), service.to_string());
                    self.revoked.insert(key, (by.chars().take(WHO_MAX).collect(), until.max(now)));
                }
            }
        }
        let ended = self.end(namespace, service, None, "revoked while the intercept was being set up");
        if ended.is_empty() {
            return Err(refuse(ErrorCode::NotFound, format!("no one intercepts {namespace}/{service}")));
        }
        let held: Vec<String> = ended.iter().map(|(port, who)| format!("port {port} held by {who}")).collect();
        info!(service = %format!("{namespace}/{service}"), held = %held.join(", "), "revoked");
        Ok(format!("revoked {namespace}/{service}: {}", held.join(", ")))
    }

    /// Ends the intercepts of a Service (of the owner `key`, else all): each one's port
    /// and holder, in the order they were made.
    fn end(&mut self, namespace: &str, service: &str, key: Option<&[u8]>, why: &str) -> Vec<(u16, String)> {
        let mut ids: Vec<u64> = self
            .intercepts
            .iter()
            .filter(|(_, i)| i.namespace == namespace && i.service == service)
            .filter(|(_, i)| key.is_none_or(|k| i.owner_key == k))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let mut ended = Vec::new();
        for id in ids {
            if self.pending.remove(&id).is_some() {
                self.effects
                    .push_back(Effect::Answer { request: id, result: Err(refuse(ErrorCode::Unavailable, why)) });
            }
            if let Some(i) = self.remove(id) {
                ended.push((i.port.port, i.owner_who));
            }
        }
        ended
    }

    /// Fails requests whose agents did not answer in time; ends claims whose owner did
    /// not come back in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.revoked.retain(|_, (_, until)| *until > now);
        let late: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for id in late {
            let Some(p) = self.pending.get(&id) else { continue };
            let silent: Vec<u64> = p.pods.iter().map(|(_, c)| *c).filter(|c| !p.results.contains_key(c)).collect();
            for c in silent {
                self.answered(id, c, Err(format!("the agent did not answer within {CAPTURE_TIMEOUT:?}")));
            }
        }
        let expired: Vec<u64> = self
            .intercepts
            .iter()
            .filter(|(_, i)| matches!(i.owner, Owner::Dormant(t) if t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(i) = self.intercepts.remove(&id) {
                info!(service = %format!("{}/{}", i.namespace, i.service), port = i.port.port, "owner did not return: intercept ended");
            }
        }
    }

    /// Follows Pods and Services: captures pods that became Ready, releases those that
    /// went or changed (a changed one is captured again as it is now), ends intercepts
    /// whose Service was deleted.
    pub fn reconcile(&mut self, world: &World) {
        let mut live: Vec<u64> =
            self.intercepts.iter().filter(|(_, i)| matches!(i.owner, Owner::Connected(_))).map(|(id, _)| *id).collect();
        live.sort_unstable();
        for id in live {
            let Some(i) = self.intercepts.get(&id) else { continue };
            let Some(svc) = world.service(&i.namespace, &i.service) else {
                info!(service = %format!("{}/{}", i.namespace, i.service), "Service deleted: intercept ended");
                self.fail_pending(id, "the Service was deleted");
                self.remove(id);
                continue;
            };
            let mut desired: Vec<PodTarget> = targets::selected(svc, &world.pods)
                .into_iter()
                .filter_map(|p| targets::pod_target(p, &i.port.target, &i.container).ok())
                .collect();
            let mut current: Vec<(String, u64)> = i.captures.iter().map(|(k, v)| (k.clone(), *v)).collect();
            current.sort();
            for (pod, cid) in current {
                let same = self.captures.get(&cid).is_some_and(|c| desired.contains(&c.target));
                if !same {
                    self.release_capture(cid);
                }
                desired.retain(|d| !(same && d.name == pod));
            }
            for t in desired {
                info!(pod = %t.name, "a new ready pod: capturing it too");
                self.add_capture(id, t);
            }
        }
    }

    /// What `tpvpn list` shows of the claims, for the client of `session`.
    pub fn snapshot(&self, session: u64) -> Snapshot {
        let key = self.clients.get(&session).map(|c| c.key.clone()).unwrap_or_default();
        let mut held: HashMap<(String, String), Vec<InterceptRow>> = HashMap::new();
        for i in self.intercepts.values() {
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
        Snapshot { held, agents: self.agents.keys().cloned().collect() }
    }

    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Removes intercept `id` and releases its captures.
    fn remove(&mut self, id: u64) -> Option<Intercept> {
        self.release_captures(id);
        self.intercepts.remove(&id)
    }

    fn add_capture(&mut self, intercept: u64, target: PodTarget) -> u64 {
        let id = self.next_id();
        if let Some(i) = self.intercepts.get_mut(&intercept) {
            i.captures.insert(target.name.clone(), id);
        }
        self.captures.insert(id, Capture { intercept, target });
        self.send_capture(id);
        id
    }

    /// Sends capture `id` to its node's agent, unless there is none or it is too old: a
    /// v2 agent cannot read a personal capture (it would drop its connection on the
    /// trailing matchers), so those pods stay uncaptured until it is upgraded.
    fn send_capture(&mut self, id: u64) {
        let Some(c) = self.captures.get(&id) else { return };
        let Some(i) = self.intercepts.get(&c.intercept) else { return };
        let t = &c.target;
        match self.agents.get(&t.node) {
            None => warn!(node = %t.node, pod = %t.name, "no agent on the pod's node: not captured until one connects"),
            Some(a) if !a.version.personal() && !i.matchers.is_empty() => warn!(
                node = %t.node, pod = %t.name, version = a.version.number(),
                "the agent is too old for personal intercepts: not captured until it is upgraded"
            ),
            Some(_) => {
                let message = Message::Capture {
                    id,
                    pod_namespace: t.namespace.clone(),
                    pod_name: t.name.clone(),
                    pod_ip: t.ip,
                    port: t.port,
                    host_ip: t.host_ip,
                    container: t.container.clone(),
                    container_id: t.container_id.clone(),
                    matchers: i.matchers.clone(),
                };
                self.effects.push_back(Effect::ToAgent { node: t.node.clone(), message });
            }
        }
    }

    /// Releases capture `id`: its agent is told, and a request waiting for it fails.
    fn release_capture(&mut self, id: u64) {
        let Some(c) = self.captures.remove(&id) else { return };
        if let Some(i) = self.intercepts.get_mut(&c.intercept) {
            i.captures.retain(|_, cid| *cid != id);
        }
        if self.agents.contains_key(&c.target.node) {
            self.effects.push_back(Effect::ToAgent { node: c.target.node, message: Message::Release { id } });
        }
        self.answered(c.intercept, id, Err("the intercept was released while it was set up".into()));
    }

    fn release_captures(&mut self, intercept: u64) {
        let mut ids: Vec<u64> =
            self.intercepts.get(&intercept).map(|i| i.captures.values().copied().collect()).unwrap_or_default();
        ids.sort_unstable();
        for id in ids {
            self.release_capture(id);
        }
    }

    /// Records the answer for capture `capture` of `intercept` if a request waits for it;
    /// the request is decided once every pod answered.
    fn answered(&mut self, intercept: u64, capture: u64, result: Result<Captured, String>) {
        let Some(p) = self.pending.get_mut(&intercept) else { return };
        if !p.pods.iter().any(|(_, c)| *c == capture) || p.results.contains_key(&capture) {
            return;
        }
        p.results.insert(capture, result);
        if p.results.len() == p.pods.len() {
            self.finish(intercept);
        }
    }

    /// Fails request `id`, if it is still waiting, with `why`.
    fn fail_pending(&mut self, id: u64, why: &str) {
        if let Some(mut p) = self.pending.remove(&id) {
            p.previous = None;
            let result = Err(refuse(ErrorCode::Unavailable, why));
            self.effects.push_back(Effect::Answer { request: id, result });
        }
    }

    /// Decides request `id`: every pod captured, or it fails as a whole (and a re-claim
    /// that failed keeps the claim it was to renew).
    fn finish(&mut self, id: u64) {
        let Some(p) = self.pending.remove(&id) else { return };
        let failed = p.pods.iter().find_map(|(pod, c)| match p.results.get(c) {
            Some(Err(why)) => Some(format!("cannot capture pod {pod}: {why}")),
            _ => None,
        });
        if let Some(why) = failed {
            self.remove(id);
            // Restored unless another client took matchers overlapping it meanwhile.
            let taken = |old: &Intercept| {
                self.intercepts.values().any(|i| {
                    i.is_on(&old.namespace, &old.service, old.port.port) && rules::overlap(&i.matchers, &old.matchers)
                })
            };
            if let Some(mut old) = p.previous.filter(|old| !taken(old)) {
                if let Owner::Connected(_) = old.owner {
                    // Its captures were released: it is held as for a disconnected owner,
                    // from the time of the request that replaced it.
                    old.owner = Owner::Dormant(p.deadline - CAPTURE_TIMEOUT + RECLAIM);
                }
                let restored = self.next_id();
                self.intercepts.insert(restored, old);
            }
            let result = Err(refuse(ErrorCode::Unavailable, why));
            self.effects.push_back(Effect::Answer { request: id, result });
            return;
        }
        let Some(i) = self.intercepts.get(&id) else { return };
        let mut warnings = p.warnings;
        let (mut targets, mut env) = (Vec::new(), None);
        for (pod, cid) in &p.pods {
            let (Some(Ok(c)), Some(t)) = (p.results.get(cid), self.captures.get(cid).map(|c| &c.target)) else {
                continue;
            };
            targets.push(InterceptTarget { pod: pod.clone(), addr: (t.ip, t.port).into(), meshed: c.meshed });
            if env.is_none() {
                let (kept, note) = t.without_secrets(c.env.clone());
                env = Some(kept);
                warnings.extend(note);
                warnings.extend(Some(c.note.clone()).filter(|n| !n.is_empty()));
            }
        }
        if let Some(old) = &p.previous {
            warnings.push(if old.matchers == i.matchers {
                format!("re-claimed (held since {})", utc(old.since))
            } else {
                format!("replaces your intercept of this port for {}", old.matchers)
            });
        }
        info!(service = %format!("{}/{}", i.namespace, i.service), port = i.port.port, who = %i.owner_who, pods = targets.len(), "intercepted");
        let reply =
            Message::InterceptReply { id, service_port: i.port.port, targets, env: env.unwrap_or_default(), warnings };
        self.effects.push_back(Effect::Answer { request: id, result: Ok(reply) });
    }
}

/// The claims as `tpvpn list` needs them, taken at once so that the rows are computed
/// without holding the shell's lock.
pub struct Snapshot {
    held: HashMap<(String, String), Vec<InterceptRow>>,
    agents: HashSet<String>,
}

impl Snapshot {
    /// Every Service of `world` with its intercept state.
    pub fn rows(&self, world: &World) -> Vec<InterceptRow> {
        // Pods by namespace, so that each Service looks only at its own namespace's.
        let mut pods: HashMap<&str, Vec<Arc<Pod>>> = HashMap::new();
        for p in &world.pods {
            pods.entry(p.metadata.namespace.as_deref().unwrap_or_default()).or_default().push(p.clone());
        }
        let mut rows = Vec::new();
        for svc in &world.services {
            let (Some(ns), Some(name)) = (svc.metadata.namespace.clone(), svc.metadata.name.clone()) else { continue };
            if let Some(held) = self.held.get(&(ns.clone(), name.clone())) {
                rows.extend(held.iter().cloned());
                continue;
            }
            let selected = pods.get(ns.as_str()).map_or_else(Vec::new, |p| targets::selected(svc, p));
            let on_node_without_agent = |p: &&Arc<Pod>| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_none_or(|n| !self.agents.contains(n))
            };
            let state = if selected.is_empty() {
                InterceptState::NoPods
            } else if selected.iter().any(on_node_without_agent) {
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
        rows
    }
}

/// `2026-12-01 10:02:03 UTC`.
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let t =
        i64::try_from(secs).ok().and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok()).unwrap_or_default();
    t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string()
}

#[cfg(test)]
mod tests;
