//! The archive_command and restore_command contracts against WAL from a real server: a stored
//! segment is never overwritten, a foreign cluster's WAL is refused, and wal-fetch tells "not in
//! the archive" (exit 1) from "cannot read the archive" (exit 128); WAL of an unknown major is
//! archived with a warning.

use anyhow::{ensure, Context, Result};
use std::time::Duration;
use tidemark_e2e::env::flip_bytes;
use tidemark_e2e::{data, PgCluster, Repo, TestDir};

/// A cluster archiving into a repository, with some data written and one segment archived.
async fn archived_segment(dir: &TestDir) -> Result<(Repo, PgCluster, String)> {
    let repo = Repo::create(dir, "repo")?;
    let src = PgCluster::start_archiving(dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let seg = src.switch_wal_and_wait(&repo).await?;
    Ok((repo, src, seg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_push_never_overwrites_a_stored_segment() -> Result<()> {
    let dir = TestDir::new("wal-conflict")?;
    let (repo, src, seg) = archived_segment(&dir).await?;
    let stored = repo.wal_object(&seg)?;
    let stored_before = std::fs::read(&stored)?;

    // The archived copy comes back byte for byte (and matches pg_wal while the server keeps it).
    dir.mkdir("fetched")?;
    let fetched = dir.join("fetched").join(&seg);
    repo.wal_fetch(&seg, &fetched).await?.ok()?;
    let original = std::fs::read(&fetched)?;
    ensure!(
        original.len() == 16 << 20,
        "fetched {seg} is {} bytes",
        original.len()
    );
    if let Ok(in_pg_wal) = std::fs::read(src.data.join("pg_wal").join(&seg)) {
        ensure!(
            in_pg_wal == original,
            "wal-fetch returned different bytes than pg_wal/{seg}"
        );
    }

    // Same name, different content: refused, stored object untouched.
    dir.mkdir("conflict")?;
    let mut modified = original.clone();
    modified[(8 << 20) + 1234] ^= 0xff;
    let conflicting = dir.write(&format!("conflict/{seg}"), &modified)?;
    let r = repo.wal_push(&conflicting).await?;
    ensure!(!r.success(), "pushing a different {seg} must fail:\n{r}");
    ensure!(
        r.code() == Some(1),
        "a refused push must exit 1 (archive_command: > 125 makes the archiver FATAL):\n{r}"
    );
    ensure!(
        r.stderr.contains("already archived with different content"),
        "the refusal does not say why:\n{r}"
    );
    ensure!(
        std::fs::read(&stored)? == stored_before,
        "the stored object of {seg} changed"
    );
    eprintln!(
        "wal-conflict: conflicting {seg} refused (exit {:?}): {}",
        r.code(),
        r.stderr.lines().next().unwrap_or("")
    );

    // Same name, same content: success (archive_command may be retried after a crash).
    dir.mkdir("identical")?;
    let identical = dir.write(&format!("identical/{seg}"), &original)?;
    let r = repo.wal_push(&identical).await?;
    ensure!(
        r.success(),
        "pushing the identical {seg} again must succeed:\n{r}"
    );
    ensure!(
        std::fs::read(&stored)? == stored_before,
        "the stored object of {seg} changed on an identical push"
    );
    eprintln!("wal-conflict: identical {seg} pushed again: exit 0, stored object unchanged");
    Ok(())
}

/// WAL of a PostgreSQL major tidemark has never seen (a forged page magic) is archived with a
/// loud warning, never refused: a refused archive_command fills pg_wal until the disk is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_push_archives_an_unknown_major_with_a_warning() -> Result<()> {
    let dir = TestDir::new("wal-future-major")?;
    let (repo, _src, seg) = archived_segment(&dir).await?;
    dir.mkdir("future/pg_wal")?;
    let original = dir.join("future/original");
    repo.wal_fetch(&seg, &original).await?.ok()?;
    let mut bytes = std::fs::read(&original)?;
    ensure!(
        bytes[..2] == [0x10, 0xd1],
        "PostgreSQL 15's page magic is 0xD110"
    );
    // 0xD1F0: no PostgreSQL release has used it.
    bytes[..2].copy_from_slice(&0xD1F0u16.to_le_bytes());
    let name = format!("{}000000F0", &seg[..16]);
    let forged = dir.write(&format!("future/pg_wal/{name}"), &bytes)?;
    let r = repo.wal_push(&forged).await?;
    ensure!(
        r.success(),
        "WAL of an unknown major must be archived:\n{r}"
    );
    ensure!(
        r.stderr.contains("does not know") && r.stderr.contains("0xd1f0"),
        "the push of an unknown major did not warn:\n{r}"
    );
    ensure!(
        repo.wal_object(&name)?.is_file(),
        "{name} is not in the repository"
    );
    // And it comes back byte for byte.
    let back = dir.join("future/back");
    repo.wal_fetch(&name, &back).await?.ok()?;
    ensure!(std::fs::read(&back)? == bytes, "{name} came back different");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_push_refuses_a_segment_of_another_cluster() -> Result<()> {
    let dir = TestDir::new("wal-foreign")?;
    let (repo, src, _seg) = archived_segment(&dir).await?;
    let ours = src.system_identifier().await?;
    let other = PgCluster::initdb(&dir, "other").await?;
    let theirs = other.system_identifier().await?;
    ensure!(
        ours != theirs,
        "two initdb runs gave the same system identifier {ours}"
    );

    let mut segs: Vec<_> = std::fs::read_dir(other.data.join("pg_wal"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 24)
        })
        .collect();
    segs.sort();
    let foreign = segs
        .first()
        .context("the other cluster has no WAL segment")?;
    let before = repo.snapshot()?;
    let r = repo.wal_push(foreign).await?;
    ensure!(
        !r.success(),
        "a segment of system {theirs} must not enter the repository of {ours}:\n{r}"
    );
    ensure!(
        r.stderr.contains(&theirs) && r.stderr.contains(&ours),
        "the refusal does not name both system identifiers ({ours}, {theirs}):\n{r}"
    );
    ensure!(
        repo.snapshot()? == before,
        "the refused push changed the repository"
    );
    eprintln!(
        "wal-foreign: segment {} of system {theirs} refused by the repository of {ours} (exit {:?}): {}",
        foreign.display(),
        r.code(),
        r.stderr.lines().next().unwrap_or("")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_fetch_tells_missing_from_unreadable() -> Result<()> {
    let dir = TestDir::new("wal-fetch")?;
    let (repo, _src, seg) = archived_segment(&dir).await?;
    let dest_dir = dir.mkdir("pg_wal")?;

    for missing in ["0000000100000000000000F7", "00000002.history"] {
        let dest = dest_dir.join("RECOVERYXLOG");
        let r = repo.wal_fetch(missing, &dest).await?;
        ensure!(
            r.code() == Some(1),
            "fetching absent {missing} must exit 1:\n{r}"
        );
        ensure!(
            r.elapsed < Duration::from_secs(3),
            "fetching absent {missing} took {:?}; recovery probes must be quick",
            r.elapsed
        );
        ensure!(!dest.exists(), "a failed fetch left {}", dest.display());
        eprintln!(
            "wal-fetch: absent {missing}: exit 1 in {:.2}s",
            r.elapsed.as_secs_f64()
        );
    }

    let stored = repo.wal_object(&seg)?;
    let len = std::fs::metadata(&stored)?.len() as usize;
    flip_bytes(&stored, len / 2, 4)?;
    let dest = dest_dir.join("RECOVERYXLOG");
    let r = repo.wal_fetch(&seg, &dest).await?;
    ensure!(
        r.code() == Some(128),
        "fetching damaged {seg} must exit 128 so recovery aborts instead of ending early:\n{r}"
    );
    ensure!(!dest.exists(), "a failed fetch left {}", dest.display());
    let left: Vec<_> = std::fs::read_dir(&dest_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    ensure!(
        left.is_empty(),
        "a failed fetch left files behind: {left:?}"
    );
    eprintln!(
        "wal-fetch: damaged {seg}: exit 128 after {:.1}s: {}",
        r.elapsed.as_secs_f64(),
        r.stderr.lines().find(|l| l.contains("error")).unwrap_or("")
    );
    Ok(())
}
