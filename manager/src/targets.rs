//! What an intercept of a Service port captures, from the Kubernetes objects alone (no
//! I/O): the Service's port (by name, number, or its only one), the Ready pods its
//! selector picks, and on each pod the port its `targetPort` names (a number, or a
//! container port's name, resolved per pod) and the container that serves it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The Service port an intercept is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub name: String,
    /// Absent: the same number as `port`.
    pub target: IntOrString,
    /// `appProtocol`, or empty.
    pub app_protocol: String,
}

impl ServicePort {
    /// Whether the port looks like it carries TLS (its number, name or `appProtocol`),
    /// which personal intercepts cannot read.
    pub fn looks_like_tls(&self) -> bool {
        let name = self.name.to_ascii_lowercase();
        let app = self.app_protocol.to_ascii_lowercase();
        self.port == 443
            || ["https", "tls", "grpcs", "wss"].iter().any(|t| name == *t || name.starts_with(&format!("{t}-")))
            || ["https", "tls", "kubernetes.io/wss"].contains(&app.as_str())
    }
}

/// One pod to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTarget {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
    /// The pod port `targetPort` resolves to.
    pub port: u16,
    pub node: String,
    pub host_ip: Option<IpAddr>,
    pub container: String,
    pub container_id: String,
    /// What the container's spec says of its environment, to keep Secrets' values out of
    /// what a client gets: the names the spec sets itself (`env`), those of them that
    /// come from Secrets (`secretKeyRef`), and whether whole Secrets are imported
    /// (`envFrom.secretRef`, whose names the manager cannot know).
    pub env_names: Vec<String>,
    pub secret_env: Vec<String>,
    pub env_from_secret: bool,
}

impl PodTarget {
    /// `env` (the container's, as the runtime started it) without what came from
    /// Secrets; and the note for the user when something was left out.
    pub fn without_secrets(&self, env: Vec<(String, String)>) -> (Vec<(String, String)>, Option<String>) {
        let from_secret =
            |k: &String| self.secret_env.contains(k) || (self.env_from_secret && !self.env_names.contains(k));
        let (mut dropped, kept): (Vec<_>, Vec<_>) = env.into_iter().partition(|(k, _)| from_secret(k));
        // A backstop: no kept value may hold a Secret's value (one composed in a way the
        // spec does not show), values too short to tell aside.
        let secrets: Vec<String> = dropped.iter().map(|(_, v)| v.clone()).filter(|v| v.len() >= 4).collect();
        let (holding, kept): (Vec<_>, Vec<_>) =
            kept.into_iter().partition(|(_, v)| secrets.iter().any(|s| v.contains(s.as_str())));
        dropped.extend(holding);
        let note = (!dropped.is_empty()).then(|| {
            let n = dropped.len();
            if self.env_from_secret {
                format!("{n} environment variables not copied: the container imports Secrets (envFrom), so only the variables its spec names are, and none from a Secret")
            } else {
                let names: Vec<&str> = dropped.iter().map(|(k, _)| k.as_str()).collect();
                format!("{n} environment variables from Secrets not copied ({})", names.join(", "))
            }
        });
        (kept, note)
    }
}

/// The names of `env` (a container spec's, in order) whose values come from Secrets:
/// from a `secretKeyRef`, or built by the kubelet's `$(NAME)` expansion from such a
/// variable (`DB_URL: postgres://app:$(DB_PASSWORD)@db`), transitively, in spec order as
/// the kubelet expands them. With `envFrom` Secrets, a reference to any name that no
/// earlier non-Secret variable of the spec defines may be a Secret's key, so it counts too.
fn secret_derived(env: &[k8s_openapi::api::core::v1::EnvVar], env_from_secret: bool) -> Vec<String> {
    let mut secret: Vec<String> = Vec::new();
    let mut plain: Vec<&str> = Vec::new();
    for e in env {
        let derived = if e.value_from.as_ref().is_some_and(|v| v.secret_key_ref.is_some()) {
            true
        } else {
            references(e.value.as_deref().unwrap_or_default())
                .any(|r| secret.iter().any(|s| s == r) || (env_from_secret && !plain.contains(&r)))
        };
        // A later definition of a name replaces the earlier one, as in the kubelet.
        secret.retain(|s| *s != e.name);
        plain.retain(|p| *p != e.name);
        if derived {
            secret.push(e.name.clone());
        } else {
            plain.push(&e.name);
        }
    }
    secret
}

/// The names a value refers to with the kubelet's `$(NAME)` syntax (`$$` escapes a `$`).
fn references(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = value;
    std::iter::from_fn(move || loop {
        let at = rest.find('$')?;
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            rest = escaped;
        } else if let Some(open) = after.strip_prefix('(') {
            let close = open.find(')')?;
            rest = &open[close + 1..];
            return Some(&open[..close]);
        } else {
            rest = after;
        }
    })
}

/// Why a port cannot be intercepted, in words for the one error line.
pub type Why = String;

/// The Service's port named or numbered `spec` (empty: its only TCP port).
pub fn service_port(svc: &Service, spec: &str) -> Result<ServicePort, Why> {
    let ns_name = format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or_default(),
        svc.metadata.name.as_deref().unwrap_or_default()
    );
    let ports: Vec<_> = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .collect();
    let listed = || {
        ports
            .iter()
            .map(|p| match &p.name {
                Some(n) if !n.is_empty() => format!("{n} ({})", p.port),
                _ => p.port.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found = if spec.is_empty() {
        match ports.as_slice() {
            [one] => *one,
            [] => return Err(format!("Service {ns_name} has no TCP port")),
            _ => {
                return Err(format!(
                    "Service {ns_name} has several ports ({}): name one with --port LOCAL:PORT",
                    listed()
                ))
            }
        }
    } else {
        let by_number = spec.parse::<i32>().ok();
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(spec) || Some(p.port) == by_number)
            .copied()
            .ok_or_else(|| format!("Service {ns_name} has no port {spec} (its ports: {})", listed()))?
    };
    let port =
        u16::try_from(found.port).map_err(|_| format!("Service {ns_name} port {} is out of range", found.port))?;
    Ok(ServicePort {
        port,
        name: found.name.clone().unwrap_or_default(),
        target: found.target_port.clone().unwrap_or(IntOrString::Int(found.port)),
        app_protocol: found.app_protocol.clone().unwrap_or_default(),
    })
}

fn ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else { return false };
    status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The Ready pods `svc` selects, in its namespace.
pub fn selected<'a>(svc: &Service, pods: &'a [Arc<Pod>]) -> Vec<&'a Arc<Pod>> {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else { return vec![] };
    let ns = svc.metadata.namespace.as_deref();
    let mut out: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == ns && p.metadata.deletion_timestamp.is_none())
        .filter(|p| selects(selector, p) && ready(p))
        .collect();
    out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out
}

/// The volume mounts of container `container` of `pod` that a laptop may read
/// (`intercept --mount`): their `mountPath`s, and a note for each one left out. Secret
/// and projected volumes (the ServiceAccount token) only when `secrets` (an identity
/// allowed `get` on `intercepts/files`; never on the shared token, like Secret values in
/// the environment); hostPath volumes never (they are the node's files). Of those served,
/// the ones a laptop may write to (`--mount-readwrite`): emptyDir and PVC volumes (also
/// generic ephemeral ones) not mounted `readOnly`; configMap, Secret, projected and
/// downwardAPI volumes stay read-only, as in the pod.
pub fn volume_mounts(pod: &Pod, container: &str, secrets: bool) -> VolumeMounts {
    let mut out = VolumeMounts::default();
    let Some(spec) = pod.spec.as_ref() else { return out };
    let Some(c) = spec.containers.iter().find(|c| c.name == container) else { return out };
    for m in c.volume_mounts.iter().flatten() {
        let volume = spec.volumes.iter().flatten().find(|v| v.name == m.name);
        let why = match volume {
            None => Some("no such volume in the pod"),
            Some(v) if v.host_path.is_some() => Some("a hostPath volume: the node's files are never served"),
            Some(v) if (v.secret.is_some() || v.projected.is_some()) && !secrets => {
                Some("Secret or projected volume: served only to an identity (--auth kubeconfig) allowed `get` on `intercepts/files`")
            }
            Some(_) => None,
        };
        let Some(v) = volume.filter(|_| why.is_none()) else {
            out.left_out.push(format!("{} ({})", m.mount_path, why.unwrap_or_default()));
            continue;
        };
        let scratch = v.empty_dir.is_some() || v.persistent_volume_claim.is_some() || v.ephemeral.is_some();
        if scratch && m.read_only != Some(true) {
            out.writable.push(m.mount_path.clone());
        }
        out.served.push(m.mount_path.clone());
    }
    out
}

/// What [`volume_mounts`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VolumeMounts {
    /// The `mountPath`s served.
    pub served: Vec<String>,
    /// Those of `served` that may be written.
    pub writable: Vec<String>,
    /// Each mount left out, and why.
    pub left_out: Vec<String>,
}

/// Resolves `target` on `pod`, and the container serving it (`container`, if given,
/// must exist: it picks whose environment is read).
pub fn pod_target(pod: &Pod, target: &IntOrString, container: &str) -> Result<PodTarget, Why> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or_else(|| format!("pod {name} has no spec"))?;
    let status = pod.status.as_ref().ok_or_else(|| format!("pod {name} has no status"))?;
    let ip: IpAddr =
        status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()).ok_or_else(|| format!("pod {name} has no IP yet"))?;
    if spec.host_network == Some(true) {
        return Err(format!("pod {name} uses the host network: intercepting it would capture the node's port"));
    }
    let node = spec.node_name.clone().ok_or_else(|| format!("pod {name} is not scheduled on a node"))?;
    let declares = |c: &k8s_openapi::api::core::v1::Container| -> Option<i32> {
        c.ports.iter().flatten().find_map(|p| match target {
            IntOrString::Int(n) => (p.container_port == *n).then_some(*n),
            IntOrString::String(s) => (p.name.as_deref() == Some(s)).then_some(p.container_port),
        })
    };
    let (port, serving) = match target {
        IntOrString::Int(n) => (*n, spec.containers.iter().find(|c| declares(c).is_some())),
        IntOrString::String(s) => {
            let c = spec
                .containers
                .iter()
                .find(|c| declares(c).is_some())
                .ok_or_else(|| format!("pod {name} has no container port named {s}"))?;
            (declares(c).unwrap_or_default(), Some(c))
        }
    };
    let port = u16::try_from(port).map_err(|_| format!("pod {name}: port {port} is out of range"))?;
    let container = if !container.is_empty() {
        spec.containers
            .iter()
            .find(|c| c.name == container)
            .ok_or_else(|| {
                let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
                format!("pod {name} has no container {container} (its containers: {})", names.join(", "))
            })?
            .name
            .clone()
    } else if let Some(c) = serving {
        c.name.clone()
    } else if let [only] = spec.containers.as_slice() {
        only.name.clone()
    } else {
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        return Err(format!(
            "pod {name}: no container declares port {port}; name the one serving it with --container ({})",
            names.join(", ")
        ));
    };
    let container_id = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == container)
        .and_then(|c| c.container_id.clone())
        .unwrap_or_default();
    let spec_of = spec.containers.iter().find(|c| c.name == container);
    let env = spec_of.and_then(|c| c.env.as_deref()).unwrap_or_default();
    let env_names = env.iter().map(|e| e.name.clone()).collect();
    let env_from_secret =
        spec_of.and_then(|c| c.env_from.as_ref()).is_some_and(|f| f.iter().any(|s| s.secret_ref.is_some()));
    let secret_env = secret_derived(env, env_from_secret);
    Ok(PodTarget {
        namespace,
        name,
        ip,
        port,
        node,
        host_ip: status.host_ip.as_deref().and_then(|ip| ip.parse().ok()),
        container,
        container_id,
        env_names,
        secret_env,
        env_from_secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ports_that_look_like_tls() {
        let port = |port, name: &str, app: &str| ServicePort {
            port,
            name: name.into(),
            target: IntOrString::Int(i32::from(port)),
            app_protocol: app.into(),
        };
        for tls in [port(443, "", ""), port(8443, "https", ""), port(9000, "grpcs-api", ""), port(80, "", "TLS")] {
            assert!(tls.looks_like_tls(), "{tls:?}");
        }
        for plain in [port(80, "http", ""), port(8080, "httpsish", ""), port(90, "rpc", "kubernetes.io/h2c")] {
            assert!(!plain.looks_like_tls(), "{plain:?}");
        }
    }

    fn svc() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "alt", "port": 81, "targetPort": 8081},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]}
        }))
        .unwrap()
    }

    fn pod(name: &str, ready: bool, labels: serde_json::Value) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "labels": labels},
                "spec": {"nodeName": "n1", "containers": [
                    {"name": "nginx", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 8081}]},
                    {"name": "sidecar"}
                ]},
                "status": {"podIP": "10.244.2.10", "hostIP": "10.250.1.1",
                           "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                           "containerStatuses": [{"name": "nginx", "containerID": "containerd://abc", "image": "", "imageID": "", "ready": true, "restartCount": 0}]}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn only_the_serving_containers_volumes_and_secrets_only_for_an_identity() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [
                {"name": "app", "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/config"},
                    {"name": "creds", "mountPath": "/etc/secret"},
                    {"name": "token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                    {"name": "node", "mountPath": "/host"},
                    {"name": "scratch", "mountPath": "/tmp/work"},
                    {"name": "claim", "mountPath": "/var/lib/db"},
                    {"name": "claim", "mountPath": "/var/lib/ro", "readOnly": true}]},
                {"name": "sidecar", "volumeMounts": [{"name": "other", "mountPath": "/etc/other"}]}],
             "volumes": [
                {"name": "config", "configMap": {"name": "c"}},
                {"name": "creds", "secret": {"secretName": "s"}},
                {"name": "token", "projected": {"sources": []}},
                {"name": "node", "hostPath": {"path": "/"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "claim", "persistentVolumeClaim": {"claimName": "db"}},
                {"name": "other", "emptyDir": {}}]}
        }))
        .unwrap();
        let VolumeMounts { served, writable, left_out } = volume_mounts(&pod, "app", false);
        assert_eq!(served, ["/etc/config", "/tmp/work", "/var/lib/db", "/var/lib/ro"]);
        assert_eq!(writable, ["/tmp/work", "/var/lib/db"], "scratch and claims, not a readOnly mount");
        assert_eq!(left_out.len(), 3, "{left_out:?}");
        assert!(left_out[0].starts_with("/etc/secret (Secret") && left_out[2].starts_with("/host (a hostPath"));
        let VolumeMounts { served, writable, left_out } = volume_mounts(&pod, "app", true);
        assert_eq!(
            served,
            [
                "/etc/config",
                "/etc/secret",
                "/var/run/secrets/kubernetes.io/serviceaccount",
                "/tmp/work",
                "/var/lib/db",
                "/var/lib/ro"
            ]
        );
        assert_eq!(writable, ["/tmp/work", "/var/lib/db"], "never a Secret or the token");
        assert_eq!(left_out.len(), 1, "the node's files never: {left_out:?}");
        assert_eq!(volume_mounts(&pod, "sidecar", true).served, ["/etc/other"]);
        assert_eq!(volume_mounts(&pod, "nope", true), VolumeMounts::default());
    }

    #[test]
    fn ports_by_name_number_or_the_only_one() {
        let s = svc();
        assert_eq!(service_port(&s, "http").unwrap().target, IntOrString::String("http".into()));
        assert_eq!(service_port(&s, "81").unwrap().target, IntOrString::Int(8081));
        let e = service_port(&s, "").unwrap_err();
        assert!(e.contains("several ports") && e.contains("http (80)"), "{e}");
        let e = service_port(&s, "53").unwrap_err();
        assert!(e.contains("no port 53"), "UDP ports are not interceptable: {e}");
        let one: Service = serde_json::from_value(
            json!({"metadata": {"name": "a", "namespace": "b"}, "spec": {"ports": [{"port": 9}]}}),
        )
        .unwrap();
        assert_eq!(
            service_port(&one, "").unwrap(),
            ServicePort { port: 9, name: String::new(), target: IntOrString::Int(9), app_protocol: String::new() }
        );
    }

    #[test]
    fn values_from_secrets_are_not_handed_to_clients() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "env": [
                {"name": "PLAIN", "value": "x"},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            ]}]},
            "status": {"podIP": "10.244.2.10"}
        }))
        .unwrap();
        let t = pod_target(&p, &IntOrString::Int(80), "").unwrap();
        let env =
            vec![("PATH".into(), "/bin".into()), ("PLAIN".into(), "x".into()), ("PASSWORD".into(), "hunter2".into())];
        let (kept, note) = t.without_secrets(env.clone());
        assert_eq!(kept, vec![("PATH".to_string(), "/bin".to_string()), ("PLAIN".into(), "x".into())]);
        assert!(note.unwrap().contains("PASSWORD"));
        // Whole Secrets imported: only the variables the spec names, minus Secret ones.
        let mut t2 = t.clone();
        t2.env_from_secret = true;
        let (kept, _) = t2.without_secrets(env);
        assert_eq!(kept, vec![("PLAIN".to_string(), "x".to_string())]);
    }

    fn env_target(env: serde_json::Value, env_from_secret: bool) -> PodTarget {
        let mut container = json!({"name": "app", "env": env});
        if env_from_secret {
            container["envFrom"] = json!([{"secretRef": {"name": "all"}}]);
        }
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"nodeName": "n1", "containers": [container]},
            "status": {"podIP": "10.244.2.10"}
        }))
        .unwrap();
        pod_target(&p, &IntOrString::Int(80), "").unwrap()
    }

    #[test]
    fn values_built_from_secrets_are_secret_values() {
        let t = env_target(
            json!([
                {"name": "HOST", "value": "db"},
                {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "DB_URL", "value": "postgres://app:$(DB_PASSWORD)@$(HOST)/app"},
                {"name": "DSN", "value": "$(DB_URL)?sslmode=require"},
                {"name": "LITERAL", "value": "$$(DB_PASSWORD) is not expanded"},
                {"name": "SELF", "value": "http://$(HOST)/"},
            ]),
            false,
        );
        assert_eq!(t.secret_env, ["DB_PASSWORD", "DB_URL", "DSN"]);
        let env: Vec<(String, String)> = [
            ("HOST", "db"),
            ("DB_PASSWORD", "hunter22"),
            ("DB_URL", "postgres://app:hunter22@db/app"),
            ("DSN", "postgres://app:hunter22@db/app?sslmode=require"),
            ("LITERAL", "$(DB_PASSWORD) is not expanded"),
            ("SELF", "http://db/"),
            // Not in the spec (the image's, or a wrapper's), but holding a Secret's value.
            ("WRAPPED", "pw=hunter22"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (kept, note) = t.without_secrets(env);
        let names: Vec<&str> = kept.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["HOST", "LITERAL", "SELF"]);
        assert_eq!(
            note.unwrap(),
            "4 environment variables from Secrets not copied (DB_PASSWORD, DB_URL, DSN, WRAPPED)"
        );
        // A later plain definition of a name replaces a Secret one, and the reverse.
        let t = env_target(
            json!([
                {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                {"name": "A", "value": "plain"},
                {"name": "B", "value": "$(A)"},
                {"name": "C", "value": "plain"},
                {"name": "C", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ]),
            false,
        );
        assert_eq!(t.secret_env, ["C"]);
        // With envFrom Secrets, a name the spec did not define before may be a Secret key.
        let t = env_target(
            json!([
                {"name": "HOST", "value": "db"},
                {"name": "URL", "value": "postgres://$(HOST)/$(PASSWORD_FROM_SECRET)"},
                {"name": "OK", "value": "http://$(HOST)/"},
            ]),
            true,
        );
        assert_eq!(t.secret_env, ["URL"]);
    }

    #[test]
    fn kubelet_references() {
        let refs = |v| references(v).collect::<Vec<_>>();
        assert_eq!(refs("a$(B)c$(D_1)"), ["B", "D_1"]);
        assert_eq!(refs("$$(B)$(C)"), ["C"]);
        assert_eq!(refs("$(unclosed"), Vec::<&str>::new());
        assert_eq!(refs("$ $a $"), Vec::<&str>::new());
    }

    #[test]
    fn ready_selected_pods_and_their_ports() {
        let s = svc();
        let pods = vec![
            pod("web-1", true, json!({"app": "web"})),
            pod("web-0", true, json!({"app": "web", "x": "y"})),
            pod("other", true, json!({"app": "db"})),
            pod("web-2", false, json!({"app": "web"})),
        ];
        let sel = selected(&s, &pods);
        let names: Vec<_> = sel.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["web-0", "web-1"]);
        let t = pod_target(sel[0], &IntOrString::String("http".into()), "").unwrap();
        assert_eq!((t.port, t.container.as_str(), t.container_id.as_str()), (8080, "nginx", "containerd://abc"));
        assert_eq!(t.host_ip, Some("10.250.1.1".parse().unwrap()));
        let t = pod_target(sel[0], &IntOrString::Int(8081), "").unwrap();
        assert_eq!((t.port, t.container.as_str()), (8081, "nginx"));
        let e = pod_target(sel[0], &IntOrString::String("grpc".into()), "").unwrap_err();
        assert!(e.contains("no container port named grpc"), "{e}");
        // An undeclared number with two containers needs --container.
        let e = pod_target(sel[0], &IntOrString::Int(9999), "").unwrap_err();
        assert!(e.contains("--container"), "{e}");
        let t = pod_target(sel[0], &IntOrString::Int(9999), "sidecar").unwrap();
        assert_eq!((t.port, t.container.as_str(), t.container_id.as_str()), (9999, "sidecar", ""));
        assert!(pod_target(sel[0], &IntOrString::Int(80), "nope").unwrap_err().contains("no container nope"));
    }
}
