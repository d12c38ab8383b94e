//! End-to-end tests of `tpvpn up` driven by a kubeconfig: discovery of the manager and
//! its credentials through the Kubernetes API (the lab's stand-in), the kubeconfig
//! extensions, and cluster changes pushed while connected. Root only; skip loudly
//! otherwise.

use std::process::Output;
use std::time::Duration;

use tpvpn_lab::{show, Lab};

fn lab() -> Option<Lab> {
    tpvpn_lab::lab_or_skip()
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
    assert_eq!(routes, ["10.96.0.0/16", "10.244.0.0/16", "fd00:96::/112"], "{v}");
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
    let routed = tpvpn_lab::wait_until(Duration::from_secs(30), || routed_via_tun(&lab, "10.97.0.5"));
    assert!(routed, "the new Service's address was not routed within 30 s\nmanager:\n{}", lab.manager_log());
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
    let Some(mut lab) = lab() else { return };
    // A manager that signs no certificates: laptops read the shared token.
    lab.restart_manager_with(&[], &["--auth", "token"]).unwrap();
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

/// GET `path` from the stand-in as admin: the object, or `None` on 404.
fn get(lab: &Lab, path: &str) -> Option<serde_json::Value> {
    let (code, body) = lab.kube_request(Some(&lab.api_token()), "GET", path, None).expect("request to the stand-in");
    match code {
        200 => Some(body),
        404 => None,
        other => panic!("GET {path}: {other} {body}"),
    }
}

fn rv(obj: &serde_json::Value) -> String {
    obj["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string()
}

fn b64(obj: &serde_json::Value, key: &str) -> Vec<u8> {
    use base64::Engine;
    let s = obj["data"][key].as_str().unwrap_or_else(|| panic!("no data.{key} in {obj}"));
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

#[test]
fn manager_install_is_idempotent_and_uninstall_removes_everything() {
    let Some(lab) = lab() else { return };
    let kc = lab.kubeconfig().display().to_string();
    let install =
        ["manager", "install", "--kubeconfig", &kc, "--namespace", "tpvpn-test", "--image", "reg.example/m:1"];
    let out = lab.tpvpn(&install);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains("created Secrets tpvpn-manager-tls, tpvpn-client, tpvpn-test-agents/tpvpn-agent"),
        "{}",
        show(&out)
    );
    let ns = "/api/v1/namespaces/tpvpn-test";
    let dep_path = "/apis/apps/v1/namespaces/tpvpn-test/deployments/tpvpn-manager";
    let dep = get(&lab, dep_path).expect("Deployment applied");
    assert_eq!(dep["spec"]["template"]["spec"]["containers"][0]["image"], "reg.example/m:1");
    let role = get(&lab, "/apis/rbac.authorization.k8s.io/v1/clusterroles/tpvpn-manager").expect("ClusterRole");
    assert_eq!(role["rules"][0]["verbs"], serde_json::json!(["list", "watch"]), "least privilege: {role}");
    let binding = get(&lab, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/tpvpn-manager").expect("binding");
    assert_eq!(binding["subjects"][0]["namespace"], "tpvpn-test");
    assert!(get(&lab, "/apis/rbac.authorization.k8s.io/v1/namespaces/tpvpn-test/roles/tpvpn-client").is_some());
    let svc = get(&lab, &format!("{ns}/services/tpvpn-manager")).expect("Service");
    assert_eq!(svc["spec"]["type"], "NodePort");
    assert!(svc["spec"]["ports"][0]["nodePort"].is_u64(), "a NodePort was allocated: {svc}");
    let tls = get(&lab, &format!("{ns}/secrets/tpvpn-manager-tls")).expect("TLS Secret");
    let client = get(&lab, &format!("{ns}/secrets/tpvpn-client")).expect("client Secret");
    assert_eq!(b64(&client, "ca.crt"), b64(&tls, "tls.crt"), "clients pin the manager's certificate");
    let token = b64(&client, "token");
    assert!(token.len() == 64 && token.iter().all(u8::is_ascii_hexdigit), "{token:?}");

    // Again: nothing changes, credentials are kept.
    let out = lab.tpvpn(&install);
    assert!(out.status.success() && stdout(&out).contains("existing credentials kept"), "{}", show(&out));
    assert_eq!(rv(&get(&lab, dep_path).unwrap()), rv(&dep), "re-applying changed the Deployment");
    let client2 = get(&lab, &format!("{ns}/secrets/tpvpn-client")).unwrap();
    assert_eq!((rv(&client2), b64(&client2, "token")), (rv(&client), token.clone()), "credentials rotated");

    let ds = get(&lab, "/apis/apps/v1/namespaces/tpvpn-test-agents/daemonsets/tpvpn-agent").expect("agent DaemonSet");
    assert_eq!(ds["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"], "tpvpn-manager.tpvpn-test.svc:4443");
    // The agents present their pods' ServiceAccount tokens: no shared secret anywhere.
    assert_eq!(ds["spec"]["template"]["spec"]["serviceAccountName"], "tpvpn-agent");
    assert!(get(&lab, "/api/v1/namespaces/tpvpn-test-agents/serviceaccounts/tpvpn-agent").is_some());
    assert!(get(&lab, &format!("{ns}/secrets/tpvpn-agent")).is_none(), "a shared agent token");
    let agents_copy = get(&lab, "/api/v1/namespaces/tpvpn-test-agents/secrets/tpvpn-agent").expect("agents' Secret");
    assert_eq!(b64(&agents_copy, "ca.crt"), b64(&tls, "tls.crt"), "agents pin the manager's certificate");
    assert!(agents_copy["data"].get("token").is_none(), "{agents_copy}");

    // Laptops by certificate only: the shared token and the manager's flag for it go.
    let mut strict = install.to_vec();
    strict.push("--no-shared-token");
    let out = lab.tpvpn(&strict);
    assert!(out.status.success(), "{}", show(&out));
    assert!(get(&lab, &format!("{ns}/secrets/tpvpn-client")).is_none(), "the shared token kept");
    let dep = get(&lab, dep_path).unwrap();
    assert!(!dep["spec"].to_string().contains("--token-file"), "{dep}");
    assert!(get(&lab, &format!("{ns}/secrets/tpvpn-manager-tls")).is_some(), "its own certificate kept");

    let uninstall = ["manager", "uninstall", "--kubeconfig", &kc, "--namespace", "tpvpn-test"];
    let out = lab.tpvpn(&uninstall);
    assert!(out.status.success() && stdout(&out).contains("uninstalled"), "{}", show(&out));
    assert!(get(&lab, ns).is_none(), "namespace left");
    assert!(get(&lab, "/apis/rbac.authorization.k8s.io/v1/clusterroles/tpvpn-manager").is_none(), "ClusterRole left");
    assert!(get(&lab, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/tpvpn-manager").is_none());
    assert!(get(&lab, "/api/v1/namespaces/tpvpn-test-agents").is_none(), "agents' namespace left");
    let out = lab.tpvpn(&uninstall);
    assert!(out.status.success() && stdout(&out).contains("not installed"), "{}", show(&out));
}

/// Audit B-2: a user bound to the `tpvpn-client` Role (as the install's own hint says)
/// port-forwards to the manager, but never to a node agent: agents run with the node's
/// network, so a port-forward to one reaches the node's loopback (kube-proxy, the
/// kubelet, etcd metrics).
#[test]
fn the_client_role_reaches_the_manager_but_no_node_agent() {
    let Some(lab) = lab() else { return };
    let admin = Some(lab.api_token());
    let request = |token: &Option<String>, method: &str, path: &str, body: Option<serde_json::Value>| {
        lab.kube_request(token.as_deref(), method, path, body.as_ref()).unwrap()
    };
    // An older release's agents, in the manager's namespace: the install removes them.
    let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tpvpn-test"}});
    assert_eq!(request(&admin, "POST", "/api/v1/namespaces", Some(ns)).0, 201);
    let old = serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "tpvpn-agent", "namespace": "tpvpn-test"}, "spec": {}});
    assert_eq!(request(&admin, "POST", "/apis/apps/v1/namespaces/tpvpn-test/daemonsets", Some(old)).0, 201);
    // And its shared agent token: the install removes it (nothing accepts it any more).
    let old = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "tpvpn-agent", "namespace": "tpvpn-test"}, "data": {"token": "c2hhcmVk"}});
    assert_eq!(request(&admin, "POST", "/api/v1/namespaces/tpvpn-test/secrets", Some(old)).0, 201);
    let kc = lab.kubeconfig().display().to_string();
    let out = lab.tpvpn(&["manager", "install", "--kubeconfig", &kc, "--namespace", "tpvpn-test"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(get(&lab, "/apis/apps/v1/namespaces/tpvpn-test/daemonsets/tpvpn-agent").is_none(), "old agents kept");
    assert!(get(&lab, "/api/v1/namespaces/tpvpn-test/secrets/tpvpn-agent").is_none(), "old agent token kept");
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "tpvpn-client-alice", "namespace": "tpvpn-test"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tpvpn-client"},
        "subjects": [{"kind": "User", "name": tpvpn_lab::LAB_USER}],
    });
    let path = "/apis/rbac.authorization.k8s.io/v1/namespaces/tpvpn-test/rolebindings";
    assert_eq!(request(&admin, "POST", path, Some(binding)).0, 201);

    // The controllers' part (stand-in): one pod of the manager's Deployment, and one of
    // the agents' DaemonSet wherever the install put it, both running.
    let (code, all) = request(&admin, "GET", "/apis/apps/v1/daemonsets", None);
    assert_eq!(code, 200, "{all}");
    let ds =
        all["items"].as_array().unwrap().iter().find(|d| d["metadata"]["name"] == "tpvpn-agent").expect("a DaemonSet");
    let agent_ns = ds["metadata"]["namespace"].as_str().unwrap().to_string();
    let pod = |ns: &str, name: &str, template: &serde_json::Value, ip: &str| {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": template["metadata"]["labels"]},
            "spec": template["spec"], "status": {"phase": "Running", "podIP": ip},
        });
        assert_eq!(request(&admin, "POST", &format!("/api/v1/namespaces/{ns}/pods"), Some(pod)).0, 201);
        format!("/api/v1/namespaces/{ns}/pods/{name}/portforward?ports=10249")
    };
    let dep = get(&lab, "/apis/apps/v1/namespaces/tpvpn-test/deployments/tpvpn-manager").unwrap();
    let manager = pod("tpvpn-test", "tpvpn-manager-0", &dep["spec"]["template"], "10.244.0.9");
    let agent = pod(&agent_ns, "tpvpn-agent-node1", &ds["spec"]["template"], "10.250.1.1");

    let alice = Some(lab.user_token());
    // Authorized (the stand-in then wants a WebSocket upgrade, which curl does not ask for).
    let (code, body) = request(&alice, "POST", &manager, None);
    assert!(code == 400 && body["message"].as_str().unwrap().contains("Upgrade request required"), "{code} {body}");
    let (code, body) = request(&alice, "POST", &agent, None);
    assert_eq!(code, 403, "a tpvpn user may port-forward to the agent in {agent_ns}: {body}");
    assert!(body["message"].as_str().unwrap().contains("cannot create resource \"pods/portforward\""), "{body}");
    // Nor read the agents' token.
    let (code, body) = request(&alice, "GET", &format!("/api/v1/namespaces/{agent_ns}/secrets/tpvpn-agent"), None);
    assert_eq!(code, 403, "{body}");
}

#[test]
fn list_shows_namespaces_and_services_and_follows_changes() {
    let Some(lab) = lab() else { return };
    let out = lab.tpvpn(&["list"]);
    assert!(!out.status.success() && stderr(&out).contains("not connected"), "{}", show(&out));
    let out = up_kube(&lab, &lab.kubeconfig(), &[]);
    assert!(out.status.success(), "{}", show(&out));
    let list = || -> serde_json::Value {
        let out = lab.tpvpn(&["list", "-o", "json"]);
        assert!(out.status.success(), "{}", show(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)))
    };
    let l = list();
    assert_eq!(l["namespaces"], serde_json::json!(["corp", "default", "dev", "kube-system", "rs", "tpvpn"]), "{l}");
    let frontend = l["services"].as_array().unwrap().iter().find(|s| s["name"] == "frontend").expect("frontend listed");
    assert_eq!(frontend["namespace"], "default");
    assert_eq!(frontend["cluster_ips"], serde_json::json!(["10.96.0.10"]));
    assert_eq!(frontend["ports"], serde_json::json!(["80/TCP (http)"]));
    // A namespace created while connected shows up without reconnecting.
    let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late-ns"}});
    lab.kube_apply("POST", "/api/v1/namespaces", Some(&ns)).expect("create namespace");
    let seen = tpvpn_lab::wait_until(Duration::from_secs(30), || {
        list()["namespaces"].as_array().unwrap().iter().any(|n| n == "late-ns")
    });
    assert!(seen, "late-ns not listed within 30 s");
    let text = lab.tpvpn(&["list"]);
    assert!(stdout(&text).contains("NAMESPACE") && stdout(&text).contains("redis-leader"), "{}", show(&text));
}

#[test]
fn manager_relists_after_its_watches_expire() {
    let Some(lab) = lab() else { return };
    let out = up_kube(&lab, &lab.kubeconfig(), &[]);
    assert!(out.status.success(), "{}", show(&out));
    let lists_before =
        lab.apiserver_log().lines().filter(|l| l.contains("/api/v1/services") && !l.contains("watch")).count();
    // Drop the history: the manager's open watches get 410 Gone at the next change and
    // must list again to see it.
    lab.kube_compact().expect("compact");
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "after-compaction", "namespace": "default"},
        "spec": {"clusterIP": "10.98.0.7", "ports": [{"port": 80}]}
    });
    lab.kube_apply("POST", "/api/v1/namespaces/default/services", Some(&svc)).expect("create Service");
    let routed = tpvpn_lab::wait_until(Duration::from_secs(30), || routed_via_tun(&lab, "10.98.0.7"));
    let log = lab.apiserver_log();
    assert!(routed, "Service created after the compaction never reached the client\nmanager:\n{}", lab.manager_log());
    let lists_after = log.lines().filter(|l| l.contains("/api/v1/services") && !l.contains("watch")).count();
    assert!(lists_after > lists_before, "the manager did not list Services again after 410 Gone:\n{log}");
}

#[test]
fn exec_plugin_credentials_work() {
    let Some(lab) = lab() else { return };
    // A kubeconfig whose user gets its token from an exec plugin, as cloud CLIs do.
    let plugin = lab.dir().join("token-plugin.sh");
    let cred = format!(
        "{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{}\"}}}}",
        lab.api_token()
    );
    std::fs::write(&plugin, format!("#!/bin/sh\necho '{cred}'\n")).unwrap();
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let kc = std::fs::read_to_string(lab.kubeconfig()).unwrap();
    let token_line = format!("    token: {}\n", lab.api_token());
    assert!(kc.contains(&token_line), "unexpected lab kubeconfig:\n{kc}");
    let exec = format!(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never\n",
        plugin.display()
    );
    let path = lab.dir().join("kubeconfig-exec");
    std::fs::write(&path, kc.replacen(&token_line, &exec, 1)).unwrap();
    let out = up_kube(&lab, &path, &["--context", "lab"]);
    assert!(out.status.success(), "tpvpn up with an exec plugin:\n{}\napiserver:\n{}", show(&out), lab.apiserver_log());
    let page = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://frontend.default/"]);
    assert!(stdout(&page).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&page));
}

#[test]
fn a_manager_reinstalled_with_a_new_token_is_found_again() {
    use base64::Engine;
    let Some(mut lab) = lab() else { return };
    // A manager that signs no certificates: laptops read the shared token.
    lab.restart_manager_with(&[], &["--auth", "token"]).unwrap();
    let out = up_kube(&lab, &lab.kubeconfig(), &[]);
    assert!(out.status.success(), "tpvpn up:\n{}", show(&out));
    // What `tpvpn manager install` after an uninstall amounts to: a new token in the
    // Secret, and a manager that accepts only the new one.
    let token = lab.dir().join("token-reinstalled");
    std::fs::write(&token, "a-token-from-the-reinstall\n").unwrap();
    let path = "/api/v1/namespaces/tpvpn/secrets/tpvpn-client";
    let mut secret = get(&lab, path).expect("the client Secret");
    secret["data"]["token"] = base64::engine::general_purpose::STANDARD.encode("a-token-from-the-reinstall\n").into();
    lab.kube_apply("PUT", path, Some(&secret)).expect("update the Secret");
    lab.start_manager_with_token(&token).expect("manager with the new token");

    let log = || std::fs::read_to_string(lab.runtime_dir().join("tpvpn.log")).unwrap_or_default();
    // The old token is refused; the next attempt reads the Secret again and gets in.
    let reconnected = || {
        let st = lab.tpvpn(&["status", "-o", "json"]);
        log().contains("the manager's credentials changed")
            && serde_json::from_slice::<serde_json::Value>(&st.stdout).is_ok_and(|v| v["connected"] == true)
    };
    assert!(
        // Generous: the backoff may have grown to 5 s while the manager restarted.
        tpvpn_lab::wait_until(Duration::from_secs(45), reconnected),
        "not reconnected with the new token; client log:\n{}\nmanager:\n{}",
        log(),
        lab.manager_log()
    );
    let page = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"]);
    assert!(stdout(&page).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&page));
}
