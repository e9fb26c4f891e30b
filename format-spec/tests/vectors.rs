//! Over 500 lines because each golden vector is checked field by field.
//!
//! Golden vectors: every file in `format-spec/vectors/` decodes to the values documented in
//! `vectors/README.md`, and encoding the decoded value gives the file back byte for byte.
//!
//! Objects that contain zstd frames (chunk, pack, WAL objects) are re-encoded twice: once from the
//! frames as stored (pins the format) and once by compressing again at level 3 (pins the output of
//! zstd 1.5.x; if a zstd upgrade changes that output, only the `recompress` assertions fail and the
//! old files must still decode).

mod golden;

use std::path::PathBuf;
use tidemark_format::config::RepoConfig;
use tidemark_format::lock::{GcState, Lease, LeaseKind};
use tidemark_format::manifest::{EntryKind, Manifest, ManifestHeader};
use tidemark_format::pack::{self, PackBuilder};
use tidemark_format::wal::{self, WalFileName};
use tidemark_format::{chunk, keys, ChunkId, FormatError, Lsn, PackId, SystemId, TimelineId};

fn vector(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("vectors")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn id(hex: &str) -> ChunkId {
    hex.parse().expect("test literal is a valid id")
}

const CHUNK_A: &str = "50170d2f41778223bffc960e70ae774f3cc30d9236bd3c6d3a92c55b7d1355e3";
const CHUNK_B: &str = "9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47";
const CHUNK_C: &str = "6ae2ff20da3650086fd154899775a27c61083b8634c6c5b4d89c13cba35b2bd1";
const CHUNK_D: &str = "238903180cc104ec2c5d8b3f20c5bc61b389ec0a967df8cc208cdc7cd454174f";
/// HMAC-SHA256 of chunk A under the chunk id key of the encrypted vectors (computed with Python's
/// hmac module from the definitions in FORMAT.md 17.2).
const KEYED_CHUNK_A: &str = "0509572c1463a9a3a71372fc3262c564c7a7654be1a3813c4dac320a8a4585d5";
const PACK_ID: &str = "ece3d5ee5a527be2eb9dc19ec95f2179541181985d8aeee98f53b5d700c62e3f";

/// (chunk id, offset, clen, ulen) of the four chunks of `pack.bin`.
const PACK_ENTRIES: [(&str, u64, u32, u32); 4] = [
    (CHUNK_A, 8, 295, 8192),
    (CHUNK_B, 303, 19, 8192),
    (CHUNK_C, 322, 109, 100),
    (CHUNK_D, 431, 12, 3),
];
/// Where the index of `pack.bin` starts (the end of its blobs).
const PACK_INDEX_START: u64 = 443;

#[test]
fn files_match_their_generator() {
    for (name, bytes) in golden::all() {
        assert!(
            vector(name) == bytes,
            "vectors/{name} differs from what examples/gen_vectors.rs builds; if the format \
             changed on purpose, change FORMAT.md, regenerate and review the diff"
        );
    }
}

#[test]
fn config_vector() {
    let bytes = vector("config.bin");
    // Fully pinned: the config holds no zstd output, so every byte is fixed by FORMAT.md.
    assert_eq!(
        hex::encode(&bytes),
        "544d43460100000001005aac52cf4e6500200000000000020100041341335f06\
         00a248275ca7b99bf27479e97cbc65a1f2b39874abd804b5515eff1fc9386e9e22"
    );
    let cfg = RepoConfig::decode(&bytes).expect("config.bin decodes");
    assert_eq!(cfg.system_id, SystemId(7_300_000_000_000_000_001));
    assert_eq!(cfg.chunk_size, 8192);
    assert_eq!(cfg.pack_target, 33_554_432);
    assert_eq!(cfg.compression, 1);
    assert_eq!(cfg.created_us, 1_793_523_600_000_000);
    assert_eq!(cfg.encode(), bytes);
}

#[test]
fn keyring_and_sealed_config_vectors() {
    use tidemark_format::keyring::KeyringEntry;
    use tidemark_format::seal;
    let entry = vector("keyring.bin");
    assert_eq!(entry.len(), tidemark_format::keyring::SIZE);
    assert_eq!(&entry[..8], b"TMKR\x01\x00\x02\x00");
    let e = KeyringEntry::decode(&entry).expect("keyring.bin decodes");
    assert_eq!(e.key_id, [0x11; 16]);
    assert_eq!(e.salt, [0x22; 16]);
    assert_eq!(e.iterations, 10_000);
    assert_eq!(e.created_us, 1_793_523_600_000_000);
    assert_eq!(e.encode(), entry);
    let master = e
        .unwrap_master(golden::USER_KEY)
        .expect("the vector user key opens it");
    assert_eq!(master, golden::master_key());
    assert_eq!(e.unwrap_master(b"another key of enough length"), None);

    let sealed = vector("sealed-config.bin");
    // 8 header + 24 salt + 65 config + 16 tag.
    assert_eq!(sealed.len(), 113);
    assert_eq!(&sealed[..8], b"TMEN\x01\x00\x02\x00");
    assert_eq!(&sealed[8..32], &[0x33; 24]);
    let keys = seal::DataKeys::derive(&master);
    let plain = seal::open(&keys, "config", &sealed).expect("sealed-config.bin opens");
    assert_eq!(plain, vector("config.bin"));
    assert!(
        seal::open(&keys, "systems/1/config", &sealed).is_err(),
        "bound to its key"
    );
    assert_eq!(golden::sealed_config(), sealed);
    // Keyed chunk id of chunk A in this repository (HMAC-SHA256 with the chunk id key).
    assert_eq!(
        keys.chunk_ids().id(&golden::chunk_a()).to_string(),
        KEYED_CHUNK_A
    );
}

#[test]
fn cluster_vector() {
    let bytes = vector("cluster.bin");
    // Fully pinned; minor version 1: cluster records came with format 1.1.
    assert_eq!(
        hex::encode(&bytes),
        "544d434c0100010001005aac52cf4e650f0000000004134133\
         5f06004c03db624e0e74af3be61ff7e62e4fd256dda504188f8634b8ea4afc6cf678ac"
    );
    let rec = tidemark_format::cluster::ClusterRecord::decode(&bytes).expect("cluster.bin decodes");
    assert_eq!(rec.system_id, SystemId(7_300_000_000_000_000_001));
    assert_eq!(rec.pg_major, 15);
    assert_eq!(rec.created_us, 1_793_523_600_000_000);
    assert_eq!(rec.encode(), bytes);
    assert_eq!(rec.key(), "clusters/7300000000000000001");
    assert_eq!(
        tidemark_format::keys::parse_cluster(&rec.key()),
        Some(rec.system_id)
    );
    assert_eq!(
        tidemark_format::keys::system_prefix(rec.system_id),
        "systems/7300000000000000001/"
    );
}

#[test]
fn chunk_vector() {
    let frame = vector("chunk.bin");
    assert_eq!(frame[..4], [0x28, 0xb5, 0x2f, 0xfd], "zstd frame magic");
    let data = chunk::decode(&id(CHUNK_A), &frame, 8192).expect("chunk.bin decodes");
    assert_eq!(ChunkId::of(&data), id(CHUNK_A));
    assert_eq!(data, golden::chunk_a());
    // recompress: pins zstd 1.5.x level-3 output.
    assert_eq!(chunk::compress(&data, 3), frame);
    assert!(matches!(
        chunk::decode(&id(CHUNK_B), &frame, 8192),
        Err(FormatError::ChecksumMismatch { .. })
    ));
}

#[test]
fn pack_vector() {
    let bytes = vector("pack.bin");
    assert_eq!(
        PackId::of(&bytes),
        id_pack(PACK_ID),
        "pack id = sha256(pack)"
    );
    assert_eq!(
        keys::pack(&PackId::of(&bytes)),
        format!("packs/ec/{PACK_ID}")
    );
    let entries = pack::decode(&bytes).expect("pack.bin decodes");
    let got: Vec<(String, u64, u32, u32)> = entries
        .iter()
        .map(|e| (e.id.to_string(), e.offset, e.clen, e.ulen))
        .collect();
    let want: Vec<(String, u64, u32, u32)> = PACK_ENTRIES
        .iter()
        .map(|&(i, o, c, u)| (i.to_string(), o, c, u))
        .collect();
    assert_eq!(got, want);

    let originals = [
        golden::chunk_a(),
        golden::chunk_b(),
        golden::chunk_c(),
        golden::chunk_d(),
    ];
    let mut as_stored = PackBuilder::new();
    let mut recompressed = PackBuilder::new();
    for (e, original) in entries.iter().zip(&originals) {
        let frame = &bytes[e.offset as usize..(e.offset + e.clen as u64) as usize];
        let data = chunk::decode(&e.id, frame, e.ulen).expect("every chunk of pack.bin decodes");
        assert_eq!(&data, original);
        as_stored.push(e.id, frame, e.ulen);
        recompressed.push(e.id, &chunk::compress(&data, 3), e.ulen);
    }
    let (pid, again) = as_stored.finish();
    assert_eq!(again, bytes);
    assert_eq!(pid, PackId::of(&bytes));
    // recompress: pins zstd 1.5.x level-3 output.
    assert_eq!(recompressed.finish().1, bytes);

    // Footer: index length, then "TMPE"; the index is what pack-index.bin holds.
    let n = bytes.len();
    assert_eq!(&bytes[n - 4..], b"TMPE");
    assert_eq!(
        u32::from_le_bytes(bytes[n - 8..n - 4].try_into().expect("4 bytes")),
        200
    );
    assert_eq!(
        &bytes[PACK_INDEX_START as usize..n - 8],
        &vector("pack-index.bin")[..]
    );
}

fn id_pack(hex: &str) -> PackId {
    hex.parse().expect("test literal is a valid pack id")
}

#[test]
fn pack_index_vector() {
    let bytes = vector("pack-index.bin");
    let entries = pack::decode_index(&bytes, PACK_INDEX_START).expect("pack-index.bin decodes");
    assert_eq!(entries.len(), 4);
    for (e, &(i, o, c, u)) in entries.iter().zip(&PACK_ENTRIES) {
        assert_eq!((e.id, e.offset, e.clen, e.ulen), (id(i), o, c, u));
    }
    assert_eq!(pack::encode_index(&entries), bytes);
    // The index only fits a pack whose blobs end exactly where the last chunk ends.
    assert!(pack::decode_index(&bytes, PACK_INDEX_START + 1).is_err());
    assert!(pack::decode_index(&bytes, PACK_INDEX_START - 1).is_err());
}

#[test]
fn manifest_vector() {
    let bytes = vector("manifest.bin");
    let m = Manifest::decode(&bytes).expect("manifest.bin decodes");
    let h = &m.header;
    assert_eq!(h.backup_id, "20261121T204012Z");
    assert_eq!(h.system_id, SystemId(7_300_000_000_000_000_001));
    assert_eq!(h.pg_version, 150010);
    assert_eq!(h.timeline, TimelineId(1));
    assert_eq!(
        h.start_lsn,
        "0/2000028".parse::<Lsn>().expect("lsn literal")
    );
    assert_eq!(h.stop_lsn, "0/2000138".parse::<Lsn>().expect("lsn literal"));
    assert_eq!(h.start_time_us, 1_795_293_612_123_456);
    assert_eq!(h.stop_time_us, 1_795_293_717_654_321);
    assert_eq!((h.source, h.flags, h.chunk_size), (1, 0, 8192));
    assert_eq!(h.parent.as_deref(), Some("20261120T204012Z"));
    assert!(h
        .backup_label
        .starts_with(b"START WAL LOCATION: 0/2000028 (file 000000010000000000000020)\n"));
    assert_eq!(h.backup_label.len(), 225);
    assert_eq!(h.tablespace_map.as_deref(), Some(&b"16385 /mnt/ts1\n"[..]));
    let s = h.stats;
    assert_eq!(
        (
            s.logical_bytes,
            s.new_chunks,
            s.reused_chunks,
            s.new_chunk_bytes,
            s.new_stored_bytes,
            s.new_objects
        ),
        (24679, 4, 1, 16487, 651, 2)
    );
    assert_eq!(m.packs, vec![id_pack(PACK_ID)]);

    let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "PG_VERSION",
            "base",
            "base/1",
            "base/1/16384",
            "base/1/16390",
            "pg_tblspc",
            "pg_tblspc/16385",
            "pg_wal"
        ]
    );
    let modes: Vec<u32> = m.entries.iter().map(|e| e.mode).collect();
    assert_eq!(
        modes,
        [0o600, 0o700, 0o700, 0o600, 0o600, 0o700, 0o777, 0o700]
    );
    match &m.entries[3].kind {
        EntryKind::File(f) => {
            assert_eq!(f.size, 24676);
            assert_eq!(
                f.sha256,
                id("10918fa17ff92c3e9c1217758f91ba89105fc97752aee6c3aae43657e51a97ec")
            );
            let ids: Vec<ChunkId> = f.chunks.iter().map(|c| c.id).collect();
            assert_eq!(ids, [CHUNK_A, CHUNK_B, CHUNK_A, CHUNK_C].map(id));
            assert!(f.chunks.iter().all(|c| c.pack == 0));
        }
        other => panic!("base/1/16384 is {other:?}"),
    }
    match &m.entries[4].kind {
        EntryKind::File(f) => assert_eq!((f.size, f.chunks.len()), (0, 0)),
        other => panic!("base/1/16390 is {other:?}"),
    }
    assert_eq!(m.entries[6].kind, EntryKind::Symlink(b"/mnt/ts1".to_vec()));

    // Every chunk reference resolves in pack.bin, and the files rebuild to their sha256.
    let pack_bytes = vector("pack.bin");
    for e in &m.entries {
        if let EntryKind::File(f) = &e.kind {
            let mut data = Vec::new();
            for c in &f.chunks {
                let frame = &pack_bytes[c.offset as usize..(c.offset + c.clen as u64) as usize];
                data.extend(chunk::decode(&c.id, frame, c.ulen).expect("referenced chunk decodes"));
            }
            assert_eq!(data.len() as u64, f.size, "{}", e.path);
            assert_eq!(ChunkId::of(&data), f.sha256, "{}", e.path);
        }
    }

    assert_eq!(m.encode(), bytes);
    // The header ends at byte 403: a prefix of that length is enough, one byte less is not.
    assert_eq!(
        ManifestHeader::decode_prefix(&bytes[..403]).expect("403 bytes hold the header"),
        m.header
    );
    assert!(matches!(
        ManifestHeader::decode_prefix(&bytes[..402]),
        Err(FormatError::Truncated { needed: 1, .. })
    ));
    assert_eq!(
        keys::manifest(&h.backup_id),
        "backups/20261121T204012Z.manifest"
    );
}

#[test]
fn wal_segment_vector() {
    let bytes = vector("wal-segment.bin");
    let (h, at) = wal::decode_header(&bytes).expect("wal-segment.bin header decodes");
    assert_eq!(at, 77);
    assert_eq!(h.name.to_string(), "000000010000000000000020");
    assert_eq!(h.size, 1 << 20);
    assert_eq!(
        h.sha256,
        id("2a15703b70ce0c84243d512f58ce471c44ed55c67f2c14e21f1113161e37ff20")
    );
    let (h2, data) = wal::decode(&bytes).expect("wal-segment.bin decodes");
    assert_eq!(h2, h);
    assert_eq!(data, golden::wal_segment_data());
    assert_eq!(keys::wal(&h.name), "wal/00000001/000000010000000000000020");
    // The segment is the one holding the golden backup's start and stop LSNs.
    assert_eq!(
        WalFileName::segment_of(TimelineId(1), Lsn(golden::START_LSN), 1 << 20),
        h.name
    );
    let page = wal::parse_long_page_header(&data).expect("the segment starts with a long header");
    assert_eq!(page.system_id, SystemId(7_300_000_000_000_000_001));
    assert_eq!((page.seg_size, page.block_size), (1 << 20, 8192));
    assert_eq!(
        (page.timeline, page.page_addr),
        (TimelineId(1), 0x0200_0000)
    );
    // Header bytes as stored, then the frame: recompressing pins zstd 1.5.x level-3 output.
    assert_eq!(wal::encode(h.name, &data, 3), bytes);
}

#[test]
fn wal_history_vector() {
    let bytes = vector("wal-history.bin");
    let (h, data) = wal::decode(&bytes).expect("wal-history.bin decodes");
    assert_eq!(h.name, WalFileName::History { tli: 2 });
    assert_eq!(h.size, 41);
    assert_eq!(data, b"1\t0/2000138\tno recovery target specified\n");
    assert_eq!(wal::decode_header(&bytes).expect("header").1, 69);
    assert_eq!(keys::wal(&h.name), "wal/00000002/00000002.history");
    assert_eq!(wal::encode(h.name, &data, 3), bytes);
}

#[test]
fn wal_long_page_header_vector() {
    let bytes = vector("wal-long-page-header.bin");
    assert_eq!(
        hex::encode(&bytes),
        "10d1060001000000000000020000000000000000000000000100\
         5aac52cf4e650000100000200000"
    );
    let p = wal::parse_long_page_header(&bytes).expect("header decodes");
    assert_eq!(p.timeline, TimelineId(1));
    assert_eq!(p.page_addr, 0x0200_0000);
    assert_eq!(p.system_id, SystemId(7_300_000_000_000_000_001));
    assert_eq!(p.seg_size, 1 << 20);
    assert_eq!(p.block_size, 8192);
}

/// The nonce of the golden lease and GC state keys (any 32 lowercase hex digits).
const NONCE: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn lease_vector() {
    let bytes = vector("lease.bin");
    // Fully pinned: a lease holds no zstd output.
    assert_eq!(
        hex::encode(&bytes),
        "544d4c4b0100000002000c48acd460060000af29bed460060092100000090000\
         0070672d6d61696e2d3062e0a75d78257e2f024b60158f964cd8c873dcb869ac\
         6a6167c17bdea583e970"
    );
    assert_eq!(bytes.len(), 33 + 9 + 32, "33 + L + 32 with L = 9");
    let l = Lease::decode(&bytes).expect("lease.bin decodes");
    assert_eq!(l.kind, LeaseKind::Expire);
    assert_eq!(l.created_us, 1_795_316_400_000_000);
    assert_eq!(l.expires_us, 1_795_316_700_000_000);
    assert_eq!(l.expires_us - l.created_us, 300_000_000, "TTL 300 s");
    assert_eq!(l.pid, 4242);
    assert_eq!(l.host, "pg-main-0");
    assert_eq!(l.encode(), bytes);
    // Offsets of FORMAT.md 16.1.
    assert_eq!(bytes[8], 2, "kind at offset 8");
    assert_eq!(&bytes[29..33], &9u32.to_le_bytes(), "host length at 29");
    assert_eq!(&bytes[33..42], b"pg-main-0");
    assert_eq!(
        &bytes[42..],
        ChunkId::of(&bytes[..42]).as_bytes(),
        "trailer"
    );

    // Key: `locks/expire-<nonce>`; the lease decodes under an expire key only.
    let key = keys::lease(LeaseKind::Expire, NONCE).expect("valid nonce");
    assert_eq!(key, format!("locks/expire-{NONCE}"));
    assert_eq!(keys::parse_lease(&key), Some((LeaseKind::Expire, NONCE)));
    assert_eq!(Lease::decode_for_key(&key, &bytes), Ok(l));
    let backup_key = keys::lease(LeaseKind::Backup, NONCE).expect("valid nonce");
    assert_eq!(backup_key, format!("locks/backup-{NONCE}"));
    assert!(matches!(
        Lease::decode_for_key(&backup_key, &bytes),
        Err(FormatError::Invalid { .. })
    ));
    for bad in [
        format!("locks/Expire-{NONCE}"),
        format!("locks/expire-{}", NONCE.to_uppercase()),
        format!("locks/expire-{NONCE}0"),
        format!("locks/expire_{NONCE}"),
        format!("lock/expire-{NONCE}"),
        format!("locks/expire-{}", &NONCE[1..]),
        format!("gc/{NONCE}"),
    ] {
        assert_eq!(keys::parse_lease(&bad), None, "{bad}");
        assert!(Lease::decode_for_key(&bad, &bytes).is_err(), "{bad}");
    }
    assert_eq!(keys::lease(LeaseKind::Expire, &NONCE.to_uppercase()), None);
}

#[test]
fn gc_state_vector() {
    let bytes = vector("gc-state.bin");
    // Fully pinned: a GC state holds no zstd output.
    assert_eq!(
        hex::encode(&bytes),
        "544d47430100000050acb6acd460060003000000b4d51c072c945cc178fc35f6\
         f5743620d35782cefe59026c4d137d9ed4b69707f2a96410ff6953741e228921\
         c3c8e04bb26c3f52ad5f6f58831e98e8b37a4534f569553e060ca25ed649f136\
         acd8864ae110dc2c79aa4e40eac088b552b7123eecb230be705363d203d17621\
         256f457a6cc252691052e4b688161151ecdf9745"
    );
    assert_eq!(bytes.len(), 20 + 32 * 3 + 32);
    let s = GcState::decode(&bytes).expect("gc-state.bin decodes");
    assert_eq!(s.condemned_us, 1_795_316_407_250_000);
    // sha256 of "orphan-1", "orphan-3", "orphan-2": sorted, so creation order is not kept.
    assert_eq!(
        s.packs,
        [
            "b4d51c072c945cc178fc35f6f5743620d35782cefe59026c4d137d9ed4b69707",
            "f2a96410ff6953741e228921c3c8e04bb26c3f52ad5f6f58831e98e8b37a4534",
            "f569553e060ca25ed649f136acd8864ae110dc2c79aa4e40eac088b552b7123e",
        ]
        .map(id_pack)
    );
    assert_eq!(s.packs[0], PackId::of(b"orphan-1"));
    assert_eq!(s.packs[1], PackId::of(b"orphan-3"));
    assert_eq!(s.packs[2], PackId::of(b"orphan-2"));
    assert_eq!(s.encode(), bytes);
    // Offsets of FORMAT.md 16.2.
    assert_eq!(&bytes[16..20], &3u32.to_le_bytes(), "count at 16");
    assert_eq!(&bytes[20..52], s.packs[0].as_bytes());
    assert_eq!(
        &bytes[116..],
        ChunkId::of(&bytes[..116]).as_bytes(),
        "trailer"
    );

    // Key: `gc/<nonce>`.
    let key = keys::gc_state(NONCE).expect("valid nonce");
    assert_eq!(key, format!("gc/{NONCE}"));
    assert_eq!(keys::parse_gc_state(&key), Some(NONCE));
    for bad in [
        format!("gc/{}", NONCE.to_uppercase()),
        format!("gc/{NONCE}/x"),
        format!("gc/{}", &NONCE[1..]),
        format!("gc/x{}", &NONCE[1..]),
        format!("locks/expire-{NONCE}"),
        "gc/".to_string(),
    ] {
        assert_eq!(keys::parse_gc_state(&bad), None, "{bad}");
    }
    assert_eq!(keys::gc_state("short"), None);

    // A lease is not a GC state and the other way round (different magic).
    assert!(matches!(
        GcState::decode(&vector("lease.bin")),
        Err(FormatError::BadMagic { .. })
    ));
    assert!(matches!(
        Lease::decode(&bytes),
        Err(FormatError::BadMagic { .. })
    ));
}
