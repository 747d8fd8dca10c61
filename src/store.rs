//! The layer store: extracted layers shared by every image that uses them,
//! and the images' metadata beside them.
//!
//! ```text
//! STORE/lock                      flock: shared while importing, exclusive for rmi and prune
//! STORE/meta.lock                 flock: held while image records change
//! STORE/layers/HEX/root/          a layer, extracted (HEX: its diff_id)
//! STORE/layers/HEX/layer.json     its size, entry count, ...
//! STORE/images/HEX.json           an image (HEX: its config digest, the image id)
//! STORE/tmp/                      imports in progress; renamed into place when whole
//! STORE/ephemeral/ID/{upper,work} upper layers of `mount --ephemeral`
//! ```
//!
//! A layer appears under `layers/` only by a rename of a complete, verified
//! extraction, so a crash or a bad blob never leaves half a layer visible.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::daemon::MountRecord;
use crate::digest::{sha256_hex, short};
use crate::extract::remove_path;
use crate::sys::{self, Errno};

/// What the store keeps about one extracted layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerInfo {
    pub diff_id: String,
    /// Bytes of regular file data.
    pub size: u64,
    /// Members extracted (files, directories, links, whiteouts).
    pub entries: u64,
    /// The digest of the blob it came from (compressed or not).
    pub blob_digest: Option<String>,
    pub media_type: Option<String>,
}

/// One image: its id is the digest of its config, like Docker's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: String,
    /// `name:tag` references, normalised (see [`normalise_name`]).
    pub names: Vec<String>,
    pub manifest_digest: Option<String>,
    /// The layers' diff_ids, bottom first.
    pub diff_ids: Vec<String>,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// The image config, as imported (history, env, entrypoint, ...).
    pub config: serde_json::Value,
    /// When it was imported (seconds since the epoch).
    pub imported: u64,
}

pub struct Store {
    pub root: PathBuf,
}

/// A held flock; released when dropped.
pub struct StoreLock {
    _file: File,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Docker's short form of a reference: `docker.io/library/alpine` is
/// `alpine`, a missing tag is `latest`, a digest suffix is dropped.
pub fn normalise_name(reference: &str) -> String {
    let reference = reference.split('@').next().unwrap_or(reference);
    let reference = reference
        .strip_prefix("docker.io/library/")
        .or_else(|| reference.strip_prefix("docker.io/"))
        .or_else(|| reference.strip_prefix("index.docker.io/library/"))
        .unwrap_or(reference);
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') { reference.to_string() } else { format!("{reference}:latest") }
}

impl Store {
    /// `/var/lib/strata` for root, `$XDG_DATA_HOME/strata` (or
    /// `~/.local/share/strata`) for anyone else.
    pub fn default_dir() -> PathBuf {
        if sys::geteuid() == 0 {
            return PathBuf::from("/var/lib/strata");
        }
        if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("strata");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
        home.join(".local/share/strata")
    }

    /// Open (creating if needed) the store at `dir` or the default place.
    pub fn open(dir: Option<&Path>) -> Result<Store, String> {
        let root = dir.map(Path::to_owned).unwrap_or_else(Self::default_dir);
        for sub in ["layers", "images", "tmp", "ephemeral"] {
            fs::create_dir_all(root.join(sub))
                .map_err(|err| format!("cannot create the store {}: {err}", root.join(sub).display()))?;
        }
        let root = fs::canonicalize(&root).map_err(|err| format!("store {}: {err}", root.display()))?;
        Ok(Store { root })
    }

    fn lock_file(&self, name: &str, exclusive: bool) -> Result<StoreLock, String> {
        let path = self.root.join(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|err| format!("cannot open {}: {err}", path.display()))?;
        if sys::flock(file.as_fd(), exclusive, false) == Err(Errno::EWOULDBLOCK) {
            eprintln!("strata: waiting for another strata process using the store {}", self.root.display());
            sys::flock(file.as_fd(), exclusive, true)
                .map_err(|err| format!("cannot lock {}: {err}", path.display()))?;
        }
        Ok(StoreLock { _file: file })
    }

    /// Held by an import for its whole run: imports run side by side.
    pub fn lock_shared(&self) -> Result<StoreLock, String> {
        self.lock_file("lock", false)
    }

    /// Held by rmi and prune: no import is half done meanwhile.
    pub fn lock_exclusive(&self) -> Result<StoreLock, String> {
        self.lock_file("lock", true)
    }

    /// Held while image records change.
    pub fn lock_meta(&self) -> Result<StoreLock, String> {
        self.lock_file("meta.lock", true)
    }

    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, String> {
        let hex = sha256_hex(diff_id).ok_or_else(|| format!("{diff_id:?} is not a sha256 digest"))?;
        Ok(self.root.join("layers").join(hex))
    }

    /// The directory a mount uses as this layer.
    pub fn layer_root(&self, diff_id: &str) -> Result<PathBuf, String> {
        Ok(self.layer_dir(diff_id)?.join("root"))
    }

    pub fn layer_info(&self, diff_id: &str) -> Option<LayerInfo> {
        let text = fs::read(self.layer_dir(diff_id).ok()?.join("layer.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// A fresh directory under `tmp/`.
    pub fn temp_dir(&self, what: &str) -> Result<PathBuf, String> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        for attempt in 0..100u32 {
            let path = self.root.join("tmp").join(format!("{what}-{}-{nanos}-{attempt}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(path),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(format!("cannot create {}: {err}", path.display())),
            }
        }
        Err("cannot create a temporary directory in the store".into())
    }

    /// Move a complete layer (a temp dir holding `root/` and `layer.json`)
    /// into place. False when another import put the same layer there
    /// first: ours is removed and theirs is used.
    pub fn commit_layer(&self, temp: &Path, diff_id: &str) -> Result<bool, String> {
        let target = self.layer_dir(diff_id)?;
        let layers = File::open(self.root.join("layers")).map_err(|err| format!("store: {err}"))?;
        let tmp = File::open(temp.parent().unwrap_or(temp)).map_err(|err| format!("store: {err}"))?;
        let temp_name = temp.file_name().unwrap_or_default();
        let target_name = target.file_name().unwrap_or_default();
        match sys::renameat2(tmp.as_fd(), temp_name, layers.as_fd(), target_name, libc::RENAME_NOREPLACE) {
            Ok(()) => {
                let _ = sys::syncfs(layers.as_fd());
                Ok(true)
            }
            Err(Errno::EEXIST | Errno::ENOTEMPTY) => {
                let _ = remove_path(temp);
                Ok(false)
            }
            Err(err) => Err(format!("cannot move the layer into {}: {err}", target.display())),
        }
    }

    pub fn images(&self) -> Vec<ImageRecord> {
        let mut images = Vec::new();
        let Ok(dir) = fs::read_dir(self.root.join("images")) else { return images };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_slice::<ImageRecord>(&t).map_err(|e| e.to_string()))
                {
                    Ok(record) => images.push(record),
                    Err(err) => log::warn!("skipping {}: {err}", path.display()),
                }
            }
        }
        images.sort_by(|a, b| a.names.first().cmp(&b.names.first()).then(a.id.cmp(&b.id)));
        images
    }

    /// Write a record atomically (temp file, fsync, rename). Call with the
    /// meta lock held.
    pub fn save_image(&self, record: &ImageRecord) -> Result<(), String> {
        let hex = sha256_hex(&record.id).ok_or_else(|| format!("bad image id {}", record.id))?;
        let path = self.root.join("images").join(format!("{hex}.json"));
        let temp = self.root.join("images").join(format!(".{hex}.json.{}", std::process::id()));
        let text = serde_json::to_vec_pretty(record).map_err(|err| err.to_string())?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = File::create(&temp)?;
            file.write_all(&text)?;
            file.sync_all()?;
            fs::rename(&temp, &path)
        };
        write().map_err(|err| format!("cannot write {}: {err}", path.display()))
    }

    fn delete_image_record(&self, id: &str) -> Result<(), String> {
        let hex = sha256_hex(id).ok_or_else(|| format!("bad image id {id}"))?;
        let path = self.root.join("images").join(format!("{hex}.json"));
        fs::remove_file(&path).map_err(|err| format!("cannot remove {}: {err}", path.display()))
    }

    /// Find an image by `name[:tag]`, by id (`sha256:HEX` or a prefix of at
    /// least 4 hex digits).
    pub fn find_image(&self, reference: &str) -> Result<ImageRecord, String> {
        let images = self.images();
        let name = normalise_name(reference);
        if let Some(image) = images.iter().find(|i| i.names.contains(&name)) {
            return Ok(image.clone());
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hex = hex.to_ascii_lowercase();
            let matches: Vec<&ImageRecord> =
                images.iter().filter(|i| i.id.trim_start_matches("sha256:").starts_with(&hex)).collect();
            match matches.len() {
                1 => return Ok(matches[0].clone()),
                0 => {}
                _ => return Err(format!("{reference} matches {} images; give more of the id", matches.len())),
            }
        }
        Err(format!("no image {reference} in the store {} (see `strata images`)", self.root.display()))
    }

    /// Record an imported image: names taken by it are removed from any
    /// other image (as `docker load` does); an image already there keeps
    /// its other names.
    pub fn add_image(&self, mut record: ImageRecord) -> Result<Vec<String>, String> {
        let _meta = self.lock_meta()?;
        let mut messages = Vec::new();
        for mut other in self.images() {
            if other.id == record.id {
                for name in other.names {
                    if !record.names.contains(&name) {
                        record.names.push(name);
                    }
                }
                continue;
            }
            let before = other.names.len();
            other.names.retain(|n| !record.names.contains(n));
            if other.names.len() != before {
                messages.push(format!("the name moved from image {} to the new one", short(&other.id)));
                self.save_image(&other)?;
            }
        }
        record.names.sort();
        self.save_image(&record)?;
        Ok(messages)
    }

    /// The layer directories that live mounts use (their daemons run).
    fn layers_in_use(&self) -> BTreeSet<PathBuf> {
        MountRecord::live().into_iter().flat_map(|r| r.lowers).collect()
    }

    /// `strata rmi`: a name of an image that has others is only removed
    /// (untagged); otherwise the image goes, with every layer no other image
    /// uses. Refused while a mount uses the image.
    pub fn remove_image(&self, reference: &str) -> Result<Vec<String>, String> {
        let _lock = self.lock_exclusive()?;
        let _meta = self.lock_meta()?;
        let mut image = self.find_image(reference)?;
        let name = normalise_name(reference);
        let mut messages = Vec::new();
        if image.names.contains(&name) && image.names.len() > 1 {
            image.names.retain(|n| *n != name);
            self.save_image(&image)?;
            messages.push(format!("Untagged: {name}"));
            return Ok(messages);
        }
        let in_use = self.layers_in_use();
        for diff_id in &image.diff_ids {
            let root = self.layer_root(diff_id)?;
            if in_use.contains(&root) {
                return Err(format!(
                    "image {} is in use by a mount (layer {}); unmount it first",
                    reference,
                    short(diff_id)
                ));
            }
        }
        self.delete_image_record(&image.id)?;
        for name in &image.names {
            messages.push(format!("Untagged: {name}"));
        }
        messages.push(format!("Deleted: {}", image.id));
        let (removed, _) = self.remove_unused_layers()?;
        messages.extend(removed);
        Ok(messages)
    }

    /// Remove every layer that no image references and no mount uses.
    fn remove_unused_layers(&self) -> Result<(Vec<String>, u64), String> {
        let referenced: BTreeSet<String> = self.images().into_iter().flat_map(|i| i.diff_ids).collect();
        let in_use = self.layers_in_use();
        let mut messages = Vec::new();
        let mut freed = 0;
        let dir = fs::read_dir(self.root.join("layers")).map_err(|err| format!("store: {err}"))?;
        for entry in dir.flatten() {
            let diff_id = format!("sha256:{}", entry.file_name().to_string_lossy());
            if referenced.contains(&diff_id) || in_use.contains(&entry.path().join("root")) {
                continue;
            }
            let size = self.layer_info(&diff_id).map(|i| i.size).unwrap_or(0);
            remove_path(&entry.path()).map_err(|err| format!("cannot remove {}: {err}", entry.path().display()))?;
            freed += size;
            messages.push(format!("Deleted layer: {diff_id}"));
        }
        Ok((messages, freed))
    }

    /// `strata prune`: leftovers of interrupted imports, upper layers of
    /// ephemeral mounts that are gone, layers no image uses.
    pub fn prune(&self) -> Result<(Vec<String>, u64), String> {
        let _lock = self.lock_exclusive()?;
        let mut messages = Vec::new();
        // The exclusive lock means no import is running: all of tmp/ is stale.
        for entry in fs::read_dir(self.root.join("tmp")).map_err(|err| format!("store: {err}"))?.flatten() {
            remove_path(&entry.path()).map_err(|err| format!("cannot remove {}: {err}", entry.path().display()))?;
            messages.push(format!("Deleted leftover: {}", entry.path().display()));
        }
        let live: Vec<MountRecord> = MountRecord::live();
        for entry in fs::read_dir(self.root.join("ephemeral")).map_err(|err| format!("store: {err}"))?.flatten() {
            let path = entry.path();
            if live.iter().any(|r| r.upper.as_ref().is_some_and(|u| u.starts_with(&path))) {
                continue;
            }
            remove_path(&path).map_err(|err| format!("cannot remove {}: {err}", path.display()))?;
            messages.push(format!("Deleted ephemeral upper: {}", path.display()));
        }
        let _meta = self.lock_meta()?;
        let (removed, freed) = self.remove_unused_layers()?;
        messages.extend(removed);
        Ok((messages, freed))
    }

    /// A fresh `ephemeral/ID` directory with `upper/` and `work/` inside.
    pub fn ephemeral_dir(&self) -> Result<PathBuf, String> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = self.root.join("ephemeral").join(format!("{}-{nanos}", std::process::id()));
        for sub in ["upper", "work"] {
            fs::create_dir_all(dir.join(sub)).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        }
        Ok(dir)
    }
}

/// Bytes in a human unit, as `docker images` shows sizes (powers of 1000).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_like_docker() {
        assert_eq!(normalise_name("docker.io/library/alpine:3.19"), "alpine:3.19");
        assert_eq!(normalise_name("alpine"), "alpine:latest");
        assert_eq!(normalise_name("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(normalise_name("quay.io/x/y:1@sha256:abcd"), "quay.io/x/y:1");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(7_400_000), "7.4 MB");
    }
}
