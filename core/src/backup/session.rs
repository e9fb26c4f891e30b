//! One base backup from start to manifest, whatever its source: the server's identity and
//! major are checked, the system's repository is opened and the backup lease taken in it, the
//! parent is loaded (while the server starts the backup), the backup is named, the source copies
//! the files through the pipeline, the manifest is prepared in a temporary file while the WAL
//! from start to stop is awaited, and once that WAL is archived the manifest is stored.
//!
//! Invariants:
//! - The lease (FORMAT.md section 16) is taken in the system's own repository before the parent
//!   manifest is read and before any pack is written, and released whatever happened.
//! - The manifest is stored only after every pack it references is durably stored and every WAL
//!   segment from start to stop LSN is archived, create-only, and only while the lease is still
//!   held: a listed backup is always restorable.

use super::pipeline::{FileDone, ItemKind, Parent, Pipeline, Stored};
use crate::lease::LeaseHandle;
use crate::manifest_file::LocalManifest;
use crate::repo;
use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark_format::config::RepoConfig;
use tidemark_format::manifest::{self, ManifestHeader};
use tidemark_format::wal::WalFileName;
use tidemark_format::{keys, Lsn, SystemId, TimelineId};
use tracing::Instrument;

/// What the session needs of a backup command's options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// Back up a PostgreSQL major newer than the tested ones (pgversion::SUPPORTED).
    pub(crate) allow_untested_major: bool,
    /// Register this cluster as a new database system of the repository (repo::open_for_writer).
    pub(crate) accept_new_system: bool,
    /// How long the backup's WAL may take to reach the repository, and how long the backup waits
    /// for a running expire to end.
    pub(crate) archive_timeout: Duration,
}

/// The [`Settings`] of a backup command's options: both options types name these fields alike.
macro_rules! settings_of {
    ($opts:expr) => {
        $crate::backup::session::Settings {
            allow_untested_major: $opts.allow_untested_major,
            accept_new_system: $opts.accept_new_system,
            archive_timeout: $opts.archive_timeout,
        }
    };
}
pub(crate) use settings_of;

/// Who the server is, as a source reads it before the backup starts.
pub(crate) struct Server {
    pub(crate) system_id: SystemId,
    pub(crate) pg_version: u32,
    pub(crate) in_recovery: bool,
    pub(crate) archive_mode_off: bool,
    pub(crate) seg_size: u64,
}

/// What a source hands back once the server has ended the backup.
pub(crate) struct Copied {
    pub(crate) start_lsn: Lsn,
    pub(crate) stop_lsn: Lsn,
    pub(crate) stop_time_us: i64,
    pub(crate) timeline: TimelineId,
    pub(crate) from_standby: bool,
    pub(crate) backup_label: Vec<u8>,
    pub(crate) tablespace_map: Option<Vec<u8>>,
    /// Every path of the backup, in manifest order.
    pub(crate) items: Vec<(String, u32, ItemKind)>,
    pub(crate) files: HashMap<usize, FileDone>,
    pub(crate) stored: Stored,
}

/// Where a base backup's files come from: the data directory, or a BASE_BACKUP stream.
pub(crate) trait Source {
    /// The manifest's `source` (`manifest::SOURCE_*`).
    const KIND: u8;
    /// The source's name in logs.
    const NAME: &'static str;
    /// Whether the manifest records chunk-list hashes (`FLAG_CHUNK_LIST_HASH`) instead of the
    /// SHA-256 of each file's bytes (`FileDone::sha256`).
    const CHUNK_LIST_HASHES: bool;

    /// Reads who the server is.
    async fn identify(&mut self) -> Result<Server>;

    /// Refuses a server this source cannot back up (after the major and archiving checks).
    fn check(&self, _server: &Server) -> Result<()> {
        Ok(())
    }

    /// Starts the backup on a server of `major`; returns the server's clock at the start
    /// (microseconds since the epoch), which names the backup.
    async fn start(&mut self, major: u32) -> Result<i64>;

    /// Copies every file into `pipeline` and ends the backup on the server.
    async fn copy(self, server: &Server, pipeline: Pipeline<'_>) -> Result<Copied>;
}

/// Takes a base backup from `source` under a backup lease; returns the header of the manifest
/// written.
pub(crate) async fn run<S: Source>(
    root: &Store,
    mut source: S,
    settings: Settings,
) -> Result<ManifestHeader> {
    let server = source.identify().await?;
    let major =
        crate::pgversion::check_backup_server(server.pg_version, settings.allow_untested_major)?;
    // A standby's WAL is archived by its primary, whatever the standby's own archive_mode.
    if server.archive_mode_off && !server.in_recovery {
        bail!("archive_mode is off, so the WAL this backup needs would never be archived\nhint: set archive_mode = on and archive_command = 'tidemark-agent wal-push %p'");
    }
    source.check(&server)?;
    let (store, cfg) = repo::open_for_writer(
        root,
        server.system_id,
        Some(major),
        settings.accept_new_system,
        true,
    )
    .await?;
    let lease = crate::lease::begin_backup(&store, settings.archive_timeout).await?;
    let session = Session {
        store: &store,
        cfg: &cfg,
        lease: &lease,
        server: &server,
        settings,
    };
    let r = session.take(source, major).await;
    if let Err(e) = lease.release().await {
        tracing::warn!(error = %format!("{e:#}"), "cannot release the backup lease; it expires on its own");
    }
    r
}

/// A backup under way: the system's repository, with the lease held.
struct Session<'a> {
    store: &'a Store,
    cfg: &'a RepoConfig,
    lease: &'a LeaseHandle,
    server: &'a Server,
    settings: Settings,
}

impl Session<'_> {
    async fn take<S: Source>(&self, mut source: S, major: u32) -> Result<ManifestHeader> {
        let backups = repo::list_backups(self.store).await?;
        // The parent's manifest is fetched and checked while the server runs the backup's
        // checkpoint: neither waits for the other.
        let (parent, start) = tokio::join!(load_parent(self.store, &backups), source.start(major));
        let start_time_us = start?;
        let parent = parent?;
        crate::testhooks::crash_point("backup-after-start");
        let backup_id = backup_id(start_time_us, |id| {
            backups.iter().any(|b| b.backup_id == id)
        })?;
        let span = tracing::info_span!("backup", id = %backup_id, source = S::NAME);
        let pipeline = Pipeline {
            store: self.store,
            cfg: self.cfg,
            parent: parent.clone(),
        };
        async {
            let copied = source.copy(self.server, pipeline).await?;
            crate::testhooks::crash_point("backup-after-stop");
            if copied.from_standby {
                tracing::info!("a standby backup's last WAL segment is archived by the primary when it switches segments (archive_timeout)");
            }
            let stats = copied.stored.stats(&copied.files);
            let header = ManifestHeader {
                backup_id,
                system_id: self.server.system_id,
                pg_version: self.server.pg_version,
                timeline: copied.timeline,
                start_lsn: copied.start_lsn,
                stop_lsn: copied.stop_lsn,
                start_time_us,
                stop_time_us: copied.stop_time_us,
                source: S::KIND,
                flags: if copied.from_standby {
                    manifest::FLAG_FROM_STANDBY
                } else {
                    0
                } | if S::CHUNK_LIST_HASHES {
                    manifest::FLAG_CHUNK_LIST_HASH
                } else {
                    0
                },
                chunk_size: self.cfg.chunk_size,
                parent: parent.as_ref().map(|p| p.m.header.backup_id.clone()),
                backup_label: copied.backup_label,
                tablespace_map: copied.tablespace_map.filter(|m| !m.is_empty()),
                stats,
            };
            let (timeline, start_lsn, stop_lsn) =
                (copied.timeline, copied.start_lsn, copied.stop_lsn);
            // The manifest is written to its temporary file while the archiver stores the last
            // WAL segment; it is committed only once both are done.
            let span = tracing::Span::current();
            let manifest = tokio::task::spawn_blocking(move || {
                let _in_backup = span.enter();
                let t = Instant::now();
                let r = copied
                    .stored
                    .write_manifest(&header, &copied.items, &copied.files);
                tracing::debug!(elapsed_ms = t.elapsed().as_millis() as u64, "manifest prepared");
                r.map(|(f, len)| (f, len, header))
            });
            let wal = async {
                let t = Instant::now();
                let r = wait_for_wal(
                    self.store,
                    timeline,
                    start_lsn,
                    stop_lsn,
                    self.server.seg_size,
                    self.settings.archive_timeout,
                )
                .await;
                tracing::debug!(elapsed_ms = t.elapsed().as_millis() as u64, "backup's WAL archived and verified");
                r
            };
            let (wal, manifest) = tokio::join!(wal, manifest);
            wal?;
            let written = manifest.context("manifest writer panicked")??;
            commit(self.store, self.lease, written).await
        }
        .instrument(span)
        .await
    }
}

/// A backup's id: the server's clock at its start, to the second, with `-<pid>` when the
/// repository holds a backup of that second already (`taken`).
fn backup_id(start_time_us: i64, taken: impl Fn(&str) -> bool) -> Result<String> {
    let id = chrono::DateTime::from_timestamp_micros(start_time_us)
        .ok_or_else(|| anyhow!("server clock {start_time_us} is out of range"))?
        .format("%Y%m%dT%H%M%SZ")
        .to_string();
    if taken(&id) {
        return Ok(format!("{id}-{}", std::process::id()));
    }
    Ok(id)
}

/// Writes a finished backup's manifest (create-only, after checking the backup lease is still
/// held): the backup exists from this moment. `written` is the manifest in a temporary file,
/// its length and its header.
async fn commit(
    store: &Store,
    lease: &LeaseHandle,
    written: (std::fs::File, u64, ManifestHeader),
) -> Result<ManifestHeader> {
    let (file, len, header) = written;
    let stats = header.stats;
    let backup_id = header.backup_id.clone();
    lease.check().await?;
    crate::testhooks::crash_point("backup-before-manifest");
    // In parts above the part size (FORMAT.md 8.4.7): memory holds one part, never the whole
    // manifest.
    crate::manifest_file::upload(
        store,
        &backup_id,
        file,
        len,
        crate::manifest_file::Put::Create,
    )
    .await
    .with_context(|| format!("cannot write the manifest of backup {backup_id}"))?;
    tracing::info!(
        logical_bytes = stats.logical_bytes,
        stored_bytes = stats.new_stored_bytes,
        objects = stats.new_objects,
        "backup complete"
    );
    Ok(header)
}

/// The newest backup whose manifest reads whole, to deduplicate against, without chunks in packs
/// that are gone (deleted out of band or by GC): a damaged one is passed over with a warning (the
/// new backup then stores more chunks anew, never references a chunk it cannot vouch for).
async fn load_parent(store: &Store, backups: &[ManifestHeader]) -> Result<Option<Arc<Parent>>> {
    for h in backups.iter().rev() {
        match LocalManifest::load(store, &h.backup_id).await {
            Ok(m) => {
                let (unusable, _) = crate::gc::files_in_missing_packs(store, &m).await?;
                return Ok(Some(Arc::new(Parent { m, unusable })));
            }
            Err(e)
                if e.chain()
                    .any(|c| c.downcast_ref::<tidemark_format::FormatError>().is_some()) =>
            {
                tracing::warn!(
                    backup = %h.backup_id,
                    "backup {} cannot be the parent: {e:#}\nhint: run 'tidemark-restore check'",
                    h.backup_id
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
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
async fn wait_for_wal(
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
    // The archiver stores the stop segment tens of milliseconds after pg_backup_stop switches
    // WAL: for the first second the repository is looked at every FIRST_POLL, then ever less
    // often up to every MAX_POLL (a fixed 200 ms poll made every backup wait about 130 ms past
    // the segment's arrival; a poll doubling from 10 ms, about 35 ms).
    let started = Instant::now();
    let mut poll = FIRST_POLL;
    for segno in first..=last {
        let name = WalFileName::segment_of(tli, Lsn(segno * seg_size), seg_size);
        let key = keys::wal(&name);
        // Existence is not enough: a stored copy is read back whole and verified (a wal-push
        // killed between a cut upload and its cleanup leaves a short copy, which the archiver's
        // retry replaces, FORMAT.md W4), so a backup is never finalized over a damaged segment.
        let mut damaged = None;
        loop {
            if store.head(&key).await?.is_some() {
                match crate::wal::verify_stored(store, &name).await {
                    Ok(()) => break,
                    Err(e) => damaged = Some(e),
                }
            }
            if Instant::now() > deadline {
                if let Some(e) = damaged {
                    bail!("wal segment {name} needed by this backup is stored damaged after {}s: {e:#}\nhint: the archiver's next wal-push of it replaces a cut copy; check the server log for archiver errors and the object store", timeout.as_secs());
                }
                bail!("wal segment {name} needed by this backup was not archived within {}s\nhint: check that archive_command is 'tidemark-agent wal-push %p' with the same --repo, and the server log for archiver errors", timeout.as_secs());
            }
            tokio::time::sleep(poll).await;
            if started.elapsed() > Duration::from_secs(1) {
                poll = (poll * 2).min(MAX_POLL);
            }
        }
    }
    Ok(())
}

/// The wait between two looks for a backup's WAL in the repository during the first second.
const FIRST_POLL: Duration = Duration::from_millis(10);
/// The longest wait between two looks for a backup's WAL in the repository.
const MAX_POLL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_from_label() {
        let l = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-21 20:40:12 UTC\nLABEL: tidemark\nSTART TIMELINE: 3\n";
        assert_eq!(label_timeline(l).unwrap(), TimelineId(3));
        assert!(label_timeline("nothing").is_err());
    }

    #[test]
    fn backup_id_is_the_start_second_made_unique() {
        let t = 1_795_293_612_345_678; // 2026-11-21 20:40:12.345678 UTC
        assert_eq!(backup_id(t, |_| false).unwrap(), "20261121T204012Z");
        assert_eq!(
            backup_id(t, |id| id == "20261121T204012Z").unwrap(),
            format!("20261121T204012Z-{}", std::process::id())
        );
        assert!(backup_id(i64::MAX, |_| false).is_err());
    }
}
