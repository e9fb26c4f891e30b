//! `backup`: a base backup of a running server, either by reading its data directory here
//! (`--source pgdata`, the default) or over the replication protocol (`--source replication`,
//! which needs only a network connection: the nightly CronJob).

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;
use tidemark_core::backup::{self, pgdata::BackupOptions, replication::ReplicationOptions};
use tidemark_core::cli::RepoArgs;
use tidemark_core::pg::ConnString;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// Read the data directory (--pgdata) between pg_backup_start and pg_backup_stop
    Pgdata,
    /// Stream it with BASE_BACKUP over a replication connection (primary or standby)
    Replication,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Where the files come from
    #[arg(
        long,
        env = "TIDEMARK_BACKUP_SOURCE",
        value_enum,
        default_value = "pgdata"
    )]
    source: Source,
    /// The server's data directory (--source pgdata)
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
    /// Connection string; default: the PG* environment variables. Never printed (it may hold a
    /// password)
    #[arg(long, env = "TIDEMARK_PG_URL", hide_env_values = true)]
    pg_url: Option<ConnString>,
    /// zstd compression level for chunks (1 is fastest; higher stores fewer bytes)
    #[arg(long, env = "TIDEMARK_COMPRESS_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    compress_level: i32,
    /// Hashing and compression threads (default: one per core)
    #[arg(long, env = "TIDEMARK_WORKERS")]
    workers: Option<usize>,
    /// Seconds to wait for the backup's WAL to reach the repository
    #[arg(long, env = "TIDEMARK_ARCHIVE_TIMEOUT", default_value_t = 300)]
    archive_timeout: u64,
    /// --source replication: ask the server to send at most this many kB/s (32..=1048576)
    #[arg(long, env = "TIDEMARK_MAX_RATE", value_name = "KB_PER_S")]
    max_rate: Option<u32>,
    /// Back up a PostgreSQL major newer than those this release is tested with (14..=18)
    #[arg(long, env = "TIDEMARK_ALLOW_UNTESTED_MAJOR")]
    allow_untested_major: bool,
    /// Back up into a repository that belongs to another database system, as a new system of it
    /// (needed only when it is not a major upgrade, which is recognised by itself)
    #[arg(long, env = "TIDEMARK_ACCEPT_NEW_SYSTEM")]
    accept_new_system: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let store = a.repo.open()?;
    let workers = a.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let started = std::time::Instant::now();
    let h = match a.source {
        Source::Pgdata => {
            let pgdata = a.pgdata.context("backup --source pgdata needs the data directory\nhint: pass --pgdata DIR (or set PGDATA), or use --source replication")?;
            let opts = BackupOptions {
                pgdata,
                pg_url: a.pg_url,
                compress_level: a.compress_level,
                workers,
                archive_timeout: Duration::from_secs(a.archive_timeout),
                allow_untested_major: a.allow_untested_major,
                accept_new_system: a.accept_new_system,
            };
            backup::pgdata::run(&store, &opts).await?
        }
        Source::Replication => {
            let opts = ReplicationOptions {
                pg_url: a.pg_url,
                compress_level: a.compress_level,
                workers,
                archive_timeout: Duration::from_secs(a.archive_timeout),
                max_rate_kb: a.max_rate,
                allow_untested_major: a.allow_untested_major,
                accept_new_system: a.accept_new_system,
            };
            backup::replication::run(&store, &opts).await?
        }
    };
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "schema_version": 1,
            "backup_id": h.backup_id,
            "parent": h.parent,
            "start_lsn": h.start_lsn.to_string(),
            "stop_lsn": h.stop_lsn.to_string(),
            "logical_bytes": h.stats.logical_bytes,
            "new_chunk_bytes": h.stats.new_chunk_bytes,
            "new_stored_bytes": h.stats.new_stored_bytes,
            "new_objects": h.stats.new_objects,
            "new_chunks": h.stats.new_chunks,
            "reused_chunks": h.stats.reused_chunks,
            "source": if h.source == tidemark_format::manifest::SOURCE_REPLICATION { "replication" } else { "pgdata" },
            "pg_version": h.pg_version,
            "from_standby": h.flags & tidemark_format::manifest::FLAG_FROM_STANDBY != 0,
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!(
            "backup {} complete: {} bytes read in {:.1}s, {} bytes stored in {} new objects",
            h.backup_id, h.stats.logical_bytes, secs, h.stats.new_stored_bytes, h.stats.new_objects
        );
    }
    Ok(())
}
