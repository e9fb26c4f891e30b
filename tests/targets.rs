//! Every recovery target end to end: archive → two base backups → batches of rows with their
//! LSNs, xids and a named restore point recorded → restore to each kind of target → the restored
//! server holds exactly the batches committed up to it.
//!
//! Workload (one transaction per batch, [`BATCH_ROWS`] rows each):
//!
//! ```text
//! table created, LSN_BEFORE_A    batch 1    backup A    batches 2, 3    backup B
//! batch 4, LSN_AFTER_4    batch 5 (xid X5)    batch 6    restore point 'before-7'    batch 7
//! ```

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tidemark_e2e::cluster::conf_quote;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};
use tokio_postgres::Client;

const BATCHES: i32 = 7;
const WAIT: Duration = Duration::from_secs(120);

/// What the source cluster recorded while writing.
struct Points {
    backup_a: String,
    backup_b: String,
    /// Insert LSN after the table was created, before backup A: no backup can reach it.
    lsn_before_a: String,
    /// Insert LSN after batch 4 committed, before batch 5 began.
    lsn_after_4: String,
    /// The transaction that wrote batch 5.
    xid_5: String,
}

fn batches(r: std::ops::RangeInclusive<i32>) -> BTreeMap<i32, i64> {
    r.map(|b| (b, BATCH_ROWS)).collect()
}

async fn text(db: &Client, sql: &str) -> Result<String> {
    let row = db
        .query_one(sql, &[])
        .await
        .with_context(|| format!("{sql} failed"))?;
    Ok(row.get(0))
}

async fn backup_id(src: &PgCluster, repo: &Repo) -> Result<String> {
    let b = src.backup(repo).await?;
    Ok(b["backup_id"].as_str().context("backup_id")?.to_string())
}

async fn prepare(dir: &TestDir, repo: &Repo) -> Result<(PgCluster, Points)> {
    let src = PgCluster::start_archiving(dir, "src", repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    let lsn_before_a = text(&db, "SELECT pg_current_wal_insert_lsn()::text").await?;
    data::write_batch(&db, 1).await?;
    let backup_a = backup_id(&src, repo).await?;
    data::write_batch(&db, 2).await?;
    data::write_batch(&db, 3).await?;
    let backup_b = backup_id(&src, repo).await?;
    data::write_batch(&db, 4).await?;
    let lsn_after_4 = text(&db, "SELECT pg_current_wal_insert_lsn()::text").await?;
    data::write_batch(&db, 5).await?;
    let xid_5 = text(
        &db,
        "SELECT xmin::text FROM batches WHERE batch = 5 LIMIT 1",
    )
    .await?;
    data::write_batch(&db, 6).await?;
    db.batch_execute("SELECT pg_create_restore_point('before-7')")
        .await
        .context("cannot create restore point before-7")?;
    data::write_batch(&db, 7).await?;
    let written = data::batch_counts(&db).await?;
    ensure!(
        written == batches(1..=BATCHES),
        "the source holds {written:?}"
    );
    src.switch_wal_and_wait(repo).await?;
    eprintln!("targets: backups A={backup_a} B={backup_b}, lsn before A {lsn_before_a}, after batch 4 {lsn_after_4}, batch 5 xid {xid_5}");
    Ok((
        src,
        Points {
            backup_a,
            backup_b,
            lsn_before_a,
            lsn_after_4,
            xid_5,
        },
    ))
}

/// Restores with `args`, checks the chosen backup, starts the server until it promotes and
/// checks its batches and the log line that says where recovery stopped.
async fn restore_and_check(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    args: &[&str],
    want_backup: &str,
    want: BTreeMap<i32, i64>,
    stop_line: &str,
) -> Result<()> {
    let pgdata = dir.join(name);
    let r = repo.restore(&pgdata, args).await?.ok()?;
    let report = r.json()?;
    ensure!(
        report["backup_id"] == want_backup,
        "{name}: restore {args:?} chose backup {} instead of {want_backup}: {report}",
        report["backup_id"]
    );
    let server = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    let db = server.client().await?;
    let counts = data::batch_counts(&db).await?;
    ensure!(
        counts == want,
        "{name}: restored with {args:?}: rows per batch {counts:?}, want {want:?}\n{}",
        server.log_tail()
    );
    let lines = server.log_lines(stop_line);
    ensure!(
        !lines.is_empty(),
        "{name}: the server log does not say {stop_line:?}\n{}",
        server.log_tail()
    );
    ensure!(
        data::checkpoint_timeline(&db).await? > 1,
        "{name}: the server did not promote to a new timeline"
    );
    eprintln!(
        "targets: {name} {args:?}: batches {:?}; {}",
        counts.keys().collect::<Vec<_>>(),
        lines[0].trim()
    );
    Ok(())
}

/// Adds the harness's settings to a restored directory and starts the server without waiting
/// for promotion (`pg_ctl start -w` returns once it accepts read-only connections or exits).
async fn start_only(dir: &TestDir, name: &str, pgdata: &Path) -> Result<(PgCluster, Result<()>)> {
    let mut c = PgCluster::adopt(dir, name, pgdata)?;
    c.append_conf(
        "postgresql.auto.conf",
        &format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = {}\narchive_mode = off\narchive_command = ''\nfsync = on\n",
            conf_quote(&c.sock.to_string_lossy())
        ),
    )?;
    let started = c.start().await;
    Ok((c, started))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recovery_target_restores_exactly_its_rows() -> Result<()> {
    let dir = TestDir::new("targets")?;
    let repo = Repo::create(&dir, "repo")?;
    let (src, p) = prepare(&dir, &repo).await?;
    drop(src);

    // LSN: the newest backup that stopped before it (B), rows up to batch 4, not 5.
    restore_and_check(
        &dir,
        &repo,
        "lsn",
        &["--target-lsn", &p.lsn_after_4],
        &p.backup_b,
        batches(1..=4),
        "recovery stopping after WAL location (LSN)",
    )
    .await?;
    // The same LSN from the older backup A, forced.
    restore_and_check(
        &dir,
        &repo,
        "lsn-backup-a",
        &["--target-lsn", &p.lsn_after_4, "--backup", &p.backup_a],
        &p.backup_a,
        batches(1..=4),
        "recovery stopping after WAL location (LSN)",
    )
    .await?;
    // xid at a commit boundary: inclusive keeps batch 5, exclusive stops just before it.
    restore_and_check(
        &dir,
        &repo,
        "xid-inclusive",
        &["--target-xid", &p.xid_5],
        &p.backup_b,
        batches(1..=5),
        &format!("recovery stopping after commit of transaction {}", p.xid_5),
    )
    .await?;
    restore_and_check(
        &dir,
        &repo,
        "xid-exclusive",
        &["--target-xid", &p.xid_5, "--target-exclusive"],
        &p.backup_b,
        batches(1..=4),
        &format!("recovery stopping before commit of transaction {}", p.xid_5),
    )
    .await?;
    // A named restore point: batches 1..=6, not 7.
    restore_and_check(
        &dir,
        &repo,
        "name",
        &["--target-name", "before-7"],
        &p.backup_b,
        batches(1..=6),
        "recovery stopping at restore point \"before-7\"",
    )
    .await?;
    // immediate: exactly each backup's consistent state.
    restore_and_check(
        &dir,
        &repo,
        "immediate",
        &["--target", "immediate"],
        &p.backup_b,
        batches(1..=3),
        "recovery stopping after reaching consistency",
    )
    .await?;
    restore_and_check(
        &dir,
        &repo,
        "immediate-backup-a",
        &["--target", "immediate", "--backup", &p.backup_a],
        &p.backup_a,
        batches(1..=1),
        "recovery stopping after reaching consistency",
    )
    .await?;

    // verify drills the same targets, with restore's selection: an xid, exclusive, and a name.
    for (name, args, stop) in [
        (
            "verify-xid",
            vec!["--target-xid", p.xid_5.as_str(), "--target-exclusive"],
            format!("before commit of transaction {}", p.xid_5),
        ),
        (
            "verify-name",
            vec!["--target-name", "before-7"],
            "at restore point \"before-7\"".to_string(),
        ),
    ] {
        let scratch = dir.join(name).to_string_lossy().into_owned();
        let pg_bin = tidemark_e2e::env::pg_bin_dir()?
            .to_string_lossy()
            .into_owned();
        let mut a = vec![
            "verify",
            "--repo",
            &repo.url,
            "--scratch",
            &scratch,
            "--pg-bin",
            &pg_bin,
        ];
        a.extend_from_slice(&args);
        let r = tidemark_e2e::restore(&a).await?;
        ensure!(r.success(), "verify {args:?} failed:\n{r}");
        let v = r.json()?;
        let reached = v["checks"]
            .as_array()
            .context("checks")?
            .iter()
            .find(|c| c["name"] == "reached_target")
            .with_context(|| format!("no reached_target check: {v}"))?;
        ensure!(
            v["ok"] == true
                && v["backup"]["id"] == p.backup_b.as_str()
                && reached["outcome"] == "pass"
                && reached["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(&stop)),
            "verify {args:?}: want a pass from backup {} stopping {stop}: {v}",
            p.backup_b
        );
        eprintln!("targets: {name}: {}", reached["detail"]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_actions_pause_and_shutdown_and_unreachable_targets_are_refused() -> Result<()> {
    let dir = TestDir::new("target-actions")?;
    let repo = Repo::create(&dir, "repo")?;
    let (src, p) = prepare(&dir, &repo).await?;
    drop(src);

    // No backup stopped at or before an LSN taken before the first backup: refused by name.
    let pgdata = dir.join("unreachable");
    let r = repo
        .restore(&pgdata, &["--target-lsn", &p.lsn_before_a])
        .await?;
    ensure!(
        r.code() == Some(1)
            && r.stderr.contains(&format!(
                "no backup can reach target LSN {}",
                p.lsn_before_a.to_uppercase()
            ))
            && r.stderr.contains("hint:"),
        "restore to an LSN before every backup was not refused clearly:\n{r}"
    );
    ensure!(
        std::fs::read_dir(&pgdata).map_or(true, |mut d| d.next().is_none()),
        "the refused restore wrote into {}",
        pgdata.display()
    );
    // A forced backup that stopped after the target LSN (B stopped after batch 3, the target
    // lies before backup A even): refused, naming the backup.
    let r = repo
        .restore(
            &dir.join("forced-too-new"),
            &["--target-lsn", &p.lsn_before_a, "--backup", &p.backup_b],
        )
        .await?;
    ensure!(
        r.code() == Some(1)
            && r.stderr
                .contains(&format!("backup {} cannot reach target lsn", p.backup_b))
            && r.stderr.contains("after the target LSN"),
        "a forced backup that cannot reach the target was not refused clearly:\n{r}"
    );

    // A timeline without an archived history file cannot be followed: refused by name.
    let r = repo
        .restore(
            &dir.join("no-such-timeline"),
            &["--target", "immediate", "--target-timeline", "5"],
        )
        .await?;
    ensure!(
        r.code() == Some(1)
            && r.stderr
                .contains("00000005.history, the history of timeline 5")
            && r.stderr.contains("hint:"),
        "a restore following a timeline the archive does not hold was not refused clearly:\n{r}"
    );

    // pause: the server reaches the target and stays in recovery, replay paused.
    let pgdata = dir.join("pause");
    repo.restore(
        &pgdata,
        &["--target-xid", &p.xid_5, "--target-action", "pause"],
    )
    .await?
    .ok()?;
    let (paused, started) = start_only(&dir, "pause-server", &pgdata).await?;
    started?;
    let db = paused.client().await?;
    let t0 = Instant::now();
    loop {
        let state = text(&db, "SELECT pg_get_wal_replay_pause_state()").await?;
        if state == "paused" {
            break;
        }
        if t0.elapsed() > WAIT {
            bail!(
                "replay was not paused after {WAIT:?} (state {state})\n{}",
                paused.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = db
        .query_one("SELECT pg_is_in_recovery(), pg_is_wal_replay_paused()", &[])
        .await?;
    let (in_recovery, is_paused): (bool, bool) = (row.get(0), row.get(1));
    ensure!(
        in_recovery && is_paused,
        "paused server: in recovery {in_recovery}, replay paused {is_paused}"
    );
    let counts = data::batch_counts(&db).await?;
    ensure!(
        counts == batches(1..=5),
        "paused at xid {}: rows per batch {counts:?}\n{}",
        p.xid_5,
        paused.log_tail()
    );
    ensure!(
        !paused
            .log_lines("pausing at the end of recovery")
            .is_empty(),
        "the paused server's log does not say it paused\n{}",
        paused.log_tail()
    );
    drop(db);
    drop(paused);

    // shutdown: the server reaches the target and stops, without promoting.
    let pgdata = dir.join("shutdown");
    repo.restore(
        &pgdata,
        &[
            "--target-lsn",
            &p.lsn_after_4,
            "--target-action",
            "shutdown",
            "--target-timeline",
            "1",
        ],
    )
    .await?
    .ok()?;
    let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf"))?;
    ensure!(
        auto.contains("recovery_target_timeline = '1'\n")
            && auto.contains("recovery_target_action = 'shutdown'\n"),
        "the recovery settings do not name timeline 1 and shutdown:\n{auto}"
    );
    let (stopped, _started) = start_only(&dir, "shutdown-server", &pgdata).await?;
    let t0 = Instant::now();
    while stopped.log_lines("shutdown at recovery target").is_empty()
        || pgdata.join("postmaster.pid").exists()
    {
        if t0.elapsed() > WAIT
            || (!pgdata.join("postmaster.pid").exists() && !stopped.log_lines("FATAL").is_empty())
        {
            bail!(
                "the server did not shut down at the target (waited up to {WAIT:?})\n{}",
                stopped.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        !stopped
            .log_lines("recovery stopping after WAL location (LSN)")
            .is_empty()
            && stopped.log_lines("selected new timeline ID").is_empty(),
        "the server did not stop at the target LSN without promoting\n{}",
        stopped.log_tail()
    );
    eprintln!(
        "targets: pause and shutdown reached their targets; {} stayed in recovery",
        stopped.name
    );
    Ok(())
}
