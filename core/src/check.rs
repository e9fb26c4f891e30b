//! Repository consistency check (`tidemark-restore check`): every chunk a manifest references is
//! in its pack's index at the recorded place (with `read_data`, also decompresses to its id, and
//! every archived WAL object is read and verified), every backup has its WAL from start to stop,
//! and the archive has no gap from each backup's start to the end of its timeline but the gaps a
//! WAL window leaves on purpose (`window::narrowed`: from a backup's stop segment to a later
//! backup's start segment). Problems name the backups and the points in time they affect.

use crate::manifest_file::LocalManifest;
use crate::repo;
use crate::spill::{self, Numbering, Record, Sorted, Spill};
use crate::store::Store;
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use tidemark_format::manifest::ManifestHeader;
use tidemark_format::pack::{self, PackEntry};
use tidemark_format::{chunk, keys, ChunkId, PackId};

/// One chunk reference of one backup as `check` spills it (68 bytes): the references of all
/// backups are grouped by pack on disk (`spill`), not in memory, so `check`'s memory does not
/// grow with the repository. Sorted by pack id (its first 8 bytes, then its number), offset,
/// chunk id, clen, ulen and backup, so the references of one pack come together, identical
/// references of several backups next to each other.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Ref {
    /// The pack id's first 8 bytes, big-endian: the spill's key, ordered as the ids are.
    pack_key: u64,
    /// The pack's number in the run's [`Numbering`].
    pack: u32,
    offset: u64,
    /// Where the chunk starts in its frame.
    skip: u32,
    id: ChunkId,
    clen: u32,
    ulen: u32,
    /// Index into the readable backups.
    backup: u32,
}

impl Ref {
    fn same_place(&self, o: &Ref) -> bool {
        (
            self.pack,
            self.offset,
            self.skip,
            self.id,
            self.clen,
            self.ulen,
        ) == (o.pack, o.offset, o.skip, o.id, o.clen, o.ulen)
    }
}

impl Record for Ref {
    const SIZE: usize = 68;
    fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.pack_key.to_le_bytes());
        out[8..12].copy_from_slice(&self.pack.to_le_bytes());
        out[12..20].copy_from_slice(&self.offset.to_le_bytes());
        out[20..52].copy_from_slice(&self.id.0);
        out[52..56].copy_from_slice(&self.clen.to_le_bytes());
        out[56..60].copy_from_slice(&self.ulen.to_le_bytes());
        out[60..64].copy_from_slice(&self.backup.to_le_bytes());
        out[64..68].copy_from_slice(&self.skip.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Ref {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i + 4)) << 32) | u64::from(u32_at(i));
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[20..52]);
        Ref {
            pack_key: u64_at(0),
            pack: u32_at(8),
            offset: u64_at(12),
            id: ChunkId(id),
            clen: u32_at(52),
            ulen: u32_at(56),
            backup: u32_at(60),
            skip: u32_at(64),
        }
    }
    fn key(&self) -> u64 {
        self.pack_key
    }
}

/// The first 8 bytes of a pack id, big-endian.
fn pack_key(p: &PackId) -> u64 {
    let mut k = [0u8; 8];
    k.copy_from_slice(&p.0[..8]);
    u64::from_be_bytes(k)
}

/// The chunk references the manifest headers announce (`new_chunks + reused_chunks` each): the
/// spill's estimate, never trusted beyond choosing its partition count.
pub(crate) fn announced_refs<'a>(headers: impl IntoIterator<Item = &'a ManifestHeader>) -> u64 {
    headers.into_iter().fold(0u64, |a, h| {
        a.saturating_add(h.stats.new_chunks.saturating_add(h.stats.reused_chunks))
    })
}

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

/// The problem of a backup whose manifest cannot be read (or streamed to its end).
fn unreadable_manifest(id: &str, e: &anyhow::Error) -> Problem {
    Problem {
        backups: vec![id.to_string()],
        what: format!("{e:#}\nhint: the backup cannot be restored; restore backups/{id}.manifest from a copy, or move it out of backups/ if the backup is lost"),
    }
}

/// `sample` is the fraction of referenced chunks read and verified when `read_data` is set.
///
/// Memory: the chunk references of every backup go to scratch files grouped by pack
/// (`spill`, budget [`spill::budget`]), read back one partition at a time; then one pack's index
/// and the backups of one reference. Scratch space: 64 bytes per chunk reference of every backup.
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
    let mut gather = Gather {
        spill: Spill::new("check", announced_refs(&headers), spill::budget()?)?,
        packs: Numbering::default(),
    };
    // Backups whose manifest failed part way: their references already spilled are skipped.
    let mut unread: HashSet<u32> = HashSet::new();
    for (bi, h) in headers.iter().enumerate() {
        let bi = u32::try_from(bi).context("more than 2^32 backups")?;
        let m = match LocalManifest::load(store, &h.backup_id).await {
            Ok(m) => m,
            Err(e) if is_store_error(&e) => return Err(e),
            Err(e) => {
                report.problems.push(unreadable_manifest(&h.backup_id, &e));
                continue;
            }
        };
        // On a blocking thread: the pass reads the local copy and writes the scratch files.
        let name = h.backup_id.clone();
        let (back, streamed) = tokio::task::spawn_blocking(move || {
            let r = gather.add(&m, &name, bi);
            (gather, r)
        })
        .await
        .context("the pass over a manifest's chunk references failed")?;
        gather = back;
        // The outer error is the scratch files' (the run's), the inner one the manifest's.
        match streamed? {
            Ok(()) => report.backups_checked += 1,
            Err(e) if is_store_error(&e) => return Err(e),
            Err(e) => {
                unread.insert(bi);
                report.problems.push(unreadable_manifest(&h.backup_id, &e));
            }
        }
    }
    let Gather { spill, packs } = gather;
    let spilled = spill.finish()?;
    let mut refs = spilled.sorted();
    let mut next = next_ref(&mut refs, &unread)?;
    // Deterministic sampling: every k-th chunk in the order above (by pack id, then offset), so
    // reruns over the same backups read the same ones.
    let every = if sample >= 1.0 {
        1
    } else {
        (1.0 / sample.max(1e-9)).round() as u64
    };
    let mut n = 0u64;
    while let Some(first) = next {
        let pid = packs
            .key(first.pack)
            .context("a spilled reference names a pack that was never numbered")?;
        report.packs_checked += 1;
        let key = keys::pack(&pid);
        let index = match read_index(store, &key).await {
            Ok(ix) => ix,
            Err(e) => {
                let mut backups = BTreeSet::new();
                while let Some(r) = next.filter(|r| r.pack == first.pack) {
                    backups.insert(r.backup);
                    next = next_ref(&mut refs, &unread)?;
                }
                report.problems.push(Problem {
                    backups: names(&headers, backups.iter()),
                    what: format!("pack {pid}: {e:#}"),
                });
                continue;
            }
        };
        let by_place: HashMap<(u64, u32), &PackEntry> =
            index.iter().map(|e| ((e.offset, e.skip), e)).collect();
        // The frame fetched last (offset, its stored bytes) and the reader that keeps it
        // decoded: the chunks of one frame are checked with one read and one decompression.
        let mut fetched: Option<(u64, bytes::Bytes)> = None;
        let mut frames = chunk::FrameReader::default();
        let mut scratch = Vec::new();
        while let Some(r) = next.filter(|r| r.pack == first.pack) {
            // The backups of this reference, ascending (the records are sorted by backup last).
            let mut backups = vec![r.backup];
            loop {
                next = next_ref(&mut refs, &unread)?;
                match next {
                    Some(x) if x.same_place(&r) => {
                        if backups.last() != Some(&x.backup) {
                            backups.push(x.backup);
                        }
                    }
                    _ => break,
                }
            }
            let (id, offset, clen, ulen, skip) = (r.id, r.offset, r.clen, r.ulen, r.skip);
            report.chunks_checked += 1;
            let ok = by_place
                .get(&(offset, skip))
                .is_some_and(|e| e.id == id && e.clen == clen && e.ulen == ulen);
            if !ok {
                report.problems.push(Problem {
                    backups: names(&headers, backups.iter()),
                    what: format!(
                        "chunk {id} is not in pack {pid} at offset {offset}, skip {skip}"
                    ),
                });
                continue;
            }
            n += 1;
            if read_data && n.is_multiple_of(every.max(1)) {
                report.chunks_read += 1;
                if fetched.as_ref().is_none_or(|(at, _)| *at != offset) {
                    fetched = None;
                    match store.get_range(&key, offset..offset + clen as u64).await {
                        Ok(b) => fetched = Some((offset, b)),
                        Err(e) => {
                            report.problems.push(Problem {
                                backups: names(&headers, backups.iter()),
                                what: format!(
                                    "chunk {id} in pack {pid} is damaged: {:#}",
                                    anyhow::Error::from(e)
                                ),
                            });
                            continue;
                        }
                    }
                }
                let stored = fetched.as_ref().map_or(&[][..], |(_, b)| &b[..]);
                scratch.clear();
                let verdict = frames.append(
                    &store.chunk_ids(),
                    offset,
                    stored,
                    &[(id, skip, ulen)],
                    &mut scratch,
                );
                if let Err(e) = verdict {
                    report.problems.push(Problem {
                        backups: names(&headers, backups.iter()),
                        what: format!("chunk {id} in pack {pid} is damaged: {e:#}"),
                    });
                }
            }
        }
    }
    drop(refs);
    drop(spilled);
    check_wal(store, &headers, &mut report, read_data).await?;
    Ok(report)
}

/// The spill of every backup's chunk references and the numbers of their packs.
struct Gather {
    spill: Spill<Ref>,
    packs: Numbering<PackId>,
}

impl Gather {
    /// Spills every chunk reference of `m` (backup index `bi`, id `id`). The outer error is the
    /// scratch files' (the run fails); the inner one the manifest's (reading it failed part way).
    fn add(&mut self, m: &LocalManifest, id: &str, bi: u32) -> Result<Result<()>> {
        let mut scratch: Option<anyhow::Error> = None;
        let streamed = m.for_each_chunk(|c| {
            let pid = m.packs.get(c.pack as usize).ok_or_else(|| {
                anyhow!(
                    "backup {id}: a chunk names pack #{} of a table of {}",
                    c.pack,
                    m.packs.len()
                )
            })?;
            let r = Ref {
                pack_key: pack_key(pid),
                pack: self.packs.number(*pid)?,
                offset: c.offset,
                id: c.id,
                clen: c.clen,
                ulen: c.ulen,
                skip: c.skip,
                backup: bi,
            };
            self.spill.push(&r).map_err(|e| {
                scratch = Some(e);
                anyhow!("a scratch file failed")
            })
        });
        match scratch {
            Some(e) => Err(e),
            None => Ok(streamed),
        }
    }
}

/// Whether a storage error is in `e`'s chain: the run fails, it is not the manifest's problem.
fn is_store_error(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<crate::store::StoreError>().is_some())
}

/// The next spilled reference of a backup whose manifest was read to its end.
fn next_ref(refs: &mut Sorted<'_, Ref>, unread: &HashSet<u32>) -> Result<Option<Ref>> {
    while let Some(r) = refs.next_record()? {
        if !unread.contains(&r.backup) {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// The ids of the backups at indexes `ix` of `headers`, sorted.
fn names<'a>(headers: &[ManifestHeader], ix: impl Iterator<Item = &'a u32>) -> Vec<String> {
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
    let head = store.get_range(key, 0..pack::HEADER_LEN).await?;
    pack::check_header(&head, &index)?;
    Ok(pack::decode_index(&index, start)?)
}

async fn check_wal(
    store: &Store,
    headers: &[ManifestHeader],
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

/// With `--read-data`: reads every archived WAL object whole and verifies it (size and digest
/// against its header). A damaged one is reported, naming the backups whose recovery would replay
/// it (same timeline, starting at or before it), and left out of `archive`, so the checks that
/// follow see it as missing.
async fn read_wal(
    store: &Store,
    headers: &[ManifestHeader],
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
