//! Timeline histories: which backups can reach the timeline a restore will follow.
//!
//! A restore writes `recovery_target_timeline = 'latest'`, so PostgreSQL follows the newest
//! timeline whose `.history` file the archive holds. A backup can start that recovery only if its
//! timeline is that timeline or one of its ancestors *and* the backup stopped before the point
//! where the history left the backup's timeline. A backup taken on an abandoned branch (e.g. the
//! old primary after a failover) cannot: PostgreSQL would refuse it ("requested timeline is not a
//! child of this server's history"), or worse, a newer backup on the abandoned branch would be
//! picked over an older usable one. Invariant: `History::contains` never admits such a backup;
//! `archive::history` reads the history recovery follows and `archive::choose` applies it.

use anyhow::{bail, Context, Result};
use tidemark_format::Lsn;

/// One line of a history file: `tli` ended at `switch` (the next timeline starts there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ancestor {
    pub tli: u32,
    pub switch: Lsn,
}

/// A timeline and its ancestors, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    pub tli: u32,
    pub ancestors: Vec<Ancestor>,
}

impl History {
    /// Timeline 1 (or any timeline without a history file): no ancestors.
    pub fn root(tli: u32) -> History {
        History {
            tli,
            ancestors: Vec::new(),
        }
    }

    /// Parses PostgreSQL's `TTTTTTTT.history` text: `parentTLI<TAB>X/X<TAB>reason` lines;
    /// comments (`#`) and blank lines are skipped.
    pub fn parse(tli: u32, text: &str) -> Result<History> {
        let mut ancestors = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut f = line.split_whitespace();
            let (Some(t), Some(lsn)) = (f.next(), f.next()) else {
                bail!(
                    "line {} of {tli:08X}.history has no switch point: {line:?}",
                    i + 1
                );
            };
            let parent: u32 = t.parse().with_context(|| {
                format!(
                    "line {} of {tli:08X}.history: {t:?} is not a timeline",
                    i + 1
                )
            })?;
            let switch: Lsn = lsn.parse().with_context(|| {
                format!("line {} of {tli:08X}.history: {lsn:?} is not an LSN", i + 1)
            })?;
            if parent >= tli || ancestors.last().is_some_and(|a: &Ancestor| a.tli >= parent) {
                bail!(
                    "{tli:08X}.history lists timeline {parent} out of order\nhint: the history file is damaged"
                );
            }
            ancestors.push(Ancestor {
                tli: parent,
                switch,
            });
        }
        Ok(History { tli, ancestors })
    }

    /// Whether a backup on `tli` that stopped at `stop` lies on this history: on the timeline
    /// itself, or on an ancestor at or before the point the history left it.
    pub fn contains(&self, tli: u32, stop: Lsn) -> bool {
        tli == self.tli
            || self
                .ancestors
                .iter()
                .any(|a| a.tli == tli && stop <= a.switch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_answers_ancestry() {
        let text = "1\t0/5000000\tno recovery target specified\n\n# comment\n2\t0/9000028\tbefore 2026-11-21\n";
        let h = History::parse(3, text).unwrap();
        assert_eq!(h.ancestors.len(), 2);
        assert_eq!(h.ancestors[1].switch, "0/9000028".parse().unwrap());
        assert!(h.contains(3, Lsn(u64::MAX)));
        assert!(h.contains(1, "0/4000000".parse().unwrap()));
        assert!(h.contains(1, "0/5000000".parse().unwrap()));
        // Stopped after timeline 1 was left: the abandoned branch.
        assert!(!h.contains(1, "0/5000001".parse().unwrap()));
        assert!(!h.contains(4, Lsn(1)));
        assert!(History::root(1).contains(1, Lsn(7)));
        assert!(!History::root(1).contains(2, Lsn(7)));
    }

    #[test]
    fn rejects_damaged_histories() {
        for bad in [
            "1",
            "x\t0/1\tr",
            "1\tnot-an-lsn\tr",
            "2\t0/1\tr\n1\t0/2\tr",
            "3\t0/1\tr",
        ] {
            let e = History::parse(3, bad).unwrap_err().to_string();
            assert!(e.contains("00000003.history"), "{bad:?}: {e}");
        }
    }
}
