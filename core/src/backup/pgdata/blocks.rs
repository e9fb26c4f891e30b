//! The work items of a `--pgdata` copy: blocks of files, handed to the workers in file order,
//! so that every worker helps with a large file instead of one worker reading it alone.
//!
//! Invariants:
//! - A file is opened once, when its first block is handed out, and every block is read from
//!   that descriptor: the copy of a file is of one inode, as if read front to back.
//! - The blocks handed out are those of the file's size when it was opened; the last one reads
//!   on to end of file, so a file that grew is copied whole. A block that reads short ends the
//!   file there: later blocks are neither counted nor stored (the file shrank meanwhile).
//! - A file's size and end are settled in file order: a block's worker waits for the turn of
//!   its block (the previous block counted) before counting and storing it. The earliest
//!   outstanding block never waits, so the turns always advance; a failed worker ends the
//!   waits of the others. No whole-file hash is computed here: the manifest records each
//!   file's chunk-list hash (`FLAG_CHUNK_LIST_HASH`, format 1.5), made from the chunk ids the
//!   workers compute anyway.
//! - Memory: the state of the files being copied (at most one per worker, plus one), one
//!   buffer of one block per worker, and per file one chunk-log range per block stored.

use super::super::chunk_log::Logged;
use super::super::pipeline::{FileDone, Packer, Shared, CHUNKS_PER_BLOCK};
use anyhow::{Context, Result};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The files to copy, handed out block by block in order.
pub(super) struct BlockQueue {
    /// (index in the walk, absolute path, relative path) of each file.
    files: Vec<(usize, PathBuf, String)>,
    block_size: usize,
    cursor: Mutex<Cursor>,
    /// Files whose blocks have all been handed out (for progress reports).
    pub(super) files_started: AtomicUsize,
}

struct Cursor {
    /// The next file to open (index into `files`).
    next_file: usize,
    /// The file being handed out and its next block.
    current: Option<(Arc<InFlight>, usize)>,
}

/// One file being copied.
struct InFlight {
    /// Index into `BlockQueue::files`.
    file: usize,
    f: std::fs::File,
    /// Blocks handed out; the last reads on to end of file.
    blocks: usize,
    /// The file's entry in the parent manifest, when its chunks may be reused.
    parent: Option<usize>,
    order: Mutex<Order>,
    turn: Condvar,
}

/// The in-order part of a file's copy.
struct Order {
    /// The block whose turn it is.
    next: usize,
    size: u64,
    /// A block read short: the file ends there.
    ended: bool,
    /// The chunk-log ranges of each block stored.
    stored: Vec<Vec<Logged>>,
    /// Blocks finished (stored or skipped).
    finished: usize,
}

/// A block to copy: block `k` of a file.
struct Item {
    file: Arc<InFlight>,
    k: usize,
}

impl BlockQueue {
    pub(super) fn new(files: Vec<(usize, PathBuf, String)>, chunk_size: usize) -> BlockQueue {
        BlockQueue {
            files,
            block_size: chunk_size * CHUNKS_PER_BLOCK,
            cursor: Mutex::new(Cursor {
                next_file: 0,
                current: None,
            }),
            files_started: AtomicUsize::new(0),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.files.len()
    }

    /// The next block to copy, opening the next file when the current one is handed out; files
    /// that vanished before they were opened are passed over (WAL replay recreates them).
    fn next(&self, s: &Shared) -> Result<Option<Item>> {
        let mut c = self
            .cursor
            .lock()
            .map_err(|_| anyhow::anyhow!("backup aborted: another worker failed"))?;
        loop {
            if let Some((file, k)) = c.current.take() {
                if k + 1 < file.blocks {
                    c.current = Some((file.clone(), k + 1));
                } else {
                    self.files_started.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(Some(Item { file, k }));
            }
            let i = c.next_file;
            let Some((_, abs, rel)) = self.files.get(i) else {
                return Ok(None);
            };
            c.next_file += 1;
            match InFlight::open(i, abs, self.block_size, s.parent_entry(rel))? {
                Some(file) => c.current = Some((Arc::new(file), 0)),
                None => {
                    self.files_started.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl InFlight {
    /// Opens file `i` of the queue (None: it vanished) and counts its blocks.
    fn open(
        i: usize,
        abs: &std::path::Path,
        block_size: usize,
        parent: Option<usize>,
    ) -> Result<Option<InFlight>> {
        let f = match std::fs::File::open(abs) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", abs.display())),
        };
        let len = f
            .metadata()
            .with_context(|| format!("cannot read the size of {}", abs.display()))?
            .len();
        let blocks = (len.div_ceil(block_size as u64) as usize).max(1);
        Ok(Some(InFlight {
            file: i,
            f,
            blocks,
            parent,
            order: Mutex::new(Order {
                next: 0,
                size: 0,
                ended: false,
                stored: vec![Vec::new(); blocks],
                finished: 0,
            }),
            turn: Condvar::new(),
        }))
    }

    /// Waits until it is block `k`'s turn (every earlier block counted), or another worker failed.
    fn wait_turn(&self, k: usize, s: &Shared) -> Result<MutexGuard<'_, Order>> {
        let mut o = self.lock()?;
        while o.next != k {
            s.check_running()?;
            o = self
                .turn
                .wait_timeout(o, Duration::from_millis(50))
                .map_err(|_| anyhow::anyhow!("backup aborted: another worker failed"))?
                .0;
        }
        Ok(o)
    }

    /// Hands the turn to block `k + 1`: block `k` is counted (or skipped after the file ended).
    fn pass_turn(&self, mut o: MutexGuard<'_, Order>, k: usize) {
        o.next = k + 1;
        drop(o);
        self.turn.notify_all();
    }

    fn lock(&self) -> Result<MutexGuard<'_, Order>> {
        self.order
            .lock()
            .map_err(|_| anyhow::anyhow!("backup aborted: another worker failed"))
    }
}

/// One worker: copies blocks until none are left; returns the files it finished (the worker
/// that finishes a file's last outstanding block reports the file).
pub(super) fn copy_blocks(p: &mut Packer<'_>, q: &BlockQueue) -> Result<Vec<(usize, FileDone)>> {
    let s = p.shared();
    let mut out = Vec::new();
    let mut buf = vec![0u8; q.block_size];
    loop {
        s.check_running()?;
        let Some(Item { file, k }) = q.next(s)? else {
            break;
        };
        if file.file >= q.files.len() / 2 {
            crate::testhooks::pause_point("backup-mid-copy");
        }
        let (idx, _, rel) = &q.files[file.file];
        let stored = copy_block(p, q, &file, k, &mut buf)?;
        let mut o = file.lock()?;
        o.stored[k] = stored;
        o.finished += 1;
        if o.finished == file.blocks {
            let size = o.size;
            tracing::debug!(file = %rel, size, "file copied");
            out.push((
                *idx,
                FileDone {
                    size,
                    sha256: None,
                    chunks: o.stored.drain(..).flatten().collect(),
                },
            ));
        }
    }
    Ok(out)
}

/// Reads block `k` of `file`, and in its turn counts and stores it; the file's last block
/// reads on to end of file. Returns the chunk-log ranges stored.
fn copy_block(
    p: &mut Packer<'_>,
    q: &BlockQueue,
    file: &InFlight,
    k: usize,
    buf: &mut [u8],
) -> Result<Vec<Logged>> {
    let s = p.shared();
    let bs = q.block_size;
    let last = k + 1 == file.blocks;
    let path = &q.files[file.file].1;
    let read = |buf: &mut [u8], at: u64| {
        read_full_at(&file.f, buf, at).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut at = (k * bs) as u64;
    let mut n = read(buf, at)?;
    let mut o = file.wait_turn(k, s)?;
    let mut stored = Vec::new();
    if !o.ended {
        o.size += n as u64;
        o.ended = n < bs && !last;
        if !last {
            // The next block's worker may go on while this one stores.
            file.pass_turn(o, k);
            if n > 0 {
                stored.push(p.store(&buf[..n], file.parent, k * CHUNKS_PER_BLOCK)?);
            }
            return Ok(stored);
        }
        // The last block: every earlier block is counted and no later one exists, so the rest
        // of the file is this worker's alone.
        drop(o);
        let mut first = k * CHUNKS_PER_BLOCK;
        while n > 0 {
            stored.push(p.store(&buf[..n], file.parent, first)?);
            if n < bs {
                // End of file: a read after it could find the file grown and store a short
                // chunk in the middle.
                break;
            }
            first += CHUNKS_PER_BLOCK;
            at += n as u64;
            n = read(buf, at)?;
            file.lock()?.size += n as u64;
        }
        return Ok(stored);
    }
    file.pass_turn(o, k);
    Ok(stored)
}

/// Reads into `buf` from offset `at` until it is full or the file ends; returns the bytes read.
fn read_full_at(f: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::super::pipeline::{Pipeline, Slot};
    use super::*;
    use crate::store::Store;
    use tidemark_format::config::{RepoConfig, COMPRESSION_ZSTD};
    use tidemark_format::ChunkId;
    use tidemark_format::SystemId;

    const MIB: usize = 1 << 20;

    /// A file:// repository in a temporary directory, and its configuration.
    struct Lab {
        dir: tempfile::TempDir,
        store: Store,
        cfg: RepoConfig,
    }

    impl Lab {
        fn new() -> Lab {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&format!("file://{}/repo", dir.path().display())).unwrap();
            let cfg = RepoConfig {
                system_id: SystemId(1),
                chunk_size: 8192,
                pack_target: 4 * MIB as u32,
                compression: COMPRESSION_ZSTD,
                created_us: 0,
            };
            Lab { dir, store, cfg }
        }

        fn pipeline(&self) -> Pipeline<'_> {
            Pipeline {
                store: &self.store,
                cfg: &self.cfg,
                parent: None,
            }
        }

        /// The queue of one file holding `data`, and that file opened.
        fn one_file(&self, data: &[u8]) -> (Arc<BlockQueue>, Arc<InFlight>) {
            let abs = self.dir.path().join("f");
            std::fs::write(&abs, data).unwrap();
            let q = Arc::new(BlockQueue::new(vec![(0, abs.clone(), "f".into())], 8192));
            let file = InFlight::open(0, &abs, q.block_size, None)
                .unwrap()
                .unwrap();
            (q, Arc::new(file))
        }
    }

    /// Pseudo-random bytes that zstd cannot shrink much, with every fifth 8 KiB page all zero.
    fn content(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut v: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for page in v.chunks_mut(8192).step_by(5) {
            page.fill(0);
        }
        v
    }

    /// Copies `files` (name, content) with two workers; `blocks` overrides the block count of
    /// the first file (as if its size had been different when it was opened). Returns, per file
    /// in order, what was reported (None: not reported) and the chunk ids the log holds for it.
    async fn copy(
        files: &[(&str, Option<Vec<u8>>)],
        blocks: Option<usize>,
    ) -> Vec<Option<(FileDone, Vec<ChunkId>)>> {
        let lab = Lab::new();
        let dir = &lab.dir;
        let list: Vec<(usize, PathBuf, String)> = files
            .iter()
            .enumerate()
            .map(|(i, (name, data))| {
                let abs = dir.path().join(name);
                if let Some(d) = data {
                    std::fs::write(&abs, d).unwrap();
                }
                (i, abs, name.to_string())
            })
            .collect();
        let pipeline = lab.pipeline();
        let shared = pipeline.shared(1).unwrap();
        let q = BlockQueue::new(list.clone(), 8192);
        if let Some(b) = blocks {
            let mut f = InFlight::open(0, &list[0].1, q.block_size, None)
                .unwrap()
                .unwrap();
            f.blocks = b;
            f.order.get_mut().unwrap().stored = vec![Vec::new(); b];
            let mut c = q.cursor.lock().unwrap();
            c.current = Some((Arc::new(f), 0));
            c.next_file = 1;
        }
        let q = Arc::new(q);
        let (parts, stored) = pipeline
            .run(shared, 2, move |p: &mut Packer<'_>| copy_blocks(p, &q))
            .await
            .unwrap();
        let mut done: Vec<Option<FileDone>> = (0..files.len()).map(|_| None).collect();
        for (i, f) in parts.into_iter().flatten() {
            assert!(done[i].is_none(), "file {i} reported twice");
            done[i] = Some(f);
        }
        done.into_iter()
            .map(|d| {
                d.map(|d| {
                    let mut ids = Vec::new();
                    stored
                        .log()
                        .for_each(&d.chunks, |id, loc| {
                            assert!(!matches!(loc.slot, Slot::New(u32::MAX)));
                            ids.push(id);
                            Ok(())
                        })
                        .unwrap();
                    (d, ids)
                })
            })
            .collect()
    }

    fn expect(got: &Option<(FileDone, Vec<ChunkId>)>, data: &[u8]) {
        let (d, ids) = got.as_ref().expect("file not reported");
        assert_eq!(d.size, data.len() as u64);
        assert_eq!(d.sha256, None, "the manifest records the chunk-list hash");
        let want: Vec<ChunkId> = data.chunks(8192).map(ChunkId::of).collect();
        assert_eq!(ids.len(), want.len());
        assert!(ids == &want, "chunks out of order or wrong");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_of_files_are_stored_in_order_by_both_workers() {
        let files = [
            ("empty", Some(Vec::new())),
            ("small", Some(content(100, 1))),
            ("gone", None),
            ("one-block", Some(content(MIB, 2))),
            ("large", Some(content(7 * MIB + MIB / 2 + 5, 3))),
            ("odd", Some(content(3 * MIB + 8191, 4))),
            ("tail", Some(content(8192 * 3, 5))),
        ];
        let got = copy(&files, None).await;
        for ((name, data), g) in files.iter().zip(&got) {
            match data {
                Some(d) => expect(g, d),
                None => assert!(g.is_none(), "{name} vanished but was reported"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_shorter_than_when_opened_ends_at_its_end() {
        let data = content(2 * MIB + MIB / 2, 6);
        // Opened at 6 blocks, read at 2.5: blocks 3.. read nothing and are skipped.
        let got = copy(&[("shrunk", Some(data.clone()))], Some(6)).await;
        expect(&got[0], &data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_longer_than_when_opened_is_read_to_its_end() {
        let data = content(5 * MIB + 100, 7);
        // Opened at 2 blocks: the last block reads on to the end.
        let got = copy(&[("grown", Some(data.clone()))], Some(2)).await;
        expect(&got[0], &data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_read_before_the_one_ahead_of_it_waits_for_its_turn() {
        let lab = Lab::new();
        let data = content(2 * MIB, 8);
        let (q, file) = lab.one_file(&data);
        let pipeline = lab.pipeline();
        assert_eq!(file.blocks, 2);
        let roles = Arc::new(AtomicUsize::new(0));
        let (f, q2) = (file.clone(), q.clone());
        // The first worker takes block 1 at once; the second reads block 0 200 ms later.
        let (parts, _) = pipeline
            .run(pipeline.shared(1).unwrap(), 2, move |p: &mut Packer<'_>| {
                let k = usize::from(roles.fetch_add(1, Ordering::SeqCst) == 0);
                if k == 0 {
                    std::thread::sleep(Duration::from_millis(200));
                }
                let mut buf = vec![0u8; q2.block_size];
                copy_block(p, &q2, &f, k, &mut buf)
            })
            .await
            .unwrap();
        assert_eq!(parts.len(), 2);
        let o = file.lock().unwrap();
        assert_eq!(o.size, data.len() as u64);
        assert_eq!(o.next, 1, "block 0 passed the turn to the last block");
        assert!(!o.ended);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_new_chunks_of_a_block_share_one_frame_around_chunks_found_stored() {
        let lab = Lab::new();
        let pipeline = lab.pipeline();
        // Pages that are not all zero (`content` zeroes every fifth page, the first included).
        let page = |seed| content(2 * 8192, seed)[8192..].to_vec();
        let (a, b, c, d, e) = (page(2), page(4), page(6), page(8), page(10));
        assert!([&b, &c, &d, &e].iter().all(|p| **p != a) && c != d && d != e && c != e);
        let first = [a.clone(), b.clone()].concat();
        let second = [c.clone(), a.clone(), d.clone(), b.clone(), e.clone()].concat();
        let (parts, stored) = pipeline
            .run(pipeline.shared(1).unwrap(), 1, move |p: &mut Packer<'_>| {
                Ok(vec![p.store(&first, None, 0)?, p.store(&second, None, 2)?])
            })
            .await
            .unwrap();
        let logged: Vec<Logged> = parts.into_iter().flatten().collect();
        let mut locs = Vec::new();
        stored
            .log()
            .for_each(&logged, |id, loc| {
                locs.push((id, loc));
                Ok(())
            })
            .unwrap();
        let ids: Vec<ChunkId> = locs.iter().map(|(id, _)| *id).collect();
        let want: Vec<ChunkId> = [&a, &b, &c, &a, &d, &b, &e]
            .iter()
            .map(|p| ChunkId::of(p))
            .collect();
        assert_eq!(ids, want);
        let frame = |i: usize| (locs[i].1.slot, locs[i].1.offset, locs[i].1.clen);
        // A and B are found stored in the second block: referenced where the first put them.
        assert_eq!((locs[3].1, locs[5].1), (locs[0].1, locs[1].1));
        // C, D and E, around them, are one frame, end to end in file order.
        assert_eq!(frame(2), frame(4));
        assert_eq!(frame(2), frame(6));
        assert_ne!(frame(2), frame(0));
        let skips: Vec<u32> = [2, 4, 6].iter().map(|&i| locs[i].1.skip).collect();
        assert_eq!(skips, [0, 8192, 16384]);
    }

    #[test]
    fn a_worker_that_panics_ends_the_wait_of_the_next_block() {
        let lab = Lab::new();
        let (q, file) = lab.one_file(&content(2 * MIB, 9));
        let pipeline = lab.pipeline();
        let roles = Arc::new(AtomicUsize::new(0));
        // A runtime of its own, shut down without waiting: a worker left waiting forever must
        // fail this test, not hang it.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            // The first worker holds block 0 and panics; the second waits for block 0's turn.
            let run = pipeline.run(pipeline.shared(1).unwrap(), 2, move |p: &mut Packer<'_>| {
                if roles.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::thread::sleep(Duration::from_millis(100));
                    panic!("test: a worker panics holding block 0");
                }
                let mut buf = vec![0u8; q.block_size];
                copy_block(p, &q, &file, 1, &mut buf)
            });
            tokio::time::timeout(Duration::from_secs(30), run).await
        });
        rt.shutdown_timeout(Duration::from_millis(100));
        let r = r.expect("the worker waiting for block 0 never ended");
        assert!(r.is_err());
    }
}
