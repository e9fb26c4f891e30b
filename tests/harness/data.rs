//! Rows with known commit times: the workload of the point-in-time recovery tests.
//!
//! Each batch is one transaction inserting [`BATCH_ROWS`] rows tagged with its batch number, so
//! a restored server's per-batch counts show exactly which transactions it replayed.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// Rows per batch.
pub const BATCH_ROWS: i64 = 1000;

/// Creates the `batches` table.
pub async fn create_table(db: &Client) -> Result<()> {
    db.batch_execute(
        "CREATE TABLE batches (batch int NOT NULL, n int NOT NULL, pad text NOT NULL, PRIMARY KEY (batch, n))",
    )
    .await
    .context("cannot create table batches")
}

/// Inserts batch `b` in one transaction and commits it.
pub async fn write_batch(db: &Client, b: i32) -> Result<()> {
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO batches SELECT {b}, g, repeat(md5(g::text), 3) FROM generate_series(1, {BATCH_ROWS}) g; COMMIT;"
    ))
    .await
    .with_context(|| format!("cannot write batch {b}"))
}

/// Rows per batch number.
pub async fn batch_counts(db: &Client) -> Result<BTreeMap<i32, i64>> {
    let rows = db
        .query(
            "SELECT batch, count(*) FROM batches GROUP BY batch ORDER BY batch",
            &[],
        )
        .await
        .context("cannot count rows per batch")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The server's clock in PostgreSQL's timestamptz text form (`2026-11-21 20:40:12.123456+00`).
pub async fn server_time_text(db: &Client) -> Result<String> {
    let r = db
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .context("cannot read the server clock")?;
    Ok(r.get(0))
}

/// A recovery target between two batches: [`server_time_text`] with a pause either side, so no
/// commit shares a microsecond with the reading.
pub async fn target_time_between(db: &Client) -> Result<String> {
    const GAP: std::time::Duration = std::time::Duration::from_millis(150);
    tokio::time::sleep(GAP).await;
    let t = server_time_text(db).await?;
    tokio::time::sleep(GAP).await;
    Ok(t)
}

/// The server's clock in RFC 3339 UTC with microseconds (`2026-11-21T20:40:12.123456Z`).
pub async fn server_time_rfc3339(db: &Client) -> Result<String> {
    let r = db
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .context("cannot read the server clock")?;
    Ok(r.get(0))
}

/// The timeline of the latest checkpoint, after forcing one.
pub async fn checkpoint_timeline(db: &Client) -> Result<i32> {
    db.batch_execute("CHECKPOINT")
        .await
        .context("CHECKPOINT failed")?;
    let r = db
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .context("cannot read pg_control_checkpoint()")?;
    Ok(r.get(0))
}
