//! The backup manifest PostgreSQL sends at the end of BASE_BACKUP (`MANIFEST 'yes'`, JSON), and
//! the check of its per-file SHA-256 checksums against the files tidemark stored. Version 1
//! (PostgreSQL 14..16) and version 2 (17+, which adds `System-Identifier`) are read.
//!
//! Invariants:
//! - The manifest's own checksum is verified before any of its content is trusted.
//! - A manifest that names a system identifier must name the one IDENTIFY_SYSTEM returned;
//!   version 2 must name one.
//! - Every file the server listed must have been stored with the same size and SHA-256, and
//!   every stored file must be listed: a file lost or altered between server and repository
//!   fails the backup.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use tidemark_format::SystemId;

/// The file name under which the server's backup manifest is stored.
pub const SERVER_MANIFEST: &str = "backup_manifest";

/// The manifest versions read: 1 (PostgreSQL 13..16) and 2 (17+, with System-Identifier).
const VERSIONS: std::ops::RangeInclusive<u32> = 1..=2;

#[derive(serde::Deserialize)]
struct Doc {
    #[serde(rename = "PostgreSQL-Backup-Manifest-Version")]
    version: u32,
    #[serde(rename = "System-Identifier")]
    system_id: Option<u64>,
    #[serde(rename = "Files")]
    files: Vec<DocFile>,
    #[serde(rename = "Manifest-Checksum")]
    checksum: String,
}

#[derive(serde::Deserialize)]
struct DocFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

/// Verifies `manifest` (the server's bytes) and compares it with `stored`: path → (size,
/// SHA-256) of every file the backup holds, and its system identifier (if it has one) with
/// `system_id`. Returns the number of files checked.
pub fn verify(
    manifest: &[u8],
    stored: &HashMap<String, (u64, [u8; 32])>,
    system_id: SystemId,
) -> Result<usize> {
    const MARK: &[u8] = b"\n\"Manifest-Checksum\": \"";
    let at = manifest
        .windows(MARK.len())
        .rposition(|w| w == MARK)
        .ok_or_else(|| anyhow!("the server's backup manifest has no Manifest-Checksum line"))?;
    let actual = hex::encode(Sha256::digest(&manifest[..=at]));
    let doc: Doc = serde_json::from_slice(manifest)
        .context("the server's backup manifest is not valid JSON of the expected shape")?;
    if !VERSIONS.contains(&doc.version) {
        bail!(
            "the server's backup manifest has version {}, tidemark reads versions {}..={}\nhint: upgrade tidemark",
            doc.version,
            VERSIONS.start(),
            VERSIONS.end()
        );
    }
    if !doc.checksum.eq_ignore_ascii_case(&actual) {
        bail!("the server's backup manifest is damaged: its checksum is {}, its content hashes to {actual}", doc.checksum);
    }
    match doc.system_id {
        Some(id) if id != system_id.0 => bail!(
            "the server's backup manifest is for database system {id}, but IDENTIFY_SYSTEM said {system_id}\nhint: the backup did not come from the server tidemark identified; rerun the backup"
        ),
        None if doc.version >= 2 => bail!(
            "the server's backup manifest (version {}) has no System-Identifier",
            doc.version
        ),
        _ => {}
    }
    let mut listed: HashSet<String> = HashSet::with_capacity(doc.files.len().min(stored.len()));
    let mut seen = 0usize;
    for f in &doc.files {
        let path = match (&f.path, &f.encoded_path) {
            (Some(p), _) => p.clone(),
            (None, Some(e)) => {
                let raw = hex::decode(e)
                    .with_context(|| format!("manifest Encoded-Path {e:?} is not hex"))?;
                String::from_utf8_lossy(&raw).into_owned()
            }
            (None, None) => bail!("the server's backup manifest lists a file without a path"),
        };
        if !listed.insert(path.clone()) {
            bail!("the server's backup manifest lists file {path} twice");
        }
        let Some((size, sha)) = stored.get(&path) else {
            bail!("file {path} is in the server's backup manifest but was not stored\nhint: the backup stream lost a file; rerun the backup");
        };
        if *size != f.size {
            bail!(
                "file {path} was stored with {size} bytes, the server's backup manifest says {}",
                f.size
            );
        }
        match (f.algorithm.as_deref(), f.checksum.as_deref()) {
            (Some("SHA256"), Some(c)) => {
                if !c.eq_ignore_ascii_case(&hex::encode(sha)) {
                    bail!("file {path} was stored with sha256 {}, the server's backup manifest says {c}\nhint: data was altered between the server and tidemark; rerun the backup", hex::encode(sha));
                }
            }
            (alg, _) => bail!("file {path} has checksum algorithm {alg:?} in the server's backup manifest, expected SHA256"),
        }
        seen += 1;
    }
    if let Some(extra) = stored.keys().find(|p| !listed.contains(p.as_str())) {
        bail!("file {extra} was stored but is not in the server's backup manifest");
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS: SystemId = SystemId(7_372_145_912_345_678_901);

    /// A manifest as PostgreSQL writes it: version 1 (14..16) without a system identifier,
    /// version 2 (17+) with one.
    fn manifest_v(version: u32, sysid: Option<u64>, files: &[(&str, u64, [u8; 32])]) -> Vec<u8> {
        let mut s = format!("{{ \"PostgreSQL-Backup-Manifest-Version\": {version},\n");
        if let Some(id) = sysid {
            s.push_str(&format!("\"System-Identifier\": {id},\n"));
        }
        s.push_str("\"Files\": [\n");
        let lines: Vec<String> = files
            .iter()
            .map(|(p, n, h)| {
                format!(
                    "{{ \"Path\": \"{p}\", \"Size\": {n}, \"Last-Modified\": \"2026-11-21 20:40:12 GMT\", \"Checksum-Algorithm\": \"SHA256\", \"Checksum\": \"{}\" }}",
                    hex::encode(h)
                )
            })
            .collect();
        s.push_str(&lines.join(",\n"));
        s.push_str("\n],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n");
        let sum = hex::encode(Sha256::digest(s.as_bytes()));
        s.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
        s.into_bytes()
    }

    fn manifest(files: &[(&str, u64, [u8; 32])]) -> Vec<u8> {
        manifest_v(1, None, files)
    }

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    type Files = Vec<(&'static str, u64, [u8; 32])>;
    type Stored = HashMap<String, (u64, [u8; 32])>;

    fn two_files() -> (Files, Stored) {
        let files = vec![("PG_VERSION", 3, sha(b"15\n")), ("global/1", 1, sha(b"x"))];
        let stored = files
            .iter()
            .map(|(p, n, h)| (p.to_string(), (*n, *h)))
            .collect();
        (files, stored)
    }

    #[test]
    fn accepts_matching_files_and_refuses_differences() {
        let (files, stored) = two_files();
        let m = manifest(&files);
        assert_eq!(verify(&m, &stored, SYS).unwrap(), 2);

        let mut wrong = stored.clone();
        wrong.insert("global/1".to_string(), (1, sha(b"y")));
        assert!(format!("{:#}", verify(&m, &wrong, SYS).unwrap_err()).contains("global/1"));
        let mut missing = stored.clone();
        missing.remove("global/1");
        assert!(verify(&m, &missing, SYS).is_err());
        let mut extra = stored.clone();
        extra.insert("base/1/2".to_string(), (0, sha(b"")));
        assert!(format!("{:#}", verify(&m, &extra, SYS).unwrap_err()).contains("base/1/2"));

        let mut damaged = m.clone();
        let at = damaged.iter().position(|&b| b == b'3').unwrap_or(0);
        damaged[at] = b'4';
        assert!(format!("{:#}", verify(&damaged, &stored, SYS).unwrap_err()).contains("damaged"));
        assert!(verify(b"{}", &stored, SYS).is_err());
        assert!(verify(b"", &stored, SYS).is_err());
    }

    #[test]
    fn versions_and_system_identifier() {
        let (files, stored) = two_files();
        // PostgreSQL 17+: version 2 with the system identifier.
        let v2 = manifest_v(2, Some(SYS.0), &files);
        assert_eq!(verify(&v2, &stored, SYS).unwrap(), 2);
        let e = format!("{:#}", verify(&v2, &stored, SystemId(1)).unwrap_err());
        assert!(
            e.contains("database system 7372145912345678901") && e.contains("said 1"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            verify(&manifest_v(2, None, &files), &stored, SYS).unwrap_err()
        );
        assert!(e.contains("no System-Identifier"), "{e}");
        // A version 1 manifest naming a system is still checked.
        assert!(verify(&manifest_v(1, Some(5), &files), &stored, SYS).is_err());
        for v in [0, 3] {
            let e = format!(
                "{:#}",
                verify(&manifest_v(v, Some(SYS.0), &files), &stored, SYS).unwrap_err()
            );
            assert!(
                e.contains(&format!("version {v}")) && e.contains("1..=2"),
                "{e}"
            );
        }
    }

    #[test]
    fn duplicate_and_encoded_paths() {
        let (mut files, stored) = two_files();
        files.push(files[0]);
        let e = format!("{:#}", verify(&manifest(&files), &stored, SYS).unwrap_err());
        assert!(e.contains("PG_VERSION twice"), "{e}");
        // An Encoded-Path (hex of the path) counts as listing the stored file.
        let m = String::from_utf8(manifest(&two_files().0)).unwrap();
        let body = m.replace(
            "\"Path\": \"global/1\"",
            &format!("\"Encoded-Path\": \"{}\"", hex::encode("global/1")),
        );
        let cut = body.rfind("\"Manifest-Checksum\"").unwrap();
        let mut s = body[..cut].to_string();
        let sum = hex::encode(Sha256::digest(s.as_bytes()));
        s.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
        assert_eq!(verify(s.as_bytes(), &stored, SYS).unwrap(), 2);
    }
}
