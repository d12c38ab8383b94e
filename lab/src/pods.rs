//! Real pods for intercepts, and what a node has around them.
//!
//! Each pod is real: a containerd sandbox and an nginx container made through the CRI
//! ([`crate::runtime`]), on the node's pod network by the CNI `bridge` plugin (its IP
//! from `host-local`), with a known environment, and registered in the API stand-in as
//! a Pod (labels, `spec.nodeName`, `status.podIP`, Ready, the real `containerID`)
//! selected by a Service. The agent reads containerd's own files for it. Stand-ins, for
//! what a node would have and this machine does not run:
//! - **the kubelet's sequencing**: the lab makes the CRI calls, and resolves the
//!   container's `env` as the kubelet does (`valueFrom.fieldRef`, `$(VAR)`);
//! - **kube-proxy**: nft DNAT of the Services' ClusterIPs to their pods, in the node;
//! - **a mesh sidecar** (pod `mesh-0`): istio-init's nat REDIRECT of inbound TCP to
//!   15006 in the sandbox's namespace, where a second container, `istio-proxy` (uid
//!   1337, running `tpvpn-lab sidecar`), relays each connection to the app over
//!   loopback. Only the inbound half of a mesh: no outbound redirect, no mTLS.
//!
//! The agent runs in the node namespace, as the DaemonSet's pod would (host network,
//! the node's `/proc`), pointed at containerd's state with `--runtime-root`.
//! A caller pod of another node (namespace only, [`CALLER_IP`], routed by the node)
//! makes requests as another pod would.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::runtime::{ContainerSpec, Containerd, ImageSpec, PodNetwork, SandboxSpec, State};
use crate::volumes::{Source, Volume};
use crate::{find_bin, ip, Lab, MANAGER_ADDR};

/// The node every lab pod runs on, and its address (`status.hostIP`).
pub const NODE_NAME: &str = "lab-node";
/// Where the node agents run and hold their ServiceAccount (`tpvpn manager install`'s
/// `<namespace>-agents`).
pub const AGENT_NAMESPACE: &str = "tpvpn-agents";
pub const NODE_IP: &str = "10.250.1.1";
/// The caller pod's IP: a pod of another node, routed through this one.
pub const CALLER_IP: &str = "10.244.4.20";
/// This node's pod network (the CNI `bridge` plugin's `cni0`, addresses from `host-local`).
pub const POD_SUBNET: &str = "10.244.2.0/24";
/// The image of the web pods: nginx and the libraries it loads, from this machine.
pub const WEB_IMAGE: &str = "lab.local/web:1";
/// The mesh sidecar's image (`tpvpn-lab sidecar`), its uid and its own variable (which
/// must never be mistaken for the app container's).
pub const SIDECAR_IMAGE: &str = "lab.local/sidecar:1";
pub const SIDECAR_UID: i64 = 1337;
pub const SIDECAR_ENV: (&str, &str) = ("ISTIO_META_CLUSTER_ID", "lab-mesh");
/// The web image's `ENV` (merged by containerd before the container's own variables).
pub const IMAGE_ENV: &[(&str, &str)] =
    &[("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), ("NGINX_VERSION", "1.22.1")];
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

/// One lab pod (its IP is the CNI's to give: [`Lab::pod_ip`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub app: String,
    pub meshed: bool,
}

/// The pods [`Lab::start_pods`] creates.
pub fn initial_pods() -> Vec<PodSpec> {
    let pod = |name: &str, app: &str, meshed| PodSpec { name: name.into(), app: app.into(), meshed };
    vec![pod("web-0", "web", false), pod("web-1", "web", false), pod("mesh-0", "mesh", true)]
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

/// The contents of ConfigMap `web-config`'s key `app.conf`, mounted at `/etc/config` in
/// the web pods.
pub const APP_CONF: &str = "greeting = hello from the config map\n";

/// The web pods' volumes, as their Pod spec declares them: a configMap, a Secret, an
/// emptyDir and the ServiceAccount token (`token`, a random stand-in; `ca.crt`, the lab's
/// CA; `namespace`).
fn web_volumes(token: String, ca: String) -> Vec<Volume> {
    let vol = |name: &str, source, mount_path: &str, read_only| Volume {
        name: name.into(),
        source,
        mount_path: mount_path.into(),
        read_only,
    };
    vec![
        vol(
            "config",
            Source::ConfigMap { name: "web-config".into(), items: vec![("app.conf".into(), APP_CONF.into())] },
            "/etc/config",
            true,
        ),
        vol(
            "db",
            Source::Secret { name: "web-db".into(), items: vec![("password".into(), SECRET_VALUE.into())] },
            "/etc/db",
            true,
        ),
        vol("scratch", Source::EmptyDir, "/var/scratch", false),
        vol(
            "kube-api-access",
            Source::ServiceAccountToken { token, ca, namespace: "default".into() },
            "/var/run/secrets/kubernetes.io/serviceaccount",
            true,
        ),
    ]
}

/// What the kubelet stand-in reads for `DB_PASSWORD` from Secret `web-db` (which the
/// manager cannot read, and clients must not get).
pub const SECRET_VALUE: &str = "s3cr3t-from-a-secret";

/// The container's environment as the kubelet stand-in resolves it for `pod` (what it
/// hands the runtime): the container's variables in order, `valueFrom` read and `$(VAR)`
/// expanded from the variables before it; then, as the kubelet adds them
/// (`enableServiceLinks`), the variables of the lab's Services in the pod's namespace
/// ([`service_links`]).
pub fn resolved_env(pod: &str, app: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
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
    let links = service_links("default");
    env.extend(links.into_iter().filter(|(k, _)| !env.iter().any(|(n, _)| n == k)).collect::<Vec<_>>());
    env
}

/// The Docker-link style variables the kubelet gives a pod for each Service with a
/// ClusterIP in its namespace: `NAME_SERVICE_HOST`, `NAME_SERVICE_PORT` (and per named
/// port), `NAME_PORT=tcp://IP:PORT` and per port `NAME_PORT_80_TCP{,_PROTO,_PORT,_ADDR}`
/// (NAME upper-cased, `-` as `_`). A simplification: only the lab's own Services.
pub fn service_links(namespace: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for s in crate::SERVICES.iter().filter(|s| s.namespace == namespace) {
        let name = s.name.to_uppercase().replace('-', "_");
        let Some((_, first, _)) = s.ports.first() else { continue };
        let ip = s.cluster_ip;
        let url = |port: u16, proto: &str| {
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
            format!("{}://{host}:{port}", proto.to_lowercase())
        };
        env.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        env.push((format!("{name}_SERVICE_PORT"), first.to_string()));
        for (port_name, port, _) in s.ports.iter().filter(|(n, _, _)| !n.is_empty()) {
            env.push((format!("{name}_SERVICE_PORT_{}", port_name.to_uppercase().replace('-', "_")), port.to_string()));
        }
        env.push((format!("{name}_PORT"), url(*first, s.ports[0].2)));
        for (_, port, proto) in s.ports {
            let prefix = format!("{name}_PORT_{port}_{proto}");
            env.push((prefix.clone(), url(*port, proto)));
            env.push((format!("{prefix}_PROTO"), proto.to_lowercase()));
            env.push((format!("{prefix}_PORT"), port.to_string()));
            env.push((format!("{prefix}_ADDR"), ip.to_string()));
        }
    }
    env
}

/// The web image: nginx with the libraries `ldd` names, the users nginx looks up.
fn web_image() -> ImageSpec {
    ImageSpec {
        name: WEB_IMAGE.into(),
        env: IMAGE_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
        binaries: vec!["/usr/sbin/nginx".into()],
        files: vec![
            (
                "etc/passwd".into(),
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n".to_vec(),
            ),
            ("etc/group".into(), b"root:x:0:\nnogroup:x:65534:\n".to_vec()),
        ],
        dirs: vec!["var/lib/nginx".into(), "var/log/nginx".into()],
    }
}

/// A running lab pod.
pub(crate) struct RunningPod {
    pub spec: PodSpec,
    /// Its network namespace's name (`cni-…` under `/run/netns`, made by containerd).
    pub ns: String,
    pub ip: String,
    pub sandbox: SandboxSpec,
    pub sandbox_id: String,
    /// The app container as last started (a restart starts it again, one attempt later).
    pub container: ContainerSpec,
    pub container_id: String,
    /// The mesh sidecar container's id, in meshed pods.
    pub sidecar_id: Option<String>,
    /// The app container's volumes.
    pub volumes: Vec<Volume>,
}

impl Lab {
    /// Adds the pods, the Services `web` and `mesh`, the caller pod, kube-proxy's DNAT,
    /// and the agent.
    pub fn start_pods(&mut self) -> Result<()> {
        let c = self.cluster.clone();
        ip(&["netns", "exec", &c, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        self.start_containerd()?;
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

    /// For tests: [`Lab::start_pods`], or `false` (the test is skipped, loudly) where
    /// containers cannot run ([`crate::runtime::available_or_skip`]: never under CI). Pods
    /// that cannot start fail the test.
    pub fn start_pods_or_skip(&mut self) -> bool {
        if !crate::runtime::available_or_skip() {
            return false;
        }
        if let Err(e) = self.start_pods() {
            panic!("pods: {e:#}\nagent log:\n{}", self.agent_log());
        }
        true
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

    /// The node's containerd, with the web image imported.
    fn start_containerd(&mut self) -> Result<()> {
        let net = PodNetwork {
            bridge: "cni0".into(),
            subnet: POD_SUBNET.into(),
            gateway: "10.244.2.1".into(),
            range: ("10.244.2.10".into(), "10.244.2.250".into()),
        };
        let dir = self.dir.join("containerd");
        let ctd = Containerd::start(&dir, &self.cluster, &format!("tpvpn-lab-{}", self.id), &net)
            .context("the node's container runtime")?;
        ctd.import(&web_image())?;
        self.containerd = Some(ctd);
        Ok(())
    }

    /// The node's containerd socket, once it runs.
    pub fn containerd_socket(&self) -> Option<PathBuf> {
        self.containerd.as_ref().map(Containerd::socket)
    }

    fn containerd(&mut self) -> Result<&mut Containerd> {
        self.containerd.as_mut().context("the node's containerd is not running (Lab::start_pods)")
    }

    /// The caller pod: a namespace routed from the node by a veth, as a pod of another
    /// node is reached.
    fn add_caller(&mut self) -> Result<()> {
        let ns = format!("tpvpn-{}-caller", self.id);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let c = self.cluster.clone();
        ip(&["-n", &c, "link", "add", "vcaller", "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["-n", &c, "link", "set", "vcaller", "up"])?;
        ip(&["-n", &c, "route", "add", &format!("{CALLER_IP}/32"), "dev", "vcaller", "src", NODE_IP])?;
        ip(&["-n", &ns, "addr", "add", &format!("{CALLER_IP}/32"), "dev", "eth0"])?;
        for dev in ["lo", "eth0"] {
            ip(&["-n", &ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &ns, "route", "add", &format!("{NODE_IP}/32"), "dev", "eth0"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", NODE_IP, "dev", "eth0", "onlink"])?;
        self.caller_ns = ns;
        Ok(())
    }

    /// Adds one pod as a kubelet would, through the CRI: RunPodSandbox (its network by
    /// the CNI plugins), then CreateContainer and StartContainer of nginx with the
    /// resolved environment and the pod's files mounted; then the Pod object (Ready,
    /// with the real container id).
    pub fn add_pod(&mut self, spec: &PodSpec) -> Result<()> {
        let dir = self.pod_dir(&spec.name);
        let listen = format!("listen {HTTP_PORT};\n    listen {ALT_PORT};\n    listen {H2_PORT} http2;");
        write_web_conf(&dir, &format!("pod {}", spec.name), &listen)?;
        let sandbox = SandboxSpec {
            name: spec.name.clone(),
            namespace: "default".into(),
            uid: crate::random_token()?,
            labels: [("app".to_string(), spec.app.clone())].into(),
            log_dir: dir.join("logs"),
            cgroup_parent: format!("/{}", self.containerd()?.cgroup_parent()),
        };
        let d = dir.display().to_string();
        let volumes = web_volumes(crate::random_token()?, fs::read_to_string(self.manager_ca())?);
        // The pod's files (nginx's configuration and logs), as a hostPath volume at the
        // same path; then its declared volumes, laid out as the kubelet does.
        let mut mounts = vec![(dir.clone(), d.clone(), false)];
        for v in &volumes {
            mounts.push((v.set_up(&dir)?, v.mount_path.clone(), v.read_only));
        }
        let container = ContainerSpec {
            name: "nginx".into(),
            attempt: 0,
            image: WEB_IMAGE.into(),
            command: ["nginx", "-c", &format!("{d}/nginx.conf"), "-p", &d, "-e", &format!("{d}/nginx.err")]
                .map(String::from)
                .to_vec(),
            env: resolved_env(&spec.name, &spec.app),
            mounts,
            run_as_user: None,
        };
        let cri = self.containerd()?.cri()?;
        let sb = cri.run_pod(&sandbox)?;
        let container_id = cri.start_container(&sb.id, &sandbox, &container)?;
        let ns = sb.netns.file_name().context("the sandbox's netns path")?.to_string_lossy().into_owned();
        let mut pod = RunningPod {
            spec: spec.clone(),
            ns: ns.clone(),
            ip: sb.ip,
            sandbox,
            sandbox_id: sb.id,
            container,
            container_id,
            sidecar_id: None,
            volumes,
        };
        self.wait_started(&pod)?;
        if spec.meshed {
            pod.sidecar_id = Some(self.mesh_sidecar(&pod)?);
        }
        self.kube_apply("POST", "/api/v1/namespaces/default/pods", Some(&pod_object(&pod)))?;
        self.pods.push(pod);
        // kube-proxy follows the Service's endpoints: a new pod is a backend too.
        if !self.caller_ns.is_empty() {
            self.kube_proxy()?;
        }
        Ok(())
    }

    /// Waits (≤ 10 s) until the pod's nginx listens; an error carries nginx's own words
    /// when its container exited (nginx says `bind() ... failed (98: Address already in
    /// use)` after about 2.5 s of tries).
    fn wait_started(&mut self, pod: &RunningPod) -> Result<()> {
        let err_log = self.pod_dir(&pod.spec.name).join("nginx.err");
        for _ in 0..100 {
            if self.listens(&pod.ns, HTTP_PORT) {
                return Ok(());
            }
            if let (State::Exited, code) = self.containerd()?.cri()?.container_state(&pod.container_id)? {
                bail!(
                    "{}'s container exited ({code}): {}",
                    pod.spec.name,
                    fs::read_to_string(&err_log).unwrap_or_default().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("{}'s nginx does not listen after 10 s", pod.spec.name)
    }

    /// The IP the CNI gave pod `name`.
    pub fn pod_ip(&self, name: &str) -> Option<&str> {
        self.pods.iter().find(|p| p.spec.name == name).map(|p| p.ip.as_str())
    }

    /// The container runtime's state directory (the agent's `--runtime-root`).
    pub fn runtime_root(&self) -> PathBuf {
        self.dir.join("containerd").join("state")
    }

    /// The environment pod `name`'s container runs with: the image's, the hostname the
    /// runtime sets, the container's as the kubelet resolved it.
    pub fn pod_env(&self, name: &str) -> Vec<(String, String)> {
        let app = self.pods.iter().find(|p| p.spec.name == name).map_or("", |p| p.spec.app.as_str());
        let mut env: Vec<(String, String)> = IMAGE_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env.push(("HOSTNAME".into(), name.into()));
        env.extend(resolved_env(name, app));
        env
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

    /// Restarts pod `pod`'s container as the kubelet does after it exited: StopContainer
    /// (SIGTERM), then a new container of the next attempt in the same sandbox (a new
    /// container id, which the Pod's status then carries, with `restartCount`). An error
    /// carries nginx's own words when it cannot start again.
    pub fn restart_pod_server(&mut self, pod: &str) -> Result<()> {
        let at = self.pods.iter().position(|p| p.spec.name == pod).context("no such pod")?;
        let old = self.pods[at].container_id.clone();
        self.containerd()?.cri()?.stop_container(&old, Duration::from_secs(10))?;
        let _ = fs::remove_file(self.pod_dir(pod).join("nginx.err"));
        let (sandbox_id, sandbox, mut container) =
            (self.pods[at].sandbox_id.clone(), self.pods[at].sandbox.clone(), self.pods[at].container.clone());
        container.attempt += 1;
        let id = self.containerd()?.cri()?.start_container(&sandbox_id, &sandbox, &container)?;
        self.pods[at].container = container;
        self.pods[at].container_id = id;
        let path = format!("/api/v1/namespaces/default/pods/{pod}");
        self.kube_apply("PUT", &path, Some(&pod_object(&self.pods[at])))?;
        let p = self.pods.remove(at);
        let started = self.wait_started(&p);
        self.pods.insert(at, p);
        started
    }

    /// Deletes pod `name` as the kubelet and the API do: its sandbox stopped and removed
    /// through the CRI (containers killed, network torn down by the CNI, namespaces
    /// removed), then the Pod object deleted, and kube-proxy's backends updated.
    pub fn delete_pod(&mut self, name: &str) -> Result<()> {
        let at = self.pods.iter().position(|p| p.spec.name == name).context("no such pod")?;
        let pod = self.pods.remove(at);
        self.containerd()?.cri()?.remove_pod(&pod.sandbox_id)?;
        self.kube_apply("DELETE", &format!("/api/v1/namespaces/default/pods/{name}"), None)?;
        self.kube_proxy()
    }

    /// Runs `cmd` in pod `name`'s app container (CRI ExecSync): stdout, stderr, exit code.
    pub fn exec_in_container(&mut self, name: &str, cmd: &[&str]) -> Result<(String, String, i32)> {
        let id = self.pod_container_id(name).context("no such pod")?.to_string();
        self.containerd()?.cri()?.exec(&id, cmd)
    }

    /// The kubelet's part of a ConfigMap update: pod `pod`'s configMap volume `volume`
    /// rewritten with `items` by the atomic writer (a new timestamped directory, `..data`
    /// swapped to it with one rename).
    pub fn update_config_volume(&mut self, pod: &str, volume: &str, items: &[(&str, &str)]) -> Result<()> {
        let p = self.pods.iter_mut().find(|p| p.spec.name == pod).context("no such pod")?;
        let v = p.volumes.iter_mut().find(|v| v.name == volume).context("no such volume")?;
        let dir = v.host_dir(&self.dir.join("pods").join(pod));
        let Source::ConfigMap { items: held, .. } = &mut v.source else { bail!("{volume} is not a configMap volume") };
        *held = items.iter().map(|(k, val)| (k.to_string(), val.to_string())).collect();
        crate::volumes::atomic_write(&dir, held)
    }

    /// Where pod `pod`'s volume `volume` is on the node (what its containers see of it).
    pub fn pod_volume_dir(&self, pod: &str, volume: &str) -> Option<PathBuf> {
        let p = self.pods.iter().find(|p| p.spec.name == pod)?;
        Some(p.volumes.iter().find(|v| v.name == volume)?.host_dir(&self.pod_dir(pod)))
    }

    /// The directory of pod `name` on the node (its volumes under `volumes/`).
    pub fn pod_dir(&self, name: &str) -> PathBuf {
        self.dir.join("pods").join(name)
    }

    /// The id of pod `name`'s app container (as its Pod's status names it).
    pub fn pod_container_id(&self, name: &str) -> Option<&str> {
        self.pods.iter().find(|p| p.spec.name == name).map(|p| p.container_id.as_str())
    }

    /// istio-init's part (nat REDIRECT of inbound TCP to 15006, in the sandbox's
    /// namespace) and the proxy's: container `istio-proxy` of the pod, as uid 1337.
    fn mesh_sidecar(&mut self, pod: &RunningPod) -> Result<String> {
        nft(&pod.ns, &format!(
            "table ip istio-stand-in {{\n  chain ISTIO_INBOUND {{ type nat hook prerouting priority dstnat; policy accept;\n    tcp dport {HTTP_PORT} redirect to :15006\n  }}\n}}\n"
        ))?;
        let lab_bin = find_bin(&self.bin_dir, "tpvpn-lab")?;
        let ctd = self.containerd()?;
        ctd.import(&ImageSpec {
            name: SIDECAR_IMAGE.into(),
            cmd: vec![lab_bin.display().to_string(), "sidecar".into()],
            binaries: vec![lab_bin.clone()],
            ..ImageSpec::default()
        })?;
        let container = ContainerSpec {
            name: "istio-proxy".into(),
            image: SIDECAR_IMAGE.into(),
            command: vec![lab_bin.display().to_string(), "sidecar".into(), "--listen".into(), "0.0.0.0:15006".into()],
            env: vec![(SIDECAR_ENV.0.into(), SIDECAR_ENV.1.into())],
            run_as_user: Some(SIDECAR_UID),
            ..ContainerSpec::default()
        };
        let id = ctd.cri()?.start_container(&pod.sandbox_id, &pod.sandbox, &container)?;
        self.wait_listening(&pod.ns, 15006)?;
        Ok(id)
    }

    /// What the mesh sidecar of pod `name` printed (one line per connection relayed),
    /// from its container log (CRI format: time, stream, tag, then the line).
    pub fn sidecar_log(&self, name: &str) -> String {
        let log = self.pod_dir(name).join("logs/istio-proxy/0.log");
        let text = fs::read_to_string(log).unwrap_or_default();
        text.lines().filter_map(|l| l.splitn(4, ' ').nth(3)).map(|l| format!("{l}\n")).collect()
    }

    /// kube-proxy's part: each Service's ClusterIP:port DNATed to its pods, for traffic
    /// from pods (prerouting) and from the node itself (output).
    fn kube_proxy(&self) -> Result<()> {
        let mut rules = String::new();
        for (svc_ip, app) in [(WEB_IP, "web"), (MESH_IP, "mesh")] {
            let backends: Vec<&RunningPod> = self.pods.iter().filter(|p| p.spec.app == app).collect();
            if backends.is_empty() {
                continue;
            }
            let map: Vec<String> =
                backends.iter().enumerate().map(|(i, p)| format!("{i} : {} . {HTTP_PORT}", p.ip)).collect();
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
        let token_file = self.agent_token_file()?;
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
            .arg(&token_file)
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

    /// Runs an agent of this build for `node` presenting `token_file`, until it exits or
    /// `timeout` passes (then it is killed): what it printed, and how it ended.
    pub fn run_agent(&self, node: &str, token_file: &Path, timeout: Duration) -> Result<Output> {
        let bin = find_bin(&self.bin_dir, "tpvpn-agent")?.display().to_string();
        let (ca, token) = (self.manager_ca().display().to_string(), token_file.display().to_string());
        let root = self.runtime_root().display().to_string();
        let cmd = [&bin, "--manager", MANAGER_ADDR, "--node", node, "--manager-ca", &ca, "--token-file", &token];
        let cmd: Vec<&str> = cmd.into_iter().chain(["--runtime-root", &root]).collect();
        Ok(self.exec_env(&self.cluster, &cmd, &[("RUST_LOG", "warn"), ("NO_COLOR", "1")], timeout))
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

    /// The agent's pid, if it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
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

    /// The credential file the agent presents: this build's manager (`--auth kubernetes`)
    /// takes the agent pod's ServiceAccount token ([`Lab::agent_service_account_token`]),
    /// a manager of another build the shared token of its `--agent-token-file`.
    pub fn agent_token_file(&self) -> Result<PathBuf> {
        if self.shared_agent_token {
            return Ok(self.shared_agent_token_file());
        }
        let path = self.dir.join("agent-sa-token");
        fs::write(
            &path,
            self.agent_service_account_token(NODE_NAME, crate::AGENT_AUDIENCE)?
                + "
",
        )?;
        Ok(path)
    }

    /// The shared agent token of a manager in `--auth token` (`--agent-token-file`).
    pub(crate) fn shared_agent_token_file(&self) -> PathBuf {
        self.dir.join("agent-token")
    }

    /// The kubelet's part for the agent pod on `node` (stand-in): ServiceAccount
    /// `tpvpn-agent` in namespace `tpvpn-agents` (as `tpvpn manager install` makes them),
    /// the DaemonSet's pod there bound to `node`, and a token for `audience` bound to
    /// that pod, from the API's `TokenRequest`, as the kubelet fills a projected
    /// `serviceAccountToken` volume.
    pub fn agent_service_account_token(&self, node: &str, audience: &str) -> Result<String> {
        let ns = AGENT_NAMESPACE;
        let objects = [
            ("/api/v1/namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
            (
                &format!("/api/v1/namespaces/{ns}/serviceaccounts") as &str,
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tpvpn-agent", "namespace": ns}}),
            ),
            (
                &format!("/api/v1/namespaces/{ns}/pods"),
                json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("tpvpn-agent-{node}"), "namespace": ns, "labels": {"app.kubernetes.io/name": "tpvpn-agent"}},
                    "spec": {"nodeName": node, "hostNetwork": true, "serviceAccountName": "tpvpn-agent",
                             "containers": [{"name": "agent", "image": "tpvpn-agent"}]}}),
            ),
        ];
        for (path, obj) in objects {
            let (code, v) = self.kube_request(Some(&self.api_token), "POST", path, Some(&obj))?;
            if code != 201 && code != 409 {
                bail!("POST {path}: {code} {v}");
            }
        }
        let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [audience], "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": format!("tpvpn-agent-{node}")}}});
        let path = format!("/api/v1/namespaces/{ns}/serviceaccounts/tpvpn-agent/token");
        let answer = self.kube_apply("POST", &path, Some(&request))?;
        answer["status"]["token"].as_str().map(str::to_string).context("TokenRequest: no status.token")
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

/// The Pod object of `pod` as the API has it once the kubelet reported it running.
fn pod_object(pod: &RunningPod) -> Value {
    let spec = &pod.spec;
    let status = |name: &str, image: &str, restarts: u32, id: &str| {
        json!({"name": name, "ready": true, "restartCount": restarts, "image": image, "imageID": "",
               "containerID": format!("containerd://{id}")})
    };
    let mut containers = vec![json!({"name": "nginx", "image": WEB_IMAGE,
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"containerPort": ALT_PORT, "protocol": "TCP"},
                  {"containerPort": H2_PORT, "protocol": "TCP"}],
        "env": env_spec(&spec.app),
        "volumeMounts": pod.volumes.iter().map(Volume::mount_spec).collect::<Vec<_>>()})];
    let mut statuses = vec![status("nginx", WEB_IMAGE, pod.container.attempt, &pod.container_id)];
    if let Some(id) = &pod.sidecar_id {
        containers.push(json!({"name": "istio-proxy", "image": SIDECAR_IMAGE,
            "env": [{"name": SIDECAR_ENV.0, "value": SIDECAR_ENV.1}]}));
        statuses.push(status("istio-proxy", SIDECAR_IMAGE, 0, id));
    }
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": spec.name, "namespace": "default", "uid": pod.sandbox.uid, "labels": {"app": spec.app}},
        "spec": {"nodeName": NODE_NAME, "containers": containers,
            "volumes": pod.volumes.iter().map(Volume::spec).collect::<Vec<_>>()},
        "status": {"phase": "Running", "hostIP": NODE_IP, "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
            "conditions": [{"type": "Ready", "status": "True"}], "containerStatuses": statuses}})
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
        assert_eq!(get("FRONTEND_SERVICE_HOST"), Some(crate::FRONTEND_IP));
        assert_eq!(get("REDIS_LEADER_PORT"), Some("tcp://10.96.0.20:6379"));
        assert_eq!(get("REDIS_LEADER_PORT_6379_TCP_ADDR"), Some("10.96.0.20"));
    }
}
