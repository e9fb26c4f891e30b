//! `wal::decode_header` and `wal::decode` on arbitrary bytes; when the header decodes and the
//! frame decompresses, the sha256 field is patched so the full decode's success path is reached.
//! Invariants: the header re-encodes to the same bytes (up to the minor version, built here
//! independently from FORMAT.md), and a decoded object re-encodes to one that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::chunk::decompress_exact;
use tidemark_format::wal::{self, WalObjectHeader};
use tidemark_format::ChunkId;

/// The header bytes as FORMAT.md lays them out, with minor version 0.
fn header_bytes(h: &WalObjectHeader) -> Vec<u8> {
    let name = h.name.to_string();
    let mut v = b"TMWL\x01\x00\x00\x00".to_vec();
    v.push(h.name.kind_code());
    v.extend_from_slice(&(name.len() as u32).to_le_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&h.size.to_le_bytes());
    v.extend_from_slice(h.sha256.as_bytes());
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
        assert_eq!(ChunkId::of(&data), h.sha256);
        let again = wal::encode(h.name, &data, 3);
        assert_eq!(again[..at], expect[..]);
        assert_eq!(wal::decode(&again), Ok((h, data)));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Make the stored sha256 match the frame's content so mutations reach the success path.
    if let Ok((h, at)) = wal::decode_header(data) {
        if h.size <= 1 << 24 {
            if let Ok(content) = decompress_exact("fuzz", &data[at..], h.size) {
                let mut fixed = data.to_vec();
                fixed[at - 32..at].copy_from_slice(ChunkId::of(&content).as_bytes());
                let (h2, back) = wal::decode(&fixed).expect("patched object decodes");
                assert_eq!((h2.name, h2.size, back), (h.name, h.size, content));
                check(&fixed);
            }
        }
    }
});
