//! Safe wrappers around the raw Linux calls Strata needs.
//!
//! Every `unsafe` block of the project lives here. Each wrapper works relative
//! to a directory file descriptor and never follows a symlink in the final
//! component, because layer content is untrusted: a layer may hold a symlink
//! to `/etc` where a directory is expected, and following it would escape the
//! layer. Paths of more than one component go through [`open_beneath`], which
//! refuses symlinks and `..` escapes in every component.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

pub use nix::errno::Errno;

/// The result of a raw call: the value, or the errno the kernel gave.
pub type SysResult<T> = Result<T, Errno>;

pub type Stat = libc::stat;

/// A stat with every field zero.
pub fn empty_stat() -> Stat {
    unsafe { std::mem::zeroed() }
}

fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn check_size(ret: libc::ssize_t) -> SysResult<usize> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret as usize) }
}

/// A C string from a name or path; an interior NUL byte is EINVAL.
pub fn cstr(name: &OsStr) -> SysResult<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// Open `path` (relative, possibly several components, "" for the directory
/// itself) beneath `root`. No component may be a symlink and no `..` may
/// leave `root`: this is the one place where a layer path is resolved.
pub fn open_beneath(root: BorrowedFd<'_>, path: &Path, flags: i32) -> SysResult<OwnedFd> {
    // A path longer than the kernel takes in one call (PATH_MAX) is walked
    // in pieces, each resolved beneath the directory the previous one opened.
    const PIECE: usize = 2048;
    if path.as_os_str().len() > PIECE {
        let mut pieces = Vec::new();
        let mut current = PathBuf::new();
        for component in path.iter() {
            if !current.as_os_str().is_empty() && current.as_os_str().len() + component.len() + 1 > PIECE {
                pieces.push(std::mem::take(&mut current));
            }
            current.push(component);
        }
        pieces.push(current);
        let (last, leading) = pieces.split_last().ok_or(Errno::EINVAL)?;
        let mut dir: Option<OwnedFd> = None;
        for piece in leading {
            let base = dir.as_ref().map(|d| d.as_fd()).unwrap_or(root);
            dir = Some(open_beneath_once(base, piece, libc::O_PATH | libc::O_DIRECTORY)?);
        }
        let base = dir.as_ref().map(|d| d.as_fd()).unwrap_or(root);
        return open_beneath_once(base, last, flags);
    }
    open_beneath_once(root, path, flags)
}

fn open_beneath_once(root: BorrowedFd<'_>, path: &Path, flags: i32) -> SysResult<OwnedFd> {
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    match openat2(root, path, flags | libc::O_NOFOLLOW, resolve) {
        Err(Errno::ENOSYS) => open_beneath_walk(root, path, flags),
        other => other,
    }
}

/// openat2(2) of `path` ("" for `root` itself) with the given resolve
/// rules, O_CLOEXEC added.
fn openat2(root: BorrowedFd<'_>, path: &Path, flags: i32, resolve: u64) -> SysResult<OwnedFd> {
    let path = if path.as_os_str().is_empty() { Path::new(".") } else { path };
    let c_path = cstr(path.as_os_str())?;
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    loop {
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                c_path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret >= 0 {
            return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
        }
        match Errno::last() {
            Errno::EAGAIN | Errno::EINTR => continue,
            err => return Err(err),
        }
    }
}

/// Fallback for kernels without openat2: walk one component at a time, each
/// opened with O_NOFOLLOW, refusing `..`.
fn open_beneath_walk(root: BorrowedFd<'_>, path: &Path, flags: i32) -> SysResult<OwnedFd> {
    let components: Vec<&OsStr> = path.iter().filter(|c| *c != OsStr::new(".")).collect();
    if components.iter().any(|c| *c == OsStr::new("..") || *c == OsStr::new("/")) {
        return Err(Errno::EXDEV);
    }
    let mut current = openat(root, OsStr::new("."), libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for (i, component) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let step_flags = if last { flags } else { libc::O_PATH | libc::O_DIRECTORY };
        current = openat(current.as_fd(), component, step_flags, 0)?;
    }
    if components.is_empty() && flags != libc::O_PATH | libc::O_DIRECTORY {
        current = openat(current.as_fd(), OsStr::new("."), flags, 0)?;
    }
    Ok(current)
}

/// openat with O_NOFOLLOW and O_CLOEXEC always added.
pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    let c_name = cstr(name)?;
    let fd = check(unsafe {
        libc::openat(dir.as_raw_fd(), c_name.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode as libc::c_uint)
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// lstat of `name` inside `dir`.
pub fn fstatat(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<Stat> {
    let c_name = cstr(name)?;
    let mut st: Stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstatat(dir.as_raw_fd(), c_name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

pub fn fstat(fd: BorrowedFd<'_>) -> SysResult<Stat> {
    let mut st: Stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// Whether `name` exists in `dir` (without following a symlink).
pub fn exists_at(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<bool> {
    match fstatat(dir, name) {
        Ok(_) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> SysResult<()> {
    let c_name = cstr(name)?;
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c_name.as_ptr(), mode) })?;
    Ok(())
}

/// mkdirat(2) by the owner-to-be: the calling thread's filesystem ids
/// (which are its own, not the process's) are `uid` and `gid` for the call,
/// so the directory has its owner from the start, and the kernel checks
/// that owner's right to write in `dir`. EPERM if the ids cannot be taken.
pub fn mkdirat_as(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, uid: u32, gid: u32) -> SysResult<()> {
    let c_name = cstr(name)?;
    // setfsuid/setfsgid return the previous id whether or not they changed
    // it; asking with an invalid id (-1) reads the one in force.
    let set_fsgid = |id: u32| unsafe { libc::syscall(libc::SYS_setfsgid, id) as u32 };
    let set_fsuid = |id: u32| unsafe { libc::syscall(libc::SYS_setfsuid, id) as u32 };
    let (old_gid, old_uid) = (set_fsgid(gid), set_fsuid(uid));
    let taken = set_fsgid(u32::MAX) == gid && set_fsuid(u32::MAX) == uid;
    let made =
        if taken { check(unsafe { libc::mkdirat(dir.as_raw_fd(), c_name.as_ptr(), mode) }) } else { Err(Errno::EPERM) };
    set_fsuid(old_uid);
    set_fsgid(old_gid);
    if set_fsuid(u32::MAX) != old_uid || set_fsgid(u32::MAX) != old_gid {
        // Never seen: a thread left with another owner's ids would act
        // for that owner from now on. Stop rather than serve so.
        log::error!("cannot restore the daemon thread's filesystem ids");
        std::process::abort();
    }
    made.map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> SysResult<()> {
    let c_name = cstr(name)?;
    check(unsafe { libc::mknodat(dir.as_raw_fd(), c_name.as_ptr(), mode, rdev) })?;
    Ok(())
}

pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    let c_target = cstr(target)?;
    let c_name = cstr(name)?;
    check(unsafe { libc::symlinkat(c_target.as_ptr(), dir.as_raw_fd(), c_name.as_ptr()) })?;
    Ok(())
}

pub fn linkat(old_dir: BorrowedFd<'_>, old_name: &OsStr, new_dir: BorrowedFd<'_>, new_name: &OsStr) -> SysResult<()> {
    let c_old = cstr(old_name)?;
    let c_new = cstr(new_name)?;
    check(unsafe { libc::linkat(old_dir.as_raw_fd(), c_old.as_ptr(), new_dir.as_raw_fd(), c_new.as_ptr(), 0) })?;
    Ok(())
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, remove_dir: bool) -> SysResult<()> {
    let c_name = cstr(name)?;
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c_name.as_ptr(), flags) })?;
    Ok(())
}

pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old_name: &OsStr,
    new_dir: BorrowedFd<'_>,
    new_name: &OsStr,
    flags: u32,
) -> SysResult<()> {
    let c_old = cstr(old_name)?;
    let c_new = cstr(new_name)?;
    check(unsafe { libc::renameat2(old_dir.as_raw_fd(), c_old.as_ptr(), new_dir.as_raw_fd(), c_new.as_ptr(), flags) })?;
    Ok(())
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<OsString> {
    let c_name = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let len =
        check_size(unsafe { libc::readlinkat(dir.as_raw_fd(), c_name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(len);
    Ok(OsString::from_vec(buf))
}

/// lchown of `name` in `dir`; `None` leaves that id unchanged.
pub fn fchownat(dir: BorrowedFd<'_>, name: &OsStr, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    let c_name = cstr(name)?;
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    check(unsafe { libc::fchownat(dir.as_raw_fd(), c_name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(())
}

/// chmod of the file an O_PATH (or any) descriptor refers to. chmod through
/// /proc/self/fd acts on the descriptor's own inode, never on a symlink target
/// looked up by name.
pub fn fchmod_fd(fd: BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    let path = proc_fd_path(fd.as_raw_fd(), None);
    check(unsafe { libc::chmod(path.as_ptr(), mode) })?;
    Ok(())
}

/// A new regular file without a name in directory `dir` (O_TMPFILE), mode
/// 0600 until changed; `link_unnamed` gives it one.
pub fn open_unnamed(dir: BorrowedFd<'_>, flags: i32) -> SysResult<OwnedFd> {
    let fd = check(unsafe {
        libc::openat(dir.as_raw_fd(), c".".as_ptr(), flags | libc::O_TMPFILE | libc::O_CLOEXEC, 0o600)
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Give the unnamed file `fd` the name `name` in `dir`; EEXIST if taken.
/// AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; without it (rootless), the
/// same link through /proc.
pub fn link_unnamed(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    let c_name = cstr(name)?;
    let linked = check(unsafe {
        libc::linkat(fd.as_raw_fd(), c"".as_ptr(), dir.as_raw_fd(), c_name.as_ptr(), libc::AT_EMPTY_PATH)
    });
    match linked {
        Err(Errno::ENOENT | Errno::EPERM) => {
            let path = proc_fd_path(fd.as_raw_fd(), None);
            check(unsafe {
                libc::linkat(libc::AT_FDCWD, path.as_ptr(), dir.as_raw_fd(), c_name.as_ptr(), libc::AT_SYMLINK_FOLLOW)
            })?;
            Ok(())
        }
        other => other.map(drop),
    }
}

/// fchown of the file a descriptor refers to; `None` leaves that id unchanged.
pub fn fchown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)) })?;
    Ok(())
}

/// Open the file a descriptor refers to again, with other flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> SysResult<OwnedFd> {
    let path = proc_fd_path(fd.as_raw_fd(), None);
    let new = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A time to set: a value, "now", or "leave it".
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SetTime {
    Omit,
    Now,
    At(libc::timespec),
}

pub fn utimensat(dir: BorrowedFd<'_>, name: &OsStr, atime: SetTime, mtime: SetTime) -> SysResult<()> {
    let c_name = cstr(name)?;
    let times = [timespec_of(atime), timespec_of(mtime)];
    check(unsafe { libc::utimensat(dir.as_raw_fd(), c_name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(())
}

pub fn futimens(fd: BorrowedFd<'_>, atime: SetTime, mtime: SetTime) -> SysResult<()> {
    let times = [timespec_of(atime), timespec_of(mtime)];
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })?;
    Ok(())
}

fn timespec_of(t: SetTime) -> libc::timespec {
    match t {
        SetTime::Omit => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        SetTime::Now => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        SetTime::At(ts) => ts,
    }
}

fn proc_fd_path(fd: RawFd, name: Option<&OsStr>) -> CString {
    let mut path = format!("/proc/self/fd/{fd}").into_bytes();
    if let Some(name) = name {
        path.push(b'/');
        path.extend_from_slice(name.as_bytes());
    }
    // Neither part can hold a NUL: fd is a number and names were checked by cstr.
    CString::new(path).unwrap_or_default()
}

/// Extended attributes of `name` in `dir`, without following a final symlink.
///
/// On Linux 6.13 and later the attributes are read with getxattrat and
/// listxattrat, relative to `dir`: one lookup of `name`. Elsewhere (an older
/// kernel, or a seccomp filter that refuses the calls) the directory is
/// reached through its /proc/self/fd magic link, which names the directory
/// itself, and `name` is looked up in it; that walk through procfs costs
/// several lookups more. `name` is one component and is not followed.
pub struct XattrTarget<'a> {
    path: CString,
    /// Follow the final component: only for a descriptor's own magic link,
    /// which names exactly the file the descriptor was opened on.
    follow: bool,
    dir: BorrowedFd<'a>,
    /// The name in `dir` for the *xattrat calls; "." for `dir` itself (an
    /// empty name with AT_EMPTY_PATH would refuse O_PATH descriptors with
    /// EBADF, while a lookup of "." takes them).
    name: CString,
}

/// The numbers of getxattrat and listxattrat: the same on every
/// architecture that has the unified system call table (all but alpha,
/// mips and ia64). Elsewhere -1, whose ENOSYS sends every call down the
/// /proc path.
const XATTR_AT_CALLS_NUMBERS: (libc::c_long, libc::c_long) = if cfg!(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "x86",
    target_arch = "arm",
    target_arch = "powerpc64",
    target_arch = "s390x",
    target_arch = "loongarch64"
)) {
    (464, 465)
} else {
    (-1, -1)
};
const SYS_GETXATTRAT: libc::c_long = XATTR_AT_CALLS_NUMBERS.0;
const SYS_LISTXATTRAT: libc::c_long = XATTR_AT_CALLS_NUMBERS.1;

/// Whether the *xattrat calls may be tried; cleared by the first ENOSYS
/// (kernel before 6.13) or EPERM (a seccomp filter that does not know them).
static XATTR_AT_CALLS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The kernel's `struct xattr_args` of getxattrat.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

impl<'a> XattrTarget<'a> {
    pub fn new(dir: BorrowedFd<'a>, name: &OsStr) -> SysResult<Self> {
        let c_name = cstr(name)?;
        Ok(XattrTarget { path: proc_fd_path(dir.as_raw_fd(), Some(name)), follow: false, dir, name: c_name })
    }

    /// The target is the directory the descriptor itself refers to (an
    /// O_PATH descriptor cannot take f*xattr calls, so "." is looked up in
    /// it, or its magic link followed; never use this for a symlink).
    pub fn fd(fd: BorrowedFd<'a>) -> Self {
        XattrTarget { path: proc_fd_path(fd.as_raw_fd(), None), follow: true, dir: fd, name: c".".to_owned() }
    }

    /// The flags of the *xattrat calls: the name is never followed.
    fn at_flags(&self) -> libc::c_uint {
        libc::AT_SYMLINK_NOFOLLOW as libc::c_uint
    }

    /// Run an *xattrat call; None when this system does not offer it, and
    /// the caller takes the /proc path.
    fn try_at(&self, call: impl FnOnce() -> libc::c_long) -> Option<libc::ssize_t> {
        use std::sync::atomic::Ordering;
        if !XATTR_AT_CALLS.load(Ordering::Relaxed) {
            return None;
        }
        let ret = call();
        if ret < 0 {
            match Errno::last() {
                Errno::ENOSYS | Errno::EPERM => {
                    XATTR_AT_CALLS.store(false, Ordering::Relaxed);
                    return None;
                }
                // `fd()` of something other than a directory has no ".",
                // and looking "." up needs search permission on the
                // directory, which a rootless daemon may lack where the
                // magic link needs none.
                Errno::ENOTDIR | Errno::EACCES if self.follow => return None,
                _ => {}
            }
        }
        Some(ret as libc::ssize_t)
    }

    fn raw_get(&self, attr: &CStr, buf: &mut [u8]) -> libc::ssize_t {
        let (ptr, len) = if buf.is_empty() { (std::ptr::null_mut(), 0) } else { (buf.as_mut_ptr().cast(), buf.len()) };
        let at = self.try_at(|| {
            let mut args = XattrArgs { value: ptr as u64, size: len as u32, flags: 0 };
            unsafe {
                libc::syscall(
                    SYS_GETXATTRAT,
                    self.dir.as_raw_fd(),
                    self.name.as_ptr(),
                    self.at_flags(),
                    attr.as_ptr(),
                    &mut args as *mut XattrArgs,
                    std::mem::size_of::<XattrArgs>(),
                )
            }
        });
        if let Some(ret) = at {
            return ret;
        }
        unsafe {
            if self.follow {
                libc::getxattr(self.path.as_ptr(), attr.as_ptr(), ptr, len)
            } else {
                libc::lgetxattr(self.path.as_ptr(), attr.as_ptr(), ptr, len)
            }
        }
    }

    fn raw_list(&self, buf: &mut [u8]) -> libc::ssize_t {
        let (ptr, len) = if buf.is_empty() { (std::ptr::null_mut(), 0) } else { (buf.as_mut_ptr().cast(), buf.len()) };
        let at = self.try_at(|| unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                self.at_flags(),
                ptr as *mut libc::c_char,
                len,
            )
        });
        if let Some(ret) = at {
            return ret;
        }
        unsafe {
            if self.follow {
                libc::listxattr(self.path.as_ptr(), ptr, len)
            } else {
                libc::llistxattr(self.path.as_ptr(), ptr, len)
            }
        }
    }

    pub fn get(&self, attr: &OsStr) -> SysResult<Vec<u8>> {
        let c_attr = cstr(attr)?;
        loop {
            let size = check_size(self.raw_get(&c_attr, &mut []))?;
            let mut buf = vec![0u8; size];
            match check_size(self.raw_get(&c_attr, &mut buf)) {
                Ok(len) => {
                    buf.truncate(len);
                    return Ok(buf);
                }
                Err(Errno::ERANGE) => continue, // grew between the two calls
                Err(err) => return Err(err),
            }
        }
    }

    /// The value, or None when the attribute is absent (or xattrs are unsupported).
    pub fn get_opt(&self, attr: &OsStr) -> SysResult<Option<Vec<u8>>> {
        match self.get(attr) {
            Ok(value) => Ok(Some(value)),
            Err(Errno::ENODATA) | Err(Errno::EOPNOTSUPP) => Ok(None),
            Err(err) => Err(err),
        }
    }

    pub fn set(&self, attr: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
        let c_attr = cstr(attr)?;
        check(unsafe {
            if self.follow {
                libc::setxattr(self.path.as_ptr(), c_attr.as_ptr(), value.as_ptr().cast(), value.len(), flags)
            } else {
                libc::lsetxattr(self.path.as_ptr(), c_attr.as_ptr(), value.as_ptr().cast(), value.len(), flags)
            }
        })?;
        Ok(())
    }

    pub fn remove(&self, attr: &OsStr) -> SysResult<()> {
        let c_attr = cstr(attr)?;
        check(unsafe {
            if self.follow {
                libc::removexattr(self.path.as_ptr(), c_attr.as_ptr())
            } else {
                libc::lremovexattr(self.path.as_ptr(), c_attr.as_ptr())
            }
        })?;
        Ok(())
    }

    /// The names of all attributes.
    pub fn list(&self) -> SysResult<Vec<OsString>> {
        loop {
            let size = match check_size(self.raw_list(&mut [])) {
                Ok(size) => size,
                Err(Errno::EOPNOTSUPP) => return Ok(Vec::new()),
                Err(err) => return Err(err),
            };
            if size == 0 {
                return Ok(Vec::new());
            }
            let mut buf = vec![0u8; size];
            match check_size(self.raw_list(&mut buf)) {
                Ok(len) => {
                    buf.truncate(len);
                    return Ok(buf
                        .split(|b| *b == 0)
                        .filter(|n| !n.is_empty())
                        .map(|n| OsStr::from_bytes(n).to_owned())
                        .collect());
                }
                Err(Errno::ERANGE) => continue,
                Err(err) => return Err(err),
            }
        }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    /// d_type: one of libc::DT_*; DT_UNKNOWN when the filesystem does not say.
    pub kind: u8,
}

/// All entries of the directory `dir` (any descriptor of it, O_PATH too),
/// without "." and "..". The listing reads a fresh open of the directory,
/// so `dir` stays the caller's to use for the entries.
pub fn read_dir(dir: BorrowedFd<'_>) -> SysResult<Vec<DirEntry>> {
    let fd = openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let dir = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if dir.is_null() {
        return Err(Errno::last());
    }
    // fdopendir took the descriptor; closedir below closes it.
    std::mem::forget(fd);
    let mut entries = Vec::new();
    let result = loop {
        Errno::clear();
        let entry = unsafe { libc::readdir64(dir) };
        if entry.is_null() {
            let err = Errno::last_raw();
            break if err == 0 { Ok(()) } else { Err(Errno::from_raw(err)) };
        }
        let entry = unsafe { &*entry };
        let name = unsafe { CStr::from_ptr(entry.d_name.as_ptr()) }.to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        entries.push(DirEntry { name: OsStr::from_bytes(name).to_owned(), ino: entry.d_ino, kind: entry.d_type });
    };
    unsafe { libc::closedir(dir) };
    result.map(|_| entries)
}

/// Copy `len` bytes of `src` to `dst` (both at offset 0), keeping holes.
/// Tries a reflink first, then copy_file_range over each data extent.
pub fn copy_file_data(src: &File, dst: &File, len: u64) -> SysResult<()> {
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let mut offset: i64 = 0;
    let end = len as i64;
    while offset < end {
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            match Errno::last() {
                Errno::ENXIO => break,                                     // only a hole remains
                Errno::EINVAL => return copy_range(src, dst, offset, end), // no SEEK_DATA here
                err => return Err(err),
            }
        }
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        copy_range(src, dst, data, hole)?;
        offset = hole;
    }
    // Holes at the end are kept by giving the file its full length.
    check(unsafe { libc::ftruncate(dst.as_raw_fd(), len as i64) })?;
    Ok(())
}

fn copy_range(src: &File, dst: &File, start: i64, end: i64) -> SysResult<()> {
    let mut off_in = start;
    let mut off_out = start;
    while off_in < end {
        let chunk = (end - off_in).min(1 << 30) as usize;
        let copied =
            unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, chunk, 0) };
        if copied < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL => {
                    return copy_by_read(src, dst, off_in, end);
                }
                err => return Err(err),
            }
        }
        if copied == 0 {
            break; // the source is shorter than it claimed
        }
    }
    Ok(())
}

fn copy_by_read(src: &File, dst: &File, mut offset: i64, end: i64) -> SysResult<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while offset < end {
        let want = ((end - offset) as usize).min(buf.len());
        let got = src.read_at(&mut buf[..want], offset as u64).map_err(io_errno)?;
        if got == 0 {
            break;
        }
        dst.write_all_at(&buf[..got], offset as u64).map_err(io_errno)?;
        offset += got as i64;
    }
    Ok(())
}

/// The errno inside an io::Error (EIO when it has none).
pub fn io_errno(err: std::io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO))
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> SysResult<()> {
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) })?;
    Ok(())
}

pub fn fsync(fd: BorrowedFd<'_>, data_only: bool) -> SysResult<()> {
    check(unsafe { if data_only { libc::fdatasync(fd.as_raw_fd()) } else { libc::fsync(fd.as_raw_fd()) } })?;
    Ok(())
}

pub fn syncfs(fd: BorrowedFd<'_>) -> SysResult<()> {
    check(unsafe { libc::syncfs(fd.as_raw_fd()) })?;
    Ok(())
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> SysResult<()> {
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) })?;
    Ok(())
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> SysResult<i64> {
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    loop {
        let ret = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset as i64) };
        match check_size(ret) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> SysResult<usize> {
    loop {
        let ret = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset as i64) };
        match check_size(ret) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> SysResult<libc::statvfs> {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// Duplicate a descriptor (for handing an fd to a second owner).
pub fn dup(fd: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    fd.try_clone_to_owned().map_err(io_errno)
}

pub fn geteuid() -> u32 {
    unsafe { libc::geteuid() }
}

/// Whether this process runs in the initial user namespace, whose uid map
/// is the identity over every id (a user namespace maps fewer).
pub fn in_initial_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"],
        Err(_) => false,
    }
}

/// Serve every allocation of `bytes` or more with its own mapping, for the
/// life of the process. glibc starts at 128 KiB but raises the threshold to
/// the size of each such block freed, so after the first large listing is
/// dropped, later large blocks come from the heap, where freeing them
/// leaves holes the process keeps; measured on a walk of 112,000 entries,
/// this costs the daemon 85 bytes per cached inode. Setting it also stops
/// the raising. (Not glibc, or an unknown parameter: a harmless no-op.)
pub fn set_malloc_mmap_threshold(bytes: usize) {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes the allocator's tuning parameters.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
}

/// Grow this process's descriptor table now to hold `count` descriptors.
///
/// The kernel doubles the table when a new descriptor does not fit, and
/// once several threads share the table it first waits for an RCU grace
/// period: 10 to 20 ms here, in the middle of whichever request opened the
/// descriptor (the first lookup across 100 layers crossed 128 and waited).
/// Grown while the process has a single thread, the table costs no wait,
/// and a table never shrinks. Done by duplicating `any` to the highest
/// descriptor wanted (within the soft limit) and closing the copy.
pub fn reserve_descriptors(any: BorrowedFd<'_>, count: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let highest = count.min(usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)).saturating_sub(1);
    let Ok(highest) = libc::c_int::try_from(highest) else { return };
    let copy = unsafe { libc::fcntl(any.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest) };
    if copy >= 0 {
        unsafe { libc::close(copy) };
    }
}

/// Raise the soft limit on open files to the hard limit (the daemon keeps
/// lower directories open).
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 && limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

/// Mount a FUSE filesystem at `mountpoint` with mount(2) and return the
/// /dev/fuse descriptor that serves it. `options` are the kernel's FUSE
/// mount options beyond the descriptor, root mode and owner.
pub fn fuse_mount(mountpoint: &Path, source: &str, options: &str, flags: libc::c_ulong) -> SysResult<OwnedFd> {
    let root = std::fs::metadata(mountpoint).map_err(io_errno)?;
    let device = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").map_err(io_errno)?;
    let device: OwnedFd = device.into();
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},{options}",
        device.as_raw_fd(),
        std::os::unix::fs::MetadataExt::mode(&root) & libc::S_IFMT,
        unsafe { libc::getuid() },
        unsafe { libc::getgid() },
    );
    let c_source = cstr(OsStr::new(source))?;
    let c_target = cstr(mountpoint.as_os_str())?;
    let c_data = cstr(OsStr::new(&data))?;
    check(unsafe {
        libc::mount(c_source.as_ptr(), c_target.as_ptr(), c"fuse".as_ptr(), flags, c_data.as_ptr().cast())
    })?;
    Ok(device)
}

/// Unmount `path` (lazily when `detach`).
pub fn umount(path: &Path, detach: bool) -> SysResult<()> {
    let c_path = cstr(path.as_os_str())?;
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    check(unsafe { libc::umount2(c_path.as_ptr(), flags) })?;
    Ok(())
}

/// Detach from the terminal and the caller's session (daemon child side).
pub fn setsid() {
    unsafe { libc::setsid() };
}

/// Fork; returns the child's pid in the parent and 0 in the child.
/// Only called while the process has a single thread.
pub fn fork() -> SysResult<libc::pid_t> {
    let pid = unsafe { libc::fork() };
    if pid < 0 { Err(Errno::last()) } else { Ok(pid) }
}

/// Point stdin, stdout and stderr at /dev/null.
pub fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for target in 0..3 {
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}

/// Whether the process may set `trusted.*` xattrs in `dir` (not inside a
/// user namespace, not without CAP_SYS_ADMIN).
pub fn can_set_trusted_xattr(dir: &Path) -> bool {
    let probe = dir.join(format!(".strata-xattr-probe-{}", std::process::id()));
    if std::fs::write(&probe, b"").is_err() {
        return false;
    }
    let ok = cstr(probe.as_os_str())
        .map(|path| unsafe {
            libc::lsetxattr(path.as_ptr(), c"trusted.overlay.probe".as_ptr(), b"y".as_ptr().cast(), 1, 0) == 0
        })
        .unwrap_or(false);
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Whether the process may create device nodes (needed for char 0/0 whiteouts).
pub fn can_mknod_whiteout(dir: BorrowedFd<'_>) -> bool {
    let probe = OsStr::new(".strata-whiteout-probe");
    let _ = unlinkat(dir, probe, false);
    let ok = mknodat(dir, probe, libc::S_IFCHR | 0o600, 0).is_ok();
    let _ = unlinkat(dir, probe, false);
    ok
}

/// Open `path` inside `root` as if `root` were `/`: absolute symlinks and
/// `..` resolve inside it, never above (openat2 RESOLVE_IN_ROOT). For
/// reading a directory the user handed us (an OCI layout), whose symlinks
/// may legitimately point at siblings.
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path, flags: i32) -> SysResult<OwnedFd> {
    openat2(root, path, flags, libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS)
}

/// An advisory lock on a whole file (flock): shared or exclusive; with
/// `wait` false, EWOULDBLOCK when someone else holds a conflicting lock.
pub fn flock(fd: BorrowedFd<'_>, exclusive: bool, wait: bool) -> SysResult<()> {
    let mut op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    if !wait {
        op |= libc::LOCK_NB;
    }
    loop {
        match check(unsafe { libc::flock(fd.as_raw_fd(), op) }) {
            Err(Errno::EINTR) => continue,
            other => return other.map(|_| ()),
        }
    }
}

/// Die quietly on a closed pipe (`strata layers --format json | head`), as
/// command line tools do; Rust ignores SIGPIPE and would panic in println.
pub fn default_sigpipe() {
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// chown of the file any descriptor refers to, O_PATH ones (symlinks
/// included) too: fchownat with AT_EMPTY_PATH, which fchown cannot do.
pub fn chown_path_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> SysResult<()> {
    check(unsafe {
        libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    })?;
    Ok(())
}
