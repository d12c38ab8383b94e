//! tpvpn's netstack: turns IP packets read from the TUN device into TCP and UDP flows,
//! and flow data back into IP packets for the TUN device.
//!
//! Layer and I/O contract: [`Stack`] is sans-IO. The caller feeds it packets with
//! [`Stack::input`], drives its timers with [`Stack::poll_timeout`] and
//! [`Stack::handle_timeout`] (time is always an argument), takes packets to write to the
//! TUN device from [`Stack::transmit`] and flow events from [`Stack::poll_event`], and
//! moves flow payload with the `tcp_*` and `udp_*` methods. What `input`, `tcp_send`,
//! `tcp_recv` and `tcp_close` make TCP send (data, ACKs, window updates, FIN) leaves at
//! the next [`Stack::transmit`], one poll per flow, so work done between two transmits
//! goes out in as few segments as possible.
//!
//! TCP is terminated in smoltcp, one socket per flow, each in its own small smoltcp
//! `Interface` whose only address is the flow's destination. Packets reach their flow
//! through a hash map keyed by the 5-tuple and timers live in a heap, so the cost per
//! packet and per timer does not grow with the number of flows (smoltcp's own socket
//! set would be walked on every poll). A SYN is answered only after the caller reports
//! the manager's dial result ([`Stack::dial_result`]): connected accepts the SYN,
//! refused answers RST, unreachable answers ICMP unreachable, timed out stays silent.
//!
//! UDP is parsed and emitted with `smoltcp::wire` and tracked in a NAT-style table with
//! an idle timeout.

pub mod wire;

mod outbox;
mod tcp;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, SocketAddr};

pub use smoltcp::time::{Duration, Instant};

use outbox::Outbox;
use tcp::TcpFlow;
pub use tcp::{TcpRead, TcpStatus};
use wire::Transport;

/// Errors of the netstack.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("unsupported packet: {0}")]
    Unsupported(&'static str),
    #[error("no flow {0}")]
    NoFlow(FlowId),
    #[error("flow {0} is not in a state that allows this")]
    InvalidState(FlowId),
}

/// Identifies a flow for the life of the [`Stack`]; never reused.
pub type FlowId = u64;

/// A map keyed by [`FlowId`]. Ids are handed out by the stack, never taken from the
/// network, so a multiplicative hash is enough (SipHash showed in profiles).
pub type FlowMap<V> = HashMap<FlowId, V, BuildHasherDefault<FlowIdHasher>>;

/// Fibonacci hashing of a [`FlowId`]: spreads sequential ids over the high bits that
/// the hash map's tags use.
#[derive(Default)]
pub struct FlowIdHasher(u64);

impl Hasher for FlowIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Tunables of the stack.
#[derive(Debug, Clone)]
pub struct Config {
    /// MTU of the TUN device; TCP segments toward the laptop are sized from it.
    pub mtu: usize,
    /// Receive buffer of each TCP socket (laptop to cluster); sets the advertised window.
    pub tcp_rx_buffer: usize,
    /// Send buffer of each TCP socket (cluster to laptop).
    pub tcp_tx_buffer: usize,
    /// A UDP flow without traffic for this long is forgotten.
    pub udp_idle_timeout: Duration,
    /// Most UDP flows at once; a new one beyond makes the idlest eighth go
    /// ([`Event::UdpClosed`]), so a flood of flows costs bounded memory.
    pub udp_max_flows: usize,
    /// The device completes TCP checksums (a TUN device with `IFF_VNET_HDR` and
    /// `TUN_F_CSUM`): every TCP packet from [`Stack::transmit`] then carries only its
    /// pseudo-header sum, to be written after [`wire::vnet_header`].
    pub checksum_offload: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mtu: 65_000,
            tcp_rx_buffer: 512 * 1024,
            tcp_tx_buffer: 512 * 1024,
            checksum_offload: false,
            udp_idle_timeout: Duration::from_secs(60),
            udp_max_flows: 4096,
        }
    }
}

/// Outcome of the manager's dial of a TCP destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialOutcome {
    Connected,
    Refused,
    Unreachable,
    TimedOut,
}

/// Something the caller should act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A laptop application sent a SYN: dial `dst` and report with [`Stack::dial_result`].
    /// `dst` is the cluster's address: a virtual one (see [`Stack::set_vnat`]) is
    /// translated; the laptop's side of the flow keeps the address it used.
    TcpConnect { id: FlowId, src: SocketAddr, dst: SocketAddr },
    /// A TCP flow may have data to read, room to write, or may have closed: look at
    /// [`Stack::tcp_status`].
    TcpActivity { id: FlowId },
    /// A new UDP flow; its first datagram follows as `UdpData`. `dst` as in `TcpConnect`.
    UdpOpen { id: FlowId, src: SocketAddr, dst: SocketAddr },
    /// A datagram from the laptop on a UDP flow.
    UdpData { id: FlowId, payload: Vec<u8> },
    /// A UDP flow was idle for the configured timeout and is gone.
    UdpClosed { id: FlowId },
}

/// Counters, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets_in: u64,
    pub packets_out: u64,
    pub dropped_malformed: u64,
    pub dropped_unsupported: u64,
    /// Packets whose source is not an address of this machine (another host routing
    /// through it).
    pub dropped_foreign: u64,
    pub tcp_refused: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    protocol: u8,
    src: SocketAddr,
    dst: SocketAddr,
}

struct UdpFlow {
    src: SocketAddr,
    dst: SocketAddr,
    last_active: Instant,
}

enum Flow {
    Tcp(Box<TcpFlow>),
    Udp(UdpFlow),
}

impl Flow {
    fn key(&self) -> FlowKey {
        match self {
            Flow::Tcp(t) => FlowKey { protocol: wire::TCP, src: t.src, dst: t.dst },
            Flow::Udp(u) => FlowKey { protocol: wire::UDP, src: u.src, dst: u.dst },
        }
    }
}

/// The userspace network stack. See the crate documentation.
pub struct Stack {
    config: Config,
    by_key: HashMap<FlowKey, FlowId>,
    flows: FlowMap<Flow>,
    next_id: FlowId,
    /// Timer heap of (deadline, flow); stale entries are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    events: VecDeque<Event>,
    out: Outbox,
    /// TCP flows whose socket the caller changed (send, recv, close) since their last
    /// poll; each is polled once before the next [`Stack::transmit`], so a burst of
    /// sends becomes one segment rather than one per call.
    dirty: Vec<FlowId>,
    /// The latest `now` the caller passed, for the deferred polls.
    now: Instant,
    counters: Counters,
    /// UDP flows in `flows`.
    udp_flows: usize,
    /// The machine's own addresses: packets from any other source are dropped (empty:
    /// every source is taken).
    local: Vec<IpAddr>,
    /// Virtual addresses of cluster ranges, translated when a flow is announced.
    vnat: tpvpn_vnat::Table,
}

impl Stack {
    pub fn new(config: Config) -> Self {
        let out = Outbox::new(config.checksum_offload);
        Stack {
            config,
            by_key: HashMap::new(),
            flows: FlowMap::default(),
            next_id: 1,
            timers: BinaryHeap::new(),
            events: VecDeque::new(),
            out,
            dirty: Vec::new(),
            now: Instant::ZERO,
            counters: Counters::default(),
            udp_flows: 0,
            local: Vec::new(),
            vnat: tpvpn_vnat::Table::default(),
        }
    }

    /// Flows opened from now on to a virtual address of `table` are announced with the
    /// cluster address it stands for ([`Event::TcpConnect`], [`Event::UdpOpen`]); every
    /// packet toward the laptop keeps the virtual address, so applications never see the
    /// translation. Flows already open keep their destination.
    pub fn set_vnat(&mut self, table: tpvpn_vnat::Table) {
        self.vnat = table;
    }

    /// Takes packets only from these source addresses (this machine's own), from now
    /// on; another host that routes through this machine gets nothing. Empty: any.
    pub fn set_local_addresses(&mut self, addrs: Vec<IpAddr>) {
        self.local = addrs;
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Number of TCP and UDP flows currently tracked.
    pub fn flow_counts(&self) -> (usize, usize) {
        let tcp = self.flows.values().filter(|f| matches!(f, Flow::Tcp(_))).count();
        (tcp, self.flows.len() - tcp)
    }

    /// The addresses the laptop's open flows go to (as the laptop sees them), each once.
    pub fn flow_destinations(&self) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = self.by_key.keys().map(|k| k.dst.ip()).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Feeds one IP packet read from the TUN device. A malformed or unsupported packet
    /// is dropped with an error (and counted); nothing else changes.
    pub fn input(&mut self, packet: &[u8], now: Instant) -> Result<(), Error> {
        self.counters.packets_in += 1;
        let info = match wire::parse(packet) {
            Ok(info) => info,
            Err(e) => {
                match e {
                    Error::Unsupported(_) => self.counters.dropped_unsupported += 1,
                    _ => self.counters.dropped_malformed += 1,
                }
                return Err(e);
            }
        };
        let Some((src, dst)) = info.endpoints() else {
            self.counters.dropped_unsupported += 1;
            return Err(Error::Unsupported("protocol other than tcp and udp"));
        };
        if !self.local.is_empty() && !self.local.contains(&src.ip()) {
            self.counters.dropped_foreign += 1;
            return Err(Error::Unsupported("source is not an address of this machine"));
        }
        let key = FlowKey { protocol: info.protocol, src, dst };
        match info.transport {
            Transport::Tcp(_) if !is_unicast(src.ip()) || !is_unicast(dst.ip()) => {
                self.counters.dropped_unsupported += 1;
                return Err(Error::Unsupported("tcp with a non-unicast address"));
            }
            Transport::Tcp(seg) => {
                if let Some(&id) = self.by_key.get(&key) {
                    if let Some(Flow::Tcp(flow)) = self.flows.get_mut(&id) {
                        if flow.is_pending() {
                            // A retransmitted SYN while the manager dials: still unanswered.
                            return Ok(());
                        }
                        flow.input(packet, now, &mut self.out);
                        self.after_tcp_poll(id, now);
                        self.mark_dirty(id, now);
                    }
                } else if seg.syn && !seg.ack && !seg.rst {
                    let id = self.alloc_id();
                    let flow = TcpFlow::pending(src, dst, packet.to_vec(), &self.config);
                    self.by_key.insert(key, id);
                    self.flows.insert(id, Flow::Tcp(Box::new(flow)));
                    let dst = SocketAddr::new(self.vnat.to_cluster(dst.ip()), dst.port());
                    self.events.push_back(Event::TcpConnect { id, src, dst });
                } else if !seg.rst {
                    // A segment of no flow we know (say, after a restart): a closed port.
                    self.out.push(wire::tcp_reset_for(&info, &seg)?);
                }
            }
            Transport::Udp { payload, .. } => {
                let payload = packet[payload.0..payload.1].to_vec();
                let id = match self.by_key.get(&key) {
                    Some(&id) => {
                        if let Some(Flow::Udp(u)) = self.flows.get_mut(&id) {
                            u.last_active = now;
                        }
                        id
                    }
                    None => {
                        if self.udp_flows >= self.config.udp_max_flows {
                            self.evict_idlest_udp();
                        }
                        let id = self.alloc_id();
                        self.by_key.insert(key, id);
                        self.flows.insert(id, Flow::Udp(UdpFlow { src, dst, last_active: now }));
                        self.udp_flows += 1;
                        self.timers.push(Reverse((now + self.config.udp_idle_timeout, id)));
                        let dst = SocketAddr::new(self.vnat.to_cluster(dst.ip()), dst.port());
                        self.events.push_back(Event::UdpOpen { id, src, dst });
                        id
                    }
                };
                self.events.push_back(Event::UdpData { id, payload });
            }
            // `endpoints()` above returned early for every other transport.
            Transport::Other => {}
        }
        Ok(())
    }

    fn alloc_id(&mut self) -> FlowId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Reports the manager's dial result for a flow announced by [`Event::TcpConnect`].
    pub fn dial_result(&mut self, id: FlowId, outcome: DialOutcome, now: Instant) -> Result<(), Error> {
        let Some(Flow::Tcp(flow)) = self.flows.get_mut(&id) else {
            return Err(Error::NoFlow(id));
        };
        let Some(syn) = flow.take_pending_syn() else {
            return Err(Error::InvalidState(id));
        };
        match outcome {
            DialOutcome::Connected => {
                flow.accept(&syn, now, id, &mut self.out);
                self.after_tcp_poll(id, now);
                self.mark_dirty(id, now);
            }
            DialOutcome::Refused | DialOutcome::Unreachable => {
                let info = wire::parse(&syn)?;
                let reply = match (outcome, info.transport) {
                    (DialOutcome::Refused, Transport::Tcp(seg)) => {
                        self.counters.tcp_refused += 1;
                        wire::tcp_reset_for(&info, &seg)?
                    }
                    _ => wire::icmp_unreachable_for(&syn, &info)?,
                };
                self.out.push(reply);
                self.remove(id);
            }
            DialOutcome::TimedOut => self.remove(id),
        }
        Ok(())
    }

    /// State of a TCP flow: bytes readable, room to write, closed or reset.
    pub fn tcp_status(&self, id: FlowId) -> Result<TcpStatus, Error> {
        match self.flows.get(&id) {
            Some(Flow::Tcp(f)) => Ok(f.status()),
            _ => Err(Error::NoFlow(id)),
        }
    }

    /// Reads bytes the laptop application sent on a TCP flow into `buf`.
    pub fn tcp_recv(&mut self, id: FlowId, buf: &mut [u8], now: Instant) -> Result<TcpRead, Error> {
        self.tcp_recv_with(id, buf.len(), now, |data| buf[..data.len()].copy_from_slice(data))
    }

    /// Reads bytes the laptop application sent on a TCP flow without a copy of its own:
    /// `f` sees the next contiguous run of them in the socket's buffer (at most `max`),
    /// and they count as read. Call again for more (the buffer is a ring).
    pub fn tcp_recv_with(
        &mut self,
        id: FlowId,
        max: usize,
        now: Instant,
        f: impl FnOnce(&[u8]),
    ) -> Result<TcpRead, Error> {
        let r = tcp_flow(&mut self.flows, id)?.recv_with(max, f);
        self.mark_dirty(id, now);
        Ok(r)
    }

    /// Queues bytes toward the laptop application; returns how many fit.
    pub fn tcp_send(&mut self, id: FlowId, data: &[u8], now: Instant) -> Result<usize, Error> {
        self.tcp_send_all(id, [data], now)
    }

    /// Queues `chunks` in order toward the laptop application, up to the first that
    /// does not fit whole; returns how many bytes fit in all (a prefix of their
    /// concatenation).
    pub fn tcp_send_all<'a>(
        &mut self,
        id: FlowId,
        chunks: impl IntoIterator<Item = &'a [u8]>,
        now: Instant,
    ) -> Result<usize, Error> {
        let flow = tcp_flow(&mut self.flows, id)?;
        let mut sent = 0;
        for chunk in chunks {
            let n = flow.send(chunk);
            sent += n;
            if n < chunk.len() {
                break;
            }
        }
        self.mark_dirty(id, now);
        Ok(sent)
    }

    /// Closes the cluster-to-laptop direction (FIN once queued data is sent).
    pub fn tcp_close(&mut self, id: FlowId, now: Instant) -> Result<(), Error> {
        tcp_flow(&mut self.flows, id)?.close();
        self.mark_dirty(id, now);
        Ok(())
    }

    /// Resets the flow toward the laptop (RST) and forgets it.
    pub fn tcp_abort(&mut self, id: FlowId, now: Instant) -> Result<(), Error> {
        let flow = tcp_flow(&mut self.flows, id)?;
        // Bytes queued before the reset still go out first, as they would have.
        flow.poll(now, &mut self.out);
        flow.abort(now, &mut self.out);
        self.remove(id);
        Ok(())
    }

    /// Sends a datagram from the cluster to the laptop on a UDP flow.
    pub fn udp_send(&mut self, id: FlowId, payload: &[u8], now: Instant) -> Result<(), Error> {
        let Some(Flow::Udp(u)) = self.flows.get_mut(&id) else {
            return Err(Error::NoFlow(id));
        };
        u.last_active = now;
        let pkt = wire::udp_packet(u.dst, u.src, payload)?;
        self.out.push(pkt);
        Ok(())
    }

    /// Forgets a flow (TCP after it closed, UDP when the tunnel side ended it).
    pub fn remove(&mut self, id: FlowId) {
        if let Some(flow) = self.flows.remove(&id) {
            self.by_key.remove(&flow.key());
            if matches!(flow, Flow::Udp(_)) {
                self.udp_flows -= 1;
            }
        }
    }

    /// Forgets the eighth of the UDP flows idle longest (at least one), announcing each.
    /// One scan per eighth of the table: amortised, a constant per new flow.
    fn evict_idlest_udp(&mut self) {
        let mut udp: Vec<(Instant, FlowId)> = self
            .flows
            .iter()
            .filter_map(|(id, f)| match f {
                Flow::Udp(u) => Some((u.last_active, *id)),
                Flow::Tcp(_) => None,
            })
            .collect();
        let n = (udp.len() / 8).max(1).min(udp.len());
        if n == 0 {
            return;
        }
        udp.select_nth_unstable(n - 1);
        for &(_, id) in &udp[..n] {
            self.remove(id);
            self.events.push_back(Event::UdpClosed { id });
        }
        // Their idle timers go too: a flood of flows must not leave one per flow behind.
        let flows = &self.flows;
        self.timers.retain(|Reverse((_, id))| flows.contains_key(id));
    }

    /// Remembers that a TCP flow needs a poll before the next transmit.
    fn mark_dirty(&mut self, id: FlowId, now: Instant) {
        self.now = self.now.max(now);
        if let Some(Flow::Tcp(flow)) = self.flows.get_mut(&id) {
            if flow.mark_dirty() {
                self.dirty.push(id);
            }
        }
    }

    /// Polls every flow the caller changed since the last transmit, once each.
    fn poll_dirty(&mut self) {
        let now = self.now;
        for id in std::mem::take(&mut self.dirty) {
            if let Some(Flow::Tcp(flow)) = self.flows.get_mut(&id) {
                flow.clear_dirty();
                flow.poll(now, &mut self.out);
                self.reschedule(id, now);
            }
        }
    }

    /// After a poll of a TCP flow the caller asked for: schedule its next timer.
    fn reschedule(&mut self, id: FlowId, now: Instant) {
        let Some(Flow::Tcp(flow)) = self.flows.get_mut(&id) else { return };
        if let Some(at) = flow.reschedule(now) {
            self.timers.push(Reverse((at, id)));
        }
    }

    /// After a poll of a TCP flow caused by a packet, a timer or a dial result: schedule
    /// its next timer and tell the caller to look at the flow. (Polls the caller asked
    /// for raise no event: the caller looks at the flow after them anyway.)
    fn after_tcp_poll(&mut self, id: FlowId, now: Instant) {
        self.reschedule(id, now);
        let Some(Flow::Tcp(flow)) = self.flows.get_mut(&id) else { return };
        if flow.mark_notified() {
            self.events.push_back(Event::TcpActivity { id });
        }
    }

    /// The next instant [`Stack::handle_timeout`] should be called, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.dirty.is_empty() {
            return Some(self.now);
        }
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Runs the timers that are due: TCP retransmissions, UDP idle expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.poll_dirty();
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            match self.flows.get_mut(&id) {
                Some(Flow::Tcp(flow)) => {
                    // A stale entry: the flow rescheduled since.
                    if !flow.timer_due(at) {
                        continue;
                    }
                    flow.poll(now, &mut self.out);
                    self.after_tcp_poll(id, now);
                }
                Some(Flow::Udp(u)) => {
                    let expiry = u.last_active + self.config.udp_idle_timeout;
                    if expiry <= now {
                        self.remove(id);
                        self.events.push_back(Event::UdpClosed { id });
                    } else {
                        self.timers.push(Reverse((expiry, id)));
                    }
                }
                None => {}
            }
        }
    }

    /// The next event for the caller.
    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.pop_front()?;
        if let Event::TcpActivity { id } = ev {
            if let Some(Flow::Tcp(f)) = self.flows.get_mut(&id) {
                f.clear_notified();
            }
        }
        Some(ev)
    }

    /// The next packet to write to the TUN device. What `tcp_send`, `tcp_recv` and
    /// `tcp_close` queued since the last call (data, window updates, FIN) is sent here,
    /// one poll per flow.
    pub fn transmit(&mut self) -> Option<Vec<u8>> {
        if !self.dirty.is_empty() {
            self.poll_dirty();
        }
        let p = self.out.pop()?;
        self.counters.packets_out += 1;
        Some(p)
    }

    /// Hands back a packet from [`Stack::transmit`] once written, so that its buffer
    /// carries a later packet.
    pub fn recycle(&mut self, packet: Vec<u8>) {
        self.out.recycle(packet);
    }
}

/// TCP needs unicast ends (smoltcp refuses other interface addresses).
fn is_unicast(ip: std::net::IpAddr) -> bool {
    smoltcp::wire::IpAddress::from(ip).is_unicast()
}

fn tcp_flow(flows: &mut FlowMap<Flow>, id: FlowId) -> Result<&mut TcpFlow, Error> {
    match flows.get_mut(&id) {
        Some(Flow::Tcp(f)) => Ok(f),
        _ => Err(Error::NoFlow(id)),
    }
}

#[cfg(test)]
mod tests;
