//! How many captured connections the agent parses at once. Parsing (personal intercepts
//! route each HTTP request) costs a descriptor, a task and buffers per connection; a
//! caller that opens many and trickles their heads (slowloris), or many callers at once,
//! must never make the agent a bottleneck for the pods' own traffic. Past the caps a
//! connection is not parsed but passed whole (to the global intercept, else the pod) as
//! a byte relay: the developers' routing degrades, production keeps flowing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections parsed at once, in all.
    pub total: usize,
    /// Connections parsed at once from one source address.
    pub per_source: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps { total: 2048, per_source: 256 }
    }
}

/// The connections being parsed, in all and by source.
#[derive(Debug, Default)]
pub struct Load {
    caps: Caps,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Load {
    pub fn new(caps: Caps) -> Arc<Load> {
        Arc::new(Load { caps, counts: Mutex::default() })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot to parse a connection from `src`, or `None` past a cap. The slot is given
    /// back when dropped.
    pub fn admit(self: &Arc<Self>, src: IpAddr) -> Option<Slot> {
        let mut c = self.counts();
        let from_src = c.by_source.get(&src).copied().unwrap_or(0);
        if c.total >= self.caps.total || from_src >= self.caps.per_source {
            return None;
        }
        c.total += 1;
        c.by_source.insert(src, from_src + 1);
        Some(Slot { load: self.clone(), src })
    }

    /// Connections parsed now, in all.
    pub fn parsed(&self) -> usize {
        self.counts().total
    }
}

/// One connection being parsed.
#[derive(Debug)]
pub struct Slot {
    load: Arc<Load>,
    src: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.load.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_and_in_all_and_slots_come_back() {
        let load = Load::new(Caps { total: 3, per_source: 2 });
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let a1 = load.admit(a).unwrap();
        let _a2 = load.admit(a).unwrap();
        assert!(load.admit(a).is_none(), "a third from one source");
        let _b1 = load.admit(b).unwrap();
        assert!(load.admit(c).is_none(), "a fourth in all");
        assert_eq!(load.parsed(), 3);
        drop(a1);
        assert_eq!(load.parsed(), 2);
        let _c1 = load.admit(c).expect("a slot came back");
        assert!(load.admit(a).is_none());
        assert_eq!(load.counts().by_source.len(), 3);
    }
}
