pub mod backup;
pub mod expire;
pub mod info;
pub mod sidecar;
pub mod wal_push;
