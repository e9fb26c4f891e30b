pub mod backup;
pub mod expire;
pub mod exporter;
pub mod info;
pub mod key;
pub mod repo;
pub mod sidecar;
pub mod wal_push;
