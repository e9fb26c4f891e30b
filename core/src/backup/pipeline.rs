//! The chunk pipeline both backup sources feed: worker threads cut file data into chunks, hash
//! them, deduplicate them against the parent backup and the chunks stored recently, compress the
//! new ones into packs, and one uploader stores the sealed packs; then the chunk locations are
//! resolved into a manifest's pack table and entries.
//!
//! Invariants:
//! - Memory is bounded by (workers + 3) packs of `pack_target` bytes, the parent manifest, and the
//!   recent-chunk map of at most [`RECENT_CAP`] entries, whatever the size of the database.
//! - Every chunk is hashed and compared: nothing is trusted from file sizes or times.
//! - A chunk is reused from the parent only at the same position of the same path, with the same
//!   hash, and only from a pack that still exists (the session drops missing packs first).
//! - Packs are stored create-only under the sha256 of their bytes; a pack that already exists is
//!   read back and compared, and replaced when it differs (`Store::put_content_addressed`).

use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tidemark_format::config::RepoConfig;
use tidemark_format::manifest::{BackupStats, ChunkRef, Entry, EntryKind, FileEntry, Manifest};
use tidemark_format::pack::PackBuilder;
use tidemark_format::seal::ChunkIds;
use tidemark_format::{keys, ChunkId, PackId};
use tokio::sync::mpsc;

/// Most entries the in-backup map of recently stored chunks holds (≈ 24 MiB).
pub const RECENT_CAP: usize = 262_144;
/// Packs uploaded concurrently.
const UPLOADS: usize = 2;

/// Where a source's files go: the system's store, its chunk and pack sizes, and the parent
/// backup to deduplicate against.
pub(crate) struct Pipeline<'a> {
    pub(crate) store: &'a Store,
    pub(crate) cfg: &'a RepoConfig,
    pub(crate) parent: Option<Arc<Manifest>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Stored(PackId),
    New(u32),
}

/// Where a chunk is: in a pack of an earlier backup, or in a pack this backup seals.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Loc {
    slot: Slot,
    offset: u64,
    clen: u32,
    ulen: u32,
}

impl Loc {
    pub(crate) fn ulen(&self) -> u32 {
        self.ulen
    }
}

pub(crate) type ChunkLoc = (ChunkId, Loc);

pub(crate) struct SealedPack {
    seq: u32,
    id: PackId,
    bytes: Vec<u8>,
}

/// A file's content as stored.
pub(crate) struct FileDone {
    pub(crate) size: u64,
    pub(crate) sha256: ChunkId,
    pub(crate) chunks: Vec<ChunkLoc>,
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
    parent: Option<(Arc<Manifest>, HashMap<String, usize>)>,
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
}

impl Pipeline<'_> {
    /// The workers' shared state for a backup compressed at `level`.
    pub(crate) fn shared(&self, level: i32) -> Arc<Shared> {
        let parent = self.parent.clone().map(|m| {
            let idx = m
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.path.clone(), i))
                .collect();
            (m, idx)
        });
        Arc::new(Shared {
            parent,
            recent: Mutex::new(HashMap::new()),
            ids: self.store.chunk_ids(),
            level,
            chunk_size: self.cfg.chunk_size as usize,
            pack_target: self.cfg.pack_target as usize,
            pack_seq: AtomicU32::new(0),
            counters: Counters::default(),
            failed: AtomicBool::new(false),
        })
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
                let r = Packer::new(&s, &tx).and_then(|mut p| {
                    let out = work(&mut p)?;
                    p.finish()?;
                    Ok(out)
                });
                if r.is_err() {
                    s.failed.store(true, Ordering::Relaxed);
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
            },
        ))
    }
}

impl Shared {
    pub(crate) fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The index of `path`'s entry in the parent manifest.
    pub(crate) fn parent_entry(&self, path: &str) -> Option<usize> {
        self.parent.as_ref()?.1.get(path).copied()
    }

    /// Fails once any worker has failed, so that the others stop early.
    pub(crate) fn check_running(&self) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            bail!("backup aborted: another worker failed");
        }
        Ok(())
    }

    /// The parent's chunk at position `pos` of the file at entry `entry`, with its pack id.
    fn parent_chunk(&self, entry: usize, pos: usize) -> Option<(ChunkRef, PackId)> {
        let m = &self.parent.as_ref()?.0;
        let EntryKind::File(fe) = &m.entries.get(entry)?.kind else {
            return None;
        };
        let c = fe.chunks.get(pos)?;
        let pid = *m.packs.get(c.pack as usize)?;
        Some((*c, pid))
    }
}

/// One worker's end of the pipeline: its compressor and its open pack.
pub(crate) struct Packer<'a> {
    s: &'a Shared,
    tx: &'a mpsc::Sender<SealedPack>,
    compressor: tidemark_format::chunk::Compressor,
    pack: Option<(u32, PackBuilder)>,
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
        })
    }

    pub(crate) fn shared(&self) -> &'a Shared {
        self.s
    }

    /// Stores `data`, which starts at chunk `first` of a file whose entry in the parent manifest
    /// is `parent`, and returns its chunks' locations.
    pub(crate) fn store(
        &mut self,
        data: &[u8],
        parent: Option<usize>,
        first: usize,
    ) -> Result<Vec<ChunkLoc>> {
        self.s
            .counters
            .read_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        data.chunks(self.s.chunk_size)
            .enumerate()
            .map(|(k, chunk)| {
                let from_parent = parent.and_then(|e| self.s.parent_chunk(e, first + k));
                self.store_chunk(chunk, from_parent)
            })
            .collect()
    }

    /// Hashes one chunk and finds it in the parent (same file, same position) or among the
    /// chunks stored recently; otherwise compresses it into the open pack, sealing the pack when
    /// it reaches its target size.
    fn store_chunk(&mut self, data: &[u8], parent: Option<(ChunkRef, PackId)>) -> Result<ChunkLoc> {
        let s = self.s;
        let id = s.ids.id(data);
        let ulen = data.len() as u32;
        let from_parent = parent.and_then(|(c, pid)| {
            (c.id == id).then_some(Loc {
                slot: Slot::Stored(pid),
                offset: c.offset,
                clen: c.clen,
                ulen: c.ulen,
            })
        });
        let known = from_parent.or_else(|| s.recent.lock().ok().and_then(|r| r.get(&id).copied()));
        if let Some(loc) = known {
            s.counters.reused_chunks.fetch_add(1, Ordering::Relaxed);
            return Ok((id, loc));
        }
        let frame = self
            .compressor
            .compress(data)
            .context("zstd compression failed")?;
        let (seq, builder) = self.pack.get_or_insert_with(|| {
            (
                s.pack_seq.fetch_add(1, Ordering::Relaxed),
                PackBuilder::new(),
            )
        });
        let e = builder.push(id, &frame, ulen);
        let loc = Loc {
            slot: Slot::New(*seq),
            offset: e.offset,
            clen: e.clen,
            ulen,
        };
        let full = builder.len() >= s.pack_target;
        s.counters.new_chunks.fetch_add(1, Ordering::Relaxed);
        s.counters
            .new_chunk_bytes
            .fetch_add(ulen as u64, Ordering::Relaxed);
        if let Ok(mut r) = s.recent.lock() {
            if r.len() >= RECENT_CAP {
                r.clear();
            }
            r.insert(id, loc);
        }
        if full {
            self.seal()?;
        }
        Ok((id, loc))
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
    /// Resolves chunk locations into a manifest's pack table and entries (in the order given);
    /// returns them and the backup's statistics.
    pub(crate) fn assemble(
        &self,
        items: Vec<(String, u32, ItemKind)>,
        files: &HashMap<usize, FileDone>,
    ) -> Result<(Vec<PackId>, Vec<Entry>, BackupStats)> {
        let mut pack_table: Vec<PackId> = Vec::new();
        let mut pack_index: HashMap<PackId, u32> = HashMap::new();
        let mut entries = Vec::new();
        let mut logical = 0u64;
        for (path, mode, kind) in items {
            let kind = match kind {
                ItemKind::Dir => EntryKind::Dir,
                ItemKind::Symlink(t) => EntryKind::Symlink(t),
                ItemKind::File(i) => {
                    let Some(done) = files.get(&i) else { continue };
                    logical += done.size;
                    let mut chunks = Vec::with_capacity(done.chunks.len());
                    for (id, loc) in &done.chunks {
                        let pid = match loc.slot {
                            Slot::Stored(p) => p,
                            Slot::New(seq) => {
                                self.packs
                                    .get(&seq)
                                    .ok_or_else(|| {
                                        anyhow!("pack {seq} of this backup was never sealed")
                                    })?
                                    .0
                            }
                        };
                        let idx = *pack_index.entry(pid).or_insert_with(|| {
                            pack_table.push(pid);
                            (pack_table.len() - 1) as u32
                        });
                        chunks.push(ChunkRef {
                            id: *id,
                            pack: idx,
                            offset: loc.offset,
                            clen: loc.clen,
                            ulen: loc.ulen,
                        });
                    }
                    EntryKind::File(FileEntry {
                        size: done.size,
                        sha256: done.sha256,
                        chunks,
                    })
                }
            };
            entries.push(Entry { path, mode, kind });
        }
        let stats = BackupStats {
            logical_bytes: logical,
            new_chunks: self.new_chunks,
            reused_chunks: self.reused_chunks,
            new_chunk_bytes: self.new_chunk_bytes,
            new_stored_bytes: self.packs.values().map(|(_, size)| size).sum(),
            new_objects: self.packs.len() as u64 + 1,
        };
        Ok((pack_table, entries, stats))
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
