//! Little-endian primitives shared by every object: a writer that appends to a `Vec<u8>` and a
//! reader that never reads past its slice and never allocates more than the bytes it holds.

use crate::error::FormatError;
use sha2::{Digest, Sha256};

/// Appends little-endian fields.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// A byte string: u32 length, then the bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        let len = u32::try_from(v.len()).expect("byte strings in repository objects are < 4 GiB");
        self.u32(len);
        self.raw(v);
    }
    /// An optional byte string: u8 0 (absent) or u8 1 followed by a byte string.
    pub fn opt_bytes(&mut self, v: Option<&[u8]>) {
        match v {
            None => self.u8(0),
            Some(b) => {
                self.u8(1);
                self.bytes(b);
            }
        }
    }
    /// Object header: 4-byte magic, u16 major, u16 minor.
    pub fn header(&mut self, magic: [u8; 4]) {
        self.header_minor(magic, crate::FORMAT_MINOR);
    }
    /// Object header of an object kind introduced in a later minor version.
    pub fn header_minor(&mut self, magic: [u8; 4], minor: u16) {
        self.header_version(magic, crate::FORMAT_MAJOR, minor);
    }
    /// Object header with an explicit major version (a manifest in parts is major 2, 8.4.7).
    pub fn header_version(&mut self, magic: [u8; 4], major: u16, minor: u16) {
        self.raw(&magic);
        self.u16(major);
        self.u16(minor);
    }
    /// Appends the sha256 of everything written so far (the object trailer).
    pub fn finish_with_sha256(mut self) -> Vec<u8> {
        let digest = Sha256::digest(&self.buf);
        self.buf.extend_from_slice(&digest);
        self.buf
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Reads little-endian fields from a slice; every read is bounds-checked.
pub struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Reader { what, buf, pos: 0 }
    }
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(FormatError::Truncated {
                what: self.what,
                needed: (n - self.remaining()) as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, FormatError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// A byte string of at most `max` bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], FormatError> {
        let len = string_len(field, self.u32()?, max)?;
        self.take(len)
    }
    pub fn opt_bytes(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<Option<&'a [u8]>, FormatError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes(field, max)?)),
            other => Err(FormatError::invalid(
                self.what,
                format!("{field} presence flag is {other}, expected 0 or 1"),
            )),
        }
    }
    /// Checks the 4-byte magic and the major version; returns the minor version.
    pub fn header(&mut self, magic: [u8; 4]) -> Result<u16, FormatError> {
        self.header_of(magic, crate::FORMAT_MAJOR)
            .map(|(_, minor)| minor)
    }
    /// Checks the 4-byte magic and that the major version is 1..=`max_major`; returns both.
    pub fn header_of(&mut self, magic: [u8; 4], max_major: u16) -> Result<(u16, u16), FormatError> {
        let found = self.array::<4>()?;
        if found != magic {
            return Err(FormatError::BadMagic {
                what: self.what,
                found,
                expected: magic,
            });
        }
        let major = self.u16()?;
        let minor = self.u16()?;
        if major == 0 || major > max_major {
            return Err(FormatError::UnsupportedVersion {
                what: self.what,
                found: major,
                max: max_major,
            });
        }
        Ok((major, minor))
    }
    /// Fails unless every byte was consumed.
    pub fn expect_end(&self) -> Result<(), FormatError> {
        if self.remaining() != 0 {
            return Err(FormatError::invalid(
                self.what,
                format!("{} unexpected trailing bytes", self.remaining()),
            ));
        }
        Ok(())
    }
    /// Bounds a declared element count by what the remaining bytes can hold, so a hostile count
    /// never causes a large allocation.
    pub fn capacity_for(&self, count: u64, min_elem_size: usize) -> usize {
        let fit = self.remaining() / min_elem_size.max(1);
        usize::try_from(count).unwrap_or(usize::MAX).min(fit)
    }
}

/// The length of a byte string whose `u32` prefix says `len`, refused above `max` (before
/// anything is allocated for it).
pub fn string_len(field: &'static str, len: u32, max: usize) -> Result<usize, FormatError> {
    let len = len as usize;
    if len > max {
        return Err(FormatError::TooLarge {
            what: field,
            size: len as u64,
            max: max as u64,
        });
    }
    Ok(len)
}

/// Verifies and strips the 32-byte sha256 trailer of `buf`.
/// Opens a checksummed object (config, manifest, lease, GC state, cluster record): checks the
/// magic and major version first (so a foreign object is named as such), then the sha256
/// trailer, and returns a reader over the body positioned after the header. The header is read
/// again from the body: an object shorter than header + trailer overlaps them and must fail as
/// truncated, not index past the body.
pub fn open_trailed<'a>(
    what: &'static str,
    buf: &'a [u8],
    magic: [u8; 4],
) -> Result<Reader<'a>, FormatError> {
    Reader::new(what, buf).header(magic)?;
    let body = split_sha256_trailer(what, buf)?;
    let mut r = Reader::new(what, body);
    r.header(magic)?;
    Ok(r)
}

pub fn split_sha256_trailer<'a>(
    what: &'static str,
    buf: &'a [u8],
) -> Result<&'a [u8], FormatError> {
    if buf.len() < 32 {
        return Err(FormatError::Truncated {
            what,
            needed: (32 - buf.len()) as u64,
        });
    }
    let (body, trailer) = buf.split_at(buf.len() - 32);
    let actual = Sha256::digest(body);
    if actual.as_slice() != trailer {
        return Err(FormatError::ChecksumMismatch {
            what,
            expected: hex::encode(trailer),
            actual: hex::encode(actual),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_truncated_and_oversized() {
        let mut w = Writer::new();
        w.bytes(b"hello");
        let buf = w.finish();
        assert_eq!(
            Reader::new("t", &buf).bytes("f", 4).unwrap_err(),
            FormatError::TooLarge {
                what: "f",
                size: 5,
                max: 4
            }
        );
        assert!(matches!(
            Reader::new("t", &buf[..6]).bytes("f", 10),
            Err(FormatError::Truncated { .. })
        ));
        assert_eq!(Reader::new("t", &buf).bytes("f", 10).unwrap(), b"hello");
    }

    #[test]
    fn trailer_detects_corruption() {
        let mut w = Writer::new();
        w.u64(7);
        let mut buf = w.finish_with_sha256();
        assert!(split_sha256_trailer("t", &buf).is_ok());
        buf[0] ^= 1;
        assert!(matches!(
            split_sha256_trailer("t", &buf),
            Err(FormatError::ChecksumMismatch { .. })
        ));
    }
}
