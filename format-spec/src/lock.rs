//! Lease objects (key `locks/<kind>-<nonce>`) and GC state objects (key `gc/<nonce>`).
//!
//! Invariants: both are written create-only and never modified; a lease is renewed by writing a
//! new lease object and deleting the old one. Decoders verify the sha256 trailer first and refuse
//! trailing bytes, unknown kinds, hosts longer than [`MAX_HOST`] and pack counts the object cannot
//! hold; [`Lease::decode_for_key`] also refuses a kind that differs from the key's. The encoder
//! cuts a longer host at a character boundary, so every encoded lease decodes.

use crate::codec::{open_trailed, Writer};
use crate::error::FormatError;
use crate::ids::PackId;
/// The kind of a lease is also the `<kind>` word of its key, so it lives with the keys.
pub use crate::keys::LeaseKind;

pub const LEASE_MAGIC: [u8; 4] = *b"TMLK";
pub const GC_MAGIC: [u8; 4] = *b"TMGC";
/// Longest host name stored in a lease.
pub const MAX_HOST: usize = 255;

/// One lease object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub kind: LeaseKind,
    /// When the holder first took the lease (its own clock), microseconds since the epoch.
    pub created_us: i64,
    /// Until when this renewal is valid (holder's clock).
    pub expires_us: i64,
    /// Process id of the holder on `host`.
    pub pid: u32,
    /// Host name of the holder, at most [`MAX_HOST`] bytes.
    pub host: String,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.header(LEASE_MAGIC);
        w.u8(self.kind.code());
        w.i64(self.created_us);
        w.i64(self.expires_us);
        w.u32(self.pid);
        w.bytes(truncate_host(&self.host).as_bytes());
        w.finish_with_sha256()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "lease";
        let mut r = open_trailed(WHAT, buf, LEASE_MAGIC)?;
        let code = r.u8()?;
        let kind = LeaseKind::from_code(code)
            .ok_or_else(|| FormatError::invalid(WHAT, format!("kind {code} is not 1 or 2")))?;
        let created_us = r.i64()?;
        let expires_us = r.i64()?;
        let pid = r.u32()?;
        let host = std::str::from_utf8(r.bytes("host", MAX_HOST)?)
            .map_err(|_| FormatError::invalid(WHAT, "host is not UTF-8"))?
            .to_string();
        r.expect_end()?;
        Ok(Lease {
            kind,
            created_us,
            expires_us,
            pid,
            host,
        })
    }

    /// Decodes the lease stored under `key` and checks that its kind is the one the key names
    /// (FORMAT.md 16.1: the kind MUST match the key's `<kind>` word).
    pub fn decode_for_key(key: &str, buf: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "lease";
        let (kind, _) = crate::keys::parse_lease(key)
            .ok_or_else(|| FormatError::invalid(WHAT, format!("{key:?} is not a lease key")))?;
        let lease = Lease::decode(buf)?;
        if lease.kind != kind {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "kind {} ({}) does not match its key {key}",
                    lease.kind.code(),
                    lease.kind.word()
                ),
            ));
        }
        Ok(lease)
    }
}

/// The longest prefix of `host` that is at most [`MAX_HOST`] bytes and ends on a character
/// boundary (cutting inside a character would make the lease undecodable).
fn truncate_host(host: &str) -> &str {
    let mut end = host.len().min(MAX_HOST);
    while !host.is_char_boundary(end) {
        end -= 1;
    }
    &host[..end]
}

/// One GC state object: packs an expire found unreferenced ("condemned") at `condemned_us`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcState {
    /// When the packs were condemned (the expire's clock), microseconds since the epoch.
    pub condemned_us: i64,
    /// The condemned packs, strictly increasing.
    pub packs: Vec<PackId>,
}

impl GcState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.header(GC_MAGIC);
        w.i64(self.condemned_us);
        w.u32(self.packs.len() as u32);
        for p in &self.packs {
            w.raw(p.as_bytes());
        }
        w.finish_with_sha256()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "gc state";
        let mut r = open_trailed(WHAT, buf, GC_MAGIC)?;
        let condemned_us = r.i64()?;
        let count = r.u32()?;
        let mut packs = Vec::with_capacity(r.capacity_for(u64::from(count), 32));
        for _ in 0..count {
            let p = PackId(r.array::<32>()?);
            if packs.last().is_some_and(|l: &PackId| *l >= p) {
                return Err(FormatError::invalid(
                    WHAT,
                    "pack ids are not strictly increasing",
                ));
            }
            packs.push(p);
        }
        r.expect_end()?;
        Ok(GcState {
            condemned_us,
            packs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_round_trip_and_hostile() {
        let l = Lease {
            kind: LeaseKind::Expire,
            created_us: 1_793_523_600_000_000,
            expires_us: 1_793_523_900_000_000,
            pid: 4242,
            host: "db-0".into(),
        };
        let b = l.encode();
        assert_eq!(Lease::decode(&b).unwrap(), l);
        for n in 0..b.len() {
            assert!(Lease::decode(&b[..n]).is_err(), "truncated at {n}");
        }
        let mut bad = b.clone();
        bad[8] = 9;
        assert!(Lease::decode(&bad).is_err());
    }

    #[test]
    fn long_host_is_cut_at_a_character_boundary() {
        // 254 ASCII bytes, then a 2-byte character that would end at byte 256.
        let host = format!("{}é", "h".repeat(254));
        assert_eq!(truncate_host(&host), "h".repeat(254));
        let l = Lease {
            kind: LeaseKind::Backup,
            created_us: 0,
            expires_us: 0,
            pid: 1,
            host,
        };
        assert_eq!(Lease::decode(&l.encode()).unwrap().host, "h".repeat(254));
        assert_eq!(truncate_host(&"x".repeat(300)).len(), MAX_HOST);
        assert_eq!(truncate_host("db-0"), "db-0");
    }

    #[test]
    fn gc_state_round_trip_and_order() {
        let mut packs = vec![PackId::of(b"a"), PackId::of(b"b"), PackId::of(b"c")];
        packs.sort();
        let s = GcState {
            condemned_us: 7,
            packs: packs.clone(),
        };
        let b = s.encode();
        assert_eq!(GcState::decode(&b).unwrap(), s);
        for n in 0..b.len() {
            assert!(GcState::decode(&b[..n]).is_err(), "truncated at {n}");
        }
        packs.reverse();
        let unsorted = GcState {
            condemned_us: 7,
            packs,
        };
        assert!(GcState::decode(&unsorted.encode()).is_err());
    }
}
