//! Over 500 lines because the manifest's encoder, decoder and limits are one wire format and belong
//! in one place with its header prefix reader.
//!
//! Backup manifests (key `backups/<backup id>.manifest`): everything needed to rebuild a data
//! directory. A backup exists only once its manifest does; the manifest is written last.
//!
//! Layout: header (8) | backup header fields | pack table | entries | sha256 trailer (32).
//! The backup header fields come first so that [`ManifestHeader::decode_prefix`] can read them from
//! a prefix of the object without fetching the file list.

use crate::chunk::MAX_CHUNK_SIZE;
use crate::codec::{Reader, Writer};
use crate::error::FormatError;
use crate::ids::{ChunkId, ContentHash, Lsn, PackId, SystemId, TimelineId};

pub mod parts;
pub mod stream;
mod writer;
pub use stream::{EntryHead, FileHead, HeadKind, ManifestIndex, ManifestReader, Source};
pub use writer::ManifestWriter;

pub const MAGIC: [u8; 4] = *b"TMMF";
const WHAT: &str = "backup manifest";
/// Longest relative path a manifest may hold.
pub const MAX_PATH: usize = 4096;
/// Largest backup_label / tablespace_map / symlink target a manifest may hold.
pub const MAX_LABEL: usize = 1 << 20;
/// Largest backup id.
pub const MAX_ID: usize = 64;

pub const SOURCE_PGDATA: u8 = 1;
pub const SOURCE_REPLICATION: u8 = 2;
/// Flag bit: the backup was taken from a standby.
pub const FLAG_FROM_STANDBY: u32 = 1;
/// Flag bit (format 1.5): every file's `sha256` field is its chunk-list hash
/// ([`chunk_list_hash`]), not the SHA-256 of its bytes.
pub const FLAG_CHUNK_LIST_HASH: u32 = 2;

/// A file's chunk-list hash (format 1.5): the SHA-256 of its chunk ids in file order, each as
/// its 32 bytes, concatenated. The ids fix every byte of the file, so this fixes the file as its
/// SHA-256 would, for 32 bytes hashed per chunk instead of the chunk's bytes (an empty file's is
/// the SHA-256 of nothing, as its content hash is).
pub fn chunk_list_hash<'a>(ids: impl IntoIterator<Item = &'a ChunkId>) -> ContentHash {
    let mut h = ChunkListHasher::default();
    for id in ids {
        h.push(id);
    }
    h.finish()
}

/// [`chunk_list_hash`] fed one chunk id at a time.
#[derive(Default)]
pub struct ChunkListHasher(sha2::Sha256);

impl ChunkListHasher {
    /// The file's next chunk.
    pub fn push(&mut self, id: &ChunkId) {
        sha2::Digest::update(&mut self.0, id.as_bytes());
    }

    pub fn finish(self) -> ContentHash {
        ChunkId(sha2::Digest::finalize(self.0).into())
    }
}

/// Counters recorded when the backup was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// Sum of the sizes of all files in the backup.
    pub logical_bytes: u64,
    /// Chunks this backup stored anew.
    pub new_chunks: u64,
    /// Chunk references that reused a chunk already stored.
    pub reused_chunks: u64,
    /// Uncompressed bytes of the chunks stored anew.
    pub new_chunk_bytes: u64,
    /// Bytes of the pack objects this backup wrote.
    pub new_stored_bytes: u64,
    /// Objects this backup wrote (packs plus the manifest).
    pub new_objects: u64,
}

/// The fixed part of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHeader {
    pub backup_id: String,
    pub system_id: SystemId,
    /// PostgreSQL's server_version_num, e.g. 150018.
    pub pg_version: u32,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    /// Database clock at backup start, microseconds since the Unix epoch (UTC).
    pub start_time_us: i64,
    /// Database clock once pg_backup_stop returned, microseconds since the Unix epoch (UTC).
    pub stop_time_us: i64,
    /// [`SOURCE_PGDATA`] or [`SOURCE_REPLICATION`].
    pub source: u8,
    /// Bit set of `FLAG_*`.
    pub flags: u32,
    pub chunk_size: u32,
    pub parent: Option<String>,
    /// backup_label exactly as PostgreSQL returned it.
    pub backup_label: Vec<u8>,
    /// tablespace_map exactly as PostgreSQL returned it, when it returned one.
    pub tablespace_map: Option<Vec<u8>>,
    pub stats: BackupStats,
}

/// One chunk of a file: the chunk id and where it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: ChunkId,
    /// Index into [`Manifest::packs`].
    pub pack: u32,
    pub offset: u64,
    pub clen: u32,
    pub ulen: u32,
    /// Where the chunk starts in its frame's uncompressed bytes (format 1.4; 0 for a frame of
    /// one chunk).
    pub skip: u32,
}

impl ChunkRef {
    /// The reference to the chunk a pack index entry describes, in the manifest's pack `pack`.
    pub fn in_pack(pack: u32, e: &crate::pack::PackEntry) -> ChunkRef {
        ChunkRef {
            id: e.id,
            pack,
            offset: e.offset,
            clen: e.clen,
            ulen: e.ulen,
            skip: e.skip,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub size: u64,
    /// SHA-256 of the whole file as backed up, or its chunk-list hash when the manifest has
    /// `FLAG_CHUNK_LIST_HASH`.
    pub sha256: ContentHash,
    pub chunks: Vec<ChunkRef>,
}

impl FileEntry {
    /// The file's chunk-list hash ([`chunk_list_hash`]).
    pub fn chunk_list_hash(&self) -> ContentHash {
        chunk_list_hash(self.chunks.iter().map(|c| &c.id))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(FileEntry),
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative path below the data directory, `/`-separated.
    pub path: String,
    /// Permission bits (st_mode & 0o7777).
    pub mode: u32,
    pub kind: EntryKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub header: ManifestHeader,
    pub packs: Vec<PackId>,
    /// Sorted by path, byte-wise, unique.
    pub entries: Vec<Entry>,
}

const KIND_DIR: u8 = 1;
const KIND_FILE: u8 = 2;
const KIND_SYMLINK: u8 = 3;

impl ManifestHeader {
    fn encode_into(&self, w: &mut Writer) {
        w.bytes(self.backup_id.as_bytes());
        w.u64(self.system_id.0);
        w.u32(self.pg_version);
        w.u32(self.timeline.0);
        w.u64(self.start_lsn.0);
        w.u64(self.stop_lsn.0);
        w.i64(self.start_time_us);
        w.i64(self.stop_time_us);
        w.u8(self.source);
        w.u32(self.flags);
        w.u32(self.chunk_size);
        w.opt_bytes(self.parent.as_deref().map(str::as_bytes));
        w.bytes(&self.backup_label);
        w.opt_bytes(self.tablespace_map.as_deref());
        let s = &self.stats;
        for v in [
            s.logical_bytes,
            s.new_chunks,
            s.reused_chunks,
            s.new_chunk_bytes,
            s.new_stored_bytes,
            s.new_objects,
        ] {
            w.u64(v);
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, FormatError> {
        let backup_id = utf8("backup id", r.bytes("backup id", MAX_ID)?)?;
        validate_backup_id(&backup_id)?;
        let h = ManifestHeader {
            backup_id,
            system_id: SystemId(r.u64()?),
            pg_version: r.u32()?,
            timeline: TimelineId(r.u32()?),
            start_lsn: Lsn(r.u64()?),
            stop_lsn: Lsn(r.u64()?),
            start_time_us: r.i64()?,
            stop_time_us: r.i64()?,
            source: r.u8()?,
            flags: r.u32()?,
            chunk_size: r.u32()?,
            parent: r
                .opt_bytes("parent backup id", MAX_ID)?
                .map(|b| utf8("parent backup id", b))
                .transpose()?,
            backup_label: r.bytes("backup_label", MAX_LABEL)?.to_vec(),
            tablespace_map: r
                .opt_bytes("tablespace_map", MAX_LABEL)?
                .map(<[u8]>::to_vec),
            stats: BackupStats {
                logical_bytes: r.u64()?,
                new_chunks: r.u64()?,
                reused_chunks: r.u64()?,
                new_chunk_bytes: r.u64()?,
                new_stored_bytes: r.u64()?,
                new_objects: r.u64()?,
            },
        };
        if let Some(parent) = &h.parent {
            validate_backup_id(parent)?;
        }
        if h.source != SOURCE_PGDATA && h.source != SOURCE_REPLICATION {
            return Err(FormatError::invalid(
                WHAT,
                format!("source code {} is unknown", h.source),
            ));
        }
        if h.stop_lsn < h.start_lsn {
            return Err(FormatError::invalid(
                WHAT,
                format!("stop lsn {} precedes start lsn {}", h.stop_lsn, h.start_lsn),
            ));
        }
        if h.timeline.0 == 0 {
            return Err(FormatError::invalid(WHAT, "timeline 0 does not exist"));
        }
        if h.chunk_size == 0 || h.chunk_size > MAX_CHUNK_SIZE {
            return Err(FormatError::invalid(
                WHAT,
                format!("chunk size {} is out of range", h.chunk_size),
            ));
        }
        Ok(h)
    }

    /// Decodes only the header from a prefix of a manifest object (no checksum check: the
    /// trailer is not in the prefix). `Truncated` means a longer prefix is needed.
    pub fn decode_prefix(buf: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(WHAT, buf);
        r.header_of(MAGIC, parts::MAX_MAJOR)?;
        Self::decode_from(&mut r)
    }
}

impl Manifest {
    /// The manifest written whole, as this release writes it (major 3, chunk references with
    /// skips).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(parts::FRAMES_MAJOR)
            .expect("writing to a Vec in major 3 cannot fail")
    }

    /// The manifest written with the major version `major` (1 to 4: section 5 of FORMAT.md);
    /// an error when that major cannot hold it (a skip other than 0 in major 1 or 2).
    pub fn encode_as(&self, major: u16) -> std::io::Result<Vec<u8>> {
        let mut w = ManifestWriter::with_major(
            Vec::new(),
            &self.header,
            &self.packs,
            self.entries.len() as u64,
            major,
        )?;
        for e in &self.entries {
            w.entry(e)?;
        }
        Ok(w.finish()?.0)
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        stream::verify_trailer(buf)?;
        let (mut r, header, packs) = ManifestReader::open(buf)?;
        let mut entries = Vec::new();
        while let Some(e) = r.next_full()? {
            entries.push(e);
        }
        Ok(Manifest {
            header,
            packs,
            entries,
        })
    }
}

fn utf8(what: &'static str, b: &[u8]) -> Result<String, FormatError> {
    String::from_utf8(b.to_vec()).map_err(|_| FormatError::invalid(what, "is not UTF-8"))
}

/// A backup id is 1..=64 characters of `[0-9A-Za-z._-]`, not starting with `.`.
pub fn validate_backup_id(id: &str) -> Result<(), FormatError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FormatError::invalid(
            "backup id",
            format!("{id:?} must be 1-64 characters of [0-9A-Za-z._-] not starting with '.'"),
        ))
    }
}

/// A manifest path is relative, `/`-separated, with no empty, `.` or `..` component and no NUL:
/// joined to a target directory it can never point outside it. (That every parent is a
/// directory entry is a property of the whole manifest, checked by [`Manifest::decode`].)
pub fn validate_path(path: &str) -> Result<(), FormatError> {
    let bad = path.is_empty()
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(FormatError::invalid("entry path", format!("{path:?} is not a plain relative path (no leading '/', no '.', '..' or empty components)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let data = b"hello".to_vec();
        let id = ChunkId::of(&data);
        Manifest {
            header: ManifestHeader {
                backup_id: "20261121T204012Z".into(),
                system_id: SystemId(7),
                pg_version: 150018,
                timeline: TimelineId(1),
                start_lsn: Lsn(0x0200_0028),
                stop_lsn: Lsn(0x0200_0100),
                start_time_us: 1,
                stop_time_us: 2,
                source: SOURCE_PGDATA,
                flags: 0,
                chunk_size: 8192,
                parent: None,
                backup_label: b"START WAL LOCATION: 0/2000028\n".to_vec(),
                tablespace_map: None,
                stats: BackupStats::default(),
            },
            packs: vec![PackId::of(b"p")],
            entries: vec![
                Entry {
                    path: "base".into(),
                    mode: 0o700,
                    kind: EntryKind::Dir,
                },
                Entry {
                    path: "base/1".into(),
                    mode: 0o600,
                    kind: EntryKind::File(FileEntry {
                        size: 5,
                        sha256: id,
                        chunks: vec![ChunkRef {
                            id,
                            pack: 0,
                            offset: 8,
                            clen: 14,
                            ulen: 5,
                            skip: 0,
                        }],
                    }),
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_prefix() {
        let m = sample();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        assert_eq!(ManifestHeader::decode_prefix(&b[..200]).unwrap(), m.header);
        assert!(matches!(
            ManifestHeader::decode_prefix(&b[..20]),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn chunk_list_hashes_are_checked_by_every_full_read() {
        let mut m = sample();
        m.header.flags = FLAG_CHUNK_LIST_HASH;
        // The sample's file hash is its content's SHA-256: not its chunk-list hash.
        let b = m.encode();
        for e in [
            Manifest::decode(&b).unwrap_err(),
            stream::ManifestIndex::read(&b[..]).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(e.contains("file \"base/1\" records hash"), "{e}");
            assert!(e.contains("its chunk list hashes to"), "{e}");
        }
        let EntryKind::File(f) = &mut m.entries[1].kind else {
            unreachable!()
        };
        f.sha256 = f.chunk_list_hash();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        assert!(stream::ManifestIndex::read(&b[..]).is_ok());
        // Without the flag the field is not checked (a replication backup's SHA-256).
        m.header.flags = 0;
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn rejects_escaping_paths() {
        for p in ["../etc/passwd", "/etc/passwd", "a//b", "a/./b", "a/..", ""] {
            assert!(validate_path(p).is_err(), "{p}");
        }
        assert!(validate_path("base/1/2_fsm").is_ok());
        let mut m = sample();
        m.entries[1].path = "base/../../x".into();
        assert!(Manifest::decode(&m.encode()).is_err());
    }

    #[test]
    fn rejects_unsorted_entries() {
        let mut m = sample();
        m.entries.swap(0, 1);
        assert!(Manifest::decode(&m.encode()).is_err());
    }

    #[test]
    fn rejects_every_kind_of_escaping_path_inside_a_manifest() {
        for p in [
            "../etc/passwd",
            "/etc/passwd",
            "base/",
            "base//1",
            "base/./1",
            "base/..",
            ".",
            "a\0b",
        ] {
            let mut m = sample();
            m.entries[0].path = p.into();
            m.entries.truncate(1);
            let err = Manifest::decode(&m.encode()).expect_err(p).to_string();
            assert!(err.contains("entry path"), "{p:?}: {err}");
        }
    }

    #[test]
    fn rejects_a_repeated_path() {
        let mut m = sample();
        let again = m.entries[1].clone();
        m.entries.push(again);
        let err = Manifest::decode(&m.encode())
            .expect_err("repeated")
            .to_string();
        assert!(err.contains("repeated"), "{err}");
    }

    fn with_kind_of_base(kind: EntryKind) -> Manifest {
        let mut m = sample();
        m.entries[0].kind = kind;
        m
    }

    #[test]
    fn every_parent_must_be_a_directory_entry() {
        // The parent is missing.
        let mut m = sample();
        m.entries.remove(0);
        let err = Manifest::decode(&m.encode())
            .expect_err("no parent")
            .to_string();
        assert!(
            err.contains("\"base/1\"") && err.contains("not a directory entry"),
            "{err}"
        );
        // The parent is a symlink: a file below it would be written through the link.
        let m = with_kind_of_base(EntryKind::Symlink(b"/etc".to_vec()));
        let err = Manifest::decode(&m.encode())
            .expect_err("symlink parent")
            .to_string();
        assert!(err.contains("\"base/1\""), "{err}");
        // The parent is a file.
        let m = with_kind_of_base(EntryKind::File(FileEntry {
            size: 0,
            sha256: ChunkId::of(b""),
            chunks: Vec::new(),
        }));
        assert!(Manifest::decode(&m.encode()).is_err());
        // A deeper entry needs its own parent too, not just a top-level ancestor.
        let mut m = sample();
        m.entries[1].path = "base/1/2".into();
        assert!(Manifest::decode(&m.encode()).is_err());
    }

    #[test]
    fn a_sibling_sorting_between_parent_and_child_is_fine() {
        // "base-x" sorts between "base" and "base/1" ('-' < '/'): the parent is still found.
        let mut m = sample();
        m.entries.insert(
            1,
            Entry {
                path: "base-x".into(),
                mode: 0o600,
                kind: EntryKind::Symlink(b"/elsewhere".to_vec()),
            },
        );
        assert_eq!(Manifest::decode(&m.encode()), Ok(m));
    }
}
