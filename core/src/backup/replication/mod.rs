//! `backup --source replication`: a base backup taken over the replication protocol with
//! BASE_BACKUP, from a primary or a standby, streamed straight into the chunk pipeline.
//!
//! Data flow (all bounded, nothing staged on disk):
//! network task (CopyData) → demux thread (tar parsing, whole-file SHA-256, cutting files into
//! chunk-aligned blocks) → N worker threads (chunk hash, dedup, zstd, packs) → pack uploader.
//!
//! - [`tar`]: a streaming reader of the tar archives BASE_BACKUP sends (pure).
//! - `demux`: tar archives to chunk-aligned blocks of files, and the workers that store them.
//! - [`server_manifest`]: checking the server's backup manifest against what was stored.
//!
//! Invariants:
//! - The backup is ended only after the stream ended cleanly, every pack is stored, and the
//!   server's own backup manifest matched every stored file. A dropped connection or any failure
//!   leaves no manifest.
//! - `backup_label` and `tablespace_map` are kept byte for byte as the server sent them; the
//!   server's backup manifest is stored as the file `backup_manifest` (as pg_basebackup does).
//! - Tablespace contents are recorded under `pg_tblspc/<oid>/` (the paths of the server's
//!   manifest); the tablespace map says where they belong.
//! - The exchange follows the server's major ([`Protocol::for_major`]); PostgreSQL 14's COPY per
//!   archive is turned into the 15+ events by [`BackupStream`], so everything after the network
//!   is the same for every major.

mod demux;
pub mod server_manifest;
pub mod tar;

use super::chunk_log::Logged;
use super::pipeline::{FileDone, Packer, Pipeline, Stored};
use super::session::{self, Copied, Server, Source};
use crate::progress::Progress;
use crate::replication::conn::{ConnParams, ReplConn, ResultSet};
use crate::replication::message::BackupData;
use crate::replication::stream::{self, BackupStream, Protocol};
use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use demux::{Demuxed, Job, Part, Piece};
use server_manifest::SERVER_MANIFEST;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{mpsc as smpsc, Arc, Mutex};
use std::time::Duration;
use tidemark_format::manifest::{self, ManifestHeader};
use tidemark_format::{ChunkId, Lsn, SystemId, TimelineId};
use tokio::sync::mpsc;

#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    pub pg_url: Option<crate::pg::ConnString>,
    pub compress_level: i32,
    pub workers: usize,
    pub archive_timeout: Duration,
    /// BASE_BACKUP's MAX_RATE in kB/s (32..=1048576): the server throttles the stream.
    pub max_rate_kb: Option<u32>,
    /// Back up a PostgreSQL major newer than the tested ones (pgversion::SUPPORTED).
    pub allow_untested_major: bool,
    /// Register this cluster as a new database system of the repository (repo::open_for_writer).
    pub accept_new_system: bool,
}

/// Takes a base backup over the replication protocol under a backup lease (FORMAT.md section
/// 16, as for `--pgdata`); returns the header of the manifest.
pub async fn run(store: &Store, opts: &ReplicationOptions) -> Result<ManifestHeader> {
    let params =
        ConnParams::from_url_or_env(opts.pg_url.as_ref().map(crate::pg::ConnString::expose))?;
    let conn = ReplConn::connect(&params).await?;
    let source = Replication {
        opts,
        conn,
        start_time_us: 0,
        protocol: Protocol::Typed,
        max_rate: None,
    };
    session::run(store, source, session::settings_of!(opts)).await
}

/// A replication connection to the server (primary or standby).
struct Replication<'a> {
    opts: &'a ReplicationOptions,
    conn: ReplConn,
    /// The server's clock, read with its identity.
    start_time_us: i64,
    /// Set by `start`.
    protocol: Protocol,
    max_rate: Option<u32>,
}

fn one_row<'a>(sets: &'a [ResultSet], i: usize, what: &str) -> Result<&'a [Option<String>]> {
    sets.get(i)
        .and_then(|s| s.rows.first())
        .map(Vec::as_slice)
        .ok_or_else(|| anyhow!("postgresql sent no {what}"))
}

fn col<'a>(row: &'a [Option<String>], i: usize, what: &str) -> Result<&'a str> {
    row.get(i)
        .and_then(|v| v.as_deref())
        .ok_or_else(|| anyhow!("postgresql sent no {what}"))
}

impl Source for Replication<'_> {
    const KIND: u8 = manifest::SOURCE_REPLICATION;
    const NAME: &'static str = "replication";
    /// The SHA-256 of each file is what the server's backup manifest is checked against.
    const CHUNK_LIST_HASHES: bool = false;

    async fn identify(&mut self) -> Result<Server> {
        let sets = self.conn.simple_query("IDENTIFY_SYSTEM").await?;
        let row = one_row(&sets, 0, "IDENTIFY_SYSTEM row")?;
        let system_id = SystemId(
            col(row, 0, "system identifier")?
                .parse()
                .context("system identifier is not a number")?,
        );
        let sets = self.conn
            .simple_query(
                "SELECT current_setting('server_version_num'), pg_is_in_recovery()::text, \
                 current_setting('archive_mode'), (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'), \
                 ((extract(epoch from clock_timestamp()) * 1000000)::int8)::text",
            )
            .await
            .context("cannot read the server's settings")?;
        let row = one_row(&sets, 0, "settings row")?;
        let server = Server {
            system_id,
            pg_version: col(row, 0, "server_version_num")?
                .parse()
                .context("server_version_num is not a number")?,
            in_recovery: col(row, 1, "pg_is_in_recovery")? == "true",
            archive_mode_off: col(row, 2, "archive_mode")? == "off",
            seg_size: col(row, 3, "wal_segment_size")?
                .parse()
                .context("wal_segment_size is not a number")?,
        };
        self.start_time_us = col(row, 4, "clock")?
            .parse()
            .context("clock is not a number")?;
        Ok(server)
    }

    async fn start(&mut self, major: u32) -> Result<i64> {
        self.max_rate = match self.opts.max_rate_kb {
            Some(r) if (32..=1_048_576).contains(&r) => Some(r),
            Some(r) => {
                bail!("--max-rate {r} is out of range\nhint: PostgreSQL accepts 32 to 1048576 kB/s")
            }
            None => None,
        };
        self.protocol = Protocol::for_major(major);
        Ok(self.start_time_us)
    }

    async fn copy(mut self, server: &Server, pipeline: Pipeline<'_>) -> Result<Copied> {
        let sets = self
            .conn
            .start_base_backup(&self.protocol.command(self.max_rate))
            .await?;
        let start = one_row(&sets, 0, "BASE_BACKUP start position")?;
        let start_lsn: Lsn = col(start, 0, "start LSN")?.parse()?;
        let start_tli: u32 = col(start, 1, "start timeline")?
            .parse()
            .context("start timeline is not a number")?;
        let tablespaces =
            stream::parse_tablespaces(sets.get(1).map(|s| s.rows.as_slice()).unwrap_or(&[]))?;
        let mut spc_oids: HashMap<String, String> = HashMap::new();
        let mut total: u64 = 0;
        for t in &tablespaces {
            if let (Some(oid), Some(loc)) = (t.oid, &t.location) {
                spc_oids.insert(loc.clone(), oid.to_string());
            }
            total = total.saturating_add(t.size_kb.unwrap_or(0).saturating_mul(1024));
        }
        let backup_stream = BackupStream::new(self.protocol, &tablespaces)?;
        tracing::info!(start_lsn = %start_lsn, timeline = start_tli, standby = server.in_recovery, tablespaces = spc_oids.len(), protocol = ?self.protocol, "backup started");

        let (parts, stored, demuxed) = self
            .pump(backup_stream, &spc_oids, total, &pipeline)
            .await?;

        let end = self.conn.finish_base_backup().await?;
        let stop = one_row(&end, 0, "BASE_BACKUP end position")?;
        let stop_lsn: Lsn = col(stop, 0, "stop LSN")?.parse()?;
        let sets = self
            .conn
            .simple_query("SELECT ((extract(epoch from clock_timestamp()) * 1000000)::int8)::text")
            .await?;
        let stop_time_us: i64 = col(one_row(&sets, 0, "clock")?, 0, "clock")?
            .parse()
            .context("clock is not a number")?;
        self.conn.close().await;

        let backup_label = demuxed
            .backup_label
            .clone()
            .ok_or_else(|| anyhow!("the BASE_BACKUP stream had no backup_label"))?;
        let label_text = String::from_utf8_lossy(&backup_label);
        let timeline = session::label_timeline(&label_text)?;
        if timeline != TimelineId(start_tli) {
            bail!("backup_label says timeline {timeline}, BASE_BACKUP said {start_tli}");
        }
        let from_standby = label_text.contains("BACKUP FROM: standby");
        if from_standby != server.in_recovery {
            bail!("the server changed role during the backup (pg_is_in_recovery was {})\nhint: rerun the backup", server.in_recovery);
        }
        let files = files_done(parts, &demuxed)?;
        let checked = check_server_manifest(&demuxed, server.system_id)?;
        tracing::info!(stop_lsn = %stop_lsn, files_checked = checked, "backup stopped; server manifest matches; waiting for WAL");
        Ok(Copied {
            start_lsn,
            stop_lsn,
            stop_time_us,
            timeline,
            from_standby,
            backup_label,
            tablespace_map: demuxed.tablespace_map,
            items: demuxed.items,
            files,
            stored,
        })
    }
}

impl Replication<'_> {
    /// Streams the backup from the connection through the demux thread to the pipeline's
    /// workers, all three at once; returns the workers' blocks, what they stored, and what the
    /// demux thread gathered.
    async fn pump(
        &mut self,
        backup_stream: BackupStream,
        spc_oids: &HashMap<String, String>,
        total: u64,
        pipeline: &Pipeline<'_>,
    ) -> Result<(Vec<Vec<Part>>, Stored, Demuxed)> {
        let shared = pipeline.shared(self.opts.compress_level)?;
        let (piece_tx, piece_rx) = mpsc::channel::<Piece>(16);
        let workers = self.opts.workers.max(1);
        let (job_tx, job_rx) = smpsc::sync_channel::<Job>(workers * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let demux_shared = shared.clone();
        let demux =
            tokio::task::spawn_blocking(move || demux::demux(piece_rx, job_tx, &demux_shared));
        let work = move |p: &mut Packer<'_>| demux::block_worker(p, &job_rx);
        let pipelined = pipeline.run(shared, workers, work);
        let streamed = stream_backup(&mut self.conn, backup_stream, piece_tx, spc_oids, total);
        let (streamed, pipelined) = tokio::join!(streamed, pipelined);
        let demuxed = demux.await.context("backup demux thread panicked")?;
        let (parts, stored) = pipelined?;
        let closed = streamed?;
        let demuxed = demuxed?;
        if closed {
            bail!("the backup pipeline stopped early");
        }
        Ok((parts, stored, demuxed))
    }
}

/// Puts the workers' blocks back together into each streamed file's chunk list, in order.
fn files_done(parts: Vec<Vec<Part>>, demuxed: &Demuxed) -> Result<HashMap<usize, FileDone>> {
    let mut by_file: BTreeMap<usize, Vec<(usize, Logged, u64)>> = BTreeMap::new();
    for (fid, first, logged, len) in parts.into_iter().flatten() {
        by_file.entry(fid).or_default().push((first, logged, len));
    }
    let mut files = HashMap::new();
    for (fid, (path, size, sha)) in demuxed.files.iter().enumerate() {
        let mut parts = by_file.remove(&fid).unwrap_or_default();
        parts.sort_by_key(|p| p.0);
        let sum: u64 = parts.iter().map(|p| p.2).sum();
        let chunks: Vec<Logged> = parts.into_iter().map(|p| p.1).collect();
        if sum != *size {
            bail!("file {path}: {sum} of {size} bytes were stored\nhint: this is a bug; rerun the backup");
        }
        files.insert(
            fid,
            FileDone {
                size: *size,
                sha256: Some(ChunkId(*sha)),
                chunks,
            },
        );
    }
    Ok(files)
}

/// Checks every file the backup holds (stored, kept in the manifest, or left out) against the
/// server's backup manifest; returns the number of files checked.
fn check_server_manifest(demuxed: &Demuxed, system_id: SystemId) -> Result<usize> {
    let mut held: HashMap<String, (u64, [u8; 32])> = HashMap::new();
    for (path, size, sha) in demuxed.files.iter().chain(&demuxed.skipped) {
        if path != SERVER_MANIFEST {
            held.insert(path.clone(), (*size, *sha));
        }
    }
    let kept = [
        ("backup_label", &demuxed.backup_label),
        ("tablespace_map", &demuxed.tablespace_map),
    ];
    for (path, bytes) in kept {
        if let Some(b) = bytes {
            held.insert(path.into(), (b.len() as u64, Sha256::digest(b).into()));
        }
    }
    server_manifest::verify(&demuxed.server_manifest, &held, system_id)
}

/// Reads the CopyOut stream into the demux channel. Returns `true` if the pipeline closed
/// before the stream ended (its error is reported by the pipeline).
async fn stream_backup(
    conn: &mut ReplConn,
    mut backup_stream: BackupStream,
    tx: mpsc::Sender<Piece>,
    spc_oids: &HashMap<String, String>,
    total: u64,
) -> Result<bool> {
    let mut progress = Progress::new("backup", Some(total));
    let (mut streamed, mut paused) = (0u64, false);
    while let Some(d) = conn.next_backup_data(&mut backup_stream).await? {
        let piece = match d {
            BackupData::NewArchive { name, tablespace } => {
                if tablespace.is_empty() {
                    Piece::Archive(None)
                } else {
                    let oid = spc_oids.get(&tablespace).ok_or_else(|| {
                        anyhow!("BASE_BACKUP sent archive {name} for tablespace {tablespace}, which was not in its tablespace list")
                    })?;
                    Piece::Archive(Some(oid.clone()))
                }
            }
            BackupData::Data(b) => {
                progress.add(b.len() as u64);
                streamed += b.len() as u64;
                if !paused && streamed >= total / 2 {
                    paused = true;
                    crate::testhooks::pause_point_async("backup-mid-copy").await;
                }
                Piece::Data(b)
            }
            BackupData::Manifest => Piece::Manifest,
            BackupData::Progress(_) => continue,
        };
        if tx.send(piece).await.is_err() {
            return Ok(true);
        }
    }
    progress.finish();
    Ok(tx.send(Piece::End).await.is_err())
}
