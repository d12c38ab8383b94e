//! WAN rows of the benchmark: tpvpn over an emulated 20 ms RTT link at 0% and 1% loss,
//! against a direct TCP stream over the same emulated link.
//!
//! The kernel here has no `sch_netem`, so the lab's userspace emulator
//! (`tpvpn_lab::wan`, two TUN devices, 10 ms each way, seeded random loss) carries the
//! pair 10.250.3.2 (laptop) ⇄ 10.250.3.1 (cluster). The manager is restarted listening on
//! `0.0.0.0:4443` and `tpvpn up --manager 10.250.3.1:4443` connects over the emulated
//! link (afresh for each scenario), so the QUIC connection sees the delay and the loss
//! while the laptop's inner TCP (to smoltcp) and the manager's (to the server) do not. Per scenario ([`SCENARIOS`]: 0%
//! and 1% random loss on an unlimited link, and a 200 Mbit/s bottleneck with a buffer of
//! one and of 0.1 bandwidth-delay product, which show how the congestion controller copes
//! with a real queue: the emulator's drop rate is the loss it inflicts): iperf3, one TCP stream for [`SECONDS`] s each direction, to the cluster
//! node's WAN address (direct) and to a ClusterIP (tpvpn); and a 1-byte TCP ping-pong (p50
//! of [`PINGS`] round trips). First, the emulator's own ceiling at zero delay and loss.
//!
//! The direct rows use the kernel's TCP: once with the namespace's default congestion
//! control (`net.ipv4.tcp_congestion_control`, inherited from the machine; the table says
//! which; the reference of the ratios), once with cubic (`iperf3 -C cubic`), the
//! loss-based controller QUIC stacks default to.
//!
//! Everything runs in the lab's namespaces; the lab is left as found (tpvpn connected
//! through the node network if it was, the manager on its usual address).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tpvpn_lab::wan::{WanConfig, WanLink, WAN_CLUSTER_IP};
use tpvpn_lab::{show, Lab, MANAGER_ADDR, TEST_SERVERS_IP};

/// Seconds per iperf3 run over the emulated link.
pub const SECONDS: u32 = 10;
/// Seconds per iperf3 run of the ceiling measurement.
const CEILING_SECONDS: u32 = 5;
/// One-way delay of the emulated link (20 ms round trip).
pub const ONE_WAY: Duration = Duration::from_millis(10);
/// The paths measured in each scenario: name, iperf3/ping-pong target, extra iperf3
/// arguments. The first is the reference of the ratios.
const PATHS: [(&str, &str, &[&str]); 3] = [
    ("direct TCP", WAN_CLUSTER_IP, &[]),
    ("direct TCP, cubic", WAN_CLUSTER_IP, &["-C", "cubic"]),
    ("tpvpn", TEST_SERVERS_IP, &[]),
];

/// A link condition measured.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub loss: f64,
    /// Bottleneck rate in bits per second (None: as fast as the emulator forwards).
    pub rate_bps: Option<u64>,
    /// With a bottleneck: its buffer, in bandwidth-delay products (one round trip at the
    /// bottleneck rate), besides the packets in the delay line.
    pub buffer_bdp: f64,
}

/// The link conditions measured, in order.
pub const SCENARIOS: [Scenario; 4] = [
    Scenario { loss: 0.0, rate_bps: None, buffer_bdp: 0.0 },
    Scenario { loss: 0.01, rate_bps: None, buffer_bdp: 0.0 },
    Scenario { loss: 0.0, rate_bps: Some(200_000_000), buffer_bdp: 1.0 },
    Scenario { loss: 0.0, rate_bps: Some(200_000_000), buffer_bdp: 0.1 },
];

impl Scenario {
    fn label(&self) -> String {
        match self.rate_bps {
            None => format!("{:.0}% loss", self.loss * 100.0),
            Some(r) => format!(
                "{:.0}% loss, {} Mbit/s bottleneck, {} BDP buffer",
                self.loss * 100.0,
                r / 1_000_000,
                self.buffer_bdp
            ),
        }
    }

    fn apply(&self, wan: &mut WanLink) -> Result<()> {
        match self.rate_bps {
            None => wan.set(ONE_WAY, self.loss),
            Some(rate) => {
                // Packets of 1500 bytes: those in the delay line plus the buffer at the
                // bottleneck.
                let packets = |d: Duration| (rate as f64 * d.as_secs_f64() / 8.0 / 1500.0).ceil() as usize;
                wan.set_bottleneck(
                    ONE_WAY,
                    self.loss,
                    rate,
                    packets(ONE_WAY) + packets((2 * ONE_WAY).mul_f64(self.buffer_bdp)),
                )
            }
        }
    }
}
/// Round trips per ping-pong measurement (after [`WARMUP`] unmeasured ones).
pub const PINGS: usize = 200;
const WARMUP: usize = 10;
/// Timeout of one ping-pong read, connect and iperf3 run (each bounded).
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One measured path in one scenario.
struct Row {
    scenario: usize,
    path: &'static str,
    up: f64,
    down: f64,
    p50: Duration,
    /// Share of packets the emulator dropped while this row ran (both directions).
    dropped: f64,
}

/// Runs the WAN section and returns its markdown (also printed as it goes).
pub fn run(lab: &mut Lab) -> Result<String> {
    let was_up = tpvpn_connected(lab);
    if was_up {
        down(lab)?;
    }
    // The manager also has to answer on the WAN address.
    lab.restart_manager_listening(&format!("0.0.0.0:{}", manager_port()?))?;
    let result = (|| -> Result<String> {
        let cfg = WanConfig { delay: ONE_WAY, ..WanConfig::default() };
        let mut wan = lab.start_wan(&cfg)?;
        let server = EchoServer::start(lab.cluster())?;
        let ceiling = measure_ceiling(lab, &mut wan)?;
        let rows = (|| -> Result<Vec<Row>> {
            let mut rows = Vec::new();
            for (scenario, sc) in SCENARIOS.iter().enumerate() {
                for (path, ip, cc) in PATHS {
                    eprintln!("wan: {path}, {}", sc.label());
                    let tunnel = ip == TEST_SERVERS_IP;
                    if tunnel {
                        // A fresh QUIC connection per scenario, as each direct row is a fresh
                        // TCP connection: no window carried over from another link (connected
                        // on a loss-free link, then the scenario applies).
                        wan.set(ONE_WAY, 0.0)?;
                        up_over_wan(lab)?;
                    }
                    sc.apply(&mut wan)?;
                    let before = wan.stats()?;
                    let secs = SECONDS.to_string();
                    let mut args = vec!["-t", secs.as_str()];
                    args.extend_from_slice(cc);
                    let to_cluster = iperf(lab, ip, false, &args)?;
                    let to_laptop = iperf(lab, ip, true, &args)?;
                    let pings = pingpong(lab.laptop(), SocketAddr::new(ip.parse()?, server.port), PINGS)?;
                    let dropped = wan.stats()?.since(&before).drop_ratio();
                    rows.push(Row {
                        scenario,
                        path,
                        up: to_cluster.bps,
                        down: to_laptop.bps,
                        p50: percentile(&pings, 50),
                        dropped,
                    });
                    if tunnel {
                        down(lab)?;
                    }
                }
                // HOOK(bench-peers): wireguard-go (and boringtun) over the same emulated link
                // go here once `benches/src/peers.rs` can set them up between the laptop and
                // the cluster namespaces: one row per peer with the same iperf3/ping-pong.
            }
            Ok(rows)
        })();
        if tpvpn_connected(lab) {
            let _ = down(lab);
        }
        drop(server);
        drop(wan);
        Ok(render(&ceiling, &rows?, &tcp_cc(lab)))
    })();
    // Back to the usual lab, also after a failure.
    let restored = lab.restart_manager_listening(MANAGER_ADDR).and_then(|()| if was_up { lab.up(&[]) } else { Ok(()) });
    let out = result?;
    restored.context("restoring the lab after the WAN rows")?;
    Ok(out)
}

fn manager_port() -> Result<u16> {
    let (_, port) = MANAGER_ADDR.rsplit_once(':').context("MANAGER_ADDR")?;
    Ok(port.parse()?)
}

/// Whether `tpvpn status` says connected.
pub(crate) fn tpvpn_connected(lab: &Lab) -> bool {
    let out = lab.tpvpn(&["status", "-o", "json"]);
    out.status.success()
        && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|v| v["connected"] == true)
}

fn down(lab: &Lab) -> Result<()> {
    let out = lab.tpvpn(&["down"]);
    if !out.status.success() {
        bail!("tpvpn down failed: {}", show(&out));
    }
    Ok(())
}

/// `tpvpn up` in direct mode with the manager at its WAN address.
fn up_over_wan(lab: &Lab) -> Result<()> {
    let manager = format!("{WAN_CLUSTER_IP}:{}", manager_port()?);
    let (ca, token) = (lab.manager_ca().display().to_string(), lab.token_file().display().to_string());
    let out = lab.tpvpn(&["up", "--manager", &manager, "--manager-ca", &ca, "--token-file", &token]);
    if !out.status.success() {
        bail!("tpvpn up over the emulated link failed: {}\nmanager log:\n{}", show(&out), lab.manager_log());
    }
    Ok(())
}

/// The emulator's forwarding ceiling: zero delay, zero loss; one TCP stream at MTU 1500
/// and at MTU 65000, and UDP with 1400-byte datagrams (the QUIC case) at full speed.
struct Ceiling {
    tcp_1500: f64,
    tcp_65000: f64,
    udp_1400: Iperf,
}

fn measure_ceiling(lab: &Lab, wan: &mut WanLink) -> Result<Ceiling> {
    eprintln!("wan: emulator ceiling");
    wan.set(Duration::ZERO, 0.0)?;
    let t = CEILING_SECONDS.to_string();
    let tcp_1500 = iperf(lab, WAN_CLUSTER_IP, false, &["-t", &t])?.bps;
    wan.set_mtu(65_000)?;
    let tcp_65000 = iperf(lab, WAN_CLUSTER_IP, false, &["-t", &t]);
    wan.set_mtu(1500)?;
    let udp_1400 = iperf(lab, WAN_CLUSTER_IP, false, &["-t", &t, "-u", "-b", "0", "-l", "1400"])?;
    Ok(Ceiling { tcp_1500, tcp_65000: tcp_65000?.bps, udp_1400 })
}

/// The congestion control of the kernel's TCP in the laptop namespace.
fn tcp_cc(lab: &Lab) -> String {
    let out = lab.exec(lab.laptop(), &["sysctl", "-n", "net.ipv4.tcp_congestion_control"]);
    let cc = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if cc.is_empty() {
        "unknown".into()
    } else {
        cc
    }
}

fn render(c: &Ceiling, rows: &[Row], tcp_cc: &str) -> String {
    let g = |bps: f64| format!("{:.2} Gbit/s", bps / 1e9);
    let mut s = String::new();
    s += "emulator ceiling (0 delay, 0 loss, laptop→cluster, iperf3 5 s)\n\n";
    s += "| traffic | throughput |\n| --- | --- |\n";
    s += &format!("| one TCP stream, MTU 1500 | {} |\n", g(c.tcp_1500));
    s += &format!("| one TCP stream, MTU 65000 | {} |\n", g(c.tcp_65000));
    s += &format!(
        "| UDP, 1400-byte datagrams, unlimited rate | {} received ({:.0} kpackets/s, {:.1}% lost) |\n\n",
        g(c.udp_1400.bps),
        c.udp_1400.bps / 8.0 / 1400.0 / 1e3,
        c.udp_1400.lost_percent
    );
    s += &format!(
        "WAN: emulated link, {} ms RTT, MTU 1500; one TCP stream, iperf3 -t {SECONDS}; 1-byte TCP ping-pong p50 of \
         {PINGS}; direct TCP is the kernel's ({tcp_cc})\n\n",
        ONE_WAY.as_millis() * 2
    );
    s += "| link | path | laptop→cluster | cluster→laptop | ping-pong p50 | ratio to direct (→ / ←) | emulator drops |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- |\n";
    for r in rows {
        let direct = rows.iter().find(|d| d.scenario == r.scenario).unwrap_or(r);
        s += &format!(
            "| {} | {} | {} Mbit/s | {} Mbit/s | {:.2} ms | {:.2} / {:.2} | {:.2}% |\n",
            SCENARIOS[r.scenario].label(),
            r.path,
            mbit(r.up),
            mbit(r.down),
            r.p50.as_secs_f64() * 1e3,
            r.up / direct.up,
            r.down / direct.down,
            r.dropped * 100.0
        );
    }
    s += "\nbar (design brief §6): tpvpn ≥ 500 Mbit/s one stream at 0% loss, ≥ 100 Mbit/s at 1% loss.\n";
    s
}

fn mbit(bps: f64) -> String {
    format!("{:.0}", bps / 1e6)
}

/// One iperf3 result: received bits per second, and the loss iperf3 saw (UDP only).
struct Iperf {
    bps: f64,
    lost_percent: f64,
}

/// One iperf3 run from the laptop namespace to a fresh `iperf3 -s -1` in the cluster
/// namespace (cluster→laptop with `reverse`); `extra` are more client arguments.
fn iperf(lab: &Lab, server_ip: &str, reverse: bool, extra: &[&str]) -> Result<Iperf> {
    let v = crate::iperf::run(lab, server_ip, reverse, extra)?;
    if extra.contains(&"-u") {
        // UDP: the server's view, what arrived.
        let sum = &v["end"]["sum_received"];
        let sum = if sum.is_null() { &v["end"]["sum"] } else { sum };
        let bps = sum["bits_per_second"].as_f64().context("no UDP sum in iperf3 output")?;
        Ok(Iperf { bps, lost_percent: sum["lost_percent"].as_f64().unwrap_or(0.0) })
    } else {
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("no sum_received in iperf3 output")?;
        Ok(Iperf { bps, lost_percent: 0.0 })
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (`/run/netns/<ns>`): the
/// sockets it creates stay in that namespace wherever they are used afterwards.
pub(crate) fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {path}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("the thread in namespace {ns} panicked"))?
}

/// A TCP echo server (one byte at a time is enough for ping-pong) in a namespace, on
/// `0.0.0.0:<port>`: reachable at every address of that namespace, ClusterIPs included.
/// Its threads end when it is dropped (accept loop) or when their connection closes or
/// stays idle for [`IO_TIMEOUT`].
pub(crate) struct EchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &str) -> Result<EchoServer> {
        let listener = in_netns(ns, || Ok(TcpListener::bind("0.0.0.0:0")?))?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        std::thread::spawn(move || echo(s));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(EchoServer { port, stop, thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo(mut s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut b = [0u8; 64];
    while let Ok(n @ 1..) = s.read(&mut b) {
        if s.write_all(&b[..n]).is_err() {
            break;
        }
    }
}

/// `n` round trips of one byte over one TCP connection from namespace `ns` to `addr`
/// (after [`WARMUP`] unmeasured ones); each round trip bounded by [`IO_TIMEOUT`].
pub(crate) fn pingpong(ns: &str, addr: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    let mut s = in_netns(ns, move || Ok(TcpStream::connect_timeout(&addr, IO_TIMEOUT)?))
        .with_context(|| format!("ping-pong connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut times = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..WARMUP + n {
        let start = Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut b).with_context(|| format!("ping-pong to {addr}, round trip {i}"))?;
        if i >= WARMUP {
            times.push(start.elapsed());
        }
    }
    Ok(times)
}

/// The `p`th percentile (nearest rank) of `samples`.
pub(crate) fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut v = samples.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * v.len()).div_ceil(100).clamp(1, v.len());
    v[rank - 1]
}
