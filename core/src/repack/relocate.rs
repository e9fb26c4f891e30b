//! Pointing a manifest at the repacked copies of its chunks (FORMAT.md 16.5): in memory for a
//! decoded manifest, or entry by entry from a local copy into a temporary file.

use super::Relocation;
use crate::manifest_file::LocalManifest;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use tidemark_format::manifest::{ChunkRef, EntryKind, HeadKind, Manifest, ManifestWriter};
use tidemark_format::PackId;

impl Relocation {
    /// Where chunk reference `c` of backup `id` (whose pack table is `table`) points after the
    /// repack: its pack and offset, moved when its pack was repacked.
    fn map(&self, id: &str, table: &[PackId], c: &ChunkRef) -> Result<(PackId, u64)> {
        let old = *table.get(c.pack as usize).ok_or_else(|| {
            anyhow!(
                "backup {id}: a chunk names pack #{} of a table of {}",
                c.pack,
                table.len()
            )
        })?;
        if !self.old.contains(&old) {
            return Ok((old, c.offset));
        }
        let (new, e2) = self.moved.get(&(old, c.offset, c.skip)).ok_or_else(|| {
            anyhow!("backup {id}: chunk {} at offset {}, skip {} of pack {old} was not copied by the repack: that pack's index does not list it there\nhint: the repository is damaged; nothing was changed in this backup; run 'tidemark-restore check' to see which backups are affected", c.id, c.offset, c.skip)
        })?;
        if e2.id != c.id || e2.clen != c.clen || e2.ulen != c.ulen || e2.skip != c.skip {
            bail!(
                "backup {id}: the reference to chunk {} at offset {} of pack {old} does not match that pack's index\nhint: the repository is damaged; run 'tidemark-restore check'",
                c.id,
                c.offset
            );
        }
        Ok((*new, e2.offset))
    }
}

/// The pack table after relocation: in order of first use.
#[derive(Default)]
struct Table {
    packs: Vec<PackId>,
    index: HashMap<PackId, u32>,
}

impl Table {
    fn number(&mut self, p: PackId) -> u32 {
        let packs = &mut self.packs;
        *self.index.entry(p).or_insert_with(|| {
            packs.push(p);
            (packs.len() - 1) as u32
        })
    }
}

/// Points every reference of `m` into a repacked pack at its copy and rebuilds the pack table (in
/// order of first use). Returns false when `m` references no repacked pack.
pub fn relocate(m: &mut Manifest, r: &Relocation) -> Result<bool> {
    if !m.packs.iter().any(|p| r.old.contains(p)) {
        return Ok(false);
    }
    let id = m.header.backup_id.clone();
    let old_table = std::mem::take(&mut m.packs);
    let mut table = Table::default();
    for e in &mut m.entries {
        let EntryKind::File(f) = &mut e.kind else {
            continue;
        };
        for c in &mut f.chunks {
            let (pack, offset) = r.map(&id, &old_table, c)?;
            c.pack = table.number(pack);
            c.offset = offset;
        }
    }
    m.packs = table.packs;
    Ok(true)
}

/// [`relocate`] for a manifest read through a local copy, written entry by entry into a
/// temporary file (memory: one file's chunk list). Returns the file and its length, or `None`
/// when `m` references no repacked pack. Blocking.
pub fn relocate_local(m: &LocalManifest, r: &Relocation) -> Result<Option<(std::fs::File, u64)>> {
    if !m.packs.iter().any(|p| r.old.contains(p)) {
        return Ok(None);
    }
    let id = &m.header.backup_id;
    let mut table = Table::default();
    m.for_each_chunk(|c| {
        table.number(r.map(id, &m.packs, c)?.0);
        Ok(())
    })?;
    let scratch = || {
        format!(
            "cannot write the relocated manifest of backup {id} to a temporary file in {}\nhint: set TMPDIR to a writable directory with room for it",
            std::env::temp_dir().display()
        )
    };
    let f = tempfile::tempfile().with_context(scratch)?;
    let mut w = ManifestWriter::new(
        std::io::BufWriter::with_capacity(1 << 20, f),
        &m.header,
        &table.packs,
        m.entries.len() as u64,
    )
    .with_context(scratch)?;
    for (i, e) in m.entries.iter().enumerate() {
        match &e.kind {
            HeadKind::Dir => w.dir(&e.path, e.mode),
            HeadKind::Symlink(t) => w.symlink(&e.path, e.mode, t),
            HeadKind::File(fh) => {
                w.file(&e.path, e.mode, fh.size, &fh.sha256, fh.nchunks)
                    .with_context(scratch)?;
                for c in m.chunks(i)? {
                    let (pack, offset) = r.map(id, &m.packs, &c)?;
                    w.chunk(&ChunkRef {
                        pack: table.index[&pack],
                        offset,
                        ..c
                    })
                    .with_context(scratch)?;
                }
                Ok(())
            }
        }
        .with_context(scratch)?;
    }
    let (bw, len) = w.finish().with_context(scratch)?;
    let f = bw
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(scratch)?;
    Ok(Some((f, len)))
}
