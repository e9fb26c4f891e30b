//! Encrypted repositories (format 1.2, FORMAT.md 17): every object is stored sealed in an
//! envelope of authenticated segments, and chunk ids are keyed.
//!
//! An envelope is an 8-byte header (`TMEN`, major 1, minor 2) followed by the plaintext object
//! cut into segments of [`SEGMENT`] bytes (the last one shorter, at least one segment). Each
//! segment is stored as `salt (24) | AES-256-GCM ciphertext | tag (16)`; its key is
//! HMAC-SHA256(object key, salt), its nonce all zero (every segment has its own key), and its
//! associated data binds the envelope version, the object's key in the repository, the
//! segment's index and whether it is the last. So a segment moved to another object, another
//! position or past the end fails authentication, and a range of the plaintext is read by
//! fetching and opening only the segments that cover it.

use crate::error::FormatError;
use crate::ids::ChunkId;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;
use std::ops::Range;

pub const MAGIC: [u8; 4] = *b"TMEN";
/// Minor version 1.2 added encrypted repositories.
pub const MINOR: u16 = 2;
/// Bytes of the envelope header.
pub const HEADER_LEN: u64 = 8;
/// Plaintext bytes per segment (the last segment holds 0..=SEGMENT; only an empty object has
/// an empty segment).
pub const SEGMENT: u64 = 64 << 10;
/// Random salt stored in front of each segment.
pub const SALT_LEN: usize = 24;
/// AES-256-GCM tag after each segment.
pub const TAG_LEN: usize = 16;
/// Stored bytes each segment adds to its plaintext.
pub const OVERHEAD: u64 = (SALT_LEN + TAG_LEN) as u64;
const STORED_SEGMENT: u64 = SEGMENT + OVERHEAD;
const WHAT: &str = "encrypted object";

/// The two secrets derived from a repository's master key: one seals objects, one keys chunk
/// ids. Cloning is cheap.
#[derive(Clone)]
pub struct DataKeys {
    object: hmac::Key,
    ids: ChunkIds,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKeys(..)")
    }
}

impl DataKeys {
    /// Derives the data keys from a repository's 32-byte master key (FORMAT.md 17.2).
    pub fn derive(master: &[u8; 32]) -> DataKeys {
        let m = hmac::Key::new(hmac::HMAC_SHA256, master);
        let sub = |label: &[u8]| hmac::sign(&m, label);
        DataKeys {
            object: hmac::Key::new(hmac::HMAC_SHA256, sub(b"tidemark 1.2 object key").as_ref()),
            ids: ChunkIds::Keyed(hmac::Key::new(
                hmac::HMAC_SHA256,
                sub(b"tidemark 1.2 chunk id key").as_ref(),
            )),
        }
    }

    /// How chunk ids are computed in this repository.
    pub fn chunk_ids(&self) -> &ChunkIds {
        &self.ids
    }

    fn segment_key(&self, salt: &[u8]) -> LessSafeKey {
        let k = hmac::sign(&self.object, salt);
        let unbound = UnboundKey::new(&aead::AES_256_GCM, k.as_ref())
            .expect("an HMAC-SHA256 output is a valid AES-256 key");
        LessSafeKey::new(unbound)
    }
}

/// How a repository names chunks: SHA-256 of the plaintext (unencrypted repositories, 8.2) or
/// HMAC-SHA256 keyed with the repository's chunk id key (encrypted repositories, 17.2), so that
/// nothing stored can confirm that a known page exists.
#[derive(Clone)]
pub enum ChunkIds {
    Sha256,
    Keyed(hmac::Key),
}

impl std::fmt::Debug for ChunkIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkIds::Sha256 => "ChunkIds::Sha256",
            ChunkIds::Keyed(_) => "ChunkIds::Keyed(..)",
        })
    }
}

impl ChunkIds {
    /// The id of a chunk holding `data`.
    pub fn id(&self, data: &[u8]) -> ChunkId {
        match self {
            ChunkIds::Sha256 => ChunkId::of(data),
            ChunkIds::Keyed(k) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(hmac::sign(k, data).as_ref());
                ChunkId(out)
            }
        }
    }

    /// The ids of `chunks`, in order: each equal to [`ChunkIds::id`] of it. SHA-256 ids are
    /// computed several chunks at a time (`tape_sha256`'s multi-buffer kernels: one SHA-256 is
    /// a serial chain of rounds, and independent chunks fill the lanes or the SHA unit's
    /// pipeline that one chain leaves idle; 2.4 against 1.3 GB/s for 8 KiB pages on the bench
    /// machine). Keyed ids are computed one by one.
    pub fn ids(&self, chunks: &[&[u8]]) -> Vec<ChunkId> {
        match self {
            ChunkIds::Sha256 => {
                let mut out = vec![[0u8; 32]; chunks.len()];
                tape_sha256::hash_many(chunks, &mut out);
                out.into_iter().map(ChunkId).collect()
            }
            ChunkIds::Keyed(_) => chunks.iter().map(|c| self.id(c)).collect(),
        }
    }
}

/// Stored length of an object of `plain` bytes.
pub fn sealed_len(plain: u64) -> u64 {
    HEADER_LEN + plain + segments(plain) * OVERHEAD
}

fn segments(plain: u64) -> u64 {
    plain.div_ceil(SEGMENT).max(1)
}

/// Plaintext length of a stored object of `sealed` bytes; an impossible length is an error.
pub fn plain_len(sealed: u64) -> Result<u64, FormatError> {
    let body = sealed
        .checked_sub(HEADER_LEN + OVERHEAD)
        .ok_or(FormatError::Truncated {
            what: WHAT,
            needed: (HEADER_LEN + OVERHEAD).saturating_sub(sealed),
        })?
        + OVERHEAD;
    let n = body.div_ceil(STORED_SEGMENT);
    let plain = body - n * OVERHEAD;
    if sealed_len(plain) != sealed {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "{sealed} bytes is no possible length of a sealed object (a segment of it is cut)"
            ),
        ));
    }
    Ok(plain)
}

/// Whether stored bytes are an envelope (start with its magic).
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.get(..4) == Some(&MAGIC[..])
}

fn aad(name: &str, index: u64, last: bool) -> Vec<u8> {
    let mut a = Vec::with_capacity(21 + name.len());
    a.extend_from_slice(&MAGIC);
    a.extend_from_slice(&crate::FORMAT_MAJOR.to_le_bytes());
    a.extend_from_slice(&MINOR.to_le_bytes());
    a.push(last as u8);
    a.extend_from_slice(&index.to_le_bytes());
    a.extend_from_slice(&(name.len() as u32).to_le_bytes());
    a.extend_from_slice(name.as_bytes());
    a
}

/// Seals `plain` as the object `name` (its key from the repository root), drawing each
/// segment's salt from `salt`.
pub fn seal_with(
    keys: &DataKeys,
    name: &str,
    plain: &[u8],
    mut salt: impl FnMut(&mut [u8; SALT_LEN]),
) -> Vec<u8> {
    let n = segments(plain.len() as u64);
    let mut out = Vec::with_capacity(sealed_len(plain.len() as u64) as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&crate::FORMAT_MAJOR.to_le_bytes());
    out.extend_from_slice(&MINOR.to_le_bytes());
    for i in 0..n {
        let from = (i * SEGMENT) as usize;
        let to = (from + SEGMENT as usize).min(plain.len());
        let mut s = [0u8; SALT_LEN];
        salt(&mut s);
        out.extend_from_slice(&s);
        let at = out.len();
        out.extend_from_slice(&plain[from..to]);
        let tag = keys
            .segment_key(&s)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(aad(name, i, i + 1 == n)),
                &mut out[at..],
            )
            .expect("a segment of 64 KiB is within AES-GCM's limits");
        out.extend_from_slice(tag.as_ref());
    }
    out
}

/// Seals `plain` with random salts from the operating system.
pub fn seal(keys: &DataKeys, name: &str, plain: &[u8]) -> Result<Vec<u8>, FormatError> {
    let rng = ring::rand::SystemRandom::new();
    let mut failed = false;
    let out = seal_with(keys, name, plain, |s| {
        failed |= ring::rand::SecureRandom::fill(&rng, s).is_err();
    });
    if failed {
        return Err(FormatError::invalid(
            WHAT,
            "the operating system's random number generator failed",
        ));
    }
    Ok(out)
}

fn open_segment(
    keys: &DataKeys,
    name: &str,
    index: u64,
    last: bool,
    stored: &[u8],
) -> Option<Vec<u8>> {
    let (salt, body) = stored.split_at(SALT_LEN);
    let mut buf = body.to_vec();
    let plain = keys
        .segment_key(salt)
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(aad(name, index, last)),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(plain);
    Some(buf)
}

fn refused(name: &str, index: u64) -> FormatError {
    FormatError::invalid(
        WHAT,
        format!("segment {index} of {name} fails authentication: the object was altered, moved from another key or cut, or the repository key is not the one it was sealed with"),
    )
}

/// Opens a whole stored object `name`: the header, every segment in order, the last one marked
/// last. The result is the plaintext object.
pub fn open(keys: &DataKeys, name: &str, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
    if !is_sealed(stored) {
        let mut found = [0u8; 4];
        let n = stored.len().min(4);
        found[..n].copy_from_slice(&stored[..n]);
        return Err(FormatError::BadMagic {
            what: WHAT,
            found,
            expected: MAGIC,
        });
    }
    let plain = plain_len(stored.len() as u64)?;
    let major = u16::from_le_bytes([stored[4], stored[5]]);
    if major != crate::FORMAT_MAJOR {
        return Err(FormatError::UnsupportedVersion {
            what: WHAT,
            found: major,
            max: crate::FORMAT_MAJOR,
        });
    }
    let mut out = Vec::with_capacity(plain as usize);
    let n = segments(plain);
    let mut at = HEADER_LEN as usize;
    for i in 0..n {
        let len = (SEGMENT.min(plain - i * SEGMENT) + OVERHEAD) as usize;
        let seg = &stored[at..at + len];
        out.extend(open_segment(keys, name, i, i + 1 == n, seg).ok_or_else(|| refused(name, i))?);
        at += len;
    }
    Ok(out)
}

/// A read of a plaintext range, as the stored range that covers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRead {
    /// Bytes to fetch from the stored object (may run past its end: fetch up to the end).
    pub stored: Range<u64>,
    first: u64,
    skip: u64,
    len: u64,
}

/// The stored range holding the plaintext `range` (non-empty).
pub fn range_read(range: Range<u64>) -> RangeRead {
    let first = range.start / SEGMENT;
    let last = range.end.saturating_sub(1).max(range.start) / SEGMENT;
    RangeRead {
        stored: HEADER_LEN + first * STORED_SEGMENT..HEADER_LEN + (last + 1) * STORED_SEGMENT,
        first,
        skip: range.start - first * SEGMENT,
        len: range.end.saturating_sub(range.start),
    }
}

impl RangeRead {
    /// Opens the fetched stored bytes (the object may end inside them) and returns exactly the
    /// plaintext range asked for, or an error when the object holds less.
    pub fn open(
        &self,
        keys: &DataKeys,
        name: &str,
        fetched: &[u8],
    ) -> Result<Vec<u8>, FormatError> {
        let mut plain =
            Vec::with_capacity((fetched.len() as u64).min(self.skip + self.len) as usize);
        let mut at = 0usize;
        let mut index = self.first;
        while at < fetched.len() {
            let len = (fetched.len() - at).min(STORED_SEGMENT as usize);
            if len < OVERHEAD as usize {
                return Err(refused(name, index));
            }
            let seg = &fetched[at..at + len];
            // Only the segment where the fetched bytes end can be the object's last one; a
            // full segment there may be either, so it is tried both ways (the flag is bound
            // into its tag, so only the true one opens).
            let final_here = at + len == fetched.len();
            let opened = open_segment(keys, name, index, false, seg).or_else(|| {
                final_here
                    .then(|| open_segment(keys, name, index, true, seg))
                    .flatten()
            });
            plain.extend(opened.ok_or_else(|| refused(name, index))?);
            at += len;
            index += 1;
        }
        let (skip, len) = (self.skip as usize, self.len as usize);
        if plain.len() < skip + len {
            return Err(FormatError::Truncated {
                what: WHAT,
                needed: (skip + len - plain.len()) as u64,
            });
        }
        plain.truncate(skip + len);
        plain.drain(..skip);
        Ok(plain)
    }
}

#[cfg(test)]
mod tests;
