//! Issue 15 part 1, the first piece: a backup killed at each stage, for both sources. The process
//! exits abruptly (`TIDEMARK_TEST_CRASH_AT`, as kill -9 would) right after pg_backup_start / the
//! BASE_BACKUP start, after its first pack is stored, after the stop, and just before the
//! manifest. Each time: no backup appears, the rerun succeeds, the packs the dead backup stored are
//! kept by an expire within `--gc-grace` and collected by one after it, and at the end every
//! batch restores row for row and `check` passes.

use anyhow::{ensure, Result};
use std::collections::BTreeSet;
use std::path::PathBuf;
use tidemark_e2e::env::{self, Run};
use tidemark_e2e::{data, replication, start_restored, PgCluster, Repo};

const STAGES: [&str; 4] = [
    "backup-after-start",
    "backup-mid-copy",
    "backup-after-stop",
    "backup-before-manifest",
];

#[derive(Clone, Copy)]
enum Source {
    Pgdata,
    Replication,
}

async fn backup(src: &PgCluster, repo: &Repo, source: Source, env: &[(&str, &str)]) -> Result<Run> {
    match source {
        Source::Replication => replication::backup(src, repo, env).await,
        Source::Pgdata => src.backup_run(repo, env).await,
    }
}

fn packs(repo: &Repo) -> Result<BTreeSet<PathBuf>> {
    Ok(repo.packs()?.into_iter().map(|(p, _)| p).collect())
}

async fn expire(repo: &Repo, grace: &str) -> Result<()> {
    env::agent(&[
        "expire",
        "--repo",
        &repo.url,
        "--retain-last",
        "100",
        "--gc-grace",
        grace,
    ])
    .await?
    .ok()
    .map(|_| ())
}

async fn crash_at_every_stage(name: &str, source: Source) -> Result<()> {
    let (dir, repo, src, db) = tidemark_e2e::archiving_source(name).await?;
    data::write_batch(&db, 1).await?;
    let ok = backup(&src, &repo, source, &[]).await?.ok()?;
    ensure!(ok.json()?["backup_id"].is_string(), "{ok}");
    let mut orphans = BTreeSet::new();
    for (i, stage) in STAGES.iter().enumerate() {
        data::write_batch(&db, i as i32 + 2).await?;
        let manifests = replication::manifests(&repo)?;
        let before = packs(&repo)?;
        let r = backup(&src, &repo, source, &[("TIDEMARK_TEST_CRASH_AT", stage)]).await?;
        ensure!(
            r.code() == Some(99) && r.stderr.contains(stage),
            "the backup did not die at {stage}:\n{r}"
        );
        ensure!(
            replication::manifests(&repo)? == manifests,
            "a backup killed at {stage} left a manifest"
        );
        let stored: BTreeSet<PathBuf> = packs(&repo)?.difference(&before).cloned().collect();
        ensure!(
            (*stage == "backup-after-start") == stored.is_empty(),
            "killed at {stage}, the backup stored packs {stored:?}"
        );
        // Within the grace period nothing the dead backup stored is collected.
        expire(&repo, "1h").await?;
        expire(&repo, "1h").await?;
        ensure!(
            stored.iter().all(|p| p.exists()),
            "an expire within --gc-grace deleted packs of the backup killed at {stage}"
        );
        orphans.extend(stored);
        // The server is out of backup mode: the rerun succeeds.
        let again = backup(&src, &repo, source, &[]).await?;
        ensure!(
            again.success(),
            "the backup after one killed at {stage} failed:\n{again}\n{}",
            src.log_tail()
        );
        eprintln!(
            "{name}: killed at {stage}: no manifest, {} orphan pack(s), rerun ok",
            orphans.len()
        );
    }
    // After the grace period the orphans go (condemned by one run, deleted by the next).
    expire(&repo, "0s").await?;
    expire(&repo, "0s").await?;
    // A pack the rerun happened to write again byte for byte (same chunks, same id) is
    // referenced now and stays; everything unreferenced and every temporary file is gone.
    let info = repo.info().await?;
    ensure!(
        info["space"]["unreferenced_packs"] == 0,
        "unreferenced packs outlived the grace period: {}",
        info["space"]
    );
    let gone = orphans.iter().filter(|p| !p.exists()).count();
    ensure!(
        gone > 0,
        "no pack of the killed backups was collected: {orphans:?}"
    );
    let temporaries: Vec<String> = repo
        .snapshot()?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("/.tmp."))
        .collect();
    ensure!(
        temporaries.is_empty(),
        "temporary files of the killed backups were left: {temporaries:?}"
    );
    eprintln!(
        "{name}: {gone} of {} orphan files collected after the grace period",
        orphans.len()
    );
    let check = env::restore(&["check", "--repo", &repo.url, "--read-data"]).await?;
    ensure!(check.success(), "check after the crashes:\n{check}");
    data::write_batch(&db, 99).await?;
    let want = data::batch_counts(&db).await?;
    src.switch_wal_and_wait(&repo).await?;
    let pgdata = dir.join("restored");
    repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
    let server = start_restored(&dir, "restored-server", &pgdata).await?;
    let got = data::batch_counts(&server.client().await?).await?;
    ensure!(got == want, "restored {got:?}, want {want:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgdata_backup_killed_at_every_stage() -> Result<()> {
    crash_at_every_stage("backup-faults-pgdata", Source::Pgdata).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_backup_killed_at_every_stage() -> Result<()> {
    crash_at_every_stage("backup-faults-replication", Source::Replication).await
}
