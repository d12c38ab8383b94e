//! The container runtime's files on the node: where a container's OCI bundle lives (its
//! `config.json` and the pid of its first process), from the id in the Pod's
//! `status.containerStatuses[].containerID` (`containerd://ID`, `cri-o://ID`,
//! `docker://ID`).
//!
//! The bundle's `config.json` holds `process.env` exactly as the kubelet resolved it
//! (`valueFrom` read, `$(VAR)` expanded) and as the runtime started the process with,
//! which `/proc/PID/environ` does not always keep: a process that sets its title (nginx)
//! overwrites its own environ. So the environment comes from `config.json`, and
//! `/proc/PID/environ` only when no bundle is found.
//!
//! Layouts read under each runtime root (`--runtime-root`):
//! - containerd: `io.containerd.runtime.v2.task/k8s.io/ID/{config.json,init.pid}`
//!   (roots `/run/containerd`, and `/run/docker/containerd/daemon` with namespace `moby`);
//! - CRI-O: `overlay-containers/ID/userdata/{config.json,pidfile}` (root
//!   `/run/containers/storage`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// The default runtime roots of a node.
pub const DEFAULT_ROOTS: &[&str] = &["/run/containerd", "/run/containers/storage", "/run/docker/containerd/daemon"];

/// One container's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub dir: PathBuf,
    pub pid_file: PathBuf,
}

/// The container id without its runtime scheme.
pub fn bare_id(container_id: &str) -> &str {
    container_id.split_once("://").map_or(container_id, |(_, id)| id)
}

/// Bundle directories to try for `id` under `root`, with their pid files.
fn candidates(root: &Path, id: &str) -> Vec<Bundle> {
    let mut out = Vec::new();
    for ns in ["k8s.io", "moby"] {
        let dir = root.join("io.containerd.runtime.v2.task").join(ns).join(id);
        out.push(Bundle { pid_file: dir.join("init.pid"), dir });
    }
    let dir = root.join("overlay-containers").join(id).join("userdata");
    out.push(Bundle { pid_file: dir.join("pidfile"), dir });
    out
}

/// The bundle of container `container_id` under the first root that has it.
pub fn find(roots: &[PathBuf], container_id: &str) -> Option<Bundle> {
    let id = bare_id(container_id);
    if id.is_empty() || id.contains('/') || id.contains("..") {
        return None;
    }
    roots.iter().flat_map(|r| candidates(r, id)).find(|b| b.dir.join("config.json").is_file())
}

/// Every container bundle under `roots` (for removing what an earlier agent left).
pub fn all(roots: &[PathBuf]) -> Vec<Bundle> {
    let mut out = Vec::new();
    for root in roots {
        for (parent, pid_name, userdata) in [
            (root.join("io.containerd.runtime.v2.task/k8s.io"), "init.pid", false),
            (root.join("io.containerd.runtime.v2.task/moby"), "init.pid", false),
            (root.join("overlay-containers"), "pidfile", true),
        ] {
            let Ok(dir) = std::fs::read_dir(&parent) else { continue };
            for e in dir.flatten() {
                let dir = if userdata { e.path().join("userdata") } else { e.path() };
                if dir.join("config.json").is_file() {
                    out.push(Bundle { pid_file: dir.join(pid_name), dir });
                }
            }
        }
    }
    out
}

impl Bundle {
    /// The pid of the container's first process.
    pub fn pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(&self.pid_file)
            .map_err(|e| Error::Locate(format!("cannot read {}: {e}", self.pid_file.display())))?;
        text.trim().parse().map_err(|_| Error::Locate(format!("{} holds no pid", self.pid_file.display())))
    }

    /// `process.env` of the bundle's `config.json`.
    pub fn env(&self) -> Result<Vec<(String, String)>> {
        let path = self.dir.join("config.json");
        let text = std::fs::read(&path).map_err(|e| Error::Env(format!("cannot read {}: {e}", path.display())))?;
        let config: Value =
            serde_json::from_slice(&text).map_err(|e| Error::Env(format!("{} is not JSON: {e}", path.display())))?;
        let env = config
            .pointer("/process/env")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::Env(format!("{} has no process.env", path.display())))?;
        Ok(env.iter().filter_map(Value::as_str).filter_map(split_var).collect())
    }
}

/// The longest variable value reported to the manager, and the most bytes of names and
/// values in all: what the `CaptureStatus` frame (1 MiB, strings of 64 KiB) and the
/// client's `InterceptReply` carry with room to spare.
pub const MAX_VALUE: usize = 32 * 1024;
pub const MAX_TOTAL: usize = 512 * 1024;

/// `env` within [`MAX_VALUE`] per value (names within 1 KiB) and [`MAX_TOTAL`] in all, in
/// order; the note for the user when variables were left out.
pub fn bounded(env: Vec<(String, String)>) -> (Vec<(String, String)>, Option<String>) {
    let mut total = 0;
    let mut left_out = Vec::new();
    let mut kept = Vec::new();
    for (k, v) in env {
        let size = k.len() + v.len();
        if k.len() > 1024 || v.len() > MAX_VALUE || total + size > MAX_TOTAL {
            left_out.push(k.chars().take(64).collect::<String>());
        } else {
            total += size;
            kept.push((k, v));
        }
    }
    let note = (!left_out.is_empty()).then(|| {
        format!(
            "{} environment variables too large to copy (over {} KiB each, or {} KiB in all): {}",
            left_out.len(),
            MAX_VALUE / 1024,
            MAX_TOTAL / 1024,
            left_out.join(", ")
        )
    });
    (kept, note)
}

/// `NAME=VALUE` into its parts (a value may contain `=`).
fn split_var(var: &str) -> Option<(String, String)> {
    let (k, v) = var.split_once('=')?;
    (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
}

/// A process of container `container_id` (`containerd://ID`): the first under
/// `proc_root` whose cgroup path names the id (cgroup v1 and v2, the runtimes' `cri-
/// containerd-ID.scope`, `crio-ID.scope`, `/kubepods/.../ID` alike). None for an id too
/// short to be one.
pub fn pid_of_container(proc_root: &Path, container_id: &str) -> Option<u32> {
    let id = bare_id(container_id);
    if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut pids: Vec<u32> =
        std::fs::read_dir(proc_root).ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    pids.into_iter().find(|pid| {
        std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).is_ok_and(|c| c.contains(id))
    })
}

/// The environment of process `pid` from `/proc/PID/environ` (incomplete for processes
/// that rewrite their title).
pub fn proc_environ(proc_root: &Path, pid: u32) -> Result<Vec<(String, String)>> {
    let path = proc_root.join(pid.to_string()).join("environ");
    let bytes = std::fs::read(&path).map_err(|e| Error::Env(format!("cannot read {}: {e}", path.display())))?;
    Ok(bytes.split(|b| *b == 0).filter_map(|v| std::str::from_utf8(v).ok()).filter_map(split_var).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_containers_process_is_found_by_its_cgroup() {
        let root = std::env::temp_dir().join(format!("tpvpn-agent-proc-{}", std::process::id()));
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for (pid, cgroup) in [
            ("7", "0::/kubepods/besteffort/podX/cri-containerd-ffff000011112222.scope\n"),
            ("12", &format!("0::/kubepods/besteffort/podX/cri-containerd-{id}.scope\n")),
            ("30", &format!("12:memory:/kubepods/podX/{id}\n")),
        ] {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("cgroup"), cgroup).unwrap();
        }
        std::fs::create_dir_all(root.join("self")).unwrap();
        assert_eq!(pid_of_container(&root, &format!("containerd://{id}")), Some(12));
        assert_eq!(pid_of_container(&root, "containerd://aaaabbbbccccdddd"), None);
        assert_eq!(pid_of_container(&root, ""), None, "no id: no process, never the namespace's first");
        assert_eq!(pid_of_container(&root, "containerd://1"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn large_environments_are_bounded_with_a_note() {
        let var = |k: &str, n: usize| (k.to_string(), "x".repeat(n));
        let (kept, note) = bounded(vec![var("A", 10), var("BIG", MAX_VALUE + 1), var("B", MAX_VALUE)]);
        assert_eq!(kept.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["A", "B"]);
        assert!(note.unwrap().contains(": BIG"));
        let many: Vec<_> = (0..20).map(|i| var(&format!("V{i:02}"), MAX_VALUE - 3)).collect();
        let (kept, note) = bounded(many);
        assert_eq!(kept.len(), 16, "16 fill {MAX_TOTAL} bytes");
        assert!(kept.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= MAX_TOTAL);
        assert!(note.unwrap().starts_with("4 environment variables too large"));
        assert_eq!(bounded(vec![var("A", 1)]).1, None);
    }

    #[test]
    fn bundles_are_found_by_container_id_and_read() {
        let root = std::env::temp_dir().join(format!("tpvpn-agent-runtime-{}", std::process::id()));
        let dir = root.join("io.containerd.runtime.v2.task/k8s.io/abc123");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("init.pid"), "4242\n").unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion":"1.1.0","process":{"env":["PATH=/usr/bin","GREETING=hello world","URL=http://a/?x=1","=bad","NOEQUALS"]}}"#,
        )
        .unwrap();
        let roots = vec![PathBuf::from("/nonexistent"), root.clone()];
        let b = find(&roots, "containerd://abc123").expect("found");
        assert_eq!(b.pid().unwrap(), 4242);
        assert_eq!(
            b.env().unwrap(),
            vec![
                ("PATH".to_string(), "/usr/bin".to_string()),
                ("GREETING".into(), "hello world".into()),
                ("URL".into(), "http://a/?x=1".into())
            ]
        );
        assert!(find(&roots, "containerd://other").is_none());
        assert!(find(&roots, "containerd://../k8s.io/abc123").is_none(), "no path tricks");
        assert_eq!(all(&roots), vec![b]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn environ_of_this_process() {
        let env = proc_environ(Path::new("/proc"), std::process::id()).unwrap();
        assert!(env.iter().any(|(k, _)| k == "PATH"), "{env:?}");
    }
}
