//! `check` against a small repository built object by object: a sound repository passes; a
//! damaged chunk, a missing pack and missing WAL are each reported with the affected backup.

#![allow(clippy::unwrap_used)] // test helpers: a failed set-up step should panic

use bytes::Bytes;
use tidemark_core::check;
use tidemark_core::store::Store;
use tidemark_format::config::{RepoConfig, COMPRESSION_ZSTD};
use tidemark_format::manifest::{
    BackupStats, ChunkRef, Entry, EntryKind, FileEntry, Manifest, ManifestHeader, SOURCE_PGDATA,
};
use tidemark_format::pack::PackBuilder;
use tidemark_format::wal::{self as walfmt, WalFileName};
use tidemark_format::{chunk, keys, ChunkId, Lsn, SystemId, TimelineId};

const SEG: u64 = 1 << 20;

async fn build(store: &Store) -> (String, String) {
    let cfg = RepoConfig {
        system_id: SystemId(42),
        chunk_size: 8192,
        pack_target: 1 << 20,
        compression: COMPRESSION_ZSTD,
        created_us: 0,
    };
    store
        .put_create(keys::CONFIG, Bytes::from(cfg.encode()))
        .await
        .unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mut b = PackBuilder::new();
    let mut refs = Vec::new();
    for piece in data.chunks(8192) {
        let id = ChunkId::of(piece);
        let e = b.push(id, &chunk::compress(piece, 1), piece.len() as u32);
        refs.push(ChunkRef {
            id,
            pack: 0,
            offset: e.offset,
            clen: e.clen,
            ulen: e.ulen,
            skip: e.skip,
        });
    }
    let (pid, bytes) = b.finish();
    store
        .put_create(&keys::pack(&pid), Bytes::from(bytes))
        .await
        .unwrap();
    let header = ManifestHeader {
        backup_id: "20261121T000000Z".into(),
        system_id: SystemId(42),
        pg_version: 150000,
        timeline: TimelineId(1),
        start_lsn: Lsn(2 * SEG + 40),
        stop_lsn: Lsn(3 * SEG + 100),
        start_time_us: 1,
        stop_time_us: 2,
        source: SOURCE_PGDATA,
        flags: 0,
        chunk_size: 8192,
        parent: None,
        backup_label: b"label".to_vec(),
        tablespace_map: None,
        stats: BackupStats::default(),
    };
    let m = Manifest {
        header,
        packs: vec![pid],
        // Every parent of an entry is a directory entry (FORMAT.md 8.4.3).
        entries: vec![
            Entry {
                path: "base".into(),
                mode: 0o700,
                kind: EntryKind::Dir,
            },
            Entry {
                path: "base/1".into(),
                mode: 0o700,
                kind: EntryKind::Dir,
            },
            Entry {
                path: "base/1/1259".into(),
                mode: 0o600,
                kind: EntryKind::File(FileEntry {
                    size: data.len() as u64,
                    sha256: ChunkId::of(&data),
                    chunks: refs,
                }),
            },
        ],
    };
    store
        .put_create(&keys::manifest("20261121T000000Z"), Bytes::from(m.encode()))
        .await
        .unwrap();
    for s in 1..=5u32 {
        let name = WalFileName::Segment {
            tli: 1,
            log: 0,
            seg: s,
        };
        store
            .put_create(
                &keys::wal(&name),
                Bytes::from(walfmt::encode(name, &vec![s as u8; SEG as usize], 1)),
            )
            .await
            .unwrap();
    }
    (keys::pack(&pid), "20261121T000000Z".into())
}

fn repo_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("repo")
}

#[tokio::test]
async fn check_reports_damage_with_the_affected_backup() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", repo_path(&dir).display())).unwrap();
    let (pack_key, backup) = build(&store).await;
    let r = check::run(&store, true, 1.0).await.unwrap();
    assert!(r.problems.is_empty(), "{}", check::render(&r));
    assert_eq!(
        (
            r.backups_checked,
            r.chunks_checked,
            r.chunks_read,
            r.wal_segments
        ),
        (1, 3, 3, 5)
    );

    // Flip a byte inside the first chunk's frame: only --read-data sees it.
    let path = repo_path(&dir).join(&pack_key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(check::run(&store, false, 1.0)
        .await
        .unwrap()
        .problems
        .is_empty());
    let r = check::run(&store, true, 1.0).await.unwrap();
    assert_eq!(r.problems.len(), 1, "{}", check::render(&r));
    assert!(
        r.problems[0].what.contains("damaged") && r.problems[0].backups == vec![backup.clone()]
    );

    // A WAL segment inside the backup and one after it.
    std::fs::remove_file(repo_path(&dir).join("wal/00000001/000000010000000000000003")).unwrap();
    std::fs::remove_file(repo_path(&dir).join("wal/00000001/000000010000000000000004")).unwrap();
    let r = check::run(&store, false, 1.0).await.unwrap();
    let text = check::render(&r);
    assert!(
        text.contains("lacks wal needed for consistency: 000000010000000000000003"),
        "{text}"
    );
    assert!(
        text.contains("gap at wal segment 000000010000000000000004"),
        "{text}"
    );

    // The pack itself gone.
    std::fs::remove_file(&path).unwrap();
    let r = check::run(&store, false, 1.0).await.unwrap();
    assert!(
        check::render(&r).contains("the pack object is missing"),
        "{}",
        check::render(&r)
    );
}
