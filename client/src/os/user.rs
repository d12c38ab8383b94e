//! The user behind a root `tpvpn`: who ran `up` through sudo, and running the
//! kubeconfig's credential plugins as that user. The daemon stays root and rebuilds its
//! Kubernetes client on every reconnect; a plugin run as root would give root to
//! whoever can write the plugin's file (a user's `~/bin`, a virtualenv).

use std::ffi::OsString;

use kube::config::Kubeconfig;

use crate::Error;

/// The hidden subcommand that runs a credential plugin as the invoking user.
pub const RUN_AS: &str = "run-as-user";

/// The user who ran tpvpn: the one `sudo` (or `pkexec`) ran it for, else the real user.
/// The group: `SUDO_GID`, else that user's primary group.
pub fn invoking() -> (u32, u32) {
    let env = |names: &[&str]| names.iter().find_map(|v| std::env::var(v).ok()?.parse::<u32>().ok());
    let uid = env(&["SUDO_UID", "PKEXEC_UID"]).unwrap_or_else(|| nix::unistd::getuid().as_raw());
    let gid = env(&["SUDO_GID"]).unwrap_or_else(|| {
        nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map_or_else(|| nix::unistd::getgid().as_raw(), |u| u.gid.as_raw())
    });
    (uid, gid)
}

/// Makes every credential plugin of `kubeconfig` (users' `exec`, and the `cmd-path` of
/// the gcp auth provider) run through `exe run-as-user UID GID -- COMMAND ARGS...` when
/// tpvpn runs as root for another user; unchanged otherwise.
pub fn plugins_as_invoking_user(kubeconfig: &mut Kubeconfig) -> Result<(), Error> {
    let (uid, gid) = invoking();
    if !nix::unistd::geteuid().is_root() || uid == 0 {
        return Ok(());
    }
    // On Linux the running binary itself, even after an upgrade replaced its file
    // (`current_exe` would then name a path ending in " (deleted)").
    let exe = if cfg!(target_os = "linux") {
        "/proc/self/exe".to_string()
    } else {
        std::env::current_exe()
            .map_err(|e| Error::System(format!("cannot find my own binary: {e}")))?
            .to_string_lossy()
            .into_owned()
    };
    wrap_plugins(kubeconfig, &exe, uid, gid);
    Ok(())
}

fn wrap_plugins(kubeconfig: &mut Kubeconfig, exe: &str, uid: u32, gid: u32) {
    let prefix = [RUN_AS.to_string(), uid.to_string(), gid.to_string(), "--".to_string()];
    for user in kubeconfig.auth_infos.iter_mut().filter_map(|a| a.auth_info.as_mut()) {
        if let Some(exec) = user.exec.as_mut() {
            if let Some(command) = exec.command.take() {
                let mut args = prefix.to_vec();
                args.push(command);
                args.extend(exec.args.take().unwrap_or_default());
                exec.command = Some(exe.to_string());
                exec.args = Some(args);
            }
        }
        if let Some(provider) = user.auth_provider.as_mut() {
            if let Some(cmd) = provider.config.remove("cmd-path") {
                let args = provider.config.remove("cmd-args").unwrap_or_default();
                provider.config.insert("cmd-path".into(), exe.to_string());
                provider.config.insert("cmd-args".into(), format!("{} {cmd} {args}", prefix.join(" ")));
            }
        }
    }
}

/// `tpvpn run-as-user UID GID -- COMMAND ARGS...`: drops to the user (its groups, `HOME`,
/// `USER`, `LOGNAME` from the password database when it has an entry) and becomes
/// COMMAND. Returns only on failure.
pub fn run_as(uid: u32, gid: u32, command: &[OsString]) -> Error {
    use nix::unistd::{setgid, setuid, Gid, Uid, User};
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = command.split_first() else {
        return Error::Config(format!("{RUN_AS}: no command"));
    };
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let dropped = set_groups(user.as_ref(), gid)
        .and_then(|()| setgid(Gid::from_raw(gid)))
        .and_then(|()| setuid(Uid::from_raw(uid)));
    if let Err(e) = dropped {
        return Error::System(format!("{RUN_AS}: cannot become uid {uid} gid {gid}: {e}"));
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() && uid != 0 {
        return Error::System(format!("{RUN_AS}: root privileges could be regained after dropping them"));
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    if let Some(u) = &user {
        cmd.env("HOME", &u.dir).env("USER", &u.name).env("LOGNAME", &u.name);
    }
    let e = cmd.exec();
    Error::System(format!("{RUN_AS}: cannot run {}: {e}", program.to_string_lossy()))
}

/// The supplementary groups of `user` (its own group `gid` alone if it has no entry).
#[cfg(target_os = "linux")]
fn set_groups(user: Option<&nix::unistd::User>, gid: u32) -> nix::Result<()> {
    use nix::unistd::Gid;
    let groups = match user {
        Some(u) => {
            let name = std::ffi::CString::new(u.name.as_bytes()).unwrap_or_default();
            nix::unistd::getgrouplist(&name, Gid::from_raw(gid)).unwrap_or_else(|_| vec![Gid::from_raw(gid)])
        }
        None => vec![Gid::from_raw(gid)],
    };
    nix::unistd::setgroups(&groups)
}

/// The same with the C library's `initgroups` (macOS; not yet run on a Mac).
#[cfg(not(target_os = "linux"))]
#[allow(unsafe_code)]
fn set_groups(user: Option<&nix::unistd::User>, gid: u32) -> nix::Result<()> {
    let r = match user {
        Some(u) => {
            let name = std::ffi::CString::new(u.name.as_bytes()).unwrap_or_default();
            // SAFETY: `name` is a valid C string for the duration of the call.
            unsafe { libc::initgroups(name.as_ptr(), gid as libc::c_int) }
        }
        // SAFETY: one group id, read from a live local.
        None => unsafe { libc::setgroups(1, &gid) },
    };
    nix::errno::Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plugin_runs_through_run_as_user() {
        let yaml = "apiVersion: v1\nkind: Config\nusers:\n- name: eks\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: aws\n      args: [eks, get-token]\n- name: gke\n  user:\n    auth-provider:\n      name: gcp\n      config: {cmd-path: /usr/bin/gcloud, cmd-args: config config-helper}\n- name: plain\n  user: {token: abc}\n";
        let mut k = Kubeconfig::from_yaml(yaml).unwrap();
        wrap_plugins(&mut k, "/usr/bin/tpvpn", 1000, 1001);
        let exec = k.auth_infos[0].auth_info.as_ref().unwrap().exec.as_ref().unwrap();
        assert_eq!(exec.command.as_deref(), Some("/usr/bin/tpvpn"));
        assert_eq!(exec.args.as_ref().unwrap()[..], [RUN_AS, "1000", "1001", "--", "aws", "eks", "get-token"]);
        let gcp = &k.auth_infos[1].auth_info.as_ref().unwrap().auth_provider.as_ref().unwrap().config;
        assert_eq!(gcp["cmd-path"], "/usr/bin/tpvpn");
        assert_eq!(gcp["cmd-args"], format!("{RUN_AS} 1000 1001 -- /usr/bin/gcloud config config-helper"));
        assert_eq!(k.auth_infos[2].auth_info.as_ref().unwrap().token.as_ref().map(|_| ()), Some(()));
    }
}
