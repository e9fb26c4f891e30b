//! `restore --pgdata DIR --target-time TIME | --target latest`.

use anyhow::{bail, Result};
use std::path::PathBuf;
use tidemark_core::cli::{RepoArgs, SystemArgs};
use tidemark_core::restore::{self, ArchiveMode, RestoreOptions};
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
    /// 'off' writes archive_mode = off so the restored server archives nothing (copies, clones,
    /// drills); 'preserve' keeps the backup's archive settings (only when this server replaces
    /// the original, e.g. the primary after a disaster)
    #[arg(long, value_enum, env = "TIDEMARK_ARCHIVE_MODE", default_value_t = ArchiveMode::Off)]
    archive_mode: ArchiveMode,
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
        archive_mode: a.archive_mode,
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
            "archive_mode": a.archive_mode.as_str(),
            "skipped_symlinks": r.skipped_links.iter().map(|(p, t)| serde_json::json!({"path": p, "target": t})).collect::<Vec<_>>(),
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
        match a.archive_mode {
            ArchiveMode::Off => println!("archive_mode = off: this server archives no WAL (restore with --archive-mode preserve only when it replaces the original server)"),
            ArchiveMode::Preserve => println!("archive_mode preserved from the backup: this server archives WAL as the original did once it is promoted"),
        }
        for (path, link) in &r.skipped_links {
            println!(
                "left out symlink {path} -> {link} (create it by hand if this server needs it)"
            );
        }
    }
    Ok(())
}
