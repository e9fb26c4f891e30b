//! Reading and writing a manifest one entry at a time, so that neither side holds a whole
//! file list: a reader over any [`Source`] (a slice, or a local file a caller filled) that
//! checks everything [`Manifest::decode`](super::Manifest::decode) checks as it goes, and a
//! writer to any `std::io::Write` that computes the sha256 trailer on the way.
//!
//! Memory: the reader keeps a window of [`WINDOW`] bytes (more only for one field that is
//! larger, never more than that field's cap) and the set of directory paths seen so far (one
//! string per directory entry, needed to check that every entry's parent is a directory).

use super::utf8;
use super::{
    ChunkRef, Entry, EntryKind, FileEntry, ManifestHeader, KIND_DIR, KIND_FILE, KIND_SYMLINK,
    MAGIC, MAX_LABEL, MAX_PATH, WHAT,
};
use crate::chunk::{MAX_CHUNK_SIZE, MAX_FRAME_SIZE};
use crate::codec::Reader;
use crate::error::FormatError;
use crate::ids::{ChunkId, ContentHash, PackId};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// Bytes the reader reads at once.
pub const WINDOW: usize = 256 << 10;
/// Largest frame offset a chunk reference may name: far above any pack a writer stores (its
/// `pack_target` is at most 1 GiB), and low enough that offset + clen never overflows.
pub const MAX_PACK_OFFSET: u64 = 1 << 40;
/// Encoded bytes of one chunk reference in a manifest of major 1 or 2.
pub const CHUNK_REF_LEN: u64 = 32 + 4 + 8 + 4 + 4;
/// Encoded bytes of one chunk reference in a manifest of major 3 or 4 (a skip follows).
pub const FRAMES_REF_LEN: u64 = CHUNK_REF_LEN + 4;
/// Encoded bytes of the backup header fields at most (two labels at their cap and the ids).
const MAX_HEADER_LEN: usize = 2 * (MAX_LABEL + 4) + 4096;

/// Random-access bytes a manifest is read from.
pub trait Source {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Fills `buf` from offset `off` (which with `buf` lies within `len`).
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), String>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        let off = off as usize;
        buf.copy_from_slice(&self[off..off + buf.len()]);
        Ok(())
    }
}

/// Checks the magic, the major version and the sha256 trailer of a manifest held by `src`,
/// reading it in windows.
pub fn verify_trailer<S: Source + ?Sized>(src: &S) -> Result<(), FormatError> {
    let len = src.len();
    let mut head = vec![0u8; len.min(8) as usize];
    read(src, 0, &mut head)?;
    Reader::new(WHAT, &head).header_of(MAGIC, super::parts::MAX_MAJOR)?;
    if len < 8 + 32 {
        return Err(FormatError::Truncated {
            what: WHAT,
            needed: 8 + 32 - len,
        });
    }
    let body = len - 32;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; WINDOW];
    let mut at = 0u64;
    while at < body {
        let n = (body - at).min(WINDOW as u64) as usize;
        read(src, at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    let mut trailer = [0u8; 32];
    read(src, body, &mut trailer)?;
    let actual = h.finalize();
    if actual.as_slice() != trailer {
        return Err(FormatError::ChecksumMismatch {
            what: WHAT,
            expected: hex::encode(trailer),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

fn read<S: Source + ?Sized>(src: &S, off: u64, buf: &mut [u8]) -> Result<(), FormatError> {
    src.read_at(off, buf)
        .map_err(|reason| FormatError::Source { what: WHAT, reason })
}

/// A forward cursor over the manifest body `[pos, end)` through a window.
struct Cursor<'s, S: ?Sized> {
    src: &'s S,
    /// End of the body (the trailer is not read).
    end: u64,
    pos: u64,
    win: Vec<u8>,
    /// Offset of `win[0]` in the source.
    win_at: u64,
}

impl<'s, S: Source + ?Sized> Cursor<'s, S> {
    fn new(src: &'s S, pos: u64, end: u64) -> Self {
        Cursor {
            src,
            end,
            pos,
            win: Vec::new(),
            win_at: pos,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], FormatError> {
        let left = self.end - self.pos;
        if (n as u64) > left {
            return Err(FormatError::Truncated {
                what: WHAT,
                needed: n as u64 - left,
            });
        }
        let in_win =
            self.pos >= self.win_at && self.pos + n as u64 <= self.win_at + self.win.len() as u64;
        if !in_win {
            let want = (n.max(WINDOW) as u64).min(left) as usize;
            self.win.clear();
            self.win.resize(want, 0);
            read(self.src, self.pos, &mut self.win)?;
            self.win_at = self.pos;
            if self.win.capacity() > 2 * WINDOW && want <= WINDOW {
                self.win.shrink_to(WINDOW);
            }
        }
        let at = (self.pos - self.win_at) as usize;
        self.pos += n as u64;
        Ok(&self.win[at..at + n])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self, field: &'static str, max: usize) -> Result<&[u8], FormatError> {
        let len = crate::codec::string_len(field, self.u32()?, max)?;
        self.take(len)
    }
}

/// The fixed part of one entry; a file's chunk references follow it in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryHead {
    pub path: String,
    pub mode: u32,
    pub kind: HeadKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadKind {
    Dir,
    Symlink(Vec<u8>),
    File(FileHead),
}

/// A file entry without its chunk list: where the list is and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHead {
    pub size: u64,
    pub sha256: ContentHash,
    pub nchunks: u64,
    /// Offset of the first chunk reference in the manifest object.
    pub chunks_at: u64,
    /// Whether the references carry a skip ([`FRAMES_REF_LEN`] bytes each; manifest major 3
    /// and 4) or not ([`CHUNK_REF_LEN`]).
    pub frames: bool,
}

impl FileHead {
    /// Encoded bytes of each of this file's chunk references.
    pub fn ref_len(&self) -> u64 {
        ref_len(self.frames)
    }
}

fn ref_len(frames: bool) -> u64 {
    if frames {
        FRAMES_REF_LEN
    } else {
        CHUNK_REF_LEN
    }
}

/// A manifest without its chunk lists: what a reader keeps in memory of a large manifest
/// (the fixed part of every entry; a file's list stays where [`FileHead::chunks_at`] says).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestIndex {
    pub header: ManifestHeader,
    pub packs: Vec<PackId>,
    /// Sorted by path, as in the object.
    pub entries: Vec<EntryHead>,
}

impl ManifestIndex {
    /// Reads the index of the manifest `src` holds: verifies its trailer, then every entry and
    /// every chunk reference, keeping the entries' fixed parts.
    pub fn read<S: Source + ?Sized>(src: &S) -> Result<ManifestIndex, FormatError> {
        verify_trailer(src)?;
        let (mut r, header, packs) = ManifestReader::open(src)?;
        let mut entries = Vec::new();
        while let Some(e) = r.next_entry()? {
            entries.push(e);
        }
        Ok(ManifestIndex {
            header,
            packs,
            entries,
        })
    }

    /// The index of the entry at `path`.
    pub fn find(&self, path: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| e.path.as_bytes().cmp(path.as_bytes()))
            .ok()
    }
}

impl super::Manifest {
    /// This manifest's index, with the chunk-list offsets of its encoding.
    pub fn index(&self) -> ManifestIndex {
        ManifestIndex::read(&self.encode()[..]).expect("an encoded manifest reads back")
    }
}

/// The chunk list of the file being read.
struct Pending {
    path: String,
    left: u64,
    size: u64,
    total: u64,
    /// Under `FLAG_CHUNK_LIST_HASH`: the file's recorded hash and its chunk ids hashed so far.
    list: Option<(ContentHash, super::ChunkListHasher)>,
}

/// Reads a manifest entry by entry. The caller verifies the trailer first
/// ([`verify_trailer`]) when the source is not already known to be whole.
pub struct ManifestReader<'s, S: ?Sized> {
    cur: Cursor<'s, S>,
    header_end: u64,
    packs: usize,
    entries_left: u64,
    prev: Option<String>,
    dirs: HashSet<String>,
    pending: Option<Pending>,
    /// Whether chunk references carry a skip (manifest major 3 and 4).
    frames: bool,
    /// Whether file hashes are chunk-list hashes (`FLAG_CHUNK_LIST_HASH`): checked as each
    /// file's list is read.
    list_hashes: bool,
}

impl<'s, S: Source + ?Sized> ManifestReader<'s, S> {
    /// Reads the header and the pack table of the manifest `src` holds (trailer included).
    pub fn open(src: &'s S) -> Result<(Self, ManifestHeader, Vec<PackId>), FormatError> {
        let len = src.len();
        if len < 32 {
            return Err(FormatError::Truncated {
                what: WHAT,
                needed: 32 - len,
            });
        }
        let end = len - 32;
        let mut head = vec![0u8; end.min(8 + MAX_HEADER_LEN as u64) as usize];
        read(src, 0, &mut head)?;
        let mut r = Reader::new(WHAT, &head);
        let (major, _) = r.header_of(MAGIC, super::parts::MAX_MAJOR)?;
        let frames = super::parts::major_has_frames(major);
        let header = ManifestHeader::decode_from(&mut r)?;
        let header_end = r.position() as u64;
        let mut cur = Cursor::new(src, header_end, end);
        let npacks = cur.u32()? as u64;
        if npacks * 32 > end - cur.pos {
            return Err(FormatError::Truncated {
                what: WHAT,
                needed: npacks * 32 - (end - cur.pos),
            });
        }
        let mut packs = Vec::with_capacity(npacks as usize);
        for _ in 0..npacks {
            packs.push(PackId(cur.array()?));
        }
        let entries_left = cur.u64()?;
        let reader = ManifestReader {
            cur,
            header_end,
            packs: packs.len(),
            entries_left,
            prev: None,
            dirs: HashSet::new(),
            pending: None,
            frames,
            list_hashes: header.flags & super::FLAG_CHUNK_LIST_HASH != 0,
        };
        Ok((reader, header, packs))
    }

    /// Where the backup header fields end (the pack table starts) in the object.
    pub fn header_end(&self) -> u64 {
        self.header_end
    }

    /// The next entry, or `None` after the last (the body must then end). Chunk references of
    /// the previous file not read with [`next_chunk`](Self::next_chunk) are read and checked
    /// here.
    pub fn next_entry(&mut self) -> Result<Option<EntryHead>, FormatError> {
        while self.next_chunk()?.is_some() {}
        if self.entries_left == 0 {
            if self.cur.pos != self.cur.end {
                return Err(FormatError::invalid(
                    WHAT,
                    format!("{} unexpected trailing bytes", self.cur.end - self.cur.pos),
                ));
            }
            return Ok(None);
        }
        self.entries_left -= 1;
        let path = utf8("entry path", self.cur.bytes("entry path", MAX_PATH)?)?;
        super::validate_path(&path)?;
        if let Some(prev) = &self.prev {
            if prev.as_bytes() >= path.as_bytes() {
                return Err(FormatError::invalid(
                    WHAT,
                    format!("entry {path:?} is out of order or repeated after {prev:?}"),
                ));
            }
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !self.dirs.contains(parent) {
                return Err(FormatError::invalid(
                    WHAT,
                    format!("entry {path:?} lies below {parent:?}, which is not a directory entry of this manifest (a symlink, a file, or missing)"),
                ));
            }
        }
        let mode = self.cur.u32()?;
        if mode & !0o7777 != 0 {
            return Err(FormatError::invalid(
                WHAT,
                format!("entry {path:?} has mode {mode:o} beyond permission bits"),
            ));
        }
        let kind = match self.cur.u8()? {
            KIND_DIR => HeadKind::Dir,
            KIND_FILE => {
                let size = self.cur.u64()?;
                let sha256 = ChunkId(self.cur.array()?);
                let nchunks = self.cur.u64()?;
                let chunks_at = self.cur.pos;
                let rl = ref_len(self.frames);
                let fits = (self.cur.end - chunks_at) / rl;
                if nchunks > fits {
                    return Err(FormatError::Truncated {
                        what: WHAT,
                        needed: (nchunks - fits).saturating_mul(rl),
                    });
                }
                self.pending = Some(Pending {
                    path: path.clone(),
                    left: nchunks,
                    size,
                    total: 0,
                    list: self
                        .list_hashes
                        .then(|| (sha256, super::ChunkListHasher::default())),
                });
                HeadKind::File(FileHead {
                    size,
                    sha256,
                    nchunks,
                    chunks_at,
                    frames: self.frames,
                })
            }
            KIND_SYMLINK => {
                HeadKind::Symlink(self.cur.bytes("symlink target", MAX_LABEL)?.to_vec())
            }
            other => {
                return Err(FormatError::invalid(
                    WHAT,
                    format!("entry {path:?} has unknown kind {other}"),
                ))
            }
        };
        if kind == HeadKind::Dir {
            self.dirs.insert(path.clone());
        }
        if let HeadKind::File(f) = &kind {
            if f.nchunks == 0 {
                self.end_of_file()?;
            }
        }
        self.prev = Some(path.clone());
        Ok(Some(EntryHead { path, mode, kind }))
    }

    /// The next chunk reference of the file [`next_entry`](Self::next_entry) returned last, or
    /// `None` once its list is read (its sizes then add up to the file's size).
    pub fn next_chunk(&mut self) -> Result<Option<ChunkRef>, FormatError> {
        let Some(p) = &mut self.pending else {
            return Ok(None);
        };
        if p.left == 0 {
            return self.end_of_file().map(|_| None);
        }
        p.left -= 1;
        let c = decode_chunk(&mut self.cur, &p.path, self.packs, self.frames)?;
        let p = self.pending.as_mut().expect("pending file");
        p.total += c.ulen as u64;
        if let Some((_, h)) = &mut p.list {
            h.push(&c.id);
        }
        if p.left == 0 {
            self.end_of_file()?;
        }
        Ok(Some(c))
    }

    fn end_of_file(&mut self) -> Result<(), FormatError> {
        if let Some(p) = self.pending.take() {
            if p.total != p.size {
                return Err(FormatError::invalid(
                    WHAT,
                    format!(
                        "file {:?} is {} bytes but its chunks hold {}",
                        p.path, p.size, p.total
                    ),
                ));
            }
            if let Some((want, h)) = p.list {
                let got = h.finish();
                if got != want {
                    return Err(FormatError::invalid(
                        WHAT,
                        format!(
                            "file {:?} records hash {want}, but its chunk list hashes to {got}",
                            p.path
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads the chunk list of the current file whole (at most its `nchunks` references,
    /// which the manifest's length already bounds).
    pub fn file_chunks(&mut self) -> Result<Vec<ChunkRef>, FormatError> {
        let mut out = Vec::with_capacity(self.pending.as_ref().map_or(0, |p| p.left) as usize);
        while let Some(c) = self.next_chunk()? {
            out.push(c);
        }
        Ok(out)
    }

    /// The next entry with a file's chunk list read whole.
    pub fn next_full(&mut self) -> Result<Option<Entry>, FormatError> {
        let Some(h) = self.next_entry()? else {
            return Ok(None);
        };
        let kind = match h.kind {
            HeadKind::Dir => EntryKind::Dir,
            HeadKind::Symlink(t) => EntryKind::Symlink(t),
            HeadKind::File(f) => EntryKind::File(FileEntry {
                size: f.size,
                sha256: f.sha256,
                chunks: self.file_chunks()?,
            }),
        };
        Ok(Some(Entry {
            path: h.path,
            mode: h.mode,
            kind,
        }))
    }
}

/// Reads again the chunk list of one file whose head an earlier pass returned (`npacks`: the
/// manifest's pack count). The sizes must add up as they did then.
pub fn read_chunks_at<S: Source + ?Sized>(
    src: &S,
    path: &str,
    head: &FileHead,
    npacks: usize,
) -> Result<Vec<ChunkRef>, FormatError> {
    let out = read_chunk_range(src, path, head, npacks, 0, head.nchunks)?;
    let total: u64 = out.iter().map(|c| c.ulen as u64).sum();
    if total != head.size {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "file {path:?} is {} bytes but its chunks hold {total}",
                head.size
            ),
        ));
    }
    Ok(out)
}

/// Reads chunk references `first..first + n` of one file (fewer past the end of its list).
pub fn read_chunk_range<S: Source + ?Sized>(
    src: &S,
    path: &str,
    head: &FileHead,
    npacks: usize,
    first: u64,
    n: u64,
) -> Result<Vec<ChunkRef>, FormatError> {
    let end = src.len().saturating_sub(32);
    let rl = head.ref_len();
    let bytes = head.nchunks.saturating_mul(rl);
    if head.chunks_at.saturating_add(bytes) > end {
        return Err(FormatError::Truncated {
            what: WHAT,
            needed: head.chunks_at.saturating_add(bytes) - end,
        });
    }
    let first = first.min(head.nchunks);
    let n = n.min(head.nchunks - first);
    let at = head.chunks_at + first * rl;
    let mut cur = Cursor::new(src, at, at + n * rl);
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        out.push(decode_chunk(&mut cur, path, npacks, head.frames)?);
    }
    Ok(out)
}

fn decode_chunk<S: Source + ?Sized>(
    cur: &mut Cursor<'_, S>,
    path: &str,
    npacks: usize,
    frames: bool,
) -> Result<ChunkRef, FormatError> {
    let c = ChunkRef {
        id: ChunkId(cur.array()?),
        pack: cur.u32()?,
        offset: cur.u64()?,
        clen: cur.u32()?,
        ulen: cur.u32()?,
        skip: if frames { cur.u32()? } else { 0 },
    };
    if c.pack as usize >= npacks {
        return Err(FormatError::invalid(
            WHAT,
            format!("file {path:?} names pack {} of {npacks}", c.pack),
        ));
    }
    if c.ulen == 0
        || c.ulen > MAX_CHUNK_SIZE
        || c.clen == 0
        || c.skip as u64 + c.ulen as u64 > MAX_FRAME_SIZE as u64
        || c.offset > MAX_PACK_OFFSET
    {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "file {path:?} has a chunk with offset {} clen {} ulen {} skip {}",
                c.offset, c.clen, c.ulen, c.skip
            ),
        ));
    }
    Ok(c)
}

#[cfg(test)]
mod tests;
