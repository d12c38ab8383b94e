//! Reading one open file of a mount: a kernel read is asked of the pod in questions of at
//! most [`READ_MAX`] bytes, asked together, and once the file is read sequentially (a
//! read starting where the one before ended) the next [`AHEAD`] bytes are asked before
//! the kernel wants them, so that a sequential read does not wait a round trip through
//! the manager and the agent per kernel read.
//!
//! Live, not a snapshot: bytes asked ahead are used for at most [`FRESH`] (the time the
//! kernel keeps attributes), a read elsewhere in the file drops them, and so does a write
//! through the same handle. Memory is bounded: at most `AHEAD` bytes (plus one kernel
//! read) per open file, and the front end gives read-ahead to a bounded number of files.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tpvpn_tunnel::files::{FileAnswer, READ_MAX};

/// How far ahead of a sequential reader bytes are asked.
pub const AHEAD: u64 = 4 * READ_MAX as u64;

/// What an open asks of a file at once (a small file whole, in the round trip of the
/// open).
pub const FIRST: u32 = 128 * 1024;

/// How long bytes asked ahead may be used.
pub const FRESH: Duration = Duration::from_secs(1);

/// Asks `len` bytes of the file from `offset`.
pub type Ask = Arc<dyn Fn(u64, u32) -> BoxFuture<'static, FileAnswer> + Send + Sync>;

/// The errno the kernel is told for an answer that is not the one asked for.
pub fn errno(answer: FileAnswer) -> i32 {
    match answer {
        FileAnswer::Failed { failure, .. } => failure.errno(),
        _ => 5, // EIO
    }
}

/// `size` bytes from `offset`, in questions of at most `READ_MAX` asked together; fewer
/// at the end of the file.
pub async fn read(ask: &Ask, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
    let chunks = (0..size.div_ceil(READ_MAX)).map(|i| {
        let (at, len) = (offset + u64::from(i * READ_MAX), (size - i * READ_MAX).min(READ_MAX));
        let asked = ask(at, len);
        async move { (len, asked.await) }
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
            other => return Err(errno(other)),
        }
    }
    Ok(data)
}

/// One open file's reads.
pub struct Reader {
    ask: Ask,
    /// Where `data` starts in the file.
    at: u64,
    /// Bytes that arrived and were not read yet.
    data: Vec<u8>,
    /// Questions asked ahead (offset, length, when), in order, right after `data`.
    asked: VecDeque<(u64, u32, Instant, JoinHandle<FileAnswer>)>,
    /// When the bytes in `data` were asked (the oldest of them).
    since: Instant,
    /// Where the last read ended.
    last_end: Option<u64>,
    /// The file ended here (a short answer).
    end: Option<u64>,
    /// How long bytes asked may be used ([`FRESH`]).
    fresh: Duration,
}

impl Reader {
    pub fn new(ask: Ask) -> Reader {
        Reader {
            ask,
            at: 0,
            data: Vec::new(),
            asked: VecDeque::new(),
            since: Instant::now(),
            last_end: None,
            end: None,
            fresh: FRESH,
        }
    }

    /// Reads a file whose first bytes, `first` (fewer than [`FIRST`]: the whole file),
    /// arrived with its opening.
    pub fn opened(ask: Ask, first: Vec<u8>) -> Reader {
        let mut reader = Reader::new(ask);
        reader.end = (first.len() < FIRST as usize).then_some(first.len() as u64);
        reader.data = first;
        // A read from the start goes on as a sequential one: asked ahead at once.
        reader.last_end = Some(0);
        reader
    }

    /// Where the bytes at hand and asked for end.
    fn reach(&self) -> u64 {
        self.asked.back().map_or(self.at + self.data.len() as u64, |(o, l, _, _)| o + u64::from(*l))
    }

    /// Whether the oldest bytes at hand or asked were asked too long ago to be used.
    fn stale(&self) -> bool {
        let oldest = if self.data.is_empty() { self.asked.front().map(|c| c.2) } else { Some(self.since) };
        oldest.is_some_and(|t| t.elapsed() > self.fresh)
    }

    /// Forgets everything at hand; the next bytes are at `offset`.
    pub fn reset(&mut self, offset: u64) {
        self.reset_asked();
        self.data.clear();
        (self.at, self.end) = (offset, None);
    }

    /// `size` bytes from `offset` (fewer at the end of the file), or an errno.
    pub async fn read(&mut self, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let want = offset + u64::from(size);
        let sequential = self.last_end == Some(offset);
        self.last_end = Some(want);
        if offset < self.at || offset > self.reach() || self.stale() {
            self.reset(offset);
        }
        // What was asked ahead, as it arrives.
        while self.at + (self.data.len() as u64) < want && self.end.is_none() {
            let Some((chunk, len, when, task)) = self.asked.pop_front() else { break };
            match task.await.unwrap_or_else(|_| errno_answer()) {
                FileAnswer::Data(d) => {
                    if self.data.is_empty() {
                        self.since = when;
                    }
                    if d.len() < len as usize {
                        self.end = Some(chunk + d.len() as u64);
                        self.reset_asked();
                    }
                    self.data.extend_from_slice(&d);
                }
                other => {
                    self.reset(offset);
                    return Err(errno(other));
                }
            }
        }
        // What was not: asked now.
        let have = self.at + self.data.len() as u64;
        if have < want && self.end.is_none() {
            if self.data.is_empty() {
                self.since = Instant::now();
            }
            let more = read(&self.ask, have, (want - have) as u32).await?;
            if more.len() < (want - have) as usize {
                self.end = Some(have + more.len() as u64);
            }
            self.data.extend_from_slice(&more);
        }
        let from = (offset - self.at) as usize;
        let to = ((want - self.at) as usize).min(self.data.len());
        let out = self.data.get(from..to).unwrap_or_default().to_vec();
        self.data.drain(..to.max(from).min(self.data.len()));
        self.at = offset + out.len() as u64;
        if sequential && self.end.is_none() {
            self.ask_ahead();
        }
        Ok(out)
    }

    /// Asks the next bytes until `AHEAD` are at hand or asked.
    fn ask_ahead(&mut self) {
        let mut next = self.reach();
        while next < self.at + AHEAD {
            let task = tokio::spawn((self.ask)(next, READ_MAX));
            self.asked.push_back((next, READ_MAX, Instant::now(), task));
            next += u64::from(READ_MAX);
        }
    }

    /// Drops the questions asked ahead (past the file's end).
    fn reset_asked(&mut self) {
        for (_, _, _, task) in self.asked.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.reset_asked();
    }
}

/// What a question that never came back is taken for.
fn errno_answer() -> FileAnswer {
    FileAnswer::Failed { failure: tpvpn_tunnel::files::FileFailure::Io, message: "a read ahead was lost".into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The questions asked of a file: (offset, length).
    type Asked = Arc<Mutex<Vec<(u64, u32)>>>;

    /// A file of `len` bytes (byte i = i mod 251) and the questions asked of it.
    fn file(len: usize) -> (Ask, Asked) {
        let content: Arc<Vec<u8>> = Arc::new((0..len).map(|i| (i % 251) as u8).collect());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let ask: Ask = Arc::new(move |offset, n| {
            log.lock().unwrap().push((offset, n));
            let content = content.clone();
            Box::pin(async move {
                let from = (offset as usize).min(content.len());
                let to = (from + n as usize).min(content.len());
                FileAnswer::Data(content[from..to].to_vec())
            })
        });
        (ask, asked)
    }

    fn expect(offset: u64, n: usize, len: usize) -> Vec<u8> {
        (offset as usize..(offset as usize + n).min(len)).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_sequential_reader_finds_its_next_bytes_asked_already() {
        let len = 5 * READ_MAX as usize + 77;
        let (ask, asked) = file(len);
        let mut r = Reader::new(ask);
        let step = 128 * 1024;
        let mut offset = 0;
        let mut whole = Vec::new();
        loop {
            let got = r.read(offset, step).await.unwrap();
            if got.is_empty() {
                break;
            }
            offset += got.len() as u64;
            whole.extend(got);
        }
        assert_eq!(whole, expect(0, len, len), "every byte once, in order");
        let asked = asked.lock().unwrap().clone();
        // The first read alone, then READ_MAX questions ahead; never a byte asked twice.
        assert_eq!(asked[0], (0, step));
        let mut covered = 0u64;
        for (o, n) in &asked {
            assert_eq!(*o, covered, "asked in order without overlap: {asked:?}");
            covered += u64::from(*n);
        }
        assert!(asked.len() <= 2 + len / READ_MAX as usize + 4, "{asked:?}");
    }

    #[tokio::test]
    async fn the_bytes_that_came_with_the_open_are_read_first() {
        // A small file whole: nothing more is asked.
        let (ask, asked) = file(5000);
        let mut r = Reader::opened(ask, expect(0, 5000, 5000));
        assert_eq!(r.read(0, 128 * 1024).await.unwrap(), expect(0, 5000, 5000));
        assert!(r.read(5000, 4096).await.unwrap().is_empty());
        assert!(asked.lock().unwrap().is_empty(), "{asked:?}");
        // A large one: its first bytes from the open, the next asked from where they end.
        let len = 3 * READ_MAX as usize;
        let (ask, asked) = file(len);
        let mut r = Reader::opened(ask, expect(0, FIRST as usize, len));
        assert_eq!(r.read(0, 4096).await.unwrap(), expect(0, 4096, len));
        assert_eq!(asked.lock().unwrap().first(), Some(&(u64::from(FIRST), READ_MAX)), "asked ahead at once");
        let rest = r.read(4096, len as u32).await.unwrap();
        assert_eq!(rest, expect(4096, len, len));
    }

    #[tokio::test]
    async fn a_read_elsewhere_drops_what_was_asked_ahead_and_answers_right() {
        let len = 3 * READ_MAX as usize;
        let (ask, _) = file(len);
        let mut r = Reader::new(ask);
        r.read(0, 4096).await.unwrap();
        r.read(4096, 4096).await.unwrap();
        assert!(!r.asked.is_empty(), "asked ahead after a sequential read");
        // Back to the start, then far ahead, then past the end.
        assert_eq!(r.read(10, 100).await.unwrap(), expect(10, 100, len));
        assert!(r.asked.is_empty() && r.data.is_empty(), "a jump back drops what was ahead");
        assert_eq!(r.read(2 * READ_MAX as u64, 300).await.unwrap(), expect(2 * READ_MAX as u64, 300, len));
        assert_eq!(r.read(len as u64 - 5, 100).await.unwrap(), expect(len as u64 - 5, 100, len));
        assert!(r.read(len as u64 + 10, 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn bytes_asked_ahead_are_not_used_once_too_old() {
        let (ask, asked) = file(4 * READ_MAX as usize);
        let mut r = Reader::new(ask);
        r.read(0, 4096).await.unwrap();
        r.read(4096, 4096).await.unwrap();
        let before = asked.lock().unwrap().len();
        // (FRESH in use; none here, so that no test waits a second.)
        r.fresh = Duration::ZERO;
        tokio::time::sleep(Duration::from_millis(2)).await;
        r.read(8192, 4096).await.unwrap();
        assert_eq!(asked.lock().unwrap()[before], (8192, 4096), "asked again, not taken from what was ahead");
    }

    #[tokio::test]
    async fn a_failure_is_an_errno_and_forgets_the_bytes_ahead() {
        let ask: Ask = Arc::new(|_, _| {
            Box::pin(async {
                FileAnswer::Failed { failure: tpvpn_tunnel::files::FileFailure::NotFound, message: String::new() }
            })
        });
        let mut r = Reader::new(ask);
        assert_eq!(r.read(0, 10).await, Err(2));
    }
}
