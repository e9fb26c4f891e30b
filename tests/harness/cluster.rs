//! PostgreSQL servers for the tests: a source cluster that archives into a tidemark repository,
//! and servers started on restored data directories.
//!
//! Invariants:
//! - Every server listens only on 127.0.0.1 and a unix socket directory of its own, on a port
//!   found free at start (a start that loses the port race is retried on another port).
//! - Dropping a [`PgCluster`] stops its server (immediate mode), even when the test panics.
//! - A restored server never archives: it would push a new timeline into the repository the
//!   test is still restoring from.

use crate::env::{self, db_command, give_to_db_user, TestDir};
use crate::repo::Repo;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// How long a server may take to start or to finish recovery.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of server log quoted in failure messages.
const LOG_TAIL: usize = 80;

/// One PostgreSQL server and its data directory.
pub struct PgCluster {
    _dir: TestDir,
    pub name: String,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    port: u16,
    running: bool,
    /// The PostgreSQL major this cluster was created with (`None`: read `PG_VERSION` at start).
    major: Option<u32>,
    /// Options for the postmaster's command line (`pg_ctl start -o`), none when empty.
    server_options: String,
}

impl PgCluster {
    /// `initdb --data-checksums` into `<scratch>/<name>/data`; the server is not started.
    pub async fn initdb(dir: &TestDir, name: &str) -> Result<PgCluster> {
        PgCluster::initdb_major(dir, name, 15, &[]).await
    }

    /// `initdb` of PostgreSQL `major` with `extra` arguments (e.g. `--wal-segsize=32`).
    pub async fn initdb_major(
        dir: &TestDir,
        name: &str,
        major: u32,
        extra: &[&str],
    ) -> Result<PgCluster> {
        let base = dir.mkdir(name)?;
        let data = base.join("data");
        let sock = dir.mkdir(&format!("{name}/sock"))?;
        let mut cmd = db_command(env::pg_bin_dir_for(major)?.join("initdb"))?;
        cmd.args(extra);
        cmd.args([
            "--data-checksums",
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-instructions",
            "-D",
        ])
        .arg(&data);
        let r = env::run(cmd).await?;
        if !r.success() {
            bail!("initdb failed:\n{r}");
        }
        Ok(PgCluster {
            _dir: dir.clone(),
            name: name.to_string(),
            data,
            sock,
            log: base.join("server.log"),
            port: 0,
            running: false,
            server_options: String::new(),
            major: Some(major),
        })
    }

    /// A source cluster: initdb with data checksums, archive_command = tidemark-agent wal-push
    /// into `repo`, started.
    pub async fn start_archiving(dir: &TestDir, name: &str, repo: &Repo) -> Result<PgCluster> {
        PgCluster::start_archiving_major(dir, name, repo, 15, &[]).await
    }

    /// [`PgCluster::start_archiving`] with PostgreSQL `major` and extra initdb arguments.
    pub async fn start_archiving_major(
        dir: &TestDir,
        name: &str,
        repo: &Repo,
        major: u32,
        initdb_args: &[&str],
    ) -> Result<PgCluster> {
        let mut c = PgCluster::initdb_major(dir, name, major, initdb_args).await?;
        let agent = env::bins()?.agent;
        let archive_command = format!(
            "{} wal-push --repo {} %p",
            shell_word(&agent.to_string_lossy()),
            shell_word(&repo.url)
        );
        c.start_with_archive_command(&archive_command).await?;
        Ok(c)
    }

    /// Appends the harness's server settings with `archive_command` and starts the server.
    pub async fn start_with_archive_command(&mut self, archive_command: &str) -> Result<()> {
        self.append_conf(
            "postgresql.conf",
            &format!(
                "\n# written by the tidemark e2e harness\n\
                 listen_addresses = '127.0.0.1'\n\
                 unix_socket_directories = {}\n\
                 wal_level = replica\n\
                 archive_mode = on\n\
                 archive_command = {}\n\
                 fsync = off\n\
                 shared_buffers = 32MB\n\
                 max_connections = 20\n\
                 max_wal_size = 128MB\n\
                 min_wal_size = 64MB\n\
                 checkpoint_timeout = 5min\n\
                 log_min_messages = info\n\
                 log_line_prefix = '%m [%p] '\n",
                conf_quote(&self.sock.to_string_lossy()),
                conf_quote(archive_command)
            ),
        )?;
        self.start().await
    }

    /// A cluster on a data directory made elsewhere (e.g. by `tidemark-restore restore`), with a
    /// socket directory and log under `<scratch>/<name>`; not started, nothing configured.
    pub fn adopt(dir: &TestDir, name: &str, data: &Path) -> Result<PgCluster> {
        let base = dir.mkdir(name)?;
        let sock = dir.mkdir(&format!("{name}/sock"))?;
        let log = base.join("server.log");
        std::fs::write(&log, b"")?;
        give_to_db_user(&log)?;
        Ok(PgCluster {
            _dir: dir.clone(),
            name: name.to_string(),
            data: data.to_path_buf(),
            sock,
            log,
            port: 0,
            running: false,
            server_options: String::new(),
            major: None,
        })
    }

    /// This cluster's PostgreSQL major: the one it was created with, else its data directory's
    /// `PG_VERSION` (a restored cluster); `None` before a restored directory exists.
    pub fn major(&self) -> Option<u32> {
        self.major.or_else(|| env::data_dir_major(&self.data))
    }

    /// The bin directory of this cluster's major ([`PgCluster::major`]), else the suite's
    /// default.
    pub fn bin_dir(&self) -> Result<PathBuf> {
        match self.major() {
            Some(m) => env::pg_bin_dir_for(m),
            None => env::pg_bin_dir(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq connection string for this server (TCP on 127.0.0.1, user postgres, trust auth).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres application_name=tidemark-e2e",
            self.port
        )
    }

    /// A new connection; the connection is driven on the current runtime.
    pub async fn client(&self) -> Result<Client> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(), NoTls)
            .await
            .with_context(|| format!("cannot connect to {} on port {}", self.name, self.port))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Whether the server is in recovery (`pg_is_in_recovery()`, on a new connection).
    pub async fn in_recovery(&self) -> Result<bool> {
        Ok(self
            .client()
            .await?
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0))
    }

    /// Appends text to a configuration file of the data directory.
    pub fn append_conf(&self, file: &str, text: &str) -> Result<()> {
        let p = self.data.join(file);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .with_context(|| format!("cannot open {}", p.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("cannot append to {}", p.display()))
    }

    /// Starts the server on a free port (`pg_ctl start -w`), retrying another port if it was taken.
    pub async fn start(&mut self) -> Result<()> {
        let mut last = String::new();
        for _attempt in 0..5 {
            let port = env::free_port()?;
            self.append_conf(
                "postgresql.auto.conf",
                &format!("\n# port chosen by the tidemark e2e harness\nport = {port}\n"),
            )?;
            let log_len = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
            let mut cmd = db_command(self.bin_dir()?.join("pg_ctl"))?;
            cmd.args([
                "start",
                "-w",
                "-t",
                &START_TIMEOUT.as_secs().to_string(),
                "-D",
            ])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log);
            if !self.server_options.is_empty() {
                cmd.arg("-o").arg(&self.server_options);
            }
            let r = env::run(cmd).await?;
            if r.success() {
                self.port = port;
                self.running = true;
                return Ok(());
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let new = log.get(log_len as usize..).unwrap_or("");
            if new.contains("could not bind") || new.contains("Address already in use") {
                last = format!("port {port} was taken");
                continue;
            }
            bail!("{} did not start:\n{r}\n{}", self.name, self.log_tail());
        }
        bail!("{} did not start: {last} five times", self.name)
    }

    /// Stops the server (`pg_ctl stop -m fast`).
    pub async fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let mut cmd = db_command(self.bin_dir()?.join("pg_ctl"))?;
        cmd.args(["stop", "-w", "-m", "fast", "-D"]).arg(&self.data);
        let r = env::run(cmd).await?;
        if !r.success() {
            bail!("{} did not stop:\n{r}\n{}", self.name, self.log_tail());
        }
        self.running = false;
        Ok(())
    }

    /// The server log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the server log, labelled, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL);
        format!(
            "--- last {} lines of {} ---\n{}\n--- end of log ---",
            lines.len() - from,
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// [`PgCluster::backup`], returning only the new backup's id.
    pub async fn backup_id(&self, repo: &Repo) -> Result<String> {
        let b = self.backup(repo).await?;
        Ok(b["backup_id"]
            .as_str()
            .context("backup --json printed no backup_id")?
            .to_string())
    }

    /// `tidemark-agent backup --pgdata --json` of this server into `repo` with extra
    /// environment `envs`, not checked.
    pub async fn backup_run(&self, repo: &Repo, envs: &[(&str, &str)]) -> Result<env::Run> {
        let data = self.data.to_string_lossy().into_owned();
        let conninfo = self.conninfo();
        env::tidemark(
            env::Tool::Agent,
            &[
                "backup",
                "--pgdata",
                &data,
                "--repo",
                &repo.url,
                "--pg-url",
                &conninfo,
                "--archive-timeout",
                "120",
                "--json",
            ],
            envs,
        )
        .await
    }

    /// `tidemark-agent backup --json` of this server into `repo`; returns the JSON report.
    pub async fn backup(&self, repo: &Repo) -> Result<serde_json::Value> {
        let r = self.backup_run(repo, &[]).await?;
        if !r.success() {
            bail!("backup failed:\n{r}\n{}", self.log_tail());
        }
        let v = r.json()?;
        if v["schema_version"] != 1 || !v["backup_id"].is_string() {
            bail!("backup --json printed an unexpected document: {v}");
        }
        Ok(v)
    }

    /// Switches to a new WAL segment and waits until the segment just finished is in `repo`;
    /// returns its name.
    pub async fn switch_wal_and_wait(&self, repo: &Repo) -> Result<String> {
        let db = self.client().await?;
        let row = db
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .context("pg_switch_wal failed")?;
        let seg: String = row.get(0);
        if let Err(e) = repo.wait_for_wal(&seg, Duration::from_secs(60)).await {
            bail!("{e:#}\n{}", self.log_tail());
        }
        Ok(seg)
    }

    /// The database system identifier: the first 8 bytes of `global/pg_control` in every major
    /// (the embedded majors ship no pg_controldata).
    pub async fn system_identifier(&self) -> Result<String> {
        let p = self.data.join("global/pg_control");
        let b = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let id: [u8; 8] = b
            .get(..8)
            .and_then(|s| s.try_into().ok())
            .with_context(|| format!("{} is shorter than 8 bytes", p.display()))?;
        Ok(u64::from_le_bytes(id).to_string())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let Ok(pg_ctl) = self.bin_dir().map(|b| b.join("pg_ctl")) else {
            return;
        };
        let Ok(user) = env::db_user() else { return };
        let mut cmd = if user.switch {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            std::process::Command::new(pg_ctl)
        };
        let _ = cmd
            .args(["stop", "-w", "-m", "immediate", "-D"])
            .arg(&self.data)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Starts a server on a data directory that `tidemark-restore restore` wrote, and waits until
/// recovery has finished and the server is promoted (`pg_is_in_recovery()` is false).
///
/// The harness's settings are appended to postgresql.auto.conf after the recovery settings the
/// restore appended: a fresh port and socket directory, fsync back on, and archiving off.
pub async fn start_restored(dir: &TestDir, name: &str, data: &Path) -> Result<PgCluster> {
    let c = start_restored_in_recovery(dir, name, data, "").await?;
    wait_promoted(&c).await?;
    Ok(c)
}

/// Starts a server on a data directory that `tidemark-restore restore --standby` wrote (the
/// harness's settings appended as for [`start_restored`]) and waits until it accepts read-only
/// connections while in recovery (`pg_is_in_recovery()` is true).
pub async fn start_restored_standby(dir: &TestDir, name: &str, data: &Path) -> Result<PgCluster> {
    start_restored_standby_with_options(dir, name, data, "").await
}

/// [`start_restored_standby`] with `options` on the postmaster's command line (`pg_ctl -o`,
/// e.g. `-c name='value'`), which outrank every configuration file.
pub async fn start_restored_standby_with_options(
    dir: &TestDir,
    name: &str,
    data: &Path,
    options: &str,
) -> Result<PgCluster> {
    let c = start_restored_in_recovery(dir, name, data, options).await?;
    let started = Instant::now();
    loop {
        if let Ok(db) = c.client().await {
            if let Ok(r) = db.query_one("SELECT pg_is_in_recovery()", &[]).await {
                if r.get::<_, bool>(0) {
                    return Ok(c);
                }
                bail!(
                    "restored standby {name} is not in recovery\n{}",
                    c.log_tail()
                );
            }
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "restored standby {name} did not accept connections within {START_TIMEOUT:?}\n{}",
                c.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `c` has finished recovery and is promoted (`pg_is_in_recovery()` is false).
pub async fn wait_promoted(c: &PgCluster) -> Result<()> {
    let (name, data) = (&c.name, &c.data);
    let started = Instant::now();
    loop {
        let state = match c.client().await {
            Ok(db) => db
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map(|r| r.get::<_, bool>(0))
                .map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match state {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) if started.elapsed() > START_TIMEOUT => {
                bail!(
                    "restored server {name} stopped answering: {e:#}\n{}",
                    c.log_tail()
                )
            }
            Err(_) => {}
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "restored server {name} was still in recovery after {START_TIMEOUT:?}\n{}",
                c.log_tail()
            );
        }
        if c.log_text().contains("FATAL") && !pid_file_exists(data) {
            bail!(
                "restored server {name} exited during recovery\n{}",
                c.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A restored data directory adopted, the harness's settings appended, and started.
async fn start_restored_in_recovery(
    dir: &TestDir,
    name: &str,
    data: &Path,
    options: &str,
) -> Result<PgCluster> {
    let mut c = PgCluster::adopt(dir, name, data)?;
    c.server_options = options.to_string();
    c.append_conf(
        "postgresql.auto.conf",
        &format!(
            "\n# appended by the tidemark e2e harness after tidemark-restore\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {}\n\
             archive_mode = off\n\
             archive_command = ''\n\
             fsync = on\n\
             log_checkpoints = on\n",
            conf_quote(&c.sock.to_string_lossy())
        ),
    )?;
    c.start().await?;
    Ok(c)
}

fn pid_file_exists(data: &Path) -> bool {
    data.join("postmaster.pid").exists()
}

/// Quotes a value for postgresql.conf.
pub fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes one word for /bin/sh (archive_command runs through the shell).
pub fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.:=@%+-,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
