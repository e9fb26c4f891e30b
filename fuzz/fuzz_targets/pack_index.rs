//! `pack::decode_index`. Input: 8 bytes little-endian `blobs_end`, then the index bytes.
//! Invariant: whatever decodes re-encodes to exactly the same bytes (the index has no version).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::pack;

fuzz_target!(|data: &[u8]| {
    let Some((end, index)) = data.split_first_chunk::<8>() else {
        return;
    };
    let blobs_end = u64::from_le_bytes(*end);
    if let Ok(entries) = pack::decode_index(index, blobs_end) {
        assert_eq!(pack::encode_index(&entries), index);
        let covered = entries
            .last()
            .map_or(pack::HEADER_LEN, |e| e.offset + e.clen as u64);
        assert_eq!(covered, blobs_end);
    }
});
