//! Tests of the Kubernetes API server stand-in as the lab runs it: real HTTP
//! with curl from inside the cluster namespace. They need root and skip loudly otherwise.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tpvpn_lab::{show, Lab};

fn lab() -> Option<Lab> {
    tpvpn_lab::lab_or_skip()
}

/// A request with the admin token; panics if curl itself fails.
fn get(lab: &Lab, path: &str) -> (u16, Value) {
    lab.kube_request(Some(&lab.api_token()), "GET", path, None).unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no rv in {v}"))
}

/// A `curl -N` watch running in the cluster ns, its output going to a file;
/// killed (by pid) on drop, and bounded by curl's own `--max-time`.
struct Watch {
    child: Child,
    out: PathBuf,
    headers: PathBuf,
}

impl Watch {
    fn start(lab: &Lab, path: &str, max_time: u64) -> Watch {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = lab.dir().join(format!("watch-{n}.out"));
        let headers = lab.dir().join(format!("watch-{n}.headers"));
        let child = Command::new("ip")
            .args(["netns", "exec", lab.cluster(), "curl", "-sS", "-N", "--max-time", &max_time.to_string()])
            .arg("-D")
            .arg(&headers)
            .args(["-H", &format!("Authorization: Bearer {}", lab.api_token())])
            .arg(format!("{}{path}", lab.apiserver_url()))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn curl");
        Watch { child, out, headers }
    }

    /// The complete event lines received so far.
    fn events(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}")))
            .collect()
    }

    /// Polls (≤ 10 s) until `pred` holds for the events; panics with them otherwise.
    #[track_caller]
    fn wait_until(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ev = self.events();
            if pred(&ev) {
                return ev;
            }
            if Instant::now() >= deadline {
                panic!("watch: no {what} after 10 s; events:\n{}", render(&ev));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (≤ 15 s) for curl to exit, returning whether it exited successfully.
    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("watch curl still running after 15 s");
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn render(ev: &[Value]) -> String {
    ev.iter().map(|e| format!("{e}\n")).collect()
}

/// `(type, name)` of each event.
fn summary(ev: &[Value]) -> Vec<(String, String)> {
    ev.iter()
        .map(|e| {
            let name = e["object"]["metadata"]["name"].as_str().unwrap_or("").to_string();
            (e["type"].as_str().unwrap_or("?").to_string(), name)
        })
        .collect()
}

fn has(ev: &[Value], ty: &str, name: &str) -> bool {
    summary(ev).iter().any(|(t, n)| t == ty && n == name)
}

#[test]
fn lists_gets_and_errors() {
    let Some(lab) = lab() else { return };
    let (code, v) = get(&lab, "/version");
    assert_eq!((code, v["gitVersion"].as_str()), (200, Some("v1.33.0-tpvpn-standin")), "{v}");
    let (code, v) = get(&lab, "/api");
    assert_eq!((code, &v["kind"], &v["versions"]), (200, &json!("APIVersions"), &json!(["v1"])));
    let (_, v) = get(&lab, "/api/v1");
    let mut res: Vec<&str> = v["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    res.sort();
    assert_eq!(
        res,
        ["configmaps", "namespaces", "nodes", "pods", "resourcequotas", "secrets", "serviceaccounts", "services"]
    );
    let (code, v) = get(&lab, "/apis");
    assert_eq!((code, &v["kind"]), (200, &json!("APIGroupList")), "{v}");
    let (_, v) = get(&lab, "/apis/apps/v1");
    assert_eq!((&v["groupVersion"], &v["resources"][0]["name"]), (&json!("apps/v1"), &json!("deployments")), "{v}");

    let (code, ns) = get(&lab, "/api/v1/namespaces");
    assert_eq!(code, 200);
    assert_eq!((&ns["kind"], &ns["apiVersion"]), (&json!("NamespaceList"), &json!("v1")));
    assert_eq!(names(&ns), ["corp", "default", "dev", "kube-system", "rs", "tpvpn"]);
    let rv = rv_of(&ns);
    assert!(ns["items"].as_array().unwrap().iter().all(|o| rv_of(o) <= rv && o["metadata"]["uid"].is_string()));

    let (_, svcs) = get(&lab, "/api/v1/services");
    assert_eq!(svcs["kind"], "ServiceList");
    assert_eq!(rv_of(&svcs), rv, "nothing changed, same resourceVersion");
    assert_eq!(
        names(&svcs),
        ["frontend", "frontend6", "redis-leader", "test-servers", "udp-echo", "kube-dns", "svc", "tpvpn-manager"]
    );
    let (_, def) = get(&lab, "/api/v1/namespaces/default/services");
    assert_eq!(names(&def), ["frontend", "frontend6", "redis-leader", "test-servers", "udp-echo"]);
    let (_, one) = get(&lab, "/api/v1/services?fieldSelector=metadata.name%3Dkube-dns");
    assert_eq!(
        one["items"][0]["spec"]["ports"],
        json!([
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}
        ])
    );
    let (_, mgr) = get(&lab, "/api/v1/namespaces/tpvpn/services/tpvpn-manager");
    assert_eq!((&mgr["spec"]["type"], &mgr["spec"]["clusterIP"]), (&json!("NodePort"), &json!("10.96.0.70")));
    assert_eq!(
        mgr["spec"]["ports"][0],
        json!({"name": "quic", "port": 4443, "protocol": "UDP", "targetPort": 4443, "nodePort": 4443})
    );
    let (_, pods) = get(&lab, "/api/v1/pods?labelSelector=app%3Dfrontend");
    assert_eq!(pods["items"][0]["status"]["podIPs"], json!([{"ip": tpvpn_lab::FRONTEND_POD_IP}]));
    let (_, node) = get(&lab, "/api/v1/nodes/lab-node");
    assert_eq!(node["spec"]["podCIDRs"], json!(["10.244.0.0/16"]));
    assert_eq!(node["status"]["addresses"][0], json!({"type": "InternalIP", "address": "10.250.1.1"}));

    let (code, sec) = get(&lab, "/api/v1/namespaces/tpvpn/secrets/tpvpn-client");
    assert_eq!(code, 200);
    let dec = |k: &str| base64::engine::general_purpose::STANDARD.decode(sec["data"][k].as_str().unwrap()).unwrap();
    assert_eq!(dec("ca.crt"), fs::read(lab.manager_ca()).unwrap());
    assert_eq!(dec("token"), fs::read(lab.token_file()).unwrap());

    let (code, st) = get(&lab, "/api/v1/namespaces/default/services/x");
    assert_eq!(code, 404);
    assert_eq!(
        st,
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"services \"x\" not found",
               "reason":"NotFound","details":{"name":"x","kind":"services"},"code":404})
    );
    let (code, st) = get(&lab, "/apis/batch/v1/jobs");
    assert_eq!((code, &st["reason"]), (404, &json!("NotFound")));
    assert_eq!(st["message"], "the server could not find the requested resource");
    let (code, st) = get(&lab, "/apis/apps/v1/deployments");
    assert_eq!((code, &st["kind"]), (200, &json!("DeploymentList")));
    let (code, st) = get(&lab, "/api/v1/services?labelSelector=a+in+(b)");
    assert_eq!((code, &st["reason"]), (400, &json!("BadRequest")));
    let (code, st) = lab
        .kube_request(Some(&lab.api_token()), "POST", "/api/v1/namespaces/default/services", Some(&json!("x")))
        .unwrap();
    assert_eq!((code, &st["reason"]), (400, &json!("BadRequest")), "{st}");
    let (code, st) = lab
        .kube_request(
            Some(&lab.api_token()),
            "POST",
            "/api/v1/namespaces/nope/pods",
            Some(&json!({"metadata": {"name": "p"}})),
        )
        .unwrap();
    assert_eq!((code, &st["message"]), (404, &json!("namespaces \"nope\" not found")));
    let (code, st) =
        lab.kube_request(Some(&lab.api_token()), "POST", "/api/v1/namespaces/default/services", Some(&mgr)).unwrap();
    assert_eq!((code, &st["reason"]), (400, &json!("BadRequest")), "namespace of the body differs: {st}");

    // Keep-alive: curl reuses one connection for two requests.
    let url = |p: &str| format!("{}{p}", lab.apiserver_url());
    let auth = format!("Authorization: Bearer {}", lab.api_token());
    let out = lab.exec(
        lab.cluster(),
        &["curl", "-sS", "-v", "--max-time", "10", "-H", &auth, &url("/version"), &url("/api/v1/nodes")],
    );
    assert!(out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Re-using existing"), "connection not reused:\n{}", show(&out));
    assert_eq!(err.matches("Connected to").count(), 1, "{}", show(&out));
    // A malformed request gets a 400 and does not kill the server.
    let out = lab.exec(
        lab.cluster(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Length: x",
            &url("/version"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400", "{}", show(&out));
    assert_eq!(get(&lab, "/version").0, 200);
}

#[test]
fn watch_replays_and_streams_changes() {
    let Some(lab) = lab() else { return };
    let (_, list) = get(&lab, "/api/v1/namespaces/default/services");
    let rv0 = rv_of(&list);
    let w =
        Watch::start(&lab, "/api/v1/namespaces/default/services?watch=true&resourceVersion=0&timeoutSeconds=30", 40);
    let initial = w.wait_until("5 initial ADDED", |ev| ev.len() >= 5);
    assert_eq!(
        summary(&initial),
        ["frontend", "frontend6", "redis-leader", "test-servers", "udp-echo"]
            .map(|n| ("ADDED".to_string(), n.to_string()))
    );
    let headers = fs::read_to_string(&w.headers).unwrap().to_ascii_lowercase();
    assert!(
        headers.contains("transfer-encoding: chunked") && headers.contains("content-type: application/json"),
        "{headers}"
    );
    // A watch with a label selector sees only what matches it.
    let wsel = Watch::start(&lab, "/api/v1/services?watch=1&labelSelector=app%3Dw&timeoutSeconds=30", 40);

    let created = lab
        .kube_apply(
            "POST",
            "/api/v1/namespaces/default/services",
            Some(&json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "w1"},
            "spec": {"ports": [{"name": "http", "port": 8080}]}})),
        )
        .unwrap();
    let ip = created["spec"]["clusterIP"].as_str().unwrap();
    assert!(ip.starts_with("10.96.100."), "{created}");
    assert!(rv_of(&created) > rv0);
    let ev = w.wait_until("ADDED w1", |ev| has(ev, "ADDED", "w1"));
    assert_eq!(ev[initial.len()]["object"]["spec"]["clusterIP"], ip);
    let e = lab.kube_apply("POST", "/api/v1/namespaces/default/services", Some(&created)).unwrap_err();
    assert!(format!("{e:#}").contains("HTTP 409") && format!("{e:#}").contains("AlreadyExists"), "{e:#}");

    let mut changed = created.clone();
    changed["metadata"]["labels"] = json!({"app": "w"});
    let modified = lab.kube_apply("PUT", "/api/v1/namespaces/default/services/w1", Some(&changed)).unwrap();
    assert!(rv_of(&modified) > rv_of(&created));
    assert_eq!(modified["metadata"]["uid"], created["metadata"]["uid"]);
    w.wait_until("MODIFIED w1", |ev| has(ev, "MODIFIED", "w1"));
    // Stale resourceVersion: 409 Conflict.
    let e = lab.kube_apply("PUT", "/api/v1/namespaces/default/services/w1", Some(&changed)).unwrap_err();
    assert!(format!("{e:#}").contains("Conflict"), "{e:#}");

    lab.kube_apply("DELETE", "/api/v1/namespaces/default/services/w1", None).unwrap();
    let ev = w.wait_until("DELETED w1", |ev| has(ev, "DELETED", "w1"));
    assert_eq!(
        summary(&ev[initial.len()..]),
        [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")].map(|(a, b)| (a.into(), b.into()))
    );
    let (code, _) =
        lab.kube_request(Some(&lab.api_token()), "DELETE", "/api/v1/namespaces/default/services/w1", None).unwrap();
    assert_eq!(code, 404);
    // The selector watch: w1 entered the selection on the update, left it on delete.
    let ev = wsel.wait_until("DELETED w1 (selector)", |ev| has(ev, "DELETED", "w1"));
    assert_eq!(summary(&ev), [("ADDED", "w1"), ("DELETED", "w1")].map(|(a, b)| (a.into(), b.into())));

    // Replay from the list's resourceVersion; the stream ends after timeoutSeconds.
    let mut replay = Watch::start(
        &lab,
        &format!("/api/v1/namespaces/default/services?watch=true&resourceVersion={rv0}&timeoutSeconds=1"),
        10,
    );
    assert!(replay.wait_exit(), "the watch did not end cleanly after timeoutSeconds");
    assert_eq!(summary(&replay.events()), summary(&w.events()[initial.len()..]));
    assert!(lab.apiserver_log().contains("watch=true"), "{}", lab.apiserver_log());
}

#[test]
fn watch_gone_after_compaction_and_bookmarks() {
    let Some(lab) = lab() else { return };
    let (_, list) = get(&lab, "/api/v1/pods");
    let old = rv_of(&list);
    lab.kube_apply("POST", "/api/v1/namespaces/dev/pods", Some(&json!({"metadata": {"name": "p1"}}))).unwrap();
    // Before compaction the old resourceVersion replays the creation.
    let mut w = Watch::start(&lab, &format!("/api/v1/pods?watch=true&resourceVersion={old}&timeoutSeconds=1"), 10);
    assert!(w.wait_exit());
    assert_eq!(summary(&w.events()), [("ADDED".to_string(), "p1".to_string())]);

    lab.kube_compact().unwrap();
    let mut w = Watch::start(&lab, &format!("/api/v1/pods?watch=true&resourceVersion={old}&timeoutSeconds=30"), 10);
    assert!(w.wait_exit(), "the stream must end after the ERROR event");
    let ev = w.events();
    assert_eq!(ev.len(), 1, "{}", render(&ev));
    assert_eq!(ev[0]["type"], "ERROR");
    let st = &ev[0]["object"];
    assert_eq!((&st["kind"], &st["code"], &st["reason"]), (&json!("Status"), &json!(410), &json!("Expired")), "{st}");
    assert!(st["message"].as_str().unwrap().starts_with(&format!("too old resource version: {old} (")), "{st}");

    // From the current resourceVersion: fine; bookmarks every 5 s when allowed.
    let (_, list) = get(&lab, "/api/v1/pods");
    let now = rv_of(&list);
    let mut w = Watch::start(
        &lab,
        &format!("/api/v1/pods?watch=true&resourceVersion={now}&allowWatchBookmarks=true&timeoutSeconds=7"),
        15,
    );
    assert!(w.wait_exit());
    let ev = w.events();
    assert!(!ev.is_empty() && ev.iter().all(|e| e["type"] == "BOOKMARK"), "{}", render(&ev));
    assert_eq!(rv_of(&ev[0]["object"]), now);
}

#[test]
fn auth_and_forbidden_secrets() {
    let Some(lab) = lab() else { return };
    let (code, st) = lab.kube_request(None, "GET", "/api/v1/namespaces", None).unwrap();
    assert_eq!(
        (code, st),
        (
            401,
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401})
        )
    );
    let (code, _) = lab.kube_request(Some("wrong"), "GET", "/version", None).unwrap();
    assert_eq!(code, 401);

    let t = lab.api_token_no_secrets();
    let (code, st) = lab.kube_request(Some(&t), "GET", "/api/v1/namespaces/tpvpn/secrets/tpvpn-client", None).unwrap();
    assert_eq!(code, 403);
    assert_eq!(st["reason"], "Forbidden");
    assert_eq!(
        st["message"],
        "secrets \"tpvpn-client\" is forbidden: User \"lab-user\" cannot get resource \"secrets\" in API group \"\" in the namespace \"tpvpn\""
    );
    let (code, st) = lab.kube_request(Some(&t), "GET", "/api/v1/secrets?watch=true", None).unwrap();
    assert_eq!(code, 403);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("cannot watch resource \"secrets\" in API group \"\" at the cluster scope"),
        "{st}"
    );
    let (code, _) = lab.kube_request(Some(&t), "GET", "/api/v1/services", None).unwrap();
    assert_eq!(code, 200, "the no-secrets token may read services");
    let (code, _) = lab.kube_request(Some(&lab.api_token()), "GET", "/api/v1/namespaces/tpvpn/secrets", None).unwrap();
    assert_eq!(code, 200);

    let kc = fs::read_to_string(lab.kubeconfig()).unwrap();
    for want in ["server: http://10.250.1.1:6443", &lab.api_token(), &t, "current-context: lab", "name: lab-no-secrets"]
    {
        assert!(kc.contains(want), "kubeconfig lacks {want:?}:\n{kc}");
    }
}

/// Server-side apply with curl, as `kube`'s `Api::patch(.., &Patch::Apply(..))` sends it.
fn ssa(lab: &Lab, path: &str, query: &str, body: &Value) -> (u16, Value) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = lab.dir().join(format!("ssa-{n}.json"));
    fs::write(&file, serde_json::to_vec(body).unwrap()).unwrap();
    let auth = format!("Authorization: Bearer {}", lab.api_token());
    let data = format!("@{}", file.display());
    let url = format!("{}{path}{query}", lab.apiserver_url());
    let ctype = "Content-Type: application/apply-patch+yaml";
    let out = lab.exec(
        lab.cluster(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-X",
            "PATCH",
            "-H",
            ctype,
            "-H",
            &auth,
            "--data-binary",
            &data,
            "-w",
            "\n%{http_code}",
            &url,
        ],
    );
    let _ = fs::remove_file(&file);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let (resp, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().unwrap(), serde_json::from_str(resp).unwrap_or(Value::Null))
}

#[test]
fn server_side_apply_get_reapply_delete() {
    let Some(lab) = lab() else { return };
    let q = "?fieldManager=t&force=true";
    let deploy_path = "/apis/apps/v1/namespaces/tpvpn/deployments/tpvpn-manager";
    let deploy = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "tpvpn-manager", "namespace": "tpvpn", "labels": {"app": "tpvpn-manager"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "tpvpn-manager"}},
            "template": {
                "metadata": {"labels": {"app": "tpvpn-manager"}},
                "spec": {"containers": [{"name": "manager", "image": "tpvpn:1"}]}
            }
        }
    });
    let role_path = "/apis/rbac.authorization.k8s.io/v1/clusterroles/tpvpn-manager";
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "tpvpn-manager"},
        "rules": [{"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["get", "list", "watch"]}]
    });
    let w = Watch::start(&lab, "/apis/apps/v1/deployments?watch=true&timeoutSeconds=30", 40);
    w.wait_until("the watch to start", |_| fs::metadata(&w.headers).is_ok_and(|m| m.len() > 0));

    // fieldManager is required.
    let (code, st) = ssa(&lab, deploy_path, "", &deploy);
    assert_eq!((code, &st["reason"]), (400, &json!("BadRequest")), "{st}");
    // Create, read back, apply again (same resourceVersion), modify.
    let (code, d) = ssa(&lab, deploy_path, q, &deploy);
    assert_eq!(code, 201, "{d}");
    let (code, c) = ssa(&lab, role_path, q, &role);
    assert_eq!(code, 201, "{c}");
    let (code, got) = get(&lab, deploy_path);
    assert_eq!((code, &got), (200, &d));
    assert_eq!(
        (&got["metadata"]["namespace"], &got["spec"]["template"]),
        (&json!("tpvpn"), &deploy["spec"]["template"])
    );
    let (code, got) = get(&lab, role_path);
    assert_eq!((code, &got["rules"]), (200, &role["rules"]));
    let (code, d2) = ssa(&lab, deploy_path, q, &deploy);
    assert_eq!((code, rv_of(&d2)), (200, rv_of(&d)), "re-apply must not change the object");
    let (_, c2) = ssa(&lab, role_path, q, &role);
    assert_eq!(rv_of(&c2), rv_of(&c));
    let mut changed = deploy.clone();
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("tpvpn:2");
    let (code, d3) = ssa(&lab, deploy_path, q, &changed);
    assert_eq!((code, &d3["spec"]["template"]["spec"]["containers"][0]["image"]), (200, &json!("tpvpn:2")));
    assert!(rv_of(&d3) > rv_of(&d));
    // Mismatches with the URL.
    let (code, _) = ssa(&lab, "/apis/apps/v1/namespaces/tpvpn/deployments/other", q, &deploy);
    assert_eq!(code, 400);
    let (code, _) = ssa(&lab, "/apis/rbac.authorization.k8s.io/v1/clusterroles/tpvpn-manager", q, &deploy);
    assert_eq!(code, 400);

    let (code, _) = lab.kube_request(Some(&lab.api_token()), "DELETE", deploy_path, None).unwrap();
    assert_eq!(code, 200);
    let (code, _) = lab.kube_request(Some(&lab.api_token()), "DELETE", role_path, None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(get(&lab, deploy_path).0, 404);
    assert_eq!(get(&lab, role_path).0, 404);
    let ev = w.wait_until("DELETED tpvpn-manager", |ev| has(ev, "DELETED", "tpvpn-manager"));
    assert_eq!(
        summary(&ev),
        [("ADDED", "tpvpn-manager"), ("MODIFIED", "tpvpn-manager"), ("DELETED", "tpvpn-manager")]
            .map(|(a, b)| (a.into(), b.into()))
    );

    // Deleting a namespace deletes what is in it.
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ssa"}});
    assert_eq!(ssa(&lab, "/api/v1/namespaces/ssa", q, &ns).0, 201);
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}});
    assert_eq!(ssa(&lab, "/api/v1/namespaces/ssa/serviceaccounts/sa", q, &sa).0, 201);
    let mut d = deploy.clone();
    d["metadata"]["namespace"] = json!("ssa");
    assert_eq!(ssa(&lab, "/apis/apps/v1/namespaces/ssa/deployments/tpvpn-manager", q, &d).0, 201);
    let (code, _) = lab.kube_request(Some(&lab.api_token()), "DELETE", "/api/v1/namespaces/ssa", None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(get(&lab, "/api/v1/namespaces/ssa/serviceaccounts/sa").0, 404);
    assert_eq!(get(&lab, "/apis/apps/v1/namespaces/ssa/deployments/tpvpn-manager").0, 404);
}

/// The reviews the manager will ask (issue 21): who a bearer token is (TokenReview) and
/// what RBAC lets a user do (SubjectAccessReview), each only for callers RBAC lets create
/// them.
#[test]
fn reviews_say_who_a_token_is_and_what_rbac_allows() {
    let Some(lab) = lab() else { return };
    let admin = lab.api_token();
    let post = |token: &str, path: &str, body: &Value| {
        lab.kube_request(Some(token), "POST", path, Some(body)).unwrap_or_else(|e| panic!("POST {path}: {e:#}"))
    };
    let tokens = "/apis/authentication.k8s.io/v1/tokenreviews";
    let review = |token: &str| json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
    let (code, answer) = post(&admin, tokens, &review(&lab.user_token()));
    assert_eq!(code, 201, "{answer}");
    assert_eq!(answer["status"]["authenticated"], true, "{answer}");
    assert_eq!(answer["status"]["user"]["username"], tpvpn_lab::LAB_USER);
    let groups = answer["status"]["user"]["groups"].as_array().unwrap();
    assert!(groups.contains(&json!(tpvpn_lab::LAB_USER_GROUP)) && groups.contains(&json!("system:authenticated")));
    let (_, answer) = post(&admin, tokens, &review("not-a-token"));
    assert_ne!(answer["status"]["authenticated"], true, "{answer}");

    let access = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
    let may_intercept = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": tpvpn_lab::LAB_USER, "groups": [tpvpn_lab::LAB_USER_GROUP],
        "resourceAttributes": {"namespace": "default", "verb": "create", "group": "tpvpn.dev",
            "resource": "services", "subresource": "intercept", "name": "web"}}});
    // The user itself may not ask: it holds no `create` on the reviews.
    let (code, answer) = post(&lab.user_token(), access, &may_intercept);
    assert_eq!(code, 403, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("cannot create resource \"subjectaccessreviews\""),
        "{answer}"
    );
    let (code, answer) = post(&admin, access, &may_intercept);
    assert_eq!((code, &answer["status"]["allowed"]), (201, &json!(false)), "nothing grants it yet: {answer}");
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "interceptor", "namespace": "default"},
        "rules": [{"apiGroups": ["tpvpn.dev"], "resources": ["services/intercept"], "verbs": ["create"]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "developers", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "interceptor"},
        "subjects": [{"kind": "Group", "name": tpvpn_lab::LAB_USER_GROUP}]});
    lab.kube_apply("POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles", Some(&role)).unwrap();
    lab.kube_apply("POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings", Some(&binding))
        .unwrap();
    let (_, answer) = post(&admin, access, &may_intercept);
    assert_eq!(answer["status"]["allowed"], true, "{answer}");
    let (code, _) = lab.kube_request(Some(&admin), "GET", access, None).unwrap();
    assert_eq!(code, 405, "reviews are only created");
}
