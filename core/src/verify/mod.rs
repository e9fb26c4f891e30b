//! Restore drills (`tidemark-restore verify`): restore a backup into a scratch directory, start
//! PostgreSQL on it, wait for recovery to reach the target and promote, prove the result sound,
//! and report how long each phase took (a measured RTO).
//!
//! Invariants:
//! - A drill never writes to the repository except, with `record`, one create-only object under
//!   `verify/`; the restored server never archives.
//! - Every drill failure is reported in the result (`ok: false` and a `failure` naming the cause);
//!   the scratch directory is removed and the server stopped whatever happened, unless `keep`.
//! - "Reached the target" is judged against what the repository says, not against the server
//!   alone: the replayed LSN must reach the backup's stop LSN, and for `latest` the start of the
//!   last archived segment; for a time, the last replayed commit must not be after the target.

mod checks;
mod record;
pub mod server;

pub use checks::parse_check_sql;
pub use record::{last_recorded, record, render as render_recorded, RecordSummary};

use crate::repo;
use crate::restore::{self, RestoreOptions};
use crate::store::Store;
use crate::target::{postgres_text, Target};
use anyhow::{bail, Context, Result};
use checks::{count_fetched, gaps, list_archive, reached_target, recovery_cause, tail};
use chrono::{DateTime, FixedOffset};
use serde::Serialize;
use server::{PgTools, Server};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark_format::manifest::ManifestHeader;
use tidemark_format::wal::WalFileName;
use tidemark_format::Lsn;

pub const SCHEMA_VERSION: u32 = 1;

/// What the drill recovers to.
#[derive(Clone, Debug)]
pub enum DrillTarget {
    Latest,
    Time(DateTime<FixedOffset>),
    /// A random time between the oldest and the newest backup's stop time.
    RandomInWindow,
}

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Created for the drill (must be absent or empty); removed afterwards unless `keep`.
    pub scratch: PathBuf,
    pub target: DrillTarget,
    pub tools: PgTools,
    /// The database role the checks connect as (the restored cluster's superuser).
    pub db_user: String,
    pub port: u16,
    /// (label, SQL) pairs; each must return a non-empty result whose first value is not false.
    pub check_sql: Vec<(String, String)>,
    pub check_db: String,
    pub amcheck: bool,
    pub heapallindexed: bool,
    /// Extra server settings (name, value) for the drill, e.g. a smaller shared_buffers.
    pub settings: Vec<(String, String)>,
    pub restore_command: String,
    /// Longest the server may take to start, recover and promote.
    pub timeout: Duration,
    pub keep: bool,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct VerifyResult {
    pub schema_version: u32,
    pub ok: bool,
    /// The first failure, naming its cause; `None` when ok.
    pub failure: Option<String>,
    pub repo: String,
    pub started_at: String,
    pub target: TargetReport,
    pub backup: Option<BackupUsed>,
    pub restore_files: u64,
    pub restore_bytes: u64,
    /// WAL files the server fetched from the archive (restore_command) and their stored bytes.
    pub wal_files_fetched: u64,
    pub wal_bytes_fetched: u64,
    pub seconds: Timings,
    pub replay: Option<Replay>,
    pub checks: Vec<CheckOutcome>,
    pub scratch: String,
    pub kept: bool,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct TargetReport {
    /// latest | time | random-in-window
    pub kind: String,
    /// The recovery_target_time used (absent for latest).
    pub time: Option<String>,
    /// For random-in-window: the window the time was drawn from.
    pub window: Option<[String; 2]>,
}

#[derive(Serialize, Clone, Debug)]
pub struct BackupUsed {
    pub id: String,
    pub timeline: u32,
    pub stop_lsn: String,
    pub stop_time: String,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Timings {
    /// Writing the data directory.
    pub restore: Option<f64>,
    /// Server start to accepting (read-only) connections.
    pub consistent: Option<f64>,
    /// Server start to promoted.
    pub promote: Option<f64>,
    /// Drill start to promoted: the recovery time objective this drill measured.
    pub rto: Option<f64>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Replay {
    pub last_replayed_lsn: String,
    pub last_commit_time: Option<String>,
}

#[derive(Serialize, Clone, Debug)]
pub struct CheckOutcome {
    pub name: String,
    /// pass | fail | skipped
    pub outcome: String,
    pub detail: String,
}

impl VerifyResult {
    fn check(&mut self, name: &str, ok: bool, detail: impl Into<String>) {
        let detail = detail.into();
        if !ok && self.failure.is_none() {
            self.failure = Some(format!("check {name} failed: {detail}"));
        }
        self.checks.push(CheckOutcome {
            name: name.to_string(),
            outcome: if ok { "pass" } else { "fail" }.to_string(),
            detail,
        });
    }
    fn skip(&mut self, name: &str, detail: impl Into<String>) {
        self.checks.push(CheckOutcome {
            name: name.to_string(),
            outcome: "skipped".to_string(),
            detail: detail.into(),
        });
    }
}

/// A random u64 from the standard library's randomly seeded hasher (no extra dependency).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// The window random-in-window draws from: the oldest to the newest backup's stop time. Every
/// point in it is recoverable by the repository's own account (a backup completes only once the
/// WAL up to its stop point is archived).
pub fn window(backups: &[ManifestHeader]) -> Result<(i64, i64)> {
    let lo = backups.iter().map(|b| b.stop_time_us).min();
    let hi = backups.iter().map(|b| b.stop_time_us).max();
    match (lo, hi) {
        (Some(lo), Some(hi)) => Ok((lo, hi)),
        _ => bail!("the repository holds no backup\nhint: take one with 'tidemark-agent backup'"),
    }
}

fn time_of(us: i64) -> Result<DateTime<FixedOffset>> {
    DateTime::from_timestamp_micros(us)
        .map(|t| t.fixed_offset())
        .with_context(|| format!("{us} is not a representable time"))
}

/// Runs one drill. Errors are only for problems before the drill starts (bad options); every
/// drill failure is reported in the result.
pub async fn run(store: &Store, opts: &VerifyOptions) -> VerifyResult {
    let started = Instant::now();
    let mut r = VerifyResult {
        schema_version: SCHEMA_VERSION,
        repo: store.url().to_string(),
        started_at: repo::fmt_time(chrono::Utc::now().timestamp_micros()),
        scratch: opts.scratch.display().to_string(),
        ..Default::default()
    };
    let mut srv = None;
    let outcome = drill(store, opts, &mut r, &mut srv, started).await;
    if let Err(e) = outcome {
        let mut msg = format!("{e:#}");
        if let Some(s) = &srv {
            let lines = s.failure_lines();
            if !lines.is_empty() && !msg.contains(&lines) {
                msg += &format!("\nserver log:\n{lines}");
            }
        }
        r.failure.get_or_insert(msg);
    }
    if let Some(mut s) = srv.take() {
        if let Err(e) = s.stop().await {
            tracing::warn!(error = %format!("{e:#}"), "stopping the drill server");
        }
    }
    if opts.keep {
        r.kept = true;
    } else if let Err(e) = std::fs::remove_dir_all(&opts.scratch) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %opts.scratch.display(), error = %e, "cannot remove the scratch directory");
        }
    }
    r.ok = r.failure.is_none();
    r
}

async fn drill(
    store: &Store,
    opts: &VerifyOptions,
    r: &mut VerifyResult,
    srv: &mut Option<Server>,
    started: Instant,
) -> Result<()> {
    repo::require_config(store).await?;
    let backups = repo::list_backups(store).await?;
    let target = match &opts.target {
        DrillTarget::Latest => {
            r.target.kind = "latest".into();
            Target::Latest
        }
        DrillTarget::Time(t) => {
            r.target.kind = "time".into();
            Target::Time(*t)
        }
        DrillTarget::RandomInWindow => {
            let (lo, hi) = window(&backups)?;
            let span = (hi - lo) as u64;
            let at = lo
                + if span == 0 {
                    0
                } else {
                    (random_u64() % (span + 1)) as i64
                };
            r.target.kind = "random-in-window".into();
            r.target.window = Some([repo::fmt_time(lo), repo::fmt_time(hi)]);
            Target::Time(time_of(at)?)
        }
    };
    if let Target::Time(t) = &target {
        r.target.time = Some(postgres_text(t));
    }
    let chosen = restore::choose_backup(&backups, &target)?.clone();
    r.backup = Some(BackupUsed {
        id: chosen.backup_id.clone(),
        timeline: chosen.timeline.0,
        stop_lsn: chosen.stop_lsn.to_string(),
        stop_time: repo::fmt_time(chosen.stop_time_us),
    });
    let major = chosen.pg_version / 10000;
    if !crate::pgversion::is_supported(major) {
        tracing::warn!(
            backup = %chosen.backup_id,
            "backup {} is of PostgreSQL {major}, which this release is not tested with: drilling it anyway with PostgreSQL {major}'s own binaries",
            chosen.backup_id
        );
    }
    let tools = opts
        .tools
        .for_major(major)
        .await
        .with_context(|| format!("backup {} is of PostgreSQL {major}", chosen.backup_id))?;

    // The archive's own account of the window, before spending time on a restore.
    let archive = list_archive(store).await?;
    let seg_size = archive
        .seg_size
        .context("the archive holds no wal segment\nhint: is archive_command set to 'tidemark-agent wal-push'?")?;
    let start_seg = WalFileName::segment_of(chosen.timeline, chosen.start_lsn, seg_size)
        .segment_number(seg_size)
        .unwrap_or(0);
    let missing = gaps(&archive, chosen.timeline.0, start_seg, seg_size);
    if missing.is_empty() {
        r.check(
            "wal_continuity",
            true,
            format!(
                "no segment missing on timeline {} from the backup's start",
                chosen.timeline
            ),
        );
    } else {
        r.check(
            "wal_continuity",
            false,
            format!(
                "wal segment {} is missing from the archive (timeline {}, after backup {} started); points in time after it cannot be recovered",
                missing.join(", "),
                chosen.timeline,
                chosen.backup_id
            ),
        );
    }

    // Restore.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.scratch)
        .with_context(|| format!("cannot create scratch directory {}", opts.scratch.display()))?;
    let pgdata = opts.scratch.join("pgdata");
    let t0 = Instant::now();
    let rep = restore::run(
        store,
        &RestoreOptions {
            pgdata: pgdata.clone(),
            target: target.clone(),
            restore_command: opts.restore_command.clone(),
            // Tablespaces go to their recorded locations, which must be absent or empty there.
            tablespace_map: Vec::new(),
        },
    )
    .await
    .context("restore failed")?;
    r.restore_files = rep.files;
    r.restore_bytes = rep.bytes;
    r.seconds.restore = Some(t0.elapsed().as_secs_f64());

    // Recover.
    let t1 = Instant::now();
    let s = srv.insert(
        Server::start(
            &tools,
            &opts.scratch,
            &pgdata,
            opts.port,
            &opts.db_user,
            &opts.settings,
        )
        .await?,
    );
    let mut last_err = String::new();
    loop {
        if let Some(status) = s.exited() {
            count_fetched(r, &s.log_text(), &archive);
            bail!(
                "the restored server exited during recovery ({status}): {}",
                recovery_cause(&s.log_text())
            );
        }
        if t1.elapsed() > opts.timeout {
            count_fetched(r, &s.log_text(), &archive);
            bail!(
                "the restored server was not promoted within {:?} (last error: {last_err})\nhint: raise --timeout for large restores",
                opts.timeout
            );
        }
        match s.connect("postgres").await {
            Ok(db) => {
                r.seconds
                    .consistent
                    .get_or_insert(t1.elapsed().as_secs_f64());
                match db.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    Ok(row) if !row.get::<_, bool>(0) => break,
                    Ok(_) => {}
                    Err(e) => last_err = e.to_string(),
                }
            }
            Err(e) => last_err = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    r.seconds.promote = Some(t1.elapsed().as_secs_f64());
    r.seconds.rto = Some(started.elapsed().as_secs_f64());
    let log = s.log_text();
    count_fetched(r, &log, &archive);
    r.check(
        "accepts_connections",
        true,
        format!("promoted after {:.1}s", t1.elapsed().as_secs_f64()),
    );

    let db = s.connect("postgres").await?;
    let row = db
        .query_one(
            "SELECT pg_last_wal_replay_lsn()::text, \
             to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
             current_setting('data_checksums')",
            &[],
        )
        .await
        .context("cannot read the replay position of the restored server")?;
    let lsn_text: Option<String> = row.get(0);
    let commit: Option<String> = row.get(1);
    let checksums_on = row.get::<_, String>(2) == "on";
    let replayed: Lsn = lsn_text
        .as_deref()
        .unwrap_or("0/0")
        .parse()
        .context("the server reported an unreadable replay lsn")?;
    r.replay = Some(Replay {
        last_replayed_lsn: replayed.to_string(),
        last_commit_time: commit.clone(),
    });
    reached_target(
        r,
        &chosen,
        &target,
        &archive,
        seg_size,
        replayed,
        commit.as_deref(),
        &log,
    );

    // Soundness.
    if !opts.amcheck {
        r.skip("amcheck", "disabled with --no-amcheck");
    } else if tools.client("pg_amcheck").is_none() {
        r.skip(
            "amcheck",
            format!(
                "pg_amcheck not found in {} nor in another PostgreSQL 14+ bin directory or PATH",
                tools.bin.display()
            ),
        );
    } else {
        let avail = db
            .query_opt(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'",
                &[],
            )
            .await?;
        if avail.is_none() {
            r.skip(
                "amcheck",
                "the amcheck extension is not installed with this PostgreSQL (contrib)",
            );
        } else {
            let sock = s.sock.to_string_lossy().into_owned();
            let port = s.port.to_string();
            let mut args = vec![
                "--all",
                "--install-missing",
                "--no-password",
                "-h",
                &sock,
                "-p",
                &port,
                "-U",
                &opts.db_user,
            ];
            if opts.heapallindexed {
                args.push("--heapallindexed");
            }
            let amcheck = tools.client("pg_amcheck").context("pg_amcheck vanished")?;
            let (ok, out) = amcheck.run("pg_amcheck", &args, opts.timeout).await?;
            let detail = if ok {
                format!(
                    "pg_amcheck --all{} found no corruption",
                    if opts.heapallindexed {
                        " --heapallindexed"
                    } else {
                        ""
                    }
                )
            } else {
                format!(
                    "pg_amcheck reported corruption or failed: {}",
                    tail(&out, 20)
                )
            };
            r.check("amcheck", ok, detail);
        }
    }
    for (label, sql) in &opts.check_sql {
        let name = format!("sql:{label}");
        let res = match s.connect(&opts.check_db).await {
            Ok(c) => c.simple_query(sql).await.map_err(|e| format!("{e}")),
            Err(e) => Err(format!("{e:#}")),
        };
        match res {
            Err(e) => r.check(&name, false, format!("query failed: {e}")),
            Ok(msgs) => {
                let first = msgs.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some(row.get(0).map(str::to_string))
                    }
                    _ => None,
                });
                match first {
                    None => r.check(&name, false, "returned no rows"),
                    Some(Some(v)) if v == "f" || v == "false" => {
                        r.check(&name, false, "returned false")
                    }
                    Some(v) => r.check(
                        &name,
                        true,
                        format!("returned {}", v.as_deref().unwrap_or("NULL")),
                    ),
                }
            }
        }
    }
    drop(db);
    s.stop()
        .await
        .context("cannot stop the restored server cleanly")?;
    if !checksums_on {
        r.skip("data_checksums", "data checksums are off in this cluster");
    } else if !tools.has("pg_checksums") {
        r.skip(
            "data_checksums",
            format!("pg_checksums not found in {}", tools.bin.display()),
        );
    } else {
        let data = pgdata.to_string_lossy().into_owned();
        let (ok, out) = tools
            .run("pg_checksums", &["--check", "-D", &data], opts.timeout)
            .await?;
        r.check(
            "data_checksums",
            ok,
            if ok {
                format!(
                    "every block read and verified: {}",
                    tail(&out, 6).replace('\n', "; ")
                )
            } else {
                format!("pg_checksums found bad blocks: {}", tail(&out, 20))
            },
        );
    }
    Ok(())
}

/// Checks a scratch directory is absent or empty (a drill never deletes what it did not create).
pub fn check_scratch(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                bail!("scratch directory {} is not empty\nhint: give a new or empty directory; verify removes it afterwards", dir.display());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_sql_statements_and_labels() {
        let s = parse_check_sql(
            "-- rows exist\nSELECT count(*) > 0\n  FROM t;\n\nSELECT 1;\nSELECT true",
        );
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].0, "SELECT count(*) > 0");
        assert_eq!(s[0].1, "SELECT count(*) > 0\n  FROM t");
        assert_eq!(s[2].1, "SELECT true");
        assert!(parse_check_sql("-- nothing\n\n").is_empty());
    }
}
