//! Repository consistency check (`tidemark-restore check`): every chunk a manifest references is
//! in its pack's index at the recorded place (with `read_data`, also decompresses to its id, and
//! every archived WAL object is read and verified), every backup has its WAL from start to stop,
//! and the archive has no gap from each backup's start to the end of its timeline but the gaps a
//! WAL window leaves on purpose (`window::narrowed`: from a backup's stop segment to a later
//! backup's start segment). Problems name the backups and the points in time they affect.

use crate::repo;
use crate::store::Store;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use tidemark_format::manifest::EntryKind;
use tidemark_format::pack::{self, PackEntry};
use tidemark_format::{chunk, keys, ChunkId, PackId};

/// Where a chunk sits and which backups reference it (ascending indexes into the readable
/// backups, not their ids: this map has an entry per distinct chunk reference, so its size is
/// what `check` needs per chunk), per pack.
type PackRefs = HashMap<PackId, HashMap<(ChunkId, u64, u32, u32), Vec<u32>>>;

#[derive(Serialize, Default)]
pub struct CheckReport {
    pub schema_version: u32,
    pub backups_checked: u64,
    pub packs_checked: u64,
    pub chunks_checked: u64,
    pub chunks_read: u64,
    pub wal_segments: u64,
    pub problems: Vec<Problem>,
}

#[derive(Serialize, Clone)]
pub struct Problem {
    /// Backups that cannot be restored (or not to every point) because of this problem.
    pub backups: Vec<String>,
    pub what: String,
}

/// `sample` is the fraction of referenced chunks read and verified when `read_data` is set.
pub async fn run(store: &Store, read_data: bool, sample: f64) -> Result<CheckReport> {
    repo::require_config(store).await?;
    let mut report = CheckReport {
        schema_version: 1,
        ..Default::default()
    };
    let all = repo::all_backups(store).await?;
    for (id, why) in &all.unreadable {
        report.problems.push(Problem {
            backups: vec![id.clone()],
            what: format!("the manifest of backup {id} cannot be read: {why}; restore and backup leave it out, expire refuses to run\nhint: restore backups/{id}.manifest from a copy, or move it out of backups/ if the backup is lost"),
        });
    }
    let headers = all.readable;
    // pack id -> (chunk id, offset, clen, ulen) -> backups referencing it
    let mut refs: PackRefs = HashMap::new();
    for (bi, h) in headers.iter().enumerate() {
        let bi = u32::try_from(bi).context("more than 2^32 backups")?;
        let m = match repo::load_manifest(store, &h.backup_id).await {
            Ok(m) => m,
            Err(e)
                if e.chain()
                    .any(|c| c.downcast_ref::<crate::store::StoreError>().is_some()) =>
            {
                return Err(e)
            }
            Err(e) => {
                report.problems.push(Problem {
                    backups: vec![h.backup_id.clone()],
                    what: format!("{e:#}\nhint: the backup cannot be restored; restore backups/{}.manifest from a copy, or move it out of backups/ if the backup is lost", h.backup_id),
                });
                continue;
            }
        };
        report.backups_checked += 1;
        for e in &m.entries {
            if let EntryKind::File(f) = &e.kind {
                for c in &f.chunks {
                    let by = refs
                        .entry(m.packs[c.pack as usize])
                        .or_default()
                        .entry((c.id, c.offset, c.clen, c.ulen))
                        .or_default();
                    // Backups are visited in order, so the list stays sorted and unique.
                    if by.last() != Some(&bi) {
                        by.push(bi);
                    }
                }
            }
        }
    }
    let mut n = 0u64;
    for (pid, chunks) in &refs {
        report.packs_checked += 1;
        let key = keys::pack(pid);
        let all_backups = || -> Vec<String> {
            let b: HashSet<u32> = chunks.values().flatten().copied().collect();
            names(&headers, b.iter())
        };
        let index = match read_index(store, &key).await {
            Ok(ix) => ix,
            Err(e) => {
                report.problems.push(Problem {
                    backups: all_backups(),
                    what: format!("pack {pid}: {e:#}"),
                });
                continue;
            }
        };
        let by_offset: HashMap<u64, &PackEntry> = index.iter().map(|e| (e.offset, e)).collect();
        for ((id, offset, clen, ulen), backups) in chunks {
            report.chunks_checked += 1;
            let ok = by_offset
                .get(offset)
                .is_some_and(|e| e.id == *id && e.clen == *clen && e.ulen == *ulen);
            if !ok {
                report.problems.push(Problem {
                    backups: names(&headers, backups.iter()),
                    what: format!("chunk {id} is not in pack {pid} at offset {offset}"),
                });
                continue;
            }
            n += 1;
            // Deterministic sampling: every k-th chunk, so reruns read the same ones.
            let every = if sample >= 1.0 {
                1
            } else {
                (1.0 / sample.max(1e-9)).round() as u64
            };
            if read_data && n.is_multiple_of(every.max(1)) {
                report.chunks_read += 1;
                let bytes = store.get_range(&key, *offset..offset + *clen as u64).await;
                let verdict = bytes.map_err(anyhow::Error::from).and_then(|b| {
                    chunk::decode_with(&store.chunk_ids(), id, &b, *ulen)
                        .map(|_| ())
                        .map_err(anyhow::Error::from)
                });
                if let Err(e) = verdict {
                    report.problems.push(Problem {
                        backups: names(&headers, backups.iter()),
                        what: format!("chunk {id} in pack {pid} is damaged: {e:#}"),
                    });
                }
            }
        }
    }
    check_wal(store, &headers, &mut report, read_data).await?;
    Ok(report)
}

/// The ids of the backups at indexes `ix` of `headers`, sorted.
fn names<'a>(
    headers: &[tidemark_format::manifest::ManifestHeader],
    ix: impl Iterator<Item = &'a u32>,
) -> Vec<String> {
    let mut v: Vec<String> = ix
        .filter_map(|i| headers.get(*i as usize))
        .map(|h| h.backup_id.clone())
        .collect();
    v.sort();
    v
}

pub(crate) async fn read_index(store: &Store, key: &str) -> Result<Vec<PackEntry>> {
    let size = store
        .head(key)
        .await?
        .context("the pack object is missing")?;
    let min = pack::HEADER_LEN + pack::FOOTER_LEN as u64;
    anyhow::ensure!(size >= min, "the pack object is {size} bytes, too short");
    let footer = store
        .get_range(key, size - pack::FOOTER_LEN as u64..size)
        .await?;
    anyhow::ensure!(footer[4..] == pack::END_MAGIC, "the pack has no end marker");
    let index_len = u32::from_le_bytes([footer[0], footer[1], footer[2], footer[3]]) as u64;
    anyhow::ensure!(
        index_len <= size - min,
        "the pack index length {index_len} exceeds the pack"
    );
    let start = size - pack::FOOTER_LEN as u64 - index_len;
    let index = store.get_range(key, start..start + index_len).await?;
    Ok(pack::decode_index(&index, start)?)
}

async fn check_wal(
    store: &Store,
    headers: &[tidemark_format::manifest::ManifestHeader],
    report: &mut CheckReport,
    read_data: bool,
) -> Result<()> {
    let mut archive = crate::archive::Archive::list(store).await?;
    if read_data {
        read_wal(store, headers, &mut archive, report).await?;
    }
    report.wal_segments = archive
        .files
        .keys()
        .map(|&t| archive.segments(t).count() as u64)
        .sum();
    // Without any segment there is nothing to measure: every backup then lacks its WAL, which
    // the default size reports just as well.
    let seg_size = archive.seg_size.unwrap_or(16 << 20);
    for h in headers {
        let tl = h.timeline.0;
        let present = archive.segment_numbers(tl, seg_size);
        let first = h.start_lsn.0 / seg_size;
        let stop = h.stop_lsn.0.saturating_sub(1).max(h.start_lsn.0) / seg_size;
        let missing_in_backup: Vec<String> = (first..=stop)
            .filter(|s| !present.contains(s))
            .map(|s| crate::archive::name_of(tl, s, seg_size).to_string())
            .collect();
        // A gap a WAL window left on purpose ends this backup's reach without being a problem.
        let first_gap_after = crate::window::first_gap_after(&archive, h, seg_size)
            .filter(|g| !crate::window::narrowed(g, tl, headers, seg_size))
            .and_then(|g| crate::window::first_missing_after(&g, h, seg_size))
            .map(|n| crate::archive::name_of(tl, n, seg_size).to_string());
        if !missing_in_backup.is_empty() {
            report.problems.push(Problem {
                backups: vec![h.backup_id.clone()],
                what: format!(
                    "backup {} lacks wal needed for consistency: {}; it cannot be restored",
                    h.backup_id,
                    missing_in_backup.join(" ")
                ),
            });
        }
        if let Some(g) = first_gap_after {
            report.problems.push(Problem {
                backups: vec![h.backup_id.clone()],
                what: format!("timeline {tl} has a gap at wal segment {g}: backup {} recovers only to points before that segment", h.backup_id),
            });
        }
    }
    Ok(())
}

/// With `--read-data`: reads every archived WAL object whole and verifies it (size and sha256
/// against its header). A damaged one is reported, naming the backups whose recovery would replay
/// it (same timeline, starting at or before it), and left out of `archive`, so the checks that
/// follow see it as missing.
async fn read_wal(
    store: &Store,
    headers: &[tidemark_format::manifest::ManifestHeader],
    archive: &mut crate::archive::Archive,
    report: &mut CheckReport,
) -> Result<()> {
    let seg_size = archive.seg_size.unwrap_or(16 << 20);
    let mut damaged = Vec::new();
    for (&tl, files) in &archive.files {
        for name in files.keys() {
            let verdict = crate::wal::verify_stored(store, name).await;
            let Err(e) = verdict else { continue };
            let seg = name.segment_number(seg_size);
            let mut backups: Vec<String> = headers
                .iter()
                .filter(|h| h.timeline.0 == tl && seg.is_none_or(|s| h.start_lsn.0 / seg_size <= s))
                .map(|h| h.backup_id.clone())
                .collect();
            backups.sort();
            report.problems.push(Problem {
                backups,
                what: format!("archived wal file {name} is damaged: {e:#}\nhint: a recovery replaying it fails there; if PostgreSQL still has the file in pg_wal, move the damaged object aside and run 'tidemark-agent wal-push' on it; otherwise take a new backup"),
            });
            damaged.push((tl, *name));
        }
    }
    for (tl, name) in damaged {
        if let Some(f) = archive.files.get_mut(&tl) {
            f.remove(&name);
        }
    }
    Ok(())
}

pub fn render(r: &CheckReport) -> String {
    let mut s = format!(
        "checked {} backups, {} packs, {} chunk references ({} read), {} wal segments\n",
        r.backups_checked, r.packs_checked, r.chunks_checked, r.chunks_read, r.wal_segments
    );
    if r.problems.is_empty() {
        s += "no problems found\n";
    }
    for p in &r.problems {
        s += &format!("PROBLEM: {} (affects: {})\n", p.what, p.backups.join(", "));
    }
    s
}
