//! Who may do what (issue 21), in the lab against the API stand-in: node agents are
//! authenticated by the API server (a `TokenReview` of their pod's projected
//! ServiceAccount token) and may serve only the node their pod runs on. Needs root.

use std::time::Duration;

use tpvpn_lab::pods::NODE_NAME;
use tpvpn_lab::{show, wait_until};

#[test]
fn an_agent_serves_only_the_node_its_credential_belongs_to() {
    let Some(lab) = tpvpn_lab::lab_or_skip() else { return };
    // The credential the lab node's agent presents; a compromised node's agent holds it
    // and claims to serve another node, to be sent that node's captures.
    let credential = lab.agent_token_file().unwrap();
    let out = lab.run_agent("other-node", &credential, Duration::from_secs(8)).unwrap();
    assert_eq!(out.status.code(), Some(1), "refused and ended, not connected:\n{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tpvpn-agent: the manager refused this agent: the agent token belongs to a pod on node lab-node, not to node other-node"), "{err}");
    assert!(
        wait_until(Duration::from_secs(5), || lab.manager_log().contains("agent token reviewed: refused")),
        "{}",
        lab.manager_log()
    );

    // A token of the agent's ServiceAccount for another audience (the API server's own,
    // as a default-mounted token is), and a random string: refused, each saying why.
    let dir = tempdir(&lab);
    let wrong = dir.join("wrong-audience");
    std::fs::write(&wrong, lab.agent_service_account_token(NODE_NAME, "https://kubernetes.default.svc").unwrap())
        .unwrap();
    let out = lab.run_agent(NODE_NAME, &wrong, Duration::from_secs(8)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is invalid for the target audiences"), "{}", show(&out));
    let forged = dir.join("forged");
    std::fs::write(&forged, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl\n").unwrap();
    let out = lab.run_agent(NODE_NAME, &forged, Duration::from_secs(8)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the agent token is not valid"), "{}", show(&out));

    // The credential is right for its own node (the agent connects and keeps running).
    let out = lab.run_agent(NODE_NAME, &credential, Duration::from_secs(3)).unwrap();
    assert_ne!(out.status.code(), Some(1), "{}", show(&out));
    assert!(lab.manager_log().contains("agent token reviewed: accepted"), "{}", lab.manager_log());
}

/// A directory of the lab's own for this test's files.
fn tempdir(lab: &tpvpn_lab::Lab) -> std::path::PathBuf {
    let d = lab.dir().join("identity");
    std::fs::create_dir_all(&d).unwrap();
    d
}
