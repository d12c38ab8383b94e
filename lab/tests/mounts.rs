//! `tpvpn intercept --mount DIR` on real containers: the intercepted container's volume
//! mounts on the laptop, live, read-only, never beyond them, gone with `leave`.
//!
//! The daemon mounts in its own mount namespace (the lab's `ip netns exec` gives each
//! process tree one), so the test reads the mount through `Lab::daemon_view`.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::Output;
use std::time::Duration;

use tpvpn_lab::pods::{APP_CONF, SECRET_VALUE};
use tpvpn_lab::{show, wait_until, Lab};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_pods_volumes_are_mounted_live_read_only_and_never_beyond() {
    if !Lab::fuse_or_skip() {
        return;
    }
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    // What the app has made in its emptyDir: a link up into the image, a FIFO nobody
    // writes, a file.
    let script = "ln -s ../../usr /var/scratch/up && mkfifo /var/scratch/fifo && echo fresh > /var/scratch/new";
    let (out, err, code) = lab.exec_in_container("web-0", &["sh", "-c", script]).unwrap();
    assert_eq!(code, 0, "{out}{err}");

    let dir = lab.dir().join("pod-files").display().to_string();
    let env_file = lab.dir().join("web.env").display().to_string();
    let out = lab.tpvpn_env(
        &["intercept", "web", "--port", "18888:http", "--mount", &dir, "--env-file", &env_file],
        &[],
        Duration::from_secs(40),
    );
    assert!(out.status.success(), "intercept --mount:\n{}", show(&out));
    let said = stdout(&out);
    assert!(said.contains(&format!("mounted at {dir}")) && said.contains("/etc/config"), "{said}");
    // On the shared token, Secret and token volumes are left out, and the line says why.
    assert!(said.contains("left out: /etc/db (Secret"), "{said}");
    assert!(fs::read_to_string(&env_file).unwrap().contains(&format!("TPVPN_ROOT={dir}")));
    assert!(lab.daemon_mounted(&dir), "the mount is in the daemon's table");

    let root = lab.daemon_view(&dir);
    // The configMap through the kubelet's `..data` symlinks, byte for byte.
    assert_eq!(fs::read_to_string(root.join("etc/config/app.conf")).unwrap(), APP_CONF);
    assert_eq!(fs::read_to_string(root.join("var/scratch/new")).unwrap(), "fresh\n");
    // Only the volumes: /etc holds config (not db: left out), the image's files none.
    let mut names: Vec<String> =
        fs::read_dir(root.join("etc")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["config"], "only the served volumes of /etc");
    assert_eq!(fs::read_to_string(root.join("etc/db/password")).map_err(|e| e.kind()), Err(ErrorKind::NotFound));
    assert!(!fs::read_to_string(root.join("etc/config/app.conf")).unwrap().contains(SECRET_VALUE));
    assert_eq!(fs::metadata(root.join("usr/sbin/nginx")).map_err(|e| e.kind()).err(), Some(ErrorKind::NotFound));
    assert!(fs::read_dir(root.join("var/scratch/up")).is_err(), "a link up into the image leads nowhere");
    // A FIFO is listed, and opening it fails at once instead of waiting for a writer.
    assert!(fs::symlink_metadata(root.join("var/scratch/fifo")).is_ok());
    assert!(fs::read(root.join("var/scratch/fifo")).is_err());
    // Read-only.
    assert!(fs::write(root.join("var/scratch/new"), "from the laptop").is_err());
    // Hostile names: a newline in one, one of 255 bytes (the most a name may have), one
    // that is not UTF-8 (Latin-1 `é`), a symlink to itself. Listed and read as they
    // are; the loop fails at once (ELOOP).
    let long = "n".repeat(255);
    let script = format!(
        "echo nl > \"/var/scratch/line$(printf '\\nbreak')\" && echo long > /var/scratch/{long} && ln -s loop /var/scratch/loop \
         && echo latin > \"/var/scratch/caf$(printf '\\351').txt\""
    );
    let (out, err, code) = lab.exec_in_container("web-0", &["sh", "-c", &script]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        wait_until(Duration::from_secs(2), || fs::read_dir(root.join("var/scratch"))
            .is_ok_and(|d| d.flatten().any(|e| e.file_name() == "line\nbreak"))),
        "the name with a newline is listed"
    );
    assert_eq!(fs::read_to_string(root.join("var/scratch/line\nbreak")).unwrap(), "nl\n");
    assert_eq!(fs::read_to_string(root.join("var/scratch").join(&long)).unwrap(), "long\n");
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    assert!(
        fs::read_dir(root.join("var/scratch")).unwrap().flatten().any(|e| e.file_name() == latin1),
        "the name that is not UTF-8 is listed with its own bytes"
    );
    assert_eq!(fs::read_to_string(root.join("var/scratch").join(latin1)).unwrap(), "latin\n");
    assert_eq!(fs::read_link(root.join("var/scratch/loop")).unwrap().to_str(), Some("loop"));
    assert_eq!(fs::read(root.join("var/scratch/loop")).map_err(|e| e.raw_os_error()), Err(Some(nix::libc::ELOOP)));

    // A file open on the laptop is the file opened, as for a process in the pod: replaced
    // in the pod meanwhile (a new file renamed over it), the open one still reads the
    // old bytes where the laptop had read nothing yet; the next open reads the new file.
    let fill = |c: char, to: &str| format!("head -c 3145728 /dev/zero | tr '\\0' {c} > {to}");
    let (out, err, code) = lab.exec_in_container("web-0", &["sh", "-c", &fill('a', "/var/scratch/big")]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let mut opened = fs::File::open(root.join("var/scratch/big")).unwrap();
    let mut head = [0u8; 4096];
    std::io::Read::read_exact(&mut opened, &mut head).unwrap();
    assert!(head.iter().all(|&b| b == b'a'));
    let replace = format!("{} && mv /var/scratch/big.new /var/scratch/big", fill('b', "/var/scratch/big.new"));
    let (out, err, code) = lab.exec_in_container("web-0", &["sh", "-c", &replace]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let mut tail = vec![0u8; 64 << 10];
    std::os::unix::fs::FileExt::read_exact_at(&opened, &mut tail, 5 << 19).unwrap();
    assert!(tail.iter().all(|&b| b == b'a'), "the open file read the replaced one's bytes");
    let again = fs::read(root.join("var/scratch/big")).unwrap();
    assert!(again.len() == 3 << 20 && again.iter().all(|&b| b == b'b'), "a new open reads the new file");
    std::os::unix::fs::FileExt::read_exact_at(&opened, &mut tail, 1 << 20).unwrap();
    assert!(tail.iter().all(|&b| b == b'a'), "the open file read the pages of the new one");
    drop(opened);
    // Such a file may still be mapped (shared), as programs reading files do.
    let map = "import mmap,sys; f=open(sys.argv[1],'rb'); sys.stdout.write(mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ)[:6].decode())";
    let mapped =
        std::process::Command::new("python3").args(["-c", map]).arg(root.join("var/scratch/new")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&mapped.stdout), "fresh\n", "{}", String::from_utf8_lossy(&mapped.stderr));

    // Live: what the app writes, and a ConfigMap update as the kubelet makes it.
    let (_, _, code) = lab.exec_in_container("web-0", &["sh", "-c", "echo later > /var/scratch/later"]).unwrap();
    assert_eq!(code, 0);
    assert!(
        wait_until(Duration::from_secs(2), || fs::read_to_string(root.join("var/scratch/later"))
            .is_ok_and(|t| t == "later\n")),
        "a file the app wrote appears within 2 s"
    );
    lab.update_config_volume("web-0", "config", &[("app.conf", "updated\n")]).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || fs::read_to_string(root.join("etc/config/app.conf"))
            .is_ok_and(|t| t == "updated\n")),
        "the configMap update shows"
    );

    // `leave` unmounts.
    let left = lab.tpvpn(&["leave", "web"]);
    assert!(left.status.success(), "{}", show(&left));
    assert!(!lab.daemon_mounted(&dir), "leave removed the mount");
}

/// What `cmd` prints in pod web-0's container (it must succeed).
fn in_pod(lab: &mut Lab, cmd: &str) -> String {
    let (out, err, code) = lab.exec_in_container("web-0", &["sh", "-c", cmd]).unwrap();
    assert_eq!(code, 0, "{cmd}: {out}{err}");
    out
}

/// The OS error of `r`, as the laptop's kernel gave it.
fn os_error<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn a_readwrite_mount_writes_into_the_pods_scratch_volume_and_nowhere_else() {
    if !Lab::fuse_or_skip() {
        return;
    }
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let dir = lab.dir().join("pod-files").display().to_string();
    let args = ["intercept", "web", "--port", "18888:http", "--mount", &dir, "--mount-readwrite"];
    let out = lab.tpvpn_env(&args, &[], Duration::from_secs(40));
    assert!(out.status.success(), "intercept --mount-readwrite:\n{}", show(&out));
    let said = stdout(&out);
    assert!(said.contains("/var/scratch (read-write)") && !said.contains("/etc/config (read-write)"), "{said}");
    let root = lab.daemon_view(&dir);

    // Made, appended to, moved into a new directory: the container sees each at once.
    let file = root.join("var/scratch/laptop.txt");
    fs::write(&file, "from the laptop\n").unwrap();
    assert_eq!(in_pod(&mut lab, "cat /var/scratch/laptop.txt"), "from the laptop\n");
    fs::OpenOptions::new().append(true).open(&file).unwrap().write_all(b"and more\n").unwrap();
    assert_eq!(in_pod(&mut lab, "cat /var/scratch/laptop.txt"), "from the laptop\nand more\n");
    fs::create_dir(root.join("var/scratch/sub")).unwrap();
    fs::rename(&file, root.join("var/scratch/sub/moved.txt")).unwrap();
    assert_eq!(in_pod(&mut lab, "ls /var/scratch/sub"), "moved.txt\n");
    assert_eq!(fs::read_to_string(root.join("var/scratch/sub/moved.txt")).unwrap(), "from the laptop\nand more\n");
    // Cut short, and its mode changed, as `truncate` and `chmod` do.
    let moved = fs::OpenOptions::new().write(true).open(root.join("var/scratch/sub/moved.txt")).unwrap();
    moved.set_len(4).unwrap();
    moved.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    drop(moved);
    assert_eq!(in_pod(&mut lab, "stat -c '%s %a' /var/scratch/sub/moved.txt"), "4 600\n");

    // A large file in many writes, byte for byte in the pod.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 123u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(root.join("var/scratch/big"), &data).unwrap();
    let local = lab.dir().join("big");
    fs::write(&local, &data).unwrap();
    let sum = |out: String| out.split_whitespace().next().unwrap_or_default().to_string();
    let here = std::process::Command::new("md5sum").arg(&local).output().unwrap();
    assert_eq!(sum(in_pod(&mut lab, "busybox md5sum /var/scratch/big")), sum(stdout(&here)));
    assert_eq!(fs::read(root.join("var/scratch/big")).unwrap(), data, "and read back");

    // Removed.
    fs::remove_file(root.join("var/scratch/sub/moved.txt")).unwrap();
    fs::remove_dir(root.join("var/scratch/sub")).unwrap();
    fs::remove_file(root.join("var/scratch/big")).unwrap();
    assert!(!in_pod(&mut lab, "ls /var/scratch").contains("sub"));

    // The configMap's volume stays read-only as in the pod (EROFS), and is unchanged.
    assert_eq!(os_error(fs::write(root.join("etc/config/app.conf"), "x")), Some(nix::libc::EROFS));
    assert_eq!(os_error(fs::write(root.join("etc/config/new"), "x")), Some(nix::libc::EROFS));
    assert_eq!(os_error(fs::remove_file(root.join("etc/config/app.conf"))), Some(nix::libc::EROFS));
    assert_eq!(in_pod(&mut lab, "cat /etc/config/app.conf"), APP_CONF);
    // The volume's own mount point is never removed, nor anything made above it.
    assert!(fs::remove_dir(root.join("var/scratch")).is_err());
    assert_eq!(os_error(fs::create_dir(root.join("var/evil"))), Some(nix::libc::EROFS));

    let left = lab.tpvpn(&["leave", "web"]);
    assert!(left.status.success(), "{}", show(&left));
    assert!(!lab.daemon_mounted(&dir), "leave removed the mount");
}

#[test]
fn the_mount_moves_to_another_pod_when_its_pod_is_deleted() {
    if !Lab::fuse_or_skip() {
        return;
    }
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    for pod in ["web-0", "web-1"] {
        let (out, err, code) = lab
            .exec_in_container(
                pod,
                &[
                    "sh",
                    "-c",
                    &format!("echo {pod} > /var/scratch/who && head -c 262144 /dev/zero > /var/scratch/zeros"),
                ],
            )
            .unwrap();
        assert_eq!(code, 0, "{out}{err}");
    }
    let dir = lab.dir().join("pod-files").display().to_string();
    let out =
        lab.tpvpn_env(&["intercept", "web", "--port", "18888:http", "--mount", &dir], &[], Duration::from_secs(40));
    assert!(out.status.success(), "{}", show(&out));
    assert!(stdout(&out).contains("files of pod default/web-0"), "the first captured pod by name: {}", show(&out));
    let who = lab.daemon_view(&dir).join("var/scratch/who");
    assert_eq!(fs::read_to_string(&who).unwrap(), "web-0\n");
    let open_on_web0 = fs::File::open(who.with_file_name("zeros")).unwrap();

    // Its pod deleted: reads fail at once (never hang) until the mount is served by the
    // pod that is left.
    lab.delete_pod("web-0").unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || fs::read_to_string(&who).is_ok_and(|t| t == "web-1\n")),
        "the mount did not move to web-1:\n{}",
        lab.agent_log()
    );
    assert!(lab.daemon_mounted(&dir));
    // A file opened in web-0 is not web-1's file of the same name: ESTALE (past the
    // bytes that came with the open).
    let mut buf = [0u8; 16];
    let stale = std::os::unix::fs::FileExt::read_at(&open_on_web0, &mut buf, 200_000).map_err(|e| e.raw_os_error());
    assert_eq!(stale, Err(Some(nix::libc::ESTALE)), "read through a file opened in the deleted pod");
}

#[test]
fn a_large_file_and_a_large_directory_are_read_whole() {
    if !Lab::fuse_or_skip() {
        return;
    }
    let Some(lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    // Made as the app would, in its emptyDir (the node's directory the container sees).
    let node = lab.pod_volume_dir("web-0", "scratch").unwrap();
    let big: Vec<u8> = (0..256u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(node.join("big"), &big).unwrap();
    fs::create_dir(node.join("many")).unwrap();
    for i in 0..10_000 {
        fs::write(node.join("many").join(format!("entry-{i:05}")), i.to_string()).unwrap();
    }
    let dir = lab.dir().join("pod-files").display().to_string();
    let out =
        lab.tpvpn_env(&["intercept", "web", "--port", "18888:http", "--mount", &dir], &[], Duration::from_secs(40));
    assert!(out.status.success(), "{}", show(&out));
    let root = lab.daemon_view(&dir).join("var/scratch");

    let read = fs::read(root.join("big")).unwrap();
    assert!(read.len() == big.len() && read == big, "256 MiB read whole and exact ({} bytes)", read.len());
    let mut names: Vec<String> =
        fs::read_dir(root.join("many")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names.len(), 10_000, "every entry listed once");
    assert_eq!((names[0].as_str(), names[9_999].as_str()), ("entry-00000", "entry-09999"));
    assert_eq!(fs::read_to_string(root.join("many/entry-04242")).unwrap(), "4242");
}

#[test]
fn a_killed_daemons_mount_is_mounted_again_by_the_next_up_and_removed_by_down() {
    if !Lab::fuse_or_skip() {
        return;
    }
    let Some(mut lab) = tpvpn_lab::lab_with_pods_or_skip() else { return };
    lab.start_laptop_web(18888, "answered by the laptop\n").unwrap();
    let dir = lab.dir().join("pod-files").display().to_string();
    let out =
        lab.tpvpn_env(&["intercept", "web", "--port", "18888:http", "--mount", &dir], &[], Duration::from_secs(40));
    assert!(out.status.success(), "intercept --mount:\n{}", show(&out));
    // The daemon's mount namespace outlives it, as a laptop's does.
    let hold = lab.hold_daemon_mounts().unwrap();
    assert!(hold.mounted(&dir));
    let conf = format!("/proc/{}/root{dir}/etc/config/app.conf", hold.pid());
    let kill_daemon = || {
        let pid = fs::read_to_string(lab.runtime_dir().join("tpvpn.pid")).unwrap();
        assert!(lab.exec(lab.laptop(), &["kill", "-9", pid.trim()]).status.success());
        assert!(wait_until(Duration::from_secs(5), || tpvpn_lab::process_gone(&pid)), "daemon survived kill -9");
        assert!(hold.mounted(&dir), "SIGKILL leaves the mount behind, dead");
        // A name never looked up (what was, the kernel may still answer for 1 s).
        let unseen = format!("/proc/{}/root{dir}/etc/unseen-{}", hold.pid(), pid.trim());
        let dead = fs::metadata(unseen).map_err(|e| e.raw_os_error());
        assert_eq!(dead.err(), Some(Some(nix::libc::ENOTCONN)), "nobody answers it");
    };

    // The next `up` removes the dead mount, re-claims the intercept and mounts its files
    // again in the same place (once the manager let the killed daemon's connection go).
    kill_daemon();
    let up_args = lab.up_args();
    let up = lab.tpvpn_in(&hold, &up_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(up.status.success(), "{}", show(&up));
    assert!(
        wait_until(Duration::from_secs(45), || fs::read_to_string(&conf).is_ok_and(|t| t == APP_CONF)),
        "the files were not mounted again:\n{}",
        fs::read_to_string(lab.runtime_dir().join("tpvpn.log")).unwrap_or_default()
    );
    assert_eq!(hold.mounted_count(&dir), 1, "one mount there, not the dead one beneath a new one");

    // `down` after another SIGKILL removes it, and its record.
    kill_daemon();
    let down = lab.tpvpn_in(&hold, &["down"]);
    assert!(down.status.success(), "{}", show(&down));
    assert!(!hold.mounted(&dir), "down removed the mount the killed daemon left");
    assert!(!lab.runtime_dir().join("mounts.json").exists(), "and its record");
}
