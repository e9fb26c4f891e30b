//! Issue 15 part 1, the rest of the backup-side faults: what a running server does to a backup
//! while its files are copied. Each backup is held mid-copy with `TIDEMARK_TEST_PAUSE_AT`
//! (`backup-mid-copy`: a `--pgdata` backup once half its files are taken, a replication backup
//! once half the server's size estimate is streamed), the fault is injected, and the backup is
//! let go on:
//! - DROP TABLE, TRUNCATE and VACUUM FULL (both sources): the backup succeeds; restores to its
//!   consistency point and to a later time hold exactly what the server held, `pg_amcheck` clean.
//! - pgbench across the whole backup (both sources): torn pages are repaired by replay; a
//!   restore to a time after the backup matches the server's balances and history, `pg_amcheck`
//!   clean.
//! - archiving blocked (archive_command failing while a flag file exists) before the stop: no
//!   manifest until the stop segment is stored; with a short `--archive-timeout` the backup fails
//!   naming the segment and leaves no manifest.
//! - a standby promoted during a standby backup: not finalized, PostgreSQL's error reported; a
//!   rerun on the new primary restores row for row.
//! - the `--pgdata` backup's session terminated: no manifest, an error naming the lost session,
//!   the rerun succeeds.

use anyhow::{bail, ensure, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tidemark_e2e::cluster::shell_word;
use tidemark_e2e::env::{self, Run, TestDir, Tool};
use tidemark_e2e::sidecar::segment_before;
use tidemark_e2e::{data, replication, start_restored, PgCluster, Repo};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

#[derive(Clone, Copy, Debug)]
enum Source {
    Pgdata,
    Replication,
}

/// `tidemark-agent backup --json` of `src` into `repo` from `source` in a background task, with
/// `--archive-timeout archive_timeout` and extra environment `extra`.
fn spawn_backup(
    src: &PgCluster,
    repo: &Repo,
    source: Source,
    archive_timeout: u32,
    extra: &[(&str, &str)],
) -> JoinHandle<Result<Run>> {
    let mut args: Vec<String> = vec!["backup".into()];
    let mut envs: Vec<(String, String)> = Vec::new();
    match source {
        Source::Pgdata => {
            args.extend([
                "--pgdata".into(),
                src.data.to_string_lossy().into_owned(),
                "--pg-url".into(),
                src.conninfo(),
            ]);
        }
        Source::Replication => {
            args.extend(["--source".into(), "replication".into()]);
            envs.extend([
                ("PGHOST".into(), "127.0.0.1".into()),
                ("PGPORT".into(), src.port().to_string()),
                ("PGUSER".into(), "postgres".into()),
                ("PGDATABASE".into(), "postgres".into()),
            ]);
        }
    }
    args.extend([
        "--repo".into(),
        repo.url.clone(),
        "--archive-timeout".into(),
        archive_timeout.to_string(),
        "--json".into(),
    ]);
    envs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        env::tidemark(Tool::Agent, &args, &envs).await
    })
}

/// A backup held at `backup-mid-copy` while a flag file exists.
struct Pause {
    flag: PathBuf,
}

impl Pause {
    fn new(dir: &TestDir, name: &str) -> Result<Pause> {
        Ok(Pause {
            flag: dir.write(name, b"")?,
        })
    }

    /// The value of `TIDEMARK_TEST_PAUSE_AT`.
    fn env(&self) -> String {
        format!("backup-mid-copy:{}", self.flag.display())
    }

    /// Waits until the backup `task` is held mid-copy; fails if it ended first.
    async fn reached(&self, task: &mut JoinHandle<Result<Run>>) -> Result<()> {
        let marker = PathBuf::from(format!("{}.paused", self.flag.display()));
        let started = Instant::now();
        while !marker.exists() {
            if task.is_finished() {
                let r = task.await??;
                bail!("the backup ended before it reached the pause mid-copy:\n{r}");
            }
            ensure!(
                started.elapsed() < Duration::from_secs(120),
                "the backup did not reach the pause mid-copy within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Lets the backup go on.
    fn release(&self) -> Result<()> {
        std::fs::remove_file(&self.flag)
            .with_context(|| format!("cannot remove {}", self.flag.display()))
    }
}

/// The first column of `sql`'s one row, as text.
async fn digest(db: &Client, sql: &str) -> Result<String> {
    let r = db
        .query_one(sql, &[])
        .await
        .with_context(|| format!("{sql} failed"))?;
    Ok(r.get(0))
}

/// `pg_amcheck --all --heapallindexed` against `c` (amcheck installed where missing): every
/// table and B-tree index of every database checked, and every heap tuple found in its indexes.
async fn amcheck(c: &PgCluster) -> Result<()> {
    let mut cmd = env::db_command(env::pg_bin("pg_amcheck")?)?;
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &c.port().to_string(),
        "-U",
        "postgres",
        "--all",
        "--install-missing",
        "--heapallindexed",
    ]);
    let r = env::run(cmd).await?;
    ensure!(
        r.success() && r.stdout.trim().is_empty(),
        "pg_amcheck found problems on {}:\n{r}",
        c.name
    );
    Ok(())
}

/// Restores `repo` into `<scratch>/<name>` with `target`, starts it, and checks that `sql`
/// reads `want` there and that pg_amcheck is clean.
async fn restore_exact(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    target: &[&str],
    sql: &str,
    want: &str,
) -> Result<()> {
    let pgdata = dir.join(name);
    repo.restore(&pgdata, target).await?.ok()?;
    let server = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    let got = digest(&server.client().await?, sql).await?;
    ensure!(
        got == want,
        "restored {name} ({target:?}) holds\n  {got}\nthe source held\n  {want}"
    );
    amcheck(&server).await?;
    eprintln!("restore {name} ({target:?}): {got}; pg_amcheck clean");
    Ok(())
}

fn backup_id(r: &Run) -> Result<String> {
    Ok(r.json()?["backup_id"]
        .as_str()
        .with_context(|| format!("no backup_id:\n{r}"))?
        .to_string())
}

// ---------------------------------------------------------------------------------------------
// 1. DROP TABLE, TRUNCATE and VACUUM FULL while the files are copied

const DDL_SETUP: &str = "
CREATE TABLE dropped (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO dropped SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
CREATE TABLE truncated (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO truncated SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
CREATE TABLE vacuumed (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO vacuumed SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 40000) g;
CREATE INDEX vacuumed_v ON vacuumed (v);
DELETE FROM vacuumed WHERE id % 3 = 0;
CHECKPOINT;
";

const DDL_DIGEST: &str = "SELECT concat_ws(' | ',
    (SELECT count(*) || ' batch rows' FROM batches),
    coalesce(to_regclass('dropped')::text, 'dropped is gone'),
    (SELECT 'truncated: ' || count(*) || ' rows, ids ' || coalesce(sum(id), 0) || ', md5 ' || md5(coalesce(string_agg(v, ',' ORDER BY id), '')) FROM truncated),
    (SELECT 'vacuumed: ' || count(*) || ' rows, ids ' || sum(id) || ', md5 ' || md5(string_agg(v, ',' ORDER BY id)) FROM vacuumed))";

async fn ddl_during_the_copy(name: &str, source: Source) -> Result<()> {
    let (dir, repo, src, db) = tidemark_e2e::archiving_source(name).await?;
    data::write_batch(&db, 1).await?;
    db.batch_execute(DDL_SETUP).await?;
    let files_before = relation_files(&db).await?;

    let pause = Pause::new(&dir, "pause")?;
    let mut task = spawn_backup(
        &src,
        &repo,
        source,
        120,
        &[("TIDEMARK_TEST_PAUSE_AT", &pause.env())],
    );
    pause.reached(&mut task).await?;
    db.batch_execute(
        "DROP TABLE dropped; TRUNCATE truncated;
         INSERT INTO truncated SELECT g, md5((-g)::text) FROM generate_series(1, 5000) g",
    )
    .await?;
    db.batch_execute("VACUUM FULL vacuumed").await?;
    db.batch_execute("UPDATE vacuumed SET v = upper(v) WHERE id % 7 = 0")
        .await?;
    data::write_batch(&db, 2).await?;
    // The dropped and rewritten relations' old files are unlinked at this checkpoint: files the
    // backup listed (or the server is about to send) vanish under it.
    db.batch_execute("CHECKPOINT").await?;
    let files_after = relation_files(&db).await?;
    ensure!(
        files_before.iter().all(|f| !files_after.contains(f)),
        "DROP / TRUNCATE / VACUUM FULL left a relation file in place: {files_before:?} vs {files_after:?}"
    );
    let gone: Vec<&String> = files_before
        .iter()
        .filter(|f| !src.data.join(f).exists())
        .collect();
    ensure!(
        !gone.is_empty(),
        "no old relation file was unlinked during the backup: {files_before:?}"
    );
    pause.release()?;
    let run = task.await??;
    ensure!(
        run.success(),
        "the backup failed after DROP / TRUNCATE / VACUUM FULL:\n{run}\n{}",
        src.log_tail()
    );
    let id = backup_id(&run)?;
    let at_backup = digest(&db, DDL_DIGEST).await?;
    eprintln!(
        "{name}: backup {id} ok, {} old files vanished mid-copy",
        gone.len()
    );

    data::write_batch(&db, 3).await?;
    db.batch_execute(
        "INSERT INTO truncated SELECT g, 'later' FROM generate_series(5001, 6000) g;
         DELETE FROM vacuumed WHERE id % 5 = 0",
    )
    .await?;
    let t = data::target_time_between(&db).await?;
    let at_t = digest(&db, DDL_DIGEST).await?;
    data::write_batch(&db, 4).await?;
    src.switch_wal_and_wait(&repo).await?;

    restore_exact(
        &dir,
        &repo,
        "at-backup",
        &["--target", "immediate", "--backup", &id],
        DDL_DIGEST,
        &at_backup,
    )
    .await?;
    restore_exact(
        &dir,
        &repo,
        "later",
        &["--target-time", &t],
        DDL_DIGEST,
        &at_t,
    )
    .await?;
    Ok(())
}

/// The data directory paths of the three tables' main forks and their indexes.
async fn relation_files(db: &Client) -> Result<Vec<String>> {
    let rows = db
        .query(
            "SELECT pg_relation_filepath(c.oid) FROM pg_class c
             WHERE c.relname IN ('dropped', 'dropped_pkey', 'truncated', 'truncated_pkey', 'vacuumed', 'vacuumed_pkey', 'vacuumed_v')
             ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_truncate_vacuum_full_during_a_pgdata_backup() -> Result<()> {
    ddl_during_the_copy("concurrency-ddl-pgdata", Source::Pgdata).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_truncate_vacuum_full_during_a_replication_backup() -> Result<()> {
    ddl_during_the_copy("concurrency-ddl-replication", Source::Replication).await
}

// ---------------------------------------------------------------------------------------------
// 2. pgbench across the whole backup

const BENCH_DIGEST: &str = "SELECT concat_ws(' | ',
    (SELECT 'abalance ' || sum(abalance) FROM pgbench_accounts),
    (SELECT 'bbalance ' || sum(bbalance) FROM pgbench_branches),
    (SELECT 'tbalance ' || sum(tbalance) FROM pgbench_tellers),
    (SELECT count(*) || ' history rows, delta ' || coalesce(sum(delta), 0) FROM pgbench_history))";

/// `pgbench <args>` against `c` as the database user, checked.
async fn pgbench(c: &PgCluster, args: &[&str]) -> Result<Run> {
    let mut cmd = env::db_command(env::pg_bin("pgbench")?)?;
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &c.port().to_string(),
        "-U",
        "postgres",
    ])
    .args(args)
    .arg("postgres");
    env::run(cmd).await?.ok()
}

/// Runs `pgbench -c 4 -T 2` rounds back to back on `c` until `stop` is set; returns how many
/// rounds ran.
fn spawn_pgbench(
    c: &PgCluster,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> JoinHandle<Result<u32>> {
    let port = c.port().to_string();
    tokio::spawn(async move {
        let mut rounds = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut cmd = env::db_command(env::pg_bin("pgbench")?)?;
            cmd.args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-n",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                "2",
                "postgres",
            ]);
            let r = env::run(cmd).await?;
            ensure!(r.success(), "pgbench failed during the backup:\n{r}");
            rounds += 1;
        }
        Ok(rounds)
    })
}

async fn history_rows(db: &Client) -> Result<i64> {
    Ok(db
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await?
        .get(0))
}

async fn pgbench_across_the_backup(name: &str, source: Source) -> Result<()> {
    let (dir, repo, src, db) = tidemark_e2e::archiving_source(name).await?;
    pgbench(&src, &["-i", "-q", "-s", "2"]).await?;
    db.batch_execute("CHECKPOINT").await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bench = spawn_pgbench(&src, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = history_rows(&db).await?;
    let pause = Pause::new(&dir, "pause")?;
    let mut task = spawn_backup(
        &src,
        &repo,
        source,
        120,
        &[("TIDEMARK_TEST_PAUSE_AT", &pause.env())],
    );
    pause.reached(&mut task).await?;
    // Half the files are copied; pgbench rewrites pages of the other half meanwhile, and of the
    // first half after they were read.
    let at_pause = history_rows(&db).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_release = history_rows(&db).await?;
    ensure!(
        at_release > at_pause + 100,
        "pgbench committed only {} transactions while the backup was held mid-copy",
        at_release - at_pause
    );
    pause.release()?;
    let run = task.await??;
    let bench_alive = !bench.is_finished();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = bench.await??;
    ensure!(
        run.success(),
        "the backup under pgbench failed:\n{run}\n{}",
        src.log_tail()
    );
    ensure!(bench_alive, "pgbench stopped before the backup finished");
    let id = backup_id(&run)?;
    let during = history_rows(&db).await?;
    ensure!(
        during > before + 100,
        "pgbench wrote only {} transactions across the backup",
        during - before
    );
    eprintln!(
        "{name}: backup {id} ok under pgbench ({} rounds, {} transactions)",
        rounds,
        during - before
    );
    let t = data::target_time_between(&db).await?;
    let at_t = digest(&db, BENCH_DIGEST).await?;
    pgbench(&src, &["-n", "-c", "2", "-t", "50"]).await?;
    src.switch_wal_and_wait(&repo).await?;
    restore_exact(
        &dir,
        &repo,
        "later",
        &["--target-time", &t],
        BENCH_DIGEST,
        &at_t,
    )
    .await?;
    // Replayed only to its consistency point, the backup's torn pages are whole too.
    let pgdata = dir.join("at-backup");
    repo.restore(&pgdata, &["--target", "immediate", "--backup", &id])
        .await?
        .ok()?;
    let server = start_restored(&dir, "at-backup-server", &pgdata).await?;
    amcheck(&server).await?;
    let n: i64 = server
        .client()
        .await?
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await?
        .get(0);
    ensure!(
        n > before && n <= during,
        "restored to its consistency point, backup {id} holds {n} pgbench transactions, not between {before} and {during}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_during_a_pgdata_backup() -> Result<()> {
    pgbench_across_the_backup("concurrency-pgbench-pgdata", Source::Pgdata).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_during_a_replication_backup() -> Result<()> {
    pgbench_across_the_backup("concurrency-pgbench-replication", Source::Replication).await
}

// ---------------------------------------------------------------------------------------------
// 3. Archiving blocked at the stop

const BATCH_DIGEST: &str =
    "SELECT coalesce(string_agg(batch || ':' || n, ', ' ORDER BY batch), 'none')
    FROM (SELECT batch, count(*) n FROM batches GROUP BY batch) s";

/// Waits until the archiver has failed at least `more_than` times; returns the segment it
/// failed on last.
async fn wait_archive_failure(src: &PgCluster, more_than: i64) -> Result<String> {
    let db = src.client().await?;
    let started = Instant::now();
    loop {
        let r = db
            .query_one(
                "SELECT failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver",
                &[],
            )
            .await?;
        if r.get::<_, i64>(0) > more_than {
            return Ok(r.get(1));
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "archive_command did not fail within 60 s\n{}",
            src.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn failed_count(src: &PgCluster) -> Result<i64> {
    Ok(src
        .client()
        .await?
        .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
        .await?
        .get(0))
}

/// Wakes the archiver (it retries a failed segment only every minute by itself) with a new
/// segment to archive, and waits until that segment, and so every one before it, is stored.
async fn nudge_archiver(src: &PgCluster, repo: &Repo, batch: i32) -> Result<()> {
    let db = src.client().await?;
    data::write_batch(&db, batch).await?;
    src.switch_wal_and_wait(repo).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_blocked_at_stop_holds_the_manifest_back() -> Result<()> {
    let name = "concurrency-archive-blocked";
    let dir = TestDir::new(name)?;
    let repo = Repo::create(&dir, "repo")?;
    // archive_command fails (exit 1) while the flag file exists.
    let blocked = dir.join("archive-blocked");
    let mut src = PgCluster::initdb(&dir, "src").await?;
    let agent = env::bins()?.agent;
    src.start_with_archive_command(&format!(
        "test ! -e {} && {} wal-push --repo {} %p",
        shell_word(&blocked.to_string_lossy()),
        shell_word(&agent.to_string_lossy()),
        shell_word(&repo.url)
    ))
    .await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;

    // Blocked while the backup copies: its stop segment cannot be archived.
    let pause = Pause::new(&dir, "pause")?;
    let mut task = spawn_backup(
        &src,
        &repo,
        Source::Pgdata,
        120,
        &[("TIDEMARK_TEST_PAUSE_AT", &pause.env())],
    );
    pause.reached(&mut task).await?;
    std::fs::write(&blocked, b"")?;
    data::write_batch(&db, 2).await?;
    let failures = failed_count(&src).await?;
    pause.release()?;
    let stuck = wait_archive_failure(&src, failures).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        !task.is_finished(),
        "the backup ended while {stuck} could not be archived:\n{}",
        task.await??
    );
    ensure!(
        replication::manifests(&repo)?.is_empty(),
        "a backup was listed while {stuck} could not be archived"
    );
    ensure!(
        !repo.wal_object(&stuck)?.exists(),
        "{stuck} is in the repository although archive_command failed"
    );
    std::fs::remove_file(&blocked)?;
    nudge_archiver(&src, &repo, 3).await?;
    let run = task.await??;
    ensure!(
        run.success(),
        "the backup failed once archiving went on:\n{run}\n{}",
        src.log_tail()
    );
    let v = run.json()?;
    let start = segment_before(1, v["start_lsn"].as_str().context("start_lsn")?)?;
    let stop = segment_before(1, v["stop_lsn"].as_str().context("stop_lsn")?)?;
    ensure!(
        start <= stuck && stuck <= stop,
        "the blocked segment {stuck} is not one the backup needs ({start}..={stop})"
    );
    ensure!(
        repo.wal_object(&stop)?.is_file(),
        "backup listed without its stop segment {stop}"
    );
    eprintln!("{name}: held back while {stuck} was blocked, completed once it was stored");

    // Blocked past --archive-timeout: the backup fails naming the segment, and is not listed.
    let listed = replication::manifests(&repo)?;
    std::fs::write(&blocked, b"")?;
    let failures = failed_count(&src).await?;
    let run = spawn_backup(&src, &repo, Source::Replication, 5, &[]).await??;
    let stuck = wait_archive_failure(&src, failures).await?;
    ensure!(
        !run.success()
            && run.stderr.contains(&format!(
                "wal segment {stuck} needed by this backup was not archived within 5s"
            ))
            && run.stderr.contains("hint:"),
        "a backup whose segment {stuck} could not be archived did not fail naming it:\n{run}"
    );
    ensure!(
        replication::manifests(&repo)? == listed,
        "a backup that timed out waiting for {stuck} was listed"
    );
    std::fs::remove_file(&blocked)?;
    nudge_archiver(&src, &repo, 4).await?;
    let want = digest(&db, BATCH_DIGEST).await?;
    src.switch_wal_and_wait(&repo).await?;
    restore_exact(
        &dir,
        &repo,
        "latest",
        &["--target", "latest"],
        BATCH_DIGEST,
        &want,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 4. A standby promoted during a standby backup

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_promoted_during_its_backup_is_not_finalized() -> Result<()> {
    let (dir, repo, src, db) =
        tidemark_e2e::archiving_source("concurrency-promoted-standby").await?;
    data::write_batch(&db, 1).await?;
    let standby = replication::start_standby(&dir, "standby", &src).await?;
    // Once promoted, the standby archives its timeline into the same repository.
    let agent = env::bins()?.agent;
    standby.append_conf(
        "postgresql.conf",
        &format!(
            "\narchive_command = {}\n",
            tidemark_e2e::cluster::conf_quote(&format!(
                "{} wal-push --repo {} %p",
                shell_word(&agent.to_string_lossy()),
                shell_word(&repo.url)
            ))
        ),
    )?;
    replication::exec(&standby, "SELECT pg_reload_conf()").await?;
    data::write_batch(&db, 2).await?;
    replication::wait_caught_up(&src, &standby).await?;
    // A standby is backed up over replication only: --pgdata refuses it.
    let r = standby.backup_run(&repo, &[]).await?;
    ensure!(
        !r.success() && r.stderr.contains("the server is a standby"),
        "backup --pgdata of a standby was not refused:\n{r}"
    );

    let pause = Pause::new(&dir, "pause")?;
    let mut task = spawn_backup(
        &standby,
        &repo,
        Source::Replication,
        120,
        &[("TIDEMARK_TEST_PAUSE_AT", &pause.env())],
    );
    pause.reached(&mut task).await?;
    let sdb = standby.client().await?;
    let promoted: bool = sdb
        .query_one("SELECT pg_promote(true, 60)", &[])
        .await
        .context("pg_promote failed")?
        .get(0);
    ensure!(promoted, "the standby was not promoted within 60 s");
    data::write_batch(&sdb, 3).await?;
    pause.release()?;
    let run = task.await??;
    ensure!(
        !run.success() && run.stderr.contains("promoted"),
        "a standby backup across a promotion did not fail saying so:\n{run}\n{}",
        standby.log_tail()
    );
    ensure!(
        replication::manifests(&repo)?.is_empty(),
        "a standby backup across a promotion was listed"
    );
    eprintln!("standby backup across a promotion refused:\n{}", run.stderr);

    // The promoted server is a primary now: backed up again, it restores row for row.
    let run = replication::backup(&standby, &repo, &[]).await?;
    ensure!(
        run.success(),
        "the backup of the promoted standby failed:\n{run}\n{}",
        standby.log_tail()
    );
    ensure!(
        replication::manifests(&repo)?.len() == 1,
        "one backup expected after the rerun"
    );
    data::write_batch(&sdb, 4).await?;
    let want = digest(&sdb, BATCH_DIGEST).await?;
    standby.switch_wal_and_wait(&repo).await?;
    restore_exact(
        &dir,
        &repo,
        "latest",
        &["--target", "latest"],
        BATCH_DIGEST,
        &want,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 5. The --pgdata backup's session terminated mid-copy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_session_leaves_no_backup_and_the_rerun_succeeds() -> Result<()> {
    let (dir, repo, src, db) =
        tidemark_e2e::archiving_source("concurrency-terminated-session").await?;
    data::write_batch(&db, 1).await?;
    let pause = Pause::new(&dir, "pause")?;
    let mut task = spawn_backup(
        &src,
        &repo,
        Source::Pgdata,
        120,
        &[("TIDEMARK_TEST_PAUSE_AT", &pause.env())],
    );
    pause.reached(&mut task).await?;
    let n: i64 = db
        .query_one(
            "WITH b AS MATERIALIZED (
                 SELECT pid FROM pg_stat_activity
                 WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
                   AND query LIKE '%pg_backup_start%')
             SELECT count(*) FROM b WHERE pg_terminate_backend(pid)",
            &[],
        )
        .await?
        .get(0);
    ensure!(n == 1, "{n} backup sessions terminated, expected 1");
    data::write_batch(&db, 2).await?;
    pause.release()?;
    let run = task.await??;
    ensure!(
        !run.success()
            && run
                .stderr
                .contains("session that started the backup (pg_backup_start) was closed")
            && run
                .stderr
                .contains("terminating connection due to administrator command")
            && run.stderr.contains("hint:"),
        "a backup whose session was terminated did not fail naming it:\n{run}"
    );
    ensure!(
        replication::manifests(&repo)?.is_empty(),
        "a backup whose session was terminated was listed"
    );
    eprintln!("terminated session:\n{}", run.stderr);
    // The server ended the backup with the session: the rerun succeeds.
    let run = src.backup_run(&repo, &[]).await?;
    ensure!(
        run.success(),
        "the backup after a terminated one failed:\n{run}\n{}",
        src.log_tail()
    );
    data::write_batch(&db, 3).await?;
    let want = digest(&db, BATCH_DIGEST).await?;
    src.switch_wal_and_wait(&repo).await?;
    restore_exact(
        &dir,
        &repo,
        "latest",
        &["--target", "latest"],
        BATCH_DIGEST,
        &want,
    )
    .await
}
