//! One test per overlay semantic, each through a real Strata mount.
//! The kernel's overlayfs is the reference unless a test says otherwise.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use common::*;

const OPAQUE_XATTRS: [&str; 3] = ["trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque"];

/// No marker of any dialect shows as an xattr of `p` through the mount.
#[track_caller]
fn assert_no_marker_xattrs(p: &Path) {
    let names = llistxattr(p).unwrap_or_else(|e| panic!("listxattr {}: {e}", p.display()));
    for n in &names {
        assert!(
            !(n.starts_with("trusted.overlay.")
                || n.starts_with("user.overlay.")
                || n == "user.fuseoverlayfs.opaque"
                || n.starts_with("trusted.strata.")),
            "marker xattr {n} visible in listxattr of {}: {names:?}",
            p.display()
        );
    }
    for n in OPAQUE_XATTRS.iter().chain(&[
        "trusted.overlay.whiteout",
        "user.overlay.whiteout",
        "trusted.overlay.redirect",
        "trusted.overlay.origin",
    ]) {
        assert_errno(lgetxattr(p, n), libc::ENODATA, &format!("getxattr {n} on {}", p.display()));
    }
}

// ---------------------------------------------------------------------------
// Lookup, merge, opaque, whiteouts
// ---------------------------------------------------------------------------

#[test]
fn lookup_is_top_down_and_upper_shadows_lowers() {
    let l = Layers::new(2);
    l.lower(1).file("a", "bottom-a").file("b", "bottom-b").file("c", "bottom-c").dir("x/child");
    l.lower(0).file("a", "middle-a").file("c", "middle-c").file("x", "x is a file here");
    l.upper.file("c", "upper-c").file("u", "upper-u");
    let m = StrataMount::mount(&l);
    assert_eq!(read_string(&m.p("a")), "middle-a", "topmost lower must win over the bottom one");
    assert_eq!(read_string(&m.p("b")), "bottom-b", "name only in the bottom layer");
    assert_eq!(read_string(&m.p("c")), "upper-c", "upper must shadow every lower");
    assert_eq!(read_string(&m.p("u")), "upper-u");
    assert_eq!(ls(&m.p("")), ["a", "b", "c", "u", "x"]);
    // A non-directory stops the merge: x is a file, the bottom's x/ is hidden.
    let md = fs::symlink_metadata(m.p("x")).expect("stat x");
    assert!(md.is_file(), "x must be the middle layer's file, got {:?}", md.file_type());
    assert_eq!(read_string(&m.p("x")), "x is a file here");
    assert_errno(fs::symlink_metadata(m.p("x/child")), libc::ENOTDIR, "lookup below a file");
    assert_errno(fs::read(m.p("nope")), libc::ENOENT, "missing name");
}

#[test]
fn directories_merge_across_all_layers() {
    let l = Layers::new(2);
    l.lower(1).file("d/bottom", "b").file("d/shared", "from-bottom").file("d/sub/deep-bottom", "1");
    l.lower(0).file("d/middle", "m").file("d/shared", "from-middle").file("d/sub/deep-middle", "2");
    l.upper.file("d/top", "t");
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("d")), ["bottom", "middle", "shared", "sub", "top"], "merged listing, no duplicates");
    assert_eq!(read_string(&m.p("d/shared")), "from-middle");
    assert_eq!(ls(&m.p("d/sub")), ["deep-bottom", "deep-middle"]);
    assert_eq!(read_string(&m.p("d/sub/deep-bottom")), "1");
    // Listing twice (e.g. cached listings) gives the same answer.
    assert_eq!(ls(&m.p("d")), ["bottom", "middle", "shared", "sub", "top"]);
}

/// Lookups that pass hundreds of layers (the daemon's first lookups open a
/// directory per layer, past several sizes of its descriptor table) still
/// read every marker on the way: whiteouts of both dialects, an opaque
/// directory (xattr), and an opaque layer root that hides every layer below.
#[test]
fn lookups_across_many_layers_read_every_marker() {
    const LAYERS: usize = 300;
    const OPAQUE_ROOT: usize = 200;
    let l = Layers::new(LAYERS);
    for i in 0..LAYERS {
        l.lower(i).file(&format!("layer{i}"), i.to_string()).file(&format!("shared/f{i}"), i.to_string());
    }
    l.lower(10).whiteout("shared/f20");
    l.lower(30).oci_whiteout("shared/f40");
    l.lower(50).file("deep/top", "50").opaque("deep", "user.overlay.opaque");
    l.lower(60).file("deep/below", "60");
    l.lower(OPAQUE_ROOT).opaque("", "trusted.overlay.opaque");
    let m = StrataMount::mount(&l);
    // Looked up first, before any listing: each answer comes from the probes.
    let bottom_visible = OPAQUE_ROOT;
    assert_eq!(read_string(&m.p(&format!("shared/f{bottom_visible}"))), bottom_visible.to_string());
    assert_eq!(read_string(&m.p(&format!("layer{bottom_visible}"))), bottom_visible.to_string());
    assert_errno(fs::symlink_metadata(m.p(&format!("shared/f{}", LAYERS - 1))), libc::ENOENT, "below an opaque root");
    assert_errno(fs::symlink_metadata(m.p(&format!("layer{}", OPAQUE_ROOT + 1))), libc::ENOENT, "below an opaque root");
    assert_errno(fs::symlink_metadata(m.p("shared/f20")), libc::ENOENT, "char 0/0 whiteout 10 layers up");
    assert_errno(fs::symlink_metadata(m.p("shared/f40")), libc::ENOENT, "OCI whiteout 10 layers up");
    assert_errno(fs::symlink_metadata(m.p("deep/below")), libc::ENOENT, "below an opaque directory");
    assert_eq!(read_string(&m.p("deep/top")), "50");
    assert_eq!(read_string(&m.p("shared/f0")), "0");
    assert_eq!(read_string(&m.p("shared/f199")), "199");
    let mut expected: Vec<String> =
        (0..=bottom_visible).filter(|i| ![20, 40].contains(i)).map(|i| format!("f{i}")).collect();
    expected.sort();
    assert_eq!(ls(&m.p("shared")), expected, "the merged listing agrees with the lookups");
    assert_no_marker_xattrs(&m.p(""));
    assert_no_marker_xattrs(&m.p("deep"));
}

/// An opaque dir in lower0 hides lower1's same-named dir; the marker is invisible.
fn check_opaque(mark: impl Fn(&Layer, &str)) {
    let l = Layers::new(2);
    l.lower(1).file("d/below", "hidden").file("d/sub/x", "hidden").file("other/kept", "k");
    l.lower(0).file("d/top", "visible").dir("other");
    mark(l.lower(0), "d");
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("d")), ["top"], "an opaque dir must not merge with the layers below");
    assert_errno(fs::read(m.p("d/below")), libc::ENOENT, "lookup of a name below an opaque dir");
    assert_errno(fs::symlink_metadata(m.p("d/sub")), libc::ENOENT, "lookup of a dir below an opaque dir");
    assert_errno(fs::read(m.p("d/.wh..wh..opq")), libc::ENOENT, "the OCI opaque marker itself");
    assert_eq!(ls(&m.p("other")), ["kept"], "a dir without a marker still merges");
    assert_no_marker_xattrs(&m.p("d"));
    // Creating in the opaque dir works and still shows only the top.
    fs::write(m.p("d/new"), "n").expect("create in opaque dir");
    assert_eq!(ls(&m.p("d")), ["new", "top"]);
}

#[test]
fn opaque_trusted_overlay_opaque() {
    check_opaque(|l, d| {
        l.opaque(d, "trusted.overlay.opaque");
    });
}

#[test]
fn opaque_user_overlay_opaque() {
    check_opaque(|l, d| {
        l.opaque(d, "user.overlay.opaque");
    });
}

#[test]
fn opaque_user_fuseoverlayfs_opaque() {
    check_opaque(|l, d| {
        l.opaque(d, "user.fuseoverlayfs.opaque");
    });
}

#[test]
fn opaque_oci_wh_wh_opq() {
    check_opaque(|l, d| {
        l.oci_opaque(d);
    });
}

#[test]
fn opaque_in_upper_hides_all_lowers() {
    let l = Layers::new(1);
    l.lower(0).file("d/low", "x");
    l.upper.file("d/up", "y").opaque("d", "trusted.overlay.opaque");
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("d")), ["up"]);
    assert_no_marker_xattrs(&m.p("d"));
}

/// A whiteout for `d/f` and `d/sub` in lower0 hides lower1's entries.
fn check_whiteout(make: impl Fn(&Layer)) {
    let l = Layers::new(2);
    l.lower(1).file("d/f", "hidden").file("d/sub/x", "hidden").file("d/kept", "k");
    l.lower(0).file("d/top", "t");
    make(l.lower(0));
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("d")), ["kept", "top"], "whited-out names and markers must not be listed");
    assert_errno(fs::symlink_metadata(m.p("d/f")), libc::ENOENT, "whited-out file");
    assert_errno(fs::symlink_metadata(m.p("d/sub")), libc::ENOENT, "whited-out dir");
    assert_errno(fs::symlink_metadata(m.p("d/.wh.f")), libc::ENOENT, "OCI whiteout name");
    assert_no_marker_xattrs(&m.p("d"));
    // The name can be created again through the mount.
    fs::write(m.p("d/f"), "new").expect("create over a whiteout");
    assert_eq!(read_string(&m.p("d/f")), "new");
    fs::create_dir(m.p("d/sub")).expect("mkdir over a whiteout");
    assert_eq!(ls(&m.p("d/sub")), Vec::<String>::new(), "lower children of a whited-out dir must stay hidden");
}

#[test]
fn whiteout_char_device_0_0() {
    check_whiteout(|l| {
        l.whiteout("d/f").whiteout("d/sub");
    });
}

#[test]
fn whiteout_oci_wh_file() {
    check_whiteout(|l| {
        l.oci_whiteout("d/f").oci_whiteout("d/sub");
    });
}

#[test]
fn whiteout_trusted_xattr_in_opaque_x_dir() {
    check_whiteout(|l| {
        l.xattr("d", "trusted.overlay.opaque", b"x");
        l.file("d/f", "").xattr("d/f", "trusted.overlay.whiteout", b"");
        l.file("d/sub", "").xattr("d/sub", "trusted.overlay.whiteout", b"");
    });
}

#[test]
fn whiteout_user_xattr_in_opaque_x_dir() {
    check_whiteout(|l| {
        l.xattr("d", "user.overlay.opaque", b"x");
        l.file("d/f", "").xattr("d/f", "user.overlay.whiteout", b"");
        l.file("d/sub", "").xattr("d/sub", "user.overlay.whiteout", b"");
    });
}

#[test]
fn whiteout_in_upper_hides_lower() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x").file("g", "y");
    l.upper.whiteout("f");
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("")), ["g"]);
    assert_errno(fs::symlink_metadata(m.p("f")), libc::ENOENT, "whited-out file");
}

#[test]
fn markers_never_visible_in_getxattr_or_listxattr() {
    let l = Layers::new(1);
    l.lower(0)
        .file("d/f", "x")
        .xattr("d", "trusted.overlay.opaque", b"x")
        .xattr("d", "user.keep", b"1")
        .xattr("d/f", "trusted.overlay.origin", b"\x00\xfb")
        .xattr("d/f", "user.keep", b"2");
    l.lower(0).file("m/low", "l");
    l.upper.dir("m");
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("")), ["d", "m"]);
    assert_eq!(ls(&m.p("d")), ["f"]);
    for p in [m.p("d"), m.p("d/f")] {
        assert_no_marker_xattrs(&p);
        let names = llistxattr(&p).expect("listxattr");
        assert!(names.contains(&"user.keep".to_string()), "ordinary xattrs must stay visible: {names:?}");
    }
    // Strata's own markers after a copy-up and an opaque mkdir stay hidden too.
    fs::write(m.p("d/f"), "changed").expect("write");
    fs::remove_dir_all(m.p("d")).expect("rm -rf d");
    fs::create_dir(m.p("d")).expect("mkdir d");
    assert_no_marker_xattrs(&m.p("d"));
    // Setting a marker name through the mount (refused, or stored escaped as
    // the kernel does) must never make a merged dir opaque in the upper.
    let _ = lsetxattr(&m.p("m"), "trusted.overlay.opaque", b"y");
    let _ = lsetxattr(&m.p("m"), "user.overlay.opaque", b"y");
    let _ = lsetxattr(&m.p("m"), "user.fuseoverlayfs.opaque", b"y");
    assert_eq!(ls(&m.p("m")), ["low"]);
    m.umount();
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("m")), ["low"], "a marker set through the mount made a dir opaque");
}

// ---------------------------------------------------------------------------
// Copy-up
// ---------------------------------------------------------------------------

fn lower_file_with_metadata(l: &Layers, rel: &str) {
    l.lower(0)
        .file_mode(rel, "hello", 0o640)
        .owner(rel, 1234, 5678)
        .xattr(rel, "user.foo", b"bar")
        .xattr(rel, "trusted.t", b"tv")
        .times(rel, 1_000_000_000, 123_456_789);
}

#[track_caller]
fn assert_lower_untouched(l: &Layers, rel: &str) {
    let p = l.lower(0).p(rel);
    assert_eq!(read_string(&p), "hello", "lower content must not change");
    let md = fs::metadata(&p).expect("stat lower");
    assert_eq!(md.mode() & 0o7777, 0o640, "lower mode must not change");
    assert_eq!((md.uid(), md.gid()), (1234, 5678), "lower owner must not change");
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 123_456_789), "lower mtime must not change");
    assert_eq!(lgetxattr(&p, "user.foo").expect("lower xattr"), b"bar");
}

#[test]
fn copy_up_on_write_keeps_data_mode_owner_times_xattrs() {
    let l = Layers::new(1);
    lower_file_with_metadata(&l, "dir/f");
    l.lower(0).mode("dir", 0o750).owner("dir", 42, 43).xattr("dir", "user.d", b"dv");
    let m = StrataMount::mount(&l);
    let ino_before = fs::metadata(m.p("dir/f")).expect("stat").ino();

    // Opening for writing copies nothing up (the daemon is not told of
    // opens); the first change does, here one that keeps the times.
    drop(fs::OpenOptions::new().write(true).open(m.p("dir/f")).expect("open for write"));
    let up = l.upper.p("dir/f");
    assert!(!up.exists(), "open for write alone copies nothing up");
    lsetxattr(&m.p("dir/f"), "user.added", b"1").expect("setxattr");
    assert!(up.is_file(), "a change must copy up");
    let um = fs::metadata(&up).expect("stat upper");
    assert_eq!(um.mode() & 0o7777, 0o640, "mode kept");
    assert_eq!((um.uid(), um.gid()), (1234, 5678), "owner kept");
    assert_eq!((um.mtime(), um.mtime_nsec()), (1_000_000_000, 123_456_789), "mtime kept");
    assert_eq!(read_string(&up), "hello", "data kept");
    assert_eq!(lgetxattr(&up, "user.foo").expect("user xattr copied"), b"bar");
    assert_eq!(lgetxattr(&up, "trusted.t").expect("trusted xattr copied"), b"tv");
    // Parents are copied up first, with their metadata.
    let dm = fs::metadata(l.upper.p("dir")).expect("parent copied up");
    assert_eq!(dm.mode() & 0o7777, 0o750, "parent mode kept");
    assert_eq!((dm.uid(), dm.gid()), (42, 43), "parent owner kept");
    assert_eq!(lgetxattr(&l.upper.p("dir"), "user.d").expect("parent xattr"), b"dv");

    append(&m.p("dir/f"), b" world").expect("append");
    assert_eq!(read_string(&m.p("dir/f")), "hello world");
    assert_eq!(read_string(&up), "hello world");
    let mm = fs::metadata(m.p("dir/f")).expect("stat");
    assert_eq!(mm.mode() & 0o7777, 0o640);
    assert_eq!((mm.uid(), mm.gid()), (1234, 5678));
    assert_eq!(mm.ino(), ino_before, "st_ino must not change on copy-up");
    assert_eq!(lgetxattr(&m.p("dir/f"), "user.foo").expect("xattr via mount"), b"bar");
    assert_lower_untouched(&l, "dir/f");
}

#[test]
fn copy_up_keeps_security_capability() {
    let l = Layers::new(1);
    // vfs_cap_data revision 2: cap_net_bind_service permitted.
    let mut cap = Vec::new();
    for w in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    l.lower(0).file_mode("bin", "#!/bin/sh\n", 0o755).xattr("bin", "security.capability", &cap);
    let m = StrataMount::mount(&l);
    set_times(&m.p("bin"), (5, 0), (5, 0)).expect("utimens");
    let up = l.upper.p("bin");
    assert!(up.is_file(), "utimens must copy up");
    assert_eq!(lgetxattr(&up, "security.capability").expect("capability copied up"), cap);
    assert_eq!(lgetxattr(&m.p("bin"), "security.capability").expect("capability via mount"), cap);
}

/// Runs `op` on lower file `f` through the mount; checks the copy-up.
fn check_copy_up_by(op: impl Fn(&StrataMount), upper_name: &str, check: impl Fn(&Layers, &StrataMount)) {
    let l = Layers::new(1);
    lower_file_with_metadata(&l, "f");
    let m = StrataMount::mount(&l);
    op(&m);
    assert!(l.upper.p(upper_name).is_file(), "{upper_name} must be copied up to the upper");
    check(&l, &m);
    assert_lower_untouched(&l, "f");
}

#[test]
fn copy_up_on_chmod() {
    check_copy_up_by(
        |m| fs::set_permissions(m.p("f"), fs::Permissions::from_mode(0o604)).expect("chmod"),
        "f",
        |l, m| {
            assert_eq!(fs::metadata(m.p("f")).unwrap().mode() & 0o7777, 0o604);
            assert_eq!(fs::metadata(l.upper.p("f")).unwrap().mode() & 0o7777, 0o604);
            assert_eq!(read_string(&l.upper.p("f")), "hello");
            assert_eq!(fs::metadata(l.upper.p("f")).unwrap().mtime(), 1_000_000_000, "chmod must not change mtime");
        },
    );
}

#[test]
fn copy_up_on_chown() {
    check_copy_up_by(
        |m| lchown(&m.p("f"), 7, 8).expect("chown"),
        "f",
        |l, m| {
            let mm = fs::metadata(m.p("f")).unwrap();
            assert_eq!((mm.uid(), mm.gid()), (7, 8));
            let um = fs::metadata(l.upper.p("f")).unwrap();
            assert_eq!((um.uid(), um.gid()), (7, 8));
            assert_eq!(read_string(&l.upper.p("f")), "hello");
        },
    );
}

#[test]
fn copy_up_on_utimens() {
    check_copy_up_by(
        |m| set_times(&m.p("f"), (2_000_000_000, 0), (2_000_000_000, 5)).expect("utimens"),
        "f",
        |l, m| {
            let mm = fs::metadata(m.p("f")).unwrap();
            assert_eq!((mm.mtime(), mm.mtime_nsec()), (2_000_000_000, 5));
            assert_eq!(fs::metadata(l.upper.p("f")).unwrap().mtime(), 2_000_000_000);
            assert_eq!(read_string(&l.upper.p("f")), "hello");
        },
    );
}

#[test]
fn copy_up_on_setxattr() {
    check_copy_up_by(
        |m| lsetxattr(&m.p("f"), "user.new", b"nv").expect("setxattr"),
        "f",
        |l, m| {
            assert_eq!(lgetxattr(&m.p("f"), "user.new").unwrap(), b"nv");
            assert_eq!(lgetxattr(&l.upper.p("f"), "user.new").unwrap(), b"nv");
            assert_eq!(lgetxattr(&l.upper.p("f"), "user.foo").unwrap(), b"bar");
            assert!(lgetxattr(&l.lower(0).p("f"), "user.new").is_err(), "lower must not get the xattr");
        },
    );
}

#[test]
fn copy_up_on_removexattr() {
    check_copy_up_by(
        |m| lremovexattr(&m.p("f"), "user.foo").expect("removexattr"),
        "f",
        |l, m| {
            assert_errno(lgetxattr(&m.p("f"), "user.foo"), libc::ENODATA, "removed xattr");
            assert!(lgetxattr(&l.upper.p("f"), "user.foo").is_err());
        },
    );
}

#[test]
fn copy_up_on_truncate() {
    check_copy_up_by(
        |m| fs::OpenOptions::new().write(true).open(m.p("f")).unwrap().set_len(2).expect("truncate"),
        "f",
        |l, m| {
            assert_eq!(read_string(&m.p("f")), "he");
            assert_eq!(read_string(&l.upper.p("f")), "he");
            let um = fs::metadata(l.upper.p("f")).unwrap();
            assert_eq!((um.mode() & 0o7777, um.uid(), um.gid()), (0o640, 1234, 5678));
        },
    );
}

#[test]
fn copy_up_on_open_with_o_trunc() {
    check_copy_up_by(
        |m| fs::write(m.p("f"), "xyz").expect("O_TRUNC write"),
        "f",
        |l, m| {
            assert_eq!(read_string(&m.p("f")), "xyz");
            assert_eq!(read_string(&l.upper.p("f")), "xyz");
            let um = fs::metadata(l.upper.p("f")).unwrap();
            assert_eq!((um.mode() & 0o7777, um.uid(), um.gid()), (0o640, 1234, 5678));
        },
    );
}

#[test]
fn copy_up_on_link() {
    check_copy_up_by(
        |m| fs::hard_link(m.p("f"), m.p("g")).expect("link"),
        "g",
        |l, m| {
            let (a, b) = (fs::metadata(m.p("f")).unwrap(), fs::metadata(m.p("g")).unwrap());
            assert_eq!(a.ino(), b.ino(), "both names are one inode");
            assert_eq!(a.nlink(), 2);
            let (ua, ub) = (fs::metadata(l.upper.p("f")).unwrap(), fs::metadata(l.upper.p("g")).unwrap());
            assert_eq!(ua.ino(), ub.ino(), "linked in the upper");
            assert_eq!(read_string(&m.p("g")), "hello");
        },
    );
}

#[test]
fn copy_up_on_rename() {
    check_copy_up_by(
        |m| fs::rename(m.p("f"), m.p("g")).expect("rename"),
        "g",
        |l, m| {
            assert_eq!(read_string(&m.p("g")), "hello");
            assert_errno(fs::symlink_metadata(m.p("f")), libc::ENOENT, "old name");
            assert!(is_whiteout(&l.upper.p("f")), "old name must be whited out in the upper");
            let um = fs::metadata(l.upper.p("g")).unwrap();
            assert_eq!((um.mode() & 0o7777, um.uid(), um.gid()), (0o640, 1234, 5678));
            assert_eq!(lgetxattr(&l.upper.p("g"), "user.foo").unwrap(), b"bar");
        },
    );
}

#[test]
fn copy_up_of_sparse_file_keeps_holes() {
    const SIZE: u64 = 100 << 20;
    let l = Layers::new(1);
    l.lower(0).sparse("big", SIZE, &[(0, b"head"), (SIZE - 4, b"tail")]);
    let m = StrataMount::mount(&l);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(m.p("big")).expect("open");
        f.write_all_at(b"H", 0).expect("write");
        f.sync_all().expect("fsync");
    }
    let um = fs::metadata(l.upper.p("big")).expect("copied up");
    assert_eq!(um.len(), SIZE);
    assert!(
        um.blocks() * 512 < (4 << 20),
        "copy-up filled the holes: {} bytes allocated for a sparse 100 MiB file",
        um.blocks() * 512
    );
    let mut f = fs::File::open(m.p("big")).unwrap();
    let mut buf = [0u8; 4];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"Head");
    f.seek(SeekFrom::Start(SIZE - 4)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"tail");
    f.seek(SeekFrom::Start(50 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0; 4]);
}

// ---------------------------------------------------------------------------
// Unlink, rmdir, mkdir
// ---------------------------------------------------------------------------

#[test]
fn unlink_of_lower_file_leaves_char_0_0_whiteout() {
    let l = Layers::new(1);
    l.lower(0).file("d/f", "x").file("d/keep", "k").symlink("d/s", "f");
    l.upper.file("d/uponly", "u");
    let m = StrataMount::mount(&l);
    fs::remove_file(m.p("d/f")).expect("unlink lower file");
    fs::remove_file(m.p("d/s")).expect("unlink lower symlink");
    fs::remove_file(m.p("d/uponly")).expect("unlink upper-only file");
    assert_eq!(ls(&m.p("d")), ["keep"]);
    assert_errno(fs::symlink_metadata(m.p("d/f")), libc::ENOENT, "unlinked file");
    assert!(is_whiteout(&l.upper.p("d/f")), "unlink must leave a char 0/0 whiteout in the upper");
    assert!(is_whiteout(&l.upper.p("d/s")), "unlink of a symlink must leave a whiteout");
    assert!(absent(&l.upper.p("d/uponly")), "an upper-only file needs no whiteout");
    assert_eq!(read_string(&l.lower(0).p("d/f")), "x", "the lower file stays");
    assert_eq!(
        ls(&l.upper.p("d")).iter().filter(|n| n.starts_with(".wh.")).count(),
        0,
        "no OCI whiteouts in the upper"
    );
}

#[test]
fn rmdir_of_merged_dir_that_only_looks_empty() {
    let l = Layers::new(2);
    l.lower(1).file("d/a", "1").file("e/x", "1");
    l.lower(0).file("d/b", "2");
    l.upper.whiteout("d/b");
    let m = StrataMount::mount(&l);
    fs::remove_file(m.p("d/a")).expect("unlink d/a");
    assert_eq!(ls(&m.p("d")), Vec::<String>::new());
    fs::remove_dir(m.p("d")).expect("rmdir of a dir that only looks empty");
    assert_errno(fs::symlink_metadata(m.p("d")), libc::ENOENT, "removed dir");
    assert!(is_whiteout(&l.upper.p("d")), "rmdir must leave a whiteout in the upper");
    assert!(l.lower(1).p("d/a").is_file(), "lower untouched");
    assert_errno(fs::remove_dir(m.p("e")), libc::ENOTEMPTY, "rmdir of a dir with lower content");
    assert_eq!(ls(&m.p("")), ["e"]);
}

#[test]
fn mkdir_over_whiteout_makes_opaque_dir() {
    let l = Layers::new(1);
    l.lower(0).file("d/old", "o").file("d/sub/deep", "x");
    let m = StrataMount::mount(&l);
    fs::remove_dir_all(m.p("d")).expect("rm -rf d");
    assert!(is_whiteout(&l.upper.p("d")));
    fs::create_dir(m.p("d")).expect("mkdir over whiteout");
    assert_eq!(ls(&m.p("d")), Vec::<String>::new(), "lower children must not show in the new dir");
    assert_errno(fs::symlink_metadata(m.p("d/old")), libc::ENOENT, "old lower child");
    assert!(l.upper.p("d").is_dir());
    assert_eq!(lgetxattr(&l.upper.p("d"), "trusted.overlay.opaque").expect("opaque xattr in upper"), b"y");
    assert_errno(lgetxattr(&m.p("d"), "trusted.overlay.opaque"), libc::ENODATA, "opaque marker through the mount");
    fs::write(m.p("d/new"), "n").unwrap();
    assert_eq!(ls(&m.p("d")), ["new"]);
}

// ---------------------------------------------------------------------------
// Rename
// ---------------------------------------------------------------------------

#[test]
fn rename_files() {
    let l = Layers::new(1);
    l.lower(0).file("a", "A").file("b", "B").file("d/c", "C");
    l.upper.file("u", "U");
    let m = StrataMount::mount(&l);
    fs::rename(m.p("a"), m.p("b")).expect("rename lower over lower");
    assert_eq!(read_string(&m.p("b")), "A");
    assert!(is_whiteout(&l.upper.p("a")));
    fs::rename(m.p("u"), m.p("d/u2")).expect("rename upper file into a lower dir");
    assert_eq!(read_string(&m.p("d/u2")), "U");
    assert!(absent(&l.upper.p("u")), "upper-only source needs no whiteout");
    fs::rename(m.p("d/c"), m.p("c2")).expect("rename across dirs");
    assert_eq!(ls(&m.p("")), ["b", "c2", "d"]);
    assert_eq!(ls(&m.p("d")), ["u2"]);
    assert_eq!(read_string(&l.lower(0).p("a")), "A", "lower untouched");
    // Rename back onto a whiteout name.
    fs::rename(m.p("c2"), m.p("a")).expect("rename onto a whited-out name");
    assert_eq!(read_string(&m.p("a")), "C");
}

#[test]
fn rename_dir_with_lower_content_uses_redirect() {
    let l = Layers::new(2);
    l.lower(1).file("d/a", "A").file("d/sub/b", "B");
    l.lower(0).file("d/c", "C");
    l.lower(0).dir("p/q");
    let m = StrataMount::mount(&l);
    fs::rename(m.p("d"), m.p("e")).expect("rename of a merged dir must work (no EXDEV)");
    assert_errno(fs::symlink_metadata(m.p("d")), libc::ENOENT, "old dir name");
    assert_eq!(ls(&m.p("e")), ["a", "c", "sub"]);
    assert_eq!(read_string(&m.p("e/sub/b")), "B");
    assert!(is_whiteout(&l.upper.p("d")), "old name whited out in upper");
    let r =
        lgetxattr(&l.upper.p("e"), "trusted.overlay.redirect").expect("trusted.overlay.redirect on the renamed dir");
    assert!(r == b"/d" || r == b"d", "redirect must name the old path, got {:?}", String::from_utf8_lossy(&r));
    assert_no_marker_xattrs(&m.p("e"));
    // Into another directory, then changes inside it.
    fs::rename(m.p("e"), m.p("p/q/moved")).expect("rename into a lower subdir");
    assert_eq!(ls(&m.p("p/q/moved")), ["a", "c", "sub"]);
    let r = lgetxattr(&l.upper.p("p/q/moved"), "trusted.overlay.redirect").expect("redirect after second rename");
    assert_eq!(r, b"/d", "a cross-directory redirect is absolute and names the lower path");
    fs::remove_file(m.p("p/q/moved/a")).unwrap();
    fs::write(m.p("p/q/moved/sub/new"), "N").unwrap();
    assert_eq!(ls(&m.p("p/q/moved")), ["c", "sub"]);
    assert_eq!(ls(&m.p("p/q/moved/sub")), ["b", "new"]);
    assert!(l.lower(1).p("d/a").is_file(), "lower untouched");
    // A new dir at the old name shows none of the old content.
    fs::create_dir(m.p("d")).expect("mkdir at the renamed dir's old name");
    assert_eq!(ls(&m.p("d")), Vec::<String>::new(), "old lower content shows under a new dir at the old name");
    fs::remove_dir(m.p("d")).unwrap();
    // And renaming it back restores the view.
    fs::rename(m.p("p/q/moved"), m.p("d")).expect("rename back");
    assert_eq!(ls(&m.p("d")), ["c", "sub"]);
    assert_eq!(ls(&m.p("p/q")), Vec::<String>::new());
    m.umount();
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("d")), ["c", "sub"], "after a remount");
    assert_eq!(ls(&m.p("d/sub")), ["b", "new"], "after a remount");
    assert_eq!(ls(&m.p("")), ["d", "p"]);
}

#[test]
fn rename_dir_over_dir_that_only_looks_empty() {
    let l = Layers::new(1);
    l.lower(0).file("target/old", "o").file("src/new", "n");
    let m = StrataMount::mount(&l);
    assert_errno(fs::rename(m.p("src"), m.p("target")), libc::ENOTEMPTY, "rename over a non-empty merged dir");
    fs::remove_file(m.p("target/old")).unwrap();
    fs::rename(m.p("src"), m.p("target")).expect("rename over a dir that only looks empty");
    assert_eq!(ls(&m.p("target")), ["new"], "whited-out lower content must stay hidden");
    assert_eq!(ls(&m.p("")), ["target"]);
    m.umount();
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("target")), ["new"], "after a remount");
}

#[test]
fn rename_noreplace() {
    let l = Layers::new(1);
    l.lower(0).file("a", "A").file("b", "B").dir("dir/x");
    let m = StrataMount::mount(&l);
    assert_errno(renameat2(&m.p("a"), &m.p("b"), libc::RENAME_NOREPLACE), libc::EEXIST, "NOREPLACE over a lower file");
    assert_errno(renameat2(&m.p("a"), &m.p("dir"), libc::RENAME_NOREPLACE), libc::EEXIST, "NOREPLACE over a lower dir");
    assert_eq!(read_string(&m.p("b")), "B");
    renameat2(&m.p("a"), &m.p("c"), libc::RENAME_NOREPLACE).expect("NOREPLACE to a free name");
    assert_eq!(read_string(&m.p("c")), "A");
    fs::remove_file(m.p("b")).unwrap();
    renameat2(&m.p("c"), &m.p("b"), libc::RENAME_NOREPLACE).expect("NOREPLACE onto a whited-out name");
    assert_eq!(ls(&m.p("")), ["b", "dir"]);
}

#[test]
fn rename_exchange() {
    let l = Layers::new(1);
    l.lower(0).file("a", "A").file("d1/x", "X").file("d2/y", "Y");
    l.upper.file("b", "B");
    let m = StrataMount::mount(&l);
    renameat2(&m.p("a"), &m.p("b"), libc::RENAME_EXCHANGE).expect("EXCHANGE lower and upper file");
    assert_eq!(read_string(&m.p("a")), "B");
    assert_eq!(read_string(&m.p("b")), "A");
    renameat2(&m.p("d1"), &m.p("d2"), libc::RENAME_EXCHANGE).expect("EXCHANGE two lower dirs");
    assert_eq!(ls(&m.p("d1")), ["y"]);
    assert_eq!(ls(&m.p("d2")), ["x"]);
    assert_errno(
        renameat2(&m.p("a"), &m.p("missing"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "EXCHANGE with a missing name",
    );
    assert_eq!(read_string(&l.lower(0).p("a")), "A", "lower untouched");
}

// ---------------------------------------------------------------------------
// Hard links and inode numbers
// ---------------------------------------------------------------------------

#[test]
fn lower_hard_links_are_one_inode_and_stay_linked_after_copy_up() {
    let l = Layers::new(1);
    l.lower(0).file("a", "one").hardlink("a", "sub/b");
    let m = StrataMount::mount(&l);
    let (a, b) = (fs::metadata(m.p("a")).unwrap(), fs::metadata(m.p("sub/b")).unwrap());
    assert_eq!(a.ino(), b.ino(), "lower hard links must show one st_ino");
    assert_eq!(a.nlink(), 2, "st_nlink of a lower hard link");
    append(&m.p("a"), b" two").expect("write via a");
    assert_eq!(read_string(&m.p("sub/b")), "one two", "write via a must be seen via b");
    let (a2, b2) = (fs::metadata(m.p("a")).unwrap(), fs::metadata(m.p("sub/b")).unwrap());
    assert_eq!(a2.ino(), b2.ino(), "still one inode after copy-up");
    assert_eq!(a2.ino(), a.ino(), "st_ino unchanged by copy-up");
    assert_eq!(a2.nlink(), 2);
    append(&m.p("sub/b"), b" three").expect("write via b");
    assert_eq!(read_string(&m.p("a")), "one two three");
    assert_eq!(read_string(&l.lower(0).p("a")), "one", "lower untouched");
    // Still one inode after a remount.
    m.umount();
    let m = StrataMount::mount(&l);
    let (a3, b3) = (fs::metadata(m.p("a")).unwrap(), fs::metadata(m.p("sub/b")).unwrap());
    assert_eq!((a3.ino(), a3.nlink()), (b3.ino(), 2), "hard links after a remount");
    append(&m.p("sub/b"), b" four").expect("write via b after remount");
    assert_eq!(read_string(&m.p("a")), "one two three four", "still linked after a remount");
}

fn inode_map(m: &StrataMount, names: &[&str]) -> Vec<(String, u64)> {
    names.iter().map(|n| (n.to_string(), fs::symlink_metadata(m.p(n)).unwrap().ino())).collect()
}

#[test]
fn inode_numbers_stable_across_copy_up_rename_and_remount() {
    let l = Layers::new(2);
    l.lower(1).file("bottom", "b").file("d/x", "x").dir("dd/sub");
    l.lower(0).file("top", "t").symlink("link", "top");
    l.upper.file("up", "u");
    let names = ["bottom", "top", "link", "up", "d", "d/x", "dd", "dd/sub", ""];
    let m = StrataMount::mount(&l);
    let before = inode_map(&m, &names);
    let mut seen: Vec<u64> = before.iter().map(|(_, i)| *i).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), names.len(), "distinct entries need distinct st_ino: {before:?}");
    // Copy-ups.
    append(&m.p("bottom"), b"!").unwrap();
    fs::set_permissions(m.p("top"), fs::Permissions::from_mode(0o600)).unwrap();
    append(&m.p("d/x"), b"!").unwrap();
    lsetxattr(&m.p("dd"), "user.x", b"1").unwrap();
    let after = inode_map(&m, &names);
    assert_eq!(before, after, "st_ino must not change on copy-up");
    // Rename keeps the inode.
    let top_ino = fs::metadata(m.p("top")).unwrap().ino();
    fs::rename(m.p("top"), m.p("top2")).unwrap();
    assert_eq!(fs::metadata(m.p("top2")).unwrap().ino(), top_ino, "st_ino must not change on rename");
    fs::rename(m.p("top2"), m.p("top")).unwrap();
    // A renamed merged dir keeps its children's inodes, also after a remount.
    let dx_ino = fs::metadata(m.p("d/x")).unwrap().ino();
    let d_ino = fs::metadata(m.p("d")).unwrap().ino();
    fs::rename(m.p("d"), m.p("d-renamed")).unwrap();
    assert_eq!(fs::metadata(m.p("d-renamed/x")).unwrap().ino(), dx_ino, "child of a renamed dir");
    assert_eq!(fs::metadata(m.p("d-renamed")).unwrap().ino(), d_ino, "renamed dir");
    m.umount();
    let m = StrataMount::mount(&l);
    let names: Vec<&str> = names
        .iter()
        .map(|n| {
            if *n == "d" {
                "d-renamed"
            } else if *n == "d/x" {
                "d-renamed/x"
            } else {
                n
            }
        })
        .collect();
    let again: Vec<(String, u64)> =
        inode_map(&m, &names).into_iter().map(|(n, i)| (n.replace("d-renamed", "d"), i)).collect();
    assert_eq!(before, again, "st_ino must be the same after a remount");
}

// ---------------------------------------------------------------------------
// Creating things
// ---------------------------------------------------------------------------

#[test]
fn create_mknod_symlink_readlink_link() {
    let l = Layers::new(1);
    l.lower(0).file("d/existing", "e");
    let m = StrataMount::mount(&l);
    // create with O_CREAT|O_EXCL
    {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(m.p("d/new")).expect("create");
        f.write_all(b"fresh").unwrap();
    }
    assert_errno(
        fs::OpenOptions::new().write(true).create_new(true).open(m.p("d/existing")),
        libc::EEXIST,
        "O_EXCL on a lower file",
    );
    let nm = fs::metadata(m.p("d/new")).unwrap();
    assert_eq!(nm.mode() & 0o7777, 0o600);
    assert_eq!(read_string(&l.upper.p("d/new")), "fresh");
    // fifo
    mkfifo(&m.p("d/fifo"), 0o640).expect("mkfifo");
    assert!(fs::symlink_metadata(m.p("d/fifo")).unwrap().file_type().is_fifo());
    assert!(fs::symlink_metadata(l.upper.p("d/fifo")).unwrap().file_type().is_fifo(), "fifo in upper");
    // char device (root)
    mknod(&m.p("d/null"), libc::S_IFCHR, 0o666, 1, 3).expect("mknod char 1:3");
    let cm = fs::symlink_metadata(m.p("d/null")).unwrap();
    assert!(cm.file_type().is_char_device());
    assert_eq!(cm.rdev(), libc::makedev(1, 3));
    // symlink + readlink
    std::os::unix::fs::symlink("../d/existing", m.p("d/sym")).expect("symlink");
    assert_eq!(fs::read_link(m.p("d/sym")).unwrap(), Path::new("../d/existing"));
    assert_eq!(fs::read_link(l.upper.p("d/sym")).unwrap(), Path::new("../d/existing"));
    assert_eq!(read_string(&m.p("d/sym")), "e", "following a symlink inside the mount");
    assert!(fs::symlink_metadata(m.p("d/sym")).unwrap().file_type().is_symlink());
    // link of a new file
    fs::hard_link(m.p("d/new"), m.p("new-link")).expect("link");
    let (a, b) = (fs::metadata(m.p("d/new")).unwrap(), fs::metadata(m.p("new-link")).unwrap());
    assert_eq!(a.ino(), b.ino());
    assert_eq!(b.nlink(), 2);
    // mkdir
    fs::create_dir(m.p("d/newdir")).expect("mkdir");
    assert_errno(fs::create_dir(m.p("d")), libc::EEXIST, "mkdir over a lower dir");
    assert_eq!(ls(&m.p("d")), ["existing", "fifo", "new", "newdir", "null", "sym"]);
    // fsync of files and dirs
    fs::File::open(m.p("d/new")).unwrap().sync_all().expect("fsync");
    fs::File::open(m.p("d")).unwrap().sync_all().expect("fsyncdir");
}

/// The kernel's FUSE can create O_TMPFILE files, but fuser 0.18 does not
/// dispatch that request, so Strata cannot offer it yet (the kernel's
/// overlayfs can: a known difference, see docs/differences.md). What must
/// hold meanwhile: a clean EOPNOTSUPP that programs fall back from, nothing
/// left behind, and the mount still working.
#[test]
fn o_tmpfile_is_refused_cleanly() {
    let l = Layers::new(1);
    l.lower(0).dir("d");
    let m = StrataMount::mount(&l);
    let err = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(m.p("d"))
        .expect_err("O_TMPFILE is not offered through fuser 0.18");
    assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP), "{err}");
    assert_eq!(ls(&m.p("d")), Vec::<String>::new());
    fs::write(m.p("d/after"), "ok").unwrap();
    assert_eq!(read_string(&m.p("d/after")), "ok");
}

#[test]
fn fallocate_and_punch_hole() {
    let l = Layers::new(1);
    l.lower(0).file("f", "0123456789");
    let m = StrataMount::mount(&l);
    let f = fs::OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    assert_eq!(fs::metadata(m.p("f")).unwrap().len(), 1 << 20);
    assert_eq!(fs::metadata(l.upper.p("f")).unwrap().len(), 1 << 20, "fallocate goes to the upper copy");
    assert!(fs::metadata(l.upper.p("f")).unwrap().blocks() * 512 >= 1 << 20, "space must be allocated");
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 4 << 20) };
    assert_eq!(r, 0, "fallocate KEEP_SIZE: {}", std::io::Error::last_os_error());
    assert_eq!(fs::metadata(m.p("f")).unwrap().len(), 1 << 20, "KEEP_SIZE must not grow the file");
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 2, 4) };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    let data = fs::read(m.p("f")).unwrap();
    assert_eq!(&data[..10], b"01\0\0\0\x006789");
    assert_eq!(read_string(&l.lower(0).p("f")), "0123456789");
}

#[test]
fn lseek_data_and_hole() {
    const MIB: u64 = 1 << 20;
    let l = Layers::new(1);
    l.lower(0).sparse("s", 16 * MIB, &[(0, &[7u8; 4096]), (8 * MIB, &[9u8; 4096])]);
    let m = StrataMount::mount(&l);
    // Exact answers for a lower file (the daemon asks the layer's file); a
    // copy-up may keep holes at a coarser granularity (the kernel's is 1 MiB).
    let check = |what: &str, exact: bool| {
        let f = fs::File::open(m.p("s")).unwrap();
        let fd = f.as_raw_fd();
        // SAFETY: valid fd.
        let seek = |off: u64, whence| unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        let (mib8, size) = ((8 * MIB) as i64, (16 * MIB) as i64);
        let hole = seek(0, libc::SEEK_HOLE);
        let data = seek(hole as u64, libc::SEEK_DATA);
        let hole2 = seek(8 * MIB, libc::SEEK_HOLE);
        if exact {
            assert_eq!(
                (hole, data, hole2),
                (4096, mib8, mib8 + 4096),
                "{what}: SEEK_HOLE(0), SEEK_DATA(hole), SEEK_HOLE(8 MiB)"
            );
        } else {
            assert!(hole >= 4096 && hole < mib8, "{what}: SEEK_HOLE(0) = {hole}, a hole must be found before 8 MiB");
            assert!(data > hole && data <= mib8, "{what}: SEEK_DATA({hole}) = {data}");
            assert!(
                hole2 >= mib8 + 4096 && hole2 < size,
                "{what}: SEEK_HOLE(8 MiB) = {hole2}, a hole must be found before EOF"
            );
        }
        assert_eq!(seek(0, libc::SEEK_DATA), 0, "{what}: data at 0");
        if exact {
            let r = seek(8 * MIB + 8192, libc::SEEK_DATA);
            assert_eq!(r, -1, "{what}: no data after the last extent");
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::ENXIO),
                "{what}: ENXIO past the last data"
            );
        }
    };
    check("lower file", true);
    // Rewrite the first byte as it is: a write, which copies up.
    fs::OpenOptions::new().write(true).open(m.p("s")).unwrap().write_all_at(&[7], 0).unwrap();
    assert!(l.upper.p("s").is_file());
    check("copied-up file", false);
}

#[test]
fn statfs_reports_upper_filesystem() {
    let l = Layers::new(1);
    let m = StrataMount::mount(&l);
    let sm = statvfs(&m.p("")).expect("statvfs mount");
    let su = statvfs(&l.upper.path).expect("statvfs upper");
    let total = |s: &libc::statvfs| s.f_blocks as u128 * s.f_frsize as u128;
    assert_eq!(total(&sm), total(&su), "total size must be the upper filesystem's");
    assert!(sm.f_bavail > 0 && sm.f_bfree >= sm.f_bavail, "free space: {} {}", sm.f_bfree, sm.f_bavail);
    assert!(sm.f_namemax >= 255, "f_namemax {}", sm.f_namemax);
    assert!(sm.f_files > 0, "f_files");
}

#[test]
fn xattr_set_get_list_remove() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x").xattr("f", "user.low", b"L").dir("d");
    let m = StrataMount::mount(&l);
    let f = m.p("f");
    assert_eq!(lgetxattr(&f, "user.low").unwrap(), b"L");
    lsetxattr(&f, "user.a", b"1").expect("setxattr user.a");
    lsetxattr(&f, "user.big", &[0xabu8; 3000]).expect("setxattr 3000 bytes");
    lsetxattr(&f, "trusted.t", b"T").expect("setxattr trusted.t as root");
    assert_eq!(lgetxattr(&f, "user.a").unwrap(), b"1");
    assert_eq!(lgetxattr(&f, "user.big").unwrap(), vec![0xabu8; 3000]);
    let names = llistxattr(&f).unwrap();
    for n in ["trusted.t", "user.a", "user.big", "user.low"] {
        assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
    }
    lremovexattr(&f, "user.low").expect("remove a lower xattr");
    lremovexattr(&f, "user.a").expect("remove a new xattr");
    assert_errno(lgetxattr(&f, "user.low"), libc::ENODATA, "removed lower xattr");
    assert_errno(lgetxattr(&f, "user.nothere"), libc::ENODATA, "missing xattr");
    assert_errno(lremovexattr(&f, "user.nothere"), libc::ENODATA, "remove missing xattr");
    assert!(!llistxattr(&f).unwrap().contains(&"user.low".to_string()));
    assert_eq!(lgetxattr(&l.lower(0).p("f"), "user.low").unwrap(), b"L", "lower untouched");
    // On a directory too.
    lsetxattr(&m.p("d"), "user.dx", b"D").expect("setxattr on a lower dir");
    assert_eq!(lgetxattr(&m.p("d"), "user.dx").unwrap(), b"D");
    assert_eq!(lgetxattr(&l.upper.p("d"), "user.dx").unwrap(), b"D");
    // XATTR_CREATE on an existing name.
    let (p, n) = (cpath(&f), std::ffi::CString::new("user.big").unwrap());
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), b"z".as_ptr().cast(), 1, libc::XATTR_CREATE) };
    assert_eq!(
        (r, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EEXIST)),
        "XATTR_CREATE on an existing xattr"
    );
}

// ---------------------------------------------------------------------------
// Read-only mounts, reserved names
// ---------------------------------------------------------------------------

#[test]
fn read_only_mount_without_upper_gives_erofs() {
    let l = Layers::new(2);
    l.lower(1).file("f", "x").file("d/a", "a");
    l.lower(0).file("g", "y").xattr("g", "user.x", b"1");
    let m = StrataMount::mount_ro(&l);
    assert_eq!(read_string(&m.p("f")), "x", "reads work");
    assert_eq!(ls(&m.p("")), ["d", "f", "g"]);
    assert_errno(fs::OpenOptions::new().write(true).open(m.p("f")), libc::EROFS, "open for write");
    assert_errno(fs::OpenOptions::new().append(true).open(m.p("g")), libc::EROFS, "open for append");
    assert_errno(fs::write(m.p("new"), "n"), libc::EROFS, "create");
    assert_errno(fs::create_dir(m.p("newdir")), libc::EROFS, "mkdir");
    assert_errno(fs::remove_file(m.p("f")), libc::EROFS, "unlink");
    assert_errno(fs::remove_dir(m.p("d")), libc::EROFS, "rmdir");
    assert_errno(fs::rename(m.p("f"), m.p("f2")), libc::EROFS, "rename");
    assert_errno(fs::set_permissions(m.p("f"), fs::Permissions::from_mode(0o600)), libc::EROFS, "chmod");
    assert_errno(lsetxattr(&m.p("g"), "user.y", b"2"), libc::EROFS, "setxattr");
    assert_errno(std::os::unix::fs::symlink("f", m.p("s")), libc::EROFS, "symlink");
    assert_errno(fs::hard_link(m.p("f"), m.p("h")), libc::EROFS, "link");
    assert_errno(mkfifo(&m.p("p"), 0o644), libc::EROFS, "mkfifo");
    let c = cpath(&m.p("f"));
    // SAFETY: valid C string.
    let r = unsafe { libc::access(c.as_ptr(), libc::W_OK) };
    assert_eq!((r, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::EROFS)), "access(W_OK)");
    assert_eq!(read_string(&l.lower(1).p("f")), "x");
}

#[test]
fn names_starting_with_wh_cannot_be_created() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x").dir("d");
    let m = StrataMount::mount(&l);
    assert!(fs::write(m.p(".wh.f"), "").is_err(), "creating .wh.f must fail");
    assert!(fs::write(m.p("d/.wh..wh..opq"), "").is_err(), "creating .wh..wh..opq must fail");
    assert!(fs::create_dir(m.p(".wh.dir")).is_err(), "mkdir .wh.dir must fail");
    assert!(std::os::unix::fs::symlink("f", m.p(".wh.sym")).is_err(), "symlink .wh.sym must fail");
    assert!(mkfifo(&m.p(".wh.fifo"), 0o644).is_err(), "mkfifo .wh.fifo must fail");
    assert!(fs::rename(m.p("f"), m.p(".wh.g")).is_err(), "rename to .wh.g must fail");
    assert!(fs::hard_link(m.p("f"), m.p(".wh.h")).is_err(), "link to .wh.h must fail");
    assert_eq!(ls(&m.p("")), ["d", "f"], "nothing may appear, and f must still be there");
    assert_eq!(ls(&m.p("d")), Vec::<String>::new());
    let in_upper: Vec<String> = ls(&l.upper.path).into_iter().filter(|n| n.starts_with(".wh.")).collect();
    assert!(in_upper.is_empty(), "no .wh.* in upper: {in_upper:?}");
}

// ---------------------------------------------------------------------------
// Ownership and permissions
// ---------------------------------------------------------------------------

#[test]
fn new_files_owned_by_caller_with_setgid_inheritance() {
    let l = Layers::new(1);
    l.lower(0).dir("pub").mode("pub", 0o777).dir("sg").owner("sg", 0, 2000).mode("sg", 0o2777);
    let m = StrataMount::mount(&l);
    let mp = m.p("").display().to_string();
    let o = sh_as_user(
        1000,
        1000,
        &format!("touch {mp}/pub/f && mkdir {mp}/pub/dd && touch {mp}/sg/f && mkdir {mp}/sg/dd && ln -s x {mp}/pub/s"),
    );
    assert!(o.success(), "creating as uid 1000 failed: {o:?}");
    for (rel, uid, gid) in [
        ("pub/f", 1000, 1000),
        ("pub/dd", 1000, 1000),
        ("pub/s", 1000, 1000),
        ("sg/f", 1000, 2000),
        ("sg/dd", 1000, 2000),
    ] {
        let md = fs::symlink_metadata(m.p(rel)).unwrap();
        assert_eq!((md.uid(), md.gid()), (uid, gid), "owner of {rel} through the mount");
        let um = fs::symlink_metadata(l.upper.p(rel)).unwrap();
        assert_eq!((um.uid(), um.gid()), (uid, gid), "owner of {rel} in the upper");
    }
    assert_eq!(fs::metadata(m.p("sg/dd")).unwrap().mode() & 0o2000, 0o2000, "a dir made in a setgid dir is setgid");
    assert_eq!(fs::metadata(m.p("pub/dd")).unwrap().mode() & 0o2000, 0, "no setgid outside");
    // Permission checks apply to other users.
    let o = sh_as_user(1000, 1000, &format!("touch {mp}/newfile"));
    assert!(!o.success(), "uid 1000 must not create in the root-owned 0755 root dir");
    assert!(absent(&m.p("newfile")));
}

#[test]
fn write_by_non_owner_clears_suid_and_sgid() {
    let l = Layers::new(1);
    l.lower(0).file_mode("prog", "#!/bin/sh\n", 0o6777);
    let m = StrataMount::mount(&l);
    let o = sh_as_user(1000, 1000, &format!("echo more >> {}", m.p("prog").display()));
    assert!(o.success(), "write as uid 1000: {o:?}");
    let md = fs::metadata(m.p("prog")).unwrap();
    assert_eq!(md.mode() & 0o6000, 0, "suid/sgid must be cleared by a write from a non-owner, mode {:o}", md.mode());
    assert_eq!(read_string(&m.p("prog")), "#!/bin/sh\nmore\n");
    assert_eq!(fs::metadata(l.lower(0).p("prog")).unwrap().mode() & 0o7777, 0o6777, "lower untouched");
}

#[test]
fn other_users_can_read_the_mount() {
    let l = Layers::new(1);
    l.lower(0).file_mode("f", "readable", 0o644).file_mode("secret", "no", 0o600);
    let m = StrataMount::mount(&l);
    let o = sh_as_user(1000, 1000, &format!("cat {}", m.p("f").display()));
    assert!(o.success(), "uid 1000 reading a 0644 file (allow_other): {o:?}");
    assert_eq!(o.stdout, "readable");
    let o = sh_as_user(1000, 1000, &format!("cat {}", m.p("secret").display()));
    assert!(!o.success(), "uid 1000 must not read a 0600 root file (default_permissions)");
}

// ---------------------------------------------------------------------------
// Security: symlinks inside layers are never followed while resolving
// ---------------------------------------------------------------------------

#[test]
fn symlink_in_lower_is_not_followed_when_a_higher_layer_has_a_dir() {
    let l = Layers::new(2);
    l.lower(1).symlink("d", "/etc");
    l.lower(0).file("d/mine", "m");
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("d")), ["mine"], "listing d must show only the higher layer's entries, never /etc");
    assert_errno(fs::symlink_metadata(m.p("d/passwd")), libc::ENOENT, "d/passwd");
    assert_errno(fs::symlink_metadata(m.p("d/hostname")), libc::ENOENT, "d/hostname");
}

#[test]
fn symlink_path_component_in_lower_is_never_followed() {
    let l = Layers::new(2);
    let marker = format!("strata-escape-{}", l.root().file_name().unwrap().to_string_lossy());
    // Bottom: `a` -> `/`, so a careless `lower1/a/etc` would be the host's /etc.
    l.lower(1).symlink("a", "/");
    l.lower(1).symlink("b", "/etc");
    l.lower(0).file("a/etc/only-here", "1").dir("b/sub");
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("a")), ["etc"]);
    assert_eq!(ls(&m.p("a/etc")), ["only-here"], "a/etc must not merge with the host's /etc");
    assert_errno(fs::symlink_metadata(m.p("a/etc/passwd")), libc::ENOENT, "a/etc/passwd");
    assert_eq!(ls(&m.p("b")), ["sub"]);
    // Writes in such a dir go to the upper, never to the host.
    fs::write(m.p(&format!("a/etc/{marker}")), "x").expect("create");
    fs::write(m.p(&format!("b/{marker}")), "x").expect("create");
    assert!(absent(&Path::new("/etc").join(&marker)), "a create escaped into the host's /etc");
    assert!(l.upper.p(&format!("a/etc/{marker}")).is_file());
    assert!(l.upper.p(&format!("b/{marker}")).is_file());
    // The symlinks themselves are still ordinary symlinks where they are on top.
    assert!(fs::symlink_metadata(l.lower(1).p("a")).unwrap().file_type().is_symlink());
}

#[test]
fn symlink_as_whole_entry_is_shown_not_followed() {
    let l = Layers::new(1);
    l.lower(0).symlink("etc-link", "/etc").file("real", "r");
    let m = StrataMount::mount(&l);
    let md = fs::symlink_metadata(m.p("etc-link")).unwrap();
    assert!(md.file_type().is_symlink(), "a symlink entry must be a symlink through the mount");
    assert_eq!(fs::read_link(m.p("etc-link")).unwrap(), Path::new("/etc"));
    // chown -h of the symlink copies it up as a symlink, never its target.
    lchown(&m.p("etc-link"), 5, 5).expect("lchown");
    assert!(fs::symlink_metadata(l.upper.p("etc-link")).unwrap().file_type().is_symlink());
    assert_eq!(fs::symlink_metadata(l.upper.p("etc-link")).unwrap().uid(), 5);
    assert_ne!(fs::metadata("/etc").unwrap().uid(), 5, "the host's /etc must not be chowned");
}

// ---------------------------------------------------------------------------
// Directory listings and open files
// ---------------------------------------------------------------------------

#[test]
fn large_merged_directory_lists_every_name_once() {
    let l = Layers::new(2);
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..700 {
        let name = format!("bottom-file-with-a-long-name-to-fill-buffers-{i:04}");
        l.lower(1).file(&format!("big/{name}"), "b");
        if i % 7 != 0 {
            expected.insert(name);
        }
    }
    for i in 0..300 {
        let name = format!("middle-{i:04}");
        l.lower(0).file(&format!("big/{name}"), "m");
        expected.insert(name);
    }
    for i in (0..700).step_by(7) {
        l.lower(0).whiteout(&format!("big/bottom-file-with-a-long-name-to-fill-buffers-{i:04}"));
    }
    // Shadowed in several layers: listed once.
    for i in 0..50 {
        let name = format!("middle-{i:04}");
        l.upper.file(&format!("big/{name}"), "u");
    }
    let m = StrataMount::mount(&l);
    let names = ls(&m.p("big"));
    let set: std::collections::BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(names.len(), set.len(), "duplicate names in a large merged listing");
    assert_eq!(set.len(), expected.len(), "wrong number of names in a large merged listing");
    assert!(set == expected, "large merged listing differs");
    // Changing the dir while listing it again still gives a consistent answer.
    fs::remove_file(m.p("big/middle-0001")).unwrap();
    fs::write(m.p("big/zz-new"), "n").unwrap();
    expected.remove("middle-0001");
    expected.insert("zz-new".to_string());
    let again: std::collections::BTreeSet<String> = ls(&m.p("big")).into_iter().collect();
    assert!(again == expected, "listing after changes differs");
}

/// The names one getdents64(2) call on `dir` returns (a small buffer, so
/// a listing takes many calls); empty at the end.
fn getdents_chunk(dir: &fs::File) -> Vec<String> {
    let mut buf = vec![0u8; 2048];
    // SAFETY: getdents64 writes at most buf.len() bytes into buf.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    let mut names = Vec::new();
    let mut at = 0;
    while at < n as usize {
        // struct linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
        let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
        let name = &buf[at + 19..at + reclen];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        names.push(String::from_utf8_lossy(name).into_owned());
        at += reclen;
    }
    names
}

/// A directory read in many chunks while it changes (the kernel then asks
/// the daemon again from where it stopped): every name that stays is
/// listed exactly once, whatever was added or removed in between.
#[test]
fn a_listing_read_while_the_directory_changes_lists_each_remaining_name_once() {
    let l = Layers::new(2);
    for i in 0..400 {
        l.lower(1).file(&format!("d/lower-{i:03}"), "l");
    }
    for i in 0..100 {
        l.lower(0).file(&format!("d/middle-{i:03}"), "m");
    }
    let m = StrataMount::mount(&l);
    let dir = fs::File::open(m.p("d")).unwrap();
    let mut seen: Vec<String> = Vec::new();
    let mut removed = std::collections::BTreeSet::new();
    let mut round = 0;
    loop {
        let chunk = getdents_chunk(&dir);
        if chunk.is_empty() {
            break;
        }
        seen.extend(chunk);
        // Between chunks: remove a name from each layer and add two.
        for name in [format!("lower-{:03}", (round * 37) % 400), format!("middle-{:03}", (round * 13) % 100)] {
            if removed.insert(name.clone()) {
                fs::remove_file(m.p(&format!("d/{name}"))).unwrap();
            }
        }
        fs::write(m.p(&format!("d/new-{round:03}-a")), "n").unwrap();
        fs::write(m.p(&format!("d/new-{round:03}-b")), "n").unwrap();
        round += 1;
        assert!(round < 1000, "the listing does not end");
    }
    assert!(round > 5, "the listing took {round} chunks: too few to test");
    let mut counts = std::collections::BTreeMap::new();
    for name in &seen {
        *counts.entry(name.as_str()).or_insert(0) += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).map(|(name, _)| *name).collect();
    assert!(twice.is_empty(), "listed more than once: {twice:?}");
    let originals = (0..400).map(|i| format!("lower-{i:03}")).chain((0..100).map(|i| format!("middle-{i:03}")));
    for name in originals.filter(|name| !removed.contains(name)) {
        assert!(counts.contains_key(name.as_str()), "{name} was never removed but not listed");
    }
    let now = ls(&m.p("d"));
    assert_eq!(now.len(), 500 - removed.len() + 2 * round, "the listing afterwards");
}

#[test]
fn readdir_d_type_and_d_ino_match_stat() {
    let l = Layers::new(2);
    l.lower(1).file("d/f", "1").dir("d/sub").symlink("d/s", "f").fifo("d/p").file("d/shadowed", "old");
    l.lower(0).file("d/g", "2").dir("d/sub/x").dir("d/shadowed");
    l.upper.file("d/u", "3");
    let m = StrataMount::mount(&l);
    append(&m.p("d/f"), b"!").unwrap(); // copied up
    let mut seen = 0;
    for e in fs::read_dir(m.p("d")).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        let ft = e.file_type().unwrap();
        assert_eq!(ft, md.file_type(), "d_type of {:?} differs from stat", e.file_name());
        assert_eq!(
            std::os::unix::fs::DirEntryExt::ino(&e),
            md.ino(),
            "d_ino of {:?} differs from st_ino",
            e.file_name()
        );
        seen += 1;
    }
    assert_eq!(seen, 7);
    assert!(fs::symlink_metadata(m.p("d/shadowed")).unwrap().is_dir());
}

#[test]
fn read_fd_opened_before_copy_up_sees_later_writes() {
    let l = Layers::new(1);
    l.lower(0).file("f", "old-content");
    let m = StrataMount::mount(&l);
    let mut reader = fs::File::open(m.p("f")).unwrap();
    let mut buf = String::new();
    reader.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "old-content");
    {
        use std::os::unix::fs::FileExt;
        let w = fs::OpenOptions::new().write(true).open(m.p("f")).unwrap();
        w.write_all_at(b"NEW", 0).unwrap();
    }
    let mut buf = [0u8; 11];
    use std::os::unix::fs::FileExt;
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf),
        "NEW-content",
        "a read fd opened before the copy-up must see the upper copy"
    );
    assert_eq!(read_string(&l.lower(0).p("f")), "old-content");
}

#[test]
fn open_fd_survives_unlink_and_rename_of_parent() {
    let l = Layers::new(1);
    l.lower(0).file("d/f", "data").file("d/g", "gg");
    let m = StrataMount::mount(&l);
    let mut f = fs::OpenOptions::new().read(true).write(true).open(m.p("d/f")).unwrap();
    fs::rename(m.p("d"), m.p("e")).unwrap();
    f.write_all(b"DATA").unwrap();
    assert_eq!(read_string(&m.p("e/f")), "DATA");
    fs::remove_file(m.p("e/f")).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "DATA", "an unlinked open file stays readable");
    assert_eq!(ls(&m.p("e")), ["g"]);
    assert_eq!(fs::metadata(m.p("e/g")).unwrap().len(), 2);
}

// ---------------------------------------------------------------------------
// Copy-up edge cases
// ---------------------------------------------------------------------------

#[test]
fn copy_up_of_a_dir_keeps_it_merged() {
    let l = Layers::new(2);
    l.lower(1).file("d/bottom", "b").file("d/sub/x", "x");
    l.lower(0).file("d/middle", "m").mode("d", 0o755);
    let m = StrataMount::mount(&l);
    fs::set_permissions(m.p("d"), fs::Permissions::from_mode(0o711)).expect("chmod of a merged dir");
    lsetxattr(&m.p("d/sub"), "user.x", b"1").expect("setxattr on a lower dir");
    assert!(l.upper.p("d").is_dir(), "chmod copies the dir up");
    assert_eq!(ls(&m.p("d")), ["bottom", "middle", "sub"], "a copied-up dir must keep merging with the lowers");
    assert_eq!(ls(&m.p("d/sub")), ["x"]);
    for dir in ["d", "d/sub"] {
        for name in OPAQUE_XATTRS {
            assert!(lgetxattr(&l.upper.p(dir), name).is_err(), "copy-up made {dir} opaque ({name})");
        }
    }
    assert_eq!(fs::metadata(m.p("d")).unwrap().mode() & 0o7777, 0o711);
    m.umount();
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("d")), ["bottom", "middle", "sub"], "after a remount");
}

#[test]
fn recreated_name_removed_again_stays_hidden() {
    let l = Layers::new(1);
    l.lower(0).file("f", "lower-f").file("g", "lower-g").file("d/x", "x").file("h", "lower-h");
    let m = StrataMount::mount(&l);
    // file: unlink, create, unlink
    fs::remove_file(m.p("f")).unwrap();
    fs::write(m.p("f"), "new").unwrap();
    assert_eq!(read_string(&m.p("f")), "new");
    fs::remove_file(m.p("f")).unwrap();
    assert_errno(fs::read(m.p("f")), libc::ENOENT, "f after unlink, create, unlink");
    assert!(is_whiteout(&l.upper.p("f")), "the lower f must stay whited out");
    // dir: rm -rf, mkdir, rmdir
    fs::remove_dir_all(m.p("d")).unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::remove_dir(m.p("d")).unwrap();
    assert_errno(fs::symlink_metadata(m.p("d")), libc::ENOENT, "d after rm -rf, mkdir, rmdir");
    // an upper file renamed over a lower file, then unlinked
    fs::write(m.p("tmp"), "t").unwrap();
    fs::rename(m.p("tmp"), m.p("g")).unwrap();
    assert_eq!(read_string(&m.p("g")), "t");
    fs::remove_file(m.p("g")).unwrap();
    assert_errno(fs::read(m.p("g")), libc::ENOENT, "g after rename-over and unlink");
    // a lower file renamed away, then a new file at its name, then renamed away again
    fs::rename(m.p("h"), m.p("h1")).unwrap();
    fs::write(m.p("h"), "second").unwrap();
    fs::rename(m.p("h"), m.p("h2")).unwrap();
    assert_errno(fs::read(m.p("h")), libc::ENOENT, "h after two renames away");
    assert_eq!(ls(&m.p("")), ["h1", "h2"]);
    m.umount();
    let m = StrataMount::mount(&l);
    assert_eq!(ls(&m.p("")), ["h1", "h2"], "after a remount");
    assert_eq!(read_string(&m.p("h1")), "lower-h");
}

#[test]
fn concurrent_writers_to_one_lower_file_lose_nothing() {
    let l = Layers::new(1);
    for i in 0..4 {
        l.lower(0).file(&format!("f{i}"), "base\n");
    }
    let m = StrataMount::mount(&l);
    std::thread::scope(|s| {
        for t in 0..8 {
            let m = &m;
            s.spawn(move || {
                for i in 0..4 {
                    append(&m.p(&format!("f{i}")), format!("line from thread {t}\n").as_bytes()).expect("append");
                }
            });
        }
    });
    for i in 0..4 {
        let content = read_string(&m.p(&format!("f{i}")));
        assert!(content.starts_with("base\n"), "f{i}: lost the lower content: {content:?}");
        for t in 0..8 {
            assert!(
                content.contains(&format!("line from thread {t}\n")),
                "f{i}: racing copy-ups lost thread {t}'s write: {content:?}"
            );
        }
        assert_eq!(content.lines().count(), 9, "f{i}: {content:?}");
    }
}

#[test]
fn mmap_shared_write_on_a_lower_file() {
    let l = Layers::new(1);
    l.lower(0).file("f", vec![b'a'; 8192]);
    let m = StrataMount::mount(&l);
    let f = fs::OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    // SAFETY: mapping 8192 bytes of an open file; unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap MAP_SHARED: {}", std::io::Error::last_os_error());
        let bytes = std::slice::from_raw_parts_mut(p.cast::<u8>(), 8192);
        assert_eq!(bytes[0], b'a');
        bytes[0] = b'Z';
        bytes[8191] = b'Y';
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0, "msync: {}", std::io::Error::last_os_error());
        libc::munmap(p, 8192);
    }
    drop(f);
    let data = fs::read(m.p("f")).unwrap();
    assert_eq!((data[0], data[1], data[8191]), (b'Z', b'a', b'Y'));
    let up = fs::read(l.upper.p("f")).expect("copied up");
    assert_eq!((up[0], up[8191]), (b'Z', b'Y'));
    assert_eq!(fs::read(l.lower(0).p("f")).unwrap()[0], b'a');
}

#[test]
fn large_write_read_roundtrip() {
    let l = Layers::new(1);
    let mut data = vec![0u8; 8 << 20];
    let mut x: u32 = 12345;
    for b in data.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    l.lower(0).file("big", &data);
    let m = StrataMount::mount(&l);
    assert_eq!(sha256_file(&m.p("big")).unwrap(), sha256_hex(&data), "reading a lower file");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(m.p("big")).unwrap();
        f.write_all_at(&[1u8; 300_000], 3_000_001).unwrap();
        data[3_000_001..3_300_001].fill(1);
        f.write_all_at(b"end", (8 << 20) - 3).unwrap();
        data[(8 << 20) - 3..].copy_from_slice(b"end");
        f.write_all_at(b"past", (8 << 20) + 10).unwrap();
        data.extend_from_slice(&[0; 10]);
        data.extend_from_slice(b"past");
    }
    assert_eq!(sha256_file(&m.p("big")).unwrap(), sha256_hex(&data), "reading back through the mount");
    assert_eq!(sha256_file(&l.upper.p("big")).unwrap(), sha256_hex(&data), "the upper copy");
}

#[test]
fn non_root_user_copy_up_and_permission_checks() {
    let l = Layers::new(1);
    l.lower(0)
        .file_mode("home/u/own", "mine", 0o644)
        .owner("home/u/own", 1000, 1000)
        .owner("home/u", 1000, 1000)
        .mode("home/u", 0o700)
        .file_mode("home/u/roots", "root's", 0o644)
        .dir("tmp")
        .mode("tmp", 0o1777)
        .file_mode("tmp/other", "other", 0o666)
        .owner("tmp/other", 2000, 2000)
        .file_mode("etc/conf", "conf", 0o644);
    let m = StrataMount::mount(&l);
    let p = |r: &str| m.p(r).display().to_string();
    let ok = |script: String| {
        let o = sh_as_user(1000, 1000, &script);
        assert!(o.success(), "as uid 1000: `{script}` failed: {}", o.stderr);
    };
    let denied = |script: String| {
        let o = sh_as_user(1000, 1000, &script);
        assert!(!o.success(), "as uid 1000: `{script}` must be denied");
    };
    ok(format!("echo more >> {}", p("home/u/own")));
    ok(format!("chmod 600 {}", p("home/u/own")));
    ok(format!("touch -d @1000000 {}", p("home/u/own")));
    ok(format!("mkdir {}", p("home/u/sub")));
    ok(format!("mv {} {}", p("home/u/roots"), p("home/u/moved")));
    denied(format!("chown 0 {}", p("home/u/own")));
    denied(format!("echo x >> {}", p("etc/conf")));
    denied(format!("rm {}", p("tmp/other")));
    denied(format!("touch {}", p("etc/new")));
    denied(format!("chmod 777 {}", p("etc/conf")));
    let um = fs::metadata(l.upper.p("home/u/own")).expect("copied up by a non-root write");
    assert_eq!((um.uid(), um.gid(), um.mode() & 0o7777), (1000, 1000, 0o600));
    assert_eq!(um.mtime(), 1_000_000);
    assert_eq!(read_string(&l.upper.p("home/u/own")), "minemore\n");
    let dm = fs::metadata(l.upper.p("home/u")).unwrap();
    assert_eq!((dm.uid(), dm.gid(), dm.mode() & 0o7777), (1000, 1000, 0o700), "copied-up parent keeps owner and mode");
    assert_eq!(fs::metadata(m.p("home/u/sub")).unwrap().uid(), 1000);
    assert_eq!(read_string(&m.p("etc/conf")), "conf");
    assert_eq!(read_string(&m.p("tmp/other")), "other");
    assert!(absent(&l.upper.p("etc/new")));
}

#[test]
fn chown_clears_suid_and_write_clears_capability() {
    let l = Layers::new(1);
    let mut cap = Vec::new();
    for w in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    l.lower(0).file_mode("suid", "s", 0o4755).file_mode("capped", "c", 0o755).xattr(
        "capped",
        "security.capability",
        &cap,
    );
    let m = StrataMount::mount(&l);
    lchown(&m.p("suid"), 5, 5).unwrap();
    assert_eq!(fs::metadata(m.p("suid")).unwrap().mode() & 0o7777, 0o755, "chown must clear suid");
    assert_eq!(lgetxattr(&m.p("capped"), "security.capability").unwrap(), cap);
    append(&m.p("capped"), b"more").unwrap();
    assert!(lgetxattr(&m.p("capped"), "security.capability").is_err(), "a write must remove security.capability");
    assert!(lgetxattr(&l.upper.p("capped"), "security.capability").is_err(), "and in the upper");
    assert_eq!(lgetxattr(&l.lower(0).p("capped"), "security.capability").unwrap(), cap, "lower untouched");
}

#[test]
fn hard_link_counts_follow_link_and_unlink() {
    let l = Layers::new(1);
    l.lower(0).file("a", "one").hardlink("a", "b").file("solo", "s");
    let m = StrataMount::mount(&l);
    let nlink = |n: &str| fs::metadata(m.p(n)).unwrap().nlink();
    fs::hard_link(m.p("a"), m.p("c")).expect("link to a lower hard link");
    assert_eq!((nlink("a"), nlink("b"), nlink("c")), (3, 3, 3), "st_nlink after a third link");
    append(&m.p("c"), b" two").unwrap();
    assert_eq!(read_string(&m.p("b")), "one two", "write via the new link, read via an old one");
    fs::remove_file(m.p("a")).unwrap();
    assert_eq!((nlink("b"), nlink("c")), (2, 2), "st_nlink after unlinking one name");
    assert_eq!(fs::metadata(m.p("b")).unwrap().ino(), fs::metadata(m.p("c")).unwrap().ino());
    fs::hard_link(m.p("solo"), m.p("solo2")).unwrap();
    fs::remove_file(m.p("solo")).unwrap();
    assert_eq!(nlink("solo2"), 1, "st_nlink of a link whose other name is gone");
    assert_eq!(read_string(&m.p("solo2")), "s");
    assert_errno(fs::read(m.p("solo")), libc::ENOENT, "unlinked name");
}

#[test]
fn error_codes_match_posix() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x").file("d/x", "x").dir("e").dir("d/sub").symlink("s", "f");
    let m = StrataMount::mount(&l);
    assert_errno(fs::rename(m.p("f"), m.p("e")), libc::EISDIR, "rename a file over a dir");
    assert_errno(fs::rename(m.p("e"), m.p("f")), libc::ENOTDIR, "rename a dir over a file");
    assert_errno(fs::rename(m.p("d"), m.p("d/sub/inside")), libc::EINVAL, "rename a dir into itself");
    assert_errno(fs::rename(m.p("e"), m.p("d")), libc::ENOTEMPTY, "rename a dir over a non-empty dir");
    assert_errno(fs::remove_dir(m.p("f")), libc::ENOTDIR, "rmdir of a file");
    assert_errno(fs::remove_file(m.p("d")), libc::EISDIR, "unlink of a dir");
    assert_errno(fs::create_dir(m.p("f")), libc::EEXIST, "mkdir over a file");
    assert_errno(fs::hard_link(m.p("d"), m.p("dlink")), libc::EPERM, "link of a dir");
    assert_errno(fs::write(m.p("f/x"), "x"), libc::ENOTDIR, "create below a file");
    assert_errno(fs::read_link(m.p("f")), libc::EINVAL, "readlink of a file");
    assert_errno(fs::remove_dir(m.p("nope")), libc::ENOENT, "rmdir of a missing name");
    assert_errno(fs::rename(m.p("nope"), m.p("nope2")), libc::ENOENT, "rename of a missing name");
    let long = "n".repeat(256);
    assert_errno(fs::write(m.p(&long), "x"), libc::ENAMETOOLONG, "a 256-byte name");
    assert_eq!(ls(&m.p("")), ["d", "e", "f", "s"], "nothing changed");
    assert_eq!(ls(&m.p("d")), ["sub", "x"]);
}

// ---------------------------------------------------------------------------
// Unprivileged mounts
// ---------------------------------------------------------------------------

#[test]
fn unprivileged_mount_writes_user_xattr_markers() {
    // Needs a /dev/fuse that other users may open (0666, the usual default).
    if !sh_as_user(1000, 1000, "test -r /dev/fuse -a -w /dev/fuse").success() {
        eprintln!("SKIPPED: uid 1000 cannot open /dev/fuse (chmod 0666 /dev/fuse to run this test)");
        return;
    }
    let l = Layers::new(1);
    l.lower(0).file("d/f", "f").file("d/g", "g").file("e/x", "x").file("h", "h");
    sh(&format!("chown -R 1000:1000 {}", l.root().display()));
    let bin = strata_bin();
    let (lo, up, wk, mp) = (l.lower(0).path.display(), l.upper.path.display(), l.work.display(), l.mnt.display());
    let o = sh_as_user(1000, 1000, &format!("{} mount --lower {lo} --upper {up} --work {wk} {mp}", bin.display()));
    let guard = StrataMount::adopt(&l.mnt);
    assert!(o.success(), "strata mount as uid 1000: {o:?}");
    assert!(is_mounted(&l.mnt));
    // Only the mounting user may use a non-allow_other FUSE mount: act as uid 1000.
    let o = sh_as_user(
        1000,
        1000,
        &format!("rm {mp}/d/f && rm -r {mp}/e && mkdir {mp}/e && touch {mp}/e/new && rm {mp}/h && ls {mp}/d {mp}/e"),
    );
    assert!(o.success(), "changes as uid 1000: {o:?}");
    assert_eq!(o.stdout, format!("{mp}/d:\ng\n\n{mp}/e:\nnew\n"));
    let o = sh_as_user(1000, 1000, &format!("{} umount {mp}", bin.display()));
    assert!(o.success(), "strata umount as uid 1000: {o:?}");
    drop(guard);
    // On disk: user.overlay.* xattr markers (the issue's format) or char 0/0
    // whiteouts (which Linux >= 5.8 lets any user make); never .wh. files.
    for wh in ["d/f", "h"] {
        let p = l.upper.p(wh);
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("no whiteout for {wh} in the upper: {e}"));
        if is_whiteout(&p) {
            eprintln!(
                "note: {wh}: char 0/0 whiteout written by an unprivileged mount (the issue asks for xattr whiteouts)"
            );
            continue;
        }
        assert!(
            md.is_file() && md.len() == 0,
            "{wh}: an xattr whiteout is an empty regular file, got {:?}",
            md.file_type()
        );
        assert!(lgetxattr(&p, "user.overlay.whiteout").is_ok(), "{wh}: missing user.overlay.whiteout");
        let parent = p.parent().unwrap();
        assert_eq!(
            lgetxattr(parent, "user.overlay.opaque").ok().as_deref(),
            Some(&b"x"[..]),
            "{wh}: parent needs user.overlay.opaque=x"
        );
    }
    assert_eq!(lgetxattr(&l.upper.p("e"), "user.overlay.opaque").ok().as_deref(), Some(&b"y"[..]), "e: opaque dir");
    let mut stack = vec![l.upper.path.clone()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with(".wh."), "OCI whiteout written by an unprivileged mount: {}", e.path().display());
            let ft = e.file_type().unwrap();
            assert!(
                !ft.is_char_device() || is_whiteout(&e.path()),
                "device node written by an unprivileged mount: {}",
                e.path().display()
            );
            if ft.is_dir() {
                stack.push(e.path());
            }
        }
    }
    // The kernel (userxattr) reads that upper the same way, used as a layer.
    let km = KernelOverlay::mount(&[l.upper.path.clone(), l.lower(0).path.clone()], None, "userxattr", &l.mnt);
    assert_eq!(ls(&km.p("")), ["d", "e"]);
    assert_eq!(ls(&km.p("d")), ["g"]);
    assert_eq!(ls(&km.p("e")), ["new"]);
}

/// uidmapping/gidmapping (fuse-overlayfs's meaning): ids stored in the
/// layers are shown shifted, and what a caller creates or chowns is stored
/// shifted back; squash_to_* show one id for all.
#[test]
fn uid_and_gid_mappings_shift_ownership_both_ways() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x").owner("f", 1000, 1000).dir("d").mode("d", 0o777);
    let opts = format!("{},uidmapping=0:100000:65536,gidmapping=0:200000:65536", l.overlay_opts());
    let m = StrataMount::mount_opts(&opts, &l.mnt);
    let meta = fs::symlink_metadata(m.p("f")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (101000, 201000), "stored 1000 is shown shifted");
    let o = sh_as_user(100007, 200007, &format!("touch '{}'", m.p("d/new").display()));
    assert!(o.success(), "{}", o.stderr);
    let stored = fs::symlink_metadata(l.upper.p("d/new")).unwrap();
    assert_eq!((stored.uid(), stored.gid()), (7, 7), "a new file is stored with the unshifted ids");
    let shown = fs::symlink_metadata(m.p("d/new")).unwrap();
    assert_eq!((shown.uid(), shown.gid()), (100007, 200007));
    lchown(&m.p("f"), 100005, 200006).unwrap();
    let stored = fs::symlink_metadata(l.upper.p("f")).unwrap();
    assert_eq!((stored.uid(), stored.gid()), (5, 6), "chown stores the unshifted ids");
    drop(m);

    let squashed = StrataMount::mount_opts(&format!("{},squash_to_root", l.overlay_opts()), &l.mnt);
    let meta = fs::symlink_metadata(squashed.p("d/new")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "squash_to_root shows every file as root's");
}

/// fstat and fchmod of a file whose last name is gone reach it through an
/// open descriptor (the kernel sends no handle with fstat); pjdfstest
/// unlink/14.t found this.
#[test]
fn fstat_and_fchmod_of_an_unlinked_open_file() {
    let l = Layers::new(1);
    l.lower(0).file("lower", "from below");
    let m = StrataMount::mount(&l);
    fs::write(m.p("new"), "Hello").unwrap();
    for name in ["new", "lower"] {
        let f = fs::OpenOptions::new().read(true).write(name == "new").open(m.p(name)).unwrap();
        fs::remove_file(m.p(name)).unwrap();
        let meta = f.metadata().expect("fstat of an unlinked open file");
        assert!(meta.len() > 0, "{name}: size survives unlink");
        if name == "new" {
            assert_eq!(meta.nlink(), 0, "an unlinked file has no links");
            f.set_permissions(fs::Permissions::from_mode(0o600)).expect("fchmod of an unlinked open file");
            assert_eq!(f.metadata().unwrap().mode() & 0o7777, 0o600);
        }
    }
}
