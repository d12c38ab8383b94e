//! The laptop's daemon runs as root and trusts nothing the manager sends: a manager
//! (the lab's hostile test double, speaking the real protocol) that pushes a namespace
//! named like a `busctl` option, the root as its cluster domain, half the internet and
//! 20,000 routes. No command runs, internet names still resolve upstream, no such route
//! appears, and `status` answers throughout. Needs root.

use std::time::{Duration, Instant};

use tpvpn_lab::{show, Lab};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_hostile_manager_cannot_run_commands_take_the_routes_or_all_names() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    // busctl permutes options: unquoted, this name would make it start a program.
    let marker = lab.dir().join("pwned");
    let evil = format!("--address=unixexec:path=/usr/bin/touch,argv1={}", marker.display());
    let evil_arg = format!("--namespace={evil}");
    lab.start_hostile_manager(&[
        "--cluster-domain",
        ".",
        "--cidr",
        "0.0.0.0/1",
        "--cidr",
        "128.0.0.0/1",
        "--cidr",
        "10.96.0.0/16",
        "--host-routes",
        "20000",
        &evil_arg,
        "--namespace",
        "Not_A_Name",
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    lab.start_resolved().expect("systemd-resolved in the laptop namespace");
    let bus = lab.resolved_bus();
    let env = [("DBUS_SYSTEM_BUS_ADDRESS", bus.as_str())];
    let base = lab.up_args();
    let mut up: Vec<&str> = base.iter().map(String::as_str).collect();
    up.extend(["--namespace", "default", "--dns-mode", "resolved"]);
    let started = Instant::now();
    let out = lab.tpvpn_env(&up, &env, Duration::from_secs(60));
    assert!(out.status.success(), "tpvpn up:\n{}\nmanager log:\n{}", show(&out), lab.manager_log());
    let log = std::fs::read_to_string(lab.runtime_dir().join("tpvpn.log")).unwrap_or_default();
    assert!(log.contains("namespaces that are not names: dropped"), "{log}");
    eprintln!("up took {:?}", started.elapsed());

    assert!(!marker.exists(), "a namespace name ran a program as root");
    let status = lab.tpvpn_env(&["status", "-o", "json"], &env, Duration::from_secs(10));
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_else(|_| panic!("{}", show(&status)));
    let domains = s["dns"]["domains"].as_array().cloned().unwrap_or_default();
    assert!(!domains.iter().any(|d| d.as_str().is_some_and(|d| d.contains("address="))), "{domains:?}");
    assert!(domains.iter().any(|d| d == "cluster.local"), "the root was refused as the cluster domain: {domains:?}");

    let table = stdout(&lab.exec(lab.laptop(), &["ip", "-4", "route", "show", "dev", "tpvpn0"]));
    assert!(
        !table.lines().any(|l| l.starts_with("0.0.0.0/1") || l.starts_with("128.0.0.0/1")),
        "half the internet routed"
    );
    let count = table.lines().count();
    assert!(count <= 1024, "{count} routes installed");
    let default = stdout(&lab.exec(lab.laptop(), &["ip", "route", "get", "10.250.2.1"]));
    assert!(!default.contains("tpvpn0"), "the laptop's nameserver is routed into the tunnel: {default}");

    // Through resolved's stub, as applications ask: the internet upstream, the cluster
    // through tpvpn.
    let dig = |name: &str| {
        stdout(&lab.exec(lab.laptop(), &["dig", "+short", "+time=2", "+tries=1", "@127.0.0.53", name]))
            .trim()
            .to_string()
    };
    assert_eq!(dig("docs.rs"), tpvpn_lab::INTERNET_IP, "internet names go upstream");
    assert_eq!(
        dig("frontend.default.svc.cluster.local"),
        tpvpn_lab::FRONTEND_IP,
        "from the table, under cluster.local"
    );
    let list = stdout(&lab.tpvpn(&["list"]));
    assert!(!list.contains("address=") && !list.contains("Not_A_Name"), "{list}");
    let down = lab.tpvpn_env(&["down"], &env, Duration::from_secs(30));
    assert!(down.status.success(), "{}", show(&down));
    drop::<Lab>(lab);
}

#[test]
fn only_the_laptop_itself_is_served() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    // Another host on the laptop's network routes tpvpn's DNS address and a ClusterIP
    // through the laptop, which forwards.
    assert!(lab.exec(lab.laptop(), &["sysctl", "-qw", "net.ipv4.ip_forward=1"]).status.success());
    for dst in ["198.18.0.2/32", "10.96.0.10/32"] {
        let out = lab.exec(lab.inet(), &["ip", "route", "add", dst, "via", "10.250.2.2"]);
        assert!(out.status.success(), "{}", show(&out));
    }
    // The route works: the laptop's kernel refuses a connection to a closed port of
    // that address from the other host (it does not time out).
    let probe = lab.lab_tool(lab.inet(), &["client", "connect", "198.18.0.2:9"]);
    assert!(
        stdout(&probe).starts_with("refused"),
        "the other host cannot reach the laptop's DNS address: {}",
        show(&probe)
    );
    let dig = |ns: &str, extra: &str| {
        lab.exec(
            ns,
            &["dig", "+short", "+time=2", "+tries=1", extra, "@198.18.0.2", "frontend.default.svc.cluster.local"],
        )
    };
    assert_eq!(
        stdout(&dig(lab.laptop(), "+notcp")).trim(),
        tpvpn_lab::FRONTEND_IP,
        "the laptop is served: {}",
        std::fs::read_to_string(lab.runtime_dir().join("tpvpn.log")).unwrap_or_default()
    );
    for proto in ["+notcp", "+tcp"] {
        let out = dig(lab.inet(), proto);
        assert!(!stdout(&out).contains(tpvpn_lab::FRONTEND_IP), "another host got an answer ({proto}): {}", show(&out));
    }
    let out = lab.lab_tool(lab.inet(), &["client", "connect", "10.96.0.10:80"]);
    assert!(
        !stdout(&out).starts_with("connected"),
        "another host reached a ClusterIP through the laptop: {}",
        show(&out)
    );
    let out = lab.lab_tool(lab.laptop(), &["client", "connect", "10.96.0.10:80"]);
    assert!(stdout(&out).starts_with("connected"), "{}", show(&out));
}
