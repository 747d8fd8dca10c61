//! `strata commit`: the upper layer's changes as an OCI layer tarball.
//!
//! The tar is what the merged view requires, written from the upper layer
//! and resolved with the layer stack (`layers.rs`), in byte-lexical
//! pre-order (a directory, then its entries sorted by name):
//! - an upper entry is written with its own metadata and content;
//! - a whiteout (any dialect) becomes an empty file `.wh.NAME`;
//! - a directory that shows none of the image's content at its path
//!   (opaque, or new over a deleted one) is `DIR/` then `DIR/.wh..wh..opq`;
//! - a directory whose lower content comes from elsewhere (a renamed
//!   directory: a redirect) is written whole, as the container sees it, and
//!   opaque: a tar reader knows nothing of redirects. Its old path holds a
//!   whiteout in the upper, written like any other.
//!
//! Hard links become tar links to the first member of the archive; times
//! are whole seconds; owners are numbers only; `security.capability` and
//! `user.*` xattrs are PAX `SCHILY.xattr.*` records. Headers are USTAR
//! unless a field does not fit, when a PAX header carries it. The same
//! upper gives the same bytes.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::diff::{LayerArgs, Views};
use crate::layers::{self, LayerStack, OPAQUE_MARKER, Source, WHITEOUT_PREFIX};
use crate::sys::{self, Errno, Stat, XattrTarget};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    #[command(flatten)]
    pub layers: LayerArgs,
    /// Where to write the layer ("-" for standard output).
    #[arg(long, value_name = "FILE", required_unless_present = "image", conflicts_with = "image")]
    pub output: Option<PathBuf>,
    /// Add the layer to an OCI image layout as image TAG: the image it
    /// came from (see --from) with this layer on top.
    #[arg(long, value_name = "LAYOUT:TAG")]
    pub image: Option<String>,
    /// The image of the layout the container was made from (default: TAG
    /// itself when the layout has it, else its only image, else none).
    #[arg(long = "from", value_name = "REF", requires = "image")]
    pub from: Option<String>,
    /// How to compress the layer.
    #[arg(long, value_enum, default_value_t = Compression::None)]
    pub compression: Compression,
    /// Clamp modification times to SOURCE_DATE_EPOCH, or to the given
    /// number of seconds since 1970.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "")]
    pub reproducible: Option<String>,
}

/// The identity of the written layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// sha256 of the uncompressed tar ("sha256:HEX").
    pub diff_id: String,
    /// sha256 of the blob as written.
    pub digest: String,
    pub size: u64,
}

/// `strata commit`.
pub fn run(args: CommitArgs) -> Result<(), String> {
    let layout = args.layers.layout()?;
    let views = Views::open(&layout)?;
    let clamp = match args.reproducible.as_deref() {
        None => None,
        Some("") => {
            let text = std::env::var("SOURCE_DATE_EPOCH")
                .map_err(|_| "--reproducible without a value needs SOURCE_DATE_EPOCH set".to_string())?;
            Some(parse_epoch(&text)?)
        }
        Some(text) => Some(parse_epoch(text)?),
    };
    if let Some(image) = &args.image {
        let (layout, tag) = split_image(image)?;
        let created = clamp.unwrap_or_else(now_seconds);
        let (written, manifest) =
            oci::add_layer(&views, &layout, &tag, args.from.as_deref(), args.compression, clamp, created)?;
        print!(
            "diff_id {}\ndigest {}\nsize {}\nmanifest {}\nimage {}:{}\n",
            written.diff_id,
            written.digest,
            written.size,
            manifest,
            layout.display(),
            tag
        );
        return Ok(());
    }
    let output = args.output.unwrap_or_else(|| PathBuf::from("-"));
    let to_stdout = output.as_os_str() == "-";
    let written = if to_stdout {
        let stdout = io::stdout();
        write_layer(&views, stdout.lock(), args.compression, clamp)?.0
    } else {
        // Written beside the target and renamed: a failure leaves no half file.
        let mut temp = output.clone().into_os_string();
        temp.push(".partial");
        let temp = PathBuf::from(temp);
        let file = File::create(&temp).map_err(|err| format!("cannot create {}: {err}", temp.display()))?;
        let result = write_layer(&views, file, args.compression, clamp).and_then(|(written, file)| {
            file.sync_all().map_err(|err| format!("cannot write {}: {err}", temp.display()))?;
            std::fs::rename(&temp, &output)
                .map_err(|err| format!("cannot rename {} to {}: {err}", temp.display(), output.display()))?;
            Ok(written)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result?
    };
    let report = format!("diff_id {}\ndigest {}\nsize {}\n", written.diff_id, written.digest, written.size);
    if to_stdout {
        eprint!("{report}");
    } else {
        print!("{report}");
    }
    Ok(())
}

/// "LAYOUT:TAG" (the last colon splits; no colon means tag "latest").
fn split_image(text: &str) -> Result<(PathBuf, String), String> {
    let (layout, tag) = match text.rsplit_once(':') {
        Some((layout, tag)) if !tag.contains('/') => (layout, tag),
        _ => (text, "latest"),
    };
    if layout.is_empty() || tag.is_empty() {
        return Err(format!("--image {text:?}: expected LAYOUT:TAG"));
    }
    Ok((PathBuf::from(layout), tag.to_string()))
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn parse_epoch(text: &str) -> Result<u64, String> {
    text.trim().parse().map_err(|_| format!("{text:?} is not a number of seconds since 1970"))
}

/// Write the layer of `views` to `out`; returns its identity and `out`.
pub fn write_layer<W: Write>(
    views: &Views,
    out: W,
    compression: Compression,
    clamp: Option<u64>,
) -> Result<(Written, W), String> {
    let blob = Hashing::new(out);
    let encoder = match compression {
        Compression::None => Encoder::Plain(blob),
        Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(blob, flate2::Compression::default())),
        Compression::Zstd => Encoder::Zstd(
            zstd::stream::write::Encoder::new(blob, 3).map_err(|err| format!("cannot start zstd: {err}"))?,
        ),
    };
    let mut writer = LayerWriter { views, tar: tar::Builder::new(Hashing::new(encoder)), links: HashMap::new(), clamp };
    writer.walk_upper(Path::new(""), &views.container.root_sources(), &views.image.root_sources())?;
    let tar = writer.tar.into_inner().map_err(|err| format!("cannot write the layer: {err}"))?;
    let diff_id = tar.digest();
    let blob = tar.inner.finish().map_err(|err| format!("cannot write the layer: {err}"))?;
    let written = Written { diff_id, digest: blob.digest(), size: blob.count };
    let mut out = blob.inner;
    out.flush().map_err(|err| format!("cannot write the layer: {err}"))?;
    Ok((written, out))
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing { inner, hasher: Sha256::new(), count: 0 }
    }

    fn digest(&self) -> String {
        let hash = self.hasher.clone().finalize();
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

/// One member to write in a directory, sorted by its name in the tar.
enum Member {
    /// An entry of the container view: its stack (container), source and stat.
    Entry { source: Source, stat: Box<Stat>, dir: Option<DirWalk> },
    /// `.wh.NAME`, with the time of the whiteout.
    Whiteout { mtime: i64 },
}

/// How to write a directory's content.
enum DirWalk {
    /// Entries of the upper only (the lower content is the image's own).
    Upper { new: Vec<Source>, old: Vec<Source> },
    /// The image content is hidden: the opaque marker, then upper entries.
    Opaque { new: Vec<Source> },
    /// The lower content comes from elsewhere: opaque, and everything the
    /// container sees, written out.
    Whole { new: Vec<Source>, opaque: bool },
}

struct LayerWriter<'a, W: Write> {
    views: &'a Views,
    tar: tar::Builder<W>,
    /// First member of each multiply-linked file, by (device, inode).
    links: HashMap<(u64, u64), Vec<u8>>,
    clamp: Option<u64>,
}

fn sys_error(what: &Path, err: Errno) -> String {
    format!("{}: {err}", display_member(what))
}

fn display_member(rel: &Path) -> String {
    format!("/{}", rel.display())
}

impl<W: Write> LayerWriter<'_, W> {
    fn container(&self) -> &LayerStack {
        &self.views.container
    }

    /// Write the upper's copy of directory `rel` (its container sources
    /// `new`, its image sources `old`).
    fn walk_upper(&mut self, rel: &Path, new: &[Source], old: &[Source]) -> Result<(), String> {
        let Some(upper) = new.iter().find(|s| self.container().is_upper(s.layer)).cloned() else { return Ok(()) };
        let dir = self.container().open_dir(upper.layer, &upper.path, libc::O_PATH).map_err(|e| sys_error(rel, e))?;
        let mut members: Vec<(OsString, Member)> = Vec::new();
        for raw in sys::read_dir(dir.as_fd()).map_err(|e| sys_error(rel, e))? {
            let child = rel.join(&raw.name);
            if raw.name.as_bytes().starts_with(WHITEOUT_PREFIX) {
                return Err(format!(
                    "the upper layer holds {}, named like a whiteout (.wh.*): a tar reader would take it for one; \
                     rename it first",
                    display_member(&child)
                ));
            }
            let found = self.container().lookup(new, &raw.name).map_err(|e| sys_error(&child, e))?;
            let Some(entry) = found else {
                // Not visible: a whiteout.
                let stat = sys::fstatat(dir.as_fd(), &raw.name).map_err(|e| sys_error(&child, e))?;
                let mut name = OsString::from(OsStr::from_bytes(WHITEOUT_PREFIX));
                name.push(&raw.name);
                members.push((name, Member::Whiteout { mtime: stat.st_mtime }));
                continue;
            };
            let walk = if entry.is_dir() {
                let before = self.views.image.lookup(old, &raw.name).map_err(|e| sys_error(&child, e))?;
                let image_sources = before.filter(|b| b.is_dir()).map(|b| b.dir_sources).unwrap_or_default();
                let lowers = self.lower_part(&entry.dir_sources);
                Some(if lowers == image_sources {
                    DirWalk::Upper { new: entry.dir_sources.clone(), old: image_sources }
                } else if lowers.is_empty() {
                    if image_sources.is_empty() {
                        DirWalk::Upper { new: entry.dir_sources.clone(), old: Vec::new() }
                    } else {
                        DirWalk::Opaque { new: entry.dir_sources.clone() }
                    }
                } else {
                    DirWalk::Whole { new: entry.dir_sources.clone(), opaque: !image_sources.is_empty() }
                })
            } else {
                None
            };
            members.push((raw.name, Member::Entry { source: entry.top, stat: Box::new(entry.stat), dir: walk }));
        }
        members.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, member) in members {
            let child = rel.join(&name);
            match member {
                Member::Whiteout { mtime } => self.empty_file(&child, 0, mtime)?,
                Member::Entry { source, stat, dir } => {
                    self.entry(&child, &source, &stat)?;
                    match dir {
                        None => {}
                        Some(DirWalk::Upper { new, old }) => self.walk_upper(&child, &new, &old)?,
                        Some(DirWalk::Opaque { new }) => {
                            self.empty_file(&child.join(OPAQUE_MARKER), 0, stat.st_mtime)?;
                            // Below an opaque directory the image shows nothing.
                            self.walk_upper(&child, &new, &[])?;
                        }
                        Some(DirWalk::Whole { new, opaque }) => {
                            if opaque {
                                self.empty_file(&child.join(OPAQUE_MARKER), 0, stat.st_mtime)?;
                            }
                            self.walk_merged(&child, &new)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The lower copies a container-view directory merges, as image-view sources.
    fn lower_part(&self, sources: &[Source]) -> Vec<Source> {
        sources
            .iter()
            .filter(|s| !self.container().is_upper(s.layer))
            .map(|s| Source { layer: s.layer - 1, path: s.path.clone() })
            .collect()
    }

    /// Write everything the container shows below directory `rel`.
    fn walk_merged(&mut self, rel: &Path, sources: &[Source]) -> Result<(), String> {
        let mut names: Vec<OsString> =
            self.container().list(sources).map_err(|e| sys_error(rel, e))?.into_iter().map(|e| e.name).collect();
        names.sort();
        for name in names {
            let child = rel.join(&name);
            let Some(entry) = self.container().lookup(sources, &name).map_err(|e| sys_error(&child, e))? else {
                continue;
            };
            self.entry(&child, &entry.top, &entry.stat)?;
            if entry.is_dir() {
                self.walk_merged(&child, &entry.dir_sources)?;
            }
        }
        Ok(())
    }

    fn mtime(&self, seconds: i64) -> u64 {
        let seconds = seconds.max(0) as u64;
        match self.clamp {
            Some(limit) => seconds.min(limit),
            None => seconds,
        }
    }

    /// An empty regular file: a whiteout or an opaque marker.
    fn empty_file(&mut self, rel: &Path, mode: u32, mtime: i64) -> Result<(), String> {
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.mtime(mtime));
        header.set_size(0);
        self.append(header, rel.as_os_str().as_bytes().to_vec(), None, Vec::new(), io::empty())
    }

    /// One entry of the container view, from the layer holding it.
    fn entry(&mut self, rel: &Path, source: &Source, stat: &Stat) -> Result<(), String> {
        let stack = self.container();
        let kind = stat.st_mode & libc::S_IFMT;
        let mut name = rel.as_os_str().as_bytes().to_vec();
        let mut header = Header::new_ustar();
        header.set_mode(stat.st_mode & 0o7777);
        header.set_mtime(self.mtime(stat.st_mtime));
        header.set_size(0);
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        for (key, id) in [("uid", stat.st_uid), ("gid", stat.st_gid)] {
            let value = if u64::from(id) > 0o7777777 {
                pax.push((key.to_string(), id.to_string().into_bytes()));
                0
            } else {
                u64::from(id)
            };
            if key == "uid" { header.set_uid(value) } else { header.set_gid(value) }
        }
        let parent = source.path.parent().unwrap_or(Path::new(""));
        let file_name = source.path.file_name().unwrap_or(OsStr::new("."));
        let dir = stack.open_dir(source.layer, parent, libc::O_PATH).map_err(|e| sys_error(rel, e))?;
        let xattrs = XattrTarget::new(dir.as_fd(), file_name).map_err(|e| sys_error(rel, e))?;
        let mut names = xattrs.list().map_err(|e| sys_error(rel, e))?;
        names.sort();
        if names.iter().any(|n| n.as_bytes().ends_with(b"overlay.metacopy")) {
            // The kernel's metacopy=on: the data is still in a lower layer.
            return Err(format!(
                "{} in the upper layer holds metadata only (overlay metacopy); Strata cannot commit such an upper: \
                 copy the data up first (mount it without metacopy and rewrite the file)",
                display_member(rel)
            ));
        }
        for attr in names {
            let bytes = attr.as_bytes();
            let wanted = bytes == b"security.capability" || bytes.starts_with(b"user.");
            if !wanted || layers::is_private_xattr(&attr) {
                continue;
            }
            if let Some(value) = xattrs.get_opt(&attr).map_err(|e| sys_error(rel, e))? {
                pax.push((format!("SCHILY.xattr.{}", attr.to_string_lossy()), value));
            }
        }
        let mut link = None;
        let mut data: Option<(File, u64)> = None;
        match kind {
            libc::S_IFDIR => {
                header.set_entry_type(EntryType::Directory);
                name.push(b'/');
            }
            libc::S_IFREG => {
                let first = (stat.st_nlink > 1).then(|| self.links.get(&(stat.st_dev, stat.st_ino)).cloned()).flatten();
                if let Some(first) = first {
                    header.set_entry_type(EntryType::Link);
                    link = Some(first);
                } else {
                    if stat.st_nlink > 1 {
                        self.links.insert((stat.st_dev, stat.st_ino), name.clone());
                    }
                    header.set_entry_type(EntryType::Regular);
                    let size = stat.st_size as u64;
                    let root = self.container().layers[source.layer].root.as_fd();
                    let fd = sys::open_beneath(root, &source.path, libc::O_RDONLY).map_err(|e| sys_error(rel, e))?;
                    if size > 0o77777777777 {
                        pax.push(("size".to_string(), size.to_string().into_bytes()));
                    } else {
                        header.set_size(size);
                    }
                    data = Some((File::from(fd), size));
                }
            }
            libc::S_IFLNK => {
                header.set_entry_type(EntryType::Symlink);
                let target = sys::readlinkat(dir.as_fd(), file_name).map_err(|e| sys_error(rel, e))?;
                link = Some(target.as_bytes().to_vec());
            }
            libc::S_IFCHR | libc::S_IFBLK => {
                header.set_entry_type(if kind == libc::S_IFCHR { EntryType::Char } else { EntryType::Block });
                let (major, minor) = (libc::major(stat.st_rdev), libc::minor(stat.st_rdev));
                header.set_device_major(major).map_err(|err| format!("{}: {err}", display_member(rel)))?;
                header.set_device_minor(minor).map_err(|err| format!("{}: {err}", display_member(rel)))?;
            }
            libc::S_IFIFO => header.set_entry_type(EntryType::Fifo),
            _ => {
                // A socket has no tar form; docker leaves them out too.
                log::warn!("{} is a socket; a layer cannot hold one, leaving it out", display_member(rel));
                return Ok(());
            }
        }
        match data {
            // Exactly `size` bytes, whatever the file does meanwhile.
            Some((file, size)) => {
                let reader = file.take(size).chain(io::repeat(0)).take(size);
                self.append(header, name, link, pax, reader)
            }
            None => self.append(header, name, link, pax, io::empty()),
        }
    }

    /// Write a header (with a PAX header first when a field does not fit)
    /// and its data.
    fn append(
        &mut self,
        mut header: Header,
        name: Vec<u8>,
        link: Option<Vec<u8>>,
        mut pax: Vec<(String, Vec<u8>)>,
        data: impl Read,
    ) -> Result<(), String> {
        let member = String::from_utf8_lossy(&name).into_owned();
        let ustar = header.as_ustar_mut().ok_or("not a USTAR header")?;
        if !set_ustar_name(&mut ustar.name, &mut ustar.prefix, &name) {
            pax.push(("path".to_string(), name.clone()));
            let cut = name.len().min(ustar.name.len());
            ustar.name[..cut].copy_from_slice(&name[..cut]);
        }
        if let Some(link) = link {
            if link.len() <= ustar.linkname.len() {
                ustar.linkname[..link.len()].copy_from_slice(&link);
            } else {
                pax.push(("linkpath".to_string(), link.clone()));
                ustar.linkname.copy_from_slice(&link[..100]);
            }
        }
        if !pax.is_empty() {
            pax.sort();
            let records = pax_records(&pax);
            let mut pax_header = Header::new_ustar();
            pax_header.set_entry_type(EntryType::XHeader);
            pax_header.set_mode(0o644);
            pax_header.set_uid(0);
            pax_header.set_gid(0);
            pax_header.set_mtime(header.mtime().unwrap_or(0));
            pax_header.set_size(records.len() as u64);
            let pax_name = pax_header_name(&name);
            if let Some(u) = pax_header.as_ustar_mut() {
                u.name[..pax_name.len()].copy_from_slice(&pax_name);
            }
            pax_header.set_cksum();
            self.tar.append(&pax_header, records.as_slice()).map_err(|err| format!("{member}: {err}"))?;
        }
        header.set_cksum();
        self.tar.append(&header, data).map_err(|err| format!("{member}: {err}"))
    }
}

/// Put `path` in the USTAR name (100 bytes) and prefix (155 bytes) fields,
/// split at a slash; false when it cannot fit.
fn set_ustar_name(name_field: &mut [u8; 100], prefix_field: &mut [u8; 155], path: &[u8]) -> bool {
    if path.len() <= name_field.len() {
        name_field[..path.len()].copy_from_slice(path);
        return true;
    }
    // The last slash that leaves a prefix short enough and a name that fits;
    // a trailing slash (a directory) stays with the name.
    let search = &path[..path.len() - 1];
    for (i, byte) in search.iter().enumerate().rev() {
        if *byte != b'/' {
            continue;
        }
        let (prefix, rest) = (&path[..i], &path[i + 1..]);
        if rest.len() > name_field.len() {
            return false;
        }
        if prefix.len() <= prefix_field.len() {
            prefix_field[..prefix.len()].copy_from_slice(prefix);
            name_field[..rest.len()].copy_from_slice(rest);
            return true;
        }
    }
    false
}

/// PAX records: "LENGTH key=value\n", LENGTH counting itself.
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // space, '=', newline
        let mut length = body + 1;
        while length != body + length.to_string().len() {
            length = body + length.to_string().len();
        }
        out.extend_from_slice(length.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

/// "DIR/PaxHeaders.0/NAME", cut to the 100 bytes of a USTAR name.
fn pax_header_name(path: &[u8]) -> Vec<u8> {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    let (dir, file) = match trimmed.iter().rposition(|b| *b == b'/') {
        Some(i) => (&trimmed[..=i], &trimmed[i + 1..]),
        None => (&b""[..], trimmed),
    };
    let mut name = dir.to_vec();
    name.extend_from_slice(b"PaxHeaders.0/");
    name.extend_from_slice(file);
    name.truncate(100);
    name
}

/// Adding a layer to an OCI image layout (image-spec's image-layout.md).
mod oci {
    use std::path::Path;

    use serde_json::{Value, json};

    use super::{Compression, Hashing, Written, write_layer};
    use crate::diff::Views;

    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    const REF_NAME: &str = "org.opencontainers.image.ref.name";

    fn layer_type(compression: Compression) -> &'static str {
        match compression {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    fn ref_name(descriptor: &Value) -> Option<&str> {
        descriptor.get("annotations")?.get(REF_NAME)?.as_str()
    }

    fn read_json(path: &Path) -> Result<Value, String> {
        let text = std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        serde_json::from_slice(&text).map_err(|err| format!("{} is not valid JSON: {err}", path.display()))
    }

    fn blob_path(layout: &Path, digest: &str) -> Result<std::path::PathBuf, String> {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| format!("unsupported digest {digest:?}"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("malformed digest {digest:?}"));
        }
        Ok(layout.join("blobs/sha256").join(hex))
    }

    /// Write `data` as a blob; its digest and size.
    fn write_blob(layout: &Path, data: &[u8]) -> Result<(String, u64), String> {
        let mut hashing = Hashing::new(Vec::new());
        std::io::Write::write_all(&mut hashing, data).map_err(|err| err.to_string())?;
        let digest = hashing.digest();
        write_atomically(&blob_path(layout, &digest)?, data)?;
        Ok((digest, data.len() as u64))
    }

    fn write_atomically(path: &Path, data: &[u8]) -> Result<(), String> {
        let mut temp = path.as_os_str().to_owned();
        temp.push(format!(".{}.partial", std::process::id()));
        std::fs::write(&temp, data).map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        std::fs::rename(&temp, path).map_err(|err| format!("cannot write {}: {err}", path.display()))
    }

    /// Seconds since 1970 as RFC 3339 (UTC).
    pub fn rfc3339(seconds: u64) -> String {
        let days = (seconds / 86_400) as i64;
        let rest = seconds % 86_400;
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest / 60 % 60, rest % 60)
    }

    fn architecture() -> &'static str {
        match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        }
    }

    /// Write the layer into `layout` and make `tag` name the base image
    /// plus this layer. Returns the layer's identity and the manifest digest.
    pub fn add_layer(
        views: &Views,
        layout: &Path,
        tag: &str,
        from: Option<&str>,
        compression: Compression,
        clamp: Option<u64>,
        created: u64,
    ) -> Result<(Written, String), String> {
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(|err| format!("cannot create {}: {err}", blobs.display()))?;
        let marker = layout.join("oci-layout");
        if !marker.exists() {
            write_atomically(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index_path = layout.join("index.json");
        let mut index = if index_path.exists() {
            read_json(&index_path)?
        } else {
            json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": []})
        };
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();

        // The image the container was made from.
        let base_name = match from {
            Some(name) => Some(name.to_string()),
            None if manifests.iter().any(|d| ref_name(d) == Some(tag)) => Some(tag.to_string()),
            None if manifests.len() == 1 => ref_name(&manifests[0]).map(str::to_string),
            None => None,
        };
        let base = match &base_name {
            Some(name) => Some(
                manifests
                    .iter()
                    .find(|d| ref_name(d) == Some(name))
                    .ok_or_else(|| format!("no image {name:?} in {}", index_path.display()))?
                    .clone(),
            ),
            None => None,
        };
        let (mut manifest, mut config) = match &base {
            Some(descriptor) => {
                if descriptor["mediaType"] != MANIFEST {
                    return Err(format!(
                        "image {:?} is a {}, not an image manifest; name one platform's image with --from",
                        base_name.unwrap_or_default(),
                        descriptor["mediaType"]
                    ));
                }
                let manifest = read_json(&blob_path(layout, descriptor["digest"].as_str().unwrap_or(""))?)?;
                let config = read_json(&blob_path(layout, manifest["config"]["digest"].as_str().unwrap_or(""))?)?;
                (manifest, config)
            }
            None => (
                json!({"schemaVersion": 2, "mediaType": MANIFEST, "layers": []}),
                json!({
                    "architecture": architecture(),
                    "os": "linux",
                    "config": {},
                    "rootfs": {"type": "layers", "diff_ids": []},
                    "history": []
                }),
            ),
        };
        let base_layers = manifest["layers"].as_array().map(Vec::len).unwrap_or(0);
        let lowers = views.image.layers.len();
        if base.is_some() && base_layers != lowers {
            eprintln!(
                "strata: warning: the base image has {base_layers} layer(s) but the container has {lowers} lower layer(s)"
            );
        }

        // The layer, hashed while written, then named by its digest.
        let temp = blobs.join(format!(".strata-layer-{}.partial", std::process::id()));
        let file = std::fs::File::create(&temp).map_err(|err| format!("cannot create {}: {err}", temp.display()))?;
        let result = write_layer(views, file, compression, clamp).and_then(|(written, file)| {
            file.sync_all().map_err(|err| format!("cannot write {}: {err}", temp.display()))?;
            let path = blob_path(layout, &written.digest)?;
            std::fs::rename(&temp, &path).map_err(|err| format!("cannot write {}: {err}", path.display()))?;
            Ok(written)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        let written = result?;

        let time = rfc3339(created);
        let diff_ids = config["rootfs"]["diff_ids"].as_array().cloned().unwrap_or_default();
        let mut diff_ids = diff_ids;
        diff_ids.push(json!(written.diff_id));
        config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
        let mut history = config["history"].as_array().cloned().unwrap_or_default();
        history.push(json!({"created": time, "created_by": "strata commit"}));
        config["history"] = json!(history);
        config["created"] = json!(time);
        let config_bytes = serde_json::to_vec(&config).map_err(|err| err.to_string())?;
        let (config_digest, config_size) = write_blob(layout, &config_bytes)?;

        let mut layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        layers.push(json!({"mediaType": layer_type(compression), "digest": written.digest, "size": written.size}));
        manifest["layers"] = json!(layers);
        manifest["config"] = json!({"mediaType": CONFIG, "digest": config_digest, "size": config_size});
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|err| err.to_string())?;
        let (manifest_digest, manifest_size) = write_blob(layout, &manifest_bytes)?;

        let mut entries: Vec<Value> = manifests.into_iter().filter(|d| ref_name(d) != Some(tag)).collect();
        entries.push(json!({
            "mediaType": MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {REF_NAME: tag}
        }));
        index["manifests"] = json!(entries);
        let index_bytes = serde_json::to_vec_pretty(&index).map_err(|err| err.to_string())?;
        write_atomically(&index_path, &index_bytes)?;
        Ok((written, manifest_digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(oci::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(oci::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(oci::rfc3339(1_600_000_000), "2020-09-13T12:26:40Z");
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let records = pax_records(&[("path".to_string(), b"a".to_vec())]);
        assert_eq!(records, b"9 path=a\n");
        let value = vec![b'x'; 95];
        let records = pax_records(&[("path".to_string(), value)]);
        assert_eq!(records.len(), 105);
        assert!(records.starts_with(b"105 path="));
    }

    #[test]
    fn long_names_split_at_a_slash() {
        let mut name = [0u8; 100];
        let mut prefix = [0u8; 155];
        let path = format!("{}/{}/", "d".repeat(120), "f".repeat(50));
        assert!(set_ustar_name(&mut name, &mut prefix, path.as_bytes()));
        assert_eq!(&prefix[..120], "d".repeat(120).as_bytes());
        assert_eq!(&name[..51], format!("{}/", "f".repeat(50)).as_bytes());
        let mut name = [0u8; 100];
        let mut prefix = [0u8; 155];
        assert!(!set_ustar_name(&mut name, &mut prefix, "n".repeat(101).as_bytes()));
    }
}
