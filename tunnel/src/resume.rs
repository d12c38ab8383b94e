//! Resumable flows across an outage: the sans-IO core of issue 24 (not yet wired to the
//! client or the manager, and no message carries it yet).
//!
//! Every TCP flow ends in a socket of ours on both sides (the laptop's smoltcp stack, the
//! manager's socket to the server), so neither application sees the tunnel. To carry a
//! flow over a lost connection, each side keeps, per flow and direction:
//! - as **sender**, an [`Outbox`]: every byte written to the tunnel stays retained until
//!   the peer says it delivered it to its socket ([`Outbox::ack`]); the outbox is bounded,
//!   and a full one means "stop reading the local socket" (back-pressure to the app or
//!   the server, never a reset);
//! - as **receiver**, the count of bytes delivered to its socket.
//!
//! After an outage both sides state, per flow, how many bytes they delivered
//! ([`Resumption::reconnected`]); each then sends again exactly the bytes the peer lacks,
//! from its outbox ([`Resumption::peer_resumed`]): none lost, none twice, in order. A flow
//! whose missing bytes are no longer retained, that the peer does not know, or for which
//! the peer claims bytes never sent, is reset (the only safe end). The session waits for
//! at most its grace period, counted from the first loss (a connection that flaps does
//! not extend it); past it every flow ends ([`Resumption::poll`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Why a flow cannot be resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// The peer says it delivered bytes that were never sent.
    #[error("the peer claims {claimed} bytes delivered of {sent} sent")]
    ClaimsUnsent { claimed: u64, sent: u64 },
    /// The peer lacks bytes that are no longer retained (it went back before an ack).
    #[error("bytes from {from} are gone (retained from {retained})")]
    NotRetained { from: u64, retained: u64 },
    /// The peer does not know the flow (it ended it, or lost it).
    #[error("the peer does not know this flow")]
    Unknown,
    /// The grace period passed before the session was resumed.
    #[error("not resumed within the grace period")]
    GraceExpired,
}

/// The bytes a sender wrote and the peer has not yet said it delivered.
#[derive(Debug)]
pub struct Outbox {
    /// Stream offset of `data[0]`: every byte before it was delivered by the peer.
    acked: u64,
    data: VecDeque<u8>,
    cap: usize,
}

impl Outbox {
    /// An outbox retaining at most `cap` bytes.
    pub fn new(cap: usize) -> Outbox {
        Outbox { acked: 0, data: VecDeque::new(), cap }
    }

    /// How many more bytes may be written now: at 0, stop reading the local socket.
    pub fn room(&self) -> usize {
        self.cap - self.data.len()
    }

    /// Every byte written so far.
    pub fn sent(&self) -> u64 {
        self.acked + self.data.len() as u64
    }

    /// Retains the first [`Outbox::room`] bytes of `bytes`; returns how many, which are
    /// exactly the bytes to send.
    pub fn write(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        self.data.extend(&bytes[..n]);
        n
    }

    /// The peer delivered `delivered` bytes in total: those are no longer retained.
    pub fn ack(&mut self, delivered: u64) -> Result<(), ResumeError> {
        if delivered > self.sent() {
            return Err(ResumeError::ClaimsUnsent { claimed: delivered, sent: self.sent() });
        }
        if delivered < self.acked {
            return Err(ResumeError::NotRetained { from: delivered, retained: self.acked });
        }
        let n = usize::try_from(delivered - self.acked).unwrap_or(usize::MAX);
        self.data.drain(..n);
        self.acked = delivered;
        Ok(())
    }

    /// After an outage: the peer delivered `delivered` bytes; the ones to send again.
    pub fn replay(&mut self, delivered: u64) -> Result<Vec<u8>, ResumeError> {
        self.ack(delivered)?;
        Ok(self.data.iter().copied().collect())
    }
}

/// One flow as one side keeps it.
#[derive(Debug)]
struct Flow {
    out: Outbox,
    /// Bytes received and delivered to our socket.
    delivered: u64,
    /// `delivered` as last told to the peer ([`Resumption::acks_due`]).
    told: u64,
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Live,
    /// The connection is lost (`since` the first loss).
    Parked {
        since: Instant,
    },
    /// Connected again; waiting for the peer's statement.
    Resuming {
        since: Instant,
    },
    /// Past the grace: every flow ended.
    Ended,
}

/// What the side must do after the peer's statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send these bytes on the flow's new stream before anything new.
    Replay { flow: u64, bytes: Vec<u8> },
    /// Reset the flow's socket: it cannot be resumed.
    Reset { flow: u64, why: ResumeError },
}

/// One side's flows of a session, and whether it is connected.
#[derive(Debug)]
pub struct Resumption {
    grace: Duration,
    retain: usize,
    ack_every: u64,
    phase: Phase,
    flows: BTreeMap<u64, Flow>,
}

impl Resumption {
    /// A live session: each flow retains at most `retain` unacknowledged bytes, tells its
    /// deliveries every `ack_every` bytes, and survives an outage of up to `grace`.
    pub fn new(grace: Duration, retain: usize, ack_every: u64) -> Resumption {
        Resumption { grace, retain, ack_every: ack_every.max(1), phase: Phase::Live, flows: BTreeMap::new() }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A new flow.
    pub fn open(&mut self, flow: u64) {
        self.flows.insert(flow, Flow { out: Outbox::new(self.retain), delivered: 0, told: 0 });
    }

    /// The flow ended normally (both sides closed it).
    pub fn close(&mut self, flow: u64) {
        self.flows.remove(&flow);
    }

    /// How many bytes of `flow` may be read from the local socket now.
    pub fn room(&self, flow: u64) -> usize {
        self.flows.get(&flow).map_or(0, |f| f.out.room())
    }

    /// Bytes read from the local socket for `flow`: returns how many were taken (retained,
    /// and to be sent while live).
    pub fn send(&mut self, flow: u64, bytes: &[u8]) -> usize {
        self.flows.get_mut(&flow).map_or(0, |f| f.out.write(bytes))
    }

    /// `n` bytes of `flow` were delivered to the local socket.
    pub fn delivered(&mut self, flow: u64, n: usize) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.delivered += n as u64;
        }
    }

    /// The peer's acknowledgment of `flow` while live; a flow it cannot be is to reset.
    pub fn peer_acked(&mut self, flow: u64, delivered: u64) -> Result<(), ResumeError> {
        let f = self.flows.get_mut(&flow).ok_or(ResumeError::Unknown)?;
        f.out.ack(delivered)
    }

    /// Flows whose deliveries advanced by `ack_every` or more since last told: (flow,
    /// delivered) to send the peer.
    pub fn acks_due(&mut self) -> Vec<(u64, u64)> {
        let every = self.ack_every;
        self.flows
            .iter_mut()
            .filter(|(_, f)| f.delivered - f.told >= every)
            .map(|(id, f)| {
                f.told = f.delivered;
                (*id, f.delivered)
            })
            .collect()
    }

    /// The connection is lost: the session waits (the grace counts from the first loss).
    pub fn lost(&mut self, now: Instant) {
        self.phase = match self.phase {
            Phase::Live => Phase::Parked { since: now },
            Phase::Parked { since } | Phase::Resuming { since } => Phase::Parked { since },
            Phase::Ended => Phase::Ended,
        };
    }

    /// Ends the session when the grace has passed: the flows to reset (all of them).
    pub fn poll(&mut self, now: Instant) -> Vec<Effect> {
        match self.phase {
            Phase::Parked { since } | Phase::Resuming { since } if now.duration_since(since) >= self.grace => {
                self.phase = Phase::Ended;
                std::mem::take(&mut self.flows)
                    .into_keys()
                    .map(|flow| Effect::Reset { flow, why: ResumeError::GraceExpired })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// Connected again: our statement for the peer, (flow, bytes delivered) of every flow;
    /// or, when the session cannot resume (past the grace, or never lost), the flows to
    /// reset.
    pub fn reconnected(&mut self, now: Instant) -> Result<Vec<(u64, u64)>, Vec<Effect>> {
        let ended = self.poll(now);
        let (Phase::Parked { since } | Phase::Resuming { since }) = self.phase else { return Err(ended) };
        self.phase = Phase::Resuming { since };
        Ok(self.flows.iter().map(|(id, f)| (*id, f.delivered)).collect())
    }

    /// The peer's statement arrived: what to send again on each flow, which to reset. The
    /// session is live again (unless the grace passed first: then every flow is reset).
    pub fn peer_resumed(&mut self, now: Instant, peer: &[(u64, u64)]) -> Vec<Effect> {
        let ended = self.poll(now);
        if !ended.is_empty() || self.phase == Phase::Ended {
            return ended;
        }
        let Phase::Resuming { .. } = self.phase else { return Vec::new() };
        let stated: BTreeMap<u64, u64> = peer.iter().copied().collect();
        let mut effects = Vec::new();
        let mut gone = Vec::new();
        for (&flow, f) in &mut self.flows {
            // What we told is what the peer now knows we delivered.
            f.told = f.delivered;
            let result = stated.get(&flow).ok_or(ResumeError::Unknown).and_then(|&d| f.out.replay(d));
            match result {
                Ok(bytes) => effects.push(Effect::Replay { flow, bytes }),
                Err(why) => {
                    gone.push(flow);
                    effects.push(Effect::Reset { flow, why });
                }
            }
        }
        for flow in gone {
            self.flows.remove(&flow);
        }
        self.phase = Phase::Live;
        effects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(600);

    fn session() -> Resumption {
        let mut s = Resumption::new(GRACE, 1 << 16, 1024);
        s.open(1);
        s
    }

    #[test]
    fn the_bytes_the_peer_lacks_are_sent_again_exactly() {
        let t0 = Instant::now();
        let mut a = session();
        assert_eq!(a.send(1, b"0123456789"), 10);
        a.lost(t0);
        assert_eq!(a.reconnected(t0 + Duration::from_secs(30)), Ok(vec![(1, 0)]));
        // The peer had delivered 4 of them before the outage.
        let effects = a.peer_resumed(t0 + Duration::from_secs(31), &[(1, 4)]);
        assert_eq!(effects, vec![Effect::Replay { flow: 1, bytes: b"456789".to_vec() }]);
        assert_eq!(a.phase(), Phase::Live);
        // All delivered before the outage: nothing to send again.
        a.lost(t0 + Duration::from_secs(40));
        a.reconnected(t0 + Duration::from_secs(41)).unwrap();
        assert_eq!(
            a.peer_resumed(t0 + Duration::from_secs(41), &[(1, 10)]),
            vec![Effect::Replay { flow: 1, bytes: vec![] }]
        );
    }

    #[test]
    fn a_second_outage_during_a_replay_sends_only_what_is_still_missing() {
        let t0 = Instant::now();
        let mut a = session();
        a.send(1, b"abcdefghij");
        a.lost(t0);
        a.reconnected(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(
            a.peer_resumed(t0 + Duration::from_secs(1), &[(1, 2)]),
            vec![Effect::Replay { flow: 1, bytes: b"cdefghij".to_vec() }]
        );
        // Lost again while replaying: the peer got three more.
        a.lost(t0 + Duration::from_secs(2));
        a.reconnected(t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(
            a.peer_resumed(t0 + Duration::from_secs(3), &[(1, 5)]),
            vec![Effect::Replay { flow: 1, bytes: b"fghij".to_vec() }]
        );
    }

    #[test]
    fn an_outage_during_resumption_keeps_the_first_losss_grace() {
        let t0 = Instant::now();
        let mut a = session();
        a.send(1, b"xyz");
        a.lost(t0);
        a.reconnected(t0 + Duration::from_secs(500)).unwrap();
        // Lost again before the peer's statement: still counted from t0.
        a.lost(t0 + Duration::from_secs(501));
        assert_eq!(a.phase(), Phase::Parked { since: t0 });
        assert!(a.poll(t0 + Duration::from_secs(599)).is_empty());
        assert_eq!(a.poll(t0 + GRACE), vec![Effect::Reset { flow: 1, why: ResumeError::GraceExpired }]);
        assert_eq!(a.reconnected(t0 + GRACE), Err(vec![]), "an ended session is not resumed");
    }

    #[test]
    fn connected_again_after_the_grace_resets_every_flow() {
        let t0 = Instant::now();
        let mut a = session();
        a.lost(t0);
        assert_eq!(
            a.reconnected(t0 + GRACE + Duration::from_secs(1)),
            Err(vec![Effect::Reset { flow: 1, why: ResumeError::GraceExpired }])
        );
        assert_eq!(a.phase(), Phase::Ended);
        let mut live = session();
        assert_eq!(live.reconnected(t0), Err(vec![]), "a live session has nothing to resume");
        assert_eq!(live.phase(), Phase::Live);
    }

    #[test]
    fn the_grace_expiring_mid_resume_resets_every_flow() {
        let t0 = Instant::now();
        let mut a = session();
        a.open(2);
        a.lost(t0);
        assert!(a.reconnected(t0 + GRACE - Duration::from_secs(1)).is_ok());
        let effects = a.peer_resumed(t0 + GRACE, &[(1, 0), (2, 0)]);
        assert_eq!(
            effects,
            vec![
                Effect::Reset { flow: 1, why: ResumeError::GraceExpired },
                Effect::Reset { flow: 2, why: ResumeError::GraceExpired }
            ]
        );
        assert_eq!(a.phase(), Phase::Ended);
    }

    #[test]
    fn a_flow_that_cannot_be_resumed_is_reset_and_the_others_go_on() {
        let t0 = Instant::now();
        let mut a = session();
        for f in [2, 3, 4] {
            a.open(f);
        }
        for f in 1..=4 {
            a.send(f, b"hello");
        }
        a.peer_acked(3, 4).unwrap();
        a.lost(t0);
        a.reconnected(t0).unwrap();
        let effects = a.peer_resumed(t0, &[(1, 5), (2, 9), (3, 1)]);
        assert_eq!(
            effects,
            vec![
                Effect::Replay { flow: 1, bytes: vec![] },
                Effect::Reset { flow: 2, why: ResumeError::ClaimsUnsent { claimed: 9, sent: 5 } },
                Effect::Reset { flow: 3, why: ResumeError::NotRetained { from: 1, retained: 4 } },
                Effect::Reset { flow: 4, why: ResumeError::Unknown },
            ]
        );
        assert_eq!(a.room(2), 0, "a reset flow is gone");
        assert_eq!(a.send(1, b"more"), 4, "the others go on");
    }

    #[test]
    fn a_full_outbox_stops_reading_until_the_peer_acknowledges() {
        let mut a = Resumption::new(GRACE, 8, 4);
        a.open(1);
        assert_eq!(a.send(1, b"0123456789"), 8, "only what can be retained is taken");
        assert_eq!(a.room(1), 0);
        a.peer_acked(1, 6).unwrap();
        assert_eq!(a.room(1), 6);
        // The receiving side tells its deliveries every 4 bytes.
        a.delivered(1, 3);
        assert!(a.acks_due().is_empty());
        a.delivered(1, 2);
        assert_eq!(a.acks_due(), vec![(1, 5)]);
        assert!(a.acks_due().is_empty());
    }

    /// Two sides exchanging bytes on several flows over a connection that is lost again
    /// and again, each time with an arbitrary part of what was in flight delivered: every
    /// receiver ends with exactly the bytes its peer's application wrote.
    #[test]
    fn any_outages_lose_duplicate_or_reorder_nothing() {
        struct Rng(u64);
        impl Rng {
            fn below(&mut self, n: u64) -> u64 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 % n.max(1)
            }
        }
        const FLOWS: u64 = 3;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let t0 = Instant::now();
        let mut sides = [Resumption::new(GRACE, 4096, 512), Resumption::new(GRACE, 4096, 512)];
        for s in &mut sides {
            for f in 0..FLOWS {
                s.open(f);
            }
        }
        // Per direction (from side i) and flow: what the app wrote, what is in flight on
        // the current connection, what the peer's socket got.
        let key = |from: usize, f: u64| from * FLOWS as usize + f as usize;
        let mut written = vec![Vec::<u8>::new(); 2 * FLOWS as usize];
        let mut in_flight = vec![Vec::<u8>::new(); 2 * FLOWS as usize];
        let mut got = vec![Vec::<u8>::new(); 2 * FLOWS as usize];
        let mut counter = 0u8;
        for round in 0..300u64 {
            let now = t0 + Duration::from_secs(round);
            // Apps write what the outboxes take.
            for from in 0..2 {
                for f in 0..FLOWS {
                    let want = rng.below(700) as usize;
                    let bytes: Vec<u8> = (0..want)
                        .map(|_| {
                            counter = counter.wrapping_add(1);
                            counter
                        })
                        .collect();
                    let n = sides[from].send(f, &bytes);
                    written[key(from, f)].extend(&bytes[..n]);
                    in_flight[key(from, f)].extend(&bytes[..n]);
                }
            }
            // Some of what is in flight arrives, in order.
            for from in 0..2 {
                for f in 0..FLOWS {
                    let k = key(from, f);
                    let n = rng.below(in_flight[k].len() as u64 + 1) as usize;
                    let arrived: Vec<u8> = in_flight[k].drain(..n).collect();
                    got[k].extend(&arrived);
                    sides[1 - from].delivered(f, arrived.len());
                }
            }
            // Acks cross (while the connection holds).
            for from in 0..2 {
                for (f, d) in sides[1 - from].acks_due() {
                    sides[from].peer_acked(f, d).unwrap();
                }
            }
            if rng.below(4) == 0 {
                // The connection is lost: whatever was in flight is gone.
                for v in &mut in_flight {
                    v.clear();
                }
                for s in &mut sides {
                    s.lost(now);
                }
                let statements: Vec<Vec<(u64, u64)>> =
                    sides.iter_mut().map(|s| s.reconnected(now).expect("within the grace")).collect();
                for me in 0..2 {
                    for effect in sides[me].peer_resumed(now, &statements[1 - me]) {
                        match effect {
                            Effect::Replay { flow, bytes } => in_flight[key(me, flow)].extend(bytes),
                            Effect::Reset { flow, why } => panic!("flow {flow} reset: {why}"),
                        }
                    }
                }
            }
        }
        // Drain: everything still in flight arrives.
        for k in 0..in_flight.len() {
            let rest: Vec<u8> = in_flight[k].drain(..).collect();
            got[k].extend(rest);
        }
        for k in 0..written.len() {
            assert!(!written[k].is_empty());
            assert_eq!(got[k], written[k], "direction/flow {k}: bytes lost, duplicated or reordered");
        }
    }
}
