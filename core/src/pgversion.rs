//! PostgreSQL major versions: which ones tidemark supports, how a server, a data directory or a
//! WAL segment tells its major, and the rule for a major tidemark has never seen.
//!
//! Invariants:
//! - Archiving never refuses WAL because of its major (a refused archive_command fills pg_wal
//!   until the disk is full); an unknown major is archived with a loud warning.
//! - `backup` refuses an untested major unless the operator passes `--allow-untested-major`.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tidemark_format::wal;

/// The majors every release is tested against end to end (tests/matrix.rs).
pub const SUPPORTED: std::ops::RangeInclusive<u32> = 14..=18;

/// The major of a `server_version_num` (e.g. 150018 → 15).
pub fn major_of_version_num(version_num: u32) -> u32 {
    version_num / 10000
}

/// True when tidemark is tested against `major`.
pub fn is_supported(major: u32) -> bool {
    SUPPORTED.contains(&major)
}

/// Checks a server's `server_version_num` before a base backup; returns its major.
pub fn check_backup_server(version_num: u32, allow_untested: bool) -> Result<u32> {
    let major = major_of_version_num(version_num);
    if is_supported(major) {
        return Ok(major);
    }
    if major < *SUPPORTED.start() {
        bail!(
            "PostgreSQL {major} (server_version_num {version_num}) is not supported\nhint: tidemark backs up PostgreSQL {}..={}; upgrade the server",
            SUPPORTED.start(),
            SUPPORTED.end()
        );
    }
    if !allow_untested {
        bail!(
            "PostgreSQL {major} (server_version_num {version_num}) is newer than any major tidemark is tested with ({}..={})\nhint: upgrade tidemark, or pass --allow-untested-major to back it up anyway (the backup is taken the PostgreSQL {} way; run `tidemark-restore verify` on it before trusting it)",
            SUPPORTED.start(),
            SUPPORTED.end(),
            SUPPORTED.end()
        );
    }
    tracing::warn!(
        major,
        "backing up PostgreSQL {major}, which this tidemark release was never tested with (--allow-untested-major)"
    );
    Ok(major)
}

/// The major of a WAL segment's page magic; warns (never fails) when tidemark does not know it.
pub fn major_of_segment(name: &str, magic: u16) -> Option<u32> {
    let major = wal::major_of_page_magic(magic);
    if major.is_none() {
        tracing::warn!(
            segment = name,
            page_magic = format!("{magic:#06x}"),
            "WAL from a PostgreSQL major this tidemark release does not know: archived anyway (archiving never stops for a version), but restores of it are untested\nhint: upgrade tidemark to a release that supports this PostgreSQL major"
        );
    }
    major
}

/// The major of a data directory, from its `PG_VERSION` file (e.g. "15\n").
pub fn major_of_data_dir(pgdata: &Path) -> Result<u32> {
    let path = pgdata.join("PG_VERSION");
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}\nhint: is this a PostgreSQL data directory?",
            path.display()
        )
    })?;
    parse_pg_version_file(&text)
        .with_context(|| format!("{} is not a PG_VERSION file", path.display()))
}

/// Parses the contents of `PG_VERSION`: a major number and a newline (at most 16 bytes).
pub fn parse_pg_version_file(text: &[u8]) -> Result<u32> {
    if text.len() > 16 {
        bail!(
            "PG_VERSION is {} bytes, more than a version number",
            text.len()
        );
    }
    let s = std::str::from_utf8(text)
        .context("PG_VERSION is not text")?
        .trim();
    let major: u32 = s
        .parse()
        .with_context(|| format!("PG_VERSION holds {s:?}, not a major version number"))?;
    if major < 10 {
        bail!("PG_VERSION says {major}: PostgreSQL before 10 is not supported");
    }
    Ok(major)
}

/// The system identifier in `global/pg_control` (its first 8 bytes in every major).
pub fn system_id_of_data_dir(pgdata: &Path) -> Result<tidemark_format::SystemId> {
    use std::io::Read;
    let path = pgdata.join("global/pg_control");
    let mut buf = [0u8; 8];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .with_context(|| format!("cannot read the system identifier from {}", path.display()))?;
    Ok(tidemark_format::SystemId(u64::from_le_bytes(buf)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(check_backup_server(140023, false).unwrap(), 14);
        assert_eq!(check_backup_server(180004, false).unwrap(), 18);
        let e = format!("{:#}", check_backup_server(190000, false).unwrap_err());
        assert!(
            e.contains("PostgreSQL 19") && e.contains("--allow-untested-major"),
            "{e}"
        );
        assert_eq!(check_backup_server(190000, true).unwrap(), 19);
        let e = format!("{:#}", check_backup_server(130012, true).unwrap_err());
        assert!(e.contains("PostgreSQL 13") && e.contains("14..=18"), "{e}");
    }

    #[test]
    fn pg_version_files() {
        assert_eq!(parse_pg_version_file(b"15\n").unwrap(), 15);
        assert_eq!(parse_pg_version_file(b"18").unwrap(), 18);
        for bad in [&b""[..], b"9.6\n", b"x", b"5\n", &[b'1'; 40]] {
            assert!(parse_pg_version_file(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn page_magics() {
        assert_eq!(major_of_segment("x", 0xD10D), Some(14));
        assert_eq!(major_of_segment("x", 0xD118), Some(18));
        assert_eq!(major_of_segment("x", 0xD11F), None);
    }
}
