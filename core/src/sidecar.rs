//! The WAL archiving sidecar: a long-running daemon that uploads `.ready` WAL files ahead of
//! PostgreSQL's archive_command, answers archive_command (`wal-push`) over a Unix socket, and serves
//! `/healthz` and `/metrics`.
//!
//! Invariants:
//! - The source of truth for what needs archiving is a sorted listing of
//!   `pg_wal/archive_status/*.ready`, taken on every wake-up and every `rescan` interval; inotify
//!   events are only a wake-up signal (queues overflow, watches die). PostgreSQL's status files are
//!   never renamed or written here.
//! - A name is acknowledged (socket reply `OK`) only after `wal::push` returned `Ok`, i.e. the
//!   object is durably stored, and after the local state recorded it.
//! - Memory is bounded: at most `concurrency` uploads, each holding one WAL file and its
//!   compressed copy (2 × wal_segment_size), plus the names currently `.ready`.
//! - SIGTERM stops new uploads, removes the socket (so archive_command falls back to uploading
//!   itself), waits up to the grace period for uploads in flight, and exits. Puts are atomic, so
//!   nothing is left half written.

use crate::metrics::Metrics;
use crate::store::Store;
use crate::wal::{self, PushOutcome, WalError};
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tidemark_format::wal::WalFileName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Notify};

/// Name of the socket file inside the socket directory.
pub const SOCKET_NAME: &str = "tidemark.sock";
const STATE_FILE: &str = "archived";
/// A conflicting file is retried this long after it was refused.
const CONFLICT_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct SidecarOptions {
    pub pgdata: PathBuf,
    pub socket_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub concurrency: usize,
    pub grace: Duration,
    pub rescan: Duration,
    pub compress_level: i32,
    pub allow_overwriting_store: bool,
    /// Register this cluster as a new database system of the repository (wal-push's flag).
    pub accept_new_system: bool,
}

type Reply = Result<(), String>;

struct Inner {
    store: Store,
    opts: SidecarOptions,
    /// Names durably stored and recorded in the state file, still `.ready` or recently requested.
    stored: Mutex<HashSet<String>>,
    state_file: Mutex<std::fs::File>,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Reply>>>>,
    requested: Mutex<Vec<String>>,
    in_flight: Mutex<HashSet<String>>,
    refused: Mutex<HashMap<String, Instant>>,
    wake: Notify,
    stopping: AtomicBool,
    last_loop: AtomicI64,
    metrics: Metrics,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the sidecar until SIGTERM or SIGINT.
pub async fn run(store: Store, opts: SidecarOptions) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    run_until(store, opts, stop).await
}

/// Runs the sidecar until `stop` completes, then shuts down gracefully.
pub async fn run_until(
    store: Store,
    opts: SidecarOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let status_dir = opts.pgdata.join("pg_wal/archive_status");
    if !status_dir.is_dir() {
        bail!("{} does not exist\nhint: --pgdata must be the data directory PostgreSQL uses (shared with this container)", status_dir.display());
    }
    if !store
        .probe_create_only()
        .await
        .context("cannot probe the object store")?
    {
        if opts.allow_overwriting_store {
            tracing::warn!(repo = store.url(), "the store overwrites existing objects; continuing because --allow-overwriting-store was given");
        } else {
            bail!("repository {} does not honour create-only writes: a conflicting WAL file could replace an archived one\nhint: use a store with conditional writes, or pass --allow-overwriting-store to accept the risk", store.url());
        }
    }
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("cannot create state directory {}", opts.state_dir.display()))?;
    let (stored, state_file) = open_state(
        &opts.state_dir,
        &status_dir,
        &opts.pgdata.join("pg_wal"),
        store.url(),
    )?;
    let inner = Arc::new(Inner {
        store,
        opts: opts.clone(),
        stored: Mutex::new(stored),
        state_file: Mutex::new(state_file),
        waiters: Mutex::new(HashMap::new()),
        requested: Mutex::new(Vec::new()),
        in_flight: Mutex::new(HashSet::new()),
        refused: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        stopping: AtomicBool::new(false),
        last_loop: AtomicI64::new(now_secs()),
        metrics: Metrics::default(),
    });

    // inotify is a wake-up signal only; the listing below is the truth.
    let waker = inner.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Listing the directory raises access events of its own: waking on them would spin.
        if !matches!(
            res,
            Ok(notify::Event {
                kind: notify::EventKind::Access(_),
                ..
            })
        ) {
            waker.wake.notify_one();
        }
    })
    .context("cannot create a file watcher")?;
    if let Err(e) = notify::Watcher::watch(
        &mut watcher,
        &status_dir,
        notify::RecursiveMode::NonRecursive,
    ) {
        tracing::warn!(error = %e, "cannot watch archive_status; relying on periodic listing");
    }

    let socket_path = match &opts.socket_dir {
        Some(dir) => Some(start_socket(inner.clone(), dir)?),
        None => None,
    };
    if let Some(addr) = opts.listen {
        start_http(inner.clone(), addr).await?;
    }
    tracing::info!(pgdata = %opts.pgdata.display(), repo = inner.store.url(), "sidecar started");

    let mut uploads = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    // Scan at once: files may already be .ready.
    inner.wake.notify_one();
    loop {
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(opts.rescan) => {}
            _ = &mut stop => break,
        }
        while uploads.try_join_next().is_some() {}
        inner.last_loop.store(now_secs(), Ordering::Relaxed);
        if let Err(e) = dispatch(&inner, &status_dir, &mut uploads) {
            tracing::warn!(error = %format!("{e:#}"), "cannot scan archive_status");
        }
    }

    inner.stopping.store(true, Ordering::Relaxed);
    if let Some(p) = &socket_path {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!(
        in_flight = uploads.len(),
        grace_s = opts.grace.as_secs(),
        "stopping: waiting for uploads in flight"
    );
    let drained = tokio::time::timeout(opts.grace, async {
        while uploads.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = uploads.len(),
            "grace period over; abandoning uploads in flight (nothing was acknowledged for them)"
        );
        uploads.abort_all();
    }
    for (_, ws) in lock(&inner.waiters).drain() {
        for w in ws {
            let _ = w.send(Err("sidecar is shutting down".into()));
        }
    }
    tracing::info!("sidecar stopped");
    Ok(())
}

/// The state file's first line: binds the recorded names to one repository.
fn state_header(repo: &str) -> String {
    format!("tidemark-sidecar-state 1 {repo}")
}

/// sha256 of a WAL file in pg_wal, as recorded in the state.
fn file_sha(pg_wal: &Path, name: &str) -> Result<tidemark_format::ChunkId> {
    let data = std::fs::read(pg_wal.join(name)).with_context(|| format!("cannot read {name}"))?;
    Ok(tidemark_format::ChunkId::of(&data))
}

/// Reads the state file and keeps only entries that are for this repository, still `.ready`, and
/// whose file still has the recorded sha256 (a re-initialised cluster reuses names); rewrites it.
fn open_state(
    state_dir: &Path,
    status_dir: &Path,
    pg_wal: &Path,
    repo: &str,
) -> Result<(HashSet<String>, std::fs::File)> {
    let path = state_dir.join(STATE_FILE);
    let ready: HashSet<String> = list_ready(status_dir)?.0.into_iter().collect();
    let old = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let header = state_header(repo);
    let mut lines = old.lines();
    let mut kept: Vec<(String, String)> = Vec::new();
    if lines.next() == Some(header.as_str()) {
        for l in lines {
            let Some((name, sha)) = l.split_once(' ') else {
                continue;
            };
            if ready.contains(name)
                && file_sha(pg_wal, name)
                    .map(|s| s.to_string() == sha)
                    .unwrap_or(false)
            {
                kept.push((name.to_string(), sha.to_string()));
            }
        }
    }
    let tmp = state_dir.join(format!("{STATE_FILE}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    writeln!(f, "{header}")?;
    for (n, sha) in &kept {
        writeln!(f, "{n} {sha}")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(state_dir)?.sync_all()?;
    let f = std::fs::OpenOptions::new().append(true).open(&path)?;
    Ok((kept.into_iter().map(|(n, _)| n).collect(), f))
}

/// `.ready` names sorted with `.history` files first, and the age of the oldest.
fn list_ready(status_dir: &Path) -> Result<(Vec<String>, Option<Duration>)> {
    let mut names = Vec::new();
    let mut oldest: Option<SystemTime> = None;
    for ent in std::fs::read_dir(status_dir)
        .with_context(|| format!("cannot list {}", status_dir.display()))?
    {
        let Ok(ent) = ent else { continue };
        let name = ent.file_name();
        let Some(base) = name.to_str().and_then(|n| n.strip_suffix(".ready")) else {
            continue;
        };
        if WalFileName::parse(base).is_err() {
            continue;
        }
        if let Ok(m) = ent.metadata().and_then(|m| m.modified()) {
            oldest = Some(oldest.map_or(m, |o| o.min(m)));
        }
        names.push(base.to_string());
    }
    names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    let age = oldest.and_then(|o| SystemTime::now().duration_since(o).ok());
    Ok((names, age))
}

fn dispatch(
    inner: &Arc<Inner>,
    status_dir: &Path,
    uploads: &mut tokio::task::JoinSet<()>,
) -> Result<()> {
    let (ready, age) = list_ready(status_dir)?;
    let mut candidates: Vec<String> = std::mem::take(&mut *lock(&inner.requested));
    candidates.extend(ready.iter().cloned());
    let ready_set: HashSet<&String> = ready.iter().collect();
    {
        let mut stored = lock(&inner.stored);
        let waiting: HashSet<String> = lock(&inner.waiters).keys().cloned().collect();
        stored.retain(|n| ready_set.contains(n) || waiting.contains(n));
        let pending = ready.iter().filter(|n| !stored.contains(*n)).count();
        inner.metrics.ready_queue.set(ready.len() as i64);
        inner.metrics.lag_segments.set(pending as i64);
        inner.metrics.lag_seconds.set(if pending == 0 {
            0.0
        } else {
            age.map(|a| a.as_secs_f64()).unwrap_or(0.0)
        });
    }
    let mut seen = HashSet::new();
    for name in candidates {
        if !seen.insert(name.clone()) {
            continue;
        }
        if lock(&inner.stored).contains(&name) {
            resolve(inner, &name, Ok(()));
            continue;
        }
        if let Some(t) = lock(&inner.refused).get(&name) {
            if t.elapsed() < CONFLICT_BACKOFF {
                resolve(
                    inner,
                    &name,
                    Err(format!(
                        "wal file {name} conflicts with the archived copy; see the sidecar log"
                    )),
                );
                continue;
            }
        }
        {
            let mut fl = lock(&inner.in_flight);
            if fl.contains(&name) {
                continue;
            }
            if fl.len() >= inner.opts.concurrency.max(1) {
                // Keep requested names at the front for the next round.
                if lock(&inner.waiters).contains_key(&name) {
                    lock(&inner.requested).push(name);
                }
                continue;
            }
            fl.insert(name.clone());
            inner.metrics.uploads_in_flight.set(fl.len() as i64);
        }
        let inner2 = inner.clone();
        uploads.spawn(async move { upload(inner2, name).await });
    }
    Ok(())
}

fn resolve(inner: &Inner, name: &str, reply: Reply) {
    if let Some(ws) = lock(&inner.waiters).remove(name) {
        for w in ws {
            let _ = w.send(reply.clone());
        }
    }
}

async fn upload(inner: Arc<Inner>, name: String) {
    let path = inner.opts.pgdata.join("pg_wal").join(&name);
    let mut delay = Duration::from_millis(500);
    loop {
        let span = tracing::info_span!("wal", file = %name);
        let result = tracing::Instrument::instrument(
            wal::push_file(
                &inner.store,
                &path,
                inner.opts.compress_level,
                &wal::PushOptions {
                    pgdata: Some(inner.opts.pgdata.clone()),
                    accept_new_system: inner.opts.accept_new_system,
                },
            ),
            span,
        )
        .await;
        match result {
            Ok((outcome, sha)) => {
                if let Err(e) = record(&inner, &name, &sha) {
                    inner.metrics.upload_failures.inc();
                    tracing::error!(file = %name, error = %format!("{e:#}"), "stored, but cannot record it in the state directory; not acknowledging");
                    resolve(
                        &inner,
                        &name,
                        Err(format!(
                            "cannot record {name} in the state directory: {e:#}"
                        )),
                    );
                    // Do not spin on a full state directory: the next round retries later.
                    if !inner.stopping.load(Ordering::Relaxed) {
                        tokio::time::sleep(delay.max(Duration::from_secs(2))).await;
                    }
                    break;
                }
                if let PushOutcome::Stored(bytes) = outcome {
                    inner.metrics.stored_bytes.inc_by(bytes);
                    inner.metrics.stored_objects.inc();
                }
                inner.metrics.set_last_archived(&name);
                tracing::info!(file = %name, outcome = ?outcome, "archived");
                resolve(&inner, &name, Ok(()));
                break;
            }
            Err(e)
                if matches!(
                    e.downcast_ref::<WalError>(),
                    Some(WalError::Conflict { .. })
                ) =>
            {
                inner.metrics.conflicts.inc();
                tracing::error!(file = %name, error = %format!("{e:#}"), "refusing to archive a conflicting wal file");
                lock(&inner.refused).insert(name.clone(), Instant::now());
                resolve(&inner, &name, Err(format!("{e:#}")));
                break;
            }
            Err(e) => {
                inner.metrics.upload_failures.inc();
                let vanished = !path.exists();
                tracing::warn!(file = %name, error = %format!("{e:#}"), vanished, "upload failed");
                resolve(&inner, &name, Err(format!("{e:#}")));
                if vanished || inner.stopping.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    {
        // Set under the lock: set after it, two finishing uploads could store their counts in
        // the wrong order and leave the gauge at 1 with nothing in flight.
        let mut fl = lock(&inner.in_flight);
        fl.remove(&name);
        inner.metrics.uploads_in_flight.set(fl.len() as i64);
    }
    inner.wake.notify_one();
}

/// Records `name` as durably stored, with the sha256 of the content that was stored.
fn record(inner: &Inner, name: &str, sha: &tidemark_format::ChunkId) -> Result<()> {
    {
        let mut f = lock(&inner.state_file);
        writeln!(f, "{name} {sha}")?;
        f.sync_data()?;
    }
    lock(&inner.stored).insert(name.to_string());
    Ok(())
}

fn start_socket(inner: Arc<Inner>, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    let path = dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve_push(inner.clone(), conn));
        }
    });
    Ok(path)
}

/// One request: `PUSH <wal file name>\n` → `OK\n` once durably stored, or `ERR <reason>\n`.
async fn serve_push(inner: Arc<Inner>, conn: UnixStream) {
    let (rd, mut wr) = conn.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, 256));
    if rd.read_line(&mut line).await.is_err() {
        return;
    }
    let reply = match line.trim_end().strip_prefix("PUSH ") {
        Some(name) if WalFileName::parse(name).is_ok() => {
            inner.metrics.handoffs.inc();
            if inner.stopping.load(Ordering::Relaxed) {
                Err("sidecar is shutting down".to_string())
            } else if lock(&inner.stored).contains(name) {
                Ok(())
            } else {
                let (tx, rx) = oneshot::channel();
                lock(&inner.waiters)
                    .entry(name.to_string())
                    .or_default()
                    .push(tx);
                lock(&inner.requested).push(name.to_string());
                inner.wake.notify_one();
                rx.await
                    .unwrap_or_else(|_| Err("sidecar dropped the request".into()))
            }
        }
        _ => Err(format!("bad request {:?}", line.trim_end())),
    };
    let msg = match reply {
        Ok(()) => "OK\n".to_string(),
        Err(e) => format!("ERR {}\n", e.replace('\n', " ")),
    };
    let _ = wr.write_all(msg.as_bytes()).await;
}

/// Asks a running sidecar to archive `name`. `None` when no sidecar answered (the caller then
/// uploads itself); `Some(Ok)` only when the sidecar reports the file durably stored.
pub async fn handoff(socket_dir: &Path, name: &str) -> Option<Result<()>> {
    let mut conn = UnixStream::connect(socket_dir.join(SOCKET_NAME))
        .await
        .ok()?;
    conn.write_all(format!("PUSH {name}\n").as_bytes())
        .await
        .ok()?;
    let mut line = String::new();
    let mut rd = BufReader::new(conn);
    match rd.read_line(&mut line).await {
        Ok(n) if n > 0 => {}
        _ => return None,
    }
    let line = line.trim_end();
    if line == "OK" {
        Some(Ok(()))
    } else if let Some(e) = line.strip_prefix("ERR ") {
        if e.contains("shutting down") {
            None
        } else {
            Some(Err(anyhow::anyhow!(
                "sidecar could not archive {name}: {e}"
            )))
        }
    } else {
        None
    }
}

async fn start_http(inner: Arc<Inner>, addr: SocketAddr) -> Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "serving /healthz and /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let inner = inner.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let inner = inner.clone();
                        async move {
                            let (status, ctype, body) = match req.uri().path() {
                                "/metrics" => (
                                    StatusCode::OK,
                                    // prometheus-client encodes OpenMetrics text.
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    inner.metrics.render(),
                                ),
                                "/healthz" => {
                                    let stale = now_secs()
                                        - inner.last_loop.load(Ordering::Relaxed)
                                        > 3 * inner.opts.rescan.as_secs().max(1) as i64 + 5;
                                    if stale || inner.stopping.load(Ordering::Relaxed) {
                                        (
                                            StatusCode::SERVICE_UNAVAILABLE,
                                            "text/plain",
                                            "unhealthy\n".to_string(),
                                        )
                                    } else {
                                        (StatusCode::OK, "text/plain", "ok\n".to_string())
                                    }
                                }
                                _ => (
                                    StatusCode::NOT_FOUND,
                                    "text/plain",
                                    "not found\n".to_string(),
                                ),
                            };
                            Response::builder()
                                .status(status)
                                .header("content-type", ctype)
                                .body(Full::new(Bytes::from(body)))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAL segment of `size` bytes whose first page carries a PostgreSQL 15 long header.
    fn segment(sysid: u64, size: u32, fill: u8) -> Vec<u8> {
        let mut d = vec![fill; size as usize];
        d[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        d[2..4].copy_from_slice(&2u16.to_le_bytes());
        d[4..8].copy_from_slice(&1u32.to_le_bytes());
        d[8..16].copy_from_slice(&0u64.to_le_bytes());
        d[16..24].fill(0);
        d[24..32].copy_from_slice(&sysid.to_le_bytes());
        d[32..36].copy_from_slice(&size.to_le_bytes());
        d[36..40].copy_from_slice(&8192u32.to_le_bytes());
        d
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn archives_ready_files_and_answers_handoffs() {
        let dir = tempfile::tempdir().unwrap();
        let pgdata = dir.path().join("pgdata");
        let status = pgdata.join("pg_wal/archive_status");
        std::fs::create_dir_all(&status).unwrap();
        let seg = 1u32 << 20;
        for (i, fill) in [(1, 1u8), (2, 2u8)] {
            let name = format!("0000000100000000000000{i:02X}");
            std::fs::write(pgdata.join("pg_wal").join(&name), segment(42, seg, fill)).unwrap();
            std::fs::write(status.join(format!("{name}.ready")), b"").unwrap();
        }
        // Not yet .ready: only a handoff request makes the sidecar archive it.
        std::fs::write(
            pgdata.join("pg_wal/000000010000000000000003"),
            segment(42, seg, 3),
        )
        .unwrap();
        let store = Store::open(&format!("file://{}/repo", dir.path().display())).unwrap();
        let sock = dir.path().join("sock");
        let opts = SidecarOptions {
            pgdata: pgdata.clone(),
            socket_dir: Some(sock.clone()),
            state_dir: dir.path().join("state"),
            listen: None,
            concurrency: 2,
            grace: Duration::from_secs(5),
            rescan: Duration::from_secs(1),
            compress_level: 1,
            allow_overwriting_store: false,
            accept_new_system: false,
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run_until(store.clone(), opts, async move {
            let _ = stop_rx.await;
        }));
        let mut ok = false;
        for _ in 0..100 {
            if sock.join(SOCKET_NAME).exists() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok, "sidecar socket never appeared");
        // A handoff for a .ready file answers once it is stored.
        assert!(matches!(
            handoff(&sock, "000000010000000000000001").await,
            Some(Ok(()))
        ));
        assert!(matches!(
            handoff(&sock, "000000010000000000000003").await,
            Some(Ok(()))
        ));
        for n in [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000003",
        ] {
            let key = format!("wal/00000001/{n}");
            let mut found = false;
            for _ in 0..100 {
                if store.head(&key).await.unwrap().is_some() {
                    found = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(found, "{n} was not archived");
        }
        // A file whose name is archived with other content is refused, never acknowledged.
        std::fs::write(
            pgdata.join("pg_wal/000000010000000000000002"),
            segment(42, seg, 9),
        )
        .unwrap();
        std::fs::remove_file(dir.path().join("state/archived")).ok();
        let r = handoff(&sock, "000000010000000000000004").await;
        assert!(
            matches!(r, Some(Err(_))),
            "a missing file must not be acknowledged"
        );
        let state = std::fs::read_to_string(dir.path().join("state/archived")).unwrap_or_default();
        assert!(!state.contains("000000010000000000000004"));
        stop_tx.send(()).unwrap();
        task.await.unwrap().unwrap();
        assert!(
            !sock.join(SOCKET_NAME).exists(),
            "socket must be removed at shutdown"
        );
        assert!(
            handoff(&sock, "000000010000000000000001").await.is_none(),
            "no sidecar: the caller uploads itself"
        );
    }

    #[test]
    fn state_is_bound_to_the_repository_and_the_file_content() {
        let dir = tempfile::tempdir().unwrap();
        let pg_wal = dir.path().join("pg_wal");
        let status = pg_wal.join("archive_status");
        std::fs::create_dir_all(&status).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let n = "000000010000000000000001";
        std::fs::write(pg_wal.join(n), b"segment bytes").unwrap();
        std::fs::write(status.join(format!("{n}.ready")), b"").unwrap();
        let sha = file_sha(&pg_wal, n).unwrap();
        std::fs::write(
            state.join(STATE_FILE),
            format!("{}\n{n} {sha}\n", state_header("file:///repo1")),
        )
        .unwrap();
        assert!(open_state(&state, &status, &pg_wal, "file:///repo1")
            .unwrap()
            .0
            .contains(n));
        std::fs::write(
            state.join(STATE_FILE),
            format!("{}\n{n} {sha}\n", state_header("file:///repo1")),
        )
        .unwrap();
        assert!(
            open_state(&state, &status, &pg_wal, "file:///repo2")
                .unwrap()
                .0
                .is_empty(),
            "another repository's state must not be trusted"
        );
        std::fs::write(
            state.join(STATE_FILE),
            format!("{}\n{n} {sha}\n", state_header("file:///repo1")),
        )
        .unwrap();
        std::fs::write(pg_wal.join(n), b"other bytes, same name").unwrap();
        assert!(
            open_state(&state, &status, &pg_wal, "file:///repo1")
                .unwrap()
                .0
                .is_empty(),
            "a file with other content must not be trusted"
        );
    }
}
