//! The key parsers of `keys` (packs, manifests, WAL, leases, GC states, cluster records) on arbitrary strings.
//! Invariant: a key that parses is rebuilt exactly by its constructor, so no other spelling of
//! a key (case, extra components, `..`) is ever accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::keys;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(id) = keys::parse_pack(s) {
        assert_eq!(keys::pack(&id), s);
    }
    if let Some(id) = keys::parse_manifest(s) {
        assert_eq!(keys::manifest(id), s);
        assert!(!id.contains('/') && !id.starts_with('.'));
    }
    if let Some(n) = keys::parse_wal(s) {
        assert_eq!(keys::wal(&n), s);
    }
    if let Some((kind, nonce)) = keys::parse_lease(s) {
        assert_eq!(keys::lease(kind, nonce).as_deref(), Some(s));
    }
    if let Some(nonce) = keys::parse_gc_state(s) {
        assert_eq!(keys::gc_state(nonce).as_deref(), Some(s));
    }
    if let Some(id) = keys::parse_cluster(s) {
        assert_eq!(keys::cluster(id), s);
    }
});
