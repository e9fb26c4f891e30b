//! `WalFileName::parse` on arbitrary strings.
//! Invariants: a parsed name prints back to exactly the input, parses again to the same value,
//! has a non-zero timeline, and its repository key parses back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::keys;
use tidemark_format::wal::WalFileName;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = WalFileName::parse(s) {
        assert_eq!(n.to_string(), s);
        assert_eq!(WalFileName::parse(&n.to_string()), Ok(n));
        assert_ne!(n.timeline().0, 0);
        assert_eq!(keys::parse_wal(&keys::wal(&n)), Some(n));
        assert!(n.max_size() >= 1 << 24);
        if let Some(segno) = n.segment_number(16 << 20) {
            let lsn = tidemark_format::Lsn(segno.wrapping_mul(16 << 20));
            if segno < (1u64 << 40) {
                assert_eq!(
                    WalFileName::segment_of(n.timeline(), lsn, 16 << 20).segment_number(16 << 20),
                    Some(segno)
                );
            }
        }
    }
});
