//! Over 500 lines because its table tests live beside the code; the rules are about 230.
//!
//! The retention plan: which backups a policy keeps, and why. Pure: `now` is an argument.
//!
//! Invariants:
//! - Backups are ordered by (`stop_time_us`, `stop_lsn`) from their manifests, never by id.
//! - The newest backup is always kept, whatever the policy: expire never empties a repository.
//! - `--retain-window W` keeps every backup that stopped within W before `now` *and* the newest
//!   backup that stopped before `now - W`, so every point from `now - W` on stays restorable.
//! - Grandfather-father-son keeps, for each of the newest N days / ISO weeks / months (UTC) that
//!   hold a backup, the newest backup of that period.
//! - After a failover or a PITR fork some backups lie on an abandoned branch: a restore of the
//!   latest timeline cannot start from them. The rules are applied to all backups *and* to the
//!   usable ones alone (union), so a rule never keeps only abandoned backups: the newest usable
//!   backup is always kept, `--retain-last N` keeps N usable ones, a window keeps the usable
//!   backup that covers its start.

use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

/// What a policy asks to keep. At least one rule must be set.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Policy {
    pub retain_last: Option<u32>,
    /// Recovery window in microseconds.
    pub retain_window_us: Option<i64>,
    pub retain_daily: Option<u32>,
    pub retain_weekly: Option<u32>,
    pub retain_monthly: Option<u32>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.retain_last.is_none()
            && self.retain_window_us.is_none()
            && self.retain_daily.is_none()
            && self.retain_weekly.is_none()
            && self.retain_monthly.is_none()
    }
}

/// The facts about one backup retention needs (from its manifest).
#[derive(Clone, Debug)]
pub struct BackupFacts {
    pub id: String,
    pub stop_time_us: i64,
    pub stop_lsn: u64,
    /// Whether it lies on the history of the timeline a restore follows (`latest`): a backup
    /// of an abandoned branch cannot start that recovery (`crate::timeline`).
    pub usable: bool,
}

/// The decision for one backup.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    /// Why it is kept (every rule that keeps it), or why it is removed.
    pub reasons: Vec<String>,
}

/// Parses a duration such as `14d`, `36h`, `90m`, `2w`, `30s` into microseconds.
pub fn parse_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(secs)?.checked_mul(1_000_000)
}

/// Parses a size such as `1GiB`, `512MiB`, `64KiB` or a plain byte count into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// `14d`, `36h`, `90m` or `30s`: the largest unit that divides `us` exactly.
fn human_duration(us: i64) -> String {
    let secs = us / 1_000_000;
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= n && secs % n == 0 {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

fn period_keys(us: i64) -> (String, String, String) {
    let t = DateTime::<Utc>::from_timestamp_micros(us).unwrap_or_default();
    let w = t.iso_week();
    (
        t.format("%Y-%m-%d").to_string(),
        format!("{}-W{:02}", w.year(), w.week()),
        t.format("%Y-%m").to_string(),
    )
}

/// Decides every backup; the result is ordered newest first. The rules run over every backup
/// and over the usable ones alone; a backup either run keeps is kept.
pub fn plan(backups: &[BackupFacts], policy: &Policy, now_us: i64) -> Vec<Decision> {
    let all = rules(backups, policy, now_us);
    if backups.iter().all(|b| b.usable) {
        return all;
    }
    let usable: Vec<BackupFacts> = backups.iter().filter(|b| b.usable).cloned().collect();
    let by_usable: BTreeMap<String, Decision> = rules(&usable, policy, now_us)
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    let usable_ids: std::collections::BTreeSet<&str> =
        usable.iter().map(|b| b.id.as_str()).collect();
    all.into_iter()
        .map(|d| {
            if !usable_ids.contains(d.id.as_str()) {
                if !d.keep {
                    return d;
                }
                let mut reasons = d.reasons;
                reasons.push(
                    "on an abandoned timeline branch: a restore of the latest timeline cannot use it"
                        .into(),
                );
                return Decision { reasons, ..d };
            }
            let u = by_usable.get(&d.id).filter(|u| u.keep);
            match u {
                None => d,
                Some(u) => {
                    let mut reasons = if d.keep { d.reasons } else { Vec::new() };
                    for r in &u.reasons {
                        if !reasons.contains(r) {
                            reasons.push(format!(
                                "{r} among the backups the latest timeline can use"
                            ));
                        }
                    }
                    Decision {
                        id: d.id,
                        keep: true,
                        reasons,
                    }
                }
            }
        })
        .collect()
}

/// The rules over `backups`, newest first.
fn rules(backups: &[BackupFacts], policy: &Policy, now_us: i64) -> Vec<Decision> {
    let mut order: Vec<&BackupFacts> = backups.iter().collect();
    order.sort_by_key(|b| std::cmp::Reverse((b.stop_time_us, b.stop_lsn)));
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); order.len()];
    if !order.is_empty() {
        reasons[0].push("newest backup".into());
    }
    if let Some(n) = policy.retain_last {
        for r in reasons.iter_mut().take(n as usize) {
            r.push(format!("one of the last {n}"));
        }
    }
    if let Some(w) = policy.retain_window_us {
        let start = now_us.saturating_sub(w);
        let days = human_duration(w);
        let mut covered = false;
        for (i, b) in order.iter().enumerate() {
            if b.stop_time_us >= start {
                reasons[i].push(format!("inside the {days} recovery window"));
            } else if !covered {
                reasons[i].push(format!(
                    "the newest backup before the {days} recovery window starts: needed to restore to its first moments"
                ));
                covered = true;
            }
        }
    }
    let gfs = [
        (policy.retain_daily, "daily", 0usize),
        (policy.retain_weekly, "weekly", 1),
        (policy.retain_monthly, "monthly", 2),
    ];
    for (count, name, which) in gfs {
        let Some(count) = count else { continue };
        // period -> newest backup in it; order is newest first so the first seen wins.
        let mut newest: BTreeMap<String, usize> = BTreeMap::new();
        for (i, b) in order.iter().enumerate() {
            let k = period_keys(b.stop_time_us);
            let key = [k.0, k.1, k.2][which].clone();
            newest.entry(key).or_insert(i);
        }
        for (period, i) in newest.iter().rev().take(count as usize) {
            reasons[*i].push(format!(
                "{name} {period} (one of the newest {count} {name})"
            ));
        }
    }
    order
        .iter()
        .zip(reasons)
        .map(|(b, r)| {
            let keep = !r.is_empty();
            Decision {
                id: b.id.clone(),
                keep,
                reasons: if keep {
                    r
                } else {
                    vec!["matched by no retention rule".into()]
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;
    const HOUR: i64 = 3_600_000_000;
    /// 2026-11-21T00:00:00Z, a Saturday.
    const T0: i64 = 1_795_219_200_000_000;

    fn b(id: &str, stop: i64) -> BackupFacts {
        BackupFacts {
            id: id.into(),
            stop_time_us: stop,
            stop_lsn: stop as u64,
            usable: true,
        }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        let mut v: Vec<&str> = d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("14d"), Some(14 * DAY));
        assert_eq!(parse_duration("36h"), Some(36 * HOUR));
        assert_eq!(parse_duration("2w"), Some(14 * DAY));
        assert_eq!(parse_duration("90m"), Some(90 * 60_000_000));
        assert_eq!(parse_duration("d"), None);
        assert_eq!(parse_duration("14"), None);
        assert_eq!(parse_duration("14y"), None);
        assert_eq!(human_duration(14 * DAY), "14d");
        assert_eq!(human_duration(36 * HOUR), "36h");
        assert_eq!(human_duration(90 * 60_000_000), "90m");
        assert_eq!(human_duration(7_000_000), "7s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("1GB"), None);
        assert_eq!(parse_size("GiB"), None);
        assert_eq!(parse_size("99999999999TiB"), None);
    }

    #[test]
    fn table() {
        // Nightly backups at 01:00 for 40 days (z39 newest); ids vs time order: see below.
        let nightly: Vec<BackupFacts> = (0..40)
            .map(|d| b(&format!("z{:02}", 39 - d), T0 - d * DAY + HOUR))
            .collect();
        let now = T0 + 12 * HOUR;
        let ids = |r: std::ops::Range<i64>| -> Vec<String> {
            let mut v: Vec<String> = r.map(|d| format!("z{:02}", 39 - d)).collect();
            v.sort();
            v
        };
        struct Case {
            name: &'static str,
            policy: Policy,
            kept: Vec<String>,
        }
        let cases = vec![
            Case {
                name: "last 3",
                policy: Policy {
                    retain_last: Some(3),
                    ..Default::default()
                },
                kept: ids(0..3),
            },
            Case {
                name: "last 0 still keeps the newest",
                policy: Policy {
                    retain_last: Some(0),
                    ..Default::default()
                },
                kept: ids(0..1),
            },
            Case {
                name: "window 2d: two inside plus the one before the window",
                // window starts T0 - 1.5 d: backups at T0+1h, T0-1d+1h inside; T0-2d+1h covers.
                policy: Policy {
                    retain_window_us: Some(2 * DAY),
                    ..Default::default()
                },
                kept: ids(0..3),
            },
            Case {
                name: "daily 5",
                policy: Policy {
                    retain_daily: Some(5),
                    ..Default::default()
                },
                kept: ids(0..5),
            },
            Case {
                name: "weekly 3: newest of this week and of the two before",
                // T0 = Sat 2026-11-21 (week 47); week 46 ends Sun 11-15 (d=6), week 45 ends 11-08 (d=13)
                policy: Policy {
                    retain_weekly: Some(3),
                    ..Default::default()
                },
                kept: {
                    let mut v = vec!["z39".to_string(), "z33".into(), "z26".into()];
                    v.sort();
                    v
                },
            },
            Case {
                name: "monthly 2: newest of November and of October",
                // d=21 is 2026-10-31 01:00
                policy: Policy {
                    retain_monthly: Some(2),
                    ..Default::default()
                },
                kept: {
                    let mut v = vec!["z39".to_string(), "z18".into()];
                    v.sort();
                    v
                },
            },
            Case {
                name: "rules combine by union",
                policy: Policy {
                    retain_last: Some(2),
                    retain_monthly: Some(2),
                    ..Default::default()
                },
                kept: {
                    let mut v = vec!["z39".to_string(), "z38".into(), "z18".into()];
                    v.sort();
                    v
                },
            },
        ];
        for c in cases {
            let d = plan(&nightly, &c.policy, now);
            assert_eq!(d.len(), 40, "{}", c.name);
            assert_eq!(
                kept(&d),
                c.kept.iter().map(String::as_str).collect::<Vec<_>>(),
                "{}",
                c.name
            );
            // ordered newest first, every removal has a reason
            assert!(d.windows(2).all(|w| w[0].id > w[1].id), "{}", c.name);
            assert!(d.iter().all(|x| !x.reasons.is_empty()), "{}", c.name);
        }
    }

    #[test]
    fn window_is_restorable_from_its_start() {
        // Irregular backups; whatever `now`, the oldest kept backup stopped at or before now - W.
        let stops = [0, 5 * HOUR, 7 * HOUR, 30 * HOUR, 31 * HOUR, 80 * HOUR];
        let backups: Vec<_> = stops
            .iter()
            .enumerate()
            .map(|(i, s)| b(&format!("b{i}"), T0 + s))
            .collect();
        for now_h in (81..200).step_by(7) {
            let now = T0 + now_h * HOUR;
            for w_h in [1i64, 10, 24, 50, 100, 500] {
                let d = plan(
                    &backups,
                    &Policy {
                        retain_window_us: Some(w_h * HOUR),
                        ..Default::default()
                    },
                    now,
                );
                let oldest_kept = backups
                    .iter()
                    .filter(|x| d.iter().any(|y| y.keep && y.id == x.id))
                    .map(|x| x.stop_time_us)
                    .min()
                    .unwrap();
                let start = now - w_h * HOUR;
                assert!(
                    oldest_kept <= start.max(T0),
                    "now {now_h}h window {w_h}h: oldest kept {oldest_kept} after window start {start}"
                );
                // and nothing older than necessary is kept
                let kept_before: usize = backups
                    .iter()
                    .filter(|x| x.stop_time_us < start && d.iter().any(|y| y.keep && y.id == x.id))
                    .count();
                assert!(kept_before <= 1);
            }
        }
    }

    #[test]
    fn ordering_uses_time_then_lsn_not_ids() {
        // Same stop time (clock resolution): the greater stop LSN is newer.
        let bs = vec![
            BackupFacts {
                id: "b".into(),
                stop_time_us: T0,
                stop_lsn: 10,
                usable: true,
            },
            BackupFacts {
                id: "a".into(),
                stop_time_us: T0,
                stop_lsn: 20,
                usable: true,
            },
        ];
        let d = plan(
            &bs,
            &Policy {
                retain_last: Some(1),
                ..Default::default()
            },
            T0,
        );
        assert_eq!(kept(&d), vec!["a"]);
    }

    #[test]
    fn abandoned_backups_never_satisfy_a_rule_alone() {
        // a and b usable; c and d newer but on an abandoned branch (a fork older than them).
        let mut bs: Vec<BackupFacts> = [("a", 0), ("b", HOUR), ("c", 2 * HOUR), ("d", 3 * HOUR)]
            .iter()
            .map(|(id, s)| b(id, T0 + s))
            .collect();
        bs[2].usable = false;
        bs[3].usable = false;
        let keep = |p: Policy| kept(&plan(&bs, &p, T0 + 4 * HOUR)).join(",");
        let last = |n| Policy {
            retain_last: Some(n),
            ..Default::default()
        };
        assert_eq!(keep(last(1)), "b,d");
        assert_eq!(keep(last(2)), "a,b,c,d");
        let window = |h| Policy {
            retain_window_us: Some(h * HOUR),
            ..Default::default()
        };
        // The window starts at T0 + 3 h: d inside and c covering it among all, b covering it
        // among the usable.
        assert_eq!(keep(window(1)), "b,c,d");
        let d = plan(&bs, &last(1), T0 + 4 * HOUR);
        assert_eq!(d[0].id, "d");
        assert!(
            d[0].reasons.iter().any(|r| r.contains("abandoned")),
            "{d:?}"
        );
        assert_eq!(
            d[2].reasons[0],
            "newest backup among the backups the latest timeline can use"
        );
        // No backup usable: the rules over all backups alone.
        for x in &mut bs {
            x.usable = false;
        }
        assert_eq!(kept(&plan(&bs, &last(1), T0 + 4 * HOUR)), vec!["d"]);
    }

    #[test]
    fn empty_repository() {
        assert!(plan(
            &[],
            &Policy {
                retain_last: Some(1),
                ..Default::default()
            },
            T0
        )
        .is_empty());
    }
}
