//! The policy route that brings an app's replies back to the agent's transparent-source
//! connections, in a pod's network namespace (with `iproute2`'s `ip`).
//!
//! The agent passes requests on to a pod's app from the caller's own address
//! ([`crate::upstream::Upstream::app`]: `IP_TRANSPARENT`, bound to the caller's address),
//! so the app answers to an address that is not the pod's: routed as usual, the answer
//! would leave by the pod's interface. The agent's sockets carry its mark, and so do the
//! app's sockets of those connections: with `net.ipv4.tcp_fwmark_accept` on in the pod's
//! namespace a socket accepted from a marked SYN takes the SYN's mark (the agent turns it
//! on where it was off; only connections from marked sockets are concerned, and nothing
//! in the pod marks its own otherwise). One rule sends packets with that mark to a routing
//! table whose only route delivers everything locally, so the app's answers reach the
//! agent's socket. Istio's TPROXY mode routes the same way but marks the answers through
//! connection tracking, which would cost every packet of the pod a lookup; a socket's
//! mark costs nothing.
//!
//! Each capture holds a replies table (`tpvpn-<id>-replies`, empty: it only says that
//! connections made through the capture may still be open) through its router
//! ([`Replies`]); rule, routing table and setting are the namespace's, added with the
//! first and removed (the setting restored) with its last tpvpn table, under one lock
//! (`lock`) so that a capture starting meanwhile cannot lose them.

use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tracing::debug;

use crate::netns::{self, Ns};
use crate::nft::{self, AGENT_MARK};
use crate::{Error, Result};

/// The rule's priority and its routing table (`tp` in ASCII), out of the way of the
/// usual ones (0, 32766, 32767) and of meshes' (Istio's 32765, table 133).
pub const PREF: u32 = 0x7470;
pub const TABLE: u32 = 0x7470;
/// A second rule, the same as the first, present only while the agent has turned
/// `tcp_fwmark_accept` on: what to restore, kept where an agent that restarts finds it.
const TURNED_ON_PREF: u32 = PREF + 1;
/// The namespace's setting (the calling thread's: `/proc/sys/net` follows it).
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Route(format!("cannot run ip (is the iproute2 package installed?): {e}")))?;
    if !out.status.success() {
        return Err(Error::Route(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn family(v6: bool) -> &'static str {
    if v6 {
        "-6"
    } else {
        "-4"
    }
}

/// Held while the agent changes tables and policy routes in any namespace.
pub(crate) fn lock() -> MutexGuard<'static, ()> {
    static RULES: Mutex<()> = Mutex::new(());
    RULES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deletes tpvpn table `table` in the calling thread's namespace, and the policy route
/// with the namespace's last one.
pub(crate) fn delete_table(table: &str) -> Result<()> {
    let _rules = lock();
    nft::apply(&nft::delete_document(table))?;
    if nft::tpvpn_tables(&nft::ruleset()?).is_empty() {
        remove();
    }
    Ok(())
}

/// How long a replies table outlives its router: the closing handshakes of the last
/// connections.
const LINGER: Duration = Duration::from_secs(2);

/// One capture's replies table and the namespace's policy route, in place until dropped.
pub struct Replies {
    ns: Ns,
    table: String,
}

impl Replies {
    /// Makes them in the calling thread's namespace (`ns`) for capture `id`'s address
    /// family.
    pub fn install(ns: Ns, id: u64, v6: bool) -> Result<Replies> {
        let table = nft::replies_table_name(id);
        let made = {
            let _rules = lock();
            nft::apply(&nft::replies_document(&table)).and_then(|()| add_route(v6))
        };
        match made {
            Ok(()) => Ok(Replies { ns, table }),
            Err(e) => {
                let _ = delete_table(&table);
                Err(e)
            }
        }
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        let (ns, table) = (self.ns.clone(), std::mem::take(&mut self.table));
        let remove = move || {
            // Namespace work runs on a thread of its own (see `netns::run_in`).
            if let Err(e) = netns::run_in(&ns, move || delete_table(&table)) {
                // The pod may be gone, and its namespace with it.
                debug!(ns = %ns.path().display(), error = %e, "replies table not removed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(async move {
                tokio::time::sleep(LINGER).await;
                let _ = tokio::task::spawn_blocking(remove).await;
            })),
            Err(_) => remove(),
        }
    }
}

/// Adds the rule and the local route for one address family in the calling thread's
/// namespace, unless they are there.
fn add_route(v6: bool) -> Result<()> {
    let (fam, table, mark) = (family(v6), TABLE.to_string(), format!("{AGENT_MARK:#x}"));
    let add_rule = |pref: u32| -> Result<()> {
        let pref = pref.to_string();
        if ip(&[fam, "rule", "list", "pref", &pref])?.trim().is_empty() {
            ip(&[fam, "rule", "add", "pref", &pref, "fwmark", &mark, "lookup", &table])?;
        }
        Ok(())
    };
    add_rule(PREF)?;
    let all = if v6 { "::/0" } else { "0.0.0.0/0" };
    ip(&[fam, "route", "replace", "local", all, "dev", "lo", "table", &table])?;
    let setting = |e: std::io::Error| Error::Route(format!("{FWMARK_ACCEPT}: {e}"));
    if std::fs::read_to_string(FWMARK_ACCEPT).map_err(setting)?.trim() == "0" {
        // The marker first: a crash between the two leaves at worst a setting restored
        // that was never changed.
        add_rule(TURNED_ON_PREF)?;
        std::fs::write(FWMARK_ACCEPT, "1").map_err(setting)?;
    }
    Ok(())
}

/// Removes the rules and the routing table of both families from the calling thread's
/// namespace, and turns `tcp_fwmark_accept` off again if the agent turned it on (what is
/// not there is no error).
pub(crate) fn remove() {
    let table = TABLE.to_string();
    let turned_on = [false, true].iter().any(|&v6| {
        ip(&[family(v6), "rule", "list", "pref", &TURNED_ON_PREF.to_string()]).is_ok_and(|r| !r.trim().is_empty())
    });
    for v6 in [false, true] {
        let fam = family(v6);
        for pref in [PREF, TURNED_ON_PREF] {
            // A rule added twice (two agents' races) is removed twice; bounded.
            for _ in 0..8 {
                if ip(&[fam, "rule", "del", "pref", &pref.to_string()]).is_err() {
                    break;
                }
            }
        }
        let _ = ip(&[fam, "route", "flush", "table", &table]);
    }
    if turned_on {
        if let Err(e) = std::fs::write(FWMARK_ACCEPT, "0") {
            debug!(error = %e, "tcp_fwmark_accept not restored");
        }
    }
}
