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
//!   `--archive-mode off` (the default) they include `archive_mode = off`. A restore to the end
//!   of the archive recovers in standby mode and is promoted by its restore_command when the
//!   archive ends (`promote`), so PostgreSQL skips the end-of-recovery checkpoint it waits for.
//! - Every chunk is verified against its id before it is written; the manifest's own checksum
//!   covers each file's chunk list, so every byte written is the byte that was backed up.
//! - A file is written in windows of a few MiB, each decoded in memory from whatever packs hold
//!   it and written in file order (`write`, which holds the restore's memory bound). Files start
//!   largest first, FILES_IN_FLIGHT at a time, so that small files fill the end of a restore;
//!   the files in flight share one restore's windows (`write::Slots`).
//! - `global/pg_control` is written last, so an interrupted restore is visibly unstartable.
//! - A file counts as restored only after its fsync; fdatasyncs started while it is written
//!   (`EarlySync`) only move the disk's work earlier, and an error from any of them fails the
//!   restore. The final fsyncs run behind the writes of the next files (`Syncs`), and
//!   `global/pg_control` is written only once every other file's fsync has returned.

mod delta;
mod layout;
pub mod plan;
pub mod promote;
mod recovery_conf;
pub(crate) mod safe_dir;
mod select;
mod server_conf;
mod sync;
mod write;

pub use delta::DeltaReport;
pub use recovery_conf::ArchiveMode;
pub(crate) use safe_dir::SafeDir;
use select::load;
pub(crate) use select::select_loaded;
use sync::Syncs;
use write::write_chunks;

use crate::manifest_file::LocalManifest;
use crate::repo;
use crate::store::Store;
use crate::target::Recovery;
use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_format::manifest::{HeadKind, ManifestHeader, ManifestIndex};

/// Files restored concurrently.
const FILES_IN_FLIGHT: usize = 3;

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
    // The files to write with their sizes.
    let mut files: Vec<(usize, u64)> = m
        .entries
        .iter()
        .enumerate()
        .filter(|(i, e)| matches!(e.kind, HeadKind::File(_)) && *i != layout.pg_control)
        .map(|(i, _)| (i, m.file_head(i).map_or(0, |f| f.size)))
        .collect();
    // Largest files first (stable: manifest order among equals), so that the end of a restore
    // is small files filling the places in flight rather than one 1 GiB segment alone (lab,
    // initialised nightly: median 1.745 -> 1.645 s in 12 pairs); the windows in flight are
    // shared by the files (`write::Slots`), so a segment left alone takes them all.
    files.sort_by_key(|&(_, size)| std::cmp::Reverse(size));
    let mut bytes = 0u64;
    let mut count = 0u64;
    let total = files.iter().map(|&(_, size)| size).sum();
    // A bar on a terminal, a log line every 10 s otherwise (a CronJob's or kubectl's log).
    let mut progress = crate::progress::Progress::new("restore", Some(total));
    let existing = found.take().map(|f| f.files).unwrap_or_default();
    let syncs = Syncs::new();
    let slots = write::Slots::new();
    let mut written = futures::stream::iter(files.into_iter().map(|(i, size)| {
        let (m, dest, existing, syncs, slots) = (&m, &dest, &existing, &syncs, &slots);
        async move {
            if existing.contains(&m.entries[i].path) {
                let patched = delta::patch(store, m, dest, i, syncs, slots).await?;
                Ok::<_, anyhow::Error>((size, Some(patched)))
            } else {
                Ok((restore_entry(store, m, dest, i, syncs, slots).await?, None))
            }
        }
    }))
    .buffer_unordered(FILES_IN_FLIGHT);
    while let Some((b, patched)) = written.try_next().await? {
        syncs.check()?;
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
    syncs.finish().await?;
    progress.finish();
    // Symlinks only now that every file is written, and only the tablespaces'.
    dest.tablespaces.link(&dest.root)?;
    let map = dest
        .tablespaces
        .tablespace_map(m.header.tablespace_map.as_deref())?;
    recovery_conf::write(&dest.root, &m.header, opts, &layout, map)?;
    let control = restore_entry(store, &m, &dest, layout.pg_control, &syncs, &slots).await?;
    syncs.finish().await?;
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

async fn restore_entry(
    store: &Store,
    m: &Arc<LocalManifest>,
    dest: &Dest,
    i: usize,
    syncs: &Syncs,
    slots: &write::Slots,
) -> Result<u64> {
    let e = &m.entries[i];
    let Some(size) = m.file_head(i).map(|f| f.size) else {
        return Ok(0);
    };
    let (dir, rel) = dest
        .place(&e.path)
        .with_context(|| format!("file {} has no place in the restore", e.path))?;
    let file = Arc::new(dir.create_file(rel)?);
    let direct = match write::wants_direct(size) {
        true => dir.open_direct(rel)?.map(Arc::new),
        false => None,
    };
    if direct.is_some() {
        write::preallocate(&file, size, &e.path)?;
    }
    let to = write::Out { file, direct };
    write::write_file(store, m, i, &to, slots).await?;
    drop(to.direct);
    syncs.start(to.file, &e.path).await?;
    Ok(size)
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

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
    }
}
