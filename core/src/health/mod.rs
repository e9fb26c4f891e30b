//! Repository-level health gauges for Prometheus: the last backups, the recoverable window, WAL
//! gaps, the last restore drill and expire, the repository's bytes. Served by the sidecar's
//! `/metrics` next to its WAL figures and by `tidemark-agent exporter`.
//!
//! Invariants:
//! - Every gauge is computed from [`info::Info`], the value `info --json` prints, read with
//!   [`info::Depth::Headers`] (listings, manifest headers, the newest drill and expire records; no
//!   pack or chunk is read): `info` and `/metrics` cannot disagree, and a refresh costs a few
//!   listings and one small read per backup.
//! - Backups, windows, WAL, drill and expire describe the newest database system (the one
//!   `restore` uses by default); repository bytes and packs sum every system.
//! - A failed refresh keeps the previous values and sets `tidemark_repository_refresh_success`
//!   to 0, so an alert on it fires instead of the gauges silently going stale or absent.
//! - The text is OpenMetrics: `# HELP` and `# TYPE` for every family, even one without samples.

mod exporter;

pub use exporter::{run as run_exporter, ExporterOptions};

use crate::info::{self, Info};
use crate::store::Store;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Default time between two refreshes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// RFC 3339 text to Unix seconds.
fn unix(t: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.timestamp_micros() as f64 / 1e6)
}

/// An OpenMetrics text writer: families in order, each with its HELP and TYPE.
struct Text(String);

type Labels = Vec<(&'static str, String)>;

fn l(k: &'static str, v: impl ToString) -> Labels {
    vec![(k, v.to_string())]
}

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &Labels, value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A gauge family with one sample per `(labels, value)`.
    fn gauge(&mut self, name: &str, help: &str, samples: Vec<(Labels, f64)>) {
        self.family(name, "gauge", help);
        for (l, v) in &samples {
            self.sample(name, l, *v);
        }
    }
}

fn b(v: bool) -> f64 {
    if v {
        1.0
    } else {
        0.0
    }
}

/// The repository gauges of `i` (without the refresh gauges and without `# EOF`).
pub fn render(i: &Info) -> String {
    let mut t = Text(String::new());
    let major = i.pg_major.map(|m| m.to_string()).unwrap_or_default();
    t.family(
        "tidemark_repository",
        "info",
        "The repository's newest database system (the one restore uses by default)",
    );
    t.sample(
        "tidemark_repository_info",
        &vec![("system_id", i.system_id.clone()), ("pg_major", major)],
        1.0,
    );
    let all: Vec<&Info> = std::iter::once(i).chain(&i.other_systems).collect();
    t.gauge(
        "tidemark_repository_systems",
        "Database systems in the repository (more than one after a major upgrade)",
        vec![(vec![], all.len() as f64)],
    );
    let sum = |f: fn(&Info) -> u64| all.iter().map(|s| f(s)).sum::<u64>() as f64;
    t.gauge(
        "tidemark_repository_bytes",
        "Bytes stored in the repository by kind of object, every database system",
        vec![
            (l("kind", "packs"), sum(|s| s.space.pack_bytes)),
            (l("kind", "wal"), sum(|s| s.space.wal_bytes)),
            (l("kind", "manifests"), sum(|s| s.space.manifest_bytes)),
        ],
    );
    t.gauge(
        "tidemark_repository_packs",
        "Pack objects in the repository, every database system",
        vec![(vec![], sum(|s| s.space.packs))],
    );

    // Backups per source, newest by stop time (info lists them oldest first).
    let mut sources: Vec<&str> = i.backups.iter().map(|b| b.source).collect();
    sources.sort_unstable();
    sources.dedup();
    let newest = |src: &str| i.backups.iter().rev().find(|b| b.source == src);
    let per_source = |f: &dyn Fn(&info::BackupInfo) -> Option<f64>| -> Vec<(Labels, f64)> {
        sources
            .iter()
            .filter_map(|s| Some((l("source", s), f(newest(s)?)?)))
            .collect()
    };
    t.gauge(
        "tidemark_backups",
        "Backups in the repository by source (pgdata or replication)",
        per_source(&|b| Some(i.backups.iter().filter(|o| o.source == b.source).count() as f64)),
    );
    t.gauge(
        "tidemark_backup_last_success_timestamp_seconds",
        "Stop time of the newest complete backup, by source",
        per_source(&|b| unix(&b.stop_time)),
    );
    t.gauge(
        "tidemark_backup_last_duration_seconds",
        "Start to stop time of the newest backup, by source",
        per_source(&|b| Some(b.duration_seconds)),
    );
    t.gauge(
        "tidemark_backup_last_size_bytes",
        "Logical size (the data directory's bytes) of the newest backup, by source",
        per_source(&|b| Some(b.logical_bytes as f64)),
    );
    t.gauge(
        "tidemark_backup_last_stored_bytes",
        "Bytes the newest backup stored anew (after deduplication and compression), by source",
        per_source(&|b| Some(b.new_stored_bytes as f64)),
    );
    t.gauge(
        "tidemark_backups_not_restorable",
        "Backups whose own WAL (start to stop segment) is not all archived",
        vec![(
            vec![],
            i.backups
                .iter()
                .filter(|b| b.reach.kind == "missing_wal")
                .count() as f64,
        )],
    );

    // The newest window of each timeline (a gap splits a timeline's WAL into several).
    let mut newest_window: Vec<&info::Window> = Vec::new();
    for w in &i.recoverable {
        match newest_window.iter_mut().find(|n| n.timeline == w.timeline) {
            Some(n) if w.to_segment > n.to_segment => *n = w,
            Some(_) => {}
            None => newest_window.push(w),
        }
    }
    let win = |f: &dyn Fn(&info::Window) -> Option<f64>| -> Vec<(Labels, f64)> {
        newest_window
            .iter()
            .filter_map(|w| Some((l("timeline", w.timeline), f(w)?)))
            .collect()
    };
    t.gauge(
        "tidemark_recoverable_window_start_timestamp_seconds",
        "Earliest moment a point-in-time restore reaches: the stop time of the backup opening the newest recoverable window, by timeline",
        win(&|w| unix(&w.from)),
    );
    t.gauge(
        "tidemark_recoverable_window_end_timestamp_seconds",
        "When the last segment of the newest recoverable window was archived (a restore reaches no later), by timeline",
        win(&|w| unix(w.to_archived_at.as_deref()?)),
    );

    let per_tl = |f: &dyn Fn(&info::TimelineWal) -> f64| -> Vec<(Labels, f64)> {
        i.wal
            .iter()
            .map(|w| (l("timeline", w.timeline), f(w)))
            .collect()
    };
    t.gauge(
        "tidemark_wal_archived_segments",
        "WAL segments in the repository, by timeline",
        per_tl(&|w| w.segments as f64),
    );
    // Gaps a WAL window left out on purpose (`narrowed`) are no loss: not counted.
    t.gauge(
        "tidemark_wal_gaps",
        "Runs of missing WAL segments between archived ones, by timeline (not those expire --retain-wal-window left out)",
        per_tl(&|w| w.gaps.iter().filter(|g| !g.narrowed).count() as f64),
    );
    t.gauge(
        "tidemark_wal_gap_missing_segments",
        "WAL segments missing inside those gaps, by timeline",
        per_tl(&|w| {
            w.gaps
                .iter()
                .filter(|g| !g.narrowed)
                .map(|g| g.missing_segments)
                .sum::<u64>() as f64
        }),
    );

    let drill = i.last_verified_restore.as_ref();
    let one =
        |v: Option<f64>| -> Vec<(Labels, f64)> { v.map(|v| vec![(vec![], v)]).unwrap_or_default() };
    t.gauge(
        "tidemark_drill_last_timestamp_seconds",
        "Start time of the newest restore drill recorded by verify --record",
        one(drill.and_then(|d| unix(d.started_at.as_deref()?))),
    );
    t.gauge(
        "tidemark_drill_last_success",
        "1 if the newest recorded restore drill passed, 0 if it failed",
        one(drill.map(|d| b(d.ok))),
    );
    t.gauge(
        "tidemark_drill_last_rto_seconds",
        "Seconds from the newest passed drill's start to a promoted server (its recovery time)",
        one(drill.and_then(|d| d.rto_seconds)),
    );

    let exp = i.last_expire.as_ref();
    let rec = exp.and_then(|e| e.record.as_ref());
    t.gauge(
        "tidemark_expire_last_timestamp_seconds",
        "End time of the newest recorded expire run",
        one(rec.and_then(|r| unix(&r.finished_at))),
    );
    t.gauge(
        "tidemark_expire_last_success",
        "1 if the newest recorded expire run succeeded, 0 if it failed or its record is unreadable",
        one(exp.map(|e| b(e.ok))),
    );
    t.gauge(
        "tidemark_expire_last_duration_seconds",
        "Duration of the newest recorded expire run",
        one(rec.and_then(|r| Some(unix(&r.finished_at)? - unix(&r.started_at)?))),
    );
    t.gauge(
        "tidemark_expire_last_removed_backups",
        "Backups the newest recorded expire run removed",
        one(rec.map(|r| r.backups_removed as f64)),
    );
    let freed: Vec<(Labels, f64)> = rec
        .map(|r| {
            vec![
                (l("kind", "packs"), r.pack_bytes_freed as f64),
                (l("kind", "wal"), r.wal_bytes_freed as f64),
            ]
        })
        .unwrap_or_default();
    t.gauge(
        "tidemark_expire_last_freed_bytes",
        "Bytes the newest recorded expire run deleted, by kind of object",
        freed,
    );
    t.0
}

/// The repository gauges, refreshed in the background; shared by the sidecar and the exporter.
pub struct RepoGauges {
    /// The last successful refresh's text.
    facts: Mutex<String>,
    /// Unix seconds of the last refresh attempt and of the last successful one (0: none yet).
    attempted: AtomicI64,
    succeeded: AtomicI64,
    ok: AtomicI64,
    duration_ms: AtomicI64,
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Default for RepoGauges {
    fn default() -> Self {
        RepoGauges {
            facts: Mutex::new(String::new()),
            attempted: AtomicI64::new(0),
            succeeded: AtomicI64::new(0),
            ok: AtomicI64::new(0),
            duration_ms: AtomicI64::new(0),
        }
    }
}

impl RepoGauges {
    /// Reads the repository once and replaces the gauges; on failure keeps the old ones and logs
    /// the cause.
    pub async fn refresh(&self, store: &Store) {
        let started = Instant::now();
        let r = info::collect_all_with(store, info::Depth::Headers).await;
        self.duration_ms
            .store(started.elapsed().as_millis() as i64, Ordering::Relaxed);
        self.attempted.store(now_secs(), Ordering::Relaxed);
        match r {
            Ok(i) => {
                *self.facts.lock().unwrap_or_else(PoisonError::into_inner) = render(&i);
                self.succeeded.store(now_secs(), Ordering::Relaxed);
                self.ok.store(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.ok.store(0, Ordering::Relaxed);
                tracing::warn!(
                    repo = store.url(),
                    error = %format!("{e:#}"),
                    hint = "the repository gauges keep their last values; tidemark_repository_refresh_success is 0 until a refresh succeeds",
                    "cannot refresh the repository gauges"
                );
            }
        }
    }

    /// Refreshes now and then every `interval`, in the background.
    pub fn spawn(self: &Arc<Self>, store: Store, interval: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.refresh(&store).await;
                tokio::time::sleep(interval).await;
            }
        });
    }

    /// Unix seconds of the last refresh attempt (0 before the first).
    pub fn last_attempt(&self) -> i64 {
        self.attempted.load(Ordering::Relaxed)
    }

    /// The gauges as OpenMetrics text families (no `# EOF`); empty before the first refresh.
    pub fn text(&self) -> String {
        let attempted = self.attempted.load(Ordering::Relaxed);
        if attempted == 0 {
            return String::new();
        }
        let mut t = Text(
            self.facts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        );
        let succeeded = self.succeeded.load(Ordering::Relaxed);
        t.gauge(
            "tidemark_repository_refresh_success",
            "1 if the last read of the repository for these gauges succeeded, else 0 (the gauges keep their previous values)",
     vec![(vec![], self.ok.load(Ordering::Relaxed) as f64)],
        );
        t.gauge(
            "tidemark_repository_refresh_timestamp_seconds",
            "Unix time of the last successful read of the repository for these gauges",
            if succeeded > 0 {
                vec![(vec![], succeeded as f64)]
            } else {
                Vec::new()
            },
        );
        t.gauge(
            "tidemark_repository_refresh_duration_seconds",
            "How long the last read of the repository for these gauges took",
            vec![(
                vec![],
                self.duration_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            )],
        );
        t.0
    }
}

/// `prefix` (OpenMetrics text ending in `# EOF`, or empty) with the families of `more` added
/// before the end marker.
pub fn append(prefix: &str, more: &str) -> String {
    let head = prefix.strip_suffix("# EOF\n").unwrap_or(prefix);
    format!("{head}{more}# EOF\n")
}

#[cfg(test)]
mod tests;
