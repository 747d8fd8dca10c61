//! `strata diff`: what a container changed, exactly as `docker diff` says it.
//!
//! Docker's definition compares two merged trees: the image view (the lower
//! layers alone) and the container view (the upper over them). A path of
//! the container view missing from the image view is added (A), one present
//! in both whose stat differs is changed (C), one only in the image view is
//! deleted (D); see [`stat_different`] for what "differs" means and
//! [`Views::changes`] for the order and the ancestor rule.
//!
//! Both views come from the layer stack's own resolution (`layers.rs`): the
//! container view is a [`LayerStack`] with the upper, the image view one
//! without. Walking both trees whole would cost as much as the image; instead
//! only names the upper holds are resolved, because a name the upper does not
//! mention resolves to the same lower entry in both views. Where that is not
//! true (an opaque or redirected upper directory, which changes where the
//! lower layers are searched) the two merged listings of that directory are
//! compared, which is what the output needs anyway.

use std::ffi::{OsStr, OsString};
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use crate::config::{self, MountConfig};
use crate::daemon::MountRecord;
use crate::layers::{self, LayerStack, OPAQUE_MARKER, Resolved, Source, WHITEOUT_PREFIX, XattrNamespace};
use crate::sys::{self, Errno, Stat, SysResult, XattrTarget};

/// Where the layers come from: a running mount, or the directories.
#[derive(Args, Debug)]
pub struct LayerArgs {
    /// A running Strata mount (its layers are read from the mount's record).
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: Option<PathBuf>,
    /// A lower layer; repeat for more, topmost first.
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// The upper directory holding the container's changes.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// fuse-overlayfs style options: lowerdir=A:B,upperdir=U[,workdir=W].
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
}

/// The directories of one container: its upper over its lowers.
#[derive(Clone, Debug)]
pub struct Layout {
    pub upper: PathBuf,
    /// Topmost first.
    pub lowers: Vec<PathBuf>,
}

impl LayerArgs {
    /// Find the layers, checking each directory; errors name the culprit.
    pub fn layout(&self) -> Result<Layout, String> {
        let offline = !self.lowers.is_empty() || self.upper.is_some() || !self.options.is_empty();
        let layout = match (&self.mountpoint, offline) {
            (Some(_), true) => {
                return Err("give either a mount point or the layers (--lower/--upper/-o), not both".into());
            }
            (None, false) => {
                return Err("give a Strata mount point, or the layers with --lower DIR... --upper DIR".into());
            }
            (Some(mountpoint), false) => layout_of_mount(mountpoint)?,
            (None, true) => {
                let mut config =
                    MountConfig { lowers: self.lowers.clone(), upper: self.upper.clone(), ..Default::default() };
                for text in &self.options {
                    for item in config::split_options(text) {
                        config.apply_option(&item).map_err(|err| err.to_string())?;
                    }
                }
                let upper = config.upper.ok_or("no upper directory given (use --upper DIR or -o upperdir=DIR)")?;
                if config.lowers.is_empty() {
                    return Err("no lower layer given (use --lower DIR or -o lowerdir=DIR)".into());
                }
                Layout { upper, lowers: config.lowers }
            }
        };
        check_directory("upper directory", &layout.upper)?;
        for lower in &layout.lowers {
            check_directory("lower layer", lower)?;
        }
        Ok(layout)
    }
}

fn check_directory(what: &str, path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!("{what} {} is not a directory", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{what} {} is missing (was it removed while the container was mounted?)", path.display()))
        }
        Err(err) => Err(format!("{what} {}: {err}", path.display())),
    }
}

fn layout_of_mount(mountpoint: &Path) -> Result<Layout, String> {
    let canonical =
        std::fs::canonicalize(mountpoint).map_err(|err| format!("mount point {}: {err}", mountpoint.display()))?;
    let record = match MountRecord::find(&canonical) {
        Some(record) => record,
        None => {
            let mount = config::mounts().into_iter().rev().find(|m| m.mountpoint == canonical);
            return Err(match mount {
                None => format!(
                    "{} is not a mount point (for layers on disk use --lower DIR... --upper DIR)",
                    mountpoint.display()
                ),
                Some(m) if m.fstype != "fuse.strata" => {
                    format!("{} is a {} mount, not a Strata mount", mountpoint.display(), m.fstype)
                }
                Some(_) => format!(
                    "{} is a Strata mount, but its record is not readable here (mounted by another user?); \
                     give the layers with --lower DIR... --upper DIR",
                    mountpoint.display()
                ),
            });
        }
    };
    let upper = record.upper.ok_or_else(|| {
        format!(
            "the Strata mount at {} is read-only: it has no upper layer, so nothing was changed",
            mountpoint.display()
        )
    })?;
    Ok(Layout { upper, lowers: record.lowers })
}

/// What happened to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Added,
    Changed,
    Deleted,
}

impl Kind {
    pub fn letter(self) -> char {
        match self {
            Kind::Added => 'A',
            Kind::Changed => 'C',
            Kind::Deleted => 'D',
        }
    }
}

/// One line of the diff.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Absolute, without a trailing slash.
    pub path: PathBuf,
    pub kind: Kind,
    /// For an added or changed non-directory: its size in the container
    /// view and, when it has other names, its identity (device, inode) so
    /// the summary counts its bytes once.
    pub bytes: Option<(u64, Option<(u64, u64)>)>,
}

/// The image view and the container view of one container.
pub struct Views {
    /// Upper over lowers: layer 0 is the upper, layer N+1 is lower N.
    pub container: LayerStack,
    /// Lowers alone: layer N is lower N.
    pub image: LayerStack,
}

impl Views {
    pub fn open(layout: &Layout) -> Result<Self, String> {
        // The namespace only matters for markers we write; we write none.
        let namespace = if sys::geteuid() == 0 { XattrNamespace::Trusted } else { XattrNamespace::User };
        let container = LayerStack::open(Some(&layout.upper), &layout.lowers, namespace)
            .map_err(|err| format!("cannot open the layers: {err}"))?;
        let image = LayerStack::open(None, &layout.lowers, namespace)
            .map_err(|err| format!("cannot open the lower layers: {err}"))?;
        Ok(Views { container, image })
    }

    /// Every change, in docker's order: depth first, a directory before its
    /// children, siblings in byte order, the deletions of a directory after
    /// its present children; a directory with a change below it is at
    /// least `C`.
    pub fn changes(&self) -> SysResult<Vec<Change>> {
        let mut out = Vec::new();
        let new = self.container.root_sources();
        let old = self.image.root_sources();
        self.compare_dir(Path::new("/"), &new, &old, &mut out)?;
        Ok(out)
    }

    /// Compare a directory present in both views (`new` are its container
    /// sources, `old` its image sources).
    fn compare_dir(&self, path: &Path, new: &[Source], old: &[Source], out: &mut Vec<Change>) -> SysResult<()> {
        let mut deleted = Vec::new();
        for name in self.candidates(new, old)? {
            let child = path.join(&name);
            let now = self.container.lookup(new, &name)?;
            let before = self.image.lookup(old, &name)?;
            match (now, before) {
                (None, None) => {}
                (None, Some(_)) => deleted.push(child),
                (Some(now), None) => {
                    out.push(self.change(child.clone(), Kind::Added, &now));
                    if now.is_dir() {
                        self.all_added(&child, &now.dir_sources, out)?;
                    }
                }
                (Some(now), Some(before)) => {
                    let start = out.len();
                    let changed = stat_different(&before.stat, &now.stat)
                        || capability(&self.image, &before.top)? != capability(&self.container, &now.top)?;
                    if changed {
                        out.push(self.change(child.clone(), Kind::Changed, &now));
                    }
                    if now.is_dir() {
                        if before.is_dir() {
                            self.compare_dir(&child, &now.dir_sources, &before.dir_sources, out)?;
                        } else {
                            // A new directory where a file was: all its content is new.
                            self.all_added(&child, &now.dir_sources, out)?;
                        }
                        if !changed && out.len() > start {
                            out.insert(start, Change { path: child, kind: Kind::Changed, bytes: None });
                        }
                    }
                }
            }
        }
        out.extend(deleted.into_iter().map(|path| Change { path, kind: Kind::Deleted, bytes: None }));
        Ok(())
    }

    /// The names of a directory that may differ between the views, sorted.
    fn candidates(&self, new: &[Source], old: &[Source]) -> SysResult<Vec<OsString>> {
        let upper = new.iter().find(|s| self.container.is_upper(s.layer));
        // The lower copies the container view merges, as image-view sources.
        let new_lowers: Vec<Source> = new
            .iter()
            .filter(|s| !self.container.is_upper(s.layer))
            .map(|s| Source { layer: s.layer - 1, path: s.path.clone() })
            .collect();
        let mut names = if new_lowers == old {
            // Both views search the same lower copies; only what the upper
            // says about a name can make it differ.
            match upper {
                Some(upper) => upper_names(&self.container, upper)?,
                None => Vec::new(),
            }
        } else {
            // Opaque or redirected here: the lower copies differ.
            let mut names: Vec<OsString> = self.container.list(new)?.into_iter().map(|e| e.name).collect();
            names.extend(self.image.list(old)?.into_iter().map(|e| e.name));
            names
        };
        names.retain(|name| !layers::is_whiteout_name(name));
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Every descendant of a new directory, as added.
    fn all_added(&self, path: &Path, sources: &[Source], out: &mut Vec<Change>) -> SysResult<()> {
        let mut names: Vec<OsString> = self.container.list(sources)?.into_iter().map(|e| e.name).collect();
        names.sort();
        for name in names {
            let Some(entry) = self.container.lookup(sources, &name)? else { continue };
            let child = path.join(&name);
            out.push(self.change(child.clone(), Kind::Added, &entry));
            if entry.is_dir() {
                self.all_added(&child, &entry.dir_sources, out)?;
            }
        }
        Ok(())
    }

    fn change(&self, path: PathBuf, kind: Kind, entry: &Resolved) -> Change {
        let bytes = (!entry.is_dir()).then(|| {
            let identity = (entry.stat.st_nlink > 1).then_some((entry.stat.st_dev, entry.stat.st_ino));
            (entry.stat.st_size as u64, identity)
        });
        Change { path, kind, bytes }
    }
}

/// The names the upper's copy of a directory mentions: its entries, and the
/// names its whiteouts hide. Which of them are whiteouts is left to the
/// layer stack's lookup.
fn upper_names(stack: &LayerStack, upper: &Source) -> SysResult<Vec<OsString>> {
    let fd = match stack.open_dir(upper.layer, &upper.path, libc::O_RDONLY) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut names = Vec::new();
    for entry in sys::read_dir(fd.as_fd())? {
        let bytes = entry.name.as_bytes();
        if entry.name == OPAQUE_MARKER {
            continue;
        }
        match bytes.strip_prefix(WHITEOUT_PREFIX) {
            Some(hidden) => names.push(OsStr::from_bytes(hidden).to_owned()),
            None => names.push(entry.name),
        }
    }
    Ok(names)
}

/// The `security.capability` of an entry (file capabilities are part of
/// what docker compares).
fn capability(stack: &LayerStack, source: &Source) -> SysResult<Option<Vec<u8>>> {
    let (Some(parent), Some(name)) = (source.path.parent(), source.path.file_name()) else { return Ok(None) };
    let value = stack
        .open_dir(source.layer, parent, libc::O_PATH)
        .and_then(|dir| XattrTarget::new(dir.as_fd(), name)?.get_opt(OsStr::new("security.capability")));
    match value {
        Ok(value) => Ok(value),
        // Gone since the lookup (a running container), or not ours to read.
        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::EPERM | Errno::EACCES) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Docker's `statDifferent`: type and permission bits (with suid, sgid and
/// sticky), owner, group and device number; for anything but a directory
/// also size and mtime. Content, inode, link count and ctime are not
/// compared: they change on every copy-up.
pub fn stat_different(old: &Stat, new: &Stat) -> bool {
    old.st_mode != new.st_mode
        || old.st_uid != new.st_uid
        || old.st_gid != new.st_gid
        || old.st_rdev != new.st_rdev
        || (old.st_mode & libc::S_IFMT != libc::S_IFDIR && (!same_mtime(old, new) || old.st_size != new.st_size))
}

/// Times are the same when equal, or when the seconds match and either has
/// no nanoseconds (tar keeps whole seconds only).
fn same_mtime(old: &Stat, new: &Stat) -> bool {
    old.st_mtime == new.st_mtime
        && (old.st_mtime_nsec == new.st_mtime_nsec || old.st_mtime_nsec == 0 || new.st_mtime_nsec == 0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `A /path` lines, as docker diff prints them.
    Docker,
    /// A JSON array of {"path", "kind"} objects.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// Color when standard output is a terminal (and NO_COLOR is unset).
    Auto,
    Always,
    Never,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    #[command(flatten)]
    pub layers: LayerArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Docker)]
    pub format: Format,
    /// Print only how many paths were added, changed and deleted, and the
    /// bytes of the added and changed files.
    #[arg(long)]
    pub summary: bool,
    /// Color the lines (A green, C yellow, D red).
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
}

/// `strata diff`.
pub fn run(args: DiffArgs) -> Result<(), String> {
    let layout = args.layers.layout()?;
    let views = Views::open(&layout)?;
    let changes = views.changes().map_err(|err| format!("cannot compare the layers: {err}"))?;
    let stdout = std::io::stdout();
    let color = match args.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let text = match (args.format, args.summary) {
        (Format::Docker, false) => docker_lines(&changes, color),
        (Format::Json, false) => json_list(&changes),
        (format, true) => summary(&changes, format),
    };
    let mut out = stdout.lock();
    match out.write_all(&text).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `strata diff | head` is not an error.
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(format!("cannot write the output: {err}")),
    }
}

/// `A /path` lines; paths are written as the bytes they are.
pub fn docker_lines(changes: &[Change], color: bool) -> Vec<u8> {
    let mut text = Vec::new();
    for change in changes {
        if color {
            let code: &[u8] = match change.kind {
                Kind::Added => b"\x1b[32m",
                Kind::Changed => b"\x1b[33m",
                Kind::Deleted => b"\x1b[31m",
            };
            text.extend_from_slice(code);
        }
        text.push(change.kind.letter() as u8);
        text.push(b' ');
        text.extend_from_slice(change.path.as_os_str().as_bytes());
        if color {
            text.extend_from_slice(b"\x1b[0m");
        }
        text.push(b'\n');
    }
    text
}

fn json_list(changes: &[Change]) -> Vec<u8> {
    // Written by hand to keep "path" before "kind"; serde_json escapes the
    // path (a name that is not UTF-8 is shown with U+FFFD).
    let mut text = String::from("[");
    for (i, change) in changes.iter().enumerate() {
        let path = serde_json::to_string(&change.path.to_string_lossy()).unwrap_or_default();
        let separator = if i == 0 { "" } else { "," };
        text += &format!("{separator}\n  {{\"path\": {path}, \"kind\": \"{}\"}}", change.kind.letter());
    }
    text += if changes.is_empty() { "]\n" } else { "\n]\n" };
    text.into_bytes()
}

fn summary(changes: &[Change], format: Format) -> Vec<u8> {
    let count = |kind| changes.iter().filter(|c| c.kind == kind).count();
    let (added, changed, deleted) = (count(Kind::Added), count(Kind::Changed), count(Kind::Deleted));
    // Bytes of added and changed files, each hard-linked file once.
    let mut seen = std::collections::HashSet::new();
    let bytes: u64 = changes
        .iter()
        .filter_map(|c| c.bytes)
        .filter(|(_, identity)| identity.is_none_or(|id| seen.insert(id)))
        .map(|(size, _)| size)
        .sum();
    let text = match format {
        Format::Docker => {
            format!("{added} added, {changed} changed, {deleted} deleted; {bytes} bytes in added and changed files\n")
        }
        Format::Json => {
            format!("{}\n", serde_json::json!({"added": added, "changed": changed, "deleted": deleted, "bytes": bytes}))
        }
    };
    text.into_bytes()
}
