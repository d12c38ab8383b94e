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
    run_between(lab, (lab.cluster(), None), (lab.laptop(), server), reverse, extra)
}

/// Bits per second received in one iperf3 run from namespace `client.0` to `client.1`
/// (an address), against a fresh server in namespace `server.0` (bound to `server.1`,
/// if given).
pub fn stream_between(lab: &Lab, server: (&str, Option<&str>), client: (&str, &str), reverse: bool) -> Result<f64> {
    let v = run_between(lab, server, client, reverse, &["-t", SECONDS])?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().context("no sum_received in iperf3 output")
}

fn run_between(
    lab: &Lab,
    (server_ns, bind): (&str, Option<&str>),
    (client_ns, server): (&str, &str),
    reverse: bool,
    extra: &[&str],
) -> Result<serde_json::Value> {
    // `-1`: the server serves one client and exits; the guard stops it if it did not.
    let log = lab.dir().join("iperf3-server.log");
    let mut cmd = vec!["iperf3", "-s", "-1"];
    if let Some(b) = bind {
        cmd.extend_from_slice(&["-B", b]);
    }
    let mut daemon = Daemon::spawn(server_ns, &cmd, &[], &log)?;
    let listening = wait_until(Duration::from_secs(5), || {
        let out = lab.exec_timeout(server_ns, &["ss", "-Hltn", "sport = :5201"], Duration::from_secs(5));
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
    let out = lab.exec_timeout(client_ns, &args, Duration::from_secs(60));
    if !out.status.success() {
        bail!("iperf3 {args:?} failed: {}", show(&out));
    }
    serde_json::from_slice(&out.stdout).context("iperf3 json")
}
