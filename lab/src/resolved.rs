//! A real systemd-resolved inside the laptop namespace, for `--dns-mode resolved`.
//!
//! The lab never touches the machine's own resolver: systemd-resolved (the binary from
//! Debian's `systemd-resolved` package, unpacked by `scripts/install-deps.sh` into
//! [`RESOLVED_UNPACKED`] without installing the package, since installing it would take
//! over the machine's /etc/resolv.conf) runs in the laptop namespace with a private
//! mount namespace (its own /run/systemd, a passwd that has its `systemd-resolve` user)
//! and talks to a private `dbus-daemon` whose socket lives in the lab's directory. Its
//! only upstream is the lab's internet DNS; there are no fallback servers. tpvpn reaches
//! it through `DBUS_SYSTEM_BUS_ADDRESS` ([`Lab::resolved_bus`]); clients ask its stub at
//! 127.0.0.53 in the laptop namespace.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{Lab, UPSTREAM_DNS_IP};

/// Where `scripts/install-deps.sh` unpacks Debian's systemd-resolved package.
pub const RESOLVED_UNPACKED: &str = "/var/cache/tpvpn-lab/systemd-resolved";

/// The systemd-resolved binary: the machine's own if installed, else the unpacked one.
pub fn resolved_bin() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("/lib/systemd/systemd-resolved"),
        PathBuf::from(RESOLVED_UNPACKED).join("lib/systemd/systemd-resolved"),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .context("systemd-resolved not found: run ./scripts/install-deps.sh (it unpacks Debian's package)")
}

impl Lab {
    /// The `DBUS_SYSTEM_BUS_ADDRESS` of the laptop's private system bus.
    pub fn resolved_bus(&self) -> String {
        format!("unix:path={}", self.dir.join("dbus.sock").display())
    }

    /// Starts dbus-daemon and systemd-resolved in the laptop namespace and waits (≤ 10 s)
    /// until resolved owns its bus name. Both stop with the lab.
    pub fn start_resolved(&mut self) -> Result<()> {
        let bin = resolved_bin()?;
        let d = self.dir.clone();
        let mut passwd = fs::read_to_string("/etc/passwd")?;
        let mut group = fs::read_to_string("/etc/group")?;
        if !passwd.lines().any(|l| l.starts_with("systemd-resolve:")) {
            passwd.push_str("systemd-resolve:x:991:991:systemd Resolver:/:/usr/sbin/nologin\n");
        }
        if !group.lines().any(|l| l.starts_with("systemd-resolve:")) {
            group.push_str("systemd-resolve:x:991:\n");
        }
        fs::write(d.join("passwd"), passwd)?;
        fs::write(d.join("group"), group)?;
        fs::write(
            d.join("dbus.conf"),
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                self.resolved_bus()
            ),
        )?;
        let conf = format!(
            "[Resolve]\nDNS={UPSTREAM_DNS_IP}\nFallbackDNS=\nDNSSEC=no\nLLMNR=no\nMulticastDNS=no\nDNSStubListener=yes\n"
        );
        fs::write(d.join("resolved.conf"), conf)?;
        // Private mounts: the passwd with resolved's user, and a /run/systemd of its own
        // with the lab's configuration as a drop-in.
        let mounts = format!(
            "mount --bind {p} /etc/passwd && mount --bind {g} /etc/group && mkdir -p /run/systemd && \
             mount -t tmpfs tmpfs /run/systemd && mkdir -p /run/systemd/resolved.conf.d && \
             cp {c} /run/systemd/resolved.conf.d/tpvpn-lab.conf",
            p = d.join("passwd").display(),
            g = d.join("group").display(),
            c = d.join("resolved.conf").display(),
        );
        let laptop = self.laptop.clone();
        let dbus = format!(
            "{mounts} && exec dbus-daemon --config-file={} --nofork --nopidfile",
            d.join("dbus.conf").display()
        );
        self.spawn_in(&laptop, "dbus-daemon", &["unshare", "-m", "sh", "-c", &dbus])?;
        let bus = self.resolved_bus();
        let resolved = format!("{mounts} && DBUS_SYSTEM_BUS_ADDRESS={bus} exec {}", bin.display());
        let owned = || {
            std::process::Command::new("busctl")
                .args(["--system", "--timeout=1", "status", "org.freedesktop.resolve1"])
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        // resolved needs the bus at start: wait for the socket first.
        if !crate::wait_until(Duration::from_secs(10), || d.join("dbus.sock").exists()) {
            bail!("dbus-daemon did not start: {}", fs::read_to_string(d.join("dbus-daemon.log")).unwrap_or_default());
        }
        self.spawn_in(&laptop, "systemd-resolved", &["unshare", "-m", "sh", "-c", &resolved])?;
        if !crate::wait_until(Duration::from_secs(10), owned) {
            bail!(
                "systemd-resolved did not take its bus name: {}",
                fs::read_to_string(d.join("systemd-resolved.log")).unwrap_or_default()
            );
        }
        Ok(())
    }
}
