//! The command line: bad input, the three invocation forms, the option quirks
//! of containers-storage and fuse-overlayfs users, and daemon lifetime.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs `strata ARGS`, expecting a clean failure that names `culprits` (any of them).
#[track_caller]
fn expect_failure(args: &[String], mnt: &Path, culprits: &[&str]) {
    let o = strata(args);
    let mounted = is_mounted(mnt);
    if mounted {
        force_cleanup(mnt);
    }
    assert!(o.status.is_some(), "strata {} did not exit within 30 s", args.join(" "));
    assert!(!o.success(), "strata {} must fail; stderr: {}", args.join(" "), o.stderr);
    assert!(!mounted, "strata {} failed but left {} mounted", args.join(" "), mnt.display());
    let err = o.stderr.trim();
    assert!(!err.is_empty(), "strata {} failed without a message on stderr", args.join(" "));
    assert!(
        culprits.iter().any(|c| err.contains(c)),
        "stderr of strata {} must name the culprit ({culprits:?}); got: {err}",
        args.join(" ")
    );
    assert!(!err.contains("panicked"), "a bad argument must not panic: {err}");
    assert!(
        wait_for(Duration::from_secs(2), || daemon_pids(mnt).is_empty()),
        "a failed mount left a daemon running: {:?}",
        daemon_pids(mnt)
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn mount_args(lowers: &[&Path], upper: Option<&Path>, work: Option<&Path>, mnt: &Path) -> Vec<String> {
    let mut a = vec!["mount".to_string()];
    for l in lowers {
        a.push("--lower".into());
        a.push(s(l));
    }
    if let Some(u) = upper {
        a.push("--upper".into());
        a.push(s(u));
    }
    if let Some(w) = work {
        a.push("--work".into());
        a.push(s(w));
    }
    a.push(s(mnt));
    a
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

#[test]
fn missing_lower_is_rejected() {
    let l = Layers::new(1);
    let missing = l.root().join("no-such-lower");
    let args = mount_args(&[&l.lower(0).path, &missing], Some(&l.upper.path), Some(&l.work), &l.mnt);
    expect_failure(&args, &l.mnt, &[&s(&missing)]);
}

#[test]
fn lower_that_is_a_file_is_rejected() {
    let l = Layers::new(1);
    let file = l.root().join("a-file");
    fs::write(&file, "x").unwrap();
    let args = mount_args(&[&file], Some(&l.upper.path), Some(&l.work), &l.mnt);
    expect_failure(&args, &l.mnt, &[&s(&file)]);
}

#[test]
fn missing_upper_dir_is_rejected() {
    let l = Layers::new(1);
    let missing = l.root().join("no-such-upper");
    let args = mount_args(&[&l.lower(0).path], Some(&missing), Some(&l.work), &l.mnt);
    expect_failure(&args, &l.mnt, &[&s(&missing)]);
}

#[test]
fn upper_without_work_is_rejected() {
    let l = Layers::new(1);
    let args = mount_args(&[&l.lower(0).path], Some(&l.upper.path), None, &l.mnt);
    expect_failure(&args, &l.mnt, &["work", "WORK"]);
}

#[test]
fn work_on_another_filesystem_is_rejected() {
    let l = Layers::new(1);
    let tmpfs = l.root().join("tmpfs");
    fs::create_dir(&tmpfs).unwrap();
    sh(&format!("mount -t tmpfs -o size=4m strata-test {}", tmpfs.display()));
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = run(Command::new("umount").arg("-l").arg(self.0), Duration::from_secs(10));
        }
    }
    let _guard = Unmount(&tmpfs);
    let work = tmpfs.join("work");
    fs::create_dir(&work).unwrap();
    let args = mount_args(&[&l.lower(0).path], Some(&l.upper.path), Some(&work), &l.mnt);
    expect_failure(&args, &l.mnt, &[&s(&work), &s(&l.upper.path)]);
}

#[test]
fn work_inside_upper_is_rejected() {
    let l = Layers::new(1);
    let work = l.upper.p("work");
    fs::create_dir(&work).unwrap();
    let args = mount_args(&[&l.lower(0).path], Some(&l.upper.path), Some(&work), &l.mnt);
    expect_failure(&args, &l.mnt, &[&s(&work), &s(&l.upper.path)]);
}

#[test]
fn upper_inside_a_lower_is_rejected() {
    let l = Layers::new(1);
    let upper = l.lower(0).p("upper");
    fs::create_dir(&upper).unwrap();
    let args = mount_args(&[&l.lower(0).path], Some(&upper), Some(&l.work), &l.mnt);
    expect_failure(&args, &l.mnt, &[&s(&upper), &s(&l.lower(0).path)]);
}

#[test]
fn missing_mountpoint_is_rejected() {
    let l = Layers::new(1);
    let mnt = l.root().join("no-such-mnt");
    let args = mount_args(&[&l.lower(0).path], Some(&l.upper.path), Some(&l.work), &mnt);
    expect_failure(&args, &mnt, &[&s(&mnt)]);
    assert!(absent(&mnt), "the mount point must not be created");
}

#[test]
fn busy_mountpoint_is_rejected() {
    let l = Layers::new(1);
    l.lower(0).file("f", "first");
    let m = StrataMount::mount(&l);
    let other = Layers::new(1);
    let args = mount_args(&[&other.lower(0).path], Some(&other.upper.path), Some(&other.work), &l.mnt);
    let o = strata(&args);
    let stacked = mounts_at(&l.mnt).len();
    assert!(!o.success(), "mounting on a busy mount point must fail");
    assert_eq!(stacked, 1, "nothing may be stacked on the busy mount point");
    assert!(o.stderr.contains(&s(&l.mnt)), "stderr must name the mount point: {}", o.stderr);
    assert_eq!(read_string(&m.p("f")), "first", "the first mount keeps working");
}

#[test]
fn unknown_option_is_rejected() {
    let l = Layers::new(1);
    let opts = format!("{},bogus_strata_option=1", l.overlay_opts());
    let args = vec!["mount".to_string(), "-o".into(), opts, s(&l.mnt)];
    expect_failure(&args, &l.mnt, &["bogus_strata_option"]);
}

#[test]
fn no_lower_at_all_is_rejected() {
    let l = Layers::new(0);
    let args = mount_args(&[], Some(&l.upper.path), Some(&l.work), &l.mnt);
    expect_failure(&args, &l.mnt, &["lower", "LOWER"]);
}

// ---------------------------------------------------------------------------
// Option syntax
// ---------------------------------------------------------------------------

#[test]
fn lowerdir_option_leftmost_is_topmost() {
    let l = Layers::new(2);
    l.lower(0).file("f", "A").file("onlya", "a");
    l.lower(1).file("f", "B").file("onlyb", "b");
    let m = StrataMount::mount_opts(&l.overlay_opts(), &l.mnt);
    assert_eq!(read_string(&m.p("f")), "A", "lowerdir=A:B puts A on top");
    assert_eq!(ls(&m.p("")), ["f", "onlya", "onlyb"]);
    fs::write(m.p("new"), "n").unwrap();
    assert_eq!(read_string(&l.upper.p("new")), "n", "upperdir= is used");
}

#[test]
fn repeated_lower_flag_first_is_topmost() {
    let l = Layers::new(2);
    l.lower(0).file("f", "A");
    l.lower(1).file("f", "B").file("g", "b");
    let m = StrataMount::mount(&l);
    assert_eq!(read_string(&m.p("f")), "A", "the first --lower is the topmost");
    assert_eq!(read_string(&m.p("g")), "b");
}

#[test]
fn escaped_colon_in_lowerdir() {
    let l = Layers::new(1);
    let odd = l.root().join("lo:wer");
    fs::create_dir(&odd).unwrap();
    fs::write(odd.join("f"), "from the colon dir").unwrap();
    l.lower(0).file("f", "below").file("g", "g");
    let escaped = s(&odd).replace(':', "\\:");
    let opts =
        format!("lowerdir={escaped}:{},upperdir={},workdir={}", s(&l.lower(0).path), s(&l.upper.path), s(&l.work));
    let m = StrataMount::mount_opts(&opts, &l.mnt);
    assert_eq!(read_string(&m.p("f")), "from the colon dir");
    assert_eq!(ls(&m.p("")), ["f", "g"]);
}

#[test]
fn mount_program_form_without_subcommand() {
    let l = Layers::new(1);
    l.lower(0).file("f", "low");
    let args = vec!["-o".to_string(), l.overlay_opts(), s(&l.mnt)];
    let m = StrataMount::from_args(&args, &l.mnt);
    assert_eq!(read_string(&m.p("f")), "low");
    fs::write(m.p("f"), "up").unwrap();
    assert_eq!(read_string(&l.upper.p("f")), "up");
    m.umount();
}

#[test]
fn mount_fuse3_form() {
    let l = Layers::new(1);
    l.lower(0).file("f", "low");
    let args = vec!["overlay".to_string(), s(&l.mnt), "-o".into(), l.overlay_opts()];
    let m = StrataMount::from_args(&args, &l.mnt);
    assert_eq!(read_string(&m.p("f")), "low");
    fs::write(m.p("g"), "new").unwrap();
    assert_eq!(read_string(&l.upper.p("g")), "new");
}

/// Mounts with `extra` appended to the option string in the mount_program form.
fn check_quirk(extra: &str) {
    let l = Layers::new(1);
    l.lower(0).file("f", "low");
    let opts = format!("{}{extra}", l.overlay_opts());
    let args = vec!["-o".to_string(), opts.clone(), s(&l.mnt)];
    let o = strata(&args);
    let guard = StrataMount::adopt(&l.mnt);
    assert!(o.success(), "options `{opts}` must be accepted (at most warned about); stderr: {}", o.stderr);
    assert!(is_mounted(&l.mnt), "`{opts}`: not mounted");
    assert_eq!(read_string(&guard.p("f")), "low");
    fs::write(guard.p("g"), "x").expect("write through the mount");
    assert!(l.upper.p("g").is_file());
}

#[test]
fn quirk_trailing_comma() {
    check_quirk(",");
}

#[test]
fn quirk_empty_option_and_volatile() {
    check_quirk(",,volatile");
}

#[test]
fn quirk_quoted_context_with_comma() {
    check_quirk(",context=\"system_u:object_r:container_file_t:s0:c1,c2\"");
}

#[test]
fn quirk_fsync_0() {
    check_quirk(",fsync=0");
}

#[test]
fn quirk_uid_gid_mapping() {
    check_quirk(",uidmapping=0:100000:65536,gidmapping=0:100000:65536");
}

#[test]
fn quirk_common_fuse_overlayfs_flags() {
    check_quirk(",noacl,static_nlink,allow_other,default_permissions,suid,dev,timeout=10");
}

// ---------------------------------------------------------------------------
// Daemon lifetime
// ---------------------------------------------------------------------------

#[test]
fn mount_returns_when_live_and_daemon_detaches() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x");
    let m = StrataMount::mount(&l);
    // Usable right away, without waiting.
    assert_eq!(read_string(&m.p("f")), "x");
    assert_eq!(m.daemon_pids().len(), 1, "exactly one daemon serves the mount");
}

#[test]
fn strata_umount_leaves_no_daemon() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x");
    let m = StrataMount::mount(&l);
    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no daemon found with the mount point in its command line");
    let mnt = m.mnt.clone();
    m.umount();
    assert!(!is_mounted(&mnt));
    assert!(
        wait_for(Duration::from_millis(500), || daemon_pids(&mnt).is_empty()),
        "daemon still running after strata umount: {:?}",
        daemon_pids(&mnt)
    );
    let o = run(Command::new("pgrep").arg("-a").arg("-f").arg(&mnt), Duration::from_secs(10));
    assert_eq!(o.status.and_then(|s| s.code()), Some(1), "pgrep -f finds processes with the mount point: {}", o.stdout);
}

fn check_external_unmount(cmd: &str) {
    let l = Layers::new(1);
    let m = StrataMount::mount(&l);
    let flag = if cmd.starts_with("fusermount") { "-u" } else { "--" };
    let o = run(Command::new(cmd).arg(flag).arg(&m.mnt), Duration::from_secs(20));
    assert!(o.success(), "{cmd}: {o:?}");
    assert!(!is_mounted(&m.mnt));
    assert!(
        wait_for(Duration::from_secs(5), || daemon_pids(&m.mnt).is_empty()),
        "daemon did not exit after {cmd}: {:?}",
        daemon_pids(&m.mnt)
    );
}

#[test]
fn fusermount3_u_ends_the_daemon() {
    check_external_unmount("fusermount3");
}

#[test]
fn umount_ends_the_daemon() {
    check_external_unmount("umount");
}

/// A runtime restarting a container unmounts its root with fusermount3 and
/// mounts it again at once: the old daemon, still exiting, must not unmount
/// the new mount at the same path (fuser's own unmount-on-exit did, about
/// one time in fifteen).
#[test]
fn remount_at_the_same_path_right_after_an_external_unmount_survives() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x");
    let opts = l.overlay_opts();
    let _cleanup = CleanupOnDrop(l.mnt.clone());
    for round in 0..20 {
        let first = strata(["-o", opts.as_str(), &s(&l.mnt)]);
        assert!(first.success(), "{first:?}");
        let o = run(Command::new("fusermount3").arg("-u").arg(&l.mnt), Duration::from_secs(20));
        assert!(o.success(), "{o:?}");
        let second = strata(["-o", opts.as_str(), &s(&l.mnt)]);
        assert!(second.success(), "{second:?}");
        std::thread::sleep(Duration::from_millis(150));
        assert!(is_mounted(&l.mnt), "round {round}: the new mount was unmounted by the old daemon");
        assert_eq!(read_string(&l.mnt.join("f")), "x");
        let o = strata(["umount", &s(&l.mnt)]);
        assert!(o.success(), "{o:?}");
    }
}

/// containers-storage tries `fusermount -u` after `fusermount3 -u`.
#[test]
fn fusermount_u_ends_the_daemon() {
    check_external_unmount("fusermount");
}

/// The last resort of containers-storage: a lazy unmount while a process
/// still has a file open. The daemon serves that file until it is closed,
/// then exits, and nothing written is lost.
#[test]
fn lazy_unmount_with_an_open_file_loses_nothing() {
    use std::io::Write;
    let l = Layers::new(1);
    l.lower(0).file("f", "lower ");
    let m = StrataMount::mount(&l);
    let mut open = fs::OpenOptions::new().append(true).open(m.p("f")).unwrap();
    open.write_all(b"before ").unwrap();
    let o = run(Command::new("umount").arg("-l").arg(&m.mnt), Duration::from_secs(20));
    assert!(o.success(), "umount -l: {o:?}");
    assert!(!is_mounted(&m.mnt), "detached from the tree at once");
    open.write_all(b"after").unwrap();
    assert_eq!(daemon_pids(&m.mnt).len(), 1, "the daemon keeps serving the open file");
    drop(open);
    assert!(
        wait_for(Duration::from_secs(10), || daemon_pids(&m.mnt).is_empty()),
        "the daemon must exit once the last file is closed: {:?}",
        daemon_pids(&m.mnt)
    );
    assert_eq!(read_string(&l.upper.p("f")), "lower before after", "the upper holds every write");
}

#[test]
fn sigterm_unmounts() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x");
    let m = StrataMount::mount(&l);
    fs::write(m.p("g"), "written before SIGTERM").unwrap();
    let pids = m.daemon_pids();
    assert_eq!(pids.len(), 1, "daemon pids: {pids:?}");
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(pids[0], libc::SIGTERM) };
    assert!(wait_for(Duration::from_secs(10), || !is_mounted(&m.mnt)), "SIGTERM must unmount");
    assert!(wait_for(Duration::from_secs(5), || daemon_pids(&m.mnt).is_empty()), "daemon must exit on SIGTERM");
    assert_eq!(read_string(&l.upper.p("g")), "written before SIGTERM");
}

#[test]
fn foreground_flag_stays_until_unmounted() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x");
    let mut args = vec!["mount".to_string(), "-f".to_string()];
    args.extend(l.lower_args());
    args.extend(["--upper".into(), s(&l.upper.path), "--work".into(), s(&l.work), s(&l.mnt)]);
    let mut child = Command::new(strata_bin())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn strata -f");
    let guard = StrataMount::adopt(&l.mnt);
    let live = wait_for(Duration::from_secs(10), || is_mounted(&l.mnt));
    if !live {
        let _ = child.kill();
        let _ = child.wait();
        panic!("strata mount -f never mounted");
    }
    assert!(child.try_wait().unwrap().is_none(), "with -f the command must stay in the foreground");
    assert_eq!(read_string(&guard.p("f")), "x");
    let o = strata([std::ffi::OsStr::new("umount"), l.mnt.as_os_str()]);
    assert!(o.success(), "strata umount: {o:?}");
    let exited = wait_for(Duration::from_secs(10), || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(exited, "strata -f must exit after the unmount");
    assert!(status.success(), "strata -f must exit 0 after a clean unmount, got {status:?}");
}

#[test]
fn sigint_unmounts() {
    let l = Layers::new(1);
    let m = StrataMount::mount(&l);
    let pids = m.daemon_pids();
    assert_eq!(pids.len(), 1, "daemon pids: {pids:?}");
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(pids[0], libc::SIGINT) };
    assert!(wait_for(Duration::from_secs(10), || !is_mounted(&m.mnt)), "SIGINT must unmount");
    assert!(wait_for(Duration::from_secs(5), || daemon_pids(&m.mnt).is_empty()), "daemon must exit on SIGINT");
}

// ---------------------------------------------------------------------------
// More input forms
// ---------------------------------------------------------------------------

#[test]
fn upper_equal_to_lower_is_rejected() {
    let l = Layers::new(1);
    let args = mount_args(&[&l.lower(0).path], Some(&l.lower(0).path), Some(&l.work), &l.mnt);
    expect_failure(&args, &l.mnt, &[&s(&l.lower(0).path)]);
}

#[test]
fn work_equal_to_upper_is_rejected() {
    let l = Layers::new(1);
    let args = mount_args(&[&l.lower(0).path], Some(&l.upper.path), Some(&l.upper.path), &l.mnt);
    expect_failure(&args, &l.mnt, &[&s(&l.upper.path)]);
}

#[test]
fn relative_paths_are_resolved() {
    let l = Layers::new(1);
    l.lower(0).file("f", "rel");
    let o = run(
        Command::new(strata_bin())
            .current_dir(l.root())
            .args(["mount", "--lower", "lower0", "--upper", "./upper", "--work", "work", "mnt"]),
        Duration::from_secs(30),
    );
    let m = StrataMount::adopt(&l.mnt);
    assert!(o.success(), "mount with relative paths: {o:?}");
    assert!(is_mounted(&l.mnt), "not mounted at the absolute path of `mnt`");
    assert_eq!(read_string(&m.p("f")), "rel");
    fs::write(m.p("g"), "w").unwrap();
    assert!(l.upper.p("g").is_file(), "the relative upper must be used after the daemon detaches");
    let o = run(Command::new(strata_bin()).current_dir(l.root()).args(["umount", "mnt"]), Duration::from_secs(30));
    assert!(o.success(), "strata umount with a relative path: {o:?}");
    assert!(!is_mounted(&l.mnt));
}

#[test]
fn paths_with_spaces() {
    let l = Layers::new(0);
    let lower = Layer::new(l.root().join("my lower"));
    lower.file("a file", "spaced");
    let upper = l.root().join("my upper");
    let work = l.root().join("my work");
    let mnt = l.root().join("mount point");
    for d in [&upper, &work, &mnt] {
        fs::create_dir(d).unwrap();
    }
    let m = StrataMount::from_args(&mount_args(&[&lower.path], Some(&upper), Some(&work), &mnt), &mnt);
    assert_eq!(read_string(&m.p("a file")), "spaced");
    fs::write(m.p("new file"), "n").unwrap();
    assert!(upper.join("new file").is_file());
    m.umount();
    assert!(wait_for(Duration::from_secs(2), || daemon_pids(&mnt).is_empty()));
}

#[test]
fn ro_option_makes_the_mount_read_only() {
    let l = Layers::new(1);
    l.lower(0).file("f", "x");
    let opts = format!("{},ro", l.overlay_opts());
    let m = StrataMount::from_args(&["-o".to_string(), opts, s(&l.mnt)], &l.mnt);
    assert_eq!(read_string(&m.p("f")), "x");
    let r = fs::write(m.p("new"), "n");
    assert_eq!(r.as_ref().err().and_then(|e| e.raw_os_error()), Some(libc::EROFS), "create on a ro mount: {r:?}");
    assert!(absent(&l.upper.p("new")));
}

#[test]
fn lowerdir_only_option_is_read_only() {
    let l = Layers::new(2);
    l.lower(0).file("f", "top");
    l.lower(1).file("f", "bottom").file("g", "g");
    let opts = format!("lowerdir={}:{}", s(&l.lower(0).path), s(&l.lower(1).path));
    let m = StrataMount::mount_opts(&opts, &l.mnt);
    assert_eq!(read_string(&m.p("f")), "top");
    assert_eq!(ls(&m.p("")), ["f", "g"]);
    let r = fs::write(m.p("new"), "n");
    assert_eq!(r.as_ref().err().and_then(|e| e.raw_os_error()), Some(libc::EROFS), "create without an upper: {r:?}");
}

#[test]
fn quirk_squash_options() {
    check_quirk(",squash_to_uid=0,squash_to_gid=0");
}

#[test]
fn umount_of_something_not_mounted_fails_cleanly() {
    let l = Layers::new(0);
    let o = strata([std::ffi::OsStr::new("umount"), l.mnt.as_os_str()]);
    assert!(!o.success(), "strata umount of a plain directory must fail");
    assert!(o.stderr.contains(&s(&l.mnt)), "stderr must name the path: {}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}
