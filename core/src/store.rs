//! Over 500 lines because its unit tests live beside the code; the API itself is about 540.
//!
//! The storage abstraction: one small API with documented semantics over every backend.
//!
//! Invariants:
//! - `put_create` returns `Ok` only once the object is durably stored, and fails with
//!   [`StoreError::AlreadyExists`] (leaving the stored object untouched) when the key exists.
//! - An object store's answer to a PUT is not trusted alone: a HEAD must show the size sent, and
//!   a short object a create-only PUT made is removed before the write fails.
//! - A content-addressed object found already stored is read back and compared, never trusted
//!   for existing ([`Store::put_content_addressed`]).
//! - Keys come from `tidemark_format::keys` only.
//! - `file://` is served by [`LocalDir`], which writes temp → fsync → link (fails if the name
//!   exists) → fsync directory, because object_store's LocalFileSystem does not fsync.
//! - `s3://`, `gs://` and `az://` are served by object_store with its own retrying HTTP client.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{
    path::Path as ObjPath, GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload,
};
use std::ops::Range;
use std::sync::Arc;

mod errors;
mod local;
mod sealing;
use errors::map_os_err;
use local::{io_err, unique, LocalDir};
pub use sealing::UserKey;

/// Errors callers can match on. [`StoreError::is_retryable`] tells whether a retry may help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("object {key} already exists")]
    AlreadyExists { key: String },
    #[error("object {key} is {size} bytes, more than the {max} allowed")]
    TooLarge { key: String, size: u64, max: u64 },
    #[error("storage error on {key}: {message}")]
    Io {
        key: String,
        message: String,
        retryable: bool,
    },
    #[error("object {key} is encrypted, and no repository key was given\nhint: give the repository's key with --key-file / TIDEMARK_KEY_FILE, TIDEMARK_KEY or --key-command / TIDEMARK_KEY_COMMAND")]
    Encrypted { key: String },
    #[error("object {key} of the encrypted repository cannot be opened: {reason}\nhint: the object was altered, cut or moved from another key, or not written by tidemark with this repository's key; run 'tidemark-restore check --read-data' and restore from another backup if it persists")]
    Sealed { key: String, reason: String },
    #[error("object {key} was asked for before the encrypted repository was unlocked (a bug: the config is read first)\nhint: report this; rerunning will not help")]
    Locked { key: String },
    #[error("repository url {url:?} is not usable: {reason}\nhint: use file:///absolute/path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")]
    BadUrl { url: String, reason: String },
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Io {
                retryable: true,
                ..
            }
        )
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A listed object.
#[derive(Clone, Debug)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// When the object was stored (microseconds since the epoch), if the store says; for
    /// reports only (metrics, `info`), never for a decision about what to keep or restore.
    pub modified_us: Option<i64>,
}

#[derive(Clone)]
enum Backend {
    Local(Arc<LocalDir>),
    Object {
        store: Arc<dyn ObjectStore>,
        prefix: String,
    },
}

/// A repository's storage, opened from a URL.
#[derive(Clone)]
pub struct Store {
    url: String,
    backend: Backend,
    /// Whether and how objects are sealed (shared by every clone and child of one opened
    /// repository; see `sealing.rs`).
    crypt: Arc<sealing::Crypt>,
    /// This store's keys as seen from the repository root (`""`, or `systems/<id>/` for a
    /// nested system): the name a sealed object's segments are bound to.
    root_prefix: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    /// Opens `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix` or `az://container/prefix`.
    /// Cloud credentials and endpoints come from the providers' standard environment variables
    /// (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL,
    /// AWS_ALLOW_HTTP=true for plain-http S3-compatible servers).
    pub fn open(url: &str) -> Result<Store> {
        let bad = |reason: &str| StoreError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let backend = match parsed.scheme() {
            "file" => {
                if parsed
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(bad(
                        "file:// urls take no host; write file:///absolute/path",
                    ));
                }
                let path = parsed
                    .to_file_path()
                    .map_err(|_| bad("not an absolute local path"))?;
                Backend::Local(Arc::new(LocalDir { root: path }))
            }
            scheme @ ("s3" | "gs" | "az") => {
                let bucket = parsed
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| bad("the url names no bucket"))?;
                let prefix = parsed.path().trim_matches('/').to_string();
                let store: Arc<dyn ObjectStore> = match scheme {
                    "s3" => {
                        // Every PUT carries the body's SHA-256 (x-amz-checksum-sha256): S3
                        // refuses a body that arrives short or altered instead of storing it.
                        let mut b = object_store::aws::AmazonS3Builder::from_env()
                            .with_bucket_name(bucket)
                            .with_checksum_algorithm(object_store::aws::Checksum::SHA256);
                        if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL") {
                            b = b.with_endpoint(ep);
                        }
                        Arc::new(b.build().map_err(|e| bad(&e.to_string()))?)
                    }
                    "gs" => Arc::new(
                        object_store::gcp::GoogleCloudStorageBuilder::from_env()
                            .with_bucket_name(bucket)
                            .build()
                            .map_err(|e| bad(&e.to_string()))?,
                    ),
                    _ => Arc::new(
                        object_store::azure::MicrosoftAzureBuilder::from_env()
                            .with_container_name(bucket)
                            .build()
                            .map_err(|e| bad(&e.to_string()))?,
                    ),
                };
                Backend::Object { store, prefix }
            }
            other => return Err(bad(&format!("scheme {other:?} is not supported"))),
        };
        Ok(Store {
            url: url.to_string(),
            crypt: Arc::new(sealing::Crypt::new(backend.clone())),
            backend,
            root_prefix: String::new(),
        })
    }

    /// The same storage seen under `sub` (a key prefix ending in `/`, e.g. a nested system's
    /// `systems/<id>/`): keys of the child are keys of this store with `sub` in front.
    pub fn child(&self, sub: &str) -> Store {
        let sub = sub.trim_end_matches('/');
        let backend = match &self.backend {
            Backend::Local(l) => Backend::Local(Arc::new(LocalDir {
                root: l.root.join(sub),
            })),
            Backend::Object { store, prefix } => Backend::Object {
                store: store.clone(),
                prefix: if prefix.is_empty() {
                    sub.to_string()
                } else {
                    format!("{prefix}/{sub}")
                },
            },
        };
        Store {
            url: format!("{}/{sub}", self.url.trim_end_matches('/')),
            backend,
            crypt: self.crypt.clone(),
            root_prefix: format!("{}{sub}/", self.root_prefix),
        }
    }

    /// The URL this store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stores `data` under `key` unless the key exists. `Ok` means durable.
    async fn raw_put_create(&self, key: &str, data: Bytes) -> Result<()> {
        match &self.backend {
            Backend::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                blocking(move || l.put_create(&key, &data)).await
            }
            Backend::Object { store, prefix } => {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                let len = data.len() as u64;
                let path = obj_path(prefix, key);
                store
                    .put_opts(&path, PutPayload::from_bytes(data), opts)
                    .await
                    .map_err(|e| map_os_err(key, e))?;
                // A PUT answered 200 is not trusted by itself (a proxy or a store can lie, or
                // store a short body): the stored size must be the size sent, or the write
                // fails and is never acknowledged (the body's SHA-256 travelled with it).
                match stored_size(store, &path, key).await? {
                    Some(stored) if stored == len => Ok(()),
                    Some(stored) => {
                        // The create-only PUT succeeded, so the short object is this write's
                        // own: remove it, or a retry would meet it and take it for the data.
                        let removed = store.delete(&path).await.is_ok();
                        Err(lied(
                            key,
                            &format!(
                                "holds {stored} of the {len} bytes sent{}",
                                if removed {
                                    " (the short object was removed)"
                                } else {
                                    "; the short object could not be removed"
                                }
                            ),
                        ))
                    }
                    None => Err(lied(key, "does not hold it")),
                }
            }
        }
    }

    /// Stores `data` under `key`, replacing an existing object atomically: every reader sees the
    /// old object or the new one whole (S1). Only expire's repack uses it, to relocate the chunk
    /// references of a manifest (FORMAT.md 16.5). `Ok` means durable.
    async fn raw_put_replace(&self, key: &str, data: Bytes) -> Result<()> {
        match &self.backend {
            Backend::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                blocking(move || l.put_replace(&key, &data)).await
            }
            Backend::Object { store, prefix } => {
                let len = data.len() as u64;
                let path = obj_path(prefix, key);
                store
                    .put_opts(&path, PutPayload::from_bytes(data), PutOptions::default())
                    .await
                    .map_err(|e| map_os_err(key, e))?;
                match stored_size(store, &path, key).await? {
                    Some(stored) if stored == len => Ok(()),
                    Some(stored) => Err(lied(
                        key,
                        &format!("holds {stored} of the {len} bytes sent"),
                    )),
                    None => Err(lied(key, "does not hold it")),
                }
            }
        }
    }

    /// Reads a whole object, refusing objects larger than `max` bytes before reading them.
    async fn raw_get(&self, key: &str, max: u64) -> Result<Bytes> {
        match &self.backend {
            Backend::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                blocking(move || l.get(&key, max)).await
            }
            Backend::Object { store, prefix } => {
                let res = store
                    .get_opts(&obj_path(prefix, key), GetOptions::default())
                    .await
                    .map_err(|e| map_os_err(key, e))?;
                if res.meta.size > max {
                    return Err(StoreError::TooLarge {
                        key: key.to_string(),
                        size: res.meta.size,
                        max,
                    });
                }
                let size = res.meta.size;
                let bytes = res.bytes().await.map_err(|e| map_os_err(key, e))?;
                if bytes.len() as u64 != size {
                    return Err(StoreError::Io {
                        key: key.into(),
                        message: format!("read {} of {size} bytes", bytes.len()),
                        retryable: true,
                    });
                }
                Ok(bytes)
            }
        }
    }

    /// Reads `range` of an object; fails unless the whole range was returned.
    /// `exact`: fail unless the whole range was returned; otherwise the range may run past the
    /// end of the object and the bytes up to its end are returned.
    async fn raw_get_range(&self, key: &str, range: Range<u64>, exact: bool) -> Result<Bytes> {
        let want = range.end.saturating_sub(range.start);
        let bytes = match &self.backend {
            Backend::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                let r = range.clone();
                blocking(move || l.get_range(&key, r, exact)).await?
            }
            Backend::Object { store, prefix } => {
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(range.clone())),
                    ..Default::default()
                };
                let res = store
                    .get_opts(&obj_path(prefix, key), opts)
                    .await
                    .map_err(|e| map_os_err(key, e))?;
                res.bytes().await.map_err(|e| map_os_err(key, e))?
            }
        };
        if (exact && bytes.len() as u64 != want) || bytes.len() as u64 > want {
            return Err(StoreError::Io {
                key: key.to_string(),
                message: format!("range {range:?} returned {} bytes", bytes.len()),
                retryable: true,
            });
        }
        Ok(bytes)
    }

    /// Removes what dead writers left of `file://` uploads (temporary files last modified
    /// before `older_than`); object stores keep nothing of a failed single PUT. Returns how many.
    pub async fn sweep_temporaries(&self, older_than: std::time::SystemTime) -> Result<u64> {
        match &self.backend {
            Backend::Local(l) => {
                let l = l.clone();
                blocking(move || {
                    l.sweep_temporaries(older_than)
                        .map_err(|e| local::io_err("", e))
                })
                .await
            }
            Backend::Object { .. } => Ok(0),
        }
    }

    /// Size of an object, or `None` when it does not exist.
    async fn raw_head(&self, key: &str) -> Result<Option<u64>> {
        let r = match &self.backend {
            Backend::Local(l) => {
                let l = l.clone();
                let key = key.to_string();
                blocking(move || l.head(&key)).await
            }
            Backend::Object { store, prefix } => store
                .head(&obj_path(prefix, key))
                .await
                .map(|m| m.size)
                .map_err(|e| map_os_err(key, e)),
        };
        match r {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes an object; deleting a missing object succeeds.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let r = match &self.backend {
            Backend::Local(l) => {
                let path = l.path(key);
                let k = key.to_string();
                blocking(move || std::fs::remove_file(&path).map_err(|e| io_err(&k, e))).await
            }
            Backend::Object { store, prefix } => store
                .delete(&obj_path(prefix, key))
                .await
                .map_err(|e| map_os_err(key, e)),
        };
        match r {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }

    /// Stores a content-addressed object (its key names the hash of `data`, as a pack's does)
    /// create-only. An object already under the key is never trusted for existing: it is read
    /// back whole and compared with `data`, and one that differs (cut short or damaged by the
    /// store, or left by a write that was never acknowledged) is replaced by `data`, which is
    /// right by construction. `Ok` means the key holds exactly `data`, durably.
    pub async fn put_content_addressed(&self, key: &str, data: Bytes) -> Result<()> {
        match self.put_create(key, data.clone()).await {
            Err(StoreError::AlreadyExists { .. }) => {}
            r => return r,
        }
        let stored = match self.get(key, data.len() as u64).await {
            Ok(b) if b == data => return Ok(()),
            Ok(b) => format!(
                "holds {} bytes that differ from the {} expected",
                b.len(),
                data.len()
            ),
            // Larger than the object it names, or not openable: damaged either way.
            Err(e @ (StoreError::TooLarge { .. } | StoreError::Sealed { .. })) => e.to_string(),
            // Deleted since (by an expire that condemned it): store it anew.
            Err(e) if e.is_not_found() => return self.put_create(key, data).await,
            Err(e) => return Err(e),
        };
        tracing::warn!(key, stored = %stored, hint = "the store lost or cut an earlier upload of this object, or it was altered; it is stored again whole; run 'tidemark-restore check --read-data' to find other damage", "stored object {key} is damaged; replacing it");
        self.put_replace(key, data).await
    }

    /// Checks that the store honours create-only writes: some S3-compatible servers silently
    /// overwrite instead, which would let a conflicting WAL segment replace an archived one.
    pub async fn probe_create_only(&self) -> Result<bool> {
        let key = format!("probe/create-only-{}-{}", std::process::id(), unique());
        // Raw writes: the probe holds no data, and runs before an encrypted repository is
        // unlocked (its key is no repository object, FORMAT.md 3).
        self.raw_put_create(&key, Bytes::from_static(b"first"))
            .await?;
        let second = self
            .raw_put_create(&key, Bytes::from_static(b"second"))
            .await;
        let kept = self.raw_get(&key, 16).await;
        let _ = self.delete(&key).await;
        match second {
            Err(StoreError::AlreadyExists { .. }) => {
                Ok(kept.map(|b| &b[..] == b"first").unwrap_or(false))
            }
            Ok(()) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every object whose key starts with `prefix` (a directory-like prefix ending in `/`),
    /// sorted by key.
    async fn raw_list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = match &self.backend {
            Backend::Local(l) => {
                let l = l.clone();
                let p = prefix.to_string();
                blocking(move || l.list(&p)).await?
            }
            Backend::Object {
                store,
                prefix: root,
            } => {
                let full = obj_path(root, prefix.trim_end_matches('/'));
                let strip = if root.is_empty() {
                    String::new()
                } else {
                    format!("{root}/")
                };
                let metas: Vec<_> = store
                    .list(Some(&full))
                    .try_collect()
                    .await
                    .map_err(|e| map_os_err(prefix, e))?;
                metas
                    .into_iter()
                    .filter_map(|m| {
                        let k = m
                            .location
                            .as_ref()
                            .strip_prefix(strip.as_str())?
                            .to_string();
                        Some(Listed {
                            key: k,
                            size: m.size,
                            modified_us: Some(m.last_modified.timestamp_micros()),
                        })
                    })
                    .collect()
            }
        };
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// The size of the object at `path` as the store reports it now, `None` when it does not exist.
async fn stored_size(
    store: &Arc<dyn ObjectStore>,
    path: &ObjPath,
    key: &str,
) -> Result<Option<u64>> {
    match store.head(path).await.map_err(|e| map_os_err(key, e)) {
        Ok(m) => Ok(Some(m.size)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// A PUT answered with success that the store does not hold as sent: never acknowledged, and
/// worth retrying (the object was not stored, or its short copy was removed).
fn lied(key: &str, what: &str) -> StoreError {
    StoreError::Io {
        key: key.to_string(),
        message: format!("the store answered the upload with success but {what}\nhint: the object store or a proxy in front of it lost or cut the upload; the write was not acknowledged and is safe to retry"),
        retryable: true,
    }
}

fn obj_path(prefix: &str, key: &str) -> ObjPath {
    if prefix.is_empty() {
        ObjPath::from(key)
    } else {
        ObjPath::from(format!("{prefix}/{key}"))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            key: String::new(),
            message: format!("storage task failed: {e}"),
            retryable: false,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_create_only_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
        store
            .put_create("a/b/c", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let err = store
            .put_create("a/b/c", Bytes::from_static(b"other"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists { .. }));
        assert_eq!(&store.get("a/b/c", 100).await.unwrap()[..], b"hello");
        assert!(matches!(
            store.get("a/b/c", 2).await,
            Err(StoreError::TooLarge { .. })
        ));
        assert_eq!(&store.get_range("a/b/c", 1..3).await.unwrap()[..], b"el");
        assert!(store.get_range("a/b/c", 1..30).await.is_err());
        assert!(store.get("nope", 100).await.unwrap_err().is_not_found());
        assert_eq!(store.head("a/b/c").await.unwrap(), Some(5));
        assert_eq!(store.head("zz").await.unwrap(), None);
        let l = store.list("a/").await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].key, "a/b/c");
    }

    #[tokio::test]
    async fn a_content_addressed_object_is_compared_never_trusted_for_existing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
        let data = Bytes::from_static(b"the whole pack");
        // A short copy left by an upload the store cut: replaced, not reused.
        store
            .put_create("packs/ab/x", data.slice(..4))
            .await
            .unwrap();
        store
            .put_content_addressed("packs/ab/x", data.clone())
            .await
            .unwrap();
        assert_eq!(store.get("packs/ab/x", 100).await.unwrap(), data);
        // The same bytes again: left as they are.
        store
            .put_content_addressed("packs/ab/x", data.clone())
            .await
            .unwrap();
        assert_eq!(store.get("packs/ab/x", 100).await.unwrap(), data);
        // A longer object under the key is damaged too.
        store
            .put_replace("packs/ab/y", Bytes::from_static(b"the whole pack and more"))
            .await
            .unwrap();
        store
            .put_content_addressed("packs/ab/y", data.clone())
            .await
            .unwrap();
        assert_eq!(store.get("packs/ab/y", 100).await.unwrap(), data);
    }

    #[test]
    fn rejects_bad_urls() {
        for u in ["/tmp/x", "ftp://x/y", "file://host/x", "s3:///prefix"] {
            assert!(
                matches!(Store::open(u), Err(StoreError::BadUrl { .. })),
                "{u}"
            );
        }
    }
}
