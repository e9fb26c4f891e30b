//! `wal-push <path>`: the archive_command. With `--socket-dir` it hands the file to a running
//! sidecar and waits until the sidecar reports it durably stored; when no sidecar answers it
//! uploads the file itself. It never reports success for a file that is not durably stored.

use anyhow::Result;
use std::path::PathBuf;
use tidemark_core::cli::RepoArgs;
use tidemark_core::sidecar;
use tidemark_core::wal::{self, PushOutcome};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// zstd compression level for WAL objects
    #[arg(long, env = "TIDEMARK_WAL_COMPRESS_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    compress_level: i32,
    /// The sidecar's socket directory; when set, hand the file to the sidecar if one is running
    #[arg(long, env = "TIDEMARK_SOCKET_DIR")]
    socket_dir: Option<PathBuf>,
    /// The data directory (default: the parent of the file's pg_wal/, else the working directory,
    /// where archive_command runs); tells the system of .history and .backup files
    #[arg(long, env = "TIDEMARK_PGDATA")]
    pgdata: Option<PathBuf>,
    /// Archive into a repository that belongs to another database system, as a new system of it
    /// (needed only when it is not a major upgrade, which is recognised by itself)
    #[arg(long, env = "TIDEMARK_ACCEPT_NEW_SYSTEM")]
    accept_new_system: bool,
    /// The WAL file to archive (%p)
    path: PathBuf,
}

pub async fn run(a: Args) -> Result<()> {
    let name = a
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The sidecar reads pg_wal itself: hand off only files PostgreSQL passes from pg_wal.
    let from_pg_wal = a
        .path
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|d| d == "pg_wal");
    if let (Some(dir), true) = (&a.socket_dir, from_pg_wal) {
        match sidecar::handoff(dir, &name).await {
            Some(Ok(())) => {
                tracing::debug!(file = %name, "archived by the sidecar");
                return Ok(());
            }
            Some(Err(e)) => return Err(e),
            None => tracing::info!(file = %name, "no sidecar answered; uploading directly"),
        }
    }
    let store = a.repo.open()?;
    let opts = wal::PushOptions {
        pgdata: a.pgdata,
        accept_new_system: a.accept_new_system,
        ..Default::default()
    };
    match wal::push(&store, &a.path, a.compress_level, &opts).await? {
        PushOutcome::Stored(_) => tracing::debug!(file = %name, "archived"),
        PushOutcome::AlreadyArchived => {
            tracing::info!(file = %name, "already archived with identical content")
        }
    }
    Ok(())
}
