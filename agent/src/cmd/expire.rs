//! `expire`: remove backups a retention policy no longer keeps, then the packs and WAL nothing
//! retained needs. `--dry-run` prints the plan a real run would execute, computed the same way.

use anyhow::{anyhow, bail, Context, Result};
use std::time::Duration;
use tidemark_core::cli::{RepoArgs, SystemArgs};
use tidemark_core::expire::{self, ExpireOptions};
use tidemark_core::repack::RepackOptions;
use tidemark_core::retention::{parse_duration, parse_size, Policy};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Expire only this database system (default: every system of the repository, each under
    /// the same policy: a system's WAL is kept consistent with that system's own backups)
    #[command(flatten)]
    system: SystemArgs,
    /// Keep the newest N backups
    #[arg(long, env = "TIDEMARK_RETAIN_LAST")]
    retain_last: Option<u32>,
    /// Keep every point in time of this window restorable, e.g. 14d, 36h (units s, m, h, d, w)
    #[arg(long, env = "TIDEMARK_RETAIN_WINDOW")]
    retain_window: Option<String>,
    /// Keep the newest backup of each of the newest N days (UTC)
    #[arg(long, env = "TIDEMARK_RETAIN_DAILY")]
    retain_daily: Option<u32>,
    /// Keep the newest backup of each of the newest N ISO weeks
    #[arg(long, env = "TIDEMARK_RETAIN_WEEKLY")]
    retain_weekly: Option<u32>,
    /// Keep the newest backup of each of the newest N months
    #[arg(long, env = "TIDEMARK_RETAIN_MONTHLY")]
    retain_monthly: Option<u32>,
    /// Keep point-in-time recovery only inside this recent window, e.g. 7d (units s, m, h, d, w):
    /// WAL is kept from the newest retained backup that stopped before the window began; older
    /// retained backups keep only their own start..stop WAL (restorable to their consistency point)
    #[arg(long, env = "TIDEMARK_RETAIN_WAL_WINDOW")]
    retain_wal_window: Option<String>,
    /// How long an unreferenced pack stays condemned before it is deleted (units s, m, h, d, w)
    #[arg(long, env = "TIDEMARK_GC_GRACE", default_value = "1h")]
    gc_grace: String,
    /// Live bytes one run copies at most when repacking mostly-garbage packs (e.g. 1GiB, 512MiB;
    /// 0 turns repacking off)
    #[arg(long, env = "TIDEMARK_REPACK_BUDGET", default_value = "1GiB")]
    repack_budget: String,
    /// Repack a pack once at least this percentage of its bytes belongs to no retained backup
    #[arg(long, env = "TIDEMARK_REPACK_MIN_GARBAGE", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    repack_min_garbage: u32,
    /// Print the plan without deleting anything
    #[arg(long)]
    dry_run: bool,
    /// Print the plan as JSON on stdout
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let store = a.repo.open()?;
    let bad = |flag: &str, v: &str| {
        anyhow!("{flag} {v:?} is not a duration\nhint: write a number and a unit: 30s, 90m, 36h, 14d, 2w")
    };
    let window = match &a.retain_window {
        Some(w) => Some(parse_duration(w).ok_or_else(|| bad("--retain-window", w))?),
        None => None,
    };
    let wal_window = match &a.retain_wal_window {
        Some(w) => match parse_duration(w).ok_or_else(|| bad("--retain-wal-window", w))? {
            0 => bail!("--retain-wal-window {w:?} is empty: no moment would stay recoverable\nhint: give the span point-in-time recovery must cover, e.g. 7d"),
            us => Some(us),
        },
        None => None,
    };
    let grace = parse_duration(&a.gc_grace).ok_or_else(|| bad("--gc-grace", &a.gc_grace))?;
    let budget = parse_size(&a.repack_budget).ok_or_else(|| {
        anyhow!(
            "--repack-budget {:?} is not a size\nhint: write bytes or a number with KiB, MiB, GiB or TiB: 1GiB, 512MiB, 0 (off)",
            a.repack_budget
        )
    })?;
    let opts = ExpireOptions {
        policy: Policy {
            retain_last: a.retain_last,
            retain_window_us: window,
            retain_daily: a.retain_daily,
            retain_weekly: a.retain_weekly,
            retain_monthly: a.retain_monthly,
        },
        dry_run: a.dry_run,
        gc_grace: Duration::from_micros(grace as u64),
        repack: RepackOptions {
            budget_bytes: budget,
            min_garbage_percent: a.repack_min_garbage,
        },
        wal_window_us: wal_window,
    };
    let systems = match a.system.system_id {
        Some(_) => vec![a.system.select(&store).await?],
        None => tidemark_core::repo::systems(&store).await?,
    };
    let mut plans = Vec::new();
    for s in &systems {
        let plan = expire::run(&s.store, &opts)
            .await
            .with_context(|| format!("expire of database system {}", s.system_id))?;
        if !a.json {
            if systems.len() > 1 {
                println!("database system {}:", s.system_id);
            }
            print!("{}", expire::render(&plan));
        }
        plans.push(serde_json::json!({"system_id": s.system_id.0.to_string(), "plan": plan}));
    }
    if a.json {
        // One system: its plan, as always; several: one {system_id, plan} per system.
        let out = if plans.len() == 1 {
            plans.remove(0)["plan"].take()
        } else {
            serde_json::Value::Array(plans)
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
