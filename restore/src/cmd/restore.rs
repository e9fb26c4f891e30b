//! `restore --pgdata DIR` with one recovery target: `--target-time`, `--target-lsn`,
//! `--target-xid`, `--target-name` or `--target immediate|latest`; or `--standby` (no target:
//! the newest backup, kept in recovery following the archive and `--primary-conninfo`).

use anyhow::{bail, Result};
use std::path::PathBuf;
use tidemark_core::cli::{RepoArgs, SystemArgs};
use tidemark_core::restore::{self, ArchiveMode, RestoreOptions};
use tidemark_core::target::{self, Action, Recovery, Target, TimelineTarget};

/// The recovery target options `restore` (and `verify`) take.
#[derive(clap::Args, Clone, Debug)]
pub struct TargetArgs {
    /// Recover up to this time (RFC 3339, or PostgreSQL's timestamptz text such as '2026-11-21 20:40:12.5+00')
    #[arg(long, group = "recovery_target")]
    pub target_time: Option<String>,
    /// Recover up to this WAL location (e.g. 0/3000028, as pg_current_wal_lsn() prints it)
    #[arg(long, group = "recovery_target")]
    pub target_lsn: Option<String>,
    /// Recover up to the commit of this transaction id (txid_current())
    #[arg(long, group = "recovery_target")]
    pub target_xid: Option<String>,
    /// Recover up to the restore point created with pg_create_restore_point(NAME)
    #[arg(long, group = "recovery_target")]
    pub target_name: Option<String>,
    /// 'latest': replay all archived WAL; 'immediate': stop as soon as the backup is consistent
    #[arg(long, group = "recovery_target", value_parser = ["latest", "immediate"])]
    pub target: Option<String>,
    /// Stop just before the target time, LSN or xid instead of just after it
    #[arg(long)]
    pub target_exclusive: bool,
    /// What the server does at the target: promote (default), pause (stays in recovery,
    /// read-only), shutdown
    #[arg(long, value_enum)]
    pub target_action: Option<Action>,
    /// The timeline recovery follows: latest (default), current (the backup's), or a number
    #[arg(long, default_value = "latest", value_parser = target::parse_timeline)]
    pub target_timeline: TimelineTarget,
}

impl TargetArgs {
    /// The target and its settings, checked against each other.
    pub fn recovery(&self) -> Result<Recovery> {
        let target = if let Some(t) = &self.target_time {
            Target::Time(target::parse_time(t)?)
        } else if let Some(l) = &self.target_lsn {
            Target::Lsn(target::parse_lsn(l)?)
        } else if let Some(x) = &self.target_xid {
            Target::Xid(target::parse_xid(x)?)
        } else if let Some(n) = &self.target_name {
            Target::Name(target::parse_name(n)?)
        } else {
            match self.target.as_deref() {
                Some("latest") => Target::Latest,
                Some("immediate") => Target::Immediate,
                _ => bail!("give a recovery target\nhint: --target-time '2026-11-21 20:40:12+00', --target-lsn 0/3000028, --target-xid 742, --target-name NAME, --target immediate or --target latest"),
            }
        };
        let r = Recovery {
            target,
            exclusive: self.target_exclusive,
            action: self.target_action.unwrap_or_default(),
            timeline: self.target_timeline,
        };
        r.check()?;
        Ok(r)
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    system: SystemArgs,
    /// Directory to restore into: must be absent or empty
    #[arg(long)]
    pgdata: PathBuf,
    #[command(flatten)]
    target: TargetArgs,
    /// Restore this backup (an id from `tidemark-agent info`) instead of the one restore would
    /// choose; refused if it cannot reach the target
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Restore tablespace OID into DIR instead of its original location (repeatable)
    #[arg(long = "tablespace-map", value_name = "OID=DIR", value_parser = tidemark_core::tablespace::parse_remap)]
    tablespace_map: Vec<(String, PathBuf)>,
    /// 'off' writes archive_mode = off so the restored server archives nothing (copies, clones,
    /// drills); 'preserve' keeps the backup's archive settings (only when this server replaces
    /// the original, e.g. the primary after a disaster)
    #[arg(long, value_enum, env = "TIDEMARK_ARCHIVE_MODE", default_value_t = ArchiveMode::Off)]
    archive_mode: ArchiveMode,
    /// Restore over an existing, stopped data directory of the same cluster: files that match
    /// are kept, only differing chunks are written, files the backup lacks are removed
    #[arg(long)]
    delta: bool,
    /// Print the plan (backup and why, timelines, WAL, bytes, an estimate, problems) and
    /// write nothing; exit 1 when it finds a problem
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    standby: StandbyArgs,
}

/// `--standby [--primary-conninfo STR]`.
#[derive(clap::Args)]
struct StandbyArgs {
    /// Restore the newest backup as a standby (standby.signal): it stays in recovery, read-only,
    /// replaying the archive (and streaming from --primary-conninfo); takes no --target*
    #[arg(long, env = "TIDEMARK_STANDBY")]
    standby: bool,
    /// The standby's primary_conninfo (libpq key=value or postgresql:// URL) to stream from;
    /// never printed (its password is redacted)
    #[arg(
        long,
        requires = "standby",
        env = "TIDEMARK_PRIMARY_CONNINFO",
        hide_env_values = true,
        value_name = "CONNINFO"
    )]
    primary_conninfo: Option<String>,
}

impl StandbyArgs {
    /// The recovery settings of a standby: no target (it never ends recovery by itself), the
    /// timeline given (latest by default). Any target option is refused, not ignored.
    fn recovery(&self, t: &TargetArgs) -> Result<Recovery> {
        let given = [
            ("--target-time", t.target_time.is_some()),
            ("--target-lsn", t.target_lsn.is_some()),
            ("--target-xid", t.target_xid.is_some()),
            ("--target-name", t.target_name.is_some()),
            ("--target", t.target.is_some()),
            ("--target-exclusive", t.target_exclusive),
            ("--target-action", t.target_action.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            bail!("{flag} does not apply to --standby: a standby has no recovery target, it stays in recovery following the archive (and its primary) until it is promoted\nhint: leave out {flag} for a standby, or leave out --standby to restore to a target and promote");
        }
        let mut r = Recovery::to(Target::Latest);
        r.timeline = t.target_timeline;
        Ok(r)
    }

    fn settings(&self) -> Option<target::Standby> {
        self.standby.then(|| target::Standby {
            primary_conninfo: self.primary_conninfo.clone().map(Into::into),
        })
    }
}

pub async fn run(a: Args) -> Result<()> {
    let recovery = if a.standby.standby {
        a.standby.recovery(&a.target)?
    } else {
        a.target.recovery()?
    };
    let target = recovery.target.clone();
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
        recovery: recovery.clone(),
        backup: a.backup.clone(),
        restore_command,
        tablespace_map: a.tablespace_map.clone(),
        archive_mode: a.archive_mode,
        delta: a.delta,
        standby: a.standby.settings(),
    };
    if a.dry_run {
        let rates = tidemark_core::verify::last_recorded(&store)
            .await
            .ok()
            .flatten()
            .and_then(|r| {
                Some(restore::plan::Rates {
                    restore_bytes_per_second: r.restore_bytes_per_second?,
                    replay_bytes_per_second: r.replay_bytes_per_second,
                    basis: format!("drill {}", r.key),
                })
            });
        let p = restore::plan::for_restore(&store, &opts, rates).await?;
        if a.json {
            println!("{}", serde_json::to_string(&p)?);
        } else {
            print!("{}", restore::plan::render(&p));
        }
        if !p.problems.is_empty() {
            bail!(
                "the plan found {} problem(s); nothing was written\nhint: {}",
                p.problems.len(),
                "see PROBLEM above (or \"problems\" in the JSON)"
            );
        }
        return Ok(());
    }
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
            "target": target.describe(),
            "target_inclusive": !recovery.exclusive,
            "target_action": recovery.action.as_str(),
            "target_timeline": recovery.timeline.setting(),
            "backup_stop_lsn": r.backup.stop_lsn.to_string(),
            "files": r.files,
            "bytes": r.bytes,
            "pgdata": a.pgdata,
            "archive_mode": a.archive_mode.as_str(),
            "standby": a.standby.standby,
            "primary_conninfo": a.standby.primary_conninfo.as_deref().map(tidemark_core::pg::redact_conninfo),
            "delta": r.delta,
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
            match &target {
                _ if a.standby.standby => "the end of the archive and stay a standby (read-only, in recovery, following the archive and primary_conninfo) until promoted".to_string(),
                Target::Latest => "the end of the archive".to_string(),
                Target::Immediate => "the backup's consistent state".to_string(),
                t => format!(
                    "{} ({}, then {})",
                    t.describe(),
                    if recovery.exclusive { "exclusive" } else { "inclusive" },
                    recovery.action.as_str()
                ),
            }
        );
        if let Some(d) = &r.delta {
            println!(
                "delta: {} files kept as they were, {} patched, {} created, {} entries removed; {} bytes written",
                d.files_kept, d.files_patched, d.files_created, d.entries_removed, d.bytes_written
            );
        }
        if matches!(target, Target::Xid(_) | Target::Name(_)) {
            println!(
                "backup {} stopped at {} (LSN {}): if the {} lies before that, PostgreSQL stops with FATAL \"recovery ended before configured recovery target was reached\" and promotes nothing; restore again into an empty directory with --backup <an older backup id>",
                r.backup.backup_id,
                tidemark_core::repo::fmt_time(r.backup.stop_time_us),
                r.backup.stop_lsn,
                if matches!(target, Target::Xid(_)) { "transaction's commit" } else { "restore point" }
            );
        }
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
