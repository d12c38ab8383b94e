//! The laptop's daemon runs as root next to the laptop's other users: its control socket
//! serves `status` and `list` to anyone but changes only for root or the user who ran
//! `up`, a silent or stalled client never holds it up, its runtime directory must be
//! root's alone and its files are never reached through symbolic links, and `--device`
//! never takes (or deletes) an interface it did not create. Needs root.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tpvpn_lab::{show, Lab};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn daemon_pid(lab: &Lab) -> String {
    std::fs::read_to_string(lab.runtime_dir().join("tpvpn.pid")).expect("the daemon's pid file").trim().to_string()
}

/// The user who ran `up` with sudo, and someone else; neither has a passwd entry.
const OWNER: u32 = 4242;
const OTHER: u32 = 65534;

#[test]
fn status_and_list_for_anyone_changes_for_root_or_the_user_who_ran_up() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    let args = lab.up_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // As sudo starts it: root, with the invoking user in SUDO_UID.
    let owner = OWNER.to_string();
    let out = lab.tpvpn_env(&args, &[("SUDO_UID", &owner), ("SUDO_GID", &owner)], Duration::from_secs(30));
    assert!(out.status.success(), "{}", show(&out));

    let status = lab.tpvpn_as(OTHER, &["status", "-o", "json"]);
    assert!(status.status.success() && stdout(&status).contains("\"connected\": true"), "{}", show(&status));
    let list = lab.tpvpn_as(OTHER, &["list"]);
    assert!(list.status.success() && stdout(&list).contains("frontend"), "{}", show(&list));
    for cmd in [&["down"][..], &["leave", "frontend"], &["intercept", "frontend", "--port", "18080:80"]] {
        let out = lab.tpvpn_as(OTHER, cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("root") && err.contains(&owner), "{cmd:?}: {}", show(&out));
    }
    let status = lab.tpvpn(&["status", "-o", "json"]);
    assert!(stdout(&status).contains("\"connected\": true"), "another user's down disconnected: {}", show(&status));
    let down = lab.tpvpn_as(OWNER, &["down"]);
    assert!(down.status.success() && stdout(&down).contains("disconnected"), "{}", show(&down));
}

#[test]
fn a_silent_or_stalled_control_client_never_delays_down() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    let socket = lab.runtime_dir().join("tpvpn.sock");
    // One client connects and says nothing; another asks and never reads.
    let _silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut stalled = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stalled.write_all(b"{\"cmd\":\"list\"}\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = daemon_pid(&lab);
    let start = Instant::now();
    assert!(lab.exec(lab.laptop(), &["kill", "-TERM", &pid]).status.success());
    let gone = tpvpn_lab::wait_until(Duration::from_secs(10), || tpvpn_lab::process_gone(&pid));
    let took = start.elapsed();
    assert!(gone, "the daemon ignored SIGTERM");
    assert!(took < Duration::from_secs(1), "down took {took:?} with a silent control client");
    // And anyone can still ask while clients are silent.
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    let _silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let status = lab.tpvpn(&["status", "-o", "json"]);
    assert!(stdout(&status).contains("\"connected\": true"), "{}", show(&status));
}

#[test]
fn another_user_crowding_the_control_socket_does_not_keep_root_out() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    // Another local user opens 40 silent connections to the control socket and holds them.
    let socket = lab.runtime_dir().join("tpvpn.sock").display().to_string();
    let lab_bin = tpvpn_lab::bin_dir().unwrap().join("tpvpn-lab").display().to_string();
    let other = OTHER.to_string();
    let laptop = lab.laptop().to_string();
    let cmd = [
        "setpriv",
        "--reuid",
        &other,
        "--regid",
        &other,
        "--clear-groups",
        "--",
        &lab_bin,
        "client",
        "hold-unix",
        &socket,
        "40",
        "30",
    ];
    lab.spawn_background(&laptop, "crowd", &cmd).unwrap();
    assert!(
        tpvpn_lab::wait_until(Duration::from_secs(10), || lab.background_log("crowd").contains("connected")),
        "{}",
        lab.background_log("crowd")
    );
    // Root is answered at once, and `down` goes through.
    let status = lab.tpvpn(&["status", "-o", "json"]);
    assert!(
        stdout(&status).contains("\"connected\": true"),
        "root's status behind another user's connections: {}",
        show(&status)
    );
    let down = lab.tpvpn(&["down"]);
    assert!(down.status.success() && stdout(&down).contains("disconnected"), "{}", show(&down));
}

#[test]
fn the_runtime_directory_is_roots_alone_and_its_links_are_not_followed() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    let dir = lab.runtime_dir();
    for (mode, owner) in [(0o777, 0), (0o755, OTHER)] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&dir, Some(owner), None).unwrap();
        let err = lab.up(&[]).expect_err("up with a runtime directory others can write").to_string();
        assert!(err.contains(&dir.display().to_string()) && err.contains("root"), "mode {mode:o} uid {owner}: {err}");
        assert!(!dir.join("state.json").exists(), "up recorded state in a directory others can write");
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
    // Links planted in the directory (say, while it was writable) are not written through.
    let victim = lab.dir().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    for name in ["tpvpn.log", "state.json", "tpvpn.pid"] {
        std::os::unix::fs::symlink(&victim, dir.join(name)).unwrap();
        let _ = lab.up(&[]);
        let _ = lab.tpvpn(&["down"]);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "written through {name}");
        let _ = std::fs::remove_file(dir.join(name));
    }
    lab.up(&[]).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn an_existing_interface_is_never_taken_nor_deleted() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    // Say, a WireGuard interface: here a veth pair stands in for it.
    let out = lab.exec(lab.laptop(), &["ip", "link", "add", "wg0", "type", "veth", "peer", "name", "wg0-peer"]);
    assert!(out.status.success(), "{}", show(&out));
    let err = lab.up(&["--device", "wg0"]).expect_err("up on an existing interface").to_string();
    assert!(err.contains("wg0") && err.contains("exists"), "{err}");
    let down = lab.tpvpn(&["down"]);
    assert!(down.status.success(), "{}", show(&down));
    let link = lab.exec(lab.laptop(), &["ip", "link", "show", "wg0"]);
    assert!(link.status.success(), "wg0 is gone: {}", show(&link));
    assert!(!lab.runtime_dir().join("state.json").exists(), "state recorded for a device tpvpn did not create");
}

#[test]
fn credential_plugins_run_as_the_user_who_ran_up_never_as_root() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    // A kubeconfig whose user authenticates with an exec plugin (as EKS, GKE and AKS
    // kubeconfigs do) that records the uid it runs as.
    let dir = lab.dir().join("plugin");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (plugin, uids) = (dir.join("credential.sh"), dir.join("uids"));
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\nid -u >> {}\nprintf '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{}\"}}}}'\n",
            uids.display(),
            lab.api_token()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kubeconfig = std::fs::read_to_string(lab.kubeconfig()).unwrap().replacen(
        &format!("    token: {}", lab.api_token()),
        &format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never",
            plugin.display()
        ),
        1,
    );
    let kc = dir.join("kubeconfig");
    std::fs::write(&kc, kubeconfig).unwrap();
    let kc = kc.display().to_string();
    let owner = OWNER.to_string();
    let sudo = [("SUDO_UID", owner.as_str()), ("SUDO_GID", owner.as_str())];
    let out = lab.tpvpn_env(&["up", "--kubeconfig", &kc], &sudo, Duration::from_secs(30));
    assert!(out.status.success(), "{}", show(&out));
    // With the manager gone, the daemon reconnects, asking the API server again each time.
    let runs = || std::fs::read_to_string(&uids).unwrap_or_default().lines().count();
    let before = runs();
    lab.stop_manager();
    let again = tpvpn_lab::wait_until(Duration::from_secs(20), || runs() >= before + 2);
    lab.start_manager().unwrap();
    let _ = lab.tpvpn(&["down"]);
    let recorded = std::fs::read_to_string(&uids).unwrap_or_default();
    assert!(before >= 1 && again, "the plugin ran {before} times at up and not again while reconnecting: {recorded:?}");
    assert!(recorded.lines().all(|uid| uid == owner), "the plugin ran as another user (uids: {recorded:?})");
}

#[test]
fn the_daemon_stays_bounded_under_a_local_flood() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    // The daemon with 128 descriptors (`ulimit -n 128`).
    let bin = tpvpn_lab::bin_dir().unwrap().join("tpvpn").display().to_string();
    let up = lab.up_args();
    let mut args = vec!["prlimit", "--nofile=128:128", "--", bin.as_str()];
    args.extend(up.iter().map(String::as_str));
    let rt = lab.runtime_dir().display().to_string();
    let out = lab.exec_env(lab.laptop(), &args, &[("TPVPN_RUNTIME_DIR", rt.as_str())], Duration::from_secs(30));
    assert!(out.status.success(), "{}", show(&out));
    // A local flood: 200 idle TCP connections to the DNS server, held; 5,000 queries for
    // distinct internet names; 5,000 UDP flows into the tunnel.
    let lab_bin = tpvpn_lab::bin_dir().unwrap().join("tpvpn-lab").display().to_string();
    let hold = format!("sleep 30 | {lab_bin} client hold 198.18.0.2:53 200 --seconds 60");
    let laptop = lab.laptop().to_string();
    lab.spawn_background(&laptop, "hold", &["sh", "-c", &hold]).unwrap();
    assert!(
        tpvpn_lab::wait_until(Duration::from_secs(30), || lab.background_log("hold").contains("established")),
        "{}",
        lab.background_log("hold")
    );
    let out =
        lab.lab_tool(lab.laptop(), &["client", "flood", "198.18.0.2:53", "5000", tpvpn_lab::UDP_ECHO_ADDR, "5000"]);
    assert!(stdout(&out).starts_with("flooded"), "{}", show(&out));
    // Internet names still resolve, the tunnel still carries new flows.
    let dig = lab.exec(lab.laptop(), &["dig", "+short", "+time=2", "+tries=2", "docs.rs"]);
    assert_eq!(stdout(&dig).trim(), tpvpn_lab::INTERNET_IP, "{}", show(&dig));
    let echo = lab.lab_tool(lab.laptop(), &["client", "udp", tpvpn_lab::UDP_ECHO_ADDR, "100"]);
    assert!(stdout(&echo).starts_with("ok"), "{}", show(&echo));
    let status = lab.tpvpn(&["status", "-o", "json"]);
    let v: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&status)));
    assert!(v["flows"]["udp"].as_u64().unwrap() <= 4096, "the UDP flow table is unbounded: {v}");
    // And SIGTERM is honoured at once.
    let pid = daemon_pid(&lab);
    let start = Instant::now();
    assert!(lab.exec(lab.laptop(), &["kill", "-TERM", &pid]).status.success());
    let gone = tpvpn_lab::wait_until(Duration::from_secs(10), || tpvpn_lab::process_gone(&pid));
    let took = start.elapsed();
    assert!(gone && took < Duration::from_secs(1), "SIGTERM took {took:?} under the flood");
}
