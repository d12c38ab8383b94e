//! One terminated TCP flow: a smoltcp socket in its own smoltcp `Interface`, fed only
//! the packets of this flow, so polling it costs the same whatever the number of flows.

use std::net::SocketAddr;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp::{self, RecvError, State};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};

use crate::outbox::Outbox;
use crate::{Config, FlowId};

/// Result of reading a TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpRead {
    /// This many bytes were read.
    Data(usize),
    /// Nothing to read now.
    WouldBlock,
    /// The laptop application closed its write side and every byte was read.
    Fin,
}

/// A snapshot of a TCP flow for the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpStatus {
    /// Waiting for the dial result; the SYN is not answered yet.
    pub pending: bool,
    /// Bytes from the laptop waiting to be read.
    pub recv_queued: usize,
    /// The laptop's FIN arrived (all data before it is in the receive buffer).
    pub recv_finished: bool,
    /// Room in the send buffer toward the laptop.
    pub send_space: usize,
    /// Bytes queued toward the laptop and not yet acknowledged.
    pub send_queued: usize,
    /// The connection ended cleanly (both FINs exchanged).
    pub closed: bool,
    /// The connection was reset by the laptop (or ended without both FINs).
    pub reset: bool,
}

struct Conn {
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
}

pub(crate) struct TcpFlow {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
    pending_syn: Option<Vec<u8>>,
    conn: Option<Conn>,
    mtu: usize,
    rx_buffer: usize,
    tx_buffer: usize,
    /// Earliest timer entry in the stack's heap that is still live for this flow.
    scheduled: Option<Instant>,
    /// An activity event is queued and not yet taken.
    notified: bool,
    /// In the stack's list of flows to poll before the next transmit.
    dirty: bool,
    we_closed: bool,
    remote_fin_seen: bool,
}

impl TcpFlow {
    pub(crate) fn pending(src: SocketAddr, dst: SocketAddr, syn: Vec<u8>, config: &Config) -> Self {
        TcpFlow {
            src,
            dst,
            pending_syn: Some(syn),
            conn: None,
            mtu: config.mtu,
            rx_buffer: config.tcp_rx_buffer,
            tx_buffer: config.tcp_tx_buffer,
            scheduled: None,
            notified: false,
            dirty: false,
            we_closed: false,
            remote_fin_seen: false,
        }
    }

    pub(crate) fn is_pending(&self) -> bool {
        self.pending_syn.is_some()
    }

    pub(crate) fn take_pending_syn(&mut self) -> Option<Vec<u8>> {
        self.pending_syn.take()
    }

    /// Creates the socket listening on the destination and feeds it the SYN.
    pub(crate) fn accept(&mut self, syn: &[u8], now: Instant, id: FlowId, out: &mut Outbox) {
        let mut dev = Dev { rx: None, out, mtu: self.mtu };
        let mut cfg = IfaceConfig::new(HardwareAddress::Ip);
        cfg.random_seed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now.total_micros() as u64;
        let mut iface = Interface::new(cfg, &mut dev, now);
        // The interface's only address is the destination, with prefix 0 so that every
        // peer is on-link: no routes are needed.
        iface.update_ip_addrs(|addrs| {
            // Invariant: a fresh interface has room for one address.
            addrs.push(IpCidr::new(self.dst.ip().into(), 0)).expect("one address fits");
        });
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.rx_buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.tx_buffer]),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        let endpoint = IpListenEndpoint { addr: Some(self.dst.ip().into()), port: self.dst.port() };
        // Invariant: listen fails only for port 0, which no SYN can carry to us.
        if socket.listen(endpoint).is_err() {
            return;
        }
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        self.conn = Some(Conn { iface, sockets, handle });
        self.input(syn, now, dev.out);
    }

    fn with_conn<R>(
        &mut self,
        rx: Option<&[u8]>,
        now: Instant,
        out: &mut Outbox,
        f: impl FnOnce(&mut tcp::Socket<'static>) -> R,
    ) -> Option<R> {
        let conn = self.conn.as_mut()?;
        let r = f(conn.sockets.get_mut::<tcp::Socket>(conn.handle));
        let mut dev = Dev { rx, out, mtu: self.mtu };
        conn.iface.poll(now, &mut dev, &mut conn.sockets);
        self.note_remote_fin();
        Some(r)
    }

    fn note_remote_fin(&mut self) {
        let Some(conn) = &self.conn else { return };
        let state = conn.sockets.get::<tcp::Socket>(conn.handle).state();
        if matches!(state, State::CloseWait | State::LastAck | State::Closing | State::TimeWait) {
            self.remote_fin_seen = true;
        }
    }

    /// Processes one packet from the laptop, sending only what smoltcp answers at once
    /// (e.g. a reset); data and acknowledgements wait for the next poll, so the driver can
    /// first refill the send buffer and one segment carries both.
    pub(crate) fn input(&mut self, packet: &[u8], now: Instant, out: &mut Outbox) {
        let Some(conn) = self.conn.as_mut() else { return };
        let mut dev = Dev { rx: Some(packet), out, mtu: self.mtu };
        conn.iface.poll_ingress_single(now, &mut dev, &mut conn.sockets);
        self.note_remote_fin();
    }

    pub(crate) fn poll(&mut self, now: Instant, out: &mut Outbox) {
        self.with_conn(None, now, out, |_| ());
    }

    /// Runs `f` on the socket without polling: what it queued goes out at the next poll.
    fn with_socket<R>(&mut self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> Option<R> {
        let conn = self.conn.as_mut()?;
        Some(f(conn.sockets.get_mut::<tcp::Socket>(conn.handle)))
    }

    /// Consumes the next contiguous received bytes (at most `max`), shown to `f`.
    pub(crate) fn recv_with(&mut self, max: usize, f: impl FnOnce(&[u8])) -> TcpRead {
        self.with_socket(|s| {
            match s.recv(|data| {
                let n = data.len().min(max);
                if n > 0 {
                    f(&data[..n]);
                }
                (n, n)
            }) {
                Ok(0) => TcpRead::WouldBlock,
                Ok(n) => TcpRead::Data(n),
                Err(RecvError::Finished) => TcpRead::Fin,
                Err(RecvError::InvalidState) => TcpRead::WouldBlock,
            }
        })
        .unwrap_or(TcpRead::WouldBlock)
    }

    pub(crate) fn send(&mut self, data: &[u8]) -> usize {
        self.with_socket(|s| s.send_slice(data).unwrap_or(0)).unwrap_or(0)
    }

    pub(crate) fn close(&mut self) {
        self.we_closed = true;
        self.with_socket(|s| s.close());
    }

    /// Marks the flow as needing a poll; false if it already was marked.
    pub(crate) fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    pub(crate) fn clear_dirty(&mut self) {
        self.dirty = false;
    }

    pub(crate) fn abort(&mut self, now: Instant, out: &mut Outbox) {
        self.with_conn(None, now, out, |s| s.abort());
    }

    pub(crate) fn status(&self) -> TcpStatus {
        let Some(conn) = &self.conn else {
            return TcpStatus {
                pending: self.pending_syn.is_some(),
                reset: self.pending_syn.is_none(),
                ..Default::default()
            };
        };
        let s = conn.sockets.get::<tcp::Socket>(conn.handle);
        let state = s.state();
        let ended = matches!(state, State::Closed | State::TimeWait);
        let clean = state == State::TimeWait || (self.we_closed && self.remote_fin_seen);
        TcpStatus {
            pending: false,
            recv_queued: s.recv_queue(),
            recv_finished: self.remote_fin_seen,
            send_space: if s.may_send() { s.send_capacity() - s.send_queue() } else { 0 },
            send_queued: s.send_queue(),
            closed: ended && clean,
            reset: ended && !clean,
        }
    }

    /// Asks smoltcp when this flow next needs a poll; returns a deadline to add to the
    /// timer heap if it is earlier than the one already there.
    pub(crate) fn reschedule(&mut self, now: Instant) -> Option<Instant> {
        let conn = self.conn.as_mut()?;
        let at = conn.iface.poll_at(now, &conn.sockets)?;
        match self.scheduled {
            Some(s) if s <= at => None,
            _ => {
                self.scheduled = Some(at);
                Some(at)
            }
        }
    }

    /// Whether the heap entry for `at` is this flow's live timer (and consumes it).
    pub(crate) fn timer_due(&mut self, at: Instant) -> bool {
        if self.scheduled == Some(at) {
            self.scheduled = None;
            true
        } else {
            false
        }
    }

    /// Marks an activity event as queued; false if one already is.
    pub(crate) fn mark_notified(&mut self) -> bool {
        !std::mem::replace(&mut self.notified, true)
    }

    pub(crate) fn clear_notified(&mut self) {
        self.notified = false;
    }
}

/// A smoltcp device over one optional input packet and the stack's output queue.
struct Dev<'a> {
    rx: Option<&'a [u8]>,
    out: &'a mut Outbox,
    mtu: usize,
}

struct RxTok<'a>(&'a [u8]);
struct TxTok<'a>(&'a mut Outbox);

impl smoltcp::phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.0.buffer(len);
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl Device for Dev<'_> {
    type RxToken<'b>
        = RxTok<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxTok<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let packet = self.rx.take()?;
        Some((RxTok(packet), TxTok(&mut *self.out)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxTok<'_>> {
        Some(TxTok(&mut *self.out))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Packets come from the local kernel, which checksummed them: verify nothing on
        // input, compute everything on output but what the device completes.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = if self.out.partial_tcp { Checksum::None } else { Checksum::Tx };
        caps.checksum.udp = Checksum::Tx;
        caps
    }
}
