//! `wal::decode_header` and `wal::decode` on arbitrary bytes; when the header decodes and the
//! frame decompresses, the digest field is patched (by the function the object's major names:
//! SHA-256 in major 1, BLAKE3 in major 2) so the full decode's success path is reached.
//! Invariants: the header re-encodes to the same bytes (up to the minor version, built here
//! independently from FORMAT.md), and a decoded object re-encodes to one that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::chunk::decompress_exact;
use tidemark_format::wal::{self, WalDigest, WalObjectHeader};

/// The header bytes as FORMAT.md lays them out, with minor version 0.
fn header_bytes(h: &WalObjectHeader) -> Vec<u8> {
    let name = h.name.to_string();
    let major: u16 = match h.digest {
        WalDigest::Sha256(_) => 1,
        WalDigest::Blake3(_) => 2,
    };
    let mut v = b"TMWL".to_vec();
    v.extend_from_slice(&major.to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v.push(h.name.kind_code());
    v.extend_from_slice(&(name.len() as u32).to_le_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&h.size.to_le_bytes());
    v.extend_from_slice(h.digest.as_bytes());
    v
}

fn check(buf: &[u8]) {
    let Ok((h, at)) = wal::decode_header(buf) else {
        assert!(wal::decode(buf).is_err());
        return;
    };
    let expect = header_bytes(&h);
    assert_eq!(at, expect.len());
    assert_eq!(buf[..6], expect[..6]);
    assert_eq!(buf[8..at], expect[8..]);
    assert!(h.size <= h.name.max_size());
    if let Ok((h2, data)) = wal::decode(buf) {
        assert_eq!(h2, h);
        assert_eq!(data.len() as u64, h.size);
        assert_eq!(h.digest.of_same_kind(&data), h.digest);
        // Writers write major 2 whatever they read; the header re-encodes as read.
        let again = wal::encode(h.name, &data, 3);
        let (h3, back) = wal::decode(&again).expect("a re-encoded object decodes");
        assert_eq!((h3.name, h3.size, h3.digest), (h.name, h.size, WalDigest::of(&data)));
        assert_eq!(back, data);
        let same = wal::encode_with_frame(&h, &again[wal::decode_header(&again).unwrap().1..]);
        assert_eq!(same[..at], expect[..]);
        assert_eq!(wal::decode(&same), Ok((h, data)));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Make the stored digest match the frame's content so mutations reach the success path.
    if let Ok((h, at)) = wal::decode_header(data) {
        if h.size <= 1 << 24 {
            if let Ok(content) = decompress_exact("fuzz", &data[at..], h.size) {
                let mut fixed = data.to_vec();
                fixed[at - 32..at].copy_from_slice(h.digest.of_same_kind(&content).as_bytes());
                let (h2, back) = wal::decode(&fixed).expect("patched object decodes");
                assert_eq!((h2.name, h2.size, back), (h.name, h.size, content));
                check(&fixed);
            }
        }
    }
});
