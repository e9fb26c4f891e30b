//! Shared by the core integration tests: one real S3-compatible server (moto) per test binary,
//! started on a free loopback port the first time a test asks for it.
//!
//! Invariants:
//! - Missing moto is a failure, not a skip: run scripts/install-deps.sh.
//! - Every test gets its own key prefix ([`s3_url`]), so tests run in parallel against one server.
//! - The server dies with the test process: a watchdog shell holds the read end of a pipe whose
//!   write end only this process holds, and kills moto when it reads end-of-file (the process
//!   exited, however it exited). Statics are never dropped, so a `Drop` guard would not do.
//! - moto records every request it receives, in arrival order, in a file read by
//!   [`s3_requests`]: tests use it to check the order of a client's requests.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "tidemark-core-tests";

struct Moto {
    endpoint: String,
    recording: PathBuf,
    /// The watchdog shell. Its stdin pipe closing (at process exit) makes it kill moto.
    _watchdog: Mutex<Child>,
}

static MOTO: OnceLock<Moto> = OnceLock::new();

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind loopback")
        .local_addr()
        .expect("addr")
        .port()
}

fn start() -> Moto {
    let port = free_port();
    let recording = std::env::temp_dir().join(format!(
        "tidemark-core-tests-moto-{}-{port}.jsonl",
        std::process::id()
    ));
    // `moto_server` is looked up first so a missing install fails with a clear message.
    let found = Command::new("sh")
        .args(["-c", "command -v moto_server"])
        .stdout(Stdio::null())
        .status()
        .expect("sh");
    assert!(
        found.success(),
        "moto_server is not installed: run scripts/install-deps.sh (pip install 'moto[server]')"
    );
    let watchdog = Command::new("sh")
        .args([
            "-c",
            r#"moto_server -H 127.0.0.1 -p "$1" >/dev/null 2>&1 & m=$!; read -r _; kill "$m"; wait "$m"; rm -f "$2""#,
            "moto-watchdog",
        ])
        .arg(port.to_string())
        .arg(&recording)
        .env("MOTO_ENABLE_RECORDING", "True")
        .env("MOTO_RECORDER_FILEPATH", &recording)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the moto watchdog shell");
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let made = Command::new("python3")
            .args(["-c", "import boto3,sys; boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket=sys.argv[2])", &endpoint, BUCKET])
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
        std::thread::sleep(Duration::from_millis(300));
    }
    // The S3 backend reads the standard AWS variables. They are set once, before any test of
    // this process opens an s3:// store, and every test that needs them waits for this start.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        std::env::set_var(k, v);
    }
    Moto {
        endpoint,
        recording,
        _watchdog: Mutex::new(watchdog),
    }
}

/// The endpoint of this process's moto server, started on first use.
pub fn s3_endpoint() -> &'static str {
    &MOTO.get_or_init(start).endpoint
}

/// A fresh `s3://` repository URL on this process's moto server: `name` plus a counter, so
/// every call (every test) gets keys no other test touches.
pub fn s3_url(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    s3_endpoint();
    format!(
        "s3://{BUCKET}/{name}-{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Requests moto received so far (in arrival order) whose path starts with `/<bucket>/<prefix>`,
/// as (method, path below the bucket).
pub fn s3_requests(prefix: &str) -> Vec<(String, String)> {
    let moto = MOTO.get_or_init(start);
    let text = std::fs::read_to_string(&moto.recording).unwrap_or_default();
    let want = format!("/{BUCKET}/{prefix}");
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let url = url::Url::parse(v.get("url")?.as_str()?).ok()?;
            let path = url.path().to_string();
            if !path.starts_with(&want) {
                return None;
            }
            let method = v.get("method")?.as_str()?.to_string();
            Some((method, path[BUCKET.len() + 2..].to_string()))
        })
        .collect()
}

/// Expire options of the tests: keep the newest backup, no grace period, default repacking.
pub fn expire_options(dry_run: bool) -> tidemark_core::expire::ExpireOptions {
    tidemark_core::expire::ExpireOptions {
        policy: tidemark_core::retention::Policy {
            retain_last: Some(1),
            ..Default::default()
        },
        dry_run,
        gc_grace: Duration::ZERO,
        repack: tidemark_core::repack::RepackOptions::default(),
        wal_window_us: None,
    }
}
