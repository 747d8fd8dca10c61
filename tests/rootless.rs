//! Rootless: Strata inside a user namespace (`unshare -Urm`), where
//! `trusted.*` xattrs cannot be written. It must mark the upper with
//! `user.overlay.*` xattrs, which the kernel's overlayfs reads with
//! `userxattr`, and the result must read the same under the kernel.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Every xattr name found on the upper tree, with the paths carrying it.
fn upper_xattr_names(upper: &Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut stack = vec![upper.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            for name in llistxattr(&path).unwrap_or_default() {
                found.push((path.strip_prefix(upper).unwrap().display().to_string(), name));
            }
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn rootless_mount_marks_the_upper_with_user_xattrs_the_kernel_reads() {
    let l = Layers::new(1);
    l.lower(0).file("a", "lower a\n").file("d/b", "b").file("d/c", "c").file("keep/x", "x").file("keep/sub/y", "y");
    let strata = strata_bin();
    let script = format!(
        "set -e\n\
         S='{strata}'\n\
         \"$S\" mount --lower '{lower}' --upper '{upper}' --work '{work}' '{mnt}'\n\
         echo appended >> '{mnt}/a'\n\
         rm '{mnt}/keep/x'\n\
         rm -rf '{mnt}/d'\n\
         mkdir '{mnt}/d'\n\
         echo new > '{mnt}/d/new'\n\
         mv '{mnt}/keep' '{mnt}/moved'\n\
         \"$S\" umount '{mnt}'\n",
        strata = strata.display(),
        lower = l.lower(0).p("").display(),
        upper = l.upper.p("").display(),
        work = l.work.display(),
        mnt = l.mnt.display(),
    );
    let o = run(std::process::Command::new("unshare").args(["-Urm", "sh", "-c", &script]), Duration::from_secs(60));
    assert!(o.success(), "rootless session failed: {o:?}");
    assert!(!is_mounted(&l.mnt));

    let names = upper_xattr_names(&l.upper.p(""));
    assert!(
        names.iter().all(|(_, name)| !name.starts_with("trusted.")),
        "no trusted.* xattr can be written in a user namespace: {names:?}"
    );
    assert!(names.contains(&("d".to_string(), "user.overlay.opaque".to_string())), "{names:?}");
    assert!(
        names.iter().all(|(_, name)| name != "user.overlay.redirect"),
        "rootless, a renamed directory is copied up whole rather than redirected: {names:?}"
    );
    assert!(names.contains(&("moved".to_string(), "user.overlay.opaque".to_string())), "{names:?}");
    assert_eq!(lgetxattr(&l.upper.p("d"), "user.overlay.opaque").unwrap(), b"y");

    // The kernel's overlayfs, told to use user.* markers, shows the tree
    // the rootless mount made.
    let k = KernelOverlay::mount(&l.lower_paths(), Some((&l.upper.p(""), &l.work)), "userxattr", &l.mnt);
    assert_eq!(read_string(&k.p("a")), "lower a\nappended\n");
    assert_eq!(ls(&k.p("d")), vec!["new".to_string()], "the re-created directory is opaque");
    assert_eq!(ls(&k.p("moved")), vec!["sub".to_string()], "x was deleted before the rename");
    assert_eq!(read_string(&k.p("moved/sub/y")), "y", "the renamed directory keeps its content");
    assert!(absent(&k.p("keep")), "the old name of a renamed directory is whited out");
}
