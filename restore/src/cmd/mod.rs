pub mod check;
pub mod restore;
pub mod wal_fetch;
