//! The scale run: 10,000 idle TCP connections held open through one `tpvpn` client while
//! one bulk stream runs. Reports how many were established, the client daemon's resident
//! memory per idle flow (VmRSS of the daemon before and after opening them, divided by
//! the count), and the bulk stream's throughput without and with the idle flows.
//!
//! The idle connections are opened by `tpvpn-lab client hold` in the laptop namespace to
//! the lab's sink server (a ClusterIP), so every one of them is a real flow through the
//! netstack, the QUIC connection and a manager-side socket.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tpvpn_lab::{Lab, SINK_ADDR, TEST_SERVERS_IP};

/// Idle connections held open during the run.
pub const FLOWS: usize = 10_000;
/// Bulk streams run without and with the idle flows; the median is reported.
const BULK_RUNS: usize = 3;

pub struct Scale {
    pub flows: usize,
    pub established: usize,
    /// Flows the client's netstack reported while they were held (`tpvpn status`).
    pub client_flows: usize,
    pub rss_before: u64,
    pub rss_after: u64,
    /// Bulk throughput (bits/s) without and with the idle flows.
    pub bulk_alone: f64,
    pub bulk_with_idle: f64,
}

impl Scale {
    pub fn bytes_per_flow(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.established.max(1) as f64
    }

    pub fn print(&self) {
        println!("### {} concurrent TCP flows through one client", self.flows);
        println!();
        println!("| what | value |");
        println!("| --- | --- |");
        println!(
            "| established | {} of {} (client netstack: {} TCP flows) |",
            self.established, self.flows, self.client_flows
        );
        println!(
            "| client memory (VmRSS) | {:.1} MiB idle → {:.1} MiB with the flows: {:.1} KiB per idle flow |",
            self.rss_before as f64 / 1048576.0,
            self.rss_after as f64 / 1048576.0,
            self.bytes_per_flow() / 1024.0
        );
        println!(
            "| bulk stream (iperf3 →, median of {BULK_RUNS}) | {:.2} Gbit/s alone, {:.2} Gbit/s beside the idle flows ({:.0}%) |",
            self.bulk_alone / 1e9,
            self.bulk_with_idle / 1e9,
            100.0 * self.bulk_with_idle / self.bulk_alone
        );
        println!();
    }
}

/// The daemon's resident memory in bytes.
fn daemon_rss(lab: &Lab) -> Result<u64> {
    let pid = std::fs::read_to_string(lab.runtime_dir().join("tpvpn.pid")).context("reading tpvpn.pid")?;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).context("reading the daemon's status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

fn client_tcp_flows(lab: &Lab) -> usize {
    let out = lab.tpvpn(&["status", "-o", "json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["flows"]["tcp"].as_u64())
        .map_or(0, |n| n as usize)
}

/// The scale section: runs the case and prints its table.
pub fn section(lab: &Lab) -> Result<()> {
    run(lab).map(|s| s.print())
}

fn run(lab: &Lab) -> Result<Scale> {
    // The median of BULK_RUNS streams: one 5 s stream varies by tens of percent here.
    let bulk = || -> Result<f64> {
        let mut runs = (0..BULK_RUNS)
            .map(|_| crate::iperf::one_stream(lab, TEST_SERVERS_IP, false))
            .collect::<Result<Vec<f64>>>()?;
        runs.sort_by(f64::total_cmp);
        Ok(runs[BULK_RUNS / 2])
    };
    let bulk_alone = bulk()?;
    let rss_before = daemon_rss(lab)?;
    let bin = tpvpn_lab::bin_dir()?.join("tpvpn-lab");
    let mut hold = Command::new("ip")
        .args(["netns", "exec", lab.laptop()])
        .arg(&bin)
        .args(["client", "hold", SINK_ADDR, &FLOWS.to_string(), "--seconds", "300"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting tpvpn-lab client hold")?;
    // Kept until the process ended: it prints one more line when it releases the flows.
    let mut out = BufReader::new(hold.stdout.take().context("no stdout")?);
    let result = (|| -> Result<Scale> {
        let mut line = String::new();
        out.read_line(&mut line)?;
        let established: usize = line
            .strip_prefix("established ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected output of client hold: {line:?}"))?;
        // Let the last handshakes and acknowledgements settle before measuring.
        std::thread::sleep(Duration::from_secs(1));
        let client_flows = client_tcp_flows(lab);
        let rss_after = daemon_rss(lab)?;
        let bulk_with_idle = bulk()?;
        Ok(Scale { flows: FLOWS, established, client_flows, rss_before, rss_after, bulk_alone, bulk_with_idle })
    })();
    // Closing stdin releases the connections; the process is ours, stop it if it lingers.
    drop(hold.stdin.take());
    if !tpvpn_lab::wait_until(Duration::from_secs(30), || matches!(hold.try_wait(), Ok(Some(_)))) {
        let _ = hold.kill();
    }
    let _ = hold.wait();
    let scale = result?;
    if scale.established == 0 {
        bail!("no connection was established");
    }
    Ok(scale)
}
