//! `tpvpn-manager`: the in-cluster traffic manager binary.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipnet::IpNet;

#[derive(Debug, Parser)]
#[command(name = "tpvpn-manager", version, about = "tpvpn's in-cluster traffic manager")]
struct Args {
    /// UDP address the QUIC server listens on.
    #[arg(long, default_value = "0.0.0.0:4443")]
    listen: SocketAddr,
    /// TCP address for clients that cannot send UDP to the manager: QUIC carried over a
    /// TCP stream, what `tpvpn up` reaches through the API server's port-forward (the
    /// container port `tunnel`). Default: the same address and port as --listen.
    #[arg(long, value_name = "ADDR")]
    tcp_listen: Option<SocketAddr>,
    /// PEM certificate the manager presents (clients pin it).
    #[arg(long)]
    tls_cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long)]
    tls_key: PathBuf,
    /// File holding the shared token clients may present. Required with `--auth token`;
    /// with `--auth kubernetes` laptops present certificates of their users, and this
    /// token is accepted besides only if given (for direct mode and earlier releases'
    /// clients: whoever holds it connects without an identity).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// How peers authenticate: `kubernetes` (the default with a Kubernetes API): laptops
    /// with client certificates this manager signs for their Kubernetes identities
    /// (CertificateSigningRequests of signer `tpvpn.dev/client`, only for users RBAC lets
    /// `create` `connections.tpvpn.dev`), node agents with their pods' projected
    /// ServiceAccount tokens (audience `tpvpn.dev/manager`), which the API server
    /// reviews: only --agent-service-account, and only for the node its pod runs on;
    /// `token`: the shared --token-file and --agent-token-file tokens (single-tenant
    /// setups without Kubernetes).
    #[arg(long, value_enum)]
    auth: Option<AuthMode>,
    /// The longest a laptop's certificate lives (seconds; `--auth kubernetes`). A laptop
    /// renews its certificate on its live session at two thirds of its life; a session
    /// whose certificate expired ends.
    #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
    max_certificate_lifetime: u64,
    /// The ServiceAccount node agents run as (`--auth kubernetes`), as NAMESPACE/NAME.
    /// Default: `<--namespace>-agents/tpvpn-agent`, where `tpvpn manager install` puts
    /// the DaemonSet.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    agent_service_account: Option<String>,
    /// File holding the token node agents present (`--auth token`); without it no
    /// agent can connect there, and intercepts are refused for want of one.
    #[arg(long)]
    agent_token_file: Option<PathBuf>,
    /// Kubeconfig to watch the cluster with when running outside it (its current context).
    /// In a pod the in-cluster configuration is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Run without Kubernetes even in a pod: the cluster is what the flags say.
    #[arg(long)]
    no_kubernetes: bool,
    /// Namespace the manager lives in.
    #[arg(long, default_value = "tpvpn")]
    namespace: String,
    /// A service or pod CIDR clients route through the tunnel (repeatable).
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    cluster_cidrs: Vec<IpNet>,
    /// The cluster DNS server.
    #[arg(long)]
    cluster_dns: Option<IpAddr>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// TCP address of the health (`/healthz`, `/readyz`) and Prometheus (`/metrics`) endpoints.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Seconds a TCP dial may take.
    #[arg(long, default_value_t = 10)]
    dial_timeout: u64,
    /// Seconds an idle UDP flow is kept.
    #[arg(long, default_value_t = 60)]
    udp_idle_timeout: u64,
    /// Connections at once (authenticated or not); more are refused.
    #[arg(long, default_value_t = tpvpn_manager::ConnectionLimits::default().max_connections)]
    max_connections: usize,
    /// Connections from one source address that have not yet authenticated; past it a
    /// new QUIC connection from there must prove its address (Retry). Never a refusal:
    /// every client behind one NAT, or through the API server's port-forward, shares one
    /// source address.
    #[arg(long, default_value_t = tpvpn_manager::ConnectionLimits::default().max_unauthenticated_per_source)]
    max_unauthenticated_per_source: usize,
    /// Dial only destinations in these CIDRs (repeatable; default: any but loopback,
    /// link-local, unspecified and multicast).
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    allow_cidrs: Vec<IpNet>,
    /// Never dial destinations in these CIDRs (repeatable).
    #[arg(long = "deny-cidr", value_name = "CIDR")]
    deny_cidrs: Vec<IpNet>,
    /// TCP flows one client may have open at once.
    #[arg(long, default_value_t = tpvpn_manager::policy::Limits::default().tcp_flows)]
    max_tcp_flows_per_client: usize,
    /// UDP flows one client may have open at once.
    #[arg(long, default_value_t = tpvpn_manager::policy::Limits::default().udp_flows)]
    max_udp_flows_per_client: usize,
    /// Cluster DNS queries one client may have in flight.
    #[arg(long, default_value_t = tpvpn_manager::policy::Limits::default().dns_queries)]
    max_dns_queries_per_client: usize,
    /// Namespaces whose Services clients may intercept (repeatable; default: every
    /// namespace that is not protected). Whoever holds the client token may otherwise take
    /// any Service's traffic and read its containers' environment (values from Secrets
    /// excepted).
    #[arg(long = "intercept-namespace", value_name = "NAMESPACE")]
    intercept_namespaces: Vec<String>,
    /// A namespace whose Services are never intercepted (repeatable), besides kube-system,
    /// kube-public, kube-node-lease and the manager's own (`--namespace`).
    #[arg(long = "protect-namespace", value_name = "NAMESPACE")]
    protect_namespaces: Vec<String>,
    /// Let clients intercept in the protected namespaces too.
    #[arg(long)]
    intercept_system_namespaces: bool,
    /// Worker threads. One is fastest where measured (quinn drives the endpoint and each
    /// connection from a single task, and a second worker mostly adds wake-ups between
    /// threads); more may help many clients with many busy flows.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuthMode {
    Kubernetes,
    Token,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(args) {
        eprintln!("tpvpn-manager: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// Every address of this host's interfaces (the manager's own, for the policy).
fn own_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return vec![] };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

/// Reads (or makes) the client CA, trusts it for client certificates, then signs laptops'
/// certificate requests; retried every few seconds while the API does not answer.
async fn sign_certificates(
    client: kube::Client,
    namespace: String,
    serving_pem: String,
    cas: Arc<tpvpn_tunnel::quic::ClientCas>,
    max_lifetime: std::time::Duration,
) {
    use tpvpn_manager::auth::csr;
    let ca = loop {
        match csr::client_ca(&client, &namespace, &serving_pem).await {
            Ok(ca) => break ca,
            Err(e) => tracing::warn!(error = %e, "no client CA yet: laptops cannot get certificates; retrying"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    };
    if let Err(e) = cas.set(ca.cert_pem().as_bytes()) {
        tracing::error!(error = %e, "the client CA cannot be used");
        return;
    }
    csr::sign_requests(client, Arc::new(ca), max_lifetime).await;
}

/// Raises the soft open-files limit to the hard one: every flow holds a socket.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            tracing::info!(from = soft, to = hard, "raised the open-files limit");
        }
    }
}

fn run(args: Args) -> Result<()> {
    raise_nofile_limit();
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let use_kubernetes = !args.no_kubernetes && (args.kubeconfig.is_some() || in_cluster);
    if !use_kubernetes && args.cluster_cidrs.is_empty() {
        bail!("no cluster CIDRs: give --cluster-cidr (the service and pod CIDRs), or --kubeconfig to learn them from the cluster");
    }
    let auth = args.auth.unwrap_or(if use_kubernetes { AuthMode::Kubernetes } else { AuthMode::Token });
    let token = match (&args.token_file, auth) {
        (Some(path), AuthMode::Kubernetes) => {
            tracing::warn!(
                file = %path.display(),
                "the shared client token is accepted besides laptops' certificates: whoever holds it connects without an identity; drop --token-file to refuse it"
            );
            read_token(path)?
        }
        (Some(path), AuthMode::Token) => read_token(path)?,
        (None, AuthMode::Kubernetes) => Vec::new(),
        (None, AuthMode::Token) => bail!("--auth token needs --token-file (the token clients present)"),
    };
    if auth == AuthMode::Kubernetes && !use_kubernetes {
        bail!(
            "--auth kubernetes needs the Kubernetes API (--kubeconfig, or run in a pod); without it use --auth token"
        );
    }
    if auth == AuthMode::Kubernetes && args.agent_token_file.is_some() {
        bail!(
            "--agent-token-file is for --auth token: with --auth kubernetes agents present their ServiceAccount tokens"
        );
    }
    let agent_token = args.agent_token_file.as_deref().map(read_token).transpose()?;
    if !token.is_empty() && agent_token.as_ref() == Some(&token) {
        bail!("--agent-token-file holds the client token: agents need a token of their own");
    }
    let agent_account =
        args.agent_service_account.clone().unwrap_or_else(|| format!("{}-agents/tpvpn-agent", args.namespace));
    let Some((agent_ns, agent_sa)) = agent_account.split_once('/').filter(|(n, s)| !n.is_empty() && !s.is_empty())
    else {
        bail!("--agent-service-account {agent_account}: expected NAMESPACE/NAME");
    };
    let (agent_ns, agent_sa) = (agent_ns.to_string(), agent_sa.to_string());
    let certs = tpvpn_tunnel::quic::load_certs(&args.tls_cert)?;
    let key = tpvpn_tunnel::quic::load_key(&args.tls_key)?;
    let serving_pem = std::fs::read_to_string(&args.tls_cert)?;
    // Laptops' certificates from this manager's signer (`--auth kubernetes`), trusted once
    // the client CA is read from the cluster.
    let client_cas = (auth == AuthMode::Kubernetes).then(|| Arc::new(tpvpn_tunnel::quic::ClientCas::default()));
    let server = tpvpn_tunnel::quic::server_config_with(certs, key, client_cas.clone())?;
    let base =
        tpvpn_tunnel::ClusterInfo { cidrs: args.cluster_cidrs, dns: args.cluster_dns, domain: args.cluster_domain };

    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(usize::from(args.workers)).enable_all().build()?;
    let tcp_listen = args.tcp_listen.unwrap_or(args.listen);
    rt.block_on(async move {
        let (cluster, agents, access) = if use_kubernetes {
            let client = kube_client(args.kubeconfig.as_deref()).await?;
            match client_cas.clone() {
                Some(cas) => {
                    let max = std::time::Duration::from_secs(args.max_certificate_lifetime.max(1));
                    drop(tokio::spawn(sign_certificates(client.clone(), args.namespace.clone(), serving_pem, cas, max)))
                }
                None => {
                    let (client, namespace) = (client.clone(), args.namespace.clone());
                    tokio::spawn(async move {
                        if let Err(e) = tpvpn_manager::auth::csr::withdraw_client_ca(&client, &namespace).await {
                            tracing::warn!(error = %e, "laptops may ask for certificates this manager does not sign");
                        }
                    });
                }
            }
            let agents = match auth {
                AuthMode::Kubernetes => {
                    tracing::info!(service_account = %agent_account, "agents authenticate with their ServiceAccount tokens");
                    let reviewer = tpvpn_manager::auth::Reviewer::new(client.clone(), &agent_ns, &agent_sa);
                    tpvpn_manager::auth::AgentAuth::Kubernetes(std::sync::Arc::new(reviewer))
                }
                AuthMode::Token => agent_token.map_or(tpvpn_manager::auth::AgentAuth::None, tpvpn_manager::auth::AgentAuth::Token),
            };
            let access = (auth == AuthMode::Kubernetes).then(|| tpvpn_manager::auth::access::Access::new(client.clone()));
            (tpvpn_manager::cluster::watch(client, base, std::time::Duration::from_secs(10)).await, agents, access)
        } else {
            let agents = agent_token.map_or(tpvpn_manager::auth::AgentAuth::None, tpvpn_manager::auth::AgentAuth::Token);
            (tpvpn_manager::cluster::fixed(base), agents, None)
        };
        let mut config = tpvpn_manager::Config::with_views(token, cluster);
        config.agents = agents;
        config.access = access;
        config.client_cas = client_cas;

        config.dial_timeout = std::time::Duration::from_secs(args.dial_timeout);
        config.udp_idle_timeout = std::time::Duration::from_secs(args.udp_idle_timeout);
        config.limits.max_connections = args.max_connections;
        config.limits.max_unauthenticated_per_source = args.max_unauthenticated_per_source;
        config.policy = tpvpn_manager::policy::Policy {
            allow: args.allow_cidrs,
            deny: args.deny_cidrs,
            own_addresses: own_addresses(),
            own_ports: vec![args.listen.port(), tcp_listen.port(), args.metrics_listen.port()],
            allow_all: false,
        };
        config.intercept_namespaces = tpvpn_manager::intercepts::NamespacePolicy {
            allowed: args.intercept_namespaces,
            protected: std::iter::once(args.namespace.clone()).chain(args.protect_namespaces).collect(),
            system: args.intercept_system_namespaces,
        };
        config.session_limits = tpvpn_manager::policy::Limits {
            tcp_flows: args.max_tcp_flows_per_client,
            udp_flows: args.max_udp_flows_per_client,
            dns_queries: args.max_dns_queries_per_client,
        };
        let metrics = config.metrics.clone();
        let health = tokio::net::TcpListener::bind(args.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on --metrics-listen {}", args.metrics_listen))?;
        tokio::spawn(tpvpn_manager::metrics::serve(health, metrics.clone()));
        let endpoint = tpvpn_manager::bind(args.listen, server.clone())
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let tcp = bind_tcp(tcp_listen).with_context(|| format!("cannot listen on --tcp-listen {tcp_listen} (TCP)"))?;
        metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(listen = %args.listen, tcp_listen = %tcp_listen, namespace = %args.namespace, "tpvpn-manager ready");
        let manager = tpvpn_manager::Server::new(config);
        tokio::spawn(manager.clone().serve_tcp(tcp, server.clone()));
        tokio::select! {
            _ = manager.serve_quic(endpoint.clone(), server) => {}
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                endpoint.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"manager shutting down");
                endpoint.wait_idle().await;
            }
        }
        Ok(())
    })
}

/// A TCP listener on `addr`; an IPv6 wildcard takes IPv4 too, as the UDP socket does.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn read_token(path: &std::path::Path) -> Result<Vec<u8>> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?
        .trim()
        .as_bytes()
        .to_vec();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(token)
}

/// A Kubernetes client from `--kubeconfig` (its current context), else in-cluster.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let k = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(k, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context("in-cluster Kubernetes configuration")?,
    };
    Ok(kube::Client::try_from(config)?)
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
