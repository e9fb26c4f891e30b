//! Over 500 lines because it is one table: the fixture and the cases that vary it belong together.
//!
//! The planner's table: one small repository and many variations of it, each with the outcome the
//! executor must carry out. Every case also checks that the printed plan and the work agree.

use super::*;
use crate::expire::render;
use crate::test_support::hdr;
use tidemark_format::manifest::{ChunkRef, Entry, EntryKind, FileEntry, Manifest};
use tidemark_format::{ChunkId, Lsn, TimelineId};

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;
/// 2026-11-21T00:00:00Z: `now` of every case.
const NOW: i64 = 1_795_219_200_000_000;

fn pack(name: &str) -> PackId {
    PackId::of(name.as_bytes())
}

/// One backup of the fixture.
#[derive(Clone)]
struct B {
    id: &'static str,
    tli: u32,
    /// The segment its backup_label names as the start ("" for a label without one).
    start: &'static str,
    stopped_h_ago: i64,
    /// Its pack table.
    packs: &'static [&'static str],
    /// Chunk references (pack, offset, clen) of its one file, for the repack's live set.
    chunks: &'static [(&'static str, u64, u32)],
}

impl B {
    fn manifest(&self) -> Manifest {
        let stop = NOW - self.stopped_h_ago * HOUR;
        let mut header = hdr(self.id, stop);
        header.timeline = TimelineId(self.tli);
        header.start_lsn = Lsn(stop as u64 - 1);
        header.stop_lsn = Lsn(stop as u64);
        if !self.start.is_empty() {
            header.backup_label = format!(
                "START WAL LOCATION: 0/2000028 (file {})\nCHECKPOINT LOCATION: 0/2000060\n",
                self.start
            )
            .into_bytes();
        }
        let table: Vec<PackId> = self.packs.iter().map(|p| pack(p)).collect();
        let chunks: Vec<ChunkRef> = self
            .chunks
            .iter()
            .enumerate()
            .map(|(i, (p, offset, clen))| ChunkRef {
                id: ChunkId([i as u8; 32]),
                pack: self
                    .packs
                    .iter()
                    .position(|x| x == p)
                    .expect("pack in table") as u32,
                offset: *offset,
                clen: *clen,
                ulen: 8192,
                skip: 0,
            })
            .collect();
        Manifest {
            header,
            packs: table,
            entries: vec![Entry {
                path: "base/1/16384".into(),
                mode: 0o600,
                kind: EntryKind::File(FileEntry {
                    size: 8192 * chunks.len() as u64,
                    sha256: ChunkId([0; 32]),
                    chunks,
                }),
            }],
        }
    }
}

/// The repository facts of a case.
#[derive(Clone)]
struct Fixture {
    policy: Policy,
    grace: i64,
    backups: Vec<B>,
    /// A backup whose manifest the executor did not read.
    unread: Option<&'static str>,
    /// Listed packs and their sizes.
    packs: Vec<(&'static str, u64)>,
    /// GC states: key, condemned this long before now, packs.
    states: Vec<(&'static str, i64, Vec<&'static str>)>,
    /// WAL objects listed: key, size.
    wal: Vec<(&'static str, u64)>,
    /// Other processes' leases: key, kind, live.
    leases: Vec<(&'static str, LeaseKind, bool)>,
    /// `--retain-wal-window`, in hours.
    wal_window_h: Option<i64>,
    /// The archive's segment size.
    seg_size: Option<u64>,
    /// Backups whose stop LSN is given (else it is the stop time, far beyond any segment).
    stop_lsns: Vec<(&'static str, u64)>,
    /// The history a restore of `latest` follows; `None`: one on which every backup lies.
    history: Option<History>,
}

fn last(n: u32) -> Policy {
    Policy {
        retain_last: Some(n),
        ..Default::default()
    }
}

/// Three backups: b1 and b2 on timeline 1, b3 on timeline 2 (switched at segment 7); five packs,
/// p1 only b1's, p5 nobody's. Keeping the last 2 removes b1, and WAL before segment 5.
fn base() -> Fixture {
    Fixture {
        policy: last(2),
        grace: HOUR,
        backups: vec![
            B {
                id: "b1",
                tli: 1,
                start: "000000010000000000000002",
                stopped_h_ago: 50,
                packs: &["p1", "p2"],
                chunks: &[],
            },
            B {
                id: "b2",
                tli: 1,
                start: "000000010000000000000005",
                stopped_h_ago: 26,
                packs: &["p2", "p3"],
                chunks: &[],
            },
            B {
                id: "b3",
                tli: 2,
                start: "000000020000000000000008",
                stopped_h_ago: 2,
                packs: &["p3", "p4"],
                chunks: &[],
            },
        ],
        unread: None,
        packs: vec![
            ("p1", 1000),
            ("p2", 1000),
            ("p3", 1000),
            ("p4", 1000),
            ("p5", 500),
        ],
        states: vec![],
        wal: vec![
            ("wal/00000001/000000010000000000000001", 100),
            ("wal/00000001/000000010000000000000002.00000028.backup", 10),
            ("wal/00000001/000000010000000000000004", 100),
            ("wal/00000001/000000010000000000000005", 100),
            ("wal/00000001/000000010000000000000007.partial", 100),
            ("wal/00000001/not-a-wal-file", 1),
            ("wal/00000002/00000002.history", 1),
            ("wal/00000002/000000020000000000000007", 100),
            ("wal/00000002/000000020000000000000008", 100),
            ("wal/00000002/000000020000000000000009", 100),
        ],
        leases: vec![],
        wal_window_h: None,
        seg_size: None,
        stop_lsns: vec![],
        history: None,
    }
}

/// What a case expects the executor to do; pack and WAL names without their key prefixes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome<'a> {
    remove: Vec<&'a str>,
    condemn: Vec<&'a str>,
    delete: Vec<&'a str>,
    waiting: u64,
    keep_from: Option<&'a str>,
    wal: Vec<&'a str>,
    /// Rewritten GC states and the packs each still lists.
    states: Vec<(&'a str, Vec<&'a str>)>,
    repack: Vec<&'a str>,
    relocate: Vec<&'a str>,
    deferred: bool,
    stale: Vec<&'a str>,
}

/// Runs the three stages as the executor does, on the fixture's facts.
fn run(f: &Fixture) -> Result<(Plan, Work)> {
    let opts = ExpireOptions {
        policy: f.policy.clone(),
        dry_run: false,
        gc_grace: Duration::from_micros(f.grace as u64),
        repack: RepackOptions::default(),
        wal_window_us: f.wal_window_h.map(|h| h * HOUR),
    };
    let leases: Vec<LeaseFact> = f
        .leases
        .iter()
        .map(|(key, kind, live)| LeaseFact {
            key: key.to_string(),
            kind: *kind,
            live: *live,
            holder: format!("lease {key}"),
        })
        .collect();
    let mut manifests: Vec<Manifest> = f.backups.iter().map(B::manifest).collect();
    for m in &mut manifests {
        if let Some((_, lsn)) = f.stop_lsns.iter().find(|(id, _)| *id == m.header.backup_id) {
            m.header.stop_lsn = Lsn(*lsn);
        }
    }
    let top = manifests
        .iter()
        .map(|m| m.header.timeline.0)
        .max()
        .unwrap_or(1);
    let history = f.history.clone().unwrap_or_else(|| History {
        tli: top,
        ancestors: (1..top)
            .map(|tli| crate::timeline::Ancestor {
                tli,
                switch: Lsn(u64::MAX),
            })
            .collect(),
    });
    let r = retain(
        &opts,
        NOW,
        judge_leases(&leases)?,
        manifests.iter().map(|m| m.header.clone()).collect(),
        &history,
    )?;
    let mut stored = Stored {
        packs: f.packs.iter().map(|(p, size)| (pack(p), *size)).collect(),
        gc_states: f
            .states
            .iter()
            .map(|(key, ago, packs)| {
                let mut packs: Vec<PackId> = packs.iter().map(|p| pack(p)).collect();
                packs.sort();
                let s = GcState {
                    condemned_us: NOW - ago,
                    packs,
                };
                (key.to_string(), s)
            })
            .collect(),
        wal: f
            .wal
            .iter()
            .map(|(key, size)| Listed {
                key: key.to_string(),
                size: *size,
                modified_us: None,
            })
            .collect(),
        seg_size: f.seg_size,
        ..Default::default()
    };
    for m in manifests {
        let id = m.header.backup_id.clone();
        if f.unread == Some(id.as_str()) {
            continue;
        }
        if r.needs_chunks(&id) {
            stored.live.add(&m);
        }
        stored.pack_tables.insert(id, m.packs);
    }
    plan(r, &opts, stored)
}

/// The outcome of a plan, with pack names from the fixture; checks that plan and work agree and
/// that nothing a retained backup needs is deleted.
fn outcome<'a>(f: &'a Fixture, p: &'a Plan, w: &'a Work) -> Outcome<'a> {
    let names: HashMap<PackId, &str> = f
        .packs
        .iter()
        .map(|(n, _)| *n)
        .chain(f.states.iter().flat_map(|s| s.2.iter().copied()))
        .map(|n| (pack(n), n))
        .collect();
    let named = |ps: &[PackId]| -> Vec<&'a str> {
        let mut v: Vec<&str> = ps.iter().map(|p| names[p]).collect();
        v.sort();
        v
    };
    let strings = |ps: &[PackId]| ps.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(p.packs.condemn, strings(&w.condemn));
    assert_eq!(p.packs.delete, strings(&w.delete));
    assert_eq!(p.wal.delete, w.wal);
    assert_eq!(p.repack.rewrite_manifests, w.relocate);
    assert_eq!(p.stale_leases, w.stale_leases);
    assert_eq!(p.bytes_freed, p.packs.delete_bytes + p.wal.delete_bytes);
    for id in &w.remove {
        assert!(p
            .backups
            .iter()
            .any(|b| &b.id == id && b.action == "remove"));
    }
    for b in f
        .backups
        .iter()
        .filter(|b| !w.remove.iter().any(|r| r == b.id))
    {
        for d in &w.delete {
            assert!(!b.packs.contains(&names[d]), "deleted a pack of {}", b.id);
        }
    }
    assert!(w.wal.iter().all(|k| !k.ends_with(".history")));
    Outcome {
        remove: w.remove.iter().map(String::as_str).collect(),
        condemn: named(&w.condemn),
        delete: named(&w.delete),
        waiting: p.packs.waiting,
        keep_from: p.wal.keep_from_segment.as_deref(),
        wal: w
            .wal
            .iter()
            .map(|k| k.rsplit('/').next().unwrap_or(k))
            .collect(),
        states: w
            .states
            .iter()
            .map(|s| (s.key.as_str(), named(&s.still)))
            .collect(),
        repack: named(&w.repack.iter().map(|c| c.pack).collect::<Vec<_>>()),
        relocate: w.relocate.iter().map(String::as_str).collect(),
        deferred: p.deferred.is_some(),
        stale: w.stale_leases.iter().map(String::as_str).collect(),
    }
}

/// WAL the base fixture's plan deletes: before segment 5, on every timeline.
const BASE_WAL: [&str; 3] = [
    "000000010000000000000001",
    "000000010000000000000002.00000028.backup",
    "000000010000000000000004",
];

#[test]
fn table() {
    struct Case {
        name: &'static str,
        fixture: Fixture,
        /// The outcome, or a fragment of the error.
        want: std::result::Result<Outcome<'static>, &'static str>,
    }
    let base_outcome = || Outcome {
        remove: vec!["b1"],
        condemn: vec!["p1", "p5"],
        waiting: 2,
        keep_from: Some("0000000000000005"),
        wal: BASE_WAL.to_vec(),
        ..Default::default()
    };
    let with = |change: &dyn Fn(&mut Fixture)| {
        let mut f = base();
        change(&mut f);
        f
    };
    let repacking = |f: &mut Fixture| {
        // p3 is 90 % garbage (b2 and b3 use the same 100 bytes of it); p2 and p4 are 10 %.
        f.backups[1].chunks = &[("p2", 8, 900), ("p3", 8, 100)];
        f.backups[2].chunks = &[("p3", 8, 100), ("p4", 8, 900)];
    };
    let cases = vec![
        Case {
            name: "grace not passed: unreferenced packs are condemned, none deleted",
            fixture: base(),
            want: Ok(base_outcome()),
        },
        Case {
            name: "no grace: condemned and deleted by the same run",
            fixture: with(&|f| f.grace = 0),
            want: Ok(Outcome {
                delete: vec!["p1", "p5"],
                waiting: 0,
                ..base_outcome()
            }),
        },
        Case {
            name: "condemned before the grace period: deleted, and its state emptied",
            fixture: with(&|f| f.states = vec![("gc/old", 2 * HOUR, vec!["p1"])]),
            want: Ok(Outcome {
                condemn: vec!["p5"],
                delete: vec!["p1"],
                waiting: 1,
                states: vec![("gc/old", vec![])],
                ..base_outcome()
            }),
        },
        Case {
            name: "condemned inside the grace period: waiting, state unchanged",
            fixture: with(&|f| f.states = vec![("gc/recent", 30 * MINUTE, vec!["p1", "p5"])]),
            want: Ok(Outcome {
                condemn: vec![],
                ..base_outcome()
            }),
        },
        Case {
            name: "the earliest condemnation of a pack counts",
            fixture: with(&|f| {
                f.states = vec![
                    ("gc/a", 30 * MINUTE, vec!["p1"]),
                    ("gc/b", 2 * HOUR, vec!["p1"]),
                ]
            }),
            want: Ok(Outcome {
                condemn: vec!["p5"],
                delete: vec!["p1"],
                waiting: 1,
                states: vec![("gc/a", vec![]), ("gc/b", vec![])],
                ..base_outcome()
            }),
        },
        Case {
            name: "a state keeps only packs that exist and are unreferenced",
            // p2 is referenced again (b2), p9 is gone, p5 stays condemned.
            fixture: with(&|f| f.states = vec![("gc/old", 30 * MINUTE, vec!["p2", "p5", "p9"])]),
            want: Ok(Outcome {
                condemn: vec!["p1"],
                states: vec![("gc/old", vec!["p5"])],
                ..base_outcome()
            }),
        },
        Case {
            name: "a backup is running: only manifests are removed",
            fixture: with(&|f| {
                f.grace = 0;
                f.leases = vec![("locks/backup-1", LeaseKind::Backup, true)];
                repacking(f);
            }),
            want: Ok(Outcome {
                remove: vec!["b1"],
                deferred: true,
                ..Default::default()
            }),
        },
        Case {
            name: "stale leases are removed and defer nothing",
            fixture: with(&|f| {
                f.leases = vec![
                    ("locks/expire-dead", LeaseKind::Expire, false),
                    ("locks/backup-dead", LeaseKind::Backup, false),
                ]
            }),
            want: Ok(Outcome {
                stale: vec!["locks/backup-dead", "locks/expire-dead"],
                ..base_outcome()
            }),
        },
        Case {
            name: "another expire is running: refused",
            fixture: with(&|f| f.leases = vec![("locks/expire-1", LeaseKind::Expire, true)]),
            want: Err("another expire is running in this repository: lease locks/expire-1"),
        },
        Case {
            name: "WAL before the oldest retained start goes on every timeline, .history never",
            // Only b3 (timeline 2, segment 8) is kept: timeline 1 goes whole, timeline 2 to 8.
            fixture: with(&|f| f.policy = last(1)),
            want: Ok(Outcome {
                remove: vec!["b1", "b2"],
                condemn: vec!["p1", "p2", "p5"],
                waiting: 3,
                keep_from: Some("0000000000000008"),
                wal: vec![
                    "000000010000000000000001",
                    "000000010000000000000002.00000028.backup",
                    "000000010000000000000004",
                    "000000010000000000000005",
                    "000000010000000000000007.partial",
                    "000000020000000000000007",
                ],
                ..Default::default()
            }),
        },
        Case {
            name: "WAL is kept from the smallest start segment of the retained backups",
            // b2 stopped before b3 yet names a later start segment: b3's start counts.
            fixture: with(&|f| f.backups[1].start = "000000010000000000000009"),
            want: Ok(Outcome {
                keep_from: Some("0000000000000008"),
                wal: [
                    &BASE_WAL[..],
                    &[
                        "000000010000000000000005",
                        "000000010000000000000007.partial",
                        "000000020000000000000007",
                    ],
                ]
                .concat(),
                ..base_outcome()
            }),
        },
        Case {
            name: "no backups: nothing restorable, no WAL deleted, every pack condemned",
            fixture: with(&|f| f.backups.clear()),
            want: Ok(Outcome {
                condemn: vec!["p1", "p2", "p3", "p4", "p5"],
                waiting: 5,
                ..Default::default()
            }),
        },
        Case {
            name: "a retained backup's label without a start segment stops the plan",
            fixture: with(&|f| f.backups[1].start = ""),
            want: Err("backup b2 has a backup_label without a START WAL LOCATION file"),
        },
        Case {
            name: "a removed backup's label is not needed",
            fixture: with(&|f| f.backups[0].start = ""),
            want: Ok(base_outcome()),
        },
        Case {
            name: "a retained backup whose manifest was not read stops the plan",
            fixture: with(&|f| f.unread = Some("b3")),
            want: Err("the pack table of retained backup b3 was not read"),
        },
        Case {
            name: "a removed backup whose manifest was not read changes nothing",
            fixture: with(&|f| f.unread = Some("b1")),
            want: Ok(base_outcome()),
        },
        Case {
            name: "no retention rule: refused",
            fixture: with(&|f| f.policy = Policy::default()),
            want: Err("no retention rule given"),
        },
        Case {
            name: "a mostly-garbage pack is repacked and every backup naming it relocated",
            fixture: with(&repacking),
            want: Ok(Outcome {
                repack: vec!["p3"],
                relocate: vec!["b2", "b3"],
                ..base_outcome()
            }),
        },
        Case {
            name: "a removed backup's references make no pack worth keeping whole",
            // b1 used all of p3; it is removed, so p3 is still 90 % garbage.
            fixture: with(&|f| {
                repacking(f);
                f.backups[0].packs = &["p1", "p2", "p3"];
                f.backups[0].chunks = &[("p3", 8, 1000)];
            }),
            want: Ok(Outcome {
                repack: vec!["p3"],
                relocate: vec!["b2", "b3"],
                ..base_outcome()
            }),
        },
    ];
    for c in cases {
        let got = run(&c.fixture);
        match (&got, &c.want) {
            (Ok((p, w)), Ok(want)) => assert_eq!(&outcome(&c.fixture, p, w), want, "{}", c.name),
            (Err(e), Err(fragment)) => {
                assert!(format!("{e:#}").contains(fragment), "{}: {e:#}", c.name)
            }
            (Ok((p, _)), Err(fragment)) => {
                panic!("{}: planned {p:?}, want an error with {fragment:?}", c.name)
            }
            (Err(e), Ok(_)) => panic!("{}: {e:#}", c.name),
        }
    }
}

#[test]
fn the_printed_plan() {
    let (p, _) = run(&Fixture { grace: 0, ..base() }).expect("plan");
    assert_eq!(p.now, "2026-11-21T00:00:00.000000Z");
    assert_eq!(p.gc_grace_seconds, 0);
    let actions: Vec<(&str, &str)> = p
        .backups
        .iter()
        .map(|b| (b.id.as_str(), b.action.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![("b3", "keep"), ("b2", "keep"), ("b1", "remove")],
        "newest first"
    );
    assert_eq!(p.backups[0].timeline, 2);
    assert_eq!(p.backups[2].reasons, vec!["matched by no retention rule"]);
    // b2 is the oldest kept backup: restorable from its stop.
    assert_eq!(
        p.recoverable_from.as_deref(),
        Some("2026-11-19T22:00:00.000000Z")
    );
    assert_eq!((p.packs.total, p.packs.referenced), (5, 3));
    assert_eq!(p.packs.delete_bytes, 1500);
    assert_eq!(p.wal.delete_bytes, 210);
    assert_eq!(p.bytes_freed, 1710);
    assert!(render(&p).contains("bytes freed: 1710"));
}

/// Timeline 2 left timeline 1 between b1's and b2's stop (a PITR to a moment before b2): b2
/// lies on the abandoned branch. Keeping the last 2 keeps b3 and b2 by the rule over all
/// backups and b1 by the rule over the usable ones: b1's WAL stays and the window opens at its
/// stop, not at b2's.
#[test]
fn a_fork_older_than_a_backup() {
    let f = Fixture {
        history: Some(History {
            tli: 2,
            ancestors: vec![crate::timeline::Ancestor {
                tli: 1,
                switch: Lsn((NOW - 40 * HOUR) as u64),
            }],
        }),
        ..base()
    };
    let (p, w) = run(&f).expect("plan");
    assert_eq!(
        outcome(&f, &p, &w),
        Outcome {
            condemn: vec!["p5"],
            waiting: 1,
            keep_from: Some("0000000000000002"),
            wal: vec!["000000010000000000000001"],
            ..Default::default()
        }
    );
    assert_eq!(
        p.recoverable_from.as_deref(),
        Some("2026-11-18T22:00:00.000000Z"),
        "b1's stop"
    );
    let reasons = |id: &str| {
        p.backups
            .iter()
            .find(|b| b.id == id)
            .map(|b| b.reasons.join("; "))
            .unwrap_or_default()
    };
    assert!(reasons("b2").contains("abandoned"), "{}", reasons("b2"));
    assert!(
        reasons("b1").contains("one of the last 2 among the backups the latest timeline can use"),
        "{}",
        reasons("b1")
    );
    // Only abandoned backups left: nothing is promised, and the plan says why.
    let f = Fixture {
        policy: last(1),
        history: Some(History::root(3)),
        ..base()
    };
    let (p, _) = run(&f).expect("plan");
    assert_eq!(p.recoverable_from, None);
    assert!(
        render(&p).contains("no retained backup lies on the history of the latest timeline"),
        "{}",
        render(&p)
    );
}

mod forks;
mod window;

#[test]
fn running_backups_are_named_in_the_deferral() {
    let v = judge_leases(&[
        LeaseFact {
            key: "locks/backup-2".into(),
            kind: LeaseKind::Backup,
            live: true,
            holder: "backup lease two".into(),
        },
        LeaseFact {
            key: "locks/backup-1".into(),
            kind: LeaseKind::Backup,
            live: true,
            holder: "backup lease one".into(),
        },
    ])
    .expect("two backups are no conflict");
    let d = v.deferred.expect("deferred");
    assert!(
        d.starts_with("2 backup(s) running (backup lease two; backup lease one)"),
        "{d}"
    );
    assert!(v.stale.is_empty());
}
