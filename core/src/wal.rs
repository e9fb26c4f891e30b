//! Archiving and fetching WAL files: the archive_command and restore_command contracts.
//!
//! Invariants:
//! - `push` returns `Ok` only once the object is durably stored; an existing object with the same
//!   sha256 is success, one with a different sha256 is [`WalError::Conflict`] and stays untouched.
//! - A segment is stored only if its page header's system identifier matches the repository's.
//! - `fetch` distinguishes "not in the archive" from every other failure: only the first may end
//!   recovery.

use crate::repo;
use crate::store::{Store, StoreError};
use anyhow::{Context, Result};
use bytes::Bytes;
use std::io::Write;
use std::path::Path;
use tidemark_format::keys;
use tidemark_format::wal::{self as walfmt, WalFileName};

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal file {name} already archived with a different sha256 (stored {stored}, offered {offered})\nhint: two clusters may be archiving into one repository, or the file is corrupt; the stored copy was left untouched")]
    Conflict {
        name: String,
        stored: String,
        offered: String,
    },
    #[error("wal file {name} is not in the archive")]
    NotFound { name: String },
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Newly stored; the object's size in bytes.
    Stored(u64),
    AlreadyArchived,
}

/// Largest WAL object read back (a 1 GiB segment that did not compress, plus its header).
/// Bytes read to get a stored WAL object's header (it is at most 8 + 1 + 4 + 64 + 8 + 32).
const HEADER_READ: u64 = 128;
pub const MAX_OBJECT: u64 = walfmt::MAX_WAL_FILE + (1 << 20);

/// Archives one file handed to archive_command.
pub async fn push(store: &Store, path: &Path, level: i32) -> Result<PushOutcome> {
    let fname = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", path.display()))?;
    let name = WalFileName::parse(fname).context("archive_command was given a file that is not WAL\nhint: archive_command must be 'tidemark-agent wal-push %p'")?;
    let max = name.max_size();
    let p = path.to_path_buf();
    let data = tokio::task::spawn_blocking(move || read_capped(&p, max)).await??;
    match name {
        WalFileName::Segment { .. } | WalFileName::Partial { .. } => {
            let hdr = walfmt::parse_long_page_header(&data).with_context(|| {
                format!("wal file {name} does not start with a valid PostgreSQL 15 page header")
            })?;
            if matches!(name, WalFileName::Segment { .. })
                && data.len() as u64 != hdr.seg_size as u64
            {
                anyhow::bail!("wal segment {name} is {} bytes but its header says segments are {} bytes\nhint: the file is truncated; PostgreSQL will retry", data.len(), hdr.seg_size);
            }
            repo::ensure_config(store, hdr.system_id)
                .await
                .with_context(|| format!("refusing to archive wal file {name}"))?;
        }
        _ => {
            repo::require_config(store).await?;
        }
    }
    let key = keys::wal(&name);
    let (obj, sha) = tokio::task::spawn_blocking(move || {
        let obj = walfmt::encode(name, &data, level);
        let sha = tidemark_format::ChunkId::of(&data);
        (obj, sha)
    })
    .await?;
    let size = obj.len() as u64;
    match store.put_create(&key, Bytes::from(obj)).await {
        Ok(()) => Ok(PushOutcome::Stored(size)),
        Err(StoreError::AlreadyExists { .. }) => {
            // The header (with the sha256) sits in the first bytes of the object.
            let stored_size = store.head(&key).await?.unwrap_or(0);
            let existing = store
                .get_range(&key, 0..stored_size.min(HEADER_READ))
                .await
                .with_context(|| format!("cannot read the stored copy of {name}"))?;
            let (h, _) = walfmt::decode_header(&existing)
                .with_context(|| format!("the stored copy of {name} is unreadable"))?;
            if h.sha256 == sha {
                Ok(PushOutcome::AlreadyArchived)
            } else {
                Err(WalError::Conflict {
                    name: name.to_string(),
                    stored: h.sha256.to_string(),
                    offered: sha.to_string(),
                }
                .into())
            }
        }
        Err(e) => Err(e).with_context(|| format!("cannot store wal file {name}")),
    }
}

fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > max {
        anyhow::bail!(
            "{} is {} bytes, more than the {max} a WAL file can be",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Fetches `fname` from the archive into `dest` (temp name, fsync, rename).
/// Returns `WalError::NotFound` (only) when the archive lacks the file.
pub async fn fetch(store: &Store, fname: &str, dest: &Path) -> Result<()> {
    let Ok(name) = WalFileName::parse(fname) else {
        return Err(WalError::NotFound {
            name: fname.to_string(),
        }
        .into());
    };
    let obj = get_object(store, &name).await?;
    install(name, obj, dest.to_path_buf()).await
}

/// Reads the stored object of `name`; `WalError::NotFound` (only) when the archive lacks it.
pub async fn get_object(store: &Store, name: &WalFileName) -> Result<Bytes> {
    crate::prefetch::test_get_delay().await;
    let key = keys::wal(name);
    match store.get(&key, MAX_OBJECT).await {
        Ok(b) => Ok(b),
        Err(StoreError::NotFound { .. }) => Err(WalError::NotFound {
            name: name.to_string(),
        }
        .into()),
        Err(e) => Err(e).with_context(|| format!("cannot read wal file {name} from the archive")),
    }
}

/// Verifies a stored WAL object (name, size, sha256) and writes its file to `dest` atomically.
pub async fn install(name: WalFileName, obj: Bytes, dest: std::path::PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || -> Result<()> {
        let (h, data) =
            walfmt::decode(&obj).with_context(|| format!("archived wal file {name} is damaged"))?;
        if h.name != name {
            anyhow::bail!(
                "archived object {} holds {} instead of {name}",
                keys::wal(&name),
                h.name
            );
        }
        write_file(&data, &dest)
    })
    .await?
}

/// Writes a WAL file to `dest` atomically: temp name beside it, fsync, rename.
pub fn write_file(data: &[u8], dest: &Path) -> Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tidemark-tmp",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal")
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}
