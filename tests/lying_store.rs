//! Stores that lie (issue 15.2), end to end against a real S3-compatible server (moto) behind
//! the lying proxy (`tidemark_e2e::lying`) and a real PostgreSQL 15:
//! - a PUT answered 200 but never stored, or stored short, is never acknowledged (wal-push,
//!   backup), and what a retry stores is whole, even over a short copy a dead writer left;
//! - a short or empty GET never leaves a partial file at %p nor a restore that looks done, and
//!   `check --read-data` names the backups a pack cut behind tidemark's back breaks, while the
//!   next backup stores that pack's chunks again instead of trusting it for existing;
//! - a versioned bucket (delete markers) and a LIST lagging behind PUT, with a non-zero
//!   `--gc-grace`: nothing younger than the grace is deleted and the catalog stays consistent;
//! - an expire stopped (SIGSTOP) past its lease TTL deletes nothing once it runs again, and a
//!   backup that started meanwhile is whole.

use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tidemark_e2e::cluster::shell_word;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::env::{self, give_to_db_user};
use tidemark_e2e::lying::{LyingProxy, PutLie};
use tidemark_e2e::sidecar::{
    archiver_stats, env_prefix, prefix_restore_command, switch_wal, tidemark_with_env,
    wait_archived, Moto,
};
use tidemark_e2e::{start_restored, PgCluster, TestDir, Tool};

const PREFIX: &str = "repo";

/// moto, the lying proxy in front of it, and the environments that reach the repository
/// through the proxy (`lying`) or straight (`direct`, the truth).
struct Lab {
    dir: TestDir,
    moto: Moto,
    proxy: LyingProxy,
    bucket: String,
    url: String,
    lying: Vec<(String, String)>,
    direct: Vec<(String, String)>,
}

impl Lab {
    async fn start(test: &str) -> Result<Lab> {
        let dir = TestDir::new(test)?;
        let bucket = format!("tidemark-{test}");
        let moto = Moto::start(&bucket).await?;
        let proxy = LyingProxy::start(moto.endpoint.trim_start_matches("http://")).await?;
        let direct = moto.aws_env();
        let mut lying: Vec<(String, String)> = direct
            .iter()
            .filter(|(k, _)| k != "AWS_ENDPOINT_URL")
            .cloned()
            .collect();
        lying.push(("AWS_ENDPOINT_URL".into(), proxy.endpoint.clone()));
        Ok(Lab {
            url: format!("s3://{bucket}/{PREFIX}"),
            dir,
            moto,
            proxy,
            bucket,
            lying,
            direct,
        })
    }

    /// A source server whose archive_command is `wal-push` through the proxy, with the
    /// `batches` table.
    async fn source(&self, name: &str) -> Result<(PgCluster, tokio_postgres::Client)> {
        let mut c = PgCluster::initdb(&self.dir, name).await?;
        let agent = env::bins()?.agent;
        let archive_command = format!(
            "{}{} wal-push --repo {} %p",
            env_prefix(&self.lying),
            shell_word(&agent.to_string_lossy()),
            shell_word(&self.url)
        );
        c.start_with_archive_command(&archive_command).await?;
        let db = c.client().await?;
        data::create_table(&db).await?;
        Ok((c, db))
    }

    /// Runs a tidemark binary through the proxy (`lying`) or straight to moto, with `extra`
    /// environment.
    async fn run(
        &self,
        tool: Tool,
        args: &[&str],
        through_proxy: bool,
        extra: &[(&str, &str)],
    ) -> Result<env::Run> {
        let mut e = if through_proxy {
            self.lying.clone()
        } else {
            self.direct.clone()
        };
        e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        tidemark_with_env(tool, args, &e).await
    }

    /// `backup --pgdata --json` of `src` through the proxy, not checked.
    async fn backup(&self, src: &PgCluster, extra: &[(&str, &str)]) -> Result<env::Run> {
        let data = src.data.to_string_lossy().into_owned();
        let conninfo = src.conninfo();
        self.run(
            Tool::Agent,
            &[
                "backup",
                "--pgdata",
                &data,
                "--repo",
                &self.url,
                "--pg-url",
                &conninfo,
                "--archive-timeout",
                "120",
                "--json",
            ],
            true,
            extra,
        )
        .await
    }

    /// A backup that must succeed; returns its id.
    async fn backup_ok(&self, src: &PgCluster) -> Result<String> {
        let r = self.backup(src, &[]).await?;
        ensure!(r.success(), "backup failed:\n{r}\n{}", src.log_tail());
        Ok(r.json()?["backup_id"]
            .as_str()
            .context("backup --json printed no backup_id")?
            .to_string())
    }

    /// One S3 call straight to moto ([`Moto::s3`]), with keys relative to the repository
    /// prefix.
    async fn s3(&self, op: &str, key: &str, body: &[u8]) -> Result<Vec<u8>> {
        self.moto
            .s3(op, &self.bucket, &format!("{PREFIX}/{key}"), body)
            .await
    }

    /// The objects below `prefix` as moto holds them: key (relative to the repository) → size.
    async fn objects(&self, prefix: &str) -> Result<BTreeMap<String, u64>> {
        let out = self.s3("list", prefix, b"").await?;
        let mut m = BTreeMap::new();
        for l in String::from_utf8_lossy(&out).lines() {
            let (k, s) = l.rsplit_once(' ').context("bad list line")?;
            let k = k.strip_prefix(&format!("{PREFIX}/")).unwrap_or(k);
            m.insert(k.to_string(), s.parse()?);
        }
        Ok(m)
    }

    /// Replaces the stored object `key` by its first `keep` bytes, behind tidemark's back.
    async fn cut(&self, key: &str, keep: usize) -> Result<()> {
        let whole = self.s3("get", key, b"").await?;
        ensure!(whole.len() > keep, "{key} is only {} bytes", whole.len());
        self.s3("put", key, &whole[..keep]).await?;
        Ok(())
    }

    /// Restores into `<dir>/<name>` (straight to moto), starts the server with restore_command
    /// through the same environment and returns it.
    async fn restore_and_start(&self, name: &str, args: &[&str]) -> Result<PgCluster> {
        let pgdata = self.dir.join(name);
        let p = pgdata.to_string_lossy().into_owned();
        let mut a = vec!["restore", "--pgdata", &p, "--repo", &self.url];
        a.extend_from_slice(args);
        let r = self.run(Tool::Restore, &a, false, &[]).await?;
        ensure!(r.success(), "restore {args:?} failed:\n{r}");
        prefix_restore_command(&pgdata, &self.direct)?;
        start_restored(&self.dir, &format!("{name}-server"), &pgdata).await
    }
}

fn expected(batches: std::ops::RangeInclusive<i32>) -> BTreeMap<i32, i64> {
    batches.map(|b| (b, BATCH_ROWS)).collect()
}

async fn assert_rows(server: &PgCluster, batches: std::ops::RangeInclusive<i32>) -> Result<()> {
    let db = server.client().await?;
    let counts = data::batch_counts(&db).await?;
    ensure!(
        counts == expected(batches.clone()),
        "restored server {}: rows per batch {counts:?}, want batches {batches:?}\n{}",
        server.name,
        server.log_tail()
    );
    Ok(())
}

/// Waits until PostgreSQL reports a failed archive_command run for `seg` after `failed_before`
/// failures.
async fn wait_archive_failure(
    db: &tokio_postgres::Client,
    seg: &str,
    failed_before: i64,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let (_, _, failed, last_failed) = archiver_stats(db).await?;
        if failed > failed_before && last_failed.as_deref() == Some(seg) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("PostgreSQL saw no failed archiving of {seg}: failures {failed}, last failed {last_failed:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Copies `pg_wal/<seg>` of `src` into the scratch directory (readable by the database user).
fn keep_segment(lab: &Lab, src: &PgCluster, seg: &str) -> Result<std::path::PathBuf> {
    let to = lab.dir.mkdir(&format!("kept-{seg}"))?.join(seg);
    std::fs::copy(src.data.join("pg_wal").join(seg), &to)
        .with_context(|| format!("cannot copy {seg} out of pg_wal"))?;
    give_to_db_user(&to)?;
    Ok(to)
}

/// `wal-fetch seg` straight from moto into a fresh file: the fetched bytes must be `want`.
async fn fetch_is(lab: &Lab, seg: &str, want: &[u8]) -> Result<()> {
    let dest = lab.dir.join(&format!("fetched-{seg}-{}", want.len()));
    let d = dest.to_string_lossy().into_owned();
    let r = lab
        .run(
            Tool::Restore,
            &["wal-fetch", seg, &d, "--repo", &lab.url, "--prefetch", "0"],
            false,
            &[],
        )
        .await?;
    ensure!(
        r.success(),
        "wal-fetch {seg} of what was archived failed:\n{r}"
    );
    let got = std::fs::read(&dest)?;
    ensure!(
        got == want,
        "wal-fetch {seg} returned other bytes than the segment"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_puts_are_never_acknowledged_and_retries_store_whole_objects() -> Result<()> {
    let lab = Lab::start("lying-puts").await?;
    let (src, db) = lab.source("src").await?;
    data::write_batch(&db, 1).await?;
    let first = switch_wal(&db).await?;
    wait_archived(&db, &first, Duration::from_secs(60)).await?;

    // wal-push under each lie: PostgreSQL's archiver is never told the segment is stored.
    let mut batch = 1;
    for lie in [PutLie::Drop, PutLie::Truncate { keep: 100 }] {
        let before = lab.proxy.counts();
        let (_, _, failed_before, _) = archiver_stats(&db).await?;
        lab.proxy.lie_to_puts(lie, "/wal/", u64::MAX);
        batch += 1;
        data::write_batch(&db, batch).await?;
        let seg = switch_wal(&db).await?;
        let kept = keep_segment(&lab, &src, &seg)?;
        wait_archive_failure(&db, &seg, failed_before).await?;
        let (_, last, _, _) = archiver_stats(&db).await?;
        ensure!(
            last.as_deref().is_some_and(|l| l < seg.as_str()),
            "{lie:?}: PostgreSQL was told {seg} is archived (last archived {last:?})"
        );
        let after = lab.proxy.counts();
        ensure!(
            after != before,
            "{lie:?}: the proxy told no lie ({after:?})"
        );
        let stored = lab.objects("wal/").await?;
        ensure!(
            !stored.keys().any(|k| k.contains(&seg)),
            "{lie:?}: a copy of {seg} stays in the store after the failed upload: {stored:?}"
        );
        lab.proxy.truth();
        // A new segment wakes the archiver, which retries and stores the truth.
        let next = switch_wal(&db).await?;
        wait_archived(&db, &next, Duration::from_secs(120))
            .await
            .with_context(|| src.log_tail())?;
        fetch_is(&lab, &seg, &std::fs::read(&kept)?).await?;
    }

    // A short copy a writer left behind (it died before removing it): the header is intact and
    // names the segment's digest. A wal-push of the segment must not take it for the segment.
    batch += 1;
    data::write_batch(&db, batch).await?;
    let seg = switch_wal(&db).await?;
    let kept = keep_segment(&lab, &src, &seg)?;
    wait_archived(&db, &seg, Duration::from_secs(60)).await?;
    let stored_key = lab
        .objects("wal/")
        .await?
        .into_keys()
        .find(|k| k.ends_with(&format!("/{seg}")))
        .with_context(|| format!("{seg} is not in the store"))?;
    lab.cut(&stored_key, 200).await?;
    let k = kept.to_string_lossy().into_owned();
    let r = lab
        .run(
            Tool::Agent,
            &["wal-push", &k, "--repo", &lab.url],
            true,
            &[],
        )
        .await?;
    ensure!(r.success(), "wal-push over a short copy failed:\n{r}");
    ensure!(
        r.stderr.contains("damaged"),
        "wal-push did not say the stored copy was damaged:\n{r}"
    );
    fetch_is(&lab, &seg, &std::fs::read(&kept)?).await?;

    // Backups under each lie on their packs: the backup fails, no manifest is written, and no
    // short pack is left behind.
    for lie in [PutLie::Truncate { keep: 1000 }, PutLie::Drop] {
        let before = lab.proxy.counts();
        lab.proxy.lie_to_puts(lie, "/packs/", 1);
        let r = lab.backup(&src, &[]).await?;
        lab.proxy.truth();
        ensure!(
            lab.proxy.counts() != before,
            "{lie:?}: the proxy told no lie to the backup"
        );
        ensure!(
            !r.success(),
            "{lie:?}: a backup over a lying store succeeded:\n{r}"
        );
        let manifests = lab.objects("backups/").await?;
        ensure!(
            manifests.is_empty(),
            "{lie:?}: the failed backup wrote a manifest: {manifests:?}"
        );
        let packs = lab.objects("packs/").await?;
        ensure!(
            !packs.values().any(|s| *s == 1000),
            "{lie:?}: a short pack stays in the store: {packs:?}"
        );
    }
    let b1 = lab.backup_ok(&src).await?;
    batch += 1;
    data::write_batch(&db, batch).await?;
    let last = switch_wal(&db).await?;
    wait_archived(&db, &last, Duration::from_secs(60)).await?;
    let server = lab
        .restore_and_start("restored", &["--target", "latest"])
        .await?;
    assert_rows(&server, 1..=batch).await?;
    let r = lab
        .run(
            Tool::Restore,
            &["check", "--repo", &lab.url, "--read-data"],
            false,
            &[],
        )
        .await?;
    ensure!(r.success(), "check after the lies failed:\n{r}");
    eprintln!(
        "lying-puts: backup {b1}; lies told {:?}",
        lab.proxy.counts()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_gets_never_reach_pg_wal_or_a_restore_and_check_names_a_cut_pack() -> Result<()> {
    let lab = Lab::start("lying-gets").await?;
    let (src, db) = lab.source("src").await?;
    data::write_batch(&db, 1).await?;
    let b1 = lab.backup_ok(&src).await?;
    data::write_batch(&db, 2).await?;
    let seg = switch_wal(&db).await?;
    let kept = keep_segment(&lab, &src, &seg)?;
    wait_archived(&db, &seg, Duration::from_secs(60)).await?;

    // wal-fetch of a short or empty answer: never 0 (a partial file) nor 1 (recovery would end
    // early, taking it for the end of the archive), and nothing at %p.
    for keep in [0usize, 100] {
        let before = lab.proxy.counts();
        lab.proxy.cut_gets(keep, &format!("/{seg}"), u64::MAX);
        let dest = lab.dir.join(&format!("fetch-cut-{keep}"));
        let d = dest.to_string_lossy().into_owned();
        let r = lab
            .run(
                Tool::Restore,
                &["wal-fetch", &seg, &d, "--repo", &lab.url],
                true,
                &[("TIDEMARK_FETCH_ATTEMPTS", "2")],
            )
            .await?;
        lab.proxy.truth();
        ensure!(
            lab.proxy.counts().gets_cut > before.gets_cut,
            "no GET was cut"
        );
        ensure!(
            !r.success() && r.code() != Some(1),
            "wal-fetch of a {keep}-byte answer exited {:?} (must be neither 0 nor 1):\n{r}",
            r.code()
        );
        ensure!(
            !dest.exists(),
            "wal-fetch left a file at %p after a short read"
        );
    }
    fetch_is(&lab, &seg, &std::fs::read(&kept)?).await?;

    // A restore whose pack reads come back short fails and says so.
    for keep in [0usize, 50] {
        let before = lab.proxy.counts();
        lab.proxy.cut_gets(keep, "/packs/", u64::MAX);
        let pgdata = lab.dir.join(&format!("restore-cut-{keep}"));
        let p = pgdata.to_string_lossy().into_owned();
        let r = lab
            .run(
                Tool::Restore,
                &[
                    "restore", "--pgdata", &p, "--repo", &lab.url, "--target", "latest",
                ],
                true,
                &[],
            )
            .await?;
        lab.proxy.truth();
        ensure!(
            lab.proxy.counts().gets_cut > before.gets_cut,
            "no pack read was cut"
        );
        ensure!(
            !r.success(),
            "a restore from short pack reads succeeded:\n{r}"
        );
        ensure!(
            !pgdata.join("global/pg_control").exists(),
            "a failed restore left pg_control (it must arrive last)"
        );
    }

    // A pack of b1 cut behind tidemark's back: the next backup does not trust it for existing
    // (it stores those chunks again), check --read-data names b1 and only b1.
    let packs = lab.objects("packs/").await?;
    let (victim, size) = packs
        .iter()
        .max_by_key(|(_, s)| **s)
        .map(|(k, s)| (k.clone(), *s))
        .context("b1 stored no pack")?;
    lab.cut(&victim, (size / 2) as usize).await?;
    data::write_batch(&db, 3).await?;
    let b2 = lab.backup_ok(&src).await?;
    let r = lab
        .run(
            Tool::Restore,
            &["check", "--repo", &lab.url, "--read-data", "--json"],
            false,
            &[],
        )
        .await?;
    ensure!(!r.success(), "check passed over a cut pack:\n{r}");
    let report = r.json_document()?;
    let problems = report["problems"]
        .as_array()
        .context("check --json printed no problems list")?;
    let named: BTreeSet<String> = problems
        .iter()
        .flat_map(|p| p["backups"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b.as_str().map(String::from))
        .collect();
    ensure!(
        named == BTreeSet::from([b1.clone()]),
        "check named {named:?}, want only {b1} (the backup using the cut pack; {b2} stored its chunks again): {report}"
    );
    ensure!(
        problems.iter().any(|p| p["what"]
            .as_str()
            .is_some_and(|w| w.contains(victim.rsplit('/').next().unwrap_or("?")))),
        "check did not name the cut pack {victim}: {report}"
    );
    let last = switch_wal(&db).await?;
    wait_archived(&db, &last, Duration::from_secs(60)).await?;
    let server = lab
        .restore_and_start("restored-b2", &["--target", "latest", "--backup", &b2])
        .await?;
    assert_rows(&server, 1..=3).await?;

    // A WAL object cut behind tidemark's back (the segment after b1, before b2): check
    // --read-data finds it and names b1 (its recovery replays it), not b2.
    let wal_key = lab
        .objects("wal/")
        .await?
        .into_keys()
        .find(|k| k.ends_with(&format!("/{seg}")))
        .with_context(|| format!("{seg} is not in the store"))?;
    lab.cut(&wal_key, 300).await?;
    let r = lab
        .run(
            Tool::Restore,
            &["check", "--repo", &lab.url, "--read-data", "--json"],
            false,
            &[],
        )
        .await?;
    ensure!(!r.success(), "check passed over a cut wal object:\n{r}");
    let report = r.json_document()?;
    let found = report["problems"]
        .as_array()
        .context("check --json printed no problems list")?
        .iter()
        .find(|p| {
            p["what"]
                .as_str()
                .is_some_and(|w| w.contains(seg.as_str()) && w.contains("damaged"))
        })
        .with_context(|| format!("check did not report the cut wal object {seg}: {report}"))?;
    let named: BTreeSet<&str> = found["backups"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b.as_str()).collect())
        .unwrap_or_default();
    ensure!(
        named.contains(b1.as_str()) && !named.contains(b2.as_str()),
        "the cut wal object {seg} should name {b1} and not {b2}: {found}"
    );
    Ok(())
}

/// Sends `signal` (e.g. `STOP`, `CONT`) to the process group `pgid`.
fn signal_group(signal: &str, pgid: u32) -> Result<()> {
    let st = std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pgid}")])
        .status()
        .context("cannot run kill")?;
    ensure!(st.success(), "kill -{signal} -{pgid} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_stopped_past_its_lease_deletes_nothing_and_a_backup_meanwhile_is_whole(
) -> Result<()> {
    const TTL: &str = "3";
    let lab = Lab::start("lying-sigstop").await?;
    let (src, db) = lab.source("src").await?;
    data::write_batch(&db, 1).await?;
    let a = lab.backup_ok(&src).await?;
    data::write_batch(&db, 2).await?;
    let b = lab.backup_ok(&src).await?;

    // The expire (keep the newest backup: a's manifest and packs are its work) stops at the
    // hook before its first delete; there it is frozen with SIGSTOP, heartbeat and all.
    let flag = lab.dir.write("expire-pause", b"")?;
    let pause = format!("expire-before-delete:{}", flag.display());
    // Started as the database user directly (not through runuser, which stops itself when its
    // child stops and may miss the SIGCONT), in its own process group.
    let mut cmd = tokio::process::Command::new(env::bins()?.agent);
    let user = env::db_user()?;
    if user.switch {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd.args([
        "expire",
        "--repo",
        &lab.url,
        "--retain-last",
        "1",
        "--gc-grace",
        "0s",
    ]);
    for (k, v) in &lab.direct {
        cmd.env(k, v);
    }
    cmd.env("TIDEMARK_LEASE_TTL_SECS", TTL)
        .env("TIDEMARK_TEST_PAUSE_AT", &pause)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(lab.dir.join("expire.stderr"))?)
        .process_group(0);
    let mut expire = cmd.spawn().context("cannot start expire")?;
    let pgid = expire.id().context("expire has no pid")?;
    let marker = std::path::PathBuf::from(format!("{}.paused", flag.display()));
    let started = Instant::now();
    while !marker.exists() {
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "expire did not reach expire-before-delete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group("STOP", pgid)?;
    std::fs::remove_file(&flag)?;
    let before = lab.objects("").await?;
    ensure!(
        before.contains_key(&format!("backups/{a}.manifest")),
        "backup {a} has no manifest: {before:?}"
    );

    // Meanwhile a backup: it waits until the frozen expire's lease is stale, then runs whole.
    data::write_batch(&db, 3).await?;
    let backup_started = Instant::now();
    let c = lab.backup_ok(&src).await;
    let waited = backup_started.elapsed();
    signal_group("CONT", pgid)?;
    let status = tokio::time::timeout(Duration::from_secs(60), expire.wait()).await;
    let stderr = std::fs::read_to_string(lab.dir.join("expire.stderr"))?;
    let status = match status {
        Ok(s) => s?,
        Err(_) => {
            let _ = signal_group("KILL", pgid);
            bail!("the expire did not end within 60 s of SIGCONT:\n{stderr}");
        }
    };
    let c = c?;
    ensure!(
        !status.success(),
        "an expire frozen past its lease TTL went on (after a backup waited {waited:?}):\n{stderr}"
    );
    ensure!(
        stderr.contains("lease") && stderr.contains("hint:"),
        "the expire did not say it lost its lease:\n{stderr}"
    );
    eprintln!("lying-sigstop: the backup waited {waited:?} for the frozen expire's lease; the expire said:\n{stderr}");

    // Nothing was deleted: every object of before is still there, bytes for bytes in size
    // (lease objects aside: the backup's came and went).
    let after = lab.objects("").await?;
    let gone: Vec<&String> = before
        .iter()
        .filter(|(k, s)| !k.starts_with("locks/") && after.get(*k) != Some(*s))
        .map(|(k, _)| k)
        .collect();
    ensure!(
        gone.is_empty(),
        "the frozen expire deleted or changed {gone:?}"
    );
    for id in [&a, &b, &c] {
        ensure!(
            after.contains_key(&format!("backups/{id}.manifest")),
            "backup {id} has no manifest after the frozen expire"
        );
    }
    let r = lab
        .run(
            Tool::Restore,
            &["check", "--repo", &lab.url, "--read-data"],
            false,
            &[],
        )
        .await?;
    ensure!(r.success(), "check after the frozen expire failed:\n{r}");
    let last = switch_wal(&db).await?;
    wait_archived(&db, &last, Duration::from_secs(60)).await?;
    let server = lab
        .restore_and_start("restored-c", &["--target", "latest", "--backup", &c])
        .await?;
    assert_rows(&server, 1..=3).await?;

    // The frozen run had work: a rerun does it (a's manifest goes).
    let r = lab
        .run(
            Tool::Agent,
            &[
                "expire",
                "--repo",
                &lab.url,
                "--retain-last",
                "1",
                "--gc-grace",
                "0s",
            ],
            false,
            &[("TIDEMARK_LEASE_TTL_SECS", TTL)],
        )
        .await?;
    ensure!(r.success(), "expire after the frozen one failed:\n{r}");
    let left = lab.objects("backups/").await?;
    ensure!(
        !left.contains_key(&format!("backups/{a}.manifest")),
        "the rerun kept {a}: the frozen expire had nothing to delete, so the test proved nothing"
    );
    Ok(())
}

/// The pack keys moto holds.
async fn packs(lab: &Lab) -> Result<BTreeSet<String>> {
    Ok(lab.objects("packs/").await?.into_keys().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_bucket_and_lagging_list_delete_nothing_younger_than_the_grace() -> Result<()> {
    const LAG: Duration = Duration::from_secs(10);
    const GRACE: Duration = Duration::from_secs(30);
    let lab = Lab::start("lying-lag").await?;
    lab.s3("versioning", "", b"").await?;
    let (src, db) = lab.source("src").await?;
    let expire = |tag: &'static str| {
        let lab = &lab;
        async move {
            let r = lab
                .run(
                    Tool::Agent,
                    &[
                        "expire",
                        "--repo",
                        &lab.url,
                        "--retain-last",
                        "1",
                        "--gc-grace",
                        "30s",
                    ],
                    true,
                    &[],
                )
                .await?;
            ensure!(r.success(), "expire {tag} failed:\n{r}");
            Ok::<_, anyhow::Error>(r)
        }
    };
    data::write_batch(&db, 1).await?;
    // In the versioned bucket, a WAL upload stored short: the writer's delete of its own short
    // object leaves a delete marker, and the retry's create-only PUT still succeeds over it.
    let (_, _, failed_before, _) = archiver_stats(&db).await?;
    lab.proxy
        .lie_to_puts(PutLie::Truncate { keep: 100 }, "/wal/", 1);
    let seg = switch_wal(&db).await?;
    let kept = keep_segment(&lab, &src, &seg)?;
    wait_archive_failure(&db, &seg, failed_before).await?;
    lab.proxy.truth();
    let next = switch_wal(&db).await?;
    wait_archived(&db, &next, Duration::from_secs(120)).await?;
    fetch_is(&lab, &seg, &std::fs::read(&kept)?).await?;
    let versions = String::from_utf8(lab.s3("versions", "wal/", b"").await?)?;
    ensure!(
        versions
            .lines()
            .any(|l| l.ends_with(&format!("/{seg} marker"))),
        "no delete marker for the short copy of {seg}:\n{versions}"
    );
    let a = lab.backup_ok(&src).await?;
    data::write_batch(&db, 2).await?;
    let b = lab.backup_ok(&src).await?;
    // A backup killed after its first pack: orphans nothing references.
    let before_c = packs(&lab).await?;
    let r = lab
        .backup(&src, &[("TIDEMARK_TEST_CRASH_AT", "backup-mid-copy")])
        .await?;
    ensure!(
        r.code() == Some(99),
        "the backup was not killed mid-copy:\n{r}"
    );
    let orphans: BTreeSet<String> = packs(&lab).await?.difference(&before_c).cloned().collect();
    ensure!(!orphans.is_empty(), "the killed backup left no pack");

    // LIST now lags 10 s behind PUT. An expire right away: nothing is deleted (the orphans are
    // hidden or younger than the grace).
    lab.proxy.lag_lists(Some(LAG));
    let all = packs(&lab).await?;
    expire("right after the killed backup").await?;
    ensure!(
        lab.proxy.counts().list_hidden > 0,
        "the lagging LIST hid nothing"
    );
    let now = packs(&lab).await?;
    ensure!(
        now == all,
        "an expire right after the writes deleted packs: {:?}",
        all.difference(&now).collect::<Vec<_>>()
    );
    // Once the lag has passed: a is removed, its packs and the orphans condemned, none deleted.
    tokio::time::sleep(LAG + Duration::from_secs(1)).await;
    expire("after the lag").await?;
    let condemned_at = Instant::now();
    let now = packs(&lab).await?;
    ensure!(
        now == all,
        "packs younger than the {GRACE:?} grace were deleted: {:?}",
        all.difference(&now).collect::<Vec<_>>()
    );
    let manifests = lab.objects("backups/").await?;
    ensure!(
        !manifests.contains_key(&format!("backups/{a}.manifest"))
            && manifests.contains_key(&format!("backups/{b}.manifest")),
        "retain-last 1 should keep {b} only: {manifests:?}"
    );
    let versions = String::from_utf8(lab.s3("versions", "backups/", b"").await?)?;
    ensure!(
        versions
            .lines()
            .any(|l| l == format!("{PREFIX}/backups/{a}.manifest marker")),
        "the versioned bucket holds no delete marker for {a}'s manifest:\n{versions}"
    );
    // A new backup d, and right after it (d hidden by the lag) an expire past the grace: the
    // condemned packs go, d's are not even seen.
    if let Some(left) = GRACE.checked_sub(condemned_at.elapsed()) {
        tokio::time::sleep(left + Duration::from_secs(1)).await;
    }
    data::write_batch(&db, 3).await?;
    let d = lab.backup_ok(&src).await?;
    let with_d = packs(&lab).await?;
    let d_new: BTreeSet<String> = with_d.difference(&all).cloned().collect();
    let hidden_before = lab.proxy.counts().list_hidden;
    expire("past the grace, right after a backup").await?;
    let after = packs(&lab).await?;
    let deleted: BTreeSet<String> = with_d.difference(&after).cloned().collect();
    ensure!(
        orphans.is_subset(&deleted),
        "orphans of the killed backup still there past the grace: {:?}",
        orphans.difference(&deleted).collect::<Vec<_>>()
    );
    ensure!(
        d_new.is_subset(&after),
        "packs of {d}, written {:?} ago at most, were deleted",
        LAG
    );
    let versions = String::from_utf8(lab.s3("versions", "packs/", b"").await?)?;
    for p in &orphans {
        ensure!(
            versions
                .lines()
                .any(|l| l == format!("{PREFIX}/{p} marker")),
            "no delete marker for the collected pack {p}"
        );
    }
    eprintln!(
        "lying-lag: {} packs collected ({} orphans), LIST hid {} objects (+{} in the last expire)",
        deleted.len(),
        orphans.len(),
        lab.proxy.counts().list_hidden,
        lab.proxy.counts().list_hidden - hidden_before
    );

    // The catalog is consistent and every kept backup restores row for row.
    tokio::time::sleep(LAG).await;
    let r = lab
        .run(
            Tool::Restore,
            &["check", "--repo", &lab.url, "--read-data"],
            true,
            &[],
        )
        .await?;
    ensure!(r.success(), "check after the expires failed:\n{r}");
    let kept: BTreeSet<String> = lab.objects("backups/").await?.into_keys().collect();
    ensure!(
        kept == BTreeSet::from([
            format!("backups/{b}.manifest"),
            format!("backups/{d}.manifest")
        ]),
        "kept manifests {kept:?}, want {b} and {d}"
    );
    let server = lab
        .restore_and_start("restored-b", &["--target", "immediate", "--backup", &b])
        .await?;
    assert_rows(&server, 1..=2).await?;
    drop(server);
    let last = switch_wal(&db).await?;
    wait_archived(&db, &last, Duration::from_secs(60)).await?;
    let server = lab
        .restore_and_start("restored-d", &["--target", "latest", "--backup", &d])
        .await?;
    assert_rows(&server, 1..=3).await?;
    Ok(())
}
