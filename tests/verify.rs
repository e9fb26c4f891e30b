//! Restore drills (`tidemark-restore verify`) against real PostgreSQL: a healthy repository
//! passes (to the end of the archive, to random points in the window, recorded for `info`), and a
//! damaged chunk, a missing WAL segment or an unreachable target fail the drill naming the cause.

use anyhow::{ensure, Context, Result};
use std::time::Duration;
use tidemark_e2e::env::{self, db_user, flip_bytes, Run};
use tidemark_e2e::{data, PgCluster, Repo, TestDir};

/// A source cluster with batches 1..=3: backup A after batch 1, backup B after batch 2, batch 3
/// committed after B and its segment archived. The recoverable window spans A to B and beyond.
async fn two_backups(dir: &TestDir) -> Result<(Repo, PgCluster)> {
    let repo = Repo::create(dir, "repo")?;
    let src = PgCluster::start_archiving(dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    src.backup(&repo).await?;
    for b in 2..=3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        data::write_batch(&db, b).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if b == 2 {
            src.backup(&repo).await?;
        }
    }
    // Commits after the newest backup, so every time in the window has a later commit to stop at.
    data::write_batch(&db, 4).await?;
    src.switch_wal_and_wait(&repo).await?;
    Ok((repo, src))
}

/// `tidemark-restore verify --repo <repo> --scratch <dir>/<name> <args>` as the database user.
async fn verify(dir: &TestDir, repo: &Repo, name: &str, args: &[&str]) -> Result<Run> {
    let scratch = dir.join(name).to_string_lossy().into_owned();
    let pg_bin = env::pg_bin_dir()?.to_string_lossy().into_owned();
    let mut a = vec![
        "verify",
        "--repo",
        &repo.url,
        "--scratch",
        &scratch,
        "--pg-bin",
        &pg_bin,
    ];
    a.extend_from_slice(args);
    env::restore(&a).await
}

fn check<'a>(v: &'a serde_json::Value, name: &str) -> Result<&'a serde_json::Value> {
    v["checks"]
        .as_array()
        .context("no checks array")?
        .iter()
        .find(|c| c["name"] == name)
        .with_context(|| format!("no check {name} in {v}"))
}

fn passed(r: &Run) -> Result<serde_json::Value> {
    ensure!(r.success(), "the drill failed:\n{r}");
    let v = r.json()?;
    ensure!(
        v["ok"] == true && v["failure"].is_null(),
        "ok is not true: {v}"
    );
    ensure!(v["schema_version"] == 1, "schema_version: {v}");
    for c in v["checks"].as_array().context("checks")? {
        ensure!(
            c["outcome"] != "fail",
            "a check failed in a passing drill: {c}"
        );
    }
    Ok(v)
}

fn failed(r: &Run) -> Result<serde_json::Value> {
    ensure!(!r.success(), "the drill must fail:\n{r}");
    ensure!(r.code() == Some(1), "a failed drill exits 1:\n{r}");
    let v = r.json()?;
    ensure!(v["ok"] == false, "ok is not false: {v}");
    ensure!(v["failure"].is_string(), "no failure named: {v}");
    ensure!(
        r.stderr.contains("restore drill failed"),
        "stderr does not say the drill failed:\n{r}"
    );
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_repository_passes_every_drill() -> Result<()> {
    let dir = TestDir::new("verify-healthy")?;
    let (repo, _src) = two_backups(&dir).await?;
    let sql = dir.write(
        "checks.sql",
        b"-- all four batches are back\nSELECT count(*) = 4000 FROM batches;\nSELECT batch FROM batches WHERE batch = 4 LIMIT 1;\n",
    )?;
    let sql = sql.to_string_lossy().into_owned();

    // To the end of the archive, recorded. As root the drill runs the server as --run-as postgres.
    let scratch = dir.join("latest");
    let r = if db_user()?.switch {
        let b = env::bins()?;
        let mut cmd = tokio::process::Command::new(&b.restore);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .args([
                "verify", "--repo", &repo.url, "--target", "latest", "--record",
            ])
            .args([
                "--run-as",
                "postgres",
                "--check-sql",
                &sql,
                "--heapallindexed",
            ])
            .arg("--scratch")
            .arg(&scratch)
            .arg("--pg-bin")
            .arg(env::pg_bin_dir()?)
            .kill_on_drop(true);
        env::run(cmd).await?
    } else {
        let s = scratch.to_string_lossy().into_owned();
        let pg_bin = env::pg_bin_dir()?.to_string_lossy().into_owned();
        env::restore(&[
            "verify",
            "--repo",
            &repo.url,
            "--target",
            "latest",
            "--record",
            "--check-sql",
            &sql,
            "--heapallindexed",
            "--scratch",
            &s,
            "--pg-bin",
            &pg_bin,
        ])
        .await?
    };
    let v = passed(&r)?;
    for name in [
        "wal_continuity",
        "accepts_connections",
        "reached_target",
        "amcheck",
        "data_checksums",
    ] {
        ensure!(
            check(&v, name)?["outcome"] == "pass",
            "check {name} did not pass: {v}"
        );
    }
    ensure!(
        v["checks"]
            .as_array()
            .context("checks")?
            .iter()
            .filter(
                |c| c["name"].as_str().is_some_and(|n| n.starts_with("sql:"))
                    && c["outcome"] == "pass"
            )
            .count()
            == 2,
        "both SQL checks must pass: {v}"
    );
    ensure!(v["target"]["kind"] == "latest", "{v}");
    ensure!(
        v["wal_files_fetched"].as_u64() >= Some(1),
        "no wal fetched: {v}"
    );
    for t in ["restore", "consistent", "promote", "rto"] {
        ensure!(
            v["seconds"][t].as_f64().is_some_and(|s| s > 0.0),
            "seconds.{t}: {v}"
        );
    }
    ensure!(!scratch.exists(), "the scratch directory was not removed");
    let info = repo.info().await?;
    let last = &info["last_verified_restore"];
    ensure!(
        last["ok"] == true && last["rto_seconds"].as_f64().is_some(),
        "info does not show the drill: {info}"
    );
    ensure!(
        last["backup"] == v["backup"]["id"],
        "info names another backup: {info}"
    );
    eprintln!(
        "verify-healthy: latest drill passed: backup {}, {} files, {} wal files, restore {:.2}s, consistent {:.2}s, promote {:.2}s, RTO {:.2}s",
        v["backup"]["id"], v["restore_files"], v["wal_files_fetched"], v["seconds"]["restore"].as_f64().unwrap_or(0.0),
        v["seconds"]["consistent"].as_f64().unwrap_or(0.0), v["seconds"]["promote"].as_f64().unwrap_or(0.0), v["seconds"]["rto"].as_f64().unwrap_or(0.0)
    );

    // Random points in the window: different across runs, each passes and stays in the window.
    let mut times = Vec::new();
    for i in 0..3 {
        let r = verify(&dir, &repo, &format!("random{i}"), &["--random-in-window"]).await?;
        let v = passed(&r)?;
        let t = v["target"]["time"]
            .as_str()
            .context("target.time")?
            .to_string();
        let w = &v["target"]["window"];
        let (lo, hi) = (
            chrono::DateTime::parse_from_rfc3339(w[0].as_str().context("window")?)?,
            chrono::DateTime::parse_from_rfc3339(w[1].as_str().context("window")?)?,
        );
        ensure!(lo < hi, "the window is a single point: {v}");
        let at = chrono::DateTime::parse_from_str(&t, "%Y-%m-%d %H:%M:%S%.6f%:z")?;
        ensure!(lo <= at && at <= hi, "target {t} is outside the window {w}");
        ensure!(check(&v, "reached_target")?["outcome"] == "pass", "{v}");
        eprintln!(
            "verify-healthy: random drill {i}: target {t} in {w}: passed, backup {}",
            v["backup"]["id"]
        );
        times.push(t);
    }
    times.sort();
    times.dedup();
    ensure!(
        times.len() == 3,
        "--random-in-window chose the same point twice: {times:?}"
    );

    // A target after the last archived commit cannot be reached: the drill fails and says why.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let r = verify(&dir, &repo, "unreachable", &["--target-time", &later]).await?;
    let v = failed(&r)?;
    let f = v["failure"].as_str().unwrap_or("");
    ensure!(
        f.contains("recovery ended before configured recovery target was reached")
            && f.contains("hint:"),
        "the failure does not name the cause: {f}"
    );
    eprintln!(
        "verify-healthy: unreachable target {later}: failed: {}",
        f.lines().next().unwrap_or("")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_fails_the_drill() -> Result<()> {
    let dir = TestDir::new("verify-damaged")?;
    let (repo, _src) = two_backups(&dir).await?;
    // Damage every large pack (the first backup's; the second one reuses most of its chunks), so
    // whichever backup the drill restores reads a damaged chunk.
    let mut flipped = 0;
    for (pack, size) in repo.packs()? {
        if size > 4096 {
            flip_bytes(&pack, 200, 4)?;
            flipped += 1;
        }
    }
    ensure!(flipped > 0, "no pack larger than 4 KiB to damage");
    let r = verify(&dir, &repo, "drill", &["--target", "latest"]).await?;
    let v = failed(&r)?;
    let f = v["failure"].as_str().unwrap_or("");
    ensure!(
        f.contains("restore failed") && f.contains("damaged"),
        "the failure does not name the damage: {f}"
    );
    ensure!(
        !dir.join("drill").exists(),
        "the scratch directory was not removed"
    );
    eprintln!("verify-damaged: failed: {}", f.lines().next().unwrap_or(""));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_wal_segment_fails_the_drill_naming_it() -> Result<()> {
    let dir = TestDir::new("verify-gap")?;
    let (repo, src) = two_backups(&dir).await?;
    let db = src.client().await?;
    let mut segs = Vec::new();
    for b in 5..=7 {
        data::write_batch(&db, b).await?;
        segs.push(src.switch_wal_and_wait(&repo).await?);
    }
    // Remove a segment from the middle of the window (after the newest backup).
    let gone = &segs[1];
    std::fs::remove_file(repo.wal_object(gone)?)?;
    let r = verify(&dir, &repo, "drill", &["--target", "latest", "--keep"]).await?;
    let v = failed(&r)?;
    let f = v["failure"].as_str().unwrap_or("");
    ensure!(
        f.contains(gone.as_str()),
        "the failure does not name segment {gone}: {f}"
    );
    ensure!(check(&v, "wal_continuity")?["outcome"] == "fail", "{v}");
    ensure!(
        check(&v, "reached_target")?["outcome"] == "fail",
        "recovery to latest ended at the gap, yet reached_target passed: {v}"
    );
    ensure!(
        v["kept"] == true && dir.join("drill/pgdata/PG_VERSION").is_file(),
        "--keep did not keep the scratch directory: {v}"
    );
    eprintln!("verify-gap: removed {gone}: failed: {f}");
    Ok(())
}

/// Segments replayed in the prefetch measurement.
const SEGMENTS: usize = 200;
/// TEST ONLY delay per WAL GET (TIDEMARK_TEST_GET_DELAY_MS), standing in for object-store latency.
const GET_DELAY_MS: u32 = 200;

/// Rewrites the restored directory's restore_command to run wal-fetch with `env` settings
/// (postgresql.auto.conf: the last setting wins).
fn wrap_restore_command(pgdata: &std::path::Path, env: &str) -> Result<()> {
    let p = pgdata.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&p)?;
    let cmd = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("restore_command = '"))
        .and_then(|l| l.strip_suffix('\''))
        .context("the restore wrote no restore_command")?
        .replace("''", "'");
    let wrapped = format!("env {env} {cmd}").replace('\'', "''");
    std::fs::write(&p, format!("{text}\nrestore_command = '{wrapped}'\n"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_serves_identical_wal_and_replays_hundreds_of_segments_faster() -> Result<()> {
    let dir = TestDir::new("verify-prefetch")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    src.backup(&repo).await?;
    db.batch_execute("CREATE TABLE ticks (n int)").await?;
    for n in 0..SEGMENTS {
        db.batch_execute(&format!(
            "INSERT INTO ticks VALUES ({n}); SELECT pg_switch_wal();"
        ))
        .await?;
    }
    data::write_batch(&db, 2).await?;
    let last = src.switch_wal_and_wait(&repo).await?;
    let want = data::batch_counts(&src.client().await?).await?;

    let mut secs = Vec::new();
    for (label, depth) in [("without prefetch", 0), ("with prefetch 16", 16)] {
        let name = format!("restored-{depth}");
        let pgdata = dir.join(&name);
        repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
        wrap_restore_command(
            &pgdata,
            &format!("TIDEMARK_TEST_GET_DELAY_MS={GET_DELAY_MS} TIDEMARK_PREFETCH={depth}"),
        )?;
        let t = std::time::Instant::now();
        let restored = tidemark_e2e::start_restored(&dir, &format!("{name}-srv"), &pgdata).await?;
        let elapsed = t.elapsed().as_secs_f64();
        let fetched = restored.log_lines("restored log file").len();
        ensure!(
            fetched >= SEGMENTS,
            "{label}: only {fetched} wal files were restored"
        );
        let rdb = restored.client().await?;
        let got = data::batch_counts(&rdb).await?;
        ensure!(got == want, "{label}: restored rows {got:?}, want {want:?}");
        let ticks: i64 = rdb
            .query_one("SELECT count(*) FROM ticks", &[])
            .await?
            .get(0);
        ensure!(ticks == SEGMENTS as i64, "{label}: {ticks} ticks restored");
        eprintln!(
            "verify-prefetch: {label}: replayed {fetched} wal files (last archived {last}) in {elapsed:.1}s with {GET_DELAY_MS} ms per GET (TEST ONLY delay, file:// repository)"
        );
        secs.push(elapsed);
        drop(restored);
        std::fs::remove_dir_all(&pgdata)?;
    }
    // Without prefetch every segment waits for its own GET; with it, one GET round per batch.
    // Require at least half of that cumulative wait to be gone (CPU time per segment is the same).
    let waited = SEGMENTS as f64 * GET_DELAY_MS as f64 / 1000.0;
    ensure!(
        secs[0] - secs[1] > waited / 2.0,
        "prefetch did not remove the per-segment wait: {:.1}s with, {:.1}s without ({waited:.0}s of GET delay without)",
        secs[1],
        secs[0]
    );
    Ok(())
}
