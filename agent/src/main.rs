//! `tpvpn-agent`: the node agent of intercepts (see the library's documentation).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tpvpn_agent::capture::Node;
use tpvpn_agent::session;

#[derive(Debug, Parser)]
#[command(name = "tpvpn-agent", version, about = "tpvpn's node agent: captures intercepted pod ports")]
struct Args {
    /// The manager's address, HOST:PORT.
    #[arg(long, env = "TPVPN_MANAGER")]
    manager: String,
    /// The manager's certificate (PEM), pinned.
    #[arg(long, env = "TPVPN_MANAGER_CA", default_value = "/var/run/secrets/tpvpn/ca.crt")]
    manager_ca: PathBuf,
    /// File holding the agent's credential, read again for every connection: its pod's
    /// projected ServiceAccount token (audience `tpvpn.dev/manager`, renewed by the
    /// kubelet), or the shared agent token of a manager in `--auth token`.
    #[arg(long, env = "TPVPN_AGENT_TOKEN_FILE", default_value = "/var/run/secrets/tpvpn-agent/token")]
    token_file: PathBuf,
    /// The name of the node this agent runs on (the DaemonSet sets it from `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// The node's /proc (the agent runs with hostPID).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// Where the container runtime keeps its bundles (repeatable; default: containerd's,
    /// CRI-O's and Docker's places under /run).
    #[arg(long = "runtime-root", value_name = "DIR")]
    runtime_roots: Vec<PathBuf>,
    /// Threads serving captured connections (personal intercepts parse every HTTP
    /// request of a captured port: one thread caps them at about half a core's worth).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Captured connections parsed at once (personal intercepts); past it connections
    /// pass whole to the global intercept or the pod, unparsed.
    #[arg(long, default_value_t = tpvpn_agent::load::Caps::default().total)]
    max_parsed_connections: usize,
    /// Captured connections parsed at once from one source address.
    #[arg(long, default_value_t = tpvpn_agent::load::Caps::default().per_source)]
    max_parsed_per_source: usize,
    /// Run as the watchdog of agent PID (the agent starts it; see `watchdog`).
    #[arg(long, hide = true, value_name = "PID")]
    watchdog_of: Option<u32>,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(args) {
        eprintln!("tpvpn-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("tpvpn-agent needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to enter pod network namespaces");
    }
    let runtime_roots = if args.runtime_roots.is_empty() {
        tpvpn_agent::runtime::DEFAULT_ROOTS.iter().map(PathBuf::from).collect()
    } else {
        args.runtime_roots.clone()
    };
    if let Some(agent) = args.watchdog_of {
        tpvpn_agent::watchdog::run(agent, &args.proc_root, &runtime_roots);
        return Ok(());
    }
    let ca_pem = std::fs::read(&args.manager_ca)
        .with_context(|| format!("cannot read --manager-ca {}", args.manager_ca.display()))?;
    session::read_token(&args.token_file)?;
    raise_descriptor_limit();
    let own_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (mut watchdog, pipe) = tpvpn_agent::watchdog::spawn(&own_args).context("cannot start the agent's watchdog")?;
    let caps = tpvpn_agent::load::Caps { total: args.max_parsed_connections, per_source: args.max_parsed_per_source };
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(usize::from(args.workers)).enable_all().build()?;
    let ended = rt.block_on(async move {
        tokio::spawn(tpvpn_agent::watchdog::heartbeat(pipe));
        let addrs = tpvpn_agent::addrs::follow();
        let node = Node { proc_root: args.proc_root, runtime_roots, addrs, load: tpvpn_agent::load::Load::new(caps) };
        let config =
            session::Config { manager: args.manager, ca_pem, token_file: args.token_file, node_name: args.node, node };
        session::run(config, shutdown_signal()).await
    });
    // The heartbeat's pipe closes with the runtime: the watchdog ends.
    drop(rt);
    let _ = watchdog.wait();
    Ok(ended?)
}

/// Raises the soft limit on open descriptors to the hard one: every captured connection
/// holds two or more, and containers often start with a soft limit of 1,024 (containerd
/// 2.0 no longer raises it).
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open descriptor limit"),
            Err(e) => tracing::warn!(error = %e, soft, "cannot raise the open descriptor limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open descriptor limit"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
