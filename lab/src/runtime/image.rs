//! OCI images made from this machine's Debian packages, without a registry: one
//! uncompressed layer holding the files a pod needs (a binary with the shared libraries
//! `ldd` names, busybox-static for a shell), written as an OCI image-layout archive that
//! `ctr images import` takes. Every timestamp is 0, so the same files give the same digest.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

/// What an image is made of.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// The name `ctr` and the CRI know it by (`lab.local/web:1`).
    pub name: String,
    /// Image `ENV`, merged by the runtime before the container's own environment.
    pub env: Vec<String>,
    /// Image `CMD`.
    pub cmd: Vec<String>,
    /// Host executables copied in at the same path, with the shared libraries they load.
    pub binaries: Vec<PathBuf>,
    /// Files written at a path: (path, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// Empty directories.
    pub dirs: Vec<String>,
}

/// One entry of the layer.
enum Entry {
    Dir,
    File(Vec<u8>, u32),
    Symlink(String),
}

/// The busybox applets every lab image links (a shell and the tools tests exec in pods).
const APPLETS: &[&str] = &[
    "sh", "sleep", "cat", "ls", "env", "ps", "kill", "hostname", "mkdir", "rm", "echo", "wget", "readlink", "stat",
    "id",
];

/// Writes the OCI archive of `spec` to `out`; returns the manifest's digest.
pub fn write(spec: &ImageSpec, out: &Path) -> Result<String> {
    let layer = layer(spec)?;
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut blob = |data: Vec<u8>, media: &str| {
        let digest = format!("sha256:{}", hex(ring::digest::digest(&ring::digest::SHA256, &data).as_ref()));
        let desc = json!({"mediaType": media, "digest": digest, "size": data.len()});
        blobs.push((digest, data));
        desc
    };
    let layer_desc = blob(layer, "application/vnd.oci.image.layer.v1.tar");
    let config = json!({
        "architecture": arch(), "os": "linux",
        "config": {"Env": spec.env, "Cmd": spec.cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "history": [{"created_by": "tpvpn-lab"}],
    });
    let config_desc = blob(serde_json::to_vec(&config)?, "application/vnd.oci.image.config.v1+json");
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc, "layers": [layer_desc]});
    let mut manifest_desc = blob(serde_json::to_vec(&manifest)?, "application/vnd.oci.image.manifest.v1+json");
    let tag = spec.name.rsplit_once(':').map_or("latest", |(_, t)| t);
    manifest_desc["annotations"] =
        json!({"io.containerd.image.name": spec.name, "org.opencontainers.image.ref.name": tag});
    manifest_desc["platform"] = json!({"architecture": arch(), "os": "linux"});
    let digest = manifest_desc["digest"].as_str().unwrap_or_default().to_string();
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc]});

    let mut entries = BTreeMap::new();
    entries.insert("oci-layout".to_string(), Entry::File(br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(), 0o644));
    entries.insert("index.json".to_string(), Entry::File(serde_json::to_vec(&index)?, 0o644));
    for (d, data) in blobs {
        entries.insert(format!("blobs/sha256/{}", d.trim_start_matches("sha256:")), Entry::File(data, 0o644));
    }
    fs::write(out, tar(&entries)?).with_context(|| format!("writing {}", out.display()))?;
    Ok(digest)
}

/// The image's one layer: directories, busybox, the binaries with their libraries, files.
fn layer(spec: &ImageSpec) -> Result<Vec<u8>> {
    let mut entries = BTreeMap::new();
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "var", "usr", "usr/sbin", "usr/bin"]
        .iter()
        .map(|d| d.to_string())
        .chain(spec.dirs.iter().cloned())
    {
        add_parents(&mut entries, &d);
        entries.insert(d, Entry::Dir);
    }
    entries.insert("bin/busybox".into(), Entry::File(read("/bin/busybox", "busybox-static")?, 0o755));
    for a in APPLETS {
        entries.insert(format!("bin/{a}"), Entry::Symlink("busybox".into()));
    }
    for bin in &spec.binaries {
        for file in std::iter::once(bin.clone()).chain(libraries(bin)?) {
            let path = file.to_string_lossy().trim_start_matches('/').to_string();
            add_parents(&mut entries, &path);
            let data = read(&file.to_string_lossy(), "the host")?;
            entries.insert(path, Entry::File(data, 0o755));
        }
    }
    for (path, data) in &spec.files {
        let path = path.trim_start_matches('/').to_string();
        add_parents(&mut entries, &path);
        entries.insert(path, Entry::File(data.clone(), 0o644));
    }
    tar(&entries)
}

fn add_parents(entries: &mut BTreeMap<String, Entry>, path: &str) {
    let mut p = Path::new(path).parent();
    while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
        entries.entry(dir.to_string_lossy().into_owned()).or_insert(Entry::Dir);
        p = dir.parent();
    }
}

fn read(path: &str, from: &str) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {path} (from {from}) for a lab image"))
}

/// The shared libraries `bin` loads, as `ldd` names them (the loader included).
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {} failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// The absolute paths in `ldd` output (`libc.so.6 => /lib/…/libc.so.6 (0x…)`, or the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x…)`).
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once("=>").map_or(l, |(_, p)| p.trim());
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// An uncompressed tar of `entries` (sorted by path: parents before children).
fn tar(entries: &BTreeMap<String, Entry>) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, entry) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match entry {
            Entry::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(if path == "tmp" { 0o1777 } else { 0o755 });
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::File(data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "x86_64" => "amd64",
        other => other,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\tlibgone.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            vec![PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }

    #[test]
    fn a_layer_has_parents_before_children_and_the_same_bytes_every_time() {
        let spec = ImageSpec {
            name: "lab.local/t:1".into(),
            files: vec![("etc/deep/a.conf".into(), b"x".to_vec())],
            ..ImageSpec::default()
        };
        let (a, b) = (layer(&spec).unwrap(), layer(&spec).unwrap());
        assert_eq!(a, b);
        let mut ar = tar::Archive::new(a.as_slice());
        let names: Vec<String> =
            ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        let pos = |n: &str| names.iter().position(|x| x.trim_end_matches('/') == n).unwrap();
        assert!(pos("etc") < pos("etc/deep") && pos("etc/deep") < pos("etc/deep/a.conf"), "{names:?}");
        assert!(names.iter().any(|n| n == "bin/sh"));
    }
}
