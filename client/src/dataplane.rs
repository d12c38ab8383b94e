//! The data plane: a thin async driver around the sans-IO netstack.
//!
//! One task owns the TUN device and the [`Stack`]. It reads packets from the device,
//! acts on the stack's events, and writes the stack's packets back. Each flow has a task
//! that owns its QUIC stream (dial, then relay); flow tasks talk to the stack task
//! through one command channel. Back-pressure is end to end:
//! - laptop to cluster: each flow has a small bounded channel to its task; when it is
//!   full the stack stops reading that socket, smoltcp's window closes and the
//!   application's kernel stops sending;
//! - cluster to laptop: each flow task holds a byte budget (a semaphore) that the stack
//!   task refills only as bytes enter the smoltcp socket, so QUIC flow control pushes
//!   back on the manager when the laptop application reads slowly.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant as StdInstant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tpvpn_netstack::{wire, DialOutcome, Event, FlowId, FlowMap, Instant, Stack, TcpRead};
use tpvpn_tunnel::datagram::Datagram;
use tpvpn_tunnel::io::{read_message, read_udp_record, write_message, write_udp_record};
use tpvpn_tunnel::{FlowStatus, Message, Protocol, RESET_CODE};
use tracing::{debug, debug_span, warn, Instrument};

use crate::control::Flows;

/// Largest chunk moved at once between a socket and a stream.
const CHUNK: usize = 64 * 1024;
/// Chunks that may wait between the stack and a flow task (laptop to cluster).
const UP_QUEUE: usize = 16;
/// Bytes a flow task may hand the stack before they enter the smoltcp socket.
const DOWN_BUDGET: usize = 1 << 20;
/// Most stream chunks (typically one QUIC STREAM frame each) read from a stream at once.
const DOWN_CHUNKS: usize = 64;
/// Most bytes from the cluster handed to the stack in one message.
const DOWN_GROUP: usize = DOWN_BUDGET / 4;
/// Flows the manager denied (destination policy, per-client limits), since the daemon
/// started; across reconnections.
pub static DENIED_FLOWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// UDP datagrams that may wait for a flow's stream to open.
const UDP_QUEUE: usize = 256;

/// How long a reading of this machine's addresses is used.
const LOCAL_FRESH: StdDuration = StdDuration::from_secs(1);

/// This machine's own addresses, the only sources the stack takes packets from: the tunnel
/// is for the laptop's own processes, not for another host on its network that routes
/// packets to a ClusterIP through the laptop. The kernel drops a packet arriving from
/// outside with one of these as its source (a martian), so such a source is a local
/// process. (The DNS server's sockets get the same by being bound to the TUN device.)
pub(crate) fn local_addresses() -> Vec<IpAddr> {
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cannot read this machine's addresses: packets from any source are taken");
            return vec![];
        }
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

/// Messages from flow tasks (and the control socket) to the stack task.
enum Cmd {
    Dialed {
        id: FlowId,
        outcome: DialOutcome,
    },
    /// Bytes from the cluster for a TCP flow: every chunk the stream had ready, so that
    /// the stack sends them as one segment.
    Data {
        id: FlowId,
        chunks: Vec<Bytes>,
    },
    /// The cluster side finished sending (FIN).
    Fin {
        id: FlowId,
    },
    /// The cluster side reset the connection.
    Reset {
        id: FlowId,
    },
    /// A flow task made room in its queue after the stack found it full.
    Drained {
        id: FlowId,
    },
    /// A datagram from the cluster for a UDP flow.
    UdpReply {
        id: FlowId,
        bytes: Bytes,
    },
    /// The manager ended a UDP flow.
    UdpEnded {
        id: FlowId,
    },
    Stats(oneshot::Sender<Flows>),
    Destinations(oneshot::Sender<Vec<std::net::IpAddr>>),
}

/// What the stack task sends a TCP flow task.
enum Up {
    Data(Bytes),
    Fin,
}

struct TcpCtl {
    up: mpsc::Sender<Up>,
    fin_sent_up: bool,
    /// Set when the stack found `up` full; the flow task then sends `Drained`.
    stalled: Arc<AtomicBool>,
    /// Set before dropping `up` when the laptop side reset the flow.
    reset: Arc<AtomicBool>,
    budget: Arc<Semaphore>,
    /// Bytes from the cluster not yet accepted by the smoltcp socket.
    pending: VecDeque<Bytes>,
    fin_from_cluster: bool,
    closed_toward_laptop: bool,
}

impl Drop for TcpCtl {
    /// Wakes a flow task waiting for budget: the stack no longer takes its bytes.
    fn drop(&mut self) {
        self.budget.close();
    }
}

struct UdpCtl {
    up: mpsc::Sender<Vec<u8>>,
}

/// A handle to ask the running data plane for statistics.
#[derive(Clone)]
pub struct Handle {
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl Handle {
    /// The addresses the laptop's open flows go to (empty once the data plane is gone).
    pub async fn destinations(&self) -> Vec<std::net::IpAddr> {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Destinations(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub async fn flows(&self) -> Flows {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Stats(tx)).is_err() {
            return Flows::default();
        }
        rx.await.unwrap_or_default()
    }
}

/// The TUN device as the data plane needs it.
pub type Tun = Arc<tun_rs::AsyncDevice>;

/// What the data plane reads the laptop's packets from and writes the stack's to: the
/// TUN device, or a [`MemoryDevice`] (tests, without root).
pub trait PacketDevice: Send + Sync + 'static {
    /// Waits for one packet.
    fn recv(&self, buf: &mut [u8]) -> impl std::future::Future<Output = std::io::Result<usize>> + Send;
    /// One packet if one is waiting, else an error (`WouldBlock`).
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one packet made of `bufs`, waiting while the device is full.
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> impl std::future::Future<Output = std::io::Result<usize>> + Send;
}

impl PacketDevice for tun_rs::AsyncDevice {
    fn recv(&self, buf: &mut [u8]) -> impl std::future::Future<Output = std::io::Result<usize>> + Send {
        tun_rs::AsyncDevice::recv(self, buf)
    }
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        tun_rs::AsyncDevice::try_recv(self, buf)
    }
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> impl std::future::Future<Output = std::io::Result<usize>> + Send {
        tun_rs::AsyncDevice::send_vectored(self, bufs)
    }
}

/// A packet device in memory: what the stack writes arrives on [`MemoryPeer::rx`], what
/// is sent on [`MemoryPeer::tx`] is read by the stack. Both ways hold at most `capacity`
/// packets; like the kernel behind a TUN device, a full queue toward the laptop drops
/// what the stack writes (a write never waits), and the peer should `try_send` (a full
/// queue toward the stack drops, as a TUN's transmit queue does).
pub struct MemoryDevice {
    to_stack: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    from_stack: mpsc::Sender<Vec<u8>>,
}

/// The other end of a [`MemoryDevice`]: the laptop's side.
pub struct MemoryPeer {
    pub tx: mpsc::Sender<Vec<u8>>,
    pub rx: mpsc::Receiver<Vec<u8>>,
}

impl MemoryDevice {
    pub fn new(capacity: usize) -> (Arc<MemoryDevice>, MemoryPeer) {
        let (tx, to_stack) = mpsc::channel(capacity);
        let (from_stack, rx) = mpsc::channel(capacity);
        (Arc::new(MemoryDevice { to_stack: tokio::sync::Mutex::new(to_stack), from_stack }), MemoryPeer { tx, rx })
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the memory device's peer is gone")
}

impl PacketDevice for MemoryDevice {
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let packet = self.to_stack.lock().await.recv().await.ok_or_else(gone)?;
        let n = packet.len().min(buf.len());
        buf[..n].copy_from_slice(&packet[..n]);
        Ok(n)
    }
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let packet = self
            .to_stack
            .try_lock()
            .ok()
            .and_then(|mut rx| rx.try_recv().ok())
            .ok_or(std::io::ErrorKind::WouldBlock)?;
        let n = packet.len().min(buf.len());
        buf[..n].copy_from_slice(&packet[..n]);
        Ok(n)
    }
    async fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let packet: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let n = packet.len();
        match self.from_stack.try_send(packet) {
            Err(mpsc::error::TrySendError::Closed(_)) => Err(gone()),
            // Full: dropped, as the kernel drops what a full socket cannot take.
            _ => Ok(n),
        }
    }
}

/// The data plane; [`Dataplane::run`] drives it until the tunnel or the device fails.
pub struct Dataplane<D: PacketDevice = tun_rs::AsyncDevice> {
    stack: Stack,
    tun: Arc<D>,
    conn: quinn::Connection,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    tcp: FlowMap<TcpCtl>,
    udp: FlowMap<UdpCtl>,
    epoch: StdInstant,
    /// When this machine's addresses were last given to the stack.
    local_read: Option<StdInstant>,
    /// The virtual address mappings, given to the stack whenever they change.
    vnat: Option<tokio::sync::watch::Receiver<tpvpn_vnat::Table>>,
}

impl<D: PacketDevice> Dataplane<D> {
    pub fn new(stack: Stack, tun: Arc<D>, conn: quinn::Connection) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        Dataplane {
            stack,
            tun,
            conn,
            cmd_tx,
            cmd_rx,
            tcp: FlowMap::default(),
            udp: FlowMap::default(),
            epoch: StdInstant::now(),
            local_read: None,
            vnat: None,
        }
    }

    /// Keeps the stack's virtual address mappings those of `vnat` (from now on).
    pub fn with_vnat(mut self, mut vnat: tokio::sync::watch::Receiver<tpvpn_vnat::Table>) -> Self {
        self.stack.set_vnat(vnat.borrow_and_update().clone());
        self.vnat = Some(vnat);
        self
    }

    pub fn handle(&self) -> Handle {
        Handle { cmd: self.cmd_tx.clone() }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs until the QUIC connection or the TUN device fails; returns why.
    pub async fn run(mut self) -> String {
        tokio::spawn(route_datagrams(self.conn.clone(), self.cmd_tx.clone()));
        let mtu = self.stack.config().mtu;
        // With checksum offload every packet comes and goes behind a virtio header.
        let vnet = if self.stack.config().checksum_offload { wire::VNET_HDR_LEN } else { 0 };
        let mut buf = vec![0u8; vnet + mtu + 64];
        loop {
            if let Err(e) = self.flush().await {
                return format!("writing to the TUN device failed: {e}");
            }
            let deadline = self.stack.poll_timeout().map(|at| {
                let now = self.now();
                let wait = if at > now { (at - now).total_micros() } else { 0 };
                tokio::time::Instant::now() + std::time::Duration::from_micros(wait)
            });
            tokio::select! {
                r = self.tun.recv(&mut buf) => match r {
                    Ok(n) => {
                        let now = self.now();
                        if self.local_read.is_none_or(|t| t.elapsed() > LOCAL_FRESH) {
                            self.stack.set_local_addresses(local_addresses());
                            self.local_read = Some(StdInstant::now());
                        }
                        let _ = self.stack.input(buf.get(vnet..n).unwrap_or_default(), now);
                        // Drain what else is ready without waiting, to batch work.
                        for _ in 0..64 {
                            match self.tun.try_recv(&mut buf) {
                                Ok(n) => { let _ = self.stack.input(buf.get(vnet..n).unwrap_or_default(), now); }
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => return format!("reading the TUN device failed: {e}"),
                },
                Some(cmd) = self.cmd_rx.recv() => {
                    self.command(cmd);
                    for _ in 0..256 {
                        match self.cmd_rx.try_recv() {
                            Ok(cmd) => self.command(cmd),
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_until(deadline) => {
                    let now = self.now();
                    self.stack.handle_timeout(now);
                }
                Some(table) = changed(&mut self.vnat) => self.stack.set_vnat(table),
                e = self.conn.closed() => return format!("lost the connection to the manager: {e}"),
            }
        }
    }

    /// Handles the stack's events and writes its packets until both are exhausted.
    async fn flush(&mut self) -> std::io::Result<()> {
        loop {
            let mut idle = true;
            while let Some(ev) = self.stack.poll_event() {
                idle = false;
                self.event(ev);
            }
            while let Some(p) = self.stack.transmit() {
                idle = false;
                if self.stack.config().checksum_offload {
                    let header = wire::vnet_header(&p);
                    self.tun.send_vectored(&[IoSlice::new(&header), IoSlice::new(&p)]).await?;
                } else {
                    self.tun.send_vectored(&[IoSlice::new(&p)]).await?;
                }
                self.stack.recycle(p);
            }
            if idle {
                return Ok(());
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::TcpConnect { id, src, dst } => {
                let (up_tx, up_rx) = mpsc::channel(UP_QUEUE);
                let ctl = TcpCtl {
                    up: up_tx,
                    fin_sent_up: false,
                    stalled: Arc::default(),
                    reset: Arc::default(),
                    budget: Arc::new(Semaphore::new(DOWN_BUDGET)),
                    pending: VecDeque::new(),
                    fin_from_cluster: false,
                    closed_toward_laptop: false,
                };
                let task = TcpTask {
                    id,
                    conn: self.conn.clone(),
                    cmd: self.cmd_tx.clone(),
                    up: up_rx,
                    stalled: ctl.stalled.clone(),
                    reset: ctl.reset.clone(),
                    budget: ctl.budget.clone(),
                };
                self.tcp.insert(id, ctl);
                let span = debug_span!("flow", proto = "tcp", %src, %dst, id);
                tokio::spawn(task.run(src, dst).instrument(span));
            }
            Event::TcpActivity { id } => self.service_tcp(id),
            Event::UdpOpen { id, src, dst } => {
                let (tx, rx) = mpsc::channel(UDP_QUEUE);
                self.udp.insert(id, UdpCtl { up: tx });
                let span = debug_span!("flow", proto = "udp", %src, %dst, id);
                tokio::spawn(udp_task(id, src, dst, self.conn.clone(), self.cmd_tx.clone(), rx).instrument(span));
            }
            Event::UdpData { id, payload } => {
                if let Some(ctl) = self.udp.get(&id) {
                    // A full queue drops the datagram, as a congested link would.
                    let _ = ctl.up.try_send(payload);
                }
            }
            Event::UdpClosed { id } => {
                self.udp.remove(&id);
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Dialed { id, outcome } => {
                if self.stack.dial_result(id, outcome, now).is_err() || outcome != DialOutcome::Connected {
                    self.tcp.remove(&id);
                }
            }
            Cmd::Data { id, chunks } => {
                if let Some(ctl) = self.tcp.get_mut(&id) {
                    ctl.pending.extend(chunks);
                    self.service_tcp(id);
                }
            }
            Cmd::Fin { id } => {
                if let Some(ctl) = self.tcp.get_mut(&id) {
                    ctl.fin_from_cluster = true;
                    self.service_tcp(id);
                }
            }
            Cmd::Reset { id } => {
                let _ = self.stack.tcp_abort(id, now);
                if let Some(ctl) = self.tcp.remove(&id) {
                    ctl.reset.store(true, Ordering::Release);
                }
            }
            Cmd::Drained { id } => self.service_tcp(id),
            Cmd::UdpReply { id, bytes } => {
                let _ = self.stack.udp_send(id, &bytes, now);
            }
            Cmd::UdpEnded { id } => {
                self.udp.remove(&id);
                self.stack.remove(id);
            }
            Cmd::Stats(tx) => {
                let denied = DENIED_FLOWS.load(Ordering::Relaxed);
                let _ = tx.send(Flows { tcp: self.tcp.len(), udp: self.udp.len(), denied });
            }
            Cmd::Destinations(tx) => {
                let _ = tx.send(self.stack.flow_destinations());
            }
        }
    }

    /// Moves what can move on one TCP flow, both ways, and retires it once closed.
    fn service_tcp(&mut self, id: FlowId) {
        let now = self.now();
        let Some(ctl) = self.tcp.get_mut(&id) else { return };
        // Cluster to laptop.
        if !ctl.pending.is_empty() {
            let sent = self.stack.tcp_send_all(id, ctl.pending.iter().map(|b| &b[..]), now).unwrap_or(0);
            if sent > 0 {
                ctl.budget.add_permits(sent);
            }
            let mut left = sent;
            while let Some(front) = ctl.pending.front_mut() {
                if left < front.len() {
                    let _ = front.split_to(left);
                    break;
                }
                left -= front.len();
                ctl.pending.pop_front();
            }
        }
        if ctl.pending.is_empty() && ctl.fin_from_cluster && !ctl.closed_toward_laptop {
            ctl.closed_toward_laptop = true;
            let _ = self.stack.tcp_close(id, now);
        }
        // Laptop to cluster.
        while !ctl.fin_sent_up {
            let permit = match ctl.up.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Full(())) => {
                    ctl.stalled.store(true, Ordering::Release);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(())) => break,
            };
            let mut chunk = Bytes::new();
            match self.stack.tcp_recv_with(id, CHUNK, now, |data| chunk = Bytes::copy_from_slice(data)) {
                Ok(TcpRead::Data(_)) => permit.send(Up::Data(chunk)),
                Ok(TcpRead::Fin) => {
                    permit.send(Up::Fin);
                    ctl.fin_sent_up = true;
                }
                Ok(TcpRead::WouldBlock) | Err(_) => break,
            }
        }
        let Ok(status) = self.stack.tcp_status(id) else {
            self.tcp.remove(&id);
            return;
        };
        if status.closed || status.reset {
            if status.reset {
                ctl.reset.store(true, Ordering::Release);
            }
            self.stack.remove(id);
            self.tcp.remove(&id);
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn route_datagrams(conn: quinn::Connection, cmd: mpsc::UnboundedSender<Cmd>) {
    while let Ok(d) = conn.read_datagram().await {
        let Ok(dg) = Datagram::parse(&d) else { continue };
        let bytes = d.slice(d.len() - dg.payload.len()..);
        if cmd.send(Cmd::UdpReply { id: dg.flow_id, bytes }).is_err() {
            return;
        }
    }
}

fn outcome(status: FlowStatus) -> DialOutcome {
    match status {
        FlowStatus::Ok => DialOutcome::Connected,
        FlowStatus::Refused => DialOutcome::Refused,
        FlowStatus::TimedOut => DialOutcome::TimedOut,
        FlowStatus::Unreachable | FlowStatus::Denied | FlowStatus::Other(_) => DialOutcome::Unreachable,
    }
}

/// What became of a flow stream's opening.
enum Opened {
    /// The manager answered with this status.
    Reply(quinn::SendStream, quinn::RecvStream, FlowStatus),
    /// The manager reset the stream before its reply could be read: it connected and the
    /// destination reset the connection at once (a reset discards unread stream data,
    /// the reply included).
    ConnectedThenReset,
    Failed,
}

/// The next value of `watch`; never, without one (or once its sender is gone).
async fn changed<T: Clone>(watch: &mut Option<tokio::sync::watch::Receiver<T>>) -> Option<T> {
    let Some(w) = watch else { return std::future::pending().await };
    if w.changed().await.is_err() {
        *watch = None;
        return None;
    }
    Some(w.borrow_and_update().clone())
}

/// Opens a flow stream and waits for the manager's dial result.
async fn open_flow(
    conn: &quinn::Connection,
    protocol: Protocol,
    flow_id: u64,
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
) -> Opened {
    let Ok((mut send, mut recv)) = conn.open_bi().await else { return Opened::Failed };
    if write_message(&mut send, &Message::FlowOpen { protocol, flow_id, src, dst }).await.is_err() {
        return Opened::Failed;
    }
    match read_message(&mut recv).await {
        Ok(Some(Message::FlowReply { status, message })) => {
            if status == FlowStatus::Denied {
                // The manager's policy or a per-client limit: counted for `tpvpn status`.
                DENIED_FLOWS.fetch_add(1, Ordering::Relaxed);
                warn!(%dst, %message, "the manager denied a flow");
            } else if status != FlowStatus::Ok {
                debug!(?status, %message, "manager could not dial");
            }
            Opened::Reply(send, recv, status)
        }
        Err(tpvpn_tunnel::Error::Reset(code)) if code == u64::from(RESET_CODE) => Opened::ConnectedThenReset,
        other => {
            warn!(?other, "bad flow reply");
            Opened::Failed
        }
    }
}

struct TcpTask {
    id: FlowId,
    conn: quinn::Connection,
    cmd: mpsc::UnboundedSender<Cmd>,
    up: mpsc::Receiver<Up>,
    stalled: Arc<AtomicBool>,
    reset: Arc<AtomicBool>,
    budget: Arc<Semaphore>,
}

impl TcpTask {
    async fn run(mut self, src: std::net::SocketAddr, dst: std::net::SocketAddr) {
        let id = self.id;
        let (mut send, mut recv) = match open_flow(&self.conn, Protocol::Tcp, 0, src, dst).await {
            Opened::Reply(send, recv, FlowStatus::Ok) => {
                let _ = self.cmd.send(Cmd::Dialed { id, outcome: DialOutcome::Connected });
                (send, recv)
            }
            Opened::Reply(_, _, status) => {
                let _ = self.cmd.send(Cmd::Dialed { id, outcome: outcome(status) });
                return;
            }
            Opened::ConnectedThenReset => {
                let _ = self.cmd.send(Cmd::Dialed { id, outcome: DialOutcome::Connected });
                let _ = self.cmd.send(Cmd::Reset { id });
                return;
            }
            Opened::Failed => {
                let _ = self.cmd.send(Cmd::Dialed { id, outcome: DialOutcome::Unreachable });
                return;
            }
        };
        let (cmd, budget, stalled, reset) =
            (self.cmd.clone(), self.budget.clone(), self.stalled.clone(), self.reset.clone());
        let up = async {
            while let Some(m) = self.up.recv().await {
                if stalled.swap(false, Ordering::AcqRel) {
                    let _ = cmd.send(Cmd::Drained { id });
                }
                match m {
                    Up::Data(b) => {
                        if send.write_chunk(b).await.is_err() {
                            let _ = cmd.send(Cmd::Reset { id });
                            return;
                        }
                    }
                    Up::Fin => {
                        let _ = send.finish();
                    }
                }
            }
            // The stack dropped the flow: a laptop reset, or the end of a closed flow.
            if reset.load(Ordering::Acquire) {
                let _ = send.reset(RESET_CODE.into());
            }
        };
        let down = async {
            let mut chunks = vec![Bytes::new(); DOWN_CHUNKS];
            loop {
                match recv.read_chunks(&mut chunks).await {
                    Ok(Some(n)) => {
                        // Handed over in groups of at most DOWN_GROUP bytes, well under
                        // the budget, so that acquiring a group always succeeds (quinn
                        // may coalesce buffered data into chunks of any size).
                        let mut group = Vec::new();
                        let mut len = 0;
                        for mut chunk in chunks[..n].iter_mut().map(std::mem::take) {
                            while !chunk.is_empty() {
                                let piece = chunk.split_to(chunk.len().min(DOWN_GROUP - len));
                                len += piece.len();
                                group.push(piece);
                                if len == DOWN_GROUP {
                                    if !hand_over(&budget, &cmd, id, std::mem::take(&mut group), len).await {
                                        return;
                                    }
                                    len = 0;
                                }
                            }
                        }
                        if len > 0 && !hand_over(&budget, &cmd, id, group, len).await {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = cmd.send(Cmd::Fin { id });
                        return;
                    }
                    Err(_) => {
                        let _ = cmd.send(Cmd::Reset { id });
                        return;
                    }
                }
            }
        };
        tokio::join!(up, down);
        if self.reset.load(Ordering::Acquire) {
            let _ = recv.stop(RESET_CODE.into());
        }
    }
}

/// Takes `len` bytes of budget, then gives `chunks` to the stack; false once the stack
/// no longer takes this flow's bytes.
async fn hand_over(
    budget: &Semaphore,
    cmd: &mpsc::UnboundedSender<Cmd>,
    id: FlowId,
    chunks: Vec<Bytes>,
    len: usize,
) -> bool {
    let Ok(permit) = budget.acquire_many(len as u32).await else { return false };
    permit.forget();
    cmd.send(Cmd::Data { id, chunks }).is_ok()
}

async fn udp_task(
    id: FlowId,
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    conn: quinn::Connection,
    cmd: mpsc::UnboundedSender<Cmd>,
    mut up: mpsc::Receiver<Vec<u8>>,
) {
    let Opened::Reply(mut send, mut recv, FlowStatus::Ok) = open_flow(&conn, Protocol::Udp, id, src, dst).await else {
        let _ = cmd.send(Cmd::UdpEnded { id });
        return;
    };
    let down = async {
        let mut buf = Vec::new();
        while let Ok(true) = read_udp_record(&mut recv, &mut buf).await {
            if cmd.send(Cmd::UdpReply { id, bytes: Bytes::copy_from_slice(&buf) }).is_err() {
                break;
            }
        }
        let _ = cmd.send(Cmd::UdpEnded { id });
    };
    let upward = async {
        let mut out = Vec::new();
        while let Some(payload) = up.recv().await {
            let dg = Datagram { flow_id: id, payload: &payload };
            if conn.max_datagram_size().is_some_and(|max| dg.buffer_len() <= max) {
                out.clear();
                dg.emit(&mut out);
                let _ = conn.send_datagram(Bytes::copy_from_slice(&out));
            } else if write_udp_record(&mut send, &payload).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    };
    // The flow ends when the manager ends it (idle) or the stack forgets it.
    tokio::select! {
        _ = down => {}
        _ = upward => {}
    }
}
