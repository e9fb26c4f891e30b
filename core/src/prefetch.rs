//! Over 500 lines because the spool's safety rules (binding, verification, cleanup) and the fetch-
//! ahead logic must be read together.
//!
//! WAL prefetch for `wal-fetch` (restore_command): when PostgreSQL asks for segment N and the spool
//! does not have it, segments N..N+depth are fetched in parallel; N goes to PostgreSQL and the rest
//! wait in a local spool, so the next `depth` requests cost no round trip to the object store.
//!
//! Invariants:
//! - The spool holds WAL objects exactly as stored in the archive (header with name, size and
//!   sha256), keyed by their full file name, so a file is served only under the name it was
//!   archived as (timelines never mix). Before a spooled file is handed over it is decoded: its
//!   name, size and sha256 must match, and a segment's page header must carry the repository's
//!   system identifier. A file failing any check is deleted and fetched from the archive instead.
//! - The spool is bound to one repository: a stamp records the repository URL and system
//!   identifier, and a spool with another stamp (or none) is emptied before use.
//! - Only segments are spooled (never `.history`, `.partial` or `.backup` files, which PostgreSQL
//!   asks for to discover timelines and must always see fresh). Files the spool does not know
//!   (foreign names, temporary files) are deleted, never served.
//! - The spool is bounded: at most [`MAX_DEPTH`] files and `max_bytes` stored bytes; segments
//!   before the one asked for are deleted, and the whole spool is emptied when a segment is not in
//!   the archive (the end of recovery, or a timeline PostgreSQL is probing).
//! - A prefetch failure never fails the fetch of N: the segment is simply fetched later.

use crate::repo;
use crate::store::Store;
use crate::wal::{self, MAX_OBJECT};
use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use tidemark_format::wal::{self as walfmt, WalFileName};
use tidemark_format::{Lsn, TimelineId};

/// Most segments fetched ahead.
pub const MAX_DEPTH: usize = 64;
/// GETs in flight at once.
const PARALLEL: usize = 8;
const STAMP: &str = ".tidemark-spool.json";

#[derive(Clone, Debug)]
pub struct Prefetch {
    /// Segments fetched ahead (1..=MAX_DEPTH).
    pub depth: usize,
    /// The spool directory (created 0700 when missing).
    pub spool: PathBuf,
    /// Most stored bytes the spool may hold.
    pub max_bytes: u64,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Stamp {
    repo: String,
    system_id: u64,
    seg_size: Option<u64>,
}

/// How a fetch was served.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// From the spool, without a GET.
    Spool,
    /// From the archive; `spooled` more segments were fetched ahead.
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
        // The end of the archive, or a failure recovery will stop on: leave nothing behind.
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
    let mut stamp = open_spool(store, &p.spool).await?;
    let spool = p.spool.clone();
    tokio::task::spawn_blocking({
        let spool = spool.clone();
        move || tidy(&spool, name)
    })
    .await??;

    // A hit: verify (one decode: name, size, sha256, system id), hand over, forget.
    let path = spool.join(name.to_string());
    if path.is_file() {
        let sys = stamp.system_id;
        let (p2, d2) = (path.clone(), dest.to_path_buf());
        let served = tokio::task::spawn_blocking(move || -> Result<()> {
            let data = read_verified(&p2, name, sys)?;
            wal::write_file(&data, &d2)
        })
        .await?;
        let _ = std::fs::remove_file(&path);
        match served {
            Ok(()) => {
                tracing::debug!(file = %name, "served from the prefetch spool");
                return Ok(Served::Spool);
            }
            Err(e) => {
                tracing::warn!(file = %name, error = %format!("{e:#}"), "ignoring a spooled wal file that fails verification; fetching it from the archive");
            }
        }
    }

    // A miss: N and the next `depth` segments in parallel.
    let depth = p.depth.clamp(1, MAX_DEPTH);
    let seg_size = match stamp.seg_size {
        Some(s) => s,
        None => {
            // The segment size names the next segments; learn it from N once per spool.
            let obj = wal::get_object(store, &name).await?;
            let (h, _) = walfmt::decode_header(&obj)
                .with_context(|| format!("archived wal file {name} is damaged"))?;
            stamp.seg_size = crate::archive::segment_size(h.size);
            write_stamp(&spool, &stamp)?;
            let spooled = match stamp.seg_size {
                Some(ss) => spool_ahead(store, &spool, name, ss, depth, p.max_bytes).await,
                None => 0,
            };
            wal::install(name, obj, dest.to_path_buf()).await?;
            return Ok(Served::Archive { spooled });
        }
    };
    let (first, spooled) = tokio::join!(
        wal::get_object(store, &name),
        spool_ahead(store, &spool, name, seg_size, depth, p.max_bytes)
    );
    let obj = first?;
    wal::install(name, obj, dest.to_path_buf()).await?;
    Ok(Served::Archive { spooled })
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

/// Fetches the segments after `name` the spool lacks, up to `depth`; returns how many were spooled.
async fn spool_ahead(
    store: &Store,
    spool: &Path,
    name: WalFileName,
    seg_size: u64,
    depth: usize,
    max_bytes: u64,
) -> usize {
    let used = spool_bytes(spool);
    let wanted: Vec<WalFileName> = (1..=depth as u64)
        .filter_map(|i| next_segment(name, i, seg_size))
        .filter(|n| !spool.join(n.to_string()).is_file())
        .collect();
    let mut results: Vec<(WalFileName, Result<Bytes>)> = futures::stream::iter(wanted)
        .map(|n| async move { (n, wal::get_object(store, &n).await) })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    results.sort_by_key(|(n, _)| *n);
    let mut total = used;
    let mut spooled = 0;
    for (n, r) in results {
        match r {
            Ok(obj) => {
                if total + obj.len() as u64 > max_bytes {
                    break;
                }
                // A cheap check now (the header names this file); the full verification (size,
                // sha256, system identifier) happens when it is served.
                match walfmt::decode_header(&obj) {
                    Ok((h, _)) if h.name == n => {}
                    _ => {
                        tracing::warn!(file = %n, "not spooling a wal object whose header names another file");
                        break;
                    }
                }
                total += obj.len() as u64;
                match write_spooled(spool, n, &obj) {
                    Ok(()) => spooled += 1,
                    Err(e) => {
                        tracing::warn!(file = %n, error = %format!("{e:#}"), "cannot spool");
                        break;
                    }
                }
            }
            // The end of the archive (or a gap): nothing after it is spooled.
            Err(_) => break,
        }
    }
    spooled
}

/// Opens (or re-binds) the spool to this repository.
async fn open_spool(store: &Store, spool: &Path) -> Result<Stamp> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(spool)
        .with_context(|| format!("cannot create the prefetch spool {}", spool.display()))?;
    let current: Option<Stamp> = std::fs::read(spool.join(STAMP))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(s) = current.filter(|s| s.repo == store.url()) {
        return Ok(s);
    }
    wipe(spool);
    let cfg = repo::require_config(store).await?;
    let s = Stamp {
        repo: store.url().to_string(),
        system_id: cfg.system_id.0,
        seg_size: None,
    };
    write_stamp(spool, &s)?;
    Ok(s)
}

fn write_stamp(spool: &Path, s: &Stamp) -> Result<()> {
    let tmp = spool.join(format!("{STAMP}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(s)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, spool.join(STAMP))
        .with_context(|| format!("cannot write the spool stamp in {}", spool.display()))
}

/// Deletes everything in the spool.
fn wipe(spool: &Path) {
    if let Ok(rd) = std::fs::read_dir(spool) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Deletes foreign files and segments before `asked` (by (log, seg), the same order whatever the
/// segment size); returns the segments left.
fn tidy(spool: &Path, asked: WalFileName) -> Result<usize> {
    let mut left = 0;
    for e in std::fs::read_dir(spool)
        .with_context(|| format!("cannot list {}", spool.display()))?
        .flatten()
    {
        let fname = e.file_name();
        let f = fname.to_string_lossy();
        if f == STAMP {
            continue;
        }
        let keep = match WalFileName::parse(&f) {
            Ok(WalFileName::Segment { log, seg, .. }) => match asked {
                WalFileName::Segment {
                    log: alog,
                    seg: aseg,
                    ..
                } => (log, seg) >= (alog, aseg),
                _ => true,
            },
            _ => false,
        };
        if keep && e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            left += 1;
        } else {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(left)
}

fn spool_bytes(spool: &Path) -> u64 {
    std::fs::read_dir(spool)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn write_spooled(spool: &Path, name: WalFileName, obj: &[u8]) -> Result<()> {
    let tmp = spool.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, obj).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, spool.join(name.to_string()))
        .with_context(|| format!("cannot rename {}", tmp.display()))
}

/// Reads a spooled object and decodes it: the file of segment `name` of the repository's cluster,
/// with the size and sha256 its header records.
fn read_verified(path: &Path, name: WalFileName, system_id: u64) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_OBJECT {
        anyhow::bail!(
            "{} is {len} bytes, larger than any wal object",
            path.display()
        );
    }
    let obj = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (h, data) = walfmt::decode(&obj)
        .with_context(|| format!("spooled wal object {name} does not verify"))?;
    if h.name != name {
        anyhow::bail!("spooled object {name} holds {}", h.name);
    }
    let ph = walfmt::parse_long_page_header(&data)
        .with_context(|| format!("wal segment {name} has no valid page header"))?;
    if ph.system_id.0 != system_id || ph.timeline != TimelineId(name.timeline().0) {
        anyhow::bail!(
            "spooled wal segment {name} belongs to system {} timeline {}, not the repository's system {system_id}",
            ph.system_id,
            ph.timeline
        );
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::WalError;
    use tidemark_format::config::{RepoConfig, COMPRESSION_ZSTD};
    use tidemark_format::{keys, SystemId};

    const SEG: u64 = 1 << 20;

    fn is_not_found(e: &anyhow::Error) -> bool {
        matches!(
            e.downcast_ref::<WalError>(),
            Some(WalError::NotFound { .. })
        )
    }

    fn segment(tli: u32, segno: u64, sys: u64, fill: u8) -> (WalFileName, Vec<u8>) {
        let name = WalFileName::segment_of(TimelineId(tli), Lsn(segno * SEG), SEG);
        let mut d = vec![fill; SEG as usize];
        d[..40].fill(0);
        d[0..2].copy_from_slice(&walfmt::PG15_PAGE_MAGIC.to_le_bytes());
        d[2..4].copy_from_slice(&2u16.to_le_bytes());
        d[4..8].copy_from_slice(&tli.to_le_bytes());
        d[8..16].copy_from_slice(&(segno * SEG).to_le_bytes());
        d[24..32].copy_from_slice(&sys.to_le_bytes());
        d[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
        d[36..40].copy_from_slice(&8192u32.to_le_bytes());
        (name, d)
    }

    async fn repo_with(
        dir: &Path,
        segs: &[(u32, u64, u8)],
    ) -> (Store, Vec<(WalFileName, Vec<u8>)>) {
        let root = dir.join("repo");
        std::fs::create_dir_all(&root).unwrap();
        let store = Store::open(&format!("file://{}", root.display())).unwrap();
        let cfg = RepoConfig {
            system_id: SystemId(42),
            chunk_size: 8192,
            pack_target: 1 << 20,
            compression: COMPRESSION_ZSTD,
            created_us: 0,
        };
        store
            .put_create(keys::CONFIG, Bytes::from(cfg.encode()))
            .await
            .unwrap();
        let mut out = Vec::new();
        for &(tli, n, fill) in segs {
            let (name, d) = segment(tli, n, 42, fill);
            store
                .put_create(&keys::wal(&name), Bytes::from(walfmt::encode(name, &d, 1)))
                .await
                .unwrap();
            out.push((name, d));
        }
        (store, out)
    }

    fn opts(dir: &Path, depth: usize) -> Prefetch {
        Prefetch {
            depth,
            spool: dir.join("pg_wal/.tidemark-prefetch"),
            max_bytes: 1 << 30,
        }
    }

    #[tokio::test]
    async fn served_files_are_byte_identical_and_mostly_from_the_spool() {
        let t = tempfile::tempdir().unwrap();
        let segs: Vec<(u32, u64, u8)> = (1..=12).map(|n| (1, n, n as u8)).collect();
        let (store, want) = repo_with(t.path(), &segs).await;
        let p = opts(t.path(), 4);
        let dest = t.path().join("pg_wal/RECOVERYXLOG");
        let mut from_spool = 0;
        for (name, data) in &want {
            let s = fetch(&store, &name.to_string(), &dest, &p).await.unwrap();
            if s == Served::Spool {
                from_spool += 1;
            }
            assert_eq!(&std::fs::read(&dest).unwrap(), data, "{name}");
        }
        // Misses at 1, 6, 11: each fetches the next four.
        assert_eq!(from_spool, 9);
        // The end of the archive empties the spool.
        let next = WalFileName::segment_of(TimelineId(1), Lsn(13 * SEG), SEG);
        let e = fetch(&store, &next.to_string(), &dest, &p)
            .await
            .unwrap_err();
        assert!(is_not_found(&e), "{e:#}");
        assert!(
            !p.spool.exists(),
            "the spool outlived the end of the archive"
        );
    }

    #[tokio::test]
    async fn foreign_and_stale_spool_files_are_never_served() {
        let t = tempfile::tempdir().unwrap();
        let (store, want) = repo_with(t.path(), &[(1, 1, 1), (1, 2, 2), (1, 3, 3)]).await;
        let p = opts(t.path(), 2);
        let dest = t.path().join("pg_wal/RECOVERYXLOG");
        // Bind the spool, then plant: a segment of another cluster under the name of segment 2,
        // a damaged copy of segment 3, and junk.
        fetch(&store, &want[0].0.to_string(), &dest, &p)
            .await
            .unwrap();
        let (n2, other) = segment(1, 2, 7, 0xee);
        std::fs::write(p.spool.join(n2.to_string()), walfmt::encode(n2, &other, 1)).unwrap();
        let mut damaged = walfmt::encode(want[2].0, &want[2].1, 1);
        let l = damaged.len();
        damaged[l - 5] ^= 0xff;
        std::fs::write(p.spool.join(want[2].0.to_string()), damaged).unwrap();
        std::fs::write(p.spool.join("junk"), b"x").unwrap();
        for (name, data) in &want[1..] {
            let s = fetch(&store, &name.to_string(), &dest, &p).await.unwrap();
            assert!(matches!(s, Served::Archive { .. }), "{name}: {s:?}");
            assert_eq!(&std::fs::read(&dest).unwrap(), data, "{name}");
        }
        assert!(!p.spool.join("junk").exists());

        // A spool stamped by another repository is emptied before use.
        let n3 = want[2].0;
        std::fs::write(
            p.spool.join(STAMP),
            serde_json::to_vec(&Stamp {
                repo: "file:///elsewhere".into(),
                system_id: 42,
                seg_size: Some(SEG),
            })
            .unwrap(),
        )
        .unwrap();
        std::fs::write(
            p.spool.join(n3.to_string()),
            walfmt::encode(n3, &want[2].1, 1),
        )
        .unwrap();
        let s = fetch(&store, &n3.to_string(), &dest, &p).await.unwrap();
        assert!(matches!(s, Served::Archive { .. }), "{s:?}");
    }

    #[tokio::test]
    async fn timelines_are_kept_apart_and_history_files_never_spooled() {
        let t = tempfile::tempdir().unwrap();
        let (store, want) = repo_with(
            t.path(),
            &[(1, 1, 1), (1, 2, 2), (2, 2, 0x22), (2, 3, 0x23)],
        )
        .await;
        let hist = WalFileName::History { tli: 2 };
        store
            .put_create(
                &keys::wal(&hist),
                Bytes::from(walfmt::encode(hist, b"1\t0/2000000\tno reason\n", 1)),
            )
            .await
            .unwrap();
        let p = opts(t.path(), 4);
        let dest = t.path().join("pg_wal/RECOVERYXLOG");
        fetch(&store, &want[0].0.to_string(), &dest, &p)
            .await
            .unwrap();
        fetch(&store, "00000002.history", &dest, &p).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"1\t0/2000000\tno reason\n");
        assert!(!p.spool.join("00000002.history").exists());
        // Timeline 2's segment 2 differs from timeline 1's: each name serves its own bytes.
        for (name, data) in [&want[2], &want[1], &want[3]] {
            fetch(&store, &name.to_string(), &dest, &p).await.unwrap();
            assert_eq!(&std::fs::read(&dest).unwrap(), data, "{name}");
        }
    }
}
