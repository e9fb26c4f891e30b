//! `verify`: a restore drill. Restores into a scratch directory, starts PostgreSQL on it, waits for
//! recovery to reach the target and promote, runs the checks, prints the JSON result on stdout and
//! exits non-zero when any check failed.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidemark_core::cli::{RepoArgs, SystemArgs, EXIT_FAILURE};
use tidemark_core::target::{self, Recovery, Target};
use tidemark_core::verify::{self, server, DrillTarget, VerifyOptions};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("drill_target").required(true).args(["target", "target_time", "target_lsn", "target_xid", "target_name", "random_in_window"])))]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    system: SystemArgs,
    /// 'latest': replay all archived WAL; 'immediate': stop as soon as the backup is consistent
    #[arg(long, value_parser = ["latest", "immediate"])]
    target: Option<String>,
    /// Recover up to this time (RFC 3339 or PostgreSQL's timestamptz text)
    #[arg(long)]
    target_time: Option<String>,
    /// Recover up to this WAL location (e.g. 0/3000028)
    #[arg(long)]
    target_lsn: Option<String>,
    /// Recover up to the commit of this transaction id
    #[arg(long)]
    target_xid: Option<String>,
    /// Recover up to the restore point created with pg_create_restore_point(NAME)
    #[arg(long)]
    target_name: Option<String>,
    /// Stop just before the target LSN or xid instead of just after it
    #[arg(long)]
    target_exclusive: bool,
    /// A random time in the recoverable window: from the stop of the oldest backup restorable to
    /// any point in time (after `expire --retain-wal-window`, the window's first backup) to the
    /// newest backup's stop
    #[arg(long)]
    random_in_window: bool,
    /// Scratch directory for the restore (absent or empty; removed afterwards unless --keep)
    #[arg(long, env = "TIDEMARK_VERIFY_SCRATCH")]
    scratch: Option<PathBuf>,
    /// PostgreSQL bin directory (default: the directory of 'postgres' on PATH)
    #[arg(long, env = "TIDEMARK_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// OS user that runs PostgreSQL when tidemark runs as root
    #[arg(long, env = "TIDEMARK_RUN_AS")]
    run_as: Option<String>,
    /// Database role the checks connect as (the restored cluster's superuser)
    #[arg(long, env = "TIDEMARK_VERIFY_DB_USER", default_value = "postgres")]
    db_user: String,
    /// Port the drill server uses (it listens on a private unix socket only)
    #[arg(long, default_value_t = 5432)]
    port: u16,
    /// SQL checks: statements ending with ';' at line end; each must return a row whose first value is not false
    #[arg(long)]
    check_sql: Option<PathBuf>,
    /// Database the --check-sql statements run in
    #[arg(long, default_value = "postgres")]
    check_db: String,
    /// Skip pg_amcheck
    #[arg(long)]
    no_amcheck: bool,
    /// Also run pg_amcheck --heapallindexed (slower: checks every heap tuple has its index entries)
    #[arg(long)]
    heapallindexed: bool,
    /// Extra server setting for the drill, NAME=VALUE (repeatable), e.g. shared_buffers=256MB
    #[arg(long = "pg-setting", value_name = "NAME=VALUE")]
    pg_settings: Vec<String>,
    /// Seconds the server may take to recover and promote, and each check to run
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Keep the scratch directory (for debugging a failed drill)
    #[arg(long)]
    keep: bool,
    /// Store the result in the repository (shown by 'tidemark-agent info')
    #[arg(long)]
    record: bool,
}

pub async fn run(a: Args) -> Result<ExitCode> {
    let exact = if let Some(l) = &a.target_lsn {
        Some(Target::Lsn(target::parse_lsn(l)?))
    } else if let Some(x) = &a.target_xid {
        Some(Target::Xid(target::parse_xid(x)?))
    } else if let Some(n) = &a.target_name {
        Some(Target::Name(target::parse_name(n)?))
    } else if a.target.as_deref() == Some("immediate") {
        Some(Target::Immediate)
    } else {
        None
    };
    if a.target_exclusive && !matches!(exact, Some(Target::Lsn(_) | Target::Xid(_))) {
        bail!("--target-exclusive applies to a drill only with --target-lsn or --target-xid\nhint: leave it out");
    }
    let target = match (exact, &a.target, &a.target_time, a.random_in_window) {
        (Some(t), _, _, _) => {
            let mut rec = Recovery::to(t);
            rec.exclusive = a.target_exclusive;
            DrillTarget::Exact(rec)
        }
        (None, Some(_), None, false) => DrillTarget::Latest,
        (None, None, Some(t), false) => DrillTarget::Time(target::parse_time(t)?),
        (None, None, None, true) => DrillTarget::RandomInWindow,
        _ => bail!("give exactly one drill target\nhint: --target latest|immediate, --target-time '2026-11-21 20:40:12+00', --target-lsn LSN, --target-xid XID, --target-name NAME or --random-in-window"),
    };
    let mut settings = Vec::new();
    for s in &a.pg_settings {
        let (k, v) = s.split_once('=').with_context(|| {
            format!("--pg-setting {s:?} is not NAME=VALUE\nhint: --pg-setting shared_buffers=256MB")
        })?;
        let k = k.trim();
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            bail!("--pg-setting {s:?}: {k:?} is not a setting name\nhint: --pg-setting shared_buffers=256MB");
        }
        server::check_extra_setting(k)?;
        settings.push((k.to_string(), v.to_string()));
    }
    let check_sql = match &a.check_sql {
        None => Vec::new(),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --check-sql file {}", p.display()))?;
            let stmts = verify::parse_check_sql(&text);
            if stmts.is_empty() {
                bail!("--check-sql file {} holds no statement\nhint: one query per statement, each ending with ';' at the end of a line", p.display());
            }
            stmts
        }
    };
    let run_as = a.run_as.as_deref().map(server::lookup_user).transpose()?;
    let tools = server::PgTools::find(a.pg_bin.as_deref(), run_as)?;
    let scratch = match &a.scratch {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tidemark-verify-{}", std::process::id())),
    };
    verify::check_scratch(&scratch)?;
    // A later system's nested repository is a repository of its own (FORMAT.md 8.7).
    let root = a.repo.open()?;
    let system = a.system.select(&root).await?;
    // The drill server gets the key in its environment (TIDEMARK_KEY), never in its files.
    let restore_command = a.repo.restore_command(&system, false)?;
    let mut tools = tools;
    tools.env = RepoArgs::key_env(&root);
    let store = system.store;
    let opts = VerifyOptions {
        scratch,
        target,
        tools,
        db_user: a.db_user.clone(),
        port: a.port,
        check_sql,
        check_db: a.check_db.clone(),
        amcheck: !a.no_amcheck,
        heapallindexed: a.heapallindexed,
        settings,
        restore_command,
        timeout: Duration::from_secs(a.timeout.max(1)),
        keep: a.keep,
    };
    let r = verify::run(&store, &opts).await;
    if a.record {
        match verify::record(&store, &r).await {
            Ok(key) => tracing::info!(%key, "drill result recorded"),
            Err(e) => {
                println!("{}", serde_json::to_string(&r)?);
                return Err(e.context("the drill ran but its result could not be recorded"));
            }
        }
    }
    println!("{}", serde_json::to_string(&r)?);
    if r.ok {
        eprintln!(
            "tidemark-restore verify: restore drill passed: backup {} to {}, RTO {:.1}s",
            r.backup.as_ref().map(|b| b.id.as_str()).unwrap_or("?"),
            r.target.time.as_deref().unwrap_or("the end of the archive"),
            r.seconds.rto.unwrap_or(0.0)
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "tidemark-restore verify: error: restore drill failed: {}",
            r.failure.as_deref().unwrap_or("unknown cause")
        );
        Ok(ExitCode::from(EXIT_FAILURE))
    }
}
