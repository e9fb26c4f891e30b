//! A timeline switch: a standby built from a tidemark backup streams from the primary, is
//! promoted (timeline 2) and archives through a tidemark sidecar, while the old primary keeps
//! writing on timeline 1 for a while (split brain). The archive must hold `00000002.history`, the
//! promoted server's `.partial` copy of the switch segment beside the old primary's full segment
//! of the same number (neither replacing the other), and timeline 2's segments; a restore to the
//! latest point follows timeline 2 and holds none of the old primary's late rows, even though the
//! old primary took the newest backup (on its abandoned branch), and `verify` drills the very
//! backup `restore` chose. `--target-timeline 1` ends on timeline 1's data (the old primary's
//! rows after the fork, none of timeline 2's), `--target-timeline 2` on timeline 2's.

use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};
use tidemark_e2e::cluster::{conf_quote, shell_word};
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::env;
use tidemark_e2e::sidecar::{switch_wal, wait_archived, Sidecar, SidecarConfig};
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};
use tokio_postgres::Client;

async fn lsn(db: &Client, sql: &str) -> Result<String> {
    let r = db
        .query_one(sql, &[])
        .await
        .with_context(|| sql.to_string())?;
    Ok(r.get::<_, Option<String>>(0).unwrap_or_default())
}

/// Waits until the standby has replayed everything the primary has written so far.
async fn wait_caught_up(primary: &Client, standby: &Client) -> Result<()> {
    let target = lsn(primary, "SELECT pg_current_wal_lsn()::text").await?;
    let started = Instant::now();
    loop {
        let behind = standby
            .query_one(
                "SELECT pg_last_wal_replay_lsn() < $1::text::pg_lsn",
                &[&target],
            )
            .await
            .context("cannot read the standby's replay position")?;
        if !behind.get::<_, Option<bool>>(0).unwrap_or(true) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the standby did not replay up to {target} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the promoted server's `.partial` segment in the archive; returns its segment name.
async fn find_partial(repo: &Repo, timeout: Duration) -> Result<String> {
    let dir = repo.path.join("wal/00000001");
    let started = Instant::now();
    loop {
        let partials: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".partial").map(str::to_string))
            .collect();
        match partials.as_slice() {
            [one] => return Ok(one.clone()),
            [] if started.elapsed() < timeout => {}
            [] => anyhow::bail!("no .partial segment was archived within {timeout:?}"),
            many => anyhow::bail!("more than one .partial segment archived: {many:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_standby_archives_a_new_timeline_beside_the_old_one() -> Result<()> {
    let dir = TestDir::new("timeline")?;
    let repo = Repo::create(&dir, "repo")?;
    let primary = PgCluster::start_archiving(&dir, "primary", &repo).await?;
    let pdb = primary.client().await?;
    data::create_table(&pdb).await?;
    data::write_batch(&pdb, 1).await?;
    let first = primary.backup(&repo).await?["backup_id"]
        .as_str()
        .context("backup id")?
        .to_string();
    data::write_batch(&pdb, 2).await?;
    let seg = switch_wal(&pdb).await?;
    repo.wait_for_wal(&seg, Duration::from_secs(60)).await?;

    // The standby: the backup restored, standby.signal instead of recovery.signal, streaming
    // from the primary, archiving (once promoted) through its own sidecar.
    let sdata = dir.mkdir("standby")?.join("data");
    repo.restore(&sdata, &["--standby"]).await?.ok()?;
    ensure!(
        sdata.join("standby.signal").is_file(),
        "restore --standby wrote no standby.signal"
    );
    let mut cfg = SidecarConfig::new(&dir, "sidecar", &repo.url, &sdata)?;
    cfg.args = vec!["--rescan".into(), "1".into()];
    let mut standby = PgCluster::adopt(&dir, "standby", &sdata)?;
    let agent = env::bins()?.agent;
    let archive_command = format!(
        "{} wal-push --repo {} --socket-dir {} %p",
        shell_word(&agent.to_string_lossy()),
        shell_word(&repo.url),
        shell_word(&cfg.socket_dir.to_string_lossy())
    );
    standby.append_conf(
        "postgresql.auto.conf",
        &format!(
            "\n# standby settings written by the timeline test\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {}\n\
             primary_conninfo = {}\n\
             recovery_target_timeline = 'latest'\n\
             archive_mode = on\n\
             archive_command = {}\n",
            conf_quote(&standby.sock.to_string_lossy()),
            conf_quote(&primary.conninfo()),
            conf_quote(&archive_command)
        ),
    )?;
    standby.start().await?;
    let sc = Sidecar::start(cfg).await?;
    let sdb = standby.client().await?;
    data::write_batch(&pdb, 3).await?;
    wait_caught_up(&pdb, &sdb).await?;
    ensure!(
        data::batch_counts(&sdb).await?.len() == 3,
        "the standby does not hold batches 1-3"
    );

    // Promote; the old primary goes on writing on timeline 1 (a split brain).
    sdb.execute("SELECT pg_promote(true, 60)", &[])
        .await
        .context("pg_promote failed")?;
    ensure!(
        data::checkpoint_timeline(&sdb).await? == 2,
        "the promoted standby is not on timeline 2"
    );
    data::write_batch(&pdb, 99).await?;
    let old_seg = switch_wal(&pdb).await?;
    repo.wait_for_wal(&old_seg, Duration::from_secs(60)).await?;
    // The old primary even takes a backup on its abandoned branch: the newest backup by time,
    // which a restore following timeline 2 must never use.
    let split = primary.backup(&repo).await?;

    data::write_batch(&sdb, 4).await?;
    let new_seg = switch_wal(&sdb).await?;
    wait_archived(&sdb, &new_seg, Duration::from_secs(60))
        .await
        .with_context(|| sc.log_tail(30))?;
    ensure!(
        new_seg.starts_with("00000002"),
        "{new_seg} is not on timeline 2"
    );

    let history = repo.wal_object("00000002.history")?;
    let switch_seg = find_partial(&repo, Duration::from_secs(30)).await?;
    repo.wait_for_wal("00000002.history", Duration::from_secs(30))
        .await
        .context("the sidecar did not archive 00000002.history")?;
    let partial_name = format!("{switch_seg}.partial");
    let tl1_switch = format!("00000001{}", &switch_seg[8..]);
    let full = repo.wal_object(&tl1_switch)?;
    let partial = repo.wal_object(&partial_name)?;
    ensure!(
        history.is_file() && partial.is_file(),
        "history or partial object missing"
    );
    // The old primary went on to finish the same segment on timeline 1: both copies are kept.
    repo.wait_for_wal(&tl1_switch, Duration::from_secs(30))
        .await
        .with_context(|| format!("the old primary's {tl1_switch} was not archived"))?;
    ensure!(
        std::fs::read(&full)? != std::fs::read(&partial)?,
        "{tl1_switch} and {partial_name} hold the same bytes; the split-brain writes are missing"
    );
    let refused = sc.metric("tidemark_wal_conflicts_total").await?;
    ensure!(refused == 0.0, "the sidecar refused {refused} files");

    // The latest point follows timeline 2: batches 1-4, never the old primary's batch 99.
    drop(sdb);
    let rdata = dir.join("restored");
    let r = repo.restore(&rdata, &["--target", "latest"]).await?.ok()?;
    ensure!(
        !r.to_string()
            .contains(split["backup_id"].as_str().unwrap_or("?")),
        "the restore used the split-brain backup {}:\n{r}",
        split["backup_id"]
    );
    let restored_id = r.json()?["backup_id"].clone();

    // The drill judges the backup a restore would use: the same choice after the failover,
    // although the old primary's split-brain backup is the newest by time.
    let drill = repo
        .verify_latest(&dir.join("drill"), &["--no-amcheck"])
        .await?;
    let drill = drill.json()?;
    ensure!(
        drill["backup"]["id"] == restored_id,
        "after the failover verify chose backup {} but restore chose {restored_id}",
        drill["backup"]["id"]
    );

    let restored = start_restored(&dir, "restored-server", &rdata).await?;
    let rdb = restored.client().await?;
    let counts = data::batch_counts(&rdb).await?;
    let want: std::collections::BTreeMap<i32, i64> = (1..=4).map(|b| (b, BATCH_ROWS)).collect();
    ensure!(
        counts == want,
        "restored rows per batch {counts:?}, want batches 1-4 (timeline 2) and none of batch 99\n{}",
        restored.log_tail()
    );
    ensure!(
        data::checkpoint_timeline(&rdb).await? >= 3,
        "the restore should have promoted to a timeline after 2"
    );
    drop(rdb);
    drop(restored);

    // --target-timeline 1 from the backup before the fork: timeline 1 to its end, so the old
    // primary's batch 99 (written after the fork, archived on timeline 1) is replayed from WAL
    // and timeline 2's batch 4 is absent.
    let tl1 = timeline_rows(
        &dir,
        &repo,
        "tl1",
        &["--target-timeline", "1", "--backup", &first],
    )
    .await?;
    let want: std::collections::BTreeMap<i32, i64> =
        [1, 2, 3, 99].into_iter().map(|b| (b, BATCH_ROWS)).collect();
    ensure!(
        tl1 == want,
        "--target-timeline 1 restored {tl1:?}, want batches 1-3 and the old primary's 99"
    );
    // Without --backup, timeline 1's newest backup (the old primary's split-brain one) is
    // admitted, and it ends the same.
    let tl1 = timeline_rows(&dir, &repo, "tl1-newest", &["--target-timeline", "1"]).await?;
    ensure!(
        tl1 == want,
        "--target-timeline 1 (newest backup) restored {tl1:?}"
    );
    // --target-timeline 2: timeline 2's rows, as latest.
    let tl2 = timeline_rows(&dir, &repo, "tl2", &["--target-timeline", "2"]).await?;
    let want: std::collections::BTreeMap<i32, i64> = (1..=4).map(|b| (b, BATCH_ROWS)).collect();
    ensure!(
        tl2 == want,
        "--target-timeline 2 restored {tl2:?}, want batches 1-4"
    );
    eprintln!("timeline: switch segment {switch_seg}, old primary finished {tl1_switch}, timeline 2 archived through {new_seg}");
    Ok(())
}

/// Restores to the end of the archive (`--target latest`) with `args`, starts the server and
/// returns its rows per batch.
async fn timeline_rows(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    args: &[&str],
) -> Result<std::collections::BTreeMap<i32, i64>> {
    let pgdata = dir.join(name);
    let mut a = vec!["--target", "latest"];
    a.extend_from_slice(args);
    repo.restore(&pgdata, &a).await?.ok()?;
    let server = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    let db = server.client().await?;
    let rows = data::batch_counts(&db).await?;
    ensure!(
        data::checkpoint_timeline(&db).await? >= 3,
        "{name}: the restore should have promoted to a timeline after 2"
    );
    Ok(rows)
}
