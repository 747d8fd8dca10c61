//! `strata import`: image archives into the layer store.
//!
//! Reads `docker save` archives of every era (Docker <= 24: `manifest.json`
//! and `ID/layer.tar`, maybe symlinked; Docker >= 25: an OCI layout plus
//! `manifest.json`), the containerd image store's export and podman's
//! docker-archive, and OCI image layouts as a directory or a tar (plain,
//! gzip or zstd). Everything is verified before it becomes visible: each
//! blob's size then sha256 against its descriptor, each layer's diff_id
//! (the sha256 of the whole decompressed stream) against the config, and
//! as many layers as diff_ids. A layer is extracted into the store's
//! `tmp/` and renamed into place only once whole and verified.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::digest::{HashReader, LimitReader, Tally, sha256_hex, sha256_of, short};
use crate::extract::{self, remove_path};
use crate::store::{ImageRecord, LayerInfo, Store, human, normalise_name, now};
use crate::sys;
use crate::tarball::{Kind, TarReader};

/// The largest manifest, index or config accepted.
const MAX_JSON: u64 = 16 << 20;

pub struct ImportOptions {
    pub tag: Option<String>,
    /// `os/arch[/variant]`; the host's when None.
    pub platform: Option<String>,
    /// The most bytes one layer may decompress to.
    pub max_layer_bytes: u64,
}

/// What an import did, for the closing line.
#[derive(Debug, Default)]
pub struct ImportReport {
    pub layers: usize,
    pub extracted: usize,
    pub reused: usize,
    pub bytes_extracted: u64,
    pub bytes_saved: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(text: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform { os: os.to_string(), arch: arch.to_string(), variant: None })
            }
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform { os: os.to_string(), arch: arch.to_string(), variant: Some(variant.to_string()) })
            }
            _ => Err(format!("bad platform {text:?}: expected os/arch[/variant], as linux/arm64/v8")),
        }
    }

    /// The machine we run on, in OCI's words.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform { os: "linux".into(), arch: arch.into(), variant: None }
    }

    /// Whether an image for `other` serves a request for `self` (a request
    /// without a variant takes any).
    fn accepts(&self, other: &Platform) -> bool {
        self.os == other.os && self.arch == other.arch && (self.variant.is_none() || self.variant == other.variant)
    }

    fn from_json(value: &serde_json::Value) -> Option<Platform> {
        Some(Platform {
            os: value.get("os")?.as_str()?.to_string(),
            arch: value.get("architecture")?.as_str()?.to_string(),
            variant: value.get("variant").and_then(|v| v.as_str()).filter(|v| !v.is_empty()).map(str::to_string),
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

// ----- the archive: a directory or a tar, read by member name ---------------

enum Archive {
    Dir { root: OwnedFd },
    Tar { file: File, members: HashMap<String, (u64, u64)> },
}

/// A member name as written in manifests: `./a//b` is `a/b`.
fn member_key(name: &str) -> String {
    name.split('/').filter(|p| !p.is_empty() && *p != ".").collect::<Vec<_>>().join("/")
}

/// Resolve `..` lexically inside the archive; None when it climbs out.
fn lexical_join(base: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = if target.starts_with('/') { Vec::new() } else { base.split('/').collect() };
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

fn sniff(magic: &[u8]) -> Result<Compression, String> {
    if magic.starts_with(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Compression::Zstd)
    } else if magic.starts_with(b"BZh") || magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err("bzip2 and xz compression are not supported (OCI uses gzip or zstd)".into())
    } else {
        Ok(Compression::None)
    }
}

fn compression_of_media_type(media_type: &str) -> Option<Compression> {
    if media_type.ends_with("gzip") {
        Some(Compression::Gzip)
    } else if media_type.ends_with("zstd") {
        Some(Compression::Zstd)
    } else if media_type.ends_with(".tar") || media_type.ends_with("diff.tar") {
        Some(Compression::None)
    } else {
        None
    }
}

fn decoder<'r>(compression: Compression, input: impl BufRead + 'r) -> io::Result<Box<dyn Read + 'r>> {
    Ok(match compression {
        Compression::None => Box::new(input),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::Decoder::with_buffer(input)?),
    })
}

impl Archive {
    /// Open `path`; a compressed tar is first decompressed into the store's
    /// `tmp/` (returned, for removal).
    fn open(path: &Path, store: &Store, limit: u64) -> Result<(Archive, Option<PathBuf>), String> {
        let meta = std::fs::metadata(path).map_err(|err| format!("{}: {err}", path.display()))?;
        if meta.is_dir() {
            let root = File::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
            return Ok((Archive::Dir { root: root.into() }, None));
        }
        let mut file = File::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
        let mut magic = [0u8; 6];
        let got = file.read(&mut magic).map_err(|err| format!("{}: {err}", path.display()))?;
        file.seek(SeekFrom::Start(0)).map_err(|err| err.to_string())?;
        let compression = sniff(&magic[..got])?;
        if compression == Compression::None {
            return Ok((Archive::index_tar(file)?, None));
        }
        let temp = store.temp_dir("archive")?;
        let plain_path = temp.join("archive.tar");
        let mut plain = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&plain_path)
            .map_err(|err| format!("{}: {err}", plain_path.display()))?;
        let copied = decoder(compression, BufReader::new(file))
            .and_then(|d| io::copy(&mut LimitReader::new(d, limit), &mut plain));
        if let Err(err) = copied {
            let _ = remove_path(&temp);
            return Err(format!("cannot decompress {}: {err}", path.display()));
        }
        plain.seek(SeekFrom::Start(0)).map_err(|err| err.to_string())?;
        match Archive::index_tar(plain) {
            Ok(archive) => Ok((archive, Some(temp))),
            Err(err) => {
                let _ = remove_path(&temp);
                Err(err)
            }
        }
    }

    /// One pass over the tar: where each file's data is. Symlinks and hard
    /// links between members (Docker <= 24 links duplicate layers) are
    /// resolved inside the archive.
    fn index_tar(file: File) -> Result<Archive, String> {
        let mut members = HashMap::new();
        let mut links: HashMap<String, String> = HashMap::new();
        {
            let mut reader = TarReader::new(BufReader::with_capacity(1 << 16, &file));
            while let Some(header) = reader.next().map_err(|err| format!("reading the archive: {err}"))? {
                let name = member_key(&String::from_utf8_lossy(&header.name));
                let link = String::from_utf8_lossy(&header.link).into_owned();
                match header.kind {
                    Kind::File => {
                        members.insert(name, (reader.offset(), header.size));
                    }
                    Kind::Symlink => {
                        let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                        if let Some(target) = lexical_join(dir, &link) {
                            links.insert(name, target);
                        }
                    }
                    Kind::HardLink => {
                        links.insert(name, member_key(&link));
                    }
                    _ => {}
                }
            }
        }
        let mut resolved = Vec::new();
        for (name, first) in &links {
            let mut target = first.clone();
            for _ in 0..16 {
                if let Some(member) = members.get(&target) {
                    resolved.push((name.clone(), *member));
                    break;
                }
                match links.get(&target) {
                    Some(next) => target = next.clone(),
                    None => break,
                }
            }
        }
        members.extend(resolved);
        Ok(Archive::Tar { file, members })
    }

    fn exists(&self, name: &str) -> bool {
        match self {
            Archive::Dir { root } => {
                sys::open_in_root(root.as_fd(), Path::new(&member_key(name)), libc::O_PATH).is_ok()
            }
            Archive::Tar { members, .. } => members.contains_key(&member_key(name)),
        }
    }

    /// A member's data and its size.
    fn member(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), String> {
        let key = member_key(name);
        match self {
            Archive::Dir { root } => {
                let fd = sys::open_in_root(root.as_fd(), Path::new(&key), libc::O_RDONLY)
                    .map_err(|err| format!("{key}: {}", err.desc()))?;
                let file = File::from(fd);
                let meta = file.metadata().map_err(|err| format!("{key}: {err}"))?;
                if !meta.is_file() {
                    return Err(format!("{key} is not a regular file"));
                }
                Ok((Box::new(file), meta.len()))
            }
            Archive::Tar { file, members } => {
                let (offset, size) = *members.get(&key).ok_or_else(|| format!("{key} is not in the archive"))?;
                Ok((Box::new(PositionedReader { file, offset, left: size }), size))
            }
        }
    }

    /// A small member, whole, checked against its descriptor when there is one.
    fn read_verified(&self, name: &str, digest: Option<&str>, size: Option<u64>) -> Result<Vec<u8>, String> {
        let (reader, actual) = self.member(name)?;
        if let Some(size) = size
            && size != actual
        {
            return Err(format!("blob {name} is {actual} bytes but its descriptor says {size}"));
        }
        if actual > MAX_JSON {
            return Err(format!("{name} is {actual} bytes, too large for a manifest or config"));
        }
        let mut data = Vec::new();
        reader.take(MAX_JSON).read_to_end(&mut data).map_err(|err| format!("{name}: {err}"))?;
        if data.len() as u64 != actual {
            return Err(format!("{name} is truncated"));
        }
        if let Some(digest) = digest {
            let got = sha256_of(&data);
            if got != digest {
                return Err(format!(
                    "blob {name}: sha256 mismatch: its descriptor says {digest}, the content is {got}"
                ));
            }
        }
        Ok(data)
    }
}

/// Reads `left` bytes of a file from `offset`, with pread (the archive's
/// file offset is shared by nothing).
struct PositionedReader<'f> {
    file: &'f File,
    offset: u64,
    left: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..want], self.offset)?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "archive member is truncated"));
        }
        self.offset += got as u64;
        self.left -= got as u64;
        Ok(got)
    }
}

// ----- what to import ----------------------------------------------------

#[derive(Clone, Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<serde_json::Value>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

impl Descriptor {
    fn blob_path(&self) -> Result<String, String> {
        let hex =
            sha256_hex(&self.digest).ok_or_else(|| format!("unsupported or malformed digest {:?}", self.digest))?;
        Ok(format!("blobs/sha256/{hex}"))
    }

    fn blob(&self) -> Result<Blob, String> {
        Ok(Blob {
            path: self.blob_path()?,
            digest: Some(self.digest.clone()),
            size: Some(self.size),
            media_type: self.media_type.clone(),
        })
    }
}

/// A blob to read: where, and what it must be when known.
#[derive(Clone, Debug)]
struct Blob {
    path: String,
    digest: Option<String>,
    size: Option<u64>,
    media_type: Option<String>,
}

/// One image found in the archive.
struct Plan {
    names: Vec<String>,
    manifest_digest: Option<String>,
    config: Blob,
    layers: Vec<Blob>,
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// A digest implied by a member name (`blobs/sha256/HEX`, `HEX.json`).
fn digest_from_name(name: &str) -> Option<String> {
    let key = member_key(name);
    let hex = if let Some(hex) = key.strip_prefix("blobs/sha256/") {
        hex
    } else {
        key.strip_suffix(".json").filter(|h| !h.contains('/'))?
    };
    let digest = format!("sha256:{hex}");
    sha256_hex(&digest).is_some().then_some(digest)
}

fn parse_json<T: for<'de> Deserialize<'de>>(data: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(data).map_err(|err| format!("{what} is not valid: {err}"))
}

const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

/// Every image manifest under a descriptor, with its platform when said.
fn manifests_under(
    archive: &Archive,
    desc: &Descriptor,
    depth: usize,
    out: &mut Vec<(Descriptor, Option<Platform>)>,
) -> Result<(), String> {
    if depth > 4 {
        return Err("image indexes nest too deeply".into());
    }
    let platform = desc.platform.as_ref().and_then(Platform::from_json);
    let is_index = desc.media_type.as_deref().is_some_and(|t| INDEX_TYPES.contains(&t));
    if !is_index && desc.media_type.is_some() {
        out.push((desc.clone(), platform));
        return Ok(());
    }
    let path = desc.blob_path()?;
    if !archive.exists(&path) {
        // containerd exports only the platforms it has.
        if desc.media_type.is_some() {
            out.push((desc.clone(), platform));
        }
        return Ok(());
    }
    let data = archive.read_verified(&path, Some(&desc.digest), Some(desc.size))?;
    let value: serde_json::Value = parse_json(&data, &path)?;
    let media_type = value.get("mediaType").and_then(|t| t.as_str()).map(str::to_string);
    let nested = value.get("manifests").is_some() || media_type.as_deref().is_some_and(|t| INDEX_TYPES.contains(&t));
    if !nested {
        out.push((desc.clone(), platform));
        return Ok(());
    }
    let manifests: Vec<Descriptor> =
        serde_json::from_value(value.get("manifests").cloned().unwrap_or_default()).map_err(|e| e.to_string())?;
    for child in &manifests {
        manifests_under(archive, child, depth + 1, out)?;
    }
    Ok(())
}

fn choose_platform(
    candidates: Vec<(Descriptor, Option<Platform>)>,
    wanted: Option<&Platform>,
) -> Result<Descriptor, String> {
    // Attestations and other artefacts say "unknown/unknown".
    let candidates: Vec<_> =
        candidates.into_iter().filter(|(_, p)| p.as_ref().is_none_or(|p| p.os != "unknown")).collect();
    if let ([(only, _)], None) = (candidates.as_slice(), wanted) {
        return Ok(only.clone());
    }
    let want = wanted.cloned().unwrap_or_else(Platform::host);
    let mut best = None;
    for (desc, platform) in &candidates {
        match platform {
            Some(p) if want.accepts(p) => {
                best = Some(desc.clone());
                break;
            }
            None if candidates.len() == 1 => best = Some(desc.clone()),
            _ => {}
        }
    }
    best.ok_or_else(|| {
        let available: Vec<String> =
            candidates.iter().map(|(_, p)| p.as_ref().map(|p| p.to_string()).unwrap_or("?".into())).collect();
        format!(
            "no image for platform {want} in the archive (it has: {}); choose with --platform",
            available.join(", ")
        )
    })
}

/// The images of an OCI layout (also Docker >= 25 and containerd exports).
fn oci_plans(archive: &Archive, wanted: Option<&Platform>) -> Result<Vec<Plan>, String> {
    let index = archive.read_verified("index.json", None, None)?;
    let index: serde_json::Value = parse_json(&index, "index.json")?;
    let top: Vec<Descriptor> = serde_json::from_value(index.get("manifests").cloned().unwrap_or_default())
        .map_err(|err| format!("index.json: {err}"))?;
    // Docker's manifest.json (beside the layout) has the names.
    let mut repo_tags: HashMap<String, Vec<String>> = HashMap::new();
    if archive.exists("manifest.json") {
        let data = archive.read_verified("manifest.json", None, None)?;
        let entries: Vec<DockerManifestEntry> = parse_json(&data, "manifest.json")?;
        for entry in entries {
            if let Some(digest) = digest_from_name(&entry.config) {
                repo_tags.entry(digest).or_default().extend(entry.repo_tags.unwrap_or_default());
            }
        }
    }
    let mut plans = Vec::new();
    for desc in &top {
        let mut candidates = Vec::new();
        manifests_under(archive, desc, 0, &mut candidates)?;
        if candidates.is_empty() {
            continue;
        }
        let chosen = choose_platform(candidates, wanted)?;
        let path = chosen.blob_path()?;
        let data = archive.read_verified(&path, Some(&chosen.digest), Some(chosen.size))?;
        let manifest: serde_json::Value = parse_json(&data, &path)?;
        let config: Descriptor = serde_json::from_value(manifest.get("config").cloned().unwrap_or_default())
            .map_err(|err| format!("manifest {path}: config: {err}"))?;
        let layers: Vec<Descriptor> = serde_json::from_value(manifest.get("layers").cloned().unwrap_or_default())
            .map_err(|err| format!("manifest {path}: layers: {err}"))?;
        let mut names = Vec::new();
        if let Some(annotations) = &desc.annotations {
            if let Some(name) = annotations.get("io.containerd.image.name") {
                names.push(normalise_name(name));
            } else if let Some(name) = annotations.get("org.opencontainers.image.ref.name") {
                // A full reference (Docker, skopeo); a bare tag names nothing.
                if name.contains('/') || name.contains(':') {
                    names.push(normalise_name(name));
                }
            }
        }
        for tag in repo_tags.get(&config.digest).into_iter().flatten() {
            let tag = normalise_name(tag);
            if !names.contains(&tag) {
                names.push(tag);
            }
        }
        plans.push(Plan {
            names,
            manifest_digest: Some(chosen.digest.clone()),
            config: config.blob()?,
            layers: layers.iter().map(Descriptor::blob).collect::<Result<_, _>>()?,
        });
    }
    Ok(plans)
}

/// The images of a Docker <= 24 or podman archive: manifest.json only.
fn docker_plans(archive: &Archive) -> Result<Vec<Plan>, String> {
    let data = archive.read_verified("manifest.json", None, None)?;
    let entries: Vec<DockerManifestEntry> = parse_json(&data, "manifest.json")?;
    Ok(entries
        .into_iter()
        .map(|entry| Plan {
            names: entry.repo_tags.unwrap_or_default().iter().map(|t| normalise_name(t)).collect(),
            manifest_digest: None,
            config: Blob { digest: digest_from_name(&entry.config), path: entry.config, size: None, media_type: None },
            layers: entry
                .layers
                .into_iter()
                .map(|path| Blob {
                    digest: member_key(&path).starts_with("blobs/").then(|| digest_from_name(&path)).flatten(),
                    path,
                    size: None,
                    media_type: None,
                })
                .collect(),
        })
        .collect())
}

// ----- the import ----------------------------------------------------------

/// `strata import PATH`: every image in the archive (one, usually).
pub fn import(store: &Store, path: &Path, options: &ImportOptions) -> Result<Vec<ImportReport>, String> {
    let wanted = options.platform.as_deref().map(Platform::parse).transpose()?;
    let _lock = store.lock_shared()?;
    let (archive, temp) = Archive::open(path, store, options.max_layer_bytes)?;
    let result = import_archive(store, &archive, path, wanted.as_ref(), options);
    drop(archive);
    if let Some(temp) = temp {
        let _ = remove_path(&temp);
    }
    result
}

fn import_archive(
    store: &Store,
    archive: &Archive,
    path: &Path,
    wanted: Option<&Platform>,
    options: &ImportOptions,
) -> Result<Vec<ImportReport>, String> {
    let (format, plans) = if archive.exists("index.json") {
        let format = if archive.exists("manifest.json") {
            "a docker save archive holding an OCI layout"
        } else {
            "an OCI image layout"
        };
        (format, oci_plans(archive, wanted)?)
    } else if archive.exists("manifest.json") {
        ("a docker save archive", docker_plans(archive)?)
    } else {
        return Err(format!(
            "{} is neither an OCI layout (index.json) nor a docker save archive (manifest.json)",
            path.display()
        ));
    };
    if plans.is_empty() {
        return Err(format!("{} holds no image", path.display()));
    }
    if options.tag.is_some() && plans.len() > 1 {
        return Err(format!("--tag names one image, but {} holds {}", path.display(), plans.len()));
    }
    println!("Importing {}: {format}", path.display());
    let mut reports = Vec::new();
    for mut plan in plans {
        if let Some(tag) = &options.tag {
            plan.names = vec![normalise_name(tag)];
        }
        reports.push(import_image(store, archive, plan, wanted, options)?);
    }
    Ok(reports)
}

fn import_image(
    store: &Store,
    archive: &Archive,
    plan: Plan,
    wanted: Option<&Platform>,
    options: &ImportOptions,
) -> Result<ImportReport, String> {
    let config_bytes = archive.read_verified(&plan.config.path, plan.config.digest.as_deref(), plan.config.size)?;
    let id = sha256_of(&config_bytes);
    let config: serde_json::Value = parse_json(&config_bytes, &format!("config {}", plan.config.path))?;
    let platform = Platform::from_json(&config);
    if let (Some(want), Some(have)) = (wanted, &platform)
        && !want.accepts(have)
    {
        return Err(format!("the image is for {have}, not {want}"));
    }
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .ok_or_else(|| format!("config {} has no rootfs.diff_ids", plan.config.path))?;
    if diff_ids.len() != plan.layers.len() {
        return Err(format!(
            "the manifest lists {} layers but the config has {} diff_ids",
            plan.layers.len(),
            diff_ids.len()
        ));
    }
    for diff_id in &diff_ids {
        sha256_hex(diff_id).ok_or_else(|| format!("config: diff_id {diff_id:?} is not a sha256 digest"))?;
    }
    let display_name = plan.names.first().cloned().unwrap_or_else(|| format!("image {}", short(&id)));
    println!("{display_name} ({}):", platform.as_ref().map(|p| p.to_string()).unwrap_or("unknown platform".into()));
    let mut report = ImportReport { layers: diff_ids.len(), ..Default::default() };
    let count = diff_ids.len();
    for (index, (blob, diff_id)) in plan.layers.iter().zip(&diff_ids).enumerate() {
        let label = format!("  layer {}/{count} {}", index + 1, short(diff_id));
        if let Some(info) = store.layer_info(diff_id) {
            println!("{label}  reused     {:>9}  {:>6} entries", human(info.size), info.entries);
            report.reused += 1;
            report.bytes_saved += info.size;
            continue;
        }
        let (info, fresh) = import_layer(store, archive, blob, diff_id, options, &label)
            .map_err(|err| format!("layer {}/{count} ({}): {err}", index + 1, blob.path))?;
        if fresh {
            println!("{label}  extracted  {:>9}  {:>6} entries", human(info.size), info.entries);
            report.extracted += 1;
            report.bytes_extracted += info.size;
        } else {
            println!("{label}  reused     {:>9}  (imported meanwhile by another strata)", human(info.size));
            report.reused += 1;
            report.bytes_saved += info.size;
        }
    }
    let record = ImageRecord {
        id: id.clone(),
        names: plan.names,
        manifest_digest: plan.manifest_digest,
        diff_ids,
        platform: platform.map(|p| p.to_string()).unwrap_or_default(),
        config,
        imported: now(),
    };
    for message in store.add_image(record)? {
        println!("  {message}");
    }
    println!(
        "Imported {display_name} as {}: {} layers, {} extracted ({}), {} reused ({} not extracted again)",
        short(&id),
        report.layers,
        report.extracted,
        human(report.bytes_extracted),
        report.reused,
        human(report.bytes_saved)
    );
    Ok(report)
}

fn progress_bar(size: u64, label: &str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(size);
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}

/// Extract one layer blob into the store, verified. Returns its info and
/// whether it was put in place by us (false: a concurrent import won).
fn import_layer(
    store: &Store,
    archive: &Archive,
    blob: &Blob,
    diff_id: &str,
    options: &ImportOptions,
    label: &str,
) -> Result<(LayerInfo, bool), String> {
    let (reader, size) = archive.member(&blob.path)?;
    if let Some(expected) = blob.size
        && expected != size
    {
        return Err(format!("blob {} is {size} bytes but its descriptor says {expected}", blob.path));
    }
    let temp = store.temp_dir("layer")?;
    let bar = progress_bar(size, label);
    let result = extract_verified(reader, size, &temp, blob, diff_id, options, &bar);
    bar.finish_and_clear();
    match result {
        Ok(info) => {
            let fresh = store.commit_layer(&temp, diff_id)?;
            Ok((info, fresh))
        }
        Err(err) => {
            let _ = remove_path(&temp);
            Err(err)
        }
    }
}

fn extract_verified(
    reader: Box<dyn Read + '_>,
    size: u64,
    temp: &Path,
    blob: &Blob,
    diff_id: &str,
    options: &ImportOptions,
    bar: &ProgressBar,
) -> Result<LayerInfo, String> {
    let root_path = temp.join("root");
    std::fs::create_dir(&root_path).map_err(|err| format!("{}: {err}", root_path.display()))?;
    // The mount's root is the top layer's: 0755 whatever our umask (a
    // `./` member may set it otherwise).
    std::fs::set_permissions(&root_path, std::fs::Permissions::from_mode(0o755))
        .map_err(|err| format!("{}: {err}", root_path.display()))?;
    let root = File::open(&root_path).map_err(|err| format!("{}: {err}", root_path.display()))?;
    let mut blob_tally = Tally::default();
    let mut diff_tally = Tally::default();
    let stats = {
        let raw = HashReader::new(bar.wrap_read(reader), &mut blob_tally);
        let mut buffered = BufReader::with_capacity(1 << 16, raw);
        let magic = buffered.fill_buf().map_err(|err| format!("reading blob {}: {err}", blob.path))?;
        let compression = sniff(magic)?;
        if let Some(said) = blob.media_type.as_deref().and_then(compression_of_media_type)
            && said != compression
        {
            log::info!(
                "blob {} has media type {} but its bytes say {compression:?}; going by the bytes",
                blob.path,
                blob.media_type.as_deref().unwrap_or("")
            );
        }
        let decoded = decoder(compression, buffered).map_err(|err| format!("blob {}: {err}", blob.path))?;
        let limited = LimitReader::new(decoded, options.max_layer_bytes);
        let mut tar = TarReader::new(HashReader::new(limited, &mut diff_tally));
        let stats = extract::extract(&mut tar, root.as_fd()).map_err(|err| err.to_string())?;
        // Bytes after the end-of-archive marker are part of the diff_id.
        io::copy(&mut tar.into_inner(), &mut io::sink())
            .map_err(|err| format!("reading the end of blob {}: {err}", blob.path))?;
        stats
    };
    if blob_tally.bytes != size {
        return Err(format!("blob {} is {size} bytes but only {} could be read", blob.path, blob_tally.bytes));
    }
    let got = blob_tally.digest();
    if let Some(expected) = &blob.digest
        && &got != expected
    {
        return Err(format!(
            "blob {}: sha256 mismatch: its descriptor says {expected}, the content is {got}",
            blob.path
        ));
    }
    let got_diff = diff_tally.digest();
    if got_diff != diff_id {
        return Err(format!(
            "blob {}: diff_id mismatch: the config says {diff_id}, the uncompressed layer is {got_diff}",
            blob.path
        ));
    }
    for warning in &stats.warnings {
        eprintln!("strata: layer {}: {warning}", short(diff_id));
    }
    let info = LayerInfo {
        diff_id: diff_id.to_string(),
        size: stats.bytes,
        entries: stats.entries,
        blob_digest: Some(got),
        media_type: blob.media_type.clone(),
    };
    let text = serde_json::to_vec_pretty(&info).map_err(|err| err.to_string())?;
    std::fs::write(temp.join("layer.json"), text).map_err(|err| format!("cannot write layer.json: {err}"))?;
    sys::syncfs(root.as_fd()).map_err(|err| format!("syncfs: {err}"))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let want = Platform::parse("linux/arm64").unwrap();
        assert!(want.accepts(&Platform::parse("linux/arm64/v8").unwrap()));
        assert!(!Platform::parse("linux/arm/v7").unwrap().accepts(&Platform::parse("linux/arm/v6").unwrap()));
        assert!(Platform::parse("linux").is_err());
    }

    #[test]
    fn archive_paths_stay_inside() {
        assert_eq!(lexical_join("abc", "../def/layer.tar").as_deref(), Some("def/layer.tar"));
        assert_eq!(lexical_join("", "../../etc/passwd"), None);
        assert_eq!(member_key("./blobs//sha256/x"), "blobs/sha256/x");
        assert_eq!(digest_from_name("blobs/sha256/../x"), None);
    }
}
