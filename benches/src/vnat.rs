//! A stream through a cluster range reached by virtual addresses (`--vnat`) against one
//! through an unmapped range, in the same run: a "VPN" beside the laptop routes
//! `10.96.0.0/12`, so `up` maps the service range `10.96.0.0/16` onto `240.0.0.0/16` while
//! the pod range `10.244.0.0/16` stays as it is. Both streams end at the same iperf3
//! server in the cluster namespace (10.96.0.40 and 10.244.1.10 are both its addresses).
//! The translation happens once per flow (its first packet), never per packet: the two
//! should be equal within noise. Afterwards the VPN's route is removed and tpvpn brought up
//! again as the other sections expect.

use anyhow::{bail, Result};
use tpvpn_lab::{show, Lab, FRONTEND_POD_IP, VPN_GATEWAY};

use crate::iperf;

/// Rounds, each measuring both paths in both directions, alternately.
const ROUNDS: usize = 3;

pub fn section(lab: &mut Lab) -> Result<()> {
    lab.add_vpn()?;
    let route = ["ip", "route", "add", "10.96.0.0/12", "via", VPN_GATEWAY];
    let out = lab.exec(lab.laptop(), &route);
    if !out.status.success() {
        bail!("the VPN's route: {}", show(&out));
    }
    let result = measure(lab);
    let _ = lab.exec(lab.laptop(), &["ip", "route", "del", "10.96.0.0/12", "via", VPN_GATEWAY]);
    let _ = lab.tpvpn(&["down"]);
    lab.up(&[])?;
    let rows = result?;
    println!("## Virtual addresses (--vnat): a mapped range against an unmapped one");
    println!();
    println!(
        "One TCP stream, iperf3 -t {} each, {ROUNDS} rounds alternating; median. Mapped: 240.0.0.40 \
         (cluster 10.96.0.40); unmapped: {FRONTEND_POD_IP}; same server.",
        iperf::SECONDS
    );
    println!();
    println!("| path | laptop→cluster | cluster→laptop |");
    println!("| --- | --- | --- |");
    for (name, up, down) in &rows {
        println!("| {name} | {:.2} Gbit/s | {:.2} Gbit/s |", up / 1e9, down / 1e9);
    }
    println!();
    let (mapped, unmapped) = (&rows[0], &rows[1]);
    println!(
        "Mapped/unmapped: {:.1}% laptop→cluster, {:.1}% cluster→laptop.",
        100.0 * mapped.1 / unmapped.1,
        100.0 * mapped.2 / unmapped.2
    );
    println!();
    Ok(())
}

/// `up` with the VPN's route in place, then the streams; (path, up, down) medians.
fn measure(lab: &Lab) -> Result<Vec<(&'static str, f64, f64)>> {
    let _ = lab.tpvpn(&["down"]);
    lab.up(&[])?;
    let status = lab.tpvpn(&["status", "-o", "json"]);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    if s["vnat"][0]["virtual"] != "240.0.0.0/16" {
        bail!("the service range is not mapped onto 240.0.0.0/16: {s}");
    }
    let paths = [("mapped (240.0.0.40)", "240.0.0.40"), ("unmapped", FRONTEND_POD_IP)];
    let mut samples = vec![(Vec::new(), Vec::new()); paths.len()];
    for _ in 0..ROUNDS {
        for (i, (_, ip)) in paths.iter().enumerate() {
            samples[i].0.push(iperf::one_stream(lab, ip, false)?);
            samples[i].1.push(iperf::one_stream(lab, ip, true)?);
        }
    }
    Ok(paths
        .iter()
        .zip(samples)
        .map(|((name, _), (mut up, mut down))| (*name, median(&mut up), median(&mut down)))
        .collect())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
