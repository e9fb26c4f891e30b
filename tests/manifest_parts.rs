//! Issue 16: manifests in parts (FORMAT.md 8.4.7), exercised on a small cluster by cutting every
//! manifest into 8 KiB parts (`TIDEMARK_MANIFEST_PART_BYTES`). A full backup (data directory)
//! and a nightly over the replication protocol (whose parent is read from parts) are stored in
//! parts; a restore of each brings back every row; a backup killed just before its manifest
//! leaves orphan parts that expire removes; expire with a repack deletes the expired backup's
//! parts, relocates the kept one into new parts and leaves no part unnamed; `check` is clean and
//! a restore after all that is still exact.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeSet;
use tidemark_e2e::env;
use tidemark_e2e::{data, replication, start_restored, Repo, TestDir};

const PART: &str = "8192";

/// The part files of backup `id` in the repository directory.
fn parts_of(repo: &Repo, id: &str) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(repo.path.join("backups"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&format!("{id}.part-")) {
            out.insert(rest.to_string());
        }
    }
    Ok(out)
}

/// Every part file's backup id.
fn part_owners(repo: &Repo) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(repo.path.join("backups"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some((id, _)) = name.split_once(".part-") {
            out.insert(id.to_string());
        }
    }
    Ok(out)
}

fn major_of(repo: &Repo, id: &str) -> Result<u16> {
    let b = std::fs::read(repo.path.join("backups").join(format!("{id}.manifest")))?;
    Ok(u16::from_le_bytes([b[4], b[5]]))
}

async fn restore_exact(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    want: &std::collections::BTreeMap<i32, i64>,
) -> Result<()> {
    let pgdata = dir.join(name);
    repo.restore(&pgdata, &["--target", "latest"])
        .await?
        .ok()
        .with_context(|| format!("restore {name}"))?;
    let server = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    let got = data::batch_counts(&server.client().await?).await?;
    ensure!(&got == want, "{name}: restored rows {got:?}, want {want:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_in_parts_back_up_restore_expire_and_check() -> Result<()> {
    let envs = [("TIDEMARK_MANIFEST_PART_BYTES", PART)];
    let (dir, repo, src, db) = tidemark_e2e::archiving_source("manifest-parts").await?;
    data::write_batch(&db, 1).await?;
    let a = src.backup_run(&repo, &envs).await?.ok()?;
    let a = a.json()?["backup_id"].as_str().context("id")?.to_string();
    ensure!(
        major_of(&repo, &a)? == 4,
        "backup {a} must be stored in parts"
    );
    let a_parts = parts_of(&repo, &a)?;
    ensure!(a_parts.len() > 10, "backup {a}: {} parts", a_parts.len());

    // A nightly over the replication protocol: its parent is read from parts.
    data::write_batch(&db, 2).await?;
    let b = replication::backup(&src, &repo, &envs).await?.ok()?;
    let bj = b.json()?;
    ensure!(bj["parent"] == a.as_str(), "parent of the nightly: {bj}");
    ensure!(
        bj["reused_chunks"].as_u64().unwrap_or(0) > 0,
        "the nightly must reuse the parent's chunks: {bj}"
    );
    let b = bj["backup_id"].as_str().context("id")?.to_string();
    let b_parts = parts_of(&repo, &b)?;
    ensure!(major_of(&repo, &b)? == 4 && !b_parts.is_empty());
    data::write_batch(&db, 3).await?;
    src.switch_wal_and_wait(&repo).await?;
    restore_exact(&dir, &repo, "r1", &data::batch_counts(&db).await?).await?;

    // A backup killed between its parts and its manifest: orphan parts, no backup.
    data::write_batch(&db, 4).await?;
    let before = part_owners(&repo)?;
    let killed = src
        .backup_run(
            &repo,
            &[envs[0], ("TIDEMARK_TEST_CRASH_AT", "manifest-after-parts")],
        )
        .await?;
    ensure!(
        !killed.success(),
        "the crash hook must stop the backup: {killed}"
    );
    let after = part_owners(&repo)?;
    let orphans: Vec<&String> = after.difference(&before).collect();
    ensure!(orphans.len() == 1, "one backup's orphan parts: {after:?}");
    let orphan = orphans[0].clone();
    let listed = env::agent(&["info", "--repo", &repo.url, "--json"])
        .await?
        .ok()?;
    ensure!(
        !listed.stdout.contains(&orphan),
        "a killed backup is never listed:\n{listed}"
    );

    // Expire keeps B only: A's manifest and parts go, B is relocated by the repack (in parts
    // again), the orphan goes, and no part is left that its backup's table does not name.
    let out = env::tidemark(
        env::Tool::Agent,
        &[
            "expire",
            "--repo",
            &repo.url,
            "--retain-last",
            "1",
            "--gc-grace",
            "0s",
            "--repack-min-garbage",
            "1",
            "--json",
        ],
        &envs,
    )
    .await?
    .ok()?;
    let plan = out.json_document()?;
    ensure!(
        plan["repack"]["rewrite_manifests"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == b.as_str())),
        "the repack must relocate B: {plan}"
    );
    ensure!(
        parts_of(&repo, &b)? != b_parts,
        "B's relocated manifest must be new parts"
    );
    ensure!(
        parts_of(&repo, &orphan)?.is_empty(),
        "expire must delete the killed backup's parts:\n{out}"
    );
    ensure!(parts_of(&repo, &a)?.is_empty(), "A's parts must go:\n{out}");
    ensure!(
        part_owners(&repo)? == BTreeSet::from([b.clone()]),
        "only B's parts may remain: {:?}",
        part_owners(&repo)?
    );
    let check = env::restore(&["check", "--repo", &repo.url, "--read-data", "--json"])
        .await?
        .ok()?;
    ensure!(
        check.json_document()?["problems"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{check}"
    );
    // Every part B's table names is read by the restore; a stray part would be an orphan.
    data::write_batch(&db, 5).await?;
    src.switch_wal_and_wait(&repo).await?;
    restore_exact(&dir, &repo, "r2", &data::batch_counts(&db).await?).await?;
    Ok(())
}
