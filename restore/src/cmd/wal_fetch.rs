//! `wal-fetch <file> <dest>`: the restore_command. Exit 1 quickly and quietly when the archive
//! lacks the file; retry other errors and exit 128 if they persist, so that recovery aborts
//! instead of ending early on WAL that exists but could not be read.
//!
//! A repository that does not exist (no config object) is "missing" for a standby in standby
//! mode (`standby.signal` in the data directory): it falls back to streaming from its primary,
//! and a loud warning says so. Any other recovery aborts (128): a PITR from a repository that
//! is not there must not promote.
//!
//! The first request of a startup process whose restore is to promote without the end-of-recovery
//! checkpoint (`tidemark_core::restore::promote`) requests that server's promotion, which
//! PostgreSQL acts on at the recovery target or the end of the archive.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidemark_core::cli::{self, RepoArgs};
use tidemark_core::prefetch::{self, Filler, Prefetch};
use tidemark_core::restore::promote;
use tidemark_core::wal::{self, WalError};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// The database system whose WAL to fetch, when it is a later system of the repository
    /// (a major upgrade; restore and verify write it into restore_command); default: the
    /// repository's top-level system
    #[arg(long = "system-id", value_name = "ID")]
    system_id: Option<u64>,
    /// Attempts before giving up on a storage error
    #[arg(long, env = "TIDEMARK_FETCH_ATTEMPTS", default_value_t = 5)]
    attempts: u32,
    /// Segments fetched ahead in parallel into the spool (0 turns prefetch off)
    #[arg(long, env = "TIDEMARK_PREFETCH", default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=64))]
    prefetch: u32,
    /// Prefetch spool directory (default: .tidemark-prefetch beside the destination, i.e. in pg_wal;
    /// without it, prefetch runs only when PostgreSQL's startup process asks, not for pg_rewind)
    #[arg(long, env = "TIDEMARK_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Most bytes of (decoded) segments the spool holds
    #[arg(long, env = "TIDEMARK_SPOOL_MAX_BYTES", default_value_t = 1 << 30)]
    spool_max_bytes: u64,
    /// Internal: run as the background filler of the prefetch spool (started by a request;
    /// writes nothing to the destination)
    #[arg(long = "fill-spool", hide = true)]
    fill_spool: bool,
    /// The archived file's name (%f)
    file: String,
    /// Where to write it (%p)
    dest: PathBuf,
}

/// True only when the store answers that it has no config object (not on a storage error).
async fn repository_missing(store: &tidemark_core::store::Store) -> bool {
    matches!(tidemark_core::repo::load_config(store).await, Ok(None))
}

/// True when retrying cannot help: the store refused the credentials, or an object failed its
/// authentication or is encrypted without a key. Recovery is aborted at once instead of after
/// every attempt's backoff.
fn hopeless(e: &anyhow::Error) -> bool {
    use tidemark_core::store::StoreError;
    e.chain().any(|c| {
        c.downcast_ref::<StoreError>().is_some_and(|s| {
            matches!(
                s,
                StoreError::Sealed { .. } | StoreError::Encrypted { .. } | StoreError::Locked { .. }
            ) || matches!(s, StoreError::Io { message, retryable: false, .. } if message.contains("HTTP 40"))
        })
    })
}

/// True when the server asking is a standby in standby mode: `standby.signal` in its data
/// directory, and neither a restore's recovery to the end of the archive (which runs in standby
/// mode only to be promoted where the archive ends) nor a server with a promotion pending
/// (`promote`): for those a missing repository aborts recovery.
fn in_standby_mode(dest: &std::path::Path) -> bool {
    let data = promote::data_dir_of(dest);
    data.join("standby.signal").is_file() && !promote::wanted(data)
}

/// PostgreSQL's startup process asks for `file`: a restore's recovery that is to promote
/// without the end-of-recovery checkpoint has its promotion requested, once per postmaster
/// (`promote`). A failure to request it is reported, not returned: the file is fetched either
/// way.
fn request_promotion(file: &str, dest: &std::path::Path) {
    let data = promote::data_dir_of(dest);
    match promote::request(data) {
        Ok(true) => {
            tracing::info!(file = %file, "promotion requested: PostgreSQL promotes this server at its recovery target, or where the archive has no next segment, and leaves the checkpoint to the background")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(file = %file, error = %format!("{e:#}"), "promotion could not be requested or signalled again: at its recovery target the server may pause, and at the end of the archive wait in standby mode; tried again at the next file\nhint: if it stays there, promote it by hand (pg_ctl promote -D {}, or SELECT pg_promote())", std::path::absolute(data).unwrap_or_else(|_| data.to_path_buf()).display())
        }
    }
}

/// The store of the system asked for; an encrypted repository is unlocked here, once.
async fn open(a: &Args) -> anyhow::Result<tidemark_core::store::Store> {
    let root = a.repo.open()?;
    if let Some(id) = a.system_id {
        return Ok(
            tidemark_core::repo::select_system(&root, Some(tidemark_format::SystemId(id)))
                .await?
                .store,
        );
    }
    if root.user_key().is_some() {
        // Unlock now (a missing repository stays locked and is reported as missing below).
        tidemark_core::repo::load_config(&root).await?;
    }
    Ok(root)
}

pub async fn run(a: Args) -> ExitCode {
    let store = match open(&a).await {
        Ok(s) => s,
        Err(e) => {
            cli::report("tidemark-restore wal-fetch", &e);
            return ExitCode::from(cli::EXIT_ABORT_RECOVERY);
        }
    };
    // PostgreSQL's startup process restores into pg_wal/RECOVERYXLOG (RECOVERYHISTORY for a
    // history file). Any other caller, such as pg_rewind --restore-target-wal, which writes the
    // file under its own name while it walks pg_wal, gets a plain fetch unless a spool directory
    // was named: a spool in pg_wal must not change under a program listing it.
    let startup = a
        .dest
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("RECOVERY"));
    let prefetch = (a.prefetch > 0 && (startup || a.spool_dir.is_some())).then(|| Prefetch {
        depth: a.prefetch as usize,
        spool: a.spool_dir.clone().unwrap_or_else(|| {
            a.dest
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .join(".tidemark-prefetch")
        }),
        max_bytes: a.spool_max_bytes,
        // The spool is filled by a background copy of this command, so that each request
        // costs a rename while the next segments are decoded during replay.
        filler: match std::env::current_exe() {
            Ok(program) => Filler::Background {
                program,
                args: std::env::args_os().skip(1).collect(),
            },
            Err(_) => Filler::Inline,
        },
    });
    if a.fill_spool {
        // The background filler a request started: nobody waits for its exit status, and a
        // status of 0 must never stand for a file written (hence 1 whatever happened).
        if let Some(p) = &prefetch {
            prefetch::fill_background(&store, &a.file, p).await;
        }
        return ExitCode::from(cli::EXIT_FAILURE);
    }
    if startup {
        request_promotion(&a.file, &a.dest);
    }
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=a.attempts.max(1) {
        let r = match &prefetch {
            Some(p) => prefetch::fetch(&store, &a.file, &a.dest, p)
                .await
                .map(|_| ()),
            None => wal::fetch(&store, &a.file, &a.dest).await,
        };
        let e = match r {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) => e,
        };
        // Asked once per failure: a missing repository decides both cases below.
        let missing_repo = repository_missing(&store).await;
        match e {
            e if matches!(
                e.downcast_ref::<WalError>(),
                Some(WalError::NotFound { .. })
            ) && !missing_repo =>
            {
                tracing::debug!(file = %a.file, "not in the archive");
                return ExitCode::from(cli::EXIT_FAILURE);
            }
            e if missing_repo => {
                if in_standby_mode(&a.dest) {
                    tracing::warn!(file = %a.file, repo = %store.url(), "the repository does not exist (no config object): reporting the file as missing so this standby keeps streaming from its primary\nhint: check --repo / TIDEMARK_REPO; the repository is created by the primary's first wal-push or backup");
                    return ExitCode::from(cli::EXIT_FAILURE);
                }
                cli::report("tidemark-restore wal-fetch", &e.context(format!("repository {} does not exist (no config object); aborting recovery rather than ending it early\nhint: check --repo / TIDEMARK_REPO", store.url())));
                return ExitCode::from(cli::EXIT_ABORT_RECOVERY);
            }
            e if attempt < a.attempts && !hopeless(&e) => {
                tracing::warn!(file = %a.file, repo = %store.url(), attempt, error = %format!("{e:#}"), hint = "retried with backoff; recovery is aborted, never ended early, if every attempt fails", "fetch failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            e => {
                cli::report("tidemark-restore wal-fetch", &e.context(format!("giving up on wal file {} after {attempt} attempts; aborting recovery rather than ending it early", a.file)));
                return ExitCode::from(cli::EXIT_ABORT_RECOVERY);
            }
        }
    }
    ExitCode::from(cli::EXIT_ABORT_RECOVERY)
}
