//! FUSE passthrough, through real mounts: which opens the kernel serves
//! itself (counted by the daemon's `passthrough_opens`), and that the data
//! every open sees stays right across copy-up.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use common::*;

/// Passthrough needs Linux 6.9 and root; say so instead of failing where
/// the kernel cannot offer it.
fn kernel_has_passthrough() -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let root = unsafe { libc::geteuid() } == 0;
    if version < (6, 9) || !root {
        eprintln!("skipped: FUSE passthrough needs Linux >= 6.9 and root (kernel {release:?})");
        return false;
    }
    true
}

fn passthrough_opens(m: &StrataMount) -> u64 {
    let out = strata(["stats".as_ref(), m.mnt.as_os_str(), "--format".as_ref(), "json".as_ref()]);
    assert!(out.success(), "strata stats failed: {out:?}");
    let stats: serde_json::Value = serde_json::from_str(&out.stdout).expect("stats json");
    stats["passthrough_opens"].as_u64().expect("passthrough_opens in stats")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn read_only_mount_reads_lower_files_through_passthrough() {
    if !kernel_has_passthrough() {
        return;
    }
    let l = Layers::new(2);
    let data = pattern(3 << 20, 7);
    l.lower(1).file("big", &data).file("shadowed", "lower");
    l.lower(0).file("shadowed", "upper-most");
    let m = StrataMount::mount_ro(&l);
    assert_eq!(passthrough_opens(&m), 0);
    assert_eq!(fs::read(m.p("big")).unwrap(), data);
    assert_eq!(read_string(&m.p("shadowed")), "upper-most");
    // Random reads of the same file, from two descriptors at once.
    let a = fs::File::open(m.p("big")).unwrap();
    let b = fs::File::open(m.p("big")).unwrap();
    let mut buf = [0u8; 4096];
    a.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(&buf[..], &data[1 << 20..(1 << 20) + 4096]);
    b.read_exact_at(&mut buf, 3 << 19).unwrap();
    assert_eq!(&buf[..], &data[3 << 19..(3 << 19) + 4096]);
    assert!(passthrough_opens(&m) >= 4, "every open of a read-only mount is passthrough");
}

#[test]
fn upper_files_are_passthrough_and_their_size_and_times_follow_writes() {
    if !kernel_has_passthrough() {
        return;
    }
    let l = Layers::new(1);
    l.lower(0).file("lower", "lower data");
    let m = StrataMount::mount(&l);
    let before = passthrough_opens(&m);
    {
        let mut f = fs::File::create(m.p("new")).unwrap();
        f.write_all(&pattern(100_000, 1)).unwrap();
    }
    let after_create = passthrough_opens(&m);
    assert!(after_create > before, "a created file is opened through passthrough");
    let old_mtime = fs::metadata(m.p("new")).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    {
        let f = fs::OpenOptions::new().write(true).open(m.p("new")).unwrap();
        f.write_all_at(b"tail", 200_000).unwrap();
    }
    let meta = fs::metadata(m.p("new")).unwrap();
    assert_eq!(meta.len(), 200_004, "the size grows with a passthrough write");
    assert!(meta.modified().unwrap() > old_mtime, "mtime moves with a passthrough write");
    let mut expected = pattern(100_000, 1);
    expected.resize(200_000, 0);
    expected.extend_from_slice(b"tail");
    assert_eq!(fs::read(m.p("new")).unwrap(), expected);
    assert_eq!(fs::read(l.upper.p("new")).unwrap(), expected, "the data is in the upper layer");
    // Truncated by path while a passthrough descriptor is open.
    let reader = fs::File::open(m.p("new")).unwrap();
    fs::OpenOptions::new().write(true).open(m.p("new")).unwrap().set_len(10).unwrap();
    let mut rest = Vec::new();
    (&reader).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, &expected[..10]);
    assert!(passthrough_opens(&m) > after_create);
    assert_eq!(read_string(&l.lower(0).p("lower")), "lower data");
}

#[test]
fn shared_mapping_of_an_upper_file_is_the_file() {
    if !kernel_has_passthrough() {
        return;
    }
    let l = Layers::new(1);
    l.lower(0).file("f", "0123456789");
    let m = StrataMount::mount(&l);
    let f = fs::OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    let len = 10;
    // SAFETY: a shared mapping of a file this test owns, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            {
                use std::os::fd::AsRawFd;
                f.as_raw_fd()
            },
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    // SAFETY: `map` is a live mapping of `len` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(b"ABC".as_ptr(), map as *mut u8, 3);
        libc::msync(map, len, libc::MS_SYNC);
        libc::munmap(map, len);
    }
    assert_eq!(read_string(&m.p("f")), "ABC3456789");
    assert_eq!(read_string(&l.upper.p("f")), "ABC3456789");
    assert_eq!(read_string(&l.lower(0).p("f")), "0123456789");
}

/// A lower file of a writable mount may still be copied up, so its opens
/// are served by the daemon: a reader opened before the copy-up sees later
/// writes, and opens made while it is open never fail (the kernel refuses a
/// passthrough open of an inode with an ordinary open, and the reverse).
#[test]
fn lower_file_opened_before_copy_up_keeps_every_open_working() {
    if !kernel_has_passthrough() {
        return;
    }
    let l = Layers::new(1);
    l.lower(0).file("f", "old-content");
    let m = StrataMount::mount(&l);
    let reader = fs::File::open(m.p("f")).unwrap();
    let writer = fs::OpenOptions::new().read(true).write(true).open(m.p("f")).unwrap();
    writer.write_all_at(b"NEW", 0).unwrap();
    let second_reader = fs::File::open(m.p("f")).expect("an open while the reader is open");
    let mut buf = [0u8; 11];
    second_reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"NEW-content");
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"NEW-content", "the reader opened before the copy-up sees the write");
    assert_eq!(read_string(&l.lower(0).p("f")), "old-content");
    drop((reader, writer, second_reader));
    // Once nothing holds the inode, the copy in the upper layer is
    // passthrough.
    let before = passthrough_opens(&m);
    assert_eq!(read_string(&m.p("f")), "NEW-content");
    assert_eq!(passthrough_opens(&m), before + 1);
    let mut appender = fs::OpenOptions::new().append(true).open(m.p("f")).unwrap();
    appender.write_all(b"+").unwrap();
    assert_eq!(read_string(&m.p("f")), "NEW-content+");
    assert_eq!(read_string(&l.lower(0).p("f")), "old-content", "no write reaches the lower layer");
}

#[test]
fn passthrough_off_serves_every_open_from_the_daemon() {
    let l = Layers::new(1);
    l.lower(0).file("f", "data");
    let mut args = vec!["mount".to_string(), "-o".to_string(), "passthrough=off".to_string()];
    args.extend(l.lower_args());
    args.extend(["--upper".into(), l.upper.path.display().to_string(), "--work".into(), l.work.display().to_string()]);
    args.push(l.mnt.display().to_string());
    let m = StrataMount::from_args(&args, &l.mnt);
    fs::write(m.p("g"), "new").unwrap();
    assert_eq!(read_string(&m.p("g")), "new");
    assert_eq!(read_string(&m.p("f")), "data");
    assert_eq!(passthrough_opens(&m), 0);
}

#[test]
fn passthrough_option_takes_on_or_off_only() {
    let l = Layers::new(1);
    let out = strata([
        "mount".as_ref(),
        "-o".as_ref(),
        "passthrough=maybe".as_ref(),
        "--lower".as_ref(),
        l.lower(0).path.as_os_str(),
        l.mnt.as_os_str(),
    ]);
    assert!(!out.success());
    assert!(out.stderr.contains("passthrough") && out.stderr.contains("\"maybe\""), "stderr: {}", out.stderr);
    assert!(!is_mounted(&l.mnt));
}
