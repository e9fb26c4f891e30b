//! Over 500 lines because every lease scenario runs on both backends through one macro and one set
//! of helpers.
//!
//! Repository leases (FORMAT.md section 16) on every storage backend: the local `file://`
//! directory and a real S3-compatible server (moto, see `common`). Each scenario runs once per
//! backend (`<scenario>::file`, `<scenario>::s3`) in its own repository, and only through the
//! public API the binaries use (`lease`, `expire`).
//!
//! The lease TTL of this test process is [`TTL_SECS`] (renewal every 2 s), set through
//! `TIDEMARK_LEASE_TTL_SECS` before any lease is taken.

mod common;

use bytes::Bytes;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidemark_core::expire::{self, Plan};
use tidemark_core::lease::{self, LeaseHandle, CLOCK_SKEW};
use tidemark_core::repo;
use tidemark_core::store::Store;
use tidemark_format::lock::{Lease, LeaseKind};
use tidemark_format::{keys, PackId, SystemId};

const TTL_SECS: u64 = 6;
const PERIOD: Duration = Duration::from_secs(TTL_SECS / 3);

#[derive(Clone, Copy, Debug)]
enum Backend {
    File,
    S3,
}

struct Repo {
    store: Store,
    /// The key prefix inside the moto bucket (S3 only).
    s3_prefix: Option<String>,
    /// The repository directory (file:// only).
    file_root: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

/// A new, initialised repository of its own on `backend`.
async fn repo(backend: Backend, name: &str) -> Repo {
    static TTL: std::sync::Once = std::sync::Once::new();
    TTL.call_once(|| std::env::set_var("TIDEMARK_LEASE_TTL_SECS", TTL_SECS.to_string()));
    assert_eq!(lease::ttl(), Duration::from_secs(TTL_SECS));
    let r = match backend {
        Backend::File => {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("repo");
            let store =
                Store::open(&format!("file://{}", root.display())).expect("open file store");
            Repo {
                store,
                s3_prefix: None,
                file_root: Some(root),
                _dir: Some(dir),
            }
        }
        Backend::S3 => {
            let url = common::s3_url(&format!("leases/{name}"));
            let store = Store::open(&url).expect("open s3 store");
            let prefix = url
                .strip_prefix(&format!("s3://{}/", common::BUCKET))
                .expect("s3 url")
                .to_string();
            Repo {
                store,
                s3_prefix: Some(prefix),
                file_root: None,
                _dir: None,
            }
        }
    };
    repo::ensure_config(&r.store, SystemId(0x7165_6173_6573))
        .await
        .expect("create the repository config");
    r
}

/// Stores one pack no manifest references (an expire with no grace period deletes it unless
/// packs are deferred). Returns its key.
async fn orphan_pack(store: &Store) -> String {
    let key = keys::pack(&PackId::of(b"an unreferenced pack"));
    store
        .put_create(&key, Bytes::from_static(b"pack bytes"))
        .await
        .expect("put pack");
    key
}

async fn expire_now(store: &Store) -> anyhow::Result<Plan> {
    expire::run(store, &common::expire_options(false)).await
}

/// Writes a lease object directly, as another process would have.
async fn foreign_lease(
    store: &Store,
    kind: LeaseKind,
    host: &str,
    pid: u32,
    expires_us: i64,
) -> String {
    let key = keys::lease(kind, &lease::nonce()).expect("lease key");
    let l = Lease {
        kind,
        created_us: expires_us - 3_600_000_000,
        expires_us,
        pid,
        host: host.to_string(),
    };
    store
        .put_create(&key, Bytes::from(l.encode()))
        .await
        .expect("put lease");
    key
}

/// Raw listing of `locks/`: no retry, no decoding.
async fn lock_keys(store: &Store) -> Vec<String> {
    store
        .list(keys::LOCKS)
        .await
        .expect("list locks/")
        .into_iter()
        .map(|l| l.key)
        .collect()
}

/// A process id that certainly does not run any more: a child that exited and was reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait for true");
    pid
}

macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn file() {
                super::$scenario(super::Backend::File).await
            }
            #[tokio::test]
            async fn s3() {
                super::$scenario(super::Backend::S3).await
            }
        }
    )*};
}

on_every_backend!(
    two_backup_leases_coexist_and_defer_pack_deletion,
    an_expire_is_refused_while_another_expire_is_live,
    renewal_writes_the_new_object_before_deleting_the_old,
    leases_past_expiry_and_skew_are_stale_and_removed,
    a_holder_notices_its_lease_object_was_deleted,
    a_lease_of_a_dead_local_process_is_stale_at_once,
    a_holder_stalled_past_its_expiry_does_not_revive_its_lease,
    release_mid_renewal_leaves_no_lease_object,
);

async fn two_backup_leases_coexist_and_defer_pack_deletion(b: Backend) {
    let r = repo(b, "coexist").await;
    let s = &r.store;
    let pack = orphan_pack(s).await;
    let wait = Duration::from_secs(30);
    let one = lease::begin_backup(s, wait)
        .await
        .expect("first backup lease");
    let two = tokio::time::timeout(Duration::from_secs(10), lease::begin_backup(s, wait))
        .await
        .expect("a backup lease does not wait for another backup lease")
        .expect("second backup lease");
    assert_ne!(one.key(), two.key());
    let listed = lease::list(s).await.expect("list leases");
    let mut got: Vec<String> = listed.iter().map(|l| l.key.clone()).collect();
    got.sort();
    let mut want = vec![one.key(), two.key()];
    want.sort();
    assert_eq!(got, want);
    let now = lease::now_us();
    for l in &listed {
        assert_eq!(l.lease.kind, LeaseKind::Backup);
        assert!(l.is_live(now), "{}", l.describe());
    }
    one.check().await.expect("first lease held");
    two.check().await.expect("second lease held");

    // An expire now removes manifests only: packs and WAL wait for a run with no backup in flight.
    let plan = expire_now(s).await.expect("expire next to two backups");
    let deferred = plan.deferred.as_deref().expect("packs deferred");
    assert!(deferred.contains("2 backup(s) running"), "{deferred}");
    assert!(
        deferred.contains(&one.key()) && deferred.contains(&two.key()),
        "{deferred}"
    );
    assert!(
        plan.packs.delete.is_empty() && plan.packs.condemn.is_empty(),
        "{plan:?}"
    );
    assert!(plan.stale_leases.is_empty(), "{plan:?}");
    assert!(
        s.head(&pack).await.expect("head").is_some(),
        "a deferred expire deleted a pack"
    );
    assert!(
        s.list(keys::GC).await.expect("list gc/").is_empty(),
        "a deferred expire condemned packs"
    );
    // The expire released its own lease and left the backups' leases alone.
    assert_eq!(lease::list(s).await.expect("list").len(), 2);
    one.check()
        .await
        .expect("first lease still held after the expire");
    two.check()
        .await
        .expect("second lease still held after the expire");

    one.release().await.expect("release first");
    let plan = expire_now(s).await.expect("expire next to one backup");
    assert!(
        plan.deferred
            .as_deref()
            .is_some_and(|d| d.contains("1 backup(s) running") && d.contains(&two.key())),
        "{plan:?}"
    );
    assert!(s.head(&pack).await.expect("head").is_some());

    two.release().await.expect("release second");
    assert!(lock_keys(s).await.is_empty());
    let plan = expire_now(s).await.expect("expire with no backup running");
    assert_eq!(plan.deferred, None);
    assert_eq!(plan.packs.delete.len(), 1, "{plan:?}");
    assert!(
        s.head(&pack).await.expect("head").is_none(),
        "the orphan pack outlived a free expire"
    );
    assert!(lock_keys(s).await.is_empty());
}

async fn an_expire_is_refused_while_another_expire_is_live(b: Backend) {
    let r = repo(b, "exclusive").await;
    let s = &r.store;
    let pack = orphan_pack(s).await;
    let first = LeaseHandle::acquire(s, LeaseKind::Expire)
        .await
        .expect("first expire lease");
    for dry_run in [false, true] {
        let e = expire::run(s, &common::expire_options(dry_run))
            .await
            .expect_err("a second expire must be refused");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("another expire is running in this repository"),
            "{msg}"
        );
        assert!(
            msg.contains(&first.key()),
            "the error names the live lease: {msg}"
        );
        assert!(msg.contains("hint: "), "{msg}");
    }
    // The refused run deleted nothing and did not leave its own lease behind.
    assert!(s.head(&pack).await.expect("head").is_some());
    assert_eq!(lock_keys(s).await, vec![first.key()]);
    first
        .check()
        .await
        .expect("the first expire still holds its lease");

    // A backup starting now waits for the expire to end.
    let s2 = s.clone();
    let backup =
        tokio::spawn(async move { lease::begin_backup(&s2, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !backup.is_finished(),
        "a backup did not wait for a live expire"
    );
    first.release().await.expect("release");
    let held = tokio::time::timeout(Duration::from_secs(10), backup)
        .await
        .expect("the backup went on once the expire ended")
        .expect("join")
        .expect("backup lease");
    held.release().await.expect("release backup");

    let plan = expire_now(s)
        .await
        .expect("expire once the first one ended");
    assert_eq!(plan.deferred, None);
    assert!(s.head(&pack).await.expect("head").is_none());
    assert!(lock_keys(s).await.is_empty());
}

/// Records, in order, every lease object written or deleted in a repository from now on: on S3
/// from moto's request log (arrival order), on `file://` from inotify events of `locks/`.
enum Journal {
    S3 {
        prefix: String,
    },
    File {
        events: Arc<Mutex<Vec<(bool, String)>>>,
        _watcher: notify::RecommendedWatcher,
    },
}

impl Journal {
    fn start(r: &Repo) -> Journal {
        if let Some(prefix) = &r.s3_prefix {
            return Journal::S3 {
                prefix: format!("{prefix}/locks/"),
            };
        }
        use notify::{EventKind, Watcher};
        let locks = r.file_root.as_ref().expect("file repository").join("locks");
        std::fs::create_dir_all(&locks).expect("create locks/");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            let e = e.expect("inotify event");
            let written = match e.kind {
                EventKind::Create(_) => true,
                EventKind::Remove(_) => false,
                _ => return,
            };
            for p in &e.paths {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                // Skip the store's temporary files: only the final names are lease objects.
                if keys::parse_lease(&format!("{}{name}", keys::LOCKS)).is_some() {
                    sink.lock()
                        .expect("journal")
                        .push((written, format!("{}{name}", keys::LOCKS)));
                }
            }
        })
        .expect("inotify watcher");
        watcher
            .watch(&locks, notify::RecursiveMode::NonRecursive)
            .expect("watch locks/");
        Journal::File {
            events,
            _watcher: watcher,
        }
    }

    /// (written, key) in order; `false` is a delete.
    async fn events(&self) -> Vec<(bool, String)> {
        match self {
            Journal::S3 { prefix } => common::s3_requests(prefix)
                .into_iter()
                .filter_map(|(method, path)| {
                    let key = path
                        .split_once("/locks/")
                        .map(|(_, k)| format!("{}{k}", keys::LOCKS))?;
                    match method.as_str() {
                        "PUT" => Some((true, key)),
                        "DELETE" => Some((false, key)),
                        _ => None,
                    }
                })
                .collect(),
            Journal::File { events, .. } => {
                // inotify delivers on its own thread: give it a moment to catch up.
                tokio::time::sleep(Duration::from_millis(200)).await;
                events.lock().expect("journal").clone()
            }
        }
    }
}

async fn renewal_writes_the_new_object_before_deleting_the_old(b: Backend) {
    let r = repo(b, "renewal").await;
    let s = &r.store;
    let journal = Journal::start(&r);
    let h = LeaseHandle::acquire(s, LeaseKind::Backup)
        .await
        .expect("acquire");
    let first_key = h.key();
    let first = Lease::decode(&s.get(&first_key, 4096).await.expect("get")).expect("decode");
    // Watch the listing through two renewals (at PERIOD and 2 * PERIOD). Listings rarely land
    // between a renewal's write and delete, so the journal below is what proves the order.
    // (Until two renewals are seen, or a deadline generous enough for a loaded machine: this
    // checks that renewals happen and their order, not how fast.)
    let until = Instant::now() + PERIOD * 2 + PERIOD / 2 + Duration::from_secs(20);
    let mut seen = BTreeSet::new();
    while Instant::now() < until && seen.len() < 3 {
        let now = lock_keys(s).await;
        assert!(
            !now.is_empty(),
            "no object of a live holder was listed (a renewal deleted before it wrote)"
        );
        seen.extend(now);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen.len() >= 3, "expected two renewals, saw {seen:?}");
    assert_ne!(h.key(), first_key, "the lease was not renewed");
    // Renewals settle to exactly one object: the current one, same holder, later expiry.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock_keys(s).await != vec![h.key()] {
        assert!(
            Instant::now() < deadline,
            "the previous lease object was not deleted: {:?}",
            lock_keys(s).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cur = Lease::decode(&s.get(&h.key(), 4096).await.expect("get")).expect("decode");
    assert_eq!(
        (cur.kind, cur.created_us, cur.pid, &cur.host),
        (first.kind, first.created_us, first.pid, &first.host)
    );
    assert!(cur.expires_us >= first.expires_us + PERIOD.as_micros() as i64);
    h.check().await.expect("held");
    h.release().await.expect("release");
    assert!(lock_keys(s).await.is_empty());

    // Replay the journal: every delete but the release's left another object of the holder.
    let events = journal.events().await;
    let mut live = BTreeSet::new();
    let writes = events.iter().filter(|(w, _)| *w).count();
    assert!(
        writes >= 3,
        "expected the first write and two renewals: {events:?}"
    );
    assert_eq!(
        events.first(),
        Some(&(true, first_key.clone())),
        "{events:?}"
    );
    for (i, (written, key)) in events.iter().enumerate() {
        if *written {
            assert!(live.insert(key.clone()), "{key} written twice: {events:?}");
        } else {
            assert!(
                live.remove(key),
                "delete of {key}, never written: {events:?}"
            );
            assert!(
                !live.is_empty() || i == events.len() - 1,
                "a renewal deleted the old lease object before writing the new one: {events:?}"
            );
        }
    }
    assert!(live.is_empty(), "{events:?}");
}

async fn leases_past_expiry_and_skew_are_stale_and_removed(b: Backend) {
    let r = repo(b, "stale").await;
    let s = &r.store;
    let pack = orphan_pack(s).await;
    let now = lease::now_us();
    let skew = CLOCK_SKEW.as_micros() as i64;
    let long_ago = now - skew - 3_600_000_000;
    let stale_backup =
        foreign_lease(s, LeaseKind::Backup, "elsewhere.example", 4242, long_ago).await;
    let stale_expire =
        foreign_lease(s, LeaseKind::Expire, "elsewhere.example", 4243, long_ago).await;
    // Past its expiry but within the tolerated skew: still live for everyone else.
    let recent = foreign_lease(
        s,
        LeaseKind::Backup,
        "elsewhere.example",
        4244,
        now - skew / 2,
    )
    .await;
    let listed = lease::list(s).await.expect("list");
    assert_eq!(listed.len(), 3);
    for l in &listed {
        assert_eq!(l.is_live(now), l.key == recent, "{}", l.describe());
    }

    // The stale expire lease does not block; the stale backup lease does not defer, the recent
    // one does. Both stale leases are removed.
    let plan = expire_now(s).await.expect("expire next to stale leases");
    let mut want = vec![stale_backup.clone(), stale_expire.clone()];
    want.sort();
    assert_eq!(plan.stale_leases, want);
    let deferred = plan
        .deferred
        .as_deref()
        .expect("deferred by the recent lease");
    assert!(
        deferred.contains("1 backup(s) running") && deferred.contains(&recent),
        "{deferred}"
    );
    assert_eq!(lock_keys(s).await, vec![recent.clone()]);
    assert!(s.head(&pack).await.expect("head").is_some());

    // Once it is stale too (written here as if its holder never renewed), packs go.
    s.delete(&recent).await.expect("delete");
    let gone = foreign_lease(s, LeaseKind::Backup, "elsewhere.example", 4244, long_ago).await;
    let plan = expire_now(s).await.expect("expire");
    assert_eq!(plan.stale_leases, vec![gone]);
    assert_eq!(plan.deferred, None);
    assert!(s.head(&pack).await.expect("head").is_none());
    assert!(lock_keys(s).await.is_empty());
}

async fn a_holder_notices_its_lease_object_was_deleted(b: Backend) {
    let r = repo(b, "lost").await;
    let s = &r.store;
    let x = LeaseHandle::acquire(s, LeaseKind::Expire)
        .await
        .expect("expire lease");
    // (begin_backup would wait for the live expire: the backup lease is taken directly.)
    let bl = LeaseHandle::acquire(s, LeaseKind::Backup)
        .await
        .expect("backup lease");
    x.check().await.expect("held");
    bl.check().await.expect("held");
    // Another process judged both stale and removed them.
    s.delete(&x.key()).await.expect("delete");
    s.delete(&bl.key()).await.expect("delete");
    for (h, word) in [(&x, "expire"), (&bl, "backup")] {
        let msg = format!(
            "{:#}",
            h.check().await.expect_err("a removed lease is not held")
        );
        assert!(
            msg.contains(&format!(
                "the {word} lease {} was removed by another process",
                h.key()
            )),
            "{msg}"
        );
        assert!(
            msg.contains("hint: nothing more is deleted or committed"),
            "{msg}"
        );
    }
    // The heartbeat notices too (no request needed afterwards) and does not write a new object.
    tokio::time::sleep(PERIOD + PERIOD / 2).await;
    for h in [&x, &bl] {
        let msg = format!("{:#}", h.check_local().expect_err("lost"));
        assert!(
            msg.contains("lost the") && msg.contains("was removed by another process"),
            "{msg}"
        );
    }
    assert!(
        lock_keys(s).await.is_empty(),
        "a lost lease was renewed: {:?}",
        lock_keys(s).await
    );
    x.release().await.expect("release of a lost lease");
    bl.release().await.expect("release of a lost lease");
    assert!(lock_keys(s).await.is_empty());
}

async fn a_lease_of_a_dead_local_process_is_stale_at_once(b: Backend) {
    let r = repo(b, "deadpid").await;
    let s = &r.store;
    let pack = orphan_pack(s).await;
    let host = lease::hostname();
    assert!(
        !host.is_empty(),
        "this host has no name: the same-host rule cannot apply"
    );
    let far = lease::now_us() + 3_600_000_000;
    let pid = dead_pid();
    let dead_expire = foreign_lease(s, LeaseKind::Expire, &host, pid, far).await;
    let dead_backup = foreign_lease(s, LeaseKind::Backup, &host, pid, far).await;
    // The same pid on another host, and a running process here: both live.
    let other_host = foreign_lease(s, LeaseKind::Backup, "elsewhere.example", pid, far).await;
    let running = foreign_lease(s, LeaseKind::Backup, &host, std::process::id(), far).await;
    let now = lease::now_us();
    for l in lease::list(s).await.expect("list") {
        let live = l.key == other_host || l.key == running;
        assert_eq!(l.is_live(now), live, "{}", l.describe());
    }
    s.delete(&other_host).await.expect("delete");
    s.delete(&running).await.expect("delete");

    // A backup does not wait for the dead expire (it would wait TTL + skew for a live one).
    let held = tokio::time::timeout(
        Duration::from_secs(10),
        lease::begin_backup(s, Duration::from_secs(1)),
    )
    .await
    .expect("a backup waited for the lease of a dead expire")
    .expect("backup lease");
    held.release().await.expect("release");
    let plan = expire_now(s).await.expect("expire next to dead leases");
    let mut want = vec![dead_backup, dead_expire];
    want.sort();
    assert_eq!(plan.stale_leases, want);
    assert_eq!(plan.deferred, None, "a dead backup deferred deletion");
    assert!(s.head(&pack).await.expect("head").is_none());
    assert!(lock_keys(s).await.is_empty());
}

async fn a_holder_stalled_past_its_expiry_does_not_revive_its_lease(b: Backend) {
    let r = repo(b, "stalled").await;
    let s = &r.store;
    let h = LeaseHandle::acquire(s, LeaseKind::Expire)
        .await
        .expect("acquire");
    let key = h.key();
    // Freeze this runtime (a stopped VM, a long pause) until the lease is within its margin of
    // expiring: the heartbeat cannot run meanwhile.
    std::thread::sleep(Duration::from_secs(TTL_SECS) - PERIOD / 4);
    // Let the overdue heartbeat run, and one more period: a late renewal must not bring the
    // lease back.
    tokio::time::sleep(PERIOD + PERIOD / 4).await;
    let msg = format!(
        "{:#}",
        h.check()
            .await
            .expect_err("a lease not renewed in time is lost")
    );
    assert!(
        msg.contains("lost the expire lease") && msg.contains("was not renewed before"),
        "{msg}"
    );
    assert!(
        msg.contains("hint: nothing more is deleted or committed"),
        "{msg}"
    );
    let left = lock_keys(s).await;
    assert!(
        left.is_empty() || left == vec![key],
        "a lost lease was renewed: {left:?}"
    );
    h.release().await.expect("release");
    assert!(lock_keys(s).await.is_empty());
}

async fn release_mid_renewal_leaves_no_lease_object(b: Backend) {
    let r = repo(b, "release").await;
    let s = &r.store;
    // Holders released at staggered moments around their first renewal: some release while a
    // renewal is in flight. None may leave an object behind (it would defer expires, or block
    // them for an expire lease, until TTL + skew).
    const HOLDERS: u32 = 24;
    let mut tasks = Vec::new();
    for i in 0..HOLDERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let h = LeaseHandle::acquire(&s, LeaseKind::Backup)
                .await
                .expect("acquire");
            tokio::time::sleep(PERIOD - Duration::from_millis(24) + Duration::from_millis(2) * i)
                .await;
            h.release().await.expect("release");
        }));
    }
    for t in tasks {
        t.await.expect("holder");
    }
    let left = lock_keys(s).await;
    assert!(
        left.is_empty(),
        "released leases left objects behind: {left:?}"
    );
}
