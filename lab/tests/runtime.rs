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

#[test]
fn a_containers_volumes_are_read_through_its_root_and_never_beyond() {
    use tpvpn_agent::files::{FileError, Kind, Volumes};
    let Some(mut lab) = tpvpn_lab::lab_or_skip() else { return };
    if !lab.start_pods_or_skip() {
        return;
    }
    // What the app may make in its emptyDir: a link to a file only the node has, one up
    // into the image, a FIFO nobody writes.
    let node_only = lab.dir().join("node-only");
    fs::write(&node_only, "the node's own\n").unwrap();
    let script = format!(
        "ln -s {} /var/scratch/node && ln -s ../../etc /var/scratch/up && mkfifo /var/scratch/fifo && echo fresh > /var/scratch/new",
        node_only.display()
    );
    let (out, err, code) = lab.exec_in_container("web-0", &["sh", "-c", &script]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let id = lab.pod_container_id("web-0").unwrap().to_string();
    let pid =
        fs::read_to_string(lab.runtime_root().join("io.containerd.runtime.v2.task/k8s.io").join(&id).join("init.pid"))
            .unwrap();
    let root = Path::new("/proc").join(pid.trim()).join("root");
    let mounts = ["/etc/config", "/etc/db", "/var/scratch", "/var/run/secrets/kubernetes.io/serviceaccount"];
    let v = Volumes::open(&root, &mounts, &["/var/scratch"]).unwrap();

    // The kubelet's layout, followed as a reader of a mount follows it.
    let listed: Vec<(String, Kind)> =
        v.read_dir("/etc/config").unwrap().into_iter().map(|(n, a)| (n, a.kind)).collect();
    assert!(
        listed.contains(&("app.conf".into(), Kind::Symlink)) && listed.contains(&("..data".into(), Kind::Symlink)),
        "{listed:?}"
    );
    assert_eq!(v.readlink("/etc/config/app.conf").unwrap(), "..data/app.conf");
    let stamp = v.readlink("/etc/config/..data").unwrap();
    assert_eq!(v.read(&format!("/etc/config/{stamp}/app.conf"), 0, 4096).unwrap(), APP_CONF.as_bytes());
    assert_eq!(v.read("/var/scratch/new", 0, 4096).unwrap(), b"fresh\n", "what the app just wrote");
    let names: Vec<String> = v.read_dir("/etc").unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["config", "db"], "only the volumes of /etc, never the image's files");

    // Never beyond: not the node's file, not the image's, not a FIFO.
    assert!(matches!(v.read("/var/scratch/node", 0, 64), Err(FileError::NotRegular(_))), "a symlink is not followed");
    let target = v.readlink("/var/scratch/node").unwrap();
    assert!(matches!(v.read(&target, 0, 64), Err(FileError::OutsideVolumes(_))), "{target} is the node's");
    assert!(matches!(v.read("/var/scratch/up/passwd", 0, 64), Err(FileError::Symlink(_))));
    assert!(matches!(v.read("/usr/sbin/nginx", 0, 64), Err(FileError::OutsideVolumes(_))));
    assert!(matches!(v.read("/var/scratch/fifo", 0, 64), Err(FileError::NotRegular(_))), "a FIFO is never opened");
    assert_eq!(v.stat("/var/scratch/fifo").unwrap().kind, Kind::Other, "but listed");

    // Writes (`--mount-readwrite`): into the emptyDir, where the container sees them at
    // once; never through its links, never into the configMap's volume.
    v.create("/var/scratch/from-laptop", 0o640).unwrap();
    v.write("/var/scratch/from-laptop", 0, b"written on the laptop\n").unwrap();
    let (seen, _, _) = lab.exec_in_container("web-0", &["cat", "/var/scratch/from-laptop"]).unwrap();
    assert_eq!(seen, "written on the laptop\n");
    v.rename("/var/scratch/from-laptop", "/var/scratch/moved").unwrap();
    let (seen, _, _) = lab.exec_in_container("web-0", &["ls", "/var/scratch"]).unwrap();
    assert!(seen.contains("moved") && !seen.contains("from-laptop"), "{seen}");
    assert!(matches!(v.create("/var/scratch/up/passwd", 0o644), Err(FileError::Symlink(_))));
    assert!(matches!(v.write("/var/scratch/node", 0, b"x"), Err(FileError::NotRegular(_))));
    assert!(matches!(v.create("/var/scratch/node", 0o644), Err(FileError::Sys(_, nix::errno::Errno::EEXIST))));
    assert_eq!(fs::read_to_string(&node_only).unwrap(), "the node's own\n", "the node's file untouched");
    let conf = format!("/etc/config/{stamp}/app.conf");
    assert!(matches!(v.write(&conf, 0, b"x"), Err(FileError::ReadOnly(_))));
    assert!(matches!(v.create("/etc/config/new", 0o644), Err(FileError::ReadOnly(_))));
    assert!(matches!(v.remove("/var/scratch", true), Err(FileError::MountPoint(_))));
    v.remove("/var/scratch/moved", false).unwrap();

    // A ConfigMap update as the kubelet makes it: `..data` swapped to a new directory.
    lab.update_config_volume("web-0", "config", &[("app.conf", "updated\n")]).unwrap();
    let now = v.readlink("/etc/config/..data").unwrap();
    assert_ne!(now, stamp);
    assert_eq!(v.read(&format!("/etc/config/{now}/app.conf"), 0, 4096).unwrap(), b"updated\n");
    assert!(v.read(&format!("/etc/config/{stamp}/app.conf"), 0, 4096).is_err(), "the old directory is gone");
    let (seen, _, _) = lab.exec_in_container("web-0", &["cat", "/etc/config/app.conf"]).unwrap();
    assert_eq!(seen, "updated\n", "and the container sees the update");
}
