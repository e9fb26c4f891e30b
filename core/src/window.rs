//! The WAL an archive promises, read from the archive and the backups alone: what `check` holds
//! the repository to and where `verify --random-in-window` draws its moment from.
//!
//! Invariants:
//! - Every backup promises its own WAL, start segment to stop segment on its timeline.
//! - A gap in a timeline's archived segments that starts right after the stop segment of a
//!   backup of that timeline (or the segment holding its stop LSN) and ends right before the start segment of a backup (of any
//!   timeline) is *narrowed*: `expire --retain-wal-window` leaves exactly such gaps, since it
//!   keeps an older backup's own WAL and continuous WAL from the window's first backup's start
//!   segment on every timeline (FORMAT.md 16.4). Any other gap is missing WAL.
//! - The recoverable window opens at the stop of the oldest backup whose timeline has no gap from
//!   its start segment to that timeline's last archived segment ([`pitr_from`]); backups older
//!   than that restore to their consistency point only.
//! - Nothing in the repository records the window: a loss of exactly the WAL between one
//!   backup's stop segment and a later backup's start segment reads as a narrowing. It still
//!   shows, in `info`'s reach of the older backup ("its consistency point only").

use crate::archive::{Archive, Gap};
use tidemark_format::manifest::ManifestHeader;

/// The segment number of `lsn`'s segment, and of the segment holding the byte before `stop`
/// (PostgreSQL's stop segment), never before the start segment.
fn start_stop(h: &ManifestHeader, seg_size: u64) -> (u64, u64) {
    let start = h.start_lsn.0 / seg_size;
    (
        start,
        (h.stop_lsn.0.saturating_sub(1) / seg_size).max(start),
    )
}

/// Whether `gap` on timeline `tli` is one a WAL window leaves on purpose (see the module
/// invariants).
pub fn narrowed(gap: &Gap, tli: u32, backups: &[ManifestHeader], seg_size: u64) -> bool {
    let (Some(after), Some(before)) = (
        gap.after.segment_number(seg_size),
        gap.before.segment_number(seg_size),
    ) else {
        return false;
    };
    // The planner keeps through the segment holding the stop LSN, which is the next one when
    // the stop LSN falls on a segment boundary.
    let ends_own_wal = backups.iter().any(|h| {
        h.timeline.0 == tli
            && (start_stop(h, seg_size).1 == after || h.stop_lsn.0 / seg_size == after)
    });
    let starts_kept_wal = backups.iter().any(|h| start_stop(h, seg_size).0 == before);
    ends_own_wal && starts_kept_wal
}

/// The first gap on `h`'s timeline that misses a segment after its stop segment (a gap that
/// begins inside the backup's own WAL and runs past it included), if any.
pub fn first_gap_after(archive: &Archive, h: &ManifestHeader, seg_size: u64) -> Option<Gap> {
    let stop = start_stop(h, seg_size).1;
    archive.gaps(h.timeline.0, seg_size).into_iter().find(|g| {
        g.before
            .segment_number(seg_size)
            .is_some_and(|b| b > stop + 1)
    })
}

/// The first segment after `h`'s stop segment that `gap` misses.
pub fn first_missing_after(gap: &Gap, h: &ManifestHeader, seg_size: u64) -> Option<u64> {
    let stop = start_stop(h, seg_size).1;
    Some(gap.after.segment_number(seg_size)?.max(stop) + 1)
}

/// Whether `h`'s timeline holds every segment from its start segment to that timeline's last
/// archived segment (at least its stop segment).
fn continuous_to_end(archive: &Archive, h: &ManifestHeader, seg_size: u64) -> bool {
    let (start, stop) = start_stop(h, seg_size);
    let have = archive.segment_numbers(h.timeline.0, seg_size);
    let Some(&last) = have.iter().next_back() else {
        return false;
    };
    last >= stop && (start..=last).all(|n| have.contains(&n))
}

/// The stop time (µs) the recoverable window opens at: the oldest among the backups whose WAL is
/// continuous from their start to the end of their timeline's archive; `None` when no backup's
/// is (or no segment is archived).
pub fn pitr_from(archive: &Archive, backups: &[ManifestHeader]) -> Option<i64> {
    let seg_size = archive.seg_size?;
    backups
        .iter()
        .filter(|h| continuous_to_end(archive, h, seg_size))
        .map(|h| h.stop_time_us)
        .min()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tidemark_format::{Lsn, TimelineId};

    use crate::test_support::{archive, SEG};

    /// A backup on `tli` from segment `start` to the middle of segment `stop`, stopped at `t`.
    fn backup(id: &str, tli: u32, start: u64, stop: u64, t: i64) -> ManifestHeader {
        let mut h = crate::test_support::hdr(id, t);
        h.timeline = TimelineId(tli);
        h.start_lsn = Lsn(start * SEG + 40);
        h.stop_lsn = Lsn(stop * SEG + 100);
        h
    }

    fn tl1(segs: &[u64]) -> Archive {
        archive(&segs.iter().map(|&n| (1, n)).collect::<Vec<_>>())
    }

    #[test]
    fn gaps_between_a_stop_and_a_later_start_are_narrowed_and_others_are_not() {
        // b1 owns 2..=3, b2 owns 6..=7 and the window runs from b2 on.
        let backups = [backup("b1", 1, 2, 3, 10), backup("b2", 1, 6, 7, 20)];
        for (segs, narrowed_gap, pitr) in [
            // The window leaves 4..=5 out: narrowed; PITR from b2.
            (&[2, 3, 6, 7, 8, 9][..], Some(true), Some(20)),
            // No window: everything continuous, PITR from b1.
            (&[2, 3, 4, 5, 6, 7, 8][..], None, Some(10)),
            // 5 lost: 4 ends no backup's WAL.
            (&[2, 3, 4, 6, 7, 8][..], Some(false), Some(20)),
            // 4 lost: 5 starts no backup's WAL.
            (&[2, 3, 5, 6, 7][..], Some(false), Some(20)),
            // 9 lost after b2: not narrowed, and no backup reaches the end.
            (&[2, 3, 4, 5, 6, 7, 8, 10][..], Some(false), None),
        ] {
            let a = tl1(segs);
            let g = first_gap_after(&a, &backups[0], SEG);
            assert_eq!(
                g.as_ref().map(|g| narrowed(g, 1, &backups, SEG)),
                narrowed_gap,
                "{segs:?}: {g:?}"
            );
            assert_eq!(pitr_from(&a, &backups), pitr, "{segs:?}");
        }
        let a = tl1(&[2, 3, 4, 5, 6, 7, 8, 10]);
        let g = first_gap_after(&a, &backups[1], SEG).unwrap();
        assert_eq!(g.missing, 1);
        assert!(!narrowed(&g, 1, &backups, SEG));
        // The window's WAL starts at a backup of another timeline: still narrowed.
        let backups = [backup("b1", 1, 2, 3, 10), backup("b2", 2, 6, 7, 20)];
        let a = archive(&[(1, 2), (1, 3), (1, 6), (2, 6), (2, 7)]);
        let g = first_gap_after(&a, &backups[0], SEG).unwrap();
        assert!(narrowed(&g, 1, &backups, SEG));
        assert!(!narrowed(&g, 2, &backups, SEG));
        assert_eq!(pitr_from(&Archive::default(), &backups), None);
    }
}
