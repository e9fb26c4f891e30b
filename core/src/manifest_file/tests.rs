#![allow(clippy::unwrap_used)]
use super::*;
use tidemark_format::manifest::{ChunkRef, Entry, EntryKind, FileEntry, Manifest, ManifestHeader};
use tidemark_format::{ChunkId, Lsn, PackId, SystemId, TimelineId};

/// A manifest of `files` files of 7 chunks each (about 400 bytes per file encoded).
fn manifest(id: &str, files: usize) -> Manifest {
    let c = ChunkRef {
        id: ChunkId([3; 32]),
        pack: 0,
        offset: 8,
        clen: 10,
        ulen: 5,
        skip: 0,
    };
    let mut entries = vec![Entry {
        path: "base".into(),
        mode: 0o700,
        kind: EntryKind::Dir,
    }];
    for i in 0..files {
        entries.push(Entry {
            path: format!("base/f{i:05}"),
            mode: 0o600,
            kind: EntryKind::File(FileEntry {
                size: 35,
                sha256: ChunkId([i as u8; 32]),
                chunks: vec![
                    ChunkRef {
                        offset: i as u64,
                        ..c
                    };
                    7
                ],
            }),
        });
    }
    Manifest {
        header: ManifestHeader {
            backup_id: id.into(),
            system_id: SystemId(7),
            pg_version: 150018,
            timeline: TimelineId(1),
            start_lsn: Lsn(0x0200_0028),
            stop_lsn: Lsn(0x0200_0100),
            start_time_us: 1,
            stop_time_us: 2,
            source: tidemark_format::manifest::SOURCE_PGDATA,
            flags: 0,
            chunk_size: 8192,
            parent: None,
            backup_label: b"START WAL LOCATION: 0/2000028\n".to_vec(),
            tablespace_map: None,
            stats: Default::default(),
        },
        packs: vec![PackId::of(b"p")],
        entries,
    }
}

fn file_of(m: &Manifest) -> (std::fs::File, u64) {
    let b = m.encode();
    let f = tempfile::tempfile().unwrap();
    f.write_all_at(&b, 0).unwrap();
    (f, b.len() as u64)
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&format!("file://{}", dir.path().display())).unwrap();
    (dir, s)
}

async fn keys_of(s: &Store) -> Vec<String> {
    s.list(keys::BACKUPS)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect()
}

#[tokio::test]
async fn a_manifest_in_parts_reads_back_as_written() {
    let (_d, s) = store();
    let m = manifest("b1", 300);
    let (f, len) = file_of(&m);
    let parts = upload::upload_in(&s, "b1", f, len, Put::Create, 4096)
        .await
        .unwrap();
    assert!(parts.len() > 20, "{}", parts.len());
    assert_eq!(keys_of(&s).await.len(), parts.len() + 1);
    // The manifest object is the first part and the table; listing reads its header.
    let main = s.get(&keys::manifest("b1"), 1 << 20).await.unwrap();
    assert!(main.len() < 4096 + 40 * parts.len() + 8 + 1);
    assert_eq!(ManifestHeader::decode_prefix(&main).unwrap(), m.header);
    let whole = load_whole(&s, "b1").await.unwrap();
    assert_eq!(whole, m);
    let local = LocalManifest::load(&s, "b1").await.unwrap();
    assert_eq!(local.entries.len(), m.entries.len());
    assert_eq!(
        local.file(150).unwrap(),
        match &m.entries[150].kind {
            EntryKind::File(f) => f.clone(),
            _ => unreachable!(),
        }
    );
    // A small manifest stays one object, of major version 3 (whole, chunk references with
    // skips); the big one is major 4 (in parts).
    assert_eq!(&main[4..6], &4u16.to_le_bytes());
    let small = manifest("b2", 3);
    let (f, len) = file_of(&small);
    assert!(upload::upload_in(&s, "b2", f, len, Put::Create, 4096)
        .await
        .unwrap()
        .is_empty());
    let b = s.get(&keys::manifest("b2"), 1 << 20).await.unwrap();
    assert_eq!(Manifest::decode(&b).unwrap(), small);
    assert_eq!(&b[4..6], &3u16.to_le_bytes());
}

#[tokio::test]
async fn a_missing_or_damaged_part_fails_the_read_and_parts_are_cleaned_up() {
    let (dir, s) = store();
    let m = manifest("b1", 300);
    let (f, len) = file_of(&m);
    let parts = upload::upload_in(&s, "b1", f, len, Put::Create, 4096)
        .await
        .unwrap();
    // Damaged: one byte of a part changed.
    let p = dir.path().join(keys::manifest_part("b1", &parts[3]));
    let mut b = std::fs::read(&p).unwrap();
    b[10] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let e = format!("{:#}", LocalManifest::load(&s, "b1").await.unwrap_err());
    assert!(
        e.contains("damaged") && e.contains(&parts[3].to_string()),
        "{e}"
    );
    // Missing.
    std::fs::remove_file(&p).unwrap();
    let e = format!("{:#}", load_whole(&s, "b1").await.unwrap_err());
    assert!(e.contains("missing"), "{e}");
    // A replacement naming other parts; then the old ones are deleted.
    let m2 = manifest("b1", 310);
    let (f, len) = file_of(&m2);
    let new = upload::upload_in(&s, "b1", f, len, Put::Replace, 4096)
        .await
        .unwrap();
    assert!(delete_parts(&s, "b1", &new).await.unwrap() > 0);
    assert_eq!(keys_of(&s).await.len(), new.len() + 1);
    assert_eq!(load_whole(&s, "b1").await.unwrap(), m2);
    // Without its manifest object, every part is an orphan.
    assert!(orphan_parts(&s).await.unwrap().is_empty());
    s.delete(&keys::manifest("b1")).await.unwrap();
    assert_eq!(orphan_parts(&s).await.unwrap().len(), new.len());
    assert_eq!(delete_parts(&s, "b1", &[]).await.unwrap(), new.len() as u64);
    assert!(keys_of(&s).await.is_empty());
}

#[tokio::test]
async fn a_hostile_part_table_is_refused() {
    let (dir, s) = store();
    let m = manifest("b1", 300);
    let (f, len) = file_of(&m);
    upload::upload_in(&s, "b1", f, len, Put::Create, 4096)
        .await
        .unwrap();
    let p = dir.path().join(keys::manifest("b1"));
    let orig = std::fs::read(&p).unwrap();
    let n = orig.len();
    // A count larger than the object holds.
    let mut b = orig.clone();
    b[n - 8..n - 4].copy_from_slice(&1000u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(LocalManifest::load(&s, "b1").await.is_err());
    // A part length beyond the maximum.
    let mut b = orig.clone();
    let row = n - 8 - 40;
    b[row + 32..row + 40].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(LocalManifest::load(&s, "b1").await.is_err());
}
