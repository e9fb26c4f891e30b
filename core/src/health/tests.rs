use super::*;
use crate::info::{BackupInfo, Gap, Info, Reach, Space, TimelineWal, Window};

fn backup(id: &str, source: &'static str, start: &str, stop: &str, size: u64) -> BackupInfo {
    BackupInfo {
        id: id.into(),
        timeline: 1,
        start_time: start.into(),
        stop_time: stop.into(),
        start_lsn: "0/2000028".into(),
        stop_lsn: "0/2000100".into(),
        pg_version: 150000,
        parent: None,
        logical_bytes: size,
        duration_seconds: 12.5,
        new_chunk_bytes: 0,
        new_stored_bytes: size / 2,
        new_objects: 1,
        new_chunks: 1,
        reused_chunks: 0,
        source,
        from_standby: false,
        tablespaces: Vec::new(),
        reach: Reach {
            kind: "point_in_time",
            to_segment: None,
            missing: None,
        },
    }
}

fn info() -> Info {
    Info {
        schema_version: 1,
        repo: "file:///r".into(),
        system_id: "7300000000000000001".into(),
        pg_major: Some(15),
        backups: vec![
            backup(
                "a",
                "pgdata",
                "2026-12-01T00:00:00Z",
                "2026-12-01T00:01:00Z",
                100,
            ),
            backup(
                "b",
                "replication",
                "2026-12-02T00:00:00Z",
                "2026-12-02T00:01:00Z",
                200,
            ),
            backup(
                "c",
                "pgdata",
                "2026-12-03T00:00:00Z",
                "2026-12-03T00:02:00.5Z",
                300,
            ),
        ],
        wal: vec![TimelineWal {
            timeline: 1,
            first_segment: None,
            last_segment: None,
            segments: 9,
            gaps: vec![
                Gap {
                    after: "x".into(),
                    before: "y".into(),
                    missing_segments: 3,
                    narrowed: false,
                },
                Gap {
                    after: "z".into(),
                    before: "w".into(),
                    missing_segments: 5,
                    narrowed: true,
                },
            ],
            history_file: false,
            partial: Vec::new(),
            stored_bytes: 1000,
        }],
        recoverable: vec![
            Window {
                timeline: 1,
                from: "2026-12-01T00:01:00Z".into(),
                from_backup: "a".into(),
                to_segment: "000000010000000000000003".into(),
                to_archived_at: Some("2026-12-01T05:00:00Z".into()),
            },
            Window {
                timeline: 1,
                from: "2026-12-03T00:02:00.5Z".into(),
                from_backup: "c".into(),
                to_segment: "000000010000000000000009".into(),
                to_archived_at: Some("2026-12-03T06:00:00Z".into()),
            },
        ],
        space: Space {
            pack_bytes: 5000,
            packs: 2,
            wal_bytes: 1000,
            manifest_bytes: 77,
            ..Default::default()
        },
        last_verified_restore: None,
        last_expire: None,
        other_systems: Vec::new(),
    }
}

#[test]
fn gauges_follow_the_facts() {
    let text = render(&info());
    for want in [
        r#"tidemark_repository_info{system_id="7300000000000000001",pg_major="15"} 1"#,
        r#"tidemark_backups{source="pgdata"} 2"#,
        r#"tidemark_backups{source="replication"} 1"#,
        // The newest pgdata backup, not the first listed.
        r#"tidemark_backup_last_success_timestamp_seconds{source="pgdata"} 1796256120.5"#,
        r#"tidemark_backup_last_size_bytes{source="pgdata"} 300"#,
        r#"tidemark_repository_bytes{kind="packs"} 5000"#,
        r#"tidemark_repository_bytes{kind="manifests"} 77"#,
        // The newest window of the timeline only.
        r#"tidemark_recoverable_window_start_timestamp_seconds{timeline="1"} 1796256120.5"#,
        r#"tidemark_recoverable_window_end_timestamp_seconds{timeline="1"} 1796277600"#,
        r#"tidemark_wal_gaps{timeline="1"} 1"#,
        r#"tidemark_wal_gap_missing_segments{timeline="1"} 3"#,
        "# TYPE tidemark_drill_last_success gauge",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert_eq!(
        text.matches("tidemark_recoverable_window_start_timestamp_seconds{")
            .count(),
        1,
        "one window per timeline:\n{text}"
    );
    // No drill or expire recorded: the families are there, without samples.
    assert!(!text.contains("\ntidemark_drill_last_success "), "{text}");
    assert!(!text.contains("\ntidemark_expire_last_success "), "{text}");
}

#[test]
fn label_values_are_escaped_and_the_end_marker_is_single() {
    let mut t = Text(String::new());
    t.sample("m", &l("k", "a\"b\\c\nd"), 1.0);
    assert_eq!(t.0, "m{k=\"a\\\"b\\\\c\\nd\"} 1\n");
    let joined = append(
        "# TYPE x counter\nx_total 1\n# EOF\n",
        "# TYPE y gauge\ny 2\n",
    );
    assert_eq!(joined.matches("# EOF").count(), 1);
    assert!(joined.ends_with("y 2\n# EOF\n"), "{joined}");
}

#[test]
fn a_failed_refresh_keeps_the_values_and_says_so() {
    let g = RepoGauges::default();
    assert_eq!(g.text(), "", "nothing before the first refresh");
    *g.facts.lock().unwrap() = render(&info());
    g.attempted.store(1, Ordering::Relaxed);
    g.ok.store(0, Ordering::Relaxed);
    let text = g.text();
    assert!(
        text.contains("tidemark_repository_refresh_success 0"),
        "{text}"
    );
    assert!(
        text.contains(r#"tidemark_backups{source="pgdata"} 2"#),
        "{text}"
    );
}
