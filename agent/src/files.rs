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
//!
//! Writes (`--mount-readwrite`) are carried out only inside the mounts the manager named
//! writable (emptyDir and PVC volumes not mounted `readOnly`), by the same rules: the
//! directory of a new or removed entry is opened as above and the entry named in it
//! (`*at` calls, which never follow a last symlink; a file is created with `O_EXCL`); an
//! entry made takes the owner of its directory (the agent runs as root, the pod's
//! process usually not), set-user-ID and set-group-ID bits are never given to a file,
//! and a volume's own mount point is never removed or replaced.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use futures::StreamExt;

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;
use tpvpn_tunnel::files::{escape, plain_name, unescape, FileAnswer, FileFailure, FileOp, DIR_PAGE, OPEN_MAX};
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
    #[error("{0}: not in a volume that may be written (read-only mount, or not --mount-readwrite)")]
    ReadOnly(String),
    #[error("{0}: the mount point of a volume, never removed or replaced")]
    MountPoint(String),
    #[error("{0}: in another volume (moved by copying)")]
    CrossVolume(String),
    #[error("{0}: handle {1} is not open on this stream")]
    Stale(String, u32),
    #[error("{0}: more than {OPEN_MAX} files open on this stream")]
    TooMany(String),
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
    Above(Vec<std::ffi::OsString>),
}

/// The volume mounts of one container.
#[derive(Debug)]
pub struct Volumes {
    root: OwnedFd,
    mounts: Vec<PathBuf>,
    /// Those of `mounts` that may be written.
    writable: Vec<PathBuf>,
}

/// The permission bits a file may be given (never set-user-ID or set-group-ID).
const FILE_MODE: u32 = 0o1777;
/// The permission bits a directory may be given (set-group-ID: new entries take its group).
const DIR_MODE: u32 = 0o3777;

/// `e` (from std) as an errno.
fn errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
}

impl Volumes {
    /// The container whose root is `root` (`/proc/PID/root`), serving `mounts` (the
    /// `mountPath`s of its volume mounts), of which `writable` may be written.
    pub fn open(root: &Path, mounts: &[&str], writable: &[&str]) -> Result<Volumes, FileError> {
        let shown = root.display().to_string();
        let root = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| FileError::Sys(shown, e))?;
        let mounts: Vec<PathBuf> = mounts.iter().filter_map(|m| normal(m).ok()).collect();
        let writable = writable.iter().filter_map(|m| normal(m).ok()).filter(|m| mounts.contains(m)).collect();
        Ok(Volumes { root, mounts, writable })
    }

    /// `path` relative to the root and the writable mount it is in.
    fn writable(&self, path: &str) -> Result<(PathBuf, &Path), FileError> {
        let rel = normal(path)?;
        let mount =
            self.writable.iter().find(|m| rel.starts_with(m)).ok_or_else(|| FileError::ReadOnly(path.into()))?;
        Ok((rel, mount))
    }

    /// The directory of entry `path` (in a writable mount, not its mount point) and the
    /// entry's name; the mount it is in.
    fn entry(&self, path: &str) -> Result<(OwnedFd, PathBuf, &Path), FileError> {
        let (rel, mount) = self.writable(path)?;
        if rel == mount {
            return Err(FileError::MountPoint(path.into()));
        }
        let (dir, name) = self.parent(path, &rel)?;
        let name = name.ok_or_else(|| FileError::MountPoint(path.into()))?;
        Ok((dir, name, mount))
    }

    /// Opens `path` (a regular file, or with `dirs` also a directory, in a writable
    /// mount) with `flags`, never a FIFO or device.
    fn open_writable(&self, path: &str, flags: OFlag, dirs: bool) -> Result<(OwnedFd, Kind), FileError> {
        let (rel, _) = self.writable(path)?;
        let kind = self.stat(path)?.kind;
        let flags = match kind {
            Kind::File => flags | OFlag::O_NONBLOCK,
            Kind::Dir if dirs => OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Kind::Dir => return Err(FileError::Sys(path.into(), Errno::EISDIR)),
            _ => return Err(FileError::NotRegular(path.into())),
        };
        let fd = self.open_at(path, &rel, flags)?;
        // Swapped for something else between the two looks: never used.
        if attr_of(&fstat(&fd).map_err(|e| FileError::Sys(path.into(), e))?).kind != kind {
            return Err(FileError::NotRegular(path.into()));
        }
        Ok((fd, kind))
    }

    /// Writes all of `data` into regular file `path` at `offset`.
    pub fn write(&self, path: &str, offset: u64, data: &[u8]) -> Result<(), FileError> {
        let (fd, _) = self.open_writable(path, OFlag::O_WRONLY, false)?;
        std::fs::File::from(fd).write_all_at(data, offset).map_err(|e| FileError::Sys(path.into(), errno(&e)))
    }

    /// Gives `made` (an entry just made in `dir`) the owner of `dir` and permission bits
    /// `mode` exactly (not the agent's umask); its attributes.
    fn adopt(&self, path: &str, dir: &OwnedFd, made: OwnedFd, mode: u32) -> Result<Attr, FileError> {
        let sys = |e| FileError::Sys(path.into(), e);
        let owner = fstat(dir).map_err(sys)?;
        let (uid, gid) = (nix::unistd::Uid::from_raw(owner.st_uid), nix::unistd::Gid::from_raw(owner.st_gid));
        nix::unistd::fchown(&made, Some(uid), Some(gid)).map_err(sys)?;
        nix::sys::stat::fchmod(&made, Mode::from_bits_truncate(mode)).map_err(sys)?;
        Ok(attr_of(&fstat(&made).map_err(sys)?))
    }

    /// Creates regular file `path`, which must not exist.
    pub fn create(&self, path: &str, mode: u32) -> Result<Attr, FileError> {
        let (dir, name, _) = self.entry(path)?;
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let made = nix::fcntl::openat(&dir, name.as_path(), flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| FileError::Sys(path.into(), e))?;
        self.adopt(path, &dir, made, mode & FILE_MODE)
    }

    /// Creates directory `path`.
    pub fn make_dir(&self, path: &str, mode: u32) -> Result<Attr, FileError> {
        let (dir, name, _) = self.entry(path)?;
        let sys = |e| FileError::Sys(path.into(), e);
        nix::sys::stat::mkdirat(&dir, name.as_path(), Mode::from_bits_truncate(0o700)).map_err(sys)?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let made = nix::fcntl::openat(&dir, name.as_path(), flags, Mode::empty()).map_err(sys)?;
        self.adopt(path, &dir, made, mode & DIR_MODE)
    }

    /// Removes file or symlink `path` (`dir`: empty directory `path`).
    pub fn remove(&self, path: &str, dir: bool) -> Result<(), FileError> {
        let (parent, name, _) = self.entry(path)?;
        let flag = if dir { UnlinkatFlags::RemoveDir } else { UnlinkatFlags::NoRemoveDir };
        nix::unistd::unlinkat(&parent, name.as_path(), flag).map_err(|e| FileError::Sys(path.into(), e))
    }

    /// Moves entry `from` to `to`, in the same volume.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), FileError> {
        let (from_dir, from_name, from_mount) = self.entry(from)?;
        let (to_dir, to_name, to_mount) = self.entry(to)?;
        if from_mount != to_mount {
            return Err(FileError::CrossVolume(to.into()));
        }
        nix::fcntl::renameat(&from_dir, from_name.as_path(), &to_dir, to_name.as_path())
            .map_err(|e| FileError::Sys(from.into(), e))
    }

    /// Changes a regular file's size, a file's or directory's permission bits and
    /// modification time; the attributes after.
    pub fn set_attr(
        &self,
        path: &str,
        size: Option<u64>,
        mode: Option<u32>,
        mtime: Option<i64>,
    ) -> Result<Attr, FileError> {
        let flags = if size.is_some() { OFlag::O_WRONLY } else { OFlag::O_RDONLY };
        let (fd, kind) = self.open_writable(path, flags, size.is_none())?;
        let sys = |e| FileError::Sys(path.into(), e);
        if let Some(size) = size {
            let size = i64::try_from(size).map_err(|_| sys(Errno::EFBIG))?;
            nix::unistd::ftruncate(&fd, size).map_err(sys)?;
        }
        if let Some(mode) = mode {
            let allowed = if kind == Kind::Dir { DIR_MODE } else { FILE_MODE };
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode & allowed)).map_err(sys)?;
        }
        if let Some(mtime) = mtime {
            let omit = TimeSpec::UTIME_OMIT;
            nix::sys::stat::futimens(&fd, &omit, &TimeSpec::new(mtime, 0)).map_err(sys)?;
        }
        Ok(attr_of(&fstat(&fd).map_err(sys)?))
    }

    /// Flushes regular file `path` to its storage.
    pub fn sync(&self, path: &str) -> Result<(), FileError> {
        let (fd, _) = self.open_writable(path, OFlag::O_RDONLY, false)?;
        nix::unistd::fsync(&fd).map_err(|e| FileError::Sys(path.into(), e))
    }

    /// Where `path` is, relative to the root (empty for `/`).
    fn place(&self, path: &str) -> Result<(PathBuf, Place), FileError> {
        let rel = normal(path)?;
        if self.mounts.iter().any(|m| rel.starts_with(m)) {
            return Ok((rel, Place::Inside));
        }
        let below: Vec<std::ffi::OsString> = self
            .mounts
            .iter()
            .filter_map(|m| m.strip_prefix(&rel).ok())
            .filter_map(|rest| rest.iter().next())
            .map(OsStr::to_os_string)
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
        let probe = fd.try_clone().map_err(|e| FileError::Sys(path.into(), errno(&e)))?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| FileError::Sys(path.into(), e))?;
        let mut out = Vec::new();
        for entry in dir.iter().flatten() {
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            if let Place::Above(leading) = &place {
                if !leading.iter().any(|l| l == name) {
                    continue;
                }
            }
            if let Ok(st) = fstatat(&probe, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                out.push((escape(name.as_bytes()), attr_of(&st)));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Up to `len` bytes (at most [`READ_MAX`]) of regular file `path` from `offset`.
    pub fn read(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, FileError> {
        read_at(path, &std::fs::File::from(self.open_readable(path)?), offset, len)
    }

    /// Opens regular file `path` to read (and write: `write`, in a writable mount), to be
    /// used by handle; its attributes then.
    pub fn open_file(&self, path: &str, write: bool) -> Result<(std::fs::File, Attr), FileError> {
        let fd = if write { self.open_writable(path, OFlag::O_RDWR, false)?.0 } else { self.open_readable(path)? };
        let attr = attr_of(&fstat(&fd).map_err(|e| FileError::Sys(path.into(), e))?);
        Ok((std::fs::File::from(fd), attr))
    }

    /// Opens regular file `path` (in a volume) to read, never a FIFO or device.
    fn open_readable(&self, path: &str) -> Result<OwnedFd, FileError> {
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
        Ok(fd)
    }

    /// The target of symlink `path`, as written (for the reader to follow).
    pub fn readlink(&self, path: &str) -> Result<String, FileError> {
        let (rel, _) = self.place(path)?;
        let (dir, name) = self.parent(path, &rel)?;
        let name = name.ok_or_else(|| FileError::NotRegular(path.into()))?;
        let target = nix::fcntl::readlinkat(&dir, name.as_path()).map_err(|e| FileError::Sys(path.into(), e))?;
        Ok(escape(target.as_bytes()))
    }
}

/// Up to `len` bytes (at most [`READ_MAX`]) of `file` (`path`) from `offset`.
fn read_at(path: &str, file: &std::fs::File, offset: u64, len: usize) -> Result<Vec<u8>, FileError> {
    let mut buf = vec![0; len.min(READ_MAX)];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FileError::Sys(path.into(), errno(&e))),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// `path` (absolute, plain names only, [`escape`]d) relative to the root: the only paths
/// the agent resolves (fuzzed: `fuzz/` target `volume_paths`). A name's bytes are checked
/// after unescaping: no escape makes a `/`, a NUL, `.` or `..`.
pub fn normal(path: &str) -> Result<PathBuf, FileError> {
    let rest = path.strip_prefix('/').ok_or_else(|| FileError::NotNormal(path.into()))?;
    let mut out = PathBuf::new();
    for part in rest.split('/') {
        if part.is_empty() && rest.is_empty() {
            break; // `/` itself
        }
        let name = unescape(part);
        if !plain_name(&name) {
            return Err(FileError::NotNormal(path.into()));
        }
        out.push(OsStr::from_bytes(&name));
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
            FileError::Symlink(_) | FileError::NotRegular(_) | FileError::MountPoint(_) => FileFailure::Denied,
            FileError::ReadOnly(_) | FileError::Sys(_, Errno::EROFS) => FileFailure::ReadOnly,
            FileError::CrossVolume(_) | FileError::Sys(_, Errno::EXDEV) => FileFailure::CrossDevice,
            FileError::Stale(..) => FileFailure::Stale,
            FileError::TooMany(_) => FileFailure::TooMany,
            FileError::Sys(_, Errno::EEXIST) => FileFailure::Exists,
            FileError::Sys(_, Errno::ENOTEMPTY) => FileFailure::NotEmpty,
            FileError::Sys(_, Errno::EISDIR) => FileFailure::IsDir,
            FileError::Sys(_, Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG) => FileFailure::NoSpace,
            FileError::Sys(_, Errno::ENOENT) => FileFailure::NotFound,
            FileError::Sys(_, Errno::ENOTDIR) => FileFailure::NotDir,
            FileError::Sys(_, Errno::EINVAL) => FileFailure::Invalid,
            FileError::Sys(_, Errno::EACCES | Errno::EPERM) => FileFailure::Denied,
            FileError::Sys(..) => FileFailure::Io,
        }
    }
}

/// What one stream has open: directories being read, files by handle.
#[derive(Default)]
pub struct Streamed {
    listings: Listings,
    handles: Handles,
}

/// Files open on one stream ([`FileOp::Open`]), by handle: at most [`OPEN_MAX`].
#[derive(Default)]
struct Handles(std::sync::Mutex<Table>);

/// The last handle given, and each open file with whether it is open for writing.
#[derive(Default)]
struct Table {
    last: u32,
    open: std::collections::HashMap<u32, (Arc<std::fs::File>, bool)>,
}

impl Handles {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `path` (`write`: for writing too); its handle, attributes and first `read`
    /// bytes.
    fn open(&self, volumes: &Volumes, path: &str, write: bool, read: u32) -> Result<FileAnswer, FileError> {
        if self.table().open.len() >= OPEN_MAX {
            return Err(FileError::TooMany(path.into()));
        }
        let (file, attr) = volumes.open_file(path, write)?;
        let data = read_at(path, &file, 0, read as usize)?;
        let mut table = self.table();
        // Never one still open (after 2^32 opens the numbers come round).
        while {
            table.last = table.last.wrapping_add(1);
            table.open.contains_key(&table.last)
        } {}
        let handle = table.last;
        table.open.insert(handle, (Arc::new(file), write));
        Ok(FileAnswer::Opened { handle, attr, data })
    }

    /// The file open as `handle` (for writing: `write`).
    fn get(&self, path: &str, handle: u32, write: bool) -> Result<Arc<std::fs::File>, FileError> {
        match self.table().open.get(&handle) {
            Some((_, false)) if write => Err(FileError::ReadOnly(path.into())),
            Some((file, _)) => Ok(file.clone()),
            None => Err(FileError::Stale(path.into(), handle)),
        }
    }

    fn close(&self, path: &str, handle: u32) -> Result<FileAnswer, FileError> {
        match self.table().open.remove(&handle) {
            Some(_) => Ok(FileAnswer::Done),
            None => Err(FileError::Stale(path.into(), handle)),
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
struct Listings(std::sync::Mutex<Vec<(String, Listed)>>);

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

/// The answer to `op` on `path` (what the stream has open in `streamed`).
pub fn answer(volumes: &Volumes, streamed: &Streamed, path: &str, op: FileOp) -> FileAnswer {
    let handles = &streamed.handles;
    let result = match op {
        FileOp::Stat => volumes.stat(path).map(FileAnswer::Attr),
        FileOp::ReadDir { from } => streamed.listings.page(volumes, path, from),
        FileOp::Read { offset, len } => volumes.read(path, offset, len as usize).map(FileAnswer::Data),
        FileOp::ReadLink => volumes.readlink(path).map(FileAnswer::Target),
        FileOp::Write { offset, data } => volumes.write(path, offset, &data).map(|()| FileAnswer::Done),
        FileOp::Create { mode } => volumes.create(path, mode).map(FileAnswer::Attr),
        FileOp::MakeDir { mode } => volumes.make_dir(path, mode).map(FileAnswer::Attr),
        FileOp::Remove => volumes.remove(path, false).map(|()| FileAnswer::Done),
        FileOp::RemoveDir => volumes.remove(path, true).map(|()| FileAnswer::Done),
        FileOp::Rename { to } => volumes.rename(path, &to).map(|()| FileAnswer::Done),
        FileOp::SetAttr { size, mode, mtime } => volumes.set_attr(path, size, mode, mtime).map(FileAnswer::Attr),
        FileOp::Sync => volumes.sync(path).map(|()| FileAnswer::Done),
        FileOp::Open { write, read } => handles.open(volumes, path, write, read),
        FileOp::ReadOpen { handle, offset, len } => {
            handles.get(path, handle, false).and_then(|f| read_at(path, &f, offset, len as usize)).map(FileAnswer::Data)
        }
        FileOp::WriteOpen { handle, offset, data } => handles.get(path, handle, true).and_then(|f| {
            f.write_all_at(&data, offset).map(|()| FileAnswer::Done).map_err(|e| FileError::Sys(path.into(), errno(&e)))
        }),
        FileOp::Close { handle } => handles.close(path, handle),
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
    let Ok(Some(Message::FilesOpen { container_id, mounts, writable, .. })) = frames.recv().await.unwrap_or(Ok(None))
    else {
        let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
        return;
    };
    let proc_root = node.proc_root.clone();
    let opened = tokio::task::spawn_blocking(move || open_container(&node, &container_id, &mounts, &writable)).await;
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
    let streamed = Arc::new(Streamed::default());
    let requests = futures::stream::unfold(frames, |mut frames| async move {
        match frames.recv().await {
            Some(Ok(Some(Message::FileRequest { id, path, op }))) => Some(((id, path, op), frames)),
            _ => None,
        }
    });
    // A few answered at once (reads of a file in flight together), written in order.
    let answers = requests
        .map(|(id, path, op)| {
            let (v, streamed, process) = (volumes.clone(), streamed.clone(), process.clone());
            async move {
                // The container is gone (its pod deleted or restarted): the stream ends,
                // and the laptop asks again, of a pod that is there.
                if !process.exists() {
                    info!(pid, "the container of a file stream is gone: ending it");
                    return None;
                }
                let answer = tokio::task::spawn_blocking(move || answer(&v, &streamed, &path, op)).await.ok()?;
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
fn open_container(
    node: &Node,
    container_id: &str,
    mounts: &[String],
    writable: &[String],
) -> Result<(Volumes, u32), String> {
    let pid = match runtime::find(&node.runtime_roots, container_id) {
        Some(bundle) => bundle.pid().map_err(|e| e.to_string())?,
        None => runtime::pid_of_container(&node.proc_root, container_id)
            .ok_or_else(|| format!("container {container_id} is not running on this node"))?,
    };
    let mounts: Vec<&str> = mounts.iter().map(String::as_str).collect();
    let writable: Vec<&str> = writable.iter().map(String::as_str).collect();
    let root = node.proc_root.join(pid.to_string()).join("root");
    let volumes = Volumes::open(&root, &mounts, &writable).map_err(|e| e.to_string())?;
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
        let v = Volumes::open(&dir, &["/etc/config", "/data"], &["/data"]).unwrap();
        (TempRoot(dir), v)
    }

    #[test]
    fn answers_page_directories_and_name_each_refusal() {
        let (dir, v) = root("answers");
        for i in 0..(DIR_PAGE + 3) {
            fs::write(dir.0.join(format!("data/f{i:04}")), "").unwrap();
        }
        let l = Streamed::default();
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
        let l = Streamed::default();
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
    fn an_open_file_is_read_as_opened_even_when_replaced_in_the_pod() {
        let (dir, v) = root("handles");
        fs::write(dir.0.join("data/conf"), "old\n").unwrap();
        let s = Streamed::default();
        let ask = |path: &str, op| answer(&v, &s, path, op);
        let FileAnswer::Opened { handle, attr, data } = ask("/data/conf", FileOp::Open { write: false, read: 2 })
        else {
            panic!()
        };
        assert_eq!((attr.size, data), (4, b"ol".to_vec()));
        // The pod replaces the file (a new one renamed over it, as atomic writers do).
        fs::write(dir.0.join("data/conf.new"), "new and longer\n").unwrap();
        fs::rename(dir.0.join("data/conf.new"), dir.0.join("data/conf")).unwrap();
        assert_eq!(
            ask("/data/conf", FileOp::ReadOpen { handle, offset: 0, len: 100 }),
            FileAnswer::Data(b"old\n".to_vec())
        );
        assert_eq!(
            ask("/data/conf", FileOp::Read { offset: 0, len: 100 }),
            FileAnswer::Data(b"new and longer\n".to_vec())
        );
        let failure = |a: FileAnswer| match a {
            FileAnswer::Failed { failure, .. } => failure,
            other => panic!("{other:?}"),
        };
        let write = FileOp::WriteOpen { handle, offset: 0, data: b"x".to_vec() };
        assert_eq!(failure(ask("/data/conf", write)), FileFailure::ReadOnly, "opened for reading only");
        assert_eq!(ask("/data/conf", FileOp::Close { handle }), FileAnswer::Done);
        let read = FileOp::ReadOpen { handle, offset: 0, len: 1 };
        assert_eq!(failure(ask("/data/conf", read)), FileFailure::Stale);
        // Opened for writing: in a writable volume only; writes reach the file opened.
        assert_eq!(
            failure(ask("/etc/config/..data/app.conf", FileOp::Open { write: true, read: 0 })),
            FileFailure::ReadOnly
        );
        let FileAnswer::Opened { handle, .. } = ask("/data/conf", FileOp::Open { write: true, read: 0 }) else {
            panic!()
        };
        let write = FileOp::WriteOpen { handle, offset: 0, data: b"NEW".to_vec() };
        assert_eq!(ask("/data/conf", write), FileAnswer::Done);
        assert_eq!(fs::read_to_string(dir.0.join("data/conf")).unwrap(), "NEW and longer\n");
        // Never a FIFO, never through a symlink.
        assert_eq!(failure(ask("/data/fifo", FileOp::Open { write: false, read: 0 })), FileFailure::Denied);
        assert_eq!(failure(ask("/data/up/shadow", FileOp::Open { write: false, read: 0 })), FileFailure::Denied);
        // At most OPEN_MAX at once on a stream.
        let opened = (1..OPEN_MAX)
            .filter(|_| matches!(ask("/data/conf", FileOp::Open { write: false, read: 0 }), FileAnswer::Opened { .. }));
        assert_eq!(opened.count(), OPEN_MAX - 1);
        assert_eq!(failure(ask("/data/conf", FileOp::Open { write: false, read: 0 })), FileFailure::TooMany);
    }

    #[test]
    fn names_that_are_not_utf8_are_listed_read_and_written_exactly() {
        let (dir, v) = root("bytes");
        let latin1 = OsStr::from_bytes(b"caf\xe9.txt");
        fs::write(dir.0.join("data").join(latin1), "latin-1\n").unwrap();
        symlink(OsStr::from_bytes(b"caf\xe9.txt"), dir.0.join("data/link")).unwrap();
        let shown = escape(b"caf\xe9.txt");
        let names: Vec<String> = v.read_dir("/data").unwrap().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&shown), "{names:?}");
        assert_eq!(v.read(&format!("/data/{shown}"), 0, 100).unwrap(), b"latin-1\n");
        assert_eq!(unescape(&v.readlink("/data/link").unwrap()), b"caf\xe9.txt");
        // Made from the laptop under such a name: that name exactly, in the pod.
        let made = escape(b"\xff\xfe");
        v.create(&format!("/data/{made}"), 0o644).unwrap();
        assert!(dir.0.join("data").join(OsStr::from_bytes(b"\xff\xfe")).exists());
        // No escape stands in for `/`, `..` or NUL.
        for bad in ["/data/\u{10FF2E}\u{10FF2E}/etc", "/data/a\u{10FF2F}b", "/data/a\u{10FF00}"] {
            assert!(matches!(v.stat(bad), Err(FileError::NotNormal(_))), "{bad}");
        }
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
    fn writes_reach_writable_volumes_only_and_never_leave_them() {
        use std::os::unix::fs::MetadataExt;
        let (dir, v) = root("writes");
        let l = Streamed::default();
        let ask = |path: &str, op| answer(&v, &l, path, op);
        let failure = |path: &str, op| match ask(path, op) {
            FileAnswer::Failed { failure, .. } => failure,
            other => panic!("{path}: {other:?}"),
        };
        // The emptyDir: made, written, grown and cut, renamed, removed.
        let FileAnswer::Attr(made) = ask("/data/new", FileOp::Create { mode: 0o6755 }) else { panic!() };
        assert_eq!((made.kind, made.size, made.mode), (Kind::File, 0, 0o755), "no set-ID bits for a file");
        assert_eq!(failure("/data/new", FileOp::Create { mode: 0o644 }), FileFailure::Exists);
        assert_eq!(ask("/data/new", FileOp::Write { offset: 0, data: b"hello".to_vec() }), FileAnswer::Done);
        assert_eq!(ask("/data/new", FileOp::Write { offset: 7, data: b"!".to_vec() }), FileAnswer::Done);
        assert_eq!(fs::read(dir.0.join("data/new")).unwrap(), b"hello\0\0!");
        let set = FileOp::SetAttr { size: Some(5), mode: Some(0o600), mtime: Some(1_000_000) };
        let FileAnswer::Attr(after) = ask("/data/new", set) else { panic!() };
        assert_eq!((after.size, after.mode, after.mtime), (5, 0o600, 1_000_000));
        assert_eq!(ask("/data/new", FileOp::Sync), FileAnswer::Done);
        let FileAnswer::Attr(sub) = ask("/data/sub", FileOp::MakeDir { mode: 0o2775 }) else { panic!() };
        assert_eq!((sub.kind, sub.mode), (Kind::Dir, 0o2775));
        assert_eq!(ask("/data/new", FileOp::Rename { to: "/data/sub/moved".into() }), FileAnswer::Done);
        assert_eq!(fs::read(dir.0.join("data/sub/moved")).unwrap(), b"hello");
        assert_eq!(failure("/data/sub", FileOp::RemoveDir), FileFailure::NotEmpty);
        assert_eq!(failure("/data/sub", FileOp::Remove), FileFailure::IsDir);
        assert_eq!(ask("/data/sub/moved", FileOp::Remove), FileAnswer::Done);
        assert_eq!(ask("/data/sub", FileOp::RemoveDir), FileAnswer::Done);
        assert!(!dir.0.join("data/sub").exists());
        // An entry made takes its directory's owner (the pod's process, not the agent).
        fs::create_dir(dir.0.join("data/app")).unwrap();
        std::os::unix::fs::chown(dir.0.join("data/app"), Some(1234), Some(2345)).unwrap();
        assert!(matches!(ask("/data/app/f", FileOp::Create { mode: 0o644 }), FileAnswer::Attr(_)));
        assert!(matches!(ask("/data/app/d", FileOp::MakeDir { mode: 0o755 }), FileAnswer::Attr(_)));
        for made in ["data/app/f", "data/app/d"] {
            let m = fs::metadata(dir.0.join(made)).unwrap();
            assert_eq!((m.uid(), m.gid()), (1234, 2345), "{made}");
        }

        // A configMap's volume and the image: read-only, whatever is asked.
        let conf = "/etc/config/..2026_12_07_05_00_00.1/app.conf";
        assert_eq!(failure(conf, FileOp::Write { offset: 0, data: b"x".to_vec() }), FileFailure::ReadOnly);
        assert_eq!(failure("/etc/config/x", FileOp::Create { mode: 0o644 }), FileFailure::ReadOnly);
        assert_eq!(failure(conf, FileOp::SetAttr { size: Some(0), mode: None, mtime: None }), FileFailure::ReadOnly);
        assert_eq!(failure("/etc/config/app.conf", FileOp::Remove), FileFailure::ReadOnly);
        assert_eq!(failure("/etc/shadow", FileOp::Remove), FileFailure::ReadOnly);
        assert_eq!(failure("/evil", FileOp::MakeDir { mode: 0o755 }), FileFailure::ReadOnly);
        assert_eq!(fs::read(dir.0.join(&conf[1..])).unwrap(), b"conf\n");
        // Out of the emptyDir: not into another volume, not through a symlink, not the
        // mount point itself, not a FIFO.
        assert_eq!(failure("/data/app/f", FileOp::Rename { to: "/etc/config/f".into() }), FileFailure::ReadOnly);
        assert_eq!(failure("/data/up/owned", FileOp::Create { mode: 0o644 }), FileFailure::Denied);
        assert_eq!(failure("/data/abs/passwd", FileOp::Create { mode: 0o644 }), FileFailure::Denied);
        assert_eq!(failure("/data/abs", FileOp::Write { offset: 0, data: b"x".to_vec() }), FileFailure::Denied);
        assert_eq!(failure("/data/abs", FileOp::Create { mode: 0o644 }), FileFailure::Exists, "no create through it");
        assert_eq!(failure("/data", FileOp::RemoveDir), FileFailure::Denied);
        assert_eq!(failure("/data/app/f", FileOp::Rename { to: "/data".into() }), FileFailure::Denied);
        assert_eq!(failure("/data/fifo", FileOp::Write { offset: 0, data: b"x".to_vec() }), FileFailure::Denied);
        assert_eq!(failure("/data/../etc/x", FileOp::Create { mode: 0o644 }), FileFailure::Invalid);
        assert!(!dir.0.join("etc/owned").exists() && !dir.0.join("etc/passwd").exists());
        // A symlink itself may be removed or moved (the link, never what it names).
        assert_eq!(ask("/data/abs", FileOp::Rename { to: "/data/abs2".into() }), FileAnswer::Done);
        assert_eq!(ask("/data/abs2", FileOp::Remove), FileAnswer::Done);
        assert!(dir.0.join("etc/shadow").exists());
    }

    #[test]
    fn a_rename_between_two_writable_volumes_is_a_copy() {
        let (dir, _) = root("xdev");
        fs::create_dir_all(dir.0.join("cache")).unwrap();
        fs::write(dir.0.join("data/f"), "x").unwrap();
        let v = Volumes::open(&dir.0, &["/data", "/cache"], &["/data", "/cache"]).unwrap();
        assert!(matches!(v.rename("/data/f", "/cache/f"), Err(FileError::CrossVolume(_))));
        assert_eq!(
            answer(&v, &Streamed::default(), "/data/f", FileOp::Rename { to: "/cache/f".into() }),
            FileAnswer::Failed {
                failure: FileFailure::CrossDevice,
                message: "/cache/f: in another volume (moved by copying)".into(),
            }
        );
        // Named writable but not served: not writable.
        let v = Volumes::open(&dir.0, &["/data"], &["/cache"]).unwrap();
        assert!(matches!(v.create("/cache/g", 0o644), Err(FileError::ReadOnly(_))));
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
