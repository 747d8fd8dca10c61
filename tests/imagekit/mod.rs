//! Builders for test images: layer tarballs (with the `tar` crate, or raw
//! headers for the hostile ones), compressed blobs, configs and manifests,
//! written in each archive shape Strata imports; and an independent
//! application of layers to a plain directory, the reference a mount is
//! compared with.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

pub fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

// ---------------------------------------------------------------------------
// Layer tarballs
// ---------------------------------------------------------------------------

/// A layer tarball under construction (GNU headers: long names work).
pub struct LayerTar {
    b: tar::Builder<Vec<u8>>,
}

const MTIME: u64 = 1_700_000_000;

impl Default for LayerTar {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerTar {
    pub fn new() -> Self {
        LayerTar { b: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.b.append_data(&mut h, path, std::io::empty()).expect("dir");
        self
    }

    pub fn file(self, path: &str, content: impl AsRef<[u8]>, mode: u32) -> Self {
        self.file_owned(path, content, mode, 0, 0)
    }

    pub fn file_owned(mut self, path: &str, content: impl AsRef<[u8]>, mode: u32, uid: u64, gid: u64) -> Self {
        let content = content.as_ref();
        let mut h = Self::header(tar::EntryType::Regular, mode, content.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_data(&mut h, path, content).expect("file");
        self
    }

    /// A file with PAX `SCHILY.xattr.*` records.
    pub fn file_xattrs(mut self, path: &str, content: &[u8], xattrs: &[(&str, &[u8])]) -> Self {
        let records: Vec<(String, &[u8])> = xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
        self.b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v))).expect("pax");
        self.file(path, content, 0o644)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target).expect("symlink");
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, path, target).expect("hardlink");
        self
    }

    pub fn fifo(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Fifo, 0o644, 0);
        self.b.append_data(&mut h, path, std::io::empty()).expect("fifo");
        self
    }

    /// A char device (0/0 is the kernel's whiteout form).
    pub fn chardev(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o600, 0);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        self.b.append_data(&mut h, path, std::io::empty()).expect("chardev");
        self
    }

    /// OCI whiteout of `path`: `.wh.NAME` beside it.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').map(|(d, n)| (format!("{d}/"), n)).unwrap_or((String::new(), path));
        self.file(&format!("{dir}.wh.{name}"), b"", 0o644)
    }

    /// OCI opaque marker in `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// Raw bytes appended as they are (for hostile tarballs).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.b.get_mut().extend_from_slice(bytes);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().expect("finish tar")
    }

    /// The bytes without the end-of-archive blocks (to append raw members).
    pub fn unfinished(mut self) -> Vec<u8> {
        std::mem::take(self.b.get_mut())
    }
}

/// A raw ustar header with any name (`..` included) and a valid checksum.
pub fn raw_header(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(format!("{MTIME:011o}\0").as_bytes());
    h[156] = typeflag;
    h[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    fix_checksum(&mut h);
    h
}

pub fn fix_checksum(h: &mut [u8]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A raw member: header plus data padded to 512 bytes.
pub fn raw_member(name: &[u8], typeflag: u8, data: &[u8], link: &[u8]) -> Vec<u8> {
    let mut out = raw_header(name, typeflag, data.len() as u64, link);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A PAX header member carrying `records`.
pub fn raw_pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        let body_len = key.len() + value.len() + 3; // ' ' '=' '\n'
        let mut len = body_len + 1;
        while len.to_string().len() + body_len != len {
            len = len.to_string().len() + body_len;
        }
        data.extend_from_slice(format!("{len} {key}=").as_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    raw_member(b"PaxHeader", b'x', &data, b"")
}

/// The two zero blocks that end an archive.
pub fn end_of_archive() -> Vec<u8> {
    vec![0u8; 1024]
}

// ---------------------------------------------------------------------------
// Blobs and images
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub fn compress(data: &[u8], comp: Comp) -> Vec<u8> {
    match comp {
        Comp::None => data.to_vec(),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).expect("gzip");
            e.finish().expect("gzip")
        }
        Comp::Zstd => zstd::encode_all(data, 3).expect("zstd"),
    }
}

/// One layer: its tarball (for the reference) and its blob.
#[derive(Clone)]
pub struct ImageLayer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub diff_id: String,
    pub media_type: String,
}

impl ImageLayer {
    pub fn new(tar: Vec<u8>, comp: Comp) -> Self {
        let media_type = match comp {
            Comp::None => "application/vnd.oci.image.layer.v1.tar",
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        ImageLayer { diff_id: sha256(&tar), blob: compress(&tar, comp), tar, media_type: media_type.into() }
    }

    pub fn digest(&self) -> String {
        sha256(&self.blob)
    }
}

/// An image to write: a name, layers bottom first, and (for hostile cases)
/// ways to lie in its descriptors.
#[derive(Clone)]
pub struct Image {
    pub name: String,
    pub layers: Vec<ImageLayer>,
    pub history: Vec<String>,
    pub arch: String,
    /// Replaces the config's diff_ids when set.
    pub diff_ids_override: Option<Vec<String>>,
    /// Added to every layer descriptor's size.
    pub size_skew: i64,
    /// Replaces the first layer descriptor's digest.
    pub digest_override: Option<String>,
}

pub fn host_arch() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64".into(),
        "aarch64" => "arm64".into(),
        other => other.into(),
    }
}

impl Image {
    pub fn new(name: &str, layers: Vec<ImageLayer>) -> Self {
        let history = (1..=layers.len()).map(|i| format!("RUN step {i}")).collect();
        Image {
            name: name.into(),
            layers,
            history,
            arch: host_arch(),
            diff_ids_override: None,
            size_skew: 0,
            digest_override: None,
        }
    }

    pub fn config(&self) -> Vec<u8> {
        let diff_ids: Vec<String> =
            self.diff_ids_override.clone().unwrap_or_else(|| self.layers.iter().map(|l| l.diff_id.clone()).collect());
        let mut history: Vec<serde_json::Value> =
            self.history.iter().map(|h| serde_json::json!({ "created_by": h })).collect();
        history.insert(0, serde_json::json!({ "created_by": "LABEL empty", "empty_layer": true }));
        serde_json::to_vec(&serde_json::json!({
            "architecture": self.arch,
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": { "Env": ["PATH=/usr/bin"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        }))
        .expect("config")
    }

    pub fn manifest(&self) -> Vec<u8> {
        let config = self.config();
        let layers: Vec<serde_json::Value> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let digest =
                    if i == 0 { self.digest_override.clone().unwrap_or_else(|| l.digest()) } else { l.digest() };
                serde_json::json!({
                    "mediaType": l.media_type,
                    "digest": digest,
                    "size": (l.blob.len() as i64 + self.size_skew),
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(&config),
                "size": config.len(),
            },
            "layers": layers,
        }))
        .expect("manifest")
    }

    fn manifest_descriptor(&self, annotations: serde_json::Value) -> serde_json::Value {
        let manifest = self.manifest();
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest),
            "size": manifest.len(),
            "platform": { "os": "linux", "architecture": self.arch },
            "annotations": annotations,
        })
    }
}

/// Files of an archive, by path; written as a directory or a tar.
#[derive(Default)]
pub struct Files {
    pub files: BTreeMap<String, Vec<u8>>,
    /// path -> symlink target
    pub symlinks: BTreeMap<String, String>,
}

impl Files {
    pub fn add(&mut self, path: &str, data: Vec<u8>) {
        self.files.insert(path.to_string(), data);
    }

    pub fn blob(&mut self, data: &[u8]) {
        self.add(&format!("blobs/sha256/{}", hex(&sha256(data))), data.to_vec());
    }

    pub fn write_dir(&self, dir: &Path) {
        fs::create_dir_all(dir).expect("mkdir");
        for (path, data) in &self.files {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, data).expect("write");
        }
        for (path, target) in &self.symlinks {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::os::unix::fs::symlink(target, &p).expect("symlink");
        }
    }

    pub fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dirs = std::collections::BTreeSet::new();
        for path in self.files.keys().chain(self.symlinks.keys()) {
            let mut p = Path::new(path).parent();
            while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
                dirs.insert(d.to_path_buf());
                p = d.parent();
            }
        }
        for d in dirs {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, format!("{}/", d.display()), std::io::empty()).expect("dir");
        }
        for (path, data) in &self.files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, &data[..]).expect("file");
        }
        for (path, target) in &self.symlinks {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, path, target).expect("symlink");
        }
        b.into_inner().expect("tar")
    }

    pub fn write_tar(&self, path: &Path) {
        fs::write(path, self.tar()).expect("write tar");
    }
}

/// An OCI image layout; with `docker_manifest`, also Docker >= 25's
/// manifest.json beside it (the shape of `docker save` since 25).
pub fn oci_layout(images: &[Image], docker_manifest: bool) -> Files {
    let mut files = Files::default();
    files.add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec());
    let mut manifests = Vec::new();
    let mut docker = Vec::new();
    for image in images {
        for layer in &image.layers {
            files.blob(&layer.blob);
        }
        files.blob(&image.config());
        files.blob(&image.manifest());
        let full = format!("docker.io/library/{}", image.name);
        manifests.push(image.manifest_descriptor(serde_json::json!({
            "io.containerd.image.name": full,
            "org.opencontainers.image.ref.name": image.name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest"),
        })));
        docker.push(serde_json::json!({
            "Config": format!("blobs/sha256/{}", hex(&sha256(&image.config()))),
            "RepoTags": [image.name],
            "Layers": image.layers.iter().map(|l| format!("blobs/sha256/{}", hex(&l.digest()))).collect::<Vec<_>>(),
        }));
    }
    files.add(
        "index.json",
        serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "manifests": manifests })).expect("index"),
    );
    if docker_manifest {
        files.add("manifest.json", serde_json::to_vec(&docker).expect("manifest.json"));
    }
    files
}

/// Docker <= 24's `docker save`: manifest.json, CONFIGHEX.json and
/// ID/layer.tar (uncompressed); a layer already written for an earlier
/// image is a symlink to it, as Docker does for duplicates.
pub fn docker_legacy(images: &[Image]) -> Files {
    let mut files = Files::default();
    let mut written: BTreeMap<String, String> = BTreeMap::new();
    let mut manifest = Vec::new();
    for (n, image) in images.iter().enumerate() {
        let config = image.config();
        let config_name = format!("{}.json", hex(&sha256(&config)));
        files.add(&config_name, config);
        let mut layer_paths = Vec::new();
        for (i, layer) in image.layers.iter().enumerate() {
            let id = hex(&sha256(format!("{n}-{i}-{}", layer.diff_id).as_bytes())).to_string();
            let path = format!("{id}/layer.tar");
            match written.get(&layer.diff_id) {
                Some(first) => {
                    files.symlinks.insert(path.clone(), format!("../{first}"));
                }
                None => {
                    files.add(&path, layer.tar.clone());
                    files.add(&format!("{id}/VERSION"), b"1.0".to_vec());
                    written.insert(layer.diff_id.clone(), path.clone());
                }
            }
            layer_paths.push(path);
        }
        manifest.push(serde_json::json!({ "Config": config_name, "RepoTags": [image.name], "Layers": layer_paths }));
    }
    files.add("manifest.json", serde_json::to_vec(&manifest).expect("manifest"));
    files
}

/// The containerd image store's export: index.json names an image index
/// (manifest list) for two platforms; only this machine's blobs are there.
pub fn containerd_export(image: &Image) -> Files {
    let mut files = Files::default();
    files.add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec());
    for layer in &image.layers {
        files.blob(&layer.blob);
    }
    files.blob(&image.config());
    files.blob(&image.manifest());
    let mine = image.manifest_descriptor(serde_json::json!({}));
    let other_arch = if image.arch == "arm64" { "amd64" } else { "arm64" };
    let other = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha256(b"the other platform's manifest, not exported"),
        "size": 1234,
        "platform": { "os": "linux", "architecture": other_arch },
    });
    let attestation = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha256(b"an attestation"),
        "size": 99,
        "platform": { "os": "unknown", "architecture": "unknown" },
    });
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [other, mine, attestation],
    }))
    .expect("index");
    files.blob(&index);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": sha256(&index),
            "size": index.len(),
            "annotations": { "io.containerd.image.name": format!("docker.io/library/{}", image.name) },
        }],
    });
    files.add("index.json", serde_json::to_vec(&top).expect("index.json"));
    files
}

// ---------------------------------------------------------------------------
// The reference: layers applied with std::fs, independently of Strata
// ---------------------------------------------------------------------------

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).expect("rm -r"),
        Ok(_) => fs::remove_file(p).expect("rm"),
        Err(_) => {}
    }
}

/// Apply layer tarballs (bottom first) to `root` the way the OCI image
/// spec describes: `.wh.NAME` deletes NAME, `.wh..wh..opq` empties its
/// directory, a char device 0/0 (an overlay upper exported as is) deletes
/// too; anything else is created, replacing what was there.
pub fn apply_layers(root: &Path, tars: &[&[u8]]) {
    fs::create_dir_all(root).expect("mkdir root");
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod root");
    for tar_bytes in tars {
        // A layer's whiteouts hide what the layers below hold, never what
        // the layer itself holds: apply them all first.
        apply_one(root, tar_bytes, true);
        apply_one(root, tar_bytes, false);
    }
}

fn apply_one(root: &Path, tar_bytes: &[u8], whiteouts: bool) {
    {
        let mut archive = tar::Archive::new(tar_bytes);
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").into_owned();
            let rel: PathBuf = path.components().filter(|c| matches!(c, std::path::Component::Normal(_))).collect();
            let target = root.join(&rel);
            let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let header = entry.header().clone();
            let kind = header.entry_type();
            let is_device_whiteout = kind == tar::EntryType::Char && header.device_major().ok().flatten() == Some(0);
            let is_whiteout = name.starts_with(".wh.") || is_device_whiteout;
            if is_whiteout != whiteouts {
                continue;
            }
            if name == ".wh..wh..opq" {
                let dir = target.parent().expect("parent");
                fs::create_dir_all(dir).expect("mkdir");
                for child in fs::read_dir(dir).expect("read_dir") {
                    remove_any(&child.expect("child").path());
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                remove_any(&target.parent().expect("parent").join(hidden));
                continue;
            }
            if is_device_whiteout {
                remove_any(&target);
                continue;
            }
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).expect("mkdir parents");
            }
            let is_dir = kind == tar::EntryType::Directory;
            if !(is_dir && target.is_dir() && !target.is_symlink()) {
                remove_any(&target);
            }
            let mode = header.mode().expect("mode");
            match kind {
                tar::EntryType::Directory => fs::create_dir_all(&target).expect("mkdir"),
                tar::EntryType::Regular => {
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).expect("read");
                    fs::write(&target, data).expect("write");
                }
                tar::EntryType::Symlink => {
                    let link = header.link_name().expect("link").expect("link");
                    std::os::unix::fs::symlink(link, &target).expect("symlink");
                }
                tar::EntryType::Link => {
                    let link = header.link_name().expect("link").expect("link");
                    fs::hard_link(root.join(link), &target).expect("hard link");
                    continue;
                }
                tar::EntryType::Fifo => {
                    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).expect("c");
                    // SAFETY: a valid C string.
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
                }
                other => panic!("reference: unexpected type {other:?}"),
            }
            if let Ok(Some(pax)) = entry.pax_extensions() {
                for ext in pax {
                    let ext = ext.expect("pax");
                    let key = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr."));
                    if let Some(key) = key.filter(|k| k.starts_with("user.") && !k.contains(".overlay.")) {
                        crate::common::lsetxattr(&target, key, ext.value_bytes()).expect("setxattr");
                    }
                }
            }
            let uid = header.uid().expect("uid") as u32;
            let gid = header.gid().expect("gid") as u32;
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).expect("chown");
            if kind != tar::EntryType::Symlink {
                fs::set_permissions(&target, fs::Permissions::from_mode(mode)).expect("chmod");
            }
        }
    }
}
