//! The repository config object (key `config`): format version, chunking parameters and the
//! cluster system identifier every stored WAL segment and backup must match.

use crate::chunk::MAX_CHUNK_SIZE;
use crate::codec::{open_trailed, Writer};
use crate::error::FormatError;
use crate::ids::SystemId;

pub const MAGIC: [u8; 4] = *b"TMCF";
/// Compression algorithm code for zstd, the only one format v1 defines.
pub const COMPRESSION_ZSTD: u8 = 1;
/// Smallest chunk size a config may declare.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest pack target a config may declare (packs are buffered whole before upload).
pub const MAX_PACK_TARGET: u32 = 1 << 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoConfig {
    /// The PostgreSQL cluster this repository belongs to.
    pub system_id: SystemId,
    /// Fixed chunk size in bytes for base-backup file data: a power of two in 4 KiB..=1 MiB.
    pub chunk_size: u32,
    /// Compressed bytes after which a writer seals a pack and starts the next.
    pub pack_target: u32,
    /// Compression algorithm of chunks and WAL objects ([`COMPRESSION_ZSTD`]).
    pub compression: u8,
    /// Creation time, microseconds since the Unix epoch (UTC).
    pub created_us: i64,
}

impl RepoConfig {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.header(MAGIC);
        w.u64(self.system_id.0);
        w.u32(self.chunk_size);
        w.u32(self.pack_target);
        w.u8(self.compression);
        w.i64(self.created_us);
        w.finish_with_sha256()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "repository config";
        let mut r = open_trailed(WHAT, buf, MAGIC)?;
        let cfg = RepoConfig {
            system_id: SystemId(r.u64()?),
            chunk_size: r.u32()?,
            pack_target: r.u32()?,
            compression: r.u8()?,
            created_us: r.i64()?,
        };
        r.expect_end()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), FormatError> {
        const WHAT: &str = "repository config";
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "chunk size {} is not a power of two in 4096..=1048576",
                    self.chunk_size
                ),
            ));
        }
        if self.pack_target == 0 || self.pack_target > MAX_PACK_TARGET {
            return Err(FormatError::invalid(
                WHAT,
                format!("pack target {} is outside 1..=1073741824", self.pack_target),
            ));
        }
        if self.compression != COMPRESSION_ZSTD {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "compression code {} is unknown (1 = zstd)",
                    self.compression
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RepoConfig {
        RepoConfig {
            system_id: SystemId(7_300_000_000_000_000_001),
            chunk_size: 8192,
            pack_target: 32 << 20,
            compression: COMPRESSION_ZSTD,
            created_us: 1_763_750_000_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let b = sample().encode();
        assert_eq!(RepoConfig::decode(&b).unwrap(), sample());
    }

    #[test]
    fn refuses_unknown_major_version() {
        let mut b = sample().encode();
        b[4] = 2;
        let err = RepoConfig::decode(&b).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::UnsupportedVersion {
                    found: 2,
                    max: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade tidemark"));
    }

    #[test]
    fn refuses_bad_chunk_size() {
        let mut c = sample();
        c.chunk_size = 5000;
        assert!(RepoConfig::decode(&c.encode()).is_err());
    }
}
