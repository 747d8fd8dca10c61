//! The thin fuser adapter: each FUSE request becomes one call into the
//! union filesystem core, and each answer or errno goes back as a reply.
//! This is the only module that knows fuser's types.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno as FuseErrno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::passthrough::{Answer, Passthrough};
use crate::sys::{Errno, SetTime, Stat, SysResult};
use crate::unionfs::{AttrChange, Caller, Entry, UnionFs};

pub struct StrataFuse {
    pub fs: Arc<UnionFs>,
    /// How long the kernel may cache entries and attributes. Strata is the
    /// only writer of the layers while mounted (lower layers are read-only
    /// and the upper is changed only through the mount), so nothing changes
    /// behind the kernel's back and long timeouts are safe.
    pub ttl: Duration,
    /// Several event loops run at once.
    pub parallel: bool,
    /// Which opens the kernel serves itself.
    pub passthrough: Passthrough,
    /// Whether the kernel is to send OPEN for files, decided at init: only
    /// where some file may be passed through, as passthrough is set up by
    /// the answer to OPEN. Otherwise the first OPEN is answered ENOSYS, and
    /// from then on the kernel opens and closes files itself, keeping their
    /// page cache: a file whose pages are cached costs no request to open,
    /// read and close, and the rest comes by inode with handle 0.
    pub open_requests: bool,
    /// Likewise for OPENDIR: answered ENOSYS where the kernel can do
    /// without (Linux 5.1 and later), so it opens directories itself.
    pub opendir_requests: bool,
}

/// How files are opened. KEEP_CACHE: a file keeps its page cache across
/// opens, since lower layers never change and the upper changes only
/// through this mount, whose writes go through the same kernel inode
/// (copy-up keeps the inode). NOFLUSH: close(2) sends no FLUSH, which would
/// do nothing here (locks are the kernel's).
const FILE_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);
/// A passthrough open: the kernel ignores the page-cache flags then.
const PASSTHROUGH_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// The one place where errors become FUSE replies.
fn errno(err: Errno) -> FuseErrno {
    FuseErrno::from_i32(err as i32)
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0) + Duration::new(0, nsec as u32)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn dtype_file_type(kind: u8) -> FileType {
    match kind {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

pub fn attr(stat: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(stat.st_ino),
        size: stat.st_size as u64,
        blocks: stat.st_blocks as u64,
        atime: time(stat.st_atime, stat.st_atime_nsec),
        mtime: time(stat.st_mtime, stat.st_mtime_nsec),
        ctime: time(stat.st_ctime, stat.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(stat.st_mode),
        perm: (stat.st_mode & 0o7777) as u16,
        nlink: stat.st_nlink as u32,
        uid: stat.st_uid,
        gid: stat.st_gid,
        rdev: stat.st_rdev as u32,
        blksize: stat.st_blksize as u32,
        flags: 0,
    }
}

fn set_time(value: Option<TimeOrNow>) -> Option<SetTime> {
    value.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(at) => {
            let (sec, nsec) = match at.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => (-(e.duration().as_secs() as i64), 0),
            };
            SetTime::At(libc::timespec { tv_sec: sec, tv_nsec: nsec })
        }
    })
}

impl StrataFuse {
    /// How to answer an open of `ino` that the core gave `handle`:
    /// passthrough to the layer file when the kernel allows it.
    fn answer_open(
        &self,
        ino: u64,
        handle: u64,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<fuser::BackingId>,
    ) -> SysResult<Answer> {
        if !self.passthrough.is_enabled() {
            return Ok(Answer::Flags(FILE_OPEN_FLAGS));
        }
        let candidate = self.fs.passthrough_candidate(handle);
        let answer = self.passthrough.open(ino, handle, candidate.as_deref(), FILE_OPEN_FLAGS, register)?;
        if matches!(answer, Answer::Passthrough(_)) {
            crate::trace::Monitor::count(&self.fs.monitor.passthrough_opens, 1);
        }
        Ok(answer)
    }

    fn entry(&self, reply: ReplyEntry, result: SysResult<Entry>) {
        match result {
            Ok(entry) => reply.entry_with_ttls(&self.ttl, &self.ttl, &attr(&entry.stat), Generation(0)),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn empty(reply: ReplyEmpty, result: SysResult<()>) {
        match result {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn xattr(reply: ReplyXattr, size: u32, data: SysResult<Vec<u8>>) {
        match data {
            Ok(data) if size == 0 => reply.size(data.len() as u32),
            Ok(data) if data.len() > size as usize => reply.error(FuseErrno::ERANGE),
            Ok(data) => reply.data(&data),
            Err(err) => reply.error(errno(err)),
        }
    }
}

impl Filesystem for StrataFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Readdirplus hands out attributes with names, saving a lookup round
        // trip per entry for stat walks, `ls -l` and `rm -rf`. Always, not
        // "auto" (which uses it for a listing's first chunk only): a warm
        // listing comes from the kernel's cache anyway.
        let mut wanted = InitFlags::FUSE_CACHE_SYMLINKS | InitFlags::FUSE_DO_READDIRPLUS;
        if self.parallel {
            wanted |= InitFlags::FUSE_PARALLEL_DIROPS;
        }
        if self.passthrough.is_enabled() {
            // Depth 1: the layers must not be on a stacked filesystem
            // themselves, and the mount may still be a layer of the
            // kernel's overlayfs.
            let granted =
                config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok();
            if !granted {
                log::info!("the kernel offers no FUSE passthrough; the daemon serves reads and writes");
                self.passthrough.disable();
            }
        }
        // Kernels before 4.19 (5.1 for directories) fail an open that gets
        // ENOSYS: they need the requests.
        let offered = config.capabilities();
        self.open_requests = self.passthrough.is_enabled() || !offered.contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        self.opendir_requests = !offered.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        if self.open_requests {
            // O_TRUNC arrives with OPEN (without OPEN, as a SETATTR), so a
            // truncating open skips copying the data either way.
            wanted |= InitFlags::FUSE_ATOMIC_O_TRUNC;
        } else {
            self.fs.serve_files_by_inode();
        }
        for flag in wanted.iter() {
            if config.add_capabilities(flag).is_err() {
                log::debug!("kernel lacks capability {flag:?}");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.fs.sync();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            // A negative entry (inode 0) lets the kernel cache "no such
            // name" too; creating it through the mount replaces it.
            Err(Errno::ENOENT) => {
                let mut none = crate::sys::empty_stat();
                none.st_mode = libc::S_IFREG;
                reply.entry_with_ttls(&self.ttl, &self.ttl, &attr(&none), Generation(0));
            }
            result => self.entry(reply, result),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0, fh.map(|h| h.0)) {
            Ok(stat) => reply.attr(&self.ttl, &attr(&stat)),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change =
            AttrChange { mode, uid, gid, size, atime: set_time(atime), mtime: set_time(mtime), ctime: ctime.is_some() };
        match self.fs.setattr(ino.0, change) {
            Ok(stat) => reply.attr(&self.ttl, &attr(&stat)),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let mode = mode & !(umask & 0o777);
        self.entry(reply, self.fs.mknod(parent.0, name, mode, rdev as u64, caller(req)));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.entry(reply, self.fs.mkdir(parent.0, name, mode & !(umask & 0o777), caller(req)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.rmdir(parent.0, name));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.entry(reply, self.fs.symlink(parent.0, link_name, target.as_os_str(), caller(req)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.rename(parent.0, name, newparent.0, newname, flags.bits()));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.entry(reply, self.fs.link(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::trace::Monitor::count(&self.fs.monitor.open_requests, 1);
        if !self.open_requests {
            // The kernel takes this as success, for this open and all later
            // ones (see `open_requests`).
            return reply.error(FuseErrno::ENOSYS);
        }
        let handle = match self.fs.open(ino.0, flags.0) {
            Ok(handle) => handle,
            Err(err) => return reply.error(errno(err)),
        };
        match self.answer_open(ino.0, handle, |file| reply.open_backing(file)) {
            Ok(Answer::Passthrough(backing)) => {
                reply.opened_passthrough(FileHandle(handle), PASSTHROUGH_OPEN_FLAGS, &backing)
            }
            Ok(Answer::Flags(flags)) => reply.opened(FileHandle(handle), flags),
            Err(err) => {
                self.fs.release(handle);
                reply.error(errno(err))
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(ino.0, fh.0, offset, data) {
            Ok(written) => reply.written(written as u32),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Nothing to do at close (locks are the kernel's): ENOSYS tells the
        // kernel to send no FLUSH again, for opens without NOFLUSH too.
        reply.error(FuseErrno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.passthrough.release(fh.0);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.fsync(ino.0, fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The kernel may keep listings (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE):
        // every change to a directory goes through this mount, and the
        // kernel drops its copy on each one. ENOSYS: from now on the kernel
        // opens and closes directories itself with those flags, sparing two
        // requests per directory a walk enters. Readdir comes by inode
        // either way, so the handle is of no use.
        if self.opendir_requests {
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE);
        }
        reply.error(FuseErrno::ENOSYS);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let result = self.fs.readdir(ino.0, offset, |next, item| {
            reply.add(INodeNo(item.ino), next, dtype_file_type(item.kind), &item.name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let result = self.fs.readdirplus(ino.0, offset, |next, item, entry| {
            reply.add(INodeNo(entry.ino), next, &item.name, &self.ttl, &attr(&entry.stat), Generation(0))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok(); // nothing is kept per open directory
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        Self::xattr(reply, size, self.fs.getxattr(ino.0, name));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let list = self.fs.listxattr(ino.0).map(|names| {
            let mut data = Vec::new();
            for name in names {
                data.extend_from_slice(name.as_bytes());
                data.push(0);
            }
            data
        });
        Self::xattr(reply, size, list);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.removexattr(ino.0, name));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.access(ino.0, mask.bits()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if !self.open_requests {
            // Without OPEN, CREATE's open is of no use: ENOSYS makes the
            // kernel send MKNOD and open the new file itself, which spares
            // the RELEASE at its close.
            return reply.error(FuseErrno::ENOSYS);
        }
        let (entry, handle) = match self.fs.create(parent.0, name, mode & !(umask & 0o777), flags, caller(req)) {
            Ok(created) => created,
            Err(err) => return reply.error(errno(err)),
        };
        let attr = attr(&entry.stat);
        match self.answer_open(entry.ino, handle, |file| reply.open_backing(file)) {
            Ok(Answer::Passthrough(backing)) => reply.created_passthrough(
                &self.ttl,
                &attr,
                Generation(0),
                FileHandle(handle),
                PASSTHROUGH_OPEN_FLAGS,
                &backing,
            ),
            Ok(Answer::Flags(flags)) => reply.created(&self.ttl, &attr, Generation(0), FileHandle(handle), flags),
            Err(err) => {
                self.fs.release(handle);
                reply.error(errno(err))
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.fallocate(ino.0, fh.0, mode, offset, length));
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        match self.fs.lseek(ino.0, fh.0, offset, whence) {
            Ok(position) => reply.offset(position),
            Err(err) => reply.error(errno(err)),
        }
    }
}
