//! End-to-end DNS tests: the laptop resolves cluster names as a pod in the connected
//! namespace would, everything else goes to its original nameserver (the internet
//! namespace's dnsmasq), and its resolv.conf comes back byte for byte. Root only; skip
//! loudly otherwise.

use std::process::Output;
use std::time::{Duration, Instant};

use tpvpn_lab::{show, Lab};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A lab with tpvpn up from the kubeconfig, connected to namespace `default`.
fn lab_up(extra: &[&str]) -> Option<Lab> {
    let lab = tpvpn_lab::lab_or_skip()?;
    let kc = lab.kubeconfig().display().to_string();
    let mut args = vec!["up", "--kubeconfig", &kc, "--namespace", "default"];
    args.extend_from_slice(extra);
    let out = lab.tpvpn(&args);
    assert!(out.status.success(), "tpvpn up:\n{}\nmanager:\n{}", show(&out), lab.manager_log());
    Some(lab)
}

/// `dig +short` from the laptop, through its resolv.conf.
fn dig(lab: &Lab, args: &[&str]) -> String {
    let mut cmd = vec!["dig", "+short", "+time=2", "+tries=1"];
    cmd.extend_from_slice(args);
    let out = lab.exec_timeout(lab.laptop(), &cmd, Duration::from_secs(10));
    stdout(&out).trim().to_string()
}

/// The status line of a full `dig` answer (NOERROR, NXDOMAIN, SERVFAIL...).
fn dig_status(lab: &Lab, name: &str) -> String {
    let out = lab.exec_timeout(lab.laptop(), &["dig", "+time=2", "+tries=1", name], Duration::from_secs(10));
    let text = stdout(&out);
    text.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| format!("no answer: {}", show(&out)))
}

#[test]
fn service_names_resolve_in_every_form() {
    let Some(lab) = lab_up(&[]) else { return };
    for url in ["http://frontend.default/", "http://frontend.default.svc.cluster.local/", "http://frontend/"] {
        let out = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", url]);
        assert!(stdout(&out).contains(tpvpn_lab::FRONTEND_BODY), "{url}:\n{}", show(&out));
    }
    for name in ["frontend.default", "frontend.default.svc", "frontend.default.svc.cluster.local", "frontend"] {
        let out = lab.exec(lab.laptop(), &["getent", "hosts", name]);
        assert!(stdout(&out).starts_with("10.96.0.10"), "getent hosts {name}:\n{}", show(&out));
    }
}

#[test]
fn srv_ptr_headless_and_nxdomain_come_from_the_cluster() {
    let Some(lab) = lab_up(&[]) else { return };
    assert_eq!(
        dig(&lab, &["SRV", "_http._tcp.frontend.default.svc.cluster.local"]),
        "0 100 80 frontend.default.svc.cluster.local."
    );
    assert_eq!(dig(&lab, &["-x", "10.96.0.10"]), "frontend.default.svc.cluster.local.");
    // Only the cluster DNS knows headless Services and pods; TTLs pass through (30 s).
    assert_eq!(dig(&lab, &["web.default.svc.cluster.local"]), "10.244.1.10");
    let out = lab.exec(lab.laptop(), &["dig", "+noall", "+answer", "web.default.svc.cluster.local"]);
    let fields: Vec<String> = stdout(&out).split_whitespace().map(String::from).collect();
    assert_eq!(fields, ["web.default.svc.cluster.local.", "30", "IN", "A", "10.244.1.10"], "{}", show(&out));
    assert_eq!(dig(&lab, &["10-244-1-10.default.pod.cluster.local"]), "10.244.1.10");
    assert_eq!(dig_status(&lab, "nope.default.svc.cluster.local"), "NXDOMAIN");
}

#[test]
fn name_dot_namespace_resolves_as_in_a_pod() {
    let Some(lab) = lab_up(&[]) else { return };
    // Namespace `corp` exists in the cluster, `jira.corp` on the internet: as in a pod,
    // where `jira.corp.svc.cluster.local` does not exist, the internet's answer.
    assert_eq!(dig(&lab, &["jira.corp"]), tpvpn_lab::INTERNET_IP, "the internet's jira.corp");
    assert_eq!(dig(&lab, &["frontend.default"]), tpvpn_lab::FRONTEND_IP, "from the table");
    // A NAME.NS with no such Service gets the upstream's answer, passed through; the
    // cluster's own forms keep the cluster's NXDOMAIN.
    assert_eq!(dig(&lab, &["TXT", "nope.default"]), "\"upstream-answer\"", "the upstream's answer");
    assert_eq!(dig_status(&lab, "nope.default.svc.cluster.local"), "NXDOMAIN");
    assert_eq!(dig_status(&lab, "nope.default.svc"), "NXDOMAIN");
}

#[test]
fn namespaces_named_like_public_suffixes_do_not_capture_the_internet() {
    let Some(lab) = lab_up(&[]) else { return };
    // Namespaces `rs` and `dev` exist in the cluster.
    assert_eq!(dig(&lab, &["docs.rs"]), tpvpn_lab::INTERNET_IP);
    assert_eq!(dig(&lab, &["crates.dev"]), tpvpn_lab::INTERNET_IP);
    assert_eq!(dig(&lab, &["svc.rs.svc.cluster.local"]), "10.96.0.60");
    let st = lab.tpvpn(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&st)));
    let filtered = v["dns"]["filtered_namespaces"].as_array().cloned().unwrap_or_default();
    assert!(filtered.contains(&"rs".into()) && filtered.contains(&"dev".into()), "{v}");
    let domains = v["dns"]["domains"].as_array().cloned().unwrap_or_default();
    assert!(domains.contains(&"cluster.local".into()) && domains.contains(&"default".into()), "{v}");
    assert!(!domains.contains(&"rs".into()), "{v}");
    assert_eq!(v["dns"]["mode"], "resolvconf", "{v}");
}

#[test]
fn include_and_exclude_suffixes() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    let kc = std::fs::read_to_string(lab.kubeconfig()).unwrap();
    let server = format!("    server: {}\n", lab.apiserver_url());
    let ext = format!(
        "{server}    extensions:\n    - name: tpvpn\n      extension:\n        dns:\n          include-suffixes: [corp.internal]\n          exclude-suffixes: [redis-leader.default]\n"
    );
    let path = lab.dir().join("kubeconfig-dns");
    std::fs::write(&path, kc.replace(&server, &ext)).unwrap();
    let p = path.display().to_string();
    let out = lab.tpvpn(&["up", "--kubeconfig", &p, "--namespace", "default"]);
    assert!(out.status.success(), "{}", show(&out));
    // Under an included suffix: asked of the cluster DNS.
    assert_eq!(dig(&lab, &["db.corp.internal"]), "10.96.0.80");
    // Under an excluded suffix: upstream, which does not know it (the table would have
    // answered 10.96.0.20).
    assert_ne!(dig_status(&lab, "redis-leader.default"), "NOERROR");
    assert_eq!(dig(&lab, &["frontend.default"]), "10.96.0.10");
}

#[test]
fn a_namespace_created_while_connected_resolves() {
    let Some(lab) = lab_up(&[]) else { return };
    let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}});
    lab.kube_apply("POST", "/api/v1/namespaces", Some(&ns)).expect("namespace");
    let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "app", "namespace": "late"},
        "spec": {"clusterIP": "10.96.0.90", "ports": [{"name": "http", "port": 80}]}});
    lab.kube_apply("POST", "/api/v1/namespaces/late/services", Some(&svc)).expect("service");
    let mut got = String::new();
    tpvpn_lab::wait_until(Duration::from_secs(30), || {
        got = dig(&lab, &["app.late"]);
        got == "10.96.0.90"
    });
    assert_eq!(got, "10.96.0.90", "app.late did not resolve within 30 s");
}

#[test]
fn tcp_queries_and_truncated_answers() {
    let Some(lab) = lab_up(&[]) else { return };
    assert_eq!(dig(&lab, &["+tcp", "frontend.default.svc.cluster.local"]), "10.96.0.10");
    // 60 A records do not fit 512 bytes: UDP says TC, dig retries over TCP and gets all.
    let out = lab.exec(lab.laptop(), &["dig", "+noedns", "+ignore", "big.default.svc.cluster.local"]);
    assert!(stdout(&out).contains(" tc") || stdout(&out).contains("tc "), "no TC over UDP:\n{}", show(&out));
    let all = dig(&lab, &["+noedns", "big.default.svc.cluster.local"]);
    assert_eq!(all.lines().count(), usize::from(tpvpn_lab::BIG_RECORDS), "{all}");
}

/// `connected` from `tpvpn status -o json`.
fn connected(lab: &Lab) -> Option<bool> {
    let out = lab.tpvpn(&["status", "-o", "json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["connected"].as_bool()
}

/// Waits (bounded) until `connected` is `want`.
fn wait_connected(lab: &Lab, want: bool, limit: Duration) -> bool {
    tpvpn_lab::wait_until(limit, || connected(lab) == Some(want))
}

#[test]
fn a_manager_outage_keeps_dns_up_and_tpvpn_reconnects() {
    let Some(mut lab) = lab_up(&[]) else { return };
    lab.stop_manager();
    // Normally at once (the manager closes the connection); if its close is lost, within
    // QUIC's 30 s idle timeout.
    assert!(wait_connected(&lab, false, Duration::from_secs(45)), "status never said disconnected");

    // Still in place: the laptop keeps using tpvpn's DNS server.
    assert!(std::fs::read_to_string(lab.laptop_resolv_conf()).unwrap().contains("198.18.0.2"));
    assert_eq!(dig(&lab, &["docs.rs"]), tpvpn_lab::INTERNET_IP, "internet names must keep resolving");
    let start = Instant::now();
    let status = dig_status(&lab, "web.default.svc.cluster.local");
    assert!(start.elapsed() < Duration::from_secs(1), "a cluster name took {:?}", start.elapsed());
    assert_eq!(status, "SERVFAIL", "a name only the cluster knows must fail fast while disconnected");
    // A Service from the manager's table too: its address is unreachable while disconnected.
    assert_eq!(dig_status(&lab, "frontend.default"), "SERVFAIL", "a known Service while disconnected");

    lab.start_manager().expect("restart the manager");
    assert!(
        wait_connected(&lab, true, Duration::from_secs(30)),
        "did not reconnect
{}",
        lab.manager_log()
    );
    let page = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "10", "http://frontend.default/"]);
    assert!(stdout(&page).contains(tpvpn_lab::FRONTEND_BODY), "after reconnecting:\n{}", show(&page));
    assert_eq!(dig(&lab, &["web.default.svc.cluster.local"]), "10.244.1.10");
}

#[test]
fn resolv_conf_is_restored_byte_for_byte_also_after_a_crash() {
    let Some(lab) = lab_up(&[]) else { return };
    let path = lab.laptop_resolv_conf();
    let during = std::fs::read_to_string(&path).unwrap();
    assert!(
        during.contains("nameserver 198.18.0.2") && during.contains("search default.svc.cluster.local"),
        "{during}"
    );
    let out = lab.tpvpn(&["down"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(std::fs::read(&path).unwrap(), tpvpn_lab::LAPTOP_RESOLV_CONF.as_bytes());
    let kc = lab.kubeconfig().display().to_string();
    let out = lab.tpvpn(&["up", "--kubeconfig", &kc]);
    assert!(out.status.success(), "{}", show(&out));
    let pid = std::fs::read_to_string(lab.runtime_dir().join("tpvpn.pid")).unwrap();
    assert!(lab.exec(lab.laptop(), &["kill", "-9", pid.trim()]).status.success());
    assert!(tpvpn_lab::wait_until(Duration::from_secs(5), || tpvpn_lab::process_gone(&pid)), "daemon survived kill -9");
    assert!(std::fs::read_to_string(&path).unwrap().contains("198.18.0.2"), "the crash left tpvpn's resolv.conf");
    let out = lab.tpvpn(&["down"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(std::fs::read(&path).unwrap(), tpvpn_lab::LAPTOP_RESOLV_CONF.as_bytes());
}

#[test]
fn resolv_conf_survives_a_reboot_while_connected() {
    let Some(lab) = lab_up(&[]) else { return };
    let path = lab.laptop_resolv_conf();
    // A reboot while connected, as the laptop sees it: the daemon and its TUN device are
    // gone, and so is the runtime directory (on /run, a tmpfs); /etc/resolv.conf stays.
    let reboot = || {
        let pid = std::fs::read_to_string(lab.runtime_dir().join("tpvpn.pid")).unwrap();
        assert!(lab.exec(lab.laptop(), &["kill", "-9", pid.trim()]).status.success());
        assert!(tpvpn_lab::wait_until(Duration::from_secs(5), || tpvpn_lab::process_gone(&pid)));
        let _ = lab.exec(lab.laptop(), &["ip", "link", "del", "tpvpn0"]);
        for e in std::fs::read_dir(lab.runtime_dir()).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        assert!(std::fs::read_to_string(&path).unwrap().contains("198.18.0.2"));
    };
    reboot();
    // The next up takes the original from tpvpn's own file, not tpvpn's file as the original.
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(dig(&lab, &["docs.rs"]), tpvpn_lab::INTERNET_IP, "internet names go upstream");
    let out = lab.tpvpn(&["down"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), tpvpn_lab::LAPTOP_RESOLV_CONF);
    // And down alone after a reboot puts it back.
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    reboot();
    let out = lab.tpvpn(&["down"]);
    assert!(out.status.success() && stdout(&out).contains("put back"), "{}", show(&out));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), tpvpn_lab::LAPTOP_RESOLV_CONF);
}

/// `busctl --system` against the lab's private bus; stdout.
fn busctl(lab: &Lab, args: &[&str]) -> String {
    let out = std::process::Command::new("busctl")
        .args(["--system", "--timeout=5"])
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", lab.resolved_bus())
        .output()
        .expect("busctl");
    assert!(out.status.success(), "busctl {args:?}: {}", show(&out));
    stdout(&out)
}

/// systemd-resolved's `Domains` for link `ifindex`: (domain, routing only).
fn resolved_domains(lab: &Lab, ifindex: u64) -> Vec<(String, bool)> {
    let m = "org.freedesktop.resolve1.Manager";
    let json = busctl(
        lab,
        &["--json=short", "get-property", "org.freedesktop.resolve1", "/org/freedesktop/resolve1", m, "Domains"],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e[0].as_u64() == Some(ifindex))
        .map(|e| (e[1].as_str().unwrap().to_string(), e[2].as_bool().unwrap()))
        .collect()
}

#[test]
fn resolved_mode_sends_only_cluster_domains_to_tpvpn() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.start_resolved().expect("systemd-resolved in the laptop namespace");
    let bus = lab.resolved_bus();
    let env = [("DBUS_SYSTEM_BUS_ADDRESS", bus.as_str())];
    let kc = lab.kubeconfig().display().to_string();
    let up = ["up", "--kubeconfig", &kc, "--namespace", "default", "--dns-mode", "resolved"];
    let out = lab.tpvpn_env(&up, &env, tpvpn_lab::EXEC_TIMEOUT);
    assert!(out.status.success(), "tpvpn up:\n{}", show(&out));
    assert_eq!(std::fs::read_to_string(lab.laptop_resolv_conf()).unwrap(), tpvpn_lab::LAPTOP_RESOLV_CONF);
    let status: serde_json::Value = serde_json::from_slice(&lab.tpvpn(&["status", "-o", "json"]).stdout).unwrap();
    assert_eq!(status["dns"]["mode"], "resolved", "{status}");
    let device = status["tun"]["name"].as_str().unwrap().to_string();
    let ifindex: u64 =
        stdout(&lab.exec(lab.laptop(), &["cat", &format!("/sys/class/net/{device}/ifindex")])).trim().parse().unwrap();

    // resolved's view of tpvpn's link: its server, the search path, routing-only
    // namespaces (never a public suffix), and no default route.
    let m = "org.freedesktop.resolve1.Manager";
    assert!(busctl(&lab, &["get-property", "org.freedesktop.resolve1", "/org/freedesktop/resolve1", m, "DNS"])
        .contains(&format!("{ifindex} 2 4 198 18 0 2")));
    let domains = resolved_domains(&lab, ifindex);
    for want in
        [("default.svc.cluster.local", false), ("cluster.local", false), ("default", true), ("kube-system", true)]
    {
        assert!(domains.contains(&(want.0.to_string(), want.1)), "{want:?} missing in {domains:?}");
    }
    assert!(!domains.iter().any(|(d, _)| d == "rs" || d == "dev"), "public suffixes routed: {domains:?}");
    let link = busctl(
        &lab,
        &["call", "org.freedesktop.resolve1", "/org/freedesktop/resolve1", m, "GetLink", "i", &ifindex.to_string()],
    );
    let path = link.trim().trim_start_matches("o ").trim_matches('"').to_string();
    let default_route = busctl(
        &lab,
        &["get-property", "org.freedesktop.resolve1", &path, "org.freedesktop.resolve1.Link", "DefaultRoute"],
    );
    assert_eq!(default_route.trim(), "b false");

    // Through resolved's stub, as the laptop's applications would ask.
    let stub = |name: &str| dig(&lab, &["@127.0.0.53", name]);
    assert_eq!(stub("frontend.default.svc.cluster.local"), "10.96.0.10");
    assert_eq!(stub("frontend.default"), "10.96.0.10");
    assert_eq!(stub("web.default.svc.cluster.local"), "10.244.1.10", "a name only the cluster DNS knows");
    assert_eq!(stub("docs.rs"), tpvpn_lab::INTERNET_IP, "the internet still resolves");
    // `~corp` sends jira.corp to tpvpn, which asks the laptop's other servers (never
    // resolved's stub, which would send it straight back).
    assert!(domains.contains(&("corp".to_string(), true)), "{domains:?}");
    assert_eq!(stub("jira.corp"), tpvpn_lab::INTERNET_IP, "a namespace took an internet name");

    // A namespace created while connected becomes a routing domain in resolved.
    let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}});
    lab.kube_apply("POST", "/api/v1/namespaces", Some(&ns)).expect("namespace");
    assert!(
        tpvpn_lab::wait_until(Duration::from_secs(30), || resolved_domains(&lab, ifindex)
            .contains(&("late".into(), true))),
        "namespace late never reached resolved: {:?}",
        resolved_domains(&lab, ifindex)
    );

    let out = lab.tpvpn_env(&["down"], &env, tpvpn_lab::EXEC_TIMEOUT);
    assert!(out.status.success(), "{}", show(&out));
    assert!(resolved_domains(&lab, ifindex).is_empty(), "resolved still routes to tpvpn after down");
    assert!(!busctl(&lab, &["get-property", "org.freedesktop.resolve1", "/org/freedesktop/resolve1", m, "DNS"])
        .contains("198 18 0 2"));
    assert_eq!(stub("docs.rs"), tpvpn_lab::INTERNET_IP);
}
