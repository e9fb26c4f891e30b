//! `Manifest::decode` and `ManifestHeader::decode_prefix` on arbitrary bytes, and on the same
//! bytes with a valid sha256 trailer (appended, or replacing the last 32 bytes) so that
//! mutations reach the field checks.
//! Invariants: a manifest that decodes re-encodes to the same bytes up to the minor version when
//! written with the major it was decoded with (a manifest in parts, major 2 or 4, re-encodes
//! whole: major 1 or 3); writers' own encoding (major 3) decodes to the same manifest; a manifest
//! of major 1 or 2 holds no skip and every reference lies within the largest frame; its header
//! also decodes from the prefix, its backup ids (own and parent) are valid manifest keys, and
//! every path is a plain relative path whose parent is a directory entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::chunk::MAX_FRAME_SIZE;
use tidemark_format::keys;
use tidemark_format::manifest::parts::{major_has_frames, major_of, FRAMES_MAJOR};
use tidemark_format::manifest::{validate_path, EntryKind, Manifest, ManifestHeader};

fn check(buf: &[u8]) {
    let prefix = ManifestHeader::decode_prefix(buf);
    let Ok(m) = Manifest::decode(buf) else {
        return;
    };
    assert_eq!(prefix.as_ref(), Ok(&m.header));
    let major = u16::from_le_bytes([buf[4], buf[5]]);
    let frames = major_has_frames(major);
    // A manifest stored in parts (major 2 or 4) decodes from its parts put together to the same
    // manifest, which encodes whole (major 1 or 3): the parts are a storage layout.
    let whole = major_of(frames, false);
    let again = m
        .encode_as(whole)
        .expect("a decoded manifest's entries fit its own major");
    assert_eq!(again.len(), buf.len());
    assert_eq!(again[..4], buf[..4], "magic");
    assert_eq!(again[4..6], whole.to_le_bytes(), "major");
    assert_eq!(again[8..again.len() - 32], buf[8..buf.len() - 32], "body");
    assert_eq!(Manifest::decode(&again).as_ref(), Ok(&m));
    // Writers write major 3, whatever was read.
    let written = m.encode();
    assert_eq!(written[4..6], FRAMES_MAJOR.to_le_bytes());
    assert_eq!(Manifest::decode(&written).as_ref(), Ok(&m));
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
            assert!(f
                .chunks
                .iter()
                .all(|c| c.skip as u64 + c.ulen as u64 <= MAX_FRAME_SIZE as u64));
            assert!(frames || f.chunks.iter().all(|c| c.skip == 0));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    tidemark_fuzz::with_and_without_trailer(data, check);
});
