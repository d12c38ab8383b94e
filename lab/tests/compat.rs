//! Version skew in the lab, with earlier releases built by `scripts/build-compat.sh` from
//! this repository's history: the v1 client (`target/compat/v1`) against this manager
//! (`up`, traffic, `status`, `down`; this client against a v1 manager:
//! `client/tests/compat.rs`); the v2 release (`target/compat/v2`, no personal
//! intercepts) against this one in every pairing of client, manager and agent; and the
//! release whose mounts were read-only only (`target/compat/mounts-ro`). Needs root.

use std::path::PathBuf;
use std::time::Duration;

use tpvpn_lab::{show, wait_until, Lab};

fn old_client() -> PathBuf {
    release("v1", "tpvpn")
}

/// Binary `name` of release `v` (`TPVPN_COMPAT_DIR/v`, default `target/compat/v`).
fn release(v: &str, name: &str) -> PathBuf {
    let dir = std::env::var_os("TPVPN_COMPAT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/compat"))
        .join(v);
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/build-compat.sh (the README's test command does)",
        bin.display()
    );
    bin
}

#[test]
fn a_v1_client_connects_to_this_manager_and_carries_traffic() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    let old = old_client();
    let run = |args: &[&str]| lab.tpvpn_bin(&old, args, &[], Duration::from_secs(60));
    let up_args = lab.up_args();
    let up: Vec<&str> = up_args.iter().map(String::as_str).collect();
    let out = run(&up);
    assert!(out.status.success(), "the v1 client's up failed:\n{}\nmanager log:\n{}", show(&out), lab.manager_log());

    let curl = lab.exec(lab.laptop(), &["curl", "-sS", "--max-time", "5", "http://10.96.0.10/"]);
    assert!(String::from_utf8_lossy(&curl.stdout).contains(tpvpn_lab::FRONTEND_BODY), "{}", show(&curl));
    let ping = lab.exec(lab.laptop(), &["redis-cli", "-h", tpvpn_lab::REDIS_IP, "ping"]);
    assert_eq!(String::from_utf8_lossy(&ping.stdout).trim(), "PONG", "{}", show(&ping));
    let dig = lab.exec(lab.laptop(), &["dig", "+short", "+time=2", "frontend.default.svc.cluster.local"]);
    assert_eq!(String::from_utf8_lossy(&dig.stdout).trim(), tpvpn_lab::FRONTEND_IP, "{}", show(&dig));

    let status = run(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_else(|_| panic!("{}", show(&status)));
    assert_eq!(v["connected"], true, "{v}");
    // This build's `version` names the older daemon running.
    let said = String::from_utf8_lossy(&lab.tpvpn(&["version"]).stdout).to_string();
    assert!(said.contains("daemon:  tpvpn older than") && said.contains("too old to say its protocol"), "{said}");
    assert!(
        lab.manager_log().contains("client authenticated version=1"),
        "the manager did not accept it at v1:\n{}",
        lab.manager_log()
    );

    let down = run(&["down"]);
    assert!(down.status.success(), "{}", show(&down));
    let link = lab.exec(lab.laptop(), &["ip", "link", "show", "tpvpn0"]);
    assert!(!link.status.success(), "tpvpn0 left after the v1 client's down");
    drop::<Lab>(lab);
}

#[track_caller]
fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

/// One line on stderr, containing every one of `want`.
#[track_caller]
fn assert_refused(out: &std::process::Output, want: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && want.iter().all(|w| err.contains(w)), "expected {want:?}:\n{}", show(out));
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn v2_and_v3_intercept_together_and_personal_intercepts_and_mounts_name_the_side_to_upgrade() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    let v2 = |name: &str| release("v2", name);
    if !lab.start_pods_or_skip() {
        return;
    }
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let pod = &format!("http://{}:8080/", lab.pod_ip("web-0").expect("pod web-0"));
    let reaches = |lab: &Lab, body: &str| {
        let out = lab.exec_timeout(lab.caller(), &["curl", "-sS", "--max-time", "5", pod], Duration::from_secs(10));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(body),
            "expected {body:?}: {}\n{}",
            show(&out),
            lab.agent_log()
        );
    };
    let up_args = lab.up_args();
    let up: Vec<&str> = up_args.iter().map(String::as_str).collect();

    // A v2 client, this manager and agent: it connects at v2 and intercepts as before.
    let old = |lab: &Lab, args: &[&str]| lab.tpvpn_bin(&v2("tpvpn"), args, &[], Duration::from_secs(60));
    assert_ok(&old(&lab, &up), "the v2 client's up");
    assert!(lab.manager_log().contains("client authenticated version=2"), "{}", lab.manager_log());
    assert_ok(&old(&lab, &["intercept", "web", "--port", "18888:http"]), "the v2 client's global intercept");
    reaches(&lab, "answered by the laptop");
    assert_ok(&old(&lab, &["down"]), "the v2 client's down");
    reaches(&lab, "pod web-0");

    // This client with a v2 manager and agent (a cluster not upgraded yet): personal
    // intercepts are refused naming the manager; global ones work.
    lab.use_manager_bin(Some(&v2("tpvpn-manager"))).unwrap();
    lab.use_agent_bin(Some(&v2("tpvpn-agent"))).unwrap();
    lab.up(&[]).unwrap();
    let personal = ["intercept", "web", "--port", "18888:http", "--http-header", "x-dev=a"];
    assert_refused(&lab.tpvpn(&personal), &["protocol v2", "personal intercepts", "upgrade the manager"]);
    assert_ok(&lab.tpvpn(&["intercept", "web", "--port", "18888:http"]), "a global intercept through the v2 manager");
    reaches(&lab, "answered by the laptop");
    assert_refused(&lab.tpvpn(&["revoke", "web"]), &["cannot end others' intercepts", "upgrade the manager"]);
    let dir = lab.dir().join("files").display().to_string();
    let mount = ["intercept", "web", "--port", "18888:http", "--mount", &dir];
    assert_refused(&lab.tpvpn(&mount), &["cannot serve a pod's files (--mount)", "upgrade the manager"]);
    // What users check first when the sides disagree: each side's version.
    let version = lab.tpvpn(&["version"]);
    let said = String::from_utf8_lossy(&version.stdout).to_string();
    assert!(said.contains(&format!("client:  tpvpn {}", env!("CARGO_PKG_VERSION"))), "{said}");
    assert!(said.contains("daemon:  tpvpn ") && said.contains("manager: protocol v1-v2, speaking v2"), "{said}");
    assert_ok(&lab.tpvpn(&["down"]), "down");

    // This manager and agent: a global intercept of one port, a personal one of another.
    // Then the node's agent is rolled back to v2: it gets the global capture only (a
    // personal one would make it drop the connection, again and again), and new personal
    // intercepts are refused naming the agents.
    lab.use_manager_bin(None).unwrap();
    lab.use_agent_bin(None).unwrap();
    lab.up(&[]).unwrap();
    assert_ok(&lab.tpvpn(&["intercept", "web", "--port", "18888:http"]), "a global intercept");
    assert_ok(&lab.tpvpn(&["intercept", "web", "--port", "18889:alt", "--http-header", "x-dev=a"]), "a personal one");
    let lost = "lost the manager";
    let before = lab.agent_log().matches(lost).count();
    lab.use_agent_bin(Some(&v2("tpvpn-agent"))).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || lab.manager_log().contains("too old for personal intercepts")),
        "{}",
        lab.manager_log()
    );
    // The v2 agent applies the global capture it was sent (not at once).
    let laptop = || {
        let out = lab.exec_timeout(lab.caller(), &["curl", "-sS", "--max-time", "5", pod], Duration::from_secs(10));
        String::from_utf8_lossy(&out.stdout).contains("answered by the laptop")
    };
    assert!(wait_until(Duration::from_secs(10), laptop), "the v2 agent did not capture:\n{}", lab.agent_log());
    let personal = ["intercept", "web", "--port", "18888:http", "--http-header", "x-dev=b"];
    assert_refused(&lab.tpvpn(&personal), &["agent on node lab-node", "protocol v2", "upgrade the agents"]);
    assert_refused(
        &lab.tpvpn(&mount),
        &["--mount", "the agent of node lab-node cannot serve files", "upgrade the agents"],
    );
    assert!(!lab.daemon_mounted(&dir));
    reaches(&lab, "answered by the laptop");
    assert_ok(&lab.tpvpn(&["down"]), "down");
    // The release that `down` caused came after everything sent to the agent when it
    // connected, on the same stream: once the pod answers again, the agent has read all of
    // it, and it must not have dropped its connection on any of it.
    reaches(&lab, "pod web-0");
    assert_eq!(lab.agent_log().matches(lost).count(), before, "the v2 agent lost its connection:\n{}", lab.agent_log());
}

/// `--mount-readwrite` (a feature bit, not a protocol version) against the release before
/// it, both ways: this client with that manager, this manager with that agent (each
/// refused naming the side to upgrade, a read-only mount still made), and that client
/// with this manager and agent (its mount works, read-only).
#[test]
fn a_readwrite_mount_names_the_side_to_upgrade_and_an_older_clients_mount_still_works() {
    if !Lab::fuse_or_skip() {
        return;
    }
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    if !lab.start_pods_or_skip() {
        return;
    }
    let ro = |name: &str| release("mounts-ro", name);
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let dir = lab.dir().join("files").display().to_string();
    let rw = ["intercept", "web", "--port", "18888:http", "--mount", &dir, "--mount-readwrite"];
    let conf = |lab: &Lab| std::fs::read_to_string(lab.daemon_view(&dir).join("etc/config/app.conf"));

    // This client, the older manager and agent.
    lab.use_manager_release(&ro("tpvpn-manager")).unwrap();
    lab.use_agent_bin(Some(&ro("tpvpn-agent"))).unwrap();
    lab.up(&[]).unwrap();
    assert_refused(&lab.tpvpn(&rw), &["cannot write a pod's files (--mount-readwrite)", "upgrade the manager"]);
    assert!(!lab.daemon_mounted(&dir));
    assert_ok(&lab.tpvpn(&rw[..6]), "a read-only mount through the older manager");
    assert_eq!(conf(&lab).unwrap(), tpvpn_lab::pods::APP_CONF);
    assert_ok(&lab.tpvpn(&["down"]), "down");

    // This manager, the older agent: refused naming the agents, before the agent is asked.
    lab.use_manager_bin(None).unwrap();
    lab.use_agent_bin(Some(&ro("tpvpn-agent"))).unwrap();
    lab.up(&[]).unwrap();
    assert_refused(
        &lab.tpvpn(&rw),
        &["--mount", "the agent of node lab-node cannot write a pod's files", "upgrade the agents"],
    );
    assert!(!lab.daemon_mounted(&dir));
    assert_ok(&lab.tpvpn(&rw[..6]), "a read-only mount from the older agent");
    assert_eq!(conf(&lab).unwrap(), tpvpn_lab::pods::APP_CONF);
    assert_ok(&lab.tpvpn(&["down"]), "down");

    // The older client, this manager and agent: its mount is read-only, as it asked.
    lab.use_agent_bin(None).unwrap();
    let old = ro("tpvpn");
    let up_args = lab.up_args();
    let up: Vec<&str> = up_args.iter().map(String::as_str).collect();
    assert_ok(&lab.tpvpn_bin(&old, &up, &[], Duration::from_secs(60)), "the older client's up");
    assert_ok(&lab.tpvpn_bin(&old, &rw[..6], &[], Duration::from_secs(40)), "the older client's mount");
    assert_eq!(conf(&lab).unwrap(), tpvpn_lab::pods::APP_CONF);
    let write = std::fs::write(lab.daemon_view(&dir).join("var/scratch/x"), "x");
    assert_eq!(write.err().and_then(|e| e.raw_os_error()), Some(nix::libc::EROFS));
    assert_ok(&lab.tpvpn_bin(&old, &["down"], &[], Duration::from_secs(60)), "the older client's down");
    assert!(!lab.daemon_mounted(&dir));
}
