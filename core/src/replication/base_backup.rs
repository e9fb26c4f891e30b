//! `backup --source replication`: a base backup taken over the replication protocol with
//! BASE_BACKUP, from a primary or a standby, streamed straight into the chunk pipeline.
//!
//! Data flow (all bounded, nothing staged on disk):
//! network task (CopyData) → demux thread (tar parsing, whole-file SHA-256, cutting files into
//! chunk-aligned blocks) → N worker threads (chunk hash, dedup, zstd, packs) → pack uploader.
//!
//! Invariants:
//! - The manifest is written only after the stream ended cleanly, every pack is stored, the
//!   server's own backup manifest matched every stored file, and the WAL from start to stop LSN
//!   is archived. A dropped connection or any failure leaves no manifest.
//! - `backup_label` and `tablespace_map` are kept byte for byte as the server sent them; the
//!   server's backup manifest is stored as the file `backup_manifest` (as pg_basebackup does).
//! - Tablespace contents are recorded under `pg_tblspc/<oid>/` (the paths of the server's
//!   manifest); the tablespace map says where they belong.
//! - The exchange follows the server's major ([`Protocol::for_major`]); PostgreSQL 14's COPY per
//!   archive is turned into the 15+ events by [`BackupStream`], so everything after the network
//!   is the same for every major.

use super::conn::{ConnParams, ReplConn, ResultSet};
use super::demux::{self, ChunkLoc, Job, Piece};
use super::message::BackupData;
use super::stream::{self, BackupStream, Protocol};
use crate::backup::{self, FileDone, SealedPack, Shared};
use crate::progress::Progress;
use crate::repo;
use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{mpsc as smpsc, Arc, Mutex};
use std::time::Duration;
use tidemark_format::manifest::{self, BackupStats, ManifestHeader};
use tidemark_format::{ChunkId, Lsn, SystemId, TimelineId};
use tokio::sync::mpsc;

/// The file name under which the server's backup manifest is stored.
pub const SERVER_MANIFEST: &str = "backup_manifest";

#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    pub pg_url: Option<String>,
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

/// Takes a base backup over the replication protocol under a backup lease (FORMAT.md section
/// 16, as for `--pgdata`); returns the header of the manifest.
pub async fn run(store: &Store, opts: &ReplicationOptions) -> Result<ManifestHeader> {
    run_leased(store, opts).await
}

async fn run_leased(root: &Store, opts: &ReplicationOptions) -> Result<ManifestHeader> {
    let params = ConnParams::from_url_or_env(opts.pg_url.as_deref())?;
    let mut conn = ReplConn::connect(&params).await?;
    let sets = conn.simple_query("IDENTIFY_SYSTEM").await?;
    let row = one_row(&sets, 0, "IDENTIFY_SYSTEM row")?;
    let system_id = SystemId(
        col(row, 0, "system identifier")?
            .parse()
            .context("system identifier is not a number")?,
    );
    let sets = conn
        .simple_query(
            "SELECT current_setting('server_version_num'), pg_is_in_recovery()::text, \
             current_setting('archive_mode'), (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'), \
             ((extract(epoch from clock_timestamp()) * 1000000)::int8)::text",
        )
        .await
        .context("cannot read the server's settings")?;
    let row = one_row(&sets, 0, "settings row")?;
    let pg_version: u32 = col(row, 0, "server_version_num")?
        .parse()
        .context("server_version_num is not a number")?;
    let in_recovery = col(row, 1, "pg_is_in_recovery")? == "true";
    let archive_mode = col(row, 2, "archive_mode")?.to_string();
    let seg_size: u64 = col(row, 3, "wal_segment_size")?
        .parse()
        .context("wal_segment_size is not a number")?;
    let start_time_us: i64 = col(row, 4, "clock")?
        .parse()
        .context("clock is not a number")?;
    let major = crate::pgversion::check_backup_server(pg_version, opts.allow_untested_major)?;
    if archive_mode == "off" && !in_recovery {
        bail!("archive_mode is off, so the WAL this backup needs would never be archived\nhint: set archive_mode = on and archive_command = 'tidemark-agent wal-push %p'");
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
        let parent = backup::load_parent(store, &backups).await?;
        let mut backup_id = chrono::DateTime::from_timestamp_micros(start_time_us)
            .ok_or_else(|| anyhow!("server clock {start_time_us} is out of range"))?
            .format("%Y%m%dT%H%M%SZ")
            .to_string();
        if backups.iter().any(|b| b.backup_id == backup_id) {
            backup_id = format!("{backup_id}-{}", std::process::id());
        }
        let span = tracing::info_span!("backup", id = %backup_id, source = "replication");
        let _g = span.enter();

        let max_rate = match opts.max_rate_kb {
            Some(r) if (32..=1_048_576).contains(&r) => Some(r),
            Some(r) => {
                bail!("--max-rate {r} is out of range\nhint: PostgreSQL accepts 32 to 1048576 kB/s")
            }
            None => None,
        };
        let protocol = Protocol::for_major(major);
        let sets = conn
            .start_base_backup(&protocol.command(max_rate))
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
        let backup_stream = BackupStream::new(protocol, &tablespaces)?;
        tracing::info!(start_lsn = %start_lsn, timeline = start_tli, standby = in_recovery, tablespaces = spc_oids.len(), protocol = ?protocol, "backup started");

        let shared = Arc::new(Shared::new(
            Vec::new(),
            backup::index_parent(parent.clone()),
            &cfg,
            opts.compress_level,
        ));
        let (piece_tx, piece_rx) = mpsc::channel::<Piece>(16);
        let workers = opts.workers.max(1);
        let (job_tx, job_rx) = smpsc::sync_channel::<Job>(workers * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let demux_shared = shared.clone();
        let demux = tokio::task::spawn_blocking(move || demux::demux(piece_rx, job_tx, &demux_shared));
        let work = move |s: &Shared, tx: &tokio::sync::mpsc::Sender<SealedPack>| {
            demux::block_worker(s, tx, &job_rx)
        };
        let pipeline = backup::run_workers(store, shared.clone(), workers, work);
        let stream = stream_backup(&mut conn, backup_stream, piece_tx, &spc_oids, total);
        let (streamed, pipelined) = tokio::join!(stream, pipeline);
        let demuxed = demux.await.context("backup demux thread panicked")?;
        let (parts, packs, _) = pipelined?;
        let closed = streamed?;
        let demuxed = demuxed?;
        if closed {
            bail!("the backup pipeline stopped early");
        }

        let end = conn.finish_base_backup().await?;
        let stop = one_row(&end, 0, "BASE_BACKUP end position")?;
        let stop_lsn: Lsn = col(stop, 0, "stop LSN")?.parse()?;
        let sets = conn
            .simple_query("SELECT ((extract(epoch from clock_timestamp()) * 1000000)::int8)::text")
            .await?;
        let stop_time_us: i64 = col(one_row(&sets, 0, "clock")?, 0, "clock")?
            .parse()
            .context("clock is not a number")?;
        conn.close().await;

        let backup_label = demuxed
            .backup_label
            .clone()
            .ok_or_else(|| anyhow!("the BASE_BACKUP stream had no backup_label"))?;
        let label_text = String::from_utf8_lossy(&backup_label);
        let timeline = backup::label_timeline(&label_text)?;
        if timeline != TimelineId(start_tli) {
            bail!("backup_label says timeline {timeline}, BASE_BACKUP said {start_tli}");
        }
        let from_standby = label_text.contains("BACKUP FROM: standby");
        if from_standby != in_recovery {
            bail!("the server changed role during the backup (pg_is_in_recovery was {in_recovery})\nhint: rerun the backup");
        }

        // Assemble the files' chunk lists in order and check them against the server's manifest.
        let mut by_file: BTreeMap<usize, Vec<(usize, Vec<ChunkLoc>)>> = BTreeMap::new();
        for (fid, first, chunks) in parts.into_iter().flatten() {
            by_file.entry(fid).or_default().push((first, chunks));
        }
        let mut files: HashMap<usize, FileDone> = HashMap::new();
        let mut stored: HashMap<String, (u64, [u8; 32])> = HashMap::new();
        for (fid, (path, size, sha)) in demuxed.files.iter().enumerate() {
            let mut parts = by_file.remove(&fid).unwrap_or_default();
            parts.sort_by_key(|p| p.0);
            let chunks: Vec<_> = parts.into_iter().flat_map(|p| p.1).collect();
            let sum: u64 = chunks.iter().map(|(_, l)| l.ulen() as u64).sum();
            if sum != *size {
                bail!("file {path}: {sum} of {size} bytes were stored\nhint: this is a bug; rerun the backup");
            }
            if path != SERVER_MANIFEST {
                stored.insert(path.clone(), (*size, *sha));
            }
            files.insert(
                fid,
                FileDone {
                    size: *size,
                    sha256: ChunkId(*sha),
                    chunks,
                },
            );
        }
        stored.insert(
            "backup_label".into(),
            (
                backup_label.len() as u64,
                Sha256::digest(&backup_label).into(),
            ),
        );
        for (path, size, sha) in &demuxed.skipped {
            stored.insert(path.clone(), (*size, *sha));
        }
        if let Some(m) = &demuxed.tablespace_map {
            stored.insert(
                "tablespace_map".into(),
                (m.len() as u64, Sha256::digest(m).into()),
            );
        }
        let checked =
            super::server_manifest::verify(&demuxed.server_manifest, &stored, system_id)?;
        tracing::info!(stop_lsn = %stop_lsn, files_checked = checked, "backup stopped; server manifest matches; waiting for WAL");
        if from_standby {
            tracing::info!("a standby backup's last WAL segment is archived by the primary when it switches segments (archive_timeout)");
        }
        backup::wait_for_wal(
            store,
            timeline,
            start_lsn,
            stop_lsn,
            seg_size,
            opts.archive_timeout,
        )
        .await?;

        let (pack_table, entries, logical) =
            backup::assemble(demuxed.items.into_iter(), &files, &packs)?;
        let c = &shared.counters;
        let stats = BackupStats {
            logical_bytes: logical,
            new_chunks: c.new_chunks.load(Ordering::Relaxed),
            reused_chunks: c.reused_chunks.load(Ordering::Relaxed),
            new_chunk_bytes: c.new_chunk_bytes.load(Ordering::Relaxed),
            new_stored_bytes: packs.values().map(|(_, size)| size).sum(),
            new_objects: packs.len() as u64 + 1,
        };
        let header = ManifestHeader {
            backup_id: backup_id.clone(),
            system_id,
            pg_version,
            timeline,
            start_lsn,
            stop_lsn,
            start_time_us,
            stop_time_us,
            source: manifest::SOURCE_REPLICATION,
            flags: if from_standby {
                manifest::FLAG_FROM_STANDBY
            } else {
                0
            },
            chunk_size: cfg.chunk_size,
            parent: parent.as_ref().map(|p| p.header.backup_id.clone()),
            backup_label,
            tablespace_map: demuxed.tablespace_map.filter(|m| !m.is_empty()),
            stats,
        };
        backup::commit(store, lease, header, pack_table, entries).await
    }
    .await;
    if let Err(e) = lease_handle.release().await {
        tracing::warn!(error = %format!("{e:#}"), "cannot release the backup lease; it expires on its own");
    }
    r
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
