//! The repository layout: every object key is built here and nowhere else.
//!
//! ```text
//! config
//! packs/<first two hex digits of pack id>/<pack id>
//! backups/<backup id>.manifest
//! wal/<timeline>/<wal file name>
//! ```

use crate::ids::PackId;
use crate::wal::WalFileName;

pub const CONFIG: &str = "config";
pub const PACKS: &str = "packs/";
pub const BACKUPS: &str = "backups/";
pub const WAL: &str = "wal/";
const MANIFEST_SUFFIX: &str = ".manifest";

pub fn pack(id: &PackId) -> String {
    let hex = id.to_string();
    format!("{PACKS}{}/{hex}", &hex[..2])
}

pub fn manifest(backup_id: &str) -> String {
    format!("{BACKUPS}{backup_id}{MANIFEST_SUFFIX}")
}

pub fn wal(name: &WalFileName) -> String {
    format!("{WAL}{}/{name}", name.timeline())
}

/// The backup id of a manifest key, or `None` for any other key.
pub fn parse_manifest(key: &str) -> Option<&str> {
    let id = key.strip_prefix(BACKUPS)?.strip_suffix(MANIFEST_SUFFIX)?;
    crate::manifest::validate_backup_id(id).ok().map(|_| id)
}

/// The WAL file name of a WAL key, or `None` for any other key.
pub fn parse_wal(key: &str) -> Option<WalFileName> {
    let rest = key.strip_prefix(WAL)?;
    let (tli, name) = rest.split_once('/')?;
    let name = WalFileName::parse(name).ok()?;
    (name.timeline().to_string() == tli).then_some(name)
}

/// The pack id of a pack key, or `None` for any other key.
pub fn parse_pack(key: &str) -> Option<PackId> {
    let rest = key.strip_prefix(PACKS)?;
    let (dir, hex) = rest.split_once('/')?;
    let id: PackId = hex.parse().ok()?;
    (hex.get(..2) == Some(dir)).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let p = PackId::of(b"x");
        assert_eq!(parse_pack(&pack(&p)), Some(p));
        assert_eq!(
            parse_manifest(&manifest("20261121T204012Z")),
            Some("20261121T204012Z")
        );
        let w = WalFileName::parse("00000002000000000000000A").unwrap();
        assert_eq!(wal(&w), "wal/00000002/00000002000000000000000A");
        assert_eq!(parse_wal(&wal(&w)), Some(w));
        assert_eq!(parse_wal("wal/00000001/00000002000000000000000A"), None);
        assert_eq!(parse_manifest("backups/../x.manifest"), None);
    }
}
