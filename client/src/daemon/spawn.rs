//! Starting the daemon: `up` checks the machine, undoes a crashed daemon's leftovers and
//! re-executes itself with `--foreground` in a session of its own, waiting for one line
//! (`ok ...` or the error).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::control::{self, Reply, Request};
use crate::os::osdns;
use crate::state::{self, Paths};
use crate::Error;

use super::commands::current_thread;
use super::supervisor::run;
use super::system::RESOLV_CONF;
use super::{UpOptions, DAEMON_ENV};

/// Checks what `up` needs from the machine before anything is changed.
pub fn preflight() -> Result<(), Error> {
    #[cfg(target_os = "macos")]
    eprintln!("tpvpn: macOS support builds and its logic is unit-tested, but it has not yet been run on a Mac");
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Config("tpvpn up needs root to create the TUN device and routes: run it with sudo".into()));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(Error::Config(
            "no /dev/net/tun: load the tun module (modprobe tun) or run where TUN devices are available".into(),
        ));
    }
    Ok(())
}

/// `tpvpn up` without `--foreground`: starts the daemon and waits for its first line.
pub fn up_background(args: &[String], paths: &Paths) -> Result<String, Error> {
    preflight()?;
    state::prepare_runtime_dir(&paths.dir)?;
    refuse_if_running(paths)?;
    let log = state::create_new(&paths.log(), 0o644)
        .map_err(|e| Error::System(format!("cannot create {}: {e}", paths.log().display())))?;
    let exe = std::env::current_exe().map_err(|e| Error::System(format!("cannot find my own binary: {e}")))?;
    let mut child = Command::new(exe)
        .args(args)
        .arg("--foreground")
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| Error::System(format!("cannot start the daemon: {e}")))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(Error::System("daemon has no stdout".into()));
    };
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let line = line.trim();
    if let Some(ok) = line.strip_prefix("ok ") {
        Ok(ok.to_string())
    } else {
        let _ = child.wait();
        let msg = line.strip_prefix("error: ").unwrap_or(line);
        if msg.is_empty() {
            Err(Error::System(format!("the daemon exited without a word; see {}", paths.log().display())))
        } else {
            Err(Error::Config(msg.to_string()))
        }
    }
}

fn refuse_if_running(paths: &Paths) -> Result<(), Error> {
    let rt = current_thread()?;
    if let Some(Reply::Status(s)) =
        rt.block_on(control::request(&paths.socket(), Request::Status, Duration::from_secs(2)))?
    {
        return Err(Error::Config(format!(
            "already connected (pid {}); run tpvpn down first",
            s.pid.map_or("?".into(), |p| p.to_string())
        )));
    }
    if let Some(pid) = state::clean_stale(paths)? {
        eprintln!("tpvpn: undid the changes of an earlier tpvpn (pid {pid}) that did not exit cleanly");
    } else if osdns::restore_left_behind(std::path::Path::new(RESOLV_CONF))? {
        eprintln!("tpvpn: put back the original {RESOLV_CONF} that a tpvpn connected across a reboot left behind");
    }
    Ok(())
}

/// Reports readiness (or failure) to `tpvpn up` waiting in the foreground, once.
pub(super) struct Ready {
    daemon: bool,
    done: bool,
}

impl Ready {
    pub(super) fn send(&mut self, line: &str) {
        if self.done {
            return;
        }
        self.done = true;
        if self.daemon {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        } else {
            eprintln!("tpvpn: {line}");
        }
    }
}

/// `tpvpn up --foreground` (also what the background daemon runs).
pub fn up_foreground(opts: UpOptions, paths: Paths) -> Result<(), Error> {
    let daemon = std::env::var_os(DAEMON_ENV).is_some();
    let mut ready = Ready { daemon, done: false };
    if daemon {
        // Leave the terminal's session so that its hang-up does not reach us.
        let _ = nix::unistd::setsid();
    }
    // Descriptors up to the hard limit (the DNS server sizes its bounds from it).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    let result = (|| {
        preflight()?;
        state::prepare_runtime_dir(&paths.dir)?;
        if !daemon {
            refuse_if_running(&paths)?;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_WORKERS)
            .enable_all()
            .build()
            .map_err(|e| Error::System(e.to_string()))?;
        rt.block_on(run(opts, &paths, &mut ready))
    })();
    if let Err(e) = &result {
        ready.send(&format!("error: {e}"));
    }
    result
}

/// Worker threads of the daemon's runtime. The data plane's hand-offs (TUN, stack task,
/// flow tasks, quinn's connection driver) are serial anyway; on one thread they are plain
/// task switches, where two threads wake each other (futex, IPI) for every batch. In the
/// lab one worker cut the client's cycles per byte by ~30% (see the README).
const RUNTIME_WORKERS: usize = 1;
