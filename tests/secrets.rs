//! Secrets never leave (issue 13): with storage credentials a real S3-compatible server refuses
//! (moto with IAM authentication on: an unknown access key id gets 403 InvalidAccessKeyId, a
//! known one with the wrong secret 403 SignatureDoesNotMatch) and a `--pg-url` whose password
//! PostgreSQL 15 checks (scram-sha-256), every tidemark command fails naming the status, the
//! provider's error code and a hint, and no stdout, stderr, log file or /metrics text carries the
//! access key id, the secret or the password. moto sits behind an echo proxy that puts the access
//! key id and the signature into its 403 bodies as AWS S3 does, so a client printing error bodies
//! whole would fail here. Logging runs at debug level so every log line that exists is looked
//! at. `--help` never prints the value of TIDEMARK_PG_URL.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};
use tidemark_e2e::replication::{exec, hba_first};
use tidemark_e2e::s3echo::S3Echo;
use tidemark_e2e::sidecar::{switch_wal, Moto, Sidecar, SidecarConfig};
use tidemark_e2e::{tidemark, PgCluster, Run, TestDir, Tool};

const BUCKET: &str = "tidemark-secrets";
/// Shaped like AWS's (20 characters, AKIA...), unknown to the server.
const KEY_ID: &str = "AKIATMLEAKPROBE7Q3ZX";
/// Shaped like AWS's (40 characters with `/` and `+`, which URL encoding would change).
const SECRET: &str = "tmLeakSecret/Q9f3c1b7e+2d4a6c8e0b1d3f5a7c";
const PG_USER: &str = "tmsecret";
const PASSWORD: &str = "PgLeakPw-5e7a91c3d2";
const WRONG_PASSWORD: &str = "PgWrongPw-8b2f60d4e1";

/// What must never be printed: each secret and distinctive pieces of it (a piece survives
/// encoding and truncation that the whole value would not), and `extra`.
fn forbidden(extra: &[&str]) -> Vec<String> {
    [
        KEY_ID,
        "TMLEAKPROBE",
        SECRET,
        "tmLeakSecret",
        "Q9f3c1b7e",
        "2d4a6c8e0b1d3f5a7c",
        PASSWORD,
        "PgLeakPw",
        "5e7a91c3d2",
        WRONG_PASSWORD,
        "PgWrongPw",
        // The tags S3 wraps the echoed key id and signature in.
        "AWSAccessKeyId",
        "SignatureProvided",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

fn leaks(text: &str, forbidden: &[String]) -> Vec<String> {
    forbidden
        .iter()
        .filter(|s| text.contains(s.as_str()))
        .cloned()
        .collect()
}

/// Environment variables of a command.
type Env = [(String, String)];

/// The AWS_* variables for the server behind `echo` with the given credentials, and debug
/// logging.
fn env_with(moto: &Moto, echo: &S3Echo, key_id: &str, secret: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = moto
        .aws_env()
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_ENDPOINT_URL"
            )
        })
        .collect();
    env.push(("AWS_ENDPOINT_URL".into(), echo.endpoint.clone()));
    env.push(("AWS_ACCESS_KEY_ID".into(), key_id.into()));
    env.push(("AWS_SECRET_ACCESS_KEY".into(), secret.into()));
    env.push(("TIDEMARK_LOG".into(), "debug".into()));
    env
}

async fn run(tool: Tool, args: &[&str], env: &Env) -> Result<Run> {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    tidemark(tool, args, &pairs).await
}

/// A command the storage refused: it failed, and its error names the status, `code` and a hint.
fn assert_refused(r: &Run, code: &str) -> Result<()> {
    ensure!(
        !r.success(),
        "the storage refused the credentials, yet:\n{r}"
    );
    // (through the sidecar the reply is one line: its hint follows a space, not a newline)
    for want in ["403 Forbidden", code, "hint: "] {
        ensure!(
            r.stderr.contains(want),
            "the error should name {want:?}:\n{r}"
        );
    }
    Ok(())
}

fn assert_no_leaks(r: &Run, forbidden: &[String]) -> Result<()> {
    let l = leaks(&format!("{}{}", r.stdout, r.stderr), forbidden);
    ensure!(l.is_empty(), "the output carries {l:?}:\n{r}");
    Ok(())
}

/// Every regular file below `dir` except those below `skip` (PostgreSQL's own data directory),
/// as (path, text).
fn files_below(dir: &Path, skip: &[&Path]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if skip.iter().any(|s| d.starts_with(s)) {
            continue;
        }
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))?
        {
            let entry = entry?;
            let p = entry.path();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
                out.push((
                    p.display().to_string(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ));
            }
        }
    }
    Ok(out)
}

#[tokio::test]
async fn refused_credentials_and_passwords_never_leave() -> Result<()> {
    let dir = TestDir::new("secrets")?;
    let moto = Moto::start(BUCKET).await?;
    let url = format!("s3://{BUCKET}/repo");
    // A user the server knows, for the wrong-secret case; made while requests need no signature.
    let (known_id, _) = moto.create_access_key("tidemark-secrets").await?;
    // In front of moto, so refusals carry the access key id in their body as AWS's do.
    let echo = S3Echo::start(&moto.endpoint).await?;
    let bad = env_with(&moto, &echo, KEY_ID, SECRET);
    let forbidden = forbidden(&[&known_id]);

    // PostgreSQL 15 with a role that must give its password (scram-sha-256 over TCP).
    let mut pg = PgCluster::initdb(&dir, "src").await?;
    pg.start_with_archive_command("true").await?;
    let db = pg.client().await?;
    // A finished segment for wal-push, taken before the role exists so its WAL holds nothing of it.
    let seg = switch_wal(&db).await?;
    let seg_bytes = std::fs::read(pg.data.join("pg_wal").join(&seg))
        .with_context(|| format!("cannot read segment {seg}"))?;
    exec(
        &pg,
        &format!("CREATE ROLE {PG_USER} LOGIN SUPERUSER REPLICATION PASSWORD '{PASSWORD}'"),
    )
    .await?;
    hba_first(
        &pg,
        &format!("host all {PG_USER} 127.0.0.1/32 scram-sha-256"),
    )
    .await?;
    let pg_url = format!(
        "postgresql://{PG_USER}:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    let wrong_url = pg_url.replace(PASSWORD, WRONG_PASSWORD);

    // A sidecar that started while the server still took any credentials, on a data directory
    // of its own (only pg_wal/ is needed), so a .ready file is its next upload.
    let sc_pgdata = dir.mkdir("sc/pgdata")?;
    dir.mkdir("sc/pgdata/pg_wal/archive_status")?;
    let mut cfg = SidecarConfig::new(&dir, "sc", &url, &sc_pgdata)?;
    cfg.env = bad.clone();
    let sidecar = Sidecar::start(cfg).await?;

    moto.require_auth().await?;

    let seg_path = dir.write(&format!("sc/pgdata/pg_wal/{seg}"), &seg_bytes)?;
    dir.write(&format!("sc/pgdata/pg_wal/archive_status/{seg}.ready"), b"")?;
    let started = Instant::now();
    while sidecar.metric("tidemark_wal_upload_failures_total").await? < 1.0 {
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the sidecar did not fail an upload within 60 s\n{}",
            sidecar.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let seg_arg = seg_path.to_string_lossy().into_owned();
    let data = pg.data.to_string_lossy().into_owned();
    let sock = sidecar.cfg.socket_dir.to_string_lossy().into_owned();
    let restored = dir.mkdir("restored")?.to_string_lossy().into_owned();
    let fetched = dir.join("fetched").to_string_lossy().into_owned();
    let mut env_url = bad.clone();
    env_url.push(("TIDEMARK_PG_URL".into(), pg_url.clone()));

    let mut runs: Vec<(&str, Run)> = Vec::new();
    let (bad, env_url) = (&bad[..], &env_url[..]);
    let cases: Vec<(&str, Tool, Vec<&str>, &Env)> = vec![
        (
            "wal-push",
            Tool::Agent,
            vec!["wal-push", "--repo", &url, &seg_arg],
            bad,
        ),
        (
            "wal-push through the sidecar",
            Tool::Agent,
            vec!["wal-push", "--repo", &url, "--socket-dir", &sock, &seg_arg],
            bad,
        ),
        (
            "backup --pgdata",
            Tool::Agent,
            vec![
                "backup",
                "--repo",
                &url,
                "--pgdata",
                &data,
                "--pg-url",
                &pg_url,
                "--archive-timeout",
                "30",
            ],
            bad,
        ),
        (
            "backup --source replication",
            Tool::Agent,
            vec![
                "backup",
                "--repo",
                &url,
                "--source",
                "replication",
                "--pg-url",
                &pg_url,
                "--archive-timeout",
                "30",
            ],
            bad,
        ),
        (
            "backup with TIDEMARK_PG_URL",
            Tool::Agent,
            vec![
                "backup",
                "--repo",
                &url,
                "--pgdata",
                &data,
                "--archive-timeout",
                "30",
                "--json",
            ],
            env_url,
        ),
        ("info", Tool::Agent, vec!["info", "--repo", &url], bad),
        (
            "info --json",
            Tool::Agent,
            vec!["info", "--repo", &url, "--json"],
            bad,
        ),
        (
            "expire",
            Tool::Agent,
            vec!["expire", "--repo", &url, "--retain-last", "1"],
            bad,
        ),
        ("check", Tool::Restore, vec!["check", "--repo", &url], bad),
        (
            "wal-fetch",
            Tool::Restore,
            vec!["wal-fetch", "--repo", &url, &seg, &fetched],
            bad,
        ),
        (
            "restore",
            Tool::Restore,
            vec![
                "restore", "--repo", &url, "--pgdata", &restored, "--target", "latest",
            ],
            bad,
        ),
    ];
    for (what, tool, args, env) in cases {
        let r = run(tool, &args, env).await?;
        assert_no_leaks(&r, &forbidden).with_context(|| what.to_string())?;
        assert_refused(&r, "InvalidAccessKeyId").with_context(|| what.to_string())?;
        runs.push((what, r));
    }

    // A key id the server knows, with the wrong secret.
    let wrong_secret = env_with(&moto, &echo, &known_id, SECRET);
    let r = run(
        Tool::Agent,
        &["wal-push", "--repo", &url, &seg_arg],
        &wrong_secret,
    )
    .await?;
    assert_no_leaks(&r, &forbidden).context("wal-push with a wrong secret")?;
    assert_refused(&r, "SignatureDoesNotMatch").context("wal-push with a wrong secret")?;
    runs.push(("wal-push with a wrong secret", r));

    // PostgreSQL refuses a wrong password: the error says so without printing either password.
    for source in ["pgdata", "replication"] {
        let r = run(
            Tool::Agent,
            &[
                "backup", "--repo", &url, "--source", source, "--pgdata", &data, "--pg-url",
                &wrong_url,
            ],
            bad,
        )
        .await?;
        ensure!(!r.success(), "a wrong password was accepted:\n{r}");
        ensure!(
            r.stderr.contains("password authentication failed"),
            "backup --source {source} should say the password was refused:\n{r}"
        );
        runs.push(("backup with a wrong password", r));
    }

    // The sidecar's own view: its log names the refusal, /metrics and /healthz answer.
    let (status, metrics) = sidecar.get("/metrics").await?;
    ensure!(status == 200, "GET /metrics answered {status}");
    ensure!(
        metrics.contains("tidemark_wal_upload_failures_total"),
        "/metrics lacks the failure counter:\n{metrics}"
    );
    let (_, healthz) = sidecar.get("/healthz").await?;
    let log = sidecar.log_text();
    for want in ["403 Forbidden", "InvalidAccessKeyId", "hint: "] {
        ensure!(
            log.contains(want),
            "the sidecar log should name {want:?}\n{}",
            sidecar.log_tail(40)
        );
    }

    let mut texts: Vec<(String, String)> = Vec::new();
    for (what, r) in &runs {
        texts.push((format!("{what}: stdout"), r.stdout.clone()));
        texts.push((format!("{what}: stderr"), r.stderr.clone()));
    }
    texts.push(("sidecar /metrics".into(), metrics));
    texts.push(("sidecar /healthz".into(), healthz));
    // Every file of the test: the sidecar's log and state, PostgreSQL's server log, the restore
    // target; not PostgreSQL's data directory (pg_authid holds the role's password verifier).
    texts.extend(files_below(dir.path(), &[pg.data.as_path()])?);
    ensure!(
        texts.iter().any(|(what, _)| what.ends_with("sidecar.log")),
        "the sidecar log was not among the files searched"
    );
    ensure!(
        texts.iter().any(|(what, _)| what.ends_with("server.log")),
        "the PostgreSQL log was not among the files searched"
    );
    let found: Vec<String> = texts
        .iter()
        .filter_map(|(what, text)| {
            let l = leaks(text, &forbidden);
            (!l.is_empty()).then(|| format!("{what} contains {l:?}:\n{text}"))
        })
        .collect();
    ensure!(found.is_empty(), "secrets leaked:\n{}", found.join("\n\n"));
    drop(pg);
    Ok(())
}

#[tokio::test]
async fn help_never_prints_the_pg_url() -> Result<()> {
    let url = format!("postgresql://backup:{PASSWORD}@db.example:5432/postgres");
    let r = tidemark(
        Tool::Agent,
        &["backup", "--help"],
        &[("TIDEMARK_PG_URL", &url), ("TIDEMARK_WORKERS", "3")],
    )
    .await?;
    ensure!(r.success(), "backup --help failed:\n{r}");
    // clap prints other variables' values, so this run would show the URL if it were not hidden.
    ensure!(
        r.stdout.contains("[env: TIDEMARK_WORKERS=3]"),
        "--help should show ordinary environment values:\n{r}"
    );
    ensure!(
        r.stdout.contains("[env: TIDEMARK_PG_URL]"),
        "--help should name TIDEMARK_PG_URL without its value:\n{r}"
    );
    let l = leaks(&format!("{}{}", r.stdout, r.stderr), &forbidden(&[]));
    ensure!(l.is_empty(), "--help printed {l:?}:\n{r}");
    ensure!(
        !r.stdout.contains("db.example"),
        "--help printed the URL:\n{r}"
    );
    Ok(())
}
