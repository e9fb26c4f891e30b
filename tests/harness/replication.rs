//! Helpers for the replication-backup tests: `backup --source replication` with the connection
//! in PG* variables (the CronJob contract), standbys, roles with passwords, tablespaces.

use crate::cluster::PgCluster;
use crate::env::{self, Run, TestDir, Tool};
use crate::repo::Repo;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;

/// `tidemark-agent backup --source replication --json` against `c`, connection from PG*
/// variables (`PGHOST=127.0.0.1`, `PGPORT`, `PGUSER=postgres` unless `env` overrides them).
pub async fn backup(c: &PgCluster, repo: &Repo, env: &[(&str, &str)]) -> Result<Run> {
    let port = c.port().to_string();
    let mut vars: Vec<(&str, &str)> = vec![
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", &port),
        ("PGUSER", "postgres"),
        ("PGDATABASE", "postgres"),
    ];
    for (k, v) in env {
        vars.retain(|(k2, _)| k2 != k);
        vars.push((k, v));
    }
    env::tidemark(
        Tool::Agent,
        &[
            "backup",
            "--source",
            "replication",
            "--repo",
            &repo.url,
            "--archive-timeout",
            "120",
            "--json",
        ],
        &vars,
    )
    .await
}

/// As [`backup`], failing unless it succeeded; returns the JSON report.
pub async fn backup_ok(
    c: &PgCluster,
    repo: &Repo,
    env: &[(&str, &str)],
) -> Result<serde_json::Value> {
    let r = backup(c, repo, env).await?;
    if !r.success() {
        bail!("replication backup failed:\n{r}\n{}", c.log_tail());
    }
    let v = r.json()?;
    if v["schema_version"] != 1 || v["source"] != "replication" {
        bail!("backup --json printed an unexpected document: {v}");
    }
    Ok(v)
}

/// A streaming standby of `primary`, made with pg_basebackup -R; it does not archive (the
/// primary does). Started.
pub async fn start_standby(dir: &TestDir, name: &str, primary: &PgCluster) -> Result<PgCluster> {
    let mut c = PgCluster::initdb(dir, name).await?;
    std::fs::remove_dir_all(&c.data)
        .with_context(|| format!("cannot clear {}", c.data.display()))?;
    let mut cmd = env::db_command(env::pg_bin("pg_basebackup")?)?;
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &primary.port().to_string(),
        "-U",
        "postgres",
        "-R",
        "-X",
        "stream",
        "-c",
        "fast",
        "-D",
    ])
    .arg(&c.data);
    let r = env::run(cmd).await?;
    if !r.success() {
        bail!("pg_basebackup for the standby failed:\n{r}");
    }
    c.append_conf(
        "postgresql.conf",
        "\n# standby\narchive_mode = on\narchive_command = '/bin/true'\nhot_standby = on\n",
    )?;
    c.start().await?;
    Ok(c)
}

/// Waits until `standby` has replayed everything `primary` had written when called.
pub async fn wait_caught_up(primary: &PgCluster, standby: &PgCluster) -> Result<()> {
    let p = primary.client().await?;
    let lsn: String = p
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let s = standby.client().await?;
    for _ in 0..600 {
        let ok: bool = s
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await?
            .get(0);
        if ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "standby {} did not replay up to {lsn} within 60 s\n{}",
        standby.name,
        standby.log_tail()
    )
}

/// Runs `pg_switch_wal()` on `c` every 500 ms until the returned guard is dropped: a standby
/// backup's last segment is archived only when the primary leaves it.
pub fn keep_switching_wal(c: &PgCluster) -> tokio::task::JoinHandle<()> {
    let conninfo = c.conninfo();
    tokio::spawn(async move {
        loop {
            if let Ok((db, conn)) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
            {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let _ = db
                    .batch_execute("SELECT pg_switch_wal() FROM (SELECT txid_current()) t")
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// A directory for a tablespace owned by the database user.
pub fn tablespace_dir(dir: &TestDir, name: &str) -> Result<PathBuf> {
    let p = dir.mkdir(name)?;
    env::give_to_db_user(&p)?;
    Ok(p)
}
