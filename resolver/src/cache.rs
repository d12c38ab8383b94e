//! The answer cache for cluster DNS replies: positive by the lowest answer TTL, negative
//! (NXDOMAIN, NODATA) by the SOA minimum, bounded, oldest evicted first.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

/// Negative TTL when the cluster's negative answer carries no SOA.
pub(crate) const DEFAULT_NEGATIVE_TTL: u32 = 5;

/// Cache key: lowercased FQDN (wire text form), type, class.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub name: String,
    pub rtype: RecordType,
    pub class: DNSClass,
}

/// What a cached cluster answer holds: the sections as the cluster sent them (owners
/// are the FQDN), with the TTLs they had when stored.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub response_code: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

struct Slot {
    entry: Entry,
    stored: Instant,
    ttl: u32,
    seq: u64,
}

pub(crate) struct Cache {
    capacity: usize,
    map: HashMap<Key, Slot>,
    /// Insertion order; entries whose `seq` no longer matches the map are stale.
    order: VecDeque<(u64, Key)>,
    next_seq: u64,
}

impl Cache {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), map: HashMap::new(), order: VecDeque::new(), next_seq: 0 }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// How long an answer may be cached, or `None` when it must not be.
    pub fn ttl_of(entry: &Entry) -> Option<u32> {
        let ttl = match entry.response_code {
            ResponseCode::NoError if !entry.answers.is_empty() => entry.answers.iter().map(|r| r.ttl).min()?,
            ResponseCode::NoError | ResponseCode::NXDomain => entry
                .authorities
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
                    _ => None,
                })
                .min()
                .unwrap_or(DEFAULT_NEGATIVE_TTL),
            _ => return None,
        };
        (ttl > 0).then_some(ttl)
    }

    /// Stores `entry` if it is cacheable.
    pub fn insert(&mut self, key: Key, entry: Entry, now: Instant) {
        let Some(ttl) = Self::ttl_of(&entry) else { return };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.map.insert(key.clone(), Slot { entry, stored: now, ttl, seq });
        self.order.push_back((seq, key));
        while self.map.len() > self.capacity {
            let Some((seq, key)) = self.order.pop_front() else { break };
            if self.map.get(&key).is_some_and(|s| s.seq == seq) {
                self.map.remove(&key);
            }
        }
        // Re-inserted keys leave stale order entries behind; keep the queue bounded.
        if self.order.len() > 2 * self.capacity {
            let map = &self.map;
            self.order.retain(|(seq, key)| map.get(key).is_some_and(|s| s.seq == *seq));
        }
    }

    /// A live entry with its TTLs counted down to `now`, or `None` (expired entries are removed).
    pub fn get(&mut self, key: &Key, now: Instant) -> Option<Entry> {
        let slot = self.map.get(key)?;
        let elapsed = u32::try_from(now.saturating_duration_since(slot.stored).as_secs()).unwrap_or(u32::MAX);
        if elapsed >= slot.ttl {
            self.map.remove(key);
            return None;
        }
        let mut entry = slot.entry.clone();
        for r in entry.answers.iter_mut().chain(entry.authorities.iter_mut()).chain(entry.additionals.iter_mut()) {
            r.decrement_ttl(elapsed);
        }
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;
    use std::time::Duration;

    fn key(n: &str) -> Key {
        Key { name: n.into(), rtype: RecordType::A, class: DNSClass::IN }
    }

    fn positive(ttl: u32) -> Entry {
        let name = Name::from_ascii("a.b.svc.cluster.local.").unwrap();
        Entry {
            response_code: ResponseCode::NoError,
            authoritative: true,
            answers: vec![Record::from_rdata(name, ttl, RData::A(A::new(10, 0, 0, 1)))],
            authorities: vec![],
            additionals: vec![],
        }
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        let zone = Name::from_ascii("cluster.local.").unwrap();
        let soa = SOA::new(zone.clone(), zone.clone(), 1, 7200, 1800, 86400, minimum);
        Record::from_rdata(zone, ttl, RData::SOA(soa))
    }

    #[test]
    fn ttl_rules() {
        assert_eq!(Cache::ttl_of(&positive(30)), Some(30));
        assert_eq!(Cache::ttl_of(&positive(0)), None);
        let mut neg = positive(30);
        neg.answers.clear();
        neg.response_code = ResponseCode::NXDomain;
        assert_eq!(Cache::ttl_of(&neg), Some(DEFAULT_NEGATIVE_TTL));
        neg.authorities.push(soa(30, 12));
        assert_eq!(Cache::ttl_of(&neg), Some(12));
        neg.authorities = vec![soa(7, 12)];
        assert_eq!(Cache::ttl_of(&neg), Some(7));
        neg.response_code = ResponseCode::ServFail;
        assert_eq!(Cache::ttl_of(&neg), None);
    }

    #[test]
    fn countdown_and_expiry() {
        let t0 = Instant::now();
        let mut c = Cache::new(10);
        c.insert(key("x"), positive(30), t0);
        assert_eq!(c.get(&key("x"), t0 + Duration::from_secs(10)).unwrap().answers[0].ttl, 20);
        assert!(c.get(&key("x"), t0 + Duration::from_secs(30)).is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn bounded_evicts_oldest() {
        let t0 = Instant::now();
        let mut c = Cache::new(3);
        for n in ["a", "b", "c"] {
            c.insert(key(n), positive(30), t0);
        }
        c.insert(key("a"), positive(30), t0); // refreshed: now the newest
        c.insert(key("d"), positive(30), t0);
        assert_eq!(c.len(), 3);
        assert!(c.get(&key("b"), t0).is_none());
        for n in ["a", "c", "d"] {
            assert!(c.get(&key(n), t0).is_some(), "{n}");
        }
        for i in 0..100 {
            c.insert(key("a"), positive(30 + i), t0);
        }
        assert!(c.order.len() <= 6);
        assert_eq!(c.len(), 3);
    }
}
