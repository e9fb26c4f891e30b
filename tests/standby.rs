//! `restore --standby [--primary-conninfo]` end to end (PostgreSQL 15): a backup restored as a
//! standby stays in recovery, read-only, and follows the archive (rows written on the primary
//! appear once their segment is archived) or, with `--primary-conninfo`, streams from the
//! primary (rows appear before their segment is archived); promoted, it holds every row. Target
//! options are refused with `--standby`, and the conninfo's password is never printed.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tidemark_e2e::cluster::wait_promoted;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::{start_restored_standby, PgCluster, Repo, TestDir};

/// How long a standby may take to show rows the primary committed (restore_command is retried
/// every 5 s by default): a bound on polling, not a timed assertion.
const CONVERGE: Duration = Duration::from_secs(180);

/// A primary archiving into a new repository with batch 1 written and a base backup taken.
async fn primary_with_backup(dir: &TestDir) -> Result<(Repo, PgCluster, String)> {
    let repo = Repo::create(dir, "repo")?;
    let src = PgCluster::start_archiving(dir, "primary", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let b = src.backup(&repo).await?;
    let id = b["backup_id"]
        .as_str()
        .context("backup id missing")?
        .to_string();
    Ok((repo, src, id))
}

/// Polls `standby` until its rows are `want`.
async fn wait_rows(standby: &PgCluster, want: &BTreeMap<i32, i64>) -> Result<()> {
    let started = Instant::now();
    let mut last = BTreeMap::new();
    while started.elapsed() < CONVERGE {
        if let Ok(db) = standby.client().await {
            if let Ok(rows) = data::batch_counts(&db).await {
                if &rows == want {
                    return Ok(());
                }
                last = rows;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "standby {} shows {last:?}, not {want:?}, after {CONVERGE:?}\n{}",
        standby.name,
        standby.log_tail()
    )
}

/// The standby is in recovery and refuses writes.
async fn assert_read_only_standby(standby: &PgCluster) -> Result<()> {
    let db = standby.client().await?;
    let in_recovery: bool = db
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    ensure!(in_recovery, "the restored standby is not in recovery");
    let e = db
        .batch_execute("INSERT INTO batches VALUES (999, 1, 'x')")
        .await
        .err()
        .context("the standby accepted a write")?;
    ensure!(
        format!("{e:?}").contains("read-only transaction"),
        "the standby refused a write for another reason: {e:?}"
    );
    Ok(())
}

/// Promotes `standby`, waits until it accepts writes, and checks its rows are `want`.
async fn promote_and_check(standby: &PgCluster, want: &BTreeMap<i32, i64>) -> Result<()> {
    let db = standby.client().await?;
    let ok: bool = db
        .query_one("SELECT pg_promote(true, 120)", &[])
        .await?
        .get(0);
    ensure!(ok, "pg_promote did not finish\n{}", standby.log_tail());
    wait_promoted(standby).await?;
    let db = standby.client().await?;
    ensure!(
        &data::batch_counts(&db).await? == want,
        "the promoted standby's rows differ from the primary's"
    );
    data::write_batch(&db, 100).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_follows_the_archive_then_promotes() -> Result<()> {
    let dir = TestDir::new("standby-archive")?;
    let (repo, src, id) = primary_with_backup(&dir).await?;
    let db = src.client().await?;
    data::write_batch(&db, 2).await?;
    src.switch_wal_and_wait(&repo).await?;

    // Target options are refused with --standby, before anything is written.
    let refused = dir.join("refused");
    for args in [
        &["--standby", "--target-time", "2026-11-21 20:40:12+00"][..],
        &["--standby", "--target", "latest"][..],
        &["--standby", "--target-action", "pause"][..],
        &["--standby", "--target-action", "promote"][..],
        &["--standby", "--target-exclusive"][..],
    ] {
        let r = repo.restore(&refused, args).await?;
        ensure!(!r.success(), "restore {args:?} was accepted:\n{r}");
        let flag = args[1];
        ensure!(
            r.stderr
                .contains(&format!("{flag} does not apply to --standby"))
                && r.stderr.contains("hint:"),
            "restore {args:?} was refused without naming {flag} and a hint:\n{r}"
        );
        ensure!(!refused.exists(), "restore {args:?} wrote into the target");
    }
    let r = repo
        .restore(&refused, &["--primary-conninfo", "host=127.0.0.1"])
        .await?;
    ensure!(
        !r.success() && r.stderr.contains("--standby"),
        "--primary-conninfo without --standby was accepted:\n{r}"
    );

    let pgdata = dir.join("standby");
    let r = repo.restore(&pgdata, &["--standby"]).await?.ok()?;
    let v = r.json_document()?;
    ensure!(
        v["backup_id"] == id.as_str() && v["standby"] == true && v["primary_conninfo"].is_null(),
        "restore --standby reported {v}"
    );
    ensure!(pgdata.join("standby.signal").is_file(), "no standby.signal");
    ensure!(
        !pgdata.join("recovery.signal").exists(),
        "a standby got recovery.signal"
    );
    let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf"))?;
    ensure!(
        auto.contains("recovery_target_timeline = 'latest'")
            && auto.contains("primary_conninfo = ''"),
        "postgresql.auto.conf lacks the standby settings:\n{auto}"
    );

    let standby = start_restored_standby(&dir, "standby-server", &pgdata).await?;
    assert_read_only_standby(&standby).await?;
    let mut model = BTreeMap::from([(1, BATCH_ROWS), (2, BATCH_ROWS)]);
    wait_rows(&standby, &model).await?;

    // New rows on the primary reach the standby through the archive once their segment is.
    data::write_batch(&db, 3).await?;
    src.switch_wal_and_wait(&repo).await?;
    model.insert(3, BATCH_ROWS);
    wait_rows(&standby, &model).await?;
    let sdb = standby.client().await?;
    let receivers: i64 = sdb
        .query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
        .await?
        .get(0);
    ensure!(
        receivers == 0,
        "a standby without primary_conninfo runs a wal receiver"
    );
    assert_read_only_standby(&standby).await?;

    promote_and_check(&standby, &model).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_streams_from_its_primary_then_promotes() -> Result<()> {
    let dir = TestDir::new("standby-stream")?;
    let (repo, src, id) = primary_with_backup(&dir).await?;
    let db = src.client().await?;
    let secret = "s3cr3t-never-printed";
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres application_name=tidemark-standby password={secret}",
        src.port()
    );
    let pgdata = dir.join("standby");
    let r = repo
        .restore(&pgdata, &["--standby", "--primary-conninfo", &conninfo])
        .await?
        .ok()?;
    ensure!(
        !r.stdout.contains(secret) && !r.stderr.contains(secret),
        "restore printed the primary_conninfo password:\n{r}"
    );
    let v = r.json_document()?;
    ensure!(
        v["backup_id"] == id.as_str()
            && v["standby"] == true
            && v["primary_conninfo"]
                .as_str()
                .is_some_and(|c| c.contains("password=<redacted>")),
        "restore --standby --primary-conninfo reported {v}"
    );
    let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf"))?;
    ensure!(
        auto.contains(&format!("primary_conninfo = '{conninfo}'")),
        "postgresql.auto.conf lacks primary_conninfo:\n{auto}"
    );

    let standby = start_restored_standby(&dir, "standby-server", &pgdata).await?;
    assert_read_only_standby(&standby).await?;
    // It streams: the wal receiver reports 'streaming' and the primary sees the standby.
    let started = Instant::now();
    loop {
        let sdb = standby.client().await?;
        let status: Option<String> = sdb
            .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
            .await?
            .map(|r| r.get(0));
        if status.as_deref() == Some("streaming") {
            break;
        }
        if started.elapsed() > CONVERGE {
            bail!(
                "the standby's wal receiver is {status:?}, not streaming\n{}",
                standby.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let senders: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'tidemark-standby'",
            &[],
        )
        .await?
        .get(0);
    ensure!(senders == 1, "the primary has no walsender for the standby");

    // Rows appear without a WAL switch: their segment is not archived when the standby has them.
    data::write_batch(&db, 2).await?;
    let seg: String = db
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await?
        .get(0);
    let model = BTreeMap::from([(1, BATCH_ROWS), (2, BATCH_ROWS)]);
    wait_rows(&standby, &model).await?;
    ensure!(
        !repo.wal_object(&seg)?.exists(),
        "segment {seg} was archived: the rows may have come through the archive"
    );
    assert_read_only_standby(&standby).await?;

    promote_and_check(&standby, &model).await
}
