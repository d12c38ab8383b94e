//! The manager's cluster watch against the lab's Kubernetes API stand-in (the one
//! stand-in the project allows), served in-process on loopback: the first view is the
//! listed one, and a cluster whose nodes report no `podCIDRs` has its pod CIDR learned
//! from pod IPs. No root needed.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tpvpn_lab::apiserver::{ApiServer, Config, Store};
use tpvpn_manager::cluster;
use tpvpn_tunnel::ClusterInfo;

const TOKEN: &str = "cluster-watch-test-token";

fn fixtures() -> Vec<Value> {
    let mut objs = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}),
        // A node that, as on some managed clusters, does not say which pod CIDR it has.
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": {}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system"},
               "spec": {"clusterIP": "10.43.0.10", "clusterIPs": ["10.43.0.10"],
                        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
               "spec": {"clusterIP": "10.43.7.1", "clusterIPs": ["10.43.7.1"],
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        // Host-network pods carry node addresses: they must not widen the pod CIDR.
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
               "spec": {"hostNetwork": true}, "status": {"podIPs": [{"ip": "192.168.5.2"}]}}),
    ];
    for (i, ip) in ["10.244.0.7", "10.244.1.9"].iter().enumerate() {
        objs.push(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("web-{i}"), "namespace": "default"},
                         "spec": {}, "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}),
        );
    }
    objs
}

/// The stand-in on an ephemeral loopback port, and a client for it.
async fn api() -> (kube::Client, tokio::task::JoinHandle<()>) {
    let mut store = Store::default();
    store.load(fixtures()).expect("fixtures load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().unwrap();
    let cfg = Config {
        admin_token: TOKEN.into(),
        no_secrets_token: None,
        no_portforward_token: None,
        users: Vec::new(),
        bookmark_interval: Duration::from_secs(60),
    };
    let server = tokio::spawn(ApiServer::new(store, cfg, addr.to_string()).serve(listener));
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\nclusters:\n- name: t\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: t\n  context:\n    cluster: t\n    user: t\nusers:\n- name: t\n  user:\n    token: {TOKEN}\n"
    );
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("client config");
    (kube::Client::try_from(config).expect("client"), server)
}

// One worker thread, as the manager runs by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn first_view_is_the_listed_one_and_pod_cidrs_come_from_pod_ips() {
    let (client, server) = api().await;
    let base = ClusterInfo { cidrs: vec![], dns: None, domain: "cluster.local".into() };
    // Several rounds: whether two tasks ever waited on one store's readiness at once
    // depends on scheduling, and one of them then slept through it.
    for round in 0..8 {
        let wait = Duration::from_secs(60);
        let listed = tokio::time::timeout(Duration::from_secs(30), cluster::watch(client.clone(), base.clone(), wait));
        let mut views = listed
            .await
            .unwrap_or_else(|_| panic!("round {round}: watch() waited for its timeout though the API answered"));
        let first = views.cluster.borrow().clone();
        assert!(first.cidrs.contains(&"10.43.0.0/16".parse().unwrap()), "round {round}: first view {first:?}");
        assert_eq!(first.dns, Some("10.43.0.10".parse().unwrap()), "round {round}");
        let catalog = Arc::clone(&views.catalog.borrow());
        assert_eq!(catalog.catalog.namespaces, ["default", "kube-system"], "round {round}");
        assert_eq!(catalog.catalog.services.len(), 2, "round {round}");
        // The pod watch starts after the nodes are listed; its CIDR follows.
        let learned = tokio::time::timeout(
            Duration::from_secs(30),
            views.cluster.wait_for(|v| v.cidrs.contains(&"10.244.0.0/16".parse().unwrap())),
        )
        .await
        .is_ok();
        let view = views.cluster.borrow().clone();
        assert!(learned, "round {round}: pod CIDR never learned: {view:?}");
        let want: Vec<ipnet::IpNet> = vec!["10.43.0.0/16".parse().unwrap(), "10.244.0.0/16".parse().unwrap()];
        assert_eq!(view.cidrs, want, "round {round}: host-network pods stay out");
    }
    server.abort();
}
