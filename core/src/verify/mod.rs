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
mod drill;
mod record;
pub mod server;

pub use checks::parse_check_sql;
pub use record::{last_recorded, record, render as render_recorded, RecordSummary};

use crate::repo;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, FixedOffset};
use serde::Serialize;
use server::PgTools;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark_format::manifest::ManifestHeader;

pub const SCHEMA_VERSION: u32 = 1;

/// What the drill recovers to.
#[derive(Clone, Debug)]
pub enum DrillTarget {
    Latest,
    Time(DateTime<FixedOffset>),
    /// A random time in the recoverable window ([`window`]): from the stop of its first backup
    /// to the newest backup's stop.
    RandomInWindow,
    /// An LSN, xid, restore point or immediate target (inclusive or not), as `restore` takes it;
    /// the drill always promotes on the latest timeline.
    Exact(crate::target::Recovery),
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
pub(crate) fn random_u64() -> u64 {
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

/// The window random-in-window draws from: from the stop time the recoverable window opens at
/// (`window::pitr_from`: after `expire --retain-wal-window`, the first backup of the WAL window,
/// not an older one restorable only to its consistency point) to the newest backup's stop time.
/// Every point in it is recoverable by the repository's own account (a backup completes only
/// once the WAL up to its stop point is archived). When no backup's WAL is continuous to the end
/// of the archive, from the oldest backup's stop (the drill then reports the gap).
pub fn window(backups: &[ManifestHeader], archive: &crate::archive::Archive) -> Result<(i64, i64)> {
    let lo = crate::window::pitr_from(archive, backups)
        .or_else(|| backups.iter().map(|b| b.stop_time_us).min());
    let hi = backups.iter().map(|b| b.stop_time_us).max();
    match (lo, hi) {
        (Some(lo), Some(hi)) => Ok((lo, hi)),
        _ => bail!("the repository holds no backup\nhint: take one with 'tidemark-agent backup'"),
    }
}

pub(super) fn time_of(us: i64) -> Result<DateTime<FixedOffset>> {
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
    let outcome = drill::run(store, opts, &mut r, &mut srv, started).await;
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

    #[test]
    fn a_pg_setting_value_cannot_add_another_setting() {
        let extra = [(
            "work_mem".to_string(),
            "1MB'\narchive_command = 'evil".to_string(),
        )];
        let text = server::drill_settings("/s".as_ref(), "/h".as_ref(), 5432, &extra);
        assert!(
            text.ends_with("work_mem = '1MB''\\narchive_command = ''evil'\n"),
            "{text}"
        );
        assert!(!text.contains("\narchive_command = 'evil"), "{text}");
    }

    #[test]
    fn a_pg_setting_the_drill_fixes_is_refused() {
        for name in ["port", "ARCHIVE_COMMAND", "hot_standby", "restore_command"] {
            let e = server::check_extra_setting(name).unwrap_err();
            assert!(format!("{e:#}").contains(name), "{e:#}");
        }
        assert!(server::check_extra_setting("work_mem").is_ok());
    }
}
