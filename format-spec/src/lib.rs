//! tidemark repository format v1: pure encoders and decoders for every repository object.
//!
//! Invariants: nothing here touches a file, a socket or a clock; every decoder returns a typed
//! [`FormatError`] on garbage or truncated input and never allocates more than its input or an
//! explicit cap allows. `format-spec/FORMAT.md` is the normative description of these bytes.

pub mod chunk;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod error;
pub mod ids;
pub mod keyring;
pub mod keys;
pub mod lock;
pub mod manifest;
pub mod pack;
pub mod seal;
pub mod wal;

pub use error::FormatError;
pub use ids::{ChunkId, Lsn, PackId, SystemId, TimelineId};

/// Major format version written by this crate; readers refuse any other major version.
pub const FORMAT_MAJOR: u16 = 1;
/// Minor format version written by this crate into the objects of version 1.0 (config, packs,
/// manifests, WAL objects, leases, GC state); readers accept any minor of their major.
pub const FORMAT_MINOR: u16 = 0;
/// Minor version 1.1 added cluster records and nested system repositories (FORMAT.md 8.7);
/// cluster records carry it in their header.
pub const FORMAT_MINOR_CLUSTERS: u16 = 1;
/// Minor version 1.2 added encrypted repositories: sealed objects and keyring entries
/// (FORMAT.md 17); both carry it in their header.
pub const FORMAT_MINOR_ENCRYPTION: u16 = 2;
