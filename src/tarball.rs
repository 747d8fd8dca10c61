//! A streaming reader of tar archives that trusts nothing it reads.
//!
//! Layer tarballs are untrusted, so this reader (rather than the `tar`
//! crate, which reads a GNU long name or a PAX header of any size into
//! memory) keeps memory bounded: a PAX header or long name larger than
//! [`MAX_META`] is an error. It understands ustar, GNU (long names and
//! links, base-256 numbers) and PAX (local headers; global headers are read
//! and ignored). Sparse members and any type it does not know are errors,
//! so nothing is silently extracted wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

const BLOCK: usize = 512;
/// The largest PAX header or GNU long name accepted.
pub const MAX_META: u64 = 1 << 20;

/// What a member is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    HardLink,
    Symlink,
    CharDevice,
    BlockDevice,
    Directory,
    Fifo,
}

/// One member's header, with PAX and GNU extensions applied.
#[derive(Clone, Debug)]
pub struct Header {
    /// The name as written (not cleaned): bytes, never assumed UTF-8.
    pub name: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    /// Target of a symlink or hard link.
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes from PAX `SCHILY.xattr.NAME` records, unfiltered.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Why an archive cannot be read.
#[derive(Debug)]
pub enum TarError {
    Io(io::Error),
    /// The stream ended inside a header or a member's data.
    Truncated,
    BadChecksum {
        offset: u64,
    },
    BadNumber {
        field: &'static str,
        offset: u64,
    },
    TooLarge {
        what: &'static str,
        size: u64,
    },
    BadPax(String),
    Unsupported {
        kind: u8,
        name: Vec<u8>,
    },
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TarError::Io(err) => write!(f, "{err}"),
            TarError::Truncated => write!(f, "the tar stream is truncated"),
            TarError::BadChecksum { offset } => write!(f, "bad tar header checksum at byte {offset}"),
            TarError::BadNumber { field, offset } => write!(f, "bad {field} field in the tar header at byte {offset}"),
            TarError::TooLarge { what, size } => {
                write!(f, "{what} of {size} bytes is larger than the {MAX_META} bytes allowed")
            }
            TarError::BadPax(why) => write!(f, "bad PAX header: {why}"),
            TarError::Unsupported { kind, name } => write!(
                f,
                "member {} has type {:?}, which Strata does not extract",
                String::from_utf8_lossy(name),
                char::from(*kind)
            ),
        }
    }
}

impl std::error::Error for TarError {}

impl From<io::Error> for TarError {
    fn from(err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof { TarError::Truncated } else { TarError::Io(err) }
    }
}

/// Reads members one at a time: [`TarReader::next`] gives a header, then the
/// caller reads its data with [`TarReader::data`] (or leaves it: the next
/// call skips what is left).
pub struct TarReader<R: Read> {
    inner: R,
    /// Bytes consumed so far (for messages).
    offset: u64,
    /// Data bytes of the current member not yet read, and its padding.
    remaining: u64,
    padding: u64,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader { inner, offset: 0, remaining: 0, padding: 0, done: false }
    }

    /// Bytes consumed so far: just after [`TarReader::next`], where the
    /// member's data starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying reader (to drain what follows the archive).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated),
                Ok(n) => filled += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err.into()),
            }
        }
        self.offset += BLOCK as u64;
        Ok(true)
    }

    fn skip(&mut self, mut len: u64) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while len > 0 {
            let want = len.min(buf.len() as u64) as usize;
            let got = self.inner.read(&mut buf[..want])?;
            if got == 0 {
                return Err(TarError::Truncated);
            }
            len -= got as u64;
            self.offset += got as u64;
        }
        Ok(())
    }

    /// Read the whole (small) data of a metadata member.
    fn read_meta(&mut self, size: u64, what: &'static str) -> Result<Vec<u8>, TarError> {
        if size > MAX_META {
            return Err(TarError::TooLarge { what, size });
        }
        let mut data = vec![0u8; size as usize];
        self.inner.read_exact(&mut data)?;
        self.offset += size;
        self.skip(pad(size))?;
        Ok(data)
    }

    /// The next member, or None at the end of the archive.
    pub fn next(&mut self) -> Result<Option<Header>, TarError> {
        if self.done {
            return Ok(None);
        }
        let (remaining, padding) = (self.remaining, self.padding);
        self.skip(remaining + padding)?;
        self.remaining = 0;
        self.padding = 0;
        let mut pax: Option<BTreeMap<Vec<u8>, Vec<u8>>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut block = [0u8; BLOCK];
        loop {
            let header_offset = self.offset;
            if !self.read_block(&mut block)? {
                // EOF without the two zero blocks: accepted when nothing
                // was pending, as Docker accepts it.
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(TarError::Truncated);
                }
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|b| *b == 0) {
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(TarError::Truncated);
                }
                // The end: a second zero block normally follows; the caller
                // drains whatever is left for the digest.
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&block, header_offset)?;
            let typeflag = block[156];
            let size = number(&block[124..136], "size", header_offset)?;
            match typeflag {
                b'x' => {
                    let data = self.read_meta(size, "a PAX header")?;
                    let records = parse_pax(&data)?;
                    pax.get_or_insert_with(BTreeMap::new).extend(records);
                    continue;
                }
                b'g' => {
                    // Global PAX records (a comment, usually): read and ignored.
                    self.read_meta(size, "a global PAX header")?;
                    continue;
                }
                b'L' => {
                    long_name = Some(trim_nul(self.read_meta(size, "a GNU long name")?));
                    continue;
                }
                b'K' => {
                    long_link = Some(trim_nul(self.read_meta(size, "a GNU long link name")?));
                    continue;
                }
                _ => {}
            }
            let ustar = &block[257..263] == b"ustar\0" || &block[257..263] == b"ustar ";
            let mut name = field(&block[0..100]).to_vec();
            if &block[257..263] == b"ustar\0" {
                let prefix = field(&block[345..500]);
                if !prefix.is_empty() {
                    let mut full = prefix.to_vec();
                    full.push(b'/');
                    full.extend_from_slice(&name);
                    name = full;
                }
            }
            let kind = match typeflag {
                b'0' | 0 | b'7' => Kind::File,
                b'1' => Kind::HardLink,
                b'2' => Kind::Symlink,
                b'3' => Kind::CharDevice,
                b'4' => Kind::BlockDevice,
                b'5' => Kind::Directory,
                b'6' => Kind::Fifo,
                other => {
                    let name = long_name.unwrap_or(name);
                    return Err(TarError::Unsupported { kind: other, name });
                }
            };
            let mut header = Header {
                name,
                kind,
                mode: number(&block[100..108], "mode", header_offset)? as u32 & 0o7777,
                uid: number(&block[108..116], "uid", header_offset)? as u32,
                gid: number(&block[116..124], "gid", header_offset)? as u32,
                size,
                mtime: number(&block[136..148], "mtime", header_offset)? as i64,
                mtime_nsec: 0,
                link: field(&block[157..257]).to_vec(),
                dev_major: if ustar { number(&block[329..337], "devmajor", header_offset)? as u32 } else { 0 },
                dev_minor: if ustar { number(&block[337..345], "devminor", header_offset)? as u32 } else { 0 },
                xattrs: BTreeMap::new(),
            };
            // Old tar marks directories with a trailing slash on a regular type.
            if header.kind == Kind::File && typeflag == 0 && header.name.ends_with(b"/") {
                header.kind = Kind::Directory;
            }
            if let Some(name) = long_name {
                header.name = name;
            }
            if let Some(link) = long_link {
                header.link = link;
            }
            if let Some(records) = pax {
                apply_pax(&mut header, records)?;
            }
            // Only regular files carry data; a size on anything else is
            // still skipped so the stream stays in step.
            self.remaining = header.size;
            self.padding = pad(header.size);
            if header.kind != Kind::File {
                header.size = 0;
            }
            return Ok(Some(header));
        }
    }

    /// Read the current member's data.
    pub fn data(&mut self) -> MemberData<'_, R> {
        MemberData { reader: self }
    }
}

/// The data of the current member; reading past its end gives EOF, and a
/// stream that ends early gives an UnexpectedEof error.
pub struct MemberData<'a, R: Read> {
    reader: &'a mut TarReader<R>,
}

impl<R: Read> Read for MemberData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = &mut *self.reader;
        if r.remaining == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(r.remaining) as usize;
        let got = r.inner.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the tar stream ends inside a member"));
        }
        r.remaining -= got as u64;
        r.offset += got as u64;
        Ok(got)
    }
}

fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// A NUL-terminated header field.
fn field(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

fn trim_nul(mut data: Vec<u8>) -> Vec<u8> {
    if let Some(end) = data.iter().position(|b| *b == 0) {
        data.truncate(end);
    }
    data
}

fn verify_checksum(block: &[u8; BLOCK], offset: u64) -> Result<(), TarError> {
    let stored = number(&block[148..156], "checksum", offset)?;
    let unsigned: u64 =
        block.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { *b as u64 }).sum();
    let signed: i64 =
        block.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { *b as i8 as i64 }).sum();
    if stored == unsigned || stored as i64 == signed { Ok(()) } else { Err(TarError::BadChecksum { offset }) }
}

/// An octal field (spaces and NULs around it allowed) or a GNU base-256
/// number (high bit of the first byte set).
fn number(bytes: &[u8], name: &'static str, offset: u64) -> Result<u64, TarError> {
    let bad = || TarError::BadNumber { field: name, offset };
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        if bytes[0] & 0x40 != 0 {
            return Err(bad()); // negative
        }
        let mut value: u64 = u64::from(bytes[0] & 0x3f);
        for b in &bytes[1..] {
            value = value.checked_mul(256).and_then(|v| v.checked_add(u64::from(*b))).ok_or_else(bad)?;
        }
        return Ok(value);
    }
    let text: Vec<u8> =
        bytes.iter().copied().skip_while(|b| *b == b' ').take_while(|b| *b != 0 && *b != b' ').collect();
    if text.is_empty() {
        return Ok(0);
    }
    let mut value: u64 = 0;
    for b in text {
        if !(b'0'..=b'7').contains(&b) {
            return Err(bad());
        }
        value = value.checked_mul(8).and_then(|v| v.checked_add(u64::from(b - b'0'))).ok_or_else(bad)?;
    }
    Ok(value)
}

/// PAX records: `LEN KEY=VALUE\n`, LEN counting the whole record.
/// One PAX record: key and value, as bytes.
type PaxRecord = (Vec<u8>, Vec<u8>);

fn parse_pax(mut data: &[u8]) -> Result<Vec<PaxRecord>, TarError> {
    let mut records = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|b| *b == 0) {
            break;
        }
        let space = data.iter().position(|b| *b == b' ').ok_or_else(|| TarError::BadPax("no length".into()))?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| TarError::BadPax("bad length".into()))?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(TarError::BadPax("record length does not fit".into()));
        }
        let record = &data[space + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or_else(|| TarError::BadPax("record without =".into()))?;
        records.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

fn apply_pax(header: &mut Header, records: BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), TarError> {
    let text = |v: &[u8], key: &str| {
        std::str::from_utf8(v).map(str::to_owned).map_err(|_| TarError::BadPax(format!("{key} is not text")))
    };
    let int = |v: &[u8], key: &str| -> Result<u64, TarError> {
        text(v, key)?.parse::<u64>().map_err(|_| TarError::BadPax(format!("{key} is not a number")))
    };
    for (key, value) in records {
        match key.as_slice() {
            b"path" => header.name = value,
            b"linkpath" => header.link = value,
            b"size" => header.size = int(&value, "size")?,
            b"uid" => header.uid = u32::try_from(int(&value, "uid")?).map_err(|_| TarError::BadPax("uid".into()))?,
            b"gid" => header.gid = u32::try_from(int(&value, "gid")?).map_err(|_| TarError::BadPax("gid".into()))?,
            b"mtime" => {
                let t = text(&value, "mtime")?;
                let (secs, frac) = t.split_once('.').unwrap_or((&t, ""));
                header.mtime = secs.parse().map_err(|_| TarError::BadPax("mtime".into()))?;
                let digits: String = frac.chars().take(9).collect();
                header.mtime_nsec = if digits.is_empty() {
                    0
                } else {
                    format!("{digits:0<9}").parse().map_err(|_| TarError::BadPax("mtime".into()))?
                };
            }
            _ if key.starts_with(b"SCHILY.xattr.") => {
                header.xattrs.insert(key[b"SCHILY.xattr.".len()..].to_vec(), value);
            }
            _ if key.starts_with(b"GNU.sparse.") => {
                return Err(TarError::BadPax("sparse members are not supported".into()));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    #[test]
    fn reads_long_names_links_and_pax_xattrs() {
        let long = "d/".to_string() + &"x".repeat(300);
        let data = build(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(5);
            h.set_mode(0o4755);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "link", "y".repeat(200)).unwrap();
            b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])]).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_size(0);
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, "dir/", &b""[..]).unwrap();
        });
        let mut r = TarReader::new(&data[..]);
        let h = r.next().unwrap().unwrap();
        assert_eq!(h.name, long.as_bytes());
        assert_eq!(h.mode, 0o4755);
        let mut content = Vec::new();
        r.data().read_to_end(&mut content).unwrap();
        assert_eq!(content, b"hello");
        let h = r.next().unwrap().unwrap();
        assert_eq!((h.kind, h.link.len()), (Kind::Symlink, 200));
        let h = r.next().unwrap().unwrap();
        assert_eq!(h.kind, Kind::Directory);
        assert_eq!(h.xattrs.get(&b"user.k"[..]).map(Vec::as_slice), Some(&b"v"[..]));
        assert!(r.next().unwrap().is_none());
    }

    #[test]
    fn truncated_data_and_huge_meta_are_errors() {
        let data = build(|b| {
            let mut h = tar::Header::new_ustar();
            h.set_size(2000);
            b.append_data(&mut h, "f", &vec![7u8; 2000][..]).unwrap();
        });
        let mut r = TarReader::new(&data[..1000]);
        r.next().unwrap().unwrap();
        assert!(io::copy(&mut r.data(), &mut io::sink()).is_err());

        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(MAX_META + 1);
        h.set_path("././@LongLink").unwrap();
        h.set_cksum();
        let mut r = TarReader::new(io::Cursor::new(h.as_bytes().to_vec()).chain(io::repeat(b'a')));
        assert!(matches!(r.next(), Err(TarError::TooLarge { .. })));
    }

    #[test]
    fn numbers_in_octal_and_base_256() {
        assert_eq!(number(b"0000644 \0", "m", 0).unwrap(), 0o644);
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0], "s", 0).unwrap(), 0x20000);
        assert!(number(b"0009", "m", 0).is_err());
    }
}
