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
//! - A file's chunks are fetched in pack order, not file order: refs are sorted by (pack, offset)
//!   and neighbours within READ_GAP are coalesced into one range read of at most READ_MAX bytes,
//!   then each chunk is written at its own file offset. A nightly backup's files interleave the
//!   parent's packs with new ones page by page; reading in file order made one request per page.
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

/// Range reads of one file in flight.
const READS_IN_FLIGHT: usize = 4;
/// Files restored concurrently.
const FILES_IN_FLIGHT: usize = 3;
/// Most bytes of consecutive chunks gathered into one write.
const WRITE_RUN: usize = 1 << 20;

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

/// One range read of a pack and the chunks it serves, each with its offset in the file.
/// One range read of a file: its chunks with their offsets in the file.
type Read = ranges::Read<(ChunkRef, u64)>;

/// Plans a file's range reads: chunks sorted by (pack, offset), neighbours within READ_GAP
/// coalesced, each read at most READ_MAX stored bytes (a single larger chunk is read alone).
fn plan_reads(f: &FileEntry) -> Vec<Read> {
    let mut placed = Vec::with_capacity(f.chunks.len());
    let mut at = 0u64;
    for c in &f.chunks {
        placed.push((*c, at));
        at += c.ulen as u64;
    }
    coalesce(placed)
}

/// Range reads for chunks placed at their file offsets.
fn coalesce(placed: Vec<(ChunkRef, u64)>) -> Vec<Read> {
    ranges::coalesce(placed, |(c, _)| (c.pack, c.offset, c.clen))
}

/// Fetches, verifies and writes `placed` chunks of file `path` at their offsets.
async fn write_chunks(
    store: &Store,
    m: &Arc<LocalManifest>,
    path: &str,
    file: &Arc<std::fs::File>,
    placed: Vec<(ChunkRef, u64)>,
) -> Result<()> {
    write_chunks_planned(store, m, path, file, coalesce(placed)).await
}

async fn write_chunks_planned(
    store: &Store,
    m: &Arc<LocalManifest>,
    path: &str,
    file: &Arc<std::fs::File>,
    reads: Vec<Read>,
) -> Result<()> {
    let mut writes = futures::stream::iter(
        reads
            .into_iter()
            .map(|r| read_and_write(store, m, r, path, file)),
    )
    .buffer_unordered(READS_IN_FLIGHT);
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
    write_chunks_planned(store, m, &e.path, &file, plan_reads(&f)).await?;
    let p = e.path.clone();
    tokio::task::spawn_blocking(move || file.sync_all())
        .await?
        .with_context(|| format!("cannot fsync {p}"))?;
    Ok(f.size)
}

/// Fetches one planned read, verifies each chunk against its id and writes it at its offset.
async fn read_and_write(
    store: &Store,
    m: &Arc<LocalManifest>,
    read: Read,
    path: &str,
    file: &Arc<std::fs::File>,
) -> Result<u64> {
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
    let path = path.to_string();
    let file = Arc::clone(file);
    let ids = store.chunk_ids();
    tokio::task::spawn_blocking(move || -> Result<u64> {
        // Chunks that follow each other in the file are decoded into one buffer and written
        // with one call (a write per 8 KiB page cost more than its decoding).
        let mut run: Vec<u8> = Vec::with_capacity(WRITE_RUN);
        let mut run_at = 0u64;
        let flush = |run: &mut Vec<u8>, at: u64| -> Result<()> {
            if !run.is_empty() {
                file.write_all_at(run, at)
                    .with_context(|| format!("cannot write {path}"))?;
                run.clear();
            }
            Ok(())
        };
        // Chunks that follow each other both in one frame and in the file are decoded with
        // one decompression of the frame, and a frame read in several pieces (a backup that
        // reuses some of its chunks) is decompressed once for all of them.
        let items = &read.items;
        let mut group: Vec<(ChunkId, u32, u32)> = Vec::new();
        let mut frames = chunk::FrameReader::default();
        let mut i = 0;
        while i < items.len() {
            let (c0, off0) = items[i];
            let mut j = i + 1;
            while let Some(&(c, off)) = items.get(j) {
                let (p, poff) = items[j - 1];
                if (c.offset, c.clen) == (c0.offset, c0.clen)
                    && c.skip as u64 == p.skip as u64 + p.ulen as u64
                    && off == poff + p.ulen as u64
                {
                    j += 1;
                } else {
                    break;
                }
            }
            if run_at + run.len() as u64 != off0 || run.len() >= WRITE_RUN {
                flush(&mut run, run_at)?;
                run_at = off0;
            }
            let at = (c0.offset - read.start) as usize;
            let frame = &bytes[at..at + c0.clen as usize];
            group.clear();
            group.extend(items[i..j].iter().map(|(c, _)| (c.id, c.skip, c.ulen)));
            frames.append(&ids, c0.offset, frame, &group, &mut run).map_err(|e| anyhow!("file {path}: a chunk of the frame at offset {} of pack {pack} (chunk {} onwards) is damaged: {e}\nhint: the repository is damaged; run 'tidemark-restore check --read-data' and restore from another backup", c0.offset, c0.id))?;
            i = j;
        }
        flush(&mut run, run_at)?;
        // Every item of the read is written whole.
        Ok(items.iter().map(|(c, _)| c.ulen as u64).sum())
    })
    .await?
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
        let reads = plan_reads(&f);
        assert_eq!(reads.len(), 2, "{reads:?}");
        assert_eq!((reads[0].pack, reads[0].start, reads[0].end), (0, 0, 500));
        let offs: Vec<u64> = reads[0].items.iter().map(|(_, o)| *o).collect();
        assert_eq!(offs, vec![0, 16384, 32768]);
        assert_eq!((reads[1].pack, reads[1].start, reads[1].end), (1, 0, 200));
        // The same stored chunk used twice (two zero pages) is read once and written twice.
        let f = file(&[(0, 0, 100), (0, 0, 100)]);
        let reads = plan_reads(&f);
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].items.len(), 2);
        assert_eq!(reads[0].end, 100);
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
