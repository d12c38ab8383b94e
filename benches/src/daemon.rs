//! Long-running processes the benchmark starts inside a lab namespace (iperf3 servers,
//! the ping-pong server, the WireGuard daemons), owned by a guard that stops them by pid.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A process started with `ip netns exec` (which execs, so the pid is the program's own).
/// Dropping it sends SIGTERM, waits up to 3 s, then SIGKILL, and always reaps it.
pub struct Daemon {
    name: String,
    child: Child,
}

impl Daemon {
    /// Starts `cmd` in namespace `ns` with extra `env`; stdout and stderr go to `log`.
    pub fn spawn(ns: &str, cmd: &[&str], env: &[(&str, &str)], log: &Path) -> Result<Daemon> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?} in {ns}"))?;
        Ok(Daemon { name: cmd.join(" "), child })
    }

    /// `Ok` while the process runs; an error naming it once it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => anyhow::bail!("{} exited ({status})", self.name),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
