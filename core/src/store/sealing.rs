//! Sealing: in an encrypted repository (FORMAT.md 17) every object passes through an envelope
//! on its way in and out, below every caller. The public object API of [`Store`] lives here;
//! the raw backend calls are in `store.rs`.
//!
//! A store is in one of three states, shared by every clone and child of one opened repository:
//! plain (no key given: objects are stored as they are, and an envelope read is refused with a
//! hint to give the key), unknown (a key was given, the repository is not unlocked yet: only
//! the config and keyring may be read, see `crate::encryption`), sealed (the data keys are known).

use super::{Backend, Listed, Result, Store, StoreError};
use bytes::Bytes;
use std::ops::Range;
use std::sync::{Arc, PoisonError, RwLock};
use tidemark_format::seal::{self, ChunkIds, DataKeys};
use zeroize::Zeroizing;

/// Objects larger than this are sealed and opened on a blocking thread.
const INLINE_CRYPTO: usize = 256 << 10;

/// A user key: the secret that unwraps a repository's master key. Never printed.
#[derive(Clone)]
pub struct UserKey {
    bytes: Arc<Zeroizing<Vec<u8>>>,
    /// Where it came from, for messages: "--key-file /path", "TIDEMARK_KEY", "--key-command".
    pub source: String,
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserKey(from {})", self.source)
    }
}

impl UserKey {
    pub fn new(bytes: Zeroizing<Vec<u8>>, source: String) -> UserKey {
        UserKey {
            bytes: Arc::new(bytes),
            source,
        }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[derive(Clone)]
enum State {
    Plain,
    Unknown,
    Sealed(Arc<DataKeys>),
}

pub(super) struct Crypt {
    /// The repository root's backend: where the keyring lives, whatever store is asking.
    root: Backend,
    user_key: Option<UserKey>,
    state: RwLock<State>,
}

impl Crypt {
    pub(super) fn new(root: Backend) -> Crypt {
        Crypt {
            root,
            user_key: None,
            state: RwLock::new(State::Plain),
        }
    }

    fn state(&self) -> State {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, s: State) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = s;
    }
}

enum Mode {
    Plain,
    Sealed(Arc<DataKeys>, String),
}

fn damaged(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Sealed {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

async fn cpu<T: Send + 'static>(
    big: bool,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if big {
        super::blocking(f).await
    } else {
        f()
    }
}

impl Store {
    /// This store, asking for `key` to unlock an encrypted repository (see `crate::encryption`).
    /// Only `RepoArgs::open` and tests call it, on a freshly opened store.
    pub fn with_user_key(mut self, key: UserKey) -> Store {
        self.crypt = Arc::new(Crypt {
            root: self.crypt.root.clone(),
            user_key: Some(key),
            state: RwLock::new(State::Unknown),
        });
        self
    }

    /// The user key this store was opened with.
    pub fn user_key(&self) -> Option<&UserKey> {
        self.crypt.user_key.as_ref()
    }

    /// True once the store seals and opens objects (an unlocked encrypted repository).
    pub fn is_sealed(&self) -> bool {
        matches!(self.crypt.state(), State::Sealed(_))
    }

    /// Starts sealing with `keys` (after unlocking or creating an encrypted repository).
    pub(crate) fn set_data_keys(&self, keys: DataKeys) {
        self.crypt.set(State::Sealed(Arc::new(keys)));
    }

    /// Back to "not unlocked" (a writer that lost the race to create the repository).
    pub(crate) fn forget_data_keys(&self) {
        if self.crypt.user_key.is_some() {
            self.crypt.set(State::Unknown);
        }
    }

    /// How chunk ids are computed in this repository (FORMAT.md 8.2, 17.2).
    pub fn chunk_ids(&self) -> ChunkIds {
        match self.crypt.state() {
            State::Sealed(k) => k.chunk_ids().clone(),
            State::Plain | State::Unknown => ChunkIds::Sha256,
        }
    }

    /// The repository root's keyring as a plain store (keyring entries are not sealed: they are
    /// wrapped by user keys, FORMAT.md 17.3).
    pub(crate) fn keyring_store(&self) -> Store {
        Store {
            url: self.url.clone(),
            backend: self.crypt.root.clone(),
            crypt: Arc::new(Crypt::new(self.crypt.root.clone())),
            root_prefix: String::new(),
        }
    }

    /// `key`'s name from the repository root: what a sealed object is bound to.
    pub(crate) fn full_name(&self, key: &str) -> String {
        format!("{}{key}", self.root_prefix)
    }

    /// Reads an object as stored, whatever the state (the config, to learn whether the
    /// repository is encrypted).
    pub(crate) async fn get_stored(&self, key: &str, max: u64) -> Result<Bytes> {
        self.raw_get(key, max).await
    }

    /// Opens bytes read with [`Store::get_stored`] as the object `key`.
    pub(crate) fn open_stored(&self, key: &str, stored: &[u8]) -> Result<Bytes> {
        match self.mode(key)? {
            Mode::Plain if seal::is_sealed(stored) => Err(StoreError::Encrypted {
                key: key.to_string(),
            }),
            Mode::Plain => Ok(Bytes::copy_from_slice(stored)),
            Mode::Sealed(k, name) => seal::open(&k, &name, stored)
                .map(Bytes::from)
                .map_err(|e| damaged(key, e)),
        }
    }

    fn mode(&self, key: &str) -> Result<Mode> {
        match self.crypt.state() {
            State::Plain => Ok(Mode::Plain),
            State::Sealed(k) => Ok(Mode::Sealed(k, self.full_name(key))),
            State::Unknown => Err(StoreError::Locked {
                key: key.to_string(),
            }),
        }
    }

    async fn seal(&self, key: &str, data: Bytes) -> Result<Bytes> {
        match self.mode(key)? {
            Mode::Plain => Ok(data),
            Mode::Sealed(k, name) => {
                let key = key.to_string();
                cpu(data.len() > INLINE_CRYPTO, move || {
                    seal::seal(&k, &name, &data)
                        .map(Bytes::from)
                        .map_err(|e| damaged(&key, e))
                })
                .await
            }
        }
    }

    /// Stores `data` under `key` unless the key exists. `Ok` means durable.
    pub async fn put_create(&self, key: &str, data: Bytes) -> Result<()> {
        let data = self.seal(key, data).await?;
        self.raw_put_create(key, data).await
    }

    /// Stores `data` under `key`, replacing an existing object atomically: every reader sees the
    /// old object or the new one whole (S1). Only expire's repack uses it, to relocate the chunk
    /// references of a manifest (FORMAT.md 16.5). `Ok` means durable.
    pub async fn put_replace(&self, key: &str, data: Bytes) -> Result<()> {
        let data = self.seal(key, data).await?;
        self.raw_put_replace(key, data).await
    }

    /// Reads a whole object, refusing objects larger than `max` bytes before reading them.
    pub async fn get(&self, key: &str, max: u64) -> Result<Bytes> {
        match self.mode(key)? {
            Mode::Plain => {
                let b = self.raw_get(key, max).await?;
                if seal::is_sealed(&b) {
                    return Err(StoreError::Encrypted {
                        key: key.to_string(),
                    });
                }
                Ok(b)
            }
            Mode::Sealed(k, name) => {
                let stored = self.raw_get(key, seal::sealed_len(max)).await?;
                let key = key.to_string();
                cpu(stored.len() > INLINE_CRYPTO, move || {
                    seal::open(&k, &name, &stored)
                        .map(Bytes::from)
                        .map_err(|e| damaged(&key, e))
                })
                .await
            }
        }
    }

    /// Reads `range` of an object; fails unless the whole range was returned.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        match self.mode(key)? {
            Mode::Plain => {
                let b = self.raw_get_range(key, range.clone(), true).await?;
                if range.start == 0 && seal::is_sealed(&b) {
                    return Err(StoreError::Encrypted {
                        key: key.to_string(),
                    });
                }
                Ok(b)
            }
            Mode::Sealed(k, name) => {
                if range.end <= range.start {
                    return Ok(Bytes::new());
                }
                let read = seal::range_read(range);
                let stored = self.raw_get_range(key, read.stored.clone(), false).await?;
                let key = key.to_string();
                cpu(stored.len() > INLINE_CRYPTO, move || {
                    read.open(&k, &name, &stored)
                        .map(Bytes::from)
                        .map_err(|e| damaged(&key, e))
                })
                .await
            }
        }
    }

    /// Size of an object (its plaintext size in an encrypted repository), or `None` when it
    /// does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>> {
        match self.mode(key)? {
            Mode::Plain => self.raw_head(key).await,
            Mode::Sealed(..) => match self.raw_head(key).await? {
                None => Ok(None),
                Some(s) => Ok(Some(seal::plain_len(s).map_err(|e| damaged(key, e))?)),
            },
        }
    }

    /// Every object whose key starts with `prefix` (a directory-like prefix ending in `/`),
    /// sorted by key, with its plaintext size (0 for a stored length no sealed object can have;
    /// reading it fails).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = self.raw_list(prefix).await?;
        if let Mode::Sealed(..) = self.mode(prefix)? {
            for l in &mut out {
                l.size = seal::plain_len(l.size).unwrap_or(0);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
