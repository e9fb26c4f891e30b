//! `Manifest::decode` and `ManifestHeader::decode_prefix` on arbitrary bytes, and on the same
//! bytes with a valid sha256 trailer (appended, or replacing the last 32 bytes) so that
//! mutations reach the field checks.
//! Invariants: a manifest that decodes re-encodes to the same bytes up to the minor version (and
//! the major of a manifest in parts), its header also decodes from the prefix, its backup ids
//! (own and parent) are valid manifest keys, and every path is a plain relative path whose
//! parent is a directory entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::keys;
use tidemark_format::manifest::parts::PARTED_MAJOR;
use tidemark_format::manifest::{validate_path, EntryKind, Manifest, ManifestHeader};

fn check(buf: &[u8]) {
    let prefix = ManifestHeader::decode_prefix(buf);
    let Ok(m) = Manifest::decode(buf) else {
        return;
    };
    assert_eq!(prefix.as_ref(), Ok(&m.header));
    let again = m.encode();
    assert_eq!(again.len(), buf.len());
    assert_eq!(again[..4], buf[..4], "magic");
    // A manifest stored in parts (major 2) decodes from its parts put together to the same
    // manifest, which encodes whole (major 1): the parts are a storage layout.
    assert!(
        again[4..6] == buf[4..6] || buf[4..6] == PARTED_MAJOR.to_le_bytes(),
        "major"
    );
    assert_eq!(again[8..again.len() - 32], buf[8..buf.len() - 32], "body");
    assert_eq!(Manifest::decode(&again).as_ref(), Ok(&m));
    // Backup ids, the parent's included, name manifest keys: both must round-trip as keys.
    let h = &m.header;
    for id in std::iter::once(&h.backup_id).chain(h.parent.as_ref()) {
        assert_eq!(keys::parse_manifest(&keys::manifest(id)), Some(id.as_str()));
    }
    for w in m.entries.windows(2) {
        assert!(w[0].path.as_bytes() < w[1].path.as_bytes());
    }
    let dirs: std::collections::HashSet<&str> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Dir)
        .map(|e| e.path.as_str())
        .collect();
    for e in &m.entries {
        assert!(validate_path(&e.path).is_ok());
        if let Some((parent, _)) = e.path.rsplit_once('/') {
            assert!(
                dirs.contains(parent),
                "{:?} has no directory parent",
                e.path
            );
        }
        assert!(!e.path.starts_with('/'));
        assert!(!e
            .path
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty()));
        if let EntryKind::File(f) = &e.kind {
            assert_eq!(f.chunks.iter().map(|c| c.ulen as u64).sum::<u64>(), f.size);
            assert!(f.chunks.iter().all(|c| (c.pack as usize) < m.packs.len()));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    tidemark_fuzz::with_and_without_trailer(data, check);
});
