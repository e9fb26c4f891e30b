//! Packs: many compressed chunks in one object, with an index at the end so a pack describes
//! itself. A pack's id is the sha256 of the whole pack object.
//!
//! Layout: header (8) | blobs | index | index length u32 | magic "TMPE".
//! Index: magic "TMPX" | count u32 | count × entry (chunk id 32, offset u64, clen u32, ulen u32),
//! one frame per chunk (format 1.0, pack major 1); or magic "TMPF" | count u32 | count × entry
//! (the same, then skip u32): frames of several consecutive chunks (format 1.4, pack major 2).

use crate::chunk::MAX_CHUNK_SIZE;
use crate::codec::{Reader, Writer};
use crate::error::FormatError;
use crate::ids::{ChunkId, PackId};

pub const MAGIC: [u8; 4] = *b"TMPK";
pub const INDEX_MAGIC: [u8; 4] = *b"TMPX";
/// Index magic of a pack whose frames may hold several chunks (entries carry a skip).
pub const FRAMES_INDEX_MAGIC: [u8; 4] = *b"TMPF";
/// Major version of a pack whose frames may hold several chunks (format 1.4): a reader of
/// format 1.3 or older refuses it as a newer major instead of misreading it.
pub const FRAMES_MAJOR: u16 = 2;
pub const END_MAGIC: [u8; 4] = *b"TMPE";
/// Bytes of the pack header (magic + major + minor); the first blob starts here.
pub const HEADER_LEN: u64 = 8;
/// Bytes of the footer (index length + end magic).
pub const FOOTER_LEN: usize = 8;
const ENTRY_LEN: usize = 48;
const FRAMES_ENTRY_LEN: usize = 52;

/// Where one chunk sits inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    /// Byte offset of the chunk's zstd frame from the start of the pack object.
    pub offset: u64,
    /// Length of the zstd frame.
    pub clen: u32,
    /// Length of the uncompressed chunk.
    pub ulen: u32,
    /// Where the chunk starts in its frame's uncompressed bytes (0 in a frame of one chunk).
    pub skip: u32,
}

/// Builds a pack in memory. Blobs are appended in order; `finish` adds the index and footer.
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub fn new() -> Self {
        let mut w = Writer::new();
        w.header_version(MAGIC, FRAMES_MAJOR, crate::FORMAT_MINOR);
        PackBuilder {
            buf: w.finish(),
            entries: Vec::new(),
        }
    }
    /// Appends a frame holding one chunk and returns where it will sit in the finished pack.
    pub fn push(&mut self, id: ChunkId, frame: &[u8], ulen: u32) -> PackEntry {
        self.push_frame(frame, &[(id, ulen)])[0]
    }

    /// Appends a frame holding the chunks `chunks` (id, ulen) back to back, and returns where
    /// each will sit in the finished pack.
    pub fn push_frame(&mut self, frame: &[u8], chunks: &[(ChunkId, u32)]) -> &[PackEntry] {
        let offset = self.buf.len() as u64;
        let clen =
            u32::try_from(frame.len()).expect("a compressed frame of at most 1 MiB fits u32");
        let first = self.entries.len();
        let mut skip = 0u32;
        for &(id, ulen) in chunks {
            self.entries.push(PackEntry {
                id,
                offset,
                clen,
                ulen,
                skip,
            });
            skip += ulen;
        }
        self.buf.extend_from_slice(frame);
        &self.entries[first..]
    }
    /// Bytes of blobs written so far, including the header.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Seals the pack: returns its id and bytes.
    pub fn finish(self) -> (PackId, Vec<u8>) {
        let mut buf = self.buf;
        let index = encode_index(&self.entries);
        buf.extend_from_slice(&index);
        buf.extend_from_slice(
            &u32::try_from(index.len())
                .expect("a pack index stays below 4 GiB")
                .to_le_bytes(),
        );
        buf.extend_from_slice(&END_MAGIC);
        (PackId::of(&buf), buf)
    }
}

/// Encodes a pack index of format 1.4 (entries with a skip, magic `TMPF`).
pub fn encode_index(entries: &[PackEntry]) -> Vec<u8> {
    encode_index_as(entries, true)
}

/// Encodes a pack index with skips (`TMPF`, 1.4) or without (`TMPX`, 1.0: every skip is 0).
pub fn encode_index_as(entries: &[PackEntry], frames: bool) -> Vec<u8> {
    let mut w = Writer::new();
    w.raw(if frames {
        &FRAMES_INDEX_MAGIC
    } else {
        &INDEX_MAGIC
    });
    w.u32(u32::try_from(entries.len()).expect("fewer than 4G chunks per pack"));
    for e in entries {
        assert!(
            frames || e.skip == 0,
            "a TMPX index cannot hold a chunk inside a shared frame"
        );
        w.raw(e.id.as_bytes());
        w.u64(e.offset);
        w.u32(e.clen);
        w.u32(e.ulen);
        if frames {
            w.u32(e.skip);
        }
    }
    w.finish()
}

/// Decodes a pack index whose blobs must all lie in `HEADER_LEN..blobs_end`. Its magic says
/// whether entries carry a skip (`TMPF`) or not (`TMPX`: one frame per chunk).
pub fn decode_index(buf: &[u8], blobs_end: u64) -> Result<Vec<PackEntry>, FormatError> {
    const WHAT: &str = "pack index";
    let mut r = Reader::new(WHAT, buf);
    let magic = r.array::<4>()?;
    let frames = match magic {
        INDEX_MAGIC => false,
        FRAMES_INDEX_MAGIC => true,
        _ => {
            return Err(FormatError::BadMagic {
                what: WHAT,
                found: magic,
                expected: FRAMES_INDEX_MAGIC,
            })
        }
    };
    let count = r.u32()? as u64;
    let len = if frames { FRAMES_ENTRY_LEN } else { ENTRY_LEN };
    let mut entries: Vec<PackEntry> = Vec::with_capacity(r.capacity_for(count, len));
    let mut next = HEADER_LEN;
    for _ in 0..count {
        let e = PackEntry {
            id: ChunkId(r.array()?),
            offset: r.u64()?,
            clen: r.u32()?,
            ulen: r.u32()?,
            skip: if frames { r.u32()? } else { 0 },
        };
        // A chunk continues the previous entry's frame (same place, starting where the
        // previous chunk ends in it) or starts the next frame at skip 0.
        if let Some(p) = entries.last() {
            if e.skip != 0 || (e.offset, e.clen) == (p.offset, p.clen) {
                if (e.offset, e.clen) != (p.offset, p.clen)
                    || e.skip as u64 != p.skip as u64 + p.ulen as u64
                {
                    return Err(FormatError::invalid(
                        WHAT,
                        format!(
                            "entry for chunk {} at skip {} does not continue the frame of the entry before it",
                            e.id, e.skip
                        ),
                    ));
                }
                if e.skip as u64 + e.ulen as u64 > crate::chunk::MAX_FRAME_SIZE as u64
                    || e.ulen > MAX_CHUNK_SIZE
                {
                    return Err(FormatError::invalid(
                        WHAT,
                        format!("entry for chunk {} lies beyond the largest frame", e.id),
                    ));
                }
                entries.push(e);
                continue;
            }
        } else if e.skip != 0 {
            return Err(FormatError::invalid(
                WHAT,
                format!("first entry (chunk {}) starts at skip {}", e.id, e.skip),
            ));
        }
        if e.offset != next {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "entry for chunk {} starts at {}, expected {next}",
                    e.id, e.offset
                ),
            ));
        }
        if e.ulen > MAX_CHUNK_SIZE || e.clen == 0 {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "entry for chunk {} has lengths clen {} ulen {}",
                    e.id, e.clen, e.ulen
                ),
            ));
        }
        next = e.offset + e.clen as u64;
        if next > blobs_end {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "entry for chunk {} ends at {next}, past the blobs' end {blobs_end}",
                    e.id
                ),
            ));
        }
        entries.push(e);
    }
    r.expect_end()?;
    if next != blobs_end {
        return Err(FormatError::invalid(
            WHAT,
            format!("blobs end at {blobs_end} but the index covers up to {next}"),
        ));
    }
    Ok(entries)
}

/// Decodes a whole pack object: checks header, footer and index. Chunk frames are not
/// decompressed here (see [`crate::chunk::decode`]).
pub fn decode(buf: &[u8]) -> Result<Vec<PackEntry>, FormatError> {
    const WHAT: &str = "pack";
    Reader::new(WHAT, buf).header_of(MAGIC, FRAMES_MAJOR)?;
    if buf.len() < HEADER_LEN as usize + FOOTER_LEN {
        return Err(FormatError::Truncated {
            what: WHAT,
            needed: (HEADER_LEN as usize + FOOTER_LEN - buf.len()) as u64,
        });
    }
    let footer = &buf[buf.len() - FOOTER_LEN..];
    if footer[4..] != END_MAGIC {
        return Err(FormatError::BadMagic {
            what: WHAT,
            found: [footer[4], footer[5], footer[6], footer[7]],
            expected: END_MAGIC,
        });
    }
    let index_len = u32::from_le_bytes([footer[0], footer[1], footer[2], footer[3]]) as usize;
    let index_end = buf.len() - FOOTER_LEN;
    if index_len > index_end - HEADER_LEN as usize {
        return Err(FormatError::invalid(
            WHAT,
            format!("index length {index_len} exceeds the pack"),
        ));
    }
    let index_start = index_end - index_len;
    let index = &buf[index_start..index_end];
    check_header(&buf[..HEADER_LEN as usize], index)?;
    decode_index(index, index_start as u64)
}

/// Checks a pack's 8-byte header against its index (for readers that fetch the two by range):
/// magic `TMPK`, major 1 or 2, and a `TMPF` index only in a pack of major 2 (a pack of major 1
/// has one frame per chunk).
pub fn check_header(head: &[u8], index: &[u8]) -> Result<(), FormatError> {
    let (major, _) = Reader::new("pack", head).header_of(MAGIC, FRAMES_MAJOR)?;
    if major == 1 && index.get(..4) == Some(&FRAMES_INDEX_MAGIC[..]) {
        return Err(FormatError::invalid(
            "pack",
            "a pack of major version 1 has an index of format 1.4 (TMPF)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk;

    #[test]
    fn build_and_decode() {
        let mut b = PackBuilder::new();
        let a = vec![1u8; 8192];
        let c = vec![2u8; 100];
        let ea = b.push(ChunkId::of(&a), &chunk::compress(&a, 1), 8192);
        let ec = b.push(ChunkId::of(&c), &chunk::compress(&c, 1), 100);
        let (id, bytes) = b.finish();
        assert_eq!(id, PackId::of(&bytes));
        let entries = decode(&bytes).unwrap();
        assert_eq!(entries, vec![ea, ec]);
        let frame = &bytes[ec.offset as usize..(ec.offset + ec.clen as u64) as usize];
        assert_eq!(chunk::decode(&ec.id, frame, ec.ulen).unwrap(), c);
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode(b"TMPK\x01\x00\x00\x00").is_err());
        let (_, mut bytes) = PackBuilder::new().finish();
        assert!(decode(&bytes).unwrap().is_empty());
        let n = bytes.len();
        bytes[n - 8] = 0xff;
        assert!(decode(&bytes).is_err());
    }
}
