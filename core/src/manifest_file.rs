//! A manifest read without holding its file list in memory: the object is copied from the
//! store into an anonymous temporary file (in `TMPDIR`), its sha256 trailer and every entry are
//! checked there, and only the entries' fixed parts (path, mode, kind, a file's size and where
//! its chunk list is) stay in memory. A file's chunk list is read back from the temporary file
//! when it is needed (a restore's file being written, a check's or expire's pass over every
//! reference), so a reader's memory grows with the number of files, not of chunks.
//!
//! Scratch space: the temporary file is as large as the manifest object, about 0.65% of the
//! backup's logical size (53 bytes per 8 KiB chunk); it is unlinked from the start, so it
//! vanishes with the process whatever happens.

use crate::repo::MAX_MANIFEST;
use crate::store::Store;
use crate::store::StoreError;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tidemark_format::manifest::parts;
use tidemark_format::manifest::stream::{read_chunk_range, read_chunks_at, Source};
use tidemark_format::manifest::{
    ChunkRef, FileEntry, FileHead, HeadKind, ManifestHeader, ManifestIndex, ManifestReader,
};
use tidemark_format::{keys, FormatError};

#[cfg(test)]
mod tests;
mod upload;
pub use upload::{delete_parts, index_file, orphan_parts, parts_by_backup, upload, Put};

/// Bytes copied from the store per range read.
const DOWNLOAD_RANGE: u64 = 8 << 20;

/// A local, unlinked copy of one manifest object.
struct Copy {
    file: std::fs::File,
    len: u64,
}

impl Source for Copy {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| format!("the local copy in {}: {e}", std::env::temp_dir().display()))
    }
}

/// One verified manifest: header, pack table and the fixed part of every entry (through
/// `Deref` to its [`ManifestIndex`]).
pub struct LocalManifest {
    index: ManifestIndex,
    copy: Arc<Copy>,
}

impl std::ops::Deref for LocalManifest {
    type Target = ManifestIndex;
    fn deref(&self) -> &ManifestIndex {
        &self.index
    }
}

impl std::fmt::Debug for LocalManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalManifest")
            .field("backup", &self.header.backup_id)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl LocalManifest {
    /// Copies, verifies and indexes the manifest of backup `id`. Errors name the backup; a
    /// store error stays in the chain (callers tell "cannot read" from "does not decode").
    pub async fn load(store: &Store, id: &str) -> Result<LocalManifest> {
        // A manifest replaced while it was copied (expire's repack relocates chunk references)
        // fails the checksum: copy it once more.
        match Self::load_once(store, id).await {
            Err(e)
                if e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<FormatError>(),
                        Some(FormatError::ChecksumMismatch { .. })
                    ) || c
                        .downcast_ref::<StoreError>()
                        .is_some_and(StoreError::is_not_found)
                }) =>
            {
                tracing::debug!(backup = %id, "manifest changed while it was read; reading it again");
                Self::load_once(store, id).await
            }
            r => r,
        }
    }

    async fn load_once(store: &Store, id: &str) -> Result<LocalManifest> {
        let copy = download(store, id)
            .await
            .with_context(|| format!("cannot read manifest of backup {id}"))?;
        let copy = Arc::new(copy);
        let c = Arc::clone(&copy);
        let index = tokio::task::spawn_blocking(move || ManifestIndex::read(c.as_ref()))
            .await?
            .with_context(|| format!("backup {id} has an unreadable manifest"))?;
        if index.header.backup_id != id {
            bail!(
                "manifest stored as backup {id} names itself {}",
                index.header.backup_id
            );
        }
        Ok(LocalManifest { index, copy })
    }

    /// The chunk list of file entry `i` (read back from the local copy).
    pub fn chunks(&self, i: usize) -> Result<Vec<ChunkRef>> {
        let e = &self.entries[i];
        let HeadKind::File(f) = &e.kind else {
            bail!(
                "entry {} of backup {} is not a file",
                e.path,
                self.header.backup_id
            );
        };
        read_chunks_at(self.copy.as_ref(), &e.path, f, self.packs.len()).with_context(|| {
            format!(
                "backup {}: cannot read the chunk list of {}",
                self.header.backup_id, e.path
            )
        })
    }

    /// Chunk references `first..first + n` of file entry `i` (fewer past its end; none when
    /// the entry is not a file).
    pub fn chunk_range(&self, i: usize, first: u64, n: u64) -> Result<Vec<ChunkRef>> {
        let e = &self.entries[i];
        let HeadKind::File(f) = &e.kind else {
            return Ok(Vec::new());
        };
        read_chunk_range(self.copy.as_ref(), &e.path, f, self.packs.len(), first, n).with_context(
            || {
                format!(
                    "backup {}: cannot read the chunk list of {}",
                    self.header.backup_id, e.path
                )
            },
        )
    }

    /// File entry `i` with its chunk list.
    pub fn file(&self, i: usize) -> Result<FileEntry> {
        let HeadKind::File(f) = &self.entries[i].kind else {
            bail!(
                "entry {} of backup {} is not a file",
                self.entries[i].path,
                self.header.backup_id
            );
        };
        Ok(FileEntry {
            size: f.size,
            sha256: f.sha256,
            chunks: self.chunks(i)?,
        })
    }

    /// The file head of entry `i`, if it is a file.
    pub fn file_head(&self, i: usize) -> Option<&FileHead> {
        match &self.entries[i].kind {
            HeadKind::File(f) => Some(f),
            _ => None,
        }
    }

    /// Every chunk reference of every file, in manifest order, read from the local copy in one
    /// pass (blocking: call from a blocking thread for a large manifest).
    pub fn for_each_chunk(&self, mut f: impl FnMut(&ChunkRef) -> Result<()>) -> Result<()> {
        self.for_each_file_chunk(|_, c| f(c))
    }

    /// Like [`for_each_chunk`](Self::for_each_chunk), with the index of the file's entry.
    pub fn for_each_file_chunk(
        &self,
        mut f: impl FnMut(usize, &ChunkRef) -> Result<()>,
    ) -> Result<()> {
        let what = || {
            format!(
                "backup {} has an unreadable manifest",
                self.header.backup_id
            )
        };
        let (mut r, _, _) = ManifestReader::open(self.copy.as_ref()).with_context(what)?;
        let mut i = 0usize;
        while r.next_entry().with_context(what)?.is_some() {
            while let Some(c) = r.next_chunk().with_context(what)? {
                f(i, &c)?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Loads and fully verifies one manifest into memory (for the commands that need it whole:
/// `info`, expire's repack of a small repository); a manifest in parts is put together first.
pub async fn load_whole(store: &Store, id: &str) -> Result<tidemark_format::manifest::Manifest> {
    let copy = download(store, id)
        .await
        .with_context(|| format!("cannot read manifest of backup {id}"))?;
    let m = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut b = vec![0u8; usize::try_from(copy.len)?];
        copy.file.read_exact_at(&mut b, 0)?;
        Ok(tidemark_format::manifest::Manifest::decode(&b))
    })
    .await??
    .with_context(|| format!("backup {id} has an unreadable manifest"))?;
    if m.header.backup_id != id {
        bail!(
            "manifest stored as backup {id} names itself {}",
            m.header.backup_id
        );
    }
    Ok(m)
}

/// A temporary file for a copy of `what` of about `len` bytes.
fn scratch(what: &str, len: u64) -> Result<std::fs::File> {
    tempfile::tempfile().with_context(|| {
        format!(
            "cannot create a temporary file in {} for {what}\nhint: set TMPDIR to a writable directory with room for {len} bytes",
            std::env::temp_dir().display()
        )
    })
}

/// Appends `range` of object `key` to `w`, range read by range read; feeds `hash` on the way.
async fn copy_range(
    store: &Store,
    key: &str,
    range: std::ops::Range<u64>,
    w: &mut std::io::BufWriter<std::fs::File>,
    mut hash: Option<&mut Sha256>,
) -> Result<()> {
    let mut at = range.start;
    while at < range.end {
        let end = (at + DOWNLOAD_RANGE).min(range.end);
        let b = store.get_range(key, at..end).await?;
        if b.len() as u64 != end - at {
            bail!(
                "{key} returned {} bytes for range {at}..{end}\nhint: the object store answered short; retry",
                b.len()
            );
        }
        if let Some(h) = hash.as_deref_mut() {
            h.update(&b);
        }
        w.write_all(&b).with_context(|| {
            format!(
                "cannot write the copy of {key} in {}\nhint: set TMPDIR to a writable directory with room for it",
                std::env::temp_dir().display()
            )
        })?;
        at = end;
    }
    Ok(())
}

/// Copies the manifest of backup `id` into an unlinked temporary file, range by range: the
/// object itself, or for a manifest in parts (FORMAT.md 8.4.7) its first part and then every
/// other part in order, each checked against its sha256.
async fn download(store: &Store, id: &str) -> Result<Copy> {
    let key = keys::manifest(id);
    let Some(len) = store.head(&key).await? else {
        bail!("{key} does not exist");
    };
    if len > MAX_MANIFEST {
        bail!("{key} is {len} bytes, more than the {MAX_MANIFEST} a reader accepts");
    }
    let head = store.get_range(&key, 0..len.min(8)).await?;
    let parted = head.len() == 8 && parts::is_parted(&head).unwrap_or(false);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, scratch(&key, len)?);
    if !parted {
        copy_range(store, &key, 0..len, &mut w, None).await?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        return Ok(Copy { file, len });
    }
    // In parts: the table at the end names the others.
    let tail = store
        .get_range(&key, len.saturating_sub(parts::TAIL)..len)
        .await?;
    let count = parts::table_count(&tail, len)
        .with_context(|| format!("backup {id} has an unreadable manifest"))?;
    let first = len - parts::TAIL - u64::from(count) * parts::ROW;
    let rows = store.get_range(&key, first..len - parts::TAIL).await?;
    let table = parts::decode_table(&rows, count)
        .with_context(|| format!("backup {id} has an unreadable manifest"))?;
    let total = table.iter().fold(first, |t, p| t.saturating_add(p.len));
    if total > MAX_MANIFEST {
        bail!("backup {id}'s manifest in parts is {total} bytes, more than the {MAX_MANIFEST} a reader accepts");
    }
    copy_range(store, &key, 0..first, &mut w, None).await?;
    for p in &table {
        let pkey = keys::manifest_part(id, &p.sha256);
        match store.head(&pkey).await? {
            Some(n) if n == p.len => {}
            Some(n) => bail!(
                "part {pkey} of backup {id}'s manifest is {n} bytes, its table says {}\nhint: the repository is damaged; run 'tidemark-restore check'",
                p.len
            ),
            None => {
                return Err(StoreError::NotFound { key: pkey.clone() })
                    .with_context(|| format!("part {pkey} of backup {id}'s manifest is missing"))
            }
        }
        let mut h = Sha256::new();
        copy_range(store, &pkey, 0..p.len, &mut w, Some(&mut h)).await?;
        let got = tidemark_format::ChunkId(h.finalize().into());
        if got != p.sha256 {
            return Err(FormatError::ChecksumMismatch {
                what: "manifest part",
                expected: p.sha256.to_string(),
                actual: got.to_string(),
            })
            .with_context(|| format!("part {pkey} of backup {id}'s manifest is damaged"));
        }
    }
    let file = w.into_inner().map_err(|e| e.into_error())?;
    // Listing reads a backup's header from a prefix of the manifest object: it must lie in the
    // first part.
    let mut prefix = vec![0u8; first.min(HEADER_MAX) as usize];
    file.read_exact_at(&mut prefix, 0)?;
    match ManifestHeader::decode_prefix(&prefix) {
        Err(FormatError::Truncated { .. }) => bail!(
            "backup {id} has an unreadable manifest: its backup header does not end within the first part ({first} bytes)"
        ),
        _ => Ok(Copy { file, len: total }),
    }
}

/// Longest backup header (two labels at their cap and the ids; FORMAT.md 8.4.5).
const HEADER_MAX: u64 = 2 * ((1 << 20) + 4) + 4096 + 8;
