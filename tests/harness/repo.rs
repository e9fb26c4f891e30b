//! A `file://` tidemark repository inside a test's scratch directory, and direct access to its
//! objects (the layout of format-spec's `keys`) for tests that inspect or damage them.

use crate::cluster::start_restored;
use crate::data;
use crate::env::{self, TestDir};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A repository at `<scratch>/<name>`, addressed as `file://<path>`.
#[derive(Clone, Debug)]
pub struct Repo {
    pub path: PathBuf,
    pub url: String,
}

impl Repo {
    /// Creates the (empty) repository directory, owned by the database user.
    pub fn create(dir: &TestDir, name: &str) -> Result<Repo> {
        let path = dir.mkdir(name)?;
        let url = format!("file://{}", path.display());
        Ok(Repo { path, url })
    }

    /// Where an archived WAL file is stored: `wal/<timeline>/<name>`.
    pub fn wal_object(&self, name: &str) -> Result<PathBuf> {
        let tli = name
            .get(..8)
            .with_context(|| format!("{name:?} is not a WAL file name"))?;
        Ok(self.path.join("wal").join(tli).join(name))
    }

    /// Waits until `name` is archived.
    pub async fn wait_for_wal(&self, name: &str, timeout: Duration) -> Result<()> {
        let p = self.wal_object(name)?;
        let started = Instant::now();
        while !p.is_file() {
            if started.elapsed() > timeout {
                bail!(
                    "wal file {name} did not reach the repository ({}) within {timeout:?}",
                    p.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Every pack object, largest first.
    pub fn packs(&self) -> Result<Vec<(PathBuf, u64)>> {
        let mut out = Vec::new();
        let root = self.path.join("packs");
        for sub in read_dir(&root)? {
            for p in read_dir(&sub)? {
                let len = std::fs::metadata(&p)?.len();
                out.push((p, len));
            }
        }
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Every object key in the repository with its bytes, sorted by key.
    pub fn snapshot(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(d) = stack.pop() {
            for p in read_dir(&d)? {
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let key = p.strip_prefix(&self.path)?.to_string_lossy().into_owned();
                    let bytes = std::fs::read(&p)
                        .with_context(|| format!("cannot read {}", p.display()))?;
                    out.push((key, bytes));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// `tidemark-agent info --json`.
    pub async fn info(&self) -> Result<serde_json::Value> {
        let r = env::agent(&["info", "--repo", &self.url, "--json"])
            .await?
            .ok()?;
        let v = r.json_document()?;
        if v["schema_version"] != 1 {
            bail!("info --json printed an unexpected document: {v}");
        }
        Ok(v)
    }

    /// `tidemark-restore restore --pgdata <dir> --repo <url> <target args> --json`, not checked.
    pub async fn restore(&self, pgdata: &Path, target: &[&str]) -> Result<env::Run> {
        let pgdata = pgdata.to_string_lossy().into_owned();
        let mut args = vec!["restore", "--pgdata", &pgdata, "--repo", &self.url];
        args.extend_from_slice(target);
        args.push("--json");
        env::restore(&args).await
    }

    /// Restores into `<scratch>/<name>` with `target` args, starts the result, and returns its
    /// rows per batch ([`data::batch_counts`]); the server and its directory are removed after.
    pub async fn restore_counts(
        &self,
        dir: &TestDir,
        name: &str,
        target: &[&str],
    ) -> Result<BTreeMap<i32, i64>> {
        let pgdata = dir.join(name);
        self.restore(&pgdata, target).await?.ok()?;
        let server = start_restored(dir, &format!("{name}-server"), &pgdata).await?;
        let db = server.client().await?;
        let counts = data::batch_counts(&db).await?;
        drop(db);
        drop(server);
        std::fs::remove_dir_all(&pgdata).ok();
        Ok(counts)
    }

    /// `tidemark-restore verify --repo <url> --target latest --scratch <scratch> <args>` as the
    /// database user (the server binaries found by the backup's major), not checked.
    pub async fn verify_latest(&self, scratch: &Path, args: &[&str]) -> Result<env::Run> {
        let scratch = scratch.to_string_lossy().into_owned();
        let mut a = vec![
            "verify",
            "--repo",
            &self.url,
            "--target",
            "latest",
            "--scratch",
            &scratch,
        ];
        a.extend_from_slice(args);
        env::restore(&a).await
    }

    /// `tidemark-restore wal-fetch <name> <dest> --repo <url>`, not checked.
    pub async fn wal_fetch(&self, name: &str, dest: &Path) -> Result<env::Run> {
        let dest = dest.to_string_lossy().into_owned();
        env::restore(&["wal-fetch", name, &dest, "--repo", &self.url]).await
    }

    /// `tidemark-agent wal-push <path> --repo <url>`, not checked.
    pub async fn wal_push(&self, path: &Path) -> Result<env::Run> {
        let path = path.to_string_lossy().into_owned();
        env::agent(&["wal-push", &path, "--repo", &self.url]).await
    }
}

fn read_dir(d: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).with_context(|| format!("cannot list {}", d.display()))? {
        out.push(e?.path());
    }
    out.sort();
    Ok(out)
}
