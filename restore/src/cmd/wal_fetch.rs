//! `wal-fetch <file> <dest>`: the restore_command. Exit 1 quickly and quietly when the archive
//! lacks the file; retry other errors and exit 128 if they persist, so that recovery aborts
//! instead of ending early on WAL that exists but could not be read.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidemark_core::cli::{self, RepoArgs};
use tidemark_core::wal::{self, WalError};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Attempts before giving up on a storage error
    #[arg(long, env = "TIDEMARK_FETCH_ATTEMPTS", default_value_t = 5)]
    attempts: u32,
    /// The archived file's name (%f)
    file: String,
    /// Where to write it (%p)
    dest: PathBuf,
}

pub async fn run(a: Args) -> ExitCode {
    let store = match a.repo.open() {
        Ok(s) => s,
        Err(e) => {
            cli::report("tidemark-restore wal-fetch", &e);
            return ExitCode::from(cli::EXIT_ABORT_RECOVERY);
        }
    };
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=a.attempts.max(1) {
        match wal::fetch(&store, &a.file, &a.dest).await {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e)
                if matches!(
                    e.downcast_ref::<WalError>(),
                    Some(WalError::NotFound { .. })
                ) =>
            {
                tracing::debug!(file = %a.file, "not in the archive");
                return ExitCode::from(cli::EXIT_FAILURE);
            }
            Err(e) if attempt < a.attempts => {
                tracing::warn!(file = %a.file, attempt, error = %format!("{e:#}"), "fetch failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                cli::report("tidemark-restore wal-fetch", &e.context(format!("giving up on wal file {} after {attempt} attempts; aborting recovery rather than ending it early", a.file)));
                return ExitCode::from(cli::EXIT_ABORT_RECOVERY);
            }
        }
    }
    ExitCode::from(cli::EXIT_ABORT_RECOVERY)
}
