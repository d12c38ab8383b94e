//! The personal-intercept section: small HTTP/1.1 keep-alive requests (wrk from the
//! caller pod, nginx's `/` in pod web-0) sent to the pod directly, then with a personal
//! intercept of the port in place, so that the agent reads every request and passes
//! those without the header to the pod over its own upstream connections; and, for
//! scale, the requests that carry the header and reach the laptop's nginx through the
//! tunnel. Bar (issue 12): the pass-through adds at most 100 µs at p50 and keeps at
//! least 0.7× the direct request rate. A plain byte relay in the pod, in front of the
//! same nginx, is measured too: a reference point for what a userspace proxy in the
//! path costs here.

use anyhow::{bail, Context, Result};
use tpvpn_lab::{show, Lab};

/// The bar: pass-through request rate against direct.
const RATE_FRACTION: f64 = 0.7;
/// The bar: added p50 latency, µs.
const ADDED_P50_US: f64 = 100.0;
const SECONDS: u32 = 5;
const CONNECTIONS: u32 = 16;

struct Run {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `153.00us`, `1.20ms`, `2.00s` in µs.
fn micros(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

fn parse(text: &str) -> Option<Run> {
    let mut run = Run { rate: 0.0, p50_us: 0.0, p99_us: 0.0 };
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("50%"), Some(v)) => run.p50_us = micros(v)?,
            (Some("99%"), Some(v)) => run.p99_us = micros(v)?,
            (Some("Requests/sec:"), Some(v)) => run.rate = v.parse().ok()?,
            _ => {}
        }
    }
    (run.rate > 0.0).then_some(run)
}

fn wrk(lab: &Lab, url: &str, header: Option<&str>) -> Result<Run> {
    let (c, d) = (CONNECTIONS.to_string(), format!("{SECONDS}s"));
    let mut args = vec!["wrk", "-t2", "-c", &c, "-d", &d, "--latency"];
    if let Some(h) = header {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = lab.exec_timeout(lab.caller(), &args, std::time::Duration::from_secs(u64::from(SECONDS) + 20));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk {args:?}: {}", show(&out));
    }
    parse(&text).with_context(|| format!("wrk output: {text}"))
}

pub fn section(lab: &mut Lab) -> Result<()> {
    if lab.pod_ns("web-0").is_none() {
        lab.start_pods().context("pods for the personal-intercept section")?;
    }
    lab.start_laptop_web(18890, "laptop")?;
    let pod = lab.pod_ip("web-0").context("pod web-0")?.to_string();
    let url = &format!("http://{pod}:8080/");
    // The same page through a plain byte relay in the pod (`tpvpn-lab relay`).
    lab.start_pod_relay("web-0", format!("{pod}:8095").parse()?, format!("{pod}:8080").parse()?)?;
    let direct = wrk(lab, url, None)?;
    let relayed = wrk(lab, &format!("http://{pod}:8095/"), None)?;
    let out = lab.tpvpn(&["intercept", "web", "--port", "18890:http", "--http-header", "x-dev=bench"]);
    anyhow::ensure!(out.status.success(), "tpvpn intercept --http-header: {}", show(&out));
    let runs = (|| Ok::<_, anyhow::Error>((wrk(lab, url, None)?, wrk(lab, url, Some("x-dev: bench"))?)))();
    let _ = lab.tpvpn(&["leave", "web"]);
    let (passed, routed) = runs?;

    println!("## Personal intercepts: HTTP/1.1 keep-alive requests through the agent");
    println!();
    println!(
        "wrk -t2 -c{CONNECTIONS} -d{SECONDS}s --latency from the caller pod to {url} (nginx's index page). \
         Direct: no intercept. Pass-through: `tpvpn intercept web --port 18890:http --http-header x-dev=bench` \
         in place, requests without the header (the agent reads each and sends it to the pod over an upstream \
         connection of that caller connection's own, from the caller's address). Matched: requests with the header, to the laptop's nginx through the tunnel. \
         For reference, a plain byte relay (`tpvpn-lab relay`, tokio, two worker threads as the agent) in the \
         pod in front of the same nginx: a reference point for what a userspace proxy in the path costs here."
    );
    println!();
    println!("| path | requests/s | p50 | p99 |");
    println!("| --- | --- | --- | --- |");
    for (name, r) in [
        ("direct to the pod", &direct),
        ("reference: a plain byte relay in the pod", &relayed),
        ("pass-through (no header) via the agent", &passed),
        ("matched, to the laptop", &routed),
    ] {
        println!("| {name} | {:.0} | {:.0} µs | {:.0} µs |", r.rate, r.p50_us, r.p99_us);
    }
    println!();
    let met = |b: bool| if b { "met" } else { "**missed**" };
    let (fraction, added) = (passed.rate / direct.rate, passed.p50_us - direct.p50_us);
    println!("| pass-through against the bar | measured | bar | |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| request rate against direct | {fraction:.2}× | ≥ {RATE_FRACTION}× | {} |",
        met(fraction >= RATE_FRACTION)
    );
    println!("| added p50 | {added:.0} µs | ≤ {ADDED_P50_US} µs | {} |", met(added <= ADDED_P50_US));
    println!(
        "| (reference) the plain relay: rate, added p50 | {:.2}×, {:.0} µs | | |",
        relayed.rate / direct.rate,
        relayed.p50_us - direct.p50_us
    );
    println!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 5s test @ http://10.244.2.10:8080/\n  2 threads and 16 connections\n  Latency Distribution\n     50%  153.00us\n     75%  200.00us\n     99%    1.20ms\n  100 requests in 5.00s, 1 MB read\nRequests/sec:  52345.12\nTransfer/sec:      1.00MB\n";
        let r = parse(text).unwrap();
        assert_eq!((r.rate, r.p50_us, r.p99_us), (52345.12, 153.0, 1200.0));
        assert!(parse("nothing").is_none());
    }
}
