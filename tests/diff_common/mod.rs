//! Helpers for the `strata diff` and `strata commit` tests: a standard
//! image, a scenario runner, and a plain two-tree comparison (docker's
//! definition, computed the slow way on two mounted trees) as the oracle.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::common::*;

/// A fixed time with nanoseconds, for every entry of a standard image.
pub const T0: i64 = 1_600_000_000;

/// The standard image: two lower layers.
/// lower1 (bottom): /etc/{a,hosts,link->a}, /opt/app/{old1,old2,sub/x},
///   /opt/other/y, /run/, /srv/, /tmp/, /usr/bin/ping, /data/old, /var/gone
/// lower0 (top): /etc/b.conf, /data opaque with /data/new, /var/gone whited out
pub fn base_image(l: &Layers) {
    let bottom = l.lower(1);
    bottom
        .file("etc/a", "a\n")
        .file("etc/hosts", "127.0.0.1 localhost\n")
        .symlink("etc/link", "a")
        .file("opt/app/old1", "1")
        .file("opt/app/old2", "2")
        .file("opt/app/sub/x", "x")
        .file("opt/other/y", "y")
        .dir("run")
        .dir("srv")
        .dir("tmp")
        .file_mode("usr/bin/ping", "ELF", 0o755)
        .file("data/old", "old")
        .file("var/gone", "gone");
    let top = l.lower(0);
    top.file("etc/b.conf", "b\n").opaque("data", "trusted.overlay.opaque").file("data/new", "new").whiteout("var/gone");
    for layer in [bottom, top] {
        fix_times(&layer.path);
    }
}

/// Give every entry under `root` the time T0 + 0.123456789 s.
pub fn fix_times(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            if entry.file_type().expect("type").is_dir() {
                stack.push(path.clone());
            }
            all.push(path);
        }
    }
    // Children before parents: setting a child's time does not touch the
    // parent's mtime, but creating entries did.
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for path in all {
        set_times(&path, (T0, 123_456_789), (T0, 123_456_789)).expect("utimensat");
    }
}

/// `strata diff ARGS`, asserting success; the standard output.
pub fn diff_output(args: &[String]) -> String {
    let mut full = vec!["diff".to_string()];
    full.extend(args.iter().cloned());
    let o = strata(&full);
    assert!(o.success(), "strata {} failed: {o:?}", full.join(" "));
    o.stdout
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `--lower L0 --lower L1 --upper U`.
pub fn offline_args(l: &Layers) -> Vec<String> {
    let mut args = l.lower_args();
    args.extend(["--upper".to_string(), s(&l.upper.path)]);
    args
}

/// The expected output for a list of lines.
pub fn lines(expected: &[&str]) -> String {
    expected.iter().map(|line| format!("{line}\n")).collect()
}

/// A read-only Strata mount of the lower layers alone (the image view), at
/// `ROOT/image`.
pub fn mount_image(l: &Layers) -> StrataMount {
    let mnt = l.root().join("image");
    fs::create_dir_all(&mnt).expect("mkdir image");
    let mut args = vec!["mount".to_string()];
    args.extend(l.lower_args());
    args.push(s(&mnt));
    StrataMount::from_args(&args, &mnt)
}

/// Serialises the mounts of one test binary. A daemon removes its mount
/// record (named by the FUSE device number) after the kernel has let go of
/// the device, so a mount made meanwhile by a parallel test may get the same
/// number and lose its record; `strata diff MOUNTPOINT` then cannot find
/// the layers. One mount at a time keeps the tests about diff.
pub fn mount_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Run one scenario: build the image, act in a live mount, and check that
/// `strata diff MOUNT`, the two-tree oracle, and both offline forms all
/// print exactly `expected`.
pub fn scenario(build: impl FnOnce(&Layers), act: impl FnOnce(&Path), expected: &[&str]) -> Layers {
    let l = Layers::new(2);
    build(&l);
    let want = lines(expected);
    {
        let _one_at_a_time = mount_lock();
        let m = StrataMount::mount(&l);
        act(&m.mnt);
        let got = diff_output(&[s(&m.mnt)]);
        assert_eq!(got, want, "strata diff MOUNT");
        let image = mount_image(&l);
        let oracle = two_tree_diff(&image.mnt, &m.mnt);
        assert_eq!(oracle, want, "the two-tree comparison of the mounted views disagrees with the expectation");
        image.umount();
        m.umount();
    }
    assert_eq!(diff_output(&offline_args(&l)), want, "strata diff --lower .. --upper ..");
    let lowers: Vec<String> = l.lower_paths().iter().map(|p| s(p)).collect();
    let opts = format!("lowerdir={},upperdir={}", lowers.join(":"), s(&l.upper.path));
    assert_eq!(diff_output(&["-o".to_string(), opts]), want, "strata diff -o ...");
    l
}

// ---------------------------------------------------------------------------
// The oracle: docker's two-tree comparison, the slow way.
// ---------------------------------------------------------------------------

struct Info {
    meta: fs::Metadata,
    capability: Option<Vec<u8>>,
}

fn info(path: &Path) -> Info {
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    Info { meta, capability: lgetxattr(path, "security.capability").ok() }
}

fn sorted_names(dir: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    names
}

fn different(old: &Info, new: &Info) -> bool {
    let (o, n) = (&old.meta, &new.meta);
    let same_time =
        o.mtime() == n.mtime() && (o.mtime_nsec() == n.mtime_nsec() || o.mtime_nsec() == 0 || n.mtime_nsec() == 0);
    o.mode() != n.mode()
        || o.uid() != n.uid()
        || o.gid() != n.gid()
        || o.rdev() != n.rdev()
        || (!o.is_dir() && (!same_time || o.size() != n.size()))
        || old.capability != new.capability
}

/// Docker's `ChangesDirs` on two mounted trees, printed in our order.
pub fn two_tree_diff(old_root: &Path, new_root: &Path) -> String {
    let mut out = Vec::new();
    walk(old_root, new_root, Path::new("/"), true, &mut out);
    out.iter().map(|(kind, path)| format!("{kind} {}\n", path.display())).collect()
}

fn walk(old_root: &Path, new_root: &Path, rel: &Path, old_exists_as_dir: bool, out: &mut Vec<(char, PathBuf)>) {
    let new_dir = new_root.join(rel.strip_prefix("/").expect("absolute"));
    let old_dir = old_root.join(rel.strip_prefix("/").expect("absolute"));
    let old_names = if old_exists_as_dir { sorted_names(&old_dir) } else { Vec::new() };
    let mut deleted = Vec::new();
    for name in &old_names {
        if fs::symlink_metadata(new_dir.join(name)).is_err() {
            deleted.push(rel.join(name));
        }
    }
    for name in sorted_names(&new_dir) {
        let path = rel.join(&name);
        let new = info(&new_dir.join(&name));
        let old = old_names.contains(&name).then(|| info(&old_dir.join(&name)));
        let start = out.len();
        let mut reported = false;
        match &old {
            None => {
                out.push(('A', path.clone()));
                reported = true;
            }
            Some(old) if different(old, &new) => {
                out.push(('C', path.clone()));
                reported = true;
            }
            Some(_) => {}
        }
        if new.meta.is_dir() {
            let old_is_dir = old.as_ref().is_some_and(|o| o.meta.is_dir());
            walk(old_root, new_root, &path, old_is_dir, out);
            if !reported && out.len() > start {
                out.insert(start, ('C', path));
            }
        }
    }
    out.extend(deleted.into_iter().map(|p| ('D', p)));
}

/// Names as bytes, for paths that are not UTF-8.
pub fn bytes_of(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}
