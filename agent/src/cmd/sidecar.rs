//! `sidecar --pgdata DIR`: continuous WAL archiving next to PostgreSQL.

use anyhow::Result;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tidemark_core::cli::RepoArgs;
use tidemark_core::sidecar::{self, SidecarOptions};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// PostgreSQL's data directory (shared with the database container)
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
    /// Directory for the Unix socket wal-push hands segments to (shared with the database container)
    #[arg(long, env = "TIDEMARK_SOCKET_DIR")]
    socket_dir: Option<PathBuf>,
    /// Directory for the sidecar's small durable state
    #[arg(long, env = "TIDEMARK_STATE_DIR", default_value = "/var/lib/tidemark")]
    state_dir: PathBuf,
    /// Address for GET /healthz and GET /metrics
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:9187")]
    listen: SocketAddr,
    /// Uploads in flight at most
    #[arg(long, env = "TIDEMARK_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// Seconds to let uploads in flight finish after SIGTERM
    #[arg(long, env = "TIDEMARK_GRACE", default_value_t = 20)]
    grace: u64,
    /// Seconds between listings of archive_status when no file event arrives
    #[arg(long, env = "TIDEMARK_RESCAN", default_value_t = 2)]
    rescan: u64,
    /// zstd compression level for WAL objects
    #[arg(long, env = "TIDEMARK_WAL_COMPRESS_LEVEL", default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    compress_level: i32,
    /// Run even if the store overwrites existing objects (unsafe)
    #[arg(long)]
    allow_overwriting_store: bool,
    /// Archive into a repository that belongs to another database system, as a new system of it
    /// (needed only when it is not a major upgrade, which is recognised by itself)
    #[arg(long, env = "TIDEMARK_ACCEPT_NEW_SYSTEM")]
    accept_new_system: bool,
    /// How often /metrics re-reads the repository's health gauges (listings and manifest
    /// headers only), e.g. 5m; 0s turns them off (units s, m, h, d, w)
    #[arg(long, env = "TIDEMARK_HEALTH_INTERVAL", default_value = "5m")]
    health_interval: String,
}

pub async fn run(a: Args) -> Result<()> {
    let store = a.repo.open()?;
    let health_interval = super::exporter::interval("--health-interval", &a.health_interval)?;
    let opts = SidecarOptions {
        pgdata: a.pgdata,
        socket_dir: a.socket_dir,
        state_dir: a.state_dir,
        listen: Some(a.listen),
        concurrency: a.concurrency,
        grace: Duration::from_secs(a.grace),
        rescan: Duration::from_secs(a.rescan.max(1)),
        compress_level: a.compress_level,
        allow_overwriting_store: a.allow_overwriting_store,
        accept_new_system: a.accept_new_system,
        health_interval: (!health_interval.is_zero()).then_some(health_interval),
    };
    sidecar::run(store, opts).await
}
