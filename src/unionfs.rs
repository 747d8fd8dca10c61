//! The union filesystem core: every operation of the mount, in plain Rust
//! over the layer stack and the inode table, answering with an errno.
//!
//! Nothing here knows FUSE; `fuse.rs` translates. The rules that keep it
//! simple:
//! - locks guard maps and are never held across I/O;
//! - the upper layer is only changed by building the new entry in the work
//!   directory and renaming it into place, so a crash at any moment leaves
//!   either the old or the new state visible, never half of one;
//! - every path is resolved beneath a layer root without following symlinks.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::idmap::IdMap;
use crate::inodes::{InodeTable, Lowers, Names, Node, ROOT};
use crate::layers::{self, LayerStack, Source, XattrNamespace};
use crate::sys::{self, Errno, SetTime, Stat, SysResult, XattrTarget};
use crate::trace::{Event, Monitor};

/// Who asks: the credentials of the calling process.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// How whiteouts are written to the upper layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutStyle {
    /// Character device 0/0 (the kernel's format; needs CAP_MKNOD).
    Device,
    /// An empty file with an `overlay.whiteout` xattr, in a directory whose
    /// `overlay.opaque` is "x" (the kernel's format with `userxattr`).
    Xattr,
}

/// Behaviour switches from the mount options.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// fsync copied-up data and honour fsync calls (`fsync=0`/`volatile` turn it off).
    pub fsync: bool,
    /// Report st_nlink 1 for every directory (`static_nlink`).
    pub static_nlink: bool,
    /// Ownership shifting between the layers and the mount.
    pub uids: IdMap,
    pub gids: IdMap,
}

/// A looked-up entry: its inode number and attributes.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub ino: u64,
    pub stat: Stat,
}

/// Attribute changes requested by setattr.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// The caller asked for ctime to move (e.g. chown(-1, -1)).
    pub ctime: bool,
}

/// One entry of a directory listing.
pub type DirItem = layers::SharedEntry;

struct OpenFile {
    ino: u64,
    /// Opened read-only on a lower copy: after a copy-up (through another
    /// handle) the handle moves to the upper copy, so it sees later writes,
    /// as with the kernel's overlayfs.
    on_lower: AtomicBool,
    file: Mutex<Arc<File>>,
}

/// A descriptor kept for serving a file by inode (see `UnionFs::inode_file`).
#[derive(Clone)]
struct InodeFile {
    file: Arc<File>,
    /// Opened for reading and writing (an upper file), or read-only.
    writable: bool,
    /// A lower copy: stale once the inode is copied up.
    on_lower: bool,
}

/// How many descriptors of files served by inode stay open: enough for
/// the files being read or written at once; an evicted one is opened again
/// at its next request that reaches the daemon (reads of cached pages
/// never do).
const INODE_FILE_CACHE: usize = 1024;

/// A directory's merged listing in the order readdir hands it out.
///
/// The kernel is not asked to open directories (see `fuse.rs`), so a
/// readdir comes with no handle to hang a snapshot on, only the offset
/// where the last one stopped. Each entry's offset is therefore a hash of
/// its name, and the listing is sorted by it: reading on from an offset
/// returns every entry still there exactly once, whatever was added or
/// removed since, as ext4's hashed directories do. "." and ".." come first.
struct Listing {
    entries: Vec<(u64, DirItem)>,
}

/// Listings kept for reads that go on chunk after chunk, each until it is
/// read to its end (the kernel keeps a directory it has read whole): at
/// most this many directories, and entries in all.
const LISTING_CACHE_DIRS: usize = 64;
const LISTING_CACHE_ENTRIES: usize = 256 * 1024;

struct ListingCache {
    listings: lru::LruCache<u64, Arc<Listing>>,
    entries: usize,
}

impl ListingCache {
    fn new() -> Self {
        ListingCache { listings: lru::LruCache::unbounded(), entries: 0 }
    }

    fn get(&mut self, ino: u64) -> Option<Arc<Listing>> {
        self.listings.get(&ino).cloned()
    }

    fn put(&mut self, ino: u64, listing: Arc<Listing>) {
        self.remove(ino);
        while self.listings.len() >= LISTING_CACHE_DIRS || self.entries + listing.entries.len() > LISTING_CACHE_ENTRIES
        {
            let Some((_, oldest)) = self.listings.pop_lru() else { break };
            self.entries -= oldest.entries.len();
        }
        self.entries += listing.entries.len();
        self.listings.put(ino, listing);
    }

    fn remove(&mut self, ino: u64) {
        if let Some(listing) = self.listings.pop(&ino) {
            self.entries -= listing.entries.len();
        }
    }
}

/// The readdir offset of a name: above those of "." (1) and ".." (2), and
/// below i64::MAX, as the kernel keeps offsets signed.
fn name_offset(name: &OsStr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut hasher);
    3 + hasher.finish() % (i64::MAX as u64 - 3)
}

/// Where a new entry is to go (see `UnionFs::prepare_new_entry`).
struct NewEntry {
    /// Its directory in the upper layer (O_PATH).
    upper_parent: OwnedFd,
    parent_stat: Stat,
    /// The upper directory holds a whiteout of that name.
    replaces_whiteout: bool,
}

/// The scratch directory kept inside the work directory, as the kernel does.
const WORK_SUBDIR: &str = "work";
/// The whiteout inode every whiteout of the upper is a link to.
const SHARED_WHITEOUT: &str = "#strata-whiteout";
/// Hard-linked lower files that were copied up, by inode number, so their
/// other names keep sharing the copy.
const INDEX_SUBDIR: &str = "strata-index";

pub struct UnionFs {
    pub stack: LayerStack,
    options: FsOptions,
    whiteouts: WhiteoutStyle,
    /// `WORK/work`, on the upper's filesystem; None for a read-only mount.
    work: Option<OwnedFd>,
    index: Option<OwnedFd>,
    table: Mutex<InodeTable>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// Set when the kernel sends no OPEN for files (`serve_files_by_inode`):
    /// requests on them come with handle 0 and are served by inode.
    by_inode: AtomicBool,
    /// The descriptors files are served through by inode, most recently used.
    inode_files: Mutex<lru::LruCache<u64, InodeFile>>,
    /// Upper files that lost a name while the kernel knew them, by inode:
    /// without OPEN the daemon cannot tell whether a process still has one
    /// open, so it keeps an O_PATH descriptor until the kernel forgets it.
    unlinked: Mutex<HashMap<u64, Arc<OwnedFd>>>,
    /// Merged listings by directory inode (see `Listing`).
    listings: Mutex<ListingCache>,
    /// Counts changes to directories: a listing built while one happened
    /// may be stale, and is not kept.
    listing_epoch: AtomicU64,
    next_handle: AtomicU64,
    next_temp: AtomicU64,
    /// Copy-ups of one inode are serialised; different inodes copy in parallel.
    copy_locks: Vec<Mutex<()>>,
    /// Counters and trace subscribers.
    pub monitor: Monitor,
    /// The inode cache cap, if any (`inode_cache=N`), and the flag and
    /// condition variable that wake the thread enforcing it.
    inode_cap: std::sync::OnceLock<usize>,
    cap_wakeup: (Mutex<bool>, std::sync::Condvar),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere never leaves these maps half-updated (updates are
    // single statements), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kind_of(stat: &Stat) -> u32 {
    stat.st_mode & libc::S_IFMT
}

impl UnionFs {
    /// Build the filesystem over an opened layer stack. `work_dir` is the
    /// user's work directory (required when the stack has an upper).
    pub fn new(stack: LayerStack, work_dir: Option<&Path>, options: FsOptions) -> SysResult<Self> {
        let (work, index, whiteouts) = match work_dir {
            Some(dir) => {
                let dir_fd: OwnedFd = File::open(dir).map_err(sys::io_errno)?.into();
                let work = prepare_scratch(dir_fd.as_fd(), WORK_SUBDIR, true)?;
                let index = prepare_scratch(dir_fd.as_fd(), INDEX_SUBDIR, false)?;
                let style =
                    if sys::can_mknod_whiteout(work.as_fd()) { WhiteoutStyle::Device } else { WhiteoutStyle::Xattr };
                (Some(work), Some(index), style)
            }
            None => (None, None, WhiteoutStyle::Device),
        };
        let root_sources = stack.root_sources();
        let layer_count = stack.layers.len();
        let mut root = Node::new(
            Names::default(),
            libc::S_IFDIR,
            stack.has_upper,
            Lowers::dirs(root_sources.iter().filter(|s| !stack.is_upper(s.layer))),
        );
        root.lookups = 1;
        Ok(UnionFs {
            stack,
            options,
            whiteouts,
            work,
            index,
            table: Mutex::new(InodeTable::new(root)),
            files: Mutex::new(HashMap::new()),
            by_inode: AtomicBool::new(false),
            inode_files: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(INODE_FILE_CACHE).expect("a non-zero cache size"),
            )),
            unlinked: Mutex::new(HashMap::new()),
            listings: Mutex::new(ListingCache::new()),
            listing_epoch: AtomicU64::new(0),
            next_handle: AtomicU64::new(1),
            next_temp: AtomicU64::new(1),
            copy_locks: (0..64).map(|_| Mutex::new(())).collect(),
            monitor: Monitor::new(layer_count),
            inode_cap: std::sync::OnceLock::new(),
            cap_wakeup: (Mutex::new(false), std::sync::Condvar::new()),
        })
    }

    pub fn is_read_only(&self) -> bool {
        !self.stack.has_upper
    }

    pub fn whiteout_style(&self) -> WhiteoutStyle {
        self.whiteouts
    }

    pub fn open_files(&self) -> usize {
        lock(&self.files).len()
    }

    /// Descriptors held to serve files by inode.
    pub fn inode_files(&self) -> usize {
        lock(&self.inode_files).len()
    }

    /// The kernel opens files without asking (it got ENOSYS for OPEN):
    /// from now on a file's requests may come with handle 0.
    pub fn serve_files_by_inode(&self) {
        self.by_inode.store(true, Ordering::Relaxed);
    }

    pub fn cached_inodes(&self) -> usize {
        lock(&self.table).len()
    }

    /// Keep the inode table near `cap` nodes, for the life of the mount
    /// (`inode_cache=N`; runs on a thread of its own). A node lives while
    /// the kernel holds a lookup of it, so the table is shrunk by asking
    /// the kernel, with `invalidate(parent, name)`, to drop the entries of
    /// nodes not used lately: it then sends FORGET for those it does not
    /// need (an open file or a directory in use stays, and that is fine).
    /// The table goes down to 90% of the cap, so a walk does not invalidate
    /// one entry per lookup. This must not run in a request handler: the
    /// kernel may wait for a request to finish before it takes the
    /// invalidation, and the table lock is never held across it.
    pub fn enforce_inode_cap(&self, cap: usize, invalidate: impl Fn(u64, &OsStr) -> std::io::Result<()>) {
        let _ = self.inode_cap.set(cap);
        let low_water = cap - cap / 10;
        loop {
            {
                let mut over = lock(&self.cap_wakeup.0);
                while !*over {
                    over = self.cap_wakeup.1.wait(over).unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                *over = false;
            }
            let before = self.cached_inodes();
            let excess = before.saturating_sub(low_water);
            // Right after a walk every node is marked used: the first turn
            // of the clock only clears the marks.
            let mut cold = lock(&self.table).cold(excess);
            if cold.is_empty() {
                cold = lock(&self.table).cold(excess);
            }
            for link in &cold {
                // ENOENT: the kernel no longer has that entry; nothing to do.
                if let Err(err) = invalidate(link.parent, &link.name)
                    && err.raw_os_error() != Some(libc::ENOENT)
                {
                    log::debug!("cannot invalidate {:?} in {}: {err}", link.name, link.parent);
                }
            }
            // FORGETs come back asynchronously: give them a moment before
            // counting again, or the same excess would be evicted twice.
            // Another pass follows at once only if this one freed nodes;
            // otherwise (the kernel holds what is left) the next lookup
            // over the cap starts it.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let after = self.cached_inodes();
            if after > cap && after < before {
                self.wake_inode_cap();
            }
        }
    }

    /// Tell `enforce_inode_cap` the table has grown past the cap.
    fn wake_inode_cap(&self) {
        *lock(&self.cap_wakeup.0) = true;
        self.cap_wakeup.1.notify_one();
    }

    fn writable(&self) -> SysResult<()> {
        if self.is_read_only() { Err(Errno::EROFS) } else { Ok(()) }
    }

    fn work(&self) -> SysResult<&OwnedFd> {
        self.work.as_ref().ok_or(Errno::EROFS)
    }

    fn temp_name(&self) -> OsString {
        format!("#strata-{}-{}", std::process::id(), self.next_temp.fetch_add(1, Ordering::Relaxed)).into()
    }

    // ----- locating nodes -------------------------------------------------

    /// The directory sources of a directory node, topmost first.
    fn dir_sources(&self, ino: u64) -> SysResult<Vec<Source>> {
        let table = lock(&self.table);
        let node = table.get(ino)?;
        if !node.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let mut sources = Vec::with_capacity(node.lowers.len() + 1);
        if node.in_upper {
            sources.push(Source { layer: 0, path: table.path(ino)? });
        }
        sources.extend(node.lowers.sources());
        Ok(sources)
    }

    /// Where the node's visible copy is: a layer and a path in it.
    fn location(&self, ino: u64) -> SysResult<Location> {
        let mut table = lock(&self.table);
        table.touch(ino); // for the inode cache's eviction clock
        let node = table.get(ino)?;
        if node.indexed {
            // A hard link copied up: its index entry is the inode every
            // upper name shares, whichever name the node was reached by.
            Ok(Location::Index(ino))
        } else if node.in_upper {
            Ok(Location::Layer(Source { layer: 0, path: table.path(ino)? }))
        } else {
            node.lowers.first().map(Location::Layer).ok_or(Errno::ENOENT)
        }
    }

    fn upper_path(&self, ino: u64) -> SysResult<PathBuf> {
        lock(&self.table).path(ino)
    }

    /// The path a user sees for a node, for messages and traces.
    fn shown_path(&self, ino: u64) -> String {
        match self.upper_path(ino) {
            Ok(path) => format!("/{}", path.display()),
            Err(_) => "(unlinked)".to_string(),
        }
    }

    fn shown_child_path(&self, parent: u64, name: &OsStr) -> String {
        match self.upper_path(parent) {
            Ok(path) => format!("/{}", path.join(name).display()),
            Err(_) => format!("?/{}", name.to_string_lossy()),
        }
    }

    /// An O_PATH descriptor of the node's directory in the upper layer.
    fn upper_dir(&self, ino: u64) -> SysResult<OwnedFd> {
        let path = self.upper_path(ino)?;
        self.stack.open_dir(0, &path, libc::O_PATH)
    }

    /// The parent directory (O_PATH) and name through which a node's
    /// visible copy is reached.
    fn parent_and_name(&self, location: &Location) -> SysResult<(OwnedFd, OsString)> {
        match location {
            Location::Layer(source) => {
                let name = source.path.file_name().map(OsStr::to_owned).unwrap_or_else(|| ".".into());
                let parent = source.path.parent().unwrap_or(Path::new(""));
                Ok((self.stack.open_dir(source.layer, parent, libc::O_PATH)?, name))
            }
            Location::Index(ino) => {
                let index = self.index.as_ref().ok_or(Errno::ENOENT)?;
                Ok((sys::dup(index.as_fd())?, index_name(*ino)))
            }
        }
    }

    fn open_location(&self, location: &Location, flags: i32) -> SysResult<File> {
        let fd = match location {
            Location::Layer(source) => {
                sys::open_beneath(self.stack.layers[source.layer].root.as_fd(), &source.path, flags)?
            }
            Location::Index(ino) => {
                let index = self.index.as_ref().ok_or(Errno::ENOENT)?;
                sys::openat(index.as_fd(), &index_name(*ino), flags, 0)?
            }
        };
        Ok(File::from(fd))
    }

    fn stat_location(&self, location: &Location) -> SysResult<Stat> {
        let (dir, name) = self.parent_and_name(location)?;
        sys::fstatat(dir.as_fd(), &name)
    }

    /// The attributes the mount shows for a node, from the stat of its copy.
    fn present(&self, ino: u64, mut stat: Stat) -> Stat {
        stat.st_ino = ino;
        stat.st_uid = self.options.uids.shown(stat.st_uid);
        stat.st_gid = self.options.gids.shown(stat.st_gid);
        if let Ok(node) = lock(&self.table).get(ino) {
            if node.is_dir() && (self.options.static_nlink || node.is_merged_dir()) {
                // The kernel's overlayfs reports 1 for merged directories:
                // their true link count is unknown, and 1 tells find(1) so.
                stat.st_nlink = 1;
            } else if let Some(nlink) = node.nlink {
                stat.st_nlink = nlink;
            }
        }
        if ino == ROOT {
            stat.st_ino = ROOT;
        }
        stat
    }

    // ----- lookup and attributes ------------------------------------------

    /// Resolve `name` in `parent` without recording it.
    fn resolve(&self, parent: u64, name: &OsStr) -> SysResult<Option<layers::Resolved>> {
        if layers::is_whiteout_name(name) {
            return Ok(None);
        }
        let sources = self.dir_sources(parent)?;
        self.stack.lookup(&sources, name)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> SysResult<Entry> {
        let resolved = self.resolve(parent, name)?.ok_or(Errno::ENOENT)?;
        self.note_served(parent, name, resolved.top.layer);
        Ok(self.remember(parent, name, resolved))
    }

    /// Count (and trace) which layer served a name to the kernel.
    fn note_served(&self, parent: u64, name: &OsStr, layer: layers::LayerId) {
        if let Some(counter) = self.monitor.lookups_per_layer.get(layer) {
            Monitor::count(counter, 1);
        }
        if self.monitor.wants_lookups() {
            self.monitor.emit(|| Event::Lookup {
                path: self.shown_child_path(parent, name),
                layer: self.stack.describe(layer),
            });
        }
    }

    fn remember(&self, parent: u64, name: &OsStr, resolved: layers::Resolved) -> Entry {
        self.remember_shared(parent, Arc::from(name), resolved)
    }

    /// `remember`, keeping a name already shared (with a directory listing).
    fn remember_shared(&self, parent: u64, name: Arc<OsStr>, resolved: layers::Resolved) -> Entry {
        let in_upper = self.stack.is_upper(resolved.top.layer);
        let is_dir = resolved.is_dir();
        let mut stat = resolved.stat;
        let mut indexed = false;
        let mut nlink = None;
        let lower_nlink = if in_upper { 0 } else { stat.st_nlink };
        if kind_of(&stat) == libc::S_IFREG && stat.st_nlink > 1 {
            // A hard link with a copy in the index: a lower name is served
            // from that copy (another name was copied up), and every name
            // shows the count kept with it.
            if let Some(index) = &self.index
                && let Ok(copy) = sys::fstatat(index.as_fd(), &index_name(resolved.ino))
            {
                if !in_upper {
                    stat = copy;
                }
                indexed = true;
                nlink = self.read_nlink(resolved.ino);
            }
        }
        let mut table = lock(&self.table);
        let lowers = if is_dir {
            Lowers::dirs(resolved.dir_sources.iter().filter(|s| !self.stack.is_upper(s.layer)))
        } else if in_upper {
            Lowers::None
        } else {
            table.lower_entry(parent, &name, &resolved.top)
        };
        let mut node = Node::new(Names::one(parent, name), kind_of(&resolved.stat), in_upper, lowers);
        node.indexed = indexed;
        node.lower_nlink = lower_nlink;
        node.nlink = nlink;
        table.remember(resolved.ino, node);
        let over_cap = self.inode_cap.get().is_some_and(|cap| table.len() > *cap);
        drop(table);
        if over_cap {
            self.wake_inode_cap();
        }
        Entry { ino: resolved.ino, stat: self.present(resolved.ino, stat) }
    }

    pub fn forget(&self, ino: u64, count: u64) {
        if !lock(&self.table).forget(ino, count) {
            return;
        }
        lock(&self.listings).remove(ino);
        if self.by_inode.load(Ordering::Relaxed) {
            lock(&self.inode_files).pop(&ino);
            lock(&self.unlinked).remove(&ino);
        }
    }

    pub fn getattr(&self, ino: u64, handle: Option<u64>) -> SysResult<Stat> {
        if let Some(file) = handle.filter(|h| *h != 0).and_then(|h| self.file(h).ok()) {
            return Ok(self.present(ino, sys::fstat(file.as_fd())?));
        }
        let stat = if ino == ROOT {
            let fd = self.open_location(&self.location(ino)?, libc::O_PATH)?;
            sys::fstat(fd.as_fd())?
        } else {
            match self.location(ino).and_then(|location| self.stat_location(&location)) {
                Ok(stat) => stat,
                // fstat(2) of an unlinked open file comes without a handle.
                Err(Errno::ENOENT) => match self.open_file_of(ino) {
                    Some(file) => sys::fstat(file.as_fd())?,
                    None => return Err(Errno::ENOENT),
                },
                Err(err) => return Err(err),
            }
        };
        Ok(self.present(ino, stat))
    }

    pub fn setattr(&self, ino: u64, change: AttrChange) -> SysResult<Stat> {
        self.writable()?;
        self.copy_up(ino, change.size == Some(0))?;
        let location = match self.location(ino) {
            Ok(location) => location,
            // Unlinked but still open: change it through the open file.
            Err(Errno::ENOENT) => return self.setattr_open(ino, change),
            Err(err) => return Err(err),
        };
        let (parent, name) = match self.parent_and_name(&location) {
            Err(Errno::ENOENT) => return self.setattr_open(ino, change),
            other => other?,
        };
        if !sys::exists_at(parent.as_fd(), &name)? {
            return self.setattr_open(ino, change);
        }
        // chown(-1, -1) changes nothing but ctime, which only a change can
        // set. Without writeback caching the kernel sends it as a setattr
        // with no field at all.
        let touch_only = change == AttrChange { ctime: change.ctime, ..AttrChange::default() };
        if change.uid.is_some() || change.gid.is_some() || touch_only {
            let uid = change.uid.map(|id| self.options.uids.stored(id));
            let gid = change.gid.map(|id| self.options.gids.stored(id));
            sys::fchownat(parent.as_fd(), &name, uid, gid)?;
        }
        if let Some(mode) = change.mode {
            let fd = sys::openat(parent.as_fd(), &name, libc::O_PATH, 0)?;
            sys::fchmod_fd(fd.as_fd(), mode & 0o7777)?;
        }
        if let Some(size) = change.size {
            // The daemon may open the upper copy for writing whatever its
            // mode: the kernel already checked the caller's right to truncate.
            let fd = sys::openat(parent.as_fd(), &name, libc::O_WRONLY, 0)?;
            sys::ftruncate(fd.as_fd(), size)?;
        }
        if change.atime.is_some() || change.mtime.is_some() {
            sys::utimensat(
                parent.as_fd(),
                &name,
                change.atime.unwrap_or(SetTime::Omit),
                change.mtime.unwrap_or(SetTime::Omit),
            )?;
        }
        self.getattr(ino, None)
    }

    /// setattr of a file that has no name left, through one of its handles.
    fn setattr_open(&self, ino: u64, change: AttrChange) -> SysResult<Stat> {
        let file = self.open_file_of(ino).ok_or(Errno::ENOENT)?;
        let fd = file.as_fd();
        if change.uid.is_some() || change.gid.is_some() || change.ctime {
            let uid = change.uid.map(|id| self.options.uids.stored(id));
            let gid = change.gid.map(|id| self.options.gids.stored(id));
            sys::fchown_fd(fd, uid, gid)?;
        }
        if let Some(mode) = change.mode {
            sys::fchmod_fd(fd, mode & 0o7777)?;
        }
        if let Some(size) = change.size {
            let writable = sys::reopen(fd, libc::O_WRONLY)?;
            sys::ftruncate(writable.as_fd(), size)?;
        }
        if change.atime.is_some() || change.mtime.is_some() {
            sys::futimens(fd, change.atime.unwrap_or(SetTime::Omit), change.mtime.unwrap_or(SetTime::Omit))?;
        }
        Ok(self.present(ino, sys::fstat(fd)?))
    }

    /// Any open file of `ino` (for a file whose last name is gone).
    fn open_file_of(&self, ino: u64) -> Option<Arc<File>> {
        let handle = lock(&self.files).iter().find(|(_, open)| open.ino == ino).map(|(h, _)| *h);
        match handle {
            Some(handle) => self.file(handle).ok(),
            None if self.by_inode.load(Ordering::Relaxed) => self.inode_file(ino, false).ok(),
            None => None,
        }
    }

    pub fn readlink(&self, ino: u64) -> SysResult<OsString> {
        let location = self.location(ino)?;
        let (dir, name) = self.parent_and_name(&location)?;
        sys::readlinkat(dir.as_fd(), &name)
    }

    // ----- copy-up --------------------------------------------------------

    /// Make sure `ino` exists in the upper layer, copying it (and its
    /// parents) up from the lower layer it comes from. With `skip_data` a
    /// regular file's content is not copied (it is about to be truncated).
    pub fn copy_up(&self, ino: u64, skip_data: bool) -> SysResult<()> {
        self.writable()?;
        // Parents first, outside this inode's copy lock.
        let (in_upper, parent) = {
            let table = lock(&self.table);
            let node = table.get(ino)?;
            (node.in_upper, node.names.first().map(|link| link.parent))
        };
        if in_upper {
            return Ok(());
        }
        let Some(parent) = parent else { return self.copy_up_nameless(ino) };
        self.copy_up(parent, false)?;

        let _guard = self.copy_lock(ino);
        let (source, indexed, kind, name, lower_nlink) = {
            let table = lock(&self.table);
            let node = table.get(ino)?;
            if node.in_upper {
                return Ok(()); // another thread finished it while we waited
            }
            let name = node.names.first().ok_or(Errno::ENOENT)?.name.to_os_string();
            let source = node.lowers.first().ok_or(Errno::ENOENT)?;
            (source, node.indexed, node.kind, name, node.lower_nlink)
        };
        let upper_parent = self.upper_dir(parent)?;
        let started = std::time::Instant::now();
        let mut copied = 0;
        if indexed {
            // A hard link whose data was copied up through another name.
            let index = self.index.as_ref().ok_or(Errno::EROFS)?;
            self.link_into_place(index.as_fd(), &index_name(ino), upper_parent.as_fd(), &name)?;
        } else {
            let work = self.work()?;
            let temp = self.temp_name();
            match crate::copyup::copy_entry(self, &source, kind, work.as_fd(), &temp, ino, skip_data) {
                Ok(bytes) => copied = bytes,
                Err(err) => {
                    crate::copyup::remove_temp(work.as_fd(), &temp);
                    return Err(err);
                }
            }
            if kind == libc::S_IFREG && lower_nlink > 1 {
                // Remember the copy so the other names of this hard link
                // keep sharing it, with the count of names it has.
                if let Some(index) = &self.index {
                    XattrTarget::new(work.as_fd(), &temp)?.set(
                        &self.namespace().strata("nlink"),
                        &lower_nlink.to_le_bytes(),
                        0,
                    )?;
                    match sys::linkat(work.as_fd(), &temp, index.as_fd(), &index_name(ino)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(err) => log::warn!("cannot index hard link {ino}: {err}"),
                    }
                }
            }
            if let Err(err) = sys::renameat2(work.as_fd(), &temp, upper_parent.as_fd(), &name, libc::RENAME_NOREPLACE) {
                crate::copyup::remove_temp(work.as_fd(), &temp);
                return Err(err);
            }
        }
        {
            let mut table = lock(&self.table);
            let node = table.get_mut(ino)?;
            node.in_upper = true;
            if kind == libc::S_IFREG && lower_nlink > 1 && self.index.is_some() && !node.indexed {
                node.indexed = true;
                node.nlink = Some(lower_nlink);
            }
        }
        Monitor::count(&self.monitor.copy_ups, 1);
        Monitor::count(&self.monitor.copied_bytes, copied);
        self.monitor.emit(|| Event::CopyUp {
            path: self.shown_path(ino),
            layer: self.stack.describe(source.layer),
            bytes: copied,
            took: started.elapsed(),
            data: kind == libc::S_IFREG && !skip_data && !indexed,
        });
        Ok(())
    }

    /// Copy-ups of one inode wait for each other; of different ones, rarely.
    fn copy_lock(&self, ino: u64) -> MutexGuard<'_, ()> {
        lock(&self.copy_locks[(ino % self.copy_locks.len() as u64) as usize])
    }

    /// Copy up a lower file whose last name was removed while a process
    /// had it open for writing: served by inode, the daemon learns of the
    /// writer only at its first write. The copy is made in the work
    /// directory and unlinked at once, and lives, nameless, as long as the
    /// kernel knows the inode (as the kernel's overlayfs, which copies up
    /// at open, keeps an unlinked upper file).
    fn copy_up_nameless(&self, ino: u64) -> SysResult<()> {
        if !self.by_inode.load(Ordering::Relaxed) {
            return Err(Errno::ENOENT); // an open for writing copied it up
        }
        let _guard = self.copy_lock(ino);
        let source = {
            let table = lock(&self.table);
            let node = table.get(ino)?;
            if node.has_upper_data() {
                return Ok(()); // copied up already (or in the index)
            }
            if node.kind != libc::S_IFREG || node.names.first().is_some() {
                return Err(Errno::ENOENT);
            }
            node.lowers.first().ok_or(Errno::ENOENT)?
        };
        let work = self.work()?;
        let temp = self.temp_name();
        let kept = crate::copyup::copy_entry(self, &source, libc::S_IFREG, work.as_fd(), &temp, ino, false)
            .and_then(|_| sys::openat(work.as_fd(), &temp, libc::O_PATH, 0));
        crate::copyup::remove_temp(work.as_fd(), &temp);
        lock(&self.unlinked).insert(ino, Arc::new(kept?));
        lock(&self.table).get_mut(ino)?.in_upper = true;
        Monitor::count(&self.monitor.copy_ups, 1);
        Ok(())
    }

    /// Hard-link `old` into the upper directory as `name`, replacing a
    /// whiteout there if any.
    fn link_into_place(
        &self,
        old_dir: std::os::fd::BorrowedFd<'_>,
        old: &OsStr,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
    ) -> SysResult<()> {
        let work = self.work()?;
        let temp = self.temp_name();
        sys::linkat(old_dir, old, work.as_fd(), &temp)?;
        if let Err(err) = sys::renameat2(work.as_fd(), &temp, dir, name, 0) {
            let _ = sys::unlinkat(work.as_fd(), &temp, false);
            return Err(err);
        }
        Ok(())
    }

    pub fn fsync_copies(&self) -> bool {
        self.options.fsync
    }

    pub fn namespace(&self) -> XattrNamespace {
        self.stack.namespace
    }

    // ----- creating entries -----------------------------------------------

    /// Whether removing `name` from the upper of `parent` would let a lower
    /// entry show through (so a whiteout is needed).
    fn lower_has(&self, parent: u64, name: &OsStr) -> SysResult<bool> {
        let lowers = {
            let table = lock(&self.table);
            table.get(parent)?.lowers.sources().collect::<Vec<_>>()
        };
        Ok(self.stack.lookup(&lowers, name)?.is_some())
    }

    fn check_new_name(&self, name: &OsStr) -> SysResult<()> {
        if layers::is_whiteout_name(name) {
            // It would read back as a whiteout or an opaque marker.
            return Err(Errno::EINVAL);
        }
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(())
    }

    /// Where a new entry goes: checks the name is free in the merged view
    /// and copies its parent up.
    fn prepare_new_entry(&self, parent: u64, name: &OsStr) -> SysResult<NewEntry> {
        self.writable()?;
        self.check_new_name(name)?;
        if self.resolve(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        self.copy_up(parent, false)?;
        let upper_parent = self.upper_dir(parent)?;
        let parent_stat = sys::fstat(upper_parent.as_fd())?;
        let replaces_whiteout = sys::exists_at(upper_parent.as_fd(), name)?;
        Ok(NewEntry { upper_parent, parent_stat, replaces_whiteout })
    }

    /// The owner and permission bits of a new entry: it belongs to the
    /// caller, and a setgid directory passes its group (and, to
    /// directories, the setgid bit) on.
    fn new_owner(&self, place: &NewEntry, caller: Caller, mode: u32) -> (u32, u32, u32) {
        let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        let inherit = place.parent_stat.st_mode & libc::S_ISGID != 0;
        let caller_gid = self.options.gids.stored(caller.gid);
        let gid = if inherit { place.parent_stat.st_gid } else { caller_gid };
        let mut perm = mode & 0o7777;
        if is_dir && inherit {
            perm |= libc::S_ISGID;
        }
        if !is_dir && perm & libc::S_ISGID != 0 && gid != caller_gid && caller.uid != 0 {
            perm &= !libc::S_ISGID;
        }
        (self.options.uids.stored(caller.uid), gid, perm)
    }

    /// Create a new entry at `place`: `build` makes it in the work
    /// directory under a temporary name, then it is owned by the caller and
    /// renamed into the upper directory, replacing a whiteout if there is one.
    fn install<T>(
        &self,
        place: &NewEntry,
        parent: u64,
        name: &OsStr,
        caller: Caller,
        mode: u32,
        build: impl FnOnce(&OwnedFd, &OsStr) -> SysResult<T>,
    ) -> SysResult<(Entry, T)> {
        let work = self.work()?;
        let upper_parent = place.upper_parent.as_fd();
        let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        let temp = self.temp_name();
        let built = build(work, &temp)?;
        let finish = || -> SysResult<()> {
            let (uid, gid, perm) = self.new_owner(place, caller, mode);
            sys::fchownat(work.as_fd(), &temp, Some(uid), Some(gid))?;
            if mode & libc::S_IFMT != libc::S_IFLNK {
                let fd = sys::openat(work.as_fd(), &temp, libc::O_PATH, 0)?;
                sys::fchmod_fd(fd.as_fd(), perm)?;
            }
            if is_dir && place.replaces_whiteout {
                // A directory made where a lower one was deleted must not
                // show the old content again.
                self.mark_opaque(work.as_fd(), &temp)?;
            }
            if place.replaces_whiteout && is_dir {
                sys::renameat2(work.as_fd(), &temp, upper_parent, name, libc::RENAME_EXCHANGE)?;
                // The whiteout now sits in the work directory.
                let _ = sys::unlinkat(work.as_fd(), &temp, false);
            } else if place.replaces_whiteout {
                sys::renameat2(work.as_fd(), &temp, upper_parent, name, 0)?;
            } else {
                sys::renameat2(work.as_fd(), &temp, upper_parent, name, libc::RENAME_NOREPLACE)?;
            }
            Ok(())
        };
        if let Err(err) = finish() {
            crate::copyup::remove_temp(work.as_fd(), &temp);
            return Err(err);
        }
        Ok((self.installed(parent, name, mode, place.replaces_whiteout)?, built))
    }

    /// Create a regular file where no whiteout stands, in its upper
    /// directory itself, as the kernel's overlayfs does: an unnamed file
    /// (O_TMPFILE) there gets its owner and mode, then its name, so a crash
    /// never leaves it half made. Made in the directory, its inode is
    /// allocated near it rather than near the work directory. None where
    /// the upper filesystem has no O_TMPFILE.
    fn create_in_place(
        &self,
        place: &NewEntry,
        name: &OsStr,
        caller: Caller,
        mode: u32,
        flags: i32,
    ) -> SysResult<Option<File>> {
        let file = match sys::open_unnamed(place.upper_parent.as_fd(), libc::O_RDWR | flags) {
            Ok(fd) => File::from(fd),
            Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => return Ok(None),
            Err(err) => return Err(err),
        };
        let (uid, gid, perm) = self.new_owner(place, caller, mode);
        sys::fchown_fd(file.as_fd(), Some(uid), Some(gid))?;
        sys::fchmod_fd(file.as_fd(), perm)?;
        sys::link_unnamed(file.as_fd(), place.upper_parent.as_fd(), name)?;
        Ok(Some(file))
    }

    /// After a new entry is in place: count it, say so, and remember it.
    fn installed(&self, parent: u64, name: &OsStr, mode: u32, replaced_whiteout: bool) -> SysResult<Entry> {
        self.listing_changed(parent);
        Monitor::count(&self.monitor.creates, 1);
        self.monitor.emit(|| Event::Create { path: self.shown_child_path(parent, name), kind: kind_name(mode) });
        if mode & libc::S_IFMT == libc::S_IFDIR && replaced_whiteout {
            Monitor::count(&self.monitor.opaque_dirs, 1);
            self.monitor.emit(|| Event::Opaque { path: self.shown_child_path(parent, name) });
        }
        let resolved = self.resolve(parent, name)?.ok_or(Errno::ENOENT)?;
        Ok(self.remember(parent, name, resolved))
    }

    fn mark_opaque(&self, dir: std::os::fd::BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
        XattrTarget::new(dir, name)?.set(&self.stack.namespace.overlay("opaque"), b"y", 0)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> SysResult<Entry> {
        let mode = libc::S_IFDIR | (mode & 0o7777);
        let place = self.prepare_new_entry(parent, name)?;
        if !place.replaces_whiteout && self.mkdir_in_place(&place, name, caller, mode)? {
            return self.installed(parent, name, mode, false);
        }
        let (entry, ()) =
            self.install(&place, parent, name, caller, mode, |work, temp| sys::mkdirat(work.as_fd(), temp, 0o700))?;
        Ok(entry)
    }

    /// Make a directory where no whiteout stands in its upper directory
    /// itself, as the kernel's overlayfs does: made by its owner, it needs
    /// no rename into place, and its inode (and so its files') is
    /// allocated near its parent rather than near the work directory.
    /// False where the owner may not write there (the work directory's way
    /// then makes it as the daemon).
    fn mkdir_in_place(&self, place: &NewEntry, name: &OsStr, caller: Caller, mode: u32) -> SysResult<bool> {
        let (uid, gid, perm) = self.new_owner(place, caller, mode);
        match sys::mkdirat_as(place.upper_parent.as_fd(), name, perm, uid, gid) {
            Ok(()) => {}
            Err(Errno::EACCES | Errno::EPERM) => return Ok(false),
            Err(err) => return Err(err),
        }
        // mkdir(2) leaves out the umask's bits (or a default ACL's) and a
        // setgid bit the parent does not pass on: then the mode is set after.
        let finish = || -> SysResult<()> {
            let dir = sys::openat(place.upper_parent.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            if sys::fstat(dir.as_fd())?.st_mode & 0o7777 != perm {
                sys::fchmod_fd(dir.as_fd(), perm)?;
            }
            Ok(())
        };
        if let Err(err) = finish() {
            let _ = sys::unlinkat(place.upper_parent.as_fd(), name, true);
            return Err(err);
        }
        Ok(true)
    }

    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u64, caller: Caller) -> SysResult<Entry> {
        if mode & libc::S_IFMT == libc::S_IFREG {
            // Where files are served by inode, a MKNOD is how the kernel
            // creates a file it opens next: keep the descriptor for it.
            let (entry, file) = self.create_file(parent, name, mode, 0, caller)?;
            if self.by_inode.load(Ordering::Relaxed) {
                let served = InodeFile { file: Arc::new(file), writable: true, on_lower: false };
                lock(&self.inode_files).put(entry.ino, served);
            }
            return Ok(entry);
        }
        let place = self.prepare_new_entry(parent, name)?;
        let (entry, ()) = self.install(&place, parent, name, caller, mode, |work, temp| {
            sys::mknodat(work.as_fd(), temp, (mode & libc::S_IFMT) | 0o600, rdev)
        })?;
        Ok(entry)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, caller: Caller) -> SysResult<Entry> {
        let place = self.prepare_new_entry(parent, name)?;
        let (entry, ()) = self.install(&place, parent, name, caller, libc::S_IFLNK | 0o777, |work, temp| {
            sys::symlinkat(target, work.as_fd(), temp)
        })?;
        Ok(entry)
    }

    /// Create and open a regular file; returns the entry and a handle.
    pub fn create(&self, parent: u64, name: &OsStr, mode: u32, flags: i32, caller: Caller) -> SysResult<(Entry, u64)> {
        let (entry, file) = self.create_file(parent, name, mode, flags, caller)?;
        Ok((entry, self.add_file(entry.ino, file, false)))
    }

    /// Create a regular file, open for reading and writing with `flags`'
    /// O_APPEND, O_SYNC, O_DSYNC and O_DIRECT.
    fn create_file(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> SysResult<(Entry, File)> {
        let mode = libc::S_IFREG | (mode & 0o7777);
        let flags = flags & (libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC | libc::O_DIRECT);
        let place = self.prepare_new_entry(parent, name)?;
        if !place.replaces_whiteout
            && let Some(file) = self.create_in_place(&place, name, caller, mode, flags)?
        {
            return Ok((self.installed(parent, name, mode, false)?, file));
        }
        self.install(&place, parent, name, caller, mode, |work, temp| {
            sys::openat(work.as_fd(), temp, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | flags, 0o600).map(File::from)
        })
    }

    pub fn link(&self, ino: u64, new_parent: u64, new_name: &OsStr) -> SysResult<Entry> {
        self.writable()?;
        self.check_new_name(new_name)?;
        if self.resolve(new_parent, new_name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        {
            let table = lock(&self.table);
            if table.get(ino)?.is_dir() {
                return Err(Errno::EPERM);
            }
        }
        self.copy_up(ino, false)?;
        self.copy_up(new_parent, false)?;
        let (old_dir, old_name) = self.parent_and_name(&self.location(ino)?)?;
        let new_dir = self.upper_dir(new_parent)?;
        self.link_into_place(old_dir.as_fd(), &old_name, new_dir.as_fd(), new_name)?;
        self.listing_changed(new_parent);
        self.adjust_nlink(ino, 1)?;
        let resolved = self.resolve(new_parent, new_name)?.ok_or(Errno::ENOENT)?;
        Ok(self.remember(new_parent, new_name, resolved))
    }

    // ----- removing entries -----------------------------------------------

    /// Put a whiteout at `name` in the upper directory `dir`, replacing
    /// whatever upper entry is there (atomically).
    fn whiteout(&self, dir: std::os::fd::BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
        let work = self.work()?;
        // Nothing in the upper under that name: one link of the shared
        // whiteout is atomic already.
        if self.whiteouts == WhiteoutStyle::Device {
            match self.link_shared_whiteout(work.as_fd(), dir, name) {
                Ok(()) => return Ok(()),
                Err(Errno::EEXIST) => {}
                Err(err) => return Err(err),
            }
        }
        let temp = self.temp_name();
        match self.whiteouts {
            WhiteoutStyle::Device => self.link_shared_whiteout(work.as_fd(), work.as_fd(), &temp)?,
            WhiteoutStyle::Xattr => {
                let file = sys::openat(work.as_fd(), &temp, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)?;
                drop(file);
                XattrTarget::new(work.as_fd(), &temp)?.set(&self.stack.namespace.overlay("whiteout"), b"y", 0)?;
                let marks = XattrTarget::fd(dir);
                if marks.get_opt(&self.stack.namespace.overlay("opaque"))?.is_none() {
                    marks.set(&self.stack.namespace.overlay("opaque"), b"x", 0)?;
                }
            }
        }
        let existing = match sys::fstatat(dir, name) {
            Ok(stat) => Some(stat),
            Err(Errno::ENOENT) => None,
            Err(err) => {
                crate::copyup::remove_temp(work.as_fd(), &temp);
                return Err(err);
            }
        };
        let result = match existing {
            Some(stat) if kind_of(&stat) == libc::S_IFDIR => {
                sys::renameat2(work.as_fd(), &temp, dir, name, libc::RENAME_EXCHANGE)
            }
            Some(_) => sys::renameat2(work.as_fd(), &temp, dir, name, 0),
            None => sys::renameat2(work.as_fd(), &temp, dir, name, libc::RENAME_NOREPLACE),
        };
        // After an exchange the old directory (holding only whiteouts) is
        // in the work directory under the temporary name.
        crate::copyup::remove_temp(work.as_fd(), &temp);
        result
    }

    fn note_whiteout(&self, parent: u64, name: &OsStr) {
        Monitor::count(&self.monitor.whiteouts, 1);
        self.monitor.emit(|| Event::Whiteout { path: self.shown_child_path(parent, name) });
    }

    /// Make `name` in `dir` a whiteout by linking the one whiteout inode
    /// kept in the work directory, as the kernel's overlayfs does: making a
    /// new inode per deleted file costs far more than a link.
    fn link_shared_whiteout(
        &self,
        work: std::os::fd::BorrowedFd<'_>,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
    ) -> SysResult<()> {
        let shared = OsStr::new(SHARED_WHITEOUT);
        for _ in 0..3 {
            match sys::linkat(work, shared, dir, name) {
                Err(Errno::ENOENT) => match sys::mknodat(work, shared, libc::S_IFCHR, 0) {
                    Ok(()) | Err(Errno::EEXIST) => continue,
                    Err(err) => return Err(err),
                },
                // Too many links: start a new shared whiteout.
                Err(Errno::EMLINK) => {
                    let fresh = self.temp_name();
                    sys::mknodat(work, &fresh, libc::S_IFCHR, 0)?;
                    sys::renameat2(work, &fresh, work, shared, 0)?;
                }
                other => return other,
            }
        }
        sys::mknodat(dir, name, libc::S_IFCHR, 0)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> SysResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> SysResult<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &OsStr, want_dir: bool) -> SysResult<()> {
        self.writable()?;
        let child = self.lookup(parent, name)?;
        let result = self.remove_child(parent, name, want_dir, child.ino);
        self.listing_changed(parent);
        self.forget(child.ino, 1);
        result
    }

    fn remove_child(&self, parent: u64, name: &OsStr, want_dir: bool, ino: u64) -> SysResult<()> {
        let (is_dir, in_upper) = {
            let table = lock(&self.table);
            let node = table.get(ino)?;
            (node.is_dir(), node.in_upper)
        };
        match (want_dir, is_dir) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            _ => {}
        }
        if is_dir && !self.stack.list(&self.dir_sources(ino)?)?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        // A lower hard link that was never copied up is not copied up just
        // to count its names: layer stores often link files across layers,
        // and rm -rf would copy every file. Its other names keep showing
        // the lower count, as with the kernel's default index=off.
        self.copy_up(parent, false)?;
        let upper_parent = self.upper_dir(parent)?;
        if !is_dir {
            self.keep_for_open_descriptors(ino);
        }
        // An entry not in the upper comes from a lower layer; one in the
        // upper may hide a lower one that must stay hidden.
        if !in_upper || self.lower_has(parent, name)? {
            self.whiteout(upper_parent.as_fd(), name)?;
            self.note_whiteout(parent, name);
        } else if in_upper {
            if is_dir {
                clear_whiteouts(upper_parent.as_fd(), name)?;
            }
            sys::unlinkat(upper_parent.as_fd(), name, is_dir)?;
        }
        lock(&self.table).remove_name(ino, parent, name);
        if !is_dir {
            self.adjust_nlink(ino, -1)?;
        }
        Ok(())
    }

    fn read_nlink(&self, ino: u64) -> Option<u64> {
        let index = self.index.as_ref()?;
        let xattrs = XattrTarget::new(index.as_fd(), &index_name(ino)).ok()?;
        let value = xattrs.get_opt(&self.namespace().strata("nlink")).ok()??;
        Some(u64::from_le_bytes(value.try_into().ok()?))
    }

    /// A name of a copied-up hard link was added or removed: keep its count.
    /// When the last name goes, so does the index entry.
    fn adjust_nlink(&self, ino: u64, delta: i64) -> SysResult<()> {
        let (Some(index), Some(current)) = (&self.index, lock(&self.table).get(ino)?.nlink) else {
            return Ok(());
        };
        let count = current.saturating_add_signed(delta);
        if count == 0 {
            let _ = sys::unlinkat(index.as_fd(), &index_name(ino), false);
        } else {
            XattrTarget::new(index.as_fd(), &index_name(ino))?.set(
                &self.namespace().strata("nlink"),
                &count.to_le_bytes(),
                0,
            )?;
        }
        lock(&self.table).get_mut(ino)?.nlink = Some(count);
        Ok(())
    }

    // ----- rename ---------------------------------------------------------

    pub fn rename(&self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr, flags: u32) -> SysResult<()> {
        self.writable()?;
        self.check_new_name(new_name)?;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(Errno::EINVAL);
        }
        let source = self.lookup(parent, name)?;
        let target = match self.lookup(new_parent, new_name) {
            Ok(entry) => Some(entry),
            Err(Errno::ENOENT) => None,
            Err(err) => {
                self.forget(source.ino, 1);
                return Err(err);
            }
        };
        let result = self.rename_nodes(parent, name, source.ino, new_parent, new_name, target.map(|t| t.ino), flags);
        // Both directories, and a moved directory's "..".
        for dir in [parent, new_parent, source.ino].into_iter().chain(target.map(|t| t.ino)) {
            self.listing_changed(dir);
        }
        self.forget(source.ino, 1);
        if let Some(target) = target {
            self.forget(target.ino, 1);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_nodes(
        &self,
        parent: u64,
        name: &OsStr,
        ino: u64,
        new_parent: u64,
        new_name: &OsStr,
        target: Option<u64>,
        flags: u32,
    ) -> SysResult<()> {
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & libc::RENAME_NOREPLACE != 0 && target.is_some() {
            return Err(Errno::EEXIST);
        }
        if exchange && target.is_none() {
            return Err(Errno::ENOENT);
        }
        if target == Some(ino) {
            return Ok(()); // two names of one inode: rename(2) does nothing
        }
        let source_is_dir = lock(&self.table).get(ino)?.is_dir();
        if let (Some(target), false) = (target, exchange) {
            let target_is_dir = lock(&self.table).get(target)?.is_dir();
            match (source_is_dir, target_is_dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.stack.list(&self.dir_sources(target)?)?.is_empty() => {
                    return Err(Errno::ENOTEMPTY);
                }
                _ => {}
            }
        }
        if source_is_dir && self.is_ancestor(ino, new_parent)? {
            return Err(Errno::EINVAL);
        }

        self.copy_up(parent, false)?;
        self.copy_up(new_parent, false)?;
        self.prepare_for_move(ino, parent, name)?;
        if exchange && let Some(target) = target {
            self.prepare_for_move(target, new_parent, new_name)?;
        }
        let old_dir = self.upper_dir(parent)?;
        let new_dir = self.upper_dir(new_parent)?;

        if exchange {
            self.make_opaque_if_exposed(ino, new_parent, new_name)?;
            if let Some(target) = target {
                self.make_opaque_if_exposed(target, parent, name)?;
            }
            sys::renameat2(old_dir.as_fd(), name, new_dir.as_fd(), new_name, libc::RENAME_EXCHANGE)?;
            let mut table = lock(&self.table);
            table.rename(ino, (parent, name), (new_parent, new_name));
            if let Some(target) = target {
                table.rename(target, (new_parent, new_name), (parent, name));
            }
            return Ok(());
        }

        // Make room at the destination: an upper directory there is empty
        // in the merged view but may hold whiteouts; a whiteout there cannot
        // be replaced by a directory.
        match sys::fstatat(new_dir.as_fd(), new_name) {
            Ok(stat) if kind_of(&stat) == libc::S_IFDIR => clear_whiteouts(new_dir.as_fd(), new_name)?,
            Ok(stat) if source_is_dir && target.is_none() && kind_of(&stat) != libc::S_IFDIR => {
                sys::unlinkat(new_dir.as_fd(), new_name, false)?; // a whiteout
            }
            _ => {}
        }
        self.make_opaque_if_exposed(ino, new_parent, new_name)?;
        if let Some(target) = target {
            self.keep_for_open_descriptors(target);
        }
        let leave_whiteout = self.lower_has(parent, name)?;
        let rename_flags =
            if leave_whiteout && self.whiteouts == WhiteoutStyle::Device { libc::RENAME_WHITEOUT } else { 0 };
        match sys::renameat2(old_dir.as_fd(), name, new_dir.as_fd(), new_name, rename_flags) {
            Err(Errno::EINVAL) if rename_flags != 0 => {
                sys::renameat2(old_dir.as_fd(), name, new_dir.as_fd(), new_name, 0)?;
                self.whiteout(old_dir.as_fd(), name)?;
            }
            Err(err) => return Err(err),
            Ok(()) if leave_whiteout && rename_flags == 0 => self.whiteout(old_dir.as_fd(), name)?,
            Ok(()) => {}
        }
        if leave_whiteout {
            self.note_whiteout(parent, name);
        }
        {
            let mut table = lock(&self.table);
            if let Some(target) = target {
                table.remove_name(target, new_parent, new_name);
            }
            table.rename(ino, (parent, name), (new_parent, new_name));
        }
        if let Some(target) = target {
            self.adjust_nlink(target, -1)?;
        }
        Ok(())
    }

    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> SysResult<bool> {
        let table = lock(&self.table);
        loop {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT {
                return Ok(false);
            }
            ino = table.get(ino)?.names.first().map(|link| link.parent).ok_or(Errno::ENOENT)?;
        }
    }

    /// Copy a node up before it moves. A directory with lower content gets
    /// a redirect to where that content lives (the kernel's redirect_dir),
    /// so it keeps its lower entries under the new name.
    fn prepare_for_move(&self, ino: u64, parent: u64, name: &OsStr) -> SysResult<()> {
        self.copy_up(ino, false)?;
        let indexed = lock(&self.table).get(ino)?.indexed;
        if indexed {
            // This name of a copied-up hard link may still be only in a
            // lower layer: link it from the index so it can move.
            let dir = self.upper_dir(parent)?;
            if !sys::exists_at(dir.as_fd(), name)? {
                let index = self.index.as_ref().ok_or(Errno::EROFS)?;
                self.link_into_place(index.as_fd(), &index_name(ino), dir.as_fd(), name)?;
            }
        }
        let (is_dir, lower_path) = {
            let table = lock(&self.table);
            let node = table.get(ino)?;
            (node.is_dir(), node.lowers.first().map(|s| s.path))
        };
        if is_dir && lower_path.is_some() && self.stack.namespace == XattrNamespace::User {
            // With user.* markers the kernel's overlayfs follows no
            // redirect (and refuses to read a directory that has one), so
            // rootless, the directory is copied up whole and made opaque.
            return self.copy_up_tree(ino);
        }
        if let (true, Some(lower_path)) = (is_dir, lower_path) {
            let path = self.upper_path(ino)?;
            let parent = self.stack.open_dir(0, path.parent().unwrap_or(Path::new("")), libc::O_PATH)?;
            let mut redirect = b"/".to_vec();
            redirect.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(lower_path.as_os_str()));
            let name = path.file_name().ok_or(Errno::EINVAL)?;
            XattrTarget::new(parent.as_fd(), name)?.set(&self.stack.namespace.overlay("redirect"), &redirect, 0)?;
            Monitor::count(&self.monitor.redirects, 1);
            self.monitor.emit(|| Event::Redirect {
                path: self.shown_path(ino),
                target: String::from_utf8_lossy(&redirect).into_owned(),
            });
        }
        Ok(())
    }

    /// Copy a directory and everything it shows into the upper layer, then
    /// mark it opaque: it no longer needs its lower copies.
    fn copy_up_tree(&self, ino: u64) -> SysResult<()> {
        self.copy_up(ino, false)?;
        for (_, item) in self.listing(ino)?.entries.iter().filter(|(_, item)| !item.is_dot_or_dotdot()) {
            let child = self.lookup(ino, &item.name)?;
            let result = if kind_of(&child.stat) == libc::S_IFDIR {
                self.copy_up_tree(child.ino)
            } else {
                self.copy_up(child.ino, false)
            };
            self.forget(child.ino, 1);
            result?;
        }
        let path = self.upper_path(ino)?;
        let parent = self.stack.open_dir(0, path.parent().unwrap_or(Path::new("")), libc::O_PATH)?;
        let name = path.file_name().ok_or(Errno::EINVAL)?;
        // An opaque directory hides nothing below it: its whiteouts would
        // only show up as device files to the kernel's readdir.
        drop_whiteouts(parent.as_fd(), name)?;
        self.mark_opaque(parent.as_fd(), name)?;
        lock(&self.table).get_mut(ino)?.lowers = Lowers::None;
        Ok(())
    }

    /// A directory without lower content that moves onto a name with lower
    /// content must be opaque, or that content would merge into it.
    fn make_opaque_if_exposed(&self, ino: u64, new_parent: u64, new_name: &OsStr) -> SysResult<()> {
        let (is_dir, has_lowers) = {
            let table = lock(&self.table);
            let node = table.get(ino)?;
            (node.is_dir(), !node.lowers.is_empty())
        };
        if is_dir && !has_lowers && self.lower_has(new_parent, new_name)? {
            let path = self.upper_path(ino)?;
            let parent = self.stack.open_dir(0, path.parent().unwrap_or(Path::new("")), libc::O_PATH)?;
            self.mark_opaque(parent.as_fd(), path.file_name().ok_or(Errno::EINVAL)?)?;
            Monitor::count(&self.monitor.opaque_dirs, 1);
            self.monitor.emit(|| Event::Opaque { path: self.shown_path(ino) });
        }
        Ok(())
    }

    // ----- files ----------------------------------------------------------

    fn add_file(&self, ino: u64, file: File, on_lower: bool) -> u64 {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let open = OpenFile { ino, on_lower: AtomicBool::new(on_lower), file: Mutex::new(Arc::new(file)) };
        lock(&self.files).insert(handle, Arc::new(open));
        handle
    }

    /// The file behind a handle, moved to the upper copy if one was made
    /// since the handle was opened on a lower copy.
    fn file(&self, handle: u64) -> SysResult<Arc<File>> {
        let open = lock(&self.files).get(&handle).cloned().ok_or(Errno::EBADF)?;
        if open.on_lower.load(Ordering::Relaxed) {
            let moved = lock(&self.table).get(open.ino).is_ok_and(|n| n.has_upper_data());
            if moved {
                let location = self.location(open.ino)?;
                let upper = self.open_location(&location, libc::O_RDONLY)?;
                *lock(&open.file) = Arc::new(upper);
                open.on_lower.store(false, Ordering::Relaxed);
            }
        }
        Ok(lock(&open.file).clone())
    }

    pub fn open(&self, ino: u64, flags: i32) -> SysResult<u64> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            self.writable()?;
            self.copy_up(ino, flags & libc::O_TRUNC != 0)?;
        }
        let location = self.location(ino)?;
        let keep = libc::O_ACCMODE
            | libc::O_APPEND
            | libc::O_TRUNC
            | libc::O_SYNC
            | libc::O_DSYNC
            | libc::O_DIRECT
            | libc::O_NOATIME;
        let file = match self.open_location(&location, flags & keep) {
            // O_NOATIME is only for the file's owner; drop it rather than fail.
            Err(Errno::EPERM) if flags & libc::O_NOATIME != 0 => {
                self.open_location(&location, flags & keep & !libc::O_NOATIME)?
            }
            other => other?,
        };
        let on_lower = matches!(&location, Location::Layer(source) if !self.stack.is_upper(source.layer));
        Ok(self.add_file(ino, file, on_lower))
    }

    /// The layer file behind an open handle, for FUSE passthrough (which
    /// hands it to the kernel for good): only when no copy-up can replace
    /// it, that is unless it is a lower file of a writable mount.
    pub fn passthrough_candidate(&self, handle: u64) -> Option<Arc<File>> {
        let open = lock(&self.files).get(&handle).cloned()?;
        if open.on_lower.load(Ordering::Relaxed) && !self.is_read_only() {
            return None;
        }
        let file = lock(&open.file).clone();
        Some(file)
    }

    /// The descriptor a request on `ino` reads or writes through: its open
    /// handle's, or the inode's own when the kernel sent no OPEN (handle 0).
    fn data_file(&self, ino: u64, handle: u64, write: bool) -> SysResult<Arc<File>> {
        if handle != 0 {
            return self.file(handle);
        }
        self.inode_file(ino, write)
    }

    /// Serve a file by inode, for a kernel that opens files without asking
    /// (`serve_files_by_inode`). Its data is read from where the inode is
    /// now, and the first write to a lower file copies it up, so every
    /// descriptor of the file sees the copy from then on, as with the
    /// kernel's overlayfs. Descriptors are kept in a small LRU.
    fn inode_file(&self, ino: u64, write: bool) -> SysResult<Arc<File>> {
        if write {
            self.copy_up(ino, false)?;
        }
        let cached = lock(&self.inode_files).get(&ino).cloned();
        if let Some(cached) = cached {
            let stale = cached.on_lower && lock(&self.table).get(ino).is_ok_and(|n| n.has_upper_data());
            if !stale && (cached.writable || !write) {
                return Ok(cached.file);
            }
        }
        let opened = match self.location(ino).and_then(|location| self.open_inode_file(&location, write)) {
            Ok(opened) => opened,
            // No name left (the upper path, or the index entry of a hard
            // link, is gone): the descriptor kept when it lost its last one.
            Err(Errno::ENOENT) => {
                let kept = lock(&self.unlinked).get(&ino).cloned().ok_or(Errno::ENOENT)?;
                self.open_upper_file(write, |flags| sys::reopen(kept.as_fd(), flags).map(File::from))?
            }
            Err(err) => return Err(err),
        };
        let file = opened.file.clone();
        lock(&self.inode_files).put(ino, opened);
        Ok(file)
    }

    fn open_inode_file(&self, location: &Location, write: bool) -> SysResult<InodeFile> {
        if matches!(location, Location::Layer(source) if !self.stack.is_upper(source.layer)) {
            let file = Arc::new(self.open_location(location, libc::O_RDONLY)?);
            return Ok(InodeFile { file, writable: false, on_lower: true });
        }
        self.open_upper_file(write, |flags| self.open_location(location, flags))
    }

    /// Open an upper file for reading and writing, or read-only if it
    /// cannot be written (immutable, say) and only reading is wanted.
    fn open_upper_file(&self, write: bool, open: impl Fn(i32) -> SysResult<File>) -> SysResult<InodeFile> {
        match open(libc::O_RDWR) {
            Ok(file) => Ok(InodeFile { file: Arc::new(file), writable: true, on_lower: false }),
            Err(err) if write => Err(err),
            Err(_) => Ok(InodeFile { file: Arc::new(open(libc::O_RDONLY)?), writable: false, on_lower: false }),
        }
    }

    /// Before a regular file of the upper layer loses a name: when files
    /// are served by inode, keep a descriptor of it in case that name was
    /// its last and a process still has it open.
    fn keep_for_open_descriptors(&self, ino: u64) {
        if !self.by_inode.load(Ordering::Relaxed) {
            return; // every open file has a handle, which keeps it
        }
        let (upper_file, links) = match lock(&self.table).get(ino) {
            Ok(n) => (n.kind == libc::S_IFREG && n.has_upper_data(), n.nlink),
            Err(_) => return,
        };
        if !upper_file || links.is_some_and(|count| count > 1) || lock(&self.unlinked).contains_key(&ino) {
            return; // another name of a hard link keeps it
        }
        let kept = self.location(ino).and_then(|location| self.open_location(&location, libc::O_PATH));
        match kept.and_then(|file| Ok((sys::fstat(file.as_fd())?, file))) {
            // Another name keeps it; the last one to go is kept then.
            Ok((stat, _)) if links.is_none() && stat.st_nlink > 1 => {}
            Ok((_, file)) => {
                lock(&self.unlinked).insert(ino, Arc::new(OwnedFd::from(file)));
            }
            Err(err) => log::debug!("cannot keep inode {ino} for its open descriptors: {err}"),
        }
    }

    pub fn read(&self, ino: u64, handle: u64, offset: u64, size: u32) -> SysResult<Vec<u8>> {
        let file = self.data_file(ino, handle, false)?;
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            let got = sys::pread(file.as_fd(), &mut buf[filled..], offset + filled as u64)?;
            if got == 0 {
                break;
            }
            filled += got;
        }
        buf.truncate(filled);
        Ok(buf)
    }

    pub fn write(&self, ino: u64, handle: u64, offset: u64, data: &[u8]) -> SysResult<usize> {
        let file = self.data_file(ino, handle, true)?;
        sys::pwrite(file.as_fd(), data, offset)
    }

    pub fn release(&self, handle: u64) {
        lock(&self.files).remove(&handle);
    }

    pub fn fsync(&self, ino: u64, handle: u64, data_only: bool) -> SysResult<()> {
        if !self.options.fsync {
            return Ok(());
        }
        if handle == 0 && lock(&self.table).get(ino).is_ok_and(|n| !n.has_upper_data()) {
            return Ok(()); // never written: nothing of it is in the upper
        }
        sys::fsync(self.data_file(ino, handle, false)?.as_fd(), data_only)
    }

    pub fn fallocate(&self, ino: u64, handle: u64, mode: i32, offset: u64, len: u64) -> SysResult<()> {
        sys::fallocate(self.data_file(ino, handle, true)?.as_fd(), mode, offset, len)
    }

    pub fn lseek(&self, ino: u64, handle: u64, offset: i64, whence: i32) -> SysResult<i64> {
        sys::lseek(self.data_file(ino, handle, false)?.as_fd(), offset, whence)
    }

    // ----- directories ----------------------------------------------------

    /// The listing of directory `ino`, from the cache or made anew.
    fn listing(&self, ino: u64) -> SysResult<Arc<Listing>> {
        if let Some(listing) = lock(&self.listings).get(ino) {
            return Ok(listing);
        }
        let epoch = self.listing_epoch.load(Ordering::SeqCst);
        let parent = {
            let table = lock(&self.table);
            let node = table.get(ino)?;
            if !node.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            node.names.first().map(|link| link.parent).unwrap_or(ROOT)
        };
        let sources = self.dir_sources(ino)?;
        let listed = self.stack.list_shared(&sources)?;
        let mut entries = Vec::with_capacity(listed.len() + 2);
        entries.push((1, DirItem { ino, kind: libc::DT_DIR, name: Arc::from(OsStr::new(".")) }));
        entries.push((2, DirItem { ino: parent, kind: libc::DT_DIR, name: Arc::from(OsStr::new("..")) }));
        entries.extend(listed.into_iter().map(|item| (name_offset(&item.name), item)));
        // By name among equal hashes, so a collision always resolves alike.
        entries[2..].sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
        // Two names with one offset (a 63-bit hash collision): the later
        // takes the next free offset, so offsets stay unique.
        for i in 3..entries.len() {
            if entries[i].0 <= entries[i - 1].0 {
                entries[i].0 = entries[i - 1].0 + 1;
            }
        }
        let listing = Arc::new(Listing { entries });
        let mut cache = lock(&self.listings);
        if self.listing_epoch.load(Ordering::SeqCst) == epoch {
            cache.put(ino, listing.clone());
        }
        Ok(listing)
    }

    /// Entries of directory `dir` changed: its listing is made anew at
    /// the next read.
    fn listing_changed(&self, dir: u64) {
        let mut cache = lock(&self.listings);
        cache.remove(dir);
        self.listing_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The entries of directory `ino`'s listing after offset `offset`.
    /// The read that finds none is the last of a listing read whole, which
    /// the kernel keeps from then on: the daemon's copy goes.
    fn entries_after(&self, ino: u64, offset: u64) -> SysResult<(Arc<Listing>, usize)> {
        let listing = self.listing(ino)?;
        let start = listing.entries.partition_point(|(entry_offset, _)| *entry_offset <= offset);
        if start == listing.entries.len() {
            lock(&self.listings).remove(ino);
        }
        Ok((listing, start))
    }

    /// Hand the entries after `offset` (0: from the start) to `add`, each
    /// with its own offset, until it says the reply is full.
    pub fn readdir(&self, ino: u64, offset: u64, mut add: impl FnMut(u64, &DirItem) -> bool) -> SysResult<()> {
        let (listing, start) = self.entries_after(ino, offset)?;
        for (entry_offset, item) in &listing.entries[start..] {
            if add(*entry_offset, item) {
                break;
            }
        }
        Ok(())
    }

    /// Like `readdir`, with each entry looked up: `add` gets its attributes
    /// too. Every entry the reply takes counts as a lookup of it, as the
    /// kernel counts it (except "." and "..").
    pub fn readdirplus(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, &DirItem, &Entry) -> bool,
    ) -> SysResult<()> {
        let (listing, start) = self.entries_after(ino, offset)?;
        let mut own: Option<Entry> = None;
        for (entry_offset, item) in &listing.entries[start..] {
            if item.is_dot_or_dotdot() {
                let entry = match own {
                    Some(entry) => entry,
                    None => *own.insert(Entry { ino, stat: self.getattr(ino, None)? }),
                };
                if add(*entry_offset, item, &entry) {
                    break;
                }
                continue;
            }
            let Some(resolved) = self.resolve(ino, &item.name)? else { continue };
            let layer = resolved.top.layer;
            let entry = self.remember_shared(ino, item.name.clone(), resolved);
            if add(*entry_offset, item, &entry) {
                self.forget(entry.ino, 1); // it did not fit: not handed out
                break;
            }
            self.note_served(ino, &item.name, layer);
        }
        Ok(())
    }

    pub fn fsyncdir(&self, ino: u64) -> SysResult<()> {
        if !self.options.fsync || !lock(&self.table).get(ino)?.in_upper {
            return Ok(());
        }
        let fd = self.stack.open_dir(0, &self.upper_path(ino)?, libc::O_RDONLY)?;
        sys::fsync(fd.as_fd(), false)
    }

    pub fn statfs(&self) -> SysResult<libc::statvfs> {
        sys::fstatvfs(self.stack.layers[0].root.as_fd())
    }

    /// Flush the upper layer to disk (at unmount).
    pub fn sync(&self) {
        if self.stack.has_upper && self.options.fsync {
            let _ = sys::syncfs(self.stack.layers[0].root.as_fd());
        }
    }

    // ----- extended attributes ---------------------------------------------

    fn with_xattrs<T>(&self, ino: u64, action: impl FnOnce(&XattrTarget<'_>) -> SysResult<T>) -> SysResult<T> {
        let location = self.location(ino)?;
        if ino == ROOT {
            let fd = self.open_location(&location, libc::O_PATH)?;
            return action(&XattrTarget::fd(fd.as_fd()));
        }
        let (dir, name) = self.parent_and_name(&location)?;
        action(&XattrTarget::new(dir.as_fd(), &name)?)
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> SysResult<Vec<u8>> {
        if layers::is_private_xattr(name) || lock(&self.table).get(ino)?.no_xattrs {
            return Err(Errno::ENODATA);
        }
        match self.with_xattrs(ino, |x| x.get(name)) {
            // Most files have no xattrs at all: learn that once.
            Err(Errno::ENODATA) => {
                self.listxattr(ino)?;
                Err(Errno::ENODATA)
            }
            other => other,
        }
    }

    pub fn listxattr(&self, ino: u64) -> SysResult<Vec<OsString>> {
        let names: Vec<OsString> =
            self.with_xattrs(ino, |x| x.list())?.into_iter().filter(|n| !layers::is_private_xattr(n)).collect();
        if names.is_empty() {
            lock(&self.table).get_mut(ino)?.no_xattrs = true;
        }
        Ok(names)
    }

    fn xattrs_changed(&self, ino: u64) {
        if let Ok(node) = lock(&self.table).get_mut(ino) {
            node.no_xattrs = false;
        }
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
        self.writable()?;
        if layers::is_private_xattr(name) {
            return Err(Errno::EPERM);
        }
        self.copy_up(ino, false)?;
        self.xattrs_changed(ino);
        self.with_xattrs(ino, |x| x.set(name, value, flags))
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> SysResult<()> {
        self.writable()?;
        if layers::is_private_xattr(name) {
            return Err(Errno::ENODATA);
        }
        self.copy_up(ino, false)?;
        self.with_xattrs(ino, |x| x.remove(name))
    }

    /// access(2): existence, and EROFS for writes to a read-only mount; the
    /// kernel checks permission bits itself (default_permissions).
    pub fn access(&self, ino: u64, mask: i32) -> SysResult<()> {
        self.getattr(ino, None)?;
        if mask & libc::W_OK != 0 {
            self.writable()?;
        }
        Ok(())
    }

    /// The source a node's copy-up reads from (for copyup.rs).
    pub(crate) fn open_source(&self, source: &Source, flags: i32) -> SysResult<File> {
        self.open_location(&Location::Layer(source.clone()), flags)
    }

    pub(crate) fn source_parent(&self, source: &Source) -> SysResult<(OwnedFd, OsString)> {
        self.parent_and_name(&Location::Layer(source.clone()))
    }
}

/// Where a node's visible copy is.
enum Location {
    Layer(Source),
    /// In the hard-link index of the work directory.
    Index(u64),
}

fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR | libc::S_IFBLK => "device",
        _ => "file",
    }
}

fn index_name(ino: u64) -> OsString {
    format!("{ino}").into()
}

/// Open (creating) a scratch directory inside the work directory; the
/// temporary one is emptied, since what a crash left there was never visible.
fn prepare_scratch(work_dir: std::os::fd::BorrowedFd<'_>, name: &str, empty_it: bool) -> SysResult<OwnedFd> {
    let name = OsStr::new(name);
    match sys::mkdirat(work_dir, name, 0o700) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(err) => return Err(err),
    }
    let fd = sys::openat(work_dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    if empty_it {
        for entry in sys::read_dir(fd.as_fd())? {
            crate::copyup::remove_temp(fd.as_fd(), &entry.name);
        }
    }
    Ok(fd)
}

/// Remove the whiteouts (char 0/0, or empty files with an overlay whiteout
/// xattr) from the upper directory `name`, leaving everything else.
fn drop_whiteouts(parent: std::os::fd::BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    let handle = sys::openat(parent, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for entry in sys::read_dir(handle.as_fd())? {
        let stat = sys::fstatat(handle.as_fd(), &entry.name)?;
        let whiteout = match kind_of(&stat) {
            libc::S_IFCHR => stat.st_rdev == 0,
            libc::S_IFREG if stat.st_size == 0 => {
                let xattrs = XattrTarget::new(handle.as_fd(), &entry.name)?;
                [XattrNamespace::Trusted, XattrNamespace::User]
                    .iter()
                    .any(|ns| matches!(xattrs.get_opt(&ns.overlay("whiteout")), Ok(Some(_))))
            }
            _ => false,
        };
        if whiteout {
            sys::unlinkat(handle.as_fd(), &entry.name, false)?;
        }
    }
    Ok(())
}

/// Remove the whiteouts (all that a merged-empty directory holds in the
/// upper) from the upper directory `name`, so it can be removed or replaced.
fn clear_whiteouts(parent: std::os::fd::BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    let handle = sys::openat(parent, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for entry in sys::read_dir(handle.as_fd())? {
        let stat = sys::fstatat(handle.as_fd(), &entry.name)?;
        if kind_of(&stat) == libc::S_IFDIR {
            return Err(Errno::ENOTEMPTY);
        }
        sys::unlinkat(handle.as_fd(), &entry.name, false)?;
    }
    Ok(())
}
