//! Network namespaces of pods: running work inside one (a thread that joined it with
//! `setns`; sockets it creates stay in that namespace, processes it starts run there),
//! and finding a pod's namespace the way a node can, from the container runtime's files
//! and `/proc`.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::{Error, Result};

/// Runs `f` on a new thread that first joins the network namespace at `ns` (a
/// `/proc/PID/ns/net` path). Blocking: call it from `spawn_blocking`.
pub fn run_in<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let file = File::open(ns).map_err(|e| Error::Netns(format!("cannot open {}: {e}", ns.display())))?;
    let shown = ns.display().to_string();
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Netns(format!("cannot enter {shown}: {e}")))?;
        f()
    })
    .join()
    .map_err(|_| Error::Netns("a thread in a pod's network namespace panicked".into()))?
}

/// The addresses of every interface in the calling thread's network namespace.
pub fn local_addresses() -> Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::Netns(format!("getifaddrs: {e}")))?;
    Ok(addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// Whether the namespace at `ns` has `ip` on one of its interfaces.
pub fn holds(ns: &Path, ip: IpAddr) -> Result<bool> {
    run_in(ns, move || Ok(local_addresses()?.contains(&ip)))
}

/// The network namespace of process `pid` under `proc_root`.
pub fn of_pid(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("ns/net")
}

/// The namespace identity (device and inode) of a `ns/net` path.
fn identity(ns: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(ns).ok().map(|m| (m.dev(), m.ino()))
}

/// Every distinct network namespace of the processes under `proc_root`, one
/// `/proc/PID/ns/net` path for each, the agent's own excluded.
pub fn all(proc_root: &Path) -> Vec<PathBuf> {
    let own = identity(Path::new("/proc/self/ns/net"));
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(proc_root) else { return out };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let ns = entry.path().join("ns/net");
        match identity(&ns) {
            Some(id) if Some(id) != own && seen.insert(id) => out.push(ns),
            _ => {}
        }
    }
    out
}

/// The network namespace holding `ip` among the processes under `proc_root`, when
/// exactly one does.
pub fn find_by_ip(proc_root: &Path, ip: IpAddr) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = all(proc_root).into_iter().filter(|ns| holds(ns, ip).unwrap_or(false)).collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Locate(format!("no network namespace on this node holds {ip}"))),
        n => {
            Err(Error::Locate(format!("{n} network namespaces on this node hold {ip}; cannot tell which is the pod's")))
        }
    }
}
