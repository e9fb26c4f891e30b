//! `backup --pgdata DIR`: a base backup of a running server whose data directory is readable here.

use anyhow::Result;
use std::path::PathBuf;
use std::time::Duration;
use tidemark_core::backup::{self, BackupOptions};
use tidemark_core::cli::RepoArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// The server's data directory
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
    /// Connection string; default: the PG* environment variables
    #[arg(long, env = "TIDEMARK_PG_URL")]
    pg_url: Option<String>,
    /// zstd compression level for chunks (1 is fastest; higher stores fewer bytes)
    #[arg(long, env = "TIDEMARK_COMPRESS_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    compress_level: i32,
    /// Hashing and compression threads (default: one per core)
    #[arg(long, env = "TIDEMARK_WORKERS")]
    workers: Option<usize>,
    /// Seconds to wait for the backup's WAL to reach the repository
    #[arg(long, env = "TIDEMARK_ARCHIVE_TIMEOUT", default_value_t = 300)]
    archive_timeout: u64,
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
    let opts = BackupOptions {
        pgdata: a.pgdata,
        pg_url: a.pg_url,
        compress_level: a.compress_level,
        workers,
        archive_timeout: Duration::from_secs(a.archive_timeout),
    };
    let started = std::time::Instant::now();
    let h = backup::run(&store, &opts).await?;
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "schema_version": 1,
            "backup_id": h.backup_id,
            "start_lsn": h.start_lsn.to_string(),
            "stop_lsn": h.stop_lsn.to_string(),
            "logical_bytes": h.stats.logical_bytes,
            "new_chunk_bytes": h.stats.new_chunk_bytes,
            "new_stored_bytes": h.stats.new_stored_bytes,
            "new_objects": h.stats.new_objects,
            "new_chunks": h.stats.new_chunks,
            "reused_chunks": h.stats.reused_chunks,
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
