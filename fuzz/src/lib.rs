//! Shared by the fuzz targets.

use tidemark_format::ChunkId;

/// Runs `check` on `data`, on `data` with a valid sha256 trailer appended, and on `data` with its
/// last 32 bytes replaced by a valid trailer, so that mutations reach the checks behind the
/// checksum of objects that end in one (config, manifest, lease, GC state).
pub fn with_and_without_trailer(data: &[u8], check: impl Fn(&[u8])) {
    check(data);
    check(&with_trailer(data));
    if data.len() >= 32 {
        check(&with_trailer(&data[..data.len() - 32]));
    }
}

fn with_trailer(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    v.extend_from_slice(ChunkId::of(body).as_bytes());
    v
}
