//! Over 500 lines because the text and JSON overviews print the same facts (systems, backups,
//! reach, WAL per timeline) and must not drift apart.
//!
//! The repository overview an on-call engineer needs: backups and the archived WAL per timeline.

use crate::repo;
use crate::store::Store;
use anyhow::Result;
use serde::Serialize;
use tidemark_format::keys;
use tidemark_format::wal::WalFileName;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Serialize)]
pub struct Info {
    pub schema_version: u32,
    pub repo: String,
    pub system_id: String,
    /// PostgreSQL major of this system's backups and WAL (its cluster record; else its newest
    /// backup's); `None` when nothing tells.
    pub pg_major: Option<u32>,
    pub backups: Vec<BackupInfo>,
    pub wal: Vec<TimelineWal>,
    /// Per timeline with backups: the spans of time a restore can reach.
    pub recoverable: Vec<Window>,
    pub space: Space,
    /// The newest restore drill recorded by `tidemark-restore verify --record`.
    pub last_verified_restore: Option<crate::verify::RecordSummary>,
    /// The newest run of `expire` recorded in the repository (FORMAT.md 8.8).
    pub last_expire: Option<crate::expire::ExpireSummary>,
    /// The repository's other database systems (before a major upgrade), oldest first, each
    /// described the same way; restore them with `--system-id`.
    pub other_systems: Vec<Info>,
}

/// "Any time from `from` to the end of WAL segment `to_segment`" on `timeline`.
#[derive(Serialize)]
pub struct Window {
    pub timeline: u32,
    /// Stop time of the oldest backup that starts this window.
    pub from: String,
    pub from_backup: String,
    /// The last archived segment reachable without a gap (targets up to the last commit in it).
    pub to_segment: String,
    /// When `to_segment` was archived (the store's time of the object), if the store says: the
    /// window reaches no later than this.
    pub to_archived_at: Option<String>,
}

/// How much of the repository [`collect_with`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// Listings, manifest headers and the newest drill and expire records only (what the
    /// metrics refresh reads every few minutes): the pack accounting that needs every manifest's
    /// pack table (`unreferenced_*`, `garbage_in_referenced_pack_bytes`,
    /// `mostly_garbage_packs`) is left at 0.
    Headers,
    /// Everything, reading every manifest fully (`info`).
    Full,
}

#[derive(Serialize, Default)]
pub struct Space {
    /// Bytes of every pack, WAL object and manifest.
    pub repository_bytes: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    pub wal_bytes: u64,
    pub manifest_bytes: u64,
    /// Sum of the backups' logical sizes divided by the bytes of all packs.
    pub dedup_ratio: Option<f64>,
    /// Packs no manifest references: what the next `expire` frees (after `--gc-grace`) whatever
    /// its policy. `expire --dry-run` reports what a given policy frees on top.
    pub unreferenced_packs: u64,
    pub unreferenced_pack_bytes: u64,
    /// Bytes inside referenced packs that no backup uses: what repacking can reclaim.
    pub garbage_in_referenced_pack_bytes: u64,
    /// Referenced packs at least half garbage (expire's default repack threshold).
    pub mostly_garbage_packs: u64,
}

#[derive(Serialize)]
pub struct BackupInfo {
    pub id: String,
    pub timeline: u32,
    pub start_time: String,
    pub stop_time: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    /// PostgreSQL's server_version_num when the backup was taken.
    pub pg_version: u32,
    pub parent: Option<String>,
    pub logical_bytes: u64,
    /// From its start to its stop time (the WAL wait after the stop not included).
    pub duration_seconds: f64,
    pub new_chunk_bytes: u64,
    pub new_stored_bytes: u64,
    pub new_objects: u64,
    pub new_chunks: u64,
    pub reused_chunks: u64,
    /// "pgdata" or "replication".
    pub source: &'static str,
    pub from_standby: bool,
    /// Tablespaces of the backup's tablespace map.
    pub tablespaces: Vec<TablespaceInfo>,
    /// What a restore of this backup can reach with the WAL archived now.
    pub reach: Reach,
}

/// What one backup can reach, from the archived segments of its own timeline (the facts
/// `expire --retain-wal-window` narrows to: a backup's own WAL is its start to its stop segment).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    /// `point_in_time`: any moment from its stop to the last commit in `to_segment` (the end of
    /// the continuous WAL after it on its timeline); `consistency_point`: only its consistency
    /// point (its WAL ends with its stop segment); `missing_wal`: not restorable, `missing` is a
    /// segment of its own start..stop WAL that is not archived; `unknown`: no segment archived.
    pub kind: &'static str,
    pub to_segment: Option<String>,
    pub missing: Option<String>,
}

impl Reach {
    /// One sentence for the text output.
    pub fn describe(&self) -> String {
        match (self.kind, &self.to_segment, &self.missing) {
            ("point_in_time", Some(to), _) => {
                format!("point in time from its stop to the last commit in segment {to}")
            }
            ("consistency_point", _, _) => "its consistency point only".into(),
            ("missing_wal", _, Some(m)) => {
                format!("NOT restorable: its WAL segment {m} is not archived")
            }
            _ => "unknown: no WAL segment archived".into(),
        }
    }
}

/// What a backup on `tli` from `start_lsn` to `stop_lsn` can reach with `archive`'s segments.
pub fn reach(archive: &crate::archive::Archive, tli: u32, start_lsn: u64, stop_lsn: u64) -> Reach {
    let Some(ss) = archive.seg_size else {
        return Reach {
            kind: "unknown",
            to_segment: None,
            missing: None,
        };
    };
    let have = archive.segment_numbers(tli, ss);
    let name = |n: u64| crate::archive::name_of(tli, n, ss).to_string();
    let start = start_lsn / ss;
    // The segment holding the last byte before the stop LSN (PostgreSQL's stop segment).
    let stop = (stop_lsn.saturating_sub(1) / ss).max(start);
    if let Some(m) = (start..=stop).find(|n| !have.contains(n)) {
        return Reach {
            kind: "missing_wal",
            to_segment: None,
            missing: Some(name(m)),
        };
    }
    let mut last = stop;
    while have.contains(&(last + 1)) {
        last += 1;
    }
    Reach {
        kind: if last == stop {
            "consistency_point"
        } else {
            "point_in_time"
        },
        to_segment: Some(name(last)),
        missing: None,
    }
}

#[derive(Serialize)]
pub struct TablespaceInfo {
    pub oid: String,
    /// The original location (restore puts it there unless `--tablespace-map` says otherwise).
    pub location: String,
}

#[derive(Serialize)]
pub struct TimelineWal {
    pub timeline: u32,
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    pub segments: u64,
    pub gaps: Vec<Gap>,
    pub history_file: bool,
    pub partial: Vec<String>,
    pub stored_bytes: u64,
}

#[derive(Serialize)]
pub struct Gap {
    /// Last segment present before the gap.
    pub after: String,
    /// First segment present after the gap.
    pub before: String,
    pub missing_segments: u64,
    /// Left out on purpose by `expire --retain-wal-window` (from a backup's stop segment to a
    /// backup's start segment, `window::narrowed`); `check` reports only the other gaps.
    pub narrowed: bool,
}

/// Every database system of the repository: the newest one at the top level, the others in
/// `other_systems`.
pub async fn collect_all(root: &Store) -> Result<Info> {
    collect_all_with(root, Depth::Full).await
}

/// [`collect_all`], reading as much as `depth` says.
pub async fn collect_all_with(root: &Store, depth: Depth) -> Result<Info> {
    let systems = repo::systems(root).await?;
    let newest = repo::select_system(root, None).await?;
    let mut top = collect_with(&newest.store, newest.pg_major, depth).await?;
    for s in systems.iter().filter(|s| s.system_id != newest.system_id) {
        top.other_systems
            .push(collect_with(&s.store, s.pg_major, depth).await?);
    }
    Ok(top)
}

/// One database system (one top-level or nested repository); `pg_major` from its cluster record.
pub async fn collect(store: &Store, pg_major: Option<u32>) -> Result<Info> {
    collect_with(store, pg_major, Depth::Full).await
}

/// [`collect`], reading as much as `depth` says.
pub async fn collect_with(store: &Store, pg_major: Option<u32>, depth: Depth) -> Result<Info> {
    let cfg = repo::require_config(store).await?;
    let headers = repo::list_backups(store).await?;
    let mut referenced = std::collections::HashSet::new();
    let mut live = crate::repack::LiveSet::new(
        crate::check::announced_refs(&headers),
        crate::spill::budget()?,
    );
    if depth == Depth::Full {
        // Each manifest through a local copy and its references through scratch partitions:
        // memory does not grow with the repository (issue 16).
        for h in &headers {
            let m = crate::manifest_file::LocalManifest::load(store, &h.backup_id).await?;
            let (back, m) = live.add_local_blocking(m).await?;
            live = back;
            referenced.extend(m.packs.iter().copied());
        }
    }
    let live = live.live_bytes();
    let mut space = Space::default();
    for l in store.list(keys::PACKS).await? {
        let Some(p) = keys::parse_pack(&l.key) else {
            continue;
        };
        space.packs += 1;
        space.pack_bytes += l.size;
        if depth == Depth::Headers {
            continue;
        }
        if !referenced.contains(&p) {
            space.unreferenced_packs += 1;
            space.unreferenced_pack_bytes += l.size;
        } else if let Some(&used) = live.get(&p) {
            let garbage = l.size.saturating_sub(used);
            space.garbage_in_referenced_pack_bytes += garbage;
            if garbage * 2 >= l.size {
                space.mostly_garbage_packs += 1;
            }
        }
    }
    for l in store.list(keys::BACKUPS).await? {
        space.manifest_bytes += l.size;
    }
    let logical: u64 = headers.iter().map(|h| h.stats.logical_bytes).sum();
    space.dedup_ratio = (space.pack_bytes > 0).then(|| logical as f64 / space.pack_bytes as f64);
    let starts: Vec<(u32, u64, i64, String)> = headers
        .iter()
        .map(|h| {
            (
                h.timeline.0,
                h.start_lsn.0,
                h.stop_time_us,
                h.backup_id.clone(),
            )
        })
        .collect();
    let backup_major = headers.iter().map(|h| h.pg_version / 10000).max();
    let archive = crate::archive::Archive::list(store).await?;
    let backups = headers
        .iter()
        .cloned()
        .map(|h| BackupInfo {
            reach: reach(&archive, h.timeline.0, h.start_lsn.0, h.stop_lsn.0),
            id: h.backup_id,
            timeline: h.timeline.0,
            start_time: repo::fmt_time(h.start_time_us),
            stop_time: repo::fmt_time(h.stop_time_us),
            start_lsn: h.start_lsn.to_string(),
            stop_lsn: h.stop_lsn.to_string(),
            pg_version: h.pg_version,
            parent: h.parent,
            logical_bytes: h.stats.logical_bytes,
            duration_seconds: (h.stop_time_us - h.start_time_us).max(0) as f64 / 1e6,
            new_chunk_bytes: h.stats.new_chunk_bytes,
            new_stored_bytes: h.stats.new_stored_bytes,
            new_objects: h.stats.new_objects,
            new_chunks: h.stats.new_chunks,
            reused_chunks: h.stats.reused_chunks,
            source: if h.source == tidemark_format::manifest::SOURCE_REPLICATION {
                "replication"
            } else {
                "pgdata"
            },
            from_standby: h.flags & tidemark_format::manifest::FLAG_FROM_STANDBY != 0,
            tablespaces: h
                .tablespace_map
                .as_deref()
                .and_then(|m| crate::tablespace::parse_map(m).ok())
                .unwrap_or_default()
                .into_iter()
                .map(|(oid, location)| TablespaceInfo { oid, location })
                .collect(),
        })
        .collect();
    let mut wal = Vec::new();
    let mut recoverable = Vec::new();
    for (&tl, files) in &archive.files {
        let segs: Vec<&WalFileName> = archive.segments(tl).map(|(n, _)| n).collect();
        let mut gaps = Vec::new();
        if let Some(ss) = archive.seg_size {
            recoverable.extend(windows(tl, &segs, &starts, ss, &archive.archived_us));
            gaps = archive
                .gaps(tl, ss)
                .into_iter()
                .map(|g| Gap {
                    narrowed: crate::window::narrowed(&g, tl, &headers, ss),
                    after: g.after.to_string(),
                    before: g.before.to_string(),
                    missing_segments: g.missing,
                })
                .collect();
        }
        wal.push(TimelineWal {
            timeline: tl,
            first_segment: segs.first().map(|s| s.to_string()),
            last_segment: segs.last().map(|s| s.to_string()),
            segments: segs.len() as u64,
            gaps,
            history_file: files
                .keys()
                .any(|n| matches!(n, WalFileName::History { .. })),
            partial: files
                .keys()
                .filter(|n| matches!(n, WalFileName::Partial { .. }))
                .map(|n| n.to_string())
                .collect(),
            stored_bytes: files.values().sum(),
        });
    }
    space.wal_bytes = wal.iter().map(|t| t.stored_bytes).sum();
    space.repository_bytes = space.pack_bytes + space.wal_bytes + space.manifest_bytes;
    Ok(Info {
        schema_version: SCHEMA_VERSION,
        repo: store.url().to_string(),
        system_id: cfg.system_id.to_string(),
        pg_major: pg_major.or(backup_major),
        backups,
        wal,
        recoverable,
        space,
        last_verified_restore: crate::verify::last_recorded(store).await?,
        last_expire: crate::expire::last_recorded(store).await?,
        other_systems: Vec::new(),
    })
}

/// The recoverable windows of one timeline: for each run of consecutive archived segments, the
/// oldest backup of this timeline whose WAL starts inside the run opens a window that lasts to
/// the run's last segment.
fn windows(
    tl: u32,
    segs: &[&WalFileName],
    backups: &[(u32, u64, i64, String)],
    seg_size: u64,
    archived_us: &std::collections::BTreeMap<WalFileName, i64>,
) -> Vec<Window> {
    let mut runs: Vec<(u64, u64, WalFileName)> = Vec::new();
    for &&n in segs {
        let Some(no) = n.segment_number(seg_size) else {
            continue;
        };
        match runs.last_mut() {
            Some(r) if no == r.1 + 1 => {
                r.1 = no;
                r.2 = n;
            }
            _ => runs.push((no, no, n)),
        }
    }
    let mut out = Vec::new();
    for (first, last, last_name) in runs {
        let oldest = backups
            .iter()
            .filter(|(t, start, _, _)| *t == tl && (first..=last).contains(&(start / seg_size)))
            .min_by_key(|(_, _, stop, _)| *stop);
        if let Some((_, _, stop, id)) = oldest {
            out.push(Window {
                timeline: tl,
                from: repo::fmt_time(*stop),
                from_backup: id.clone(),
                to_segment: last_name.to_string(),
                to_archived_at: archived_us.get(&last_name).map(|&us| repo::fmt_time(us)),
            });
        }
    }
    out
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Human-readable rendering.
pub fn render(info: &Info) -> String {
    let mut s = render_system(info);
    for o in &info.other_systems {
        s += &format!(
            "\nearlier database system of this repository (restore it with --system-id {}):\n",
            o.system_id
        );
        s += &render_system(o);
    }
    s
}

fn render_system(info: &Info) -> String {
    let mut s = format!(
        "repository {} (database system {}, PostgreSQL {})\n\nbackups:\n",
        info.repo,
        info.system_id,
        info.pg_major.map_or("?".to_string(), |m| m.to_string())
    );
    if info.backups.is_empty() {
        s += "  none\n";
    }
    for b in &info.backups {
        s += &format!(
            "  {}  timeline {}  start {} ({})  stop {} ({})  from {}{}\n      size {}, stored anew {} in {} objects ({} new chunks, {} reused){}{}\n      reaches: {}\n",
            b.id,
            b.timeline,
            b.start_time,
            b.start_lsn,
            b.stop_time,
            b.stop_lsn,
            b.source,
            if b.from_standby { " (standby)" } else { "" },
            human(b.logical_bytes),
            human(b.new_stored_bytes),
            b.new_objects,
            b.new_chunks,
            b.reused_chunks,
            b.parent.as_ref().map(|p| format!(", parent {p}")).unwrap_or_default(),
            b.tablespaces
                .iter()
                .map(|t| format!("\n      tablespace {} at {}", t.oid, t.location))
                .collect::<String>(),
            b.reach.describe()
        );
    }
    s += "\nrecoverable:\n";
    if info.recoverable.is_empty() {
        s += "  nothing: no backup has its WAL archived\n";
    }
    for w in &info.recoverable {
        s += &format!(
            "  timeline {}: any time from {} (backup {}) to the last commit in segment {}{}\n",
            w.timeline,
            w.from,
            w.from_backup,
            w.to_segment,
            w.to_archived_at
                .as_ref()
                .map(|t| format!(" (archived {t})"))
                .unwrap_or_default()
        );
    }
    let sp = &info.space;
    s += &format!(
        "\nspace: {} in total ({} packs {}, WAL {}, manifests {}); dedup ratio {}; {} in {} unreferenced packs that expire frees; {} unused inside referenced packs ({} at least half unused, which expire repacks)\n",
        human(sp.repository_bytes),
        sp.packs,
        human(sp.pack_bytes),
        human(sp.wal_bytes),
        human(sp.manifest_bytes),
        sp.dedup_ratio.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into()),
        human(sp.unreferenced_pack_bytes),
        sp.unreferenced_packs,
        human(sp.garbage_in_referenced_pack_bytes),
        sp.mostly_garbage_packs
    );
    s += "\nwal:\n";
    if info.wal.is_empty() {
        s += "  none archived\n";
    }
    for t in &info.wal {
        s += &format!(
            "  timeline {}: {} .. {} ({} segments, {}){}{}\n",
            t.timeline,
            t.first_segment.as_deref().unwrap_or("-"),
            t.last_segment.as_deref().unwrap_or("-"),
            t.segments,
            human(t.stored_bytes),
            if t.history_file { ", history file" } else { "" },
            if t.partial.is_empty() {
                String::new()
            } else {
                format!(", partial: {}", t.partial.join(" "))
            }
        );
        for g in &t.gaps {
            s += &format!(
                "    GAP: {} segments missing between {} and {}{}\n",
                g.missing_segments,
                g.after,
                g.before,
                if g.narrowed {
                    " (left out by the WAL window: the older backup restores to its consistency point)"
                } else {
                    ""
                }
            );
        }
    }
    s += &crate::verify::render_recorded(&info.last_verified_restore);
    s += &crate::expire::render_recorded(&info.last_expire);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Archive;

    const SEG: u64 = 16 << 20;

    fn archive(tli: u32, segs: &[u64]) -> Archive {
        let mut a = Archive {
            seg_size: Some(SEG),
            ..Default::default()
        };
        for n in segs {
            a.files
                .entry(tli)
                .or_default()
                .insert(crate::archive::name_of(tli, *n, SEG), SEG);
        }
        a
    }

    #[test]
    fn what_a_backup_reaches() {
        // A backup from segment 2 to 3 (its stop inside segment 3).
        let (start, stop) = (2 * SEG + 0x28, 3 * SEG + 0x100);
        let pitr = reach(&archive(1, &[2, 3, 4, 5, 7]), 1, start, stop);
        assert_eq!(pitr.kind, "point_in_time");
        assert_eq!(pitr.to_segment.as_deref(), Some("000000010000000000000005"));
        let own = reach(&archive(1, &[2, 3, 5, 6]), 1, start, stop);
        assert_eq!(own.kind, "consistency_point");
        assert_eq!(own.describe(), "its consistency point only");
        let missing = reach(&archive(1, &[2, 4]), 1, start, stop);
        assert_eq!(missing.kind, "missing_wal");
        assert_eq!(missing.missing.as_deref(), Some("000000010000000000000003"));
        // Another timeline's segments are not this backup's WAL.
        assert_eq!(
            reach(&archive(2, &[2, 3]), 1, start, stop).kind,
            "missing_wal"
        );
        // A stop at a segment's first byte needs only the segment before it.
        let edge = reach(&archive(1, &[2, 3]), 1, start, 4 * SEG);
        assert_eq!(edge.kind, "consistency_point");
        assert_eq!(reach(&Archive::default(), 1, start, stop).kind, "unknown");
    }
}
