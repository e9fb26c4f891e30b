//! The filler: fetches segments from the archive, verifies them in full and writes them into the
//! spool as plain segments, `depth` ahead of the last one asked for.

use super::{read_asked, read_stamp, spool_bytes, Asked, Stamp, ASKED, END, IDLE, LOCK, STAMP};
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

/// The background filler (`wal-fetch` with [`super::FILL_FLAG`]): takes the spool's lock (or
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
    let (_, stop) = run(store, &p.spool, &stamp, from, depth, p.max_bytes, true).await;
    if stop == Stop::Idle && read_stamp(&p.spool).as_ref() == Some(&stamp) {
        // Nobody asked for a while (recovery ended at a target, or the server stopped): leave
        // nothing in pg_wal. A later request makes a new spool.
        super::wipe_held(&p.spool);
    }
    drop(lock);
}

/// Why [`run`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// The window is full and (without `follow`) that is all.
    Full,
    /// Nothing to do for [`IDLE`].
    Idle,
    /// A segment is not in the archive (`.end` names it).
    End,
    /// A segment could not be fetched or written.
    Failed,
    /// The spool's stamp changed (a request re-bound it, or the end of recovery removed it).
    Rebound,
}

/// Fills the spool with `from` and the `depth` segments after it; with `follow`, keeps doing so
/// for the segment last asked for until there is nothing more to do. Returns the segments
/// written and why it stopped.
pub(super) async fn run(
    store: &Store,
    spool: &Path,
    stamp: &Stamp,
    from: WalFileName,
    depth: usize,
    max_bytes: u64,
    follow: bool,
) -> (usize, Stop) {
    // An earlier filler's finding; the archive may have grown since.
    let _ = std::fs::remove_file(spool.join(END));
    let mut asked = Asked {
        name: from,
        nonce: String::new(),
        missing: true,
    };
    let mut seg_size: Option<u64> = None;
    // Segments written ahead of the requests: not fetched again once a request took them.
    let mut done: HashSet<WalFileName> = HashSet::new();
    let mut written = 0;
    let mut idle = Instant::now();
    loop {
        if read_stamp(spool).as_ref() != Some(stamp) {
            return (written, Stop::Rebound);
        }
        if follow {
            if let Some(a) = read_asked(spool) {
                if a != asked {
                    let (new, old) = (a.name, asked.name);
                    if new.timeline() != old.timeline() || new < old {
                        // Backwards (recovery restarted) or another timeline: whatever was
                        // taken before may be wanted again.
                        done.clear();
                    } else {
                        // Forward: what was taken is behind.
                        done.retain(|n| *n >= new);
                    }
                    if a.missing {
                        // The request found it missing: wanted, whatever was written before.
                        done.remove(&new);
                    }
                    asked = a;
                    idle = Instant::now();
                }
            }
        }
        // The window: the segment asked for and `depth` after it, on its timeline. The segment
        // size (and so the names after it) comes from the first segment written.
        let window: Vec<WalFileName> = match seg_size {
            None => vec![asked.name],
            Some(ss) => (0..=depth as u64)
                .filter_map(|i| next_segment(asked.name, i, ss))
                .collect(),
        };
        if seg_size.is_some() {
            evict(spool, &window);
        }
        let wanted: Vec<WalFileName> = window
            .iter()
            .copied()
            .filter(|n| !done.contains(n) && !spool.join(n.to_string()).is_file())
            .take(PARALLEL)
            .collect();
        let room = max_bytes.saturating_sub(spool_bytes(spool)) / seg_size.unwrap_or(16 << 20);
        // The segment asked for is always fetched, whatever the room.
        let batch: Vec<WalFileName> = wanted
            .iter()
            .copied()
            .enumerate()
            .filter(|&(i, n)| (i as u64) < room || n == asked.name)
            .map(|(_, n)| n)
            .collect();
        if batch.is_empty() {
            if !follow {
                return (written, Stop::Full);
            }
            if idle.elapsed() > IDLE {
                return (written, Stop::Idle);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let results: Vec<(WalFileName, Result<u64>)> = futures::stream::iter(batch)
            .map(|n| async move { (n, produce(store, spool, stamp, n).await) })
            .buffered(PARALLEL)
            .collect()
            .await;
        let mut gap = None;
        for (n, r) in results {
            if gap.is_some() {
                // Nothing after a gap is spooled.
                if r.is_ok() {
                    let _ = std::fs::remove_file(spool.join(n.to_string()));
                }
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
                        gap = Some(Stop::End);
                    } else {
                        tracing::warn!(file = %n, error = %format!("{e:#}"), "prefetch stopped; the requests fetch from the archive themselves");
                        gap = Some(Stop::Failed);
                    }
                }
            }
        }
        if let Some(stop) = gap {
            return (written, stop);
        }
        idle = Instant::now();
    }
}

/// Deletes spooled segments outside `window` (another timeline, or behind or beyond it after
/// recovery restarted), so that the window has room.
fn evict(spool: &Path, window: &[WalFileName]) {
    if let Ok(rd) = std::fs::read_dir(spool) {
        for e in rd.flatten() {
            let f = e.file_name();
            if let Ok(n @ WalFileName::Segment { .. }) = WalFileName::parse(&f.to_string_lossy()) {
                if !window.contains(&n) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Fetches segment `n`, verifies it in full and writes it into the spool as the plain segment;
/// returns the segment size.
async fn produce(store: &Store, spool: &Path, stamp: &Stamp, n: WalFileName) -> Result<u64> {
    let obj = wal::get_object(store, &n).await?;
    let spool = spool.to_path_buf();
    let (system_id, fsync, generation) =
        (stamp.system_id, stamp.boot_id.is_empty(), stamp.generation);
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let (h, data) =
            walfmt::decode(&obj).with_context(|| format!("archived wal file {n} is damaged"))?;
        anyhow::ensure!(h.name == n, "the archived object of {n} holds {}", h.name);
        super::check_header(&data, data.len() as u64, n, system_id)
            .with_context(|| format!("archived wal file {n}"))?;
        let tmp = spool.join(format!(".{n}.{}.tmp", std::process::id()));
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&data)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        if fsync {
            // No boot id to discard the spool by after a crash of the machine.
            f.sync_all()?;
        }
        drop(f);
        // Only into the spool this filler was started for (a request may have re-stamped it).
        if read_stamp(&spool).map(|s| s.generation) != Some(generation) {
            let _ = std::fs::remove_file(&tmp);
            anyhow::bail!("the spool was re-bound while {n} was being written");
        }
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
