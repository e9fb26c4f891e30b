//! tidemark-agent: archives WAL (archive_command), takes base backups, expires them and reports
//! on the repository. Exit codes: 0 success, 1 failure, 2 usage error.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tidemark_core::cli::{self, LogArgs};

#[derive(Parser)]
#[command(
    name = "tidemark-agent",
    version,
    about = "PostgreSQL WAL archiving and base backups into a tidemark repository"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Archive one WAL file (use as archive_command = 'tidemark-agent wal-push %p')
    WalPush(cmd::wal_push::Args),
    /// Archive WAL continuously next to PostgreSQL (the sidecar daemon)
    Sidecar(cmd::sidecar::Args),
    /// Take a base backup of a running PostgreSQL server
    Backup(cmd::backup::Args),
    /// Show backups and archived WAL
    Info(cmd::info::Args),
    /// Remove backups a retention policy no longer keeps, and the packs and WAL only they needed
    Expire(cmd::expire::Args),
    /// Manage the keys of an encrypted repository (add, remove, list)
    Key(cmd::key::Args),
    /// Create an encrypted repository ahead of its first writer
    Repo(cmd::repo::Args),
    /// Serve the repository's health gauges for Prometheus (without a sidecar)
    Exporter(cmd::exporter::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_tracing(&cli.log);
    cli::run_command("tidemark-agent", cli::EXIT_FAILURE, async {
        let r = match cli.cmd {
            Command::WalPush(a) => cmd::wal_push::run(a).await,
            Command::Sidecar(a) => cmd::sidecar::run(a).await,
            Command::Backup(a) => cmd::backup::run(a).await,
            Command::Info(a) => cmd::info::run(a).await,
            Command::Expire(a) => cmd::expire::run(a).await,
            Command::Key(a) => cmd::key::run(a).await,
            Command::Repo(a) => cmd::repo::run(a).await,
            Command::Exporter(a) => cmd::exporter::run(a).await,
        };
        r.map(|()| ExitCode::SUCCESS)
    })
}
