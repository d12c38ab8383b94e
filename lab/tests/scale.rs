//! A large cluster in the lab: 50,000 Services with ordinary names and three ports each,
//! in 5,000 namespaces, in the API stand-in. `tpvpn up` completes, every Service is
//! listed and resolves from the local table, and a Service added or removed afterwards
//! is seen by the laptop (the manager sends deltas). Needs root.

use std::time::Duration;

use serde_json::{json, Value};
use tpvpn_lab::{show, wait_until, Lab};

const SERVICES: usize = 50_000;
const NAMESPACES: usize = 5_000;
const WORDS: [&str; 8] =
    ["checkout", "payments", "inventory", "recommendations", "search-api", "auth", "orders", "ledger"];

fn name(i: usize) -> (String, String, String) {
    let ns = format!("team-{:04}", i % NAMESPACES);
    let svc = format!("{}-{i}", WORDS[i % WORDS.len()]);
    let ip = format!("10.100.{}.{}", i / 256, i % 256);
    (ns, svc, ip)
}

fn large_cluster() -> Vec<Value> {
    let mut objs: Vec<Value> = (0..NAMESPACES)
        .map(|i| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("team-{i:04}")}}))
        .collect();
    for i in 0..SERVICES {
        let (ns, svc, ip) = name(i);
        objs.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc, "namespace": ns},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "grpc", "port": 9090, "protocol": "TCP", "targetPort": 9090},
                {"name": "metrics", "port": 9102, "protocol": "TCP", "targetPort": 9102}]}}));
    }
    objs
}

fn dig(lab: &Lab, name: &str) -> String {
    let out = lab.exec(lab.laptop(), &["dig", "+short", "+time=2", "+tries=1", name]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn listed(lab: &Lab) -> Vec<(String, String)> {
    let out = lab.tpvpn_env(&["list", "-o", "json"], &[], Duration::from_secs(60));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", show(&out)));
    v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["namespace"].as_str().unwrap_or_default().to_string(),
                s["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn fifty_thousand_services_are_listed_resolve_and_follow_changes() {
    if !tpvpn_lab::require_root() {
        return;
    }
    let lab = Lab::with_fixtures(large_cluster()).unwrap_or_else(|e| panic!("cannot build the lab: {e:#}"));
    lab.up(&[]).unwrap_or_else(|e| panic!("tpvpn up: {e:#}\nmanager log:\n{}", lab.manager_log()));

    let all = listed(&lab);
    let want: std::collections::HashSet<(String, String)> = (0..SERVICES)
        .map(|i| {
            let (ns, svc, _) = name(i);
            (ns, svc)
        })
        .collect();
    let got: std::collections::HashSet<(String, String)> = all.into_iter().collect();
    let missing = want.difference(&got).count();
    assert_eq!(missing, 0, "{missing} of {SERVICES} Services not listed");
    for i in [0, 1, 4_999, 25_000, SERVICES - 1] {
        let (ns, svc, ip) = name(i);
        assert_eq!(dig(&lab, &format!("{svc}.{ns}.svc.cluster.local")), ip, "{svc}.{ns}");
        assert_eq!(dig(&lab, &format!("{svc}.{ns}")), ip, "{svc}.{ns} (short form)");
    }

    // A Service added, and one removed, after the snapshot: seen as deltas.
    lab.kube_apply(
        "POST",
        "/api/v1/namespaces/team-0042/services",
        Some(&json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "brand-new", "namespace": "team-0042"},
        "spec": {"clusterIP": "10.100.250.1", "clusterIPs": ["10.100.250.1"], "ports": [{"port": 80}]}})),
    )
    .unwrap();
    let (ns, gone, _) = name(7);
    lab.kube_apply("DELETE", &format!("/api/v1/namespaces/{ns}/services/{gone}"), None).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || dig(&lab, "brand-new.team-0042.svc.cluster.local") == "10.100.250.1"),
        "the added Service does not resolve:\n{}",
        lab.manager_log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || dig(&lab, &format!("{gone}.{ns}.svc.cluster.local")).is_empty()),
        "the removed Service still resolves"
    );
    let after = listed(&lab);
    assert!(after.contains(&("team-0042".to_string(), "brand-new".to_string())));
    assert!(!after.contains(&(ns, gone)));
    assert!(lab.manager_log().matches("catalog changed").count() >= 2, "{}", lab.manager_log());
}
