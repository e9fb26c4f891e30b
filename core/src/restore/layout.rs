//! What a restore writes, decided from the manifest alone before anything is written: the
//! entries it refuses, the symlinks it leaves out, and the files it treats apart.
//!
//! Invariants (the decoder already guarantees sorted, unique, plain relative paths whose
//! parents are directory entries, FORMAT.md 8.4.5):
//! - A restore creates no symlink a manifest names. The only symlinks in a restored directory
//!   are `pg_tblspc/<oid>`, made by the restore itself from the tablespace map after every file
//!   (`tablespace::Plan::link`). A symlink entry under `pg_tblspc/` (a tablespace whose files the
//!   backup does not hold: the restored server would use the original one) or at
//!   `postgresql.auto.conf` is refused; any other symlink entry is left out with a warning, since
//!   the restored server would read or write through it outside its data directory.
//! - The files a restore writes itself (`backup_label`, `tablespace_map`, `recovery.signal`,
//!   `standby.signal`, the promotion marker) are never taken from a manifest: writers never record them, so an entry
//!   with such a name is refused.
//! - `global/pg_control` is a regular file of the manifest, or the restore is refused before it
//!   starts.

use anyhow::{bail, Result};
use tidemark_format::manifest::{HeadKind, ManifestIndex};

pub const PG_CONTROL: &str = "global/pg_control";
pub const AUTO_CONF: &str = "postgresql.auto.conf";
/// Top-level files the restore writes itself.
pub const WRITTEN_BY_RESTORE: &[&str] = &[
    "backup_label",
    "tablespace_map",
    "recovery.signal",
    "standby.signal",
    super::promote::MARKER,
];

/// The restore's view of one manifest.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// Index of `global/pg_control` in the entries.
    pub pg_control: usize,
    /// Whether the backup holds `postgresql.auto.conf` (a regular file).
    pub auto_conf: bool,
    /// Symlink entries left out: (path, target as recorded).
    pub skipped_links: Vec<(String, String)>,
}

const TAMPERED: &str = "a tidemark backup never records this; the repository is damaged or was tampered with. Nothing was restored: restore another backup (an earlier --target-time) and run 'tidemark-restore check'";

/// Checks `m` for what a restore refuses and returns its layout.
pub fn check(m: &ManifestIndex) -> Result<Layout> {
    let id = &m.header.backup_id;
    let mut pg_control = None;
    let mut auto_conf = false;
    let mut skipped_links = Vec::new();
    for (i, e) in m.entries.iter().enumerate() {
        if WRITTEN_BY_RESTORE.contains(&e.path.as_str()) {
            bail!(
                "backup {id} holds {}, which a restore writes itself\nhint: {TAMPERED}",
                e.path
            );
        }
        match &e.kind {
            HeadKind::File(_) if e.path == PG_CONTROL => pg_control = Some(i),
            HeadKind::File(_) if e.path == AUTO_CONF => auto_conf = true,
            HeadKind::File(_) => {}
            HeadKind::Dir if e.path == PG_CONTROL || e.path == AUTO_CONF => {
                bail!(
                    "backup {id} holds {} as a directory\nhint: {TAMPERED}",
                    e.path
                )
            }
            HeadKind::Dir => {}
            HeadKind::Symlink(t) => {
                let target = String::from_utf8_lossy(t).into_owned();
                if e.path == PG_CONTROL {
                    bail!("backup {id} holds {PG_CONTROL} as a symlink to {target:?}\nhint: {TAMPERED}");
                }
                if e.path == AUTO_CONF {
                    bail!(
                        "backup {id} holds {} as a symlink to {target:?}; refusing to restore it\nhint: a restore writes the recovery settings into a new {AUTO_CONF} and never through a link that may point outside the data directory (PostgreSQL's ALTER SYSTEM replaces a linked one with a file): {TAMPERED}",
                        e.path
                    );
                }
                if e.path.starts_with("pg_tblspc/") {
                    bail!(
                        "backup {id} holds {} as a symlink to {target:?}, without the tablespace's files; refusing to restore it\nhint: the restored server would use that directory, which belongs to the backed-up cluster; take backups of clusters with tablespaces with --source replication, which copies them",
                        e.path
                    );
                }
                skipped_links.push((e.path.clone(), target));
            }
        }
    }
    let Some(pg_control) = pg_control else {
        bail!(
            "backup {id} has no regular file {PG_CONTROL}; it cannot be started\nhint: {TAMPERED}"
        );
    };
    Ok(Layout {
        pg_control,
        auto_conf,
        skipped_links,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_format::manifest::{Entry, EntryKind, FileEntry, Manifest};
    use tidemark_format::ChunkId;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.into(),
            mode: 0o600,
            kind,
        }
    }

    fn file() -> EntryKind {
        EntryKind::File(FileEntry {
            size: 0,
            sha256: ChunkId::of(b""),
            chunks: Vec::new(),
        })
    }

    fn link(t: &str) -> EntryKind {
        EntryKind::Symlink(t.as_bytes().to_vec())
    }

    fn manifest(extra: Vec<Entry>) -> Manifest {
        let mut entries = vec![
            entry("global", EntryKind::Dir),
            entry(PG_CONTROL, file()),
            entry("pg_tblspc", EntryKind::Dir),
        ];
        entries.extend(extra);
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        Manifest {
            header: crate::test_support::hdr("b1", 1),
            packs: Vec::new(),
            entries,
        }
    }

    fn index(extra: Vec<Entry>) -> ManifestIndex {
        manifest(extra).index()
    }

    #[test]
    fn a_plain_backup_is_fine() {
        let l = check(&index(vec![entry(AUTO_CONF, file())])).expect("fine");
        assert_eq!(l.pg_control, 1);
        assert!(l.auto_conf);
        assert!(l.skipped_links.is_empty());
    }

    #[test]
    fn other_symlinks_are_left_out_and_listed() {
        let l = check(&index(vec![entry("pg_log", link("/var/log/pg"))])).expect("fine");
        assert_eq!(
            l.skipped_links,
            vec![("pg_log".to_string(), "/var/log/pg".to_string())]
        );
        assert!(!l.auto_conf);
    }

    #[test]
    fn refusals_name_the_path_and_give_a_hint() {
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![entry(AUTO_CONF, link("/etc/x"))], AUTO_CONF),
            (vec![entry(AUTO_CONF, EntryKind::Dir)], AUTO_CONF),
            (
                vec![entry("pg_tblspc/16384", link("/srv/ts"))],
                "pg_tblspc/16384",
            ),
            (vec![entry("backup_label", file())], "backup_label"),
            (vec![entry("recovery.signal", file())], "recovery.signal"),
            (vec![entry("standby.signal", file())], "standby.signal"),
            (vec![entry("tablespace_map", link("/x"))], "tablespace_map"),
        ];
        for (extra, name) in cases {
            let e = check(&index(extra)).expect_err(name).to_string();
            assert!(e.contains(name) && e.contains("hint:"), "{name}: {e}");
        }
        let mut m = manifest(Vec::new());
        m.entries.retain(|e| e.path != PG_CONTROL);
        let e = check(&m.index()).expect_err("no pg_control").to_string();
        assert!(e.contains(PG_CONTROL) && e.contains("hint:"), "{e}");
        let mut m = manifest(Vec::new());
        m.entries[1].kind = link("/x");
        assert!(check(&m.index()).is_err());
    }
}
