//! tidemark-restore: rebuilds a data directory from a tidemark repository and serves WAL to
//! recovery (restore_command). Exit codes: 0 success, 1 failure (wal-fetch: file not in the
//! archive), 2 usage error, 128 wal-fetch could not read the archive (aborts recovery).

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tidemark_core::cli::{self, LogArgs};

#[derive(Parser)]
#[command(
    name = "tidemark-restore",
    version,
    about = "Restore PostgreSQL from a tidemark repository"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Restore a base backup into an empty directory (or over one with --delta) and configure
    /// recovery to a target, or as a standby (--standby)
    Restore(cmd::restore::Args),
    /// Check that every backup's chunks and WAL are present (and, with --read-data, sound)
    Check(cmd::check::Args),
    /// Fetch one archived WAL file (use as restore_command)
    WalFetch(cmd::wal_fetch::Args),
    /// Restore drill: restore into a scratch directory, start PostgreSQL, check it reached the target
    Verify(cmd::verify::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_tracing(&cli.log);
    cli::run_command("tidemark-restore", cli::EXIT_ABORT_RECOVERY, async {
        match cli.cmd {
            Command::Restore(a) => cmd::restore::run(a).await.map(|()| ExitCode::SUCCESS),
            Command::Check(a) => cmd::check::run(a).await.map(|()| ExitCode::SUCCESS),
            Command::WalFetch(a) => Ok(cmd::wal_fetch::run(a).await),
            Command::Verify(a) => cmd::verify::run(a).await,
        }
    })
}
