//! `expire`: the retention plan (which backups go, which WAL and packs nothing needs any more) and
//! its execution. FORMAT.md sections 10.4 and 16 define the order; in short:
//!
//! 1. take the exclusive expire lease; note live backup leases (then only manifests are removed,
//!    packs and WAL wait for a run with no backup in flight);
//! 2. read every manifest fully (a damaged one stops expire before anything is deleted);
//! 3. delete the expired manifests, oldest first;
//! 4. condemn (record in a new `gc/` state object) every pack no remaining manifest names;
//! 5. delete packs condemned at least `gc_grace` ago that are still unreferenced;
//! 6. delete WAL older than the oldest retained backup's start segment (never `.history`);
//! 7. rewrite or delete GC state objects so they list only packs still condemned; release.
//!
//! Invariants: the plan printed by `--dry-run` is computed by the same function as the plan a real
//! run executes; every delete is preceded by a check that the lease is still held; a crash at any
//! step leaves only complete backups whose packs and WAL exist, and a rerun finishes the job.

use crate::lease::{self, LeaseHandle};
use crate::repack::{self, LiveSet, RepackOptions, RepackPlan};
use crate::repo;
use crate::retention::{self, BackupFacts, Policy};
use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tidemark_format::lock::{GcState, LeaseKind};
use tidemark_format::manifest::ManifestHeader;
use tidemark_format::wal::WalFileName;
use tidemark_format::{keys, PackId};

pub const SCHEMA_VERSION: u32 = 1;
/// Deletions between two confirmations that the lease object still exists.
const CONFIRM_EVERY: usize = 16;

#[derive(Clone, Debug)]
pub struct ExpireOptions {
    pub policy: Policy,
    pub dry_run: bool,
    /// How long a pack stays condemned before it may be deleted.
    pub gc_grace: Duration,
    /// Which packs are worth repacking and how much one run copies.
    pub repack: RepackOptions,
}

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
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq, Default)]
pub struct WalPlan {
    /// WAL segments before this one (log and segment number, any timeline) are removed;
    /// `null` when no backup is retained or WAL removal is deferred.
    pub keep_from_segment: Option<String>,
    pub delete: Vec<String>,
    pub delete_bytes: u64,
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
    /// Newest first.
    pub backups: Vec<BackupPlan>,
    /// The earliest point in time restorable after this run: the stop time of the oldest retained
    /// backup (WAL is kept from its start on every timeline).
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

/// What the executor needs beyond the printed plan.
struct Work {
    remove: Vec<String>,
    condemn: Vec<PackId>,
    delete: Vec<PackId>,
    wal: Vec<String>,
    /// GC state key -> packs it should still list after this run (None: unchanged).
    states: Vec<(String, GcState, Vec<PackId>)>,
    repack: Vec<repack::Chosen>,
    /// Backups whose manifests name a repacked pack.
    relocate: Vec<String>,
    pack_target: u64,
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

fn wal_position(n: &WalFileName) -> Option<(u32, u32)> {
    match *n {
        WalFileName::Segment { log, seg, .. }
        | WalFileName::Partial { log, seg, .. }
        | WalFileName::BackupHistory { log, seg, .. } => Some((log, seg)),
        WalFileName::History { .. } => None,
    }
}

/// Computes the plan against the repository as it is now. `deferred` says why packs and WAL are
/// left alone (a backup is running).
async fn compute(
    store: &Store,
    opts: &ExpireOptions,
    now: i64,
    deferred: Option<String>,
    stale_leases: Vec<String>,
) -> Result<(Plan, Work)> {
    let config = repo::require_config(store).await?;
    if opts.policy.is_empty() {
        bail!("no retention rule given\nhint: pass at least one of --retain-last, --retain-window, --retain-daily, --retain-weekly, --retain-monthly");
    }
    let headers = repo::list_backups(store).await?;
    let facts: Vec<BackupFacts> = headers
        .iter()
        .map(|h| BackupFacts {
            id: h.backup_id.clone(),
            stop_time_us: h.stop_time_us,
            stop_lsn: h.stop_lsn.0,
        })
        .collect();
    let decisions = retention::plan(&facts, &opts.policy, now);
    let kept: BTreeSet<&str> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.id.as_str())
        .collect();
    // Computed with a zero budget too: the plan then counts the packs worth repacking.
    let repacking = deferred.is_none();
    // Full reads: a damaged manifest stops expire here, before anything is deleted (its pack table
    // could under-report what it references).
    let mut packs_of: HashMap<String, Vec<PackId>> = HashMap::new();
    let mut by_id: HashMap<String, ManifestHeader> = HashMap::new();
    let mut live = LiveSet::default();
    for h in &headers {
        let m = repo::load_manifest(store, &h.backup_id).await?;
        if repacking && kept.contains(h.backup_id.as_str()) {
            live.add(&m);
        }
        packs_of.insert(h.backup_id.clone(), m.packs);
        by_id.insert(h.backup_id.clone(), m.header);
    }
    let mut backups = Vec::new();
    let mut remove = Vec::new();
    let mut referenced: BTreeSet<PackId> = BTreeSet::new();
    let mut keep_from: Option<(u32, u32)> = None;
    let mut recoverable_from: Option<i64> = None;
    for d in &decisions {
        let h = by_id
            .get(&d.id)
            .ok_or_else(|| anyhow!("backup {} vanished from the plan", d.id))?;
        if d.keep {
            referenced.extend(packs_of.get(&d.id).into_iter().flatten().copied());
            let start = label_start_segment(h)?;
            keep_from = Some(keep_from.map_or(start, |k| k.min(start)));
            recoverable_from =
                Some(recoverable_from.map_or(h.stop_time_us, |r| r.min(h.stop_time_us)));
        } else {
            remove.push(d.id.clone());
        }
        backups.push(BackupPlan {
            id: d.id.clone(),
            timeline: h.timeline.0,
            start_lsn: h.start_lsn.to_string(),
            stop_lsn: h.stop_lsn.to_string(),
            stop_time: repo::fmt_time(h.stop_time_us),
            action: if d.keep { "keep" } else { "remove" }.into(),
            reasons: d.reasons.clone(),
        });
    }
    // Oldest first: a crash part-way leaves the newest backups, which every rule prefers.
    remove.reverse();

    let listed_packs: BTreeMap<PackId, u64> = store
        .list(keys::PACKS)
        .await
        .context("cannot list packs")?
        .into_iter()
        .filter_map(|l| Some((keys::parse_pack(&l.key)?, l.size)))
        .collect();
    let mut condemned_at: HashMap<PackId, i64> = HashMap::new();
    let mut old_states = Vec::new();
    for l in store.list(keys::GC).await.context("cannot list gc state")? {
        if keys::parse_gc_state(&l.key).is_none() {
            continue;
        }
        let b = store
            .get(&l.key, 1 << 30)
            .await
            .with_context(|| format!("cannot read gc state {}", l.key))?;
        let s = GcState::decode(&b).with_context(|| format!("gc state {} is unreadable", l.key))?;
        for p in &s.packs {
            let e = condemned_at.entry(*p).or_insert(s.condemned_us);
            *e = (*e).min(s.condemned_us);
        }
        old_states.push((l.key, s));
    }
    let unreferenced: Vec<PackId> = listed_packs
        .keys()
        .filter(|p| !referenced.contains(p))
        .copied()
        .collect();
    let grace = opts.gc_grace.as_micros() as i64;
    let mut pack_plan = PackPlan {
        total: listed_packs.len() as u64,
        referenced: listed_packs
            .keys()
            .filter(|p| referenced.contains(p))
            .count() as u64,
        ..Default::default()
    };
    let mut condemn = Vec::new();
    let mut delete = Vec::new();
    let mut wal = WalPlan::default();
    let mut wal_keys = Vec::new();
    if deferred.is_none() {
        for p in &unreferenced {
            let at = match condemned_at.get(p) {
                Some(t) => *t,
                None => {
                    condemn.push(*p);
                    now
                }
            };
            if at <= now - grace {
                delete.push(*p);
                pack_plan.delete_bytes += listed_packs.get(p).copied().unwrap_or(0);
            } else {
                pack_plan.waiting += 1;
            }
        }
        if let Some(k) = keep_from {
            wal.keep_from_segment = Some(format!("{:08X}{:08X}", k.0, k.1));
            for l in store.list(keys::WAL).await.context("cannot list wal")? {
                let Some(n) = keys::parse_wal(&l.key) else {
                    continue;
                };
                if wal_position(&n).is_some_and(|pos| pos < k) {
                    wal.delete_bytes += l.size;
                    wal.delete.push(l.key.clone());
                    wal_keys.push(l.key);
                }
            }
        }
    }
    pack_plan.condemn = condemn.iter().map(ToString::to_string).collect();
    pack_plan.delete = delete.iter().map(ToString::to_string).collect();
    // After this run a state lists only packs that exist, are unreferenced and not deleted.
    let deleted: BTreeSet<PackId> = delete.iter().copied().collect();
    let states = old_states
        .into_iter()
        .map(|(k, s)| {
            let still: Vec<PackId> = s
                .packs
                .iter()
                .filter(|p| {
                    listed_packs.contains_key(p) && !referenced.contains(p) && !deleted.contains(p)
                })
                .copied()
                .collect();
            (k, s, still)
        })
        .filter(|(_, s, still)| *still != s.packs)
        .collect();
    let (mut repack_plan, chosen) = repack::choose(live, &listed_packs, &opts.repack);
    let moved: BTreeSet<PackId> = chosen.iter().map(|c| c.pack).collect();
    let mut relocate: Vec<String> = kept
        .iter()
        .filter(|id| {
            packs_of
                .get(**id)
                .is_some_and(|ps| ps.iter().any(|p| moved.contains(p)))
        })
        .map(|id| id.to_string())
        .collect();
    relocate.sort();
    repack_plan.rewrite_manifests = relocate.clone();
    if !repacking {
        repack_plan = RepackPlan::default();
    }
    let bytes_freed = pack_plan.delete_bytes + wal.delete_bytes;
    let plan = Plan {
        schema_version: SCHEMA_VERSION,
        dry_run: opts.dry_run,
        now: repo::fmt_time(now),
        policy: opts.policy.clone(),
        gc_grace_seconds: opts.gc_grace.as_secs(),
        backups,
        recoverable_from: recoverable_from.map(repo::fmt_time),
        deferred,
        wal,
        packs: pack_plan,
        repack: repack_plan,
        stale_leases,
        bytes_freed,
    };
    Ok((
        plan,
        Work {
            remove,
            condemn,
            delete,
            wal: wal_keys,
            states,
            repack: chosen,
            relocate,
            pack_target: u64::from(config.pack_target),
        },
    ))
}

/// Looks at the leases: fails if another expire is live; returns why packs/WAL must wait (live
/// backups) and the stale leases to remove.
async fn survey_leases(
    store: &Store,
    own: Option<&str>,
    now: i64,
) -> Result<(Option<String>, Vec<String>)> {
    let mut backups = Vec::new();
    let mut stale = Vec::new();
    for l in lease::list(store).await? {
        if Some(l.key.as_str()) == own {
            continue;
        }
        if !l.is_live(now) {
            stale.push(l.key.clone());
            continue;
        }
        match l.lease.kind {
            LeaseKind::Expire => bail!(
                "another expire is running in this repository: {}\nhint: wait for it to finish; if its process is gone, its lease expires at the time shown",
                l.describe()
            ),
            LeaseKind::Backup => backups.push(l.describe()),
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
    Ok((deferred, stale))
}

/// Plans (and unless `dry_run`, executes) an expire. Returns the plan.
pub async fn run(store: &Store, opts: &ExpireOptions) -> Result<Plan> {
    if opts.dry_run {
        let now = lease::now_us();
        let (deferred, stale) = survey_leases(store, None, now).await?;
        return Ok(compute(store, opts, now, deferred, stale).await?.0);
    }
    repo::require_config(store).await?;
    let held = LeaseHandle::acquire(store, LeaseKind::Expire).await?;
    let r = execute(store, opts, &held).await;
    match r {
        Ok(plan) => {
            held.release().await?;
            Ok(plan)
        }
        Err(e) => {
            // Another expire may have been detected: our own lease must not linger.
            let _ = held.release().await;
            Err(e)
        }
    }
}

struct Guard<'a> {
    lease: &'a LeaseHandle,
    since_confirm: usize,
}

impl Guard<'_> {
    /// Called before every delete: confirms the lease by its own clock every time, and that its
    /// object still exists every [`CONFIRM_EVERY`] deletes.
    async fn before_delete(&mut self) -> Result<()> {
        if self.since_confirm == 0 || self.since_confirm >= CONFIRM_EVERY {
            self.lease.check().await?;
            self.since_confirm = 0;
        } else {
            self.lease.check_local()?;
        }
        self.since_confirm += 1;
        Ok(())
    }
}

async fn execute(store: &Store, opts: &ExpireOptions, held: &LeaseHandle) -> Result<Plan> {
    let now = lease::now_us();
    let own = held.key();
    let (deferred, stale) = survey_leases(store, Some(&own), now).await?;
    crate::testhooks::crash_point("leased");
    let (plan, work) = compute(store, opts, now, deferred, stale.clone()).await?;
    let mut g = Guard {
        lease: held,
        since_confirm: 0,
    };
    for k in &stale {
        g.before_delete().await?;
        store
            .delete(k)
            .await
            .with_context(|| format!("cannot delete stale lease {k}"))?;
    }
    for (i, id) in work.remove.iter().enumerate() {
        g.before_delete().await?;
        store
            .delete(&keys::manifest(id))
            .await
            .with_context(|| format!("cannot delete the manifest of backup {id}"))?;
        tracing::info!(backup = %id, "backup removed");
        if i == 0 {
            crate::testhooks::crash_point("manifest");
        }
    }
    crate::testhooks::crash_point("manifests");
    if !work.condemn.is_empty() {
        let mut packs = work.condemn.clone();
        packs.sort();
        let state = GcState {
            condemned_us: now,
            packs,
        };
        let key = keys::gc_state(&lease::nonce()).ok_or_else(|| anyhow!("bad gc state nonce"))?;
        held.check().await?;
        store
            .put_create(&key, Bytes::from(state.encode()))
            .await
            .with_context(|| format!("cannot write gc state {key}"))?;
    }
    crate::testhooks::crash_point("condemned");
    for (i, p) in work.delete.iter().enumerate() {
        g.before_delete().await?;
        store
            .delete(&keys::pack(p))
            .await
            .with_context(|| format!("cannot delete pack {p}"))?;
        if i == 0 {
            crate::testhooks::crash_point("pack");
        }
    }
    crate::testhooks::crash_point("packs");
    let new_packs = repack_and_relocate(store, &work, &mut g, now).await?;
    for (i, k) in work.wal.iter().enumerate() {
        g.before_delete().await?;
        store
            .delete(k)
            .await
            .with_context(|| format!("cannot delete wal object {k}"))?;
        if i == 0 {
            crate::testhooks::crash_point("wal");
        }
    }
    crate::testhooks::crash_point("wals");
    for (key, old, still) in &work.states {
        g.before_delete().await?;
        // A pack the repack just wrote again (same bytes, same id) is referenced now.
        let still: Vec<PackId> = still
            .iter()
            .filter(|p| !new_packs.contains(p))
            .copied()
            .collect();
        if !still.is_empty() {
            let new = GcState {
                condemned_us: old.condemned_us,
                packs: still,
            };
            let nk =
                keys::gc_state(&lease::nonce()).ok_or_else(|| anyhow!("bad gc state nonce"))?;
            store
                .put_create(&nk, Bytes::from(new.encode()))
                .await
                .with_context(|| format!("cannot write gc state {nk}"))?;
        }
        store
            .delete(key)
            .await
            .with_context(|| format!("cannot delete gc state {key}"))?;
    }
    crate::testhooks::crash_point("states");
    Ok(plan)
}

/// Repack (FORMAT.md 16.5): copy the live chunks of the chosen packs into new packs, replace each
/// manifest that names one with its relocated version, then condemn the old packs (a later expire
/// deletes them after the grace period). Returns the packs written.
async fn repack_and_relocate(
    store: &Store,
    work: &Work,
    g: &mut Guard<'_>,
    now: i64,
) -> Result<BTreeSet<PackId>> {
    if work.repack.is_empty() {
        return Ok(BTreeSet::new());
    }
    g.lease.check().await?;
    let moved = repack::copy(store, work.pack_target, &work.repack).await?;
    crate::testhooks::crash_point("repacked-packs");
    for (i, id) in work.relocate.iter().enumerate() {
        let mut m = repo::load_manifest(store, id).await?;
        if !repack::relocate(&mut m, &moved)? {
            continue;
        }
        let bytes = Bytes::from(m.encode());
        // The replacement must read back as the same backup before it replaces the original.
        let check = tidemark_format::manifest::Manifest::decode(&bytes)
            .with_context(|| format!("the relocated manifest of backup {id} does not decode"))?;
        anyhow::ensure!(
            check.header == m.header && check.entries.len() == m.entries.len(),
            "the relocated manifest of backup {id} differs from the backup"
        );
        g.before_delete().await?;
        store
            .put_replace(&keys::manifest(id), bytes)
            .await
            .with_context(|| format!("cannot replace the manifest of backup {id}"))?;
        tracing::info!(backup = %id, "manifest relocated to repacked packs");
        if i == 0 {
            crate::testhooks::crash_point("relocated");
        }
    }
    let mut old: Vec<PackId> = work.repack.iter().map(|c| c.pack).collect();
    old.sort();
    let key = keys::gc_state(&lease::nonce()).ok_or_else(|| anyhow!("bad gc state nonce"))?;
    g.lease.check().await?;
    store
        .put_create(
            &key,
            Bytes::from(
                GcState {
                    condemned_us: now,
                    packs: old,
                }
                .encode(),
            ),
        )
        .await
        .with_context(|| format!("cannot write gc state {key}"))?;
    crate::testhooks::crash_point("repacked");
    Ok(moved.new_packs.iter().copied().collect())
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
            "  {:6} {}  timeline {}  stopped {}  ({})",
            b.action,
            b.id,
            b.timeline,
            b.stop_time,
            b.reasons.join("; ")
        );
    }
    match &p.recoverable_from {
        Some(t) => {
            let _ = writeln!(
                s,
                "recoverable after this run: any time from {t} to the newest archived WAL"
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
    if !p.stale_leases.is_empty() {
        let _ = writeln!(s, "stale leases removed: {}", p.stale_leases.join(", "));
    }
    let _ = writeln!(s, "bytes freed: {}", p.bytes_freed);
    s
}
