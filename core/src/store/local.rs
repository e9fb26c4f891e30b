//! The `file://` backend: a repository in a local directory, written durably (temporary file,
//! fsync, link for create-only or rename for replace, fsync of the directory; FORMAT.md S1-S3).

use super::{Listed, Result, StoreError};
use bytes::Bytes;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A repository in a local directory (`file://`), written durably.
pub(super) struct LocalDir {
    pub(super) root: PathBuf,
}

pub(super) fn io_err(key: &str, e: std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::NotFound => StoreError::NotFound {
            key: key.to_string(),
        },
        std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists {
            key: key.to_string(),
        },
        _ => StoreError::Io {
            key: key.to_string(),
            message: e.to_string(),
            retryable: matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
        },
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl LocalDir {
    pub(super) fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub(super) fn put_create(&self, key: &str, data: &[u8]) -> Result<()> {
        if self.path(key).exists() {
            return Err(StoreError::AlreadyExists {
                key: key.to_string(),
            });
        }
        // link() fails with EEXIST if the name exists: create-only, atomically.
        self.put_via_tmp(key, data, |tmp, dest| std::fs::hard_link(tmp, dest))
    }

    pub(super) fn put_replace(&self, key: &str, data: &[u8]) -> Result<()> {
        // rename() replaces the name atomically: readers open the old file or the new one.
        self.put_via_tmp(key, data, |tmp, dest| std::fs::rename(tmp, dest))
    }

    /// Writes `data` to a temporary file beside `key` and fsyncs it, lets `publish` give it the
    /// key's name, then fsyncs the directory; the temporary name never outlives the call.
    fn put_via_tmp(
        &self,
        key: &str,
        data: &[u8],
        publish: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
    ) -> Result<()> {
        let dest = self.path(key);
        let dir = dest
            .parent()
            .expect("a key below the root has a parent directory")
            .to_path_buf();
        self.create_dirs(&dir).map_err(|e| io_err(key, e))?;
        let tmp = dir.join(format!(".tmp.{}.{}", std::process::id(), unique()));
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            drop(f);
            publish(&tmp, &dest)?;
            fsync_dir(&dir)
        })();
        let _ = std::fs::remove_file(&tmp);
        result.map_err(|e| io_err(key, e))
    }

    /// Removes the temporary files (`.tmp.<pid>.<n>`) writers that died left below the root:
    /// those last modified before `older_than` whose writer process is not alive on this host.
    /// Returns how many it removed. (A writer only ever holds its temporary for one object's
    /// write, so the grace period before `older_than` is ample.)
    pub fn sweep_temporaries(&self, older_than: std::time::SystemTime) -> std::io::Result<u64> {
        let mut n = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for ent in rd {
                let ent = ent?;
                let Ok(ft) = ent.file_type() else { continue };
                let name = ent.file_name();
                let name = name.to_string_lossy();
                if ft.is_dir() {
                    stack.push(ent.path());
                    continue;
                }
                let Some(pid) = name
                    .strip_prefix(".tmp.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                let alive = Path::new(&format!("/proc/{pid}")).exists();
                let old = ent
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < older_than);
                if !alive && old {
                    match std::fs::remove_file(ent.path()) {
                        Ok(()) => n += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(n)
    }

    /// Creates missing directories (the root included) and fsyncs each new entry's parent, so a
    /// stored object's path survives a crash.
    fn create_dirs(&self, dir: &Path) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut cur = dir;
        while !cur.is_dir() {
            missing.push(cur.to_path_buf());
            match cur.parent() {
                Some(p) => cur = p,
                None => break,
            }
        }
        for d in missing.iter().rev() {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            if let Some(parent) = d.parent() {
                fsync_dir(parent)?;
            }
        }
        Ok(())
    }

    pub(super) fn get(&self, key: &str, max: u64) -> Result<Bytes> {
        let mut f = std::fs::File::open(self.path(key)).map_err(|e| io_err(key, e))?;
        let size = f.metadata().map_err(|e| io_err(key, e))?.len();
        if size > max {
            return Err(StoreError::TooLarge {
                key: key.to_string(),
                size,
                max,
            });
        }
        let mut buf = Vec::with_capacity(size as usize);
        std::io::Read::read_to_end(&mut f, &mut buf).map_err(|e| io_err(key, e))?;
        Ok(Bytes::from(buf))
    }

    /// Reads `range`; unless `exact`, a range running past the end of the file yields the bytes
    /// up to its end.
    pub(super) fn get_range(&self, key: &str, range: Range<u64>, exact: bool) -> Result<Bytes> {
        use std::io::{Read, Seek};
        let f = std::fs::File::open(self.path(key)).map_err(|e| io_err(key, e))?;
        let mut len = range.end.saturating_sub(range.start);
        if !exact {
            let size = f.metadata().map_err(|e| io_err(key, e))?.len();
            len = len.min(size.saturating_sub(range.start));
        }
        // Read into fresh capacity: a zeroed buffer cost a memset of every byte read (2% of a
        // restore's CPU).
        let mut buf = Vec::with_capacity(len as usize);
        (&f).seek(std::io::SeekFrom::Start(range.start))
            .and_then(|_| (&f).take(len).read_to_end(&mut buf))
            .map_err(|e| io_err(key, e))?;
        if buf.len() as u64 != len {
            return Err(io_err(
                key,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} of {len} bytes read", buf.len()),
                ),
            ));
        }
        Ok(Bytes::from(buf))
    }

    pub(super) fn head(&self, key: &str) -> Result<u64> {
        std::fs::metadata(self.path(key))
            .map(|m| m.len())
            .map_err(|e| io_err(key, e))
    }

    pub(super) fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let start = self.path(prefix.trim_end_matches('/'));
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(prefix, e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| io_err(prefix, e))?;
                let name = ent.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with(".tmp.") {
                    continue;
                }
                // An entry deleted between readdir and stat is simply not listed: a listing is
                // not a snapshot (S3's is not either), and a concurrent delete is no error.
                let ft = match ent.file_type() {
                    Ok(ft) => ft,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(prefix, e)),
                };
                if ft.is_dir() {
                    stack.push(ent.path());
                } else if ft.is_file() {
                    let p = ent.path();
                    let Ok(rel) = p.strip_prefix(&self.root) else {
                        continue;
                    };
                    let Some(key) = rel.to_str() else { continue };
                    let meta = match ent.metadata() {
                        Ok(m) => m,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_err(prefix, e)),
                    };
                    let modified_us = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .and_then(|d| i64::try_from(d.as_micros()).ok());
                    out.push(Listed {
                        key: key.to_string(),
                        size: meta.len(),
                        modified_us,
                    });
                }
            }
        }
        Ok(out)
    }
}

pub(super) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(48)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Objects deleted while a listing runs are left out of it, never an error: a lease renewal
    /// deletes its previous object while `locks/` is being listed (the CI failure of 3352dac).
    #[test]
    fn listing_survives_concurrent_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("locks")).expect("mkdir");
        let store = LocalDir { root: root.clone() };
        for round in 0..20 {
            let names: Vec<PathBuf> = (0..300)
                .map(|i| root.join("locks").join(format!("{round}-{i}")))
                .collect();
            for p in &names {
                std::fs::write(p, b"x").expect("write");
            }
            let deleter = std::thread::spawn(move || {
                for p in names {
                    std::fs::remove_file(p).expect("remove");
                }
            });
            while !deleter.is_finished() {
                store
                    .list("locks/")
                    .expect("a listing racing deletes must not fail");
            }
            deleter.join().expect("deleter");
            assert!(store.list("locks/").expect("list").is_empty());
        }
    }
}
