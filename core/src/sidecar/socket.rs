//! The wal-push handoff socket, `<socket dir>/tidemark.sock`: `archive_command` (`wal-push
//! --socket-dir`) asks a running sidecar to archive a file and waits for its answer, so the
//! sidecar and PostgreSQL's archiver never upload the same file at once.
//!
//! Protocol: one request per connection, `PUSH <wal file name>\n` (at most 256 bytes), answered by
//! `OK\n` once the file is durably stored, or `ERR <reason>\n` (one line). No socket, no answer,
//! or an `ERR` saying the sidecar is shutting down all mean "no sidecar": [`handoff`] returns
//! `None` and the caller uploads the file itself.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_format::wal::WalFileName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

/// Name of the socket file inside the socket directory.
pub const SOCKET_NAME: &str = "tidemark.sock";

/// The answer to one request: `Ok` once durably stored, or why not.
pub(super) type Reply = Result<(), String>;

/// What the socket asks of the daemon.
pub(super) trait Archiver: Send + Sync + 'static {
    /// Asks for `name`, a valid WAL file name, to be archived; the answer arrives on the receiver.
    fn request(&self, name: &str) -> oneshot::Receiver<Reply>;
}

/// Binds the socket in `dir` (replacing a stale one) and answers requests in the background.
/// Returns the socket's path, for removal at shutdown.
pub(super) fn listen<A: Archiver>(archiver: Arc<A>, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    let path = dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(archiver.clone(), conn));
        }
    });
    Ok(path)
}

/// One request: `PUSH <wal file name>\n` → `OK\n` once durably stored, or `ERR <reason>\n`.
async fn serve<A: Archiver>(archiver: Arc<A>, conn: UnixStream) {
    let (rd, mut wr) = conn.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, 256));
    if rd.read_line(&mut line).await.is_err() {
        return;
    }
    let reply = match line.trim_end().strip_prefix("PUSH ") {
        Some(name) if WalFileName::parse(name).is_ok() => archiver
            .request(name)
            .await
            .unwrap_or_else(|_| Err("sidecar dropped the request".into())),
        _ => Err(format!("bad request {:?}", line.trim_end())),
    };
    let msg = match reply {
        Ok(()) => "OK\n".to_string(),
        Err(e) => format!("ERR {}\n", e.replace('\n', " ")),
    };
    let _ = wr.write_all(msg.as_bytes()).await;
}

/// Asks a running sidecar to archive `name`. `None` when no sidecar answered (the caller then
/// uploads itself); `Some(Ok)` only when the sidecar reports the file durably stored.
pub async fn handoff(socket_dir: &Path, name: &str) -> Option<Result<()>> {
    let mut conn = UnixStream::connect(socket_dir.join(SOCKET_NAME))
        .await
        .ok()?;
    conn.write_all(format!("PUSH {name}\n").as_bytes())
        .await
        .ok()?;
    let mut line = String::new();
    let mut rd = BufReader::new(conn);
    match rd.read_line(&mut line).await {
        Ok(n) if n > 0 => {}
        _ => return None,
    }
    let line = line.trim_end();
    if line == "OK" {
        Some(Ok(()))
    } else if let Some(e) = line.strip_prefix("ERR ") {
        if e.contains("shutting down") {
            None
        } else {
            Some(Err(anyhow::anyhow!(
                "sidecar could not archive {name}: {e}"
            )))
        }
    } else {
        None
    }
}
