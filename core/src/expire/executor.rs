//! The expire executor: gathers the repository's facts for the planner and carries out its
//! [`Work`] in the order of FORMAT.md 16.3 (X3 stale leases and manifests, X4 condemn, X5 delete
//! packs, X5a repack, X6 WAL, X7 GC states), with a named crash point after each step for the
//! kill-9 tests (`crate::testhooks`).
//!
//! Invariants: every delete and every manifest replacement is preceded by a check that the
//! expire lease is still held ([`Guard`]); every manifest is read fully before anything is
//! deleted, so a damaged one stops the run with nothing changed.

use super::plan::Plan;
use super::planner::{self, ExpireOptions, LeaseFact, LeaseVerdict, Stored, Work};
use crate::lease::{self, LeaseHandle};
use crate::manifest_file::LocalManifest;
use crate::repack::{self, LiveSet};
use crate::repo;
use crate::store::Store;
use crate::testhooks::crash_point;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use tidemark_format::lock::GcState;
use tidemark_format::{keys, PackId};

/// Deletions between two confirmations that the lease object still exists.
const CONFIRM_EVERY: usize = 16;

/// The leases of other processes than `own`, judged live or stale at `now`.
pub(super) async fn other_leases(
    store: &Store,
    own: Option<&str>,
    now: i64,
) -> Result<Vec<LeaseFact>> {
    Ok(lease::list(store)
        .await?
        .into_iter()
        .filter(|l| Some(l.key.as_str()) != own)
        .map(|l| LeaseFact {
            live: l.is_live(now),
            holder: l.describe(),
            kind: l.lease.kind,
            key: l.key,
        })
        .collect())
}

/// Reads what the planner needs and plans (X2); a dry run and a real run both plan here.
pub(super) async fn plan_now(
    store: &Store,
    opts: &ExpireOptions,
    now: i64,
    leases: LeaseVerdict,
) -> Result<(Plan, Work)> {
    repo::require_config(store).await?;
    let all = repo::all_backups(store).await?;
    if !all.unreadable.is_empty() {
        let names: Vec<String> = all
            .unreadable
            .iter()
            .map(|(id, why)| format!("{id} ({why})"))
            .collect();
        bail!(
            "expire deletes nothing while a backup's manifest cannot be read: {}\nhint: the packs and WAL such a backup needs are unknown, so nothing can safely be collected; restore the manifest object from a copy, or, if that backup is lost, move backups/<id>.manifest out of the repository (e.g. to a quarantine/ prefix) and run expire again; 'tidemark-restore check' lists them",
            names.join("; ")
        );
    }
    let headers = all.readable;
    let ids: Vec<String> = headers.iter().map(|h| h.backup_id.clone()).collect();
    // The spill's estimate (an upper bound: every backup's announced chunk references).
    let estimate = crate::check::announced_refs(&headers);
    // The history a restore of `latest` follows: backups off it are on abandoned branches.
    let archive = crate::archive::Archive::list(store).await?;
    let followed = crate::archive::history(store, &archive, &headers).await?;
    let retained = planner::retain(opts, now, leases, headers, &followed)?;
    // Full reads: a damaged manifest stops expire here, before anything is deleted (its pack table
    // could under-report what it references). Each manifest is verified whole in a local copy
    // and its chunk references streamed from there into the spilled live set.
    let mut pack_tables = HashMap::new();
    let mut live = LiveSet::new(estimate, crate::spill::budget()?);
    for id in ids {
        let mut m = LocalManifest::load(store, &id).await?;
        if retained.needs_chunks(&id) {
            (live, m) = live.add_local_blocking(m).await?;
        }
        pack_tables.insert(id, m.packs.clone());
    }
    let packs = store
        .list(keys::PACKS)
        .await
        .context("cannot list packs")?
        .into_iter()
        .filter_map(|l| Some((keys::parse_pack(&l.key)?, l.size)))
        .collect();
    let wal = if retained.touches_data() {
        store.list(keys::WAL).await.context("cannot list wal")?
    } else {
        Vec::new()
    };
    let seg_size = opts.wal_window_us.and(archive.seg_size);
    let stored = Stored {
        pack_tables,
        live,
        packs,
        gc_states: read_gc_states(store).await?,
        wal,
        seg_size,
    };
    planner::plan(retained, opts, stored)
}

/// Every GC state object, by key.
async fn read_gc_states(store: &Store) -> Result<Vec<(String, GcState)>> {
    let mut out = Vec::new();
    for l in store.list(keys::GC).await.context("cannot list gc state")? {
        if keys::parse_gc_state(&l.key).is_none() {
            continue;
        }
        let b = store
            .get(&l.key, 1 << 30)
            .await
            .with_context(|| format!("cannot read gc state {}", l.key))?;
        let s = GcState::decode(&b).with_context(|| format!("gc state {} is unreadable", l.key))?;
        out.push((l.key, s));
    }
    Ok(out)
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

/// A real run under the expire lease `held`: plans, then carries the plan out. Returns the plan.
pub(super) async fn execute(
    store: &Store,
    opts: &ExpireOptions,
    held: &LeaseHandle,
    pack_target: u64,
) -> Result<Plan> {
    let now = lease::now_us();
    let own = held.key();
    let leases = planner::judge_leases(&other_leases(store, Some(&own), now).await?)?;
    let touches_data = leases.deferred.is_none();
    crash_point("leased");
    let (plan, work) = plan_now(store, opts, now, leases).await?;
    crate::testhooks::pause_point_async("expire-before-delete").await;
    let mut g = Guard {
        lease: held,
        since_confirm: 0,
    };
    for k in &work.stale_leases {
        g.before_delete().await?;
        store
            .delete(k)
            .await
            .with_context(|| format!("cannot delete stale lease {k}"))?;
    }
    let mut parts = crate::manifest_file::parts_by_backup(store).await?;
    for (i, id) in work.remove.iter().enumerate() {
        g.before_delete().await?;
        store
            .delete(&keys::manifest(id))
            .await
            .with_context(|| format!("cannot delete the manifest of backup {id}"))?;
        // Then its parts (FORMAT.md 8.4.7): a crash in between leaves orphans, deleted below.
        for k in parts.remove(id).unwrap_or_default() {
            g.before_delete().await?;
            store
                .delete(&k)
                .await
                .with_context(|| format!("cannot delete manifest part {k}"))?;
        }
        tracing::info!(backup = %id, "backup removed");
        if i == 0 {
            crash_point("manifest");
        }
    }
    crash_point("manifests");
    if !work.condemn.is_empty() {
        let mut packs = work.condemn.clone();
        packs.sort();
        held.check().await?;
        put_gc_state(store, now, packs).await?;
    }
    crash_point("condemned");
    for (i, p) in work.delete.iter().enumerate() {
        g.before_delete().await?;
        store
            .delete(&keys::pack(p))
            .await
            .with_context(|| format!("cannot delete pack {p}"))?;
        if i == 0 {
            crash_point("pack");
        }
    }
    crash_point("packs");
    // Parts of manifests that do not exist (a backup killed between its parts and its manifest,
    // an expire killed between a manifest and its parts), like unreferenced packs only while no
    // backup runs: a running backup's parts precede its manifest.
    if touches_data {
        for k in crate::manifest_file::orphan_parts(store).await? {
            g.before_delete().await?;
            store
                .delete(&k)
                .await
                .with_context(|| format!("cannot delete orphan manifest part {k}"))?;
        }
    }
    let new_packs = repack_and_relocate(store, &work, &mut g, now, pack_target).await?;
    for (i, k) in work.wal.iter().enumerate() {
        g.before_delete().await?;
        store
            .delete(k)
            .await
            .with_context(|| format!("cannot delete wal object {k}"))?;
        if i == 0 {
            crash_point("wal");
        }
    }
    crash_point("wals");
    for s in &work.states {
        g.before_delete().await?;
        // A pack the repack just wrote again (same bytes, same id) is referenced now.
        let still: Vec<PackId> = s
            .still
            .iter()
            .filter(|p| !new_packs.contains(p))
            .copied()
            .collect();
        if !still.is_empty() {
            put_gc_state(store, s.old.condemned_us, still).await?;
        }
        store
            .delete(&s.key)
            .await
            .with_context(|| format!("cannot delete gc state {}", s.key))?;
    }
    crash_point("states");
    // Temporary files of writers that died (a killed backup's half-written pack on file://):
    // collected after the same grace period as unreferenced packs.
    let cutoff = std::time::SystemTime::now()
        .checked_sub(opts.gc_grace)
        .unwrap_or(std::time::UNIX_EPOCH);
    let swept = store
        .sweep_temporaries(cutoff)
        .await
        .context("cannot remove temporary files of dead writers")?;
    if swept > 0 {
        tracing::info!(
            files = swept,
            "removed temporary files left by writers that died"
        );
    }
    Ok(plan)
}

/// Writes a new GC state object condemning `packs` (sorted) at `condemned_us`.
async fn put_gc_state(store: &Store, condemned_us: i64, packs: Vec<PackId>) -> Result<()> {
    let key = keys::gc_state(&lease::nonce()).ok_or_else(|| anyhow!("bad gc state nonce"))?;
    let state = GcState {
        condemned_us,
        packs,
    };
    store
        .put_create(&key, Bytes::from(state.encode()))
        .await
        .with_context(|| format!("cannot write gc state {key}"))
}

/// Repack (FORMAT.md 16.5): copy the live chunks of the chosen packs into new packs, replace each
/// manifest that names one with its relocated version, then condemn the old packs (a later expire
/// deletes them after the grace period). Returns the packs written.
async fn repack_and_relocate(
    store: &Store,
    work: &Work,
    g: &mut Guard<'_>,
    now: i64,
    pack_target: u64,
) -> Result<BTreeSet<PackId>> {
    if work.repack.is_empty() {
        return Ok(BTreeSet::new());
    }
    g.lease.check().await?;
    let moved = std::sync::Arc::new(repack::copy(store, pack_target, &work.repack).await?);
    crash_point("repacked-packs");
    let mut parts = crate::manifest_file::parts_by_backup(store).await?;
    for (i, id) in work.relocate.iter().enumerate() {
        let m = LocalManifest::load(store, id).await?;
        let r = std::sync::Arc::clone(&moved);
        let (m, relocated) = tokio::task::spawn_blocking(move || {
            let out = repack::relocate_local(&m, &r);
            (m, out)
        })
        .await
        .context("relocating a manifest failed")?;
        let Some((file, len)) = relocated? else {
            continue;
        };
        // The replacement must read back as the same backup before it replaces the original.
        let (file, check) = tokio::task::spawn_blocking(move || {
            let check = crate::manifest_file::index_file(&file, len);
            (file, check)
        })
        .await
        .context("reading back a relocated manifest failed")?;
        let check = check
            .with_context(|| format!("the relocated manifest of backup {id} does not decode"))?;
        anyhow::ensure!(
            check.header == m.header && check.entries.len() == m.entries.len(),
            "the relocated manifest of backup {id} differs from the backup"
        );
        g.before_delete().await?;
        let kept =
            crate::manifest_file::upload(store, id, file, len, crate::manifest_file::Put::Replace)
                .await
                .with_context(|| format!("cannot replace the manifest of backup {id}"))?;
        // The parts the old table named and the new one does not (FORMAT.md 8.4.7).
        for k in parts.remove(id).unwrap_or_default() {
            let still = keys::parse_manifest_part(&k).is_some_and(|(_, h)| kept.contains(&h));
            if !still {
                g.before_delete().await?;
                store
                    .delete(&k)
                    .await
                    .with_context(|| format!("cannot delete manifest part {k}"))?;
            }
        }
        tracing::info!(backup = %id, "manifest relocated to repacked packs");
        if i == 0 {
            crash_point("relocated");
        }
    }
    let mut old: Vec<PackId> = work.repack.iter().map(|c| c.pack).collect();
    old.sort();
    g.lease.check().await?;
    put_gc_state(store, now, old).await?;
    crash_point("repacked");
    Ok(moved.new_packs.iter().copied().collect())
}
