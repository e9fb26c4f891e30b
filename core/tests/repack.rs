//! Repacking (FORMAT.md 16.5) on every storage backend: the local `file://` directory and a real
//! S3-compatible server (moto, see `common`). Repositories are built here with the format's
//! encoders (no PostgreSQL): an old backup whose pack becomes mostly garbage once it is expired,
//! and a kept backup that still references a few of its chunks.

mod common;

use bytes::Bytes;
use tidemark_core::expire;
use tidemark_core::repo;
use tidemark_core::store::Store;
use tidemark_format::manifest::{
    BackupStats, ChunkRef, Entry, EntryKind, FileEntry, Manifest, ManifestHeader, SOURCE_PGDATA,
};
use tidemark_format::pack::{PackBuilder, PackEntry};
use tidemark_format::seal::ChunkIds;
use tidemark_format::{chunk, keys, ChunkId, Lsn, PackId, SystemId, TimelineId};

const SYSTEM: SystemId = SystemId(0x7265_7061_636b);
const PAGES: u32 = 10;

async fn open(s3: bool, name: &str) -> (Store, Option<tempfile::TempDir>) {
    let (store, dir) = if s3 {
        let url = common::s3_url(&format!("repack/{name}"));
        (Store::open(&url).expect("open s3 store"), None)
    } else {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().join("repo").display());
        (Store::open(&url).expect("open file store"), Some(dir))
    };
    repo::ensure_config(&store, SYSTEM).await.expect("config");
    (store, dir)
}

/// A distinct, poorly compressible 8 KiB page.
fn page(seed: u32) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Stores a pack of `pages`; `damage` stores the frame of a different page under one chunk's id.
/// Returns the pack id and each page's reference (pack index 0).
async fn store_pack(
    store: &Store,
    pages: &[Vec<u8>],
    damage: Option<usize>,
) -> (PackId, Vec<ChunkRef>) {
    let mut b = PackBuilder::new();
    let mut refs = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        let frame = if damage == Some(i) {
            chunk::compress(&page(9999), 1)
        } else {
            chunk::compress(p, 1)
        };
        refs.push(ref_of(&b.push(ChunkId::of(p), &frame, p.len() as u32)));
    }
    let (id, bytes) = b.finish();
    store
        .put_create(&keys::pack(&id), Bytes::from(bytes))
        .await
        .expect("put pack");
    (id, refs)
}

/// The reference (pack index 0) to the chunk a pack index entry describes.
fn ref_of(e: &PackEntry) -> ChunkRef {
    ChunkRef::in_pack(0, e)
}

/// The kept backup "new" after the repack, which must no longer name `old`.
async fn relocated(store: &Store, old: &PackId) -> Manifest {
    let m = repo::load_manifest(store, "new")
        .await
        .expect("relocated manifest");
    assert!(
        !m.packs.contains(old),
        "the kept backup still names the old pack"
    );
    m
}

fn manifest(
    id: &str,
    stop_s: i64,
    packs: Vec<PackId>,
    chunks: Vec<ChunkRef>,
    data: &[u8],
) -> Manifest {
    let stop = 1_795_000_000_000_000 + stop_s * 1_000_000;
    Manifest {
        header: ManifestHeader {
            backup_id: id.into(),
            system_id: SYSTEM,
            pg_version: 150004,
            timeline: TimelineId(1),
            start_lsn: Lsn(0x0200_0028),
            stop_lsn: Lsn(0x0200_0100),
            start_time_us: stop - 1_000_000,
            stop_time_us: stop,
            source: SOURCE_PGDATA,
            flags: 0,
            chunk_size: 8192,
            parent: None,
            backup_label: b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
                .to_vec(),
            tablespace_map: None,
            stats: BackupStats::default(),
        },
        packs,
        entries: vec![Entry {
            path: "datafile".into(),
            mode: 0o600,
            kind: EntryKind::File(FileEntry {
                size: data.len() as u64,
                sha256: ChunkId::of(data),
                chunks,
            }),
        }],
    }
}

async fn put_manifest(store: &Store, m: &Manifest) {
    store
        .put_create(
            &keys::manifest(&m.header.backup_id),
            Bytes::from(m.encode()),
        )
        .await
        .expect("put manifest");
}

/// Reads every chunk of the backup's only file through its manifest, as a restore does.
async fn read_back(store: &Store, id: &str) -> Vec<u8> {
    let m = repo::load_manifest(store, id).await.expect("load manifest");
    let EntryKind::File(f) = &m.entries[0].kind else {
        panic!("not a file")
    };
    let mut out = Vec::new();
    for c in &f.chunks {
        let frame = store
            .get_range(
                &keys::pack(&m.packs[c.pack as usize]),
                c.offset..c.offset + u64::from(c.clen),
            )
            .await
            .expect("read chunk");
        chunk::decode_run(
            &ChunkIds::Sha256,
            &frame,
            &[(c.id, c.skip, c.ulen)],
            &mut out,
        )
        .expect("chunk decodes to its id");
    }
    out
}

/// Backup "old" uses pages 0..PAGES of pack P1; backup "new" uses page 0 of P1 and pages of P2.
/// Returns (P1, the new backup's file bytes).
async fn two_backups(store: &Store, damage: Option<usize>) -> (PackId, Vec<u8>) {
    let old_pages: Vec<Vec<u8>> = (0..PAGES).map(page).collect();
    let (p1, refs1) = store_pack(store, &old_pages, damage).await;
    let old_data: Vec<u8> = old_pages.concat();
    put_manifest(
        store,
        &manifest("old", 0, vec![p1], refs1.clone(), &old_data),
    )
    .await;
    let new_pages: Vec<Vec<u8>> = (100..100 + PAGES).map(page).collect();
    let (p2, mut refs2) = store_pack(store, &new_pages, None).await;
    for r in &mut refs2 {
        r.pack = 1;
    }
    refs2[0] = refs1[0];
    let mut new_data = old_pages[0].clone();
    for p in &new_pages[1..] {
        new_data.extend(p);
    }
    put_manifest(store, &manifest("new", 60, vec![p1, p2], refs2, &new_data)).await;
    (p1, new_data)
}

macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn file() {
                super::$scenario(false).await
            }
            #[tokio::test]
            async fn s3() {
                super::$scenario(true).await
            }
        }
    )*};
}

on_every_backend!(
    a_mostly_garbage_pack_is_repacked_and_the_kept_backup_relocated,
    live_chunks_inside_shared_frames_are_copied_with_their_frames,
    a_damaged_live_chunk_stops_the_repack_before_any_manifest_changes,
);

async fn a_mostly_garbage_pack_is_repacked_and_the_kept_backup_relocated(s3: bool) {
    let (store, _dir) = open(s3, "relocate").await;
    let (p1, data) = two_backups(&store, None).await;
    let dry = expire::run(&store, &common::expire_options(true))
        .await
        .expect("dry run");
    let real = expire::run(&store, &common::expire_options(false))
        .await
        .expect("expire");
    assert_eq!(
        dry.repack, real.repack,
        "dry run and real run plan the same repack"
    );
    assert_eq!(real.repack.packs.len(), 1, "{:#?}", real.repack);
    assert_eq!(real.repack.packs[0].id, p1.to_string());
    assert_eq!(real.repack.rewrite_manifests, vec!["new".to_string()]);
    relocated(&store, &p1).await;
    assert_eq!(
        read_back(&store, "new").await,
        data,
        "relocated backup reads back whole"
    );
    // The old pack is condemned, not deleted, until the next run.
    assert!(store.head(&keys::pack(&p1)).await.expect("head").is_some());
    let again = expire::run(&store, &common::expire_options(false))
        .await
        .expect("second expire");
    assert_eq!(again.packs.delete, vec![p1.to_string()]);
    assert!(again.repack.packs.is_empty(), "{:#?}", again.repack);
    assert!(store.head(&keys::pack(&p1)).await.expect("head").is_none());
    assert_eq!(read_back(&store, "new").await, data);
}

async fn a_damaged_live_chunk_stops_the_repack_before_any_manifest_changes(s3: bool) {
    let (store, _dir) = open(s3, "damaged").await;
    // Page 0 of P1, which the kept backup still uses, is damaged.
    let (p1, _) = two_backups(&store, Some(0)).await;
    let before = store
        .get(&keys::manifest("new"), 1 << 20)
        .await
        .expect("manifest");
    let err = expire::run(&store, &common::expire_options(false))
        .await
        .expect_err("a damaged live chunk must stop the repack");
    let text = format!("{err:#}");
    assert!(
        text.contains("damaged") && text.contains(&p1.to_string()) && text.contains("hint:"),
        "{text}"
    );
    let after = store
        .get(&keys::manifest("new"), 1 << 20)
        .await
        .expect("manifest");
    assert_eq!(before, after, "the kept backup's manifest changed");
    assert!(store.head(&keys::pack(&p1)).await.expect("head").is_some());
    assert!(
        store.list(keys::LOCKS).await.expect("list").is_empty(),
        "the failed expire left its lease"
    );
}

/// Format 1.4: pages stored two to a frame. The kept backup uses page 0 (frame 0, skip 0) and
/// page 3 (frame 1, skip 8192): three of five frames are garbage, the two live frames are copied
/// whole (with the dead pages 1 and 2 in them) and the references keep their skips.
async fn live_chunks_inside_shared_frames_are_copied_with_their_frames(s3: bool) {
    let (store, _dir) = open(s3, "frames").await;
    let pages: Vec<Vec<u8>> = (0..PAGES).map(page).collect();
    let mut b = PackBuilder::new();
    let mut refs = Vec::new();
    for two in pages.chunks(2) {
        let bytes = two.concat();
        let ids: Vec<(ChunkId, u32)> = two.iter().map(|p| (ChunkId::of(p), 8192)).collect();
        refs.extend(
            b.push_frame(&chunk::compress(&bytes, 1), &ids)
                .iter()
                .map(ref_of),
        );
    }
    let (p1, bytes) = b.finish();
    store
        .put_create(&keys::pack(&p1), Bytes::from(bytes))
        .await
        .expect("put pack");
    assert_eq!(refs[3].skip, 8192);
    put_manifest(
        &store,
        &manifest("old", 0, vec![p1], refs.clone(), &pages.concat()),
    )
    .await;
    let kept = vec![refs[0], refs[3]];
    let data = [&pages[0][..], &pages[3][..]].concat();
    put_manifest(&store, &manifest("new", 60, vec![p1], kept, &data)).await;
    let real = expire::run(&store, &common::expire_options(false))
        .await
        .expect("expire");
    assert_eq!(real.repack.packs.len(), 1, "{:#?}", real.repack);
    let m = relocated(&store, &p1).await;
    let EntryKind::File(f) = &m.entries[0].kind else {
        panic!("not a file")
    };
    assert_eq!(
        f.chunks.iter().map(|c| c.skip).collect::<Vec<_>>(),
        vec![0, 8192]
    );
    assert_eq!(read_back(&store, "new").await, data);
    // The new pack holds the two live frames whole: four chunks.
    let new = store
        .get(&keys::pack(&m.packs[0]), 1 << 30)
        .await
        .expect("new pack");
    let entries = tidemark_format::pack::decode(&new).expect("new pack decodes");
    assert_eq!(entries.len(), 4, "{entries:?}");
    assert_eq!(
        entries.iter().map(|e| e.skip).collect::<Vec<_>>(),
        vec![0, 8192, 0, 8192]
    );
    let report = tidemark_core::check::run(&store, true, 1.0)
        .await
        .expect("check");
    // (No WAL was archived here: check names that, and nothing about chunks or packs.)
    assert_eq!((report.chunks_checked, report.chunks_read), (2, 2));
    let about_chunks: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.what.contains("chunk") || p.what.contains("pack"))
        .map(|p| p.what.clone())
        .collect();
    assert!(about_chunks.is_empty(), "{about_chunks:?}");
}
