//! Reading a WAL file and encoding it as a WAL object (FORMAT.md W1): read whole and compressed
//! in one zstd call up to [`WHOLE_MAX`], in buffers a sidecar keeps between uploads; streamed
//! through the digest (BLAKE3, WAL objects of major 2) and zstd in pieces above it.

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;
use tidemark_format::wal::{self as walfmt, WalFileName};

/// Bytes of a WAL file read at a time while hashing and compressing a file larger than
/// [`WHOLE_MAX`].
const READ_BLOCK: usize = 1 << 20;

/// Files up to this size (every segment of the default 16 MiB, and up to `--wal-segsize=64`) are
/// read whole and compressed in one zstd call: the streaming encoder copies its input into a
/// ring buffer of the window's size and matches across the wrap the slower way, about 30% more
/// zstd time per 16 MiB segment at level 1 (bench/results.md, "WAL push: one zstd call per
/// segment"). Larger segments (up to 1 GiB) stream, so an upload holds the compressed object
/// rather than the file.
pub(super) const WHOLE_MAX: u64 = 64 << 20;

/// What encoding a file read whole needs: the file's bytes, its compressed frame and a zstd
/// context, kept for the next file. A fresh 16 MiB buffer per segment costs its page faults again
/// (≈ 8 ms of system time per segment, about what reading the file whole saves in zstd time).
#[derive(Default)]
pub(super) struct WholeFile {
    data: Vec<u8>,
    frame: Vec<u8>,
    zstd: Option<(i32, tidemark_format::chunk::Compressor)>,
}

/// A pool of [`WholeFile`]s shared by the uploads of one process. It holds at most as many as
/// were ever in use at once (the sidecar's `--concurrency`), each at most [`WHOLE_MAX`] of input
/// plus zstd's bound for it: the memory the sidecar's bound (2 × segment size per upload) allows.
#[derive(Clone, Default)]
pub struct EncodeBuffers(std::sync::Arc<std::sync::Mutex<Vec<WholeFile>>>);

impl std::fmt::Debug for EncodeBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncodeBuffers")
    }
}

impl EncodeBuffers {
    pub(super) fn take(&self) -> WholeFile {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    pub(super) fn give_back(&self, b: WholeFile) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(b);
    }
}

/// Reads a WAL file, hashes and compresses it (whole, in `bufs`, when it has at most `whole_max`
/// bytes); a segment's page header is checked first. Returns the encoded object, its header and
/// (for segments and partials) the page header.
pub(super) fn encode_file(
    path: &Path,
    name: WalFileName,
    level: i32,
    whole_max: u64,
    bufs: &mut WholeFile,
) -> Result<(
    Vec<u8>,
    walfmt::WalObjectHeader,
    Option<walfmt::LongPageHeader>,
)> {
    let mut f = std::fs::File::open(path).with_context(|| {
        format!("cannot read wal file {}\nhint: archive_command must pass %p (PostgreSQL runs it in the data directory); check that the file exists and this user can read it", path.display())
    })?;
    let len = f
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let max = name.max_size();
    if len > max {
        anyhow::bail!(
            "{} is {len} bytes, more than the {max} a WAL file can be",
            path.display()
        );
    }
    let whole = len <= whole_max;
    let mut streamed_block = Vec::new();
    let block: &mut [u8] = if whole {
        // Grown once to the largest file seen; what lies past `len` is never looked at.
        if bufs.data.len() < len as usize {
            bufs.data.resize(len as usize, 0);
        }
        &mut bufs.data[..len as usize]
    } else {
        streamed_block.resize(READ_BLOCK, 0);
        &mut streamed_block
    };
    let first =
        read_full(&mut f, block).with_context(|| format!("cannot read {}", path.display()))?;
    let page = match name {
        WalFileName::Segment { .. } | WalFileName::Partial { .. } => {
            let hdr = walfmt::parse_long_page_header(&block[..first]).with_context(|| {
                format!("wal file {name} does not start with a valid PostgreSQL WAL page header")
            })?;
            crate::pgversion::major_of_segment(&name.to_string(), hdr.magic);
            if matches!(name, WalFileName::Segment { .. }) && len != hdr.seg_size as u64 {
                anyhow::bail!("wal segment {name} is {len} bytes but its header says segments are {} bytes\nhint: the file is truncated; PostgreSQL will retry", hdr.seg_size);
            }
            Some(hdr)
        }
        _ => None,
    };
    let changed = |total: u64| {
        anyhow::anyhow!("{} changed size while being read ({len} then {total} bytes)\nhint: PostgreSQL never changes a finished WAL file; archive_command must be given %p", path.display())
    };
    let header = |digest| walfmt::WalObjectHeader {
        name,
        size: len,
        digest,
    };
    let (obj, header) = if whole {
        // One byte more than expected would mean the file grew.
        let more = read_full(&mut f, &mut [0u8; 1])
            .with_context(|| format!("cannot read {}", path.display()))?;
        if first as u64 != len || more != 0 {
            return Err(changed(first as u64 + more as u64));
        }
        let data = &block[..first];
        let zstd = match &mut bufs.zstd {
            Some((l, z)) if *l == level => z,
            slot => {
                let z =
                    tidemark_format::chunk::Compressor::new(level).context("cannot start zstd")?;
                &mut slot.insert((level, z)).1
            }
        };
        zstd.compress_into(data, &mut bufs.frame)
            .with_context(|| format!("cannot compress {}", path.display()))?;
        let h = header(walfmt::WalDigest::of(data));
        (walfmt::encode_with_frame(&h, &bufs.frame), h)
    } else {
        let mut hasher = walfmt::WalHasher::default();
        let mut enc =
            walfmt::FrameEncoder::new(len, level).context("cannot start a zstd stream")?;
        let mut total = 0u64;
        let mut n = first;
        while n > 0 {
            hasher.update(&block[..n]);
            enc.write(&block[..n])
                .with_context(|| format!("cannot compress {}", path.display()))?;
            total += n as u64;
            n = read_full(&mut f, block)
                .with_context(|| format!("cannot read {}", path.display()))?;
        }
        if total != len {
            return Err(changed(total));
        }
        let frame = enc
            .finish()
            .with_context(|| format!("cannot compress {}", path.display()))?;
        let h = header(hasher.finish());
        (walfmt::encode_with_frame(&h, &frame), h)
    };
    Ok((obj, header, page))
}

/// The digest of the file at `path` by the same function as `like`, read READ_BLOCK bytes at a
/// time (a WAL file may be 1 GiB).
pub(crate) fn digest_file(
    path: &Path,
    like: &walfmt::WalDigest,
) -> std::io::Result<walfmt::WalDigest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = walfmt::WalHasher::like(like);
    let mut block = vec![0u8; READ_BLOCK];
    loop {
        match read_full(&mut f, &mut block)? {
            0 => return Ok(h.finish()),
            n => h.update(&block[..n]),
        }
    }
}

/// Fills `buf` from `f` unless the file ends first; returns the bytes read.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match f.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}
