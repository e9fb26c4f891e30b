use super::super::tests::sample;
use super::super::{Manifest, ManifestWriter};
use super::*;

/// A manifest larger than the reader's window: many files, each of several chunks.
fn big() -> Manifest {
    let mut m = sample();
    let c = match &m.entries[1].kind {
        EntryKind::File(f) => f.chunks[0],
        _ => unreachable!(),
    };
    for i in 0..3000 {
        m.entries.push(Entry {
            path: format!("base/f{i:05}"),
            mode: 0o600,
            kind: EntryKind::File(FileEntry {
                size: 5 * 7,
                sha256: c.id,
                chunks: vec![c; 7],
            }),
        });
    }
    m
}

#[test]
fn streams_what_decode_reads_across_windows() {
    let m = big();
    let b = m.encode();
    assert!(b.len() > 2 * WINDOW);
    verify_trailer(&b[..]).unwrap();
    let (mut r, h, packs) = ManifestReader::open(&b[..]).unwrap();
    assert_eq!((h, packs), (m.header.clone(), m.packs.clone()));
    let mut heads = Vec::new();
    let mut i = 0;
    // Skip some chunk lists, read others: both leave the reader at the next entry.
    while let Some(e) = r.next_entry().unwrap() {
        if i % 2 == 0 {
            if let HeadKind::File(_) = e.kind {
                let want = match &m.entries[i].kind {
                    EntryKind::File(f) => f.chunks.clone(),
                    _ => unreachable!(),
                };
                assert_eq!(r.file_chunks().unwrap(), want);
            }
        }
        heads.push(e);
        i += 1;
    }
    assert_eq!(heads.len(), m.entries.len());
    // Random access to one file's list by its head.
    let HeadKind::File(f) = heads[2000].kind else {
        panic!("file")
    };
    let again = read_chunks_at(&b[..], &heads[2000].path, &f, m.packs.len()).unwrap();
    let part = read_chunk_range(&b[..], "x", &f, m.packs.len(), 5, 10).unwrap();
    assert_eq!(part, again[5..]);
    assert_eq!(
        EntryKind::File(FileEntry {
            size: f.size,
            sha256: f.sha256,
            chunks: again
        }),
        m.entries[2000].kind
    );
}

#[test]
fn a_damaged_object_fails_the_trailer_and_a_lying_head_fails_random_access() {
    let m = big();
    let mut b = m.encode();
    let n = b.len();
    b[n / 2] ^= 1;
    assert!(matches!(
        verify_trailer(&b[..]),
        Err(FormatError::ChecksumMismatch { .. })
    ));
    let b = m.encode();
    let head = FileHead {
        size: 35,
        sha256: ChunkId([0; 32]),
        nchunks: 7,
        chunks_at: b.len() as u64 - 40,
        frames: true,
    };
    assert!(matches!(
        read_chunks_at(&b[..], "x", &head, 1),
        Err(FormatError::Truncated { .. })
    ));
    let head = FileHead {
        size: 36,
        nchunks: 7,
        chunks_at: 8,
        ..head
    };
    assert!(read_chunks_at(&b[..], "x", &head, 1).is_err());
    assert!(matches!(
        verify_trailer(&b[..20]),
        Err(FormatError::Truncated { .. })
    ));
}

#[test]
fn the_writer_refuses_counts_that_do_not_match() {
    let m = sample();
    let mut w = ManifestWriter::new(Vec::new(), &m.header, &m.packs, 1).unwrap();
    w.dir("base", 0o700).unwrap();
    assert!(w.dir("base2", 0o700).is_err());
    let mut w = ManifestWriter::new(Vec::new(), &m.header, &m.packs, 2).unwrap();
    w.file("a", 0o600, 5, &ChunkId([0; 32]), 1).unwrap();
    assert!(w.dir("b", 0o700).is_err());
    let w = ManifestWriter::new(Vec::new(), &m.header, &m.packs, 1).unwrap();
    assert!(w.finish().is_err());
}
