//! The intercept section: a caller in the cluster (the lab's caller pod) against a pod
//! directly, and against the same pod intercepted to a server on the laptop, in one run:
//! one TCP stream each way (iperf3), the 1-byte ping-pong and connect-to-first-byte
//! ([`crate::latency`]); beside tpvpn's own outbound stream (laptop → ClusterIP) of the
//! same run. Bar (design brief): the intercepted stream at least half of tpvpn's own
//! stream in the same tunnel direction, and the added ping-pong p50 at most two tunnel
//! round trips plus 100 µs.

use anyhow::{Context, Result};
use tpvpn_lab::{show, Lab, TEST_SERVERS_IP};

use crate::iperf;
use crate::latency::{self, Latency};
use crate::paths::us;

/// The bar: intercepted throughput against tpvpn's own, same tunnel direction.
const STREAM_FRACTION: f64 = 0.5;
/// The bar: added ping-pong p50 allowance over two tunnel round trips, µs.
const PINGPONG_SLACK_US: f64 = 100.0;

struct Path {
    /// Bits per second caller→server and server→caller.
    up: f64,
    down: f64,
    latency: Latency,
}

fn intercept(lab: &Lab, port: &str) -> Result<()> {
    let out = lab.tpvpn(&["intercept", "web", "--port", port]);
    anyhow::ensure!(out.status.success(), "tpvpn intercept web --port {port}: {}", show(&out));
    Ok(())
}

fn leave(lab: &Lab) {
    let _ = lab.tpvpn(&["leave", "web"]);
}

pub fn section(lab: &mut Lab) -> Result<()> {
    lab.start_pods().context("pods for the intercept section")?;
    let pod_ns = lab.pod_ns("web-0").context("pod web-0")?.to_string();
    let pod = lab.pod_ip("web-0").context("pod web-0")?.to_string();
    let pod = pod.as_str();
    let (caller, laptop) = (lab.caller().to_string(), lab.laptop().to_string());

    // tpvpn's own stream, laptop → a ClusterIP and back.
    let own = (iperf::one_stream(lab, TEST_SERVERS_IP, false)?, iperf::one_stream(lab, TEST_SERVERS_IP, true)?);

    let direct = {
        let _pp = latency::start_server_in(lab, &pod_ns, "0.0.0.0")?;
        Path {
            up: iperf::stream_between(lab, (&pod_ns, None), (&caller, pod), false)?,
            down: iperf::stream_between(lab, (&pod_ns, None), (&caller, pod), true)?,
            latency: latency::measure_from(lab, &caller, pod)?,
        }
    };
    intercept(lab, "5201:iperf")?;
    let streams = (|| {
        Ok::<_, anyhow::Error>((
            iperf::stream_between(lab, (&laptop, Some("127.0.0.1")), (&caller, pod), false)?,
            iperf::stream_between(lab, (&laptop, Some("127.0.0.1")), (&caller, pod), true)?,
        ))
    })();
    leave(lab);
    let (up, down) = streams?;
    let _pp = latency::start_server_in(lab, &laptop, "127.0.0.1")?;
    intercept(lab, "9100:pingpong")?;
    let lat = latency::measure_from(lab, &caller, pod);
    leave(lab);
    let intercepted = Path { up, down, latency: lat? };
    let rtt = crate::paths::tunnel_rtt_us(lab);

    println!("## Intercept: a cluster caller → pod web-0, directly and intercepted to the laptop");
    println!();
    println!(
        "One TCP stream: iperf3 -t {} from the caller pod, each direction; the server in the pod, or on the \
         laptop's 127.0.0.1 behind `tpvpn intercept web --port LOCAL:PORT`. Ping-pong as in the paths section; \
         first byte: connect, one byte out and its echo back.",
        iperf::SECONDS
    );
    println!();
    println!("| path | caller→server | server→caller | ping-pong p50 | ping-pong p99 | connect → first byte p50 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, p) in [("direct to the pod", &direct), ("intercepted to the laptop", &intercepted)] {
        println!(
            "| {name} | {:.2} Gbit/s | {:.2} Gbit/s | {} | {} | {} |",
            p.up / 1e9,
            p.down / 1e9,
            us(p.latency.pingpong_p50),
            us(p.latency.pingpong_p99),
            us(p.latency.first_byte_p50)
        );
    }
    println!(
        "| tpvpn outbound (laptop → ClusterIP / back), same run | {:.2} Gbit/s | {:.2} Gbit/s | | | |",
        own.0 / 1e9,
        own.1 / 1e9
    );
    println!();
    let met = |b: bool| if b { "met" } else { "**missed**" };
    // Caller → laptop data crosses the tunnel as the manager's download does (and the
    // other way round): compare like with like.
    let (a, b) = (intercepted.up / own.1, intercepted.down / own.0);
    println!("| intercept against the bar | measured | bar | |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| stream, against tpvpn's own in the same tunnel direction (→ laptop / ← laptop) | {a:.2}× / {b:.2}× | ≥ {STREAM_FRACTION}× each | {} |",
        met(a >= STREAM_FRACTION && b >= STREAM_FRACTION)
    );
    let added = intercepted.latency.pingpong_p50 - direct.latency.pingpong_p50;
    match rtt {
        Some(rtt) => {
            let bound = 2.0 * rtt + PINGPONG_SLACK_US;
            println!(
                "| added ping-pong p50 | {} | ≤ 2 tunnel RTTs ({}) + {PINGPONG_SLACK_US} µs = {} | {} |",
                us(added),
                us(rtt),
                us(bound),
                met(added <= bound)
            );
        }
        None => println!("| added ping-pong p50 | {} | no tunnel RTT from `tpvpn status` | unknown |", us(added)),
    }
    println!();
    Ok(())
}
