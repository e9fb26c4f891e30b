//! Writing a manifest entry by entry to any `std::io::Write`, the sha256 trailer computed on the
//! way: a writer never holds the file list.

use super::stream::{CHUNK_REF_LEN, FRAMES_REF_LEN};
use super::{ChunkRef, Entry, EntryKind, ManifestHeader, KIND_DIR, KIND_FILE, KIND_SYMLINK, MAGIC};
use crate::ids::{ContentHash, PackId};
use sha2::{Digest, Sha256};
use std::io::Write;

/// Writes a manifest entry by entry to `W`, hashing as it goes. The caller gives the entry
/// count up front and the entries in manifest order (sorted by path, parents first).
pub struct ManifestWriter<W: Write> {
    w: W,
    hash: Sha256,
    entries_left: u64,
    chunks_left: u64,
    written: u64,
    /// Whether chunk references carry a skip (major 3 and 4).
    frames: bool,
}

impl<W: Write> ManifestWriter<W> {
    pub fn new(
        w: W,
        header: &ManifestHeader,
        packs: &[PackId],
        nentries: u64,
    ) -> std::io::Result<Self> {
        Self::new_for(w, header, packs, nentries, false)
    }

    /// Like [`new`](Self::new) for a manifest to be stored in parts (major version
    /// [`FRAMES_PARTED_MAJOR`](super::parts::FRAMES_PARTED_MAJOR), 8.4.7) when `parted`.
    pub fn new_for(
        w: W,
        header: &ManifestHeader,
        packs: &[PackId],
        nentries: u64,
        parted: bool,
    ) -> std::io::Result<Self> {
        Self::with_major(
            w,
            header,
            packs,
            nentries,
            super::parts::major_of(true, parted),
        )
    }

    /// A writer of the manifest major version `major` (1 to 4; 1 and 2 write references
    /// without a skip, so every skip must be 0).
    pub fn with_major(
        w: W,
        header: &ManifestHeader,
        packs: &[PackId],
        nentries: u64,
        major: u16,
    ) -> std::io::Result<Self> {
        if major == 0 || major > super::parts::MAX_MAJOR {
            return Err(std::io::Error::other(format!(
                "manifest writer: major version {major} does not exist"
            )));
        }
        let mut head = crate::codec::Writer::new();
        head.header_version(MAGIC, major, crate::FORMAT_MINOR);
        header.encode_into(&mut head);
        head.u32(
            u32::try_from(packs.len())
                .map_err(|_| std::io::Error::other("a backup references more than 4G packs"))?,
        );
        for p in packs {
            head.raw(p.as_bytes());
        }
        head.u64(nentries);
        let mut out = ManifestWriter {
            w,
            hash: Sha256::new(),
            entries_left: nentries,
            chunks_left: 0,
            written: 0,
            frames: super::parts::major_has_frames(major),
        };
        out.put(&head.finish())?;
        Ok(out)
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hash.update(b);
        self.written += b.len() as u64;
        self.w.write_all(b)
    }

    fn begin(&mut self, path: &str, mode: u32, kind: u8) -> std::io::Result<()> {
        if self.chunks_left != 0 || self.entries_left == 0 {
            return Err(std::io::Error::other(format!(
                "manifest writer: entry {path:?} does not fit the counts given ({} chunks of the previous file missing, {} entries left)",
                self.chunks_left, self.entries_left
            )));
        }
        self.entries_left -= 1;
        let mut w = crate::codec::Writer::new();
        w.bytes(path.as_bytes());
        w.u32(mode);
        w.u8(kind);
        self.put(&w.finish())
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        self.begin(path, mode, KIND_DIR)
    }

    pub fn symlink(&mut self, path: &str, mode: u32, target: &[u8]) -> std::io::Result<()> {
        self.begin(path, mode, KIND_SYMLINK)?;
        let mut w = crate::codec::Writer::new();
        w.bytes(target);
        self.put(&w.finish())
    }

    /// A file entry; exactly `nchunks` calls of [`chunk`](Self::chunk) follow.
    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        sha256: &ContentHash,
        nchunks: u64,
    ) -> std::io::Result<()> {
        self.begin(path, mode, KIND_FILE)?;
        let mut w = crate::codec::Writer::new();
        w.u64(size);
        w.raw(sha256.as_bytes());
        w.u64(nchunks);
        self.put(&w.finish())?;
        self.chunks_left = nchunks;
        Ok(())
    }

    pub fn chunk(&mut self, c: &ChunkRef) -> std::io::Result<()> {
        if self.chunks_left == 0 {
            return Err(std::io::Error::other(
                "manifest writer: more chunks than the file entry announced",
            ));
        }
        if !self.frames && c.skip != 0 {
            return Err(std::io::Error::other(
                "manifest writer: a chunk inside a shared frame in a manifest of major 1 or 2",
            ));
        }
        self.chunks_left -= 1;
        let mut b = [0u8; FRAMES_REF_LEN as usize];
        b[..32].copy_from_slice(c.id.as_bytes());
        b[32..36].copy_from_slice(&c.pack.to_le_bytes());
        b[36..44].copy_from_slice(&c.offset.to_le_bytes());
        b[44..48].copy_from_slice(&c.clen.to_le_bytes());
        b[48..52].copy_from_slice(&c.ulen.to_le_bytes());
        b[52..56].copy_from_slice(&c.skip.to_le_bytes());
        let n = if self.frames {
            FRAMES_REF_LEN
        } else {
            CHUNK_REF_LEN
        };
        self.put(&b[..n as usize])
    }

    /// Any entry, chunks included.
    pub fn entry(&mut self, e: &Entry) -> std::io::Result<()> {
        match &e.kind {
            EntryKind::Dir => self.dir(&e.path, e.mode),
            EntryKind::Symlink(t) => self.symlink(&e.path, e.mode, t),
            EntryKind::File(f) => {
                self.file(&e.path, e.mode, f.size, &f.sha256, f.chunks.len() as u64)?;
                f.chunks.iter().try_for_each(|c| self.chunk(c))
            }
        }
    }

    /// Writes the sha256 trailer; returns the writer and the object's length.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        if self.entries_left != 0 || self.chunks_left != 0 {
            return Err(std::io::Error::other(format!(
                "manifest writer: {} entries and {} chunks announced but not written",
                self.entries_left, self.chunks_left
            )));
        }
        let digest = self.hash.finalize_reset();
        self.w.write_all(&digest)?;
        self.w.flush()?;
        Ok((self.w, self.written + 32))
    }
}
