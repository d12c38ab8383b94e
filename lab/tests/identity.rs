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

/// Grants `rules` to the lab user's group: a ClusterRole and ClusterRoleBinding `name`,
/// or with `namespace` a Role and RoleBinding there.
fn grant(lab: &tpvpn_lab::Lab, name: &str, namespace: Option<&str>, rules: serde_json::Value) {
    let group = serde_json::json!({"kind": "Group", "name": tpvpn_lab::LAB_USER_GROUP});
    grant_to(lab, group, name, namespace, rules);
}

/// [`grant`] to `subject` (an RBAC subject).
fn grant_to(
    lab: &tpvpn_lab::Lab,
    subject: serde_json::Value,
    name: &str,
    namespace: Option<&str>,
    rules: serde_json::Value,
) {
    let rbac = "/apis/rbac.authorization.k8s.io/v1";
    let (role, binding, at) = match namespace {
        Some(ns) => ("Role", "RoleBinding", format!("{rbac}/namespaces/{ns}")),
        None => ("ClusterRole", "ClusterRoleBinding", rbac.to_string()),
    };
    let meta = serde_json::json!({"name": name, "namespace": namespace});
    let plural = |kind: &str| format!("{at}/{}s", kind.to_lowercase());
    let role_obj = serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": role, "metadata": meta,
        "rules": rules});
    lab.kube_apply("POST", &plural(role), Some(&role_obj)).unwrap();
    let binding_obj = serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": binding,
        "metadata": meta, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role, "name": name},
        "subjects": [subject]});
    lab.kube_apply("POST", &plural(binding), Some(&binding_obj)).unwrap();
}

/// What every user needs to find the manager: its public ConfigMap and its Service.
fn grant_finding_the_manager(lab: &tpvpn_lab::Lab) {
    let rules = serde_json::json!([
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["tpvpn-trust"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["services"], "resourceNames": ["tpvpn-manager"], "verbs": ["get"]}]);
    grant(lab, "tpvpn-user", Some("tpvpn"), rules);
}

const REQUESTS: &str = r#"{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get"]}"#;
const CONNECT: &str = r#"{"apiGroups": ["tpvpn.dev"], "resources": ["connections"], "verbs": ["create"]}"#;

fn rules(rules: &[&str]) -> serde_json::Value {
    serde_json::Value::Array(rules.iter().map(|r| serde_json::from_str(r).unwrap()).collect())
}

/// The lab user connected, allowed to intercept any Service.
fn up_as_user_who_may_intercept(lab: &tpvpn_lab::Lab) {
    grant_finding_the_manager(lab);
    let may_intercept = r#"{"apiGroups": ["tpvpn.dev"], "resources": ["intercepts"], "verbs": ["create"]}"#;
    grant(lab, "tpvpn-user", None, rules(&[REQUESTS, CONNECT, may_intercept]));
    let out = up_as_user(lab);
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
}

/// `tpvpn up` with the lab user's own context.
fn up_as_user(lab: &tpvpn_lab::Lab) -> std::process::Output {
    let kc = lab.kubeconfig().display().to_string();
    lab.tpvpn_env(&["up", "--context", tpvpn_lab::LAB_USER], &[("KUBECONFIG", &kc)], Duration::from_secs(60))
}

/// A laptop is who the API server says it is: `up` with a user's kubeconfig gets a
/// client certificate from the manager's signer through a CertificateSigningRequest, only
/// if RBAC lets the user connect, and the manager knows the laptop by that user.
#[test]
fn a_laptop_connects_as_the_user_its_kubeconfig_authenticates() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    grant_finding_the_manager(&lab);

    // Nothing granted but finding the manager: no certificate request may be made.
    let out = up_as_user(&lab);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("may not create CertificateSigningRequests") && err.contains("tpvpn-user"), "{}", show(&out));
    // A request, but no right to connect: the manager denies it, saying which permission.
    grant(&lab, "requests-only", None, rules(&[REQUESTS]));
    let out = up_as_user(&lab);
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
    grant(&lab, "tpvpn-user", None, rules(&[REQUESTS, CONNECT]));
    let out = up_as_user(&lab);
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

/// No signer answers (the manager is not running, or lacks its RBAC): `up` gives up after
/// 30 s with one line saying so, and leaves nothing behind.
#[test]
fn up_says_so_in_one_line_when_no_signer_answers() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    grant_finding_the_manager(&lab);
    grant(&lab, "tpvpn-user", None, rules(&[REQUESTS, CONNECT]));
    // The manager published tpvpn-trust when it started (the laptop asks for a
    // certificate), then stopped.
    lab.stop_manager();
    let started = std::time::Instant::now();
    let out = up_as_user(&lab);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(started.elapsed() >= Duration::from_secs(30), "gave up after {:?}", started.elapsed());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("within 30s: the manager is not running, or lacks the RBAC to sign for tpvpn.dev/client"),
        "{}",
        show(&out)
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let link = lab.exec(lab.laptop(), &["ip", "link", "show", "tpvpn0"]);
    assert!(!link.status.success(), "nothing is left behind: {}", show(&link));
}

/// A manager without the shared token (`--auth kubernetes`, no `--token-file`) takes
/// laptops by certificate only; and what a laptop may intercept, and whether it gets the
/// container's environment, are RBAC's `intercepts` and `intercepts/environment` of
/// API group `tpvpn.dev`, per Service.
#[test]
fn each_intercept_and_each_environment_is_authorized_per_service() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.restart_manager_identity_only().unwrap();
    if !lab.start_pods_or_skip() {
        return;
    }
    let out = lab.tpvpn(&lab.up_args().iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("accepts laptops by their Kubernetes identity only: connect with a kubeconfig"), "{err}");

    grant_finding_the_manager(&lab);
    grant(&lab, "tpvpn-user", None, rules(&[REQUESTS, CONNECT]));
    let out = up_as_user(&lab);
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let env_file = lab.dir().join("web.env").display().to_string();
    let intercept = |extra: &[&str]| {
        let mut args = vec!["intercept", "web", "--port", "18888:http"];
        args.extend_from_slice(extra);
        lab.tpvpn_env(&args, &[], Duration::from_secs(40))
    };

    // Connecting is not intercepting.
    let out = intercept(&[]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("user \"alice\" may not create intercepts.tpvpn.dev \"web\" in namespace \"default\""),
        "{err}"
    );
    assert!(lab.manager_log().contains("access review"), "every decision is logged");

    // Intercepting (this Service only), but not its environment: the intercept stands,
    // the env-file is refused, and `list` shows who holds it.
    let may_intercept =
        r#"{"apiGroups": ["tpvpn.dev"], "resources": ["intercepts"], "verbs": ["create"], "resourceNames": ["web"]}"#;
    grant(&lab, "intercept-web", Some("default"), rules(&[may_intercept]));
    let out = intercept(&["--env-file", &env_file]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("no environment for --env-file/--env-json (the intercept stands)"), "{err}");
    assert!(err.contains("may not get intercepts/environment.tpvpn.dev \"web\""), "{err}");
    assert!(!std::path::Path::new(&env_file).exists(), "no env-file written");
    let list = lab.tpvpn(&["list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_else(|_| panic!("{}", show(&list)));
    let web = v["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").cloned().unwrap();
    assert!(web["intercept"].as_str().unwrap_or_default().contains("by alice@"), "the authenticated user: {web}");
    assert!(lab.tpvpn(&["leave", "web"]).status.success());

    // With the environment granted, the env-file is written.
    let may_read_env = r#"{"apiGroups": ["tpvpn.dev"], "resources": ["intercepts/environment"], "verbs": ["get"]}"#;
    grant(&lab, "intercept-web-env", Some("default"), rules(&[may_read_env]));
    let out = intercept(&["--env-file", &env_file]);
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(env.contains(&format!("GREETING={}", tpvpn_lab::pods::GREETING)), "{env}");

    // The pod's files (`--mount`) are a right of their own: refused, the intercept
    // standing and nothing mounted; granted, the Secret volume is served too.
    let dir = lab.dir().join("web-files").display().to_string();
    let out = intercept(&["--mount", &dir]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("may not get intercepts/files.tpvpn.dev \"web\""), "{err}");
    assert!(!lab.daemon_mounted(&dir), "nothing mounted");
    if !tpvpn_lab::Lab::fuse_or_skip() {
        return;
    }
    let may_read_files = r#"{"apiGroups": ["tpvpn.dev"], "resources": ["intercepts/files"], "verbs": ["get"]}"#;
    grant(&lab, "intercept-web-files", Some("default"), rules(&[may_read_files]));
    let out = intercept(&["--mount", &dir]);
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("left out"), "{}", show(&out));
    let secret = std::fs::read_to_string(lab.daemon_view(&dir).join("etc/db/password"));
    assert_eq!(secret.unwrap(), tpvpn_lab::pods::SECRET_VALUE, "the Secret volume, for an identity allowed it");
    // Writing into the pod's volumes (`--mount-readwrite`) is a right of its own again.
    let out = intercept(&["--mount", &dir, "--mount-readwrite"]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("may not update intercepts/files.tpvpn.dev \"web\""), "{err}");
    let may_write_files = r#"{"apiGroups": ["tpvpn.dev"], "resources": ["intercepts/files"], "verbs": ["update"]}"#;
    grant(&lab, "intercept-web-write", Some("default"), rules(&[may_write_files]));
    let out = intercept(&["--mount", &dir, "--mount-readwrite"]);
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("/var/scratch (read-write)") && !said.contains("/etc/db (read-write)"), "{said}");
    assert!(lab.daemon_mounted(&dir) && lab.runtime_dir().join("mounts.json").exists());
    assert!(lab.tpvpn(&["down"]).status.success());
    assert!(!lab.runtime_dir().join("mounts.json").exists(), "down unmounts and forgets the record");
}

/// Ending someone else's intercept (`tpvpn revoke`) needs `delete` on
/// `intercepts.tpvpn.dev` of that Service; the holder's captures end.
#[test]
fn only_an_identity_allowed_to_delete_intercepts_revokes_anothers() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    if !lab.start_pods_or_skip() {
        return;
    }
    up_as_user_who_may_intercept(&lab);
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let out = lab.tpvpn_env(&["intercept", "web", "--port", "18888:http"], &[], Duration::from_secs(40));
    assert!(out.status.success(), "{}", show(&out));

    // Another user, on another laptop, who may connect (the lab's "no-secrets" context).
    let other = serde_json::json!({"kind": "User", "name": tpvpn_lab::apiserver::NO_SECRETS_USER});
    grant_to(&lab, other.clone(), "other-user", None, rules(&[REQUESTS, CONNECT]));
    lab.add_second_laptop().unwrap();
    let kc = lab.kubeconfig().display().to_string();
    let out = lab.tpvpn2(&["up", "--kubeconfig", &kc, "--context", "lab-no-secrets", "--dns-mode", "off"]);
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
    let out = lab.tpvpn2(&["revoke", "web", "-n", "default"]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("may not delete intercepts.tpvpn.dev \"web\" in namespace \"default\""), "{err}");
    let holder = |lab: &tpvpn_lab::Lab| {
        let list = lab.tpvpn(&["list", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_else(|_| panic!("{}", show(&list)));
        let web = v["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").cloned().unwrap();
        web["intercept"].as_str().unwrap_or_default().to_string()
    };
    assert!(holder(&lab).contains("by alice@"), "still alice's: {}", holder(&lab));

    let may_end = r#"{"apiGroups": ["tpvpn.dev"], "resources": ["intercepts"], "verbs": ["delete"]}"#;
    grant_to(&lab, other, "intercept-admin", Some("default"), rules(&[may_end]));
    let out = lab.tpvpn2(&["revoke", "web", "-n", "default"]);
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("revoked default/web: port 80 held by alice@"), "{said}");
    assert!(!holder(&lab).contains("alice"), "ended: {}", holder(&lab));
    assert!(wait_until(Duration::from_secs(5), || lab.capture_tables("web-0").is_empty()), "the pods' capture is gone");
    // Alice's daemon is told: it no longer shows the intercept, and does not take it back
    // when it reconnects.
    let held = |lab: &tpvpn_lab::Lab| {
        let st = lab.tpvpn(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_else(|_| panic!("{}", show(&st)));
        v["intercepts"].as_array().map_or(0, Vec::len)
    };
    assert!(wait_until(Duration::from_secs(5), || held(&lab) == 0), "alice's daemon still holds it: {}", held(&lab));
    let log = std::fs::read_to_string(lab.runtime_dir().join("tpvpn.log")).unwrap_or_default();
    assert!(log.contains("the intercept was revoked"), "{log}");
}

/// Short-lived certificates (15 s here) are renewed on the live session: a TCP connection
/// open across two renewals and an intercept keep working; when renewal becomes
/// impossible (the user lost the right to ask), the session ends as its certificate
/// expires.
#[test]
fn certificates_are_renewed_under_traffic_and_a_session_ends_when_its_certificate_does() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.restart_manager_with(&[], &["--max-certificate-lifetime", "15"]).unwrap();
    if !lab.start_pods_or_skip() {
        return;
    }
    up_as_user_who_may_intercept(&lab);
    let expires = |lab: &tpvpn_lab::Lab| {
        let st = lab.tpvpn(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        v["identity"]["expires"].as_str().unwrap_or_default().to_string()
    };
    let first = expires(&lab);
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let out = lab.tpvpn_env(&["intercept", "web", "--port", "18888:http"], &[], Duration::from_secs(40));
    assert!(out.status.success(), "{}", show(&out));

    // One TCP connection to redis, a PING a second for 30 s: two renewals happen on it.
    let script = format!(
        "exec 3<>/dev/tcp/{}/6379; for i in $(seq 30); do printf 'PING\\r\\n' >&3; read -r -t 5 line <&3 || exit 1; echo \"$line\"; sleep 1; done",
        tpvpn_lab::REDIS_IP
    );
    let out = lab.exec_timeout(lab.laptop(), &["bash", "-c", &script], Duration::from_secs(90));
    let pongs = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.trim() == "+PONG").count();
    assert_eq!(
        pongs,
        30,
        "the connection lived through the renewals:\n{}\nmanager:\n{}",
        show(&out),
        lab.manager_log()
    );
    let log = lab.manager_log();
    assert!(log.matches("the laptop's certificate renewed").count() >= 2, "{log}");
    assert!(!log.contains("certificate expired"), "{log}");
    assert_ne!(expires(&lab), first, "status shows the renewed certificate");
    let curl = lab.exec_timeout(
        lab.caller(),
        &["curl", "-sS", "--max-time", "5", &format!("http://{}/", tpvpn_lab::pods::WEB_IP)],
        Duration::from_secs(10),
    );
    assert!(
        String::from_utf8_lossy(&curl.stdout).contains("answered by the laptop"),
        "the intercept held: {}",
        show(&curl)
    );

    // No more right to ask for certificates: the session ends when the current one expires.
    lab.kube_apply("DELETE", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/tpvpn-user", None).unwrap();
    let ended =
        wait_until(Duration::from_secs(40), || lab.manager_log().contains("certificate expired: session ended"));
    assert!(ended, "{}", lab.manager_log());
    // The daemon notices the closed connection a moment after the manager's log line,
    // then tries to reconnect, which needs a certificate it can no longer get.
    let connected = || {
        let st = lab.tpvpn(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        v["connected"] == true
    };
    assert!(wait_until(Duration::from_secs(10), || !connected()), "the daemon still says connected");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!connected(), "not connected again without a certificate");
}
