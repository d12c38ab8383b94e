//! Network namespaces of pods: held open ([`Ns`]), running work inside one (a thread
//! that joined it with `setns`; sockets it creates stay in that namespace, processes it
//! starts run there: [`run_in`] for one-off work, [`NsHandle`] for a pod's sockets), and
//! finding the namespace that holds an address.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sched::{setns, CloneFlags};

use crate::{Error, Result};

/// A network namespace held open: work can enter it for as long as this (or a clone)
/// lives, whatever becomes of the process it was found through. A pod's namespace
/// belongs to its sandbox, not to the app container: a container that restarts (a new
/// pid) leaves it in place, so a capture must never find it again by the old
/// `/proc/PID/ns/net` path. Holding it also keeps it alive after the pod is deleted,
/// until the capture lets go.
#[derive(Debug, Clone)]
pub struct Ns {
    file: Arc<File>,
    path: PathBuf,
}

impl Ns {
    /// Opens the namespace at `path` (a `/proc/PID/ns/net` path).
    pub fn open(path: &Path) -> Result<Ns> {
        let file = File::open(path).map_err(|e| Error::Netns(format!("cannot open {}: {e}", path.display())))?;
        Ok(Ns { file: Arc::new(file), path: path.to_path_buf() })
    }

    /// The path it was opened at (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Joins it, on the calling thread.
    fn enter(&self) -> std::result::Result<(), String> {
        setns(&*self.file, CloneFlags::CLONE_NEWNET).map_err(|e| format!("cannot enter {}: {e}", self.path.display()))
    }
}

/// Runs `f` on a new thread that first joins the network namespace `ns`. Blocking: call
/// it from `spawn_blocking`.
pub fn run_in<T: Send + 'static>(ns: &Ns, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let ns = ns.clone();
    std::thread::spawn(move || {
        ns.enter().map_err(Error::Netns)?;
        f()
    })
    .join()
    .map_err(|_| Error::Netns("a thread in a pod's network namespace panicked".into()))?
}

/// A thread that joined a pod's network namespace and stays there, running what must be
/// made inside it (the sockets of connections to the app) one after the other: one per
/// captured pod for as long as its capture and connections last, instead of a fresh
/// thread (and `setns`) per connection. It ends when the last handle is dropped.
pub struct NsHandle {
    jobs: std::sync::mpsc::Sender<Job>,
    ns: Ns,
}

type Job = Box<dyn FnOnce() + Send>;

impl NsHandle {
    /// Starts the thread in namespace `ns`. Blocking: call it from `spawn_blocking`.
    pub fn new(ns: &Ns) -> Result<NsHandle> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (joined_tx, joined) = std::sync::mpsc::sync_channel(1);
        let held = ns.clone();
        std::thread::Builder::new()
            .name("tpvpn-pod-ns".into())
            .spawn(move || {
                let entered = held.enter();
                drop(held);
                let ok = entered.is_ok();
                let _ = joined_tx.send(entered);
                if ok {
                    for job in queue {
                        job();
                    }
                }
            })
            .map_err(|e| Error::Netns(format!("cannot start a thread: {e}")))?;
        joined.recv().map_err(|_| Error::Netns("the namespace's thread ended".into()))?.map_err(Error::Netns)?;
        Ok(NsHandle { jobs, ns: ns.clone() })
    }

    /// The namespace.
    pub fn ns(&self) -> &Ns {
        &self.ns
    }

    /// Runs `f` on the namespace's thread.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || Error::Netns(format!("the thread in {} is gone", self.ns.path().display()));
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
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

/// Whether namespace `ns` has `ip` on one of its interfaces.
pub fn holds(ns: &Ns, ip: IpAddr) -> Result<bool> {
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
pub fn find_by_ip(proc_root: &Path, ip: IpAddr) -> Result<Ns> {
    let mut found: Vec<Ns> = all(proc_root)
        .into_iter()
        .filter_map(|path| Ns::open(&path).ok())
        .filter(|ns| holds(ns, ip).unwrap_or(false))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Locate(format!("no network namespace on this node holds {ip}"))),
        n => {
            Err(Error::Locate(format!("{n} network namespaces on this node hold {ip}; cannot tell which is the pod's")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent runs as root; so does CI. Joining one's own namespace needs
    /// `CAP_SYS_ADMIN` all the same: without it the handle says why.
    #[tokio::test]
    async fn a_namespace_thread_runs_every_job_on_one_thread_there() {
        let ns = Ns::open(Path::new("/proc/self/ns/net")).unwrap();
        let handle = match NsHandle::new(&ns) {
            Ok(h) => h,
            Err(e) => {
                assert!(e.to_string().contains("cannot enter"), "{e}");
                eprintln!("skipped: {e}");
                return;
            }
        };
        assert_eq!(handle.ns().path(), ns.path());
        let thread = handle.run(|| Ok(std::thread::current().id())).await.unwrap();
        assert_ne!(thread, std::thread::current().id(), "on a thread of its own");
        assert_eq!(handle.run(|| Ok(std::thread::current().id())).await.unwrap(), thread, "the same thread every time");
        let addrs = handle.run(local_addresses).await.unwrap();
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
        let failed = handle.run(|| Err::<(), _>(Error::Netns("no".into()))).await;
        assert!(failed.is_err(), "a job's error comes back");
        assert!(Ns::open(Path::new("/nonexistent/ns/net")).is_err());
    }
}
