//! Over 500 lines because it is the one read-side view on purpose (issue 12): listing, gaps,
//! timeline history and backup choice used to drift as separate copies.
//!
//! The read side's one view of an archive: the archived WAL per timeline, the segment size, the
//! gaps, the timeline history recovery will follow, and the choice of the backup for a target.
//! `restore`, `verify`, `info`, `check` and `prefetch` all read the archive through this module,
//! so a drill judges the backup a restore would use, by the same rules.
//!
//! Invariants:
//! - One listing of `wal/` per view; the segment size comes from a stored segment's header and
//!   is accepted only as PostgreSQL allows it (a power of two in 1 MiB..=1 GiB).
//! - [`choose`] admits only backups on the history of the timeline recovery follows
//!   (`recovery_target_timeline`, 'latest' by default), and among them the newest that can
//!   reach the target (stopped at or before a target time or LSN); a backup forced by id is
//!   refused when it cannot; it never falls back to another backup.

use crate::store::Store;
use crate::target::{postgres_text, Target, TimelineTarget};
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
    /// When each segment was stored, where the store says (for reports: the time a recoverable
    /// window's last segment was archived); never used to choose anything.
    pub archived_us: BTreeMap<WalFileName, i64>,
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
                if let Some(us) = l.modified_us {
                    a.archived_us.insert(n, us);
                }
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
        Some(tli) if tli >= top_backup => read_history(store, tli).await,
        _ => Ok(History::root(top_backup)),
    }
}

/// The archived history of timeline `tli` (timeline 1 has none: it is the root).
pub async fn read_history(store: &Store, tli: u32) -> Result<History> {
    if tli == 1 {
        return Ok(History::root(1));
    }
    let name = WalFileName::History { tli };
    let obj = crate::wal::get_object(store, &name)
        .await
        .with_context(|| format!("cannot read {name}, the history of timeline {tli}\nhint: recovery can follow only a timeline whose history file is archived; see 'tidemark-agent info' for the timelines the archive holds"))?;
    let (_, data) = tokio::task::spawn_blocking(move || walfmt::decode(&obj))
        .await?
        .with_context(|| format!("archived {name} is damaged"))?;
    History::parse(tli, &String::from_utf8_lossy(&data))
}

/// The history recovery follows for `--target-timeline`: `None` for `current` (each backup's
/// own timeline, never a later branch).
pub async fn followed(
    store: &Store,
    archive: &Archive,
    backups: &[ManifestHeader],
    timeline: TimelineTarget,
) -> Result<Option<History>> {
    match timeline {
        TimelineTarget::Latest => history(store, archive, backups).await.map(Some),
        TimelineTarget::Current => Ok(None),
        TimelineTarget::Id(tli) => read_history(store, tli).await.map(Some),
    }
}

/// The backup a recovery to `target` starts from. The one selection rule of restore and
/// verify:
///
/// - only backups on `history` (the timeline recovery follows) are candidates; with `None`
///   (`--target-timeline current`) every backup is, as recovery stays on its own timeline;
/// - a time target: the newest that stopped at or before the time;
/// - an LSN target: the newest (by stop LSN) that stopped at or before the LSN;
/// - latest, immediate, xid and name targets: the newest. Where an xid committed or a restore
///   point was created is not known before replay, so (as pgBackRest does) the newest backup is
///   used and PostgreSQL refuses to promote if replay never meets the point ("recovery ended
///   before configured recovery target was reached"); `--backup` then names an older one;
/// - `forced` (`--backup ID`) is used as is if it is a candidate and can reach the target, and
///   refused otherwise; there is never a fallback to another backup.
pub fn choose<'a>(
    backups: &'a [ManifestHeader],
    history: Option<&History>,
    target: &Target,
    forced: Option<&str>,
) -> Result<&'a ManifestHeader> {
    if backups.is_empty() {
        bail!("the repository holds no backup\nhint: take one with 'tidemark-agent backup'");
    }
    let usable: Vec<&ManifestHeader> = backups
        .iter()
        .filter(|b| history.is_none_or(|h| h.contains(b.timeline.0, b.stop_lsn)))
        .collect();
    if usable.len() < backups.len() {
        tracing::info!(
            timeline = history.map(|h| h.tli),
            skipped = backups.len() - usable.len(),
            "skipping backups that are not on the history of the timeline recovery will follow"
        );
    }
    if let Some(id) = forced {
        return forced_backup(backups, &usable, history, target, id);
    }
    let Some(h) = history.filter(|_| usable.is_empty()) else {
        return newest_reaching(&usable, target);
    };
    bail!("no backup lies on the history of timeline {} (the timeline recovery follows)\nhint: the backups belong to other (abandoned) timelines; take a new backup of the current primary, or pick the timeline with --target-timeline", h.tli)
}

/// Whether backup `b` can recover to `target`: `Err` says why not.
fn reaches(b: &ManifestHeader, target: &Target) -> std::result::Result<(), String> {
    match target {
        Target::Time(t) if b.stop_time_us > t.timestamp_micros() => Err(format!(
            "it finished at {}, after the target time {}",
            crate::repo::fmt_time(b.stop_time_us),
            postgres_text(t)
        )),
        Target::Lsn(l) if b.stop_lsn > *l => Err(format!(
            "it stopped at LSN {}, after the target LSN {l} (recovery cannot stop before a backup is consistent)",
            b.stop_lsn
        )),
        _ => Ok(()),
    }
}

fn newest_reaching<'a>(
    usable: &[&'a ManifestHeader],
    target: &Target,
) -> Result<&'a ManifestHeader> {
    let reaching = usable.iter().filter(|b| reaches(b, target).is_ok());
    let found = match target {
        Target::Lsn(_) => reaching.max_by_key(|b| (b.stop_lsn, b.stop_time_us)),
        _ => reaching.max_by_key(|b| (b.stop_time_us, b.stop_lsn)),
    };
    if let Some(b) = found {
        return Ok(*b);
    }
    match target {
        Target::Time(t) => {
            let oldest = usable
                .iter()
                .min_by_key(|b| b.stop_time_us)
                .context("no usable backup")?;
            bail!(
                "no backup finished at or before {}: the oldest backup ({}) finished at {}\nhint: choose a target time at or after {}",
                postgres_text(t),
                oldest.backup_id,
                crate::repo::fmt_time(oldest.stop_time_us),
                crate::repo::fmt_time(oldest.stop_time_us)
            )
        }
        Target::Lsn(l) => {
            let oldest = usable
                .iter()
                .min_by_key(|b| b.stop_lsn)
                .context("no usable backup")?;
            bail!(
                "no backup can reach target LSN {l}: the oldest backup ({}) stopped at LSN {}\nhint: choose a target LSN at or after {} (a recovery cannot stop before its backup is consistent)",
                oldest.backup_id,
                oldest.stop_lsn,
                oldest.stop_lsn
            )
        }
        _ => bail!("no usable backup"),
    }
}

fn forced_backup<'a>(
    backups: &'a [ManifestHeader],
    usable: &[&'a ManifestHeader],
    history: Option<&History>,
    target: &Target,
    id: &str,
) -> Result<&'a ManifestHeader> {
    let Some(b) = backups.iter().find(|b| b.backup_id == id) else {
        let mut ids: Vec<&str> = backups.iter().map(|b| b.backup_id.as_str()).collect();
        ids.sort_unstable();
        bail!(
            "backup {id} is not in the repository\nhint: the backups are: {} (see 'tidemark-agent info')",
            ids.join(", ")
        );
    };
    if !usable.iter().any(|u| std::ptr::eq(*u, b)) {
        let tli = history.map_or(b.timeline.0, |h| h.tli);
        bail!(
            "backup {id} (timeline {}, stopped at LSN {}) is not on the history of timeline {tli}, which recovery follows\nhint: choose a backup of that history, or follow the backup's own timeline with --target-timeline current",
            b.timeline.0,
            b.stop_lsn
        );
    }
    reaches(b, target).map_err(|why| {
        anyhow!(
            "backup {id} cannot reach target {}: {why}\nhint: give an older backup to --backup, or leave --backup out to let restore choose",
            target.describe()
        )
    })?;
    Ok(b)
}

/// What a reader needs to recover to a target: the backups, the archive, the history recovery
/// follows (`None`: each backup's own timeline, `--target-timeline current`) and the chosen
/// backup.
pub struct Selection {
    pub backups: Vec<ManifestHeader>,
    pub archive: Archive,
    pub history: Option<History>,
    pub chosen: ManifestHeader,
}

/// Which backup to look for: the target, the timeline recovery follows, a backup forced by id.
#[derive(Clone, Debug)]
pub struct Want {
    pub target: Target,
    pub timeline: TimelineTarget,
    pub backup: Option<String>,
}

impl Want {
    /// The newest backup that reaches `target` on the latest timeline.
    pub fn target(target: Target) -> Want {
        Want {
            target,
            timeline: TimelineTarget::Latest,
            backup: None,
        }
    }
}

/// Lists the backups and the archive and chooses the backup for `want` ([`choose`]).
pub async fn select(store: &Store, want: &Want) -> Result<Selection> {
    let backups = crate::repo::list_backups(store).await?;
    select_among(store, backups, want).await
}

/// [`select`] over backups already listed.
pub async fn select_among(
    store: &Store,
    backups: Vec<ManifestHeader>,
    want: &Want,
) -> Result<Selection> {
    let archive = Archive::list(store).await?;
    let history = followed(store, &archive, &backups, want.timeline).await?;
    let chosen = choose(
        &backups,
        history.as_ref(),
        &want.target,
        want.backup.as_deref(),
    )?
    .clone();
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

    /// Backups a and b on timeline 1, a failover to timeline 2 at 0/300, c on timeline 2, and
    /// "split": the old primary's backup after the failover, newest by time, on the abandoned
    /// branch.
    fn failover() -> (Vec<ManifestHeader>, History) {
        let bs = vec![
            on("a", 1_000_000, 1, 0x100),
            on("b", 2_000_000, 1, 0x200),
            on("split", 4_000_000, 1, 0x500),
            on("c", 3_000_000, 2, 0x400),
        ];
        let h = History::parse(2, "1\t0/300\tfailover\n").unwrap();
        (bs, h)
    }

    fn pick(bs: &[ManifestHeader], h: &History, t: &Target) -> Result<String> {
        choose(bs, Some(h), t, None).map(|b| b.backup_id.clone())
    }

    #[test]
    fn chooses_by_stop_time_among_backups_on_the_followed_history() {
        let (bs, h) = failover();
        assert_eq!(pick(&bs, &h, &Target::Latest).unwrap(), "c");
        assert_eq!(pick(&bs, &h, &at(5_000_000)).unwrap(), "c");
        assert_eq!(pick(&bs, &h, &at(2_500_000)).unwrap(), "b");
        assert_eq!(pick(&bs, &h, &at(2_000_000)).unwrap(), "b");
        let e = pick(&bs, &h, &at(999_999)).unwrap_err().to_string();
        assert!(e.contains("oldest backup (a)"), "{e}");
        // Without the failover's history file, timeline 1's newest backup wins.
        let root = History::root(1);
        assert_eq!(pick(&bs[..3], &root, &Target::Latest).unwrap(), "split");
        assert!(pick(&[], &root, &Target::Latest).is_err());
        let e = pick(&bs[2..3], &h, &Target::Latest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("abandoned"), "{e}");
        // --target-timeline current: every backup, each on its own timeline.
        assert_eq!(
            choose(&bs, None, &Target::Latest, None).unwrap().backup_id,
            "split"
        );
    }

    #[test]
    fn lsn_xid_name_and_immediate_targets() {
        let (bs, h) = failover();
        let lsn = |l: u64| Target::Lsn(Lsn(l));
        // The newest backup that stopped at or before the LSN, on the followed history only
        // ("split" stopped at 0/500 on the abandoned branch).
        assert_eq!(pick(&bs, &h, &lsn(0x600)).unwrap(), "c");
        assert_eq!(pick(&bs, &h, &lsn(0x400)).unwrap(), "c");
        assert_eq!(pick(&bs, &h, &lsn(0x3ff)).unwrap(), "b");
        assert_eq!(pick(&bs, &h, &lsn(0x100)).unwrap(), "a");
        let e = pick(&bs, &h, &lsn(0xff)).unwrap_err().to_string();
        assert!(
            e.contains("no backup can reach target LSN 0/FF")
                && e.contains("(a) stopped at LSN 0/100"),
            "{e}"
        );
        assert!(e.contains("hint:"), "{e}");
        // Where an xid or a restore point lies is unknown: the newest backup.
        for t in [
            Target::Immediate,
            Target::Xid(742),
            Target::Name("before-migration".into()),
        ] {
            assert_eq!(pick(&bs, &h, &t).unwrap(), "c", "{t:?}");
        }
    }

    #[test]
    fn a_forced_backup_is_used_only_if_it_can_reach_the_target() {
        let bs = vec![
            on("a", 1_000_000, 1, 0x100),
            on("b", 2_000_000, 1, 0x200),
            on("split", 4_000_000, 1, 0x500),
            on("c", 3_000_000, 2, 0x400),
        ];
        let h = History::parse(2, "1\t0/300\tfailover\n").unwrap();
        let force =
            |t: &Target, id: &str| choose(&bs, Some(&h), t, Some(id)).map(|b| b.backup_id.clone());
        assert_eq!(force(&Target::Xid(742), "a").unwrap(), "a");
        assert_eq!(force(&Target::Name("p".into()), "b").unwrap(), "b");
        assert_eq!(force(&Target::Lsn(Lsn(0x250)), "a").unwrap(), "a");
        assert_eq!(force(&at(2_000_000), "b").unwrap(), "b");
        let e = force(&Target::Lsn(Lsn(0x150)), "b")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backup b cannot reach target lsn 0/150")
                && e.contains("after the target LSN"),
            "{e}"
        );
        let e = force(&at(1_500_000), "c").unwrap_err().to_string();
        assert!(
            e.contains("backup c cannot reach") && e.contains("after the target time"),
            "{e}"
        );
        let e = force(&Target::Latest, "split").unwrap_err().to_string();
        assert!(e.contains("not on the history of timeline 2"), "{e}");
        let e = force(&Target::Latest, "nope").unwrap_err().to_string();
        assert!(
            e.contains("backup nope is not in the repository") && e.contains("a, b, c, split"),
            "{e}"
        );
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
