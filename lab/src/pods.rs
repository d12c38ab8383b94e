//! Real pods for intercepts, and what a node has around them.
//!
//! Each pod is its own network namespace with its pod IP, joined to the cluster
//! namespace (the node, `lab-node`) by a veth, running nginx with a known environment,
//! and registered in the API stand-in as a Pod (labels, `spec.nodeName`,
//! `status.podIP`, Ready, a `containerID`) selected by a Service. Stand-ins, for what a
//! node would have and this machine does not run:
//! - **the kubelet's part**: the lab resolves the container's `env` as the kubelet does
//!   (`valueFrom.fieldRef`, `$(VAR)`) and starts nginx with exactly that environment;
//! - **the container runtime's files**: the OCI bundle containerd keeps per container,
//!   `RUNTIME/io.containerd.runtime.v2.task/k8s.io/ID/{config.json,init.pid}`, with the
//!   resolved `process.env` and the pid, as containerd writes them;
//! - **kube-proxy**: nft DNAT of the Services' ClusterIPs to their pods, in the node;
//! - **a mesh sidecar** (pod `mesh-0`): istio-init's nat REDIRECT of inbound TCP to
//!   15006, where `tpvpn-lab sidecar` relays each connection to the app over loopback.
//!
//! The agent runs in the node namespace, as the DaemonSet's pod would (host network,
//! the node's `/proc`), pointed at the runtime stand-in with `--runtime-root`.
//! A caller pod (namespace only, [`CALLER_IP`]) makes requests as another pod would.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{find_bin, ip, Lab, MANAGER_ADDR};

/// The node every lab pod runs on, and its address (`status.hostIP`).
pub const NODE_NAME: &str = "lab-node";
pub const NODE_IP: &str = "10.250.1.1";
/// The caller pod's IP.
pub const CALLER_IP: &str = "10.244.2.20";
/// Service `default/web` (two pods) and `default/mesh` (one meshed pod).
pub const WEB_IP: &str = "10.96.0.90";
pub const MESH_IP: &str = "10.96.0.91";
/// nginx in every pod: the named port `http`, and a second port only by number.
pub const HTTP_PORT: u16 = 8080;
pub const ALT_PORT: u16 = 8081;
/// nginx in every pod also speaks HTTP/2 over cleartext (prior knowledge) here.
pub const H2_PORT: u16 = 8082;
/// Where pods (and laptops) serve gRPC and WebSocket when a test starts them
/// ([`Lab::start_rpc_in`]): Service `web` ports `rpc` (90) and `ws` (91).
pub const GRPC_PORT: u16 = 9090;
pub const WS_PORT: u16 = 9091;
/// The gRPC and WebSocket servers and clients (python3-grpcio, python3-websockets).
pub const RPC_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/lab_rpc.py");
/// Debian's python, which has Debian's python packages.
pub const PYTHON: &str = "/usr/bin/python3";
/// Bytes of `/big` on every lab web server (its name repeated).
pub const BIG_LEN: usize = 1 << 20;
/// The value of `GREETING` in the pods' environment.
pub const GREETING: &str = "hello from the web pods";

/// One lab pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub ip: String,
    pub app: String,
    pub meshed: bool,
}

/// The pods [`Lab::start_pods`] creates.
pub fn initial_pods() -> Vec<PodSpec> {
    let pod =
        |name: &str, ip: &str, app: &str, meshed| PodSpec { name: name.into(), ip: ip.into(), app: app.into(), meshed };
    vec![
        pod("web-0", "10.244.2.10", "web", false),
        pod("web-1", "10.244.2.11", "web", false),
        pod("mesh-0", "10.244.2.30", "mesh", true),
    ]
}

/// The size of `LARGE_CONFIG`, which the mesh pods carry in their environment: over
/// what one frame field holds (64 KiB), as a large configuration passed in a variable is.
pub const LARGE_ENV_LEN: usize = 70_000;

/// The container env as the Pod spec of an `app` pod has it (unresolved).
fn env_spec(app: &str) -> Value {
    let mut env = json!([
        {"name": "GREETING", "value": GREETING},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SELF_URL", "value": "http://$(POD_NAME):8080/"},
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "web-db", "key": "password"}}},
        // Built from the Secret by the kubelet's expansion: a Secret value too.
        {"name": "DB_URL", "value": "postgres://app:$(DB_PASSWORD)@db/app"},
    ]);
    if app == "mesh" {
        if let Some(vars) = env.as_array_mut() {
            vars.push(json!({"name": "LARGE_CONFIG", "value": "x".repeat(LARGE_ENV_LEN)}));
        }
    }
    env
}

/// What the kubelet stand-in reads for `DB_PASSWORD` from Secret `web-db` (which the
/// manager cannot read, and clients must not get).
pub const SECRET_VALUE: &str = "s3cr3t-from-a-secret";

/// The environment the kubelet stand-in resolves for `pod` (what the runtime starts
/// the container with): the image's, then the container's in order, `valueFrom` read
/// and `$(VAR)` expanded from the variables before it.
pub fn resolved_env(pod: &str, app: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("HOSTNAME".into(), pod.into()),
    ];
    for e in env_spec(app).as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let value = if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            pod.to_string()
        } else if e["valueFrom"]["secretKeyRef"].is_object() {
            SECRET_VALUE.to_string()
        } else {
            let mut v = e["value"].as_str().unwrap_or_default().to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        };
        env.push((name, value));
    }
    env
}

/// A running lab pod.
pub(crate) struct RunningPod {
    pub spec: PodSpec,
    pub ns: String,
    /// The command line of its server (what a container restart runs again).
    pub server: Vec<String>,
}

impl Lab {
    /// Adds the pods, the Services `web` and `mesh`, the caller pod, kube-proxy's DNAT,
    /// and the agent.
    pub fn start_pods(&mut self) -> Result<()> {
        let c = self.cluster.clone();
        ip(&["netns", "exec", &c, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for spec in initial_pods() {
            self.add_pod(&spec)?;
        }
        self.add_caller()?;
        let svc = |name: &str, ip: &str, ports: Value| {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
                   "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name}, "ports": ports}})
        };
        self.kube_apply(
            "POST",
            "/api/v1/namespaces/default/services",
            Some(&svc(
                "web",
                WEB_IP,
                json!([
                        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                        {"name": "alt", "port": 81, "protocol": "TCP", "targetPort": ALT_PORT},
                        {"name": "h2", "port": 82, "protocol": "TCP", "targetPort": H2_PORT, "appProtocol": "kubernetes.io/h2c"},
                        {"name": "rpc", "port": 90, "protocol": "TCP", "targetPort": GRPC_PORT, "appProtocol": "kubernetes.io/h2c"},
                        {"name": "ws", "port": 91, "protocol": "TCP", "targetPort": WS_PORT, "appProtocol": "kubernetes.io/ws"},
                // For the benchmark's servers (iperf3, ping-pong), started when it runs.
                {"name": "iperf", "port": 5201, "protocol": "TCP", "targetPort": 5201},
                {"name": "pingpong", "port": 9100, "protocol": "TCP", "targetPort": 9100},
                    ]),
            )),
        )?;
        self.kube_apply(
            "POST",
            "/api/v1/namespaces/default/services",
            Some(&svc(
                "mesh",
                MESH_IP,
                json!([
                    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                ]),
            )),
        )?;
        self.kube_proxy()?;
        self.start_agent()
    }

    /// The caller pod's namespace.
    pub fn caller(&self) -> &str {
        &self.caller_ns
    }

    /// From the caller pod, `n` connections to Service `web` (port 80), each sending
    /// `payload` (a Python bytes expression) and then nothing, never reading (with a 4 KiB
    /// receive buffer when `small_rcvbuf`), held `hold` and then closed; returns once all
    /// are connected (≤ 20 s). [`Lab::background_log`]`(name)` says `holding N`, then
    /// `closed`.
    pub fn hold_callers(
        &mut self,
        name: &str,
        n: usize,
        payload: &str,
        small_rcvbuf: bool,
        hold: Duration,
    ) -> Result<()> {
        let rcvbuf = if small_rcvbuf { "  s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\n" } else { "" };
        let script = format!(
            "import socket, time\nheld = []\nfor _ in range({n}):\n  s = socket.socket()\n{rcvbuf}  s.settimeout(5)\n  s.connect(('{WEB_IP}', 80))\n  s.sendall({payload})\n  held.append(s)\nprint('holding', len(held), flush=True)\ntime.sleep({})\nfor s in held: s.close()\nprint('closed', flush=True)\n",
            hold.as_secs()
        );
        let caller = self.caller_ns.clone();
        self.spawn_background(&caller, name, &[PYTHON, "-c", &script])?;
        let ready = format!("holding {n}");
        if !crate::wait_until(Duration::from_secs(20), || self.background_log(name).contains(&ready)) {
            bail!("the {n} callers of {name} did not connect:\n{}", self.background_log(name));
        }
        Ok(())
    }

    /// Starts nginx in the laptop namespace on `127.0.0.1:PORT`, answering `body` (the
    /// developer's local server an intercept sends to).
    pub fn start_laptop_web(&mut self, port: u16, body: &str) -> Result<()> {
        let laptop = self.laptop.clone();
        self.start_web_in(&laptop, port, None, body)
    }

    /// Starts nginx in namespace `ns` on `127.0.0.1:PORT` (and HTTP/2 over cleartext on
    /// `h2_port`), answering `body` on `/`, `/whoami` with what it received, `/big`.
    pub fn start_web_in(&mut self, ns: &str, port: u16, h2_port: Option<u16>, body: &str) -> Result<()> {
        let dir = self.dir.join(format!("web-{ns}-{port}"));
        let mut listen = format!("listen 127.0.0.1:{port};");
        if let Some(h2) = h2_port {
            listen += &format!("\n    listen 127.0.0.1:{h2} http2;");
        }
        write_web_conf(&dir, body.trim_end(), &listen)?;
        let (c, d) = (dir.join("nginx.conf").display().to_string(), dir.display().to_string());
        let e = format!("{d}/nginx.err");
        self.spawn_in(ns, &format!("web-{ns}-{port}"), &["nginx", "-c", &c, "-p", &d, "-e", &e])?;
        self.wait_listening(ns, port)
    }

    /// Starts the gRPC server (on `host:grpc_port`) and the WebSocket echo server (on
    /// `host:ws_port`) of [`RPC_SCRIPT`] in namespace `ns`, answering as `name`.
    pub fn start_rpc_in(&mut self, ns: &str, name: &str, host: &str, grpc_port: u16, ws_port: u16) -> Result<()> {
        let (g, w, log) = (format!("{host}:{grpc_port}"), ws_port.to_string(), name.replace(' ', "-"));
        self.spawn_in(ns, &format!("grpc-{log}"), &[PYTHON, RPC_SCRIPT, "grpc-server", name, &g])?;
        self.spawn_in(ns, &format!("ws-{log}"), &[PYTHON, RPC_SCRIPT, "ws-server", name, host, &w])?;
        self.wait_listening(ns, grpc_port)?;
        self.wait_listening(ns, ws_port)
    }

    /// `tpvpn-lab relay` in the namespace of pod `pod`, from `listen` to `to` (a pod port).
    pub fn start_pod_relay(&mut self, pod: &str, listen: SocketAddr, to: SocketAddr) -> Result<()> {
        let ns = self.pod_ns(pod).context("no such pod")?.to_string();
        let bin = find_bin(&self.bin_dir, "tpvpn-lab")?.display().to_string();
        let (l, t) = (listen.to_string(), to.to_string());
        self.spawn_in(&ns, &format!("relay-{pod}"), &[&bin, "relay", "--listen", &l, "--to", &t])?;
        self.wait_listening(&ns, listen.port())
    }

    /// [`Lab::start_rpc_in`] in pod `pod` (a second container of it, on the pod IP).
    pub fn start_pod_rpc(&mut self, pod: &str) -> Result<()> {
        let ns = self.pod_ns(pod).context("no such pod")?.to_string();
        self.start_rpc_in(&ns, &format!("pod {pod}"), "0.0.0.0", GRPC_PORT, WS_PORT)
    }

    /// Starts the lab's sink and source servers in the laptop namespace on loopback.
    pub fn start_laptop_servers(&mut self, sink: u16, source: u16) -> Result<()> {
        let lab_bin = find_bin(&self.bin_dir, "tpvpn-lab")?.display().to_string();
        let (si, so) = (format!("127.0.0.1:{sink}"), format!("127.0.0.1:{source}"));
        let laptop = self.laptop.clone();
        self.spawn_in(&laptop, "laptop-servers", &[&lab_bin, "serve", "--sink", &si, "--source", &so])?;
        self.wait_listening(&laptop, sink)?;
        self.wait_listening(&laptop, source)
    }

    /// The namespace of pod `name`.
    pub fn pod_ns(&self, name: &str) -> Option<&str> {
        self.pods.iter().find(|p| p.spec.name == name).map(|p| p.ns.as_str())
    }

    fn pod_veth(&mut self, ns_role: &str, ip_addr: &str) -> Result<String> {
        let ns = format!("tpvpn-{}-{ns_role}", self.id);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let c = self.cluster.clone();
        let host_side = format!("v{ns_role}");
        ip(&["-n", &c, "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["-n", &c, "link", "set", &host_side, "up"])?;
        ip(&["-n", &c, "route", "add", &format!("{ip_addr}/32"), "dev", &host_side, "src", NODE_IP])?;
        ip(&["-n", &ns, "addr", "add", &format!("{ip_addr}/32"), "dev", "eth0"])?;
        for dev in ["lo", "eth0"] {
            ip(&["-n", &ns, "link", "set", dev, "up"])?;
        }
        // Point-to-point to the node, as many CNIs do.
        ip(&["-n", &ns, "route", "add", &format!("{NODE_IP}/32"), "dev", "eth0"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", NODE_IP, "dev", "eth0", "onlink"])?;
        Ok(ns)
    }

    fn add_caller(&mut self) -> Result<()> {
        self.caller_ns = self.pod_veth("caller", CALLER_IP)?;
        Ok(())
    }

    /// Adds one pod: namespace, nginx with the kubelet-resolved environment, the
    /// runtime's bundle, the Pod object (Ready).
    pub fn add_pod(&mut self, spec: &PodSpec) -> Result<()> {
        let role = format!("pod{}", self.pods.len());
        let ns = self.pod_veth(&role, &spec.ip)?;
        let dir = self.dir.join("pods").join(&spec.name);
        fs::create_dir_all(dir.join("www"))?;
        fs::create_dir_all(dir.join("tmp"))?;
        let listen = format!("listen {HTTP_PORT};\n    listen {ALT_PORT};\n    listen {H2_PORT} http2;");
        write_web_conf(&dir, &format!("pod {}", spec.name), &listen)?;
        let d = dir.display();
        let env = resolved_env(&spec.name, &spec.app);
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut cmd: Vec<String> = vec!["env".into(), "-i".into()];
        cmd.extend(vars.iter().cloned());
        cmd.extend(["nginx", "-c"].map(String::from));
        cmd.push(dir.join("nginx.conf").display().to_string());
        cmd.extend(["-p".to_string(), d.to_string(), "-e".into(), format!("{d}/nginx.err")]);
        let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
        self.spawn_in(&ns, &format!("nginx-{}", spec.name), &argv)?;
        let pid = self.children.last().map(|(_, c)| c.id()).context("nginx child")?;
        self.wait_listening(&ns, HTTP_PORT)?;
        if spec.meshed {
            self.mesh_sidecar(&ns, &spec.name)?;
        }
        // The container runtime's bundle (stand-in), as containerd keeps it.
        let container_id = crate::random_token()? + &crate::random_token()?;
        let bundle = self.runtime_root().join("io.containerd.runtime.v2.task/k8s.io").join(&container_id);
        fs::create_dir_all(&bundle)?;
        fs::write(bundle.join("init.pid"), pid.to_string())?;
        let config = json!({"ociVersion": "1.1.0", "process": {"args": ["nginx"], "env": vars, "cwd": "/"},
            "hostname": spec.name,
            "linux": {"namespaces": [{"type": "network", "path": format!("/proc/{pid}/ns/net")}]},
            "annotations": {"io.kubernetes.cri.container-name": "nginx", "io.kubernetes.cri.sandbox-name": spec.name}});
        fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": spec.name, "namespace": "default", "labels": {"app": spec.app}},
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "nginx", "image": "nginx:1.22",
                "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                          {"containerPort": ALT_PORT, "protocol": "TCP"},
                          {"containerPort": H2_PORT, "protocol": "TCP"}],
                "env": env_spec(&spec.app)}]},
            "status": {"phase": "Running", "hostIP": NODE_IP, "podIP": spec.ip, "podIPs": [{"ip": spec.ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "nginx", "ready": true, "restartCount": 0, "image": "nginx:1.22",
                    "imageID": "", "containerID": format!("containerd://{container_id}")}]}});
        self.kube_apply("POST", "/api/v1/namespaces/default/pods", Some(&pod))?;
        self.pods.push(RunningPod { spec: spec.clone(), ns, server: cmd });
        // kube-proxy follows the Service's endpoints: a new pod is a backend too.
        if !self.caller_ns.is_empty() {
            self.kube_proxy()?;
        }
        Ok(())
    }

    /// The container runtime stand-in's root (the agent's `--runtime-root`).
    pub fn runtime_root(&self) -> PathBuf {
        self.dir.join("runtime")
    }

    /// The environment the runtime stand-in recorded for pod `name`'s container.
    pub fn pod_env(&self, name: &str) -> Vec<(String, String)> {
        let app = self.pods.iter().find(|p| p.spec.name == name).map_or("", |p| p.spec.app.as_str());
        resolved_env(name, app)
    }

    fn wait_listening(&self, ns: &str, port: u16) -> Result<()> {
        for _ in 0..100 {
            if self.listens(ns, port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nothing listens on port {port} in {ns} after 5 s")
    }

    /// Whether anything listens on TCP port `port` in namespace `ns`.
    fn listens(&self, ns: &str, port: u16) -> bool {
        let want = format!(":{port}");
        let out = self.exec_timeout(ns, &["ss", "-Hltn"], Duration::from_secs(5));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().nth(3).is_some_and(|a| a.ends_with(&want)))
    }

    /// Restarts pod `pod`'s server as a container restart would: stopped (SIGTERM, its
    /// listening socket closed once it exits), then started again at once, in the same
    /// namespace. An error carries the server's own words when it cannot start (nginx
    /// says `bind() ... failed (98: Address already in use)` after about 2.5 s of tries).
    pub fn restart_pod_server(&mut self, pod: &str) -> Result<()> {
        let p = self.pods.iter().find(|p| p.spec.name == pod).context("no such pod")?;
        let (ns, server) = (p.ns.clone(), p.server.clone());
        let name = format!("nginx-{pod}");
        let at = self.children.iter().position(|(n, _)| *n == name).context("the pod's server is not running")?;
        let (_, mut old) = self.children.remove(at);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(old.id())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        old.wait()?;
        let err_log = self.dir.join("pods").join(pod).join("nginx.err");
        let _ = fs::remove_file(&err_log);
        let argv: Vec<&str> = server.iter().map(String::as_str).collect();
        self.spawn_in(&ns, &name, &argv)?;
        for _ in 0..100 {
            if self.listens(&ns, HTTP_PORT) {
                return Ok(());
            }
            let exited = self.children.iter_mut().find(|(n, _)| *n == name).map(|(_, c)| c.try_wait());
            if let Some(Ok(Some(status))) = exited {
                bail!("{pod}'s server exited ({status}): {}", fs::read_to_string(&err_log).unwrap_or_default().trim());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("{pod}'s server does not listen again after 10 s")
    }

    /// istio-init's part (nat REDIRECT of inbound TCP to 15006) and the proxy's.
    fn mesh_sidecar(&mut self, ns: &str, pod: &str) -> Result<()> {
        nft(ns, &format!(
            "table ip istio-stand-in {{\n  chain ISTIO_INBOUND {{ type nat hook prerouting priority dstnat; policy accept;\n    tcp dport {HTTP_PORT} redirect to :15006\n  }}\n}}\n"
        ))?;
        let lab_bin = find_bin(&self.bin_dir, "tpvpn-lab")?.display().to_string();
        self.spawn_in(ns, &format!("sidecar-{pod}"), &[&lab_bin, "sidecar", "--listen", "0.0.0.0:15006"])?;
        self.wait_listening(ns, 15006)
    }

    /// What the mesh sidecar stand-in of pod `name` relayed (one line per connection).
    pub fn sidecar_log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("sidecar-{name}.log"))).unwrap_or_default()
    }

    /// kube-proxy's part: each Service's ClusterIP:port DNATed to its pods, for traffic
    /// from pods (prerouting) and from the node itself (output).
    fn kube_proxy(&self) -> Result<()> {
        let mut rules = String::new();
        for (svc_ip, app) in [(WEB_IP, "web"), (MESH_IP, "mesh")] {
            let backends: Vec<&RunningPod> = self.pods.iter().filter(|p| p.spec.app == app).collect();
            let map: Vec<String> =
                backends.iter().enumerate().map(|(i, p)| format!("{i} : {} . {HTTP_PORT}", p.spec.ip)).collect();
            rules.push_str(&format!(
                "    ip daddr {svc_ip} tcp dport 80 dnat ip addr . port to numgen inc mod {} map {{ {} }}\n",
                backends.len(),
                map.join(", ")
            ));
        }
        let c = self.cluster.clone();
        // Replaced whole, as kube-proxy rewrites its rules.
        nft(&c, &format!(
            "table ip kube-proxy-stand-in {{}}\ndelete table ip kube-proxy-stand-in\ntable ip kube-proxy-stand-in {{\n  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n  \
             chain output {{ type nat hook output priority -100; policy accept;\n{rules}  }}\n}}\n"
        ))
    }

    /// Starts the node agent in the cluster namespace, as the DaemonSet would run it, and
    /// waits (≤ 10 s) until it is connected to the manager.
    pub fn start_agent(&mut self) -> Result<()> {
        self.start_agent_with(&[], &[])
    }

    /// [`Lab::start_agent`] run under `prefix` (e.g. `prlimit --nofile=256:65536`) and
    /// with `args` added.
    pub fn start_agent_with(&mut self, prefix: &[&str], args: &[&str]) -> Result<()> {
        self.stop_agent();
        let bin = match &self.agent_bin {
            Some(b) => b.clone(),
            None => find_bin(&self.bin_dir, "tpvpn-agent")?,
        };
        let log_path = self.dir.join("agent.log");
        const CONNECTED: &str = "connected to the manager";
        let before = self.agent_log().matches(CONNECTED).count();
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let child = Command::new("ip")
            .args(["netns", "exec", &self.cluster])
            .args(prefix)
            .arg(&bin)
            .args(args)
            .args(["--manager", MANAGER_ADDR, "--node", NODE_NAME])
            .arg("--manager-ca")
            .arg(self.manager_ca())
            .arg("--token-file")
            .arg(self.agent_token_file())
            .arg("--runtime-root")
            .arg(self.runtime_root())
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting tpvpn-agent")?;
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.agent_log().matches(CONNECTED).count() > before {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.agent.as_mut().map(Child::try_wait) {
                self.agent = None;
                bail!("tpvpn-agent exited ({st}); log:\n{}", self.agent_log());
            }
            if Instant::now() >= deadline {
                bail!("tpvpn-agent not connected after 10 s; log:\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The kubelet's part for DaemonSet `tpvpn-agent` in namespace `namespace` (stand-in):
    /// when the API no longer has it, its pod on this node is stopped, SIGTERM first, as
    /// the kubelet does when the DaemonSet controller deletes it. Returns whether the
    /// agent runs afterwards.
    pub fn kubelet_sync_agent(&mut self, namespace: &str) -> Result<bool> {
        let path = format!("/apis/apps/v1/namespaces/{namespace}/daemonsets/tpvpn-agent");
        let (code, _) = self.kube_request(Some(&self.api_token), "GET", &path, None)?;
        if code == 404 {
            self.stop_agent();
        }
        Ok(self.agent.is_some())
    }

    /// Stops the agent (SIGTERM: it removes its rules, then exits; SIGKILL after 3 s).
    pub fn stop_agent(&mut self) {
        if let Some(child) = self.agent.take() {
            crate::terminate(child);
        }
    }

    /// Sends the agent `signal` (SIGSTOP, SIGCONT); its pid, if it runs.
    pub fn signal_agent(&self, signal: nix::sys::signal::Signal) -> Option<u32> {
        let pid = self.agent.as_ref()?.id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?), signal).ok()?;
        Some(pid)
    }

    /// Kills the agent with SIGKILL: it removes nothing.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The token the agent presents (and the manager's `--agent-token-file`).
    pub fn agent_token_file(&self) -> PathBuf {
        self.dir.join("agent-token")
    }

    /// The names of tpvpn's nftables tables in pod `name`'s namespace.
    pub fn capture_tables(&self, name: &str) -> Vec<String> {
        let Some(ns) = self.pod_ns(name) else { return vec![] };
        let out = self.exec_timeout(ns, &["nft", "-j", "list", "tables"], Duration::from_secs(10));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["table"]["name"].as_str())
            .filter(|n| n.starts_with("tpvpn-"))
            .map(str::to_string)
            .collect()
    }
}

/// Loads `rules` (nft syntax) in namespace `ns`: the lab's stand-ins of components that
/// write iptables/nftables rules themselves (istio-init, kube-proxy).
fn nft(ns: &str, rules: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (the nftables package)")?;
    child.stdin.take().context("nft stdin")?.write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {ns} failed: {}\n{rules}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Writes `DIR/nginx.conf` and `DIR/www` for a lab web server named `name`: `/` answers
/// the name, `/whoami` the name and what the request carried (Host, path,
/// `X-Forwarded-For`, `x-dev`, body length), `/received` the name, the connection's
/// peer address and the headers no server behind a proxy should see (hop-by-hop ones,
/// `Expect`, a name with `_`: nginx is told to take those), `/big` [`BIG_LEN`] bytes of
/// the name repeated.
fn write_web_conf(dir: &std::path::Path, name: &str, listen: &str) -> Result<()> {
    fs::create_dir_all(dir.join("www"))?;
    fs::create_dir_all(dir.join("tmp"))?;
    fs::write(dir.join("www/index.html"), format!("{name}\n"))?;
    let line = format!("{name}\n");
    let big: Vec<u8> = line.as_bytes().iter().copied().cycle().take(BIG_LEN).collect();
    fs::write(dir.join("www/big"), big)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_max_body_size 64m;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
         fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  \
         server {{\n    {listen}\n    root {d}/www;\n    index index.html;\n    underscores_in_headers on;\n    \
         location = /received {{ default_type text/plain; return 200 \"{name} peer=$remote_addr:$remote_port \
         expect=$http_expect keep-alive=$http_keep_alive proxy-connection=$http_proxy_connection \
         nominated=$http_x_nominated underscore=$http_x_smuggle te=$http_te cl=$http_content_length\\n\"; }}\n    \
         location = /whoami {{ default_type text/plain; return 200 \"{name} host=$host uri=$request_uri xff=$http_x_forwarded_for dev=$http_x_dev len=$content_length\\n\"; }}\n  }}\n}}\n"
    );
    fs::write(dir.join("nginx.conf"), conf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_is_resolved_as_the_kubelet_does() {
        let env = resolved_env("web-0", "web");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("GREETING"), Some(GREETING));
        assert_eq!(get("POD_NAME"), Some("web-0"));
        assert_eq!(get("SELF_URL"), Some("http://web-0:8080/"));
    }
}
