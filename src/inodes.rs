//! The inode table: what the kernel has looked up, and where each lives.
//!
//! A node holds its name(s) and parent, never a full path: a rename of a
//! directory then moves every node below it for free. Lower-layer locations
//! are kept as paths because lower layers never change while mounted.
//! The inode number is the stable one from the layer stack, so hard links in
//! a layer are one node with several names.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

use crate::layers::Source;
use crate::sys::{Errno, SysResult};

/// The FUSE root inode number.
pub const ROOT: u64 = 1;

#[derive(Debug)]
pub struct Node {
    /// Every name the node is known by as (parent inode, name); the first
    /// one is used to reach it. Empty once the last name is removed.
    pub names: Vec<(u64, OsString)>,
    /// The file type (S_IFMT bits).
    pub kind: u32,
    /// Present in the upper layer at its merged path.
    pub in_upper: bool,
    /// Lower copies: for a directory every copy that merges into it,
    /// for anything else the one it comes from (until copied up).
    pub lowers: Vec<Source>,
    /// A lower hard link already copied up: its data is in the index.
    pub indexed: bool,
    /// st_nlink of the lower copy (its names in that layer).
    pub lower_nlink: u64,
    /// The link count the mount shows for a hard link whose names span
    /// layers (a copied-up lower hard link), kept in the copy's
    /// `strata.nlink` xattr because no single layer knows it.
    pub nlink: Option<u64>,
    /// Known to have no extended attributes a user can see: getxattr
    /// (asked by `ls -l` for every file) is answered without I/O.
    pub no_xattrs: bool,
    /// How many lookups the kernel holds.
    pub lookups: u64,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// A directory that merges content of more than one layer.
    pub fn is_merged_dir(&self) -> bool {
        self.is_dir() && (self.lowers.len() + usize::from(self.in_upper)) > 1
    }
}

#[derive(Default)]
pub struct InodeTable {
    nodes: HashMap<u64, Node>,
}

impl InodeTable {
    pub fn new(root: Node) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, root);
        InodeTable { nodes }
    }

    pub fn get(&self, ino: u64) -> SysResult<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ESTALE)
    }

    pub fn get_mut(&mut self, ino: u64) -> SysResult<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ESTALE)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The path of a node from the merged root (which is also its path in
    /// the upper layer).
    pub fn path(&self, ino: u64) -> SysResult<PathBuf> {
        let mut parts = Vec::new();
        let mut current = ino;
        while current != ROOT {
            let node = self.get(current)?;
            let (parent, name) = node.names.first().ok_or(Errno::ENOENT)?;
            parts.push(name.clone());
            current = *parent;
            if parts.len() > 4096 {
                return Err(Errno::ELOOP);
            }
        }
        Ok(parts.iter().rev().collect())
    }

    /// Record a lookup of `node` under (parent, name): a new node, another
    /// name of a known one (a hard link), or the same name again.
    pub fn remember(&mut self, ino: u64, fresh: Node) {
        let (parent, name) = fresh.names[0].clone();
        match self.nodes.get_mut(&ino) {
            Some(known) if !known.names.is_empty() => {
                known.lookups += 1;
                if !known.names.iter().any(|(p, n)| *p == parent && *n == name) {
                    known.names.push((parent, name));
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
            Some(stale) => {
                // The inode number was reused by a new file after the old
                // one lost its last name: take the new identity, keep the
                // kernel's lookup count.
                let lookups = stale.lookups + 1;
                *stale = fresh;
                stale.lookups = lookups;
            }
            None => {
                let mut fresh = fresh;
                fresh.lookups = 1;
                self.nodes.insert(ino, fresh);
            }
        }
    }

    /// The kernel dropped `count` lookups.
    pub fn forget(&mut self, ino: u64, count: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(count);
            if node.lookups == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    /// A name of `ino` went away.
    pub fn remove_name(&mut self, ino: u64, parent: u64, name: &OsString) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.names.retain(|(p, n)| !(*p == parent && n == name));
        }
    }

    /// A name of `ino` moved.
    pub fn rename(&mut self, ino: u64, from: (u64, &OsString), to: (u64, OsString)) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            match node.names.iter_mut().find(|(p, n)| *p == from.0 && n == from.1) {
                Some(slot) => *slot = to,
                None => node.names.insert(0, to),
            }
        }
    }
}
