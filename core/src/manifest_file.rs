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
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tidemark_format::manifest::stream::{read_chunk_range, read_chunks_at, Source};
use tidemark_format::manifest::{
    ChunkRef, FileEntry, FileHead, HeadKind, ManifestIndex, ManifestReader,
};
use tidemark_format::{keys, FormatError};

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
                    )
                }) =>
            {
                tracing::debug!(backup = %id, "manifest changed while it was read; reading it again");
                Self::load_once(store, id).await
            }
            r => r,
        }
    }

    async fn load_once(store: &Store, id: &str) -> Result<LocalManifest> {
        let key = keys::manifest(id);
        let copy = download(store, &key)
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

/// Copies object `key` into an unlinked temporary file, range by range.
async fn download(store: &Store, key: &str) -> Result<Copy> {
    let Some(len) = store.head(key).await? else {
        bail!("{key} does not exist");
    };
    if len > MAX_MANIFEST {
        bail!("{key} is {len} bytes, more than the {MAX_MANIFEST} a reader accepts");
    }
    let file = tempfile::tempfile().with_context(|| {
        format!(
            "cannot create a temporary file in {} for a copy of {key}\nhint: set TMPDIR to a writable directory with room for {len} bytes",
            std::env::temp_dir().display()
        )
    })?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut at = 0u64;
    while at < len {
        let end = (at + DOWNLOAD_RANGE).min(len);
        let b = store.get_range(key, at..end).await?;
        if b.len() as u64 != end - at {
            bail!(
                "{key} returned {} bytes for range {at}..{end}\nhint: the object store answered short; retry",
                b.len()
            );
        }
        w.write_all(&b).with_context(|| {
            format!(
                "cannot write the copy of {key} in {}\nhint: set TMPDIR to a writable directory with room for {len} bytes",
                std::env::temp_dir().display()
            )
        })?;
        at = end;
    }
    let file = w.into_inner().map_err(|e| e.into_error())?;
    Ok(Copy { file, len })
}
