//! Over 500 lines because the random-history driver and its scenarios share one ledger and one set
//! of checks.
//!
//! Retention and garbage collection end to end: random sequences of writes, backups and expires
//! whose promised points in time all restore row for row; expire racing a running backup; expire
//! killed at every step and rerun; a pack deleted out of band. Every expire here runs twice, as
//! `--dry-run` and for real, and the two plans must agree.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::env::give_to_db_user;
use tidemark_e2e::rng::Rng;
use tidemark_e2e::{expire_agreeing, start_restored, tidemark, PgCluster, Repo, TestDir, Tool};

const GAP: Duration = Duration::from_millis(150);

/// A small deterministic generator (xorshift64*), so a failing seed can be replayed.
fn expected(last: i32) -> BTreeMap<i32, i64> {
    (1..=last).map(|b| (b, BATCH_ROWS)).collect()
}

/// `expire --dry-run` then `expire` with the same policy: the plans must agree. Returns the plan.
async fn expire(repo: &Repo, policy: &[String], env: &[(&str, &str)]) -> Result<Value> {
    let args: Vec<&str> = policy.iter().map(String::as_str).collect();
    expire_agreeing(repo, &args, env).await
}

/// `tidemark-restore check --json`; returns (passed, report).
async fn check(repo: &Repo) -> Result<(bool, Value)> {
    let r = tidemark(
        Tool::Restore,
        &["check", "--repo", &repo.url, "--json"],
        &[],
    )
    .await?;
    let v = r.json_document().with_context(|| format!("{r}"))?;
    Ok((r.success(), v))
}

async fn check_ok(repo: &Repo, when: &str) -> Result<()> {
    let (ok, v) = check(repo).await?;
    ensure!(ok, "check failed {when}: {v:#}");
    Ok(())
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

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .context("cannot run cp")?;
    ensure!(
        st.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
    Ok(())
}

/// Keys under `backups/` (with a hash of the manifest), `packs/` and `wal/` (what a restore can
/// use), sorted.
fn data_keys(repo: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![repo.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let k = p.strip_prefix(repo)?.to_string_lossy().into_owned();
                if k.starts_with("backups/") {
                    // Repack replaces manifests in place: compare their bytes too.
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    std::hash::Hash::hash(&std::fs::read(&p)?, &mut h);
                    out.push(format!("{k} {:016x}", std::hash::Hasher::finish(&h)));
                } else if k.starts_with("packs/") || k.starts_with("wal/") {
                    out.push(k);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes a valid pack no manifest names, as an interrupted backup leaves behind.
fn plant_orphan_pack(repo: &Repo, tag: &str) -> Result<String> {
    let mut b = tidemark_format::pack::PackBuilder::new();
    let data = format!("orphan {tag}");
    b.push(
        tidemark_format::ChunkId::of(data.as_bytes()),
        data.as_bytes(),
        data.len() as u32,
    );
    let (id, bytes) = b.finish();
    let key = tidemark_format::keys::pack(&id);
    let path = repo.path.join(&key);
    let parent = path.parent().context("pack dir")?;
    std::fs::create_dir_all(parent)?;
    std::fs::write(&path, bytes)?;
    give_to_db_user(parent)?;
    give_to_db_user(&path)?;
    Ok(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_keep_every_promised_point_restorable() -> Result<()> {
    let seeds: Vec<u64> = match std::env::var("TIDEMARK_E2E_SEEDS") {
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => vec![0x5eed_0001, 0x5eed_0002],
    };
    for seed in seeds {
        random_sequence(seed)
            .await
            .with_context(|| format!("seed {seed} (rerun with TIDEMARK_E2E_SEEDS={seed})"))?;
    }
    Ok(())
}

async fn random_sequence(seed: u64) -> Result<()> {
    let mut rng = Rng(seed | 1);
    let dir = TestDir::new(&format!("retention-prop-{seed}"))?;
    let repo = Repo::create(&dir, "repo")?;
    let mut cur = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let mut db = cur.client().await?;
    data::create_table(&db).await?;
    // The rows the live server holds, and (server clock in RFC 3339 UTC, rows) at recorded
    // moments: each taken after a commit and before the next one.
    let mut model: BTreeMap<i32, i64> = BTreeMap::new();
    let mut points: Vec<(String, BTreeMap<i32, i64>)> = Vec::new();
    let mut batch = 0;
    let mut backups = 0;
    let mut switched = false;
    let mut log = Vec::new();
    for step in 0..16 {
        // The first steps are a write and a backup, so there is always something to expire.
        let op = match step {
            0 => 0,
            1 => 1,
            _ => match rng.below(12) {
                0..=3 => 0,
                4..=6 => 1,
                7..=9 => 2,
                _ => 3,
            },
        };
        match op {
            0 => {
                batch += 1;
                data::write_batch(&db, batch).await?;
                model.insert(batch, BATCH_ROWS);
                tokio::time::sleep(GAP).await;
                points.push((data::server_time_rfc3339(&db).await?, model.clone()));
                tokio::time::sleep(GAP).await;
                log.push(format!("write {batch}"));
            }
            1 => {
                cur.backup(&repo).await?;
                backups += 1;
                log.push("backup".into());
                if rng.below(2) == 0 {
                    cur.switch_wal_and_wait(&repo).await?;
                }
            }
            2 => {
                let mut policy: Vec<String> = match rng.below(3) {
                    0 => vec!["--retain-last".into(), (1 + rng.below(3)).to_string()],
                    1 => vec!["--retain-window".into(), format!("{}s", 1 + rng.below(8))],
                    _ => vec![
                        "--retain-daily".into(),
                        "1".into(),
                        "--retain-last".into(),
                        (1 + rng.below(2)).to_string(),
                    ],
                };
                // Small test packs are rarely half garbage: a low threshold makes most expires
                // repack, so the promised points below are also restored from relocated backups.
                policy.extend([
                    "--repack-min-garbage".into(),
                    [1, 5, 50][rng.below(3) as usize].to_string(),
                ]);
                let plan = expire(&repo, &policy, &[]).await?;
                log.push(format!(
                    "expire {policy:?} keeps {:?}, repacks {}",
                    kept_ids(&plan),
                    plan["repack"]["packs"].as_array().map_or(0, Vec::len)
                ));
                check_ok(&repo, &format!("after {log:?}")).await?;
            }
            _ if switched => {}
            _ => {
                // Timeline switch: PITR to a promised moment, promote, archive the new timeline
                // into the same repository and carry on there (the old server is retired).
                // The fork lies after the newest backup (restoring a later moment of the new
                // timeline must not meet a backup of the abandoned branch), and a commit follows it.
                for _ in 0..2 {
                    batch += 1;
                    data::write_batch(&db, batch).await?;
                    model.insert(batch, BATCH_ROWS);
                    tokio::time::sleep(GAP).await;
                    points.push((data::server_time_rfc3339(&db).await?, model.clone()));
                    tokio::time::sleep(GAP).await;
                }
                cur.switch_wal_and_wait(&repo).await?;
                let info = repo.info().await?;
                let newest = info["backups"]
                    .as_array()
                    .and_then(|b| b.last())
                    .and_then(|b| b["stop_time"].as_str())
                    .unwrap_or("~")
                    .to_string();
                let candidates: Vec<usize> = (0..points.len() - 1)
                    .filter(|i| points[*i].0 > newest)
                    .collect();
                let Some(&pick) = candidates.get(rng.below(candidates.len() as u64) as usize)
                else {
                    continue;
                };
                let (t, rows) = points[pick].clone();
                let pgdata = dir.join("tl2");
                repo.restore(&pgdata, &["--target-time", &t]).await?.ok()?;
                let next = start_restored(&dir, "tl2-server", &pgdata).await?;
                let ndb = next.client().await?;
                ensure!(
                    data::batch_counts(&ndb).await? == rows,
                    "switch restore to {t} lost rows"
                );
                let agent = tidemark_e2e::env::bins()?.agent;
                let cmd = format!("{} wal-push --repo {} %p", agent.display(), repo.url);
                // ALTER SYSTEM refuses to run in a (multi-statement) transaction: one at a time.
                ndb.batch_execute("ALTER SYSTEM SET archive_mode = 'on'")
                    .await?;
                ndb.batch_execute(&format!(
                    "ALTER SYSTEM SET archive_command = '{}'",
                    cmd.replace('\'', "''")
                ))
                .await?;
                drop(ndb);
                let mut next = next;
                next.stop().await?;
                next.start().await?;
                // Promotion happened with archiving off: push the new timeline's history file.
                for e in std::fs::read_dir(pgdata.join("pg_wal"))? {
                    let p = e?.path();
                    if p.extension().is_some_and(|x| x == "history") {
                        repo.wal_push(&p).await?.ok()?;
                    }
                }
                cur.stop().await?;
                cur = next;
                db = cur.client().await?;
                model = rows;
                points.truncate(pick + 1); // later moments are on the abandoned timeline
                switched = true;
                log.push(format!("timeline switch at {t}"));
            }
        }
    }
    // A commit after every recorded moment: recovery to a time past the last commit in the
    // archive fails by design (PostgreSQL cannot know the target was reached).
    batch += 1;
    data::write_batch(&db, batch).await?;
    model.insert(batch, BATCH_ROWS);
    cur.switch_wal_and_wait(&repo).await?;
    let plan = expire(&repo, &["--retain-last".to_string(), "2".to_string()], &[]).await?;
    log.push(format!("expire last 2 keeps {:?}", kept_ids(&plan)));
    check_ok(&repo, &format!("after {log:?}")).await?;
    eprintln!("retention seed {seed}: {backups} backups, steps {log:?}");
    let from = plan["recoverable_from"]
        .as_str()
        .context("recoverable_from")?
        .to_string();

    // Promised: every recorded moment at or after recoverable_from, and the end of the archive.
    let promised: Vec<&(String, BTreeMap<i32, i64>)> = points
        .iter()
        .filter(|(t, _)| t.as_str() >= from.as_str())
        .collect();
    let mut picks = Vec::new();
    if let Some(first) = promised.first() {
        picks.push(*first); // the start of the promised window: the hardest point
    }
    if promised.len() > 1 {
        picks.push(promised[1 + rng.below(promised.len() as u64 - 1) as usize]);
    }
    for (i, (t, rows)) in picks.iter().enumerate() {
        let counts = repo
            .restore_counts(&dir, &format!("r{i}"), &["--target-time", t])
            .await?;
        ensure!(&counts == rows, "seed {seed}: restore to {t} (promised from {from}) gave {counts:?}, want {rows:?}; steps {log:?}");
    }
    let counts = repo
        .restore_counts(&dir, "rlatest", &["--target", "latest"])
        .await?;
    ensure!(
        counts == model,
        "seed {seed}: restore to latest gave {counts:?}, want {model:?}; steps {log:?}"
    );
    // A moment before the oldest retained backup is refused, never silently served by a later one.
    if let Some((t, _)) = points
        .iter()
        .rev()
        .find(|(t, _)| t.as_str() < from.as_str())
    {
        let r = repo
            .restore(&dir.join("rbefore"), &["--target-time", t])
            .await?;
        ensure!(!r.success(), "seed {seed}: restore to {t}, before the oldest retained backup ({from}), succeeded:\n{r}");
    }
    eprintln!(
        "retention seed {seed}: restored {} promised points and latest, row for row",
        picks.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_during_a_backup_leaves_the_backup_whole() -> Result<()> {
    let dir = TestDir::new("retention-concurrent")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    src.backup(&repo).await?;
    // Enough data that the next backup takes a while.
    db.batch_execute("CREATE TABLE bulk AS SELECT g, repeat(md5(g::text), 8) AS pad FROM generate_series(1, 400000) g")
        .await?;
    data::write_batch(&db, 2).await?;
    src.backup(&repo).await?;
    data::write_batch(&db, 3).await?;
    let orphan = plant_orphan_pack(&repo, "before")?;

    let pgdata = src.data.to_string_lossy().into_owned();
    let conninfo = src.conninfo();
    let url = repo.url.clone();
    let running = tokio::spawn(async move {
        tidemark(
            Tool::Agent,
            &[
                "backup",
                "--pgdata",
                &pgdata,
                "--repo",
                &url,
                "--pg-url",
                &conninfo,
                "--archive-timeout",
                "120",
                "--json",
                "--workers",
                "1",
            ],
            &[],
        )
        .await
    });
    // Wait until the running backup holds its lease.
    let locks = repo.path.join("locks");
    let started = std::time::Instant::now();
    loop {
        let held = std::fs::read_dir(&locks)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("backup-"))
            })
            .unwrap_or(false);
        if held {
            break;
        }
        ensure!(
            !running.is_finished(),
            "the backup finished before its lease was seen"
        );
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "no backup lease appeared within 60s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // retain-last 1 removes the first backup; with a backup in flight, packs and WAL must wait.
    let plan = expire(&repo, &["--retain-last".into(), "1".into()], &[]).await?;
    ensure!(
        plan["deferred"].is_string(),
        "expire did not defer pack and WAL deletion while a backup ran: {plan:#}"
    );
    ensure!(
        plan["packs"]["delete"]
            .as_array()
            .is_some_and(|d| d.is_empty()),
        "packs deleted during a backup: {plan:#}"
    );
    let r = running.await??;
    ensure!(
        r.success(),
        "the backup that ran during expire failed:\n{r}\n{}",
        src.log_tail()
    );
    let id = r.json()?["backup_id"]
        .as_str()
        .context("backup_id")?
        .to_string();
    check_ok(&repo, "after expire during a backup").await?;
    ensure!(
        repo.path.join(&orphan).exists(),
        "the orphan pack was deleted while a backup ran"
    );

    // With no backup running the next expire collects the orphan and the first backup's WAL.
    let plan = expire(&repo, &["--retain-last".into(), "1".into()], &[]).await?;
    ensure!(
        plan["deferred"].is_null(),
        "expire deferred with no backup running: {plan:#}"
    );
    ensure!(
        kept_ids(&plan) == [id.clone()],
        "expire kept {:?}, want [{id}]",
        kept_ids(&plan)
    );
    ensure!(
        !repo.path.join(&orphan).exists(),
        "the orphan pack survived an expire with grace 0: {plan:#}"
    );
    ensure!(
        plan["wal"]["delete"]
            .as_array()
            .is_some_and(|d| !d.is_empty()),
        "no WAL before the retained backup was deleted: {plan:#}"
    );
    check_ok(&repo, "after the second expire").await?;
    let counts = repo
        .restore_counts(&dir, "r", &["--target", "latest"])
        .await?;
    ensure!(
        counts == expected(3),
        "restore after expire during backup gave {counts:?}"
    );
    Ok(())
}

/// On a copy of `repo`: expire with `policy` killed at `step`; `check` must pass; `reruns` reruns
/// (dry run and real, agreeing) must pass `check` and leave exactly the keys `want` of as many
/// uninterrupted runs, and no lease. Returns the copy.
async fn kill_at_then_rerun(
    dir: &TestDir,
    repo: &Repo,
    policy: &[String],
    step: &str,
    reruns: usize,
    want: &[String],
) -> Result<Repo> {
    let path = dir.join(&format!("crash-{step}"));
    copy_dir(&repo.path, &path)?;
    let r = Repo {
        url: format!("file://{}", path.display()),
        path,
    };
    let mut args = vec!["expire", "--repo", &r.url, "--gc-grace", "0s"];
    args.extend(policy.iter().map(String::as_str));
    let run = tidemark(Tool::Agent, &args, &[("TIDEMARK_TEST_CRASH_AT", step)]).await?;
    ensure!(
        run.code() == Some(99),
        "expire did not stop at step {step}:\n{run}"
    );
    check_ok(&r, &format!("after expire was killed at {step}")).await?;
    // The rerun finds the dead process's lease stale, and ends where an uninterrupted run ends.
    for _ in 0..reruns {
        expire(&r, policy, &[])
            .await
            .with_context(|| format!("rerun after a crash at {step}"))?;
    }
    check_ok(&r, &format!("after the rerun following a crash at {step}")).await?;
    let got = data_keys(&r.path)?;
    ensure!(got == want, "after a crash at {step} and a rerun the repository differs from an uninterrupted expire:\n got {got:?}\nwant {want:?}");
    let leftovers: Vec<_> = std::fs::read_dir(r.path.join("locks"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(
        leftovers.is_empty(),
        "leases left after the rerun following {step}: {leftovers:?}"
    );
    Ok(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_killed_at_every_step_then_rerun() -> Result<()> {
    let dir = TestDir::new("retention-crash")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    for b in 1..=3 {
        data::write_batch(&db, b).await?;
        src.backup(&repo).await?;
        src.switch_wal_and_wait(&repo).await?;
    }
    plant_orphan_pack(&repo, "a")?;
    plant_orphan_pack(&repo, "b")?;
    drop(db);
    let info = repo.info().await?;
    ensure!(
        info["space"]["unreferenced_packs"] == 2,
        "info does not count the 2 orphan packs: {info:#}"
    );
    let policy = vec!["--retain-last".to_string(), "1".to_string()];

    // The reference: the same expire, uninterrupted, on a copy.
    let reference = Repo {
        path: dir.join("ref"),
        url: format!("file://{}", dir.join("ref").display()),
    };
    copy_dir(&repo.path, &reference.path)?;
    let plan = expire(&reference, &policy, &[]).await?;
    ensure!(
        plan["backups"].as_array().is_some_and(|b| b
            .iter()
            .filter(|x| x["action"] == "remove")
            .count()
            == 2)
            && plan["packs"]["delete"]
                .as_array()
                .is_some_and(|d| d.len() >= 2)
            && plan["wal"]["delete"]
                .as_array()
                .is_some_and(|d| !d.is_empty()),
        "the reference expire does not exercise every step: {plan:#}"
    );
    let want = data_keys(&reference.path)?;
    check_ok(&reference, "after the reference expire").await?;

    for step in [
        "leased",
        "manifest",
        "manifests",
        "condemned",
        "pack",
        "packs",
        "wal",
        "wals",
        "states",
    ] {
        let r = kill_at_then_rerun(&dir, &repo, &policy, step, 1, &want).await?;
        eprintln!("retention crash: killed at {step}, check passed, rerun matched the reference");
        if step != "pack" {
            std::fs::remove_dir_all(&r.path).ok();
        }
    }
    let crashed = Repo {
        path: dir.join("crash-pack"),
        url: format!("file://{}", dir.join("crash-pack").display()),
    };
    let counts = crashed
        .restore_counts(&dir, "r", &["--target", "latest"])
        .await?;
    ensure!(
        counts == expected(3),
        "restore after crash + rerun gave {counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_deleted_out_of_band_is_reported_and_stored_again() -> Result<()> {
    let dir = TestDir::new("retention-lostpack")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let first = src.backup(&repo).await?["backup_id"]
        .as_str()
        .context("id")?
        .to_string();
    // Delete the largest pack by hand: the first backup can no longer be restored.
    let (lost, _) = repo.packs()?.into_iter().next().context("no pack")?;
    std::fs::remove_file(&lost)?;
    let (ok, report) = check(&repo).await?;
    ensure!(!ok, "check passed with pack {} missing", lost.display());
    let problems = report["problems"].as_array().context("problems")?;
    ensure!(
        problems.iter().any(|p| p["backups"]
            .as_array()
            .is_some_and(|b| b.iter().any(|x| x == first.as_str()))),
        "check does not name backup {first} as affected: {report:#}"
    );
    data::write_batch(&db, 2).await?;
    let second = src.backup(&repo).await?["backup_id"]
        .as_str()
        .context("id")?
        .to_string();
    // The new backup stored the lost chunks again instead of trusting its parent's references.
    let (_, report) = check(&repo).await?;
    for p in report["problems"].as_array().context("problems")? {
        ensure!(
            !p["backups"]
                .as_array()
                .is_some_and(|b| b.iter().any(|x| x == second.as_str())),
            "the backup taken after the loss references the lost pack: {p}"
        );
    }
    src.switch_wal_and_wait(&repo).await?;
    let counts = repo
        .restore_counts(&dir, "r", &["--target", "latest"])
        .await?;
    ensure!(
        counts == expected(2),
        "restore of the backup after the loss gave {counts:?}"
    );
    // Expiring the broken backup leaves a repository that checks clean.
    let plan = expire(&repo, &["--retain-last".into(), "1".into()], &[]).await?;
    ensure!(
        kept_ids(&plan) == [second.clone()],
        "expire kept {:?}",
        kept_ids(&plan)
    );
    check_ok(&repo, "after expiring the broken backup").await?;
    let info = repo.info().await?;
    ensure!(
        info["space"]["unreferenced_packs"] == 0
            && info["space"]["dedup_ratio"]
                .as_f64()
                .is_some_and(|r| r > 0.0),
        "info after expire: {info:#}"
    );
    let windows = info["recoverable"].as_array().context("recoverable")?;
    ensure!(
        windows.len() == 1
            && windows[0]["from_backup"] == second.as_str()
            && windows[0]["from"] == plan["recoverable_from"],
        "info's recoverable window does not match the expire plan {}: {info:#}",
        plan["recoverable_from"]
    );
    Ok(())
}

/// Fills `bulk` with about 10 MiB (stored) of random hex, replacing what it held: a rewrite that
/// leaves the previous backup's packs mostly garbage.
async fn rewrite_bulk(db: &tokio_postgres::Client) -> Result<()> {
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS bulk (id int PRIMARY KEY, v text NOT NULL);
         TRUNCATE bulk;
         INSERT INTO bulk SELECT g, (SELECT string_agg(md5(random()::text || g.g || s.i), '') FROM generate_series(1, 24) AS s(i))
           FROM generate_series(1, 20000) g;
         CHECKPOINT;",
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot rewrite table bulk: {e:?}"))
}

async fn bulk_digest(db: &tokio_postgres::Client) -> Result<String> {
    let r = db
        .query_one("SELECT md5(string_agg(v, ',' ORDER BY id)) FROM bulk", &[])
        .await
        .context("cannot digest table bulk")?;
    Ok(r.get(0))
}

fn pack_bytes(repo: &Repo) -> Result<u64> {
    Ok(repo.packs()?.iter().map(|(_, n)| n).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repack_reclaims_mostly_garbage_packs_and_survives_kill_9() -> Result<()> {
    let dir = TestDir::new("retention-repack")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    rewrite_bulk(&db).await?;
    data::write_batch(&db, 1).await?;
    let first = src.backup(&repo).await?;
    // The table is rewritten: the first backup's pack now holds mostly chunks only it uses, plus
    // the catalog chunks the second backup deduplicated against.
    rewrite_bulk(&db).await?;
    data::write_batch(&db, 2).await?;
    src.backup(&repo).await?;
    data::write_batch(&db, 3).await?;
    src.switch_wal_and_wait(&repo).await?;
    let digest = bulk_digest(&db).await?;
    drop(db);
    let policy = vec!["--retain-last".to_string(), "1".to_string()];

    // The reference run on a copy; the crash runs below must end exactly where it ends.
    let reference = Repo {
        path: dir.join("ref"),
        url: format!("file://{}", dir.join("ref").display()),
    };
    copy_dir(&repo.path, &reference.path)?;
    let before = pack_bytes(&reference)?;
    let plan = expire(&reference, &policy, &[]).await?;
    let rp = &plan["repack"];
    let repacked: Vec<String> = rp["packs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_str().map(str::to_string))
        .collect();
    let live = rp["live_bytes"].as_u64().unwrap_or(0);
    let reclaim = rp["reclaim_bytes"].as_u64().unwrap_or(0);
    ensure!(
        !repacked.is_empty() && live > 0 && reclaim > live && rp["rewrite_manifests"].as_array().is_some_and(|m| m.len() == 1),
        "expected the first backup's mostly-garbage pack(s) to be repacked and the kept backup relocated: {plan:#}"
    );
    ensure!(
        plan["backups"][1]["id"] == first["backup_id"] && plan["backups"][1]["action"] == "remove",
        "the first backup should be removed: {plan:#}"
    );
    // The kept manifest names only packs that exist, none of the repacked ones; check reads
    // every chunk of it.
    let run = tidemark(
        Tool::Restore,
        &["check", "--repo", &reference.url, "--read-data", "--json"],
        &[],
    )
    .await?;
    let report = run.json_document().with_context(|| format!("{run}"))?;
    let ok = run.success() && report["chunks_read"].as_u64().is_some_and(|n| n > 0);
    ensure!(ok, "check --read-data failed after the repack: {report:#}");
    let manifests = reference.snapshot()?;
    for (k, bytes) in manifests.iter().filter(|(k, _)| k.starts_with("backups/")) {
        let m = tidemark_format::manifest::Manifest::decode(bytes)
            .with_context(|| format!("{k} does not decode after the repack"))?;
        for p in &m.packs {
            ensure!(
                !repacked.contains(&p.to_string()),
                "{k} still names repacked pack {p}"
            );
        }
    }
    // The old packs wait out the grace period; the next run deletes them and repacks nothing.
    let again = expire(&reference, &policy, &[]).await?;
    let deleted: Vec<String> = again["packs"]["delete"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    for p in &repacked {
        ensure!(
            deleted.contains(p),
            "the second expire did not delete repacked pack {p}: {again:#}"
        );
    }
    ensure!(
        again["repack"]["packs"]
            .as_array()
            .is_some_and(|p| p.is_empty()),
        "the second expire repacked again: {again:#}"
    );
    let after = pack_bytes(&reference)?;
    eprintln!(
        "repack: packs {before} bytes before, {after} after; copied {live} live bytes, plan said {reclaim} reclaimable"
    );
    // Freed at least what the plan promised, less the new packs' own index (48 bytes a chunk).
    ensure!(
        after + reclaim <= before + live / 8,
        "packs shrank from {before} to {after} bytes, the plan promised {reclaim}"
    );
    check_ok(&reference, "after the repacked packs were deleted").await?;
    let pgdata = dir.join("restored");
    reference
        .restore(&pgdata, &["--target", "latest"])
        .await?
        .ok()?;
    let server = start_restored(&dir, "restored-server", &pgdata).await?;
    let rdb = server.client().await?;
    ensure!(
        data::batch_counts(&rdb).await? == expected(3),
        "restore after the repack lost rows"
    );
    ensure!(
        bulk_digest(&rdb).await? == digest,
        "table bulk differs after a restore from repacked packs"
    );
    drop(rdb);
    drop(server);

    // With no budget nothing is repacked, and info shows what a repack would reclaim.
    let nobudget = Repo {
        path: dir.join("nobudget"),
        url: format!("file://{}", dir.join("nobudget").display()),
    };
    copy_dir(&repo.path, &nobudget.path)?;
    let mut off = policy.clone();
    off.extend(["--repack-budget".to_string(), "0".to_string()]);
    let plan0 = expire(&nobudget, &off, &[]).await?;
    ensure!(
        plan0["repack"]["packs"]
            .as_array()
            .is_some_and(|p| p.is_empty())
            && plan0["repack"]["over_budget"].as_u64() == Some(repacked.len() as u64),
        "--repack-budget 0 still repacked, or did not count the packs it left: {plan0:#}"
    );
    let info = nobudget.info().await?;
    let garbage = info["space"]["garbage_in_referenced_pack_bytes"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        info["space"]["mostly_garbage_packs"].as_u64() == Some(repacked.len() as u64)
            && garbage >= reclaim,
        "info does not show the garbage a repack would reclaim ({reclaim} bytes): {info:#}"
    );
    std::fs::remove_dir_all(&nobudget.path).ok();

    // kill -9 inside the repack: check passes; two reruns end where two uninterrupted runs ended
    // (one rerun may already delete the old packs: a crash after the manifests were relocated
    // leaves them unreferenced, and with --gc-grace 0s the rerun collects them at once).
    let want = data_keys(&reference.path)?;
    for step in ["packs", "repacked-packs", "relocated", "repacked"] {
        let r = kill_at_then_rerun(&dir, &repo, &policy, step, 2, &want).await?;
        eprintln!("repack crash: killed at {step}, check passed, rerun matched the reference");
        std::fs::remove_dir_all(&r.path).ok();
    }
    Ok(())
}
