//! Personal intercepts in the lab: two laptops (two namespaces, two daemons) hold
//! personal intercepts of the same Service port (`x-dev: a`, `x-dev: b`); the node
//! agent routes each HTTP request (each HTTP/2 stream) by its headers, everything else
//! reaches the pod's own nginx, on the same connection. Needs root.

use std::process::Output;
use std::time::Duration;

use tpvpn_lab::pods::{BIG_LEN, CALLER_IP, GRPC_PORT, H2_PORT, NODE_IP, PYTHON, RPC_SCRIPT, WEB_IP, WS_PORT};
use tpvpn_lab::{show, wait_until, Lab};

/// Pod `pod`'s IP (the CNI's choice).
fn ip(lab: &Lab, pod: &str) -> String {
    lab.pod_ip(pod).unwrap_or_else(|| panic!("no pod {pod}")).to_string()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

/// The lab with pods, both laptops up, and each laptop's nginx (HTTP/1 on `PORT`,
/// HTTP/2 over cleartext on `PORT + 10`) answering `laptop-a` / `laptop-b`.
fn two_laptops() -> Option<Lab> {
    let mut lab = tpvpn_lab::lab_or_skip()?;
    if !lab.start_pods_or_skip() {
        return None;
    }
    lab.up(&[]).unwrap_or_else(|e| panic!("tpvpn up: {e:#}\nmanager log:\n{}", lab.manager_log()));
    lab.add_second_laptop().unwrap();
    assert_ok(&lab.tpvpn2_up().unwrap(), "second laptop up");
    let (one, two) = (lab.laptop().to_string(), lab.laptop2().unwrap().to_string());
    lab.start_web_in(&one, 18801, Some(18811), "laptop-a").unwrap();
    lab.start_web_in(&two, 18802, Some(18812), "laptop-b").unwrap();
    Some(lab)
}

/// curl from the caller pod.
fn curl(lab: &Lab, args: &[&str]) -> Output {
    let mut all = vec!["curl", "-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    lab.exec_timeout(lab.caller(), &all, Duration::from_secs(30))
}

/// `tpvpn intercept web --port PORT --http-header x-dev=a` on the first laptop.
fn intercept_for_a(lab: &Lab, port: &str) -> Output {
    lab.tpvpn_env(&["intercept", "web", "--port", port, "--http-header", "x-dev=a"], &[], Duration::from_secs(40))
}

fn logs(lab: &Lab) -> String {
    format!("agent log:\n{}\nmanager log:\n{}", lab.agent_log(), lab.manager_log())
}

#[test]
fn each_request_lands_where_its_header_says_and_the_pod_keeps_the_rest() {
    let Some(lab) = two_laptops() else { return };
    let whoami = format!("http://{WEB_IP}/whoami");

    let a = intercept_for_a(&lab, "18801:http");
    assert_ok(&a, "laptop a intercepts for x-dev: a");
    assert!(stdout(&a).contains("callers send: x-dev: a"), "intercept prints the header to send:\n{}", show(&a));
    assert!(!stdout(&a).contains("nothing listens"), "laptop a's nginx listens:\n{}", show(&a));
    assert_ok(
        &lab.tpvpn2(&["intercept", "web", "--port", "18802:http", "--http-header", "x-dev=b"]),
        "laptop b intercepts the same port for x-dev: b",
    );
    // The same matchers again, by the other laptop: refused, naming the holder.
    let clash = lab.tpvpn2(&["intercept", "web", "--port", "18802:http", "--http-header", "X-Dev=a"]);
    let err = String::from_utf8_lossy(&clash.stderr).into_owned();
    assert!(!clash.status.success() && err.contains("for x-dev: a is intercepted by"), "{}", show(&clash));
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // One request each, on new connections.
    for (header, want) in [(Some("x-dev: a"), "laptop-a"), (Some("x-dev: b"), "laptop-b"), (None, "pod web-")] {
        let mut args = vec![];
        if let Some(h) = header {
            args.extend(["-H", h]);
        }
        args.push(&whoami);
        let out = curl(&lab, &args);
        assert!(stdout(&out).starts_with(want), "{header:?} should reach {want}:\n{}\n{}", show(&out), logs(&lab));
        // Host and path arrive as the caller sent them; a laptop learns the caller's address
        // from `X-Forwarded-For` (the pod sees it as the connection's source: nothing added).
        let xff = if header.is_some() { CALLER_IP } else { "" };
        assert!(stdout(&out).contains(&format!("host={WEB_IP} uri=/whoami xff={xff} dev=")), "{}", show(&out));
    }

    // A kubelet probe comes from the node's address (the Pod's hostIP): never captured, so
    // the pod answers it, header or not (and nothing was added to it).
    let probe = lab.exec_timeout(
        lab.cluster(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--interface",
            NODE_IP,
            "-H",
            "x-dev: a",
            &format!("http://{}:8080/whoami", ip(&lab, "web-0")),
        ],
        Duration::from_secs(10),
    );
    assert!(
        stdout(&probe).starts_with(&format!("pod web-0 host={} uri=/whoami xff= dev=a ", ip(&lab, "web-0"))),
        "a probe from the node must reach the pod untouched:\n{}",
        show(&probe)
    );
    // On bridge CNIs (flannel, kubenet) and Cilium probes come from another of the node's
    // addresses (the bridge's, `cilium_host`'s): every one is exempt, including one the
    // node gains after the capture began.
    let from_node = |addr: &str| {
        lab.exec_timeout(
            lab.cluster(),
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--interface",
                addr,
                "-H",
                "x-dev: a",
                &format!("http://{}:8080/whoami", ip(&lab, "web-0")),
            ],
            Duration::from_secs(10),
        )
    };
    let other = from_node("10.250.4.1");
    assert!(
        stdout(&other).starts_with("pod web-0 "),
        "a probe from another node address:\n{}\n{}\n{}",
        show(&other),
        show(&lab.exec(lab.pod_ns("web-0").unwrap(), &["nft", "list", "ruleset"])),
        show(&lab.exec(lab.cluster(), &["ip", "-br", "addr"]))
    );
    lab.exec(lab.cluster(), &["ip", "addr", "add", "10.250.7.1/32", "dev", "to-laptop2"]);
    assert!(
        wait_until(Duration::from_secs(10), || stdout(&from_node("10.250.7.1")).starts_with("pod web-0 ")),
        "a probe from an address the node gained later:\n{}\n{}",
        show(&from_node("10.250.7.1")),
        logs(&lab)
    );
    // A caller pod's request, header and all, is still the laptop's.
    let caller = curl(&lab, &["-H", "x-dev: a", &format!("http://{}:8080/whoami", ip(&lab, "web-0"))]);
    assert!(stdout(&caller).starts_with("laptop-a"), "{}", show(&caller));

    // Nobody takes another developer's requests by asking for more (or fewer) of the same
    // matchers: a superset, a subset, `/` (no path at all) are refused naming the holder.
    for extra in [&["--http-path-prefix", "/"][..], &["--http-path-prefix", "/api"], &["--http-header", "x-team=t"]] {
        let mut args = vec!["intercept", "web", "--port", "18802:http", "--http-header", "x-dev=a"];
        args.extend_from_slice(extra);
        let out = lab.tpvpn2(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains("for x-dev: a is intercepted by"), "{extra:?}:\n{}", show(&out));
    }
    // A path prefix alone would be a second global intercept; oversized matchers would not
    // fit the frames that carry them to the agent and into `list`.
    let out = lab.tpvpn2(&["intercept", "web", "--port", "18802:http", "--http-path-prefix", "/"]);
    assert!(!out.status.success() && stderr(&out).contains("needs at least one --http-header"), "{}", show(&out));
    let huge = format!("x-big={}", "v".repeat(40_000));
    let out = lab.tpvpn2(&["intercept", "web", "--port", "18802:http", "--http-header", &huge]);
    assert!(!out.status.success() && stderr(&out).contains("printable ASCII"), "{}", show(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line:\n{}", show(&out));
    let still = curl(&lab, &["-H", "x-dev: a", &whoami]);
    assert!(stdout(&still).starts_with("laptop-a"), "A keeps its requests:\n{}", show(&still));
    // A laptop's answer varies by the header that chose it (no shared cache serves it to
    // requests without it); the pod's answers are untouched.
    let headers = |args: &[&str]| {
        let mut all = vec!["-o", "/dev/null", "-D", "-"];
        all.extend_from_slice(args);
        stdout(&curl(&lab, &all)).to_ascii_lowercase()
    };
    assert!(
        headers(&["-H", "x-dev: a", &whoami]).contains("\nvary: x-dev\r"),
        "{}",
        headers(&["-H", "x-dev: a", &whoami])
    );
    assert!(!headers(&[&whoami]).contains("vary: x-dev"), "{}", headers(&[&whoami]));

    // One keep-alive connection: A, B (chunked), none, A again, each uploading 1 MiB, then
    // 1 MiB downloads from each, in that order on the same connection.
    let dir = lab.dir().join("personal");
    std::fs::create_dir_all(&dir).unwrap();
    let upload = dir.join("upload");
    std::fs::write(&upload, vec![b'u'; BIG_LEN]).unwrap();
    let up = format!("@{}", upload.display());
    let big = format!("http://{WEB_IP}/big");
    let file = |n: &str| dir.join(n).display().to_string();
    let (fa, fb, fn_) = (file("a.big"), file("b.big"), file("none.big"));
    let w = "%{num_connects} %{http_code}\n";
    #[rustfmt::skip]
    let args: Vec<&str> = vec![
        "-H", "x-dev: a", "--data-binary", &up, &whoami, "-w", w, "--next",
        "-H", "x-dev: b", "-H", "Transfer-Encoding: chunked", "--data-binary", &up, &whoami, "-w", w, "--next",
        "--data-binary", &up, &whoami, "-w", w, "--next",
        "-H", "x-dev: a", "--data-binary", &up, &whoami, "-w", w, "--next",
        "-H", "x-dev: a", &big, "-o", &fa, "-w", w, "--next",
        "-H", "x-dev: b", &big, "-o", &fb, "-w", w, "--next",
        &big, "-o", &fn_, "-w", w,
    ];
    let out = curl(&lab, &args);
    assert_ok(&out, "the keep-alive sequence");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 11, "four answers and seven status lines:\n{}\n{}", show(&out), logs(&lab));
    let answers = [lines[0], lines[2], lines[4], lines[6]];
    for (answer, want) in answers.iter().zip(["laptop-a", "laptop-b", "pod web-", "laptop-a"]) {
        assert!(answer.starts_with(want), "expected {want}: {answer}\n{text}");
    }
    // Content-Length passes unchanged (and the chunked body's framing held: the requests
    // after it on the connection were read as requests).
    for i in [0, 2, 3] {
        assert!(answers[i].ends_with(&format!("len={BIG_LEN}")), "{}", answers[i]);
    }
    let statuses: Vec<&str> = [1, 3, 5, 7, 8, 9, 10].iter().map(|i| lines[*i]).collect();
    assert_eq!(statuses[0], "1 200", "{text}");
    assert!(statuses[1..].iter().all(|s| *s == "0 200"), "every later request on the same connection:\n{text}");
    for (path, name) in [(&fa, "laptop-a"), (&fb, "laptop-b"), (&fn_, "pod web-")] {
        let got = std::fs::read(path).unwrap();
        assert_eq!(got.len(), BIG_LEN, "{path}");
        assert!(got.starts_with(name.as_bytes()), "{path}: {:?}", String::from_utf8_lossy(&got[..32]));
    }

    // HTTP/2 over cleartext with prior knowledge (as gRPC clients speak), routed per
    // stream. (Each from a connection of its own: curl 7.88 cannot reuse a
    // prior-knowledge connection, even to nginx alone.) Laptop a takes the h2 port too.
    assert_ok(&intercept_for_a(&lab, "18811:h2"), "laptop a intercepts the h2 port");
    let h2 = format!("http://{}:{H2_PORT}/whoami", ip(&lab, "web-0"));
    for (header, want) in [(Some("x-dev: a"), "laptop-a"), (None, "pod web-0"), (Some("x-dev: b"), "pod web-0")] {
        let mut args = vec!["--http2-prior-knowledge", "-w", "%{http_version}\n"];
        if let Some(h) = header {
            args.extend(["-H", h]);
        }
        args.push(&h2);
        let out = curl(&lab, &args);
        let text = stdout(&out);
        assert!(
            text.starts_with(want)
                && text.contains(&format!(
                    "host={} uri=/whoami xff={} ",
                    ip(&lab, "web-0"),
                    if want == "laptop-a" { CALLER_IP } else { "" }
                ))
                && text.ends_with("\n2\n"),
            "h2 {header:?} should reach {want} over HTTP/2:\n{}\n{}",
            show(&out),
            logs(&lab)
        );
    }

    // Not HTTP (a TLS ClientHello): passed to the pod's nginx untouched, which says so.
    let tls = lab.exec_timeout(
        lab.caller(),
        &[
            "bash",
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/8080; printf '\\x16\\x03\\x01\\x00\\x05hello' >&3; timeout 5 cat <&3",
                ip(&lab, "web-0")
            ),
        ],
        Duration::from_secs(10),
    );
    assert!(stdout(&tls).contains("400 Bad Request") && stdout(&tls).contains("nginx"), "{}", show(&tls));

    // `list` shows both holders with their headers.
    let list = stdout(&lab.tpvpn(&["list"]));
    assert!(list.contains("for x-dev: a") && list.contains("for x-dev: b"), "{list}");

    // Laptop b's daemon dies: its requests go back to the pod at once, a's keep arriving.
    let pid = std::fs::read_to_string(lab.runtime_dir2().join("tpvpn.pid")).unwrap();
    assert!(lab.exec(lab.laptop2().unwrap(), &["kill", "-9", pid.trim()]).status.success());
    let b = curl(&lab, &["-H", "x-dev: b", &whoami]);
    assert!(stdout(&b).starts_with("pod web-"), "b's requests go to the pod:\n{}\n{}", show(&b), logs(&lab));
    let a = curl(&lab, &["-H", "x-dev: a", &whoami]);
    assert!(stdout(&a).starts_with("laptop-a"), "{}", show(&a));
    // Once the manager notices (QUIC idle timeout), b's capture route is gone for good.
    assert!(wait_until(Duration::from_secs(40), || lab.manager_log().contains("owner disconnected")), "{}", logs(&lab));
    for (header, want) in [("x-dev: b", "pod web-"), ("x-dev: a", "laptop-a")] {
        let out = curl(&lab, &["-H", header, &whoami]);
        assert!(stdout(&out).starts_with(want), "{header} -> {want}:\n{}", show(&out));
    }

    // Leaving gives the pod everything back, with no table left.
    assert_ok(&lab.tpvpn(&["leave", "web"]), "leave");
    let out = curl(&lab, &["-H", "x-dev: a", &whoami]);
    assert!(stdout(&out).starts_with("pod web-"), "{}", show(&out));
    assert!(
        wait_until(Duration::from_secs(5), || ["web-0", "web-1"].iter().all(|p| lab.capture_tables(p).is_empty())),
        "a capture table is left:\n{}",
        logs(&lab)
    );
}

#[test]
fn grpc_calls_and_websockets_are_routed_by_their_header() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    if !lab.start_pods_or_skip() {
        return;
    }
    lab.up(&[]).unwrap_or_else(|e| panic!("tpvpn up: {e:#}\nmanager log:\n{}", lab.manager_log()));
    for pod in ["web-0", "web-1"] {
        lab.start_pod_rpc(pod).unwrap();
    }
    let laptop = lab.laptop().to_string();
    lab.start_rpc_in(&laptop, "laptop-a", "127.0.0.1", 18821, 18822).unwrap();
    for (port, what) in [("18821:rpc", "gRPC"), ("18822:ws", "WebSocket")] {
        assert_ok(&intercept_for_a(&lab, port), &format!("intercept the {what} port for x-dev: a"));
    }
    let py = |args: &[&str]| {
        let mut all = vec![PYTHON, RPC_SCRIPT];
        all.extend_from_slice(args);
        lab.exec_timeout(lab.caller(), &all, Duration::from_secs(60))
    };

    // One channel (one HTTP/2 connection), calls with and without the header in turn:
    // unary and server streaming each land where their metadata says.
    let target = format!("{}:{GRPC_PORT}", ip(&lab, "web-0"));
    let out = py(&["grpc-client", &target, "who:a", "who", "count:3:a", "count:2", "who:b", "who:a"]);
    assert_ok(&out, "the gRPC calls");
    let got: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(
        got,
        [
            "laptop-a dev=a",
            "pod web-0 dev=",
            "laptop-a 0 | laptop-a 1 | laptop-a 2",
            "pod web-0 0 | pod web-0 1",
            "pod web-0 dev=b",
            "laptop-a dev=a"
        ],
        "{}\n{}",
        show(&out),
        logs(&lab)
    );

    // Calls that start together on a new channel (its streams all arrive before any
    // upstream connection exists) share one upstream connection on each side.
    let out = py(&["grpc-client", &target, "burst:16:a", "burst:16"]);
    assert_eq!(
        stdout(&out),
        "16 calls, laptop-a, 1 connection(s)\n16 calls, pod web-0, 1 connection(s)\n",
        "{}\n{}",
        show(&out),
        logs(&lab)
    );

    // A WebSocket whose upgrade request matches is the laptop's for its whole life (1 MiB
    // binary message both ways); one without the header is the pod's.
    let url = format!("ws://{}:{WS_PORT}/ws", ip(&lab, "web-0"));
    let out = py(&["ws-client", &url, "a"]);
    assert_eq!(stdout(&out), "laptop-a: one\nlaptop-a: two\nbinary 1048576 same\n", "{}\n{}", show(&out), logs(&lab));
    let out = py(&["ws-client", &url]);
    assert_eq!(stdout(&out), "pod web-0: one\npod web-0: two\nbinary 1048576 same\n", "{}\n{}", show(&out), logs(&lab));

    // A request offering `Upgrade: h2c` (curl --http2, Java's HttpClient) reaches a laptop
    // server that would accept it: the agent declines the offer, so the connection stays
    // HTTP/1.1 and the next request on it, without the header, is still the pod's.
    let h2c = ["h2c-server", "laptop-a", "127.0.0.1", "18823"];
    lab.spawn_background(&laptop, "h2c", &[&[PYTHON, RPC_SCRIPT][..], &h2c].concat()).unwrap();
    assert!(wait_until(Duration::from_secs(10), || lab.background_log("h2c").contains("listening")), "h2c server");
    assert_ok(&intercept_for_a(&lab, "18823:http"), "intercept the http port for x-dev: a");
    let whoami = &format!("http://{}:8080/whoami", ip(&lab, "web-0"));
    let out =
        curl(&lab, &["--http2", "-H", "x-dev: a", whoami, "--next", "-sS", "--http2", whoami, "-w", "%{num_connects}"]);
    let got = stdout(&out);
    assert!(
        got.starts_with(&format!("laptop-a h1 dev=a\npod web-0 host={} uri=/whoami ", ip(&lab, "web-0")))
            && got.ends_with("\n0"),
        "the upgrade offer must be declined and the connection kept:\n{}\n{}",
        show(&out),
        logs(&lab)
    );

    // The agent loses the manager: requests on a keep-alive connection it already serves
    // go to the pod (no laptop can be reached), not to an error.
    let out = intercept_for_a(&lab, "18801:http");
    assert_ok(&out, "intercept the http port for x-dev: a");
    // Nothing listens on the laptop's port yet: `intercept` says so, and the caller gets
    // a 502 that says so too.
    assert!(stdout(&out).contains("nothing listens on 127.0.0.1:18801 yet"), "{}", show(&out));
    let out = curl(&lab, &["-H", "x-dev: a", "-w", "%{http_code}", &format!("http://{}:8080/", ip(&lab, "web-0"))]);
    let got = stdout(&out);
    assert!(got.contains("the laptop's port 18801: Connection refused") && got.ends_with("502"), "{}", show(&out));
    lab.start_web_in(&laptop, 18801, None, "laptop-a").unwrap();
    let web0 = ip(&lab, "web-0");
    let script = ["keepalive", &web0, "8080", "/", "a", "4"];
    let mut cmd = vec![PYTHON, RPC_SCRIPT];
    cmd.extend_from_slice(&script);
    let caller = lab.caller().to_string();
    lab.spawn_background(&caller, "keepalive", &cmd).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || lab.background_log("keepalive").contains("laptop-a")),
        "{}",
        lab.background_log("keepalive")
    );
    lab.stop_manager();
    assert!(
        wait_until(Duration::from_secs(10), || lab.agent_log().contains("lost the manager")),
        "{}",
        lab.agent_log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || lab.background_log("keepalive").lines().count() >= 2),
        "{}",
        lab.background_log("keepalive")
    );
    assert_eq!(lab.background_log("keepalive"), "200 laptop-a\n200 pod web-0\n", "{}", logs(&lab));
}

/// Audit B-5: callers that ask laptop A for large answers and never read them pin only
/// their own streams. Before, they filled the flow-control window of the node agent's one
/// QUIC connection, and laptop B's personal intercept on the same node stopped answering.
#[test]
fn callers_that_never_read_stall_only_their_own_intercept() {
    let Some(mut lab) = two_laptops() else { return };
    assert_ok(&intercept_for_a(&lab, "18801:http"), "laptop a intercepts for x-dev: a");
    assert_ok(
        &lab.tpvpn2(&["intercept", "web", "--port", "18802:http", "--http-header", "x-dev=b"]),
        "laptop b intercepts for x-dev: b",
    );
    // 200 callers (below the agent's 256 parsed connections per source) ask laptop A for
    // 1 MiB each with a 4 KiB receive buffer, and never read; held 25 s.
    let big = "b'GET /big HTTP/1.1\\r\\nHost: web\\r\\nx-dev: a\\r\\n\\r\\n'";
    lab.hold_callers("stalled", 200, big, true, Duration::from_secs(25))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    // Time for the answers to fill every window they can.
    std::thread::sleep(Duration::from_secs(3));
    let whoami = format!("http://{WEB_IP}/whoami");
    for (header, want) in [("x-dev: b", "laptop-b"), ("x-dev: b", "laptop-b"), ("x-dev: c", "pod web-")] {
        let out = lab.exec_timeout(
            lab.caller(),
            &["curl", "-sS", "--max-time", "5", "-H", header, &whoami],
            Duration::from_secs(10),
        );
        assert!(stdout(&out).starts_with(want), "{header}: expected {want}:\n{}\n{}", show(&out), logs(&lab));
    }
}

/// Audit B-11 and B-13: while a personal intercept holds a port, the requests it passes
/// to the pod arrive as if it were not there: from the caller's own address (IP
/// allow-lists, per-IP limits and logs keep working), over a pod connection of that
/// caller connection's own (one caller's framing can never meet another's request), and
/// without what only the hop to the agent was meant to read (hop-by-hop headers, `Expect`,
/// names with `_`, a lenient `Content-Length`).
#[test]
fn requests_passed_to_the_pod_arrive_as_the_caller_sent_them() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    if !lab.start_pods_or_skip() {
        return;
    }
    lab.up(&[]).unwrap_or_else(|e| panic!("tpvpn up: {e:#}\nmanager log:\n{}", lab.manager_log()));
    let laptop = lab.laptop().to_string();
    lab.start_web_in(&laptop, 18801, None, "laptop-a").unwrap();
    let pod_ns = lab.pod_ns("web-0").unwrap().to_string();
    let rules = || {
        let v4 = stdout(&lab.exec(&pod_ns, &["ip", "rule"]));
        let v6 = stdout(&lab.exec(&pod_ns, &["ip", "-6", "rule"]));
        let setting = stdout(&lab.exec(&pod_ns, &["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]));
        (v4, v6, setting)
    };
    let before = rules();
    assert_ok(&intercept_for_a(&lab, "18801:http"), "laptop a intercepts for x-dev: a");

    let received = &format!("http://{}:8080/received", ip(&lab, "web-0"));
    let peer = |out: &Output| -> String {
        let text = stdout(out);
        text.split_whitespace().find_map(|w| w.strip_prefix("peer=")).unwrap_or_default().to_string()
    };
    // Two caller connections, one after the other: each reaches the pod from the caller's
    // address, on a pod connection of its own.
    let first = curl(&lab, &[received]);
    let second = curl(&lab, &[received]);
    for out in [&first, &second] {
        assert!(stdout(out).starts_with("pod web-0 "), "{}\n{}", show(out), logs(&lab));
        assert!(
            peer(out).starts_with(&format!("{CALLER_IP}:")),
            "the pod must see the caller's address, not its own:\n{}\n{}",
            show(out),
            logs(&lab)
        );
    }
    assert_ne!(peer(&first), peer(&second), "a caller connection's pod connection served another caller connection");

    // Headers for the hop to the agent stop there; Content-Length arrives canonical.
    let out = curl(
        &lab,
        &[
            "-H",
            "Expect: 100-continue",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "Proxy-Connection: keep-alive",
            "-H",
            "Connection: keep-alive, X-Nominated",
            "-H",
            "X-Nominated: secret",
            "-H",
            "X_Smuggle: 1",
            "-H",
            "TE: gzip",
            "-H",
            "Content-Length: 05",
            "--data-binary",
            "hello",
            received,
        ],
    );
    let text = stdout(&out);
    assert!(text.starts_with("pod web-0 "), "{}\n{}", show(&out), logs(&lab));
    assert!(
        text.contains(" expect= keep-alive= proxy-connection= nominated= underscore= te= cl=5\n"),
        "the pod received what was meant for the agent only:\n{}",
        show(&out)
    );

    // Leaving takes every rule it added to the pod's namespace with it, and restores the
    // setting it changed.
    assert_ok(&lab.tpvpn(&["leave", "web"]), "leave");
    assert!(
        wait_until(Duration::from_secs(5), || lab.capture_tables("web-0").is_empty() && rules() == before),
        "left in the pod's namespace: {:?} (before: {before:?})\n{}",
        rules(),
        logs(&lab)
    );
}
