//! The backup manifest PostgreSQL sends at the end of BASE_BACKUP (`MANIFEST 'yes'`, JSON), and
//! the check of its per-file SHA-256 checksums against the files tidemark stored.
//!
//! Invariants:
//! - The manifest's own checksum is verified before any of its content is trusted.
//! - Every file the server listed must have been stored with the same size and SHA-256, and
//!   every stored file must be listed: a file lost or altered between server and repository
//!   fails the backup.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

#[derive(serde::Deserialize)]
struct Doc {
    #[serde(rename = "PostgreSQL-Backup-Manifest-Version")]
    version: u32,
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
/// SHA-256) of every file the backup holds. Returns the number of files checked.
pub fn verify(manifest: &[u8], stored: &HashMap<String, (u64, [u8; 32])>) -> Result<usize> {
    const MARK: &[u8] = b"\n\"Manifest-Checksum\": \"";
    let at = manifest
        .windows(MARK.len())
        .rposition(|w| w == MARK)
        .ok_or_else(|| anyhow!("the server's backup manifest has no Manifest-Checksum line"))?;
    let actual = hex::encode(Sha256::digest(&manifest[..=at]));
    let doc: Doc = serde_json::from_slice(manifest)
        .context("the server's backup manifest is not valid JSON of the expected shape")?;
    if doc.version != 1 {
        bail!("the server's backup manifest has version {}, tidemark reads version 1\nhint: upgrade tidemark", doc.version);
    }
    if !doc.checksum.eq_ignore_ascii_case(&actual) {
        bail!("the server's backup manifest is damaged: its checksum is {}, its content hashes to {actual}", doc.checksum);
    }
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
    if seen != stored.len() {
        let listed: std::collections::HashSet<&str> =
            doc.files.iter().filter_map(|f| f.path.as_deref()).collect();
        let extra = stored
            .keys()
            .find(|p| !listed.contains(p.as_str()))
            .cloned()
            .unwrap_or_default();
        bail!("file {extra} was stored but is not in the server's backup manifest");
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(files: &[(&str, u64, [u8; 32])]) -> Vec<u8> {
        let mut s = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
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

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    #[test]
    fn accepts_matching_files_and_refuses_differences() {
        let m = manifest(&[("PG_VERSION", 3, sha(b"15\n")), ("global/1", 1, sha(b"x"))]);
        let mut stored = HashMap::new();
        stored.insert("PG_VERSION".to_string(), (3, sha(b"15\n")));
        stored.insert("global/1".to_string(), (1, sha(b"x")));
        assert_eq!(verify(&m, &stored).unwrap(), 2);

        let mut wrong = stored.clone();
        wrong.insert("global/1".to_string(), (1, sha(b"y")));
        assert!(format!("{:#}", verify(&m, &wrong).unwrap_err()).contains("global/1"));
        let mut missing = stored.clone();
        missing.remove("global/1");
        assert!(verify(&m, &missing).is_err());
        let mut extra = stored.clone();
        extra.insert("base/1/2".to_string(), (0, sha(b"")));
        assert!(format!("{:#}", verify(&m, &extra).unwrap_err()).contains("base/1/2"));

        let mut damaged = m.clone();
        let at = damaged.iter().position(|&b| b == b'3').unwrap_or(0);
        damaged[at] = b'4';
        assert!(format!("{:#}", verify(&damaged, &stored).unwrap_err()).contains("damaged"));
        assert!(verify(b"{}", &stored).is_err());
        assert!(verify(b"", &stored).is_err());
    }
}
