//! Pod volumes laid out on the node as the kubelet lays them out (a stand-in for the
//! kubelet's volume manager), under `PODDIR/volumes/kubernetes.io~KIND/NAME`, and
//! bind-mounted into the containers at their `mountPath`:
//! - configMap, Secret and projected volumes through the kubelet's **atomic writer**: the
//!   files in a timestamped directory `..2026_12_07_04_40_00.NNNNNNNNN`, a symlink
//!   `..data` to it, and each key a symlink `KEY -> ..data/KEY`; an update writes a new
//!   directory and swaps `..data` with one rename, so a reader sees the old set or the
//!   new, never a mix;
//! - Secret and projected volumes on their own tmpfs (never on the node's disk);
//! - emptyDir a plain directory.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// A volume's source.
#[derive(Debug, Clone)]
pub enum Source {
    ConfigMap {
        name: String,
        items: Vec<(String, String)>,
    },
    Secret {
        name: String,
        items: Vec<(String, String)>,
    },
    /// The ServiceAccount token, the API's CA and the namespace (`kube-api-access-…`).
    ServiceAccountToken {
        token: String,
        ca: String,
        namespace: String,
    },
    EmptyDir,
}

/// One volume of a pod and where the app container mounts it.
#[derive(Debug, Clone)]
pub struct Volume {
    pub name: String,
    pub source: Source,
    pub mount_path: String,
    pub read_only: bool,
}

impl Volume {
    fn kind(&self) -> &'static str {
        match self.source {
            Source::ConfigMap { .. } => "kubernetes.io~configmap",
            Source::Secret { .. } => "kubernetes.io~secret",
            Source::ServiceAccountToken { .. } => "kubernetes.io~projected",
            Source::EmptyDir => "kubernetes.io~empty-dir",
        }
    }

    /// Where the kubelet keeps it on the node, under the pod's directory.
    pub fn host_dir(&self, pod_dir: &Path) -> PathBuf {
        pod_dir.join("volumes").join(self.kind()).join(&self.name)
    }

    /// The Pod spec's `volumes[]` entry.
    pub fn spec(&self) -> Value {
        match &self.source {
            Source::ConfigMap { name, .. } => json!({"name": self.name, "configMap": {"name": name}}),
            Source::Secret { name, .. } => json!({"name": self.name, "secret": {"secretName": name}}),
            Source::ServiceAccountToken { .. } => json!({"name": self.name, "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}),
            Source::EmptyDir => json!({"name": self.name, "emptyDir": {}}),
        }
    }

    /// The container's `volumeMounts[]` entry.
    pub fn mount_spec(&self) -> Value {
        json!({"name": self.name, "mountPath": self.mount_path, "readOnly": self.read_only})
    }

    /// The files the atomic writer puts in it (none for an emptyDir).
    fn files(&self) -> Vec<(String, String)> {
        match &self.source {
            Source::ConfigMap { items, .. } | Source::Secret { items, .. } => items.clone(),
            Source::ServiceAccountToken { token, ca, namespace } => vec![
                ("token".into(), token.clone()),
                ("ca.crt".into(), ca.clone()),
                ("namespace".into(), namespace.clone()),
            ],
            Source::EmptyDir => Vec::new(),
        }
    }

    /// Lays it out under `pod_dir` (a tmpfs mounted first for Secret and projected
    /// volumes); returns the directory to bind-mount into the container.
    pub fn set_up(&self, pod_dir: &Path) -> Result<PathBuf> {
        let dir = self.host_dir(pod_dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if matches!(self.source, Source::Secret { .. } | Source::ServiceAccountToken { .. }) {
            nix::mount::mount(
                Some("tmpfs"),
                &dir,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some("size=1m,mode=0755"),
            )
            .with_context(|| format!("mounting a tmpfs on {}", dir.display()))?;
        }
        if !matches!(self.source, Source::EmptyDir) {
            atomic_write(&dir, &self.files())?;
        }
        Ok(dir)
    }
}

/// The kubelet's atomic writer: `files` into a new timestamped directory of `dir`, then
/// `..data` swapped to it with one rename, a `KEY -> ..data/KEY` symlink for each key
/// (keys no longer present lose theirs), and the previous directory removed.
pub fn atomic_write(dir: &Path, files: &[(String, String)]) -> Result<()> {
    let stamp = crate::apiserver::rfc3339_now().replace(['-', 'T', ':'], "_").replace('Z', "");
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let name = format!("..{stamp}.{nanos:09}");
    let new = dir.join(&name);
    fs::create_dir(&new).with_context(|| format!("creating {}", new.display()))?;
    for (key, value) in files {
        fs::write(new.join(key), value)?;
    }
    let old = fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(&name, &tmp)?;
    fs::rename(&tmp, dir.join("..data"))?;
    for (key, _) in files {
        let link = dir.join(key);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(key), &link)?;
        }
    }
    if let Some(old) = old.filter(|o| o != Path::new(&name)) {
        for entry in fs::read_dir(dir.join(&old))?.flatten() {
            let key = entry.file_name();
            if !files.iter().any(|(k, _)| Path::new(k) == Path::new(&key)) {
                let _ = fs::remove_file(dir.join(&key));
            }
        }
        fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_atomic_writer_swaps_data_and_keeps_relative_links() {
        let dir = std::env::temp_dir().join(format!("tpvpn-volumes-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        atomic_write(&dir, &[kv("a.conf", "one"), kv("gone", "x")]).unwrap();
        let first = fs::read_link(dir.join("..data")).unwrap();
        assert_eq!(fs::read_link(dir.join("a.conf")).unwrap(), Path::new("..data/a.conf"));
        assert_eq!(fs::read_to_string(dir.join("a.conf")).unwrap(), "one");
        atomic_write(&dir, &[kv("a.conf", "two")]).unwrap();
        assert_ne!(fs::read_link(dir.join("..data")).unwrap(), first, "a new timestamped directory");
        assert_eq!(fs::read_to_string(dir.join("a.conf")).unwrap(), "two");
        assert!(!dir.join(&first).exists() && fs::symlink_metadata(dir.join("gone")).is_err());
        let names: Vec<String> =
            fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 3, "..data, its directory and a.conf: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
