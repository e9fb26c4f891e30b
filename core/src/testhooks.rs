//! Every test hook of the library in one place: environment variables named `TIDEMARK_TEST_*`
//! that the end-to-end tests set to reach states a real run reaches only by bad luck (a crash
//! between two steps, a slow store). Unset, each hook does nothing and costs one lookup.
//!
//! - `TIDEMARK_TEST_CRASH_AT=<step>`: [`crash_point`] exits the process abruptly (code 99) at
//!   that named step of expire, repack or a backup (`backup-after-start`, `backup-mid-copy`
//!   after a pack is stored, `backup-after-stop`, `backup-before-manifest`), as a kill -9 would.
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
