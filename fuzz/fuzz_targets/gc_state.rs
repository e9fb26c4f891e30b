//! `GcState::decode` on arbitrary bytes, and on the same bytes with a valid sha256 trailer
//! (appended, or replacing the last 32 bytes) so that mutations reach the field checks.
//! Invariants: a GC state that decodes lists strictly increasing pack ids, holds exactly the
//! bytes its count declares, re-encodes to the same bytes up to the minor version and decodes
//! again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::lock::GcState;

fn check(buf: &[u8]) {
    let Ok(s) = GcState::decode(buf) else {
        return;
    };
    assert!(
        s.packs.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing"
    );
    assert_eq!(buf.len(), 20 + 32 * s.packs.len() + 32);
    let again = s.encode();
    assert_eq!(again.len(), buf.len());
    assert_eq!(again[..6], buf[..6], "magic and major");
    assert_eq!(again[8..again.len() - 32], buf[8..buf.len() - 32], "fields");
    assert_eq!(GcState::decode(&again).as_ref(), Ok(&s));
}

fuzz_target!(|data: &[u8]| {
    tidemark_fuzz::with_and_without_trailer(data, check);
});
