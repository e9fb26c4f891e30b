//! The golden objects of `format-spec/vectors/`, built from fixed inputs.
//!
//! Shared by the generator (`examples/gen_vectors.rs`) and the vector test (`tests/vectors.rs`):
//! the generator writes these bytes, the test checks that the files still decode to the documented
//! values and that building them again gives the same bytes. Everything here is deterministic; the
//! only outside influence is the zstd library version (frames are level 3, zstd 1.5.x).
//!
//! The `*_v13` builders rebuild the frozen format 1.3 files of `vectors/v1.3/` (read-compatibility
//! vectors): the generator never writes them, the test only checks that they are still these bytes
//! and still decode.

#![allow(dead_code)]

use tidemark_format::chunk;
use tidemark_format::config::{RepoConfig, COMPRESSION_ZSTD};
use tidemark_format::lock::{GcState, Lease, LeaseKind};
use tidemark_format::manifest::{
    BackupStats, ChunkRef, Entry, EntryKind, FileEntry, Manifest, ManifestHeader, SOURCE_PGDATA,
};
use tidemark_format::pack::{self, PackBuilder, PackEntry};
use tidemark_format::wal::{self, WalFileName, PG15_PAGE_MAGIC};
use tidemark_format::{ChunkId, Lsn, PackId, SystemId, TimelineId};

/// zstd level of every frame in the vectors.
pub const LEVEL: i32 = 3;
pub const SYSTEM_ID: u64 = 7_300_000_000_000_000_001;
/// 2026-11-01T09:00:00Z.
pub const CREATED_US: i64 = 1_793_523_600_000_000;
/// 2026-11-21T20:40:12.123456Z.
pub const START_TIME_US: i64 = 1_795_293_612_123_456;
/// 2026-11-21T20:41:57.654321Z.
pub const STOP_TIME_US: i64 = 1_795_293_717_654_321;
pub const BACKUP_ID: &str = "20261121T204012Z";
pub const PARENT_ID: &str = "20261120T204012Z";
pub const START_LSN: u64 = 0x0200_0028;
pub const STOP_LSN: u64 = 0x0200_0138;
/// The WAL segment size of the golden cluster (initdb --wal-segsize=1).
pub const WAL_SEG_SIZE: u32 = 1 << 20;
pub const WAL_SEGMENT_NAME: &str = "000000010000000000000020";
pub const WAL_HISTORY_NAME: &str = "00000002.history";
pub const HISTORY_TEXT: &[u8] = b"1\t0/2000138\tno recovery target specified\n";
pub const BACKUP_LABEL: &[u8] = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000020)\n\
CHECKPOINT LOCATION: 0/2000060\n\
BACKUP METHOD: streamed\n\
BACKUP FROM: primary\n\
START TIME: 2026-11-21 20:40:12 UTC\n\
LABEL: tidemark 20261121T204012Z\n\
START TIMELINE: 1\n";
pub const TABLESPACE_MAP: &[u8] = b"16385 /mnt/ts1\n";

pub fn config() -> RepoConfig {
    RepoConfig {
        system_id: SystemId(SYSTEM_ID),
        chunk_size: 8192,
        pack_target: 32 << 20,
        compression: COMPRESSION_ZSTD,
        created_us: CREATED_US,
    }
}

/// Chunk A: an 8 KiB heap page (24-byte page header, free space, tuples at the end of the page).
pub fn chunk_a() -> Vec<u8> {
    let mut p = vec![0u8; 8192];
    // pd_lsn, pd_checksum, pd_flags, pd_lower, pd_upper, pd_special, pd_pagesize_version.
    p[..8].copy_from_slice(&0x0200_0060u64.rotate_left(32).to_le_bytes());
    p[12..14].copy_from_slice(&40u16.to_le_bytes());
    p[14..16].copy_from_slice(&4096u16.to_le_bytes());
    p[16..18].copy_from_slice(&8192u16.to_le_bytes());
    p[18..20].copy_from_slice(&(8192u16 | 4).to_le_bytes());
    for (i, b) in p[4096..].iter_mut().enumerate() {
        *b = ((i * 31 + 7) % 251) as u8;
    }
    p
}

/// Chunk B: an all-zero 8 KiB page.
pub fn chunk_b() -> Vec<u8> {
    vec![0u8; 8192]
}

/// Chunk C: the 100-byte tail of a relation file (a file's last chunk may be shorter).
pub fn chunk_c() -> Vec<u8> {
    (0..100u8).map(|i| i.wrapping_mul(7) ^ 0x5a).collect()
}

/// Chunk D: the whole of `PG_VERSION`.
pub fn chunk_d() -> Vec<u8> {
    b"15\n".to_vec()
}

/// The single chunk vector (`chunk.bin`): chunk A as one zstd frame.
pub fn chunk_frame() -> Vec<u8> {
    chunk::compress(&chunk_a(), LEVEL)
}

/// The frames of `pack.bin`, each as the chunks it holds: chunks A and B (the first two pages of
/// `base/1/16384`, consecutive new chunks of one file) as one frame, then C and D each alone
/// (format 1.4, FORMAT.md 8.2).
pub fn pack_frames() -> Vec<Vec<Vec<u8>>> {
    vec![vec![chunk_a(), chunk_b()], vec![chunk_c()], vec![chunk_d()]]
}

/// The pack (`pack.bin`, format 1.4: major 2, index `TMPF`) holding chunks A, B, C, D in that
/// order in three frames ([`pack_frames`]), and its entries.
pub fn pack() -> (PackId, Vec<u8>, Vec<PackEntry>) {
    let mut b = PackBuilder::new();
    let mut entries = Vec::new();
    for chunks in pack_frames() {
        let ids: Vec<(ChunkId, u32)> = chunks
            .iter()
            .map(|c| (ChunkId::of(c), c.len() as u32))
            .collect();
        let frame = chunk::compress(&chunks.concat(), LEVEL);
        entries.extend_from_slice(b.push_frame(&frame, &ids));
    }
    let (id, bytes) = b.finish();
    (id, bytes, entries)
}

/// The pack index section of `pack.bin` (`pack-index.bin`) and the offset where it starts, which
/// is the end of the pack's blobs.
pub fn pack_index() -> (Vec<u8>, u64) {
    let (_, bytes, entries) = pack();
    let index = pack::encode_index(&entries);
    let start = bytes.len() - pack::FOOTER_LEN - index.len();
    (index, start as u64)
}

/// The pack of format 1.3 (`v1.3/pack.bin`): header major 1, chunks A, B, C, D each as its own
/// frame, index `TMPX` with 48-byte entries. Built here without [`PackBuilder`], which writes
/// format 1.4 only.
pub fn pack_v13() -> (PackId, Vec<u8>, Vec<PackEntry>) {
    let mut bytes = b"TMPK\x01\x00\x00\x00".to_vec();
    let mut entries = Vec::new();
    for c in [chunk_a(), chunk_b(), chunk_c(), chunk_d()] {
        let frame = chunk::compress(&c, LEVEL);
        entries.push(PackEntry {
            id: ChunkId::of(&c),
            offset: bytes.len() as u64,
            clen: frame.len() as u32,
            ulen: c.len() as u32,
            skip: 0,
        });
        bytes.extend_from_slice(&frame);
    }
    let index = pack::encode_index_as(&entries, false);
    bytes.extend_from_slice(&index);
    bytes.extend_from_slice(&(index.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&pack::END_MAGIC);
    (PackId::of(&bytes), bytes, entries)
}

/// The index section of `v1.3/pack.bin` (`v1.3/pack-index.bin`) and the offset where it starts.
pub fn pack_index_v13() -> (Vec<u8>, u64) {
    let (_, bytes, entries) = pack_v13();
    let index = pack::encode_index_as(&entries, false);
    let start = bytes.len() - pack::FOOTER_LEN - index.len();
    (index, start as u64)
}

fn cref(e: &PackEntry) -> ChunkRef {
    ChunkRef::in_pack(0, e)
}

fn file(mode: u32, path: &str, parts: &[&PackEntry], data: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        mode,
        kind: EntryKind::File(FileEntry {
            size: data.len() as u64,
            sha256: ChunkId::of(data),
            chunks: parts.iter().map(|e| cref(e)).collect(),
        }),
    }
}

fn dir(path: &str) -> Entry {
    Entry {
        path: path.into(),
        mode: 0o700,
        kind: EntryKind::Dir,
    }
}

/// The contents of `base/1/16384`: chunks A, B, A, C.
pub fn relation_16384() -> Vec<u8> {
    [chunk_a(), chunk_b(), chunk_a(), chunk_c()].concat()
}

/// The manifest (`manifest.bin`, format 1.4: major 3, chunk references with a skip) of backup
/// 20261121T204012Z, whose one pack is `pack.bin`.
pub fn manifest() -> Manifest {
    let (pack_id, pack_bytes, e) = pack();
    manifest_of(pack_id, pack_bytes.len(), &e)
}

/// The manifest of format 1.3 (`v1.3/manifest.bin`, major 1): the same backup, its one pack
/// `v1.3/pack.bin`.
pub fn manifest_v13() -> Manifest {
    let (pack_id, pack_bytes, e) = pack_v13();
    manifest_of(pack_id, pack_bytes.len(), &e)
}

/// The bytes of `v1.3/manifest.bin`: [`manifest_v13`] written as major 1.
pub fn manifest_v13_bytes() -> Vec<u8> {
    encode_as(&manifest_v13(), 1)
}

/// `m` encoded with the manifest major version `major` (1 to 4).
pub fn encode_as(m: &Manifest, major: u16) -> Vec<u8> {
    m.encode_as(major)
        .expect("the golden manifests fit every major")
}

/// The manifest of the golden backup whose one pack is `pack_id` (`pack_len` bytes, chunks A, B,
/// C, D at the entries `e`).
fn manifest_of(pack_id: PackId, pack_len: usize, e: &[PackEntry]) -> Manifest {
    let (a, b, c, d) = (&e[0], &e[1], &e[2], &e[3]);
    Manifest {
        header: ManifestHeader {
            backup_id: BACKUP_ID.into(),
            system_id: SystemId(SYSTEM_ID),
            pg_version: 150010,
            timeline: TimelineId(1),
            start_lsn: Lsn(START_LSN),
            stop_lsn: Lsn(STOP_LSN),
            start_time_us: START_TIME_US,
            stop_time_us: STOP_TIME_US,
            source: SOURCE_PGDATA,
            flags: 0,
            chunk_size: 8192,
            parent: Some(PARENT_ID.into()),
            backup_label: BACKUP_LABEL.to_vec(),
            tablespace_map: Some(TABLESPACE_MAP.to_vec()),
            stats: BackupStats {
                logical_bytes: (3 + relation_16384().len()) as u64,
                new_chunks: 4,
                reused_chunks: 1,
                new_chunk_bytes: 8192 + 8192 + 100 + 3,
                new_stored_bytes: pack_len as u64,
                new_objects: 2,
            },
        },
        packs: vec![pack_id],
        entries: vec![
            file(0o600, "PG_VERSION", &[d], &chunk_d()),
            dir("base"),
            dir("base/1"),
            file(0o600, "base/1/16384", &[a, b, a, c], &relation_16384()),
            file(0o600, "base/1/16390", &[], b""),
            dir("pg_tblspc"),
            Entry {
                path: "pg_tblspc/16385".into(),
                mode: 0o777,
                kind: EntryKind::Symlink(b"/mnt/ts1".to_vec()),
            },
            dir("pg_wal"),
        ],
    }
}

/// A 1 MiB WAL segment starting at 0/2000000 on timeline 1: every 8 KiB page carries a page
/// header, the first page the long header; a few record bytes follow the first header.
pub fn wal_segment_data() -> Vec<u8> {
    let mut seg = vec![0u8; WAL_SEG_SIZE as usize];
    for (i, page) in seg.chunks_mut(8192).enumerate() {
        let long = i == 0;
        page[0..2].copy_from_slice(&PG15_PAGE_MAGIC.to_le_bytes());
        page[2..4].copy_from_slice(&(if long { 0x0006u16 } else { 0x0004 }).to_le_bytes());
        page[4..8].copy_from_slice(&1u32.to_le_bytes());
        page[8..16].copy_from_slice(&(0x0200_0000u64 + i as u64 * 8192).to_le_bytes());
        if long {
            page[24..32].copy_from_slice(&SYSTEM_ID.to_le_bytes());
            page[32..36].copy_from_slice(&WAL_SEG_SIZE.to_le_bytes());
            page[36..40].copy_from_slice(&8192u32.to_le_bytes());
            for (j, b) in page[40..0x138].iter_mut().enumerate() {
                *b = (j * 13 % 256) as u8;
            }
        }
    }
    seg
}

pub fn wal_segment_name() -> WalFileName {
    WalFileName::parse(WAL_SEGMENT_NAME).expect("the golden segment name is valid")
}

pub fn wal_history_name() -> WalFileName {
    WalFileName::parse(WAL_HISTORY_NAME).expect("the golden history name is valid")
}

/// 2026-11-22T03:00:00Z: when the golden expire took its lease.
pub const LEASE_CREATED_US: i64 = 1_795_316_400_000_000;
/// 2026-11-22T03:05:00Z: the lease's first expiry (TTL 300 s).
pub const LEASE_EXPIRES_US: i64 = 1_795_316_700_000_000;
pub const LEASE_PID: u32 = 4242;
pub const LEASE_HOST: &str = "pg-main-0";
/// 2026-11-22T03:00:07.25Z: when the golden expire condemned its packs.
pub const CONDEMNED_US: i64 = 1_795_316_407_250_000;
/// The condemned packs are named by the sha256 of these strings (not packs of the vectors).
pub const CONDEMNED_PACK_SEEDS: [&[u8]; 3] = [b"orphan-1", b"orphan-2", b"orphan-3"];

/// The lease (`lease.bin`) of an expire running on pod `pg-main-0`.
pub fn lease() -> Lease {
    Lease {
        kind: LeaseKind::Expire,
        created_us: LEASE_CREATED_US,
        expires_us: LEASE_EXPIRES_US,
        pid: LEASE_PID,
        host: LEASE_HOST.into(),
    }
}

/// The GC state (`gc-state.bin`) of that expire: three condemned packs, sorted.
pub fn gc_state() -> GcState {
    let mut packs: Vec<PackId> = CONDEMNED_PACK_SEEDS.iter().map(|s| PackId::of(s)).collect();
    packs.sort();
    GcState {
        condemned_us: CONDEMNED_US,
        packs,
    }
}

/// The cluster record (`cluster.bin`, format 1.1) of the vectors' cluster: PostgreSQL 15,
/// recorded when the repository was created.
pub fn cluster() -> tidemark_format::cluster::ClusterRecord {
    tidemark_format::cluster::ClusterRecord {
        system_id: SystemId(SYSTEM_ID),
        pg_major: 15,
        created_us: CREATED_US,
    }
}

/// The user key of the encrypted vectors (format 1.2).
pub const USER_KEY: &[u8] = b"tidemark vector user key 0123456789";
/// The master key of the encrypted vectors: bytes 0, 1, ..., 31.
pub fn master_key() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

/// The keyring entry (`keyring.bin`, format 1.2) wrapping [`master_key`] under [`USER_KEY`]:
/// key id 0x11 × 16, salt 0x22 × 16, 10000 iterations.
pub fn keyring_entry() -> tidemark_format::keyring::KeyringEntry {
    tidemark_format::keyring::KeyringEntry::wrap(
        &master_key(),
        USER_KEY,
        [0x11; 16],
        [0x22; 16],
        10_000,
        CREATED_US,
    )
}

/// `config.bin` sealed as the object `config` of an encrypted repository (`sealed-config.bin`,
/// format 1.2), with the salt of its one segment 0x33 × 24.
pub fn sealed_config() -> Vec<u8> {
    let keys = tidemark_format::seal::DataKeys::derive(&master_key());
    tidemark_format::seal::seal_with(&keys, "config", &config().encode(), |s| {
        *s = [0x33; tidemark_format::seal::SALT_LEN]
    })
}

/// Every vector file name and its bytes, in the order the README lists them.
pub fn all() -> Vec<(&'static str, Vec<u8>)> {
    let seg = wal_segment_data();
    vec![
        ("config.bin", config().encode()),
        ("chunk.bin", chunk_frame()),
        ("pack.bin", pack().1),
        ("pack-index.bin", pack_index().0),
        ("manifest.bin", manifest().encode()),
        (
            "wal-segment.bin",
            wal::encode(wal_segment_name(), &seg, LEVEL),
        ),
        (
            "wal-history.bin",
            wal::encode(wal_history_name(), HISTORY_TEXT, LEVEL),
        ),
        ("wal-long-page-header.bin", seg[..40].to_vec()),
        ("lease.bin", lease().encode()),
        ("gc-state.bin", gc_state().encode()),
        ("cluster.bin", cluster().encode()),
        ("keyring.bin", keyring_entry().encode()),
        ("sealed-config.bin", sealed_config()),
    ]
}
