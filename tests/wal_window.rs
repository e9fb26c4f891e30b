//! `expire --retain-wal-window` end to end (PostgreSQL 15): three backups with WAL between them,
//! a pause, then a newer backup; an expire whose window opens in the pause keeps continuous WAL
//! only from the newest backup before the window. The two oldest backups lose the WAL between
//! them yet still restore to their consistency point row for row, and a moment inside the window
//! still restores row for row. `info` says what each backup reaches.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::{start_restored, tidemark, PgCluster, Repo, TestDir, Tool};

const GAP: Duration = Duration::from_millis(150);

/// `expire --dry-run` then `expire` with `args`: the plans must agree but for `now`/`dry_run`.
async fn expire(repo: &Repo, args: &[&str]) -> Result<Value> {
    let mut a = vec!["expire", "--repo", &repo.url, "--json", "--gc-grace", "0s"];
    a.extend_from_slice(args);
    let mut dry_args = a.clone();
    dry_args.push("--dry-run");
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("now");
            o.remove("dry_run");
        }
        v
    };
    let dry = tidemark(Tool::Agent, &dry_args, &[])
        .await?
        .ok()?
        .json_document()?;
    let real = tidemark(Tool::Agent, &a, &[])
        .await?
        .ok()?
        .json_document()?;
    ensure!(
        strip(&dry) == strip(&real),
        "expire --dry-run and expire disagree:\ndry run: {dry:#}\nreal run: {real:#}"
    );
    Ok(real)
}

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
    let plan = expire(
        &repo,
        &["--retain-last", "4", "--retain-wal-window", &window],
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
    Ok(())
}
