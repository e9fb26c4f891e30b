//! The tidemark end-to-end harness: real PostgreSQL 15 servers, the real tidemark binaries, and
//! `file://` repositories in per-test scratch directories.
//!
//! Invariants:
//! - Tests are parallel-safe: each owns its scratch directory, repository, ports and sockets.
//! - PostgreSQL and tidemark run as the `postgres` OS user when the tests run as root.
//! - Missing PostgreSQL or tidemark binaries fail the test with an install hint; nothing skips.

pub mod cluster;
pub mod data;
pub mod env;
pub mod expire;
pub mod faults;
pub mod lying;
pub mod replication;
pub mod repo;
pub mod rng;
pub mod s3echo;
pub mod sidecar;

pub use cluster::{
    start_restored, start_restored_standby, start_restored_standby_with_options, PgCluster,
};
pub use env::{agent, restore, tidemark, Run, TestDir, Tool};
pub use expire::expire_agreeing;
pub use repo::Repo;

/// The usual start of a scenario: a scratch directory for `test`, an empty `file://` repository,
/// a source server archiving into it and a client with the `batches` table created.
pub async fn archiving_source(
    test: &str,
) -> anyhow::Result<(TestDir, Repo, PgCluster, tokio_postgres::Client)> {
    let dir = TestDir::new(test)?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    Ok((dir, repo, src, db))
}
