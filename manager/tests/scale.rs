//! Any cluster size: the real `tpvpn-manager` binary watching 50,000 Services in 5,000
//! namespaces (the lab's Kubernetes API stand-in, in-process on loopback), and 200
//! clients on loopback, each receiving the whole catalog in chunks. The manager's memory
//! per connected client must stay under [`PER_CLIENT_KIB`]: the catalog is encoded once
//! and shared by every session, not copied per client, and quinn's per-stream state is
//! allocated only for the streams a client is granted (measured: 2,599 KiB per client
//! when every connection was granted 32,768 streams at once; 9 KiB now). No root needed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{hello, rss_kib, Manager};
use serde_json::{json, Value};
use tpvpn_lab::apiserver::{ApiServer, Config, Store};
use tpvpn_tunnel::io::read_message;
use tpvpn_tunnel::Message;

const SERVICES: usize = 50_000;
const NAMESPACES: usize = 5_000;
const CLIENTS: usize = 200;
/// The bound on the manager's resident memory per connected client.
const PER_CLIENT_KIB: u64 = 128;
const TOKEN: &str = "scale-test-token";
/// Clients connecting at once.
const BATCH: usize = 10;

fn fixtures() -> Vec<Value> {
    let mut objs: Vec<Value> = (0..NAMESPACES)
        .map(|i| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("team-{i:04}")}}))
        .collect();
    objs.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "spec": {"podCIDRs": ["10.244.0.0/16"]}}));
    for i in 0..SERVICES {
        let ip = format!("10.100.{}.{}", i / 256, i % 256);
        objs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("payments-api-{i}"), "namespace": format!("team-{:04}", i % NAMESPACES)},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [
                {"name": "http", "port": 80}, {"name": "grpc", "port": 9090}, {"name": "metrics", "port": 9102}]}}));
    }
    objs
}

/// One client: the hello, then the catalog until a `complete` chunk. Returns the
/// connection (kept open), its control stream, and how many Services it got.
async fn client(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> (quinn::Connection, (quinn::SendStream, quinn::RecvStream), usize) {
    let conn = endpoint.connect(addr, tpvpn_tunnel::quic::SERVER_NAME).unwrap().await.expect("connect");
    let (send, mut recv) = hello(&conn, TOKEN, "scale").await.unwrap_or_else(|step| panic!("{step:?}"));
    let mut services = 0;
    loop {
        match read_message(&mut recv).await.unwrap().unwrap() {
            Message::CatalogChunk { services: s, complete, .. } => {
                services += s.len();
                if complete {
                    break;
                }
            }
            Message::ClusterUpdate { .. } => {}
            other => panic!("unexpected {}", other.kind()),
        }
    }
    (conn, (send, recv), services)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_get_fifty_thousand_services_and_cost_little_each() {
    let dir = std::env::temp_dir().join(format!("tpvpn-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut store = Store::default();
    store.load(fixtures()).expect("fixtures");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let cfg = Config {
        admin_token: TOKEN.into(),
        no_secrets_token: None,
        no_portforward_token: None,
        users: Vec::new(),
        bookmark_interval: Duration::from_secs(60),
    };
    let server = tokio::spawn(ApiServer::new(store, cfg, api.to_string()).serve(listener));
    std::fs::write(
        dir.join("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: t\nclusters:\n- name: t\n  cluster:\n    server: http://{api}\n\
             contexts:\n- name: t\n  context:\n    cluster: t\n    user: t\nusers:\n- name: t\n  user:\n    token: {TOKEN}\n"
        ),
    )
    .unwrap();
    let kubeconfig = dir.join("kubeconfig").display().to_string();
    let m = Manager::start(TOKEN, &["--kubeconfig", &kubeconfig]);
    let (pid, addr) = (m.pid(), m.addr);
    let endpoint = m.client_endpoint();
    let started = Instant::now();
    let first = client(&endpoint, addr).await;
    eprintln!("one client: hello and {} Services in {:?}", first.2, started.elapsed());
    assert!(first.2 >= SERVICES, "{} Services", first.2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);

    // In batches below the manager's cap on unauthenticated connections from one source.
    let mut held = vec![first];
    for batch in 0..(CLIENTS - 1).div_ceil(BATCH) {
        let n = BATCH.min(CLIENTS - 1 - batch * BATCH);
        let got = futures::future::join_all((0..n).map(|_| client(&endpoint, addr))).await;
        for c in &got {
            assert!(c.2 >= SERVICES, "a client got {} Services", c.2);
        }
        held.extend(got);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    let per_client = after.saturating_sub(before) / (CLIENTS as u64 - 1);
    eprintln!("manager RSS {before} KiB with one client, {after} KiB with {CLIENTS}: {per_client} KiB per client");
    assert!(
        per_client < PER_CLIENT_KIB,
        "{per_client} KiB of manager memory per connected client (bound {PER_CLIENT_KIB} KiB)"
    );
    assert_eq!(held.len(), CLIENTS);
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
