//! `strata commit`: the layer tarball read back with the tar crate and with
//! GNU tar, its identity and determinism, and the round trip: the tar
//! applied onto the image with the OCI rules gives the tree the mount showed.

mod common;
mod diff_common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use diff_common::*;
use sha2::{Digest, Sha256};

fn sh_in(mnt: &Path, script: &str) {
    let o = run(Command::new("sh").arg("-c").arg(script).current_dir(mnt), Duration::from_secs(30));
    assert!(o.success(), "`{script}` failed: {o:?}");
}

/// `strata commit ARGS --output OUT`; the printed (diff_id, digest, size).
fn commit(args: &[String], out: &Path, extra: &[&str]) -> (String, String, u64) {
    let mut full = vec!["commit".to_string()];
    full.extend(args.iter().cloned());
    full.extend(["--output".to_string(), s(out)]);
    full.extend(extra.iter().map(|e| e.to_string()));
    let o = strata(&full);
    assert!(o.success(), "strata {} failed: {o:?}", full.join(" "));
    let field = |key: &str| {
        o.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key} in {:?}", o.stdout))
    };
    (field("diff_id "), field("digest "), field("size ").parse().expect("size"))
}

fn sha256_prefixed(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    format!("sha256:{}", hash.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Every member of a tar: (path, type letter, mode, link target, uid).
fn members(tar_bytes: &[u8]) -> Vec<(String, char, u32, String, u64)> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for entry in archive.entries().expect("entries") {
        let entry = entry.expect("entry");
        let h = entry.header();
        let kind = match h.entry_type() {
            tar::EntryType::Regular => 'f',
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Fifo => 'p',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            other => panic!("unexpected member type {other:?}"),
        };
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let link = entry.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_default();
        out.push((path, kind, h.mode().expect("mode"), link, h.uid().expect("uid")));
    }
    out
}

/// GNU tar's listing (names only, one a line).
fn gnu_tar_names(file: &Path) -> Vec<String> {
    let o = run(Command::new("tar").arg("-tf").arg(file), Duration::from_secs(30));
    assert!(o.success(), "tar -tf {} failed: {o:?}", file.display());
    o.stdout.lines().map(str::to_string).collect()
}

// ---------------------------------------------------------------------------
// A small OCI layer applier (the rules of the image spec's changeset).
// ---------------------------------------------------------------------------

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).expect("rm -r"),
        Ok(_) => fs::remove_file(p).expect("rm"),
        Err(_) => {}
    }
}

/// Apply an uncompressed layer tar onto `root`.
fn apply_layer(root: &Path, tar_bytes: &[u8]) {
    let mut archive = tar::Archive::new(tar_bytes);
    // Paths this layer has written: an opaque marker keeps them.
    let mut ours: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        // Components: a directory's trailing slash dropped.
        let rel: PathBuf = Path::new(std::ffi::OsStr::from_bytes(&entry.path_bytes())).components().collect();
        let name = rel.file_name().expect("name").as_bytes().to_vec();
        let parent = root.join(rel.parent().unwrap_or(Path::new("")));
        if name == b".wh..wh..opq" {
            for child in fs::read_dir(&parent).expect("read_dir") {
                let child = child.expect("entry").path();
                if !ours.contains(&child) {
                    remove_any(&child);
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            remove_any(&parent.join(std::ffi::OsStr::from_bytes(hidden)));
            continue;
        }
        let target = root.join(&rel);
        ours.insert(target.clone());
        let header = entry.header().clone();
        let kind = header.entry_type();
        let existing = fs::symlink_metadata(&target).ok();
        if let Some(m) = &existing
            && !(m.is_dir() && kind == tar::EntryType::Directory)
        {
            remove_any(&target);
        }
        let mode = header.mode().expect("mode");
        match kind {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    fs::create_dir(&target).unwrap_or_else(|e| panic!("mkdir {}: {e}", target.display()));
                }
            }
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).expect("read member");
                fs::write(&target, data).expect("write");
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name_bytes().expect("link");
                symlink(std::ffi::OsStr::from_bytes(&link), &target).expect("symlink");
            }
            tar::EntryType::Link => {
                let link = entry.link_name_bytes().expect("link");
                fs::hard_link(root.join(std::ffi::OsStr::from_bytes(&link)), &target).expect("link");
                continue; // a hard link shares the first member's metadata
            }
            tar::EntryType::Fifo => mkfifo(&target, 0o600).expect("mkfifo"),
            tar::EntryType::Char | tar::EntryType::Block => {
                let t = if kind == tar::EntryType::Char { libc::S_IFCHR } else { libc::S_IFBLK };
                let major = header.device_major().expect("major").expect("major");
                let minor = header.device_minor().expect("minor").expect("minor");
                mknod(&target, t, 0o600, major, minor).expect("mknod");
            }
            other => panic!("unexpected member type {other:?}"),
        }
        lchown(&target, header.uid().expect("uid") as u32, header.gid().expect("gid") as u32).expect("chown");
        if kind != tar::EntryType::Symlink {
            fs::set_permissions(&target, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax {
                let ext = ext.expect("pax record");
                if let Some(attr) = ext.key().expect("key").strip_prefix("SCHILY.xattr.") {
                    lsetxattr(&target, attr, ext.value_bytes()).expect("setxattr");
                }
            }
        }
    }
}

/// Copy the image view (a read-only mount of the lowers) to `dest`.
fn flatten_image(l: &Layers, dest: &Path) {
    let _one_at_a_time = mount_lock();
    let image = mount_image(l);
    sh(&format!("cp -a {}/. {}", image.mnt.display(), dest.display()));
    image.umount();
}

/// Act in a mount, snapshot it, commit, and check that the tar applied onto
/// the image gives the snapshot. Returns the layers and the tar's bytes.
fn round_trip(build: impl FnOnce(&Layers), act: impl FnOnce(&Path)) -> (Layers, Vec<u8>) {
    let l = Layers::new(2);
    build(&l);
    let out = l.root().join("layer.tar");
    let (merged, live_commit) = {
        let _one_at_a_time = mount_lock();
        let m = StrataMount::mount(&l);
        act(&m.mnt);
        let merged = tree_snapshot(&m.mnt);
        commit(&[s(&m.mnt)], &out, &[]);
        let bytes = fs::read(&out).expect("read layer");
        m.umount();
        (merged, bytes)
    };
    // Offline, the same layer byte for byte.
    commit(&offline_args(&l), &out, &[]);
    let tar_bytes = fs::read(&out).expect("read layer");
    assert!(tar_bytes == live_commit, "commit of the mount and of the directories differ");
    // GNU tar reads it and sees the same members.
    let ours: Vec<String> = members(&tar_bytes).into_iter().map(|m| m.0).collect();
    assert_eq!(gnu_tar_names(&out), ours, "GNU tar and the tar crate disagree");
    let applied = l.root().join("applied");
    fs::create_dir(&applied).expect("mkdir");
    flatten_image(&l, &applied);
    apply_layer(&applied, &tar_bytes);
    let mut got = tree_snapshot(&applied);
    let mut want: BTreeMap<PathBuf, EntryInfo> = merged;
    // The root directory is not part of a layer.
    got.remove(Path::new(""));
    want.remove(Path::new(""));
    assert_same_tree("the mount", &want, "image + layer", &got);
    (l, tar_bytes)
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

// ---------------------------------------------------------------------------

#[test]
fn exact_members_of_the_issue_example() {
    let (_l, tar_bytes) = round_trip(base_image, |m| {
        sh_in(m, "rm -rf opt/app && mkdir opt/app && echo n > opt/app/new && ln opt/app/new opt/app/new2");
        fs::rename(m.join("etc/hosts"), m.join("etc/hosts2")).unwrap();
        symlink("hosts2", m.join("etc/hl")).unwrap();
        mkfifo(&m.join("run/ctl"), 0o600).unwrap();
    });
    let got: Vec<(String, char, u32, String)> =
        members(&tar_bytes).into_iter().map(|(p, k, mode, link, _)| (p, k, mode, link)).collect();
    let want: Vec<(&str, char, u32, &str)> = vec![
        ("etc/", 'd', 0o755, ""),
        (".wh.hosts", 'f', 0, ""),
        ("etc/hl", 'l', 0o777, "hosts2"),
        ("etc/hosts2", 'f', 0o644, ""),
        ("opt/", 'd', 0o755, ""),
        ("opt/app/", 'd', 0o755, ""),
        ("opt/app/.wh..wh..opq", 'f', 0, ""),
        ("opt/app/new", 'f', 0o644, ""),
        ("opt/app/new2", 'h', 0o644, "opt/app/new"),
        ("run/", 'd', 0o755, ""),
        ("run/ctl", 'p', 0o600, ""),
    ];
    let want: Vec<(String, char, u32, String)> = want
        .into_iter()
        .map(|(p, k, m, l)| {
            let p = if p == ".wh.hosts" { "etc/.wh.hosts".to_string() } else { p.to_string() };
            (p, k, m, l.to_string())
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn round_trip_files_and_metadata() {
    let cap: [u8; 20] = [0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    round_trip(base_image, |m| {
        append(&m.join("etc/a"), b"more\n").unwrap();
        lchown(&m.join("etc/b.conf"), 1000, 100).unwrap();
        chmod(&m.join("usr/bin/ping"), 0o4755);
        lsetxattr(&m.join("usr/bin/ping"), "security.capability", &cap).unwrap();
        lsetxattr(&m.join("etc/a"), "user.note", b"hello\0binary").unwrap();
        fs::remove_file(m.join("etc/link")).unwrap();
        mknod(&m.join("srv/null"), libc::S_IFCHR, 0o666, 1, 3).unwrap();
        fs::write(m.join("var/gone"), "back").unwrap();
        fs::write(m.join("data/more"), "m").unwrap();
        fs::remove_file(m.join("data/new")).unwrap();
        chmod(&m.join("tmp"), 0o1777);
    });
}

#[test]
fn round_trip_renamed_directories() {
    round_trip(base_image, |m| {
        fs::rename(m.join("opt/app"), m.join("srv/app")).unwrap();
        fs::remove_file(m.join("srv/app/old1")).unwrap();
        fs::write(m.join("srv/app/sub/w"), "w").unwrap();
        fs::rename(m.join("opt/other"), m.join("opt/app")).unwrap();
        fs::rename(m.join("etc"), m.join("etc2")).unwrap();
    });
}

#[test]
fn round_trip_type_changes_and_deletions() {
    round_trip(base_image, |m| {
        sh_in(m, "rm etc/a && mkdir etc/a && echo x > etc/a/x");
        sh_in(m, "rm -rf opt/app && echo f > opt/app");
        sh_in(m, "rm -rf usr && mkdir -p usr/local/bin && echo s > usr/local/bin/s");
        sh_in(m, "rm -rf data");
    });
}

#[test]
fn round_trip_oci_lowers() {
    round_trip(
        |l| {
            l.lower(1).file("lib/keep", "k").file("lib/drop", "d").file("cache/old", "o");
            l.lower(0).oci_whiteout("lib/drop").oci_opaque("cache").file("cache/fresh", "f");
        },
        |m| {
            fs::write(m.join("lib/drop"), "again").unwrap();
            fs::remove_file(m.join("cache/fresh")).unwrap();
            fs::write(m.join("cache/old"), "again").unwrap();
        },
    );
}

#[test]
fn long_names_and_large_ids_use_pax() {
    let deep = format!("{}/{}", "d".repeat(150), "f".repeat(120));
    let (l, tar_bytes) = round_trip(base_image, |m| {
        fs::create_dir_all(m.join("d".repeat(150))).unwrap();
        fs::write(m.join(&deep), "deep").unwrap();
        let long_target = "t".repeat(150);
        symlink(&long_target, m.join("etc/longlink")).unwrap();
        fs::write(m.join("etc/bigid"), "").unwrap();
        lchown(&m.join("etc/bigid"), 3_000_000, 3_000_001).unwrap();
    });
    let list = members(&tar_bytes);
    assert!(list.iter().any(|(p, k, _, _, _)| *p == deep && *k == 'f'), "{list:?}");
    assert!(list.iter().any(|(p, _, _, link, _)| p == "etc/longlink" && *link == "t".repeat(150)));
    assert!(list.iter().any(|(p, _, _, _, uid)| p == "etc/bigid" && *uid == 3_000_000));
    // GNU tar agrees on the numbers too.
    let o = run(
        Command::new("tar").arg("--numeric-owner").arg("-tvf").arg(l.root().join("layer.tar")),
        Duration::from_secs(30),
    );
    assert!(
        o.stdout.lines().any(|line| line.contains("3000000/3000001") && line.ends_with("etc/bigid")),
        "{}",
        o.stdout
    );
}

#[test]
fn identity_compression_and_determinism() {
    let l = Layers::new(2);
    base_image(&l);
    {
        let _one_at_a_time = mount_lock();
        let m = StrataMount::mount(&l);
        sh_in(&m.mnt, "echo hello > etc/new && rm -rf opt/app && mkdir -p srv/x && echo y > srv/x/y");
        m.umount();
    }
    let args = offline_args(&l);
    let plain = l.root().join("layer.tar");
    let (diff_id, digest, size) = commit(&args, &plain, &["--compression", "none"]);
    let bytes = fs::read(&plain).unwrap();
    assert_eq!(diff_id, sha256_prefixed(&bytes));
    assert_eq!(digest, diff_id);
    assert_eq!(size, bytes.len() as u64);
    assert_eq!(bytes.len() % 512, 0);
    for (name, flag) in [("layer.tar.gz", "gzip"), ("layer.tar.zst", "zstd")] {
        let out = l.root().join(name);
        let (d, g, n) = commit(&args, &out, &["--compression", flag]);
        let blob = fs::read(&out).unwrap();
        assert_eq!(d, diff_id, "{flag}: the diff_id is that of the uncompressed tar");
        assert_eq!(g, sha256_prefixed(&blob), "{flag}: digest");
        assert_eq!(n, blob.len() as u64, "{flag}: size");
        let mut unpacked = Vec::new();
        if flag == "gzip" {
            flate2::read::GzDecoder::new(blob.as_slice()).read_to_end(&mut unpacked).unwrap();
        } else {
            unpacked = zstd::decode_all(blob.as_slice()).unwrap();
        }
        assert!(unpacked == bytes, "{flag}: decompresses to the plain tar");
        // Byte-identical on a second run.
        let again = l.root().join(format!("again-{name}"));
        let (_, g2, _) = commit(&args, &again, &["--compression", flag]);
        assert_eq!(g2, g, "{flag}: not deterministic");
    }
    // Times are whole seconds; --reproducible clamps them.
    let clamped = l.root().join("clamped.tar");
    commit(&args, &clamped, &["--reproducible=1000"]);
    let mut archive = tar::Archive::new(fs::File::open(&clamped).unwrap());
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        assert!(entry.header().mtime().unwrap() <= 1000);
        assert!(entry.header().username_bytes().unwrap_or_default().is_empty());
    }
}

#[test]
fn refuses_upper_names_that_read_as_whiteouts() {
    let l = Layers::new(1);
    l.lower(0).file("a", "a");
    l.upper.file(".wh.stray", "not a whiteout");
    let mut args = vec!["commit".to_string()];
    args.extend(offline_args(&l));
    args.extend(["--output".to_string(), s(&l.root().join("x.tar"))]);
    let o = strata(&args);
    assert!(!o.success());
    assert!(o.stderr.contains("/.wh.stray") && o.stderr.contains("whiteout"), "{}", o.stderr);
    assert!(!l.root().join("x.tar").exists() && !l.root().join("x.tar.partial").exists(), "no half-written file");
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let data = fs::read(layout.join("blobs/sha256").join(hex)).expect("blob");
    assert_eq!(sha256_prefixed(&data), digest, "blob content matches its name");
    data
}

fn json_blob(layout: &Path, digest: &str) -> serde_json::Value {
    serde_json::from_slice(&blob(layout, digest)).expect("JSON blob")
}

fn manifest_of(layout: &Path, tag: &str) -> serde_json::Value {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entries: Vec<&serde_json::Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .collect();
    assert_eq!(entries.len(), 1, "one index entry for {tag}: {index}");
    json_blob(layout, entries[0]["digest"].as_str().unwrap())
}

#[test]
fn image_layout_gets_a_new_image_on_top_of_the_base() {
    let l = Layers::new(1);
    l.lower(0).file("etc/a", "a\n").file("opt/app/x", "x").symlink("etc/l", "a");
    let layout = l.root().join("layout");
    // The base image: the lower layer as the only layer (committed from an
    // empty lower, with the lower as upper).
    let empty = l.root().join("empty");
    fs::create_dir(&empty).unwrap();
    let base_args = vec!["--lower".to_string(), s(&empty), "--upper".to_string(), s(&l.lower(0).path)];
    let mut full = vec!["commit".to_string()];
    full.extend(base_args);
    full.extend(["--image".to_string(), format!("{}:base", s(&layout))]);
    let o = strata(&full);
    assert!(o.success(), "{o:?}");
    assert!(layout.join("oci-layout").is_file());

    let merged = {
        let _one_at_a_time = mount_lock();
        let m = StrataMount::mount(&l);
        sh_in(&m.mnt, "echo b >> etc/a && rm -rf opt/app && mkdir -p srv && echo s > srv/s");
        let merged = tree_snapshot(&m.mnt);
        let o = strata([
            "commit".to_string(),
            s(&m.mnt),
            "--image".to_string(),
            format!("{}:v2", s(&layout)),
            "--from".to_string(),
            "base".to_string(),
            "--compression".to_string(),
            "gzip".to_string(),
            "--reproducible=1700000000".to_string(),
        ]);
        assert!(o.success(), "{o:?}");
        assert!(o.stdout.contains("manifest sha256:"), "{}", o.stdout);
        m.umount();
        merged
    };

    let base = manifest_of(&layout, "base");
    let v2 = manifest_of(&layout, "v2");
    assert_eq!(v2["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let layers = v2["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0], base["layers"][0], "the base layer is shared");
    assert_eq!(layers[1]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let config = json_blob(&layout, v2["config"]["digest"].as_str().unwrap());
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), 2);
    assert_eq!(config["history"].as_array().unwrap().len(), 2);
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");

    // Read back: every layer checked against its diff_id and applied in order.
    let root = l.root().join("unpacked");
    fs::create_dir(&root).unwrap();
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let data = blob(&layout, layer["digest"].as_str().unwrap());
        assert_eq!(layer["size"], data.len() as u64);
        let tar_bytes = if layer["mediaType"].as_str().unwrap().ends_with("+gzip") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(data.as_slice()).read_to_end(&mut out).unwrap();
            out
        } else {
            data
        };
        assert_eq!(sha256_prefixed(&tar_bytes), diff_id.as_str().unwrap());
        apply_layer(&root, &tar_bytes);
    }
    let mut got = tree_snapshot(&root);
    let mut want = merged;
    got.remove(Path::new(""));
    want.remove(Path::new(""));
    assert_same_tree("the mount", &want, "the image read back", &got);
}

// ---------------------------------------------------------------------------
// Uppers written by the kernel's overlayfs (redirect_dir=on): the kernel is
// the container view, strata diff and commit read its upper at rest.
// ---------------------------------------------------------------------------

fn kernel_scenario(act: impl FnOnce(&Path), expected: &[&str]) {
    let l = Layers::new(2);
    base_image(&l);
    let want = lines(expected);
    let merged = {
        let _one_at_a_time = mount_lock();
        let kernel = KernelOverlay::mount_layers(&l);
        act(&kernel.mnt);
        let merged = tree_snapshot(&kernel.mnt);
        let image = mount_image(&l);
        let oracle = two_tree_diff(&image.mnt, &kernel.mnt);
        image.umount();
        kernel.umount();
        assert_eq!(oracle, want, "the two-tree comparison of the kernel's views disagrees with the expectation");
        merged
    };
    assert_eq!(diff_output(&offline_args(&l)), want, "strata diff of the kernel's upper");
    let out = l.root().join("layer.tar");
    commit(&offline_args(&l), &out, &[]);
    let applied = l.root().join("applied");
    fs::create_dir(&applied).unwrap();
    flatten_image(&l, &applied);
    apply_layer(&applied, &fs::read(&out).unwrap());
    let mut got = tree_snapshot(&applied);
    let mut want_tree = merged;
    got.remove(Path::new(""));
    want_tree.remove(Path::new(""));
    assert_same_tree("the kernel's mount", &want_tree, "image + layer", &got);
}

#[test]
fn kernel_upper_issue_example() {
    kernel_scenario(
        |m| sh_in(m, "rm -rf opt/app && mkdir opt/app && echo n > opt/app/new"),
        &["C /opt", "C /opt/app", "A /opt/app/new", "D /opt/app/old1", "D /opt/app/old2", "D /opt/app/sub"],
    );
}

#[test]
fn kernel_upper_renamed_directories() {
    // Across directories the kernel writes an absolute redirect, within one
    // a relative one.
    kernel_scenario(
        |m| {
            fs::rename(m.join("opt/app"), m.join("srv/app")).unwrap();
            fs::rename(m.join("opt/other"), m.join("opt/renamed")).unwrap();
            fs::write(m.join("opt/renamed/z"), "z").unwrap();
        },
        &[
            "C /opt",
            "A /opt/renamed",
            "A /opt/renamed/y",
            "A /opt/renamed/z",
            "D /opt/app",
            "D /opt/other",
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
fn kernel_upper_swapped_directories_and_changes() {
    kernel_scenario(
        |m| {
            fs::rename(m.join("opt/app"), m.join("tmp/app")).unwrap();
            fs::rename(m.join("opt/other"), m.join("opt/app")).unwrap();
            fs::set_permissions(m.join("etc/hosts"), fs::Permissions::from_mode(0o600)).unwrap();
            fs::remove_file(m.join("etc/b.conf")).unwrap();
            fs::write(m.join("var/gone"), "back").unwrap();
        },
        &[
            "C /etc",
            "C /etc/hosts",
            "D /etc/b.conf",
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
            "C /var",
            "A /var/gone",
        ],
    );
}

#[test]
fn rootless_xattr_whiteouts() {
    // The kernel's userxattr format: an empty file marked
    // user.overlay.whiteout, in a directory marked user.overlay.opaque=x.
    let l = Layers::new(1);
    l.lower(0).file("etc/a", "a").file("etc/hosts", "h").dir("lib/old").file("lib/old/f", "f");
    l.upper.dir("etc").xattr("etc", "user.overlay.opaque", b"x").file("etc/a", "");
    l.upper.xattr("etc/a", "user.overlay.whiteout", b"y");
    l.upper.opaque("lib", "user.overlay.opaque").file("lib/new", "n");
    assert_eq!(diff_output(&offline_args(&l)), lines(&["C /etc", "D /etc/a", "C /lib", "A /lib/new", "D /lib/old"]));
    let out = l.root().join("layer.tar");
    commit(&offline_args(&l), &out, &[]);
    let names: Vec<String> = members(&fs::read(&out).unwrap()).into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["etc/", "etc/.wh.a", "lib/", "lib/.wh..wh..opq", "lib/new"]);
    // The markers are not user data: no PAX records for them.
    let mut archive = tar::Archive::new(fs::File::open(&out).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        assert!(entry.pax_extensions().unwrap().is_none(), "{:?} has PAX records", entry.path());
    }
}

#[test]
fn refuses_metacopy_uppers() {
    let l = Layers::new(1);
    l.lower(0).file("big", "data");
    l.upper.file("big", "").xattr("big", "trusted.overlay.metacopy", b"");
    let mut args = vec!["commit".to_string()];
    args.extend(offline_args(&l));
    args.extend(["--output".to_string(), s(&l.root().join("x.tar"))]);
    let o = strata(&args);
    assert!(!o.success());
    assert!(o.stderr.contains("/big") && o.stderr.contains("metacopy"), "{}", o.stderr);
}

#[test]
fn kernel_upper_nested_renames() {
    // The inner directory's redirect is relative to its renamed parent.
    kernel_scenario(
        |m| {
            fs::rename(m.join("opt/app"), m.join("opt/app2")).unwrap();
            fs::rename(m.join("opt/app2/sub"), m.join("opt/app2/sub2")).unwrap();
            fs::write(m.join("opt/app2/sub2/w"), "w").unwrap();
        },
        &[
            "C /opt",
            "A /opt/app2",
            "A /opt/app2/old1",
            "A /opt/app2/old2",
            "A /opt/app2/sub2",
            "A /opt/app2/sub2/w",
            "A /opt/app2/sub2/x",
            "D /opt/app",
        ],
    );
}

// ---------------------------------------------------------------------------
// Random operations: diff against the two-tree comparison, commit round trip.
// ---------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Every path of the mounted tree (relative), directories flagged.
fn all_paths(root: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel)).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for name in names {
            let child = rel.join(name);
            let is_dir = fs::symlink_metadata(root.join(&child)).map(|m| m.is_dir()).unwrap_or(false);
            if is_dir {
                stack.push(child.clone());
            }
            out.push((child, is_dir));
        }
    }
    out
}

/// Whether writing to `p` (following a symlink) cannot block: it is a
/// regular file or nothing at all (a fifo would wait for a reader).
fn writable(p: &Path) -> bool {
    match fs::metadata(p) {
        Ok(md) => md.is_file(),
        Err(_) => true,
    }
}

/// One random operation in the mount; failures (EEXIST, ENOTEMPTY, EINVAL
/// for a directory moved into itself...) are part of the game and ignored.
fn random_operation(m: &Path, rng: &mut Rng, counter: &mut u32) {
    let paths = all_paths(m);
    let dirs: Vec<PathBuf> =
        std::iter::once(PathBuf::new()).chain(paths.iter().filter(|p| p.1).map(|p| p.0.clone())).collect();
    let any: Vec<PathBuf> = paths.iter().map(|p| p.0.clone()).collect();
    *counter += 1;
    let fresh = format!("n{counter}");
    let names = ["a", "old1", "sub", "y", "x", "gone", &fresh];
    match rng.below(12) {
        0 => {
            let p = m.join(rng.pick(&dirs)).join(rng.pick(&names));
            if writable(&p) {
                let _ = fs::write(p, format!("data {counter}"));
            }
        }
        1 if !any.is_empty() => {
            let p = m.join(rng.pick(&any));
            if writable(&p) {
                let _ = append(&p, b"+");
            }
        }
        2 if !any.is_empty() => {
            let p = m.join(rng.pick(&any));
            if !fs::symlink_metadata(&p).map(|md| md.file_type().is_symlink()).unwrap_or(true) {
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(*rng.pick(&[0o700, 0o755, 0o640, 0o4755])));
            }
        }
        3 if !any.is_empty() => {
            let _ = lchown(&m.join(rng.pick(&any)), 1000 + rng.below(2) as u32, 1000);
        }
        4 if !any.is_empty() => {
            let p = m.join(rng.pick(&any));
            let _ = if p.is_dir() && !p.is_symlink() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
        5 => {
            let _ = fs::create_dir(m.join(rng.pick(&dirs)).join(rng.pick(&names)));
        }
        6 | 7 if !any.is_empty() => {
            let from = m.join(rng.pick(&any));
            let to = m.join(rng.pick(&dirs)).join(rng.pick(&names));
            let _ = fs::rename(from, to);
        }
        8 => {
            let _ = symlink(rng.pick(&names), m.join(rng.pick(&dirs)).join(rng.pick(&names)));
        }
        9 if !any.is_empty() => {
            let from = m.join(rng.pick(&any));
            if fs::symlink_metadata(&from).map(|md| md.is_file()).unwrap_or(false) {
                let _ = fs::hard_link(from, m.join(rng.pick(&dirs)).join(&fresh));
            }
        }
        10 if !any.is_empty() => {
            let p = m.join(rng.pick(&any));
            let _ = set_times(&p, (T0 + 5, 0), (T0 + rng.below(2) as i64, 0));
        }
        _ => {
            let _ = mkfifo(&m.join(rng.pick(&dirs)).join(&fresh), 0o644);
        }
    }
}

#[test]
fn random_operations() {
    // STRATA_RANDOM_SEEDS=N runs more.
    let seeds: u64 = std::env::var("STRATA_RANDOM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(25);
    for seed in 1..=seeds {
        let l = Layers::new(2);
        base_image(&l);
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let (merged, expected) = {
            let _one_at_a_time = mount_lock();
            let m = StrataMount::mount(&l);
            let mut counter = 0;
            for _ in 0..(5 + rng.below(40)) {
                random_operation(&m.mnt, &mut rng, &mut counter);
            }
            let merged = tree_snapshot(&m.mnt);
            let image = mount_image(&l);
            let expected = two_tree_diff(&image.mnt, &m.mnt);
            image.umount();
            m.umount();
            (merged, expected)
        };
        assert_eq!(diff_output(&offline_args(&l)), expected, "seed {seed}: offline diff");
        let out = l.root().join("layer.tar");
        commit(&offline_args(&l), &out, &[]);
        let applied = l.root().join("applied");
        fs::create_dir(&applied).unwrap();
        flatten_image(&l, &applied);
        apply_layer(&applied, &fs::read(&out).unwrap());
        let mut got = tree_snapshot(&applied);
        let mut want = merged;
        got.remove(Path::new(""));
        want.remove(Path::new(""));
        assert_same_tree(&format!("seed {seed}: the mount"), &want, "image + layer", &got);
    }
}

#[test]
fn output_to_stdout_and_clear_errors() {
    let l = Layers::new(1);
    l.lower(0).file("a", "a");
    l.upper.file("b", "b");
    let mut args = vec!["commit".to_string()];
    args.extend(offline_args(&l));
    args.extend(["--output".to_string(), "-".to_string()]);
    let o = run(Command::new(strata_bin()).args(&args), Duration::from_secs(30));
    assert!(o.success(), "{o:?}");
    // The report goes to standard error when the layer goes to standard output.
    assert!(o.stderr.contains("diff_id sha256:"), "{}", o.stderr);
    let file = l.root().join("b.tar");
    commit(&offline_args(&l), &file, &[]);
    assert_eq!(o.stdout.as_bytes(), fs::read(&file).unwrap().as_slice());

    let fail = |args: &[String], needle: &str| {
        let mut full = vec!["commit".to_string()];
        full.extend(args.iter().cloned());
        let o = strata(&full);
        assert!(!o.success(), "strata {full:?} must fail");
        assert!(o.stderr.contains(needle), "strata {full:?}: {:?} must mention {needle:?}", o.stderr);
    };
    fail(&offline_args(&l), "--output");
    let mut bad = offline_args(&l);
    bad.extend(["--output".to_string(), s(&file), "--reproducible=soon".to_string()]);
    fail(&bad, "not a number");
    let _one_at_a_time = mount_lock();
    let ro = StrataMount::mount_ro(&l);
    fail(&[s(&ro.mnt), "--output".to_string(), s(&file)], "read-only");
    ro.umount();
}
