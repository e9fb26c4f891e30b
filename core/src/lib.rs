//! tidemark's library: storage, the backup chunk pipeline, restore, WAL archiving and the
//! PostgreSQL connection helpers. Both binaries are thin command layers over this crate.

pub mod archive;
pub mod backup;
pub mod check;
pub mod cli;
pub mod encryption;
pub mod expire;
pub mod gc;
pub mod health;
pub mod info;
pub mod lease;
pub mod manifest_file;
pub mod metrics;
pub mod pg;
pub mod pgversion;
pub mod prefetch;
pub mod progress;
pub mod ranges;
pub mod repack;
pub mod replication;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod sidecar;
pub mod spill;
pub mod store;
pub mod tablespace;
pub mod target;
#[cfg(test)]
mod test_support;
mod testhooks;
pub mod timeline;
pub mod verify;
pub mod wal;
pub mod window;
