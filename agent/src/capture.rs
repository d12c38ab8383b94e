//! One capture: a pod port taken over in the pod's network namespace, and the
//! connections it catches handed to the manager.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tpvpn_tunnel::relay;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::http::{self, Router};
use crate::load::Load;
use crate::locate::locate;
use crate::netns::{Ns, NsHandle};
use crate::nft::{self, CaptureRules};
use crate::route::{Route, Sniff};
use crate::upstream::{DialError, Tunnel, Upstream};
use crate::{addrs, netns, replies, runtime, Error, Result};

/// Relay buffer per direction of a captured connection.
const RELAY_BUFFER: usize = 256 * 1024;

/// Where the agent looks on its node.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's `/proc` (the agent runs with `hostPID`).
    pub proc_root: PathBuf,
    /// Where the container runtime keeps its bundles.
    pub runtime_roots: Vec<PathBuf>,
    /// The node's own addresses, followed ([`crate::addrs::follow`]): never captured.
    pub addrs: watch::Receiver<Vec<IpAddr>>,
    /// The connections parsed at once, under their caps ([`crate::load`]).
    pub load: Arc<Load>,
}

/// What the manager asks to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub pod: String,
    pub pod_ip: IpAddr,
    pub port: u16,
    pub host_ip: Option<IpAddr>,
    pub container_id: String,
}

/// A capture of one pod port in place, shared by every intercept of that port (its
/// [`Route`]s). Dropped without [`Capture::stop`] (a capture that finished starting
/// after its session ended, one replaced), it still removes its table.
pub struct Capture {
    pub id: u64,
    router: Arc<Router>,
    ns: Ns,
    table: String,
    /// Taken when the listener is to close ([`close_after_drain`]).
    accept: Option<JoinHandle<()>>,
    /// Keeps the table's exempt sources equal to the node's addresses.
    follow: JoinHandle<()>,
    /// Set once the table is removed.
    stopped: bool,
}

/// What [`start`] reports to the manager.
pub struct Started {
    pub capture: Capture,
    pub meshed: bool,
    pub env: Vec<(String, String)>,
    /// What the user should know of the environment (variables left out).
    pub note: String,
}

impl crate::ports::Routed for Started {
    fn set_route(&self, route: Route) {
        self.capture.set_route(route);
    }
    fn remove_route(&self, id: u64) -> bool {
        self.capture.remove_route(id)
    }
}

/// Captures `req.port` in the pod's namespace and hands each connection to the manager
/// over `conn`.
pub async fn start(node: &Node, conn: quinn::Connection, req: Request) -> Result<Started> {
    let located = {
        let (node, ip, cid) = (node.clone(), req.pod_ip, req.container_id.clone());
        blocking(move || locate(&node.proc_root, &node.runtime_roots, ip, &cid)).await?
    };
    // Without the runtime's bundle, only a process of the intercepted container itself
    // (its cgroup names the container id) may tell the environment: another process of
    // the pod's namespace may be another container's, with other Secrets.
    let (env, unread) = match &located.bundle {
        Some(b) => (b.env()?, None),
        None => match runtime::pid_of_container(&node.proc_root, &req.container_id) {
            Some(pid) => {
                warn!(pod = %req.pod, pid, "no container runtime bundle found: environment read from /proc/{pid}/environ, which a process that sets its title (nginx) overwrites");
                (runtime::proc_environ(&node.proc_root, pid)?, None)
            }
            None => (Vec::new(), Some("the container's environment is not known here (no runtime bundle or process of it on the node): none copied".to_string())),
        },
    };
    let (env, note) = runtime::bounded(env);
    let note = unread.or(note);
    let ns = located.ns.clone();
    let mut node_addrs = node.addrs.clone();
    let exempt = addrs::exempt(&node_addrs.borrow_and_update(), req.host_ip, req.pod_ip);
    // The pod's namespace thread: it makes the capture, then the sockets of connections
    // to the app.
    let pod_ns = blocking(move || NsHandle::new(&ns)).await?;
    let (listener, meshed, routed_back) = {
        let (req, ns) = (req.clone(), located.ns.clone());
        pod_ns
            .run(move || {
                let meshed = nft::redirects_inbound(&nft::ruleset()?);
                let listener = transparent_listener(req.pod_ip)?;
                let rules = CaptureRules {
                    id: req.id,
                    pod_ip: req.pod_ip,
                    port: req.port,
                    listener_port: listener.local_addr()?.port(),
                    exempt,
                    loopback_only: meshed,
                };
                {
                    let _rules = replies::lock();
                    nft::apply(&nft::capture_document(&rules))?;
                }
                let routed_back = replies::Replies::install(ns, req.id, req.pod_ip.is_ipv6());
                Ok((listener, meshed, routed_back))
            })
            .await?
    };
    // Without the policy route the app's answers to a caller's address would leave the
    // pod: requests pass on from the pod's own address then, as they did before.
    let routed_back = routed_back
        .inspect_err(
            |e| warn!(pod = %req.pod, error = %e, "requests passed on to the app come from the pod's own address"),
        )
        .ok();
    let table = nft::table_name(req.id);
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            remove_table(located.ns.clone(), table).await;
            return Err(e.into());
        }
    };
    info!(pod = %req.pod, ip = %req.pod_ip, port = req.port, meshed, "capturing");
    let span = info_span!("capture", id = req.id, pod = %req.pod, port = req.port);
    let router = Router::new(Upstream::new(conn, pod_ns, routed_back));
    let accept = tokio::spawn(accept_loop(listener, router.clone(), node.load.clone()).instrument(span.clone()));
    let follow = tokio::spawn(follow_node(node_addrs, req.clone(), located.ns.clone(), table.clone()).instrument(span));
    let capture = Capture { id: req.id, router, ns: located.ns, table, accept: Some(accept), follow, stopped: false };
    Ok(Started { capture, meshed, env, note: note.unwrap_or_default() })
}

/// Refills the exempt set of `table` whenever the node's addresses change (a bridge
/// that came up after the capture, a new address).
async fn follow_node(mut node_addrs: watch::Receiver<Vec<IpAddr>>, req: Request, ns: Ns, table: String) {
    while node_addrs.changed().await.is_ok() {
        let exempt = addrs::exempt(&node_addrs.borrow_and_update(), req.host_ip, req.pod_ip);
        let (ns, table, shown) = (ns.clone(), table.clone(), exempt.clone());
        match blocking(move || netns::run_in(&ns, move || nft::apply(&nft::exempt_document(&table, &exempt)))).await {
            Ok(()) => info!(exempt = ?shown, "the node's addresses changed: probes from them stay uncaptured"),
            Err(e) => warn!(error = %e, "cannot update the node's addresses in the capture table"),
        }
    }
}

impl Capture {
    /// Routes the connections (or requests) of another intercept of this port here.
    pub fn set_route(&self, route: Route) {
        self.router.set_route(route);
    }

    /// Ends route `id`; whether any route is left.
    pub fn remove_route(&self, id: u64) -> bool {
        self.router.remove_route(id)
    }

    /// Stops capturing: new connections reach the app again. Connections captured so
    /// far go on until they end (their further HTTP requests to the app).
    pub async fn stop(mut self) {
        self.router.clear();
        self.follow.abort();
        self.stopped = true;
        remove_table(self.ns.clone(), self.table.clone()).await;
        close_after_drain(self.accept.take());
    }
}

/// How long the transparent listener keeps accepting once its table is gone: the kernel
/// steers nothing new to it then, but a handshake it steered just before completes into
/// its queue, and closing the listener would reset that caller. Accepted now, such a
/// connection goes to the pod (the router is cleared).
const DRAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// Ends the accept task after [`DRAIN`] (at once outside a runtime).
fn close_after_drain(accept: Option<JoinHandle<()>>) {
    let Some(accept) = accept else { return };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn(async move {
            tokio::time::sleep(DRAIN).await;
            accept.abort();
        })),
        Err(_) => accept.abort(),
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.router.clear();
        self.follow.abort();
        if !self.stopped {
            let (ns, table) = (self.ns.clone(), self.table.clone());
            // Namespace work runs on a thread of its own (see `netns::run_in`).
            let _ = netns::run_in(&ns, move || replies::delete_table(&table));
        }
        close_after_drain(self.accept.take());
    }
}

async fn remove_table(ns: Ns, table: String) {
    let shown = ns.path().display().to_string();
    let result = blocking(move || netns::run_in(&ns, move || replies::delete_table(&table))).await;
    if let Err(e) = result {
        // The pod may be gone, and its namespace with it.
        debug!(ns = %shown, error = %e, "capture table not removed");
    }
}

/// Removes every tpvpn table in the namespaces of the node's containers: what an agent
/// that did not exit cleanly left. Returns the tables removed.
pub fn remove_stale(proc_root: &Path, runtime_roots: &[PathBuf]) -> Vec<String> {
    let mut namespaces: Vec<PathBuf> = runtime::all(runtime_roots)
        .iter()
        .filter_map(|b| b.pid().ok())
        .map(|pid| netns::of_pid(proc_root, pid))
        .collect();
    namespaces.sort();
    namespaces.dedup();
    let mut removed = Vec::new();
    for path in namespaces {
        let shown = path.display().to_string();
        let result = netns::Ns::open(&path).and_then(|ns| {
            netns::run_in(&ns, || {
                let _rules = replies::lock();
                let tables = nft::tpvpn_tables(&nft::ruleset()?);
                for t in &tables {
                    nft::apply(&nft::delete_document(t))?;
                }
                replies::remove();
                Ok(tables)
            })
        });
        match result {
            Ok(tables) => removed.extend(tables.into_iter().map(|t| format!("{t} in {shown}"))),
            Err(e) => debug!(ns = %shown, error = %e, "not cleaned"),
        }
    }
    removed
}

/// A listening socket in the calling thread's namespace that `tproxy` may hand
/// connections to (`IP_TRANSPARENT`), on a port the kernel picks.
///
/// With `SO_REUSEADDR`, which the connections it accepts inherit: each carries the pod's
/// own address and port, and one the agent closes first stays in TIME-WAIT for a minute
/// in the pod's namespace. Reusable, those never keep the app from binding its port again
/// after the intercept (a restart, a rollout), as servers set `SO_REUSEADDR` (nginx, Go,
/// Java, Node); without it the app's `bind` failed with "Address already in use".
fn transparent_listener(pod_ip: IpAddr) -> Result<std::net::TcpListener> {
    let (domain, any): (Domain, SocketAddr) =
        if pod_ip.is_ipv4() { (Domain::IPV4, ([0, 0, 0, 0], 0).into()) } else { (Domain::IPV6, ([0u16; 8], 0).into()) };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if pod_ip.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&any.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

async fn accept_loop(listener: TcpListener, router: Arc<Router>, load: Arc<Load>) {
    let own = listener.local_addr().map(|a| a.port()).ok();
    loop {
        match listener.accept().await {
            Ok((caller, src)) => {
                let dst = match caller.local_addr() {
                    Ok(d) => d,
                    Err(_) => continue,
                };
                // Not a captured connection but one to the listener itself (any pod can
                // reach its port): never relayed, or passing it on would loop back here.
                if Some(dst.port()) == own {
                    relay::reset(caller);
                    continue;
                }
                let span = info_span!("conn", %src, %dst);
                tokio::spawn(handle(router.clone(), load.clone(), caller, src, dst).instrument(span));
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One captured connection. With only a global intercept: whole to its laptop. With a
/// personal one: HTTP is routed per request ([`http`]), anything else goes whole to the
/// global intercept or the pod.
async fn handle(router: Arc<Router>, load: Arc<Load>, mut caller: TcpStream, src: SocketAddr, dst: SocketAddr) {
    let (global, personal) = router.snapshot();
    // Past the caps on parsing, the connection passes whole (fail open).
    let slot = personal.then(|| load.admit(src.ip())).flatten();
    if personal && slot.is_none() {
        debug!(parsed = load.parsed(), "over the parsing caps: passed whole");
    }
    let prefix = if slot.is_some() {
        match http::read_prefix(&mut caller).await {
            (Sniff::Http1, prefix) => return router.serve(caller, prefix, false, src, dst).await,
            (Sniff::Http2, prefix) => return router.serve(caller, prefix, true, src, dst).await,
            (_, prefix) => prefix,
        }
    } else {
        Vec::new()
    };
    drop(slot);
    match global {
        Some(id) => to_laptop(&router, id, caller, &prefix, src, dst).await,
        None => pass_through(caller, &prefix, src, dst, router.upstream()).await,
    }
}

/// A whole connection to the laptop of capture `id` through the manager, or, when the
/// intercept has no owner, the laptop has its share of streams open or does not answer in
/// time, on to the app (a refusal by the laptop resets it); `prefix` was read from it
/// already.
async fn to_laptop(router: &Router, id: u64, caller: TcpStream, prefix: &[u8], src: SocketAddr, dst: SocketAddr) {
    match router.upstream().laptop(id, src, dst).await {
        Ok(Tunnel { mut send, recv, permit: _permit }) => {
            if send.write_all(prefix).await.is_err() {
                return relay::reset(caller);
            }
            let end = relay::tcp(caller, send, recv, RELAY_BUFFER, |_, _| {}).await;
            debug!(?end, "captured connection ended");
        }
        Err(why @ (DialError::NoOwner | DialError::Busy | DialError::Timeout)) => {
            debug!(%why, "on to the app");
            pass_through(caller, prefix, src, dst, router.upstream()).await;
        }
        Err(why @ (DialError::Refused(_) | DialError::Failed(_))) => {
            debug!(%why, "the laptop did not take it: reset");
            relay::reset(caller);
        }
    }
}

/// Joins the caller to the app (`prefix` first).
async fn pass_through(mut caller: TcpStream, prefix: &[u8], src: SocketAddr, dst: SocketAddr, upstream: &Upstream) {
    match upstream.app(dst, src).await {
        Ok(mut app) => {
            if app.write_all(prefix).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut caller, &mut app).await;
            }
        }
        Err(e) => {
            debug!(error = %e, "the app did not answer: reset");
            relay::reset(caller);
        }
    }
}

/// Runs blocking namespace work off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Netns(format!("task failed: {e}")))?
}
