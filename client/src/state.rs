//! What the daemon changed on the system, kept in `TPVPN_RUNTIME_DIR` so that every change
//! can be undone: by the daemon itself on `down` and on signals, and by the next
//! `tpvpn up` or `tpvpn down` after a crash.

use std::io::Write;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::os::routes;
use crate::Error;

/// Default runtime directory.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/tpvpn";

/// The runtime directory: `TPVPN_RUNTIME_DIR`, else [`DEFAULT_RUNTIME_DIR`].
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("TPVPN_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(|| DEFAULT_RUNTIME_DIR.into())
}

/// Files in the runtime directory.
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(dir: PathBuf) -> Self {
        Paths { dir }
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("tpvpn.sock")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("tpvpn.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("tpvpn.log")
    }
    /// Where the daemon mounted intercepts' files (`intercept --mount`), kept so that
    /// the next `up` or `down` unmounts what a crash left.
    pub fn mounts(&self) -> PathBuf {
        self.dir.join("mounts.json")
    }
    /// The intercepts the daemon holds, kept so that one started after a crash
    /// re-claims them.
    pub fn intercepts(&self) -> PathBuf {
        self.dir.join("intercepts.json")
    }
    /// This machine's client id (hex), kept across daemons so that one started after a
    /// crash re-claims the intercepts of the one before.
    pub fn client_id(&self) -> PathBuf {
        self.dir.join("client-id")
    }

    /// The client id, created (16 random bytes) when missing or unreadable.
    pub fn load_or_create_client_id(&self) -> Result<Vec<u8>, Error> {
        let path = self.client_id();
        if let Some(id) = read_file(&path).ok().and_then(|b| parse_hex(String::from_utf8_lossy(&b).trim())) {
            if id.len() == 16 {
                return Ok(id);
            }
        }
        let mut id = vec![0u8; 16];
        {
            use std::io::Read;
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut id))
                .map_err(|e| Error::System(format!("cannot read /dev/urandom: {e}")))?;
        }
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        // Whoever has it can re-claim this machine's intercepts: readable by root only.
        write_private(&path, (hex + "\n").as_bytes())
            .map_err(|e| Error::System(format!("cannot write {}: {e}", path.display())))?;
        Ok(id)
    }
}

/// Writes `bytes` to a new file at `path` (replacing any) that only its owner can read.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    create_new(path, 0o600)?.write_all(bytes)
}

/// A new, empty file at `path` with `mode`, in place of what was there: the old entry
/// (a file, or a symbolic link someone planted) is removed, never written through.
pub fn create_new(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Writes `bytes` to `path` atomically: a new file beside it, renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    create_new(&tmp, mode)?.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// Reads a file of the runtime directory, never through a symbolic link.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Creates the runtime directory (mode 0755) if missing and checks that it is root's
/// alone: a directory (not a link), owned by root, writable by no one else. The daemon
/// undoes what `state.json` there says and listens there; a directory another user can
/// write would let that user make root delete interfaces and routes or rewrite files.
pub fn prepare_runtime_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| Error::System(format!("cannot create runtime dir {}: {e}", dir.display())))?;
    check_runtime_dir(dir)
}

/// See [`prepare_runtime_dir`].
fn check_runtime_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::System(format!("cannot read runtime dir {}: {e}", dir.display())))?;
    let what = if m.file_type().is_symlink() {
        Some("a symbolic link".to_string())
    } else if m.uid() != 0 {
        Some(format!("owned by uid {}", m.uid()))
    } else if m.mode() & 0o022 != 0 {
        Some(format!("mode {:o}, writable by others", m.mode() & 0o7777))
    } else {
        None
    };
    match what {
        None => Ok(()),
        Some(what) => Err(Error::Config(format!(
            "runtime dir {} must be a directory owned by root that only root can write, not {what}: \
             fix it (chown root, chmod go-w) or set TPVPN_RUNTIME_DIR",
            dir.display()
        ))),
    }
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// Every system change of a running daemon.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub pid: u32,
    /// The TUN device, once created.
    pub device: Option<String>,
    /// Routes added on the device.
    pub routes: Vec<IpNet>,
    /// The resolv.conf tpvpn replaced, with its original bytes.
    #[serde(default)]
    pub resolv_conf: Option<ResolvBackup>,
    /// The link tpvpn configured in systemd-resolved (its interface index).
    #[serde(default)]
    pub resolved_link: Option<u32>,
    /// The `/etc/resolver` files tpvpn wrote (macOS).
    #[serde(default)]
    pub resolver_files: Vec<PathBuf>,
}

/// A replaced resolv.conf and what it held before.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResolvBackup {
    pub path: PathBuf,
    pub original: String,
}

impl State {
    pub fn load(path: &Path) -> Result<Option<State>, Error> {
        match read_file(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                Error::Config(format!(
                    "corrupt state file {}: {e}; remove it after checking `ip route`",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::System(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Writes the state atomically (write, then rename), before the change it records
    /// takes effect on the system.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let body = serde_json::to_vec_pretty(self).map_err(|e| Error::System(e.to_string()))?;
        write_atomic(path, &body, 0o600).map_err(|e| Error::System(format!("cannot write {}: {e}", path.display())))
    }

    /// Undoes every recorded change. Best effort per item; returns the first error.
    pub fn undo(&self) -> Result<(), Error> {
        let mut first = None;
        if let Some(ifindex) = self.resolved_link {
            // After a crash the link may be gone already, and resolved with it forgot
            // its settings: nothing to undo then.
            if let Err(e) = crate::os::resolved::revert(ifindex) {
                tracing::debug!(error = %e, "systemd-resolved link not reverted");
            }
        }
        if let Err(e) = crate::os::macos::remove_ours(&self.resolver_files) {
            first.get_or_insert(Error::System(format!("cannot remove tpvpn's resolver files: {e}")));
        }
        if let Some(b) = &self.resolv_conf {
            if let Err(e) = crate::os::osdns::restore(&b.path, b.original.as_bytes()) {
                first.get_or_insert(e);
            }
        }

        if let Some(dev) = &self.device {
            for r in &self.routes {
                if let Err(e) = routes::remove(r, dev) {
                    first.get_or_insert(e);
                }
            }
            if let Err(e) = routes::delete_device(dev) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Whether `pid` is a running tpvpn: exists, is not a zombie (a killed daemon whose
/// parent has not reaped it), and runs the tpvpn binary (pids are reused).
pub fn alive(pid: u32) -> bool {
    let proc = Path::new("/proc").join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(proc.join("stat")) else { return false };
    // The state is the first field after the parenthesised command name.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    std::fs::read(proc.join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("tpvpn"))
}

/// Undoes what a daemon that is no longer running left behind. Returns the pid of that
/// daemon if there was anything to clean.
pub fn clean_stale(paths: &Paths) -> Result<Option<u32>, Error> {
    if std::fs::symlink_metadata(paths.state()).is_err() {
        return Ok(None);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Config(
            "a tpvpn that did not exit cleanly left changes behind: run tpvpn down as root to undo them".into(),
        ));
    }
    check_runtime_dir(&paths.dir)?;
    let Some(state) = State::load(&paths.state())? else {
        return Ok(None);
    };
    if alive(state.pid) && state.pid != std::process::id() {
        return Err(Error::Config(format!(
            "a tpvpn daemon (pid {}) is running but not answering on {}; stop it (kill {}) and run tpvpn down",
            state.pid,
            paths.socket().display(),
            state.pid
        )));
    }
    state.undo()?;
    crate::mount::Mounts::clean_up(&paths.mounts());
    remove_files(paths);
    Ok(Some(state.pid))
}

/// Removes the state, socket and pid files.
pub fn remove_files(paths: &Paths) {
    for p in [paths.state(), paths.socket(), paths.pid()] {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("tpvpn-client-id-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = Paths::new(dir.clone());
        let a = paths.load_or_create_client_id().unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(paths.load_or_create_client_id().unwrap(), a);
        std::fs::write(paths.client_id(), "zz\n").unwrap();
        let b = paths.load_or_create_client_id().unwrap();
        assert_ne!(b, a, "an unreadable id is replaced");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn liveness() {
        assert!(alive(std::process::id()), "this test binary's name contains tpvpn");
        assert!(!alive(u32::MAX));
    }

    #[test]
    fn state_round_trips_and_corruption_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tpvpn-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        assert_eq!(State::load(&path).unwrap(), None);
        let s = State {
            pid: 42,
            device: Some("tpvpn0".into()),
            routes: vec!["10.96.0.0/12".parse().unwrap()],
            resolv_conf: None,
            resolved_link: Some(7),
            resolver_files: vec!["/etc/resolver/cluster.local".into()],
        };
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), Some(s));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(State::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
