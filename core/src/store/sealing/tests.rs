use super::*;
use tidemark_format::seal::SEGMENT;

fn stores() -> (tempfile::TempDir, Store, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    let plain = Store::open(&url).expect("open");
    let sealed = Store::open(&url).expect("open");
    sealed.set_data_keys(DataKeys::derive(&[3; 32]));
    (dir, plain, sealed)
}

fn data(n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i % 253) as u8).collect::<Vec<_>>())
}

#[tokio::test]
async fn sealed_objects_read_back_whole_by_range_and_by_size() {
    let (dir, _, s) = stores();
    let n = 3 * SEGMENT as usize + 1234;
    let d = data(n);
    s.put_create("packs/ab/p", d.clone()).await.expect("put");
    assert_eq!(s.get("packs/ab/p", n as u64).await.expect("get"), d);
    assert!(matches!(
        s.get("packs/ab/p", n as u64 - 1).await,
        Err(StoreError::TooLarge { .. })
    ));
    for r in [0..1u64, 5..70_000, 65_536..131_072, n as u64 - 10..n as u64] {
        let got = s.get_range("packs/ab/p", r.clone()).await.expect("range");
        assert_eq!(got, d.slice(r.start as usize..r.end as usize), "{r:?}");
    }
    assert!(s.get_range("packs/ab/p", 0..n as u64 + 1).await.is_err());
    assert_eq!(s.head("packs/ab/p").await.expect("head"), Some(n as u64));
    let listed = s.list("packs/").await.expect("list");
    assert_eq!(listed[0].size, n as u64);
    // On disk it is sealed: larger, and none of the plaintext.
    let raw = std::fs::read(dir.path().join("packs/ab/p")).expect("raw");
    assert_eq!(
        raw.len() as u64,
        tidemark_format::seal::sealed_len(n as u64)
    );
    assert!(!raw.windows(64).any(|w| w == &d[1000..1064]));
}

#[tokio::test]
async fn plain_and_sealed_are_never_mixed() {
    let (_dir, plain, sealed) = stores();
    sealed
        .put_create("wal/x", Bytes::from_static(b"secret"))
        .await
        .expect("put");
    let e = plain.get("wal/x", 1 << 20).await.unwrap_err();
    assert!(matches!(e, StoreError::Encrypted { .. }), "{e}");
    assert!(e.to_string().contains("--key-file"), "{e}");
    plain
        .put_create("wal/y", Bytes::from_static(b"forged plaintext"))
        .await
        .expect("put");
    let e = sealed.get("wal/y", 1 << 20).await.unwrap_err();
    assert!(matches!(e, StoreError::Sealed { .. }), "{e}");
    assert!(
        e.to_string().contains("wal/y") && e.to_string().contains("hint:"),
        "{e}"
    );
}

#[tokio::test]
async fn an_object_moved_to_another_key_or_system_is_refused() {
    let (dir, _, s) = stores();
    s.put_create("backups/a.manifest", data(100))
        .await
        .expect("put");
    let child = s.child("systems/42/");
    child.put_create("config", data(65)).await.expect("put");
    assert_eq!(child.get("config", 100).await.expect("get"), data(65));
    let root = dir.path();
    std::fs::copy(
        root.join("backups/a.manifest"),
        root.join("backups/b.manifest"),
    )
    .expect("cp");
    let e = s.get("backups/b.manifest", 1 << 20).await.unwrap_err();
    assert!(e.to_string().contains("backups/b.manifest"), "{e}");
    // The nested system's config copied to the top level does not open there.
    std::fs::copy(root.join("systems/42/config"), root.join("config")).expect("cp");
    assert!(s.get("config", 100).await.is_err());
}

#[tokio::test]
async fn a_locked_store_refuses_every_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(&format!("file://{}", dir.path().display()))
        .expect("open")
        .with_user_key(UserKey::new(
            zeroize::Zeroizing::new(b"0123456789abcdef".to_vec()),
            "test".into(),
        ));
    let e = s.put_create("wal/x", data(1)).await.unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    assert!(s.get("wal/x", 10).await.is_err());
    assert!(!dir.path().join("wal/x").exists());
}
