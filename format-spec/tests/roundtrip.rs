//! Over 500 lines because every format type has its generator and damage cases beside the others.
//!
//! Round-trip property tests driven by a small deterministic pseudo-random generator: for many
//! generated values, `decode(encode(v)) == v`, and damaged encodings are refused with an error
//! rather than a panic. The seed is fixed, so a failure reproduces exactly.

use tidemark_format::chunk::{self, MAX_CHUNK_SIZE, MAX_FRAME_SIZE};
use tidemark_format::config::{RepoConfig, COMPRESSION_ZSTD};
use tidemark_format::lock::{GcState, Lease, LeaseKind, MAX_HOST};
use tidemark_format::manifest::stream::MAX_PACK_OFFSET;
use tidemark_format::manifest::{
    self, chunk_list_hash, BackupStats, ChunkRef, Entry, EntryKind, FileEntry, Manifest,
    ManifestHeader, FLAG_CHUNK_LIST_HASH, FLAG_FROM_STANDBY, SOURCE_PGDATA, SOURCE_REPLICATION,
};
use tidemark_format::pack::{self, PackBuilder};
use tidemark_format::seal::ChunkIds;
use tidemark_format::wal::{self, WalFileName, PG15_PAGE_MAGIC};
use tidemark_format::{keys, ChunkId, FormatError, Lsn, PackId, SystemId, TimelineId};

/// SplitMix64: tiny, deterministic, good enough to spread test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        // Mix compressible runs and noise, like real pages.
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let run = self.range(1, 512) as usize;
            let noisy = self.bool();
            let fill = self.next() as u8;
            for _ in 0..run.min(len - out.len()) {
                out.push(if noisy { self.next() as u8 } else { fill });
            }
        }
        out
    }
    /// Bytes of a length uniform in `lo..=hi`.
    fn blob(&mut self, lo: u64, hi: u64) -> Vec<u8> {
        let len = self.range(lo, hi) as usize;
        self.bytes(len)
    }
    fn id(&mut self) -> [u8; 32] {
        let mut a = [0u8; 32];
        for b in &mut a {
            *b = self.next() as u8;
        }
        a
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64 - 1) as usize]
    }
}

const CASES: usize = 300;

fn backup_id(rng: &mut Rng) -> String {
    const FIRST: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-";
    const REST: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-.";
    let len = rng.range(1, 64) as usize;
    let mut s = String::new();
    s.push(*rng.pick(FIRST) as char);
    for _ in 1..len {
        s.push(*rng.pick(REST) as char);
    }
    s
}

fn config(rng: &mut Rng) -> RepoConfig {
    RepoConfig {
        system_id: SystemId(rng.next()),
        chunk_size: 1 << rng.range(12, 20),
        pack_target: rng.range(1, 1 << 30) as u32,
        compression: COMPRESSION_ZSTD,
        created_us: rng.next() as i64,
    }
}

#[test]
fn config_round_trips_and_refuses_damage() {
    let mut rng = Rng(1);
    for _ in 0..CASES {
        let c = config(&mut rng);
        let b = c.encode();
        assert_eq!(b.len(), 65);
        assert_eq!(RepoConfig::decode(&b), Ok(c));
        let at = rng.range(0, 64) as usize;
        let mut bad = b.clone();
        bad[at] ^= 1 << rng.range(0, 7);
        assert!(RepoConfig::decode(&bad).is_err(), "flip at {at} accepted");
        assert!(RepoConfig::decode(&b[..at]).is_err());
    }
}

fn name(rng: &mut Rng) -> WalFileName {
    let tli = rng.range(1, u32::MAX as u64) as u32;
    let (log, seg) = (rng.next() as u32, rng.next() as u32);
    match rng.range(0, 3) {
        0 => WalFileName::Segment { tli, log, seg },
        1 => WalFileName::Partial { tli, log, seg },
        2 => WalFileName::History { tli },
        _ => WalFileName::BackupHistory {
            tli,
            log,
            seg,
            offset: rng.next() as u32,
        },
    }
}

#[test]
fn wal_names_round_trip() {
    let mut rng = Rng(2);
    for _ in 0..CASES * 10 {
        let n = name(&mut rng);
        let s = n.to_string();
        assert_eq!(WalFileName::parse(&s), Ok(n), "{s}");
        assert_eq!(keys::parse_wal(&keys::wal(&n)), Some(n));
        assert!(
            WalFileName::parse(&s.to_lowercase()).is_err()
                || !s.contains(|c: char| c.is_ascii_uppercase())
        );
        assert!(WalFileName::parse(&format!("{s}x")).is_err());
        assert!(WalFileName::parse(&s[1..]).is_err());
    }
    for bad in [
        "",
        "000000000000000000000001",
        "00000000.history",
        "000000010000000000000001.partial.partial",
        "000000010000000000000001.0000002.backup",
        "00000001000000000000000G",
        "+0000001.history",
        "RECOVERYHISTORY",
        "000000010000000000000001\0",
        "ａ00000010000000000000001",
    ] {
        assert!(WalFileName::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn wal_objects_round_trip_and_refuse_damage() {
    let mut rng = Rng(3);
    for case in 0..CASES {
        let n = name(&mut rng);
        let len = if case % 10 == 0 {
            0
        } else {
            rng.range(1, 20_000) as usize
        };
        let data = rng.bytes(len);
        let obj = wal::encode(n, &data, 3);
        let (h, back) = wal::decode(&obj).expect("encoded wal object decodes");
        assert_eq!(
            (h.name, h.size, h.digest),
            (n, len as u64, wal::WalDigest::of(&data))
        );
        assert_eq!(back, data);
        let (h2, at) = wal::decode_header(&obj).expect("header decodes");
        assert_eq!(h2, h);
        assert_eq!(at, 8 + 1 + 4 + n.to_string().len() + 8 + 32);
        assert!(wal::decode_header(&obj[..at - 1]).is_err());
        for cut in [
            at,
            obj.len() - 1,
            rng.range(0, obj.len() as u64 - 1) as usize,
        ] {
            assert!(wal::decode(&obj[..cut]).is_err(), "cut at {cut} accepted");
        }
        // A flipped bit never yields other content, and changes the name only if it landed in
        // the name (which readers compare with the object's key, see FORMAT.md).
        let at_flip = rng.range(0, obj.len() as u64 - 1) as usize;
        let mut bad = obj.clone();
        bad[at_flip] ^= 1 << rng.range(0, 7);
        if let Ok((hb, db)) = wal::decode(&bad) {
            assert_eq!(db, data, "flip at {at_flip}");
            let name_bytes = 13..13 + n.to_string().len();
            assert!(
                hb.name == n || name_bytes.contains(&at_flip),
                "flip at {at_flip}"
            );
        }
    }
}

/// The chunks of one frame: 1..=`max` chunks of 1..=9000 bytes (most frames of one chunk hold
/// one, as a 1.3 writer wrote them).
fn frame_chunks(rng: &mut Rng, max: u64) -> Vec<Vec<u8>> {
    let n = if rng.bool() { 1 } else { rng.range(1, max) };
    (0..n).map(|_| rng.blob(1, 9000)).collect()
}

#[test]
fn packs_round_trip_and_refuse_damage() {
    let mut rng = Rng(4);
    let ids = ChunkIds::Sha256;
    for _ in 0..CASES / 3 {
        let mut b = PackBuilder::new();
        // (entry, chunk bytes) in pack order, and each frame's range of them.
        let mut chunks = Vec::new();
        let mut frames = Vec::new();
        for _ in 0..rng.range(0, 8) {
            let datas = frame_chunks(&mut rng, 6);
            let pairs: Vec<(ChunkId, u32)> = datas
                .iter()
                .map(|d| (ChunkId::of(d), d.len() as u32))
                .collect();
            let frame = chunk::compress(&datas.concat(), 3);
            let es = b.push_frame(&frame, &pairs).to_vec();
            let mut skip = 0;
            for (e, d) in es.iter().zip(&datas) {
                assert_eq!((e.skip, e.clen), (skip, frame.len() as u32));
                skip += d.len() as u32;
            }
            frames.push(chunks.len()..chunks.len() + es.len());
            chunks.extend(es.into_iter().zip(datas));
        }
        let (pid, bytes) = b.finish();
        assert_eq!(pid, PackId::of(&bytes));
        assert_eq!(&bytes[..6], b"TMPK\x02\x00");
        assert_eq!(keys::parse_pack(&keys::pack(&pid)), Some(pid));
        let entries = pack::decode(&bytes).expect("built pack decodes");
        assert_eq!(entries.len(), chunks.len());
        for (e, (want, data)) in entries.iter().zip(&chunks) {
            assert_eq!(e, want);
            let frame = &bytes[e.offset as usize..(e.offset + e.clen as u64) as usize];
            let mut one = Vec::new();
            chunk::decode_run(&ids, frame, &[(e.id, e.skip, e.ulen)], &mut one)
                .expect("chunk decodes at its skip");
            assert_eq!(&one, data);
        }
        // Any contiguous run of a frame's chunks decodes at once.
        for r in &frames {
            let lo = rng.range(r.start as u64, r.end as u64 - 1) as usize;
            let hi = rng.range(lo as u64 + 1, r.end as u64) as usize;
            let group = &chunks[lo..hi];
            let e0 = group[0].0;
            let frame = &bytes[e0.offset as usize..(e0.offset + e0.clen as u64) as usize];
            let run: Vec<(ChunkId, u32, u32)> =
                group.iter().map(|(e, _)| (e.id, e.skip, e.ulen)).collect();
            let mut out = Vec::new();
            chunk::decode_run(&ids, frame, &run, &mut out).expect("run decodes");
            let want: Vec<u8> = group.iter().flat_map(|(_, d)| d.iter().copied()).collect();
            assert_eq!(out, want);
            // The whole frame holds exactly its chunks.
            let last = chunks[r.end - 1].0;
            assert_eq!(
                chunk::frame_len("chunk", frame),
                Ok(last.skip as u64 + last.ulen as u64)
            );
        }
        // The index alone decodes given where the blobs end; without skips (TMPX) only when
        // every frame holds one chunk.
        let index = pack::encode_index(&entries);
        let blobs_end = (bytes.len() - pack::FOOTER_LEN - index.len()) as u64;
        assert_eq!(pack::decode_index(&index, blobs_end).as_ref(), Ok(&entries));
        let shared = frames.iter().any(|r| r.len() > 1);
        if shared {
            // Written without its skips (as a TMPX index cannot hold them), the index no longer
            // tiles its frames and is refused.
            let cleared: Vec<_> = entries
                .iter()
                .map(|e| pack::PackEntry { skip: 0, ..*e })
                .collect();
            let tmpx = pack::decode_index(&pack::encode_index_as(&cleared, false), blobs_end);
            assert!(tmpx.is_err());
        } else {
            let tmpx = pack::decode_index(&pack::encode_index_as(&entries, false), blobs_end);
            assert_eq!(tmpx.as_ref(), Ok(&entries));
        }
        // Truncation anywhere is refused; damage never panics and never yields an entry that
        // points outside the pack or beyond the largest frame.
        let cut = rng.range(0, bytes.len() as u64 - 1) as usize;
        assert!(
            pack::decode(&bytes[..cut]).is_err(),
            "cut at {cut} accepted"
        );
        let mut bad = bytes.clone();
        let at = rng.range(0, bytes.len() as u64 - 1) as usize;
        bad[at] ^= 1 << rng.range(0, 7);
        if let Ok(es) = pack::decode(&bad) {
            for e in es {
                assert!(e.offset + e.clen as u64 <= bad.len() as u64);
                assert!(e.skip as u64 + e.ulen as u64 <= chunk::MAX_FRAME_SIZE as u64);
            }
        }
    }
}

fn path_component(rng: &mut Rng) -> String {
    const CHARS: &[char] = &[
        'a', 'b', 'x', 'z', '0', '1', '9', '_', '.', '-', 'P', 'G', 'é', ' ',
    ];
    let len = rng.range(1, 12) as usize;
    let s: String = (0..len).map(|_| *rng.pick(CHARS)).collect();
    if s == "." || s == ".." {
        format!("{s}x")
    } else {
        s
    }
}

/// A manifest; its chunk references carry skips only when `frames` (format 1.4).
fn manifest(rng: &mut Rng, frames: bool) -> Manifest {
    let npacks = rng.range(0, 4) as usize;
    let packs: Vec<PackId> = (0..npacks).map(|_| PackId(rng.id())).collect();
    let start = rng.next() >> 1;
    let header = ManifestHeader {
        backup_id: backup_id(rng),
        system_id: SystemId(rng.next()),
        pg_version: rng.next() as u32,
        timeline: TimelineId(rng.range(1, u32::MAX as u64) as u32),
        start_lsn: Lsn(start),
        stop_lsn: Lsn(start + rng.range(0, 1 << 40)),
        start_time_us: rng.next() as i64,
        stop_time_us: rng.next() as i64,
        source: *rng.pick(&[SOURCE_PGDATA, SOURCE_REPLICATION]),
        flags: *rng.pick(&[
            0,
            FLAG_FROM_STANDBY,
            FLAG_CHUNK_LIST_HASH,
            FLAG_FROM_STANDBY | FLAG_CHUNK_LIST_HASH,
        ]),
        chunk_size: 1 << rng.range(12, 20),
        parent: rng.bool().then(|| backup_id(rng)),
        backup_label: rng.blob(0, 600),
        tablespace_map: rng.bool().then(|| rng.blob(0, 100)),
        stats: BackupStats {
            logical_bytes: rng.next(),
            new_chunks: rng.next(),
            reused_chunks: rng.next(),
            new_chunk_bytes: rng.next(),
            new_stored_bytes: rng.next(),
            new_objects: rng.next(),
        },
    };
    let mut paths = std::collections::BTreeSet::new();
    for _ in 0..rng.range(0, 30) {
        let depth = rng.range(1, 4);
        let p: Vec<String> = (0..depth).map(|_| path_component(rng)).collect();
        paths.insert(p.join("/"));
    }
    // Every parent of an entry is a directory entry (8.4.3).
    let parents: std::collections::BTreeSet<String> = paths
        .iter()
        .flat_map(|p| {
            p.match_indices('/')
                .map(|(i, _)| p[..i].to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    paths.extend(parents.iter().cloned());
    let list_hashes = header.flags & FLAG_CHUNK_LIST_HASH != 0;
    let entries = paths
        .into_iter()
        .map(|path| {
            let kind = match rng.range(0, 2) {
                _ if parents.contains(&path) => EntryKind::Dir,
                0 => EntryKind::Dir,
                1 if npacks > 0 => {
                    let chunks: Vec<ChunkRef> = (0..rng.range(0, 6))
                        .map(|_| {
                            let ulen = rng.range(1, MAX_CHUNK_SIZE as u64) as u32;
                            ChunkRef {
                                id: ChunkId(rng.id()),
                                pack: rng.range(0, npacks as u64 - 1) as u32,
                                offset: rng.range(0, MAX_PACK_OFFSET),
                                clen: rng.range(1, u32::MAX as u64) as u32,
                                ulen,
                                // In a frame of several chunks (format 1.4) or alone.
                                skip: if frames && rng.bool() {
                                    rng.range(0, (MAX_FRAME_SIZE - ulen) as u64) as u32
                                } else {
                                    0
                                },
                            }
                        })
                        .collect();
                    // Under FLAG_CHUNK_LIST_HASH the file hash is the list's (1.5), checked by
                    // every reader; otherwise any value.
                    let sha256 = if list_hashes {
                        chunk_list_hash(chunks.iter().map(|c| &c.id))
                    } else {
                        ChunkId(rng.id())
                    };
                    EntryKind::File(FileEntry {
                        size: chunks.iter().map(|c| c.ulen as u64).sum(),
                        sha256,
                        chunks,
                    })
                }
                1 => EntryKind::File(FileEntry {
                    size: 0,
                    sha256: ChunkId::of(b""),
                    chunks: Vec::new(),
                }),
                _ => EntryKind::Symlink(rng.blob(1, 40)),
            };
            Entry {
                path,
                mode: rng.range(0, 0o7777) as u32,
                kind,
            }
        })
        .collect();
    Manifest {
        header,
        packs,
        entries,
    }
}

#[test]
fn manifests_round_trip_and_refuse_damage() {
    let mut rng = Rng(5);
    let mut with_skips = 0;
    for case in 0..CASES {
        let frames = case % 3 != 0;
        let m = manifest(&mut rng, frames);
        let b = m.encode();
        assert_eq!(&b[4..6], &3u16.to_le_bytes(), "writers write major 3");
        assert_eq!(Manifest::decode(&b).as_ref(), Ok(&m));
        // Every major decodes to the same manifest; majors 1 and 2 (format 1.3) hold no skip
        // and take 4 bytes less per chunk reference.
        let nrefs: usize = m
            .entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File(f) => f.chunks.len(),
                _ => 0,
            })
            .sum();
        let skips = m.entries.iter().any(|e| match &e.kind {
            EntryKind::File(f) => f.chunks.iter().any(|c| c.skip != 0),
            _ => false,
        });
        with_skips += skips as usize;
        for major in 1..=4u16 {
            let written = m.encode_as(major);
            if skips && major <= 2 {
                assert!(written.is_err(), "major {major} holds no skip");
                continue;
            }
            let written = written.expect("writes");
            assert_eq!(&written[4..6], &major.to_le_bytes());
            let shorter = if major <= 2 { 4 * nrefs } else { 0 };
            assert_eq!(written.len() + shorter, b.len(), "major {major}");
            assert_eq!(Manifest::decode(&written).as_ref(), Ok(&m), "major {major}");
        }
        assert_eq!(ManifestHeader::decode_prefix(&b).as_ref(), Ok(&m.header));
        for e in &m.entries {
            assert!(manifest::validate_path(&e.path).is_ok());
        }
        let at = rng.range(0, b.len() as u64 - 1) as usize;
        let mut bad = b.clone();
        bad[at] ^= 1 << rng.range(0, 7);
        assert!(Manifest::decode(&bad).is_err(), "flip at {at} accepted");
        assert!(Manifest::decode(&b[..at]).is_err(), "cut at {at} accepted");
        // A prefix either holds the whole header or says it is too short.
        match ManifestHeader::decode_prefix(&b[..at]) {
            Ok(h) => assert_eq!(h, m.header),
            Err(e) => assert!(matches!(e, FormatError::Truncated { .. }), "{e}"),
        }
    }
    assert!(with_skips > CASES / 10, "{with_skips} manifests with skips");
}

#[test]
fn long_page_headers_round_trip() {
    let mut rng = Rng(6);
    for _ in 0..CASES {
        let tli = rng.next() as u32;
        let addr = rng.next();
        let sys = rng.next();
        let seg_size: u32 = 1 << rng.range(20, 30);
        let blcksz = rng.next() as u32;
        let mut p = Vec::new();
        p.extend_from_slice(&PG15_PAGE_MAGIC.to_le_bytes());
        p.extend_from_slice(&(0x0002u16 | (rng.next() as u16 & !0x0002)).to_le_bytes());
        p.extend_from_slice(&tli.to_le_bytes());
        p.extend_from_slice(&addr.to_le_bytes());
        p.extend_from_slice(&(rng.next() as u32).to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&sys.to_le_bytes());
        p.extend_from_slice(&seg_size.to_le_bytes());
        p.extend_from_slice(&blcksz.to_le_bytes());
        let h = wal::parse_long_page_header(&p).expect("valid long header");
        assert_eq!(
            (
                h.timeline,
                h.page_addr,
                h.system_id,
                h.seg_size,
                h.block_size
            ),
            (TimelineId(tli), addr, SystemId(sys), seg_size, blcksz)
        );
        assert!(wal::parse_long_page_header(&p[..39]).is_err());
        let mut bad = p.clone();
        bad[33] ^= 0x80; // seg_size no longer a power of two in range
        assert!(wal::parse_long_page_header(&bad).is_err());
        let mut short = p.clone();
        short[2] &= !0x02; // no XLP_LONG_HEADER
        assert!(wal::parse_long_page_header(&short).is_err());
    }
}

#[test]
fn chunks_round_trip() {
    let mut rng = Rng(7);
    for _ in 0..CASES {
        let data = rng.blob(1, 70_000);
        let id = ChunkId::of(&data);
        let frame = chunk::compress(&data, 3);
        assert_eq!(
            chunk::decode(&id, &frame, data.len() as u32).as_ref(),
            Ok(&data)
        );
        assert!(chunk::decode(&id, &frame, data.len() as u32 + 1).is_err());
        assert!(chunk::decode(&id, &frame, data.len() as u32 - 1).is_err());
        let cut = rng.range(0, frame.len() as u64 - 1) as usize;
        assert!(chunk::decode(&id, &frame[..cut], data.len() as u32).is_err());
    }
}

#[test]
fn frames_of_several_chunks_round_trip() {
    let mut rng = Rng(11);
    let ids = ChunkIds::Sha256;
    for _ in 0..CASES {
        let datas: Vec<Vec<u8>> = (0..rng.range(1, 40)).map(|_| rng.blob(1, 9000)).collect();
        let frame = chunk::compress(&datas.concat(), 1);
        let total: usize = datas.iter().map(Vec::len).sum();
        assert_eq!(chunk::frame_len("chunk", &frame), Ok(total as u64));
        assert_eq!(
            chunk::decode_frame(&frame).as_deref(),
            Ok(&datas.concat()[..])
        );
        let mut at = Vec::with_capacity(datas.len());
        let mut skip = 0u32;
        for d in &datas {
            at.push(skip);
            skip += d.len() as u32;
        }
        // A random contiguous run decodes to exactly its chunks, after what `out` held.
        let lo = rng.range(0, datas.len() as u64 - 1) as usize;
        let hi = rng.range(lo as u64 + 1, datas.len() as u64) as usize;
        let run: Vec<(ChunkId, u32, u32)> = (lo..hi)
            .map(|k| (ChunkId::of(&datas[k]), at[k], datas[k].len() as u32))
            .collect();
        let mut out = b"head".to_vec();
        chunk::decode_run(&ids, &frame, &run, &mut out).expect("run decodes");
        assert_eq!(&out[..4], b"head");
        assert_eq!(&out[4..], &datas[lo..hi].concat()[..]);
        // A wrong skip, a ulen past the frame, a cut frame: refused, nothing appended.
        let n = out.len();
        let mut shifted = run.clone();
        shifted[0].1 += 1;
        assert!(chunk::decode_run(&ids, &frame, &shifted, &mut out).is_err());
        let mut long = run.clone();
        let last = long.len() - 1;
        long[last].2 += (total - (at[hi - 1] as usize + datas[hi - 1].len())) as u32 + 1;
        assert!(chunk::decode_run(&ids, &frame, &long, &mut out).is_err());
        let cut = rng.range(0, frame.len() as u64 - 1) as usize;
        assert!(chunk::decode_run(&ids, &frame[..cut], &run, &mut out).is_err());
        assert_eq!(out.len(), n);
    }
}

/// A host name of 0..=`MAX_HOST` bytes, mixing ASCII with 2-, 3- and 4-byte characters.
fn host(rng: &mut Rng) -> String {
    const CHARS: &[char] = &['a', 'z', '0', '-', '.', 'é', 'ß', '€', '日', '🦀'];
    let want = rng.range(0, MAX_HOST as u64) as usize;
    let mut s = String::new();
    loop {
        let c = *rng.pick(CHARS);
        if s.len() + c.len_utf8() > want {
            return s;
        }
        s.push(c);
    }
}

fn nonce(rng: &mut Rng) -> String {
    hex::encode(&rng.id()[..16])
}

#[test]
fn leases_round_trip_and_refuse_damage() {
    let mut rng = Rng(8);
    for _ in 0..CASES * 3 {
        let kind = *rng.pick(&[LeaseKind::Backup, LeaseKind::Expire]);
        let l = Lease {
            kind,
            created_us: rng.next() as i64,
            expires_us: rng.next() as i64,
            pid: rng.next() as u32,
            host: host(&mut rng),
        };
        let b = l.encode();
        assert_eq!(b.len(), 33 + l.host.len() + 32);
        assert_eq!(Lease::decode(&b).as_ref(), Ok(&l));
        let n = nonce(&mut rng);
        let key = keys::lease(kind, &n).expect("generated nonce is valid");
        assert_eq!(keys::parse_lease(&key), Some((kind, n.as_str())));
        assert_eq!(Lease::decode_for_key(&key, &b).as_ref(), Ok(&l));
        let other = match kind {
            LeaseKind::Backup => LeaseKind::Expire,
            LeaseKind::Expire => LeaseKind::Backup,
        };
        let other_key = keys::lease(other, &n).expect("generated nonce is valid");
        assert!(Lease::decode_for_key(&other_key, &b).is_err());
        let at = rng.range(0, b.len() as u64 - 1) as usize;
        let mut bad = b.clone();
        bad[at] ^= 1 << rng.range(0, 7);
        assert!(Lease::decode(&bad).is_err(), "flip at {at} accepted");
        assert!(Lease::decode(&b[..at]).is_err(), "cut at {at} accepted");
    }
}

// The encoder cuts a host longer than MAX_HOST bytes at a character boundary, so the lease still
// decodes and its host is the longest such prefix.
#[test]
fn leases_with_long_hosts_still_decode() {
    let mut rng = Rng(9);
    for _ in 0..CASES {
        let mut long = host(&mut rng);
        while long.len() <= MAX_HOST {
            long.push(*rng.pick(&['x', 'é', '€', '🦀']));
        }
        let l = Lease {
            kind: LeaseKind::Backup,
            created_us: 0,
            expires_us: 1,
            pid: 1,
            host: long.clone(),
        };
        let back = Lease::decode(&l.encode()).expect("a long host still decodes");
        assert!(back.host.len() <= MAX_HOST && back.host.len() > MAX_HOST - 4);
        assert!(long.starts_with(&back.host));
        assert!(
            back.host.len()
                + long[back.host.len()..]
                    .chars()
                    .next()
                    .map_or(0, char::len_utf8)
                > MAX_HOST
        );
    }
}

#[test]
fn gc_states_round_trip_and_refuse_damage() {
    let mut rng = Rng(10);
    for case in 0..CASES {
        let n = if case % 10 == 0 { 0 } else { rng.range(1, 200) };
        let set: std::collections::BTreeSet<PackId> = (0..n).map(|_| PackId(rng.id())).collect();
        let s = GcState {
            condemned_us: rng.next() as i64,
            packs: set.into_iter().collect(),
        };
        let b = s.encode();
        assert_eq!(b.len(), 20 + 32 * s.packs.len() + 32);
        assert_eq!(GcState::decode(&b).as_ref(), Ok(&s));
        let nonce = nonce(&mut rng);
        let key = keys::gc_state(&nonce).expect("generated nonce is valid");
        assert_eq!(keys::parse_gc_state(&key), Some(nonce.as_str()));
        let at = rng.range(0, b.len() as u64 - 1) as usize;
        let mut bad = b.clone();
        bad[at] ^= 1 << rng.range(0, 7);
        assert!(GcState::decode(&bad).is_err(), "flip at {at} accepted");
        assert!(GcState::decode(&b[..at]).is_err(), "cut at {at} accepted");
        // Swapping two neighbours (re-encoded, so the trailer is valid) is refused.
        if s.packs.len() >= 2 {
            let i = rng.range(0, s.packs.len() as u64 - 2) as usize;
            let mut swapped = s.clone();
            swapped.packs.swap(i, i + 1);
            assert!(GcState::decode(&swapped.encode()).is_err(), "swap at {i}");
        }
    }
}
