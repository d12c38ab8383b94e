//! Congestion control of the tunnel: quinn's Cubic, except that light loss does not
//! shrink the window.
//!
//! A loss-based controller reads every lost packet as a full queue. On a path with random
//! loss (Wi-Fi, a lossy WAN) that caps one connection near MSS/RTT·1.22/√p whatever the
//! capacity: at 20 ms RTT and 1% loss, about 10 Mbit/s (Cubic, kernel or quinn). And
//! every flow of the laptop shares this one QUIC connection.
//!
//! [`LossTolerantCubic`] hands a loss to Cubic when it looks like congestion:
//! - a queue is standing on the path: the RTT (latest or smoothed) is above [`QUEUE_RTT_FACTOR`] ×
//!   the minimum RTT plus [`QUEUE_RTT_SLACK`] (a drop-tail queue that overflows has
//!   filled first, so losses at a full queue come with a longer RTT, random losses do
//!   not); or
//! - the loss rate over the last two round trips (bytes lost / bytes acknowledged or
//!   lost) exceeds [`LOSS_TOLERANCE`], with an allowance of [`LOSS_ALLOWANCE_PACKETS`]
//!   packets so that small windows are not judged on one loss: the backstop for queues
//!   too shallow to lengthen the RTT; or
//! - persistent congestion, or an ECN congestion mark.
//!
//! Other losses are still retransmitted, they only leave the window alone.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// Loss rate (lost bytes / bytes acknowledged or lost, over two round trips) up to which
/// losses do not reduce the window.
pub const LOSS_TOLERANCE: f64 = 0.02;
/// Losses always tolerated on top of [`LOSS_TOLERANCE`], in packets of the current MTU.
pub const LOSS_ALLOWANCE_PACKETS: u64 = 2;
/// A queue is standing when the RTT (latest or smoothed) exceeds the minimum RTT times this…
pub const QUEUE_RTT_FACTOR: f64 = 1.25;
/// …plus this.
pub const QUEUE_RTT_SLACK: Duration = Duration::from_millis(1);

/// Builds [`LossTolerantCubic`] controllers (quinn's default Cubic inside).
#[derive(Debug, Clone, Default)]
pub struct LossTolerantCubicConfig {
    cubic: Arc<CubicConfig>,
}

impl LossTolerantCubicConfig {
    /// With an initial window of `bytes` (Cubic's default is ~10 packets of 1,472
    /// bytes: less than one packet where packets are larger, as over a stream).
    pub fn with_initial_window(bytes: u64) -> Self {
        let mut cubic = CubicConfig::default();
        cubic.initial_window(bytes);
        LossTolerantCubicConfig { cubic: Arc::new(cubic) }
    }
}

impl ControllerFactory for LossTolerantCubicConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LossTolerantCubic {
            inner: self.cubic.clone().build(now, current_mtu),
            mtu: u64::from(current_mtu),
            round_start: now,
            round: Counts::default(),
            previous: Counts::default(),
            queueing: false,
        })
    }
}

/// Bytes acknowledged and lost in one round trip.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    acked: u64,
    lost: u64,
}

/// Cubic behind a loss-rate filter; see the module documentation.
pub struct LossTolerantCubic {
    inner: Box<dyn Controller>,
    mtu: u64,
    /// Start of the current round (one smoothed RTT long).
    round_start: Instant,
    round: Counts,
    previous: Counts,
    /// Whether the RTT said, at the last ack, that a queue is standing on the path.
    queueing: bool,
}

impl LossTolerantCubic {
    /// Starts a new round once a smoothed RTT has passed.
    fn roll(&mut self, now: Instant, srtt: Duration) {
        if now.saturating_duration_since(self.round_start) >= srtt {
            self.previous = self.round;
            self.round = Counts::default();
            self.round_start = now;
        }
    }

    /// Whether the losses of the last two rounds exceed the tolerance.
    fn congested(&self) -> bool {
        let lost = self.round.lost + self.previous.lost;
        let total = lost + self.round.acked + self.previous.acked;
        // Exact in f64 for any realistic byte count.
        lost as f64 > LOSS_TOLERANCE * total as f64 + (LOSS_ALLOWANCE_PACKETS * self.mtu) as f64
    }
}

impl Controller for LossTolerantCubic {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.roll(now, rtt.get());
        self.round.acked += bytes;
        // `conservative`: the larger of the smoothed and the latest RTT, so a queue that
        // fills within a round trip (slow start) counts at once.
        self.queueing = rtt.conservative() > rtt.min().mul_f64(QUEUE_RTT_FACTOR) + QUEUE_RTT_SLACK;
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.round.lost += lost_bytes;
        // `lost_bytes == 0`: an ECN congestion mark, an explicit signal.
        if is_persistent_congestion || lost_bytes == 0 || self.queueing || self.congested() {
            self.inner.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LossTolerantCubic {
            inner: self.inner.clone_box(),
            mtu: self.mtu,
            round_start: self.round_start,
            round: self.round,
            previous: self.previous,
            queueing: self.queueing,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> LossTolerantCubic {
        let cfg = Arc::new(LossTolerantCubicConfig::default());
        let now = Instant::now();
        LossTolerantCubic {
            inner: cfg.cubic.clone().build(now, 1200),
            mtu: 1200,
            round_start: now,
            round: Counts::default(),
            previous: Counts::default(),
            queueing: false,
        }
    }

    #[test]
    fn light_loss_is_tolerated_heavy_loss_is_not() {
        let mut c = controller();
        c.round = Counts { acked: 1_000_000, lost: 0 };
        c.previous = Counts { acked: 1_000_000, lost: 0 };
        let before = c.window();
        // 1% of two rounds.
        let now = Instant::now();
        c.on_congestion_event(now, now, false, 20_000);
        assert_eq!(c.window(), before, "1% loss must not shrink the window");
        // Now 5%.
        c.on_congestion_event(now, now, false, 80_000);
        assert!(c.window() < before, "5% loss must shrink the window");
    }

    #[test]
    fn light_loss_with_a_standing_queue_is_congestion() {
        let mut c = controller();
        c.round = Counts { acked: 1_000_000, lost: 0 };
        c.queueing = true;
        let before = c.window();
        let now = Instant::now();
        c.on_congestion_event(now, now, false, 1200);
        assert!(c.window() < before);
    }

    #[test]
    fn a_lone_loss_in_a_small_window_is_tolerated_but_persistent_congestion_is_not() {
        let mut c = controller();
        c.round = Counts { acked: 12_000, lost: 0 };
        let before = c.window();
        let now = Instant::now();
        c.on_congestion_event(now, now, false, 1200);
        assert_eq!(c.window(), before);
        c.on_congestion_event(now, now, true, 1200);
        assert!(c.window() < before);
    }
}
