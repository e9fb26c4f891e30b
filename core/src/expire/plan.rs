//! The plan of an expire as it is printed: `expire --json` is [`Plan`] serialised, `expire` without
//! it is [`render`]. The same value is printed by `--dry-run` and by the real run that executes it.

use crate::repack::RepackPlan;
use crate::retention::Policy;
use serde::Serialize;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackupPlan {
    pub id: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub stop_time: String,
    /// "keep" or "remove".
    pub action: String,
    pub reasons: Vec<String>,
    /// With `--retain-wal-window`, what a kept backup can still reach after the run: "point in
    /// time from its stop" or "its consistency point only"; `null` without a window.
    pub reach: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq, Default)]
pub struct WalPlan {
    /// WAL segments before this one (log and segment number, any timeline) are removed;
    /// `null` when no backup is retained or WAL removal is deferred.
    pub keep_from_segment: Option<String>,
    /// With `--retain-wal-window`: the older retained backups that keep only their own WAL, each
    /// range on its timeline (WAL below `keep_from_segment` outside these ranges is removed).
    pub keep_ranges: Vec<WalRangePlan>,
    pub delete: Vec<String>,
    pub delete_bytes: u64,
}

/// One backup's own WAL, kept so that it restores to its consistency point.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WalRangePlan {
    pub backup: String,
    pub timeline: u32,
    /// First and last segment (log and segment number) kept on `timeline`.
    pub from_segment: String,
    pub to_segment: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq, Default)]
pub struct PackPlan {
    pub total: u64,
    pub referenced: u64,
    /// Unreferenced packs condemned by this run (recorded before any pack is deleted).
    pub condemn: Vec<String>,
    /// Unreferenced packs condemned at least the grace period ago: deleted by this run.
    pub delete: Vec<String>,
    pub delete_bytes: u64,
    /// Unreferenced packs still inside their grace period.
    pub waiting: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Plan {
    pub schema_version: u32,
    pub dry_run: bool,
    pub now: String,
    pub policy: Policy,
    pub gc_grace_seconds: u64,
    /// `--retain-wal-window` in seconds: point-in-time recovery is kept only inside it.
    pub wal_window_seconds: Option<u64>,
    /// Newest first.
    pub backups: Vec<BackupPlan>,
    /// The earliest point in time restorable after this run: the stop time of the oldest retained
    /// backup (WAL is kept from its start on every timeline); with a WAL window, of the newest
    /// retained backup that stopped at or before its start (the oldest if none did). Only
    /// backups on the history of the latest timeline count; `null` when none is retained.
    pub recoverable_from: Option<String>,
    /// Why packs and WAL are left alone by this run, if they are.
    pub deferred: Option<String>,
    pub wal: WalPlan,
    pub packs: PackPlan,
    /// Mostly-garbage packs whose live chunks this run copies into new packs (16.5).
    pub repack: RepackPlan,
    /// Leases of processes that are gone, removed by this run.
    pub stale_leases: Vec<String>,
    /// Bytes this run deletes (manifests not counted).
    pub bytes_freed: u64,
}

/// Plain-text rendering of a plan.
pub fn render(p: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let verb = if p.dry_run { "would" } else { "did" };
    let _ = writeln!(
        s,
        "expire plan at {}{}",
        p.now,
        if p.dry_run {
            " (dry run: nothing deleted)"
        } else {
            ""
        }
    );
    for b in &p.backups {
        let _ = writeln!(
            s,
            "  {:6} {}  timeline {}  stopped {}  ({}){}",
            b.action,
            b.id,
            b.timeline,
            b.stop_time,
            b.reasons.join("; "),
            b.reach
                .as_deref()
                .map(|r| format!("  reach: {r}"))
                .unwrap_or_default()
        );
    }
    match &p.recoverable_from {
        Some(t) if p.wal_window_seconds.is_some() => {
            let _ = writeln!(
                s,
                "recoverable after this run: any time from {t} to the newest archived WAL (WAL window {}s); older backups to their consistency point only",
                p.wal_window_seconds.unwrap_or_default()
            );
        }
        Some(t) => {
            let _ = writeln!(
                s,
                "recoverable after this run: any time from {t} to the newest archived WAL"
            );
        }
        None if p.backups.iter().any(|b| b.action == "keep") => {
            let _ = writeln!(
                s,
                "no retained backup lies on the history of the latest timeline: a restore of it is not possible (only --target-timeline current)"
            );
        }
        None => {
            let _ = writeln!(s, "no backups: nothing is recoverable");
        }
    }
    if let Some(d) = &p.deferred {
        let _ = writeln!(s, "deferred: {d}");
    }
    let _ = writeln!(
        s,
        "packs: {} total, {} referenced; {verb} condemn {}, {verb} delete {} ({} bytes), {} in grace period",
        p.packs.total,
        p.packs.referenced,
        p.packs.condemn.len(),
        p.packs.delete.len(),
        p.packs.delete_bytes,
        p.packs.waiting
    );
    if !p.repack.packs.is_empty() || p.repack.over_budget > 0 {
        let _ = writeln!(
            s,
            "repack: {verb} copy {} live bytes out of {} mostly-garbage packs and relocate {} backups; {} bytes freed once the old packs pass the grace period; {} more packs over the budget of {} bytes",
            p.repack.live_bytes,
            p.repack.packs.len(),
            p.repack.rewrite_manifests.len(),
            p.repack.reclaim_bytes,
            p.repack.over_budget,
            p.repack.budget_bytes
        );
    }
    let _ = writeln!(
        s,
        "wal: keep from segment {}; {verb} delete {} objects ({} bytes)",
        p.wal.keep_from_segment.as_deref().unwrap_or("-"),
        p.wal.delete.len(),
        p.wal.delete_bytes
    );
    for r in &p.wal.keep_ranges {
        let _ = writeln!(
            s,
            "wal: also keep {}..{} on timeline {} ({}: its consistency point only)",
            r.from_segment, r.to_segment, r.timeline, r.backup
        );
    }
    if !p.stale_leases.is_empty() {
        let _ = writeln!(s, "stale leases removed: {}", p.stale_leases.join(", "));
    }
    let _ = writeln!(s, "bytes freed: {}", p.bytes_freed);
    s
}
