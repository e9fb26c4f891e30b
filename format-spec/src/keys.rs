//! The repository layout: every object key is built here and nowhere else.
//!
//! ```text
//! config
//! packs/<first two hex digits of pack id>/<pack id>
//! backups/<backup id>.manifest
//! wal/<timeline>/<wal file name>
//! locks/<backup|expire>-<nonce>
//! gc/<nonce>
//! verify/<record id>.json
//! expire/<record id>.json
//! clusters/<system id>                       (format 1.1)
//! systems/<system id>/<any key above but clusters/ and systems/>   (format 1.1)
//! keyring/<key id>                          (format 1.2, encrypted repositories)
//! ```

use crate::ids::{ContentHash, PackId};
use crate::wal::WalFileName;

pub const CONFIG: &str = "config";
pub const PACKS: &str = "packs/";
pub const BACKUPS: &str = "backups/";
pub const WAL: &str = "wal/";
pub const LOCKS: &str = "locks/";
pub const GC: &str = "gc/";
pub const VERIFY: &str = "verify/";
pub const EXPIRE: &str = "expire/";
pub const CLUSTERS: &str = "clusters/";
pub const SYSTEMS: &str = "systems/";
pub const KEYRING: &str = "keyring/";
const MANIFEST_SUFFIX: &str = ".manifest";
const PART_INFIX: &str = ".part-";
const VERIFY_SUFFIX: &str = ".json";

/// Who holds a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseKind {
    /// A backup in progress: shared, any number at once.
    Backup,
    /// An expire / garbage collection: exclusive against other expires.
    Expire,
}

impl LeaseKind {
    pub fn code(self) -> u8 {
        match self {
            LeaseKind::Backup => 1,
            LeaseKind::Expire => 2,
        }
    }
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(LeaseKind::Backup),
            2 => Some(LeaseKind::Expire),
            _ => None,
        }
    }
    /// The word used in the key (`locks/<word>-<nonce>`).
    pub fn word(self) -> &'static str {
        match self {
            LeaseKind::Backup => "backup",
            LeaseKind::Expire => "expire",
        }
    }
}

/// A nonce in a lease or GC state key: 32 lowercase hex digits.
fn valid_nonce(n: &str) -> bool {
    n.len() == 32 && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `locks/<kind>-<nonce>`; `nonce` must be 32 lowercase hex digits.
pub fn lease(kind: LeaseKind, nonce: &str) -> Option<String> {
    valid_nonce(nonce).then(|| format!("{LOCKS}{}-{nonce}", kind.word()))
}

/// The kind and nonce of a lease key, or `None` for any other key.
pub fn parse_lease(key: &str) -> Option<(LeaseKind, &str)> {
    let (word, nonce) = key.strip_prefix(LOCKS)?.split_once('-')?;
    let kind = [LeaseKind::Backup, LeaseKind::Expire]
        .into_iter()
        .find(|k| k.word() == word)?;
    valid_nonce(nonce).then_some((kind, nonce))
}

/// `keyring/<key id>`; the id must be 32 lowercase hex digits.
pub fn keyring_entry(key_id: &str) -> Option<String> {
    valid_nonce(key_id).then(|| format!("{KEYRING}{key_id}"))
}

/// The key id of a keyring entry's key, or `None` for any other key.
pub fn parse_keyring_entry(key: &str) -> Option<&str> {
    let id = key.strip_prefix(KEYRING)?;
    valid_nonce(id).then_some(id)
}

/// `gc/<nonce>`; `nonce` must be 32 lowercase hex digits.
pub fn gc_state(nonce: &str) -> Option<String> {
    valid_nonce(nonce).then(|| format!("{GC}{nonce}"))
}

/// The nonce of a GC state key, or `None` for any other key.
pub fn parse_gc_state(key: &str) -> Option<&str> {
    let nonce = key.strip_prefix(GC)?;
    valid_nonce(nonce).then_some(nonce)
}

pub fn pack(id: &PackId) -> String {
    let hex = id.to_string();
    format!("{PACKS}{}/{hex}", &hex[..2])
}

pub fn manifest(backup_id: &str) -> String {
    format!("{BACKUPS}{backup_id}{MANIFEST_SUFFIX}")
}

/// A part of a manifest stored in parts (8.4.7), named by its sha256.
pub fn manifest_part(backup_id: &str, sha256: &ContentHash) -> String {
    format!("{BACKUPS}{backup_id}{PART_INFIX}{sha256}")
}

/// The backup id and sha256 of a manifest part key, or `None` for any other key.
pub fn parse_manifest_part(key: &str) -> Option<(&str, ContentHash)> {
    let (id, hash) = key.strip_prefix(BACKUPS)?.split_once(PART_INFIX)?;
    crate::manifest::validate_backup_id(id).ok()?;
    let is_hex = hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let bytes: [u8; 32] = hex::decode(hash).ok().filter(|_| is_hex)?.try_into().ok()?;
    Some((id, crate::ChunkId(bytes)))
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

/// True for a restore-drill record id: `YYYYMMDDTHHMMSSZ-` and 8 lowercase hex digits
/// (the drill's start time first, so ids sort by time).
pub fn valid_verify_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 25
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z'
        && b[16] == b'-'
        && b[17..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// The key of a restore-drill record; `None` when `id` is not a valid record id.
pub fn verify_record(id: &str) -> Option<String> {
    valid_verify_id(id).then(|| format!("{VERIFY}{id}{VERIFY_SUFFIX}"))
}

/// The record id of a restore-drill record key, or `None` for any other key.
pub fn parse_verify_record(key: &str) -> Option<&str> {
    let id = key.strip_prefix(VERIFY)?.strip_suffix(VERIFY_SUFFIX)?;
    valid_verify_id(id).then_some(id)
}

/// The key of an expire record (FORMAT.md 8.8; ids as for restore-drill records); `None` when
/// `id` is not a valid record id.
pub fn expire_record(id: &str) -> Option<String> {
    valid_verify_id(id).then(|| format!("{EXPIRE}{id}{VERIFY_SUFFIX}"))
}

/// The record id of an expire record key, or `None` for any other key.
pub fn parse_expire_record(key: &str) -> Option<&str> {
    let id = key.strip_prefix(EXPIRE)?.strip_suffix(VERIFY_SUFFIX)?;
    valid_verify_id(id).then_some(id)
}

/// `clusters/<system id>`, the id in decimal as PostgreSQL prints it.
pub fn cluster(system_id: crate::SystemId) -> String {
    format!("{CLUSTERS}{}", system_id.0)
}

/// The prefix (ending in `/`) of the nested repository of a system other than the config's.
pub fn system_prefix(system_id: crate::SystemId) -> String {
    format!("{SYSTEMS}{}/", system_id.0)
}

/// A system identifier in decimal: digits only, no leading zero (one spelling per id), fits u64.
pub fn parse_system_id(s: &str) -> Option<crate::SystemId> {
    let canonical = !s.is_empty()
        && s.len() <= 20
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    canonical
        .then(|| s.parse::<u64>().ok())
        .flatten()
        .map(crate::SystemId)
}

/// The system id of a cluster record key, or `None` for any other key.
pub fn parse_cluster(key: &str) -> Option<crate::SystemId> {
    parse_system_id(key.strip_prefix(CLUSTERS)?)
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
        let n = "0123456789abcdef0123456789abcdef";
        let k = lease(LeaseKind::Backup, n).unwrap();
        assert_eq!(k, format!("locks/backup-{n}"));
        assert_eq!(parse_lease(&k), Some((LeaseKind::Backup, n)));
        assert_eq!(lease(LeaseKind::Expire, "short"), None);
        assert_eq!(
            parse_lease("locks/other-0123456789abcdef0123456789abcdef"),
            None
        );
        assert_eq!(parse_gc_state(&gc_state(n).unwrap()), Some(n));
        assert_eq!(parse_gc_state("gc/0123456789ABCDEF0123456789abcdef"), None);
        let v = verify_record("20261121T204012Z-0a1b2c3d").unwrap();
        assert_eq!(v, "verify/20261121T204012Z-0a1b2c3d.json");
        assert_eq!(parse_verify_record(&v), Some("20261121T204012Z-0a1b2c3d"));
        for bad in [
            "../x",
            "20261121T204012Z-0A1B2C3D",
            "20261121T204012Z-0a1b2c3",
            "",
        ] {
            assert_eq!(verify_record(bad), None, "{bad}");
        }
        assert_eq!(parse_verify_record("verify/x.json"), None);
        let e = expire_record("20261121T204012Z-0a1b2c3d").unwrap();
        assert_eq!(e, "expire/20261121T204012Z-0a1b2c3d.json");
        assert_eq!(parse_expire_record(&e), Some("20261121T204012Z-0a1b2c3d"));
        assert_eq!(parse_expire_record(&v), None);
        assert_eq!(expire_record("20261121T204012Z-0A1B2C3D"), None);
        let sid = crate::SystemId(7_300_000_000_000_000_001);
        assert_eq!(cluster(sid), "clusters/7300000000000000001");
        assert_eq!(parse_cluster(&cluster(sid)), Some(sid));
        assert_eq!(system_prefix(sid), "systems/7300000000000000001/");
        for bad in [
            "clusters/",
            "clusters/07",
            "clusters/18446744073709551616",
            "clusters/1a",
            "clusters/1/x",
        ] {
            assert_eq!(parse_cluster(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod part_tests {
    use super::*;

    #[test]
    fn manifest_part_keys_round_trip_and_nothing_else_parses() {
        let h = crate::ChunkId([0xab; 32]);
        let k = manifest_part("20261121T204012Z", &h);
        assert_eq!(
            k,
            format!("backups/20261121T204012Z.part-{}", "ab".repeat(32))
        );
        assert_eq!(parse_manifest_part(&k), Some(("20261121T204012Z", h)));
        assert_eq!(parse_manifest(&k), None);
        assert_eq!(parse_manifest_part(&manifest("20261121T204012Z")), None);
        for bad in [
            format!("backups/x.part-{}", "AB".repeat(32)),
            format!("backups/x.part-{}", "ab".repeat(31)),
            format!("backups/.x.part-{}", "ab".repeat(32)),
            format!("wal/x.part-{}", "ab".repeat(32)),
        ] {
            assert_eq!(parse_manifest_part(&bad), None, "{bad}");
        }
    }
}
