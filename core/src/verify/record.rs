//! Restore-drill records in the repository (`verify/<id>.json`, FORMAT.md §8.6): written
//! create-only by `verify --record`, read by `tidemark-agent info`. A record is never needed to
//! restore; a damaged or foreign one is reported, never trusted for anything else.

use super::VerifyResult;
use crate::store::Store;
use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Serialize;
use tidemark_format::keys;

/// Largest record read back.
const MAX_RECORD: u64 = 1 << 20;

/// Stores `r` as a new record; returns its key.
pub async fn record(store: &Store, r: &VerifyResult) -> Result<String> {
    let now = chrono::Utc::now();
    let id = format!(
        "{}-{:08x}",
        now.format("%Y%m%dT%H%M%SZ"),
        super::random_u64() as u32
    );
    let key = keys::verify_record(&id).context("generated an invalid restore-drill record id")?;
    let body = serde_json::to_vec_pretty(r).context("cannot encode the drill result")?;
    store
        .put_create(&key, Bytes::from(body))
        .await
        .with_context(|| format!("cannot store the drill record {key}"))?;
    Ok(key)
}

/// The newest drill record, summarised for `info`.
#[derive(Serialize, Clone, Debug)]
pub struct RecordSummary {
    pub key: String,
    pub started_at: Option<String>,
    pub ok: bool,
    pub failure: Option<String>,
    pub target: Option<String>,
    pub backup: Option<String>,
    /// Seconds from the drill's start to a promoted server (only for a passed drill).
    pub rto_seconds: Option<f64>,
    /// File bytes the drill's restore wrote per second (only for a passed drill).
    pub restore_bytes_per_second: Option<f64>,
    /// Stored WAL bytes the drill's server fetched per second from its start to promotion
    /// (only for a passed drill that fetched WAL).
    pub replay_bytes_per_second: Option<f64>,
}

/// The newest record under `verify/`, if any.
pub async fn last_recorded(store: &Store) -> Result<Option<RecordSummary>> {
    let listed = store
        .list(keys::VERIFY)
        .await
        .context("cannot list restore-drill records")?;
    let Some(key) = listed
        .iter()
        .filter(|l| keys::parse_verify_record(&l.key).is_some())
        .map(|l| l.key.clone())
        .max()
    else {
        return Ok(None);
    };
    let body = store
        .get(&key, MAX_RECORD)
        .await
        .with_context(|| format!("cannot read restore-drill record {key}"))?;
    let v: serde_json::Value = serde_json::from_slice(&body).with_context(|| {
        format!("restore-drill record {key} is not JSON\nhint: it is informational only; delete it or run another drill with --record")
    })?;
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_string);
    let ok = v.get("ok").and_then(|x| x.as_bool()).unwrap_or(false);
    Ok(Some(RecordSummary {
        key,
        started_at: s("/started_at"),
        ok,
        failure: s("/failure"),
        target: s("/target/time").or_else(|| s("/target/kind")),
        backup: s("/backup/id"),
        rto_seconds: v
            .pointer("/seconds/rto")
            .and_then(|x| x.as_f64())
            .filter(|_| ok),
        restore_bytes_per_second: rate(&v, "/restore_bytes", "/seconds/restore").filter(|_| ok),
        replay_bytes_per_second: rate(&v, "/wal_bytes_fetched", "/seconds/promote").filter(|_| ok),
    }))
}

/// `bytes / seconds` of a record, when both are there and positive.
fn rate(v: &serde_json::Value, bytes: &str, seconds: &str) -> Option<f64> {
    let b = v.pointer(bytes)?.as_f64()?;
    let s = v.pointer(seconds)?.as_f64()?;
    Some(b / s).filter(|r| b > 0.0 && s > 0.0 && r.is_finite())
}

/// One line for `info`'s text output.
pub fn render(s: &Option<RecordSummary>) -> String {
    match s {
        None => "\nlast verified restore: none recorded (run 'tidemark-restore verify --record')\n"
            .into(),
        Some(s) => format!(
            "\nlast verified restore: {} at {} (backup {}, target {}){}\n",
            if s.ok { "PASSED" } else { "FAILED" },
            s.started_at.as_deref().unwrap_or("?"),
            s.backup.as_deref().unwrap_or("?"),
            s.target.as_deref().unwrap_or("?"),
            match (s.rto_seconds, &s.failure) {
                (Some(rto), _) => format!(", RTO {rto:.1}s"),
                (None, Some(f)) => format!(": {}", f.lines().next().unwrap_or("")),
                _ => String::new(),
            }
        ),
    }
}
