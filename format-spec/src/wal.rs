//! WAL objects: one per archived file (segment, `.partial` segment, `.history` file or backup
//! history file), holding its name, size and digest in a header followed by one zstd frame.
//! Also WAL file names and the WAL page header fields tidemark checks before archiving.
//!
//! Object layout: "TMWL" | major u16 | minor u16 | kind u8 | name (u32 len + ASCII) | size u64 |
//! digest of the uncompressed file (32) | one zstd frame to the end of the object. The major
//! version names the digest ([`WalDigest`]): SHA-256 in major 1, BLAKE3 in major 2 (format 1.6,
//! what writers write).

use crate::chunk::decompress_exact;
use crate::codec::{Reader, Writer};
use crate::error::FormatError;
use crate::ids::{ContentHash, SystemId, TimelineId};
use std::fmt;

pub const MAGIC: [u8; 4] = *b"TMWL";
const WHAT: &str = "wal object";
/// Largest WAL file any reader accepts: PostgreSQL's maximum wal_segment_size, 1 GiB.
pub const MAX_WAL_FILE: u64 = 1 << 30;
/// Largest `.history` or backup history file any reader accepts.
pub const MAX_SMALL_FILE: u64 = 16 << 20;

/// The kinds of file PostgreSQL hands to archive_command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalFileName {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, log, segment-in-log.
    Segment { tli: u32, log: u32, seg: u32 },
    /// A segment name followed by `.partial` (written at promotion).
    Partial { tli: u32, log: u32, seg: u32 },
    /// `TTTTTTTT.history`.
    History { tli: u32 },
    /// A segment name, `.`, 8 hex digits of offset, `.backup`.
    BackupHistory {
        tli: u32,
        log: u32,
        seg: u32,
        offset: u32,
    },
}

fn hex8(s: &str) -> Option<u32> {
    if s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

fn seg24(s: &str) -> Option<(u32, u32, u32)> {
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    Some((hex8(&s[..8])?, hex8(&s[8..16])?, hex8(&s[16..])?))
}

impl WalFileName {
    /// Parses a file name as PostgreSQL writes it (uppercase hex).
    pub fn parse(name: &str) -> Result<Self, FormatError> {
        let parsed = if let Some(base) = name.strip_suffix(".partial") {
            seg24(base).map(|(tli, log, seg)| WalFileName::Partial { tli, log, seg })
        } else if let Some(base) = name.strip_suffix(".history") {
            hex8(base).map(|tli| WalFileName::History { tli })
        } else if let Some(base) = name.strip_suffix(".backup") {
            base.split_once('.').and_then(|(s, off)| {
                let (tli, log, seg) = seg24(s)?;
                Some(WalFileName::BackupHistory {
                    tli,
                    log,
                    seg,
                    offset: hex8(off)?,
                })
            })
        } else {
            seg24(name).map(|(tli, log, seg)| WalFileName::Segment { tli, log, seg })
        };
        match parsed {
            Some(n) if n.timeline().0 != 0 => Ok(n),
            _ => Err(FormatError::invalid(
                "wal file name",
                format!("{name:?} is not a WAL segment, .partial, .history or .backup file name"),
            )),
        }
    }

    pub fn timeline(&self) -> TimelineId {
        match *self {
            WalFileName::Segment { tli, .. }
            | WalFileName::Partial { tli, .. }
            | WalFileName::History { tli }
            | WalFileName::BackupHistory { tli, .. } => TimelineId(tli),
        }
    }

    /// The object kind code stored in a WAL object header.
    pub fn kind_code(&self) -> u8 {
        match self {
            WalFileName::Segment { .. } => 1,
            WalFileName::Partial { .. } => 2,
            WalFileName::History { .. } => 3,
            WalFileName::BackupHistory { .. } => 4,
        }
    }

    /// Largest size this kind of file may have.
    pub fn max_size(&self) -> u64 {
        match self {
            WalFileName::Segment { .. } | WalFileName::Partial { .. } => MAX_WAL_FILE,
            _ => MAX_SMALL_FILE,
        }
    }

    /// The segment number counted from the start of the timeline, for a given segment size.
    pub fn segment_number(&self, seg_size: u64) -> Option<u64> {
        match *self {
            WalFileName::Segment { log, seg, .. } | WalFileName::Partial { log, seg, .. } => {
                Some(log as u64 * (0x1_0000_0000 / seg_size) + seg as u64)
            }
            _ => None,
        }
    }

    /// The segment file name holding `lsn` on timeline `tli`.
    pub fn segment_of(tli: TimelineId, lsn: crate::Lsn, seg_size: u64) -> Self {
        let segno = lsn.0 / seg_size;
        let per_log = 0x1_0000_0000 / seg_size;
        WalFileName::Segment {
            tli: tli.0,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WalFileName::Segment { tli, log, seg } => write!(f, "{tli:08X}{log:08X}{seg:08X}"),
            WalFileName::Partial { tli, log, seg } => {
                write!(f, "{tli:08X}{log:08X}{seg:08X}.partial")
            }
            WalFileName::History { tli } => write!(f, "{tli:08X}.history"),
            WalFileName::BackupHistory {
                tli,
                log,
                seg,
                offset,
            } => {
                write!(f, "{tli:08X}{log:08X}{seg:08X}.{offset:08X}.backup")
            }
        }
    }
}

/// The digest of a WAL file's uncompressed bytes in its object's header; the object's major
/// version names the function (FORMAT.md 8.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalDigest {
    /// Major 1 (written by format 1.0 to 1.5).
    Sha256(ContentHash),
    /// Major 2 (format 1.6): BLAKE3, 256-bit output. A 16 MiB segment hashes in about a quarter
    /// of SHA-256's time, and a WAL push is CPU-bound.
    Blake3(ContentHash),
}

impl WalDigest {
    /// The digest writers record: BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> WalDigest {
        WalDigest::Blake3(crate::ChunkId(*blake3::hash(data).as_bytes()))
    }

    /// The digest of `data` by the same function as `self`.
    pub fn of_same_kind(&self, data: &[u8]) -> WalDigest {
        let mut h = WalHasher::like(self);
        h.update(data);
        h.finish()
    }

    /// The object major version that records this kind of digest.
    pub fn major(&self) -> u16 {
        match self {
            WalDigest::Sha256(_) => 1,
            WalDigest::Blake3(_) => 2,
        }
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        match self {
            WalDigest::Sha256(h) | WalDigest::Blake3(h) => h.as_bytes(),
        }
    }

    /// Parses `sha256:<hex>` or `blake3:<hex>` (as [`fmt::Display`] writes it).
    pub fn parse(s: &str) -> Option<WalDigest> {
        let (kind, hex) = s.split_once(':')?;
        let h: ContentHash = hex.parse().ok()?;
        match kind {
            "sha256" => Some(WalDigest::Sha256(h)),
            "blake3" => Some(WalDigest::Blake3(h)),
            _ => None,
        }
    }
}

impl fmt::Display for WalDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalDigest::Sha256(h) => write!(f, "sha256:{h}"),
            WalDigest::Blake3(h) => write!(f, "blake3:{h}"),
        }
    }
}

/// Hashes a WAL file given in pieces: into the digest writers record ([`WalHasher::default`],
/// BLAKE3) or by the function of a given digest ([`WalHasher::like`]).
pub struct WalHasher(HasherKind);

enum HasherKind {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Default for WalHasher {
    fn default() -> Self {
        WalHasher(HasherKind::Blake3(Box::default()))
    }
}

impl WalHasher {
    /// A hasher by the same function as `d`.
    pub fn like(d: &WalDigest) -> WalHasher {
        match d {
            WalDigest::Sha256(_) => WalHasher(HasherKind::Sha256(sha2::Digest::new())),
            WalDigest::Blake3(_) => WalHasher::default(),
        }
    }

    pub fn update(&mut self, piece: &[u8]) {
        match &mut self.0 {
            HasherKind::Sha256(h) => sha2::Digest::update(h, piece),
            HasherKind::Blake3(h) => {
                h.update(piece);
            }
        }
    }

    pub fn finish(self) -> WalDigest {
        match self.0 {
            HasherKind::Sha256(h) => {
                WalDigest::Sha256(crate::ChunkId(sha2::Digest::finalize(h).into()))
            }
            HasherKind::Blake3(h) => WalDigest::Blake3(crate::ChunkId(*h.finalize().as_bytes())),
        }
    }
}

/// The decoded header of a WAL object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalObjectHeader {
    pub name: WalFileName,
    pub size: u64,
    pub digest: WalDigest,
}

/// Encodes a WAL object from the file's name and uncompressed bytes.
pub fn encode(name: WalFileName, data: &[u8], level: i32) -> Vec<u8> {
    let header = WalObjectHeader {
        name,
        size: data.len() as u64,
        digest: WalDigest::of(data),
    };
    encode_with_frame(&header, &crate::chunk::compress(data, level))
}

/// Streams a WAL file into the frame of its WAL object, piece by piece, so a writer holds the
/// compressed object rather than the file: one zstd frame that records its content size (pledged
/// before the first byte, as 8.5 requires). Feed exactly `size` bytes, then [`FrameEncoder::finish`].
pub struct FrameEncoder {
    enc: zstd::stream::Encoder<'static, Vec<u8>>,
}

impl FrameEncoder {
    pub fn new(size: u64, level: i32) -> std::io::Result<FrameEncoder> {
        let mut enc = zstd::stream::Encoder::new(Vec::with_capacity((size / 3) as usize), level)?;
        enc.set_pledged_src_size(Some(size))?;
        enc.include_contentsize(true)?;
        Ok(FrameEncoder { enc })
    }

    pub fn write(&mut self, piece: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(&mut self.enc, piece)
    }

    /// The frame; fails if fewer or more bytes than pledged were written.
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        self.enc.finish()
    }
}

/// Assembles an object from its header and a zstd frame compressed elsewhere (e.g. streamed
/// from a file). The frame must be one whole frame that records its content size, equal to
/// `header.size`, of data whose digest is `header.digest`: readers check all of that.
pub fn encode_with_frame(header: &WalObjectHeader, frame: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    encode_header_into(&mut w, header);
    w.raw(frame);
    w.finish()
}

fn encode_header_into(w: &mut Writer, h: &WalObjectHeader) {
    w.header_version(MAGIC, h.digest.major(), crate::FORMAT_MINOR);
    w.u8(h.name.kind_code());
    w.bytes(h.name.to_string().as_bytes());
    w.u64(h.size);
    w.raw(h.digest.as_bytes());
}

/// Decodes the header; returns it and the offset where the zstd frame starts.
pub fn decode_header(buf: &[u8]) -> Result<(WalObjectHeader, usize), FormatError> {
    let mut r = Reader::new(WHAT, buf);
    let (major, _) = r.header_of(MAGIC, 2)?;
    let kind = r.u8()?;
    let raw = r.bytes("wal file name", 64)?;
    let name = WalFileName::parse(
        std::str::from_utf8(raw).map_err(|_| FormatError::invalid(WHAT, "name is not ASCII"))?,
    )?;
    if name.kind_code() != kind {
        return Err(FormatError::invalid(
            WHAT,
            format!("kind {kind} does not match name {name}"),
        ));
    }
    let size = r.u64()?;
    if size > name.max_size() {
        return Err(FormatError::TooLarge {
            what: WHAT,
            size,
            max: name.max_size(),
        });
    }
    let hash = crate::ChunkId(r.array()?);
    let digest = match major {
        1 => WalDigest::Sha256(hash),
        _ => WalDigest::Blake3(hash),
    };
    Ok((WalObjectHeader { name, size, digest }, r.position()))
}

/// Decodes a whole WAL object and verifies the content against the header's size and digest.
pub fn decode(buf: &[u8]) -> Result<(WalObjectHeader, Vec<u8>), FormatError> {
    let (h, at) = decode_header(buf)?;
    let data = decompress_exact(WHAT, &buf[at..], h.size)?;
    let actual = h.digest.of_same_kind(&data);
    if actual != h.digest {
        return Err(FormatError::ChecksumMismatch {
            what: WHAT,
            expected: h.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok((h, data))
}

/// Fields of the long page header at the start of every WAL segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPageHeader {
    /// `xlp_magic`: PostgreSQL's `XLOG_PAGE_MAGIC`, one value per major version.
    pub magic: u16,
    pub timeline: TimelineId,
    pub page_addr: u64,
    pub system_id: SystemId,
    pub seg_size: u32,
    pub block_size: u32,
}

/// XLOG_PAGE_MAGIC of PostgreSQL 15.
pub const PG15_PAGE_MAGIC: u16 = 0xD110;
/// `XLOG_PAGE_MAGIC` of each PostgreSQL major tidemark knows (read from each major's own WAL).
pub const PAGE_MAGICS: [(u32, u16); 5] = [
    (14, 0xD10D),
    (15, PG15_PAGE_MAGIC),
    (16, 0xD113),
    (17, 0xD116),
    (18, 0xD118),
];

/// The PostgreSQL major whose WAL starts with `magic`, if tidemark knows it.
pub fn major_of_page_magic(magic: u16) -> Option<u32> {
    PAGE_MAGICS
        .iter()
        .find(|(_, m)| *m == magic)
        .map(|(major, _)| *major)
}

/// Every PostgreSQL major so far has had a page magic of the form 0xD0xx/0xD1xx; anything else
/// is not a WAL segment at all (a foreign or zeroed file).
fn plausible_page_magic(magic: u16) -> bool {
    magic & 0xFE00 == 0xD000
}
const XLP_LONG_HEADER: u16 = 0x0002;

/// Parses the long page header at the start of a WAL segment (little-endian platforms). A page
/// magic of a major tidemark does not know is accepted if it is plausible (0xD000..=0xD1FF):
/// archiving must never stop for a new major; callers warn (see [`major_of_page_magic`]).
pub fn parse_long_page_header(seg: &[u8]) -> Result<LongPageHeader, FormatError> {
    const WHAT: &str = "wal page header";
    let mut r = Reader::new(WHAT, seg);
    let magic = r.u16()?;
    let info = r.u16()?;
    let tli = r.u32()?;
    let page_addr = r.u64()?;
    let _rem_len = r.u32()?;
    let _pad = r.u32()?;
    let system_id = r.u64()?;
    let seg_size = r.u32()?;
    let block_size = r.u32()?;
    if !plausible_page_magic(magic) {
        return Err(FormatError::invalid(
            WHAT,
            format!("page magic {magic:#06x} is not a PostgreSQL WAL page magic (0xd000..=0xd1ff)"),
        ));
    }
    if info & XLP_LONG_HEADER == 0 {
        return Err(FormatError::invalid(
            WHAT,
            "first page lacks the long header flag",
        ));
    }
    if !seg_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&seg_size) {
        return Err(FormatError::invalid(
            WHAT,
            format!("segment size {seg_size} is not a power of two between 1 MiB and 1 GiB"),
        ));
    }
    Ok(LongPageHeader {
        magic,
        timeline: TimelineId(tli),
        page_addr,
        system_id: SystemId(system_id),
        seg_size,
        block_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            "000000010000000A00000065",
            "00000002.history",
            "000000010000000000000003.partial",
            "000000010000000000000002.00000028.backup",
        ] {
            assert_eq!(WalFileName::parse(n).unwrap().to_string(), n);
        }
        for n in [
            "000000010000000a00000065",
            "0000000100000000000000",
            "00000000.history",
            "x.history",
            "000000010000000000000003.part",
            "RECOVERYXLOG",
        ] {
            assert!(WalFileName::parse(n).is_err(), "{n}");
        }
    }

    #[test]
    fn segment_of_lsn() {
        let n = WalFileName::segment_of(TimelineId(1), crate::Lsn(0x1_0300_0028), 16 << 20);
        assert_eq!(n.to_string(), "000000010000000100000003");
        assert_eq!(n.segment_number(16 << 20), Some(256 + 3));
    }

    #[test]
    fn streamed_frame_equals_a_whole_object() {
        let name = WalFileName::parse("000000010000000000000001").unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = FrameEncoder::new(data.len() as u64, 1).unwrap();
        for piece in data.chunks(7000) {
            f.write(piece).unwrap();
        }
        let header = WalObjectHeader {
            name,
            size: data.len() as u64,
            digest: WalDigest::of(&data),
        };
        let obj = encode_with_frame(&header, &f.finish().unwrap());
        assert_eq!(decode(&obj).unwrap().1, data);
        let mut short = FrameEncoder::new(10, 1).unwrap();
        short.write(b"12345").unwrap();
        assert!(short.finish().is_err(), "a frame short of its pledged size");
    }

    #[test]
    fn object_round_trip_and_corruption() {
        let name = WalFileName::parse("000000010000000000000001").unwrap();
        let data = vec![3u8; 1 << 16];
        let obj = encode(name, &data, 1);
        let (h, back) = decode(&obj).unwrap();
        assert_eq!((h.name, h.size, back), (name, data.len() as u64, data));
        let mut bad = obj.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x55;
        assert!(decode(&bad).is_err());
        assert!(decode(&obj[..obj.len() - 1]).is_err());
    }

    #[test]
    fn major_1_names_sha256_and_major_2_blake3_and_a_later_major_is_refused() {
        let name = WalFileName::parse("000000010000000000000001").unwrap();
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 7) as u8).collect();
        let frame = crate::chunk::compress(&data, 1);
        let new = encode(name, &data, 1);
        assert_eq!(new[4..8], [2, 0, 0, 0], "writers write major 2");
        assert_eq!(
            decode(&new).unwrap().0.digest,
            WalDigest::Blake3(crate::ChunkId(*blake3::hash(&data).as_bytes()))
        );
        let sha = WalDigest::Sha256(ContentHash::of(&data));
        let old = encode_with_frame(
            &WalObjectHeader {
                name,
                size: data.len() as u64,
                digest: sha,
            },
            &frame,
        );
        assert_eq!(old[4..8], [1, 0, 0, 0]);
        assert_eq!(
            decode(&old).unwrap(),
            (decode_header(&old).unwrap().0, data.clone())
        );
        assert_eq!(decode_header(&old).unwrap().0.digest, sha);
        // The digest is read by the function its major names: the other one's is a mismatch.
        for (obj, major) in [(&old, 2u8), (&new, 1u8)] {
            let mut swapped = obj.clone();
            swapped[4] = major;
            assert!(
                matches!(decode(&swapped), Err(FormatError::ChecksumMismatch { .. })),
                "major {major}"
            );
        }
        let mut later = new.clone();
        later[4] = 3;
        assert!(matches!(
            decode_header(&later),
            Err(FormatError::UnsupportedVersion { .. })
        ));
        for d in [sha, decode(&new).unwrap().0.digest] {
            assert_eq!(WalDigest::parse(&d.to_string()), Some(d));
            assert_eq!(d.of_same_kind(&data), d);
        }
        assert_eq!(WalDigest::parse("md5:00"), None);
        for like in [sha, WalDigest::of(b"")] {
            let mut h = WalHasher::like(&like);
            data.chunks(1000).for_each(|p| h.update(p));
            assert_eq!(h.finish(), like.of_same_kind(&data));
        }
        let mut h = WalHasher::default();
        data.chunks(1000).for_each(|p| h.update(p));
        assert_eq!(h.finish(), WalDigest::of(&data));
    }
}
