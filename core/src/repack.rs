//! Repacking, a step of `expire` (FORMAT.md 16.5): a pack most of whose bytes are garbage (chunks
//! no retained backup references) has its live chunks copied into new packs, every manifest that
//! references it is replaced by one with the new locations, and the old pack is then condemned
//! like any unreferenced pack and deleted by a later expire after the grace period.
//!
//! Invariants:
//! - Data first: new packs are durable (create-only puts) before any manifest names them, and a
//!   manifest is replaced atomically by one describing the same backup — same header, entries,
//!   files and chunk ids — with only chunk locations and the pack table changed.
//! - Every copied chunk is decompressed and checked against its id, and every reference is checked
//!   against the old pack's index and the copy's index entry, before a manifest names the copy: a
//!   damaged chunk stops the repack and is never spread.
//! - Old packs are only condemned here, never deleted: a restore that read a manifest before its
//!   replacement keeps reading the old packs for at least the grace period.
//! - Memory: the live set spills its references (16 bytes per chunk reference of the retained
//!   backups) to scratch files grouped by pack (`crate::spill`) and reads them back one
//!   partition at a time, holding a number and a sum per pack; the chosen packs' live frames
//!   (bounded by the repack budget in bytes) are kept for the copy, which holds one pack being
//!   filled and [`READS_IN_FLIGHT`] range reads of at most `ranges::READ_MAX` bytes.

use crate::check::read_index;
use crate::manifest_file::LocalManifest;
use crate::ranges;
use crate::spill::{self, Numbering, Record, Spill, Spilled};
use crate::store::Store;
use crate::testhooks::crash_point;
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use tidemark_format::manifest::{EntryKind, Manifest};
use tidemark_format::pack::{PackBuilder, PackEntry};
use tidemark_format::{chunk, keys, PackId};

mod relocate;
pub use relocate::{relocate, relocate_local};

/// Range reads of the packs being repacked in flight.
const READS_IN_FLIGHT: usize = 4;

/// When a pack is worth repacking, and how much a run may copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepackOptions {
    /// Live bytes a run copies at most; 0 turns repacking off.
    pub budget_bytes: u64,
    /// A pack is repacked once at least this percentage of its bytes is garbage (1..=100).
    pub min_garbage_percent: u32,
}

impl Default for RepackOptions {
    fn default() -> Self {
        RepackOptions {
            budget_bytes: 1 << 30,
            min_garbage_percent: 50,
        }
    }
}

/// One chunk reference of a retained backup as the live set spills it (16 bytes): the pack's
/// number in the set's [`Numbering`], and the frame's offset and stored length.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Frame {
    pack: u32,
    offset: u64,
    clen: u32,
}

impl Record for Frame {
    const SIZE: usize = 16;
    fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.pack.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..16].copy_from_slice(&self.clen.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Frame {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Frame {
            pack: u32_at(0),
            offset: (u64::from(u32_at(8)) << 32) | u64::from(u32_at(4)),
            clen: u32_at(12),
        }
    }
    fn key(&self) -> u64 {
        spill::spread(u64::from(self.pack))
    }
}

/// The chunk frames of each pack that retained backups reference, spilled to scratch files
/// grouped by pack (`crate::spill`): memory holds a number per pack, not an entry per reference.
pub struct LiveSet {
    packs: Numbering<PackId>,
    spill: Option<Spill<Frame>>,
    estimate: u64,
    budget: u64,
    /// The first error of [`LiveSet::add`], returned by whatever reads the set.
    failed: Option<anyhow::Error>,
}

impl Default for LiveSet {
    /// A set with no estimate and the default budget: one partition, merged in runs if it
    /// outgrows the budget.
    fn default() -> Self {
        LiveSet::new(0, spill::DEFAULT_BUDGET)
    }
}

impl LiveSet {
    /// A set for about `estimate` chunk references whose scratch partitions fit `budget` bytes.
    pub fn new(estimate: u64, budget: u64) -> LiveSet {
        LiveSet {
            packs: Numbering::default(),
            spill: None,
            estimate,
            budget,
            failed: None,
        }
    }

    /// Adds one chunk reference of a retained backup.
    pub fn push(&mut self, pack: PackId, offset: u64, clen: u32) -> Result<()> {
        let f = Frame {
            pack: self.packs.number(pack)?,
            offset,
            clen,
        };
        let s = match &mut self.spill {
            Some(s) => s,
            None => self
                .spill
                .insert(Spill::new("expire", self.estimate, self.budget)?),
        };
        s.push(&f)
    }

    /// Adds every chunk reference of a retained backup, streamed from its local copy (blocking:
    /// call from a blocking thread).
    pub fn add_local(&mut self, m: &LocalManifest) -> Result<()> {
        m.for_each_chunk(|c| {
            let p = m.packs.get(c.pack as usize).ok_or_else(|| {
                anyhow!(
                    "backup {}: a chunk names pack #{} of a table of {}",
                    m.header.backup_id,
                    c.pack,
                    m.packs.len()
                )
            })?;
            self.push(*p, c.offset, c.clen)
        })
    }

    /// [`LiveSet::add_local`] on a blocking thread; gives the set and the manifest back.
    pub async fn add_local_blocking(
        mut self,
        m: LocalManifest,
    ) -> Result<(LiveSet, LocalManifest)> {
        tokio::task::spawn_blocking(move || {
            self.add_local(&m)?;
            Ok((self, m))
        })
        .await
        .context("the pass over a manifest's chunk references failed")?
    }

    /// Adds every chunk reference of a retained backup held whole. An error (of the scratch
    /// files) is kept and returned by [`LiveSet::try_live_bytes`] and [`choose`].
    pub fn add(&mut self, m: &Manifest) {
        if self.failed.is_some() {
            return;
        }
        for e in &m.entries {
            if let EntryKind::File(f) = &e.kind {
                for c in &f.chunks {
                    if let Some(p) = m.packs.get(c.pack as usize) {
                        if let Err(e) = self.push(*p, c.offset, c.clen) {
                            self.failed = Some(e);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// The spilled frames, or the first error of [`LiveSet::add`].
    fn finish(self) -> Result<(Numbering<PackId>, Option<Spilled<Frame>>)> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let spilled = self.spill.map(Spill::finish).transpose()?;
        Ok((self.packs, spilled))
    }

    /// Live bytes per pack: the sum of `clen` over its distinct referenced frames.
    pub fn try_live_bytes(self) -> Result<HashMap<PackId, u64>> {
        let (packs, spilled) = self.finish()?;
        let mut out = HashMap::new();
        for_each_distinct(spilled.as_ref(), |f| {
            let p = packs
                .key(f.pack)
                .context("a spilled frame names a pack that was never numbered")?;
            *out.entry(p).or_insert(0u64) += u64::from(f.clen);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`LiveSet::try_live_bytes`] for a report that can go without it: an error of the scratch
    /// files is logged and leaves the map empty.
    pub fn live_bytes(self) -> HashMap<PackId, u64> {
        self.try_live_bytes().unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "cannot sum the live bytes per pack; garbage is not reported");
            HashMap::new()
        })
    }
}

/// Every distinct frame of `spilled`, the frames of one pack together, sorted by offset.
fn for_each_distinct(
    spilled: Option<&Spilled<Frame>>,
    mut f: impl FnMut(Frame) -> Result<()>,
) -> Result<()> {
    let Some(spilled) = spilled else {
        return Ok(());
    };
    let mut last: Option<Frame> = None;
    for r in spilled.sorted() {
        let r = r?;
        if last != Some(r) {
            f(r)?;
            last = Some(r);
        }
    }
    Ok(())
}

/// One pack chosen for repacking, as printed in the plan.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RepackPack {
    pub id: String,
    pub size: u64,
    pub live_bytes: u64,
}

/// What the repack step of a run does (the same for `--dry-run` and a real run).
#[derive(Clone, Debug, Serialize, PartialEq, Eq, Default)]
pub struct RepackPlan {
    pub budget_bytes: u64,
    pub min_garbage_percent: u32,
    /// Packs repacked by this run, most garbage first.
    pub packs: Vec<RepackPack>,
    /// Live bytes copied into new packs.
    pub live_bytes: u64,
    /// Bytes the old packs hold beyond their live chunks, freed once they are deleted after the
    /// grace period.
    pub reclaim_bytes: u64,
    /// Packs with enough garbage left for a later run because the budget was spent.
    pub over_budget: u64,
    /// Backups whose manifests are replaced with the new chunk locations.
    pub rewrite_manifests: Vec<String>,
}

/// A pack chosen for repacking and its live frames.
#[derive(Clone, Debug)]
pub struct Chosen {
    pub pack: PackId,
    pub live: Vec<(u64, u32)>,
}

/// Chooses the packs to repack: referenced packs that exist (`sizes`, from a listing) with at least
/// `min_garbage_percent` garbage, most garbage first (by live fraction, then id), while the live
/// bytes copied stay within the budget. Two passes over the live set: the live bytes per pack,
/// then the live frames of the chosen packs.
pub fn choose(
    live: LiveSet,
    sizes: &BTreeMap<PackId, u64>,
    opts: &RepackOptions,
) -> Result<(RepackPlan, Vec<Chosen>)> {
    let mut plan = RepackPlan {
        budget_bytes: opts.budget_bytes,
        min_garbage_percent: opts.min_garbage_percent,
        ..Default::default()
    };
    let keep_percent = u128::from(100 - opts.min_garbage_percent.clamp(1, 100));
    let (packs, spilled) = live.finish()?;
    // Live bytes by pack number.
    let mut sums: HashMap<u32, u64> = HashMap::new();
    for_each_distinct(spilled.as_ref(), |f| {
        *sums.entry(f.pack).or_insert(0) += u64::from(f.clen);
        Ok(())
    })?;
    // (pack, number, size, live bytes)
    let mut candidates: Vec<(PackId, u32, u64, u64)> = Vec::new();
    for (n, live_bytes) in sums {
        let p = packs
            .key(n)
            .context("a spilled frame names a pack that was never numbered")?;
        let Some(&size) = sizes.get(&p) else {
            continue;
        };
        if u128::from(live_bytes) * 100 <= u128::from(size) * keep_percent {
            candidates.push((p, n, size, live_bytes));
        }
    }
    candidates.sort_by(|a, b| {
        (u128::from(a.3) * u128::from(b.2))
            .cmp(&(u128::from(b.3) * u128::from(a.2)))
            .then(a.0.cmp(&b.0))
    });
    let mut chosen = Vec::new();
    // Pack number -> position in `chosen`.
    let mut position: HashMap<u32, usize> = HashMap::new();
    for (p, n, size, live_bytes) in candidates {
        if opts.budget_bytes == 0 || plan.live_bytes + live_bytes > opts.budget_bytes {
            plan.over_budget += 1;
            continue;
        }
        plan.live_bytes += live_bytes;
        plan.reclaim_bytes += size.saturating_sub(live_bytes);
        plan.packs.push(RepackPack {
            id: p.to_string(),
            size,
            live_bytes,
        });
        position.insert(n, chosen.len());
        chosen.push(Chosen {
            pack: p,
            live: Vec::new(),
        });
    }
    if !chosen.is_empty() {
        for_each_distinct(spilled.as_ref(), |f| {
            if let Some(&i) = position.get(&f.pack) {
                chosen[i].live.push((f.offset, f.clen));
            }
            Ok(())
        })?;
    }
    Ok((plan, chosen))
}

/// Where the live chunks of the repacked packs are now.
#[derive(Default)]
pub struct Relocation {
    /// (old pack, frame offset, skip) -> (new pack, index entry there).
    moved: HashMap<(PackId, u64, u32), (PackId, PackEntry)>,
    old: HashSet<PackId>,
    /// The packs written, in order.
    pub new_packs: Vec<PackId>,
}

/// Copies the live chunks of `chosen` into new packs of about `pack_target` bytes, verifying each
/// chunk on the way. Writes packs only; no manifest changes.
pub async fn copy(store: &Store, pack_target: u64, chosen: &[Chosen]) -> Result<Relocation> {
    let mut out = Relocation::default();
    let mut builder = PackBuilder::new();
    // (old pack, old entry, new entry) of each chunk in the pack being filled.
    let mut filling: Vec<(PackId, PackEntry, PackEntry)> = Vec::new();
    for c in chosen {
        out.old.insert(c.pack);
        let key = keys::pack(&c.pack);
        let index = read_index(store, &key)
            .await
            .with_context(|| format!("cannot read the index of pack {} to repack it", c.pack))?;
        // The chunks of each frame, in frame order (a frame is copied whole).
        let mut by_offset: HashMap<u64, Vec<PackEntry>> = HashMap::new();
        for e in &index {
            by_offset.entry(e.offset).or_default().push(*e);
        }
        let mut wanted = Vec::with_capacity(c.live.len());
        for &(offset, clen) in &c.live {
            let e = by_offset
                .remove(&offset)
                .filter(|es| es[0].clen == clen)
                .ok_or_else(|| {
                    anyhow!(
                        "a retained backup references {clen} bytes at offset {offset} of pack {}, which its index does not list\nhint: the repository is damaged; run 'tidemark-restore check' to see which backups are affected",
                        c.pack
                    )
                })?;
            wanted.push(e);
        }
        let reads = ranges::coalesce(wanted, |es| (0, es[0].offset, es[0].clen));
        let mut fetched =
            futures::stream::iter(reads.into_iter().map(|r| fetch_verified(store, c.pack, r)))
                .buffered(READS_IN_FLIGHT);
        while let Some(frames) = fetched.try_next().await? {
            for (es, frame) in frames {
                if builder.len() as u64 >= pack_target {
                    let full = std::mem::take(&mut builder);
                    seal(store, full, &mut filling, &mut out).await?;
                }
                let chunks: Vec<_> = es.iter().map(|e| (e.id, e.ulen)).collect();
                let placed = builder.push_frame(&frame, &chunks);
                for (old, new) in es.iter().zip(placed) {
                    filling.push((c.pack, *old, *new));
                }
            }
        }
    }
    if !builder.is_empty() {
        seal(store, builder, &mut filling, &mut out).await?;
    }
    Ok(out)
}

/// Reads one coalesced range of `pack` and checks every chunk of every frame in it against its id.
async fn fetch_verified(
    store: &Store,
    pack: PackId,
    read: ranges::Read<Vec<PackEntry>>,
) -> Result<Vec<(Vec<PackEntry>, Bytes)>> {
    let bytes = store
        .get_range(&keys::pack(&pack), read.start..read.end)
        .await
        .with_context(|| format!("cannot read pack {pack} to repack it"))?;
    let ids = store.chunk_ids();
    tokio::task::spawn_blocking(move || {
        let mut scratch = Vec::new();
        read.items
            .into_iter()
            .map(|es| {
                let e = es[0];
                let at = (e.offset - read.start) as usize;
                let frame = bytes.slice(at..at + e.clen as usize);
                let run: Vec<_> = es.iter().map(|e| (e.id, e.skip, e.ulen)).collect();
                scratch.clear();
                chunk::decode_run(&ids, &frame, &run, &mut scratch).map_err(|err| {
                    anyhow!(
                        "a chunk of the frame at offset {} of pack {pack} is damaged: {err}\nhint: nothing was repacked from it; run 'tidemark-restore check --read-data' to see which backups are affected",
                        e.offset
                    )
                })?;
                Ok((es, frame))
            })
            .collect()
    })
    .await?
}

/// Finishes a pack, stores it create-only (an existing pack of that id is compared, and replaced
/// when damaged) and records where each of its chunks came from.
async fn seal(
    store: &Store,
    builder: PackBuilder,
    filling: &mut Vec<(PackId, PackEntry, PackEntry)>,
    out: &mut Relocation,
) -> Result<()> {
    let (id, bytes) = builder.finish();
    match store
        .put_content_addressed(&keys::pack(&id), Bytes::from(bytes))
        .await
    {
        Ok(()) => {}
        Err(e) => return Err(anyhow!(e).context(format!("cannot store repacked pack {id}"))),
    }
    tracing::info!(pack = %id, chunks = filling.len(), "repacked pack stored");
    for (old, e, entry) in filling.drain(..) {
        out.moved.insert((old, e.offset, e.skip), (id, entry));
    }
    out.new_packs.push(id);
    if out.new_packs.len() == 1 {
        crash_point("repack-pack");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
