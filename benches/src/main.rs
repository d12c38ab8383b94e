//! `tpvpn-bench`: the end-to-end benchmark. Prints the machine, builds a lab, runs
//! `tpvpn up` in its laptop namespace and runs each section in turn; each measures and
//! prints its own markdown table (see the section modules). Traffic stays inside the
//! lab's namespaces; every measurement is bounded in count and time.
//!
//! Run it with `sudo ./scripts/bench.sh`. The subcommands `pingpong-server` and
//! `pingpong` are the latency tools the benchmark runs inside the namespaces
//! ([`latency`]).

mod daemon;
mod iperf;
mod latency;
mod machine;
mod paths;
mod peers;
mod scale;

use anyhow::{bail, Result};
use tpvpn_lab::{require_root, Lab};

/// The cluster node's address on the laptop-cluster veth: the direct path.
const NODE_IP: &str = "10.250.1.1";

/// A section: measures with the lab (tpvpn up) and prints its own table.
type Section = fn(&Lab) -> Result<()>;

/// The benchmark's sections, in the order they run.
const SECTIONS: &[(&str, Section)] = &[("paths", paths::section), ("scale", scale::section)];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("pingpong-server") => return latency::server_cmd(&args[1..]),
        Some("pingpong") => return latency::client_cmd(&args[1..]),
        Some(other) => bail!("unknown subcommand {other:?} (none runs the benchmark; or pingpong-server, pingpong)"),
        None => {}
    }
    if !require_root() {
        bail!("the benchmark needs root (network namespaces): run sudo ./scripts/bench.sh");
    }
    println!("{}", machine::header());
    let lab = Lab::new()?;
    lab.up(&[])?;
    let mut failed = Vec::new();
    for (name, section) in SECTIONS {
        if let Err(e) = section(&lab) {
            eprintln!("section {name} failed: {e:#}");
            failed.push(*name);
        }
    }
    if !failed.is_empty() {
        bail!("sections failed: {}", failed.join(", "));
    }
    Ok(())
}
