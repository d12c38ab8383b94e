//! The daemon's supervisor: connects, makes the system changes, then runs one loop over the
//! link to the manager (up, or reconnecting), cluster updates, control requests and
//! signals, and undoes everything when it ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tpvpn_tunnel::handshake::Negotiated;
use tracing::{debug, info, warn};

use crate::connect::{close_all, connect, Target, Via};
use crate::control::{self, Authenticated, Dns, Reply, Request, Status, Tun};
use crate::dataplane::Dataplane;
use crate::intercept::Intercepts;
use crate::os::osdns;
use crate::os::routes;
use crate::state::{self, Paths, State};
use crate::Error;

use super::plan::{plan, reconnect, Rediscover};
use super::spawn::Ready;
use super::system::{dns_status, open_tun, start_dns, DnsMode, Routing, RESOLV_CONF, TUN_V4};
use super::UpOptions;

/// The daemon's whole life after the spawn: plan, connect, make and record each system
/// change, report ready, [`serve`] until `down` or a signal, then undo everything.
pub(super) async fn run(opts: UpOptions, paths: &Paths, ready: &mut Ready) -> Result<(), Error> {
    routes::check_new_device(&opts.device)?;
    let mut plan = plan(&opts).await?;
    plan.target.identity = crate::connect::Identity::of_this_machine(paths.load_or_create_client_id()?);
    // What an earlier daemon held, if it did not exit cleanly: re-claimed once connected.
    let intercepts = Intercepts::load(paths.intercepts());
    let session = connect(&plan.target).await?;
    info!(manager = %session.via, cidrs = ?session.cluster.cidrs, "connected to the manager");
    let mut never = plan.never_proxy.clone();
    // Over UDP the manager's address stays outside the tunnel; the port-forward goes to
    // the API server, which already does.
    never.extend(session.via.udp_address().map(|a| routes::host(a.ip())));
    // The laptop's own nameservers stay outside the tunnel, whatever the manager says.
    let resolv = osdns::original_of(&std::fs::read_to_string(RESOLV_CONF).unwrap_or_default());
    never.extend(osdns::parse(&resolv).nameservers.into_iter().filter(|ip| !ip.is_loopback()).map(routes::host));
    never.sort();
    never.dedup();
    let mut session = session;
    if let Err(why) =
        tpvpn_resolver::names::check_cluster_domain(&session.cluster.domain, tpvpn_resolver::Psl::shared())
    {
        warn!(domain = %session.cluster.domain, %why, "the manager's cluster domain is refused; using cluster.local");
        session.cluster.domain = "cluster.local".into();
    }

    if routes::compute(&routes::acceptable(&session.cluster.cidrs).0, &plan.also_proxy, &never).is_empty() {
        return Err(Error::Config(
            "nothing to route: the manager reported no cluster CIDRs outside --never-proxy".into(),
        ));
    }

    let mut state = State { pid: std::process::id(), device: None, routes: vec![], ..Default::default() };
    let listener = {
        let _ = std::fs::remove_file(paths.socket());
        let listener = UnixListener::bind(paths.socket())
            .map_err(|e| Error::System(format!("cannot listen on {}: {e}", paths.socket().display())))?;
        // Any local user may connect: each request is checked against its sender.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(paths.socket(), std::fs::Permissions::from_mode(0o666))
            .map_err(|e| Error::System(format!("cannot open {} to local users: {e}", paths.socket().display())))?;
        listener
    };
    let (calls_send, calls) = tokio::sync::mpsc::channel(16);
    let control_task = tokio::spawn(control::serve(listener, crate::os::user::invoking().0, calls_send));
    state::write_atomic(&paths.pid(), format!("{}\n", std::process::id()).as_bytes(), 0o644)
        .map_err(|e| Error::System(format!("cannot write {}: {e}", paths.pid().display())))?;
    let link = Link::of(&session, plan.target.clone(), plan.rediscover.clone());
    let (control_send, control_recv) = session.control;
    let result = async {
        // Again, just before: planning and connecting took time, and undo deletes the
        // recorded device; a create that fails made nothing, so nothing stays recorded.
        routes::check_new_device(&opts.device)?;
        state.device = Some(opts.device.clone());
        state.save(&paths.state())?;
        let (tun, checksum_offload) = match open_tun(&opts.device, opts.mtu) {
            Ok(t) => t,
            Err(e) => {
                state.device = None;
                state.save(&paths.state())?;
                return Err(e);
            }
        };
        // macOS picks the utun's number: what it got is what is recorded and routed.
        let device =
            if cfg!(target_os = "macos") { tun.name().unwrap_or(opts.device.clone()) } else { opts.device.clone() };
        if state.device.as_deref() != Some(device.as_str()) {
            state.device = Some(device.clone());
            state.save(&paths.state())?;
        }
        let tun = Arc::new(tun);
        let mut routing = Routing {
            device: device.clone(),
            also: plan.also_proxy.clone(),
            never: never.clone(),
            state: &mut state,
            state_path: paths.state(),
            v6_address: false,
            allow_conflicts: opts.allow_route_conflicts,
            vnat_mode: opts.vnat,
            pool: tpvpn_vnat::Pool::new(opts.virtual_subnets.clone()),
            vnat: tokio::sync::watch::Sender::new(tpvpn_vnat::Table::default()),
            cluster: vec![],
            destinations: vec![],
            held: vec![],
            dns_search: vec![],
        };
        let wanted = routing.apply(&session.cluster.cidrs)?;
        let mut updates = cluster_updates(session.conn.clone(), control_send, control_recv, intercepts.clone());
        let initial = initial_updates(&mut updates).await;
        let dns = match opts.dns_mode {
            DnsMode::Off => None,
            mode => Some(start_dns(mode, &plan, &session.cluster.domain, &session.conn, &initial, &mut routing).await?),
        };
        let stack_config =
            tpvpn_netstack::Config { mtu: usize::from(opts.mtu), checksum_offload, ..Default::default() };
        let dataplane =
            Dataplane::new(tpvpn_netstack::Stack::new(stack_config.clone()), tun.clone(), session.conn.clone())
                .with_vnat(routing.vnat.subscribe());
        let mut status = Status {
            context: plan.context.clone(),
            tun: Some(Tun { name: device.clone(), address: TUN_V4.to_string(), mtu: usize::from(opts.mtu) }),
            routes: wanted.iter().map(|r| r.to_string()).collect(),
            never_proxy: never.iter().map(|r| r.to_string()).collect(),
            dns: dns.as_ref().map_or_else(
                || Dns { mode: "off".into(), ..Default::default() },
                |(shared, mode)| dns_status(shared, mode),
            ),
            pid: Some(std::process::id()),
            namespace: Some(plan.namespace.clone()),
            version: Some(env!("CARGO_PKG_VERSION").into()),
            vnat: control::VnatMapping::all(&routing.vnat.borrow()),
            ..Default::default()
        };
        connected(&mut status, &link, session.manager_versions);
        ready.send(&format!(
            "ok connected to {}; routing {} through {}",
            session.via,
            status.routes.join(", "),
            device
        ));
        info!("up");
        let dns = dns.map(|(shared, _)| shared);
        let running = Running { dataplane, tun, stack_config, link };
        let (why, down_reply, link) =
            serve(running, calls, status, (initial, updates), &mut routing, dns, intercepts.clone()).await;
        // Intercepts end first, so that the cluster's traffic goes back to the pods at once.
        intercepts.leave_all(&link.conn, link.version).await;
        close_all(&link.conn, link.intercepts.as_ref(), b"client down");
        info!(%why, "shutting down");
        Ok::<_, Error>((why, down_reply, link.endpoint))
    }
    .await;
    control_task.abort();
    // (On the error paths before `serve`, this closes the first connection; `serve` closed
    // the one it ended with.)
    close_all(&session.conn, session.intercepts.as_ref(), b"client down");
    // Undo in reverse order of doing; the TUN device goes when its file descriptor closes
    // (the data plane is dropped by now), and `undo` deletes it if it is still there.
    let undo = state.undo();
    state::remove_files(paths);
    // The close frames went out while the changes were undone; the endpoints' draining
    // (three probe timeouts, longer while an RTT is unknown) is waited for only so long:
    // the manager knows already, and a daemon told to stop exits promptly.
    let (why, down_reply, last_endpoint) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = tokio::time::timeout(CLOSE_GRACE, session.endpoint.wait_idle()).await;
            return Err(e);
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        tokio::join!(session.endpoint.wait_idle(), last_endpoint.wait_idle())
    })
    .await;

    if let Some(call) = down_reply {
        call.reply(&Reply::Done { ok: undo.is_ok() }).await;
    }
    undo?;
    match why {
        Ended::Down | Ended::Signal(_) => Ok(()),
        Ended::Failed(why) => Err(Error::System(why)),
    }
}

/// Why the daemon stopped serving.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
enum Ended {
    /// `tpvpn down`.
    Down,
    /// SIGTERM or SIGINT.
    Signal(&'static str),
    /// It could not go on: the daemon exits 1 saying this.
    Failed(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Down => f.write_str("down requested"),
            Ended::Signal(name) => write!(f, "signal {name}"),
            Ended::Failed(why) => f.write_str(why),
        }
    }
}

/// How long an exiting daemon waits for its QUIC endpoints to go idle.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// The manager pod, when reached through a port-forward.
/// `status` of a daemon connected over `link` to a manager speaking `manager_versions`.
fn connected(status: &mut Status, link: &Link, manager_versions: (u16, u16)) {
    status.connected = true;
    status.manager = Some(link.via.to_string());
    status.transport = Some(link.via.transport().into());
    status.manager_pod = pod_of(&link.via);
    status.protocol = Some(link.version.number());
    status.manager_protocols = Some(manager_versions);
    status.identity = link.target.certificate.as_deref().map(Authenticated::of);
}

fn pod_of(via: &crate::connect::Via) -> Option<String> {
    match via {
        crate::connect::Via::PortForward { pod, .. } => Some(pod.clone()),
        crate::connect::Via::Quic(_) => None,
    }
}

/// Applies one push of the manager: routes, the listing, the resolver's tables.
fn handle_update(
    update: Update,
    status: &mut Status,
    listing: &mut control::Listing,
    routing: &mut Routing<'_>,
    dns: Option<&crate::dns::Shared>,
) {
    match update {
        // Route changes fork `ip`: off the thread the data plane runs on.
        Update::Cluster(cluster) => reroute(&cluster.cidrs, status, routing, dns, "cluster changed"),
        Update::Namespaces(names) => {
            if let Some(d) = dns {
                d.resolver().set_namespaces(names.clone());
            }
            listing.namespaces = names;
        }
        Update::Services(services) => {
            listing.services = services.iter().map(control::ServiceRow::from_info).collect();
            if let Some(d) = dns {
                d.resolver().set_services(services);
            }
        }
    }
    if let Some(d) = dns {
        let r = d.resolver();
        let domains = r.routing_domains();
        if status.dns.mode == "resolver-files" && domains != status.dns.domains {
            if let Err(e) = tokio::task::block_in_place(|| routing.resolver_files(&domains)) {
                warn!(error = %e, "routing domains changed but the resolver files were not updated");
            }
        }
        if let Some(link) = d.resolved.clone().filter(|_| domains != status.dns.domains) {
            let routing = domains.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = link.set_domains(&routing) {
                    warn!(error = %e, "routing domains changed but systemd-resolved was not updated");
                }
            });
        }
        status.dns.domains = domains;
        status.dns.filtered_namespaces = r.filtered_namespaces();
    }
}

/// A message each time the machine's routes changed and settled (a VPN adds several at
/// once). A task of its own waits for them, so that the serving loop's other events never
/// lose one.
fn route_changes() -> Option<tokio::sync::mpsc::Receiver<()>> {
    let changes =
        routes::Changes::new().inspect_err(|e| warn!(error = %e, "cannot follow this machine's route changes"));
    let changes = changes.ok()?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Full: a change is already waiting to be handled, and covers this one.
            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                break;
            }
        }
    });
    Some(rx)
}

/// How often routes kept for open connections are checked for connections that ended.
const HELD_CHECK: Duration = Duration::from_secs(5);

/// Where the laptop's open flows go (none while the data plane is down).
async fn destinations(state: &LinkState) -> Vec<std::net::IpAddr> {
    match state {
        LinkState::Up { handle, .. } => handle.destinations().await,
        _ => Vec::new(),
    }
}

/// The next message of `rx`; never, without one.
async fn next(rx: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies the manager's CIDRs `cidrs` to the routes (after the cluster or the laptop's
/// own routes changed, `why`), and the virtual address mappings to DNS and the status.
fn reroute(
    cidrs: &[ipnet::IpNet],
    status: &mut Status,
    routing: &mut Routing<'_>,
    dns: Option<&crate::dns::Shared>,
    why: &str,
) {
    // Route changes fork `ip`: off the thread the data plane runs on.
    match tokio::task::block_in_place(|| routing.apply(cidrs)) {
        Ok(wanted) => {
            let routes: Vec<String> = wanted.iter().map(|r| r.to_string()).collect();
            if routes != status.routes {
                info!(routes = ?wanted, "{why}: routes updated");
            }
            status.routes = routes;
        }
        Err(e) => warn!(error = %e, "{why} but the routes could not be updated"),
    }
    let vnat = control::VnatMapping::all(&routing.vnat.borrow());
    if vnat != status.vnat {
        if let Some(d) = dns {
            d.resolver().set_vnat(routing.vnat.borrow().clone());
        }
        status.vnat = vnat;
    }
}

/// The updates the manager sends right after the hello (namespaces and Services), read
/// before the daemon reports ready so that DNS and `tpvpn list` know the cluster at once.
async fn initial_updates(updates: &mut tokio::sync::mpsc::Receiver<Update>) -> Vec<Update> {
    let mut got = Vec::new();
    let (mut namespaces, mut services) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !(namespaces && services) {
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(Some(u)) => {
                namespaces |= matches!(u, Update::Namespaces(_));
                services |= matches!(u, Update::Services(_));
                got.push(u);
            }
            _ => break,
        }
    }
    got
}

/// Drops what the manager pushed that Kubernetes would not allow: namespaces that are not
/// RFC 1123 labels, Services whose name is not an RFC 1035 label (or whose namespace is
/// not a namespace name). Such names would reach DNS routing domains, systemd-resolved
/// and `tpvpn list`.
fn sanitize(update: Update) -> Update {
    use tpvpn_resolver::names::{is_dns1035_label, is_dns1123_label};
    match update {
        Update::Namespaces(names) => {
            let (ok, bad): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| is_dns1123_label(n));
            if !bad.is_empty() {
                warn!(count = bad.len(), first = ?bad.first(), "the manager pushed namespaces that are not names: dropped");
            }
            Update::Namespaces(ok)
        }
        Update::Services(services) => {
            let before = services.len();
            let ok: Vec<tpvpn_tunnel::ServiceInfo> =
                services.into_iter().filter(|s| is_dns1123_label(&s.namespace) && is_dns1035_label(&s.name)).collect();
            if ok.len() < before {
                warn!(count = before - ok.len(), "the manager pushed Services with names that are not names: dropped");
            }
            Update::Services(ok)
        }
        Update::Cluster(mut c) => {
            if let Err(why) = tpvpn_resolver::names::check_cluster_domain(&c.domain, tpvpn_resolver::Psl::shared()) {
                warn!(domain = %c.domain, %why, "the manager's cluster domain is refused");
                c.domain = "cluster.local".into();
            }
            Update::Cluster(c)
        }
    }
}

/// What the manager pushes on the control stream.
#[derive(Debug)]
pub(super) enum Update {
    Cluster(tpvpn_tunnel::ClusterInfo),
    Namespaces(Vec<String>),
    Services(Vec<tpvpn_tunnel::ServiceInfo>),
}

/// Reads the manager's pushes on the control stream. The catalog comes whole (a
/// version-1 manager) or in `CatalogChunk`s (a snapshot, then deltas), applied to the
/// tables here; each completed batch is passed on whole. A control stream that fails or
/// ends closes the connection, so that the daemon reconnects instead of going on with a
/// catalog that no longer changes.
fn cluster_updates(
    conn: quinn::Connection,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    intercepts: Arc<Intercepts>,
) -> tokio::sync::mpsc::Receiver<Update> {
    use std::collections::{BTreeMap, BTreeSet};
    use tpvpn_tunnel::Message;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let _send = send; // closing it would end the control stream
        let mut namespaces: BTreeSet<String> = BTreeSet::new();
        let mut services: BTreeMap<(String, String), tpvpn_tunnel::ServiceInfo> = BTreeMap::new();
        let why = loop {
            let updates = match tpvpn_tunnel::io::read_message(&mut recv).await {
                Ok(Some(Message::ClusterUpdate { cluster })) => vec![Update::Cluster(cluster)],
                Ok(Some(Message::Namespaces { names })) => vec![Update::Namespaces(names)],
                Ok(Some(Message::Services { services })) => vec![Update::Services(services)],
                Ok(Some(Message::CatalogChunk {
                    reset,
                    complete,
                    namespaces_added,
                    namespaces_removed,
                    services: upserted,
                    services_removed,
                })) => {
                    if reset {
                        namespaces.clear();
                        services.clear();
                    }
                    for n in &namespaces_removed {
                        namespaces.remove(n);
                    }
                    namespaces.extend(namespaces_added);
                    for k in &services_removed {
                        services.remove(k);
                    }
                    for s in upserted {
                        services.insert((s.namespace.clone(), s.name.clone()), s);
                    }
                    if !complete {
                        continue;
                    }
                    vec![
                        Update::Namespaces(namespaces.iter().cloned().collect()),
                        Update::Services(services.values().cloned().collect()),
                    ]
                }
                Ok(Some(Message::Revoke { namespace, service })) => {
                    intercepts.revoked(&namespace, &service);
                    continue;
                }
                Ok(Some(other)) => {
                    warn!(kind = other.kind(), "unexpected message on the control stream");
                    continue;
                }
                Ok(None) => break "the manager ended the control stream".to_string(),
                Err(e) => break format!("control stream: {e}"),
            };
            for u in updates.into_iter().map(sanitize) {
                if tx.send(u).await.is_err() {
                    return;
                }
            }
        };
        // A connection this daemon closed itself (shutting down, replaced) is not lost.
        if matches!(conn.close_reason(), Some(quinn::ConnectionError::LocallyClosed)) {
            debug!(%why, "control stream ended with the connection");
            return;
        }
        warn!(%why, "closing the connection to reconnect");
        conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"control stream failed");
    });
    rx
}

/// The connection to the manager in use, and how to make a new one.
struct Link {
    conn: quinn::Connection,
    /// How `conn` reached the manager.
    via: Via,
    endpoint: quinn::Endpoint,
    target: Target,
    rediscover: Option<Rediscover>,
    /// The protocol version spoken on `conn`.
    version: Negotiated,
    /// The manager's features ([`tpvpn_tunnel::handshake`]'s `FEATURE_*`).
    features: u64,
    /// The session's intercepts connection, if the manager takes one.
    intercepts: Option<quinn::Connection>,
}

impl Link {
    /// The link of `session`, which reached `target`.
    fn of(session: &crate::connect::Session, target: Target, rediscover: Option<Rediscover>) -> Link {
        Link {
            conn: session.conn.clone(),
            via: session.via.clone(),
            endpoint: session.endpoint.clone(),
            target,
            rediscover,
            version: session.version,
            features: session.features,
            intercepts: session.intercepts.clone(),
        }
    }
}

/// Serves the connections the manager opens toward this client over `link`
/// (intercepts: on its intercepts connection, and on the tunnel's until the manager has
/// it) and re-claims what this daemon (or a crashed one before it) held; all of it ends
/// together, aborted with the link.
fn start_intercepts(intercepts: &Arc<Intercepts>, link: &Link) -> tokio::task::JoinHandle<()> {
    let (i, conn, version) = (intercepts.clone(), link.conn.clone(), link.version);
    i.connected(&conn, link.features);
    let second = link.intercepts.clone();
    tokio::spawn(async move {
        let serve_second = async {
            if let Some(c) = second {
                i.clone().serve(c).await;
            }
        };
        tokio::join!(i.clone().serve(conn.clone()), serve_second, i.reclaim(&conn, version));
    })
}

/// Renews the link's certificate on its live session, where the manager takes that;
/// each new one goes to `renewed`.
fn start_renewals(
    link: &Link,
    renewed: &tokio::sync::mpsc::UnboundedSender<Arc<crate::cluster::certificate::Issued>>,
) -> Option<tokio::task::JoinHandle<()>> {
    let (issued, rediscover) = (link.target.certificate.clone()?, link.rediscover.clone()?);
    if link.features & tpvpn_tunnel::handshake::FEATURE_RENEW == 0 {
        info!("the manager cannot renew certificates on a session: it reconnects when one expires");
        return None;
    }
    Some(tokio::spawn(renewals(link.conn.clone(), rediscover, issued, renewed.clone())))
}

/// What `serve` runs: the data plane of the current connection, the device (kept across
/// reconnections), and the link.
struct Running {
    dataplane: Dataplane,
    tun: crate::dataplane::Tun,
    /// For the stack of each new connection.
    stack_config: tpvpn_netstack::Config,
    link: Link,
}

/// Runs the data plane and the control socket until `down` or a signal, applying the
/// manager's pushes meanwhile. When the connection to the manager is lost, the daemon
/// stays up: routes and DNS stay in place (names that need the cluster get SERVFAIL at
/// once, everything else resolves as usual), and it reconnects with backoff, then runs a
/// new data plane on the same device. Returns why it ended, the control connection of a
/// `down` request to answer after cleanup, and the link in use at the end.
async fn serve(
    running: Running,
    mut calls: tokio::sync::mpsc::Receiver<control::Call>,
    mut status: Status,
    (initial, mut updates): (Vec<Update>, tokio::sync::mpsc::Receiver<Update>),
    routing: &mut Routing<'_>,
    dns: Option<Arc<crate::dns::Shared>>,
    intercepts: Arc<Intercepts>,
) -> (Ended, Option<control::Call>, Link) {
    use tokio::signal::unix::{signal, SignalKind};
    let Running { dataplane, tun, stack_config, mut link } = running;
    let mut intercept_task = start_intercepts(&intercepts, &link);
    let (renewed_tx, mut renewed_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut renewal_task = start_renewals(&link, &renewed_tx);
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return (Ended::Failed("cannot install signal handlers".into()), None, link);
    };
    let mut state = LinkState::up(dataplane);
    // The laptop's own routes, followed while `--vnat` may map what they come to overlap.
    let mut route_changes = (routing.vnat_mode != tpvpn_vnat::Mode::Off).then(route_changes).flatten();
    let mut held_check = tokio::time::interval(HELD_CHECK);
    held_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down_reply: Option<control::Call> = None;
    let mut listing = control::Listing::default();
    for u in initial {
        handle_update(u, &mut status, &mut listing, routing, dns.as_deref());
    }
    let why = loop {
        tokio::select! {
            change = state.changed() => match change {
                Change::Lost(why) => {
                    warn!(%why, "the tunnel is down; reconnecting");
                    status.connected = false;
                    if let Some(d) = &dns {
                        *d.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        d.resolver().set_connected(false);
                    }
                    state = LinkState::Reconnecting(tokio::spawn(reconnect(link.target.clone(), link.rediscover.clone(), link.via.clone())));
                }
                Change::Failed => break Ended::Failed("reconnecting failed".into()),
                Change::Reconnected(pair) => {
                    let (session, target) = *pair;
                    info!(manager = %session.via, "reconnected to the manager");
                    let stack = tpvpn_netstack::Stack::new(stack_config.clone());
                    let dataplane = Dataplane::new(stack, tun.clone(), session.conn.clone());
                    state = LinkState::up(dataplane.with_vnat(routing.vnat.subscribe()));
                    if let Some(d) = &dns {
                        *d.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.conn.clone());
                        d.resolver().set_connected(true);
                    }
                    let rediscover = link.rediscover.clone();
                    let old = std::mem::replace(&mut link, Link::of(&session, target, rediscover));
                    intercept_task.abort();
                    intercept_task = start_intercepts(&intercepts, &link);
                    if let Some(t) = renewal_task.take() {
                        t.abort();
                    }
                    renewal_task = start_renewals(&link, &renewed_tx);

                    close_all(&old.conn, old.intercepts.as_ref(), b"replaced");
                    let (send, recv) = session.control;
                    updates = cluster_updates(session.conn.clone(), send, recv, intercepts.clone());
                    handle_update(Update::Cluster(session.cluster), &mut status, &mut listing, routing, dns.as_deref());
                    connected(&mut status, &link, session.manager_versions);
                }
            },
            _ = term.recv() => break Ended::Signal("SIGTERM"),
            _ = int.recv() => break Ended::Signal("SIGINT"),
            Some(update) = updates.recv() => handle_update(update, &mut status, &mut listing, routing, dns.as_deref()),
            Some(()) = next(&mut route_changes) => {
                routing.destinations = destinations(&state).await;
                let cidrs = routing.cluster.clone();
                reroute(&cidrs, &mut status, routing, dns.as_deref(), "the routes of this machine changed");
            }
            // Routes kept for open connections go once the connections do.
            _ = held_check.tick(), if !routing.held.is_empty() => {
                routing.destinations = destinations(&state).await;
                let cidrs = routing.cluster.clone();
                reroute(&cidrs, &mut status, routing, dns.as_deref(), "connections ended");
            }
            Some(issued) = renewed_rx.recv() => {
                status.identity = Some(Authenticated::of(&issued));
                link.target.certificate = Some(issued);
            }
            Some(call) = calls.recv() => {
                let seen = Seen { status: &status, link: &link, listing: &listing, routing, intercepts: &intercepts };
                if let Some(down) = answer(call, &state, seen).await {
                    down_reply = Some(down);
                    break Ended::Down;
                }
            }
        }
    };
    intercept_task.abort();
    if let Some(t) = renewal_task {
        t.abort();
    }
    state.end().await;
    // With the data plane gone and `tun` dropped, so is the device.
    drop(tun);
    (why, down_reply, link)
}

/// What a control request is answered from: the daemon's state at the time.
struct Seen<'a, 'r> {
    status: &'a Status,
    link: &'a Link,
    listing: &'a control::Listing,
    routing: &'a Routing<'r>,
    intercepts: &'a Arc<Intercepts>,
}

/// Answers control request `call` (those that wait for the manager by a task of their
/// own); a `down` request is given back, to be answered after cleanup.
async fn answer(call: control::Call, state: &LinkState, seen: Seen<'_, '_>) -> Option<control::Call> {
    match call.request.clone() {
        Request::Status => {
            let mut s = seen.status.clone();
            if let LinkState::Up { handle, .. } = &state {
                s.flows = handle.flows().await;
                s.tunnel_rtt_us = Some(seen.link.conn.rtt().as_micros() as u64);
            }
            s.intercepts = seen.intercepts.list();
            call.reply_later(Reply::Status(Box::new(s)));
        }
        // These wait for the manager: answered by a task of their own.
        Request::List => {
            let listing = seen.listing.clone().with_vnat(&seen.routing.vnat.borrow());
            let (mut listing, conn, version) = (listing, seen.link.conn.clone(), seen.link.version);
            let connected = seen.status.connected;
            tokio::spawn(async move {
                if connected {
                    match Intercepts::table(&conn, version).await {
                        Ok(rows) => annotate(&mut listing, &rows),
                        Err(e) => debug!(error = %e, "no intercept states for the listing"),
                    }
                }
                call.reply(&Reply::List(listing)).await;
            });
        }
        Request::Intercept(mut spec) => {
            if spec.namespace.is_empty() {
                spec.namespace = seen.status.namespace.clone().unwrap_or_else(|| "default".into());
            }
            if spec.mount.is_some() && seen.link.features & tpvpn_tunnel::handshake::FEATURE_FILES == 0 {
                let error =
                    "this manager cannot serve a pod's files (--mount): upgrade the manager (tpvpn manager install)";
                call.reply_later(Reply::Failed { error: error.into() });
                return None;
            }
            if spec.mount_readwrite && seen.link.features & tpvpn_tunnel::handshake::FEATURE_FILES_WRITE == 0 {
                let error = "this manager cannot write a pod's files (--mount-readwrite): upgrade the manager (tpvpn manager install)";
                call.reply_later(Reply::Failed { error: error.into() });
                return None;
            }
            let (i, conn, version) = (seen.intercepts.clone(), seen.link.conn.clone(), seen.link.version);
            let vnat = seen.routing.vnat.borrow().clone();
            tokio::spawn(async move {
                let reply = match intercept_and_mount(&i, &conn, version, spec).await {
                    Ok(intercepted) => Reply::Intercepted { intercepted: Box::new(intercepted.with_vnat(&vnat)) },
                    Err(e) => Reply::Failed { error: e.to_string() },
                };
                call.reply(&reply).await;
            });
        }
        Request::Leave { mut namespace, service, revoke } => {
            if namespace.is_empty() {
                namespace = seen.status.namespace.clone().unwrap_or_else(|| "default".into());
            }
            let (i, conn, version, features) =
                (seen.intercepts.clone(), seen.link.conn.clone(), seen.link.version, seen.link.features);
            tokio::spawn(async move {
                let left = if revoke {
                    i.revoke(&conn, features, &namespace, &service).await
                } else {
                    i.leave(&conn, version, &namespace, &service).await
                };
                let reply = match left {
                    Ok(left) => Reply::Left { left },
                    Err(e) => Reply::Failed { error: e.to_string() },
                };
                call.reply(&reply).await;
            });
        }
        Request::Down => return Some(call),
    }
    None
}

/// Intercepts as `spec` says and, with `--mount`, mounts the pod's files; a mount that
/// fails fails the command (the intercept stands, as `leave` can end it).
async fn intercept_and_mount(
    i: &Intercepts,
    conn: &quinn::Connection,
    version: Negotiated,
    spec: crate::intercept::Spec,
) -> Result<crate::intercept::Outcome, Error> {
    let mut outcome = i.request(conn, version, spec).await?;
    let spec = &outcome.held.spec;
    if let Some(dir) = &spec.mount {
        let said = i.mount(spec, dir).await.map_err(|e| {
            Error::System(format!(
                "intercepted {}/{}, but --mount {} failed: {e}",
                spec.namespace,
                spec.service,
                dir.display()
            ))
        })?;
        outcome.mounted = Some(said);
    }
    Ok(outcome)
}

/// Renews the certificate `issued` of the session `conn` at two thirds of its life (a
/// new key and request, with the kubeconfig's credentials; the manager checks the new
/// certificate's identity and key on this very connection), and each one after it; sends
/// each to `renewed`. After a failure it tries again (every 30 s at most) until the
/// certificate expires, when the manager ends the session and the daemon reconnects.
async fn renewals(
    conn: quinn::Connection,
    rediscover: Rediscover,
    mut issued: Arc<crate::cluster::certificate::Issued>,
    renewed: tokio::sync::mpsc::UnboundedSender<Arc<crate::cluster::certificate::Issued>>,
) {
    use std::time::SystemTime;
    let left = |at: SystemTime| at.duration_since(SystemTime::now()).unwrap_or_default();
    loop {
        tokio::time::sleep(left(issued.renew_at())).await;
        loop {
            let attempt = async {
                let new = rediscover.certificate().await?;
                let said = crate::cluster::certificate::renew(&conn, &new).await?;
                Ok::<_, Error>((new, said))
            };
            match attempt.await {
                Ok((new, said)) => {
                    info!(user = %new.user, %said, "renewed the client certificate on the session");
                    let _ = renewed.send(new.clone());
                    issued = new;
                    break;
                }
                Err(e) if left(issued.expires).is_zero() => {
                    warn!(error = %e, "the client certificate expired and cannot be renewed");
                    return;
                }
                Err(e) => {
                    let again = (left(issued.expires) / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
                    warn!(error = %e, ?again, "cannot renew the client certificate; the session ends when it expires");
                    tokio::time::sleep(again).await;
                }
            }
        }
    }
}

/// What the link to the manager is doing: each state holds the one task it waits for.
enum LinkState {
    /// Connected: the data plane of this connection runs.
    Up { dataplane: tokio::task::JoinHandle<String>, handle: crate::dataplane::Handle },
    /// The connection was lost: a new one is being made.
    Reconnecting(tokio::task::JoinHandle<(crate::connect::Session, Target)>),
}

/// How the link's state ended.
enum Change {
    /// The data plane stopped (the connection is gone), for this reason.
    Lost(String),
    /// A new connection, to the target (found again) it reached.
    Reconnected(Box<(crate::connect::Session, Target)>),
    /// Reconnecting itself failed (its task died).
    Failed,
}

impl LinkState {
    fn up(dataplane: Dataplane) -> Self {
        LinkState::Up { handle: dataplane.handle(), dataplane: tokio::spawn(dataplane.run()) }
    }

    /// Waits until the current state ends (cancel-safe: the task stays in the state).
    async fn changed(&mut self) -> Change {
        match self {
            LinkState::Up { dataplane, .. } => {
                Change::Lost(dataplane.await.unwrap_or_else(|e| format!("data plane failed: {e}")))
            }
            LinkState::Reconnecting(task) => match task.await {
                Ok(pair) => Change::Reconnected(Box::new(pair)),
                Err(_) => Change::Failed,
            },
        }
    }

    /// Stops the task; a data plane is waited for until it is gone (with it, its hold on
    /// the device).
    async fn end(self) {
        match self {
            LinkState::Up { dataplane, .. } => {
                dataplane.abort();
                let _ = dataplane.await;
            }
            LinkState::Reconnecting(task) => task.abort(),
        }
    }
}

/// Adds each Service's intercept state to the listing.
fn annotate(listing: &mut control::Listing, rows: &[tpvpn_tunnel::InterceptRow]) {
    let mut states: std::collections::HashMap<(&str, &str), Vec<String>> = std::collections::HashMap::new();
    for r in rows {
        states.entry((r.namespace.as_str(), r.service.as_str())).or_default().push(crate::intercept::state_text(r));
    }
    for s in &mut listing.services {
        if let Some(st) = states.get(&(s.namespace.as_str(), s.name.as_str())) {
            s.intercept = Some(st.join("; "));
        }
    }
}
