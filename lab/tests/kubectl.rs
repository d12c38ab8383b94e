//! The API stand-in checked against a real client: `kubectl` (over HTTPS, as client-go
//! sends credentials only over TLS; protobuf bodies for the kinds its commands create;
//! `auth can-i` as SelfSubjectAccessReviews), running the README's own commands to let a
//! team connect and intercept. Needs root.

use std::time::Duration;

use serde_json::{json, Value};
use tpvpn_lab::{show, Lab, LAB_USER};

/// `kubectl ARGS` as `user` (None: the admin), which must succeed; its stdout.
fn kubectl(lab: &Lab, user: Option<&str>, args: &[&str]) -> String {
    let out = lab.kubectl(user, args);
    assert!(out.status.success(), "kubectl {args:?}:\n{}\napiserver:\n{}", show(&out), lab.apiserver_log());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl auth can-i ARGS` for the lab user: "yes" or "no". (It cannot ask about
/// tpvpn's own `tpvpn.dev` resources: they are in no API server's discovery, so kubectl
/// asks about a resource named `intercepts.tpvpn.dev` of the core group, and says no.)
fn alice_can_i(lab: &Lab, args: &[&str]) -> String {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    let out = lab.kubectl(Some(LAB_USER), &all);
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // kubectl's own rule: exit 0 for yes, 1 for no.
    assert_eq!(out.status.success(), said == "yes", "{}", show(&out));
    said
}

/// Applies (server-side) the shipped manifest's RBAC roles for users, as `kubectl apply
/// -f` of it gives a cluster, read from the YAML by kubectl itself.
fn apply_shipped_roles(lab: &Lab) {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/manifests/manager.yaml");
    // One JSON object per manifest document.
    let printed = kubectl(lab, None, &["create", "--dry-run=client", "--validate=false", "-o", "json", "-f", manifest]);
    let wanted = ["tpvpn-user", "tpvpn-intercept", "tpvpn-intercept-admin"];
    let roles: Vec<Value> = serde_json::Deserializer::from_str(&printed)
        .into_iter::<Value>()
        .map(|o| o.expect("kubectl prints JSON"))
        .filter(|o| ["ClusterRole", "Role"].contains(&o["kind"].as_str().unwrap_or_default()))
        .filter(|o| wanted.contains(&o["metadata"]["name"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(roles.len(), 4, "tpvpn-user (ClusterRole and Role), tpvpn-intercept, tpvpn-intercept-admin: {roles:?}");
    let path = lab.dir().join("shipped-roles.json");
    std::fs::write(&path, json!({"apiVersion": "v1", "kind": "List", "items": roles}).to_string()).unwrap();
    kubectl(lab, None, &["apply", "--server-side", "--validate=false", "-f", &path.display().to_string()]);
}

/// The README's RoleBinding of `tpvpn-intercept` in namespace `default` for the group
/// `developers` (the lab user's).
fn bind_intercept(lab: &Lab) {
    let binding = "create rolebinding tpvpn-intercept -n default --clusterrole tpvpn-intercept --group developers";
    kubectl(lab, None, &binding.split(' ').collect::<Vec<_>>());
}

#[test]
fn kubectl_runs_the_readmes_commands_against_the_stand_in_and_a_developer_intercepts() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    // Reading: discovery, a list across namespaces, a label selector.
    let services = kubectl(
        &lab,
        None,
        &[
            "get",
            "services",
            "-A",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}={.spec.clusterIP}{"\n"}{end}"#,
        ],
    );
    assert!(services.lines().any(|l| l == format!("default/frontend={}", tpvpn_lab::FRONTEND_IP)), "{services}");
    kubectl(&lab, None, &["label", "namespace", "dev", "team=blue"]);
    assert_eq!(kubectl(&lab, None, &["get", "namespaces", "-l", "team=blue", "-o", "name"]).trim(), "namespace/dev");

    // The shipped roles, applied server-side; nothing is granted to anyone yet.
    apply_shipped_roles(&lab);
    let listed = kubectl(&lab, None, &["get", "clusterroles", "-l", "app.kubernetes.io/part-of=tpvpn", "-o", "name"]);
    assert!(listed.contains("clusterrole.rbac.authorization.k8s.io/tpvpn-intercept\n"), "{listed}");
    let may_request = ["create", "certificatesigningrequests.certificates.k8s.io"];
    let may_find = ["get", "configmaps/tpvpn-trust", "-n", "tpvpn"];
    assert_eq!(alice_can_i(&lab, &may_request), "no");
    assert_eq!(alice_can_i(&lab, &may_find), "no");

    // The README's commands for a team (group `developers`, the lab user's).
    kubectl(
        &lab,
        None,
        &["create", "clusterrolebinding", "tpvpn-users", "--clusterrole", "tpvpn-user", "--group", "developers"],
    );
    kubectl(
        &lab,
        None,
        &["create", "rolebinding", "tpvpn-users", "-n", "tpvpn", "--role", "tpvpn-user", "--group", "developers"],
    );
    bind_intercept(&lab);
    assert_eq!(alice_can_i(&lab, &may_request), "yes");
    assert_eq!(alice_can_i(&lab, &may_find), "yes");
    assert_eq!(alice_can_i(&lab, &["get", "configmaps/other", "-n", "tpvpn"]), "no", "resourceNames kept");

    // What those bindings are for: she connects with her certificate (her request
    // visible to kubectl as hers, approved by the manager's signer) and intercepts.
    if !lab.start_pods_or_skip() {
        return;
    }
    let kc = lab.kubeconfig().display().to_string();
    let out = lab.tpvpn_env(&["up", "--context", LAB_USER], &[("KUBECONFIG", &kc)], Duration::from_secs(60));
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());
    let requests = kubectl(
        &lab,
        None,
        &[
            "get",
            "csr",
            "-o",
            r#"jsonpath={range .items[*]}{.spec.username} {.spec.signerName} {.status.conditions[0].type}{"\n"}{end}"#,
        ],
    );
    assert!(requests.lines().any(|l| l == format!("{LAB_USER} tpvpn.dev/client Approved")), "{requests}");
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let out = lab.tpvpn_env(&["intercept", "web", "--port", "18888:http"], &[], Duration::from_secs(40));
    assert!(out.status.success(), "{}\nmanager:\n{}", show(&out), lab.manager_log());

    // Unbound again: no longer hers to take.
    kubectl(&lab, None, &["delete", "rolebinding", "tpvpn-intercept", "-n", "default"]);
    let out = lab.tpvpn_env(&["leave", "web"], &[], Duration::from_secs(20));
    assert!(out.status.success(), "{}", show(&out));
    let out = lab.tpvpn_env(&["intercept", "web", "--port", "18888:http"], &[], Duration::from_secs(40));
    assert!(!out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("create intercepts.tpvpn.dev"), "{}", show(&out));
}

/// `kubectl create -f` of a CertificateSigningRequest (stamped with the admin's identity,
/// whatever it claims), `kubectl certificate approve` of it, and a SubjectAccessReview
/// created with `kubectl create -f`, answered by RBAC for the user it names.
#[test]
fn kubectl_makes_and_approves_a_certificate_request_and_asks_a_subject_access_review() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    let request = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem.pem().unwrap());
    // A signer of someone else's: the manager leaves it alone.
    let csr = json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": "by-kubectl"},
        "spec": {"request": request, "signerName": "example.com/lab", "usages": ["client auth"],
            "expirationSeconds": 3600, "username": "mallory", "groups": ["system:masters"]}});
    let file = lab.dir().join("csr.json");
    std::fs::write(&file, csr.to_string()).unwrap();
    kubectl(&lab, None, &["create", "--validate=false", "-f", &file.display().to_string()]);
    let who = |path: &str| kubectl(&lab, None, &["get", "csr", "by-kubectl", "-o", &format!("jsonpath={path}")]);
    assert_eq!(who("{.spec.username}"), "lab-admin", "stamped by the API server, not as claimed");
    assert_eq!(who("{.spec.groups}"), r#"["system:masters","system:authenticated"]"#);
    assert_eq!(who("{.status}"), "", "no decision yet");
    let said = kubectl(&lab, None, &["certificate", "approve", "by-kubectl"]);
    assert!(said.contains("approved"), "{said}");
    assert_eq!(who("{.status.conditions[0].type} {.status.conditions[0].status}"), "Approved True");
    // An approved request is never denied afterwards.
    let out = lab.kubectl(None, &["certificate", "deny", "by-kubectl"]);
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("unchanged"), "{}", show(&out));
    assert_eq!(who("{.status.conditions[*].type}"), "Approved");

    // A SubjectAccessReview for the lab user, before and after a RoleBinding of the shipped
    // intercept role.
    let sar = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": LAB_USER, "groups": [tpvpn_lab::LAB_USER_GROUP], "resourceAttributes": {
            "group": "tpvpn.dev", "resource": "intercepts", "verb": "create", "namespace": "default", "name": "web"}}});
    let file = lab.dir().join("sar.json");
    std::fs::write(&file, sar.to_string()).unwrap();
    let file = file.display().to_string();
    let allowed = || {
        let answer: Value =
            serde_json::from_str(&kubectl(&lab, None, &["create", "--validate=false", "-f", &file, "-o", "json"]))
                .expect("JSON");
        answer["status"]["allowed"].as_bool().unwrap_or(false)
    };
    assert!(!allowed());
    apply_shipped_roles(&lab);
    bind_intercept(&lab);
    assert!(allowed());
}
