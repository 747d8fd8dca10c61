//! Safe extraction of one layer tarball into a directory.
//!
//! A layer tarball is untrusted input. Every write is relative to a
//! descriptor of the layer's directory; parents are opened one component at
//! a time with O_NOFOLLOW, so a symlink planted by an earlier member is
//! never followed (the member is refused instead); nothing can land outside
//! the directory. The rules, one per hostile trick:
//!
//! - names: a leading `/` and `.` components are dropped; any `..` left is
//!   an error; a path longer than PATH_MAX is an error.
//! - symlinks are created verbatim and never followed.
//! - a hard link must point at a member already extracted from this same
//!   layer (never at something outside it, nor at a directory).
//! - whiteouts stay in the OCI form (`.wh.NAME`, `.wh..wh..opq`), which the
//!   mount reads; a whiteout whose target is empty, `.` or `..` is an error;
//!   a kernel-form whiteout member (char 0/0) is stored in the OCI form too.
//! - a later member replaces an earlier one of the same name (a directory
//!   over a directory only updates its metadata).
//! - device nodes only when the kernel lets us make them (warned and
//!   skipped otherwise).
//! - owner first, then mode (chown clears suid and sgid), then xattrs (chown
//!   clears security.capability), then times; directories get their mode
//!   and times after their contents are in place.
//! - xattrs from PAX records, except `trusted.*`, `*.overlay.*`,
//!   `security.selinux` and Strata's own.
//! - unknown member types are errors (see `tarball`).

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::layers::{OPAQUE_MARKER, WHITEOUT_PREFIX, is_private_xattr};
use crate::sys::{self, Errno, SetTime, XattrTarget};
use crate::tarball::{Header, Kind, TarError, TarReader};

/// Why a layer could not be extracted; names the member when there is one.
#[derive(Debug)]
pub struct ExtractError {
    pub member: Option<String>,
    pub reason: String,
}

impl fmt::Display for ExtractError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.member {
            // A hostile name can be kilobytes long: show its two ends.
            Some(member) if member.chars().count() > 200 => {
                let head: String = member.chars().take(100).collect();
                let tail: String = member.chars().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
                write!(f, "member \"{head}...{tail}\": {}", self.reason)
            }
            Some(member) => write!(f, "member {member:?}: {}", self.reason),
            None => write!(f, "{}", self.reason),
        }
    }
}

impl std::error::Error for ExtractError {}

impl From<TarError> for ExtractError {
    fn from(err: TarError) -> Self {
        ExtractError { member: None, reason: err.to_string() }
    }
}

/// What one extraction produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Members extracted (whiteouts and directories included).
    pub entries: u64,
    /// Bytes of regular file data.
    pub bytes: u64,
    /// Things left out, said once each (device nodes without privilege, ...).
    pub warnings: Vec<String>,
}

/// The longest file name.
const NAME_MAX: usize = 255;

/// Metadata applied to a directory once everything inside it is in place.
struct DirMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: libc::timespec,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

struct Extractor<'a> {
    root: BorrowedFd<'a>,
    /// Cleaned paths of non-directory members extracted so far: the only
    /// valid hard link targets.
    extracted: HashSet<PathBuf>,
    dirs: BTreeMap<PathBuf, DirMeta>,
    stats: ExtractStats,
    warned_chown: bool,
    warned_devices: bool,
    warned_xattrs: bool,
    /// One copy buffer for every file (io::copy's is 8 KiB).
    buffer: Vec<u8>,
    /// The parent directory of the last member, still open.
    last_parent: Option<(PathBuf, OwnedFd)>,
    /// Paths whose char 0/0 member became a `.wh.` file.
    converted: HashSet<PathBuf>,
}

/// Extract every member read from `reader` into the directory `root`, which
/// should be empty. Stops at the end-of-archive marker; the caller drains
/// whatever follows (it belongs to the layer's digest).
pub fn extract<R: Read>(reader: &mut TarReader<R>, root: BorrowedFd<'_>) -> Result<ExtractStats, ExtractError> {
    let mut ex = Extractor {
        root,
        extracted: HashSet::new(),
        dirs: BTreeMap::new(),
        stats: ExtractStats::default(),
        warned_chown: false,
        warned_devices: false,
        warned_xattrs: false,
        buffer: vec![0; 1 << 18],
        last_parent: None,
        converted: HashSet::new(),
    };
    while let Some(header) = reader.next()? {
        let member = String::from_utf8_lossy(&header.name).into_owned();
        ex.member(reader, &header).map_err(|reason| ExtractError { member: Some(member), reason })?;
        ex.stats.entries += 1;
    }
    ex.finish_dirs().map_err(|reason| ExtractError { member: None, reason })?;
    Ok(ex.stats)
}

/// A member's name as relative components: a leading `/` and `.` parts are
/// dropped, `..` is refused. An empty result is the layer's root.
pub fn clean_name(name: &[u8]) -> Result<PathBuf, String> {
    if name.len() >= libc::PATH_MAX as usize {
        return Err(format!("name of {} bytes is longer than PATH_MAX", name.len()));
    }
    let mut clean = PathBuf::new();
    for part in name.split(|b| *b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." => return Err("name contains `..`".into()),
            _ => clean.push(OsStr::from_bytes(part)),
        }
    }
    Ok(clean)
}

fn errno_text(what: &str, err: Errno) -> String {
    format!("{what}: {}", err.desc())
}

fn timespec(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec { tv_sec: sec, tv_nsec: nsec }
}

/// Whether a PAX xattr may be written into a layer. `trusted.*` and the
/// overlay markers would let a layer forge whiteouts or opaque directories
/// the mount (or the kernel) would obey; SELinux labels belong to the host.
pub fn xattr_allowed(name: &[u8]) -> bool {
    let is_overlay = name.windows(b".overlay.".len()).any(|w| w == b".overlay.");
    !(name.starts_with(b"trusted.")
        || is_overlay
        || name == b"security.selinux"
        || is_private_xattr(OsStr::from_bytes(name)))
}

impl Extractor<'_> {
    fn member<R: Read>(&mut self, reader: &mut TarReader<R>, header: &Header) -> Result<(), String> {
        let path = clean_name(&header.name)?;
        let Some(name) = path.file_name().map(OsStr::to_owned) else {
            // The layer's root itself ("./"): only its metadata matters.
            if header.kind != Kind::Directory {
                return Err("the layer root must be a directory".into());
            }
            self.dirs.insert(PathBuf::new(), self.dir_meta(header));
            return Ok(());
        };
        let parent_path = path.parent().unwrap_or(Path::new("")).to_owned();
        if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&parent_path, &name, header);
        }
        let mut oci_name = WHITEOUT_PREFIX.to_vec();
        oci_name.extend_from_slice(name.as_bytes());
        let oci_name = OsString::from_vec(oci_name);
        let kernel_whiteout = header.kind == Kind::CharDevice && header.dev_major == 0 && header.dev_minor == 0;
        if kernel_whiteout && oci_name.len() <= NAME_MAX {
            // The kernel's whiteout form (a tar of an overlay upper has
            // them): kept in the OCI form like every other whiteout. As a
            // member it replaces whatever this layer had under the name.
            let parent = self.make_parents(&parent_path)?;
            self.clear_place(parent.as_fd(), &name, false)?;
            self.converted.insert(path);
            return self.whiteout(&parent_path, &oci_name, header);
        }
        let parent = self.make_parents(&parent_path)?;
        let parent = parent.as_fd();
        if self.converted.remove(&path) {
            // A later member replaces the converted whiteout, as it would
            // replace the char device.
            self.clear_place(parent, &oci_name, false)?;
        }
        self.clear_place(parent, &name, header.kind == Kind::Directory)?;
        match header.kind {
            Kind::Directory => {
                match sys::mkdirat(parent, &name, 0o700) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(err) => return Err(errno_text("cannot make the directory", err)),
                }
                self.dirs.insert(path, self.dir_meta(header));
                return Ok(());
            }
            Kind::File => {
                let fd = sys::openat(parent, &name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600)
                    .map_err(|err| errno_text("cannot create the file", err))?;
                let mut file = File::from(fd);
                let copied =
                    copy_data(&mut reader.data(), &mut file, &mut self.buffer).map_err(|err| match err.kind() {
                        io::ErrorKind::UnexpectedEof => "the tar stream is truncated inside this member".to_string(),
                        _ => format!("cannot write the file: {err}"),
                    })?;
                self.stats.bytes += copied;
            }
            Kind::Symlink => {
                sys::symlinkat(OsStr::from_bytes(&header.link), parent, &name)
                    .map_err(|err| errno_text("cannot create the symlink", err))?;
            }
            Kind::HardLink => {
                let target = clean_name(&header.link)?;
                if !self.extracted.contains(&target) {
                    return Err(format!(
                        "hard link to {:?}, which is not an earlier member of this layer",
                        String::from_utf8_lossy(&header.link)
                    ));
                }
                let target_parent = target.parent().unwrap_or(Path::new(""));
                let target_name = target.file_name().unwrap_or_default();
                let dir = sys::open_beneath(self.root, target_parent, libc::O_PATH | libc::O_DIRECTORY)
                    .map_err(|err| errno_text("cannot reach the hard link's target", err))?;
                sys::linkat(dir.as_fd(), target_name, parent, &name)
                    .map_err(|err| errno_text("cannot create the hard link", err))?;
                // A hard link shares its target's inode and metadata.
                self.extracted.insert(path);
                return Ok(());
            }
            Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => {
                let kind = match header.kind {
                    Kind::CharDevice => libc::S_IFCHR,
                    Kind::BlockDevice => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let rdev = if kind == libc::S_IFIFO { 0 } else { libc::makedev(header.dev_major, header.dev_minor) };
                match sys::mknodat(parent, &name, kind | 0o600, rdev) {
                    Ok(()) => {}
                    Err(Errno::EPERM) if kind != libc::S_IFIFO => {
                        if !self.warned_devices {
                            self.warned_devices = true;
                            self.stats.warnings.push(format!(
                                "device nodes skipped (no privilege to make them), the first being {}",
                                path.display()
                            ));
                        }
                        return Ok(());
                    }
                    Err(err) => return Err(errno_text("cannot make the node", err)),
                }
            }
        }
        self.set_metadata(parent, &name, header)?;
        self.extracted.insert(path);
        Ok(())
    }

    fn dir_meta(&self, header: &Header) -> DirMeta {
        DirMeta {
            mode: header.mode,
            uid: header.uid,
            gid: header.gid,
            mtime: timespec(header.mtime, header.mtime_nsec),
            xattrs: allowed_xattrs(header),
        }
    }

    /// An OCI whiteout or opaque marker, kept as an empty file after its
    /// name has been checked.
    fn whiteout(&mut self, parent_path: &Path, name: &OsStr, header: &Header) -> Result<(), String> {
        let target = &name.as_bytes()[WHITEOUT_PREFIX.len()..];
        if name != OPAQUE_MARKER {
            if matches!(target, b"" | b"." | b"..") {
                return Err("whiteout of nothing, `.` or `..`: its target is not inside the directory".into());
            }
            if target.starts_with(WHITEOUT_PREFIX) {
                // aufs bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`): meaningless here.
                self.stats.warnings.push(format!("aufs metadata {} skipped", parent_path.join(name).display()));
                return Ok(());
            }
        }
        let parent = self.make_parents(parent_path)?;
        let parent = parent.as_fd();
        self.clear_place(parent, name, false)?;
        let fd = sys::openat(parent, name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644)
            .map_err(|err| errno_text("cannot create the whiteout", err))?;
        drop(fd);
        let time = SetTime::At(timespec(header.mtime, header.mtime_nsec));
        sys::utimensat(parent, name, time, time).map_err(|err| errno_text("cannot set times", err))?;
        Ok(())
    }

    /// Open the directory `path`, making missing parents (mode 0755, as
    /// Docker does). A component that exists but is not a directory (a
    /// symlink above all) is refused: nothing is followed.
    fn make_parents(&mut self, path: &Path) -> Result<OwnedFd, String> {
        // Members come directory by directory: keep the last parent open.
        // Any removal forgets it (see clear_place), so it never names a
        // directory that a later member replaced.
        if let Some((cached, fd)) = &self.last_parent
            && cached == path
        {
            return sys::dup(fd.as_fd()).map_err(|err| errno_text("dup", err));
        }
        let fd = self.open_parents(path)?;
        self.last_parent = Some((path.to_owned(), sys::dup(fd.as_fd()).map_err(|err| errno_text("dup", err))?));
        Ok(fd)
    }

    fn open_parents(&mut self, path: &Path) -> Result<OwnedFd, String> {
        let mut current = sys::dup(self.root).map_err(|err| errno_text("dup", err))?;
        for component in path.iter() {
            let next = match sys::openat(current.as_fd(), component, libc::O_PATH | libc::O_DIRECTORY, 0) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    sys::mkdirat(current.as_fd(), component, 0o755)
                        .map_err(|err| errno_text("cannot make a parent directory", err))?;
                    sys::openat(current.as_fd(), component, libc::O_PATH | libc::O_DIRECTORY, 0)
                        .map_err(|err| errno_text("cannot open a parent directory", err))?
                }
                Err(Errno::ENOTDIR | Errno::ELOOP) => {
                    return Err(format!(
                        "parent {} is a symlink or not a directory; refusing to write through it",
                        Path::new(component).display()
                    ));
                }
                Err(err) => return Err(errno_text("cannot open a parent directory", err)),
            };
            current = next;
        }
        Ok(current)
    }

    /// Make room for a member: a later member replaces an earlier one; a
    /// directory stays when the new member is a directory too.
    fn clear_place(&mut self, parent: BorrowedFd<'_>, name: &OsStr, new_is_dir: bool) -> Result<(), String> {
        let stat = match sys::fstatat(parent, name) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Ok(()),
            Err(err) => return Err(errno_text("cannot inspect an earlier member", err)),
        };
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && new_is_dir {
            return Ok(());
        }
        self.last_parent = None;
        remove_tree(parent, name).map_err(|err| errno_text("cannot replace an earlier member", err))
    }

    /// Owner, then mode, then xattrs, then times; never through a symlink.
    fn set_metadata(&mut self, parent: BorrowedFd<'_>, name: &OsStr, header: &Header) -> Result<(), String> {
        let fd = sys::openat(parent, name, libc::O_PATH, 0).map_err(|err| errno_text("cannot reopen", err))?;
        self.chown(fd.as_fd(), header.uid, header.gid)?;
        if header.kind != Kind::Symlink {
            sys::fchmod_fd(fd.as_fd(), header.mode).map_err(|err| errno_text("cannot chmod", err))?;
        }
        let xattrs = allowed_xattrs(header);
        self.set_xattrs(parent, name, &xattrs)?;
        let time = SetTime::At(timespec(header.mtime, header.mtime_nsec));
        sys::utimensat(parent, name, time, time).map_err(|err| errno_text("cannot set times", err))
    }

    fn chown(&mut self, fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<(), String> {
        match sys::chown_path_fd(fd, uid, gid) {
            Ok(()) => Ok(()),
            Err(Errno::EPERM | Errno::EINVAL) if sys::geteuid() != 0 => {
                if !self.warned_chown {
                    self.warned_chown = true;
                    self.stats.warnings.push("owners not kept (not running as root)".into());
                }
                Ok(())
            }
            Err(err) => Err(errno_text("cannot chown", err)),
        }
    }

    fn set_xattrs(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), String> {
        if xattrs.is_empty() {
            return Ok(());
        }
        let target = XattrTarget::new(parent, name).map_err(|err| errno_text("xattrs", err))?;
        for (key, value) in xattrs {
            if let Err(err) = target.set(key, value, 0) {
                // user.* on a symlink, or a filesystem without xattrs.
                if !self.warned_xattrs {
                    self.warned_xattrs = true;
                    self.stats.warnings.push(format!(
                        "some xattrs not kept, the first being {} on {}: {}",
                        key.to_string_lossy(),
                        Path::new(name).display(),
                        err.desc()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Directory metadata, deepest first, once every member is in place.
    fn finish_dirs(&mut self) -> Result<(), String> {
        let dirs = std::mem::take(&mut self.dirs);
        for (path, meta) in dirs.into_iter().rev() {
            let (parent, name) = match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) => (parent.to_owned(), name.to_owned()),
                _ => (PathBuf::new(), OsString::from(".")),
            };
            let parent = match sys::open_beneath(self.root, &parent, libc::O_PATH | libc::O_DIRECTORY) {
                Ok(fd) => fd,
                // A later member replaced it.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
                Err(err) => return Err(errno_text("cannot reopen a directory", err)),
            };
            let fd = match sys::openat(parent.as_fd(), &name, libc::O_PATH | libc::O_DIRECTORY, 0) {
                Ok(fd) => fd,
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
                Err(err) => return Err(errno_text("cannot reopen a directory", err)),
            };
            self.chown(fd.as_fd(), meta.uid, meta.gid)?;
            sys::fchmod_fd(fd.as_fd(), meta.mode).map_err(|err| errno_text("cannot chmod a directory", err))?;
            self.set_xattrs(parent.as_fd(), &name, &meta.xattrs)?;
            let time = SetTime::At(meta.mtime);
            sys::utimensat(parent.as_fd(), &name, time, time)
                .map_err(|err| errno_text("cannot set a directory's times", err))?;
        }
        Ok(())
    }
}

fn copy_data(from: &mut impl Read, to: &mut File, buffer: &mut [u8]) -> io::Result<u64> {
    use std::io::Write;
    let mut total = 0;
    loop {
        let n = match from.read(buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        to.write_all(&buffer[..n])?;
        total += n as u64;
    }
}

fn allowed_xattrs(header: &Header) -> Vec<(OsString, Vec<u8>)> {
    header
        .xattrs
        .iter()
        .filter(|(key, _)| xattr_allowed(key))
        .map(|(key, value)| (OsStr::from_bytes(key).to_owned(), value.clone()))
        .collect()
}

/// Remove `name` in `dir` and, for a directory, everything below it,
/// without following any symlink.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    match sys::unlinkat(dir, name, false) {
        Ok(()) => return Ok(()),
        Err(Errno::EISDIR | Errno::EPERM) => {}
        Err(err) => return Err(err),
    }
    let child_dir = sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // A directory we cannot write cannot be emptied: make it writable first.
    let _ = sys::fchmod_fd(child_dir.as_fd(), 0o700);
    for entry in sys::read_dir(child_dir.as_fd())? {
        remove_tree(child_dir.as_fd(), &entry.name)?;
    }
    sys::unlinkat(dir, name, true)
}

/// Remove a directory tree given by path (the user's own path; what is
/// inside is not trusted and never followed).
pub fn remove_path(path: &Path) -> Result<(), Errno> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return Err(Errno::EINVAL) };
    let parent = File::open(parent).map_err(sys::io_errno)?;
    match remove_tree(parent.as_fd(), name) {
        Err(Errno::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::MetadataExt;

    struct Member<'a> {
        name: &'a str,
        kind: tar::EntryType,
        mode: u32,
        uid: u64,
        data: &'a [u8],
        link: &'a str,
    }

    fn member<'a>(name: &'a str, kind: tar::EntryType, mode: u32) -> Member<'a> {
        Member { name, kind, mode, uid: 0, data: b"", link: "" }
    }

    fn extract_members(members: &[Member<'_>]) -> (tempfile::TempDir, Result<ExtractStats, ExtractError>) {
        let mut b = tar::Builder::new(Vec::new());
        for m in members {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(m.kind);
            h.set_mode(m.mode);
            h.set_uid(m.uid);
            h.set_mtime(1_000_000_000);
            h.set_size(m.data.len() as u64);
            if m.link.is_empty() {
                b.append_data(&mut h, m.name, m.data).unwrap();
            } else {
                b.append_link(&mut h, m.name, m.link).unwrap();
            }
        }
        let data = b.into_inner().unwrap();
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = File::open(dir.path()).unwrap();
        let result = extract(&mut TarReader::new(&data[..]), root.as_fd());
        (dir, result)
    }

    #[test]
    fn directories_get_their_mode_and_times_after_their_contents() {
        let (dir, result) = extract_members(&[
            member("ro/", tar::EntryType::Directory, 0o555),
            Member { data: b"inside", ..member("ro/f", tar::EntryType::Regular, 0o644) },
        ]);
        result.unwrap();
        let meta = std::fs::metadata(dir.path().join("ro")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o555);
        assert_eq!(meta.mtime(), 1_000_000_000, "creating ro/f must not leave ro's mtime at now");
        assert_eq!(std::fs::read(dir.path().join("ro/f")).unwrap(), b"inside");
        let _ = std::fs::set_permissions(dir.path().join("ro"), std::os::unix::fs::PermissionsExt::from_mode(0o755));
    }

    #[test]
    fn suid_survives_the_chown() {
        if sys::geteuid() != 0 {
            return; // chown to another user needs root
        }
        let (dir, result) = extract_members(&[Member { uid: 1000, ..member("su", tar::EntryType::Regular, 0o4755) }]);
        result.unwrap();
        let meta = std::fs::metadata(dir.path().join("su")).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (1000, 0o4755));
    }

    #[test]
    fn later_members_replace_earlier_ones() {
        let (dir, result) = extract_members(&[
            member("x/", tar::EntryType::Directory, 0o755),
            Member { data: b"child", ..member("x/y", tar::EntryType::Regular, 0o644) },
            Member { data: b"now a file", ..member("x", tar::EntryType::Regular, 0o644) },
            Member { link: "/etc", ..member("l", tar::EntryType::Symlink, 0o777) },
            member("l/", tar::EntryType::Directory, 0o700),
        ]);
        result.unwrap();
        assert_eq!(std::fs::read(dir.path().join("x")).unwrap(), b"now a file");
        let l = std::fs::symlink_metadata(dir.path().join("l")).unwrap();
        assert!(l.is_dir() && l.mode() & 0o777 == 0o700, "the directory replaced the symlink");
    }

    #[test]
    fn kernel_whiteouts_are_stored_in_the_oci_form() {
        let (dir, result) = extract_members(&[
            Member { data: b"old", ..member("gone", tar::EntryType::Regular, 0o644) },
            member("gone", tar::EntryType::Char, 0o600),
            member("back", tar::EntryType::Char, 0o600),
            Member { data: b"new", ..member("back", tar::EntryType::Regular, 0o644) },
        ]);
        result.unwrap();
        let names = |p: &str| dir.path().join(p).symlink_metadata().is_ok();
        assert!(names(".wh.gone") && !names("gone"), "char 0/0 replaced the file and became .wh.gone");
        assert!(names("back") && !names(".wh.back"), "a later member replaced the whiteout");
    }

    #[test]
    fn hard_links_only_to_earlier_non_directories() {
        let (_, result) = extract_members(&[
            member("d/", tar::EntryType::Directory, 0o755),
            Member { link: "d", ..member("h", tar::EntryType::Link, 0o644) },
        ]);
        assert!(result.unwrap_err().reason.contains("not an earlier member"));
        let (dir, result) = extract_members(&[
            Member { data: b"same", ..member("a", tar::EntryType::Regular, 0o644) },
            Member { link: "a", ..member("b", tar::EntryType::Link, 0o644) },
        ]);
        result.unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        assert_eq!(std::fs::metadata(a).unwrap().ino(), std::fs::metadata(b).unwrap().ino());
    }

    #[test]
    fn names_are_cleaned_and_dotdot_refused() {
        assert_eq!(clean_name(b"/a//./b/").unwrap(), PathBuf::from("a/b"));
        assert_eq!(clean_name(b"./").unwrap(), PathBuf::new());
        assert!(clean_name(b"a/../../etc").is_err());
        assert!(clean_name(b"..").is_err());
        assert!(clean_name(&vec![b'a'; 5000]).is_err());
    }

    #[test]
    fn private_and_host_xattrs_are_filtered() {
        assert!(xattr_allowed(b"user.mime"));
        assert!(xattr_allowed(b"security.capability"));
        for bad in [&b"trusted.overlay.opaque"[..], b"user.overlay.whiteout", b"security.selinux", b"trusted.x"] {
            assert!(!xattr_allowed(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
