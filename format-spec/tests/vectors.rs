//! Over 500 lines because each golden vector is checked field by field.
//!
//! Golden vectors: every file in `format-spec/vectors/` decodes to the values documented in
//! `vectors/README.md`, and encoding the decoded value gives the file back byte for byte. The
//! files of `vectors/v1.3/` (format 1.3, before frames of several chunks) are kept as they were
//! and must still decode and re-encode as 1.3.
//!
//! Objects that contain zstd frames (chunk, pack, WAL objects) are re-encoded twice: once from the
//! frames as stored (pins the format) and once by compressing again at level 3 (pins the output of
//! zstd 1.5.x; if a zstd upgrade changes that output, only the `recompress` assertions fail and the
//! old files must still decode).

mod golden;

use std::path::PathBuf;
use tidemark_format::config::RepoConfig;
use tidemark_format::lock::{GcState, Lease, LeaseKind};
use tidemark_format::manifest::{
    ChunkRef, EntryKind, HeadKind, Manifest, ManifestHeader, ManifestIndex, ManifestWriter,
};
use tidemark_format::pack::{self, PackBuilder};
use tidemark_format::seal::ChunkIds;
use tidemark_format::wal::{self, WalDigest, WalFileName};
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
const PACK_ID: &str = "69b69f898760779ebb1a1edf9f79f6338f67cedc26b2306bbccd001bf2703110";

/// (chunk id, offset, clen, ulen, skip) of the four chunks of `pack.bin`: A and B share the
/// first frame (B starts 8192 bytes into it), C and D have a frame each.
const PACK_ENTRIES: [(&str, u64, u32, u32, u32); 4] = [
    (CHUNK_A, 8, 303, 8192, 0),
    (CHUNK_B, 8, 303, 8192, 8192),
    (CHUNK_C, 311, 109, 100, 0),
    (CHUNK_D, 420, 12, 3, 0),
];
/// Where the index of `pack.bin` starts (the end of its blobs).
const PACK_INDEX_START: u64 = 432;

/// The format 1.3 vectors of `vectors/v1.3/` (read compatibility): the pack id of
/// `v1.3/pack.bin`, its (chunk id, offset, clen, ulen) entries, one frame per chunk, and where
/// its index starts.
const V13_PACK_ID: &str = "ece3d5ee5a527be2eb9dc19ec95f2179541181985d8aeee98f53b5d700c62e3f";
const V13_PACK_ENTRIES: [(&str, u64, u32, u32); 4] = [
    (CHUNK_A, 8, 295, 8192),
    (CHUNK_B, 303, 19, 8192),
    (CHUNK_C, 322, 109, 100),
    (CHUNK_D, 431, 12, 3),
];
const V13_PACK_INDEX_START: u64 = 443;

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

/// The frame of the pack `pack_bytes` that `e` (or a chunk reference) names.
fn frame_at(pack_bytes: &[u8], offset: u64, clen: u32) -> &[u8] {
    &pack_bytes[offset as usize..(offset + clen as u64) as usize]
}

/// Rebuilds a file from its chunk references into `pack_bytes`, decoding each run of
/// references that follow each other in one frame with one `decode_run` (as a restore does).
/// Returns the bytes and the number of frames decoded.
fn rebuild(pack_bytes: &[u8], chunks: &[ChunkRef]) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut frames = 0;
    let mut i = 0;
    while i < chunks.len() {
        let c = chunks[i];
        let mut run = vec![(c.id, c.skip, c.ulen)];
        let mut end = c.skip + c.ulen;
        i += 1;
        while let Some(n) = chunks.get(i) {
            if (n.pack, n.offset, n.clen) != (c.pack, c.offset, c.clen) || n.skip != end {
                break;
            }
            run.push((n.id, n.skip, n.ulen));
            end += n.ulen;
            i += 1;
        }
        chunk::decode_run(
            &ChunkIds::Sha256,
            frame_at(pack_bytes, c.offset, c.clen),
            &run,
            &mut out,
        )
        .expect("referenced chunks decode");
        frames += 1;
    }
    (out, frames)
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
        format!("packs/69/{PACK_ID}")
    );
    // Header: major 2 (format 1.4, frames of several chunks), minor 0.
    assert_eq!(&bytes[..8], b"TMPK\x02\x00\x00\x00");
    let entries = pack::decode(&bytes).expect("pack.bin decodes");
    let got: Vec<(String, u64, u32, u32, u32)> = entries
        .iter()
        .map(|e| (e.id.to_string(), e.offset, e.clen, e.ulen, e.skip))
        .collect();
    let want: Vec<(String, u64, u32, u32, u32)> = PACK_ENTRIES
        .iter()
        .map(|&(i, o, c, u, k)| (i.to_string(), o, c, u, k))
        .collect();
    assert_eq!(got, want);

    // Frame by frame: the entries of one frame share (offset, clen), the frame's content size is
    // exactly its chunks back to back, it decodes once into them, and each chunk also decodes
    // alone at its skip.
    let ids = ChunkIds::Sha256;
    let mut as_stored = PackBuilder::new();
    let mut recompressed = PackBuilder::new();
    let mut at = 0;
    for chunks in golden::pack_frames() {
        let group = &entries[at..at + chunks.len()];
        at += chunks.len();
        let (first, last) = (group[0], group[group.len() - 1]);
        assert!(group
            .iter()
            .all(|e| (e.offset, e.clen) == (first.offset, first.clen)));
        let frame = frame_at(&bytes, first.offset, first.clen);
        assert_eq!(
            chunk::frame_len("chunk", frame),
            Ok(last.skip as u64 + last.ulen as u64)
        );
        let run: Vec<(ChunkId, u32, u32)> = group.iter().map(|e| (e.id, e.skip, e.ulen)).collect();
        let mut data = Vec::new();
        chunk::decode_run(&ids, frame, &run, &mut data).expect("every frame of pack.bin decodes");
        assert_eq!(data, chunks.concat());
        for (e, original) in group.iter().zip(&chunks) {
            let mut one = Vec::new();
            chunk::decode_run(&ids, frame, &[(e.id, e.skip, e.ulen)], &mut one)
                .expect("every chunk decodes alone");
            assert_eq!(&one, original);
        }
        let pairs: Vec<(ChunkId, u32)> = group.iter().map(|e| (e.id, e.ulen)).collect();
        assert_eq!(as_stored.push_frame(frame, &pairs), group);
        recompressed.push_frame(&chunk::compress(&data, 3), &pairs);
    }
    assert_eq!(at, entries.len());
    let (pid, again) = as_stored.finish();
    assert_eq!(again, bytes);
    assert_eq!(pid, PackId::of(&bytes));
    // recompress: pins zstd 1.5.x level-3 output.
    assert_eq!(recompressed.finish().1, bytes);

    // In the shared frame, chunk A is the first 8192 bytes (what `chunk::decode`, skip 0,
    // reads) and chunk B is not: it starts at skip 8192.
    let ab = frame_at(&bytes, 8, 303);
    assert_eq!(
        chunk::decode(&id(CHUNK_A), ab, 8192).as_ref(),
        Ok(&golden::chunk_a())
    );
    assert!(matches!(
        chunk::decode(&id(CHUNK_B), ab, 8192),
        Err(FormatError::ChecksumMismatch { .. })
    ));
    // A chunk that would end past the frame's content size, or a run with a gap, is refused.
    let mut out = Vec::new();
    assert!(chunk::decode_run(&ids, ab, &[(id(CHUNK_B), 8192, 8193)], &mut out).is_err());
    assert!(chunk::decode_run(
        &ids,
        ab,
        &[(id(CHUNK_A), 0, 8192), (id(CHUNK_B), 8193, 8191)],
        &mut out
    )
    .is_err());
    assert!(out.is_empty());

    // Footer: index length, then "TMPE"; the index is what pack-index.bin holds.
    let n = bytes.len();
    assert_eq!(&bytes[n - 4..], b"TMPE");
    assert_eq!(
        u32::from_le_bytes(bytes[n - 8..n - 4].try_into().expect("4 bytes")),
        216
    );
    assert_eq!(
        &bytes[PACK_INDEX_START as usize..n - 8],
        &vector("pack-index.bin")[..]
    );
    // The same bytes with major 1 in the header are refused: a pack of format 1.3 has one frame
    // per chunk and never a TMPF index.
    let mut major1 = bytes.clone();
    major1[4] = 1;
    assert!(pack::decode(&major1).is_err());
}

fn id_pack(hex: &str) -> PackId {
    hex.parse().expect("test literal is a valid pack id")
}

#[test]
fn pack_index_vector() {
    let bytes = vector("pack-index.bin");
    // Magic TMPF, count 4, 52-byte entries.
    assert_eq!(&bytes[..8], b"TMPF\x04\x00\x00\x00");
    assert_eq!(bytes.len(), 8 + 52 * 4);
    let entries = pack::decode_index(&bytes, PACK_INDEX_START).expect("pack-index.bin decodes");
    assert_eq!(entries.len(), 4);
    for (e, &(i, o, c, u, k)) in entries.iter().zip(&PACK_ENTRIES) {
        assert_eq!(
            (e.id, e.offset, e.clen, e.ulen, e.skip),
            (id(i), o, c, u, k)
        );
    }
    assert_eq!(pack::encode_index(&entries), bytes);
    assert_eq!(pack::encode_index_as(&entries, true), bytes);
    // Entry 1 (chunk B) at byte 8 + 52: offset 8, clen 303, ulen 8192, skip 8192.
    assert_eq!(
        &bytes[60 + 32..60 + 52],
        &[8, 0, 0, 0, 0, 0, 0, 0, 0x2f, 1, 0, 0, 0, 0x20, 0, 0, 0, 0x20, 0, 0]
    );
    // The index only fits a pack whose blobs end exactly where the last frame ends.
    assert!(pack::decode_index(&bytes, PACK_INDEX_START + 1).is_err());
    assert!(pack::decode_index(&bytes, PACK_INDEX_START - 1).is_err());
    // Tiling with frames (FORMAT.md 8.3.1): an entry continues the previous entry's frame at
    // skip = previous skip + previous ulen, or starts the next frame at skip 0.
    let bad = |f: &dyn Fn(&mut Vec<pack::PackEntry>)| {
        let mut es = entries.clone();
        f(&mut es);
        pack::decode_index(&pack::encode_index(&es), PACK_INDEX_START)
    };
    assert!(bad(&|es| es[1].skip = 0).is_err(), "B repeats A's start");
    assert!(bad(&|es| es[1].skip = 8191).is_err(), "B overlaps A");
    assert!(bad(&|es| es[1].skip = 8193).is_err(), "gap between A and B");
    assert!(
        bad(&|es| es[0].skip = 1).is_err(),
        "first entry not at skip 0"
    );
    assert!(bad(&|es| es[2].skip = 100).is_err(), "C continues no frame");
    assert!(bad(&|es| es[1].clen = 302).is_err(), "B in another frame");
    assert!(
        bad(&|es| es[1].ulen = (1 << 20) - 8191).is_err(),
        "past 1 MiB"
    );
    assert!(bad(&|_| ()).is_ok());
    // A 1.3 index (TMPX) cannot hold the shared frame: the encoder refuses B's skip, and with
    // the skips cleared B reads as repeating A, which the decoder refuses.
    let cleared: Vec<_> = entries
        .iter()
        .map(|e| pack::PackEntry { skip: 0, ..*e })
        .collect();
    let tmpx = pack::encode_index_as(&cleared, false);
    assert_eq!(&tmpx[..4], b"TMPX");
    assert!(pack::decode_index(&tmpx, PACK_INDEX_START).is_err());
    assert!(std::panic::catch_unwind(|| pack::encode_index_as(&entries, false)).is_err());
}

#[test]
fn manifest_vector() {
    let bytes = vector("manifest.bin");
    // Major 3: a whole manifest whose chunk references carry a skip (format 1.4).
    assert_eq!(&bytes[..8], b"TMMF\x03\x00\x00\x00");
    assert_eq!(bytes.len(), 1061);
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
        (24679, 4, 1, 16487, 656, 2)
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
            // (id, pack, offset, clen, ulen, skip): A and B in the shared frame, A again, C.
            let refs: Vec<(ChunkId, u32, u64, u32, u32, u32)> = f
                .chunks
                .iter()
                .map(|c| (c.id, c.pack, c.offset, c.clen, c.ulen, c.skip))
                .collect();
            assert_eq!(
                refs,
                [
                    (id(CHUNK_A), 0, 8, 303, 8192, 0),
                    (id(CHUNK_B), 0, 8, 303, 8192, 8192),
                    (id(CHUNK_A), 0, 8, 303, 8192, 0),
                    (id(CHUNK_C), 0, 311, 109, 100, 0),
                ]
            );
        }
        other => panic!("base/1/16384 is {other:?}"),
    }
    match &m.entries[4].kind {
        EntryKind::File(f) => assert_eq!((f.size, f.chunks.len()), (0, 0)),
        other => panic!("base/1/16390 is {other:?}"),
    }
    assert_eq!(m.entries[6].kind, EntryKind::Symlink(b"/mnt/ts1".to_vec()));

    // Every chunk reference is an entry of pack.bin's index, skip included, and the files
    // rebuild to their sha256; base/1/16384 decodes three frames: A and B at once, A, C.
    let pack_bytes = vector("pack.bin");
    let index = pack::decode(&pack_bytes).expect("pack.bin decodes");
    for e in &m.entries {
        if let EntryKind::File(f) = &e.kind {
            for c in &f.chunks {
                assert!(
                    index
                        .iter()
                        .any(|x| (x.id, x.offset, x.clen, x.ulen, x.skip)
                            == (c.id, c.offset, c.clen, c.ulen, c.skip)),
                    "{}: {c:?}",
                    e.path
                );
            }
            let (data, frames) = rebuild(&pack_bytes, &f.chunks);
            assert_eq!(data.len() as u64, f.size, "{}", e.path);
            assert_eq!(ChunkId::of(&data), f.sha256, "{}", e.path);
            if e.path == "base/1/16384" {
                assert_eq!(frames, 3);
                // Its chunk-list hash (format 1.5, vectors/README.md): the SHA-256 of the ids
                // of A, B, A, C, concatenated.
                let ids: Vec<u8> = f.chunks.iter().flat_map(|c| c.id.0).collect();
                assert_eq!(f.chunk_list_hash(), ChunkId::of(&ids));
                assert_eq!(
                    f.chunk_list_hash().to_string(),
                    "ed752dd73b79aa8f49b10b4775a7dc1a9193e5a74da8350742f4864913db8456"
                );
            }
            if f.chunks.is_empty() {
                assert_eq!(f.chunk_list_hash(), f.sha256, "{}: empty", e.path);
            }
        }
    }

    // 56-byte chunk references: the skip is the last 4 bytes of each.
    let mi = ManifestIndex::read(&bytes[..]).expect("manifest.bin reads as an index");
    let at = mi.find("base/1/16384").expect("entry");
    let HeadKind::File(f) = &mi.entries[at].kind else {
        panic!("base/1/16384 is a file")
    };
    assert!(f.frames);
    assert_eq!(f.ref_len(), 56);
    let b_ref = (f.chunks_at + 56) as usize;
    assert_eq!(&bytes[b_ref..b_ref + 32], id(CHUNK_B).as_bytes());
    assert_eq!(&bytes[b_ref + 52..b_ref + 56], &8192u32.to_le_bytes());

    assert_eq!(m.encode(), bytes);
    assert_eq!(golden::encode_as(&m, 3), bytes);
    // A manifest of major 1 cannot hold the reference to chunk B (skip 8192).
    let mut w = ManifestWriter::with_major(Vec::new(), &m.header, &m.packs, 8, 1)
        .expect("writing to a Vec");
    let refused = m.entries.iter().try_for_each(|e| w.entry(e));
    assert!(refused.is_err());
    // The trailer is the sha256 of bytes 0..1029.
    assert_eq!(&bytes[1029..], ChunkId::of(&bytes[..1029]).as_bytes());
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

/// The format 1.3 vectors (`vectors/v1.3/`, the files of `pack.bin`, `pack-index.bin` and
/// `manifest.bin` before format 1.4) still decode, with skip 0 everywhere, and re-encode as 1.3
/// byte for byte.
#[test]
fn v13_pack_vector_still_decodes() {
    let bytes = vector("v1.3/pack.bin");
    assert_eq!(PackId::of(&bytes), id_pack(V13_PACK_ID));
    assert_eq!(bytes.len(), 651);
    assert_eq!(&bytes[..8], b"TMPK\x01\x00\x00\x00");
    let entries = pack::decode(&bytes).expect("v1.3/pack.bin decodes");
    let got: Vec<(ChunkId, u64, u32, u32, u32)> = entries
        .iter()
        .map(|e| (e.id, e.offset, e.clen, e.ulen, e.skip))
        .collect();
    let want: Vec<(ChunkId, u64, u32, u32, u32)> = V13_PACK_ENTRIES
        .iter()
        .map(|&(i, o, c, u)| (id(i), o, c, u, 0))
        .collect();
    assert_eq!(got, want);
    let originals = [
        golden::chunk_a(),
        golden::chunk_b(),
        golden::chunk_c(),
        golden::chunk_d(),
    ];
    let mut as_1_4 = PackBuilder::new();
    for (e, original) in entries.iter().zip(&originals) {
        let frame = frame_at(&bytes, e.offset, e.clen);
        // One frame per chunk: the content size is the chunk's ulen.
        assert_eq!(chunk::frame_len("chunk", frame), Ok(e.ulen as u64));
        let data = chunk::decode(&e.id, frame, e.ulen).expect("every chunk decodes");
        assert_eq!(&data, original);
        as_1_4.push(e.id, frame, e.ulen);
    }
    // Re-encoded as 1.3: the header and frames as stored, the index without skips (TMPX), the
    // footer.
    let n = bytes.len();
    let index = pack::encode_index_as(&entries, false);
    assert_eq!(&bytes[V13_PACK_INDEX_START as usize..n - 8], &index[..]);
    assert_eq!(index, vector("v1.3/pack-index.bin"));
    assert_eq!(&bytes[n - 8..n - 4], &(index.len() as u32).to_le_bytes());
    assert_eq!(&bytes[n - 4..], b"TMPE");
    // recompress: pins zstd 1.5.x level-3 output.
    assert_eq!(golden::pack_v13().1, bytes);
    // Its first frame is chunk.bin.
    assert_eq!(&bytes[8..303], &vector("chunk.bin")[..]);
    // The same frames written by a 1.4 writer: major 2 and a TMPF index (4 bytes more per
    // entry), the same entries.
    let (_, again) = as_1_4.finish();
    assert_eq!(&again[..8], b"TMPK\x02\x00\x00\x00");
    assert_eq!(again.len(), n + 4 * 4);
    assert_eq!(
        &again[8..V13_PACK_INDEX_START as usize],
        &bytes[8..V13_PACK_INDEX_START as usize]
    );
    assert_eq!(pack::decode(&again).as_ref(), Ok(&entries));
}

#[test]
fn v13_pack_index_vector_still_decodes() {
    let bytes = vector("v1.3/pack-index.bin");
    assert_eq!(&bytes[..8], b"TMPX\x04\x00\x00\x00");
    assert_eq!(bytes.len(), 8 + 48 * 4);
    let entries =
        pack::decode_index(&bytes, V13_PACK_INDEX_START).expect("v1.3/pack-index.bin decodes");
    for (e, &(i, o, c, u)) in entries.iter().zip(&V13_PACK_ENTRIES) {
        assert_eq!(
            (e.id, e.offset, e.clen, e.ulen, e.skip),
            (id(i), o, c, u, 0)
        );
    }
    assert_eq!(entries.len(), 4);
    assert_eq!(pack::encode_index_as(&entries, false), bytes);
    assert_eq!(golden::pack_index_v13(), (bytes, V13_PACK_INDEX_START));
    // As 1.4 (TMPF) the same entries take 52 bytes each and decode the same.
    let tmpf = pack::encode_index(&entries);
    assert_eq!(tmpf.len(), 8 + 52 * 4);
    assert_eq!(
        pack::decode_index(&tmpf, V13_PACK_INDEX_START).as_ref(),
        Ok(&entries)
    );
}

#[test]
fn v13_manifest_vector_still_decodes() {
    let bytes = vector("v1.3/manifest.bin");
    assert_eq!(bytes.len(), 1041);
    assert_eq!(&bytes[..8], b"TMMF\x01\x00\x00\x00");
    let m = Manifest::decode(&bytes).expect("v1.3/manifest.bin decodes");
    assert_eq!(m, golden::manifest_v13());
    assert_eq!(m.packs, vec![id_pack(V13_PACK_ID)]);
    assert_eq!(m.header.stats.new_stored_bytes, 651);
    let pack_bytes = vector("v1.3/pack.bin");
    let index = pack::decode(&pack_bytes).expect("v1.3/pack.bin decodes");
    let mut nrefs = 0;
    for e in &m.entries {
        if let EntryKind::File(f) = &e.kind {
            for c in &f.chunks {
                assert_eq!(c.skip, 0, "{}", e.path);
                assert!(index
                    .iter()
                    .any(|x| (x.id, x.offset, x.clen, x.ulen, x.skip)
                        == (c.id, c.offset, c.clen, c.ulen, 0)));
                nrefs += 1;
            }
            let (data, frames) = rebuild(&pack_bytes, &f.chunks);
            assert_eq!(frames, f.chunks.len(), "one frame per chunk");
            assert_eq!(data.len() as u64, f.size, "{}", e.path);
            assert_eq!(ChunkId::of(&data), f.sha256, "{}", e.path);
        }
    }
    assert_eq!(nrefs, 5);
    // 52-byte chunk references.
    let mi = ManifestIndex::read(&bytes[..]).expect("v1.3/manifest.bin reads as an index");
    let HeadKind::File(f) = &mi.entries[mi.find("base/1/16384").expect("entry")].kind else {
        panic!("base/1/16384 is a file")
    };
    assert!(!f.frames);
    assert_eq!(f.ref_len(), 52);
    // Re-encoded as major 1: byte for byte.
    assert_eq!(golden::encode_as(&m, 1), bytes);
    assert_eq!(golden::manifest_v13_bytes(), bytes);
    // A 1.4 writer writes the same manifest as major 3, 4 bytes more per chunk reference.
    let again = m.encode();
    assert_eq!(&again[..8], b"TMMF\x03\x00\x00\x00");
    assert_eq!(again.len(), bytes.len() + 4 * nrefs);
    assert_eq!(Manifest::decode(&again).as_ref(), Ok(&m));
    assert_eq!(
        ManifestHeader::decode_prefix(&bytes[..403]),
        Ok(m.header.clone())
    );
    // The same backup as manifest.bin: only where the chunks are stored differs.
    let new = Manifest::decode(&vector("manifest.bin")).expect("manifest.bin decodes");
    let mut h = new.header.clone();
    h.stats.new_stored_bytes = 651;
    assert_eq!(h, m.header);
    assert_eq!(new.entries.len(), m.entries.len());
    for (a, b) in new.entries.iter().zip(&m.entries) {
        assert_eq!((&a.path, a.mode), (&b.path, b.mode));
        match (&a.kind, &b.kind) {
            (EntryKind::File(fa), EntryKind::File(fb)) => {
                assert_eq!((fa.size, fa.sha256), (fb.size, fb.sha256));
                let ids = |f: &tidemark_format::manifest::FileEntry| {
                    f.chunks.iter().map(|c| c.id).collect::<Vec<_>>()
                };
                assert_eq!(ids(fa), ids(fb));
            }
            (ka, kb) => assert_eq!(ka, kb),
        }
    }
}

#[test]
fn wal_segment_vector() {
    let bytes = vector("wal-segment.bin");
    let (h, at) = wal::decode_header(&bytes).expect("wal-segment.bin header decodes");
    assert_eq!(at, 77);
    assert_eq!(h.name.to_string(), "000000010000000000000020");
    assert_eq!(h.size, 1 << 20);
    assert_eq!(&bytes[4..8], &[2, 0, 0, 0], "major 2: a BLAKE3 digest");
    assert_eq!(
        h.digest,
        WalDigest::Blake3(id(
            "1c4ee6dc7f93548479683e05382634d7f66fad170e907ed90fce22bd4e2dc789"
        ))
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
    assert_eq!(
        h.digest,
        WalDigest::Blake3(id(
            "9a359ccbe6ddf6211ac60e3be67c861adc26e5562a6ec9e482ba15a30492192e"
        ))
    );
    assert_eq!(wal::encode(h.name, &data, 3), bytes);
}

/// The WAL objects of format 1.5 (`vectors/v1.5/`, major 1: the SHA-256 of the file): every
/// reader decodes them to the same files as the current vectors, and a header of that digest
/// re-encodes them byte for byte.
#[test]
fn v15_wal_vectors() {
    for (old, new, sha) in [
        (
            "v1.5/wal-segment.bin",
            "wal-segment.bin",
            "2a15703b70ce0c84243d512f58ce471c44ed55c67f2c14e21f1113161e37ff20",
        ),
        (
            "v1.5/wal-history.bin",
            "wal-history.bin",
            "d017a674560525f41c79ad1477c012d1914e3ee75318367d95ff0f6ac10ff554",
        ),
    ] {
        let bytes = vector(old);
        assert_eq!(&bytes[4..8], &[1, 0, 0, 0], "{old}");
        let (h, data) = wal::decode(&bytes).expect("a format 1.5 wal object decodes");
        assert_eq!(h.digest, WalDigest::Sha256(id(sha)), "{old}");
        let (h2, data2) = wal::decode(&vector(new)).expect("vector decodes");
        assert_eq!((h.name, h.size, &data), (h2.name, h2.size, &data2), "{old}");
        let (_, at) = wal::decode_header(&bytes).expect("header");
        assert_eq!(wal::encode_with_frame(&h, &bytes[at..]), bytes, "{old}");
    }
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
