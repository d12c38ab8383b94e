//! Sessions across changes of the laptop's network (issue 24). So far: an address change
//! while the network works. Root only (they skip loudly otherwise).

use std::time::Duration;

use tpvpn_lab::{show, wait_until, TEST_SERVERS_IP};

/// The laptop's address toward the manager changes (as on a new Wi-Fi) in the middle of a
/// transfer: the QUIC connection migrates to the new address (the manager follows the
/// client's new path), so the transfer, its control connection and the session go on,
/// with no reconnection.
#[test]
fn an_address_change_mid_transfer_keeps_the_connections_and_the_session() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    if let Err(e) = lab.up(&[]) {
        panic!("up: {e:#}\nmanager log:\n{}", lab.manager_log());
    }
    let cluster = lab.cluster().to_string();
    lab.spawn_background(&cluster, "iperf3-server", &["iperf3", "-s", "-1", "-B", TEST_SERVERS_IP]).expect("iperf3 -s");
    let listening = wait_until(Duration::from_secs(5), || {
        let out = lab.exec_timeout(&cluster, &["ss", "-Hltn", "sport = :5201"], Duration::from_secs(5));
        !out.stdout.is_empty()
    });
    assert!(listening, "iperf3 -s is not listening:\n{}", lab.background_log("iperf3-server"));
    // Keep the secondary address when the primary goes, as a real move from one address
    // to another would have it.
    let l = lab.laptop().to_string();
    let sysctl = lab.exec(&l, &["sysctl", "-w", "net.ipv4.conf.to-cluster.promote_secondaries=1"]);
    assert!(sysctl.status.success(), "{}", show(&sysctl));

    let iperf = std::thread::scope(|s| {
        let client = s.spawn(|| {
            lab.exec_timeout(
                &l,
                &["iperf3", "-c", TEST_SERVERS_IP, "-t", "6", "-J", "--connect-timeout", "5000"],
                Duration::from_secs(60),
            )
        });
        std::thread::sleep(Duration::from_secs(2));
        for step in [
            ["addr", "add", "10.250.1.3/24", "dev", "to-cluster"],
            ["addr", "del", "10.250.1.2/24", "dev", "to-cluster"],
        ] {
            let mut cmd = vec!["ip"];
            cmd.extend_from_slice(&step);
            let out = lab.exec(&l, &cmd);
            assert!(out.status.success(), "{}", show(&out));
        }
        client.join().expect("the iperf3 client")
    });
    assert!(iperf.status.success(), "the transfer broke:\n{}\nmanager log:\n{}", show(&iperf), lab.manager_log());
    let report: serde_json::Value = serde_json::from_slice(&iperf.stdout).expect("iperf3 json");
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let late = report["intervals"]
        .as_array()
        .map_or(0, |i| i.iter().skip(3).filter(|x| x["sum"]["bytes"].as_u64().unwrap_or(0) > 0).count());
    assert!(received > 0 && late >= 2, "no bytes after the change: {received} received, {late} late intervals");
    let log = std::fs::read_to_string(lab.runtime_dir().join("tpvpn.log")).unwrap_or_default();
    assert!(!log.contains("the tunnel is down"), "the session was lost:\n{log}");
    let st = lab.tpvpn(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
    assert_eq!(v["connected"], true, "{}", show(&st));
    let page = lab.exec(&l, &["curl", "-sS", "--max-time", "10", "http://10.96.0.10/"]);
    assert!(String::from_utf8_lossy(&page.stdout).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&page));
}
