pub mod backup;
pub mod info;
pub mod wal_push;
