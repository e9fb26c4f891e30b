//! Cluster records (key `clusters/<system id>`, format 1.1): which database systems a repository
//! holds and the PostgreSQL major of each. A repository holds its config's system at the top
//! level and every later system (a major upgrade: pg_upgrade makes a new system identifier) as
//! a nested repository under `systems/<system id>/` (FORMAT.md 8.7).

use crate::codec::{open_trailed, Writer};
use crate::error::FormatError;
use crate::ids::SystemId;

pub const MAGIC: [u8; 4] = *b"TMCL";
const WHAT: &str = "cluster record";
/// Exact size of a cluster record: header 8, system_id 8, pg_major 4, created_us 8, trailer 32.
pub const SIZE: usize = 60;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRecord {
    pub system_id: SystemId,
    /// PostgreSQL major of every backup and WAL object of this system (e.g. 15); 0 = unknown
    /// (an archive created by a writer that could not tell).
    pub pg_major: u32,
    /// When the system was first seen by a writer, microseconds since the Unix epoch (UTC).
    pub created_us: i64,
}

impl ClusterRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.header_minor(MAGIC, crate::FORMAT_MINOR_CLUSTERS);
        w.u64(self.system_id.0);
        w.u32(self.pg_major);
        w.i64(self.created_us);
        w.finish_with_sha256()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let mut r = open_trailed(WHAT, buf, MAGIC)?;
        let rec = ClusterRecord {
            system_id: SystemId(r.u64()?),
            pg_major: r.u32()?,
            created_us: r.i64()?,
        };
        r.expect_end()?;
        if rec.pg_major != 0 && !(10..=999).contains(&rec.pg_major) {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "PostgreSQL major {} is not 0 (unknown) or 10..=999",
                    rec.pg_major
                ),
            ));
        }
        Ok(rec)
    }

    /// The record's own key.
    pub fn key(&self) -> String {
        crate::keys::cluster(self.system_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterRecord {
        ClusterRecord {
            system_id: SystemId(7_300_000_000_000_000_001),
            pg_major: 15,
            created_us: 1_763_750_000_000_000,
        }
    }

    #[test]
    fn round_trip_and_size() {
        let b = sample().encode();
        assert_eq!(b.len(), SIZE);
        assert_eq!(&b[4..8], &[1, 0, 1, 0]);
        assert_eq!(ClusterRecord::decode(&b).unwrap(), sample());
    }

    #[test]
    fn refuses_damage() {
        let b = sample().encode();
        for cut in 0..b.len() {
            assert!(ClusterRecord::decode(&b[..cut]).is_err(), "cut {cut}");
        }
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x01;
            assert!(ClusterRecord::decode(&x).is_err(), "flip {i}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(ClusterRecord::decode(&long).is_err());
        let mut c = sample();
        c.pg_major = 5;
        assert!(ClusterRecord::decode(&c.encode()).is_err());
        c.pg_major = 0;
        assert!(ClusterRecord::decode(&c.encode()).is_ok());
    }
}
