//! Encrypted repositories (FORMAT.md 17): unlocking one with a user key, creating one, and
//! rotating the user keys that wrap its master key.
//!
//! Rules: a repository is encrypted exactly when its `config` is sealed (or, before the first
//! writer, when `keyring/` holds an entry); a key given for an unencrypted repository, or no key
//! for an encrypted one, is refused (never mixed); a wrong key fails at the first read with a
//! message naming where the key came from.

use crate::store::{Store, StoreError, UserKey};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ring::rand::{SecureRandom, SystemRandom};
use tidemark_format::keyring::{self, KeyringEntry};
use tidemark_format::keys;
use tidemark_format::seal::{self, DataKeys};

/// Largest keyring entry read.
const MAX_ENTRY: u64 = 4096;

/// Reads a user key from where the operator put it: a file (`--key-file`, a Kubernetes Secret
/// mounted as a file), the `TIDEMARK_KEY` environment variable, or the standard output of a
/// command (`--key-command`, for KMS or Vault CLIs). Never from the command line itself. One
/// trailing newline is dropped. `what` names the option family in messages ("key", "new key").
pub fn read_user_key(
    file: Option<&std::path::Path>,
    env_var: &str,
    command: Option<&str>,
    what: &str,
) -> Result<Option<UserKey>> {
    let env = std::env::var_os(env_var).filter(|v| !v.is_empty());
    let given = file.is_some() as u8 + env.is_some() as u8 + command.is_some() as u8;
    if given > 1 {
        bail!("the {what} is given more than one way (file, {env_var}, command)\nhint: give it exactly one way");
    }
    let (bytes, source) = if let Some(path) = file {
        let f = std::fs::File::open(path)
            .with_context(|| format!("cannot open the {what} file {}", path.display()))?;
        let mut buf = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(f, keyring::MAX_USER_KEY as u64 + 2),
            &mut buf,
        )
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
        (buf, format!("file {}", path.display()))
    } else if let Some(v) = env {
        use std::os::unix::ffi::OsStringExt;
        (v.into_vec(), env_var.to_string())
    } else if let Some(cmd) = command {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run the {what} command"))?;
        if !out.status.success() {
            bail!(
                "the {what} command failed ({})\nhint: run it by hand; its standard output must be the key",
                out.status
            );
        }
        (out.stdout, "the key command".to_string())
    } else {
        return Ok(None);
    };
    let mut bytes = zeroize::Zeroizing::new(bytes);
    let strip = if bytes.ends_with(b"\r\n") {
        2
    } else {
        bytes.ends_with(b"\n") as usize
    };
    let keep = bytes.len() - strip;
    bytes.truncate(keep);
    if bytes.len() < keyring::MIN_USER_KEY || bytes.len() > keyring::MAX_USER_KEY {
        bail!(
            "the {what} from {source} is {} bytes; it must be {}..={} bytes\nhint: make one with `openssl rand -base64 32`",
            bytes.len(),
            keyring::MIN_USER_KEY,
            keyring::MAX_USER_KEY
        );
    }
    Ok(Some(UserKey::new(bytes, source)))
}

/// Every readable keyring entry of the repository, oldest first. An entry that does not decode
/// is reported and skipped: one damaged entry must not lock out the others.
pub async fn entries(store: &Store) -> Result<Vec<KeyringEntry>> {
    let ks = store.keyring_store();
    let listed = ks
        .list(keys::KEYRING)
        .await
        .context("cannot list the repository keyring")?;
    let mut out = Vec::new();
    for l in listed {
        if keys::parse_keyring_entry(&l.key).is_none() {
            continue;
        }
        let e = ks
            .get(&l.key, MAX_ENTRY)
            .await
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(KeyringEntry::decode(&b)?));
        match e {
            Ok(e) if keys::keyring_entry(&e.id_hex()).as_deref() == Some(l.key.as_str()) => {
                out.push(e)
            }
            Ok(_) => tracing::warn!(key = %l.key, "keyring entry names another key id; ignored"),
            Err(e) => {
                tracing::warn!(key = %l.key, error = %format!("{e:#}"), "unreadable keyring entry; ignored")
            }
        }
    }
    out.sort_by_key(|e| e.created_us);
    Ok(out)
}

async fn unwrap(e: &KeyringEntry, key: &UserKey) -> Result<Option<[u8; 32]>> {
    let (e, key) = (e.clone(), key.clone());
    Ok(tokio::task::spawn_blocking(move || e.unwrap_master(key.bytes())).await?)
}

/// The master key `key` unwraps: from the first entry (oldest first) that it opens and whose
/// master key opens `check` (the stored config, when there is one), with that entry.
async fn find_master(
    store: &Store,
    key: &UserKey,
    all: &[KeyringEntry],
    check: Option<&[u8]>,
) -> Result<Option<([u8; 32], KeyringEntry)>> {
    let name = store.full_name(keys::CONFIG);
    for e in all {
        let Some(m) = unwrap(e, key).await? else {
            continue;
        };
        if check.is_none_or(|c| seal::open(&DataKeys::derive(&m), &name, c).is_ok()) {
            return Ok(Some((m, e.clone())));
        }
    }
    Ok(None)
}

fn wrong_key(store: &Store, key: &UserKey, tried: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "the key from {} does not open repository {} (tried {tried} keyring entries)\nhint: check that the key is this repository's; `tidemark-agent key list` shows its keyring",
        key.source,
        store.url()
    )
}

/// The plaintext of the stored config bytes: unlocks the repository when they are sealed, and
/// refuses to mix an encrypted repository with a missing key or a key with a plain repository.
pub(crate) async fn open_config(store: &Store, stored: Bytes) -> Result<Bytes> {
    if !seal::is_sealed(&stored) {
        if let Some(k) = store.user_key() {
            bail!(
                "repository {} is not encrypted, but a key was given ({}): refused, an encrypted and a plain repository are never mixed\nhint: remove the key settings for this repository, or point them at a new repository, which will be created encrypted",
                store.url(),
                k.source
            );
        }
        return Ok(stored);
    }
    if !store.is_sealed() {
        let Some(key) = store.user_key() else {
            return Err(StoreError::Encrypted {
                key: keys::CONFIG.into(),
            })
            .with_context(|| format!("repository {} is encrypted", store.url()));
        };
        let all = entries(store).await?;
        let Some((m, _)) = find_master(store, key, &all, Some(&stored)).await? else {
            return Err(wrong_key(store, key, all.len()));
        };
        store.set_data_keys(DataKeys::derive(&m));
    }
    store
        .open_stored(keys::CONFIG, &stored)
        .with_context(|| format!("repository {} has an unreadable config", store.url()))
}

/// Before the first writer creates the config: makes sure objects will be sealed when the
/// repository is (or is to be) encrypted. Returns the keyring entry it created, if any, which
/// the caller removes with [`abandon`] should another writer's config win the race.
pub(crate) async fn prepare_create(store: &Store) -> Result<Option<String>> {
    if store.is_sealed() {
        return Ok(None);
    }
    let all = entries(store).await?;
    let Some(key) = store.user_key() else {
        if !all.is_empty() {
            bail!(
                "repository {} is initialised for encryption ({} keyring entries) and no key was given: refused, nothing is written unencrypted into it\nhint: give the repository's key with --key-file / TIDEMARK_KEY_FILE, TIDEMARK_KEY or --key-command",
                store.url(),
                all.len()
            );
        }
        return Ok(None);
    };
    if !all.is_empty() {
        let Some((m, _)) = find_master(store, key, &all, None).await? else {
            return Err(wrong_key(store, key, all.len()));
        };
        store.set_data_keys(DataKeys::derive(&m));
        return Ok(None);
    }
    let id = create_keyring(store, key).await?;
    Ok(Some(keys::keyring_entry(&id).context("keyring entry id")?))
}

/// A new master key, wrapped under `key` in the repository's first keyring entry; the store
/// seals with it from now on. Returns the entry's id.
async fn create_keyring(store: &Store, key: &UserKey) -> Result<String> {
    let master = random::<32>()?;
    let id = store_entry(store, &master, key)
        .await
        .with_context(|| format!("cannot create the keyring of repository {}", store.url()))?;
    store.set_data_keys(DataKeys::derive(&master));
    tracing::info!(repo = %store.url(), key_id = %id, "created an encrypted repository");
    Ok(id)
}

/// After losing the race to create the config: forget the keys chosen and remove the keyring
/// entry created for them (nothing was sealed with them).
pub(crate) async fn abandon(store: &Store, created: Option<String>) {
    store.forget_data_keys();
    if let Some(k) = created {
        if let Err(e) = store.keyring_store().delete(&k).await {
            tracing::warn!(key = %k, error = %e, "cannot remove an unused keyring entry");
        }
    }
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the operating system's random number generator failed"))?;
    Ok(b)
}

/// Wraps `master` under `key` in a new keyring entry, stored create-only; returns its id.
async fn store_entry(store: &Store, master: &[u8; 32], key: &UserKey) -> Result<String> {
    let (id, salt) = (random::<16>()?, random::<16>()?);
    let (master, key) = (*master, key.clone());
    let now = chrono::Utc::now().timestamp_micros();
    let entry = tokio::task::spawn_blocking(move || {
        KeyringEntry::wrap(
            &master,
            key.bytes(),
            id,
            salt,
            keyring::DEFAULT_ITERATIONS,
            now,
        )
    })
    .await?;
    let k = keys::keyring_entry(&entry.id_hex()).context("keyring entry id")?;
    store
        .keyring_store()
        .put_create(&k, Bytes::from(entry.encode()))
        .await?;
    Ok(entry.id_hex())
}

/// `repo init --encryption`: a new encrypted repository, bound to no database system yet (the
/// first writer creates the config, sealed). Refuses a repository that exists.
pub async fn init(store: &Store) -> Result<String> {
    let Some(key) = store.user_key() else {
        bail!("an encrypted repository needs a key\nhint: give it with --key-file / TIDEMARK_KEY_FILE, TIDEMARK_KEY or --key-command; make one with `openssl rand -base64 32`");
    };
    if store.keyring_store().head(keys::CONFIG).await?.is_some()
        || !entries(store).await?.is_empty()
    {
        bail!(
            "repository {} exists already\nhint: `tidemark-agent key add` gives an existing encrypted repository another key",
            store.url()
        );
    }
    create_keyring(store, key).await
}

/// The master key and the entry the store's key opens, checked against the config if there
/// is one.
async fn current(store: &Store) -> Result<([u8; 32], KeyringEntry, Vec<KeyringEntry>)> {
    let Some(key) = store.user_key() else {
        bail!("managing the keys of an encrypted repository needs its current key\nhint: give it with --key-file / TIDEMARK_KEY_FILE, TIDEMARK_KEY or --key-command");
    };
    let config = match store
        .keyring_store()
        .get_stored(keys::CONFIG, 1 << 16)
        .await
    {
        Ok(b) => Some(b),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e).context("cannot read the repository config"),
    };
    if config.as_ref().is_some_and(|c| !seal::is_sealed(c)) {
        bail!(
            "repository {} is not encrypted\nhint: encryption is chosen when a repository is created; back up into a new encrypted repository",
            store.url()
        );
    }
    let all = entries(store).await?;
    let (m, e) = find_master(store, key, &all, config.as_deref())
        .await?
        .ok_or_else(|| wrong_key(store, key, all.len()))?;
    Ok((m, e, all))
}

/// `key add`: wraps the master key under `new` as well. Returns the new entry's id.
pub async fn add_key(store: &Store, new: &UserKey) -> Result<String> {
    let (master, _, all) = current(store).await?;
    if find_master(store, new, &all, None).await?.is_some() {
        bail!("the new key opens this repository already\nhint: `tidemark-agent key list` shows the keyring");
    }
    store_entry(store, &master, new)
        .await
        .context("cannot write the new keyring entry")
}

/// `key remove`: deletes the entry `id`. The key given must open another entry, so a working
/// key is proven to remain.
pub async fn remove_key(store: &Store, id: &str) -> Result<()> {
    let (_, mine, all) = current(store).await?;
    if !all.iter().any(|e| e.id_hex() == id) {
        bail!(
            "repository {} has no keyring entry {id}\nhint: `tidemark-agent key list` shows the entries",
            store.url()
        );
    }
    if mine.id_hex() == id {
        bail!("the key given opens entry {id}, the one to remove: refused, nothing would prove another key still opens the repository\nhint: run `key remove` with one of the keys that stay (e.g. the one `key add` just added)");
    }
    let k = keys::keyring_entry(id).context("keyring entry id")?;
    store
        .keyring_store()
        .delete(&k)
        .await
        .with_context(|| format!("cannot delete keyring entry {id}"))?;
    Ok(())
}

/// One row of `key list`.
#[derive(Debug, serde::Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub created: String,
    pub iterations: u32,
    /// Whether the key given opens this entry (`None` when no key was given).
    pub opens_with_given_key: Option<bool>,
}

/// `key list`: the keyring, and which entry the given key (if any) opens.
pub async fn list_keys(store: &Store) -> Result<Vec<KeyInfo>> {
    let all = entries(store).await?;
    let mut out = Vec::new();
    for e in &all {
        let opens = match store.user_key() {
            Some(k) => Some(unwrap(e, k).await?.is_some()),
            None => None,
        };
        out.push(KeyInfo {
            key_id: e.id_hex(),
            created: chrono::DateTime::from_timestamp_micros(e.created_us)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
            iterations: e.iterations,
            opens_with_given_key: opens,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_come_from_a_file_a_variable_or_a_command_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("key");
        std::fs::write(&f, "0123456789abcdefXYZ\n").expect("write");
        let k = read_user_key(Some(&f), "TIDEMARK_TEST_KEY_UNSET", None, "key")
            .expect("file")
            .expect("some");
        assert_eq!(k.bytes(), b"0123456789abcdefXYZ", "one newline dropped");
        assert!(k.source.contains("key"), "{}", k.source);
        let k = read_user_key(
            None,
            "TIDEMARK_TEST_KEY_UNSET",
            Some("printf 'abcdefghijklmnopq\\r\\n'"),
            "key",
        )
        .expect("command")
        .expect("some");
        assert_eq!(k.bytes(), b"abcdefghijklmnopq");
        assert!(read_user_key(None, "TIDEMARK_TEST_KEY_UNSET", None, "key")
            .expect("none")
            .is_none());
        let e =
            read_user_key(Some(&f), "TIDEMARK_TEST_KEY_UNSET", Some("true"), "key").unwrap_err();
        assert!(e.to_string().contains("more than one way"), "{e}");
        let e = read_user_key(None, "TIDEMARK_TEST_KEY_UNSET", Some("exit 3"), "key").unwrap_err();
        assert!(e.to_string().contains("command failed"), "{e}");
        std::fs::write(&f, "short").expect("write");
        let e = read_user_key(Some(&f), "TIDEMARK_TEST_KEY_UNSET", None, "key").unwrap_err();
        assert!(e.to_string().contains("openssl rand"), "{e}");
        let e = read_user_key(
            Some(&dir.path().join("missing")),
            "TIDEMARK_TEST_KEY_UNSET",
            None,
            "key",
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
