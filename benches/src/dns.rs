//! DNS rows of the benchmark: dnsperf (Debian package) against tpvpn's resolver and
//! against the lab's cluster DNS (dnsmasq), same names, same settings, same run.
//!
//! - tpvpn: `198.18.0.2` from the laptop namespace. The names are those of Services the
//!   manager pushes, so tpvpn answers them from its table, without a round trip.
//! - dnsmasq: the lab's cluster DNS on `10.96.0.53`, with dnsperf in the cluster namespace
//!   (local, no tunnel). It has a `host-record` for each of the same names.
//!
//! Per server: one saturating run of [`SECONDS`] s (dnsperf's defaults: one client, up to
//! [`OUTSTANDING`] queries outstanding), giving queries per second and average latency;
//! then one run at a fixed rate (half the lower of the two saturated rates, at most
//! [`MAX_FIXED_QPS`]) with `-v`, whose per-query latencies give p50 and p99 when neither
//! server is saturated (under saturation latency is only outstanding / QPS).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tpvpn_lab::{show, Lab, CLUSTER_DNS_IP};

use crate::wan::tpvpn_connected;

/// tpvpn's DNS server address (on `tpvpn0`).
pub const TPVPN_DNS: &str = "198.18.0.2";
/// Seconds of the saturating run.
pub const SECONDS: u32 = 10;
/// Seconds of the fixed-rate latency run.
pub const LATENCY_SECONDS: u32 = 5;
/// Queries outstanding at once (dnsperf `-q`, its default).
pub const OUTSTANDING: u32 = 100;
/// Upper bound of the fixed rate of the latency run.
pub const MAX_FIXED_QPS: f64 = 20_000.0;
/// Names asked, type A: every IPv4 Service of the lab's fixtures in a routed namespace (the
/// `rs` namespace is a public suffix, never a routing domain, so `svc.rs` is left out).
pub const NAMES: &[&str] = &[
    "frontend.default.svc.cluster.local",
    "redis-leader.default.svc.cluster.local",
    "udp-echo.default.svc.cluster.local",
    "test-servers.default.svc.cluster.local",
    "kube-dns.kube-system.svc.cluster.local",
    "tpvpn-manager.tpvpn.svc.cluster.local",
];

/// One server's results.
struct Measured {
    qps: f64,
    avg: Duration,
    completed_percent: f64,
    p50: Duration,
    p99: Duration,
    fixed_qps: f64,
}

/// Runs the DNS section and returns its markdown.
pub fn run(lab: &mut Lab) -> Result<String> {
    let was_up = tpvpn_connected(lab);
    if !was_up {
        lab.up(&[])?;
    }
    let result = measure(lab);
    if !was_up {
        let _ = lab.tpvpn(&["down"]);
    }
    result
}

fn measure(lab: &Lab) -> Result<String> {
    let file = lab.dir().join("dnsperf-queries.txt");
    std::fs::write(&file, NAMES.iter().map(|n| format!("{n} A\n")).collect::<String>())?;
    let file = file.display().to_string();
    let servers =
        [("tpvpn (local table)", lab.laptop(), TPVPN_DNS), ("dnsmasq (cluster DNS)", lab.cluster(), CLUSTER_DNS_IP)];
    // Same answers from both, and tpvpn knows every name as a Service.
    let list = lab.tpvpn(&["list", "-o", "json"]);
    let list = String::from_utf8_lossy(&list.stdout);
    for name in NAMES {
        let svc = name.split('.').next().unwrap_or_default();
        if !list.contains(&format!("\"{svc}\"")) {
            bail!("tpvpn list does not show Service {svc}: {list}");
        }
        let answers: Vec<String> = servers.iter().map(|(_, ns, ip)| dig(lab, ns, ip, name)).collect::<Result<_>>()?;
        if answers[0].is_empty() || answers[0] != answers[1] {
            bail!("{name}: tpvpn answers {:?}, dnsmasq {:?}", answers[0], answers[1]);
        }
    }
    let mut saturated = Vec::new();
    for (label, ns, ip) in servers {
        eprintln!("dns: dnsperf against {label}, {SECONDS} s");
        let l = SECONDS.to_string();
        let q = OUTSTANDING.to_string();
        let out = dnsperf(lab, ns, &["-s", ip, "-d", &file, "-l", &l, "-q", &q, "-t", "2"])?;
        saturated.push(out);
    }
    let fixed =
        (saturated.iter().map(|s| s.qps).fold(f64::INFINITY, f64::min) / 2.0).min(MAX_FIXED_QPS).floor().max(100.0);
    let mut rows = Vec::new();
    for ((label, ns, ip), sat) in servers.into_iter().zip(saturated) {
        eprintln!("dns: dnsperf against {label}, {fixed} queries/s, {LATENCY_SECONDS} s");
        let (l, rate) = (LATENCY_SECONDS.to_string(), format!("{fixed}"));
        let lat = dnsperf(lab, ns, &["-s", ip, "-d", &file, "-l", &l, "-Q", &rate, "-t", "2", "-v"])?;
        rows.push((
            label,
            Measured {
                qps: sat.qps,
                avg: sat.avg,
                completed_percent: sat.completed_percent,
                p50: lat.p50,
                p99: lat.p99,
                fixed_qps: fixed,
            },
        ));
    }
    Ok(render(&rows))
}

fn render(rows: &[(&str, Measured)]) -> String {
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    let mut s = format!(
        "DNS: dnsperf, {} A names (Services), saturating run {SECONDS} s ({OUTSTANDING} outstanding), then {LATENCY_SECONDS} s at a fixed rate for p50/p99\n\n",
        NAMES.len()
    );
    s += "| server | queries/s | avg latency (saturated) | completed | p50 / p99 at fixed rate | fixed rate |\n";
    s += "| --- | --- | --- | --- | --- | --- |\n";
    for (label, m) in rows {
        s += &format!(
            "| {label} | {:.0} | {} | {:.2}% | {} / {} | {:.0}/s |\n",
            m.qps,
            us(m.avg),
            m.completed_percent,
            us(m.p50),
            us(m.p99),
            m.fixed_qps
        );
    }
    if let [(_, t), (_, d)] = rows {
        s += &format!(
            "\ntpvpn / dnsmasq: queries/s {:.2}×, p50 {:.2}× (bar, design brief §6: queries/s ≥ 1×, p50 ≤ 1×)\n",
            t.qps / d.qps,
            t.p50.as_secs_f64() / d.p50.as_secs_f64()
        );
    }
    s
}

/// `dig +short` from `ns` at `server`: the sorted answer lines.
fn dig(lab: &Lab, ns: &str, server: &str, name: &str) -> Result<String> {
    let at = format!("@{server}");
    let out = lab.exec_timeout(ns, &["dig", "+short", "+time=2", "+tries=1", &at, name, "A"], Duration::from_secs(10));
    if !out.status.success() {
        bail!("dig {at} {name}: {}", show(&out));
    }
    let mut lines: Vec<&str> = std::str::from_utf8(&out.stdout)?.lines().collect();
    lines.sort_unstable();
    Ok(lines.join(","))
}

/// What one dnsperf run printed: its summary and, with `-v`, per-query percentiles.
struct DnsperfOut {
    qps: f64,
    avg: Duration,
    completed_percent: f64,
    p50: Duration,
    p99: Duration,
}

fn dnsperf(lab: &Lab, ns: &str, args: &[&str]) -> Result<DnsperfOut> {
    let mut cmd = vec!["dnsperf"];
    cmd.extend_from_slice(args);
    let out = lab.exec_timeout(ns, &cmd, Duration::from_secs(120));
    if !out.status.success() {
        bail!("dnsperf {args:?} failed: {}", show(&out));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> Result<f64> {
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .with_context(|| format!("no {key:?} in dnsperf output:\n{text}"))?;
        let v = line.split_whitespace().next().unwrap_or_default();
        v.parse::<f64>().with_context(|| format!("bad {key:?} in dnsperf output: {line:?}"))
    };
    let qps = field("Queries per second:")?;
    let avg = Duration::from_secs_f64(field("Average Latency (s):")?);
    let completed = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries completed:"))
        .and_then(|l| l.split_once('(').and_then(|(_, p)| p.split_once('%')).map(|(p, _)| p.trim().to_string()))
        .and_then(|p| p.parse::<f64>().ok())
        .unwrap_or(0.0);
    if let Some(codes) = text.lines().find_map(|l| l.trim().strip_prefix("Response codes:")) {
        if codes.split(',').any(|c| !c.trim().starts_with("NOERROR")) {
            bail!("dnsperf {args:?}: answers other than NOERROR: {codes}");
        }
    }
    // `-v`: one line per query, `> NOERROR <name> A <seconds>`; any other rcode fails.
    let mut latencies = Vec::new();
    for l in text.lines().filter(|l| l.starts_with("> ")) {
        let words: Vec<&str> = l.split_whitespace().collect();
        if words.get(1) != Some(&"NOERROR") {
            bail!("dnsperf: unexpected answer {l:?}");
        }
        if let Some(secs) = words.last().and_then(|w| w.parse::<f64>().ok()) {
            latencies.push(Duration::from_secs_f64(secs));
        }
    }
    if args.contains(&"-v") && latencies.is_empty() {
        bail!("dnsperf -v printed no per-query lines:\n{text}");
    }
    let p = |q| crate::wan::percentile(&latencies, q);
    Ok(DnsperfOut { qps, avg, completed_percent: completed, p50: p(50), p99: p(99) })
}
