//! Base backups over the replication protocol (`backup --source replication`), as the nightly
//! CronJob takes them: from a primary and from a streaming standby, with password (SCRAM) and
//! TLS connections, a connection dropped mid-backup, a table dropped while the backup runs, and
//! tablespaces restored with and without remapping. Each restore is checked row for row.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;
use tidemark_e2e::data::{self, BATCH_ROWS};
use tidemark_e2e::replication as rep;
use tidemark_e2e::{start_restored, PgCluster, Repo, TestDir};

const GAP: Duration = Duration::from_millis(150);

fn expected(batches: std::ops::RangeInclusive<i32>) -> BTreeMap<i32, i64> {
    batches.map(|b| (b, BATCH_ROWS)).collect()
}

/// Writes batches `from..=to`, returning a server clock reading taken after each.
async fn write_batches(
    db: &tokio_postgres::Client,
    from: i32,
    to: i32,
) -> Result<BTreeMap<i32, String>> {
    let mut after = BTreeMap::new();
    for b in from..=to {
        data::write_batch(db, b).await?;
        tokio::time::sleep(GAP).await;
        after.insert(b, data::server_time_text(db).await?);
        tokio::time::sleep(GAP).await;
    }
    Ok(after)
}

/// Restores `repo` to `target` into `<dir>/<name>`, starts it and checks the batches.
async fn restore_and_check(
    dir: &TestDir,
    repo: &Repo,
    name: &str,
    target: &str,
    want_backup: &str,
    want: BTreeMap<i32, i64>,
    extra: &[&str],
) -> Result<PgCluster> {
    let pgdata = dir.join(name);
    let mut args = vec!["--target-time", target];
    args.extend_from_slice(extra);
    let r = repo.restore(&pgdata, &args).await?.ok()?;
    let report = r.json()?;
    ensure!(
        report["backup_id"] == want_backup,
        "restore chose {} instead of backup {want_backup}",
        report["backup_id"]
    );
    let restored = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
    let rdb = restored.client().await?;
    let counts = data::batch_counts(&rdb).await?;
    ensure!(
        counts == want,
        "restored to {target}: rows per batch {counts:?}, want {want:?}\n{}",
        restored.log_tail()
    );
    Ok(restored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_backup_restores_to_a_time_row_for_row() -> Result<()> {
    let dir = TestDir::new("rep-primary")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    write_batches(&db, 1, 2).await?;
    let first = rep::backup_ok(&src, &repo, &[]).await?;
    ensure!(
        first["from_standby"] == false,
        "primary backup marked as standby: {first}"
    );
    let after = write_batches(&db, 3, 5).await?;
    // The second backup after a small change stores only what changed.
    let second = rep::backup_ok(&src, &repo, &[]).await?;
    let id = second["backup_id"]
        .as_str()
        .context("backup_id")?
        .to_string();
    let (l1, s1, s2) = (
        first["logical_bytes"].as_u64().context("logical")?,
        first["new_chunk_bytes"].as_u64().context("new")?,
        second["new_chunk_bytes"].as_u64().context("new")?,
    );
    eprintln!("rep-primary: first backup {l1} logical bytes, {s1} new; second {s2} new");
    ensure!(
        s2 * 4 < s1,
        "the second backup stored {s2} new bytes, the first {s1}: dedup against the parent failed"
    );
    let after2 = write_batches(&db, 6, 8).await?;
    src.switch_wal_and_wait(&repo).await?;
    // Restored files match the server's own backup manifest byte for byte (pg_verifybackup,
    // before recovery changes anything; the recovery settings tidemark adds are ignored).
    let verify_dir = dir.join("verify");
    repo.restore(&verify_dir, &["--target-time", &after2[&7]])
        .await?
        .ok()?;
    let r = rep::pg_verifybackup(&verify_dir).await?;
    ensure!(
        r.success() && r.stdout.contains("successfully verified"),
        "pg_verifybackup refused the restored directory:\n{r}"
    );
    std::fs::remove_dir_all(&verify_dir)?;
    restore_and_check(
        &dir,
        &repo,
        "restored",
        &after2[&7],
        &id,
        expected(1..=7),
        &[],
    )
    .await?;
    let _ = after;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_backup_restores_to_a_time_row_for_row() -> Result<()> {
    let dir = TestDir::new("rep-standby")?;
    let repo = Repo::create(&dir, "repo")?;
    let primary = PgCluster::start_archiving(&dir, "primary", &repo).await?;
    let db = primary.client().await?;
    data::create_table(&db).await?;
    write_batches(&db, 1, 2).await?;
    let standby = rep::start_standby(&dir, "standby", &primary).await?;
    rep::wait_caught_up(&primary, &standby).await?;
    // The standby cannot switch WAL segments; the primary archives the backup's last one.
    let switching = rep::keep_switching_wal(&primary);
    let b = rep::backup_ok(&standby, &repo, &[]).await;
    switching.abort();
    let b = b?;
    ensure!(
        b["from_standby"] == true,
        "standby backup not marked as such: {b}"
    );
    let id = b["backup_id"].as_str().context("backup_id")?.to_string();
    let info = repo.info().await?;
    let listed = &info["backups"][0];
    ensure!(
        listed["source"] == "replication" && listed["from_standby"] == true,
        "info does not show a replication backup from a standby: {info}"
    );
    let after = write_batches(&db, 3, 5).await?;
    primary.switch_wal_and_wait(&repo).await?;
    let restored = restore_and_check(
        &dir,
        &repo,
        "restored",
        &after[&4],
        &id,
        expected(1..=4),
        &[],
    )
    .await?;
    let rdb = restored.client().await?;
    let standby_signal = restored.data.join("standby.signal").exists();
    ensure!(
        !standby_signal,
        "the restore kept the standby's standby.signal"
    );
    let _ = rdb;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_and_tls() -> Result<()> {
    let dir = TestDir::new("rep-auth")?;
    let repo = Repo::create(&dir, "repo")?;
    let mut src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let (ca, cert, key) = rep::test_certs(&dir, "server").await?;
    let (other_ca, _, _) = rep::test_certs(&dir, "other").await?;
    src.append_conf(
        "postgresql.conf",
        &format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ),
    )?;
    src.stop().await?;
    src.start().await?;
    rep::exec(
        &src,
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE scram LOGIN REPLICATION PASSWORD 'sekret-s'; \
         SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'sekret-m'; \
         SET password_encryption = 'scram-sha-256'; CREATE ROLE tlsuser LOGIN REPLICATION PASSWORD 'sekret-t';",
    )
    .await?;
    rep::hba_first(
        &src,
        "host all scram 127.0.0.1/32 scram-sha-256\nhost all md5user 127.0.0.1/32 md5\n\
         hostssl all tlsuser 127.0.0.1/32 scram-sha-256\nhostnossl all tlsuser 127.0.0.1/32 reject",
    )
    .await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;

    let scram = [("PGUSER", "scram"), ("PGSSLMODE", "disable")];
    let r = rep::backup(&src, &repo, &scram).await?;
    ensure!(
        !r.success() && r.stderr.contains("password") && r.stderr.contains("hint:"),
        "a backup without a password must fail and say so:\n{r}"
    );
    let r = rep::backup(&src, &repo, &[("PGUSER", "scram"), ("PGPASSWORD", "wrong")]).await?;
    ensure!(
        !r.success() && r.stderr.contains("28P01") && !r.stderr.contains("wrong"),
        "a wrong password must fail with 28P01 and never be printed:\n{r}"
    );
    ensure!(
        rep::manifests(&repo)?.is_empty(),
        "a failed backup left a manifest"
    );
    rep::backup_ok(
        &src,
        &repo,
        &[("PGUSER", "scram"), ("PGPASSWORD", "sekret-s")],
    )
    .await?;
    rep::backup_ok(
        &src,
        &repo,
        &[("PGUSER", "md5user"), ("PGPASSWORD", "sekret-m")],
    )
    .await?;

    let tls = [("PGUSER", "tlsuser"), ("PGPASSWORD", "sekret-t")];
    let r = rep::backup(&src, &repo, &[tls[0], tls[1], ("PGSSLMODE", "disable")]).await?;
    ensure!(
        !r.success(),
        "hostnossl reject must refuse a plain connection:\n{r}"
    );
    let root = ca.to_string_lossy().into_owned();
    let wrong_root = other_ca.to_string_lossy().into_owned();
    let r = rep::backup(
        &src,
        &repo,
        &[
            tls[0],
            tls[1],
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", &wrong_root),
        ],
    )
    .await?;
    ensure!(
        !r.success() && r.stderr.contains("TLS"),
        "verify-full with the wrong root certificate must fail:\n{r}"
    );
    rep::backup_ok(&src, &repo, &[tls[0], tls[1], ("PGSSLMODE", "require")]).await?;
    let last = rep::backup_ok(
        &src,
        &repo,
        &[
            tls[0],
            tls[1],
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", &root),
        ],
    )
    .await?;
    ensure!(
        rep::manifests(&repo)?.len() == 4,
        "want 4 backups: {:?}",
        rep::manifests(&repo)?
    );
    let id = last["backup_id"].as_str().context("backup_id")?.to_string();
    tokio::time::sleep(GAP).await;
    data::write_batch(&db, 2).await?;
    tokio::time::sleep(GAP).await;
    let t = data::server_time_text(&db).await?;
    tokio::time::sleep(GAP).await;
    // Recovery must see a commit after the target to stop there.
    data::write_batch(&db, 3).await?;
    src.switch_wal_and_wait(&repo).await?;
    restore_and_check(&dir, &repo, "restored", &t, &id, expected(1..=2), &[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_leaves_no_backup_and_a_table_dropped_during_a_backup_is_gone(
) -> Result<()> {
    let dir = TestDir::new("rep-interrupt")?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    db.batch_execute(
        "CREATE TABLE doomed AS SELECT g, md5(g::text) AS h FROM generate_series(1, 200000) g; \
         CREATE TABLE filler AS SELECT g, repeat(md5(g::text), 4) AS h FROM generate_series(1, 150000) g;",
    )
    .await?;

    // 1. The walsender is terminated mid-stream: the backup fails and leaves no manifest.
    let bg = rep::backup_in_background(&src, &repo, 4096);
    let pid = rep::wait_streaming(&src).await?;
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await?;
    let r = bg.await??;
    ensure!(
        !r.success(),
        "a backup whose connection was terminated succeeded:\n{r}"
    );
    ensure!(
        r.stderr.contains("closed the connection") || r.stderr.contains("terminat"),
        "the failure does not say the connection ended:\n{r}"
    );
    ensure!(
        rep::manifests(&repo)?.is_empty(),
        "the interrupted backup left manifests {:?}",
        rep::manifests(&repo)?
    );

    // 2. A rerun succeeds while a table is dropped and rows are written during the stream.
    let bg = rep::backup_in_background(&src, &repo, 4096);
    rep::wait_streaming(&src).await?;
    db.batch_execute("DROP TABLE doomed").await?;
    data::write_batch(&db, 2).await?;
    let r = bg.await??;
    ensure!(r.success(), "the rerun failed:\n{r}\n{}", src.log_tail());
    ensure!(
        r.stderr.contains("backup progress") && r.stderr.contains("bytes_total"),
        "a backup of more than 10 s without a terminal logs no progress line:\n{r}"
    );
    let id = r.json()?["backup_id"]
        .as_str()
        .context("backup_id")?
        .to_string();
    ensure!(
        rep::manifests(&repo)? == [format!("{id}.manifest")],
        "want exactly backup {id}"
    );
    tokio::time::sleep(GAP).await;
    data::write_batch(&db, 3).await?;
    tokio::time::sleep(GAP).await;
    let t = data::server_time_text(&db).await?;
    tokio::time::sleep(GAP).await;
    data::write_batch(&db, 4).await?;
    src.switch_wal_and_wait(&repo).await?;
    let restored =
        restore_and_check(&dir, &repo, "restored", &t, &id, expected(1..=3), &[]).await?;
    let rdb = restored.client().await?;
    let doomed: i64 = rdb
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'doomed'",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        doomed == 0,
        "the table dropped during the backup is back after restore"
    );
    let filler: i64 = rdb
        .query_one("SELECT count(*) FROM filler", &[])
        .await?
        .get(0);
    ensure!(
        filler == 150000,
        "filler has {filler} rows after restore, want 150000"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tablespace_restored_with_and_without_remap() -> Result<()> {
    let dir = TestDir::new("rep-tblspc")?;
    let repo = Repo::create(&dir, "repo")?;
    let mut src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let ts = rep::tablespace_dir(&dir, "ts-original")?;
    let db = src.client().await?;
    db.batch_execute(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts.display()
    ))
    .await?;
    data::create_table(&db).await?;
    db.batch_execute("ALTER TABLE batches SET TABLESPACE ts1")
        .await?;
    let oid: String = db
        .query_one(
            "SELECT oid::text FROM pg_tablespace WHERE spcname = 'ts1'",
            &[],
        )
        .await?
        .get(0);
    write_batches(&db, 1, 2).await?;
    let b = rep::backup_ok(&src, &repo, &[]).await?;
    let id = b["backup_id"].as_str().context("backup_id")?.to_string();
    let after = write_batches(&db, 3, 4).await?;
    src.switch_wal_and_wait(&repo).await?;
    let info = repo.info().await?;
    let t = &info["backups"][0]["tablespaces"][0];
    ensure!(
        t["oid"] == oid.as_str() && t["location"] == ts.to_string_lossy().as_ref(),
        "info does not list tablespace {oid} at {}: {info}",
        ts.display()
    );

    // Without a remap, the original location is in use: the restore refuses to mix into it.
    let r = repo
        .restore(&dir.join("refused"), &["--target-time", &after[&3]])
        .await?;
    ensure!(
        !r.success() && r.stderr.contains("not empty") && r.stderr.contains("--tablespace-map"),
        "restoring into a tablespace directory in use must fail with a hint:\n{r}"
    );
    let r = repo
        .restore(
            &dir.join("typo"),
            &[
                "--target-time",
                &after[&3],
                "--tablespace-map",
                "99999=/tmp/x",
            ],
        )
        .await?;
    ensure!(
        !r.success() && r.stderr.contains("99999"),
        "a remap of an unknown oid must fail:\n{r}"
    );

    // With a remap, the tablespace lands in the new directory.
    let moved = dir.join("ts-moved");
    let remap = format!("{oid}={}", moved.display());
    let r1 = restore_and_check(
        &dir,
        &repo,
        "restored-remap",
        &after[&3],
        &id,
        expected(1..=3),
        &["--tablespace-map", &remap],
    )
    .await?;
    let loc: String = r1
        .client()
        .await?
        .query_one(
            "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        loc == moved.to_string_lossy(),
        "remapped tablespace is at {loc}, want {}",
        moved.display()
    );
    drop(r1);

    // Without a remap, once the original location is free, it is restored there.
    src.stop().await?;
    std::fs::remove_dir_all(&ts)?;
    let r2 = restore_and_check(
        &dir,
        &repo,
        "restored-orig",
        &after[&3],
        &id,
        expected(1..=3),
        &[],
    )
    .await?;
    let loc: String = r2
        .client()
        .await?
        .query_one(
            "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        loc == ts.to_string_lossy(),
        "tablespace is at {loc}, want {}",
        ts.display()
    );
    let link = std::fs::read_link(r2.data.join("pg_tblspc").join(&oid))?;
    ensure!(link == ts, "pg_tblspc/{oid} points to {}", link.display());
    Ok(())
}
