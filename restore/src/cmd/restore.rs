//! `restore --pgdata DIR --target-time TIME | --target latest`.

use anyhow::{bail, Result};
use std::path::PathBuf;
use tidemark_core::cli::{RepoArgs, SystemArgs};
use tidemark_core::restore::{self, RestoreOptions};
use tidemark_core::target::{self, Target};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    system: SystemArgs,
    /// Directory to restore into: must be absent or empty
    #[arg(long)]
    pgdata: PathBuf,
    /// Recover up to this time (RFC 3339, or PostgreSQL's timestamptz text such as '2026-11-21 20:40:12.5+00')
    #[arg(long, conflicts_with = "target")]
    target_time: Option<String>,
    /// 'latest': replay all archived WAL
    #[arg(long, value_parser = ["latest"])]
    target: Option<String>,
    /// Restore tablespace OID into DIR instead of its original location (repeatable)
    #[arg(long = "tablespace-map", value_name = "OID=DIR", value_parser = tidemark_core::tablespace::parse_remap)]
    tablespace_map: Vec<(String, PathBuf)>,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let target = match (&a.target_time, &a.target) {
        (Some(t), None) => Target::Time(target::parse_time(t)?),
        (None, Some(_)) => Target::Latest,
        _ => bail!("give a recovery target\nhint: --target-time '2026-11-21 20:40:12+00' or --target latest"),
    };
    let root = a.repo.open()?;
    let system = a.system.select(&root).await?;
    let restore_command = a.repo.restore_command(&system, true)?;
    if root
        .user_key()
        .is_some_and(|k| k.source == tidemark_core::cli::KEY_ENV)
    {
        tracing::warn!("the repository key came from {}: restore_command cannot carry it, so the PostgreSQL server that replays WAL must have {} in its environment (or restore with --key-file / --key-command instead)", tidemark_core::cli::KEY_ENV, tidemark_core::cli::KEY_ENV);
    }
    let store = system.store;
    let opts = RestoreOptions {
        pgdata: a.pgdata.clone(),
        target: target.clone(),
        restore_command,
        tablespace_map: a.tablespace_map.clone(),
    };
    let r = restore::run(&store, &opts).await;
    let r = match r {
        Err(e) if a.system.system_id.is_none() => {
            // After a major upgrade the target may lie in an earlier system's history.
            let others: Vec<String> = tidemark_core::repo::systems(&root)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.system_id != system.system_id)
                .map(|s| s.system_id.to_string())
                .collect();
            if others.is_empty() {
                return Err(e);
            }
            return Err(e.context(format!(
                "restoring database system {}, the newest of this repository\nhint: for a point in time before the major upgrade, pass --system-id with one of: {} (see `tidemark-agent info`)",
                system.system_id,
                others.join(", ")
            )));
        }
        r => r?,
    };
    if a.json {
        let v = serde_json::json!({
            "schema_version": 1,
            "backup_id": r.backup.backup_id,
            "backup_stop_time": tidemark_core::repo::fmt_time(r.backup.stop_time_us),
            "system_id": system.system_id.0.to_string(),
            "pg_version": r.backup.pg_version,
            "target": match &target { Target::Latest => "latest".to_string(), Target::Time(t) => target::postgres_text(t) },
            "files": r.files,
            "bytes": r.bytes,
            "pgdata": a.pgdata,
        });
        println!("{v}");
    } else {
        println!(
            "restored backup {} ({} files, {} bytes) into {}; start PostgreSQL on it to recover to {}",
            r.backup.backup_id,
            r.files,
            r.bytes,
            a.pgdata.display(),
            match &target { Target::Latest => "the end of the archive".to_string(), Target::Time(t) => target::postgres_text(t) }
        );
    }
    Ok(())
}
