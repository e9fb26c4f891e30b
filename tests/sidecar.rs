//! Over 500 lines because each sidecar fault scenario ends with the same restore proof; they share
//! one file's helpers.
//!
//! The WAL archiving sidecar end to end: archive_command hands segments to `tidemark-agent
//! sidecar` over its socket while a real PostgreSQL 15 writes; the sidecar is killed, stopped,
//! starved of disk and fed conflicting WAL, and every scenario ends with a restore proving that
//! nothing PostgreSQL was told is archived went missing.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::env::{self, give_to_db_user, Tool};
use tidemark_e2e::sidecar::{
    archiver_stats, prefix_restore_command, start_handoff_archiving, switch_wal, tidemark_with_env,
    wait_archived, Moto, Sidecar, SidecarConfig,
};
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};
use tokio_postgres::Client;

/// Every metric the sidecar documents.
const METRICS: [&str; 11] = [
    "tidemark_wal_last_archived_timestamp_seconds",
    "tidemark_wal_last_archived_segment",
    "tidemark_wal_archive_lag_segments",
    "tidemark_wal_archive_lag_seconds",
    "tidemark_wal_ready_queue_depth",
    "tidemark_wal_uploads_in_flight",
    "tidemark_wal_upload_failures_total",
    "tidemark_wal_conflicts_total",
    "tidemark_stored_bytes_total",
    "tidemark_stored_objects_total",
    "tidemark_wal_handoffs_total",
];

fn expected(batches: std::ops::RangeInclusive<i32>) -> BTreeMap<i32, i64> {
    batches.map(|b| (b, BATCH_ROWS)).collect()
}

/// A pseudo-random number in `0..n` (clock nanoseconds; good enough for jitter).
fn jitter(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (nanos / 1000) % n.max(1)
}

/// Inserts a marker row in its own transaction; returns the server clock after the commit.
async fn insert_marker(db: &Client, note: &str) -> Result<String> {
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS markers (note text PRIMARY KEY); INSERT INTO markers VALUES ('{note}')"
    ))
    .await
    .context("cannot insert the marker row")?;
    data::server_time_text(db).await
}

async fn markers(db: &Client) -> Result<Vec<String>> {
    let rows = db
        .query("SELECT note FROM markers ORDER BY note", &[])
        .await
        .context("cannot read the markers table")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Asserts `info --json` shows timeline 1 archived through `last` without gaps.
fn assert_no_gaps(info: &serde_json::Value, last: &str) -> Result<()> {
    let tl1 = info["wal"]
        .as_array()
        .and_then(|w| w.iter().find(|t| t["timeline"] == 1))
        .with_context(|| format!("info shows no WAL on timeline 1: {info}"))?;
    ensure!(
        tl1["last_segment"].as_str() >= Some(last)
            && tl1["gaps"].as_array().is_some_and(|g| g.is_empty()),
        "info does not show timeline 1 archived through {last} without gaps: {tl1}"
    );
    Ok(())
}

/// Restores `repo` to the end of its archive, starts it, and checks batches and markers.
async fn restore_latest_and_check(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    batches: std::ops::RangeInclusive<i32>,
    want_markers: &[&str],
) -> Result<()> {
    let pgdata = dir.join(name);
    repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
    let server = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    check_restored(&server, batches, want_markers).await
}

async fn check_restored(
    server: &PgCluster,
    batches: std::ops::RangeInclusive<i32>,
    want_markers: &[&str],
) -> Result<()> {
    let db = server.client().await?;
    let counts = data::batch_counts(&db).await?;
    ensure!(
        counts == expected(batches.clone()),
        "restored server: rows per batch {counts:?}, want batches {batches:?} with {BATCH_ROWS} rows each\n{}",
        server.log_tail()
    );
    let found = markers(&db).await?;
    ensure!(
        found == want_markers,
        "restored server holds markers {found:?}, want {want_markers:?}\n{}",
        server.log_tail()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_archives_under_load_and_survives_kill_9() -> Result<()> {
    const KILLS: usize = 3;
    const MIN_BATCHES: i32 = 12;
    let dir = TestDir::new("sc-kill9")?;
    let repo = Repo::create(&dir, "repo")?;
    let cfg = SidecarConfig::new(&dir, "sidecar", &repo.url, &dir.join("src/data"))?;
    let src = start_handoff_archiving(&dir, "src", &repo.url, &cfg.socket_dir, &[]).await?;
    let mut sc = Sidecar::start(cfg).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let backup = src.backup(&repo).await?;

    // The load: one batch per transaction, a WAL switch after every third batch, until the
    // sidecar has been killed KILLS times and at least MIN_BATCHES were written.
    let done_killing = Arc::new(AtomicBool::new(false));
    let load_db = src.client().await?;
    let stop = done_killing.clone();
    let load = tokio::spawn(async move {
        let mut b = 1;
        while b < MIN_BATCHES || !stop.load(Ordering::Relaxed) {
            b += 1;
            data::write_batch(&load_db, b).await?;
            if b % 3 == 0 {
                switch_wal(&load_db).await?;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
            if b > 400 {
                bail!("the load ran for 400 batches without the kills finishing");
            }
        }
        anyhow::Ok(b)
    });
    let mut killed_pids = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(300 + jitter(900))).await;
        killed_pids.push(sc.pid().context("the sidecar is running")?);
        sc.kill9().await?;
        tokio::time::sleep(Duration::from_millis(jitter(400))).await;
        sc.restart().await?;
    }
    done_killing.store(true, Ordering::Relaxed);
    let last_batch = load.await??;

    let marker_time = insert_marker(&db, "after-the-kills").await?;
    let last_seg = switch_wal(&db).await?;
    wait_archived(&db, &last_seg, Duration::from_secs(60)).await?;
    repo.wait_for_wal(&last_seg, Duration::from_secs(10))
        .await?;
    let info = repo.info().await?;
    assert_no_gaps(&info, &last_seg)?;
    let (archived, _, failed, _) = archiver_stats(&db).await?;
    let fallbacks = src.log_lines("no sidecar answered").len();
    let handoffs = sc.metric("tidemark_wal_handoffs_total").await?;
    ensure!(
        handoffs >= 1.0,
        "archive_command never handed a segment to the restarted sidecar\n{}",
        sc.log_tail(30)
    );
    eprintln!(
        "sc-kill9: backup {}, {last_batch} batches, sidecar killed {KILLS} times (pids {killed_pids:?}); \
         PostgreSQL archived {archived} files ({fallbacks} uploaded by archive_command itself) with {failed} failed attempts; marker at {marker_time} in {last_seg}; \
         archive {} .. {} without gaps",
        backup["backup_id"],
        info["wal"][0]["first_segment"],
        info["wal"][0]["last_segment"]
    );
    drop(db);

    restore_latest_and_check(
        &dir,
        &repo,
        "restored",
        1..=last_batch,
        &["after-the-kills"],
    )
    .await?;
    eprintln!("sc-kill9: restored to latest: batches 1..={last_batch} and the marker are there");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refuses_conflicting_segment_and_alerts() -> Result<()> {
    let dir = TestDir::new("sc-conflict")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let seg = src.switch_wal_and_wait(&repo).await?;
    let stored = repo.wal_object(&seg)?;
    let stored_before = std::fs::read(&stored)?;

    // A data directory of which the sidecar sees only pg_wal: a modified copy of an archived
    // segment, marked .ready.
    dir.mkdir("fake/pg_wal/archive_status")?;
    let original_path = dir.join("original");
    repo.wal_fetch(&seg, &original_path).await?.ok()?;
    let mut modified = std::fs::read(&original_path)?;
    modified[(8 << 20) + 1234] ^= 0xff;
    let fake_seg = dir.write(&format!("fake/pg_wal/{seg}"), &modified)?;
    dir.write(&format!("fake/pg_wal/archive_status/{seg}.ready"), b"")?;

    let cfg = SidecarConfig::new(&dir, "sidecar", &repo.url, &dir.join("fake"))?;
    let sock = cfg.socket_dir.to_string_lossy().into_owned();
    let state_file = cfg.state_dir.join("archived");
    let sc = Sidecar::start(cfg).await?;
    let fake = fake_seg.to_string_lossy().into_owned();
    let r = env::agent(&[
        "wal-push",
        "--repo",
        &repo.url,
        "--socket-dir",
        &sock,
        &fake,
    ])
    .await?;
    ensure!(
        !r.success(),
        "handing off a conflicting {seg} must fail:\n{r}"
    );
    ensure!(
        r.code() == Some(1),
        "a refused handoff must exit 1 (> 125 makes the archiver FATAL):\n{r}"
    );
    ensure!(
        r.stderr.contains(&seg)
            && (r.stderr.contains("conflict") || r.stderr.contains("different content")),
        "the refusal does not name {seg} and the conflict:\n{r}"
    );
    ensure!(
        r.stderr.contains("sidecar"),
        "the refusal did not come from the sidecar (no handoff?):\n{r}"
    );

    let started = Instant::now();
    let conflicts = loop {
        let c = sc.metric("tidemark_wal_conflicts_total").await?;
        if c >= 1.0 || started.elapsed() > Duration::from_secs(10) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        conflicts >= 1.0,
        "tidemark_wal_conflicts_total is {conflicts} after a refused segment"
    );
    let logged: Vec<String> = sc
        .log_text()
        .lines()
        .filter(|l| l.contains(&seg) && l.contains("conflict"))
        .map(str::to_string)
        .collect();
    ensure!(
        !logged.is_empty(),
        "the sidecar log does not mention the conflict on {seg}\n{}",
        sc.log_tail(30)
    );
    ensure!(
        std::fs::read(&stored)? == stored_before,
        "the stored object of {seg} changed"
    );
    let state = std::fs::read_to_string(&state_file).unwrap_or_default();
    ensure!(
        !state.contains(&seg),
        "the sidecar recorded the refused {seg} as archived"
    );
    let lag = sc.metric("tidemark_wal_archive_lag_segments").await?;
    ensure!(
        lag >= 1.0,
        "tidemark_wal_archive_lag_segments is {lag} while {seg} is refused"
    );
    ensure!(
        dir.join(&format!("fake/pg_wal/archive_status/{seg}.ready"))
            .exists(),
        "the sidecar touched PostgreSQL's status file"
    );
    eprintln!(
        "sc-conflict: handoff of a modified {seg} refused (exit {:?}): {}; conflicts_total {conflicts}, lag {lag}; log: {}",
        r.code(),
        r.stderr.lines().next().unwrap_or(""),
        logged[0]
    );

    // The archive still restores what the real cluster wrote.
    drop(sc);
    insert_marker(&db, "after-the-conflict").await?;
    src.switch_wal_and_wait(&repo).await?;
    drop(db);
    let pgdata = dir.join("restored");
    let _backup = src.backup(&repo).await?;
    repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
    let server = start_restored(&dir, "restored-server", &pgdata).await?;
    check_restored(&server, 1..=1, &["after-the-conflict"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_graceful_shutdown_keeps_the_last_marker() -> Result<()> {
    let dir = TestDir::new("sc-sigterm")?;
    let repo = Repo::create(&dir, "repo")?;
    let cfg = SidecarConfig::new(&dir, "sidecar", &repo.url, &dir.join("src/data"))?;
    let socket = cfg.socket_dir.join("tidemark.sock");
    let mut src = start_handoff_archiving(&dir, "src", &repo.url, &cfg.socket_dir, &[]).await?;
    let mut sc = Sidecar::start(cfg).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let _backup = src.backup(&repo).await?;
    data::write_batch(&db, 2).await?;

    // The marker is in the segment being written. At once the sidecar is told to stop and
    // PostgreSQL shuts down: with archiving on, the shutdown switches to a new segment and the
    // archiver runs archive_command once more, which finds no sidecar and uploads itself.
    insert_marker(&db, "last-words").await?;
    let seg: String = db
        .query_one("SELECT pg_walfile_name(pg_current_wal_insert_lsn())", &[])
        .await?
        .get(0);
    drop(db);
    sc.sigterm()?;
    src.stop().await?;
    let st = sc.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        st.success(),
        "the sidecar exited with {st} after SIGTERM\n{}",
        sc.log_tail(30)
    );
    ensure!(
        !socket.exists(),
        "the sidecar left its socket {} behind",
        socket.display()
    );
    ensure!(
        repo.wal_object(&seg)?.is_file(),
        "{seg} (holding the marker) is not archived after a clean shutdown\n{}\n{}",
        src.log_tail(),
        sc.log_tail(30)
    );
    let fallback = src.log_lines("no sidecar answered").len();
    eprintln!(
        "sc-sigterm: {seg} archived across SIGTERM + pg_ctl stop -m fast; archive_command uploaded {fallback} file(s) itself"
    );
    assert_no_gaps(&repo.info().await?, &seg)?;
    restore_latest_and_check(&dir, &repo, "restored", 1..=2, &["last-words"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_on_s3_with_a_real_server() -> Result<()> {
    let dir = TestDir::new("sc-s3")?;
    let moto = Moto::start("tidemark-e2e").await?;
    let aws = moto.aws_env();
    let url = "s3://tidemark-e2e/sidecar-test";
    let mut cfg = SidecarConfig::new(&dir, "sidecar", url, &dir.join("src/data"))?;
    cfg.env = aws.clone();
    let src = start_handoff_archiving(&dir, "src", url, &cfg.socket_dir, &aws).await?;
    // Starting at all means the create-only probe passed against the S3 server.
    let sc = Sidecar::start(cfg).await?;
    ensure!(
        !sc.log_text().contains("does not honour create-only"),
        "the probe complained\n{}",
        sc.log_tail(20)
    );
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let data_dir = src.data.to_string_lossy().into_owned();
    let conninfo = src.conninfo();
    let r = tidemark_with_env(
        Tool::Agent,
        &[
            "backup",
            "--pgdata",
            &data_dir,
            "--repo",
            url,
            "--pg-url",
            &conninfo,
            "--archive-timeout",
            "120",
            "--json",
        ],
        &aws,
    )
    .await?;
    if !r.success() {
        bail!(
            "backup to s3 failed:\n{r}\n{}\n{}",
            src.log_tail(),
            sc.log_tail(30)
        );
    }
    let backup = r.json()?;
    for b in 2..=4 {
        data::write_batch(&db, b).await?;
        switch_wal(&db).await?;
    }
    insert_marker(&db, "on-s3").await?;
    let last_seg = switch_wal(&db).await?;
    wait_archived(&db, &last_seg, Duration::from_secs(60)).await?;
    let info = tidemark_with_env(Tool::Agent, &["info", "--repo", url, "--json"], &aws)
        .await?
        .ok()?
        .json_document()?;
    assert_no_gaps(&info, &last_seg)?;
    let stored = sc.metric("tidemark_stored_objects_total").await?;
    let handoffs = sc.metric("tidemark_wal_handoffs_total").await?;
    ensure!(
        stored >= 1.0 && handoffs >= 1.0,
        "the sidecar stored {stored} objects and answered {handoffs} handoffs; want both ≥ 1"
    );
    drop(db);

    let pgdata = dir.join("restored");
    let pgdata_s = pgdata.to_string_lossy().into_owned();
    tidemark_with_env(
        Tool::Restore,
        &[
            "restore", "--pgdata", &pgdata_s, "--repo", url, "--target", "latest", "--json",
        ],
        &aws,
    )
    .await?
    .ok()?;
    prefix_restore_command(&pgdata, &aws)?;
    let server = start_restored(&dir, "restored-server", &pgdata).await?;
    check_restored(&server, 1..=4, &["on-s3"]).await?;
    eprintln!(
        "sc-s3: backup {} on {url} ({}), {stored} objects stored by the sidecar over {handoffs} handoffs; restored through {last_seg}",
        backup["backup_id"], moto.endpoint
    );
    Ok(())
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        let u = env::db_user()?;
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},uid={},gid={},mode=0700", u.uid, u.gid))
            .arg("tmpfs")
            .arg(dir)
            .status()
            .context("cannot run mount")?;
        if !st.success() {
            bail!(
                "cannot mount a tmpfs on {} ({st}); this test needs root and mount permission",
                dir.display()
            );
        }
        give_to_db_user(dir)?;
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes zeros into `path` until the file system is full.
fn fill(path: &Path) -> Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let page = [0u8; 4096];
    let mut n = 0u64;
    loop {
        match f.write(&page) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e).context("cannot fill the state directory"),
        }
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_full_never_acks() -> Result<()> {
    let dir = TestDir::new("sc-full")?;
    let repo = Repo::create(&dir, "repo")?;
    let mut cfg = SidecarConfig::new(&dir, "sidecar", &repo.url, &dir.join("src/data"))?;
    let tmpfs = Tmpfs::mount(&cfg.state_dir, "64k")?;
    cfg.state_dir = tmpfs.0.clone();
    let state_file = cfg.state_dir.join("archived");
    let src = start_handoff_archiving(&dir, "src", &repo.url, &cfg.socket_dir, &[]).await?;
    let mut sc = Sidecar::start(cfg).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let _backup = src.backup(&repo).await?;

    // Restart the sidecar once nothing is .ready: it rewrites its state file empty. Then fill
    // the file system, so the next record needs a block it does not have.
    let status = src.data.join("pg_wal/archive_status");
    let started = Instant::now();
    while std::fs::read_dir(&status)?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".ready"))
    {
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "WAL stayed .ready after the backup"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sc.restart().await?;
    // The rewritten state holds only its header line. Pad it to a whole page (the sidecar skips
    // lines it cannot parse), so that the next record needs a page the full file system lacks.
    {
        use std::io::Write;
        let len = std::fs::metadata(&state_file)?.len();
        let pad = ((4096 - len % 4096) % 4096) as usize;
        if pad > 0 {
            let mut line = vec![b'#'; pad];
            line[pad - 1] = b'\n';
            std::fs::OpenOptions::new()
                .append(true)
                .open(&state_file)?
                .write_all(&line)?;
        }
    }
    let filler = tmpfs.0.join("filler");
    let filled = fill(&filler)?;
    let state_len = std::fs::metadata(&state_file)?.len();
    ensure!(
        state_len % 4096 == 0,
        "the state file holds {state_len} bytes after padding; the test needs whole pages"
    );
    let (_, before_last, before_failed, _) = archiver_stats(&db).await?;

    data::write_batch(&db, 2).await?;
    let seg = switch_wal(&db).await?;
    let started = Instant::now();
    loop {
        let (_, _, failed, last_failed) = archiver_stats(&db).await?;
        if failed > before_failed && last_failed.as_deref() == Some(seg.as_str()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "archive_command did not fail for {seg} with the state directory full (failed {failed}, last failed {last_failed:?})\n{}",
                sc.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, last, _, _) = archiver_stats(&db).await?;
    ensure!(
        last == before_last,
        "PostgreSQL archived {last:?} while the state directory was full (before: {before_last:?})"
    );
    ensure!(
        status.join(format!("{seg}.ready")).exists()
            && !status.join(format!("{seg}.done")).exists(),
        "{seg} is not .ready any more although nothing acknowledged it"
    );
    let state = std::fs::read_to_string(&state_file).unwrap_or_default();
    ensure!(
        !state.contains(&seg),
        "the full state directory recorded {seg}"
    );
    let failures_a = sc.metric("tidemark_wal_upload_failures_total").await?;
    let lag = sc.metric("tidemark_wal_archive_lag_segments").await?;
    ensure!(
        failures_a >= 1.0 && lag >= 1.0,
        "with the state directory full: upload_failures_total {failures_a}, lag_segments {lag}; want both ≥ 1"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failures_b = sc.metric("tidemark_wal_upload_failures_total").await?;
    let refusals = src.log_lines("archive command failed").len();
    eprintln!(
        "sc-full: filled the state tmpfs with {filled} bytes; {seg} refused {refusals} time(s) by archive_command, \
         still .ready; sidecar upload failures {failures_a} then {failures_b} two seconds later; lag {lag}"
    );

    // Space again: the sidecar catches up and PostgreSQL's next attempt is acknowledged.
    std::fs::remove_file(&filler)?;
    data::write_batch(&db, 3).await?;
    insert_marker(&db, "after-the-full-disk").await?;
    let next = switch_wal(&db).await?;
    wait_archived(&db, &next, Duration::from_secs(90)).await?;
    let state = std::fs::read_to_string(&state_file).unwrap_or_default();
    ensure!(
        state.contains(&seg),
        "{seg} was acknowledged without being recorded in the state file"
    );
    let started = Instant::now();
    loop {
        let lag = sc.metric("tidemark_wal_archive_lag_segments").await?;
        if lag == 0.0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("tidemark_wal_archive_lag_segments stayed at {lag} after catching up");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_gaps(&repo.info().await?, &next)?;
    drop(db);
    drop(sc);
    restore_latest_and_check(&dir, &repo, "restored", 1..=3, &["after-the-full-disk"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_serves_healthz_and_metrics() -> Result<()> {
    let dir = TestDir::new("sc-metrics")?;
    let repo = Repo::create(&dir, "repo")?;
    let cfg = SidecarConfig::new(&dir, "sidecar", &repo.url, &dir.join("src/data"))?;
    let src = start_handoff_archiving(&dir, "src", &repo.url, &cfg.socket_dir, &[]).await?;
    let sc = Sidecar::start(cfg).await?;
    let (status, body) = sc.get("/healthz").await?;
    ensure!(
        status == 200 && body.trim() == "ok",
        "GET /healthz answered {status} {body:?}"
    );
    let (status, _) = sc.get("/no-such-page").await?;
    ensure!(status == 404, "GET /no-such-page answered {status}");

    let db = src.client().await?;
    data::create_table(&db).await?;
    let mut last = String::new();
    for b in 1..=3 {
        data::write_batch(&db, b).await?;
        last = switch_wal(&db).await?;
    }
    wait_archived(&db, &last, Duration::from_secs(60)).await?;
    let started = Instant::now();
    let m = loop {
        let m = sc.metrics().await?;
        let settled = m.get("tidemark_wal_archive_lag_segments") == Some(&0.0)
            && m.get("tidemark_wal_ready_queue_depth") == Some(&0.0)
            && m.get("tidemark_wal_uploads_in_flight") == Some(&0.0);
        if settled {
            break m;
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("/metrics did not settle on lag 0 and last segment {last}: {m:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (_, body) = sc.get("/metrics").await?;
    // The highest segment stored (uploads finish out of order; the label only moves forward).
    let shown: Vec<&String> = m
        .iter()
        .filter(|(k, v)| {
            k.starts_with("tidemark_wal_last_archived_segment{segment=\"") && **v == 1.0
        })
        .map(|(k, _)| k)
        .collect();
    ensure!(
        shown.len() == 1
            && shown[0].as_str()
                == format!("tidemark_wal_last_archived_segment{{segment=\"{last}\"}}").as_str(),
        "/metrics shows last archived segment {shown:?}, want exactly the highest, {last}:\n{body}"
    );
    // A real parser accepts the exposition: prometheus_client's strict OpenMetrics parser.
    let exposition = dir.write("metrics.txt", body.as_bytes())?;
    let parsed = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\nfams = list(parse(open(sys.argv[1]).read()))\nprint(len(fams), sum(len(f.samples) for f in fams))",
        ])
        .arg(&exposition)
        .output()
        .context("python3 is needed to parse /metrics")?;
    ensure!(
        parsed.status.success(),
        "the OpenMetrics parser rejected /metrics (install it with scripts/install-deps.sh):\n{}\n{body}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let families: usize = String::from_utf8_lossy(&parsed.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    ensure!(
        families >= METRICS.len(),
        "the parser found {families} metric families, want at least {}",
        METRICS.len()
    );
    for name in METRICS {
        ensure!(
            m.keys()
                .any(|k| k == name || k.starts_with(&format!("{name}{{"))),
            "/metrics has no {name}:\n{body}"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let at = m["tidemark_wal_last_archived_timestamp_seconds"];
    ensure!(
        (now - at).abs() < 120.0,
        "tidemark_wal_last_archived_timestamp_seconds is {at}, now is {now}"
    );
    ensure!(
        m["tidemark_stored_objects_total"] >= 3.0
            && m["tidemark_stored_bytes_total"] > 0.0
            && m["tidemark_wal_handoffs_total"] >= 3.0
            && m["tidemark_wal_uploads_in_flight"] == 0.0
            && m["tidemark_wal_archive_lag_seconds"] == 0.0
            && m["tidemark_wal_conflicts_total"] == 0.0,
        "unexpected metrics after archiving 3 segments:\n{body}"
    );
    eprintln!(
        "sc-metrics: /healthz ok; after 3 segments: stored {} objects ({} bytes), {} handoffs, lag 0, last {last}",
        m["tidemark_stored_objects_total"],
        m["tidemark_stored_bytes_total"],
        m["tidemark_wal_handoffs_total"]
    );
    Ok(())
}

/// The object store fails in every way for a while (503 SlowDown, stalled requests that time out,
/// responses cut short after the write took effect, connections dropped mid-transfer: every
/// connection fails) while PostgreSQL writes. PostgreSQL is never told a segment is archived that is not durably stored
/// (checked against the server directly, behind the proxy's back, while the faults go on), and
/// once the faults stop everything catches up and restores, itself through the faulty proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_rides_out_a_faulty_object_store() -> Result<()> {
    use tidemark_e2e::faults::{FaultProxy, FAULTS};
    let dir = TestDir::new("sc-faults")?;
    let moto = Moto::start("tidemark-faults").await?;
    let proxy = FaultProxy::start(moto.endpoint.trim_start_matches("http://")).await?;
    let direct = moto.aws_env();
    let mut faulty: Vec<(String, String)> = direct
        .iter()
        .filter(|(k, _)| k != "AWS_ENDPOINT_URL")
        .cloned()
        .collect();
    faulty.push(("AWS_ENDPOINT_URL".into(), proxy.endpoint.clone()));
    faulty.push(("AWS_TIMEOUT".into(), "2s".into()));
    faulty.push(("AWS_CONNECT_TIMEOUT".into(), "2s".into()));
    let url = "s3://tidemark-faults/repo";
    let mut cfg = SidecarConfig::new(&dir, "sidecar", url, &dir.join("src/data"))?;
    cfg.env = faulty.clone();
    let src = start_handoff_archiving(&dir, "src", url, &cfg.socket_dir, &faulty).await?;
    let sc = Sidecar::start(cfg).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let data_dir = src.data.to_string_lossy().into_owned();
    let conninfo = src.conninfo();
    tidemark_with_env(
        Tool::Agent,
        &[
            "backup", "--pgdata", &data_dir, "--repo", url, "--pg-url", &conninfo, "--json",
        ],
        &faulty,
    )
    .await?
    .ok()?;

    proxy.set_faults(1);
    let fault_start = Instant::now();
    let mut last_seg = String::new();
    for b in 2..=6 {
        data::write_batch(&db, b).await?;
        last_seg = switch_wal(&db).await?;
        // Whatever PostgreSQL believes archived must be in the store right now.
        if let (_, Some(acked), _, _) = archiver_stats(&db).await? {
            if acked.len() == 24 {
                let info =
                    tidemark_with_env(Tool::Agent, &["info", "--repo", url, "--json"], &direct)
                        .await?
                        .ok()?
                        .json_document()?;
                assert_no_gaps(&info, &acked)?;
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    insert_marker(&db, "after-the-storm").await?;
    let marker_seg = switch_wal(&db).await?;
    while fault_start.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let counts = proxy.counts();
    let failures = sc.metric("tidemark_wal_upload_failures_total").await?;
    eprintln!("sc-faults: faults injected {:?} = {counts:?}; sidecar upload failures {failures}; last segment {last_seg}", FAULTS);
    ensure!(
        counts.iter().all(|&c| c >= 1),
        "every kind of fault should have been injected at least once: {FAULTS:?} = {counts:?}"
    );

    proxy.set_faults(0);
    wait_archived(&db, &marker_seg, Duration::from_secs(120))
        .await
        .with_context(|| sc.log_tail(40))?;
    let info = tidemark_with_env(Tool::Agent, &["info", "--repo", url, "--json"], &direct)
        .await?
        .ok()?
        .json_document()?;
    assert_no_gaps(&info, &marker_seg)?;
    let (_, _, failed_count, _) = archiver_stats(&db).await?;
    eprintln!("sc-faults: PostgreSQL saw {failed_count} failed archive_command runs");
    drop(db);

    // Restore and replay through the proxy with one connection in four failing: reads retry too.
    proxy.set_faults(4);
    let pgdata = dir.join("restored");
    let pgdata_s = pgdata.to_string_lossy().into_owned();
    let r = tidemark_with_env(
        Tool::Restore,
        &[
            "restore", "--pgdata", &pgdata_s, "--repo", url, "--target", "latest",
        ],
        &faulty,
    )
    .await?;
    ensure!(r.success(), "restore through the faulty proxy failed:\n{r}");
    prefix_restore_command(&pgdata, &faulty)?;
    let server = start_restored(&dir, "restored-server", &pgdata).await?;
    proxy.set_faults(0);
    check_restored(&server, 1..=6, &["after-the-storm"]).await?;
    eprintln!("sc-faults: faults during restore {:?}", proxy.counts());
    Ok(())
}
