//! `Lease::decode` and `Lease::decode_for_key` on arbitrary bytes, and on the same bytes with a
//! valid sha256 trailer (appended, or replacing the last 32 bytes) so that mutations reach the
//! field checks.
//! Invariants: a lease that decodes re-encodes to the same bytes up to the minor version and
//! decodes again to the same value; its host is at most 255 bytes; it decodes under a key of its
//! own kind and is refused under a key of the other kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::keys;
use tidemark_format::lock::{Lease, LeaseKind, MAX_HOST};

const NONCE: &str = "0123456789abcdef0123456789abcdef";

fn check(buf: &[u8]) {
    let Ok(l) = Lease::decode(buf) else {
        return;
    };
    assert!(l.host.len() <= MAX_HOST);
    let again = l.encode();
    assert_eq!(again.len(), buf.len());
    assert_eq!(again[..6], buf[..6], "magic and major");
    assert_eq!(again[8..again.len() - 32], buf[8..buf.len() - 32], "fields");
    assert_eq!(Lease::decode(&again).as_ref(), Ok(&l));
    let other = match l.kind {
        LeaseKind::Backup => LeaseKind::Expire,
        LeaseKind::Expire => LeaseKind::Backup,
    };
    let own_key = keys::lease(l.kind, NONCE).expect("valid nonce");
    let other_key = keys::lease(other, NONCE).expect("valid nonce");
    assert_eq!(Lease::decode_for_key(&own_key, buf).as_ref(), Ok(&l));
    assert!(Lease::decode_for_key(&other_key, buf).is_err());
}

fuzz_target!(|data: &[u8]| {
    tidemark_fuzz::with_and_without_trailer(data, check);
});
