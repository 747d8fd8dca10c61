//! The layer stack: an upper directory (optional, writable) over read-only
//! lower directories, and the rules that merge them into one tree.
//!
//! This module answers "what does name N in this merged directory resolve to"
//! and "what does this merged directory list", reading every whiteout and
//! opaque dialect in use (kernel overlayfs, rootless overlayfs, OCI layer
//! tarballs, fuse-overlayfs). It knows nothing about FUSE or inodes, so the
//! daemon, `strata diff` and `strata whence` share it.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Errno, Stat, SysResult, XattrTarget};

/// Index of a layer in the stack; 0 is the upper when the stack has one.
pub type LayerId = usize;

/// Prefix of OCI whiteout files (`.wh.NAME` hides NAME in lower layers).
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The OCI opaque marker file.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Which xattr namespace the overlay markers we write use: the kernel reads
/// `trusted.overlay.*` by default and `user.overlay.*` with `userxattr`
/// (rootless), because unprivileged processes cannot write `trusted.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrNamespace {
    Trusted,
    User,
}

impl XattrNamespace {
    pub fn overlay(self, key: &str) -> OsString {
        match self {
            XattrNamespace::Trusted => format!("trusted.overlay.{key}").into(),
            XattrNamespace::User => format!("user.overlay.{key}").into(),
        }
    }

    /// Strata's own attribute (the origin inode number of a copied-up entry).
    pub fn strata(self, key: &str) -> OsString {
        match self {
            XattrNamespace::Trusted => format!("trusted.strata.{key}").into(),
            XattrNamespace::User => format!("user.strata.{key}").into(),
        }
    }
}

/// Whether an xattr name belongs to the overlay machinery and must never be
/// shown through the mount, nor set through it.
pub fn is_private_xattr(name: &OsStr) -> bool {
    let name = name.as_bytes();
    [&b"trusted.overlay."[..], b"user.overlay.", b"user.fuseoverlayfs.", b"trusted.strata.", b"user.strata."]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// Whether a name is a whiteout or opaque marker in the OCI dialect.
pub fn is_whiteout_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WHITEOUT_PREFIX)
}

pub struct Layer {
    pub path: PathBuf,
    pub root: OwnedFd,
    pub dev: u64,
}

/// A directory's copy in one layer: the layer and the path inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub layer: LayerId,
    pub path: PathBuf,
}

/// What a name resolves to in a merged directory.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The stat of the visible (topmost) entry.
    pub stat: Stat,
    /// Where the visible entry lives.
    pub top: Source,
    /// For a directory: every copy that merges into it, topmost first
    /// (starting with `top`). Empty for anything else.
    pub dir_sources: Vec<Source>,
    /// The inode number the entry keeps for the life of the layers.
    pub ino: u64,
}

impl Resolved {
    pub fn is_dir(&self) -> bool {
        self.stat.st_mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// What one layer alone holds under a name, whiteouts read (for
/// `strata whence`).
#[derive(Clone, Debug)]
pub enum Presence {
    Missing,
    Whiteout,
    /// An entry; for a directory, whether it is opaque (hides lower copies).
    Entry {
        stat: Stat,
        opaque: bool,
    },
}

/// What one layer holds under a name.
enum Probe {
    Missing,
    Whiteout,
    Entry { stat: Stat, opaque: bool, redirect: Option<Vec<u8>>, origin: Option<u64> },
}

/// One visible entry of a merged listing, by name (what `strata diff`,
/// `commit` and `layers` need).
#[derive(Clone, Debug)]
pub struct ListEntry {
    pub name: OsString,
}

/// One visible entry of a merged listing with its type and inode number,
/// its name shared with the cached listing it came from: the daemon keeps the listing of each open directory and a node
/// per looked-up name, and one copy of each name serves all of them (a
/// directory of 100,000 files otherwise holds its names three times).
#[derive(Clone, Debug)]
pub struct SharedEntry {
    pub name: Arc<OsStr>,
    /// A libc::DT_* value.
    pub kind: u8,
    pub ino: u64,
}

impl SharedEntry {
    /// "." or "..", which a directory snapshot starts with.
    pub fn is_dot_or_dotdot(&self) -> bool {
        matches!(self.name.as_bytes(), b"." | b"..")
    }
}

pub struct LayerStack {
    /// Topmost first; `layers[0]` is the upper when `has_upper`.
    pub layers: Vec<Layer>,
    pub has_upper: bool,
    /// The namespace of the markers Strata writes (reads accept both).
    pub namespace: XattrNamespace,
    /// Distinct devices of the layers, for mixing them into inode numbers.
    devices: Vec<u64>,
    /// Lower layers never change while mounted, so their directory
    /// descriptors and listings are kept (most recently used first).
    lower_dirs: Mutex<LruCache<(LayerId, PathBuf), Arc<OwnedFd>>>,
    lower_listings: Mutex<LruCache<(LayerId, PathBuf), Arc<LayerListing>>>,
}

/// What one layer's copy of a directory lists, whiteouts already read.
struct LayerListing {
    /// Visible entries of this layer.
    entries: Vec<SharedEntry>,
    /// Names this layer hides from itself and the layers below (whiteout
    /// entries: char 0/0 or xattr whiteouts).
    hidden: Vec<OsString>,
    /// Names this layer hides from the layers below only (OCI `.wh.NAME`).
    hidden_below: Vec<OsString>,
}

/// How many lower directory descriptors stay open.
const LOWER_DIR_CACHE: usize = 2048;
/// How many lower directory listings are kept.
const LOWER_LISTING_CACHE: usize = 512;

fn lru<K: std::hash::Hash + Eq, V>(capacity: usize) -> Mutex<LruCache<K, V>> {
    Mutex::new(LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LayerStack {
    /// Open the layers: `upper` (if any) above `lowers`, topmost lower first.
    pub fn open(upper: Option<&Path>, lowers: &[PathBuf], namespace: XattrNamespace) -> SysResult<Self> {
        let mut layers = Vec::new();
        for path in upper.into_iter().chain(lowers.iter().map(PathBuf::as_path)) {
            let root = std::fs::File::open(path).map_err(sys::io_errno)?;
            let root: OwnedFd = root.into();
            let dev = sys::fstat(root.as_fd())?.st_dev;
            layers.push(Layer { path: path.to_owned(), root, dev });
        }
        let mut devices: Vec<u64> = Vec::new();
        for layer in &layers {
            if !devices.contains(&layer.dev) {
                devices.push(layer.dev);
            }
        }
        Ok(LayerStack {
            layers,
            has_upper: upper.is_some(),
            namespace,
            devices,
            lower_dirs: lru(LOWER_DIR_CACHE),
            lower_listings: lru(LOWER_LISTING_CACHE),
        })
    }

    /// How many descriptors the stack may hold at once: one per layer root
    /// and the cache of lower directories.
    pub fn descriptors_held_at_most(&self) -> usize {
        self.layers.len() + LOWER_DIR_CACHE
    }

    pub fn is_upper(&self, layer: LayerId) -> bool {
        self.has_upper && layer == 0
    }

    /// A short name for a layer in messages: "upper" or "lower N" (1 = topmost).
    pub fn layer_name(&self, layer: LayerId) -> String {
        if self.is_upper(layer) {
            "upper".to_string()
        } else {
            format!("lower {}", layer + 1 - usize::from(self.has_upper))
        }
    }

    /// The layer's name and its directory's last component: "lower 2 (base)".
    pub fn describe(&self, layer: LayerId) -> String {
        let dir = self.layers[layer].path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{} ({dir})", self.layer_name(layer))
    }

    /// Inode numbers: the real ones when every layer shares one filesystem
    /// (they are unique there, as with the kernel's overlayfs), otherwise the
    /// filesystem's position in the high bits (the kernel's "xino" idea).
    pub fn stable_ino(&self, layer: LayerId, ino: u64) -> u64 {
        if self.devices.len() <= 1 {
            return ino;
        }
        let index = self.devices.iter().position(|d| *d == self.layers[layer].dev).unwrap_or(0) as u64;
        (index << 56) | (ino & ((1 << 56) - 1))
    }

    /// Open a directory of a layer (O_PATH unless `flags` says otherwise).
    pub fn open_dir(&self, layer: LayerId, path: &Path, flags: i32) -> SysResult<OwnedFd> {
        sys::open_beneath(self.layers[layer].root.as_fd(), path, flags | libc::O_DIRECTORY)
    }

    /// An O_PATH descriptor of a directory of a layer; cached for lowers.
    pub fn dir_handle(&self, layer: LayerId, path: &Path) -> SysResult<Arc<OwnedFd>> {
        if self.is_upper(layer) {
            return self.open_dir(layer, path, libc::O_PATH).map(Arc::new);
        }
        let key = (layer, path.to_owned());
        if let Some(fd) = lock(&self.lower_dirs).get(&key) {
            return Ok(fd.clone());
        }
        let fd = Arc::new(self.open_dir(layer, path, libc::O_PATH)?);
        lock(&self.lower_dirs).put(key, fd.clone());
        Ok(fd)
    }

    /// The sources of the merged root: every layer's root down to the first
    /// opaque one. The roots are open already, so this costs two system
    /// calls a layer (one listxattr, one stat of the OCI marker).
    pub fn root_sources(&self) -> Vec<Source> {
        let mut sources = Vec::new();
        for (layer, Layer { root, .. }) in self.layers.iter().enumerate() {
            sources.push(Source { layer, path: PathBuf::new() });
            if self.dir_is_opaque_fd(root.as_fd()) {
                break;
            }
        }
        sources
    }

    /// Resolve `name` in the merged directory made of `parent` (topmost first).
    pub fn lookup(&self, parent: &[Source], name: &OsStr) -> SysResult<Option<Resolved>> {
        let Some(first) = parent.first() else { return Ok(None) };
        let mut found: Option<Resolved> = None;
        // A redirect on a directory changes where layers below it are searched.
        let mut redirected: Option<PathBuf> = None;
        let mut lookup_name: OsString = name.to_owned();
        // `parent` is in layer order: walk it alongside the layers, so a
        // layer without this directory costs nothing (not even a search).
        let mut parent_sources = parent.iter().peekable();
        for layer in first.layer..self.layers.len() {
            while parent_sources.next_if(|s| s.layer < layer).is_some() {}
            let in_parent = parent_sources.next_if(|s| s.layer == layer);
            let (dir_path, entry_name) = match &redirected {
                Some(abs) => match (abs.parent(), abs.file_name()) {
                    (Some(dir), Some(file)) => (dir.to_owned(), file.to_owned()),
                    _ => break,
                },
                None => match in_parent {
                    Some(source) => (source.path.clone(), lookup_name.clone()),
                    None => continue,
                },
            };
            let probe = self.probe(layer, &dir_path, &entry_name)?;
            match probe {
                Probe::Missing => continue,
                Probe::Whiteout => break,
                Probe::Entry { stat, opaque, redirect, origin } => {
                    let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
                    let source = Source { layer, path: dir_path.join(&entry_name) };
                    match &mut found {
                        None => {
                            let ino = origin.unwrap_or_else(|| self.stable_ino(layer, stat.st_ino));
                            found = Some(Resolved {
                                stat,
                                dir_sources: if is_dir { vec![source.clone()] } else { Vec::new() },
                                top: source,
                                ino,
                            });
                            if !is_dir {
                                break;
                            }
                        }
                        Some(dir) => {
                            if !is_dir {
                                break; // a non-directory below a directory ends the merge
                            }
                            dir.dir_sources.push(source);
                        }
                    }
                    if opaque {
                        break;
                    }
                    if let Some(target) = redirect {
                        if target.first() == Some(&b'/') {
                            let relative =
                                Path::new(OsStr::from_bytes(&target)).strip_prefix("/").unwrap_or(Path::new(""));
                            redirected = Some(relative.to_owned());
                        } else if !target.contains(&b'/') {
                            lookup_name = OsStr::from_bytes(&target).to_owned();
                        }
                    }
                }
            }
        }
        Ok(found)
    }

    /// What layer `layer` alone holds as `name` in its directory `dir_path`.
    pub fn presence(&self, layer: LayerId, dir_path: &Path, name: &OsStr) -> SysResult<Presence> {
        Ok(match self.probe(layer, dir_path, name)? {
            Probe::Missing => Presence::Missing,
            Probe::Whiteout => Presence::Whiteout,
            Probe::Entry { stat, opaque, .. } => Presence::Entry { stat, opaque },
        })
    }

    /// What layer `layer` holds as `name` in its directory `dir_path`.
    fn probe(&self, layer: LayerId, dir_path: &Path, name: &OsStr) -> SysResult<Probe> {
        let handle;
        let dir = if dir_path.as_os_str().is_empty() {
            // The layer's root is open for the life of the stack.
            self.layers[layer].root.as_fd()
        } else {
            handle = match self.dir_handle(layer, dir_path) {
                Ok(dir) => dir,
                // The directory is not in this layer, or a symlink stands where a
                // directory should be: a symlink is never followed.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV) => return Ok(Probe::Missing),
                Err(err) => return Err(err),
            };
            handle.as_fd()
        };
        let stat = match sys::fstatat(dir, name) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => {
                return Ok(if self.has_oci_whiteout(dir, name)? { Probe::Whiteout } else { Probe::Missing });
            }
            Err(err) => return Err(err),
        };
        if self.is_whiteout(dir, name, &stat)? {
            return Ok(Probe::Whiteout);
        }
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if !is_dir && !self.is_upper(layer) {
            return Ok(Probe::Entry { stat, opaque: false, redirect: None, origin: None });
        }
        let marks = Marks::read(&XattrTarget::new(dir, name)?, self.namespace)?;
        let origin = if self.is_upper(layer) { marks.origin } else { None };
        if !is_dir {
            return Ok(Probe::Entry { stat, opaque: false, redirect: None, origin });
        }
        let opaque = marks.opaque
            || sys::open_beneath(dir, &Path::new(name).join(OPAQUE_MARKER), libc::O_PATH).is_ok()
            // OCI: a whiteout beside a directory of the same layer hides the
            // lower copies of it.
            || self.has_oci_whiteout(dir, name)?;
        Ok(Probe::Entry { stat, opaque, redirect: marks.redirect, origin })
    }

    fn has_oci_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<bool> {
        let mut marker = WHITEOUT_PREFIX.to_vec();
        marker.extend_from_slice(name.as_bytes());
        if marker.len() > 255 {
            return Ok(false);
        }
        sys::exists_at(dir, OsStr::from_bytes(&marker))
    }

    /// Whether an existing entry is a whiteout: a char device 0/0, or an
    /// empty file with an overlay whiteout xattr inside a directory marked
    /// opaque "x" (the kernel's xattr whiteouts).
    fn is_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr, stat: &Stat) -> SysResult<bool> {
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFCHR => Ok(stat.st_rdev == 0),
            libc::S_IFREG if stat.st_size == 0 => {
                let dir_marks = XattrTarget::fd(dir);
                if !has_xattr_whiteouts(&dir_marks) {
                    return Ok(false);
                }
                let file = XattrTarget::new(dir, name)?;
                Ok([XattrNamespace::Trusted, XattrNamespace::User]
                    .iter()
                    .any(|ns| matches!(file.get_opt(&ns.overlay("whiteout")), Ok(Some(_)))))
            }
            _ => Ok(false),
        }
    }

    fn dir_is_opaque_fd(&self, dir: BorrowedFd<'_>) -> bool {
        // One listxattr answers for the usual directory without any marker.
        let marked = Marks::read(&XattrTarget::fd(dir), self.namespace).is_ok_and(|marks| marks.opaque);
        marked || sys::exists_at(dir, OsStr::new(OPAQUE_MARKER)).unwrap_or(false)
    }

    /// The merged listing of a directory made of `sources` (topmost first):
    /// names hidden by whiteouts and every marker are left out.
    pub fn list(&self, sources: &[Source]) -> SysResult<Vec<ListEntry>> {
        let entries = self.list_shared(sources)?;
        Ok(entries.into_iter().map(|e| ListEntry { name: e.name.as_ref().to_owned() }).collect())
    }

    /// `list`, with names shared with the listing cache.
    pub fn list_shared(&self, sources: &[Source]) -> SysResult<Vec<SharedEntry>> {
        let mut listings = Vec::with_capacity(sources.len());
        for source in sources {
            if let Some(listing) = self.layer_listing(source)? {
                listings.push(listing);
            }
        }
        if let [only] = listings.as_slice() {
            // One layer (most directories): nothing to merge or hide.
            return Ok(only.entries.clone());
        }
        // The names seen so far, borrowed from the listings (a set of
        // copies would double a large directory's memory while it is read).
        let mut seen: HashSet<&OsStr> = HashSet::new();
        let mut entries = Vec::new();
        for listing in &listings {
            seen.extend(listing.hidden.iter().map(OsString::as_os_str));
            for entry in &listing.entries {
                if seen.insert(&entry.name) {
                    entries.push(entry.clone());
                }
            }
            seen.extend(listing.hidden_below.iter().map(OsString::as_os_str));
        }
        Ok(entries)
    }

    /// One layer's copy of a directory, read (or taken from the cache for
    /// lower layers); None when the layer has no such directory.
    fn layer_listing(&self, source: &Source) -> SysResult<Option<Arc<LayerListing>>> {
        let key = (source.layer, source.path.clone());
        let cacheable = !self.is_upper(source.layer);
        if cacheable && let Some(listing) = lock(&self.lower_listings).get(&key) {
            return Ok(Some(listing.clone()));
        }
        let dir = match self.open_dir(source.layer, &source.path, libc::O_PATH) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(None),
            Err(err) => return Err(err),
        };
        // Only a directory marked opaque "x" can hold xattr whiteouts (empty
        // regular files); elsewhere a regular file needs no stat.
        let xattr_whiteouts = has_xattr_whiteouts(&XattrTarget::fd(dir.as_fd()));
        let mut listing = LayerListing { entries: Vec::new(), hidden: Vec::new(), hidden_below: Vec::new() };
        for entry in sys::read_dir(dir.as_fd())? {
            let name_bytes = entry.name.as_bytes();
            if name_bytes.starts_with(WHITEOUT_PREFIX) {
                if entry.name != OPAQUE_MARKER {
                    listing.hidden_below.push(OsStr::from_bytes(&name_bytes[WHITEOUT_PREFIX.len()..]).to_owned());
                }
                continue;
            }
            let mut kind = entry.kind;
            let mut ino = entry.ino;
            // Whiteouts are char devices, or empty files in an "x" directory:
            // only those (and entries whose type the filesystem does not
            // say) need a stat. Upper entries do too: a copied-up one keeps
            // its origin inode.
            let upper = self.is_upper(source.layer);
            let maybe_whiteout = kind == libc::DT_CHR || (kind == libc::DT_REG && xattr_whiteouts);
            if maybe_whiteout || kind == libc::DT_UNKNOWN || upper {
                let stat = match sys::fstatat(dir.as_fd(), &entry.name) {
                    Ok(stat) => stat,
                    Err(Errno::ENOENT) => continue,
                    Err(err) => return Err(err),
                };
                kind = dtype_of(stat.st_mode);
                let maybe_whiteout = kind == libc::DT_CHR || (kind == libc::DT_REG && stat.st_size == 0);
                if maybe_whiteout && self.is_whiteout(dir.as_fd(), &entry.name, &stat)? {
                    listing.hidden.push(entry.name);
                    continue;
                }
                ino = stat.st_ino;
            }
            let mut stable = self.stable_ino(source.layer, ino);
            if upper
                && let Some(origin) = Marks::read(&XattrTarget::new(dir.as_fd(), &entry.name)?, self.namespace)?.origin
            {
                stable = origin;
            }
            listing.entries.push(SharedEntry { name: entry.name.into(), kind, ino: stable });
        }
        let listing = Arc::new(listing);
        if cacheable {
            lock(&self.lower_listings).put(key, listing.clone());
        }
        Ok(Some(listing))
    }
}

/// The overlay markers on one entry, read with a single listxattr in the
/// common case of an entry without any.
#[derive(Default)]
struct Marks {
    opaque: bool,
    redirect: Option<Vec<u8>>,
    origin: Option<u64>,
}

impl Marks {
    fn read(xattrs: &XattrTarget<'_>, namespace: XattrNamespace) -> SysResult<Marks> {
        let mut marks = Marks::default();
        for name in xattrs.list()? {
            if !is_private_xattr(&name) {
                continue;
            }
            let Some(value) = xattrs.get_opt(&name)? else { continue };
            let key = name.as_bytes();
            if key.ends_with(b".opaque") {
                marks.opaque |= value == b"y";
            } else if key.ends_with(b"overlay.redirect") {
                marks.redirect = Some(value);
            } else if name == namespace.strata("origin") {
                marks.origin = value.try_into().ok().map(u64::from_le_bytes);
            }
        }
        Ok(marks)
    }
}

/// Whether a directory is marked as holding xattr whiteouts (opaque "x").
fn has_xattr_whiteouts(dir: &XattrTarget<'_>) -> bool {
    [XattrNamespace::Trusted, XattrNamespace::User]
        .iter()
        .any(|ns| matches!(dir.get_opt(&ns.overlay("opaque")), Ok(Some(v)) if v == b"x"))
}

/// The DT_* value for a st_mode.
pub fn dtype_of(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        _ => libc::DT_UNKNOWN,
    }
}
