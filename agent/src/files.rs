//! A container's volume mounts, read as the container sees them and never beyond (the
//! agent's half of `tpvpn intercept --mount`).
//!
//! Everything is resolved under the container's own root (`/proc/PID/root` of its first
//! process, where its mount namespace's volumes are) with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_SYMLINKS)`: a path is absolute, made only of plain names (no `.`, `..` or
//! empty parts), lies in one of the container's volume mounts (or is a directory on the
//! way to one, listing only what leads to them), and no part of it may be a symlink. A
//! symlink is reported as one ([`Kind::Symlink`], [`Volumes::readlink`]) for the reader
//! to follow itself, as a kernel does over a FUSE mount: the kubelet's `..data` layout
//! is made of relative symlinks, and the agent never follows one, so neither an absolute
//! target nor `..` can lead it to the image's or the node's files. Only regular files
//! are ever opened for reading (checked before and, against a swap, after opening with
//! `O_NONBLOCK`): a FIFO, socket or device in a volume is listed, never opened.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use futures::StreamExt;

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, SFlag};
use tpvpn_tunnel::files::{FileAnswer, FileFailure, FileOp, DIR_PAGE};
use tpvpn_tunnel::io::write_message;
use tpvpn_tunnel::{ErrorCode, Message};
use tracing::{info, warn};

use crate::capture::Node;
use crate::runtime;

/// The most one read returns.
pub const READ_MAX: usize = tpvpn_tunnel::files::READ_MAX as usize;

/// Why a file is not served.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}: not an absolute path of plain names (no `.`, `..` or empty parts)")]
    NotNormal(String),
    #[error("{0}: not in a volume mount of the container")]
    OutsideVolumes(String),
    #[error("{0}: a part of it is a symlink, which the agent never follows")]
    Symlink(String),
    #[error("{0}: not a regular file, never opened")]
    NotRegular(String),
    #[error("{0}: {1}")]
    Sys(String, Errno),
}

pub use tpvpn_tunnel::files::{FileAttr as Attr, FileKind as Kind};

/// The attributes `st` gives.
fn attr_of(st: &FileStat) -> Attr {
    let kind = match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    };
    Attr { kind, size: u64::try_from(st.st_size).unwrap_or(0), mode: st.st_mode & 0o7777, mtime: st.st_mtime }
}

/// How a path stands to the volume mounts.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// In a mount: everything below is served.
    Inside,
    /// A directory on the way to mounts: only the names leading to them are listed.
    Above(Vec<String>),
}

/// The volume mounts of one container.
#[derive(Debug)]
pub struct Volumes {
    root: OwnedFd,
    mounts: Vec<PathBuf>,
}

impl Volumes {
    /// The container whose root is `root` (`/proc/PID/root`), serving `mounts` (the
    /// `mountPath`s of its volume mounts).
    pub fn open(root: &Path, mounts: &[&str]) -> Result<Volumes, FileError> {
        let shown = root.display().to_string();
        let root = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| FileError::Sys(shown, e))?;
        let mounts = mounts.iter().filter_map(|m| normal(m).ok()).collect();
        Ok(Volumes { root, mounts })
    }

    /// Where `path` is, relative to the root (empty for `/`).
    fn place(&self, path: &str) -> Result<(PathBuf, Place), FileError> {
        let rel = normal(path)?;
        if self.mounts.iter().any(|m| rel.starts_with(m)) {
            return Ok((rel, Place::Inside));
        }
        let below: Vec<String> = self
            .mounts
            .iter()
            .filter_map(|m| m.strip_prefix(&rel).ok())
            .filter_map(|rest| rest.iter().next())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        if below.is_empty() {
            return Err(FileError::OutsideVolumes(path.into()));
        }
        Ok((rel, Place::Above(below)))
    }

    /// Opens `rel` under the root, never through a symlink.
    fn open_at(&self, path: &str, rel: &Path, flags: OFlag) -> Result<OwnedFd, FileError> {
        // openat2 refuses O_PATH with any flag but these.
        let extra = if flags.contains(OFlag::O_PATH) { OFlag::O_CLOEXEC } else { OFlag::O_CLOEXEC | OFlag::O_NOCTTY };
        let how = OpenHow::new().flags(flags | extra).resolve(
            ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        openat2(&self.root, rel, how).map_err(|e| match e {
            Errno::ELOOP => FileError::Symlink(path.into()),
            e => FileError::Sys(path.into(), e),
        })
    }

    /// The directory holding `rel`, and `rel`'s last name (`None` for the root).
    fn parent(&self, path: &str, rel: &Path) -> Result<(OwnedFd, Option<PathBuf>), FileError> {
        match (rel.parent(), rel.file_name()) {
            (Some(parent), Some(name)) => {
                Ok((self.open_at(path, parent, OFlag::O_PATH | OFlag::O_DIRECTORY)?, Some(PathBuf::from(name))))
            }
            _ => Ok((self.open_at(path, rel, OFlag::O_PATH | OFlag::O_DIRECTORY)?, None)),
        }
    }

    /// The attributes of `path` itself (a symlink is not followed).
    pub fn stat(&self, path: &str) -> Result<Attr, FileError> {
        let (rel, _) = self.place(path)?;
        let (dir, name) = self.parent(path, &rel)?;
        let st = match name {
            Some(name) => fstatat(&dir, name.as_path(), AtFlags::AT_SYMLINK_NOFOLLOW),
            None => fstat(&dir),
        };
        Ok(attr_of(&st.map_err(|e| FileError::Sys(path.into(), e))?))
    }

    /// The entries of directory `path` with their attributes, by name (above the mounts,
    /// only the names that lead to them).
    pub fn read_dir(&self, path: &str) -> Result<Vec<(String, Attr)>, FileError> {
        let (rel, place) = self.place(path)?;
        let fd = self.open_at(path, &rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        let probe =
            fd.try_clone().map_err(|e| FileError::Sys(path.into(), Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| FileError::Sys(path.into(), e))?;
        let mut out = Vec::new();
        for entry in dir.iter().flatten() {
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let shown = name.to_string_lossy().into_owned();
            if let Place::Above(leading) = &place {
                if !leading.contains(&shown) {
                    continue;
                }
            }
            if let Ok(st) = fstatat(&probe, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                out.push((shown, attr_of(&st)));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Up to `len` bytes (at most [`READ_MAX`]) of regular file `path` from `offset`.
    pub fn read(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, FileError> {
        let (rel, place) = self.place(path)?;
        if place != Place::Inside {
            return Err(FileError::NotRegular(path.into()));
        }
        if self.stat(path)?.kind != Kind::File {
            return Err(FileError::NotRegular(path.into()));
        }
        let fd = self.open_at(path, &rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
        // Swapped for something else between the two looks: still never read.
        if attr_of(&fstat(&fd).map_err(|e| FileError::Sys(path.into(), e))?).kind != Kind::File {
            return Err(FileError::NotRegular(path.into()));
        }
        let file = std::fs::File::from(fd);
        let mut buf = vec![0; len.min(READ_MAX)];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FileError::Sys(path.into(), Errno::from_raw(e.raw_os_error().unwrap_or(0)))),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// The target of symlink `path`, as written (for the reader to follow).
    pub fn readlink(&self, path: &str) -> Result<String, FileError> {
        let (rel, _) = self.place(path)?;
        let (dir, name) = self.parent(path, &rel)?;
        let name = name.ok_or_else(|| FileError::NotRegular(path.into()))?;
        let target = nix::fcntl::readlinkat(&dir, name.as_path()).map_err(|e| FileError::Sys(path.into(), e))?;
        Ok(target.to_string_lossy().into_owned())
    }
}

/// `path` (absolute, plain names only) relative to the root: the only paths the agent
/// resolves (fuzzed: `fuzz/` target `volume_paths`).
pub fn normal(path: &str) -> Result<PathBuf, FileError> {
    let rest = path.strip_prefix('/').ok_or_else(|| FileError::NotNormal(path.into()))?;
    let mut out = PathBuf::new();
    for part in rest.split('/') {
        if part.is_empty() && rest.is_empty() {
            break; // `/` itself
        }
        if part.is_empty() || part == "." || part == ".." || part.contains('\0') {
            return Err(FileError::NotNormal(path.into()));
        }
        out.push(part);
    }
    Ok(out)
}

impl FileError {
    /// What the laptop's kernel is told.
    fn failure(&self) -> FileFailure {
        match self {
            // Outside every volume: as if it did not exist (the laptop sees only them).
            FileError::OutsideVolumes(_) => FileFailure::NotFound,
            FileError::NotNormal(_) => FileFailure::Invalid,
            FileError::Symlink(_) | FileError::NotRegular(_) => FileFailure::Denied,
            FileError::Sys(_, Errno::ENOENT) => FileFailure::NotFound,
            FileError::Sys(_, Errno::ENOTDIR) => FileFailure::NotDir,
            FileError::Sys(_, Errno::EINVAL) => FileFailure::Invalid,
            FileError::Sys(_, Errno::EACCES | Errno::EPERM) => FileFailure::Denied,
            FileError::Sys(..) => FileFailure::Io,
        }
    }
}

/// A directory's entries, as listed once.
type Listed = Arc<Vec<(String, Attr)>>;

/// Directories being read on one stream. A reader asks for a directory from entry 0,
/// then from where its buffer filled (a few dozen entries at a time): every question
/// after the first is answered from the listing the first one made, so a directory is
/// listed (each entry stat'ed) once per reading, not once per question, and no entry is
/// skipped or repeated when it changes in between. A listing is dropped when its last
/// entry is given, when the directory is read from 0 again, or, a few being kept, when
/// others are read after it.
#[derive(Default)]
pub struct Listings(std::sync::Mutex<Vec<(String, Listed)>>);

/// Directories read at once on one stream.
const LISTINGS: usize = 8;

impl Listings {
    /// The page of `path` from entry `from`.
    fn page(&self, volumes: &Volumes, path: &str, from: u32) -> Result<FileAnswer, FileError> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let at = kept.iter().position(|(p, _)| p == path);
        let all = match at.filter(|_| from > 0) {
            Some(i) => kept.remove(i).1,
            None => {
                if let Some(i) = at {
                    kept.remove(i);
                }
                drop(kept);
                let all = Arc::new(volumes.read_dir(path)?);
                kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
                all
            }
        };
        let from = from as usize;
        let end = all.len().min(from.saturating_add(DIR_PAGE as usize));
        let next = if end < all.len() { end as u32 } else { 0 };
        let entries = all.get(from..end).unwrap_or_default().to_vec();
        if next != 0 {
            if kept.len() == LISTINGS {
                kept.remove(0);
            }
            kept.push((path.to_owned(), all));
        }
        Ok(FileAnswer::Entries { entries, next })
    }
}

/// The answer to `op` on `path` (directories paged through `listings`).
pub fn answer(volumes: &Volumes, listings: &Listings, path: &str, op: FileOp) -> FileAnswer {
    let result = match op {
        FileOp::Stat => volumes.stat(path).map(FileAnswer::Attr),
        FileOp::ReadDir { from } => listings.page(volumes, path, from),
        FileOp::Read { offset, len } => volumes.read(path, offset, len as usize).map(FileAnswer::Data),
        FileOp::ReadLink => volumes.readlink(path).map(FileAnswer::Target),
    };
    result.unwrap_or_else(|e| FileAnswer::Failed { failure: e.failure(), message: e.to_string() })
}

/// Requests of one stream answered at once.
const IN_FLIGHT: usize = 4;

/// Serves a stream of file requests the manager opened: `FilesOpen` names the container
/// and its volume mounts; answered `Ack` (or `Error`), then each request in order until
/// the stream ends.
pub async fn serve(node: Node, mut send: quinn::SendStream, recv: quinn::RecvStream) {
    let mut frames = tpvpn_tunnel::io::frames(recv);
    let Ok(Some(Message::FilesOpen { container_id, mounts, .. })) = frames.recv().await.unwrap_or(Ok(None)) else {
        let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
        return;
    };
    let proc_root = node.proc_root.clone();
    let opened = tokio::task::spawn_blocking(move || open_container(&node, &container_id, &mounts)).await;
    let (volumes, pid) = match opened {
        Ok(Ok((v, pid))) => (Arc::new(v), pid),
        Ok(Err(why)) => {
            let refusal =
                Message::Error { code: ErrorCode::NotFound, version: tpvpn_tunnel::PROTOCOL_VERSION, message: why };
            let _ = write_message(&mut send, &refusal).await;
            let _ = send.finish();
            return;
        }
        Err(e) => {
            warn!(error = %e, "opening a container's volumes failed");
            return;
        }
    };
    if write_message(&mut send, &Message::Ack { message: String::new() }).await.is_err() {
        return;
    }
    let process = proc_root.join(pid.to_string());
    let listings = Arc::new(Listings::default());
    let requests = futures::stream::unfold(frames, |mut frames| async move {
        match frames.recv().await {
            Some(Ok(Some(Message::FileRequest { id, path, op }))) => Some(((id, path, op), frames)),
            _ => None,
        }
    });
    // A few answered at once (reads of a file in flight together), written in order.
    let answers = requests
        .map(|(id, path, op)| {
            let (v, listings, process) = (volumes.clone(), listings.clone(), process.clone());
            async move {
                // The container is gone (its pod deleted or restarted): the stream ends,
                // and the laptop asks again, of a pod that is there.
                if !process.exists() {
                    info!(pid, "the container of a file stream is gone: ending it");
                    return None;
                }
                let answer = tokio::task::spawn_blocking(move || answer(&v, &listings, &path, op)).await.ok()?;
                Some(Message::FileReply { id, answer })
            }
        })
        .buffered(IN_FLIGHT);
    tokio::pin!(answers);
    while let Some(reply) = answers.next().await {
        let Some(reply) = reply else {
            let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
            return;
        };
        if write_message(&mut send, &reply).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// The volume mounts `mounts` of container `container_id`, under its own root, and the
/// pid of its first process.
fn open_container(node: &Node, container_id: &str, mounts: &[String]) -> Result<(Volumes, u32), String> {
    let pid = match runtime::find(&node.runtime_roots, container_id) {
        Some(bundle) => bundle.pid().map_err(|e| e.to_string())?,
        None => runtime::pid_of_container(&node.proc_root, container_id)
            .ok_or_else(|| format!("container {container_id} is not running on this node"))?,
    };
    let mounts: Vec<&str> = mounts.iter().map(String::as_str).collect();
    let volumes =
        Volumes::open(&node.proc_root.join(pid.to_string()).join("root"), &mounts).map_err(|e| e.to_string())?;
    Ok((volumes, pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A test's directory, removed when the test ends, passed or failed.
    struct TempRoot(PathBuf);

    impl Drop for TempRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A root with a volume at `/etc/config` (the kubelet's layout), an emptyDir at
    /// `/data` holding escapes and a FIFO, and an image file outside both.
    fn root(name: &str) -> (TempRoot, Volumes) {
        let dir = std::env::temp_dir().join(format!("tpvpn-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("etc/config/..2026_12_07_05_00_00.1")).unwrap();
        fs::write(dir.join("etc/config/..2026_12_07_05_00_00.1/app.conf"), "conf\n").unwrap();
        symlink("..2026_12_07_05_00_00.1", dir.join("etc/config/..data")).unwrap();
        symlink("..data/app.conf", dir.join("etc/config/app.conf")).unwrap();
        fs::write(dir.join("etc/shadow"), "image secret\n").unwrap();
        fs::create_dir_all(dir.join("data")).unwrap();
        symlink("/etc", dir.join("data/abs")).unwrap();
        symlink("../etc", dir.join("data/up")).unwrap();
        nix::unistd::mkfifo(&dir.join("data/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let v = Volumes::open(&dir, &["/etc/config", "/data"]).unwrap();
        (TempRoot(dir), v)
    }

    #[test]
    fn answers_page_directories_and_name_each_refusal() {
        let (dir, v) = root("answers");
        for i in 0..(DIR_PAGE + 3) {
            fs::write(dir.0.join(format!("data/f{i:04}")), "").unwrap();
        }
        let l = Listings::default();
        let FileAnswer::Entries { entries, next } = answer(&v, &l, "/data", FileOp::ReadDir { from: 0 }) else {
            panic!()
        };
        assert_eq!((entries.len(), next), (DIR_PAGE as usize, DIR_PAGE));
        let FileAnswer::Entries { entries: rest, next } = answer(&v, &l, "/data", FileOp::ReadDir { from: next })
        else {
            panic!()
        };
        // The FIFO, the two links and the files: everything once, in order.
        assert_eq!((entries.len() + rest.len(), next), (DIR_PAGE as usize + 3 + 3, 0));
        assert!(entries.last().unwrap().0 < rest[0].0);
        let failure = |path: &str, op| match answer(&v, &l, path, op) {
            FileAnswer::Failed { failure, .. } => failure,
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(failure("/etc/shadow", FileOp::Stat), FileFailure::NotFound, "outside the volumes: not there");
        assert_eq!(failure("/data/nope", FileOp::Stat), FileFailure::NotFound);
        assert_eq!(failure("/data/fifo", FileOp::Read { offset: 0, len: 10 }), FileFailure::Denied);
        assert_eq!(failure("/data/up/shadow", FileOp::Read { offset: 0, len: 10 }), FileFailure::Denied);
        assert_eq!(failure("/data/../etc", FileOp::Stat), FileFailure::Invalid);
        assert_eq!(answer(&v, &l, "/data/up", FileOp::ReadLink), FileAnswer::Target("../etc".into()));
        assert_eq!(
            answer(&v, &l, "/etc/config/..data/app.conf", FileOp::Read { offset: 1, len: 3 }),
            FileAnswer::Failed {
                failure: FileFailure::Denied,
                message: "/etc/config/..data/app.conf: a part of it is a symlink, which the agent never follows".into()
            }
        );
    }

    #[test]
    fn a_directory_read_in_parts_is_listed_once() {
        let (dir, v) = root("listed");
        for i in 0..(DIR_PAGE + 20) {
            fs::write(dir.0.join(format!("data/f{i:04}")), "").unwrap();
        }
        let listed = v.read_dir("/data").unwrap().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        let l = Listings::default();
        let names = |from| match answer(&v, &l, "/data", FileOp::ReadDir { from }) {
            FileAnswer::Entries { entries, .. } => entries.into_iter().map(|(n, _)| n).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(names(0), listed[..DIR_PAGE as usize]);
        // Changed between two questions of one reading: the reading goes on as it began
        // (nothing skipped or given twice); the next reading sees the change.
        fs::write(dir.0.join("data/a-new"), "").unwrap();
        fs::remove_file(dir.0.join("data/f0520")).unwrap();
        assert_eq!(names(5), listed[5..5 + DIR_PAGE as usize], "asked again from further back");
        assert_eq!(names(DIR_PAGE), listed[DIR_PAGE as usize..], "the last page");
        let again = names(0);
        assert_eq!(again[0], "a-new");
        assert!(!names(DIR_PAGE).contains(&"f0520".to_string()));
    }

    #[test]
    fn volumes_are_read_and_nothing_else() {
        let (_dir, v) = root("read");
        let names = |p: &str| v.read_dir(p).unwrap().into_iter().map(|(n, a)| (n, a.kind)).collect::<Vec<_>>();
        assert_eq!(names("/"), vec![("data".into(), Kind::Dir), ("etc".into(), Kind::Dir)]);
        assert_eq!(names("/etc"), vec![("config".into(), Kind::Dir)], "shadow is the image's, not a volume's");
        assert_eq!(
            names("/etc/config"),
            vec![
                ("..2026_12_07_05_00_00.1".into(), Kind::Dir),
                ("..data".into(), Kind::Symlink),
                ("app.conf".into(), Kind::Symlink)
            ]
        );
        assert_eq!(v.readlink("/etc/config/app.conf").unwrap(), "..data/app.conf");
        assert_eq!(v.read("/etc/config/..2026_12_07_05_00_00.1/app.conf", 0, 100).unwrap(), b"conf\n");
        assert_eq!(v.read("/etc/config/..2026_12_07_05_00_00.1/app.conf", 2, 2).unwrap(), b"nf");
        assert_eq!(v.stat("/data/fifo").unwrap().kind, Kind::Other);
    }

    #[test]
    fn no_path_leads_out_of_the_volumes_nor_opens_what_is_not_a_file() {
        let (_dir, v) = root("refused");
        let refused = |p: &str| v.read(p, 0, 100).expect_err(p);
        assert!(matches!(refused("/etc/shadow"), FileError::OutsideVolumes(_)));
        assert!(matches!(refused("/data/../etc/shadow"), FileError::NotNormal(_)));
        assert!(matches!(refused("data/x"), FileError::NotNormal(_)));
        assert!(matches!(refused("/data//x"), FileError::NotNormal(_)));
        // Symlinks are never followed: not the relative ones of the kubelet's layout
        // (the reader follows them), not an absolute one, not one going up.
        assert!(matches!(refused("/etc/config/app.conf"), FileError::NotRegular(_)), "a symlink is not read");
        assert!(matches!(refused("/etc/config/..data/app.conf"), FileError::Symlink(_)));
        assert!(matches!(refused("/data/abs/shadow"), FileError::Symlink(_)));
        assert!(matches!(refused("/data/up/shadow"), FileError::Symlink(_)));
        assert!(matches!(v.read_dir("/data/abs"), Err(FileError::Symlink(_))));
        // A FIFO with no writer: refused at once, never opened (which would block).
        assert!(matches!(refused("/data/fifo"), FileError::NotRegular(_)));
        assert!(matches!(refused("/etc"), FileError::NotRegular(_)));
    }

    #[test]
    fn only_plain_absolute_paths_are_normal() {
        assert_eq!(normal("/").unwrap(), PathBuf::new());
        assert_eq!(normal("/a/b").unwrap(), PathBuf::from("a/b"));
        for bad in ["", "a", "/a/", "/./a", "/a/..", "//a", "/a\0b"] {
            assert!(normal(bad).is_err(), "{bad:?}");
        }
    }
}
