//! The tpvpn lab: a throw-away "laptop + cluster + internet" built from three
//! Linux network namespaces, with real servers (nginx, redis, the lab's own
//! TCP/UDP test servers) on fake ClusterIPs and pod IPs, the `tpvpn-manager`
//! running in the cluster namespace and the `tpvpn` client driven in the
//! laptop namespace. It is used by the demo (`tpvpn-lab demo`), the
//! end-to-end tests (`lab/tests/datapath.rs`) and the benchmarks.
//!
//! The lab never touches the root network namespace: every namespace it uses
//! is one it created (unique name per lab), veth pairs are created directly
//! inside those namespaces, and all routes, addresses and servers live there.
//! [`Lab`]'s `Drop` kills every process the lab started (by pid), deletes its
//! namespaces and removes its temporary directory, also when a test panics.
//!
//! Topology (see [`Lab::new`]):
//!
//! ```text
//!   inet ns  10.250.2.1 ── 10.250.2.2  laptop ns  10.250.1.2 ── 10.250.1.1  cluster ns
//!   (default route of the laptop;                 ("node network")          kube0: ClusterIPs, pod IPs
//!    routes no cluster IP)                                                  manager on 10.250.1.1:4443
//!                                                                           API server stand-in on 10.250.1.1:6443
//! ```
//!
//! The cluster namespace also runs a stand-in for the Kubernetes API server
//! ([`apiserver`], plain HTTP on [`APISERVER_ADDR`]) loaded with the lab's
//! namespaces, node, Services, pod and the `tpvpn/tpvpn-client` Secret;
//! [`Lab::kubeconfig`] points at it and [`Lab::kube_apply`] changes it.

pub mod apiserver;
pub mod client;
pub mod data;
pub mod hostile;
pub mod pods;
pub mod resolved;
pub mod runtime;
pub mod serve;
pub mod volumes;
pub mod wan;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

/// Where the manager listens (cluster side of the node network).
pub const MANAGER_ADDR: &str = "10.250.1.1:4443";
/// The manager's Pod object (namespace `tpvpn`), what the port-forward goes to.
pub const MANAGER_POD: &str = "tpvpn-manager-0";
/// The audience of the node agents' tokens (the manager's `auth::AUDIENCE`).
pub const AGENT_AUDIENCE: &str = "tpvpn.dev/manager";
/// Laptop address on the node network.
pub const LAPTOP_NODE_IP: &str = "10.250.1.2";
/// The frontend Service ClusterIP (nginx on :80).
pub const FRONTEND_IP: &str = "10.96.0.10";
/// The IPv6-only Service `default/frontend6` (the same nginx, :80).
pub const FRONTEND6_IP: &str = "fd00:96::10";
/// The frontend pod IP (same nginx, :80).
pub const FRONTEND_POD_IP: &str = "10.244.1.10";
/// The redis Service ClusterIP (:6379).
pub const REDIS_IP: &str = "10.96.0.20";
/// The UDP echo Service ClusterIP (:7).
pub const UDP_ECHO_ADDR: &str = "10.96.0.30:7";
/// Where the Kubernetes API server stand-in listens (cluster side of the node network).
pub const APISERVER_ADDR: &str = "10.250.1.1:6443";
/// Where it also listens over HTTPS, for `kubectl` (client-go sends credentials only
/// over TLS), with a certificate of the lab's own CA ([`Lab::kubectl`]).
pub const APISERVER_TLS_ADDR: &str = "10.250.1.1:6444";
/// A user of the API stand-in's token file (and a kubeconfig context of that name),
/// allowed only what RBAC objects grant it, in group [`LAB_USER_GROUP`].
pub const LAB_USER: &str = "alice";
pub const LAB_USER_GROUP: &str = "developers";
/// The lab's TCP test servers' Service ClusterIP.
pub const TEST_SERVERS_IP: &str = "10.96.0.40";
/// Reset server: writes 1000 bytes, then RST.
pub const RESET_ADDR: &str = "10.96.0.40:9000";
/// Sink server: hashes until EOF, replies `"<count> <fnv-hex>\n"`.
pub const SINK_ADDR: &str = "10.96.0.40:9001";
/// Source server: reads a u64 BE count, writes that much of the data stream.
pub const SOURCE_ADDR: &str = "10.96.0.40:9003";
/// Silent server: accepts, then never reads or writes.
pub const SILENT_ADDR: &str = "10.96.0.40:9004";
/// A Service IP with no listener at all (connections are refused).
pub const NO_LISTENER_IP: &str = "10.96.0.50";
/// Text the nginx index page contains.
pub const FRONTEND_BODY: &str = "tpvpn lab frontend";

/// One Service of the lab's fixtures. This table is the one source: it is rendered into
/// the addresses of the cluster namespace (the ClusterIPs the lab's servers listen on),
/// the cluster DNS's records (dnsmasq) and the API stand-in's Service objects.
pub struct LabService {
    pub namespace: &'static str,
    pub name: &'static str,
    pub cluster_ip: &'static str,
    /// (name, port, protocol); `targetPort` is the same number.
    pub ports: &'static [(&'static str, u16, &'static str)],
    /// Whether a lab server answers on the ClusterIP in the cluster namespace (its address
    /// is put on `kube0`).
    pub served: bool,
}

/// The lab's Services (the pods of intercepts add `web` and `mesh`: [`pods`]).
pub const SERVICES: &[LabService] = &[
    LabService {
        namespace: "default",
        name: "frontend",
        cluster_ip: FRONTEND_IP,
        ports: &[("http", 80, "TCP")],
        served: true,
    },
    LabService {
        namespace: "default",
        name: "frontend6",
        cluster_ip: FRONTEND6_IP,
        ports: &[("http", 80, "TCP")],
        served: true,
    },
    LabService {
        namespace: "default",
        name: "redis-leader",
        cluster_ip: REDIS_IP,
        ports: &[("redis", 6379, "TCP")],
        served: true,
    },
    LabService {
        namespace: "default",
        name: "udp-echo",
        cluster_ip: "10.96.0.30",
        ports: &[("echo", 7, "UDP")],
        served: true,
    },
    LabService {
        namespace: "default",
        name: "test-servers",
        cluster_ip: TEST_SERVERS_IP,
        ports: &[("reset", 9000, "TCP"), ("sink", 9001, "TCP"), ("source", 9003, "TCP"), ("silent", 9004, "TCP")],
        served: true,
    },
    LabService {
        namespace: "kube-system",
        name: "kube-dns",
        cluster_ip: CLUSTER_DNS_IP,
        ports: &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        served: true,
    },
    // A namespace named like a public suffix, for the DNS tests.
    LabService { namespace: "rs", name: "svc", cluster_ip: "10.96.0.60", ports: &[("http", 80, "TCP")], served: false },
    // The manager's own Service: a NodePort on the node (see `fixtures`).
    LabService {
        namespace: "tpvpn",
        name: "tpvpn-manager",
        cluster_ip: "10.96.0.70",
        ports: &[("quic", 4443, "UDP"), ("tunnel", 4443, "TCP")],
        served: false,
    },
];

/// Addresses on the cluster's `kube0` besides the served ClusterIPs: the frontend pod's
/// IP and a ClusterIP nothing listens on.
const EXTRA_CLUSTER_ADDRS: &[&str] = &[FRONTEND_POD_IP, NO_LISTENER_IP];
/// The cluster DNS (dnsmasq serving `cluster.local`), the ClusterIP of `kube-system/kube-dns`.
pub const CLUSTER_DNS_IP: &str = "10.96.0.53";
/// The "VPN" of [`Lab::add_vpn`]: its gateway on the laptop's side, and its own server at
/// an address that is the cluster's frontend ClusterIP too (no port 9003 there).
pub const VPN_GATEWAY: &str = "192.168.77.1";
pub const VPN_SERVER_ADDR: &str = "10.96.0.10:9003";
/// The internet namespace's DNS server: the laptop's original nameserver.
pub const UPSTREAM_DNS_IP: &str = "10.250.2.1";
/// What the internet DNS answers for `docs.rs` (and other internet names).
pub const INTERNET_IP: &str = "10.250.2.1";
/// Addresses of the headless-like name `big.default.svc.cluster.local`: enough A records
/// to overflow a 512-byte UDP answer.
pub const BIG_RECORDS: u8 = 60;

/// The laptop's `resolv.conf` as the lab creates it (the internet DNS only).
pub const LAPTOP_RESOLV_CONF: &str = "nameserver 10.250.2.1\noptions timeout:2 attempts:2\n";

/// Default timeout of [`Lab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of [`Lab::lab_tool`] (bulk transfers through a tunnel can be slow).
pub const LAB_TOOL_TIMEOUT: Duration = Duration::from_secs(300);

static LAB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One lab: three namespaces, servers, manager. Torn down on drop.
pub struct Lab {
    id: String,
    laptop: String,
    cluster: String,
    inet: String,
    dir: PathBuf,
    bin_dir: PathBuf,
    /// Namespaces created so far (deleted on drop).
    namespaces: Vec<String>,
    /// Servers started in the cluster namespace: (name, process).
    children: Vec<(String, Child)>,
    manager: Option<Child>,
    /// The node agent, once started ([`Lab::start_pods`]).
    agent: Option<Child>,
    /// Pods started by [`Lab::start_pods`] / [`Lab::add_pod`].
    pods: Vec<pods::RunningPod>,
    /// The node's container runtime, once started ([`Lab::start_pods`]).
    containerd: Option<runtime::Containerd>,
    /// The caller pod's namespace (empty until [`Lab::start_pods`]).
    caller_ns: String,
    /// A second laptop's namespace, once added ([`Lab::add_second_laptop`]).
    laptop2: Option<String>,
    /// The manager's `--listen` address ([`MANAGER_ADDR`] unless changed).
    manager_listen: String,
    /// A command the manager is started under (say `prlimit --nofile=1024`), and extra
    /// arguments for it ([`Lab::restart_manager_with`]).
    manager_wrapper: Vec<String>,
    manager_extra: Vec<String>,
    /// Whether the manager accepts the shared client token (`--token-file`): lab tests
    /// connect in direct mode with it.
    client_token: bool,
    /// Other builds of the manager and the agent to run (an earlier release's, for
    /// version skew; [`Lab::use_manager_bin`], [`Lab::use_agent_bin`]).
    manager_bin: Option<PathBuf>,
    agent_bin: Option<PathBuf>,
    /// Whether agents present the shared agent token (`--agent-token-file`, what a
    /// release before agents' ServiceAccount tokens knows) instead of their ServiceAccount's.
    shared_agent_token: bool,
    /// Whether `tpvpn` was ever run (then drop runs `tpvpn down`).
    used_tpvpn: AtomicBool,
    exec_counter: AtomicU64,
    /// Whether this lab created `dir` (only then is it removed on drop).
    dir_created: bool,
    /// `/etc/netns/<laptop>`, holding the laptop's own resolv.conf, once created.
    netns_etc: Option<PathBuf>,
    /// Bearer tokens of the API server stand-in: admin, and no access to secrets.
    api_token: String,
    no_secrets_token: String,
    no_portforward_token: String,
    /// Token of [`LAB_USER`], a user of the stand-in's token file: allowed what RBAC grants.
    user_token: String,
    /// Objects loaded into the API stand-in besides the lab's own.
    extra_fixtures: Vec<Value>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("id", &self.id).field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// True if running as root (euid 0); otherwise prints a loud skip message and returns false.
pub fn require_root() -> bool {
    let euid = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u32>().ok()))
    });
    if euid == Some(0) {
        return true;
    }
    eprintln!();
    eprintln!("###############################################################");
    eprintln!("### SKIPPED: the tpvpn lab needs root (network namespaces). ###");
    eprintln!("### Run the end-to-end tests as root, e.g. sudo -E cargo ... ###");
    eprintln!("###############################################################");
    eprintln!();
    false
}

/// The directory holding `tpvpn`, `tpvpn-manager` and `tpvpn-lab`: `$TPVPN_BIN_DIR`,
/// else the current executable's directory (its parent if that is `deps/`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("TPVPN_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("cannot find the current executable")?;
    let mut dir = exe.parent().context("current executable has no directory")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// For tests: polls `cond` every 50 ms until it holds or `limit` has passed; whether it
/// held. Waiting on a condition, never a fixed sleep.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// For tests: whether process `pid` has ended (no `/proc` entry, or a zombie).
pub fn process_gone(pid: &str) -> bool {
    let stat = fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    stat.is_empty() || stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// For tests: a new lab, or `None` (the test is skipped, loudly) when not root. A lab
/// that cannot be built fails the test with the reason.
pub fn lab_or_skip() -> Option<Lab> {
    if !require_root() {
        return None;
    }
    Some(Lab::new().unwrap_or_else(|e| panic!("cannot build the lab: {e:#}")))
}

/// For tests: a lab with pods and the agent, and `tpvpn up` on the laptop; `None` (the
/// test skipped) without root or without the container runtime.
pub fn lab_with_pods_or_skip() -> Option<Lab> {
    let mut lab = lab_or_skip()?;
    if !lab.start_pods_or_skip() {
        return None;
    }
    if let Err(e) = lab.up(&[]) {
        panic!("tpvpn up: {e:#}\nmanager log:\n{}", lab.manager_log());
    }
    Some(lab)
}

/// Path of one of the workspace's binaries, or a clear error.
fn find_bin(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{name} not found at {} (set TPVPN_BIN_DIR or build the workspace first: cargo build --workspace)",
            p.display()
        );
    }
    Ok(p)
}

impl Lab {
    /// Builds the whole lab: namespaces, links, servers, TLS material, token
    /// and a running manager. Everything already built is torn down if a step fails.
    pub fn new() -> Result<Lab> {
        Lab::with_fixtures(Vec::new())
    }

    /// [`Lab::new`] with `extra` objects loaded into the API stand-in at start (say, a
    /// large cluster's Services).
    pub fn with_fixtures(extra: Vec<Value>) -> Result<Lab> {
        let bin_dir = bin_dir()?;
        find_bin(&bin_dir, "tpvpn-manager")?;
        find_bin(&bin_dir, "tpvpn-lab")?;
        let pid = std::process::id();
        // Pick a counter value whose namespaces and dir are free (a stale lab of
        // an earlier process with the same pid must not be reused).
        let id = loop {
            let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
            let id = format!("{pid}-{n}");
            let taken = ["laptop", "cluster", "inet"]
                .iter()
                .any(|r| Path::new("/run/netns").join(format!("tpvpn-{id}-{r}")).exists())
                || Path::new(&format!("/tmp/tpvpn-lab-{id}")).exists();
            if !taken {
                break id;
            }
            if n > 1000 {
                bail!("no free lab id");
            }
        };
        let dir = PathBuf::from(format!("/tmp/tpvpn-lab-{id}"));
        let mut lab = Lab {
            laptop: format!("tpvpn-{id}-laptop"),
            cluster: format!("tpvpn-{id}-cluster"),
            inet: format!("tpvpn-{id}-inet"),
            id,
            dir,
            bin_dir,
            namespaces: Vec::new(),
            children: Vec::new(),
            manager: None,
            agent: None,
            pods: Vec::new(),
            containerd: None,
            caller_ns: String::new(),
            laptop2: None,
            manager_listen: MANAGER_ADDR.to_string(),
            manager_wrapper: Vec::new(),
            manager_extra: Vec::new(),
            client_token: true,
            manager_bin: None,
            agent_bin: None,
            shared_agent_token: false,
            used_tpvpn: AtomicBool::new(false),
            exec_counter: AtomicU64::new(0),
            dir_created: false,
            netns_etc: None,
            api_token: random_token()?,
            no_secrets_token: random_token()?,
            no_portforward_token: random_token()?,
            user_token: random_token()?,
            extra_fixtures: extra,
        };
        // On error `lab` is dropped here, which tears down what was built.
        lab.build().with_context(|| format!("building lab {}", lab.id))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        fs::create_dir(&self.dir).with_context(|| format!("create {}", self.dir.display()))?;
        self.dir_created = true;
        for sub in ["out", "run", "www", "nginx-tmp"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        self.build_network()?;
        self.write_tls_and_token()?;
        self.start_servers()?;
        self.start_dns()?;
        self.start_apiserver()?;
        self.start_manager()?;
        Ok(())
    }

    fn build_network(&mut self) -> Result<()> {
        for ns in [self.laptop.clone(), self.cluster.clone(), self.inet.clone()] {
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns);
        }
        // The laptop's own resolv.conf: `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf
        // over /etc/resolv.conf, so tpvpn's DNS changes land in this file and never in the
        // machine's. It exists before anything runs in the laptop namespace.
        let etc = Path::new("/etc/netns").join(&self.laptop);
        fs::create_dir_all(&etc).with_context(|| format!("create {}", etc.display()))?;
        self.netns_etc = Some(etc.clone());
        fs::write(etc.join("resolv.conf"), LAPTOP_RESOLV_CONF)?;
        let (l, c, i) = (self.laptop.as_str(), self.cluster.as_str(), self.inet.as_str());
        // veth pairs are created inside the lab namespaces, never in the root one.
        ip(&["-n", l, "link", "add", "to-cluster", "type", "veth", "peer", "name", "to-laptop", "netns", c])?;
        ip(&["-n", l, "link", "add", "to-inet", "type", "veth", "peer", "name", "to-laptop", "netns", i])?;
        ip(&["-n", l, "addr", "add", "10.250.1.2/24", "dev", "to-cluster"])?;
        ip(&["-n", c, "addr", "add", "10.250.1.1/24", "dev", "to-laptop"])?;
        ip(&["-n", l, "addr", "add", "10.250.2.2/24", "dev", "to-inet"])?;
        ip(&["-n", i, "addr", "add", "10.250.2.1/24", "dev", "to-laptop"])?;
        for (ns, dev) in
            [(l, "lo"), (l, "to-cluster"), (l, "to-inet"), (c, "lo"), (c, "to-laptop"), (i, "lo"), (i, "to-laptop")]
        {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", l, "route", "add", "default", "via", "10.250.2.1"])?;
        // ClusterIPs and pod IPs: /32s on a dummy `kube0`, or on `lo` where the
        // kernel has no dummy driver (e.g. in containers that cannot load modules).
        let dev = if ip(&["-n", c, "link", "add", "kube0", "type", "dummy"]).is_ok() {
            ip(&["-n", c, "link", "set", "kube0", "up"])?;
            "kube0"
        } else {
            "lo"
        };
        let served = SERVICES.iter().filter(|s| s.served).map(|s| s.cluster_ip);
        for a in served.chain(EXTRA_CLUSTER_ADDRS.iter().copied()) {
            if a.contains(':') {
                // `nodad`: usable at once, without duplicate address detection.
                ip(&["-n", c, "-6", "addr", "add", &format!("{a}/128"), "dev", dev, "nodad"])?;
            } else {
                ip(&["-n", c, "addr", "add", &format!("{a}/32"), "dev", dev])?;
            }
        }
        Ok(())
    }

    fn write_tls_and_token(&self) -> Result<()> {
        let ck = rcgen::generate_simple_self_signed(vec!["tpvpn-manager".to_string()])
            .context("generating the manager certificate")?;
        fs::write(self.dir.join("manager.crt"), ck.cert.pem())?;
        fs::write(self.dir.join("manager.key"), ck.signing_key.serialize_pem())?;
        // The API stand-in's HTTPS: a CA and a serving certificate for its address.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "tpvpn-lab apiserver CA");
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key)?;
        let ip = APISERVER_TLS_ADDR.split(':').next().unwrap_or_default();
        let serving_key = rcgen::KeyPair::generate()?;
        let serving = rcgen::CertificateParams::new(vec![ip.to_string(), "kubernetes.default.svc".into()])?
            .signed_by(&serving_key, &ca)?;
        fs::write(self.dir.join("apiserver-ca.crt"), ca.pem())?;
        fs::write(self.dir.join("apiserver.crt"), serving.pem())?;
        fs::write(self.dir.join("apiserver.key"), serving_key.serialize_pem())?;
        fs::write(self.dir.join("token"), random_token()? + "\n")?;
        fs::write(self.dir.join("agent-token"), random_token()? + "\n")?;
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let d = self.dir.display().to_string();
        fs::write(
            self.dir.join("www/index.html"),
            format!("<!doctype html>\n<html><body><h1>{FRONTEND_BODY}</h1></body></html>\n"),
        )?;
        let conf = format!(
            "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-tmp/body;\n  proxy_temp_path {d}/nginx-tmp/proxy;\n  \
             fastcgi_temp_path {d}/nginx-tmp/fastcgi;\n  uwsgi_temp_path {d}/nginx-tmp/uwsgi;\n  scgi_temp_path {d}/nginx-tmp/scgi;\n  \
             server {{\n    listen {FRONTEND_IP}:80;\n    listen {FRONTEND_POD_IP}:80;\n    listen [{FRONTEND6_IP}]:80;\n    root {d}/www;\n    index index.html;\n  }}\n}}\n"
        );
        let conf_path = self.dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let conf_s = conf_path.display().to_string();
        let err_s = format!("{d}/nginx.err");
        self.spawn_server("nginx", &["nginx", "-c", &conf_s, "-p", &d, "-e", &err_s])?;
        self.spawn_server(
            "redis",
            &[
                "redis-server",
                "--bind",
                REDIS_IP,
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                &d,
                "--protected-mode",
                "no",
            ],
        )?;
        let lab_bin = find_bin(&self.bin_dir, "tpvpn-lab")?.display().to_string();
        self.spawn_server(
            "lab-servers",
            &[
                &lab_bin,
                "serve",
                "--udp-echo",
                UDP_ECHO_ADDR,
                "--reset",
                RESET_ADDR,
                "--sink",
                SINK_ADDR,
                "--source",
                SOURCE_ADDR,
                "--silent",
                SILENT_ADDR,
            ],
        )?;
        self.wait_servers()
    }

    /// The cluster DNS (dnsmasq: `cluster.local` records of the fixtures, NXDOMAIN for
    /// other cluster names, TTL 30) and the internet DNS (dnsmasq: `docs.rs` and
    /// friends), each in its namespace.
    fn start_dns(&mut self) -> Result<()> {
        let mut cluster = vec![
            "no-resolv".to_string(),
            "no-hosts".into(),
            "bind-interfaces".into(),
            format!("listen-address={CLUSTER_DNS_IP}"),
            "local=/cluster.local/".into(),
            "local-ttl=30".into(),
        ];
        for svc in SERVICES {
            cluster.push(format!("host-record={}.{}.svc.cluster.local,{}", svc.name, svc.namespace, svc.cluster_ip));
        }
        cluster.push(
            "srv-host=_http._tcp.frontend.default.svc.cluster.local,frontend.default.svc.cluster.local,80,0,100".into(),
        );
        cluster.push("srv-host=_redis._tcp.redis-leader.default.svc.cluster.local,redis-leader.default.svc.cluster.local,6379,0,100".into());
        // A headless Service and a pod name: only the cluster DNS knows them.
        cluster.push(format!("address=/web.default.svc.cluster.local/{FRONTEND_POD_IP}"));
        cluster.push(format!("host-record=10-244-1-10.default.pod.cluster.local,{FRONTEND_POD_IP}"));
        // Served by the cluster DNS for the include-suffixes test.
        cluster.push("host-record=db.corp.internal,10.96.0.80".into());

        for i in 1..=BIG_RECORDS {
            cluster.push(format!("address=/big.default.svc.cluster.local/10.244.3.{i}"));
        }
        let internet = [
            "no-resolv".to_string(),
            "no-hosts".into(),
            "bind-interfaces".into(),
            format!("listen-address={UPSTREAM_DNS_IP}"),
            "local-ttl=60".into(),
            format!("host-record=docs.rs,{INTERNET_IP}"),
            format!("host-record=crates.dev,{INTERNET_IP}"),
            format!("host-record=example.com,{INTERNET_IP}"),
            format!("host-record=frontend.example.com,{INTERNET_IP}"),
            // A company name under a word that is also a namespace of the cluster.
            format!("host-record=jira.corp,{INTERNET_IP}"),
            // A name under a namespace with no such Service: only the internet has it.
            "txt-record=nope.default,upstream-answer".into(),
            // The internet's answer for names it does not have.
            "local=/#/".into(),
        ];
        for (name, lines, ns) in
            [("cluster-dns", cluster, self.cluster.clone()), ("internet-dns", internet.to_vec(), self.inet.clone())]
        {
            let conf = self.dir.join(format!("{name}.conf"));
            fs::write(&conf, lines.join("\n") + "\n")?;
            let conf = format!("--conf-file={}", conf.display());
            let pid = format!("--pid-file={}/{name}.pid", self.dir.display());
            self.spawn_in(&ns, name, &["dnsmasq", "--keep-in-foreground", "--user=root", &conf, &pid])?;
        }
        // Both answer before the lab is handed out (bounded: ~5 s).
        for (ns, server, name) in [
            (self.cluster.clone(), CLUSTER_DNS_IP, "frontend.default.svc.cluster.local"),
            (self.inet.clone(), UPSTREAM_DNS_IP, "docs.rs"),
        ] {
            let at = format!("@{server}");
            let ok = (0..50).any(|_| {
                let out = self.exec_timeout(
                    &ns,
                    &["dig", "+short", "+time=1", "+tries=1", &at, name],
                    Duration::from_secs(3),
                );
                let up = out.status.success() && !out.stdout.is_empty();
                if !up {
                    std::thread::sleep(Duration::from_millis(100));
                }
                up
            });
            if !ok {
                bail!("{server} does not answer {name}; see {}/*-dns.log", self.dir.display());
            }
        }
        Ok(())
    }

    /// Starts a long-running server in the cluster ns, output to `<dir>/<name>.log`.
    fn spawn_server(&mut self, name: &str, cmd: &[&str]) -> Result<()> {
        let ns = self.cluster.clone();
        self.spawn_in(&ns, name, cmd)
    }

    /// Starts a long-running server in namespace `ns`, output to `<dir>/<name>.log`.
    fn spawn_in(&mut self, ns: &str, name: &str, cmd: &[&str]) -> Result<()> {
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Polls `ss` in the cluster ns until every server listens (bounded: ~10 s).
    fn wait_servers(&mut self) -> Result<()> {
        let frontend6 = format!("[{FRONTEND6_IP}]:80");
        let tcp = [
            "10.96.0.10:80",
            "10.244.1.10:80",
            &frontend6,
            "10.96.0.20:6379",
            RESET_ADDR,
            SINK_ADDR,
            SOURCE_ADDR,
            SILENT_ADDR,
        ];
        let mut missing = Vec::new();
        for _ in 0..100 {
            for (name, child) in &mut self.children {
                if let Ok(Some(st)) = child.try_wait() {
                    let log = fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                    let err = fs::read_to_string(self.dir.join("nginx.err")).unwrap_or_default();
                    bail!("{name} exited early ({st}); log:\n{log}\nnginx.err:\n{err}");
                }
            }
            let t = self.exec_timeout(&self.cluster, &["ss", "-Hltn"], Duration::from_secs(5));
            let u = self.exec_timeout(&self.cluster, &["ss", "-Hlun"], Duration::from_secs(5));
            let (t, u) = (String::from_utf8_lossy(&t.stdout), String::from_utf8_lossy(&u.stdout));
            missing = tcp.iter().filter(|a| !listens(&t, a)).map(|a| format!("tcp {a}")).collect();
            if !listens(&u, UDP_ECHO_ADDR) {
                missing.push(format!("udp {UDP_ECHO_ADDR}"));
            }
            if missing.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("servers not listening after 10 s: {missing:?}")
    }

    /// The objects the API server stand-in starts with (see [`Lab::new`]).
    fn fixtures(&self) -> Result<Value> {
        let b64 = |p: PathBuf| -> Result<String> {
            let data = fs::read(&p).with_context(|| format!("read {}", p.display()))?;
            Ok(base64::engine::general_purpose::STANDARD.encode(data))
        };
        let port = |name: &str, port: u16, proto: &str| json!({"name": name, "port": port, "protocol": proto, "targetPort": port});
        let svc = |ns: &str, name: &str, ip: &str, ports: Vec<Value>| {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
                   "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": ports}})
        };
        let (node_ip, _) = MANAGER_ADDR.split_once(':').context("MANAGER_ADDR")?;
        let mut objs: Vec<Value> = ["default", "kube-system", "tpvpn", "rs", "dev", "corp"]
            .iter()
            .map(|n| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}))
            .collect();
        objs.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "lab-node"},
            "spec": {"podCIDR": "10.244.0.0/16", "podCIDRs": ["10.244.0.0/16"]},
            "status": {"addresses": [{"type": "InternalIP", "address": node_ip}]}}));
        for s in SERVICES {
            let ports = s.ports.iter().map(|(name, p, proto)| port(name, *p, proto)).collect();
            let mut obj = svc(s.namespace, s.name, s.cluster_ip, ports);
            if s.cluster_ip.contains(':') {
                obj["spec"]["ipFamilies"] = json!(["IPv6"]);
            }
            if s.name == "tpvpn-manager" {
                obj["spec"]["type"] = json!("NodePort");
                obj["spec"]["ports"][0]["nodePort"] = json!(4443);
                obj["spec"]["ports"][1]["targetPort"] = json!("tunnel");
                obj["spec"]["selector"] = json!({"app": "tpvpn-manager"});
            }
            objs.push(obj);
        }
        objs.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "frontend-0", "namespace": "default", "labels": {"app": "frontend"}},
            "spec": {"nodeName": "lab-node", "containers": [{"name": "nginx", "image": "nginx"}]},
            "status": {"phase": "Running", "hostIP": node_ip, "podIP": FRONTEND_POD_IP, "podIPs": [{"ip": FRONTEND_POD_IP}]}}));
        // The manager's pod: it runs in the cluster namespace on the node's address, as a
        // hostNetwork pod would; the API stand-in's port-forward reaches it there.
        objs.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": MANAGER_POD, "namespace": "tpvpn", "labels": {"app": "tpvpn-manager"}},
            "spec": {"nodeName": "lab-node", "hostNetwork": true, "containers": [{"name": "manager", "image": "tpvpn-manager",
                "ports": [{"name": "quic", "containerPort": 4443, "protocol": "UDP"},
                          {"name": "tunnel", "containerPort": 4443, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "hostIP": node_ip, "podIP": node_ip, "podIPs": [{"ip": node_ip}],
                "conditions": [{"type": "Ready", "status": "True"}]}}));
        objs.push(json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "tpvpn-client", "namespace": "tpvpn"},
            "data": {"ca.crt": b64(self.manager_ca())?, "token": b64(self.token_file())?}}));
        objs.extend(self.extra_fixtures.iter().cloned());
        Ok(Value::Array(objs))
    }

    /// The kubeconfig: context `lab` (admin token) and `lab-no-secrets`.
    fn kubeconfig_yaml(&self) -> String {
        let lines = [
            "apiVersion: v1".to_string(),
            "kind: Config".into(),
            "clusters:".into(),
            "- name: lab".into(),
            "  cluster:".into(),
            format!("    server: {}", self.apiserver_url()),
            "users:".into(),
            "- name: lab-user".into(),
            "  user:".into(),
            format!("    token: {}", self.api_token),
            "- name: lab-user-no-secrets".into(),
            "  user:".into(),
            format!("    token: {}", self.no_secrets_token),
            "- name: lab-user-no-portforward".into(),
            "  user:".into(),
            format!("    token: {}", self.no_portforward_token),
            format!("- name: {LAB_USER}"),
            "  user:".into(),
            format!("    token: {}", self.user_token),
            "contexts:".into(),
            "- name: lab".into(),
            "  context: {cluster: lab, user: lab-user, namespace: default}".into(),
            "- name: lab-no-secrets".into(),
            "  context: {cluster: lab, user: lab-user-no-secrets, namespace: default}".into(),
            "- name: lab-no-portforward".into(),
            "  context: {cluster: lab, user: lab-user-no-portforward, namespace: default}".into(),
            format!("- name: {LAB_USER}"),
            format!("  context: {{cluster: lab, user: {LAB_USER}, namespace: default}}"),
            "current-context: lab".into(),
        ];
        lines.join("\n") + "\n"
    }

    /// Writes fixtures and kubeconfig, starts the API server stand-in and waits (≤ 10 s) until it answers.
    fn start_apiserver(&mut self) -> Result<()> {
        let fixtures = self.dir.join("apiserver-fixtures.json");
        fs::write(&fixtures, serde_json::to_vec(&self.fixtures()?)?)?;
        fs::write(self.kubeconfig(), self.kubeconfig_yaml())?;
        let lab_bin = find_bin(&self.bin_dir, "tpvpn-lab")?.display().to_string();
        let (fx, tok, nosec) = (fixtures.display().to_string(), self.api_token.clone(), self.no_secrets_token.clone());
        let nopf = self.no_portforward_token.clone();
        let users = self.dir.join("apiserver-tokens.csv");
        fs::write(&users, format!("{},{LAB_USER},1000,\"{LAB_USER_GROUP}\"\n", self.user_token))?;
        let users = users.display().to_string();
        let args = ["apiserver", "--listen", APISERVER_ADDR, "--fixtures", &fx, "--token", &tok];
        let mut cmd = vec![lab_bin.as_str()];
        cmd.extend_from_slice(&args);
        cmd.extend_from_slice(&["--no-secrets-token", &nosec, "--no-portforward-token", &nopf]);
        cmd.extend_from_slice(&["--token-auth-file", &users]);
        let (cert, key) = (self.dir.join("apiserver.crt"), self.dir.join("apiserver.key"));
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        cmd.extend_from_slice(&["--tls-listen", APISERVER_TLS_ADDR, "--tls-cert", &cert, "--tls-key", &key]);
        self.spawn_server("apiserver", &cmd)?;
        let log = || fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default();
        for _ in 0..100 {
            if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == "apiserver") {
                if let Ok(Some(st)) = child.try_wait() {
                    bail!(
                        "the API server stand-in exited early ({st}); log:
{}",
                        log()
                    );
                }
            }
            if let Ok((200, _)) = self.kube_request(Some(&self.api_token), "GET", "/version", None) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the API server stand-in does not answer /version after 10 s; log:
{}",
            log()
        )
    }

    /// Stops the API server stand-in and starts it again (its objects are the fixtures
    /// again): what an API server restart looks like to its clients.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        if let Some(i) = self.children.iter().position(|(n, _)| n == "apiserver") {
            let (_, child) = self.children.remove(i);
            terminate(child);
        }
        self.start_apiserver()
    }

    /// Drops the laptop's UDP to the manager's port (an nftables table in the laptop
    /// namespace), as a network that lets only TCP out would.
    pub fn block_manager_udp(&self) -> Result<()> {
        let (ip, port) = MANAGER_ADDR.split_once(':').context("MANAGER_ADDR")?;
        let rules = format!(
            "table inet tpvpnlab {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {ip} udp dport {port} drop\n  }}\n}}\n"
        );
        let script = self.dir.join("block-udp.nft");
        fs::write(&script, rules)?;
        let out = self.exec(&self.laptop, &["nft", "-f", &script.display().to_string()]);
        if !out.status.success() {
            bail!("nft: {}", show(&out));
        }
        Ok(())
    }

    /// The kubeconfig of the API server stand-in (contexts `lab`, `lab-no-secrets` and
    /// `lab-no-portforward`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// `http://10.250.1.1:6443`, the API server stand-in.
    pub fn apiserver_url(&self) -> String {
        format!("http://{APISERVER_ADDR}")
    }
    /// The admin bearer token of the API server stand-in.
    pub fn api_token(&self) -> String {
        self.api_token.clone()
    }
    /// The bearer token of [`LAB_USER`] (context of the same name): RBAC decides.
    pub fn user_token(&self) -> String {
        self.user_token.clone()
    }
    /// The bearer token that may do everything except access secrets (403).
    pub fn api_token_no_secrets(&self) -> String {
        self.no_secrets_token.clone()
    }

    /// One HTTP request to the API server stand-in, made with curl from the
    /// cluster namespace (`token` None: no `Authorization` header). Returns the
    /// HTTP status and the JSON body (`Null` if empty or not JSON). PATCH bodies
    /// are sent as `application/merge-patch+json`.
    pub fn kube_request(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.apiserver_url());
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let ctype = if method == "PATCH" { "application/merge-patch+json" } else { "application/json" };
        let ctype = format!("Content-Type: {ctype}");
        let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-X", method, "-H", &ctype, "-w", "\n%{http_code}"];
        if let Some(a) = &auth {
            cmd.extend_from_slice(&["-H", a]);
        }
        let n = self.exec_counter.fetch_add(1, Ordering::Relaxed);
        let body_path = self.dir.join(format!("out/kube-{n}.json"));
        let data_arg = format!("@{}", body_path.display());
        if let Some(b) = body {
            fs::write(&body_path, serde_json::to_vec(b)?)?;
            cmd.extend_from_slice(&["--data-binary", &data_arg]);
        }
        cmd.push(&url);
        let out = self.exec_timeout(&self.cluster, &cmd, Duration::from_secs(15));
        let _ = fs::remove_file(&body_path);
        if !out.status.success() {
            bail!("curl {method} {url} failed:\n{}", show(&out));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (resp, code) = text.rsplit_once('\n').context("no status line from curl")?;
        let code: u16 = code.trim().parse().with_context(|| format!("bad status from curl: {code:?}"))?;
        Ok((code, serde_json::from_str(resp).unwrap_or(Value::Null)))
    }

    /// `method path` with the admin token (e.g. `POST /api/v1/namespaces/default/services`
    /// with the object); the response object, or an error with the `Status` if not 2xx.
    pub fn kube_apply(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (code, resp) = self.kube_request(Some(&self.api_token), method, path, body)?;
        if !(200..300).contains(&code) {
            bail!("{method} {path}: HTTP {code}: {resp}");
        }
        Ok(resp)
    }

    /// Stand-in only: drops the watch history, so watches from any older resourceVersion get 410 Gone.
    pub fn kube_compact(&self) -> Result<()> {
        self.kube_apply("POST", "/_standin/compact", None).map(|_| ())
    }

    /// Everything the API server stand-in logged (one line per request).
    pub fn apiserver_log(&self) -> String {
        fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default()
    }

    /// Network namespace of the laptop.
    /// The running manager's pid.
    pub fn manager_pid(&self) -> Option<u32> {
        self.manager.as_ref().map(Child::id)
    }

    pub fn laptop(&self) -> &str {
        &self.laptop
    }
    /// Network namespace of the cluster (servers, manager).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
    /// Network namespace of the "internet" (the laptop's default route).
    pub fn inet(&self) -> &str {
        &self.inet
    }
    /// The lab's temporary directory (certs, token, logs, `run/`).
    /// The laptop's resolv.conf (what programs in the laptop namespace read).
    pub fn laptop_resolv_conf(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.laptop).join("resolv.conf")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The manager's CA (its self-signed certificate).
    pub fn manager_ca(&self) -> PathBuf {
        self.dir.join("manager.crt")
    }
    /// The token file the manager was started with.
    pub fn token_file(&self) -> PathBuf {
        self.dir.join("token")
    }
    /// `TPVPN_RUNTIME_DIR` given to every `tpvpn` invocation.
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Whether this machine can mount FUSE file systems (`intercept --mount`); says so
    /// on stderr when it cannot.
    pub fn fuse_or_skip() -> bool {
        let there = Path::new("/dev/fuse").exists();
        if !there {
            eprintln!("SKIPPED: no /dev/fuse on this machine: intercept --mount cannot be tested");
        }
        there
    }

    /// `path` as the laptop's daemon sees it: through its mount namespace (the lab's `ip
    /// netns exec` gives each process tree one), where `intercept --mount` mounts.
    pub fn daemon_view(&self, path: &str) -> PathBuf {
        let pid = fs::read_to_string(self.runtime_dir().join("tpvpn.pid")).unwrap_or_default();
        PathBuf::from(format!("/proc/{}/root{path}", pid.trim()))
    }

    /// Whether something is mounted at `dir` in the laptop's daemon's mount table.
    pub fn daemon_mounted(&self, dir: &str) -> bool {
        let pid = fs::read_to_string(self.runtime_dir().join("tpvpn.pid")).unwrap_or_default();
        mounted_in(pid.trim(), dir) > 0
    }

    /// Keeps the laptop's daemon's mount namespace alive beyond the daemon (a process
    /// in it, `nsenter --target DAEMON --mount --net sleep`), as a laptop's one mount
    /// namespace is: a daemon killed with SIGKILL then leaves its mounts there, as it
    /// would on a laptop, for the next `up` or `down` to remove.
    pub fn hold_daemon_mounts(&self) -> Result<MountHold> {
        let pid = fs::read_to_string(self.runtime_dir().join("tpvpn.pid")).context("the daemon's pid file")?;
        let child = Command::new("nsenter")
            .args(["--target", pid.trim(), "--mount", "--net", "--", "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("nsenter")?;
        let hold = MountHold { child: Some(child) };
        // In once its mount table is the daemon's.
        let daemon = fs::read_link(format!("/proc/{}/ns/mnt", pid.trim())).context("the daemon's mount namespace")?;
        let joined = wait_until(Duration::from_secs(5), || {
            fs::read_link(format!("/proc/{}/ns/mnt", hold.pid())).is_ok_and(|n| n == daemon)
        });
        ensure!(joined, "nsenter did not join the daemon's mount namespace");
        Ok(hold)
    }

    /// Runs `tpvpn ARGS` in the laptop namespace and in the mount namespace `hold` keeps.
    pub fn tpvpn_in(&self, hold: &MountHold, args: &[&str]) -> Output {
        let bin = match find_bin(&self.bin_dir, "tpvpn") {
            Ok(b) => b.display().to_string(),
            Err(e) => return failed_output(&format!("{e:#}")),
        };
        let target = hold.pid().to_string();
        let mut cmd = vec![bin.as_str()];
        cmd.extend_from_slice(args);
        let rt = self.runtime_dir().display().to_string();
        let prefix = ["nsenter", "--target", &target, "--mount", "--net", "--"];
        self.run_under(&prefix, &cmd, &[("TPVPN_RUNTIME_DIR", rt.as_str())], EXEC_TIMEOUT)
    }

    /// Runs `ip netns exec <ns> <cmd...>`, killed after [`EXEC_TIMEOUT`].
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        self.exec_timeout(ns, cmd, EXEC_TIMEOUT)
    }

    /// Runs `ip netns exec <ns> <cmd...>`, killed (by pid) after `timeout`.
    pub fn exec_timeout(&self, ns: &str, cmd: &[&str], timeout: Duration) -> Output {
        self.exec_env(ns, cmd, &[], timeout)
    }

    /// Like [`Lab::exec_timeout`] with extra environment variables. Output goes
    /// through files, not pipes, so a daemonizing command cannot block us.
    pub fn exec_env(&self, ns: &str, cmd: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
        self.run_under(&["ip", "netns", "exec", ns], cmd, env, timeout)
    }

    /// Runs `prefix cmd...` (`prefix` enters the namespaces), killed (by pid) after
    /// `timeout`.
    fn run_under(&self, prefix: &[&str], cmd: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
        let n = self.exec_counter.fetch_add(1, Ordering::Relaxed);
        let out_path = self.dir.join(format!("out/{n}.out"));
        let err_path = self.dir.join(format!("out/{n}.err"));
        let result = (|| -> Result<Output> {
            let mut child = Command::new(prefix[0])
                .args(&prefix[1..])
                .args(cmd)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(fs::File::create(&out_path)?)
                .stderr(fs::File::create(&err_path)?)
                .spawn()?;
            let deadline = Instant::now() + timeout;
            let mut timed_out = false;
            let status = loop {
                if let Some(st) = child.try_wait()? {
                    break st;
                }
                if Instant::now() >= deadline {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait()?;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let stdout = fs::read(&out_path).unwrap_or_default();
            let mut stderr = fs::read(&err_path).unwrap_or_default();
            if timed_out {
                stderr.extend_from_slice(format!("\n[lab: {cmd:?} killed after {timeout:?}]\n").as_bytes());
            }
            Ok(Output { status, stdout, stderr })
        })();
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&err_path);
        result.unwrap_or_else(|e| failed_output(&format!("lab: cannot run {cmd:?} under {prefix:?}: {e:#}")))
    }

    /// Runs the real `kubectl ARGS` (bounded, 30 s) in the laptop ns against the API
    /// stand-in's HTTPS listener, as the admin (`user` None) or as [`LAB_USER`].
    pub fn kubectl(&self, user: Option<&str>, args: &[&str]) -> Output {
        let kubeconfig = self.dir.join("kubectl.kubeconfig");
        let token = match user {
            None => self.api_token.clone(),
            Some(LAB_USER) => self.user_token.clone(),
            Some(other) => return failed_output(&format!("lab: no token for user {other}")),
        };
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{APISERVER_TLS_ADDR}\n    \
             certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: lab\n  \
             context: {{cluster: lab, user: user, namespace: default}}\ncurrent-context: lab\n",
            self.dir.join("apiserver-ca.crt").display()
        );
        if let Err(e) = fs::write(&kubeconfig, config) {
            return failed_output(&format!("lab: write {}: {e}", kubeconfig.display()));
        }
        let (kubeconfig, cache) = (kubeconfig.display().to_string(), self.dir.join("kubectl-cache"));
        let cache = cache.display().to_string();
        let mut cmd = vec!["kubectl", "--kubeconfig", &kubeconfig, "--cache-dir", &cache, "--request-timeout", "10s"];
        cmd.extend_from_slice(args);
        self.exec_timeout(&self.laptop, &cmd, Duration::from_secs(30))
    }

    /// Runs `tpvpn <args>` in the laptop ns with `TPVPN_RUNTIME_DIR` set.
    pub fn tpvpn(&self, args: &[&str]) -> Output {
        self.tpvpn_timeout(args, EXEC_TIMEOUT)
    }

    fn tpvpn_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        self.tpvpn_env(args, &[], timeout)
    }

    /// Runs `tpvpn` in the laptop namespace with extra environment variables (say,
    /// `KUBECONFIG`) besides `TPVPN_RUNTIME_DIR`.
    pub fn tpvpn_env(&self, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
        match find_bin(&self.bin_dir, "tpvpn") {
            Ok(bin) => self.tpvpn_bin(&bin, args, env, timeout),
            Err(e) => failed_output(&format!("{e:#}")),
        }
    }

    /// Runs `tpvpn` in the laptop namespace as the (unprivileged) user `uid`, with the
    /// lab's runtime directory.
    pub fn tpvpn_as(&self, uid: u32, args: &[&str]) -> Output {
        let bin = match find_bin(&self.bin_dir, "tpvpn") {
            Ok(b) => b.display().to_string(),
            Err(e) => return failed_output(&format!("{e:#}")),
        };
        let id = uid.to_string();
        let mut cmd = vec!["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups", "--", &bin];
        cmd.extend_from_slice(args);
        let rt = self.runtime_dir().display().to_string();
        self.exec_env(&self.laptop, &cmd, &[("TPVPN_RUNTIME_DIR", rt.as_str())], EXEC_TIMEOUT)
    }

    /// Runs another `tpvpn` binary (say, an older release's) like [`Lab::tpvpn_env`].
    pub fn tpvpn_bin(&self, bin: &Path, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
        let bin = bin.display().to_string();
        self.used_tpvpn.store(true, Ordering::Relaxed);
        let mut cmd = vec![bin.as_str()];
        cmd.extend_from_slice(args);
        let rt = self.runtime_dir().display().to_string();
        let mut all = vec![("TPVPN_RUNTIME_DIR", rt.as_str())];
        all.extend_from_slice(env);
        self.exec_env(&self.laptop, &cmd, &all, timeout)
    }

    /// Adds a second laptop (namespace `laptop2`, joined to the node network by its own
    /// veth, its own runtime directory) for tests with two developers.
    pub fn add_second_laptop(&mut self) -> Result<()> {
        let ns = format!("tpvpn-{}-laptop2", self.id);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let c = self.cluster.clone();
        ip(&["-n", &ns, "link", "add", "to-cluster", "type", "veth", "peer", "name", "to-laptop2", "netns", &c])?;
        ip(&["-n", &ns, "addr", "add", "10.250.4.2/24", "dev", "to-cluster"])?;
        ip(&["-n", &c, "addr", "add", "10.250.4.1/24", "dev", "to-laptop2"])?;
        for (n, dev) in [(ns.as_str(), "lo"), (ns.as_str(), "to-cluster"), (c.as_str(), "to-laptop2")] {
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &ns, "route", "add", "10.250.1.0/24", "via", "10.250.4.1"])?;
        fs::create_dir_all(self.dir.join("run2"))?;
        self.laptop2 = Some(ns);
        Ok(())
    }

    /// Adds a "VPN" beside the laptop (namespace `vpn`, joined by the laptop's device
    /// `vpn0`, gateway [`VPN_GATEWAY`]) with a server of its own at [`VPN_SERVER_ADDR`],
    /// an address inside the cluster's service range (the data-stream source: it sends
    /// as many bytes as asked). No route of the laptop points at it yet: the test adds
    /// the route it needs (`ip route add 10.96.0.0/12 via VPN_GATEWAY`).
    pub fn add_vpn(&mut self) -> Result<()> {
        let ns = format!("tpvpn-{}-vpn", self.id);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let l = self.laptop.clone();
        ip(&["-n", &l, "link", "add", "vpn0", "type", "veth", "peer", "name", "to-laptop", "netns", &ns])?;
        ip(&["-n", &l, "addr", "add", "192.168.77.2/24", "dev", "vpn0"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{VPN_GATEWAY}/24"), "dev", "to-laptop"])?;
        let server_ip = VPN_SERVER_ADDR.split(':').next().unwrap_or_default();
        ip(&["-n", &ns, "addr", "add", &format!("{server_ip}/32"), "dev", "lo"])?;
        for (n, dev) in [(l.as_str(), "vpn0"), (ns.as_str(), "lo"), (ns.as_str(), "to-laptop")] {
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &ns, "route", "add", "default", "via", "192.168.77.2"])?;
        let lab_bin = find_bin(&self.bin_dir, "tpvpn-lab")?.display().to_string();
        self.spawn_in(&ns, "vpn-server", &[&lab_bin, "serve", "--source", VPN_SERVER_ADDR])?;
        let listening = wait_until(Duration::from_secs(10), || {
            let t = self.exec_timeout(&ns, &["ss", "-Hltn"], Duration::from_secs(5));
            listens(&String::from_utf8_lossy(&t.stdout), VPN_SERVER_ADDR)
        });
        if !listening {
            bail!("the VPN's server does not listen on {VPN_SERVER_ADDR}");
        }
        Ok(())
    }

    /// The second laptop's namespace, once added.
    pub fn laptop2(&self) -> Option<&str> {
        self.laptop2.as_deref()
    }

    /// The second laptop's runtime directory.
    pub fn runtime_dir2(&self) -> PathBuf {
        self.dir.join("run2")
    }

    /// Runs `tpvpn` on the second laptop, as user `bob`.
    pub fn tpvpn2(&self, args: &[&str]) -> Output {
        let (Some(ns), Ok(bin)) = (&self.laptop2, find_bin(&self.bin_dir, "tpvpn")) else {
            return failed_output("no second laptop, or no tpvpn binary");
        };
        let bin = bin.display().to_string();
        let rt = self.dir.join("run2").display().to_string();
        let mut cmd = vec![bin.as_str()];
        cmd.extend_from_slice(args);
        self.exec_env(
            ns,
            &cmd,
            &[("TPVPN_RUNTIME_DIR", rt.as_str()), ("USER", "bob"), ("SUDO_USER", "bob")],
            EXEC_TIMEOUT,
        )
    }

    /// `tpvpn up` on the second laptop (direct mode, DNS off).
    pub fn tpvpn2_up(&self) -> Result<Output> {
        let base = self.up_args();
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend_from_slice(&["--dns-mode", "off"]);
        Ok(self.tpvpn2(&args))
    }

    /// The direct-mode arguments of `tpvpn up` (manager address, CA, token file).
    pub fn up_args(&self) -> Vec<String> {
        vec![
            "up".into(),
            "--manager".into(),
            MANAGER_ADDR.into(),
            "--manager-ca".into(),
            self.manager_ca().display().to_string(),
            "--token-file".into(),
            self.token_file().display().to_string(),
        ]
    }

    /// `tpvpn up` in direct mode plus `extra`; the error includes the output.
    pub fn up(&self, extra: &[&str]) -> Result<()> {
        let base = self.up_args();
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let out = self.tpvpn(&args);
        if !out.status.success() {
            bail!("tpvpn {} failed ({}):\n{}", args.join(" "), out.status, show(&out));
        }
        Ok(())
    }

    /// Runs this crate's `tpvpn-lab <args>` in `ns` ([`LAB_TOOL_TIMEOUT`]).
    pub fn lab_tool(&self, ns: &str, args: &[&str]) -> Output {
        let bin = match find_bin(&self.bin_dir, "tpvpn-lab") {
            Ok(b) => b.display().to_string(),
            Err(e) => return failed_output(&format!("{e:#}")),
        };
        let mut cmd = vec![bin.as_str()];
        cmd.extend_from_slice(args);
        self.exec_timeout(ns, &cmd, LAB_TOOL_TIMEOUT)
    }

    /// Everything the manager logged (all runs of it in this lab).
    pub fn manager_log(&self) -> String {
        fs::read_to_string(self.dir.join("manager.log")).unwrap_or_default()
    }

    /// Stops the manager (SIGTERM, then SIGKILL after 3 s). No-op if not running.
    pub fn stop_manager(&mut self) {
        if let Some(child) = self.manager.take() {
            terminate(child);
        }
    }

    /// Starts the manager with the lab's token file (stopping a running one first).
    pub fn start_manager(&mut self) -> Result<()> {
        let token = self.token_file();
        self.start_manager_with_token(&token)
    }

    /// Restarts the manager without the shared client token (`--auth kubernetes` and no
    /// `--token-file`): laptops connect only with certificates of their users.
    pub fn restart_manager_identity_only(&mut self) -> Result<()> {
        self.client_token = false;
        self.start_manager()
    }

    /// Restarts the manager listening on `listen` (say `0.0.0.0:4443`, to be reachable
    /// over the WAN emulator's link too) with the lab's token file.
    pub fn restart_manager_listening(&mut self, listen: &str) -> Result<()> {
        self.manager_listen = listen.to_string();
        self.start_manager()
    }

    /// Restarts the manager under `wrapper` (a command prefix, say `prlimit
    /// --nofile=1024:1024`) with `extra` arguments.
    pub fn restart_manager_with(&mut self, wrapper: &[&str], extra: &[&str]) -> Result<()> {
        self.manager_wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self.manager_extra = extra.iter().map(|s| s.to_string()).collect();
        self.start_manager()
    }

    /// Runs the manager of another build from now on (a release from before agents'
    /// ServiceAccount tokens, for version skew: agents present the shared token; `None`:
    /// this build's), restarting it.
    pub fn use_manager_bin(&mut self, bin: Option<&Path>) -> Result<()> {
        self.manager_bin = bin.map(Path::to_path_buf);
        self.shared_agent_token = bin.is_some();
        self.start_manager()
    }

    /// Runs the manager of a release that authenticates agents by their ServiceAccount
    /// tokens, as this build does, restarting it.
    pub fn use_manager_release(&mut self, bin: &Path) -> Result<()> {
        self.manager_bin = Some(bin.to_path_buf());
        self.shared_agent_token = false;
        self.start_manager()
    }

    /// Runs the agent of another build from now on (`None`: this build's), restarting it.
    pub fn use_agent_bin(&mut self, bin: Option<&Path>) -> Result<()> {
        self.agent_bin = bin.map(Path::to_path_buf);
        self.start_agent()
    }

    /// The manager's Prometheus metrics (from the cluster namespace).
    pub fn manager_metrics(&self) -> String {
        let out = self.exec_timeout(
            &self.cluster,
            &["curl", "-sS", "--max-time", "5", "http://10.250.1.1:9090/metrics"],
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running command in namespace `ns` (a test's client that holds a
    /// connection), stopped with the lab.
    pub fn spawn_background(&mut self, ns: &str, name: &str, cmd: &[&str]) -> Result<()> {
        self.spawn_in(ns, name, cmd)
    }

    /// What a process started with [`Lab::spawn_background`] printed.
    pub fn background_log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Replaces the manager with the hostile test double ([`hostile`]) on the same
    /// address, certificate and token, saying `args` (`--cluster-domain`, `--cidr`,
    /// `--host-routes`, `--namespace`).
    pub fn start_hostile_manager(&mut self, args: &[&str]) -> Result<()> {
        self.stop_manager();
        let bin = find_bin(&self.bin_dir, "tpvpn-lab")?;
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join("manager.log"))?;
        let d = self.dir.display().to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.cluster])
            .arg(&bin)
            .args(["hostile-manager", "--listen", &self.manager_listen])
            .args(["--tls-cert", &format!("{d}/manager.crt"), "--tls-key", &format!("{d}/manager.key")])
            .arg("--token-file")
            .arg(self.token_file())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the hostile manager")?;
        self.manager = Some(child);
        if !wait_until(Duration::from_secs(10), || self.manager_log().contains("hostile test double")) {
            bail!("the hostile manager did not start; log:\n{}", self.manager_log());
        }
        Ok(())
    }

    /// Starts the manager with `token_file`, waits (≤ 20 s) until it logs ready: longer
    /// than the manager's own 10 s wait for the API, so a slow API shows as its warning.
    pub fn start_manager_with_token(&mut self, token_file: &Path) -> Result<()> {
        self.stop_manager();
        let bin = match &self.manager_bin {
            Some(b) => b.clone(),
            None => find_bin(&self.bin_dir, "tpvpn-manager")?,
        };
        let log_path = self.dir.join("manager.log");
        const READY: &str = "tpvpn-manager ready";
        let ready_before = self.manager_log().matches(READY).count();
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let d = self.dir.display().to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.cluster])
            .args(&self.manager_wrapper)
            .arg(&bin)
            .args(&self.manager_extra)
            .args([
                "--listen",
                &self.manager_listen,
                "--tls-cert",
                &format!("{d}/manager.crt"),
                "--tls-key",
                &format!("{d}/manager.key"),
            ])
            .args(if self.client_token {
                vec!["--token-file".into(), token_file.display().to_string()]
            } else {
                vec![]
            })
            // This build's manager authenticates agents by their ServiceAccount tokens
            // (`--auth kubernetes`, its default with an API); older builds know only the
            // shared token.
            .args(if self.shared_agent_token {
                vec!["--agent-token-file".into(), self.shared_agent_token_file()]
            } else {
                vec![]
            })
            // The manager learns CIDRs and DNS from the API stand-in, as in a cluster.
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(if self.manager_extra.iter().any(|a| a == "--cluster-domain") {
                &[][..]
            } else {
                &["--cluster-domain", "cluster.local"][..]
            })
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1") // plain text in manager.log
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting tpvpn-manager")?;
        self.manager = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.manager_log().matches(READY).count() > ready_before {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.manager.as_mut().map(Child::try_wait) {
                self.manager = None;
                bail!("tpvpn-manager exited ({st}) before it was ready; log:\n{}", self.manager_log());
            }
            if Instant::now() >= deadline {
                self.stop_manager();
                bail!("tpvpn-manager not ready after 20 s; log:\n{}", self.manager_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Best effort, in order: the client, our children, anything else still
        // running inside our namespaces, the namespaces, the directory.
        if self.used_tpvpn.load(Ordering::Relaxed) && self.namespaces.contains(&self.laptop) {
            let _ = self.tpvpn_timeout(&["down"], Duration::from_secs(20));
            if self.laptop2.is_some() {
                let _ = self.tpvpn2(&["down"]);
            }
        }
        // The agent first: it removes its capture tables from the pods on SIGTERM.
        self.stop_agent();
        self.stop_manager();
        // Then the pods, through the CRI, and containerd; then their volumes' tmpfs.
        self.containerd.take();
        runtime::unmount_under(&self.dir);
        while let Some((_, child)) = self.children.pop() {
            terminate(child);
        }
        for ns in &self.namespaces {
            kill_ns_processes(ns);
        }
        for ns in self.namespaces.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("tpvpn-lab: cannot delete namespace {ns}: {e:#}");
            }
        }
        if let Some(etc) = self.netns_etc.take() {
            let _ = fs::remove_dir_all(etc);
        }
        if std::env::var_os("TPVPN_LAB_KEEP").is_some_and(|v| v == "1") {
            eprintln!("tpvpn-lab: keeping {} (TPVPN_LAB_KEEP=1)", self.dir.display());
        } else if self.dir_created {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes labs left behind by processes that died without running `Drop`
/// (e.g. a test killed by a timeout): namespaces named `tpvpn-<pid>-<n>-*`
/// whose creating `<pid>` no longer exists, the processes inside them, and
/// their `/tmp/tpvpn-lab-<pid>-<n>` directories. Returns what was removed.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return Ok(removed);
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("tpvpn-") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let [pid, n, role] = parts[..] else { continue };
        let lab_role = ["laptop", "laptop2", "cluster", "inet", "caller", "vpn"].contains(&role)
            || role.strip_prefix("pod").is_some_and(|i| i.parse::<u32>().is_ok());
        if !lab_role || n.parse::<u64>().is_err() {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue; // its creator is still running
        }
        kill_ns_processes(&name);
        ip(&["netns", "del", &name])?;
        removed.push(format!("namespace {name}"));
        let dir = PathBuf::from(format!("/tmp/tpvpn-lab-{pid}-{n}"));
        if dir.is_dir() {
            runtime::remove_leftovers(&dir.join("containerd"), &format!("tpvpn-lab-{pid}-{n}"));
            runtime::unmount_under(&dir);
            fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
            removed.push(format!("directory {}", dir.display()));
        }
    }
    Ok(removed)
}

/// Runs `ip <args>` (always with `-n <lab ns>` or `netns add/del`), error with stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// True if an `ss -H` listing has a socket bound to `addr`.
fn listens(ss: &str, addr: &str) -> bool {
    ss.lines().any(|l| l.split_whitespace().any(|f| f == addr))
}

/// 32 hex chars from /dev/urandom.
fn random_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// An `Output` for a command that could not be run at all.
fn failed_output(msg: &str) -> Output {
    use std::os::unix::process::ExitStatusExt;
    Output { status: ExitStatus::from_raw(127 << 8), stdout: Vec::new(), stderr: format!("{msg}\n").into_bytes() }
}

/// Formats a command's status, stdout and stderr for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A process holding a mount namespace ([`Lab::hold_daemon_mounts`]); ended (by pid)
/// when dropped, and the namespace with it.
pub struct MountHold {
    child: Option<Child>,
}

impl MountHold {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether something is mounted at `dir` in the namespace held.
    pub fn mounted(&self, dir: &str) -> bool {
        self.mounted_count(dir) > 0
    }

    /// How many mounts are at `dir` (stacked) in the namespace held.
    pub fn mounted_count(&self, dir: &str) -> usize {
        mounted_in(&self.pid().to_string(), dir)
    }
}

/// How many mounts are at `dir` in the mount table of process `pid`.
fn mounted_in(pid: &str, dir: &str) -> usize {
    let table = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    table.lines().filter(|l| l.split(' ').nth(4) == Some(dir)).count()
}

impl Drop for MountHold {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM, wait up to 3 s, then SIGKILL; always reaps the child.
fn terminate(mut child: Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    sys::signal(child.id(), sys::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills (by pid) every process still inside a lab namespace, e.g. a `tpvpn`
/// daemon that `tpvpn down` did not stop. These are all processes the lab started.
fn kill_ns_processes(ns: &str) {
    let pids = || -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", ns])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    };
    let first = pids();
    if first.is_empty() {
        return;
    }
    for &p in &first {
        sys::signal(p, sys::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !pids().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pids() {
        sys::signal(p, sys::SIGKILL);
    }
}

/// Raises the soft open-files limit to the hard limit (1000 concurrent
/// connections need more than the common default of 1024).
pub fn raise_nofile_limit() {
    sys::raise_nofile_limit();
}

/// Process signals and limits through nix's safe wrappers.
mod sys {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    pub use nix::sys::signal::Signal::{SIGKILL, SIGTERM};

    /// Sends `sig` to process `pid` (errors such as "no such process" are ignored).
    pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
        let Ok(pid) = i32::try_from(pid) else { return };
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    pub fn raise_nofile_limit() {
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < hard {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
        }
    }
}
