//! Manifests stored in parts (FORMAT.md 8.4.7): a manifest too large for one object (or one
//! buffer) is cut into parts of at most [`PART_MAX`] bytes. The manifest object keeps the first
//! part, followed by the table of the others (their sha256 and length, in order), a `u32` count
//! and the magic `TMPT`; the other parts are stored under `backups/<id>.part-<sha256 hex>`.
//! The manifest's own header carries major version 2, so that a reader that does not know this
//! layout refuses it as a newer major instead of misreading it.

use super::{MAGIC, WHAT};
use crate::codec::{Reader, Writer};
use crate::error::FormatError;
use crate::ids::ContentHash;

/// Major version in the header of a manifest stored in parts (format 1.3, chunk references of
/// 52 bytes).
pub const PARTED_MAJOR: u16 = 2;
/// Major version of a whole manifest whose chunk references carry a skip (format 1.4, 56 bytes).
pub const FRAMES_MAJOR: u16 = 3;
/// Major version of a manifest in parts whose chunk references carry a skip (format 1.4).
pub const FRAMES_PARTED_MAJOR: u16 = 4;
/// Newest manifest major version this build reads.
pub const MAX_MAJOR: u16 = FRAMES_PARTED_MAJOR;

/// Whether a manifest of major version `major` is stored in parts.
pub fn major_is_parted(major: u16) -> bool {
    major == PARTED_MAJOR || major == FRAMES_PARTED_MAJOR
}

/// Whether the chunk references of a manifest of major version `major` carry a skip.
pub fn major_has_frames(major: u16) -> bool {
    major >= FRAMES_MAJOR
}

/// The major version of a manifest stored whole or in parts (`parted`), with skips or not.
pub fn major_of(frames: bool, parted: bool) -> u16 {
    match (frames, parted) {
        (false, false) => crate::FORMAT_MAJOR,
        (false, true) => PARTED_MAJOR,
        (true, false) => FRAMES_MAJOR,
        (true, true) => FRAMES_PARTED_MAJOR,
    }
}
/// Largest part a writer stores and a reader accepts.
pub const PART_MAX: u64 = 64 << 20;
/// Most parts after the first a reader accepts (with the first: 64 GiB at [`PART_MAX`]).
pub const MAX_PARTS: u32 = 1023;
/// Magic at the very end of a manifest object stored in parts.
pub const TABLE_MAGIC: [u8; 4] = *b"TMPT";
/// Bytes per table row: sha256, then length.
pub const ROW: u64 = 32 + 8;
/// Bytes after the table: count, magic.
pub const TAIL: u64 = 4 + 4;

/// One part after the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartRef {
    pub sha256: ContentHash,
    pub len: u64,
}

/// The table written after the first part.
pub fn encode_table(parts: &[PartRef]) -> Vec<u8> {
    let mut w = Writer::new();
    for p in parts {
        w.raw(p.sha256.as_bytes());
        w.u64(p.len);
    }
    w.u32(u32::try_from(parts.len()).expect("at most MAX_PARTS parts"));
    w.raw(&TABLE_MAGIC);
    w.finish()
}

/// How many parts the table at the end of a manifest object of `object_len` bytes lists, from
/// its last [`TAIL`] bytes.
pub fn table_count(tail: &[u8], object_len: u64) -> Result<u32, FormatError> {
    let mut r = Reader::new(WHAT, tail);
    let count = r.u32()?;
    let magic = r.array::<4>()?;
    if magic != TABLE_MAGIC {
        return Err(FormatError::BadMagic {
            what: "manifest part table",
            found: magic,
            expected: TABLE_MAGIC,
        });
    }
    if count > MAX_PARTS {
        return Err(FormatError::TooLarge {
            what: "manifest part table",
            size: count as u64,
            max: MAX_PARTS as u64,
        });
    }
    if TAIL + count as u64 * ROW > object_len {
        return Err(FormatError::Truncated {
            what: "manifest part table",
            needed: TAIL + count as u64 * ROW - object_len,
        });
    }
    Ok(count)
}

/// Decodes the table rows (`count` × [`ROW`] bytes, without the tail).
pub fn decode_table(rows: &[u8], count: u32) -> Result<Vec<PartRef>, FormatError> {
    let mut r = Reader::new("manifest part table", rows);
    let mut out = Vec::with_capacity(r.capacity_for(count as u64, ROW as usize));
    for _ in 0..count {
        let p = PartRef {
            sha256: crate::ChunkId(r.array()?),
            len: r.u64()?,
        };
        if p.len == 0 || p.len > PART_MAX {
            return Err(FormatError::invalid(
                "manifest part table",
                format!("a part is {} bytes, not 1..={PART_MAX}", p.len),
            ));
        }
        out.push(p);
    }
    r.expect_end()?;
    Ok(out)
}

/// Whether the manifest object starting with `head` (at least 8 bytes) is stored in parts.
pub fn is_parted(head: &[u8]) -> Result<bool, FormatError> {
    let (major, _) = Reader::new(WHAT, head).header_of(MAGIC, MAX_MAJOR)?;
    Ok(major_is_parted(major))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChunkId;

    #[test]
    fn table_round_trip_and_hostile_tails() {
        let parts = vec![
            PartRef {
                sha256: ChunkId([1; 32]),
                len: 5,
            },
            PartRef {
                sha256: ChunkId([2; 32]),
                len: PART_MAX,
            },
        ];
        let t = encode_table(&parts);
        let n = t.len();
        let count = table_count(&t[n - 8..], 1000).unwrap();
        assert_eq!(count, 2);
        assert_eq!(decode_table(&t[..n - 8], count).unwrap(), parts);
        // A count the object cannot hold, a huge count, a bad magic, an empty or oversized part.
        assert!(matches!(
            table_count(&t[n - 8..], 40),
            Err(FormatError::Truncated { .. })
        ));
        let mut big = t.clone();
        big[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            table_count(&big[n - 8..], u64::MAX),
            Err(FormatError::TooLarge { .. })
        ));
        let mut bad = t.clone();
        bad[n - 1] = b'X';
        assert!(table_count(&bad[n - 8..], 1000).is_err());
        let zero = encode_table(&[PartRef {
            sha256: ChunkId([1; 32]),
            len: 0,
        }]);
        assert!(decode_table(&zero[..40], 1).is_err());
        let huge = encode_table(&[PartRef {
            sha256: ChunkId([1; 32]),
            len: PART_MAX + 1,
        }]);
        assert!(decode_table(&huge[..40], 1).is_err());
    }
}
