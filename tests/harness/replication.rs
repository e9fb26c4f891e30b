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
    backup_to(c.port(), repo.url.clone(), env).await
}

/// As [`backup`], by port and repository URL (for backups run in a background task).
pub async fn backup_to(port: u16, repo_url: String, env: &[(&str, &str)]) -> Result<Run> {
    let port = port.to_string();
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
            &repo_url,
            "--archive-timeout",
            "120",
            "--json",
        ],
        &vars,
    )
    .await
}

/// Starts [`backup_to`] in a background task, throttled by the server to `kb_per_s`.
pub fn backup_in_background(
    c: &PgCluster,
    repo: &Repo,
    kb_per_s: u32,
) -> tokio::task::JoinHandle<Result<Run>> {
    let port = c.port();
    let url = repo.url.clone();
    tokio::spawn(async move {
        let rate = kb_per_s.to_string();
        backup_to(port, url, &[("TIDEMARK_MAX_RATE", &rate)]).await
    })
}

/// Waits until the server streams a base backup's files (pg_stat_progress_basebackup); returns
/// the walsender's pid.
pub async fn wait_streaming(c: &PgCluster) -> Result<i32> {
    let db = c.client().await?;
    for _ in 0..600 {
        let rows = db
            .query(
                "SELECT pid FROM pg_stat_progress_basebackup WHERE phase = 'streaming database files' AND backup_streamed > 0",
                &[],
            )
            .await?;
        if let Some(r) = rows.first() {
            return Ok(r.get(0));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "no base backup started streaming within 30 s\n{}",
        c.log_tail()
    )
}

/// Backup manifests in a file:// repository.
pub fn manifests(repo: &Repo) -> Result<Vec<String>> {
    let dir = repo.path.join("backups");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd {
            out.push(e?.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Runs `sql` on the server.
pub async fn exec(c: &PgCluster, sql: &str) -> Result<()> {
    c.client()
        .await?
        .batch_execute(sql)
        .await
        .with_context(|| format!("{sql} failed"))
}

/// Prepends `line` to pg_hba.conf (first match wins) and reloads.
pub async fn hba_first(c: &PgCluster, line: &str) -> Result<()> {
    let p = c.data.join("pg_hba.conf");
    let old =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    std::fs::write(&p, format!("{line}\n{old}"))
        .with_context(|| format!("cannot write {}", p.display()))?;
    exec(c, "SELECT pg_reload_conf()").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// A test CA and a server certificate it signed for 127.0.0.1/localhost, made with openssl in
/// `dir`: (CA certificate, server certificate, server key), owned by the database user.
pub async fn test_certs(dir: &TestDir, name: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_key = dir.join(&format!("{name}-ca.key"));
    let ca = dir.join(&format!("{name}-ca.crt"));
    let key = dir.join(&format!("{name}.key"));
    let csr = dir.join(&format!("{name}.csr"));
    let cert = dir.join(&format!("{name}.crt"));
    let ext = dir.write(
        &format!("{name}.ext"),
        b"subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n",
    )?;
    let steps: Vec<Vec<std::ffi::OsString>> = vec![
        vec![
            "req".into(),
            "-x509".into(),
            "-newkey".into(),
            "rsa:2048".into(),
            "-nodes".into(),
            "-days".into(),
            "2".into(),
            "-subj".into(),
            format!("/CN={name} test CA").into(),
            "-keyout".into(),
            ca_key.clone().into(),
            "-out".into(),
            ca.clone().into(),
        ],
        vec![
            "req".into(),
            "-new".into(),
            "-newkey".into(),
            "rsa:2048".into(),
            "-nodes".into(),
            "-subj".into(),
            "/CN=localhost".into(),
            "-keyout".into(),
            key.clone().into(),
            "-out".into(),
            csr.clone().into(),
        ],
        vec![
            "x509".into(),
            "-req".into(),
            "-in".into(),
            csr.into(),
            "-CA".into(),
            ca.clone().into(),
            "-CAkey".into(),
            ca_key.into(),
            "-CAcreateserial".into(),
            "-days".into(),
            "2".into(),
            "-extfile".into(),
            ext.into(),
            "-out".into(),
            cert.clone().into(),
        ],
    ];
    for args in steps {
        let mut cmd = tokio::process::Command::new("openssl");
        cmd.args(&args);
        let r = env::run(cmd).await?;
        if !r.success() {
            bail!("openssl could not make test certificates (install openssl):\n{r}");
        }
    }
    for p in [&ca, &cert, &key] {
        env::give_to_db_user(p)?;
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    Ok((ca, cert, key))
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

/// A streaming standby of `primary`, made with the suite's pg_basebackup (15's) -R and run on
/// the primary's major; it does not archive (the primary does). Started. A primary newer than
/// 15 is an error: pg_basebackup refuses a newer server and the npm packages ship none.
pub async fn start_standby(dir: &TestDir, name: &str, primary: &PgCluster) -> Result<PgCluster> {
    let major = primary.major().unwrap_or(15);
    if major > 15 {
        bail!("start_standby needs pg_basebackup {major} for a PostgreSQL {major} primary; the suite has only 15's (the npm server packages of 16+ ship no pg_basebackup)");
    }
    let mut c = PgCluster::initdb_major(dir, name, major, &[]).await?;
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

/// `pg_verifybackup --no-parse-wal` on a restored data directory, ignoring the files the
/// restore writes for recovery and `tablespace_map` (the server sends an empty one when there
/// are no tablespaces; the manifest keeps only a non-empty map). Not checked.
pub async fn pg_verifybackup(data: &std::path::Path) -> Result<Run> {
    let mut cmd = env::db_command(env::pg_bin("pg_verifybackup")?)?;
    cmd.args([
        "--no-parse-wal",
        "-i",
        "postgresql.auto.conf",
        "-i",
        "recovery.signal",
        "-i",
        "standby.signal",
        "-i",
        ".tidemark-promote-at-end",
        "-i",
        "tablespace_map",
    ])
    .arg(data);
    env::run(cmd).await
}
