//! The inode cache cap (`--inode-cache N`, `-o inode_cache=N`): after a walk
//! of many more entries than N, the daemon's table settles near N, and what
//! was evicted still works: stat and read, a file kept open across the
//! eviction, hard links, a renamed directory.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::*;

const CAP: u64 = 200;
const DIRS: usize = 20;
const FILES_PER_DIR: usize = 150;

fn content(dir: usize, file: usize) -> String {
    format!("file {file} of directory {dir}\n")
}

/// Every entry under `root`, stat'ed (as `find` does); returns how many.
fn walk(root: &Path) -> usize {
    let mut count = 0;
    for entry in fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        count += 1;
        if meta.is_dir() {
            count += walk(&path);
        }
    }
    count
}

fn cached_inodes(mnt: &Path) -> u64 {
    let o = strata([std::ffi::OsStr::new("stats"), mnt.as_os_str(), "--format".as_ref(), "json".as_ref()]);
    assert!(o.success(), "strata stats failed: {o:?}");
    let stats: serde_json::Value = serde_json::from_str(&o.stdout).expect("stats json");
    stats["cached_inodes"].as_u64().expect("cached_inodes in stats")
}

/// The table settles at or below the cap plus what the kernel cannot drop
/// (the open file, its directory, the root).
fn assert_settles_near_cap(mnt: &Path, what: &str) {
    let limit = CAP + 10;
    let settled = wait_for(Duration::from_secs(60), || cached_inodes(mnt) <= limit);
    assert!(settled, "{what}: {} inodes cached, cap {CAP}", cached_inodes(mnt));
}

#[test]
fn the_inode_cache_stays_near_its_cap_and_evicted_entries_still_work() {
    let l = Layers::new(2);
    for dir in 0..DIRS {
        for file in 0..FILES_PER_DIR {
            l.lower(1).file(&format!("d{dir}/f{file}"), content(dir, file));
        }
    }
    l.lower(0).file("d3/f7", "changed in the top layer\n");
    l.lower(1).file("links/a", "one inode, two names\n").hardlink("links/a", "links/b");
    l.lower(1).file("moveme/inside", "moves with its directory\n");

    let mut args = vec!["mount".to_string()];
    args.extend(l.lower_args());
    args.extend(["--upper".into(), l.upper.path.display().to_string(), "--work".into(), l.work.display().to_string()]);
    args.extend(["--inode-cache".to_string(), CAP.to_string()]);
    args.push(l.mnt.display().to_string());
    let m = StrataMount::from_args(&args, &l.mnt);

    // A file opened before the walk keeps working after its entry is evicted.
    let mut kept = fs::File::open(m.p("d0/f0")).unwrap();

    let seen = walk(&m.mnt);
    assert_eq!(seen, DIRS * (FILES_PER_DIR + 1) + 3 + 2, "entries walked: the directories, links/ and moveme/");
    assert_settles_near_cap(&m.mnt, "after the walk");

    // Evicted entries are looked up again: stat and read.
    for dir in [0, 5, DIRS - 1] {
        for file in 0..FILES_PER_DIR {
            let path = m.p(&format!("d{dir}/f{file}"));
            let expected =
                if (dir, file) == (3, 7) { "changed in the top layer\n".to_string() } else { content(dir, file) };
            assert_eq!(fs::read_to_string(&path).unwrap(), expected, "{}", path.display());
        }
    }
    assert_eq!(fs::read_to_string(m.p("d3/f7")).unwrap(), "changed in the top layer\n");
    let mut text = String::new();
    kept.seek(SeekFrom::Start(0)).unwrap();
    kept.read_to_string(&mut text).unwrap();
    assert_eq!(text, content(0, 0), "a file kept open across the eviction");

    // Hard links: one inode with two names, before and after a copy-up
    // through one of them, with walks (evictions) in between.
    let (a, b) = (fs::metadata(m.p("links/a")).unwrap(), fs::metadata(m.p("links/b")).unwrap());
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hard links share an inode");
    walk(&m.mnt);
    fs::OpenOptions::new().append(true).open(m.p("links/a")).unwrap().write_all(b"appended\n").unwrap();
    walk(&m.mnt);
    assert_settles_near_cap(&m.mnt, "after the copy-up");
    assert_eq!(fs::read_to_string(m.p("links/b")).unwrap(), "one inode, two names\nappended\n");
    assert_eq!(fs::metadata(m.p("links/b")).unwrap().ino(), fs::metadata(m.p("links/a")).unwrap().ino());

    // A renamed directory keeps its lower content under the new name.
    fs::rename(m.p("moveme"), m.p("moved")).unwrap();
    walk(&m.mnt);
    assert_settles_near_cap(&m.mnt, "after the rename");
    assert_eq!(fs::read_to_string(m.p("moved/inside")).unwrap(), "moves with its directory\n");
    assert!(absent(&m.p("moveme")), "the old name is gone");

    // Writes after eviction land in the upper layer.
    fs::write(m.p("d5/f1"), "rewritten\n").unwrap();
    walk(&m.mnt);
    assert_eq!(fs::read_to_string(m.p("d5/f1")).unwrap(), "rewritten\n");
    assert_eq!(fs::read_to_string(l.upper.p("d5/f1")).unwrap(), "rewritten\n");

    drop(kept);
    m.umount();
}

#[test]
fn inode_cache_is_a_mount_option_too() {
    let l = Layers::new(1);
    for file in 0..600 {
        l.lower(0).file(&format!("many/f{file}"), format!("{file}\n"));
    }
    let m = StrataMount::mount_opts(&format!("{},inode_cache={CAP}", l.overlay_opts()), &l.mnt);
    assert_eq!(walk(&m.mnt), 601);
    assert_settles_near_cap(&m.mnt, "after the walk");
    assert_eq!(fs::read_to_string(m.p("many/f599")).unwrap(), "599\n");
    m.umount();

    for bad in ["inode_cache=0", "inode_cache=many", "inode_cache"] {
        let o = strata(["mount", "-o", &format!("{},{bad}", l.overlay_opts()), &l.mnt.display().to_string()]);
        let mounted = is_mounted(&l.mnt);
        if mounted {
            force_cleanup(&l.mnt);
        }
        assert!(!o.success() && !mounted, "-o {bad} must be refused");
        assert!(o.stderr.contains("inode_cache"), "the message names the option: {}", o.stderr);
    }
}
