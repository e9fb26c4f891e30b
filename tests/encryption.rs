//! Issue 13: an encrypted repository, end to end on a real PostgreSQL 15.
//!
//! A marker (at the start of 256 KiB of random bytes, which zstd stores as they are) is written into a table and,
//! after the backup, into WAL only. The whole encrypted repository is searched for both markers:
//! nothing. The same base backup into a plain repository is searched too, and must contain the
//! first marker, so the search is proven able to find it. Restore with the key is row for row;
//! without a key, with a wrong key, from a swapped or edited object, it fails by name. Rotating
//! the key (add, remove the old one) keeps restores working and locks the old key out. A key
//! given for a plain repository, and no key for an encrypted one, are refused.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use tidemark_e2e::cluster::{shell_word, start_restored};
use tidemark_e2e::data;
use tidemark_e2e::env::{self, Run};
use tidemark_e2e::{PgCluster, Repo, TestDir};

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A key file (random, 44 base64-like characters and a newline) owned by the database user.
fn key_file(dir: &TestDir, name: &str) -> Result<PathBuf> {
    let p = dir.path().join(name);
    std::fs::write(&p, format!("{}\n", hex(&random_bytes(24)?)))?;
    env::give_to_db_user(&p)?;
    Ok(p)
}

fn files_containing(root: &Path, needle: &[u8]) -> Result<Vec<PathBuf>> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let b = std::fs::read(&p)?;
                if b.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p);
                }
            }
        }
    }
    Ok(hits)
}

async fn agent(args: &[&str]) -> Result<Run> {
    env::agent(args).await
}

async fn restore_tool(args: &[&str]) -> Result<Run> {
    env::restore(args).await
}

/// `tidemark-restore restore --target latest` into `pgdata`, with `key` if given; not checked.
async fn restore_latest(pgdata: &str, repo: &Repo, key: Option<&str>) -> Result<Run> {
    let mut a = vec![
        "restore", "--pgdata", pgdata, "--repo", &repo.url, "--target", "latest",
    ];
    if let Some(k) = key {
        a.extend(["--key-file", k]);
    }
    restore_tool(&a).await
}

fn expect_failure(r: &Run, needles: &[&str]) -> Result<()> {
    ensure!(!r.success(), "expected a failure, got success:\n{r}");
    let text = format!("{r}");
    for n in needles {
        ensure!(text.contains(n), "expected {n:?} in the output:\n{r}");
    }
    ensure!(text.contains("hint:"), "the error carries no hint:\n{r}");
    ensure!(!text.contains("panicked"), "a panic:\n{r}");
    Ok(())
}

async fn restore_and_compare(
    dir: &TestDir,
    repo: &Repo,
    key: &Path,
    name: &str,
    want: &std::collections::BTreeMap<i32, i64>,
    markers: &[Vec<u8>],
) -> Result<()> {
    let data = dir.mkdir(name)?.join("data");
    let d = data.to_string_lossy().into_owned();
    let k = key.to_string_lossy().into_owned();
    let r = restore_latest(&d, repo, Some(&k)).await?.ok()?;
    // Logs into a pipe (kubectl logs, a file) carry no colour escapes.
    ensure!(
        r.stderr.contains("restoring backup") && !r.stderr.contains('\x1b'),
        "restore's log is missing or carries ANSI escapes:\n{r}"
    );
    let auto = std::fs::read_to_string(data.join("postgresql.auto.conf"))?;
    ensure!(
        auto.contains("--key-file") && auto.contains(&k),
        "restore_command does not carry the key file:\n{auto}"
    );
    let c = start_restored(dir, &format!("{name}-server"), &data).await?;
    let db = c.client().await?;
    ensure!(
        &data::batch_counts(&db).await? == want,
        "restored rows differ from the source"
    );
    for m in markers {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM secret WHERE position($1::bytea in b) > 0",
                &[m],
            )
            .await?
            .get(0);
        ensure!(n == 1, "marker row not restored");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_repository_end_to_end() -> Result<()> {
    let dir = TestDir::new("encryption")?;
    let repo = Repo::create(&dir, "repo")?;
    let plain = Repo::create(&dir, "plain")?;
    let key1 = key_file(&dir, "key1")?;
    let key2 = key_file(&dir, "key2")?;
    let (k1, k2) = (
        key1.to_string_lossy().into_owned(),
        key2.to_string_lossy().into_owned(),
    );

    // Created ahead of its database; a writer without the key is refused, nothing written.
    let id1 = agent(&[
        "repo",
        "init",
        "--encryption",
        "--repo",
        &repo.url,
        "--key-file",
        &k1,
    ])
    .await?
    .ok()?
    .stdout
    .trim()
    .to_string();
    ensure!(id1.len() == 32, "repo init printed no key id: {id1:?}");

    let mut pg = PgCluster::initdb(&dir, "pg").await?;
    let agent_exe = env::bins()?.agent;
    pg.start_with_archive_command(&format!(
        "{} wal-push --repo {} --key-file {} %p",
        shell_word(&agent_exe.to_string_lossy()),
        shell_word(&repo.url),
        shell_word(&k1)
    ))
    .await?;
    let db = pg.client().await?;
    data::create_table(&db).await?;
    db.batch_execute("CREATE TABLE secret (b bytea)").await?;
    let marker1 = random_bytes(48)?;
    let marker2 = random_bytes(48)?;
    let row = |m: &[u8]| -> Result<Vec<u8>> { Ok([m, &random_bytes(256 << 10)?].concat()) };
    db.execute("INSERT INTO secret VALUES ($1)", &[&row(&marker1)?])
        .await?;
    data::write_batch(&db, 1).await?;

    let seg = db
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await?
        .get::<_, String>(0);
    let pg_wal_file = pg.data.join("pg_wal").join(&seg);
    let refused = agent(&[
        "wal-push",
        &pg_wal_file.to_string_lossy(),
        "--repo",
        &repo.url,
    ])
    .await?;
    expect_failure(&refused, &["initialised for encryption"])?;

    let pgdata = pg.data.to_string_lossy().into_owned();
    let conninfo = pg.conninfo();
    agent(&[
        "backup",
        "--pgdata",
        &pgdata,
        "--repo",
        &repo.url,
        "--key-file",
        &k1,
        "--pg-url",
        &conninfo,
        "--json",
    ])
    .await?
    .ok()?;
    db.execute("INSERT INTO secret VALUES ($1)", &[&row(&marker2)?])
        .await?;
    data::write_batch(&db, 2).await?;
    let seg2 = pg.switch_wal_and_wait(&repo).await?;
    let want = data::batch_counts(&db).await?;

    // The control: the segment holding the second marker, fetched with the key and archived
    // into a plain repository, is found by the same search.
    let fetched = dir.path().join(&seg2);
    let f = fetched.to_string_lossy().into_owned();
    restore_tool(&[
        "wal-fetch",
        &seg2,
        &f,
        "--repo",
        &repo.url,
        "--key-file",
        &k1,
    ])
    .await?
    .ok()?;
    agent(&["wal-push", &f, "--repo", &plain.url]).await?.ok()?;

    // Nothing readable in the bucket; the plain control holds the marker in its packs.
    ensure!(
        !files_containing(&plain.path, &marker2)?.is_empty(),
        "the control failed: a plain repository does not hold the marker, so the search proves nothing"
    );
    for m in [&marker1, &marker2] {
        let hits = files_containing(&repo.path, m)?;
        ensure!(
            hits.is_empty(),
            "a marker is readable in the encrypted repository: {hits:?}"
        );
    }

    // Without a key, with a wrong key: clear refusals.
    let scratch = dir.mkdir("refused")?;
    let d = scratch.join("data").to_string_lossy().into_owned();
    let r = restore_latest(&d, &repo, None).await?;
    expect_failure(&r, &["encrypted", "--key-file"])?;
    let r = restore_latest(&d, &repo, Some(&k2)).await?;
    expect_failure(&r, &["does not open repository"])?;
    // A key for the plain repository is refused as mixing.
    let r = agent(&["info", "--repo", &plain.url, "--key-file", &k1]).await?;
    expect_failure(&r, &["is not encrypted"])?;

    // Row for row with the key.
    restore_and_compare(
        &dir,
        &repo,
        &key1,
        "restored",
        &want,
        &[marker1.clone(), marker2.clone()],
    )
    .await?;

    // A swapped and an edited object are refused by name.
    let mut segs: Vec<PathBuf> = std::fs::read_dir(repo.path.join("wal/00000001"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    segs.retain(|p| p.file_name().is_some_and(|n| n.len() == 24));
    segs.sort();
    ensure!(
        segs.len() >= 2,
        "fewer than two archived segments: {segs:?}"
    );
    let (a, b) = (segs[0].clone(), segs[1].clone());
    let (ba, bb) = (std::fs::read(&a)?, std::fs::read(&b)?);
    std::fs::write(&a, &bb)?;
    std::fs::write(&b, &ba)?;
    let a_name = a
        .file_name()
        .and_then(|n| n.to_str())
        .context("name")?
        .to_string();
    let dest = scratch.join(&a_name).to_string_lossy().into_owned();
    let r = restore_tool(&[
        "wal-fetch",
        &a_name,
        &dest,
        "--repo",
        &repo.url,
        "--key-file",
        &k1,
    ])
    .await?;
    ensure!(
        r.code() == Some(128),
        "a swapped WAL object must abort recovery:\n{r}"
    );
    expect_failure(
        &r,
        &[&format!("wal/00000001/{a_name}"), "fails authentication"],
    )?;
    std::fs::write(&a, &ba)?;
    std::fs::write(&b, &bb)?;
    let (pack, _) = repo.packs()?.into_iter().next().context("no pack")?;
    let original = std::fs::read(&pack)?;
    let mut edited = original.clone();
    let mid = edited.len() / 2;
    edited[mid] ^= 0x40;
    std::fs::write(&pack, &edited)?;
    let pack_name = pack
        .file_name()
        .and_then(|n| n.to_str())
        .context("name")?
        .to_string();
    let d2 = scratch.join("data2").to_string_lossy().into_owned();
    let r = restore_latest(&d2, &repo, Some(&k1)).await?;
    expect_failure(&r, &[&pack_name, "fails authentication"])?;
    std::fs::write(&pack, &original)?;

    // Rotation: add key 2, remove key 1's entry (refused when asked with key 1 itself).
    let id2 = agent(&[
        "key",
        "add",
        "--repo",
        &repo.url,
        "--key-file",
        &k1,
        "--new-key-file",
        &k2,
    ])
    .await?
    .ok()?
    .stdout
    .trim()
    .to_string();
    ensure!(id2.len() == 32 && id2 != id1, "key add printed {id2:?}");
    let listed = agent(&[
        "key",
        "list",
        "--repo",
        &repo.url,
        "--key-file",
        &k2,
        "--json",
    ])
    .await?
    .ok()?
    .json_document()?;
    let opens: Vec<(String, bool)> = listed
        .as_array()
        .context("key list --json is no array")?
        .iter()
        .map(|e| {
            (
                e["key_id"].as_str().unwrap_or_default().to_string(),
                e["opens_with_given_key"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    ensure!(
        opens == vec![(id1.clone(), false), (id2.clone(), true)],
        "key list: {opens:?}"
    );
    let r = agent(&[
        "key",
        "remove",
        &id1,
        "--repo",
        &repo.url,
        "--key-file",
        &k1,
    ])
    .await?;
    expect_failure(&r, &["the one to remove"])?;
    agent(&[
        "key",
        "remove",
        &id1,
        "--repo",
        &repo.url,
        "--key-file",
        &k2,
    ])
    .await?
    .ok()?;
    let r = agent(&["info", "--repo", &repo.url, "--key-file", &k1]).await?;
    expect_failure(&r, &["does not open repository"])?;
    // The primary's archive_command still names key 1: it now fails, loudly, and keeps the WAL.
    restore_and_compare(&dir, &repo, &key2, "rotated", &want, &[marker1, marker2]).await?;
    // The nightly drill: the key reaches the scratch server's restore_command by environment.
    let scratch = dir.mkdir("drill")?.join("scratch");
    let r = repo
        .verify_latest(&scratch, &["--key-file", &k2])
        .await?
        .ok()?;
    let v = r.json()?;
    ensure!(
        v["ok"] == true && v["failure"].is_null(),
        "the drill did not pass: {v}"
    );
    pg.stop().await?;
    Ok(())
}
