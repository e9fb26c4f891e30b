//! Recovery targets: what `restore` (and `verify`) recover to, parsed from the command line and
//! checked before anything is written, so PostgreSQL is never given a setting it would refuse at
//! start-up (or, worse, read differently).
//!
//! Invariants:
//! - A target is exactly one of [`Target`]'s kinds; the settings that go with it
//!   ([`Recovery`]: inclusive or not, the action at the target, the timeline followed) are checked
//!   against it ([`Recovery::check`]): `--target-exclusive` only with time, LSN and xid targets,
//!   `--target-action` only with a target that stops before the end of the archive.
//! - Times keep their zone: a time without one is refused.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, FixedOffset, Timelike};
use tidemark_format::Lsn;

/// A parsed recovery target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Replay all archived WAL.
    Latest,
    /// Stop as soon as the backup's consistent state is reached (`recovery_target = 'immediate'`).
    Immediate,
    /// Stop at the first commit after this time (inclusive, like recovery_target_time).
    Time(DateTime<FixedOffset>),
    /// Stop at this WAL location (`recovery_target_lsn`).
    Lsn(Lsn),
    /// Stop at the commit (or abort) of this transaction (`recovery_target_xid`).
    Xid(u64),
    /// Stop at the restore point created with `pg_create_restore_point(name)`.
    Name(String),
}

impl Target {
    /// Whether recovery stops before the end of the archive at a point this target names.
    pub fn stops_early(&self) -> bool {
        !matches!(self, Target::Latest)
    }

    /// The target as printed in reports and JSON: `latest`, `immediate`, the time in
    /// PostgreSQL's form, `lsn 0/3000028`, `xid 742`, `name before-migration`.
    pub fn describe(&self) -> String {
        match self {
            Target::Latest => "latest".into(),
            Target::Immediate => "immediate".into(),
            Target::Time(t) => postgres_text(t),
            Target::Lsn(l) => format!("lsn {l}"),
            Target::Xid(x) => format!("xid {x}"),
            Target::Name(n) => format!("name {n}"),
        }
    }
}

/// What the server does once it reaches the target (`recovery_target_action`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// End recovery and accept writes on a new timeline.
    #[default]
    Promote,
    /// Stay in recovery, paused, for inspection (`pg_wal_replay_resume()` then promotes).
    Pause,
    /// Stop the server; starting it again replays to the target once more and stops again.
    Shutdown,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Promote => "promote",
            Action::Pause => "pause",
            Action::Shutdown => "shutdown",
        }
    }
}

/// The timeline recovery follows (`recovery_target_timeline`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimelineTarget {
    /// The newest timeline in the archive.
    #[default]
    Latest,
    /// The backup's own timeline: never follows a later branch.
    Current,
    /// This timeline (its `.history` file must be archived unless it is timeline 1).
    Id(u32),
}

impl TimelineTarget {
    /// The value written into `recovery_target_timeline`.
    pub fn setting(self) -> String {
        match self {
            TimelineTarget::Latest => "latest".into(),
            TimelineTarget::Current => "current".into(),
            TimelineTarget::Id(t) => t.to_string(),
        }
    }
}

/// Parses `--target-timeline`: `latest`, `current`, or a timeline number (decimal, or hex with
/// `0x` as in history file names).
pub fn parse_timeline(s: &str) -> Result<TimelineTarget> {
    let t = s.trim();
    let n = match t.to_ascii_lowercase().as_str() {
        "latest" => return Ok(TimelineTarget::Latest),
        "current" => return Ok(TimelineTarget::Current),
        x => match x.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => x.parse::<u32>().ok(),
        },
    };
    match n {
        Some(n) if n >= 1 => Ok(TimelineTarget::Id(n)),
        _ => bail!("target timeline {s:?} is not a timeline\nhint: --target-timeline latest, current, or a timeline number such as 2"),
    }
}

/// Parses `--target-lsn` in PostgreSQL's form `16/B374D848`.
pub fn parse_lsn(s: &str) -> Result<Lsn> {
    let t = s.trim();
    let ok = t.split_once('/').is_some_and(|(a, b)| {
        (1..=8).contains(&a.len())
            && (1..=8).contains(&b.len())
            && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_hexdigit())
    });
    if !ok {
        bail!("target lsn {s:?} is not a WAL location\nhint: use PostgreSQL's form, e.g. --target-lsn 0/3000028 (pg_current_wal_lsn() prints it)");
    }
    t.parse::<Lsn>()
        .ok()
        .with_context(|| format!("target lsn {s:?} is not a WAL location\nhint: use PostgreSQL's form, e.g. --target-lsn 0/3000028"))
}

/// Parses `--target-xid`: a transaction id as `txid_current()` / `pg_current_xact_id()` print it
/// (a 32-bit xid, or 64-bit with its epoch); 0, 1 and 2 are never a transaction's.
pub fn parse_xid(s: &str) -> Result<u64> {
    match s.trim().parse::<u64>() {
        Ok(x) if x >= 3 => Ok(x),
        _ => bail!("target xid {s:?} is not a transaction id\nhint: give the number txid_current() or pg_current_xact_id() returned, e.g. --target-xid 742"),
    }
}

/// Checks `--target-name`: what `pg_create_restore_point()` accepts (1..=63 bytes).
pub fn parse_name(s: &str) -> Result<String> {
    if s.is_empty() || s.len() > 63 || s.contains('\0') {
        bail!("target name {s:?} is not a restore point name\nhint: give the name passed to pg_create_restore_point() (1 to 63 bytes)");
    }
    Ok(s.to_string())
}

/// A target with its settings: what a restore writes into the recovery settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub target: Target,
    /// `recovery_target_inclusive = false`: stop just before the target (time, LSN, xid).
    pub exclusive: bool,
    pub action: Action,
    pub timeline: TimelineTarget,
}

impl Recovery {
    /// The defaults of a restore to `target`: inclusive, promote, the latest timeline.
    pub fn to(target: Target) -> Recovery {
        Recovery {
            target,
            exclusive: false,
            action: Action::Promote,
            timeline: TimelineTarget::Latest,
        }
    }

    /// Refuses settings PostgreSQL would ignore for this target, so nothing is silently dropped.
    pub fn check(&self) -> Result<()> {
        if self.exclusive
            && !matches!(
                self.target,
                Target::Time(_) | Target::Lsn(_) | Target::Xid(_)
            )
        {
            bail!("--target-exclusive does not apply to target {}\nhint: it stops just before a --target-time, --target-lsn or --target-xid; leave it out", self.target.describe());
        }
        if self.action != Action::Promote && !self.target.stops_early() {
            bail!("--target-action {} does not apply to --target latest (recovery ends at the end of the archive and always promotes)\nhint: give a target that stops earlier (--target immediate, --target-time, --target-lsn, --target-xid or --target-name)", self.action.as_str());
        }
        Ok(())
    }
}

/// A restore as a standby (`restore --standby`): `standby.signal` instead of `recovery.signal`,
/// no recovery target, and the primary to stream from when one is given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Standby {
    /// `primary_conninfo`; it may hold a password, so it prints redacted.
    pub primary_conninfo: Option<crate::pg::ConnString>,
}

/// Parses `2026-11-21T20:40:12.5Z`, `2026-11-21 20:40:12.123456+00`, `... +05:30` and similar.
/// A time without a zone is refused: it would mean different instants on different machines.
/// So is a time between two microseconds (`20:40:12.1234565Z`): PostgreSQL keeps commit times
/// and `recovery_target_time` in microseconds, and no one rounding of it keeps both the
/// inclusive and the exclusive meaning (a commit at `.123456` is before the target, yet
/// `.123456` exclusive would leave it out; `.123457` inclusive would take in a later one).
pub fn parse_time(s: &str) -> Result<DateTime<FixedOffset>> {
    let t = parse_time_any_precision(s)?;
    if t.timestamp_subsec_nanos() % 1000 != 0 {
        let floor = t
            .with_nanosecond(t.timestamp_subsec_nanos() / 1000 * 1000)
            .context("a whole microsecond is a valid time")?;
        bail!("target time {s:?} lies between two microseconds; PostgreSQL's commit times and recovery targets are whole microseconds\nhint: give at most 6 fractional digits, e.g. {} (commits up to and including that microsecond)", postgres_text(&floor));
    }
    Ok(t)
}

fn parse_time_any_precision(s: &str) -> Result<DateTime<FixedOffset>> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d);
    }
    let norm = match t.as_bytes().get(10) {
        Some(b'T') | Some(b't') => format!("{} {}", &t[..10], &t[11..]),
        _ => t.to_string(),
    };
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
    ] {
        if let Ok(d) = DateTime::parse_from_str(&norm, fmt) {
            return Ok(d);
        }
    }
    let norm_utc = norm.trim_end_matches(" UTC").trim_end_matches("Z");
    if norm_utc.len() != norm.len() {
        if let Ok(n) = chrono::NaiveDateTime::parse_from_str(norm_utc, "%Y-%m-%d %H:%M:%S%.f") {
            return Ok(n.and_utc().fixed_offset());
        }
    }
    bail!("target time {s:?} is not a timestamp with a time zone\nhint: use RFC 3339 (2026-11-21T20:40:12Z) or PostgreSQL's form (2026-11-21 20:40:12.123456+00)")
}

/// Formats a time the way recovery_target_time accepts it, keeping microseconds and the offset.
pub fn postgres_text(t: &DateTime<FixedOffset>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_and_postgres_forms() {
        let want = parse_time("2026-11-21T20:40:12.123456Z").unwrap();
        for s in [
            "2026-11-21 20:40:12.123456+00",
            "2026-11-21 20:40:12.123456+00:00",
            "2026-11-21 22:40:12.123456+02",
            "2026-11-21 20:40:12.123456 UTC",
            "2026-11-21T20:40:12.123456+00:00",
        ] {
            assert_eq!(parse_time(s).unwrap(), want, "{s}");
        }
        assert_eq!(
            parse_time("2026-11-21 20:40:12+05:30").unwrap().timestamp(),
            want.timestamp() - 5 * 3600 - 1800
        );
        for s in [
            "2026-11-21 20:40:12",
            "yesterday",
            "",
            "2026-13-01T00:00:00Z",
        ] {
            assert!(parse_time(s).is_err(), "{s}");
        }
        assert_eq!(postgres_text(&want), "2026-11-21 20:40:12.123456+00:00");
    }

    #[test]
    fn a_time_between_two_microseconds_is_refused() {
        let want = parse_time("2026-11-21T20:40:12.123456Z").unwrap();
        for s in [
            "2026-11-21T20:40:12.123456000Z",
            "2026-11-21 20:40:12.1234560+00",
        ] {
            assert_eq!(parse_time(s).unwrap(), want, "{s}");
        }
        for s in [
            "2026-11-21T20:40:12.1234565Z",
            "2026-11-21 20:40:12.123456001+00",
            "2026-11-21 20:40:12.000000999 UTC",
        ] {
            let e = parse_time(s).unwrap_err().to_string();
            assert!(e.contains("between two microseconds"), "{s}: {e}");
        }
        let e = parse_time("2026-11-21T20:40:12.1234565Z")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "hint: give at most 6 fractional digits, e.g. 2026-11-21 20:40:12.123456+00:00"
            ),
            "{e}"
        );
    }

    #[test]
    fn parses_lsn_xid_name_and_timeline_and_refuses_the_rest() {
        assert_eq!(parse_lsn("0/3000028").unwrap(), Lsn(0x3000028));
        assert_eq!(parse_lsn("16/B374D848").unwrap(), Lsn(0x16_B374_D848));
        for s in [
            "",
            "3000028",
            "0/",
            "/1",
            "0/xyz",
            "123456789/0",
            "0/3000028/1",
        ] {
            let e = parse_lsn(s).unwrap_err().to_string();
            assert!(e.contains("hint:"), "{s}: {e}");
        }
        assert_eq!(parse_xid("742").unwrap(), 742);
        assert_eq!(parse_xid("4294967301").unwrap(), 4_294_967_301);
        for s in ["", "2", "-5", "abc", "1.5"] {
            assert!(parse_xid(s).is_err(), "{s}");
        }
        assert_eq!(parse_name("before-migration").unwrap(), "before-migration");
        assert!(parse_name("").is_err());
        assert!(parse_name(&"x".repeat(64)).is_err());
        assert_eq!(parse_timeline("latest").unwrap(), TimelineTarget::Latest);
        assert_eq!(parse_timeline("current").unwrap(), TimelineTarget::Current);
        assert_eq!(parse_timeline("3").unwrap(), TimelineTarget::Id(3));
        assert_eq!(parse_timeline("0x1A").unwrap(), TimelineTarget::Id(26));
        for s in ["0", "-1", "newest", ""] {
            assert!(parse_timeline(s).is_err(), "{s}");
        }
    }

    #[test]
    fn settings_that_do_not_apply_to_a_target_are_refused() {
        let mut r = Recovery::to(Target::Xid(742));
        r.exclusive = true;
        r.action = Action::Pause;
        r.check().unwrap();
        r.target = Target::Name("p".into());
        assert!(r
            .check()
            .unwrap_err()
            .to_string()
            .contains("--target-exclusive"));
        r.exclusive = false;
        r.check().unwrap();
        r.target = Target::Latest;
        assert!(r
            .check()
            .unwrap_err()
            .to_string()
            .contains("--target-action pause"));
        r.action = Action::Promote;
        r.check().unwrap();
    }
}
