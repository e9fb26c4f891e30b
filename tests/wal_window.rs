//! `expire --retain-wal-window` end to end (PostgreSQL 15): three backups with WAL between them,
//! a pause, then a newer backup; an expire whose window opens in the pause keeps continuous WAL
//! only from the newest backup before the window. The two oldest backups lose the WAL between
//! them yet still restore to their consistency point row for row, and a moment inside the window
//! still restores row for row. `info` says what each backup reaches; `check` passes (the WAL left
//! out is no problem) until a segment the window promises is deleted; `verify
//! --random-in-window` draws its moment from the window's first backup on.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::{expire_agreeing, start_restored, tidemark, PgCluster, Repo, TestDir, Tool};

const GAP: Duration = Duration::from_millis(150);

/// Restores with `target` args (which must choose backup `id`), starts the server and returns
/// its rows.
async fn restore_rows(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    target: &[&str],
    id: &str,
) -> Result<BTreeMap<i32, i64>> {
    let pgdata = dir.join(name);
    let r = repo.restore(&pgdata, target).await?.ok()?;
    let v = r.json_document()?;
    ensure!(
        v["backup_id"] == id,
        "restore {target:?} chose {} instead of {id}",
        v["backup_id"]
    );
    let server = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    let db = server.client().await?;
    let rows = data::batch_counts(&db).await?;
    drop(db);
    drop(server);
    std::fs::remove_dir_all(&pgdata).ok();
    Ok(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_backups_outside_the_wal_window_keep_only_their_own_wal() -> Result<()> {
    let dir = TestDir::new("wal-window")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    let mut model: BTreeMap<i32, i64> = BTreeMap::new();
    let mut batch = 0;
    // Per old backup: its id, a server time after its stop and before the next write, its rows.
    let mut old: Vec<(String, String, BTreeMap<i32, i64>)> = Vec::new();
    // Segments written after each old backup, before the next one.
    let mut between: Vec<Vec<String>> = Vec::new();
    for _ in 0..3 {
        batch += 1;
        data::write_batch(&db, batch).await?;
        model.insert(batch, BATCH_ROWS);
        let b = src.backup(&repo).await?;
        let id = b["backup_id"].as_str().context("backup id")?.to_string();
        tokio::time::sleep(GAP).await;
        old.push((id, data::server_time_rfc3339(&db).await?, model.clone()));
        tokio::time::sleep(GAP).await;
        let mut segs = Vec::new();
        for _ in 0..2 {
            batch += 1;
            data::write_batch(&db, batch).await?;
            model.insert(batch, BATCH_ROWS);
            segs.push(src.switch_wal_and_wait(&repo).await?);
        }
        between.push(segs);
    }
    // The window opens in this pause, 4 s after it began.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let pause_end = Instant::now();
    batch += 1;
    data::write_batch(&db, batch).await?;
    model.insert(batch, BATCH_ROWS);
    tokio::time::sleep(GAP).await;
    let inside = (data::server_time_rfc3339(&db).await?, model.clone());
    tokio::time::sleep(GAP).await;
    batch += 1;
    data::write_batch(&db, batch).await?;
    model.insert(batch, BATCH_ROWS);
    let newest = src.backup(&repo).await?["backup_id"]
        .as_str()
        .context("backup id")?
        .to_string();
    batch += 1;
    data::write_batch(&db, batch).await?;
    src.switch_wal_and_wait(&repo).await?;

    let window = format!("{}s", pause_end.elapsed().as_secs() + 4);
    let plan = expire_agreeing(
        &repo,
        &["--retain-last", "4", "--retain-wal-window", &window],
        &[],
    )
    .await?;
    let kept: Vec<&str> = plan["backups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["action"] == "keep")
        .filter_map(|b| b["id"].as_str())
        .collect();
    ensure!(
        kept.len() == 4,
        "--retain-last 4 keeps every backup: {plan:#}"
    );
    let ranges: Vec<&str> = plan["wal"]["keep_ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["backup"].as_str())
        .collect();
    ensure!(
        ranges == [old[0].0.as_str(), old[1].0.as_str()],
        "the two oldest backups keep only their own WAL: {plan:#}"
    );
    for b in plan["backups"].as_array().into_iter().flatten() {
        let own = ranges.contains(&b["id"].as_str().unwrap_or_default());
        let want = if own {
            "its consistency point only"
        } else {
            "point in time from its stop"
        };
        ensure!(b["reach"] == want, "reach of {}: {plan:#}", b["id"]);
    }
    // The WAL between the old backups is gone; what the plan deleted is gone.
    let deleted: Vec<&str> = plan["wal"]["delete"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    ensure!(!deleted.is_empty(), "nothing deleted: {plan:#}");
    for key in &deleted {
        ensure!(
            !repo.path.join(key).exists(),
            "{key} still in the repository"
        );
    }
    for seg in between[0].iter().chain(&between[1]).skip(1) {
        ensure!(
            !repo.wal_object(seg)?.exists(),
            "segment {seg} between the old backups is still in the repository: {plan:#}"
        );
    }
    for seg in &between[2] {
        ensure!(
            repo.wal_object(seg)?.exists(),
            "segment {seg} inside the window was deleted: {plan:#}"
        );
    }
    // info agrees.
    let info = repo.info().await?;
    for b in info["backups"].as_array().into_iter().flatten() {
        let id = b["id"].as_str().unwrap_or_default();
        let want = if ranges.contains(&id) {
            "consistency_point"
        } else {
            "point_in_time"
        };
        ensure!(b["reach"]["kind"] == want, "info reach of {id}: {info:#}");
    }
    let gaps: Vec<&Value> = info["wal"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["gaps"].as_array().into_iter().flatten())
        .collect();
    ensure!(
        !gaps.is_empty() && gaps.iter().all(|g| g["narrowed"] == true),
        "info does not mark the window's gaps as narrowed: {info:#}"
    );
    // check holds the repository to what the backups and the window promise: the WAL the
    // window left out between the old backups is no problem.
    let (ok, report) = check(&repo).await?;
    ensure!(ok, "check fails after the windowed expire: {report:#}");
    // verify --random-in-window draws from the window's first backup's stop (old[2]), not from
    // the oldest backup's, which restores to its consistency point only.
    let stop_of = |id: &str| {
        info["backups"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["id"] == id)
            .and_then(|b| b["stop_time"].as_str())
            .map(str::to_string)
    };
    let scratch = dir.join("drill").to_string_lossy().into_owned();
    let pg_bin = tidemark_e2e::env::pg_bin_dir()?
        .to_string_lossy()
        .into_owned();
    let r = tidemark_e2e::restore(&[
        "verify",
        "--repo",
        &repo.url,
        "--scratch",
        &scratch,
        "--pg-bin",
        &pg_bin,
        "--random-in-window",
    ])
    .await?;
    ensure!(r.success(), "the random drill failed:\n{r}");
    let v = r.json()?;
    ensure!(
        v["target"]["window"][0].as_str() == stop_of(&old[2].0).as_deref()
            && v["target"]["window"][1].as_str() == stop_of(&newest).as_deref(),
        "the random drill's window is not old[2]'s stop to the newest stop: {v}\n{info:#}"
    );
    ensure!(
        v["backup"]["id"] == old[2].0.as_str() || v["backup"]["id"] == newest.as_str(),
        "the random drill restored a backup outside the window: {v}"
    );
    // A moment inside the window: row for row.
    let target = ["--target-time", inside.0.as_str()];
    let rows = restore_rows(&dir, &repo, "inside", &target, &old[2].0).await?;
    ensure!(
        rows == inside.1,
        "restore to {} inside the window: {rows:?}",
        inside.0
    );
    // Each old backup: its consistency point, with its own WAL only.
    for (i, (id, _, rows_then)) in old.iter().enumerate().take(2) {
        let target = ["--target", "immediate", "--backup", id.as_str()];
        let rows = restore_rows(&dir, &repo, &format!("old{i}"), &target, id).await?;
        ensure!(
            &rows == rows_then,
            "backup {id} restored {rows:?}, want {rows_then:?}"
        );
    }
    ensure!(!newest.is_empty());
    // WAL the window promises is missing: check fails and names the segment.
    let lost = &between[2][1];
    std::fs::remove_file(repo.wal_object(lost)?)?;
    let (ok, report) = check(&repo).await?;
    let problems = report["problems"].to_string();
    ensure!(
        !ok && problems.contains(lost.as_str()) && problems.contains(old[2].0.as_str()),
        "check does not report segment {lost} the window promises: {report:#}"
    );
    let info = repo.info().await?;
    let lost_gap = info["wal"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["gaps"].as_array().into_iter().flatten())
        .find(|g| g["after"] == between[2][0].as_str());
    ensure!(
        lost_gap.is_some_and(|g| g["narrowed"] == false && g["missing_segments"] == 1),
        "info does not show the lost segment {lost} as a gap the window did not leave: {info:#}"
    );
    Ok(())
}

/// `tidemark-restore check --json`: (passed, report).
async fn check(repo: &Repo) -> Result<(bool, Value)> {
    let r = tidemark(
        Tool::Restore,
        &["check", "--repo", &repo.url, "--json"],
        &[],
    )
    .await?;
    let v = r.json_document().with_context(|| format!("{r}"))?;
    Ok((r.success(), v))
}
