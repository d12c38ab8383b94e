//! The node's container runtime, real: a private containerd per lab (Debian's
//! `containerd`, `runc` and CNI plugins), in the node's network namespace, with its own
//! root, state, socket and cgroup parent, driven through the CRI as a kubelet drives it
//! ([`cri`]), running images the lab builds from this machine's packages ([`image`]).
//!
//! What stays a stand-in is the kubelet's sequencing: the lab decides when to make the
//! CRI calls, resolves the environment and lays out volumes itself ([`crate::pods`]).
//!
//! Pitfalls of this machine, from `../shared/reviews/2026-12-06.md` part D: the pause
//! container's OOM score needs CAP_SYS_RESOURCE, which the VM drops
//! (`restrict_oom_score_adj`); the default sandbox image is on a registry (a local one
//! is imported); CNI binaries live in `/usr/lib/cni` on Debian.

pub mod cri;
pub mod image;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use cri::{ContainerSpec, Cri, Sandbox, SandboxSpec, State};
pub use image::ImageSpec;

/// The containerd namespace the CRI keeps its pods in.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The sandbox ("pause") image every pod starts with.
pub const PAUSE_IMAGE: &str = "lab.local/pause:1";
/// Where containerd's CNI library caches the plugins' results (not configurable in 1.6).
pub const CNI_CACHE: &str = "/var/lib/cni/results";
/// Where Debian's containernetworking-plugins are.
const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The pod network the CNI `bridge` and `host-local` plugins give pods on this node.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// The bridge device in the node's namespace.
    pub bridge: String,
    pub subnet: String,
    pub gateway: String,
    /// The addresses handed out, first to last.
    pub range: (String, String),
}

/// A running private containerd.
pub struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
    cri: Option<Cri>,
    cgroup_parent: String,
}

impl Containerd {
    /// Starts containerd under `dir` in network namespace `node_ns` (the CNI plugins it
    /// runs make the pods' network there), with pods in cgroup `/<cgroup_parent>`, and
    /// imports the pause image. Ready in about a second.
    pub fn start(dir: &Path, node_ns: &str, cgroup_parent: &str, net: &PodNetwork) -> Result<Containerd> {
        if let Some(why) = unavailable() {
            bail!("{why}");
        }
        for sub in ["root", "state", "opt", "cni-conf", "cni-ipam", "images", "pods"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::write(dir.join("config.toml"), config_toml(dir))?;
        fs::write(dir.join("cni-conf/10-lab.conflist"), conflist(dir, net).to_string())?;
        let log = fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node_ns}"))
            .arg("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        fs::write(dir.join("containerd.pid"), child.id().to_string())?;
        let mut ctd =
            Containerd { dir: dir.to_path_buf(), child: Some(child), cri: None, cgroup_parent: cgroup_parent.into() };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if ctd.socket().exists() {
                if let Ok(mut cri) = Cri::connect(&ctd.socket()) {
                    if cri.version().is_ok() {
                        ctd.cri = Some(cri);
                        break;
                    }
                }
            }
            if let Some(Ok(Some(st))) = ctd.child.as_mut().map(Child::try_wait) {
                bail!("containerd exited ({st}):\n{}", ctd.log());
            }
            if Instant::now() >= deadline {
                bail!("containerd does not answer on {} after 15 s:\n{}", ctd.socket().display(), ctd.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let pause = ImageSpec {
            name: PAUSE_IMAGE.into(),
            env: vec!["PATH=/bin".into()],
            cmd: vec!["/bin/sleep".into(), "2147483647".into()],
            ..ImageSpec::default()
        };
        ctd.import(&pause)?;
        Ok(ctd)
    }

    /// containerd's socket (CRI and containerd's own API).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Its state directory: what a node agent reads as the runtime root
    /// (`io.containerd.runtime.v2.task/k8s.io/ID/{config.json,init.pid}`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Where the lab keeps the pods' own files (logs, volumes).
    pub fn pods_dir(&self) -> PathBuf {
        self.dir.join("pods")
    }

    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The CRI client.
    pub fn cri(&mut self) -> Result<&mut Cri> {
        self.cri.as_mut().context("containerd is stopped")
    }

    /// Builds `spec` and imports it into the CRI's namespace (`ctr images import`).
    pub fn import(&self, spec: &ImageSpec) -> Result<()> {
        let file = self.dir.join("images").join(format!("{}.tar", spec.name.replace(['/', ':'], "_")));
        image::write(spec, &file)?;
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", K8S_NAMESPACE, "images", "import"])
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!("ctr images import {} failed: {}", spec.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Every pod removed through the CRI, then containerd stopped (SIGTERM), then
    /// whatever it could not remove: shims and containers by the pids it recorded, mounts
    /// under its directories, its cgroups.
    pub fn stop(&mut self) {
        if let Some(cri) = self.cri.as_mut() {
            for id in cri.sandboxes().unwrap_or_default() {
                if let Err(e) = cri.remove_pod(&id) {
                    eprintln!("tpvpn-lab: removing pod sandbox {id}: {e:#}");
                }
            }
        }
        self.cri = None;
        if let Some(child) = self.child.take() {
            crate::terminate(child);
        }
        remove_leftovers(&self.dir, &self.cgroup_parent);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a containerd under `dir` may have left when it or its lab died: the processes it
/// started (the containers' recorded pids, and their shims), mounts under `dir`, the CNI
/// results cached for its sandboxes, the sandboxes'
/// network namespace files, cgroup `/<cgroup_parent>`.
pub fn remove_leftovers(dir: &Path, cgroup_parent: &str) {
    if let Some(pid) = fs::read_to_string(dir.join("containerd.pid")).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "containerd" {
            crate::sys::signal(pid, crate::sys::SIGKILL);
        }
    }
    let tasks = dir.join("state/io.containerd.runtime.v2.task").join(K8S_NAMESPACE);
    let mut netns = Vec::new();
    for bundle in fs::read_dir(&tasks).into_iter().flatten().flatten().map(|e| e.path()) {
        // The CNI plugins' cached results for the sandbox (libcni's, machine-wide).
        if let Some(id) = bundle.file_name().and_then(|n| n.to_str()) {
            for cached in fs::read_dir(CNI_CACHE).into_iter().flatten().flatten() {
                if cached.file_name().to_string_lossy().contains(&format!("-{id}-")) {
                    let _ = fs::remove_file(cached.path());
                }
            }
        }
        if let Some(pid) = fs::read_to_string(bundle.join("init.pid")).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
            // Its shim first (which would restart nothing, but must not outlive it).
            for p in shim_of(pid).into_iter().chain([pid]) {
                if !crate::process_gone(&p.to_string()) {
                    crate::sys::signal(p, crate::sys::SIGKILL);
                }
            }
        }
        let spec: Value = fs::read(bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if let Some(p) = spec["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
        {
            if p.starts_with("/var/run/netns/cni-") || p.starts_with("/run/netns/cni-") {
                netns.push(PathBuf::from(p));
            }
        }
    }
    let prefix = dir.to_string_lossy().into_owned() + "/";
    let mut mounts: Vec<PathBuf> =
        mount_points().into_iter().filter(|m| m.starts_with(&prefix)).map(PathBuf::from).collect();
    mounts.extend(netns);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        if m.starts_with("/var/run/netns") || m.starts_with("/run/netns") {
            let _ = fs::remove_file(&m);
        }
    }
    // The containers' cgroups under the parent first (runc removes them on `delete`,
    // which a dead lab never ran); a killed process may take a moment to leave its own.
    // cgroup v2 (the root itself) and v1 (one hierarchy per controller).
    let roots = fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten().map(|c| c.path());
    for root in std::iter::once(PathBuf::from("/sys/fs/cgroup")).chain(roots) {
        let cgroup = root.join(cgroup_parent);
        for _ in 0..50 {
            if remove_cgroup(&cgroup) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes cgroup `dir` and those below it; whether it is gone.
fn remove_cgroup(dir: &Path) -> bool {
    for sub in fs::read_dir(dir).into_iter().flatten().flatten() {
        if sub.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&sub.path());
        }
    }
    let _ = fs::remove_dir(dir);
    !dir.exists()
}

/// Why containers cannot run here, if they cannot: a package missing, no cgroup
/// filesystem, not root.
pub fn unavailable() -> Option<String> {
    for (bin, pkg) in [("containerd", "containerd"), ("runc", "runc"), ("ctr", "containerd"), ("nsenter", "util-linux")]
    {
        if !on_path(bin) {
            return Some(format!("{bin} is not installed (Debian package {pkg}; scripts/install-deps.sh installs it)"));
        }
    }
    if !Path::new(CNI_BIN_DIR).join("bridge").exists() {
        return Some("the CNI plugins are not installed (Debian package containernetworking-plugins)".into());
    }
    if fs::read_dir("/sys/fs/cgroup").map_or(true, |mut d| d.next().is_none()) {
        return Some("no cgroup filesystem at /sys/fs/cgroup".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("containers need root".into());
    }
    None
}

/// For tests: whether containers can run here; where they cannot, says so loudly (the
/// test is skipped), except under CI (`CI` set), which must run them: that fails.
pub fn available_or_skip() -> bool {
    let Some(why) = unavailable() else { return true };
    assert!(std::env::var_os("CI").is_none(), "CI must run the tests with real containers, and cannot: {why}");
    eprintln!("SKIPPED: this test needs real containers: {why}");
    false
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// The containerd shim that started process `pid` (its parent, when that is a shim).
pub fn shim_of(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ppid: u32 = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim().parse().ok()?;
    let comm = fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
    comm.starts_with("containerd-shim").then_some(ppid)
}

/// Unmounts everything mounted under `dir` (deepest first).
pub fn unmount_under(dir: &Path) {
    let prefix = dir.to_string_lossy().into_owned() + "/";
    let mut mounts: Vec<PathBuf> =
        mount_points().into_iter().filter(|m| m.starts_with(&prefix)).map(PathBuf::from).collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Mount points of this mount namespace (`/proc/self/mountinfo`, octal escapes undone).
fn mount_points() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\"))
        .collect()
}

fn config_toml(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{CNI_BIN_DIR}"
      conf_dir = "{d}/cni-conf"
      max_conf_num = 1
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"
"#
    )
}

fn conflist(dir: &Path, net: &PodNetwork) -> Value {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "lab-pods",
        "plugins": [{"type": "bridge", "bridge": net.bridge, "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "dataDir": dir.join("cni-ipam"), "routes": [{"dst": "0.0.0.0/0"}],
                "ranges": [[{"subnet": net.subnet, "gateway": net.gateway,
                    "rangeStart": net.range.0, "rangeEnd": net.range.1}]]}}]
    })
}
