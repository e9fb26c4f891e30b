//! Walking a PostgreSQL data directory for a base backup, with the exclusions PostgreSQL's
//! documentation prescribes (see shared POSTGRES-RULES.md): pg_wal contents, postmaster.pid and
//! .opts, the contents of pg_replslot, pg_dynshmem, pg_notify, pg_serial, pg_snapshots,
//! pg_stat_tmp and pg_subtrans, pgsql_tmp*, pg_internal.init, stale backup_label /
//! tablespace_map, and every fork of an unlogged relation except its init fork.
//! A file or directory that vanishes during the walk is skipped, never an error.

use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Directories whose contents are never backed up (the directory itself is).
const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];
/// Files at the top level never backed up.
const TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "recovery.signal",
    "standby.signal",
    crate::restore::promote::MARKER,
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug)]
pub struct WalkEntry {
    /// `/`-separated path relative to the data directory.
    pub rel: String,
    pub abs: PathBuf,
    pub mode: u32,
    pub kind: Kind,
}

/// Lists the data directory, sorted byte-wise by relative path.
pub fn walk(pgdata: &Path) -> Result<Vec<WalkEntry>> {
    let meta = std::fs::metadata(pgdata)
        .with_context(|| format!("cannot read data directory {}", pgdata.display()))?;
    if !meta.is_dir() || !pgdata.join("PG_VERSION").is_file() {
        bail!("{} is not a PostgreSQL data directory (no PG_VERSION)\nhint: pass the server's data directory as --pgdata", pgdata.display());
    }
    let mut out = Vec::new();
    walk_dir(pgdata, "", &mut out)?;
    out.sort_by(|a, b| a.rel.as_bytes().cmp(b.rel.as_bytes()));
    Ok(out)
}

fn walk_dir(dir: &Path, rel: &str, out: &mut Vec<WalkEntry>) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut names = Vec::new();
    for ent in rd {
        match ent {
            Ok(ent) => names.push(ent.file_name()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        }
    }
    let names: Vec<String> = names
        .into_iter()
        .map(|n| n.into_string().map_err(|n| anyhow::anyhow!("file name {n:?} in {} is not UTF-8\nhint: remove or rename it; PostgreSQL never creates such names", dir.display())))
        .collect::<Result<_>>()?;
    let unlogged: HashSet<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix("_init"))
        .filter(|b| is_relfilenode(b))
        .collect();
    for name in &names {
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if excluded(rel, name, &unlogged) {
            continue;
        }
        let abs = dir.join(name);
        let lmeta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", abs.display())),
        };
        let mode = lmeta.permissions().mode() & 0o7777;
        let ft = lmeta.file_type();
        if ft.is_symlink() {
            if rel == "pg_tblspc" {
                bail!("{} is a tablespace; backup --pgdata does not copy tablespaces\nhint: take the backup over the replication protocol, or move the tablespace's objects to pg_default", abs.display());
            }
            // pg_wal may be a symlink (initdb --waldir): back it up as an empty directory.
            if rel.is_empty() && name == "pg_wal" {
                out.push(WalkEntry {
                    rel: child_rel,
                    abs,
                    mode: 0o700,
                    kind: Kind::Dir,
                });
                continue;
            }
            let target = std::fs::read_link(&abs)
                .with_context(|| format!("cannot read link {}", abs.display()))?;
            out.push(WalkEntry {
                rel: child_rel,
                abs,
                mode,
                kind: Kind::Symlink(target.into_os_string().into_encoded_bytes()),
            });
        } else if ft.is_dir() {
            out.push(WalkEntry {
                rel: child_rel.clone(),
                abs: abs.clone(),
                mode,
                kind: Kind::Dir,
            });
            if !(rel.is_empty() && EMPTY_DIRS.contains(&name.as_str())) {
                walk_dir(&abs, &child_rel, out)?;
            }
        } else if ft.is_file() {
            out.push(WalkEntry {
                rel: child_rel,
                abs,
                mode,
                kind: Kind::File,
            });
        }
        // Sockets, fifos and devices are not part of a data directory's state.
    }
    Ok(())
}

fn is_relfilenode(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `name` inside directory `rel` is excluded from a base backup.
fn excluded(rel: &str, name: &str, unlogged: &HashSet<&str>) -> bool {
    if rel.is_empty() && TOP_FILES.contains(&name) {
        return true;
    }
    if name.starts_with("pgsql_tmp") || name == "pg_internal.init" {
        return true;
    }
    // Unlogged relation: every fork and segment except the init fork.
    let in_db_dir = rel.starts_with("base/") || rel.starts_with("pg_tblspc/");
    if in_db_dir && !unlogged.is_empty() {
        let base = name.split(['_', '.']).next().unwrap_or("");
        if unlogged.contains(base) && !name.ends_with("_init") && !name.contains("_init.") {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions() {
        let none = HashSet::new();
        assert!(excluded("", "postmaster.pid", &none));
        assert!(excluded("", "backup_label", &none));
        assert!(!excluded("base/1", "backup_label", &none));
        assert!(excluded("base", "pgsql_tmp", &none));
        assert!(excluded("global", "pg_internal.init", &none));
        assert!(!excluded("base/5", "16384", &none));
        let unl: HashSet<&str> = ["16390"].into_iter().collect();
        for n in ["16390", "16390_fsm", "16390_vm", "16390.1"] {
            assert!(excluded("base/5", n, &unl), "{n}");
        }
        assert!(!excluded("base/5", "16390_init", &unl));
        assert!(!excluded("base/5", "163901", &unl));
    }

    #[test]
    fn walk_keeps_excluded_dirs_empty_and_sorts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join("PG_VERSION"), "15\n").unwrap();
        std::fs::create_dir_all(p.join("pg_wal/archive_status")).unwrap();
        std::fs::write(p.join("pg_wal/000000010000000000000001"), "x").unwrap();
        std::fs::write(p.join("postmaster.pid"), "1").unwrap();
        std::fs::create_dir_all(p.join("base/1")).unwrap();
        std::fs::write(p.join("base/1/1259"), "y").unwrap();
        let rels: Vec<String> = walk(p).unwrap().into_iter().map(|e| e.rel).collect();
        assert_eq!(
            rels,
            vec!["PG_VERSION", "base", "base/1", "base/1/1259", "pg_wal"]
        );
    }
}
