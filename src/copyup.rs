//! Copy-up: building the upper copy of a lower entry in the work directory.
//!
//! The copy is complete (data with holes, owner, mode, times, xattrs) and,
//! for regular files, on disk before the caller renames it into place, so
//! whatever moment the daemon is killed at, the upper layer shows either no
//! copy or a whole one. A temporary left behind is removed at the next mount.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};

use crate::layers::{self, Source};
use crate::sys::{self, Errno, SetTime, SysResult, XattrTarget};
use crate::unionfs::UnionFs;

/// Build a copy of `source` (of file type `kind`) as `temp` in `work`;
/// returns how many bytes of data were copied.
pub fn copy_entry(
    fs: &UnionFs,
    source: &Source,
    kind: u32,
    work: BorrowedFd<'_>,
    temp: &OsStr,
    ino: u64,
    skip_data: bool,
) -> SysResult<u64> {
    let (source_dir, source_name) = fs.source_parent(source)?;
    let mut copied = 0;
    let stat = sys::fstatat(source_dir.as_fd(), &source_name)?;
    if stat.st_mode & libc::S_IFMT != kind {
        return Err(Errno::ESTALE); // lower layers must not change under a mount
    }
    match kind {
        libc::S_IFDIR => sys::mkdirat(work, temp, 0o700)?,
        libc::S_IFREG => {
            let target = sys::openat(work, temp, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)?;
            let target = std::fs::File::from(target);
            if !skip_data {
                let data = fs.open_source(source, libc::O_RDONLY)?;
                sys::copy_file_data(&data, &target, stat.st_size as u64)?;
                copied = stat.st_size as u64;
            }
            if fs.fsync_copies() {
                sys::fsync(target.as_fd(), false)?;
            }
        }
        libc::S_IFLNK => {
            let target = sys::readlinkat(source_dir.as_fd(), &source_name)?;
            sys::symlinkat(&target, work, temp)?;
        }
        _ => sys::mknodat(work, temp, kind | 0o600, stat.st_rdev)?,
    }

    // Extended attributes, except the overlay's own markers of the lower
    // copy (an opaque or redirect mark there means nothing up here).
    let from = XattrTarget::new(source_dir.as_fd(), &source_name)?;
    let to = XattrTarget::new(work, temp)?;
    for name in from.list()? {
        if layers::is_private_xattr(&name) {
            continue;
        }
        match from.get(&name) {
            Ok(value) => match to.set(&name, &value, 0) {
                Ok(()) => {}
                // security.selinux and friends may be refused by the upper
                // filesystem; the kernel skips them too.
                Err(Errno::EOPNOTSUPP | Errno::EPERM) if name.to_string_lossy().starts_with("security.") => {}
                Err(err) => return Err(err),
            },
            Err(Errno::ENODATA) => {}
            Err(err) => return Err(err),
        }
    }
    // The inode number the mount shows must survive the copy.
    to.set(&fs.namespace().strata("origin"), &ino.to_le_bytes(), 0)?;

    // Owner before mode: chown clears setuid/setgid bits.
    sys::fchownat(work, temp, Some(stat.st_uid), Some(stat.st_gid))?;
    if kind != libc::S_IFLNK {
        let fd = sys::openat(work, temp, libc::O_PATH, 0)?;
        sys::fchmod_fd(fd.as_fd(), stat.st_mode & 0o7777)?;
    }
    // security.capability is dropped by chown; put it back.
    if let Ok(Some(cap)) = from.get_opt(OsStr::new("security.capability")) {
        let _ = to.set(OsStr::new("security.capability"), &cap, 0);
    }
    let atime = libc::timespec { tv_sec: stat.st_atime, tv_nsec: stat.st_atime_nsec };
    let mtime = libc::timespec { tv_sec: stat.st_mtime, tv_nsec: stat.st_mtime_nsec };
    sys::utimensat(work, temp, SetTime::At(atime), SetTime::At(mtime))?;
    Ok(copied)
}

/// Remove a temporary entry of the work directory, whatever it is.
pub fn remove_temp(work: BorrowedFd<'_>, name: &OsStr) {
    match sys::fstatat(work, name) {
        Ok(stat) if stat.st_mode & libc::S_IFMT == libc::S_IFDIR => {
            if let Ok(dir) = sys::openat(work, name, libc::O_PATH | libc::O_DIRECTORY, 0)
                && let Ok(entries) = sys::read_dir(dir.as_fd())
            {
                for entry in entries {
                    remove_temp(dir.as_fd(), &entry.name);
                }
            }
            let _ = sys::unlinkat(work, name, true);
        }
        Ok(_) => {
            let _ = sys::unlinkat(work, name, false);
        }
        Err(_) => {}
    }
}
