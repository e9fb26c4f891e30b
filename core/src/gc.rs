//! What a backup must know about garbage collection: a parent manifest is only trusted for
//! deduplication where its packs still exist, at least as long as its chunks need.
//!
//! Invariant: a new backup never references a pack that was absent when it checked (a pack
//! deleted out of band, or by an expire that ran before this backup's lease existed). The lease
//! protocol (FORMAT.md section 16) covers packs deleted after the check.

use crate::manifest_file::LocalManifest;
use crate::store::{Store, StoreError};
use anyhow::{Context, Result};
use std::collections::HashSet;
use tidemark_format::{keys, PackId};

/// Heads every pack of `parent`'s pack table and returns the entries of the files that name a
/// missing one, or one too short to hold the chunks the parent places in it (cut by the store:
/// existence alone is not trusted): their chunks are read, compressed and stored again, none
/// reused. Also returns the missing and short packs.
pub async fn files_in_missing_packs(
    store: &Store,
    parent: &LocalManifest,
) -> Result<(HashSet<usize>, Vec<PackId>)> {
    // The end of the last chunk the parent places in each pack: a pack is at least that long.
    let mut needed = vec![0u64; parent.packs.len()];
    parent.for_each_chunk(|c| {
        if let Some(n) = needed.get_mut(c.pack as usize) {
            *n = (*n).max(c.offset + c.clen as u64);
        }
        Ok(())
    })?;
    let mut missing = HashSet::new();
    for (i, p) in parent.packs.iter().enumerate() {
        let size = match store.head(&keys::pack(p)).await {
            // A sealed pack whose stored length no sealed object can have: cut.
            Err(StoreError::Sealed { .. }) => Some(0),
            r => r.with_context(|| format!("cannot check pack {p} of the parent backup"))?,
        };
        match size {
            None => {
                missing.insert(i as u32);
            }
            Some(s) if s < needed[i] => {
                tracing::warn!(pack = %p, size = s, needed = needed[i], parent = %parent.header.backup_id, "pack {p} of the parent backup is {s} bytes, too short for the {} its chunks need: it is damaged; its chunks are stored again\nhint: run 'tidemark-restore check --read-data' to see which backups it breaks", needed[i]);
                missing.insert(i as u32);
            }
            Some(_) => {}
        }
    }
    if missing.is_empty() {
        return Ok((HashSet::new(), Vec::new()));
    }
    let mut out: Vec<PackId> = missing.iter().map(|i| parent.packs[*i as usize]).collect();
    out.sort();
    for p in &out {
        tracing::warn!(pack = %p, parent = %parent.header.backup_id, "a pack of the parent backup is missing; its chunks are stored again\nhint: run tidemark-restore check to see which backups it breaks");
    }
    let mut files = HashSet::new();
    parent.for_each_file_chunk(|i, c| {
        if missing.contains(&c.pack) {
            files.insert(i);
        }
        Ok(())
    })?;
    Ok((files, out))
}
