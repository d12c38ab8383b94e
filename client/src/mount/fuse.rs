//! The kernel's side of a mount: a read-only FUSE file system (fuser; the daemon, as
//! root, mounts with mount(2) itself) whose every operation is one or more questions to
//! [`Files`], answered on the daemon's runtime so that the FUSE thread never waits.
//!
//! Inodes are paths in the container: the kernel's inode numbers are handed out per
//! path and kept while the mount lives. Attributes and names are cached by the kernel
//! for at most [`TTL`]; a file's pages are dropped on each open, so a file changed in the
//! pod (or a configMap whose `..data` the kubelet swapped) reads as it is now.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEntry, ReplyOpen, Request,
};
use tpvpn_tunnel::files::{FileAnswer, FileAttr as Attr, FileKind, FileOp, READ_MAX};

use super::Files;

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

/// The read-only file system of one intercept's files.
struct Fs {
    files: Arc<Files>,
    rt: tokio::runtime::Handle,
    inodes: Arc<Mutex<Inodes>>,
    pages: Arc<Mutex<Pages>>,
    /// Who owns every file on the laptop: the user who ran `tpvpn up`.
    owner: (u32, u32),
}

impl Fs {
    /// What reads open directory `handle`.
    fn lister(&self, handle: u64) -> Lister {
        Lister { files: self.files.clone(), inodes: self.inodes.clone(), pages: self.pages.clone(), handle }
    }

    fn path(&self, ino: u64) -> Option<String> {
        self.inodes.lock().unwrap_or_else(|e| e.into_inner()).path(ino)
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

fn errno(answer: FileAnswer) -> i32 {
    match answer {
        FileAnswer::Failed { failure, .. } => failure.errno(),
        _ => libc::EIO,
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        use fuser::consts::{FUSE_DO_READDIRPLUS, FUSE_PARALLEL_DIROPS};
        // Reads of up to 1 MiB (fuser asks for max_pages from this), several in flight.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(FUSE_DO_READDIRPLUS | FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().map(str::to_string) else { return reply.error(libc::ENOENT) };
        let (inodes, owner) = (self.inodes.clone(), self.owner);
        self.on_path(parent, reply, ReplyEntry::error, move |files, dir, reply| {
            Box::pin(async move {
                let path = child(&dir, &name);
                match files.ask(&path, FileOp::Stat).await {
                    FileAnswer::Attr(a) => {
                        let ino = inodes.lock().unwrap_or_else(|e| e.into_inner()).seen(&path, a.kind);
                        reply.entry(&TTL, &attr(ino, &a, owner), 0);
                    }
                    other => reply.error(errno(other)),
                }
            })
        });
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
                    FileAnswer::Target(t) => reply.data(t.as_bytes()),
                    other => reply.error(errno(other)),
                }
            })
        });
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        if self.inodes.lock().unwrap_or_else(|e| e.into_inner()).unopenable.contains(&ino) {
            return reply.error(libc::EACCES);
        }
        // No FOPEN_KEEP_CACHE: each open reads the file as it is in the pod now.
        reply.opened(0, 0);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(libc::EINVAL) };
        self.on_path(ino, reply, ReplyData::error, move |files, path, reply| {
            Box::pin(async move {
                // In questions of at most READ_MAX, asked together; a short one ends the file.
                let chunks = (0..size.div_ceil(READ_MAX)).map(|i| {
                    let (at, len) = (offset + u64::from(i * READ_MAX), (size - i * READ_MAX).min(READ_MAX));
                    let (files, path) = (files.clone(), path.clone());
                    async move { (len, files.ask(&path, FileOp::Read { offset: at, len }).await) }
                });
                let mut data = Vec::with_capacity(size as usize);
                for (len, answer) in futures::future::join_all(chunks).await {
                    match answer {
                        FileAnswer::Data(d) => {
                            data.extend_from_slice(&d);
                            if d.len() < len as usize {
                                break;
                            }
                        }
                        other => return reply.error(errno(other)),
                    }
                }
                reply.data(&data);
            })
        });
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
        mut add: impl FnMut(u64, i64, &str, &Attr) -> bool,
    ) -> Result<(), i32> {
        let mut at = u64::try_from(offset).unwrap_or(0);
        for (dot, name) in [(0, "."), (1, "..")] {
            if at == dot {
                if add(ino, dot as i64 + 1, name, &DOT) {
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
                let ino = self.inodes.lock().unwrap_or_else(|e| e.into_inner()).seen(&child(dir, name), a.kind);
                if add(ino, 2 + i64::from(from), name, a) {
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

/// Mounts `files` read-only at `dir` (named `tpvpn:NAME` in the mount table).
pub fn mount(
    files: Arc<Files>,
    rt: tokio::runtime::Handle,
    name: &str,
    dir: &Path,
) -> std::io::Result<fuser::BackgroundSession> {
    let mut inodes = Inodes::default();
    inodes.number("/");
    let fs = Fs {
        files,
        rt,
        inodes: Arc::new(Mutex::new(inodes)),
        pages: Arc::default(),
        owner: crate::os::user::invoking(),
    };
    let options = [
        MountOption::RO,
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
}
