//! Getting restored files to disk: early fdatasyncs while a file is written ([`EarlySync`]) and
//! its final fsync behind the next files' writes ([`Syncs`]).
//!
//! Invariants:
//! - An error from any fdatasync or fsync fails the restore (a page the kernel failed to write
//!   may be counted clean afterwards, so a later sync could succeed without it on disk).
//! - Memory and threads are bounded: one early fdatasync per file, SYNCS_IN_FLIGHT final fsyncs.

use anyhow::{anyhow, Context, Result};
use futures::FutureExt;
use std::sync::Arc;

/// Bytes written to one file between two early fdatasyncs (`EarlySync`).
const SYNC_EVERY: u64 = 64 << 20;

/// Gets a file's written bytes to disk while the rest of the restore still decodes. The
/// kernel starts writing dirty pages back by itself only once they pass a share of memory (10%
/// by default), so without this a restore decodes everything first and then waits for the
/// whole data directory in its final fsyncs. Every SYNC_EVERY bytes, an fdatasync of the file
/// starts on a blocking thread (one at a time per file, nothing waits for it) and the final
/// fsync waits only for what is left. An early fdatasync's error fails the restore: after a
/// failed fdatasync the kernel may count the pages clean, so a later fsync could succeed
/// without them on disk.
pub(super) struct EarlySync<'a> {
    file: &'a Arc<std::fs::File>,
    path: &'a str,
    since: u64,
    running: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl<'a> EarlySync<'a> {
    pub(super) fn new(file: &'a Arc<std::fs::File>, path: &'a str) -> Self {
        EarlySync {
            file,
            path,
            since: 0,
            running: None,
        }
    }

    pub(super) fn written(&mut self, bytes: u64) -> Result<()> {
        self.since += bytes;
        if self.since < SYNC_EVERY {
            return Ok(());
        }
        if let Some(h) = self.running.as_mut() {
            match h.now_or_never() {
                // Still running: the next one starts after it.
                None => return Ok(()),
                Some(r) => r?.with_context(|| format!("cannot fdatasync {}", self.path))?,
            }
        }
        let file = Arc::clone(self.file);
        self.running = Some(tokio::task::spawn_blocking(move || file.sync_data()));
        self.since = 0;
        Ok(())
    }

    pub(super) async fn finish(self) -> Result<()> {
        if let Some(h) = self.running {
            h.await?
                .with_context(|| format!("cannot fdatasync {}", self.path))?;
        }
        Ok(())
    }
}

/// Final fsyncs of restored files running at once ([`Syncs`]).
const SYNCS_IN_FLIGHT: usize = 16;

/// The final fsyncs of written files, run on blocking threads while the next files are written:
/// at most SYNCS_IN_FLIGHT at once (a file waits for a free one, holding its place among the
/// files in flight). Each fsync of a new file costs the disk a cache flush and the inode's
/// write; waited for by the file that wrote it, the ~1,000 small files of a data directory
/// went through them a few at a time, one flush after the other (lab, realistic nightly: 0.4 s
/// of a 3.1 s restore), while flushes that run together are merged by the block layer. An
/// error fails the restore at the next [`Syncs::check`] or at [`Syncs::finish`], which waits
/// for every one: the caller writes `global/pg_control` only after it.
pub(super) struct Syncs {
    permits: Arc<tokio::sync::Semaphore>,
    running: std::sync::Mutex<Vec<Running>>,
}

/// A file's path and its fsync on a blocking thread.
type Running = (String, tokio::task::JoinHandle<std::io::Result<()>>);

impl Syncs {
    pub(super) fn new() -> Self {
        Syncs {
            permits: Arc::new(tokio::sync::Semaphore::new(SYNCS_IN_FLIGHT)),
            running: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Starts the fsync of `file`, restored as `path`, once fewer than SYNCS_IN_FLIGHT run.
    pub(super) async fn start(&self, file: Arc<std::fs::File>, path: &str) -> Result<()> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .context("the restore's fsyncs were stopped")?;
        let h = tokio::task::spawn_blocking(move || {
            let r = file.sync_all();
            drop(permit);
            r
        });
        self.lock()?.push((path.to_string(), h));
        Ok(())
    }

    /// Fails with the error of an fsync that has returned one; forgets the ones that succeeded.
    pub(super) fn check(&self) -> Result<()> {
        let done: Vec<Running> = {
            let mut running = self.lock()?;
            let (done, left) = std::mem::take(&mut *running)
                .into_iter()
                .partition(|(_, h)| h.is_finished());
            *running = left;
            done
        };
        for (path, h) in done {
            if let Some(r) = h.now_or_never() {
                fsynced(&path, r)?;
            }
        }
        Ok(())
    }

    /// Waits for every fsync started; fails with the first error.
    pub(super) async fn finish(&self) -> Result<()> {
        let running = std::mem::take(&mut *self.lock()?);
        for (path, h) in running {
            fsynced(&path, h.await)?;
        }
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<Running>>> {
        self.running
            .lock()
            .map_err(|_| anyhow!("the restore's list of fsyncs is poisoned"))
    }
}

/// The outcome of file `path`'s fsync.
fn fsynced(
    path: &str,
    r: std::result::Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<()> {
    r?.with_context(|| format!("cannot fsync {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn early_syncs_start_every_sync_every_bytes_one_at_a_time_and_finish() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(std::fs::File::create(dir.path().join("f")).unwrap());
        let mut early = EarlySync::new(&file, "f");
        early.written(SYNC_EVERY - 1).unwrap();
        assert!(early.running.is_none());
        early.written(1).unwrap();
        assert!(early.running.is_some());
        assert_eq!(early.since, 0);
        // Once it has finished, the next mark joins it (its result checked) and starts another.
        while !early.running.as_ref().unwrap().is_finished() {
            tokio::task::yield_now().await;
        }
        early.written(SYNC_EVERY).unwrap();
        assert_eq!(
            early.since, 0,
            "the finished one was joined and a new one started"
        );
        early.finish().await.unwrap();
    }

    #[tokio::test]
    async fn fsyncs_run_behind_the_writes_and_their_errors_fail_the_restore() {
        let dir = tempfile::tempdir().unwrap();
        let syncs = Syncs::new();
        // More files than fsyncs run at once: each one's permit comes back.
        for k in 0..SYNCS_IN_FLIGHT * 2 + 1 {
            let f = std::fs::File::create(dir.path().join(k.to_string())).unwrap();
            syncs
                .start(Arc::new(f), &format!("base/1/{k}"))
                .await
                .unwrap();
            syncs.check().unwrap();
        }
        syncs.finish().await.unwrap();
        assert!(syncs.lock().unwrap().is_empty());
        // fsync(2) of a pipe fails (EINVAL): the error names the file, at check or at finish.
        let (_r, w) = std::io::pipe().unwrap();
        let f = std::fs::File::from(std::os::fd::OwnedFd::from(w));
        syncs.start(Arc::new(f), "global/1262").await.unwrap();
        let e = format!("{:#}", syncs.finish().await.unwrap_err());
        assert!(e.contains("cannot fsync global/1262"), "{e}");
        let (_r, w) = std::io::pipe().unwrap();
        let f = std::fs::File::from(std::os::fd::OwnedFd::from(w));
        syncs.start(Arc::new(f), "base/5/1259").await.unwrap();
        while !syncs.lock().unwrap().iter().all(|(_, h)| h.is_finished()) {
            tokio::task::yield_now().await;
        }
        let e = format!("{:#}", syncs.check().unwrap_err());
        assert!(e.contains("cannot fsync base/5/1259"), "{e}");
        assert!(syncs.lock().unwrap().is_empty());
    }
}
