//! Packs: many compressed chunks in one object, with an index at the end so a pack describes
//! itself. A pack's id is the sha256 of the whole pack object.
//!
//! Layout: header (8) | blobs | index | index length u32 | magic "TMPE".
//! Index: magic "TMPX" | count u32 | count × entry (chunk id 32, offset u64, clen u32, ulen u32).

use crate::chunk::MAX_CHUNK_SIZE;
use crate::codec::{Reader, Writer};
use crate::error::FormatError;
use crate::ids::{ChunkId, PackId};

pub const MAGIC: [u8; 4] = *b"TMPK";
pub const INDEX_MAGIC: [u8; 4] = *b"TMPX";
pub const END_MAGIC: [u8; 4] = *b"TMPE";
/// Bytes of the pack header (magic + major + minor); the first blob starts here.
pub const HEADER_LEN: u64 = 8;
/// Bytes of the footer (index length + end magic).
pub const FOOTER_LEN: usize = 8;
const ENTRY_LEN: usize = 48;

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
        w.header(MAGIC);
        PackBuilder {
            buf: w.finish(),
            entries: Vec::new(),
        }
    }
    /// Appends a compressed chunk and returns where it will sit in the finished pack.
    pub fn push(&mut self, id: ChunkId, frame: &[u8], ulen: u32) -> PackEntry {
        let entry = PackEntry {
            id,
            offset: self.buf.len() as u64,
            clen: u32::try_from(frame.len()).expect("a compressed chunk of at most 1 MiB fits u32"),
            ulen,
        };
        self.buf.extend_from_slice(frame);
        self.entries.push(entry);
        entry
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

/// Encodes a pack index.
pub fn encode_index(entries: &[PackEntry]) -> Vec<u8> {
    let mut w = Writer::new();
    w.raw(&INDEX_MAGIC);
    w.u32(u32::try_from(entries.len()).expect("fewer than 4G chunks per pack"));
    for e in entries {
        w.raw(e.id.as_bytes());
        w.u64(e.offset);
        w.u32(e.clen);
        w.u32(e.ulen);
    }
    w.finish()
}

/// Decodes a pack index whose blobs must all lie in `HEADER_LEN..blobs_end`.
pub fn decode_index(buf: &[u8], blobs_end: u64) -> Result<Vec<PackEntry>, FormatError> {
    const WHAT: &str = "pack index";
    let mut r = Reader::new(WHAT, buf);
    let magic = r.array::<4>()?;
    if magic != INDEX_MAGIC {
        return Err(FormatError::BadMagic {
            what: WHAT,
            found: magic,
            expected: INDEX_MAGIC,
        });
    }
    let count = r.u32()? as u64;
    let mut entries = Vec::with_capacity(r.capacity_for(count, ENTRY_LEN));
    let mut next = HEADER_LEN;
    for _ in 0..count {
        let e = PackEntry {
            id: ChunkId(r.array()?),
            offset: r.u64()?,
            clen: r.u32()?,
            ulen: r.u32()?,
        };
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
    Reader::new(WHAT, buf).header(MAGIC)?;
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
    decode_index(&buf[index_start..index_end], index_start as u64)
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
