//! Every supported PostgreSQL major, end to end: one test per major (14..18), each on that
//! major's own server binaries (scripts/install-deps.sh installs 14, 16, 17 and 18 beside
//! Debian's 15).
//!
//! Each case: a primary archiving through the sidecar (wal-push hands off over its socket),
//! `backup --source pgdata` and `backup --source replication`, point-in-time restores between
//! batches from each of them, row for row; the restored latest point promoted onto timeline 2 and
//! archiving into the same repository; and a restore drill (`verify`) of the end of timeline 2,
//! which finds the server binaries by the backup's major. PostgreSQL 17 runs with 32 MiB WAL
//! segments (`initdb --wal-segsize=32`).

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;
use tidemark_e2e::cluster::{conf_quote, shell_word};
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::env;
use tidemark_e2e::sidecar::{switch_wal, wait_archived, Sidecar, SidecarConfig};
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};

fn batches(r: std::ops::RangeInclusive<i32>) -> BTreeMap<i32, i64> {
    r.map(|b| (b, BATCH_ROWS)).collect()
}

/// Restores to `target` args, starts the result, and compares its rows with `want`; returns the
/// restore's JSON report and the running server.
async fn restore_and_count(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    target: &[&str],
    want: &BTreeMap<i32, i64>,
) -> Result<(serde_json::Value, PgCluster)> {
    let data = dir.join(name);
    let r = repo.restore(&data, target).await?.ok()?;
    let report = r.json()?;
    let server = start_restored(dir, &format!("{name}-server"), &data).await?;
    // Paused at its target and promoted there by wal-fetch's request, without the
    // end-of-recovery checkpoint (the harness turns log_checkpoints on for every major).
    ensure!(
        !server.log_lines("received promote request").is_empty()
            && !server
                .log_lines("pausing at the end of recovery")
                .is_empty()
            && !data.join("recovery.signal").exists(),
        "{name}: not paused at its target and promoted there by wal-fetch\n{}",
        server.log_tail()
    );
    let counts = data::batch_counts(&server.client().await?).await?;
    ensure!(
        &counts == want,
        "{name}: restored rows per batch {counts:?}, want {want:?}\n{}",
        server.log_tail()
    );
    Ok((report, server))
}

/// The whole case on PostgreSQL `major`, initialised with `wal_seg_mib` MiB WAL segments.
async fn matrix(major: u32, wal_seg_mib: u32) -> Result<()> {
    let dir = TestDir::new(&format!("matrix-pg{major}"))?;
    let repo = Repo::create(&dir, "repo")?;
    let seg_arg = format!("--wal-segsize={wal_seg_mib}");
    let mut src = PgCluster::initdb_major(&dir, "src", major, &[seg_arg.as_str()]).await?;
    let sc = Sidecar::start(SidecarConfig::new(&dir, "sidecar", &repo.url, &src.data)?).await?;
    let agent = env::bins()?.agent;
    src.start_with_archive_command(&format!(
        "{} wal-push --repo {} --socket-dir {} %p",
        shell_word(&agent.to_string_lossy()),
        shell_word(&repo.url),
        shell_word(&sc.cfg.socket_dir.to_string_lossy())
    ))
    .await?;
    let db = src.client().await?;
    let version: String = db.query_one("SELECT version()", &[]).await?.get(0);
    let seg_size: String = db
        .query_one("SELECT current_setting('wal_segment_size')", &[])
        .await?
        .get(0);
    eprintln!("matrix pg{major}: {version}; wal_segment_size {seg_size}");
    ensure!(
        version.starts_with(&format!("PostgreSQL {major}.")),
        "the server is {version}, not PostgreSQL {major}"
    );
    ensure!(
        seg_size == format!("{wal_seg_mib}MB"),
        "wal_segment_size is {seg_size}, not the {wal_seg_mib} MiB initdb was given"
    );
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let b1 = src.backup(&repo).await?;
    ensure!(
        b1["pg_version"].as_u64().map(|v| v / 10000) == Some(major as u64),
        "the pgdata backup records {}, not PostgreSQL {major}",
        b1["pg_version"]
    );
    data::write_batch(&db, 2).await?;
    let t1 = data::target_time_between(&db).await?;
    data::write_batch(&db, 3).await?;
    let b2 = tidemark_e2e::replication::backup_ok(&src, &repo, &[]).await?;
    ensure!(b2["source"] == "replication", "{b2}");
    data::write_batch(&db, 4).await?;
    let t2 = data::target_time_between(&db).await?;
    data::write_batch(&db, 5).await?;
    let last = switch_wal(&db).await?;
    wait_archived(&db, &last, Duration::from_secs(60))
        .await
        .with_context(|| sc.log_tail(30))?;
    let handed = sc.metric("tidemark_wal_handoffs_total").await?;
    ensure!(
        handed >= 1.0,
        "archive_command never handed a file to the sidecar\n{}",
        sc.log_tail(30)
    );
    drop(db);
    src.stop().await?;

    let info = repo.info().await?;
    ensure!(
        info["pg_major"] == major
            && info["backups"].as_array().is_some_and(|b| b.len() == 2
                && b.iter()
                    .all(|b| b["pg_version"].as_u64().map(|v| v / 10000) == Some(major as u64))),
        "info does not show two PostgreSQL {major} backups: {info}"
    );

    // PITR from each backup source, row for row.
    let (r1, s1) = restore_and_count(
        &dir,
        &repo,
        "pitr-pgdata",
        &["--target-time", &t1],
        &batches(1..=2),
    )
    .await?;
    ensure!(
        r1["backup_id"] == b1["backup_id"],
        "the restore to {t1} used {} instead of the pgdata backup {}",
        r1["backup_id"],
        b1["backup_id"]
    );
    drop(s1);
    let (r2, s2) = restore_and_count(
        &dir,
        &repo,
        "pitr-replication",
        &["--target-time", &t2],
        &batches(1..=4),
    )
    .await?;
    ensure!(
        r2["backup_id"] == b2["backup_id"],
        "the restore to {t2} used {} instead of the replication backup {}",
        r2["backup_id"],
        b2["backup_id"]
    );
    drop(s2);

    // A timeline switch: the end of the archive restored, promoted (timeline 2), archiving on.
    let pdata = dir.join("promoted");
    repo.restore(&pdata, &["--target", "latest"]).await?.ok()?;
    let mut promoted = PgCluster::adopt(&dir, "promoted-server", &pdata)?;
    promoted.append_conf(
        "postgresql.auto.conf",
        &format!(
            "\n# written by the matrix test\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = {}\narchive_mode = on\narchive_command = {}\n",
            conf_quote(&promoted.sock.to_string_lossy()),
            conf_quote(&format!(
                "{} wal-push --repo {} %p",
                shell_word(&agent.to_string_lossy()),
                shell_word(&repo.url)
            ))
        ),
    )?;
    promoted.start().await?;
    let pdb = promoted.client().await?;
    let started = std::time::Instant::now();
    while pdb
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get::<_, bool>(0)
    {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the restored server did not promote\n{}",
            promoted.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Promoted by wal-fetch's request at the end of the archive.
    ensure!(
        !promoted.log_lines("received promote request").is_empty()
            && !pdata.join("standby.signal").exists(),
        "the restored server was not promoted by wal-fetch (standby.signal left: {})\n{}",
        pdata.join("standby.signal").exists(),
        promoted.log_tail()
    );
    ensure!(
        data::batch_counts(&pdb).await? == batches(1..=5),
        "the restore to the end of the archive lacks rows"
    );
    ensure!(
        data::checkpoint_timeline(&pdb).await? == 2,
        "the promoted server is not on timeline 2"
    );
    data::write_batch(&pdb, 6).await?;
    let seg2 = switch_wal(&pdb).await?;
    ensure!(seg2.starts_with("00000002"), "{seg2} is not on timeline 2");
    wait_archived(&pdb, &seg2, Duration::from_secs(60))
        .await
        .with_context(|| promoted.log_tail())?;
    repo.wait_for_wal("00000002.history", Duration::from_secs(30))
        .await?;
    drop(pdb);
    promoted.stop().await?;

    // The drill: the end of timeline 2, on this major's own binaries (found by the backup's
    // major: no --pg-bin), with every batch back.
    let sql = dir.write("checks.sql", b"SELECT count(*) = 6000 FROM batches;\n")?;
    let sql = sql.to_string_lossy().into_owned();
    let r = repo
        .verify_latest(&dir.join("drill"), &["--check-sql", &sql])
        .await?;
    ensure!(r.success(), "the drill of PostgreSQL {major} failed:\n{r}");
    let v = r.json()?;
    let checks: BTreeMap<&str, &str> = v["checks"]
        .as_array()
        .context("the drill's JSON has no checks")?
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("?"),
                c["outcome"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    // Every check runs and passes; the only exception is the full checksum read, which needs
    // this major's own pg_checksums (the npm server packages ship none; Debian's 15 does).
    let checksums = if env::pg_bin_dir_for(major)?.join("pg_checksums").is_file() {
        "pass"
    } else {
        "skipped"
    };
    let want = [
        ("wal_continuity", "pass"),
        ("accepts_connections", "pass"),
        ("reached_target", "pass"),
        ("amcheck", "pass"),
        ("sql:SELECT count(*) = 6000 FROM batches", "pass"),
        ("data_checksums", checksums),
    ];
    for (name, outcome) in want {
        ensure!(
            checks.get(name) == Some(&outcome),
            "drill check {name}: {:?}, want {outcome}\n{v}",
            checks.get(name)
        );
    }
    let outcomes: Vec<String> = checks.iter().map(|(n, o)| format!("{n}={o}")).collect();
    eprintln!(
        "matrix pg{major}: passed (pgdata PITR {}, replication PITR {}, timeline 2 through {seg2}, drill RTO {}s: {})",
        b1["backup_id"],
        b2["backup_id"],
        v["seconds"]["rto"],
        outcomes.join(" ")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_pg14() -> Result<()> {
    matrix(14, 16).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_pg15() -> Result<()> {
    matrix(15, 16).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_pg16() -> Result<()> {
    matrix(16, 16).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_pg17_with_32_mib_wal_segments() -> Result<()> {
    matrix(17, 32).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_pg18() -> Result<()> {
    matrix(18, 16).await
}
