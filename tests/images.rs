//! Images end to end: build images in every archive shape, import them,
//! mount them by name and compare the merged tree with the layers applied
//! independently; the shared store, rmi and prune; ephemeral and writable
//! image mounts; whence and layers.

mod common;
mod imagekit;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use imagekit::*;

/// A test's sandbox: a store, a mount point, and room for archives.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let s = Sandbox { dir: test_tempdir() };
        fs::create_dir_all(s.mnt()).expect("mkdir mnt");
        s
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn store(&self) -> PathBuf {
        self.p("store")
    }

    fn mnt(&self) -> PathBuf {
        self.p("mnt")
    }

    /// `strata SUBCOMMAND --store STORE ARGS...`
    fn strata(&self, sub: &str, args: &[&str]) -> RunOutput {
        let mut cmd = Command::new(strata_bin());
        cmd.arg(sub).arg("--store").arg(self.store()).args(args);
        run(&mut cmd, Duration::from_secs(120))
    }

    #[track_caller]
    fn ok(&self, sub: &str, args: &[&str]) -> String {
        let o = self.strata(sub, args);
        assert!(o.success(), "strata {sub} {args:?} failed:\nstdout: {}\nstderr: {}", o.stdout, o.stderr);
        o.stdout
    }

    fn import(&self, path: &Path, extra: &[&str]) -> String {
        let mut args = vec![path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        self.ok("import", &args)
    }

    /// `strata mount --image NAME [EXTRA] MNT`, unmounted when dropped.
    fn mount(&self, image: &str, extra: &[&str]) -> StrataMount {
        let store = self.store().display().to_string();
        let mut args: Vec<String> = vec!["mount".into(), "--image".into(), image.into(), "--store".into(), store];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.mnt().display().to_string());
        StrataMount::from_args(&args, &self.mnt())
    }

    fn layer_dirs(&self) -> Vec<String> {
        ls(&self.store().join("layers"))
    }
}

// ---------------------------------------------------------------------------
// A rich three-layer image
// ---------------------------------------------------------------------------

fn long_path() -> String {
    format!("deep/{}/{}", "n".repeat(120), "f".repeat(150))
}

fn base_layer() -> Vec<u8> {
    LayerTar::new()
        .dir("etc", 0o755)
        .file("etc/hostname", "base\n", 0o644)
        .file("etc/remove-me", "doomed", 0o644)
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .file_xattrs("etc/with-xattr", b"x", &[("user.test", b"hello"), ("trusted.overlay.opaque", b"y")])
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", "#!/bin/sh\necho tool\n", 0o755)
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .file("usr/bin/suid", "suid", 0o4755)
        .symlink("bin", "usr/bin")
        .dir("var", 0o755)
        .dir("var/lib", 0o755)
        .dir("var/lib/app", 0o750)
        .file_owned("var/lib/app/data", "owned", 0o640, 1000, 1000)
        .dir("tmp", 0o1777)
        .dir("run", 0o755)
        .fifo("run/fifo")
        .dir("opt", 0o755)
        .dir("opt/stuff", 0o755)
        .file("opt/stuff/a", "a", 0o644)
        .file("opt/stuff/b", "b", 0o644)
        .dir("srv", 0o755)
        .dir("srv/old", 0o755)
        .file("srv/old/x", vec![b'x'; 5000], 0o644)
        .file("srv/old/y", "y", 0o644)
        .dir("deep", 0o755)
        .dir(&format!("deep/{}", "n".repeat(120)), 0o755)
        .file(&long_path(), "long name", 0o644)
        .finish()
}

fn app_layer() -> Vec<u8> {
    LayerTar::new()
        .dir("etc", 0o755)
        .whiteout("etc/remove-me")
        .file("etc/hostname", "app\n", 0o644)
        .dir("srv", 0o755)
        .whiteout("srv/old")
        .dir("opt", 0o755)
        .dir("opt/stuff", 0o755)
        .opaque("opt/stuff")
        .file("opt/stuff/c", "c", 0o644)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        // The kernel's whiteout form, as a tar of an overlay upper has it.
        .chardev("usr/bin/tool2", 0, 0)
        .dir("app", 0o755)
        .file("app/a", "linked", 0o600)
        .hardlink("app/b", "app/a")
        .file("app/big", vec![7u8; 100_000], 0o644)
        .finish()
}

fn top_layer() -> Vec<u8> {
    LayerTar::new()
        // Whiteout and re-creation in one layer: an opaque srv.
        .whiteout("srv")
        .dir("srv", 0o700)
        .file("srv/new", "new", 0o644)
        .dir("app", 0o755)
        .file("app/big", "small now", 0o644)
        .dir("etc", 0o755)
        .file("etc/hostname", "top\n", 0o644)
        .finish()
}

fn rich_image(name: &str) -> (Image, Vec<Vec<u8>>) {
    let tars = vec![base_layer(), app_layer(), top_layer()];
    let layers = vec![
        ImageLayer::new(tars[0].clone(), Comp::Gzip),
        ImageLayer::new(tars[1].clone(), Comp::Zstd),
        ImageLayer::new(tars[2].clone(), Comp::None),
    ];
    (Image::new(name, layers), tars)
}

/// The docker save shape uses uncompressed layers (what Docker <= 24 wrote).
fn rich_image_uncompressed(name: &str) -> (Image, Vec<Vec<u8>>) {
    let tars = vec![base_layer(), app_layer(), top_layer()];
    let layers = tars.iter().map(|t| ImageLayer::new(t.clone(), Comp::None)).collect();
    (Image::new(name, layers), tars)
}

fn reference_tree(sandbox: &Sandbox, tars: &[Vec<u8>]) -> PathBuf {
    let reference = sandbox.p("reference");
    let _ = fs::remove_dir_all(&reference);
    let slices: Vec<&[u8]> = tars.iter().map(Vec::as_slice).collect();
    apply_layers(&reference, &slices);
    reference
}

#[track_caller]
fn check_mounted_image(sandbox: &Sandbox, image: &str, tars: &[Vec<u8>]) {
    let reference = reference_tree(sandbox, tars);
    let mount = sandbox.mount(image, &[]);
    assert_same_tree("reference", &tree_snapshot(&reference), "strata mount", &tree_snapshot(&mount.mnt));
    // Spot checks of what the comparison covers.
    assert_eq!(read_string(&mount.p("etc/hostname")), "top\n");
    assert!(absent(&mount.p("etc/remove-me")));
    assert_eq!(ls(&mount.p("srv")), ["new"]);
    assert_eq!(ls(&mount.p("opt/stuff")), ["c"]);
    assert!(absent(&mount.p("usr/bin/tool2")), "a char 0/0 member is a whiteout");
    assert_eq!(read_string(&mount.p(&long_path())), "long name");
    assert_eq!(lgetxattr(&mount.p("etc/with-xattr"), "user.test").expect("user xattr"), b"hello");
    assert!(lgetxattr(&mount.p("etc/with-xattr"), "trusted.overlay.opaque").is_err());
    use std::os::unix::fs::MetadataExt;
    let a = fs::metadata(mount.p("app/a")).expect("stat a");
    let b = fs::metadata(mount.p("app/b")).expect("stat b");
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "a hard link pair stays one inode");
    assert_eq!(fs::metadata(mount.p("usr/bin/suid")).expect("suid").mode() & 0o7777, 0o4755);
    mount.umount();
}

#[test]
fn oci_layout_directory() {
    let s = Sandbox::new();
    let (image, tars) = rich_image("rich:oci");
    oci_layout(&[image], false).write_dir(&s.p("layout"));
    let out = s.import(&s.p("layout"), &[]);
    assert!(out.contains("3 extracted"), "{out}");
    check_mounted_image(&s, "rich:oci", &tars);
}

#[test]
fn kernel_whiteouts_are_stored_in_the_oci_form() {
    let s = Sandbox::new();
    let (image, _) = rich_image("rich:form");
    let app = hex(&image.layers[1].diff_id).to_string();
    oci_layout(&[image], false).write_dir(&s.p("layout"));
    s.import(&s.p("layout"), &[]);
    let root = s.store().join("layers").join(app).join("root");
    assert!(root.join("usr/bin/.wh.tool2").is_file(), "the char 0/0 member is a .wh. file in the store");
    assert!(absent(&root.join("usr/bin/tool2")));
    assert!(root.join("etc/.wh.remove-me").is_file() && root.join("opt/stuff/.wh..wh..opq").is_file());
}

#[test]
fn unprivileged_import_keeps_what_it_can() {
    let s = Sandbox::new();
    let (image, _) = rich_image("rich:user");
    oci_layout(&[image], false).write_dir(&s.p("layout"));
    let store = s.p("userstore");
    fs::create_dir(&store).expect("mkdir");
    lchown(&store, 1000, 1000).expect("chown store");
    let o = sh_as_user(
        1000,
        1000,
        &format!("{} import --store {} {}", strata_bin().display(), store.display(), s.p("layout").display()),
    );
    assert!(o.success(), "{o:?}");
    assert!(o.stderr.contains("owners not kept"), "says what it could not keep: {}", o.stderr);
    let layers = ls(&store.join("layers"));
    assert_eq!(layers.len(), 3);
    let found: Vec<PathBuf> = layers
        .iter()
        .map(|l| store.join("layers").join(l).join("root"))
        .filter(|root| root.join("usr/bin/.wh.tool2").exists())
        .collect();
    assert_eq!(found.len(), 1, "the kernel whiteout is stored without privilege");
    let images = run(Command::new(strata_bin()).args(["images", "--store"]).arg(&store), Duration::from_secs(30));
    assert!(images.stdout.contains("rich:user"), "{images:?}");
}

#[test]
fn oci_layout_tar_gzip_and_zstd_compressed() {
    let s = Sandbox::new();
    let (image, tars) = rich_image("rich:tar");
    let tar = oci_layout(&[image], false).tar();
    fs::write(s.p("layout.tar"), &tar).expect("write");
    fs::write(s.p("layout.tar.gz"), compress(&tar, Comp::Gzip)).expect("write");
    fs::write(s.p("layout.tar.zst"), compress(&tar, Comp::Zstd)).expect("write");
    s.import(&s.p("layout.tar"), &[]);
    check_mounted_image(&s, "rich:tar", &tars);
    let out = s.import(&s.p("layout.tar.gz"), &["--tag", "again:gz"]);
    assert!(out.contains("3 reused"), "{out}");
    s.import(&s.p("layout.tar.zst"), &["--tag", "again:zst"]);
    check_mounted_image(&s, "again:zst", &tars);
    assert!(ls(&s.store().join("tmp")).is_empty(), "the decompressed archive is removed");
}

#[test]
fn docker_save_25_shape() {
    let s = Sandbox::new();
    let (image, tars) = rich_image_uncompressed("rich:docker25");
    oci_layout(&[image], true).write_tar(&s.p("save.tar"));
    let out = s.import(&s.p("save.tar"), &[]);
    assert!(out.contains("a docker save archive holding an OCI layout"), "{out}");
    check_mounted_image(&s, "rich:docker25", &tars);
}

#[test]
fn docker_save_legacy_shape_with_symlinked_duplicate_layers() {
    let s = Sandbox::new();
    let (one, tars) = rich_image_uncompressed("rich:one");
    // A second image on the same base: its base layer.tar is a symlink.
    let extra = LayerTar::new().dir("extra", 0o755).file("extra/f", "f", 0o644).finish();
    let mut two = one.clone();
    two.name = "rich:two".into();
    two.layers = vec![one.layers[0].clone(), ImageLayer::new(extra.clone(), Comp::None)];
    two.history.truncate(2);
    let files = docker_legacy(&[one, two]);
    assert!(!files.symlinks.is_empty(), "the kit writes a symlinked duplicate");
    files.write_tar(&s.p("legacy.tar"));
    let out = s.import(&s.p("legacy.tar"), &[]);
    assert!(out.contains(": a docker save archive\n"), "{out}");
    assert!(out.contains("reused"), "the second image reuses the base: {out}");
    check_mounted_image(&s, "rich:one", &tars);
    let reference = reference_tree(&s, &[tars[0].clone(), extra]);
    let mount = s.mount("rich:two", &[]);
    assert_same_tree("reference", &tree_snapshot(&reference), "strata mount", &tree_snapshot(&mount.mnt));
    mount.umount();
}

#[test]
fn containerd_export_picks_this_platform() {
    let s = Sandbox::new();
    let (image, tars) = rich_image("rich:ctr");
    containerd_export(&image).write_tar(&s.p("ctr.tar"));
    let other = if host_arch() == "arm64" { "linux/amd64" } else { "linux/arm64" };
    let o = s.strata("import", &[s.p("ctr.tar").to_str().unwrap(), "--platform", other]);
    assert!(!o.success(), "the other platform's blobs are not in the export: {}", o.stdout);
    assert!(o.stderr.contains("blobs/sha256/"), "the error names the missing blob: {}", o.stderr);
    let o = s.strata("import", &[s.p("ctr.tar").to_str().unwrap(), "--platform", "linux/s390x"]);
    assert!(!o.success() && o.stderr.contains("linux/s390x"), "{}", o.stderr);
    assert!(o.stderr.contains(&format!("linux/{}", host_arch())), "lists what there is: {}", o.stderr);
    assert!(s.layer_dirs().is_empty(), "nothing imported by failed attempts");
    s.import(&s.p("ctr.tar"), &[]);
    check_mounted_image(&s, "rich:ctr", &tars);
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

fn two_images_on_one_base() -> (Image, Image) {
    let base = ImageLayer::new(
        LayerTar::new().dir("etc", 0o755).file("etc/os", vec![b'o'; 40_000], 0o644).finish(),
        Comp::Gzip,
    );
    let a = ImageLayer::new(LayerTar::new().file("a", "a", 0o644).finish(), Comp::Gzip);
    let b = ImageLayer::new(LayerTar::new().file("b", "b", 0o644).finish(), Comp::Zstd);
    (Image::new("app:a", vec![base.clone(), a]), Image::new("app:b", vec![base, b]))
}

#[test]
fn shared_layers_are_extracted_once_and_removed_with_their_last_image() {
    let s = Sandbox::new();
    let (a, b) = two_images_on_one_base();
    oci_layout(&[a], false).write_dir(&s.p("a"));
    oci_layout(&[b], false).write_dir(&s.p("b"));
    let out = s.import(&s.p("a"), &[]);
    assert!(out.contains("2 extracted"), "{out}");
    let out = s.import(&s.p("b"), &[]);
    assert!(out.contains("1 extracted") && out.contains("1 reused (40.0 kB not extracted again)"), "{out}");
    assert_eq!(s.layer_dirs().len(), 3);
    let images = s.ok("images", &[]);
    assert!(images.contains("app:a") && images.contains("app:b"), "{images}");
    assert!(images.starts_with("NAME") && images.contains("2023-11-14"), "{images}");

    // A mounted image cannot be removed.
    let mount = s.mount("app:a", &[]);
    let o = s.strata("rmi", &["app:a"]);
    assert!(!o.success() && o.stderr.contains("in use"), "{o:?}");
    mount.umount();

    let out = s.ok("rmi", &["app:a"]);
    assert!(out.contains("Deleted: sha256:"), "{out}");
    assert_eq!(s.layer_dirs().len(), 2, "the shared base stays for app:b");
    s.ok("rmi", &["app:b"]);
    assert!(s.layer_dirs().is_empty());
    assert!(!s.ok("images", &[]).contains("app:"));
}

#[test]
fn a_second_name_is_untagged_first_and_prune_clears_leftovers() {
    let s = Sandbox::new();
    let (a, _) = two_images_on_one_base();
    oci_layout(&[a], false).write_dir(&s.p("a"));
    s.import(&s.p("a"), &[]);
    s.import(&s.p("a"), &["--tag", "alias:1"]);
    let out = s.ok("rmi", &["alias:1"]);
    assert!(out.contains("Untagged: alias:1") && !out.contains("Deleted"), "{out}");
    assert_eq!(s.layer_dirs().len(), 2);
    // Leftovers of a crashed import and a layer no image uses.
    fs::create_dir_all(s.store().join("tmp/layer-123-456-0/root/etc")).expect("mkdir");
    fs::create_dir_all(s.store().join("layers").join("0".repeat(64)).join("root")).expect("mkdir");
    let out = s.ok("prune", &[]);
    assert!(out.contains("leftover") && out.contains(&"0".repeat(64)), "{out}");
    assert!(ls(&s.store().join("tmp")).is_empty());
    assert_eq!(s.layer_dirs().len(), 2, "layers in use stay");
    let mount = s.mount("app:a", &[]);
    assert_eq!(read_string(&mount.p("a")), "a");
    mount.umount();
}

#[test]
fn concurrent_imports_stay_consistent() {
    let s = Sandbox::new();
    let (a, b) = two_images_on_one_base();
    oci_layout(&[a], false).write_tar(&s.p("a.tar"));
    oci_layout(&[b], false).write_tar(&s.p("b.tar"));
    let spawn = |path: PathBuf| {
        let store = s.store();
        std::thread::spawn(move || {
            run(Command::new(strata_bin()).arg("import").arg("--store").arg(store).arg(path), Duration::from_secs(120))
        })
    };
    for _ in 0..3 {
        let t1 = spawn(s.p("a.tar"));
        let t2 = spawn(s.p("b.tar"));
        for o in [t1.join().expect("join"), t2.join().expect("join")] {
            assert!(o.success(), "{o:?}");
        }
    }
    assert_eq!(s.layer_dirs().len(), 3);
    assert!(ls(&s.store().join("tmp")).is_empty());
    for name in ["app:a", "app:b"] {
        let mount = s.mount(name, &[]);
        assert_eq!(fs::metadata(mount.p("etc/os")).expect("os").len(), 40_000);
        mount.umount();
    }
}

// ---------------------------------------------------------------------------
// Mount modes
// ---------------------------------------------------------------------------

#[test]
fn image_mounts_are_read_only_writable_or_ephemeral() {
    let s = Sandbox::new();
    let (a, _) = two_images_on_one_base();
    oci_layout(&[a], false).write_dir(&s.p("a"));
    s.import(&s.p("a"), &[]);
    let before = tree_snapshot(&s.store().join("layers"));

    let mount = s.mount("app:a", &[]);
    assert_errno(fs::write(mount.p("new"), "x"), libc::EROFS, "write to a read-only image mount");
    mount.umount();

    let (upper, work) = (s.p("upper"), s.p("work"));
    fs::create_dir_all(&upper).expect("mkdir");
    fs::create_dir_all(&work).expect("mkdir");
    let mount = s.mount("app:a", &["--upper", upper.to_str().unwrap(), "--work", work.to_str().unwrap()]);
    fs::write(mount.p("etc/os"), "changed").expect("write through the mount");
    mount.umount();
    assert_eq!(read_string(&upper.join("etc/os")), "changed");

    let mount = s.mount("app:a", &["--ephemeral"]);
    fs::write(mount.p("scratch"), "x").expect("write to an ephemeral mount");
    assert_eq!(ls(&s.store().join("ephemeral")).len(), 1);
    mount.umount();
    assert!(
        wait_for(Duration::from_secs(5), || ls(&s.store().join("ephemeral")).is_empty()),
        "the ephemeral upper is removed at unmount"
    );
    assert_same_tree("layers before", &before, "layers after", &tree_snapshot(&s.store().join("layers")));

    let o = s.strata("mount", &["--image", "no-such:image", s.mnt().to_str().unwrap()]);
    assert!(!o.success() && o.stderr.contains("no-such:image"), "{o:?}");
    assert!(!is_mounted(&s.mnt()));
}

// ---------------------------------------------------------------------------
// Looking inside
// ---------------------------------------------------------------------------

#[test]
fn whence_names_the_serving_layer_and_what_it_hides() {
    let s = Sandbox::new();
    let (image, _) = rich_image("rich:whence");
    let ids: Vec<String> = image.layers.iter().map(|l| l.diff_id[7..19].to_string()).collect();
    oci_layout(&[image], false).write_dir(&s.p("layout"));
    s.import(&s.p("layout"), &[]);

    let out = s.ok("whence", &["rich:whence", "/etc/hostname"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains(&format!("layer 3/3 {}", ids[2])), "{out}");
    assert!(lines[1].contains("serves it"), "{out}");
    assert!(lines[2].contains(&format!("layer 2/3 {}", ids[1])) && lines[2].contains("shadows"), "{out}");
    assert!(lines[3].contains(&format!("layer 1/3 {}", ids[0])) && lines[3].contains("shadows"), "{out}");

    let o = s.strata("whence", &["rich:whence", "etc/remove-me"]);
    assert!(!o.success(), "a deleted path is not in the merged tree");
    assert!(o.stdout.contains("whiteout of /etc/remove-me"), "{}", o.stdout);
    assert!(o.stdout.contains("hidden by the whiteout in layer 2/3"), "{}", o.stdout);

    // A symlinked parent is followed inside the image, as a process in it would.
    let out = s.ok("whence", &["rich:whence", "/bin/tool"]);
    assert!(out.starts_with("/bin/tool (as /usr/bin/tool, via /bin -> usr/bin): regular file"), "{out}");
    assert!(out.contains(&format!("layer 1/3 {}  serves it", ids[0])), "{out}");
    let out = s.ok("whence", &["rich:whence", "/etc/localtime"]);
    assert!(out.contains("symlink, from layer 1/3"), "the last component is not followed: {out}");
    let out = s.ok("whence", &["rich:whence", "/srv/new"]);
    assert!(out.contains("serves it"), "{out}");
    let o = s.strata("whence", &["rich:whence", "/opt/stuff/a"]);
    assert!(o.stdout.contains("opaque directory /opt/stuff"), "{}", o.stdout);
    assert!(o.stdout.contains("hidden by the opaque directory in layer 2/3"), "{}", o.stdout);
    let o = s.strata("whence", &["rich:whence", "/srv/old/x"]);
    assert!(o.stdout.contains("opaque directory /srv"), "layer 3 re-made srv: {}", o.stdout);

    // The same through a live mount, with an upper above.
    let (upper, work) = (s.p("upper"), s.p("work"));
    fs::create_dir_all(&upper).expect("mkdir");
    fs::create_dir_all(&work).expect("mkdir");
    let mount = s.mount("rich:whence", &["--upper", upper.to_str().unwrap(), "--work", work.to_str().unwrap()]);
    fs::write(mount.p("etc/hostname"), "mine\n").expect("write");
    let out = s.ok("whence", &[mount.mnt.to_str().unwrap(), "/etc/hostname"]);
    assert!(out.lines().next().unwrap_or("").contains("from upper"), "{out}");
    assert!(out.contains(&format!("layer 3/3 {}", ids[2])), "{out}");
    mount.umount();
}

#[test]
fn layers_reports_docker_diff_changes_and_waste() {
    let s = Sandbox::new();
    let (image, _) = rich_image("rich:layers");
    oci_layout(&[image], false).write_dir(&s.p("layout"));
    s.import(&s.p("layout"), &[]);
    let json = s.ok("layers", &["rich:layers", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&json).expect("json");
    let layers = report["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 3);
    let list = |i: usize, key: &str| -> Vec<String> {
        layers[i][key].as_array().expect(key).iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    assert!(list(0, "added").contains(&"/etc/hostname".to_string()));
    assert!(list(0, "changed").is_empty() && list(0, "deleted").is_empty());
    let (added, changed, deleted) = (list(1, "added"), list(1, "changed"), list(1, "deleted"));
    for path in ["/app", "/app/a", "/app/b", "/opt/stuff/c"] {
        assert!(added.contains(&path.to_string()), "layer 2 adds {path}: {added:?}");
    }
    for path in ["/etc", "/etc/hostname", "/opt/stuff"] {
        assert!(changed.contains(&path.to_string()), "layer 2 changes {path}: {changed:?}");
    }
    for path in ["/etc/remove-me", "/srv/old", "/opt/stuff/a", "/opt/stuff/b", "/usr/bin/tool2"] {
        assert!(deleted.contains(&path.to_string()), "layer 2 deletes {path}: {deleted:?}");
    }
    assert!(list(2, "changed").contains(&"/srv".to_string()));
    assert!(list(2, "added").contains(&"/srv/new".to_string()));
    assert!(list(2, "deleted").is_empty(), "srv was already empty");
    assert_eq!(layers[1]["created_by"], "RUN step 2", "history skips empty layers");
    assert_eq!(layers[0]["chain_id"], layers[0]["diff_id"]);
    let chain = format!("{} {}", layers[0]["chain_id"].as_str().unwrap(), layers[1]["diff_id"].as_str().unwrap());
    assert_eq!(layers[1]["chain_id"], sha256(chain.as_bytes()), "OCI chain id");
    // Waste: base's remove-me (6) + srv/old (5001) + stuff/a,b (2) + hostname (5)
    // + tool2 (20, its link name deleted); app's big file (100000) and hostname (4).
    let base_waste = 6 + 5000 + 1 + 2 + 5 + "#!/bin/sh\necho tool\n".len() as u64;
    assert_eq!(layers[0]["wasted"], base_waste, "{json}");
    assert_eq!(layers[1]["wasted"], 100_000 + 4, "app/big and etc/hostname: {json}");
    assert_eq!(layers[2]["wasted"], 0);
    let table = s.ok("layers", &["rich:layers"]);
    assert!(table.contains("RUN step 3") && table.contains("efficiency"), "{table}");
}
