//! Base backup from a data directory (`backup --pgdata`): pg_backup_start, a bounded parallel
//! read → hash → dedup → compress → pack → upload pipeline, pg_backup_stop, wait until the WAL from
//! the start to the stop segment is in the repository, then the manifest, written last.
//!
//! Invariants:
//! - The manifest is written only after every pack it references is durably stored and every WAL
//!   segment from start to stop LSN is archived: a listed backup is always restorable.
//! - Memory is bounded by (workers + 3) packs of `pack_target` bytes, the parent manifest, and the
//!   recent-chunk map of at most [`RECENT_CAP`] entries, whatever the size of the database.
//! - Every chunk is read, hashed and compared: nothing is trusted from file sizes or times.

use crate::pgdata::{self, Kind};
use crate::repo;
use crate::store::{Store, StoreError};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidemark_format::config::RepoConfig;
use tidemark_format::manifest::{
    self, BackupStats, ChunkRef, Entry, EntryKind, FileEntry, Manifest, ManifestHeader,
};
use tidemark_format::pack::PackBuilder;
use tidemark_format::wal::WalFileName;
use tidemark_format::{keys, ChunkId, Lsn, PackId, SystemId, TimelineId};
use tokio::sync::mpsc;

/// Most entries the in-backup map of recently stored chunks holds (≈ 24 MiB).
pub const RECENT_CAP: usize = 262_144;
/// Packs uploaded concurrently.
const UPLOADS: usize = 2;

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub pgdata: PathBuf,
    pub pg_url: Option<String>,
    pub compress_level: i32,
    pub workers: usize,
    pub archive_timeout: Duration,
    /// Back up a PostgreSQL major newer than the tested ones (pgversion::SUPPORTED).
    pub allow_untested_major: bool,
    /// Register this cluster as a new database system of the repository (repo::open_for_writer).
    pub accept_new_system: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Stored(PackId),
    New(u32),
}

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

pub(crate) struct SealedPack {
    seq: u32,
    id: PackId,
    bytes: Vec<u8>,
}

pub(crate) struct FileDone {
    pub(crate) size: u64,
    pub(crate) sha256: ChunkId,
    pub(crate) chunks: Vec<(ChunkId, Loc)>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) read_bytes: AtomicU64,
    pub(crate) new_chunks: AtomicU64,
    pub(crate) reused_chunks: AtomicU64,
    pub(crate) new_chunk_bytes: AtomicU64,
}

pub(crate) struct Shared {
    files: Vec<(usize, PathBuf, String)>,
    next: AtomicUsize,
    pub(crate) parent: Option<(Arc<Manifest>, HashMap<String, usize>)>,
    recent: Mutex<HashMap<ChunkId, Loc>>,
    level: i32,
    chunk_size: usize,
    pack_target: usize,
    pack_seq: AtomicU32,
    pub(crate) counters: Counters,
    pub(crate) failed: AtomicBool,
}

/// What the manifest records for one path, before chunk locations are resolved.
pub(crate) enum ItemKind {
    Dir,
    Symlink(Vec<u8>),
    /// A file whose chunks are `FileDone` under this key (absent: the file vanished).
    File(usize),
}

/// The non-exclusive start and stop calls of a major: PostgreSQL 15 renamed
/// `pg_start_backup(label, fast, exclusive)` / `pg_stop_backup(exclusive, wait_for_archive)` to
/// `pg_backup_start(label, fast)` / `pg_backup_stop(wait_for_archive)` and removed exclusive
/// backups. Neither call waits for archiving: tidemark waits for the WAL in the repository.
fn backup_functions(major: u32) -> (&'static str, &'static str) {
    if major < 15 {
        (
            "pg_start_backup('tidemark', true, false)",
            "pg_stop_backup(false, false)",
        )
    } else {
        ("pg_backup_start('tidemark', true)", "pg_backup_stop(false)")
    }
}

/// Takes a base backup under a backup lease (FORMAT.md section 16); returns the header of the
/// manifest written.
pub async fn run(store: &Store, opts: &BackupOptions) -> Result<ManifestHeader> {
    run_leased(store, opts).await
}

async fn run_leased(root: &Store, opts: &BackupOptions) -> Result<ManifestHeader> {
    let client = crate::pg::connect(opts.pg_url.as_deref()).await?;
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_setting('server_version_num')::int4, pg_is_in_recovery(), \
             current_setting('archive_mode'), (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size')
             FROM pg_control_system()",
            &[],
        )
        .await
        .context("cannot read the server's identity")?;
    let sysid: String = row.get(0);
    let system_id = SystemId(sysid.parse().context("system identifier is not a number")?);
    let pg_version: i32 = row.get(1);
    let in_recovery: bool = row.get(2);
    let archive_mode: String = row.get(3);
    let seg_size = u64::try_from(row.get::<_, i64>(4)).context("negative wal_segment_size")?;
    let major = crate::pgversion::check_backup_server(
        u32::try_from(pg_version).context("negative server_version_num")?,
        opts.allow_untested_major,
    )?;
    if in_recovery {
        bail!("the server is a standby; backup --pgdata copies a primary\nhint: run the backup against the primary");
    }
    if archive_mode == "off" {
        bail!("archive_mode is off, so the WAL this backup needs would never be archived\nhint: set archive_mode = on and archive_command = 'tidemark-agent wal-push %p'");
    }
    let pgdata_meta = std::fs::metadata(opts.pgdata.join("PG_VERSION"));
    if pgdata_meta.is_err() {
        bail!("{} is not a PostgreSQL data directory\nhint: pass the server's data directory as --pgdata", opts.pgdata.display());
    }
    let (store, cfg) =
        repo::open_for_writer(root, system_id, Some(major), opts.accept_new_system, true).await?;
    let store = &store;
    // The lease (FORMAT.md section 16) is taken in the system's own repository, before the
    // parent manifest is read and before any pack is written.
    let lease_handle = crate::lease::begin_backup(store, opts.archive_timeout).await?;
    let lease = &lease_handle;
    let r = async {
        let backups = repo::list_backups(store).await?;
        let parent = load_parent(store, &backups).await?;

        let row = client
            .query_one(
                &format!(
                    "SELECT {}::text, (extract(epoch from clock_timestamp()) * 1000000)::int8",
                    backup_functions(major).0
                ),
                &[],
            )
            .await
            .context("pg_backup_start failed")?;
        let start_lsn: Lsn = row.get::<_, String>(0).parse()?;
        let start_time_us: i64 = row.get(1);
        let mut backup_id = chrono::DateTime::from_timestamp_micros(start_time_us)
            .ok_or_else(|| anyhow!("server clock {start_time_us} is out of range"))?
            .format("%Y%m%dT%H%M%SZ")
            .to_string();
        if backups.iter().any(|b| b.backup_id == backup_id) {
            backup_id = format!("{backup_id}-{}", std::process::id());
        }
        let span = tracing::info_span!("backup", id = %backup_id);
        let _g = span.enter();
        tracing::info!(start_lsn = %start_lsn, "backup started");

        let pgdata = opts.pgdata.clone();
        let walked = tokio::task::spawn_blocking(move || pgdata::walk(&pgdata)).await??;
        let (files, packs, counters) = copy_files(store, &cfg, &walked, parent.clone(), opts).await?;

        let row = client
            .query_one(
                &format!(
                    "SELECT lsn::text, labelfile, spcmapfile, (extract(epoch from clock_timestamp()) * 1000000)::int8 FROM {}",
                    backup_functions(major).1
                ),
                &[],
            )
            .await
            .context("pg_backup_stop failed")?;
        let stop_lsn: Lsn = row.get::<_, String>(0).parse()?;
        let backup_label: String = row.get(1);
        let spcmap: Option<String> = row.get(2);
        let stop_time_us: i64 = row.get(3);
        let timeline = label_timeline(&backup_label)?;
        tracing::info!(stop_lsn = %stop_lsn, "backup stopped; waiting for WAL");
        wait_for_wal(
            store,
            timeline,
            start_lsn,
            stop_lsn,
            seg_size,
            opts.archive_timeout,
        )
        .await?;

        let items = walked.iter().enumerate().map(|(i, w)| {
            let kind = match &w.kind {
                Kind::Dir => ItemKind::Dir,
                Kind::Symlink(t) => ItemKind::Symlink(t.clone()),
                Kind::File => ItemKind::File(i),
            };
            (w.rel.clone(), w.mode, kind)
        });
        let (pack_table, entries, logical) = assemble(items, &files, &packs)?;
        let stats = BackupStats {
            logical_bytes: logical,
            new_chunks: counters.new_chunks.load(Ordering::Relaxed),
            reused_chunks: counters.reused_chunks.load(Ordering::Relaxed),
            new_chunk_bytes: counters.new_chunk_bytes.load(Ordering::Relaxed),
            new_stored_bytes: packs.values().map(|(_, size)| size).sum(),
            new_objects: packs.len() as u64 + 1,
        };
        let header = ManifestHeader {
            backup_id: backup_id.clone(),
            system_id,
            pg_version: pg_version as u32,
            timeline,
            start_lsn,
            stop_lsn,
            start_time_us,
            stop_time_us,
            source: manifest::SOURCE_PGDATA,
            flags: 0,
            chunk_size: cfg.chunk_size,
            parent: parent.as_ref().map(|p| p.header.backup_id.clone()),
            backup_label: backup_label.into_bytes(),
            tablespace_map: spcmap.filter(|s| !s.is_empty()).map(String::into_bytes),
            stats,
        };
        commit(store, lease, header, pack_table, entries).await
    }
    .await;
    if let Err(e) = lease_handle.release().await {
        tracing::warn!(error = %format!("{e:#}"), "cannot release the backup lease; it expires on its own");
    }
    r
}

/// Writes a finished backup's manifest (create-only, after checking the backup lease is still
/// held): the backup exists from this moment. Shared by both backup sources.
pub(crate) async fn commit(
    store: &Store,
    lease: &crate::lease::LeaseHandle,
    header: ManifestHeader,
    packs: Vec<PackId>,
    entries: Vec<Entry>,
) -> Result<ManifestHeader> {
    let stats = header.stats;
    let backup_id = header.backup_id.clone();
    let m = Manifest {
        header,
        packs,
        entries,
    };
    lease.check().await?;
    store
        .put_create(&keys::manifest(&backup_id), Bytes::from(m.encode()))
        .await
        .with_context(|| format!("cannot write the manifest of backup {backup_id}"))?;
    tracing::info!(
        logical_bytes = stats.logical_bytes,
        stored_bytes = stats.new_stored_bytes,
        objects = stats.new_objects,
        "backup complete"
    );
    Ok(m.header)
}

/// The newest backup's manifest, to deduplicate against, without chunks in packs that are gone
/// (deleted out of band or by GC).
pub(crate) async fn load_parent(
    store: &Store,
    backups: &[ManifestHeader],
) -> Result<Option<Arc<Manifest>>> {
    match backups.last() {
        Some(h) => {
            let mut m = repo::load_manifest(store, &h.backup_id).await?;
            crate::gc::drop_missing_packs(store, &mut m).await?;
            Ok(Some(Arc::new(m)))
        }
        None => Ok(None),
    }
}

/// Resolves chunk locations into a manifest's pack table and entries (in the order given);
/// returns them and the sum of the file sizes.
pub(crate) fn assemble(
    items: impl Iterator<Item = (String, u32, ItemKind)>,
    files: &HashMap<usize, FileDone>,
    packs: &HashMap<u32, (PackId, u64)>,
) -> Result<(Vec<PackId>, Vec<Entry>, u64)> {
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
                            packs
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
    Ok((pack_table, entries, logical))
}

/// The `START TIMELINE:` of a backup_label.
pub(crate) fn label_timeline(label: &str) -> Result<TimelineId> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE: "))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|t| *t > 0)
        .map(TimelineId)
        .ok_or_else(|| {
            anyhow!("backup_label returned by pg_backup_stop has no START TIMELINE line")
        })
}

/// Waits until every WAL segment from `start` to `stop` on `tli` is in the repository.
pub(crate) async fn wait_for_wal(
    store: &Store,
    tli: TimelineId,
    start: Lsn,
    stop: Lsn,
    seg_size: u64,
    timeout: Duration,
) -> Result<()> {
    let first = start.0 / seg_size;
    let last = stop.0.saturating_sub(1).max(start.0) / seg_size;
    let deadline = Instant::now() + timeout;
    for segno in first..=last {
        let name = WalFileName::segment_of(tli, Lsn(segno * seg_size), seg_size);
        let key = keys::wal(&name);
        loop {
            if store.head(&key).await?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("wal segment {name} needed by this backup was not archived within {}s\nhint: check that archive_command is 'tidemark-agent wal-push %p' with the same --repo, and the server log for archiver errors", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

async fn copy_files(
    store: &Store,
    cfg: &RepoConfig,
    walked: &[pgdata::WalkEntry],
    parent: Option<Arc<Manifest>>,
    opts: &BackupOptions,
) -> Result<(
    HashMap<usize, FileDone>,
    HashMap<u32, (PackId, u64)>,
    Counters,
)> {
    let files = walked
        .iter()
        .enumerate()
        .filter(|(_, w)| w.kind == Kind::File)
        .map(|(i, w)| (i, w.abs.clone(), w.rel.clone()))
        .collect();
    let parent = index_parent(parent);
    let shared = Arc::new(Shared::new(files, parent, cfg, opts.compress_level));
    let progress = tokio::spawn(log_progress(shared.clone()));
    let r = run_workers(store, shared, opts.workers, worker).await;
    progress.abort();
    // Wait until the progress task is gone: it holds a clone of the shared state.
    let _ = progress.await;
    let (parts, packs, shared) = r?;
    let done = parts.into_iter().flatten().collect();
    let shared = Arc::try_unwrap(shared)
        .map_err(|_| anyhow!("backup workers still hold the shared state"))?;
    Ok((done, packs, shared.counters))
}

impl Shared {
    pub(crate) fn new(
        files: Vec<(usize, PathBuf, String)>,
        parent: Option<(Arc<Manifest>, HashMap<String, usize>)>,
        cfg: &RepoConfig,
        level: i32,
    ) -> Shared {
        Shared {
            files,
            next: AtomicUsize::new(0),
            parent,
            recent: Mutex::new(HashMap::new()),
            level,
            chunk_size: cfg.chunk_size as usize,
            pack_target: cfg.pack_target as usize,
            pack_seq: AtomicU32::new(0),
            counters: Counters::default(),
            failed: AtomicBool::new(false),
        }
    }

    pub(crate) fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    pub(crate) fn level(&self) -> i32 {
        self.level
    }
}

/// The parent manifest indexed by path.
pub(crate) fn index_parent(
    parent: Option<Arc<Manifest>>,
) -> Option<(Arc<Manifest>, HashMap<String, usize>)> {
    parent.map(|m| {
        let idx = m
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        (m, idx)
    })
}

/// Runs `work` on `workers` blocking threads with one pack uploader; returns each worker's
/// output, the sealed packs by sequence number, and the shared state back.
pub(crate) async fn run_workers<R, F>(
    store: &Store,
    shared: Arc<Shared>,
    workers: usize,
    work: F,
) -> Result<(Vec<R>, HashMap<u32, (PackId, u64)>, Arc<Shared>)>
where
    R: Send + 'static,
    F: Fn(&Shared, &mpsc::Sender<SealedPack>) -> Result<R> + Send + Clone + 'static,
{
    let (tx, rx) = mpsc::channel::<SealedPack>(1);
    let uploader = tokio::spawn(upload_packs(store.clone(), rx));
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let s = shared.clone();
        let tx = tx.clone();
        let work = work.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            let r = work(&s, &tx);
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
    Ok((done, uploaded?, shared))
}

async fn log_progress(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        tracing::info!(
            files_done = s.next.load(Ordering::Relaxed).min(s.files.len()),
            files_total = s.files.len(),
            bytes_read = s.counters.read_bytes.load(Ordering::Relaxed),
            "backup progress"
        );
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
            match store
                .put_create(&keys::pack(&p.id), Bytes::from(p.bytes))
                .await
            {
                // Same key means same content: pack ids are the sha256 of the pack bytes.
                Ok(()) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
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

/// One CPU worker: takes files in order, chunks, hashes, dedups, compresses and packs them.
fn worker(s: &Shared, tx: &mpsc::Sender<SealedPack>) -> Result<Vec<(usize, FileDone)>> {
    let mut out = Vec::new();
    let mut compressor =
        zstd::bulk::Compressor::new(s.level).context("cannot create a zstd compressor")?;
    let mut pack: Option<(u32, PackBuilder)> = None;
    let mut buf = vec![0u8; s.chunk_size * 128];
    loop {
        if s.failed.load(Ordering::Relaxed) {
            bail!("backup aborted: another worker failed");
        }
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        let Some((idx, abs, rel)) = s.files.get(i) else {
            break;
        };
        let mut f = match std::fs::File::open(abs) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // vanished: WAL replay recreates it
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", abs.display())),
        };
        let parent_chunks = s.parent.as_ref().and_then(|(m, idx)| {
            match idx.get(rel).map(|&i| &m.entries[i].kind) {
                Some(EntryKind::File(fe)) => Some((m, fe)),
                _ => None,
            }
        });
        let mut whole = Sha256::new();
        let mut chunks = Vec::new();
        let mut size = 0u64;
        loop {
            let n = read_full(&mut f, &mut buf)
                .with_context(|| format!("cannot read {}", abs.display()))?;
            if n == 0 {
                break;
            }
            s.counters.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
            whole.update(&buf[..n]);
            for data in buf[..n].chunks(s.chunk_size) {
                let parent_ref = parent_chunks.and_then(|(m, fe)| parent_ref(m, fe, chunks.len()));
                chunks.push(store_chunk(
                    s,
                    &mut compressor,
                    &mut pack,
                    tx,
                    data,
                    parent_ref,
                )?);
            }
            size += n as u64;
        }
        let sha256 = ChunkId(whole.finalize().into());
        tracing::debug!(file = %rel, size, "file copied");
        out.push((
            *idx,
            FileDone {
                size,
                sha256,
                chunks,
            },
        ));
    }
    seal(pack.take(), tx)?;
    Ok(out)
}

/// The parent's chunk at position `pos` of file `fe`, with its pack id.
pub(crate) fn parent_ref(m: &Manifest, fe: &FileEntry, pos: usize) -> Option<(ChunkRef, PackId)> {
    let c = fe.chunks.get(pos)?;
    let pid = *m.packs.get(c.pack as usize)?;
    Some((*c, pid))
}

/// Hashes one chunk and finds it in the parent (same file, same position) or among the
/// chunks stored recently; otherwise compresses it into the open pack, sealing the pack when it
/// reaches its target size.
pub(crate) fn store_chunk(
    s: &Shared,
    compressor: &mut zstd::bulk::Compressor<'_>,
    pack: &mut Option<(u32, PackBuilder)>,
    tx: &mpsc::Sender<SealedPack>,
    data: &[u8],
    parent: Option<(ChunkRef, PackId)>,
) -> Result<(ChunkId, Loc)> {
    let id = ChunkId::of(data);
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
    let frame = compressor
        .compress(data)
        .context("zstd compression failed")?;
    let (seq, builder) = pack.get_or_insert_with(|| {
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
    if builder.len() >= s.pack_target {
        seal(pack.take(), tx)?;
    }
    Ok((id, loc))
}

pub(crate) fn seal(pack: Option<(u32, PackBuilder)>, tx: &mpsc::Sender<SealedPack>) -> Result<()> {
    if let Some((seq, b)) = pack {
        if b.is_empty() {
            return Ok(());
        }
        let (id, bytes) = b.finish();
        tx.blocking_send(SealedPack { seq, id, bytes })
            .map_err(|_| anyhow!("pack upload failed; see the error above"))?;
    }
    Ok(())
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_from_label() {
        let l = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-21 20:40:12 UTC\nLABEL: tidemark\nSTART TIMELINE: 3\n";
        assert_eq!(label_timeline(l).unwrap(), TimelineId(3));
        assert!(label_timeline("nothing").is_err());
    }
}
