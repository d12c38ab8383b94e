//! The short client commands that talk to a running daemon over its control socket:
//! `down`, `status`, `list`, `intercept` and `leave`.

use std::time::Duration;

use crate::control::{self, Dns, Reply, Request, Status};
use crate::os::osdns;
use crate::state::{self, Paths};
use crate::Error;

use super::system::RESOLV_CONF;

/// `tpvpn intercept` and `tpvpn leave`: one request to the daemon (which may wait for the
/// manager and its agents).
pub fn intercept_request(paths: &Paths, req: Request) -> Result<Reply, Error> {
    let rt = current_thread()?;
    match rt.block_on(control::request(&paths.socket(), req, Duration::from_secs(30)))? {
        Some(Reply::Failed { error }) => Err(Error::Refused { code: None, message: error }),
        Some(r) => Ok(r),
        None => Err(Error::Config("not connected: run tpvpn up first".into())),
    }
}

/// `tpvpn down`.
pub fn down(paths: &Paths) -> Result<String, Error> {
    let rt = current_thread()?;
    let asked = rt.block_on(control::request(&paths.socket(), Request::Down, Duration::from_secs(15)));
    match asked {
        Ok(Some(Reply::Failed { error })) => Err(Error::Refused { code: None, message: error }),
        // The daemon answers once every change is undone.
        Ok(Some(_)) => {
            wait_gone(paths);
            Ok("disconnected".into())
        }
        Ok(None) => match state::clean_stale(paths)? {
            Some(pid) => Ok(format!("undid the changes of a tpvpn (pid {pid}) that did not exit cleanly")),
            None if nix::unistd::geteuid().is_root()
                && osdns::restore_left_behind(std::path::Path::new(RESOLV_CONF))? =>
            {
                Ok(format!("put back the original {RESOLV_CONF} that a tpvpn connected across a reboot left behind"))
            }
            None => Ok("not connected".into()),
        },
        Err(e) => Err(e),
    }
}

/// Waits (bounded) until the daemon has removed its state file.
fn wait_gone(paths: &Paths) {
    for _ in 0..150 {
        if !paths.state().exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A runtime for the short client commands.
pub fn current_thread() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::System(e.to_string()))
}

/// `tpvpn list`; `None` when not connected.
pub fn list(paths: &Paths) -> Result<Option<control::Listing>, Error> {
    let rt = current_thread()?;
    match rt.block_on(control::request(&paths.socket(), Request::List, Duration::from_secs(5)))? {
        Some(Reply::List(l)) => Ok(Some(l)),
        _ => Ok(None),
    }
}

/// `tpvpn status`.
pub fn status(paths: &Paths) -> Result<Status, Error> {
    let rt = current_thread()?;
    match rt.block_on(control::request(&paths.socket(), Request::Status, Duration::from_secs(5)))? {
        Some(Reply::Status(s)) => Ok(*s),
        _ => Ok(Status { dns: Dns { mode: "off".into(), ..Default::default() }, ..Default::default() }),
    }
}

/// The runtime paths from the environment.
pub fn paths() -> Paths {
    Paths::new(state::runtime_dir())
}
