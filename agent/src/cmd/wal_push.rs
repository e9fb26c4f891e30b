//! `wal-push <path>`: the archive_command.

use anyhow::Result;
use std::path::PathBuf;
use tidemark_core::cli::RepoArgs;
use tidemark_core::wal::{self, PushOutcome};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// zstd compression level for WAL objects
    #[arg(long, env = "TIDEMARK_WAL_COMPRESS_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    compress_level: i32,
    /// The WAL file to archive (%p)
    path: PathBuf,
}

pub async fn run(a: Args) -> Result<()> {
    let store = a.repo.open()?;
    let outcome = wal::push(&store, &a.path, a.compress_level).await?;
    let name = a
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match outcome {
        PushOutcome::Stored => tracing::debug!(file = %name, "archived"),
        PushOutcome::AlreadyArchived => {
            tracing::info!(file = %name, "already archived with identical content")
        }
    }
    Ok(())
}
