//! sha256 digests as OCI writes them (`sha256:` and 64 hex digits), and a
//! reader that hashes and counts what passes through it.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// Lower-case hex of bytes (sha2 0.11 has no `{:x}` for its output).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:HEX` of some bytes.
pub fn sha256_of(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// The hex part of a `sha256:HEX` digest, checked; None for any other
/// algorithm or a malformed value (a digest is used as a file name, so it
/// must be exactly 64 hex digits).
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

/// The first 12 hex digits, as `docker images` shows an id.
pub fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// A running sha256 and byte count.
#[derive(Default)]
pub struct Tally {
    hasher: Sha256,
    pub bytes: u64,
}

impl Tally {
    pub fn digest(self) -> String {
        format!("sha256:{}", hex(&self.hasher.finalize()))
    }
}

/// Hashes and counts every byte read through it into a [`Tally`].
pub struct HashReader<'t, R> {
    inner: R,
    tally: &'t mut Tally,
}

impl<'t, R: Read> HashReader<'t, R> {
    pub fn new(inner: R, tally: &'t mut Tally) -> Self {
        HashReader { inner, tally }
    }
}

impl<R: Read> Read for HashReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tally.hasher.update(&buf[..n]);
        self.tally.bytes += n as u64;
        Ok(n)
    }
}

/// Fails once more than `limit` bytes have been read: the guard against a
/// decompression bomb.
pub struct LimitReader<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> LimitReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        LimitReader { inner, left: limit, limit }
    }
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Ask for one byte more than allowed to notice going over.
        let want = (buf.len() as u64).min(self.left.saturating_add(1)) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(io::Error::other(format!(
                "the layer decompresses to more than {} bytes (the --max-layer-size limit)",
                self.limit
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_limits() {
        assert_eq!(sha256_of(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!(sha256_hex("sha256:../../etc/passwd").is_none());
        assert!(sha256_hex(&sha256_of(b"x")).is_some());
        let mut tally = Tally::default();
        let mut out = Vec::new();
        HashReader::new(&b"abc"[..], &mut tally).read_to_end(&mut out).unwrap();
        assert_eq!((tally.bytes, tally.digest()), (3, sha256_of(b"abc")));
        assert!(LimitReader::new(&[0u8; 10][..], 9).read_to_end(&mut Vec::new()).is_err());
        assert_eq!(LimitReader::new(&[0u8; 10][..], 10).read_to_end(&mut Vec::new()).unwrap(), 10);
    }
}
