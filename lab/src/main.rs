//! `tpvpn-lab`: the lab's test servers and clients, and the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tpvpn_lab::{apiserver, client, serve, Lab};

#[derive(Debug, Parser)]
#[command(name = "tpvpn-lab", version, about = "tpvpn lab: test servers, test clients and the demo")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the lab's servers (UDP echo, reset, sink, source; those given) until killed.
    Serve {
        #[arg(long)]
        udp_echo: Option<SocketAddr>,
        #[arg(long)]
        reset: Option<SocketAddr>,
        #[arg(long)]
        sink: Option<SocketAddr>,
        #[arg(long)]
        source: Option<SocketAddr>,
        #[arg(long)]
        silent: Option<SocketAddr>,
    },
    /// A test double of a manager a laptop must not trust (see `tpvpn_lab::hostile`).
    HostileManager(tpvpn_lab::hostile::HostileArgs),
    /// Stand-in for a mesh sidecar's inbound proxy: relays connections redirected to
    /// LISTEN to their original port on the pod's loopback.
    Sidecar {
        #[arg(long, default_value = "0.0.0.0:15006")]
        listen: SocketAddr,
    },
    /// A plain byte relay from LISTEN to TO (the benchmarks' reference for a userspace
    /// proxy in the path).
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
    },
    /// Run the Kubernetes API server stand-in (in-memory, plain HTTP/1.1) until killed.
    Apiserver {
        #[arg(long, default_value = tpvpn_lab::APISERVER_ADDR)]
        listen: SocketAddr,
        /// JSON array of the objects to load at start.
        #[arg(long)]
        fixtures: PathBuf,
        /// Bearer token allowed everything.
        #[arg(long)]
        token: String,
        /// Bearer token allowed everything except secrets (403 there).
        #[arg(long)]
        no_secrets_token: Option<String>,
        /// Bearer token allowed everything except pods/portforward (403 there).
        #[arg(long)]
        no_portforward_token: Option<String>,
        /// Seconds between watch bookmarks (for watches that allow them).
        #[arg(long, default_value_t = 5)]
        bookmark_secs: u64,
        /// Users allowed what RBAC grants them: lines `token,user,uid,"group1,group2"`,
        /// as the real API server's `--token-auth-file`.
        #[arg(long)]
        token_auth_file: Option<PathBuf>,
        /// Also serve HTTPS here (with --tls-cert and --tls-key).
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls_listen: Option<SocketAddr>,
        /// PEM certificate chain of the HTTPS listener.
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// PEM key of the HTTPS listener.
        #[arg(long)]
        tls_key: Option<PathBuf>,
    },
    /// Test clients; each prints one line and exits 1 if its check failed.
    #[command(subcommand)]
    Client(ClientCmd),
    /// Remove labs left behind by killed processes (namespaces, processes in them, temp dirs).
    Cleanup,
    /// Build a lab, bring tpvpn up, show what a user sees, bring it down, tear down.
    Demo,
    /// The WAN emulator (delay, loss) between the laptop namespace, where it runs, and
    /// `--peer-netns`; see `tpvpn_lab::wan`.
    Wan(tpvpn_lab::wan::EmulatorArgs),
}

#[derive(Debug, Subcommand)]
enum ClientCmd {
    /// Send BYTES of the data stream to the sink, half-close, check its count+hash reply.
    Upload { addr: SocketAddr, bytes: u64 },
    /// Ask the source for BYTES and check they are the data stream.
    Download { addr: SocketAddr, bytes: u64 },
    /// N concurrent connections to the sink, all open at once, each checked.
    Many { addr: SocketAddr, n: usize },
    /// Expect a reset (prints `reset`) rather than a clean close (`clean-close`, exit 1).
    Reset { addr: SocketAddr },
    /// One datagram of SIZE bytes to the echo server; wait ≤ 3 s for the identical echo.
    Udp { addr: SocketAddr, size: usize },
    /// Connect, send BYTES, half-close, then hold the connection (reading whatever comes)
    /// until it ends or SECONDS pass; prints how it ended.
    HalfClose { addr: SocketAddr, bytes: usize, seconds: u64 },
    /// One TCP connect (5 s timeout): prints refused/connected <ms>, timeout or error.
    Connect { addr: SocketAddr },
    /// Open N silent connections to the Unix socket PATH and hold them SECONDS.
    HoldUnix { path: std::path::PathBuf, n: usize, seconds: u64 },
    /// A bounded local flood: QUERIES DNS queries for distinct internet names to DNS, then
    /// one datagram from each of FLOWS fresh sockets to UDP.
    Flood { dns: SocketAddr, queries: usize, udp: SocketAddr, flows: usize },
    /// Open N idle connections, print `established <ok> of <n>`, hold them until stdin
    /// closes (at most SECONDS), then close them all.
    Hold {
        addr: SocketAddr,
        n: usize,
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Serve { udp_echo, reset, sink, source, silent } => {
            serve::run(serve::ServeAddrs { udp_echo, reset, sink, source, silent }).map(|()| true)
        }
        Cmd::Apiserver {
            listen,
            fixtures,
            token,
            no_secrets_token,
            no_portforward_token,
            bookmark_secs,
            token_auth_file,
            tls_listen,
            tls_cert,
            tls_key,
        } => token_auth_file
            .map(|p| {
                let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
                apiserver::parse_token_file(&text)
            })
            .transpose()
            .and_then(|users| {
                let cfg = apiserver::Config {
                    admin_token: token,
                    no_secrets_token,
                    no_portforward_token,
                    users: users.unwrap_or_default(),
                    bookmark_interval: std::time::Duration::from_secs(bookmark_secs),
                };
                let tls = tls_listen.zip(tls_cert.zip(tls_key)).map(|(listen, (cert, key))| apiserver::Tls {
                    listen,
                    cert,
                    key,
                });
                apiserver::run(listen, tls, &fixtures, cfg).map(|()| true)
            }),
        Cmd::Sidecar { listen } => serve::sidecar(listen).map(|()| true),
        Cmd::Relay { listen, to } => serve::relay(listen, to).map(|()| true),
        Cmd::HostileManager(a) => tpvpn_lab::hostile::run(a).map(|()| true),
        Cmd::Client(c) => run_client(c),
        Cmd::Demo => demo().map(|()| true),
        Cmd::Wan(a) => tpvpn_lab::wan::run_emulator(&a).map(|()| true),
        Cmd::Cleanup => tpvpn_lab::cleanup_stale().map(|removed| {
            for r in &removed {
                println!("removed {r}");
            }
            println!("{} stale item(s) removed", removed.len());
            true
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tpvpn-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_client(c: ClientCmd) -> Result<bool> {
    let outcome = match c {
        ClientCmd::Upload { addr, bytes } => client::upload(addr, bytes)?,
        ClientCmd::Download { addr, bytes } => client::download(addr, bytes)?,
        ClientCmd::Many { addr, n } => client::many(addr, n)?,
        ClientCmd::Reset { addr } => client::reset(addr)?,
        ClientCmd::Udp { addr, size } => client::udp(addr, size)?,
        ClientCmd::Connect { addr } => client::connect_probe(addr)?,
        ClientCmd::Flood { dns, queries, udp, flows } => client::flood(dns, queries, udp, flows)?,
        ClientCmd::HoldUnix { path, n, seconds } => client::hold_unix(&path, n, Duration::from_secs(seconds))?,
        ClientCmd::HalfClose { addr, bytes, seconds } => client::half_close(addr, bytes, Duration::from_secs(seconds))?,
        ClientCmd::Hold { addr, n, seconds } => client::hold(addr, n, Duration::from_secs(seconds))?,
    };
    println!("{}", outcome.line);
    Ok(outcome.ok)
}

/// The README's demo: every step is shown like a shell session; any failing step fails the demo.
fn demo() -> Result<()> {
    if !tpvpn_lab::require_root() {
        bail!("the demo needs root");
    }
    println!("# building the lab (namespaces laptop/cluster/inet; nginx, redis, dnsmasq, the Kubernetes API stand-in, the manager)...");
    let mut lab = Lab::new()?;
    println!("# lab ready in {}; laptop namespace {}", lab.dir().display(), lab.laptop());
    let mut failed = Vec::new();
    let ns = lab.laptop().to_string();
    println!(
        "# pods web-0/web-1 (Service web) and mesh-0: real containers (containerd, runc, CNI), made through the CRI; a caller pod and the node agent; nginx on the laptop's 127.0.0.1:18888..."
    );
    lab.start_pods()?;
    let socket = lab.containerd_socket().context("the node's containerd")?.display().to_string();
    let ctr = ["ctr", "--address", socket.as_str(), "--namespace", "k8s.io", "tasks", "ls"];
    step(&mut failed, "", &ctr, |a| lab.exec_timeout(lab.cluster(), a, std::time::Duration::from_secs(15)));
    lab.start_web_in(&ns, 18888, None, "answered by the laptop")?;

    // As a user does it: only a kubeconfig (the lab's API stand-in plays the cluster).
    let kc = lab.kubeconfig().display().to_string();
    let with_kc = |a: &[&str]| lab.tpvpn_env(a, &[("KUBECONFIG", kc.as_str())], std::time::Duration::from_secs(60));
    step(&mut failed, "KUBECONFIG=... tpvpn", &["manager", "install", "--namespace", "tpvpn-demo"], with_kc);
    step(&mut failed, "KUBECONFIG=... tpvpn", &["manager", "uninstall", "--namespace", "tpvpn-demo"], with_kc);
    if !step(&mut failed, "KUBECONFIG=... tpvpn", &["up", "--context", "lab"], with_kc) {
        bail!("tpvpn up failed; manager log:\n{}", lab.manager_log());
    }
    // Short timeout: redis-cli has no connect timeout of its own.
    let exec = |a: &[&str]| lab.exec_timeout(&ns, a, std::time::Duration::from_secs(15));
    step(&mut failed, "", &["curl", "-sS", "--max-time", "10", "http://frontend.default/"], exec);
    step(&mut failed, "", &["curl", "-sS", "--max-time", "10", "http://frontend.default.svc.cluster.local/"], exec);
    step(&mut failed, "", &["curl", "-sS", "--max-time", "10", "http://frontend/"], exec);
    let pod = format!("http://{}/", tpvpn_lab::FRONTEND_POD_IP);
    step(&mut failed, "", &["curl", "-sS", "--max-time", "10", &pod], exec);
    step(&mut failed, "", &["redis-cli", "-h", "redis-leader.default", "ping"], exec);
    step(&mut failed, "", &["dig", "+short", "docs.rs"], exec);
    step(&mut failed, "", &["dig", "+short", "SRV", "_http._tcp.frontend.default.svc.cluster.local"], exec);
    step(&mut failed, "tpvpn-lab", &["client", "udp", tpvpn_lab::UDP_ECHO_ADDR, "100"], |a| lab.lab_tool(&ns, a));
    // A personal intercept: the pods of Service web keep answering everyone, except the
    // requests that carry the developer's header, which reach nginx on the laptop.
    let intercept = ["intercept", "web", "--port", "18888:http", "--http-header", "x-dev=me"];
    step(&mut failed, "tpvpn", &intercept, |a| lab.tpvpn(a));
    let from_caller = |a: &[&str]| lab.exec_timeout(lab.caller(), a, std::time::Duration::from_secs(15));
    let web = format!("http://{}/", tpvpn_lab::pods::WEB_IP);
    step(
        &mut failed,
        "(in the caller pod)",
        &["curl", "-sS", "--max-time", "10", "-H", "x-dev: me", &web],
        from_caller,
    );
    step(&mut failed, "(in the caller pod)", &["curl", "-sS", "--max-time", "10", &web], from_caller);
    step(&mut failed, "tpvpn", &["list"], |a| lab.tpvpn(a));
    step(&mut failed, "tpvpn", &["leave", "web"], |a| lab.tpvpn(a));
    step(&mut failed, "tpvpn", &["status"], |a| lab.tpvpn(a));
    step(&mut failed, "", &["cat", "/etc/resolv.conf"], exec);
    step(&mut failed, "", &["ip", "route"], exec);
    step(&mut failed, "tpvpn", &["down"], |a| lab.tpvpn(a));
    step(&mut failed, "", &["ip", "route"], exec);
    step(&mut failed, "", &["cat", "/etc/resolv.conf"], exec);
    drop(lab);
    println!("\n# lab torn down");
    if !failed.is_empty() {
        bail!("failed steps: {}", failed.join("; "));
    }
    println!("# demo ok");
    Ok(())
}

/// Prints `$ <prog> <args>`, runs `run(args)`, prints its output and records a
/// failure. `prog` is only shown (empty when `args` is the whole command line).
fn step(failed: &mut Vec<String>, prog: &str, args: &[&str], run: impl Fn(&[&str]) -> std::process::Output) -> bool {
    let shown = if prog.is_empty() { args.join(" ") } else { format!("{prog} {}", args.join(" ")) };
    println!("\n$ {shown}");
    let out = run(args);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    print!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        println!("# FAILED ({})", out.status);
        failed.push(shown);
        return false;
    }
    true
}
