//! Point-in-time recovery end to end: archive → base backup → writes with recorded commit times
//! → restore to a time → the restored server holds exactly the rows committed up to that time.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;
use tidemark_e2e::cluster::{conf_quote, shell_word, wait_promoted};
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::sidecar::segment_before;
use tidemark_e2e::{
    start_restored, start_restored_standby, start_restored_standby_with_options, PgCluster, Repo,
    TestDir,
};

/// Batches written; the base backup is taken after [`BACKUP_AFTER`], the target lies between
/// [`TARGET_AFTER`] and the batch after it.
const BATCHES: i32 = 8;
const BACKUP_AFTER: i32 = 3;
const TARGET_AFTER: i32 = 6;
/// Pause around each clock reading so commit times and readings never share a microsecond.
const GAP: Duration = Duration::from_millis(150);

fn expected(batches: std::ops::RangeInclusive<i32>) -> BTreeMap<i32, i64> {
    batches.map(|b| (b, BATCH_ROWS)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_restores_exactly_the_rows_committed_before_target() -> Result<()> {
    let dir = TestDir::new("pitr")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;

    // after[b]: a server clock reading taken after batch b committed and before batch b+1 began.
    let mut after = BTreeMap::new();
    let mut backup = None;
    for b in 1..=BATCHES {
        data::write_batch(&db, b).await?;
        tokio::time::sleep(GAP).await;
        after.insert(b, data::server_time_text(&db).await?);
        tokio::time::sleep(GAP).await;
        if b == BACKUP_AFTER {
            backup = Some(src.backup(&repo).await?);
        }
    }
    let backup = backup.context("the backup was taken")?;
    let backup_id = backup["backup_id"]
        .as_str()
        .context("backup_id")?
        .to_string();
    eprintln!(
        "pitr: backup {backup_id} after batch {BACKUP_AFTER}: {} logical bytes, {} stored",
        backup["logical_bytes"], backup["new_stored_bytes"]
    );
    let last_seg = src.switch_wal_and_wait(&repo).await?;
    let info = repo.info().await?;
    let ids: Vec<&str> = info["backups"]
        .as_array()
        .context("info backups")?
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    ensure!(
        ids == [backup_id.as_str()],
        "info lists backups {ids:?}, want [{backup_id}]: {info}"
    );
    let tl1 = info["wal"]
        .as_array()
        .and_then(|w| w.iter().find(|t| t["timeline"] == 1))
        .with_context(|| format!("info shows no WAL on timeline 1: {info}"))?;
    ensure!(
        tl1["last_segment"].as_str() >= Some(last_seg.as_str())
            && tl1["gaps"].as_array().is_some_and(|g| g.is_empty()),
        "info does not show timeline 1 archived through {last_seg} without gaps: {tl1}"
    );
    eprintln!(
        "pitr: archive holds timeline 1 {} .. {}",
        tl1["first_segment"], tl1["last_segment"]
    );

    // Restore to a time between batch TARGET_AFTER and the next one.
    let target = after[&TARGET_AFTER].clone();
    let pgdata = dir.join("restored-time");
    let r = repo
        .restore(&pgdata, &["--target-time", &target])
        .await?
        .ok()?;
    let report = r.json()?;
    ensure!(
        report["backup_id"] == backup_id.as_str(),
        "restore chose {} instead of backup {backup_id}",
        report["backup_id"]
    );
    // Archive recovery paused at the target, promoted there by wal-fetch's request.
    let marker = pgdata.join(".tidemark-promote-at-end");
    let signal = pgdata.join("recovery.signal");
    ensure!(
        signal.is_file() && marker.is_file() && !pgdata.join("standby.signal").exists(),
        "a restore to a time wrote no recovery.signal and promotion marker, or standby.signal"
    );
    let restored = start_restored(&dir, "restored-time-server", &pgdata).await?;
    ensure!(
        !restored.log_lines("received promote request").is_empty()
            && restored.log_lines("checkpoint starting: end-of-recovery").is_empty()
            && !signal.exists(),
        "the server restored to a time was not promoted at its target by wal-fetch without an end-of-recovery checkpoint (recovery.signal left: {})\n{}",
        signal.exists(),
        restored.log_tail()
    );
    let rdb = restored.client().await?;
    let counts = data::batch_counts(&rdb).await?;
    ensure!(
        counts == expected(1..=TARGET_AFTER),
        "restored to {target}: rows per batch {counts:?}, want batches 1..={TARGET_AFTER} with {BATCH_ROWS} rows each\n{}",
        restored.log_tail()
    );
    let in_recovery: bool = rdb
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    ensure!(!in_recovery, "the restored server is still in recovery");
    let checksums: String = rdb.query_one("SHOW data_checksums", &[]).await?.get(0);
    ensure!(
        checksums == "on",
        "the restored server has data_checksums = {checksums}"
    );
    let tli = data::checkpoint_timeline(&rdb).await?;
    ensure!(
        tli > 1,
        "the restored server stayed on timeline {tli}; promotion must start a new one"
    );
    let stopped = restored.log_lines("recovery stopping before commit");
    ensure!(
        !stopped.is_empty(),
        "the server log does not say recovery stopped at the target\n{}",
        restored.log_tail()
    );
    eprintln!(
        "pitr: restored to {target}, found batches {:?} ({} rows total), timeline {tli}; log: {}",
        counts.keys().collect::<Vec<_>>(),
        counts.values().sum::<i64>(),
        stopped[0]
    );
    drop(rdb);
    drop(restored);

    // Restore to the end of the archive.
    let pgdata = dir.join("restored-latest");
    repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
    // Standby mode, promoted by wal-fetch when the archive ends.
    let marker = pgdata.join(".tidemark-promote-at-end");
    ensure!(
        pgdata.join("standby.signal").is_file() && marker.is_file(),
        "a restore to latest wrote no standby.signal and promotion marker"
    );
    ensure!(
        !pgdata.join("recovery.signal").exists(),
        "a restore to latest wrote recovery.signal"
    );
    let latest = start_restored(&dir, "restored-latest-server", &pgdata).await?;
    ensure!(
        !latest.log_lines("received promote request").is_empty()
            && latest.log_lines("checkpoint starting: end-of-recovery").is_empty()
            && !pgdata.join("standby.signal").exists(),
        "the server restored to latest was not promoted by wal-fetch without an end-of-recovery checkpoint (standby.signal left: {})\n{}",
        pgdata.join("standby.signal").exists(),
        latest.log_tail()
    );
    let ldb = latest.client().await?;
    let counts = data::batch_counts(&ldb).await?;
    ensure!(
        counts == expected(1..=BATCHES),
        "restored to the end of the archive: rows per batch {counts:?}, want all {BATCHES} batches\n{}",
        latest.log_tail()
    );
    let tli = data::checkpoint_timeline(&ldb).await?;
    ensure!(
        tli > 1,
        "the server restored to latest stayed on timeline {tli}"
    );
    eprintln!(
        "pitr: restored to latest, found batches {:?} ({} rows total), timeline {tli}",
        counts.keys().collect::<Vec<_>>(),
        counts.values().sum::<i64>()
    );
    Ok(())
}

/// A restore to the end of the archive whose backup's WAL is gone by the time the server starts
/// is never promoted: PostgreSQL acts on wal-fetch's promotion request where the WAL runs out,
/// here before the backup's consistency point, and stops as archive recovery would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_latest_missing_the_backups_wal_is_not_promoted() -> Result<()> {
    let dir = TestDir::new("pitr-missing-wal")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let backup = src.backup(&repo).await?;
    data::write_batch(&db, 2).await?;
    src.switch_wal_and_wait(&repo).await?;
    let pgdata = dir.join("restored");
    repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
    // The segment holding the backup's stop point, gone from the archive.
    let name = segment_before(1, backup["stop_lsn"].as_str().context("stop_lsn")?)?;
    let object = repo.wal_object(&name)?;
    std::fs::remove_file(&object).with_context(|| format!("cannot remove {}", object.display()))?;
    let e = match start_restored(&dir, "restored-server", &pgdata).await {
        Ok(c) => anyhow::bail!(
            "the server was promoted without WAL segment {name} of its backup\n{}",
            c.log_tail()
        ),
        Err(e) => format!("{e:#}"),
    };
    // The backup is small: its checkpoint and its stop point share the segment.
    ensure!(
        e.contains("FATAL:  could not locate required checkpoint record")
            || e.contains("FATAL:  WAL ends before consistent recovery point"),
        "the server without {name} did not stop before its consistency point: {e}"
    );
    eprintln!(
        "pitr: without {name}, the restored server stopped: {}",
        e.lines().find(|l| l.contains("FATAL")).unwrap_or("")
    );
    Ok(())
}

/// A server restored to the end of the archive that crashes after wal-fetch requested its
/// promotion and before it promoted (here: an immediate shutdown while its restore_command is
/// held) is asked again after its restart, and promotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_latest_restarted_before_its_promotion_still_promotes() -> Result<()> {
    let (dir, repo, src, db) = tidemark_e2e::archiving_source("pitr-restart").await?;
    data::write_batch(&db, 1).await?;
    src.backup(&repo).await?;
    data::write_batch(&db, 2).await?;
    src.switch_wal_and_wait(&repo).await?;
    let pgdata = dir.join("restored");
    repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
    // The restore's restore_command, run by a wrapper that does not return from a segment the
    // archive lacks while a promotion request is pending and the hold file exists (PostgreSQL
    // cannot act on the request then).
    let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf"))?;
    let command = auto
        .lines()
        .filter_map(|l| l.strip_prefix("restore_command = '"))
        .next_back()
        .and_then(|v| v.strip_suffix('\''))
        .map(|v| v.replace("''", "'"))
        .context("the restore wrote no restore_command")?;
    let program = command
        .strip_suffix(" %f %p")
        .with_context(|| format!("restore_command {command:?} does not end with %f %p"))?;
    let hold = dir.join("hold");
    std::fs::write(&hold, b"")?;
    let wrapper = dir.join("restore-wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n{program} \"$1\" \"$2\"\nrc=$?\ncase \"$1:$rc\" in\n????????????????????????:1) while [ -f promote ] && [ -f {} ]; do sleep 0.1; done ;;\nesac\nexit $rc\n",
            shell_word(&hold.to_string_lossy())
        ),
    )?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(pgdata.join("postgresql.auto.conf"))?;
        writeln!(
            f,
            "restore_command = {}",
            conf_quote(&format!(
                "sh {} %f %p",
                shell_word(&wrapper.to_string_lossy())
            ))
        )?;
    }
    let marker = pgdata.join(".tidemark-promote-at-end");
    let mut server = start_restored_standby(&dir, "restored-server", &pgdata).await?;
    // wal-fetch requested promotion at the first request and recorded it in the marker; at the
    // end of the archive the wrapper holds the startup process before it can act on it.
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&marker)
        .unwrap_or_default()
        .contains("requested of postmaster")
    {
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "wal-fetch recorded no promotion request in {} within 60 s\n{}",
            marker.display(),
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let in_recovery = server.in_recovery().await?;
    ensure!(
        in_recovery,
        "the server promoted while its restore_command was held\n{}",
        server.log_tail()
    );
    // The crash: an immediate shutdown (SIGQUIT to the postmaster) with the request pending.
    let pid_file = pgdata.join("postmaster.pid");
    let pid = std::fs::read_to_string(&pid_file)?
        .lines()
        .next()
        .context("empty postmaster.pid")?
        .trim()
        .to_string();
    let status = std::process::Command::new("kill")
        .args(["-QUIT", &pid])
        .status()?;
    ensure!(status.success(), "kill -QUIT {pid} failed: {status}");
    let started = std::time::Instant::now();
    while pid_file.exists() {
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the postmaster did not exit within 60 s of SIGQUIT\n{}",
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        server.log_lines("received promote request").is_empty() && marker.is_file(),
        "the server promoted, or lost its marker, before the crash\n{}",
        server.log_tail()
    );
    std::fs::remove_file(&hold)?;
    server.start().await?;
    wait_promoted(&server).await?;
    ensure!(
        !server.log_lines("received promote request").is_empty()
            && !pgdata.join("standby.signal").exists(),
        "the restarted server was not promoted by wal-fetch (standby.signal left: {})\n{}",
        pgdata.join("standby.signal").exists(),
        server.log_tail()
    );
    let counts = data::batch_counts(&server.client().await?).await?;
    ensure!(
        counts == expected(1..=2),
        "restored to the end of the archive after a restart: rows per batch {counts:?}, want batches 1 and 2\n{}",
        server.log_tail()
    );
    eprintln!(
        "pitr: a restart before the promotion was asked again and promoted, batches {counts:?}"
    );
    Ok(())
}

/// A server restored to the end of the archive but started as a standby by hand, with
/// `primary_conninfo` on the postmaster's command line (which outranks the restore's
/// `primary_conninfo = ''` in postgresql.auto.conf), is never promoted by wal-fetch: it streams
/// from its primary and stays in recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_latest_made_a_standby_on_the_command_line_is_not_promoted() -> Result<()> {
    let (dir, repo, src, db) = tidemark_e2e::archiving_source("pitr-hand-standby").await?;
    data::write_batch(&db, 1).await?;
    src.backup(&repo).await?;
    data::write_batch(&db, 2).await?;
    src.switch_wal_and_wait(&repo).await?;
    let pgdata = dir.join("restored");
    repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
    let marker = pgdata.join(".tidemark-promote-at-end");
    ensure!(marker.is_file(), "restore --target latest wrote no marker");
    let server = start_restored_standby_with_options(
        &dir,
        "restored-server",
        &pgdata,
        &format!(
            "-c primary_conninfo='host=127.0.0.1 port={} user=postgres application_name=hand-made'",
            src.port()
        ),
    )
    .await?;
    // It streams from the primary: a batch written there reaches it without a WAL switch.
    data::write_batch(&db, 3).await?;
    let started = std::time::Instant::now();
    loop {
        let sdb = server.client().await?;
        let status: Option<String> = sdb
            .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
            .await?
            .map(|r| r.get(0));
        let counts = data::batch_counts(&sdb).await?;
        if status.as_deref() == Some("streaming") && counts == expected(1..=3) {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the hand-made standby is not streaming batch 3 within 60 s (receiver {status:?}, rows {counts:?})\n{}",
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let in_recovery = server.in_recovery().await?;
    ensure!(
        in_recovery
            && server.log_lines("received promote request").is_empty()
            && !server.log_lines("sets primary_conninfo").is_empty()
            && !marker.exists()
            && !pgdata.join("promote").exists(),
        "the hand-made standby: in recovery {in_recovery}, marker left {}, promote file {}\n{}",
        marker.exists(),
        pgdata.join("promote").exists(),
        server.log_tail()
    );
    eprintln!("pitr: a restore made a standby on the command line streams and is not promoted");
    Ok(())
}

/// Targets before the oldest backup and inside it are refused (never "restore something else");
/// a target exactly at the backup's stop time uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_before_the_first_backup_finished_are_refused() -> Result<()> {
    let dir = TestDir::new("target-early")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let before = data::server_time_rfc3339(&db).await?;
    tokio::time::sleep(GAP).await;
    let backup = src.backup(&repo).await?;
    let info = repo.info().await?;
    let b = &info["backups"][0];
    ensure!(
        b["id"] == backup["backup_id"],
        "info does not list the backup: {info}"
    );
    let start = b["start_time"].as_str().context("start_time")?.to_string();
    let stop = b["stop_time"].as_str().context("stop_time")?.to_string();

    for (what, t) in [
        ("before the backup", &before),
        ("at the backup's start", &start),
    ] {
        let pgdata = dir.join(&format!("restore-{}", what.replace([' ', '\''], "-")));
        let r = repo.restore(&pgdata, &["--target-time", t]).await?;
        ensure!(!r.success(), "a target {what} ({t}) must fail:\n{r}");
        ensure!(
            r.stderr.contains("no backup finished at or before"),
            "a target {what} ({t}) failed without saying why:\n{r}"
        );
        let leftovers = std::fs::read_dir(&pgdata).map(|d| d.count()).unwrap_or(0);
        ensure!(
            leftovers == 0,
            "the refused restore wrote {leftovers} entries into {}",
            pgdata.display()
        );
        eprintln!(
            "target-early: target {what} ({t}) refused with exit {:?}: {}",
            r.code(),
            r.stderr.lines().next().unwrap_or("")
        );
    }

    let pgdata = dir.join("restore-at-stop");
    let r = repo.restore(&pgdata, &["--target-time", &stop]).await?;
    ensure!(
        r.success(),
        "a target at the backup's stop time ({stop}) must use that backup:\n{r}"
    );
    ensure!(
        r.json()?["backup_id"] == backup["backup_id"],
        "restore chose another backup:\n{r}"
    );
    eprintln!(
        "target-early: target at the stop time {stop} restored backup {}",
        backup["backup_id"]
    );
    Ok(())
}
