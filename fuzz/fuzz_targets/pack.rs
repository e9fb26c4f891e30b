//! `pack::decode` on arbitrary bytes, then `chunk::decode_run` of every frame's chunks.
//! Invariants: every entry lies inside the pack and within the largest frame; the entries of one
//! frame share its place and follow each other in it; the pack rebuilt from its frames
//! (`push_frame`, one call per frame) has the same entries and, with the index magic it was
//! decoded with, the same bytes (up to the minor version); chunks that decode have their
//! declared lengths and ids, together and alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::chunk::{self, MAX_FRAME_SIZE};
use tidemark_format::pack::{
    self, PackBuilder, PackEntry, FOOTER_LEN, FRAMES_INDEX_MAGIC, HEADER_LEN,
};
use tidemark_format::seal::ChunkIds;
use tidemark_format::ChunkId;

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = pack::decode(data) else {
        return;
    };
    // The index magic says whether entries carry a skip (TMPF, major 2 only) or not (TMPX).
    let n = data.len();
    let index_len = u32::from_le_bytes(data[n - 8..n - 4].try_into().expect("4 bytes")) as usize;
    let index_start = n - FOOTER_LEN - index_len;
    let frames = data[index_start..index_start + 4] == FRAMES_INDEX_MAGIC;
    assert!(
        !frames || data[4..6] == pack::FRAMES_MAJOR.to_le_bytes(),
        "TMPF in major 2 only"
    );

    // Group the entries by frame: an entry continues the frame before it or starts the next.
    let mut groups: Vec<&[PackEntry]> = Vec::new();
    let mut next = HEADER_LEN;
    let mut i = 0;
    while i < entries.len() {
        let first = entries[i];
        assert_eq!(first.offset, next, "frames are contiguous from the header");
        assert_eq!(first.skip, 0, "a frame's first entry is at skip 0");
        let end = first.offset + first.clen as u64;
        assert!(end <= index_start as u64, "frame inside the blobs");
        next = end;
        let mut j = i + 1;
        while j < entries.len()
            && (entries[j].offset, entries[j].clen) == (first.offset, first.clen)
        {
            let p = entries[j - 1];
            assert_eq!(entries[j].skip as u64, p.skip as u64 + p.ulen as u64);
            j += 1;
        }
        for e in &entries[i..j] {
            assert!(e.skip as u64 + e.ulen as u64 <= MAX_FRAME_SIZE as u64);
            assert!(frames || e.skip == 0, "no skip in a TMPX index");
        }
        groups.push(&entries[i..j]);
        i = j;
    }
    assert_eq!(next, index_start as u64, "frames tile the blobs");

    let ids = ChunkIds::Sha256;
    let mut rebuilt = PackBuilder::new();
    for group in &groups {
        let e0 = group[0];
        let frame = &data[e0.offset as usize..(e0.offset + e0.clen as u64) as usize];
        let run: Vec<(ChunkId, u32, u32)> = group.iter().map(|e| (e.id, e.skip, e.ulen)).collect();
        let mut out = Vec::new();
        if chunk::decode_run(&ids, frame, &run, &mut out).is_ok() {
            assert_eq!(
                out.len() as u64,
                group.iter().map(|e| e.ulen as u64).sum::<u64>()
            );
            let mut at = 0;
            for e in group.iter() {
                let bytes = &out[at..at + e.ulen as usize];
                assert_eq!(ChunkId::of(bytes), e.id);
                // Alone at its skip, the chunk decodes to the same bytes.
                let mut one = Vec::new();
                chunk::decode_run(&ids, frame, &[(e.id, e.skip, e.ulen)], &mut one)
                    .expect("a chunk of a run that decodes decodes alone");
                assert_eq!(one, bytes);
                at += e.ulen as usize;
            }
        } else {
            assert!(out.is_empty(), "a failed run appends nothing");
        }
        let pairs: Vec<(ChunkId, u32)> = group.iter().map(|e| (e.id, e.ulen)).collect();
        assert_eq!(rebuilt.push_frame(frame, &pairs), *group);
    }
    // PackBuilder writes major 2 and a TMPF index: the same bytes as a pack that has them;
    // a TMPX pack differs only in its index (and major), whose entries are the same.
    let (_, again) = rebuilt.finish();
    assert_eq!(pack::decode(&again).as_ref(), Ok(&entries));
    assert_eq!(again[8..index_start], data[8..index_start], "blobs");
    if frames {
        assert_eq!(again.len(), data.len());
        assert_eq!(again[..6], data[..6]);
        assert_eq!(again[8..], data[8..]);
    } else {
        assert_eq!(
            pack::encode_index_as(&entries, false),
            data[index_start..n - FOOTER_LEN]
        );
    }
});
