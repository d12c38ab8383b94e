//! Version skew in the lab: the `tpvpn` client of the last release that spoke only tpvpn
//! protocol v1 (`target/compat/v1`, built by `scripts/build-compat.sh` from this
//! repository's history) against this manager: `up`, traffic, `status`, `down`. (This
//! client against the old manager: `client/tests/compat.rs`.) Needs root.

use std::path::PathBuf;
use std::time::Duration;

use tpvpn_lab::{show, Lab};

fn old_client() -> PathBuf {
    let dir = std::env::var_os("TPVPN_COMPAT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/compat/v1"));
    let bin = dir.join("tpvpn");
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
