//! A throw-away PostgreSQL server on a restored data directory, for restore drills.
//!
//! Invariants:
//! - The server listens on no TCP address: only on a unix socket in a private (0700) directory of
//!   the drill, with an hba file of the drill's own that trusts local connections. Nothing outside
//!   the drill can reach it, and the restored cluster's passwords are never needed.
//! - When tidemark runs as root, the server (and every PostgreSQL tool) runs as `--run-as USER`
//!   through `runuser`; PostgreSQL refuses to run as root.
//! - Dropping a [`Server`] kills the postmaster (kill_on_drop); [`Server::stop`] shuts it down
//!   cleanly first so that pg_checksums can read the stopped cluster.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio_postgres::{Client, Config, NoTls};

/// An OS user PostgreSQL runs as.
#[derive(Clone, Debug)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks `name` up in /etc/passwd.
pub fn lookup_user(name: &str) -> Result<OsUser> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            return Ok(OsUser {
                name: name.to_string(),
                uid: f[2]
                    .parse()
                    .with_context(|| format!("bad uid for {name} in /etc/passwd"))?,
                gid: f[3]
                    .parse()
                    .with_context(|| format!("bad gid for {name} in /etc/passwd"))?,
            });
        }
    }
    bail!("--run-as {name}: there is no such OS user\nhint: create it (useradd) or name the user that owns PostgreSQL, usually 'postgres'")
}

/// True when this process runs as root.
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Where the PostgreSQL binaries are and who runs them.
#[derive(Clone, Debug)]
pub struct PgTools {
    pub bin: PathBuf,
    pub run_as: Option<OsUser>,
    /// The operator named `bin` (--pg-bin): never replaced by another major's directory.
    pub explicit: bool,
    /// Environment given to every command: `Some` sets a variable, `None` removes it (the
    /// repository key reaches the drill server's restore_command this way, not through its
    /// configuration files).
    pub env: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)>,
}

/// Bin directories searched for a major when --pg-bin is not given: Debian/Ubuntu and the
/// CloudNativePG images, then the PGDG RPM layout.
fn major_bin_dirs(major: u32) -> [PathBuf; 2] {
    [
        PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        PathBuf::from(format!("/usr/pgsql-{major}/bin")),
    ]
}

fn check_bin_dir(bin: &Path) -> Result<()> {
    for tool in ["postgres", "pg_ctl"] {
        if !bin.join(tool).is_file() {
            bail!(
                "{} is missing\nhint: --pg-bin must name PostgreSQL's bin directory (Debian: /usr/lib/postgresql/<major>/bin)",
                bin.join(tool).display()
            );
        }
    }
    Ok(())
}

impl PgTools {
    /// `pg_bin` when given, else the directory of the first `postgres` on PATH (replaced by the
    /// backup's own major's directory in [`PgTools::for_major`]).
    pub fn find(pg_bin: Option<&Path>, run_as: Option<OsUser>) -> Result<PgTools> {
        let (bin, explicit) = match pg_bin {
            Some(d) => {
                check_bin_dir(d)?;
                (d.to_path_buf(), true)
            }
            None => (
                std::env::var_os("PATH")
                    .iter()
                    .flat_map(std::env::split_paths)
                    .find(|d| d.join("postgres").is_file() && d.join("pg_ctl").is_file())
                    .unwrap_or_default(),
                false,
            ),
        };
        if run_as.is_some() && !running_as_root() {
            bail!("--run-as needs root: only root can start PostgreSQL as another user\nhint: drop --run-as and run tidemark-restore verify as the PostgreSQL OS user");
        }
        if running_as_root() && run_as.is_none() {
            bail!("tidemark runs as root and PostgreSQL refuses to run as root\nhint: add --run-as postgres (an unprivileged OS user; it must be able to execute this tidemark-restore binary)");
        }
        Ok(PgTools {
            bin,
            run_as,
            explicit,
            env: Vec::new(),
        })
    }

    /// The tools for a backup of PostgreSQL `major`: --pg-bin if given (refused when it is another
    /// major), else /usr/lib/postgresql/<major>/bin or /usr/pgsql-<major>/bin, else `postgres` on
    /// PATH if it is that major.
    pub async fn for_major(&self, major: u32) -> Result<PgTools> {
        let mut tried = Vec::new();
        let candidates: Vec<PathBuf> = if self.explicit {
            vec![self.bin.clone()]
        } else {
            major_bin_dirs(major)
                .into_iter()
                .chain((!self.bin.as_os_str().is_empty()).then(|| self.bin.clone()))
                .collect()
        };
        for bin in candidates {
            if check_bin_dir(&bin).is_err() {
                tried.push(format!("{}: no postgres/pg_ctl", bin.display()));
                continue;
            }
            let t = PgTools {
                bin: bin.clone(),
                ..self.clone()
            };
            let found = t.major_version().await?;
            if found == major {
                return Ok(t);
            }
            tried.push(format!("{}: PostgreSQL {found}", bin.display()));
        }
        bail!(
            "no PostgreSQL {major} server binaries found ({})\nhint: install PostgreSQL {major} (Debian: postgresql-{major}) or give its bin directory with --pg-bin",
            tried.join("; ")
        )
    }

    /// Tools whose bin directory holds the client program `tool` (e.g. pg_amcheck, which talks
    /// to any server major from 14 on): this one, else another PostgreSQL's, else PATH's.
    pub fn client(&self, tool: &str) -> Option<PgTools> {
        if self.has(tool) {
            return Some(self.clone());
        }
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        (14..=30)
            .rev()
            .map(|m| PathBuf::from(format!("/usr/lib/postgresql/{m}/bin")))
            .chain(path_dirs)
            .find(|d| d.join(tool).is_file())
            .map(|bin| PgTools {
                bin,
                ..self.clone()
            })
    }

    pub fn has(&self, tool: &str) -> bool {
        self.bin.join(tool).is_file()
    }

    /// A command running `tool` as the PostgreSQL user.
    pub fn command(&self, tool: &str) -> tokio::process::Command {
        let program = self.bin.join(tool);
        let mut c = match &self.run_as {
            Some(u) => {
                let mut c = tokio::process::Command::new("runuser");
                c.args(["-u", &u.name, "--"]).arg(program);
                c
            }
            None => tokio::process::Command::new(program),
        };
        for (k, v) in &self.env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// Runs `tool` to completion; returns (success, stdout + stderr).
    pub async fn run(
        &self,
        tool: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<(bool, String)> {
        let mut c = self.command(tool);
        c.args(args);
        let out = tokio::time::timeout(timeout, c.output())
            .await
            .with_context(|| format!("{tool} did not finish within {timeout:?}"))?
            .with_context(|| format!("cannot run {}", self.bin.join(tool).display()))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }

    /// The major version `postgres --version` reports (e.g. 15).
    pub async fn major_version(&self) -> Result<u32> {
        let (ok, out) = self
            .run("postgres", &["--version"], Duration::from_secs(30))
            .await?;
        if !ok {
            bail!("postgres --version failed: {out}");
        }
        out.split_whitespace()
            .filter_map(|w| w.split('.').next()?.parse::<u32>().ok())
            .next_back()
            .with_context(|| format!("cannot read a version from 'postgres --version': {out}"))
    }

    /// Makes `path` (recursively) owned by the PostgreSQL user, when one is set.
    pub fn give(&self, path: &Path) -> Result<()> {
        let Some(u) = &self.run_as else {
            return Ok(());
        };
        let mut stack = vec![path.to_path_buf()];
        while let Some(p) = stack.pop() {
            std::os::unix::fs::lchown(&p, Some(u.uid), Some(u.gid))
                .with_context(|| format!("cannot chown {} to {}", p.display(), u.name))?;
            let m = std::fs::symlink_metadata(&p)?;
            if m.is_dir() {
                for e in std::fs::read_dir(&p)? {
                    stack.push(e?.path());
                }
            }
        }
        Ok(())
    }
}

/// A running server started by the drill.
pub struct Server {
    child: Option<tokio::process::Child>,
    pub pgdata: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    pub db_user: String,
    tools: PgTools,
}

/// Settings [`drill_settings`] fixes: a `--pg-setting` may not change them (the drill server
/// listens on its private socket only, never archives, and pauses at its target for the
/// promotion wal-fetch requests, which needs hot standby: `crate::restore::promote`).
pub const FIXED_SETTINGS: &[&str] = &[
    "hot_standby",
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "hba_file",
    "archive_mode",
    "archive_command",
    "archive_library",
    "restore_command",
];

/// Refuses a `--pg-setting` of a setting the drill fixes.
pub fn check_extra_setting(name: &str) -> Result<()> {
    if FIXED_SETTINGS.iter().any(|f| f.eq_ignore_ascii_case(name)) {
        bail!("--pg-setting {name}: a restore drill sets {name} itself (its server listens on a private unix socket only, never archives, fetches WAL with tidemark, and runs hot standby to be promoted at its target)\nhint: leave it out; the drill's port is --port");
    }
    Ok(())
}

/// Settings the drill appends to postgresql.auto.conf (after the restore's recovery settings).
pub fn drill_settings(sock: &Path, hba: &Path, port: u16, extra: &[(String, String)]) -> String {
    let q = crate::pg::conf_quote;
    let mut s = format!(
        "\n# appended by tidemark-restore verify (a restore drill; this server is thrown away)\n\
         port = {port}\n\
         listen_addresses = ''\n\
         unix_socket_directories = {}\n\
         hba_file = {}\n\
         archive_mode = off\n\
         archive_command = ''\n\
         hot_standby = on\n\
         logging_collector = off\n\
         log_destination = 'stderr'\n",
        q(&sock.to_string_lossy()),
        q(&hba.to_string_lossy())
    );
    for (k, v) in extra {
        s += &format!("{k} = {}\n", q(v));
    }
    s
}

impl Server {
    /// Writes the drill's hba file and settings, then starts `postgres -D pgdata` in the
    /// foreground with its output in `log`.
    pub async fn start(
        tools: &PgTools,
        scratch: &Path,
        pgdata: &Path,
        port: u16,
        db_user: &str,
        extra: &[(String, String)],
    ) -> Result<Server> {
        let sock = scratch.join("sock");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&sock)
            .with_context(|| format!("cannot create {}", sock.display()))?;
        let hba = scratch.join("pg_hba.verify.conf");
        std::fs::write(
            &hba,
            "# tidemark verify: unix socket in a private directory only\nlocal all all trust\n",
        )
        .with_context(|| format!("cannot write {}", hba.display()))?;
        let settings = drill_settings(&sock, &hba, port, extra);
        // Appended to the file the restore wrote anew, never through a symlink.
        crate::restore::SafeDir::open(pgdata)?
            .append("postgresql.auto.conf", settings.as_bytes())?;
        let log = scratch.join("server.log");
        let f = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        tools.give(scratch)?;
        let mut c = tools.command("postgres");
        c.arg("-D")
            .arg(pgdata)
            .stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f));
        let child = c
            .spawn()
            .with_context(|| format!("cannot start {}", tools.bin.join("postgres").display()))?;
        Ok(Server {
            child: Some(child),
            pgdata: pgdata.to_path_buf(),
            sock,
            port,
            log,
            db_user: db_user.to_string(),
            tools: tools.clone(),
        })
    }

    /// `Some(status text)` once the postmaster has exited.
    pub fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for postgres: {e}")),
        }
    }

    pub async fn connect(&self, dbname: &str) -> Result<Client> {
        let mut cfg = Config::new();
        cfg.host_path(&self.sock)
            .port(self.port)
            .user(&self.db_user)
            .dbname(dbname)
            .application_name("tidemark-verify")
            .connect_timeout(Duration::from_secs(10));
        let (client, conn) = cfg.connect(NoTls).await.with_context(|| {
            format!(
                "cannot connect to the restored server as {} (database {dbname})",
                self.db_user
            )
        })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's FATAL/PANIC lines, else its last lines: the cause of a failed start.
    pub fn failure_lines(&self) -> String {
        let text = self.log_text();
        let bad: Vec<&str> = text.lines().filter(|l| is_server_failure(l)).collect();
        let lines: Vec<&str> = if bad.is_empty() {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(10)..].to_vec()
        } else {
            bad
        };
        lines.join("\n")
    }

    /// Fast shutdown (`pg_ctl stop -m fast`), then waits for the postmaster; kills it if that fails.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        let data = self.pgdata.to_string_lossy().into_owned();
        let r = self
            .tools
            .run(
                "pg_ctl",
                &["stop", "-w", "-t", "120", "-m", "fast", "-D", &data],
                Duration::from_secs(150),
            )
            .await;
        match r {
            Ok((true, _)) => {
                let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
                Ok(())
            }
            Ok((false, out)) => {
                kill_postmaster(&self.pgdata);
                let _ = child.kill().await;
                bail!("pg_ctl stop failed; the server was killed: {out}")
            }
            Err(e) => {
                kill_postmaster(&self.pgdata);
                let _ = child.kill().await;
                Err(e.context("the server was killed"))
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                kill_postmaster(&self.pgdata);
                let _ = c.start_kill();
            }
        }
    }
}

/// SIGKILLs the postmaster named in postmaster.pid (the child may be `runuser`, which does not
/// pass SIGKILL on).
fn kill_postmaster(pgdata: &Path) {
    let Ok(text) = std::fs::read_to_string(pgdata.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return;
    };
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A FATAL/PANIC log line about the server itself, not about a client refused during start-up.
pub fn is_server_failure(line: &str) -> bool {
    (line.contains("FATAL:") || line.contains("PANIC:"))
        && !line.contains("not yet accepting connections")
        && !line.contains("the database system is starting up")
        && !line.contains("the database system is shutting down")
}
