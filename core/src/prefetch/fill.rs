//! The filler: fetches segments from the archive, verifies them in full and writes them into the
//! spool as plain segments, `depth` ahead of the last one asked for.

use super::{read_asked, read_stamp, spool_bytes, Stamp, ASKED, END, IDLE, LOCK, STAMP};
use crate::store::Store;
use crate::wal::{self, WalError};
use anyhow::{Context, Result};
use futures::StreamExt;
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use tidemark_format::wal::{self as walfmt, WalFileName};
use tidemark_format::Lsn;

/// Segments fetched and decoded at once.
const PARALLEL: usize = 3;

/// True for the filler's temporary files (`.<segment>.tmp`).
pub(super) fn is_temporary(f: &str) -> bool {
    f.starts_with('.')
        && f.ends_with(".tmp")
        && f != format!("{STAMP}.tmp")
        && f != format!("{ASKED}.tmp")
}

/// The background filler (`wal-fetch` with [`super::FILL_ENV`] set): takes the spool's lock (or
/// returns at once when another filler has it) and fills the spool from `from` on, following the
/// requests, until the end of the archive, an error, a new stamp, or [`IDLE`]. Never fails: what
/// it could not do, the requests do themselves.
pub async fn fill_background(store: &Store, from: &str, p: &super::Prefetch) {
    let Ok(from @ WalFileName::Segment { .. }) = WalFileName::parse(from) else {
        return;
    };
    let Some(stamp) = read_stamp(&p.spool) else {
        return;
    };
    let lock = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p.spool.join(LOCK))
    {
        Ok(f) => f,
        Err(_) => return,
    };
    if lock.try_lock().is_err() {
        return;
    }
    // Left by a filler that was killed.
    if let Ok(rd) = std::fs::read_dir(&p.spool) {
        for e in rd.flatten() {
            if is_temporary(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let depth = p.depth.clamp(1, super::MAX_DEPTH);
    run(store, &p.spool, &stamp, from, depth, p.max_bytes, true).await;
    drop(lock);
}

/// Fills the spool with `from` and the `depth` segments after it; with `follow`, keeps doing so
/// for the segment last asked for until there is nothing more to do. Returns the segments
/// written.
pub(super) async fn run(
    store: &Store,
    spool: &Path,
    stamp: &Stamp,
    from: WalFileName,
    depth: usize,
    max_bytes: u64,
    follow: bool,
) -> usize {
    // An earlier filler's finding; the archive may have grown since.
    let _ = std::fs::remove_file(spool.join(END));
    let mut asked = (from, String::new());
    let mut seg_size: Option<u64> = None;
    // Segments written since `asked` last changed: not fetched again once consumed.
    let mut done: HashSet<WalFileName> = HashSet::new();
    let mut written = 0;
    let mut idle = Instant::now();
    loop {
        if read_stamp(spool).as_ref() != Some(stamp) {
            return written;
        }
        if follow {
            if let Some(a) = read_asked(spool) {
                if a != asked {
                    asked = a;
                    idle = Instant::now();
                    // Asked (again): wanted whether or not it was written before.
                    done.remove(&asked.0);
                    done.retain(|n| n.timeline() == asked.0.timeline() && *n > asked.0);
                }
            }
        }
        let wanted: Vec<WalFileName> = match seg_size {
            // The segment size (and so the names after it) comes from the first segment.
            None => vec![asked.0],
            Some(ss) => (0..=depth as u64)
                .filter_map(|i| next_segment(asked.0, i, ss))
                .filter(|n| !done.contains(n) && !spool.join(n.to_string()).is_file())
                .take(PARALLEL)
                .collect(),
        };
        let room = max_bytes.saturating_sub(spool_bytes(spool)) / seg_size.unwrap_or(16 << 20);
        let batch: Vec<WalFileName> = wanted.into_iter().take(room.max(1) as usize).collect();
        if batch.is_empty() || room == 0 {
            if !follow || idle.elapsed() > IDLE {
                return written;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let results: Vec<(WalFileName, Result<u64>)> = futures::stream::iter(batch)
            .map(|n| async move { (n, produce(store, spool, stamp, n).await) })
            .buffered(PARALLEL)
            .collect()
            .await;
        let mut gap = false;
        for (n, r) in results {
            if gap {
                // Nothing after a gap is spooled.
                let _ = std::fs::remove_file(spool.join(n.to_string()));
                continue;
            }
            match r {
                Ok(ss) => {
                    seg_size = Some(ss);
                    done.insert(n);
                    written += 1;
                }
                Err(e) => {
                    let missing = matches!(
                        e.downcast_ref::<WalError>(),
                        Some(WalError::NotFound { .. })
                    );
                    if missing {
                        let _ = std::fs::write(spool.join(END), n.to_string());
                    } else {
                        tracing::warn!(file = %n, error = %format!("{e:#}"), "prefetch stopped; the requests fetch from the archive themselves");
                    }
                    gap = true;
                }
            }
        }
        if gap {
            return written;
        }
        idle = Instant::now();
    }
}

/// Fetches segment `n`, verifies it in full and writes it into the spool as the plain segment;
/// returns the segment size.
async fn produce(store: &Store, spool: &Path, stamp: &Stamp, n: WalFileName) -> Result<u64> {
    let obj = wal::get_object(store, &n).await?;
    let spool = spool.to_path_buf();
    let (system_id, fsync) = (stamp.system_id, stamp.boot_id.is_empty());
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let (h, data) =
            walfmt::decode(&obj).with_context(|| format!("archived wal file {n} is damaged"))?;
        anyhow::ensure!(h.name == n, "the archived object of {n} holds {}", h.name);
        super::check_header(&data, data.len() as u64, n, system_id)
            .with_context(|| format!("archived wal file {n}"))?;
        let tmp = spool.join(format!(".{n}.tmp"));
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&data)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        if fsync {
            // No boot id to discard the spool by after a crash of the machine.
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, spool.join(n.to_string()))
            .with_context(|| format!("cannot rename {}", tmp.display()))?;
        Ok(data.len() as u64)
    })
    .await
    .context("the prefetch task failed")?
}

/// The segment `i` after `name` on the same timeline.
fn next_segment(name: WalFileName, i: u64, seg_size: u64) -> Option<WalFileName> {
    let n = name.segment_number(seg_size)?;
    Some(WalFileName::segment_of(
        name.timeline(),
        Lsn((n + i).checked_mul(seg_size)?),
        seg_size,
    ))
}
