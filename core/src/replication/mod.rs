//! The replication-protocol client: what tidemark needs of PostgreSQL's walsender to take a base
//! backup over the network (`backup --source replication`, in `backup::replication`), on the
//! `postgres-protocol` crate.
//!
//! - [`message`]: framing and parsing of backend messages and BASE_BACKUP payloads (pure).
//! - [`stream`]: BASE_BACKUP per major (14's COPY per archive, 15+'s typed COPY) as one event
//!   sequence (pure).
//! - [`conn`]: connection, startup, authentication, simple queries, the BASE_BACKUP exchange.
//! - [`tls`]: the connection's byte stream, and `sslmode` handling over rustls.

pub mod conn;
pub mod message;
pub mod stream;
pub mod tls;
