//! `tpvpn up`, `down` and `status`: the daemon's life cycle.
//!
//! `up` without `--foreground` starts the same binary with `--foreground` as a
//! background daemon in its own session and waits for one line from it: `ok ...` once
//! routes are in place and the tunnel is up, or the error. The daemon records each
//! system change in the state file before making it, and undoes them all on `down`,
//! SIGTERM and SIGINT; after a crash the next `up` or `down` undoes them from the file.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::connect::{connect, Target};
use crate::control::{self, Dns, Reply, Request, Status, Tun};
use crate::dataplane::Dataplane;
use crate::intercept::Intercepts;
use crate::state::{self, Paths, State};
use crate::{discovery, kubeconfig, osdns};
use crate::{routes, Error};

/// Environment variable that marks the daemon child started by `tpvpn up`.
pub const DAEMON_ENV: &str = "TPVPN_DAEMON_CHILD";
/// Address of the TUN device; the source of every routed flow.
pub const TUN_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// IPv6 address of the TUN device, added when an IPv6 CIDR is routed.
pub const TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd74, 0x7076, 0x706e, 0, 0, 0, 0, 1);

/// Where `up` learns how to reach the manager.
#[derive(Debug, Clone)]
pub enum Source {
    /// `--manager`, `--manager-ca` and `--token-file`.
    Direct { manager: String, ca_file: PathBuf, token_file: PathBuf },
    /// A kubeconfig context; `manager` overrides the discovered address.
    Kube { kubeconfig: Option<PathBuf>, context: Option<String>, manager: Option<String>, manager_namespace: String },
}

/// Options of `tpvpn up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub source: Source,
    pub never_proxy: Vec<IpNet>,
    pub also_proxy: Vec<IpNet>,
    pub device: String,
    pub mtu: u16,
    pub dns_mode: DnsMode,
    /// `--namespace`: the connected namespace (else the context's, else `default`).
    pub namespace: Option<String>,

    /// Route CIDRs that overlap routes already on the machine.
    pub allow_route_conflicts: bool,
}

/// Checks what `up` needs from the machine before anything is changed.
pub fn preflight() -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Config("tpvpn up needs root to create the TUN device and routes: run it with sudo".into()));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(Error::Config(
            "no /dev/net/tun: load the tun module (modprobe tun) or run where TUN devices are available".into(),
        ));
    }
    Ok(())
}

/// `tpvpn up` without `--foreground`: starts the daemon and waits for its first line.
pub fn up_background(args: &[String], paths: &Paths) -> Result<String, Error> {
    preflight()?;
    state::prepare_runtime_dir(&paths.dir)?;
    refuse_if_running(paths)?;
    let log = state::create_new(&paths.log(), 0o644)
        .map_err(|e| Error::System(format!("cannot create {}: {e}", paths.log().display())))?;
    let exe = std::env::current_exe().map_err(|e| Error::System(format!("cannot find my own binary: {e}")))?;
    let mut child = Command::new(exe)
        .args(args)
        .arg("--foreground")
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| Error::System(format!("cannot start the daemon: {e}")))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(Error::System("daemon has no stdout".into()));
    };
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let line = line.trim();
    if let Some(ok) = line.strip_prefix("ok ") {
        Ok(ok.to_string())
    } else {
        let _ = child.wait();
        let msg = line.strip_prefix("error: ").unwrap_or(line);
        if msg.is_empty() {
            Err(Error::System(format!("the daemon exited without a word; see {}", paths.log().display())))
        } else {
            Err(Error::Config(msg.to_string()))
        }
    }
}

fn refuse_if_running(paths: &Paths) -> Result<(), Error> {
    let rt = current_thread()?;
    if let Some(Reply::Status(s)) =
        rt.block_on(control::request(&paths.socket(), Request::Status, Duration::from_secs(2)))?
    {
        return Err(Error::Config(format!(
            "already connected (pid {}); run tpvpn down first",
            s.pid.map_or("?".into(), |p| p.to_string())
        )));
    }
    if let Some(pid) = state::clean_stale(paths)? {
        eprintln!("tpvpn: undid the changes of an earlier tpvpn (pid {pid}) that did not exit cleanly");
    } else if osdns::restore_left_behind(std::path::Path::new(RESOLV_CONF))? {
        eprintln!("tpvpn: put back the original {RESOLV_CONF} that a tpvpn connected across a reboot left behind");
    }
    Ok(())
}

/// Reports readiness (or failure) to `tpvpn up` waiting in the foreground, once.
struct Ready {
    daemon: bool,
    done: bool,
}

impl Ready {
    fn send(&mut self, line: &str) {
        if self.done {
            return;
        }
        self.done = true;
        if self.daemon {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        } else {
            eprintln!("tpvpn: {line}");
        }
    }
}

/// `tpvpn up --foreground` (also what the background daemon runs).
pub fn up_foreground(opts: UpOptions, paths: Paths) -> Result<(), Error> {
    let daemon = std::env::var_os(DAEMON_ENV).is_some();
    let mut ready = Ready { daemon, done: false };
    if daemon {
        // Leave the terminal's session so that its hang-up does not reach us.
        let _ = nix::unistd::setsid();
    }
    // Descriptors up to the hard limit (the DNS server sizes its bounds from it).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    let result = (|| {
        preflight()?;
        state::prepare_runtime_dir(&paths.dir)?;
        if !daemon {
            refuse_if_running(&paths)?;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_WORKERS)
            .enable_all()
            .build()
            .map_err(|e| Error::System(e.to_string()))?;
        rt.block_on(run(opts, &paths, &mut ready))
    })();
    if let Err(e) = &result {
        ready.send(&format!("error: {e}"));
    }
    result
}

/// What the source tells `up`: the manager target and what to keep out of (or add to)
/// the tunnel.
struct Plan {
    target: Target,
    context: Option<String>,
    never_proxy: Vec<IpNet>,
    also_proxy: Vec<IpNet>,
    /// The connected namespace: short names search it.
    namespace: String,
    include_suffixes: Vec<String>,
    exclude_suffixes: Vec<String>,
    /// Where the credentials came from, when from the cluster.
    rediscover: Option<Rediscover>,
}

/// How to read the manager's credentials from the cluster again (kubeconfig mode).
#[derive(Debug, Clone)]
struct Rediscover {
    resolved: kubeconfig::Resolved,
    manager_flag: Option<String>,
    namespace: String,
}

impl Rediscover {
    /// `target` with the CA and token the cluster holds now (the manager may have been
    /// reinstalled since). The address is kept: the routes keep exactly that address out
    /// of the tunnel.
    async fn refresh(&self, target: &Target) -> Result<Target, Error> {
        let d = discovery::discover(&self.resolved, self.manager_flag.clone(), &self.namespace).await?;
        Ok(Target { manager: target.manager.clone(), identity: target.identity.clone(), ..d.target })
    }
}

async fn plan(opts: &UpOptions) -> Result<Plan, Error> {
    match &opts.source {
        Source::Direct { manager, ca_file, token_file } => Ok(Plan {
            target: Target::from_files(manager.clone(), ca_file, token_file)?,
            context: None,
            never_proxy: opts.never_proxy.clone(),
            also_proxy: opts.also_proxy.clone(),
            namespace: opts.namespace.clone().unwrap_or_else(|| "default".into()),
            include_suffixes: vec![],
            exclude_suffixes: vec![],
            rediscover: None,
        }),
        Source::Kube { kubeconfig, context, manager, manager_namespace } => {
            let r = kubeconfig::resolve(kubeconfig.as_deref(), context.as_deref())?;
            let d = discovery::discover(&r, manager.clone(), manager_namespace).await?;
            info!(context = %r.context, manager = %d.target.manager, "discovered the manager");
            let mut never = opts.never_proxy.clone();
            never.extend(r.extension.never_proxy.iter().copied());
            // The API server must stay reachable outside the tunnel.
            never.extend(d.api_server_ips.iter().map(|ip| routes::host(*ip)));
            let mut also = opts.also_proxy.clone();
            also.extend(r.extension.also_proxy.iter().copied());
            let rediscover =
                Rediscover { resolved: r.clone(), manager_flag: manager.clone(), namespace: manager_namespace.clone() };
            Ok(Plan {
                target: d.target,
                rediscover: Some(rediscover),
                context: Some(r.context),
                never_proxy: never,
                also_proxy: also,
                namespace: opts.namespace.clone().or(r.namespace).unwrap_or_else(|| "default".into()),
                include_suffixes: r.extension.include_suffixes,
                exclude_suffixes: r.extension.exclude_suffixes,
            })
        }
    }
}

/// The routes on the TUN device. Every change is recorded in the state file before it
/// is made, so that a crash at any point leaves a record that undoes it.
struct Routing<'a> {
    device: String,
    also: Vec<IpNet>,
    never: Vec<IpNet>,
    state: &'a mut State,
    state_path: PathBuf,
    v6_address: bool,
    allow_conflicts: bool,
}

impl Routing<'_> {
    /// Makes the device's routes those for `cluster_cidrs`: adds the new ones first,
    /// then removes the stale ones, so that no destination is unrouted in between. The
    /// manager is not trusted with the laptop's routing: its CIDRs wider than a /8 are
    /// refused (they would take over the default route), directly connected subnets and
    /// the laptop's own nameservers are never routed, and at most
    /// [`routes::MAX_ROUTES`] routes are installed. Each batch is recorded in the state
    /// file before it is made, and made with one `ip -batch`.
    fn apply(&mut self, cluster_cidrs: &[IpNet]) -> Result<Vec<IpNet>, Error> {
        let (cluster, refused) = routes::acceptable(cluster_cidrs);
        if !refused.is_empty() {
            warn!(?refused, "the manager asked to route CIDRs wider than a /8: refused");
        }
        let existing = routes::existing()?;
        let mut never = self.never.clone();
        never.extend(existing.iter().filter(|e| e.connected && e.dev != self.device).map(|e| e.dst));
        let mut wanted = routes::compute(&cluster, &self.also, &never);
        if wanted.len() > routes::MAX_ROUTES {
            warn!(
                asked = wanted.len(),
                kept = routes::MAX_ROUTES,
                "the manager asked for too many routes: the rest are left out"
            );
            wanted.truncate(routes::MAX_ROUTES);
        }
        if !self.v6_address && wanted.iter().any(|r| r.addr().is_ipv6()) {
            routes::add_address(&self.device, &IpNet::from(IpAddr::V6(TUN_V6)))?;
            self.v6_address = true;
        }
        let new: Vec<IpNet> = wanted.iter().filter(|r| !self.state.routes.contains(r)).copied().collect();
        if !self.allow_conflicts && !new.is_empty() {
            if let Some((r, c)) = new.iter().find_map(|r| routes::conflict(r, &existing, &self.device).map(|c| (r, c)))
            {
                return Err(Error::RouteConflict(format!("route {r} overlaps the existing route {c} on this machine")));
            }
        }
        if !new.is_empty() {
            self.state.routes.extend(new.iter().copied());
            self.state.save(&self.state_path)?;
            let src = |r: &IpNet| if r.addr().is_ipv4() { IpAddr::V4(TUN_V4) } else { IpAddr::V6(TUN_V6) };
            if let Err(e) = routes::add_all(&new, &self.device, src) {
                // Keep on record what is on the device (some of the batch may be).
                let present = routes::on_device(&self.device);
                self.state.routes.retain(|r| !new.contains(r) || present.contains(r));
                self.state.save(&self.state_path)?;
                return Err(e);
            }
        }
        let stale: Vec<IpNet> = self.state.routes.iter().filter(|r| !wanted.contains(r)).copied().collect();
        if !stale.is_empty() {
            routes::remove_all(&stale, &self.device)?;
            self.state.routes.retain(|r| !stale.contains(r));
            self.state.save(&self.state_path)?;
        }
        Ok(wanted)
    }
}

async fn run(opts: UpOptions, paths: &Paths, ready: &mut Ready) -> Result<(), Error> {
    routes::check_new_device(&opts.device)?;
    let mut plan = plan(&opts).await?;
    plan.target.identity = crate::connect::Identity::of_this_machine(paths.load_or_create_client_id()?);
    // What an earlier daemon held, if it did not exit cleanly: re-claimed once connected.
    let intercepts = Intercepts::load(paths.intercepts());
    let session = connect(&plan.target).await?;
    info!(manager = %session.manager, cidrs = ?session.cluster.cidrs, "connected to the manager");
    let mut never = plan.never_proxy.clone();
    never.push(routes::host(session.manager.ip()));
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

    let mut state =
        State { pid: std::process::id(), device: None, routes: vec![], resolv_conf: None, resolved_link: None };
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
    let control_task = tokio::spawn(control::serve(listener, crate::user::invoking().0, calls_send));
    state::write_atomic(&paths.pid(), format!("{}\n", std::process::id()).as_bytes(), 0o644)
        .map_err(|e| Error::System(format!("cannot write {}: {e}", paths.pid().display())))?;
    let (control_send, control_recv) = session.control;
    let result = async {
        state.device = Some(opts.device.clone());
        state.save(&paths.state())?;
        let (tun, checksum_offload) = open_tun(&opts.device, opts.mtu)?;
        let tun = Arc::new(tun);
        let mut routing = Routing {
            device: opts.device.clone(),
            also: plan.also_proxy.clone(),
            never: never.clone(),
            state: &mut state,
            state_path: paths.state(),
            v6_address: false,
            allow_conflicts: opts.allow_route_conflicts,
        };
        let wanted = routing.apply(&session.cluster.cidrs)?;
        let mut updates = cluster_updates(session.conn.clone(), control_send, control_recv);
        let initial = initial_updates(&mut updates).await;
        let dns = match opts.dns_mode {
            DnsMode::Off => None,
            mode => Some(start_dns(mode, &plan, &session.cluster.domain, &session.conn, &initial, &mut routing).await?),
        };
        let stack_config =
            tpvpn_netstack::Config { mtu: usize::from(opts.mtu), checksum_offload, ..Default::default() };
        let dataplane =
            Dataplane::new(tpvpn_netstack::Stack::new(stack_config.clone()), tun.clone(), session.conn.clone());
        let status = Status {
            connected: true,
            context: plan.context.clone(),
            manager: Some(session.manager.to_string()),
            tun: Some(Tun { name: opts.device.clone(), address: TUN_V4.to_string(), mtu: usize::from(opts.mtu) }),
            routes: wanted.iter().map(|r| r.to_string()).collect(),
            never_proxy: never.iter().map(|r| r.to_string()).collect(),
            dns: dns.as_ref().map_or_else(
                || Dns { mode: "off".into(), ..Default::default() },
                |(shared, mode)| dns_status(shared, mode),
            ),
            flows: Default::default(),
            pid: Some(std::process::id()),
            tunnel_rtt_us: None,
            protocol: Some(session.version),
            intercepts: vec![],
            namespace: Some(plan.namespace.clone()),
        };
        ready.send(&format!(
            "ok connected to {}; routing {} through {}",
            session.manager,
            status.routes.join(", "),
            opts.device
        ));
        info!("up");
        let dns = dns.map(|(shared, _)| shared);
        let link = Link {
            conn: session.conn.clone(),
            endpoint: session.endpoint.clone(),
            target: plan.target.clone(),
            rediscover: plan.rediscover.clone(),
            version: session.version,
        };
        let running = Running { dataplane, tun, stack_config, link };
        let (why, down_reply, link) =
            serve(running, calls, status, (initial, updates), &mut routing, dns, intercepts.clone()).await;
        // Intercepts end first, so that the cluster's traffic goes back to the pods at once.
        intercepts.leave_all(&link.conn, link.version).await;
        link.conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"client down");
        info!(%why, "shutting down");
        Ok::<_, Error>((why, down_reply, link.endpoint))
    }
    .await;
    control_task.abort();
    // (On the error paths before `serve`, this closes the first connection; `serve` closed
    // the one it ended with.)
    session.conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"client down");
    // Undo in reverse order of doing; the TUN device goes when its file descriptor closes
    // (the data plane is dropped by now), and `undo` deletes it if it is still there.
    let undo = state.undo();
    state::remove_files(paths);
    session.endpoint.wait_idle().await;
    let (why, down_reply, last_endpoint) = result?;
    last_endpoint.wait_idle().await;

    if let Some(call) = down_reply {
        call.reply(&Reply::Done { ok: undo.is_ok() }).await;
    }
    undo?;
    if why.starts_with("down") || why.starts_with("signal") {
        Ok(())
    } else {
        Err(Error::System(why))
    }
}

/// Worker threads of the daemon's runtime. The data plane's hand-offs (TUN, stack task,
/// flow tasks, quinn's connection driver) are serial anyway; on one thread they are plain
/// task switches, where two threads wake each other (futex, IPI) for every batch. In the
/// lab one worker cut the client's cycles per byte by ~30% (see the README).
const RUNTIME_WORKERS: usize = 1;

/// The address of tpvpn's DNS server, on the TUN device.
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The resolv.conf `resolvconf` mode replaces.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// `--dns-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    /// `resolved` when systemd-resolved manages the resolver, else `resolvconf`.
    Auto,
    Resolved,
    Resolvconf,
    Off,
}

impl DnsMode {
    /// What `auto` means on this machine.
    fn pick(self) -> DnsMode {
        if self != DnsMode::Auto {
            return self;
        }
        let stub =
            std::fs::read_link(RESOLV_CONF).is_ok_and(|target| target.to_string_lossy().contains("systemd/resolve"));
        auto_mode(stub, crate::resolved::available)
    }

    fn name(self) -> &'static str {
        match self {
            DnsMode::Auto => "auto",
            DnsMode::Resolved => "resolved",
            DnsMode::Resolvconf => "resolvconf",
            DnsMode::Off => "off",
        }
    }
}

/// `auto`: systemd-resolved when it manages resolv.conf (`stub`) and answers on the bus;
/// resolv.conf otherwise; nothing when resolv.conf belongs to a resolved that does not
/// answer (rewriting it would fight resolved).
fn auto_mode(stub: bool, resolved_available: impl FnOnce() -> bool) -> DnsMode {
    match (stub, stub && resolved_available()) {
        (false, _) => DnsMode::Resolvconf,
        (true, true) => DnsMode::Resolved,
        (true, false) => {
            warn!("{RESOLV_CONF} belongs to systemd-resolved, which does not answer on the system bus: DNS is not configured (the resolver still listens on {DNS_V4}); use --dns-mode resolvconf to replace {RESOLV_CONF}");
            DnsMode::Off
        }
    }
}

/// A socket on `addr` (an address of `device`) that only this machine's own processes
/// reach: bound to `device`, which the kernel gives as the arrival device of every packet a
/// local process sends to that address (since Linux 4.13; the packet itself goes through
/// loopback). A packet another host routes to `addr` through the laptop arrives on another
/// device and finds no socket, so the laptop is no open resolver for its neighbours.
fn local_socket(device: &str, addr: std::net::SocketAddr, kind: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    s.bind_device(Some(device.as_bytes()))?;
    if kind == socket2::Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// Starts the DNS server on [`DNS_V4`] with the manager's first catalog, and (resolvconf
/// mode) points the system resolver at it, recording the original first.
async fn start_dns(
    mode: DnsMode,
    plan: &Plan,
    cluster_domain: &str,
    conn: &quinn::Connection,
    initial: &[Update],
    routing: &mut Routing<'_>,
) -> Result<(Arc<crate::dns::Shared>, DnsMode), Error> {
    let mode = mode.pick();
    routes::add_address(&routing.device, &IpNet::from(IpAddr::V4(DNS_V4)))?;
    let original = osdns::original_of(&std::fs::read_to_string(RESOLV_CONF).unwrap_or_default());
    let parsed = osdns::parse(&original);
    let domain = if cluster_domain.is_empty() { "cluster.local".to_string() } else { cluster_domain.to_string() };
    let search = osdns::cluster_search(&plan.namespace, &domain);
    let (upstreams, resolved) = if mode == DnsMode::Resolved {
        let ifindex = crate::resolved::ifindex(&routing.device)?;
        (crate::resolved::upstreams(ifindex)?, Some(crate::resolved::Link { ifindex, search: search.clone() }))
    } else {
        (osdns::upstreams(&parsed, IpAddr::V4(DNS_V4)), None)
    };
    let config = tpvpn_resolver::Config {
        cluster_domain: domain.clone(),
        namespace: plan.namespace.clone(),
        include_suffixes: plan.include_suffixes.clone(),
        exclude_suffixes: plan.exclude_suffixes.clone(),
        ..Default::default()
    };
    let shared = Arc::new(crate::dns::Shared {
        resolver: std::sync::Mutex::new(tpvpn_resolver::Resolver::new(config, tpvpn_resolver::Psl::embedded())),
        upstreams,
        conn: std::sync::Mutex::new(Some(conn.clone())),
        resolved,
        in_flight: Arc::new(tokio::sync::Semaphore::new(crate::dns::in_flight_limit())),
    });
    for u in initial {
        match u {
            Update::Namespaces(names) => shared.resolver().set_namespaces(names.clone()),
            Update::Services(services) => shared.resolver().set_services(services.clone()),
            Update::Cluster(_) => {}
        }
    }
    let addr = std::net::SocketAddr::new(IpAddr::V4(DNS_V4), 53);
    let udp: std::net::UdpSocket = local_socket(&routing.device, addr, socket2::Type::DGRAM)
        .map_err(|e| Error::System(format!("cannot listen for DNS on udp {addr}: {e}")))?
        .into();
    let tcp = local_socket(&routing.device, addr, socket2::Type::STREAM)
        .and_then(|s| {
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(s.into())
        })
        .map_err(|e| Error::System(format!("cannot listen for DNS on tcp {addr}: {e}")))?;
    // One thread: with batched receives it outpaces dnsmasq, and leaves a core to the rest.
    let (udp_shared, runtime) = (shared.clone(), tokio::runtime::Handle::current());
    std::thread::Builder::new()
        .name("tpvpn-dns".into())
        .spawn(move || crate::dns::serve_udp(udp, udp_shared, runtime))
        .map_err(|e| Error::System(format!("cannot start the DNS thread: {e}")))?;
    tokio::spawn(crate::dns::serve_tcp(tcp, shared.clone()));
    if mode == DnsMode::Resolvconf {
        routing.state.resolv_conf = Some(state::ResolvBackup { path: RESOLV_CONF.into(), original: original.clone() });
        routing.state.save(&routing.state_path)?;
        let ours = osdns::render(IpAddr::V4(DNS_V4), &search, &original);
        osdns::write_in_place(std::path::Path::new(RESOLV_CONF), ours.as_bytes())?;
    }
    if let Some(link) = &shared.resolved {
        routing.state.resolved_link = Some(link.ifindex);
        routing.state.save(&routing.state_path)?;
        let domains = shared.resolver().routing_domains();
        crate::resolved::set_link(link, IpAddr::V4(DNS_V4), &domains)?;
    }
    Ok((shared, mode))
}

fn dns_status(shared: &crate::dns::Shared, mode: &DnsMode) -> Dns {
    let r = shared.resolver();
    Dns {
        server: Some(DNS_V4.to_string()),
        mode: mode.name().into(),
        domains: r.routing_domains(),
        filtered_namespaces: r.filtered_namespaces(),
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
        Update::Cluster(cluster) => match tokio::task::block_in_place(|| routing.apply(&cluster.cidrs)) {
            Ok(wanted) => {
                info!(routes = ?wanted, "cluster changed: routes updated");
                status.routes = wanted.iter().map(|r| r.to_string()).collect();
            }
            Err(e) => warn!(error = %e, "cluster changed but the routes could not be updated"),
        },
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
enum Update {
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
        warn!(%why, "closing the connection to reconnect");
        conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"control stream failed");
    });
    rx
}

/// The connection to the manager in use, and how to make a new one.
struct Link {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    target: Target,
    rediscover: Option<Rediscover>,
    /// The protocol version spoken on `conn`.
    version: u16,
}

/// Creates the TUN device, with checksum offload where the kernel allows it (the bool):
/// then the kernel neither computes the checksums of what the laptop sends into the
/// device nor verifies those of what the stack writes, and the stack writes TCP with
/// only its pseudo-header sum.
fn open_tun(name: &str, mtu: u16) -> Result<(tun_rs::AsyncDevice, bool), Error> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new().name(name).ipv4(TUN_V4, 32u8, None).mtu(mtu).offload(offload).build_async()
    };
    match build(true).and_then(|tun| checksum_offload_only(&tun).map(|()| tun)) {
        Ok(tun) => return Ok((tun, true)),
        // The device created above is gone with its descriptor.
        Err(e) => warn!(device = name, "no checksum offload on the TUN device ({e}); checksums are computed"),
    }
    build(false).map(|tun| (tun, false)).map_err(|e| Error::System(format!("cannot create TUN device {name}: {e}")))
}

/// Leaves only checksum offload on (tun-rs's `offload` also turns on TCP and UDP
/// segmentation offload), so that every packet read is one packet within the MTU.
#[allow(unsafe_code)]
fn checksum_offload_only(tun: &tun_rs::AsyncDevice) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETOFFLOAD takes its flags by value, and the descriptor is the live TUN
    // device `tun` owns.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(libc::TUN_F_CSUM)) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A number in [0, 1), different in every call and every process.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
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

/// Connects again until it works, with backoff (0.5 s doubling to 5 s). In kubeconfig
/// mode each failed attempt reads the credentials from the cluster again, so a manager
/// reinstalled with a new certificate or token is reached too. Returns the session and
/// the target it was made with.
async fn reconnect(mut target: Target, rediscover: Option<Rediscover>) -> (crate::connect::Session, Target) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match connect(&target).await {
            Ok(session) => return (session, target),
            Err(e) => {
                warn!(error = %e, "reconnecting to the manager failed");
                if let Some(r) = &rediscover {
                    match r.refresh(&target).await {
                        Ok(fresh) if fresh.ca_pem != target.ca_pem || fresh.token != target.token => {
                            info!(source = %fresh.token_source, "the manager's credentials changed; using the new ones");
                            target = fresh;
                            // New credentials deserve a try at once.
                            continue;
                        }
                        Ok(_) => {}
                        Err(e) => debug!(error = %e, "cannot read the manager's credentials again"),
                    }
                }
                // Jitter, so that the clients of a restarted manager do not all come back at once.
                let wait = backoff + backoff.mul_f64(jitter() * 0.5);
                debug!("trying again in {wait:?}");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
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
) -> (String, Option<control::Call>, Link) {
    use tokio::signal::unix::{signal, SignalKind};
    let Running { dataplane, tun, stack_config, mut link } = running;
    // Connections the manager opens toward this client (intercepts), and re-claiming
    // what this daemon (or a crashed one before it) held: per connection.
    let start_intercepts = |link: &Link| {
        let (i, conn, version) = (intercepts.clone(), link.conn.clone(), link.version);
        // Serving and re-claiming run together and end together (aborted with the link).
        tokio::spawn(async move {
            tokio::join!(i.clone().serve(conn.clone()), i.reclaim(&conn, version));
        })
    };
    let mut intercept_task = start_intercepts(&link);
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return ("cannot install signal handlers".into(), None, link);
    };
    let mut handle = Some(dataplane.handle());
    let mut dp = Some(tokio::spawn(dataplane.run()));
    let mut reconnecting: Option<tokio::task::JoinHandle<(crate::connect::Session, Target)>> = None;
    let mut down_reply: Option<control::Call> = None;
    let mut listing = control::Listing::default();
    for u in initial {
        handle_update(u, &mut status, &mut listing, routing, dns.as_deref());
    }
    let why = loop {
        tokio::select! {
            r = async { dp.as_mut().expect("guarded by the branch condition").await }, if dp.is_some() => {
                dp = None;
                handle = None;
                let why = r.unwrap_or_else(|e| format!("data plane failed: {e}"));
                warn!(%why, "the tunnel is down; reconnecting");
                status.connected = false;
                if let Some(d) = &dns {
                    *d.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    d.resolver().set_connected(false);
                }
                reconnecting = Some(tokio::spawn(reconnect(link.target.clone(), link.rediscover.clone())));
            }
            r = async { reconnecting.as_mut().expect("guarded by the branch condition").await }, if reconnecting.is_some() => {
                reconnecting = None;
                let Ok((session, target)) = r else { break "reconnecting failed".to_string() };
                info!(manager = %session.manager, "reconnected to the manager");
                let stack = tpvpn_netstack::Stack::new(stack_config.clone());
                let dataplane = Dataplane::new(stack, tun.clone(), session.conn.clone());
                handle = Some(dataplane.handle());
                dp = Some(tokio::spawn(dataplane.run()));
                if let Some(d) = &dns {
                    *d.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.conn.clone());
                    d.resolver().set_connected(true);
                }
                let rediscover = link.rediscover.clone();
                let old = std::mem::replace(
                    &mut link,
                    Link { conn: session.conn.clone(), endpoint: session.endpoint.clone(), target, rediscover, version: session.version },
                );
                intercept_task.abort();
                intercept_task = start_intercepts(&link);
                status.protocol = Some(session.version);

                old.conn.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"replaced");
                let (send, recv) = session.control;
                updates = cluster_updates(session.conn.clone(), send, recv);
                handle_update(Update::Cluster(session.cluster), &mut status, &mut listing, routing, dns.as_deref());
                status.manager = Some(session.manager.to_string());
                status.connected = true;
            }
            _ = term.recv() => break "signal SIGTERM".into(),
            _ = int.recv() => break "signal SIGINT".into(),
            Some(update) = updates.recv() => handle_update(update, &mut status, &mut listing, routing, dns.as_deref()),
            Some(call) = calls.recv() => {
                match call.request.clone() {
                    Request::Status => {
                        let mut s = status.clone();
                        if let Some(h) = &handle {
                            s.flows = h.flows().await;
                            s.tunnel_rtt_us = Some(link.conn.rtt().as_micros() as u64);
                        }
                        s.intercepts = intercepts.list();
                        call.reply_later(Reply::Status(Box::new(s)));
                    }
                    // These wait for the manager: answered by a task of their own.
                    Request::List => {
                        let (mut listing, conn, version) = (listing.clone(), link.conn.clone(), link.version);
                        let connected = status.connected;
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
                            spec.namespace = status.namespace.clone().unwrap_or_else(|| "default".into());
                        }
                        let (i, conn, version) = (intercepts.clone(), link.conn.clone(), link.version);
                        tokio::spawn(async move {
                            let reply = match i.request(&conn, version, spec).await {
                                Ok(intercepted) => Reply::Intercepted { intercepted },
                                Err(e) => Reply::Failed { error: e.to_string() },
                            };
                            call.reply(&reply).await;
                        });
                    }
                    Request::Leave { mut namespace, service } => {
                        if namespace.is_empty() {
                            namespace = status.namespace.clone().unwrap_or_else(|| "default".into());
                        }
                        let (i, conn, version) = (intercepts.clone(), link.conn.clone(), link.version);
                        tokio::spawn(async move {
                            let reply = match i.leave(&conn, version, &namespace, &service).await {
                                Ok(left) => Reply::Left { left },
                                Err(e) => Reply::Failed { error: e.to_string() },
                            };
                            call.reply(&reply).await;
                        });
                    }
                    Request::Down => {
                        down_reply = Some(call);
                        break "down requested".into();
                    }
                }
            }
        }
    };
    if let Some(r) = reconnecting {
        r.abort();
    }
    intercept_task.abort();
    if let Some(dp) = dp {
        dp.abort();
        // Wait until the data plane is gone; with `tun` dropped below, so is the device.
        let _ = dp.await;
    }
    drop(tun);
    (why, down_reply, link)
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

/// `tpvpn intercept` and `tpvpn leave`: one request to the daemon (which may wait for the
/// manager and its agents).
pub fn intercept_request(paths: &Paths, req: Request) -> Result<Reply, Error> {
    let rt = current_thread()?;
    match rt.block_on(control::request(&paths.socket(), req, Duration::from_secs(30)))? {
        Some(Reply::Failed { error }) => Err(Error::Refused { code: None, message: error }),
        Some(r) => Ok(r),
        None => Err(Error::Config("not connected: run tpvpn up first".into())),
    }
}

/// `tpvpn down`.
pub fn down(paths: &Paths) -> Result<String, Error> {
    let rt = current_thread()?;
    let asked = rt.block_on(control::request(&paths.socket(), Request::Down, Duration::from_secs(15)));
    match asked {
        Ok(Some(Reply::Failed { error })) => Err(Error::Refused { code: None, message: error }),
        // The daemon answers once every change is undone.
        Ok(Some(_)) => {
            wait_gone(paths);
            Ok("disconnected".into())
        }
        Ok(None) => match state::clean_stale(paths)? {
            Some(pid) => Ok(format!("undid the changes of a tpvpn (pid {pid}) that did not exit cleanly")),
            None if nix::unistd::geteuid().is_root()
                && osdns::restore_left_behind(std::path::Path::new(RESOLV_CONF))? =>
            {
                Ok(format!("put back the original {RESOLV_CONF} that a tpvpn connected across a reboot left behind"))
            }
            None => Ok("not connected".into()),
        },
        Err(e) => Err(e),
    }
}

/// Waits (bounded) until the daemon has removed its state file.
fn wait_gone(paths: &Paths) {
    for _ in 0..150 {
        if !paths.state().exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A runtime for the short client commands.
pub fn current_thread() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::System(e.to_string()))
}

/// `tpvpn list`; `None` when not connected.
pub fn list(paths: &Paths) -> Result<Option<control::Listing>, Error> {
    let rt = current_thread()?;
    match rt.block_on(control::request(&paths.socket(), Request::List, Duration::from_secs(5)))? {
        Some(Reply::List(l)) => Ok(Some(l)),
        _ => Ok(None),
    }
}

/// `tpvpn status`.
pub fn status(paths: &Paths) -> Result<Status, Error> {
    let rt = current_thread()?;
    match rt.block_on(control::request(&paths.socket(), Request::Status, Duration::from_secs(5)))? {
        Some(Reply::Status(s)) => Ok(*s),
        _ => Ok(Status { dns: Dns { mode: "off".into(), ..Default::default() }, ..Default::default() }),
    }
}

/// The runtime paths from the environment.
pub fn paths() -> Paths {
    Paths::new(state::runtime_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_resolved_only_when_it_owns_resolv_conf_and_answers() {
        assert_eq!(auto_mode(false, || panic!("not asked when resolv.conf is a plain file")), DnsMode::Resolvconf);
        assert_eq!(auto_mode(true, || true), DnsMode::Resolved);
        assert_eq!(auto_mode(true, || false), DnsMode::Off);
    }
}
