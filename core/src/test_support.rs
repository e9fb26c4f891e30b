//! Values shared by unit tests of several modules.

use tidemark_format::manifest::{BackupStats, ManifestHeader, SOURCE_PGDATA};
use tidemark_format::{Lsn, SystemId, TimelineId};

/// A plausible manifest header for backup `id` that stopped at `stop` (µs since the epoch).
pub fn hdr(id: &str, stop: i64) -> ManifestHeader {
    ManifestHeader {
        backup_id: id.into(),
        system_id: SystemId(1),
        pg_version: 150000,
        timeline: TimelineId(1),
        start_lsn: Lsn(1),
        stop_lsn: Lsn(2),
        start_time_us: stop - 10,
        stop_time_us: stop,
        source: SOURCE_PGDATA,
        flags: 0,
        chunk_size: 8192,
        parent: None,
        backup_label: vec![],
        tablespace_map: None,
        stats: BackupStats::default(),
    }
}

/// 16 MiB, the default WAL segment size.
pub const SEG: u64 = 16 << 20;

/// An archive holding full segments `(timeline, segment number)` of [`SEG`] bytes.
pub fn archive(segs: &[(u32, u64)]) -> crate::archive::Archive {
    let mut a = crate::archive::Archive {
        seg_size: Some(SEG),
        ..Default::default()
    };
    for (tli, n) in segs {
        a.files
            .entry(*tli)
            .or_default()
            .insert(crate::archive::name_of(*tli, *n, SEG), SEG);
    }
    a
}
