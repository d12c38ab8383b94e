//! Where a pod is on its node: its network namespace and where its environment comes
//! from, found the way a node can, from the container runtime's files ([`runtime`]) and
//! `/proc` ([`netns`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::netns::{self, Ns};
use crate::runtime::{self, Bundle};
use crate::{Error, Result};

/// A pod's network namespace, and where its environment comes from.
#[derive(Debug, Clone)]
pub struct Located {
    /// Held open: it outlives the process it was found through (see [`Ns`]).
    pub ns: Ns,
    pub pid: u32,
    pub bundle: Option<Bundle>,
}

/// Finds the network namespace of the pod at `pod_ip`: from the runtime bundle of
/// `container_id`, the pid of its first process, `/proc/PID/ns/net`, checked to hold
/// `pod_ip`; without a bundle, the one namespace on the node that holds `pod_ip`.
pub fn locate(proc_root: &Path, runtime_roots: &[PathBuf], pod_ip: IpAddr, container_id: &str) -> Result<Located> {
    if let Some(bundle) = runtime::find(runtime_roots, container_id) {
        let pid = bundle.pid()?;
        let ns = Ns::open(&netns::of_pid(proc_root, pid))?;
        if !netns::holds(&ns, pod_ip)? {
            return Err(Error::Locate(format!(
                "container {container_id} (pid {pid}) is not in a network namespace holding {pod_ip}"
            )));
        }
        return Ok(Located { ns, pid, bundle: Some(bundle) });
    }
    let ns = netns::find_by_ip(proc_root, pod_ip)?;
    let pid = ns
        .path()
        .parent()
        .and_then(Path::parent)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::Locate(format!("no pid in {}", ns.path().display())))?;
    Ok(Located { ns, pid, bundle: None })
}
