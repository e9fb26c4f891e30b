//! Over 500 lines because each of the hostile repositories is built by hand next to the refusal it
//! must cause.
//!
//! Issue 13: `restore` and `verify` against a hostile or corrupted repository, and
//! `restore --archive-mode`.
//!
//! A real PostgreSQL 15 cluster is backed up into a `file://` repository. Each hostile case is a
//! copy of that repository whose manifest is decoded, given crafted entries or a crafted
//! tablespace map (reusing the backup's own, valid, chunk references), and encoded again with the
//! format crate (a valid checksum: only the content is hostile). Every case must be refused with
//! an error naming the path or location and a hint, exit 1 (never a panic), before anything is
//! restored; a sentinel directory next to the target, writable by the restoring user, must be
//! byte for byte unchanged afterwards. `verify` must refuse the same way and never start a server.
//! `--archive-mode off` (the default) must keep a restored, promoted copy from archiving into the
//! repository it came from; `preserve` must keep the backup's archive settings.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark_e2e::cluster::conf_quote;
use tidemark_e2e::env::{self, Run, Tool};
use tidemark_e2e::{data, PgCluster, Repo, TestDir};
use tidemark_format::manifest::{Entry, EntryKind, Manifest};

/// A source cluster archiving into `repo`, one batch written, one backup taken, its WAL archived.
struct Fixture {
    dir: TestDir,
    repo: Repo,
    src: PgCluster,
    backup_id: String,
}

async fn fixture(name: &str) -> Result<Fixture> {
    let dir = TestDir::new(name)?;
    let repo = Repo::create(&dir, "repo")?;
    let src = PgCluster::start_archiving(&dir, "src", &repo).await?;
    let db = src.client().await?;
    data::create_table(&db).await?;
    data::write_batch(&db, 1).await?;
    let b = src.backup(&repo).await?;
    let backup_id = b["backup_id"].as_str().context("backup_id")?.to_string();
    data::write_batch(&db, 2).await?;
    src.switch_wal_and_wait(&repo).await?;
    Ok(Fixture {
        dir,
        repo,
        src,
        backup_id,
    })
}

impl Fixture {
    fn manifest_path(&self, repo: &Repo) -> PathBuf {
        repo.path
            .join("backups")
            .join(format!("{}.manifest", self.backup_id))
    }

    fn manifest(&self) -> Result<Manifest> {
        let p = self.manifest_path(&self.repo);
        let b = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Manifest::decode(&b).context("the real backup's manifest does not decode")
    }

    /// A copy of the repository whose manifest is `m` (encoded with a valid checksum).
    fn hostile_copy(&self, name: &str, m: &Manifest) -> Result<Repo> {
        let path = self.dir.join(&format!("repo-{name}"));
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(&self.repo.path)
            .arg(&path)
            .status()?;
        ensure!(st.success(), "cp -a of the repository failed");
        let repo = Repo {
            url: format!("file://{}", path.display()),
            path,
        };
        let mp = self.manifest_path(&repo);
        std::fs::write(&mp, m.encode())
            .with_context(|| format!("cannot write {}", mp.display()))?;
        Ok(repo)
    }
}

/// Adds `e` to `m`, keeping the entries sorted by path.
fn add(m: &mut Manifest, e: Entry) {
    m.entries.push(e);
    m.entries
        .sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
}

/// A file entry at `path` with the backup's own PG_VERSION contents (valid chunk references).
fn file_like_pg_version(m: &Manifest, path: &str) -> Result<Entry> {
    let src = m
        .entries
        .iter()
        .find(|e| e.path == "PG_VERSION")
        .context("the backup has no PG_VERSION")?;
    Ok(Entry {
        path: path.to_string(),
        mode: 0o600,
        kind: src.kind.clone(),
    })
}

fn dir_entry(path: &str) -> Entry {
    Entry {
        path: path.to_string(),
        mode: 0o700,
        kind: EntryKind::Dir,
    }
}

fn symlink_entry(path: &str, target: &Path) -> Entry {
    Entry {
        path: path.to_string(),
        mode: 0o777,
        kind: EntryKind::Symlink(target.as_os_str().as_encoded_bytes().to_vec()),
    }
}

/// A tablespace 16384 with one file, whose map names `location`.
fn with_tablespace(m: &mut Manifest, location: &str) -> Result<()> {
    add(m, dir_entry("pg_tblspc/16384"));
    add(m, dir_entry("pg_tblspc/16384/PG_15_202209061"));
    let f = file_like_pg_version(m, "pg_tblspc/16384/PG_15_202209061/1")?;
    add(m, f);
    m.header.tablespace_map = Some(format!("16384 {location}\n").into_bytes());
    Ok(())
}

/// Every entry below `root` (not following symlinks): kind, mode, owner, and contents or link
/// target.
fn snapshot(root: &Path) -> Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        let what = if md.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(&p)?.display())
        } else if md.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
            "dir".to_string()
        } else {
            format!("file {:?}", std::fs::read(&p)?)
        };
        out.insert(
            p.strip_prefix(root)?.to_path_buf(),
            format!("{what} mode {:o} uid {}", md.mode(), md.uid()),
        );
    }
    Ok(out)
}

/// The sentinel: a directory the restoring user could write to, next to every target.
fn sentinel(dir: &TestDir) -> Result<PathBuf> {
    let s = dir.mkdir("sentinel")?;
    dir.write("sentinel/keep.txt", b"production data\n")?;
    dir.write("sentinel/outside.conf", b"work_mem = '1MB'\n")?;
    dir.mkdir("sentinel/sub")?;
    dir.write("sentinel/sub/file", b"more\n")?;
    Ok(s)
}

/// One hostile case: a name, the manifest, and what the refusal must mention.
struct Case {
    name: &'static str,
    manifest: Manifest,
    needle: String,
}

fn cases(f: &Fixture, sentinel: &Path) -> Result<Vec<Case>> {
    let base = f.manifest()?;
    let s = sentinel.display().to_string();
    let mut out = Vec::new();
    let mut case = |name: &'static str, edit: &dyn Fn(&mut Manifest) -> Result<String>| {
        let mut m = base.clone();
        let needle = edit(&mut m)?;
        out.push(Case {
            name,
            manifest: m,
            needle,
        });
        Ok::<(), anyhow::Error>(())
    };
    case("dotdot", &|m| {
        let e = file_like_pg_version(m, "../sentinel/evil")?;
        add(m, e);
        Ok("\"../sentinel/evil\"".into())
    })?;
    case("dotdot-deep", &|m| {
        let e = file_like_pg_version(m, "base/../../sentinel/evil")?;
        add(m, e);
        Ok("\"base/../../sentinel/evil\"".into())
    })?;
    case("absolute", &|m| {
        let p = format!("{s}/evil");
        let e = file_like_pg_version(m, &p)?;
        add(m, e);
        Ok(format!("{p:?}"))
    })?;
    case("symlink-then-file", &|m| {
        add(m, symlink_entry("evil", sentinel));
        let e = file_like_pg_version(m, "evil/pwned")?;
        add(m, e);
        Ok("\"evil/pwned\" lies below \"evil\"".into())
    })?;
    case("symlink-then-dir", &|m| {
        add(m, symlink_entry("base2", sentinel));
        add(m, dir_entry("base2/sub2"));
        Ok("\"base2/sub2\"".into())
    })?;
    case("tablespace-inside-target", &|m| {
        // The target is <scratch>/restore-<case>; the map puts the tablespace inside it.
        let loc = f.dir.join("restore-tablespace-inside-target/ts");
        with_tablespace(m, &loc.display().to_string())?;
        Ok("inside the target data directory".into())
    })?;
    case("tablespace-relative", &|m| {
        with_tablespace(m, "relative/ts")?;
        Ok("relative location".into())
    })?;
    case("tablespace-dotdot", &|m| {
        with_tablespace(m, &format!("{s}/../sentinel/sub"))?;
        Ok("not a normalised absolute path".into())
    })?;
    case("tablespace-non-empty", &|m| {
        with_tablespace(m, &s)?;
        Ok(format!("{s}, which is not empty"))
    })?;
    case("tablespace-map-without-files", &|m| {
        // PostgreSQL would create pg_tblspc/16385 -> <sentinel>/ts from the map at startup.
        m.header.tablespace_map = Some(format!("16385 {s}/ts\n").into_bytes());
        Ok("holds no files of it".into())
    })?;
    case("tablespace-symlink", &|m| {
        add(m, symlink_entry("pg_tblspc/16384", sentinel));
        m.header.tablespace_map = Some(format!("16384 {s}\n").into_bytes());
        Ok("pg_tblspc/16384 as a symlink".into())
    })?;
    case("auto-conf-symlink", &|m| {
        let outside = sentinel.join("outside.conf");
        let e = m
            .entries
            .iter_mut()
            .find(|e| e.path == "postgresql.auto.conf")
            .context("the backup has no postgresql.auto.conf")?;
        e.kind = EntryKind::Symlink(outside.as_os_str().as_encoded_bytes().to_vec());
        Ok("postgresql.auto.conf as a symlink".into())
    })?;
    case("backup-label-entry", &|m| {
        let e = file_like_pg_version(m, "backup_label")?;
        add(m, e);
        Ok("backup_label, which a restore writes itself".into())
    })?;
    Ok(out)
}

fn ensure_refused(r: &Run, needle: &str, what: &str) -> Result<()> {
    ensure!(
        r.code() == Some(1),
        "{what}: want exit 1 (a refusal, not a panic or success):\n{r}"
    );
    ensure!(
        !r.stderr.contains("panicked"),
        "{what}: the refusal is a panic:\n{r}"
    );
    ensure!(
        r.stderr.contains(needle),
        "{what}: the refusal does not name {needle:?}:\n{r}"
    );
    ensure!(
        r.stderr.contains("hint:"),
        "{what}: the refusal gives no hint:\n{r}"
    );
    Ok(())
}

/// Whether `dir` is absent or empty.
fn empty_or_absent(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_hostile_manifests_and_writes_nothing_outside_the_target() -> Result<()> {
    let f = fixture("hostile-restore").await?;
    let sentinel = sentinel(&f.dir)?;
    let before = snapshot(&sentinel)?;
    let all = cases(&f, &sentinel)?;
    for c in &all {
        let repo = f.hostile_copy(c.name, &c.manifest)?;
        let target = f.dir.join(&format!("restore-{}", c.name));
        let r = repo.restore(&target, &["--target", "latest"]).await?;
        ensure_refused(&r, &c.needle, c.name)?;
        ensure!(
            empty_or_absent(&target)?,
            "{}: the refused restore wrote into {}",
            c.name,
            target.display()
        );
        let after = snapshot(&sentinel)?;
        ensure!(
            after == before,
            "{}: the sentinel directory changed:\nbefore {before:#?}\nafter {after:#?}",
            c.name
        );
        for stray in ["evil", "ts", "sub2"] {
            ensure!(
                !f.dir.path().join(stray).exists(),
                "{}: {stray} appeared next to the target",
                c.name
            );
        }
        eprintln!(
            "hostile-restore: {}: refused: {}",
            c.name,
            r.stderr
                .lines()
                .find(|l| l.contains("error") || l.contains(c.needle.as_str()))
                .unwrap_or("")
        );
    }
    // The untouched repository still restores (the cases did not pass by breaking the fixture).
    let good = f.dir.join("restore-good");
    f.repo.restore(&good, &["--target", "latest"]).await?.ok()?;
    ensure!(good.join("global/pg_control").is_file());
    ensure!(snapshot(&sentinel)? == before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_a_backup_names_is_left_out_with_a_warning() -> Result<()> {
    let f = fixture("hostile-symlink").await?;
    let sentinel = sentinel(&f.dir)?;
    let before = snapshot(&sentinel)?;
    let mut m = f.manifest()?;
    add(&mut m, symlink_entry("pg_log", &sentinel));
    let repo = f.hostile_copy("symlink", &m)?;
    let target = f.dir.join("restored");
    let r = repo.restore(&target, &["--target", "latest"]).await?.ok()?;
    let v = r.json()?;
    ensure!(
        v["skipped_symlinks"][0]["path"] == "pg_log"
            && v["skipped_symlinks"][0]["target"] == sentinel.to_string_lossy().as_ref(),
        "restore --json does not list the left-out symlink:\n{r}"
    );
    ensure!(
        r.stderr.contains("pg_log") && r.stderr.contains("left out"),
        "no warning names the left-out symlink:\n{r}"
    );
    ensure!(
        std::fs::symlink_metadata(target.join("pg_log")).is_err(),
        "the restore created the symlink pg_log"
    );
    ensure!(snapshot(&sentinel)? == before, "the sentinel changed");
    // Nothing in the restored directory is a symlink.
    let mut stack = vec![target.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let md = std::fs::symlink_metadata(&p)?;
            ensure!(!md.file_type().is_symlink(), "{} is a symlink", p.display());
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    eprintln!(
        "hostile-symlink: pg_log -> {} left out, restore otherwise complete",
        sentinel.display()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_hostile_manifests_and_never_starts_a_server() -> Result<()> {
    let f = fixture("hostile-verify").await?;
    let sentinel = sentinel(&f.dir)?;
    let before = snapshot(&sentinel)?;
    let all = cases(&f, &sentinel)?;
    for name in [
        "dotdot",
        "symlink-then-file",
        "auto-conf-symlink",
        "tablespace-dotdot",
    ] {
        let c = all
            .iter()
            .find(|c| c.name == name)
            .context("no such case")?;
        let repo = f.hostile_copy(&format!("verify-{name}"), &c.manifest)?;
        let scratch = f.dir.join(&format!("drill-{name}"));
        let r = repo
            .verify_latest(&scratch, &["--keep", "--timeout", "120"])
            .await?;
        ensure!(
            r.code() == Some(1) && !r.stderr.contains("panicked"),
            "{name}: verify must fail with exit 1:\n{r}"
        );
        let v = r.json()?;
        let failure = v["failure"].as_str().unwrap_or("");
        ensure!(
            v["ok"] == false
                && failure.contains(&c.needle)
                && failure.contains("hint:")
                && failure.contains("the server was not started"),
            "{name}: the drill's failure does not name {:?} with a hint:\n{r}",
            c.needle
        );
        for never in ["server.log", "sock", "pg_hba.verify.conf"] {
            ensure!(
                !scratch.join(never).exists(),
                "{name}: the drill went on to start a server ({never} exists)"
            );
        }
        ensure!(
            empty_or_absent(&scratch.join("pgdata"))?,
            "{name}: the drill restored files"
        );
        ensure!(
            snapshot(&sentinel)? == before,
            "{name}: the sentinel directory changed"
        );
        eprintln!("hostile-verify: {name}: drill refused: {failure}");
    }
    Ok(())
}

/// `postgres -C <setting> -D <data>`: the value the server would run with (no server started).
async fn effective_setting(data: &Path, setting: &str) -> Result<String> {
    let mut cmd = env::db_command(env::pg_bin("postgres")?)?;
    cmd.args(["-C", setting, "-D"]).arg(data);
    let r = env::run(cmd).await?.ok()?;
    Ok(r.stdout.trim().to_string())
}

/// The last `archive_mode = ...` line of the restored postgresql.auto.conf.
fn written_archive_mode(data: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(data.join("postgresql.auto.conf"))?;
    Ok(text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("archive_mode"))
        .map(str::to_string))
}

/// Every WAL object key of the repository.
fn wal_keys(repo: &Repo) -> Result<Vec<String>> {
    Ok(repo
        .snapshot()?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("wal/"))
        .collect())
}

/// Starts a server on a restored directory with only a port and socket of its own, so that it
/// runs with exactly the archive settings the restore wrote, and waits until it is promoted.
async fn start_as_restored(dir: &TestDir, name: &str, data: &Path) -> Result<PgCluster> {
    let mut c = PgCluster::adopt(dir, name, data)?;
    c.append_conf(
        "postgresql.auto.conf",
        &format!(
            "\n# hostile_repository test: own socket, archive settings as restored\nunix_socket_directories = {}\n",
            conf_quote(&c.sock.to_string_lossy())
        ),
    )?;
    c.start().await?;
    let started = Instant::now();
    loop {
        if let Ok(db) = c.client().await {
            if let Ok(row) = db.query_one("SELECT pg_is_in_recovery()", &[]).await {
                if !row.get::<_, bool>(0) {
                    return Ok(c);
                }
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{name} was not promoted within 120 s\n{}", c.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_mode_off_by_default_and_preserve_on_request() -> Result<()> {
    let f = fixture("archive-mode").await?;
    let src_mode = f
        .src
        .client()
        .await?
        .query_one("SHOW archive_mode", &[])
        .await?;
    ensure!(
        src_mode.get::<_, String>(0) == "on",
        "the source does not archive"
    );

    // Default: off, written into the recovery settings, and in effect.
    let off = f.dir.join("restored-off");
    let r = f.repo.restore(&off, &["--target", "latest"]).await?.ok()?;
    ensure!(r.json()?["archive_mode"] == "off", "restore --json:\n{r}");
    ensure!(
        written_archive_mode(&off)?.as_deref() == Some("archive_mode = off"),
        "the default restore did not write archive_mode = off"
    );
    ensure!(effective_setting(&off, "archive_mode").await? == "off");

    // The same explicitly and through the environment.
    let r = f
        .repo
        .restore(
            &f.dir.join("restored-off2"),
            &["--target", "latest", "--archive-mode", "off"],
        )
        .await?
        .ok()?;
    ensure!(r.json()?["archive_mode"] == "off");
    let keep_env = f.dir.join("restored-env").display().to_string();
    let r = env::tidemark(
        Tool::Restore,
        &[
            "restore",
            "--pgdata",
            &keep_env,
            "--repo",
            &f.repo.url,
            "--target",
            "latest",
            "--json",
        ],
        &[("TIDEMARK_ARCHIVE_MODE", "preserve")],
    )
    .await?
    .ok()?;
    ensure!(
        r.json()?["archive_mode"] == "preserve",
        "TIDEMARK_ARCHIVE_MODE=preserve:\n{r}"
    );

    // preserve: nothing written, the backup's settings in effect (archiving into this repo).
    let keep = f.dir.join("restored-preserve");
    let r = f
        .repo
        .restore(&keep, &["--target", "latest", "--archive-mode", "preserve"])
        .await?
        .ok()?;
    ensure!(r.json()?["archive_mode"] == "preserve");
    ensure!(
        written_archive_mode(&keep)?.is_none(),
        "--archive-mode preserve wrote an archive_mode line"
    );
    ensure!(effective_setting(&keep, "archive_mode").await? == "on");
    ensure!(effective_setting(&keep, "archive_command")
        .await?
        .contains("wal-push"));

    // A bad value is a usage error naming the choices.
    let r = f
        .repo
        .restore(
            &f.dir.join("restored-bad"),
            &["--target", "latest", "--archive-mode", "on"],
        )
        .await?;
    ensure!(
        r.code() == Some(2) && r.stderr.contains("off") && r.stderr.contains("preserve"),
        "--archive-mode on must be a usage error:\n{r}"
    );

    // The off copy, started and promoted with exactly what the restore wrote, archives nothing
    // into the repository it came from, even after switching WAL segments.
    let wal_before = wal_keys(&f.repo)?;
    let copy = start_as_restored(&f.dir, "copy", &off).await?;
    let db = copy.client().await?;
    let mode: String = db.query_one("SHOW archive_mode", &[]).await?.get(0);
    ensure!(
        mode == "off",
        "the restored copy runs with archive_mode = {mode}"
    );
    data::write_batch(&db, 3).await?;
    for _ in 0..3 {
        db.batch_execute("SELECT pg_switch_wal(); CHECKPOINT")
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let wal_after = wal_keys(&f.repo)?;
    ensure!(
        wal_after == wal_before,
        "the restored copy archived into the repository: new keys {:?}",
        wal_after
            .iter()
            .filter(|k| !wal_before.contains(k))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "archive-mode: off by default (promoted copy archived nothing, {} WAL objects before and after); preserve kept archive_mode = on and the backup's archive_command",
        wal_before.len()
    );
    Ok(())
}
