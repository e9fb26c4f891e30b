//! The daemon end to end: `.ready` files archived, handoffs answered only once stored, the socket
//! gone at shutdown.

use super::*;

/// A WAL segment of `size` bytes whose first page carries a PostgreSQL 15 long header.
fn segment(sysid: u64, size: u32, fill: u8) -> Vec<u8> {
    let mut d = vec![fill; size as usize];
    d[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    d[2..4].copy_from_slice(&2u16.to_le_bytes());
    d[4..8].copy_from_slice(&1u32.to_le_bytes());
    d[8..16].copy_from_slice(&0u64.to_le_bytes());
    d[16..24].fill(0);
    d[24..32].copy_from_slice(&sysid.to_le_bytes());
    d[32..36].copy_from_slice(&size.to_le_bytes());
    d[36..40].copy_from_slice(&8192u32.to_le_bytes());
    d
}

/// The test daemon's options: quick rescans, level 1, no HTTP listener.
fn options(
    pgdata: &std::path::Path,
    state_dir: &std::path::Path,
    socket_dir: Option<std::path::PathBuf>,
    concurrency: usize,
) -> SidecarOptions {
    SidecarOptions {
        pgdata: pgdata.to_path_buf(),
        socket_dir,
        state_dir: state_dir.to_path_buf(),
        listen: None,
        concurrency,
        grace: Duration::from_secs(5),
        rescan: Duration::from_secs(1),
        compress_level: 1,
        allow_overwriting_store: false,
        accept_new_system: false,
        health_interval: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_ready_files_and_answers_handoffs() {
    let dir = tempfile::tempdir().unwrap();
    let pgdata = dir.path().join("pgdata");
    let status = pgdata.join("pg_wal/archive_status");
    std::fs::create_dir_all(&status).unwrap();
    let seg = 1u32 << 20;
    for (i, fill) in [(1, 1u8), (2, 2u8)] {
        let name = format!("0000000100000000000000{i:02X}");
        std::fs::write(pgdata.join("pg_wal").join(&name), segment(42, seg, fill)).unwrap();
        std::fs::write(status.join(format!("{name}.ready")), b"").unwrap();
    }
    // Not yet .ready: only a handoff request makes the sidecar archive it.
    std::fs::write(
        pgdata.join("pg_wal/000000010000000000000003"),
        segment(42, seg, 3),
    )
    .unwrap();
    let store = Store::open(&format!("file://{}/repo", dir.path().display())).unwrap();
    let sock = dir.path().join("sock");
    let opts = options(&pgdata, &dir.path().join("state"), Some(sock.clone()), 2);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run_until(store.clone(), opts, async move {
        let _ = stop_rx.await;
    }));
    let mut ok = false;
    for _ in 0..100 {
        if sock.join(SOCKET_NAME).exists() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "sidecar socket never appeared");
    // A handoff for a .ready file answers once it is stored.
    assert!(matches!(
        handoff(&sock, "000000010000000000000001").await,
        Some(Ok(()))
    ));
    assert!(matches!(
        handoff(&sock, "000000010000000000000003").await,
        Some(Ok(()))
    ));
    for n in [
        "000000010000000000000001",
        "000000010000000000000002",
        "000000010000000000000003",
    ] {
        let key = format!("wal/00000001/{n}");
        let mut found = false;
        for _ in 0..100 {
            if store.head(&key).await.unwrap().is_some() {
                found = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(found, "{n} was not archived");
    }
    // A file whose name is archived with other content is refused, never acknowledged.
    std::fs::write(
        pgdata.join("pg_wal/000000010000000000000002"),
        segment(42, seg, 9),
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("state/archived")).ok();
    let r = handoff(&sock, "000000010000000000000004").await;
    assert!(
        matches!(r, Some(Err(_))),
        "a missing file must not be acknowledged"
    );
    let state = std::fs::read_to_string(dir.path().join("state/archived")).unwrap_or_default();
    assert!(!state.contains("000000010000000000000004"));
    stop_tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(
        !sock.join(SOCKET_NAME).exists(),
        "socket must be removed at shutdown"
    );
    assert!(
        handoff(&sock, "000000010000000000000001").await.is_none(),
        "no sidecar: the caller uploads itself"
    );
}

/// With a key, the sidecar starts before the repository exists (the create-only probe is no
/// repository object), creates it encrypted, and what it stores opens only with the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_into_a_new_encrypted_repository() {
    let dir = tempfile::tempdir().unwrap();
    let pgdata = dir.path().join("pgdata");
    let status = pgdata.join("pg_wal/archive_status");
    std::fs::create_dir_all(&status).unwrap();
    let name = "000000010000000000000001";
    std::fs::write(pgdata.join("pg_wal").join(name), segment(42, 1 << 20, 0x5a)).unwrap();
    std::fs::write(status.join(format!("{name}.ready")), b"").unwrap();
    let url = format!("file://{}/repo", dir.path().display());
    let key = || {
        crate::store::UserKey::new(
            zeroize::Zeroizing::new(b"sidecar test key 0123".to_vec()),
            "test".into(),
        )
    };
    let store = Store::open(&url).unwrap().with_user_key(key());
    let opts = options(&pgdata, &dir.path().join("state"), None, 1);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run_until(store, opts, async move {
        let _ = stop_rx.await;
    }));
    let stored = dir.path().join("repo/wal/00000001").join(name);
    for _ in 0..200 {
        if stored.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    let raw = std::fs::read(&stored).expect("the segment was archived");
    assert!(tidemark_format::seal::is_sealed(&raw));
    let reader = Store::open(&url).unwrap().with_user_key(key());
    crate::repo::require_config(&reader).await.expect("unlocks");
    let obj = reader
        .get(&format!("wal/00000001/{name}"), 1 << 30)
        .await
        .expect("opens with the key");
    assert!(obj.starts_with(b"TMWL"));
    let e = crate::repo::load_config(&Store::open(&url).unwrap())
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("encrypted"), "{e:#}");
}
