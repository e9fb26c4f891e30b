//! The evidence a drill is judged by: the archive's own account of the window (segments per
//! timeline, gaps), whether the restored server reached the target by that account, the cause of
//! a failed recovery from the server log, and the --check-sql statements.

use super::server::is_server_failure;
use super::VerifyResult;
use crate::archive::Archive;
use crate::target::{postgres_text, Target};
use chrono::DateTime;
use tidemark_format::manifest::ManifestHeader;
use tidemark_format::wal::WalFileName;
use tidemark_format::{Lsn, TimelineId};

/// Judges whether recovery reached the target, against the repository's account.
#[allow(clippy::too_many_arguments)]
pub(super) fn reached_target(
    r: &mut VerifyResult,
    b: &ManifestHeader,
    target: &Target,
    a: &Archive,
    seg_size: u64,
    replayed: Lsn,
    commit: Option<&str>,
    log: &str,
) {
    if replayed < b.stop_lsn {
        r.check(
            "reached_target",
            false,
            format!("replay ended at {replayed}, before backup {}'s stop lsn {}: the restored cluster is not consistent", b.backup_id, b.stop_lsn),
        );
        return;
    }
    match target {
        Target::Latest => {
            // The highest timeline that descends from the backup's: recovery_target_timeline = latest.
            let last = a.last_segment_from(b.timeline.0);
            match last {
                None => r.check(
                    "reached_target",
                    false,
                    "the archive holds no segment on the backup's timeline or after",
                ),
                Some(last) => {
                    let start = last.segment_number(seg_size).unwrap_or(0) * seg_size;
                    if replayed.0 >= start {
                        r.check("reached_target", true, format!("replayed to {replayed}, inside or past the last archived segment {last}"));
                    } else {
                        let missing = WalFileName::segment_of(
                            TimelineId(last.timeline().0),
                            Lsn(replayed.0 + 1),
                            seg_size,
                        );
                        r.check(
                            "reached_target",
                            false,
                            format!("recovery ended at {replayed} but the archive holds wal up to segment {last} (starting at {}): replay stopped near {missing}, which PostgreSQL could not get or use", Lsn(start)),
                        );
                    }
                }
            }
        }
        Target::Time(t) => {
            let stopped = log.lines().find(|l| l.contains("recovery stopping"));
            let commit_t = commit.and_then(|c| DateTime::parse_from_rfc3339(c).ok());
            match (stopped, commit_t) {
                (_, Some(c)) if c > *t => r.check(
                    "reached_target",
                    false,
                    format!("the last replayed commit ({}) is after the target {}: recovery went too far", postgres_text(&c), postgres_text(t)),
                ),
                (Some(line), c) => r.check(
                    "reached_target",
                    true,
                    format!(
                        "replayed to {replayed}; last replayed commit {}; server: {}",
                        c.map(|c| postgres_text(&c)).unwrap_or_else(|| "none".into()),
                        line.split("LOG:").nth(1).unwrap_or(line).trim()
                    ),
                ),
                (None, _) => r.check(
                    "reached_target",
                    false,
                    format!("the server promoted at {replayed} without reporting that it reached the target {}", postgres_text(t)),
                ),
            }
        }
        other => {
            // The server's own account of where it stopped, for the target it was given.
            let want: Vec<String> = match other {
                Target::Lsn(l) => vec![
                    format!("recovery stopping after WAL location (LSN) \"{l}\""),
                    format!("recovery stopping before WAL location (LSN) \"{l}\""),
                ],
                Target::Xid(x) => [
                    "after commit",
                    "before commit",
                    "after abort",
                    "before abort",
                ]
                .iter()
                .map(|k| format!("recovery stopping {k} of transaction {x},"))
                .collect(),
                Target::Name(n) => vec![format!("recovery stopping at restore point \"{n}\"")],
                _ => vec!["recovery stopping after reaching consistency".to_string()],
            };
            match log.lines().find(|l| want.iter().any(|w| l.contains(w.as_str()))) {
                Some(line) => r.check(
                    "reached_target",
                    true,
                    format!(
                        "replayed to {replayed}; server: {}",
                        line.split("LOG:").nth(1).unwrap_or(line).trim()
                    ),
                ),
                None => r.check(
                    "reached_target",
                    false,
                    format!("the server promoted at {replayed} without reporting that it reached the target {}", other.describe()),
                ),
            }
        }
    }
}

/// The lines of a server log that explain a failed recovery, with a hint when we know one.
pub(super) fn recovery_cause(log: &str) -> String {
    let bad: Vec<&str> = log.lines().filter(|l| is_server_failure(l)).collect();
    let mut s = if bad.is_empty() {
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(10)..].join("\n")
    } else {
        bad.join("\n")
    };
    if log.contains("recovery ended before configured recovery target was reached") {
        s += "\nhint: the archive does not hold wal up to the target: a segment is missing or the target is after the last archived commit";
    }
    s
}

/// Counts `restored log file "X" from archive` lines.
pub(super) fn count_fetched(r: &mut VerifyResult, log: &str, a: &Archive) {
    let mut n = 0;
    let mut bytes = 0;
    for l in log.lines() {
        if let Some(rest) = l.split("restored log file \"").nth(1) {
            if let Some(name) = rest.split('"').next() {
                n += 1;
                bytes += a.size_of(name).unwrap_or(0);
            }
        }
    }
    r.wal_files_fetched = n;
    r.wal_bytes_fetched = bytes;
}

pub(super) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Splits a --check-sql file into statements: each ends with `;` at the end of a line; lines
/// starting with `--` are comments. A statement's label is its first line.
pub fn parse_check_sql(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("--") || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if t.ends_with(';') {
            push_stmt(&mut out, &mut cur);
        }
    }
    push_stmt(&mut out, &mut cur);
    out
}

fn push_stmt(out: &mut Vec<(String, String)>, cur: &mut String) {
    let sql = cur.trim().trim_end_matches(';').trim().to_string();
    cur.clear();
    if sql.is_empty() {
        return;
    }
    let label: String = sql.lines().next().unwrap_or("").chars().take(60).collect();
    out.push((label, sql));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cause_of_a_failed_recovery() {
        let log = "2026 LOG: starting\n2026 FATAL:  the database system is not yet accepting connections\n2026 FATAL:  recovery ended before configured recovery target was reached\n";
        let c = recovery_cause(log);
        assert!(c.contains("FATAL") && c.contains("hint:"), "{c}");
        assert!(!c.contains("not yet accepting"), "{c}");
    }
}
