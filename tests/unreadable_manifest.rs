//! Issue 15 part 6: one unreadable manifest must not block everything. With the newest backup's
//! manifest damaged (first its file list, then its header): restore and its plan fall back to the
//! older backup with a warning naming the damaged one and still bring back every row, a new
//! backup is taken (its parent is the older backup), `check` names the damaged backup and exits 1,
//! and `expire` refuses to delete anything, naming it, with the repository unchanged.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use tidemark_e2e::data;
use tidemark_e2e::env::{self, flip_bytes};
use tidemark_e2e::{start_restored, Repo, TestDir};

fn manifest(repo: &Repo, id: &str) -> std::path::PathBuf {
    repo.path.join("backups").join(format!("{id}.manifest"))
}

/// Restores to the end into `pgdata` (with a plan first that must agree) and checks every batch
/// is there and that `damaged` was named and passed over.
async fn restore_around(
    dir: &TestDir,
    repo: &Repo,
    pgdata: &Path,
    damaged: &str,
    older: &str,
    want: &std::collections::BTreeMap<i32, i64>,
) -> Result<()> {
    let plan = repo
        .restore(pgdata, &["--target", "latest", "--dry-run"])
        .await?;
    let p = plan.json()?;
    ensure!(
        p["backup"]["id"] == older,
        "the plan must pass over {damaged} for {older}:\n{plan}"
    );
    let r = repo.restore(pgdata, &["--target", "latest"]).await?.ok()?;
    ensure!(
        r.json()?["backup_id"] == older && r.stderr.contains(damaged),
        "restore must fall back to {older}, naming {damaged}:\n{r}"
    );
    let name = pgdata
        .file_name()
        .context("name")?
        .to_string_lossy()
        .into_owned();
    let server = start_restored(dir, &format!("{name}-server"), pgdata).await?;
    let got = data::batch_counts(&server.client().await?).await?;
    ensure!(&got == want, "restored rows {got:?}, want {want:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_manifest_is_reported_and_passed_over() -> Result<()> {
    let (dir, repo, src, db) = tidemark_e2e::archiving_source("unreadable-manifest").await?;
    data::write_batch(&db, 1).await?;
    let a = src.backup_id(&repo).await?;
    data::write_batch(&db, 2).await?;
    let b = src.backup_id(&repo).await?;
    data::write_batch(&db, 3).await?;
    src.switch_wal_and_wait(&repo).await?;
    let want = data::batch_counts(&db).await?;

    // 1. B's file list damaged (its header still reads).
    let path = manifest(&repo, &b);
    let len = std::fs::metadata(&path)?.len() as usize;
    flip_bytes(&path, len - 40, 8)?;
    restore_around(&dir, &repo, &dir.join("r1"), &b, &a, &want).await?;

    // A new backup goes on (its parent is A: B cannot be vouched for).
    data::write_batch(&db, 4).await?;
    let c = src
        .backup(&repo)
        .await
        .context("a backup with a damaged manifest beside it")?;
    ensure!(
        c["parent"] == a.as_str(),
        "the new backup's parent must be {a}: {c}"
    );
    let c = c["backup_id"].as_str().context("id")?.to_string();

    let check = env::restore(&["check", "--repo", &repo.url, "--json"]).await?;
    let report = check.json_document()?;
    ensure!(
        check.code() == Some(1)
            && report["problems"]
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x["backups"][0] == b.as_str())),
        "check must name backup {b}:\n{check}"
    );

    // 2. B's header damaged too: listed as unreadable.
    std::fs::write(&path, b"TMMF not a manifest")?;
    let before = repo.snapshot()?;
    let expire = env::agent(&[
        "expire",
        "--repo",
        &repo.url,
        "--retain-last",
        "1",
        "--gc-grace",
        "0s",
    ])
    .await?;
    ensure!(
        !expire.success() && expire.stderr.contains(&b) && expire.stderr.contains("hint:"),
        "expire must refuse, naming {b}:\n{expire}"
    );
    // What was there stays byte for byte (the source still archives new WAL, and expire may
    // record its refused run under expire/: only deletions and changes count).
    let after: std::collections::BTreeMap<String, Vec<u8>> = repo.snapshot()?.into_iter().collect();
    let changed: Vec<&String> = before
        .iter()
        .filter(|(k, v)| after.get(k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    ensure!(
        changed.is_empty(),
        "a refused expire changed or deleted {changed:?}"
    );
    let check = env::restore(&["check", "--repo", &repo.url, "--json"]).await?;
    ensure!(
        check.code() == Some(1)
            && check.stdout.contains(&b)
            && check.json_document()?["backups_checked"] == 2,
        "check must name the unreadable backup {b} and check the other two:\n{check}"
    );
    let mut want4 = want.clone();
    want4.insert(4, data::BATCH_ROWS);
    src.switch_wal_and_wait(&repo).await?;
    // The newest readable backup is now C; restore uses it and warns about B.
    let r = repo
        .restore(&dir.join("r2"), &["--target", "latest"])
        .await?
        .ok()?;
    ensure!(
        r.json()?["backup_id"] == c.as_str() && r.stderr.contains(&b),
        "restore must use {c}, warning about {b}:\n{r}"
    );
    let server = start_restored(&dir, "r2-server", &dir.join("r2")).await?;
    let got = data::batch_counts(&server.client().await?).await?;
    ensure!(got == want4, "restored rows {got:?}, want {want4:?}");
    Ok(())
}
