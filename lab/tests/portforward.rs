//! Reaching the manager through the API server's port-forward: the stand-in's
//! `pods/portforward` against kube's own port-forward client, and `tpvpn up` where the
//! laptop's UDP to the manager is dropped. Root only; skip loudly otherwise.

use std::process::Output;
use std::time::{Duration, Instant};

use tpvpn_lab::{show, Lab};

fn lab() -> Option<Lab> {
    tpvpn_lab::lab_or_skip()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tpvpn up` from the lab's kubeconfig with `extra`.
fn up_kube(lab: &Lab, extra: &[&str]) -> Output {
    let mut args = vec!["up"];
    args.extend_from_slice(extra);
    let kc = lab.kubeconfig().display().to_string();
    lab.tpvpn_env(&args, &[("KUBECONFIG", &kc)], Duration::from_secs(60))
}

fn status(lab: &Lab) -> serde_json::Value {
    let out = lab.tpvpn(&["status", "-o", "json"]);
    assert!(out.status.success(), "status: {}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", show(&out)))
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

/// Runs `f` on a thread inside the lab's laptop namespace (where the API stand-in's
/// address is reachable), on a tokio runtime of that thread.
fn in_laptop<T: Send + 'static>(lab: &Lab, f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    let netns = format!("/var/run/netns/{}", lab.laptop());
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).unwrap_or_else(|e| panic!("open {netns}: {e}"));
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the laptop namespace");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(f)
    })
    .join()
    .expect("the laptop thread panicked")
}

async fn kube_client(kubeconfig: std::path::PathBuf, context: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let opts = kube::config::KubeConfigOptions { context: Some(context.into()), ..Default::default() };
    let config = kube::Config::from_custom_kubeconfig(kc, &opts).await.unwrap();
    kube::Client::try_from(config).unwrap()
}

#[test]
fn the_standin_port_forward_works_with_kubes_own_client() {
    let Some(lab) = lab() else { return };
    let kubeconfig = lab.kubeconfig();
    let (page, refused, forbidden) = in_laptop(&lab, async move {
        use k8s_openapi::api::core::v1::Pod;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let client = kube_client(kubeconfig.clone(), "lab").await;
        let pods: kube::Api<Pod> = kube::Api::namespaced(client, "default");
        // The frontend pod's nginx, through the port-forward.
        let mut pf = pods.portforward("frontend-0", &[80]).await.expect("port-forward to frontend-0");
        let mut s = pf.take_stream(80).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: frontend\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut page = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut page)).await;
        drop(s);
        // A port nothing listens on: the error channel says so.
        let mut pf = pods.portforward("frontend-0", &[81]).await.expect("the upgrade itself succeeds");
        let err = pf.take_error(81).unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(10), err).await.expect("an error in time");
        // A user without pods/portforward.
        let denied = kube_client(kubeconfig, "lab-no-portforward").await;
        let pods: kube::Api<Pod> = kube::Api::namespaced(denied, "default");
        let forbidden = match pods.portforward("frontend-0", &[80]).await {
            Err(kube::Error::Api(s)) => (s.code, s.message),
            Err(e) => (0, e.to_string()),
            Ok(_) => (200, String::new()),
        };
        (String::from_utf8_lossy(&page).into_owned(), refused, forbidden)
    });
    assert!(page.starts_with("HTTP/1.1 200") && page.contains(tpvpn_lab::FRONTEND_BODY), "{page}");
    let refused = refused.expect("an error message");
    assert!(refused.contains("forwarding port 81") && refused.contains("connection refused"), "{refused}");
    assert_eq!(forbidden.0, 403, "{}", forbidden.1);
    assert!(forbidden.1.contains("cannot create resource \"pods/portforward\""), "{}", forbidden.1);
}

#[test]
fn with_udp_dropped_up_goes_through_the_port_forward_and_everything_works() {
    let Some(mut lab) = lab() else { return };
    lab.block_manager_udp().unwrap();
    let out = up_kube(&lab, &[]);
    assert!(out.status.success(), "up (auto):\n{}\nmanager:\n{}", show(&out), lab.manager_log());
    let v = status(&lab);
    assert_eq!(v["transport"], "portforward", "{v}");
    assert_eq!(v["manager_pod"], format!("tpvpn/{}", tpvpn_lab::MANAGER_POD), "{v}");
    let l = &lab.laptop().to_string();
    for url in ["http://10.96.0.10/", "http://10.244.1.10/", "http://frontend.default/"] {
        let page = lab.exec(l, &["curl", "-sS", "--max-time", "10", url]);
        assert!(stdout(&page).contains(tpvpn_lab::FRONTEND_BODY), "{url}: {}", show(&page));
    }
    let redis = lab.exec_timeout(l, &["redis-cli", "-h", tpvpn_lab::REDIS_IP, "ping"], Duration::from_secs(10));
    assert_eq!(stdout(&redis).trim(), "PONG", "{}", show(&redis));
    let size = (64u64 << 20).to_string();
    assert_ok(&lab.lab_tool(l, &["client", "upload", tpvpn_lab::SINK_ADDR, &size]), "64 MiB up");
    assert_ok(&lab.lab_tool(l, &["client", "download", tpvpn_lab::SOURCE_ADDR, &size]), "64 MiB down");
    for size in ["1", "1200"] {
        assert_ok(&lab.lab_tool(l, &["client", "udp", tpvpn_lab::UDP_ECHO_ADDR, size]), "UDP echo");
    }
    let dig = lab.exec(l, &["dig", "+short", "+time=2", "+tries=1", "redis-leader.default.svc.cluster.local"]);
    assert_eq!(stdout(&dig).trim(), tpvpn_lab::REDIS_IP, "{}", show(&dig));
    let list = lab.tpvpn(&["list"]);
    assert!(list.status.success() && stdout(&list).contains("frontend"), "{}", show(&list));
    // The manager saw it arrive on its TCP port, and the intercepts connection beside it.
    assert!(lab.manager_log().contains("transport=\"tcp\"") || lab.manager_log().contains("transport=tcp"));
    assert!(
        lab.manager_log().lines().any(|l| l.contains("tcp") && l.contains("intercepts connection joined its session")),
        "{}",
        lab.manager_log()
    );

    // A restarted manager is reached again through the port-forward, without waiting for
    // UDP first: the daemon remembers that UDP did not answer.
    const UDP_GAVE_UP: &str = "no QUIC answer from the manager";
    const REMEMBERED: &str = "reconnecting through the port-forward, as the last session did";
    let log = lab.runtime_dir().join("tpvpn.log");
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    lab.start_manager().unwrap();
    let back = tpvpn_lab::wait_until(Duration::from_secs(30), || {
        let page = lab.exec(l, &["curl", "-sS", "--max-time", "3", "http://10.96.0.10/"]);
        stdout(&page).contains(tpvpn_lab::FRONTEND_BODY) && status(&lab)["connected"] == true
    });
    assert!(back, "not reconnected after the manager's restart:\n{}", daemon_log());
    assert_eq!(status(&lab)["transport"], "portforward");
    // The first attempt after the loss went through the port-forward (UDP may be tried
    // again only on a fourth attempt).
    let all = daemon_log();
    let since = &all[all.rfind("the tunnel is down").expect("the loss is logged")..];
    let (pf, udp) = (since.find(REMEMBERED), since.find(UDP_GAVE_UP));
    assert!(pf.is_some_and(|pf| udp.is_none_or(|udp| udp > pf)), "UDP was tried first:\n{all}");
}

#[test]
fn quic_only_with_udp_dropped_fails_in_bounded_time_and_says_what_to_use() {
    let Some(lab) = lab() else { return };
    lab.block_manager_udp().unwrap();
    let started = Instant::now();
    let out = up_kube(&lab, &["--transport", "quic"]);
    assert!(!out.status.success(), "up --transport quic with UDP dropped succeeded: {}", show(&out));
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--transport portforward"), "{}", show(&out));
    let status = lab.tpvpn(&["status"]);
    assert!(stdout(&status).contains("not connected"), "{}", show(&status));
}

#[test]
fn a_restarted_api_server_is_reached_again_through_a_new_port_forward() {
    let Some(mut lab) = lab() else { return };
    let out = up_kube(&lab, &["--transport", "portforward"]);
    assert!(out.status.success(), "up --transport portforward:\n{}", show(&out));
    assert_eq!(status(&lab)["transport"], "portforward");
    let l = lab.laptop().to_string();
    let page = lab.exec(&l, &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"]);
    assert!(stdout(&page).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&page));
    let routes_before = stdout(&lab.exec(&l, &["ip", "route", "show", "dev", "tpvpn0"]));
    lab.restart_apiserver().unwrap();
    // The daemon notices the stream's end and comes back through a new port-forward.
    let back = tpvpn_lab::wait_until(Duration::from_secs(30), || {
        let out = lab.exec(&l, &["curl", "-sS", "--max-time", "3", "http://10.96.0.10/"]);
        stdout(&out).contains(tpvpn_lab::FRONTEND_BODY)
    });
    assert!(back, "not reconnected after the API server restart; apiserver log:\n{}", lab.apiserver_log());
    let v = status(&lab);
    assert_eq!(v["connected"], true, "{v}");
    assert_eq!(v["transport"], "portforward", "{v}");
    let portforwards = lab.apiserver_log().matches("portforward /api/v1/namespaces/tpvpn/pods/").count();
    assert!(portforwards >= 1, "no port-forward after the restart:\n{}", lab.apiserver_log());
    // Routes stayed in place throughout.
    assert_eq!(stdout(&lab.exec(&l, &["ip", "route", "show", "dev", "tpvpn0"])), routes_before);
}

#[test]
fn a_user_without_pods_portforward_gets_one_line_naming_it() {
    let Some(mut lab) = lab() else { return };
    // A manager that signs no certificates: the user reads the shared token, then port-forwards.
    lab.restart_manager_with(&[], &["--auth", "token"]).unwrap();
    let out = up_kube(&lab, &["--context", "lab-no-portforward", "--transport", "portforward"]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("pods/portforward")).unwrap_or_else(|| panic!("{}", show(&out)));
    assert!(line.contains("lab-no-portforward") && line.contains("tpvpn-client"), "{line}");
}

#[test]
fn no_ready_manager_pod_and_a_port_nothing_listens_on_each_get_one_line() {
    let Some(lab) = lab() else { return };
    let pod_path = format!("/api/v1/namespaces/tpvpn/pods/{}", tpvpn_lab::MANAGER_POD);
    // The Service's `tunnel` port targets a pod port nothing listens on.
    let svc_path = "/api/v1/namespaces/tpvpn/services/tpvpn-manager";
    let svc = lab.kube_apply("GET", svc_path, None).unwrap();
    let mut ports = svc["spec"]["ports"].clone();
    ports[1]["targetPort"] = serde_json::json!(4444);
    lab.kube_apply("PATCH", svc_path, Some(&serde_json::json!({"spec": {"ports": ports}}))).unwrap();
    let out = up_kube(&lab, &["--transport", "portforward"]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("port-forward to pod")).unwrap_or_else(|| panic!("{}", show(&out)));
    assert!(
        line.contains("4444") && line.contains("connection refused") && line.contains("kubectl -n tpvpn logs"),
        "{line}"
    );
    // The manager's pod is not Ready.
    let not_ready = serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    lab.kube_apply("PATCH", &pod_path, Some(&not_ready)).unwrap();
    let out = up_kube(&lab, &["--transport", "portforward"]);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("no Ready pod")).unwrap_or_else(|| panic!("{}", show(&out)));
    assert!(line.contains("kubectl -n tpvpn get pods"), "{line}");
}

#[test]
fn a_rescheduled_manager_pod_is_found_again() {
    let Some(mut lab) = lab() else { return };
    let out = up_kube(&lab, &["--transport", "portforward"]);
    assert!(out.status.success(), "up --transport portforward:\n{}", show(&out));
    assert_eq!(status(&lab)["manager_pod"], format!("tpvpn/{}", tpvpn_lab::MANAGER_POD));
    // The manager moves to a new pod: the new Pod object, the old one gone, the process
    // restarted (its connections end, as they would with the old pod).
    let pods = "/api/v1/namespaces/tpvpn/pods";
    let mut pod = lab.kube_apply("GET", &format!("{pods}/{}", tpvpn_lab::MANAGER_POD), None).unwrap();
    pod["metadata"] =
        serde_json::json!({"name": "tpvpn-manager-1", "namespace": "tpvpn", "labels": pod["metadata"]["labels"]});
    lab.kube_apply("POST", pods, Some(&pod)).unwrap();
    lab.kube_apply("DELETE", &format!("{pods}/{}", tpvpn_lab::MANAGER_POD), None).unwrap();
    lab.stop_manager();
    lab.start_manager().unwrap();
    let l = lab.laptop().to_string();
    let moved = tpvpn_lab::wait_until(Duration::from_secs(30), || {
        let v = status(&lab);
        v["connected"] == true && v["manager_pod"] == "tpvpn/tpvpn-manager-1"
    });
    assert!(moved, "not reconnected to the new pod: {}", status(&lab));
    let page = lab.exec(&l, &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"]);
    assert!(stdout(&page).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&page));
}
