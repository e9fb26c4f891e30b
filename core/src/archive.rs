//! The read side's one view of an archive: the archived WAL per timeline, the segment size, the
//! gaps, the timeline history recovery will follow, and the choice of the backup for a target.
//! `restore`, `verify`, `info`, `check` and `prefetch` all read the archive through this module,
//! so a drill judges the backup a restore would use, by the same rules.
//!
//! Invariants:
//! - One listing of `wal/` per view; the segment size comes from a stored segment's header and
//!   is accepted only as PostgreSQL allows it (a power of two in 1 MiB..=1 GiB).
//! - [`choose`] admits only backups on the history of the timeline recovery follows
//!   (`recovery_target_timeline = 'latest'`), and among them the newest that stopped at or
//!   before a target time; it never falls back to another backup.

use crate::store::Store;
use crate::target::{postgres_text, Target};
use crate::timeline::History;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use tidemark_format::manifest::ManifestHeader;
use tidemark_format::wal::{self as walfmt, WalFileName};
use tidemark_format::{keys, Lsn, TimelineId};

/// The segment size a stored WAL object's header implies, if PostgreSQL allows it.
pub fn segment_size(object_size: u64) -> Option<u64> {
    Some(object_size).filter(|s| s.is_power_of_two() && (1 << 20..=1 << 30).contains(s))
}

/// Every archived WAL file per timeline (segments, partials, history and backup history
/// files), with its stored size.
#[derive(Clone, Debug, Default)]
pub struct Archive {
    pub files: BTreeMap<u32, BTreeMap<WalFileName, u64>>,
    /// From the first stored segment's header; `None` when the archive holds no segment.
    pub seg_size: Option<u64>,
}

/// A run of missing segments on one timeline, between two present ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    pub after: WalFileName,
    pub before: WalFileName,
    pub missing: u64,
}

impl Archive {
    /// Lists `wal/` once and reads one segment header for the segment size.
    pub async fn list(store: &Store) -> Result<Archive> {
        let mut a = Archive::default();
        let mut first_segment = None;
        for l in store
            .list(keys::WAL)
            .await
            .context("cannot list archived wal")?
        {
            let Some(n) = keys::parse_wal(&l.key) else {
                continue;
            };
            if matches!(n, WalFileName::Segment { .. }) {
                first_segment.get_or_insert((l.key.clone(), l.size));
            }
            a.files.entry(n.timeline().0).or_default().insert(n, l.size);
        }
        if let Some((key, size)) = first_segment {
            let head = store
                .get_range(&key, 0..size.min(256))
                .await
                .with_context(|| format!("cannot read the header of {key}"))?;
            a.seg_size = walfmt::decode_header(&head)
                .ok()
                .and_then(|(h, _)| segment_size(h.size));
        }
        Ok(a)
    }

    /// The archived (full) segments of `tli`, in order.
    pub fn segments(&self, tli: u32) -> impl Iterator<Item = (&WalFileName, u64)> {
        self.files
            .get(&tli)
            .into_iter()
            .flatten()
            .filter(|(n, _)| matches!(n, WalFileName::Segment { .. }))
            .map(|(n, s)| (n, *s))
    }

    /// Segment numbers present on `tli` (needs the segment size).
    pub fn segment_numbers(&self, tli: u32, seg_size: u64) -> BTreeSet<u64> {
        self.segments(tli)
            .filter_map(|(n, _)| n.segment_number(seg_size))
            .collect()
    }

    /// The stored size of the archived file named `name`, if it is archived.
    pub fn size_of(&self, name: &str) -> Option<u64> {
        let n = WalFileName::parse(name).ok()?;
        self.files.get(&n.timeline().0)?.get(&n).copied()
    }

    /// The last archived segment on the highest timeline at or after `tli` that has segments.
    pub fn last_segment_from(&self, tli: u32) -> Option<WalFileName> {
        self.files
            .range(tli..)
            .rev()
            .find_map(|(t, _)| self.segments(*t).last().map(|(n, _)| *n))
    }

    /// The highest timeline with an archived `.history` file.
    pub fn newest_history(&self) -> Option<u32> {
        self.files
            .iter()
            .filter(|(_, f)| f.keys().any(|n| matches!(n, WalFileName::History { .. })))
            .map(|(t, _)| *t)
            .next_back()
    }

    /// Every run of missing segments on `tli` between its first and last archived segment.
    pub fn gaps(&self, tli: u32, seg_size: u64) -> Vec<Gap> {
        let segs: Vec<(WalFileName, u64)> = self
            .segments(tli)
            .filter_map(|(n, _)| Some((*n, n.segment_number(seg_size)?)))
            .collect();
        segs.windows(2)
            .filter(|w| w[1].1 > w[0].1 + 1)
            .map(|w| Gap {
                after: w[0].0,
                before: w[1].0,
                missing: w[1].1 - w[0].1 - 1,
            })
            .collect()
    }

    /// Names of the segments missing on `tli` from segment number `from` up to the last
    /// archived one (at most `limit` names).
    pub fn missing_from(&self, tli: u32, from: u64, seg_size: u64, limit: usize) -> Vec<String> {
        let have = self.segment_numbers(tli, seg_size);
        let Some(&last) = have.iter().next_back() else {
            return Vec::new();
        };
        (from..last)
            .filter(|n| !have.contains(n))
            .take(limit)
            .map(|n| name_of(tli, n, seg_size).to_string())
            .collect()
    }
}

/// The segment of number `n` on `tli`.
pub fn name_of(tli: u32, n: u64, seg_size: u64) -> WalFileName {
    WalFileName::segment_of(TimelineId(tli), Lsn(n * seg_size), seg_size)
}

/// The history a restore with `recovery_target_timeline = 'latest'` follows: the highest
/// timeline with a `.history` file in the archive (timeline 1 when there is none), read and
/// verified. Backups on a higher timeline than any history file (impossible for PostgreSQL)
/// make the newest backup timeline the root.
pub async fn history(
    store: &Store,
    archive: &Archive,
    backups: &[ManifestHeader],
) -> Result<History> {
    let top_backup = backups.iter().map(|b| b.timeline.0).max().unwrap_or(1);
    match archive.newest_history() {
        Some(tli) if tli >= top_backup => {
            let name = WalFileName::History { tli };
            let obj = crate::wal::get_object(store, &name).await?;
            let (_, data) = tokio::task::spawn_blocking(move || walfmt::decode(&obj))
                .await?
                .with_context(|| format!("archived {name} is damaged"))?;
            History::parse(tli, &String::from_utf8_lossy(&data))
        }
        _ => Ok(History::root(top_backup)),
    }
}

/// The backup a recovery to `target` starts from: among the backups on `history`, the newest
/// (by stop time, then stop LSN) that stopped at or before a target time, or the newest for
/// "latest". The one selection rule of restore and verify.
pub fn choose<'a>(
    backups: &'a [ManifestHeader],
    history: &History,
    target: &Target,
) -> Result<&'a ManifestHeader> {
    if backups.is_empty() {
        bail!("the repository holds no backup\nhint: take one with 'tidemark-agent backup'");
    }
    let usable: Vec<&ManifestHeader> = backups
        .iter()
        .filter(|b| history.contains(b.timeline.0, b.stop_lsn))
        .collect();
    if usable.len() < backups.len() {
        tracing::info!(
            timeline = history.tli,
            skipped = backups.len() - usable.len(),
            "skipping backups that are not on the history of the timeline recovery will follow"
        );
    }
    if usable.is_empty() {
        bail!("no backup lies on the history of timeline {} (the newest in the archive, which recovery follows)\nhint: the backups belong to abandoned timelines; take a new backup of the current primary", history.tli);
    }
    let newest = |it: &mut dyn Iterator<Item = &&'a ManifestHeader>| {
        it.max_by_key(|b| (b.stop_time_us, b.stop_lsn)).copied()
    };
    match target {
        Target::Latest => newest(&mut usable.iter()).context("no usable backup"),
        Target::Time(t) => {
            let t_us = t.timestamp_micros();
            newest(&mut usable.iter().filter(|b| b.stop_time_us <= t_us)).ok_or_else(|| {
                let oldest = usable
                    .iter()
                    .min_by_key(|b| b.stop_time_us)
                    .expect("usable is not empty");
                anyhow!(
                    "no backup finished at or before {}: the oldest backup ({}) finished at {}\nhint: choose a target time at or after {}",
                    postgres_text(t),
                    oldest.backup_id,
                    crate::repo::fmt_time(oldest.stop_time_us),
                    crate::repo::fmt_time(oldest.stop_time_us)
                )
            })
        }
    }
}

/// What a reader needs to recover to a target: the backups, the archive, the history recovery
/// follows and the chosen backup.
pub struct Selection {
    pub backups: Vec<ManifestHeader>,
    pub archive: Archive,
    pub history: History,
    pub chosen: ManifestHeader,
}

/// Lists the backups and the archive and chooses the backup for `target` ([`choose`]).
pub async fn select(store: &Store, target: &Target) -> Result<Selection> {
    let backups = crate::repo::list_backups(store).await?;
    select_among(store, backups, target).await
}

/// [`select`] over backups already listed.
pub async fn select_among(
    store: &Store,
    backups: Vec<ManifestHeader>,
    target: &Target,
) -> Result<Selection> {
    let archive = Archive::list(store).await?;
    let history = history(store, &archive, &backups).await?;
    let chosen = choose(&backups, &history, target)?.clone();
    Ok(Selection {
        backups,
        archive,
        history,
        chosen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::hdr;

    fn at(us: i64) -> Target {
        Target::Time(chrono::DateTime::from_timestamp_micros(us).unwrap().into())
    }

    fn on(id: &str, stop: i64, tli: u32, stop_lsn: u64) -> ManifestHeader {
        let mut h = hdr(id, stop);
        h.timeline = TimelineId(tli);
        h.stop_lsn = Lsn(stop_lsn);
        h
    }

    #[test]
    fn chooses_by_stop_time_among_backups_on_the_followed_history() {
        let bs = vec![
            on("a", 1_000_000, 1, 0x100),
            on("b", 2_000_000, 1, 0x200),
            // The old primary after the failover at 0x300: newest by time, abandoned branch.
            on("split", 4_000_000, 1, 0x500),
            on("c", 3_000_000, 2, 0x400),
        ];
        let h = History::parse(2, "1\t0/300\tfailover\n").unwrap();
        assert_eq!(choose(&bs, &h, &Target::Latest).unwrap().backup_id, "c");
        assert_eq!(choose(&bs, &h, &at(5_000_000)).unwrap().backup_id, "c");
        assert_eq!(choose(&bs, &h, &at(2_500_000)).unwrap().backup_id, "b");
        assert_eq!(choose(&bs, &h, &at(2_000_000)).unwrap().backup_id, "b");
        let e = choose(&bs, &h, &at(999_999)).unwrap_err().to_string();
        assert!(e.contains("oldest backup (a)"), "{e}");
        // Without the failover's history file, timeline 1's newest backup wins.
        let root = History::root(1);
        assert_eq!(
            choose(&bs[..3], &root, &Target::Latest).unwrap().backup_id,
            "split"
        );
        assert!(choose(&[], &root, &Target::Latest).is_err());
        let e = choose(&bs[2..3], &h, &Target::Latest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("abandoned"), "{e}");
    }

    #[test]
    fn gaps_and_segment_sizes() {
        let ss = 16u64 << 20;
        let mut a = Archive {
            seg_size: Some(ss),
            ..Archive::default()
        };
        for n in [1u64, 2, 5, 6, 9] {
            a.files.entry(1).or_default().insert(name_of(1, n, ss), 100);
        }
        a.files
            .entry(2)
            .or_default()
            .insert(WalFileName::History { tli: 2 }, 40);
        let g = a.gaps(1, ss);
        assert_eq!(g.len(), 2);
        assert_eq!(
            (g[0].after, g[0].before, g[0].missing),
            (name_of(1, 2, ss), name_of(1, 5, ss), 2)
        );
        assert_eq!(a.missing_from(1, 0, ss, 20).len(), 1 + 2 + 2);
        assert_eq!(
            a.missing_from(1, 5, ss, 1),
            vec![name_of(1, 7, ss).to_string()]
        );
        assert_eq!(a.newest_history(), Some(2));
        assert_eq!(segment_size(16 << 20), Some(16 << 20));
        for bad in [0, 3 << 20, 512 << 10, 2 << 30] {
            assert_eq!(segment_size(bad), None, "{bad}");
        }
    }
}
