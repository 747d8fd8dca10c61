//! Durability: state survives a remount, and a kill -9 of the daemon in the
//! middle of a large copy-up never leaves a partial file in the upper.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn changes_survive_unmount_and_mount() {
    let l = Layers::new(2);
    l.lower(1).file("keep", "k").file("gone", "g").file("d/x", "x").file("mv/a", "a");
    l.lower(0).file("edit", "before").dir("rmdir-me/sub");
    let m = StrataMount::mount(&l);
    fs::write(m.p("edit"), "after").unwrap();
    fs::write(m.p("new"), "created").unwrap();
    fs::remove_file(m.p("gone")).unwrap();
    fs::remove_dir_all(m.p("rmdir-me")).unwrap();
    fs::rename(m.p("mv"), m.p("moved")).unwrap();
    fs::set_permissions(m.p("keep"), fs::Permissions::from_mode(0o600)).unwrap();
    lsetxattr(&m.p("d"), "user.x", b"1").unwrap();
    std::os::unix::fs::symlink("keep", m.p("sym")).unwrap();
    let before = tree_snapshot(&m.mnt);
    m.umount();
    let m = StrataMount::mount(&l);
    let after = tree_snapshot(&m.mnt);
    assert_same_tree("before remount", &before, "after remount", &after);
    assert_eq!(ls(&m.p("")), ["d", "edit", "keep", "moved", "new", "sym"]);
    assert_eq!(read_string(&m.p("edit")), "after");
    assert_eq!(ls(&m.p("moved")), ["a"]);
}

#[test]
fn kill_9_during_large_copy_up_leaves_no_partial_file() {
    const MIB: usize = 1 << 20;
    const SIZE_MIB: usize = 1024; // 1 GiB of real (non-sparse) data
    let l = Layers::new(1);
    let lower_file = l.lower(0).p("big");
    {
        let mut f = fs::File::create(&lower_file).unwrap();
        let mut block = vec![0u8; MIB];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        for i in 0..SIZE_MIB {
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let size = (SIZE_MIB * MIB) as u64;
    let first_orig = sha256_range(&lower_file, 0, MIB).unwrap();
    let last_orig = sha256_range(&lower_file, size - MIB as u64, MIB).unwrap();
    // What the first MiB looks like once dd has written its byte at offset 100.
    let first_changed = {
        let f = fs::File::open(&lower_file).unwrap();
        let mut buf = vec![0u8; MIB];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf[100] = b'Z';
        sha256_hex(&buf)
    };

    let m = StrataMount::mount(&l);
    let pids = m.daemon_pids();
    assert_eq!(pids.len(), 1, "expected one daemon for {}: {pids:?}", m.mnt.display());
    let mut dd = Command::new("sh")
        .arg("-c")
        .arg(format!("printf Z | dd of={} bs=1 seek=100 count=1 conv=notrunc status=none", m.p("big").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let copy_up_running = dd.try_wait().unwrap().is_none();
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let dd_done = wait_for(Duration::from_secs(30), || dd.try_wait().unwrap().is_some());
    if !dd_done {
        let _ = dd.kill();
    }
    let _ = dd.wait();
    let _ = run(Command::new("umount").arg("-l").arg(&m.mnt), Duration::from_secs(10));
    assert!(wait_for(Duration::from_secs(5), || !is_mounted(&m.mnt)), "umount -l failed");
    drop(m);
    assert!(dd_done, "dd hung after the daemon was killed");

    let up = l.upper.p("big");
    eprintln!(
        "dd still running when the daemon was killed: {copy_up_running}; upper/big after the kill: {:?}",
        fs::symlink_metadata(&up).map(|m| m.len())
    );
    match fs::symlink_metadata(&up) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("stat upper/big: {e}"),
        Ok(md) => {
            assert!(md.is_file(), "upper/big is not a regular file: {:?}", md.file_type());
            assert_eq!(md.len(), size, "a partial copy-up is visible in the upper (size {} of {size})", md.len());
            let first = sha256_range(&up, 0, MIB).unwrap();
            assert!(
                first == first_orig || first == first_changed,
                "first MiB of upper/big is neither the lower's nor the lower's plus the change"
            );
            assert_eq!(
                sha256_range(&up, size - MIB as u64, MIB).unwrap(),
                last_orig,
                "last MiB of upper/big differs: partial copy-up"
            );
        }
    }
    assert_eq!(sha256_range(&lower_file, 0, MIB).unwrap(), first_orig, "the lower file changed");

    // Remounting works and the file is whole; the write can be redone.
    let m = StrataMount::mount(&l);
    assert_eq!(fs::metadata(m.p("big")).unwrap().len(), size);
    assert_eq!(sha256_range(&m.p("big"), size - MIB as u64, MIB).unwrap(), last_orig);
    {
        let f = fs::OpenOptions::new().write(true).open(m.p("big")).unwrap();
        f.write_all_at(b"Z", 100).unwrap();
    }
    assert_eq!(sha256_range(&m.p("big"), 0, MIB).unwrap(), first_changed);
    m.umount();
    let md = fs::metadata(&up).unwrap();
    assert_eq!(md.len(), size);
    assert_eq!(sha256_range(&up, 0, MIB).unwrap(), first_changed);
    assert_eq!(sha256_range(&up, size - MIB as u64, MIB).unwrap(), last_orig);
}
