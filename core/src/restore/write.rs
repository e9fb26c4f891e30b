//! Writing a restored file: its chunks fetched, verified and written in windows.
//!
//! Invariants:
//! - A file is written in windows of at most about WINDOW bytes of the file ([`Window`]): a
//!   window's chunks are fetched in pack order, not file order (refs sorted by (pack, offset),
//!   neighbours within READ_GAP coalesced into one range read of at most READ_MAX bytes),
//!   decoded into one buffer at their places, and written in file order, one call per run of
//!   consecutive chunks. A nightly backup's files interleave the parent's packs with new ones
//!   page by page: reading in file order made one request per page, and writing each read's
//!   chunks where they go left holes filled 8 KiB at a time (the kernel's per-file work then
//!   cost more than the decoding).
//! - Every chunk is checked against its id before its window is written.
//! - Memory is bounded by the constants below, not by the file or the database.
//! - Runs written through the page cache start an fdatasync of the file every 64 MiB
//!   ([`EarlySync`], `super::sync`); the caller's final fsync decides when the file counts as
//!   restored.
//! - A new relation file's aligned runs are written with O_DIRECT ([`Out`]), into blocks and a
//!   size the file was given before its first window ([`preallocate`]); whatever is not
//!   aligned, or refused by the filesystem, goes through the page cache. Either way the bytes
//!   written are the verified window's.

use super::sync::EarlySync;
use crate::manifest_file::LocalManifest;
use crate::ranges;
use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tidemark_format::manifest::ChunkRef;
use tidemark_format::{chunk, keys, ChunkId};

/// Range reads of one window in flight.
const READS_IN_FLIGHT: usize = 2;
/// Windows in flight in a whole restore, shared by the files in flight ([`Slots`]): one file may
/// take them all, as the last 1 GiB segment of a restore does once the others are written (with
/// 3 per file it ran alone on 3 windows, the cores part idle). Lab, page cache dropped, 6
/// alternating pairs against 3 per file: realistic nightly median 2.38 -> 2.24 s (5 faster),
/// initialised 1.87 / 1.90 s (CPU and disk unchanged). It needs [`preallocate`]: without it a
/// file's direct writes ran one at a time, and sharing made the initialised restore slower.
const WINDOWS_IN_FLIGHT: usize = 9;
/// Bytes of a file restored in memory and written with one call (a [`Window`]). A restore
/// holds at most WINDOWS_IN_FLIGHT windows, each a buffer of at most WINDOW + MAX_CHUNK_SIZE
/// bytes and READS_IN_FLIGHT fetched reads of at most READ_MAX stored bytes: ≈ 190 MiB at most,
/// whatever the file or the database size.
const WINDOW: u64 = 4 << 20;

/// One range read of a file: its chunks with their offsets in the file.
type Read = ranges::Read<Placed>;

/// A chunk with its offset in the file it is restored to.
pub(super) type Placed = (ChunkRef, u64);

/// A span of at most about WINDOW bytes of one file, restored in memory: its chunks are
/// fetched with range reads in pack order, decoded into one buffer at their places, and written
/// in file order, one call per run of consecutive chunks (one call for a window of a whole
/// file).
#[derive(Debug)]
struct Window {
    /// The file offset of the buffer's first byte and the buffer's length.
    at: u64,
    len: usize,
    /// The runs of consecutive chunks to write: (file offset, length).
    runs: Vec<(u64, usize)>,
    reads: Vec<Read>,
}

/// Windows planned lazily from chunks placed in file order (not overlapping): a window starts
/// at a chunk and takes every chunk that starts before the next multiple of WINDOW, so a whole
/// file's windows start at multiples of WINDOW and the frames of a full backup (aligned with
/// its 1 MiB blocks) are never split between two windows. Only the window being planned is
/// held, so planning a file costs memory for one window whatever the file's size. A chunk that
/// would reach past its window's buffer (overlapping chunks: a damaged entry) fails the restore
/// when decoded. Ends after the first error.
struct Windows<I> {
    placed: I,
    /// The first chunk of the next window, read while ending the one before.
    carry: Option<Placed>,
    /// An error was returned: nothing more is read.
    failed: bool,
}

impl<I: Iterator<Item = Result<Placed>>> Windows<I> {
    fn new(placed: I) -> Self {
        Windows {
            placed,
            carry: None,
            failed: false,
        }
    }
}

impl<I: Iterator<Item = Result<Placed>>> Iterator for Windows<I> {
    type Item = Result<Window>;

    fn next(&mut self) -> Option<Result<Window>> {
        if self.failed {
            return None;
        }
        let mut cur: Vec<Placed> = self.carry.take().into_iter().collect();
        for p in self.placed.by_ref() {
            let p = match p {
                Ok(p) => p,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            };
            if cur
                .first()
                .is_some_and(|&(_, at)| p.1 >= (at / WINDOW + 1) * WINDOW)
            {
                self.carry = Some(p);
                break;
            }
            cur.push(p);
        }
        (!cur.is_empty()).then(|| Ok(window(cur)))
    }
}

/// Chunk references read from a manifest's local copy per batch.
const REF_BATCH: u64 = 1024;

/// The chunks of file entry `i` of `m` in file order with their offsets, read from the
/// manifest's local copy REF_BATCH references at a time.
fn file_chunks(m: &LocalManifest, i: usize) -> impl Iterator<Item = Result<Placed>> + '_ {
    let n = m.file_head(i).map_or(0, |f| f.nchunks);
    let refs = (0..n.div_ceil(REF_BATCH)).flat_map(move |b| {
        let batch: Vec<Result<ChunkRef>> = match m.chunk_range(i, b * REF_BATCH, REF_BATCH) {
            Ok(v) => v.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        batch
    });
    in_file_order(refs)
}

/// Places a file's chunk references, given in file order, at their offsets.
fn in_file_order(
    refs: impl Iterator<Item = Result<ChunkRef>>,
) -> impl Iterator<Item = Result<Placed>> {
    refs.scan(0u64, |at, c| {
        Some(c.map(|c| {
            let p = (c, *at);
            *at += c.ulen as u64;
            p
        }))
    })
}

/// The window of `placed` chunks (non-empty, in file order).
fn window(placed: Vec<Placed>) -> Window {
    let at = placed[0].1;
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for &(c, off) in &placed {
        match runs.last_mut() {
            Some((start, len)) if *start + *len as u64 == off => *len += c.ulen as usize,
            _ => runs.push((off, c.ulen as usize)),
        }
    }
    let len = runs
        .last()
        .map_or(0, |&(start, len)| (start - at) as usize + len);
    Window {
        at,
        len,
        runs,
        reads: ranges::coalesce(placed, |(c, _)| (c.pack, c.offset, c.clen)),
    }
}

/// Alignment of O_DIRECT writes: file offset, length and buffer address (the device's logical
/// block, 512 or 4096 bytes).
const ALIGN: usize = 4096;

/// Whether a new file of `size` bytes is written with O_DIRECT where it can be (see
/// [`Out`]): relation segments and other files of whole blocks, from 1 MiB up.
pub(super) fn wants_direct(size: u64) -> bool {
    size >= 1 << 20 && size.is_multiple_of(ALIGN as u64)
}

/// Where a file's windows are written: `file`, and `direct`, the same file open with O_DIRECT,
/// for each run whose offset, length and place in its window's buffer are aligned to ALIGN (a
/// restore's new relation files: every window but a file's last short one). A write through
/// `direct` skips the kernel's copy into the page cache (16% of a nightly restore's CPU in the
/// lab) and its later writeback; a run it refuses (EINVAL) is written through `file`.
pub(super) struct Out {
    pub(super) file: Arc<std::fs::File>,
    pub(super) direct: Option<Arc<std::fs::File>>,
}

/// Gives a new file that is written with O_DIRECT its blocks and its size before its windows
/// are written (fallocate): a window's direct write then lands on blocks the file already has,
/// inside its size, which ext4 runs beside the file's other windows under a shared lock, where
/// a write extending the file or filling a hole took the file's lock alone, allocated its
/// blocks and waited for the device. Lab, page cache dropped, rounds of 5 alternating: restore
/// of the initialised nightly, median 1.88 -> 1.69 s and 1.67 -> 1.52 s; realistic, 2.57 ->
/// 2.47 s and 2.37 -> 2.20 s; the restore's CPU about 10% less. A filesystem without fallocate
/// is written as before; one without the space fails the restore here, before the file's data
/// is fetched.
pub(super) fn preallocate(file: &std::fs::File, size: u64, path: &str) -> Result<()> {
    use rustix::io::Errno;
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS => Ok(()),
        Err(e) if e == Errno::NOSPC || e == Errno::DQUOT => Err(std::io::Error::from(e))
            .with_context(|| format!("cannot allocate the {size} bytes of {path}\nhint: the target filesystem is full (or over its quota); free space or restore elsewhere, the restore needs about the backup's size")),
        Err(e) => Err(std::io::Error::from(e))
            .with_context(|| format!("cannot allocate the {size} bytes of {path}")),
    }
}

/// The windows of one restore, shared by its files: WINDOWS_IN_FLIGHT permits, and the buffers of
/// the windows written so far, kept for the next ones (at most one per permit).
pub(super) struct Slots {
    permits: tokio::sync::Semaphore,
    buffers: Buffers,
}

impl Slots {
    pub(super) fn new() -> Self {
        Slots {
            permits: tokio::sync::Semaphore::new(WINDOWS_IN_FLIGHT),
            buffers: Buffers::default(),
        }
    }
}

/// Fetches, verifies and writes every chunk of file entry `i` of `m` to `to`.
pub(super) async fn write_file(
    store: &Store,
    m: &Arc<LocalManifest>,
    i: usize,
    to: &Out,
    slots: &Slots,
) -> Result<()> {
    let path = &m.entries[i].path;
    write_windows(store, m, path, to, Windows::new(file_chunks(m, i)), slots).await
}

/// Fetches, verifies and writes `placed` chunks of file `path` at their offsets (a delta
/// restore's stale chunks, in any order).
pub(super) async fn write_chunks(
    store: &Store,
    m: &Arc<LocalManifest>,
    path: &str,
    file: &Arc<std::fs::File>,
    placed: Vec<Placed>,
    slots: &Slots,
) -> Result<()> {
    let to = Out {
        file: Arc::clone(file),
        direct: None,
    };
    write_windows(store, m, path, &to, sorted_windows(placed), slots).await
}

/// The windows of `placed` chunks given in any order.
fn sorted_windows(mut placed: Vec<Placed>) -> Windows<impl Iterator<Item = Result<Placed>>> {
    placed.sort_by_key(|&(_, off)| off);
    Windows::new(placed.into_iter().map(Ok))
}

async fn write_windows(
    store: &Store,
    m: &Arc<LocalManifest>,
    path: &str,
    to: &Out,
    windows: impl Iterator<Item = Result<Window>>,
    slots: &Slots,
) -> Result<()> {
    // Up to every slot for this file; a window waits for its permit (first come, first served
    // among the files in flight) before it takes a buffer.
    let mut writes = futures::stream::iter(windows)
        .map(|w| async move {
            let w = w?;
            let _slot = slots
                .permits
                .acquire()
                .await
                .context("the restore's windows were stopped")?;
            restore_window(store, m, w, path, to, &slots.buffers).await
        })
        .buffer_unordered(WINDOWS_IN_FLIGHT);
    // Counts only what went through the page cache: direct writes are on the device already.
    let mut early = EarlySync::new(&to.file, path);
    while let Some(n) = writes.try_next().await? {
        early.written(n)?;
    }
    early.finish().await
}

/// The window buffers of one restore, kept for its next windows (at most WINDOWS_IN_FLIGHT): a
/// buffer is only ever written over by chunks before its bytes are used, so a kept one is not
/// cleared (a new 4 MiB allocation costs its zeroing or its page faults).
#[derive(Default)]
struct Buffers(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Buffers {
    /// A buffer of at least `len` bytes.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .0
            .lock()
            .map(|mut v| v.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }

    fn give(pool: &std::sync::Mutex<Vec<Vec<u8>>>, b: Vec<u8>) {
        if let Ok(mut v) = pool.lock() {
            v.push(b);
        }
    }
}

/// The offset in `buf` of its first byte aligned to ALIGN.
fn aligned(buf: &[u8]) -> usize {
    (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN
}

/// Writes `bytes` at file offset `off` through `direct` if both are aligned to ALIGN; false
/// where they are not or the filesystem refuses the write (EINVAL): the caller writes them
/// through the page cache. A direct write stopped by EINVAL part way is written again whole.
fn write_direct(direct: &std::fs::File, bytes: &[u8], off: u64) -> std::io::Result<bool> {
    if !off.is_multiple_of(ALIGN as u64)
        || !bytes.len().is_multiple_of(ALIGN)
        || aligned(bytes) != 0
    {
        return Ok(false);
    }
    match direct.write_all_at(bytes, off) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Restores one window: fetches its reads (READS_IN_FLIGHT at a time), decodes each into the
/// window's buffer as it arrives, then writes the window's runs. Returns the bytes written
/// through the page cache.
async fn restore_window(
    store: &Store,
    m: &Arc<LocalManifest>,
    w: Window,
    path: &str,
    to: &Out,
    buffers: &Buffers,
) -> Result<u64> {
    let Window {
        at,
        len,
        runs,
        reads,
    } = w;
    // ALIGN bytes more, so that the window can start at an aligned address.
    let mut buf = buffers.take(len + ALIGN);
    // Kept from read to read of the window: a frame decoded whole for some of its chunks reuses
    // its buffer (a fresh one per read cost an allocation and its zeroing).
    let mut frames = chunk::FrameReader::default();
    let mut fetched = futures::stream::iter(reads.into_iter().map(|r| async move {
        let bytes = fetch(store, m, &r, path).await?;
        Ok::<_, anyhow::Error>((r, bytes))
    }))
    .buffered(READS_IN_FLIGHT);
    while let Some((read, bytes)) = fetched.try_next().await? {
        let (ids, pack, path) = (
            store.chunk_ids(),
            m.packs[read.pack as usize],
            path.to_string(),
        );
        (buf, frames) = tokio::task::spawn_blocking(move || -> Result<_> {
            let a = aligned(&buf);
            decode_read(&ids, &read, &bytes, &mut buf[a..a + len], at, &mut frames).map_err(|(offset, id, e)| {
                anyhow!("file {path}: a chunk of the frame at offset {offset} of pack {pack} (chunk {id} onwards) is damaged: {e}\nhint: the repository is damaged; run 'tidemark-restore check --read-data' and restore from another backup")
            })?;
            Ok((buf, frames))
        })
        .await??;
    }
    let (file, direct) = (Arc::clone(&to.file), to.direct.clone());
    let (path, pool) = (path.to_string(), Arc::clone(&buffers.0));
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let a = aligned(&buf);
        let mut cached = 0;
        for &(off, n) in &runs {
            let from = a + (off - at) as usize;
            let bytes = &buf[from..from + n];
            let done = match &direct {
                Some(d) => write_direct(d, bytes, off),
                None => Ok(false),
            };
            if !done.with_context(|| format!("cannot write {path}"))? {
                file.write_all_at(bytes, off)
                    .with_context(|| format!("cannot write {path}"))?;
                cached += n as u64;
            }
        }
        Buffers::give(&pool, buf);
        Ok(cached)
    })
    .await?
}

/// Fetches one planned read of file `path`'s chunks, checking its length.
async fn fetch(store: &Store, m: &LocalManifest, read: &Read, path: &str) -> Result<bytes::Bytes> {
    let pack = m.packs[read.pack as usize];
    let bytes = store
        .get_range(&keys::pack(&pack), read.start..read.end)
        .await
        .with_context(|| format!("cannot read file {path} from pack {pack}"))?;
    if bytes.len() as u64 != read.end - read.start {
        bail!(
            "pack {pack} returned {} bytes for range {}..{} of file {path}\nhint: the object store answered short; retry, and run 'tidemark-restore check' if it persists",
            bytes.len(),
            read.start,
            read.end
        );
    }
    Ok(bytes)
}

/// Decodes the chunks of one read (`bytes`, fetched) into `buf`, the window that starts at file
/// offset `at`, verifying each against its id (all of the read's chunks hashed together once
/// decoded, before the window is written). Chunks that follow each other both in one frame
/// and in the file are decoded with one decompression of the frame, and a frame read in
/// several pieces (a backup that reuses some of its chunks) is decompressed once for all. An
/// error names the damaged frame (its offset in the pack, its first chunk wanted).
fn decode_read(
    ids: &tidemark_format::seal::ChunkIds,
    read: &Read,
    bytes: &[u8],
    buf: &mut [u8],
    at: u64,
    frames: &mut chunk::FrameReader,
) -> std::result::Result<(), (u64, ChunkId, String)> {
    let items = &read.items;
    let mut group: Vec<(ChunkId, u32, u32)> = Vec::new();
    // Frames are keyed by their offset in the read's pack.
    frames.forget();
    let mut i = 0;
    while i < items.len() {
        let (c0, off0) = items[i];
        let mut j = i + 1;
        let mut n = c0.ulen as usize;
        while let Some(&(c, off)) = items.get(j) {
            let (p, poff) = items[j - 1];
            if (c.offset, c.clen) == (c0.offset, c0.clen)
                && c.skip as u64 == p.skip as u64 + p.ulen as u64
                && off == poff + p.ulen as u64
            {
                n += c.ulen as usize;
                j += 1;
            } else {
                break;
            }
        }
        let damaged = |e: &dyn std::fmt::Display| (c0.offset, c0.id, e.to_string());
        let from = (c0.offset - read.start) as usize;
        let frame = &bytes[from..from + c0.clen as usize];
        let dst = off0
            .checked_sub(at)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| buf.get_mut(o..o.checked_add(n)?))
            .ok_or_else(|| damaged(&"it lies outside its window"))?;
        group.clear();
        group.extend(items[i..j].iter().map(|(c, _)| (c.id, c.skip, c.ulen)));
        frames
            .decode_into(c0.offset, frame, &group, dst)
            .map_err(|e| damaged(&e))?;
        i = j;
    }
    // Every chunk of the read is now at its place in the window (each placed inside it above):
    // check them against their ids, hashed together (a nightly's runs are often one or two
    // pages; the read's chunks fill the multi-buffer hasher's lanes).
    let chunks = items
        .iter()
        .map(|(c, off)| {
            off.checked_sub(at)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| buf.get(o..o.checked_add(c.ulen as usize)?))
                .map(|b| (c.id, b))
                .ok_or_else(|| (c.offset, c.id, "it lies outside its window".to_string()))
        })
        .collect::<std::result::Result<Vec<(ChunkId, &[u8])>, _>>()?;
    chunk::check_chunks(ids, &chunks).map_err(|(k, e)| {
        let c = items[k].0;
        (c.offset, c.id, e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_format::manifest::FileEntry;

    #[test]
    fn a_preallocated_file_has_its_size_before_any_write() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("16384")).unwrap();
        preallocate(&file, 3 << 20, "base/5/16384").unwrap();
        assert_eq!(file.metadata().unwrap().len(), 3 << 20);
    }

    #[test]
    fn direct_writes_take_aligned_runs_and_leave_the_rest_to_the_page_cache() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("16397");
        let file = std::fs::File::create(&path).unwrap();
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path);
        let mut buf = vec![0u8; 3 * ALIGN];
        let a = aligned(&buf);
        let w = &mut buf[a..a + 2 * ALIGN];
        w.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let w = &buf[a..a + 2 * ALIGN];
        match direct {
            Ok(d) => {
                // Unaligned offset, length or address: not written, the caller writes them.
                assert!(!write_direct(&d, w, 512).unwrap());
                assert!(!write_direct(&d, &w[..ALIGN - 1], 0).unwrap());
                assert!(!write_direct(&d, &buf[a + 1..a + 1 + ALIGN], 0).unwrap());
                assert!(write_direct(&d, w, ALIGN as u64).unwrap());
            }
            // A filesystem without O_DIRECT (tmpfs before Linux 6.6): the page cache writes.
            Err(e) => assert_eq!(
                e.raw_os_error(),
                Some(rustix::io::Errno::INVAL.raw_os_error())
            ),
        }
        if std::fs::metadata(&path).unwrap().len() == 0 {
            file.write_all_at(w, ALIGN as u64).unwrap();
        }
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 3 * ALIGN);
        assert_eq!(&back[ALIGN..], w);
        assert!(back[..ALIGN].iter().all(|&b| b == 0));
        assert!(wants_direct(1 << 30) && !wants_direct(8192) && !wants_direct((1 << 20) + 512));
    }

    fn file(chunks: &[(u32, u64, u32)]) -> FileEntry {
        let chunks: Vec<ChunkRef> = chunks
            .iter()
            .map(|&(pack, offset, clen)| ChunkRef {
                id: tidemark_format::ChunkId([0; 32]),
                pack,
                offset,
                clen,
                ulen: 8192,
                skip: 0,
            })
            .collect();
        FileEntry {
            size: 8192 * chunks.len() as u64,
            sha256: tidemark_format::ChunkId([0; 32]),
            chunks,
        }
    }

    fn plan_file(f: &FileEntry) -> Vec<Window> {
        Windows::new(in_file_order(f.chunks.iter().copied().map(Ok)))
            .collect::<Result<_>>()
            .unwrap()
    }

    fn plan_windows(placed: Vec<Placed>) -> Vec<Window> {
        sorted_windows(placed).collect::<Result<_>>().unwrap()
    }

    #[test]
    fn a_chunk_list_that_fails_to_read_ends_the_windows_with_its_error() {
        let c = file(&[(0, 0, 100)]).chunks[0];
        let pages = (WINDOW / 8192) as usize;
        let read = std::cell::Cell::new(0);
        let refs = (0..pages + 5).map(|k| {
            read.set(read.get() + 1);
            match k == pages + 1 {
                true => Err(anyhow!("torn chunk list")),
                false => Ok(c),
            }
        });
        let mut w = Windows::new(in_file_order(refs));
        let first = w.next().unwrap().unwrap();
        assert_eq!((first.at, first.len), (0, WINDOW as usize));
        let err = w.next().unwrap().unwrap_err();
        assert!(err.to_string().contains("torn chunk list"), "{err}");
        assert!(w.next().is_none(), "windows after the error");
        assert_eq!(read.get(), pages + 2, "references read after the error");
    }

    #[test]
    fn reads_are_coalesced_per_pack_whatever_the_file_order() {
        // A nightly file: pages alternate between the parent's pack 0 and the new pack 1.
        let f = file(&[
            (0, 0, 100),
            (1, 0, 100),
            (0, 200, 100),
            (1, 100, 100),
            (0, 400, 100),
        ]);
        let w = plan_file(&f);
        assert_eq!(w.len(), 1, "{w:?}");
        let (reads, runs) = (&w[0].reads, &w[0].runs);
        assert_eq!(reads.len(), 2, "{reads:?}");
        assert_eq!((reads[0].pack, reads[0].start, reads[0].end), (0, 0, 500));
        let offs: Vec<u64> = reads[0].items.iter().map(|(_, o)| *o).collect();
        assert_eq!(offs, vec![0, 16384, 32768]);
        assert_eq!((reads[1].pack, reads[1].start, reads[1].end), (1, 0, 200));
        // The whole window is one run, written with one call.
        assert_eq!((w[0].at, w[0].len), (0, 5 * 8192));
        assert_eq!(runs, &vec![(0, 5 * 8192)]);
        // The same stored chunk used twice (two zero pages) is read once and written twice.
        let f = file(&[(0, 0, 100), (0, 0, 100)]);
        let w = plan_file(&f);
        assert_eq!(w[0].reads.len(), 1);
        assert_eq!(w[0].reads[0].items.len(), 2);
        assert_eq!(w[0].reads[0].end, 100);
    }

    #[test]
    fn windows_start_at_multiples_of_window_and_runs_skip_what_is_not_placed() {
        let pages = (2 * WINDOW / 8192) as usize + 3;
        let f = file(&vec![(0, 0, 100); pages]);
        let w = plan_file(&f);
        let spans: Vec<(u64, usize)> = w.iter().map(|w| (w.at, w.len)).collect();
        let last = 3 * 8192;
        assert_eq!(
            spans,
            vec![
                (0, WINDOW as usize),
                (WINDOW, WINDOW as usize),
                (2 * WINDOW, last)
            ]
        );
        assert!(w.iter().all(|w| w.runs == vec![(w.at, w.len)]));
        // A delta's scattered stale chunks, given out of order: a window from the first of
        // them to the next multiple of WINDOW, one run per stretch of consecutive chunks.
        let c = f.chunks[0];
        let placed = vec![
            (c, WINDOW + 8192),
            (c, 8192),
            (c, 3 * 8192),
            (c, 4 * 8192),
            (c, WINDOW - 8192),
        ];
        let w = plan_windows(placed);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!((w[0].at, w[0].len), (8192, WINDOW as usize - 8192));
        assert_eq!(
            w[0].runs,
            vec![(8192, 8192), (3 * 8192, 2 * 8192), (WINDOW - 8192, 8192)]
        );
        assert_eq!(
            (w[1].at, w[1].len, w[1].runs.len()),
            (WINDOW + 8192, 8192, 1)
        );
    }

    #[test]
    fn a_frame_held_from_one_pack_is_not_served_for_another_packs_frame_at_the_same_offset() {
        // Two frames of two pages each, as long as each other, at offset 0 of packs 0 and 1;
        // the window wants the second page of each.
        let pages = |b: u8| [vec![b; 8192], vec![b + 1; 8192]].concat();
        let (one, two) = (pages(1), pages(5));
        let (f1, f2) = (chunk::compress(&one, 1), chunk::compress(&two, 1));
        assert_eq!(f1.len(), f2.len());
        let read = |pack: u32, data: &[u8], frame: &[u8], at: u64| Read {
            pack,
            start: 0,
            end: frame.len() as u64,
            items: vec![(
                ChunkRef {
                    id: ChunkId::of(&data[8192..]),
                    pack,
                    offset: 0,
                    clen: frame.len() as u32,
                    ulen: 8192,
                    skip: 8192,
                },
                at,
            )],
        };
        let ids = tidemark_format::seal::ChunkIds::Sha256;
        let mut frames = chunk::FrameReader::default();
        let mut buf = vec![0u8; 16384];
        decode_read(&ids, &read(0, &one, &f1, 0), &f1, &mut buf, 0, &mut frames).unwrap();
        decode_read(
            &ids,
            &read(1, &two, &f2, 8192),
            &f2,
            &mut buf,
            0,
            &mut frames,
        )
        .unwrap();
        assert_eq!(buf, [&one[8192..], &two[8192..]].concat());
    }

    #[test]
    fn a_chunk_outside_its_window_or_damaged_is_an_error_not_a_panic() {
        let page = vec![7u8; 8192];
        let frame = chunk::compress(&page, 1);
        let c = ChunkRef {
            id: ChunkId::of(&page),
            pack: 0,
            offset: 0,
            clen: frame.len() as u32,
            ulen: 8192,
            skip: 0,
        };
        let ids = tidemark_format::seal::ChunkIds::Sha256;
        let read = Read {
            pack: 0,
            start: 0,
            end: frame.len() as u64,
            items: vec![(c, 8192)],
        };
        let mut buf = vec![0u8; 8192];
        decode_read(&ids, &read, &frame, &mut buf, 8192, &mut Default::default()).unwrap();
        assert_eq!(buf, page);
        // Before the window's start, or past its end: refused.
        assert!(decode_read(
            &ids,
            &read,
            &frame,
            &mut buf,
            16384,
            &mut Default::default()
        )
        .is_err());
        assert!(decode_read(
            &ids,
            &read,
            &frame,
            &mut buf[..8191],
            8192,
            &mut Default::default()
        )
        .is_err());
        // A damaged frame is named by its offset and its first chunk.
        let mut bad = frame.clone();
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        let (off, id, _) =
            decode_read(&ids, &read, &bad, &mut buf, 8192, &mut Default::default()).unwrap_err();
        assert_eq!((off, id), (0, c.id));
    }
}
