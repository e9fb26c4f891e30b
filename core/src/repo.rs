//! Repository-level operations shared by both binaries: the config object, backup listing and
//! manifest I/O. A backup exists only once its manifest exists; manifests are written create-only.

use crate::store::{Store, StoreError};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use tidemark_format::cluster::ClusterRecord;
use tidemark_format::config::{RepoConfig, COMPRESSION_ZSTD};
use tidemark_format::manifest::{Manifest, ManifestHeader};
use tidemark_format::{keys, FormatError, SystemId};

/// Default fixed chunk size: one PostgreSQL page (see FORMAT.md for the measurement).
pub const DEFAULT_CHUNK_SIZE: u32 = 8192;
/// Default pack target: 32 MiB of compressed chunks, i.e. at most ~32 packs per GiB written.
pub const DEFAULT_PACK_TARGET: u32 = 32 << 20;
/// Largest config object read.
const MAX_CONFIG: u64 = 1 << 16;
/// Largest manifest object read whole (a 1 TB cluster's manifest is about 6.5 GB; see FORMAT.md).
pub const MAX_MANIFEST: u64 = 16 << 30;
/// Bytes fetched first when only a manifest's header is needed.
const HEADER_PREFIX: u64 = 256 << 10;

/// Loads the repository config; `None` when the repository is new.
pub async fn load_config(store: &Store) -> Result<Option<RepoConfig>> {
    match store
        .get_stored(keys::CONFIG, tidemark_format::seal::sealed_len(MAX_CONFIG))
        .await
    {
        Ok(b) => {
            let b = crate::encryption::open_config(store, b).await?;
            Ok(Some(RepoConfig::decode(&b).with_context(|| {
                format!("repository {} has an unreadable config object", store.url())
            })?))
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the config of repository {}", store.url()))
        }
    }
}

/// Loads the config and checks it belongs to `system_id`; creates it (create-only) when the
/// repository is new. Two writers racing to create it both end up reading the winner's.
pub async fn ensure_config(store: &Store, system_id: SystemId) -> Result<RepoConfig> {
    let cfg = match load_config(store).await? {
        Some(c) => c,
        None => {
            let now = chrono::Utc::now().timestamp_micros();
            let cfg = RepoConfig {
                system_id,
                chunk_size: DEFAULT_CHUNK_SIZE,
                pack_target: DEFAULT_PACK_TARGET,
                compression: COMPRESSION_ZSTD,
                created_us: now,
            };
            let created = crate::encryption::prepare_create(store).await?;
            match store
                .put_create(keys::CONFIG, Bytes::from(cfg.encode()))
                .await
            {
                Ok(()) => cfg,
                Err(StoreError::AlreadyExists { .. }) => {
                    crate::encryption::abandon(store, created).await;
                    load_config(store)
                        .await?
                        .context("repository config vanished after a concurrent create")?
                }
                Err(e) => return Err(e).context("cannot create the repository config"),
            }
        }
    };
    if cfg.system_id != system_id {
        bail!(
            "repository {} belongs to database system {}, not {}\nhint: each PostgreSQL cluster needs its own repository; point --repo / TIDEMARK_REPO at another location",
            store.url(),
            cfg.system_id,
            system_id
        );
    }
    Ok(cfg)
}

/// Loads the config of a repository that must already exist.
pub async fn require_config(store: &Store) -> Result<RepoConfig> {
    load_config(store).await?.with_context(|| {
        format!("repository {} has no config object\nhint: check --repo / TIDEMARK_REPO; a repository is created by the first wal-push or backup", store.url())
    })
}

/// Every backup of the repository: the headers that decode, oldest stop time first, and the
/// manifests that do not.
#[derive(Clone, Debug, Default)]
pub struct Backups {
    pub readable: Vec<ManifestHeader>,
    /// (backup id, why), by id.
    pub unreadable: Vec<(String, String)>,
}

/// Lists every backup. A manifest whose header does not decode (damaged, truncated, foreign,
/// or written by a newer release) is listed as unreadable; a storage error is an error, never
/// "unreadable" (a transient failure must not change what a reader decides).
pub async fn all_backups(store: &Store) -> Result<Backups> {
    let listed = store
        .list(keys::BACKUPS)
        .await
        .context("cannot list backups")?;
    let mut out = Backups::default();
    for l in listed {
        let Some(id) = keys::parse_manifest(&l.key) else {
            continue;
        };
        match load_header(store, id, l.size).await {
            Ok(h) => out.readable.push(h),
            Err(e) if e.chain().any(|c| c.downcast_ref::<StoreError>().is_some()) => return Err(e),
            Err(e) => out.unreadable.push((id.to_string(), format!("{e:#}"))),
        }
    }
    out.readable.sort_by_key(|h| (h.stop_time_us, h.stop_lsn));
    out.unreadable.sort();
    Ok(out)
}

/// Headers of every readable backup, oldest stop time first. An unreadable manifest is left
/// out with a warning naming it: a reader that only chooses among backups (restore, verify,
/// backup's parent, info) goes on without it. Writers that must know every backup's references
/// (expire) use [`all_backups`] and refuse instead.
pub async fn list_backups(store: &Store) -> Result<Vec<ManifestHeader>> {
    let all = all_backups(store).await?;
    for (id, why) in &all.unreadable {
        tracing::warn!(
            backup = %id,
            "backup {id} is left out: its manifest cannot be read ({why})\nhint: run 'tidemark-restore check' (it names every unreadable manifest); expire refuses to run until it is repaired or moved out of backups/"
        );
    }
    Ok(all.readable)
}

async fn load_header(store: &Store, id: &str, size: u64) -> Result<ManifestHeader> {
    let key = keys::manifest(id);
    let prefix = store
        .get_range(&key, 0..size.min(HEADER_PREFIX))
        .await
        .with_context(|| format!("cannot read manifest of backup {id}"))?;
    match ManifestHeader::decode_prefix(&prefix) {
        Err(FormatError::Truncated { .. }) if size > HEADER_PREFIX => {
            Ok(load_manifest(store, id).await?.header)
        }
        r => r.with_context(|| format!("backup {id} has an unreadable manifest")),
    }
}

/// Loads and fully verifies one manifest into memory (a manifest in parts is put together
/// first); readers of large manifests use [`crate::manifest_file::LocalManifest`] instead.
pub async fn load_manifest(store: &Store, id: &str) -> Result<Manifest> {
    crate::manifest_file::load_whole(store, id).await
}

/// Formats microseconds since the epoch as RFC 3339 UTC.
pub fn fmt_time(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("{us}us"))
}

/// One database system of a repository: the config's own at the top level, or a later one (a
/// major upgrade) in its nested repository `systems/<id>/` (FORMAT.md 8.7).
#[derive(Clone, Debug)]
pub struct System {
    pub system_id: SystemId,
    /// PostgreSQL major from the cluster record; `None` when no record says.
    pub pg_major: Option<u32>,
    /// When a writer first saw the system (the record's time, else the config's).
    pub created_us: i64,
    /// The store holding this system's objects (the repository itself, or `systems/<id>/`).
    pub store: Store,
    /// True for the system of the top-level config.
    pub top_level: bool,
}

/// Largest cluster record read.
const MAX_CLUSTER_RECORD: u64 = 4096;
/// Most cluster records a repository may hold (one per major upgrade).
const MAX_SYSTEMS: usize = 1000;

async fn load_cluster_records(store: &Store) -> Result<Vec<ClusterRecord>> {
    let listed = store
        .list(keys::CLUSTERS)
        .await
        .context("cannot list cluster records")?;
    if listed.len() > MAX_SYSTEMS {
        bail!(
            "repository {} lists {} cluster records, more than the {MAX_SYSTEMS} a reader accepts",
            store.url(),
            listed.len()
        );
    }
    let mut out = Vec::new();
    for l in listed {
        let Some(sid) = keys::parse_cluster(&l.key) else {
            continue;
        };
        let b = store
            .get(&l.key, MAX_CLUSTER_RECORD)
            .await
            .with_context(|| format!("cannot read cluster record {}", l.key))?;
        let rec = ClusterRecord::decode(&b)
            .with_context(|| format!("cluster record {} is unreadable", l.key))?;
        if rec.system_id != sid {
            bail!(
                "cluster record {} names system {} instead",
                l.key,
                rec.system_id
            );
        }
        out.push(rec);
    }
    Ok(out)
}

/// Every system of the repository, the top-level one first, then by when each was first seen.
pub async fn systems(store: &Store) -> Result<Vec<System>> {
    let cfg = require_config(store).await?;
    let records = load_cluster_records(store).await?;
    let top = records.iter().find(|r| r.system_id == cfg.system_id);
    let mut out = vec![System {
        system_id: cfg.system_id,
        pg_major: top.map(|r| r.pg_major).filter(|m| *m != 0),
        created_us: cfg.created_us,
        store: store.clone(),
        top_level: true,
    }];
    let mut others: Vec<&ClusterRecord> = records
        .iter()
        .filter(|r| r.system_id != cfg.system_id)
        .collect();
    others.sort_by_key(|r| (r.created_us, r.system_id.0));
    out.extend(others.into_iter().map(|r| System {
        system_id: r.system_id,
        pg_major: (r.pg_major != 0).then_some(r.pg_major),
        created_us: r.created_us,
        store: store.child(&keys::system_prefix(r.system_id)),
        top_level: false,
    }));
    Ok(out)
}

/// The system a reader works on: `want` if given, else the newest (the one a major upgrade
/// created last, i.e. the cluster running now).
pub async fn select_system(store: &Store, want: Option<SystemId>) -> Result<System> {
    let all = systems(store).await?;
    let names = || {
        all.iter()
            .map(|s| match s.pg_major {
                Some(m) => format!("{} (PostgreSQL {m})", s.system_id),
                None => s.system_id.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match want {
        Some(id) => all
            .iter()
            .find(|s| s.system_id == id)
            .cloned()
            .with_context(|| {
                format!(
                    "repository {} holds no database system {id}\nhint: it holds {}; see `tidemark-agent info`",
                    store.url(),
                    names()
                )
            }),
        None => {
            let newest = all
                .iter()
                .max_by_key(|s| (s.created_us, s.top_level))
                .cloned()
                .context("repository lists no system")?;
            if all.len() > 1 {
                tracing::info!(
                    system_id = %newest.system_id,
                    "the repository holds several database systems ({}); using the newest, {} (pass --system-id to choose another)",
                    names(),
                    newest.system_id
                );
            }
            Ok(newest)
        }
    }
}

/// Writes the cluster record of `system_id` unless one exists (create-only; idempotent).
async fn ensure_cluster_record(store: &Store, system_id: SystemId, pg_major: u32) -> Result<()> {
    let rec = ClusterRecord {
        system_id,
        pg_major,
        created_us: chrono::Utc::now().timestamp_micros(),
    };
    match store
        .put_create(&rec.key(), Bytes::from(rec.encode()))
        .await
    {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot write cluster record {}", rec.key())),
    }
}

/// The newest PostgreSQL major among the existing systems: their records, else the top-level
/// system's newest backup. `None` when nothing tells.
async fn newest_known_major(all: &[System]) -> Result<Option<u32>> {
    let mut newest = all.iter().filter_map(|s| s.pg_major).max();
    if let Some(top) = all.iter().find(|s| s.top_level && s.pg_major.is_none()) {
        let from_backups = list_backups(&top.store)
            .await?
            .iter()
            .map(|b| b.pg_version / 10000)
            .max();
        newest = newest.max(from_backups);
    }
    Ok(newest)
}

/// Where a writer (wal-push, backup) of cluster `system_id` writes: the top-level repository
/// when it is that cluster's (creating it in an empty repository), else the cluster's nested
/// repository `systems/<id>/`. A cluster the repository has not seen is registered there only
/// when its PostgreSQL major is newer than every major the repository holds (a major upgrade)
/// or the operator accepts it explicitly (`accept_new_system`); anything else is refused,
/// because two unrelated clusters pointed at one repository are a configuration error.
/// `record` also writes the top-level system's cluster record when it lacks one (backups do;
/// wal-push does so only when it creates the repository, to keep archiving at one request).
pub async fn open_for_writer(
    store: &Store,
    system_id: SystemId,
    pg_major: Option<u32>,
    accept_new_system: bool,
    record: bool,
) -> Result<(Store, RepoConfig)> {
    let top = match load_config(store).await? {
        Some(c) => c,
        None => {
            let cfg = ensure_config(store, system_id).await?;
            if cfg.system_id == system_id {
                if let Some(m) = pg_major {
                    ensure_cluster_record(store, system_id, m).await?;
                }
                return Ok((store.clone(), cfg));
            }
            cfg
        }
    };
    if top.system_id == system_id {
        if let (true, Some(m)) = (record, pg_major) {
            ensure_cluster_record(store, system_id, m).await?;
        }
        return Ok((store.clone(), top));
    }
    let nested = store.child(&keys::system_prefix(system_id));
    if let Some(cfg) = load_config(&nested).await? {
        return Ok((nested, cfg));
    }
    let all = systems(store).await?;
    let newest = newest_known_major(&all).await?;
    let upgrade = matches!((pg_major, newest), (Some(m), Some(n)) if m > n);
    if !upgrade && !accept_new_system {
        let this = pg_major.map_or("an unknown major".to_string(), |m| {
            format!("PostgreSQL {m}")
        });
        let there = newest.map_or("an unknown major".to_string(), |m| {
            format!("PostgreSQL {m}")
        });
        bail!(
            "repository {} belongs to database system {} ({there}), not {system_id} ({this})\nhint: each PostgreSQL cluster needs its own repository; point --repo / TIDEMARK_REPO at another location. If this cluster replaces the old one (a major upgrade is recognised by itself; a re-initialised cluster of the same major is not), pass --accept-new-system (TIDEMARK_ACCEPT_NEW_SYSTEM=true) once: the old system's backups and WAL stay restorable with --system-id",
            store.url(),
            top.system_id,
        );
    }
    // Record first: a nested config without a record would be invisible to readers.
    ensure_cluster_record(store, system_id, pg_major.unwrap_or(0)).await?;
    let cfg = ensure_config(&nested, system_id).await?;
    tracing::warn!(
        system_id = %system_id,
        previous = %top.system_id,
        "a new database system archives into this repository (PostgreSQL {}; a major upgrade or a replacement cluster): its WAL and backups go under {}; the earlier systems stay restorable with --system-id",
        pg_major.map_or("?".to_string(), |m| m.to_string()),
        keys::system_prefix(system_id)
    );
    Ok((nested, cfg))
}
