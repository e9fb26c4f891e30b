//! `backup --pgdata`: a base backup read from the data directory on the database host, between
//! the server's start and stop of a non-exclusive backup, through the chunk pipeline.
//!
//! Invariants:
//! - Only a primary is backed up this way, and only a directory that holds a PG_VERSION.
//! - Files are read whole after the backup started, each from one descriptor, in blocks the
//!   workers share (`blocks`); one that vanishes before it is opened is left out (WAL replay
//!   recreates it), and nothing is trusted from sizes or times.
//! - `backup_label` and `tablespace_map` are the ones the stop call returned, byte for byte.

mod blocks;
mod walk;

use super::pipeline::{ItemKind, Packer, Pipeline, Shared};
use super::session::{self, Copied, Server, Source};
use crate::store::Store;
use anyhow::{bail, Context, Result};
use blocks::BlockQueue;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tidemark_format::manifest::{self, ManifestHeader};
use tidemark_format::{Lsn, SystemId};
use walk::{Kind, WalkEntry};

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub pgdata: PathBuf,
    pub pg_url: Option<crate::pg::ConnString>,
    pub compress_level: i32,
    pub workers: usize,
    pub archive_timeout: Duration,
    /// Back up a PostgreSQL major newer than the tested ones (pgversion::SUPPORTED).
    pub allow_untested_major: bool,
    /// Register this cluster as a new database system of the repository (repo::open_for_writer).
    pub accept_new_system: bool,
}

/// Takes a base backup of the data directory under a backup lease (FORMAT.md section 16);
/// returns the header of the manifest written.
pub async fn run(store: &Store, opts: &BackupOptions) -> Result<ManifestHeader> {
    let client =
        crate::pg::connect(opts.pg_url.as_ref().map(crate::pg::ConnString::expose)).await?;
    let source = Pgdata {
        opts,
        client,
        major: 0,
        start_lsn: Lsn(0),
    };
    session::run(store, source, session::settings_of!(opts)).await
}

/// The data directory, read here, and the SQL session that starts and stops the backup.
struct Pgdata<'a> {
    opts: &'a BackupOptions,
    client: tokio_postgres::Client,
    /// Set by `start`.
    major: u32,
    start_lsn: Lsn,
}

/// Why a backup whose SQL session ended before pg_backup_stop fails.
const SESSION_LOST: &str = "the postgresql session that started the backup (pg_backup_start) was closed during the copy, so the server ended the backup\nhint: see the server log for why the session ended (pg_terminate_backend, a restart, a network cut), then rerun the backup";

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

impl Source for Pgdata<'_> {
    const KIND: u8 = manifest::SOURCE_PGDATA;
    const NAME: &'static str = "pgdata";
    /// The workers hash chunks, not whole files: a file's SHA-256 would be one more pass over
    /// its bytes, in file order.
    const CHUNK_LIST_HASHES: bool = true;

    async fn identify(&mut self) -> Result<Server> {
        let row = self.client
            .query_one(
                "SELECT system_identifier::text, current_setting('server_version_num')::int4, pg_is_in_recovery(), \
                 current_setting('archive_mode'), (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size')
                 FROM pg_control_system()",
                &[],
            )
            .await
            .context("cannot read the server's identity")?;
        let sysid: String = row.get(0);
        Ok(Server {
            system_id: SystemId(sysid.parse().context("system identifier is not a number")?),
            pg_version: u32::try_from(row.get::<_, i32>(1))
                .context("negative server_version_num")?,
            in_recovery: row.get(2),
            archive_mode_off: row.get::<_, String>(3) == "off",
            seg_size: u64::try_from(row.get::<_, i64>(4)).context("negative wal_segment_size")?,
        })
    }

    fn check(&self, server: &Server) -> Result<()> {
        if server.in_recovery {
            bail!("the server is a standby; backup --pgdata copies a primary\nhint: run the backup against the primary");
        }
        if std::fs::metadata(self.opts.pgdata.join("PG_VERSION")).is_err() {
            bail!("{} is not a PostgreSQL data directory\nhint: pass the server's data directory as --pgdata", self.opts.pgdata.display());
        }
        Ok(())
    }

    async fn start(&mut self, major: u32) -> Result<i64> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT {}::text, (extract(epoch from clock_timestamp()) * 1000000)::int8",
                    backup_functions(major).0
                ),
                &[],
            )
            .await
            .context("pg_backup_start failed")?;
        self.major = major;
        self.start_lsn = row.get::<_, String>(0).parse()?;
        Ok(row.get(1))
    }

    async fn copy(self, _server: &Server, pipeline: Pipeline<'_>) -> Result<Copied> {
        tracing::info!(start_lsn = %self.start_lsn, "backup started");
        let pgdata = self.opts.pgdata.clone();
        let walked = tokio::task::spawn_blocking(move || walk::walk(&pgdata)).await??;
        let shared = pipeline.shared(self.opts.compress_level)?;
        let files = walked
            .iter()
            .enumerate()
            .filter(|(_, w)| w.kind == Kind::File)
            .map(|(i, w)| (i, w.abs.clone(), w.rel.clone()))
            .collect();
        let files = Arc::new(BlockQueue::new(files, shared.chunk_size()));
        let progress = tokio::spawn(log_progress(shared.clone(), files.clone()));
        let work = move |p: &mut Packer<'_>| blocks::copy_blocks(p, &files);
        let r = pipeline.run(shared, self.opts.workers, work).await;
        progress.abort();
        // Wait until the progress task is gone: it holds a clone of the shared state.
        let _ = progress.await;
        let (parts, stored) = r?;

        // The server ends a non-exclusive backup with the session that started it: a session
        // lost during the copy (terminated, server restarted, network cut) leaves nothing to
        // stop, and the files copied are not a backup.
        if self.client.is_closed() {
            bail!(SESSION_LOST);
        }
        let stopped = self.client
            .query_one(
                &format!(
                    "SELECT lsn::text, labelfile, spcmapfile, (extract(epoch from clock_timestamp()) * 1000000)::int8 FROM {}",
                    backup_functions(self.major).1
                ),
                &[],
            )
            .await;
        let row = match stopped {
            Ok(row) => row,
            Err(e) if e.is_closed() || self.client.is_closed() => bail!(SESSION_LOST),
            Err(e) => return Err(e).context("pg_backup_stop failed"),
        };
        let stop_lsn: Lsn = row.get::<_, String>(0).parse()?;
        let backup_label: String = row.get(1);
        let spcmap: Option<String> = row.get(2);
        let timeline = session::label_timeline(&backup_label)?;
        tracing::info!(stop_lsn = %stop_lsn, "backup stopped; waiting for WAL");
        Ok(Copied {
            start_lsn: self.start_lsn,
            stop_lsn,
            stop_time_us: row.get(3),
            timeline,
            from_standby: false,
            backup_label: backup_label.into_bytes(),
            tablespace_map: spcmap.map(String::into_bytes),
            items: walked.into_iter().enumerate().map(item).collect(),
            files: parts.into_iter().flatten().collect(),
            stored,
        })
    }
}

/// What the manifest records for the `i`th path of the walk.
fn item((i, w): (usize, WalkEntry)) -> (String, u32, ItemKind) {
    let kind = match w.kind {
        Kind::Dir => ItemKind::Dir,
        Kind::Symlink(t) => ItemKind::Symlink(t),
        Kind::File => ItemKind::File(i),
    };
    (w.rel, w.mode, kind)
}

async fn log_progress(s: Arc<Shared>, q: Arc<BlockQueue>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        tracing::info!(
            files_done = q.files_started.load(Ordering::Relaxed),
            files_total = q.len(),
            bytes_read = s.counters.read_bytes.load(Ordering::Relaxed),
            "backup progress"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_calls_per_major() {
        assert_eq!(
            backup_functions(14),
            (
                "pg_start_backup('tidemark', true, false)",
                "pg_stop_backup(false, false)"
            )
        );
        for major in [15, 18] {
            assert_eq!(
                backup_functions(major),
                ("pg_backup_start('tidemark', true)", "pg_backup_stop(false)")
            );
        }
    }
}
