//! `--retain-wal-window`: continuous WAL only from the backup that covers the window's start;
//! older retained backups keep their own start..stop WAL on their own timeline.

use super::*;

const SEG: u64 = 16 << 20;

fn b(id: &'static str, tli: u32, start: &'static str, stopped_h_ago: i64) -> B {
    B {
        id,
        tli,
        start,
        stopped_h_ago,
        packs: &["p1"],
        chunks: &[],
    }
}

fn seg(tli: u32, n: u32) -> String {
    format!("wal/{tli:08X}/{tli:08X}00000000{n:08X}")
}

/// Four kept backups on timeline 1, like monthly ones and a recent one: m1 (segments 2..3,
/// 1000 h ago), m2 (6..7, its stop exactly at segment 7's first byte, 500 h ago), m3 (10..11,
/// 200 h ago), n (16, 2 h ago); segments 1..=18, m1's `.backup` file and a `.history` file.
fn monthly(window_h: Option<i64>) -> Fixture {
    let wal: Vec<(&'static str, u64)> = (1..=18)
        .map(|n| (&*Box::leak(seg(1, n).into_boxed_str()), 100))
        .chain([
            ("wal/00000001/000000010000000000000002.00000028.backup", 10),
            ("wal/00000002/00000002.history", 1),
        ])
        .collect();
    Fixture {
        policy: last(4),
        grace: HOUR,
        backups: vec![
            b("m1", 1, "000000010000000000000002", 1000),
            b("m2", 1, "000000010000000000000006", 500),
            b("m3", 1, "00000001000000000000000A", 200),
            b("n", 1, "000000010000000000000010", 2),
        ],
        unread: None,
        packs: vec![("p1", 1000)],
        states: vec![],
        wal,
        leases: vec![],
        wal_window_h: window_h,
        seg_size: Some(SEG),
        stop_lsns: vec![
            ("m1", 3 * SEG + 0x100),
            ("m2", 7 * SEG),
            ("m3", 11 * SEG + 0x28),
            ("n", 16 * SEG + 0x100),
        ],
        history: None,
    }
}

/// The WAL a plan deletes (file names) and where continuous WAL starts.
fn deleted(f: &Fixture) -> (Vec<String>, Option<String>, Plan) {
    let (p, w) = run(f).expect("plan");
    let o = outcome(f, &p, &w);
    let wal = o.wal.iter().map(|s| s.to_string()).collect();
    let from = o.keep_from.map(str::to_string);
    (wal, from, p)
}

fn names(tli: u32, segs: &[u32]) -> Vec<String> {
    segs.iter()
        .map(|n| {
            seg(tli, *n)
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn wal_window_table() {
    struct Case {
        name: &'static str,
        fixture: Fixture,
        /// Deleted segments of timeline 1, and the start of continuous WAL.
        delete: Vec<String>,
        from: &'static str,
        /// Backups restorable to their consistency point only.
        consistency_only: Vec<&'static str>,
    }
    let cases = vec![
        Case {
            name: "no window: everything from the oldest kept backup",
            fixture: monthly(None),
            delete: names(1, &[1]),
            from: "0000000000000002",
            consistency_only: vec![],
        },
        Case {
            name: "7 days: continuous from m3 (the newest stopped before the window), m1 and m2 keep start..stop",
            fixture: monthly(Some(168)),
            delete: names(1, &[1, 4, 5, 8, 9]),
            from: "000000000000000A",
            consistency_only: vec!["m1", "m2"],
        },
        Case {
            name: "m3 stopped exactly at the window's start: it covers the window",
            fixture: monthly(Some(200)),
            delete: names(1, &[1, 4, 5, 8, 9]),
            from: "000000000000000A",
            consistency_only: vec!["m1", "m2"],
        },
        Case {
            name: "m3 stopped a moment after the window's start: m2 covers it",
            fixture: monthly(Some(201)),
            delete: names(1, &[1, 4, 5]),
            from: "0000000000000006",
            consistency_only: vec!["m1"],
        },
        Case {
            name: "a window older than every backup: the oldest covers it, nothing narrows",
            fixture: monthly(Some(5000)),
            delete: names(1, &[1]),
            from: "0000000000000002",
            consistency_only: vec![],
        },
        Case {
            name: "a window shorter than the newest backup's age: continuous from n",
            fixture: monthly(Some(1)),
            delete: names(1, &[1, 4, 5, 8, 9, 12, 13, 14, 15]),
            from: "0000000000000010",
            consistency_only: vec!["m1", "m2", "m3"],
        },
        Case {
            name: "no segment size known: nothing narrows",
            fixture: Fixture {
                seg_size: None,
                ..monthly(Some(168))
            },
            delete: names(1, &[1]),
            from: "0000000000000002",
            consistency_only: vec![],
        },
        Case {
            name: "the window never keeps a removed backup's WAL: m1 removed by the policy",
            fixture: Fixture {
                policy: last(3),
                ..monthly(Some(168))
            },
            delete: names(1, &[1, 2, 3, 4, 5, 8, 9])
                .into_iter()
                .chain(["000000010000000000000002.00000028.backup".to_string()])
                .collect(),
            from: "000000000000000A",
            consistency_only: vec!["m2"],
        },
    ];
    for c in cases {
        let (mut got, from, p) = deleted(&c.fixture);
        let mut want = c.delete.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{}", c.name);
        assert_eq!(from.as_deref(), Some(c.from), "{}", c.name);
        let mut only: Vec<&str> = p
            .wal
            .keep_ranges
            .iter()
            .map(|r| r.backup.as_str())
            .collect();
        only.sort();
        assert_eq!(only, c.consistency_only, "{}", c.name);
        for bp in p.backups.iter().filter(|b| b.action == "keep") {
            let want = match (c.fixture.wal_window_h, c.fixture.seg_size) {
                (Some(_), Some(_)) if only.contains(&bp.id.as_str()) => {
                    Some("its consistency point only")
                }
                (Some(_), Some(_)) => Some("point in time from its stop"),
                _ if c.fixture.wal_window_h.is_some() => Some("point in time from its stop"),
                _ => None,
            };
            assert_eq!(bp.reach.as_deref(), want, "{}: {}", c.name, bp.id);
        }
        assert!(
            !got.iter().any(|n| n.ends_with(".history")),
            "{}: history kept",
            c.name
        );
    }
}

#[test]
fn wal_window_plan_is_printed() {
    let (p, _) = run(&monthly(Some(168))).expect("plan");
    assert_eq!(p.wal_window_seconds, Some(168 * 3600));
    // m3 covers the window: restorable from its stop (200 h before now).
    assert_eq!(
        p.recoverable_from.as_deref(),
        Some("2026-11-12T16:00:00.000000Z")
    );
    let r: Vec<(&str, u32, &str, &str)> = p
        .wal
        .keep_ranges
        .iter()
        .map(|r| {
            (
                r.backup.as_str(),
                r.timeline,
                r.from_segment.as_str(),
                r.to_segment.as_str(),
            )
        })
        .collect();
    assert_eq!(
        r,
        vec![
            ("m1", 1, "0000000000000002", "0000000000000003"),
            ("m2", 1, "0000000000000006", "0000000000000007"),
        ]
    );
    let text = render(&p);
    assert!(
        text.contains("wal: also keep 0000000000000002..0000000000000003 on timeline 1 (m1: its consistency point only)"),
        "{text}"
    );
    assert!(text.contains("reach: its consistency point only"), "{text}");
}

/// m1 and m2 on timeline 1, m3 and n on timeline 2 (which branched at segment 9): the old
/// backups keep their ranges on timeline 1 only; a timeline-2 object inside m2's positions goes.
#[test]
fn wal_window_several_timelines() {
    let mut f = monthly(Some(168));
    f.backups[2].tli = 2;
    f.backups[2].start = "00000002000000000000000A";
    f.backups[3].tli = 2;
    f.backups[3].start = "000000020000000000000010";
    let mut wal: Vec<(&'static str, u64)> = (1..=8)
        .map(|n| (&*Box::leak(seg(1, n).into_boxed_str()), 100))
        .chain((9..=18).map(|n| (&*Box::leak(seg(2, n).into_boxed_str()), 100)))
        .collect();
    wal.extend([
        ("wal/00000001/000000010000000000000009.partial", 100),
        ("wal/00000002/000000020000000000000006", 100),
        ("wal/00000002/00000002.history", 1),
    ]);
    f.wal = wal;
    let (mut got, from, p) = deleted(&f);
    got.sort();
    let mut want: Vec<String> = names(1, &[1, 4, 5, 8])
        .into_iter()
        .chain(names(2, &[6, 9]))
        .chain(["000000010000000000000009.partial".to_string()])
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(from.as_deref(), Some("000000000000000A"));
    assert!(p.wal.keep_ranges.iter().all(|r| r.timeline == 1));
}
