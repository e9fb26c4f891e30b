//! One conformance suite that every storage backend passes: the local `file://` directory and a
//! real S3-compatible server (moto on loopback, started by `common`). Missing moto is a failure, not a
//! skip: run scripts/install-deps.sh.

mod common;

use bytes::Bytes;
use tidemark_core::store::{Store, StoreError};

async fn conformance(store: &Store) {
    let key = "wal/00000001/000000010000000000000001";
    store
        .put_create(key, Bytes::from_static(b"first"))
        .await
        .expect("create-only put of a new key");
    let err = store
        .put_create(key, Bytes::from_static(b"second"))
        .await
        .expect_err("second create must fail");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(
        &store.get(key, 100).await.expect("get")[..],
        b"first",
        "create-only put must leave the stored object untouched"
    );
    assert!(matches!(
        store.get(key, 3).await,
        Err(StoreError::TooLarge { .. })
    ));
    assert_eq!(
        &store.get_range(key, 1..4).await.expect("range")[..],
        b"irs"
    );
    assert!(
        store.get_range(key, 2..40).await.is_err(),
        "a short range read must be an error"
    );
    assert_eq!(store.head(key).await.expect("head"), Some(5));
    assert_eq!(store.head("wal/none").await.expect("head of missing"), None);
    // Replacing (repack's manifest relocation): a new key, then an existing one, whole.
    let m = "backups/20261122T030000Z.manifest";
    store
        .put_replace(m, Bytes::from_static(b"original manifest"))
        .await
        .expect("replace-put of a new key");
    store
        .put_replace(m, Bytes::from_static(b"relocated"))
        .await
        .expect("replace-put of an existing key");
    assert_eq!(&store.get(m, 100).await.expect("get")[..], b"relocated");
    assert_eq!(store.head(m).await.expect("head"), Some(9));
    let listed: Vec<_> = store
        .list("backups/")
        .await
        .expect("list")
        .into_iter()
        .filter(|l| l.key == m)
        .collect();
    assert_eq!(listed.len(), 1, "a replaced key is listed once");
    store.delete(m).await.expect("delete");
    assert!(store
        .get("wal/none", 10)
        .await
        .expect_err("missing")
        .is_not_found());
    store
        .put_create("wal/00000002/00000002.history", Bytes::from_static(b"h"))
        .await
        .expect("put");
    store
        .put_create("backups/x.manifest", Bytes::from_static(b"m"))
        .await
        .expect("put");
    let keys: Vec<String> = store
        .list("wal/")
        .await
        .expect("list")
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert_eq!(
        keys,
        vec![key.to_string(), "wal/00000002/00000002.history".to_string()]
    );
    let sizes: Vec<u64> = store
        .list("backups/")
        .await
        .expect("list")
        .into_iter()
        .map(|l| l.size)
        .collect();
    assert_eq!(sizes, vec![1]);
    assert!(store
        .list("packs/")
        .await
        .expect("list of an empty prefix")
        .is_empty());
}

#[tokio::test]
async fn local_directory_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&format!("file://{}/repo", dir.path().display())).expect("open");
    conformance(&store).await;
}

#[tokio::test]
async fn s3_compatible_server_conforms() {
    let url = common::s3_url("conformance/some/prefix");
    let store = Store::open(&url).expect("open s3");
    conformance(&store).await;
}
