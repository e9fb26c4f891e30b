//! `pack::decode_index`. Input: 8 bytes little-endian `blobs_end`, then the index bytes.
//! Invariant: whatever decodes re-encodes to exactly the same bytes with the magic it was decoded
//! with (`TMPF`: entries with a skip, format 1.4; `TMPX`: without, every skip 0); the index has
//! no version of its own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::chunk::MAX_FRAME_SIZE;
use tidemark_format::pack;

fuzz_target!(|data: &[u8]| {
    let Some((end, index)) = data.split_first_chunk::<8>() else {
        return;
    };
    let blobs_end = u64::from_le_bytes(*end);
    if let Ok(entries) = pack::decode_index(index, blobs_end) {
        let frames = index[..4] == pack::FRAMES_INDEX_MAGIC;
        assert_eq!(pack::encode_index_as(&entries, frames), index);
        if frames {
            assert_eq!(pack::encode_index(&entries), index);
        } else {
            assert!(entries.iter().all(|e| e.skip == 0));
        }
        // Written with skips, every index decodes to the same entries.
        assert_eq!(
            pack::decode_index(&pack::encode_index(&entries), blobs_end).as_ref(),
            Ok(&entries)
        );
        for e in &entries {
            assert!(e.skip as u64 + e.ulen as u64 <= MAX_FRAME_SIZE as u64);
        }
        let covered = entries
            .last()
            .map_or(pack::HEADER_LEN, |e| e.offset + e.clen as u64);
        assert_eq!(covered, blobs_end);
    }
});
