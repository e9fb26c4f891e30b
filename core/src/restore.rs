//! Restoring a base backup into an empty data directory and configuring recovery.
//!
//! Invariants:
//! - The backup is the newest whose stop time is at or before the target among the backups on the
//!   history of the timeline recovery will follow (`archive::choose`, shared with verify); none → an error, never a
//!   fallback to another backup.
//! - Nothing is written outside the target directory: manifest paths are validated by the
//!   decoder, files are created with O_CREAT|O_EXCL (which never follows a symlink), and
//!   symlinks recorded in the manifest are created after every file.
//! - Every chunk is verified against its id before it is written; the manifest's own checksum
//!   covers each file's chunk list, so every byte written is the byte that was backed up.
//! - A file's chunks are fetched in pack order, not file order: refs are sorted by (pack, offset)
//!   and neighbours within READ_GAP are coalesced into one range read of at most READ_MAX bytes,
//!   then each chunk is written at its own file offset. A nightly backup's files interleave the
//!   parent's packs with new ones page by page; reading in file order made one request per page.
//! - `global/pg_control` is written last, so an interrupted restore is visibly unstartable.

use crate::ranges;
use crate::repo;
use crate::store::Store;
use crate::target::{postgres_text, Target};
use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_format::manifest::{ChunkRef, EntryKind, FileEntry, Manifest, ManifestHeader};
use tidemark_format::{chunk, keys};

/// Range reads of one file in flight.
const READS_IN_FLIGHT: usize = 4;
/// Files restored concurrently.
const FILES_IN_FLIGHT: usize = 3;
const PG_CONTROL: &str = "global/pg_control";

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub target: Target,
    /// The restore_command written into postgresql.auto.conf.
    pub restore_command: String,
    /// Tablespace locations to use instead of the original ones (oid, directory).
    pub tablespace_map: Vec<(String, PathBuf)>,
}

#[derive(Clone, Debug)]
pub struct RestoreReport {
    pub backup: ManifestHeader,
    pub files: u64,
    pub bytes: u64,
}

/// Restores the backup `archive::select` chooses for the target and writes the recovery
/// configuration.
pub async fn run(store: &Store, opts: &RestoreOptions) -> Result<RestoreReport> {
    prepare_target(&opts.pgdata)?;
    repo::require_config(store).await?;
    let chosen = crate::archive::select(store, &opts.target).await?.chosen;
    run_backup(store, &chosen, opts).await
}

/// Restores `chosen` (already selected for `opts.target`, e.g. by a drill) and writes the
/// recovery configuration.
pub async fn run_backup(
    store: &Store,
    chosen: &ManifestHeader,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    prepare_target(&opts.pgdata)?;
    let major = crate::pgversion::major_of_version_num(chosen.pg_version);
    if !crate::pgversion::is_supported(major) {
        tracing::warn!(
            backup = %chosen.backup_id,
            "backup {} is of PostgreSQL {major}, which this release is not tested with: restoring it the same way (files, backup_label, recovery.signal and postgresql.auto.conf); run `tidemark-restore verify` before relying on it",
            chosen.backup_id
        );
    }
    tracing::info!(backup = %chosen.backup_id, pg_major = major, stop_time = %repo::fmt_time(chosen.stop_time_us), "restoring backup");
    let m = Arc::new(repo::load_manifest(store, &chosen.backup_id).await?);
    let root = opts.pgdata.clone();
    let tablespaces = crate::tablespace::prepare(&root, &m, &opts.tablespace_map)?;

    for e in &m.entries {
        if matches!(e.kind, EntryKind::Dir) && !tablespaces.handles(&e.path) {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(root.join(&e.path))
                .with_context(|| format!("cannot create directory {}", e.path))?;
        }
    }
    let files: Vec<usize> = m
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, EntryKind::File(_)) && e.path != PG_CONTROL)
        .map(|(i, _)| i)
        .collect();
    let mut bytes = 0u64;
    let mut count = 0u64;
    let results: Vec<u64> = futures::stream::iter(
        files
            .into_iter()
            .map(|i| restore_entry(store, &m, &root, i)),
    )
    .buffer_unordered(FILES_IN_FLIGHT)
    .try_collect()
    .await?;
    for b in results {
        bytes += b;
        count += 1;
    }
    for e in &m.entries {
        if let EntryKind::Symlink(t) = &e.kind {
            let target = std::ffi::OsString::from(String::from_utf8_lossy(t).into_owned());
            std::os::unix::fs::symlink(&target, root.join(&e.path))
                .with_context(|| format!("cannot create symlink {}", e.path))?;
        }
    }
    write_small(&root, "backup_label", &m.header.backup_label)?;
    if let Some(map) = tablespaces.tablespace_map(m.header.tablespace_map.as_deref())? {
        write_small(&root, "tablespace_map", &map)?;
    }
    write_small(&root, "recovery.signal", b"")?;
    append_recovery_settings(&root, &m.header, opts)?;
    if let Some(i) = m.entries.iter().position(|e| e.path == PG_CONTROL) {
        bytes += restore_entry(store, &m, &root, i).await?;
        count += 1;
    } else {
        bail!(
            "backup {} has no {PG_CONTROL}; it cannot be started",
            m.header.backup_id
        );
    }
    sync_dirs(&root, &m)?;
    Ok(RestoreReport {
        backup: chosen.clone(),
        files: count,
        bytes,
    })
}

/// The target must be absent or an empty directory; it ends up existing with mode 0700.
fn prepare_target(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                bail!("target directory {} is not empty\nhint: restore into a new or empty directory; tidemark never overwrites a data directory", dir.display());
            }
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .with_context(|| format!("cannot chmod {}", dir.display()))?;
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
    Ok(())
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
    ranges::coalesce(placed, |(c, _)| (c.pack, c.offset, c.clen))
}

async fn restore_entry(store: &Store, m: &Arc<Manifest>, root: &Path, i: usize) -> Result<u64> {
    let e = &m.entries[i];
    let EntryKind::File(f) = &e.kind else {
        return Ok(0);
    };
    let path = root.join(&e.path);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", e.path))?;
    let file = Arc::new(file);
    futures::stream::iter(
        plan_reads(f)
            .into_iter()
            .map(|r| read_and_write(store, m, r, &e.path, &file)),
    )
    .buffer_unordered(READS_IN_FLIGHT)
    .try_collect::<()>()
    .await?;
    let p = e.path.clone();
    tokio::task::spawn_blocking(move || file.sync_all())
        .await?
        .with_context(|| format!("cannot fsync {p}"))?;
    Ok(f.size)
}

/// Fetches one planned read, verifies each chunk against its id and writes it at its offset.
async fn read_and_write(
    store: &Store,
    m: &Arc<Manifest>,
    read: Read,
    path: &str,
    file: &Arc<std::fs::File>,
) -> Result<()> {
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
    tokio::task::spawn_blocking(move || -> Result<()> {
        for (c, file_off) in &read.items {
            let at = (c.offset - read.start) as usize;
            let frame = &bytes[at..at + c.clen as usize];
            let data = chunk::decode(&c.id, frame, c.ulen).map_err(|e| anyhow!("file {path}: chunk {} in pack {pack} is damaged: {e}\nhint: the repository is damaged; run 'tidemark-restore check --read-data' and restore from another backup", c.id))?;
            file.write_all_at(&data, *file_off)
                .with_context(|| format!("cannot write {path}"))?;
        }
        Ok(())
    })
    .await?
}

fn write_small(root: &Path, name: &str, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(root.join(name))
        .with_context(|| format!("cannot create {name}"))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Quotes a string for postgresql.conf: single quotes, embedded quotes doubled.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn append_recovery_settings(root: &Path, h: &ManifestHeader, opts: &RestoreOptions) -> Result<()> {
    let mut text = format!(
        "\n# recovery settings written by tidemark-restore (backup {})\n",
        h.backup_id
    );
    text += &format!("restore_command = {}\n", conf_quote(&opts.restore_command));
    // A backup of a server that was itself restored carries that restore's settings in its
    // postgresql.auto.conf: clear every other target so none of them silently applies.
    text += "recovery_target = ''\nrecovery_target_lsn = ''\nrecovery_target_name = ''\nrecovery_target_xid = ''\n";
    match &opts.target {
        Target::Time(t) => {
            text += &format!("recovery_target_time = {}\n", conf_quote(&postgres_text(t)));
        }
        Target::Latest => text += "recovery_target_time = ''\n",
    }
    text += "recovery_target_action = 'promote'\nrecovery_target_timeline = 'latest'\n";
    let path = root.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .context("cannot open postgresql.auto.conf")?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn sync_dirs(root: &Path, m: &Manifest) -> Result<()> {
    for e in m
        .entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Dir))
    {
        std::fs::File::open(root.join(&e.path))?.sync_all()?;
    }
    std::fs::File::open(root)?.sync_all()?;
    Ok(())
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

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
        assert_eq!(conf_quote("it's"), "'it''s'");
    }
}
