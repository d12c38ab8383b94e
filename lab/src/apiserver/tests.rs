use std::time::Duration;
use tokio::net::TcpListener;

use serde_json::{json, Value};

use super::*;

fn ns(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}
fn svc(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}, "spec": {"ports": [{"name": "http", "port": 80}]}})
}
fn store() -> Store {
    let mut s = Store::new(DEFAULT_HISTORY);
    s.load(vec![ns("default"), ns("dev")]).unwrap();
    s
}
fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()
}
fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{} {}", e["type"].as_str().unwrap(), e["object"]["metadata"]["name"].as_str().unwrap()))
        .collect()
}

#[test]
fn list_shape_selectors_and_defaults() {
    let mut s = store();
    let a = s.create(Resource::Services, Some("default"), svc("a", json!({"app": "a", "tier": "web"}))).unwrap();
    s.create(Resource::Services, Some("default"), svc("b", json!({"app": "b"}))).unwrap();
    s.create(Resource::Services, Some("dev"), svc("c", json!({"app": "a"}))).unwrap();
    assert_eq!(a["kind"], "Service");
    assert_eq!(a["spec"]["clusterIP"], "10.96.100.1");
    assert_eq!(a["spec"]["type"], "ClusterIP");
    assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(a["metadata"]["uid"].as_str().unwrap().len(), 36);
    assert!(a["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));

    let all = s.list(Resource::Services, &Filter::default());
    assert_eq!(all["kind"], "ServiceList");
    assert_eq!(all["apiVersion"], "v1");
    assert_eq!(all["metadata"]["resourceVersion"], s.resource_version().to_string());
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    let names = |f: &Filter| -> Vec<String> {
        s.list(Resource::Services, f)["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&Filter::parse(Some("default"), None, None).unwrap()), ["a", "b"]);
    assert_eq!(names(&Filter::parse(None, Some("app=a"), None).unwrap()), ["a", "c"]);
    assert_eq!(names(&Filter::parse(None, Some("app==a,tier=web"), None).unwrap()), ["a"]);
    assert_eq!(names(&Filter::parse(None, Some("app!=a"), None).unwrap()), ["b"]);
    assert_eq!(names(&Filter::parse(None, Some("!tier"), None).unwrap()), ["b", "c"]);
    assert_eq!(names(&Filter::parse(None, Some("tier"), None).unwrap()), ["a"]);
    assert_eq!(names(&Filter::parse(None, None, Some("metadata.name=b")).unwrap()), ["b"]);
    assert_eq!(names(&Filter::parse(None, None, Some("metadata.namespace!=default")).unwrap()), ["c"]);
    assert_eq!(Filter::parse(None, None, Some("spec.x=1")).unwrap_err().code, 400);
    assert_eq!(Filter::parse(None, Some("app in (a,b)"), None).unwrap_err().code, 400);
}

#[test]
fn errors_are_kubernetes_statuses() {
    let mut s = store();
    let e = s.get(Resource::Services, Some("default"), "x").unwrap_err();
    assert_eq!(
        e.status(),
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"services \"x\" not found",
               "reason":"NotFound","details":{"name":"x","kind":"services"},"code":404})
    );
    s.create(Resource::Services, Some("default"), svc("a", json!({}))).unwrap();
    let e = s.create(Resource::Services, Some("default"), svc("a", json!({}))).unwrap_err();
    assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
    let e = s.create(Resource::Services, Some("nope"), svc("a", json!({}))).unwrap_err();
    assert_eq!((e.code, e.message.as_str()), (404, "namespaces \"nope\" not found"));
    let mut stale = s.get(Resource::Services, Some("default"), "a").unwrap();
    s.replace(Resource::Services, Some("default"), "a", stale.clone()).unwrap();
    let e = s.replace(Resource::Services, Some("default"), "a", stale.clone()).unwrap_err();
    assert_eq!((e.code, e.reason), (409, "Conflict"));
    stale["metadata"]["resourceVersion"] = Value::Null;
    stale["spec"]["clusterIP"] = json!("10.96.0.1");
    let e = s.replace(Resource::Services, Some("default"), "a", stale).unwrap_err();
    assert_eq!((e.code, e.reason), (422, "Invalid"));
    let e = s.delete(Resource::Pods, Some("default"), "p").unwrap_err();
    assert_eq!(e.code, 404);
    let e =
        s.create(Resource::Services, Some("default"), json!({"kind": "Pod", "metadata": {"name": "z"}})).unwrap_err();
    assert_eq!(e.code, 400);
}

#[test]
fn watch_initial_and_replay() {
    let mut s = store();
    s.create(Resource::Services, Some("default"), svc("a", json!({"app": "a"}))).unwrap();
    let all = Filter::default();
    let (ev, rv) = s.watch_events(Resource::Services, &all, WatchStart::Initial).unwrap();
    assert_eq!(types(&ev), ["ADDED a"]);
    assert_eq!(rv, s.resource_version());

    let mut b = s.create(Resource::Services, Some("default"), svc("b", json!({"app": "b"}))).unwrap();
    b["metadata"]["labels"]["app"] = json!("a");
    s.replace(Resource::Services, Some("default"), "b", b).unwrap();
    s.create(Resource::Pods, Some("default"), json!({"metadata": {"name": "p"}})).unwrap();
    let mut a = s.get(Resource::Services, Some("default"), "a").unwrap();
    a["metadata"]["labels"]["app"] = json!("z");
    s.replace(Resource::Services, Some("default"), "a", a).unwrap();
    let del = s.delete(Resource::Services, Some("default"), "b").unwrap();
    assert_eq!(del["metadata"]["resourceVersion"], s.resource_version().to_string());

    let (ev, _) = s.watch_events(Resource::Services, &all, WatchStart::After(rv)).unwrap();
    assert_eq!(types(&ev), ["ADDED b", "MODIFIED b", "MODIFIED a", "DELETED b"]);
    // Selector transitions: b enters app=a (ADDED), a leaves it (DELETED).
    let sel = Filter::parse(None, Some("app=a"), None).unwrap();
    let (ev, _) = s.watch_events(Resource::Services, &sel, WatchStart::After(rv)).unwrap();
    assert_eq!(types(&ev), ["ADDED b", "DELETED a", "DELETED b"]);
    let (ev, _) = s.watch_events(Resource::Pods, &all, WatchStart::After(rv)).unwrap();
    assert_eq!(types(&ev), ["ADDED p"]);
    // A resourceVersion from the future replays nothing.
    let (ev, at) = s.watch_events(Resource::Services, &all, WatchStart::After(1000)).unwrap();
    assert!(ev.is_empty());
    assert_eq!(at, 1000);
}

#[test]
fn watch_too_old_is_gone() {
    let mut s = Store::new(3);
    s.load(vec![ns("default")]).unwrap(); // rv 1
    for n in ["a", "b", "c", "d"] {
        s.create(Resource::Services, Some("default"), svc(n, json!({}))).unwrap();
        // rv 2..=5
    }
    let all = Filter::default();
    // History holds rv 3..=5: watching from 2 still sees everything after it.
    let (ev, _) = s.watch_events(Resource::Services, &all, WatchStart::After(2)).unwrap();
    assert_eq!(types(&ev), ["ADDED b", "ADDED c", "ADDED d"]);
    let e = s.watch_events(Resource::Services, &all, WatchStart::After(1)).unwrap_err();
    assert_eq!(e.status()["code"], 410);
    assert_eq!(e.status()["reason"], "Expired");
    assert_eq!(e.message, "too old resource version: 1 (2)");
    s.compact();
    assert_eq!(s.watch_events(Resource::Services, &all, WatchStart::After(4)).unwrap_err().code, 410);
    assert!(s.watch_events(Resource::Services, &all, WatchStart::After(5)).unwrap().0.is_empty());
    let (ev, _) = s.watch_events(Resource::Services, &all, WatchStart::Initial).unwrap();
    assert_eq!(ev.len(), 4);
}

#[test]
fn patch_secrets_and_node_ports() {
    let mut s = store();
    let sec = json!({"metadata": {"name": "s"}, "stringData": {"k": "hi"}});
    let sec = s.create(Resource::Secrets, Some("default"), sec).unwrap();
    assert_eq!((sec["type"].as_str(), sec["data"]["k"].as_str()), (Some("Opaque"), Some("aGk=")));
    let np = json!({"metadata": {"name": "np"}, "spec": {"type": "NodePort", "ports": [{"port": 1}, {"port": 2, "nodePort": 30000}]}});
    let np = s.create(Resource::Services, Some("default"), np).unwrap();
    assert_eq!(np["spec"]["ports"][0]["nodePort"], 30001);
    let p =
        s.merge_patch(Resource::Services, Some("default"), "np", &json!({"metadata": {"labels": {"x": "y"}}})).unwrap();
    assert_eq!(p["metadata"]["labels"]["x"], "y");
    assert_eq!(p["spec"]["clusterIP"], np["spec"]["clusterIP"]);
}

#[test]
fn routes_and_queries() {
    let item = |res, ns: Option<&str>, name: &str| Route::Item { res, ns: ns.map(Into::into), name: name.into() };
    assert_eq!(Route::parse("/api/v1/services"), Route::List { res: Resource::Services, ns: None });
    assert_eq!(Route::parse("/api/v1/namespaces/rs/pods/"), Route::List { res: Resource::Pods, ns: Some("rs".into()) });
    assert_eq!(Route::parse("/api/v1/namespaces/tpvpn"), item(Resource::Namespaces, None, "tpvpn"));
    assert_eq!(Route::parse("/api/v1/nodes/n1"), item(Resource::Nodes, None, "n1"));
    assert_eq!(Route::parse("/api/v1/namespaces/a/secrets/b"), item(Resource::Secrets, Some("a"), "b"));
    assert_eq!(Route::parse("/api/v1/namespaces/a/nodes"), Route::Unknown);
    assert_eq!(Route::parse("/api/v1/services/x"), Route::Unknown);
    assert_eq!(Route::parse("/api/v1"), Route::Resources(""));
    assert_eq!(Route::parse("/apis/apps/v1"), Route::Resources("apps"));
    assert_eq!(Route::parse("/apis"), Route::Apis);
    assert_eq!(Route::parse("/apis/rbac.authorization.k8s.io"), Route::Group("rbac.authorization.k8s.io"));
    assert_eq!(Route::parse("/apis/apps/v1/namespaces/t/deployments/d"), item(Resource::Deployments, Some("t"), "d"));
    assert_eq!(Route::parse("/apis/apps/v1/deployments"), Route::List { res: Resource::Deployments, ns: None });
    assert_eq!(
        Route::parse("/apis/rbac.authorization.k8s.io/v1/clusterroles/c"),
        item(Resource::ClusterRoles, None, "c")
    );
    assert_eq!(
        Route::parse("/apis/rbac.authorization.k8s.io/v1/namespaces/t/rolebindings"),
        Route::List { res: Resource::RoleBindings, ns: Some("t".into()) }
    );
    assert_eq!(Route::parse("/api/v1/namespaces/t/serviceaccounts/s"), item(Resource::ServiceAccounts, Some("t"), "s"));
    // Unknown groups, versions, resources and scopes.
    for p in [
        "/apis/batch/v1/jobs",
        "/apis/apps/v2/deployments",
        "/apis/apps/v1/services",
        "/api/v1/deployments",
        "/apis/apps/v1/namespaces/t/clusterroles",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/c/x",
        "/apis/foo",
    ] {
        assert_eq!(Route::parse(p), Route::Unknown, "{p}");
    }
    let q = parse_query("labelSelector=a%3Db%2Cc!%3Dd&watch=1&x&y=a+b&z=%zz%");
    assert_eq!(q["labelSelector"], "a=b,c!=d");
    assert_eq!((q["watch"].as_str(), q["x"].as_str(), q["y"].as_str(), q["z"].as_str()), ("1", "", "a b", "%zz%"));
    assert_eq!(pct_decode("%4", false), "%4");
    assert_eq!(pct_decode("%41", false), "A");
}

/// Starts the stand-in on a free loopback port (admin token `t`); returns its address.
async fn serve_on_loopback() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = Config {
        admin_token: "t".into(),
        no_secrets_token: None,
        no_portforward_token: None,
        users: Vec::new(),
        bookmark_interval: Duration::from_secs(5),
    };
    let srv = ApiServer::new(store(), cfg, addr.to_string());
    tokio::spawn(srv.serve(listener));
    addr
}

/// One request on its own connection (`Connection: close`), the response read to the
/// end: its status code and JSON body.
async fn one_request(
    addr: std::net::SocketAddr,
    token: &str,
    method: &str,
    path: String,
    ctype: &str,
    body: String,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\
         Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code: u16 = text[9..12].parse().unwrap();
    (code, serde_json::from_str::<Value>(text.split_once("\r\n\r\n").unwrap().1).unwrap_or(Value::Null))
}

/// Raw HTTP/1.1 on loopback: keep-alive, errors as Status, a chunked watch.
#[test]
fn http_keep_alive_and_chunked_watch() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let addr = serve_on_loopback().await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n");
        // Two requests on one connection, then a watch that times out after 1 s.
        let all =
            req("/version") + &req("/api/v1/namespaces/x?y=%") + &req("/api/v1/namespaces?watch=true&timeoutSeconds=1");
        c.write_all(all.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            let mut chunk = [0u8; 4096];
            // Until the watch's last chunk (bounded by the timeout).
            while !buf.ends_with(b"\r\n0\r\n\r\n") {
                let n = c.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&buf));
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no complete responses: {}", String::from_utf8_lossy(&buf)));
        let text = String::from_utf8_lossy(&buf);
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert!(text.contains("HTTP/1.1 404 Not Found") && text.contains(r#""reason":"NotFound""#), "{text}");
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
        assert!(text.contains(r#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Namespace""#), "{text}");
        // The connection is still usable; no token → 401.
        c.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk)).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&chunk[..n]).starts_with("HTTP/1.1 401"));
    });
}

fn deploy(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mgr", "labels": {"app": "mgr"}},
        "spec": {"selector": {"matchLabels": {"app": "mgr"}}, "template": {
            "metadata": {"labels": {"app": "mgr"}},
            "spec": {"containers": [{"name": "m", "image": image, "args": ["a", "b"]}]}}},
    })
}

#[test]
fn apply_creates_then_is_idempotent() {
    let mut s = store();
    let rv0 = s.resource_version();
    let (d, created) = s.apply(Resource::Deployments, Some("dev"), "mgr", deploy("img:1")).unwrap();
    assert!(created);
    assert_eq!((d["kind"].as_str(), d["apiVersion"].as_str()), (Some("Deployment"), Some("apps/v1")));
    assert_eq!(d["metadata"]["namespace"], "dev");
    assert_eq!(d["metadata"]["uid"].as_str().unwrap().len(), 36);
    assert!(d["metadata"]["creationTimestamp"].is_string());
    assert_eq!((d["metadata"]["generation"].as_i64(), d["spec"]["replicas"].as_i64()), (Some(1), Some(1)));
    assert_eq!(rv_of(&d), rv0 + 1);
    // The same configuration again: nothing changes, no event.
    let (again, created) = s.apply(Resource::Deployments, Some("dev"), "mgr", deploy("img:1")).unwrap();
    assert!(!created);
    assert_eq!(again, d);
    assert_eq!(s.resource_version(), rv0 + 1);
    let (ev, _) = s.watch_events(Resource::Deployments, &Filter::default(), WatchStart::After(rv0)).unwrap();
    assert_eq!(types(&ev), ["ADDED mgr"]);
    // Listed with the group's apiVersion.
    let list = s.list(Resource::Deployments, &Filter::parse(Some("dev"), Some("app=mgr"), None).unwrap());
    assert_eq!((list["kind"].as_str(), list["apiVersion"].as_str()), (Some("DeploymentList"), Some("apps/v1")));
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[test]
fn apply_modifies() {
    let mut s = store();
    let (d, _) = s.apply(Resource::Deployments, Some("dev"), "mgr", deploy("img:1")).unwrap();
    let mut changed = deploy("img:2");
    changed["spec"]["template"]["spec"]["containers"][0].as_object_mut().unwrap().remove("args");
    changed["metadata"]["annotations"] = json!({"a": "b"});
    let (m, created) = s.apply(Resource::Deployments, Some("dev"), "mgr", changed).unwrap();
    assert!(!created);
    assert!(rv_of(&m) > rv_of(&d));
    assert_eq!(
        (&m["metadata"]["uid"], &m["metadata"]["creationTimestamp"]),
        (&d["metadata"]["uid"], &d["metadata"]["creationTimestamp"])
    );
    // Lists are replaced (args gone), maps merged (labels kept), generation bumped.
    assert_eq!(m["spec"]["template"]["spec"]["containers"], json!([{"name": "m", "image": "img:2"}]));
    assert_eq!((&m["metadata"]["labels"]["app"], &m["metadata"]["annotations"]["a"]), (&json!("mgr"), &json!("b")));
    assert_eq!(m["metadata"]["generation"], 2);
    let (ev, _) = s.watch_events(Resource::Deployments, &Filter::default(), WatchStart::After(rv_of(&d))).unwrap();
    assert_eq!(types(&ev), ["MODIFIED mgr"]);
    assert_eq!(s.get(Resource::Deployments, Some("dev"), "mgr").unwrap(), m);
}

#[test]
fn apply_validates() {
    let mut s = store();
    let bad = |s: &mut Store, res, ns: Option<&str>, name: &str, obj: Value| s.apply(res, ns, name, obj).unwrap_err();
    // Kind, apiVersion and name must match the URL.
    let e = bad(&mut s, Resource::Services, Some("dev"), "mgr", deploy("i"));
    assert_eq!((e.code, e.reason), (400, "BadRequest"));
    let mut v = deploy("i");
    v["apiVersion"] = json!("v1");
    assert_eq!(bad(&mut s, Resource::Deployments, Some("dev"), "mgr", v).code, 400);
    let mut v = deploy("i");
    v.as_object_mut().unwrap().remove("kind");
    assert_eq!(bad(&mut s, Resource::Deployments, Some("dev"), "mgr", v).code, 400);
    let e = bad(&mut s, Resource::Deployments, Some("dev"), "other", deploy("i"));
    assert_eq!(e.message, "the name of the object (mgr) does not match the name on the URL (other)");
    let mut v = deploy("i");
    v["metadata"]["namespace"] = json!("default");
    assert_eq!(bad(&mut s, Resource::Deployments, Some("dev"), "mgr", v).code, 400);
    let e = bad(&mut s, Resource::Deployments, Some("nope"), "mgr", deploy("i"));
    assert_eq!((e.code, e.message.as_str()), (404, "namespaces \"nope\" not found"));
    assert_eq!(bad(&mut s, Resource::Deployments, Some("dev"), "mgr", json!([])).code, 400);
    // Errors name the group like the real API server.
    let e = s.get(Resource::Deployments, Some("dev"), "x").unwrap_err();
    assert_eq!(e.message, "deployments.apps \"x\" not found");
    assert_eq!(e.details, Some(json!({"name": "x", "group": "apps", "kind": "deployments"})));
}

#[test]
fn apply_cluster_role_secret_and_service() {
    let mut s = store();
    let cr = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "tpvpn"},
        "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}],
    });
    let (c, created) = s.apply(Resource::ClusterRoles, None, "tpvpn", cr.clone()).unwrap();
    assert!(created && c["metadata"]["namespace"].is_null());
    let (c2, _) = s.apply(Resource::ClusterRoles, None, "tpvpn", cr.clone()).unwrap();
    assert_eq!(rv_of(&c2), rv_of(&c));
    assert_eq!(s.get(Resource::ClusterRoles, None, "tpvpn").unwrap()["rules"], cr["rules"]);

    // A Secret applied with stringData twice: unchanged the second time.
    let sec = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "hi"}});
    let (a, _) = s.apply(Resource::Secrets, Some("dev"), "s", sec.clone()).unwrap();
    assert_eq!(a["data"]["k"], "aGk=");
    assert_eq!(rv_of(&s.apply(Resource::Secrets, Some("dev"), "s", sec).unwrap().0), rv_of(&a));

    // A Service: allocation on create, the allocated clusterIP and nodePort kept on re-apply.
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m"},
        "spec": {"type": "NodePort", "ports": [{"name": "quic", "port": 4443, "protocol": "UDP"}]}});
    let (a, _) = s.apply(Resource::Services, Some("dev"), "m", svc.clone()).unwrap();
    assert_eq!(
        (a["spec"]["clusterIP"].as_str(), a["spec"]["ports"][0]["nodePort"].as_u64()),
        (Some("10.96.100.1"), Some(30000))
    );
    let (b, _) = s.apply(Resource::Services, Some("dev"), "m", svc.clone()).unwrap();
    assert_eq!(b, a);
    let mut other = svc.clone();
    other["spec"]["clusterIP"] = json!("10.96.0.9");
    let e = s.apply(Resource::Services, Some("dev"), "m", other).unwrap_err();
    assert_eq!((e.code, e.reason), (422, "Invalid"));
    assert!(e.message.starts_with("Service \"m\" is invalid: spec.clusterIP"), "{}", e.message);
}

#[test]
fn namespace_delete_cascades() {
    let mut s = store();
    s.apply(Resource::Namespaces, None, "t", ns("t")).unwrap();
    s.apply(Resource::Deployments, Some("t"), "mgr", deploy("i")).unwrap();
    s.create(Resource::Services, Some("t"), svc("a", json!({}))).unwrap();
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}});
    s.apply(Resource::ServiceAccounts, Some("t"), "sa", sa).unwrap();
    let cr = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "c"}});
    s.apply(Resource::ClusterRoles, None, "c", cr).unwrap();
    s.create(Resource::Services, Some("dev"), svc("b", json!({}))).unwrap();
    let rv = s.resource_version();
    let gone = s.delete(Resource::Namespaces, None, "t").unwrap();
    assert_eq!(gone["metadata"]["name"], "t");
    assert_eq!(rv_of(&gone), s.resource_version());
    assert!(s.get(Resource::Deployments, Some("t"), "mgr").is_err());
    assert!(s.get(Resource::ServiceAccounts, Some("t"), "sa").is_err());
    assert!(s.get(Resource::ClusterRoles, None, "c").is_ok(), "cluster-scoped objects stay");
    assert!(s.get(Resource::Services, Some("dev"), "b").is_ok(), "other namespaces stay");
    let all = Filter::default();
    let (ev, _) = s.watch_events(Resource::Services, &all, WatchStart::After(rv)).unwrap();
    assert_eq!(types(&ev), ["DELETED a"]);
    let (ev, _) = s.watch_events(Resource::Deployments, &all, WatchStart::After(rv)).unwrap();
    assert_eq!(types(&ev), ["DELETED mgr"]);
    assert_eq!(s.resource_version(), rv + 4);
    assert_eq!(s.delete(Resource::Namespaces, None, "t").unwrap_err().code, 404);
}

/// Discovery, unknown resources, apply over HTTP (raw HTTP/1.1 on loopback).
#[test]
fn http_discovery_apply_and_unknown() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let addr = serve_on_loopback().await;
        let call = |method: &'static str, path: String, ctype: &'static str, body: String| {
            one_request(addr, "t", method, path, ctype, body)
        };
        let get = |p: &str| call("GET", p.to_string(), "application/json", String::new());
        let (code, v) = get("/apis").await;
        assert_eq!((code, v["kind"].as_str()), (200, Some("APIGroupList")));
        let groups: Vec<&str> = v["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
        assert_eq!(
            groups,
            [
                "apps",
                "authentication.k8s.io",
                "authorization.k8s.io",
                "certificates.k8s.io",
                "rbac.authorization.k8s.io"
            ]
        );
        assert_eq!(v["groups"][0]["preferredVersion"]["groupVersion"], "apps/v1");
        let (_, v) = get("/apis/authorization.k8s.io/v1").await;
        let reviews: Vec<&str> =
            v["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(reviews, ["subjectaccessreviews", "selfsubjectaccessreviews"]);
        let (_, v) = get("/apis/rbac.authorization.k8s.io/v1").await;
        assert_eq!(v["groupVersion"], "rbac.authorization.k8s.io/v1");
        assert_eq!(v["resources"].as_array().unwrap().len(), 4);
        let (_, v) = get("/apis/apps").await;
        assert_eq!((v["kind"].as_str(), v["name"].as_str()), (Some("APIGroup"), Some("apps")));
        for p in ["/apis/batch/v1/jobs", "/apis/apps/v1/namespaces/dev/jobs/x", "/api/v1/deployments"] {
            let (code, v) = get(p).await;
            assert_eq!(
                (code, v["message"].as_str()),
                (404, Some("the server could not find the requested resource")),
                "{p}"
            );
        }

        let path = "/apis/apps/v1/namespaces/dev/deployments/mgr";
        let apply = |q: &str, body: &Value| {
            call("PATCH", format!("{path}{q}"), "application/apply-patch+yaml", body.to_string())
        };
        let (code, v) = apply("", &deploy("i")).await;
        assert_eq!((code, v["message"].as_str().unwrap_or("").contains("fieldManager")), (400, true), "{v}");
        let (code, created) = apply("?fieldManager=t&force=true", &deploy("i")).await;
        assert_eq!(code, 201, "{created}");
        let (code, again) = apply("?fieldManager=t&force=true", &deploy("i")).await;
        assert_eq!((code, rv_of(&again)), (200, rv_of(&created)));
        let (code, v) = get(path).await;
        assert_eq!((code, &v), (200, &created));
        let (code, _) = apply("?fieldManager=t&dryRun=All", &deploy("i")).await;
        assert_eq!(code, 400);
        let (code, v) = call("PATCH", path.into(), "application/json-patch+json", "[]".into()).await;
        assert_eq!(code, 415, "{v}");
        let (code, v) = call("DELETE", path.into(), "application/json", String::new()).await;
        assert_eq!((code, v["metadata"]["name"].as_str()), (200, Some("mgr")));
        assert_eq!(get(path).await.0, 404);
    });
}

#[test]
fn timestamp_format() {
    let t = rfc3339_now();
    assert_eq!(t.len(), 20, "{t}");
    assert!(t.starts_with("20"), "{t}");
}

/// CertificateSigningRequests over HTTP as the API server handles them: the requester
/// stamped (not what the body claims), approval and signing each needing their own
/// RBAC on the signer, a certificate only once approved.
#[test]
fn csrs_are_stamped_and_approved_and_signed_only_by_whom_rbac_allows() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let users = parse_token_file("alice-t,alice,u-alice,\"dev\"\nsigner-t,signer,u-signer\n").unwrap();
        let cfg = Config {
            admin_token: "t".into(),
            no_secrets_token: None,
            no_portforward_token: None,
            users,
            bookmark_interval: Duration::from_secs(5),
        };
        let mut st = store();
        let rbac = "rbac.authorization.k8s.io/v1";
        st.load(vec![
            json!({"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": "csr-user"},
                "rules": [{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get"]}]}),
            json!({"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": "csr-users"},
                "roleRef": {"kind": "ClusterRole", "name": "csr-user"},
                "subjects": [{"kind": "Group", "name": "system:authenticated"}]}),
            json!({"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": "signer"},
                "rules": [
                    {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/approval", "certificatesigningrequests/status"], "verbs": ["update"]},
                    {"apiGroups": ["certificates.k8s.io"], "resources": ["signers"], "resourceNames": ["tpvpn.dev/*"], "verbs": ["approve", "sign"]}]}),
            json!({"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": "signer"},
                "roleRef": {"kind": "ClusterRole", "name": "signer"}, "subjects": [{"kind": "User", "name": "signer"}]}),
        ])
        .unwrap();
        tokio::spawn(ApiServer::new(st, cfg, addr.to_string()).serve(listener));
        let call = |token: &'static str, method: &'static str, path: &'static str, body: Value| {
            let body = if body.is_null() { String::new() } else { body.to_string() };
            one_request(addr, token, method, path.to_string(), "application/json", body)
        };
        let pem = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n";
        let request = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem);
        let csr = json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": "alice-1"},
            "spec": {"request": request, "signerName": "tpvpn.dev/client", "usages": ["client auth"],
                     "username": "admin", "groups": ["system:masters"]}});
        let base = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
        let (code, created) = call("alice-t", "POST", base, csr).await;
        assert_eq!(code, 201, "{created}");
        assert_eq!(created["spec"]["username"], "alice", "stamped by the server: {created}");
        assert_eq!(created["spec"]["uid"], "u-alice");
        assert_eq!(created["spec"]["groups"], json!(["dev", "system:authenticated"]));

        let approve = json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": "alice-1"},
            "status": {"conditions": [{"type": "Approved", "status": "True", "reason": "Test"}]}});
        let approval = "/apis/certificates.k8s.io/v1/certificatesigningrequests/alice-1/approval";
        let (code, body) = call("alice-t", "PUT", approval, approve.clone()).await;
        assert_eq!(code, 403, "a requester approving its own request: {body}");
        assert!(body["message"].as_str().unwrap().contains("certificatesigningrequests/approval"), "{body}");
        let status = "/apis/certificates.k8s.io/v1/certificatesigningrequests/alice-1/status";
        let signed = json!({"status": {"certificate": "Y2VydA=="}});
        let (code, body) = call("signer-t", "PUT", status, signed.clone()).await;
        assert_eq!(code, 422, "signed before approval: {body}");
        let (code, body) = call("signer-t", "PUT", approval, approve).await;
        assert_eq!((code, body["status"]["conditions"][0]["type"].as_str()), (200, Some("Approved")), "{body}");
        let (code, body) = call("signer-t", "PUT", status, signed).await;
        assert_eq!((code, body["status"]["certificate"].as_str()), (200, Some("Y2VydA==")), "{body}");
        let (code, body) = call("alice-t", "GET", "/apis/certificates.k8s.io/v1/certificatesigningrequests/alice-1", Value::Null).await;
        assert_eq!((code, body["status"]["certificate"].as_str()), (200, Some("Y2VydA==")), "{body}");
        assert_eq!(body["spec"]["username"], "alice");
    });
}
