//! A userspace WAN emulator between the laptop and the cluster namespaces: fixed one-way
//! delay and independent random loss, for the benchmark's WAN rows. This machine's kernel
//! has no `sch_netem`, so the emulator does netem's job itself.
//!
//! `tpvpn-lab wan` runs inside the laptop namespace. It opens two TUN devices there,
//! [`LAPTOP_DEV`] and [`CLUSTER_DEV`], moves the second one into the cluster namespace (a
//! TUN device keeps its file descriptor when its interface changes namespace), and gives
//! them the point-to-point pair [`WAN_LAPTOP_IP`] ⇄ [`WAN_CLUSTER_IP`] (each side gets a
//! /32 route to the other through its device). Every packet read from one device is
//! dropped with probability `loss` (seeded PRNG, one stream per direction), else queued
//! with a deadline `now + delay` and written to the other device once the deadline has
//! passed. Each direction has its own queue, bounded in packets (drop-tail; like netem's
//! `limit` it counts the packets still in the delay line), and its own reader and writer
//! threads. By default there is no rate limit, so the link's capacity is the emulator's
//! own forwarding rate (measured by the benchmark); an optional rate (bits per second)
//! makes it a bottleneck: a packet leaves no earlier than its deadline and no earlier than
//! the previous one's departure plus its own serialization time.
//!
//! [`Lab::start_wan`] starts it and returns a [`WanLink`] that changes delay and loss at
//! run time (the TUN devices, and so the QUIC path over them, stay up), reads the
//! counters, and stops the emulator when dropped. The emulator also exits when its stdin
//! closes or after `--max-secs`. Its devices and routes live only in the lab namespaces
//! and disappear with the process.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{find_bin, ip, Lab};

/// The laptop's end of the emulated link (in the laptop namespace).
pub const WAN_LAPTOP_IP: &str = "10.250.3.2";
/// The cluster's end of the emulated link (in the cluster namespace).
pub const WAN_CLUSTER_IP: &str = "10.250.3.1";
/// The laptop-side TUN device.
pub const LAPTOP_DEV: &str = "wan-laptop";
/// The cluster-side TUN device.
pub const CLUSTER_DEV: &str = "wan-cluster";
/// Largest packet the emulator forwards (so the devices' MTU may be raised up to it).
pub const MAX_PACKET: usize = 65_535;

/// Settings of the emulated link.
#[derive(Debug, Clone)]
pub struct WanConfig {
    /// One-way delay (the round trip adds twice this).
    pub delay: Duration,
    /// Probability that a packet is dropped, per packet and direction.
    pub loss: f64,
    /// Seed of the loss PRNG.
    pub seed: u64,
    /// MTU of both TUN devices.
    pub mtu: u16,
    /// Queue limit per direction, in packets (drop-tail beyond it).
    pub queue: usize,
    /// The emulator exits after this long whatever happens.
    pub max_time: Duration,
}

impl Default for WanConfig {
    fn default() -> Self {
        WanConfig {
            delay: Duration::from_millis(10),
            loss: 0.0,
            seed: 1,
            mtu: 1500,
            // 10 ms of 1500-byte packets at 10 Gbit/s is ~8,300 packets: 32k is far above
            // the bandwidth-delay product at the rates the emulator can forward.
            queue: 32_768,
            max_time: Duration::from_secs(1800),
        }
    }
}

/// Arguments of `tpvpn-lab wan` (run it inside the laptop namespace).
#[derive(Debug, clap::Args)]
pub struct EmulatorArgs {
    /// Network namespace that gets the cluster-side device (`/run/netns/<name>`).
    #[arg(long)]
    pub peer_netns: String,
    /// One-way delay in microseconds.
    #[arg(long, default_value_t = 10_000)]
    pub delay_us: u64,
    /// Loss probability per packet, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 1500)]
    pub mtu: u16,
    /// Queue limit per direction, in packets.
    #[arg(long, default_value_t = 32_768)]
    pub queue: usize,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub max_secs: u64,
}

/// Counters of one direction.
#[derive(Debug, Default)]
struct DirStats {
    /// Packets read from the ingress device.
    received: AtomicU64,
    /// Dropped by the loss model.
    lost: AtomicU64,
    /// Dropped because the queue was full.
    overflow: AtomicU64,
    /// Written to the egress device.
    sent: AtomicU64,
    /// Writes that failed.
    send_errors: AtomicU64,
}

impl DirStats {
    fn snapshot(&self) -> [u64; 5] {
        [&self.received, &self.lost, &self.overflow, &self.sent, &self.send_errors].map(|c| c.load(Ordering::Relaxed))
    }
}

/// Delay and loss, changeable while packets flow.
#[derive(Debug)]
struct Params {
    delay_ns: AtomicU64,
    /// Loss probability scaled to `u64::MAX` (a packet is lost if a draw is below it).
    loss_threshold: AtomicU64,
    /// Rate limit in bits per second, 0 for none.
    rate_bps: AtomicU64,
    /// Queue limit per direction, in packets.
    queue: AtomicU64,
}

impl Params {
    fn set(&self, delay: Duration, loss: f64, rate_bps: u64, queue: usize) {
        self.delay_ns.store(u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.loss_threshold.store(loss_threshold(loss), Ordering::Relaxed);
        self.rate_bps.store(rate_bps, Ordering::Relaxed);
        self.queue.store(queue as u64, Ordering::Relaxed);
    }
}

fn loss_threshold(loss: f64) -> u64 {
    if loss <= 0.0 {
        0
    } else if loss >= 1.0 {
        u64::MAX
    } else {
        // Loss in (0, 1): the product is below 2^64.
        (loss * u64::MAX as f64) as u64
    }
}

/// SplitMix64: a small, fast, seedable PRNG (the loss model needs no more).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A direction's delay line: packets with the time they may leave.
struct DelayLine {
    queue: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
}

/// Runs the emulator (`tpvpn-lab wan`): sets up the devices, prints `ready`, forwards
/// until stdin closes or `--max-secs` pass. Commands on stdin, one per line, each answered
/// with one line: `set <delay_us> <loss> [<rate_bps> <queue>]` → `ok` (rate 0: unlimited;
/// without the last two: unlimited and `--queue`); `stats` → `stats` and the counters
/// (received lost overflow sent send_errors, laptop→cluster then cluster→laptop).
pub fn run_emulator(args: &EmulatorArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.loss) {
        bail!("--loss must be between 0 and 1");
    }
    let max_time = Duration::from_secs(args.max_secs);
    // Bounded whatever the parent does.
    std::thread::spawn(move || {
        std::thread::sleep(max_time);
        eprintln!("tpvpn-lab wan: --max-secs reached, exiting");
        std::process::exit(0);
    });
    let make = |name: &str| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(args.mtu)
            .build_sync()
            .with_context(|| format!("cannot create TUN device {name}"))
    };
    let laptop = Arc::new(make(LAPTOP_DEV)?);
    let cluster = Arc::new(make(CLUSTER_DEV)?);
    let peer = args.peer_netns.as_str();
    let mtu = args.mtu.to_string();
    ip(&["link", "set", CLUSTER_DEV, "netns", peer])?;
    ip(&["addr", "add", WAN_LAPTOP_IP, "peer", WAN_CLUSTER_IP, "dev", LAPTOP_DEV])?;
    ip(&["link", "set", LAPTOP_DEV, "mtu", &mtu, "up"])?;
    ip(&["-n", peer, "addr", "add", WAN_CLUSTER_IP, "peer", WAN_LAPTOP_IP, "dev", CLUSTER_DEV])?;
    ip(&["-n", peer, "link", "set", CLUSTER_DEV, "mtu", &mtu, "up"])?;

    let params = Arc::new(Params {
        delay_ns: AtomicU64::new(0),
        loss_threshold: AtomicU64::new(0),
        rate_bps: AtomicU64::new(0),
        queue: AtomicU64::new(0),
    });
    params.set(Duration::from_micros(args.delay_us), args.loss, 0, args.queue);
    let stats = [Arc::new(DirStats::default()), Arc::new(DirStats::default())];
    for (dir, (from, to)) in [(laptop.clone(), cluster.clone()), (cluster, laptop)].into_iter().enumerate() {
        let line = Arc::new(DelayLine { queue: Mutex::new(VecDeque::new()), ready: Condvar::new() });
        // Independent loss draws per direction.
        let rng = SplitMix64(args.seed ^ (dir as u64).wrapping_mul(0xA076_1D64_78BD_642F));
        let (p, s, l) = (params.clone(), stats[dir].clone(), line.clone());
        std::thread::Builder::new().name(format!("wan-read-{dir}")).spawn(move || read_loop(&from, &l, &p, &s, rng))?;
        let (p, s) = (params.clone(), stats[dir].clone());
        std::thread::Builder::new().name(format!("wan-write-{dir}")).spawn(move || write_loop(&to, &line, &p, &s))?;
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["set", delay_us, loss, ref rest @ ..] if rest.is_empty() || rest.len() == 2 => {
                let delay_us: u64 = delay_us.parse().context("delay_us")?;
                let loss: f64 = loss.parse().context("loss")?;
                let (rate, queue) = match rest {
                    [rate, queue] => (rate.parse().context("rate_bps")?, queue.parse().context("queue")?),
                    _ => (0, args.queue),
                };
                if !(0.0..=1.0).contains(&loss) || queue == 0 {
                    writeln!(out, "error loss must be between 0 and 1, queue above 0")?;
                } else {
                    params.set(Duration::from_micros(delay_us), loss, rate, queue);
                    writeln!(out, "ok")?;
                }
            }
            ["stats"] => {
                let all: Vec<String> = stats.iter().flat_map(|s| s.snapshot()).map(|v| v.to_string()).collect();
                writeln!(out, "stats {}", all.join(" "))?;
            }
            _ => writeln!(out, "error unknown command {line:?}")?,
        }
        out.flush()?;
    }
    Ok(())
}

/// Reads packets from `dev`, applies loss, queues the rest with their deadline.
fn read_loop(dev: &tun_rs::SyncDevice, line: &DelayLine, params: &Params, stats: &DirStats, mut rng: SplitMix64) {
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let n = match dev.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("tpvpn-lab wan: read: {e}");
                return;
            }
        };
        stats.received.fetch_add(1, Ordering::Relaxed);
        let threshold = params.loss_threshold.load(Ordering::Relaxed);
        if threshold > 0 && rng.next() < threshold {
            stats.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let deadline = Instant::now() + Duration::from_nanos(params.delay_ns.load(Ordering::Relaxed));
        let packet = buf[..n].to_vec();
        let limit = params.queue.load(Ordering::Relaxed);
        let mut q = line.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.len() as u64 >= limit {
            stats.overflow.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let was_empty = q.is_empty();
        q.push_back((deadline, packet));
        drop(q);
        if was_empty {
            line.ready.notify_one();
        }
    }
}

/// Writes each queued packet to `dev` once its deadline has passed (and, with a rate
/// limit, once the link is free), in order.
fn write_loop(dev: &tun_rs::SyncDevice, line: &DelayLine, params: &Params, stats: &DirStats) {
    let mut batch: Vec<Vec<u8>> = Vec::new();
    // With a rate limit: when the link has finished sending the previous packet.
    let mut link_free = Instant::now();
    loop {
        {
            let mut q = line.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let rate = params.rate_bps.load(Ordering::Relaxed);
            // When the head may leave.
            let leave = |due: Instant, free: Instant| if rate == 0 { due } else { due.max(free) };
            loop {
                let now = Instant::now();
                match q.front() {
                    None => q = line.ready.wait(q).unwrap_or_else(std::sync::PoisonError::into_inner),
                    Some((due, _)) if leave(*due, link_free) <= now => break,
                    Some((due, _)) => {
                        let wait = leave(*due, link_free) - now;
                        q = line.ready.wait_timeout(q, wait).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                    }
                }
            }
            let now = Instant::now();
            while q.front().is_some_and(|(due, _)| leave(*due, link_free) <= now) {
                if let Some((due, p)) = q.pop_front() {
                    if let Some(ns) = (p.len() as u64 * 8 * 1_000_000_000).checked_div(rate) {
                        link_free = due.max(link_free) + Duration::from_nanos(ns);
                    }
                    batch.push(p);
                }
            }
        }
        for p in batch.drain(..) {
            match dev.send(&p) {
                Ok(_) => stats.sent.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.send_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// Counters of the emulated link since it started (or since [`WanLink::stats`]'s baseline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WanStats {
    /// Laptop→cluster: received, lost, overflow, sent, send errors.
    pub to_cluster: [u64; 5],
    /// Cluster→laptop: the same.
    pub to_laptop: [u64; 5],
}

impl WanStats {
    /// Counters accumulated since `earlier`.
    pub fn since(&self, earlier: &WanStats) -> WanStats {
        let sub = |a: [u64; 5], b: [u64; 5]| std::array::from_fn(|i| a[i].saturating_sub(b[i]));
        WanStats {
            to_cluster: sub(self.to_cluster, earlier.to_cluster),
            to_laptop: sub(self.to_laptop, earlier.to_laptop),
        }
    }
    /// Packets dropped for any reason / packets received, both directions.
    pub fn drop_ratio(&self) -> f64 {
        let rx = self.to_cluster[0] + self.to_laptop[0];
        let dropped = self.to_cluster[1] + self.to_cluster[2] + self.to_laptop[1] + self.to_laptop[2];
        if rx == 0 {
            0.0
        } else {
            dropped as f64 / rx as f64
        }
    }
}

/// A running emulator; dropping it stops the emulator (its devices and routes go with it).
pub struct WanLink {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    laptop: String,
    cluster: String,
}

impl std::fmt::Debug for WanLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WanLink").field("pid", &self.child.as_ref().map(Child::id)).finish_non_exhaustive()
    }
}

/// How long the emulator may take to answer a command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

impl WanLink {
    fn command(&mut self, cmd: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().context("emulator stopped")?;
        writeln!(stdin, "{cmd}").and_then(|()| stdin.flush()).context("writing to the WAN emulator")?;
        self.reply()
    }

    fn reply(&self) -> Result<String> {
        match self.lines.recv_timeout(REPLY_TIMEOUT) {
            Ok(l) if l.starts_with("error") => bail!("WAN emulator: {l}"),
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => bail!("the WAN emulator did not answer in {REPLY_TIMEOUT:?}"),
            Err(RecvTimeoutError::Disconnected) => bail!("the WAN emulator exited"),
        }
    }

    /// Sets the one-way delay and the loss probability (both directions) from now on, no
    /// rate limit, the queue limit it started with.
    pub fn set(&mut self, delay: Duration, loss: f64) -> Result<()> {
        let r = self.command(&format!("set {} {loss}", delay.as_micros()))?;
        if r != "ok" {
            bail!("WAN emulator: unexpected reply {r:?}");
        }
        Ok(())
    }

    /// Like [`WanLink::set`], and makes each direction a bottleneck of `rate_bps` bits per
    /// second with a queue of `queue` packets (counting those in the delay line).
    pub fn set_bottleneck(&mut self, delay: Duration, loss: f64, rate_bps: u64, queue: usize) -> Result<()> {
        let r = self.command(&format!("set {} {loss} {rate_bps} {queue}", delay.as_micros()))?;
        if r != "ok" {
            bail!("WAN emulator: unexpected reply {r:?}");
        }
        Ok(())
    }

    /// The counters so far.
    pub fn stats(&mut self) -> Result<WanStats> {
        let r = self.command("stats")?;
        let v: Vec<u64> = r
            .strip_prefix("stats ")
            .context("bad stats reply")?
            .split_whitespace()
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .context("bad stats reply")?;
        if v.len() != 10 {
            bail!("bad stats reply {r:?}");
        }
        Ok(WanStats { to_cluster: std::array::from_fn(|i| v[i]), to_laptop: std::array::from_fn(|i| v[5 + i]) })
    }

    /// Sets the MTU of both devices (up to [`MAX_PACKET`]).
    pub fn set_mtu(&self, mtu: u16) -> Result<()> {
        let m = mtu.to_string();
        ip(&["-n", &self.laptop, "link", "set", LAPTOP_DEV, "mtu", &m])?;
        ip(&["-n", &self.cluster, "link", "set", CLUSTER_DEV, "mtu", &m])
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        // EOF on stdin ends the emulator; terminate() also kills it if it lingers.
        self.stdin = None;
        if let Some(child) = self.child.take() {
            crate::terminate(child);
        }
    }
}

impl Lab {
    /// Starts the WAN emulator between the laptop and the cluster namespaces (see the
    /// module docs); its log is `<dir>/wan.log`. Only one at a time per lab.
    pub fn start_wan(&self, cfg: &WanConfig) -> Result<WanLink> {
        let bin = find_bin(&self.bin_dir, "tpvpn-lab")?;
        let log = std::fs::File::create(self.dir.join("wan.log"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.laptop])
            .arg(bin)
            .args(["wan", "--peer-netns", &self.cluster])
            .args(["--delay-us", &cfg.delay.as_micros().to_string()])
            .args(["--loss", &cfg.loss.to_string(), "--seed", &cfg.seed.to_string()])
            .args(["--mtu", &cfg.mtu.to_string(), "--queue", &cfg.queue.to_string()])
            .args(["--max-secs", &cfg.max_time.as_secs().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting tpvpn-lab wan")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let link =
            WanLink { child: Some(child), stdin, lines, laptop: self.laptop.clone(), cluster: self.cluster.clone() };
        match link.reply() {
            Ok(l) if l == "ready" => Ok(link),
            other => {
                drop(link);
                let log = std::fs::read_to_string(self.dir.join("wan.log")).unwrap_or_default();
                bail!("the WAN emulator did not start ({other:?}); wan.log:\n{log}")
            }
        }
    }
}
