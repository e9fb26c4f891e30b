//! The spool directory: its stamp (which repository and boot it belongs to), the request record
//! the filler follows (`.asked`), and clearing it.

use super::{fill, filler_running, wait_filler_gone, Stamp, ASKED, END, LOCK, STAMP};
use crate::repo;
use crate::store::Store;
use anyhow::{Context, Result};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;
use tidemark_format::wal::WalFileName;

/// Opens (or re-binds) the spool to this repository and this boot.
pub(super) async fn open_spool(store: &Store, spool: &Path) -> Result<Stamp> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(spool)
        .with_context(|| format!("cannot create the prefetch spool {}", spool.display()))?;
    let boot = boot_id();
    if let Some(s) = read_stamp(spool).filter(|s| s.repo == store.url() && s.boot_id == boot) {
        return Ok(s);
    }
    let _ = std::fs::remove_file(spool.join(STAMP));
    wait_filler_gone(spool, Duration::from_secs(5)).await;
    wipe(spool);
    let cfg = repo::require_config(store).await?;
    let s = Stamp {
        repo: store.url().to_string(),
        system_id: cfg.system_id.0,
        boot_id: boot,
        generation: crate::verify::random_u64(),
    };
    let tmp = spool.join(format!("{STAMP}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&s)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, spool.join(STAMP))
        .with_context(|| format!("cannot write the spool stamp in {}", spool.display()))?;
    Ok(s)
}

pub(super) fn read_stamp(spool: &Path) -> Option<Stamp> {
    std::fs::read(spool.join(STAMP))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The kernel's id of this boot (empty where there is none: files are then never trusted across
/// a restart of the filler's machine, see [`fill`]).
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Records the segment asked for, with a fresh nonce (the filler follows it), and whether the
/// request found it missing from the spool (the filler then fetches it whatever it did before:
/// it may not have seen every request in between).
pub(super) fn write_asked(spool: &Path, name: WalFileName, missing: bool) -> Result<()> {
    let tmp = spool.join(format!("{ASKED}.tmp"));
    let mark = if missing { " missing" } else { "" };
    std::fs::write(
        &tmp,
        format!("{name} {}{mark}", crate::verify::random_u64()),
    )
    .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, spool.join(ASKED))
        .with_context(|| format!("cannot write {}", spool.join(ASKED).display()))
}

/// A request as [`write_asked`] recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Asked {
    pub(super) name: WalFileName,
    pub(super) nonce: String,
    pub(super) missing: bool,
}

pub(super) fn read_asked(spool: &Path) -> Option<Asked> {
    let s = std::fs::read_to_string(spool.join(ASKED)).ok()?;
    let mut words = s.split(' ');
    let name = match WalFileName::parse(words.next()?) {
        Ok(w @ WalFileName::Segment { .. }) => w,
        _ => return None,
    };
    let nonce = words.next()?.to_string();
    let missing = words.next() == Some("missing");
    Some(Asked {
        name,
        nonce,
        missing,
    })
}

/// Deletes everything in the spool; the filler's lock only when no filler holds it (a new lock
/// file beside a held one would let two fillers run).
pub(super) fn wipe(spool: &Path) {
    if let Ok(rd) = std::fs::read_dir(spool) {
        for e in rd.flatten() {
            if e.file_name() != LOCK {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if !filler_running(spool) {
        let _ = std::fs::remove_file(spool.join(LOCK));
    }
}

/// [`wipe`] by the filler holding the lock, then the lock file and the directory.
pub(super) fn wipe_held(spool: &Path) {
    let _ = std::fs::remove_file(spool.join(STAMP));
    wipe(spool);
    let _ = std::fs::remove_file(spool.join(LOCK));
    let _ = std::fs::remove_dir(spool);
}

/// Deletes foreign files and segments before `asked` (by (log, seg), the same order whatever the
/// segment size). The filler's temporary files are its own to delete.
pub(super) fn tidy(spool: &Path, asked: WalFileName) -> Result<()> {
    for e in std::fs::read_dir(spool)
        .with_context(|| format!("cannot list {}", spool.display()))?
        .flatten()
    {
        let fname = e.file_name();
        let f = fname.to_string_lossy();
        if [STAMP, ASKED, LOCK, END].contains(&f.as_ref()) || fill::is_temporary(&f) {
            continue;
        }
        let keep = match WalFileName::parse(&f) {
            Ok(WalFileName::Segment { log, seg, .. }) => match asked {
                WalFileName::Segment {
                    log: alog,
                    seg: aseg,
                    ..
                } => (log, seg) >= (alog, aseg),
                _ => true,
            },
            _ => false,
        };
        if !(keep && e.file_type().map(|t| t.is_file()).unwrap_or(false)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// The spooled segments (files with a segment's name).
pub(super) fn segments_in(spool: &Path) -> usize {
    std::fs::read_dir(spool)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    matches!(
                        WalFileName::parse(&e.file_name().to_string_lossy()),
                        Ok(WalFileName::Segment { .. })
                    )
                })
                .count()
        })
        .unwrap_or(0)
}

pub(super) fn spool_bytes(spool: &Path) -> u64 {
    std::fs::read_dir(spool)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
