//! Repository-level operations shared by both binaries: the config object, backup listing and
//! manifest I/O. A backup exists only once its manifest exists; manifests are written create-only.

use crate::store::{Store, StoreError};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
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
    match store.get(keys::CONFIG, MAX_CONFIG).await {
        Ok(b) => Ok(Some(RepoConfig::decode(&b).with_context(|| {
            format!("repository {} has an unreadable config object", store.url())
        })?)),
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
            match store
                .put_create(keys::CONFIG, Bytes::from(cfg.encode()))
                .await
            {
                Ok(()) => cfg,
                Err(StoreError::AlreadyExists { .. }) => load_config(store)
                    .await?
                    .context("repository config vanished after a concurrent create")?,
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

/// Headers of every backup in the repository, oldest stop time first.
pub async fn list_backups(store: &Store) -> Result<Vec<ManifestHeader>> {
    let listed = store
        .list(keys::BACKUPS)
        .await
        .context("cannot list backups")?;
    let mut out = Vec::new();
    for l in listed {
        let Some(id) = keys::parse_manifest(&l.key) else {
            continue;
        };
        out.push(load_header(store, id, l.size).await?);
    }
    out.sort_by_key(|h| (h.stop_time_us, h.stop_lsn));
    Ok(out)
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

/// Loads and fully verifies one manifest.
pub async fn load_manifest(store: &Store, id: &str) -> Result<Manifest> {
    let bytes = store
        .get(&keys::manifest(id), MAX_MANIFEST)
        .await
        .with_context(|| format!("cannot read manifest of backup {id}"))?;
    let m = Manifest::decode(&bytes)
        .with_context(|| format!("backup {id} has an unreadable manifest"))?;
    if m.header.backup_id != id {
        bail!(
            "manifest stored as backup {id} names itself {}",
            m.header.backup_id
        );
    }
    Ok(m)
}

/// Formats microseconds since the epoch as RFC 3339 UTC.
pub fn fmt_time(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("{us}us"))
}
