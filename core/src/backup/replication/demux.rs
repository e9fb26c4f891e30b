//! The demux stage of a replication backup and its workers: tar archives in (as CopyData
//! payloads from the network task), chunk-aligned blocks of files out to the workers, which
//! hash, deduplicate, compress and pack them.
//!
//! Invariants:
//! - Memory is bounded: one block (128 chunks) per file being cut, a bounded queue of blocks
//!   (two per worker), backup_label / tablespace_map of at most 1 MiB each, and the server's
//!   manifest of at most [`MAX_SERVER_MANIFEST`] bytes.
//! - Every file's whole-file SHA-256 is computed over exactly the bytes the workers chunk.
//! - The entries come out sorted by path, unique, valid, and with every parent directory.

use super::server_manifest::SERVER_MANIFEST;
use super::tar::{TarEntry, TarEvent, TarKind, TarReader};
use crate::backup::chunk_log::Logged;
use crate::backup::pipeline::{ItemKind, Packer, Shared};
use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::sync::{mpsc as smpsc, Mutex};
use tidemark_format::manifest;
use tokio::sync::mpsc;

/// Largest server backup manifest accepted (about 300 bytes per file: a million files).
const MAX_SERVER_MANIFEST: usize = 512 << 20;
/// Largest backup_label / tablespace_map (FORMAT.md section 13).
const MAX_LABEL: u64 = manifest::MAX_LABEL as u64;
/// What the network task hands the demux thread.
pub(super) enum Piece {
    /// A new tar archive: `None` for the data directory, `Some(oid)` for a tablespace.
    Archive(Option<String>),
    Data(Bytes),
    /// The server's backup manifest follows.
    Manifest,
    /// The stream ended cleanly.
    End,
}

/// A chunk-aligned block of one file for the workers.
pub(super) struct Job {
    fid: usize,
    first_chunk: usize,
    data: Vec<u8>,
    parent: Option<usize>,
}

/// (file, first chunk, where its chunk locations are logged, bytes) of one block.
pub(super) type Part = (usize, usize, Logged, u64);

#[derive(Default)]
pub(super) struct Demuxed {
    pub(super) items: Vec<(String, u32, ItemKind)>,
    /// fid → (path, size, sha256)
    pub(super) files: Vec<(String, u64, [u8; 32])>,
    pub(super) backup_label: Option<Vec<u8>>,
    pub(super) tablespace_map: Option<Vec<u8>>,
    pub(super) server_manifest: Vec<u8>,
    /// Files left out (path, size, sha256).
    pub(super) skipped: Vec<(String, u64, [u8; 32])>,
}

/// The file being cut into blocks.
struct Current {
    fid: usize,
    path: String,
    sha: Sha256,
    buf: Vec<u8>,
    next_chunk: usize,
    size: u64,
    parent: Option<usize>,
}

enum Sink {
    None,
    File(Box<Current>),
    /// backup_label or tablespace_map, kept in memory.
    Capture {
        label: bool,
        buf: Vec<u8>,
    },
    /// A file left out of the backup; only hashed for the server-manifest check.
    Skip {
        path: String,
        sha: Sha256,
        size: u64,
    },
}

/// Top-level files of the data directory the server sends but a restore must not get (they
/// would make the restored server a standby, or confuse recovery), as with `--source pgdata`.
const SKIPPED: &[&str] = &[
    "standby.signal",
    "recovery.signal",
    "backup_label.old",
    "tablespace_map.old",
    crate::restore::promote::MARKER,
];

struct DemuxState<'a> {
    s: &'a Shared,
    jobs: smpsc::SyncSender<Job>,
    prefix: String,
    base: bool,
    block: usize,
    out: Demuxed,
    sink: Sink,
}

impl DemuxState<'_> {
    fn send_block(&mut self, c: &mut Current) -> Result<()> {
        if c.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut c.buf, Vec::with_capacity(self.block));
        let n = data.len().div_ceil(self.s.chunk_size());
        let job = Job {
            fid: c.fid,
            first_chunk: c.next_chunk,
            data,
            parent: c.parent,
        };
        c.next_chunk += n;
        self.jobs
            .send(job)
            .map_err(|_| anyhow!("the backup workers stopped; see the error above"))
    }

    fn on_event(&mut self, ev: TarEvent<'_>) -> Result<()> {
        match ev {
            TarEvent::Entry(e) => {
                let path = format!("{}{}", self.prefix, e.path);
                match e.kind {
                    TarKind::Dir => self.out.items.push((path, e.mode, ItemKind::Dir)),
                    TarKind::Symlink(t) => {
                        self.out
                            .items
                            .push((path, e.mode, ItemKind::Symlink(t.into_bytes())))
                    }
                    TarKind::File { size } => {
                        if self.base && (e.path == "backup_label" || e.path == "tablespace_map") {
                            if size > MAX_LABEL {
                                bail!("{} in the backup stream is {size} bytes, more than {MAX_LABEL}", e.path);
                            }
                            self.sink = Sink::Capture {
                                label: e.path == "backup_label",
                                buf: Vec::with_capacity(size as usize),
                            };
                            return Ok(());
                        }
                        if self.base && SKIPPED.contains(&e.path.as_str()) {
                            self.sink = Sink::Skip {
                                path,
                                sha: Sha256::new(),
                                size: 0,
                            };
                            return Ok(());
                        }
                        let fid = self.out.files.len();
                        self.out.files.push((path.clone(), 0, [0; 32]));
                        self.out
                            .items
                            .push((path.clone(), e.mode, ItemKind::File(fid)));
                        let parent = self.s.parent_entry(&path);
                        self.sink = Sink::File(Box::new(Current {
                            fid,
                            path,
                            sha: Sha256::new(),
                            buf: Vec::with_capacity(self.block.min(size as usize)),
                            next_chunk: 0,
                            size: 0,
                            parent,
                        }));
                    }
                }
            }
            TarEvent::Data(mut d) => match &mut self.sink {
                Sink::None => bail!("tar data outside a file"),
                Sink::Capture { buf, .. } => buf.extend_from_slice(d),
                Sink::Skip { sha, size, .. } => {
                    sha.update(d);
                    *size += d.len() as u64;
                }
                Sink::File(_) => {
                    let Sink::File(mut c) = std::mem::replace(&mut self.sink, Sink::None) else {
                        unreachable!("matched above")
                    };
                    c.sha.update(d);
                    c.size += d.len() as u64;
                    while !d.is_empty() {
                        let take = (self.block - c.buf.len()).min(d.len());
                        c.buf.extend_from_slice(&d[..take]);
                        d = &d[take..];
                        if c.buf.len() == self.block {
                            self.send_block(&mut c)?;
                        }
                    }
                    self.sink = Sink::File(c);
                }
            },
            TarEvent::EntryEnd => match std::mem::replace(&mut self.sink, Sink::None) {
                Sink::None => {}
                Sink::Skip { path, sha, size } => {
                    tracing::info!(file = %path, "left out of the backup");
                    self.out.skipped.push((path, size, sha.finalize().into()));
                }
                Sink::Capture { label, buf } => {
                    if label {
                        self.out.backup_label = Some(buf);
                    } else {
                        self.out.tablespace_map = Some(buf);
                    }
                }
                Sink::File(mut c) => {
                    self.send_block(&mut c)?;
                    let sha: [u8; 32] = c.sha.finalize().into();
                    tracing::debug!(file = %c.path, size = c.size, "file streamed");
                    self.out.files[c.fid] = (c.path, c.size, sha);
                }
            },
        }
        Ok(())
    }
}

/// The demux thread: tar archives in, blocks of files out to the workers.
pub(super) fn demux(
    mut rx: mpsc::Receiver<Piece>,
    jobs: smpsc::SyncSender<Job>,
    s: &Shared,
) -> Result<Demuxed> {
    let block = s.chunk_size() * crate::backup::pipeline::CHUNKS_PER_BLOCK;
    let mut st = DemuxState {
        s,
        jobs,
        prefix: String::new(),
        base: true,
        block,
        out: Demuxed::default(),
        sink: Sink::None,
    };
    let mut tar: Option<TarReader> = None;
    let mut in_manifest = false;
    let mut tablespaces = Vec::new();
    loop {
        let Some(piece) = rx.blocking_recv() else {
            bail!("the BASE_BACKUP stream ended early");
        };
        match piece {
            Piece::Archive(oid) => {
                if let Some(t) = tar.take() {
                    t.finish()?;
                }
                if in_manifest {
                    bail!("BASE_BACKUP sent an archive after the manifest");
                }
                match oid {
                    None => {
                        st.prefix = String::new();
                        st.base = true;
                    }
                    Some(oid) => {
                        st.prefix = format!("pg_tblspc/{oid}/");
                        st.base = false;
                        tablespaces.push(oid);
                    }
                }
                tar = Some(TarReader::new());
            }
            Piece::Data(d) => {
                if in_manifest {
                    if st.out.server_manifest.len() + d.len() > MAX_SERVER_MANIFEST {
                        bail!("the server's backup manifest is larger than {MAX_SERVER_MANIFEST} bytes");
                    }
                    st.out.server_manifest.extend_from_slice(&d);
                } else {
                    let t = tar
                        .as_mut()
                        .ok_or_else(|| anyhow!("BASE_BACKUP sent data before an archive"))?;
                    t.feed(&d, &mut |ev| st.on_event(ev))?;
                }
            }
            Piece::Manifest => {
                if let Some(t) = tar.take() {
                    t.finish()?;
                }
                in_manifest = true;
            }
            Piece::End => break,
        }
    }
    if let Some(t) = tar.take() {
        t.finish()?;
    }
    if !in_manifest || st.out.server_manifest.is_empty() {
        bail!("BASE_BACKUP sent no backup manifest");
    }
    // The server's manifest is stored as a file too, like pg_basebackup's plain format.
    let m = std::mem::take(&mut st.out.server_manifest);
    st.on_event(TarEvent::Entry(TarEntry {
        path: SERVER_MANIFEST.into(),
        mode: 0o600,
        kind: TarKind::File {
            size: m.len() as u64,
        },
    }))?;
    st.prefix.clear();
    st.on_event(TarEvent::Data(&m))?;
    st.on_event(TarEvent::EntryEnd)?;
    st.out.server_manifest = m;
    for oid in tablespaces {
        st.out
            .items
            .push((format!("pg_tblspc/{oid}"), 0o700, ItemKind::Dir));
    }
    let mut out = st.out;
    finish_items(&mut out.items)?;
    Ok(out)
}

/// Sorts entries by path, refuses duplicates and invalid paths, and adds missing parent
/// directories (mode 0700).
fn finish_items(items: &mut Vec<(String, u32, ItemKind)>) -> Result<()> {
    let have: std::collections::HashSet<String> = items.iter().map(|i| i.0.clone()).collect();
    let mut missing = std::collections::BTreeSet::new();
    for (p, _, _) in items.iter() {
        manifest::validate_path(p)
            .map_err(|e| anyhow!("the backup stream holds an invalid path {p:?}: {e}"))?;
        let mut at = p.as_str();
        while let Some((parent, _)) = at.rsplit_once('/') {
            if !have.contains(parent) {
                missing.insert(parent.to_string());
            }
            at = parent;
        }
    }
    items.extend(missing.into_iter().map(|p| (p, 0o700, ItemKind::Dir)));
    items.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    if let Some(w) = items.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("the backup stream holds {} twice", w[0].0);
    }
    Ok(())
}

/// A worker: blocks in, chunk locations out.
pub(super) fn block_worker(
    p: &mut Packer<'_>,
    jobs: &Mutex<smpsc::Receiver<Job>>,
) -> Result<Vec<Part>> {
    let mut out = Vec::new();
    loop {
        p.shared().check_running()?;
        let job = {
            let rx = jobs
                .lock()
                .map_err(|_| anyhow!("a backup worker panicked"))?;
            rx.recv()
        };
        let Ok(job) = job else { break };
        let logged = p.store(&job.data, job.parent, job.first_chunk)?;
        out.push((job.fid, job.first_chunk, logged, job.data.len() as u64));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_get_parents_and_order() {
        let mut items = vec![
            (
                "pg_tblspc/16384/PG_15_1/5/16385".to_string(),
                0o600,
                ItemKind::File(0),
            ),
            ("base".to_string(), 0o700, ItemKind::Dir),
            ("PG_VERSION".to_string(), 0o600, ItemKind::File(1)),
            ("pg_tblspc".to_string(), 0o700, ItemKind::Dir),
        ];
        finish_items(&mut items).unwrap();
        let paths: Vec<&str> = items.iter().map(|i| i.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "PG_VERSION",
                "base",
                "pg_tblspc",
                "pg_tblspc/16384",
                "pg_tblspc/16384/PG_15_1",
                "pg_tblspc/16384/PG_15_1/5",
                "pg_tblspc/16384/PG_15_1/5/16385"
            ]
        );
        let mut dup = vec![
            ("a".to_string(), 0, ItemKind::Dir),
            ("a".to_string(), 0, ItemKind::File(0)),
        ];
        assert!(finish_items(&mut dup).is_err());
        let mut bad = vec![("../etc".to_string(), 0, ItemKind::Dir)];
        assert!(finish_items(&mut bad).is_err());
    }
}
