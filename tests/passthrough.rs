//! How file data is served, through real mounts: which opens the kernel
//! serves itself (FUSE passthrough, counted by the daemon's
//! `passthrough_opens`), which files are served by inode without any OPEN
//! request (`open_requests`), and that the data every open sees stays right
//! across copy-up, unlink and rename.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};

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
    stats(m)["passthrough_opens"].as_u64().expect("passthrough_opens in stats")
}

fn open_requests(m: &StrataMount) -> u64 {
    stats(m)["open_requests"].as_u64().expect("open_requests in stats")
}

fn stats(m: &StrataMount) -> serde_json::Value {
    let out = strata(["stats".as_ref(), m.mnt.as_os_str(), "--format".as_ref(), "json".as_ref()]);
    assert!(out.success(), "strata stats failed: {out:?}");
    serde_json::from_str(&out.stdout).expect("stats json")
}

/// A writable mount of `l` with `-o passthrough=VALUE`.
fn mount_writable(l: &Layers, passthrough: &str) -> StrataMount {
    let mut args = vec!["mount".to_string(), "-o".to_string(), format!("passthrough={passthrough}")];
    args.extend(l.lower_args());
    args.extend(["--upper".into(), l.upper.path.display().to_string(), "--work".into(), l.work.display().to_string()]);
    args.push(l.mnt.display().to_string());
    StrataMount::from_args(&args, &l.mnt)
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
    let m = mount_writable(&l, "on");
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
    let m = mount_writable(&l, "on");
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
    let m = mount_writable(&l, "on");
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
    let m = mount_writable(&l, "off");
    fs::write(m.p("g"), "new").unwrap();
    assert_eq!(read_string(&m.p("g")), "new");
    assert_eq!(read_string(&m.p("f")), "data");
    assert_eq!(passthrough_opens(&m), 0);
}

#[test]
fn passthrough_option_takes_auto_on_or_off_only() {
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

/// A writable mount (passthrough=auto) serves files by inode: after the
/// first OPEN, answered ENOSYS, the kernel opens and closes files itself,
/// so reading files again and again sends no request, and the data stays
/// right through the first write (which copies up), truncation and appends.
#[test]
fn writable_mount_serves_files_without_open_requests() {
    let l = Layers::new(2);
    l.lower(1).file("bottom", "from the bottom layer");
    l.lower(0).file("top", "0123456789");
    let m = StrataMount::mount(&l);
    for _ in 0..20 {
        assert_eq!(read_string(&m.p("bottom")), "from the bottom layer");
        assert_eq!(read_string(&m.p("top")), "0123456789");
    }
    assert!(open_requests(&m) <= 1, "40 opens sent {} OPEN requests", open_requests(&m));

    let f = fs::OpenOptions::new().read(true).write(true).open(m.p("top")).unwrap();
    assert!(!l.upper.p("top").exists(), "opening for writing copies nothing up before the first write");
    f.write_all_at(b"AB", 0).unwrap();
    assert_eq!(read_string(&l.upper.p("top")), "AB23456789", "the first write copied the file up");
    assert_eq!(read_string(&m.p("top")), "AB23456789");
    assert_eq!(read_string(&l.lower(0).p("top")), "0123456789", "the lower layer is untouched");
    let mut buf = [0u8; 10];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"AB23456789");

    fs::write(m.p("bottom"), "short").unwrap(); // O_TRUNC: a SETATTR now
    assert_eq!(read_string(&m.p("bottom")), "short");
    assert_eq!(read_string(&l.upper.p("bottom")), "short");
    fs::OpenOptions::new().append(true).open(m.p("bottom")).unwrap().write_all(b"+").unwrap();
    assert_eq!(read_string(&m.p("bottom")), "short+");
    assert_eq!(fs::metadata(m.p("bottom")).unwrap().len(), 6);

    fs::write(m.p("new"), "created").unwrap();
    assert_eq!(read_string(&m.p("new")), "created");
    assert_eq!(read_string(&l.upper.p("new")), "created");
    assert!(open_requests(&m) <= 1, "{} OPEN requests", open_requests(&m));
    assert_eq!(read_string(&l.lower(1).p("bottom")), "from the bottom layer");
}

/// Without OPEN, files are created by MKNOD and opened by the kernel: the
/// creator may still write a file it creates read-only, and the file is
/// the creator's, as with open(2) on any filesystem.
#[test]
fn a_user_writes_the_read_only_file_it_creates() {
    let l = Layers::new(1);
    l.lower(0).dir("shared").mode("shared", 0o777);
    let m = StrataMount::mount(&l);
    let path = m.p("shared/mine");
    let script = format!(
        "python3 -c \"import os; fd = os.open('{}', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o444); os.write(fd, b'mine'); os.close(fd)\"",
        path.display()
    );
    let out = sh_as_user(1000, 1000, &script);
    assert!(out.success(), "create and write as uid 1000: {out:?}");
    assert_eq!(read_string(&path), "mine");
    let meta = fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (1000, 1000, 0o444));
    let upper = fs::metadata(l.upper.p("shared/mine")).unwrap();
    assert_eq!((upper.uid(), upper.gid(), upper.mode() & 0o7777), (1000, 1000, 0o444), "as stored in the upper");
    let again = sh_as_user(1000, 1000, &format!("echo more > {}", path.display()));
    assert!(!again.success(), "a later open for writing of the read-only file is refused");
    assert_eq!(read_string(&path), "mine");
}

/// `passthrough=on` keeps OPEN requests in a writable mount, since each
/// open is where a file of the upper layer is passed through.
#[test]
fn passthrough_on_in_a_writable_mount_asks_for_every_open() {
    if !kernel_has_passthrough() {
        return;
    }
    let l = Layers::new(1);
    l.lower(0).file("f", "data");
    let m = mount_writable(&l, "on");
    for _ in 0..5 {
        assert_eq!(read_string(&m.p("f")), "data");
    }
    assert!(open_requests(&m) >= 5, "{} OPEN requests for 5 opens", open_requests(&m));
}

/// Drop the clean pages the kernel caches for `f`, so the next read asks
/// the daemon.
fn drop_page_cache(f: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: an advice call on a descriptor this test owns.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// Without OPEN the daemon cannot know which files are open: an upper file
/// that loses its last name (unlink, or a rename over it) must stay
/// readable, writable and fstat-able through the descriptors open on it,
/// also after the daemon's cache of descriptors has turned over.
#[test]
fn open_files_outlive_their_names_when_served_by_inode() {
    let l = Layers::new(1);
    for i in 0..1100 {
        l.lower(0).file(&format!("many/{i}"), format!("lower {i}"));
    }
    let m = StrataMount::mount(&l);
    let count = 200;
    let held: Vec<fs::File> = (0..count)
        .map(|i| {
            fs::write(m.p(&format!("f{i}")), format!("file {i:03}")).unwrap();
            fs::OpenOptions::new().read(true).write(true).open(m.p(&format!("f{i}"))).unwrap()
        })
        .collect();
    for i in 0..count {
        if i % 2 == 0 {
            fs::remove_file(m.p(&format!("f{i}"))).unwrap();
        } else {
            fs::write(m.p("replacement"), "replacement").unwrap();
            fs::rename(m.p("replacement"), m.p(&format!("f{i}"))).unwrap();
        }
    }
    // First reads of 1100 other files: each reaches the daemon and takes
    // a place in its cache of descriptors.
    for i in 0..1100 {
        assert_eq!(read_string(&m.p(&format!("many/{i}"))), format!("lower {i}"));
    }
    for (i, f) in held.iter().enumerate() {
        f.write_all_at(b"F", 0).unwrap();
        drop_page_cache(f);
        let mut buf = [0u8; 8];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, format!("File {i:03}").as_bytes(), "f{i}: the write reached the unlinked file");
        let meta = f.metadata().expect("fstat of a file without a name");
        assert_eq!((meta.len(), meta.nlink()), (8, 0), "f{i}");
    }
    for i in 0..count {
        let path = m.p(&format!("f{i}"));
        if i % 2 == 0 {
            assert!(absent(&path), "f{i} was removed");
        } else {
            assert_eq!(read_string(&path), "replacement", "f{i} was replaced");
        }
    }
}

/// A lower file opened for writing and then unlinked is copied up at its
/// first write, nameless: the writer keeps its data, the lower layer and
/// the upper directory show nothing of it.
#[test]
fn a_lower_file_unlinked_while_open_for_writing_takes_its_writes() {
    let l = Layers::new(1);
    l.lower(0).file("scratch", "lower content");
    let m = StrataMount::mount(&l);
    let f = fs::OpenOptions::new().read(true).write(true).open(m.p("scratch")).unwrap();
    fs::remove_file(m.p("scratch")).unwrap();
    f.write_all_at(b"LOWER", 0).expect("a write to the unlinked lower file");
    drop_page_cache(&f);
    let mut buf = [0u8; 13];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"LOWER content");
    assert_eq!(f.metadata().unwrap().len(), 13);
    f.set_len(5).expect("ftruncate of the nameless copy");
    assert_eq!(f.metadata().unwrap().len(), 5);
    assert!(absent(&m.p("scratch")));
    assert!(is_whiteout(&l.upper.p("scratch")), "the name stays deleted");
    assert_eq!(read_string(&l.lower(0).p("scratch")), "lower content", "the lower layer is untouched");
}

/// A lower hard link copied up through one name lives in the index; when
/// every name is removed while it is open, its descriptor keeps working.
#[test]
fn a_hard_link_open_while_all_its_names_go_keeps_its_data() {
    let l = Layers::new(1);
    l.lower(0).file("a", "linked data").hardlink("a", "b");
    for i in 0..1100 {
        l.lower(0).file(&format!("many/{i}"), "x");
    }
    let m = StrataMount::mount(&l);
    let f = fs::OpenOptions::new().read(true).write(true).open(m.p("a")).unwrap();
    f.write_all_at(b"LINKED", 0).unwrap();
    assert_eq!(read_string(&m.p("b")), "LINKED data", "both names share the copy");
    fs::remove_file(m.p("a")).unwrap();
    fs::remove_file(m.p("b")).unwrap();
    // Turn the daemon's cache of descriptors over.
    for i in 0..1100 {
        assert_eq!(read_string(&m.p(&format!("many/{i}"))), "x");
    }
    f.write_all_at(b"!", 10).expect("a write after the last name went");
    drop_page_cache(&f);
    let mut buf = [0u8; 11];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"LINKED dat!");
    let meta = f.metadata().expect("fstat after the last name went");
    assert_eq!((meta.len(), meta.nlink()), (11, 0));
    assert_eq!(read_string(&l.lower(0).p("a")), "linked data", "the lower layer is untouched");
}
