//! One restore drill, phase by phase: choose the backup (the same choice as `restore`) and judge
//! the archive's account of its window; restore it into the scratch directory; start PostgreSQL
//! and wait for promotion; judge how far recovery went; check the result's soundness (amcheck,
//! `--check-sql`); stop the server and verify the data checksums offline.

use super::checks::{count_fetched, reached_target, recovery_cause, tail};
use super::server::{PgTools, Server};
use super::{
    random_u64, time_of, window, BackupUsed, DrillTarget, Replay, VerifyOptions, VerifyResult,
};
use crate::archive::{Archive, Selection};
use crate::repo;
use crate::restore::{self, RestoreOptions};
use crate::store::Store;
use crate::target::{postgres_text, Target};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tidemark_format::manifest::ManifestHeader;
use tidemark_format::wal::WalFileName;
use tidemark_format::Lsn;
use tokio_postgres::Client;

pub(super) async fn run(
    store: &Store,
    opts: &VerifyOptions,
    r: &mut VerifyResult,
    srv: &mut Option<Server>,
    started: Instant,
) -> Result<()> {
    let (target, sel, tools, seg_size) = choose(store, opts, r).await?;
    let pgdata = restore_backup(store, opts, r, &target, &sel.chosen).await?;
    let s = srv.insert(recover(opts, r, &tools, &pgdata, &sel.archive, started).await?);
    let (db, checksums_on) = judge_replay(r, s, &sel, &target, seg_size).await?;
    soundness(opts, r, s, &db, &tools).await?;
    drop(db);
    s.stop()
        .await
        .context("cannot stop the restored server cleanly")?;
    data_checksums(opts, r, &tools, &pgdata, checksums_on).await
}

/// The target, the backup (chosen as restore chooses), this major's tools and the archive's
/// account of the WAL after the backup's start (`wal_continuity`).
async fn choose(
    store: &Store,
    opts: &VerifyOptions,
    r: &mut VerifyResult,
) -> Result<(Target, Selection, PgTools, u64)> {
    repo::require_config(store).await?;
    let backups = repo::list_backups(store).await?;
    let target = match &opts.target {
        DrillTarget::Latest => {
            r.target.kind = "latest".into();
            Target::Latest
        }
        DrillTarget::Time(t) => {
            r.target.kind = "time".into();
            Target::Time(*t)
        }
        DrillTarget::RandomInWindow => {
            let archive = crate::archive::Archive::list(store).await?;
            let (lo, hi) = window(&backups, &archive)?;
            let span = (hi - lo) as u64;
            let at = lo
                + if span == 0 {
                    0
                } else {
                    (random_u64() % (span + 1)) as i64
                };
            r.target.kind = "random-in-window".into();
            r.target.window = Some([repo::fmt_time(lo), repo::fmt_time(hi)]);
            Target::Time(time_of(at)?)
        }
        DrillTarget::Exact(rec) => {
            rec.check()?;
            r.target.kind = match &rec.target {
                Target::Lsn(_) => "lsn",
                Target::Xid(_) => "xid",
                Target::Name(_) => "name",
                Target::Immediate => "immediate",
                Target::Time(_) => "time",
                Target::Latest => "latest",
            }
            .into();
            rec.target.clone()
        }
    };
    if let Target::Time(t) = &target {
        r.target.time = Some(postgres_text(t));
    }
    // The same selection as restore (backups on the followed timeline history only).
    let sel = crate::archive::select_among(
        store,
        backups,
        &crate::archive::Want::target(target.clone()),
    )
    .await?;
    let chosen = &sel.chosen;
    let archive = &sel.archive;
    r.backup = Some(BackupUsed {
        id: chosen.backup_id.clone(),
        timeline: chosen.timeline.0,
        stop_lsn: chosen.stop_lsn.to_string(),
        stop_time: repo::fmt_time(chosen.stop_time_us),
    });
    let major = chosen.pg_version / 10000;
    if !crate::pgversion::is_supported(major) {
        tracing::warn!(
            backup = %chosen.backup_id,
            "backup {} is of PostgreSQL {major}, which this release is not tested with: drilling it anyway with PostgreSQL {major}'s own binaries",
            chosen.backup_id
        );
    }
    let tools = opts
        .tools
        .for_major(major)
        .await
        .with_context(|| format!("backup {} is of PostgreSQL {major}", chosen.backup_id))?;

    // The archive's own account of the window, before spending time on a restore.
    let seg_size = archive
        .seg_size
        .context("the archive holds no wal segment\nhint: is archive_command set to 'tidemark-agent wal-push'?")?;
    let start_seg = WalFileName::segment_of(chosen.timeline, chosen.start_lsn, seg_size)
        .segment_number(seg_size)
        .unwrap_or(0);
    let missing = archive.missing_from(chosen.timeline.0, start_seg, seg_size, 20);
    if missing.is_empty() {
        r.check(
            "wal_continuity",
            true,
            format!(
                "no segment missing on timeline {} from the backup's start",
                chosen.timeline
            ),
        );
    } else {
        r.check(
            "wal_continuity",
            false,
            format!(
                "wal segment {} is missing from the archive (timeline {}, after backup {} started); points in time after it cannot be recovered",
                missing.join(", "),
                chosen.timeline,
                chosen.backup_id
            ),
        );
    }

    Ok((target, sel, tools, seg_size))
}

/// Restores exactly the chosen backup into `<scratch>/pgdata`.
async fn restore_backup(
    store: &Store,
    opts: &VerifyOptions,
    r: &mut VerifyResult,
    target: &Target,
    chosen: &ManifestHeader,
) -> Result<PathBuf> {
    // Restore.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.scratch)
        .with_context(|| format!("cannot create scratch directory {}", opts.scratch.display()))?;
    let pgdata = opts.scratch.join("pgdata");
    let t0 = Instant::now();
    let rep = restore::run_backup(
        store,
        chosen,
        &RestoreOptions {
            pgdata: pgdata.clone(),
            recovery: match &opts.target {
                DrillTarget::Exact(rec) => rec.clone(),
                _ => crate::target::Recovery::to(target.clone()),
            },
            backup: None,
            restore_command: opts.restore_command.clone(),
            // Tablespaces go to their recorded locations, which must be absent or empty there.
            tablespace_map: Vec::new(),
            // A drill never archives (the drill settings say so again).
            archive_mode: restore::ArchiveMode::Off,
            delta: false,
            standby: None,
        },
    )
    .await
    .context("restore failed; the server was not started")?;
    r.restore_files = rep.files;
    r.restore_bytes = rep.bytes;
    r.seconds.restore = Some(t0.elapsed().as_secs_f64());

    Ok(pgdata)
}

/// Starts PostgreSQL on the restored directory and waits until it is promoted.
async fn recover(
    opts: &VerifyOptions,
    r: &mut VerifyResult,
    tools: &PgTools,
    pgdata: &std::path::Path,
    archive: &Archive,
    started: Instant,
) -> Result<Server> {
    // Recover.
    let t1 = Instant::now();
    let mut s = Server::start(
        tools,
        &opts.scratch,
        pgdata,
        opts.port,
        &opts.db_user,
        &opts.settings,
    )
    .await?;
    let mut last_err = String::new();
    loop {
        if let Some(status) = s.exited() {
            count_fetched(r, &s.log_text(), archive);
            bail!(
                "the restored server exited during recovery ({status}): {}",
                recovery_cause(&s.log_text())
            );
        }
        if t1.elapsed() > opts.timeout {
            count_fetched(r, &s.log_text(), archive);
            bail!(
                "the restored server was not promoted within {:?} (last error: {last_err})\nhint: raise --timeout for large restores",
                opts.timeout
            );
        }
        match s.connect("postgres").await {
            Ok(db) => {
                r.seconds
                    .consistent
                    .get_or_insert(t1.elapsed().as_secs_f64());
                match db.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    Ok(row) if !row.get::<_, bool>(0) => break,
                    Ok(_) => {}
                    Err(e) => last_err = e.to_string(),
                }
            }
            Err(e) => last_err = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    r.seconds.promote = Some(t1.elapsed().as_secs_f64());
    r.seconds.rto = Some(started.elapsed().as_secs_f64());
    count_fetched(r, &s.log_text(), archive);
    r.check(
        "accepts_connections",
        true,
        format!("promoted after {:.1}s", t1.elapsed().as_secs_f64()),
    );

    Ok(s)
}

/// Reads how far recovery went and judges it against the repository (`reached_target`);
/// returns a connection and whether data checksums are on.
async fn judge_replay(
    r: &mut VerifyResult,
    s: &Server,
    sel: &Selection,
    target: &Target,
    seg_size: u64,
) -> Result<(Client, bool)> {
    let log = s.log_text();
    let db = s.connect("postgres").await?;
    let row = db
        .query_one(
            "SELECT pg_last_wal_replay_lsn()::text, \
             to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
             current_setting('data_checksums')",
            &[],
        )
        .await
        .context("cannot read the replay position of the restored server")?;
    let lsn_text: Option<String> = row.get(0);
    let commit: Option<String> = row.get(1);
    let checksums_on = row.get::<_, String>(2) == "on";
    let replayed: Lsn = lsn_text
        .as_deref()
        .unwrap_or("0/0")
        .parse()
        .context("the server reported an unreadable replay lsn")?;
    r.replay = Some(Replay {
        last_replayed_lsn: replayed.to_string(),
        last_commit_time: commit.clone(),
    });
    reached_target(
        r,
        &sel.chosen,
        target,
        &sel.archive,
        seg_size,
        replayed,
        commit.as_deref(),
        &log,
    );

    Ok((db, checksums_on))
}

/// pg_amcheck (when installed) and each `--check-sql` statement.
async fn soundness(
    opts: &VerifyOptions,
    r: &mut VerifyResult,
    s: &Server,
    db: &Client,
    tools: &PgTools,
) -> Result<()> {
    // Soundness.
    if !opts.amcheck {
        r.skip("amcheck", "disabled with --no-amcheck");
    } else if tools.client("pg_amcheck").is_none() {
        r.skip(
            "amcheck",
            format!(
                "pg_amcheck not found in {} nor in another PostgreSQL 14+ bin directory or PATH",
                tools.bin.display()
            ),
        );
    } else {
        let avail = db
            .query_opt(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'",
                &[],
            )
            .await?;
        if avail.is_none() {
            r.skip(
                "amcheck",
                "the amcheck extension is not installed with this PostgreSQL (contrib)",
            );
        } else {
            let sock = s.sock.to_string_lossy().into_owned();
            let port = s.port.to_string();
            let mut args = vec![
                "--all",
                "--install-missing",
                "--no-password",
                "-h",
                &sock,
                "-p",
                &port,
                "-U",
                &opts.db_user,
            ];
            if opts.heapallindexed {
                args.push("--heapallindexed");
            }
            let amcheck = tools.client("pg_amcheck").context("pg_amcheck vanished")?;
            let (ok, out) = amcheck.run("pg_amcheck", &args, opts.timeout).await?;
            let detail = if ok {
                format!(
                    "pg_amcheck --all{} found no corruption",
                    if opts.heapallindexed {
                        " --heapallindexed"
                    } else {
                        ""
                    }
                )
            } else {
                format!(
                    "pg_amcheck reported corruption or failed: {}",
                    tail(&out, 20)
                )
            };
            r.check("amcheck", ok, detail);
        }
    }
    for (label, sql) in &opts.check_sql {
        let name = format!("sql:{label}");
        let res = match s.connect(&opts.check_db).await {
            Ok(c) => c.simple_query(sql).await.map_err(|e| format!("{e}")),
            Err(e) => Err(format!("{e:#}")),
        };
        match res {
            Err(e) => r.check(&name, false, format!("query failed: {e}")),
            Ok(msgs) => {
                let first = msgs.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some(row.get(0).map(str::to_string))
                    }
                    _ => None,
                });
                match first {
                    None => r.check(&name, false, "returned no rows"),
                    Some(Some(v)) if v == "f" || v == "false" => {
                        r.check(&name, false, "returned false")
                    }
                    Some(v) => r.check(
                        &name,
                        true,
                        format!("returned {}", v.as_deref().unwrap_or("NULL")),
                    ),
                }
            }
        }
    }
    Ok(())
}

/// `pg_checksums --check` on the stopped cluster, when checksums are on and the tool exists.
async fn data_checksums(
    opts: &VerifyOptions,
    r: &mut VerifyResult,
    tools: &PgTools,
    pgdata: &std::path::Path,
    checksums_on: bool,
) -> Result<()> {
    if !checksums_on {
        r.skip("data_checksums", "data checksums are off in this cluster");
    } else if !tools.has("pg_checksums") {
        r.skip(
            "data_checksums",
            format!("pg_checksums not found in {}", tools.bin.display()),
        );
    } else {
        let data = pgdata.to_string_lossy().into_owned();
        let (ok, out) = tools
            .run("pg_checksums", &["--check", "-D", &data], opts.timeout)
            .await?;
        r.check(
            "data_checksums",
            ok,
            if ok {
                format!(
                    "every block read and verified: {}",
                    tail(&out, 6).replace('\n', "; ")
                )
            } else {
                format!("pg_checksums found bad blocks: {}", tail(&out, 20))
            },
        );
    }
    Ok(())
}
