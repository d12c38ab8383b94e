//! Intercepts end to end, in the lab with real pods (`tpvpn_lab::pods`): the node agent
//! captures a Service's pods with nftables `tproxy`, the cluster caller's connections
//! reach a server on the laptop, `leave` gives them back, and nothing of the workload
//! changes. Needs root.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tpvpn_lab::pods::{ALT_PORT, CALLER_IP, H2_PORT, HTTP_PORT, WEB_IP};
use tpvpn_lab::{show, wait_until, Lab};

/// Pod `pod`'s IP (the CNI's choice).
fn ip(lab: &Lab, pod: &str) -> String {
    lab.pod_ip(pod).unwrap_or_else(|| panic!("no pod {pod}")).to_string()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

/// curl from the caller pod.
fn curl(lab: &Lab, url: &str) -> Output {
    lab.exec_timeout(lab.caller(), &["curl", "-sS", "--max-time", "5", url], Duration::from_secs(10))
}

#[track_caller]
fn assert_answers(lab: &Lab, url: &str, body: &str) {
    let out = curl(lab, url);
    assert!(
        out.status.success() && stdout(&out).contains(body),
        "{url} from the caller pod should answer {body:?}:\n{}\nagent log:\n{}\nmanager log:\n{}",
        show(&out),
        lab.agent_log(),
        lab.manager_log()
    );
}

fn intercept(lab: &Lab, args: &[&str]) -> Output {
    let mut all = vec!["intercept"];
    all.extend_from_slice(args);
    lab.tpvpn_env(&all, &[], Duration::from_secs(40))
}

/// The pods' objects as the API stand-in has them: name to resourceVersion.
fn pod_versions(lab: &Lab) -> Vec<(String, String)> {
    let list = lab.kube_apply("GET", "/api/v1/namespaces/default/pods", None).expect("list pods");
    let mut v: Vec<(String, String)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                p["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The capture tables in `pod`'s namespace (beside each, while connections made through
/// it may be open, its replies table).
fn captures(lab: &Lab, pod: &str) -> usize {
    lab.capture_tables(pod).iter().filter(|t| !t.ends_with("-replies")).count()
}

fn nginx_pid(lab: &Lab, pod: &str) -> String {
    std::fs::read_to_string(lab.dir().join("pods").join(pod).join("nginx.pid")).unwrap_or_default()
}

#[test]
fn a_global_intercept_takes_every_pod_and_leave_gives_them_back() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let pods =
        [format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0")), format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-1"))];
    assert_answers(&lab, &pods[0], "pod web-0");
    assert_answers(&lab, &pods[1], "pod web-1");
    let versions = pod_versions(&lab);
    let pids = [nginx_pid(&lab, "web-0"), nginx_pid(&lab, "web-1")];

    let env_file = lab.dir().join("web.env");
    let env_json = lab.dir().join("web.json");
    let out = intercept(
        &lab,
        &[
            "web",
            "--port",
            "18888:http",
            "--env-file",
            &env_file.display().to_string(),
            "--env-json",
            &env_json.display().to_string(),
        ],
    );
    assert_ok(&out, "tpvpn intercept web");
    let said = stdout(&out);
    assert!(said.contains("web-0") && said.contains("web-1") && said.contains("127.0.0.1:18888"), "{said}");

    // Every pod, by its IP and through the Service's ClusterIP, answers from the laptop.
    for url in pods.iter().cloned().chain([format!("http://{WEB_IP}/"), format!("http://{WEB_IP}/")]) {
        assert_answers(&lab, &url, "answered by the laptop");
    }
    // The other port of the same pods is not intercepted.
    assert_answers(&lab, &format!("http://{}:{ALT_PORT}/", ip(&lab, "web-0")), "pod web-0");

    // The environment of the container serving the port, as the kubelet resolved it.
    let env = std::fs::read_to_string(&env_file).unwrap();
    for (k, v) in lab.pod_env("web-0").into_iter().filter(|(k, _)| !["DB_PASSWORD", "DB_URL"].contains(&k.as_str())) {
        assert!(env.lines().any(|l| l == format!("{k}={v}")), "{k}={v} missing from the env-file:\n{env}");
    }
    // A value from a Secret is never handed to the laptop, nor one the kubelet built from
    // it (`DB_URL: postgres://app:$(DB_PASSWORD)@db/app`), and the user is told.
    assert!(!env.contains("DB_PASSWORD") && !env.contains(tpvpn_lab::pods::SECRET_VALUE), "{env}");
    assert!(!env.contains("DB_URL"), "{env}");
    assert!(said.contains("from Secrets not copied (DB_PASSWORD, DB_URL)"), "{said}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o077, 0, "the env-file is private");
    // The agent's own listener in the pod, reached directly, is refused, never relayed.
    let ports = lab.exec(lab.pod_ns("web-0").unwrap(), &["ss", "-Hltn"]);
    let listener = stdout(&ports)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.rsplit_once(':')?.1.parse::<u16>().ok())
        .find(|p| ![HTTP_PORT, ALT_PORT, H2_PORT].contains(p))
        .expect("the agent's transparent listener");
    let out = from_caller(&lab, &["reset", &format!("{}:{listener}", ip(&lab, "web-0"))]);
    assert_eq!(stdout(&out).trim(), "reset", "{}", show(&out));
    assert!(env.contains("SELF_URL=http://web-0:8080/"), "$(VAR) expanded:\n{env}");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&env_json).unwrap()).unwrap();
    assert_eq!(json["GREETING"], tpvpn_lab::pods::GREETING);

    // list and status say so.
    let list = lab.tpvpn(&["list", "-o", "json"]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap_or_else(|_| panic!("{}", show(&list)));
    let web = v["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").cloned().unwrap();
    assert!(web["intercept"].as_str().unwrap_or_default().contains("(you)"), "{web}");
    let mesh = v["services"].as_array().unwrap().iter().find(|s| s["name"] == "mesh").cloned().unwrap();
    assert_eq!(mesh["intercept"], "ready", "{mesh}");
    let status = lab.tpvpn(&["status", "-o", "json"]);
    let s: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["intercepts"][0]["spec"]["service"], "web", "{s}");
    assert_eq!(s["intercepts"][0]["targets"].as_array().map(Vec::len), Some(2), "{s}");

    let out = lab.tpvpn(&["leave", "web"]);
    assert_ok(&out, "tpvpn leave web");
    assert_answers(&lab, &pods[0], "pod web-0");
    assert_answers(&lab, &pods[1], "pod web-1");
    assert!(
        wait_until(Duration::from_secs(5), || lab.capture_tables("web-0").is_empty()
            && lab.capture_tables("web-1").is_empty()),
        "capture tables left after leave: {:?} {:?}",
        lab.capture_tables("web-0"),
        lab.capture_tables("web-1")
    );
    // No workload was touched: same objects, same processes.
    assert_eq!(pod_versions(&lab), versions, "a Pod object changed");
    assert_eq!([nginx_pid(&lab, "web-0"), nginx_pid(&lab, "web-1")], pids, "a pod's server restarted");
    let _ = CALLER_IP;
}

#[test]
fn a_stuck_agent_gives_the_pods_back_within_seconds() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let pod = format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0"));
    assert_ok(&intercept(&lab, &["web", "--port", "18888:http"]), "intercept");
    assert_answers(&lab, &pod, "answered by the laptop");
    // Stopped, not dead: its listening sockets stay, nobody accepts on them, and the rules
    // keep steering new connections there. Its watchdog notices and removes the rules.
    lab.signal_agent(nix::sys::signal::Signal::SIGSTOP).expect("the agent runs");
    assert!(
        wait_until(Duration::from_secs(10), || lab.capture_tables("web-0").is_empty()
            && lab.capture_tables("web-1").is_empty()),
        "the rules of a stuck agent stay:\n{}",
        lab.agent_log()
    );
    assert_answers(&lab, &pod, "pod web-0");
    assert!(lab.agent_log().contains("made no progress"), "{}", lab.agent_log());
    // The stuck agent was ended; a new one (the DaemonSet's restart) captures again.
    lab.start_agent().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || stdout(&curl(&lab, &pod)).contains("answered by the laptop")),
        "the new agent did not capture again:\n{}",
        lab.agent_log()
    );
}

#[test]
fn hundreds_of_slow_callers_do_not_take_the_pods_down() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    // The agent with the soft descriptor limit a container may start with (containerd 2.0
    // gives 1,024; smaller here, for fewer connections to make the point).
    lab.start_agent_with(&["prlimit", "--nofile=256:"], &[]).unwrap();
    lab.start_laptop_web(18801, "laptop-a\n").unwrap();
    let a = intercept(&lab, &["web", "--port", "18801:http", "--http-header", "x-dev=a"]);
    assert_ok(&a, "a personal intercept: every connection to the pods is parsed");
    // 600 connections that trickle a request head (slowloris), held 8 s, from one caller.
    let slow = "b'GET / HTTP/1.1\\r\\nHost: web\\r\\nX-Slow: '";
    lab.hold_callers("slowloris", 600, slow, false, Duration::from_secs(8))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log()));
    // The pods' own traffic keeps flowing (past the parsing caps, connections pass whole).
    for _ in 0..5 {
        assert_answers(&lab, &format!("http://{WEB_IP}/"), "pod web-");
    }
    // Once the slow callers are gone, requests are routed per header again.
    assert!(
        wait_until(Duration::from_secs(15), || lab.background_log("slowloris").contains("closed")),
        "{}",
        lab.background_log("slowloris")
    );
    let routed = || {
        let out = lab.exec_timeout(
            lab.caller(),
            &["curl", "-sS", "--max-time", "5", "-H", "x-dev: a", &format!("http://{WEB_IP}/")],
            Duration::from_secs(10),
        );
        stdout(&out).contains("laptop-a")
    };
    assert!(wait_until(Duration::from_secs(10), routed), "{}", lab.agent_log());
}

#[test]
fn a_pod_restarting_right_after_leave_binds_its_port() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    assert_ok(&intercept(&lab, &["web", "--port", "18888:http"]), "tpvpn intercept web");
    // Callers that read until the server closes (HTTP/1.0): the laptop's side closes first,
    // so the agent's end of each connection, which carries the pod's own address and port,
    // is left in TIME-WAIT in the pod's namespace.
    let script = format!(
        "import socket\nfor _ in range(3):\n  s = socket.create_connection(('{}', {HTTP_PORT}), timeout=5)\n  s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n  d = b''\n  while True:\n    b = s.recv(65536)\n    if not b: break\n    d += b\n  print(d.decode().splitlines()[-1])\n  s.close()\n",
        ip(&lab, "web-0")
    );
    let out = lab.exec_timeout(lab.caller(), &[tpvpn_lab::pods::PYTHON, "-c", &script], Duration::from_secs(30));
    assert_eq!(stdout(&out).matches("answered by the laptop").count(), 3, "{}", show(&out));
    let ns = lab.pod_ns("web-0").unwrap().to_string();
    let waiting = stdout(&lab.exec(&ns, &["ss", "-Htan", "state", "time-wait"]));
    assert!(
        waiting.contains(&format!("{}:{HTTP_PORT}", ip(&lab, "web-0"))),
        "the agent's sockets are in TIME-WAIT:\n{waiting}"
    );

    assert_ok(&lab.tpvpn(&["leave", "web"]), "tpvpn leave web");
    // (`leave` returns once the manager released the captures; the agent removes its rules
    // a moment later. Until then new connections would still pass through it.)
    assert!(
        wait_until(Duration::from_secs(5), || lab.capture_tables("web-0").is_empty()),
        "{:?}",
        lab.capture_tables("web-0")
    );
    // The container restarts (a crash, a rollout) and binds its port at once.
    lab.restart_pod_server("web-0").unwrap_or_else(|e| panic!("the pod's server cannot bind its port again: {e:#}"));
    assert_answers(&lab, &format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0")), "pod web-0");
}

/// Runs a lab client (`tpvpn-lab client ...`) in the caller pod.
fn from_caller(lab: &Lab, args: &[&str]) -> Output {
    let mut all = vec!["client"];
    all.extend_from_slice(args);
    lab.lab_tool(lab.caller(), &all)
}

#[test]
fn numeric_target_ports_bytes_both_ways_new_pods_and_a_refusing_laptop() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_servers(19001, 19003).unwrap();
    let alt = |ip: &str| format!("{ip}:{ALT_PORT}");
    const BIG: &str = "33554432";

    // Port 81 targets 8081 by number; the laptop's sink hashes what it gets.
    assert_ok(&intercept(&lab, &["web", "--port", "19001:alt"]), "intercept web alt -> sink");
    let out = from_caller(&lab, &["upload", &alt(&ip(&lab, "web-0")), BIG]);
    assert_ok(&out, "32 MiB from the caller to the laptop's sink (half-closed, then its reply)");
    assert_ok(&lab.tpvpn(&["leave", "web"]), "leave");

    assert_ok(&intercept(&lab, &["web", "--port", "19003:81"]), "intercept web 81 -> source");
    let out = from_caller(&lab, &["download", &alt(&ip(&lab, "web-1")), BIG]);
    assert_ok(&out, "32 MiB from the laptop's source to the caller, byte for byte");

    // A pod that becomes ready while intercepted is intercepted too.
    let new = tpvpn_lab::pods::PodSpec { name: "web-2".into(), app: "web".into(), meshed: false };
    lab.add_pod(&new).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !lab.capture_tables("web-2").is_empty()),
        "the new pod was not captured:\nagent log:\n{}\nmanager log:\n{}",
        lab.agent_log(),
        lab.manager_log()
    );
    assert_ok(&from_caller(&lab, &["download", &alt(&ip(&lab, "web-2")), "1048576"]), "download from the new pod");
    assert_ok(&lab.tpvpn(&["leave", "web"]), "leave");

    // Nothing listens on the laptop's port: the caller sees a reset, not a hang.
    assert_ok(&intercept(&lab, &["web", "--port", "19999:http"]), "intercept to a closed laptop port");
    let out = from_caller(&lab, &["reset", &format!("{}:{HTTP_PORT}", ip(&lab, "web-0"))]);
    assert_eq!(stdout(&out).trim(), "reset", "{}", show(&out));
    assert_ok(&lab.tpvpn(&["leave", "web"]), "leave");
    assert_answers(&lab, &format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0")), "pod web-0");
}

#[test]
fn clear_errors_and_one_holder_per_port() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    let fails = |lab: &Lab, args: &[&str], want: &str| {
        let out = intercept(lab, args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains(want),
            "intercept {args:?}: expected an error with {want:?}:\n{}",
            show(&out)
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    };
    fails(&lab, &["nope", "--port", "18888"], "no Service default/nope");
    fails(&lab, &["web", "--port", "18888:grpc"], "has no port grpc");
    fails(&lab, &["web", "--port", "18888"], "several ports");
    fails(&lab, &["web", "--port", "x:http"], "LOCAL must be a port number");
    // frontend's pod is not a real pod (no agent there: it is not registered Ready).
    fails(&lab, &["frontend", "--port", "18888"], "no ready pods");
    // The cluster's own namespaces and the manager's are not interceptable (the cluster DNS,
    // the manager's port-forward port), whatever the Service.
    fails(&lab, &["kube-dns", "-n", "kube-system", "--port", "18888:53"], "namespace kube-system is not interceptable");
    fails(&lab, &["tpvpn-manager", "-n", "tpvpn", "--port", "18888:tunnel"], "namespace tpvpn is not interceptable");

    assert_ok(&intercept(&lab, &["web", "--port", "18888:http"]), "first laptop intercepts");
    lab.add_second_laptop().unwrap();
    let up = lab.tpvpn2_up().unwrap_or_else(|e| panic!("{e:#}"));
    assert_ok(&up, "second laptop up");
    let out = lab.tpvpn2(&["intercept", "web", "--port", "18888:http"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(err.contains("is intercepted by") && err.contains("since") && err.contains("port 80"), "{err}");
    // Its own list names the holder, and not as itself.
    let list = lab.tpvpn2(&["list"]);
    let line = stdout(&list).lines().find(|l| l.contains(" web ")).map(str::to_string).unwrap_or_default();
    assert!(line.contains("intercepted by") && !line.contains("(you)"), "{}", show(&list));
    // Another port of the same Service is free.
    assert_ok(&lab.tpvpn2(&["intercept", "web", "--port", "18889:alt"]), "second laptop takes the other port");
    assert_ok(&lab.tpvpn2(&["leave", "web"]), "second laptop leaves");
    let _ = lab.tpvpn2(&["down"]);

    // No agent on the pods' node.
    lab.stop_agent();
    assert!(wait_until(Duration::from_secs(5), || lab.manager_log().contains("agent gone")), "{}", lab.manager_log());
    fails(&lab, &["mesh", "--port", "18888"], "no tpvpn agent on node lab-node");
}

#[test]
fn an_agent_that_loses_the_manager_removes_its_rules() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    assert_ok(&intercept(&lab, &["web", "--port", "18888:http"]), "intercept");
    assert_eq!(captures(&lab, "web-0"), 1);
    lab.stop_manager();
    assert!(
        wait_until(Duration::from_secs(31), || lab.capture_tables("web-0").is_empty()
            && lab.capture_tables("web-1").is_empty()),
        "the agent kept its rules without a manager:\n{}",
        lab.agent_log()
    );
    assert_answers(&lab, &format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0")), "pod web-0");
    assert!(lab.agent_log().contains("lost the manager"), "{}", lab.agent_log());
}

#[test]
fn losing_the_agent_or_the_laptop_gives_the_pods_back_and_a_new_daemon_reclaims() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let pod = format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0"));
    assert_ok(&intercept(&lab, &["web", "--port", "18888:http"]), "intercept");
    assert_answers(&lab, &pod, "answered by the laptop");

    // The agent dies without cleaning up: its rules stay, its sockets go, and the kernel
    // delivers to the app again at once (fail open).
    lab.kill_agent();
    assert!(!lab.capture_tables("web-0").is_empty(), "SIGKILL leaves the table (what fail-open is about)");
    assert_answers(&lab, &pod, "pod web-0");
    // A new agent removes what the old one left and captures again for the manager.
    lab.start_agent().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || stdout(&curl(&lab, &pod)).contains("answered by the laptop")),
        "the new agent did not capture again:\n{}",
        lab.agent_log()
    );
    assert_eq!(captures(&lab, "web-0"), 1, "one capture table: the stale one was removed");

    // The laptop's daemon dies. Meanwhile a captured connection whose owner does not
    // answer goes on to the pod; within the QUIC idle timeout (30 s) and a second the
    // manager notices and releases the capture altogether.
    let pid = std::fs::read_to_string(lab.runtime_dir().join("tpvpn.pid")).unwrap();
    assert!(lab.exec(lab.laptop(), &["kill", "-9", pid.trim()]).status.success());
    let killed = std::time::Instant::now();
    assert_answers(&lab, &pod, "pod web-0");
    assert!(
        wait_until(Duration::from_secs(31), || lab.capture_tables("web-0").is_empty()),
        "the capture was not released after the daemon died:\n{}",
        lab.manager_log()
    );
    eprintln!("capture released {:?} after the kill", killed.elapsed());
    assert_answers(&lab, &pod, "pod web-0");
    // Within 60 s, `tpvpn up` again re-claims it without being asked.
    if let Err(e) = lab.up(&[]) {
        panic!("up again: {e:#}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || stdout(&curl(&lab, &pod)).contains("answered by the laptop")),
        "the new daemon did not re-claim the intercept:\n{}",
        lab.manager_log()
    );
    let s: Value = serde_json::from_slice(&lab.tpvpn(&["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(s["intercepts"][0]["spec"]["service"], "web", "{s}");
    // `down` leaves it first.
    assert_ok(&lab.tpvpn(&["down"]), "down");
    assert_answers(&lab, &pod, "pod web-0");
    assert_eq!(captures(&lab, "web-0"), 0, "down left a capture table");
    assert!(
        wait_until(Duration::from_secs(5), || lab.capture_tables("web-0").is_empty()),
        "a replies table outlived its connections: {:?}",
        lab.capture_tables("web-0")
    );
}

#[test]
fn a_meshed_pod_is_captured_behind_its_sidecar() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let pod = format!("http://{}:{HTTP_PORT}/", ip(&lab, "mesh-0"));
    assert_answers(&lab, &pod, "pod mesh-0");
    let relayed = || lab.sidecar_log("mesh-0").lines().filter(|l| l.starts_with("sidecar:")).count();
    let before = relayed();
    assert!(before >= 1, "the request went through the sidecar stand-in:\n{}", lab.sidecar_log("mesh-0"));

    let env_file = lab.dir().join("mesh.env");
    let out = intercept(&lab, &["mesh", "--port", "18888", "--env-file", &env_file.display().to_string()]);
    assert_ok(&out, "intercept mesh");
    // The sidecar is a container of its own, as uid 1337 (what istio-init's rules exempt).
    let ss = lab.exec(lab.pod_ns("mesh-0").unwrap(), &["ss", "-Hltne", "sport", "= :15006"]);
    assert!(stdout(&ss).contains(" uid:1337 "), "{}", show(&ss));
    assert!(stdout(&out).contains("behind its mesh sidecar"), "{}", show(&out));
    // A variable too large for the frames that carry it is left out, with a note; the
    // rest of the environment arrives and the node's agent keeps its captures.
    assert!(stdout(&out).contains("too large to copy") && stdout(&out).contains("LARGE_CONFIG"), "{}", show(&out));
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(env.contains("GREETING=") && !env.contains("LARGE_CONFIG"), "{env}");
    // The pod has two containers: the environment is the one of the container serving
    // the port (nginx's), never the sidecar's.
    assert!(!env.contains(tpvpn_lab::pods::SIDECAR_ENV.0), "the sidecar container's environment:\n{env}");
    assert!(!lab.agent_log().contains("lost the manager"), "{}", lab.agent_log());
    assert_answers(&lab, &pod, "answered by the laptop");
    assert_answers(&lab, &format!("http://{}/", tpvpn_lab::pods::MESH_IP), "answered by the laptop");
    // The sidecar's lines reach its log through containerd's shim, a moment after the answer.
    let logged = |count: usize| wait_until(Duration::from_secs(5), || relayed() >= count);
    assert!(
        logged(before + 2),
        "intercepted requests still pass the sidecar (mTLS, policy):\n{}",
        lab.sidecar_log("mesh-0")
    );

    assert_ok(&lab.tpvpn(&["leave", "mesh"]), "leave");
    let n = relayed();
    assert_answers(&lab, &pod, "pod mesh-0");
    logged(n + 1);
    assert_eq!(relayed(), n + 1, "after leave, requests go through the sidecar to the app as before");
}

/// The network namespaces the agent's threads are in or hold open (by inode).
fn agent_namespaces(lab: &Lab) -> Vec<u64> {
    let Some(pid) = lab.agent_pid() else { return vec![] };
    let inode = |link: std::path::PathBuf| {
        let target = std::fs::read_link(link).ok()?;
        target.to_str()?.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
    };
    let dirs = |p: String| std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path());
    let threads = dirs(format!("/proc/{pid}/task")).filter_map(|t| inode(t.join("ns/net")));
    threads.chain(dirs(format!("/proc/{pid}/fd")).filter_map(inode)).collect()
}

#[test]
fn a_container_restart_and_a_pod_deletion_while_intercepted() {
    use std::os::unix::fs::MetadataExt;
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    assert_ok(&intercept(&lab, &["web", "--port", "18888:http"]), "intercept");
    let web0 = format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0"));
    assert_answers(&lab, &web0, "answered by the laptop");

    // The kubelet restarts web-0's container: a new container id in the same sandbox
    // (and network namespace), which the Pod's status then names. The pod stays captured.
    let old = lab.pod_container_id("web-0").unwrap().to_string();
    lab.restart_pod_server("web-0").unwrap_or_else(|e| panic!("restart: {e:#}\n{}", lab.agent_log()));
    assert_ne!(lab.pod_container_id("web-0").unwrap(), old, "a restarted container has a new id");
    assert_answers(&lab, &web0, "answered by the laptop");
    assert_eq!(captures(&lab, "web-0"), 1, "{:?}", lab.capture_tables("web-0"));

    // web-1 is deleted while captured: the agent lets go of its namespace (no thread in
    // it, no handle on it), and the Service keeps going to the laptop through web-0.
    let ns = lab.pod_ns("web-1").unwrap().to_string();
    let inode = std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino();
    assert!(agent_namespaces(&lab).contains(&inode), "the agent works in web-1's namespace while it is captured");
    lab.delete_pod("web-1").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !agent_namespaces(&lab).contains(&inode)),
        "the agent still holds the deleted pod's network namespace:\n{}",
        lab.agent_log()
    );
    assert_answers(&lab, &format!("http://{WEB_IP}/"), "answered by the laptop");
    assert_ok(&lab.tpvpn(&["leave", "web"]), "leave");
    assert_answers(&lab, &web0, "pod web-0");
    assert!(
        wait_until(Duration::from_secs(5), || lab.capture_tables("web-0").is_empty()),
        "{:?}\n{}",
        lab.capture_tables("web-0"),
        lab.agent_log()
    );
}

#[test]
fn uninstall_leaves_no_agent_and_no_capture_table() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    assert_ok(&intercept(&lab, &["web", "--port", "18888:http"]), "intercept");
    assert_answers(&lab, &format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0")), "answered by the laptop");
    let kc = lab.kubeconfig().display().to_string();
    let kube = |lab: &Lab, args: &[&str]| lab.tpvpn_env(args, &[("KUBECONFIG", kc.as_str())], Duration::from_secs(60));
    let out = kube(&lab, &["manager", "install"]);
    assert_ok(&out, "tpvpn manager install");
    let ds = lab
        .kube_apply("GET", "/apis/apps/v1/namespaces/tpvpn-agents/daemonsets/tpvpn-agent", None)
        .expect("the DaemonSet");
    assert_eq!(ds["spec"]["template"]["spec"]["hostPID"], true);
    let secret =
        lab.kube_apply("GET", "/api/v1/namespaces/tpvpn-agents/secrets/tpvpn-agent", None).expect("the agent Secret");
    assert!(secret["data"]["ca.crt"].is_string() && secret["data"].get("token").is_none(), "{secret}");
    assert_eq!(ds["spec"]["template"]["spec"]["serviceAccountName"], "tpvpn-agent");
    assert!(lab.kubelet_sync_agent("tpvpn-agents").unwrap(), "the agent runs while its DaemonSet exists");

    assert_ok(&kube(&lab, &["manager", "uninstall"]), "tpvpn manager uninstall");
    assert!(!lab.kubelet_sync_agent("tpvpn-agents").unwrap(), "the DaemonSet is gone, and so is its pod");
    assert!(lab.agent_log().contains("every capture removed"), "{}", lab.agent_log());
    for pod in ["web-0", "web-1", "mesh-0"] {
        assert!(lab.capture_tables(pod).is_empty(), "{pod} kept {:?}", lab.capture_tables(pod));
    }
    assert_answers(&lab, &format!("http://{}:{HTTP_PORT}/", ip(&lab, "web-0")), "pod web-0");
}

/// Audit B-5: callers of a global intercept that ask the laptop for much and never read
/// hold only that intercept's streams. Before, they filled the flow-control window the
/// developer's whole tunnel shares: every outbound flow and cluster DNS query stalled.
#[test]
fn callers_that_never_read_do_not_freeze_the_developers_tunnel() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_servers(18901, 18903).unwrap();
    assert_ok(&intercept(&lab, &["web", "--port", "18903:http"]), "intercept web to the laptop's source");
    // 64 callers ask the laptop's source for 32 MiB each with a 4 KiB receive buffer, and
    // never read; held 25 s.
    lab.hold_callers("stalled", 64, "(32 << 20).to_bytes(8, 'big')", true, Duration::from_secs(25)).unwrap();
    // Time for the laptop's answers to fill every window they can.
    std::thread::sleep(Duration::from_secs(3));
    let frontend = format!("http://{}/", tpvpn_lab::FRONTEND_IP);
    for _ in 0..3 {
        let out =
            lab.exec_timeout(lab.laptop(), &["curl", "-sS", "--max-time", "5", &frontend], Duration::from_secs(10));
        assert!(
            out.status.success(),
            "the laptop's own flows stall:\n{}\nmanager log:\n{}",
            show(&out),
            lab.manager_log()
        );
        let dig =
            lab.exec(lab.laptop(), &["dig", "+short", "+time=3", "+tries=1", "frontend.default.svc.cluster.local"]);
        assert!(stdout(&dig).contains(tpvpn_lab::FRONTEND_IP), "cluster DNS stalls:\n{}", show(&dig));
    }
}

/// Audit B-5, the laptop's side: callers of one of a developer's intercepts that ask for
/// much and never read stall only their own streams. Before, they filled the windows of
/// the laptop's intercepts connection, which all that developer's intercepts share: the
/// developer's other intercepts stopped answering (their callers went to the pods).
#[test]
fn callers_that_never_read_stall_none_of_the_developers_other_intercepts() {
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_servers(18901, 18903).unwrap();
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    assert_ok(&intercept(&lab, &["web", "--port", "18903:http"]), "intercept web to the laptop's source");
    assert_ok(&intercept(&lab, &["mesh", "--port", "18888"]), "intercept mesh to the laptop's nginx");
    // 64 callers ask the laptop's source for 32 MiB each with a 4 KiB receive buffer, and
    // never read; held 25 s.
    lab.hold_callers("stalled", 64, "(32 << 20).to_bytes(8, 'big')", true, Duration::from_secs(25)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let mesh = format!("http://{}/", tpvpn_lab::pods::MESH_IP);
    for _ in 0..3 {
        let out = curl(&lab, &mesh);
        assert!(
            stdout(&out).contains("answered by the laptop"),
            "the developer's other intercept stalls:\n{}\nmanager log:\n{}",
            show(&out),
            lab.manager_log()
        );
    }
}
