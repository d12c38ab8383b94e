//! The intercept rules under virtual time, without a cluster, a socket or root: each
//! test drives [`Claims`] with events as the sessions and agents deliver them and
//! checks what it decides to send and answer.

use std::net::SocketAddr;

use serde_json::json;

use super::*;

const ALICE: [u8; 16] = [1; 16];
const BOB: [u8; 16] = [2; 16];
const CAROL: [u8; 16] = [3; 16];

fn service(name: &str) -> Arc<Service> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
        }))
        .unwrap(),
    )
}

/// A Ready pod of Service `app` on `node`, serving port `http` on 8080 in container
/// `nginx` (id `container_id`).
fn pod(app: &str, name: &str, node: &str, ip: &str, container_id: &str) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [
                {"name": "nginx", "ports": [{"name": "http", "containerPort": 8080}],
                 "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
            ]},
            "status": {"podIP": ip, "hostIP": "10.250.1.1",
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "nginx", "containerID": container_id, "image": "", "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .unwrap(),
    )
}

fn web0() -> Arc<Pod> {
    pod("web", "web-0", "n1", "10.244.1.10", "containerd://a0")
}

fn web1() -> Arc<Pod> {
    pod("web", "web-1", "n2", "10.244.2.10", "containerd://a1")
}

fn request(matchers: &[(&str, &str)]) -> Request {
    Request {
        namespace: "default".into(),
        service: "web".into(),
        port: "80".into(),
        local_port: 8080,
        container: String::new(),
        matchers: Matchers {
            headers: matchers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            path_prefix: String::new(),
        },
    }
}

fn ok() -> Result<Captured, String> {
    Ok(Captured {
        meshed: false,
        env: vec![("PASSWORD".into(), "hunter2".into()), ("A".into(), "1".into())],
        note: String::new(),
    })
}

/// A manager with agents on `n1` and `n2` (sessions 101 and 102, protocol v3) and the
/// world `web-0` (on n1) and `web-1` (on n2) behind Service `web`; `start` is "now" in
/// virtual time.
struct Lab {
    claims: Claims,
    world: World,
    start: Instant,
    wall: SystemTime,
}

impl Lab {
    fn new(pods: Vec<Arc<Pod>>) -> Lab {
        let mut claims = Claims::new(rules::NamespacePolicy::default());
        claims.agent_connected("n1", 101, Negotiated::assumed(3));
        claims.agent_connected("n2", 102, Negotiated::assumed(3));
        let world = World { services: vec![service("web"), service("db")], pods };
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_115_723);
        Lab { claims, world, start: Instant::now(), wall }
    }

    /// [`Lab::new`] with Alice's laptop connected as session 1 and Bob's as session 2.
    fn alice_and_bob(pods: Vec<Arc<Pod>>) -> Lab {
        let mut lab = Lab::new(pods);
        lab.claims.client_connected(1, &ALICE, "alice@laptop");
        lab.claims.client_connected(2, &BOB, "bob@laptop");
        lab
    }

    fn at(&self, secs: u64) -> Instant {
        self.start + Duration::from_secs(secs)
    }

    fn effects(&mut self) -> Vec<Effect> {
        std::iter::from_fn(|| self.claims.poll_effect()).collect()
    }

    fn ask(&mut self, secs: u64, session: u64, req: &Request) -> Result<u64, Refusal> {
        let (now, wall) = (self.at(secs), self.wall + Duration::from_secs(secs));
        self.claims.intercept(now, wall, session, req, &self.world)
    }

    /// Asks, answers every capture sent with `answer`, and returns the answer.
    fn intercept(
        &mut self,
        secs: u64,
        session: u64,
        req: &Request,
        answer: Result<Captured, String>,
    ) -> Result<Message, Refusal> {
        let id = self.ask(secs, session, req)?;
        for (node, capture, _) in captures(&self.effects()) {
            self.claims.capture_status(&node, capture, answer.clone());
        }
        answer_of(id, &self.effects())
    }
}

/// The `Capture`s among `effects`: node, capture id, pod.
fn captures(effects: &[Effect]) -> Vec<(String, u64, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ToAgent { node, message: Message::Capture { id, pod_name, .. } } => {
                Some((node.clone(), *id, pod_name.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The `Release`s among `effects`: node, capture id.
fn releases(effects: &[Effect]) -> Vec<(String, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ToAgent { node, message: Message::Release { id } } => Some((node.clone(), *id)),
            _ => None,
        })
        .collect()
}

fn answer_of(request: u64, effects: &[Effect]) -> Result<Message, Refusal> {
    let answers: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Answer { request: r, result } if *r == request => Some(result.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(answers.len(), 1, "one answer for request {request}: {effects:?}");
    answers.into_iter().next().unwrap()
}

fn warnings(reply: &Message) -> &[String] {
    let Message::InterceptReply { warnings, .. } = reply else { panic!("not a reply: {reply:?}") };
    warnings
}

#[test]
fn a_request_is_answered_once_every_pod_is_captured() {
    let mut lab = Lab::new(vec![web0(), web1()]);
    lab.claims.client_connected(1, &ALICE, "alice@laptop");
    let id = lab.ask(0, 1, &request(&[])).unwrap();
    let sent = captures(&lab.effects());
    let pods: Vec<(&str, &str)> = sent.iter().map(|(n, _, p)| (n.as_str(), p.as_str())).collect();
    assert_eq!(pods, [("n1", "web-0"), ("n2", "web-1")], "each pod's capture goes to its node's agent");
    assert_eq!(lab.claims.poll_timeout(), Some(lab.at(10)), "the request's deadline");

    lab.claims.capture_status("n1", sent[0].1, ok());
    assert_eq!(lab.effects(), [], "no answer while a pod is not captured");
    // An answer from another node's agent for this capture is not believed.
    lab.claims.capture_status("n1", sent[1].1, Err("forged".into()));
    assert_eq!(lab.effects(), []);
    lab.claims.capture_status("n2", sent[1].1, ok());
    let reply = answer_of(id, &lab.effects()).unwrap();
    let Message::InterceptReply { id: got, service_port, targets, env, warnings } = reply else { panic!() };
    assert_eq!((got, service_port), (id, 80));
    let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.addr).collect();
    assert_eq!(addrs, ["10.244.1.10:8080".parse().unwrap(), "10.244.2.10:8080".parse().unwrap()]);
    assert_eq!(env, [("A".to_string(), "1".to_string())], "a Secret's value is never handed out");
    assert!(warnings.iter().any(|w| w.contains("PASSWORD")), "{warnings:?}");
    assert_eq!(lab.claims.route("n1", sent[0].1), Some((id, 1)), "captured connections go to the owner");
    assert_eq!(lab.claims.route("n2", sent[0].1), None, "only from the capture's own node");
}

#[test]
fn overlapping_intercepts_of_one_port_are_refused_with_the_holder_named() {
    let mut lab = Lab::alice_and_bob(vec![web0()]);
    lab.claims.client_connected(3, &CAROL, "carol@laptop");
    lab.intercept(0, 1, &request(&[]), ok()).unwrap();

    let e = lab.ask(1, 2, &request(&[])).unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(
        e.message.contains("default/web port 80 is intercepted by alice@laptop since 2026-12-01 09:02:03 UTC"),
        "{e:?}"
    );
    assert_eq!(lab.effects(), [], "a refusal changes nothing");

    // A personal intercept beside the global one is the design.
    let bob = lab.intercept(2, 2, &request(&[("x-dev", "bob")]), ok()).unwrap();
    assert!(warnings(&bob).iter().any(|w| w.contains("a global intercept holds this port too")), "{bob:?}");
    // Carol may not take Bob's requests: the same header, or a superset of it.
    for m in [&[("x-dev", "bob")][..], &[("x-dev", "bob"), ("x-team", "t")]] {
        let e = lab.ask(3, 3, &request(m)).unwrap_err();
        assert_eq!(e.code, ErrorCode::Conflict);
        assert!(e.message.contains("for x-dev: bob is intercepted by bob@laptop"), "{e:?}");
    }
    lab.intercept(4, 3, &request(&[("x-dev", "carol")]), ok()).unwrap();
    let rows = lab.claims.snapshot(3).rows(&lab.world);
    let holders: Vec<(&str, bool)> =
        rows.iter().filter(|r| r.service == "web").map(|r| (r.holder.as_str(), r.mine)).collect();
    assert_eq!(holders.len(), 3);
    for h in ["alice@laptop", "bob@laptop for x-dev: bob", "carol@laptop for x-dev: carol"] {
        assert!(holders.contains(&(h, h.starts_with("carol"))), "{h} in {holders:?}");
    }
}

#[test]
fn a_disconnected_owner_may_reclaim_within_the_grace_and_nobody_else() {
    let mut lab = Lab::alice_and_bob(vec![web0()]);
    lab.intercept(0, 1, &request(&[]), ok()).unwrap();
    let (capture, ..) = lab.claims.captures.iter().map(|(id, c)| (*id, c.intercept)).next().unwrap();

    lab.claims.client_gone(lab.at(30), 1);
    assert_eq!(releases(&lab.effects()), [("n1".to_string(), capture)], "the pods get their traffic back at once");
    assert_eq!(lab.claims.route("n1", capture), None);
    assert_eq!(lab.claims.poll_timeout(), Some(lab.at(90)));

    lab.claims.handle_timeout(lab.at(89));
    let e = lab.ask(89, 2, &request(&[])).unwrap_err();
    assert!(e.message.contains("(disconnected; released in 1s unless it reconnects)"), "{e:?}");

    // Alice's laptop comes back with the same client id as a new session.
    lab.claims.client_connected(7, &ALICE, "alice@laptop");
    let reply = lab.intercept(89, 7, &request(&[]), ok()).unwrap();
    assert!(warnings(&reply).contains(&"re-claimed (held since 2026-12-01 09:02:03 UTC)".to_string()), "{reply:?}");
    let Message::InterceptReply { id, .. } = reply else { panic!() };
    let capture = captures_of(&lab.claims, id);
    assert_eq!(lab.claims.route("n1", capture), Some((id, 7)));
}

fn captures_of(claims: &Claims, intercept: u64) -> u64 {
    *claims.intercepts[&intercept].captures.values().next().expect("a capture")
}

#[test]
fn a_claim_lapses_after_the_grace() {
    let mut lab = Lab::alice_and_bob(vec![web0()]);
    lab.intercept(0, 1, &request(&[]), ok()).unwrap();
    lab.claims.client_gone(lab.at(0), 1);
    lab.claims.handle_timeout(lab.at(60));
    assert_eq!(lab.claims.poll_timeout(), None);
    lab.intercept(61, 2, &request(&[]), ok()).expect("Bob may take it once Alice's claim lapsed");
    lab.claims.client_connected(3, &ALICE, "alice@laptop");
    assert_eq!(lab.ask(62, 3, &request(&[])).unwrap_err().code, ErrorCode::Conflict);
}

#[test]
fn the_earlier_connection_of_a_client_still_open_holds_its_claim() {
    let mut lab = Lab::new(vec![web0()]);
    lab.claims.client_connected(1, &ALICE, "alice@laptop");
    lab.claims.client_connected(2, &ALICE, "alice@laptop");
    lab.intercept(0, 1, &request(&[]), ok()).unwrap();
    let e = lab.ask(1, 2, &request(&[])).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.contains("held by this client's earlier connection"), "{e:?}");
    assert_eq!(lab.claims.session_of(&ALICE), Some(2), "the newest session of the client");
    assert_eq!(lab.claims.session_of(b"short"), None, "no stable id, no session to join");
}

#[test]
fn personal_intercepts_need_agents_that_know_them() {
    let mut lab = Lab::new(vec![web0(), web1()]);
    lab.claims.agent_connected("n2", 202, Negotiated::assumed(2));
    lab.claims.client_connected(1, &ALICE, "alice@laptop");
    let e = lab.ask(0, 1, &request(&[("x-dev", "alice")])).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported);
    assert!(e.message.contains("the tpvpn agent on node n2 speaks protocol v2"), "{e:?}");
    assert!(e.message.contains("upgrade the agents"), "{e:?}");
    lab.intercept(0, 1, &request(&[]), ok()).expect("a v2 agent captures for a global intercept");

    // A personal intercept held while n2's agent is replaced by an old one: nothing it
    // cannot read is sent to it.
    lab.claims.client_connected(2, &BOB, "bob@laptop");
    lab.claims.agent_connected("n2", 203, Negotiated::assumed(3));
    lab.effects();
    lab.intercept(1, 2, &request(&[("x-dev", "bob")]), ok()).unwrap();
    lab.claims.agent_connected("n2", 204, Negotiated::assumed(2));
    let effects = lab.effects();
    let sent: Vec<&Matchers> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::ToAgent { message: Message::Capture { matchers, .. }, .. } => Some(matchers),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [&Matchers::default()], "only Alice's global capture");
}

#[test]
fn a_failed_reclaim_keeps_the_claim_it_was_to_renew() {
    let mut lab = Lab::alice_and_bob(vec![web0()]);
    lab.intercept(0, 1, &request(&[]), ok()).unwrap();
    lab.claims.client_gone(lab.at(0), 1);
    lab.claims.client_connected(3, &ALICE, "alice@laptop");
    let e = lab.intercept(10, 3, &request(&[]), Err("no such container".into())).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert_eq!(e.message, "cannot capture pod web-0: no such container");
    let e = lab.ask(11, 2, &request(&[])).unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict, "Alice still holds it: {e:?}");
    assert!(e.message.contains("since 2026-12-01 09:02:03 UTC (disconnected"), "{e:?}");
    let reply = lab.intercept(12, 3, &request(&[]), ok()).unwrap();
    assert!(warnings(&reply).iter().any(|w| w.starts_with("re-claimed")), "{reply:?}");
}

#[test]
fn pods_that_become_ready_change_or_go_are_followed() {
    let mut lab = Lab::new(vec![web0()]);
    lab.claims.client_connected(1, &ALICE, "alice@laptop");
    let Message::InterceptReply { id, .. } = lab.intercept(0, 1, &request(&[]), ok()).unwrap() else { panic!() };
    let first = captures_of(&lab.claims, id);

    lab.world.pods.push(web1());
    lab.claims.reconcile(&lab.world);
    let sent = captures(&lab.effects());
    assert_eq!(sent.iter().map(|(n, _, p)| (n.as_str(), p.as_str())).collect::<Vec<_>>(), [("n2", "web-1")]);
    lab.claims.reconcile(&lab.world);
    assert_eq!(lab.effects(), [], "nothing changed, nothing sent");

    // web-0's container restarted: a new container id, captured again.
    lab.world.pods[0] = pod("web", "web-0", "n1", "10.244.1.10", "containerd://b0");
    lab.claims.reconcile(&lab.world);
    let effects = lab.effects();
    assert_eq!(releases(&effects), [("n1".to_string(), first)]);
    let again = captures(&effects);
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].1, first);
    let Some(Effect::ToAgent { message: Message::Capture { container_id, .. }, .. }) =
        effects.iter().find(|e| matches!(e, Effect::ToAgent { message: Message::Capture { .. }, .. }))
    else {
        panic!()
    };
    assert_eq!(container_id, "containerd://b0");

    lab.world.pods.retain(|p| p.metadata.name.as_deref() == Some("web-0"));
    lab.claims.reconcile(&lab.world);
    assert_eq!(releases(&lab.effects()), [("n2".to_string(), sent[0].1)], "web-1 went: released");

    lab.world.services.retain(|s| s.metadata.name.as_deref() != Some("web"));
    lab.claims.reconcile(&lab.world);
    assert_eq!(releases(&lab.effects()), [("n1".to_string(), again[0].1)], "the Service went: all released");
    assert_eq!(lab.claims.leave(1, "default", "web").unwrap_err().code, ErrorCode::NotFound);
}

#[test]
fn a_lost_agent_fails_the_requests_waiting_for_it() {
    let mut lab = Lab::alice_and_bob(vec![web0(), web1()]);
    let id = lab.ask(0, 1, &request(&[])).unwrap();
    let sent = captures(&lab.effects());
    lab.claims.capture_status("n1", sent[0].1, ok());
    lab.claims.agent_gone("n2", 999);
    assert_eq!(lab.effects(), [], "another session of the node's agent going changes nothing");
    lab.claims.agent_gone("n2", 102);
    let effects = lab.effects();
    let e = answer_of(id, &effects).unwrap_err();
    assert_eq!(e.message, "cannot capture pod web-1: the agent went away");
    assert_eq!(releases(&effects), [("n1".to_string(), sent[0].1)], "web-0 is given back to its pod");
    let e = lab.ask(1, 2, &request(&[])).unwrap_err();
    assert!(e.message.contains("no tpvpn agent on node n2 (pod web-1)"), "{e:?}");
    assert_eq!(
        lab.claims.snapshot(2).rows(&lab.world).iter().find(|r| r.service == "web").unwrap().state,
        InterceptState::NoAgent
    );
}

#[test]
fn silent_agents_fail_the_request_at_its_deadline() {
    let mut lab = Lab::new(vec![web0()]);
    lab.claims.client_connected(1, &ALICE, "alice@laptop");
    let id = lab.ask(0, 1, &request(&[])).unwrap();
    let sent = captures(&lab.effects());
    lab.claims.handle_timeout(lab.at(9));
    assert_eq!(lab.effects(), []);
    lab.claims.handle_timeout(lab.at(10));
    let effects = lab.effects();
    let e = answer_of(id, &effects).unwrap_err();
    assert_eq!(e.message, "cannot capture pod web-0: the agent did not answer within 10s");
    assert_eq!(releases(&effects), [("n1".to_string(), sent[0].1)], "a late capture is undone");
    assert_eq!(lab.claims.poll_timeout(), None, "nothing claimed, nothing waiting");
}

#[test]
fn an_agent_that_connects_gets_every_capture_of_its_node() {
    let mut lab = Lab::new(vec![web0(), web1()]);
    lab.claims.client_connected(1, &ALICE, "alice@laptop");
    lab.intercept(0, 1, &request(&[]), ok()).unwrap();
    let before: Vec<u64> =
        lab.claims.captures.iter().filter(|(_, c)| c.target.node == "n1").map(|(id, _)| *id).collect();
    lab.claims.agent_connected("n1", 301, Negotiated::assumed(3));
    let sent = captures(&lab.effects());
    assert_eq!(sent.iter().map(|(n, id, _)| (n.as_str(), *id)).collect::<Vec<_>>(), [("n1", before[0])]);
}

#[test]
fn leave_ends_only_ones_own_intercepts_and_a_request_under_way() {
    let mut lab = Lab::alice_and_bob(vec![web0()]);
    let Message::InterceptReply { id, .. } = lab.intercept(0, 1, &request(&[]), ok()).unwrap() else { panic!() };
    let capture = captures_of(&lab.claims, id);
    let e = lab.claims.leave(2, "default", "web").unwrap_err();
    assert_eq!((e.code, e.message.as_str()), (ErrorCode::NotFound, "you do not intercept default/web"));
    assert_eq!(lab.claims.leave(1, "default", "web").unwrap(), "left default/web port 80");
    assert_eq!(releases(&lab.effects()), [("n1".to_string(), capture)]);

    let id = lab.ask(1, 2, &request(&[])).unwrap();
    lab.effects();
    lab.claims.leave(2, "default", "web").unwrap();
    let e = answer_of(id, &lab.effects()).unwrap_err();
    assert!(e.message.contains("left while the intercept was being set up"), "{e:?}");
    assert_eq!(lab.claims.poll_timeout(), None);
}

#[test]
fn revoke_ends_everyones_intercepts_of_the_service_and_names_the_holders() {
    let mut lab = Lab::alice_and_bob(vec![web0()]);
    let Message::InterceptReply { id, .. } = lab.intercept(0, 1, &request(&[]), ok()).unwrap() else { panic!() };
    let capture = captures_of(&lab.claims, id);
    assert_eq!(
        lab.claims.revoke(lab.at(0), "default", "web", "admin").unwrap(),
        "revoked default/web: port 80 held by alice@laptop"
    );
    assert_eq!(releases(&lab.effects()), [("n1".to_string(), capture)]);
    // Gone for good: alice's session may not re-claim what was revoked (she asks again).
    let e = lab.claims.leave(1, "default", "web").unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = lab.claims.revoke(lab.at(0), "default", "web", "admin").unwrap_err();
    assert_eq!((e.code, e.message.as_str()), (ErrorCode::NotFound, "no one intercepts default/web"));
    // The Service is free: bob takes it.
    assert!(lab.intercept(1, 2, &request(&[]), ok()).is_ok());
    // A request still being set up is failed, not left dangling.
    lab.claims.revoke(lab.at(0), "default", "web", "admin").unwrap();
    lab.effects();
    let id = lab.ask(2, 1, &request(&[])).unwrap();
    lab.effects();
    lab.claims.revoke(lab.at(0), "default", "web", "admin").unwrap();
    let e = answer_of(id, &lab.effects()).unwrap_err();
    assert!(e.message.contains("revoked while the intercept was being set up"), "{e:?}");
}

#[test]
fn a_revoked_holder_is_told_at_once_or_when_it_comes_back() {
    let mut lab = Lab::alice_and_bob(vec![web0()]);
    lab.intercept(0, 1, &request(&[]), ok()).unwrap();
    // Connected: Alice's daemon gets a notice on its session, and Bob's gets nothing.
    lab.claims.revoke(lab.at(1), "default", "web", "bob").unwrap();
    let notices: Vec<(u64, Message)> = lab
        .effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::ToClient { session, message } => Some((session, message)),
            _ => None,
        })
        .collect();
    assert_eq!(notices, [(1, Message::Revoke { namespace: "default".into(), service: "web".into() })]);
    // She asks again: a fresh intercept of hers is hers to make.
    assert!(lab.intercept(2, 1, &request(&[]), ok()).is_ok());

    // Away (the claim kept for her): revoked meanwhile, her daemon's re-claim is refused
    // once, naming who revoked it; what she asks for afterwards is hers again.
    lab.claims.client_gone(lab.at(3), 1);
    lab.effects();
    lab.claims.revoke(lab.at(4), "default", "web", "bob").unwrap();
    assert!(!lab.effects().iter().any(|e| matches!(e, Effect::ToClient { .. })), "no session to tell");
    lab.claims.client_connected(7, &ALICE, "alice@laptop");
    let e = lab.intercept(5, 7, &request(&[]), ok()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert!(e.message.contains("revoked by bob while this client was away"), "{e:?}");
    assert!(lab.intercept(6, 7, &request(&[]), ok()).is_ok());

    // The record of a revocation lasts as long as the claim would have.
    lab.claims.client_gone(lab.at(7), 7);
    lab.effects();
    lab.claims.revoke(lab.at(8), "default", "web", "bob").unwrap();
    lab.claims.handle_timeout(lab.at(8 + RECLAIM.as_secs()));
    lab.claims.client_connected(8, &ALICE, "alice@laptop");
    assert!(lab.intercept(9 + RECLAIM.as_secs(), 8, &request(&[]), ok()).is_ok());
}

#[test]
fn protected_namespaces_and_unknown_services_are_refused() {
    let mut lab = Lab::new(vec![web0()]);
    lab.claims.client_connected(1, &ALICE, "alice@laptop");
    let mut req = request(&[]);
    req.namespace = "kube-system".into();
    assert_eq!(lab.ask(0, 1, &req).unwrap_err().code, ErrorCode::Forbidden);
    req.namespace = "default".into();
    req.service = "nope".into();
    assert_eq!(lab.ask(0, 1, &req).unwrap_err().message, "no Service default/nope");
    let e = lab.ask(0, 1, &Request { service: "db".into(), ..request(&[]) }).unwrap_err();
    assert_eq!(e.message, "no ready pods are selected by Service default/db");
    assert_eq!(lab.ask(0, 9, &request(&[])).unwrap_err().message, "the session ended");
    assert_eq!(lab.effects(), []);
}

#[test]
fn utc_dates() {
    assert_eq!(utc(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_115_723)), "2026-12-01 09:02:03 UTC");
    assert_eq!(utc(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29 00:00:00 UTC");
}
