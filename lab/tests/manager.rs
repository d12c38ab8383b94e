//! The manager as a shared service, end to end in the lab: a flow ends with its client,
//! the destination policy is applied to what laptops send, and running out of file
//! descriptors refuses flows instead of breaking the manager. Needs root.

use std::process::Output;
use std::time::Duration;

use tpvpn_lab::{show, wait_until, Lab, SILENT_ADDR, SINK_ADDR};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of one sample of the manager's metrics, e.g.
/// `tpvpn_manager_flows{proto="tcp"}`.
fn metric(lab: &Lab, sample: &str) -> Option<u64> {
    lab.manager_metrics().lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
}

#[test]
fn a_flow_ends_with_its_client() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    let tcp_flows = |lab: &Lab| metric(lab, "tpvpn_manager_flows{proto=\"tcp\"}");
    assert_eq!(tcp_flows(&lab), Some(0));
    // Half-closed from the laptop, to a server that never reads or writes: nothing in
    // the relay would ever end by itself.
    let bin = tpvpn_lab::bin_dir().unwrap().join("tpvpn-lab").display().to_string();
    let laptop = lab.laptop().to_string();
    lab.spawn_background(&laptop, "half-close", &[&bin, "client", "half-close", SILENT_ADDR, "100000", "120"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || tcp_flows(&lab) == Some(1)
            && lab.background_log("half-close").contains("half-closed")),
        "the flow did not open: {}\n{}",
        lab.background_log("half-close"),
        lab.manager_metrics()
    );
    let out = lab.tpvpn(&["down"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        wait_until(Duration::from_secs(1), || tcp_flows(&lab) == Some(0)),
        "the manager still holds the flow of a client that is gone:\n{}",
        lab.manager_metrics()
    );
    // The server learns it: the flow is reset, not left with the laptop's FIN alone (its
    // socket in CLOSE-WAIT for as long as it waits, here an hour).
    let port = SILENT_ADDR.rsplit_once(':').map(|(_, p)| p).unwrap();
    let waiting = || {
        let out = lab.exec(lab.cluster(), &["ss", "-Htn", "state", "close-wait", "sport", "=", &format!(":{port}")]);
        stdout(&out)
    };
    assert!(
        wait_until(Duration::from_secs(1), || waiting().trim().is_empty()),
        "the server's end still waits in CLOSE-WAIT:\n{}",
        waiting()
    );
}

#[test]
fn the_metadata_address_is_denied_and_counted() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.up(&["--also-proxy", "169.254.169.254/32"]).unwrap_or_else(|e| panic!("{e:#}"));
    let out = lab.lab_tool(lab.laptop(), &["client", "connect", "169.254.169.254:80"]);
    let line = stdout(&out);
    assert!(!line.starts_with("connected"), "the metadata address was reached through the manager: {}", show(&out));
    assert_eq!(
        metric(&lab, "tpvpn_manager_flows_denied_total{reason=\"policy\"}"),
        Some(1),
        "{}",
        lab.manager_metrics()
    );
    // Everything else still goes.
    let ok = lab.lab_tool(lab.laptop(), &["client", "upload", SINK_ADDR, "100000"]);
    assert!(ok.status.success(), "{}", show(&ok));
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    let ticks: f64 = fields.get(11..13).into_iter().flatten().filter_map(|v| v.parse::<f64>().ok()).sum();
    ticks / 100.0
}

#[test]
fn out_of_descriptors_the_excess_is_refused_without_a_spin_and_the_manager_recovers() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.restart_manager_with(&["prlimit", "--nofile=1024:1024"], &[]).unwrap_or_else(|e| panic!("{e:#}"));
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    let pid = lab.manager_pid().unwrap();
    // 1,100 idle flows held for 15 s (stdin stays open that long).
    let bin = tpvpn_lab::bin_dir().unwrap().join("tpvpn-lab").display().to_string();
    let hold = format!("sleep 15 | {bin} client hold {SINK_ADDR} 1100 --seconds 60");
    let laptop = lab.laptop().to_string();
    lab.spawn_background(&laptop, "hold", &["sh", "-c", &hold]).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || lab.background_log("hold").contains("established")),
        "{}",
        lab.background_log("hold")
    );
    let log = lab.background_log("hold");
    let held: usize = log.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(held < 1100 && held > 900, "1,024 descriptors should hold most but not all of 1,100 flows: {log}");
    let failures = metric(&lab, "tpvpn_manager_dial_failures_total{reason=\"unreachable\"}");
    // (The metrics request above may itself find no descriptor; then it is not answered.)
    // While no descriptor is free, the manager's own listeners fail to accept: it must
    // back off, not spin.
    let cluster = lab.cluster().to_string();
    lab.spawn_background(&cluster, "probe", &["curl", "-s", "--max-time", "3", "http://10.250.1.1:9090/healthz"])
        .unwrap();
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.5, "the manager used {used:.2} s of CPU in 2 s while out of descriptors (a spin)");
    assert!(!tpvpn_lab::process_gone(&pid.to_string()), "the manager died");
    // Once the flows are gone, flows work again.
    assert!(
        wait_until(Duration::from_secs(30), || metric(&lab, "tpvpn_manager_flows{proto=\"tcp\"}") == Some(0)),
        "{}",
        lab.manager_metrics()
    );
    let failures = failures.or_else(|| metric(&lab, "tpvpn_manager_dial_failures_total{reason=\"unreachable\"}"));
    assert!(failures.unwrap_or(0) > 0, "the excess was not refused as a failed dial:\n{}", lab.manager_metrics());
    let ok = lab.lab_tool(lab.laptop(), &["client", "upload", SINK_ADDR, "1000000"]);
    assert!(ok.status.success(), "the manager did not recover: {}", show(&ok));
}
