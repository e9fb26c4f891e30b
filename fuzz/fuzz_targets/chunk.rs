//! `chunk::decode`. Input: 4 bytes little-endian `ulen`, then the frame.
//! The first call uses an arbitrary id; if only the checksum differs, the call is repeated with
//! the actual id so the success path is reached. Invariants: a decoded chunk has exactly `ulen`
//! bytes and sha256 = id; recompressing it gives a frame that decodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::{chunk, ChunkId, FormatError};

fuzz_target!(|data: &[u8]| {
    let Some((ulen, frame)) = data.split_first_chunk::<4>() else {
        return;
    };
    let ulen = u32::from_le_bytes(*ulen);
    let id = match chunk::decode(&ChunkId([0; 32]), frame, ulen) {
        Err(FormatError::ChecksumMismatch { actual, .. }) => actual
            .parse::<ChunkId>()
            .expect("a checksum mismatch reports the actual id as 64 lowercase hex digits"),
        _ => return,
    };
    let bytes = chunk::decode(&id, frame, ulen).expect("decodes with its actual id");
    assert_eq!(bytes.len(), ulen as usize);
    assert_eq!(ChunkId::of(&bytes), id);
    let again = chunk::compress(&bytes, 3);
    assert_eq!(chunk::decode(&id, &again, ulen).as_ref(), Ok(&bytes));
});
