//! A CRI v1 client (the kubelet's side of the runtime API) over containerd's socket,
//! blocking: each call runs on the client's own single-thread runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint, Uri};

/// A pod sandbox as the kubelet asks for one.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: HashMap<String, String>,
    pub log_dir: PathBuf,
    pub cgroup_parent: String,
}

/// A container as the kubelet asks for one (environment already resolved).
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub attempt: u32,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// (host path, container path, read-only).
    pub mounts: Vec<(PathBuf, String, bool)>,
    pub run_as_user: Option<i64>,
}

/// What the runtime says of a sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub ip: String,
    /// The network namespace's bind mount (`/var/run/netns/cni-…`).
    pub netns: PathBuf,
}

/// The state of a container (CRI `ContainerState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Exited,
    Unknown,
}

pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

/// Each call's limit (the runtime answers in well under a second here).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Cri {
    /// Connects to the CRI socket at `socket`.
    pub fn connect(socket: &Path) -> Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let path = socket.to_path_buf();
        let channel = rt.block_on(async move {
            Endpoint::try_from("http://[::]:50051")?
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                }))
                .await
        });
        let channel = channel.with_context(|| format!("connecting to the CRI at {}", socket.display()))?;
        Ok(Cri { rt, client: RuntimeServiceClient::new(channel) })
    }

    /// The runtime's name and version (`containerd 1.6.20~ds1`).
    pub fn version(&mut self) -> Result<String> {
        let c = &mut self.client;
        let v = self.rt.block_on(c.version(cri::VersionRequest::default())).context("CRI Version")?.into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// RunPodSandbox: the pod's namespaces, its network by the CNI plugins.
    pub fn run_pod(&mut self, spec: &SandboxSpec) -> Result<Sandbox> {
        let config = sandbox_config(spec);
        let c = &mut self.client;
        let req = cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() };
        let id = self
            .rt
            .block_on(c.run_pod_sandbox(req))
            .with_context(|| format!("CRI RunPodSandbox {}", spec.name))?
            .into_inner()
            .pod_sandbox_id;
        let req = cri::PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: true };
        let status = self.rt.block_on(c.pod_sandbox_status(req)).context("CRI PodSandboxStatus")?.into_inner();
        let ip = status.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
        let info: Value = status.info.get("info").and_then(|i| serde_json::from_str(i).ok()).unwrap_or(Value::Null);
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .map(PathBuf::from)
            .context("the sandbox's runtime spec names no network namespace")?;
        Ok(Sandbox { id, ip, netns })
    }

    /// CreateContainer then StartContainer in sandbox `sandbox`; returns the container id.
    pub fn start_container(&mut self, sandbox: &str, pod: &SandboxSpec, spec: &ContainerSpec) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: spec.name.clone(), attempt: spec.attempt }),
            image: Some(cri::ImageSpec { image: spec.image.clone(), ..Default::default() }),
            command: spec.command.clone(),
            envs: spec.env.iter().map(|(k, v)| cri::KeyValue { key: k.clone(), value: v.clone() }).collect(),
            mounts: spec
                .mounts
                .iter()
                .map(|(host, path, ro)| cri::Mount {
                    container_path: path.clone(),
                    host_path: host.display().to_string(),
                    readonly: *ro,
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{}/{}.log", spec.name, spec.attempt),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: spec.run_as_user.map(|value| cri::Int64Value { value }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config(pod)),
        };
        let c = &mut self.client;
        let id = self
            .rt
            .block_on(c.create_container(req))
            .with_context(|| format!("CRI CreateContainer {}/{}", pod.name, spec.name))?
            .into_inner()
            .container_id;
        let req = cri::StartContainerRequest { container_id: id.clone() };
        self.rt.block_on(c.start_container(req)).with_context(|| format!("CRI StartContainer {id}"))?;
        Ok(id)
    }

    /// StopContainer: SIGTERM, SIGKILL after `grace`.
    pub fn stop_container(&mut self, id: &str, grace: Duration) -> Result<()> {
        let req = cri::StopContainerRequest { container_id: id.to_string(), timeout: grace.as_secs() as i64 };
        let c = &mut self.client;
        self.rt.block_on(c.stop_container(req)).with_context(|| format!("CRI StopContainer {id}"))?;
        Ok(())
    }

    /// The container's state and, once it exited, its exit code.
    pub fn container_state(&mut self, id: &str) -> Result<(State, i32)> {
        let req = cri::ContainerStatusRequest { container_id: id.to_string(), verbose: false };
        let c = &mut self.client;
        let st = self.rt.block_on(c.container_status(req)).context("CRI ContainerStatus")?.into_inner();
        let st = st.status.context("no container status")?;
        let state = match cri::ContainerState::try_from(st.state) {
            Ok(cri::ContainerState::ContainerCreated) => State::Created,
            Ok(cri::ContainerState::ContainerRunning) => State::Running,
            Ok(cri::ContainerState::ContainerExited) => State::Exited,
            _ => State::Unknown,
        };
        Ok((state, st.exit_code))
    }

    /// ExecSync: runs `cmd` in container `id`; its stdout, stderr and exit code.
    pub fn exec(&mut self, id: &str, cmd: &[&str]) -> Result<(String, String, i32)> {
        let req = cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|c| c.to_string()).collect(),
            timeout: 30,
        };
        let c = &mut self.client;
        let out = self.rt.block_on(c.exec_sync(req)).with_context(|| format!("CRI ExecSync {cmd:?}"))?.into_inner();
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        Ok((text(out.stdout), text(out.stderr), out.exit_code))
    }

    /// StopPodSandbox and RemovePodSandbox: every container of it killed and removed, its
    /// network torn down by the CNI plugins, its namespaces removed.
    pub fn remove_pod(&mut self, id: &str) -> Result<()> {
        let c = &mut self.client;
        let stop = cri::StopPodSandboxRequest { pod_sandbox_id: id.to_string() };
        self.rt.block_on(c.stop_pod_sandbox(stop)).with_context(|| format!("CRI StopPodSandbox {id}"))?;
        let remove = cri::RemovePodSandboxRequest { pod_sandbox_id: id.to_string() };
        self.rt.block_on(c.remove_pod_sandbox(remove)).with_context(|| format!("CRI RemovePodSandbox {id}"))?;
        Ok(())
    }

    /// The ids of every sandbox the runtime has.
    pub fn sandboxes(&mut self) -> Result<Vec<String>> {
        let c = &mut self.client;
        let list = self.rt.block_on(c.list_pod_sandbox(cri::ListPodSandboxRequest::default()))?.into_inner();
        Ok(list.items.into_iter().map(|s| s.id).collect())
    }
}

fn sandbox_config(spec: &SandboxSpec) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: spec.name.clone(),
            uid: spec.uid.clone(),
            namespace: spec.namespace.clone(),
            attempt: 0,
        }),
        hostname: spec.name.clone(),
        log_directory: spec.log_dir.display().to_string(),
        labels: spec.labels.clone(),
        linux: Some(cri::LinuxPodSandboxConfig { cgroup_parent: spec.cgroup_parent.clone(), ..Default::default() }),
        ..Default::default()
    }
}
