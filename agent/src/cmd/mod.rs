pub mod backup;
pub mod info;
pub mod sidecar;
pub mod wal_push;
