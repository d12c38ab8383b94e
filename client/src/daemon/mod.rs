//! `tpvpn up`, `down` and `status`: the daemon's life cycle.
//!
//! `up` without `--foreground` starts the same binary with `--foreground` as a
//! background daemon in its own session and waits for one line from it: `ok ...` once
//! routes are in place and the tunnel is up, or the error. The daemon records each
//! system change in the state file before making it, and undoes them all on `down`,
//! SIGTERM and SIGINT; after a crash the next `up` or `down` undoes them from the file.
//!
//! - `spawn`: checks, the re-exec into the background and the readiness line;
//! - `plan`: the manager target (flags or kubeconfig discovery) and finding it again;
//! - `system`: the TUN device, routes, the DNS server and the OS resolver;
//! - `supervisor`: the loop over the link (up or reconnecting), updates, control
//!   requests (messages from `control::serve`) and signals, then the undo;
//! - `commands`: `down`, `status`, `list`, `intercept`, `leave` from the command line.

mod commands;
mod plan;
mod spawn;
mod supervisor;
mod system;

pub use commands::{current_thread, down, intercept_request, list, paths, status};
pub use spawn::{preflight, up_background, up_foreground};
pub use system::{DnsMode, DNS_V4, TUN_V4, TUN_V6};

use std::path::PathBuf;

use ipnet::IpNet;

/// Environment variable that marks the daemon child started by `tpvpn up`.
pub const DAEMON_ENV: &str = "TPVPN_DAEMON_CHILD";

/// Where `up` learns how to reach the manager.
#[derive(Debug, Clone)]
pub enum Source {
    /// `--manager`, `--manager-ca` and `--token-file`.
    Direct { manager: String, ca_file: PathBuf, token_file: PathBuf },
    /// A kubeconfig context; `manager` overrides the discovered address.
    Kube { kubeconfig: Option<PathBuf>, context: Option<String>, manager: Option<String>, manager_namespace: String },
}

/// Options of `tpvpn up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub source: Source,
    pub never_proxy: Vec<IpNet>,
    pub also_proxy: Vec<IpNet>,
    pub device: String,
    pub mtu: u16,
    pub dns_mode: DnsMode,
    /// `--namespace`: the connected namespace (else the context's, else `default`).
    pub namespace: Option<String>,

    /// Route CIDRs that overlap routes already on the machine.
    pub allow_route_conflicts: bool,
    /// `--vnat`: which cluster ranges are reached through virtual addresses.
    pub vnat: tpvpn_vnat::Mode,
    /// `--virtual-subnet`: where virtual ranges come from (the defaults for a family
    /// none is given for).
    pub virtual_subnets: Vec<IpNet>,
    /// How to reach the manager.
    pub transport: crate::connect::Transport,
}
