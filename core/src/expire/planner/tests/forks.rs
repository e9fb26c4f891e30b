//! Retention across timelines, as a seeded property over random histories: forks at random
//! LSNs of any timeline (older than some backups, twice from one parent, from an abandoned
//! branch), backups on every timeline, complete WAL per timeline and random policies (with and
//! without a WAL window). For every point the plan promises on the timeline `latest` follows, a
//! kept backup on that history finished before it, and every segment from that backup's start
//! through the point is kept along the history, in the copy PostgreSQL reads (the newest
//! timeline of the history that holds the segment; an older one's copy only while it is still
//! that history's).

use super::*;
use crate::timeline::Ancestor;
use std::collections::HashSet;

const SEG: u64 = 16 << 20;
/// Microseconds of wall clock per byte of WAL (a segment is about 18 minutes).
const RATE: i64 = 64;
const DAY: i64 = 24 * HOUR;

/// xorshift64*: small, seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One timeline: it left `parent` at `switch` (its own WAL starts there), began at `begin_us`
/// and was written up to `end` (exclusive).
#[derive(Clone, Debug)]
struct Tl {
    tli: u32,
    parent: Option<u32>,
    switch: u64,
    begin_us: i64,
    end: u64,
}

impl Tl {
    fn time(&self, lsn: u64) -> i64 {
        self.begin_us + (lsn - self.switch) as i64 * RATE
    }
}

#[derive(Clone, Debug)]
struct Bk {
    id: String,
    tli: u32,
    start: u64,
    stop: u64,
    stop_us: i64,
}

struct Hist {
    tls: Vec<Tl>,
    backups: Vec<Bk>,
    now: i64,
}

impl Hist {
    fn tl(&self, tli: u32) -> &Tl {
        &self.tls[tli as usize - 1]
    }

    /// The timeline `latest` follows (the highest) and its ancestors, root first.
    fn path(&self) -> Vec<&Tl> {
        let mut path = vec![self.tls.last().expect("a root")];
        while let Some(p) = path.last().and_then(|t| t.parent) {
            path.push(self.tl(p));
        }
        path.reverse();
        path
    }

    /// The history file's view of the path, as `archive::history` reads it.
    fn history(&self) -> History {
        let path = self.path();
        let text: String = path
            .windows(2)
            .map(|w| format!("{}\t{}\tfork\n", w[0].tli, Lsn(w[1].switch)))
            .collect();
        let h = History::parse(path[path.len() - 1].tli, &text).expect("valid history");
        assert_eq!(
            h.ancestors,
            path.windows(2)
                .map(|w| Ancestor {
                    tli: w[0].tli,
                    switch: Lsn(w[1].switch),
                })
                .collect::<Vec<_>>()
        );
        h
    }
}

fn generate(rng: &mut Rng) -> Hist {
    let t0 = NOW - 40 * DAY;
    let span = |rng: &mut Rng| (1 + rng.below(12)) * SEG + rng.below(SEG);
    let root_switch = SEG + 40;
    let mut tls = vec![Tl {
        tli: 1,
        parent: None,
        switch: root_switch,
        begin_us: t0,
        end: root_switch + span(rng),
    }];
    for _ in 0..rng.below(5) {
        // Any timeline can be forked, an abandoned one and the same parent twice included.
        let parent = tls[rng.below(tls.len() as u64) as usize].clone();
        let switch = parent.switch + rng.below(parent.end - parent.switch);
        let latest_us = tls.iter().map(|t| t.time(t.end)).max().unwrap_or(t0);
        let begin_us = if rng.chance(50) {
            // a failover: the new timeline begins right away, the old branch may go on
            parent.time(switch) + rng.below(10 * 60_000_000) as i64
        } else {
            // a PITR: the new timeline begins after everything archived so far
            latest_us + rng.below(3 * DAY as u64) as i64
        };
        tls.push(Tl {
            tli: tls.len() as u32 + 1,
            parent: Some(parent.tli),
            switch,
            begin_us,
            end: switch + span(rng),
        });
    }
    let mut backups = Vec::new();
    for i in 0..1 + rng.below(8) {
        let tl = &tls[rng.below(tls.len() as u64) as usize];
        let room = tl.end - tl.switch;
        if room < 2 {
            continue;
        }
        let start = tl.switch + rng.below(room - 1);
        let stop = start + 1 + rng.below((tl.end - start - 1).min(3 * SEG));
        backups.push(Bk {
            id: format!("b{i}"),
            tli: tl.tli,
            start,
            stop,
            stop_us: tl.time(stop),
        });
    }
    let newest = tls.iter().map(|t| t.time(t.end)).max().unwrap_or(t0);
    Hist {
        tls,
        backups,
        now: newest + rng.below(2 * DAY as u64) as i64,
    }
}

fn seg_no(lsn: u64) -> u64 {
    lsn / SEG
}

fn seg_key(tli: u32, n: u64) -> String {
    let name = crate::archive::name_of(tli, n, SEG);
    format!("wal/{tli:08X}/{name}")
}

fn random_policy(rng: &mut Rng, h: &Hist) -> Policy {
    let age = (h.now - h.tls[0].begin_us).max(1) as u64;
    let mut p = Policy::default();
    while p.is_empty() {
        if rng.chance(50) {
            p.retain_last = Some(rng.below(4) as u32);
        }
        if rng.chance(35) {
            p.retain_window_us = Some(1 + rng.below(age) as i64);
        }
        if rng.chance(25) {
            p.retain_daily = Some(1 + rng.below(3) as u32);
        }
        if rng.chance(10) {
            p.retain_weekly = Some(1 + rng.below(2) as u32);
        }
    }
    p
}

/// Plans an expire of `h` with `policy` (and a WAL window, if any) as the executor would.
fn plan_of(h: &Hist, policy: Policy, wal_window_us: Option<i64>) -> (Plan, Work) {
    let opts = ExpireOptions {
        policy,
        dry_run: false,
        gc_grace: Duration::ZERO,
        repack: RepackOptions::default(),
        wal_window_us,
    };
    let headers: Vec<ManifestHeader> = h
        .backups
        .iter()
        .map(|b| {
            let mut m = hdr(&b.id, b.stop_us);
            m.timeline = TimelineId(b.tli);
            m.start_lsn = Lsn(b.start);
            m.stop_lsn = Lsn(b.stop);
            m.backup_label = format!(
                "START WAL LOCATION: {} (file {})\nCHECKPOINT LOCATION: {}\n",
                Lsn(b.start),
                crate::archive::name_of(b.tli, seg_no(b.start), SEG),
                Lsn(b.start)
            )
            .into_bytes();
            m
        })
        .collect();
    let r = retain(
        &opts,
        h.now,
        LeaseVerdict::default(),
        headers.clone(),
        &h.history(),
    )
    .expect("retain");
    let mut wal = Vec::new();
    for t in &h.tls {
        if t.tli > 1 {
            wal.push(format!("wal/{:08X}/{:08X}.history", t.tli, t.tli));
        }
        wal.extend((seg_no(t.switch)..=seg_no(t.end - 1)).map(|n| seg_key(t.tli, n)));
    }
    let stored = Stored {
        pack_tables: h
            .backups
            .iter()
            .map(|b| (b.id.clone(), vec![pack("p1")]))
            .collect(),
        packs: [(pack("p1"), 1000)].into_iter().collect(),
        wal: wal
            .into_iter()
            .map(|key| Listed {
                key,
                size: 100,
                modified_us: None,
            })
            .collect(),
        seg_size: Some(SEG),
        ..Default::default()
    };
    plan(r, &opts, stored).expect("plan")
}

/// What one history and one policy broke, if anything.
fn check(h: &Hist, p: &Plan, w: &Work) -> std::result::Result<(), String> {
    let path = h.path();
    let followed = h.history();
    let removed: HashSet<&str> = w.remove.iter().map(String::as_str).collect();
    let kept: Vec<&Bk> = h
        .backups
        .iter()
        .filter(|b| !removed.contains(b.id.as_str()))
        .collect();
    let usable = |b: &&Bk| followed.contains(b.tli, Lsn(b.stop));
    let deleted: HashSet<&str> = w.wal.iter().map(String::as_str).collect();
    if deleted.iter().any(|k| k.ends_with(".history")) {
        return Err("a .history file deleted".into());
    }
    if h.backups.iter().any(|b| usable(&b)) && !kept.iter().any(usable) {
        return Err("every backup the latest timeline can use was removed".into());
    }
    let Some(from) = p.recoverable_from.as_deref() else {
        return match kept.iter().any(usable) {
            true => Err("usable backups kept but nothing promised".into()),
            false => Ok(()),
        };
    };
    let from = chrono::DateTime::parse_from_rfc3339(from)
        .map_err(|e| e.to_string())?
        .timestamp_micros();
    if !kept.iter().any(|b| usable(b) && b.stop_us == from) {
        return Err(format!(
            "recoverable_from {from} is no kept usable backup's stop"
        ));
    }
    // Segment `s` read along the path for positions up to `hi` (exclusive): the newest timeline
    // of the path whose WAL begins at or before `s` and still holds it (PostgreSQL's order) must
    // be one whose part of the history reaches `hi`.
    let readable = |s: u64, hi: u64| -> std::result::Result<(), String> {
        for (i, t) in path.iter().enumerate().rev() {
            if seg_no(t.switch) > s && t.parent.is_some() {
                continue;
            }
            let key = seg_key(t.tli, s);
            let listed = seg_no(t.switch) <= s && s <= seg_no(t.end - 1);
            if !listed || deleted.contains(key.as_str()) {
                continue;
            }
            let part_end = path.get(i + 1).map_or(u64::MAX, |c| c.switch);
            return match part_end >= hi {
                true => Ok(()),
                false => Err(format!(
                    "segment {s} would be read from timeline {} past its switch",
                    t.tli
                )),
            };
        }
        Err(format!("segment {s} is kept on no timeline of the path"))
    };
    let restorable = |b: &Bk, lsn: u64| -> std::result::Result<(), String> {
        for s in seg_no(b.start)..=seg_no(lsn) {
            let hi = ((s + 1) * SEG).min(lsn + 1);
            readable(s, hi).map_err(|e| format!("from {} to {lsn:#x}: {e}", b.id))?;
        }
        Ok(())
    };
    // Every kept usable backup restores to its consistency point.
    for b in kept.iter().filter(|b| usable(b)) {
        restorable(b, b.stop)?;
    }
    // Points along the path: each part's ends, random LSNs and every backup's stop on it.
    let mut points: Vec<(u64, i64)> = Vec::new();
    for (i, t) in path.iter().enumerate() {
        let end = path.get(i + 1).map_or(t.end - 1, |c| c.switch);
        let mut lsns = vec![t.switch, end, (t.switch + end) / 2];
        lsns.extend(kept.iter().filter(|b| b.tli == t.tli).map(|b| b.stop));
        let mut r = Rng(t.switch | 1);
        lsns.extend((0..6).map(|_| t.switch + r.below(end - t.switch + 1)));
        points.extend(
            lsns.into_iter()
                .filter(|l| (t.switch..=end).contains(l))
                .map(|l| (l, t.time(l))),
        );
    }
    for (lsn, t) in points.into_iter().filter(|(_, t)| *t >= from) {
        let Some(b) = kept
            .iter()
            .filter(|b| usable(b) && b.stop_us <= t)
            .max_by_key(|b| (b.stop_us, b.stop))
        else {
            return Err(format!(
                "promised point {t} (LSN {lsn:#x}) has no usable backup"
            ));
        };
        if b.stop > lsn {
            return Err(format!("model: {} stops after the point {lsn:#x}", b.id));
        }
        restorable(b, lsn).map_err(|e| format!("point {t} (LSN {lsn:#x}): {e}"))?;
    }
    Ok(())
}

#[test]
fn random_histories_with_forks_keep_every_promised_point_restorable() {
    let seeds: Vec<u64> = match std::env::var("TIDEMARK_FORK_SEED") {
        Ok(s) => vec![s.parse().expect("TIDEMARK_FORK_SEED is a number")],
        Err(_) => (1..=600).collect(),
    };
    let (mut forks_before_a_backup, mut windows) = (0, 0);
    let (mut twice_from_one_parent, mut from_an_abandoned_branch) = (0, 0);
    for seed in &seeds {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let h = generate(&mut rng);
        let followed = h.history();
        let parents: Vec<u32> = h.tls.iter().filter_map(|t| t.parent).collect();
        if parents
            .iter()
            .any(|p| parents.iter().filter(|q| *q == p).count() > 1)
        {
            twice_from_one_parent += 1;
        }
        let path: Vec<u32> = h.path().iter().map(|t| t.tli).collect();
        if parents.iter().any(|p| !path.contains(p)) {
            from_an_abandoned_branch += 1;
        }
        if h.backups
            .iter()
            .any(|b| !followed.contains(b.tli, Lsn(b.stop)))
        {
            forks_before_a_backup += 1;
        }
        for _ in 0..4 {
            let policy = random_policy(&mut rng, &h);
            let wal_window = rng
                .chance(40)
                .then(|| 1 + rng.below((h.now - h.tls[0].begin_us) as u64) as i64);
            windows += usize::from(wal_window.is_some());
            let (p, w) = plan_of(&h, policy.clone(), wal_window);
            if let Err(e) = check(&h, &p, &w) {
                panic!(
                    "seed {seed} (rerun with TIDEMARK_FORK_SEED={seed}): {e}\npolicy {policy:?}, WAL window {wal_window:?}\ntimelines {:#?}\nbackups {:#?}\nplan {}",
                    h.tls,
                    h.backups,
                    render(&p)
                );
            }
        }
    }
    eprintln!(
        "{} histories: {forks_before_a_backup} with a fork older than a backup, {twice_from_one_parent} forked twice from one parent, {from_an_abandoned_branch} forked from an abandoned branch; {windows} plans with a WAL window",
        seeds.len()
    );
    // The property is not vacuous: many histories have backups on abandoned branches.
    if seeds.len() > 1 {
        assert!(
            forks_before_a_backup > seeds.len() / 5,
            "{forks_before_a_backup}"
        );
        assert!(windows > seeds.len() / 2, "{windows}");
        assert!(
            twice_from_one_parent > seeds.len() / 10,
            "{twice_from_one_parent}"
        );
        assert!(
            from_an_abandoned_branch > seeds.len() / 20,
            "{from_an_abandoned_branch}"
        );
    }
}
