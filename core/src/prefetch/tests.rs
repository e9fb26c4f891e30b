use super::*;
use crate::wal::WalError;
use bytes::Bytes;
use std::time::Duration;
use tidemark_format::config::{RepoConfig, COMPRESSION_ZSTD};
use tidemark_format::{keys, SystemId};

const SEG: u64 = 1 << 20;

fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<WalError>(),
        Some(WalError::NotFound { .. })
    )
}

fn segment(tli: u32, segno: u64, sys: u64, fill: u8) -> (WalFileName, Vec<u8>) {
    let name = WalFileName::segment_of(TimelineId(tli), Lsn(segno * SEG), SEG);
    let mut d = vec![fill; SEG as usize];
    d[..40].fill(0);
    d[0..2].copy_from_slice(&walfmt::PG15_PAGE_MAGIC.to_le_bytes());
    d[2..4].copy_from_slice(&2u16.to_le_bytes());
    d[4..8].copy_from_slice(&tli.to_le_bytes());
    d[8..16].copy_from_slice(&(segno * SEG).to_le_bytes());
    d[24..32].copy_from_slice(&sys.to_le_bytes());
    d[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
    d[36..40].copy_from_slice(&8192u32.to_le_bytes());
    (name, d)
}

async fn repo_with(dir: &Path, segs: &[(u32, u64, u8)]) -> (Store, Vec<(WalFileName, Vec<u8>)>) {
    let root = dir.join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let store = Store::open(&format!("file://{}", root.display())).unwrap();
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
    let mut out = Vec::new();
    for &(tli, n, fill) in segs {
        let (name, d) = segment(tli, n, 42, fill);
        store
            .put_create(&keys::wal(&name), Bytes::from(walfmt::encode(name, &d, 1)))
            .await
            .unwrap();
        out.push((name, d));
    }
    (store, out)
}

fn opts(dir: &Path, depth: usize) -> Prefetch {
    Prefetch {
        depth,
        spool: dir.join("pg_wal/.tidemark-prefetch"),
        max_bytes: 1 << 30,
        filler: Filler::Inline,
    }
}

#[tokio::test]
async fn served_files_are_byte_identical_and_mostly_from_the_spool() {
    let t = tempfile::tempdir().unwrap();
    let segs: Vec<(u32, u64, u8)> = (1..=12).map(|n| (1, n, n as u8)).collect();
    let (store, want) = repo_with(t.path(), &segs).await;
    let p = opts(t.path(), 4);
    let dest = t.path().join("pg_wal/RECOVERYXLOG");
    let mut from_spool = 0;
    for (name, data) in &want {
        let s = fetch(&store, &name.to_string(), &dest, &p).await.unwrap();
        if s == Served::Spool {
            from_spool += 1;
        }
        assert_eq!(&std::fs::read(&dest).unwrap(), data, "{name}");
    }
    // Misses at 1, 6, 11: each fetches the next four.
    assert_eq!(from_spool, 9);
    // The filler found segment 13 missing: serving 12, the last, removed the spool.
    assert!(!p.spool.exists(), "the spool outlived the last segment");
    // The end of the archive empties the spool.
    let next = WalFileName::segment_of(TimelineId(1), Lsn(13 * SEG), SEG);
    let e = fetch(&store, &next.to_string(), &dest, &p)
        .await
        .unwrap_err();
    assert!(is_not_found(&e), "{e:#}");
    assert!(
        !p.spool.exists(),
        "the spool outlived the end of the archive"
    );
}

#[tokio::test]
async fn foreign_and_stale_spool_files_are_never_served() {
    let t = tempfile::tempdir().unwrap();
    let (store, want) = repo_with(t.path(), &[(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]).await;
    let p = opts(t.path(), 3);
    let dest = t.path().join("pg_wal/RECOVERYXLOG");
    // Bind and fill the spool, then plant: a segment of another cluster under the name of
    // segment 2, a cut copy of segment 3, segment 2's bytes under the name of segment 4, junk.
    fetch(&store, &want[0].0.to_string(), &dest, &p)
        .await
        .unwrap();
    for (name, _) in &want[1..] {
        assert!(
            p.spool.join(name.to_string()).is_file(),
            "{name} not spooled"
        );
    }
    let (n2, other) = segment(1, 2, 7, 0xee);
    std::fs::write(p.spool.join(n2.to_string()), other).unwrap();
    std::fs::write(
        p.spool.join(want[2].0.to_string()),
        &want[2].1[..want[2].1.len() - 8192],
    )
    .unwrap();
    std::fs::write(p.spool.join(want[3].0.to_string()), &want[1].1).unwrap();
    std::fs::write(p.spool.join("junk"), b"x").unwrap();
    for (name, data) in &want[1..] {
        let s = fetch(&store, &name.to_string(), &dest, &p).await.unwrap();
        assert!(matches!(s, Served::Archive { .. }), "{name}: {s:?}");
        assert_eq!(&std::fs::read(&dest).unwrap(), data, "{name}");
    }
    assert!(!p.spool.join("junk").exists());

    // A spool stamped by another repository (or another boot) is emptied before use.
    // (Serving the last segment removed the spool: make it again.)
    assert!(!p.spool.exists());
    fetch(&store, &want[0].0.to_string(), &dest, &p)
        .await
        .unwrap();
    let n3 = want[2].0;
    let mut stamp = read_stamp(&p.spool).unwrap();
    for s in [
        Stamp {
            repo: "file:///elsewhere".into(),
            ..stamp.clone()
        },
        Stamp {
            boot_id: "another boot".into(),
            ..stamp.clone()
        },
    ] {
        std::fs::write(p.spool.join(STAMP), serde_json::to_vec(&s).unwrap()).unwrap();
        std::fs::write(p.spool.join(n3.to_string()), &want[2].1).unwrap();
        let got = fetch(&store, &n3.to_string(), &dest, &p).await.unwrap();
        assert!(matches!(got, Served::Archive { .. }), "{got:?}");
        assert_eq!(std::fs::read(&dest).unwrap(), want[2].1);
        let now = read_stamp(&p.spool).unwrap();
        assert_ne!(
            now.generation, stamp.generation,
            "the spool was not re-stamped"
        );
        stamp = now;
    }
}

/// The background filler (here a task of the test) runs beside the requests: every segment is
/// served byte for byte, most from the spool without waiting, and the end of the archive stops
/// the filler and removes the spool.
#[tokio::test]
async fn a_background_filler_serves_requests_ahead() {
    let t = tempfile::tempdir().unwrap();
    let segs: Vec<(u32, u64, u8)> = (1..=24).map(|n| (1, n, n as u8)).collect();
    let (store, want) = repo_with(t.path(), &segs).await;
    let p = Prefetch {
        // A filler that cannot start: a request without the task fetches it itself.
        filler: Filler::Background {
            program: "/bin/false".into(),
            args: vec![],
        },
        ..opts(t.path(), 6)
    };
    let dest = t.path().join("pg_wal/RECOVERYXLOG");
    let s = fetch(&store, &want[0].0.to_string(), &dest, &p)
        .await
        .unwrap();
    assert_eq!(s, Served::Archive { spooled: 0 });
    assert_eq!(std::fs::read(&dest).unwrap(), want[0].1);
    let filler = tokio::spawn({
        let (store, p, from) = (store.clone(), p.clone(), want[1].0.to_string());
        async move { fill_background(&store, &from, &p).await }
    });
    let mut from_spool = 0;
    for (name, data) in &want[1..] {
        let s = fetch(&store, &name.to_string(), &dest, &p).await.unwrap();
        if s == Served::Spool {
            from_spool += 1;
        }
        assert_eq!(&std::fs::read(&dest).unwrap(), data, "{name}");
        // Never more than the window ahead.
        assert!(segments_in(&p.spool) <= 7, "{}", segments_in(&p.spool));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A segment taken is not fetched into the spool again.
        assert!(!p.spool.join(name.to_string()).exists(), "{name} came back");
    }
    assert!(from_spool >= 12, "only {from_spool} of 23 from the spool");
    let next = WalFileName::segment_of(TimelineId(1), Lsn(25 * SEG), SEG);
    let e = fetch(&store, &next.to_string(), &dest, &p)
        .await
        .unwrap_err();
    assert!(is_not_found(&e), "{e:#}");
    tokio::time::timeout(Duration::from_secs(5), filler)
        .await
        .expect("the filler did not stop at the end of the archive")
        .unwrap();
    assert!(
        !p.spool.exists(),
        "the spool outlived the end of the archive"
    );
}

#[tokio::test]
async fn timelines_are_kept_apart_and_history_files_never_spooled() {
    let t = tempfile::tempdir().unwrap();
    let (store, want) = repo_with(
        t.path(),
        &[(1, 1, 1), (1, 2, 2), (2, 2, 0x22), (2, 3, 0x23)],
    )
    .await;
    let hist = WalFileName::History { tli: 2 };
    store
        .put_create(
            &keys::wal(&hist),
            Bytes::from(walfmt::encode(hist, b"1\t0/2000000\tno reason\n", 1)),
        )
        .await
        .unwrap();
    let p = opts(t.path(), 4);
    let dest = t.path().join("pg_wal/RECOVERYXLOG");
    fetch(&store, &want[0].0.to_string(), &dest, &p)
        .await
        .unwrap();
    fetch(&store, "00000002.history", &dest, &p).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"1\t0/2000000\tno reason\n");
    assert!(!p.spool.join("00000002.history").exists());
    // Timeline 2's segment 2 differs from timeline 1's: each name serves its own bytes.
    for (name, data) in [&want[2], &want[1], &want[3]] {
        fetch(&store, &name.to_string(), &dest, &p).await.unwrap();
        assert_eq!(&std::fs::read(&dest).unwrap(), data, "{name}");
    }
}

/// Recovery restarted (PostgreSQL asks for earlier segments again) and a spool with room for two
/// segments only: every request is served promptly and byte for byte, never after the request's
/// long wait for a filler that would not deliver.
#[tokio::test]
async fn asking_again_or_backwards_is_served_promptly_even_with_a_full_spool() {
    let t = tempfile::tempdir().unwrap();
    let segs: Vec<(u32, u64, u8)> = (1..=12).map(|n| (1, n, n as u8)).collect();
    let (store, want) = repo_with(t.path(), &segs).await;
    let p = Prefetch {
        filler: Filler::Background {
            program: "/bin/false".into(),
            args: vec![],
        },
        max_bytes: 2 * SEG + 4096,
        ..opts(t.path(), 4)
    };
    let dest = t.path().join("pg_wal/RECOVERYXLOG");
    fetch(&store, &want[0].0.to_string(), &dest, &p)
        .await
        .unwrap();
    let filler = tokio::spawn({
        let (store, p, from) = (store.clone(), p.clone(), want[1].0.to_string());
        async move { fill_background(&store, &from, &p).await }
    });
    // Forward to 8, then 8 again, back to 3 and forward again.
    let order = [1, 2, 3, 4, 5, 6, 7, 7, 2, 3, 4, 5, 6, 7, 8, 9];
    for i in order {
        let (name, data) = &want[i];
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            fetch(&store, &name.to_string(), &dest, &p),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} waited too long"))
        .unwrap();
        assert_eq!(&std::fs::read(&dest).unwrap(), data, "{name} ({s:?})");
        assert!(
            spool_bytes(&p.spool) <= 3 * SEG,
            "the spool outgrew its bound"
        );
    }
    drop(filler);
}

#[test]
fn the_first_segment_of_a_timeline_may_carry_its_parents_timeline_in_its_header() {
    // Segment 5 of timeline 2 begins with pages copied from timeline 1.
    let (_, d) = segment(1, 5, 42, 5);
    let on_tli2 = WalFileName::segment_of(TimelineId(2), Lsn(5 * SEG), SEG);
    check_header(&d, SEG, on_tli2, 42).unwrap();
    // A header of a later timeline, another system, another position: refused.
    let (_, d3) = segment(3, 5, 42, 5);
    assert!(check_header(&d3, SEG, on_tli2, 42).is_err());
    assert!(check_header(&d, SEG, on_tli2, 7).is_err());
    let six = WalFileName::segment_of(TimelineId(2), Lsn(6 * SEG), SEG);
    assert!(check_header(&d, SEG, six, 42).is_err());
    assert!(check_header(&d, SEG - 1, on_tli2, 42).is_err());
}
