//! The large-cluster section: a lab whose API stand-in holds 50,000 Services (three
//! ports each, ordinary names) in 5,000 namespaces. Measured: `tpvpn up` to connected
//! (the command's wall time, which includes the catalog snapshot the daemon waits for),
//! against the same in the ordinary lab, p50 of a few runs. Bar (design brief): ≤ 500 ms.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tpvpn_lab::{show, Lab};

const SERVICES: usize = 50_000;
const NAMESPACES: usize = 5_000;
const RUNS: usize = 5;
/// The bar: `up` to connected, ms.
const UP_MS: f64 = 500.0;

fn fixtures() -> Vec<Value> {
    let mut objs: Vec<Value> = (0..NAMESPACES)
        .map(|i| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("team-{i:04}")}}))
        .collect();
    for i in 0..SERVICES {
        let ip = format!("10.100.{}.{}", i / 256, i % 256);
        objs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("payments-api-{i}"), "namespace": format!("team-{:04}", i % NAMESPACES)},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [
                {"name": "http", "port": 80}, {"name": "grpc", "port": 9090}, {"name": "metrics", "port": 9102}]}}));
    }
    objs
}

/// p50 of `RUNS` `tpvpn up` (then `down`) wall times, ms.
fn up_p50(lab: &Lab) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let args = lab.up_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let start = Instant::now();
        let out = lab.tpvpn_env(&args, &[], Duration::from_secs(60));
        let t = start.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(out.status.success(), "tpvpn up: {}", show(&out));
        times.push(t);
        let down = lab.tpvpn(&["down"]);
        anyhow::ensure!(down.status.success(), "tpvpn down: {}", show(&down));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

pub fn section(lab: &mut Lab) -> Result<()> {
    // The ordinary lab first (tpvpn is up there: take it down for the measurement).
    let _ = lab.tpvpn(&["down"]);
    let small = up_p50(lab)?;
    lab.up(&[])?;
    let large_lab = Lab::with_fixtures(fixtures()).context("the large lab")?;
    let large = up_p50(&large_lab)?;
    let rss = |lab: &Lab| -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", lab.manager_pid()?)).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
    };
    println!("## Large cluster: {SERVICES} Services in {NAMESPACES} namespaces");
    println!();
    println!("`tpvpn up` to connected (the command's wall time: connect, routes, DNS, the whole catalog), p50 of {RUNS}, then down.");
    println!();
    println!("| lab | up p50 | manager RSS |");
    println!("| --- | --- | --- |");
    let kib = |v: Option<u64>| v.map_or("?".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0));
    println!("| the ordinary lab (10 Services) | {small:.0} ms | {} |", kib(rss(lab)));
    println!("| {SERVICES} Services, {NAMESPACES} namespaces | {large:.0} ms | {} |", kib(rss(&large_lab)));
    println!();
    let met = if large <= UP_MS { "met" } else { "**missed**" };
    println!("| large cluster against the bar | measured | bar | |");
    println!("| --- | --- | --- | --- |");
    println!("| `up` with {SERVICES} Services | {large:.0} ms | ≤ {UP_MS:.0} ms | {met} |");
    println!();
    println!(
        "Manager memory per connected client with this catalog: `manager/tests/scale.rs` (200 clients; the test prints it)."
    );
    println!();
    Ok(())
}
