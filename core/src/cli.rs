//! Command-line pieces both binaries share: the repository option, logging set-up and exit codes.
//!
//! Exit codes (documented in README.md):
//! - 0: success
//! - 1: failure; for `wal-fetch`, also "the archive does not have this file"
//! - 2: usage error (bad flags or arguments)
//! - 128: `wal-fetch` could not read the archive (persistent storage error or damaged object);
//!   PostgreSQL aborts recovery instead of treating the file as missing.

use crate::store::Store;
use anyhow::Result;

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_ABORT_RECOVERY: u8 = 128;

/// `--repo URL`, also read from `TIDEMARK_REPO`.
#[derive(clap::Args, Clone, Debug)]
pub struct RepoArgs {
    /// Repository URL: file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix
    #[arg(long = "repo", env = "TIDEMARK_REPO", value_name = "URL")]
    pub repo: String,
}

impl RepoArgs {
    pub fn open(&self) -> Result<Store> {
        Ok(Store::open(&self.repo)?)
    }
}

/// `--system-id`: which database system of a repository a reader works on (a repository holds
/// several after a major upgrade; FORMAT.md 8.7).
#[derive(clap::Args, Clone, Debug)]
pub struct SystemArgs {
    /// The database system to read (its system identifier, as `info` lists it), when the
    /// repository holds several after a major upgrade; default: the newest
    #[arg(long = "system-id", value_name = "ID")]
    pub system_id: Option<u64>,
}

impl SystemArgs {
    /// The chosen system's store (the repository itself, or its nested `systems/<id>/`).
    pub async fn select(&self, root: &Store) -> Result<crate::repo::System> {
        crate::repo::select_system(root, self.system_id.map(tidemark_format::SystemId)).await
    }
}

/// Logging options.
#[derive(clap::Args, Clone, Debug)]
pub struct LogArgs {
    /// Log format on stderr
    #[arg(
        long,
        env = "TIDEMARK_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter, e.g. info, debug, tidemark_core=debug
    #[arg(long, env = "TIDEMARK_LOG", default_value = "info", global = true)]
    pub log: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sends logs to stderr (stdout is for data).
pub fn init_tracing(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match args.log_format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// Prints an error chain the way every tidemark command reports failure.
pub fn report(prog: &str, e: &anyhow::Error) {
    let mut msg = format!("{prog}: error: {e}");
    for cause in e.chain().skip(1) {
        msg.push_str(&format!("\n  caused by: {cause}"));
    }
    eprintln!("{msg}");
}

/// Runs a command on a multi-threaded runtime and maps the outcome to an exit code: the
/// command's own code on success, [`EXIT_FAILURE`] after reporting an error, and
/// `runtime_failure` when no runtime can be started.
pub fn run_command<F>(prog: &str, runtime_failure: u8, command: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<std::process::ExitCode>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{prog}: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(runtime_failure);
        }
    };
    match rt.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            report(prog, &e);
            std::process::ExitCode::from(EXIT_FAILURE)
        }
    }
}
