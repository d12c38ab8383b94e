//! The queue of packets waiting for the TUN device, with their buffers reused: a
//! 64 KB segment costs neither an allocation nor zeroing once the caller hands its
//! buffer back with [`crate::Stack::recycle`].

use std::collections::VecDeque;

use crate::wire;

/// Spare buffers kept at most (a few MiB at the largest MTU).
const SPARE: usize = 32;

pub(crate) struct Outbox {
    queue: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    /// TCP packets leave with only their pseudo-header sum ([`crate::Config::checksum_offload`]).
    pub(crate) partial_tcp: bool,
}

impl Outbox {
    pub(crate) fn new(partial_tcp: bool) -> Self {
        Outbox { queue: VecDeque::new(), spare: Vec::new(), partial_tcp }
    }

    /// A buffer of exactly `len` bytes, reused when one is spare. Its contents are
    /// whatever was there: the caller overwrites all of it.
    pub(crate) fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        // Only bytes beyond the buffer's old length are zeroed.
        buf.resize(len, 0);
        buf
    }

    pub(crate) fn push(&mut self, mut packet: Vec<u8>) {
        if self.partial_tcp {
            wire::set_partial_tcp_checksum(&mut packet);
        }
        self.queue.push_back(packet);
    }

    pub(crate) fn pop(&mut self) -> Option<Vec<u8>> {
        self.queue.pop_front()
    }

    pub(crate) fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE {
            self.spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_at_the_asked_length() {
        let mut out = Outbox::new(false);
        let mut a = out.buffer(3000);
        a.fill(7);
        let ptr = a.as_ptr();
        out.push(a);
        let a = out.pop().unwrap();
        out.recycle(a);
        let b = out.buffer(100);
        assert_eq!((b.len(), b.as_ptr()), (100, ptr), "the spare buffer, cut to length");
        out.recycle(b);
        let c = out.buffer(200);
        assert_eq!(c.len(), 200);
        assert!(c[100..].iter().all(|&x| x == 0), "growth is zeroed");
        assert!(out.pop().is_none());
        for _ in 0..2 * SPARE {
            out.recycle(Vec::with_capacity(10));
        }
        assert_eq!(out.spare.len(), SPARE, "the spare list is bounded");
    }
}
