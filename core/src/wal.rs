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
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tidemark_format::wal::{self as walfmt, WalFileName};
use tidemark_format::{keys, ChunkId};

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

/// How `wal-push` tells which database system a file belongs to and whether a new one may join.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// The data directory (for `.history` and `.backup` files, which carry no system identifier);
    /// default: derived from a `pg_wal/` path, else the working directory (archive_command runs
    /// in the data directory).
    pub pgdata: Option<PathBuf>,
    /// Register this cluster as a new system even when it is not a major upgrade (see
    /// `repo::open_for_writer`).
    pub accept_new_system: bool,
}

/// Archives one file handed to archive_command.
pub async fn push(
    store: &Store,
    path: &Path,
    level: i32,
    opts: &PushOptions,
) -> Result<PushOutcome> {
    Ok(push_file(store, path, level, opts).await?.0)
}

/// The data directory of a WAL file: `--pgdata`, else the parent of its `pg_wal/`, else the
/// working directory when it is a data directory.
fn data_dir_of(path: &Path, opts: &PushOptions) -> Option<PathBuf> {
    if let Some(d) = &opts.pgdata {
        return Some(d.clone());
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent.filter(|p| p.file_name().is_some_and(|n| n == "pg_wal")) {
        let data = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        return Some(data.to_path_buf());
    }
    Path::new("global/pg_control")
        .is_file()
        .then(|| PathBuf::from("."))
}

/// Archives one WAL file; also returns the sha256 of its content (what the stored object holds).
pub async fn push_file(
    store: &Store,
    path: &Path,
    level: i32,
    opts: &PushOptions,
) -> Result<(PushOutcome, ChunkId)> {
    let fname = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", path.display()))?;
    let name = WalFileName::parse(fname).context("archive_command was given a file that is not WAL\nhint: archive_command must be 'tidemark-agent wal-push %p'")?;
    let p = path.to_path_buf();
    let (obj, header, page) =
        tokio::task::spawn_blocking(move || encode_file(&p, name, level)).await??;
    // Which system: a segment says so in its page header; any file, through its data directory.
    let pgdata = data_dir_of(path, opts);
    let dir_major = pgdata
        .as_deref()
        .and_then(|d| crate::pgversion::major_of_data_dir(d).ok());
    let (system_id, major) = match (page, pgdata.as_deref()) {
        (Some(page), _) => (
            page.system_id,
            walfmt::major_of_page_magic(page.magic).or(dir_major),
        ),
        (None, Some(d)) => (crate::pgversion::system_id_of_data_dir(d).with_context(|| format!("cannot tell which database system {name} belongs to\nhint: archive_command runs in the data directory; pass --pgdata if wal-push runs elsewhere"))?, dir_major),
        (None, None) => match repo::load_config(store).await? {
            // No data directory to ask: a repository of one system takes the file as before.
            Some(cfg) => {
                if repo::systems(store).await?.len() > 1 {
                    anyhow::bail!("cannot tell which of the repository's database systems {name} belongs to\nhint: archive_command runs in the data directory (where global/pg_control is); pass --pgdata DIR if wal-push runs elsewhere");
                }
                (cfg.system_id, None)
            }
            None => anyhow::bail!("cannot archive {name} into the new repository {}: it carries no system identifier and no data directory is known\nhint: archive_command runs in the data directory (where global/pg_control is); pass --pgdata DIR if wal-push runs elsewhere", store.url()),
        },
    };
    let (store, _) = repo::open_for_writer(store, system_id, major, opts.accept_new_system, false)
        .await
        .with_context(|| format!("refusing to archive wal file {name}"))?;
    let store = &store;
    let key = keys::wal(&name);
    let sha = header.sha256;
    let size = obj.len() as u64;
    match store.put_create(&key, Bytes::from(obj)).await {
        Ok(()) => Ok((PushOutcome::Stored(size), sha)),
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
                Ok((PushOutcome::AlreadyArchived, sha))
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

/// Bytes of a WAL file read at a time while hashing and compressing it.
const READ_BLOCK: usize = 1 << 20;

/// Reads a WAL file in READ_BLOCK pieces, hashing and compressing as it goes, so an upload holds
/// the compressed object rather than the whole file. A segment's page header is checked first;
/// returns the encoded object, its header and (for segments and partials) the page header.
fn encode_file(
    path: &Path,
    name: WalFileName,
    level: i32,
) -> Result<(
    Vec<u8>,
    walfmt::WalObjectHeader,
    Option<walfmt::LongPageHeader>,
)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = f
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let max = name.max_size();
    if len > max {
        anyhow::bail!(
            "{} is {len} bytes, more than the {max} a WAL file can be",
            path.display()
        );
    }
    let mut block = vec![0u8; READ_BLOCK.min(len.max(1) as usize)];
    let first =
        read_full(&mut f, &mut block).with_context(|| format!("cannot read {}", path.display()))?;
    let page = match name {
        WalFileName::Segment { .. } | WalFileName::Partial { .. } => {
            let hdr = walfmt::parse_long_page_header(&block[..first]).with_context(|| {
                format!("wal file {name} does not start with a valid PostgreSQL WAL page header")
            })?;
            crate::pgversion::major_of_segment(&name.to_string(), hdr.magic);
            if matches!(name, WalFileName::Segment { .. }) && len != hdr.seg_size as u64 {
                anyhow::bail!("wal segment {name} is {len} bytes but its header says segments are {} bytes\nhint: the file is truncated; PostgreSQL will retry", hdr.seg_size);
            }
            Some(hdr)
        }
        _ => None,
    };
    let mut hasher = Sha256::new();
    let mut enc = zstd::stream::Encoder::new(Vec::with_capacity((len / 3) as usize), level)
        .context("cannot start a zstd stream")?;
    enc.set_pledged_src_size(Some(len))
        .context("cannot start a zstd stream")?;
    enc.include_contentsize(true)
        .context("cannot start a zstd stream")?;
    let mut total = 0u64;
    let mut n = first;
    while n > 0 {
        hasher.update(&block[..n]);
        enc.write_all(&block[..n])
            .with_context(|| format!("cannot compress {}", path.display()))?;
        total += n as u64;
        n = read_full(&mut f, &mut block)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    if total != len {
        anyhow::bail!("{} changed size while being read ({len} then {total} bytes)\nhint: PostgreSQL never changes a finished WAL file; archive_command must be given %p", path.display());
    }
    let frame = enc
        .finish()
        .with_context(|| format!("cannot compress {}", path.display()))?;
    let header = walfmt::WalObjectHeader {
        name,
        size: len,
        sha256: ChunkId(hasher.finalize().into()),
    };
    let obj = walfmt::encode_with_frame(&header, &frame);
    Ok((obj, header, page))
}

/// Fills `buf` from `f` unless the file ends first; returns the bytes read.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match f.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// Fetches `fname` from the archive into `dest` (temp name, rename; see [`write_file`]).
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

/// Writes a WAL file to `dest` atomically for PostgreSQL's restore_command: temp name beside it,
/// then rename, so PostgreSQL never sees a partial file. Not fsynced: a restored file only has to
/// be readable by the recovery that asked for it; after a crash recovery restarts from its last
/// restartpoint and asks again (PostgreSQL removes its RECOVERYXLOG before each request), and a
/// segment PostgreSQL keeps in pg_wal is made durable by PostgreSQL itself (durable_rename). The
/// fsync of 16 MiB was on the critical path of every replayed segment.
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
    drop(f);
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}
