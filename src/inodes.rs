//! The inode table: what the kernel has looked up, and where each lives.
//!
//! A node holds its name(s) and parent, never a full path: a rename of a
//! directory then moves every node below it for free. Lower-layer locations
//! are kept as paths because lower layers never change while mounted.
//! The inode number is the stable one from the layer stack, so hard links in
//! a layer are one node with several names.
//!
//! The table holds one node per inode the kernel caches, so after a walk of
//! a large tree it holds hundreds of thousands: a node is kept small (one
//! heap allocation for a typical lower file, its name), names are shared
//! reference-counted strings, and lower files share their directory's path.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::layers::{LayerId, Source};
use crate::sys::{Errno, SysResult};

/// The FUSE root inode number.
pub const ROOT: u64 = 1;

/// One name of a node: the directory it is in and its name there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub parent: u64,
    pub name: Arc<OsStr>,
}

/// Every name a node is known by; the first one is used to reach it.
/// Almost every node has exactly one, kept without a separate allocation.
#[derive(Clone, Debug, Default)]
pub struct Names {
    first: Option<Link>,
    /// Further names (hard links looked up through several names).
    others: Vec<Link>,
}

impl Names {
    pub fn one(parent: u64, name: Arc<OsStr>) -> Self {
        Names { first: Some(Link { parent, name }), others: Vec::new() }
    }

    pub fn first(&self) -> Option<&Link> {
        self.first.as_ref()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Link> {
        self.first.iter().chain(self.others.iter())
    }

    fn contains(&self, parent: u64, name: &OsStr) -> bool {
        self.iter().any(|link| link.parent == parent && *link.name == *name)
    }

    fn push(&mut self, link: Link) {
        match self.first {
            None => self.first = Some(link),
            Some(_) => self.others.push(link),
        }
    }

    fn remove(&mut self, parent: u64, name: &OsStr) {
        self.others.retain(|link| !(link.parent == parent && *link.name == *name));
        if self.first.as_ref().is_some_and(|link| link.parent == parent && *link.name == *name) {
            // The next name, if any, becomes the one the node is reached by.
            self.first = if self.others.is_empty() { None } else { Some(self.others.remove(0)) };
        }
    }

    /// Replace the name (from) by `to`; when the node was not known by
    /// `from`, `to` becomes its first name.
    fn rename(&mut self, from: (u64, &OsStr), to: Link) {
        let slot = self
            .first
            .iter_mut()
            .chain(self.others.iter_mut())
            .find(|link| link.parent == from.0 && *link.name == *from.1);
        match slot {
            Some(slot) => *slot = to,
            None => {
                if let Some(previous) = self.first.replace(to) {
                    self.others.insert(0, previous);
                }
            }
        }
    }
}

/// Where a node's lower copies are. Lower layers never change while
/// mounted, so these are paths inside the layers.
#[derive(Clone, Debug, Default)]
pub enum Lowers {
    /// Nothing below: an upper-only entry, or a directory made opaque.
    #[default]
    None,
    /// A non-directory served from a lower layer (until copied up): the
    /// lower directory holding it, shared with its siblings, and its name
    /// there (usually shared with the node's own name).
    Entry { layer: u32, dir: Arc<Path>, name: Arc<OsStr> },
    /// A directory: every lower copy that merges into it, topmost first,
    /// by full path (which its children share as their `dir`).
    Dirs(Box<[(u32, Arc<Path>)]>),
}

/// Layer ids are stored as u32 to keep nodes small: a stack holds one open
/// descriptor per layer, so it never comes near 2^32 layers.
fn compact_layer(layer: LayerId) -> u32 {
    u32::try_from(layer).expect("fewer than 2^32 layers")
}

impl Lowers {
    /// The lower copies of a directory, from its sources (topmost first).
    pub fn dirs<'a>(sources: impl IntoIterator<Item = &'a Source>) -> Self {
        let copies: Box<[(u32, Arc<Path>)]> =
            sources.into_iter().map(|source| (compact_layer(source.layer), Arc::from(source.path.as_path()))).collect();
        if copies.is_empty() { Lowers::None } else { Lowers::Dirs(copies) }
    }

    pub fn len(&self) -> usize {
        match self {
            Lowers::None => 0,
            Lowers::Entry { .. } => 1,
            Lowers::Dirs(copies) => copies.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The topmost lower copy.
    pub fn first(&self) -> Option<Source> {
        self.sources().next()
    }

    /// Every lower copy, topmost first, as the layer stack takes them.
    pub fn sources(&self) -> impl Iterator<Item = Source> + '_ {
        let (entry, dirs) = match self {
            Lowers::None => (None, &[][..]),
            Lowers::Entry { layer, dir, name } => {
                (Some(Source { layer: *layer as LayerId, path: dir.join(&**name) }), &[][..])
            }
            Lowers::Dirs(copies) => (None, &copies[..]),
        };
        entry
            .into_iter()
            .chain(dirs.iter().map(|(layer, path)| Source { layer: *layer as LayerId, path: path.to_path_buf() }))
    }

    /// This directory's path in `layer`, shared, if it has a copy there.
    fn dir_in(&self, layer: u32, path: &Path) -> Option<&Arc<Path>> {
        match self {
            Lowers::Dirs(copies) => copies.iter().find(|(l, p)| *l == layer && **p == *path).map(|(_, p)| p),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Node {
    /// Every name the node is known by; empty once the last name is removed.
    pub names: Names,
    /// Lower copies: for a directory every copy that merges into it,
    /// for anything else the one it comes from (until copied up).
    pub lowers: Lowers,
    /// st_nlink of the lower copy (its names in that layer).
    pub lower_nlink: u64,
    /// The link count the mount shows for a hard link whose names span
    /// layers (a copied-up lower hard link), kept in the copy's
    /// `strata.nlink` xattr because no single layer knows it.
    pub nlink: Option<u64>,
    /// How many lookups the kernel holds.
    pub lookups: u64,
    /// The file type (S_IFMT bits).
    pub kind: u32,
    /// Present in the upper layer at its merged path.
    pub in_upper: bool,
    /// A lower hard link already copied up: its data is in the index.
    pub indexed: bool,
    /// Known to have no extended attributes a user can see: getxattr
    /// (asked by `ls -l` for every file) is answered without I/O.
    pub no_xattrs: bool,
    /// Used since the eviction clock last passed (see `InodeTable::cold`).
    recently_used: bool,
}

impl Node {
    pub fn new(names: Names, kind: u32, in_upper: bool, lowers: Lowers) -> Self {
        Node {
            names,
            lowers,
            lower_nlink: 0,
            nlink: None,
            lookups: 0,
            kind,
            in_upper,
            indexed: false,
            no_xattrs: false,
            recently_used: true,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// Its data is in the upper layer: its own copy, or (a copied-up lower
    /// hard link) the index entry every upper name shares.
    pub fn has_upper_data(&self) -> bool {
        self.in_upper || self.indexed
    }

    /// A directory that merges content of more than one layer.
    pub fn is_merged_dir(&self) -> bool {
        self.is_dir() && (self.lowers.len() + usize::from(self.in_upper)) > 1
    }
}

/// The nodes live in a vector of slots indexed by a small map, rather than
/// in a map of nodes: growing a vector of this size is a `mremap` of its
/// pages, where rehashing a map of nodes would briefly need the old and the
/// new table at once (half again the table's memory, at the peak).
#[derive(Default)]
pub struct InodeTable {
    slots: Vec<Option<Node>>,
    /// Slots freed by forget, reused first.
    free: Vec<u32>,
    /// Inode number to slot.
    index: HashMap<u64, u32>,
    /// Where the eviction clock stopped last time.
    clock_hand: usize,
}

impl InodeTable {
    pub fn new(root: Node) -> Self {
        let mut table = InodeTable::default();
        table.insert(ROOT, root);
        table
    }

    fn insert(&mut self, ino: u64, node: Node) {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(node);
                slot
            }
            None => {
                self.slots.push(Some(node));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 cached inodes")
            }
        };
        self.index.insert(ino, slot);
    }

    fn remove(&mut self, ino: u64) {
        if let Some(slot) = self.index.remove(&ino) {
            self.slots[slot as usize] = None;
            self.free.push(slot);
        }
    }

    pub fn get(&self, ino: u64) -> SysResult<&Node> {
        let slot = *self.index.get(&ino).ok_or(Errno::ESTALE)?;
        self.slots[slot as usize].as_ref().ok_or(Errno::ESTALE)
    }

    pub fn get_mut(&mut self, ino: u64) -> SysResult<&mut Node> {
        let slot = *self.index.get(&ino).ok_or(Errno::ESTALE)?;
        self.slots[slot as usize].as_mut().ok_or(Errno::ESTALE)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Mark a node as used now, so the eviction clock passes it over once.
    pub fn touch(&mut self, ino: u64) {
        if let Ok(node) = self.get_mut(ino) {
            node.recently_used = true;
        }
    }

    /// The path of a node from the merged root (which is also its path in
    /// the upper layer).
    pub fn path(&self, ino: u64) -> SysResult<PathBuf> {
        let mut parts: Vec<Arc<OsStr>> = Vec::new();
        let mut current = ino;
        while current != ROOT {
            let link = self.get(current)?.names.first().ok_or(Errno::ENOENT)?;
            parts.push(link.name.clone());
            current = link.parent;
            if parts.len() > 4096 {
                return Err(Errno::ELOOP);
            }
        }
        Ok(parts.iter().rev().map(|name| &**name).collect())
    }

    /// The lower copy of a non-directory found as `name` in `parent`:
    /// `source` is where the layer stack found it. Its directory's path is
    /// shared with the parent node's copy in that layer when it has one
    /// (always, but for a lookup racing a rename), and its name with `name`.
    pub fn lower_entry(&self, parent: u64, name: &Arc<OsStr>, source: &Source) -> Lowers {
        let layer = compact_layer(source.layer);
        let dir_path = source.path.parent().unwrap_or(Path::new(""));
        let dir = self
            .get(parent)
            .ok()
            .and_then(|node| node.lowers.dir_in(layer, dir_path))
            .cloned()
            .unwrap_or_else(|| Arc::from(dir_path));
        let name = match source.path.file_name() {
            Some(found) if found == &**name => name.clone(),
            Some(found) => Arc::from(found),
            None => Arc::from(OsStr::new("")),
        };
        Lowers::Entry { layer, dir, name }
    }

    /// Record a lookup of `node` under (parent, name): a new node, another
    /// name of a known one (a hard link), or the same name again.
    pub fn remember(&mut self, ino: u64, fresh: Node) {
        let Some(link) = fresh.names.first().cloned() else { return };
        match self.get_mut(ino) {
            Ok(known) if known.names.first().is_some() => {
                known.lookups += 1;
                known.recently_used = true;
                if !known.names.contains(link.parent, &link.name) {
                    known.names.push(link);
                }
                // Fresher knowledge of where it lives (a lookup after a
                // change made elsewhere, e.g. the other link copied up).
                if fresh.in_upper && !known.in_upper {
                    known.in_upper = true;
                }
                known.indexed |= fresh.indexed;
                if fresh.nlink.is_some() {
                    known.nlink = fresh.nlink;
                }
            }
            Ok(stale) => {
                // The inode number was reused by a new file after the old
                // one lost its last name: take the new identity, keep the
                // kernel's lookup count.
                let lookups = stale.lookups + 1;
                *stale = fresh;
                stale.lookups = lookups;
            }
            Err(_) => {
                let mut fresh = fresh;
                fresh.lookups = 1;
                self.insert(ino, fresh);
            }
        }
    }

    /// The kernel dropped `count` lookups; true if that was the last and
    /// the node is gone.
    pub fn forget(&mut self, ino: u64, count: u64) -> bool {
        if ino == ROOT {
            return false;
        }
        let Ok(node) = self.get_mut(ino) else { return false };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups > 0 {
            return false;
        }
        self.remove(ino);
        true
    }

    /// A name of `ino` went away.
    pub fn remove_name(&mut self, ino: u64, parent: u64, name: &OsStr) {
        if let Ok(node) = self.get_mut(ino) {
            node.names.remove(parent, name);
        }
    }

    /// A name of `ino` moved.
    pub fn rename(&mut self, ino: u64, from: (u64, &OsStr), to: (u64, &OsStr)) {
        if let Ok(node) = self.get_mut(ino) {
            node.names.rename(from, Link { parent: to.0, name: Arc::from(to.1) });
        }
    }

    /// Up to `wanted` names (parent, name) of nodes not used since the
    /// clock hand last passed them, in at most one turn of the clock: the
    /// second-chance approximation of least recently used. A node used
    /// since is passed over (and its mark cleared), so right after a walk
    /// the first call may find nothing and the next finds plenty. The root
    /// (slot 0, never freed) is never among them. The caller asks the
    /// kernel to drop these entries; the kernel then forgets the nodes it
    /// does not hold for another reason (an open file, a directory in use).
    pub fn cold(&mut self, wanted: usize) -> Vec<Link> {
        let mut found = Vec::new();
        let total = self.slots.len();
        for _ in 0..total {
            if found.len() >= wanted {
                break;
            }
            let hand = self.clock_hand % total;
            self.clock_hand = hand + 1;
            if hand == 0 {
                continue; // the root
            }
            let Some(node) = self.slots[hand].as_mut() else { continue };
            if std::mem::take(&mut node.recently_used) {
                continue;
            }
            if let Some(link) = node.names.first() {
                found.push(link.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Arc<OsStr> {
        Arc::from(OsStr::new(text))
    }

    fn file(parent: u64, text: &str) -> Node {
        Node::new(Names::one(parent, name(text)), libc::S_IFREG, true, Lowers::None)
    }

    fn root() -> Node {
        Node::new(Names::default(), libc::S_IFDIR, true, Lowers::None)
    }

    #[test]
    fn hard_links_keep_every_name_and_the_next_takes_over() {
        let mut table = InodeTable::new(root());
        table.remember(5, file(ROOT, "a"));
        table.remember(5, file(ROOT, "b"));
        assert_eq!(table.get(5).unwrap().lookups, 2);
        assert_eq!(table.get(5).unwrap().names.iter().count(), 2);
        table.remove_name(5, ROOT, OsStr::new("a"));
        assert_eq!(table.path(5).unwrap(), PathBuf::from("b"));
        table.rename(5, (ROOT, OsStr::new("b")), (ROOT, OsStr::new("c")));
        assert_eq!(table.path(5).unwrap(), PathBuf::from("c"));
        table.forget(5, 2);
        assert!(table.get(5).is_err());
        // The freed slot is reused.
        table.remember(6, file(ROOT, "d"));
        assert_eq!(table.slots.len(), 2);
    }

    #[test]
    fn lower_files_share_their_directory_path() {
        let mut table = InodeTable::new(root());
        let dir_source = Source { layer: 1, path: PathBuf::from("usr/lib") };
        let dir = Node::new(Names::one(ROOT, name("lib")), libc::S_IFDIR, false, Lowers::dirs([&dir_source]));
        table.remember(7, dir);
        let lowers = table.lower_entry(7, &name("x"), &Source { layer: 1, path: PathBuf::from("usr/lib/x") });
        let Lowers::Entry { dir, .. } = &lowers else { panic!("not an entry") };
        let Lowers::Dirs(copies) = &table.get(7).unwrap().lowers else { panic!("not dirs") };
        assert!(Arc::ptr_eq(dir, &copies[0].1));
        assert_eq!(lowers.first(), Some(Source { layer: 1, path: PathBuf::from("usr/lib/x") }));
    }

    #[test]
    fn the_clock_skips_the_root_and_recently_used_nodes() {
        let mut table = InodeTable::new(root());
        for ino in 2..10 {
            table.remember(ino, file(ROOT, &format!("f{ino}")));
        }
        // Everything was just used: one turn only clears the marks.
        assert!(table.cold(3).is_empty());
        let names = |links: Vec<Link>| links.iter().map(|l| l.name.to_string_lossy().into_owned()).collect::<Vec<_>>();
        assert_eq!(names(table.cold(3)), ["f2", "f3", "f4"]);
        table.touch(6);
        assert_eq!(names(table.cold(100)), ["f5", "f7", "f8", "f9", "f2", "f3", "f4"]);
    }
}
