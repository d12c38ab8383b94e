//! The paths section: the same measurements from the laptop namespace to servers in the
//! cluster namespace over four paths, then tpvpn's ratios against the design brief's bar
//! (section 6).
//!
//! Paths: the direct node veth (10.250.1.1), wireguard-go and boringtun tunnels over
//! that veth ([`crate::peers`]), and tpvpn (ClusterIP 10.96.0.40: TUN, userspace TCP/IP,
//! QUIC over the same veth, the manager dialing inside the cluster namespace).
//! Measured on each: one TCP stream with iperf3 in each direction ([`crate::iperf`]) and
//! the 1-byte ping-pong and connect latency ([`crate::latency`]). A path that cannot be
//! set up or measured is shown as failed with the reason, and the section then fails.

use anyhow::{bail, Result};
use tpvpn_lab::{Lab, TEST_SERVERS_IP};

use crate::latency::{self, Latency};
use crate::peers::{Peer, Tunnel, MTU};
use crate::{iperf, NODE_IP};

/// The bar: tpvpn's throughput at least this many times each peer's, each direction.
const PEER_FACTOR: f64 = 5.0;
/// The bar: tpvpn's throughput at least this fraction of the direct path's.
const DIRECT_FRACTION: f64 = 0.10;
/// The bar: added ping-pong p50 over direct, µs.
const ADDED_RTT_US: f64 = 60.0;
/// The bar: connect p50 allowance over direct + one round trip, µs.
const CONNECT_SLACK_US: f64 = 100.0;

/// What one path measured.
pub struct Measured {
    /// Bits per second, laptop→cluster and cluster→laptop.
    pub up: f64,
    pub down: f64,
    pub latency: Latency,
}

struct Row {
    path: &'static str,
    result: Result<Measured>,
}

/// One stream each way and the latencies, from the laptop namespace to `ip`.
pub fn measure(lab: &Lab, ip: &str) -> Result<Measured> {
    latency::probe(lab, ip)?;
    Ok(Measured {
        up: iperf::one_stream(lab, ip, false)?,
        down: iperf::one_stream(lab, ip, true)?,
        latency: latency::measure(lab, ip)?,
    })
}

/// Measures every path and prints the table and the bar. Needs `tpvpn up` done.
pub fn section(lab: &Lab) -> Result<()> {
    let _server = latency::start_server(lab)?;
    let mut rows = vec![Row { path: "direct veth", result: measure(lab, NODE_IP) }];
    for peer in [Peer::WireguardGo, Peer::Boringtun] {
        // The tunnel is torn down before the next path is measured.
        let result = Tunnel::start(lab, peer).and_then(|t| measure(lab, &t.cluster_ip()));
        rows.push(Row { path: peer.name(), result });
    }
    rows.push(Row { path: "tpvpn", result: measure(lab, TEST_SERVERS_IP) });
    let tunnel_rtt = tunnel_rtt_us(lab);

    println!("## Paths: laptop namespace → cluster namespace");
    println!();
    println!(
        "One TCP stream: iperf3 -t {}, each direction. Ping-pong: 1 byte each way on one connection \
         (TCP_NODELAY), after warm-up. Connect: connect() to established, each connection closed. \
         WireGuard tunnels ({}, {}): MTU {MTU}, over the node veth.",
        iperf::SECONDS,
        Peer::WireguardGo.version(lab),
        Peer::Boringtun.version(lab)
    );
    println!();
    println!("| path | laptop→cluster | cluster→laptop | ping-pong p50 | ping-pong p99 | connect p50 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        match &r.result {
            Ok(m) => println!(
                "| {} | {:.2} Gbit/s | {:.2} Gbit/s | {} | {} | {} |",
                r.path,
                m.up / 1e9,
                m.down / 1e9,
                us(m.latency.pingpong_p50),
                us(m.latency.pingpong_p99),
                us(m.latency.connect_p50)
            ),
            Err(e) => println!("| {} | failed: {} | | | | |", r.path, one_line(e)),
        }
    }
    println!();
    print_bar(&rows, tunnel_rtt);
    println!();
    let mut failed = Vec::new();
    for r in &rows {
        if let Err(e) = &r.result {
            eprintln!("{}: {e:#}", r.path);
            failed.push(r.path);
        }
    }
    if !failed.is_empty() {
        bail!("paths not measured: {}", failed.join(", "));
    }
    Ok(())
}

/// The client's smoothed QUIC round-trip time to the manager (`tpvpn status`), µs.
pub fn tunnel_rtt_us(lab: &Lab) -> Option<f64> {
    let out = lab.tpvpn(&["status", "-o", "json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["tunnel_rtt_us"].as_f64()
}

/// tpvpn against each other path, and whether the brief's bar is met. `tunnel_rtt` is
/// the tunnel's round trip for the connect bar (else the direct ping-pong stands in).
fn print_bar(rows: &[Row], tunnel_rtt: Option<f64>) {
    let ok = |path: &str| rows.iter().find(|r| r.path == path).and_then(|r| r.result.as_ref().ok());
    let Some(tpvpn) = ok("tpvpn") else {
        println!("tpvpn was not measured: no ratios.");
        return;
    };
    let met = |b: bool| if b { "met" } else { "**missed**" };
    println!("| tpvpn against | measured | bar | |");
    println!("| --- | --- | --- | --- |");
    for peer in [Peer::WireguardGo, Peer::Boringtun] {
        match ok(peer.name()) {
            Some(p) => {
                let (up, down) = (tpvpn.up / p.up, tpvpn.down / p.down);
                println!(
                    "| {} throughput (→ / ←) | {up:.2}× / {down:.2}× | ≥ {PEER_FACTOR}× each | {} |",
                    peer.name(),
                    met(up >= PEER_FACTOR && down >= PEER_FACTOR)
                );
            }
            None => println!("| {} throughput | not measured | ≥ {PEER_FACTOR}× each | unknown |", peer.name()),
        }
    }
    let Some(direct) = ok("direct veth") else {
        println!("| direct veth | not measured | | unknown |");
        return;
    };
    let (up, down) = (tpvpn.up / direct.up, tpvpn.down / direct.down);
    println!(
        "| direct veth throughput (→ / ←) | {up:.3}× / {down:.3}× | ≥ {DIRECT_FRACTION}× each | {} |",
        met(up >= DIRECT_FRACTION && down >= DIRECT_FRACTION)
    );
    let (t, d) = (tpvpn.latency, direct.latency);
    let added = t.pingpong_p50 - d.pingpong_p50;
    println!(
        "| direct veth, added ping-pong p50 | {} ({} − {}) | ≤ {ADDED_RTT_US} µs | {} |",
        us(added),
        us(t.pingpong_p50),
        us(d.pingpong_p50),
        met(added <= ADDED_RTT_US)
    );
    let round_trip = tunnel_rtt.unwrap_or(d.pingpong_p50);
    let bound = d.connect_p50 + round_trip + CONNECT_SLACK_US;
    println!(
        "| direct veth, connect p50 | {} (direct {}) | ≤ direct + one round trip + {CONNECT_SLACK_US} µs = {} | {} |",
        us(t.connect_p50),
        us(d.connect_p50),
        us(bound),
        met(t.connect_p50 <= bound)
    );
    println!();
    match tunnel_rtt {
        Some(rtt) => println!(
            "One tunnel round trip: the client's smoothed QUIC RTT to the manager after the runs ({}, `tpvpn status`).",
            us(rtt)
        ),
        None => println!(
            "One tunnel round trip is taken as the direct ping-pong p50 ({}): `tpvpn status` gave no tunnel RTT.",
            us(d.pingpong_p50)
        ),
    }
}

/// Microseconds for a table cell: one decimal below 10 µs.
pub fn us(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1} µs")
    } else {
        format!("{v:.0} µs")
    }
}

/// The first line of an error chain, for a table cell.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or_default().replace('|', "/")
}
