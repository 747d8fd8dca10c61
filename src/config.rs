//! Mount configuration: the options of `strata mount` (ours and
//! fuse-overlayfs's `-o` syntax), checked before anything is mounted.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::idmap::IdMap;

/// What is wrong with a mount request; each names the culprit.
#[derive(Debug)]
pub enum ConfigError {
    NoLowers,
    Missing { what: &'static str, path: PathBuf, reason: String },
    NotADirectory { what: &'static str, path: PathBuf },
    UpperWithoutWork,
    WorkWithoutUpper,
    DifferentFilesystems { upper: PathBuf, work: PathBuf },
    Nested { inner_what: &'static str, inner: PathBuf, outer_what: &'static str, outer: PathBuf },
    MountpointBusy(PathBuf),
    UnknownOption(String),
    BadValue { option: String, reason: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NoLowers => write!(f, "no lower layer given (use --lower DIR or -o lowerdir=DIR)"),
            ConfigError::Missing { what, path, reason } => write!(f, "{what} {}: {reason}", path.display()),
            ConfigError::NotADirectory { what, path } => write!(f, "{what} {} is not a directory", path.display()),
            ConfigError::UpperWithoutWork => {
                write!(f, "an upper directory needs a work directory (--work DIR or workdir=DIR)")
            }
            ConfigError::WorkWithoutUpper => write!(f, "a work directory was given without an upper directory"),
            ConfigError::DifferentFilesystems { upper, work } => write!(
                f,
                "upper {} and work {} are on different filesystems; they must share one so copy-up can rename atomically",
                upper.display(),
                work.display()
            ),
            ConfigError::Nested { inner_what, inner, outer_what, outer } => write!(
                f,
                "{inner_what} {} is inside {outer_what} {}; layers, work directory and mount point must not overlap",
                inner.display(),
                outer.display()
            ),
            ConfigError::MountpointBusy(path) => write!(f, "mount point {} is already a mount point", path.display()),
            ConfigError::UnknownOption(option) => write!(f, "unknown option: {option}"),
            ConfigError::BadValue { option, reason } => write!(f, "bad value for option {option}: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Everything the daemon needs to know, checked.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Topmost first.
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub debug: bool,
    pub fsync: bool,
    pub static_nlink: bool,
    pub allow_other: bool,
    pub read_only: bool,
    pub suid: bool,
    pub dev: bool,
    pub exec: bool,
    /// Entry and attribute cache time given to the kernel.
    pub timeout: Duration,
    pub threads: usize,
    /// Which files the kernel reads and writes itself (FUSE passthrough),
    /// where it and the daemon's privileges allow: `passthrough=auto|on|off`.
    pub passthrough: PassthroughSetting,
    /// How many inodes the daemon keeps at most (`inode_cache=N`); None: as
    /// many as the kernel holds.
    pub inode_cache: Option<usize>,
    /// Options accepted but not acted on, said once at start-up.
    pub ignored: Vec<String>,
    /// Where to trace layer-changing events, if anywhere.
    pub trace: Option<TraceConfig>,
    /// Ownership shifting (`uidmapping=`, `gidmapping=`, `squash_to_*`).
    pub uids: IdMap,
    pub gids: IdMap,
    /// A directory (holding the upper and work directories) that the
    /// daemon removes once unmounted: `mount --image --ephemeral`.
    pub ephemeral: Option<PathBuf>,
}

/// `passthrough=`: which files the kernel reads and writes itself.
///
/// The kernel ties a passthrough open to one layer file for good, so a
/// lower file of a writable mount (which a copy-up may replace while it is
/// open) is never passed through. And passthrough needs an OPEN request
/// for every open(2), which a mount can otherwise do without: the daemon
/// then serves each file's data by inode, and a file whose pages are
/// cached costs no request at all to open, read and close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassthroughSetting {
    /// Every file of a read-only mount is passed through; a writable mount
    /// is served without open requests (the fastest for reading images,
    /// which is most of what a container does).
    Auto,
    /// As `Auto` for a read-only mount; a writable mount passes through the
    /// files of its upper layer, at the price of a request per open (for
    /// containers that write large files they keep open).
    On,
    /// Never: the daemon serves all data, without open requests.
    Off,
}

/// `--trace[=FILE]`: events to a file, or to stderr (the mount then stays
/// in the foreground so they reach the terminal).
#[derive(Clone, Debug)]
pub struct TraceConfig {
    pub file: Option<PathBuf>,
    pub format: crate::trace::Format,
    /// Lookups too (`--trace-all`), not only changes.
    pub lookups: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            lowers: Vec::new(),
            upper: None,
            work: None,
            mountpoint: PathBuf::new(),
            foreground: false,
            debug: false,
            fsync: true,
            static_nlink: false,
            allow_other: false,
            read_only: false,
            // As fuse-overlayfs run by root: setuid programs of an image
            // keep working in its containers (containers-storage passes
            // neither `suid` nor `nosuid`), device nodes do not.
            suid: crate::sys::geteuid() == 0,
            dev: false,
            exec: true,
            timeout: Duration::from_secs(3600),
            threads: 2,
            passthrough: PassthroughSetting::Auto,
            inode_cache: None,
            ignored: Vec::new(),
            trace: None,
            uids: IdMap::default(),
            gids: IdMap::default(),
            ephemeral: None,
        }
    }
}

/// Split a `-o` string at commas. A comma inside double quotes (as in
/// `context="a,b"`) or after a backslash does not split. Empty items (a
/// trailing comma, `,,`) are dropped, as fuse-overlayfs does.
pub fn split_options(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            '\\' => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            ',' if !quoted => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    items.push(current);
    items.into_iter().filter(|item| !item.is_empty()).collect()
}

/// Split a lowerdir value at colons; `\:` is a colon inside a path and
/// `\\` a backslash.
pub fn split_lowerdir(value: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut current = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next @ (':' | '\\' | ',')) => current.push(next),
                Some(next) => {
                    current.push('\\');
                    current.push(next);
                }
                None => current.push('\\'),
            },
            ':' => dirs.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    dirs.push(current);
    dirs.into_iter().filter(|d| !d.is_empty()).map(PathBuf::from).collect()
}

/// Options of the kernel's generic mount syntax (from mount.fuse3 or
/// /etc/fstab) that need nothing from us.
const HARMLESS: &[&str] = &[
    "rw",
    "async",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "nofail",
    "_netdev",
    "default_permissions",
    "noacl",
    "defaults",
    "sync",
    "dirsync",
];

/// Accepted for compatibility, but Strata does not act on them yet.
const IGNORED: &[&str] = &[
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "plugins",
    "xattr_permissions",
    "redirect_dir",
    "index",
    "xino",
    "metacopy",
    "userxattr",
    "nfs_export",
    "max_idle_threads",
    "writeback",
    "auto_unmount",
];

impl MountConfig {
    /// Apply one `-o` item.
    pub fn apply_option(&mut self, item: &str) -> Result<(), ConfigError> {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        fn need<'v>(key: &str, value: Option<&'v str>) -> Result<&'v str, ConfigError> {
            value.ok_or_else(|| ConfigError::BadValue { option: key.to_string(), reason: "a value is required".into() })
        }
        /// A two-valued option: `on` or `off`, in the option's own words.
        fn switch(key: &str, value: &str, on: &str, off: &str) -> Result<bool, ConfigError> {
            match value {
                v if v == on => Ok(true),
                v if v == off => Ok(false),
                other => {
                    Err(ConfigError::BadValue { option: key.into(), reason: format!("{other:?} is not {off} or {on}") })
                }
            }
        }
        match key {
            "lowerdir" => self.lowers.extend(split_lowerdir(need(key, value)?)),
            "upperdir" => self.upper = Some(PathBuf::from(need(key, value)?)),
            "workdir" => self.work = Some(PathBuf::from(need(key, value)?)),
            "fsync" => self.fsync = switch(key, need(key, value)?, "1", "0")?,
            "passthrough" => {
                self.passthrough = match need(key, value)? {
                    "auto" => PassthroughSetting::Auto,
                    "on" => PassthroughSetting::On,
                    "off" => PassthroughSetting::Off,
                    other => {
                        return Err(ConfigError::BadValue {
                            option: key.into(),
                            reason: format!("{other:?} is not auto, on or off"),
                        });
                    }
                }
            }
            "volatile" => self.fsync = false,
            "static_nlink" => self.static_nlink = true,
            "allow_other" | "allow_root" => self.allow_other = true,
            "ro" => self.read_only = true,
            "suid" => self.suid = true,
            "nosuid" => self.suid = false,
            "dev" => self.dev = true,
            "nodev" => self.dev = false,
            "exec" => self.exec = true,
            "noexec" => self.exec = false,
            "debug" => {
                self.debug = true;
                self.foreground = true;
            }
            "timeout" => {
                let text = need(key, value)?;
                let seconds: f64 = text.parse().map_err(|_| ConfigError::BadValue {
                    option: key.into(),
                    reason: format!("{text:?} is not a number of seconds"),
                })?;
                if !(0.0..=1e9).contains(&seconds) {
                    return Err(ConfigError::BadValue { option: key.into(), reason: "out of range".into() });
                }
                self.timeout = Duration::from_secs_f64(seconds);
            }
            "threads" => {
                let text = need(key, value)?;
                self.threads =
                    text.parse().ok().filter(|n| (1..=64).contains(n)).ok_or_else(|| ConfigError::BadValue {
                        option: key.into(),
                        reason: format!("{text:?} is not a thread count from 1 to 64"),
                    })?;
            }
            "inode_cache" => {
                let text = need(key, value)?;
                self.inode_cache = Some(text.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    ConfigError::BadValue { option: key.into(), reason: format!("{text:?} is not a count of inodes") }
                })?);
            }
            "uidmapping" | "gidmapping" => {
                let text = need(key, value)?;
                let ranges = IdMap::parse(text)
                    .map_err(|err| ConfigError::BadValue { option: key.into(), reason: err.to_string() })?;
                let map = if key == "uidmapping" { &mut self.uids } else { &mut self.gids };
                map.ranges.extend(ranges);
            }
            "squash_to_root" => {
                self.uids.squash = Some(0);
                self.gids.squash = Some(0);
            }
            "squash_to_uid" | "squash_to_gid" => {
                let text = need(key, value)?;
                let id = text.parse::<u32>().map_err(|_| ConfigError::BadValue {
                    option: key.into(),
                    reason: format!("{text:?} is not a numeric id"),
                })?;
                let map = if key == "squash_to_uid" { &mut self.uids } else { &mut self.gids };
                map.squash = Some(id);
            }
            "fsname" | "subtype" => {}
            _ if HARMLESS.contains(&key) || key.starts_with("x-") => {}
            _ if IGNORED.contains(&key) => self.ignored.push(item.to_string()),
            _ => return Err(ConfigError::UnknownOption(item.to_string())),
        }
        Ok(())
    }

    /// Check every directory and make paths absolute; nothing is mounted
    /// unless this passes.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.lowers.is_empty() {
            return Err(ConfigError::NoLowers);
        }
        match (&self.upper, &self.work) {
            (Some(_), None) => return Err(ConfigError::UpperWithoutWork),
            (None, Some(_)) => return Err(ConfigError::WorkWithoutUpper),
            _ => {}
        }
        if self.read_only {
            // `ro` with an upper: mount the upper as one more read-only layer.
            if let Some(upper) = self.upper.take() {
                self.lowers.insert(0, upper);
                self.work = None;
            }
        }
        self.lowers = self.lowers.iter().map(|p| directory("lower layer", p)).collect::<Result<_, _>>()?;
        self.upper = self.upper.as_deref().map(|p| directory("upper directory", p)).transpose()?;
        self.work = self.work.as_deref().map(|p| directory("work directory", p)).transpose()?;
        self.mountpoint = directory("mount point", &self.mountpoint)?;

        if let (Some(upper), Some(work)) = (&self.upper, &self.work) {
            let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).unwrap_or(0);
            if dev(upper) != dev(work) {
                return Err(ConfigError::DifferentFilesystems { upper: upper.clone(), work: work.clone() });
            }
        }
        // No place may be inside another (nor be the same), but two lower
        // layers may nest or repeat (it is odd but harmless). So a lower
        // layer is compared with the few other places only, never with the
        // other lowers: the work grows with the number of layers, not with
        // its square. The order, and so the pair named, is the places' order.
        let mut places: Vec<(&'static str, &PathBuf)> = Vec::new();
        places.extend(self.upper.iter().map(|p| ("upper directory", p)));
        places.extend(self.work.iter().map(|p| ("work directory", p)));
        places.extend(self.lowers.iter().map(|p| ("lower layer", p)));
        places.push(("mount point", &self.mountpoint));
        let not_lowers: Vec<(usize, &(&'static str, &PathBuf))> =
            places.iter().enumerate().filter(|(_, (what, _))| *what != "lower layer").collect();
        for (i, (inner_what, inner)) in places.iter().enumerate() {
            let outers: Box<dyn Iterator<Item = (usize, &(&'static str, &PathBuf))>> = if *inner_what == "lower layer" {
                Box::new(not_lowers.iter().copied())
            } else {
                Box::new(places.iter().enumerate())
            };
            for (j, (outer_what, outer)) in outers {
                if i != j && inner.starts_with(outer) {
                    return Err(ConfigError::Nested {
                        inner_what,
                        inner: (*inner).clone(),
                        outer_what,
                        outer: (*outer).clone(),
                    });
                }
            }
        }
        if is_mount_point(&self.mountpoint) {
            return Err(ConfigError::MountpointBusy(self.mountpoint.clone()));
        }
        Ok(())
    }
}

/// The absolute, symlink-free form of a directory given by the user (the
/// user's own paths are trusted; only layer content is not). Resolving the
/// symlink before a following `..` is what containers-storage relies on.
fn directory(what: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    let resolved = std::fs::canonicalize(path).map_err(|err| ConfigError::Missing {
        what,
        path: path.to_owned(),
        reason: match err.kind() {
            std::io::ErrorKind::NotFound => "does not exist".to_string(),
            _ => err.to_string(),
        },
    })?;
    if !resolved.is_dir() {
        return Err(ConfigError::NotADirectory { what, path: path.to_owned() });
    }
    Ok(resolved)
}

/// Fields of one /proc/self/mountinfo line that Strata uses.
pub struct MountInfo {
    pub device: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
}

/// Every mount of this process's namespace.
pub fn mounts() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            Some(MountInfo {
                device: fields.get(2)?.to_string(),
                mountpoint: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
                fstype: fields.get(separator + 1)?.to_string(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mount_point(path: &Path) -> bool {
    mounts().iter().any(|m| m.mountpoint == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_at_commas_but_not_inside_quotes_and_drop_empty_items() {
        assert_eq!(
            split_options(r#"lowerdir=/a:/b,,upperdir=/u,context="system_u:object_r:c,s0",volatile,"#),
            vec!["lowerdir=/a:/b", "upperdir=/u", r#"context="system_u:object_r:c,s0""#, "volatile"]
        );
        assert_eq!(split_options(""), Vec::<String>::new());
    }

    #[test]
    fn lowerdir_splits_at_colons_with_escapes() {
        assert_eq!(
            split_lowerdir(r"/top:/with\:colon:/back\\slash:/bottom"),
            vec![
                PathBuf::from("/top"),
                PathBuf::from("/with:colon"),
                PathBuf::from(r"/back\slash"),
                PathBuf::from("/bottom")
            ]
        );
    }

    #[test]
    fn options_are_applied_and_unknown_ones_rejected() {
        let mut config = MountConfig::default();
        for item in ["lowerdir=/a:/b", "upperdir=/u", "workdir=/w", "fsync=0", "uidmapping=:0:100000:65536", "xino=off"]
        {
            config.apply_option(item).unwrap();
        }
        assert_eq!(config.lowers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(config.upper, Some(PathBuf::from("/u")));
        assert!(!config.fsync);
        assert_eq!(config.uids.shown(0), 100000);
        assert_eq!(config.ignored, vec!["xino=off".to_string()]);
        config.apply_option("timeout=2.5").unwrap();
        assert_eq!(config.timeout, Duration::from_millis(2500));
        assert!(config.apply_option("uidmapping=0:1").is_err());
        let err = config.apply_option("frobnicate").unwrap_err();
        assert_eq!(err.to_string(), "unknown option: frobnicate");
        assert!(config.apply_option("fsync=2").is_err());
        assert!(config.apply_option("lowerdir").is_err());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/mnt/with\040space\134x"), r"/mnt/with space\x");
    }
}
