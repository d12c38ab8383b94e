//! The agent's watchdog: a process of its own (the agent's binary, `--watchdog-of PID`)
//! that the agent feeds a heartbeat through a pipe from a task of its runtime. Capture
//! fails open when the agent is gone (its listening sockets go with it), but not when it
//! is alive and stuck (stopped, starved, deadlocked): the tproxy rules keep steering new
//! connections into listeners nobody accepts on. When the heartbeat stops for [`STALL`],
//! the watchdog removes every capture table on the node (the pods get their traffic) and
//! kills the stuck agent, which its DaemonSet then restarts (the manager sends the new
//! one its captures). When the pipe closes (the agent exited or died) it only exits.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tracing::{error, info, warn};

/// How often the agent's runtime beats.
pub const BEAT: Duration = Duration::from_millis(500);
/// How long without a beat the agent counts as stuck.
pub const STALL: Duration = Duration::from_secs(3);

/// Starts the watchdog of this process: this binary with `args` and `--watchdog-of` this
/// pid, its standard input the heartbeat pipe.
pub fn spawn(args: &[std::ffi::OsString]) -> std::io::Result<(Child, ChildStdin)> {
    let mut child = Command::new("/proc/self/exe")
        .args(args)
        .arg("--watchdog-of")
        .arg(std::process::id().to_string())
        .stdin(Stdio::piped())
        .spawn()?;
    let pipe = child.stdin.take().ok_or_else(|| std::io::Error::other("no pipe to the watchdog"))?;
    Ok((child, pipe))
}

/// Beats into `pipe` every [`BEAT`], for as long as the runtime runs this task.
pub async fn heartbeat(mut pipe: ChildStdin) {
    let mut tick = tokio::time::interval(BEAT);
    loop {
        tick.tick().await;
        // One byte into a pipe the watchdog drains: never blocks in practice.
        if let Err(e) = pipe.write_all(b".") {
            warn!(error = %e, "the watchdog is gone: no heartbeat any more");
            return;
        }
    }
}

/// The watchdog's life: read beats from standard input until it closes (returns), or
/// until none came for [`STALL`] (removes every capture table, kills `agent`, returns).
pub fn run(agent: u32, proc_root: &Path, runtime_roots: &[PathBuf]) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    loop {
        match rx.recv_timeout(STALL) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    error!(agent, "the agent made no progress for {STALL:?}: removing every capture table and ending it");
    for t in crate::capture::remove_stale(proc_root, runtime_roots) {
        info!(table = %t, "removed");
    }
    // Only the agent that started this watchdog (still its parent).
    if nix::unistd::getppid().as_raw() == agent as i32 {
        let pid = nix::unistd::Pid::from_raw(agent as i32);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
            warn!(agent, error = %e, "cannot end the stuck agent");
        }
    }
}
