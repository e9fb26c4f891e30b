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
