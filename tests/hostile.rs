//! A hostile corpus: layer tarballs and archives that try to write outside
//! the store, forge whiteouts, lie about digests and sizes, end early or
//! explode. Each is refused (the import fails, naming the problem, and
//! leaves no layer, image or temporary file behind) or contained (imported,
//! with everything inside the layer's directory). After every case nothing
//! outside the store has changed.

mod common;
mod imagekit;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use imagekit::*;

enum Expect {
    /// The import fails and stderr contains this.
    Refused(&'static str),
    /// The import succeeds; the check runs on the extracted layer root.
    Contained(fn(&Path)),
}

struct Case {
    name: &'static str,
    /// Builds the archive (an OCI layout directory) at the given path; gets
    /// the sandbox's `outside` directory, the attacker's target.
    build: fn(&Path, &Path),
    expect: Expect,
    extra_args: &'static [&'static str],
}

/// A one-layer image in an OCI layout directory.
fn one_layer(dir: &Path, tar: Vec<u8>, comp: Comp) {
    oci_layout(&[Image::new("hostile:1", vec![ImageLayer::new(tar, comp)])], false).write_dir(dir);
}

fn tar_of(members: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = members.concat();
    out.extend(end_of_archive());
    out
}

fn file(name: &[u8], data: &[u8]) -> Vec<u8> {
    raw_member(name, b'0', data, b"")
}

fn outside_str(outside: &Path) -> String {
    outside.display().to_string()
}

/// Walk a tree without following symlinks: path -> (kind, size, content hash).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else { continue };
        let desc = if m.is_dir() {
            for e in fs::read_dir(&p).expect("read_dir").flatten() {
                stack.push(e.path());
            }
            "dir".to_string()
        } else if m.is_file() {
            format!("file {} {}", m.len(), sha256_file(&p).unwrap_or_default())
        } else {
            format!("other {:?}", m.file_type())
        };
        out.insert(p, desc);
    }
    out
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "dotdot traversal",
            build: |d, _| one_layer(d, tar_of(&[file(b"../../escape", b"x")]), Comp::None),
            expect: Expect::Refused("`..`"),
            extra_args: &[],
        },
        Case {
            name: "dotdot in the middle",
            build: |d, _| one_layer(d, tar_of(&[file(b"a/../../../escape", b"x")]), Comp::Gzip),
            expect: Expect::Refused("`..`"),
            extra_args: &[],
        },
        Case {
            name: "absolute name is made relative",
            build: |d, outside| {
                let name = format!("{}/absolute", outside_str(outside));
                one_layer(d, tar_of(&[file(name.as_bytes(), b"x")]), Comp::None)
            },
            expect: Expect::Contained(|root| {
                let found = snapshot(root).keys().any(|p| p.ends_with("outside/absolute"));
                assert!(found, "the absolute member lands inside the layer");
            }),
            extra_args: &[],
        },
        Case {
            name: "symlink parent escape (relative)",
            build: |d, _| {
                let tar = tar_of(&[
                    raw_member(b"link", b'2', b"", b"../../../../../../../../../../tmp"),
                    file(b"link/pwned", b"x"),
                ]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Refused("symlink"),
            extra_args: &[],
        },
        Case {
            name: "symlink parent escape (absolute)",
            build: |d, outside| {
                let tar = tar_of(&[
                    raw_member(b"link", b'2', b"", outside_str(outside).as_bytes()),
                    file(b"link/pwned", b"x"),
                ]);
                one_layer(d, tar, Comp::Zstd)
            },
            expect: Expect::Refused("symlink"),
            extra_args: &[],
        },
        Case {
            name: "symlink to a directory, then a directory entry through it",
            build: |d, outside| {
                let tar = tar_of(&[
                    raw_member(b"d", b'2', b"", outside_str(outside).as_bytes()),
                    raw_member(b"d/sub/", b'5', b"", b""),
                ]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Refused("symlink"),
            extra_args: &[],
        },
        Case {
            name: "symlink then a file of the same name replaces the link",
            build: |d, outside| {
                let victim = format!("{}/victim", outside_str(outside));
                let tar = tar_of(&[raw_member(b"x", b'2', b"", victim.as_bytes()), file(b"x", b"overwritten?")]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Contained(|root| {
                assert_eq!(fs::read(root.join("x")).expect("x"), b"overwritten?");
                assert!(!fs::symlink_metadata(root.join("x")).expect("x").file_type().is_symlink());
            }),
            extra_args: &[],
        },
        Case {
            name: "symlink then a directory of the same name replaces the link",
            build: |d, outside| {
                let tar = tar_of(&[
                    raw_member(b"x", b'2', b"", outside_str(outside).as_bytes()),
                    raw_member(b"x/", b'5', b"", b""),
                    file(b"x/inside", b"ok"),
                ]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Contained(|root| {
                assert_eq!(fs::read(root.join("x/inside")).expect("x/inside"), b"ok");
            }),
            extra_args: &[],
        },
        Case {
            name: "hard link outside with dotdot",
            build: |d, _| one_layer(d, tar_of(&[raw_member(b"h", b'1', b"", b"../../outside/victim")]), Comp::None),
            expect: Expect::Refused("`..`"),
            extra_args: &[],
        },
        Case {
            name: "hard link to an absolute host file",
            build: |d, outside| {
                let victim = format!("{}/victim", outside_str(outside));
                one_layer(d, tar_of(&[raw_member(b"h", b'1', b"", victim.as_bytes())]), Comp::None)
            },
            expect: Expect::Refused("not an earlier member"),
            extra_args: &[],
        },
        Case {
            name: "hard link through a symlinked parent",
            build: |d, outside| {
                let tar = tar_of(&[
                    raw_member(b"l", b'2', b"", outside_str(outside).as_bytes()),
                    raw_member(b"h", b'1', b"", b"l/victim"),
                ]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Refused("not an earlier member"),
            extra_args: &[],
        },
        Case {
            name: "hard link to a later member",
            build: |d, _| {
                one_layer(d, tar_of(&[raw_member(b"h", b'1', b"", b"later"), file(b"later", b"x")]), Comp::None)
            },
            expect: Expect::Refused("not an earlier member"),
            extra_args: &[],
        },
        Case {
            name: "whiteout of nothing",
            build: |d, _| one_layer(d, tar_of(&[file(b"dir/.wh.", b"")]), Comp::None),
            expect: Expect::Refused("whiteout"),
            extra_args: &[],
        },
        Case {
            name: "whiteout of dot",
            build: |d, _| one_layer(d, tar_of(&[file(b".wh..", b"")]), Comp::None),
            expect: Expect::Refused("whiteout"),
            extra_args: &[],
        },
        Case {
            name: "whiteout of dotdot",
            build: |d, _| one_layer(d, tar_of(&[file(b"a/.wh...", b"")]), Comp::None),
            expect: Expect::Refused("whiteout"),
            extra_args: &[],
        },
        Case {
            name: "forged overlay and trusted xattrs are dropped",
            build: |d, _| {
                let tar = tar_of(&[
                    raw_pax(&[
                        ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                        ("SCHILY.xattr.user.overlay.opaque", b"y"),
                        ("SCHILY.xattr.trusted.evil", b"1"),
                        ("SCHILY.xattr.security.selinux", b"system_u:object_r:shadow_t:s0"),
                        ("SCHILY.xattr.user.fine", b"kept"),
                    ]),
                    raw_member(b"dir/", b'5', b"", b""),
                ]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Contained(|root| {
                let names = llistxattr(&root.join("dir")).expect("listxattr");
                assert!(names.iter().all(|n| !n.starts_with("trusted.") && !n.contains(".overlay.")), "{names:?}");
                assert_eq!(lgetxattr(&root.join("dir"), "user.fine").expect("user.fine"), b"kept");
            }),
            extra_args: &[],
        },
        Case {
            name: "PAX path with dotdot",
            build: |d, _| {
                one_layer(d, tar_of(&[raw_pax(&[("path", b"../../pax-escape")]), file(b"innocent", b"x")]), Comp::None)
            },
            expect: Expect::Refused("`..`"),
            extra_args: &[],
        },
        Case {
            name: "GNU long name with dotdot",
            build: |d, _| {
                let long = format!("{}{}gnu-escape", "a/".repeat(60), "../".repeat(70));
                let tar = tar_of(&[raw_member(b"././@LongLink", b'L', long.as_bytes(), b""), file(b"short", b"x")]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Refused("`..`"),
            extra_args: &[],
        },
        Case {
            name: "huge PAX header (bounded memory)",
            build: |d, _| {
                let mut header = raw_header(b"PaxHeader", b'x', 2 << 20, b"");
                fix_checksum(&mut header);
                one_layer(d, tar_of(&[header]), Comp::None)
            },
            expect: Expect::Refused("larger than"),
            extra_args: &[],
        },
        Case {
            name: "name longer than PATH_MAX",
            build: |d, _| {
                let long = "d/".repeat(2100) + "f";
                let tar = tar_of(&[raw_member(b"././@LongLink", b'L', long.as_bytes(), b""), file(b"short", b"x")]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Refused("PATH_MAX"),
            extra_args: &[],
        },
        Case {
            name: "unknown member type",
            build: |d, _| one_layer(d, tar_of(&[raw_member(b"weird", b'Z', b"", b"")]), Comp::None),
            expect: Expect::Refused("does not extract"),
            extra_args: &[],
        },
        Case {
            name: "sparse member",
            build: |d, _| one_layer(d, tar_of(&[raw_member(b"sparse", b'S', b"", b"")]), Comp::None),
            expect: Expect::Refused("does not extract"),
            extra_args: &[],
        },
        Case {
            name: "bad header checksum",
            build: |d, _| {
                let mut member = file(b"f", b"x");
                member[0] = b'g'; // name changed after the checksum was computed
                one_layer(d, tar_of(&[member]), Comp::None)
            },
            expect: Expect::Refused("checksum"),
            extra_args: &[],
        },
        Case {
            name: "truncated tar stream",
            build: |d, _| {
                let member = raw_header(b"f", b'0', 10_000, b"");
                let mut tar = member;
                tar.extend(vec![1u8; 3000]);
                one_layer(d, tar, Comp::None)
            },
            expect: Expect::Refused("truncated"),
            extra_args: &[],
        },
        Case {
            name: "truncated gzip stream",
            build: |d, _| {
                let tar = LayerTar::new().file("f", vec![3u8; 200_000], 0o644).finish();
                let layer = ImageLayer::new(tar, Comp::Gzip);
                let mut cut = layer.clone();
                cut.blob.truncate(layer.blob.len() / 2);
                oci_layout(&[Image::new("hostile:1", vec![cut])], false).write_dir(d);
            },
            expect: Expect::Refused("layer 1/1"),
            extra_args: &[],
        },
        Case {
            name: "blob digest mismatch",
            build: |d, _| {
                let good = ImageLayer::new(LayerTar::new().file("f", "good", 0o644).finish(), Comp::Gzip);
                let mut image = Image::new("hostile:1", vec![good]);
                image.digest_override = Some(sha256(b"something else"));
                let files = oci_layout(&[image.clone()], false);
                files.write_dir(d);
                // Serve the real blob under the lying digest's name.
                let lie = d.join("blobs/sha256").join(hex(&sha256(b"something else")));
                fs::write(lie, &image.layers[0].blob).expect("write");
            },
            expect: Expect::Refused("sha256 mismatch"),
            extra_args: &[],
        },
        Case {
            name: "blob size mismatch",
            build: |d, _| {
                let good = ImageLayer::new(LayerTar::new().file("f", "good", 0o644).finish(), Comp::Zstd);
                let mut image = Image::new("hostile:1", vec![good]);
                image.size_skew = 1;
                oci_layout(&[image], false).write_dir(d);
            },
            expect: Expect::Refused("descriptor says"),
            extra_args: &[],
        },
        Case {
            name: "diff_id mismatch",
            build: |d, _| {
                let good = ImageLayer::new(LayerTar::new().file("f", "good", 0o644).finish(), Comp::Gzip);
                let mut image = Image::new("hostile:1", vec![good]);
                image.diff_ids_override = Some(vec![sha256(b"not the layer")]);
                oci_layout(&[image], false).write_dir(d);
            },
            expect: Expect::Refused("diff_id mismatch"),
            extra_args: &[],
        },
        Case {
            name: "trailing bytes after the archive count in the diff_id",
            build: |d, _| {
                let mut tar = LayerTar::new().file("f", "good", 0o644).finish();
                let layer = ImageLayer::new(tar.clone(), Comp::Gzip);
                tar.extend_from_slice(b"trailing garbage");
                let mut image = Image::new("hostile:1", vec![ImageLayer::new(tar, Comp::Gzip)]);
                // The config claims the diff_id of the stream without the trailer.
                image.diff_ids_override = Some(vec![layer.diff_id]);
                oci_layout(&[image], false).write_dir(d);
            },
            expect: Expect::Refused("diff_id mismatch"),
            extra_args: &[],
        },
        Case {
            name: "more layers than diff_ids",
            build: |d, _| {
                let a = ImageLayer::new(LayerTar::new().file("a", "a", 0o644).finish(), Comp::None);
                let b = ImageLayer::new(LayerTar::new().file("b", "b", 0o644).finish(), Comp::None);
                let mut image = Image::new("hostile:1", vec![a.clone(), b]);
                image.diff_ids_override = Some(vec![a.diff_id]);
                oci_layout(&[image], false).write_dir(d);
            },
            expect: Expect::Refused("diff_ids"),
            extra_args: &[],
        },
        Case {
            name: "digest that is a path",
            build: |d, _| {
                let index = serde_json::json!({ "schemaVersion": 2, "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "sha256:../../../../etc/passwd", "size": 10 }] });
                fs::create_dir_all(d).expect("mkdir");
                fs::write(d.join("index.json"), serde_json::to_vec(&index).expect("json")).expect("write");
            },
            expect: Expect::Refused("malformed digest"),
            extra_args: &[],
        },
        Case {
            name: "gzip bomb",
            build: |d, _| {
                // 64 MiB of zeros in one file, under 100 kB compressed.
                let mut header = raw_header(b"bomb", b'0', 64 << 20, b"");
                fix_checksum(&mut header);
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                use std::io::Write;
                e.write_all(&header).expect("gz");
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..64 {
                    e.write_all(&zeros).expect("gz");
                }
                e.write_all(&end_of_archive()).expect("gz");
                let blob = e.finish().expect("gz");
                let layer = ImageLayer {
                    tar: Vec::new(),
                    diff_id: sha256(b"whatever: the limit trips first"),
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                    blob,
                };
                oci_layout(&[Image::new("hostile:1", vec![layer])], false).write_dir(d);
            },
            expect: Expect::Refused("--max-layer-size"),
            extra_args: &["--max-layer-size", "16M"],
        },
        Case {
            name: "device nodes as root are made, inside the layer",
            build: |d, _| {
                let mut dev = raw_header(b"dev/null-ish", b'3', 0, b"");
                dev[329..337].copy_from_slice(b"0000001\0");
                dev[337..345].copy_from_slice(b"0000003\0");
                fix_checksum(&mut dev);
                one_layer(d, tar_of(&[raw_member(b"dev/", b'5', b"", b""), dev]), Comp::None)
            },
            expect: Expect::Contained(|root| {
                use std::os::unix::fs::FileTypeExt;
                let m = fs::symlink_metadata(root.join("dev/null-ish")).expect("device");
                assert!(m.file_type().is_char_device());
            }),
            extra_args: &[],
        },
    ]
}

#[test]
fn hostile_corpus_is_refused_or_contained() {
    let cases = cases();
    assert!(cases.len() >= 20, "the corpus has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let sandbox = test_tempdir();
        let outside = sandbox.path().join("outside");
        fs::create_dir_all(&outside).expect("mkdir outside");
        fs::write(outside.join("victim"), "original").expect("victim");
        let archive = sandbox.path().join("archive");
        (case.build)(&archive, &outside);
        let store = sandbox.path().join("store");
        let before_outside = snapshot(&outside);
        let before_archive = snapshot(&archive);
        let o = run(
            Command::new(strata_bin()).arg("import").arg("--store").arg(&store).arg(&archive).args(case.extra_args),
            Duration::from_secs(120),
        );
        eprintln!("{:<60} {}", case.name, o.stderr.lines().next().unwrap_or("(imported)"));
        let mut problems = Vec::new();
        if o.stderr.contains("panicked") || o.status.is_none() {
            problems.push(format!("crashed or hung: {}", o.stderr));
        }
        match &case.expect {
            Expect::Refused(why) => {
                if o.success() {
                    problems.push("was imported".to_string());
                } else if !o.stderr.contains(why) {
                    problems.push(format!("refused without saying {why:?}: {}", o.stderr.trim()));
                }
                for sub in ["layers", "images", "tmp"] {
                    let left: Vec<String> = fs::read_dir(store.join(sub))
                        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                        .unwrap_or_default();
                    if !left.is_empty() {
                        problems.push(format!("left {sub}/{left:?} in the store"));
                    }
                }
            }
            Expect::Contained(check) => {
                if !o.success() {
                    problems.push(format!("was refused: {}", o.stderr.trim()));
                } else {
                    let layers: Vec<PathBuf> = fs::read_dir(store.join("layers"))
                        .expect("layers")
                        .flatten()
                        .map(|e| e.path().join("root"))
                        .collect();
                    assert_eq!(layers.len(), 1, "{}", case.name);
                    check(&layers[0]);
                }
            }
        }
        if snapshot(&outside) != before_outside {
            problems.push("changed the outside directory".to_string());
        }
        if snapshot(&archive) != before_archive {
            problems.push("changed the archive".to_string());
        }
        // Anything named like an escape, anywhere but inside the store's layers.
        let layers_dir = store.join("layers");
        for path in snapshot(sandbox.path()).keys() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if (name.contains("escape") || name.contains("pwned")) && !path.starts_with(&layers_dir) {
                problems.push(format!("wrote {}", path.display()));
            }
        }
        for path in ["/tmp/pwned", "/var/tmp/pwned", "/escape", "/pax-escape", "/gnu-escape"] {
            if Path::new(path).exists() {
                problems.push(format!("wrote {path}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "hostile cases not handled:\n  {}", failures.join("\n  "));
}
