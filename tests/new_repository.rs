//! Issue 18: archiving into a brand-new repository must never stall, and wal-fetch against a
//! repository that does not exist must not kill a standby.
//!
//! A primary archives into repository A and is backed up there. Two standbys are restored from
//! that backup: S1 streams from the primary and, once promoted, archives into repository B, which
//! does not exist yet; S2 is a cascading standby streaming from S1 whose restore_command points
//! at repository C, which never exists. PostgreSQL archives the promoted S1's `00000002.history`
//! before anything else, so it is the first object B ever receives: it must create B (system
//! identifier from S1's pg_control), and the segments after it must follow. S2 must keep running
//! through the promotion (its wal-fetch calls report "missing", not "abort recovery") and follow
//! S1 onto timeline 2 by streaming.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};
use tidemark_e2e::cluster::{conf_quote, shell_word};
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::env;
use tidemark_e2e::sidecar::{switch_wal, wait_archived};
use tidemark_e2e::{PgCluster, Repo, TestDir};
use tokio_postgres::Client;

/// A standby restored from `repo`'s latest backup, streaming from `upstream`, with `extra`
/// settings appended (they win over what restore wrote).
async fn standby(
    dir: &TestDir,
    name: &str,
    repo: &Repo,
    upstream: &PgCluster,
    extra: &str,
) -> Result<PgCluster> {
    let data = dir.mkdir(name)?.join("data");
    repo.restore(&data, &["--standby"]).await?.ok()?;
    ensure!(
        data.join("standby.signal").is_file(),
        "restore --standby wrote no standby.signal"
    );
    let mut c = PgCluster::adopt(dir, &format!("{name}-server"), &data)?;
    c.append_conf(
        "postgresql.auto.conf",
        &format!(
            "\n# written by the new_repository test\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {}\n\
             primary_conninfo = {}\n\
             recovery_target_timeline = 'latest'\n\
             {extra}",
            conf_quote(&c.sock.to_string_lossy()),
            conf_quote(&upstream.conninfo()),
        ),
    )?;
    c.start().await?;
    Ok(c)
}

async fn wait_rows(db: &Client, batch: i32, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let counts = data::batch_counts(db).await?;
        if counts.get(&batch) == Some(&BATCH_ROWS) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < timeout,
            "batch {batch} did not reach the standby within {timeout:?}: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn config_exists(repo: &Path) -> bool {
    repo.join("config").is_file()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_file_first_into_a_new_repository_and_a_standby_without_one() -> Result<()> {
    let dir = TestDir::new("new_repository")?;
    let a = Repo::create(&dir, "repo-a")?;
    let b = Repo::create(&dir, "repo-b")?;
    let c = Repo::create(&dir, "repo-c")?;
    let primary = PgCluster::start_archiving(&dir, "primary", &a).await?;
    let pdb = primary.client().await?;
    data::create_table(&pdb).await?;
    data::write_batch(&pdb, 1).await?;
    primary.backup(&a).await?;

    let agent = env::bins()?.agent;
    let restore = env::bins()?.restore;
    let s1 = standby(
        &dir,
        "s1",
        &a,
        &primary,
        &format!(
            "archive_mode = on\narchive_command = {}\n",
            conf_quote(&format!(
                "{} wal-push --repo {} %p",
                shell_word(&agent.to_string_lossy()),
                shell_word(&b.url)
            ))
        ),
    )
    .await?;
    let s1db = s1.client().await?;
    data::write_batch(&pdb, 2).await?;
    wait_rows(&s1db, 2, Duration::from_secs(60)).await?;
    let s2 = standby(
        &dir,
        "s2",
        &a,
        &s1,
        &format!(
            "restore_command = {}\n",
            conf_quote(&format!(
                "{} wal-fetch --repo {} %f %p",
                shell_word(&restore.to_string_lossy()),
                shell_word(&c.url)
            ))
        ),
    )
    .await?;
    let s2db = s2.client().await?;
    wait_rows(&s2db, 2, Duration::from_secs(60)).await?;
    ensure!(
        !config_exists(&b.path),
        "repository B exists before S1 was promoted"
    );

    // Promote S1: its first archived file is 00000002.history, into the new repository B.
    s1db.execute("SELECT pg_promote(true, 60)", &[])
        .await
        .context("pg_promote failed")?;
    b.wait_for_wal("00000002.history", Duration::from_secs(60))
        .await
        .with_context(|| s1.log_tail())?;
    let info = b.info().await?;
    ensure!(
        info["system_id"].as_str() == Some(s1.system_identifier().await?.as_str()),
        "repository B was created for system {}, not S1's",
        info["system_id"]
    );
    data::write_batch(&s1db, 3).await?;
    let seg = switch_wal(&s1db).await?;
    ensure!(seg.starts_with("00000002"), "{seg} is not on timeline 2");
    wait_archived(&s1db, &seg, Duration::from_secs(60))
        .await
        .with_context(|| s1.log_tail())?;
    b.wait_for_wal(&seg, Duration::from_secs(30)).await?;
    let (failed, last_failed): (i64, Option<String>) = {
        let r = s1db
            .query_one(
                "SELECT failed_count, last_failed_wal FROM pg_stat_archiver",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    ensure!(
        failed == 0,
        "archiving into the new repository failed {failed} times (last: {last_failed:?})"
    );

    // S2 followed S1 onto timeline 2 by streaming, although its archive does not exist.
    wait_rows(&s2db, 3, Duration::from_secs(60))
        .await
        .with_context(|| s2.log_tail())?;
    let tli: i64 = s2db
        .query_one("SELECT received_tli::int8 FROM pg_stat_wal_receiver", &[])
        .await?
        .get(0);
    ensure!(tli == 2, "S2 receives timeline {tli}, not 2");
    ensure!(
        !config_exists(&c.path),
        "repository C was created by a reader"
    );
    let log = s2.log_text();
    ensure!(
        !log.contains("aborting recovery") && log.contains("does not exist"),
        "S2's wal-fetch did not report the missing repository as missing:\n{}",
        s2.log_tail()
    );
    eprintln!("new_repository: B created by 00000002.history, timeline 2 archived through {seg}; S2 followed by streaming");
    Ok(())
}
