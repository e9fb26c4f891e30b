//! The files a restore writes itself once the backup's files are in place: `backup_label` and
//! `tablespace_map` from the manifest, `recovery.signal` (`standby.signal` for a standby), and
//! the recovery settings at the end of `postgresql.auto.conf`.
//!
//! Invariants:
//! - Every one of them is a new file (`O_CREAT | O_EXCL | O_NOFOLLOW` below the target's open
//!   descriptor, [`SafeDir`]); `postgresql.auto.conf` is read back (never through a symlink),
//!   removed and written anew with the settings appended, so nothing is written through a link
//!   a backup could have put there.
//! - The settings come last in the file, so they win over anything the backup's own
//!   `postgresql.auto.conf` says (PostgreSQL applies the last occurrence of a setting).
//! - Every `recovery_target*` is written: the target's own one last, after the others cleared
//!   to `''` (PostgreSQL refuses to start when a target setting is assigned after another is
//!   set), then `recovery_target_inclusive`, `_action` and `_timeline`.
//! - With [`ArchiveMode::Off`] the settings include `archive_mode = off`: the restored server
//!   archives nothing until an operator turns archiving back on.
//! - A restore that promotes with tidemark's `wal-fetch` gets the promotion marker and a token in
//!   both it and its signal file (`super::promote`): to the end of the archive `standby.signal`
//!   with `primary_conninfo` and `primary_slot_name` cleared; to a target whose action is
//!   `promote`, `recovery.signal` with the action written as `pause` and `hot_standby = on`.
//!   PostgreSQL stops at the same place and promotes without the end-of-recovery checkpoint.
//! - A standby gets `standby.signal` and no `recovery.signal`, every `recovery_target*` cleared,
//!   and `primary_conninfo` (and `primary_slot_name`) written either way: the one given, else
//!   `''`, so a standby never streams from a primary the backup's own settings named. The
//!   conninfo is written quoted and never logged.
//! - Values are quoted as postgresql.conf reads them: `'` doubled, `\` doubled, line breaks
//!   escaped, so no value can end its string early or start another setting.

use super::layout::{Layout, AUTO_CONF};
use super::{RestoreOptions, SafeDir};
use crate::pg::conf_quote;
use crate::target::{postgres_text, Target};
use anyhow::{Context, Result};
use std::io::Write;
use tidemark_format::manifest::ManifestHeader;

/// Largest `postgresql.auto.conf` a restore reads back (PostgreSQL writes a few KiB).
const MAX_AUTO_CONF: u64 = 16 << 20;

/// What the restored server does about WAL archiving (`restore --archive-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveMode {
    /// Write `archive_mode = off`: a copy never archives into the repository it came from.
    Off,
    /// Keep the backup's own `archive_mode` (and `archive_command`).
    Preserve,
}

impl ArchiveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveMode::Off => "off",
            ArchiveMode::Preserve => "preserve",
        }
    }
}

impl std::fmt::Display for ArchiveMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The recovery settings appended to postgresql.auto.conf.
fn settings(h: &ManifestHeader, opts: &RestoreOptions) -> String {
    let mut text = format!(
        "\n# recovery settings written by tidemark-restore (backup {})\n",
        h.backup_id
    );
    text += &format!("restore_command = {}\n", conf_quote(&opts.restore_command));
    // A backup of a server that was itself restored carries that restore's settings in its
    // postgresql.auto.conf: every recovery_target* is written, the unused ones cleared, so none
    // of them silently applies.
    let rec = &opts.recovery;
    let (mut target, mut time, mut lsn, mut xid, mut name) = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    match &rec.target {
        Target::Latest => {}
        Target::Immediate => target = "immediate".into(),
        Target::Time(t) => time = postgres_text(t),
        Target::Lsn(l) => lsn = l.to_string(),
        Target::Xid(x) => xid = x.to_string(),
        Target::Name(n) => name = n.clone(),
    }
    let mut targets = [
        ("recovery_target", target),
        ("recovery_target_lsn", lsn),
        ("recovery_target_name", name),
        ("recovery_target_time", time),
        ("recovery_target_xid", xid),
    ];
    // PostgreSQL refuses to start ("multiple recovery targets specified") when any other
    // recovery_target* is assigned, even to '', after one is set: the one set comes last.
    targets.sort_by_key(|(_, v)| !v.is_empty());
    for (setting, value) in targets {
        text += &format!("{setting} = {}\n", conf_quote(&value));
    }
    // Inclusive is PostgreSQL's default; written either way so a carried-over setting never
    // applies. A target that is never reached ends recovery with FATAL "recovery ended before
    // configured recovery target was reached" (PostgreSQL 13 and later): nothing is promoted.
    text += &format!(
        "recovery_target_inclusive = {}\n",
        if rec.exclusive { "off" } else { "on" }
    );
    let fast = promotes_fast(opts);
    let latest = matches!(rec.target, Target::Latest);
    // A target promoted fast pauses there, where PostgreSQL acts on wal-fetch's promotion
    // request (`super::promote`): the same stop, then a promotion without the checkpoint.
    let action = if fast && !latest {
        crate::target::Action::Pause
    } else {
        rec.action
    };
    text += &format!(
        "recovery_target_action = {}\nrecovery_target_timeline = {}\n",
        conf_quote(action.as_str()),
        conf_quote(&rec.timeline.setting())
    );
    if action == crate::target::Action::Pause {
        // Pause needs hot_standby (without it PostgreSQL shuts down instead).
        text += "hot_standby = on\n";
    }
    if fast && latest {
        // Standby mode would stream from a primary_conninfo the backup carried (a backup of a
        // standby made with pg_basebackup -R): cleared, so the archive is all it replays.
        text += &format!(
            "# standby.signal and {}: wal-fetch asks PostgreSQL to promote this server, which it\n\
             # does when the archive has no next segment, without the end-of-recovery checkpoint\n\
             # to wait for; it replays the archive only\n\
             primary_conninfo = ''\nprimary_slot_name = ''\n",
            super::promote::MARKER
        );
    } else if fast {
        text += &format!(
            "# {}: wal-fetch asks PostgreSQL to promote this server, which it does where it\n\
             # pauses at the target, without the end-of-recovery checkpoint to wait for\n",
            super::promote::MARKER
        );
    }
    if let Some(standby) = &opts.standby {
        // Written either way, so a primary_conninfo or slot the backup carried (a backup of a
        // standby made with pg_basebackup -R) never applies.
        let conninfo = standby
            .primary_conninfo
            .as_ref()
            .map(|c| c.expose())
            .unwrap_or("");
        text += &format!(
            "# --standby: stays in recovery, read-only, following the archive{}\n\
             primary_conninfo = {}\nprimary_slot_name = ''\nhot_standby = on\n",
            if conninfo.is_empty() {
                ""
            } else {
                " and streaming from primary_conninfo"
            },
            conf_quote(conninfo)
        );
    }
    match opts.archive_mode {
        ArchiveMode::Off => {
            text += "# --archive-mode off: this copy archives nothing (a copy must not push its WAL into the\n\
                     # repository of the cluster it came from); turn it on only on the one server that\n\
                     # replaces the original, and take a new base backup then\n\
                     archive_mode = off\n";
        }
        ArchiveMode::Preserve => {}
    }
    text
}

/// Creates `name` anew in `root` with `data`, fsynced.
pub(super) fn write_new(root: &SafeDir, name: &str, data: &[u8]) -> Result<()> {
    let mut f = root.create_file(name)?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {name} in {}", root.path().display()))
}

/// Whether the restore is promoted at its end by a request its restore_command makes
/// (`super::promote`): a restore that is not a standby, to the end of the archive or to a target
/// whose action is to promote, fetching WAL with tidemark's `wal-fetch` (only it knows the
/// marker).
fn promotes_fast(opts: &RestoreOptions) -> bool {
    opts.standby.is_none()
        && (matches!(opts.recovery.target, Target::Latest)
            || opts.recovery.action == crate::target::Action::Promote)
        && opts.restore_command.contains(" wal-fetch ")
}

/// Whether the restored server recovers in standby mode (`standby.signal`): a standby, or a
/// restore to the end of the archive that [`promotes_fast`] (where the archive first lacks a
/// segment, archive recovery ends with the checkpoint; standby mode acts on the promotion
/// request there).
fn standby_mode(opts: &RestoreOptions) -> bool {
    opts.standby.is_some()
        || (promotes_fast(opts) && matches!(opts.recovery.target, Target::Latest))
}

/// Writes backup_label, tablespace_map (when given), recovery.signal (standby.signal for a
/// standby, and with the promotion marker for a restore that [`promotes_fast`]) and
/// postgresql.auto.conf with the recovery settings.
pub(super) fn write(
    root: &SafeDir,
    h: &ManifestHeader,
    opts: &RestoreOptions,
    layout: &Layout,
    tablespace_map: Option<Vec<u8>>,
) -> Result<()> {
    write_new(root, "backup_label", &h.backup_label)?;
    if let Some(map) = tablespace_map {
        write_new(root, "tablespace_map", &map)?;
    }
    let fast = promotes_fast(opts);
    let signal = if standby_mode(opts) {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    if fast {
        // The signal file and the marker hold one token: the request is live only while
        // PostgreSQL has not removed this signal file (`super::promote`).
        let token = super::promote::new_token()?;
        write_new(root, signal, token.as_bytes())?;
        write_new(
            root,
            super::promote::MARKER,
            super::promote::marker_text(&token).as_bytes(),
        )?;
    } else {
        write_new(root, signal, b"")?;
    }
    let mut text = if layout.auto_conf {
        root.read_file(AUTO_CONF, MAX_AUTO_CONF)
            .with_context(|| format!("backup {}'s {AUTO_CONF}", h.backup_id))?
    } else {
        Vec::new()
    };
    root.remove_file(AUTO_CONF)?;
    text.extend_from_slice(settings(h, opts).as_bytes());
    write_new(root, AUTO_CONF, &text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::target::{Action, Recovery, TimelineTarget};

    fn opts(mode: ArchiveMode) -> RestoreOptions {
        RestoreOptions {
            pgdata: "/x".into(),
            recovery: Recovery::to(Target::Latest),
            backup: None,
            restore_command: "tidemark-restore wal-fetch %f %p".into(),
            tablespace_map: Vec::new(),
            archive_mode: mode,
            delta: false,
            standby: None,
        }
    }

    fn last<'a>(text: &'a str, setting: &str) -> Option<&'a str> {
        let prefix = format!("{setting} = ");
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    #[test]
    fn each_target_writes_its_setting_and_clears_the_others() {
        let h = crate::test_support::hdr("b1", 1);
        let all = [
            "recovery_target",
            "recovery_target_lsn",
            "recovery_target_name",
            "recovery_target_time",
            "recovery_target_xid",
        ];
        let time = crate::target::parse_time("2026-11-21 20:40:12.5+00").unwrap();
        for (target, setting, value) in [
            (Target::Latest, "", ""),
            (Target::Immediate, "recovery_target", "'immediate'"),
            (
                Target::Time(time),
                "recovery_target_time",
                "'2026-11-21 20:40:12.500000+00:00'",
            ),
            (
                Target::Lsn(tidemark_format::Lsn(0x1_0300_0028)),
                "recovery_target_lsn",
                "'1/3000028'",
            ),
            (Target::Xid(742), "recovery_target_xid", "'742'"),
            (
                Target::Name("it's".into()),
                "recovery_target_name",
                "'it''s'",
            ),
        ] {
            let mut o = opts(ArchiveMode::Off);
            o.recovery = Recovery::to(target.clone());
            let text = settings(&h, &o);
            for s in all {
                let want = if s == setting { value } else { "''" };
                assert_eq!(last(&text, s), Some(want), "{target:?} {s}: {text}");
            }
            // The one set follows every cleared one (PostgreSQL refuses any other order).
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.starts_with("recovery_target")
                        && !l.starts_with("recovery_target_inclusive")
                        && !l.starts_with("recovery_target_action")
                        && !l.starts_with("recovery_target_timeline")
                })
                .collect();
            assert_eq!(lines.len(), 5, "{text}");
            assert!(lines[..4].iter().all(|l| l.ends_with(" = ''")), "{text}");
            assert_eq!(
                last(&text, "recovery_target_inclusive"),
                Some("on"),
                "{text}"
            );
            // Promoted fast: a target pauses there for wal-fetch's promotion request.
            let fast_action = if matches!(target, Target::Latest) {
                "'promote'"
            } else {
                "'pause'"
            };
            assert_eq!(
                last(&text, "recovery_target_action"),
                Some(fast_action),
                "{text}"
            );
            if fast_action == "'pause'" {
                assert_eq!(last(&text, "hot_standby"), Some("on"), "{text}");
            }
            assert_eq!(
                last(&text, "recovery_target_timeline"),
                Some("'latest'"),
                "{text}"
            );
            // With another restore_command nothing is promoted fast: the action as asked.
            o.restore_command = "cp /a/%f %p".into();
            assert_eq!(
                last(&settings(&h, &o), "recovery_target_action"),
                Some("'promote'")
            );
        }
        let mut o = opts(ArchiveMode::Off);
        o.recovery = Recovery {
            target: Target::Xid(742),
            exclusive: true,
            action: Action::Pause,
            timeline: TimelineTarget::Id(3),
        };
        let text = settings(&h, &o);
        assert_eq!(
            last(&text, "recovery_target_inclusive"),
            Some("off"),
            "{text}"
        );
        assert_eq!(
            last(&text, "recovery_target_action"),
            Some("'pause'"),
            "{text}"
        );
        assert_eq!(
            last(&text, "recovery_target_timeline"),
            Some("'3'"),
            "{text}"
        );
        assert_eq!(last(&text, "hot_standby"), Some("on"), "{text}");
        o.recovery.action = Action::Shutdown;
        o.recovery.timeline = TimelineTarget::Current;
        let text = settings(&h, &o);
        assert_eq!(
            last(&text, "recovery_target_action"),
            Some("'shutdown'"),
            "{text}"
        );
        assert_eq!(
            last(&text, "recovery_target_timeline"),
            Some("'current'"),
            "{text}"
        );
    }

    #[test]
    fn archive_mode_off_is_written_and_preserve_writes_nothing() {
        let h = crate::test_support::hdr("b1", 1);
        let off = settings(&h, &opts(ArchiveMode::Off));
        let last = off.lines().rev().find(|l| l.starts_with("archive_mode"));
        assert_eq!(last, Some("archive_mode = off"), "{off}");
        let keep = settings(&h, &opts(ArchiveMode::Preserve));
        assert!(!keep.contains("archive_mode ="), "{keep}");
        assert!(!keep.contains("archive_command"), "{keep}");
    }

    #[test]
    fn a_standby_gets_standby_signal_no_target_and_its_primary_conninfo() {
        let h = crate::test_support::hdr("b1", 1);
        let mut o = opts(ArchiveMode::Off);
        o.standby = Some(crate::target::Standby {
            primary_conninfo: Some(r"host=h user=rep password='it\'s\\x'".to_string().into()),
        });
        let text = settings(&h, &o);
        assert_eq!(
            last(&text, "primary_conninfo"),
            Some(r"'host=h user=rep password=''it\\''s\\\\x'''"),
            "{text}"
        );
        assert_eq!(last(&text, "primary_slot_name"), Some("''"), "{text}");
        assert_eq!(last(&text, "recovery_target_timeline"), Some("'latest'"));
        assert_eq!(last(&text, "recovery_target_time"), Some("''"));
        assert_eq!(last(&text, "hot_standby"), Some("on"));
        // Without a conninfo, a carried-over one is cleared.
        o.standby = Some(crate::target::Standby::default());
        assert_eq!(last(&settings(&h, &o), "primary_conninfo"), Some("''"));
        // The options print the password redacted.
        o.standby = Some(crate::target::Standby {
            primary_conninfo: Some("host=h password=secret".to_string().into()),
        });
        assert!(!format!("{o:?}").contains("secret"), "{o:?}");
        let tmp = tempfile::tempdir().unwrap();
        let root = SafeDir::open(tmp.path()).unwrap();
        let layout = Layout {
            pg_control: 0,
            auto_conf: false,
            skipped_links: Vec::new(),
        };
        write(&root, &h, &o, &layout, None).unwrap();
        assert!(tmp.path().join("standby.signal").is_file());
        assert!(!tmp.path().join("recovery.signal").exists());
    }

    #[test]
    fn postgresql_auto_conf_is_written_anew_with_the_backups_settings_first() {
        let tmp = tempfile::tempdir().unwrap();
        let root = SafeDir::open(tmp.path()).unwrap();
        let outside = tmp.path().join("outside.conf");
        std::fs::write(&outside, b"work_mem = '1MB'\n").unwrap();
        // A restored postgresql.auto.conf that is a symlink: refused, its target untouched.
        std::os::unix::fs::symlink(&outside, tmp.path().join(AUTO_CONF)).unwrap();
        let h = crate::test_support::hdr("b1", 1);
        let layout = Layout {
            pg_control: 0,
            auto_conf: true,
            skipped_links: Vec::new(),
        };
        let e = write(&root, &h, &opts(ArchiveMode::Off), &layout, None).unwrap_err();
        assert!(format!("{e:#}").contains("is a symlink"), "{e:#}");
        assert_eq!(std::fs::read(&outside).unwrap(), b"work_mem = '1MB'\n");
        // A regular one: kept, settings appended, in a new file.
        let tmp = tempfile::tempdir().unwrap();
        let root = SafeDir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join(AUTO_CONF), b"work_mem = '1MB'").unwrap();
        write(
            &root,
            &h,
            &opts(ArchiveMode::Off),
            &layout,
            Some(b"m".to_vec()),
        )
        .unwrap();
        let text = std::fs::read_to_string(tmp.path().join(AUTO_CONF)).unwrap();
        assert!(
            text.starts_with("work_mem = '1MB'\n# recovery settings"),
            "{text}"
        );
        assert!(text.ends_with("archive_mode = off\n"), "{text}");
        assert_eq!(
            std::fs::read(tmp.path().join("tablespace_map")).unwrap(),
            b"m"
        );
        // To the end of the archive: standby mode, promoted by wal-fetch (the marker).
        assert!(tmp.path().join("standby.signal").is_file());
        assert!(!tmp.path().join("recovery.signal").exists());
        assert!(tmp.path().join(super::super::promote::MARKER).is_file());
    }

    #[test]
    fn only_a_restore_that_promotes_with_wal_fetch_promotes_fast() {
        let h = crate::test_support::hdr("b1", 1);
        let layout = Layout {
            pg_control: 0,
            auto_conf: false,
            skipped_links: Vec::new(),
        };
        let time =
            Target::Time(chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap());
        let mut to_time = opts(ArchiveMode::Off);
        to_time.recovery = crate::target::Recovery::to(time);
        let mut other_command = opts(ArchiveMode::Off);
        other_command.restore_command = "cp /a/%f %p".into();
        let mut standby = opts(ArchiveMode::Off);
        standby.standby = Some(crate::target::Standby::default());
        let mut pause = to_time.clone();
        pause.recovery.action = Action::Pause;
        let mut shutdown = to_time.clone();
        shutdown.recovery.action = Action::Shutdown;
        for (o, signal) in [
            (&other_command, "recovery.signal"),
            (&standby, "standby.signal"),
            (&pause, "recovery.signal"),
            (&shutdown, "recovery.signal"),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let root = SafeDir::open(tmp.path()).unwrap();
            write(&root, &h, o, &layout, None).unwrap();
            assert!(tmp.path().join(signal).is_file(), "{o:?}");
            assert!(
                !tmp.path().join(super::super::promote::MARKER).exists(),
                "{o:?}"
            );
            let text = std::fs::read_to_string(tmp.path().join(AUTO_CONF)).unwrap();
            assert!(!text.contains("to promote this server"), "{text}");
        }
        // To the end of the archive (standby mode) or to a target to promote at (archive
        // recovery): the marker, and its token in the signal file.
        for (o, signal, other) in [
            (&opts(ArchiveMode::Off), "standby.signal", "recovery.signal"),
            (&to_time, "recovery.signal", "standby.signal"),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let root = SafeDir::open(tmp.path()).unwrap();
            write(&root, &h, o, &layout, None).unwrap();
            assert!(!tmp.path().join(other).exists(), "{o:?}");
            let marker =
                std::fs::read_to_string(tmp.path().join(super::super::promote::MARKER)).unwrap();
            let token = std::fs::read_to_string(tmp.path().join(signal)).unwrap();
            assert!(
                token.len() > 32 && marker.ends_with(&token),
                "{marker} / {token}"
            );
            let text = std::fs::read_to_string(tmp.path().join(AUTO_CONF)).unwrap();
            assert!(text.contains("to promote this server"), "{text}");
            if signal == "standby.signal" {
                // A carried primary_conninfo never applies: standby mode would stream from it.
                assert_eq!(last(&text, "primary_conninfo"), Some("''"), "{text}");
                assert_eq!(last(&text, "primary_slot_name"), Some("''"), "{text}");
            } else {
                assert_eq!(last(&text, "recovery_target_action"), Some("'pause'"));
                assert_eq!(last(&text, "hot_standby"), Some("on"));
            }
        }
        // Each restore its own token.
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for t in [&a, &b] {
            write(
                &SafeDir::open(t.path()).unwrap(),
                &h,
                &to_time,
                &layout,
                None,
            )
            .unwrap();
        }
        assert_ne!(
            std::fs::read(a.path().join("recovery.signal")).unwrap(),
            std::fs::read(b.path().join("recovery.signal")).unwrap()
        );
    }
}
