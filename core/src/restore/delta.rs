//! Delta restore (`restore --delta`): a backup restored over an existing data directory of the
//! same database system, writing only what differs.
//!
//! Invariants:
//! - Only a stopped server's directory of the backup's own system is touched: a
//!   `postmaster.pid` (of any kind) refuses the restore, and so does a `global/pg_control`
//!   whose system identifier is not the backup's. Nothing is written before both checks pass.
//! - An interrupted delta restore is visibly unstartable and can be run again: the marker
//!   [`MARKER`] (holding the system identifier) is made durable, then `global/pg_control` is
//!   removed; the marker stands in for pg_control's identity on a rerun, and it goes only after
//!   the new pg_control is written.
//! - The manifest is the whole truth: every entry it does not name is removed (stale WAL in
//!   `pg_wal` included: recovery must never read segments of another history), every entry
//!   of another kind than the manifest's is replaced, and symlinks are removed, never followed.
//! - A kept file is compared chunk by chunk against the manifest's chunk ids (the repository's
//!   own id function, keyed in an encrypted repository): only the chunks that differ are
//!   fetched, verified and written at their offsets; the file is cut to its backed-up size.
//! - Backups with tablespaces are refused: their directories live outside the data directory.

use super::safe_dir::{Kind, SafeDir};
use super::write::Placed;
use super::Dest;
use crate::manifest_file::LocalManifest;
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use tidemark_format::manifest::{FileEntry, HeadKind, ManifestIndex};
use tidemark_format::seal::ChunkIds;

/// What a delta restore did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DeltaReport {
    /// Files already there whose every chunk matched.
    pub files_kept: u64,
    /// Files already there that differed in some chunks (patched in place).
    pub files_patched: u64,
    /// Files the directory lacked (written whole).
    pub files_created: u64,
    /// Entries the backup does not hold, removed (a directory counts once).
    pub entries_removed: u64,
    /// File bytes written: the differing chunks and the created files.
    pub bytes_written: u64,
}

/// Left in the data directory while a delta restore runs; holds the system identifier.
pub const MARKER: &str = ".tidemark-delta-restore";
/// Largest read while comparing a file.
const COMPARE_READ: u64 = 1 << 20;

/// What a delta restore found and did before writing: the manifest's files and directories
/// that already exist with the right kind.
pub(super) struct Prepared {
    pub files: HashSet<String>,
    pub dirs: HashSet<String>,
    /// Entries removed (counting a removed directory once).
    pub removed: u64,
}

/// The system identifier in a pg_control file (its first 8 bytes, little-endian on every
/// platform PostgreSQL runs on here).
fn system_id_of(pg_control: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(pg_control.get(..8)?.try_into().ok()?))
}

/// Checks that `root` may be restored over by `m`, marks it, removes pg_control and every
/// entry the manifest does not name.
pub(super) fn begin(root: &SafeDir, m: &ManifestIndex) -> Result<Prepared> {
    let shown = root.path().display().to_string();
    let system = m.header.system_id.0;
    let top = root.list()?;
    if top.iter().any(|(n, _)| n == "postmaster.pid") {
        bail!("{shown} holds postmaster.pid: a PostgreSQL server is running on it, or was not shut down cleanly\nhint: stop the server (pg_ctl stop -m fast) before a delta restore; if it crashed and no postgres process uses the directory, remove postmaster.pid by hand");
    }
    if m.header.tablespace_map.is_some()
        || m.entries.iter().any(|e| e.path.starts_with("pg_tblspc/"))
    {
        bail!("backup {} holds tablespaces, which --delta does not restore in place\nhint: restore into an empty directory without --delta", m.header.backup_id);
    }
    match root.read_file(super::layout::PG_CONTROL, 1 << 16) {
        Ok(control) => {
            let found = system_id_of(&control);
            if found != Some(system) {
                bail!(
                    "{shown} belongs to database system {}, not to backup {}'s system {system}\nhint: a delta restore only goes over a data directory of the same cluster; restore into an empty directory instead",
                    found.map_or("?".to_string(), |s| s.to_string()),
                    m.header.backup_id
                );
            }
        }
        Err(e) => {
            let marked = root
                .read_file(MARKER, 64)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.trim().parse::<u64>().ok());
            match marked {
                Some(s) if s == system => {
                    tracing::info!(pgdata = %shown, "continuing an interrupted delta restore");
                }
                Some(s) => bail!("{shown} holds an interrupted delta restore of database system {s}, not of backup {}'s system {system}\nhint: finish it with a backup of system {s}, or restore into an empty directory", m.header.backup_id),
                None => bail!("{shown} is not empty and has no readable global/pg_control ({e:#})\nhint: --delta restores over a data directory of the same cluster; restore into an empty directory instead"),
            }
        }
    }
    root.remove_all(MARKER)?;
    super::recovery_conf::write_new(root, MARKER, system.to_string().as_bytes())?;
    root.sync()?;
    if root.remove_file(super::layout::PG_CONTROL)? {
        root.open_dir("global")?.sync()?;
    }
    let mut want: std::collections::HashMap<&str, bool> = m
        .entries
        .iter()
        .filter_map(|e| match e.kind {
            HeadKind::File(_) => Some((e.path.as_str(), false)),
            HeadKind::Dir => Some((e.path.as_str(), true)),
            HeadKind::Symlink(_) => None,
        })
        .collect();
    want.insert(MARKER, false);
    let mut p = Prepared {
        files: HashSet::new(),
        dirs: HashSet::new(),
        removed: 0,
    };
    sweep(root, "", &want, &mut p)?;
    p.files.remove(MARKER);
    Ok(p)
}

/// Walks `dir` (the directory `prefix` of the target), keeping what the manifest names with the
/// same kind and removing everything else.
fn sweep(
    dir: &SafeDir,
    prefix: &str,
    want: &std::collections::HashMap<&str, bool>,
    p: &mut Prepared,
) -> Result<()> {
    for (name, kind) in dir.list()? {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        match (want.get(path.as_str()), kind) {
            (Some(true), Kind::Dir) => {
                let sub = dir.open_dir(&name)?;
                sweep(&sub, &path, want, p)?;
                p.dirs.insert(path);
            }
            (Some(false), Kind::File) => {
                p.files.insert(path);
            }
            _ => {
                tracing::debug!(path = %path, "delta restore: removing what the backup does not hold");
                dir.remove_all(&name)?;
                p.removed += 1;
            }
        }
    }
    Ok(())
}

/// Removes the marker once pg_control is back.
pub(super) fn finish(root: &SafeDir) -> Result<()> {
    root.remove_file(MARKER)?;
    Ok(())
}

/// The chunks of `f` whose bytes in `file` differ from the manifest (short reads included),
/// each with its file offset, and the file's current length.
fn stale_chunks(
    file: &std::fs::File,
    f: &FileEntry,
    ids: &ChunkIds,
    path: &str,
) -> Result<(Vec<Placed>, u64)> {
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {path}"))?
        .len();
    let mut stale = Vec::new();
    let mut buf = Vec::new();
    let mut at = 0u64;
    let mut i = 0;
    while i < f.chunks.len() {
        // One read covers consecutive chunks up to COMPARE_READ bytes (at least one chunk).
        let mut j = i;
        let mut span = 0u64;
        while j < f.chunks.len() && (j == i || span + f.chunks[j].ulen as u64 <= COMPARE_READ) {
            span += f.chunks[j].ulen as u64;
            j += 1;
        }
        let have = span.min(len.saturating_sub(at)) as usize;
        buf.resize(have, 0);
        file.read_exact_at(&mut buf, at)
            .with_context(|| format!("cannot read {path}"))?;
        // The chunks read whole, hashed together; those past the end of the file are stale.
        let chunks = &f.chunks[i..j];
        let mut offs = Vec::with_capacity(chunks.len());
        let mut off = 0usize;
        for c in chunks {
            offs.push(off);
            off += c.ulen as usize;
        }
        let whole: Vec<&[u8]> = chunks
            .iter()
            .zip(&offs)
            .map_while(|(c, &o)| buf.get(o..o + c.ulen as usize))
            .collect();
        let got = ids.ids(&whole);
        for (k, (c, &o)) in chunks.iter().zip(&offs).enumerate() {
            if got.get(k) != Some(&c.id) {
                stale.push((*c, at + o as u64));
            }
        }
        at += span;
        i = j;
    }
    Ok((stale, len))
}

/// Brings the existing file of entry `i` to its backed-up content; returns the bytes written.
pub(super) async fn patch(
    store: &crate::store::Store,
    m: &std::sync::Arc<LocalManifest>,
    dest: &Dest,
    i: usize,
    syncs: &super::Syncs,
    slots: &super::write::Slots,
) -> Result<u64> {
    let e = &m.entries[i];
    if m.file_head(i).is_none() {
        return Ok(0);
    }
    let f = std::sync::Arc::new(m.file(i)?);
    let (dir, rel) = dest
        .place(&e.path)
        .with_context(|| format!("file {} has no place in the restore", e.path))?;
    let file = std::sync::Arc::new(dir.open_rw(rel)?);
    let (stale, len) = {
        let (file, f, ids, path) = (file.clone(), f.clone(), store.chunk_ids(), e.path.clone());
        tokio::task::spawn_blocking(move || stale_chunks(&file, &f, &ids, &path)).await??
    };
    if stale.is_empty() && len == f.size {
        return Ok(0);
    }
    let written: u64 = stale.iter().map(|(c, _)| c.ulen as u64).sum();
    if len > f.size {
        file.set_len(f.size)
            .with_context(|| format!("cannot truncate {}", e.path))?;
    }
    super::write_chunks(store, m, &e.path, &file, stale, slots).await?;
    if len < f.size {
        // Chunks past the old end were all stale and are written; this only covers a file
        // that ends in a hole.
        file.set_len(f.size)
            .with_context(|| format!("cannot extend {}", e.path))?;
    }
    syncs.start(file, &e.path).await?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tidemark_format::manifest::ChunkRef;
    use tidemark_format::ChunkId;

    fn entry(data: &[u8], chunk: usize) -> FileEntry {
        FileEntry {
            size: data.len() as u64,
            sha256: ChunkId::of(data),
            chunks: data
                .chunks(chunk)
                .enumerate()
                .map(|(n, c)| ChunkRef {
                    id: ChunkId::of(c),
                    pack: 0,
                    offset: n as u64,
                    clen: c.len() as u32,
                    ulen: c.len() as u32,
                    skip: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn finds_exactly_the_chunks_that_differ() {
        let want: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let f = entry(&want, 8192);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let offsets =
            |s: &[super::super::write::Placed]| s.iter().map(|(_, o)| *o).collect::<Vec<_>>();
        // Identical: nothing stale.
        std::fs::write(&path, &want).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (s, len) = stale_chunks(&file, &f, &ChunkIds::Sha256, "f").unwrap();
        assert!(s.is_empty());
        assert_eq!(len, want.len() as u64);
        // One byte changed in the third chunk, and the file cut short inside the last but one.
        let mut have = want.clone();
        have[2 * 8192 + 5] ^= 1;
        have.truncate(11 * 8192 + 100);
        std::fs::write(&path, &have).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (s, _) = stale_chunks(&file, &f, &ChunkIds::Sha256, "f").unwrap();
        assert_eq!(offsets(&s), vec![2 * 8192, 11 * 8192, 12 * 8192]);
        // Longer than the backup: the extra bytes are cut, no chunk is stale.
        let mut have = want.clone();
        have.extend_from_slice(b"tail");
        std::fs::write(&path, &have).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (s, len) = stale_chunks(&file, &f, &ChunkIds::Sha256, "f").unwrap();
        assert!(s.is_empty());
        assert_eq!(len, want.len() as u64 + 4);
    }

    #[test]
    fn system_id_is_the_first_eight_bytes() {
        let mut c = 7_300_000_000_000_000_001u64.to_le_bytes().to_vec();
        c.extend_from_slice(&[0; 100]);
        assert_eq!(system_id_of(&c), Some(7_300_000_000_000_000_001));
        assert_eq!(system_id_of(&c[..7]), None);
    }
}
