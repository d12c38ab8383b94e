//! End-to-end data-path tests: each test builds its own [`Lab`] (namespaces,
//! servers, manager), brings `tpvpn` up in the laptop namespace and checks
//! traffic to the cluster. They need root and skip loudly otherwise.

use std::process::Output;
use std::time::Duration;

use tpvpn_lab::{show, Lab};

fn lab() -> Option<Lab> {
    tpvpn_lab::lab_or_skip()
}

/// Builds a lab and brings tpvpn up with `extra` flags.
fn lab_up(extra: &[&str]) -> Option<Lab> {
    let lab = lab()?;
    if let Err(e) = lab.up(extra) {
        panic!("tpvpn up: {e:#}\nmanager log:\n{}", lab.manager_log());
    }
    Some(lab)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

/// `ip link show tpvpn0` and every route in the laptop ns: none may mention tpvpn0.
#[track_caller]
fn assert_no_tun_left(lab: &Lab, when: &str) {
    let link = lab.exec(lab.laptop(), &["ip", "link", "show", "tpvpn0"]);
    assert!(!link.status.success(), "{when}: tpvpn0 still exists:\n{}", show(&link));
    for fam in ["-4", "-6"] {
        let r = lab.exec(lab.laptop(), &["ip", fam, "route", "show", "table", "all"]);
        assert!(!stdout(&r).contains("tpvpn0"), "{when}: route via tpvpn0 left (ip {fam} route):\n{}", show(&r));
    }
}

#[test]
fn lab_builds_and_manager_runs() {
    let Some(lab) = lab() else { return };
    let c = lab.cluster();
    for url in ["http://10.96.0.10/", "http://10.244.1.10/"] {
        let out = lab.exec(c, &["curl", "-sS", "--max-time", "5", url]);
        assert_ok(&out, &format!("curl {url} in the cluster ns"));
        assert!(stdout(&out).contains(tpvpn_lab::FRONTEND_BODY), "unexpected page from {url}:\n{}", show(&out));
    }
    let out = lab.exec(c, &["redis-cli", "-h", tpvpn_lab::REDIS_IP, "ping"]);
    assert_ok(&out, "redis-cli ping");
    assert_eq!(stdout(&out).trim(), "PONG", "{}", show(&out));
    for size in ["100", "8000", "65507"] {
        let out = lab.lab_tool(c, &["client", "udp", tpvpn_lab::UDP_ECHO_ADDR, size]);
        assert_ok(&out, &format!("udp echo of {size} bytes in the cluster ns"));
    }
    let out = lab.lab_tool(c, &["client", "upload", tpvpn_lab::SINK_ADDR, "1000000"]);
    assert_ok(&out, "upload in the cluster ns");
    let out = lab.lab_tool(c, &["client", "download", tpvpn_lab::SOURCE_ADDR, "1000000"]);
    assert_ok(&out, "download in the cluster ns");
    let out = lab.lab_tool(c, &["client", "reset", tpvpn_lab::RESET_ADDR]);
    assert_ok(&out, "reset in the cluster ns");
    let out = lab.lab_tool(c, &["client", "connect", "10.96.0.50:80"]);
    assert!(stdout(&out).starts_with("refused "), "connect to 10.96.0.50:80 in the cluster ns:\n{}", show(&out));
    // Before any VPN, cluster IPs are unreachable from the laptop.
    let out = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "2", "http://10.96.0.10/"]);
    assert!(!out.status.success(), "10.96.0.10 reachable from the laptop without the VPN:\n{}", show(&out));
    // The laptop does reach the manager over the node network.
    // (a closed port on the node answers with a RST: reachable).
    let out = lab.lab_tool(lab.laptop(), &["client", "connect", "10.250.1.1:1"]);
    assert!(stdout(&out).starts_with("refused "), "cluster node unreachable from the laptop:\n{}", show(&out));
    assert!(lab.manager_log().contains("tpvpn-manager ready"), "manager log:\n{}", lab.manager_log());
}

#[test]
fn http_to_cluster_ip_and_pod_ip() {
    let Some(lab) = lab_up(&[]) else { return };
    for url in ["http://10.96.0.10/", "http://10.244.1.10/"] {
        let out = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", url]);
        assert_ok(&out, &format!("curl {url}"));
        assert!(stdout(&out).contains(tpvpn_lab::FRONTEND_BODY), "unexpected page from {url}:\n{}", show(&out));
    }
}

#[test]
fn redis_ping_set_get() {
    let Some(lab) = lab_up(&[]) else { return };
    for (args, want) in [(&["ping"][..], "PONG"), (&["set", "k", "v"][..], "OK"), (&["get", "k"][..], "v")] {
        let mut cmd = vec!["redis-cli", "-h", tpvpn_lab::REDIS_IP];
        cmd.extend_from_slice(args);
        // redis-cli has no connect timeout of its own.
        let out = lab.exec_timeout(lab.laptop(), &cmd, Duration::from_secs(15));
        assert_ok(&out, &format!("redis-cli {args:?}"));
        assert_eq!(stdout(&out).trim(), want, "redis-cli {args:?}:\n{}", show(&out));
    }
}

#[test]
fn bulk_upload_and_download_256mib() {
    let Some(lab) = lab_up(&[]) else { return };
    let size = (256u64 << 20).to_string();
    let out = lab.lab_tool(lab.laptop(), &["client", "upload", tpvpn_lab::SINK_ADDR, &size]);
    assert_ok(&out, "256 MiB upload");
    assert!(stdout(&out).starts_with("ok "), "{}", show(&out));
    eprintln!("upload: {}", stdout(&out).trim());
    let out = lab.lab_tool(lab.laptop(), &["client", "download", tpvpn_lab::SOURCE_ADDR, &size]);
    assert_ok(&out, "256 MiB download");
    assert!(stdout(&out).starts_with("ok "), "{}", show(&out));
    eprintln!("download: {}", stdout(&out).trim());
}

#[test]
fn thousand_concurrent_connections() {
    let Some(lab) = lab_up(&[]) else { return };
    let out = lab.lab_tool(lab.laptop(), &["client", "many", tpvpn_lab::SINK_ADDR, "1000"]);
    assert_ok(&out, "1000 concurrent connections");
    assert_eq!(stdout(&out).trim(), "ok 1000", "{}", show(&out));
}

#[test]
fn connection_refused_is_fast() {
    let Some(lab) = lab_up(&[]) else { return };
    let out = lab.lab_tool(lab.laptop(), &["client", "connect", "10.96.0.50:80"]);
    let line = stdout(&out);
    let ms: Option<u64> = line.trim().strip_prefix("refused ").and_then(|m| m.parse().ok());
    assert!(matches!(ms, Some(ms) if ms < 1000), "expected `refused <ms < 1000>`:\n{}", show(&out));
}

#[test]
fn reset_is_propagated() {
    let Some(lab) = lab_up(&[]) else { return };
    let out = lab.lab_tool(lab.laptop(), &["client", "reset", tpvpn_lab::RESET_ADDR]);
    assert_ok(&out, "reset client (expects a RST, not a clean close)");
    assert_eq!(stdout(&out).trim(), "reset", "{}", show(&out));
}

#[test]
fn half_close_gets_full_reply() {
    let Some(lab) = lab_up(&[]) else { return };
    let out = lab.lab_tool(lab.laptop(), &["client", "upload", tpvpn_lab::SINK_ADDR, "100000"]);
    assert_ok(&out, "upload 100000 bytes with half-close");
    assert!(stdout(&out).starts_with("ok 100000 "), "{}", show(&out));
}

#[test]
fn udp_echo_small_and_large() {
    let Some(lab) = lab_up(&[]) else { return };
    for size in ["100", "8000"] {
        let out = lab.lab_tool(lab.laptop(), &["client", "udp", tpvpn_lab::UDP_ECHO_ADDR, size]);
        assert_ok(&out, &format!("udp echo of {size} bytes"));
    }
}

#[test]
fn never_proxy_excludes_a_range() {
    let Some(lab) = lab_up(&["--never-proxy", "10.96.0.48/28"]) else {
        return;
    };
    let out = lab.exec(lab.laptop(), &["ip", "route", "get", "10.96.0.50"]);
    assert!(!stdout(&out).contains("tpvpn0"), "10.96.0.50 is in --never-proxy but routed via tpvpn0:\n{}", show(&out));
    let out = lab.exec(lab.laptop(), &["ip", "route", "get", "10.96.0.10"]);
    assert_ok(&out, "ip route get 10.96.0.10");
    assert!(stdout(&out).contains("tpvpn0"), "10.96.0.10 not routed via tpvpn0:\n{}", show(&out));
}

#[test]
fn wrong_token_is_rejected() {
    let Some(lab) = lab() else { return };
    let bad = lab.dir().join("bad-token");
    std::fs::write(&bad, "0123456789abcdef0123456789abcdef\n").expect("write bad token");
    let ca = lab.manager_ca().display().to_string();
    let bad_s = bad.display().to_string();
    let out = lab.tpvpn(&["up", "--manager", tpvpn_lab::MANAGER_ADDR, "--manager-ca", &ca, "--token-file", &bad_s]);
    assert!(!out.status.success(), "tpvpn up with a wrong token succeeded:\n{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("token"), "stderr does not mention the token:\n{}", show(&out));
    assert_no_tun_left(&lab, "after a rejected up");
}

#[test]
fn down_cleans_up_also_after_kill_9() {
    let Some(lab) = lab_up(&[]) else { return };
    let out = lab.tpvpn(&["down"]);
    assert_ok(&out, "tpvpn down");
    assert_no_tun_left(&lab, "after tpvpn down");

    if let Err(e) = lab.up(&[]) {
        panic!("second tpvpn up: {e:#}\nmanager log:\n{}", lab.manager_log());
    }
    let pid_file = lab.runtime_dir().join("tpvpn.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| panic!("cannot read {}: {e}", pid_file.display()));
    let pid = pid.trim();
    assert!(pid.parse::<u32>().is_ok_and(|p| p > 1), "bad pid {pid:?} in {}", pid_file.display());
    let out = lab.exec(lab.laptop(), &["kill", "-9", pid]);
    assert_ok(&out, "kill -9 the tpvpn daemon");
    // Wait (bounded) until the daemon is gone before `down`.
    assert!(
        tpvpn_lab::wait_until(Duration::from_secs(5), || tpvpn_lab::process_gone(pid)),
        "daemon {pid} survived kill -9"
    );
    let state = lab.runtime_dir().join("state.json");
    assert!(state.exists(), "the killed daemon's record of its changes is gone before down");
    let out = lab.tpvpn(&["down"]);
    assert_ok(&out, "tpvpn down after kill -9");
    assert!(
        stdout(&out).contains("undid the changes"),
        "down did not undo the crashed daemon's changes:\n{}",
        show(&out)
    );
    assert!(!state.exists(), "state file left after down");
    assert_no_tun_left(&lab, "after kill -9 and tpvpn down");
    // And a new up works after the crash.
    if let Err(e) = lab.up(&[]) {
        panic!("tpvpn up after a crash: {e:#}");
    }
}

/// Reads the daemon's pid, sends it `signal`, and waits (bounded) until it is gone.
fn signal_daemon(lab: &Lab, signal: &str) {
    let pid_file = lab.runtime_dir().join("tpvpn.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| panic!("cannot read {}: {e}", pid_file.display()));
    let pid = pid.trim().to_string();
    assert_ok(&lab.exec(lab.laptop(), &["kill", signal, &pid]), &format!("kill {signal}"));
    let gone = tpvpn_lab::wait_until(Duration::from_secs(5), || tpvpn_lab::process_gone(&pid));
    assert!(gone, "tpvpn daemon {pid} still running 5 s after {signal}");
}

#[test]
fn sigterm_and_sigint_undo_everything() {
    let Some(lab) = lab_up(&[]) else { return };
    for signal in ["-TERM", "-INT"] {
        signal_daemon(&lab, signal);
        assert_no_tun_left(&lab, &format!("after {signal}"));
        assert!(!lab.runtime_dir().join("state.json").exists(), "state file left after {signal}");
        assert!(!lab.runtime_dir().join("tpvpn.sock").exists(), "control socket left after {signal}");
        let out = lab.tpvpn(&["down"]);
        assert_ok(&out, "down after the daemon exited");
        assert_eq!(stdout(&out).trim(), "not connected", "{}", show(&out));
        if signal == "-TERM" {
            if let Err(e) = lab.up(&[]) {
                panic!("tpvpn up again: {e:#}");
            }
        }
    }
}

#[test]
fn status_json_has_the_contract_fields() {
    let Some(lab) = lab_up(&["--never-proxy", "10.96.0.48/28"]) else {
        return;
    };
    // Keep one TCP flow open while asking.
    let mut held = std::process::Command::new("ip")
        .args(["netns", "exec", lab.laptop(), "curl", "-sS", "--max-time", "20", "telnet://10.96.0.40:9001"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start curl");
    let mut flows = 0;
    let mut v = serde_json::Value::Null;
    tpvpn_lab::wait_until(Duration::from_secs(5), || {
        let out = lab.tpvpn(&["status", "-o", "json"]);
        assert_ok(&out, "tpvpn status -o json");
        v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status is not json ({e}):\n{}", show(&out)));
        flows = v["flows"]["tcp"].as_u64().unwrap_or(0);
        flows >= 1
    });
    let _ = held.kill();
    let _ = held.wait();
    assert_eq!(v["connected"], true, "{v}");
    assert_eq!(v["manager"], tpvpn_lab::MANAGER_ADDR, "{v}");
    assert_eq!(v["transport"], "quic", "{v}");
    assert!(v["manager_pod"].is_null(), "{v}");
    assert_eq!(v["tun"]["name"], "tpvpn0", "{v}");
    let routes: Vec<&str> = v["routes"].as_array().expect("routes").iter().filter_map(|r| r.as_str()).collect();
    assert!(routes.contains(&"10.244.0.0/16"), "{v}");
    assert!(!routes.contains(&"10.96.0.0/12"), "10.96.0.0/12 must be split around the never-proxy CIDR: {v}");
    let never: Vec<&str> =
        v["never_proxy"].as_array().expect("never_proxy").iter().filter_map(|r| r.as_str()).collect();
    assert!(never.contains(&"10.96.0.48/28") && never.contains(&"10.250.1.1/32"), "{v}");
    assert!(v["dns"]["mode"].is_string() && v["dns"]["domains"].is_array() && v["dns"].get("server").is_some(), "{v}");
    assert!(v["flows"]["udp"].is_u64(), "{v}");
    assert!(flows >= 1, "an open TCP flow is not counted: {v}");
}

#[test]
fn conflicting_route_is_refused_unless_allowed() {
    let Some(lab) = lab() else { return };
    // The laptop already routes part of the service CIDR elsewhere (say, a VPN of its own).
    // Without virtual addresses (`--vnat off`, see tests/vnat.rs for the default) that is
    // refused.
    let add = lab.exec(lab.laptop(), &["ip", "route", "add", "10.96.7.0/24", "via", "10.250.2.1"]);
    assert_ok(&add, "add a conflicting route in the laptop namespace");
    let mut args: Vec<String> = lab.up_args();
    args.extend(["--vnat".to_string(), "off".to_string()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.tpvpn(&argv);
    assert!(!out.status.success(), "up with a conflicting route succeeded:\n{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10.96.7.0/24") && err.contains("--allow-route-conflicts"), "{}", show(&out));
    assert_no_tun_left(&lab, "after a refused up");
    // Excluding it works; so does allowing it.
    if let Err(e) = lab.up(&["--never-proxy", "10.96.7.0/24", "--vnat", "off"]) {
        panic!("up with the conflict excluded: {e:#}");
    }
    assert_ok(&lab.tpvpn(&["down"]), "down");
    args.push("--allow-route-conflicts".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.tpvpn(&argv);
    assert_ok(&out, "up --allow-route-conflicts");
    let kept = lab.exec(lab.laptop(), &["ip", "route", "get", "10.96.7.1"]);
    assert!(!stdout(&kept).contains("tpvpn0"), "the more specific existing route still wins:\n{}", show(&kept));
}

#[test]
fn manager_health_and_metrics_count_real_traffic() {
    let Some(lab) = lab_up(&[]) else { return };
    let page = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"]);
    assert_ok(&page, "curl through the tunnel");
    let refused = lab.lab_tool(lab.laptop(), &["client", "connect", "10.96.0.50:80"]);
    assert!(stdout(&refused).starts_with("refused "), "{}", show(&refused));
    let ready = lab.exec(lab.cluster(), &["curl", "-sS", "-f", "--max-time", "5", "http://10.250.1.1:9090/readyz"]);
    assert_ok(&ready, "GET /readyz");
    let m = lab.exec(lab.cluster(), &["curl", "-sS", "-f", "--max-time", "5", "http://10.250.1.1:9090/metrics"]);
    assert_ok(&m, "GET /metrics");
    let text = stdout(&m);
    let value = |series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(value("tpvpn_manager_sessions "), 1, "{text}");
    assert!(value("tpvpn_manager_flows_total{proto=\"tcp\"} ") >= 2, "{text}");
    assert!(value("tpvpn_manager_dial_failures_total{reason=\"refused\"} ") >= 1, "{text}");
    assert!(value("tpvpn_manager_bytes_total{direction=\"from_cluster\"} ") > 100, "{text}");
}

#[test]
fn ipv6_services_resolve_and_carry_tcp() {
    let Some(lab) = lab_up(&[]) else { return };
    let ip6 = tpvpn_lab::FRONTEND6_IP;
    let st = lab.tpvpn(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&st)));
    let routes: Vec<&str> = v["routes"].as_array().expect("routes").iter().filter_map(|r| r.as_str()).collect();
    assert!(routes.contains(&"fd00:96::/112"), "the IPv6 Service range is routed: {v}");
    let route = lab.exec(lab.laptop(), &["ip", "-6", "route", "get", ip6]);
    assert!(stdout(&route).contains("tpvpn0"), "{}", show(&route));
    // AAAA from the local table.
    let dig = lab.exec(lab.laptop(), &["dig", "+short", "+time=2", "+tries=1", "frontend6.default", "AAAA"]);
    assert_eq!(stdout(&dig).trim(), ip6, "{}", show(&dig));
    // TCP over IPv6 through the netstack and the tunnel, by address and by name.
    let url = format!("http://[{ip6}]/");
    for target in [url.as_str(), "http://frontend6.default/"] {
        let page = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", target]);
        assert!(stdout(&page).contains(tpvpn_lab::FRONTEND_BODY), "{target}: {}", show(&page));
    }
    // 16 MiB over IPv6, byte for byte (nginx serves a file of the lab's web root).
    let body: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(31) % 251) as u8).collect();
    std::fs::write(lab.dir().join("www/big.bin"), &body).unwrap();
    let out = lab.dir().join("out/big6.bin");
    let got = lab.exec_timeout(
        lab.laptop(),
        &["curl", "-sS", "--max-time", "30", "-o", &out.display().to_string(), &format!("{url}big.bin")],
        Duration::from_secs(40),
    );
    assert_ok(&got, "curl of 16 MiB over IPv6");
    assert!(std::fs::read(&out).unwrap() == body, "the 16 MiB body differs");
}
