//! Every test hook of the library in one place: environment variables named `TIDEMARK_TEST_*`
//! that the end-to-end tests set to reach states a real run reaches only by bad luck (a crash
//! between two steps, a slow store). Unset, each hook does nothing and costs one lookup.
//!
//! - `TIDEMARK_TEST_CRASH_AT=<step>`: [`crash_point`] exits the process abruptly (code 99) at
//!   that named step of expire, repack or a backup (`backup-after-start`, `backup-mid-copy`
//!   after a pack is stored, `backup-after-stop`, `backup-before-manifest`), as a kill -9 would.
//! - `TIDEMARK_TEST_PAUSE_AT=<step>:<path>`: [`pause_point`] / [`pause_point_async`] wait at
//!   that named step for as long as the file `<path>` exists, after creating `<path>.paused` to
//!   say the step is reached; the test removes `<path>` to let the process go on. Steps:
//!   `backup-mid-copy` (a `--pgdata` backup once a worker takes a block of the second half of
//!   its files, every worker then waiting before that block: the files being copied are open
//!   and their blocks counted; a replication backup once half the server's size estimate has been
//!   streamed, the stream left unread meanwhile, so the server waits too); `expire-before-delete`
//!   (an expire holding its lease, its plan made, before its first delete: a test stops it there
//!   with SIGSTOP past the lease TTL).
//! - `TIDEMARK_TEST_GET_DELAY_MS=<ms>`: [`get_delay`] sleeps before each WAL object read, so a
//!   test can observe prefetch racing a slow store.

/// Exits abruptly when `TIDEMARK_TEST_CRASH_AT` names `step`.
pub(crate) fn crash_point(step: &str) {
    if std::env::var("TIDEMARK_TEST_CRASH_AT").is_ok_and(|s| s == step) {
        eprintln!("tidemark: TIDEMARK_TEST_CRASH_AT={step}: exiting abruptly");
        std::process::exit(99);
    }
}

/// Sleeps `TIDEMARK_TEST_GET_DELAY_MS` milliseconds, if set.
pub(crate) async fn get_delay() {
    if let Some(ms) = std::env::var("TIDEMARK_TEST_GET_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// The flag file of `TIDEMARK_TEST_PAUSE_AT` when it names `step` and exists, after creating
/// its `.paused` marker.
fn pause_flag(step: &str) -> Option<std::path::PathBuf> {
    let v = std::env::var("TIDEMARK_TEST_PAUSE_AT").ok()?;
    let (s, path) = v.split_once(':')?;
    if s != step || !std::path::Path::new(path).exists() {
        return None;
    }
    let marker = format!("{path}.paused");
    if let Err(e) = std::fs::write(&marker, b"") {
        eprintln!("tidemark: TIDEMARK_TEST_PAUSE_AT={v}: cannot create {marker}: {e}");
    }
    Some(std::path::PathBuf::from(path))
}

/// Blocks the thread while `TIDEMARK_TEST_PAUSE_AT` names `step` and its file exists.
pub(crate) fn pause_point(step: &str) {
    if let Some(flag) = pause_flag(step) {
        while flag.exists() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// As [`pause_point`], for async code.
pub(crate) async fn pause_point_async(step: &str) {
    if let Some(flag) = pause_flag(step) {
        while flag.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
