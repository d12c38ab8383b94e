//! Which captures the agent holds, by pod port: a sans-IO core. The session
//! ([`crate::session`]) feeds it the manager's `Capture` and `Release` and the results of
//! starting captures, and does what it returns ([`Effect`]): start a port's capture, stop
//! one, tell the manager a capture is in place or failed.
//!
//! Captures of the same pod port (a global intercept and personal ones) share one
//! running capture there, each a [`Route`] of it. The first `Capture` of a port starts it;
//! those that arrive while it starts wait and get their routes once it is up; a `Release`
//! removes its route, and the port's last one stops it (a port whose captures were all
//! released while it started is stopped when it is up).

use std::collections::HashMap;
use std::net::IpAddr;

use tpvpn_tunnel::Matchers;

use crate::route::Route;

/// A pod port: the pod's IP, the port, and the container (a pod recreated with the same
/// IP is another).
pub type PortKey = (IpAddr, u16, String);

/// What the core needs of a running capture.
pub trait Routed {
    /// Adds (or replaces) route `route.id`.
    fn set_route(&self, route: Route);
    /// Removes route `id`; whether any is left.
    fn remove_route(&self, id: u64) -> bool;
}

/// What the session must do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect<C> {
    /// Start capturing `key`, for capture `id` (the session has its request).
    Start { key: PortKey, id: u64 },
    /// Stop this capture: no route of it is left.
    Stop(C),
    /// Capture `id` is in place ([`Ports::running`] has it).
    Ready { id: u64 },
    /// Capture `id` could not be made.
    Failed { id: u64, why: String },
}

enum Port<C> {
    /// Being started; the captures waiting for it.
    Starting(Vec<(u64, Matchers)>),
    Running(C),
}

/// The agent's captures: by pod port, and each capture id's port.
pub struct Ports<C> {
    ports: HashMap<PortKey, Port<C>>,
    ids: HashMap<u64, PortKey>,
}

impl<C> Default for Ports<C> {
    fn default() -> Self {
        Ports { ports: HashMap::new(), ids: HashMap::new() }
    }
}

impl<C: Routed> Ports<C> {
    /// The manager's `Capture` of `key` as capture `id` (one the agent holds under that id
    /// already is released first).
    pub fn capture(&mut self, id: u64, key: PortKey, matchers: Matchers) -> Vec<Effect<C>> {
        let mut effects = self.release(id);
        self.ids.insert(id, key.clone());
        match self.ports.get_mut(&key) {
            Some(Port::Starting(waiting)) => waiting.push((id, matchers)),
            Some(Port::Running(c)) => {
                c.set_route(Route { id, matchers });
                effects.push(Effect::Ready { id });
            }
            None => {
                self.ports.insert(key.clone(), Port::Starting(vec![(id, matchers)]));
                effects.push(Effect::Start { key, id });
            }
        }
        effects
    }

    /// The manager's `Release` of capture `id`: its route, and the port's capture once no
    /// route is left.
    pub fn release(&mut self, id: u64) -> Vec<Effect<C>> {
        let Some(key) = self.ids.remove(&id) else { return Vec::new() };
        let emptied = match self.ports.get_mut(&key) {
            Some(Port::Starting(waiting)) => {
                waiting.retain(|(w, _)| *w != id);
                false
            }
            Some(Port::Running(c)) => !c.remove_route(id),
            None => false,
        };
        match emptied.then(|| self.ports.remove(&key)).flatten() {
            Some(Port::Running(c)) => vec![Effect::Stop(c)],
            _ => Vec::new(),
        }
    }

    /// The capture of `key` started (or why not).
    pub fn started(&mut self, key: PortKey, result: Result<C, String>) -> Vec<Effect<C>> {
        let waiting = match self.ports.remove(&key) {
            Some(Port::Starting(w)) => w,
            // Not asked for (any more): whatever it is, it is not wanted.
            other => {
                if let Some(p) = other {
                    self.ports.insert(key, p);
                }
                return result.map(|c| vec![Effect::Stop(c)]).unwrap_or_default();
            }
        };
        match result {
            // Every capture of the port was released while it started.
            Ok(c) if waiting.is_empty() => vec![Effect::Stop(c)],
            Ok(c) => {
                let mut effects = Vec::with_capacity(waiting.len());
                for (id, matchers) in waiting {
                    c.set_route(Route { id, matchers });
                    effects.push(Effect::Ready { id });
                }
                self.ports.insert(key, Port::Running(c));
                effects
            }
            Err(why) => waiting
                .into_iter()
                .map(|(id, _)| {
                    self.ids.remove(&id);
                    Effect::Failed { id, why: why.clone() }
                })
                .collect(),
        }
    }

    /// The running capture that holds capture `id`.
    pub fn running(&self, id: u64) -> Option<&C> {
        match self.ports.get(self.ids.get(&id)?)? {
            Port::Running(c) => Some(c),
            Port::Starting(_) => None,
        }
    }

    /// Forgets every capture; the running ones, to be stopped.
    pub fn stop_all(&mut self) -> Vec<C> {
        self.ids.clear();
        self.ports
            .drain()
            .filter_map(|(_, p)| match p {
                Port::Running(c) => Some(c),
                Port::Starting(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A capture that only keeps its routes' ids.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Fake(RefCell<Vec<u64>>);

    impl Routed for Fake {
        fn set_route(&self, route: Route) {
            let mut routes = self.0.borrow_mut();
            routes.retain(|r| *r != route.id);
            routes.push(route.id);
        }
        fn remove_route(&self, id: u64) -> bool {
            let mut routes = self.0.borrow_mut();
            routes.retain(|r| *r != id);
            !routes.is_empty()
        }
    }

    fn key(port: u16) -> PortKey {
        ("10.244.2.10".parse().unwrap(), port, "c1".into())
    }

    fn personal(value: &str) -> Matchers {
        Matchers { headers: vec![("x-dev".into(), value.into())], path_prefix: String::new() }
    }

    fn routes(p: &Ports<Fake>, id: u64) -> Vec<u64> {
        p.running(id).map(|c| c.0.borrow().clone()).unwrap_or_default()
    }

    #[test]
    fn captures_of_a_port_share_one_started_once_and_wait_for_it() {
        let mut p = Ports::<Fake>::default();
        assert_eq!(p.capture(1, key(8080), Matchers::default()), vec![Effect::Start { key: key(8080), id: 1 }]);
        assert_eq!(p.capture(2, key(8080), personal("a")), vec![], "waits for the port's start");
        assert!(p.running(1).is_none(), "not running yet");
        assert_eq!(p.started(key(8080), Ok(Fake::default())), vec![Effect::Ready { id: 1 }, Effect::Ready { id: 2 }]);
        assert_eq!(routes(&p, 2), vec![1, 2]);
        // Once running, a new capture of the port is a route at once.
        assert_eq!(p.capture(3, key(8080), personal("b")), vec![Effect::Ready { id: 3 }]);
        // Another port starts its own.
        assert_eq!(p.capture(4, key(8081), Matchers::default()), vec![Effect::Start { key: key(8081), id: 4 }]);
    }

    #[test]
    fn the_last_release_stops_the_port_and_no_earlier() {
        let mut p = Ports::<Fake>::default();
        p.capture(1, key(8080), Matchers::default());
        p.capture(2, key(8080), personal("a"));
        p.started(key(8080), Ok(Fake::default()));
        assert_eq!(p.release(1), vec![], "a route is left");
        assert_eq!(routes(&p, 2), vec![2]);
        assert_eq!(p.release(2), vec![Effect::Stop(Fake::default())]);
        assert!(p.running(2).is_none());
        assert_eq!(p.release(2), vec![], "released twice: nothing");
        assert_eq!(p.release(99), vec![], "never held: nothing");
    }

    #[test]
    fn a_port_released_while_it_started_is_stopped_when_it_is_up() {
        let mut p = Ports::<Fake>::default();
        p.capture(1, key(8080), Matchers::default());
        assert_eq!(p.release(1), vec![]);
        assert_eq!(p.started(key(8080), Ok(Fake::default())), vec![Effect::Stop(Fake::default())]);
        // A port started that nobody asked for (any more) is stopped too.
        assert_eq!(p.started(key(9999), Ok(Fake::default())), vec![Effect::Stop(Fake::default())]);
        // And one that started and failed after its release says nothing.
        p.capture(2, key(8080), Matchers::default());
        p.release(2);
        assert_eq!(p.started(key(8080), Err("gone".into())), vec![]);
    }

    #[test]
    fn a_failed_start_fails_every_capture_that_waited() {
        let mut p = Ports::<Fake>::default();
        p.capture(1, key(8080), Matchers::default());
        p.capture(2, key(8080), personal("a"));
        let failed = p.started(key(8080), Err("no such pod".into()));
        assert_eq!(
            failed,
            vec![
                Effect::Failed { id: 1, why: "no such pod".into() },
                Effect::Failed { id: 2, why: "no such pod".into() }
            ]
        );
        assert_eq!(p.release(1), vec![], "forgotten");
        // The port can be asked for again.
        assert_eq!(p.capture(3, key(8080), Matchers::default()), vec![Effect::Start { key: key(8080), id: 3 }]);
    }

    #[test]
    fn a_capture_asked_for_again_moves_and_stop_all_forgets_everything() {
        let mut p = Ports::<Fake>::default();
        p.capture(1, key(8080), Matchers::default());
        p.started(key(8080), Ok(Fake::default()));
        // The same id for another port (a pod recreated): the old port's last route goes.
        let effects = p.capture(1, key(8081), Matchers::default());
        assert_eq!(effects, vec![Effect::Stop(Fake::default()), Effect::Start { key: key(8081), id: 1 }]);
        p.started(key(8081), Ok(Fake::default()));
        p.capture(2, key(8082), Matchers::default());
        assert_eq!(p.stop_all().len(), 1, "the running one; the starting one is forgotten");
        assert!(p.running(1).is_none());
        assert_eq!(p.started(key(8082), Ok(Fake::default())), vec![Effect::Stop(Fake::default())]);
    }
}
