//! `tpvpn`: the command-line client.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use tpvpn_client::cluster::install::{self, InstallOptions};
use tpvpn_client::cluster::kubeconfig;
use tpvpn_client::daemon::{self, Source, UpOptions};

#[derive(Debug, Parser)]
#[command(name = "tpvpn", version, about = "Put this machine inside a Kubernetes cluster's network")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DnsMode {
    Auto,
    Resolved,
    Resolvconf,
    Off,
}

#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// Kubeconfig context (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// Kubeconfig file (default: KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the manager.
    #[arg(long, default_value = "tpvpn")]
    namespace: String,
}

#[derive(Debug, Subcommand)]
enum ManagerCmd {
    /// Apply the manager's manifests (server-side apply) and create its credentials if
    /// missing. Idempotent: existing credentials are kept.
    Install {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The manager's container image.
        #[arg(long, default_value = concat!("tpvpn/tpvpn-manager:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Type of the manager's Service: NodePort or LoadBalancer.
        #[arg(long, default_value = "NodePort")]
        service_type: String,
        /// Laptops connect only with certificates of their users: the manager gets no
        /// shared client token, and an earlier install's Secret tpvpn-client is deleted
        /// (earlier releases' clients are then refused).
        #[arg(long)]
        no_shared_token: bool,
    },
    /// Delete everything `install` created, credentials and namespace included.
    Uninstall {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `tpvpn up`.
#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Kubeconfig context (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// Kubeconfig file (default: KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Namespace to connect to.
    #[arg(long)]
    namespace: Option<String>,
    /// The manager's address, HOST:PORT (overrides discovery).
    #[arg(long)]
    manager: Option<String>,
    /// Namespace the manager is installed in.
    #[arg(long, default_value = "tpvpn")]
    manager_namespace: String,
    /// How to reach the manager: `quic` over UDP to its address; `portforward`
    /// through the Kubernetes API server (pods/portforward, wherever kubectl works);
    /// `auto` tries QUIC for 2 s, then the port-forward.
    #[arg(long, value_enum, default_value = "auto")]
    transport: tpvpn_client::connect::Transport,
    /// PEM certificate of the manager, pinned (direct mode, with --manager and --token-file).
    #[arg(long, requires_all = ["manager", "token_file"])]
    manager_ca: Option<PathBuf>,
    /// File holding the client token (direct mode, with --manager and --manager-ca).
    #[arg(long, requires_all = ["manager", "manager_ca"])]
    token_file: Option<PathBuf>,
    /// A CIDR that is never routed into the tunnel (repeatable).
    #[arg(long = "never-proxy", value_name = "CIDR")]
    never_proxy: Vec<IpNet>,
    /// An extra CIDR routed into the tunnel (repeatable).
    #[arg(long = "also-proxy", value_name = "CIDR")]
    also_proxy: Vec<IpNet>,
    /// Route cluster CIDRs even where they overlap routes already on this machine
    /// (with `--vnat auto`, instead of mapping them to virtual addresses).
    #[arg(long)]
    allow_route_conflicts: bool,
    /// Cluster ranges that overlap a route of this machine (a VPN's, a LAN's) are
    /// reached through virtual addresses of a free range of the same size, and the
    /// machine's own route is left alone (`auto`); `off` refuses such a cluster;
    /// `always` maps every cluster range.
    #[arg(long, default_value = "auto", value_name = "auto|off|always")]
    vnat: tpvpn_vnat::Mode,
    /// Where virtual ranges come from (repeatable; default 240.0.0.0/4, reserved and
    /// never assigned, and fd74:7076:8000::/33).
    #[arg(long = "virtual-subnet", value_name = "CIDR", value_parser = tpvpn_vnat::parse_subnet)]
    virtual_subnets: Vec<IpNet>,
    /// How to point the OS resolver at tpvpn's DNS server: `resolvconf` replaces
    /// /etc/resolv.conf (restored on down); `resolved` gives systemd-resolved the
    /// cluster's routing domains on the TUN link (over D-Bus); `auto` picks `resolved`
    /// when systemd-resolved manages /etc/resolv.conf (off if it does not answer on
    /// the system bus), else `resolvconf`; `off` changes nothing (the server still
    /// listens on 198.18.0.2).
    #[arg(long, value_enum, default_value = "auto")]
    dns_mode: DnsMode,
    /// Stay in the foreground instead of leaving a daemon.
    #[arg(long)]
    foreground: bool,
    /// Name of the TUN device.
    #[arg(long, default_value = "tpvpn0")]
    device: String,
    /// MTU of the TUN device. TCP ends on this machine, so large segments are free.
    #[arg(long, default_value_t = 65000)]
    mtu: u16,
}

/// `tpvpn intercept`.
#[derive(Debug, clap::Args)]
struct InterceptArgs {
    /// The Service to intercept.
    service: String,
    /// LOCAL[:SERVICE_PORT]: this machine's port, and the Service's port (name or
    /// number; may be left out when the Service has one port).
    #[arg(long, value_name = "LOCAL[:SERVICE_PORT]")]
    port: String,
    /// The Service's namespace (default: the connected namespace).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Write the environment of the container serving the port here (docker
    /// env-file syntax).
    #[arg(long)]
    env_file: Option<PathBuf>,
    /// Write that environment here as a JSON object.
    #[arg(long)]
    env_json: Option<PathBuf>,
    /// The container whose environment to take, when the pods have several.
    #[arg(long)]
    container: Option<String>,
    /// A personal intercept: only HTTP requests carrying this header come here
    /// (repeat for several; all must match); every other request keeps going to the
    /// pods, on the same connection. Without it every connection comes here.
    #[arg(long = "http-header", value_name = "NAME=VALUE")]
    http_headers: Vec<String>,
    /// With --http-header: only the matching requests whose path starts with this
    /// prefix come here.
    #[arg(long, value_name = "PATH")]
    http_path_prefix: Option<String>,
    /// Mount the volume mounts of the container serving the port under this
    /// directory, read-only and live (DIR/etc/config/..., as in the pod). Linux.
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    /// With --mount: writes under DIR reach the pod's emptyDir and PVC volumes (not
    /// those mounted readOnly); configMap, Secret and projected volumes stay read-only.
    #[arg(long, requires = "mount")]
    mount_readwrite: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connect: create the TUN device, route the cluster into it, and stay connected.
    Up(UpArgs),
    /// Disconnect and undo every change (also after a crash).
    Down,
    /// Show the connection.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// List the cluster's namespaces and Services, as the manager reports them.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },

    /// Send a Service's traffic in the cluster to a port on this machine: every
    /// connection to the Service's pods on that port reaches 127.0.0.1:LOCAL instead,
    /// until `tpvpn leave` (or `down`).
    Intercept(InterceptArgs),
    /// End an intercept: the Service's pods get their traffic again.
    Leave {
        service: String,
        /// The Service's namespace (default: the connected namespace).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// End everyone's intercepts of a Service (needs `delete` on `intercepts.tpvpn.dev`
    /// of it, ClusterRole tpvpn-intercept-admin).
    Revoke {
        service: String,
        /// The Service's namespace (default: the connected namespace).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Install, update or remove the in-cluster manager.
    Manager {
        #[command(subcommand)]
        action: ManagerCmd,
    },
    /// Print the version.
    Version,
    /// Print a shell completion script: `tpvpn completion bash > /etc/bash_completion.d/tpvpn`.
    Completion { shell: clap_complete::Shell },
}

fn main() {
    fix_mmap_threshold();
    // `tpvpn run-as-user UID GID -- COMMAND...`: tpvpn's own way to run a kubeconfig
    // credential plugin as the user who ran it (not a command for people: not in --help).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == tpvpn_client::os::user::RUN_AS) {
        let id = |i: usize| args.get(i).and_then(|a| a.to_str()?.parse::<u32>().ok());
        let error = match (id(2), id(3), args.get(4).is_some_and(|a| a == "--")) {
            (Some(uid), Some(gid), true) => tpvpn_client::os::user::run_as(uid, gid, &args[5..]),
            _ => tpvpn_client::Error::Config(format!(
                "usage: tpvpn {} UID GID -- COMMAND [ARGS...]",
                tpvpn_client::os::user::RUN_AS
            )),
        };
        eprintln!("tpvpn: {error}");
        std::process::exit(1);
    }
    let cli = Cli::parse();
    let foreground = matches!(&cli.command, Cmd::Up(UpArgs { foreground: true, .. }));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| if foreground { "info" } else { "warn" }.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("tpvpn: {e}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<(), tpvpn_client::Error> {
    use tpvpn_client::Error;
    let paths = daemon::paths();
    match cli.command {
        Cmd::Up(args) => up(args, paths),
        Cmd::Down => {
            println!("{}", daemon::down(&paths)?);
            Ok(())
        }
        Cmd::Status { output } => {
            let s = daemon::status(&paths)?;
            match output {
                Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&s).map_err(|e| Error::System(e.to_string()))?)
                }
                Output::Text => print_status(&s),
            }
            Ok(())
        }
        Cmd::List { output } => {
            let Some(l) = daemon::list(&paths)? else {
                return Err(Error::Config("not connected: run tpvpn up first".into()));
            };
            match output {
                Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&l).map_err(|e| Error::System(e.to_string()))?)
                }
                Output::Text => print_listing(&l),
            }
            Ok(())
        }
        Cmd::Intercept(args) => intercept(args, &paths),
        Cmd::Leave { service, namespace } => leave(&paths, service, namespace, false),
        Cmd::Revoke { service, namespace } => leave(&paths, service, namespace, true),
        Cmd::Manager { action } => {
            let (cluster, opts, uninstall) = match action {
                ManagerCmd::Install { cluster, image, service_type, no_shared_token } => {
                    let opts = InstallOptions {
                        namespace: cluster.namespace.clone(),
                        image,
                        service_type,
                        shared_token: !no_shared_token,
                    };
                    (cluster, opts, false)
                }
                ManagerCmd::Uninstall { cluster } => {
                    let opts = InstallOptions {
                        namespace: cluster.namespace.clone(),
                        image: String::new(),
                        service_type: "NodePort".into(),
                        shared_token: true,
                    };
                    (cluster, opts, true)
                }
            };
            let r = kubeconfig::resolve(cluster.kubeconfig.as_deref(), cluster.context.as_deref())?;
            let rt = daemon::current_thread()?;
            let msg = rt.block_on(async {
                if uninstall {
                    install::uninstall(&r, &opts).await
                } else {
                    install::install(&r, &opts).await
                }
            })?;
            println!("{msg}");
            Ok(())
        }
        Cmd::Version => {
            println!(
                "client:  tpvpn {} (protocol v{}-v{})",
                env!("CARGO_PKG_VERSION"),
                tpvpn_tunnel::MIN_PROTOCOL_VERSION,
                tpvpn_tunnel::PROTOCOL_VERSION
            );
            // What runs: the daemon (it may predate an upgrade of this binary) and the
            // manager it reached.
            match daemon::status(&paths) {
                Ok(s) if s.connected || s.pid.is_some() => {
                    let version = s.version.as_deref().unwrap_or("older than 0.1.0 (it does not say)");
                    println!("daemon:  tpvpn {version} (pid {})", s.pid.map_or("-".into(), |p| p.to_string()));
                    match (s.manager_protocols, s.protocol) {
                        (Some((min, max)), Some(v)) => println!("manager: protocol v{min}-v{max}, speaking v{v}"),
                        (None, Some(v)) => println!("manager: speaking protocol v{v}"),
                        _ if s.connected => println!("manager: connected (the daemon is too old to say its protocol)"),
                        _ => println!("manager: not connected"),
                    }
                }
                _ => println!("daemon:  not running (tpvpn up starts it)"),
            }
            Ok(())
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "tpvpn", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// `tpvpn up`: the options checked, then the daemon (in the foreground, or left
/// running).
fn up(args: UpArgs, paths: tpvpn_client::state::Paths) -> Result<(), tpvpn_client::Error> {
    use tpvpn_client::Error;
    let UpArgs {
        context,
        kubeconfig,
        namespace,
        manager,
        manager_namespace,
        transport,
        manager_ca,
        token_file,
        never_proxy,
        also_proxy,
        dns_mode,
        allow_route_conflicts,
        vnat,
        virtual_subnets,
        foreground,
        device,
        mtu,
    } = args;
    let source = match (manager, manager_ca, token_file) {
        (Some(manager), Some(ca_file), Some(token_file)) => {
            if context.is_some() || kubeconfig.is_some() {
                return Err(Error::Config(
                    "direct mode (--manager-ca, --token-file) does not use a kubeconfig: drop --context/--kubeconfig"
                        .into(),
                ));
            }
            Source::Direct { manager, ca_file, token_file }
        }
        (manager, _, _) => Source::Kube { kubeconfig, context, manager, manager_namespace },
    };
    let dns_mode = match dns_mode {
        DnsMode::Auto => daemon::DnsMode::Auto,
        DnsMode::Resolvconf => daemon::DnsMode::Resolvconf,
        DnsMode::Off => daemon::DnsMode::Off,
        DnsMode::Resolved => daemon::DnsMode::Resolved,
    };
    if mtu < 1280 {
        return Err(Error::Config("--mtu must be at least 1280".into()));
    }
    let opts = UpOptions {
        source,
        never_proxy,
        also_proxy,
        device,
        mtu,
        dns_mode,
        namespace,
        allow_route_conflicts,
        vnat,
        virtual_subnets,
        transport,
    };
    if foreground {
        daemon::up_foreground(opts, paths)
    } else {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let msg = daemon::up_background(&args, &paths)?;
        println!("{msg}");
        Ok(())
    }
}

/// `tpvpn intercept`: asks the daemon, prints what is intercepted, writes the environment.
fn intercept(args: InterceptArgs, paths: &tpvpn_client::state::Paths) -> Result<(), tpvpn_client::Error> {
    use tpvpn_client::Error;
    let InterceptArgs {
        service,
        port,
        namespace,
        env_file,
        env_json,
        container,
        http_headers,
        http_path_prefix,
        mount,
        mount_readwrite,
    } = args;
    // The daemon mounts: a path relative to where `intercept` runs is made absolute here.
    let mount = match mount {
        Some(dir) => {
            Some(std::path::absolute(&dir).map_err(|e| Error::Config(format!("--mount {}: {e}", dir.display())))?)
        }
        None => None,
    };
    let (local, service_port) = match port.split_once(':') {
        Some((l, p)) => (l, p.to_string()),
        None => (port.as_str(), String::new()),
    };
    let local_port: u16 = local
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::Config(format!("--port {port}: LOCAL must be a port number (1-65535)")))?;
    let headers =
        http_headers.iter().map(|h| tpvpn_client::intercept::parse_header(h)).collect::<Result<Vec<_>, _>>()?;
    let path_prefix = http_path_prefix.unwrap_or_default();
    if !path_prefix.is_empty() {
        tpvpn_client::intercept::check_path_prefix(&path_prefix, &headers)?;
    }
    let spec = tpvpn_client::intercept::Spec {
        namespace: namespace.unwrap_or_default(),
        service,
        port: service_port,
        local_port,
        container: container.unwrap_or_default(),
        headers,
        path_prefix,
        mount,
        mount_readwrite,
    };
    let reply = daemon::intercept_request(paths, tpvpn_client::control::Request::Intercept(spec))?;
    let tpvpn_client::control::Reply::Intercepted { intercepted } = reply else {
        return Err(Error::Protocol("unexpected reply from the daemon".into()));
    };
    print_intercepted(&intercepted);
    if env_file.is_some() || env_json.is_some() {
        let withheld = intercepted.warnings.iter().find_map(|w| w.strip_prefix(tpvpn_tunnel::ENVIRONMENT_WITHHELD));
        if let Some(why) = withheld {
            return Err(Error::Refused {
                code: Some(tpvpn_tunnel::ErrorCode::Forbidden),
                message: format!("no environment for --env-file/--env-json (the intercept stands): {why}"),
            });
        }
    }
    let mut env = intercepted.env.clone();
    if let Some(dir) = &intercepted.held.spec.mount {
        // Where a local process finds the pod's files (`$TPVPN_ROOT/etc/config/...`).
        env.push(("TPVPN_ROOT".into(), dir.display().to_string()));
    }
    if let Some(path) = env_file {
        write_env(&path, &env, false)?;
    }
    if let Some(path) = env_json {
        write_env(&path, &env, true)?;
    }
    Ok(())
}

fn print_listing(l: &tpvpn_client::control::Listing) {
    println!("namespaces: {}", l.namespaces.join(", "));
    let rows: Vec<[String; 5]> = l
        .services
        .iter()
        .map(|s| {
            let ips = match (s.cluster_ips.is_empty(), s.virtual_ips.is_empty()) {
                (true, _) => "None".to_string(),
                (false, true) => s.cluster_ips.join(","),
                // What a laptop process uses, then the cluster's own address.
                (false, false) => format!("{} (cluster {})", s.virtual_ips.join(","), s.cluster_ips.join(",")),
            };
            let intercept = s.intercept.clone().unwrap_or_else(|| "-".into());
            [s.namespace.clone(), s.name.clone(), ips, s.ports.join(", "), intercept]
        })
        .collect();
    let header = ["NAMESPACE", "SERVICE", "CLUSTER-IP", "PORTS", "INTERCEPT"].map(String::from);
    let width = |i: usize| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0);
    let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
    for r in [&header].into_iter().chain(&rows) {
        println!("{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}", r[0], r[1], r[2], r[3], r[4]);
    }
}

fn print_intercepted(o: &tpvpn_client::intercept::Outcome) {
    let h = &o.held;
    let pods: Vec<String> = h
        .targets
        .iter()
        .map(|t| format!("{} ({}{})", t.pod, t.addr, if t.meshed { ", behind its mesh sidecar" } else { "" }))
        .collect();
    let matchers = h.spec.matchers();
    let what = if matchers.is_empty() { String::new() } else { format!(" for requests with {matchers}") };
    println!(
        "intercepting {}/{} port {}{what}: pods {} -> 127.0.0.1:{}",
        h.spec.namespace,
        h.spec.service,
        h.service_port,
        pods.join(", "),
        h.spec.local_port
    );
    if let (Some(dir), Some(mounted)) = (&h.spec.mount, &o.mounted) {
        println!("mounted at {}: {mounted}", dir.display());
    }
    if !matchers.is_empty() {
        let headers: Vec<String> = matchers.headers.iter().map(|(k, v)| format!("-H '{k}: {v}'")).collect();
        let path = if matchers.path_prefix.is_empty() { "/".to_string() } else { matchers.path_prefix.clone() };
        println!(
            "callers send: {} (e.g. curl {} http://{}.{}:{}{path}); other requests keep reaching the pods",
            matchers.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "),
            headers.join(" "),
            h.spec.service,
            h.spec.namespace,
            h.service_port
        );
    }
    for w in &o.warnings {
        println!("note: {w}");
    }
    if !tpvpn_client::intercept::listens_locally(h.spec.local_port) {
        let answer = if matchers.is_empty() { "refused" } else { "answered 502" };
        println!(
            "note: nothing listens on 127.0.0.1:{} yet: intercepted requests are {answer} until your server does",
            h.spec.local_port
        );
    }
}

/// Writes an environment as a docker env-file (`NAME=VALUE` lines, taken literally) or
/// as a JSON object. A value with a newline cannot be written as an env-file line: it
/// is left out with a warning (the JSON form has it).
fn write_env(path: &std::path::Path, env: &[(String, String)], json: bool) -> Result<(), tpvpn_client::Error> {
    let text = if json {
        let map: serde_json::Map<String, serde_json::Value> =
            env.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        serde_json::to_string_pretty(&map).map_err(|e| tpvpn_client::Error::System(e.to_string()))? + "\n"
    } else {
        let mut out = String::new();
        for (k, v) in env {
            if v.contains('\n') || k.contains('\n') {
                eprintln!(
                    "tpvpn: {k} has a multi-line value, which an env-file cannot hold: left out of {}",
                    path.display()
                );
                continue;
            }
            out.push_str(&format!("{k}={v}\n"));
        }
        out
    };
    // It may hold credentials: readable by its owner only.
    tpvpn_client::state::write_private(path, text.as_bytes())
        .map_err(|e| tpvpn_client::Error::System(format!("cannot write {}: {e}", path.display())))?;
    println!("environment ({} variables) written to {}", env.len(), path.display());
    Ok(())
}

/// `leave`, or with `revoke` `revoke`: asks the daemon, prints its answer.
fn leave(
    paths: &tpvpn_client::state::Paths,
    service: String,
    namespace: Option<String>,
    revoke: bool,
) -> Result<(), tpvpn_client::Error> {
    let req = tpvpn_client::control::Request::Leave { namespace: namespace.unwrap_or_default(), service, revoke };
    match daemon::intercept_request(paths, req)? {
        tpvpn_client::control::Reply::Left { left } => println!("{left}"),
        _ => return Err(tpvpn_client::Error::Protocol("unexpected reply from the daemon".into())),
    }
    Ok(())
}

fn print_status(s: &tpvpn_client::control::Status) {
    if !s.connected {
        println!("not connected");
        return;
    }
    println!("connected");
    println!("  manager:     {}", s.manager.as_deref().unwrap_or("-"));
    if let Some(who) = &s.identity {
        println!("  identity:    {} (groups {}; certificate expires {})", who.user, who.groups.join(", "), who.expires);
    }
    if let Some(t) = &s.transport {
        match &s.manager_pod {
            Some(pod) => println!("  transport:   {t} (pod {pod})"),
            None => println!("  transport:   {t}"),
        }
    }
    if let Some(t) = &s.tun {
        println!("  device:      {} ({}, mtu {})", t.name, t.address, t.mtu);
    }
    println!("  routes:      {}", s.routes.join(", "));
    for m in &s.vnat {
        println!("  vnat:        cluster {} reached as {}", m.cluster, m.virtual_net);
    }
    println!("  never-proxy: {}", s.never_proxy.join(", "));
    match &s.dns.server {
        Some(server) => println!("  dns:         {} on {server}; domains: {}", s.dns.mode, s.dns.domains.join(", ")),
        None => println!("  dns:         {}", s.dns.mode),
    }
    if !s.dns.filtered_namespaces.is_empty() {
        println!("  not routed:  namespaces {} (public suffixes)", s.dns.filtered_namespaces.join(", "));
    }

    println!("  flows:       {} tcp, {} udp", s.flows.tcp, s.flows.udp);
    if s.flows.denied > 0 {
        println!("  denied:      {} flows (the manager's policy or limits)", s.flows.denied);
    }
    for h in &s.intercepts {
        let matchers = h.spec.matchers();
        let what = if matchers.is_empty() { String::new() } else { format!(" for {matchers}") };
        println!(
            "  intercept:   {}/{} port {}{what} -> 127.0.0.1:{} ({} pods)",
            h.spec.namespace,
            h.spec.service,
            h.service_port,
            h.spec.local_port,
            h.targets.len()
        );
    }
    if let Some(rtt) = s.tunnel_rtt_us {
        println!("  tunnel rtt:  {rtt} µs");
    }
}

/// Every TCP flow has 512 KiB socket buffers each way, of which an idle flow touches a
/// page or two. glibc serves allocations above its mmap threshold with fresh anonymous
/// mappings, resident only where written, but it raises that threshold after the first
/// such block is freed; from then on the buffers come from the heap, where calloc zeroes
/// them and every page becomes resident. A fixed threshold keeps idle flows small (scale
/// benchmark, 10,000 idle flows: 32 KiB per flow before, 12 KiB after).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; it is called first thing in main,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() {}
