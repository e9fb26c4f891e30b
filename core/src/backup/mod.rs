//! Base backups: a running server's files, copied into content-addressed chunks in packs, and a
//! manifest that makes them a backup.
//!
//! - `pipeline`: the chunk pipeline both sources feed (hash, dedup against the parent,
//!   compress, pack, upload) and the resolution of chunk locations into manifest entries.
//! - `session`: what every backup does around its source: the server's identity and major, the
//!   system's repository and the backup lease, the parent, the backup's id, the wait for WAL and
//!   the manifest, written last.
//! - [`pgdata`]: the data directory read on the database host (`backup --pgdata`).
//! - [`replication`]: a BASE_BACKUP stream over a replication connection, from a primary or a
//!   standby (`backup --source replication`).
//!
//! A backup exists once its manifest does, and a listed backup is always restorable: the
//! manifest is written only after every pack it references and every WAL segment from its start
//! to its stop are in the repository.

mod chunk_log;
pub mod pgdata;
mod pipeline;
pub mod replication;
mod session;
