//! Keyring entries (key `keyring/<key id>`, format 1.2, FORMAT.md 17.3): an encrypted
//! repository's random 32-byte master key, wrapped by one user key. Several entries may wrap the
//! same master key (key rotation adds one, then removes the old one), so changing the user key
//! never re-encrypts data.
//!
//! The wrapping key is PBKDF2-HMAC-SHA256(user key, salt, iterations); the master key is sealed
//! with AES-256-GCM under it (zero nonce: every entry has its own salt, hence its own wrapping
//! key), with every preceding byte of the entry as associated data.

use crate::codec::{Reader, Writer};
use crate::error::FormatError;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use std::num::NonZeroU32;

pub const MAGIC: [u8; 4] = *b"TMKR";
const WHAT: &str = "keyring entry";
/// Exact size: header 8, key id 16, created_us 8, kdf 1, iterations 4, salt 16, wrapped 48.
pub const SIZE: usize = 101;
/// Key derivation 1: PBKDF2-HMAC-SHA256.
pub const KDF_PBKDF2_SHA256: u8 = 1;
/// Iterations written by this release. Every `wal-push` process derives the key once, so this
/// is a trade between guessing cost and archive_command latency (~30 ms here); user keys are
/// meant to be random (32 bytes from a generator), not passphrases.
pub const DEFAULT_ITERATIONS: u32 = 100_000;
/// Bounds a reader accepts: a hostile entry must not make unlocking take hours.
pub const ITERATIONS: std::ops::RangeInclusive<u32> = 10_000..=10_000_000;
/// Shortest user key accepted.
pub const MIN_USER_KEY: usize = 16;
/// Longest user key accepted (a key file is read with this cap).
pub const MAX_USER_KEY: usize = 4096;

/// One keyring entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyringEntry {
    /// The minor version in the entry's header (part of the sealed associated data).
    pub minor: u16,
    /// Random id, also the entry's key (`keyring/<32 hex digits>`).
    pub key_id: [u8; 16],
    /// When the entry was added, microseconds since the Unix epoch (UTC).
    pub created_us: i64,
    pub iterations: u32,
    pub salt: [u8; 16],
    /// The master key sealed under the wrapping key: 32 bytes and the 16-byte tag.
    pub wrapped: [u8; 48],
}

fn wrapping_key(user_key: &[u8], salt: &[u8; 16], iterations: u32) -> LessSafeKey {
    let mut k = [0u8; 32];
    let iters = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iters,
        salt,
        user_key,
        &mut k,
    );
    LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &k).expect("32 bytes is an AES-256 key"))
}

impl KeyringEntry {
    /// Wraps `master` under `user_key`.
    pub fn wrap(
        master: &[u8; 32],
        user_key: &[u8],
        key_id: [u8; 16],
        salt: [u8; 16],
        iterations: u32,
        created_us: i64,
    ) -> KeyringEntry {
        let mut e = KeyringEntry {
            minor: crate::FORMAT_MINOR_ENCRYPTION,
            key_id,
            created_us,
            iterations,
            salt,
            wrapped: [0; 48],
        };
        let aad = e.prefix();
        let mut buf = master.to_vec();
        let tag = wrapping_key(user_key, &salt, iterations)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(aad),
                &mut buf,
            )
            .expect("32 bytes are within AES-GCM's limits");
        e.wrapped[..32].copy_from_slice(&buf);
        e.wrapped[32..].copy_from_slice(tag.as_ref());
        e
    }

    /// The master key, or `None` when `user_key` is not the key this entry was wrapped with
    /// (or the entry was altered).
    pub fn unwrap_master(&self, user_key: &[u8]) -> Option<[u8; 32]> {
        let mut buf = self.wrapped.to_vec();
        let plain = wrapping_key(user_key, &self.salt, self.iterations)
            .open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(self.prefix()),
                &mut buf,
            )
            .ok()?;
        plain.try_into().ok()
    }

    /// Every byte before `wrapped`: the associated data of the seal.
    fn prefix(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.header_minor(MAGIC, self.minor);
        w.raw(&self.key_id);
        w.i64(self.created_us);
        w.u8(KDF_PBKDF2_SHA256);
        w.u32(self.iterations);
        w.raw(&self.salt);
        w.finish()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.prefix();
        b.extend_from_slice(&self.wrapped);
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        if buf.len() != SIZE {
            return Err(FormatError::invalid(
                WHAT,
                format!("{} bytes, a keyring entry is exactly {SIZE}", buf.len()),
            ));
        }
        let mut r = Reader::new(WHAT, buf);
        let minor = r.header(MAGIC)?;
        let key_id = r.array()?;
        let created_us = r.i64()?;
        let kdf = r.u8()?;
        if kdf != KDF_PBKDF2_SHA256 {
            return Err(FormatError::invalid(
                WHAT,
                format!("key derivation {kdf} is unknown (1 = PBKDF2-HMAC-SHA256)"),
            ));
        }
        let iterations = r.u32()?;
        if !ITERATIONS.contains(&iterations) {
            return Err(FormatError::invalid(
                WHAT,
                format!("{iterations} iterations is outside {ITERATIONS:?}"),
            ));
        }
        let salt = r.array()?;
        let wrapped = r.array()?;
        r.expect_end()?;
        Ok(KeyringEntry {
            minor,
            key_id,
            created_us,
            iterations,
            salt,
            wrapped,
        })
    }

    /// The entry's key id as printed and used in its key: 32 lowercase hex digits.
    pub fn id_hex(&self) -> String {
        hex::encode(self.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KeyringEntry {
        KeyringEntry::wrap(
            &[9; 32],
            b"correct horse battery staple",
            [1; 16],
            [2; 16],
            10_000,
            1_765_000_000_000_000,
        )
    }

    #[test]
    fn round_trip_and_unwrap() {
        let e = sample();
        let b = e.encode();
        assert_eq!(b.len(), SIZE);
        assert_eq!(&b[4..8], &[1, 0, 2, 0]);
        let d = KeyringEntry::decode(&b).unwrap();
        assert_eq!(d, e);
        assert_eq!(
            d.unwrap_master(b"correct horse battery staple"),
            Some([9; 32])
        );
        assert_eq!(d.unwrap_master(b"correct horse battery stapLe"), None);
    }

    #[test]
    fn altered_entries_do_not_unwrap_or_decode() {
        let b = sample().encode();
        for at in 8..SIZE {
            let mut t = b.clone();
            t[at] ^= 1;
            if let Ok(e) = KeyringEntry::decode(&t) {
                assert_eq!(
                    e.unwrap_master(b"correct horse battery staple"),
                    None,
                    "flip at {at}"
                );
            }
        }
        assert!(KeyringEntry::decode(&b[..SIZE - 1]).is_err());
        let mut huge = b.clone();
        huge[33..37].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            KeyringEntry::decode(&huge).is_err(),
            "iterations are capped"
        );
    }
}
