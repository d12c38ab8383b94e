//! Intercepts: who holds which Service port, what each node agent captures for it, and
//! the way of each captured connection to the owning client.
//!
//! The rules and the state are [`claims::Claims`], a sans-IO state machine (time and
//! the Kubernetes objects passed in, effects out); the checks on a single request are
//! pure functions in [`rules`]. [`Hub`] is the async shell every session shares: it
//! keeps the live connections, the agents' channels and the waiting requests, feeds
//! `Claims` the events, and carries out its effects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::reflector::Store;
use tokio::sync::{mpsc, oneshot, watch};
use tpvpn_tunnel::{ErrorCode, InterceptRow, Message};

pub mod claims;
pub mod rules;

pub use claims::{Captured, Refusal, Request, World, CAPTURE_TIMEOUT, RECLAIM};
pub use rules::NamespacePolicy;

use claims::{refuse, Claims, Effect};

/// The Kubernetes objects intercepts are resolved against, and a counter bumped when
/// Services or Pods change.
#[derive(Clone)]
pub struct Objects {
    pub services: Store<Service>,
    pub pods: Store<Pod>,
    pub changed: watch::Receiver<u64>,
}

impl Objects {
    fn world(&self) -> World {
        World { services: self.services.state(), pods: self.pods.state() }
    }
}

/// A connected client: where captured connections go (its intercepts connection, else
/// its tunnel's).
struct ClientLink {
    conn: quinn::Connection,
    /// Its second connection, for intercept streams only (`Role::Intercepts`).
    intercepts: Option<quinn::Connection>,
    /// What it is told on its control stream, when it takes that.
    notices: Option<Notices>,
}

/// Messages for a client's control stream (its session writes them).
pub type Notices = mpsc::UnboundedSender<Message>;

struct AgentLink {
    session: u64,
    tx: mpsc::UnboundedSender<Message>,
    /// Its connection (the manager opens file streams on it) and what it serves.
    conn: quinn::Connection,
    features: u64,
}

/// Where the files of an intercept are: the agent's connection and the pod.
pub struct FilesTarget {
    pub agent: quinn::Connection,
    /// What the agent can do (its hello's features).
    pub agent_features: u64,
    pub pod: crate::targets::PodTarget,
    /// The Pod object, for its volume mounts.
    pub spec: Option<Arc<Pod>>,
}

struct Inner {
    claims: Claims,
    clients: HashMap<u64, ClientLink>,
    agents: HashMap<String, AgentLink>,
    /// Requests waiting for their answer, by request id.
    waiters: HashMap<u64, oneshot::Sender<Result<Message, Refusal>>>,
}

impl Inner {
    /// Carries out what the claims decided.
    fn run_effects(&mut self) {
        while let Some(effect) = self.claims.poll_effect() {
            match effect {
                Effect::ToAgent { node, message } => {
                    if let Some(a) = self.agents.get(&node) {
                        let _ = a.tx.send(message);
                    }
                }
                Effect::Answer { request, result } => {
                    if let Some(w) = self.waiters.remove(&request) {
                        let _ = w.send(result);
                    }
                }
                Effect::ToClient { session, message } => {
                    if let Some(tx) = self.clients.get(&session).and_then(|c| c.notices.as_ref()) {
                        let _ = tx.send(message);
                    }
                }
            }
        }
    }
}

/// The intercept state of one manager; shared by every session.
pub struct Hub {
    objects: Option<Objects>,
    inner: Mutex<Inner>,
    sessions: AtomicU64,
}

impl Hub {
    pub fn new(objects: Option<Objects>, namespaces: NamespacePolicy) -> Arc<Hub> {
        let inner = Inner {
            claims: Claims::new(namespaces),
            clients: HashMap::new(),
            agents: HashMap::new(),
            waiters: HashMap::new(),
        };
        Arc::new(Hub { objects, inner: Mutex::new(inner), sessions: AtomicU64::new(1) })
    }

    /// Runs `f` on the state under the lock, then carries out its effects.
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut inner: MutexGuard<'_, Inner> = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut inner);
        inner.run_effects();
        out
    }

    /// A new session id.
    pub fn session_id(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed)
    }

    /// A client connected: captured connections of its intercepts go to `conn`.
    /// A client connected; `notices`, when it takes them, carries what it is told on its
    /// control stream.
    pub fn client_connected(
        &self,
        session: u64,
        conn: quinn::Connection,
        client_id: &[u8],
        who: String,
        notices: Option<Notices>,
    ) {
        self.with(|h| {
            h.claims.client_connected(session, client_id, &who);
            h.clients.insert(session, ClientLink { conn, intercepts: None, notices });
        });
    }

    /// A client's intercepts connection (`Role::Intercepts`, the same client id as its
    /// session's): from now on its captured connections go there. Returns the session it
    /// joined (the newest with that id), or `None` when there is none (or the client has
    /// no stable id) to join.
    pub fn intercepts_connected(&self, client_id: &[u8], conn: quinn::Connection) -> Option<u64> {
        self.with(|h| {
            let session = h.claims.session_of(client_id)?;
            let link = h.clients.get_mut(&session)?;
            if let Some(old) = link.intercepts.replace(conn) {
                old.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"replaced");
            }
            Some(session)
        })
    }

    /// The intercepts connection `conn` of `session` ended: its captured connections go on
    /// the session's own connection again. Lost (timed out, not closed by the client), it
    /// takes the session with it: both share the client's path, and the session's own
    /// connection may notice up to a keep-alive interval later, holding the captures.
    pub fn intercepts_gone(&self, session: u64, conn: &quinn::Connection, lost: bool) {
        self.with(|h| {
            let Some(link) = h.clients.get_mut(&session) else { return };
            if link.intercepts.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                link.intercepts = None;
                if lost {
                    link.conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"the client is unreachable");
                }
            }
        });
    }

    /// A client's connection ended: its captures are released now, its claims kept for
    /// [`RECLAIM`].
    pub fn client_gone(&self, session: u64) {
        self.with(|h| {
            if let Some(intercepts) = h.clients.remove(&session).and_then(|l| l.intercepts) {
                intercepts.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"the session ended");
            }
            h.claims.client_gone(Instant::now(), session);
        });
    }

    /// An agent connected for `node`: it gets every capture of its node.
    pub fn agent_connected(
        &self,
        node: &str,
        (session, conn): (u64, quinn::Connection),
        (version, features): (tpvpn_tunnel::handshake::Negotiated, u64),
        tx: mpsc::UnboundedSender<Message>,
    ) {
        self.with(|h| {
            h.agents.insert(node.to_string(), AgentLink { session, tx, conn, features });
            h.claims.agent_connected(node, session, version);
        });
    }

    /// The agent of `node` (session `session`) is gone: the kernel delivers to the pods
    /// again there (the agent removed its rules, or its sockets are gone).
    pub fn agent_gone(&self, node: &str, session: u64) {
        self.with(|h| {
            if h.agents.get(node).is_some_and(|a| a.session == session) {
                h.agents.remove(node);
            }
            h.claims.agent_gone(node, session);
        });
    }

    /// What an agent says of a capture.
    pub fn capture_status(&self, node: &str, id: u64, result: Result<Captured, String>) {
        self.with(|h| h.claims.capture_status(node, id, result));
    }

    /// Intercepts a Service port for the client of `session`; once every pod is
    /// captured, the reply.
    pub async fn intercept(&self, session: u64, req: Request) -> Result<Message, Refusal> {
        let world = self.objects.as_ref().ok_or_else(|| {
            refuse(
                ErrorCode::Unsupported,
                "this manager runs without Kubernetes (no --kubeconfig, not in a pod): intercepts need the cluster's Services and Pods",
            )
        })?;
        let world = world.world();
        let (tx, mut rx) = oneshot::channel();
        let now = Instant::now();
        self.with(|h| {
            let id = h.claims.intercept(now, SystemTime::now(), session, &req, &world)?;
            h.waiters.insert(id, tx);
            Ok::<_, Refusal>(())
        })?;
        let deadline = tokio::time::Instant::from_std(now + CAPTURE_TIMEOUT);
        let ended = || refuse(ErrorCode::Unavailable, "the manager is shutting down");
        match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(answer) => answer.unwrap_or_else(|_| Err(ended())),
            // The claims fail what is late: the answer is there once they have been told.
            Err(_) => {
                self.with(|h| h.claims.handle_timeout(Instant::now()));
                rx.await.unwrap_or_else(|_| Err(ended()))
            }
        }
    }

    /// Ends the client's intercepts of a Service.
    pub fn leave(&self, session: u64, namespace: &str, service: &str) -> Result<String, Refusal> {
        self.with(|h| h.claims.leave(session, namespace, service))
    }

    /// Ends every intercept of a Service, whoever holds it.
    pub fn revoke(&self, namespace: &str, service: &str, by: &str) -> Result<String, Refusal> {
        self.with(|h| h.claims.revoke(Instant::now(), namespace, service, by))
    }

    /// Where a connection captured by `capture` goes: the intercept's id and its owner's
    /// connection, while it has one.
    pub fn route(&self, node: &str, capture: u64) -> Option<(u64, quinn::Connection)> {
        self.with(|h| {
            let (intercept, session) = h.claims.route(node, capture)?;
            let owner = h.clients.get(&session)?;
            Some((intercept, owner.intercepts.clone().unwrap_or_else(|| owner.conn.clone())))
        })
    }

    /// Where the files of the intercept of `namespace/service` that the client of
    /// `session` holds are served from (`write`: by an agent that can write them).
    pub fn files(&self, session: u64, namespace: &str, service: &str, write: bool) -> Result<FilesTarget, Refusal> {
        let (agent, pod) = self.with(|h| {
            let pod = h.claims.files_target(session, namespace, service)?.clone();
            let agent = h.agents.get(&pod.node).ok_or_else(|| refuse(ErrorCode::Unavailable, "no agent"))?;
            if agent.features & tpvpn_tunnel::handshake::FEATURE_FILES == 0 {
                return Err(refuse(
                    ErrorCode::Unsupported,
                    format!(
                        "the agent of node {} cannot serve files: upgrade the agents (tpvpn manager install)",
                        pod.node
                    ),
                ));
            }
            if write && agent.features & tpvpn_tunnel::handshake::FEATURE_FILES_WRITE == 0 {
                return Err(refuse(
                    ErrorCode::Unsupported,
                    format!(
                        "the agent of node {} cannot write a pod's files (--mount-readwrite): upgrade the agents (tpvpn manager install)",
                        pod.node
                    ),
                ));
            }
            Ok(((agent.conn.clone(), agent.features), pod))
        })?;
        let spec = self
            .objects
            .as_ref()
            .and_then(|o| o.pods.get(&kube::runtime::reflector::ObjectRef::new(&pod.name).within(&pod.namespace)));
        Ok(FilesTarget { agent: agent.0, agent_features: agent.1, pod, spec })
    }

    /// Every Service's intercept state as the client of `session` sees it.
    pub fn table(&self, session: u64) -> Result<Vec<InterceptRow>, Refusal> {
        let objects = self.objects.as_ref().ok_or_else(|| {
            refuse(ErrorCode::Unsupported, "this manager runs without Kubernetes: it knows no Services to intercept")
        })?;
        // The claims under the lock; every Service against its pods without it.
        let snapshot = self.with(|h| h.claims.snapshot(session));
        Ok(snapshot.rows(&objects.world()))
    }

    /// Follows the objects and the time: captures pods that became Ready, releases those
    /// that went, drops claims whose owner did not come back in time.
    fn reconcile(&self) {
        let Some(objects) = &self.objects else { return };
        let world = objects.world();
        self.with(|h| {
            h.claims.handle_timeout(Instant::now());
            h.claims.reconcile(&world);
        });
    }
}

/// Keeps `hub` up to date while it lives: reconciles on every change of the objects,
/// and once a second (claims lapse).
pub async fn maintain(hub: Weak<Hub>) {
    let Some(mut changed) = hub.upgrade().and_then(|h| h.objects.as_ref().map(|o| o.changed.clone())) else {
        return;
    };
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
