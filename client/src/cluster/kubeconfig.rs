//! Kubeconfig resolution as kubectl does it, and tpvpn's cluster extension.
//!
//! Files: `--kubeconfig`, else every file of `KUBECONFIG` (colon-separated, missing
//! ones skipped, merged with the first definition of a name winning), else
//! `~/.kube/config` (under sudo, the invoking user's when root has none). Context:
//! `--context`, else `current-context`.
//!
//! Cluster extension `tpvpn` (keys `never-proxy`, `also-proxy`, `manager-address`,
//! `dns.include-suffixes`, `dns.exclude-suffixes`); the `never-proxy` and `also-proxy`
//! keys of a `telepresence.io` extension are honoured too.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use kube::config::{Kubeconfig, NamedExtension};

use crate::Error;

/// The tpvpn settings found in the context's cluster extensions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extension {
    pub never_proxy: Vec<IpNet>,
    pub also_proxy: Vec<IpNet>,
    pub manager_address: Option<String>,
    pub include_suffixes: Vec<String>,
    pub exclude_suffixes: Vec<String>,
}

/// A resolved kubeconfig context.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    pub context: String,
    pub cluster: String,
    /// The API server URL.
    pub server: String,
    /// The context's namespace, if any.
    pub namespace: Option<String>,
    pub extension: Extension,
    /// The merged kubeconfig, for building the client.
    pub kubeconfig: Kubeconfig,
}

fn files_text(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// The kubeconfig files kubectl would read.
pub fn files(flag: Option<&Path>) -> Vec<PathBuf> {
    if let Some(f) = flag {
        return vec![f.to_path_buf()];
    }
    if let Some(list) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        return std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()).collect();
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
    let own = home.join(".kube/config");
    if !own.exists() {
        // `sudo tpvpn up` keeps HOME=/root: use the invoking user's config instead.
        if let Some(user) = std::env::var_os("SUDO_USER") {
            let theirs = Path::new("/home").join(user).join(".kube/config");
            if theirs.exists() {
                return vec![theirs];
            }
        }
    }
    vec![own]
}

/// Reads and merges `files`, picks the context, and parses the tpvpn extension.
pub fn resolve(flag: Option<&Path>, context: Option<&str>) -> Result<Resolved, Error> {
    resolve_files(files(flag), flag.is_some(), context)
}

/// [`resolve`] over an explicit list of files (`explicit`: given with `--kubeconfig`).
pub fn resolve_files(files: Vec<PathBuf>, explicit: bool, context: Option<&str>) -> Result<Resolved, Error> {
    let mut read: Vec<(PathBuf, Kubeconfig)> = Vec::new();
    for f in &files {
        if !f.exists() && !explicit && files.len() > 1 {
            continue; // kubectl skips missing files of a KUBECONFIG list
        }
        let k = Kubeconfig::read_from(f).map_err(|e| {
            Error::Config(format!("cannot read kubeconfig {}: {e}; pass --kubeconfig or set KUBECONFIG", f.display()))
        })?;
        read.push((f.clone(), k));
    }
    let mut merged: Option<Kubeconfig> = None;
    for (f, k) in &read {
        merged = Some(match merged {
            None => k.clone(),
            Some(m) => m
                .merge(k.clone())
                .map_err(|e| Error::Config(format!("cannot merge kubeconfig {}: {e}", f.display())))?,
        });
    }
    let where_ = files_text(&files);
    let kubeconfig = merged.ok_or_else(|| Error::Config(format!("no kubeconfig found in {where_}")))?;
    let contexts: Vec<&str> = kubeconfig.contexts.iter().map(|c| c.name.as_str()).collect();
    let context_name = match context.or(kubeconfig.current_context.as_deref()) {
        Some(c) => c.to_string(),
        None => {
            return Err(Error::Config(format!(
                "no context given and no current-context in {where_}; pass --context (contexts: {})",
                contexts.join(", ")
            )))
        }
    };
    let ctx = kubeconfig.contexts.iter().find(|c| c.name == context_name).and_then(|c| c.context.clone()).ok_or_else(
        || Error::Config(format!("context `{context_name}` not found in {where_}; contexts: {}", contexts.join(", "))),
    )?;
    let named = kubeconfig.clusters.iter().find(|c| c.name == ctx.cluster).ok_or_else(|| {
        Error::Config(format!("context `{context_name}` names cluster `{}`, which is not in {where_}", ctx.cluster))
    })?;
    let cluster = named.cluster.clone().unwrap_or_default();
    let server = cluster
        .server
        .clone()
        .ok_or_else(|| Error::Config(format!("cluster `{}` in {where_} has no server", ctx.cluster)))?;
    // Name the file that defines the cluster in extension errors.
    let origin = read
        .iter()
        .find(|(_, k)| k.clusters.iter().any(|c| c.name == ctx.cluster))
        .map_or_else(|| where_.clone(), |(f, _)| f.display().to_string());
    let extension = parse_extensions(cluster.extensions.as_deref().unwrap_or(&[]))
        .map_err(|e| Error::Config(format!("kubeconfig {origin}, cluster `{}`: {e}", ctx.cluster)))?;
    Ok(Resolved {
        files,
        context: context_name,
        cluster: ctx.cluster.clone(),
        server,
        namespace: ctx.namespace.clone(),
        extension,
        kubeconfig,
    })
}

fn cidrs(v: &serde_json::Value, what: &str) -> Result<Vec<IpNet>, String> {
    match v {
        serde_json::Value::Null => Ok(vec![]),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| {
                let s = i.as_str().ok_or_else(|| format!("{what}: {i} is not a string"))?;
                s.parse::<IpNet>().map_err(|_| format!("{what}: `{s}` is not a CIDR"))
            })
            .collect(),
        other => Err(format!("{what}: expected a list of CIDRs, got {other}")),
    }
}

fn strings(v: &serde_json::Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        serde_json::Value::Null => Ok(vec![]),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(|s| s.trim_matches('.').to_ascii_lowercase())
                    .ok_or_else(|| format!("{what}: {i} is not a string"))
            })
            .collect(),
        other => Err(format!("{what}: expected a list of names, got {other}")),
    }
}

/// Parses the `tpvpn` and `telepresence.io` cluster extensions.
pub fn parse_extensions(exts: &[NamedExtension]) -> Result<Extension, String> {
    let mut out = Extension::default();
    for ext in exts {
        let v = &ext.extension;
        match ext.name.as_str() {
            "tpvpn" => {
                if !v.is_object() {
                    return Err(format!("extension tpvpn: expected a map, got {v}"));
                }
                out.never_proxy.extend(cidrs(&v["never-proxy"], "extension tpvpn: never-proxy")?);
                out.also_proxy.extend(cidrs(&v["also-proxy"], "extension tpvpn: also-proxy")?);
                match &v["manager-address"] {
                    serde_json::Value::Null => {}
                    serde_json::Value::String(s) => out.manager_address = Some(s.clone()),
                    other => return Err(format!("extension tpvpn: manager-address: expected HOST:PORT, got {other}")),
                }
                out.include_suffixes
                    .extend(strings(&v["dns"]["include-suffixes"], "extension tpvpn: dns.include-suffixes")?);
                out.exclude_suffixes
                    .extend(strings(&v["dns"]["exclude-suffixes"], "extension tpvpn: dns.exclude-suffixes")?);
            }
            "telepresence.io" => {
                out.never_proxy.extend(cidrs(&v["never-proxy"], "extension telepresence.io: never-proxy")?);
                out.also_proxy.extend(cidrs(&v["also-proxy"], "extension telepresence.io: also-proxy")?);
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
apiVersion: v1
kind: Config
current-context: kind-dev
clusters:
- name: dev
  cluster:
    server: https://127.0.0.1:6443
    extensions:
    - name: tpvpn
      extension:
        never-proxy: [10.96.0.48/28]
        also-proxy: ["192.0.2.0/24"]
        manager-address: 10.0.0.5:4443
        dns:
          include-suffixes: [corp.example.]
          exclude-suffixes: [Example.COM]
    - name: telepresence.io
      extension:
        never-proxy: [10.244.9.0/24]
- name: prod
  cluster:
    server: https://prod.example:6443
contexts:
- name: kind-dev
  context: {cluster: dev, user: u, namespace: shop}
- name: prod
  context: {cluster: prod, user: u}
users:
- name: u
  user: {token: abc}
"#;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn tmp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tpvpn-kcfg-{tag}-{}", std::process::id()))
    }

    #[test]
    fn current_context_and_extensions() {
        let dir = tmp("ext");
        let f = write(&dir, "config", CONFIG);
        let r = resolve(Some(&f), None).unwrap();
        assert_eq!((r.context.as_str(), r.cluster.as_str(), r.namespace.as_deref()), ("kind-dev", "dev", Some("shop")));
        assert_eq!(r.server, "https://127.0.0.1:6443");
        let e = r.extension;
        let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<IpNet>>();
        assert_eq!(e.never_proxy, nets(&["10.96.0.48/28", "10.244.9.0/24"]));
        assert_eq!(e.also_proxy, nets(&["192.0.2.0/24"]));
        assert_eq!(e.manager_address.as_deref(), Some("10.0.0.5:4443"));
        assert_eq!(e.include_suffixes, vec!["corp.example"]);
        assert_eq!(e.exclude_suffixes, vec!["example.com"]);
        let r = resolve(Some(&f), Some("prod")).unwrap();
        assert_eq!(r.extension, Extension::default());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_context_names_the_file_and_the_contexts() {
        let dir = tmp("ctx");
        let f = write(&dir, "config", CONFIG);
        let e = resolve(Some(&f), Some("minikube")).unwrap_err().to_string();
        assert!(e.contains("context `minikube` not found in") && e.contains(&f.display().to_string()), "{e}");
        assert!(e.contains("contexts: kind-dev, prod"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_extension_values_are_clear_errors() {
        let dir = tmp("bad");
        let f = write(&dir, "config", &CONFIG.replace("10.96.0.48/28", "10.96.0.48/33"));
        let e = resolve(Some(&f), None).unwrap_err().to_string();
        assert!(e.contains("never-proxy") && e.contains("10.96.0.48/33") && e.contains("cluster `dev`"), "{e}");
        let f = write(&dir, "config2", "clusters: [oops");
        let e = resolve(Some(&f), None).unwrap_err().to_string();
        assert!(e.contains("cannot read kubeconfig") && e.contains("config2"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_kubeconfig_list_merges_with_the_first_definition_winning() {
        let dir = tmp("merge");
        let first = write(&dir, "a", &CONFIG.replace("https://127.0.0.1:6443", "https://first:6443"));
        let second = write(
            &dir,
            "b",
            "clusters:\n- name: dev\n  cluster: {server: https://second:6443}\n- name: lab\n  cluster: {server: http://10.250.1.1:6443}\ncontexts:\n- name: lab\n  context: {cluster: lab, user: u}\ncurrent-context: lab\n",
        );
        let missing = dir.join("missing");
        let r = resolve_files(vec![missing, first.clone(), second.clone()], false, None).unwrap();
        assert_eq!((r.context.as_str(), r.server.as_str()), ("kind-dev", "https://first:6443"));
        let r = resolve_files(vec![first, second], false, Some("lab")).unwrap();
        assert_eq!(r.server, "http://10.250.1.1:6443");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn parse_extension_rejects_wrong_shapes() {
        let ext = |v: serde_json::Value| vec![NamedExtension { name: "tpvpn".into(), extension: v }];
        assert!(parse_extensions(&ext(serde_json::json!({"never-proxy": "10.0.0.0/8"}))).is_err());
        assert!(parse_extensions(&ext(serde_json::json!({"manager-address": 5}))).is_err());
        assert!(parse_extensions(&ext(serde_json::json!("x"))).is_err());
        assert_eq!(parse_extensions(&ext(serde_json::json!({}))).unwrap(), Extension::default());
    }
}
