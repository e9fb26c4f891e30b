//! Hostile input: every truncation and many corruptions of every golden vector are refused with
//! a typed error (never a panic), and regression cases for decoder bugs found by fuzzing and by
//! the round-trip tests.

use std::path::PathBuf;
use tidemark_format::codec::Writer;
use tidemark_format::config::RepoConfig;
use tidemark_format::lock::{GcState, Lease, LeaseKind, GC_MAGIC, LEASE_MAGIC, MAX_HOST};
use tidemark_format::manifest::{Manifest, ManifestHeader};
use tidemark_format::seal::ChunkIds;
use tidemark_format::wal::{self, WalFileName};
use tidemark_format::{chunk, keys, pack, ChunkId, FormatError, PackId};

fn vector(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("vectors")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn with_trailer(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    v.extend_from_slice(ChunkId::of(body).as_bytes());
    v
}

/// Every single-bit flip of `bytes`, with the index of the flipped byte.
fn flips(bytes: &[u8]) -> impl Iterator<Item = (usize, Vec<u8>)> + '_ {
    (0..bytes.len()).flat_map(move |i| {
        (0..8).map(move |bit| {
            let mut b = bytes.to_vec();
            b[i] ^= 1 << bit;
            (i, b)
        })
    })
}

#[test]
fn config_refuses_every_truncation_and_flip() {
    let b = vector("config.bin");
    for n in 0..b.len() {
        assert!(RepoConfig::decode(&b[..n]).is_err(), "cut at {n}");
    }
    for (i, bad) in flips(&b) {
        assert!(RepoConfig::decode(&bad).is_err(), "flip in byte {i}");
    }
}

#[test]
fn cluster_record_refuses_every_truncation_and_flip() {
    let b = vector("cluster.bin");
    for n in 0..b.len() {
        assert!(
            tidemark_format::cluster::ClusterRecord::decode(&b[..n]).is_err(),
            "cut at {n}"
        );
    }
    for (i, bad) in flips(&b) {
        assert!(
            tidemark_format::cluster::ClusterRecord::decode(&bad).is_err(),
            "flip in byte {i}"
        );
    }
}

#[test]
fn manifest_refuses_every_truncation_and_flip() {
    // Format 1.4 (major 3) and the kept format 1.3 vector (major 1).
    for file in ["manifest.bin", "v1.3/manifest.bin"] {
        let b = vector(file);
        for n in 0..b.len() {
            assert!(Manifest::decode(&b[..n]).is_err(), "{file}: cut at {n}");
            match ManifestHeader::decode_prefix(&b[..n]) {
                Ok(_) => assert!(n >= 403),
                Err(e) => assert!(matches!(e, FormatError::Truncated { .. }), "{e}"),
            }
        }
        for (i, bad) in flips(&b) {
            assert!(Manifest::decode(&bad).is_err(), "{file}: flip in byte {i}");
        }
    }
}

#[test]
fn pack_refuses_every_truncation_and_never_points_outside() {
    // Format 1.4 (major 2, a frame of two chunks) and the kept format 1.3 vector (major 1).
    for file in ["pack.bin", "v1.3/pack.bin"] {
        let b = vector(file);
        for n in 0..b.len() {
            assert!(pack::decode(&b[..n]).is_err(), "{file}: cut at {n}");
        }
        for (i, bad) in flips(&b) {
            if let Ok(entries) = pack::decode(&bad) {
                // Blob bytes are covered by the pack id and each chunk id, not by the index.
                for e in entries {
                    let end = e.offset + e.clen as u64;
                    assert!(end <= bad.len() as u64, "{file}: flip in byte {i}");
                    assert!(
                        e.skip as u64 + e.ulen as u64 <= chunk::MAX_FRAME_SIZE as u64,
                        "{file}: flip in byte {i}"
                    );
                    let frame = &bad[e.offset as usize..end as usize];
                    let mut data = Vec::new();
                    let run = [(e.id, e.skip, e.ulen)];
                    if chunk::decode_run(&ChunkIds::Sha256, frame, &run, &mut data).is_ok() {
                        assert_eq!(data.len(), e.ulen as usize);
                        assert_eq!(ChunkId::of(&data), e.id);
                    }
                }
            }
        }
    }
}

// Frames of several chunks (format 1.4, FORMAT.md 8.2): the frame header is checked before
// anything is decoded, a chunk must lie within the frame's content, and only the run's bytes
// are returned.
#[test]
fn frames_of_several_chunks_are_checked_before_decoding() {
    let ids = ChunkIds::Sha256;
    let mut out = b"kept".to_vec();
    // A frame declaring more than 1 MiB of content is refused on its header alone (this one has
    // no block at all).
    let mut big = vec![0x28, 0xb5, 0x2f, 0xfd, 0xa0];
    big.extend_from_slice(&(chunk::MAX_FRAME_SIZE + 1).to_le_bytes());
    assert!(matches!(
        chunk::decode_run(&ids, &big, &[(abc_id(), 0, 3)], &mut out),
        Err(FormatError::TooLarge { .. })
    ));
    // Skip and ulen select bytes of the frame's content; past its end is refused.
    let bc = ChunkId::of(b"bc");
    chunk::decode_run(&ids, &FRAME_ABC, &[(bc, 1, 2)], &mut out).expect("bc at skip 1");
    assert_eq!(out, b"keptbc");
    for (skip, ulen) in [(1, 3), (3, 1), (4, 0), (u32::MAX, 2)] {
        assert!(
            chunk::decode_run(&ids, &FRAME_ABC, &[(bc, skip, ulen)], &mut out).is_err(),
            "skip {skip} ulen {ulen}"
        );
    }
    // Chunks of one run follow each other: a gap or an overlap is refused.
    let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
    chunk::decode_run(&ids, &FRAME_ABC, &[(a, 0, 1), (b, 1, 1)], &mut out).expect("a then b");
    assert_eq!(out, b"keptbcab");
    assert!(chunk::decode_run(&ids, &FRAME_ABC, &[(a, 0, 1), (bc, 2, 1)], &mut out).is_err());
    assert!(chunk::decode_run(&ids, &FRAME_ABC, &[(a, 0, 1), (a, 0, 1)], &mut out).is_err());
    // A wrong id anywhere in the run refuses the whole run and appends nothing.
    assert!(matches!(
        chunk::decode_run(&ids, &FRAME_ABC, &[(a, 0, 1), (a, 1, 1)], &mut out),
        Err(FormatError::ChecksumMismatch { .. })
    ));
    assert_eq!(out, b"keptbcab");
    // A frame holding more than the chunks read is fine for a reader: a chunk at skip 0 is the
    // frame's first ulen bytes.
    assert_eq!(
        chunk::decode(&ChunkId::of(b"ab"), &FRAME_ABC, 2),
        Ok(b"ab".to_vec())
    );
}

// A chunk reference whose skip + ulen lies beyond the largest frame is invalid (8.4.3), and
// majors above 4 (manifests) and 2 (packs) are refused as newer versions.
#[test]
fn manifest_and_pack_refuse_what_no_frame_holds_and_newer_majors() {
    let m = Manifest::decode(&vector("manifest.bin")).expect("vector decodes");
    let mut far = m.clone();
    if let tidemark_format::manifest::EntryKind::File(f) = &mut far.entries[3].kind {
        f.chunks[1].skip = chunk::MAX_FRAME_SIZE - 8191;
    }
    let err = Manifest::decode(&far.encode()).expect_err("skip + ulen > 1 MiB");
    assert!(err.to_string().contains("skip"), "{err}");
    let mut edge = m.clone();
    if let tidemark_format::manifest::EntryKind::File(f) = &mut edge.entries[3].kind {
        f.chunks[1].skip = chunk::MAX_FRAME_SIZE - 8192;
    }
    assert_eq!(Manifest::decode(&edge.encode()), Ok(edge));

    let b = vector("manifest.bin");
    let mut newer = b[..b.len() - 32].to_vec();
    newer[4] = 5;
    assert!(matches!(
        Manifest::decode(&with_trailer(&newer)),
        Err(FormatError::UnsupportedVersion { found: 5, .. })
    ));
    let mut newer = vector("pack.bin");
    newer[4] = 3;
    assert!(matches!(
        pack::decode(&newer),
        Err(FormatError::UnsupportedVersion { found: 3, .. })
    ));
}

#[test]
fn chunk_refuses_every_truncation_and_never_returns_other_bytes() {
    let f = vector("chunk.bin");
    let id: ChunkId = "50170d2f41778223bffc960e70ae774f3cc30d9236bd3c6d3a92c55b7d1355e3"
        .parse()
        .expect("literal id");
    let original = chunk::decode(&id, &f, 8192).expect("vector decodes");
    for n in 0..f.len() {
        assert!(chunk::decode(&id, &f[..n], 8192).is_err(), "cut at {n}");
    }
    // A few frame header bits carry no meaning (RFC 8878's Unused_bit), so a flip there may
    // decode; the chunk id guarantees it is to the same bytes.
    for (i, bad) in flips(&f) {
        if let Ok(data) = chunk::decode(&id, &bad, 8192) {
            assert_eq!(data, original, "flip in byte {i}");
        }
    }
}

#[test]
fn wal_objects_refuse_truncation_and_unprotected_flips() {
    for (file, name) in [
        ("wal-segment.bin", "000000010000000000000020"),
        ("wal-history.bin", "00000002.history"),
        ("v1.5/wal-segment.bin", "000000010000000000000020"),
        ("v1.5/wal-history.bin", "00000002.history"),
    ] {
        let b = vector(file);
        let name = WalFileName::parse(name).expect("literal name");
        for n in 0..b.len() {
            assert!(wal::decode(&b[..n]).is_err(), "{file}: cut at {n}");
        }
        // The content digest guarantees the bytes; the name is not covered by it, so readers
        // compare it with the object's key (FORMAT.md, "WAL objects"). The minor version and
        // zstd's unused frame header bit may change without effect.
        let (_, original) = wal::decode(&b).expect("vector decodes");
        let name_bytes = 13..13 + name.to_string().len();
        for (i, bad) in flips(&b) {
            if let Ok((h, data)) = wal::decode(&bad) {
                assert_eq!(data, original, "{file}: flip in byte {i}");
                assert!(
                    h.name == name || name_bytes.contains(&i),
                    "{file}: flip in byte {i} changed the name"
                );
            }
        }
    }
}

// Regression: a config of 6..=7 header bytes followed by the sha256 of those bytes passed the
// magic, version and trailer checks and then sliced past the end of the body (panic). Found by
// fuzz target `config`.
#[test]
fn config_shorter_than_header_plus_trailer_is_truncated() {
    for n in 0..8 {
        let b = with_trailer(&b"TMCF\x01\x00\x00\x00"[..n]);
        assert!(RepoConfig::decode(&b).is_err(), "{n} header bytes");
    }
}

// Regression: the parent backup id was not validated, so a manifest could name a parent such as
// "../x" whose manifest key escapes `backups/`. Found by fuzz target `manifest`.
#[test]
fn manifest_refuses_invalid_parent_id() {
    let mut m = Manifest::decode(&vector("manifest.bin")).expect("vector decodes");
    for bad in [
        "../x",
        "a/b",
        ".hidden",
        "",
        "20261120T204012[",
        &"x".repeat(65),
    ] {
        m.header.parent = Some(bad.to_string());
        assert!(Manifest::decode(&m.encode()).is_err(), "{bad:?}");
    }
}

const FRAME_ABC: [u8; 12] = [
    0x28, 0xb5, 0x2f, 0xfd, // magic
    0x20, 0x03, // single segment, content size 3
    0x19, 0x00, 0x00, // last raw block of 3 bytes
    b'a', b'b', b'c',
];

fn abc_id() -> ChunkId {
    ChunkId::of(b"abc")
}

#[test]
fn a_hand_built_frame_decodes() {
    assert_eq!(chunk::decode(&abc_id(), &FRAME_ABC, 3), Ok(b"abc".to_vec()));
}

// Regression for the rule "exactly one zstd frame that records its content size": each of
// these decoded before the fix. Found by the round-trip test (a WAL object cut right after its
// header, i.e. with no frame at all, was accepted when the file was empty).
#[test]
fn zstd_frames_must_be_exactly_one_with_content_size() {
    // No frame at all.
    assert!(chunk::decompress_exact("t", &[], 0).is_err());
    let empty_name = WalFileName::parse("00000003.history").expect("name");
    let obj = wal::encode(empty_name, b"", 3);
    let (_, at) = wal::decode_header(&obj).expect("header");
    assert!(wal::decode(&obj).is_ok());
    assert!(wal::decode(&obj[..at]).is_err(), "object without a frame");

    // A skippable frame after the real one.
    let mut skippable = FRAME_ABC.to_vec();
    skippable.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 0xaa, 0xbb]);
    assert!(chunk::decode(&abc_id(), &skippable, 3).is_err());

    // Only a skippable frame, for an empty chunk.
    let only_skippable = [0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0];
    assert!(chunk::decompress_exact("t", &only_skippable, 0).is_err());

    // Two frames that together hold the declared bytes.
    let mut two = chunk::compress(b"ab", 3);
    two.extend_from_slice(&chunk::compress(b"c", 3));
    assert!(chunk::decode(&abc_id(), &two, 3).is_err());

    // A frame without a content size field (no single-segment flag, window descriptor 0).
    let no_size = [
        0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00, 0x19, 0x00, 0x00, b'a', b'b', b'c',
    ];
    assert!(chunk::decode(&abc_id(), &no_size, 3).is_err());

    // A content size that differs from the declared length.
    let mut wrong = FRAME_ABC;
    wrong[5] = 4;
    assert!(chunk::decode(&abc_id(), &wrong, 3).is_err());
}

// Leases and GC states: the sha256 trailer covers every byte, so every flip is refused.
#[test]
fn lease_and_gc_state_refuse_every_truncation_and_flip() {
    let b = vector("lease.bin");
    for n in 0..b.len() {
        assert!(Lease::decode(&b[..n]).is_err(), "lease: cut at {n}");
    }
    for (i, bad) in flips(&b) {
        assert!(Lease::decode(&bad).is_err(), "lease: flip in byte {i}");
    }
    let b = vector("gc-state.bin");
    for n in 0..b.len() {
        assert!(GcState::decode(&b[..n]).is_err(), "gc state: cut at {n}");
    }
    for (i, bad) in flips(&b) {
        assert!(GcState::decode(&bad).is_err(), "gc state: flip in byte {i}");
    }
}

/// A lease object with a valid trailer from raw field values (FORMAT.md 16.1).
fn lease_bytes(kind: u8, host_len: u32, host: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.header(LEASE_MAGIC);
    w.u8(kind);
    w.i64(1_795_316_400_000_000);
    w.i64(1_795_316_700_000_000);
    w.u32(4242);
    w.u32(host_len);
    w.raw(host);
    w.raw(extra);
    w.finish_with_sha256()
}

fn nonce_key(kind: LeaseKind) -> String {
    keys::lease(kind, "0123456789abcdef0123456789abcdef").expect("valid nonce")
}

#[test]
fn lease_refuses_unknown_kind_and_a_kind_other_than_its_key() {
    assert!(Lease::decode(&lease_bytes(2, 4, b"db-0", b"")).is_ok());
    for code in (0..=255u8).filter(|c| !matches!(c, 1 | 2)) {
        assert!(
            matches!(
                Lease::decode(&lease_bytes(code, 4, b"db-0", b"")),
                Err(FormatError::Invalid { .. })
            ),
            "kind {code}"
        );
    }
    // A backup lease stored under an expire key (and the reverse) would turn an exclusive lease
    // into a shared one: refused when read for its key.
    let backup = lease_bytes(1, 4, b"db-0", b"");
    let expire = lease_bytes(2, 4, b"db-0", b"");
    let (bk, ek) = (nonce_key(LeaseKind::Backup), nonce_key(LeaseKind::Expire));
    assert!(Lease::decode_for_key(&bk, &backup).is_ok());
    assert!(Lease::decode_for_key(&ek, &expire).is_ok());
    assert!(matches!(
        Lease::decode_for_key(&ek, &backup),
        Err(FormatError::Invalid { .. })
    ));
    assert!(matches!(
        Lease::decode_for_key(&bk, &expire),
        Err(FormatError::Invalid { .. })
    ));
    assert!(Lease::decode_for_key("locks/x", &backup).is_err());
}

#[test]
fn lease_refuses_long_or_lying_host() {
    let max = "h".repeat(MAX_HOST);
    let l = Lease::decode(&lease_bytes(1, MAX_HOST as u32, max.as_bytes(), b"")).expect("255");
    assert_eq!(l.host, max);
    let long = "h".repeat(MAX_HOST + 1);
    assert_eq!(
        Lease::decode(&lease_bytes(1, 256, long.as_bytes(), b"")),
        Err(FormatError::TooLarge {
            what: "host",
            size: 256,
            max: 255
        })
    );
    // A length far past the object is refused by the cap before anything is read or allocated.
    for len in [256, 70_000, u32::MAX] {
        assert!(
            matches!(
                Lease::decode(&lease_bytes(1, len, b"db-0", b"")),
                Err(FormatError::TooLarge { .. })
            ),
            "host length {len}"
        );
    }
    // A length longer than the bytes present (within the cap) is truncation.
    assert!(matches!(
        Lease::decode(&lease_bytes(1, 5, b"db-0", b"")),
        Err(FormatError::Truncated { .. })
    ));
    // Shorter than the bytes present leaves trailing bytes.
    assert!(matches!(
        Lease::decode(&lease_bytes(1, 3, b"db-0", b"")),
        Err(FormatError::Invalid { .. })
    ));
    assert!(matches!(
        Lease::decode(&lease_bytes(1, 2, b"\xc3\x28", b"")),
        Err(FormatError::Invalid { .. })
    ));
}

#[test]
fn lease_and_gc_state_refuse_trailing_bytes() {
    assert!(matches!(
        Lease::decode(&lease_bytes(1, 4, b"db-0", b"\0")),
        Err(FormatError::Invalid { .. })
    ));
    let mut after = vector("lease.bin");
    after.push(0);
    assert!(Lease::decode(&after).is_err(), "a byte after the trailer");

    let s = GcState::decode(&vector("gc-state.bin")).expect("vector decodes");
    let mut w = Writer::new();
    w.header(GC_MAGIC);
    w.i64(s.condemned_us);
    w.u32(2); // three ids follow
    for p in &s.packs {
        w.raw(p.as_bytes());
    }
    assert!(matches!(
        GcState::decode(&w.finish_with_sha256()),
        Err(FormatError::Invalid { .. })
    ));
    let mut after = vector("gc-state.bin");
    after.push(0);
    assert!(GcState::decode(&after).is_err(), "a byte after the trailer");
}

/// A GC state with a valid trailer: `count` as declared, then `packs` as given.
fn gc_bytes(count: u32, packs: &[PackId]) -> Vec<u8> {
    let mut w = Writer::new();
    w.header(GC_MAGIC);
    w.i64(1_795_316_407_250_000);
    w.u32(count);
    for p in packs {
        w.raw(p.as_bytes());
    }
    w.finish_with_sha256()
}

// A count the object cannot hold must fail on the missing bytes, not allocate first: with
// `count` u32::MAX an uncapped `Vec::with_capacity` would ask for 128 GiB and abort the test.
#[test]
fn gc_state_count_past_the_object_is_truncation_without_allocation() {
    let s = GcState::decode(&vector("gc-state.bin")).expect("vector decodes");
    assert!(GcState::decode(&gc_bytes(3, &s.packs)).is_ok());
    for count in [4, 1000, 1 << 27, u32::MAX] {
        assert!(
            matches!(
                GcState::decode(&gc_bytes(count, &s.packs)),
                Err(FormatError::Truncated { .. })
            ),
            "count {count}"
        );
    }
    assert!(matches!(
        GcState::decode(&gc_bytes(u32::MAX, &[])),
        Err(FormatError::Truncated { .. })
    ));
    assert_eq!(
        GcState::decode(&gc_bytes(0, &[])).map(|g| g.packs.len()),
        Ok(0)
    );
}

#[test]
fn gc_state_refuses_unsorted_and_duplicate_packs() {
    let s = GcState::decode(&vector("gc-state.bin")).expect("vector decodes");
    let (a, b, c) = (s.packs[0], s.packs[1], s.packs[2]);
    for bad in [
        vec![c, b, a],
        vec![a, c, b],
        vec![b, a, c],
        vec![a, a],
        vec![a, b, b],
        vec![a, b, c, c],
        vec![a, b, c, a],
    ] {
        assert!(
            matches!(
                GcState::decode(&gc_bytes(bad.len() as u32, &bad)),
                Err(FormatError::Invalid { .. })
            ),
            "{bad:?}"
        );
    }
    // The encoder writes what it is given; an unsorted state never decodes.
    let unsorted = GcState {
        condemned_us: 1,
        packs: vec![b, a],
    };
    assert!(GcState::decode(&unsorted.encode()).is_err());
}

/// Found by fuzzing (fuzz/fuzz_targets/manifest.rs): a file entry announcing more chunk
/// references than any source could hold overflowed the "bytes still needed" of its error.
#[test]
fn manifest_with_an_absurd_chunk_count_is_refused_without_overflow() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/regressions/manifest-nchunks-overflow.bin");
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut inputs = vec![data.clone(), with_trailer(&data)];
    if data.len() >= 32 {
        inputs.push(with_trailer(&data[..data.len() - 32]));
    }
    for input in inputs {
        let _ = ManifestHeader::decode_prefix(&input);
        assert!(Manifest::decode(&input).is_err());
    }
}
