//! External partitioning for the commands whose working set would otherwise grow with the chunk
//! references of the repository (`check`, `expire`): fixed-size records are appended to one of P
//! anonymous temporary files (partitions), then read back one partition at a time, sorted.
//!
//! - P is chosen up front from an estimate of the record count (manifest headers say how many
//!   chunk references each backup has) so that one partition fits the memory budget
//!   ([`budget`]: [`DEFAULT_BUDGET`], or [`BUDGET_ENV`]).
//! - A record goes to the partition of its [`Record::key`]: partitions hold ascending key ranges,
//!   so records with one key (all references into one pack) share a partition, and when a
//!   record's `Ord` compares its key first, the partitions read in order are one ascending
//!   sequence, whatever P is.
//! - Correctness never depends on the estimate: a partition larger than the budget (the estimate
//!   was low, or a manifest's stats lie) is sorted in runs of the budget's size into a second
//!   scratch file and merged, so memory stays near the budget.
//! - Memory: at most [`MAX_PARTITIONS`] write buffers of together about half the budget (at least
//!   4 KiB each); reading, one partition (at most the budget) or, merging, one read buffer per
//!   run (together about the budget, at least one record each).
//! - The scratch files live in `std::env::temp_dir()` (`TMPDIR`), are unlinked from the start
//!   and vanish when dropped or when the process dies. Their size is the record size times the
//!   record count (twice that for a partition merged in runs); errors name the directory.
//!
//! The file I/O is synchronous: callers on async threads do it between awaits, as buffered
//! writes of a few bytes and reads of up to [`MAX_READ_BUF`] bytes at a time.

use anyhow::{anyhow, bail, Context, Result};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;

/// Memory one partition may take when read back, unless [`BUDGET_ENV`] says otherwise.
pub const DEFAULT_BUDGET: u64 = 64 << 20;
/// Environment variable overriding [`DEFAULT_BUDGET`] (bytes; tests set it tiny to force many
/// partitions and merged runs).
pub const BUDGET_ENV: &str = "TIDEMARK_SPILL_BUDGET_BYTES";
/// Open scratch files of one spill at most (file descriptors, write buffers); beyond it the
/// partitions grow past the budget and are merged in runs.
pub const MAX_PARTITIONS: usize = 256;
const MIN_WRITE_BUF: u64 = 4 << 10;
const MAX_WRITE_BUF: u64 = 1 << 20;
/// Bytes read from a scratch file at once.
pub const MAX_READ_BUF: usize = 1 << 20;

/// A fixed-size record that can be spilled.
pub trait Record: Ord + Sized {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Writes exactly [`Self::SIZE`] bytes to `out` (which is that long).
    fn encode(&self, out: &mut [u8]);
    /// Reads a record from exactly [`Self::SIZE`] bytes written by [`Self::encode`].
    fn decode(b: &[u8]) -> Self;
    /// The partition key: records with equal keys land in one partition.
    fn key(&self) -> u64;
}

/// The memory budget of one partition: [`BUDGET_ENV`] if set, else [`DEFAULT_BUDGET`].
pub fn budget() -> Result<u64> {
    match std::env::var(BUDGET_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_BUDGET),
        Err(e) => bail!("{BUDGET_ENV} is not valid: {e}\nhint: set it to a number of bytes, e.g. 67108864, or unset it"),
        Ok(v) => v.trim().parse::<u64>().ok().filter(|b| *b > 0).ok_or_else(|| {
            anyhow!("{BUDGET_ENV}={v:?} is not a positive number of bytes\nhint: set it to a number of bytes, e.g. 67108864, or unset it for the default of {DEFAULT_BUDGET}")
        }),
    }
}

/// Bytes a record takes in memory once read back.
fn mem_size<R: Record>() -> u64 {
    std::mem::size_of::<R>().max(R::SIZE).max(1) as u64
}

/// The partition of `key` among `p`: ascending key ranges of equal width.
fn partition_of(key: u64, p: usize) -> usize {
    ((u128::from(key) * p as u128) >> 64) as usize
}

/// Where scratch files go, for messages.
fn scratch_dir() -> String {
    std::env::temp_dir().display().to_string()
}

/// An error of a scratch file, naming its directory and the room it needs.
fn scratch_error(what: &str, op: &str, room: u64, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{what}: cannot {op} a scratch file in {}: {e}\nhint: set TMPDIR to a writable directory with room for {room} bytes",
        scratch_dir()
    )
}

fn scratch_file(what: &str, room: u64) -> Result<File> {
    tempfile::tempfile().map_err(|e| scratch_error(what, "create", room, e))
}

struct Part {
    w: BufWriter<File>,
    records: u64,
}

/// Records being written.
pub struct Spill<R> {
    what: &'static str,
    parts: Vec<Part>,
    budget: u64,
    estimate: u64,
    records: u64,
    buf: Vec<u8>,
    _r: PhantomData<fn() -> R>,
}

impl<R: Record> Spill<R> {
    /// A spill for about `estimate` records whose partitions fit `budget` bytes each; `what`
    /// names the command in errors.
    pub fn new(what: &'static str, estimate: u64, budget: u64) -> Result<Spill<R>> {
        anyhow::ensure!(R::SIZE > 0, "{what}: a spilled record cannot be empty");
        let budget = budget.max(1);
        let per_part = (budget / mem_size::<R>()).max(1);
        let p = estimate.div_ceil(per_part).clamp(1, MAX_PARTITIONS as u64) as usize;
        let wbuf = (budget / 2 / p as u64).clamp(MIN_WRITE_BUF, MAX_WRITE_BUF) as usize;
        let room = estimate.saturating_mul(R::SIZE as u64);
        let parts = (0..p)
            .map(|_| {
                Ok(Part {
                    w: BufWriter::with_capacity(wbuf, scratch_file(what, room)?),
                    records: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Spill {
            what,
            parts,
            budget,
            estimate,
            records: 0,
            buf: vec![0; R::SIZE],
            _r: PhantomData,
        })
    }

    /// Bytes the scratch files need for what was estimated or written, whichever is more.
    fn room(&self) -> u64 {
        self.estimate
            .max(self.records)
            .saturating_mul(R::SIZE as u64)
    }

    /// Appends a record to its partition.
    pub fn push(&mut self, r: &R) -> Result<()> {
        let i = partition_of(r.key(), self.parts.len());
        r.encode(&mut self.buf);
        let room = self.room();
        let part = &mut self.parts[i];
        part.w
            .write_all(&self.buf)
            .map_err(|e| scratch_error(self.what, "write", room, e))?;
        part.records += 1;
        self.records += 1;
        Ok(())
    }

    /// Records pushed so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Flushes every partition; the records can then be read back.
    pub fn finish(self) -> Result<Spilled<R>> {
        let room = self.room();
        let what = self.what;
        let parts = self
            .parts
            .into_iter()
            .map(|p| {
                let f =
                    p.w.into_inner()
                        .map_err(|e| scratch_error(what, "write", room, e.error()))?;
                Ok((f, p.records))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Spilled {
            what,
            parts,
            budget: self.budget,
            room,
            _r: PhantomData,
        })
    }
}

/// Records written, to be read back partition by partition.
pub struct Spilled<R> {
    what: &'static str,
    parts: Vec<(File, u64)>,
    budget: u64,
    room: u64,
    _r: PhantomData<fn() -> R>,
}

impl<R: Record> Spilled<R> {
    /// The number of partitions.
    pub fn partitions(&self) -> usize {
        self.parts.len()
    }

    /// The number of records.
    pub fn records(&self) -> u64 {
        self.parts.iter().map(|(_, n)| n).sum()
    }

    /// Every record, partition by partition, each partition sorted. Can be called again.
    pub fn sorted(&self) -> Sorted<'_, R> {
        Sorted {
            spilled: self,
            next_part: 0,
            cur: Cur::Idle,
        }
    }

    fn io(&self, op: &str, e: impl std::fmt::Display) -> anyhow::Error {
        scratch_error(self.what, op, self.room.saturating_mul(2), e)
    }

    /// Reads `n` records starting at record `first` of `f` into `out`, [`MAX_READ_BUF`] bytes at
    /// a time.
    fn read_into(&self, f: &File, first: u64, n: u64, out: &mut Vec<R>) -> Result<()> {
        let per_read = (MAX_READ_BUF / R::SIZE).max(1) as u64;
        let mut buf = vec![0u8; (per_read.min(n) as usize) * R::SIZE];
        let mut done = 0;
        while done < n {
            let k = per_read.min(n - done) as usize;
            let b = &mut buf[..k * R::SIZE];
            f.read_exact_at(b, (first + done) * R::SIZE as u64)
                .map_err(|e| self.io("read", e))?;
            out.extend(b.chunks_exact(R::SIZE).map(R::decode));
            done += k as u64;
        }
        Ok(())
    }

    /// Partition `i` read back: whole when it fits the budget, else merged from sorted runs.
    fn load(&self, i: usize) -> Result<Cur<R>> {
        let (f, n) = &self.parts[i];
        let n = *n;
        let bytes = n
            .checked_mul(R::SIZE as u64)
            .context("a scratch partition of more than 2^64 bytes")?;
        let len = f.metadata().map_err(|e| self.io("inspect", e))?.len();
        if len != bytes {
            return Err(self.io(
                "read back",
                format!("it holds {len} bytes where {bytes} were written"),
            ));
        }
        let per_run = (self.budget / mem_size::<R>()).max(1);
        if n <= per_run {
            let mut v = Vec::with_capacity(n as usize);
            self.read_into(f, 0, n, &mut v)?;
            v.sort_unstable();
            return Ok(Cur::Mem(v.into_iter()));
        }
        // Over the budget: sorted runs of `per_run` records into a second file, then a merge.
        let runs_file = scratch_file(self.what, bytes)?;
        let mut w = BufWriter::with_capacity(MAX_READ_BUF.min(bytes as usize), runs_file);
        let mut runs = Vec::new();
        let mut enc = vec![0u8; R::SIZE];
        let mut start = 0;
        while start < n {
            let k = per_run.min(n - start);
            let mut v = Vec::with_capacity(k as usize);
            self.read_into(f, start, k, &mut v)?;
            v.sort_unstable();
            for r in &v {
                r.encode(&mut enc);
                w.write_all(&enc).map_err(|e| self.io("write", e))?;
            }
            runs.push((start, k));
            start += k;
        }
        let runs_file = w.into_inner().map_err(|e| self.io("write", e.error()))?;
        let per_read = (self.budget / mem_size::<R>() / runs.len() as u64)
            .clamp(1, (MAX_READ_BUF / R::SIZE).max(1) as u64);
        let mut m = Merge {
            file: runs_file,
            runs: runs
                .into_iter()
                .map(|(at, len)| Run {
                    next: at,
                    end: at + len,
                    buf: Vec::new(),
                })
                .collect(),
            heap: BinaryHeap::new(),
            per_read,
        };
        for r in 0..m.runs.len() {
            m.refill(self, r)?;
        }
        Ok(Cur::Merge(m))
    }
}

/// One sorted run of a merged partition: records `next..end` of the runs file not yet buffered,
/// and the buffered ones (reversed, so the smallest pops first).
struct Run<R> {
    next: u64,
    end: u64,
    buf: Vec<R>,
}

struct Merge<R> {
    file: File,
    runs: Vec<Run<R>>,
    /// The smallest unread record of each run that has one, and its run.
    heap: BinaryHeap<Reverse<(R, usize)>>,
    per_read: u64,
}

impl<R: Record> Merge<R> {
    /// Moves the next record of run `r` into the heap, reading its next block when its buffer
    /// is empty.
    fn refill(&mut self, s: &Spilled<R>, r: usize) -> Result<()> {
        let run = &mut self.runs[r];
        if run.buf.is_empty() && run.next < run.end {
            let k = self.per_read.min(run.end - run.next);
            s.read_into(&self.file, run.next, k, &mut run.buf)?;
            run.next += k;
            run.buf.reverse();
        }
        if let Some(x) = run.buf.pop() {
            self.heap.push(Reverse((x, r)));
        }
        Ok(())
    }

    fn next(&mut self, s: &Spilled<R>) -> Result<Option<R>> {
        let Some(Reverse((x, r))) = self.heap.pop() else {
            return Ok(None);
        };
        self.refill(s, r)?;
        Ok(Some(x))
    }
}

enum Cur<R> {
    Idle,
    Mem(std::vec::IntoIter<R>),
    Merge(Merge<R>),
}

/// The records of a [`Spilled`], partition by partition, each sorted; one partition in memory
/// at a time.
pub struct Sorted<'a, R> {
    spilled: &'a Spilled<R>,
    next_part: usize,
    cur: Cur<R>,
}

impl<R: Record> Sorted<'_, R> {
    /// The next record, or `None` after the last.
    pub fn next_record(&mut self) -> Result<Option<R>> {
        loop {
            let got = match &mut self.cur {
                Cur::Idle => None,
                Cur::Mem(it) => it.next(),
                Cur::Merge(m) => m.next(self.spilled)?,
            };
            if got.is_some() {
                return Ok(got);
            }
            // Free the partition before reading the next one.
            self.cur = Cur::Idle;
            if self.next_part >= self.spilled.parts.len() {
                return Ok(None);
            }
            self.cur = self.spilled.load(self.next_part)?;
            self.next_part += 1;
        }
    }
}

impl<R: Record> Iterator for Sorted<'_, R> {
    type Item = Result<R>;
    fn next(&mut self) -> Option<Result<R>> {
        self.next_record().transpose()
    }
}

/// Distinct keys (pack ids) numbered in first-seen order, so a spilled record carries a 4-byte
/// number instead of the key. Holds one entry per distinct key.
pub struct Numbering<K> {
    of: std::collections::HashMap<K, u32>,
    keys: Vec<K>,
}

impl<K> Default for Numbering<K> {
    fn default() -> Self {
        Numbering {
            of: std::collections::HashMap::new(),
            keys: Vec::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy> Numbering<K> {
    /// The number of `k`, given it if new.
    pub fn number(&mut self, k: K) -> Result<u32> {
        if let Some(&n) = self.of.get(&k) {
            return Ok(n);
        }
        let n = u32::try_from(self.keys.len()).context("more than 2^32 distinct packs")?;
        self.of.insert(k, n);
        self.keys.push(k);
        Ok(n)
    }

    /// The key numbered `n`.
    pub fn key(&self, n: u32) -> Option<K> {
        self.keys.get(n as usize).copied()
    }

    /// The number of `k`, if it has one.
    pub fn get(&self, k: &K) -> Option<u32> {
        self.of.get(k).copied()
    }
}

/// Spreads small numbers over the whole key range (splitmix64's finalizer), for records keyed
/// by a [`Numbering`].
pub fn spread(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
