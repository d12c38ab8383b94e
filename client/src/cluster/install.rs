//! `tpvpn manager install` and `tpvpn manager uninstall`.
//!
//! Install applies the plain manifests of `deploy/manifests/manager.yaml` (embedded at
//! build time) with server-side apply, after setting the namespaces (the manager's, and
//! `<it>-agents` for the node agents, which no user Role covers), image and Service
//! type, and creates the Secrets if they do not exist: `tpvpn-manager-tls` (a fresh
//! self-signed certificate and key), `tpvpn-client` (that certificate as `ca.crt`
//! and a fresh random `token`) and `tpvpn-agent` in the agents' namespace (that
//! certificate as `ca.crt`, which the agents pin; they present no shared secret but their
//! pods' ServiceAccount tokens). Running it again changes nothing that is already right
//! and never rotates existing credentials; what an older release left (an agent DaemonSet
//! in the manager's namespace, the shared agent token) is removed. Uninstall deletes the
//! same objects.

use std::collections::BTreeMap;
use std::io::Read;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;

use crate::cluster::discovery::CLIENT_SECRET;
use crate::cluster::kubeconfig::Resolved;
use crate::cluster::portforward::MANAGER_SERVICE;
use crate::Error;

/// The manifests, as shipped in `deploy/manifests/manager.yaml`.
pub const MANIFESTS: &str = include_str!("../../../deploy/manifests/manager.yaml");
/// Name of the Secret with the manager's certificate and key.
pub const TLS_SECRET: &str = "tpvpn-manager-tls";
/// Name of the Secret with what the node agents pin (`ca.crt`).
pub const AGENT_SECRET: &str = "tpvpn-agent";
/// The field manager of tpvpn's server-side applies.
const FIELD_MANAGER: &str = "tpvpn";
/// The namespaces as the manifests name them.
const MANIFEST_NAMESPACE: &str = "tpvpn";
const MANIFEST_AGENT_NAMESPACE: &str = "tpvpn-agents";

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub namespace: String,
    pub image: String,
    /// `NodePort` or `LoadBalancer`.
    pub service_type: String,
    /// Whether the manager also accepts the shared client token of Secret `tpvpn-client`
    /// (earlier releases' clients; whoever holds it connects without an identity).
    /// Without it laptops connect only with certificates of their users.
    pub shared_token: bool,
}

impl InstallOptions {
    /// Where the node agents run: `<namespace>-agents`.
    pub fn agent_namespace(&self) -> String {
        format!("{}-agents", self.namespace)
    }

    /// The namespace chosen for one the manifests name.
    fn namespace_for(&self, manifest_namespace: &str) -> String {
        if manifest_namespace == MANIFEST_AGENT_NAMESPACE {
            self.agent_namespace()
        } else {
            self.namespace.clone()
        }
    }
}

/// Plural resource names of the kinds in the manifests.
fn plural(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Namespace" => "namespaces",
        "ServiceAccount" => "serviceaccounts",
        "ClusterRole" => "clusterroles",
        "ClusterRoleBinding" => "clusterrolebindings",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        "Deployment" => "deployments",
        "DaemonSet" => "daemonsets",
        "Service" => "services",
        "Secret" => "secrets",
        "ResourceQuota" => "resourcequotas",
        _ => return None,
    })
}

/// The manifests as objects, with `opts` applied.
pub fn objects(opts: &InstallOptions) -> Result<Vec<Value>, Error> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(MANIFESTS)
        .map_err(|e| Error::Config(format!("the embedded manifests do not parse: {e}")))?;
    let mut out = Vec::new();
    for mut doc in docs.into_iter().filter(|d| d.is_object()) {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "Namespace" => {
                let name = opts.namespace_for(doc["metadata"]["name"].as_str().unwrap_or(MANIFEST_NAMESPACE));
                doc["metadata"]["name"] = Value::from(name);
            }
            "ClusterRole" | "ClusterRoleBinding" => {}
            _ => {
                let ns = opts.namespace_for(doc["metadata"]["namespace"].as_str().unwrap_or(MANIFEST_NAMESPACE));
                doc["metadata"]["namespace"] = Value::from(ns);
            }
        }
        // Bindings name the manager's ServiceAccount, in the manager's namespace.
        for subject in doc.get_mut("subjects").and_then(Value::as_array_mut).into_iter().flatten() {
            if subject["kind"] == "ServiceAccount" {
                subject["namespace"] = Value::from(opts.namespace.clone());
            }
        }
        if kind == "Deployment" && !opts.shared_token {
            without_shared_token(&mut doc["spec"]["template"]["spec"]);
        }
        if kind == "Deployment" || kind == "DaemonSet" {
            if let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_array_mut() {
                for c in containers {
                    c["image"] = Value::from(opts.image.clone());
                    // The agents reach the manager through its Service, in this namespace.
                    for e in c["env"].as_array_mut().into_iter().flatten() {
                        if e["name"] == "TPVPN_MANAGER" {
                            e["value"] = Value::from(format!("{MANAGER_SERVICE}.{}.svc:4443", opts.namespace));
                        }
                    }
                }
            }
        }
        // Only the manager's own Service is what laptops reach (NodePort or LoadBalancer).
        if kind == "Service" && doc["metadata"]["name"] == MANAGER_SERVICE {
            doc["spec"]["type"] = Value::from(opts.service_type.clone());
            // Behind a load balancer, only nodes running the manager take its traffic and
            // the clients' own addresses reach it (not a node's, shared by everyone the
            // node SNATs: the manager's unauthenticated counts are per source address). A
            // NodePort stays Cluster: laptops reach it on the API server's host, which
            // need not run the manager.
            if opts.service_type == "LoadBalancer" {
                doc["spec"]["externalTrafficPolicy"] = Value::from("Local");
            }
        }
        out.push(doc);
    }
    Ok(out)
}

/// The manager's pod without the shared client token: no `--token-file`, no volume of
/// Secret `tpvpn-client`.
fn without_shared_token(pod: &mut Value) {
    let client_volume = |v: &Value| v["secret"]["secretName"] == CLIENT_SECRET;
    let names: Vec<Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| client_volume(v))
        .map(|v| v["name"].clone())
        .collect();
    if let Some(volumes) = pod.get_mut("volumes").and_then(Value::as_array_mut) {
        volumes.retain(|v| !client_volume(v));
    }
    for c in pod.get_mut("containers").and_then(Value::as_array_mut).into_iter().flatten() {
        if let Some(args) = c.get_mut("args").and_then(Value::as_array_mut) {
            args.retain(|a| !a.as_str().is_some_and(|a| a.starts_with("--token-file")));
        }
        if let Some(mounts) = c.get_mut("volumeMounts").and_then(Value::as_array_mut) {
            mounts.retain(|m| !names.contains(&m["name"]));
        }
    }
}

/// The API of the object `obj` (its kind, and its namespace if it has one).
fn api_for(client: &kube::Client, obj: &Value) -> Result<(Api<DynamicObject>, String), Error> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let plural = plural(kind).ok_or_else(|| Error::Config(format!("manifest kind {kind} is not supported")))?;
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let api = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    Ok((api, name))
}

fn kube_error(e: kube::Error, what: &str, r: &Resolved) -> Error {
    match e {
        kube::Error::Api(s) if s.code == 403 => Error::Kubernetes(format!(
            "context `{}` may not {what}: {}; installing the manager needs cluster-admin rights",
            r.context, s.message
        )),
        kube::Error::Api(s) => Error::Kubernetes(format!("{what}: {} ({})", s.message, s.code)),
        other => Error::Kubernetes(format!("{what}: cannot reach the API server {}: {other}", r.server)),
    }
}

fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::System(format!("cannot read /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn secret(namespace: &str, name: &str, type_: &str, data: BTreeMap<String, ByteString>) -> Value {
    let s = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "tpvpn".to_string())].into()),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(data),
        ..Default::default()
    };
    let mut v = serde_json::to_value(s).unwrap_or_default();
    v["apiVersion"] = Value::from("v1");
    v["kind"] = Value::from("Secret");
    v
}

async fn apply(client: &kube::Client, obj: &Value, r: &Resolved) -> Result<(), Error> {
    let (api, name) = api_for(client, obj)?;
    let what = format!("apply {} {name}", obj["kind"].as_str().unwrap_or_default());
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
        .await
        .map(|_| ())
        .map_err(|e| kube_error(e, &what, r))
}

/// The manager's certificate, from its TLS Secret.
fn certificate(tls: &Secret, ns: &str) -> Result<ByteString, Error> {
    tls.data.as_ref().and_then(|d| d.get("tls.crt")).cloned().ok_or_else(|| {
        Error::Kubernetes(format!("Secret {ns}/{TLS_SECRET} has no tls.crt; delete it and install again"))
    })
}

/// Creates the Secrets that do not exist yet; existing credentials are kept.
async fn ensure_secrets(client: &kube::Client, opts: &InstallOptions, r: &Resolved) -> Result<Vec<String>, Error> {
    let ns = &opts.namespace;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let get = |name: &'static str| {
        let secrets = secrets.clone();
        async move { secrets.get_opt(name).await.map_err(|e| kube_error(e, &format!("read Secret {ns}/{name}"), r)) }
    };
    let mut created = Vec::new();
    let tls = match get(TLS_SECRET).await? {
        Some(s) => s,
        None => {
            let names = vec![
                MANAGER_SERVICE.to_string(),
                format!("{MANAGER_SERVICE}.{ns}"),
                format!("{MANAGER_SERVICE}.{ns}.svc"),
            ];
            let ck = rcgen::generate_simple_self_signed(names)
                .map_err(|e| Error::System(format!("cannot generate the manager certificate: {e}")))?;
            let data = BTreeMap::from([
                ("tls.crt".to_string(), ByteString(ck.cert.pem().into_bytes())),
                ("tls.key".to_string(), ByteString(ck.signing_key.serialize_pem().into_bytes())),
            ]);
            let obj = secret(ns, TLS_SECRET, "kubernetes.io/tls", data);
            apply(client, &obj, r).await?;
            created.push(TLS_SECRET.to_string());
            serde_json::from_value(obj).map_err(|e| Error::System(e.to_string()))?
        }
    };
    let shared = get(CLIENT_SECRET).await?;
    if opts.shared_token && shared.is_none() {
        let data = BTreeMap::from([
            ("ca.crt".to_string(), certificate(&tls, ns)?),
            ("token".to_string(), ByteString(random_token()?.into_bytes())),
        ]);
        apply(client, &secret(ns, CLIENT_SECRET, "Opaque", data), r).await?;
        created.push(CLIENT_SECRET.to_string());
    }
    // The certificate the agents pin, in their namespace. An older release's shared agent
    // token goes (its manager-namespace copy, and the key in the agents' copy): nothing
    // accepts it any more.
    let agent_ns = opts.agent_namespace();
    let agents: Api<Secret> = Api::namespaced(client.clone(), &agent_ns);
    let theirs = agents
        .get_opt(AGENT_SECRET)
        .await
        .map_err(|e| kube_error(e, &format!("read Secret {agent_ns}/{AGENT_SECRET}"), r))?;
    let delete = |api: Api<Secret>, what: String, name: &'static str| async move {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(kube_error(e, &format!("delete Secret {what}"), r)),
        }
    };
    if get(AGENT_SECRET).await?.is_some() {
        delete(secrets.clone(), format!("{ns}/{AGENT_SECRET}"), AGENT_SECRET).await?;
    }
    // Without the shared client token, an earlier install's goes: nothing accepts it.
    if !opts.shared_token && shared.is_some() {
        delete(secrets.clone(), format!("{ns}/{CLIENT_SECRET}"), CLIENT_SECRET).await?;
    }
    let has_token = theirs.as_ref().and_then(|s| s.data.as_ref()).is_some_and(|d| d.contains_key("token"));
    if has_token {
        delete(agents.clone(), format!("{agent_ns}/{AGENT_SECRET}"), AGENT_SECRET).await?;
    }
    if theirs.is_none() || has_token {
        let data = BTreeMap::from([("ca.crt".to_string(), certificate(&tls, ns)?)]);
        apply(client, &secret(&agent_ns, AGENT_SECRET, "Opaque", data), r).await?;
        created.push(format!("{agent_ns}/{AGENT_SECRET}"));
    }
    Ok(created)
}

/// Installs or updates the manager. Returns a summary for the user.
pub async fn install(r: &Resolved, opts: &InstallOptions) -> Result<String, Error> {
    if !matches!(opts.service_type.as_str(), "NodePort" | "LoadBalancer") {
        return Err(Error::Config(format!("--service-type {}: use NodePort or LoadBalancer", opts.service_type)));
    }
    let client = crate::cluster::discovery::client(r).await?;
    let objects = objects(opts)?;
    // The namespace first: everything else lives in it.
    let (namespace, rest): (Vec<&Value>, Vec<&Value>) = objects.iter().partition(|o| o["kind"] == "Namespace");
    for obj in namespace {
        apply(&client, obj, r).await?;
    }
    let created = ensure_secrets(&client, opts, r).await?;
    remove_old_agents(&client, opts, r).await?;
    for obj in rest {
        apply(&client, obj, r).await?;
    }
    let secrets = if created.is_empty() {
        "existing credentials kept".to_string()
    } else {
        format!("created Secrets {}", created.join(", "))
    };
    Ok(format!(
        "installed tpvpn-manager in namespace {} of context `{}` (image {}, Service {}; node agents in namespace {}, bind no user there); {secrets}. Let a group connect: kubectl create clusterrolebinding tpvpn-users --clusterrole tpvpn-user --group GROUP; kubectl create rolebinding tpvpn-users -n {} --role tpvpn-user --group GROUP{}",
        opts.namespace,
        r.context,
        opts.image,
        opts.service_type,
        opts.agent_namespace(),
        opts.namespace,
        if opts.shared_token {
            " (the shared token of Secret tpvpn-client is accepted too: --no-shared-token to stop that)"
        } else {
            ""
        }
    ))
}

/// Releases before 0.2 ran the agents in the manager's namespace, where users may
/// port-forward: their DaemonSet and quota go (the agents remove their rules when
/// stopped; the new DaemonSet's agents take the captures over as they connect).
async fn remove_old_agents(client: &kube::Client, opts: &InstallOptions, r: &Resolved) -> Result<(), Error> {
    let old =
        objects(opts)?.into_iter().filter(|o| o["kind"] == "DaemonSet" || o["kind"] == "ResourceQuota").map(|mut o| {
            o["metadata"]["namespace"] = Value::from(opts.namespace.clone());
            o
        });
    for obj in old {
        let (api, name) = api_for(client, &obj)?;
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                let what =
                    format!("delete the old {} {}/{name}", obj["kind"].as_str().unwrap_or_default(), opts.namespace);
                return Err(kube_error(e, &what, r));
            }
        }
    }
    Ok(())
}

/// Deletes everything `install` created, the Secrets and the namespace included.
pub async fn uninstall(r: &Resolved, opts: &InstallOptions) -> Result<String, Error> {
    let client = crate::cluster::discovery::client(r).await?;
    let mut objects = objects(opts)?;
    for name in [TLS_SECRET, CLIENT_SECRET, AGENT_SECRET] {
        objects.push(secret(&opts.namespace, name, "Opaque", BTreeMap::new()));
    }
    objects.push(secret(&opts.agent_namespace(), AGENT_SECRET, "Opaque", BTreeMap::new()));
    // Reverse order of install: the namespace last.
    objects.sort_by_key(|o| o["kind"] == "Namespace");
    let mut deleted = 0;
    for obj in &objects {
        let (api, name) = api_for(&client, obj)?;
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(kube_error(e, &format!("delete {} {name}", obj["kind"].as_str().unwrap_or_default()), r))
            }
        }
    }
    Ok(if deleted == 0 {
        format!("tpvpn-manager is not installed in namespace {} of context `{}`", opts.namespace, r.context)
    } else {
        format!("uninstalled tpvpn-manager from namespace {} of context `{}`", opts.namespace, r.context)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_and_take_the_options() {
        use serde_json::json;
        let opts = InstallOptions {
            namespace: "vpn".into(),
            image: "reg/m:1".into(),
            service_type: "LoadBalancer".into(),
            shared_token: true,
        };
        let objs = objects(&opts).unwrap();
        let kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "ClusterRole",
                "ClusterRole",
                "ClusterRole",
                "ClusterRole",
                "Role",
                "Role",
                "Deployment",
                "ResourceQuota",
                "ServiceAccount",
                "DaemonSet",
                "Service",
                "Service"
            ]
        );
        for o in &objs {
            assert!(plural(o["kind"].as_str().unwrap()).is_some());
            let agents = o["kind"] == "DaemonSet"
                || o["kind"] == "ResourceQuota"
                || (o["kind"] == "ServiceAccount" && o["metadata"]["name"] == "tpvpn-agent");
            match o["kind"].as_str().unwrap() {
                "Namespace" => assert!(o["metadata"]["name"] == "vpn" || o["metadata"]["name"] == "vpn-agents"),
                "ClusterRole" if o["metadata"]["name"] == "tpvpn-manager" => {
                    assert!(o["metadata"].get("namespace").is_none());
                    // Least privilege: list and watch of what the manager reads, reviews
                    // (tokens, access), certificate requests, and signing only for its
                    // own signer; no write to anything else.
                    let rules = o["rules"].as_array().unwrap();
                    assert_eq!(rules[0]["verbs"], serde_json::json!(["list", "watch"]));
                    let writes: Vec<String> = rules
                        .iter()
                        .filter(|r| {
                            r["verbs"].as_array().unwrap().iter().any(|v| v != "list" && v != "watch" && v != "get")
                        })
                        .map(|r| format!("{} {}", r["resources"], r["verbs"]))
                        .collect();
                    assert_eq!(
                        writes,
                        [
                            r#"["tokenreviews"] ["create"]"#,
                            r#"["subjectaccessreviews"] ["create"]"#,
                            r#"["certificatesigningrequests/approval","certificatesigningrequests/status"] ["update"]"#,
                            r#"["signers"] ["approve","sign"]"#
                        ]
                    );
                    assert_eq!(rules[5]["resourceNames"], serde_json::json!(["tpvpn.dev/client"]));
                }
                "ClusterRole" => assert!(o["metadata"].get("namespace").is_none()),
                "ClusterRoleBinding" => assert_eq!(o["subjects"][0]["namespace"], "vpn"),
                "RoleBinding" => {
                    assert_eq!(o["metadata"]["namespace"], "vpn");
                    assert_eq!(o["subjects"][0]["namespace"], "vpn");
                }
                _ if o.get("subjects").is_some() => panic!("subjects added to {o}"),
                _ if agents => assert_eq!(o["metadata"]["namespace"], "vpn-agents"),
                _ => assert_eq!(o["metadata"]["namespace"], "vpn"),
            }
        }
        let dep = objs.iter().find(|o| o["kind"] == "Deployment").unwrap();
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "reg/m:1");
        assert!(c["readinessProbe"]["httpGet"]["path"] == "/readyz" && c["resources"]["limits"]["memory"].is_string());
        let ds = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let spec = &ds["spec"]["template"]["spec"];
        assert_eq!((spec["hostPID"].as_bool(), spec["hostNetwork"].as_bool()), (Some(true), Some(true)));
        let agent = &spec["containers"][0];
        assert_eq!(agent["image"], "reg/m:1");
        assert_eq!(agent["env"][0]["value"], "tpvpn-manager.vpn.svc:4443");
        // Its credential: a projected token of its own ServiceAccount, for the manager only.
        assert_eq!(spec["serviceAccountName"], "tpvpn-agent");
        assert_eq!(spec["automountServiceAccountToken"], false);
        let token = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "token").unwrap();
        let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(
            (projected["audience"].as_str(), projected["path"].as_str()),
            (Some("tpvpn.dev/manager"), Some("token"))
        );
        let dep_args = dep["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(!dep_args.contains("agent-token"), "no shared agent token: {dep_args}");
        // Only the agents' namespace admits privileged pods.
        let psa = |name: &str| {
            let ns = objs.iter().find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == name).unwrap();
            ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].clone()
        };
        assert_eq!((psa("vpn"), psa("vpn-agents")), (json!("restricted"), json!("privileged")));
        let svc = objs.iter().find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "tpvpn-manager").unwrap();
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local", "the clients' own addresses reach the manager");
        let ports: Vec<&str> =
            svc["spec"]["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(ports, ["quic", "tunnel"], "only the tunnel's ports are published: {svc}");
        // The client port-forwards to the pod port the Service's `tunnel` port targets.
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(svc.clone()).unwrap();
        let (selector, target) = crate::cluster::portforward::tunnel_target(&svc).expect("a tunnel target");
        assert_eq!(selector, "app.kubernetes.io/name=tpvpn-manager");
        let pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(serde_json::json!({"spec": dep["spec"]["template"]["spec"]})).unwrap();
        assert_eq!(crate::cluster::portforward::pod_port(&pod, &target), Some(4443));
        // Users of either kind of manager (certificates, or the shared token) port-forward.
        for name in ["tpvpn-user", "tpvpn-client"] {
            let role = objs.iter().find(|o| o["kind"] == "Role" && o["metadata"]["name"] == name).unwrap();
            let pf = role["rules"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["resources"] == serde_json::json!(["pods/portforward"]));
            assert_eq!(pf.map(|r| &r["verbs"]), Some(&serde_json::json!(["get", "create"])), "{role}");
        }
        // Without the shared token the manager gets no --token-file and no volume of it.
        let strict = objects(&InstallOptions { shared_token: false, ..opts.clone() }).unwrap();
        let pod = &strict.iter().find(|o| o["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
        let text = pod.to_string();
        assert!(!text.contains("--token-file") && !text.contains(CLIENT_SECRET), "{pod}");
        assert!(text.contains("--tls-cert") && text.contains("tpvpn-manager-tls"), "the rest stays: {pod}");
        assert!(dep.to_string().contains("--token-file"), "kept by default");
        let metrics = objs.iter().find(|o| o["metadata"]["name"] == "tpvpn-manager-metrics").unwrap();
        assert_eq!(metrics["spec"]["type"], "ClusterIP", "metrics stay inside the cluster");
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
