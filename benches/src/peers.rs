//! The peers tpvpn is compared with: userspace WireGuard between the lab's laptop and
//! cluster namespaces, over the same node veth tpvpn's QUIC connection uses
//! (laptop 10.250.1.2 ↔ cluster 10.250.1.1, UDP port [`LISTEN_PORT`] on each side).
//!
//! - wireguard-go (Debian package `wireguard-go`), run as `wireguard-go -f IFACE` with
//!   `WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1` (it refuses to start on a kernel
//!   that could have the WireGuard module otherwise);
//! - boringtun (`boringtun-cli` from crates.io, on `PATH`: `scripts/bench.sh` installs it),
//!   run as `boringtun-cli --foreground --disable-drop-privileges IFACE` with its default
//!   thread count.
//!
//! Both are configured with `wg` (Debian package `wireguard-tools`) through their UAPI
//! sockets in `/var/run/wireguard`. Each daemon is started inside its namespace with
//! `ip netns exec`, so its TUN device is created there; tunnel addresses are
//! `10.251.N.1/24` (laptop) and `10.251.N.2/24` (cluster), a range the lab does not use,
//! with N = 0 for wireguard-go and 1 for boringtun. The tunnel MTU is 1420, both
//! daemons' default (a 1500-byte underlay minus WireGuard's 80 bytes of overhead over
//! IPv6, 60 over IPv4). [`Tunnel::start`] returns once both ends are configured; the first
//! packet sent into the tunnel makes them handshake.
//!
//! Interface names carry the benchmark's pid, so the UAPI sockets (shared by every
//! namespace) are unique per run. [`Tunnel`]'s `Drop` stops both daemons by pid and
//! removes their interfaces and sockets if they are left.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tpvpn_lab::{show, wait_until, Lab, LAPTOP_NODE_IP};

use crate::daemon::Daemon;
use crate::NODE_IP;

/// UDP port each WireGuard end listens on (each in its own namespace).
const LISTEN_PORT: &str = "51820";
/// The tunnel MTU (the daemons' default).
pub const MTU: &str = "1420";
/// Where the UAPI sockets of userspace WireGuard live.
const UAPI_DIR: &str = "/var/run/wireguard";

/// A userspace WireGuard implementation.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    WireguardGo,
    Boringtun,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::WireguardGo => "wireguard-go",
            Peer::Boringtun => "boringtun",
        }
    }

    /// The third octet of this peer's tunnel addresses.
    fn subnet(self) -> u8 {
        match self {
            Peer::WireguardGo => 0,
            Peer::Boringtun => 1,
        }
    }

    /// Interface name for `side` (`l` laptop, `c` cluster): at most 15 characters.
    fn iface(self, side: char) -> String {
        let prefix = match self {
            Peer::WireguardGo => "tpg",
            Peer::Boringtun => "tpb",
        };
        format!("{prefix}{}{side}", std::process::id())
    }

    /// The first line of `--version` (run in the laptop namespace), or why there is none.
    pub fn version(self, lab: &Lab) -> String {
        let bin = match self {
            Peer::WireguardGo => "wireguard-go",
            Peer::Boringtun => "boringtun-cli",
        };
        let out = lab.exec_timeout(lab.laptop(), &[bin, "--version"], Duration::from_secs(10));
        match String::from_utf8_lossy(&out.stdout).lines().next() {
            Some(line) if out.status.success() => line.trim().to_string(),
            _ => format!("{bin}: no version ({})", out.status),
        }
    }

    fn spawn(self, lab: &Lab, ns: &str, iface: &str) -> Result<Daemon> {
        let log = lab.dir().join(format!("{iface}.log"));
        match self {
            Peer::WireguardGo => Daemon::spawn(
                ns,
                &["wireguard-go", "-f", iface],
                &[("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")],
                &log,
            ),
            Peer::Boringtun => {
                Daemon::spawn(ns, &["boringtun-cli", "--foreground", "--disable-drop-privileges", iface], &[], &log)
            }
        }
    }
}

/// One end of a tunnel.
struct End {
    ns: String,
    iface: String,
    /// Tunnel address of this end (without prefix length).
    ip: String,
    /// Node address this end's UDP socket is reached at.
    node_ip: &'static str,
    key: PathBuf,
    public: String,
}

/// A running WireGuard tunnel between the laptop and cluster namespaces.
pub struct Tunnel {
    peer: Peer,
    daemons: Vec<Daemon>,
    /// (namespace, interface) of both ends.
    links: Vec<(String, String)>,
}

impl Tunnel {
    /// Starts and configures both ends of `peer`'s tunnel.
    pub fn start(lab: &Lab, peer: Peer) -> Result<Tunnel> {
        let mut t = Tunnel { peer, daemons: Vec::new(), links: Vec::new() };
        let n = peer.subnet();
        let mut ends = Vec::new();
        for (ns, side, host, node_ip) in [(lab.laptop(), 'l', 1, LAPTOP_NODE_IP), (lab.cluster(), 'c', 2, NODE_IP)] {
            let iface = peer.iface(side);
            if socket(&iface).exists() {
                bail!("{} exists already: a daemon of an earlier run is still there", socket(&iface).display());
            }
            let key = lab.dir().join(format!("{iface}.key"));
            let public = keypair(&key)?;
            ends.push(End { ns: ns.to_string(), iface, ip: format!("10.251.{n}.{host}"), node_ip, key, public });
        }
        // From here on, `t`'s drop stops whatever was started.
        for e in &ends {
            t.links.push((e.ns.clone(), e.iface.clone()));
            let mut d = peer.spawn(lab, &e.ns, &e.iface)?;
            let up = wait_until(Duration::from_secs(5), || socket(&e.iface).exists());
            if let Err(err) = d.check_running() {
                bail!("{err}; log:\n{}", daemon_log(lab, &e.iface));
            }
            t.daemons.push(d);
            if !up {
                bail!("{} has no UAPI socket after 5 s; log:\n{}", peer.name(), daemon_log(lab, &e.iface));
            }
        }
        for (e, other) in [(&ends[0], &ends[1]), (&ends[1], &ends[0])] {
            let key = e.key.display().to_string();
            let allowed = format!("{}/32", other.ip);
            let endpoint = format!("{}:{LISTEN_PORT}", other.node_ip);
            let mut cmd = vec!["wg", "set", &e.iface, "listen-port", LISTEN_PORT, "private-key", &key];
            cmd.extend(["peer", &other.public, "allowed-ips", &allowed, "endpoint", &endpoint]);
            run(lab, &e.ns, &cmd)?;
            run(lab, &e.ns, &["ip", "addr", "add", &format!("{}/24", e.ip), "dev", &e.iface])?;
            run(lab, &e.ns, &["ip", "link", "set", &e.iface, "mtu", MTU, "up"])?;
        }
        Ok(t)
    }

    /// The cluster end's tunnel address (where the cluster namespace's servers are reached).
    pub fn cluster_ip(&self) -> String {
        format!("10.251.{}.2", self.peer.subnet())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Stopping a daemon closes its TUN device (gone with it) and, normally, its socket.
        self.daemons.clear();
        for (ns, iface) in &self.links {
            let _ = Command::new("ip")
                .args(["-n", ns, "link", "del", iface])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_file(socket(iface));
        }
    }
}

/// What the daemon of `iface` printed.
fn daemon_log(lab: &Lab, iface: &str) -> String {
    std::fs::read_to_string(lab.dir().join(format!("{iface}.log"))).unwrap_or_default()
}

/// The UAPI socket of `iface`.
fn socket(iface: &str) -> PathBuf {
    PathBuf::from(UAPI_DIR).join(format!("{iface}.sock"))
}

/// Runs `cmd` in `ns`; an error with its output if it fails.
fn run(lab: &Lab, ns: &str, cmd: &[&str]) -> Result<()> {
    let out = lab.exec_timeout(ns, cmd, Duration::from_secs(10));
    if !out.status.success() {
        bail!("{} failed: {}", cmd.join(" "), show(&out));
    }
    Ok(())
}

/// Writes a new private key to `path` (mode 0600) and returns its public key.
fn keypair(path: &std::path::Path) -> Result<String> {
    let private = Command::new("wg").arg("genkey").output().context("running wg genkey (wireguard-tools)")?;
    if !private.status.success() {
        bail!("wg genkey failed: {}", show(&private));
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&private.stdout))
        .with_context(|| format!("write {}", path.display()))?;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running wg pubkey")?;
    child.stdin.take().context("wg pubkey stdin")?.write_all(&private.stdout)?;
    let public = child.wait_with_output()?;
    if !public.status.success() {
        bail!("wg pubkey failed: {}", show(&public));
    }
    Ok(String::from_utf8_lossy(&public.stdout).trim().to_string())
}
