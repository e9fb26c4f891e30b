//! The chunk pipeline both backup sources feed: worker threads cut file data into chunks, hash
//! them, deduplicate them against the parent backup and the chunks stored recently, compress the
//! new ones into packs, and one uploader stores the sealed packs; then the chunk locations are
//! resolved into a manifest's pack table and entries.
//!
//! Invariants:
//! - Memory is bounded by (workers + 3) packs of `pack_target` bytes and the recent-chunk map of
//!   at most [`RECENT_CAP`] entries, whatever the size of the database; per file it holds the
//!   path and one small range of the chunk log per stored block. Chunk locations go to the chunk
//!   log (a temporary file, `chunk_log`), the parent manifest stays in its local copy
//!   (`manifest_file`) and is read one block's references at a time.
//! - Every chunk is hashed and compared: nothing is trusted from file sizes or times.
//! - A chunk is reused from the parent only at the same position of the same path, with the same
//!   hash, and only from a pack that still exists (the session drops missing packs first).
//! - Packs are stored create-only under the sha256 of their bytes; a pack that already exists is
//!   read back and compared, and replaced when it differs (`Store::put_content_addressed`).

use super::chunk_log::{ChunkLog, LogReader, Logged};
use crate::manifest_file::LocalManifest;
use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tidemark_format::chunk::WRITER_FRAME_SIZE;
use tidemark_format::config::RepoConfig;
use tidemark_format::manifest::{BackupStats, ChunkRef, ManifestHeader};
use tidemark_format::pack::PackBuilder;
use tidemark_format::seal::ChunkIds;
use tidemark_format::{keys, ChunkId, PackId};
use tokio::sync::mpsc;

/// Most entries the in-backup map of recently stored chunks holds: 7/8 of 2^18, the most a
/// table of 2^18 buckets takes before it doubles (≈ 23 MiB at 89 bytes per bucket; 262,144
/// entries, as before, doubled it to 2^19 buckets, 47 MiB, for the last 12% of them).
pub const RECENT_CAP: usize = 229_376;
/// Packs uploaded concurrently.
const UPLOADS: usize = 2;
/// Chunks per block handed to a worker by either backup source (1 MiB of 8 KiB chunks); a block
/// is stored with one `Packer::store` call, so it is also the longest run of chunks compressed
/// as one frame.
pub(crate) const CHUNKS_PER_BLOCK: usize = 128;

/// Where a source's files go: the system's store, its chunk and pack sizes, and the parent
/// backup to deduplicate against.
pub(crate) struct Pipeline<'a> {
    pub(crate) store: &'a Store,
    pub(crate) cfg: &'a RepoConfig,
    pub(crate) parent: Option<Arc<Parent>>,
}

/// The backup deduplicated against, and its files whose chunks must not be reused (they name
/// a pack that is missing or cut).
pub(crate) struct Parent {
    pub(crate) m: LocalManifest,
    pub(crate) unusable: HashSet<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Stored(PackId),
    New(u32),
}

/// Where a chunk is: in a pack of an earlier backup, or in a pack this backup seals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) slot: Slot,
    pub(crate) offset: u64,
    pub(crate) clen: u32,
    pub(crate) ulen: u32,
    /// Where the chunk starts in its frame's uncompressed bytes.
    pub(crate) skip: u32,
}

pub(crate) type ChunkLoc = (ChunkId, Loc);

pub(crate) struct SealedPack {
    seq: u32,
    id: PackId,
    bytes: Vec<u8>,
}

/// A file's content as stored: its chunk locations are in the chunk log, block by block.
pub(crate) struct FileDone {
    pub(crate) size: u64,
    /// The SHA-256 of the file's bytes, when the source computed it; without it the manifest
    /// records the file's chunk-list hash (`FLAG_CHUNK_LIST_HASH`).
    pub(crate) sha256: Option<ChunkId>,
    pub(crate) chunks: Vec<Logged>,
}

/// What the manifest records for one path, before chunk locations are resolved.
pub(crate) enum ItemKind {
    Dir,
    Symlink(Vec<u8>),
    /// A file whose chunks are `FileDone` under this key (absent: the file vanished).
    File(usize),
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) read_bytes: AtomicU64,
    new_chunks: AtomicU64,
    reused_chunks: AtomicU64,
    new_chunk_bytes: AtomicU64,
}

/// The state the workers of one backup share.
pub(crate) struct Shared {
    parent: Option<Arc<Parent>>,
    /// Where the workers write the chunk locations of what they stored.
    log: ChunkLog,
    recent: Mutex<HashMap<ChunkId, Loc>>,
    /// How chunks are named in this repository (keyed when it is encrypted).
    ids: ChunkIds,
    level: i32,
    chunk_size: usize,
    pack_target: usize,
    pack_seq: AtomicU32,
    pub(crate) counters: Counters,
    failed: AtomicBool,
}

/// What one run of the pipeline stored: the sealed packs by sequence number (id, size), and the
/// chunk counts.
pub(crate) struct Stored {
    packs: HashMap<u32, (PackId, u64)>,
    new_chunks: u64,
    reused_chunks: u64,
    new_chunk_bytes: u64,
    log: LogReader,
}

impl Pipeline<'_> {
    /// The workers' shared state for a backup compressed at `level`.
    pub(crate) fn shared(&self, level: i32) -> Result<Arc<Shared>> {
        Ok(Arc::new(Shared {
            parent: self.parent.clone(),
            log: ChunkLog::new()?,
            recent: Mutex::new(HashMap::new()),
            ids: self.store.chunk_ids(),
            level,
            chunk_size: self.cfg.chunk_size as usize,
            pack_target: self.cfg.pack_target as usize,
            pack_seq: AtomicU32::new(0),
            counters: Counters::default(),
            failed: AtomicBool::new(false),
        }))
    }

    /// Runs `work` on `workers` blocking threads with one pack uploader; returns each worker's
    /// output and what was stored.
    pub(crate) async fn run<R, F>(
        &self,
        shared: Arc<Shared>,
        workers: usize,
        work: F,
    ) -> Result<(Vec<R>, Stored)>
    where
        R: Send + 'static,
        F: Fn(&mut Packer<'_>) -> Result<R> + Send + Clone + 'static,
    {
        let (tx, rx) = mpsc::channel::<SealedPack>(1);
        let uploader = tokio::spawn(upload_packs(self.store.clone(), rx));
        let mut handles = Vec::new();
        for _ in 0..workers.max(1) {
            let s = shared.clone();
            let tx = tx.clone();
            let work = work.clone();
            handles.push(tokio::task::spawn_blocking(move || {
                // A worker that fails or panics stops the others: they may be waiting for a
                // block it holds (`pgdata::blocks`).
                let stop_others = StopOthers(&s.failed);
                let r = Packer::new(&s, &tx).and_then(|mut p| {
                    let out = work(&mut p)?;
                    p.finish()?;
                    Ok(out)
                });
                if r.is_ok() {
                    std::mem::forget(stop_others);
                }
                r
            }));
        }
        drop(tx);
        let mut done = Vec::new();
        let mut first_err = None;
        for w in handles {
            match w.await.context("backup worker panicked")? {
                Ok(part) => done.push(part),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let uploaded = uploader.await.context("pack uploader panicked")?;
        if let Some(e) = first_err {
            return Err(e);
        }
        // Every chunk was counted by a worker, and every worker has ended.
        let c = &shared.counters;
        Ok((
            done,
            Stored {
                packs: uploaded?,
                new_chunks: c.new_chunks.load(Ordering::Relaxed),
                reused_chunks: c.reused_chunks.load(Ordering::Relaxed),
                new_chunk_bytes: c.new_chunk_bytes.load(Ordering::Relaxed),
                log: shared.log.reader()?,
            },
        ))
    }
}

/// Marks the backup failed when dropped: on an error, and while unwinding from a panic.
struct StopOthers<'a>(&'a AtomicBool);

impl Drop for StopOthers<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Shared {
    pub(crate) fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The index of `path`'s entry in the parent manifest, when its chunks may be reused.
    pub(crate) fn parent_entry(&self, path: &str) -> Option<usize> {
        let p = self.parent.as_ref()?;
        let i = p.m.find(path)?;
        (p.m.file_head(i).is_some() && !p.unusable.contains(&i)).then_some(i)
    }

    /// Fails once any worker has failed, so that the others stop early.
    pub(crate) fn check_running(&self) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            bail!("backup aborted: another worker failed");
        }
        Ok(())
    }

    /// The parent's chunks `first..first + n` of the file at entry `entry` (fewer past its
    /// end).
    fn parent_chunks(&self, entry: Option<usize>, first: usize, n: usize) -> Result<Vec<ChunkRef>> {
        match (entry, &self.parent) {
            (Some(e), Some(p)) => p.m.chunk_range(e, first as u64, n as u64),
            _ => Ok(Vec::new()),
        }
    }

    /// The pack id of the parent's pack `i`.
    fn parent_pack(&self, i: u32) -> Option<PackId> {
        self.parent.as_ref()?.m.packs.get(i as usize).copied()
    }
}

/// One worker's end of the pipeline: its compressor and its open pack.
pub(crate) struct Packer<'a> {
    s: &'a Shared,
    tx: &'a mpsc::Sender<SealedPack>,
    compressor: tidemark_format::chunk::Compressor,
    pack: Option<(u32, PackBuilder)>,
    /// The chunks of a frame whose chunks do not follow each other in the file, put end to end.
    gathered: Vec<u8>,
}

impl<'a> Packer<'a> {
    fn new(s: &'a Shared, tx: &'a mpsc::Sender<SealedPack>) -> Result<Packer<'a>> {
        let compressor = tidemark_format::chunk::Compressor::new(s.level)
            .context("cannot create a zstd compressor")?;
        Ok(Packer {
            s,
            tx,
            compressor,
            pack: None,
            gathered: Vec::new(),
        })
    }

    pub(crate) fn shared(&self) -> &'a Shared {
        self.s
    }

    /// Stores `data`, which starts at chunk `first` of a file whose entry in the parent manifest
    /// is `parent`, and logs its chunks' locations; returns where they are in the chunk log.
    pub(crate) fn store(
        &mut self,
        data: &[u8],
        parent: Option<usize>,
        first: usize,
    ) -> Result<Logged> {
        self.s
            .counters
            .read_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let cs = self.s.chunk_size;
        let n = data.len().div_ceil(cs);
        let from_parent = self.s.parent_chunks(parent, first, n)?;
        let mut locs: Vec<ChunkLoc> = Vec::with_capacity(n);
        // New chunks of the block (indexes into `locs`, in file order) waiting to be compressed
        // as one frame. A chunk found stored does not end the run: a nightly's changed pages
        // are scattered (1.85 pages per run after a 1% update of random rows), and one frame
        // for them all instead of one per run compresses 4% smaller and half again as fast,
        // and decodes as much faster (`zstd -b1` on such pages: 2.51 at 16 KiB frames, 2.61 at
        // 256 KiB; bench/results.md).
        let mut run: Vec<usize> = Vec::new();
        let chunks: Vec<&[u8]> = data.chunks(cs).collect();
        let ids = self.s.ids.ids(&chunks);
        for (k, (&chunk, &id)) in chunks.iter().zip(&ids).enumerate() {
            let p = from_parent
                .get(k)
                .and_then(|c| Some((*c, self.s.parent_pack(c.pack)?)));
            // A chunk repeated inside the run (all-zero pages) is stored once: the run is
            // compressed first, and the repeat then found among the recent chunks.
            if run.iter().any(|&j| locs[j].0 == id) {
                self.flush(data, &mut run, &mut locs)?;
            }
            if let Some(loc) = self.known(id, p) {
                locs.push((id, loc));
                continue;
            }
            if (run.len() + 1) * cs > WRITER_FRAME_SIZE {
                self.flush(data, &mut run, &mut locs)?;
            }
            run.push(k);
            // Resolved by `flush` once the frame is compressed.
            locs.push((
                id,
                Loc {
                    slot: Slot::New(u32::MAX),
                    offset: 0,
                    clen: 0,
                    ulen: chunk.len() as u32,
                    skip: 0,
                },
            ));
        }
        self.flush(data, &mut run, &mut locs)?;
        self.s.log.append(&locs)
    }

    /// Where a chunk with id `id` is already stored: in the parent (same file, same position,
    /// same id) or among the chunks stored recently.
    fn known(&self, id: ChunkId, parent: Option<(ChunkRef, PackId)>) -> Option<Loc> {
        let s = self.s;
        let from_parent = parent.and_then(|(c, pid)| {
            (c.id == id).then_some(Loc {
                slot: Slot::Stored(pid),
                offset: c.offset,
                clen: c.clen,
                ulen: c.ulen,
                skip: c.skip,
            })
        });
        let known = from_parent.or_else(|| s.recent.lock().ok().and_then(|r| r.get(&id).copied()));
        if known.is_some() {
            s.counters.reused_chunks.fetch_add(1, Ordering::Relaxed);
        }
        known
    }

    /// Compresses the chunks `run` (chunks of `data` in file order, by index into `locs`) as
    /// one frame into the open pack, resolves their locations, and seals the pack when it
    /// reaches its target size.
    fn flush(&mut self, data: &[u8], run: &mut Vec<usize>, locs: &mut [ChunkLoc]) -> Result<()> {
        let (Some(&a), Some(&b)) = (run.first(), run.last()) else {
            return Ok(());
        };
        let s = self.s;
        let cs = s.chunk_size;
        let chunk = |k: usize| &data[k * cs..(k * cs + cs).min(data.len())];
        let bytes: &[u8] = if b - a + 1 == run.len() {
            &data[a * cs..(b * cs + cs).min(data.len())]
        } else {
            self.gathered.clear();
            for &k in run.iter() {
                self.gathered.extend_from_slice(chunk(k));
            }
            &self.gathered
        };
        let frame = self
            .compressor
            .compress(bytes)
            .context("zstd compression failed")?;
        let chunks: Vec<(ChunkId, u32)> =
            run.iter().map(|&k| (locs[k].0, locs[k].1.ulen)).collect();
        let (seq, builder) = self.pack.get_or_insert_with(|| {
            (
                s.pack_seq.fetch_add(1, Ordering::Relaxed),
                PackBuilder::new(),
            )
        });
        let seq = *seq;
        let entries = builder.push_frame(&frame, &chunks).to_vec();
        let full = builder.len() >= s.pack_target;
        let mut recent = s.recent.lock().ok();
        for (&k, e) in run.iter().zip(entries) {
            let loc = Loc {
                slot: Slot::New(seq),
                offset: e.offset,
                clen: e.clen,
                ulen: e.ulen,
                skip: e.skip,
            };
            locs[k].1 = loc;
            if let Some(r) = recent.as_mut() {
                if r.len() >= RECENT_CAP {
                    r.clear();
                }
                r.insert(e.id, loc);
            }
        }
        drop(recent);
        s.counters
            .new_chunks
            .fetch_add(run.len() as u64, Ordering::Relaxed);
        s.counters
            .new_chunk_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        run.clear();
        if full {
            self.seal()?;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<()> {
        if let Some((seq, b)) = self.pack.take() {
            if b.is_empty() {
                return Ok(());
            }
            let (id, bytes) = b.finish();
            self.tx
                .blocking_send(SealedPack { seq, id, bytes })
                .map_err(|_| anyhow!("pack upload failed; see the error above"))?;
        }
        Ok(())
    }

    /// Seals the last, partly filled pack.
    fn finish(mut self) -> Result<()> {
        self.seal()
    }
}

impl Stored {
    /// Where the chunk locations of this run are.
    #[cfg(test)]
    pub(crate) fn log(&self) -> &LogReader {
        &self.log
    }

    /// The backup's statistics, with the files `files` copied.
    pub(crate) fn stats(&self, files: &HashMap<usize, FileDone>) -> BackupStats {
        BackupStats {
            logical_bytes: files.values().map(|f| f.size).sum(),
            new_chunks: self.new_chunks,
            reused_chunks: self.reused_chunks,
            new_chunk_bytes: self.new_chunk_bytes,
            new_stored_bytes: self.packs.values().map(|(_, size)| size).sum(),
            new_objects: self.packs.len() as u64 + 1,
        }
    }

    /// Writes the manifest of `header` with `items` (in manifest order) into a temporary file;
    /// returns it and its length.
    pub(crate) fn write_manifest(
        &self,
        header: &ManifestHeader,
        items: &[(String, u32, ItemKind)],
        files: &HashMap<usize, FileDone>,
    ) -> Result<(std::fs::File, u64)> {
        super::chunk_log::write_manifest(header, items, files, &self.packs, &self.log)
    }
}

async fn upload_packs(
    store: Store,
    mut rx: mpsc::Receiver<SealedPack>,
) -> Result<HashMap<u32, (PackId, u64)>> {
    let mut ids = HashMap::new();
    let mut inflight = tokio::task::JoinSet::new();
    let mut first_err: Option<anyhow::Error> = None;
    while let Some(p) = rx.recv().await {
        while inflight.len() >= UPLOADS {
            if let Some(r) = inflight.join_next().await {
                if let Err(e) = r.context("upload task panicked").and_then(|r| r) {
                    first_err.get_or_insert(e);
                }
            }
        }
        if first_err.is_some() {
            // Keep draining so workers blocked on send observe a closed pipeline quickly.
            rx.close();
            continue;
        }
        ids.insert(p.seq, (p.id, p.bytes.len() as u64));
        let store = store.clone();
        inflight.spawn(async move {
            // A pack already stored under this id is read back and compared, never trusted
            // for existing (an earlier upload may have been cut short).
            match store
                .put_content_addressed(&keys::pack(&p.id), Bytes::from(p.bytes))
                .await
            {
                Ok(()) => {
                    crate::testhooks::crash_point("backup-mid-copy");
                    Ok(())
                }
                Err(e) => Err(anyhow::Error::new(e).context(format!("cannot store pack {}", p.id))),
            }
        });
    }
    while let Some(r) = inflight.join_next().await {
        if let Err(e) = r.context("upload task panicked").and_then(|r| r) {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(ids),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recent_map_stays_within_one_table_size_at_its_cap() {
        let mut m: HashMap<ChunkId, u8> = HashMap::new();
        for i in 0..RECENT_CAP as u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            m.insert(ChunkId(id), 0);
        }
        // A table of 2^18 buckets holds 229,376 entries; one of 2^19 would report 458,752.
        assert_eq!(m.capacity(), RECENT_CAP, "the map grew past 2^18 buckets");
    }
}
