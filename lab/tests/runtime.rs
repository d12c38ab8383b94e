//! The lab's pods are real containers (containerd, runc and the CNI plugins, driven
//! through the CRI): what the agent and the tests rely on is checked from inside the
//! containers and on the node, and nothing is left once the lab is gone. Needs root.

use std::fs;
use std::path::Path;

use tpvpn_lab::pods::{APP_CONF, SECRET_VALUE};

fn mounts() -> String {
    fs::read_to_string("/proc/self/mountinfo").unwrap()
}

#[test]
fn pods_are_containers_with_the_kubelets_volumes_and_leave_nothing_behind() {
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    if !lab.start_pods_or_skip() {
        return;
    }
    let mut run = |cmd: &[&str]| {
        let (out, err, code) = lab.exec_in_container("web-0", cmd).unwrap();
        assert_eq!(code, 0, "{cmd:?}: {out}{err}");
        out
    };
    // Volumes as the kubelet lays them out, seen from inside the container.
    assert_eq!(run(&["cat", "/etc/config/app.conf"]), APP_CONF);
    assert_eq!(run(&["readlink", "/etc/config/app.conf"]).trim(), "..data/app.conf");
    assert!(run(&["readlink", "/etc/config/..data"]).starts_with("..20"), "a timestamped directory");
    assert_eq!(run(&["cat", "/etc/db/password"]), SECRET_VALUE);
    assert_eq!(run(&["cat", "/var/run/secrets/kubernetes.io/serviceaccount/namespace"]), "default");
    run(&["sh", "-c", "echo written > /var/scratch/out"]);
    let (_, _, code) = lab.exec_in_container("web-0", &["sh", "-c", "echo x > /etc/config/new"]).unwrap();
    assert_ne!(code, 0, "a configMap volume is read-only in the container");
    let pod_dir = lab.pod_dir("web-0");
    let scratch = pod_dir.join("volumes/kubernetes.io~empty-dir/scratch/out");
    assert_eq!(fs::read_to_string(&scratch).unwrap(), "written\n", "the emptyDir is the node's directory");
    // Secret and projected volumes are on tmpfs, never on the node's disk.
    for kind in ["kubernetes.io~secret/db", "kubernetes.io~projected/kube-api-access"] {
        let dir = pod_dir.join("volumes").join(kind).display().to_string();
        assert!(
            mounts().lines().any(|l| l.split(' ').nth(4) == Some(dir.as_str()) && l.contains(" - tmpfs ")),
            "{dir} is not a tmpfs"
        );
    }
    // The environment as containerd wrote it: the image's, then the container's.
    let (env, _, _) = lab.exec_in_container("web-0", &["env"]).unwrap();
    assert!(env.contains("NGINX_VERSION=1.22.1\n") && env.contains("GREETING="), "{env}");
    // The runtime's state, where the agent reads it.
    let id = lab.pod_container_id("web-0").unwrap().to_string();
    let bundle = lab.runtime_root().join("io.containerd.runtime.v2.task/k8s.io").join(&id);
    assert!(bundle.join("config.json").is_file() && bundle.join("init.pid").is_file(), "{}", bundle.display());

    // Gone with the lab: its mounts, the pods' namespaces, containerd, the cgroups.
    let dir = lab.dir().to_path_buf();
    let netns: Vec<String> = ["web-0", "web-1", "mesh-0"].iter().map(|p| lab.pod_ns(p).unwrap().to_string()).collect();
    let pid = fs::read_to_string(dir.join("containerd/containerd.pid")).unwrap();
    drop(lab);
    let prefix = format!("{}/", dir.display());
    assert!(!mounts().lines().any(|l| l.contains(&prefix)), "mounts left:\n{}", mounts());
    for ns in netns {
        assert!(!Path::new("/run/netns").join(&ns).exists(), "namespace {ns} left");
    }
    assert!(tpvpn_lab::process_gone(&pid), "containerd (pid {pid}) still runs");
    assert!(!dir.exists(), "{} left", dir.display());
}

/// The test's node namespace and runtime directory, removed on drop even when the test
/// fails half-way.
struct Node {
    ns: String,
    dir: std::path::PathBuf,
    cgroup: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        tpvpn_lab::runtime::remove_leftovers(&self.dir, &self.cgroup);
        let _ = fs::remove_dir_all(&self.dir);
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn a_runtime_whose_lab_died_is_removed_by_the_next_cleanup() {
    use tpvpn_lab::runtime::{ContainerSpec, Containerd, PodNetwork, SandboxSpec, PAUSE_IMAGE};
    if !tpvpn_lab::require_root() || !tpvpn_lab::runtime::available_or_skip() {
        return;
    }
    let id = format!("stale-{}", std::process::id());
    let node = Node {
        ns: format!("tpvpn-{id}-node"),
        dir: std::env::temp_dir().join(format!("tpvpn-{id}")),
        cgroup: format!("tpvpn-lab-{id}"),
    };
    assert!(std::process::Command::new("ip").args(["netns", "add", &node.ns]).status().unwrap().success());
    let (dir, cgroup) = (node.dir.clone(), node.cgroup.clone());
    let net = PodNetwork {
        bridge: "cni-stale".into(),
        subnet: "10.244.9.0/24".into(),
        gateway: "10.244.9.1".into(),
        range: ("10.244.9.10".into(), "10.244.9.20".into()),
    };
    let mut ctd = Containerd::start(&dir, &node.ns, &cgroup, &net).unwrap();
    let pod = SandboxSpec {
        name: "left".into(),
        namespace: "default".into(),
        uid: id.clone(),
        labels: Default::default(),
        log_dir: dir.join("pods/left"),
        cgroup_parent: format!("/{cgroup}"),
    };
    let cri = ctd.cri().unwrap();
    let sandbox = cri.run_pod(&pod).unwrap();
    let app = ContainerSpec {
        name: "app".into(),
        image: PAUSE_IMAGE.into(),
        command: vec!["/bin/sleep".into(), "600".into()],
        ..ContainerSpec::default()
    };
    let container = cri.start_container(&sandbox.id, &pod, &app).unwrap();
    // containerd's pid, the sandbox's and the container's first processes, and the shim
    // that is the parent of both.
    let tasks = ctd.state_dir().join("io.containerd.runtime.v2.task/k8s.io");
    assert!(tasks.join(&container).join("init.pid").is_file());
    let mut pids: Vec<String> = fs::read_dir(&tasks)
        .unwrap()
        .flatten()
        .filter_map(|b| fs::read_to_string(b.path().join("init.pid")).ok())
        .chain(fs::read_to_string(dir.join("containerd.pid")).ok())
        .collect();
    let shims: Vec<String> = pids
        .iter()
        .filter_map(|p| tpvpn_lab::runtime::shim_of(p.trim().parse().ok()?))
        .map(|p| p.to_string())
        .collect();
    assert_eq!((pids.len(), shims.len()), (3, 2), "{pids:?} {shims:?}");
    pids.extend(shims);
    // The lab dies: nothing of it runs its teardown.
    std::mem::forget(ctd);

    tpvpn_lab::runtime::remove_leftovers(&dir, &cgroup);
    for pid in &pids {
        assert!(
            tpvpn_lab::wait_until(std::time::Duration::from_secs(5), || tpvpn_lab::process_gone(pid)),
            "pid {pid} runs"
        );
    }
    let prefix = format!("{}/", dir.display());
    assert!(!mounts().lines().any(|l| l.contains(&prefix)), "mounts left:\n{}", mounts());
    assert!(!sandbox.netns.exists(), "{} left", sandbox.netns.display());
    let cached: Vec<_> = fs::read_dir(tpvpn_lab::runtime::CNI_CACHE)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&sandbox.id))
        .collect();
    assert!(cached.is_empty(), "the CNI's cached results for the sandbox are left: {cached:?}");
    let cgroups: Vec<_> = fs::read_dir("/sys/fs/cgroup").unwrap().flatten().map(|c| c.path().join(&cgroup)).collect();
    assert!(cgroups.iter().all(|c| !c.exists()), "cgroups left: {cgroups:?}");
}
