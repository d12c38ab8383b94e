//! The kernel's side of a mount: a FUSE file system (fuser; the daemon, as root, mounts
//! with mount(2) itself), read-only unless `--mount-readwrite`, whose every operation is
//! one or more questions to [`Files`], answered on the daemon's runtime so that the FUSE
//! thread never waits.
//!
//! Inodes are paths in the container: the kernel's inode numbers are handed out per
//! path and kept while the mount lives (a rename moves the numbers of the entry and
//! everything under it). Attributes and names are cached by the kernel for at most
//! [`TTL`]; a file's pages are dropped on each open, so a file changed in the pod (or a
//! configMap whose `..data` the kubelet swapped) reads as it is now. Writes go through
//! to the pod as they are made (no write-back cache), in questions of at most
//! [`READ_MAX`] bytes.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};
use tpvpn_tunnel::files::{escape, plain_name, unescape, FileAnswer, FileAttr as Attr, FileKind, FileOp, READ_MAX};

use super::ahead::{self, errno, Reader};
use super::{Files, Opened};

/// How long the kernel may keep attributes and names.
pub const TTL: Duration = Duration::from_secs(1);

/// Paths by inode number (1 is `/`) and back.
#[derive(Default)]
struct Inodes {
    paths: Vec<String>,
    numbers: HashMap<String, u64>,
    /// FIFOs, sockets and devices seen: never opened.
    unopenable: HashSet<u64>,
}

impl Inodes {
    fn path(&self, ino: u64) -> Option<String> {
        self.paths.get(usize::try_from(ino).ok()?.checked_sub(1)?).cloned()
    }

    fn number(&mut self, path: &str) -> u64 {
        if let Some(n) = self.numbers.get(path) {
            return *n;
        }
        self.paths.push(path.to_string());
        let n = self.paths.len() as u64;
        self.numbers.insert(path.to_string(), n);
        n
    }

    /// `from` (and everything under it) is now `to`; what was at `to` is gone.
    fn renamed(&mut self, from: &str, to: &str) {
        self.numbers.retain(|p, _| !under(p, to));
        for (i, path) in self.paths.iter_mut().enumerate() {
            if under(path, from) {
                *path = format!("{to}{}", &path[from.len()..]);
                self.numbers.insert(path.clone(), i as u64 + 1);
            }
        }
        self.numbers.retain(|p, _| !under(p, from));
    }

    /// The number of `path`, which is of kind `kind`.
    fn seen(&mut self, path: &str, kind: FileKind) -> u64 {
        let n = self.number(path);
        if kind == FileKind::Other {
            self.unopenable.insert(n);
        } else {
            self.unopenable.remove(&n);
        }
        n
    }
}

/// Whether `path` is `dir` or in it.
fn under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `name` in directory `dir`.
fn child(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// One answer to a directory question: entries from `from` on, `next` where the next
/// page starts (0: none).
struct Page {
    from: u32,
    entries: Vec<(String, Attr)>,
    next: u32,
}

/// The last page answered per open directory. The kernel reads a directory a few dozen
/// entries at a time; every question of it that falls in the page at hand is answered
/// here, so a page of entries is asked of the pod once.
#[derive(Default)]
struct Pages {
    last_handle: u64,
    open: HashMap<u64, Arc<Page>>,
}

/// Open files, by the kernel's handle.
#[derive(Default)]
struct Readers {
    last_handle: u64,
    open: HashMap<u64, Arc<OpenFile>>,
    /// How many of them read ahead (at most [`READERS`]; others read as asked).
    ahead: usize,
}

/// One file the kernel opened: open in the pod too where the agent serves open files,
/// else read and written by path.
struct OpenFile {
    path: String,
    remote: Option<Opened>,
    reader: Option<tokio::sync::Mutex<Reader>>,
}

impl OpenFile {
    /// What asks the pod for its bytes.
    fn ask(files: &Arc<Files>, path: &str, remote: Option<Opened>) -> ahead::Ask {
        let (files, path) = (files.clone(), path.to_string());
        Arc::new(move |offset, len| {
            let (files, path) = (files.clone(), path.clone());
            Box::pin(async move {
                match remote {
                    Some(r) => files.ask_open(r, &path, FileOp::ReadOpen { handle: r.handle, offset, len }).await,
                    None => files.ask(&path, FileOp::Read { offset, len }).await,
                }
            })
        })
    }

    /// `size` bytes from `offset` (fewer at the end), ahead or as asked.
    async fn read(&self, files: &Arc<Files>, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        match &self.reader {
            Some(reader) => reader.lock().await.read(offset, size).await,
            None => ahead::read(&OpenFile::ask(files, &self.path, self.remote), offset, size).await,
        }
    }
}

/// The kernel may map (shared) a file opened with `FOPEN_DIRECT_IO`
/// (`FUSE_DIRECT_IO_ALLOW_MMAP`, Linux 6.6, a `flags2` bit: fuser's abi-7-36 feature
/// carries it; not among fuser's constants). Without it such a map would fail (`ENODEV`),
/// so open files are read through the page cache then.
const FUSE_DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;

/// How many open files read ahead at once (each holds up to `ahead::AHEAD` bytes).
const READERS: usize = 64;

/// The file system of one intercept's files.
struct Fs {
    files: Arc<Files>,
    rt: tokio::runtime::Handle,
    inodes: Arc<Mutex<Inodes>>,
    pages: Arc<Mutex<Pages>>,
    readers: Arc<Mutex<Readers>>,
    /// Who owns every file on the laptop: the user who ran `tpvpn up`.
    owner: (u32, u32),
    /// Mounted read-write (`--mount-readwrite`).
    write: bool,
    /// Files open in the pod are read past the page cache (`FOPEN_DIRECT_IO`).
    direct: bool,
}

impl Fs {
    /// What reads open directory `handle`.
    fn lister(&self, handle: u64) -> Lister {
        Lister { files: self.files.clone(), inodes: self.inodes.clone(), pages: self.pages.clone(), handle }
    }

    fn path(&self, ino: u64) -> Option<String> {
        self.inodes.lock().unwrap_or_else(|e| e.into_inner()).path(ino)
    }

    fn readers(&self) -> std::sync::MutexGuard<'_, Readers> {
        self.readers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the path of `ino` on the runtime, or answers `ENOENT`.
    fn on_path<R: Send + 'static>(
        &self,
        ino: u64,
        reply: R,
        error: fn(R, i32),
        f: impl FnOnce(Arc<Files>, String, R) -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    ) {
        match self.path(ino) {
            Some(path) => {
                let files = self.files.clone();
                self.rt.spawn(f(files, path, reply));
            }
            None => error(reply, libc::ENOENT),
        }
    }

    /// Runs `f` with the path of entry `name` of directory `parent` (as the protocol
    /// carries it: [`escape`]d), or answers `ENOENT`.
    fn on_entry<R: Send + 'static>(
        &self,
        (parent, name): (u64, &OsStr),
        reply: R,
        error: fn(R, i32),
        f: impl FnOnce(Arc<Files>, String, R) -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    ) {
        let name = escape(name.as_bytes());
        self.on_path(parent, reply, error, move |files, dir, reply| f(files, child(&dir, &name), reply));
    }

    /// Answers with the attributes of entry `name` of `parent` that `op` gives (a lookup,
    /// or the entry `op` made).
    fn entry(&self, (parent, name): (u64, &OsStr), op: FileOp, reply: ReplyEntry) {
        let (inodes, owner) = (self.inodes.clone(), self.owner);
        self.on_entry((parent, name), reply, ReplyEntry::error, move |files, path, reply| {
            Box::pin(async move {
                match files.ask(&path, op).await {
                    FileAnswer::Attr(a) => {
                        let ino = inodes.lock().unwrap_or_else(|e| e.into_inner()).seen(&path, a.kind);
                        reply.entry(&TTL, &attr(ino, &a, owner), 0);
                    }
                    other => reply.error(errno(other)),
                }
            })
        });
    }

    /// Asks `op` of entry `name` of `parent`, which answers nothing.
    fn change(&self, (parent, name): (u64, &OsStr), op: FileOp, reply: ReplyEmpty) {
        self.on_entry((parent, name), reply, ReplyEmpty::error, move |files, path, reply| {
            Box::pin(async move { done(files.ask(&path, op).await, reply) })
        });
    }
}

/// Answers a question that answers nothing.
fn done(answer: FileAnswer, reply: ReplyEmpty) {
    match answer {
        FileAnswer::Done => reply.ok(),
        other => reply.error(errno(other)),
    }
}

/// `t` as seconds since the epoch.
fn seconds(t: TimeOrNow) -> i64 {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => std::time::SystemTime::now(),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn attr(ino: u64, a: &Attr, (uid, gid): (u32, u32)) -> FileAttr {
    let time = if a.mtime >= 0 { UNIX_EPOCH + Duration::from_secs(a.mtime as u64) } else { UNIX_EPOCH };
    let (kind, perm) = match a.kind {
        FileKind::Dir => (FileType::Directory, a.mode),
        FileKind::File => (FileType::RegularFile, a.mode),
        FileKind::Symlink => (FileType::Symlink, a.mode),
        // A FIFO, socket or device: listed as an empty file nobody may open, never as
        // itself (the laptop's kernel would open a FIFO locally and wait for a writer).
        FileKind::Other => (FileType::RegularFile, 0),
    };
    FileAttr {
        ino,
        size: if a.kind == FileKind::Other { 0 } else { a.size },
        blocks: a.size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind,
        perm: (perm & 0o7777) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        use fuser::consts::{FUSE_DO_READDIRPLUS, FUSE_PARALLEL_DIROPS};
        // Reads of up to 1 MiB (fuser asks for max_pages from this), several in flight.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(FUSE_DO_READDIRPLUS | FUSE_PARALLEL_DIROPS);
        // A file open in the pod is read past the page cache (see `open`) where the
        // kernel lets such a file still be mapped (6.6); else through it, as before.
        self.direct = config.add_capabilities(FUSE_DIRECT_IO_ALLOW_MMAP).is_ok();
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        self.entry((parent, name), FileOp::Stat, reply);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let owner = self.owner;
        self.on_path(ino, reply, ReplyAttr::error, move |files, path, reply| {
            Box::pin(async move {
                match files.ask(&path, FileOp::Stat).await {
                    FileAnswer::Attr(a) => reply.attr(&TTL, &attr(ino, &a, owner)),
                    other => reply.error(errno(other)),
                }
            })
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        self.on_path(ino, reply, ReplyData::error, |files, path, reply| {
            Box::pin(async move {
                match files.ask(&path, FileOp::ReadLink).await {
                    FileAnswer::Target(t) => reply.data(&unescape(&t)),
                    other => reply.error(errno(other)),
                }
            })
        });
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY && !self.write {
            return reply.error(libc::EROFS);
        }
        if self.inodes.lock().unwrap_or_else(|e| e.into_inner()).unopenable.contains(&ino) {
            return reply.error(libc::EACCES);
        }
        // No FOPEN_KEEP_CACHE: each open reads the file as it is in the pod now, and
        // until it is closed that file, even if the pod replaces it meanwhile.
        let Some(path) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let (files, readers, direct) = (self.files.clone(), self.readers.clone(), self.direct);
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        self.rt.spawn(async move {
            let (remote, first) = match files.open_file(&path, write).await {
                Ok(Some((remote, first))) => (Some(remote), Some(first)),
                Ok(None) => (None, None),
                Err(answer) => return reply.error(errno(answer)),
            };
            let mut readers = readers.lock().unwrap_or_else(|e| e.into_inner());
            let reader = (readers.ahead < READERS).then(|| {
                let ask = OpenFile::ask(&files, &path, remote);
                tokio::sync::Mutex::new(match first {
                    Some(first) => Reader::opened(ask, first),
                    None => Reader::new(ask),
                })
            });
            readers.ahead += usize::from(reader.is_some());
            readers.last_handle += 1;
            let handle = readers.last_handle;
            readers.open.insert(handle, Arc::new(OpenFile { path, remote, reader }));
            // Open in the pod: read past the page cache, which is per inode (that is, per
            // path here) and would give this handle the pages another open read of the
            // file that replaced this one.
            let flags = if direct && remote.is_some() { fuser::consts::FOPEN_DIRECT_IO } else { 0 };
            reply.opened(handle, flags);
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let open = {
            let mut readers = self.readers();
            let open = readers.open.remove(&fh);
            readers.ahead -= open.as_ref().map_or(0, |o| usize::from(o.reader.is_some()));
            open
        };
        reply.ok();
        if let Some((remote, open)) = open.and_then(|o| Some((o.remote?, o))) {
            let files = self.files.clone();
            self.rt.spawn(async move { files.close(remote, &open.path).await });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(libc::EINVAL) };
        let open = self.readers().open.get(&fh).cloned();
        self.on_path(ino, reply, ReplyData::error, move |files, path, reply| {
            Box::pin(async move {
                let read = match open {
                    Some(open) => open.read(&files, offset, size).await,
                    None => ahead::read(&OpenFile::ask(&files, &path, None), offset, size).await,
                };
                match read {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(e),
                }
            })
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(libc::EINVAL) };
        let Ok(len) = u32::try_from(data.len()) else { return reply.error(libc::EFBIG) };
        let data = data.to_vec();
        let open = self.readers().open.get(&fh).cloned();
        self.on_path(ino, reply, ReplyWrite::error, move |files, path, reply| {
            Box::pin(async move {
                // What this handle read ahead is not the file any more.
                if let Some(reader) = open.as_ref().and_then(|o| o.reader.as_ref()) {
                    reader.lock().await.reset(0);
                }
                // In questions of at most READ_MAX, asked together; all written or an error.
                let chunks = data.chunks(READ_MAX as usize).enumerate().map(|(i, chunk)| {
                    let at = offset + (i * READ_MAX as usize) as u64;
                    let (files, path, remote) = (files.clone(), path.clone(), open.as_ref().and_then(|o| o.remote));
                    async move {
                        match remote {
                            Some(r) => {
                                let op = FileOp::WriteOpen { handle: r.handle, offset: at, data: chunk.to_vec() };
                                files.ask_open(r, &path, op).await
                            }
                            None => files.ask(&path, FileOp::Write { offset: at, data: chunk.to_vec() }).await,
                        }
                    }
                });
                for answer in futures::future::join_all(chunks).await {
                    if answer != FileAnswer::Done {
                        return reply.error(errno(answer));
                    }
                }
                reply.written(len);
            })
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let (inodes, owner) = (self.inodes.clone(), self.owner);
        self.on_entry((parent, name), reply, ReplyCreate::error, move |files, path, reply| {
            Box::pin(async move {
                match files.ask(&path, FileOp::Create { mode: mode & 0o7777 }).await {
                    FileAnswer::Attr(a) => {
                        let ino = inodes.lock().unwrap_or_else(|e| e.into_inner()).seen(&path, a.kind);
                        reply.created(&TTL, &attr(ino, &a, owner), 0, 0, 0);
                    }
                    other => reply.error(errno(other)),
                }
            })
        });
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        self.entry((parent, name), FileOp::MakeDir { mode: mode & 0o7777 }, reply);
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.change((parent, name), FileOp::Remove, reply);
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.change((parent, name), FileOp::RemoveDir, reply);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        // RENAME_NOREPLACE and RENAME_EXCHANGE are not carried.
        if flags != 0 {
            return reply.error(libc::EINVAL);
        }
        let Some(to_dir) = self.path(new_parent) else { return reply.error(libc::ENOENT) };
        let to_name = escape(new_name.as_bytes());
        let inodes = self.inodes.clone();
        self.on_entry((parent, name), reply, ReplyEmpty::error, move |files, from, reply| {
            Box::pin(async move {
                let to = child(&to_dir, &to_name);
                let answer = files.ask(&from, FileOp::Rename { to: to.clone() }).await;
                if answer == FileAnswer::Done {
                    inodes.lock().unwrap_or_else(|e| e.into_inner()).renamed(&from, &to);
                }
                done(answer, reply)
            })
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // Every file is the laptop user's here; the pod's owners are not changed from it.
        if uid.is_some_and(|u| u != self.owner.0) || gid.is_some_and(|g| g != self.owner.1) {
            return reply.error(libc::EPERM);
        }
        // The access time alone is not kept (the pod's volumes are read as they are).
        let op = FileOp::SetAttr { size, mode: mode.map(|m| m & 0o7777), mtime: mtime.map(seconds) };
        let owner = self.owner;
        self.on_path(ino, reply, ReplyAttr::error, move |files, path, reply| {
            Box::pin(async move {
                let op =
                    if op == (FileOp::SetAttr { size: None, mode: None, mtime: None }) { FileOp::Stat } else { op };
                match files.ask(&path, op).await {
                    FileAnswer::Attr(a) => reply.attr(&TTL, &attr(ino, &a, owner)),
                    other => reply.error(errno(other)),
                }
            })
        });
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        self.on_path(ino, reply, ReplyEmpty::error, |files, path, reply| {
            Box::pin(async move { done(files.ask(&path, FileOp::Sync).await, reply) })
        });
    }

    /// Writes reached the pod when they were answered: nothing is left to flush.
    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        pages.last_handle += 1;
        reply.opened(pages.last_handle, 0);
    }

    fn releasedir(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _flags: i32, reply: fuser::ReplyEmpty) {
        self.pages.lock().unwrap_or_else(|e| e.into_inner()).open.remove(&fh);
        reply.ok();
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let Some(dir) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let lister = self.lister(fh);
        self.rt.spawn(async move {
            let listed = lister
                .list((&dir, ino), offset, |ino, next, name, a| reply.add(ino, next, attr(ino, a, (0, 0)).kind, name));
            match listed.await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    /// Entries with their attributes: `ls -l` of a directory in one question per page,
    /// not one per entry.
    fn readdirplus(&mut self, _req: &Request<'_>, ino: u64, fh: u64, offset: i64, mut reply: ReplyDirectoryPlus) {
        let Some(dir) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let (lister, owner) = (self.lister(fh), self.owner);
        self.rt.spawn(async move {
            let listed = lister.list((&dir, ino), offset, |ino, next, name, a| {
                reply.add(ino, next, name, &TTL, &attr(ino, a, owner), 0)
            });
            match listed.await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }
}

/// What "." and ".." are listed with.
const DOT: Attr = Attr { kind: FileKind::Dir, size: 0, mode: 0o755, mtime: 0 };

/// Reads one open directory.
struct Lister {
    files: Arc<Files>,
    inodes: Arc<Mutex<Inodes>>,
    pages: Arc<Mutex<Pages>>,
    handle: u64,
}

impl Lister {
    /// The page holding entry `from`: the one at hand, or a new one asked of the pod.
    async fn page(&self, dir: &str, from: u32) -> Result<Arc<Page>, i32> {
        let at_hand = self.pages.lock().unwrap_or_else(|e| e.into_inner()).open.get(&self.handle).cloned();
        if let Some(page) = at_hand.filter(|p| from >= p.from && (from - p.from) as usize <= p.entries.len()) {
            // In it, or just past its end: there, `next` says where to go on (or stop).
            if (from - page.from) as usize != page.entries.len() || page.next == 0 {
                return Ok(page);
            }
        }
        let page = match self.files.ask(dir, FileOp::ReadDir { from }).await {
            FileAnswer::Entries { entries, next } => Arc::new(Page { from, entries, next }),
            other => return Err(errno(other)),
        };
        self.pages.lock().unwrap_or_else(|e| e.into_inner()).open.insert(self.handle, page.clone());
        Ok(page)
    }

    /// Lists directory `dir` (inode `ino`) from `offset`, giving each entry (its inode,
    /// the offset after it, its name and attributes) to `add` until `add` says the reply
    /// is full. Offsets: 1 after ".", 2 after "..", 2 + n after the nth entry.
    async fn list(
        &self,
        (dir, ino): (&str, u64),
        offset: i64,
        mut add: impl FnMut(u64, i64, &OsStr, &Attr) -> bool,
    ) -> Result<(), i32> {
        let mut at = u64::try_from(offset).unwrap_or(0);
        for (dot, name) in [(0, "."), (1, "..")] {
            if at == dot {
                if add(ino, dot as i64 + 1, OsStr::new(name), &DOT) {
                    return Ok(());
                }
                at = dot + 1;
            }
        }
        let mut from = u32::try_from(at - 2).unwrap_or(u32::MAX);
        loop {
            let page = self.page(dir, from).await?;
            for (name, a) in &page.entries[(from - page.from) as usize..] {
                from += 1;
                let local = unescape(name);
                // Never a name the kernel would take for a path (from a faulty agent).
                if !plain_name(&local) {
                    continue;
                }
                let ino = self.inodes.lock().unwrap_or_else(|e| e.into_inner()).seen(&child(dir, name), a.kind);
                if add(ino, 2 + i64::from(from), OsStr::from_bytes(&local), a) {
                    return Ok(());
                }
            }
            if page.next == 0 {
                return Ok(());
            }
            from = page.next;
        }
    }
}

/// Mounts `files` at `dir` (named `tpvpn:NAME` in the mount table), read-only unless
/// they were opened for writing.
pub fn mount(
    files: Arc<Files>,
    rt: tokio::runtime::Handle,
    name: &str,
    dir: &Path,
) -> std::io::Result<fuser::BackgroundSession> {
    let mut inodes = Inodes::default();
    inodes.number("/");
    let write = files.writable();
    let fs = Fs {
        files,
        rt,
        inodes: Arc::new(Mutex::new(inodes)),
        pages: Arc::default(),
        readers: Arc::default(),
        owner: crate::os::user::invoking(),
        write,
        direct: false,
    };
    let options = [
        if write { MountOption::RW } else { MountOption::RO },
        MountOption::FSName(format!("tpvpn:{name}")),
        MountOption::Subtype("tpvpn".into()),
        // The daemon mounts as root for the user who ran `tpvpn up`, who owns every
        // file there; the kernel checks the pod's permission bits.
        MountOption::AllowOther,
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    fuser::spawn_mount2(fs, dir, &options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inodes_are_stable_per_path_and_children_join_their_directory() {
        let mut i = Inodes::default();
        assert_eq!(i.number("/"), 1);
        assert_eq!(i.number("/etc"), 2);
        assert_eq!(i.number("/"), 1);
        assert_eq!(i.path(2).as_deref(), Some("/etc"));
        assert_eq!(i.path(0), None);
        assert_eq!(i.path(9), None);
        assert_eq!(child("/", "etc"), "/etc");
        assert_eq!(child("/etc", "config"), "/etc/config");
    }

    #[test]
    fn a_rename_moves_the_numbers_of_the_entry_and_what_is_under_it() {
        let mut i = Inodes::default();
        for p in ["/", "/data", "/data/a", "/data/a/f", "/data/ab", "/data/b"] {
            i.number(p);
        }
        i.renamed("/data/a", "/data/b");
        assert_eq!(i.path(3).as_deref(), Some("/data/b"));
        assert_eq!(i.path(4).as_deref(), Some("/data/b/f"));
        assert_eq!(i.path(5).as_deref(), Some("/data/ab"), "a sibling sharing the prefix stays");
        assert_eq!(i.number("/data/b"), 3, "the replaced entry's number is gone");
        assert_eq!(i.number("/data/b/f"), 4);
        assert_eq!(i.number("/data/a"), 7, "a new entry where the old was");
    }
}
