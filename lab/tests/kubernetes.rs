//! End-to-end tests of `tpvpn up` driven by a kubeconfig: discovery of the manager and
//! its credentials through the Kubernetes API (the lab's stand-in), the kubeconfig
//! extensions, and cluster changes pushed while connected. Root only; skip loudly
//! otherwise.

use std::process::Output;
use std::time::Duration;

use tpvpn_lab::{show, Lab};

fn lab() -> Option<Lab> {
    if !tpvpn_lab::require_root() {
        return None;
    }
    Some(Lab::new().unwrap_or_else(|e| panic!("cannot build the lab: {e:#}")))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `tpvpn up` with `KUBECONFIG` pointing at `kubeconfig` and the given extra args.
fn up_kube(lab: &Lab, kubeconfig: &std::path::Path, extra: &[&str]) -> Output {
    let mut args = vec!["up"];
    args.extend_from_slice(extra);
    let kc = kubeconfig.display().to_string();
    lab.tpvpn_env(&args, &[("KUBECONFIG", &kc)], Duration::from_secs(60))
}

fn routed_via_tun(lab: &Lab, ip: &str) -> bool {
    stdout(&lab.exec(lab.laptop(), &["ip", "route", "get", ip])).contains("tpvpn0")
}

#[test]
fn up_with_only_a_kubeconfig_finds_the_manager_and_works() {
    let Some(lab) = lab() else { return };
    let out = up_kube(&lab, &lab.kubeconfig(), &[]);
    assert!(out.status.success(), "tpvpn up from the kubeconfig:\n{}\nmanager:\n{}", show(&out), lab.manager_log());
    let page = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"]);
    assert!(stdout(&page).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&page));
    let pod = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://10.244.1.10/"]);
    assert!(stdout(&pod).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&pod));
    let st = lab.tpvpn(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&st)));
    assert_eq!(v["context"], "lab", "{v}");
    assert_eq!(v["manager"], tpvpn_lab::MANAGER_ADDR, "found through the Service's NodePort on the API host: {v}");
    // Learned by the manager from the stand-in's Services and Nodes, not from flags.
    let routes: Vec<&str> = v["routes"].as_array().unwrap().iter().filter_map(|r| r.as_str()).collect();
    assert_eq!(routes, ["10.96.0.0/16", "10.244.0.0/16"], "{v}");
    let never: Vec<&str> = v["never_proxy"].as_array().unwrap().iter().filter_map(|r| r.as_str()).collect();
    assert!(never.contains(&"10.250.1.1/32"), "the API server's address is never routed: {v}");
}

#[test]
fn never_proxy_from_tpvpn_and_telepresence_extensions() {
    let Some(lab) = lab() else { return };
    let kc = std::fs::read_to_string(lab.kubeconfig()).unwrap();
    let server = format!("    server: {}\n", lab.apiserver_url());
    assert!(kc.contains(&server), "unexpected lab kubeconfig:\n{kc}");
    let with_ext = kc.replace(
        &server,
        &format!(
            "{server}    extensions:\n    - name: tpvpn\n      extension:\n        never-proxy: [10.96.0.48/28]\n    - name: telepresence.io\n      extension:\n        never-proxy: [10.244.1.0/24]\n"
        ),
    );
    let path = lab.dir().join("kubeconfig-ext");
    std::fs::write(&path, with_ext).unwrap();
    let out = up_kube(&lab, &path, &["--context", "lab"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(!routed_via_tun(&lab, "10.96.0.50"), "tpvpn extension never-proxy is routed");
    assert!(!routed_via_tun(&lab, "10.244.1.10"), "telepresence.io extension never-proxy is routed");
    assert!(routed_via_tun(&lab, "10.96.0.10") && routed_via_tun(&lab, "10.244.2.1"), "cluster CIDRs are not routed");
}

#[test]
fn service_created_while_connected_becomes_routable() {
    let Some(lab) = lab() else { return };
    let out = up_kube(&lab, &lab.kubeconfig(), &[]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(!routed_via_tun(&lab, "10.97.0.5"), "10.97.0.5 routed before any Service has it");
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "late", "namespace": "default"},
        "spec": {"clusterIP": "10.97.0.5", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    });
    lab.kube_apply("POST", "/api/v1/namespaces/default/services", Some(&svc)).expect("create Service default/late");
    // The Service's address exists in the cluster (no listener on port 80).
    let add = lab.exec(lab.cluster(), &["ip", "addr", "add", "10.97.0.5/32", "dev", "lo"]);
    assert!(add.status.success(), "{}", show(&add));
    let mut routed = false;
    for _ in 0..100 {
        if routed_via_tun(&lab, "10.97.0.5") {
            routed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(routed, "the new Service's address was not routed within 10 s\nmanager:\n{}", lab.manager_log());
    // Traffic reaches the cluster: the manager dials it and the cluster refuses.
    let out = lab.lab_tool(lab.laptop(), &["client", "connect", "10.97.0.5:80"]);
    assert!(stdout(&out).starts_with("refused "), "{}", show(&out));
    let st = lab.tpvpn(&["status", "-o", "json"]);
    assert!(stdout(&st).contains("10.96.0.0/15"), "status shows the widened route: {}", show(&st));
}

#[test]
fn wrong_context_names_the_file_and_the_contexts() {
    let Some(lab) = lab() else { return };
    let out = up_kube(&lab, &lab.kubeconfig(), &["--context", "minikube"]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("context `minikube` not found in"), "{}", show(&out));
    assert!(err.contains(&lab.kubeconfig().display().to_string()), "{}", show(&out));
    assert!(err.contains("contexts: lab, lab-no-secrets"), "{}", show(&out));
    assert_eq!(err.trim().lines().count(), 1, "one line: {}", show(&out));
}

#[test]
fn forbidden_and_missing_secret_are_explained() {
    let Some(lab) = lab() else { return };
    let out = up_kube(&lab, &lab.kubeconfig(), &["--context", "lab-no-secrets"]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("may not read Secret tpvpn/tpvpn-client") && err.contains("forbidden"), "{}", show(&out));

    lab.kube_apply("DELETE", "/api/v1/namespaces/tpvpn/secrets/tpvpn-client", None).expect("delete the Secret");
    let out = up_kube(&lab, &lab.kubeconfig(), &[]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("Secret tpvpn/tpvpn-client not found") && err.contains("tpvpn manager install"),
        "{}",
        show(&out)
    );
    // Nothing was changed on the laptop.
    let link = lab.exec(lab.laptop(), &["ip", "link", "show", "tpvpn0"]);
    assert!(!link.status.success(), "{}", show(&link));
}
