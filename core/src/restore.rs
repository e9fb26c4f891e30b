//! Restoring a base backup into an empty data directory and configuring recovery.
//!
//! Invariants:
//! - The backup is the newest that can reach the target (stopped at or before a target time or
//!   LSN) among the backups on the history of the timeline recovery will follow, or the one
//!   `--backup` names if it can (`archive::choose`, shared with verify); none → an error, never a
//!   fallback to another backup.
//! - Nothing is written outside the target directory and its tablespaces' directories, and
//!   nothing is written through a symlink: the decoder refuses a manifest with a path that is
//!   not plain and relative or that continues below anything but a directory entry (FORMAT.md
//!   8.4.5); `layout::check` and `tablespace::prepare` refuse what a restore will not write
//!   (symlinks at `pg_tblspc/*` or `postgresql.auto.conf`, files the restore writes itself,
//!   tablespace locations inside the target or in use) before anything is written; every path
//!   is created below an open directory descriptor with O_NOFOLLOW and files with O_EXCL
//!   ([`SafeDir`]). The only symlinks created are the tablespaces' `pg_tblspc/<oid>`, after
//!   every file; other symlink entries are left out with a warning.
//! - The recovery settings go into a new `postgresql.auto.conf` (`recovery_conf`); with
//!   `--archive-mode off` (the default) they include `archive_mode = off`.
//! - Every chunk is verified against its id before it is written; the manifest's own checksum
//!   covers each file's chunk list, so every byte written is the byte that was backed up.
//! - A file is restored in windows of WINDOW bytes ([`Window`]): a window's chunks are fetched
//!   in pack order, not file order (refs sorted by (pack, offset), neighbours within READ_GAP
//!   coalesced into one range read of at most READ_MAX bytes), decoded into one buffer at their
//!   places, and written in file order, one call per run of consecutive chunks. A nightly
//!   backup's files interleave the parent's packs with new ones page by page: reading in file
//!   order made one request per page, and writing each read's chunks where they go left holes
//!   filled 8 KiB at a time (the kernel's per-file work then cost more than the decoding).
//! - `global/pg_control` is written last, so an interrupted restore is visibly unstartable.
//! - A file counts as restored only after its fsync; fdatasyncs started while it is written
//!   (`EarlySync`) only move the disk's work earlier, and an error from any of them fails the
//!   restore.

mod delta;
mod layout;
pub mod plan;
mod recovery_conf;
pub(crate) mod safe_dir;
mod select;

pub use delta::DeltaReport;
pub use recovery_conf::ArchiveMode;
pub(crate) use safe_dir::SafeDir;
use select::load;
pub(crate) use select::select_loaded;

use crate::manifest_file::LocalManifest;
use crate::ranges;
use crate::repo;
use crate::store::Store;
use crate::target::Recovery;
use anyhow::{anyhow, bail, Context, Result};
use futures::{FutureExt, StreamExt, TryStreamExt};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_format::manifest::{ChunkRef, FileEntry, HeadKind, ManifestHeader, ManifestIndex};
use tidemark_format::{chunk, keys, ChunkId};

/// Range reads of one window in flight.
const READS_IN_FLIGHT: usize = 2;
/// Windows of one file in flight.
const WINDOWS_IN_FLIGHT: usize = 3;
/// Files restored concurrently.
const FILES_IN_FLIGHT: usize = 3;
/// Bytes of a file restored in memory and written with one call (a [`Window`]).
const WINDOW: u64 = 4 << 20;

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    /// The target and its settings (inclusive, action, timeline).
    pub recovery: Recovery,
    /// `--backup ID`: restore this backup, refused if it cannot reach the target.
    pub backup: Option<String>,
    /// The restore_command written into postgresql.auto.conf.
    pub restore_command: String,
    /// Tablespace locations to use instead of the original ones (oid, directory).
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// Whether the recovery settings turn WAL archiving off.
    pub archive_mode: ArchiveMode,
    /// `--delta`: restore over an existing data directory of the same system, writing only
    /// what differs (an absent or empty directory is restored as usual).
    pub delta: bool,
    /// `--standby`: restore as a standby (`recovery` then holds no target).
    pub standby: Option<crate::target::Standby>,
}

#[derive(Clone, Debug)]
pub struct RestoreReport {
    pub backup: ManifestHeader,
    pub files: u64,
    pub bytes: u64,
    /// Symlink entries of the backup left out: (path, target as recorded).
    pub skipped_links: Vec<(String, String)>,
    /// What a delta restore kept, wrote and removed (`None`: a restore into an empty directory).
    pub delta: Option<DeltaReport>,
}

/// Where a restore writes: the target directory and the tablespaces' directories, open.
struct Dest {
    root: SafeDir,
    tablespaces: crate::tablespace::Plan,
}

impl Dest {
    /// The directory a manifest path is created in and its path there (`None`: a tablespace's
    /// `pg_tblspc/<oid>`, linked at the end).
    fn place<'a>(&'a self, path: &'a str) -> Option<(&'a SafeDir, &'a str)> {
        self.tablespaces.place(&self.root, path)
    }
}

/// Restores the backup `archive::select` chooses for the target and writes the recovery
/// configuration.
pub async fn run(store: &Store, opts: &RestoreOptions) -> Result<RestoreReport> {
    let delta = prepare_target(&opts.pgdata, opts.delta)?;
    repo::require_config(store).await?;
    opts.recovery.check()?;
    let want = crate::archive::Want {
        target: opts.recovery.target.clone(),
        timeline: opts.recovery.timeline,
        backup: opts.backup.clone(),
    };
    let (sel, m) = select_loaded(store, &want).await?;
    run_loaded(store, &sel.chosen, Arc::new(m), opts, delta).await
}

/// Restores `chosen` (already selected for `opts.recovery`, e.g. by a drill) and writes the
/// recovery configuration.
pub async fn run_backup(
    store: &Store,
    chosen: &ManifestHeader,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let delta = prepare_target(&opts.pgdata, opts.delta)?;
    let m = Arc::new(load(store, &chosen.backup_id).await?);
    run_loaded(store, chosen, m, opts, delta).await
}

/// Restores `chosen`, whose manifest `m` is, into the target `prepare_target` checked (`delta`:
/// it holds a data directory to restore over), and writes the recovery configuration.
async fn run_loaded(
    store: &Store,
    chosen: &ManifestHeader,
    m: Arc<LocalManifest>,
    opts: &RestoreOptions,
    delta: bool,
) -> Result<RestoreReport> {
    let major = crate::pgversion::major_of_version_num(chosen.pg_version);
    if !crate::pgversion::is_supported(major) {
        tracing::warn!(
            backup = %chosen.backup_id,
            "backup {} is of PostgreSQL {major}, which this release is not tested with: restoring it the same way (files, backup_label, recovery.signal and postgresql.auto.conf); run `tidemark-restore verify` before relying on it",
            chosen.backup_id
        );
    }
    tracing::info!(backup = %chosen.backup_id, pg_major = major, stop_time = %repo::fmt_time(chosen.stop_time_us), "restoring backup");
    // Everything a restore refuses is refused here, before anything is written.
    let layout = layout::check(&m)?;
    let root = SafeDir::open(&opts.pgdata)?;
    let tablespaces = crate::tablespace::prepare(&opts.pgdata, &m, &opts.tablespace_map)?;
    let dest = Dest { root, tablespaces };
    let mut found = match delta {
        true => Some(delta::begin(&dest.root, &m)?),
        false => None,
    };
    for (path, target) in &layout.skipped_links {
        tracing::warn!(
            backup = %m.header.backup_id,
            path = %path,
            link_target = %target,
            "backup {} holds {path} as a symlink to {target}: left out, since a restore creates no symlink a backup names (the restored server would read or write through it outside its data directory); if this server needs it, create it by hand before starting PostgreSQL",
            m.header.backup_id
        );
    }

    for e in &m.entries {
        if matches!(e.kind, HeadKind::Dir)
            && !found.as_ref().is_some_and(|f| f.dirs.contains(&e.path))
        {
            if let Some((dir, rel)) = dest.place(&e.path) {
                dir.mkdir(rel, 0o700)?;
            }
        }
    }
    let mut report = found.as_ref().map(|f| DeltaReport {
        entries_removed: f.removed,
        ..DeltaReport::default()
    });
    let files: Vec<usize> = m
        .entries
        .iter()
        .enumerate()
        .filter(|(i, e)| matches!(e.kind, HeadKind::File(_)) && *i != layout.pg_control)
        .map(|(i, _)| i)
        .collect();
    let mut bytes = 0u64;
    let mut count = 0u64;
    let total = files
        .iter()
        .map(|&i| m.file_head(i).map_or(0, |f| f.size))
        .sum();
    // A bar on a terminal, a log line every 10 s otherwise (a CronJob's or kubectl's log).
    let mut progress = crate::progress::Progress::new("restore", Some(total));
    let existing = found.take().map(|f| f.files).unwrap_or_default();
    let mut written = futures::stream::iter(files.into_iter().map(|i| {
        let (m, dest, existing) = (&m, &dest, &existing);
        async move {
            let size = m.file_head(i).map_or(0, |f| f.size);
            if existing.contains(&m.entries[i].path) {
                Ok::<_, anyhow::Error>((size, Some(delta::patch(store, m, dest, i).await?)))
            } else {
                Ok((restore_entry(store, m, dest, i).await?, None))
            }
        }
    }))
    .buffer_unordered(FILES_IN_FLIGHT);
    while let Some((b, patched)) = written.try_next().await? {
        bytes += b;
        count += 1;
        progress.add(b);
        if let Some(r) = report.as_mut() {
            match patched {
                Some(0) => r.files_kept += 1,
                Some(w) => {
                    r.files_patched += 1;
                    r.bytes_written += w;
                }
                None => {
                    r.files_created += 1;
                    r.bytes_written += b;
                }
            }
        }
    }
    drop(written);
    progress.finish();
    // Symlinks only now that every file is written, and only the tablespaces'.
    dest.tablespaces.link(&dest.root)?;
    let map = dest
        .tablespaces
        .tablespace_map(m.header.tablespace_map.as_deref())?;
    recovery_conf::write(&dest.root, &m.header, opts, &layout, map)?;
    let control = restore_entry(store, &m, &dest, layout.pg_control).await?;
    bytes += control;
    count += 1;
    if let Some(r) = report.as_mut() {
        r.bytes_written += control;
        delta::finish(&dest.root)?;
    }
    sync_dirs(&dest, &m)?;
    Ok(RestoreReport {
        backup: chosen.clone(),
        files: count,
        bytes,
        skipped_links: layout.skipped_links,
        delta: report,
    })
}

/// The target must be absent or an empty directory, or with `delta` any directory; it ends up
/// existing with mode 0700. Returns whether it holds anything (a delta restore then).
fn prepare_target(dir: &Path, delta: bool) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            let full = rd.next().is_some();
            if full && !delta {
                bail!("target directory {} is not empty\nhint: restore into a new or empty directory, or restore over a stopped data directory of the same cluster with --delta (only what differs is written)", dir.display());
            }
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .with_context(|| format!("cannot chmod {}", dir.display()))?;
            return Ok(full);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create target directory {}", dir.display()))?;
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read target directory {}", dir.display()))
        }
    }
    Ok(false)
}

/// One range read of a file: its chunks with their offsets in the file.
type Read = ranges::Read<(ChunkRef, u64)>;

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

/// Plans the windows of `placed` chunks (each with its file offset, not overlapping): a window starts at a chunk and takes every chunk that starts before the next
/// multiple of WINDOW, so a whole file's windows start at multiples of WINDOW and the frames
/// of a full backup (aligned with its 1 MiB blocks) are never split between two windows.
fn plan_windows(mut placed: Vec<(ChunkRef, u64)>) -> Vec<Window> {
    placed.sort_by_key(|&(_, off)| off);
    let mut out = Vec::new();
    let mut cur: Vec<(ChunkRef, u64)> = Vec::new();
    for p in placed {
        if cur
            .first()
            .is_some_and(|&(_, at)| p.1 >= (at / WINDOW + 1) * WINDOW)
        {
            out.push(window(std::mem::take(&mut cur)));
        }
        cur.push(p);
    }
    if !cur.is_empty() {
        out.push(window(cur));
    }
    out
}

/// The window of `placed` chunks (non-empty, in file order).
fn window(placed: Vec<(ChunkRef, u64)>) -> Window {
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

/// The windows of a whole file.
fn plan_file(f: &FileEntry) -> Vec<Window> {
    let mut placed = Vec::with_capacity(f.chunks.len());
    let mut at = 0u64;
    for c in &f.chunks {
        placed.push((*c, at));
        at += c.ulen as u64;
    }
    plan_windows(placed)
}

/// Fetches, verifies and writes `placed` chunks of file `path` at their
/// offsets.
async fn write_chunks(
    store: &Store,
    m: &Arc<LocalManifest>,
    path: &str,
    file: &Arc<std::fs::File>,
    placed: Vec<(ChunkRef, u64)>,
) -> Result<()> {
    write_windows(store, m, path, file, plan_windows(placed)).await
}

async fn write_windows(
    store: &Store,
    m: &Arc<LocalManifest>,
    path: &str,
    file: &Arc<std::fs::File>,
    windows: Vec<Window>,
) -> Result<()> {
    let buffers = Buffers::default();
    let mut writes = futures::stream::iter(
        windows
            .into_iter()
            .map(|w| restore_window(store, m, w, path, file, &buffers)),
    )
    .buffer_unordered(WINDOWS_IN_FLIGHT);
    let mut early = EarlySync::new(file, path);
    while let Some(n) = writes.try_next().await? {
        early.written(n)?;
    }
    early.finish().await
}

/// Bytes written to one file between two early fdatasyncs (`EarlySync`).
const SYNC_EVERY: u64 = 64 << 20;

/// Gets a file's written bytes to disk while the rest of the restore still decodes. The
/// kernel starts writing dirty pages back by itself only once they pass a share of memory (10%
/// by default), so without this a restore decodes everything first and then waits for the
/// whole data directory in its final fsyncs. Every SYNC_EVERY bytes, an fdatasync of the file
/// starts on a blocking thread (one at a time per file, nothing waits for it) and the final
/// fsync waits only for what is left. An early fdatasync's error fails the restore: after a
/// failed fdatasync the kernel may count the pages clean, so a later fsync could succeed
/// without them on disk.
struct EarlySync<'a> {
    file: &'a Arc<std::fs::File>,
    path: &'a str,
    since: u64,
    running: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl<'a> EarlySync<'a> {
    fn new(file: &'a Arc<std::fs::File>, path: &'a str) -> Self {
        EarlySync {
            file,
            path,
            since: 0,
            running: None,
        }
    }

    fn written(&mut self, bytes: u64) -> Result<()> {
        self.since += bytes;
        if self.since < SYNC_EVERY {
            return Ok(());
        }
        if let Some(h) = self.running.as_mut() {
            match h.now_or_never() {
                // Still running: the next one starts after it.
                None => return Ok(()),
                Some(r) => r?.with_context(|| format!("cannot fdatasync {}", self.path))?,
            }
        }
        let file = Arc::clone(self.file);
        self.running = Some(tokio::task::spawn_blocking(move || file.sync_data()));
        self.since = 0;
        Ok(())
    }

    async fn finish(self) -> Result<()> {
        if let Some(h) = self.running {
            h.await?
                .with_context(|| format!("cannot fdatasync {}", self.path))?;
        }
        Ok(())
    }
}

async fn restore_entry(
    store: &Store,
    m: &Arc<LocalManifest>,
    dest: &Dest,
    i: usize,
) -> Result<u64> {
    let e = &m.entries[i];
    if m.file_head(i).is_none() {
        return Ok(0);
    }
    let f = m.file(i)?;
    let (dir, rel) = dest
        .place(&e.path)
        .with_context(|| format!("file {} has no place in the restore", e.path))?;
    let file = Arc::new(dir.create_file(rel)?);
    write_windows(store, m, &e.path, &file, plan_file(&f)).await?;
    let p = e.path.clone();
    tokio::task::spawn_blocking(move || file.sync_all())
        .await?
        .with_context(|| format!("cannot fsync {p}"))?;
    Ok(f.size)
}

/// The window buffers of one file, kept for its next windows (at most WINDOWS_IN_FLIGHT): a
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

/// Restores one window: fetches its reads (READS_IN_FLIGHT at a time), decodes each into the
/// window's buffer as it arrives, then writes the window's runs. Returns the bytes written.
async fn restore_window(
    store: &Store,
    m: &Arc<LocalManifest>,
    w: Window,
    path: &str,
    file: &Arc<std::fs::File>,
    buffers: &Buffers,
) -> Result<u64> {
    let Window {
        at,
        len,
        runs,
        reads,
    } = w;
    let mut buf = buffers.take(len);
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
        buf = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            decode_read(&ids, &read, &bytes, &mut buf[..len], at).map_err(|(offset, id, e)| {
                anyhow!("file {path}: a chunk of the frame at offset {offset} of pack {pack} (chunk {id} onwards) is damaged: {e}\nhint: the repository is damaged; run 'tidemark-restore check --read-data' and restore from another backup")
            })?;
            Ok(buf)
        })
        .await??;
    }
    let (file, path, pool) = (Arc::clone(file), path.to_string(), Arc::clone(&buffers.0));
    tokio::task::spawn_blocking(move || -> Result<u64> {
        for &(off, n) in &runs {
            let from = (off - at) as usize;
            file.write_all_at(&buf[from..from + n], off)
                .with_context(|| format!("cannot write {path}"))?;
        }
        Buffers::give(&pool, buf);
        Ok(runs.iter().map(|&(_, n)| n as u64).sum())
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
/// offset `at`, verifying each against its id. Chunks that follow each other both in one frame
/// and in the file are decoded with one decompression of the frame, and a frame read in
/// several pieces (a backup that reuses some of its chunks) is decompressed once for all. An
/// error names the damaged frame (its offset in the pack, its first chunk wanted).
fn decode_read(
    ids: &tidemark_format::seal::ChunkIds,
    read: &Read,
    bytes: &[u8],
    buf: &mut [u8],
    at: u64,
) -> std::result::Result<(), (u64, ChunkId, String)> {
    let items = &read.items;
    let mut group: Vec<(ChunkId, u32, u32)> = Vec::new();
    let mut frames = chunk::FrameReader::default();
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
            .read_into(ids, c0.offset, frame, &group, dst)
            .map_err(|e| damaged(&e))?;
        i = j;
    }
    Ok(())
}

fn sync_dirs(dest: &Dest, m: &ManifestIndex) -> Result<()> {
    for e in m.entries.iter().filter(|e| matches!(e.kind, HeadKind::Dir)) {
        if let Some((dir, rel)) = dest.place(&e.path) {
            dir.open_dir(rel)?.sync()?;
        }
    }
    for d in dest.tablespaces.dirs() {
        d.sync()?;
    }
    dest.root.sync()
}

/// Shell-quotes one word for restore_command (run by /bin/sh).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.:=@%+-,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn early_syncs_start_every_sync_every_bytes_one_at_a_time_and_finish() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(std::fs::File::create(dir.path().join("f")).unwrap());
        let mut early = EarlySync::new(&file, "f");
        early.written(SYNC_EVERY - 1).unwrap();
        assert!(early.running.is_none());
        early.written(1).unwrap();
        assert!(early.running.is_some());
        assert_eq!(early.since, 0);
        // Once it has finished, the next mark joins it (its result checked) and starts another.
        while !early.running.as_ref().unwrap().is_finished() {
            tokio::task::yield_now().await;
        }
        early.written(SYNC_EVERY).unwrap();
        assert_eq!(
            early.since, 0,
            "the finished one was joined and a new one started"
        );
        early.finish().await.unwrap();
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
    }
}
