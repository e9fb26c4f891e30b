//! The one error type of the format crate. Every variant names the object being decoded.

/// Why a byte string is not a valid repository object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what} is truncated: needed {needed} more bytes")]
    Truncated { what: &'static str, needed: u64 },
    #[error("{what} has bad magic {found:?}, expected {expected:?}")]
    BadMagic {
        what: &'static str,
        found: [u8; 4],
        expected: [u8; 4],
    },
    #[error("{what} has format version {found}, this build reads major version {max} only\nhint: upgrade tidemark to a release that reads format version {found}")]
    UnsupportedVersion {
        what: &'static str,
        found: u16,
        max: u16,
    },
    #[error("{what} checksum mismatch: expected {expected}, actual {actual}")]
    ChecksumMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{what} is invalid: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// The bytes could not be read from where they are kept (a local file holding a copy).
    #[error("cannot read {what}: {reason}")]
    Source { what: &'static str, reason: String },
    #[error("{what} is too large: {size} bytes, at most {max} allowed")]
    TooLarge {
        what: &'static str,
        size: u64,
        max: u64,
    },
}

impl FormatError {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        FormatError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}
