//! One conformance suite that every storage backend passes: the local `file://` directory and a
//! real S3-compatible server (moto, started here on loopback). Missing moto is a failure, not a
//! skip: run scripts/install-deps.sh.

use bytes::Bytes;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
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

struct Moto(Child);
impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind loopback")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test]
async fn s3_compatible_server_conforms() {
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server is not installed: run scripts/install-deps.sh (pip install 'moto[server]')");
    let _guard = Moto(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let made = Command::new("python3")
            .args(["-c", "import boto3,sys; boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='tidemark-conformance')", &endpoint])
            .stderr(Stdio::null())
            .status()
            .expect("python3 with boto3 (installed with moto) is needed");
        if made.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not start on {endpoint}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The S3 backend reads the standard AWS variables; this test process owns its environment.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        std::env::set_var(k, v);
    }
    let store = Store::open("s3://tidemark-conformance/some/prefix").expect("open s3");
    conformance(&store).await;
}
