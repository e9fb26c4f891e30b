//! The sidecar's durable state, `<state dir>/archived`: which `.ready` WAL files it has durably
//! stored, so that a restart does not upload them again and a handoff for one is answered at once.
//!
//! Invariants:
//! - The first line binds the file to one repository (`tidemark-sidecar-state 1 <repo url>`); the
//!   state of another repository is never trusted.
//! - Every other line is `<name> <digest>`, trusted only while that file is still `.ready` and
//!   still has that digest (a re-initialised cluster reuses names). The digest is the stored WAL
//!   object's (`blake3:<hex>` since format 1.6); a bare hex digest, as earlier releases wrote,
//!   is a SHA-256.
//! - A name is recorded (appended and fsynced) only after its object is durably stored; the
//!   daemon acknowledges it only after it is recorded.
//! - Opening rewrites the file with the trusted lines alone: temp file, fsync, rename, fsync of
//!   the directory.

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use tidemark_format::wal::WalDigest;

const STATE_FILE: &str = "archived";

/// The names durably stored, in memory and in the state file.
pub(super) struct State {
    /// Recorded names still `.ready` or recently requested.
    stored: Mutex<HashSet<String>>,
    /// The state file, open for appending.
    file: Mutex<File>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The state file's first line.
fn header(repo: &str) -> String {
    format!("tidemark-sidecar-state 1 {repo}")
}

/// A recorded digest: as [`WalDigest`] writes it, or bare hex (a SHA-256, earlier releases).
fn parse_digest(s: &str) -> Option<WalDigest> {
    WalDigest::parse(s).or_else(|| s.parse().ok().map(WalDigest::Sha256))
}

/// Whether WAL file `name` of pg_wal still has the digest `recorded`.
fn file_has(pg_wal: &Path, name: &str, recorded: &WalDigest) -> bool {
    crate::wal::digest_file(&pg_wal.join(name), recorded).is_ok_and(|d| d == *recorded)
}

impl State {
    /// Opens the state in `state_dir` (created if missing) for repository `repo`, keeping only
    /// entries for files of `pg_wal` that are still `ready` with the recorded content.
    pub(super) fn open(
        state_dir: &Path,
        pg_wal: &Path,
        ready: &HashSet<String>,
        repo: &str,
    ) -> Result<State> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
        let path = state_dir.join(STATE_FILE);
        let old = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let header = header(repo);
        let mut lines = old.lines();
        let mut kept: Vec<(String, String)> = Vec::new();
        if lines.next() == Some(header.as_str()) {
            for l in lines {
                let Some((name, sha)) = l.split_once(' ') else {
                    continue;
                };
                if ready.contains(name)
                    && parse_digest(sha).is_some_and(|d| file_has(pg_wal, name, &d))
                {
                    kept.push((name.to_string(), sha.to_string()));
                }
            }
        }
        let tmp = state_dir.join(format!("{STATE_FILE}.tmp"));
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        writeln!(f, "{header}")?;
        for (n, sha) in &kept {
            writeln!(f, "{n} {sha}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(state_dir)?.sync_all()?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(State {
            stored: Mutex::new(kept.into_iter().map(|(n, _)| n).collect()),
            file: Mutex::new(file),
        })
    }

    /// Whether `name` is recorded as durably stored.
    pub(super) fn contains(&self, name: &str) -> bool {
        lock(&self.stored).contains(name)
    }

    /// Forgets, in memory, the names `keep` rejects (the file is pruned at the next open).
    pub(super) fn retain(&self, keep: impl Fn(&String) -> bool) {
        lock(&self.stored).retain(keep);
    }

    /// Records `name` as durably stored, with the digest of the content that was stored.
    pub(super) fn record(&self, name: &str, digest: &WalDigest) -> Result<()> {
        {
            let mut f = lock(&self.file);
            writeln!(f, "{name} {digest}")?;
            f.sync_data()?;
        }
        lock(&self.stored).insert(name.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_bound_to_the_repository_and_the_file_content() {
        let dir = tempfile::tempdir().unwrap();
        let pg_wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(&pg_wal).unwrap();
        let state = dir.path().join("state");
        let n = "000000010000000000000001";
        let ready: HashSet<String> = [n.to_string()].into();
        std::fs::write(pg_wal.join(n), b"segment bytes").unwrap();
        let sha = WalDigest::of(b"segment bytes");
        // A state of an earlier release (a bare SHA-256) is trusted alike.
        let old_sha = tidemark_format::ChunkId::of(b"segment bytes");
        for line in [format!("{n} {old_sha}"), format!("{n} sha256:{old_sha}")] {
            std::fs::create_dir_all(&state).unwrap();
            let text = format!("{}\n{line}\n", header("file:///repo1"));
            std::fs::write(state.join(STATE_FILE), text).unwrap();
            assert!(State::open(&state, &pg_wal, &ready, "file:///repo1")
                .unwrap()
                .contains(n));
        }
        let write_state = || {
            std::fs::create_dir_all(&state).unwrap();
            std::fs::write(
                state.join(STATE_FILE),
                format!("{}\n{n} {sha}\n", header("file:///repo1")),
            )
            .unwrap();
        };
        write_state();
        assert!(State::open(&state, &pg_wal, &ready, "file:///repo1")
            .unwrap()
            .contains(n));
        write_state();
        assert!(
            !State::open(&state, &pg_wal, &ready, "file:///repo2")
                .unwrap()
                .contains(n),
            "another repository's state must not be trusted"
        );
        write_state();
        assert!(
            !State::open(&state, &pg_wal, &HashSet::new(), "file:///repo1")
                .unwrap()
                .contains(n),
            "a file no longer .ready must not be trusted"
        );
        write_state();
        std::fs::write(pg_wal.join(n), b"other bytes, same name").unwrap();
        assert!(
            !State::open(&state, &pg_wal, &ready, "file:///repo1")
                .unwrap()
                .contains(n),
            "a file with other content must not be trusted"
        );
    }
}
