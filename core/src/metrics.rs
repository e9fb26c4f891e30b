//! The sidecar's Prometheus metrics, served as text at `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    pub last_archived_time: Gauge<f64, AtomicU64>,
    pub last_archived_segment: Family<Labels, Gauge>,
    pub lag_segments: Gauge,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub ready_queue: Gauge,
    pub uploads_in_flight: Gauge,
    pub upload_failures: Counter,
    pub conflicts: Counter,
    pub stored_bytes: Counter,
    pub stored_objects: Counter,
    pub handoffs: Counter,
    highest_segment: std::sync::Mutex<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            last_archived_time: Gauge::default(),
            last_archived_segment: Family::default(),
            lag_segments: Gauge::default(),
            lag_seconds: Gauge::default(),
            ready_queue: Gauge::default(),
            uploads_in_flight: Gauge::default(),
            upload_failures: Counter::default(),
            conflicts: Counter::default(),
            stored_bytes: Counter::default(),
            stored_objects: Counter::default(),
            handoffs: Counter::default(),
            highest_segment: std::sync::Mutex::new(String::new()),
        };
        let r = &mut m.registry;
        r.register(
            "tidemark_wal_last_archived_timestamp_seconds",
            "Unix time the last WAL file was durably archived",
            m.last_archived_time.clone(),
        );
        r.register(
            "tidemark_wal_last_archived_segment",
            "The highest WAL segment durably archived (value 1, name in the label)",
            m.last_archived_segment.clone(),
        );
        r.register(
            "tidemark_wal_archive_lag_segments",
            "WAL files marked .ready and not yet durably archived",
            m.lag_segments.clone(),
        );
        r.register(
            "tidemark_wal_archive_lag_seconds",
            "Age of the oldest .ready WAL file not yet archived",
            m.lag_seconds.clone(),
        );
        r.register(
            "tidemark_wal_ready_queue_depth",
            "WAL files marked .ready in pg_wal/archive_status",
            m.ready_queue.clone(),
        );
        r.register(
            "tidemark_wal_uploads_in_flight",
            "WAL uploads running now",
            m.uploads_in_flight.clone(),
        );
        r.register(
            "tidemark_wal_upload_failures",
            "Failed WAL upload attempts",
            m.upload_failures.clone(),
        );
        r.register(
            "tidemark_wal_conflicts",
            "WAL files refused because the archive holds different content under the same name",
            m.conflicts.clone(),
        );
        r.register(
            "tidemark_stored_bytes",
            "Bytes of objects stored",
            m.stored_bytes.clone(),
        );
        r.register(
            "tidemark_stored_objects",
            "Objects stored",
            m.stored_objects.clone(),
        );
        r.register(
            "tidemark_wal_handoffs",
            "archive_command requests answered over the socket",
            m.handoffs.clone(),
        );
        m
    }
}

impl Metrics {
    /// Records a durably archived WAL file. The segment label only moves forward: uploads run in
    /// parallel and finish out of order, and a `.history`/`.partial`/`.backup` file is not a
    /// segment (24 hex digits sort by timeline, then position).
    pub fn set_last_archived(&self, name: &str) {
        let is_segment = name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit());
        if is_segment {
            let mut highest = self
                .highest_segment
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if name > highest.as_str() {
                *highest = name.to_string();
                self.last_archived_segment.clear();
                self.last_archived_segment
                    .get_or_create(&vec![("segment".to_string(), name.to_string())])
                    .set(1);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_archived_time.set(now);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_archived_segment_only_moves_forward() {
        let m = Metrics::default();
        m.set_last_archived("000000010000000000000005");
        m.set_last_archived("000000010000000000000003");
        m.set_last_archived("00000002.history");
        let text = m.render();
        assert!(
            text.contains(
                r#"tidemark_wal_last_archived_segment{segment="000000010000000000000005"} 1"#
            ),
            "{text}"
        );
        m.set_last_archived("000000020000000000000006");
        let text = m.render();
        assert!(
            text.contains(r#"segment="000000020000000000000006""#)
                && !text.contains(r#"segment="000000010000000000000005""#),
            "{text}"
        );
    }
}
