//! `restore --delta` end to end on real PostgreSQL: a restored copy runs on, changes 1% of a
//! table, drops and adds things and writes its own WAL; a delta restore of the same backup over
//! it brings back exactly the backed-up rows, and writes only what differed. The bytes it says
//! it wrote are counted independently, block by block, from the directory before and after.
//! Refusals: a running server, another database system, a directory that is not a data
//! directory; an interrupted delta restore (pg_control gone, marker left) is run again.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tidemark_e2e::data;
use tidemark_e2e::{start_restored, PgCluster, Repo};
use tokio_postgres::Client;

/// Rows of the `big` table; 1% of them (the first 2,000: a contiguous range of pages, as a
/// day's changes mostly are) are updated on the copy.
const BIG_ROWS: i64 = 200_000;
/// PostgreSQL's page size: a backup's chunk size.
const BLOCK: usize = 8192;
/// Files the restore writes itself after the backup's files (their bytes are not compared).
const WRITTEN_AFTER: &[&str] = &[
    "postgresql.auto.conf",
    "backup_label",
    "recovery.signal",
    "global/pg_control",
];

async fn digest(db: &Client) -> Result<String> {
    let row = db
        .query_one(
            "SELECT md5(string_agg(g::text || ':' || v, ',' ORDER BY g)) FROM big",
            &[],
        )
        .await
        .context("cannot digest table big")?;
    Ok(row.get(0))
}

async fn tables(db: &Client) -> Result<Vec<String>> {
    Ok(db
        .query(
            "SELECT relname::text FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Every regular file below `root` (relative path → content), symlinks not followed.
fn files(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let t = e.file_type()?;
            let p = e.path();
            if t.is_dir() {
                walk(root, &p, out)?;
            } else if t.is_file() {
                let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p)?);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// Bytes a restore had to write to turn `before` into `after`: per file, the blocks that differ
/// (each counted at its length in `after`), a file absent before counted whole.
fn changed_bytes(before: &BTreeMap<String, Vec<u8>>, after: &BTreeMap<String, Vec<u8>>) -> u64 {
    let mut n = 0u64;
    for (path, new) in after {
        if WRITTEN_AFTER.contains(&path.as_str()) {
            continue;
        }
        let old = before.get(path).map(Vec::as_slice).unwrap_or(&[]);
        for (i, block) in new.chunks(BLOCK).enumerate() {
            let start = i * BLOCK;
            let was = old.get(start..(start + block.len()).min(old.len()));
            if was != Some(block) {
                n += block.len() as u64;
            }
        }
    }
    n
}

async fn restore(repo: &Repo, pgdata: &Path, args: &[&str]) -> Result<tidemark_e2e::env::Run> {
    repo.restore(pgdata, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_restore_writes_only_what_differs_and_restores_exactly() -> Result<()> {
    let (dir, repo, src, db) = tidemark_e2e::archiving_source("delta").await?;
    for b in 1..=3 {
        data::write_batch(&db, b).await?;
    }
    db.batch_execute(&format!(
        "CREATE TABLE big (g int PRIMARY KEY, v text); INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {BIG_ROWS}) g; CHECKPOINT"
    ))
    .await?;
    let want_digest = digest(&db).await?;
    let want_batches = data::batch_counts(&db).await?;
    let backup = src.backup_id(&repo).await?;
    src.switch_wal_and_wait(&repo).await?;

    // A full restore with --delta into a directory that does not exist: a plain restore.
    let copy: PathBuf = dir.join("copy");
    let r = restore(&repo, &copy, &["--target", "immediate", "--delta"])
        .await?
        .ok()?;
    let full = r.json()?;
    ensure!(
        full["delta"].is_null(),
        "a new directory is no delta: {full}"
    );
    let total = full["bytes"].as_u64().context("bytes")?;

    // The copy runs on: 1% of big updated, a batch added, a table dropped, one created.
    let mut c = start_restored(&dir, "copy-1", &copy).await?;
    let cdb = c.client().await?;
    cdb.batch_execute(
        "UPDATE big SET v = 'changed' WHERE g <= 2000; DROP TABLE batches; CREATE TABLE scratch AS SELECT generate_series(1, 1000) AS n; CHECKPOINT",
    )
    .await?;
    ensure!(
        digest(&cdb).await? != want_digest,
        "the copy did not change"
    );
    drop(cdb);

    // Refused while the server runs; nothing changes.
    let before_running = files(&copy)?;
    let r = restore(&repo, &copy, &["--target", "immediate", "--delta"]).await?;
    ensure!(
        !r.success() && r.stderr.contains("postmaster.pid") && r.stderr.contains("hint:"),
        "a delta restore over a running server must be refused naming postmaster.pid:\n{r}"
    );
    ensure!(
        changed_bytes(&before_running, &files(&copy)?) == 0,
        "a refused delta restore changed the directory"
    );
    c.stop().await?;

    // The delta restore of the same backup over the stopped copy.
    let before = files(&copy)?;
    let args = ["--target", "immediate", "--backup", &backup, "--delta"];
    let r = restore(&repo, &copy, &args).await?.ok()?;
    let report = r.json()?;
    let d = &report["delta"];
    let num = |k: &str| {
        d[k].as_u64()
            .with_context(|| format!("delta.{k} in {report}"))
    };
    let written = num("bytes_written")?;
    let after = files(&copy)?;
    let counted = changed_bytes(&before, &after);
    let own: u64 = WRITTEN_AFTER
        .iter()
        .filter_map(|p| after.get(*p))
        .map(|f| f.len() as u64)
        .sum();
    eprintln!(
        "delta: full restore {total} bytes; delta wrote {written} bytes (counted from the files: {counted} + at most {own} of files the restore writes itself); {d}"
    );
    ensure!(
        written >= counted && written <= counted + own,
        "delta restore reports {written} bytes written, the files show {counted} changed (+{own} written by the restore itself)"
    );
    ensure!(
        written * 5 < total,
        "a delta restore after a 1% change wrote {written} of {total} bytes"
    );
    ensure!(
        num("files_kept")? > 100 && num("files_patched")? >= 1 && num("entries_removed")? >= 1,
        "delta counts: {d}"
    );
    ensure!(
        !after.keys().any(|p| p.starts_with("pg_wal/0000000")),
        "the copy's own WAL was left in pg_wal: {:?}",
        after
            .keys()
            .filter(|p| p.starts_with("pg_wal/"))
            .collect::<Vec<_>>()
    );
    ensure!(
        !copy.join(".tidemark-delta-restore").exists(),
        "the delta marker was left behind"
    );

    // Exactly the backed-up rows, the copy's changes gone.
    let mut c = start_restored(&dir, "copy-2", &copy).await?;
    let cdb = c.client().await?;
    ensure!(
        digest(&cdb).await? == want_digest,
        "table big differs from the backup after the delta restore"
    );
    ensure!(
        data::batch_counts(&cdb).await? == want_batches,
        "batches differ after the delta restore"
    );
    ensure!(
        tables(&cdb).await? == vec!["batches".to_string(), "big".to_string()],
        "tables after the delta restore: {:?}",
        tables(&cdb).await?
    );
    drop(cdb);
    c.stop().await?;

    // An interrupted delta restore: pg_control removed, the marker left; a rerun finishes it,
    // while without the marker the directory is not taken for a data directory.
    std::fs::remove_file(copy.join("global/pg_control"))?;
    let r = restore(&repo, &copy, &args).await?;
    ensure!(
        !r.success() && r.stderr.contains("pg_control") && r.stderr.contains("hint:"),
        "a directory without pg_control or marker must be refused:\n{r}"
    );
    let system = src.system_identifier().await?;
    std::fs::write(copy.join(".tidemark-delta-restore"), &system)?;
    tidemark_e2e::env::give_to_db_user(&copy.join(".tidemark-delta-restore"))?;
    let r = restore(&repo, &copy, &args).await?.ok()?;
    let d = &r.json()?["delta"];
    ensure!(
        d["bytes_written"].as_u64().is_some_and(|w| w * 5 < total),
        "the rerun over an almost finished directory should write little: {d}"
    );
    let c = start_restored(&dir, "copy-3", &copy).await?;
    ensure!(
        digest(&c.client().await?).await? == want_digest,
        "table big differs after the resumed delta restore"
    );
    drop(c);

    // Another database system's stopped data directory: refused, untouched.
    let mut other = PgCluster::initdb(&dir, "other").await?;
    other.start().await?;
    other.stop().await?;
    let before_other = files(&other.data)?;
    let r = restore(&repo, &other.data, &["--target", "immediate", "--delta"]).await?;
    ensure!(
        !r.success() && r.stderr.contains("database system") && r.stderr.contains("hint:"),
        "a delta restore over another system must be refused naming it:\n{r}"
    );
    ensure!(
        files(&other.data)? == before_other,
        "the refused delta restore changed the other system's directory"
    );
    Ok(())
}
