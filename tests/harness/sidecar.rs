//! Over 500 lines because it carries the sidecar process, the source cluster and the moto server
//! that the sidecar tests drive together.
//!
//! The WAL archiving sidecar for the tests: a `tidemark-agent sidecar` process that can be killed
//! and restarted, a source cluster whose archive_command hands segments to it over the socket,
//! plain HTTP GETs of `/healthz` and `/metrics`, and an S3-compatible server (moto) on loopback.
//!
//! Invariants:
//! - The sidecar runs as the database user directly (no `runuser` in between), so the pid the
//!   tests signal is the sidecar's own; it gets a cleared environment plus what the test passes.
//! - Each sidecar has its own socket directory, state directory and HTTP port; its stderr is
//!   appended to a log file that survives restarts.
//! - Dropping a [`Sidecar`] kills it; dropping a [`Moto`] kills the server.

use crate::cluster::{conf_quote, shell_word, PgCluster};
use crate::env::{self, db_user, TestDir};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How long a sidecar may take to answer /healthz after start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a sidecar is started with; kept so it can be restarted identically.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    pub repo_url: String,
    pub pgdata: PathBuf,
    pub socket_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// Extra environment (e.g. AWS_* for an s3:// repository).
    pub env: Vec<(String, String)>,
    /// Extra arguments (e.g. `--rescan 1`).
    pub args: Vec<String>,
}

impl SidecarConfig {
    /// Socket, state and log under `<scratch>/<name>/`.
    pub fn new(dir: &TestDir, name: &str, repo_url: &str, pgdata: &Path) -> Result<SidecarConfig> {
        let socket_dir = dir.mkdir(&format!("{name}/sock"))?;
        let state_dir = dir.mkdir(&format!("{name}/state"))?;
        Ok(SidecarConfig {
            repo_url: repo_url.to_string(),
            pgdata: pgdata.to_path_buf(),
            socket_dir,
            state_dir,
            log: dir.join(&format!("{name}/sidecar.log")),
            env: Vec::new(),
            args: vec!["--rescan".into(), "1".into(), "--grace".into(), "10".into()],
        })
    }
}

/// A running (or killed) sidecar process.
pub struct Sidecar {
    pub cfg: SidecarConfig,
    child: Option<tokio::process::Child>,
    port: u16,
}

impl Sidecar {
    /// Starts a sidecar and waits until /healthz answers 200 and the socket exists.
    pub async fn start(cfg: SidecarConfig) -> Result<Sidecar> {
        let mut s = Sidecar {
            cfg,
            child: None,
            port: 0,
        };
        s.spawn().await?;
        Ok(s)
    }

    /// Starts the sidecar process without waiting for it; returns after spawning.
    pub fn spawn_only(&mut self) -> Result<()> {
        let port = env::free_port()?;
        let agent = env::bins()?.agent;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.cfg.log)
            .with_context(|| format!("cannot open {}", self.cfg.log.display()))?;
        let mut cmd = tokio::process::Command::new(&agent);
        let user = db_user()?;
        if user.switch {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.env_clear()
            .env("PATH", PATH)
            .env("LC_ALL", "C.UTF-8")
            .env("RUST_BACKTRACE", "1")
            .arg("sidecar")
            .arg("--repo")
            .arg(&self.cfg.repo_url)
            .arg("--pgdata")
            .arg(&self.cfg.pgdata)
            .arg("--socket-dir")
            .arg(&self.cfg.socket_dir)
            .arg("--state-dir")
            .arg(&self.cfg.state_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(&self.cfg.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in &self.cfg.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} sidecar", agent.display()))?;
        self.child = Some(child);
        self.port = port;
        Ok(())
    }

    async fn spawn(&mut self) -> Result<()> {
        self.spawn_only()?;
        let started = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    self.child = None;
                    bail!("the sidecar exited at start ({st})\n{}", self.log_tail(40));
                }
            }
            let sock = self.cfg.socket_dir.join("tidemark.sock").exists();
            if sock {
                if let Ok((200, _)) = self.get("/healthz").await {
                    return Ok(());
                }
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "the sidecar did not become healthy within {START_TIMEOUT:?}\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the sidecar to exit by itself and returns its status (for refused starts).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let c = self.child.as_mut().context("the sidecar is not running")?;
        let st = tokio::time::timeout(timeout, c.wait())
            .await
            .with_context(|| format!("the sidecar did not exit within {timeout:?}"))??;
        self.child = None;
        Ok(st)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL, and reaps the process.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill().context("cannot SIGKILL the sidecar")?;
            c.wait().await?;
        }
        Ok(())
    }

    /// Sends SIGTERM and returns at once (the process is reaped by [`Sidecar::wait_exit`]).
    pub fn sigterm(&self) -> Result<()> {
        let pid = self.pid().context("the sidecar is not running")?;
        let st = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        if !st.success() {
            bail!("kill -TERM {pid} failed: {st}");
        }
        Ok(())
    }

    /// Starts the sidecar again with the same configuration (after a kill).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9().await?;
        self.spawn().await
    }

    /// `GET <path>` on the sidecar's HTTP port: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.port, path).await
    }

    /// `/metrics` parsed into series (name with labels, as printed) → value.
    pub async fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let (status, body) = self.get("/metrics").await?;
        if status != 200 {
            bail!("GET /metrics answered {status}: {body}");
        }
        Ok(parse_metrics(&body))
    }

    /// The value of one series (exact name, labels included), or an error naming what is there.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let m = self.metrics().await?;
        m.get(series)
            .copied()
            .with_context(|| format!("/metrics has no series {series}: {m:?}"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.cfg.log).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- last {} lines of {} ---\n{}\n--- end of sidecar log ---",
            lines.len() - from,
            self.cfg.log.display(),
            lines[from..].join("\n")
        )
    }
}

/// Prometheus text → series → value (comments skipped).
pub fn parse_metrics(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A minimal HTTP/1.0 GET on 127.0.0.1:`port`: (status, body).
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || -> Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP header end in {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_string()
        };
        Ok((status, body))
    })
    .await?
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `env K=V ... ` for a shell command line ("" when `env` is empty).
pub fn env_prefix(env: &[(String, String)]) -> String {
    if env.is_empty() {
        return String::new();
    }
    let mut s = "env".to_string();
    for (k, v) in env {
        s.push(' ');
        s.push_str(&shell_word(&format!("{k}={v}")));
    }
    s.push(' ');
    s
}

/// A source cluster whose archive_command is `wal-push --repo URL --socket-dir DIR %p` (with `env`
/// in front, so the fallback upload can reach the store), started.
pub async fn start_handoff_archiving(
    dir: &TestDir,
    name: &str,
    repo_url: &str,
    socket_dir: &Path,
    env: &[(String, String)],
) -> Result<PgCluster> {
    let mut c = PgCluster::initdb(dir, name).await?;
    let agent = env::bins()?.agent;
    let archive_command = format!(
        "{}{} wal-push --repo {} --socket-dir {} %p",
        env_prefix(env),
        shell_word(&agent.to_string_lossy()),
        shell_word(repo_url),
        shell_word(&socket_dir.to_string_lossy())
    );
    c.start_with_archive_command(&archive_command).await?;
    Ok(c)
}

/// pg_stat_archiver: (archived_count, last_archived_wal, failed_count, last_failed_wal).
pub async fn archiver_stats(db: &Client) -> Result<(i64, Option<String>, i64, Option<String>)> {
    let r = db
        .query_one(
            "SELECT archived_count, last_archived_wal, failed_count, last_failed_wal FROM pg_stat_archiver",
            &[],
        )
        .await
        .context("cannot read pg_stat_archiver")?;
    Ok((r.get(0), r.get(1), r.get(2), r.get(3)))
}

/// Waits until PostgreSQL reports `seg` (or a later segment) archived, i.e. archive_command
/// returned 0 for it.
pub async fn wait_archived(db: &Client, seg: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let (_, last, _, failed) = archiver_stats(db).await?;
        if last.as_deref().is_some_and(|l| l.len() == 24 && l >= seg) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("PostgreSQL did not archive {seg} within {timeout:?}: last archived {last:?}, last failed {failed:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The name of the WAL segment holding the byte before `lsn` (`X/Y` text) on timeline `tli`,
/// 16 MiB segments: the last segment a backup stopping at `lsn` needs.
pub fn segment_before(tli: u32, lsn: &str) -> Result<String> {
    let (hi, lo) = lsn.split_once('/').context("not an LSN")?;
    let lsn = (u64::from_str_radix(hi, 16)? << 32 | u64::from_str_radix(lo, 16)?) - 1;
    let seg = lsn >> 24;
    Ok(format!("{tli:08X}{:08X}{:08X}", seg >> 8, seg & 0xff))
}

/// Switches WAL (after a tiny write, so the switch is never a no-op) and returns the name of the
/// segment just finished.
pub async fn switch_wal(db: &Client) -> Result<String> {
    db.batch_execute("CREATE TABLE IF NOT EXISTS wal_switch_marks (t timestamptz); INSERT INTO wal_switch_marks VALUES (now())")
        .await
        .context("cannot write before pg_switch_wal")?;
    let r = db
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .context("pg_switch_wal failed")?;
    Ok(r.get(0))
}

/// Appends a restore_command that runs the one tidemark-restore wrote with `env` in front
/// (a restored server is started with a cleared environment; an s3:// repository needs AWS_*).
pub fn prefix_restore_command(pgdata: &Path, env: &[(String, String)]) -> Result<()> {
    let p = pgdata.join("postgresql.auto.conf");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("restore_command = "))
        .with_context(|| format!("{} has no restore_command", p.display()))?;
    let cmd = line
        .trim()
        .strip_prefix('\'')
        .and_then(|l| l.strip_suffix('\''))
        .with_context(|| format!("restore_command is not quoted: {line}"))?
        .replace("''", "'");
    let mut f = std::fs::OpenOptions::new().append(true).open(&p)?;
    writeln!(
        f,
        "\n# restore_command with the test's environment\nrestore_command = {}",
        conf_quote(&format!("{}{cmd}", env_prefix(env)))
    )?;
    Ok(())
}

/// A moto S3 server on a free loopback port with one bucket; killed on drop.
pub struct Moto {
    child: std::process::Child,
    pub endpoint: String,
}

impl Moto {
    /// One S3 call straight to this server through boto3 (installed with moto), past any proxy:
    /// `put` (the body), `get` (returns the body), `delete`, `list` (lines `key size` below
    /// `key`), `versioning` (turns it on for the bucket), `versions` (lines `key version` and
    /// `key marker` for every version and delete marker below `key`).
    pub async fn s3(&self, op: &str, bucket: &str, key: &str, body: &[u8]) -> Result<Vec<u8>> {
        const SCRIPT: &str = r#"
import boto3, sys
c = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test',
                 aws_secret_access_key='test', region_name='us-east-1')
op, bucket, key = sys.argv[2:5]
out = sys.stdout.buffer
if op == 'put':
    c.put_object(Bucket=bucket, Key=key, Body=sys.stdin.buffer.read())
elif op == 'get':
    out.write(c.get_object(Bucket=bucket, Key=key)['Body'].read())
elif op == 'delete':
    c.delete_object(Bucket=bucket, Key=key)
elif op == 'versioning':
    c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={'Status': 'Enabled'})
elif op == 'versions':
    for page in c.get_paginator('list_object_versions').paginate(Bucket=bucket, Prefix=key):
        for v in page.get('Versions', []):
            out.write(f"{v['Key']} version\n".encode())
        for m in page.get('DeleteMarkers', []):
            out.write(f"{m['Key']} marker\n".encode())
elif op == 'list':
    for page in c.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=key):
        for o in page.get('Contents', []):
            out.write(f"{o['Key']} {o['Size']}\n".encode())
else:
    sys.exit(f"unknown op {op}")
"#;
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", SCRIPT, &self.endpoint, op, bucket, key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("python3 with boto3 (installed with moto) is needed\nhint: run scripts/install-deps.sh")?;
        let mut stdin = child.stdin.take().context("stdin")?;
        tokio::io::AsyncWriteExt::write_all(&mut stdin, body).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "s3 {op} {bucket}/{key} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    }

    pub async fn start(bucket: &str) -> Result<Moto> {
        let port = env::free_port()?;
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("moto_server is not installed\nhint: run scripts/install-deps.sh (pip install 'moto[server]')")?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let moto = Moto { child, endpoint };
        let started = Instant::now();
        loop {
            let made = tokio::process::Command::new("python3")
                .args(["-c", "import boto3,sys; boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket=sys.argv[2])", &moto.endpoint, bucket])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .context("python3 with boto3 (installed with moto) is needed")?;
            if made.success() {
                return Ok(moto);
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("moto_server did not start on {}", moto.endpoint);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// An IAM user `user` with a new access key on this server: (access key id, secret). Make it
    /// before [`Moto::require_auth`], which refuses the unsigned IAM call.
    pub async fn create_access_key(&self, user: &str) -> Result<(String, String)> {
        const SCRIPT: &str = "import boto3,sys; i=boto3.client('iam', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1'); i.create_user(UserName=sys.argv[2]); k=i.create_access_key(UserName=sys.argv[2])['AccessKey']; print(k['AccessKeyId'], k['SecretAccessKey'])";
        let out = tokio::process::Command::new("python3")
            .args(["-c", SCRIPT, &self.endpoint, user])
            .stdin(Stdio::null())
            .output()
            .await
            .context("python3 with boto3 (installed with moto) is needed")?;
        if !out.status.success() {
            bail!(
                "cannot create an IAM access key on moto: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (id, secret) = text
            .trim()
            .split_once(' ')
            .with_context(|| format!("moto printed no access key: {text:?}"))?;
        Ok((id.to_string(), secret.to_string()))
    }

    /// From now on the server authenticates every request against its IAM users, as AWS does:
    /// an unknown access key id gets 403 InvalidAccessKeyId, a wrong secret 403
    /// SignatureDoesNotMatch (moto's `POST /moto-api/reset-auth`, with no unauthenticated
    /// requests left).
    pub async fn require_auth(&self) -> Result<()> {
        const SCRIPT: &str = "import sys, urllib.request; r=urllib.request.urlopen(urllib.request.Request(sys.argv[1] + '/moto-api/reset-auth', data=b'0', method='POST', headers={'Content-Type': 'application/octet-stream'})); print(r.read().decode())";
        let out = tokio::process::Command::new("python3")
            .args(["-c", SCRIPT, &self.endpoint])
            .stdin(Stdio::null())
            .output()
            .await
            .context("cannot run python3")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains("\"ok\"") {
            bail!(
                "moto did not turn authentication on: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The AWS_* variables that point tidemark at this server.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tidemark binary with `env` given as owned pairs.
pub async fn tidemark_with_env(
    tool: env::Tool,
    args: &[&str],
    env: &[(String, String)],
) -> Result<env::Run> {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env::tidemark(tool, args, &pairs).await
}
