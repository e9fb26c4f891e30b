//! Over 500 lines because its unit tests (the push contract case by case) live beside the code.
//!
//! Archiving and fetching WAL files: the archive_command and restore_command contracts.
//!
//! Invariants:
//! - `push` returns `Ok` only once the object is durably stored; an existing object is read back
//!   whole: the same content is success, other content is [`WalError::Conflict`] and stays
//!   untouched, a cut copy of this very file is replaced (FORMAT.md W4).
//! - A segment is stored only if its page header's system identifier matches the repository's.
//! - `fetch` distinguishes "not in the archive" from every other failure: only the first may end
//!   recovery.

mod encode;

pub(crate) use encode::digest_file;
pub use encode::EncodeBuffers;
#[cfg(test)]
use encode::WholeFile;
use encode::{encode_file, WHOLE_MAX};

use crate::repo;
use crate::store::{Store, StoreError};
use anyhow::{Context, Result};
use bytes::Bytes;
use std::io::Write;
use std::path::{Path, PathBuf};
use tidemark_format::wal::{self as walfmt, WalDigest, WalFileName};
use tidemark_format::{keys, FormatError};

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal file {name} already archived with different content (stored {stored}, offered {offered})\nhint: two clusters may be archiving into one repository, or the file is corrupt; the stored copy was left untouched")]
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
pub const MAX_OBJECT: u64 = walfmt::MAX_WAL_FILE + (1 << 20);

/// How `wal-push` tells which database system a file belongs to and whether a new one may join.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Buffers kept from one file to the next (the sidecar shares one set among its uploads).
    pub buffers: EncodeBuffers,
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

/// Archives one WAL file; also returns the digest of its content (what the stored object holds).
pub async fn push_file(
    store: &Store,
    path: &Path,
    level: i32,
    opts: &PushOptions,
) -> Result<(PushOutcome, WalDigest)> {
    let fname = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", path.display()))?;
    let name = WalFileName::parse(fname).context("archive_command was given a file that is not WAL\nhint: archive_command must be 'tidemark-agent wal-push %p'")?;
    let p = path.to_path_buf();
    let buffers = opts.buffers.clone();
    let (obj, header, page) = tokio::task::spawn_blocking(move || {
        let mut b = buffers.take();
        let r = encode_file(&p, name, level, WHOLE_MAX, &mut b);
        buffers.give_back(b);
        r
    })
    .await??;
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
    let digest = header.digest;
    let size = obj.len() as u64;
    let obj = Bytes::from(obj);
    match store.put_create(&key, obj.clone()).await {
        Ok(()) => Ok((PushOutcome::Stored(size), digest)),
        Err(StoreError::AlreadyExists { .. }) => {
            // The stored copy is read back whole and verified, never trusted for existing: an
            // upload the store answered with success may have been stored short.
            let existing = store
                .get(&key, MAX_OBJECT)
                .await
                .with_context(|| format!("cannot read the stored copy of {name}"))?;
            let again = path.to_path_buf();
            let (head, full, offered) = tokio::task::spawn_blocking(move || {
                let head = walfmt::decode_header(&existing).map(|(h, _)| h.digest);
                // A copy of an earlier format names its content by another function: the
                // offered file is read again and hashed by that one.
                let offered = match &head {
                    Ok(d) if d.major() != digest.major() => Some(encode::digest_file(&again, d)),
                    _ => None,
                };
                (
                    head,
                    walfmt::decode(&existing).map(|(h, _)| h.digest),
                    offered,
                )
            })
            .await?;
            let offered = match offered {
                None => digest,
                Some(d) => d.with_context(|| {
                    format!(
                        "cannot read {} again to compare it with the stored copy of {name}",
                        path.display()
                    )
                })?,
            };
            match (head, full) {
                (_, Ok(s)) if s == offered => Ok(PushOutcome::AlreadyArchived),
                (_, Ok(s)) => Err(conflict(&name, s, offered)),
                // Damaged, and it claims this very content (its header names our digest), or
                // it is too short to claim anything: the copy given now is stored in its place.
                (Ok(s), Err(e)) if s == offered => {
                    replace_damaged(store, &key, &name, obj, &e).await
                }
                (Err(FormatError::Truncated { .. }), Err(e)) => {
                    replace_damaged(store, &key, &name, obj, &e).await
                }
                (Ok(s), Err(_)) => Err(conflict(&name, s, offered)),
                (Err(e), _) => Err(anyhow::Error::new(e)
                    .context(format!("the stored copy of {name} is unreadable"))),
            }
            .map(|o| (o, digest))
        }
        Err(e) => Err(e).with_context(|| format!("cannot store wal file {name}")),
    }
}

fn conflict(name: &WalFileName, stored: WalDigest, offered: WalDigest) -> anyhow::Error {
    WalError::Conflict {
        name: name.to_string(),
        stored: stored.to_string(),
        offered: offered.to_string(),
    }
    .into()
}

/// Replaces a stored copy of `name` that fails verification (`why`) but holds no other content
/// than `obj`'s (its header names the same digest, or it is too short to have a header): such a
/// copy can serve no recovery, and `obj` is the file PostgreSQL gave now.
async fn replace_damaged(
    store: &Store,
    key: &str,
    name: &WalFileName,
    obj: Bytes,
    why: &FormatError,
) -> Result<PushOutcome> {
    tracing::warn!(wal = %name, error = %why, hint = "the store lost or cut an earlier upload of this file, or it was altered; it is stored again whole; run 'tidemark-restore check --read-data' to find other damage", "the stored copy of wal file {name} is damaged; replacing it");
    let size = obj.len() as u64;
    store
        .put_replace(key, obj)
        .await
        .with_context(|| format!("cannot replace the damaged stored copy of {name}"))?;
    Ok(PushOutcome::Stored(size))
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
    crate::testhooks::get_delay().await;
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

/// Verifies a stored WAL object (name, size, digest) and writes its file to `dest` atomically.
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

/// Reads the stored object of `name` whole and checks that it decodes to its recorded size and
/// digest under its own name: existence alone is never taken for a stored file (a cut upload
/// keeps its name).
pub async fn verify_stored(store: &Store, name: &WalFileName) -> Result<()> {
    let obj = get_object(store, name).await?;
    let n = *name;
    tokio::task::spawn_blocking(move || {
        let (h, _) = walfmt::decode(&obj)?;
        anyhow::ensure!(h.name == n, "the object holds {}", h.name);
        Ok(())
    })
    .await
    .context("the WAL check task failed")?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_format::SystemId;

    /// A data directory with `global/pg_control` (system id first) and `PG_VERSION`, and one
    /// 1 MiB segment of that system in `pg_wal/` whose first page carries `magic`.
    fn cluster(root: &Path, name: &str, sysid: u64, major: u32, magic: u16) -> (PathBuf, PathBuf) {
        let data = root.join(name);
        std::fs::create_dir_all(data.join("global")).unwrap();
        std::fs::create_dir_all(data.join("pg_wal")).unwrap();
        let mut control = vec![0u8; 8192];
        control[..8].copy_from_slice(&sysid.to_le_bytes());
        std::fs::write(data.join("global/pg_control"), control).unwrap();
        std::fs::write(data.join("PG_VERSION"), format!("{major}\n")).unwrap();
        let size = 1u32 << 20;
        let mut d = vec![7u8; size as usize];
        d[0..2].copy_from_slice(&magic.to_le_bytes());
        d[2..4].copy_from_slice(&2u16.to_le_bytes());
        d[4..8].copy_from_slice(&1u32.to_le_bytes());
        d[8..24].fill(0);
        d[24..32].copy_from_slice(&sysid.to_le_bytes());
        d[32..36].copy_from_slice(&size.to_le_bytes());
        d[36..40].copy_from_slice(&8192u32.to_le_bytes());
        let seg = data.join("pg_wal/000000010000000000000001");
        std::fs::write(&seg, d).unwrap();
        (data, seg)
    }

    /// A segment read whole and one streamed in READ_BLOCK pieces give objects that decode to
    /// the same bytes under the same header and page header, for a segment and a history file.
    #[test]
    fn whole_and_streamed_segments_encode_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        let (_, seg) = cluster(dir.path(), "a", 7003, 16, 0xD113);
        // Vary the content past the page header so the frames hold real matches and literals.
        let mut d = std::fs::read(&seg).unwrap();
        for (i, b) in d.iter_mut().enumerate().skip(8192) {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] & 0x0f;
        }
        std::fs::write(&seg, &d).unwrap();
        let name = WalFileName::parse("000000010000000000000001").unwrap();
        // One set of buffers for every call: a short file after a long one reads only its bytes.
        let mut bufs = WholeFile::default();
        let (whole, hw, pw) = encode_file(&seg, name, 1, WHOLE_MAX, &mut bufs).unwrap();
        let (streamed, hs, ps) = encode_file(&seg, name, 1, 0, &mut bufs).unwrap();
        assert_eq!(hw.digest, WalDigest::of(&d));
        assert_eq!((hw.size, hs.size), (d.len() as u64, d.len() as u64));
        assert_eq!(hw.digest, hs.digest);
        assert_eq!(pw.map(|p| p.system_id), ps.map(|p| p.system_id));
        assert_eq!(walfmt::decode(&whole).unwrap(), (hw, d.clone()));
        assert_eq!(walfmt::decode(&streamed).unwrap(), (hs, d.clone()));
        // A history file (no page header) of a few bytes, both ways.
        let hist = dir.path().join("00000002.history");
        std::fs::write(&hist, b"1\t0/3000000\tno recovery target specified\n").unwrap();
        let hname = WalFileName::parse("00000002.history").unwrap();
        for whole_max in [WHOLE_MAX, 0] {
            let (obj, h, p) = encode_file(&hist, hname, 1, whole_max, &mut bufs).unwrap();
            assert!(p.is_none());
            assert_eq!(
                walfmt::decode(&obj).unwrap().1,
                std::fs::read(&hist).unwrap()
            );
            assert_eq!(h.size, std::fs::metadata(&hist).unwrap().len());
        }
    }

    fn store(dir: &Path) -> Store {
        Store::open(&format!("file://{}/repo", dir.display())).unwrap()
    }

    #[tokio::test]
    async fn a_new_repository_can_start_with_a_history_file() {
        let dir = tempfile::tempdir().unwrap();
        let (data, seg) = cluster(dir.path(), "a", 7001, 16, 0xD113);
        let hist = data.join("pg_wal/00000002.history");
        std::fs::write(&hist, "1\t0/3000000\tno recovery target specified\n").unwrap();
        let s = store(dir.path());
        let opts = PushOptions::default();
        // The data directory comes from the file's pg_wal/ parent: no --pgdata needed.
        let out = push(&s, &hist, 1, &opts).await.unwrap();
        assert!(matches!(out, PushOutcome::Stored(_)), "{out:?}");
        let cfg = repo::require_config(&s).await.unwrap();
        assert_eq!(cfg.system_id, SystemId(7001));
        let sys = repo::systems(&s).await.unwrap();
        assert_eq!(sys.len(), 1);
        assert_eq!(
            sys[0].pg_major,
            Some(16),
            "the cluster record says PostgreSQL 16"
        );
        assert_eq!(
            push(&s, &seg, 1, &opts).await.unwrap(),
            PushOutcome::Stored(
                s.head("wal/00000001/000000010000000000000001")
                    .await
                    .unwrap()
                    .unwrap()
            )
        );
        // Without any data directory, a history file cannot found a repository.
        let loose = dir.path().join("loose");
        std::fs::create_dir_all(&loose).unwrap();
        std::fs::write(loose.join("00000003.history"), "x\n").unwrap();
        let other = Store::open(&format!("file://{}/repo2", dir.path().display())).unwrap();
        let e = format!(
            "{:#}",
            push(&other, &loose.join("00000003.history"), 1, &opts)
                .await
                .unwrap_err()
        );
        assert!(
            e.contains("no data directory") && e.contains("--pgdata"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_stored_copy_is_verified_whole_never_trusted_for_existing() {
        let dir = tempfile::tempdir().unwrap();
        let (_, seg) = cluster(dir.path(), "a", 7003, 15, 0xD110);
        let s = store(dir.path());
        let opts = PushOptions::default();
        let key = "wal/00000001/000000010000000000000001";
        let wal_name = WalFileName::parse("000000010000000000000001").unwrap();
        push(&s, &seg, 1, &opts).await.unwrap();
        let whole = s.get(key, MAX_OBJECT).await.unwrap();
        assert_eq!(
            push(&s, &seg, 1, &opts).await.unwrap(),
            PushOutcome::AlreadyArchived
        );
        let (_, h_end) = walfmt::decode_header(&whole).unwrap();
        verify_stored(&s, &wal_name).await.unwrap();
        // Cut copies of this very file (header intact, or too short for one): found by
        // verify_stored (a backup's WAL wait), replaced whole by the next push.
        for keep in [whole.len() - 10, h_end + 5, 10, 0] {
            s.put_replace(key, whole.slice(..keep)).await.unwrap();
            assert!(verify_stored(&s, &wal_name).await.is_err(), "{keep}");
            let out = push(&s, &seg, 1, &opts).await.unwrap();
            assert!(matches!(out, PushOutcome::Stored(_)), "{keep}: {out:?}");
            assert_eq!(s.get(key, MAX_OBJECT).await.unwrap(), whole, "{keep}");
        }
        // A whole copy of other content is a conflict, and stays.
        let mut other = std::fs::read(&seg).unwrap();
        other[100] ^= 1;
        let other_path = dir.path().join("other/000000010000000000000001");
        std::fs::create_dir_all(other_path.parent().unwrap()).unwrap();
        std::fs::write(&other_path, &other).unwrap();
        let e = push(&s, &other_path, 1, &opts).await.unwrap_err();
        assert!(e.downcast_ref::<WalError>().is_some(), "{e:#}");
        assert_eq!(s.get(key, MAX_OBJECT).await.unwrap(), whole);
        // A cut copy of other content is refused too: which file is right cannot be told.
        s.put_replace(key, whole.slice(..h_end + 1)).await.unwrap();
        assert!(push(&s, &other_path, 1, &opts).await.is_err());
        assert_eq!(s.get(key, MAX_OBJECT).await.unwrap().len(), h_end + 1);
    }

    #[tokio::test]
    async fn a_copy_stored_by_an_earlier_format_is_compared_by_its_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (_, seg) = cluster(dir.path(), "a", 7004, 15, 0xD110);
        let s = store(dir.path());
        let opts = PushOptions::default();
        let key = "wal/00000001/000000010000000000000001";
        let data = std::fs::read(&seg).unwrap();
        // What format 1.5 wrote: major 1, the SHA-256 of the file.
        let old = |data: &[u8]| {
            Bytes::from(walfmt::encode_with_frame(
                &walfmt::WalObjectHeader {
                    name: WalFileName::parse("000000010000000000000001").unwrap(),
                    size: data.len() as u64,
                    digest: WalDigest::Sha256(tidemark_format::ChunkId::of(data)),
                },
                &tidemark_format::chunk::compress(data, 1),
            ))
        };
        push(&s, &seg, 1, &opts).await.unwrap();
        let stored = old(&data);
        s.put_replace(key, stored.clone()).await.unwrap();
        // The same content: archived already, and the copy stays as it is.
        let (out, digest) = push_file(&s, &seg, 1, &opts).await.unwrap();
        assert_eq!(out, PushOutcome::AlreadyArchived);
        assert_eq!(
            digest,
            WalDigest::of(&data),
            "the sidecar records the offered digest"
        );
        assert_eq!(s.get(key, MAX_OBJECT).await.unwrap(), stored);
        // A cut copy that claims this content: replaced by a copy of the current format.
        s.put_replace(key, stored.slice(..stored.len() - 10))
            .await
            .unwrap();
        let out = push(&s, &seg, 1, &opts).await.unwrap();
        assert!(matches!(out, PushOutcome::Stored(_)), "{out:?}");
        let (h, back) = walfmt::decode(&s.get(key, MAX_OBJECT).await.unwrap()).unwrap();
        assert_eq!((h.digest, back), (WalDigest::of(&data), data.clone()));
        // Other content under the name, whole or cut: a conflict naming SHA-256s, left untouched.
        let mut other = data.clone();
        other[100] ^= 1;
        for stored in [old(&other), old(&other).slice(..90)] {
            s.put_replace(key, stored.clone()).await.unwrap();
            let e = format!("{:#}", push(&s, &seg, 1, &opts).await.unwrap_err());
            assert!(
                e.contains("different content") && e.contains("sha256:"),
                "{e}"
            );
            assert_eq!(s.get(key, MAX_OBJECT).await.unwrap(), stored);
        }
    }

    #[tokio::test]
    async fn an_unknown_major_is_archived_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        // 0xD1F0: a page magic no PostgreSQL release tidemark knows has used.
        let (_, seg) = cluster(dir.path(), "future", 7002, 21, 0xD1F0);
        let s = store(dir.path());
        let out = push(&s, &seg, 1, &PushOptions::default()).await.unwrap();
        assert!(matches!(out, PushOutcome::Stored(_)), "{out:?}");
        let sys = repo::systems(&s).await.unwrap();
        assert_eq!(sys[0].pg_major, Some(21), "the major comes from PG_VERSION");
        // A file that is not WAL at all is still refused.
        let junk = dir.path().join("future/pg_wal/000000010000000000000002");
        std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
        assert!(push(&s, &junk, 1, &PushOptions::default()).await.is_err());
    }

    #[tokio::test]
    async fn a_major_upgrade_gets_its_own_system_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let none = PushOptions::default();
        let (_, old) = cluster(dir.path(), "old", 1500, 15, 0xD110);
        push(&s, &old, 1, &none).await.unwrap();
        // The upgraded cluster: new system id, newer major, same segment name.
        let (new_data, new) = cluster(dir.path(), "new", 1800, 18, 0xD118);
        assert!(matches!(
            push(&s, &new, 1, &none).await.unwrap(),
            PushOutcome::Stored(_)
        ));
        let hist = new_data.join("pg_wal/00000002.history");
        std::fs::write(&hist, "1\t0/3000000\tx\n").unwrap();
        push(&s, &hist, 1, &none).await.unwrap();
        let sys = repo::systems(&s).await.unwrap();
        let ids: Vec<(u64, Option<u32>, bool)> = sys
            .iter()
            .map(|x| (x.system_id.0, x.pg_major, x.top_level))
            .collect();
        assert_eq!(ids, [(1500, Some(15), true), (1800, Some(18), false)]);
        // Both copies of 000000010000000000000001 exist, each in its own system.
        assert!(s
            .head("wal/00000001/000000010000000000000001")
            .await
            .unwrap()
            .is_some());
        let nested = &sys[1].store;
        assert!(nested
            .head("wal/00000001/000000010000000000000001")
            .await
            .unwrap()
            .is_some());
        assert!(nested
            .head("wal/00000002/00000002.history")
            .await
            .unwrap()
            .is_some());
        assert_eq!(
            repo::select_system(&s, None).await.unwrap().system_id,
            SystemId(1800),
            "readers default to the newest system"
        );
        // A third cluster of an older or equal major is a misconfiguration unless accepted.
        let (_, stray) = cluster(dir.path(), "stray", 1700, 17, 0xD116);
        let e = format!("{:#}", push(&s, &stray, 1, &none).await.unwrap_err());
        assert!(
            e.contains("--accept-new-system") && e.contains("1700"),
            "{e}"
        );
        assert!(
            s.head("clusters/1700").await.unwrap().is_none(),
            "a refused system left a record"
        );
        let accept = PushOptions {
            accept_new_system: true,
            ..PushOptions::default()
        };
        push(&s, &stray, 1, &accept).await.unwrap();
        assert_eq!(repo::systems(&s).await.unwrap().len(), 3);
        // Once registered, the system archives without the flag.
        let seg2 = dir.path().join("stray/pg_wal/000000010000000000000001");
        assert_eq!(
            push(&s, &seg2, 1, &none).await.unwrap(),
            PushOutcome::AlreadyArchived
        );
    }
}
