//! `expire`: the retention plan (which backups go, which WAL and packs nothing needs any more) and
//! its execution. FORMAT.md sections 10.4 and 16 define the order; in short:
//!
//! 1. take the exclusive expire lease; note live backup leases (then only manifests are removed,
//!    packs and WAL wait for a run with no backup in flight);
//! 2. read every manifest fully (a damaged one stops expire before anything is deleted);
//! 3. delete the expired manifests, oldest first;
//! 4. condemn (record in a new `gc/` state object) every pack no remaining manifest names;
//! 5. delete packs condemned at least `gc_grace` ago that are still unreferenced;
//! 6. delete WAL older than the oldest retained backup's start segment (never `.history`); with
//!    a WAL window, older than the window's anchor backup except each older retained backup's
//!    own start..stop WAL;
//! 7. rewrite or delete GC state objects so they list only packs still condemned; release;
//! 8. store what the run did (or why it failed) as an expire record (`record`, FORMAT.md 8.8).
//!
//! The decisions are `planner`'s, a pure function of the repository's facts and `now`; the
//! `executor` gathers those facts and carries the plan out.
//!
//! Invariants: the plan printed by `--dry-run` is computed by the same function as the plan a real
//! run executes; every delete is preceded by a check that the lease is still held; a crash at any
//! step leaves only complete backups whose packs and WAL exist, and a rerun finishes the job.

mod executor;
mod plan;
mod planner;
mod record;

pub use plan::{render, BackupPlan, PackPlan, Plan, WalPlan, WalRangePlan, SCHEMA_VERSION};
pub use planner::ExpireOptions;
pub use record::{last_recorded, render as render_recorded, ExpireRecord, ExpireSummary};

use crate::lease::{self, LeaseHandle};
use crate::repo;
use crate::store::Store;
use anyhow::Result;
use tidemark_format::lock::LeaseKind;

/// Plans (and unless `dry_run`, executes) an expire. Returns the plan. A real run stores an
/// expire record of its outcome, success or failure (a failure to store it is only logged: the
/// record is informational).
pub async fn run(store: &Store, opts: &ExpireOptions) -> Result<Plan> {
    if opts.dry_run {
        let now = lease::now_us();
        let leases = planner::judge_leases(&executor::other_leases(store, None, now).await?)?;
        return Ok(executor::plan_now(store, opts, now, leases).await?.0);
    }
    let started = lease::now_us();
    let outcome = execute(store, opts).await;
    // Never create an object in what is not a repository (a wrong --repo).
    if !matches!(repo::load_config(store).await, Ok(Some(_))) {
        return outcome;
    }
    let rec = ExpireRecord::of(started, &outcome);
    if let Err(e) = record::record(store, &rec).await {
        tracing::warn!(repo = store.url(), error = %format!("{e:#}"), hint = "the record only feeds info and the metrics; check that the repository is writable", "cannot store the expire record");
    }
    outcome
}

async fn execute(store: &Store, opts: &ExpireOptions) -> Result<Plan> {
    let config = repo::require_config(store).await?;
    let held = LeaseHandle::acquire(store, LeaseKind::Expire).await?;
    let r = executor::execute(store, opts, &held, u64::from(config.pack_target)).await;
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
