//! The intercept control plane end to end in memory, in the manner of quinn-proto's
//! tests: the manager's [`Claims`] and each node agent's [`Ports`] exchange the frames
//! they would send each other (`Capture`, `Release`, `CaptureStatus`) under virtual time,
//! and each HTTP request to a captured pod port is routed as the agent and the manager
//! would route it (the agent's [`Routes::choose`], then [`Claims::route`]). No root, no
//! socket, no cluster: the rules between the two halves (clash, re-claim, an agent
//! lost, replaced or upgraded) are checked where they meet.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::json;
use tpvpn_agent::ports::{Effect as AgentEffect, PortKey, Ports, Routed};
use tpvpn_agent::route::{Dest, Route, Routes};
use tpvpn_manager::intercepts::claims::{Claims, Effect};
use tpvpn_manager::intercepts::{Captured, NamespacePolicy, Refusal, Request, World};
use tpvpn_tunnel::handshake::Negotiated;
use tpvpn_tunnel::{ErrorCode, Matchers, Message};

const ALICE: [u8; 16] = [1; 16];
const BOB: [u8; 16] = [2; 16];

/// A running capture of a pod port, as the agent's core sees it: its routes.
#[derive(Default)]
struct Running(Rc<RefCell<Routes>>);

impl Routed for Running {
    fn set_route(&self, route: Route) {
        self.0.borrow_mut().set(route);
    }
    fn remove_route(&self, id: u64) -> bool {
        self.0.borrow_mut().remove(id)
    }
}

/// One node's agent: its core, the ports it is starting, what runs, what it stopped.
struct Agent {
    session: u64,
    ports: Ports<Running>,
    starting: Vec<PortKey>,
    running: HashMap<PortKey, Rc<RefCell<Routes>>>,
    /// Starting a port fails with this (the pod's namespace cannot be entered, …).
    fail: Option<String>,
    starts: usize,
    stops: usize,
}

impl Agent {
    fn new(session: u64) -> Agent {
        Agent {
            session,
            ports: Ports::default(),
            starting: Vec::new(),
            running: HashMap::new(),
            fail: None,
            starts: 0,
            stops: 0,
        }
    }

    /// Does what the core says; the statuses for the manager go to `out`.
    fn apply(&mut self, effects: Vec<AgentEffect<Running>>, out: &mut Vec<(u64, Result<Captured, String>)>) {
        for e in effects {
            match e {
                AgentEffect::Start { key, .. } => {
                    self.starts += 1;
                    self.starting.push(key);
                }
                AgentEffect::Stop(c) => {
                    self.stops += 1;
                    self.running.retain(|_, r| !Rc::ptr_eq(r, &c.0));
                }
                AgentEffect::Ready { id } => {
                    out.push((id, Ok(Captured { meshed: false, env: vec![], note: String::new() })))
                }
                AgentEffect::Failed { id, why } => out.push((id, Err(why))),
            }
        }
    }
}

fn service() -> Arc<Service> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap(),
    )
}

fn pod(name: &str, node: &str, ip: &str) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "nginx", "ports": [{"containerPort": 8080}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "nginx", "containerID": format!("containerd://{name}"), "image": "", "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .unwrap(),
    )
}

/// A manager, agents on nodes `n1` and `n2`, and Service `web` with pod `web-0` on n1
/// (10.244.1.10) and `web-1` on n2 (10.244.2.10).
struct Pair {
    claims: Claims,
    agents: BTreeMap<String, Agent>,
    world: World,
    start: Instant,
    answers: HashMap<u64, Result<Message, Refusal>>,
    next_session: u64,
}

impl Pair {
    fn new() -> Pair {
        let world = World {
            services: vec![service()],
            pods: vec![pod("web-0", "n1", "10.244.1.10"), pod("web-1", "n2", "10.244.2.10")],
        };
        let mut pair = Pair {
            claims: Claims::new(NamespacePolicy::default()),
            agents: BTreeMap::new(),
            world,
            start: Instant::now(),
            answers: HashMap::new(),
            next_session: 100,
        };
        pair.agent_connects("n1", 3);
        pair.agent_connects("n2", 3);
        pair
    }

    fn at(&self, secs: u64) -> Instant {
        self.start + Duration::from_secs(secs)
    }

    fn session(&mut self) -> u64 {
        self.next_session += 1;
        self.next_session
    }

    fn laptop_connects(&mut self, client_id: &[u8; 16], who: &str) -> u64 {
        let s = self.session();
        self.claims.client_connected(s, client_id, who);
        s
    }

    /// An agent (a new session of it) connects for `node`.
    fn agent_connects(&mut self, node: &str, version: u16) {
        let version = Negotiated::assumed(version);
        let s = self.session();
        self.agents.insert(node.to_string(), Agent::new(s));
        self.claims.agent_connected(node, s, version);
        self.settle();
    }

    /// The agent of `node` loses the manager: it stops every capture (as its session
    /// does), and the manager notices.
    fn agent_lost(&mut self, node: &str) {
        let a = self.agents.get_mut(node).unwrap();
        for c in a.ports.stop_all() {
            a.stops += 1;
            a.running.retain(|_, r| !Rc::ptr_eq(r, &c.0));
        }
        a.starting.clear();
        let session = a.session;
        self.claims.agent_gone(node, session);
        self.settle();
    }

    /// Delivers every frame both ways, and finishes every start, until nothing moves.
    fn settle(&mut self) {
        for _ in 0..100 {
            let mut statuses: Vec<(String, u64, Result<Captured, String>)> = Vec::new();
            let mut moved = false;
            while let Some(e) = self.claims.poll_effect() {
                moved = true;
                match e {
                    Effect::ToAgent { node, message } => {
                        let a = self.agents.get_mut(&node).expect("frames go to connected agents only");
                        let effects = match message {
                            Message::Capture { id, pod_ip, port, container_id, matchers, .. } => {
                                a.ports.capture(id, (pod_ip, port, container_id), matchers)
                            }
                            Message::Release { id } => a.ports.release(id),
                            other => panic!("not for an agent: {other:?}"),
                        };
                        let mut out = Vec::new();
                        a.apply(effects, &mut out);
                        statuses.extend(out.into_iter().map(|(id, r)| (node.clone(), id, r)));
                    }
                    Effect::Answer { request, result } => {
                        self.answers.insert(request, result);
                    }
                    // Notices to clients: their control streams are not part of the pair.
                    Effect::ToClient { .. } => {}
                }
            }
            for (node, a) in &mut self.agents {
                for key in std::mem::take(&mut a.starting) {
                    moved = true;
                    let result = match &a.fail {
                        Some(why) => Err(why.clone()),
                        None => {
                            let running = Running::default();
                            a.running.insert(key.clone(), running.0.clone());
                            Ok(running)
                        }
                    };
                    let effects = a.ports.started(key, result);
                    let mut out = Vec::new();
                    a.apply(effects, &mut out);
                    statuses.extend(out.into_iter().map(|(id, r)| (node.clone(), id, r)));
                }
            }
            for (node, id, result) in statuses {
                self.claims.capture_status(&node, id, result);
            }
            if !moved {
                return;
            }
        }
        panic!("the two halves never settle");
    }

    fn intercept(&mut self, secs: u64, session: u64, headers: &[(&str, &str)]) -> Result<Message, Refusal> {
        let req = request(headers);
        let now = self.at(secs);
        let id = self.claims.intercept(now, SystemTime::now(), session, &req, &self.world)?;
        self.settle();
        self.answers.remove(&id).expect("answered once the agents have")
    }

    /// The laptop session a request to `pod_ip`:8080 on `node` with `headers` reaches,
    /// or `None`: the pod.
    fn request(&self, node: &str, pod_ip: &str, headers: &[(&str, &str)]) -> Option<u64> {
        let key: PortKey = (pod_ip.parse::<IpAddr>().unwrap(), 8080, format!("containerd://{}", pod_of(pod_ip)));
        let routes = self.agents[node].running.get(&key)?;
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        match routes.borrow().choose(&map, "/").0 {
            Dest::Pod => None,
            Dest::Laptop(capture) => {
                let (_, session) = self.claims.route(node, capture).expect("a route the agent holds has an owner");
                Some(session)
            }
        }
    }
}

/// An intercept of `default/web` port 80 to local port 8080, personal with `headers`.
fn request(headers: &[(&str, &str)]) -> Request {
    Request {
        namespace: "default".into(),
        service: "web".into(),
        port: "80".into(),
        local_port: 8080,
        container: String::new(),
        matchers: Matchers {
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            path_prefix: String::new(),
        },
    }
}

fn pod_of(ip: &str) -> &'static str {
    if ip == "10.244.1.10" {
        "web-0"
    } else {
        "web-1"
    }
}

#[test]
fn a_global_and_a_personal_intercept_share_one_capture_and_each_request_finds_its_laptop() {
    let mut p = Pair::new();
    let alice = p.laptop_connects(&ALICE, "alice@laptop");
    let bob = p.laptop_connects(&BOB, "bob@laptop");
    p.intercept(0, alice, &[]).unwrap();
    p.intercept(1, bob, &[("x-dev", "bob")]).unwrap();
    assert_eq!(p.agents["n1"].starts, 1, "one capture of the pod port for both");
    for (node, ip) in [("n1", "10.244.1.10"), ("n2", "10.244.2.10")] {
        assert_eq!(p.request(node, ip, &[]), Some(alice));
        assert_eq!(p.request(node, ip, &[("x-dev", "bob")]), Some(bob));
        assert_eq!(p.request(node, ip, &[("x-dev", "carol")]), Some(alice));
    }

    p.claims.leave(alice, "default", "web").unwrap();
    p.settle();
    assert_eq!(p.request("n1", "10.244.1.10", &[]), None, "Alice's requests go back to the pod");
    assert_eq!(p.request("n1", "10.244.1.10", &[("x-dev", "bob")]), Some(bob), "Bob's stay his");
    assert_eq!(p.agents["n1"].stops, 0);
    p.claims.leave(bob, "default", "web").unwrap();
    p.settle();
    assert_eq!((p.agents["n1"].stops, p.agents["n1"].running.len()), (1, 0), "the last release stops the port");
}

#[test]
fn a_lost_agent_gives_its_pods_back_and_gets_every_capture_again_when_it_returns() {
    let mut p = Pair::new();
    let alice = p.laptop_connects(&ALICE, "alice@laptop");
    p.intercept(0, alice, &[]).unwrap();
    p.agent_lost("n1");
    assert_eq!(p.request("n1", "10.244.1.10", &[]), None);
    assert_eq!(p.request("n2", "10.244.2.10", &[]), Some(alice), "the other node is untouched");
    let bob = p.laptop_connects(&BOB, "bob@laptop");
    let e = p.intercept(1, bob, &[("x-dev", "bob")]).unwrap_err();
    assert!(e.message.contains("no tpvpn agent on node n1"), "{e:?}");

    p.agent_connects("n1", 3);
    assert_eq!(p.request("n1", "10.244.1.10", &[]), Some(alice), "captured again without a command");
}

#[test]
fn an_agent_lost_while_a_request_waits_fails_it_and_the_pods_keep_their_traffic() {
    let mut p = Pair::new();
    let alice = p.laptop_connects(&ALICE, "alice@laptop");
    let id = p.claims.intercept(p.at(0), SystemTime::now(), alice, &request(&[]), &p.world).unwrap();
    // n2's agent gets the capture but is lost before it answers.
    while let Some(e) = p.claims.poll_effect() {
        if let Effect::ToAgent { node, message: Message::Capture { id, pod_ip, port, container_id, matchers, .. } } = e
        {
            let a = p.agents.get_mut(&node).unwrap();
            let effects = a.ports.capture(id, (pod_ip, port, container_id), matchers);
            a.apply(effects, &mut Vec::new());
        }
    }
    p.agent_lost("n2");
    let e = p.answers.remove(&id).unwrap().unwrap_err();
    assert_eq!(e.message, "cannot capture pod web-1: the agent went away");
    assert!(p.agents.values().all(|a| a.running.is_empty()), "nothing stays captured");
    assert_eq!(p.request("n1", "10.244.1.10", &[]), None);
}

#[test]
fn personal_intercepts_wait_for_upgraded_agents() {
    let mut p = Pair::new();
    p.agent_lost("n2");
    p.agent_connects("n2", 2);
    let alice = p.laptop_connects(&ALICE, "alice@laptop");
    let bob = p.laptop_connects(&BOB, "bob@laptop");
    p.intercept(0, alice, &[]).unwrap();
    let e = p.intercept(1, bob, &[("x-dev", "bob")]).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported);
    assert!(e.message.contains("node n2 speaks protocol v2"), "{e:?}");

    // The DaemonSet rolls n2's agent to this version.
    p.agent_lost("n2");
    p.agent_connects("n2", 3);
    assert_eq!(p.request("n2", "10.244.2.10", &[]), Some(alice), "the new agent got Alice's capture");
    p.intercept(2, bob, &[("x-dev", "bob")]).unwrap();
    assert_eq!(p.request("n2", "10.244.2.10", &[("x-dev", "bob")]), Some(bob));
}

#[test]
fn a_laptop_back_within_the_grace_gets_its_requests_again_and_a_failed_capture_keeps_the_claim() {
    let mut p = Pair::new();
    let alice = p.laptop_connects(&ALICE, "alice@laptop");
    p.intercept(0, alice, &[]).unwrap();
    p.claims.client_gone(p.at(0), alice);
    p.settle();
    assert_eq!(p.request("n1", "10.244.1.10", &[]), None, "the pods serve while the laptop is away");
    assert_eq!(p.agents["n1"].stops, 1);
    let bob = p.laptop_connects(&BOB, "bob@laptop");
    assert_eq!(p.intercept(30, bob, &[]).unwrap_err().code, ErrorCode::Conflict);

    // Back, but n1 cannot capture at first: the re-claim fails, the claim stays Alice's.
    let alice = p.laptop_connects(&ALICE, "alice@laptop");
    p.agents.get_mut("n1").unwrap().fail = Some("the pod's network namespace is gone".into());
    let e = p.intercept(40, alice, &[]).unwrap_err();
    assert_eq!(e.message, "cannot capture pod web-0: the pod's network namespace is gone");
    assert!(p.agents.values().all(|a| a.running.is_empty()), "web-1's capture was undone too");
    assert_eq!(p.intercept(41, bob, &[]).unwrap_err().code, ErrorCode::Conflict);

    p.agents.get_mut("n1").unwrap().fail = None;
    p.intercept(59, alice, &[]).unwrap();
    assert_eq!(p.request("n1", "10.244.1.10", &[]), Some(alice));
    assert_eq!(p.request("n2", "10.244.2.10", &[]), Some(alice));
}
