//! One TCP stream with iperf3 (Debian package): a fresh `iperf3 -s -1` in the cluster
//! namespace per run, the client in the laptop namespace, for [`SECONDS`] seconds.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tpvpn_lab::{show, wait_until, Lab};

use crate::daemon::Daemon;

/// Seconds per iperf3 run.
pub const SECONDS: &str = "5";

/// Bits per second received in one iperf3 run to `server` (laptop→cluster, or
/// cluster→laptop with `reverse`).
pub fn one_stream(lab: &Lab, server: &str, reverse: bool) -> Result<f64> {
    let v = run(lab, server, reverse, &["-t", SECONDS])?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().context("no sum_received in iperf3 output")
}

/// One iperf3 client run from the laptop namespace to `server` with `extra` arguments,
/// against a fresh `iperf3 -s -1` in the cluster namespace; iperf3's JSON report.
pub fn run(lab: &Lab, server: &str, reverse: bool, extra: &[&str]) -> Result<serde_json::Value> {
    // `-1`: the server serves one client and exits; the guard stops it if it did not.
    let log = lab.dir().join("iperf3-server.log");
    let mut daemon = Daemon::spawn(lab.cluster(), &["iperf3", "-s", "-1"], &[], &log)?;
    let listening = wait_until(Duration::from_secs(5), || {
        let out = lab.exec_timeout(lab.cluster(), &["ss", "-Hltn", "sport = :5201"], Duration::from_secs(5));
        !out.stdout.is_empty()
    });
    if !listening {
        daemon.check_running()?;
        bail!("iperf3 -s not listening after 5 s");
    }
    let mut args = vec!["iperf3", "-c", server, "-J", "--connect-timeout", "5000"];
    args.extend_from_slice(extra);
    if reverse {
        args.push("-R");
    }
    let out = lab.exec_timeout(lab.laptop(), &args, Duration::from_secs(60));
    if !out.status.success() {
        bail!("iperf3 {args:?} failed: {}", show(&out));
    }
    serde_json::from_slice(&out.stdout).context("iperf3 json")
}
