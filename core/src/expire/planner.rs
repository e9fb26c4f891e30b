//! Over 500 lines because it is one pure decision: the retention rules, the WAL needs and the GC
//! choice read the same facts and must be checked together.
//!
//! The expire planner: repository facts and `now` in, the plan out (FORMAT.md 16.3 X1, X2 and
//! 16.4). Pure: no I/O and no clock, so every decision is table-tested (`planner/tests.rs`).
//!
//! The facts arrive in three stages, because each answer decides what the executor reads next:
//! 1. [`judge_leases`]: the other processes' leases (X1). Another live expire is an error; a live
//!    backup defers packs, WAL and repacking to a later run; stale leases are removed.
//! 2. [`retain`]: the backup headers → which backups the policy keeps, and so whose chunk
//!    references the repack's live set needs ([`Retained::needs_chunks`]).
//! 3. [`plan`]: every manifest's pack table, the live set, the pack listing with sizes, the GC
//!    states and the WAL listing → the printed [`Plan`] and the [`Work`] that carries it out.
//!
//! Invariants:
//! - A pack is deleted only when no retained backup's pack table names it and a GC state condemned
//!   it at least the grace period before `now`; a pack found unreferenced for the first time is
//!   condemned at `now`. A retained backup without a pack table in the facts is an error, never
//!   "references nothing".
//! - A live backup lease leaves packs, WAL and repacking alone: only stale leases and manifests go.
//! - WAL below the start segment of the oldest retained backup (from its `backup_label`) is
//!   deleted on every timeline, `.history` files never; with no backup retained, no WAL.
//! - Timelines: the retention rules also run over the backups on the history a restore of
//!   `latest` follows alone, so after a fork older than some backups (a PITR, a failover) a
//!   usable backup and its WAL are always kept; the promised window (`recoverable_from`) opens
//!   at a retained backup on that history, never at one of an abandoned branch.
//! - With a WAL window (`--retain-wal-window`), continuous WAL is kept only from the *anchor*: the
//!   newest retained backup that stopped at or before `now - window` (the oldest retained one if
//!   none did), so every moment of the window stays recoverable. A retained backup older than the
//!   anchor keeps only its own WAL, start segment to stop segment on its own timeline: it restores
//!   to its consistency point only. Without a known segment size nothing narrows (as without a
//!   window).
//! - Manifests are removed oldest first, so a run cut short leaves the newest backups.
//! - After the run a GC state lists only packs that exist, are unreferenced and were not deleted.

use super::plan::{BackupPlan, PackPlan, Plan, WalPlan, WalRangePlan, SCHEMA_VERSION};
use crate::repack::{self, Chosen, LiveSet, RepackOptions, RepackPlan};
use crate::repo::fmt_time;
use crate::retention::{self, BackupFacts, Decision, Policy};
use crate::store::Listed;
use crate::timeline::History;
use anyhow::{anyhow, bail, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tidemark_format::lock::{GcState, LeaseKind};
use tidemark_format::manifest::ManifestHeader;
use tidemark_format::wal::WalFileName;
use tidemark_format::{keys, Lsn, PackId, TimelineId};

#[derive(Clone, Debug)]
pub struct ExpireOptions {
    pub policy: Policy,
    pub dry_run: bool,
    /// How long a pack stays condemned before it may be deleted.
    pub gc_grace: Duration,
    /// Which packs are worth repacking and how much one run copies.
    pub repack: RepackOptions,
    /// `--retain-wal-window`: PITR is kept only inside this recent window (microseconds).
    pub wal_window_us: Option<i64>,
}

/// A lease of another process as the executor found it. Whether it is live depends on the local
/// process table (16.1), so the executor judges that.
#[derive(Clone, Debug)]
pub struct LeaseFact {
    pub key: String,
    pub kind: LeaseKind,
    pub live: bool,
    /// Who holds it and until when, for messages.
    pub holder: String,
}

/// What the leases allow this run (stage 1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseVerdict {
    /// Why packs and WAL are left alone (backups are running), if they are.
    pub deferred: Option<String>,
    /// Stale leases this run removes, sorted.
    pub stale: Vec<String>,
}

/// Stage 1 (X1): fails if another expire is live; live backups defer packs and WAL.
pub fn judge_leases(leases: &[LeaseFact]) -> Result<LeaseVerdict> {
    let mut backups = Vec::new();
    let mut stale = Vec::new();
    for l in leases {
        if !l.live {
            stale.push(l.key.clone());
            continue;
        }
        match l.kind {
            LeaseKind::Expire => bail!(
                "another expire is running in this repository: {}\nhint: wait for it to finish; if its process is gone, its lease expires at the time shown",
                l.holder
            ),
            LeaseKind::Backup => backups.push(l.holder.as_str()),
        }
    }
    stale.sort();
    let deferred = (!backups.is_empty()).then(|| {
        format!(
            "{} backup(s) running ({}); only manifests are removed, packs and WAL are left for the next expire",
            backups.len(),
            backups.join("; ")
        )
    });
    Ok(LeaseVerdict { deferred, stale })
}

/// The backups a run keeps and removes (stage 2), with what the leases allow.
#[derive(Debug)]
pub struct Retained {
    now: i64,
    leases: LeaseVerdict,
    headers: HashMap<String, ManifestHeader>,
    /// Newest first.
    decisions: Vec<Decision>,
    /// The backups on the history a restore of `latest` follows.
    usable: BTreeSet<String>,
}

/// Stage 2: applies the retention policy to the backup headers. `followed` is the history a
/// restore of `latest` follows (`crate::archive::history`): backups off it are on abandoned
/// branches and satisfy no rule alone (`crate::retention`).
pub fn retain(
    opts: &ExpireOptions,
    now: i64,
    leases: LeaseVerdict,
    headers: Vec<ManifestHeader>,
    followed: &History,
) -> Result<Retained> {
    if opts.policy.is_empty() {
        bail!("no retention rule given\nhint: pass at least one of --retain-last, --retain-window, --retain-daily, --retain-weekly, --retain-monthly");
    }
    let facts: Vec<BackupFacts> = headers
        .iter()
        .map(|h| BackupFacts {
            id: h.backup_id.clone(),
            stop_time_us: h.stop_time_us,
            stop_lsn: h.stop_lsn.0,
            usable: followed.contains(h.timeline.0, h.stop_lsn),
        })
        .collect();
    let usable = facts
        .iter()
        .filter(|f| f.usable)
        .map(|f| f.id.clone())
        .collect();
    let decisions = retention::plan(&facts, &opts.policy, now);
    Ok(Retained {
        now,
        leases,
        headers: headers
            .into_iter()
            .map(|h| (h.backup_id.clone(), h))
            .collect(),
        decisions,
        usable,
    })
}

impl Retained {
    /// Whether this run may touch packs and WAL (no backup is running).
    pub fn touches_data(&self) -> bool {
        self.leases.deferred.is_none()
    }

    /// Whether the live set must hold the chunk references of backup `id`: it is kept and this
    /// run may repack.
    pub fn needs_chunks(&self, id: &str) -> bool {
        self.touches_data() && self.decisions.iter().any(|d| d.keep && d.id == id)
    }
}

/// What the repository stores beyond the headers (stage 3).
#[derive(Default)]
pub struct Stored {
    /// Every backup's pack table, from its fully read manifest.
    pub pack_tables: HashMap<String, Vec<PackId>>,
    /// The chunk references of the backups [`Retained::needs_chunks`] names.
    pub live: LiveSet,
    /// `packs/` listed: every pack and its size.
    pub packs: BTreeMap<PackId, u64>,
    /// Every GC state object and its key.
    pub gc_states: Vec<(String, GcState)>,
    /// `wal/` listed; read only when [`Retained::touches_data`].
    pub wal: Vec<Listed>,
    /// The segment size of the archive (from a stored segment's header); needed only to narrow
    /// WAL to a backup's own start..stop range under a WAL window.
    pub seg_size: Option<u64>,
}

/// A GC state object the run replaces by one listing `still` (none if empty), then deletes (X7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRewrite {
    pub key: String,
    pub old: GcState,
    pub still: Vec<PackId>,
}

/// The plan in the executor's terms, in the order of FORMAT.md 16.3.
#[derive(Debug, Default)]
pub struct Work {
    /// X3: stale leases to delete.
    pub stale_leases: Vec<String>,
    /// X3: backups whose manifests are deleted, oldest first.
    pub remove: Vec<String>,
    /// X4: packs to condemn in one new GC state.
    pub condemn: Vec<PackId>,
    /// X5: unreferenced packs condemned at least the grace period ago.
    pub delete: Vec<PackId>,
    /// X5a: packs whose live chunks are copied.
    pub repack: Vec<Chosen>,
    /// X5a: retained backups whose manifests name a repacked pack.
    pub relocate: Vec<String>,
    /// X6: WAL object keys.
    pub wal: Vec<String>,
    /// X7: GC state objects to rewrite or delete.
    pub states: Vec<StateRewrite>,
}

/// Stage 3: the plan and its work.
pub fn plan(r: Retained, opts: &ExpireOptions, stored: Stored) -> Result<(Plan, Work)> {
    let touch = r.touches_data();
    let kept = kept_backups(&r, &stored.pack_tables)?;
    let grace = opts.gc_grace.as_micros() as i64;
    let (packs, condemn, delete, states) =
        pack_steps(&stored, &kept.referenced, r.now, grace, touch);
    let keep = wal_keep(&kept.retained, opts.wal_window_us, stored.seg_size, r.now);
    let (wal, wal_keys) = match keep.as_ref().filter(|_| touch) {
        Some(k) => wal_step(&stored.wal, k),
        None => (WalPlan::default(), Vec::new()),
    };
    let mut backups = kept.backups;
    if let Some(k) = keep.as_ref().filter(|_| opts.wal_window_us.is_some()) {
        for b in backups.iter_mut().filter(|b| b.action == "keep") {
            b.reach = Some(if k.ranges.iter().any(|r| r.backup == b.id) {
                "its consistency point only".into()
            } else {
                "point in time from its stop".into()
            });
        }
    }
    let (repack, chosen, relocate) = if touch {
        repack_step(stored.live, &stored.packs, &stored.pack_tables, &r, opts)?
    } else {
        (RepackPlan::default(), Vec::new(), Vec::new())
    };
    let bytes_freed = packs.delete_bytes + wal.delete_bytes;
    let plan = Plan {
        schema_version: SCHEMA_VERSION,
        dry_run: opts.dry_run,
        now: fmt_time(r.now),
        policy: opts.policy.clone(),
        gc_grace_seconds: opts.gc_grace.as_secs(),
        wal_window_seconds: opts.wal_window_us.map(|w| (w / 1_000_000) as u64),
        backups,
        recoverable_from: keep.as_ref().and_then(|k| k.recoverable_from).map(fmt_time),
        deferred: r.leases.deferred,
        wal,
        packs,
        repack,
        stale_leases: r.leases.stale.clone(),
        bytes_freed,
    };
    let work = Work {
        stale_leases: r.leases.stale,
        remove: kept.remove,
        condemn,
        delete,
        repack: chosen,
        relocate,
        wal: wal_keys,
        states,
    };
    Ok((plan, work))
}

/// The backup half of the plan.
struct Kept {
    /// Newest first, as printed.
    backups: Vec<BackupPlan>,
    /// Oldest first.
    remove: Vec<String>,
    /// Packs named by a retained backup's pack table.
    referenced: BTreeSet<PackId>,
    /// The retained backups' WAL facts, newest first.
    retained: Vec<RetainedWal>,
}

/// What the WAL step needs of one retained backup.
struct RetainedWal {
    id: String,
    tli: u32,
    /// Start segment (log, segment), from its `backup_label`.
    start: (u32, u32),
    stop_lsn: u64,
    stop_us: i64,
    /// On the history a restore of `latest` follows.
    usable: bool,
}

/// Which WAL a run keeps: everything from `from` on every timeline, plus each range.
#[derive(Debug)]
struct WalKeep {
    from: (u32, u32),
    ranges: Vec<WalRange>,
    /// The earliest point in time restorable (on the latest timeline) after the run; `None`
    /// when no retained backup lies on its history.
    recoverable_from: Option<i64>,
}

fn kept_backups(r: &Retained, pack_tables: &HashMap<String, Vec<PackId>>) -> Result<Kept> {
    let mut k = Kept {
        backups: Vec::new(),
        remove: Vec::new(),
        referenced: BTreeSet::new(),
        retained: Vec::new(),
    };
    for d in &r.decisions {
        let h = r
            .headers
            .get(&d.id)
            .ok_or_else(|| anyhow!("backup {} vanished from the plan", d.id))?;
        if d.keep {
            let table = pack_tables.get(&d.id).ok_or_else(|| {
                anyhow!(
                    "the pack table of retained backup {} was not read; no pack is deleted without it",
                    d.id
                )
            })?;
            k.referenced.extend(table.iter().copied());
            k.retained.push(RetainedWal {
                id: d.id.clone(),
                tli: h.timeline.0,
                start: label_start_segment(h)?,
                stop_lsn: h.stop_lsn.0,
                stop_us: h.stop_time_us,
                usable: r.usable.contains(&d.id),
            });
        } else {
            k.remove.push(d.id.clone());
        }
        k.backups.push(BackupPlan {
            id: d.id.clone(),
            timeline: h.timeline.0,
            start_lsn: h.start_lsn.to_string(),
            stop_lsn: h.stop_lsn.to_string(),
            stop_time: fmt_time(h.stop_time_us),
            action: if d.keep { "keep" } else { "remove" }.into(),
            reasons: d.reasons.clone(),
            reach: None,
        });
    }
    // Oldest first: a crash part-way leaves the newest backups, which every rule prefers.
    k.remove.reverse();
    Ok(k)
}

/// X4, X5 and X7: which unreferenced packs are condemned, which are deleted, and what each GC
/// state lists afterwards.
fn pack_steps(
    stored: &Stored,
    referenced: &BTreeSet<PackId>,
    now: i64,
    grace: i64,
    touch: bool,
) -> (PackPlan, Vec<PackId>, Vec<PackId>, Vec<StateRewrite>) {
    let mut condemned_at: HashMap<PackId, i64> = HashMap::new();
    for (_, s) in &stored.gc_states {
        for p in &s.packs {
            let at = condemned_at.entry(*p).or_insert(s.condemned_us);
            *at = (*at).min(s.condemned_us);
        }
    }
    let mut plan = PackPlan {
        total: stored.packs.len() as u64,
        referenced: stored
            .packs
            .keys()
            .filter(|p| referenced.contains(p))
            .count() as u64,
        ..Default::default()
    };
    let mut condemn = Vec::new();
    let mut delete = Vec::new();
    if touch {
        for (p, size) in stored.packs.iter().filter(|(p, _)| !referenced.contains(p)) {
            let at = match condemned_at.get(p) {
                Some(t) => *t,
                None => {
                    condemn.push(*p);
                    now
                }
            };
            if at <= now - grace {
                delete.push(*p);
                plan.delete_bytes += size;
            } else {
                plan.waiting += 1;
            }
        }
    }
    plan.condemn = condemn.iter().map(ToString::to_string).collect();
    plan.delete = delete.iter().map(ToString::to_string).collect();
    let deleted: BTreeSet<PackId> = delete.iter().copied().collect();
    let states = stored
        .gc_states
        .iter()
        .filter_map(|(key, old)| {
            let still: Vec<PackId> = old
                .packs
                .iter()
                .filter(|p| {
                    stored.packs.contains_key(p) && !referenced.contains(p) && !deleted.contains(p)
                })
                .copied()
                .collect();
            (still != old.packs).then(|| StateRewrite {
                key: key.clone(),
                old: old.clone(),
                still,
            })
        })
        .collect();
    (plan, condemn, delete, states)
}

/// X6's decision: the WAL the retained backups need. Without a window (or a segment size), every
/// timeline from the oldest retained backup's start; with one, from the anchor's start (see the
/// module invariants) and each older retained backup's own start..stop range on its timeline.
/// Only a backup on the history of the latest timeline can open the recoverable window or be
/// the anchor (one of an abandoned branch cannot start that recovery); when none is retained,
/// the rules fall back to every retained backup and nothing is promised. `None` when no backup
/// is retained.
fn wal_keep(
    retained: &[RetainedWal],
    window: Option<i64>,
    seg_size: Option<u64>,
    now: i64,
) -> Option<WalKeep> {
    let order = |b: &&RetainedWal| (b.stop_us, b.stop_lsn);
    let any_usable = retained.iter().any(|b| b.usable);
    let candidates = || retained.iter().filter(move |b| b.usable || !any_usable);
    let oldest = candidates().min_by_key(order)?;
    let promise = |b: &RetainedWal| any_usable.then_some(b.stop_us);
    let (Some(window), Some(seg_size)) = (window, seg_size) else {
        return Some(WalKeep {
            from: retained.iter().map(|b| b.start).min()?,
            ranges: Vec::new(),
            recoverable_from: promise(oldest),
        });
    };
    let edge = now.saturating_sub(window);
    let anchor = candidates()
        .filter(|b| b.stop_us <= edge)
        .max_by_key(order)
        .unwrap_or(oldest);
    // Every backup from the anchor on needs its WAL onwards (a newer backup on another timeline
    // may start below the anchor).
    let from = retained
        .iter()
        .filter(|b| order(b) >= order(&anchor))
        .map(|b| b.start)
        .min()?;
    let mut ranges: Vec<WalRange> = retained
        .iter()
        .filter(|b| order(b) < order(&anchor) && b.start < from)
        .map(|b| {
            let stop = match WalFileName::segment_of(TimelineId(b.tli), Lsn(b.stop_lsn), seg_size) {
                WalFileName::Segment { log, seg, .. } => (log, seg),
                _ => b.start,
            };
            WalRange {
                backup: b.id.clone(),
                timeline: b.tli,
                from: b.start,
                to: stop.max(b.start),
            }
        })
        .collect();
    ranges.sort_by_key(|r| (r.from, r.timeline));
    Some(WalKeep {
        from,
        ranges,
        recoverable_from: promise(anchor),
    })
}

/// One older backup's own WAL: segments `from..=to` (log, segment) on `timeline`.
#[derive(Debug)]
struct WalRange {
    backup: String,
    timeline: u32,
    from: (u32, u32),
    to: (u32, u32),
}

fn segment_text(pos: (u32, u32)) -> String {
    format!("{:08X}{:08X}", pos.0, pos.1)
}

/// X6: WAL objects before `keep.from` (log, segment) on any timeline, except those inside a
/// kept backup's own range on its timeline; never `.history`.
fn wal_step(listing: &[Listed], keep: &WalKeep) -> (WalPlan, Vec<String>) {
    let from = keep.from;
    let mut plan = WalPlan {
        keep_from_segment: Some(segment_text(from)),
        keep_ranges: keep
            .ranges
            .iter()
            .map(|r| WalRangePlan {
                backup: r.backup.clone(),
                timeline: r.timeline,
                from_segment: segment_text(r.from),
                to_segment: segment_text(r.to),
            })
            .collect(),
        ..Default::default()
    };
    let mut delete = Vec::new();
    for l in listing {
        let Some(n) = keys::parse_wal(&l.key) else {
            continue;
        };
        let tli = n.timeline().0;
        let in_range = |pos: (u32, u32)| {
            keep.ranges
                .iter()
                .any(|r| r.timeline == tli && r.from <= pos && pos <= r.to)
        };
        if wal_position(&n).is_some_and(|pos| pos < from && !in_range(pos)) {
            plan.delete_bytes += l.size;
            plan.delete.push(l.key.clone());
            delete.push(l.key.clone());
        }
    }
    (plan, delete)
}

/// X5a: the packs worth repacking, and the retained backups whose manifests then move.
fn repack_step(
    live: LiveSet,
    sizes: &BTreeMap<PackId, u64>,
    pack_tables: &HashMap<String, Vec<PackId>>,
    r: &Retained,
    opts: &ExpireOptions,
) -> Result<(RepackPlan, Vec<Chosen>, Vec<String>)> {
    let (mut plan, chosen) = repack::choose(live, sizes, &opts.repack)?;
    let moved: BTreeSet<PackId> = chosen.iter().map(|c| c.pack).collect();
    let mut relocate: Vec<String> = r
        .decisions
        .iter()
        .filter(|d| d.keep)
        .filter(|d| {
            pack_tables
                .get(&d.id)
                .is_some_and(|t| t.iter().any(|p| moved.contains(p)))
        })
        .map(|d| d.id.clone())
        .collect();
    relocate.sort();
    plan.rewrite_manifests = relocate.clone();
    Ok((plan, chosen, relocate))
}

/// The start segment named in a backup label (`START WAL LOCATION: x/y (file NAME)`).
fn label_start_segment(h: &ManifestHeader) -> Result<(u32, u32)> {
    let label = String::from_utf8_lossy(&h.backup_label);
    let name = label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
        .and_then(|l| l.split_once("(file ")?.1.strip_suffix(')'))
        .ok_or_else(|| {
            anyhow!(
                "backup {} has a backup_label without a START WAL LOCATION file",
                h.backup_id
            )
        })?;
    match WalFileName::parse(name.trim()) {
        Ok(WalFileName::Segment { log, seg, .. }) => Ok((log, seg)),
        _ => bail!(
            "backup {} has a backup_label naming {name:?} as its start segment",
            h.backup_id
        ),
    }
}

/// Where a WAL file sits in the log (any timeline); `None` for `.history` files.
fn wal_position(n: &WalFileName) -> Option<(u32, u32)> {
    match *n {
        WalFileName::Segment { log, seg, .. }
        | WalFileName::Partial { log, seg, .. }
        | WalFileName::BackupHistory { log, seg, .. } => Some((log, seg)),
        WalFileName::History { .. } => None,
    }
}

#[cfg(test)]
mod tests;
