pub mod check;
pub mod restore;
pub mod verify;
pub mod wal_fetch;
