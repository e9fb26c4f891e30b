//! The files a restore writes itself once the backup's files are in place: `backup_label` and
//! `tablespace_map` from the manifest, `recovery.signal`, and the recovery settings at the end of
//! `postgresql.auto.conf`.
//!
//! Invariants:
//! - Every one of them is a new file (`O_CREAT | O_EXCL | O_NOFOLLOW` below the target's open
//!   descriptor, [`SafeDir`]); `postgresql.auto.conf` is read back (never through a symlink),
//!   removed and written anew with the settings appended, so nothing is written through a link
//!   a backup could have put there.
//! - The settings come last in the file, so they win over anything the backup's own
//!   `postgresql.auto.conf` says (PostgreSQL applies the last occurrence of a setting).
//! - With [`ArchiveMode::Off`] the settings include `archive_mode = off`: the restored server
//!   archives nothing until an operator turns archiving back on.

use super::layout::{Layout, AUTO_CONF};
use super::{RestoreOptions, SafeDir};
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

/// Quotes a string for postgresql.conf: single quotes, embedded quotes doubled.
pub(super) fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The recovery settings appended to postgresql.auto.conf.
fn settings(h: &ManifestHeader, opts: &RestoreOptions) -> String {
    let mut text = format!(
        "\n# recovery settings written by tidemark-restore (backup {})\n",
        h.backup_id
    );
    text += &format!("restore_command = {}\n", conf_quote(&opts.restore_command));
    // A backup of a server that was itself restored carries that restore's settings in its
    // postgresql.auto.conf: clear every other target so none of them silently applies.
    text += "recovery_target = ''\nrecovery_target_lsn = ''\nrecovery_target_name = ''\nrecovery_target_xid = ''\n";
    match &opts.target {
        Target::Time(t) => {
            text += &format!("recovery_target_time = {}\n", conf_quote(&postgres_text(t)));
        }
        Target::Latest => text += "recovery_target_time = ''\n",
    }
    text += "recovery_target_action = 'promote'\nrecovery_target_timeline = 'latest'\n";
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

/// Writes backup_label, tablespace_map (when given), recovery.signal and postgresql.auto.conf
/// with the recovery settings.
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
    write_new(root, "recovery.signal", b"")?;
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

    fn opts(mode: ArchiveMode) -> RestoreOptions {
        RestoreOptions {
            pgdata: "/x".into(),
            target: Target::Latest,
            restore_command: "tidemark-restore wal-fetch %f %p".into(),
            tablespace_map: Vec::new(),
            archive_mode: mode,
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(conf_quote("it's"), "'it''s'");
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
        assert!(tmp.path().join("recovery.signal").is_file());
    }
}
