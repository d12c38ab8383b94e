//! `tpvpn-bench`: the end-to-end benchmark. Prints the machine, builds a lab, runs
//! `tpvpn up` in its laptop namespace and runs each section in turn; each measures and
//! prints its own markdown table (see the section modules). Traffic stays inside the
//! lab's namespaces; every measurement is bounded in count and time.
//!
//! Sections: [`paths`] (direct veth, wireguard-go, boringtun and tpvpn: throughput,
//! ping-pong, connect), [`scale`] (10,000 idle flows beside a bulk stream), [`wan`] (an
//! emulated 20 ms RTT link at 0% and 1% loss), [`dns`] (dnsperf against tpvpn's table
//! and dnsmasq), [`large`] (`up` with 50,000 Services), [`portforward`] (tpvpn through the API
//! server's port-forward against the raw port-forward), [`vnat`] (a stream through a cluster
//! range reached by virtual addresses against one through an unmapped range), [`intercept`] (a cluster caller
//! against a pod, directly and intercepted to the laptop) and [`personal`] (HTTP requests
//! through the agent of a personal intercept against the pod directly).
//!
//! Run it with `sudo ./scripts/bench.sh`; `tpvpn-bench [paths] [scale] [wan] [dns] [large]
//! [portforward] [vnat] [intercept] [personal]` runs only the sections named. The subcommands
//! `pingpong-server` and `pingpong` are the latency tools the benchmark runs inside the
//! namespaces ([`latency`]), `port-forward` the raw port-forward ([`portforward`]).

mod daemon;
mod dns;
mod intercept;
mod iperf;
mod large;
mod latency;
mod machine;
mod mounts;
mod paths;
mod peers;
mod personal;
mod portforward;
mod scale;
mod vnat;
mod wan;

use anyhow::{bail, Result};
use tpvpn_lab::{require_root, Lab};

/// The cluster node's address on the laptop-cluster veth: the direct path.
const NODE_IP: &str = "10.250.1.1";

/// A section: measures with the lab (tpvpn up when it starts) and prints its own table.
type Section = fn(&mut Lab) -> Result<()>;

/// The benchmark's sections, in the order they run.
const SECTIONS: &[(&str, Section)] = &[
    ("paths", |lab| paths::section(lab)),
    ("scale", |lab| scale::section(lab)),
    ("wan", |lab| wan::run(lab).map(|table| println!("{table}"))),
    ("dns", |lab| dns::run(lab).map(|table| println!("{table}"))),
    ("large", |lab| large::section(lab)),
    ("portforward", |lab| portforward::section(lab)),
    ("vnat", |lab| vnat::section(lab)),
    // Last: they add pods and the agent to the lab.
    ("intercept", |lab| intercept::section(lab)),
    ("personal", |lab| personal::section(lab)),
    ("mounts", |lab| mounts::section(lab)),
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("pingpong-server") => return latency::server_cmd(&args[1..]),
        Some("pingpong") => return latency::client_cmd(&args[1..]),
        Some("port-forward") => return portforward::forward_cmd(&args[1..]),
        Some(s) if !SECTIONS.iter().any(|(name, _)| *name == s) => {
            bail!("unknown argument {s:?}: sections are paths, scale, wan, dns, large, portforward, vnat, intercept, personal, mounts; tools are pingpong-server, pingpong, port-forward")
        }
        _ => {}
    }
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if !require_root() {
        bail!("the benchmark needs root (network namespaces): run sudo ./scripts/bench.sh");
    }
    println!("{}", machine::header());
    let mut lab = Lab::new()?;
    lab.up(&[])?;
    let mut failed = Vec::new();
    for (name, section) in SECTIONS.iter().filter(|(name, _)| want(name)) {
        if !wan::tpvpn_connected(&lab) {
            lab.up(&[])?;
        }
        if let Err(e) = section(&mut lab) {
            eprintln!("section {name} failed: {e:#}");
            failed.push(*name);
        }
    }
    if !failed.is_empty() {
        bail!("sections failed: {}", failed.join(", "));
    }
    Ok(())
}
