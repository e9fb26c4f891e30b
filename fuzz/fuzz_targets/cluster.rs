//! `ClusterRecord::decode` on arbitrary bytes, and on the same bytes with a valid sha256 trailer
//! (appended, or replacing the last 32 bytes) so that mutations reach the field checks.
//! Invariant: whatever decodes re-encodes to the same bytes, up to the minor version.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::cluster::ClusterRecord;

fn check(buf: &[u8]) {
    if let Ok(c) = ClusterRecord::decode(buf) {
        let again = c.encode();
        assert_eq!(again.len(), buf.len());
        assert_eq!(again[..6], buf[..6], "magic and major");
        assert_eq!(again[8..again.len() - 32], buf[8..buf.len() - 32], "fields");
        assert_eq!(ClusterRecord::decode(&again), Ok(c));
    }
}

fuzz_target!(|data: &[u8]| {
    tidemark_fuzz::with_and_without_trailer(data, check);
});
