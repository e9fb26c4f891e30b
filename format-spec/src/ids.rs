//! Typed identifiers. `Display` always prints the full value: a hash is never truncated.

use crate::error::FormatError;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

macro_rules! digest_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A ", $what, ": the sha256 named in FORMAT.md, printed as 64 lowercase hex digits.")]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The sha256 of `data`.
            pub fn of(data: &[u8]) -> Self {
                $name(Sha256::digest(data).into())
            }
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }
        impl FromStr for $name {
            type Err = FormatError;
            fn from_str(s: &str) -> Result<Self, FormatError> {
                if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(FormatError::invalid($what, format!("{s:?} is not 64 lowercase hex digits")));
                }
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out)
                    .map_err(|e| FormatError::invalid($what, format!("{s:?}: {e}")))?;
                Ok($name(out))
            }
        }
    };
}

digest_id!(ChunkId, "chunk id");
digest_id!(PackId, "pack id");

/// A sha256 of a whole file or WAL segment's uncompressed bytes.
pub type ContentHash = ChunkId;

/// A PostgreSQL write-ahead-log position.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}
impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}
impl FromStr for Lsn {
    type Err = FormatError;
    /// Parses PostgreSQL's `XXXXXXXX/XXXXXXXX` text form.
    fn from_str(s: &str) -> Result<Self, FormatError> {
        let bad = || FormatError::invalid("lsn", format!("{s:?} is not of the form HI/LO in hex"));
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

/// A PostgreSQL timeline id; prints as 8 uppercase hex digits, as in WAL file names.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

/// A PostgreSQL cluster's database system identifier (from pg_control and every WAL segment).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SystemId(pub u64);

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_postgres_text() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("G/0".parse::<Lsn>().is_err());
    }

    #[test]
    fn chunk_id_hex_round_trip() {
        let id = ChunkId::of(b"abc");
        assert_eq!(
            id.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        assert!(id.to_string().to_uppercase().parse::<ChunkId>().is_err());
    }
}
