use super::*;

fn keys(b: u8) -> DataKeys {
    DataKeys::derive(&[b; 32])
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn counter_salt() -> impl FnMut(&mut [u8; SALT_LEN]) {
    let mut n = 0u8;
    move |s| {
        n = n.wrapping_add(1);
        *s = [n; SALT_LEN];
    }
}

const SIZES: [usize; 8] = [0, 1, 100, 65535, 65536, 65537, 131072, 200_000];

#[test]
fn round_trip_and_lengths() {
    let k = keys(1);
    for n in SIZES {
        let p = data(n);
        let s = seal(&k, "packs/ab/x", &p).unwrap();
        assert_eq!(s.len() as u64, sealed_len(n as u64), "size {n}");
        assert_eq!(plain_len(s.len() as u64).unwrap(), n as u64);
        assert_eq!(open(&k, "packs/ab/x", &s).unwrap(), p, "size {n}");
        assert!(is_sealed(&s));
    }
}

#[test]
fn impossible_lengths_are_refused() {
    for sealed in 0..HEADER_LEN + OVERHEAD {
        assert!(plain_len(sealed).is_err(), "{sealed}");
    }
    // A full segment followed by a piece too short to hold a segment's salt and tag.
    assert!(plain_len(HEADER_LEN + STORED_SEGMENT + 10).is_err());
    // A full segment followed by an empty one is impossible too (only an empty object has one).
    assert!(plain_len(HEADER_LEN + STORED_SEGMENT + OVERHEAD).is_err());
    for n in 0..3 * SEGMENT + 5 {
        if n % 997 == 0 || n % SEGMENT < 3 || SEGMENT - n % SEGMENT < 3 {
            assert_eq!(plain_len(sealed_len(n)).unwrap(), n);
        }
    }
}

#[test]
fn every_range_reads_back() {
    let k = keys(2);
    let p = data(200_000);
    let s = seal(&k, "o", &p).unwrap();
    let ranges = [
        0..1u64,
        0..200_000,
        5..65536,
        65535..65537,
        65536..131072,
        131071..200_000,
        199_999..200_000,
        70_000..70_100,
    ];
    for r in ranges {
        let rr = range_read(r.clone());
        let end = rr.stored.end.min(s.len() as u64);
        let fetched = &s[rr.stored.start as usize..end as usize];
        assert_eq!(
            rr.open(&k, "o", fetched).unwrap(),
            p[r.start as usize..r.end as usize],
            "{r:?}"
        );
    }
    // A range past the end of the object is refused, not padded.
    let rr = range_read(199_000..200_001);
    let fetched = &s[rr.stored.start as usize..];
    assert!(matches!(
        rr.open(&k, "o", fetched),
        Err(FormatError::Truncated { .. })
    ));
}

#[test]
fn tampering_is_refused() {
    let k = keys(3);
    let p = data(150_000);
    let s = seal(&k, "wal/00000001/000000010000000000000001", &p).unwrap();
    let name = "wal/00000001/000000010000000000000001";
    // Another key (object moved), another repository key, a flipped bit.
    assert!(open(&k, "wal/00000001/000000010000000000000002", &s).is_err());
    assert!(open(&keys(4), name, &s).is_err());
    for at in [0usize, 9, 40, 70_000, s.len() - 1] {
        let mut t = s.clone();
        t[at] ^= 1;
        assert!(open(&k, name, &t).is_err(), "flip at {at}");
    }
    // Cut after the first two segments: same length as a genuine two-segment object, but the
    // second segment is not marked last.
    let cut = &s[..(HEADER_LEN + 2 * STORED_SEGMENT) as usize];
    let e = open(&k, name, cut).unwrap_err().to_string();
    assert!(e.contains("segment 1"), "{e}");
    // Two segments swapped.
    let mut sw = s.clone();
    let a = HEADER_LEN as usize;
    let b = a + STORED_SEGMENT as usize;
    let seg0 = s[a..b].to_vec();
    sw[a..b].copy_from_slice(&s[b..b + STORED_SEGMENT as usize]);
    sw[b..b + STORED_SEGMENT as usize].copy_from_slice(&seg0);
    assert!(open(&k, name, &sw).is_err());
    // A plaintext object where an envelope is required.
    let e = open(&k, "config", b"TMCF\x01\x00\x00\x00rest").unwrap_err();
    assert!(matches!(e, FormatError::BadMagic { .. }), "{e}");
    assert!(open(&k, "config", b"").is_err());
}

#[test]
fn keyed_chunk_ids_differ_by_repository_and_from_sha256() {
    let a = keys(5);
    let b = keys(6);
    let page = data(8192);
    let ia = a.chunk_ids().id(&page);
    assert_eq!(ia, a.chunk_ids().id(&page), "deterministic: dedup works");
    assert_ne!(ia, b.chunk_ids().id(&page));
    assert_ne!(ia, ChunkId::of(&page));
    assert_eq!(ChunkIds::Sha256.id(&page), ChunkId::of(&page));
}

#[test]
fn deterministic_salts_give_deterministic_bytes() {
    let k = keys(7);
    let a = seal_with(&k, "config", b"abc", counter_salt());
    let b = seal_with(&k, "config", b"abc", counter_salt());
    assert_eq!(a, b);
    assert_eq!(open(&k, "config", &a).unwrap(), b"abc");
}

/// The multi-buffer ids equal the one-by-one ids (sha2, HMAC) for every batch size that fills
/// the hasher's lanes partly, fully or over, and lengths at SHA-256's block and padding edges,
/// the page, and above.
#[test]
fn batch_ids_equal_one_by_one_ids() {
    let lens = [
        0usize,
        1,
        55,
        56,
        57,
        63,
        64,
        65,
        119,
        120,
        127,
        128,
        1000,
        8191,
        8192,
        8193,
        65536,
        1 << 20,
    ];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let data: Vec<u8> = (0..(3 << 20)).map(|_| next() as u8).collect();
    let keyed = DataKeys::derive(&[7; 32]);
    for ids in [&ChunkIds::Sha256, keyed.chunk_ids()] {
        for n in [1usize, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 129] {
            let chunks: Vec<&[u8]> = (0..n)
                .map(|k| {
                    let len = lens[(k * 7 + n) % lens.len()];
                    let at = (k * 4099) % (data.len() - len);
                    &data[at..at + len]
                })
                .collect();
            let one: Vec<ChunkId> = chunks.iter().map(|c| ids.id(c)).collect();
            assert_eq!(ids.ids(&chunks), one, "{ids:?}, batch of {n}");
        }
    }
    assert!(ChunkIds::Sha256.ids(&[]).is_empty());
    assert_eq!(ChunkIds::Sha256.ids(&[b"abc"])[0], ChunkId::of(b"abc"));
}
