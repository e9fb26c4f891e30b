//! Restore against real backups: damaged chunks are detected and named, data directories are
//! never overwritten, restored files carry PostgreSQL's modes and owner, and an incremental
//! backup stores only what changed yet restores completely.

use anyhow::{bail, ensure, Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use tidemark_e2e::env::{db_user, flip_bytes};
use tidemark_e2e::{data, start_restored, PgCluster, Repo, TestDir};

/// A cluster archiving into a repository, with one batch written and one backup taken.
async fn backed_up(dir: &TestDir) -> Result<(Repo, PgCluster, serde_json::Value)> {
    let repo = Repo::create(dir, "repo")?;
    let src = PgCluster::start_archiving(dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let backup = src.backup(&repo).await?;
    Ok((repo, src, backup))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_fails_the_restore_and_names_the_file() -> Result<()> {
    let dir = TestDir::new("damaged-chunk")?;
    let (repo, src, _backup) = backed_up(&dir).await?;
    let packs = repo.packs()?;
    let (pack, size) = packs.first().context("the backup stored no pack")?;
    ensure!(*size > 4096, "the largest pack is only {size} bytes");
    flip_bytes(pack, 100, 4)?;

    let pgdata = dir.join("restored");
    let r = repo.restore(&pgdata, &["--target", "latest"]).await?;
    ensure!(
        !r.success(),
        "restoring from a damaged pack must fail:\n{r}"
    );
    ensure!(
        r.stderr.contains("damaged"),
        "the failure does not say the data is damaged:\n{r}"
    );
    // "file <relative path>: chunk ... is damaged": the path must be a file of the backed-up cluster.
    let named = r
        .stderr
        .split("file ")
        .skip(1)
        .filter_map(|rest| rest.split([':', ' ', '\n']).next())
        .find(|p| !p.is_empty() && src.data.join(p).is_file())
        .with_context(|| format!("the failure does not name a file of the data directory:\n{r}"))?
        .to_string();
    ensure!(
        !Path::new(&named).is_absolute(),
        "the failure names an absolute path {named}"
    );
    let control = pgdata.join("global/pg_control");
    let control_len = std::fs::metadata(&control).map(|m| m.len()).unwrap_or(0);
    ensure!(
        control_len < 8192,
        "a failed restore left a complete global/pg_control; it must stay unstartable"
    );
    eprintln!(
        "damaged-chunk: flipped bytes 100..104 of pack {} ({size} bytes); restore failed naming file {named}: {}",
        pack.file_name().unwrap_or_default().to_string_lossy(),
        r.stderr.lines().find(|l| l.contains("damaged")).unwrap_or("")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_non_empty_directory() -> Result<()> {
    let dir = TestDir::new("non-empty")?;
    let (repo, _src, _backup) = backed_up(&dir).await?;
    let pgdata = dir.mkdir("existing")?;
    dir.write("existing/PG_VERSION", b"keep me\n")?;
    let r = repo.restore(&pgdata, &["--target", "latest"]).await?;
    ensure!(
        !r.success(),
        "restoring into a non-empty directory must fail:\n{r}"
    );
    ensure!(
        r.stderr.contains("not empty"),
        "the refusal does not say why:\n{r}"
    );
    let names: Vec<_> = std::fs::read_dir(&pgdata)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    ensure!(
        names == ["PG_VERSION"],
        "the refused restore changed the directory: {names:?}"
    );
    ensure!(
        std::fs::read(pgdata.join("PG_VERSION"))? == b"keep me\n",
        "the refused restore overwrote PG_VERSION"
    );
    eprintln!(
        "non-empty: restore into {} refused: {}",
        pgdata.display(),
        r.stderr.lines().next().unwrap_or("")
    );
    Ok(())
}

/// Walks a restored data directory: directories 0700, files 0600, everything owned by the
/// database user. Returns (directories, files).
fn audit_modes(root: &Path) -> Result<(usize, usize)> {
    let want_uid = db_user()?.uid;
    let (mut dirs, mut files) = (0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let m = std::fs::symlink_metadata(&d)?;
        ensure!(
            m.mode() & 0o7777 == 0o700,
            "directory {} has mode {:o}, want 700",
            d.display(),
            m.mode() & 0o7777
        );
        ensure!(
            m.uid() == want_uid,
            "directory {} is owned by uid {}, want {want_uid}",
            d.display(),
            m.uid()
        );
        dirs += 1;
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let m = std::fs::symlink_metadata(&p)?;
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                ensure!(
                    m.mode() & 0o7777 == 0o600,
                    "file {} has mode {:o}, want 600",
                    p.display(),
                    m.mode() & 0o7777
                );
                ensure!(
                    m.uid() == want_uid,
                    "file {} is owned by uid {}, want {want_uid}",
                    p.display(),
                    m.uid()
                );
                files += 1;
            } else {
                bail!(
                    "{} is neither a file nor a directory (no tablespaces were created)",
                    p.display()
                );
            }
        }
    }
    Ok((dirs, files))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_files_have_postgres_modes_and_owner() -> Result<()> {
    let dir = TestDir::new("modes")?;
    let (repo, _src, backup) = backed_up(&dir).await?;

    // Into a directory that does not exist yet, and into an empty one with a too-open mode.
    let absent = dir.join("restored-new");
    let empty = dir.mkdir("restored-empty")?;
    std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    for pgdata in [&absent, &empty] {
        repo.restore(pgdata, &["--target", "latest"]).await?.ok()?;
        for required in [
            "global/pg_control",
            "PG_VERSION",
            "backup_label",
            // To the end of the archive: standby mode, promoted by wal-fetch when it ends.
            "standby.signal",
            ".tidemark-promote-at-end",
            "base",
            "pg_wal",
        ] {
            ensure!(
                pgdata.join(required).exists(),
                "the restore did not create {required} in {}",
                pgdata.display()
            );
        }
        let control = std::fs::metadata(pgdata.join("global/pg_control"))?;
        ensure!(
            control.len() == 8192,
            "global/pg_control is {} bytes",
            control.len()
        );
        let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf"))?;
        for setting in [
            "restore_command",
            "wal-fetch",
            "recovery_target_action = 'promote'",
            "recovery_target_timeline = 'latest'",
        ] {
            ensure!(
                auto.contains(setting),
                "postgresql.auto.conf lacks {setting:?}:\n{auto}"
            );
        }
        ensure!(
            auto.lines()
                .rev()
                .find(|l| l.starts_with("recovery_target_time "))
                == Some("recovery_target_time = ''"),
            "a latest restore must clear recovery_target_time (a restored server's backup may carry one):\n{auto}"
        );
        let label = std::fs::read_to_string(pgdata.join("backup_label"))?;
        ensure!(
            label.contains("START WAL LOCATION") && label.contains("LABEL: tidemark"),
            "backup_label is not pg_backup_stop's:\n{label}"
        );
        let (dirs, files) = audit_modes(pgdata)?;
        eprintln!(
            "modes: backup {} restored into {}: {dirs} directories 0700 and {files} files 0600, all owned by uid {}",
            backup["backup_id"],
            pgdata.display(),
            db_user()?.uid
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backup_stores_only_what_changed() -> Result<()> {
    let dir = TestDir::new("incremental")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    for b in 1..=40 {
        data::write_batch(&db, b).await?;
    }
    let first = src.backup(&repo).await?;
    // Runs of consecutive new pages were compressed as shared frames (format 1.4), of at most
    // 256 KiB (32 pages) each.
    let (mut chunks, mut frames) = (0usize, std::collections::HashSet::new());
    let mut ids = std::collections::HashSet::new();
    for (p, _) in repo.packs()? {
        let entries = tidemark_format::pack::decode(&std::fs::read(&p)?)?;
        for e in entries {
            ensure!(
                e.skip + e.ulen <= 256 << 10,
                "a frame holds more than 256 KiB"
            );
            chunks += 1;
            frames.insert((p.clone(), e.offset));
            ensure!(
                ids.insert((p.clone(), e.id)),
                "chunk {} is stored twice in pack {}",
                e.id,
                p.display()
            );
        }
    }
    ensure!(
        frames.len() * 4 < chunks,
        "the first backup stored {chunks} chunks in {} frames: runs of pages were not grouped",
        frames.len()
    );
    // Update 1% of the rows, all in one batch (a handful of pages).
    let updated = db
        .execute(
            "UPDATE batches SET pad = 'updated' WHERE batch = 7 AND n <= 400",
            &[],
        )
        .await?;
    ensure!(updated == 400, "updated {updated} rows");
    let second = src.backup(&repo).await?;
    let n = |v: &serde_json::Value, k: &str| {
        v[k].as_u64().with_context(|| format!("{k} missing in {v}"))
    };
    eprintln!(
        "incremental: first backup stored {} bytes ({} new chunks, {} reused) of {} logical; second stored {} bytes ({} new chunks, {} reused) of {}",
        n(&first, "new_stored_bytes")?,
        n(&first, "new_chunks")?,
        n(&first, "reused_chunks")?,
        n(&first, "logical_bytes")?,
        n(&second, "new_stored_bytes")?,
        n(&second, "new_chunks")?,
        n(&second, "reused_chunks")?,
        n(&second, "logical_bytes")?
    );
    ensure!(
        n(&second, "reused_chunks")? > 0,
        "the second backup reused no chunk: {second}"
    );
    ensure!(
        n(&second, "reused_chunks")? > 10 * n(&second, "new_chunks")?,
        "the second backup stored {} new chunks and reused only {}",
        n(&second, "new_chunks")?,
        n(&second, "reused_chunks")?
    );
    ensure!(
        n(&second, "new_stored_bytes")? * 5 < n(&first, "new_stored_bytes")?,
        "the second backup stored {} bytes, not much less than the first's {}",
        n(&second, "new_stored_bytes")?,
        n(&first, "new_stored_bytes")?
    );
    let info = repo.info().await?;
    let backups = info["backups"].as_array().context("info backups")?;
    ensure!(
        backups.len() == 2,
        "info lists {} backups: {info}",
        backups.len()
    );
    ensure!(
        backups[1]["id"] == second["backup_id"] && backups[1]["parent"] == first["backup_id"],
        "info does not show the second backup with the first as parent: {info}"
    );

    // The incremental backup restores completely: its files mix chunks from both backups' packs.
    let pgdata = dir.join("restored");
    let r = repo.restore(&pgdata, &["--target", "latest"]).await?.ok()?;
    ensure!(
        r.json()?["backup_id"] == second["backup_id"],
        "restore chose another backup:\n{r}"
    );
    let restored = start_restored(&dir, "restored-server", &pgdata).await?;
    let rdb = restored.client().await?;
    let counts = data::batch_counts(&rdb).await?;
    ensure!(
        counts.len() == 40 && counts.values().all(|&c| c == data::BATCH_ROWS),
        "restored rows per batch: {counts:?}"
    );
    let row = rdb
        .query_one(
            "SELECT count(*) FILTER (WHERE pad = 'updated'), count(*) FROM batches",
            &[],
        )
        .await?;
    let (upd, total): (i64, i64) = (row.get(0), row.get(1));
    ensure!(
        upd == 400,
        "the restored server has {upd} updated rows, want 400"
    );
    let stale = rdb
        .query_one(
            "SELECT count(*) FROM batches WHERE batch = 7 AND n <= 400 AND pad <> 'updated'",
            &[],
        )
        .await?;
    ensure!(
        stale.get::<_, i64>(0) == 0,
        "stale row versions are visible after restore"
    );
    eprintln!(
        "incremental: restored backup {} holds {total} rows with {upd} updated",
        second["backup_id"]
    );
    Ok(())
}
