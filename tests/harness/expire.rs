//! `expire --dry-run` followed by `expire` with the same arguments: the two plans must agree, so
//! every expire in the tests also checks that the dry run predicts the real one.

use crate::{tidemark, Repo, Tool};
use anyhow::{ensure, Context, Result};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;
use std::time::Duration;

/// How long a dry run's plan must stay valid: the real run starts well within this of the dry
/// run's end. A time-window plan changes when a backup's stop time leaves the window.
const STABLE_FOR: TimeDelta = TimeDelta::seconds(3);

/// The window flags whose plans change as time passes.
const WINDOW_FLAGS: [&str; 2] = ["--retain-window", "--retain-wal-window"];

fn plan_time(v: &Value, field: &str) -> Result<DateTime<Utc>> {
    let s = v[field]
        .as_str()
        .with_context(|| format!("no {field} in {v}"))?;
    Ok(DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("{field} {s:?}"))?
        .to_utc())
}

/// The first moment after the plan's `now` at which a window in `args` would judge some backup
/// differently (its stop time leaves the window), or None when `args` has no window.
fn next_window_edge(plan: &Value, args: &[&str]) -> Result<Option<DateTime<Utc>>> {
    let mut windows = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if WINDOW_FLAGS.contains(a) {
            let secs: i64 = args
                .get(i + 1)
                .and_then(|w| w.strip_suffix('s'))
                .and_then(|w| w.parse().ok())
                .with_context(|| format!("test arguments {args:?}: {a} not in whole seconds"))?;
            windows.push(TimeDelta::seconds(secs));
        }
    }
    let now = plan_time(plan, "now")?;
    let mut edge: Option<DateTime<Utc>> = None;
    for b in plan["backups"].as_array().into_iter().flatten() {
        let stop = plan_time(b, "stop_time")?;
        for w in &windows {
            let leaves = stop + *w;
            if leaves > now && edge.is_none_or(|e| leaves < e) {
                edge = Some(leaves);
            }
        }
    }
    Ok(edge)
}

/// The plan without the fields that legitimately differ between a dry run and the real run.
fn comparable(plan: &Value) -> Value {
    let mut p = plan.clone();
    if let Some(o) = p.as_object_mut() {
        o.remove("now");
        o.remove("dry_run");
        // A backup running beside the two runs (the plan deferred by its lease) uploads packs
        // in between: the count of packs seen is not part of the plan then (nothing is deleted).
        if o.get("deferred").is_some_and(|d| !d.is_null()) {
            if let Some(packs) = o.get_mut("packs").and_then(Value::as_object_mut) {
                packs.remove("total");
            }
        }
    }
    p
}

/// `expire --json --gc-grace 0s <args> --dry-run`, then the same without `--dry-run`: the plans
/// must agree. Returns the real plan. With a time window the dry run is taken where the next
/// window edge is at least `STABLE_FOR` away (waiting past a nearer edge and planning again), and
/// the real run must start before that edge, so both judge the same moment of the policy.
pub async fn expire_agreeing(repo: &Repo, args: &[&str], env: &[(&str, &str)]) -> Result<Value> {
    let mut real_args = vec!["expire", "--repo", &repo.url, "--json", "--gc-grace", "0s"];
    real_args.extend_from_slice(args);
    let mut dry_args = real_args.clone();
    dry_args.push("--dry-run");
    let (dry, edge) = loop {
        let dry = tidemark(Tool::Agent, &dry_args, env)
            .await?
            .ok()?
            .json_document()?;
        ensure!(
            dry["schema_version"] == 1 && dry["dry_run"] == true,
            "unexpected dry-run plan: {dry}"
        );
        let edge = next_window_edge(&dry, args)?;
        match edge {
            Some(e) if e - plan_time(&dry, "now")? < STABLE_FOR => {
                let wait = (e - Utc::now()).max(TimeDelta::zero());
                eprintln!("harness: expire {args:?}: waiting {wait} past the window edge {e}");
                tokio::time::sleep(wait.to_std()? + Duration::from_millis(100)).await;
            }
            _ => break (dry, edge),
        }
    };
    let real = tidemark(Tool::Agent, &real_args, env)
        .await?
        .ok()?
        .json_document()?;
    if let Some(e) = edge {
        ensure!(
            plan_time(&real, "now")? < e,
            "the real expire started at {} after the window edge {e}, which the dry run at {} \
             was {STABLE_FOR} clear of: the two plans judge different moments",
            real["now"],
            dry["now"]
        );
    }
    ensure!(
        comparable(&dry) == comparable(&real),
        "expire --dry-run and expire disagree on {args:?}:\ndry run: {dry:#}\nreal run: {real:#}"
    );
    Ok(real)
}
