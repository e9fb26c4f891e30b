//! Repository leases through the real `tidemark-agent expire` binary on a real S3-compatible
//! server (moto): a live backup lease of another host defers pack deletion, a live expire lease
//! refuses a second expire, and the lease a killed expire leaves behind is removed by the next
//! run on the same host at once (its pid is dead). No PostgreSQL is needed: the repository's
//! objects are written with the format encoders, as a backup on another host would have.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use tidemark_e2e::sidecar::Moto;
use tidemark_e2e::{tidemark, Tool};
use tidemark_format::config::{RepoConfig, COMPRESSION_ZSTD};
use tidemark_format::lock::{Lease, LeaseKind};
use tidemark_format::{keys, PackId, SystemId};

const BUCKET: &str = "tidemark-leases";
const PREFIX: &str = "repo";

/// One S3 call (`put`, `delete`, or `list`: the keys below a prefix) with keys relative to
/// [`PREFIX`], through [`Moto::s3`].
async fn s3(moto: &Moto, op: &str, key: &str, body: &[u8]) -> Result<Vec<String>> {
    let out = moto
        .s3(op, BUCKET, &format!("{PREFIX}/{key}"), body)
        .await?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split(' ').next())
        .filter_map(|k| k.strip_prefix(&format!("{PREFIX}/")).map(str::to_string))
        .collect())
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A lease object of a process on another host, valid for an hour.
async fn foreign_lease(moto: &Moto, kind: LeaseKind, tag: &str) -> Result<String> {
    let nonce = PackId::of(format!("{tag} {}", now_us()).as_bytes()).to_string();
    let key = keys::lease(kind, &nonce[..32]).context("lease key")?;
    let lease = Lease {
        kind,
        created_us: now_us(),
        expires_us: now_us() + 3_600_000_000,
        pid: 4242,
        host: "another-host.example".into(),
    };
    s3(moto, "put", &key, &lease.encode()).await?;
    Ok(key)
}

async fn expire(moto: &Moto, extra_env: &[(&str, &str)]) -> Result<tidemark_e2e::Run> {
    let url = format!("s3://{BUCKET}/{PREFIX}");
    let mut env = moto.aws_env();
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    tidemark(
        Tool::Agent,
        &[
            "expire",
            "--repo",
            &url,
            "--retain-last",
            "1",
            "--gc-grace",
            "0s",
            "--json",
        ],
        &pairs,
    )
    .await
}

#[tokio::test]
async fn expire_on_s3_honours_leases() -> Result<()> {
    let moto = Moto::start(BUCKET).await?;
    let config = RepoConfig {
        system_id: SystemId(0x6c65_6173_6533),
        chunk_size: 8192,
        pack_target: 32 << 20,
        compression: COMPRESSION_ZSTD,
        created_us: now_us(),
    };
    s3(&moto, "put", keys::CONFIG, &config.encode()).await?;
    // A pack no manifest names: a free expire with no grace period deletes it.
    let pack = PackId::of(b"unreferenced");
    let pack_key = keys::pack(&pack);
    s3(&moto, "put", &pack_key, b"pack bytes").await?;

    // 1. A live expire lease of another host: a second expire is refused and deletes nothing.
    let other_expire = foreign_lease(&moto, LeaseKind::Expire, "expire").await?;
    let run = expire(&moto, &[]).await?;
    ensure!(
        !run.success(),
        "an expire ran next to a live expire:\n{run}"
    );
    ensure!(
        run.stderr
            .contains("another expire is running in this repository")
            && run.stderr.contains(&other_expire)
            && run.stderr.contains("hint:"),
        "unclear refusal:\n{run}"
    );
    ensure!(s3(&moto, "list", keys::LOCKS, b"").await? == vec![other_expire.clone()]);
    s3(&moto, "delete", &other_expire, b"").await?;

    // 2. A live backup lease of another host: packs and WAL are deferred.
    let backup = foreign_lease(&moto, LeaseKind::Backup, "backup").await?;
    let plan: Value = expire(&moto, &[]).await?.ok()?.json_document()?;
    let deferred = plan["deferred"].as_str().unwrap_or_default();
    ensure!(
        deferred.contains("1 backup(s) running") && deferred.contains(&backup),
        "expire did not defer to the running backup: {plan:#}"
    );
    ensure!(plan["packs"]["delete"] == serde_json::json!([]), "{plan:#}");
    ensure!(
        s3(&moto, "list", keys::PACKS, b"").await? == vec![pack_key.clone()],
        "a deferred expire deleted a pack"
    );
    ensure!(
        s3(&moto, "list", keys::LOCKS, b"").await? == vec![backup.clone()],
        "expire left its own lease behind or removed the backup's"
    );
    s3(&moto, "delete", &backup, b"").await?;

    // 3. An expire killed after taking its lease leaves it; the next run on this host removes
    // it at once (dead pid) and does the work.
    let run = expire(&moto, &[("TIDEMARK_TEST_CRASH_AT", "leased")]).await?;
    ensure!(
        run.code() == Some(99),
        "the crash hook did not fire:\n{run}"
    );
    let left = s3(&moto, "list", keys::LOCKS, b"").await?;
    ensure!(
        left.len() == 1 && left[0].starts_with("locks/expire-"),
        "the killed expire left {left:?}"
    );
    let plan: Value = expire(&moto, &[]).await?.ok()?.json_document()?;
    ensure!(
        plan["stale_leases"] == serde_json::json!([left[0]]),
        "{plan:#}"
    );
    ensure!(plan["deferred"].is_null(), "{plan:#}");
    ensure!(
        plan["packs"]["delete"] == serde_json::json!([pack.to_string()]),
        "{plan:#}"
    );
    ensure!(s3(&moto, "list", keys::PACKS, b"").await?.is_empty());
    ensure!(s3(&moto, "list", keys::LOCKS, b"").await?.is_empty());
    Ok(())
}
