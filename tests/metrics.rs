//! The operator's view, end to end against PostgreSQL 15: after backups, a recorded restore drill
//! and an expire, the repository gauges of `tidemark-agent exporter` and of a sidecar's
//! `/metrics` (parsed by prometheus_client's strict OpenMetrics parser) equal the facts of
//! `tidemark-agent info --json`; and no command writes an ANSI escape into a log that is not a
//! terminal, while a failure names its object and carries a hint.

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tidemark_e2e::env::{self, Run, Tool};
use tidemark_e2e::sidecar::{http_get, Sidecar, SidecarConfig};
use tidemark_e2e::{data, PgCluster, Repo, TestDir};

/// Bounds the wait for a daemon's first refresh (a failure guard, not an assertion on time).
const FIRST_REFRESH: Duration = Duration::from_secs(60);

/// One parsed sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A `/metrics` body parsed by prometheus_client's OpenMetrics parser: family types and samples.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
    body: String,
}

impl Scrape {
    fn parse(dir: &TestDir, name: &str, body: String) -> Result<Scrape> {
        let file = dir.write(name, body.as_bytes())?;
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, json\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\nfams = list(parse(open(sys.argv[1]).read()))\nprint(json.dumps({'types': {f.name: f.type for f in fams}, 'samples': [[s.name, s.labels, s.value] for f in fams for s in f.samples]}))",
            ])
            .arg(&file)
            .output()
            .context("python3 is needed to parse /metrics (scripts/install-deps.sh)")?;
        ensure!(
            out.status.success(),
            "the OpenMetrics parser rejected {name} (install it with scripts/install-deps.sh):\n{}\n{body}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let types = v["types"]
            .as_object()
            .context("types")?
            .iter()
            .map(|(k, t)| (k.clone(), t.as_str().unwrap_or("").to_string()))
            .collect();
        let mut samples = Vec::new();
        for s in v["samples"].as_array().context("samples")? {
            samples.push(Sample {
                name: s[0].as_str().context("name")?.to_string(),
                labels: serde_json::from_value(s[1].clone())?,
                value: s[2].as_f64().context("value")?,
            });
        }
        Ok(Scrape {
            types,
            samples,
            body,
        })
    }

    /// The one sample of `name` with exactly `labels`; an error if it is absent or repeated.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
            .collect();
        match found.as_slice() {
            [v] => Ok(*v),
            [] => bail!("no sample {name}{want:?} in\n{}", self.body),
            _ => bail!("sample {name}{want:?} repeated in\n{}", self.body),
        }
    }

    /// Every sample of `name`.
    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The repository gauges' samples (what the exporter and the sidecar must agree on), as text.
    fn repository_samples(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .samples
            .iter()
            .filter(|s| !s.name.starts_with("tidemark_repository_refresh_"))
            .filter(|s| !s.name.starts_with("tidemark_wal_") || is_repository_wal(&s.name))
            .filter(|s| {
                !["tidemark_stored_bytes", "tidemark_stored_objects"]
                    .iter()
                    .any(|p| s.name.starts_with(p))
            })
            .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
            .collect();
        v.sort();
        v
    }
}

/// The repository's WAL gauges (the sidecar's own `tidemark_wal_*` figures are not).
fn is_repository_wal(name: &str) -> bool {
    [
        "tidemark_wal_archived_segments",
        "tidemark_wal_gaps",
        "tidemark_wal_gap_missing_segments",
    ]
    .contains(&name)
}

/// RFC 3339 text to Unix seconds.
fn unix(v: &Value) -> Result<f64> {
    let t = v.as_str().with_context(|| format!("{v} is not a time"))?;
    Ok(chrono::DateTime::parse_from_rfc3339(t)
        .with_context(|| format!("{t} is not RFC 3339"))?
        .timestamp_micros() as f64
        / 1e6)
}

fn close(what: &str, got: f64, want: f64) -> Result<()> {
    ensure!(
        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
        "{what}: /metrics says {got}, info --json says {want}"
    );
    Ok(())
}

/// Runs a tidemark binary as the database user with stderr into `log` (a file, not a terminal);
/// returns the run with that stderr.
async fn run_logged(tool: Tool, args: &[&str], log: &Path) -> Result<Run> {
    let b = env::bins()?;
    let exe = match tool {
        Tool::Agent => b.agent,
        Tool::Restore => b.restore,
    };
    let mut cmd = env::db_command(&exe)?;
    // A colour-capable terminal type in the environment: only stderr being a file may decide.
    cmd.env("TERM", "xterm-256color").args(args);
    let file = std::fs::File::create(log)?;
    cmd.stdout(Stdio::piped()).stderr(file);
    let started = Instant::now();
    let out = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?
        .wait_with_output()
        .await?;
    Ok(Run {
        cmdline: format!("{} {}", exe.display(), args.join(" ")),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: std::fs::read_to_string(log).unwrap_or_default(),
        elapsed: started.elapsed(),
    })
}

/// Backups A and B with writes between, each followed by archived WAL.
async fn two_backups(dir: &TestDir, repo: &Repo) -> Result<PgCluster> {
    let src = PgCluster::start_archiving(dir, "src", repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    src.backup(repo).await?;
    data::write_batch(&db, 2).await?;
    src.switch_wal_and_wait(repo).await?;
    src.backup(repo).await?;
    data::write_batch(&db, 3).await?;
    src.switch_wal_and_wait(repo).await?;
    Ok(src)
}

/// `tidemark-restore verify --target latest --record`, which must pass.
async fn drill(dir: &TestDir, repo: &Repo, log: &Path) -> Result<Value> {
    let scratch = dir.join("drill").to_string_lossy().into_owned();
    let pg_bin = env::pg_bin_dir()?.to_string_lossy().into_owned();
    let r = run_logged(
        Tool::Restore,
        &[
            "verify",
            "--repo",
            &repo.url,
            "--scratch",
            &scratch,
            "--pg-bin",
            &pg_bin,
            "--target",
            "latest",
            "--record",
        ],
        log,
    )
    .await?;
    ensure!(r.success(), "the drill failed:\n{r}");
    r.json()
}

/// Polls `GET /metrics` on `port` until the repository gauges have been read once.
async fn scrape_after_refresh(port: u16, what: &str, log: &dyn Fn() -> String) -> Result<String> {
    let started = Instant::now();
    loop {
        if let Ok((200, body)) = http_get(port, "/metrics").await {
            if body.contains("\ntidemark_repository_refresh_success ") {
                return Ok(body);
            }
        }
        if started.elapsed() > FIRST_REFRESH {
            bail!(
                "{what} showed no repository gauges within {FIRST_REFRESH:?}\n{}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks every repository gauge of `m` against `info` (the `info --json` document).
fn agrees_with_info(m: &Scrape, info: &Value) -> Result<()> {
    ensure!(
        m.get("tidemark_repository_refresh_success", &[])? == 1.0,
        "refresh failed"
    );
    ensure!(
        m.types.get("tidemark_repository").map(String::as_str) == Some("info"),
        "tidemark_repository is not an info family: {:?}",
        m.types
    );
    let major = info["pg_major"].as_u64().context("pg_major")?.to_string();
    let sid = info["system_id"].as_str().context("system_id")?;
    ensure!(
        m.get(
            "tidemark_repository_info",
            &[("system_id", sid), ("pg_major", &major)]
        )? == 1.0
    );
    let systems: Vec<&Value> = std::iter::once(info)
        .chain(info["other_systems"].as_array().context("other_systems")?)
        .collect();
    close(
        "tidemark_repository_systems",
        m.get("tidemark_repository_systems", &[])?,
        systems.len() as f64,
    )?;
    let space = |f: &str| -> f64 {
        systems
            .iter()
            .map(|s| s["space"][f].as_u64().unwrap_or(u64::MAX) as f64)
            .sum()
    };
    for (kind, field) in [
        ("packs", "pack_bytes"),
        ("wal", "wal_bytes"),
        ("manifests", "manifest_bytes"),
    ] {
        let want = space(field);
        ensure!(want > 0.0, "info shows no {field}: {info}");
        close(
            &format!("repository bytes {kind}"),
            m.get("tidemark_repository_bytes", &[("kind", kind)])?,
            want,
        )?;
    }
    close(
        "packs",
        m.get("tidemark_repository_packs", &[])?,
        space("packs"),
    )?;

    let backups = info["backups"].as_array().context("backups")?;
    ensure!(!backups.is_empty(), "no backups in {info}");
    let mut sources: Vec<&str> = backups
        .iter()
        .filter_map(|b| b["source"].as_str())
        .collect();
    sources.sort_unstable();
    sources.dedup();
    ensure!(
        m.all("tidemark_backups").len() == sources.len(),
        "one tidemark_backups sample per source {sources:?}:\n{}",
        m.body
    );
    for src in sources {
        let of: Vec<&Value> = backups.iter().filter(|b| b["source"] == src).collect();
        let newest = of
            .iter()
            .max_by(|a, b| {
                unix(&a["stop_time"])
                    .unwrap_or(0.0)
                    .total_cmp(&unix(&b["stop_time"]).unwrap_or(0.0))
            })
            .context("newest")?;
        let l = [("source", src)];
        close("backups", m.get("tidemark_backups", &l)?, of.len() as f64)?;
        close(
            "last success",
            m.get("tidemark_backup_last_success_timestamp_seconds", &l)?,
            unix(&newest["stop_time"])?,
        )?;
        let dur = newest["duration_seconds"].as_f64().context("duration")?;
        ensure!(dur > 0.0, "a backup took no time: {newest}");
        close(
            "duration",
            m.get("tidemark_backup_last_duration_seconds", &l)?,
            dur,
        )?;
        close(
            "size",
            m.get("tidemark_backup_last_size_bytes", &l)?,
            newest["logical_bytes"].as_f64().context("logical_bytes")?,
        )?;
        close(
            "stored",
            m.get("tidemark_backup_last_stored_bytes", &l)?,
            newest["new_stored_bytes"]
                .as_f64()
                .context("new_stored_bytes")?,
        )?;
    }
    let unrestorable = backups
        .iter()
        .filter(|b| b["reach"]["kind"] == "missing_wal")
        .count();
    close(
        "not restorable",
        m.get("tidemark_backups_not_restorable", &[])?,
        unrestorable as f64,
    )?;

    let windows = info["recoverable"].as_array().context("recoverable")?;
    ensure!(!windows.is_empty(), "no recoverable window in {info}");
    ensure!(
        m.all("tidemark_recoverable_window_start_timestamp_seconds")
            .len()
            == windows.len(),
        "one window per timeline here:\n{}",
        m.body
    );
    for w in windows {
        let tl = w["timeline"].to_string();
        let l = [("timeline", tl.as_str())];
        close(
            "window start",
            m.get("tidemark_recoverable_window_start_timestamp_seconds", &l)?,
            unix(&w["from"])?,
        )?;
        let end = unix(&w["to_archived_at"])?;
        ensure!(
            end >= unix(&w["from"])?,
            "a window ends before it starts: {w}"
        );
        close(
            "window end",
            m.get("tidemark_recoverable_window_end_timestamp_seconds", &l)?,
            end,
        )?;
    }
    for t in info["wal"].as_array().context("wal")? {
        let tl = t["timeline"].to_string();
        let l = [("timeline", tl.as_str())];
        // Gaps a WAL window left out on purpose are not losses and not counted.
        let gaps: Vec<&Value> = t["gaps"]
            .as_array()
            .context("gaps")?
            .iter()
            .filter(|g| g["narrowed"] != true)
            .collect();
        close(
            "segments",
            m.get("tidemark_wal_archived_segments", &l)?,
            t["segments"].as_f64().context("segments")?,
        )?;
        close("gaps", m.get("tidemark_wal_gaps", &l)?, gaps.len() as f64)?;
        let missing: u64 = gaps
            .iter()
            .filter_map(|g| g["missing_segments"].as_u64())
            .sum();
        close(
            "missing",
            m.get("tidemark_wal_gap_missing_segments", &l)?,
            missing as f64,
        )?;
    }

    let d = &info["last_verified_restore"];
    ensure!(d["ok"] == true, "the recorded drill did not pass: {d}");
    close(
        "drill time",
        m.get("tidemark_drill_last_timestamp_seconds", &[])?,
        unix(&d["started_at"])?,
    )?;
    ensure!(m.get("tidemark_drill_last_success", &[])? == 1.0);
    let rto = d["rto_seconds"].as_f64().context("rto_seconds")?;
    ensure!(rto > 0.0, "no RTO: {d}");
    close("rto", m.get("tidemark_drill_last_rto_seconds", &[])?, rto)?;

    let e = &info["last_expire"];
    ensure!(e["ok"] == true, "the recorded expire did not succeed: {e}");
    let r = &e["record"];
    close(
        "expire time",
        m.get("tidemark_expire_last_timestamp_seconds", &[])?,
        unix(&r["finished_at"])?,
    )?;
    ensure!(m.get("tidemark_expire_last_success", &[])? == 1.0);
    close(
        "expire duration",
        m.get("tidemark_expire_last_duration_seconds", &[])?,
        unix(&r["finished_at"])? - unix(&r["started_at"])?,
    )?;
    close(
        "removed",
        m.get("tidemark_expire_last_removed_backups", &[])?,
        r["backups_removed"].as_f64().context("backups_removed")?,
    )?;
    for (kind, field) in [("packs", "pack_bytes_freed"), ("wal", "wal_bytes_freed")] {
        close(
            &format!("freed {kind}"),
            m.get("tidemark_expire_last_freed_bytes", &[("kind", kind)])?,
            r[field].as_f64().context("freed")?,
        )?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_exporter_and_sidecar_agree_with_info() -> Result<()> {
    let dir = TestDir::new("metrics_agree")?;
    let repo = Repo::create(&dir, "repo")?;
    let mut src = two_backups(&dir, &repo).await?;
    let drilled = drill(&dir, &repo, &dir.join("verify.log")).await?;
    ensure!(drilled["ok"] == true, "{drilled}");
    // Keep the newest backup: A and the WAL before B's start go.
    let plan = env::agent(&[
        "expire",
        "--repo",
        &repo.url,
        "--retain-last",
        "1",
        "--gc-grace",
        "0s",
        "--json",
    ])
    .await?
    .ok()?
    .json_document()?;
    // The repository stays as it is from here on: nothing archives into it.
    src.stop().await?;

    let info = env::agent(&["info", "--repo", &repo.url, "--json"])
        .await?
        .ok()?
        .json_document()?;
    let rec = &info["last_expire"]["record"];
    ensure!(
        rec["backups_removed"] == 1
            && rec["wal_bytes_freed"].as_u64().unwrap_or(0) > 0
            && rec["bytes_freed"] == plan["bytes_freed"],
        "the expire record does not describe the run {plan}: {rec}"
    );

    // The exporter, with its log in a file.
    let port = env::free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let exporter_log = dir.join("exporter.log");
    // Run directly as the database user (no runuser in between), so killing it kills the exporter.
    let mut cmd = tokio::process::Command::new(env::bins()?.agent);
    let user = env::db_user()?;
    if user.switch {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .kill_on_drop(true)
        .args([
            "exporter",
            "--repo",
            &repo.url,
            "--listen",
            &listen,
            "--interval",
            "1h",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&exporter_log)?);
    let mut exporter = cmd.spawn().context("cannot start the exporter")?;
    let read_log = || std::fs::read_to_string(&exporter_log).unwrap_or_default();
    let body = scrape_after_refresh(port, "the exporter", &read_log).await?;
    let (code, _) = http_get(port, "/healthz").await?;
    ensure!(code == 200, "exporter /healthz answered {code}");
    let from_exporter = Scrape::parse(&dir, "exporter.txt", body)?;
    agrees_with_info(&from_exporter, &info).context("exporter")?;
    exporter.kill().await?;
    exporter.wait().await?;

    // A sidecar next to an idle data directory (nothing .ready: it archives nothing), with the
    // same gauges after its own.
    let pgdata = dir.mkdir("idle/pgdata")?;
    dir.mkdir("idle/pgdata/pg_wal/archive_status")?;
    let mut cfg = SidecarConfig::new(&dir, "sidecar", &repo.url, &pgdata)?;
    cfg.args.extend(["--health-interval".into(), "1h".into()]);
    let sidecar = Sidecar::start(cfg).await?;
    let body =
        scrape_after_refresh(sidecar.port(), "the sidecar", &|| sidecar.log_tail(40)).await?;
    let from_sidecar = Scrape::parse(&dir, "sidecar.txt", body)?;
    agrees_with_info(&from_sidecar, &info).context("sidecar")?;
    ensure!(
        from_sidecar
            .types
            .contains_key("tidemark_wal_archive_lag_seconds"),
        "the sidecar's own WAL figures are gone:\n{}",
        from_sidecar.body
    );
    ensure!(
        from_sidecar.repository_samples() == from_exporter.repository_samples(),
        "the sidecar and the exporter disagree:\n{}\n---\n{}",
        from_sidecar.body,
        from_exporter.body
    );
    // The dashboard asks only for metrics that exist.
    dashboard_metrics_exist(&[&from_exporter, &from_sidecar])?;
    // No escape byte in either daemon's log.
    no_escape(&exporter_log)?;
    no_escape(&sidecar.cfg.log)?;
    Ok(())
}

/// Every metric name in deploy/grafana-dashboard.json's queries is a family the daemons serve.
fn dashboard_metrics_exist(scrapes: &[&Scrape]) -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let dash: Value = serde_json::from_str(&text).context("the dashboard is not JSON")?;
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    ensure!(
        exprs.len() >= 8,
        "too few queries in the dashboard: {exprs:?}"
    );
    let mut names: BTreeMap<String, bool> = BTreeMap::new();
    for e in &exprs {
        for w in metric_words(e) {
            names.insert(w, false);
        }
    }
    for (n, seen) in names.iter_mut() {
        *seen = scrapes
            .iter()
            .any(|s| s.types.contains_key(n) || s.samples.iter().any(|x| &x.name == n));
    }
    let missing: Vec<&String> = names.iter().filter(|(_, s)| !**s).map(|(n, _)| n).collect();
    ensure!(
        missing.is_empty(),
        "the dashboard queries metrics nobody serves: {missing:?}"
    );
    Ok(())
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// The `tidemark_…` identifiers of a PromQL expression (a metric name is a maximal run of
/// `[a-zA-Z0-9_:]` starting with `tidemark_`).
fn metric_words(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("tidemark_") {
                out.push(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    out
}

fn no_escape(log: &Path) -> Result<()> {
    let bytes = std::fs::read(log).with_context(|| format!("cannot read {}", log.display()))?;
    if let Some(at) = bytes.iter().position(|&b| b == 0x1b) {
        bail!(
            "{} holds an ESC byte at offset {at}:\n{}",
            log.display(),
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_writes_an_escape_byte_into_a_file() -> Result<()> {
    let dir = TestDir::new("metrics_no_escape")?;
    let repo = Repo::create(&dir, "repo")?;
    let log = |name: &str| dir.join(&format!("{name}.log"));
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let pgdata = src.data.to_string_lossy().into_owned();
    let conninfo = src.conninfo();
    let backup = |name: &'static str| {
        let (pgdata, conninfo, url, l) = (
            pgdata.clone(),
            conninfo.clone(),
            repo.url.clone(),
            log(name),
        );
        async move {
            run_logged(
                Tool::Agent,
                &[
                    "backup",
                    "--pgdata",
                    &pgdata,
                    "--repo",
                    &url,
                    "--pg-url",
                    &conninfo,
                    "--archive-timeout",
                    "120",
                ],
                &l,
            )
            .await?
            .ok()
        }
    };
    backup("backup1").await?;
    data::write_batch(&db, 2).await?;
    src.switch_wal_and_wait(&repo).await?;
    backup("backup2").await?;
    src.switch_wal_and_wait(&repo).await?;

    run_logged(Tool::Agent, &["info", "--repo", &repo.url], &log("info"))
        .await?
        .ok()?;
    run_logged(
        Tool::Restore,
        &["check", "--repo", &repo.url],
        &log("check"),
    )
    .await?
    .ok()?;
    drill(&dir, &repo, &log("verify")).await?;
    let target = dir.join("restored").to_string_lossy().into_owned();
    run_logged(
        Tool::Restore,
        &[
            "restore", "--repo", &repo.url, "--pgdata", &target, "--target", "latest",
        ],
        &log("restore"),
    )
    .await?
    .ok()?;
    run_logged(
        Tool::Agent,
        &["expire", "--repo", &repo.url, "--retain-last", "1"],
        &log("expire"),
    )
    .await?
    .ok()?;

    // Failures: each names what failed and says what to do.
    let missing = dir.join("nowhere/pg_wal/000000010000000000000042");
    let missing = missing.to_string_lossy().into_owned();
    let r = run_logged(
        Tool::Agent,
        &["wal-push", "--repo", &repo.url, &missing],
        &log("wal-push"),
    )
    .await?;
    ensure!(!r.success(), "wal-push of a missing file succeeded:\n{r}");
    ensure!(
        r.stderr.contains("000000010000000000000042") && r.stderr.contains("hint:"),
        "the wal-push failure does not name the segment with a hint:\n{r}"
    );
    let r = run_logged(
        Tool::Restore,
        &[
            "restore", "--repo", &repo.url, "--pgdata", &target, "--target", "latest",
        ],
        &log("restore-again"),
    )
    .await?;
    ensure!(
        !r.success(),
        "a restore into a non-empty directory succeeded:\n{r}"
    );
    ensure!(
        r.stderr.contains(&target) && r.stderr.contains("hint:"),
        "the refused restore does not name the directory with a hint:\n{r}"
    );
    let empty = Repo::create(&dir, "empty")?;
    let r = run_logged(
        Tool::Agent,
        &["info", "--repo", &empty.url],
        &log("info-empty"),
    )
    .await?;
    ensure!(!r.success(), "info on an empty repository succeeded:\n{r}");
    ensure!(
        r.stderr.contains(&empty.url) && r.stderr.contains("hint:"),
        "info's failure does not name the repository with a hint:\n{r}"
    );

    // With JSON logs (the Kubernetes manifests' setting) the failure is one JSON line carrying
    // the object in `error` and what to do in `hint`.
    let r = run_logged(
        Tool::Agent,
        &["--log-format", "json", "info", "--repo", &empty.url],
        &log("info-empty-json"),
    )
    .await?;
    ensure!(!r.success(), "info on an empty repository succeeded:\n{r}");
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let last: Value = serde_json::from_str(lines.last().copied().unwrap_or(""))
        .with_context(|| format!("the JSON log's last line is not JSON:\n{r}"))?;
    ensure!(
        lines
            .iter()
            .all(|l| serde_json::from_str::<Value>(l).is_ok())
            && last["level"] == "ERROR"
            && last["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(&empty.url))
            && last["fields"]["hint"]
                .as_str()
                .is_some_and(|h| h.contains("--repo")),
        "the JSON log does not end in one error line naming the repository with a hint:\n{r}"
    );

    for name in [
        "backup1",
        "backup2",
        "info",
        "check",
        "verify",
        "restore",
        "expire",
        "wal-push",
        "restore-again",
        "info-empty",
        "info-empty-json",
    ] {
        no_escape(&log(name))?;
    }
    Ok(())
}
