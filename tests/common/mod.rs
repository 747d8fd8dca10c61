//! Shared helpers for Strata's integration tests.
//!
//! - [`Layers`]: a temporary directory holding lower layers, an upper, a work
//!   directory and a mount point, with builders for every kind of entry a layer
//!   can hold (files, links, fifos, whiteouts and opaque markers of each dialect).
//! - [`StrataMount`]: a guard around `strata mount` that unmounts on drop, also
//!   while a test panics.
//! - [`KernelOverlay`]: the same for the kernel's overlayfs, our reference.
//! - [`tree_snapshot`]: a walk of a tree (never following symlinks) used to
//!   compare Strata with the kernel.
//!
//! Tests run as root (they mount). `STRATA_TEST_BIN` may point at another
//! binary with the same command line, e.g. `tests/support/kernel-strata.sh`
//! (the kernel's overlayfs) to check the tests themselves against the reference.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Binary, commands
// ---------------------------------------------------------------------------

/// The Strata binary under test.
pub fn strata_bin() -> PathBuf {
    match std::env::var_os("STRATA_TEST_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_strata")),
    }
}

/// What a finished (or timed out) command left behind.
#[derive(Debug)]
pub struct RunOutput {
    /// `None` when the command was killed after the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs `cmd` with stdout and stderr sent to anonymous files (not pipes: a
/// daemon that keeps them open must not make us wait), killing it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> RunOutput {
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(err.try_clone().expect("clone"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |f: &mut fs::File| {
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).ok();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).ok();
        s.push_str(&String::from_utf8_lossy(&bytes));
        s
    };
    RunOutput { status, stdout: read(&mut out), stderr: read(&mut err) }
}

/// Runs `strata ARGS` with a 30 s timeout.
pub fn strata<I, S>(args: I) -> RunOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run(Command::new(strata_bin()).args(args), Duration::from_secs(30))
}

/// Runs a shell command line as root; panics unless it succeeds.
pub fn sh(script: &str) -> RunOutput {
    let o = run(Command::new("sh").arg("-c").arg(script), Duration::from_secs(60));
    assert!(o.success(), "`{script}` failed: {o:?}");
    o
}

/// Runs a shell command line as uid/gid 1000 (no supplementary groups).
pub fn sh_as_user(uid: u32, gid: u32, script: &str) -> RunOutput {
    run(
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .args(["sh", "-c", script]),
        Duration::from_secs(60),
    )
}

// ---------------------------------------------------------------------------
// Raw syscalls
// ---------------------------------------------------------------------------

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path with NUL")
}

fn cname(n: &str) -> CString {
    CString::new(n).expect("name with NUL")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The errno of a failed result, `None` on success.
pub fn errno<T>(r: &io::Result<T>) -> Option<i32> {
    r.as_ref().err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// Asserts that `r` failed with `expected` (an errno).
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, expected: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected errno {expected}, got success ({v:?})"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(expected),
            "{what}: expected errno {expected} ({}), got {e}",
            io::Error::from_raw_os_error(expected)
        ),
    }
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cpath(p), cname(name));
    // SAFETY: valid C strings and a valid buffer.
    check(unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

pub fn lgetxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), cname(name));
    loop {
        // SAFETY: size query with a null buffer.
        let size = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buffer of the given length.
        let got = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

pub fn llistxattr(p: &Path) -> io::Result<Vec<String>> {
    let p = cpath(p);
    loop {
        // SAFETY: size query.
        let size = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buffer of the given length.
        let got = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        let mut names: Vec<String> =
            buf.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        names.sort();
        return Ok(names);
    }
}

pub fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(p), cname(name));
    // SAFETY: valid C strings.
    check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) })
}

/// mknod(2); `kind` is `libc::S_IFCHR`, `S_IFBLK`, `S_IFIFO` or `S_IFSOCK`.
pub fn mknod(p: &Path, kind: libc::mode_t, perm: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid C string.
    check(unsafe { libc::mknod(c.as_ptr(), kind | perm, libc::makedev(major, minor)) })
}

pub fn mkfifo(p: &Path, perm: libc::mode_t) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid C string.
    check(unsafe { libc::mkfifo(c.as_ptr(), perm) })
}

/// renameat2(2) with `libc::RENAME_NOREPLACE` / `RENAME_EXCHANGE` flags.
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (f, t) = (cpath(from), cpath(to));
    // SAFETY: valid C strings; AT_FDCWD with absolute paths.
    check(unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), flags) })
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

/// Sets atime and mtime (seconds, nanoseconds) without following symlinks.
pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let c = cpath(p);
    let ts =
        [libc::timespec { tv_sec: atime.0, tv_nsec: atime.1 }, libc::timespec { tv_sec: mtime.0, tv_nsec: mtime.1 }];
    // SAFETY: valid C string and two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

pub fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let c = cpath(p);
    // SAFETY: zeroed plain-old-data out parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(c.as_ptr(), &mut s) })?;
    Ok(s)
}

/// True if `p` is a char device 0/0 (the kernel's whiteout).
pub fn is_whiteout(p: &Path) -> bool {
    match fs::symlink_metadata(p) {
        Ok(m) => m.file_type().is_char_device() && m.rdev() == 0,
        Err(_) => false,
    }
}

/// True if nothing at all exists at `p` (not even a dangling symlink).
pub fn absent(p: &Path) -> bool {
    matches!(fs::symlink_metadata(p), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// Sorted names in a directory.
pub fn ls(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display()))
        .map(|e| e.expect("dirent").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn read_string(p: &Path) -> String {
    String::from_utf8_lossy(&fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))).into_owned()
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a whole file, streamed.
pub fn sha256_file(p: &Path) -> io::Result<String> {
    let mut f = fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// sha256 of `len` bytes at `offset` of a file.
pub fn sha256_range(p: &Path, offset: u64, len: usize) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(p)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(sha256_hex(&buf))
}

// ---------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------

/// A temporary directory for one test, world-traversable so that tests can
/// act as another user. Under /var/tmp: one filesystem for upper and work.
pub fn test_tempdir() -> TempDir {
    let base = Path::new("/var/tmp");
    let t = tempfile::Builder::new()
        .prefix("strata-test-")
        .tempdir_in(if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() })
        .expect("tempdir");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
    t
}

/// One layer directory with builder methods; every method creates missing
/// parent directories and panics on failure.
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
}

impl Layer {
    pub fn new(path: PathBuf) -> Self {
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Layer { path }
    }

    /// Path of `rel` inside this layer.
    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() { self.path.clone() } else { self.path.join(rel) }
    }

    fn parents(&self, rel: &str) -> PathBuf {
        let p = self.p(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        p
    }

    pub fn dir(&self, rel: &str) -> &Self {
        let p = self.p(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        self
    }

    pub fn file(&self, rel: &str, content: impl AsRef<[u8]>) -> &Self {
        let p = self.parents(rel);
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }

    pub fn file_mode(&self, rel: &str, content: impl AsRef<[u8]>, mode: u32) -> &Self {
        self.file(rel, content).mode(rel, mode)
    }

    /// chmod (follows nothing: do not use on symlinks).
    pub fn mode(&self, rel: &str, mode: u32) -> &Self {
        let p = self.p(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self
    }

    pub fn owner(&self, rel: &str, uid: u32, gid: u32) -> &Self {
        let p = self.p(rel);
        lchown(&p, uid, gid).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        self
    }

    pub fn symlink(&self, rel: &str, target: &str) -> &Self {
        let p = self.parents(rel);
        std::os::unix::fs::symlink(target, &p).unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self
    }

    pub fn hardlink(&self, existing: &str, new: &str) -> &Self {
        let p = self.parents(new);
        fs::hard_link(self.p(existing), &p).unwrap_or_else(|e| panic!("link {}: {e}", p.display()));
        self
    }

    pub fn fifo(&self, rel: &str) -> &Self {
        let p = self.parents(rel);
        mkfifo(&p, 0o644).unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
        self
    }

    /// A kernel whiteout: char device 0/0.
    pub fn whiteout(&self, rel: &str) -> &Self {
        let p = self.parents(rel);
        mknod(&p, libc::S_IFCHR, 0, 0, 0).unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
        self
    }

    /// An OCI whiteout: an empty file `.wh.NAME` beside where NAME would be.
    pub fn oci_whiteout(&self, rel: &str) -> &Self {
        let p = self.p(rel);
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        let parent =
            p.parent().expect("parent").strip_prefix(&self.path).expect("inside").to_string_lossy().into_owned();
        let wh = if parent.is_empty() { format!(".wh.{name}") } else { format!("{parent}/.wh.{name}") };
        self.file(&wh, "")
    }

    /// An OCI opaque marker: `DIR/.wh..wh..opq`.
    pub fn oci_opaque(&self, dir: &str) -> &Self {
        self.dir(dir);
        let marker = if dir.is_empty() { ".wh..wh..opq".to_string() } else { format!("{dir}/.wh..wh..opq") };
        self.file(&marker, "")
    }

    /// Marks `dir` opaque with xattr `name` = "y" (e.g. "trusted.overlay.opaque").
    pub fn opaque(&self, dir: &str, name: &str) -> &Self {
        self.dir(dir).xattr(dir, name, b"y")
    }

    pub fn xattr(&self, rel: &str, name: &str, value: &[u8]) -> &Self {
        let p = self.p(rel);
        lsetxattr(&p, name, value).unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
        self
    }

    /// Sets atime and mtime to `secs` (whole seconds) plus `nsec`.
    pub fn times(&self, rel: &str, secs: i64, nsec: i64) -> &Self {
        let p = self.p(rel);
        set_times(&p, (secs, nsec), (secs, nsec)).unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
        self
    }

    /// A sparse file of `size` bytes with data only at the given offsets.
    pub fn sparse(&self, rel: &str, size: u64, chunks: &[(u64, &[u8])]) -> &Self {
        use std::os::unix::fs::FileExt;
        let p = self.parents(rel);
        let f = fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.set_len(size).expect("set_len");
        for (off, data) in chunks {
            f.write_all_at(data, *off).expect("write_at");
        }
        f.sync_all().expect("fsync");
        self
    }
}

/// A temporary directory with lower layers `lower0` (topmost) .. `lowerN`,
/// an `upper`, a `work` directory and a mount point `mnt`.
pub struct Layers {
    pub tmp: TempDir,
    pub lowers: Vec<Layer>,
    pub upper: Layer,
    pub work: PathBuf,
    pub mnt: PathBuf,
}

impl Layers {
    pub fn new(n_lowers: usize) -> Self {
        let tmp = test_tempdir();
        let root = tmp.path().to_path_buf();
        let lowers = (0..n_lowers).map(|i| Layer::new(root.join(format!("lower{i}")))).collect();
        let upper = Layer::new(root.join("upper"));
        let work = root.join("work");
        let mnt = root.join("mnt");
        fs::create_dir_all(&work).expect("mkdir work");
        fs::create_dir_all(&mnt).expect("mkdir mnt");
        Layers { tmp, lowers, upper, work, mnt }
    }

    /// Lower layer `i`; 0 is the topmost.
    pub fn lower(&self, i: usize) -> &Layer {
        &self.lowers[i]
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn lower_paths(&self) -> Vec<PathBuf> {
        self.lowers.iter().map(|l| l.path.clone()).collect()
    }

    /// `--lower A --lower B ...` arguments (topmost first).
    pub fn lower_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in &self.lowers {
            v.push("--lower".to_string());
            v.push(l.path.display().to_string());
        }
        v
    }

    /// `lowerdir=A:B,upperdir=U,workdir=W` for the `-o` forms.
    pub fn overlay_opts(&self) -> String {
        let lowers: Vec<String> = self.lowers.iter().map(|l| l.path.display().to_string()).collect();
        format!("lowerdir={},upperdir={},workdir={}", lowers.join(":"), self.upper.path.display(), self.work.display())
    }
}

// ---------------------------------------------------------------------------
// Mount table and daemon processes
// ---------------------------------------------------------------------------

fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (source, fstype) of every mount on `mnt`, bottom first.
pub fn mounts_at(mnt: &Path) -> Vec<(String, String)> {
    let want = mnt.to_string_lossy();
    let table = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() >= 3 && unescape_mount_field(f[1]) == want {
                Some((f[0].to_string(), f[2].to_string()))
            } else {
                None
            }
        })
        .collect()
}

pub fn is_mounted(mnt: &Path) -> bool {
    !mounts_at(mnt).is_empty()
}

/// Pids of daemons (process named like the Strata binary, or `strata`) with
/// `mnt` in their command line.
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    let want = mnt.to_string_lossy().into_owned();
    let bin_name = strata_bin().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bin_comm: String = bin_name.chars().take(15).collect();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else { return pids };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else { continue };
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let comm = comm.trim_end();
        if comm != "strata" && comm != bin_comm {
            continue;
        }
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.iter().any(|a| a.contains(&want)) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits up to `timeout` for `cond`; returns whether it became true.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Best-effort removal of every mount on `mnt` and of its daemons; never panics.
pub fn force_cleanup(mnt: &Path) {
    if is_mounted(mnt) {
        let _ = run(Command::new(strata_bin()).arg("umount").arg(mnt), Duration::from_secs(15));
    }
    let mut tries = 0;
    while is_mounted(mnt) && tries < 10 {
        let _ = run(Command::new("umount").arg("-l").arg(mnt), Duration::from_secs(10));
        tries += 1;
    }
    // Daemons we started that are still around after their mount is gone.
    if !wait_for(Duration::from_secs(3), || daemon_pids(mnt).is_empty()) {
        for pid in daemon_pids(mnt) {
            // SAFETY: plain kill(2) of a daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Unmounts whatever is left mounted at a path when dropped, also when the
/// test panics: for tests that mount and unmount by hand.
pub struct CleanupOnDrop(pub PathBuf);

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        force_cleanup(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Strata mount guard
// ---------------------------------------------------------------------------

/// A live Strata mount; unmounted on drop (`strata umount`, then `umount -l`).
pub struct StrataMount {
    pub mnt: PathBuf,
}

impl StrataMount {
    /// `strata mount --lower L0 --lower L1 ... --upper U --work W MNT`.
    pub fn mount(l: &Layers) -> Self {
        let mut args = vec!["mount".to_string()];
        args.extend(l.lower_args());
        args.extend([
            "--upper".into(),
            l.upper.path.display().to_string(),
            "--work".into(),
            l.work.display().to_string(),
        ]);
        args.push(l.mnt.display().to_string());
        Self::from_args(&args, &l.mnt)
    }

    /// Read-only: `strata mount --lower ... MNT` (no upper).
    pub fn mount_ro(l: &Layers) -> Self {
        let mut args = vec!["mount".to_string()];
        args.extend(l.lower_args());
        args.push(l.mnt.display().to_string());
        Self::from_args(&args, &l.mnt)
    }

    /// `strata mount -o OPTS MNT` with a raw option string.
    pub fn mount_opts(opts: &str, mnt: &Path) -> Self {
        let args = vec!["mount".to_string(), "-o".to_string(), opts.to_string(), mnt.display().to_string()];
        Self::from_args(&args, mnt)
    }

    /// Runs `strata ARGS`, asserting success and that `mnt` is then mounted.
    pub fn from_args(args: &[String], mnt: &Path) -> Self {
        let o = strata(args);
        if !o.success() {
            force_cleanup(mnt);
            panic!("strata {} failed: {:?}\nstdout: {}\nstderr: {}", args.join(" "), o.status, o.stdout, o.stderr);
        }
        let guard = StrataMount { mnt: mnt.to_path_buf() };
        assert!(
            is_mounted(mnt),
            "strata {} exited 0 but {} is not mounted (stderr: {})",
            args.join(" "),
            mnt.display(),
            o.stderr
        );
        guard
    }

    /// Takes charge of a mount made some other way (unmounted on drop).
    pub fn adopt(mnt: &Path) -> Self {
        StrataMount { mnt: mnt.to_path_buf() }
    }

    /// Path of `rel` inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() { self.mnt.clone() } else { self.mnt.join(rel) }
    }

    pub fn daemon_pids(&self) -> Vec<i32> {
        daemon_pids(&self.mnt)
    }

    /// `strata umount MNT`; asserts it succeeds and leaves nothing mounted.
    pub fn umount(self) {
        let o = strata([std::ffi::OsStr::new("umount"), self.mnt.as_os_str()]);
        assert!(o.success(), "strata umount {} failed: {o:?}", self.mnt.display());
        assert!(!is_mounted(&self.mnt), "{} still mounted after strata umount", self.mnt.display());
        // Drop finds nothing left to do.
    }
}

impl Drop for StrataMount {
    fn drop(&mut self) {
        force_cleanup(&self.mnt);
    }
}

// ---------------------------------------------------------------------------
// Kernel overlayfs guard
// ---------------------------------------------------------------------------

/// A kernel overlayfs mount; unmounted on drop.
pub struct KernelOverlay {
    pub mnt: PathBuf,
}

impl KernelOverlay {
    /// `mount -t overlay overlay -o lowerdir=..,upperdir=..,workdir=..[,EXTRA] MNT`.
    pub fn mount(lowers: &[PathBuf], upper_work: Option<(&Path, &Path)>, extra: &str, mnt: &Path) -> Self {
        let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let mut opts = format!("lowerdir={}", lowers.join(":"));
        if let Some((u, w)) = upper_work {
            opts.push_str(&format!(",upperdir={},workdir={}", u.display(), w.display()));
        }
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        let o = run(
            Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(mnt),
            Duration::from_secs(30),
        );
        assert!(o.success(), "kernel overlay mount -o {opts} {} failed: {o:?}", mnt.display());
        KernelOverlay { mnt: mnt.to_path_buf() }
    }

    /// Mounts a [`Layers`] with `redirect_dir=on`.
    pub fn mount_layers(l: &Layers) -> Self {
        Self::mount(&l.lower_paths(), Some((&l.upper.path, &l.work)), "redirect_dir=on", &l.mnt)
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() { self.mnt.clone() } else { self.mnt.join(rel) }
    }

    pub fn umount(self) {
        let o = run(Command::new("umount").arg(&self.mnt), Duration::from_secs(30));
        assert!(o.success(), "umount {} failed: {o:?}", self.mnt.display());
    }
}

impl Drop for KernelOverlay {
    fn drop(&mut self) {
        let mut tries = 0;
        while is_mounted(&self.mnt) && tries < 5 {
            let o = run(Command::new("umount").arg(&self.mnt), Duration::from_secs(30));
            if !o.success() {
                let _ = run(Command::new("umount").arg("-l").arg(&self.mnt), Duration::from_secs(30));
            }
            tries += 1;
        }
    }
}

// ---------------------------------------------------------------------------
// Tree snapshots
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// What a differential test compares for one entry. Directory size and all
/// times are left out (they legitimately differ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub kind: Kind,
    /// Permission bits including suid, sgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only.
    pub size: Option<u64>,
    /// Regular files only.
    pub sha256: Option<String>,
    /// Symlinks only.
    pub link: Option<PathBuf>,
    /// Devices only.
    pub rdev: Option<u64>,
    /// Sorted (name, value), without the markers' namespaces.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Xattrs that a snapshot leaves out: markers and private bookkeeping.
pub fn xattr_is_private(name: &str) -> bool {
    name == "security.selinux"
        || name.starts_with("trusted.overlay.")
        || name.starts_with("user.overlay.")
        || name.starts_with("trusted.strata.")
}

/// Xattrs of `p` with values, sorted, without private ones.
pub fn xattrs_of(p: &Path) -> Vec<(String, Vec<u8>)> {
    let names = llistxattr(p).unwrap_or_else(|e| panic!("listxattr {}: {e}", p.display()));
    names
        .into_iter()
        .filter(|n| !xattr_is_private(n))
        .map(|n| {
            let v = lgetxattr(p, &n).unwrap_or_else(|e| panic!("getxattr {n} on {}: {e}", p.display()));
            (n, v)
        })
        .collect()
}

pub fn entry_info(p: &Path) -> EntryInfo {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = m.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDev
    } else {
        Kind::BlockDev
    };
    EntryInfo {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: (kind == Kind::File).then(|| m.size()),
        sha256: (kind == Kind::File).then(|| sha256_file(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))),
        link: (kind == Kind::Symlink).then(|| fs::read_link(p).expect("readlink")),
        rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then(|| m.rdev()),
        xattrs: xattrs_of(p),
    }
}

/// Walks `root` without following symlinks. Keys are relative paths; the root
/// itself is "".
pub fn tree_snapshot(root: &Path) -> BTreeMap<PathBuf, EntryInfo> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = if rel.as_os_str().is_empty() { root.to_path_buf() } else { root.join(&rel) };
        let info = entry_info(&full);
        if info.kind == Kind::Dir {
            for e in fs::read_dir(&full).unwrap_or_else(|e| panic!("read_dir {}: {e}", full.display())) {
                let e = e.expect("dirent");
                stack.push(rel.join(e.file_name()));
            }
        }
        out.insert(rel, info);
    }
    out
}

/// Asserts two snapshots are equal, listing every difference.
#[track_caller]
pub fn assert_same_tree(
    a_name: &str,
    a: &BTreeMap<PathBuf, EntryInfo>,
    b_name: &str,
    b: &BTreeMap<PathBuf, EntryInfo>,
) {
    let mut diffs = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => diffs.push(format!("{}: only in {a_name}: {va:?}", k.display())),
            Some(vb) if va != vb => diffs.push(format!("{}:\n    {a_name}: {va:?}\n    {b_name}: {vb:?}", k.display())),
            _ => {}
        }
    }
    for (k, vb) in b {
        if !a.contains_key(k) {
            diffs.push(format!("{}: only in {b_name}: {vb:?}", k.display()));
        }
    }
    assert!(diffs.is_empty(), "{a_name} and {b_name} differ:\n  {}", diffs.join("\n  "));
}

/// Appends `data` to a file.
pub fn append(p: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().append(true).open(p)?;
    f.write_all(data)
}
