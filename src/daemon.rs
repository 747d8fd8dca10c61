//! The mount's life: mount, detach once the mount is live, serve until
//! unmounted or signalled, then flush and leave no trace.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use nix::sys::signal::{SigSet, Signal};

use crate::config::{self, MountConfig, PassthroughSetting};
use crate::fuse::StrataFuse;
use crate::layers::{LayerStack, XattrNamespace};
use crate::passthrough::Passthrough;
use crate::sys;
use crate::unionfs::{FsOptions, UnionFs};

/// Mount and serve. Without `foreground`, returns in the caller's process
/// (exit 0) as soon as the mount answers requests, while a detached child
/// serves it.
pub fn run(config: MountConfig) -> Result<(), String> {
    for option in &config.ignored {
        log::warn!("option {option} is accepted but not implemented; ignoring it");
    }
    sys::raise_fd_limit();
    // Large listings and tables go back to the system when dropped (see
    // sys::set_malloc_mmap_threshold): the daemon's memory follows its caches.
    sys::set_malloc_mmap_threshold(128 * 1024);
    // Rootless (a user namespace, or no CAP_SYS_ADMIN) cannot write
    // trusted.* xattrs: mark with user.overlay.*, as the kernel's userxattr.
    let namespace = match &config.work {
        Some(work) if !sys::can_set_trusted_xattr(work) => XattrNamespace::User,
        _ => XattrNamespace::Trusted,
    };
    let stack = LayerStack::open(config.upper.as_deref(), &config.lowers, namespace)
        .map_err(|err| format!("cannot open the layers: {err}"))?;
    let options = FsOptions {
        fsync: config.fsync,
        static_nlink: config.static_nlink,
        uids: config.uids.clone(),
        gids: config.gids.clone(),
    };
    let fs = UnionFs::new(stack, config.work.as_deref(), options)
        .map_err(|err| format!("cannot prepare work directory: {err}"))?;
    let fs = Arc::new(fs);
    log::info!(
        "mounting {} lower layer(s){} at {} (whiteouts as {:?})",
        config.lowers.len(),
        if config.upper.is_some() { " and an upper" } else { ", read-only" },
        config.mountpoint.display(),
        fs.whiteout_style()
    );

    let adapter = || StrataFuse {
        fs: fs.clone(),
        ttl: config.timeout,
        parallel: config.threads > 1,
        passthrough: Passthrough::new(wants_passthrough(config.passthrough, fs.is_read_only())),
        // Both decided at init, with what the kernel offers.
        open_requests: true,
        opendir_requests: true,
    };
    let mut fuse_config = Config::default();
    fuse_config.mount_options = mount_options(&config, fs.is_read_only());
    // As root, other users may use the mount (a container's processes are
    // not root on the host); the kernel still checks permission bits.
    fuse_config.acl = if config.allow_other || sys::geteuid() == 0 { SessionACL::All } else { SessionACL::Owner };
    fuse_config.n_threads = Some(config.threads);
    fuse_config.clone_fd = config.threads > 1;

    // Signals are taken by a dedicated thread: block them before any
    // thread starts so every event loop inherits the mask.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals.thread_block().map_err(|err| format!("cannot block signals: {err}"))?;

    // Strata mounts the FUSE device itself when it may (root, or root in a
    // user namespace), and fuser only serves it: fuser would otherwise
    // unmount the mount point's path when the session ends, which can hit
    // a new mount made there after an external unmount (a runtime
    // restarting a container). Without that right, fusermount3 mounts.
    let mount_error = |err: String| format!("cannot mount {}: {err}", config.mountpoint.display());
    let (mut session, own_mount) = match sys::fuse_mount(
        &config.mountpoint,
        "strata",
        &kernel_options(fuse_config.acl),
        mount_flags(&config, fs.is_read_only()),
    ) {
        Ok(device) => {
            let session = Session::from_fd(adapter(), device, fuse_config.acl, fuse_config.clone())
                .map_err(|err| mount_error(err.to_string()))?;
            (session, true)
        }
        Err(sys::Errno::EPERM) => {
            let session = Session::new(adapter(), &config.mountpoint, &fuse_config)
                .map_err(|err| mount_error(err.to_string()))?;
            (session, false)
        }
        Err(err) => return Err(mount_error(err.to_string())),
    };

    // What a caller may use as soon as `strata mount` returns (the trace
    // file, the control socket, the mount record) is made before the
    // parent leaves, and a failure still reaches the caller's terminal.
    if let Some(trace) = &config.trace {
        let sink: Box<dyn std::io::Write + Send> = match &trace.file {
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|err| format!("cannot open trace file {}: {err}", path.display()))?,
            ),
            None => Box::new(std::io::stderr()),
        };
        fs.monitor.subscribe(sink, trace.format, trace.lookups);
    }
    // One read of the mount table names both runtime files (it can be
    // long on a busy host, and the caller waits for it).
    let (record, socket) = match runtime_path(&config.mountpoint, "mount") {
        Some(record) => (Some(record.clone()), Some(record.with_extension("sock"))),
        None => (None, None),
    };
    let listener = socket.as_ref().and_then(|path| match crate::control::listen(path) {
        Ok(listener) => Some(listener),
        Err(err) => {
            log::warn!("no control socket ({}): {err}", path.display());
            None
        }
    });
    // Before the serving threads start (after the fork: a child's table is
    // only as large as the descriptors it inherits).
    let reserve_descriptors = || {
        if let Ok(root) = std::fs::File::open("/") {
            sys::reserve_descriptors(root.as_fd(), fs.stack.descriptors_held_at_most() + DESCRIPTORS_FOR_REQUESTS);
        }
    };
    if config.foreground {
        reserve_descriptors();
        write_record(&config, record.as_deref(), std::process::id() as i32);
    } else {
        // The mount is live: the kernel queues requests until the child
        // reads them. The parent leaves without unmounting (no destructors).
        match sys::fork() {
            Ok(0) => {
                sys::setsid();
                sys::detach_stdio();
                // Do not keep the caller's directory (perhaps inside another
                // mount) busy for the life of the daemon.
                let _ = std::env::set_current_dir("/");
                reserve_descriptors();
            }
            Ok(child) => {
                write_record(&config, record.as_deref(), child);
                exit_leaving_the_mount()
            }
            Err(err) => return Err(format!("cannot fork the daemon: {err}")),
        }
    }
    if let Some(listener) = listener {
        crate::control::serve(fs.clone(), listener, &config.mountpoint);
    }
    let mut unmounter = session.unmount_callable();
    let mountpoint = config.mountpoint.clone();
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            log::info!("{signal:?}: unmounting {}", mountpoint.display());
            let result = if own_mount {
                sys::umount(&mountpoint, false).map_err(|err| err.to_string())
            } else {
                unmounter.unmount().map_err(|err| err.to_string())
            };
            if let Err(err) = result {
                log::warn!("unmount failed: {err}; detaching");
                let _ = sys::umount(&mountpoint, true);
            }
        }
    });
    if let Some(cap) = config.inode_cache {
        // The cap is enforced by asking the kernel to drop cold entries,
        // through the session's notifier, from a thread of its own.
        let notifier = session.notifier();
        let fs = fs.clone();
        std::thread::spawn(move || {
            fs.enforce_inode_cap(cap, |parent, name| notifier.inval_entry(fuser::INodeNo(parent), name))
        });
    }
    let result = session.run();
    fs.sync();
    if let Some(dir) = &config.ephemeral {
        // `mount --ephemeral`: the upper layer goes with the mount.
        if let Err(err) = crate::extract::remove_path(dir) {
            log::warn!("cannot remove the ephemeral upper {}: {err}", dir.display());
        }
    }
    // Device numbers of FUSE mounts are reused: once unmounted, a new mount
    // may already have written its own record under the same name. Remove
    // the files only while the record is still this daemon's.
    let own = record
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| MountRecord::from_text(&text))
        .is_some_and(|r| r.pid == std::process::id() as i32);
    if own {
        for path in record.into_iter().chain(socket) {
            let _ = std::fs::remove_file(path);
        }
    }
    result.map_err(|err| format!("serving the mount failed: {err}"))
}

/// Descriptors reserved beyond the layer stack's own: files and
/// directories the mount's users hold open, copy-ups in progress.
const DESCRIPTORS_FOR_REQUESTS: usize = 1024;

fn exit_leaving_the_mount() -> ! {
    // std::process::exit runs no destructors: nothing of the session the
    // child now serves (fuser's unmount guard on the fusermount3 path) is
    // torn down by the parent.
    std::process::exit(0)
}

/// The kernel's FUSE options for a mount made by Strata itself.
fn kernel_options(acl: SessionACL) -> String {
    let mut options = "default_permissions,subtype=strata".to_string();
    if acl == SessionACL::All {
        options += ",allow_other";
    }
    options
}

/// The generic mount flags for a mount made by Strata itself.
fn mount_flags(config: &MountConfig, read_only: bool) -> libc::c_ulong {
    let mut flags = 0;
    if !config.suid {
        flags |= libc::MS_NOSUID;
    }
    if !config.dev {
        flags |= libc::MS_NODEV;
    }
    if !config.exec {
        flags |= libc::MS_NOEXEC;
    }
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    flags
}

fn mount_options(config: &MountConfig, read_only: bool) -> Vec<MountOption> {
    let mut options = vec![
        MountOption::FSName("strata".to_string()),
        // A mount as root drops fuser's Subtype; pass it raw.
        MountOption::CUSTOM("subtype=strata".to_string()),
        MountOption::DefaultPermissions,
    ];
    options.push(if config.suid { MountOption::Suid } else { MountOption::NoSuid });
    options.push(if config.dev { MountOption::Dev } else { MountOption::NoDev });
    if !config.exec {
        options.push(MountOption::NoExec);
    }
    if read_only {
        options.push(MountOption::RO);
    }
    options
}

/// Where live mounts are recorded: one file per mount, named by the
/// mount's device number (unique while it is mounted), so `strata umount`,
/// `strata diff MOUNTPOINT` and friends can find the daemon and its layers.
fn record_dir() -> PathBuf {
    if sys::geteuid() == 0 {
        PathBuf::from("/run/strata")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("strata"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/strata-{}", sys::geteuid())))
    }
}

fn runtime_path(mountpoint: &Path, extension: &str) -> Option<PathBuf> {
    let mount =
        config::mounts().into_iter().rev().find(|m| m.mountpoint == mountpoint && m.fstype.starts_with("fuse"))?;
    Some(record_dir().join(format!("{}.{extension}", mount.device.replace(':', "-"))))
}

fn record_path(mountpoint: &Path) -> Option<PathBuf> {
    runtime_path(mountpoint, "mount")
}

/// The control socket of the Strata mount at `mountpoint`.
pub fn control_socket(mountpoint: &Path) -> Result<PathBuf, String> {
    let canonical = std::fs::canonicalize(mountpoint).map_err(|err| format!("{}: {err}", mountpoint.display()))?;
    match config::mounts().into_iter().rev().find(|m| m.mountpoint == canonical) {
        Some(m) if m.fstype == "fuse.strata" => {}
        Some(m) => return Err(format!("{} is a {} mount, not a Strata mount", canonical.display(), m.fstype)),
        None => return Err(format!("{} is not a mount point", canonical.display())),
    }
    runtime_path(&canonical, "sock").ok_or_else(|| format!("cannot find the control socket of {}", canonical.display()))
}

/// What a running daemon serves.
#[derive(Debug, Clone, PartialEq)]
pub struct MountRecord {
    pub pid: i32,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    /// Topmost first.
    pub lowers: Vec<PathBuf>,
}

impl MountRecord {
    /// One `key path` line each; paths are absolute and a newline in one
    /// is written as `\n`.
    fn to_text(&self) -> String {
        let escape = |p: &Path| p.to_string_lossy().replace('\\', "\\\\").replace('\n', "\\n");
        let mut text = format!("pid {}\n", self.pid);
        if let Some(upper) = &self.upper {
            text += &format!("upper {}\n", escape(upper));
        }
        if let Some(work) = &self.work {
            text += &format!("work {}\n", escape(work));
        }
        for lower in &self.lowers {
            text += &format!("lower {}\n", escape(lower));
        }
        text
    }

    fn from_text(text: &str) -> Option<Self> {
        let unescape = |s: &str| PathBuf::from(s.replace("\\n", "\n").replace("\\\\", "\\"));
        let mut record = MountRecord { pid: 0, upper: None, work: None, lowers: Vec::new() };
        for line in text.lines() {
            let (key, value) = line.split_once(' ')?;
            match key {
                "pid" => record.pid = value.parse().ok()?,
                "upper" => record.upper = Some(unescape(value)),
                "work" => record.work = Some(unescape(value)),
                "lower" => record.lowers.push(unescape(value)),
                _ => {}
            }
        }
        (record.pid > 0).then_some(record)
    }

    /// The records of every mount whose daemon is still running.
    pub fn live() -> Vec<Self> {
        let Ok(dir) = std::fs::read_dir(record_dir()) else { return Vec::new() };
        dir.flatten()
            .filter_map(|entry| Self::from_text(&std::fs::read_to_string(entry.path()).ok()?))
            .filter(|record| process_alive(record.pid))
            .collect()
    }

    /// The record of the Strata mount at `mountpoint`, if it is one.
    pub fn find(mountpoint: &Path) -> Option<Self> {
        let mountpoint = std::fs::canonicalize(mountpoint).ok()?;
        let text = std::fs::read_to_string(record_path(&mountpoint)?).ok()?;
        Self::from_text(&text)
    }
}

fn write_record(config: &MountConfig, path: Option<&Path>, pid: i32) -> Option<()> {
    let path = path?;
    let record =
        MountRecord { pid, upper: config.upper.clone(), work: config.work.clone(), lowers: config.lowers.clone() };
    std::fs::create_dir_all(path.parent()?).ok()?;
    std::fs::write(path, record.to_text()).ok()
}

/// `strata umount`: unmount and wait for the daemon to finish.
pub fn unmount(mountpoint: &Path) -> Result<(), String> {
    let mountpoint = std::fs::canonicalize(mountpoint).map_err(|err| format!("{}: {err}", mountpoint.display()))?;
    let mount = config::mounts().into_iter().rev().find(|m| m.mountpoint == mountpoint);
    match &mount {
        None => return Err(format!("{} is not mounted", mountpoint.display())),
        Some(m) if m.fstype != "fuse.strata" => {
            return Err(format!("{} is a {} mount, not a Strata mount", mountpoint.display(), m.fstype));
        }
        _ => {}
    }
    let daemon = MountRecord::find(&mountpoint).map(|record| record.pid);
    if sys::geteuid() == 0 {
        // A process walking the tree (find, a backup, an indexer) can keep
        // it busy for a moment: try again briefly before giving up.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match sys::umount(&mountpoint, false) {
                Ok(()) => break,
                Err(sys::Errno::EBUSY) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(err) => {
                    return Err(format!("cannot unmount {}: {err} (is a process using it?)", mountpoint.display()));
                }
            }
        }
    } else {
        let status = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&mountpoint)
            .status()
            .map_err(|err| format!("cannot run fusermount3: {err}"))?;
        if !status.success() {
            return Err(format!("fusermount3 -u {} failed", mountpoint.display()));
        }
    }
    if let Some(pid) = daemon {
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if process_alive(pid) {
            return Err(format!("unmounted, but daemon {pid} has not exited after 10 s"));
        }
    }
    Ok(())
}

fn process_alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Whether to ask the kernel for FUSE passthrough (see `PassthroughSetting`).
/// Only a daemon with CAP_SYS_ADMIN in the initial user namespace may
/// register backing files: elsewhere (rootless) asking would only cost a
/// request per open for nothing.
fn wants_passthrough(setting: PassthroughSetting, read_only: bool) -> bool {
    let wanted = match setting {
        PassthroughSetting::Auto => read_only,
        PassthroughSetting::On => true,
        PassthroughSetting::Off => false,
    };
    wanted && sys::geteuid() == 0 && sys::in_initial_user_namespace()
}
