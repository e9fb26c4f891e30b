//! The robustness engine (issue 15.5; kopia's robustness tests are the model): a seeded random
//! sequence of operations against one source server archiving through the sidecar into one
//! repository, checked against a ledger of acknowledged commits.
//!
//! Operations: ledger writes (inserts, updates, deletes, a table rewrite), base backups of either
//! source (some SIGKILLed at a random moment), expire with a random policy (some SIGKILLed),
//! `check` after every expire, a WAL switch, kill -9 of the sidecar or of an archive_command
//! in flight, a graceful sidecar restart, and restores (some SIGKILLed and rerun) to a random
//! acknowledged moment, started and compared with what the ledger acknowledged at that moment.
//!
//! Invariants checked:
//! - Every restore to an acknowledged moment the repository promises (after the oldest listed
//!   backup's stop) brings back exactly the ledger acknowledged then: row count, sums and an md5
//!   over every row.
//! - A backup that was killed is never listed; a backup that exited 0 is listed until expired.
//! - `check` passes after every expire, killed or not.
//!
//! `TIDEMARK_ROBUSTNESS_SEED` (default: a fixed seed, so CI is repeatable) and
//! `TIDEMARK_ROBUSTNESS_STEPS` (default 40) choose the run; `bench/robustness.sh` runs long ones.
//! The seed and the step log are printed on failure.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidemark_e2e::env::{tidemark, tidemark_killed_after, Run, Tool};
use tidemark_e2e::rng::Rng;
use tidemark_e2e::sidecar::{start_handoff_archiving, Sidecar, SidecarConfig};
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};
use tokio_postgres::Client;

const DEFAULT_SEED: u64 = 0x5eed_0015;
const DEFAULT_STEPS: u64 = 40;

/// What the ledger held: row count, sum of ids, sum of versions, md5 over every row in id order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Digest {
    rows: i64,
    ids: i64,
    versions: i64,
    md5: String,
}

/// An acknowledged moment: the server clock read after a commit returned and before the next.
#[derive(Clone, Debug)]
struct Point {
    at: String,
    digest: Digest,
}

#[derive(Default, Debug)]
struct Stats {
    steps: u64,
    writes: u64,
    backups: u64,
    backups_killed: u64,
    expires: u64,
    expires_killed: u64,
    checks: u64,
    sidecar_kills: u64,
    sidecar_restarts: u64,
    wal_push_kills: u64,
    restores_checked: u64,
    restores_killed: u64,
    wal_fetch_kills: u64,
}

struct Engine {
    seed: u64,
    rng: Rng,
    dir: TestDir,
    repo: Repo,
    src: PgCluster,
    db: Client,
    sidecar: Sidecar,
    points: Vec<Point>,
    /// Backups whose command exited 0 and that no expire has removed yet.
    acknowledged: BTreeSet<String>,
    log: Vec<String>,
    stats: Stats,
    restores: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_never_lose_an_acknowledged_commit() -> Result<()> {
    let seed = std::env::var("TIDEMARK_ROBUSTNESS_SEED")
        .ok()
        .and_then(|s| parse_seed(&s))
        .unwrap_or(DEFAULT_SEED);
    let steps = std::env::var("TIDEMARK_ROBUSTNESS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_STEPS);
    let mut e = Engine::start(seed).await?;
    let outcome = e.run(steps).await;
    let summary = format!("robustness seed {seed:#x}, {steps} steps: {:?}", e.stats);
    eprintln!("{summary}");
    if let Err(err) = outcome {
        bail!(
            "{err:#}\n{summary}\nrerun with TIDEMARK_ROBUSTNESS_SEED={seed:#x} TIDEMARK_ROBUSTNESS_STEPS={steps}\nsteps:\n  {}\nsidecar log tail:\n{}\nsource log tail:\n{}",
            e.log.join("\n  "),
            e.sidecar.log_tail(30),
            e.src.log_tail()
        );
    }
    ensure!(
        e.stats.restores_checked >= 1,
        "the run checked no restore: {summary}"
    );
    Ok(())
}

fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// One committed transaction on the ledger chosen by `rng`; returns its SQL (shortened) and the
/// acknowledged moment after it: the server clock read after the commit returned, with the
/// ledger's digest then. The caller makes sure no other session writes the ledger meanwhile.
async fn ledger_write(db: &Client, rng: &mut Rng) -> Result<(String, Point)> {
    let next: i64 = db
        .query_one("SELECT coalesce(max(id), 0) + 1 FROM ledger", &[])
        .await?
        .get(0);
    let sql = match rng.below(10) {
        0..=4 => {
            let n = 1 + rng.below(200) as i64;
            format!("INSERT INTO ledger (id, v, pad) SELECT g, 0, md5(g::text) FROM generate_series({next}, {}) g", next + n - 1)
        }
        5 => {
            // A bulk insert: megabytes of WAL in one commit.
            let n = 5_000 + rng.below(10_000) as i64;
            format!("INSERT INTO ledger (id, v, pad) SELECT g, 0, repeat(md5(g::text), 4) FROM generate_series({next}, {}) g", next + n - 1)
        }
        6 | 7 => {
            let from = 1 + rng.below(next as u64) as i64;
            let n = 1 + rng.below(500) as i64;
            format!(
                "UPDATE ledger SET v = v + 1, committed_at = now() WHERE id BETWEEN {from} AND {}",
                from + n
            )
        }
        8 => {
            let from = 1 + rng.below(next as u64) as i64;
            let n = 1 + rng.below(2_000) as i64;
            format!("DELETE FROM ledger WHERE id BETWEEN {from} AND {}", from + n)
        }
        // A rewrite: every file of the table is replaced; or a truncated side table.
        _ if rng.chance(50) => "VACUUM FULL ledger".to_string(),
        _ => "INSERT INTO churn (pad) SELECT repeat('x', 500) FROM generate_series(1, 2000); TRUNCATE churn".to_string(),
    };
    db.batch_execute(&sql)
        .await
        .with_context(|| format!("cannot run {sql}"))?;
    let digest = Engine::digest(db).await?;
    let at = tidemark_e2e::data::server_time_rfc3339(db).await?;
    Ok((sql.chars().take(60).collect(), Point { at, digest }))
}

impl Engine {
    async fn start(seed: u64) -> Result<Engine> {
        let dir = TestDir::new(&format!("robustness-{seed:x}"))?;
        let repo = Repo::create(&dir, "repo")?;
        let cfg = SidecarConfig::new(&dir, "sidecar", &repo.url, &dir.join("src/data"))?;
        let src = start_handoff_archiving(&dir, "src", &repo.url, &cfg.socket_dir, &[]).await?;
        let sidecar = Sidecar::start(cfg).await?;
        let db = src.client().await?;
        db.batch_execute(
            "CREATE TABLE ledger (id bigint PRIMARY KEY, v bigint NOT NULL, committed_at timestamptz NOT NULL DEFAULT now(), pad text NOT NULL);
             CREATE TABLE churn (id bigserial PRIMARY KEY, pad text NOT NULL)",
        )
        .await
        .context("cannot create the ledger")?;
        Ok(Engine {
            seed,
            rng: Rng(seed | 1),
            dir,
            repo,
            src,
            db,
            sidecar,
            points: Vec::new(),
            acknowledged: BTreeSet::new(),
            log: Vec::new(),
            stats: Stats::default(),
            restores: 0,
        })
    }

    async fn run(&mut self, steps: u64) -> Result<()> {
        // Something to restore from the start: a write and a backup.
        // (The first archived segment creates the repository.)
        self.write().await?;
        self.switch_wal().await?;
        self.backup(false).await?;
        for step in 0..steps {
            self.stats.steps = step + 1;
            let op = self.rng.below(100);
            let r = match op {
                0..=39 => self.write().await,
                40..=51 => {
                    let kill = self.rng.chance(35);
                    self.backup(kill).await
                }
                52..=61 => {
                    let kill = self.rng.chance(35);
                    self.expire(kill).await
                }
                62..=66 => self.switch_wal().await,
                67..=71 => self.kill_sidecar().await,
                72..=74 => self.restart_sidecar().await,
                75..=79 => self.kill_wal_push().await,
                _ => {
                    let kill = self.rng.chance(25);
                    self.restore_and_compare(kill).await
                }
            };
            r.with_context(|| {
                format!("step {} ({})", step + 1, self.log.last().map_or("", |s| s))
            })?;
        }
        // The end: the newest moment and `latest`.
        self.restore_and_compare(false).await?;
        self.restore_latest().await
    }

    fn note(&mut self, s: String) {
        eprintln!("robustness {:#x}: {s}", self.seed);
        self.log.push(s);
    }

    async fn digest(db: &Client) -> Result<Digest> {
        let r = db
            .query_one(
                "SELECT count(*), coalesce(sum(id), 0)::bigint, coalesce(sum(v), 0)::bigint,
                        md5(coalesce(string_agg(id::text || ':' || v::text || ':' || pad, ',' ORDER BY id), ''))
                 FROM ledger",
                &[],
            )
            .await
            .context("cannot digest the ledger")?;
        Ok(Digest {
            rows: r.get(0),
            ids: r.get(1),
            versions: r.get(2),
            md5: r.get(3),
        })
    }

    /// One committed transaction on the ledger, then the acknowledged moment after it.
    async fn write(&mut self) -> Result<()> {
        let (sql, point) = ledger_write(&self.db, &mut self.rng).await?;
        self.stats.writes += 1;
        let rows = point.digest.rows;
        self.points.push(point);
        self.note(format!("write: {sql} → {rows} rows"));
        Ok(())
    }

    async fn backup(&mut self, kill: bool) -> Result<()> {
        let replication = self.rng.chance(50);
        let kill_after = kill.then(|| Duration::from_millis(50 + self.rng.below(2500)));
        let data = self.src.data.to_string_lossy().into_owned();
        let conninfo = self.src.conninfo();
        let port = self.src.port().to_string();
        let mut args = vec![
            "backup",
            "--repo",
            &self.repo.url,
            "--archive-timeout",
            "120",
            "--json",
        ];
        let mut env: Vec<(&str, &str)> = Vec::new();
        if replication {
            args.extend(["--source", "replication"]);
            env.extend([
                ("PGHOST", "127.0.0.1"),
                ("PGPORT", port.as_str()),
                ("PGUSER", "postgres"),
                ("PGDATABASE", "postgres"),
            ]);
        } else {
            args.extend(["--pgdata", &data, "--pg-url", &conninfo]);
        }
        let before = self.listed().await?;
        // Ledger writes go on while the backup copies (torn pages, files replaced under it).
        let writer = self.src.client().await?;
        let mut wrng = Rng(self.rng.next_u64() | 1);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let load = tokio::spawn(async move {
            let mut points = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                points.push(ledger_write(&writer, &mut wrng).await?.1);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            Ok::<_, anyhow::Error>(points)
        });
        let run = tidemark_killed_after(Tool::Agent, &args, &env, kill_after).await;
        stop.store(true, Ordering::SeqCst);
        let during = load
            .await?
            .context("the ledger writes during the backup failed")?;
        let run = run?;
        let writes = during.len();
        self.stats.writes += writes as u64;
        self.points.extend(during);
        let after = self.listed().await?;
        let new: Vec<String> = after.difference(&before).cloned().collect();
        let source = if replication { "replication" } else { "pgdata" };
        match run.code() {
            Some(0) => {
                let id = run.json()?["backup_id"]
                    .as_str()
                    .context("backup --json printed no backup_id")?
                    .to_string();
                ensure!(
                    new == [id.clone()],
                    "backup {id} exited 0 but the listing gained {new:?}"
                );
                self.acknowledged.insert(id.clone());
                self.stats.backups += 1;
                self.note(format!(
                    "backup ({source}) {id}, {writes} ledger writes during it"
                ));
            }
            None => {
                ensure!(
                    new.is_empty(),
                    "a backup killed after {kill_after:?} is listed: {new:?}\n{run}"
                );
                self.stats.backups_killed += 1;
                self.note(format!(
                    "backup ({source}) killed after {kill_after:?}, {writes} ledger writes during it"
                ));
            }
            Some(_) => bail!("backup ({source}) failed:\n{run}"),
        }
        Ok(())
    }

    /// The backup ids `info` lists.
    async fn listed(&self) -> Result<BTreeSet<String>> {
        let info = self.repo.info().await?;
        Ok(info["backups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["id"].as_str().map(str::to_string))
            .collect())
    }

    async fn expire(&mut self, kill: bool) -> Result<()> {
        let policy: Vec<String> = match self.rng.below(3) {
            0 => vec!["--retain-last".into(), (1 + self.rng.below(3)).to_string()],
            1 => vec![
                "--retain-window".into(),
                format!("{}s", 2 + self.rng.below(20)),
            ],
            _ => vec![
                "--retain-daily".into(),
                "1".into(),
                "--retain-last".into(),
                (1 + self.rng.below(2)).to_string(),
            ],
        };
        let grace = if self.rng.chance(70) { "0s" } else { "1h" };
        let mut args: Vec<&str> = vec![
            "expire",
            "--repo",
            &self.repo.url,
            "--json",
            "--gc-grace",
            grace,
        ];
        args.extend(policy.iter().map(String::as_str));
        let kill_after = kill.then(|| Duration::from_millis(5 + self.rng.below(200)));
        let before = self.listed().await?;
        let run = tidemark_killed_after(Tool::Agent, &args, &[], kill_after).await?;
        let after = self.listed().await?;
        ensure!(
            after.is_subset(&before),
            "expire added backups: before {before:?}, after {after:?}"
        );
        match run.code() {
            Some(0) => {
                self.stats.expires += 1;
                self.note(format!(
                    "expire {policy:?} grace {grace}: {} → {} backups",
                    before.len(),
                    after.len()
                ));
            }
            None => {
                self.stats.expires_killed += 1;
                self.note(format!(
                    "expire {policy:?} killed after {kill_after:?}: {} → {} backups",
                    before.len(),
                    after.len()
                ));
            }
            // Another expire's lease may still look alive after a kill: refused, not failed.
            Some(_) if run.stderr.contains("lease") => {
                self.note(format!("expire {policy:?} refused: a lease is held"));
            }
            Some(_) => bail!("expire failed:\n{run}"),
        }
        for gone in before.difference(&after) {
            self.acknowledged.remove(gone);
        }
        ensure!(
            self.acknowledged.is_subset(&after),
            "acknowledged backups {:?} are not all listed: {after:?}",
            self.acknowledged
        );
        self.check().await
    }

    async fn check(&mut self) -> Result<()> {
        let r = tidemark(
            Tool::Restore,
            &["check", "--repo", &self.repo.url, "--json"],
            &[],
        )
        .await?;
        ensure!(r.success(), "check failed:\n{r}");
        self.stats.checks += 1;
        Ok(())
    }

    async fn switch_wal(&mut self) -> Result<()> {
        let seg = self.src.switch_wal_and_wait(&self.repo).await?;
        self.note(format!("switch wal: {seg} archived"));
        Ok(())
    }

    async fn kill_sidecar(&mut self) -> Result<()> {
        // A write in flight so the sidecar has something to lose.
        let writer = self.src.client().await?;
        let load = tokio::spawn(async move {
            writer
                .batch_execute("INSERT INTO churn (pad) SELECT repeat('y', 500) FROM generate_series(1, 20000); SELECT pg_switch_wal()")
                .await
        });
        tokio::time::sleep(Duration::from_millis(self.rng.below(400))).await;
        self.sidecar.kill9().await?;
        load.await?
            .context("the load during the sidecar kill failed")?;
        self.sidecar.restart().await?;
        self.stats.sidecar_kills += 1;
        self.note("kill -9 sidecar, restarted".into());
        Ok(())
    }

    async fn restart_sidecar(&mut self) -> Result<()> {
        self.sidecar.sigterm()?;
        let st = self.sidecar.wait_exit(Duration::from_secs(60)).await?;
        ensure!(st.success(), "the sidecar exited {st} on SIGTERM");
        self.sidecar.restart().await?;
        self.stats.sidecar_restarts += 1;
        self.note("sidecar stopped (SIGTERM) and started".into());
        Ok(())
    }

    /// Kills every `wal-push` of this repository that runs while several segments are archived.
    async fn kill_wal_push(&mut self) -> Result<()> {
        let writer = self.src.client().await?;
        let load = tokio::spawn(async move {
            for _ in 0..4 {
                writer
                    .batch_execute("INSERT INTO churn (pad) SELECT repeat('z', 500) FROM generate_series(1, 5000); SELECT pg_switch_wal()")
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        });
        let pattern = format!("wal-push --repo {}", self.repo.url);
        let mut killed = 0;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(20 + self.rng.below(60))).await;
            let st = std::process::Command::new("pkill")
                .args(["-KILL", "-f", &pattern])
                .status()
                .context("cannot run pkill")?;
            if st.success() {
                killed += 1;
            }
        }
        load.await?
            .context("the load during the wal-push kills failed")?;
        self.stats.wal_push_kills += killed;
        self.note(format!(
            "kill -9 archive_command: {killed} kill rounds hit one"
        ));
        Ok(())
    }

    /// The moments a restore must reach: after the oldest listed backup stopped, and before the
    /// last commit that is archived (recovery to a time past the archive's last commit cannot
    /// know it arrived).
    async fn promised(&self) -> Result<Vec<Point>> {
        let info = self.repo.info().await?;
        let oldest_stop = info["backups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["stop_time"].as_str())
            .min()
            .map(str::to_string);
        let Some(oldest_stop) = oldest_stop else {
            return Ok(Vec::new());
        };
        Ok(self
            .points
            .iter()
            .filter(|p| p.at.as_str() > oldest_stop.as_str())
            .cloned()
            .collect())
    }

    async fn restore_and_compare(&mut self, kill: bool) -> Result<()> {
        // A commit after every recorded moment, archived, so each is bounded by a later commit.
        self.db
            .batch_execute("INSERT INTO churn (pad) VALUES ('bound')")
            .await?;
        self.src.switch_wal_and_wait(&self.repo).await?;
        let promised = self.promised().await?;
        if promised.is_empty() {
            self.note("restore: no promised moment yet".into());
            return Ok(());
        }
        // The newest moment half the time (the hardest: nothing after it but the bound),
        // otherwise any.
        let pick = if self.rng.chance(50) {
            promised.len() - 1
        } else {
            self.rng.below(promised.len() as u64) as usize
        };
        let point = promised[pick].clone();
        let target = ["--target-time", point.at.as_str()];
        self.restore_check(&target, &point.digest, kill).await?;
        self.note(format!(
            "restore to {} ({} of {} promised) exact: {} rows",
            point.at,
            pick + 1,
            promised.len(),
            point.digest.rows
        ));
        Ok(())
    }

    async fn restore_latest(&mut self) -> Result<()> {
        self.src.switch_wal_and_wait(&self.repo).await?;
        let want = Engine::digest(&self.db).await?;
        self.restore_check(&["--target", "latest"], &want, false)
            .await?;
        self.note(format!("restore latest exact: {} rows", want.rows));
        Ok(())
    }

    async fn restore_check(&mut self, target: &[&str], want: &Digest, kill: bool) -> Result<()> {
        self.restores += 1;
        let pgdata = self.dir.join(&format!("restore-{}", self.restores));
        if kill {
            // Killed first, into another directory; the rerun starts afresh.
            let killed_dir = self.dir.join(&format!("restore-{}-killed", self.restores));
            let after = Duration::from_millis(50 + self.rng.below(1500));
            let run = self.restore_run(&killed_dir, target, Some(after)).await?;
            if run.code().is_none() {
                self.stats.restores_killed += 1;
            }
            std::fs::remove_dir_all(&killed_dir).ok();
        }
        self.restore_run(&pgdata, target, None).await?.ok()?;
        // Sometimes restore_command (wal-fetch, with its prefetch spool) is SIGKILLed during
        // recovery: PostgreSQL stops (a signalled restore_command is fatal) and is started again.
        let fetch_kills = Arc::new(AtomicU64::new(0));
        let killer = self.rng.chance(30).then(|| {
            let hits = fetch_kills.clone();
            let pattern = format!("wal-fetch .*--repo {}", self.repo.url);
            let pause = Duration::from_millis(100 + self.rng.below(700));
            tokio::spawn(async move {
                for _ in 0..40 {
                    tokio::time::sleep(pause / 4).await;
                    let hit = std::process::Command::new("pkill")
                        .args(["-KILL", "-f", &pattern])
                        .status()
                        .is_ok_and(|st| st.success());
                    if hit {
                        if hits.fetch_add(1, Ordering::SeqCst) == 1 {
                            break;
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
            })
        });
        let mut attempt = 0;
        let server = loop {
            attempt += 1;
            let name = format!("restored-{}-{attempt}", self.restores);
            match start_restored(&self.dir, &name, &pgdata).await {
                Ok(server) => break server,
                Err(e) if killer.is_some() && attempt < 6 => {
                    self.note(format!(
                        "restored server stopped (wal-fetch killed), started again: {:.80}",
                        format!("{e:#}").lines().next().unwrap_or("")
                    ));
                }
                Err(e) => return Err(e),
            }
        };
        if let Some(k) = killer {
            k.abort();
        }
        self.stats.wal_fetch_kills += fetch_kills.load(Ordering::SeqCst);
        let db = server.client().await?;
        let got = Engine::digest(&db).await?;
        drop(db);
        drop(server);
        ensure!(
            &got == want,
            "restore {target:?} gave {got:?}, the ledger acknowledged {want:?}"
        );
        std::fs::remove_dir_all(&pgdata).ok();
        self.stats.restores_checked += 1;
        Ok(())
    }

    async fn restore_run(
        &self,
        pgdata: &std::path::Path,
        target: &[&str],
        kill_after: Option<Duration>,
    ) -> Result<Run> {
        let pgdata = pgdata.to_string_lossy().into_owned();
        let mut args = vec!["restore", "--pgdata", &pgdata, "--repo", &self.repo.url];
        args.extend_from_slice(target);
        tidemark_killed_after(Tool::Restore, &args, &[], kill_after).await
    }
}
