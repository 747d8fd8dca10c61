//! Differential tests: the same operations on the kernel's overlayfs and on
//! Strata, each on its own copy of identical layers, must give the same merged
//! tree; and the kernel mounting Strata's resulting upper must show that tree too.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

/// Identical starting layers for both sides.
fn build_layers() -> Layers {
    let l = Layers::new(2);
    let bottom = l.lower(1);
    bottom
        .file_mode("etc/config", "key=value\n", 0o644)
        .file_mode("etc/secret", "s3cret\n", 0o600)
        .file("etc/append-me", "line1\n")
        .file("bin/tool", "#!/bin/sh\necho tool\n")
        .mode("bin/tool", 0o755)
        .file("var/lib/db/a", "a")
        .file("var/lib/db/b", "b")
        .file("var/lib/db/nested/c", "c")
        .file("old/x", "x")
        .file("old/sub/y", "y")
        .file("movedir/one", "1")
        .file("movedir/deep/two", "2")
        .file("crossdir/three", "3")
        .file("home/user/rename-me", "r")
        .file("home/user/doc", "doc")
        .owner("home/user", 1000, 1000)
        .owner("home/user/doc", 1000, 1000)
        .xattr("etc/config", "user.origin", b"bottom")
        .symlink("etc/link", "config")
        .fifo("var/fifo");
    let mid = l.lower(0);
    mid.file("etc/config", "key=override\n")
        .xattr("etc/config", "user.origin", b"mid")
        .file("movedir/mid-only", "m")
        .file("var/lib/db/from-mid", "fm")
        .whiteout("var/lib/db/b")
        .dir("usr/share/doc")
        .file("usr/share/doc/readme", "readme")
        .mode("usr/share/doc", 0o2775);
    l
}

/// The operation sequence, run on a merged tree at `root`.
fn operations(root: &Path) {
    let p = |r: &str| root.join(r);
    // write, append, chmod, chown of lower files
    fs::write(p("etc/secret"), "new secret\n").unwrap();
    append(&p("etc/append-me"), b"line2\n").unwrap();
    fs::set_permissions(p("bin/tool"), fs::Permissions::from_mode(0o700)).unwrap();
    lchown(&p("home/user/doc"), 2000, 3000).unwrap();
    lsetxattr(&p("etc/config"), "user.changed", b"yes").unwrap();
    // rm file, rm -rf dir, mkdir over a deleted dir
    fs::remove_file(p("var/lib/db/a")).unwrap();
    fs::remove_dir_all(p("old")).unwrap();
    fs::create_dir(p("old")).unwrap();
    fs::write(p("old/fresh"), "fresh").unwrap();
    // rename file
    fs::rename(p("home/user/rename-me"), p("home/user/renamed")).unwrap();
    fs::rename(p("etc/config"), p("etc/config.bak")).unwrap();
    // rename dirs with lower content: same parent, then across parents
    fs::rename(p("movedir"), p("moved")).unwrap();
    fs::write(p("moved/deep/added"), "added").unwrap();
    fs::remove_file(p("moved/one")).unwrap();
    fs::rename(p("crossdir"), p("var/lib/crossed")).unwrap();
    // create files, symlink, hard link, dirs
    fs::create_dir_all(p("new/dir/tree")).unwrap();
    fs::write(p("new/dir/tree/file"), vec![0x5au8; 70_000]).unwrap();
    fs::write(p("usr/share/doc/inherits-sgid"), "g").unwrap();
    fs::create_dir(p("usr/share/doc/subdir")).unwrap();
    std::os::unix::fs::symlink("../etc/config.bak", p("new/cfg-link")).unwrap();
    fs::hard_link(p("new/dir/tree/file"), p("new/hardlink")).unwrap();
    fs::hard_link(p("bin/tool"), p("bin/tool-link")).unwrap();
    mkfifo(&p("new/fifo"), 0o600).unwrap();
    // an overwrite of a whited-out name, and a dir replaced by a file
    fs::write(p("var/lib/db/b"), "b is back").unwrap();
    fs::remove_dir_all(p("var/lib/db/nested")).unwrap();
    fs::write(p("var/lib/db/nested"), "now a file").unwrap();
}

#[test]
fn same_tree_as_kernel_overlayfs_and_kernel_reads_strata_upper() {
    // Kernel side.
    let k = build_layers();
    let kernel_snapshot = {
        let km = KernelOverlay::mount_layers(&k);
        operations(&km.mnt);
        let snap = tree_snapshot(&km.mnt);
        km.umount();
        snap
    };
    // Sanity: the operations did something visible.
    assert!(kernel_snapshot.contains_key(Path::new("moved/deep/added")));
    assert!(!kernel_snapshot.contains_key(Path::new("old/x")));

    // Strata side.
    let s = build_layers();
    let before = tree_snapshot(&s.lower(1).path);
    let strata_snapshot = {
        let sm = StrataMount::mount(&s);
        let initial = tree_snapshot(&sm.mnt);
        // The untouched merged trees agree too (reads only).
        let k2 = build_layers();
        let km2 = KernelOverlay::mount_layers(&k2);
        assert_same_tree("kernel (fresh)", &tree_snapshot(&km2.mnt), "strata (fresh)", &initial);
        drop(km2);
        operations(&sm.mnt);
        let snap = tree_snapshot(&sm.mnt);
        sm.umount();
        snap
    };
    assert_same_tree("kernel", &kernel_snapshot, "strata", &strata_snapshot);
    assert_same_tree("lower before", &before, "lower after", &tree_snapshot(&s.lower(1).path));

    // The kernel mounts Strata's upper (fresh work dir on the same filesystem).
    let kwork = s.root().join("kernel-work");
    fs::create_dir(&kwork).unwrap();
    let kernel_on_strata =
        KernelOverlay::mount(&s.lower_paths(), Some((&s.upper.path, &kwork)), "redirect_dir=on", &s.mnt);
    let snap = tree_snapshot(&kernel_on_strata.mnt);
    assert_same_tree("strata merged", &strata_snapshot, "kernel on strata's upper", &snap);
}

#[test]
fn kernel_written_upper_reads_the_same_in_strata() {
    // The other direction: an upper written by the kernel (with redirects,
    // opaque dirs and whiteouts) reads the same through Strata.
    let k = build_layers();
    let kernel_snapshot = {
        let km = KernelOverlay::mount_layers(&k);
        operations(&km.mnt);
        let snap = tree_snapshot(&km.mnt);
        km.umount();
        snap
    };
    // Fresh work dir for Strata.
    fs::remove_dir_all(&k.work).unwrap();
    fs::create_dir(&k.work).unwrap();
    let sm = StrataMount::mount(&k);
    let snap = tree_snapshot(&sm.mnt);
    assert_same_tree("kernel", &kernel_snapshot, "strata on the kernel's upper", &snap);
}
