//! What a backup must know about garbage collection: a parent manifest is only trusted for
//! deduplication where its packs still exist.
//!
//! Invariant: a new backup never references a pack that was absent when it checked (a pack
//! deleted out of band, or by an expire that ran before this backup's lease existed). The lease
//! protocol (FORMAT.md section 16) covers packs deleted after the check.

use crate::store::Store;
use anyhow::{Context, Result};
use std::collections::HashSet;
use tidemark_format::manifest::{EntryKind, Manifest};
use tidemark_format::{keys, PackId};

/// Heads every pack of `parent`'s pack table and empties the chunk lists of files that name a
/// missing one, so their chunks are read, compressed and stored again. Returns the missing packs.
pub async fn drop_missing_packs(store: &Store, parent: &mut Manifest) -> Result<Vec<PackId>> {
    let mut missing = HashSet::new();
    for (i, p) in parent.packs.iter().enumerate() {
        if store
            .head(&keys::pack(p))
            .await
            .with_context(|| format!("cannot check pack {p} of the parent backup"))?
            .is_none()
        {
            missing.insert(i as u32);
        }
    }
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<PackId> = missing.iter().map(|i| parent.packs[*i as usize]).collect();
    out.sort();
    for p in &out {
        tracing::warn!(pack = %p, parent = %parent.header.backup_id, "a pack of the parent backup is missing; its chunks are stored again\nhint: run tidemark-restore check to see which backups it breaks");
    }
    for e in &mut parent.entries {
        if let EntryKind::File(f) = &mut e.kind {
            if f.chunks.iter().any(|c| missing.contains(&c.pack)) {
                f.chunks.clear();
            }
        }
    }
    Ok(out)
}
