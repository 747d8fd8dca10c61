"""The benchmark's data, built once and cached: three lower layers (a base
root filesystem, a second layer of packages over it, a synthetic layer), 500
tiny layers for the mount-time rows, and `native`, the three layers merged
into one plain directory (a copy) for the native column.

Full data: the base is `debootstrap --variant=minbase` of the suite in the
apt sources (or, when debootstrap cannot reach a mirror, the .debs of a
minbase package set from `apt-get download` unpacked with `dpkg-deb -x`);
the second layer is the .debs of Python 3.11 unpacked over it (no copy-up:
a separate directory, as an image build's layer diff is); the synthetic layer
has a 1 GiB file, a directory of 100k small files and a deep tree.
Quick data: the same shape, synthetic and tiny, built without the network.
"""

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

# Bump to rebuild a part when its recipe changes.
VERSIONS = {"base": 1, "layer2": 1, "synth": 2, "layers500": 1, "native": 2}

# Debian's minbase: the "required" packages plus apt (bookworm names). Only
# for the fallback when debootstrap cannot fetch.
MINBASE = """adduser apt base-files base-passwd bash bsdutils coreutils dash debconf debian-archive-keyring
debianutils diffutils dpkg findutils gcc-12-base gpgv grep gzip hostname init-system-helpers libacl1
libapt-pkg6.0 libattr1 libaudit-common libaudit1 libblkid1 libbz2-1.0 libc-bin libc6 libcap-ng0 libcap2
libcrypt1 libdb5.3 libdebconfclient0 libgcc-s1 libgcrypt20 libgmp10 libgnutls30 libgpg-error0 libhogweed6
libidn2-0 liblz4-1 liblzma5 libmd0 libmount1 libnettle8 libp11-kit0 libpam-modules libpam-modules-bin
libpam-runtime libpam0g libpcre2-8-0 libseccomp2 libselinux1 libsemanage-common libsemanage2 libsepol2
libsmartcols1 libstdc++6 libsystemd0 libtasn1-6 libtinfo6 libudev1 libunistring2 libxxhash0 libzstd1 login
logsave mawk mount ncurses-base ncurses-bin passwd perl-base sed sysvinit-utils tar tzdata usr-is-merged
util-linux util-linux-extra zlib1g""".split()

# The second layer: what `apt-get install python3.11-minimal libpython3.11-stdlib`
# adds over minbase (no maintainer scripts run, so no .pyc files yet: the
# real task writes them).
LAYER2_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libexpat1", "libffi8",
               "libsqlite3-0", "libncursesw6", "libreadline8", "readline-common", "media-types", "libssl3",
               "netbase", "tzdata", "ca-certificates"]

MIB = 1 << 20


class Data:
    pass


def _stamp(root, name):
    return root / "stamps" / f"{name}.v{VERSIONS[name]}"


def _done(root, name):
    return _stamp(root, name).exists()


def _mark(root, name, text=""):
    s = _stamp(root, name)
    s.parent.mkdir(parents=True, exist_ok=True)
    s.write_text(text)


def _fresh(path):
    _unmount_under(path)
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)
    path.mkdir(parents=True)


def _unmount_under(path):
    """debootstrap mounts /proc and /sys in its target; never delete through them."""
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4] for line in f]
    for mp in reversed(mps):
        if mp == str(path) or mp.startswith(str(path) + "/"):
            subprocess.run(["umount", "-l", mp], check=False)


def apt_sources():
    """(mirror URI, suite) of the first Debian source that is not -security/-updates."""
    files = []
    for p in [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if p.suffix in (".list", ".sources") and p.is_file():
            files.append(p)
    for p in files:
        text = p.read_text(errors="replace")
        if p.suffix == ".list":
            for line in text.splitlines():
                parts = line.split("#")[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    if parts[1].startswith("["):
                        parts = [parts[0]] + [x for x in parts[1:] if not (x.startswith("[") or x.endswith("]"))]
                    uri, suite = parts[1], parts[2]
                    if "/debian" in uri and "security" not in suite and "-" not in suite:
                        return uri, suite
        else:
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith("#"):
                        k, v = line.split(":", 1)
                        fields[k.strip()] = v.strip()
                if fields.get("Types", "").split()[:1] != ["deb"] or "/debian" not in fields.get("URIs", ""):
                    continue
                for suite in fields.get("Suites", "").split():
                    if "security" not in suite and "-" not in suite:
                        return fields["URIs"].split()[0], suite
    return "http://deb.debian.org/debian", "bookworm"


def _download_debs(names, dest, log):
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["apt-get", "download", "-q"] + names, cwd=dest, capture_output=True, text=True)
    if r.returncode != 0:
        log("apt-get download failed for the whole set; trying one package at a time")
        for n in names:
            subprocess.run(["apt-get", "download", "-q", n], cwd=dest, capture_output=True)
    debs = sorted(dest.glob("*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download got none of {names}: {r.stderr[-500:]}")
    return debs


def _extract_debs(debs, layer):
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(layer)], check=True)


def build_base(root, log):
    base = root / "base"
    if _done(root, "base"):
        return _stamp(root, "base").read_text()
    mirror, suite = apt_sources()
    tmp = root / "base.tmp"
    _fresh(tmp)
    how = None
    if shutil.which("debootstrap") is None:
        log("installing debootstrap")
        subprocess.run(["apt-get", "install", "-y", "-q", "debootstrap"], stdout=subprocess.DEVNULL,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if shutil.which("debootstrap"):
        log(f"debootstrap --variant=minbase {suite} from {mirror} (a few minutes)")
        r = subprocess.run(["debootstrap", "--variant=minbase", suite, str(tmp), mirror],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _unmount_under(tmp)
        if r.returncode == 0:
            how = f"debootstrap --variant=minbase {suite} ({mirror})"
        else:
            log(f"debootstrap failed ({r.returncode}): {r.stderr[-400:]}")
    if how is None:
        log("falling back to apt-get download + dpkg-deb -x of the minbase package set")
        _fresh(tmp)
        debs = _download_debs(MINBASE, root / "debs-base", log)
        _extract_debs(debs, tmp)
        how = f"{len(debs)} minbase .debs from `apt-get download`, unpacked with `dpkg-deb -x` (debootstrap failed)"
    # debootstrap keeps the downloaded .debs; an image layer would not.
    cache = tmp / "var" / "cache" / "apt" / "archives"
    for deb in cache.glob("*.deb") if cache.exists() else []:
        deb.unlink()
    _unmount_under(base)
    if base.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)
    tmp.rename(base)
    _mark(root, "base", how)
    return how


def build_layer2(root, log):
    layer = root / "layer2"
    if _done(root, "layer2"):
        return _stamp(root, "layer2").read_text()
    _fresh(layer)
    debs = _download_debs(LAYER2_DEBS, root / "debs-layer2", log)
    _extract_debs(debs, layer)
    # The base is merged-/usr (bin -> usr/bin): move what a .deb put in /bin,
    # /lib, ... under usr/, as dpkg would have written through the symlink.
    base = root / "base"
    for top in list(layer.iterdir()):
        b = base / top.name
        if top.is_dir() and not top.is_symlink() and b.is_symlink():
            target = layer / os.readlink(b).lstrip("/")
            subprocess.run(["cp", "-a", f"{top}/.", str(target)], check=True)
            shutil.rmtree(top)
    how = "the .debs of " + ", ".join(sorted(d.name.split("_")[0] for d in debs)) + " unpacked over it"
    _mark(root, "layer2", how)
    return how


def _write_small_files(d, n, seed):
    d.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    blob = bytes(rnd.getrandbits(8) for _ in range(4096))
    for i in range(n):
        size = rnd.randrange(0, 4097)
        with open(d / f"file{i:06d}", "wb") as f:
            f.write(blob[:size])


def _deep_tree(d, chain, fanout, depth):
    """A chain `chain` directories deep, and a tree `fanout` wide and `depth` deep."""
    p = d / "chain"
    for i in range(chain):
        p = p / f"d{i:03d}"
        p.mkdir(parents=True)
        (p / "leaf").write_text(f"{i}\n")

    def tree(p, level):
        p.mkdir(parents=True, exist_ok=True)
        (p / "a.txt").write_text(str(p) + "\n")
        (p / "b.txt").write_text("b\n")
        if level < depth:
            for i in range(fanout):
                tree(p / f"n{i}", level + 1)

    tree(d / "tree", 1)


def build_synth(root, quick, log):
    synth = root / "synth"
    if _done(root, "synth"):
        return
    log("building the synthetic layer")
    _fresh(synth)
    size = 16 * MIB if quick else 1024 * MIB
    block = os.urandom(MIB)
    with open(synth / "big.bin", "wb") as f:
        for _ in range(size // MIB):
            f.write(block)
    _write_small_files(synth / "many", 500 if quick else 100_000, 1)
    if quick:
        _deep_tree(synth / "deep", 32, 3, 4)
    else:
        _deep_tree(synth / "deep", 200, 4, 6)
    os.sync()
    _mark(root, "synth")


def build_quick_base(root, log):
    """A synthetic stand-in for a root filesystem: nested dirs, symlinks, and
    (in layer 2) a Python tree to byte-compile."""
    base, layer2 = root / "base", root / "layer2"
    if not _done(root, "base"):
        _fresh(base)
        rnd = random.Random(2)
        for d in range(20):
            p = base / "usr" / "share" / f"pkg{d:02d}"
            p.mkdir(parents=True)
            for i in range(50):
                (p / f"f{i:02d}").write_bytes(b"x" * rnd.randrange(0, 8192))
        (base / "etc").mkdir()
        (base / "etc" / "os-release").write_text("NAME=quick\n")
        (base / "usr" / "bin").mkdir()
        os.symlink("usr/bin", base / "bin")
        _mark(root, "base", "synthetic (--quick)")
    if not _done(root, "layer2"):
        _fresh(layer2)
        for d in range(0, 20, 4):  # replace some base files, add others
            p = layer2 / "usr" / "share" / f"pkg{d:02d}"
            p.mkdir(parents=True)
            for i in range(0, 50, 2):
                (p / f"f{i:02d}").write_text("layer2\n")
        py = layer2 / "usr" / "lib" / "pybench"
        for pkg in range(5):
            pp = py / f"pkg{pkg}"
            pp.mkdir(parents=True)
            (pp / "__init__.py").write_text("")
            for m in range(20):
                body = "\n".join(
                    f"def f{j}(x):\n    y = [i * {j} for i in range(x)]\n    return sum(y) + len(str(x))\n"
                    for j in range(40))
                (pp / f"mod{m}.py").write_text(body)
        _mark(root, "layer2", "synthetic (--quick)")
    return _stamp(root, "base").read_text(), _stamp(root, "layer2").read_text()


def build_layers500(root):
    d = root / "layers500"
    if _done(root, "layers500"):
        return
    _fresh(d)
    for i in range(500):
        (d / str(i) / "shared").mkdir(parents=True)
        (d / str(i) / f"layer{i}").write_text(f"{i}\n")
        (d / str(i) / "shared" / f"f{i}").write_text(f"{i}\n")
    _mark(root, "layers500")


def merge_into(src, dst):
    """Lay `src` over `dst` as an overlay would show it, as a copy. Not with
    hard links: a lower file with a link count of 2 is a hard link to Strata
    (and to the kernel with index=on), which an unlink or a copy-up must keep
    linked, and that would be measured instead."""
    with os.scandir(src) as it:
        for e in it:
            s, t = Path(e.path), dst / e.name
            if e.is_dir(follow_symlinks=False):
                if not (t.is_dir() and not t.is_symlink()):
                    if t.is_symlink() or t.exists():
                        t.unlink()
                    t.mkdir()
                merge_into(s, t)
                st = e.stat(follow_symlinks=False)
                os.chown(t, st.st_uid, st.st_gid)
                os.chmod(t, stat.S_IMODE(st.st_mode))
                os.utime(t, ns=(st.st_atime_ns, st.st_mtime_ns))
            else:
                if t.is_symlink() or t.exists():
                    if t.is_dir() and not t.is_symlink():
                        shutil.rmtree(t)
                    else:
                        t.unlink()
                st = e.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    shutil.copy2(s, t)
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(s), t)
                    os.utime(t, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
                else:  # devices, fifos, sockets
                    os.mknod(t, st.st_mode, st.st_rdev)
                    os.utime(t, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.chown(t, st.st_uid, st.st_gid, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    os.chmod(t, stat.S_IMODE(st.st_mode))  # after chown, which clears setuid


def build_native(root, lowers, log):
    native = root / "native"
    # Rebuilt whenever a layer was.
    key = " ".join(str(_stamp(root, n).stat().st_mtime_ns) for n in ("base", "layer2", "synth"))
    if _done(root, "native") and _stamp(root, "native").read_text() == key:
        return
    log("merging the layers into the native directory (a copy)")
    _fresh(native)
    for layer in reversed(lowers):
        merge_into(layer, native)
    _mark(root, "native", key)


def count_tree(path):
    n = 0
    for _, dirs, files in os.walk(path):
        n += len(dirs) + len(files)
    return n


def build(root, quick, log):
    root = Path(root)
    d = Data()
    d.root = root
    if quick:
        base_how, layer2_how = build_quick_base(root, log)
    else:
        base_how = build_base(root, log)
        layer2_how = build_layer2(root, log)
    build_synth(root, quick, log)
    build_layers500(root)
    d.base, d.layer2, d.synth = root / "base", root / "layer2", root / "synth"
    d.lowers = [d.synth, d.layer2, d.base]  # topmost first
    build_native(root, d.lowers, log)
    d.native = root / "native"
    d.layers500 = root / "layers500"
    d.big = d.synth / "big.bin"
    d.big_label = "16 MiB" if quick else "1 GiB"
    d.many = d.synth / "many"
    d.many_label = "500" if quick else "100k"
    d.create_count = 500 if quick else 10000
    d.python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else shutil.which("python3")
    d.task_layer = d.layer2
    if quick:
        d.task_dir = d.layer2 / "usr" / "lib" / "pybench"
        d.task_label = "a generated 100-module Python tree"
    else:
        d.task_dir = d.layer2 / "usr" / "lib" / "python3.11"
        d.task_label = "the Python 3.11 standard library of layer 2"
    d.task_args = []
    counts = {name: count_tree(root / name) for name in ("base", "layer2", "synth", "native")}
    d.counts = counts
    d.describe = lambda: (
        f"base layer {d.counts['base']} entries: {base_how}; layer 2 {d.counts['layer2']} entries: {layer2_how}; "
        f"synthetic layer {d.counts['synth']} entries: a {d.big_label} file, {d.many_label} small files (0-4 KiB) "
        f"in one directory, a deep tree; merged tree {d.counts['native']} entries; lowerdir=synth:layer2:base")
    return d
