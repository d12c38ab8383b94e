//! The file protocol of `tpvpn intercept --mount` (issue 23): a laptop reads the volume
//! mounts of an intercepted container through the manager from the node's agent.
//!
//! A stream starts with [`crate::Message::FilesOpen`] (client to manager: which
//! intercept; manager to agent: which container and which of its `mountPath`s) and is
//! answered with `Ack` (what is served, what was left out and why) or `Error`. Then the
//! client sends [`crate::Message::FileRequest`]s, each naming an absolute path inside
//! the container, and the agent answers each with a [`crate::Message::FileReply`] of the
//! same `id`, in order. The protocol is by path, not by handle: a file replaced in the
//! pod (the kubelet swapping a configMap's `..data`) is read as it is now, never as the
//! one a handle was opened on. Symlinks are reported, never followed, by the agent; the
//! reader follows them as a kernel does over FUSE.
//!
//!
//! Open files (both peers with [`crate::handshake::FEATURE_FILE_HANDLES`]): the
//! client's `FilesOpen` says `handles` when its manager has the bit, and the manager
//! answers `FilesReady` (instead of `Ack`) saying whether the agent takes them. Then the
//! client opens each file the kernel opens ([`FileOp::Open`]) and reads and writes that
//! file by its handle until it closes it, as a process does: a file replaced in the pod
//! meanwhile (a new file at the path) is not confused with the one opened, and the next
//! open reads the new one. Handles belong to their stream: on a new stream (the pod gone,
//! the connection replaced) an old handle is [`FileFailure::Stale`]. An agent keeps at
//! most [`OPEN_MAX`] per stream ([`FileFailure::TooMany`] beyond; the client then reads
//! that file by path).
//!
//! Read-write mounts (`--mount-readwrite`, both peers with
//! [`crate::handshake::FEATURE_FILES_WRITE`]): the client's `FilesOpen` names in
//! `writable` where it asks to write (`/`: wherever it may), the manager's names the
//! `mountPath`s of the volumes that may be written (emptyDir, PVC, not mounted
//! `readOnly`); the write operations then change files there, and anywhere else are
//! refused with [`FileFailure::ReadOnly`].
//!
//! Names are bytes on Linux, and not always UTF-8; the protocol's strings are. A name
//! travels [`escape`]d: valid UTF-8 as it is, every other byte `b` as the character
//! `U+10FF00 + b` (the last 256 of the private-use plane 16; a name's own characters
//! from that range are escaped byte by byte too, so that every name comes back exact
//! through [`unescape`]). A peer from before sees such a name as odd characters, and can
//! still ask for it by them.
//!
//! Memory is bounded on both sides whatever a volume holds: a read returns and a write
//! carries at most [`READ_MAX`] bytes, a directory comes in pages of at most
//! [`DIR_PAGE`] entries.

/// The most bytes one [`FileOp::Read`] returns or one [`FileOp::Write`] carries (one
/// frame carries it).
pub const READ_MAX: u32 = 512 * 1024;

/// The most files open at once on one stream.
pub const OPEN_MAX: usize = 256;

/// The most entries one [`FileAnswer::Entries`] carries.
pub const DIR_PAGE: u32 = 512;

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    /// A FIFO, socket or device: listed, never opened.
    Other,
}

impl From<u8> for FileKind {
    fn from(b: u8) -> FileKind {
        match b {
            1 => FileKind::Dir,
            2 => FileKind::File,
            3 => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }
}

impl From<FileKind> for u8 {
    fn from(k: FileKind) -> u8 {
        match k {
            FileKind::Dir => 1,
            FileKind::File => 2,
            FileKind::Symlink => 3,
            FileKind::Other => 4,
        }
    }
}

/// An entry's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileAttr {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// What a request asks of its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// Its attributes, not following a symlink.
    Stat,
    /// A directory's entries from the `from`th (a page of at most [`DIR_PAGE`]).
    ReadDir { from: u32 },
    /// At most `len` (≤ [`READ_MAX`]) bytes of a regular file from `offset`.
    Read { offset: u64, len: u32 },
    /// A symlink's target.
    ReadLink,
    /// Writes `data` (at most [`READ_MAX`] bytes) into a regular file at `offset`, all of
    /// it or nothing; answered [`FileAnswer::Done`].
    Write { offset: u64, data: Vec<u8> },
    /// Creates a regular file that is not there yet; answered with its attributes.
    Create { mode: u32 },
    /// Creates a directory; answered with its attributes.
    MakeDir { mode: u32 },
    /// Removes a file or symlink ([`FileFailure::IsDir`] for a directory).
    Remove,
    /// Removes an empty directory.
    RemoveDir,
    /// Moves the entry to `to` (in the same volume, else [`FileFailure::CrossDevice`]),
    /// replacing what is there as `rename(2)` does.
    Rename { to: String },
    /// Changes what is given (a regular file's size; a file's or directory's permission
    /// bits and modification time); answered with the attributes after.
    SetAttr { size: Option<u64>, mode: Option<u32>, mtime: Option<i64> },
    /// Flushes a regular file to its storage (`fsync`).
    Sync,
    /// Opens regular file `path` (for writing too: `write`) and reads its first `read`
    /// bytes (at most [`READ_MAX`]: a small file in one round trip); answered
    /// [`FileAnswer::Opened`].
    Open { write: bool, read: u32 },
    /// At most `len` (≤ [`READ_MAX`]) bytes of the file open as `handle` from `offset`
    /// (`path` only names it in messages).
    ReadOpen { handle: u32, offset: u64, len: u32 },
    /// Writes `data` (at most [`READ_MAX`] bytes) into the file open as `handle` (for
    /// writing), all of it or nothing; answered [`FileAnswer::Done`].
    WriteOpen { handle: u32, offset: u64, data: Vec<u8> },
    /// Forgets `handle`; answered [`FileAnswer::Done`].
    Close { handle: u32 },
}

impl FileOp {
    /// Whether it changes the volume (refused outside writable mounts).
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            FileOp::Stat
                | FileOp::ReadDir { .. }
                | FileOp::Read { .. }
                | FileOp::ReadLink
                | FileOp::Open { write: false, .. }
                | FileOp::ReadOpen { .. }
                | FileOp::Close { .. }
        )
    }
}

/// Why a request failed, as the laptop's kernel is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFailure {
    /// No such entry (`ENOENT`).
    NotFound,
    /// Not served: outside the volume mounts, through a symlink, or not a regular file
    /// (`EACCES`).
    Denied,
    /// Not a directory (`ENOTDIR`).
    NotDir,
    /// Not a symlink, or a request that makes no sense (`EINVAL`).
    Invalid,
    /// The container is gone or the read failed (`EIO`).
    Io,
    /// A write where the volume is read-only (`EROFS`).
    ReadOnly,
    /// Created where something is already (`EEXIST`).
    Exists,
    /// A directory removed that is not empty (`ENOTEMPTY`).
    NotEmpty,
    /// A directory where a file was expected (`EISDIR`).
    IsDir,
    /// Moved from one volume to another (`EXDEV`: `mv` copies instead).
    CrossDevice,
    /// The volume is full (`ENOSPC`).
    NoSpace,
    /// A handle of another stream, or closed (`ESTALE`).
    Stale,
    /// More files open on the stream than [`OPEN_MAX`] (`ENFILE`).
    TooMany,
    /// A kind this version does not know.
    Other(u8),
}

impl FileFailure {
    /// The errno a FUSE front end answers with.
    pub fn errno(self) -> i32 {
        match self {
            FileFailure::NotFound => 2,                   // ENOENT
            FileFailure::Denied => 13,                    // EACCES
            FileFailure::NotDir => 20,                    // ENOTDIR
            FileFailure::Invalid => 22,                   // EINVAL
            FileFailure::ReadOnly => 30,                  // EROFS
            FileFailure::Exists => 17,                    // EEXIST
            FileFailure::NotEmpty => 39,                  // ENOTEMPTY
            FileFailure::IsDir => 21,                     // EISDIR
            FileFailure::CrossDevice => 18,               // EXDEV
            FileFailure::NoSpace => 28,                   // ENOSPC
            FileFailure::Stale => 116,                    // ESTALE
            FileFailure::TooMany => 23,                   // ENFILE
            FileFailure::Io | FileFailure::Other(_) => 5, // EIO
        }
    }
}

impl From<u8> for FileFailure {
    fn from(b: u8) -> FileFailure {
        match b {
            1 => FileFailure::NotFound,
            2 => FileFailure::Denied,
            3 => FileFailure::NotDir,
            4 => FileFailure::Invalid,
            5 => FileFailure::Io,
            6 => FileFailure::ReadOnly,
            7 => FileFailure::Exists,
            8 => FileFailure::NotEmpty,
            9 => FileFailure::IsDir,
            10 => FileFailure::CrossDevice,
            11 => FileFailure::NoSpace,
            12 => FileFailure::Stale,
            13 => FileFailure::TooMany,
            other => FileFailure::Other(other),
        }
    }
}

impl From<FileFailure> for u8 {
    fn from(f: FileFailure) -> u8 {
        match f {
            FileFailure::NotFound => 1,
            FileFailure::Denied => 2,
            FileFailure::NotDir => 3,
            FileFailure::Invalid => 4,
            FileFailure::Io => 5,
            FileFailure::ReadOnly => 6,
            FileFailure::Exists => 7,
            FileFailure::NotEmpty => 8,
            FileFailure::IsDir => 9,
            FileFailure::CrossDevice => 10,
            FileFailure::NoSpace => 11,
            FileFailure::Stale => 12,
            FileFailure::TooMany => 13,
            FileFailure::Other(b) => b,
        }
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileAnswer {
    Attr(FileAttr),
    /// A page of entries; `next` is where the next page starts, 0 at the end.
    Entries {
        entries: Vec<(String, FileAttr)>,
        next: u32,
    },
    Data(Vec<u8>),
    Target(String),
    /// A write operation done, with nothing to tell.
    Done,
    /// A file opened: its handle on this stream, its attributes then and its first bytes.
    Opened {
        handle: u32,
        attr: FileAttr,
        data: Vec<u8>,
    },
    Failed {
        failure: FileFailure,
        message: String,
    },
}

/// The first of the 256 characters that stand for one byte each in an escaped name.
const ESCAPE_BASE: u32 = 0x10_FF00;

/// `name` (or a path: `/` is kept as it is) as the protocol carries it; see the module
/// documentation. [`unescape`] gives `name` back, whatever its bytes.
pub fn escape(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    let byte = |out: &mut String, b: u8| out.push(char::from_u32(ESCAPE_BASE + u32::from(b)).unwrap_or('\u{FFFD}'));
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if u32::from(c) >= ESCAPE_BASE {
                c.encode_utf8(&mut [0; 4]).bytes().for_each(|b| byte(&mut out, b));
            } else {
                out.push(c);
            }
        }
        chunk.invalid().iter().for_each(|&b| byte(&mut out, b));
    }
    out
}

/// The bytes that escaped `name` stands for (a name without escapes: its UTF-8).
pub fn unescape(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    for c in name.chars() {
        match u32::from(c).checked_sub(ESCAPE_BASE) {
            Some(b) => out.push(b as u8),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// Whether unescaped `name` is one entry's name: not empty, `.` or `..`, and without a
/// `/` or a NUL (an escape can stand for any byte: a reader checks the bytes).
pub fn plain_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_utf8_travel_exact_and_plain_ones_unchanged() {
        assert_eq!(escape(b"app.conf"), "app.conf");
        assert_eq!(escape("d\u{e9}j\u{e0} vu/\u{1F600}".as_bytes()), "d\u{e9}j\u{e0} vu/\u{1F600}");
        let latin1 = b"caf\xe9\n.txt";
        let escaped = escape(latin1);
        assert_eq!(escaped, "caf\u{10FFE9}\n.txt");
        assert_eq!(unescape(&escaped), latin1);
        // A name's own characters from the escape range are escaped too.
        let odd = "x\u{10FF41}".as_bytes();
        assert_ne!(escape(odd), "x\u{10FF41}");
        assert_eq!(unescape(&escape(odd)), odd);
        for bytes in [&b"\xff\xfe"[..], b"\xc3", b"a\xf4\x8f\xbc\x80b", b"", b"/\x80/"] {
            assert_eq!(unescape(&escape(bytes)), bytes, "{bytes:?}");
        }
        // Only an escape stands for `/` or NUL: the reader of a name checks its bytes.
        assert_eq!(unescape("\u{10FF2F}"), b"/");
        assert!(!plain_name(&unescape("\u{10FF2F}")) && !plain_name(&unescape("a\u{10FF00}")));
        assert!(!plain_name(&unescape("\u{10FF2E}\u{10FF2E}")) && !plain_name(b""));
        assert!(plain_name(&unescape(&escape(b"\xff..\n"))));
    }
}
