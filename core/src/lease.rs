//! Repository leases on object storage (FORMAT.md section 16): `locks/backup-<nonce>` is held by
//! every running backup (shared), `locks/expire-<nonce>` by the one running expire (exclusive).
//!
//! Invariants:
//! - A lease object is written create-only and never modified; a heartbeat renews it by writing a
//!   new object (new nonce, later expiry) *before* deleting the previous one, so at every moment at
//!   least one object of a live holder is listed.
//! - A holder treats its lease as lost as soon as a renewal has not succeeded before the stored
//!   expiry minus a margin (by its own clock), or its object vanished (another process judged it
//!   stale). A lost lease stays lost: a renewal that succeeds too late (the holder was paused) does
//!   not revive it. A lost lease makes [`LeaseHandle::check`] fail, and callers check before every
//!   destructive or committing step.
//! - Releasing waits for a renewal in flight, then deletes the current object, so a released lease
//!   leaves no object behind. Dropping a handle without releasing stops its renewals.
//! - Another process judges a lease stale only when its expiry plus [`CLOCK_SKEW`] has passed, or
//!   it was written on this host by a process that no longer exists.

use crate::store::{Store, StoreError};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark_format::keys;
use tidemark_format::lock::{Lease, LeaseKind};

/// How long a lease object is valid after each renewal.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Clock difference between hosts tolerated before another host's lease counts as stale.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Lease TTL: [`DEFAULT_TTL`], or `TIDEMARK_LEASE_TTL_SECS` (tests use short TTLs).
pub fn ttl() -> Duration {
    std::env::var("TIDEMARK_LEASE_TTL_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s >= 3)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TTL)
}

pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// This host's name (best effort; leases also carry the pid).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A fresh 32-hex-digit nonce: sha256 of time, pid, a counter and the host name.
pub fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(now_us().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(hostname().as_bytes());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.update(t.subsec_nanos().to_le_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// A lease found in the repository.
#[derive(Clone, Debug)]
pub struct Listed {
    pub key: String,
    pub lease: Lease,
}

impl Listed {
    /// Whether the holder may still be running.
    pub fn is_live(&self, now: i64) -> bool {
        let l = &self.lease;
        if l.host == hostname() && !l.host.is_empty() && !pid_alive(l.pid) {
            return false;
        }
        now <= l.expires_us.saturating_add(CLOCK_SKEW.as_micros() as i64)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} lease {} held by pid {} on host {:?} since {}, valid until {}",
            self.lease.kind.word(),
            self.key,
            self.lease.pid,
            self.lease.host,
            crate::repo::fmt_time(self.lease.created_us),
            crate::repo::fmt_time(self.lease.expires_us)
        )
    }
}

fn pid_alive(pid: u32) -> bool {
    if !std::path::Path::new("/proc/self").exists() {
        return true; // cannot tell: rely on the expiry
    }
    // A zombie (exited, not yet reaped) no longer runs.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Every lease in the repository. A lease listed but gone when read was being renewed or
/// released; the listing is then repeated so a renewal is never missed.
pub async fn list(store: &Store) -> Result<Vec<Listed>> {
    'again: for _ in 0..5 {
        let listed = store
            .list(keys::LOCKS)
            .await
            .context("cannot list leases")?;
        let mut out = Vec::new();
        for l in listed {
            if keys::parse_lease(&l.key).is_none() {
                continue;
            }
            match store.get(&l.key, 4096).await {
                Ok(b) => {
                    let lease = Lease::decode_for_key(&l.key, &b)
                        .with_context(|| format!("lease {} is unreadable", l.key))?;
                    out.push(Listed { key: l.key, lease });
                }
                Err(e) if e.is_not_found() => continue 'again,
                Err(e) => return Err(e).with_context(|| format!("cannot read lease {}", l.key)),
            }
        }
        return Ok(out);
    }
    bail!("leases kept changing while being listed\nhint: retry; many backups are starting or ending at once")
}

struct State {
    key: String,
    expires_us: i64,
    lost: Option<String>,
}

/// A lease this process holds, renewed by a background task until released.
pub struct LeaseHandle {
    store: Store,
    kind: LeaseKind,
    state: Arc<Mutex<State>>,
    /// Tells the heartbeat to stop at its next wait; dropping it does too.
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseHandle {
    /// Writes a new lease object of `kind` and starts renewing it every third of the TTL.
    pub async fn acquire(store: &Store, kind: LeaseKind) -> Result<LeaseHandle> {
        let ttl = ttl();
        let created = now_us();
        let (key, expires_us) = write(store, kind, created, ttl).await?;
        let state = Arc::new(Mutex::new(State {
            key,
            expires_us,
            lost: None,
        }));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(heartbeat(
            store.clone(),
            kind,
            created,
            ttl,
            state.clone(),
            stopped,
        ));
        Ok(LeaseHandle {
            store: store.clone(),
            kind,
            state,
            stop,
            task,
        })
    }

    /// The key of the current lease object.
    pub fn key(&self) -> String {
        self.state.lock().map(|s| s.key.clone()).unwrap_or_default()
    }

    /// Fails unless the lease is certainly still held: not marked lost, not past its expiry
    /// (minus a sixth of the TTL as margin for the next step), and its object still exists.
    pub async fn check(&self) -> Result<()> {
        let key = self.check_local()?;
        match self.store.head(&key).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => bail!("the {} lease {key} was removed by another process that judged it stale\nhint: nothing more is deleted or committed by this run; check for clock skew between hosts and rerun", self.kind.word()),
            Err(e) => Err(e).with_context(|| format!("cannot confirm the lease {key}")),
        }
    }

    /// The part of [`LeaseHandle::check`] that needs no request: not marked lost and not past
    /// its expiry minus the margin. Returns the current lease key.
    pub fn check_local(&self) -> Result<String> {
        let margin = (ttl() / 6).as_micros() as i64;
        let (key, expires, lost) = {
            let s = self
                .state
                .lock()
                .map_err(|_| anyhow!("lease state poisoned"))?;
            (s.key.clone(), s.expires_us, s.lost.clone())
        };
        if let Some(why) = lost {
            bail!("lost the {} lease: {why}\nhint: nothing more is deleted or committed by this run; rerun it", self.kind.word());
        }
        if now_us() + margin > expires {
            bail!("the {} lease {key} expired before it could be renewed\nhint: nothing more is deleted or committed by this run; rerun it", self.kind.word());
        }
        Ok(key)
    }

    /// Stops renewing and deletes the lease object. A renewal in flight is finished first:
    /// aborting it could leave its new object (or the old one) behind, live until TTL + skew.
    pub async fn release(self) -> Result<()> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let key = self.state.lock().map(|s| s.key.clone()).unwrap_or_default();
        self.store
            .delete(&key)
            .await
            .with_context(|| format!("cannot delete the lease {key}"))
    }
}

async fn write(
    store: &Store,
    kind: LeaseKind,
    created: i64,
    ttl: Duration,
) -> Result<(String, i64)> {
    let expires_us = now_us() + ttl.as_micros() as i64;
    let lease = Lease {
        kind,
        created_us: created,
        expires_us,
        pid: std::process::id(),
        host: hostname(),
    };
    let key = keys::lease(kind, &nonce()).ok_or_else(|| anyhow!("bad lease nonce"))?;
    match store.put_create(&key, Bytes::from(lease.encode())).await {
        Ok(()) => Ok((key, expires_us)),
        Err(StoreError::AlreadyExists { .. }) => {
            bail!("lease key {key} already exists (nonce collision)")
        }
        Err(e) => Err(e).with_context(|| format!("cannot write the lease {key}")),
    }
}

async fn heartbeat(
    store: Store,
    kind: LeaseKind,
    created: i64,
    ttl: Duration,
    state: Arc<Mutex<State>>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let period = ttl / 3;
    let margin = (ttl / 6).as_micros() as i64;
    let mark_lost = |why: String| {
        if let Ok(mut s) = state.lock() {
            s.lost = Some(why);
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            // Released, or the handle was dropped.
            _ = stopped.changed() => return,
        }
        let (old, old_expires) = match state.lock() {
            Ok(s) => (s.key.clone(), s.expires_us),
            Err(_) => return,
        };
        // Too late to renew (paused, or renewals kept failing): others may already judge the
        // lease stale, so it must not come back.
        let too_late = || {
            (now_us() + margin > old_expires).then(|| {
                format!(
                    "lease object {old} was not renewed before {} (the process was paused or storage was unreachable)",
                    crate::repo::fmt_time(old_expires - margin)
                )
            })
        };
        if let Some(why) = too_late() {
            mark_lost(why);
            return;
        }
        match store.head(&old).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                mark_lost(format!("lease object {old} was removed by another process"));
                return;
            }
            Err(e) => {
                tracing::warn!(key = %old, error = %e, hint = "retried until the lease expires; the run stops before its next delete or manifest write if it cannot renew", "cannot confirm the lease; retrying");
                continue;
            }
        }
        match write(&store, kind, created, ttl).await {
            Ok((key, expires_us)) => {
                if let Some(why) = too_late() {
                    let _ = store.delete(&key).await;
                    mark_lost(why);
                    return;
                }
                if let Ok(mut s) = state.lock() {
                    s.key = key;
                    s.expires_us = expires_us;
                }
                if let Err(e) = store.delete(&old).await {
                    tracing::warn!(error = %e, key = %old, hint = "harmless: a leftover lease object expires and the next expire removes it", "cannot delete the previous lease object");
                }
            }
            Err(e) => {
                tracing::warn!(key = %old, error = %format!("{e:#}"), hint = "retried until the lease expires; the run stops before its next delete or manifest write if it cannot renew", "cannot renew the lease; retrying")
            }
        }
    }
}

/// Registers a running backup: writes its shared lease, then waits while an expire holds the
/// exclusive lease (an expire that started first may be deleting packs this backup would
/// otherwise deduplicate against). Fails after `timeout`, but never before the lease of a crashed
/// expire on another host has had time to go stale (TTL + [`CLOCK_SKEW`]).
pub async fn begin_backup(store: &Store, timeout: Duration) -> Result<LeaseHandle> {
    let lease = LeaseHandle::acquire(store, LeaseKind::Backup).await?;
    let wait = timeout.max(ttl() + CLOCK_SKEW + Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let now = now_us();
        let expire = list(store)
            .await?
            .into_iter()
            .find(|l| l.lease.kind == LeaseKind::Expire && l.is_live(now));
        let Some(e) = expire else { return Ok(lease) };
        if tokio::time::Instant::now() > deadline {
            let _ = lease.release().await;
            bail!("an expire is running in this repository: {}\nhint: wait for it to finish; if its process is gone, its lease expires at the time shown", e.describe());
        }
        tracing::info!(lease = %e.describe(), "waiting for a running expire to finish");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&format!("file://{}", d.path().display())).expect("store");
        (d, s)
    }

    #[tokio::test]
    async fn lease_is_listed_live_and_released() {
        let (_d, s) = store();
        let h = LeaseHandle::acquire(&s, LeaseKind::Backup).await.unwrap();
        let l = list(&s).await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].key, h.key());
        assert!(l[0].is_live(now_us()));
        h.check().await.unwrap();
        h.release().await.unwrap();
        assert!(list(&s).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn lost_lease_is_detected_before_the_next_step() {
        let (_d, s) = store();
        let h = LeaseHandle::acquire(&s, LeaseKind::Expire).await.unwrap();
        // Another process judged it stale and removed it.
        s.delete(&h.key()).await.unwrap();
        let e = h.check().await.unwrap_err().to_string();
        assert!(e.contains("removed by another process"), "{e}");
        h.release().await.unwrap();
    }

    #[tokio::test]
    async fn stale_by_expiry_or_dead_local_pid() {
        let now = now_us();
        let mk = |pid: u32, host: &str, expires_us: i64| Listed {
            key: "locks/backup-x".into(),
            lease: Lease {
                kind: LeaseKind::Backup,
                created_us: now,
                expires_us,
                pid,
                host: host.into(),
            },
        };
        let far = now + 3_600_000_000;
        assert!(mk(std::process::id(), &hostname(), far).is_live(now));
        // pid 0 is never a user process: a lease of this host naming it is stale.
        assert!(!mk(0, &hostname(), far).is_live(now));
        // Another host: only the expiry (plus skew) counts.
        assert!(mk(0, "elsewhere", far).is_live(now));
        let skew = CLOCK_SKEW.as_micros() as i64;
        assert!(mk(0, "elsewhere", now - skew + 1_000_000).is_live(now));
        assert!(!mk(0, "elsewhere", now - skew - 1_000_000).is_live(now));
    }

    #[tokio::test]
    async fn backup_waits_for_a_live_expire() {
        let (_d, s) = store();
        let x = LeaseHandle::acquire(&s, LeaseKind::Expire).await.unwrap();
        let s2 = s.clone();
        let b = tokio::spawn(async move { begin_backup(&s2, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!b.is_finished(), "the backup did not wait for the expire");
        x.release().await.unwrap();
        let lease = tokio::time::timeout(Duration::from_secs(5), b)
            .await
            .expect("the backup went on once the expire ended")
            .unwrap()
            .unwrap();
        lease.release().await.unwrap();
    }
}
