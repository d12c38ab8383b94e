//! Latency: a 1-byte TCP ping-pong and TCP connect time, measured by this binary's own
//! subcommands so every path is measured by the same code.
//!
//! - `tpvpn-bench pingpong-server --listen ADDR [--max-seconds N]` runs in the cluster
//!   namespace on `0.0.0.0:PORT`, so one server is reachable directly (the node address),
//!   through tpvpn (a ClusterIP of the cluster namespace) and through each WireGuard
//!   tunnel (the cluster's tunnel address). It echoes every byte it reads on every
//!   connection (TCP_NODELAY) and exits by itself after `--max-seconds`.
//! - `tpvpn-bench pingpong --addr ADDR [--warmup N] [--exchanges N] [--connects N]` runs
//!   in the laptop namespace: on one connection with TCP_NODELAY it sends one byte and
//!   waits for it to come back, `warmup` times unmeasured and then `exchanges` times
//!   measured (round trip from before the write to after the read); then it opens and
//!   closes `connects` connections one after another (after a few unmeasured ones), timing
//!   each `connect` (SYN to established). It prints one JSON object: ping-pong p50 and
//!   p99 and connect p50, in µs (nearest-rank percentiles).
//!
//! Every socket has a 5 s timeout and every loop a fixed count.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tpvpn_lab::{show, wait_until, Lab};

use crate::daemon::Daemon;

/// The ping-pong server's port, on every address of the cluster namespace.
pub const PORT: u16 = 9100;
/// Timeout of every read, write and connect.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Unmeasured connects before the measured ones.
const WARMUP_CONNECTS: usize = 10;

/// What one `pingpong` run measured, in µs.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub pingpong_p50: f64,
    pub pingpong_p99: f64,
    pub connect_p50: f64,
    /// Connect, one byte out and back.
    pub first_byte_p50: f64,
}

/// Parses `--name value` pairs; `names` are the accepted names.
fn flags<'a>(args: &'a [String], names: &[&str]) -> Result<Vec<(&'a str, &'a str)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(name) = it.next() {
        let Some(n) = name.strip_prefix("--").filter(|n| names.contains(n)) else {
            bail!("unknown argument {name:?} (accepted: {})", names.join(", "));
        };
        let value = it.next().with_context(|| format!("--{n} needs a value"))?;
        out.push((n, value.as_str()));
    }
    Ok(out)
}

/// `pingpong-server`: echo server until `--max-seconds` (default 900) have passed.
pub fn server_cmd(args: &[String]) -> Result<()> {
    let mut listen = None;
    let mut max_seconds = 900;
    for (name, value) in flags(args, &["listen", "max-seconds"])? {
        match name {
            "listen" => listen = Some(value.parse::<SocketAddr>().context("--listen")?),
            _ => max_seconds = value.parse().context("--max-seconds")?,
        }
    }
    let listener = TcpListener::bind(listen.context("--listen ADDR is required")?).context("bind")?;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(max_seconds));
        std::process::exit(0);
    });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = echo(conn);
        });
    }
    Ok(())
}

/// Echoes bytes until EOF (a closed connect-test connection ends here at once).
fn echo(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 {
        s.write_all(&b)?;
    }
    Ok(())
}

/// `pingpong`: measures and prints the JSON object described in the module docs.
pub fn client_cmd(args: &[String]) -> Result<()> {
    let mut addr = None;
    let (mut warmup, mut exchanges, mut connects) = (200usize, 2000usize, 300usize);
    for (name, value) in flags(args, &["addr", "warmup", "exchanges", "connects"])? {
        match name {
            "addr" => addr = Some(value.parse::<SocketAddr>().context("--addr")?),
            "warmup" => warmup = value.parse().context("--warmup")?,
            "exchanges" => exchanges = value.parse().context("--exchanges")?,
            _ => connects = value.parse().context("--connects")?,
        }
    }
    let addr = addr.context("--addr ADDR is required")?;
    if exchanges == 0 || connects == 0 {
        bail!("--exchanges and --connects must be at least 1");
    }
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut rtts = Vec::with_capacity(exchanges);
    let mut b = [0u8; 1];
    for i in 0..warmup + exchanges {
        let sent = [i as u8];
        let start = Instant::now();
        s.write_all(&sent).context("ping-pong write")?;
        s.read_exact(&mut b).context("ping-pong read")?;
        let rtt = start.elapsed();
        if b != sent {
            bail!("ping-pong: sent {sent:?}, got {b:?}");
        }
        if i >= warmup {
            rtts.push(rtt);
        }
    }
    drop(s);
    let mut times = Vec::with_capacity(connects);
    for i in 0..WARMUP_CONNECTS + connects {
        let start = Instant::now();
        let c = TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
        let t = start.elapsed();
        drop(c);
        if i >= WARMUP_CONNECTS {
            times.push(t);
        }
    }
    // Connect to first byte: connect, send one byte, until its echo is back (through an
    // intercept, the kernel in the pod accepts at once; the first byte is what crosses to
    // the laptop and back).
    let mut first = Vec::with_capacity(connects);
    for _ in 0..connects {
        let start = Instant::now();
        let mut c = TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        c.write_all(&[7]).context("first byte")?;
        c.read_exact(&mut b).context("first byte back")?;
        first.push(start.elapsed());
    }
    let v = json!({
        "exchanges": exchanges,
        "pingpong_p50_us": percentile_us(&mut rtts, 0.50),
        "pingpong_p99_us": percentile_us(&mut rtts, 0.99),
        "connects": connects,
        "connect_p50_us": percentile_us(&mut times, 0.50),
        "first_byte_p50_us": percentile_us(&mut first, 0.50),
    });
    println!("{v}");
    Ok(())
}

/// Nearest-rank percentile `p` (0..=1) of a non-empty sample, in µs.
fn percentile_us(sample: &mut [Duration], p: f64) -> f64 {
    sample.sort_unstable();
    let rank = ((p * sample.len() as f64).ceil() as usize).clamp(1, sample.len());
    sample[rank - 1].as_secs_f64() * 1e6
}

/// Starts the ping-pong server in the cluster namespace on `0.0.0.0:PORT` and waits
/// until it listens.
pub fn start_server(lab: &Lab) -> Result<Daemon> {
    start_server_in(lab, lab.cluster(), "0.0.0.0")
}

/// Starts the ping-pong server in namespace `ns` on `ip:PORT`.
pub fn start_server_in(lab: &Lab, ns: &str, ip: &str) -> Result<Daemon> {
    let exe = std::env::current_exe().context("cannot find the current executable")?;
    let exe = exe.display().to_string();
    let listen = format!("{ip}:{PORT}");
    let log = lab.dir().join("pingpong-server.log");
    let mut d = Daemon::spawn(ns, &[&exe, "pingpong-server", "--listen", &listen], &[], &log)?;
    let filter = format!("sport = :{PORT}");
    let listening = wait_until(Duration::from_secs(5), || {
        !lab.exec_timeout(ns, &["ss", "-Hltn", &filter], Duration::from_secs(5)).stdout.is_empty()
    });
    if !listening {
        d.check_running()?;
        bail!("pingpong-server not listening on {listen} after 5 s");
    }
    Ok(d)
}

/// Runs `pingpong` from the laptop namespace to `ip:PORT` with `extra` arguments; its JSON.
fn run_client(lab: &Lab, ip: &str, extra: &[&str]) -> Result<serde_json::Value> {
    run_client_in(lab, lab.laptop(), ip, extra)
}

fn run_client_in(lab: &Lab, ns: &str, ip: &str, extra: &[&str]) -> Result<serde_json::Value> {
    let exe = std::env::current_exe().context("cannot find the current executable")?;
    let exe = exe.display().to_string();
    let addr = format!("{ip}:{PORT}");
    let mut cmd = vec![exe.as_str(), "pingpong", "--addr", &addr];
    cmd.extend_from_slice(extra);
    let out = lab.exec_timeout(ns, &cmd, Duration::from_secs(120));
    if !out.status.success() {
        bail!("pingpong to {addr} failed: {}", show(&out));
    }
    serde_json::from_slice(&out.stdout).context("pingpong json")
}

/// One exchange and one connect to `ip:PORT` from the laptop namespace: the path carries
/// TCP (and whatever a tunnel does on its first packet, like a handshake, is done).
pub fn probe(lab: &Lab, ip: &str) -> Result<()> {
    run_client(lab, ip, &["--warmup", "0", "--exchanges", "1", "--connects", "1"]).map(|_| ())
}

/// Runs `pingpong` from the laptop namespace to `ip:PORT` with the default counts.
pub fn measure(lab: &Lab, ip: &str) -> Result<Latency> {
    measure_from(lab, lab.laptop(), ip)
}

/// Runs `pingpong` from namespace `ns` to `ip:PORT` with the default counts.
pub fn measure_from(lab: &Lab, ns: &str, ip: &str) -> Result<Latency> {
    run_client_in(lab, ns, ip, &["--warmup", "0", "--exchanges", "1", "--connects", "1"])?;
    let v = run_client_in(lab, ns, ip, &[])?;
    let get = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in pingpong output"));
    Ok(Latency {
        pingpong_p50: get("pingpong_p50_us")?,
        pingpong_p99: get("pingpong_p99_us")?,
        connect_p50: get("connect_p50_us")?,
        first_byte_p50: get("first_byte_p50_us")?,
    })
}
