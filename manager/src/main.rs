//! `tpvpn-manager`: the in-cluster traffic manager binary.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipnet::IpNet;

#[derive(Debug, Parser)]
#[command(name = "tpvpn-manager", version, about = "tpvpn's in-cluster traffic manager")]
struct Args {
    /// UDP address the QUIC server listens on.
    #[arg(long, default_value = "0.0.0.0:4443")]
    listen: SocketAddr,
    /// PEM certificate the manager presents (clients pin it).
    #[arg(long)]
    tls_cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long)]
    tls_key: PathBuf,
    /// File holding the token clients must present.
    #[arg(long)]
    token_file: PathBuf,
    /// Kubeconfig to watch the cluster with when running outside it (not implemented yet).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
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
    /// Seconds a TCP dial may take.
    #[arg(long, default_value_t = 10)]
    dial_timeout: u64,
    /// Seconds an idle UDP flow is kept.
    #[arg(long, default_value_t = 60)]
    udp_idle_timeout: u64,
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

fn run(args: Args) -> Result<()> {
    if args.kubeconfig.is_some() {
        bail!(
            "--kubeconfig: watching Kubernetes is not implemented yet; give the cluster with --cluster-cidr, --cluster-dns and --cluster-domain"
        );
    }
    if args.cluster_cidrs.is_empty() {
        bail!("no cluster CIDRs: give at least one --cluster-cidr (the service and pod CIDRs)");
    }
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("cannot read token file {}", args.token_file.display()))?
        .trim()
        .as_bytes()
        .to_vec();
    if token.is_empty() {
        bail!("token file {} is empty", args.token_file.display());
    }
    let certs = tpvpn_tunnel::quic::load_certs(&args.tls_cert)?;
    let key = tpvpn_tunnel::quic::load_key(&args.tls_key)?;
    let server = tpvpn_tunnel::quic::server_config(certs, key)?;
    let mut config = tpvpn_manager::Config::new(token, args.cluster_cidrs, args.cluster_dns, args.cluster_domain);
    config.dial_timeout = std::time::Duration::from_secs(args.dial_timeout);
    config.udp_idle_timeout = std::time::Duration::from_secs(args.udp_idle_timeout);

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let endpoint =
            tpvpn_manager::bind(args.listen, server).with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listen = %args.listen, namespace = %args.namespace, "tpvpn-manager ready");
        let serve = tpvpn_manager::serve(endpoint.clone(), config);
        tokio::select! {
            _ = serve => {}
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                endpoint.close(tpvpn_tunnel::CLOSE_NORMAL.into(), b"manager shutting down");
                endpoint.wait_idle().await;
            }
        }
        Ok(())
    })
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
