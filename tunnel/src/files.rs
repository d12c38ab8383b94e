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
//! Memory is bounded on both sides whatever a volume holds: a read returns at most
//! [`READ_MAX`] bytes, a directory comes in pages of at most [`DIR_PAGE`] entries.

/// The most bytes one [`FileOp::Read`] returns (one frame carries it).
pub const READ_MAX: u32 = 512 * 1024;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// Its attributes, not following a symlink.
    Stat,
    /// A directory's entries from the `from`th (a page of at most [`DIR_PAGE`]).
    ReadDir { from: u32 },
    /// At most `len` (≤ [`READ_MAX`]) bytes of a regular file from `offset`.
    Read { offset: u64, len: u32 },
    /// A symlink's target.
    ReadLink,
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
    Failed {
        failure: FileFailure,
        message: String,
    },
}
