//! `tpvpn-bench`: the end-to-end benchmark. Builds a lab, runs iperf3 (Debian package)
//! from the laptop namespace to an iperf3 server in the cluster namespace, once over the
//! direct veth path (the cluster node's address) and once through tpvpn (a ClusterIP),
//! in each direction, in the same run, and prints one table.
//!
//! Then the WAN rows ([`wan`]: an emulated 20 ms RTT link at 0% and 1% loss) and the DNS
//! rows ([`dns`]: dnsperf against tpvpn's resolver and dnsmasq).
//!
//! Run it with `sudo ./scripts/bench.sh`. Traffic stays inside the lab's namespaces; every
//! run is bounded by iperf3's duration. `tpvpn-bench [veth] [wan] [dns]` runs only the
//! sections named (all without arguments).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tpvpn_lab::{require_root, show, Lab, TEST_SERVERS_IP};

mod dns;
mod wan;

/// Seconds per iperf3 run.
const SECONDS: &str = "5";
/// The cluster node's address on the laptop-cluster veth: the direct path.
const NODE_IP: &str = "10.250.1.1";

struct Row {
    path: &'static str,
    up: f64,
    down: f64,
}

fn iperf(lab: &Lab, server: &str, reverse: bool) -> Result<f64> {
    let mut args = vec!["iperf3", "-c", server, "-t", SECONDS, "-J"];
    if reverse {
        args.push("-R");
    }
    let out = lab.exec_timeout(lab.laptop(), &args, Duration::from_secs(60));
    if !out.status.success() {
        bail!("iperf3 to {server} failed: {}", show(&out));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 json")?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().context("no sum_received in iperf3 output")
}

fn main() -> Result<()> {
    if !require_root() {
        bail!("the benchmark needs root (network namespaces): run sudo ./scripts/bench.sh");
    }
    let sections: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| sections.is_empty() || sections.iter().any(|a| a == s);
    let mut lab = Lab::new()?;
    if want("veth") {
        veth(&lab)?;
    }
    let mut failed = Vec::new();
    type Section = fn(&mut Lab) -> Result<String>;
    let extra: [(&str, Section); 2] = [("wan", wan::run), ("dns", dns::run)];
    for (name, run) in extra {
        if want(name) {
            match run(&mut lab) {
                Ok(table) => println!("\n{table}"),
                Err(e) => {
                    eprintln!("tpvpn-bench: section {name} failed: {e:#}");
                    failed.push(name);
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("failed sections: {}", failed.join(", "));
    }
    Ok(())
}

/// One TCP stream over the direct veth path and through tpvpn, both directions.
fn veth(lab: &Lab) -> Result<()> {
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", lab.cluster(), "iperf3", "-s", "-1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut run = || -> Result<Vec<Row>> {
        lab.up(&[])?;
        let mut rows = Vec::new();
        for (path, ip) in [("direct veth", NODE_IP), ("tpvpn", TEST_SERVERS_IP)] {
            let mut r = Row { path, up: 0.0, down: 0.0 };
            for reverse in [false, true] {
                // iperf3 -s -1 serves one client; restart it for each run.
                let _ = server.kill();
                let _ = server.wait();
                server = std::process::Command::new("ip")
                    .args(["netns", "exec", lab.cluster(), "iperf3", "-s", "-1"])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .context("starting iperf3 -s")?;
                std::thread::sleep(Duration::from_millis(300));
                let bps = iperf(lab, ip, reverse)?;
                if reverse {
                    r.down = bps;
                } else {
                    r.up = bps;
                }
            }
            rows.push(r);
        }
        Ok(rows)
    };
    let rows = run();
    let _ = server.kill();
    let _ = server.wait();
    let rows = rows?;
    let direct = &rows[0];
    println!("one TCP stream, iperf3 -t {SECONDS}, laptop namespace -> cluster namespace");
    println!();
    println!("| path | laptop→cluster | cluster→laptop | ratio to direct (→ / ←) |");
    println!("| --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {:.2} Gbit/s | {:.2} Gbit/s | {:.3} / {:.3} |",
            r.path,
            r.up / 1e9,
            r.down / 1e9,
            r.up / direct.up,
            r.down / direct.down
        );
    }
    Ok(())
}
