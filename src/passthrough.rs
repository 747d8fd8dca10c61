//! FUSE passthrough: which opens the kernel may serve itself.
//!
//! With passthrough (Linux >= 6.9, and CAP_SYS_ADMIN for the daemon) an
//! open file is tied to a "backing file" the daemon registered, and the
//! kernel reads, writes and maps that file directly: no request reaches the
//! daemon, and the page cache is the layer file's own.
//!
//! The kernel puts one rule on it, per FUSE inode: while any open of the
//! inode is passthrough, every other open must be passthrough to the *same*
//! backing file (anything else fails with EIO), and while an ordinary
//! (cached) open is live, a passthrough open fails. And the kernel opens
//! the backing file again with each opener's flags, so a writer given a
//! lower file's backing would write into the lower layer.
//!
//! Copy-up changes which file an inode is: a lower file read through
//! passthrough and then opened for writing would need a second backing
//! file, which the rule forbids. So only files that no copy-up can replace
//! are candidates: every file of a read-only mount, and files already in
//! the upper layer. A lower file of a writable mount is served by the
//! daemon (through the page cache, which keeps it across opens), and its
//! opens are counted here so that no passthrough open of the same inode is
//! attempted while they last.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FopenFlags};

use crate::sys::{self, Errno, SysResult};

/// Which file a backing was registered for: (st_dev, st_ino).
type FileIdentity = (u64, u64);

/// How one open was answered, so its release undoes the right count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpenMode {
    /// Through the daemon and the FUSE inode's page cache.
    Cached,
    /// The kernel reads and writes the backing file itself.
    Passthrough,
}

enum InodeState {
    Backed { backing: Arc<BackingId>, file: FileIdentity, opens: u32 },
    Cached { opens: u32 },
}

/// What the adapter answers an open with.
pub enum Answer {
    Passthrough(Arc<BackingId>),
    Flags(FopenFlags),
}

pub struct Passthrough {
    /// Off when the user said so, when the kernel did not grant it, or
    /// once registering a backing file failed for want of privilege.
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, InodeState>>,
    handles: Mutex<HashMap<u64, (u64, OpenMode)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Passthrough {
    pub fn new(wanted: bool) -> Self {
        Passthrough {
            enabled: AtomicBool::new(wanted),
            inodes: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }

    /// Decide how to answer the open `handle` of inode `ino`. `candidate`
    /// is the layer file behind it when no copy-up can replace that file
    /// (see the module's comment); `register` turns it into a backing id
    /// (the reply's `open_backing`); `cached_flags` are the flags of an
    /// ordinary open.
    pub fn open(
        &self,
        ino: u64,
        handle: u64,
        candidate: Option<&File>,
        cached_flags: FopenFlags,
        register: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> SysResult<Answer> {
        if !self.is_enabled() {
            return Ok(Answer::Flags(cached_flags));
        }
        let identity = match candidate.map(|file| sys::fstat(file.as_fd())) {
            Some(Ok(stat)) => Some((stat.st_dev, stat.st_ino)),
            _ => None,
        };
        let mut inodes = lock(&self.inodes);
        let (mode, answer) = match (inodes.get_mut(&ino), identity) {
            (Some(InodeState::Backed { backing, file, opens }), Some(identity)) if *file == identity => {
                *opens += 1;
                (OpenMode::Passthrough, Answer::Passthrough(backing.clone()))
            }
            (Some(InodeState::Backed { .. }), _) => {
                // Cannot happen while only files no copy-up replaces are
                // backed; refuse rather than let the kernel mix files.
                log::error!("inode {ino} is open through passthrough to another file");
                return Err(Errno::EBUSY);
            }
            (Some(InodeState::Cached { opens }), _) => {
                *opens += 1;
                (OpenMode::Cached, Answer::Flags(cached_flags))
            }
            (None, None) => {
                inodes.insert(ino, InodeState::Cached { opens: 1 });
                (OpenMode::Cached, Answer::Flags(cached_flags))
            }
            (None, Some(identity)) => match register(candidate.expect("identity comes from the candidate")) {
                Ok(backing) => {
                    let backing = Arc::new(backing);
                    inodes.insert(ino, InodeState::Backed { backing: backing.clone(), file: identity, opens: 1 });
                    (OpenMode::Passthrough, Answer::Passthrough(backing))
                }
                Err(err) => {
                    // EPERM: the daemon lacks CAP_SYS_ADMIN in the initial
                    // namespace (rootless); ELOOP: the layers are on a
                    // stacked filesystem. Both hold for every file.
                    let everywhere = [libc::EPERM, libc::ENOTTY, libc::EINVAL, libc::ENOSYS, libc::ELOOP];
                    if err.raw_os_error().is_some_and(|code| everywhere.contains(&code)) {
                        log::info!("FUSE passthrough unavailable ({err}); the daemon serves reads and writes");
                        self.disable();
                    } else {
                        log::debug!("no passthrough for inode {ino}: {err}");
                    }
                    inodes.insert(ino, InodeState::Cached { opens: 1 });
                    (OpenMode::Cached, Answer::Flags(cached_flags))
                }
            },
        };
        drop(inodes);
        lock(&self.handles).insert(handle, (ino, mode));
        Ok(answer)
    }

    /// The open `handle` was released; the last passthrough open of an
    /// inode closes its backing id.
    pub fn release(&self, handle: u64) {
        let Some((ino, mode)) = lock(&self.handles).remove(&handle) else { return };
        let mut inodes = lock(&self.inodes);
        let now_unused = match (inodes.get_mut(&ino), mode) {
            (Some(InodeState::Backed { opens, .. }), OpenMode::Passthrough)
            | (Some(InodeState::Cached { opens }), OpenMode::Cached) => {
                *opens -= 1;
                *opens == 0
            }
            _ => false,
        };
        if now_unused {
            inodes.remove(&ino);
        }
    }
}
