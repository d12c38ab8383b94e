//! `tpvpn intercept --mount DIR`: the intercepted container's volume mounts under `DIR`
//! on the laptop, live, read-only or with `--mount-readwrite` writable where the pod may
//! write (issue 23).
//!
//! [`Files`] asks the node's agent, through the manager, one file question at a time
//! over one stream ([`tpvpn_tunnel::files`]); a lost stream (the connection replaced, the
//! pod gone) is opened again on the next question, which the manager sends to a captured
//! pod of the intercept then. The kernel's side is [`fuse`] (Linux; the file protocol
//! does not depend on it, so that a macOS front end, macFUSE or a loopback NFS server,
//! can be added). [`Mounts`] keeps what the daemon mounted, and records it in the
//! runtime directory so that the next `up` or `down` removes a mount a crash left.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};
use tpvpn_tunnel::files::{FileAnswer, FileFailure, FileOp};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::Message;
use tracing::{debug, info, warn};

use crate::Error;

pub mod ahead;
#[cfg(target_os = "linux")]
pub mod fuse;

/// The connection file streams are opened on: the daemon's current one, and the
/// features of its manager.
pub type Connection = watch::Receiver<Option<(quinn::Connection, u64)>>;

/// A question for the pump of one stream, and where its answer goes.
type Question = (String, FileOp, oneshot::Sender<FileAnswer>);

/// One stream of file questions.
#[derive(Clone)]
struct Stream {
    questions: mpsc::UnboundedSender<Question>,
    /// Which of the streams of these files it is (handles belong to one).
    number: u64,
    /// Its agent serves open files ([`FileOp::Open`]).
    handles: bool,
}

impl Stream {
    /// Asks `op` of `path`; `None` if the stream ended first.
    async fn ask(&self, path: &str, op: FileOp) -> Option<FileAnswer> {
        let (tx, rx) = oneshot::channel();
        self.questions.send((path.to_string(), op, tx)).ok()?;
        rx.await.ok()
    }
}

/// A file open in the pod ([`Files::open_file`]): its handle on stream `stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub handle: u32,
    stream: u64,
}

/// The files of one intercept, asked over the tunnel.
pub struct Files {
    namespace: String,
    service: String,
    /// Asked for read-write (`--mount-readwrite`).
    write: bool,
    conn: Connection,
    stream: tokio::sync::Mutex<Option<Stream>>,
    /// Streams opened so far.
    streams: std::sync::atomic::AtomicU64,
}

impl Files {
    /// Opens the files of the client's intercept of `namespace/service` (`write`: for
    /// read-write); what the manager says is served (and left out).
    pub async fn open(
        conn: Connection,
        (namespace, service): (&str, &str),
        write: bool,
    ) -> Result<(Arc<Files>, String), Error> {
        let files = Files {
            namespace: namespace.into(),
            service: service.into(),
            write,
            conn,
            stream: tokio::sync::Mutex::new(None),
            streams: Default::default(),
        };
        let (stream, said) = files.connect().await?;
        *files.stream.lock().await = Some(stream);
        Ok((Arc::new(files), said))
    }

    /// A new stream: asked, answered `Ack` (or `FilesReady`), then pumped by a task of its
    /// own.
    async fn connect(&self) -> Result<(Stream, String), Error> {
        let (conn, features) =
            self.conn.borrow().clone().ok_or_else(|| Error::System("not connected to the manager".into()))?;
        let open = Message::FilesOpen {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            container_id: String::new(),
            mounts: Vec::new(),
            // Wherever the manager lets it.
            writable: if self.write { vec!["/".into()] } else { Vec::new() },
            // Only to a manager that takes it (an older one would refuse the frame).
            handles: features & tpvpn_tunnel::handshake::FEATURE_FILE_HANDLES != 0,
        };
        let opened = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_message(&mut send, &open).await?;
            match read_message(&mut recv).await? {
                Some(Message::Ack { message }) => Ok((send, recv, message, false)),
                Some(Message::FilesReady { message, handles }) => Ok((send, recv, message, handles)),
                Some(Message::Error { code, message, .. }) => Err(Error::Refused { code: Some(code), message }),
                Some(other) => Err(crate::intercept::unexpected(other)),
                None => Err(Error::Protocol("the manager closed the file stream".into())),
            }
        };
        let (send, recv, said, handles) = tokio::time::timeout(crate::intercept::REQUEST_TIMEOUT, opened)
            .await
            .map_err(|_| Error::System("the manager did not open the files in time".into()))??;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(pump(send, recv, rx));
        let number = self.streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((Stream { questions: tx, number, handles }, said))
    }

    /// The stream questions go on: the one at hand, or a new one if it ended.
    async fn stream(&self) -> Result<Stream, FileAnswer> {
        let mut stream = self.stream.lock().await;
        if let Some(s) = stream.as_ref().filter(|s| !s.questions.is_closed()) {
            return Ok(s.clone());
        }
        let (s, said) = self.connect().await.map_err(|e| failed(FileFailure::Io, e.to_string()))?;
        info!(namespace = %self.namespace, service = %self.service, %said, "file stream opened again");
        *stream = Some(s.clone());
        Ok(s)
    }

    /// Whether they were opened for writing.
    pub fn writable(&self) -> bool {
        self.write
    }

    /// What `op` gives on `path`; a failure (`EIO`) when the pod cannot be asked now.
    pub async fn ask(&self, path: &str, op: FileOp) -> FileAnswer {
        // A stream that ended is replaced once per question; a question that may have
        // been carried out is asked again only if doing it twice changes nothing.
        let again = !matches!(
            op,
            FileOp::Create { .. } | FileOp::MakeDir { .. } | FileOp::Remove | FileOp::RemoveDir | FileOp::Rename { .. }
        );
        for _ in 0..2 {
            let stream = match self.stream().await {
                Ok(s) => s,
                Err(answer) => return answer,
            };
            match stream.ask(path, op.clone()).await {
                Some(answer) => return answer,
                None if again => continue,
                None => break,
            }
        }
        failed(FileFailure::Io, "the file stream ended".into())
    }

    /// Opens regular file `path` in the pod (for writing too: `write`), to be read and
    /// written by [`Files::ask_open`] as it is now even if the pod replaces it, and its
    /// first [`ahead::FIRST`] bytes; `None` where the agent does not serve open files (or
    /// has too many open): then it is read by path.
    pub async fn open_file(&self, path: &str, write: bool) -> Result<Option<(Opened, Vec<u8>)>, FileAnswer> {
        for _ in 0..2 {
            let stream = self.stream().await?;
            if !stream.handles {
                return Ok(None);
            }
            match stream.ask(path, FileOp::Open { write, read: ahead::FIRST }).await {
                Some(FileAnswer::Opened { handle, data, .. }) => {
                    return Ok(Some((Opened { handle, stream: stream.number }, data)))
                }
                Some(FileAnswer::Failed { failure: FileFailure::TooMany, .. }) => return Ok(None),
                Some(other) => return Err(other),
                None => continue,
            }
        }
        Err(failed(FileFailure::Io, "the file stream ended".into()))
    }

    /// What `op` (by handle) gives on file `opened` (`path`); `ESTALE` once the stream
    /// it was opened on ended (the pod gone, the connection replaced).
    pub async fn ask_open(&self, opened: Opened, path: &str, op: FileOp) -> FileAnswer {
        let stream = self.stream.lock().await.clone();
        let stale = || failed(FileFailure::Stale, format!("{path}: opened on a file stream that ended"));
        match stream.filter(|s| s.number == opened.stream) {
            Some(s) => s.ask(path, op).await.unwrap_or_else(stale),
            None => stale(),
        }
    }

    /// Closes file `opened` in the pod.
    pub async fn close(&self, opened: Opened, path: &str) {
        let _ = self.ask_open(opened, path, FileOp::Close { handle: opened.handle }).await;
    }
}

fn failed(failure: FileFailure, message: String) -> FileAnswer {
    FileAnswer::Failed { failure, message }
}

/// Writes questions and matches answers (the agent answers in order) until the stream
/// or the questions end; questions in flight then get no answer (the asker retries).
async fn pump(mut send: quinn::SendStream, recv: quinn::RecvStream, mut questions: mpsc::UnboundedReceiver<Question>) {
    let mut answers = tpvpn_tunnel::io::frames(recv);
    let mut waiting: VecDeque<(u32, oneshot::Sender<FileAnswer>)> = VecDeque::new();
    let mut next: u32 = 0;
    loop {
        tokio::select! {
            q = questions.recv() => {
                let Some((path, op, tx)) = q else { break };
                next = next.wrapping_add(1);
                if let Err(e) = write_message(&mut send, &Message::FileRequest { id: next, path, op }).await {
                    debug!(error = %e, "file stream lost");
                    break;
                }
                waiting.push_back((next, tx));
            }
            a = answers.recv() => match a.unwrap_or(Ok(None)) {
                Ok(Some(Message::FileReply { id, answer })) => match waiting.pop_front() {
                    Some((asked, tx)) if asked == id => { let _ = tx.send(answer); }
                    _ => { warn!(id, "a file answer out of order: the stream is dropped"); break; }
                },
                Ok(Some(other)) => { warn!(kind = other.kind(), "unexpected message on a file stream"); break; }
                Ok(None) | Err(_) => break,
            },
        }
    }
    let _ = send.reset(tpvpn_tunnel::RESET_CODE.into());
}

/// One mount the daemon holds.
struct Mounted {
    dir: PathBuf,
    #[cfg(target_os = "linux")]
    _session: fuser::BackgroundSession,
}

/// The mounts of the daemon's intercepts, by namespace and Service.
pub struct Mounts {
    record: PathBuf,
    held: Mutex<HashMap<(String, String), Mounted>>,
}

impl Mounts {
    /// Mounts recorded in `record` (a file in the runtime directory).
    pub fn new(record: PathBuf) -> Arc<Mounts> {
        Arc::new(Mounts { record, held: Mutex::new(HashMap::new()) })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Mounted>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mounts the files of the intercept of `service` (namespace, name) at `dir` (`write`:
    /// read-write); what is served.
    pub async fn mount(
        &self,
        conn: Connection,
        (namespace, service): (&str, &str),
        dir: &Path,
        write: bool,
    ) -> Result<String, Error> {
        if !dir.is_absolute() {
            return Err(Error::Config(format!("--mount {}: not an absolute path", dir.display())));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::System(format!("--mount {}: {e}", dir.display())))?;
        self.unmount(namespace, service);
        let (files, said) = Files::open(conn, (namespace, service), write).await?;
        let mounted = self.attach(files, &format!("{namespace}/{service}"), dir)?;
        self.held().insert((namespace.into(), service.into()), mounted);
        self.save();
        Ok(said)
    }

    #[cfg(target_os = "linux")]
    fn attach(&self, files: Arc<Files>, name: &str, dir: &Path) -> Result<Mounted, Error> {
        let session = fuse::mount(files, tokio::runtime::Handle::current(), name, dir)
            .map_err(|e| Error::System(format!("--mount {}: {e}", dir.display())))?;
        Ok(Mounted { dir: dir.to_path_buf(), _session: session })
    }

    #[cfg(not(target_os = "linux"))]
    fn attach(&self, _: Arc<Files>, _: &str, _: &Path) -> Result<Mounted, Error> {
        Err(Error::Config("--mount works on Linux only for now (macOS needs a macFUSE or NFS front end)".into()))
    }

    /// Whether the files of `namespace/service` are mounted.
    pub fn has(&self, namespace: &str, service: &str) -> bool {
        self.held().contains_key(&(namespace.to_string(), service.to_string()))
    }

    /// Unmounts the files of `namespace/service`, if mounted; where they were.
    pub fn unmount(&self, namespace: &str, service: &str) -> Option<PathBuf> {
        let mounted = self.held().remove(&(namespace.to_string(), service.to_string()))?;
        detach(&mounted.dir);
        self.save();
        Some(mounted.dir)
    }

    /// Unmounts everything (`down`, a signal).
    pub fn unmount_all(&self) {
        let all: Vec<Mounted> = self.held().drain().map(|(_, m)| m).collect();
        for m in &all {
            detach(&m.dir);
        }
        self.save();
    }

    /// Records the mounted directories (the file removed when there are none).
    fn save(&self) {
        let dirs: Vec<String> = self.held().values().map(|m| m.dir.display().to_string()).collect();
        if dirs.is_empty() {
            let _ = std::fs::remove_file(&self.record);
            return;
        }
        let text = serde_json::to_string(&dirs).unwrap_or_default();
        if let Err(e) = std::fs::write(&self.record, text) {
            warn!(error = %e, "cannot record the mounts");
        }
    }

    /// Removes the mounts a daemon that crashed left (recorded in `record`).
    pub fn clean_up(record: &Path) {
        let Ok(text) = std::fs::read_to_string(record) else { return };
        let dirs: Vec<String> = serde_json::from_str(&text).unwrap_or_default();
        for dir in dirs {
            info!(%dir, "removing a mount an earlier daemon left");
            detach(Path::new(&dir));
        }
        let _ = std::fs::remove_file(record);
    }
}

/// Unmounts `dir` lazily: a laptop process holding a file open does not block it.
fn detach(dir: &Path) {
    #[cfg(target_os = "linux")]
    match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => info!(dir = %dir.display(), "unmounted"),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => warn!(dir = %dir.display(), error = %e, "cannot unmount"),
    }
    // Nothing is ever mounted elsewhere (the FUSE front end is Linux's).
    #[cfg(not(target_os = "linux"))]
    let _ = dir;
}
