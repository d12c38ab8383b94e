//! Replies built from the Service table, remembered by the bytes of the query they answer.
//!
//! A table reply is a function of the query's bytes after its id, the transport and the
//! resolver's state (Services, namespaces, connected), never of the clock: the TTL is the
//! fixed `local_ttl`. So a query repeated byte for byte (what stub resolvers, browsers and
//! dnsperf send) is answered by copying the stored reply behind the new id, without
//! parsing or encoding. The resolver empties this store whenever its state changes.

use std::collections::HashMap;

use crate::Transport;

/// Most replies kept per transport; when full, the store starts over.
pub(crate) const CAPACITY: usize = 4096;
/// Queries longer than this are not remembered (stub queries are far shorter).
pub(crate) const MAX_QUERY: usize = 512;

#[derive(Default)]
pub(crate) struct Replies {
    udp: HashMap<Box<[u8]>, Box<[u8]>>,
    tcp: HashMap<Box<[u8]>, Box<[u8]>>,
}

impl Replies {
    fn map(&self, transport: Transport) -> &HashMap<Box<[u8]>, Box<[u8]>> {
        match transport {
            Transport::Udp => &self.udp,
            Transport::Tcp => &self.tcp,
        }
    }

    /// The stored reply to a query with these bytes, with `query`'s id.
    pub fn get(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let (id, rest) = (query.get(..2)?, query.get(2..)?);
        let stored = self.map(transport).get(rest)?;
        let mut reply = Vec::with_capacity(2 + stored.len());
        reply.extend_from_slice(id);
        reply.extend_from_slice(stored);
        Some(reply)
    }

    /// Remembers `reply` as the answer to `query`.
    pub fn insert(&mut self, query: &[u8], transport: Transport, reply: &[u8]) {
        let (Some(rest), Some(stored)) = (query.get(2..), reply.get(2..)) else { return };
        if query.len() > MAX_QUERY {
            return;
        }
        let map = match transport {
            Transport::Udp => &mut self.udp,
            Transport::Tcp => &mut self.tcp,
        };
        if map.len() >= CAPACITY {
            map.clear();
        }
        map.insert(rest.into(), stored.into());
    }

    pub fn clear(&mut self) {
        self.udp.clear();
        self.tcp.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.udp.len() + self.tcp.len()
    }
}
