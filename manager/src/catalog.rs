//! The catalog (namespaces and Services) as clients receive it, for any cluster size.
//!
//! Each change of the catalog is a new [`Version`]. Version-2 clients get, at connect, a
//! snapshot in `CatalogChunk`s (the first with `reset`, the last with `complete`), then
//! only the delta of each version against the one before (added or changed Services,
//! removed ones, namespaces added and removed); a client that missed versions (a slow
//! one: the channel keeps only the newest) gets a snapshot again. Chunks hold at most
//! [`CHUNK_BYTES`], well under the frame limit. The frames are encoded once per version
//! and shared by every session (`Bytes` handed to quinn without a copy).
//!
//! Version-1 clients know only the whole-catalog `Namespaces` and `Services` messages:
//! they get those, encoded once per version, while they fit a frame (about 15,000
//! Services); beyond that, they get none and a warning is logged.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tpvpn_tunnel::{Message, ServiceInfo};
use tracing::warn;

/// Every namespace and Service, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub namespaces: Vec<String>,
    pub services: Vec<ServiceInfo>,
}

/// Most bytes of entries in one chunk.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// One version of the catalog, with its frames.
#[derive(Debug, Default)]
pub struct Version {
    pub number: u64,
    pub catalog: Arc<Catalog>,
    /// The chunks of the change from the version before (empty for the first).
    delta: Vec<Bytes>,
    snapshot: OnceLock<Vec<Bytes>>,
    v1: OnceLock<Option<Vec<Bytes>>>,
}

/// What changed between two catalogs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub namespaces_added: Vec<String>,
    pub namespaces_removed: Vec<String>,
    pub services: Vec<ServiceInfo>,
    pub services_removed: Vec<(String, String)>,
}

/// The difference from `old` to `new` (both sorted, as [`crate::cluster::catalog`] makes
/// them), by one merge walk.
pub fn delta(old: &Catalog, new: &Catalog) -> Delta {
    let mut d = Delta::default();
    let (mut i, mut j) = (0, 0);
    while i < old.namespaces.len() || j < new.namespaces.len() {
        match (old.namespaces.get(i), new.namespaces.get(j)) {
            (Some(a), Some(b)) if a == b => (i, j) = (i + 1, j + 1),
            (Some(a), Some(b)) if a < b => {
                d.namespaces_removed.push(a.clone());
                i += 1;
            }
            (Some(a), None) => {
                d.namespaces_removed.push(a.clone());
                i += 1;
            }
            (_, Some(b)) => {
                d.namespaces_added.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    fn key(s: &ServiceInfo) -> (&str, &str) {
        (s.namespace.as_str(), s.name.as_str())
    }
    let owned = |s: &ServiceInfo| (s.namespace.clone(), s.name.clone());
    let (mut i, mut j) = (0, 0);
    while i < old.services.len() || j < new.services.len() {
        match (old.services.get(i), new.services.get(j)) {
            (Some(a), Some(b)) if key(a) == key(b) => {
                if a != b {
                    d.services.push(b.clone());
                }
                (i, j) = (i + 1, j + 1);
            }
            (Some(a), Some(b)) if key(a) < key(b) => {
                d.services_removed.push(owned(a));
                i += 1;
            }
            (Some(a), None) => {
                d.services_removed.push(owned(a));
                i += 1;
            }
            (_, Some(b)) => {
                d.services.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    d
}

/// `d` as encoded `CatalogChunk` frames of at most [`CHUNK_BYTES`] of entries each, the
/// first with `reset` if `reset`, the last `complete`.
pub fn chunks(d: Delta, reset: bool) -> Vec<Bytes> {
    enum Entry {
        Added(String),
        Gone(String),
        Service(ServiceInfo),
        Removed((String, String)),
    }
    let entries = d
        .namespaces_added
        .into_iter()
        .map(Entry::Added)
        .chain(d.namespaces_removed.into_iter().map(Entry::Gone))
        .chain(d.services.into_iter().map(Entry::Service))
        .chain(d.services_removed.into_iter().map(Entry::Removed));
    let empty = |reset| Message::CatalogChunk {
        reset,
        complete: false,
        namespaces_added: vec![],
        namespaces_removed: vec![],
        services: vec![],
        services_removed: vec![],
    };
    let mut out = Vec::new();
    let mut current = empty(reset);
    let mut size = 0;
    let finish = |m: Message, out: &mut Vec<Bytes>| match m.to_vec() {
        Ok(b) => out.push(Bytes::from(b)),
        // Only an entry larger than a frame could do this; it cannot be sent at all.
        Err(e) => warn!(error = %e, "a catalog chunk does not encode; left out"),
    };
    for e in entries {
        let len = match &e {
            Entry::Added(n) | Entry::Gone(n) => 2 + n.len(),
            Entry::Service(s) => s.encoded_len(),
            Entry::Removed((ns, n)) => 4 + ns.len() + n.len(),
        };
        if size > 0 && size + len > CHUNK_BYTES {
            let next = empty(false);
            finish(std::mem::replace(&mut current, next), &mut out);
            size = 0;
        }
        size += len;
        let Message::CatalogChunk { namespaces_added, namespaces_removed, services, services_removed, .. } =
            &mut current
        else {
            unreachable!("current is always a catalog chunk")
        };
        match e {
            Entry::Added(n) => namespaces_added.push(n),
            Entry::Gone(n) => namespaces_removed.push(n),
            Entry::Service(s) => services.push(s),
            Entry::Removed(k) => services_removed.push(k),
        }
    }
    if let Message::CatalogChunk { complete, .. } = &mut current {
        *complete = true;
    }
    finish(current, &mut out);
    out
}

impl Version {
    /// The first version: `catalog`, with no delta.
    pub fn first(catalog: Arc<Catalog>) -> Version {
        Version { number: 0, catalog, ..Version::default() }
    }

    /// The version after `prev`, holding `catalog`.
    pub fn next(prev: &Version, catalog: Arc<Catalog>) -> Version {
        let delta = chunks(delta(&prev.catalog, &catalog), false);
        Version { number: prev.number + 1, catalog, delta, ..Version::default() }
    }

    /// The frames that bring a client from version `sent` (if any) to this one.
    pub fn frames_since(&self, sent: Option<u64>) -> &[Bytes] {
        match sent {
            Some(n) if n + 1 == self.number => &self.delta,
            _ => self.snapshot(),
        }
    }

    /// The whole catalog in chunks, encoded once.
    pub fn snapshot(&self) -> &[Bytes] {
        self.snapshot.get_or_init(|| {
            let d = Delta {
                namespaces_added: self.catalog.namespaces.clone(),
                services: self.catalog.services.clone(),
                ..Delta::default()
            };
            chunks(d, true)
        })
    }

    /// The version-1 messages (`Namespaces`, `Services`), if they fit a frame.
    pub fn v1_frames(&self) -> Option<&[Bytes]> {
        self.v1
            .get_or_init(|| {
                let encode = |m: Message| m.to_vec().map(Bytes::from);
                let frames = encode(Message::Namespaces { names: self.catalog.namespaces.clone() })
                    .and_then(|a| Ok(vec![a, encode(Message::Services { services: self.catalog.services.clone() })?]));
                match frames {
                    Ok(f) => Some(f),
                    Err(e) => {
                        warn!(services = self.catalog.services.len(), error = %e, "the catalog is too large for version-1 clients: they get none (upgrade them)");
                        None
                    }
                }
            })
            .as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpvpn_tunnel::{Protocol, ServicePort};

    fn svc(ns: &str, name: &str, port: u16) -> ServiceInfo {
        ServiceInfo {
            namespace: ns.into(),
            name: name.into(),
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![ServicePort { name: "http".into(), protocol: Protocol::Tcp, port }],
        }
    }

    fn cat(namespaces: &[&str], services: Vec<ServiceInfo>) -> Catalog {
        let mut c = Catalog { namespaces: namespaces.iter().map(|s| s.to_string()).collect(), services };
        c.services.sort();
        c
    }

    #[test]
    fn deltas_name_what_was_added_changed_and_removed() {
        let old = cat(&["a", "b"], vec![svc("a", "x", 80), svc("a", "y", 80), svc("b", "z", 80)]);
        let new = cat(&["b", "c"], vec![svc("a", "x", 81), svc("b", "z", 80), svc("c", "w", 80)]);
        let d = delta(&old, &new);
        assert_eq!(d.namespaces_added, ["c"]);
        assert_eq!(d.namespaces_removed, ["a"]);
        assert_eq!(d.services, vec![svc("a", "x", 81), svc("c", "w", 80)]);
        assert_eq!(d.services_removed, vec![("a".to_string(), "y".to_string())]);
        assert_eq!(delta(&new, &new), Delta::default());
    }

    type Tables = (std::collections::BTreeSet<String>, std::collections::BTreeMap<(String, String), ServiceInfo>);

    /// Applies chunks the way the client does; whether the last one completed a batch.
    fn apply(tables: &mut Tables, frames: &[Bytes]) -> bool {
        let mut complete = false;
        for f in frames {
            let (m, _) = Message::decode(f).unwrap().unwrap();
            let Message::CatalogChunk {
                reset,
                complete: c,
                namespaces_added,
                namespaces_removed,
                services,
                services_removed,
            } = m
            else {
                panic!()
            };
            assert!(f.len() <= CHUNK_BYTES + 64 * 1024, "chunk of {} bytes", f.len());
            if reset {
                *tables = Default::default();
            }
            for n in namespaces_removed {
                tables.0.remove(&n);
            }
            tables.0.extend(namespaces_added);
            for k in services_removed {
                tables.1.remove(&k);
            }
            for s in services {
                tables.1.insert((s.namespace.clone(), s.name.clone()), s);
            }
            complete = c;
        }
        complete
    }

    #[test]
    fn a_large_catalog_goes_in_chunks_and_then_as_deltas() {
        let namespaces: Vec<String> = (0..5_000).map(|i| format!("team-{i:04}")).collect();
        let services: Vec<ServiceInfo> =
            (0..50_000).map(|i| svc(&namespaces[i % 5_000], &format!("service-{i:05}"), 80)).collect();
        let c = Arc::new(Catalog {
            namespaces: namespaces.clone(),
            services: {
                let mut s = services.clone();
                s.sort();
                s
            },
        });
        let v0 = Version::first(c.clone());
        let snap = v0.frames_since(None);
        assert!(snap.len() > 5, "{} chunks", snap.len());
        assert!(v0.v1_frames().is_none(), "too large for one v1 frame");
        let mut tables = Tables::default();
        assert!(apply(&mut tables, snap));
        assert_eq!((tables.0.len(), tables.1.len()), (5_000, 50_000));
        assert!(tables.1.values().eq(c.services.iter()));
        // One Service added, one removed: the delta is small.
        let mut next = (*c).clone();
        next.services.retain(|s| s.name != "service-00007");
        next.services.push(svc("team-0001", "new-one", 8080));
        next.services.sort();
        let v1 = Version::next(&v0, Arc::new(next.clone()));
        let d = v1.frames_since(Some(0));
        assert_eq!(d.len(), 1);
        assert!(d[0].len() < 200, "{} bytes", d[0].len());
        assert!(apply(&mut tables, d));
        assert!(tables.1.values().eq(next.services.iter()));
        // A client that missed a version gets a snapshot.
        let v2 = Version::next(&v1, Arc::new(next.clone()));
        assert_eq!(v2.frames_since(Some(0)).len(), snap.len());
    }
}
