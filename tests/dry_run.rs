//! `restore --dry-run`: the plan is checked against the real restore that follows (same backup,
//! files and bytes; the WAL the server replayed lies inside the planned range), it writes
//! nothing, and each problem it must find is found with exit 1: no backup reaches the target, a
//! segment recovery needs is gone from the archive, the target directory is not empty.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use tidemark_e2e::data;
use tidemark_e2e::{start_restored, Repo};

async fn plan(repo: &Repo, pgdata: &Path, args: &[&str]) -> Result<(bool, serde_json::Value)> {
    let mut a = args.to_vec();
    a.push("--dry-run");
    let r = repo.restore(pgdata, &a).await?;
    let v = r
        .json()
        .with_context(|| format!("dry-run printed no plan:\n{r}"))?;
    ensure!(
        r.success() == v["problems"].as_array().is_some_and(|p| p.is_empty()),
        "dry-run's exit status and its problems disagree:\n{r}"
    );
    ensure!(
        !pgdata.exists() || pgdata.join("keep").exists(),
        "dry-run wrote {}",
        pgdata.display()
    );
    Ok((r.success(), v))
}

/// The 16 hex digits of a segment name after the timeline (log and segment number).
fn position(name: &str) -> Result<String> {
    Ok(name.get(8..24).context("not a segment name")?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_matches_the_restore_and_finds_the_problems() -> Result<()> {
    let (dir, repo, src, db) = tidemark_e2e::archiving_source("dry-run").await?;
    data::write_batch(&db, 1).await?;
    let backup = src.backup_id(&repo).await?;
    data::write_batch(&db, 2).await?;
    src.switch_wal_and_wait(&repo).await?;
    let between = data::target_time_between(&db).await?;
    data::write_batch(&db, 3).await?;
    src.switch_wal_and_wait(&repo).await?;
    // A passed drill on record gives the plan its estimate.
    repo.verify_latest(&dir.join("drill"), &["--record"])
        .await?
        .ok()?;

    // The plan for a time between batches 2 and 3, then the real restore.
    let pgdata = dir.join("restored");
    let (ok, p) = plan(&repo, &pgdata, &["--target-time", &between]).await?;
    ensure!(ok, "the plan found problems: {p}");
    ensure!(p["backup"]["id"] == backup.as_str(), "plan chose {p}");
    ensure!(
        p["estimate"]["seconds"].as_f64().is_some_and(|s| s > 0.0),
        "no estimate though a drill is recorded: {p}"
    );
    ensure!(
        p["wal"]["upper_bound"] == true && p["wal"]["files"].as_u64() >= Some(2),
        "plan's WAL: {p}"
    );
    let r = repo
        .restore(&pgdata, &["--target-time", &between])
        .await?
        .ok()?;
    let done = r.json()?;
    for (plan_key, done_key) in [
        ("/backup/id", "/backup_id"),
        ("/restore/files", "/files"),
        ("/restore/bytes", "/bytes"),
    ] {
        ensure!(
            p.pointer(plan_key) == done.pointer(done_key),
            "plan {plan_key} = {:?}, the restore's {done_key} = {:?}",
            p.pointer(plan_key),
            done.pointer(done_key)
        );
    }
    let server = start_restored(&dir, "restored-server", &pgdata).await?;
    let sdb = server.client().await?;
    ensure!(
        data::batch_counts(&sdb)
            .await?
            .keys()
            .copied()
            .collect::<Vec<_>>()
            == vec![1, 2],
        "restored batches"
    );
    // The last replayed record lies inside the planned range.
    let lsn: String = sdb
        .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
        .await?
        .get(0);
    let (hi, lo) = lsn.split_once('/').context("an LSN")?;
    let at = (u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?;
    let replayed = format!("{:08X}{:08X}", at >> 32, (at & 0xFFFF_FFFF) >> 24);
    let (first, last) = (
        position(p["wal"]["first"].as_str().context("wal.first")?)?,
        position(p["wal"]["last"].as_str().context("wal.last")?)?,
    );
    ensure!(
        first <= replayed && replayed <= last,
        "replay ended in segment {replayed}, outside the plan's {first}..{last}"
    );
    drop(sdb);
    drop(server);

    // Problems. No backup reaches the target.
    let nowhere = dir.join("nowhere");
    let (ok, p) = plan(
        &repo,
        &nowhere,
        &["--target-time", "2000-01-01 00:00:00+00"],
    )
    .await?;
    ensure!(
        !ok && p["backup"].is_null()
            && p["problems"][0]
                .as_str()
                .is_some_and(|s| s.contains("no backup")),
        "unreachable target: {p}"
    );
    // A non-empty target without --delta.
    let full = dir.mkdir("full")?;
    std::fs::write(full.join("keep"), b"x")?;
    let (ok, p) = plan(&repo, &full, &["--target", "latest"]).await?;
    ensure!(
        !ok && p.to_string().contains("not empty"),
        "non-empty target: {p}"
    );
    // A segment recovery needs removed from the archive.
    let (_, p) = plan(&repo, &nowhere, &["--target", "latest"]).await?;
    let first = p["wal"]["first"].as_str().context("wal.first")?;
    let n = u64::from_str_radix(&first[16..24], 16)? + 1;
    let victim = format!("{}{:08X}", &first[..16], n);
    std::fs::remove_file(repo.wal_object(&victim)?)
        .with_context(|| format!("cannot remove {victim}"))?;
    let (ok, p) = plan(&repo, &nowhere, &["--target", "latest"]).await?;
    ensure!(
        !ok && p["wal"]["missing"][0] == victim.as_str() && p["wal"]["missing_count"] == 1,
        "missing segment {victim}: {p}"
    );
    let nowhere_arg = nowhere.to_string_lossy().into_owned();
    let text = tidemark_e2e::env::restore(&[
        "restore",
        "--pgdata",
        &nowhere_arg,
        "--repo",
        &repo.url,
        "--target",
        "latest",
        "--dry-run",
    ])
    .await?;
    ensure!(
        text.code() == Some(1) && text.stdout.contains("PROBLEM") && text.stdout.contains(&victim),
        "the text plan names the missing segment:\n{text}"
    );
    ensure!(!nowhere.exists(), "dry-run created {}", nowhere.display());
    Ok(())
}
