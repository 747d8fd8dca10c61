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

/// Runs `ops` on the kernel's overlayfs and on Strata over identical layers
/// from `build`; compares the merged trees, then mounts Strata's upper under
/// the kernel and compares again.
fn differential(build: fn() -> Layers, ops: fn(&Path)) {
    // Kernel side.
    let k = build();
    let kernel_snapshot = {
        let km = KernelOverlay::mount_layers(&k);
        ops(&km.mnt);
        let snap = tree_snapshot(&km.mnt);
        km.umount();
        snap
    };

    // Strata side.
    let s = build();
    let lowers_before: Vec<_> = s.lowers.iter().map(|l| tree_snapshot(&l.path)).collect();
    let strata_snapshot = {
        let sm = StrataMount::mount(&s);
        let initial = tree_snapshot(&sm.mnt);
        // The untouched merged trees agree too (reads only).
        let k2 = build();
        let km2 = KernelOverlay::mount_layers(&k2);
        assert_same_tree("kernel (fresh)", &tree_snapshot(&km2.mnt), "strata (fresh)", &initial);
        drop(km2);
        ops(&sm.mnt);
        let snap = tree_snapshot(&sm.mnt);
        sm.umount();
        snap
    };
    assert_same_tree("kernel", &kernel_snapshot, "strata", &strata_snapshot);
    for (l, before) in s.lowers.iter().zip(&lowers_before) {
        assert_same_tree("lower before", before, "lower after", &tree_snapshot(&l.path));
    }

    // The kernel mounts Strata's upper (fresh work dir on the same filesystem).
    let kwork = s.root().join("kernel-work");
    fs::create_dir(&kwork).unwrap();
    let kernel_on_strata =
        KernelOverlay::mount(&s.lower_paths(), Some((&s.upper.path, &kwork)), "redirect_dir=on", &s.mnt);
    let snap = tree_snapshot(&kernel_on_strata.mnt);
    assert_same_tree("strata merged", &strata_snapshot, "kernel on strata's upper", &snap);
}

/// The other direction: an upper written by the kernel (redirects, opaque
/// dirs, whiteouts) reads the same through Strata.
fn reverse_differential(build: fn() -> Layers, ops: fn(&Path)) {
    let k = build();
    let kernel_snapshot = {
        let km = KernelOverlay::mount_layers(&k);
        ops(&km.mnt);
        let snap = tree_snapshot(&km.mnt);
        km.umount();
        snap
    };
    fs::remove_dir_all(&k.work).unwrap();
    fs::create_dir(&k.work).unwrap();
    let sm = StrataMount::mount(&k);
    let snap = tree_snapshot(&sm.mnt);
    assert_same_tree("kernel", &kernel_snapshot, "strata on the kernel's upper", &snap);
}

#[test]
fn same_tree_as_kernel_overlayfs_and_kernel_reads_strata_upper() {
    differential(build_layers, operations);
}

#[test]
fn kernel_written_upper_reads_the_same_in_strata() {
    reverse_differential(build_layers, operations);
}

/// Layers for nested directory renames.
fn build_rename_layers() -> Layers {
    let l = Layers::new(2);
    l.lower(1)
        .file("a/b/c/file1", "1")
        .file("a/b/c/keep", "k")
        .file("a/b/file2", "2")
        .file("a/other", "o")
        .file("x/y/file3", "3")
        .dir("z")
        .file("m/n/o/p", "deep");
    l.lower(0).file("a/b/mid", "mid").file("x/y/mid3", "m3").file("q/r", "r");
    l
}

fn rename_operations(root: &Path) {
    let p = |r: &str| root.join(r);
    fs::rename(p("a/b"), p("z/b2")).unwrap(); // across parents
    fs::rename(p("a"), p("a2")).unwrap(); // same parent
    fs::rename(p("z"), p("z2")).unwrap(); // a dir holding a renamed dir
    fs::rename(p("z2/b2/c"), p("x/y/c3")).unwrap(); // out of a renamed dir
    fs::write(p("x/y/c3/added"), "added").unwrap();
    fs::remove_file(p("x/y/c3/file1")).unwrap();
    fs::rename(p("x"), p("a")).unwrap(); // onto the whiteout of a renamed dir
    fs::create_dir(p("a2/new")).unwrap();
    fs::rename(p("q"), p("a2/new/q-moved")).unwrap(); // into a new dir
    fs::rename(p("m/n"), p("m/n2")).unwrap();
    fs::rename(p("m/n2"), p("m/n")).unwrap(); // and back
    fs::rename(p("a2/other"), p("z2/b2/other")).unwrap();
    fs::remove_dir_all(p("m/n/o")).unwrap();
    append(&p("a/y/c3/keep"), b"+").unwrap();
}

#[test]
fn nested_directory_renames_match_kernel() {
    differential(build_rename_layers, rename_operations);
}

#[test]
fn nested_directory_renames_by_kernel_read_the_same_in_strata() {
    reverse_differential(build_rename_layers, rename_operations);
}

/// An upper the kernel wrote (redirects, opaque dirs, whiteouts) used as a
/// middle *lower* layer: Strata must follow its redirects like the kernel.
fn upper_as_lower(build: fn() -> Layers, ops: fn(&Path)) {
    let k = build();
    {
        let km = KernelOverlay::mount_layers(&k);
        ops(&km.mnt);
        km.umount();
    }
    let mut lowers = vec![k.upper.path.clone()];
    lowers.extend(k.lower_paths());
    let kernel_snapshot = {
        let km = KernelOverlay::mount(&lowers, None, "redirect_dir=on", &k.mnt);
        tree_snapshot(&km.mnt)
    };
    let top = k.root().join("new-upper");
    let work = k.root().join("new-work");
    fs::create_dir(&top).unwrap();
    fs::create_dir(&work).unwrap();
    let mut args = vec!["mount".to_string()];
    for l in &lowers {
        args.push("--lower".into());
        args.push(l.display().to_string());
    }
    args.extend(["--upper".into(), top.display().to_string(), "--work".into(), work.display().to_string()]);
    args.push(k.mnt.display().to_string());
    let sm = StrataMount::from_args(&args, &k.mnt);
    assert_same_tree("kernel", &kernel_snapshot, "strata with the kernel's upper as a lower", &tree_snapshot(&sm.mnt));
}

#[test]
fn kernel_upper_as_a_lower_layer_reads_the_same() {
    upper_as_lower(build_layers, operations);
}

#[test]
fn renamed_dirs_in_a_lower_layer_read_the_same() {
    upper_as_lower(build_rename_layers, rename_operations);
}
