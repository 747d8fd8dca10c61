//! End to end with the real podman (issue 6): Strata as containers-storage's
//! `mount_program`, checked against the kernel's overlayfs running the same
//! scenario.
//!
//! Each run gets its own podman configuration (`CONTAINERS_CONF`,
//! `CONTAINERS_STORAGE_CONF`, graphroot and runroot under
//! `/var/tmp/strata-podman-XXXX`), so the host's containers and images are
//! never touched. The image is built with `podman import` from
//! busybox-static's binary; no network, no registry (`--network=none`,
//! `--pull=never`).
//!
//! The scenario, run once with the kernel's overlayfs (driver `overlay`, no
//! mount program) and once with Strata:
//! - a container writes, changes, renames and deletes files, including a file
//!   deleted inside a directory that was removed and re-created; its root must
//!   be a Strata mount, without `nosuid` (setuid programs work as with the
//!   kernel);
//! - `podman diff` (and `strata diff` of the same layers), `podman commit` and
//!   a run of the committed image, twice (the second generation runs on
//!   layers holding whiteouts, an opaque directory and a redirect);
//! - `podman build` of a Containerfile;
//! - `podman mount` and `podman image mount` (read-only, no upper);
//! - a `--read-only` container and a `--uidmap 0:100000:65536` container;
//! - `podman save`, then everything removed, then `podman load`.
//!
//! Every check prints one line; then each observation is compared between
//! the two runs, which fails the test if any differs. Podman also writes a
//! blob cache under /var/lib/containers and netavark's /run/containers
//! whatever its configuration: those are removed afterwards when the test
//! created them. containers-storage computes diffs two ways: with a mount
//! program it always walks the container's mount against its parent's (its
//! "naive" diff), with the kernel it reads the upper directory ("native"
//! diff, which reports a re-created directory oddly). The kernel run is told
//! to use the naive diff too, so both runs compare filesystems, not diff
//! algorithms.
//!
//! Needs root; installs podman, runc, conmon and busybox-static with apt-get
//! when they are missing, and skips (saying why) only when it cannot.
//! `cargo test --test podman -- --nocapture` shows the check lines.
//! `STRATA_PODMAN_PROGRAM=/usr/bin/fuse-overlayfs` runs the same scenario with
//! another mount program, to compare.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{RunOutput, run};

/// Debian packages the test needs, with a command that shows each is there.
const PACKAGES: &[(&str, &str)] =
    &[("podman", "podman"), ("runc", "runc"), ("conmon", "conmon"), ("busybox-static", "busybox")];

/// Busybox applets the image links to /bin/busybox.
const APPLETS: &[&str] = &[
    "sh",
    "ls",
    "cat",
    "echo",
    "rm",
    "mkdir",
    "touch",
    "stat",
    "find",
    "id",
    "mv",
    "cp",
    "ln",
    "chmod",
    "chown",
    "sort",
    "grep",
    "cut",
    "readlink",
    "sha256sum",
    "true",
    "sleep",
];

/// `list DIR`: one line per entry under DIR (sorted, not crossing mounts):
/// path, mode, owner, and a content hash or link target. The same busybox
/// tools run it inside containers and on the host, so the lines compare.
/// Runtime bind mounts and API filesystems are left out.
const LIST: &str = r#"
list() {
    (cd "$1" && busybox find . -xdev | LC_ALL=C busybox sort | while read -r p; do
        case "$p" in
            ./proc|./proc/*|./sys|./sys/*|./dev|./dev/*|./run|./run/*) continue ;;
            ./etc/hosts|./etc/hostname|./etc/resolv.conf|./etc/passwd|./etc/group) continue ;;
        esac
        m=$(busybox stat -c '%A %u:%g' "$p")
        if [ -L "$p" ]; then x="-> $(busybox readlink "$p")"
        elif [ -f "$p" ]; then x=$(busybox sha256sum < "$p" | busybox cut -c1-16)
        else x=-; fi
        echo "$p $m $x"
    done)
}
fstype() { busybox grep " $1 " /proc/self/mounts | busybox cut -d' ' -f3; }
mountflags() { busybox grep " $1 " /proc/self/mounts | busybox cut -d' ' -f4; }
"#;

/// The first container's changes, on the one-layer base image.
const GEN1: &str = r#"
set -e
echo new > /data/new.txt
echo more >> /data/keep
rm /data/gone
rm -r /data/redo; mkdir /data/redo; echo fresh > /data/redo/x
mv /data/sub /data/moved
chmod 600 /data/moved/a
chown 1000:1000 /data/moved/b
mkdir -p /data/deep/er; echo d > /data/deep/er/f
ln -s keep /data/link
ln /data/new.txt /data/hard
touch /data/empty
rm /bin/ls
echo secret > /root/.history
"#;

/// The second container's changes, on the image GEN1 committed: its lower
/// layers hold whiteouts, an opaque directory and a renamed directory.
const GEN2: &str = r#"
set -e
rm /data/redo/x
echo again > /data/redo/y
rm /data/keep
rm -r /data/deep
mv /data/moved /data/moved2
mkdir /data/sub; echo s > /data/sub/a
echo back > /data/gone
echo more >> /data/owned
rm /root/.history
"#;

/// `podman build` on the first committed image: a directory removed and
/// re-created, a directory renamed, a file copied in, a hard link removed.
const CONTAINERFILE: &str = "FROM localhost/gen1
RUN rm -r /data/moved && mkdir /data/moved && echo rebuilt > /data/moved/c
RUN mv /data/deep /data/deeper && echo more >> /data/deeper/er/f
COPY hello.txt /data/hello.txt
RUN rm /data/hard
";

// ---------------------------------------------------------------------------
// Setup: packages, the image tarball
// ---------------------------------------------------------------------------

fn command_exists(name: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {name} >/dev/null")]).status().is_ok_and(|s| s.success())
}

/// A statically linked /bin/busybox, the only binary the image needs.
fn static_busybox() -> bool {
    let Ok(o) = Command::new("ldd").arg("/bin/busybox").output() else { return false };
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    text.contains("not a dynamic executable") || text.contains("statically linked")
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(package, cmd)| if *package == "busybox-static" { !static_busybox() } else { !command_exists(cmd) })
        .map(|(package, _)| *package)
        .collect()
}

/// Installs what is missing; `Err` says why the test cannot run.
fn ensure_packages() -> Result<(), String> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    if !command_exists("apt-get") {
        return Err(format!("{} missing and no apt-get to install them", missing.join(", ")));
    }
    println!("installing {} with apt-get", missing.join(" "));
    let script = format!(
        "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq {} >/dev/null",
        missing.join(" ")
    );
    let o = run(Command::new("sh").args(["-c", &script]), Duration::from_secs(900));
    let still = missing_packages();
    if !o.success() || !still.is_empty() {
        return Err(format!(
            "cannot install {} (apt-get: {})",
            still.join(", "),
            o.stderr.lines().last().unwrap_or("timed out")
        ));
    }
    Ok(())
}

/// The base image's root: busybox and its applets, and a /data tree whose
/// entries the scenario changes.
fn write_image_tar(dir: &Path) -> PathBuf {
    let root = dir.join("image-root");
    let w = |rel: &str, content: &str| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    };
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    for d in ["etc", "root", "tmp", "proc", "sys", "dev", "run"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    w("etc/motd", "strata podman test\n");
    w("data/keep", "keep\n");
    w("data/gone", "gone\n");
    w("data/sub/a", "a\n");
    w("data/sub/b", "b\n");
    w("data/redo/x", "x\n");
    w("data/redo/y", "y\n");
    w("data/owned", "owned by 1000\n");
    std::os::unix::fs::lchown(root.join("data/owned"), Some(1000), Some(1000)).unwrap();
    let tar = dir.join("base.tar");
    let o = run(
        Command::new("tar").args(["--numeric-owner", "-C"]).arg(&root).arg("-cf").arg(&tar).arg("."),
        Duration::from_secs(60),
    );
    assert!(o.success(), "tar failed: {o:?}");
    fs::remove_dir_all(&root).unwrap();
    tar
}

// ---------------------------------------------------------------------------
// One podman, isolated
// ---------------------------------------------------------------------------

/// A podman with its own configuration and storage under `dir`; removes
/// every container, image, mount and process of its own on drop.
struct Podman {
    name: String,
    dir: PathBuf,
    /// The mount program, if any (Strata's run).
    program: Option<PathBuf>,
    /// What happened, check by check (in order), for the comparison
    /// between runs; empty where there is nothing to compare.
    observations: Vec<(&'static str, String)>,
}

impl Podman {
    fn new(parent: &Path, program: Option<PathBuf>) -> Podman {
        let name = match &program {
            Some(p) => p.file_name().unwrap().to_string_lossy().into_owned(),
            None => "kernel".to_string(),
        };
        let dir = parent.join(&name);
        for d in ["graph", "run/overlay", "tmp", "networks"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let d = dir.display();
        let containers_conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{d}/events.log"
tmp_dir = "{d}/tmp"

[network]
network_config_dir = "{d}/networks"
"#
        );
        let mut storage_conf = format!(
            r#"[storage]
driver = "overlay"
graphroot = "{d}/graph"
runroot = "{d}/run"
"#
        );
        if let Some(p) = &program {
            storage_conf.push_str(&format!("\n[storage.options.overlay]\nmount_program = \"{}\"\n", p.display()));
        } else {
            // Diff by walking the mounts, as containers-storage always does
            // with a mount program (see the module's documentation).
            fs::write(dir.join("run/overlay/native-diff()-false"), "").unwrap();
        }
        // containers-storage 1.43 shifts ids for `--uidmap` with idmapped
        // mounts of the lower layers when the kernel has them; then it both
        // gives a mount program idmapped lowers and shifting options (ids
        // shifted twice), and commits the host's ids with the kernel's
        // overlayfs. Without, it shifts a copy of the image's layers for the
        // kernel, and leaves the shifting to the mount program (fixed in 1.46).
        fs::write(dir.join("run/overlay/idmapped-lower-dir-false"), "").unwrap();
        fs::write(dir.join("containers.conf"), containers_conf).unwrap();
        fs::write(dir.join("storage.conf"), storage_conf).unwrap();
        Podman { name, dir, program, observations: Vec::new() }
    }

    fn command(&self, args: &[&str]) -> RunOutput {
        run(
            Command::new("podman")
                .args(args)
                .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
                .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
                .env("TMPDIR", self.dir.join("tmp")),
            Duration::from_secs(180),
        )
    }

    /// `podman ARGS`, which must succeed; its stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let o = self.command(args);
        assert!(o.success(), "[{}] podman {} failed: {:?}\n{}", self.name, args.join(" "), o.status, o.stderr);
        o.stdout
    }

    /// `podman rm -af`, again while it fails: podman's clean-up process
    /// for a container that just exited may still hold its /dev/shm mount
    /// ("unlinkat .../userdata/shm: device or resource busy").
    #[track_caller]
    fn rm_all(&self) {
        let mut last = None;
        for _ in 0..20 {
            let o = self.command(&["rm", "-af"]);
            if o.success() {
                return;
            }
            last = Some(o);
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("[{}] podman rm -af keeps failing: {last:?}", self.name);
    }

    /// `podman run` of a shell script with LIST defined.
    #[track_caller]
    fn run_sh(&self, options: &[&str], image: &str, script: &str) -> String {
        let full = format!("{LIST}\n{script}");
        let mut args = vec!["run", "--network=none", "--pull=never"];
        args.extend_from_slice(options);
        args.extend_from_slice(&[image, "sh", "-c", &full]);
        self.ok(&args)
    }

    /// Prints one check line and keeps the observation for the comparison.
    fn check(&mut self, key: &'static str, line: &str, observation: String) {
        println!("[{}] {key}: {line}", self.name);
        self.observations.push((key, observation));
    }

    /// The file system type the root of a running container must have.
    fn expected_fstype(&self) -> String {
        if self.program.is_some() { format!("fuse.{}", self.name) } else { "overlay".into() }
    }

    /// Mounts under this podman's directory, deepest first.
    fn own_mounts(&self) -> Vec<(PathBuf, String)> {
        let mut found: Vec<(PathBuf, String)> = fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut f = line.split(' ');
                let (_, target, fstype) = (f.next()?, f.next()?, f.next()?);
                let target = PathBuf::from(unescape_mount_path(target));
                target.starts_with(&self.dir).then(|| (target, fstype.to_string()))
            })
            .collect();
        found.sort_by_key(|(p, _)| std::cmp::Reverse(p.as_os_str().len()));
        found
    }

    /// Processes (mount daemons, conmon) whose command line names this
    /// podman's directory.
    fn own_processes(&self) -> Vec<(i32, String)> {
        let needle = self.dir.as_os_str().as_bytes();
        let me = std::process::id() as i32;
        let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me)
            .filter_map(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let found = cmdline.windows(needle.len()).any(|w| w == needle);
                found.then(|| (pid, String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string()))
            })
            .collect()
    }

    /// `strata diff` of a stopped container's layers (whoever wrote them)
    /// lists what `podman diff` lists, less the paths podman leaves out (its
    /// own mount points).
    #[track_caller]
    fn strata_diff_agrees(&self, container: &str, podman_diff: &str) {
        let layer =
            |what: &str| self.ok(&["inspect", container, "--format", &format!("{{{{.GraphDriver.Data.{what}}}}}")]);
        let options = format!("lowerdir={},upperdir={}", layer("LowerDir").trim(), layer("UpperDir").trim());
        let o = run(
            Command::new(env!("CARGO_BIN_EXE_strata")).args(["diff", "--color", "never", "-o", &options]),
            Duration::from_secs(60),
        );
        assert!(o.success(), "[{}] strata diff of {container}: {o:?}", self.name);
        // libpod/diff.go leaves these paths out (exact paths, not trees).
        const PODMAN_OWN: &[&str] = &[
            "/dev",
            "/etc/hostname",
            "/etc/hosts",
            "/etc/mtab",
            "/etc/resolv.conf",
            "/proc",
            "/run",
            "/run/notify",
            "/run/.containerenv",
            "/run/secrets",
            "/sys",
        ];
        let ours: String = sorted_lines(&o.stdout)
            .lines()
            .filter(|l| !PODMAN_OWN.contains(&&l[2..]))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(ours, podman_diff, "[{}] strata diff and podman diff of {container} disagree", self.name);
        println!(
            "[{}] strata diff of {container}'s layers: same {} lines as podman diff",
            self.name,
            ours.lines().count()
        );
    }

    /// The scenario; every check prints a line.
    fn scenario(&mut self, base_tar: &Path) {
        let started = Instant::now();
        let fstype = self.expected_fstype();
        self.ok(&["import", &base_tar.display().to_string(), "localhost/base:latest"]);
        let base = self.run_sh(&["--rm"], "localhost/base", "list /");

        // A container writes, changes and deletes.
        let out = self.run_sh(
            &["--name", "gen1"],
            "localhost/base",
            &format!("{GEN1}\nfstype /\nmountflags /\necho ---\nlist /"),
        );
        let (root_mount, gen1) = out.split_once("---\n").expect("scenario output");
        let (root_type, root_flags) = root_mount.trim().split_once('\n').expect("type and flags");
        assert_eq!(root_type, fstype, "[{}] the container's root is not a {fstype} mount", self.name);
        self.check("root of a running container", root_type, String::new());
        // The image's setuid programs (su, sudo, ping) must work as with the
        // kernel's overlayfs (and fuse-overlayfs, which root mounts suid).
        let setuid = match root_flags.split(',').any(|f| f == "nosuid") {
            true => "ignored (the root is mounted nosuid)",
            false => "honoured",
        };
        self.check("setuid programs in the image", setuid, setuid.to_string());
        for (present, entry) in [
            (true, "./data/new.txt "),
            (true, "./data/redo/x "),
            (false, "./data/redo/y "),
            (false, "./data/gone "),
            (false, "./data/sub "),
            (true, "./data/moved/a -rw------- 0:0"),
            (true, "./data/moved/b -rw-r--r-- 1000:1000"),
            (true, "./data/hard "),
            (false, "./bin/ls "),
        ] {
            assert_eq!(gen1.contains(entry), present, "[{}] after the changes, {entry:?}: {gen1}", self.name);
        }
        assert_ne!(gen1, base, "[{}] the container changed nothing", self.name);
        self.check(
            "files written, changed, renamed and deleted",
            &format!("{} entries, {} differ from the image", gen1.lines().count(), line_changes(&base, gen1)),
            gen1.to_string(),
        );

        // podman diff
        let diff = sorted_lines(&self.ok(&["diff", "gen1"]));
        for line in ["A /data/new.txt", "C /data/keep", "D /data/gone", "D /data/redo/y", "D /data/sub", "D /bin/ls"] {
            assert!(diff.lines().any(|l| l == line), "[{}] podman diff lacks {line:?}:\n{diff}", self.name);
        }
        self.check(
            "podman diff",
            &format!("{} changes (D /data/redo/y among them)", diff.lines().count()),
            diff.clone(),
        );
        self.strata_diff_agrees("gen1", &diff);

        // podman mount: the same tree seen from the host.
        let mnt = self.ok(&["mount", "gen1"]).trim().to_string();
        let mounted = self.own_mounts().into_iter().find(|(p, _)| p == Path::new(&mnt)).map(|(_, t)| t);
        assert_eq!(mounted.as_deref(), Some(fstype.as_str()), "[{}] podman mount: {mnt}", self.name);
        let host_view = host_list(Path::new(&mnt));
        assert_eq!(host_view, gen1, "[{}] podman mount shows another tree than the container did", self.name);
        self.ok(&["umount", "gen1"]);
        assert!(
            wait_until(Duration::from_secs(10), || !self.own_mounts().iter().any(|(p, _)| p == Path::new(&mnt))),
            "[{}] podman umount left {mnt} mounted",
            self.name
        );
        self.check("podman mount", &format!("{fstype}, same tree as inside, unmounted"), String::new());

        // podman commit, run the new image.
        self.ok(&["commit", "-q", "gen1", "localhost/gen1:latest"]);
        let committed = self.run_sh(&["--rm"], "localhost/gen1", "list /");
        assert_eq!(committed, gen1, "[{}] the committed image differs from the container", self.name);
        self.check("podman commit, podman run", "the new image shows exactly the container's tree", committed.clone());

        // Second generation, on layers that hold whiteouts.
        let gen2 = self.run_sh(&["--name", "gen2"], "localhost/gen1", &format!("{GEN2}\nlist /"));
        for (present, entry) in
            [(false, "./data/redo/x "), (true, "./data/redo/y "), (false, "./data/keep "), (true, "./data/sub/a ")]
        {
            assert_eq!(gen2.contains(entry), present, "[{}] second generation, {entry:?}: {gen2}", self.name);
        }
        let diff2 = sorted_lines(&self.ok(&["diff", "gen2"]));
        self.strata_diff_agrees("gen2", &diff2);
        self.ok(&["commit", "-q", "gen2", "localhost/gen2:latest"]);
        let committed2 = self.run_sh(&["--rm"], "localhost/gen2", "list /");
        assert_eq!(committed2, gen2, "[{}] the second committed image differs from its container", self.name);
        self.check(
            "second generation on whiteouts: diff, commit, run",
            &format!("{} changes, the new image matches", diff2.lines().count()),
            format!("{gen2}{diff2}"),
        );

        // podman build: a container per step, each step's changes committed.
        let context = self.dir.join("build");
        fs::create_dir_all(&context).unwrap();
        fs::write(context.join("Containerfile"), CONTAINERFILE).unwrap();
        fs::write(context.join("hello.txt"), "hello from the build context\n").unwrap();
        let context = context.display().to_string();
        self.ok(&["build", "-q", "--pull=never", "--network=none", "-t", "localhost/built:latest", &context]);
        let built = self.run_sh(&["--rm"], "localhost/built", "list /");
        for (present, entry) in [
            (false, "./data/moved/a "),
            (true, "./data/moved/c "),
            (false, "./data/deep "),
            (true, "./data/deeper/er/f "),
            (true, "./data/hello.txt "),
            (false, "./data/hard "),
        ] {
            assert_eq!(built.contains(entry), present, "[{}] podman build, {entry:?}: {built}", self.name);
        }
        self.check("podman build", &format!("{} entries in the built image", built.lines().count()), built);

        // podman image mount: read-only, no upper.
        let img = self.ok(&["image", "mount", "localhost/gen2"]).trim().to_string();
        let mounted = self.own_mounts().into_iter().find(|(p, _)| p == Path::new(&img)).map(|(_, t)| t);
        assert_eq!(mounted.as_deref(), Some(fstype.as_str()), "[{}] podman image mount: {img}", self.name);
        let img_view = host_list(Path::new(&img));
        let write = fs::write(Path::new(&img).join("data/x"), "x").map_err(|e| e.raw_os_error());
        self.ok(&["image", "umount", "localhost/gen2"]);
        assert_eq!(img_view, gen2, "[{}] podman image mount shows another tree", self.name);
        assert_eq!(write, Err(Some(libc::EROFS)), "[{}] an image mount must be read-only", self.name);
        self.check("podman image mount", "same tree, read-only (EROFS)", String::new());

        // A read-only container.
        let ro = self.run_sh(
            &["--rm", "--read-only"],
            "localhost/gen2",
            "fstype /; if touch /data/ro 2>/dev/null; then echo writable; else echo read-only; fi; cat /data/gone",
        );
        let ro_lines: Vec<&str> = ro.lines().collect();
        assert_eq!(ro_lines, [fstype.as_str(), "read-only", "back"], "[{}] --read-only", self.name);
        self.check("--read-only container", "cannot write, reads the image", ro.replace(&fstype, "FSTYPE"));

        // A container in a user namespace: --uidmap 0:100000:65536.
        let inside = self.run_sh(
            &["--name", "mapped", "--uidmap", "0:100000:65536"],
            "localhost/gen2",
            "set -e; id -u; cat /proc/self/uid_map; busybox stat -c '%u:%g %n' /data/owned /data/moved2/b /bin/busybox
             echo u > /data/u; mkdir /data/ud; chown 1234:1234 /data/ud; busybox stat -c '%u:%g %n' /data/u /data/ud",
        );
        let inside = inside.split_whitespace().collect::<Vec<_>>().join(" ");
        let expected = "0 0 100000 65536 1000:1000 /data/owned 1000:1000 /data/moved2/b 0:0 /bin/busybox \
                        0:0 /data/u 1234:1234 /data/ud";
        assert_eq!(inside, expected, "[{}] ownership inside a --uidmap container", self.name);
        let upper = PathBuf::from(self.ok(&["inspect", "mapped", "--format", "{{.GraphDriver.Data.UpperDir}}"]).trim());
        let stored = |rel: &str| {
            use std::os::unix::fs::MetadataExt;
            let m = fs::symlink_metadata(upper.join(rel)).unwrap();
            format!("{}:{}", m.uid(), m.gid())
        };
        let stored = format!("{} {}", stored("data/u"), stored("data/ud"));
        if self.program.is_some() {
            // As fuse-overlayfs: the upper holds the container's ids.
            assert_eq!(stored, "0:0 1234:1234", "[{}] ids stored in the upper", self.name);
        }
        self.ok(&["commit", "-q", "mapped", "localhost/mapped:latest"]);
        let after =
            self.run_sh(&["--rm"], "localhost/mapped", "busybox stat -c '%u:%g %n' /data/u /data/ud /data/owned");
        let after = after.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(after, "0:0 /data/u 1234:1234 /data/ud 1000:1000 /data/owned", "[{}] --uidmap commit", self.name);
        self.check(
            "--uidmap 0:100000:65536",
            &format!("container ids inside, upper stores {stored}, commit keeps the container's ids"),
            format!("{inside}\n{after}"),
        );

        // podman save; remove everything; podman load.
        let saved = self.dir.join("gen2.tar");
        self.ok(&["save", "-q", "-o", &saved.display().to_string(), "localhost/gen2"]);
        self.rm_all();
        self.ok(&["rmi", "-af"]);
        assert_eq!(self.ok(&["images", "-q"]).trim(), "", "[{}] rmi -af left images", self.name);
        self.ok(&["load", "-q", "-i", &saved.display().to_string()]);
        let loaded = self.run_sh(&["--rm"], "localhost/gen2", "list /");
        assert_eq!(loaded, gen2, "[{}] the loaded image differs from the saved one", self.name);
        self.check(
            "podman save, rmi -af, podman load",
            &format!("{} bytes, the loaded image matches", fs::metadata(&saved).unwrap().len()),
            loaded,
        );

        // Nothing left running or mounted.
        self.rm_all();
        self.ok(&["rmi", "-af"]);
        assert!(
            wait_until(Duration::from_secs(10), || self.own_mounts().is_empty() && self.own_processes().is_empty()),
            "[{}] left behind: mounts {:?}, processes {:?}",
            self.name,
            self.own_mounts(),
            self.own_processes()
        );
        self.check("nothing left behind", "no mount, no daemon", String::new());
        println!("[{}] scenario took {:.1} s", self.name, started.elapsed().as_secs_f64());
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Best effort, also while a failed check unwinds.
        let _ = self.command(&["rm", "-af", "-t", "0"]);
        let _ = self.command(&["rmi", "-af"]);
        for (target, _) in self.own_mounts() {
            if let Ok(c) = std::ffi::CString::new(target.as_os_str().as_bytes()) {
                // SAFETY: a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        for (pid, cmdline) in self.own_processes() {
            eprintln!("[{}] killing leftover process {pid}: {cmdline}", self.name);
            // SAFETY: plain kill(2) of a process this test's podman started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `LIST` run on the host, with the same busybox as in the image.
fn host_list(dir: &Path) -> String {
    let script = format!("{LIST}\nlist \"$1\"");
    let o = run(
        Command::new("/bin/busybox")
            .args(["sh", "-c", &script, "list"])
            .arg(dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        Duration::from_secs(60),
    );
    assert!(o.success(), "listing {} failed: {o:?}", dir.display());
    o.stdout
}

fn sorted_lines(text: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// How many lines of `b` are not in `a`, plus the reverse.
fn line_changes(a: &str, b: &str) -> usize {
    let a: std::collections::BTreeSet<&str> = a.lines().collect();
    let b: std::collections::BTreeSet<&str> = b.lines().collect();
    a.symmetric_difference(&b).count()
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// /proc/self/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Host paths podman writes to whatever its configuration says (its blob
/// info cache, netavark's run directory): removed afterwards if the test
/// created them.
struct HostLeftovers(Vec<PathBuf>);

impl HostLeftovers {
    fn record() -> HostLeftovers {
        let paths = ["/var/lib/containers", "/var/lib/containers/cache", "/run/containers", "/run/containers/networks"];
        HostLeftovers(paths.iter().map(PathBuf::from).filter(|p| !p.exists()).collect())
    }
}

impl Drop for HostLeftovers {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_dir_all(p);
        }
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn podman_with_strata_matches_the_kernel() {
    if !is_root() {
        println!("SKIPPED podman end-to-end test: needs root");
        return;
    }
    if let Err(why) = ensure_packages() {
        println!("SKIPPED podman end-to-end test: {why}");
        return;
    }
    let program = std::env::var_os("STRATA_PODMAN_PROGRAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_strata")));
    let started = Instant::now();
    let _host = HostLeftovers::record();
    let top = tempfile::Builder::new().prefix("strata-podman-").tempdir_in("/var/tmp").expect("temp dir in /var/tmp");
    let base_tar = write_image_tar(top.path());

    let mut kernel = Podman::new(top.path(), None);
    kernel.scenario(&base_tar);
    let mut ours = Podman::new(top.path(), Some(program));
    ours.scenario(&base_tar);

    // Every observation the same on both.
    let mut differ = Vec::new();
    for (key, reference) in kernel.observations.iter().filter(|(_, o)| !o.is_empty()) {
        let seen = ours.observations.iter().find(|(k, _)| k == key).map_or("(missing)", |(_, o)| o.as_str());
        if seen == reference {
            println!("[compare] {key}: {} gives the same as the kernel's overlayfs", ours.name);
        } else {
            let ends = |t: &str| if t.ends_with('\n') { String::new() } else { "\n".into() };
            println!(
                "[compare] {key}: DIFFERS\n--- kernel\n{reference}{}--- {}\n{seen}{}",
                ends(reference),
                ours.name,
                ends(seen)
            );
            differ.push(*key);
        }
    }
    println!("podman end-to-end: {:.1} s", started.elapsed().as_secs_f64());
    assert!(differ.is_empty(), "{} differs from the kernel's overlayfs in: {differ:?}", ours.name);
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
