//! Recovery-target edges (issue 15.4), end to end against PostgreSQL 15:
//!
//! - time targets exactly at, 1 µs before and 1 µs after a commit's own timestamp (read with
//!   `track_commit_timestamp = on`), inclusive and `--target-exclusive`;
//! - backup selection at a backup's stop time exactly (that backup) and 1 µs before it (the
//!   previous one);
//! - the tidemark binaries running with a clock 10 minutes off PostgreSQL's (libfaketime through
//!   `LD_PRELOAD`): a backup records the database's start and stop times, and a restore to a time
//!   between two batches (read from the database clock) picks the right backup and rows.
//!
//! Workload of the first test (one transaction per batch, [`BATCH_ROWS`] rows each):
//!
//! ```text
//! table, batch 1, backup A, batch 2, batch 3 (commit time C3), batch 4, backup B, batch 5, batch 6
//! ```

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, Duration as ChronoDuration, FixedOffset};
use std::collections::BTreeMap;
use tidemark_e2e::cluster::shell_word;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::env::{self, Tool};
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};
use tokio_postgres::Client;

/// Debian's libfaketime (package `faketime`, installed by scripts/install-deps.sh).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// The agent's clock offset from the database's in the skew test.
const SKEW: ChronoDuration = ChronoDuration::minutes(10);

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

/// The server clock in microseconds since the epoch.
async fn server_now_us(db: &Client) -> Result<i64> {
    let row = db
        .query_one(
            "SELECT (extract(epoch from clock_timestamp()) * 1000000)::int8",
            &[],
        )
        .await
        .context("cannot read the server clock")?;
    Ok(row.get(0))
}

fn micros(rfc3339: &str) -> Result<i64> {
    Ok(DateTime::parse_from_rfc3339(rfc3339)
        .with_context(|| format!("{rfc3339:?} is not RFC 3339"))?
        .timestamp_micros())
}

/// A time in PostgreSQL's timestamptz text form with all six fractional digits.
fn pg_text(t: &DateTime<FixedOffset>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string()
}

/// A source cluster archiving into `repo`, with `extra` appended to its postgresql.auto.conf
/// before its first start.
async fn source(dir: &TestDir, repo: &Repo, extra: &str) -> Result<PgCluster> {
    let mut c = PgCluster::initdb(dir, "src").await?;
    c.append_conf("postgresql.auto.conf", extra)?;
    let agent = env::bins()?.agent;
    let archive_command = format!(
        "{} wal-push --repo {} %p",
        shell_word(&agent.to_string_lossy()),
        shell_word(&repo.url)
    );
    c.start_with_archive_command(&archive_command).await?;
    Ok(c)
}

/// The environment that runs a tidemark binary with its clock `offset` off (e.g. `+10m`).
fn skewed(offset: &str) -> [(&'static str, &str); 2] {
    [("LD_PRELOAD", FAKETIME_LIB), ("FAKETIME", offset)]
}

/// The backup `id` as `info --json` lists it.
async fn info_backup(repo: &Repo, id: &str) -> Result<serde_json::Value> {
    let info = repo.info().await?;
    info["backups"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["id"] == id))
        .cloned()
        .with_context(|| format!("info does not list backup {id}: {info}"))
}

/// One restore to check: its arguments, the backup it must choose, the rows it must hold and
/// the transaction recovery must stop just before.
struct Case<'a> {
    name: &'a str,
    args: Vec<&'a str>,
    envs: Vec<(&'a str, &'a str)>,
    backup: &'a str,
    want: BTreeMap<i32, i64>,
    stops_before_xid: &'a str,
}

/// Restores `case`, checks the chosen backup, starts the server until it promotes and checks
/// its rows batch by batch and where recovery stopped.
async fn restore_and_check(dir: &TestDir, repo: &Repo, case: Case<'_>) -> Result<()> {
    let pgdata = dir.join(case.name);
    let pgdata_s = pgdata.to_string_lossy().into_owned();
    let mut args = vec!["restore", "--pgdata", &pgdata_s, "--repo", &repo.url];
    args.extend_from_slice(&case.args);
    args.push("--json");
    let r = env::tidemark(Tool::Restore, &args, &case.envs)
        .await?
        .ok()?;
    let report = r.json()?;
    ensure!(
        report["backup_id"] == case.backup,
        "{}: restore {:?} chose backup {} instead of {}:\n{r}",
        case.name,
        case.args,
        report["backup_id"],
        case.backup
    );
    let server = start_restored(dir, &format!("{}-server", case.name), &pgdata).await?;
    let db = server.client().await?;
    let counts = data::batch_counts(&db).await?;
    ensure!(
        counts == case.want,
        "{}: restored with {:?}: rows per batch {counts:?}, want {:?}\n{}",
        case.name,
        case.args,
        case.want,
        server.log_tail()
    );
    let stop = format!(
        "recovery stopping before commit of transaction {},",
        case.stops_before_xid
    );
    let lines = server.log_lines(&stop);
    ensure!(
        !lines.is_empty(),
        "{}: the server log does not say {stop:?}\n{}",
        case.name,
        server.log_tail()
    );
    eprintln!(
        "target-edges: {} {:?} {:?}: backup {}, batches {:?}; {}",
        case.name,
        case.args,
        case.envs.iter().find(|(k, _)| *k == "FAKETIME"),
        case.backup,
        counts.keys().collect::<Vec<_>>(),
        lines[0].trim()
    );
    Ok(())
}

async fn xid_of(db: &Client, batch: i32) -> Result<String> {
    text(
        db,
        &format!("SELECT xmin::text FROM batches WHERE batch = {batch} LIMIT 1"),
    )
    .await
}

async fn commit_time(db: &Client, batch: i32) -> Result<String> {
    text(
        db,
        &format!("SELECT pg_xact_commit_timestamp(xmin)::text FROM batches WHERE batch = {batch} LIMIT 1"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_targets_at_and_one_microsecond_around_a_commit_and_a_backup_stop() -> Result<()> {
    let dir = TestDir::new("target-edges")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = source(&dir, &repo, "\ntrack_commit_timestamp = on\n").await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let a = src.backup(&repo).await?;
    let a = a["backup_id"].as_str().context("backup_id")?.to_string();
    for b in 2..=4 {
        data::write_batch(&db, b).await?;
    }
    let b_id = src.backup(&repo).await?;
    let b_id = b_id["backup_id"].as_str().context("backup_id")?.to_string();
    data::write_batch(&db, 5).await?;
    data::write_batch(&db, 6).await?;
    ensure!(
        data::batch_counts(&db).await? == batches(1..=6),
        "the source does not hold batches 1..=6"
    );
    let c3_text = commit_time(&db, 3).await?;
    let c3 = parse_pg_time(&c3_text)?;
    let (c2, c4) = (
        parse_pg_time(&commit_time(&db, 2).await?)?,
        parse_pg_time(&commit_time(&db, 4).await?)?,
    );
    let us = ChronoDuration::microseconds(1);
    ensure!(
        c2 < c3 - us && c3 + us < c4,
        "batches 2, 3 and 4 committed within a microsecond of each other ({c2}, {c3}, {c4}); the edges would not be edges"
    );
    let (x3, x4, x5) = (
        xid_of(&db, 3).await?,
        xid_of(&db, 4).await?,
        xid_of(&db, 5).await?,
    );
    src.switch_wal_and_wait(&repo).await?;
    let info_a = info_backup(&repo, &a).await?;
    let info_b = info_backup(&repo, &b_id).await?;
    let a_stop = info_a["stop_time"].as_str().context("stop_time")?;
    let b_stop = info_b["stop_time"].as_str().context("stop_time")?;
    ensure!(
        micros(a_stop)? < c2.timestamp_micros() && c4.timestamp_micros() < micros(b_stop)?,
        "backup A ({a_stop}) must stop before batch 2 ({c2}) and B ({b_stop}) after batch 4 ({c4})"
    );
    eprintln!("target-edges: backup A {a} stopped {a_stop}, B {b_id} stopped {b_stop}; batch 3 (xid {x3}) committed at {c3_text}");
    drop(db);
    drop(src);

    // 1. At, 1 µs after and 1 µs before batch 3's commit timestamp, in PostgreSQL's text form.
    let at = pg_text(&c3);
    let after = pg_text(&(c3 + us));
    let before = pg_text(&(c3 - us));
    let cases = [
        (
            "at-commit",
            vec!["--target-time", c3_text.as_str()],
            1..=3,
            &x4,
        ),
        (
            "at-commit-six-digits",
            vec!["--target-time", at.as_str()],
            1..=3,
            &x4,
        ),
        (
            "commit-plus-1us",
            vec!["--target-time", after.as_str()],
            1..=3,
            &x4,
        ),
        (
            "commit-minus-1us",
            vec!["--target-time", before.as_str()],
            1..=2,
            &x3,
        ),
        (
            "at-commit-exclusive",
            vec!["--target-time", at.as_str(), "--target-exclusive"],
            1..=2,
            &x3,
        ),
    ];
    for (name, args, want, stops_before_xid) in cases {
        restore_and_check(
            &dir,
            &repo,
            Case {
                name,
                args,
                envs: vec![],
                backup: &a,
                want: batches(want),
                stops_before_xid,
            },
        )
        .await?;
    }

    // Half a microsecond after the commit, exclusive: the commit lies before the target, but
    // PostgreSQL only takes whole microseconds and neither rounding keeps the meaning (.5 µs
    // cut to the commit's own microsecond would leave the commit out). Refused, nothing written.
    let half = (c3 + ChronoDuration::nanoseconds(500))
        .to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let pgdata = dir.join("half-microsecond");
    let r = repo
        .restore(&pgdata, &["--target-time", &half, "--target-exclusive"])
        .await?;
    ensure!(
        !r.success() && r.stderr.contains("between two microseconds"),
        "a target time between two microseconds ({half}) must be refused:\n{r}"
    );
    let leftovers = std::fs::read_dir(&pgdata).map(|d| d.count()).unwrap_or(0);
    ensure!(
        leftovers == 0,
        "the refused restore wrote {leftovers} entries into {}",
        pgdata.display()
    );
    eprintln!(
        "target-edges: --target-time {half} --target-exclusive refused: {}",
        r.stderr
            .lines()
            .find(|l| l.contains("microseconds"))
            .unwrap_or("")
    );

    // 2. Exactly B's stop time (as info prints it) chooses B; 1 µs before it chooses A. Both
    // replay to just before batch 5.
    let b_stop_minus = pg_text(&(DateTime::parse_from_rfc3339(b_stop)? - us));
    restore_and_check(
        &dir,
        &repo,
        Case {
            name: "at-backup-stop",
            args: vec!["--target-time", b_stop],
            envs: vec![],
            backup: &b_id,
            want: batches(1..=4),
            stops_before_xid: &x5,
        },
    )
    .await?;
    restore_and_check(
        &dir,
        &repo,
        Case {
            name: "backup-stop-minus-1us",
            args: vec!["--target-time", &b_stop_minus],
            envs: vec![],
            backup: &a,
            want: batches(1..=4),
            stops_before_xid: &x5,
        },
    )
    .await?;
    // The plan (--dry-run) chooses the same way, and B forced 1 µs before its stop is refused.
    for (target, want) in [(b_stop, &b_id), (b_stop_minus.as_str(), &a)] {
        let pgdata = dir.join("plan");
        let r = repo
            .restore(&pgdata, &["--target-time", target, "--dry-run"])
            .await?
            .ok()?;
        let plan = r.json()?;
        ensure!(
            plan["backup"]["id"] == want.as_str(),
            "the plan for {target} chose {} instead of {want}:\n{r}",
            plan["backup"]["id"]
        );
    }
    let pgdata = dir.join("forced-b");
    let r = repo
        .restore(
            &pgdata,
            &["--target-time", &b_stop_minus, "--backup", &b_id],
        )
        .await?;
    ensure!(
        !r.success() && r.stderr.contains("after the target time"),
        "backup {b_id} forced for a target 1 µs before its stop ({b_stop_minus}) must be refused:\n{r}"
    );
    eprintln!(
        "target-edges: plans at {b_stop} and {b_stop_minus} chose {b_id} and {a}; --backup {b_id} at {b_stop_minus} refused"
    );
    Ok(())
}

/// Parses PostgreSQL's timestamptz text (`2026-12-04 18:40:12.123456+00`).
fn parse_pg_time(s: &str) -> Result<DateTime<FixedOffset>> {
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%:z"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Ok(t);
        }
    }
    anyhow::bail!("{s:?} is not PostgreSQL's timestamptz text")
}

/// The first log timestamp on a tidemark command's stderr (tracing's RFC 3339 prefix).
fn first_log_time_us(r: &env::Run) -> Result<i64> {
    r.stderr
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find_map(|w| micros(w).ok())
        .with_context(|| format!("no timestamped log line on stderr:\n{r}"))
}

/// Backs up under an agent clock `offset` off the server's; checks that the agent's own clock
/// was off (its log timestamps) and that the backup recorded the server's times.
async fn skewed_backup(
    src: &PgCluster,
    db: &Client,
    repo: &Repo,
    offset: &str,
    sign: i64,
) -> Result<String> {
    let t0 = server_now_us(db).await?;
    let r = src.backup_run(repo, &skewed(offset)).await?;
    let t1 = server_now_us(db).await?;
    let id = r.json()?["backup_id"]
        .as_str()
        .context("backup_id")?
        .to_string();
    let logged = first_log_time_us(&r)?;
    // The agent's log clock lies SKEW off the server's window [t0, t1], give or take a minute.
    let margin = ChronoDuration::minutes(1)
        .num_microseconds()
        .context("µs")?;
    let skew = SKEW.num_microseconds().context("µs")? * sign;
    ensure!(
        logged > t0 + skew - margin && logged < t1 + skew + margin,
        "the agent's clock was not {offset} off the server's (server {t0}..{t1} µs, agent logged {logged} µs): is libfaketime working?\n{r}"
    );
    let b = info_backup(repo, &id).await?;
    let (start, stop) = (
        micros(b["start_time"].as_str().context("start_time")?)?,
        micros(b["stop_time"].as_str().context("stop_time")?)?,
    );
    ensure!(
        t0 <= start && start <= stop && stop <= t1,
        "backup {id} taken with the agent clock {offset} recorded start {} and stop {}, outside the server's clock {}..{}",
        b["start_time"],
        b["stop_time"],
        tidemark_time(t0),
        tidemark_time(t1)
    );
    eprintln!(
        "target-edges: backup {id} with FAKETIME={offset}: agent logged {}, server clock {}..{}, recorded start {} stop {}",
        tidemark_time(logged),
        tidemark_time(t0),
        tidemark_time(t1),
        b["start_time"],
        b["stop_time"]
    );
    Ok(id)
}

fn tidemark_time(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("{us}us"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_clock_ten_minutes_off_still_selects_by_the_database_clock() -> Result<()> {
    ensure!(
        std::path::Path::new(FAKETIME_LIB).is_file(),
        "{FAKETIME_LIB} is missing\nhint: run scripts/install-deps.sh (apt-get install faketime)"
    );
    let dir = TestDir::new("target-skew")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = source(&dir, &repo, "").await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    // Backup A with the agent 10 minutes fast, backup B with it 10 minutes slow.
    let a = skewed_backup(&src, &db, &repo, "+10m", 1).await?;
    data::write_batch(&db, 2).await?;
    let t2 = data::target_time_between(&db).await?;
    data::write_batch(&db, 3).await?;
    let b = skewed_backup(&src, &db, &repo, "-10m", -1).await?;
    data::write_batch(&db, 4).await?;
    let t4 = data::target_time_between(&db).await?;
    data::write_batch(&db, 5).await?;
    let xids: Vec<String> = {
        let mut v = Vec::new();
        for b in [3, 5] {
            v.push(xid_of(&db, b).await?);
        }
        v
    };
    src.switch_wal_and_wait(&repo).await?;
    drop(db);
    drop(src);

    // Between batches 2 and 3 (before B) from A, whichever way the agent's clock is off: a
    // selection by the agent's clock would have seen A finish 10 minutes late (no backup) or B
    // finish 10 minutes early (B, which cannot stop before its own consistency point).
    for (name, offset) in [("t2-fast", "+10m"), ("t2-slow", "-10m")] {
        restore_and_check(
            &dir,
            &repo,
            Case {
                name,
                args: vec!["--target-time", &t2],
                envs: skewed(offset).to_vec(),
                backup: &a,
                want: batches(1..=2),
                stops_before_xid: &xids[0],
            },
        )
        .await?;
    }
    // Between batches 4 and 5 (after B) from B.
    for (name, offset) in [("t4-fast", "+10m"), ("t4-slow", "-10m")] {
        restore_and_check(
            &dir,
            &repo,
            Case {
                name,
                args: vec!["--target-time", &t4],
                envs: skewed(offset).to_vec(),
                backup: &b,
                want: batches(1..=4),
                stops_before_xid: &xids[1],
            },
        )
        .await?;
    }
    Ok(())
}
