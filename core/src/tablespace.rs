//! Tablespaces on restore. A replication backup records each tablespace's files under
//! `pg_tblspc/<oid>/` and its original location in the tablespace map. The restore writes those
//! files into the tablespace's directory (the original location, or the one given with
//! `--tablespace-map OID=DIR`) through a descriptor of that directory, and creates the symlink
//! `pg_tblspc/<oid>` only after every file; the tablespace_map it writes names the locations
//! actually used (PostgreSQL recreates the links from it when it starts).
//!
//! Invariants, all checked for every tablespace before any directory is created:
//! - Every line of the backup's tablespace map names a tablespace whose files the backup holds
//!   (`pg_tblspc/<oid>` is a directory entry), and directly below `pg_tblspc/<oid>/` there are
//!   only `PG_<major>_<catalog version>` directories, as PostgreSQL makes them: the map is what
//!   PostgreSQL links the restored cluster to, so a location nothing is restored into is refused.
//! - A location is an absolute, normalised path (no empty, `.` or `..` component), lies neither
//!   inside the target data directory nor around it, overlaps no other tablespace's, and is
//!   absent or an empty directory: a restore never mixes into existing data.
//! - Only tablespaces named in the backup's own tablespace map get a symlink; a remap for an
//!   oid the backup does not have is an error (a typo must not go unnoticed).

use crate::restore::safe_dir::SafeDir;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tidemark_format::manifest::{HeadKind, ManifestIndex};

/// Parses `OID=DIR` (the `--tablespace-map` option).
pub fn parse_remap(s: &str) -> Result<(String, PathBuf)> {
    let (oid, dir) = s.split_once('=').ok_or_else(|| {
        anyhow!("--tablespace-map {s:?} is not OID=DIR\nhint: e.g. --tablespace-map 16384=/srv/ts1")
    })?;
    if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) {
        bail!("--tablespace-map {s:?}: {oid:?} is not a tablespace oid\nhint: the oids are listed in the backup's tablespace map (tidemark-agent info)");
    }
    // An operator's trailing slash is harmless; everything else must already be normalised.
    let dir = match dir.strip_suffix('/') {
        Some(d) if !d.is_empty() => d,
        _ => dir,
    };
    if !is_normalised_absolute(dir) {
        bail!("--tablespace-map {s:?}: the directory must be a normalised absolute path (no '.', '..' or empty components)\nhint: e.g. --tablespace-map {oid}=/srv/ts1");
    }
    Ok((oid.to_string(), PathBuf::from(dir)))
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

/// Whether `p` is `/` followed by non-empty components, none `.` or `..`, without NUL.
fn is_normalised_absolute(p: &str) -> bool {
    match p.strip_prefix('/') {
        Some(rest) => {
            !p.contains('\0')
                && rest
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != "..")
        }
        None => false,
    }
}

/// The path `loc` names once the symlinks of its existing part are resolved: its longest
/// existing ancestor canonicalised, with the rest (plain components) appended.
fn resolve(loc: &Path) -> Result<PathBuf> {
    for anc in loc.ancestors() {
        if let Ok(c) = std::fs::canonicalize(anc) {
            let rest = loc.strip_prefix(anc).unwrap_or(Path::new(""));
            return Ok(if rest.as_os_str().is_empty() {
                c
            } else {
                c.join(rest)
            });
        }
    }
    bail!("cannot resolve {}", loc.display())
}

/// The tablespaces of one restore.
#[derive(Debug, Default)]
pub struct Plan {
    /// oid → location used (as written into tablespace_map and the symlink).
    links: BTreeMap<String, PathBuf>,
    /// oid → the location, open.
    dirs: BTreeMap<String, SafeDir>,
}

impl Plan {
    /// Where the manifest path `path` is written: the directory it is relative to and its path
    /// there. `None` for `pg_tblspc/<oid>` of a tablespace of this plan: that is the symlink
    /// [`Plan::link`] creates.
    pub fn place<'a>(&'a self, root: &'a SafeDir, path: &'a str) -> Option<(&'a SafeDir, &'a str)> {
        if let Some(rest) = path.strip_prefix("pg_tblspc/") {
            let (oid, below) = match rest.split_once('/') {
                Some((o, b)) => (o, Some(b)),
                None => (rest, None),
            };
            if let Some(d) = self.dirs.get(oid) {
                return below.map(|b| (d, b));
            }
        }
        Some((root, path))
    }

    /// The opened tablespace directories.
    pub fn dirs(&self) -> impl Iterator<Item = &SafeDir> {
        self.dirs.values()
    }

    /// Creates the symlinks `pg_tblspc/<oid>` → location in the restored directory `root`.
    /// Called after every file is written, so that no file is written through one.
    pub fn link(&self, root: &SafeDir) -> Result<()> {
        for (oid, loc) in &self.links {
            root.symlink(&format!("pg_tblspc/{oid}"), loc)?;
        }
        Ok(())
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

const TAMPERED: &str = "the backup's tablespace map and files do not match as PostgreSQL writes them: the repository is damaged or was tampered with; restore another backup";

/// Checks that the backup's tablespace map and its `pg_tblspc/` entries agree (module
/// invariants) and returns the map.
fn check_map(m: &ManifestIndex) -> Result<Vec<(String, String)>> {
    let id = &m.header.backup_id;
    let map = match &m.header.tablespace_map {
        Some(map) => parse_map(map)?,
        None => Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for (oid, orig) in &map {
        if !seen.insert(oid) {
            bail!("backup {id}'s tablespace_map names tablespace {oid} twice\nhint: {TAMPERED}");
        }
        let link = format!("pg_tblspc/{oid}");
        let is_dir = m
            .entries
            .iter()
            .any(|e| e.path == link && matches!(e.kind, HeadKind::Dir));
        if !is_dir {
            bail!("backup {id}'s tablespace_map links tablespace {oid} to {orig:?}, but the backup holds no files of it ({link} is not a directory entry); PostgreSQL would link the restored cluster to that directory\nhint: {TAMPERED}");
        }
        let prefix = format!("{link}/");
        for e in &m.entries {
            let Some(below) = e.path.strip_prefix(&prefix) else {
                continue;
            };
            let directly_below = !below.contains('/');
            let version_dir = below.starts_with("PG_") && matches!(e.kind, HeadKind::Dir);
            if directly_below && !version_dir {
                bail!("backup {id} holds {} directly in tablespace {oid}, where PostgreSQL keeps only PG_<major>_<catalog version> directories\nhint: {TAMPERED}", e.path);
            }
        }
    }
    Ok(map)
}

/// Validates every tablespace of the backup (module invariants), then creates and opens their
/// directories. `pgdata` is the target data directory, which exists. Nothing is created
/// unless every tablespace passes.
pub fn prepare(pgdata: &Path, m: &ManifestIndex, remap: &[(String, PathBuf)]) -> Result<Plan> {
    let map = check_map(m)?;
    for (oid, _) in remap {
        if !map.iter().any(|(o, _)| o == oid) {
            let have: Vec<&str> = map.iter().map(|(o, _)| o.as_str()).collect();
            bail!(
                "--tablespace-map names tablespace {oid}, but backup {} has tablespaces {have:?}",
                m.header.backup_id
            );
        }
    }
    let data = std::fs::canonicalize(pgdata)
        .with_context(|| format!("cannot resolve {}", pgdata.display()))?;
    // (oid, location as given, location resolved, exists)
    let mut chosen: Vec<(String, PathBuf, PathBuf, bool)> = Vec::new();
    for (oid, orig) in map {
        let remapped = remap
            .iter()
            .find(|(o, _)| *o == oid)
            .map(|(_, d)| d.clone());
        let loc = remapped.unwrap_or_else(|| PathBuf::from(&orig));
        let text = loc.to_string_lossy();
        if !loc.is_absolute() {
            bail!("tablespace {oid} has the relative location {text:?}\nhint: remap it with --tablespace-map {oid}=/absolute/dir");
        }
        if !is_normalised_absolute(&text) {
            bail!("tablespace {oid} has the location {text:?}, which is not a normalised absolute path (an empty, '.' or '..' component)\nhint: PostgreSQL records locations normalised, so the repository is damaged or was tampered with; choose the directory with --tablespace-map {oid}=/absolute/dir");
        }
        let resolved = resolve(&loc)?;
        if resolved.starts_with(&data) {
            bail!("tablespace {oid} would be restored into {text}, which is inside the target data directory {}\nhint: a tablespace lives outside the data directory; restore it elsewhere with --tablespace-map {oid}=DIR", pgdata.display());
        }
        if data.starts_with(&resolved) {
            bail!("tablespace {oid} would be restored into {text}, which contains the target data directory {}\nhint: restore the tablespace elsewhere with --tablespace-map {oid}=DIR", pgdata.display());
        }
        for (other, _, r, _) in &chosen {
            if resolved.starts_with(r) || r.starts_with(&resolved) {
                bail!("tablespaces {other} and {oid} would be restored into overlapping directories ({} and {text})\nhint: give each its own directory with --tablespace-map OID=DIR", r.display());
            }
        }
        let exists = match std::fs::metadata(&resolved) {
            Ok(md) if md.is_dir() => {
                let mut rd = std::fs::read_dir(&resolved)
                    .with_context(|| format!("cannot read tablespace directory {text}"))?;
                if rd.next().is_some() {
                    bail!("tablespace {oid} would be restored into {text}, which is not empty\nhint: empty it, or restore the tablespace elsewhere with --tablespace-map {oid}=DIR");
                }
                true
            }
            Ok(_) => bail!("tablespace {oid} would be restored into {text}, which exists and is not a directory\nhint: restore the tablespace elsewhere with --tablespace-map {oid}=DIR"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read tablespace directory {text}"))
            }
        };
        chosen.push((oid, loc, resolved, exists));
    }
    let mut plan = Plan::default();
    for (oid, loc, resolved, exists) in chosen {
        if !exists {
            std::fs::create_dir_all(&resolved)
                .with_context(|| format!("cannot create tablespace directory {}", loc.display()))?;
        }
        std::fs::set_permissions(&resolved, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", loc.display()))?;
        let dir = SafeDir::open(&resolved)?;
        tracing::info!(oid = %oid, location = %loc.display(), "tablespace");
        plan.dirs.insert(oid.clone(), dir);
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
        assert!(parse_remap("16384=/srv/../etc").is_err());
        assert!(parse_remap("16384=/srv//x").is_err());
        assert!(parse_remap("16384=/srv/./x").is_err());
        assert_eq!(
            parse_remap("16384=/srv/x/").unwrap().1,
            PathBuf::from("/srv/x")
        );
    }

    #[test]
    fn normalised_absolute_paths() {
        for ok in ["/srv/ts", "/a", "/srv/ts one/x"] {
            assert!(is_normalised_absolute(ok), "{ok}");
        }
        for bad in [
            "",
            "/",
            "srv/ts",
            "/srv/../etc",
            "/srv/./x",
            "/srv//x",
            "/srv/x/",
            "/a\0b",
        ] {
            assert!(!is_normalised_absolute(bad), "{bad:?}");
        }
    }

    use tidemark_format::manifest::{Entry, EntryKind, FileEntry, Manifest};

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.into(),
            mode: 0o700,
            kind: EntryKind::Dir,
        }
    }

    /// A manifest with tablespaces 16384 and 16385 (map `map`) and one file in each.
    fn with_map(map: &str, extra: Vec<Entry>) -> ManifestIndex {
        let mut entries = vec![dir("pg_tblspc")];
        for oid in ["16384", "16385"] {
            entries.push(dir(&format!("pg_tblspc/{oid}")));
            entries.push(dir(&format!("pg_tblspc/{oid}/PG_15_202209061")));
            entries.push(Entry {
                path: format!("pg_tblspc/{oid}/PG_15_202209061/1"),
                mode: 0o600,
                kind: EntryKind::File(FileEntry {
                    size: 0,
                    sha256: tidemark_format::ChunkId::of(b""),
                    chunks: Vec::new(),
                }),
            });
        }
        entries.extend(extra);
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let mut header = crate::test_support::hdr("b1", 1);
        header.tablespace_map = Some(map.as_bytes().to_vec());
        Manifest {
            header,
            packs: Vec::new(),
            entries,
        }
        .index()
    }

    #[test]
    fn locations_are_validated_before_anything_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().canonicalize().unwrap();
        let pgdata = t.join("pgdata");
        std::fs::create_dir(&pgdata).unwrap();
        std::fs::create_dir(t.join("full")).unwrap();
        std::fs::write(t.join("full/x"), b"x").unwrap();
        std::fs::write(t.join("file"), b"x").unwrap();
        let ok = t.join("ts-ok").display().to_string();
        let cases = [
            (
                format!("16384 {ok}\n16385 relative/dir\n"),
                "relative location",
            ),
            (format!("16384 {ok}\n16385 {ok}/../x\n"), "not a normalised"),
            (
                format!("16384 {ok}\n16385 {}/ts\n", pgdata.display()),
                "inside the target data directory",
            ),
            (
                format!("16384 {ok}\n16385 {}\n", t.display()),
                "contains the target data directory",
            ),
            (
                format!("16384 {ok}\n16385 {}/full\n", t.display()),
                "not empty",
            ),
            (
                format!("16384 {ok}\n16385 {}/file\n", t.display()),
                "not a directory",
            ),
            (format!("16384 {ok}\n16385 {ok}/sub\n"), "overlapping"),
            (format!("16384 {ok}\n16385 {ok}\n"), "overlapping"),
            (format!("16384 {ok}\n16384 {ok}2\n"), "twice"),
            (
                format!("16384 {ok}\n16385 /srv/y\n16386 /srv/z\n"),
                "holds no files",
            ),
        ];
        for (map, want) in cases {
            let e = prepare(&pgdata, &with_map(&map, Vec::new()), &[])
                .expect_err(&map)
                .to_string();
            assert!(e.contains(want) && e.contains("hint:"), "{map}: {e}");
            assert!(
                !Path::new(&ok).exists(),
                "{map}: the first tablespace was created"
            );
        }
        // A symlink inside the data directory pointing out does not hide a location inside it.
        std::os::unix::fs::symlink(&pgdata, t.join("alias")).unwrap();
        let map = format!("16384 {ok}\n16385 {}/alias/ts\n", t.display());
        let e = prepare(&pgdata, &with_map(&map, Vec::new()), &[]).unwrap_err();
        assert!(
            e.to_string().contains("inside the target data directory"),
            "{e}"
        );
        // Junk directly in a tablespace directory.
        let map = format!("16384 {ok}\n16385 {}/ts2\n", t.display());
        let junk = Entry {
            path: "pg_tblspc/16385/authorized_keys".into(),
            mode: 0o600,
            kind: EntryKind::Symlink(b"/x".to_vec()),
        };
        let e = prepare(&pgdata, &with_map(&map, vec![junk]), &[]).unwrap_err();
        assert!(
            e.to_string().contains("pg_tblspc/16385/authorized_keys"),
            "{e}"
        );
        // A sound map: both directories created, paths placed into them.
        let plan = prepare(&pgdata, &with_map(&map, Vec::new()), &[]).unwrap();
        assert!(Path::new(&ok).is_dir() && t.join("ts2").is_dir());
        let root = SafeDir::open(&pgdata).unwrap();
        assert!(plan.place(&root, "pg_tblspc/16384").is_none());
        let (d, rel) = plan
            .place(&root, "pg_tblspc/16385/PG_15_202209061/1")
            .unwrap();
        assert_eq!(
            (d.path(), rel),
            (t.join("ts2").as_path(), "PG_15_202209061/1")
        );
        let (d, rel) = plan.place(&root, "base/1").unwrap();
        assert_eq!((d.path(), rel), (pgdata.as_path(), "base/1"));
    }
}
