//! `chunk::decode_frame`, `chunk::decode_run` and `FrameReader::read_into` (frames of several
//! chunks, format 1.4).
//! Input: 4 bytes little-endian `skip`, 4 bytes little-endian `piece`, then a frame.
//! First `decode_run` of one chunk at (`skip`, `piece`) with an arbitrary id: it must fail and
//! leave its output as it was. Then, if the frame decodes whole, its content from
//! `skip % (len + 1)` is cut into chunks of `piece` bytes (at most 64; the last may be shorter)
//! named by their sha256. Invariants: the whole frame is at most 1 MiB and as long as its header
//! declares; the run decodes to exactly those bytes, appended after what the output held; a run
//! with a shifted skip, a wrong id or a chunk past the content is refused and appends nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::chunk::{self, MAX_FRAME_SIZE};
use tidemark_format::seal::ChunkIds;
use tidemark_format::ChunkId;

fuzz_target!(|data: &[u8]| {
    let Some((skip, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Some((piece, frame)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let (skip, piece) = (u32::from_le_bytes(*skip), u32::from_le_bytes(*piece));
    let ids = ChunkIds::Sha256;
    let mut out = b"head".to_vec();
    // The id of no real chunk: never decodes.
    let nobody = ChunkId([0; 32]);
    assert!(chunk::decode_run(&ids, frame, &[(nobody, skip, piece)], &mut out).is_err());
    assert_eq!(out, b"head");

    let Ok(all) = chunk::decode_frame(frame) else {
        return;
    };
    assert!(all.len() <= MAX_FRAME_SIZE as usize);
    assert_eq!(chunk::frame_len("chunk", frame), Ok(all.len() as u64));
    let start = (skip as usize) % (all.len() + 1);
    let piece = (piece as usize % (all.len() + 1)).max(1);
    let mut run = Vec::new();
    let mut at = start;
    while at < all.len() && run.len() < 64 {
        let end = (at + piece).min(all.len());
        run.push((ChunkId::of(&all[at..end]), at as u32, (end - at) as u32));
        at = end;
    }
    chunk::decode_run(&ids, frame, &run, &mut out).expect("a run of the frame's own bytes decodes");
    assert_eq!(&out[..4], b"head");
    assert_eq!(out[4..], all[start..at]);
    // The same run through a frame reader into a slice: the same bytes, straight in or from
    // the frame held; a slice of another length is refused.
    let mut frames = chunk::FrameReader::default();
    let mut slice = vec![0u8; at - start];
    frames
        .read_into(&ids, 0, frame, &run, &mut slice)
        .expect("a run of the frame's own bytes decodes into a slice");
    assert_eq!(slice, all[start..at]);
    if let Some(&one) = run.last() {
        frames
            .read_into(&ids, 0, frame, &[one], &mut slice[..one.2 as usize])
            .expect("a piece of the frame held decodes");
        let mut longer = vec![0u8; one.2 as usize + 1];
        assert!(frames
            .read_into(&ids, 0, frame, &[one], &mut longer)
            .is_err());
    }
    let Some(&(first, _, _)) = run.first() else {
        return;
    };
    let n = out.len();
    // Shifted by a byte, a run of several chunks no longer follows itself; a single chunk may
    // still read the same bytes (a run of equal bytes), which is then its id.
    let mut shifted = run.clone();
    shifted[0].1 += 1;
    let (s0, u0) = (shifted[0].1 as usize, shifted[0].2 as usize);
    let same = run.len() == 1 && s0 + u0 <= all.len() && all[s0..s0 + u0] == all[start..start + u0];
    assert_eq!(
        chunk::decode_run(&ids, frame, &shifted, &mut out).is_ok(),
        same
    );
    if same {
        out.truncate(n);
    }
    let mut wrong = run.clone();
    let last = wrong.len() - 1;
    wrong[last].0 = ChunkId(first.0.map(|b| !b));
    if wrong[last].0 != ChunkId::of(&all[at - wrong[last].2 as usize..at]) {
        assert!(chunk::decode_run(&ids, frame, &wrong, &mut out).is_err());
        let mut fresh = chunk::FrameReader::default();
        assert!(fresh.read_into(&ids, 1, frame, &wrong, &mut slice).is_err());
        // Checked together, the chunks name the wrong one.
        let chunks: Vec<(ChunkId, &[u8])> = wrong
            .iter()
            .map(|&(id, s, u)| (id, &all[s as usize..(s + u) as usize]))
            .collect();
        assert_eq!(
            chunk::check_chunks(&ids, &chunks).map_err(|(k, _)| k),
            Err(last)
        );
    }
    let mut past = run.clone();
    past[last].2 += (all.len() - at) as u32 + 1;
    assert!(chunk::decode_run(&ids, frame, &past, &mut out).is_err());
    assert_eq!(out.len(), n);
});
