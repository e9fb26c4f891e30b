//! Tablespaces on restore. A replication backup records each tablespace's files under
//! `pg_tblspc/<oid>/` and its original location in the tablespace map. Before any file is
//! written, the restore creates each tablespace's directory (the original location, or the one
//! given with `--tablespace-map OID=DIR`) and the symlink `pg_tblspc/<oid>` to it, so the files
//! land in the tablespace; the tablespace_map it writes names the locations actually used.
//!
//! Invariants:
//! - A tablespace directory must be absent or empty: a restore never mixes into existing data.
//! - Only tablespaces named in the backup's own tablespace map get a symlink; a remap for an
//!   oid the backup does not have is an error (a typo must not go unnoticed).
//! - Locations are absolute paths.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tidemark_format::manifest::{EntryKind, Manifest};

/// Parses `OID=DIR` (the `--tablespace-map` option).
pub fn parse_remap(s: &str) -> Result<(String, PathBuf)> {
    let (oid, dir) = s.split_once('=').ok_or_else(|| {
        anyhow!("--tablespace-map {s:?} is not OID=DIR\nhint: e.g. --tablespace-map 16384=/srv/ts1")
    })?;
    if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) {
        bail!("--tablespace-map {s:?}: {oid:?} is not a tablespace oid\nhint: the oids are listed in the backup's tablespace map (tidemark-agent info)");
    }
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        bail!("--tablespace-map {s:?}: the directory must be an absolute path");
    }
    Ok((oid.to_string(), dir))
}

/// Parses a tablespace_map as PostgreSQL writes it: `<oid> <path>\n` per tablespace, with `\`
/// escaping `\`, CR and LF inside the path.
pub fn parse_map(map: &[u8]) -> Result<Vec<(String, String)>> {
    let text = std::str::from_utf8(map).context("the backup's tablespace_map is not UTF-8")?;
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let mut oid = String::new();
        for c in chars.by_ref() {
            if c == ' ' {
                break;
            }
            oid.push(c);
        }
        let mut path = String::new();
        let mut ended = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => path.push(
                    chars
                        .next()
                        .ok_or_else(|| anyhow!("the backup's tablespace_map ends in an escape"))?,
                ),
                '\n' => {
                    ended = true;
                    break;
                }
                c => path.push(c),
            }
        }
        if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) || path.is_empty() || !ended {
            bail!("the backup's tablespace_map has a malformed line for {oid:?}");
        }
        out.push((oid, path));
    }
    Ok(out)
}

fn escape(path: &str) -> String {
    let mut s = String::new();
    for c in path.chars() {
        if matches!(c, '\\' | '\n' | '\r') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// The tablespaces of one restore.
#[derive(Debug, Default)]
pub struct Plan {
    /// oid → location used.
    links: BTreeMap<String, PathBuf>,
    skip: HashSet<String>,
}

impl Plan {
    /// Whether the restore's directory loop must leave `path` alone (created here).
    pub fn handles(&self, path: &str) -> bool {
        self.skip.contains(path)
    }

    /// The tablespace_map to write: the backup's, with the locations actually used.
    pub fn tablespace_map(&self, original: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
        let Some(orig) = original else {
            return Ok(None);
        };
        if self.links.is_empty() {
            return Ok(Some(orig.to_vec()));
        }
        let mut out = String::new();
        for (oid, path) in parse_map(orig)? {
            let path = match self.links.get(&oid) {
                Some(p) => p.to_string_lossy().into_owned(),
                None => path,
            };
            out.push_str(&format!("{oid} {}\n", escape(&path)));
        }
        Ok(Some(out.into_bytes()))
    }
}

/// Creates the tablespace directories and `pg_tblspc/<oid>` symlinks under `root` for every
/// tablespace whose files the backup holds under `pg_tblspc/<oid>/`.
pub fn prepare(root: &Path, m: &Manifest, remap: &[(String, PathBuf)]) -> Result<Plan> {
    let mut plan = Plan::default();
    let map = match &m.header.tablespace_map {
        Some(map) => parse_map(map)?,
        None => Vec::new(),
    };
    for (oid, _) in remap {
        if !map.iter().any(|(o, _)| o == oid) {
            let have: Vec<&str> = map.iter().map(|(o, _)| o.as_str()).collect();
            bail!(
                "--tablespace-map names tablespace {oid}, but backup {} has tablespaces {have:?}",
                m.header.backup_id
            );
        }
    }
    for (oid, orig) in map {
        let link = format!("pg_tblspc/{oid}");
        let is_dir = m
            .entries
            .iter()
            .any(|e| e.path == link && matches!(e.kind, EntryKind::Dir));
        if !is_dir {
            continue; // recorded as a symlink only (a --source pgdata backup): restored as such
        }
        let loc = remap
            .iter()
            .find(|(o, _)| *o == oid)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| PathBuf::from(&orig));
        if !loc.is_absolute() {
            bail!("tablespace {oid} has the relative location {}\nhint: remap it with --tablespace-map {oid}=/absolute/dir", loc.display());
        }
        match std::fs::read_dir(&loc) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    bail!("tablespace {oid} would be restored into {}, which is not empty\nhint: empty it, or restore the tablespace elsewhere with --tablespace-map {oid}=DIR", loc.display());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&loc).with_context(|| {
                    format!("cannot create tablespace directory {}", loc.display())
                })?;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read tablespace directory {}", loc.display()))
            }
        }
        std::fs::set_permissions(&loc, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", loc.display()))?;
        let dir = root.join("pg_tblspc");
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        std::os::unix::fs::symlink(&loc, root.join(&link))
            .with_context(|| format!("cannot create symlink {link}"))?;
        tracing::info!(oid = %oid, location = %loc.display(), "tablespace");
        plan.skip.insert("pg_tblspc".into());
        plan.skip.insert(link);
        plan.links.insert(oid, loc);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trips_with_escapes() {
        let map = b"16384 /srv/ts one\n16385 /srv/odd\\\\name\\\nx\n";
        let v = parse_map(map).unwrap();
        assert_eq!(v[0], ("16384".into(), "/srv/ts one".into()));
        assert_eq!(v[1], ("16385".into(), "/srv/odd\\name\nx".into()));
        let mut plan = Plan::default();
        plan.links
            .insert("16384".into(), PathBuf::from("/new/place"));
        let out = plan.tablespace_map(Some(map)).unwrap().unwrap();
        assert_eq!(
            out,
            b"16384 /new/place\n16385 /srv/odd\\\\name\\\nx\n".to_vec()
        );
        assert!(parse_map(b"16384 /srv/ts").is_err());
        assert!(parse_map(b"x /srv/ts\n").is_err());
        assert!(parse_map(b"").unwrap().is_empty());
    }

    #[test]
    fn remap_option_is_checked() {
        assert_eq!(
            parse_remap("16384=/srv/x").unwrap(),
            ("16384".into(), PathBuf::from("/srv/x"))
        );
        assert!(parse_remap("16384").is_err());
        assert!(parse_remap("ts=/srv/x").is_err());
        assert!(parse_remap("16384=rel").is_err());
    }
}
