//! `pack::decode` on arbitrary bytes, then `chunk::decode` of every entry's frame.
//! Invariants: every entry lies inside the pack; the pack rebuilt from its frames is the same
//! bytes (up to the minor version); a chunk that decodes has its declared length and id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::pack::{self, PackBuilder, HEADER_LEN};
use tidemark_format::{chunk, ChunkId};

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = pack::decode(data) else {
        return;
    };
    let mut rebuilt = PackBuilder::new();
    let mut next = HEADER_LEN;
    for e in &entries {
        assert_eq!(e.offset, next, "entries are contiguous from the header");
        let end = e.offset + e.clen as u64;
        assert!(end <= data.len() as u64, "entry inside the pack");
        next = end;
        let frame = &data[e.offset as usize..end as usize];
        if let Ok(bytes) = chunk::decode(&e.id, frame, e.ulen) {
            assert_eq!(bytes.len(), e.ulen as usize);
            assert_eq!(ChunkId::of(&bytes), e.id);
        }
        assert_eq!(rebuilt.push(e.id, frame, e.ulen), *e);
    }
    let (_, again) = rebuilt.finish();
    assert_eq!(again.len(), data.len());
    assert_eq!(again[..6], data[..6]);
    assert_eq!(again[8..], data[8..]);
    assert_eq!(pack::decode(&again).as_ref(), Ok(&entries));
});
