//! Expire records in the repository (`expire/<id>.json`, FORMAT.md 8.8): one small JSON summary
//! per real (not dry-run) expire, written create-only when the run ends, read by `info` and the
//! metrics. A record is never needed to restore or to expire; a damaged one is reported as a
//! failed run it cannot describe, never trusted for anything else.
//!
//! Invariants: written only by a run that held the expire lease (or failed to get it), after its
//! last delete; only the newest [`KEEP`] records are kept, older ones are deleted by the run that
//! wrote a newer one.

use super::Plan;
use crate::store::Store;
use anyhow::{Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tidemark_format::keys;

/// Largest record read back.
const MAX_RECORD: u64 = 1 << 20;
/// Records kept; older ones are deleted by the run that writes a newer one.
pub const KEEP: usize = 10;
pub const SCHEMA_VERSION: u32 = 1;

/// What one expire run did (the stored record).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ExpireRecord {
    pub schema_version: u32,
    pub started_at: String,
    pub finished_at: String,
    pub ok: bool,
    /// The cause, for a failed run.
    pub failure: Option<String>,
    pub backups_removed: u64,
    pub packs_deleted: u64,
    pub pack_bytes_freed: u64,
    pub wal_deleted: u64,
    pub wal_bytes_freed: u64,
    /// Every byte the run deleted (manifests not counted), as the plan's `bytes_freed`.
    pub bytes_freed: u64,
}

/// The newest record, as `info --json` shows it (`last_expire`).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ExpireSummary {
    pub key: String,
    /// `None` for a record that is not a readable record (then `ok` is false).
    pub record: Option<ExpireRecord>,
    pub ok: bool,
}

impl ExpireRecord {
    /// The record of a run that started at `started_us` and ended with `outcome`.
    pub fn of(started_us: i64, outcome: &Result<Plan>) -> ExpireRecord {
        let now = chrono::Utc::now().timestamp_micros();
        let mut r = ExpireRecord {
            schema_version: SCHEMA_VERSION,
            started_at: crate::repo::fmt_time(started_us),
            finished_at: crate::repo::fmt_time(now),
            ok: outcome.is_ok(),
            failure: None,
            backups_removed: 0,
            packs_deleted: 0,
            pack_bytes_freed: 0,
            wal_deleted: 0,
            wal_bytes_freed: 0,
            bytes_freed: 0,
        };
        match outcome {
            Ok(p) => {
                r.backups_removed =
                    p.backups.iter().filter(|b| b.action == "remove").count() as u64;
                r.packs_deleted = p.packs.delete.len() as u64;
                r.pack_bytes_freed = p.packs.delete_bytes;
                r.wal_deleted = p.wal.delete.len() as u64;
                r.wal_bytes_freed = p.wal.delete_bytes;
                r.bytes_freed = p.bytes_freed;
            }
            Err(e) => r.failure = Some(format!("{e:#}")),
        }
        r
    }
}

/// Stores `r` as a new record and deletes all but the newest [`KEEP`]; returns its key.
pub async fn record(store: &Store, r: &ExpireRecord) -> Result<String> {
    let id = format!(
        "{}-{:08x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        crate::verify::random_u64() as u32
    );
    let key = keys::expire_record(&id).context("generated an invalid expire record id")?;
    let body = serde_json::to_vec_pretty(r).context("cannot encode the expire record")?;
    store
        .put_create(&key, Bytes::from(body))
        .await
        .with_context(|| format!("cannot store the expire record {key}"))?;
    let mut all = listed(store).await?;
    all.sort();
    let old = all.len().saturating_sub(KEEP);
    for k in &all[..old] {
        store
            .delete(k)
            .await
            .with_context(|| format!("cannot delete the old expire record {k}"))?;
    }
    Ok(key)
}

async fn listed(store: &Store) -> Result<Vec<String>> {
    Ok(store
        .list(keys::EXPIRE)
        .await
        .context("cannot list expire records")?
        .into_iter()
        .filter(|l| keys::parse_expire_record(&l.key).is_some())
        .map(|l| l.key)
        .collect())
}

/// The newest record under `expire/`, if any.
pub async fn last_recorded(store: &Store) -> Result<Option<ExpireSummary>> {
    let Some(key) = listed(store).await?.into_iter().max() else {
        return Ok(None);
    };
    let body = store
        .get(&key, MAX_RECORD)
        .await
        .with_context(|| format!("cannot read expire record {key}"))?;
    let record: Option<ExpireRecord> = match serde_json::from_slice(&body) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(record = %key, error = %e, hint = "it is informational only; the next expire writes a new one", "unreadable expire record");
            None
        }
    };
    Ok(Some(ExpireSummary {
        ok: record.as_ref().is_some_and(|r| r.ok),
        key,
        record,
    }))
}

/// One line for `info`'s text output.
pub fn render(s: &Option<ExpireSummary>) -> String {
    match s {
        None => "\nlast expire: none recorded\n".into(),
        Some(ExpireSummary {
            key, record: None, ..
        }) => format!("\nlast expire: record {key} is unreadable\n"),
        Some(ExpireSummary {
            record: Some(r), ..
        }) if r.ok => format!(
            "\nlast expire: finished {}, removed {} backups, freed {} bytes ({} packs, {} WAL files)\n",
            r.finished_at, r.backups_removed, r.bytes_freed, r.packs_deleted, r.wal_deleted
        ),
        Some(ExpireSummary {
            record: Some(r), ..
        }) => format!(
            "\nlast expire: FAILED at {}: {}\n",
            r.finished_at,
            r.failure
                .as_deref()
                .and_then(|f| f.lines().next())
                .unwrap_or("?")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_is_recorded_with_its_cause_and_reads_back() {
        let e: Result<Plan> = Err(anyhow::anyhow!(
            "backup 20261121T204012Z has an unreadable manifest"
        )
        .context("expire of database system 7"));
        let r = ExpireRecord::of(1_764_000_000_000_000, &e);
        assert!(!r.ok);
        assert_eq!(r.bytes_freed, 0);
        assert_eq!(
            r.failure.as_deref(),
            Some("expire of database system 7: backup 20261121T204012Z has an unreadable manifest")
        );
        let back: ExpireRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let shown = render(&Some(ExpireSummary {
            key: "expire/x.json".into(),
            ok: false,
            record: Some(r),
        }));
        assert!(
            shown.contains("FAILED") && shown.contains("20261121T204012Z"),
            "{shown}"
        );
        let unreadable = render(&Some(ExpireSummary {
            key: "expire/20261121T204012Z-0a1b2c3d.json".into(),
            ok: false,
            record: None,
        }));
        assert!(unreadable.contains("unreadable"), "{unreadable}");
    }
}
