//! WAL prefetch for `wal-fetch` (restore_command): a spool of segments decoded ahead of
//! PostgreSQL's startup process, so that most requests cost one rename.
//!
//! When PostgreSQL asks for segment N, `fetch` records N in the spool (`.asked`) and serves N
//! from the spool when it is there. Otherwise it makes sure a filler is running and waits for N;
//! the filler ([`fill`]) fetches N and the next `depth` segments from the archive, verifies each
//! and writes it into the spool as the plain segment, then keeps that window `depth` segments
//! ahead of the last one asked. In the binary the filler is a background process (the same
//! `wal-fetch` command with [`FILL_FLAG`]), so decoding overlaps replay; in tests it can run in
//! the same process before the fetch returns ([`Filler::Inline`]).
//!
//! Invariants:
//! - A spooled file is a segment that the filler read from the archive under its own name and
//!   verified in full before it was written: the stored object's name, size and digest, and the
//!   segment's page header (system identifier of the repository, timeline of the name, page
//!   address of the segment, segment size equal to the file's). It is written under a temporary
//!   name and renamed, so the spool never holds a partial segment under a WAL name; before a
//!   file is handed over its page header and size are checked again, and a file failing that is
//!   deleted and the segment fetched from the archive instead.
//! - The spool is bound to one repository and one boot of the machine: a stamp records the
//!   repository URL, its system identifier, the kernel's boot id and a random generation; a
//!   spool with another stamp (or none) is emptied before use. Files are not fsynced: after a
//!   crash of the machine the boot id differs and every spooled file is discarded.
//! - Only segments are spooled (never `.history`, `.partial` or `.backup` files, which PostgreSQL
//!   asks for to discover timelines and must always see fresh). Files the spool does not know
//!   are deleted, never served.
//! - The spool is bounded: at most [`MAX_DEPTH`] segments ahead and `max_bytes` bytes; segments
//!   before the one asked for are deleted. When a segment is not in the archive (the end of
//!   recovery, or a timeline PostgreSQL is probing) the filler is stopped and the spool emptied
//!   and removed.
//! - The filler stops at the first segment the archive lacks, on any error, when the stamp
//!   changes (it checks the stamp's generation again before each rename, so a filler of an older
//!   spool never writes into a newer one), and after [`IDLE`] without a new request (it then
//!   removes the spool: recovery ended at a target, or the server stopped). A failure of the
//!   spool or the filler never fails the fetch of N: the request then fetches it itself, with
//!   its retries.
//! - A request that finds N missing says so (`.asked`), and the filler fetches N whatever it
//!   wrote before: PostgreSQL may ask for a segment again, or go back after a restart.

mod fill;
mod spool;

use crate::store::Store;
use crate::wal;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark_format::wal::{self as walfmt, WalFileName};
use tidemark_format::{Lsn, TimelineId};

pub use fill::fill_background;
use spool::{
    open_spool, read_asked, read_stamp, segments_in, spool_bytes, tidy, wipe, wipe_held,
    write_asked, Asked,
};

/// Most segments fetched ahead.
pub const MAX_DEPTH: usize = 64;
/// The (hidden) flag appended to the request's own arguments to start the background filler.
pub const FILL_FLAG: &str = "--fill-spool";
/// A filler with nothing to do for this long stops.
pub const IDLE: Duration = Duration::from_secs(15);
/// How long a request waits for a running filler to deliver its segment before fetching it
/// itself.
const WAIT: Duration = Duration::from_secs(30);
const STAMP: &str = ".tidemark-spool.json";
const ASKED: &str = ".asked";
const LOCK: &str = ".filler.lock";
/// Written by a filler that found a segment missing from the archive: its name.
const END: &str = ".end";

#[derive(Clone, Debug)]
pub struct Prefetch {
    /// Segments fetched ahead (1..=MAX_DEPTH).
    pub depth: usize,
    /// The spool directory (created 0700 when missing).
    pub spool: PathBuf,
    /// Most bytes the spool may hold.
    pub max_bytes: u64,
    /// Who fills the spool.
    pub filler: Filler,
}

/// Who fills the spool.
#[derive(Clone, Debug)]
pub enum Filler {
    /// The request itself, before it returns: a miss fetches N and the next `depth` segments.
    Inline,
    /// A background process started with this program and arguments (and [`FILL_FLAG`]), which
    /// runs [`fill_background`]; requests only wait for it and rename.
    Background {
        program: PathBuf,
        args: Vec<OsString>,
    },
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Stamp {
    repo: String,
    system_id: u64,
    boot_id: String,
    generation: u64,
}

/// How a fetch was served.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// From the spool, filled before the request came.
    Spool,
    /// The request had to wait for its segment (a miss): `spooled` segments after it were in the
    /// spool when it returned.
    Archive { spooled: usize },
}

/// The restore_command with prefetch: writes `fname` to `dest`; `WalError::NotFound` (only) when
/// the archive lacks it.
pub async fn fetch(store: &Store, fname: &str, dest: &Path, p: &Prefetch) -> Result<Served> {
    let name = match WalFileName::parse(fname) {
        Ok(n @ WalFileName::Segment { .. }) => n,
        _ => {
            wal::fetch(store, fname, dest).await?;
            return Ok(Served::Archive { spooled: 0 });
        }
    };
    let r = fetch_segment(store, name, dest, p).await;
    if r.is_err() {
        // The end of the archive, or a failure recovery will stop on: stop the filler and leave
        // nothing behind.
        let _ = std::fs::remove_file(p.spool.join(STAMP));
        wait_filler_gone(&p.spool, Duration::from_secs(5)).await;
        wipe(&p.spool);
        let _ = std::fs::remove_dir(&p.spool);
    }
    r
}

async fn fetch_segment(
    store: &Store,
    name: WalFileName,
    dest: &Path,
    p: &Prefetch,
) -> Result<Served> {
    // The spool's own failures (a directory that cannot be written, a full disk) never fail the
    // request: it fetches the segment itself, with its own errors and retries.
    match from_spool(store, name, dest, p).await {
        Ok(Some(served)) => return Ok(served),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(file = %name, spool = %p.spool.display(), error = %format!("{e:#}"), "the prefetch spool failed; fetching without it");
        }
    }
    let obj = wal::get_object(store, &name).await?;
    wal::install(name, obj, dest.to_path_buf()).await?;
    let spooled = segments_in(&p.spool);
    remove_if_ended(&p.spool, name, true).await;
    Ok(Served::Archive { spooled })
}

/// Serves `name` from the spool: at once when it is there, else after the filler delivered it;
/// `None` when it did not (the end of the archive, an error: the filler has stopped).
async fn from_spool(
    store: &Store,
    name: WalFileName,
    dest: &Path,
    p: &Prefetch,
) -> Result<Option<Served>> {
    let stamp = open_spool(store, &p.spool).await?;
    let spool = p.spool.as_path();
    tidy(spool, name)?;
    write_asked(spool, name, false)?;
    if take(spool, name, &stamp, dest)? {
        tracing::debug!(file = %name, "served from the prefetch spool");
        remove_if_ended(spool, name, false).await;
        return Ok(Some(Served::Spool));
    }
    write_asked(spool, name, true)?;
    let depth = p.depth.clamp(1, MAX_DEPTH);
    let delivered = match &p.filler {
        Filler::Inline => {
            fill::run(store, spool, &stamp, name, depth, p.max_bytes, false).await;
            take(spool, name, &stamp, dest)?
        }
        Filler::Background { program, args } => {
            let child = ensure_filler(spool, program, args)?;
            wait_for(spool, name, child).await && take(spool, name, &stamp, dest)?
        }
    };
    if !delivered {
        return Ok(None);
    }
    let spooled = segments_in(spool);
    remove_if_ended(spool, name, true).await;
    Ok(Some(Served::Archive { spooled }))
}

/// Removes the spool after the last segment of the archive was served: nothing is spooled, no
/// filler runs, and the filler found the segment after `served` missing. Recovery ends there or
/// asks again (and a new spool is made), so nothing is left in pg_wal after promotion.
async fn remove_if_ended(spool: &Path, served: WalFileName, missed: bool) {
    // After a miss, a filler that has spooled nothing after `served` yet may be about to find
    // the end: give it a moment. (At the end of recovery PostgreSQL asks for the last segment
    // again after the request for the one after it emptied the spool: a new filler serves it.)
    let t0 = Instant::now();
    while missed
        && segments_in(spool) == 0
        && filler_running(spool)
        && t0.elapsed() < Duration::from_millis(300)
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ended = std::fs::read_to_string(spool.join(END))
        .ok()
        .and_then(|s| WalFileName::parse(s.trim()).ok());
    if ended.is_some_and(|e| is_next(served, e))
        && segments_in(spool) == 0
        && !filler_running(spool)
    {
        wipe(spool);
        let _ = std::fs::remove_dir(spool);
    }
}

/// Hands the spooled segment `name` over to `dest` (a rename) after checking its page header and
/// size; false when the spool lacks it or it fails the check (it is then deleted).
fn take(spool: &Path, name: WalFileName, stamp: &Stamp, dest: &Path) -> Result<bool> {
    let path = spool.join(name.to_string());
    if !path.is_file() {
        return Ok(false);
    }
    if let Err(e) = check_plain(&path, name, stamp.system_id) {
        tracing::warn!(file = %name, error = %format!("{e:#}"), "ignoring a spooled wal file that fails its check; fetching it from the archive");
        let _ = std::fs::remove_file(&path);
        return Ok(false);
    }
    match std::fs::rename(&path, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: a spool directory on another file system.
            let data =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            wal::write_file(&data, dest)?;
            let _ = std::fs::remove_file(&path);
            Ok(true)
        }
        Err(e) => Err(e)
            .with_context(|| format!("cannot rename {} to {}", path.display(), dest.display())),
    }
}

/// A spooled plain segment: its long page header names the repository's system, the timeline of
/// `name` and the segment's first page, and the file has the segment size the header gives.
fn check_plain(path: &Path, name: WalFileName, system_id: u64) -> Result<()> {
    use std::io::Read;
    let mut head = [0u8; 64];
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    f.read_exact(&mut head)
        .with_context(|| format!("{} is shorter than a page header", path.display()))?;
    check_header(&head, len, name, system_id)
}

/// The checks of [`check_plain`] on a segment's first bytes and its length.
fn check_header(head: &[u8], len: u64, name: WalFileName, system_id: u64) -> Result<()> {
    let ph = walfmt::parse_long_page_header(head)
        .with_context(|| format!("wal segment {name} has no valid page header"))?;
    let seg_size = u64::from(ph.seg_size);
    anyhow::ensure!(
        crate::archive::segment_size(seg_size) == Some(seg_size) && len == seg_size,
        "wal segment {name} is {len} bytes, its header says segments are {seg_size}"
    );
    // The first segment of a timeline begins with pages copied from its parent: their header
    // names the older timeline.
    anyhow::ensure!(
        ph.system_id.0 == system_id && ph.timeline <= TimelineId(name.timeline().0),
        "wal segment {name} belongs to system {} timeline {}, not the repository's system {system_id}",
        ph.system_id,
        ph.timeline
    );
    let start = name
        .segment_number(seg_size)
        .and_then(|n| n.checked_mul(seg_size));
    anyhow::ensure!(
        start == Some(ph.page_addr),
        "wal segment {name} starts at {}, not at its own position",
        Lsn(ph.page_addr)
    );
    Ok(())
}

/// True when `b` is the segment right after `a` on its timeline, whatever the segment size: the
/// next segment of the same log, or the first of the next log.
fn is_next(a: WalFileName, b: WalFileName) -> bool {
    match (a, b) {
        (
            WalFileName::Segment { tli, log, seg },
            WalFileName::Segment {
                tli: t2,
                log: l2,
                seg: s2,
            },
        ) => {
            tli == t2
                && ((l2 == log && Some(s2) == seg.checked_add(1))
                    || (Some(l2) == log.checked_add(1) && s2 == 0))
        }
        _ => false,
    }
}

/// Starts the background filler unless one holds the spool's lock; returns the process started.
fn ensure_filler(
    spool: &Path,
    program: &Path,
    args: &[OsString],
) -> Result<Option<std::process::Child>> {
    if filler_running(spool) {
        return Ok(None);
    }
    // No inherited stderr: a restore_command whose output is piped would wait for the filler.
    let child = std::process::Command::new(program)
        .args(args)
        .arg(FILL_FLAG)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    Ok(Some(child))
}

/// True while a filler holds the spool's lock.
fn filler_running(spool: &Path) -> bool {
    // Read-write: where flock is emulated by fcntl (NFS), an exclusive lock needs it.
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(spool.join(LOCK))
    {
        Ok(f) => matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// Waits until the spool holds `name`, while a filler runs (or the one just started has not yet
/// taken the lock), at most [`WAIT`]; true when it is there.
async fn wait_for(spool: &Path, name: WalFileName, mut child: Option<std::process::Child>) -> bool {
    let path = spool.join(name.to_string());
    let t0 = Instant::now();
    let mut pause = Duration::from_micros(500);
    loop {
        if path.is_file() {
            return true;
        }
        let started = child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if (!started && !filler_running(spool)) || t0.elapsed() > WAIT {
            // Reap a filler that ended, and look once more: it may have just written the file.
            if let Some(mut c) = child.take() {
                if !matches!(c.try_wait(), Ok(None)) {
                    let _ = c.wait();
                }
            }
            return path.is_file();
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Waits (at most `limit`) until no filler holds the spool's lock.
async fn wait_filler_gone(spool: &Path, limit: Duration) {
    let t0 = Instant::now();
    while filler_running(spool) && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests;
