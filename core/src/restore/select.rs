//! Choosing the backup of a restore and reading its manifest: a chosen backup whose manifest
//! does not decode is passed over (never one named by `--backup`), and a manifest that cannot be
//! used gets the hint a restore gives.

use crate::manifest_file::LocalManifest;
use crate::repo;
use crate::store::Store;
use anyhow::{anyhow, Result};
use tidemark_format::FormatError;

/// Reads a manifest fully; a manifest that does not decode gets a hint (it was checksummed, so
/// a writer made it so or someone crafted it).
pub(super) async fn load(store: &Store, id: &str) -> Result<LocalManifest> {
    LocalManifest::load(store, id).await.map_err(hinted)
}

fn undecodable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<FormatError>().is_some())
}

fn hinted(e: anyhow::Error) -> anyhow::Error {
    if undecodable(&e) {
        anyhow!("{e:#}\nhint: nothing was restored; the repository is damaged or was tampered with: restore another backup (an earlier --target-time) and run 'tidemark-restore check'")
    } else {
        e
    }
}

/// Chooses the backup for `want` and reads its whole manifest. A chosen backup whose manifest
/// does not decode is left out with a warning and the choice made again among the others (the
/// result is as exact, only older: more WAL to replay); a backup named by `--backup` is never
/// replaced, and a storage error is an error.
pub(crate) async fn select_loaded(
    store: &Store,
    want: &crate::archive::Want,
) -> Result<(crate::archive::Selection, LocalManifest)> {
    let mut backups = repo::list_backups(store).await?;
    loop {
        let sel = crate::archive::select_among(store, backups.clone(), want).await?;
        match LocalManifest::load(store, &sel.chosen.backup_id).await {
            Ok(m) => return Ok((sel, m)),
            Err(e) if want.backup.is_none() && undecodable(&e) => {
                tracing::warn!(
                    backup = %sel.chosen.backup_id,
                    "backup {} is left out: {e:#}; choosing again among the other backups",
                    sel.chosen.backup_id
                );
                backups.retain(|b| b.backup_id != sel.chosen.backup_id);
            }
            Err(e) => return Err(hinted(e)),
        }
    }
}
