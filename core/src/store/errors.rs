//! Errors of the cloud backends turned into [`StoreError`]s.

use super::StoreError;

pub(super) fn map_os_err(key: &str, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound {
            key: key.to_string(),
        },
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            StoreError::AlreadyExists {
                key: key.to_string(),
            }
        }
        other => {
            let retryable = !matches!(
                other,
                object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            );
            StoreError::Io {
                key: key.to_string(),
                message: other.to_string(),
                retryable,
            }
        }
    }
}
