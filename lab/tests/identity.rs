//! Who may do what (issue 21), in the lab against the API stand-in: node agents are
//! authenticated by the API server (a `TokenReview` of their pod's projected
//! ServiceAccount token) and may serve only the node their pod runs on. Needs root.

use std::time::Duration;

use tpvpn_lab::pods::NODE_NAME;
use tpvpn_lab::{show, wait_until};

#[test]
fn an_agent_serves_only_the_node_its_credential_belongs_to() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    // The credential the lab node's agent presents; a compromised node's agent holds it
    // and claims to serve another node, to be sent that node's captures.
    let credential = lab.agent_token_file().unwrap();
    let out = lab.run_agent("other-node", &credential, Duration::from_secs(8)).unwrap();
    assert_eq!(out.status.code(), Some(1), "refused and ended, not connected:\n{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tpvpn-agent: the manager refused this agent: the agent token belongs to a pod on node lab-node, not to node other-node"), "{err}");
    assert!(
        wait_until(Duration::from_secs(5), || lab.manager_log().contains("agent token reviewed: refused")),
        "{}",
        lab.manager_log()
    );

    // A token of the agent's ServiceAccount for another audience (the API server's own,
    // as a default-mounted token is), and a random string: refused, each saying why.
    let dir = tempdir(&lab);
    let wrong = dir.join("wrong-audience");
    std::fs::write(&wrong, lab.agent_service_account_token(NODE_NAME, "https://kubernetes.default.svc").unwrap())
        .unwrap();
    let out = lab.run_agent(NODE_NAME, &wrong, Duration::from_secs(8)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is invalid for the target audiences"), "{}", show(&out));
    let forged = dir.join("forged");
    std::fs::write(&forged, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl\n").unwrap();
    let out = lab.run_agent(NODE_NAME, &forged, Duration::from_secs(8)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the agent token is not valid"), "{}", show(&out));

    // The credential is right for its own node (the agent connects and keeps running).
    let out = lab.run_agent(NODE_NAME, &credential, Duration::from_secs(3)).unwrap();
    assert_ne!(out.status.code(), Some(1), "{}", show(&out));
    assert!(lab.manager_log().contains("agent token reviewed: accepted"), "{}", lab.manager_log());
}

/// A directory of the lab's own for this test's files.
fn tempdir(lab: &tpvpn_lab::Lab) -> std::path::PathBuf {
    let d = lab.dir().join("identity");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A laptop is who the API server says it is: `up` with a user's kubeconfig gets a
/// client certificate from the manager's signer through a CertificateSigningRequest, only
/// if RBAC lets the user connect, and the manager knows the laptop by that user.
#[test]
fn a_laptop_connects_as_the_user_its_kubeconfig_authenticates() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    let kc = lab.kubeconfig().display().to_string();
    let up =
        || lab.tpvpn_env(&["up", "--context", tpvpn_lab::LAB_USER], &[("KUBECONFIG", &kc)], Duration::from_secs(60));
    let apply = |path: &str, body: serde_json::Value| lab.kube_apply("POST", path, Some(&body)).unwrap();
    let rbac = "/apis/rbac.authorization.k8s.io/v1";
    let group = [serde_json::json!({"kind": "Group", "name": tpvpn_lab::LAB_USER_GROUP})];
    // What every user needs to find the manager: its public ConfigMap and its Service.
    apply(
        &format!("{rbac}/namespaces/tpvpn/roles"),
        serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "tpvpn-user", "namespace": "tpvpn"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["tpvpn-trust"], "verbs": ["get"]},
                  {"apiGroups": [""], "resources": ["services"], "resourceNames": ["tpvpn-manager"], "verbs": ["get"]}]}),
    );
    apply(
        &format!("{rbac}/namespaces/tpvpn/rolebindings"),
        serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "tpvpn-user", "namespace": "tpvpn"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tpvpn-user"}, "subjects": group}),
    );
    let cluster_role = |name: &str, connect: bool| {
        let mut rules = vec![serde_json::json!({"apiGroups": ["certificates.k8s.io"],
            "resources": ["certificatesigningrequests"], "verbs": ["create", "get"]})];
        if connect {
            rules.push(
                serde_json::json!({"apiGroups": ["tpvpn.dev"], "resources": ["connections"], "verbs": ["create"]}),
            );
        }
        apply(
            &format!("{rbac}/clusterroles"),
            serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole", "metadata": {"name": name}, "rules": rules}),
        );
        apply(
            &format!("{rbac}/clusterrolebindings"),
            serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}, "subjects": group}),
        );
    };

    // Nothing granted but finding the manager: no certificate request may be made.
    let out = up();
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("may not create CertificateSigningRequests") && err.contains("tpvpn-user"), "{}", show(&out));
    // A request, but no right to connect: the manager denies it, saying which permission.
    cluster_role("requests-only", false);
    let out = up();
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("the manager refused alice a certificate: user \"alice\" may not create connections.tpvpn.dev"),
        "{}\nmanager:\n{}",
        show(&out),
        lab.manager_log()
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let link = lab.exec(lab.laptop(), &["ip", "link", "show", "tpvpn0"]);
    assert!(!link.status.success(), "nothing is left behind: {}", show(&link));

    // Allowed to connect: connected as alice, with the certificate's identity.
    cluster_role("tpvpn-user", true);
    let out = up();
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
    let st = lab.tpvpn(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&st)));
    assert_eq!(v["identity"]["user"], "alice", "{v}");
    assert!(v["identity"]["groups"].to_string().contains(tpvpn_lab::LAB_USER_GROUP), "{v}");
    assert!(v["identity"]["expires"].as_str().is_some_and(|t| t.starts_with("20")), "{v}");
    let log = lab.manager_log();
    assert!(log.contains("client certificate accepted") && log.contains("user=alice"), "{log}");
    let page = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"]);
    assert!(String::from_utf8_lossy(&page.stdout).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&page));
}
