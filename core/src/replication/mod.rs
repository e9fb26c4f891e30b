//! The replication-protocol client: what tidemark needs of PostgreSQL's walsender to take a base
//! backup over the network (`backup --source replication`), on the `postgres-protocol` crate.
//!
//! - [`message`]: framing and parsing of backend messages and BASE_BACKUP payloads (pure).
//! - [`tar`]: a streaming reader of the tar archives BASE_BACKUP sends (pure).
//! - `demux`: tar archives to chunk-aligned blocks of files, and the workers that store them.
//! - [`stream`]: BASE_BACKUP per major (14's COPY per archive, 15+'s typed COPY) as one event
//!   sequence (pure).
//! - [`conn`]: connection, startup, authentication, simple queries, the BASE_BACKUP exchange.
//! - [`tls`]: `sslmode` handling over rustls.
//! - [`server_manifest`]: checking the server's backup manifest against what was stored.

pub mod base_backup;
pub mod conn;
mod demux;
pub mod message;
pub mod server_manifest;
pub mod stream;
pub mod tar;
pub mod tls;
