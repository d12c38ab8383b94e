//! Cluster ranges that overlap the laptop's own routes (issue 27): a "VPN" beside the
//! laptop routes `10.96.0.0/12` (around the lab's service range `10.96.0.0/16`) to a server of its own, and tpvpn
//! reaches the cluster's Services through virtual addresses while the VPN keeps its
//! range. Root only (they skip loudly otherwise).

use std::process::Output;
use std::time::Duration;

use tpvpn_lab::{show, wait_until, Lab, FRONTEND_BODY, REDIS_IP, VPN_GATEWAY, VPN_SERVER_ADDR};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

/// A lab with the VPN beside the laptop; `route` makes the VPN route the service range.
fn lab_with_vpn(route: bool) -> Option<Lab> {
    let mut lab = tpvpn_lab::lab_or_skip()?;
    lab.add_vpn().unwrap_or_else(|e| panic!("the VPN: {e:#}"));
    if route {
        vpn_route(&lab, &[]);
    }
    Some(lab)
}

/// `ip route add 10.96.0.0/12 via the VPN` in the laptop namespace, plus `extra`.
fn vpn_route(lab: &Lab, extra: &[&str]) {
    let mut cmd = vec!["ip", "route", "add", "10.96.0.0/12", "via", VPN_GATEWAY];
    cmd.extend_from_slice(extra);
    assert_ok(&lab.exec(lab.laptop(), &cmd), "the VPN's route");
}

fn status(lab: &Lab) -> serde_json::Value {
    let out = lab.tpvpn(&["status", "-o", "json"]);
    assert_ok(&out, "status");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status json: {e}\n{}", show(&out)))
}

fn dig(lab: &Lab, args: &[&str]) -> String {
    let mut cmd = vec!["dig", "+short", "+time=2", "+tries=1"];
    cmd.extend_from_slice(args);
    stdout(&lab.exec_timeout(lab.laptop(), &cmd, Duration::from_secs(10))).trim().to_string()
}

/// The VPN's own server answers at its own address (the cluster's frontend has no port
/// 9003: through the tunnel this would be refused).
#[track_caller]
fn vpn_server_reached(lab: &Lab, when: &str) {
    let out = lab.lab_tool(lab.laptop(), &["client", "download", VPN_SERVER_ADDR, "100000"]);
    assert_ok(&out, &format!("{when}: download from the VPN's server at {VPN_SERVER_ADDR}"));
}

#[test]
fn an_overlapping_service_range_is_reached_through_virtual_addresses_and_the_vpn_keeps_its_own() {
    let Some(lab) = lab_with_vpn(true) else { return };
    // The VPN routes the IPv6 service range's /64 too.
    let v6 = lab.exec(lab.laptop(), &["ip", "-6", "route", "add", "fd00:96::/64", "dev", "vpn0"]);
    assert_ok(&v6, "the VPN's IPv6 route");
    if let Err(e) = lab.up(&[]) {
        panic!("up with the VPN's route in place: {e:#}\nmanager log:\n{}", lab.manager_log());
    }
    let s = status(&lab);
    let both = serde_json::json!([
        {"cluster": "10.96.0.0/16", "virtual": "240.0.0.0/16"},
        {"cluster": "fd00:96::/112", "virtual": "fd74:7076:8000::/112"},
    ]);
    assert_eq!(s["vnat"], both, "{s}");
    let routes: Vec<&str> = s["routes"].as_array().expect("routes").iter().filter_map(|r| r.as_str()).collect();
    assert!(routes.contains(&"240.0.0.0/16") && !routes.iter().any(|r| r.starts_with("10.96.")), "{s}");
    let text = stdout(&lab.tpvpn(&["status"]));
    assert!(text.contains("vnat:        cluster 10.96.0.0/16 reached as 240.0.0.0/16"), "{text}");

    // Names answer with the virtual address; its PTR names the Service.
    assert_eq!(dig(&lab, &["frontend.default.svc.cluster.local"]), "240.0.0.10");
    assert_eq!(dig(&lab, &["-x", "240.0.0.10"]), "frontend.default.svc.cluster.local.");
    // The cluster's nginx through the virtual address, by name.
    let page = lab.exec(
        lab.laptop(),
        &["curl", "-sS", "--max-time", "10", "-w", "\nfrom %{remote_ip}", "http://frontend.default/"],
    );
    assert_ok(&page, "curl http://frontend.default/");
    let body = stdout(&page);
    assert!(body.contains(FRONTEND_BODY) && body.ends_with("from 240.0.0.10"), "{}", show(&page));
    // IPv6 too: AAAA answers the virtual address, and nginx answers through it.
    assert_eq!(dig(&lab, &["frontend6.default.svc.cluster.local", "AAAA"]), "fd74:7076:8000::10");
    let page6 = lab.exec(lab.laptop(), &["curl", "-6", "-sS", "--max-time", "10", "http://frontend6.default/"]);
    assert!(stdout(&page6).contains(FRONTEND_BODY), "{}", show(&page6));
    // Redis and UDP through mapped addresses.
    let pong = lab.exec(lab.laptop(), &["redis-cli", "-h", "redis-leader.default", "ping"]);
    assert_eq!(stdout(&pong).trim(), "PONG", "{}", show(&pong));
    let echo = lab.lab_tool(lab.laptop(), &["client", "udp", "240.0.0.30:7", "1200"]);
    assert_ok(&echo, "udp echo through 240.0.0.30");
    // The pod range does not overlap anything: reached at its own addresses, as before.
    let pod = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://10.244.1.10/"]);
    assert!(stdout(&pod).contains(FRONTEND_BODY), "{}", show(&pod));
    // The VPN keeps its range: its own server at 10.96.0.10.
    vpn_server_reached(&lab, "connected");
    let got = stdout(&lab.exec(lab.laptop(), &["ip", "route", "get", "10.96.0.10"]));
    assert!(got.contains("vpn0") && !got.contains("tpvpn0"), "{got}");
    // `list` shows what a laptop process should use.
    let list = lab.tpvpn(&["list"]);
    assert!(stdout(&list).contains("240.0.0.10 (cluster 10.96.0.10)"), "{}", show(&list));

    assert_ok(&lab.tpvpn(&["down"]), "down");
    let kept = stdout(&lab.exec(lab.laptop(), &["ip", "route", "show", "10.96.0.0/12"]));
    assert!(kept.contains(&format!("via {VPN_GATEWAY} dev vpn0")), "down took the VPN's route: {kept:?}");
    let left = stdout(&lab.exec(lab.laptop(), &["ip", "route", "show", "240.0.0.0/16"]));
    assert!(left.trim().is_empty(), "the virtual range's route is left: {left}");
    vpn_server_reached(&lab, "after down");
}

#[test]
fn vnat_off_refuses_as_before_and_a_bad_virtual_subnet_gets_one_line() {
    let Some(lab) = lab_with_vpn(true) else { return };
    let base = lab.up_args();
    let up = |extra: &[&str]| {
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        lab.tpvpn(&args)
    };
    let cases: [(&[&str], &str); 5] = [
        (&["--vnat", "off"], "overlaps the existing route 10.96.0.0/12 dev vpn0"),
        (&["--virtual-subnet", "240.0.0.1/4"], "is not a network: its host bits are set (did you mean 240.0.0.0/4?)"),
        (
            &["--virtual-subnet", "240.0.0.0/20"],
            "the virtual subnet 240.0.0.0/20 is too small for the cluster range 10.96.0.0/16",
        ),
        (&["--virtual-subnet", "192.168.0.0/16"], "overlaps the route 192.168.77.0/24 of this machine"),
        (&["--virtual-subnet", "10.244.0.0/14"], "overlaps the cluster range 10.244.0.0/16"),
    ];
    for (extra, words) in cases {
        let out = up(extra);
        assert!(!out.status.success(), "up {extra:?} succeeded:\n{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(words), "up {extra:?}: expected {words:?} in:\n{}", show(&out));
        let link = lab.exec(lab.laptop(), &["ip", "link", "show", "tpvpn0"]);
        assert!(!link.status.success(), "up {extra:?} left tpvpn0 behind");
    }
    // `--vnat off` says what else to do.
    let err = String::from_utf8_lossy(&up(&["--vnat", "off"]).stderr).into_owned();
    assert!(err.contains("--vnat auto") && err.contains("--allow-route-conflicts"), "{err}");
    // A free subnet of the right size is taken.
    let out = up(&["--virtual-subnet", "100.80.0.0/16"]);
    assert_ok(&out, "up --virtual-subnet 100.80.0.0/16");
    assert_eq!(dig(&lab, &["frontend.default.svc.cluster.local"]), "100.80.0.10");
}

/// A connection open to a cluster address when a VPN takes its range keeps working:
/// tpvpn keeps a host route to that address until the connection ends.
#[test]
fn a_vpn_that_comes_up_after_up_gets_its_range_and_the_cluster_moves_to_virtual_addresses() {
    let Some(mut lab) = lab_with_vpn(false) else { return };
    if let Err(e) = lab.up(&[]) {
        panic!("up: {e:#}\nmanager log:\n{}", lab.manager_log());
    }
    assert_eq!(status(&lab)["vnat"], serde_json::json!([]));
    assert_eq!(dig(&lab, &["frontend.default.svc.cluster.local"]), "10.96.0.10");
    // A redis connection, open across the change: a PING before, one after (bounded:
    // 30 s of waiting for the go, 5 s per answer).
    let go = lab.dir().join("go");
    let held = format!(
        "exec 3<>/dev/tcp/{REDIS_IP}/6379; printf 'PING\\r\\n' >&3; read -t 5 a <&3; echo \"before:$a\"; \
         for i in $(seq 300); do [ -e {go} ] && break; sleep 0.1; done; \
         printf 'PING\\r\\n' >&3; read -t 5 b <&3; echo \"after:$b\"",
        go = go.display()
    );
    let laptop = lab.laptop().to_string();
    lab.spawn_background(&laptop, "held", &["bash", "-c", &held]).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || lab.background_log("held").contains("before:+PONG")),
        "{}",
        lab.background_log("held")
    );
    // The VPN comes up (a route of its own beside tpvpn's, as VPN clients add them).
    vpn_route(&lab, &["metric", "50"]);
    let moved = wait_until(Duration::from_secs(10), || status(&lab)["vnat"].as_array().is_some_and(|m| !m.is_empty()));
    let s = status(&lab);
    assert!(moved, "the mapping did not follow the new route: {s}");
    assert_eq!(s["vnat"], serde_json::json!([{"cluster": "10.96.0.0/16", "virtual": "240.0.0.0/16"}]), "{s}");
    let ours = || stdout(&lab.exec(lab.laptop(), &["ip", "route", "show", "dev", "tpvpn0"]));
    let routes = ours();
    assert!(!routes.contains("10.96.0.0/16") && routes.contains("240.0.0.0/16"), "{routes}");
    assert!(routes.lines().any(|l| l.starts_with(&format!("{REDIS_IP} "))), "the open connection's route: {routes}");
    assert_eq!(dig(&lab, &["frontend.default.svc.cluster.local"]), "240.0.0.10");
    let page = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://frontend.default/"]);
    assert!(stdout(&page).contains(FRONTEND_BODY), "{}", show(&page));
    vpn_server_reached(&lab, "after the VPN came up");
    // The open connection still reaches the cluster's redis; once it ends, so does its
    // route, and the address is the VPN's again.
    std::fs::write(&go, "").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || lab.background_log("held").contains("after:+PONG")),
        "{}",
        lab.background_log("held")
    );
    let gone = wait_until(Duration::from_secs(20), || !ours().lines().any(|l| l.starts_with(&format!("{REDIS_IP} "))));
    assert!(gone, "the route outlived its connection: {}", ours());
}

/// An intercept's environment is for a laptop process: the Service addresses the kubelet
/// gave the pod (`*_SERVICE_HOST`, `*_PORT`) are the virtual ones where mapped, and
/// `intercept` says so. Intercepting itself is unaffected (traffic comes from the
/// cluster side).
#[test]
fn an_intercepts_environment_carries_the_virtual_addresses_and_says_so() {
    let Some(mut lab) = lab_with_vpn(true) else { return };
    if !lab.start_pods_or_skip() {
        return;
    }
    if let Err(e) = lab.up(&[]) {
        panic!("up: {e:#}\nmanager log:\n{}", lab.manager_log());
    }
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let env_file = lab.dir().join("web.env").display().to_string();
    let out = lab.tpvpn_env(
        &["intercept", "web", "--port", "18888:http", "--env-file", &env_file],
        &[],
        Duration::from_secs(40),
    );
    assert_ok(&out, "intercept web --env-file");
    let said = stdout(&out);
    assert!(said.contains("FRONTEND_SERVICE_HOST") && said.contains("virtual addresses"), "{said}");
    let env = std::fs::read_to_string(&env_file).unwrap();
    for line in [
        "FRONTEND_SERVICE_HOST=240.0.0.10",
        "REDIS_LEADER_PORT=tcp://240.0.0.20:6379",
        "REDIS_LEADER_PORT_6379_TCP_ADDR=240.0.0.20",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing:\n{env}");
    }
    assert!(env.lines().any(|l| l == format!("GREETING={}", tpvpn_lab::pods::GREETING)), "{env}");
    // The IPv6 service range does not overlap: its address is the cluster's.
    assert!(env.lines().any(|l| l == format!("FRONTEND6_SERVICE_HOST={}", tpvpn_lab::FRONTEND6_IP)), "{env}");
}
