use super::*;
use tidemark_format::manifest::{ChunkRef, Entry, FileEntry};
use tidemark_format::ChunkId;

fn manifest(packs: Vec<PackId>, chunks: Vec<ChunkRef>) -> Manifest {
    Manifest {
        header: crate::test_support::hdr("b", 1),
        packs,
        entries: vec![Entry {
            path: "base/1/16384".into(),
            mode: 0o600,
            kind: EntryKind::File(FileEntry {
                size: chunks.iter().map(|c| u64::from(c.ulen)).sum(),
                sha256: ChunkId([0; 32]),
                chunks,
            }),
        }],
    }
}

fn cref(seed: u8, pack: u32, offset: u64, clen: u32) -> ChunkRef {
    ChunkRef {
        id: ChunkId([seed; 32]),
        pack,
        offset,
        clen,
        ulen: 8192,
        skip: 0,
    }
}

#[test]
fn chooses_mostly_garbage_packs_most_garbage_first_within_budget() {
    let (a, b, c, d) = (
        PackId::of(b"a"),
        PackId::of(b"b"),
        PackId::of(b"c"),
        PackId::of(b"d"),
    );
    let mut live = LiveSet::default();
    // a: 100 of 1000 live; b: 400 of 1000; c: 600 of 1000 (not enough garbage);
    // d: 50 of 1000 but referenced twice at the same place (counted once).
    live.add(&manifest(
        vec![a, b, c, d],
        vec![
            cref(1, 0, 8, 100),
            cref(2, 1, 8, 400),
            cref(3, 2, 8, 600),
            cref(4, 3, 8, 50),
            cref(4, 3, 8, 50),
        ],
    ));
    live.add(&manifest(vec![d], vec![cref(4, 0, 8, 50)]));
    let sizes: BTreeMap<PackId, u64> = [a, b, c, d].iter().map(|p| (*p, 1000)).collect();
    let opts = RepackOptions {
        budget_bytes: 500,
        min_garbage_percent: 50,
    };
    let (plan, chosen) = choose(live, &sizes, &opts).unwrap();
    let ids: Vec<PackId> = chosen.iter().map(|c| c.pack).collect();
    assert_eq!(
        ids,
        vec![d, a],
        "b (400) no longer fits the budget after d and a"
    );
    assert_eq!(plan.live_bytes, 150);
    assert_eq!(plan.reclaim_bytes, 1850);
    assert_eq!(plan.over_budget, 1);
    assert_eq!(chosen[0].live, vec![(8, 50)]);
    // Budget 0 turns repacking off.
    let mut live = LiveSet::default();
    live.add(&manifest(vec![a], vec![cref(1, 0, 8, 100)]));
    let (plan, chosen) = choose(
        live,
        &sizes,
        &RepackOptions {
            budget_bytes: 0,
            min_garbage_percent: 50,
        },
    )
    .unwrap();
    assert!(chosen.is_empty());
    assert_eq!(plan.over_budget, 1);
}

#[test]
fn relocation_rewrites_only_moved_references_and_the_table() {
    let (old, kept, new) = (PackId::of(b"old"), PackId::of(b"kept"), PackId::of(b"new"));
    let mut r = Relocation::default();
    r.old.insert(old);
    r.moved.insert(
        (old, 500, 0),
        (
            new,
            PackEntry {
                id: ChunkId([1; 32]),
                offset: 8,
                clen: 10,
                ulen: 8192,
                skip: 0,
            },
        ),
    );
    let mut m = manifest(
        vec![old, kept],
        vec![cref(2, 1, 8, 20), cref(1, 0, 500, 10), cref(2, 1, 8, 20)],
    );
    assert!(relocate(&mut m, &r).unwrap());
    assert_eq!(m.packs, vec![kept, new]);
    let EntryKind::File(f) = &m.entries[0].kind else {
        panic!()
    };
    assert_eq!((f.chunks[1].pack, f.chunks[1].offset), (1, 8));
    assert_eq!((f.chunks[0].pack, f.chunks[0].offset), (0, 8));
    // Untouched manifests are reported as such.
    let mut other = manifest(vec![kept], vec![cref(2, 0, 8, 20)]);
    assert!(!relocate(&mut other, &r).unwrap());
    // A reference whose id differs from the copy's is refused.
    let mut bad = manifest(vec![old], vec![cref(9, 0, 500, 10)]);
    assert!(relocate(&mut bad, &r).is_err());
    // So is one the repack did not copy.
    let mut missing = manifest(vec![old], vec![cref(1, 0, 900, 10)]);
    assert!(relocate(&mut missing, &r).is_err());
}
