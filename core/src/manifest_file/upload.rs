//! Storing a manifest: whole, or above the part size in parts (FORMAT.md 8.4.7), one part in
//! memory at a time; and removing the parts of a manifest that is gone or was replaced.

use super::Copy;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tidemark_format::ids::ContentHash;
use tidemark_format::keys;
use tidemark_format::manifest::{parts, ManifestReader};

/// Bytes per part a writer cuts a large manifest into: `TIDEMARK_MANIFEST_PART_BYTES` (tests
/// use a few KiB to exercise parts on small clusters), else 32 MiB; at most
/// [`parts::PART_MAX`].
fn part_bytes() -> u64 {
    std::env::var("TIDEMARK_MANIFEST_PART_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(32 << 20)
        .clamp(1, parts::PART_MAX)
}

/// How a manifest object is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    /// Create-only: a backup's manifest, its last write.
    Create,
    /// Replacing atomically: expire's repack relocating chunk references.
    Replace,
}

/// Stores the manifest of backup `id` that `file` holds (`len` bytes, as `ManifestWriter`
/// wrote it). Above the part size it is stored in parts (FORMAT.md 8.4.7): the file's major
/// version is set to 2 and its trailer recomputed, the other parts are stored first
/// (content-addressed), then the manifest object with the first part and the table. Memory:
/// one part at a time. Returns the sha256 of the parts beyond the first.
pub async fn upload(
    store: &Store,
    id: &str,
    file: std::fs::File,
    len: u64,
    put: Put,
) -> Result<Vec<ContentHash>> {
    upload_in(store, id, file, len, put, part_bytes()).await
}

/// [`upload`] with parts of `part` bytes.
pub(super) async fn upload_in(
    store: &Store,
    id: &str,
    file: std::fs::File,
    len: u64,
    put: Put,
    part: u64,
) -> Result<Vec<ContentHash>> {
    let key = keys::manifest(id);
    let file = Arc::new(file);
    let read = |at: u64, n: u64| {
        let f = Arc::clone(&file);
        tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let mut b = vec![0u8; usize::try_from(n)?];
            f.read_exact_at(&mut b, at)
                .context("cannot read back the manifest written to a temporary file")?;
            Ok(b)
        })
    };
    if len <= part {
        let b = read(0, len).await??;
        store_manifest(store, &key, Bytes::from(b), put).await?;
        return Ok(Vec::new());
    }
    {
        let f = Arc::clone(&file);
        tokio::task::spawn_blocking(move || mark_parted(&f, len)).await??;
    }
    // The first part holds at least the backup header (listing reads it from a prefix).
    let first = part.max(header_end(&file, len).await?).min(len);
    let mut table = Vec::new();
    let mut at = first;
    while at < len {
        let n = part.min(len - at);
        let b = read(at, n).await??;
        let sha = tidemark_format::ChunkId(Sha256::digest(&b).into());
        store
            .put_content_addressed(&keys::manifest_part(id, &sha), Bytes::from(b))
            .await
            .with_context(|| format!("cannot store a part of the manifest of backup {id}"))?;
        table.push(parts::PartRef {
            sha256: sha,
            len: n,
        });
        at += n;
    }
    if table.len() > parts::MAX_PARTS as usize {
        bail!(
            "the manifest of backup {id} needs {} parts, more than the {} a reader accepts\nhint: raise TIDEMARK_MANIFEST_PART_BYTES (at most {})",
            table.len(),
            parts::MAX_PARTS,
            parts::PART_MAX
        );
    }
    crate::testhooks::crash_point("manifest-after-parts");
    let mut main = read(0, first).await??;
    main.extend_from_slice(&parts::encode_table(&table));
    store_manifest(store, &key, Bytes::from(main), put).await?;
    Ok(table.iter().map(|p| p.sha256).collect())
}

async fn store_manifest(store: &Store, key: &str, b: Bytes, put: Put) -> Result<()> {
    match put {
        Put::Create => store.put_create(key, b).await,
        Put::Replace => store.put_replace(key, b).await,
    }
    .with_context(|| format!("cannot write {key}"))
}

/// Sets the major version of the manifest in `f` to its in-parts major (2, or 4 when its chunk
/// references carry skips) and recomputes its trailer.
fn mark_parted(f: &std::fs::File, len: u64) -> Result<()> {
    let io = |e: std::io::Error| {
        anyhow::Error::new(e).context("cannot rewrite the manifest in its temporary file")
    };
    let mut major = [0u8; 2];
    f.read_exact_at(&mut major, 4).map_err(io)?;
    let frames = parts::major_has_frames(u16::from_le_bytes(major));
    f.write_all_at(&parts::major_of(frames, true).to_le_bytes(), 4)
        .map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let body = len - 32;
    let mut at = 0u64;
    while at < body {
        let n = (body - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at).map_err(io)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    f.write_all_at(&h.finalize(), body).map_err(io)
}

/// Where the backup header of the manifest in `f` ends.
async fn header_end(f: &Arc<std::fs::File>, len: u64) -> Result<u64> {
    let f = Arc::clone(f);
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let copy = Copy {
            file: f.try_clone()?,
            len,
        };
        let (r, _, _) = ManifestReader::open(&copy)?;
        Ok(r.header_end())
    })
    .await?
}

/// Every manifest part key in the repository, by backup id.
pub async fn parts_by_backup(
    store: &Store,
) -> Result<std::collections::HashMap<String, Vec<String>>> {
    let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
    for l in store
        .list(keys::BACKUPS)
        .await
        .context("cannot list backups")?
    {
        if let Some((id, _)) = keys::parse_manifest_part(&l.key) {
            out.entry(id.to_string()).or_default().push(l.key.clone());
        }
    }
    Ok(out)
}

/// Verifies the manifest a writer left in `file` (`len` bytes) and returns its index.
pub fn index_file(
    file: &std::fs::File,
    len: u64,
) -> Result<tidemark_format::manifest::ManifestIndex> {
    let copy = Copy {
        file: file.try_clone()?,
        len,
    };
    Ok(tidemark_format::manifest::ManifestIndex::read(&copy)?)
}

/// Deletes the parts of backup `id`'s manifest (FORMAT.md 8.4.7) but those in `keep`: after
/// its manifest object was deleted, or replaced by one naming other parts. Returns how many.
pub async fn delete_parts(store: &Store, id: &str, keep: &[ContentHash]) -> Result<u64> {
    let mut n = 0;
    for l in store
        .list(keys::BACKUPS)
        .await
        .context("cannot list backups")?
    {
        if let Some((pid, sha)) = keys::parse_manifest_part(&l.key) {
            if pid == id && !keep.contains(&sha) {
                store.delete(&l.key).await?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// The manifest parts in the repository whose backup has no manifest object (left by a backup
/// killed before its manifest, or an expire killed between a manifest and its parts).
pub async fn orphan_parts(store: &Store) -> Result<Vec<String>> {
    let listed = store
        .list(keys::BACKUPS)
        .await
        .context("cannot list backups")?;
    let ids: std::collections::HashSet<&str> = listed
        .iter()
        .filter_map(|l| keys::parse_manifest(&l.key))
        .collect();
    Ok(listed
        .iter()
        .filter(|l| keys::parse_manifest_part(&l.key).is_some_and(|(id, _)| !ids.contains(id)))
        .map(|l| l.key.clone())
        .collect())
}
