//! Retention across timeline forks, end to end on PostgreSQL 15 (issue 15.3): a PITR to a
//! moment older than the newest backup archives a new timeline into the same repository, so the
//! newest backups lie on an abandoned branch; a second PITR forks again. `expire` with
//! `--retain-last 1` or a window must keep a backup the latest timeline can use and the WAL it
//! needs, and every moment the plan promises (`recoverable_from` on) restores row for row. An
//! old primary rewound after a failover and archiving as a standby must not disturb the stored
//! WAL of either timeline.

use anyhow::{ensure, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::{
    archiving_source, expire_agreeing, start_restored, tidemark, PgCluster, Repo, TestDir, Tool,
};

const GAP: Duration = Duration::from_millis(150);

/// Writes batch `b` and returns a moment after its commit and before the next one (server clock,
/// RFC 3339 UTC).
async fn write_and_mark(db: &tokio_postgres::Client, b: i32) -> Result<String> {
    data::write_batch(db, b).await?;
    tokio::time::sleep(GAP).await;
    let t = data::server_time_rfc3339(db).await?;
    tokio::time::sleep(GAP).await;
    Ok(t)
}

fn rows(batches: &[i32]) -> BTreeMap<i32, i64> {
    batches.iter().map(|b| (*b, BATCH_ROWS)).collect()
}

fn kept_ids(plan: &Value) -> Vec<String> {
    plan["backups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["action"] == "keep")
        .filter_map(|b| b["id"].as_str().map(str::to_string))
        .collect()
}

fn stop_time_of(plan: &Value, id: &str) -> Option<String> {
    plan["backups"].as_array()?.iter().find(|b| b["id"] == id)?["stop_time"]
        .as_str()
        .map(str::to_string)
}

async fn check_ok(repo: &Repo, when: &str) -> Result<()> {
    let r = tidemark(
        Tool::Restore,
        &["check", "--repo", &repo.url, "--json"],
        &[],
    )
    .await?;
    ensure!(r.success(), "check failed {when}:\n{r}");
    Ok(())
}

/// A PITR to `t` that becomes the new primary: restored, promoted (a new timeline), archiving
/// into the same repository, its `.history` pushed (promotion happened with archiving off).
async fn fork_at(dir: &TestDir, repo: &Repo, name: &str, t: &str) -> Result<PgCluster> {
    let pgdata = dir.join(name);
    repo.restore(&pgdata, &["--target-time", t]).await?.ok()?;
    let mut next = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    let db = next.client().await?;
    let agent = tidemark_e2e::env::bins()?.agent;
    let cmd = format!("{} wal-push --repo {} %p", agent.display(), repo.url);
    db.batch_execute("ALTER SYSTEM SET archive_mode = 'on'")
        .await?;
    db.batch_execute(&format!(
        "ALTER SYSTEM SET archive_command = '{}'",
        cmd.replace('\'', "''")
    ))
    .await?;
    drop(db);
    next.stop().await?;
    next.start().await?;
    for e in std::fs::read_dir(pgdata.join("pg_wal"))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "history") {
            repo.wal_push(&p).await?.ok()?;
        }
    }
    Ok(next)
}

/// The timeline a server is on now.
async fn timeline(db: &tokio_postgres::Client) -> Result<i32> {
    data::checkpoint_timeline(db).await
}

/// (a) backup B1, writes, backup B2, writes, PITR to a moment between B1 and B2: timeline 2
/// forks before B2, which now lies on the abandoned branch. (b) a backup B3 on timeline 2, then a
/// second PITR to a moment of timeline 2 before B3: timeline 3. After each fork, `expire
/// --retain-window 1s`, `--retain-last 2 --retain-wal-window 1s` and `--retain-last 1` keep B1
/// (the only backup the latest timeline can use), promise from its stop, and `latest` and
/// promised moments restore row for row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_forks_older_than_the_newest_backup_keep_a_usable_backup_and_its_wal() -> Result<()> {
    let (dir, repo, mut src, db) = archiving_source("retention-forks-pitr").await?;
    data::write_batch(&db, 1).await?;
    let b1 = src.backup_id(&repo).await?;
    let t2 = write_and_mark(&db, 2).await?;
    data::write_batch(&db, 3).await?;
    let b2 = src.backup_id(&repo).await?;
    data::write_batch(&db, 4).await?;
    src.switch_wal_and_wait(&repo).await?;
    drop(db);

    // (a) Timeline 2 forks at t2, before B2 (which holds batch 3).
    let tl2 = fork_at(&dir, &repo, "tl2", &t2).await?;
    src.stop().await?;
    let db = tl2.client().await?;
    ensure!(
        timeline(&db).await? == 2,
        "the first PITR is not on timeline 2"
    );
    ensure!(
        data::batch_counts(&db).await? == rows(&[1, 2]),
        "the PITR to {t2} does not hold batches 1 and 2"
    );
    let t5 = write_and_mark(&db, 5).await?;
    data::write_batch(&db, 6).await?;
    tl2.switch_wal_and_wait(&repo).await?;

    for policy in [
        &["--retain-window", "1s"][..],
        // A WAL window's anchor: B1, never the abandoned B2 (its start would cut the WAL B1
        // needs to reach the fork).
        &["--retain-last", "2", "--retain-wal-window", "1s"][..],
        &["--retain-last", "1"][..],
    ] {
        let plan = expire_agreeing(&repo, policy, &[]).await?;
        let kept = kept_ids(&plan);
        ensure!(
            kept.contains(&b1),
            "{policy:?} did not keep {b1}, the only backup timeline 2 can use: {plan:#}"
        );
        ensure!(
            plan["recoverable_from"].as_str() == stop_time_of(&plan, &b1).as_deref(),
            "{policy:?} promises from {} rather than from {b1}'s stop: {plan:#}",
            plan["recoverable_from"]
        );
        check_ok(&repo, &format!("after expire {policy:?}")).await?;
    }
    // Every promised moment of timeline 2's history: before the fork (on timeline 1), after it,
    // and the end.
    for (name, target, want) in [
        ("a-t2", vec!["--target-time", &t2], rows(&[1, 2])),
        ("a-t5", vec!["--target-time", &t5], rows(&[1, 2, 5])),
        ("a-latest", vec!["--target", "latest"], rows(&[1, 2, 5, 6])),
    ] {
        let got = repo.restore_counts(&dir, name, &target).await?;
        ensure!(
            got == want,
            "restore {target:?} after the first fork gave {got:?}, want {want:?}"
        );
    }

    // (b) B3 on timeline 2, then a second PITR to t5 (before B3): timeline 3.
    let b3 = tl2.backup_id(&repo).await?;
    data::write_batch(&db, 7).await?;
    tl2.switch_wal_and_wait(&repo).await?;
    drop(db);
    let tl3 = fork_at(&dir, &repo, "tl3", &t5).await?;
    let mut tl2 = tl2;
    tl2.stop().await?;
    let db = tl3.client().await?;
    ensure!(
        timeline(&db).await? == 3,
        "the second PITR is not on timeline 3"
    );
    ensure!(
        data::batch_counts(&db).await? == rows(&[1, 2, 5]),
        "the PITR to {t5} does not hold batches 1, 2 and 5"
    );
    let t8 = write_and_mark(&db, 8).await?;
    data::write_batch(&db, 9).await?;
    tl3.switch_wal_and_wait(&repo).await?;
    for policy in [
        &["--retain-window", "1s"][..],
        // A WAL window's anchor: B1, never the abandoned B2 (its start would cut the WAL B1
        // needs to reach the fork).
        &["--retain-last", "2", "--retain-wal-window", "1s"][..],
        &["--retain-last", "1"][..],
    ] {
        let plan = expire_agreeing(&repo, policy, &[]).await?;
        let kept = kept_ids(&plan);
        ensure!(
            kept.contains(&b1),
            "{policy:?} did not keep {b1}, the only backup timeline 3 can use: {plan:#}"
        );
        ensure!(
            plan["recoverable_from"].as_str() == stop_time_of(&plan, &b1).as_deref(),
            "{policy:?} promises from {} rather than from {b1}'s stop: {plan:#}",
            plan["recoverable_from"]
        );
        check_ok(&repo, &format!("after the second fork, expire {policy:?}")).await?;
    }
    for (name, target, want) in [
        ("b-t2", vec!["--target-time", &t2], rows(&[1, 2])),
        ("b-t5", vec!["--target-time", &t5], rows(&[1, 2, 5])),
        ("b-t8", vec!["--target-time", &t8], rows(&[1, 2, 5, 8])),
        (
            "b-latest",
            vec!["--target", "latest"],
            rows(&[1, 2, 5, 8, 9]),
        ),
    ] {
        let got = repo.restore_counts(&dir, name, &target).await?;
        ensure!(
            got == want,
            "restore {target:?} after the second fork gave {got:?}, want {want:?}"
        );
    }
    // A backup of the new primary becomes the one `--retain-last 1` keeps: the newest backup is
    // usable again, so nothing else is kept.
    let b4 = tl3.backup_id(&repo).await?;
    data::write_batch(&db, 10).await?;
    tl3.switch_wal_and_wait(&repo).await?;
    let plan = expire_agreeing(&repo, &["--retain-last", "1"], &[]).await?;
    let kept = kept_ids(&plan);
    ensure!(
        kept == [b4.clone()],
        "with {b4} the newest backup and on timeline 3, --retain-last 1 should keep it alone ({b1}, {b2} and {b3} go): {plan:#}"
    );
    check_ok(&repo, "after the new backup's expire").await?;
    let got = repo
        .restore_counts(&dir, "c-latest", &["--target", "latest"])
        .await?;
    ensure!(
        got == rows(&[1, 2, 5, 8, 9, 10]),
        "restore latest from {b4} gave {got:?}"
    );
    Ok(())
}

/// The archived WAL objects (key → bytes) of the repository, `.history` files included.
fn wal_objects(repo: &Repo) -> Result<BTreeMap<String, Vec<u8>>> {
    Ok(repo
        .snapshot()?
        .into_iter()
        .filter(|(k, _)| k.starts_with("wal/"))
        .collect())
}

/// (c) A failover: the standby of a primary is promoted (timeline 2) and archives into the same
/// repository; the old primary writes on (one batch archived on timeline 1, one left unarchived
/// in its pg_wal) and is backed up there (the newest backup, on the abandoned branch). It is
/// then rewound with pg_rewind onto the new primary and started as its standby with
/// `archive_mode = always` into the same repository. Nothing it pushes changes a stored object
/// of either timeline; `expire --retain-last 1` keeps B1 (timeline 1 before the switch, the
/// only backup timeline 2 can use) and the WAL it needs; `latest` restores the new primary's rows
/// and a promised moment of timeline 2 restores row for row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_primary_rewound_after_failover_disturbs_no_stored_wal() -> Result<()> {
    use tidemark_e2e::cluster::{conf_quote, shell_word};
    use tidemark_e2e::{env, replication, sidecar};

    let (dir, repo, mut old, odb) = archiving_source("retention-forks-rewind").await?;
    data::write_batch(&odb, 1).await?;
    let b1 = old.backup_id(&repo).await?;
    let mut new = replication::start_standby(&dir, "standby", &old).await?;
    let agent = env::bins()?.agent;
    let push = format!(
        "{} wal-push --repo {} %p",
        shell_word(&agent.to_string_lossy()),
        shell_word(&repo.url)
    );
    new.append_conf(
        "postgresql.conf",
        &format!(
            "\n# archives into the repository once promoted\narchive_command = {}\n",
            conf_quote(&push)
        ),
    )?;
    new.stop().await?;
    new.start().await?;
    data::write_batch(&odb, 2).await?;
    replication::wait_caught_up(&old, &new).await?;

    // Failover: the standby becomes the primary of timeline 2; the old primary writes on.
    let ndb = new.client().await?;
    ndb.execute("SELECT pg_promote(true, 60)", &[]).await?;
    ensure!(
        timeline(&ndb).await? == 2,
        "the promoted standby is not on timeline 2"
    );
    repo.wait_for_wal("00000002.history", Duration::from_secs(60))
        .await?;
    data::write_batch(&odb, 90).await?;
    old.switch_wal_and_wait(&repo).await?;
    let b_old = old.backup_id(&repo).await?;
    data::write_batch(&odb, 91).await?; // never archived: only in the old primary's pg_wal
    let t3 = write_and_mark(&ndb, 3).await?;
    data::write_batch(&ndb, 4).await?;
    new.switch_wal_and_wait(&repo).await?;
    drop(odb);
    old.stop().await?;
    let before = wal_objects(&repo)?;
    ensure!(
        before.keys().any(|k| k.starts_with("wal/00000001/"))
            && before.keys().any(|k| k.starts_with("wal/00000002/")),
        "the archive should hold both timelines: {:?}",
        before.keys().collect::<Vec<_>>()
    );

    // pg_rewind the old primary onto the new one (the WAL it recycled fetched from the
    // repository) and run it as a standby that archives too. The restore_command is the one a
    // restore writes (prefetch on): pg_rewind walks pg_wal while it runs it, so wal-fetch must
    // not spool there for it ("could not remove file" before it knew).
    let fetch = format!(
        "{} wal-fetch %f %p --repo {}",
        shell_word(&env::bins()?.restore.to_string_lossy()),
        shell_word(&repo.url)
    );
    let restore_command = format!("\nrestore_command = {}\n", conf_quote(&fetch));
    old.append_conf("postgresql.auto.conf", &restore_command)?;
    let mut cmd = env::db_command(env::pg_bin("pg_rewind")?)?;
    cmd.arg("--target-pgdata")
        .arg(&old.data)
        .arg(format!("--source-server={}", new.conninfo()))
        .arg("--restore-target-wal")
        .arg("--write-recovery-conf");
    let r = env::run(cmd).await?;
    ensure!(r.success(), "pg_rewind failed:\n{r}");
    old.append_conf(
        "postgresql.auto.conf",
        &format!(
            "\n# the rewound old primary: a standby of the new one, archiving too\n\
             archive_mode = always\n\
             archive_command = {}\n\
             recovery_target_timeline = 'latest'\n",
            conf_quote(&push)
        ),
    )?;
    old.append_conf("postgresql.auto.conf", &restore_command)?;
    old.start().await?;
    data::write_batch(&ndb, 5).await?;
    replication::wait_caught_up(&new, &old).await?;
    let sdb = old.client().await?;
    ensure!(
        data::batch_counts(&sdb).await? == rows(&[1, 2, 3, 4, 5]),
        "the rewound old primary does not follow the new primary"
    );
    // Segments the rewound server completes are archived by it as well as by the new primary.
    let seg = new.switch_wal_and_wait(&repo).await?;
    let mut archived = (0, None, 0, None);
    for _ in 0..300 {
        archived = sidecar::archiver_stats(&sdb).await?;
        if archived.1.as_deref() >= Some(seg.as_str()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("the rewound old primary's archiver: {archived:?}");
    ensure!(
        archived.0 > 0,
        "the rewound old primary archived nothing: {archived:?}\n{}",
        old.log_tail()
    );
    let after = wal_objects(&repo)?;
    for (k, v) in &before {
        ensure!(
            after.get(k) == Some(v),
            "{k} was changed or removed while the rewound old primary archived"
        );
    }
    eprintln!(
        "objects added while the rewound old primary archived: {:?}",
        after
            .keys()
            .filter(|k| !before.contains_key(*k))
            .collect::<Vec<_>>()
    );
    drop(sdb);
    old.stop().await?;

    // Retention: B_old (the newest, on the abandoned branch) never stands alone.
    data::write_batch(&ndb, 6).await?;
    new.switch_wal_and_wait(&repo).await?;
    let plan = expire_agreeing(&repo, &["--retain-last", "1"], &[]).await?;
    let kept = kept_ids(&plan);
    ensure!(
        kept.contains(&b1),
        "--retain-last 1 did not keep {b1}, the only backup timeline 2 can use (newest: {b_old}): {plan:#}"
    );
    ensure!(
        plan["recoverable_from"].as_str() == stop_time_of(&plan, &b1).as_deref(),
        "expire promises from {} rather than from {b1}'s stop: {plan:#}",
        plan["recoverable_from"]
    );
    check_ok(&repo, "after expire --retain-last 1").await?;
    let want = data::batch_counts(&ndb).await?;
    ensure!(
        want == rows(&[1, 2, 3, 4, 5, 6]),
        "new primary rows: {want:?}"
    );
    let got = repo
        .restore_counts(&dir, "r-latest", &["--target", "latest"])
        .await?;
    ensure!(
        got == want,
        "restore latest gave {got:?}, want the new primary's {want:?}"
    );
    let got = repo
        .restore_counts(&dir, "r-t3", &["--target-time", &t3])
        .await?;
    ensure!(got == rows(&[1, 2, 3]), "restore to {t3} gave {got:?}");
    Ok(())
}
