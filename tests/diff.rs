//! `strata diff`: operations in a real mount, then the exact output, checked
//! three ways (the live mount, the layers on disk, `-o`) and against a plain
//! two-tree comparison of the mounted image and container views.

mod common;
mod diff_common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use common::*;
use diff_common::*;

fn sh_in(mnt: &Path, script: &str) {
    let o = run(Command::new("sh").arg("-c").arg(script).current_dir(mnt), std::time::Duration::from_secs(30));
    assert!(o.success(), "`{script}` failed: {o:?}");
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

// ----- the issue's examples --------------------------------------------------

#[test]
fn issue_example_replace_directory() {
    scenario(
        base_image,
        |m| sh_in(m, "rm -rf opt/app && mkdir opt/app && echo n > opt/app/new"),
        &["C /opt", "C /opt/app", "A /opt/app/new", "D /opt/app/old1", "D /opt/app/old2", "D /opt/app/sub"],
    );
}

#[test]
fn touch_directory_alone_is_no_change() {
    scenario(base_image, |m| sh_in(m, "touch etc"), &[]);
}

#[test]
fn chmod_directory() {
    scenario(base_image, |m| chmod(&m.join("etc"), 0o700), &["C /etc"]);
}

#[test]
fn nothing_done() {
    scenario(base_image, |_| {}, &[]);
}

// ----- files ---------------------------------------------------------------

#[test]
fn new_file_in_existing_directory() {
    scenario(base_image, |m| fs::write(m.join("etc/new"), "x").unwrap(), &["C /etc", "A /etc/new"]);
}

#[test]
fn new_file_at_root_has_no_root_line() {
    scenario(base_image, |m| fs::write(m.join("newfile"), "x").unwrap(), &["A /newfile"]);
}

#[test]
fn append_to_file() {
    scenario(base_image, |m| append(&m.join("etc/a"), b"more").unwrap(), &["C /etc", "C /etc/a"]);
}

#[test]
fn content_is_not_compared() {
    // Same size, and the old mtime put back: docker sees no change.
    scenario(
        base_image,
        |m| {
            fs::write(m.join("etc/a"), "b\n").unwrap();
            set_times(&m.join("etc/a"), (T0, 123_456_789), (T0, 123_456_789)).unwrap();
        },
        &[],
    );
}

#[test]
fn same_second_with_zero_nanoseconds_is_the_same_time() {
    scenario(base_image, |m| set_times(&m.join("etc/a"), (T0, 0), (T0, 0)).unwrap(), &[]);
}

#[test]
fn touch_file() {
    scenario(base_image, |m| sh_in(m, "touch etc/a"), &["C /etc", "C /etc/a"]);
}

#[test]
fn chown_file() {
    scenario(base_image, |m| lchown(&m.join("etc/hosts"), 1000, 1000).unwrap(), &["C /etc", "C /etc/hosts"]);
}

#[test]
fn setuid_bit() {
    scenario(base_image, |m| chmod(&m.join("usr/bin/ping"), 0o4755), &["C /usr", "C /usr/bin", "C /usr/bin/ping"]);
}

#[test]
fn copy_up_alone_is_no_change() {
    // A user xattr copies the file up; docker compares only capabilities.
    scenario(base_image, |m| lsetxattr(&m.join("etc/hosts"), "user.note", b"x").unwrap(), &[]);
}

#[test]
fn chmod_to_same_mode_is_no_change() {
    scenario(
        base_image,
        |m| {
            chmod(&m.join("opt/app"), 0o755);
            chmod(&m.join("opt/app/old1"), 0o644);
        },
        &[],
    );
}

#[test]
fn file_capability_added() {
    // vfs_cap_data revision 2: cap_net_raw permitted.
    let cap: [u8; 20] = [0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    scenario(
        base_image,
        |m| lsetxattr(&m.join("usr/bin/ping"), "security.capability", &cap).unwrap(),
        &["C /usr", "C /usr/bin", "C /usr/bin/ping"],
    );
}

#[test]
fn delete_file() {
    scenario(base_image, |m| fs::remove_file(m.join("etc/a")).unwrap(), &["C /etc", "D /etc/a"]);
}

#[test]
fn recreate_file_over_whiteout() {
    scenario(
        base_image,
        |m| {
            fs::remove_file(m.join("etc/a")).unwrap();
            fs::write(m.join("etc/a"), "new content\n").unwrap();
        },
        &["C /etc", "C /etc/a"],
    );
}

#[test]
fn siblings_in_byte_order() {
    scenario(
        base_image,
        |m| {
            for name in ["a2", "B", "_x", "Z", "a-b", "ä"] {
                fs::write(m.join("etc").join(name), "").unwrap();
            }
        },
        &["C /etc", "A /etc/B", "A /etc/Z", "A /etc/_x", "A /etc/a-b", "A /etc/a2", "A /etc/ä"],
    );
}

// ----- directories ---------------------------------------------------------

#[test]
fn new_directory_tree() {
    scenario(
        base_image,
        |m| sh_in(m, "mkdir -p newdir/sub && echo f > newdir/f && echo g > newdir/sub/g"),
        &["A /newdir", "A /newdir/f", "A /newdir/sub", "A /newdir/sub/g"],
    );
}

#[test]
fn deep_new_file_marks_every_ancestor() {
    scenario(
        base_image,
        |m| sh_in(m, "mkdir -p opt/app/sub/c && echo d > opt/app/sub/c/d"),
        &["C /opt", "C /opt/app", "C /opt/app/sub", "A /opt/app/sub/c", "A /opt/app/sub/c/d"],
    );
}

#[test]
fn rm_rf_directory_is_one_line() {
    scenario(base_image, |m| fs::remove_dir_all(m.join("opt/app")).unwrap(), &["C /opt", "D /opt/app"]);
}

#[test]
fn recreate_empty_directory_over_whiteout() {
    scenario(
        base_image,
        |m| sh_in(m, "rm -rf opt/app && mkdir opt/app"),
        &["C /opt", "C /opt/app", "D /opt/app/old1", "D /opt/app/old2", "D /opt/app/sub"],
    );
}

#[test]
fn deletions_follow_present_children() {
    scenario(
        base_image,
        |m| sh_in(m, "rm opt/app/old1 && echo z > opt/app/zz && echo a > opt/app/aa"),
        &["C /opt", "C /opt/app", "A /opt/app/aa", "A /opt/app/zz", "D /opt/app/old1"],
    );
}

#[test]
fn file_becomes_directory() {
    scenario(
        base_image,
        |m| sh_in(m, "rm etc/a && mkdir etc/a && touch etc/a/x"),
        &["C /etc", "C /etc/a", "A /etc/a/x"],
    );
}

#[test]
fn directory_becomes_file() {
    scenario(base_image, |m| sh_in(m, "rm -rf opt/app && echo f > opt/app"), &["C /opt", "C /opt/app"]);
}

// ----- special files -------------------------------------------------------

#[test]
fn new_symlink() {
    scenario(base_image, |m| symlink("hosts", m.join("etc/hl")).unwrap(), &["C /etc", "A /etc/hl"]);
}

#[test]
fn replace_symlink_target() {
    scenario(base_image, |m| sh_in(m, "ln -sfn hosts etc/link"), &["C /etc", "C /etc/link"]);
}

#[test]
fn new_hard_link() {
    scenario(base_image, |m| fs::hard_link(m.join("etc/a"), m.join("etc/a2")).unwrap(), &["C /etc", "A /etc/a2"]);
}

#[test]
fn new_fifo() {
    scenario(base_image, |m| mkfifo(&m.join("run/ctl"), 0o600).unwrap(), &["C /run", "A /run/ctl"]);
}

#[test]
fn new_device_node() {
    scenario(
        base_image,
        |m| mknod(&m.join("srv/null"), libc::S_IFCHR, 0o666, 1, 3).unwrap(),
        &["C /srv", "A /srv/null"],
    );
}

// ----- renames -------------------------------------------------------------

#[test]
fn rename_file_in_directory() {
    scenario(
        base_image,
        |m| fs::rename(m.join("etc/a"), m.join("etc/z")).unwrap(),
        &["C /etc", "A /etc/z", "D /etc/a"],
    );
}

#[test]
fn rename_file_across_directories() {
    scenario(
        base_image,
        |m| fs::rename(m.join("etc/hosts"), m.join("opt/hosts")).unwrap(),
        &["C /etc", "D /etc/hosts", "C /opt", "A /opt/hosts"],
    );
}

#[test]
fn rename_directory_with_lower_content() {
    scenario(
        base_image,
        |m| fs::rename(m.join("opt/app"), m.join("srv/app")).unwrap(),
        &[
            "C /opt",
            "D /opt/app",
            "C /srv",
            "A /srv/app",
            "A /srv/app/old1",
            "A /srv/app/old2",
            "A /srv/app/sub",
            "A /srv/app/sub/x",
        ],
    );
}

#[test]
fn rename_directory_in_place() {
    scenario(
        base_image,
        |m| fs::rename(m.join("opt/app"), m.join("opt/zap")).unwrap(),
        &[
            "C /opt",
            "A /opt/zap",
            "A /opt/zap/old1",
            "A /opt/zap/old2",
            "A /opt/zap/sub",
            "A /opt/zap/sub/x",
            "D /opt/app",
        ],
    );
}

#[test]
fn renamed_directory_then_changed_inside() {
    scenario(
        base_image,
        |m| {
            fs::rename(m.join("opt/app"), m.join("srv/app")).unwrap();
            fs::remove_file(m.join("srv/app/old1")).unwrap();
            fs::write(m.join("srv/app/sub/w"), "w").unwrap();
        },
        &[
            "C /opt",
            "D /opt/app",
            "C /srv",
            "A /srv/app",
            "A /srv/app/old2",
            "A /srv/app/sub",
            "A /srv/app/sub/w",
            "A /srv/app/sub/x",
        ],
    );
}

#[test]
fn directory_swapped_for_another() {
    // /opt/app now holds what /opt/other held: a redirect to other lower
    // content at a path the image also has.
    scenario(
        base_image,
        |m| {
            fs::rename(m.join("opt/app"), m.join("tmp/app")).unwrap();
            fs::rename(m.join("opt/other"), m.join("opt/app")).unwrap();
        },
        &[
            "C /opt",
            "C /opt/app",
            "A /opt/app/y",
            "D /opt/app/old1",
            "D /opt/app/old2",
            "D /opt/app/sub",
            "D /opt/other",
            "C /tmp",
            "A /tmp/app",
            "A /tmp/app/old1",
            "A /tmp/app/old2",
            "A /tmp/app/sub",
            "A /tmp/app/sub/x",
        ],
    );
}

#[test]
fn rename_directory_and_back() {
    scenario(
        base_image,
        |m| {
            fs::rename(m.join("opt/app"), m.join("opt/tmp")).unwrap();
            fs::rename(m.join("opt/tmp"), m.join("opt/app")).unwrap();
        },
        &[],
    );
}

// ----- what the lower layers say -------------------------------------------

#[test]
fn opaque_directory_in_lower_hides_older_content() {
    // /data/old is hidden by the opaque /data of lower0: not in the image.
    scenario(
        base_image,
        |m| {
            assert!(absent(&m.join("data/old")));
            fs::write(m.join("data/more"), "m").unwrap();
            fs::remove_file(m.join("data/new")).unwrap();
        },
        &["C /data", "A /data/more", "D /data/new"],
    );
}

#[test]
fn name_whited_out_in_lower_is_added() {
    scenario(base_image, |m| fs::write(m.join("var/gone"), "back").unwrap(), &["C /var", "A /var/gone"]);
}

#[test]
fn oci_whiteout_and_opaque_marker_in_lower() {
    scenario(
        |l| {
            l.lower(1).file("lib/keep", "k").file("lib/drop", "d").file("cache/old", "o");
            l.lower(0).oci_whiteout("lib/drop").oci_opaque("cache").file("cache/fresh", "f");
            fix_times(&l.lower(0).path);
            fix_times(&l.lower(1).path);
        },
        |m| {
            assert!(absent(&m.join("lib/drop")) && absent(&m.join("cache/old")));
            fs::write(m.join("lib/drop"), "again").unwrap();
            fs::write(m.join("cache/old"), "again").unwrap();
            fs::remove_file(m.join("lib/keep")).unwrap();
        },
        &["C /cache", "A /cache/old", "C /lib", "A /lib/drop", "D /lib/keep"],
    );
}

#[test]
fn delete_from_bottom_layer_of_merged_directory() {
    scenario(
        base_image,
        |m| {
            fs::remove_file(m.join("etc/hosts")).unwrap();
            fs::remove_file(m.join("etc/b.conf")).unwrap();
        },
        &["C /etc", "D /etc/b.conf", "D /etc/hosts"],
    );
}

#[test]
fn delete_everything_at_root() {
    scenario(
        |l| {
            l.lower(1).file("a", "a").file("d/e", "e");
            fix_times(&l.lower(1).path);
        },
        |m| sh_in(m, "rm -rf a d && mkdir d2"),
        &["A /d2", "D /a", "D /d"],
    );
}

#[test]
fn long_and_odd_names() {
    let long = "n".repeat(200);
    let expected_long = format!("A /etc/{long}");
    let expected: Vec<&str> = vec!["C /etc", "A /etc/a b", expected_long.as_str()];
    scenario(
        base_image,
        |m| {
            fs::write(m.join("etc/a b"), "").unwrap();
            fs::write(m.join("etc").join(&long), "").unwrap();
        },
        &expected,
    );
}

// ----- formats and errors --------------------------------------------------

#[test]
fn json_and_summary() {
    let l = scenario(
        base_image,
        |m| sh_in(m, "echo hello > etc/new && ln etc/new etc/new2 && rm etc/a"),
        &["C /etc", "A /etc/new", "A /etc/new2", "D /etc/a"],
    );
    let mut args = offline_args(&l);
    args.extend(["--format".to_string(), "json".to_string()]);
    let json: serde_json::Value = serde_json::from_str(&diff_output(&args)).expect("valid JSON");
    assert_eq!(
        json,
        serde_json::json!([
            {"path": "/etc", "kind": "C"},
            {"path": "/etc/new", "kind": "A"},
            {"path": "/etc/new2", "kind": "A"},
            {"path": "/etc/a", "kind": "D"}
        ])
    );
    let mut args = offline_args(&l);
    args.push("--summary".to_string());
    // Two names of one 6-byte file count once.
    assert_eq!(diff_output(&args), "2 added, 1 changed, 1 deleted; 6 bytes in added and changed files\n");
    let mut args = offline_args(&l);
    args.extend(["--color".to_string(), "always".to_string()]);
    assert_eq!(
        diff_output(&args),
        "\x1b[33mC /etc\x1b[0m\n\x1b[32mA /etc/new\x1b[0m\n\x1b[32mA /etc/new2\x1b[0m\n\x1b[31mD /etc/a\x1b[0m\n"
    );
}

#[test]
fn errors_name_the_culprit() {
    let l = Layers::new(1);
    let fail = |args: &[&str], needle: &str| {
        let mut full = vec!["diff"];
        full.extend_from_slice(args);
        let o = strata(&full);
        assert!(!o.success(), "strata {full:?} must fail");
        assert!(o.stderr.contains(needle), "strata {full:?}: stderr {:?} must mention {needle:?}", o.stderr);
        assert!(!o.stderr.contains("panicked"));
    };
    fail(&["/proc"], "not a Strata mount");
    fail(&[&s(&l.mnt)], "not a mount point");
    fail(&[], "give a Strata mount point");
    let upper = s(&l.upper.path);
    fail(&["--lower", "/nonexistent-layer", "--upper", &upper], "/nonexistent-layer");
    fail(&["--lower", &s(&l.lower(0).path)], "no upper");
    fail(&["--lower", &s(&l.lower(0).path), "--upper", "/etc/hostname"], "not a directory");
    let _one_at_a_time = mount_lock();
    let m = StrataMount::mount(&l);
    fail(&[&s(&m.mnt), "--upper", &upper], "not both");
    m.umount();
    let ro = StrataMount::mount_ro(&l);
    fail(&[&s(&ro.mnt)], "read-only");
    ro.umount();
}

#[test]
fn nested_renames() {
    scenario(
        base_image,
        |m| {
            fs::rename(m.join("opt/app"), m.join("opt/app2")).unwrap();
            fs::rename(m.join("opt/app2/sub"), m.join("opt/app2/sub2")).unwrap();
            fs::rename(m.join("opt/app2"), m.join("srv/app3")).unwrap();
            fs::write(m.join("srv/app3/sub2/w"), "w").unwrap();
        },
        &[
            "C /opt",
            "D /opt/app",
            "C /srv",
            "A /srv/app3",
            "A /srv/app3/old1",
            "A /srv/app3/old2",
            "A /srv/app3/sub2",
            "A /srv/app3/sub2/w",
            "A /srv/app3/sub2/x",
        ],
    );
}
