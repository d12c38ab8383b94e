//! The capture rules, through the `nft` binary's JSON interface (`nft -j`): built here as
//! JSON values, applied with `nft -j -f -`, read back with `nft -j list ruleset`. No rule
//! text is assembled anywhere else.
//!
//! One table per capture, `inet tpvpn-<capture id>`, with one chain hooked at prerouting
//! (priority mangle, before any nat) that
//! 1. lets the agent's own connections (socket mark [`AGENT_MARK`]) through,
//! 2. lets the node's own connections (kubelet probes) through: sources in set `node`,
//!    every address of the node (see [`crate::addrs`]), refilled when they change,
//! 3. hands new connections to the captured port to the agent's transparent listener with
//!    `tproxy` (behind a mesh sidecar: only those arriving over loopback, the sidecar's
//!    plaintext hop to the app).
//!
//! Beside it, an empty table `inet tpvpn-<capture id>-replies` says that connections the
//! agent made through the capture may still be open (they need the namespace's policy
//! route, [`crate::replies`]), after the capture ends.
//!
//! `tproxy` only assigns a packet to a *transparent listening socket*: when the agent is
//! gone, so is its socket, the rule does nothing and the kernel delivers the connection
//! to the app as before (fail open). Packets of connections that already exist keep
//! their sockets.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::{Error, Result};

/// The socket mark of the agent's own connections to a pod's app: never captured.
pub const AGENT_MARK: u32 = 0x7470_7670;
/// Every table the agent makes starts with this.
pub const TABLE_PREFIX: &str = "tpvpn-";

/// The table name of capture `id`.
pub fn table_name(id: u64) -> String {
    format!("{TABLE_PREFIX}{id}")
}

/// What one capture table does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRules {
    pub id: u64,
    /// The pod's address family decides the `tproxy` family.
    pub pod_ip: IpAddr,
    /// The pod port captured.
    pub port: u16,
    /// The agent's transparent listener in the pod's namespace.
    pub listener_port: u16,
    /// Sources never captured (the node's addresses: kubelet probes), of the pod's family.
    pub exempt: Vec<IpAddr>,
    /// Capture only connections arriving over loopback (behind a mesh sidecar).
    pub loopback_only: bool,
}

fn ip_family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

/// The `nft -j -f` document that creates the capture table (and first deletes a table
/// of the same name, so that applying it twice is the same as once).
pub fn capture_document(r: &CaptureRules) -> Value {
    let table = table_name(r.id);
    let fam = ip_family(&r.pod_ip);
    let rule = |expr: Vec<Value>| json!({"add": {"rule": {"family": "inet", "table": table, "chain": "capture", "expr": expr}}});
    let mut cmds = vec![
        // Create, then delete: no error when it did not exist; gone if it did.
        json!({"add": {"table": {"family": "inet", "name": table}}}),
        json!({"delete": {"table": {"family": "inet", "name": table}}}),
        json!({"add": {"table": {"family": "inet", "name": table}}}),
        json!({"add": {"chain": {"family": "inet", "table": table, "name": "capture",
            "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}}}),
        rule(vec![
            json!({"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": AGENT_MARK}}),
            json!({"return": null}),
        ]),
    ];
    let set_type = if r.pod_ip.is_ipv4() { "ipv4_addr" } else { "ipv6_addr" };
    cmds.push(json!({"add": {"set": {"family": "inet", "table": table, "name": EXEMPT_SET, "type": set_type}}}));
    cmds.extend(exempt_elements(&table, &r.exempt));
    cmds.push(rule(vec![
        json!({"match": {"op": "==", "left": {"payload": {"protocol": fam, "field": "saddr"}}, "right": format!("@{EXEMPT_SET}")}}),
        json!({"return": null}),
    ]));
    let mut capture = vec![
        json!({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": if r.pod_ip.is_ipv4() { "ipv4" } else { "ipv6" }}}),
    ];
    if r.loopback_only {
        capture.push(json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}));
    }
    capture.push(
        json!({"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": r.port}}),
    );
    capture.push(json!({"tproxy": {"family": fam, "port": r.listener_port}}));
    cmds.push(rule(capture));
    json!({"nftables": cmds})
}

/// The name of the replies table of capture `id`.
pub fn replies_table_name(id: u64) -> String {
    format!("{TABLE_PREFIX}{id}-replies")
}

/// The document that creates the (empty) replies table `table`.
pub fn replies_document(table: &str) -> Value {
    json!({"nftables": [{"add": {"table": {"family": "inet", "name": table}}}]})
}

/// The set of a capture table holding the sources it never captures.
const EXEMPT_SET: &str = "node";

fn exempt_elements(table: &str, exempt: &[IpAddr]) -> Option<Value> {
    let elem: Vec<String> = exempt.iter().map(IpAddr::to_string).collect();
    (!elem.is_empty())
        .then(|| json!({"add": {"element": {"family": "inet", "table": table, "name": EXEMPT_SET, "elem": elem}}}))
}

/// The document that replaces the exempt sources of capture table `table`, in one
/// transaction (no moment without them).
pub fn exempt_document(table: &str, exempt: &[IpAddr]) -> Value {
    let mut cmds = vec![json!({"flush": {"set": {"family": "inet", "table": table, "name": EXEMPT_SET}}})];
    cmds.extend(exempt_elements(table, exempt));
    json!({"nftables": cmds})
}

/// The document that deletes the table of capture `id` (no error if it is gone).
pub fn delete_document(name: &str) -> Value {
    json!({"nftables": [
        {"add": {"table": {"family": "inet", "name": name}}},
        {"delete": {"table": {"family": "inet", "name": name}}},
    ]})
}

/// The names of tpvpn's tables in a `nft -j list ruleset` output.
pub fn tpvpn_tables(ruleset: &Value) -> Vec<String> {
    entries(ruleset)
        .filter_map(|e| e.get("table"))
        .filter(|t| t["family"] == "inet")
        .filter_map(|t| t["name"].as_str())
        .filter(|n| n.starts_with(TABLE_PREFIX))
        .map(str::to_string)
        .collect()
}

/// Whether a mesh sidecar redirects the pod's inbound traffic: a rule outside tpvpn's
/// tables with a `redirect` (istio-init's nat REDIRECT to its proxy on 15006, through
/// iptables-nft) or an iptables `REDIRECT` target. Rules of iptables-legacy are not in
/// this ruleset and are not seen.
pub fn redirects_inbound(ruleset: &Value) -> bool {
    entries(ruleset)
        .filter_map(|e| e.get("rule"))
        .filter(|r| !r["table"].as_str().is_some_and(|t| t.starts_with(TABLE_PREFIX)))
        .any(|r| {
            r["expr"].as_array().is_some_and(|exprs| {
                exprs.iter().any(|x| {
                    x.get("redirect").is_some() || x.pointer("/xt/name").and_then(Value::as_str) == Some("REDIRECT")
                })
            })
        })
}

fn entries(ruleset: &Value) -> impl Iterator<Item = &Value> {
    ruleset["nftables"].as_array().into_iter().flatten()
}

/// Runs `nft -j -f -` with `doc` in the calling thread's network namespace.
pub fn apply(doc: &Value) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Nft(format!("cannot run nft (is the nftables package installed?): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(doc.to_string().as_bytes()).map_err(|e| Error::Nft(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| Error::Nft(e.to_string()))?;
    if !out.status.success() {
        return Err(Error::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// `nft -j list ruleset` in the calling thread's network namespace.
pub fn ruleset() -> Result<Value> {
    let out = Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Nft(format!("cannot run nft (is the nftables package installed?): {e}")))?;
    if !out.status.success() {
        return Err(Error::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| Error::Nft(format!("nft printed no JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> CaptureRules {
        CaptureRules {
            id: 7,
            pod_ip: "10.244.2.10".parse().unwrap(),
            port: 8080,
            listener_port: 40123,
            exempt: vec!["10.244.2.1".parse().unwrap(), "10.250.1.1".parse().unwrap()],
            loopback_only: false,
        }
    }

    fn rule_exprs(doc: &Value) -> Vec<Value> {
        doc["nftables"].as_array().unwrap().iter().filter_map(|c| c.pointer("/add/rule/expr").cloned()).collect()
    }

    #[test]
    fn capture_table_passes_marked_and_probes_then_tproxies_the_port() {
        let doc = capture_document(&rules());
        let cmds = doc["nftables"].as_array().unwrap();
        assert_eq!(cmds[3].pointer("/add/chain/hook"), Some(&json!("prerouting")));
        assert_eq!(cmds[3].pointer("/add/chain/prio"), Some(&json!(-150)), "before nat (dstnat is -100)");
        let exprs = rule_exprs(&doc);
        assert_eq!(exprs.len(), 3, "mark, the node's addresses, capture: {exprs:?}");
        assert_eq!(exprs[0][0]["match"]["right"], json!(AGENT_MARK));
        assert_eq!(exprs[1][0]["match"]["right"], json!("@node"));
        assert_eq!(exprs[1][0]["match"]["left"]["payload"]["protocol"], json!("ip"));
        let set = cmds.iter().find_map(|c| c.pointer("/add/set")).unwrap();
        assert_eq!((&set["name"], &set["type"]), (&json!("node"), &json!("ipv4_addr")));
        let elems = cmds.iter().find_map(|c| c.pointer("/add/element/elem")).unwrap();
        assert_eq!(elems, &json!(["10.244.2.1", "10.250.1.1"]));
        // The set is refilled in one transaction; an empty one is only flushed.
        let doc = exempt_document("tpvpn-7", &["10.250.4.1".parse().unwrap()]);
        assert_eq!(doc["nftables"][0].pointer("/flush/set/name"), Some(&json!("node")));
        assert_eq!(doc["nftables"][1].pointer("/add/element/elem"), Some(&json!(["10.250.4.1"])));
        assert_eq!(exempt_document("tpvpn-7", &[])["nftables"].as_array().map(Vec::len), Some(1));
        let last = &exprs[2];
        assert_eq!(last[1]["match"]["right"], json!(8080));
        assert_eq!(last[2], json!({"tproxy": {"family": "ip", "port": 40123}}));
        // Behind a mesh: only the loopback hop.
        let doc = capture_document(&CaptureRules { loopback_only: true, ..rules() });
        let exprs = rule_exprs(&doc);
        assert!(exprs[2].as_array().unwrap().iter().any(|x| x["match"]["right"] == json!("lo")));
        // IPv6 pods get an ip6 set and tproxy.
        let v6 =
            CaptureRules { pod_ip: "fd00::10".parse().unwrap(), exempt: vec!["fd00::1".parse().unwrap()], ..rules() };
        let doc = capture_document(&v6);
        let exprs = rule_exprs(&doc);
        assert_eq!(exprs[1][0]["match"]["left"]["payload"]["protocol"], json!("ip6"));
        assert!(doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c.pointer("/add/set/type") == Some(&json!("ipv6_addr"))));
        assert_eq!(exprs[2].as_array().unwrap().last().unwrap()["tproxy"]["family"], json!("ip6"));
    }

    #[test]
    fn a_replies_table_is_an_empty_table_of_the_agents() {
        let name = replies_table_name(7);
        let doc = replies_document(&name);
        assert_eq!(doc, json!({"nftables": [{"add": {"table": {"family": "inet", "name": "tpvpn-7-replies"}}}]}));
        assert_eq!(tpvpn_tables(&json!({"nftables": [{"table": {"family": "inet", "name": name}}]})), vec![name]);
    }

    #[test]
    fn tables_and_mesh_are_read_from_a_ruleset() {
        let ruleset = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "tpvpn-7", "handle": 1}},
            {"table": {"family": "inet", "name": "other", "handle": 2}},
            {"table": {"family": "ip", "name": "nat", "handle": 3}},
            {"rule": {"family": "inet", "table": "tpvpn-7", "chain": "capture", "expr": [{"redirect": null}]}},
        ]});
        assert_eq!(tpvpn_tables(&ruleset), vec!["tpvpn-7".to_string()]);
        assert!(!redirects_inbound(&ruleset), "tpvpn's own rules are not a mesh");
        let istio = json!({"nftables": [
            {"rule": {"family": "ip", "table": "nat", "chain": "ISTIO_IN_REDIRECT",
                      "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                               {"redirect": {"port": 15006}}]}}]});
        assert!(redirects_inbound(&istio));
        let xt = json!({"nftables": [{"rule": {"family": "ip", "table": "nat", "chain": "X", "expr": [{"xt": {"type": "target", "name": "REDIRECT"}}]}}]});
        assert!(redirects_inbound(&xt));
    }
}
