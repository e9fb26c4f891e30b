//! The plan of a restore (`restore --dry-run`), made from the repository alone and writing
//! nothing: the backup [`crate::archive::choose`] picks and why, the timelines recovery will
//! follow, the WAL it will fetch, the bytes to restore, an estimate from the last recorded
//! drill, and every problem found.
//!
//! Invariants:
//! - The backup is chosen by the same function as the restore itself, so the plan names the
//!   backup the restore that follows uses.
//! - The WAL is walked along the followed history: on each timeline from where recovery enters
//!   it to the segment holding the switch point (that segment is read from the next timeline,
//!   which holds its copy), on the last one to the target's segment (LSN, immediate) or to the
//!   archive's end (latest, time, xid, name: an upper bound, since where those stop is only
//!   known during replay). A needed segment the archive lacks is a problem.
//! - Nothing is read but listings, manifests, history files and the newest drill record.

use crate::archive::{self, Archive, Selection, Want};
use crate::spill::{self, Record, Spill};
use crate::store::Store;
use crate::target::Target;
use crate::timeline::History;
use anyhow::Result;
use serde::Serialize;
use tidemark_format::manifest::{HeadKind, ManifestHeader};
use tidemark_format::wal::WalFileName;
use tidemark_format::{Lsn, TimelineId};

/// Missing segments named in a plan before it only counts them.
const MAX_NAMED: usize = 20;

#[derive(Serialize, Clone, Debug, Default)]
pub struct Plan {
    pub schema_version: u32,
    pub target: String,
    pub backup: Option<PlannedBackup>,
    /// Why this backup (or why none).
    pub why: String,
    /// The timelines recovery follows from the backup, in order.
    pub timelines: Vec<Leg>,
    pub wal: PlannedWal,
    pub restore: PlannedFiles,
    pub estimate: Option<Estimate>,
    /// Everything found that would make the restore fail or stop short.
    pub problems: Vec<String>,
    /// Things worth knowing that are not problems.
    pub notes: Vec<String>,
}

#[derive(Serialize, Clone, Debug)]
pub struct PlannedBackup {
    pub id: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub stop_time: String,
    pub pg_version: u32,
}

/// One timeline of the path: recovery enters it at `from` and leaves it at `to` (`None`: the
/// last one).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Leg {
    pub timeline: u32,
    pub from_lsn: String,
    pub to_lsn: Option<String>,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct PlannedWal {
    pub first: Option<String>,
    pub last: Option<String>,
    /// Segments to fetch that the archive holds, and their stored bytes.
    pub files: u64,
    pub stored_bytes: u64,
    /// Whether `last` is the archive's end rather than the target's own segment (recovery may
    /// stop before it).
    pub upper_bound: bool,
    /// Needed segments the archive lacks (the first [`MAX_NAMED`]) and how many there are.
    pub missing: Vec<String>,
    pub missing_count: u64,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct PlannedFiles {
    pub files: u64,
    /// File bytes the restore writes.
    pub bytes: u64,
    /// Stored (compressed) bytes of the chunks it reads, and the packs they are in.
    pub stored_bytes: u64,
    pub packs: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Estimate {
    pub seconds: f64,
    pub restore_seconds: f64,
    pub replay_seconds: Option<f64>,
    /// The drill record the rates come from.
    pub basis: String,
}

/// The segments recovery reads from `b` along `legs` up to `end` (`None`: the archive's end on
/// the last timeline), in order, each with its stored size when archived.
fn segments_along(
    archive: &Archive,
    legs: &[(u32, Lsn, Option<Lsn>)],
    end: Option<Lsn>,
    seg: u64,
) -> Vec<(WalFileName, Option<u64>)> {
    let mut out = Vec::new();
    for (i, (tli, from, to)) in legs.iter().enumerate() {
        let first = from.0 / seg;
        let stop_here = end.filter(|e| to.is_none_or(|t| *e < t));
        let last_incl: Option<u64> = match (stop_here, to) {
            (Some(e), _) => Some(e.0 / seg),
            // Left at `t`: the segment holding `t` is read from the next timeline.
            (None, Some(t)) => (t.0 / seg).checked_sub(1),
            (None, None) => archive.segment_numbers(*tli, seg).last().copied(),
        };
        if let Some(last) = last_incl {
            for n in first..=last {
                let name = archive::name_of(*tli, n, seg);
                let size = archive.size_of(&name.to_string());
                out.push((name, size));
            }
        }
        if stop_here.is_some() || i + 1 == legs.len() {
            break;
        }
    }
    out
}

/// The timelines recovery follows from backup `b` on `history` (`None`: the backup's own).
fn legs(b: &ManifestHeader, history: Option<&History>) -> Vec<(u32, Lsn, Option<Lsn>)> {
    let Some(h) = history else {
        return vec![(b.timeline.0, b.start_lsn, None)];
    };
    let mut out = Vec::new();
    let mut from = b.start_lsn;
    let mut on = false;
    for a in &h.ancestors {
        on |= a.tli == b.timeline.0;
        if on {
            out.push((a.tli, from, Some(a.switch)));
            from = a.switch;
        }
    }
    out.push((h.tli, from, None));
    out
}

/// The plan of `restore::run` with these options ([`make`]), plus what the target directory
/// would refuse; writes nothing.
pub async fn for_restore(
    store: &Store,
    opts: &super::RestoreOptions,
    rates: Option<Rates>,
) -> Result<Plan> {
    let want = Want {
        target: opts.recovery.target.clone(),
        timeline: opts.recovery.timeline,
        backup: opts.backup.clone(),
    };
    let mut p = make(store, &want, rates).await?;
    let full = std::fs::read_dir(&opts.pgdata).is_ok_and(|mut d| d.next().is_some());
    match (full, opts.delta) {
        (true, false) => p.problems.push(format!(
            "target directory {} is not empty\nhint: restore into a new or empty directory, or over a stopped data directory of the same cluster with --delta",
            opts.pgdata.display()
        )),
        (true, true) => p.notes.push(format!(
            "--delta: {} is compared file by file; only differing chunks are fetched, so the restore reads and writes at most the figures above",
            opts.pgdata.display()
        )),
        _ => {}
    }
    Ok(p)
}

/// The restore and WAL rates an estimate is made from (the last passed drill's, which the
/// caller reads: the plan does not depend on how drills are recorded).
#[derive(Clone, Debug)]
pub struct Rates {
    pub restore_bytes_per_second: f64,
    pub replay_bytes_per_second: Option<f64>,
    /// Where the rates come from, e.g. the drill record's key.
    pub basis: String,
}

/// Makes the plan of a restore for `want`; never writes.
pub async fn make(store: &Store, want: &Want, rates: Option<Rates>) -> Result<Plan> {
    let mut p = Plan {
        schema_version: 1,
        target: want.target.describe(),
        ..Plan::default()
    };
    let (sel, m) = match super::select_loaded(store, want).await {
        Ok(s) => s,
        Err(e) => {
            p.why = "no backup can be used".into();
            p.problems.push(format!("{e:#}"));
            return Ok(p);
        }
    };
    let Selection {
        archive,
        history,
        chosen: b,
        backups,
    } = sel;
    p.why = why(&b, &backups, history.as_ref(), want);
    p.backup = Some(PlannedBackup {
        id: b.backup_id.clone(),
        timeline: b.timeline.0,
        start_lsn: b.start_lsn.to_string(),
        stop_lsn: b.stop_lsn.to_string(),
        stop_time: crate::repo::fmt_time(b.stop_time_us),
        pg_version: b.pg_version,
    });
    let legs = legs(&b, history.as_ref());
    p.timelines = legs
        .iter()
        .map(|(t, f, to)| Leg {
            timeline: *t,
            from_lsn: f.to_string(),
            to_lsn: to.map(|l| l.to_string()),
        })
        .collect();

    // The files.
    for e in &m.entries {
        if let HeadKind::File(f) = &e.kind {
            p.restore.files += 1;
            p.restore.bytes += f.size;
        }
    }
    // Each stored chunk is read once however many files use it: distinct (pack, offset),
    // counted through scratch partitions so memory stays flat.
    let estimate = m.header.stats.new_chunks + m.header.stats.reused_chunks;
    let mut reads = Spill::<Read>::new("restore --dry-run", estimate, spill::budget()?)?;
    m.for_each_chunk(|c| {
        reads.push(&Read {
            pack: c.pack,
            offset: c.offset,
            clen: c.clen,
        })
    })?;
    let mut last: Option<Read> = None;
    let mut packs = std::collections::BTreeSet::new();
    for r in reads.finish()?.sorted() {
        let r = r?;
        if last.is_none_or(|l| (l.pack, l.offset) != (r.pack, r.offset)) {
            p.restore.stored_bytes += r.clen as u64;
            packs.insert(r.pack);
        }
        last = Some(r);
    }
    p.restore.packs = packs.len() as u64;

    // The WAL.
    let Some(seg) = archive.seg_size else {
        p.problems
            .push("the archive holds no WAL segment: recovery cannot even reach the backup's consistent point\nhint: check archive_command and the sidecar (tidemark-agent info)".into());
        return Ok(p);
    };
    let end = match &want.target {
        Target::Immediate => Some(b.stop_lsn),
        Target::Lsn(l) => Some(*l),
        _ => None,
    };
    // A backup's own WAL (start..stop) is needed whatever the target.
    let end = end.map(|e| e.max(b.stop_lsn));
    let wal = segments_along(&archive, &legs, end, seg);
    p.wal.upper_bound = end.is_none();
    p.wal.first = wal.first().map(|(n, _)| n.to_string());
    p.wal.last = wal.last().map(|(n, _)| n.to_string());
    let stop_seg = WalFileName::segment_of(TimelineId(b.timeline.0), b.stop_lsn, seg);
    let mut stop_seen = false;
    for (n, size) in &wal {
        stop_seen |= n.segment_number(seg) >= stop_seg.segment_number(seg);
        match size {
            Some(s) => {
                p.wal.files += 1;
                p.wal.stored_bytes += s;
            }
            None => {
                p.wal.missing_count += 1;
                if p.wal.missing.len() < MAX_NAMED {
                    p.wal.missing.push(n.to_string());
                }
            }
        }
    }
    if !stop_seen {
        p.problems.push(format!(
            "the archive ends before backup {}'s stop point {} (segment {stop_seg}): the restore could not become consistent\nhint: wait until the segment is archived, or check archive_command",
            b.backup_id, b.stop_lsn
        ));
    }
    if p.wal.missing_count > 0 {
        p.problems.push(format!(
            "{} WAL segment(s) recovery needs are not in the archive: {}{}; recovery stops at the first one\nhint: run 'tidemark-restore check'; choose a target before the gap, or restore a backup taken after it",
            p.wal.missing_count,
            p.wal.missing.join(", "),
            if p.wal.missing_count > MAX_NAMED as u64 { ", ..." } else { "" }
        ));
    }
    match &want.target {
        Target::Time(t) => {
            let newest = wal
                .last()
                .and_then(|(n, _)| archive.archived_us.get(n))
                .copied();
            if let Some(us) = newest.filter(|us| *us < t.timestamp_micros()) {
                p.problems.push(format!(
                    "the newest WAL on this path was archived at {}, before the target time {}: unless more WAL is archived first, recovery ends before the target and PostgreSQL refuses to promote\nhint: archive the current segment on the source (SELECT pg_switch_wal()) or choose an earlier target",
                    crate::repo::fmt_time(us),
                    crate::target::postgres_text(t)
                ));
            }
        }
        Target::Xid(_) | Target::Name(_) => p.notes.push(
            "where the transaction committed or the restore point lies is known only during replay: if it lies before the backup's stop, PostgreSQL stops with FATAL and promotes nothing (then use --backup with an older backup)".into(),
        ),
        _ => {}
    }

    // The estimate, from the last passed drill's rates.
    if let Some(r) = rates {
        let restore_seconds = p.restore.bytes as f64 / r.restore_bytes_per_second;
        let replay_seconds = r
            .replay_bytes_per_second
            .map(|w| p.wal.stored_bytes as f64 / w);
        p.estimate = Some(Estimate {
            seconds: restore_seconds + replay_seconds.unwrap_or(0.0),
            restore_seconds,
            replay_seconds,
            basis: format!(
                "{} ({:.1} MB/s restore{})",
                r.basis,
                r.restore_bytes_per_second / 1e6,
                r.replay_bytes_per_second
                    .map(|w| format!(", {:.1} MB/s WAL", w / 1e6))
                    .unwrap_or_default()
            ),
        });
    }
    if p.estimate.is_none() {
        p.notes.push(
            "no estimate: the newest drill record is missing or not a passed drill (run 'tidemark-restore verify --record' on a schedule)".into(),
        );
    }
    Ok(p)
}

/// Why `b` was chosen for `want`, in one sentence.
fn why(b: &ManifestHeader, all: &[ManifestHeader], h: Option<&History>, want: &Want) -> String {
    let off = all
        .iter()
        .filter(|x| h.is_some_and(|h| !h.contains(x.timeline.0, x.stop_lsn)))
        .count();
    let path = match h {
        Some(h) => format!("on the history of timeline {}", h.tli),
        None => format!("on its own timeline {}", b.timeline.0),
    };
    let rule = if want.backup.is_some() {
        "named by --backup, and it can reach the target".to_string()
    } else {
        match &want.target {
            Target::Time(_) => "the newest that finished at or before the target time".into(),
            Target::Lsn(_) => "the newest that stopped at or before the target LSN".into(),
            _ => "the newest".into(),
        }
    };
    let mut s = format!("{rule} of {} backup(s) {path}", all.len() - off);
    if off > 0 {
        s += &format!(" ({off} on other timelines skipped)");
    }
    s
}

/// The plan as text for a terminal.
pub fn render(p: &Plan) -> String {
    let mut s = format!("plan (nothing written): restore to {}\n", p.target);
    match &p.backup {
        Some(b) => {
            s += &format!(
            "  backup     {} (timeline {}, stopped {} at LSN {}, PostgreSQL {})\n             {}\n",
            b.id,
            b.timeline,
            b.stop_time,
            b.stop_lsn,
            b.pg_version / 10000,
            p.why
        )
        }
        None => s += &format!("  backup     none: {}\n", p.why),
    }
    if !p.timelines.is_empty() {
        let path: Vec<String> = p
            .timelines
            .iter()
            .map(|l| match &l.to_lsn {
                Some(t) => format!("{} ({}..{})", l.timeline, l.from_lsn, t),
                None => format!("{} (from {})", l.timeline, l.from_lsn),
            })
            .collect();
        s += &format!("  timelines  {}\n", path.join(" -> "));
    }
    if p.backup.is_some() {
        s += &format!(
            "  files      {} files, {} bytes to write, {} stored bytes to read from {} pack(s)\n",
            p.restore.files, p.restore.bytes, p.restore.stored_bytes, p.restore.packs
        );
        s += &format!(
            "  wal        {} .. {}{}: {} segment(s), {} stored bytes{}\n",
            p.wal.first.as_deref().unwrap_or("-"),
            p.wal.last.as_deref().unwrap_or("-"),
            if p.wal.upper_bound {
                " (at most: to the archive's end)"
            } else {
                ""
            },
            p.wal.files,
            p.wal.stored_bytes,
            if p.wal.missing_count > 0 {
                format!(", {} missing", p.wal.missing_count)
            } else {
                String::new()
            }
        );
    }
    match &p.estimate {
        Some(e) => {
            s += &format!(
                "  estimate   {:.1} s ({:.1} s files{}) from {}\n",
                e.seconds,
                e.restore_seconds,
                e.replay_seconds
                    .map(|r| format!(", {r:.1} s WAL"))
                    .unwrap_or_default(),
                e.basis
            )
        }
        None => s += "  estimate   none\n",
    }
    for n in &p.notes {
        s += &format!("  note       {n}\n");
    }
    if p.problems.is_empty() {
        s += "  problems   none found\n";
    }
    for pr in &p.problems {
        s += &format!("  PROBLEM    {}\n", pr.replace('\n', "\n             "));
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::test_support::{archive, SEG};

    fn names(v: &[(WalFileName, Option<u64>)]) -> Vec<(String, bool)> {
        v.iter()
            .map(|(n, s)| (n.to_string(), s.is_some()))
            .collect()
    }

    #[test]
    fn walks_the_history_and_finds_what_is_missing() {
        // Backup on timeline 1 from segment 2; the switch to timeline 2 inside segment 5.
        let mut b = crate::test_support::hdr("b", 1);
        b.timeline = TimelineId(1);
        b.start_lsn = Lsn(2 * SEG + 40);
        b.stop_lsn = Lsn(3 * SEG + 8);
        let h = History::parse(2, &format!("1\t0/{:X}\tpromoted\n", 5 * SEG + 100)).unwrap();
        let l = legs(&b, Some(&h));
        assert_eq!(l.len(), 2);
        let a = archive(&[(1, 2), (1, 3), (1, 4), (1, 5), (2, 5), (2, 7)]);
        let got = names(&segments_along(&a, &l, None, SEG));
        assert_eq!(
            got,
            vec![
                ("000000010000000000000002".into(), true),
                ("000000010000000000000003".into(), true),
                ("000000010000000000000004".into(), true),
                ("000000020000000000000005".into(), true),
                ("000000020000000000000006".into(), false),
                ("000000020000000000000007".into(), true),
            ]
        );
        // An LSN target on timeline 1 stops there; immediate at the backup's stop.
        let got = names(&segments_along(&a, &l, Some(Lsn(4 * SEG + 1)), SEG));
        assert_eq!(got.last().unwrap().0, "000000010000000000000004");
        let got = names(&segments_along(&a, &l, Some(b.stop_lsn), SEG));
        assert_eq!(got.len(), 2);
        // Its own timeline only (--target-timeline current).
        let got = names(&segments_along(&a, &legs(&b, None), None, SEG));
        assert_eq!(got.last().unwrap().0, "000000010000000000000005");
    }
}

/// One stored chunk a restore reads: (pack index, offset, stored length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Read {
    pack: u32,
    offset: u64,
    clen: u32,
}

impl Record for Read {
    const SIZE: usize = 16;
    fn encode(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.pack.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..].copy_from_slice(&self.clen.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Read {
        let mut p = [0; 4];
        p.copy_from_slice(&b[..4]);
        let mut o = [0; 8];
        o.copy_from_slice(&b[4..12]);
        let mut c = [0; 4];
        c.copy_from_slice(&b[12..16]);
        Read {
            pack: u32::from_le_bytes(p),
            offset: u64::from_le_bytes(o),
            clen: u32::from_le_bytes(c),
        }
    }
    fn key(&self) -> u64 {
        spill::spread(u64::from(self.pack))
    }
}
