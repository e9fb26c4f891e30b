//! The repository overview an on-call engineer needs: backups and the archived WAL per timeline.

use crate::repo;
use crate::store::Store;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use tidemark_format::keys;
use tidemark_format::wal::{self as walfmt, WalFileName};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Serialize)]
pub struct Info {
    pub schema_version: u32,
    pub repo: String,
    pub system_id: String,
    pub backups: Vec<BackupInfo>,
    pub wal: Vec<TimelineWal>,
    /// The newest restore drill recorded by `tidemark-restore verify --record`.
    pub last_verified_restore: Option<crate::verify::RecordSummary>,
}

#[derive(Serialize)]
pub struct BackupInfo {
    pub id: String,
    pub timeline: u32,
    pub start_time: String,
    pub stop_time: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub parent: Option<String>,
    pub logical_bytes: u64,
    pub new_chunk_bytes: u64,
    pub new_stored_bytes: u64,
    pub new_objects: u64,
    pub new_chunks: u64,
    pub reused_chunks: u64,
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
}

pub async fn collect(store: &Store) -> Result<Info> {
    let cfg = repo::require_config(store).await?;
    let backups = repo::list_backups(store)
        .await?
        .into_iter()
        .map(|h| BackupInfo {
            id: h.backup_id,
            timeline: h.timeline.0,
            start_time: repo::fmt_time(h.start_time_us),
            stop_time: repo::fmt_time(h.stop_time_us),
            start_lsn: h.start_lsn.to_string(),
            stop_lsn: h.stop_lsn.to_string(),
            parent: h.parent,
            logical_bytes: h.stats.logical_bytes,
            new_chunk_bytes: h.stats.new_chunk_bytes,
            new_stored_bytes: h.stats.new_stored_bytes,
            new_objects: h.stats.new_objects,
            new_chunks: h.stats.new_chunks,
            reused_chunks: h.stats.reused_chunks,
        })
        .collect();
    let listed = store.list(keys::WAL).await?;
    let mut per_tl: BTreeMap<u32, Vec<(WalFileName, String, u64)>> = BTreeMap::new();
    for l in listed {
        if let Some(n) = keys::parse_wal(&l.key) {
            per_tl
                .entry(n.timeline().0)
                .or_default()
                .push((n, l.key, l.size));
        }
    }
    let mut seg_size = None;
    let mut wal = Vec::new();
    for (tl, mut files) in per_tl {
        files.sort();
        let segs: Vec<&(WalFileName, String, u64)> = files
            .iter()
            .filter(|(n, _, _)| matches!(n, WalFileName::Segment { .. }))
            .collect();
        if seg_size.is_none() {
            if let Some((_, key, size)) = segs.first() {
                let head = store.get_range(key, 0..(*size).min(256)).await?;
                seg_size = walfmt::decode_header(&head).ok().map(|(h, _)| h.size);
            }
        }
        let mut gaps = Vec::new();
        if let Some(ss) = seg_size.filter(|s| s.is_power_of_two()) {
            for w in segs.windows(2) {
                let (a, b) = (
                    w[0].0.segment_number(ss).unwrap_or(0),
                    w[1].0.segment_number(ss).unwrap_or(0),
                );
                if b > a + 1 {
                    gaps.push(Gap {
                        after: w[0].0.to_string(),
                        before: w[1].0.to_string(),
                        missing_segments: b - a - 1,
                    });
                }
            }
        }
        wal.push(TimelineWal {
            timeline: tl,
            first_segment: segs.first().map(|s| s.0.to_string()),
            last_segment: segs.last().map(|s| s.0.to_string()),
            segments: segs.len() as u64,
            gaps,
            history_file: files
                .iter()
                .any(|(n, _, _)| matches!(n, WalFileName::History { .. })),
            partial: files
                .iter()
                .filter(|(n, _, _)| matches!(n, WalFileName::Partial { .. }))
                .map(|(n, _, _)| n.to_string())
                .collect(),
            stored_bytes: files.iter().map(|(_, _, s)| s).sum(),
        });
    }
    Ok(Info {
        schema_version: SCHEMA_VERSION,
        repo: store.url().to_string(),
        system_id: cfg.system_id.to_string(),
        backups,
        wal,
        last_verified_restore: crate::verify::last_recorded(store).await?,
    })
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
    let mut s = format!(
        "repository {} (database system {})\n\nbackups:\n",
        info.repo, info.system_id
    );
    if info.backups.is_empty() {
        s += "  none\n";
    }
    for b in &info.backups {
        s += &format!(
            "  {}  timeline {}  start {} ({})  stop {} ({})\n      size {}, stored anew {} in {} objects ({} new chunks, {} reused){}\n",
            b.id,
            b.timeline,
            b.start_time,
            b.start_lsn,
            b.stop_time,
            b.stop_lsn,
            human(b.logical_bytes),
            human(b.new_stored_bytes),
            b.new_objects,
            b.new_chunks,
            b.reused_chunks,
            b.parent.as_ref().map(|p| format!(", parent {p}")).unwrap_or_default()
        );
    }
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
                "    GAP: {} segments missing between {} and {}\n",
                g.missing_segments, g.after, g.before
            );
        }
    }
    s += &crate::verify::render_recorded(&info.last_verified_restore);
    s
}
