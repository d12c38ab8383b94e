//! A **test double** of the manager that a laptop must not trust (`tpvpn-lab
//! hostile-manager`): it speaks the real protocol (the same QUIC and TLS settings, the
//! sans-IO hello), accepts the lab's client token, and then tells the laptop what a
//! compromised or buggy manager could: namespaces with names Kubernetes never allows
//! (one crafted as a `busctl` option), a cluster domain of `.`, routes covering half the
//! internet and thousands of host routes. It answers nothing else (flows are reset).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use tpvpn_tunnel::handshake::{ServerHandshake, ServerStep, TokenKind};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::{ClusterInfo, Message, Protocol, ServiceInfo, ServicePort, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// What the double says.
#[derive(Debug, Clone, clap::Args)]
pub struct HostileArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub tls_cert: PathBuf,
    #[arg(long)]
    pub tls_key: PathBuf,
    #[arg(long)]
    pub token_file: PathBuf,
    /// The cluster domain to announce.
    #[arg(long, default_value = ".")]
    pub cluster_domain: String,
    /// CIDRs to announce (repeatable).
    #[arg(long = "cidr")]
    pub cidrs: Vec<ipnet::IpNet>,
    /// Also announce this many host routes (10.200.0.0 upwards, every other address).
    #[arg(long, default_value_t = 0)]
    pub host_routes: u32,
    /// Namespace names to push (repeatable), besides `default`.
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
}

pub fn run(args: HostileArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let certs = tpvpn_tunnel::quic::load_certs(&args.tls_cert)?;
        let key = tpvpn_tunnel::quic::load_key(&args.tls_key)?;
        let token = std::fs::read_to_string(&args.token_file).context("token")?.trim().as_bytes().to_vec();
        let endpoint = tpvpn_tunnel::quic::endpoint(args.listen, Some(tpvpn_tunnel::quic::server_config(certs, key)?))?;
        let mut cidrs = args.cidrs.clone();
        for i in 0..args.host_routes {
            let ip = std::net::Ipv4Addr::new(10, 200 + (i / 32_768) as u8, (i / 128 % 256) as u8, (i % 128 * 2) as u8);
            cidrs.push(ipnet::IpNet::from(std::net::IpAddr::V4(ip)));
        }
        let cluster = ClusterInfo { cidrs, dns: None, domain: args.cluster_domain.clone() };
        let mut namespaces = vec!["default".to_string()];
        namespaces.extend(args.namespaces.iter().cloned());
        eprintln!("tpvpn-manager ready (hostile test double) on {}", args.listen);
        while let Some(incoming) = endpoint.accept().await {
            let (token, cluster, namespaces) = (token.clone(), cluster.clone(), namespaces.clone());
            tokio::spawn(async move {
                if let Err(e) = session(incoming, token, cluster, namespaces).await {
                    eprintln!("hostile-manager: session: {e:#}");
                }
            });
        }
        Ok(())
    })
}

async fn session(
    incoming: quinn::Incoming,
    token: Vec<u8>,
    cluster: ClusterInfo,
    namespaces: Vec<String>,
) -> Result<()> {
    let conn = incoming.await?;
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(1024));
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut hs = ServerHandshake::new((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), 0);
    let peer = loop {
        let m = read_message(&mut recv).await?.context("no hello")?;
        match hs.on_message(m, |t| (t == token.as_slice()).then_some(TokenKind::Client)) {
            ServerStep::NeedMore => continue,
            ServerStep::Accept(p) => break p,
            other => anyhow::bail!("hello: {other:?}"),
        }
    };
    for f in hs.accept_frames(peer.version, cluster) {
        write_message(&mut send, &f).await?;
    }
    let frontend = ServiceInfo {
        namespace: "default".into(),
        name: "frontend".into(),
        cluster_ips: vec![crate::FRONTEND_IP.parse()?],
        ports: vec![ServicePort { name: "http".into(), protocol: Protocol::Tcp, port: 80 }],
    };
    let mut services = vec![frontend];
    for ns in &namespaces {
        services.push(ServiceInfo { namespace: ns.clone(), name: ns.clone(), cluster_ips: vec![], ports: vec![] });
    }
    write_message(
        &mut send,
        &Message::CatalogChunk {
            reset: true,
            complete: true,
            namespaces_added: namespaces,
            namespaces_removed: vec![],
            services,
            services_removed: vec![],
        },
    )
    .await?;
    // Keep the control stream; refuse every flow.
    loop {
        let (mut s, _r) = conn.accept_bi().await?;
        let _ = s.reset(tpvpn_tunnel::RESET_CODE.into());
    }
}
