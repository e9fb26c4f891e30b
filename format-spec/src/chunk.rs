//! Chunks: a piece of a file's bytes, named by the sha256 of its uncompressed bytes and stored in
//! a zstd frame: alone (format 1.0) or with the chunks that follow it in its file (format 1.4,
//! frames of up to [`WRITER_FRAME_SIZE`]). A chunk is verified against its id on every read.

use crate::error::FormatError;
use crate::ids::ChunkId;

/// Largest uncompressed chunk any reader accepts (the config's chunk size is at most this).
pub const MAX_CHUNK_SIZE: u32 = 1 << 20;
/// Largest uncompressed frame any reader accepts (FORMAT.md 8.2).
pub const MAX_FRAME_SIZE: u32 = 1 << 20;
/// Uncompressed bytes after which tidemark closes a frame of consecutive new chunks: large
/// enough that zstd finds the repeats between pages (pgbench tables store 2.2x less than with
/// one frame per 8 KiB page), small enough that reading one deduplicated page decodes little.
pub const WRITER_FRAME_SIZE: usize = 256 << 10;

/// Compresses `data` as one zstd frame at `level`, with the content size recorded in the frame.
/// Same parameters as [`Compressor`].
pub fn compress(data: &[u8], level: i32) -> Vec<u8> {
    Compressor::new(level)
        .and_then(|mut c| c.compress(data))
        .expect("zstd compression into a growable buffer cannot fail")
}

/// The shortest match zstd looks for at `level` when the input is larger than 256 KiB, for the
/// fast levels (1 and below) where zstd's parameters for smaller inputs differ from it.
///
/// zstd picks its parameters from the size of the input: a frame of tidemark's 256 KiB (or a
/// smaller one: the few changed pages of a block) gets the table for inputs of at most 256 KiB,
/// which at level 1 looks for matches of 6 bytes (5 under 128 KiB) instead of 7. On table pages
/// holding high-entropy text (hex, hashes, random ids) the shorter matches are mostly worse than
/// the literals they replace: pgbench's accounts table with a random hex filler stores 3% larger
/// in 256 KiB frames with them (`zstd -b1 -B256K`, 2.584 against 2.665 with `--zstd=mml=7`). A
/// whole-file or whole-segment compressor (pgBackRest's, or tidemark's WAL) gets 7 at level 1
/// anyway. Higher levels use other match finders, left as
/// zstd picks them.
fn large_input_min_match(level: i32) -> Option<u32> {
    match level {
        1 => Some(7),
        i32::MIN..=-1 => Some(6),
        _ => None,
    }
}

/// A reusable chunk compressor: one zstd context for many chunks (creating one per 8 KiB chunk
/// costs more than compressing it). Each call yields one frame exactly as [`compress`] does:
/// the content size recorded, no dictionary (8.2).
pub struct Compressor(zstd::bulk::Compressor<'static>);

impl Compressor {
    pub fn new(level: i32) -> std::io::Result<Compressor> {
        let mut c = zstd::bulk::Compressor::new(level)?;
        c.include_contentsize(true)?;
        if let Some(m) = large_input_min_match(level) {
            c.set_parameter(zstd::zstd_safe::CParameter::MinMatch(m))?;
        }
        Ok(Compressor(c))
    }

    /// One frame holding `data`.
    pub fn compress(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        self.0.compress(data)
    }

    /// One frame holding `data`, written over `out` (grown to zstd's bound for `data` if it is
    /// smaller), so a caller compressing file after file reuses one buffer.
    pub fn compress_into(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        self.0.compress_to_buffer(data, out).map(|_| ())
    }
}

thread_local! {
    /// One decompression context per thread: creating one per chunk costs more than decoding
    /// an 8 KiB chunk.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// The first four bytes of every zstd frame (0xFD2FB528, little-endian).
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The chunk `id` of `ulen` bytes at the start of a frame (skip 0: a frame of one chunk, or the
/// first chunk of a longer frame): the frame is decoded whole (its content size, at most
/// [`MAX_FRAME_SIZE`], checked before allocating) and the chunk's sha256 compared with `id`.
pub fn decode(id: &ChunkId, frame: &[u8], ulen: u32) -> Result<Vec<u8>, FormatError> {
    decode_with(&crate::seal::ChunkIds::Sha256, id, frame, ulen)
}

/// [`decode`] in a repository whose chunk ids are computed by `ids` (keyed in an encrypted
/// repository, FORMAT.md 17.2).
pub fn decode_with(
    ids: &crate::seal::ChunkIds,
    id: &ChunkId,
    frame: &[u8],
    ulen: u32,
) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    decode_append(ids, id, frame, ulen, &mut out)?;
    Ok(out)
}

/// Decompresses a zstd frame that must expand to exactly `len` bytes; never allocates more.
pub fn decompress_exact(
    what: &'static str,
    frame: &[u8],
    len: u64,
) -> Result<Vec<u8>, FormatError> {
    let cap = check_frame(what, frame, len)?;
    // One extra byte of capacity detects a frame that expands to more than declared.
    let out = with_dctx(|d| d.decompress(frame, cap.saturating_add(1)))
        .map_err(|e| FormatError::invalid(what, format!("zstd frame does not decode: {e}")))?;
    if out.len() as u64 != len {
        return Err(FormatError::invalid(
            what,
            format!("decompressed to {} bytes, declared {len}", out.len()),
        ));
    }
    Ok(out)
}

/// [`decode_with`] appending the chunk's bytes to `out` (a restore gathers consecutive chunks of
/// a file into one write); on an error `out` is left as it was.
pub fn decode_append(
    ids: &crate::seal::ChunkIds,
    id: &ChunkId,
    frame: &[u8],
    ulen: u32,
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    decode_run(ids, frame, &[(*id, 0, ulen)], out)
}

/// Decodes the chunks `run` of one frame, each given as (id, skip, ulen): `skip` is where the
/// chunk starts in the frame's uncompressed bytes (format 1.4; 0 for a frame of one chunk). The
/// chunks must follow each other in the frame (each starts where the one before ends). Appends
/// their bytes to `out` and checks each against its id; on an error `out` is left as it was.
/// The frame is decoded once, whatever the number of chunks.
pub fn decode_run(
    ids: &crate::seal::ChunkIds,
    frame: &[u8],
    run: &[(ChunkId, u32, u32)],
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    let at = out.len();
    let r = decode_run_inner(ids, frame, run, out);
    if r.is_err() {
        out.truncate(at);
    }
    r
}

fn decode_run_inner(
    ids: &crate::seal::ChunkIds,
    frame: &[u8],
    run: &[(ChunkId, u32, u32)],
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    let Some(&(_, first, _)) = run.first() else {
        return Ok(());
    };
    let mut end = first as u64;
    for &(_, skip, ulen) in run {
        if ulen > MAX_CHUNK_SIZE {
            return Err(FormatError::TooLarge {
                what: "chunk",
                size: ulen as u64,
                max: MAX_CHUNK_SIZE as u64,
            });
        }
        if skip as u64 != end {
            return Err(FormatError::invalid(
                "chunk",
                format!("starts at byte {skip} of its frame, expected {end}"),
            ));
        }
        end += ulen as u64;
    }
    let flen = frame_len("chunk", frame)?;
    if end > flen {
        return Err(FormatError::invalid(
            "chunk",
            format!("ends at byte {end} of a frame of {flen} bytes"),
        ));
    }
    let at = out.len();
    let flen = flen as usize;
    out.resize(at + flen, 0);
    decompress_into(frame, flen as u64, &mut out[at..])?;
    // Keep only the run's bytes.
    let (first, end) = (first as usize, end as usize);
    if first > 0 {
        out.copy_within(at + first..at + end, at);
    }
    out.truncate(at + end - first);
    check_run(ids, run, &out[at..])
}

/// Decompresses `frame`, which declares `flen` bytes, straight into the start of `dst` (at least
/// that long) and checks that it gave exactly `flen`.
fn decompress_into(frame: &[u8], flen: u64, dst: &mut [u8]) -> Result<(), FormatError> {
    let n = with_dctx(|d| d.decompress_to_buffer(frame, dst))
        .map_err(|e| FormatError::invalid("chunk", format!("zstd frame does not decode: {e}")))?;
    if n as u64 != flen {
        return Err(FormatError::invalid(
            "chunk",
            format!("decompressed to {n} bytes, declared {flen}"),
        ));
    }
    Ok(())
}

/// Checks each chunk of `run` against its id, the chunks lying end to end from the start of
/// `bytes`.
fn check_run(
    ids: &crate::seal::ChunkIds,
    run: &[(ChunkId, u32, u32)],
    bytes: &[u8],
) -> Result<(), FormatError> {
    let mut pos = 0;
    let chunks: Vec<(ChunkId, &[u8])> = run
        .iter()
        .map(|&(id, _, ulen)| {
            let c = &bytes[pos..pos + ulen as usize];
            pos += ulen as usize;
            (id, c)
        })
        .collect();
    check_chunks(ids, &chunks).map_err(|(_, e)| e)
}

/// Checks each chunk's bytes against its id, hashing them together
/// ([`ChunkIds::ids`](crate::seal::ChunkIds::ids): the more chunks per call, the fuller the
/// hasher's lanes). A chunk whose digest from the batch differs is hashed again on its own
/// ([`check_id`]: sha2 for SHA-256 ids), and that result decides: a fault of the multi-buffer
/// hasher can cost time, never refuse a good chunk. The error gives the index of the first
/// chunk that does not match.
pub fn check_chunks(
    ids: &crate::seal::ChunkIds,
    chunks: &[(ChunkId, &[u8])],
) -> Result<(), (usize, FormatError)> {
    let bytes: Vec<&[u8]> = chunks.iter().map(|&(_, c)| c).collect();
    for (k, (&(want, c), got)) in chunks.iter().zip(ids.ids(&bytes)).enumerate() {
        if got != want {
            check_id(ids, &want, c).map_err(|e| (k, e))?;
        }
    }
    Ok(())
}

/// Reads runs of chunks out of frames that may be visited several times in a row (a restore of
/// a backup that reuses some chunks of a frame and not others): keeps the last frame decoded
/// whole, so each frame is decompressed once however many pieces of it are read. A run that
/// covers a whole frame is decoded straight into the output.
#[derive(Default)]
pub struct FrameReader {
    /// The key and stored length of the frame held in `buf`.
    held: Option<(u64, usize)>,
    buf: Vec<u8>,
}

impl FrameReader {
    /// Forgets the frame held, keeping its buffer: call it before reading frames whose keys may
    /// name other frames than the held one's (e.g. offsets in another pack).
    pub fn forget(&mut self) {
        self.held = None;
    }

    /// Appends the chunks `run` (as in [`decode_run`]) of `frame` to `out`; `key` names the
    /// frame (e.g. its offset in its pack) so that a later run of the same frame is served
    /// from the copy held. On an error `out` is left as it was.
    pub fn append(
        &mut self,
        ids: &crate::seal::ChunkIds,
        key: u64,
        frame: &[u8],
        run: &[(ChunkId, u32, u32)],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let at = out.len();
        let len: u64 = run.iter().map(|&(_, _, ulen)| ulen as u64).sum();
        if len > MAX_FRAME_SIZE as u64 {
            return Err(FormatError::TooLarge {
                what: "chunk run",
                size: len,
                max: MAX_FRAME_SIZE as u64,
            });
        }
        out.resize(at + len as usize, 0);
        let r = self.read_into(ids, key, frame, run, &mut out[at..]);
        if r.is_err() {
            out.truncate(at);
        }
        r
    }

    /// Decodes the chunks `run` of `frame` (each (id, skip, ulen), in this order) into `out`,
    /// which must be exactly as long as their lengths together, and checks each against its
    /// id. On an error `out` holds no promise.
    pub fn read_into(
        &mut self,
        ids: &crate::seal::ChunkIds,
        key: u64,
        frame: &[u8],
        run: &[(ChunkId, u32, u32)],
        out: &mut [u8],
    ) -> Result<(), FormatError> {
        self.decode_into(key, frame, run, out)?;
        check_run(ids, run, out)
    }

    /// [`FrameReader::read_into`] without the check of the chunks against their ids: the
    /// caller MUST check them ([`check_chunks`]) before using them, which lets it hash the
    /// chunks of many runs together. A run that is the whole frame, its chunks following each
    /// other, is decoded straight into `out`; any other is copied out of the frame decoded
    /// whole and held under `key`. On an error `out` holds no promise.
    pub fn decode_into(
        &mut self,
        key: u64,
        frame: &[u8],
        run: &[(ChunkId, u32, u32)],
        out: &mut [u8],
    ) -> Result<(), FormatError> {
        let want: u64 = run.iter().map(|&(_, _, ulen)| ulen as u64).sum();
        if run.is_empty() && out.is_empty() {
            return Ok(());
        }
        if want != out.len() as u64 {
            return Err(FormatError::invalid(
                "chunk run",
                format!("{want} bytes of chunks for {} bytes of output", out.len()),
            ));
        }
        if self.held != Some((key, frame.len())) {
            let flen = frame_len("chunk", frame)?;
            let mut end = 0u64;
            let whole = run.iter().all(|&(_, skip, ulen)| {
                let next = skip as u64 == end;
                end += ulen as u64;
                next
            }) && end == flen;
            if whole {
                return decompress_into(frame, flen, out);
            }
            // Every chunk must lie within the frame before it is decoded (FORMAT.md 8.2).
            if let Some(&(_, skip, ulen)) = run
                .iter()
                .find(|&&(_, skip, ulen)| skip as u64 + ulen as u64 > flen)
            {
                return Err(FormatError::invalid(
                    "chunk",
                    format!(
                        "ends at byte {} of a frame of {flen} bytes",
                        skip as u64 + ulen as u64
                    ),
                ));
            }
            self.held = None;
            // The buffer is kept from frame to frame (exactly the frame's length: a chunk past
            // it is refused below, never read from an older frame's bytes).
            self.buf.resize(flen as usize, 0);
            decompress_into(frame, flen, &mut self.buf)?;
            self.held = Some((key, frame.len()));
        }
        let mut pos = 0;
        for &(_, skip, ulen) in run {
            let bytes = self
                .buf
                .get(skip as usize..skip as usize + ulen as usize)
                .ok_or_else(|| {
                    FormatError::invalid(
                        "chunk",
                        format!(
                            "ends at byte {} of a frame of {} bytes",
                            skip as u64 + ulen as u64,
                            self.buf.len()
                        ),
                    )
                })?;
            out[pos..pos + ulen as usize].copy_from_slice(bytes);
            pos += ulen as usize;
        }
        Ok(())
    }
}

/// Decodes a whole chunk frame (at most [`MAX_FRAME_SIZE`] bytes, checked before allocating);
/// its chunks are then checked with [`check_id`].
pub fn decode_frame(frame: &[u8]) -> Result<Vec<u8>, FormatError> {
    let len = frame_len("chunk", frame)?;
    decompress_exact("chunk", frame, len)
}

/// Checks that `bytes` are the chunk `id` ("checksum mismatch" otherwise).
pub fn check_id(
    ids: &crate::seal::ChunkIds,
    id: &ChunkId,
    bytes: &[u8],
) -> Result<(), FormatError> {
    let actual = ids.id(bytes);
    if actual == *id {
        Ok(())
    } else {
        Err(FormatError::ChecksumMismatch {
            what: "chunk",
            expected: id.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// The uncompressed length a chunk frame declares, after checking that it is exactly one zstd
/// frame recording its content size of at most [`MAX_FRAME_SIZE`] (before any output is
/// allocated).
pub fn frame_len(what: &'static str, frame: &[u8]) -> Result<u64, FormatError> {
    if frame.get(..4) != Some(&ZSTD_MAGIC[..]) {
        return Err(FormatError::invalid(
            what,
            "does not start with a zstd frame",
        ));
    }
    let n = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) => n,
        _ => {
            return Err(FormatError::invalid(
                what,
                "zstd frame header does not record its content size",
            ))
        }
    };
    if n > MAX_FRAME_SIZE as u64 {
        return Err(FormatError::TooLarge {
            what,
            size: n,
            max: MAX_FRAME_SIZE as u64,
        });
    }
    if zstd::zstd_safe::find_frame_compressed_size(frame) != Ok(frame.len()) {
        return Err(FormatError::invalid(
            what,
            "is not exactly one whole zstd frame",
        ));
    }
    Ok(n)
}

/// Runs `f` with this thread's decompression context (made on first use).
fn with_dctx<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        f(dctx)
    })
}

/// Checks that `frame` is exactly one zstd frame recording its content size, equal to `len`
/// (on the frame header, before any output is allocated); returns `len` as a size.
fn check_frame(what: &'static str, frame: &[u8], len: u64) -> Result<usize, FormatError> {
    let cap = usize::try_from(len).map_err(|_| FormatError::TooLarge {
        what,
        size: len,
        max: usize::MAX as u64,
    })?;
    // Without this an empty frame (a truncated object) would decode to zero bytes, and
    // skippable or extra frames would be accepted.
    if frame.get(..4) != Some(&ZSTD_MAGIC[..]) {
        return Err(FormatError::invalid(
            what,
            "does not start with a zstd frame",
        ));
    }
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n == len => {}
        Ok(Some(n)) => {
            return Err(FormatError::invalid(
                what,
                format!("zstd frame declares {n} bytes, expected {len}"),
            ))
        }
        _ => {
            return Err(FormatError::invalid(
                what,
                "zstd frame header does not record its content size",
            ))
        }
    }
    if zstd::zstd_safe::find_frame_compressed_size(frame) != Ok(frame.len()) {
        return Err(FormatError::invalid(
            what,
            "is not exactly one whole zstd frame",
        ));
    }
    Ok(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_append_appends_or_leaves_the_buffer_as_it_was() {
        let ids = crate::seal::ChunkIds::Sha256;
        let (a, b) = (vec![1u8; 8192], vec![2u8; 4096]);
        let (fa, fb) = (compress(&a, 1), compress(&b, 1));
        let mut out = b"head".to_vec();
        decode_append(&ids, &ChunkId::of(&a), &fa, 8192, &mut out).unwrap();
        decode_append(&ids, &ChunkId::of(&b), &fb, 4096, &mut out).unwrap();
        assert_eq!(out, [&b"head"[..], &a, &b].concat());
        let n = out.len();
        // A wrong id, a wrong length, a cut frame: errors, and nothing appended.
        assert!(matches!(
            decode_append(&ids, &ChunkId::of(b"x"), &fa, 8192, &mut out),
            Err(FormatError::ChecksumMismatch { .. })
        ));
        assert!(decode_append(&ids, &ChunkId::of(&a), &fa, 8191, &mut out).is_err());
        assert!(
            decode_append(&ids, &ChunkId::of(&a), &fa[..fa.len() - 1], 8192, &mut out).is_err()
        );
        assert!(decode_append(&ids, &ChunkId::of(&a), &fa, MAX_CHUNK_SIZE + 1, &mut out).is_err());
        assert_eq!(out.len(), n);
    }

    #[test]
    fn frame_reader_serves_pieces_of_a_frame_and_whole_frames() {
        let ids = crate::seal::ChunkIds::Sha256;
        let pages: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 8192]).collect();
        let frame = compress(&pages.concat(), 1);
        let r = |i: usize| (ChunkId::of(&pages[i]), (i * 8192) as u32, 8192u32);
        let mut fr = FrameReader::default();
        let mut out = Vec::new();
        // Pieces out of order, then the whole frame, then a piece again.
        fr.append(&ids, 8, &frame, &[r(1)], &mut out).unwrap();
        fr.append(&ids, 8, &frame, &[r(0)], &mut out).unwrap();
        fr.append(&ids, 8, &frame, &[r(0), r(1), r(2)], &mut out)
            .unwrap();
        fr.append(&ids, 9, &frame, &[r(0), r(1), r(2)], &mut out)
            .unwrap();
        fr.append(&ids, 9, &frame, &[r(2)], &mut out).unwrap();
        let p = |i: usize| &pages[i][..];
        assert_eq!(
            out,
            [p(1), p(0), p(0), p(1), p(2), p(0), p(1), p(2), p(2)].concat()
        );
        // A wrong id or a chunk past the frame's end: an error, nothing appended.
        let n = out.len();
        let bad = (ChunkId::of(b"x"), 8192, 8192);
        assert!(fr.append(&ids, 9, &frame, &[bad], &mut out).is_err());
        assert!(fr.append(&ids, 7, &frame, &[r(0), bad], &mut out).is_err());
        let past = (ChunkId::of(&pages[2]), 3 * 8192, 8192);
        assert!(fr.append(&ids, 9, &frame, &[past], &mut out).is_err());
        // A run longer than any frame is refused before anything is allocated for it.
        let huge = (ChunkId::of(&pages[2]), 0, MAX_FRAME_SIZE + 1);
        assert!(fr.append(&ids, 9, &frame, &[huge], &mut out).is_err());
        assert_eq!(out.len(), n);
        // Into a slice: whole frames straight in, pieces from the frame held; the slice must
        // be exactly as long as the run.
        let mut fr = FrameReader::default();
        let mut buf = vec![9u8; 3 * 8192];
        fr.read_into(&ids, 1, &frame, &[r(0), r(1), r(2)], &mut buf)
            .unwrap();
        assert_eq!(buf, pages.concat());
        fr.read_into(&ids, 1, &frame, &[r(2), r(0)], &mut buf[8192..])
            .unwrap();
        assert_eq!(buf, [p(0), p(2), p(0)].concat());
        assert!(fr
            .read_into(&ids, 1, &frame, &[r(2)], &mut buf[..8191])
            .is_err());
        assert!(fr
            .read_into(
                &ids,
                2,
                &frame,
                &[r(0), r(1), r(2)],
                &mut buf[..3 * 8192 - 1]
            )
            .is_err());
    }

    #[test]
    fn round_trip_and_mismatch() {
        let data = vec![7u8; 8192];
        let frame = compress(&data, 1);
        let id = ChunkId::of(&data);
        assert_eq!(decode(&id, &frame, 8192).unwrap(), data);
        assert!(matches!(
            decode(&ChunkId::of(b"x"), &frame, 8192),
            Err(FormatError::ChecksumMismatch { .. })
        ));
        assert!(decode(&id, &frame, 100).is_err());
        assert!(decode(&id, &frame[..frame.len() - 1], 8192).is_err());
    }

    /// High-entropy text (hex) with a few short repeats: with zstd's small-input parameters at
    /// level 1 (matches from 6 bytes) the frame is larger than with 7, the large-input choice.
    #[test]
    fn level_one_frames_use_the_large_input_minimum_match() {
        use sha2::Digest;
        let mut data = Vec::new();
        for i in 0u32..32768 {
            let h = sha2::Sha256::digest(i.to_le_bytes());
            data.extend_from_slice(&h[..3]);
            let hex: String = h[3..24].iter().map(|b| format!("{b:02x}")).collect();
            data.extend_from_slice(hex.as_bytes());
        }
        let data = &data[..256 << 10];
        let ours = compress(data, 1);
        let mut six = zstd::bulk::Compressor::new(1).unwrap();
        six.set_parameter(zstd::zstd_safe::CParameter::MinMatch(6))
            .unwrap();
        let six = six.compress(data).unwrap();
        assert!(
            ours.len() < six.len(),
            "{} against {}",
            ours.len(),
            six.len()
        );
        assert_eq!(decode_frame(&ours).unwrap(), data);
        assert_eq!(large_input_min_match(3), None);
        assert_eq!(large_input_min_match(-5), Some(6));
    }

    #[test]
    fn reused_compressor_writes_the_same_frames() {
        let mut c = Compressor::new(1).unwrap();
        for fill in [0u8, 3, 255] {
            let data: Vec<u8> = (0..8192u32).map(|i| fill ^ (i % 7) as u8).collect();
            let frame = c.compress(&data).unwrap();
            assert_eq!(frame, compress(&data, 1));
            assert_eq!(decode(&ChunkId::of(&data), &frame, 8192).unwrap(), data);
        }
    }
}
