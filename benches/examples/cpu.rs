//! Experiment: CPU seconds of the tpvpn daemon and the manager per GB through tpvpn.
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tpvpn_lab::{Lab, TEST_SERVERS_IP};

fn cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn main() -> Result<()> {
    let lab = Lab::new()?;
    lab.up(&[])?;
    let daemon: u32 = std::fs::read_to_string(lab.runtime_dir().join("tpvpn.pid"))?.trim().parse()?;
    let manager = lab.manager_pid().context("no manager")?;
    let bytes: u64 = std::env::var("BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(4 << 30);
    for reverse in
        std::env::var("DIRS").map(|d| if d == "down" { vec![true] } else { vec![false] }).unwrap_or(vec![false, true])
    {
        let mut server = std::process::Command::new("ip")
            .args(["netns", "exec", lab.cluster(), "iperf3", "-s", "-1"])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        let (d0, m0, t0) = (cpu(daemon), cpu(manager), Instant::now());
        let n = bytes.to_string();
        let mut args = vec!["iperf3", "-c", TEST_SERVERS_IP, "-n", &n, "-J"];
        if reverse {
            args.push("-R");
        }
        let out = lab.exec_timeout(lab.laptop(), &args, Duration::from_secs(120));
        let (d1, m1, secs) = (cpu(daemon), cpu(manager), t0.elapsed().as_secs_f64());
        let _ = server.kill();
        let _ = server.wait();
        if !out.status.success() {
            bail!("iperf3 failed: {}", tpvpn_lab::show(&out));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
        let gb = bytes as f64 / 1e9;
        println!(
            "{}: {:.2} Gbit/s; daemon {:.0} ms/GB, manager {:.0} ms/GB (wall {:.1} s)",
            if reverse { "cluster->laptop" } else { "laptop->cluster" },
            bps / 1e9,
            (d1 - d0) * 1000.0 / gb,
            (m1 - m0) * 1000.0 / gb,
            secs
        );
    }
    Ok(())
}
