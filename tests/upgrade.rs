//! A PostgreSQL major upgrade into the same repository. The embedded PostgreSQL builds ship no
//! pg_upgrade, so the "upgraded" cluster is what pg_upgrade also produces as far as tidemark can
//! tell: a new initdb of PostgreSQL 18 (a new system identifier, a new major, WAL names starting
//! again at 000000010000000000000001) loaded from a dump of the PostgreSQL 15 cluster.
//!
//! It archives and backs up into the same repository URL with no manual step; `info` shows both
//! systems; `expire` keeps each system's WAL consistent with its own backups; a restore without
//! `--system-id` uses the new system (and, for a time before the upgrade, names the old one); the
//! old system restores to a time before the upgrade with `--system-id` on PostgreSQL 15, and the
//! new one to a time after it on PostgreSQL 18, both row for row.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::env;
use tidemark_e2e::sidecar::{switch_wal, wait_archived};
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};

fn batches(b: &[i32]) -> BTreeMap<i32, i64> {
    b.iter().map(|&b| (b, BATCH_ROWS)).collect()
}

/// Runs a PostgreSQL 15 client tool (they talk to every server major) as the database user.
async fn client_tool(tool: &str, args: &[&str]) -> Result<env::Run> {
    let mut cmd = env::db_command(env::pg_bin_dir_for(15)?.join(tool))?;
    cmd.args(args);
    env::run(cmd).await?.ok()
}

async fn restore_rows(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    args: &[&str],
    want: &BTreeMap<i32, i64>,
    major: u32,
) -> Result<serde_json::Value> {
    let data = dir.join(name);
    let report = repo.restore(&data, args).await?.ok()?.json()?;
    let server = start_restored(dir, &format!("{name}-server"), &data).await?;
    let db = server.client().await?;
    let version: String = db.query_one("SELECT version()", &[]).await?.get(0);
    ensure!(
        version.starts_with(&format!("PostgreSQL {major}.")),
        "{name} started {version}, not PostgreSQL {major}"
    );
    let counts = data::batch_counts(&db).await?;
    ensure!(
        &counts == want,
        "{name}: restored rows per batch {counts:?}, want {want:?}\n{}",
        server.log_tail()
    );
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_major_upgrade_archives_into_the_same_repository_and_both_systems_restore() -> Result<()>
{
    let dir = TestDir::new("upgrade")?;
    let repo = Repo::create(&dir, "repo")?;

    // PostgreSQL 15: two backups, a target time between batches 3 and 90.
    let mut old = PgCluster::start_archiving_major(&dir, "old", &repo, 15, &[]).await?;
    let odb = old.client().await?;
    data::create_table(&odb).await?;
    data::write_batch(&odb, 1).await?;
    let old_first = old.backup(&repo).await?;
    data::write_batch(&odb, 2).await?;
    let old_second = old.backup(&repo).await?;
    data::write_batch(&odb, 3).await?;
    let t_old = data::target_time_between(&odb).await?;
    data::write_batch(&odb, 90).await?;
    old.switch_wal_and_wait(&repo).await?;
    let old_id = old.system_identifier().await?;
    let dump = dir.join("dump.sql").to_string_lossy().into_owned();
    let port = old.port().to_string();
    client_tool(
        "pg_dump",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-f",
            &dump,
            "postgres",
        ],
    )
    .await?;
    drop(odb);
    old.stop().await?;

    // The upgraded cluster: PostgreSQL 18, a new system, archiving into the same URL.
    let new = PgCluster::start_archiving_major(&dir, "new", &repo, 18, &[]).await?;
    let new_id = new.system_identifier().await?;
    ensure!(
        new_id != old_id,
        "the new cluster kept the system identifier"
    );
    let port = new.port().to_string();
    client_tool(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-f",
            &dump,
            "postgres",
        ],
    )
    .await?;
    let ndb = new.client().await?;
    ensure!(
        data::batch_counts(&ndb).await? == batches(&[1, 2, 3, 90]),
        "the dump did not load"
    );
    let new_backup = new.backup(&repo).await?;
    data::write_batch(&ndb, 4).await?;
    let t_new = data::target_time_between(&ndb).await?;
    data::write_batch(&ndb, 5).await?;
    let seg = switch_wal(&ndb).await?;
    wait_archived(&ndb, &seg, Duration::from_secs(60))
        .await
        .with_context(|| new.log_tail())?;
    ensure!(
        repo.path
            .join(format!("systems/{new_id}/wal/00000001/{seg}"))
            .is_file(),
        "the new system's {seg} is not in its nested repository systems/{new_id}/"
    );

    // info: both systems, each with its major and backups; the new one first.
    let info = repo.info().await?;
    let others = info["other_systems"].as_array().context("other_systems")?;
    ensure!(
        info["system_id"] == new_id.as_str()
            && info["pg_major"] == 18
            && info["backups"].as_array().map(Vec::len) == Some(1)
            && others.len() == 1
            && others[0]["system_id"] == old_id.as_str()
            && others[0]["pg_major"] == 15
            && others[0]["backups"].as_array().map(Vec::len) == Some(2),
        "info does not show the two systems: {info}"
    );

    // expire per system: the old system keeps its newer backup and the WAL from its start.
    let r = env::agent(&[
        "expire",
        "--repo",
        &repo.url,
        "--retain-last",
        "1",
        "--gc-grace",
        "0s",
        "--json",
    ])
    .await?
    .ok()?;
    let plans = r.json_document()?;
    ensure!(
        plans.as_array().map(Vec::len) == Some(2),
        "expire did not report one plan per system: {plans}"
    );
    let info = repo.info().await?;
    let old_backups: Vec<&str> = info["other_systems"][0]["backups"]
        .as_array()
        .context("old backups")?
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    ensure!(
        old_backups == [old_second["backup_id"].as_str().unwrap_or("?")]
            && info["backups"][0]["id"] == new_backup["backup_id"],
        "expire kept {old_backups:?} of the old system (want only {}) and {} of the new",
        old_second["backup_id"],
        info["backups"]
    );
    ensure!(
        old_first["backup_id"] != old_second["backup_id"],
        "two distinct old backups"
    );

    // Without --system-id a time before the upgrade is refused, naming the old system.
    let refused = repo
        .restore(&dir.join("refused"), &["--target-time", &t_old])
        .await?;
    ensure!(
        !refused.success()
            && refused.stderr.contains("--system-id")
            && refused.stderr.contains(&old_id),
        "a restore before the upgrade without --system-id should name the old system:\n{refused}"
    );

    // Each system to its own time, on its own major, row for row.
    let r_old = restore_rows(
        &dir,
        &repo,
        "restored-old",
        &["--target-time", &t_old, "--system-id", &old_id],
        &batches(&[1, 2, 3]),
        15,
    )
    .await?;
    ensure!(
        r_old["system_id"] == old_id.as_str() && r_old["backup_id"] == old_second["backup_id"],
        "the old restore used {r_old}"
    );
    let r_new = restore_rows(
        &dir,
        &repo,
        "restored-new",
        &["--target-time", &t_new],
        &batches(&[1, 2, 3, 4, 90]),
        18,
    )
    .await?;
    ensure!(
        r_new["system_id"] == new_id.as_str()
            && r_new["pg_version"].as_u64().map(|v| v / 10000) == Some(18),
        "the new restore used {r_new}"
    );
    eprintln!("upgrade: system {old_id} (15) restored to {t_old}, system {new_id} (18) to {t_new}");
    Ok(())
}
