//! Recovery targets: parsing a target time in RFC 3339 or PostgreSQL's timestamptz text form.

use anyhow::{bail, Result};
use chrono::{DateTime, FixedOffset};

/// A parsed recovery target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Replay all archived WAL.
    Latest,
    /// Stop at the first commit after this time (inclusive, like recovery_target_time).
    Time(DateTime<FixedOffset>),
}

/// Parses `2026-11-21T20:40:12.5Z`, `2026-11-21 20:40:12.123456+00`, `... +05:30` and similar.
/// A time without a zone is refused: it would mean different instants on different machines.
pub fn parse_time(s: &str) -> Result<DateTime<FixedOffset>> {
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
}
