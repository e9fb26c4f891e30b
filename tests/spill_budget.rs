//! `check` and `expire` keep the chunk references of the repository in scratch files grouped by
//! pack (`core/src/spill.rs`), read back within a memory budget. With a budget so small that
//! every partition is merged from one-record runs (`TIDEMARK_SPILL_BUDGET_BYTES=1`), or one that
//! makes many partitions (4096), both must give exactly what they give with the default: the same
//! check report on a sound and on a damaged repository, the same expire plan, and, after the
//! expire (which repacks), the same repository.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::path::Path;
use tidemark_e2e::data;
use tidemark_e2e::env::flip_bytes;
use tidemark_e2e::{tidemark, PgCluster, Repo, TestDir, Tool};

/// The budgets compared: the default, many partitions, and every partition over the budget.
const BUDGETS: [Option<&str>; 3] = [None, Some("4096"), Some("1")];

fn env_of(budget: Option<&str>) -> Vec<(&str, &str)> {
    budget
        .map(|b| vec![("TIDEMARK_SPILL_BUDGET_BYTES", b)])
        .unwrap_or_default()
}

/// `check --read-data --json` under `budget`: (passed, report).
async fn check(repo: &Repo, budget: Option<&str>) -> Result<(bool, Value)> {
    let r = tidemark(
        Tool::Restore,
        &["check", "--repo", &repo.url, "--read-data", "--json"],
        &env_of(budget),
    )
    .await?;
    let v = r.json_document().with_context(|| format!("{r}"))?;
    Ok((r.success(), v))
}

/// The check report of every budget, which must all be the default's; returns it.
async fn same_check(repo: &Repo, what: &str) -> Result<(bool, Value)> {
    let (ok, want) = check(repo, None).await?;
    for b in &BUDGETS[1..] {
        let (ok2, got) = check(repo, *b).await?;
        ensure!(
            ok == ok2 && got == want,
            "check of {what} with TIDEMARK_SPILL_BUDGET_BYTES={b:?} differs from the default:\n{got:#}\ndefault:\n{want:#}"
        );
    }
    Ok((ok, want))
}

/// An expire plan without the fields that differ from run to run.
fn comparable(plan: &Value) -> Value {
    let mut p = plan.clone();
    if let Some(o) = p.as_object_mut() {
        o.remove("now");
        o.remove("dry_run");
    }
    p
}

async fn expire(repo: &Repo, budget: Option<&str>, dry_run: bool) -> Result<Value> {
    let mut args = vec![
        "expire",
        "--repo",
        &repo.url,
        "--json",
        "--gc-grace",
        "0s",
        "--retain-last",
        "1",
    ];
    if dry_run {
        args.push("--dry-run");
    }
    tidemark(Tool::Agent, &args, &env_of(budget))
        .await?
        .ok()?
        .json_document()
}

fn copy_of(dir: &TestDir, repo: &Repo, name: &str) -> Result<Repo> {
    let to = dir.join(name);
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&repo.path)
        .arg(&to)
        .status()
        .context("cannot run cp")?;
    ensure!(st.success(), "cp -a {} failed", repo.path.display());
    Ok(Repo {
        url: format!("file://{}", to.display()),
        path: to,
    })
}

/// Manifests (with their bytes), packs and WAL of a repository, sorted.
fn data_keys(repo: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![repo.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let k = p.strip_prefix(repo)?.to_string_lossy().into_owned();
            if k.starts_with("backups/") {
                let b = std::fs::read(&p)?;
                out.push(format!("{k} {}", tidemark_format::ChunkId::of(&b)));
            } else if k.starts_with("packs/") || k.starts_with("wal/") {
                out.push(k);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Fills `bulk` with about 10 MiB of random hex, replacing what it held, so the previous
/// backup's packs become mostly garbage once it expires.
async fn rewrite_bulk(db: &tokio_postgres::Client) -> Result<()> {
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS bulk (id int PRIMARY KEY, v text NOT NULL);
         TRUNCATE bulk;
         INSERT INTO bulk SELECT g, (SELECT string_agg(md5(random()::text || g.g || s.i), '') FROM generate_series(1, 24) AS s(i))
           FROM generate_series(1, 20000) g;
         CHECKPOINT;",
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot rewrite table bulk: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_expire_give_the_same_outcome_whatever_the_scratch_budget() -> Result<()> {
    let dir = TestDir::new("spill-budget")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    rewrite_bulk(&db).await?;
    data::write_batch(&db, 1).await?;
    src.backup(&repo).await?;
    rewrite_bulk(&db).await?;
    data::write_batch(&db, 2).await?;
    src.backup(&repo).await?;
    data::write_batch(&db, 3).await?;
    src.switch_wal_and_wait(&repo).await?;
    drop(db);

    // A sound repository: every budget passes with the same counts.
    let (ok, report) = same_check(&repo, "the sound repository").await?;
    ensure!(
        ok && report["backups_checked"] == 2
            && report["chunks_read"] == report["chunks_checked"]
            && report["chunks_checked"].as_u64().is_some_and(|n| n > 1000),
        "check of the sound repository: {report:#}"
    );

    // A damaged copy: one pack lost, one chunk of another flipped. The same problems, in the
    // same order, whatever the budget.
    let damaged = copy_of(&dir, &repo, "damaged")?;
    let mut packs = damaged.packs()?;
    packs.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    ensure!(packs.len() >= 2, "expected two packs or more: {packs:?}");
    let (big, size) = &packs[0];
    flip_bytes(big, (*size / 2) as usize, 16)?;
    std::fs::remove_file(&packs[packs.len() - 1].0)?;
    let (ok, report) = same_check(&damaged, "the damaged copy").await?;
    let problems = report["problems"].as_array().context("problems")?;
    ensure!(
        !ok && problems
            .iter()
            .any(|p| p["what"].as_str().is_some_and(|w| w.contains("is damaged")))
            && problems
                .iter()
                .any(|p| p["what"].as_str().is_some_and(|w| w.contains("missing"))),
        "check of the damaged copy: {report:#}"
    );

    // expire: the same plan (it removes the first backup and repacks its packs) ...
    let want = expire(&repo, None, true).await?;
    ensure!(
        want["repack"]["packs"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "expected a repack: {want:#}"
    );
    for b in &BUDGETS[1..] {
        let got = expire(&repo, *b, true).await?;
        ensure!(
            comparable(&got) == comparable(&want),
            "expire --dry-run with TIDEMARK_SPILL_BUDGET_BYTES={b:?} differs from the default:\n{got:#}\ndefault:\n{want:#}"
        );
    }
    // ... and, run for real on copies, the same repository, which checks clean.
    let mut after: Option<Vec<String>> = None;
    for (i, b) in BUDGETS.iter().enumerate() {
        let r = copy_of(&dir, &repo, &format!("expired-{i}"))?;
        let plan = expire(&r, *b, false).await?;
        ensure!(
            comparable(&plan) == comparable(&want),
            "expire with TIDEMARK_SPILL_BUDGET_BYTES={b:?} did not carry out the planned work:\n{plan:#}\nplanned:\n{want:#}"
        );
        let keys = data_keys(&r.path)?;
        if let Some(a) = &after {
            ensure!(
                *a == keys,
                "the repository after expire with TIDEMARK_SPILL_BUDGET_BYTES={b:?} differs from the default's"
            );
        }
        after = Some(keys);
        let (ok, report) = same_check(&r, &format!("the copy expired with {b:?}")).await?;
        ensure!(
            ok && report["backups_checked"] == 1,
            "check after expire: {report:#}"
        );
    }
    Ok(())
}
