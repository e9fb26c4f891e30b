//! The WAL archiving sidecar: a long-running daemon that uploads `.ready` WAL files ahead of
//! PostgreSQL's archive_command, answers archive_command (`wal-push`) over a Unix socket
//! (`socket`), and serves `/healthz` and `/metrics` (`http`; the repository gauges of
//! `crate::health` next to its own WAL figures, refreshed every `health_interval`). This module is the daemon: the scan
//! loop and the uploads; what it has stored survives restarts in `state`.
//!
//! Invariants:
//! - The source of truth for what needs archiving is a sorted listing of
//!   `pg_wal/archive_status/*.ready`, taken on every wake-up and every `rescan` interval; inotify
//!   events are only a wake-up signal (queues overflow, watches die). PostgreSQL's status files are
//!   never renamed or written here.
//! - A name is acknowledged (socket reply `OK`) only after `wal::push` returned `Ok`, i.e. the
//!   object is durably stored, and after the local state recorded it.
//! - Memory is bounded: at most `concurrency` uploads, each holding one WAL file and its
//!   compressed copy (2 × wal_segment_size), plus the names currently `.ready`. The read and
//!   compression buffers of files up to 64 MiB stay allocated between uploads, at most
//!   `concurrency` sets (`wal::EncodeBuffers`).
//! - SIGTERM stops new uploads, removes the socket (so archive_command falls back to uploading
//!   itself), waits up to the grace period for uploads in flight, and exits. Puts are atomic, so
//!   nothing is left half written.

pub(crate) mod http;
mod socket;
mod state;

pub use socket::{handoff, SOCKET_NAME};

use crate::metrics::Metrics;
use crate::store::Store;
use crate::wal::{self, PushOutcome, WalError};
use anyhow::{bail, Context, Result};
use socket::Reply;
use state::State;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tidemark_format::wal::WalFileName;
use tokio::sync::{oneshot, Notify};

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
    /// How often `/metrics` re-reads the repository's health gauges (`crate::health`);
    /// `None`: not served.
    pub health_interval: Option<Duration>,
}

struct Inner {
    store: Store,
    opts: SidecarOptions,
    /// Names durably stored and recorded in the state file, still `.ready` or recently requested.
    state: State,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Reply>>>>,
    requested: Mutex<Vec<String>>,
    in_flight: Mutex<HashSet<String>>,
    refused: Mutex<HashMap<String, Instant>>,
    wake: Notify,
    stopping: AtomicBool,
    last_loop: AtomicI64,
    metrics: Metrics,
    repo_gauges: Arc<crate::health::RepoGauges>,
    /// The uploads' read and compression buffers, kept between files (at most `concurrency`).
    buffers: wal::EncodeBuffers,
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
    let ready: HashSet<String> = list_ready(&status_dir)?.0.into_iter().collect();
    let state = State::open(
        &opts.state_dir,
        &opts.pgdata.join("pg_wal"),
        &ready,
        store.url(),
    )?;
    let inner = Arc::new(Inner {
        store,
        opts: opts.clone(),
        state,
        waiters: Mutex::new(HashMap::new()),
        requested: Mutex::new(Vec::new()),
        in_flight: Mutex::new(HashSet::new()),
        refused: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        stopping: AtomicBool::new(false),
        last_loop: AtomicI64::new(now_secs()),
        metrics: Metrics::default(),
        repo_gauges: Arc::default(),
        buffers: wal::EncodeBuffers::default(),
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
        Some(dir) => Some(socket::listen(inner.clone(), dir)?),
        None => None,
    };
    if let Some(addr) = opts.listen {
        http::serve(inner.clone(), addr).await?;
        if let Some(every) = opts.health_interval {
            inner.repo_gauges.spawn(inner.store.clone(), every);
        }
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
            tracing::warn!(dir = %status_dir.display(), error = %format!("{e:#}"), hint = "the sidecar must be able to list PostgreSQL's pg_wal/archive_status (the same volume and a user that can read it)", "cannot scan archive_status");
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
        let waiting: HashSet<String> = lock(&inner.waiters).keys().cloned().collect();
        inner
            .state
            .retain(|n| ready_set.contains(n) || waiting.contains(n));
        let pending = ready.iter().filter(|n| !inner.state.contains(n)).count();
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
        if inner.state.contains(&name) {
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
                    buffers: inner.buffers.clone(),
                },
            ),
            span,
        )
        .await;
        match result {
            Ok((outcome, digest)) => {
                if let Err(e) = inner.state.record(&name, &digest) {
                    inner.metrics.upload_failures.inc();
                    tracing::error!(file = %name, state_dir = %inner.opts.state_dir.display(), error = %format!("{e:#}"), hint = "free space in or fix the permissions of the state directory (--state-dir); the upload is retried", "stored, but cannot record it in the state directory; not acknowledging");
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
                tracing::error!(file = %name, error = %format!("{e:#}"), hint = "another cluster archives into this repository, or this one was re-initialised: point each cluster at its own repository; the archived copy is untouched", "refusing to archive a conflicting wal file");
                lock(&inner.refused).insert(name.clone(), Instant::now());
                resolve(&inner, &name, Err(format!("{e:#}")));
                break;
            }
            Err(e) => {
                inner.metrics.upload_failures.inc();
                let vanished = !path.exists();
                tracing::warn!(file = %name, repo = inner.store.url(), error = %format!("{e:#}"), vanished, hint = "retried with backoff until it succeeds; check the storage error (credentials, bucket, network) if this repeats", "upload failed");
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

impl socket::Archiver for Inner {
    fn request(&self, name: &str) -> oneshot::Receiver<Reply> {
        self.metrics.handoffs.inc();
        let (tx, rx) = oneshot::channel();
        if self.stopping.load(Ordering::Relaxed) {
            let _ = tx.send(Err("sidecar is shutting down".to_string()));
        } else if self.state.contains(name) {
            let _ = tx.send(Ok(()));
        } else {
            lock(&self.waiters)
                .entry(name.to_string())
                .or_default()
                .push(tx);
            lock(&self.requested).push(name.to_string());
            self.wake.notify_one();
        }
        rx
    }
}

impl http::Status for Inner {
    fn metrics_text(&self) -> String {
        crate::health::append(&self.metrics.render(), &self.repo_gauges.text())
    }

    fn healthy(&self) -> bool {
        let stale = now_secs() - self.last_loop.load(Ordering::Relaxed)
            > 3 * self.opts.rescan.as_secs().max(1) as i64 + 5;
        !stale && !self.stopping.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
