//! Command-line pieces both binaries share: the repository option, logging set-up and exit codes.
//!
//! Exit codes (documented in README.md):
//! - 0: success
//! - 1: failure; for `wal-fetch`, also "the archive does not have this file"
//! - 2: usage error (bad flags or arguments)
//! - 128: `wal-fetch` could not read the archive (persistent storage error or damaged object);
//!   PostgreSQL aborts recovery instead of treating the file as missing.

use crate::store::Store;
use anyhow::{Context, Result};

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_ABORT_RECOVERY: u8 = 128;

/// `--repo URL`, also read from `TIDEMARK_REPO`, and the key of an encrypted repository.
#[derive(clap::Args, Clone, Debug)]
pub struct RepoArgs {
    /// Repository URL: file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix
    #[arg(long = "repo", env = "TIDEMARK_REPO", value_name = "URL")]
    pub repo: String,
    /// File holding the encryption key of the repository (e.g. a Kubernetes Secret mounted as a
    /// file); the key may also come from the TIDEMARK_KEY environment variable or --key-command.
    /// With a key, a new repository is created encrypted
    #[arg(long = "key-file", env = "TIDEMARK_KEY_FILE", value_name = "PATH")]
    pub key_file: Option<std::path::PathBuf>,
    /// Command whose standard output is the repository's encryption key (a KMS or Vault CLI),
    /// run with /bin/sh -c
    #[arg(
        long = "key-command",
        env = "TIDEMARK_KEY_COMMAND",
        value_name = "COMMAND",
        hide_env_values = true
    )]
    pub key_command: Option<String>,
}

/// The environment variable that may hold a repository key (never a command-line flag: the
/// command line is visible to every user of the machine).
pub const KEY_ENV: &str = "TIDEMARK_KEY";

impl RepoArgs {
    /// Opens the repository's store with its key, if one is given. An encrypted repository is
    /// unlocked on its first config read (`repo::load_config`).
    pub fn open(&self) -> Result<Store> {
        let store = Store::open(&self.repo)?;
        let key = crate::encryption::read_user_key(
            self.key_file.as_deref(),
            KEY_ENV,
            self.key_command.as_deref(),
            "repository key",
        )?;
        Ok(match key {
            Some(k) => store.with_user_key(k),
            None => store,
        })
    }

    /// The restore_command fetching WAL of `system` from this repository: the root URL (and
    /// `--system-id` for a later system's nested repository, FORMAT.md 8.7), and with
    /// `pass_key` the options that give it the same key.
    pub fn restore_command(&self, system: &crate::repo::System, pass_key: bool) -> Result<String> {
        let exe = std::env::current_exe()
            .context("cannot find the path of tidemark-restore for restore_command")?;
        let mut words = vec![
            exe.to_string_lossy().into_owned(),
            "wal-fetch".into(),
            "--repo".into(),
            self.repo.clone(),
        ];
        if !system.top_level {
            words.extend(["--system-id".into(), system.system_id.to_string()]);
        }
        if pass_key {
            words.extend(self.key_options()?);
        }
        let words: Vec<String> = words
            .iter()
            .map(|w| crate::restore::shell_quote(w))
            .collect();
        Ok(format!("{} %f %p", words.join(" ")))
    }

    /// The environment that gives a child process (the drill server, hence its
    /// restore_command) this store's key: `TIDEMARK_KEY` set, the other key variables removed.
    pub fn key_env(store: &Store) -> Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> {
        use std::os::unix::ffi::OsStrExt;
        let Some(k) = store.user_key() else {
            return Vec::new();
        };
        vec![
            (
                KEY_ENV.into(),
                Some(std::ffi::OsStr::from_bytes(k.bytes()).to_os_string()),
            ),
            ("TIDEMARK_KEY_FILE".into(), None),
            ("TIDEMARK_KEY_COMMAND".into(), None),
        ]
    }

    /// The options that give a restore_command (`tidemark-restore wal-fetch`) the same key:
    /// `--key-file` with an absolute path, or `--key-command`. A key from `TIDEMARK_KEY` cannot be
    /// passed on (it would land in postgresql.auto.conf): the server's environment must carry it.
    pub fn key_options(&self) -> Result<Vec<String>> {
        if let Some(f) = &self.key_file {
            let abs = std::path::absolute(f)
                .with_context(|| format!("cannot resolve the key file {}", f.display()))?;
            return Ok(vec![
                "--key-file".into(),
                abs.to_string_lossy().into_owned(),
            ]);
        }
        if let Some(c) = &self.key_command {
            return Ok(vec!["--key-command".into(), c.clone()]);
        }
        Ok(Vec::new())
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
        .with_ansi(colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_target(false);
    match args.log_format {
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            b.json().init()
        }
        LogFormat::Text => b.init(),
    }
}

/// Set once the logs are JSON: then a command's final error is one JSON log line too.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// An error chain as one message (`outer: cause: ...`) and its `hint:` lines apart.
fn split_hints(e: &anyhow::Error) -> (String, Vec<String>) {
    let mut parts = Vec::new();
    let mut hints = Vec::new();
    for cause in e.chain() {
        let mut text = Vec::new();
        for line in cause.to_string().lines() {
            match line.trim_start().strip_prefix("hint:") {
                Some(h) => hints.push(h.trim().to_string()),
                None => text.push(line.to_string()),
            }
        }
        parts.push(text.join(" "));
    }
    (parts.join(": "), hints)
}

/// Colour (ANSI escapes) in text logs only on a terminal, and never when `NO_COLOR` is set to
/// anything non-empty (no-color.org): a file, a pipe, `kubectl logs` or PostgreSQL's log (where
/// archive_command's errors land) gets plain text.
fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Prints an error chain the way every tidemark command reports failure.
pub fn report(prog: &str, e: &anyhow::Error) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        // One JSON line that log collectors keep whole: the object in `error`, what to do in
        // `hint` (a multi-line text report would arrive as unparsable fragments).
        let (error, hints) = split_hints(e);
        tracing::error!(command = prog, error = %error, hint = %hints.join("; "), "{prog} failed");
        return;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_splits_into_its_message_and_hints() {
        let e =
            anyhow::anyhow!("wal segment 000000010000000000000042 is missing\nhint: check pg_wal")
                .context("cannot archive 000000010000000000000042");
        let (msg, hints) = split_hints(&e);
        assert_eq!(
            msg,
            "cannot archive 000000010000000000000042: wal segment 000000010000000000000042 is missing"
        );
        assert_eq!(hints, vec!["check pg_wal".to_string()]);
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(std::ffi::OsStr::new(""))));
        assert!(!colour(true, Some(std::ffi::OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
