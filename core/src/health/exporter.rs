//! The exporter daemon: [`RepoGauges`] refreshed every `interval` and served over HTTP
//! (`/metrics`, `/healthz`) until SIGTERM or SIGINT.
//!
//! Invariants: `/healthz` answers 503 once no refresh was attempted for three intervals (the
//! refresh task is stuck, e.g. on a hanging store); a failed refresh is no reason to restart the
//! exporter, so it stays healthy and reports `tidemark_repository_refresh_success 0` instead.

use super::RepoGauges;
use crate::sidecar::http;
use crate::store::Store;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ExporterOptions {
    pub listen: SocketAddr,
    pub interval: Duration,
}

struct Exporter {
    gauges: Arc<RepoGauges>,
    started: i64,
    interval: Duration,
}

impl http::Status for Exporter {
    fn metrics_text(&self) -> String {
        super::append("", &self.gauges.text())
    }

    fn healthy(&self) -> bool {
        let last = self.gauges.last_attempt().max(self.started);
        let limit = 3 * self.interval.as_secs().max(1) as i64 + 60;
        chrono::Utc::now().timestamp() - last <= limit
    }
}

/// Serves the gauges of `store` until SIGTERM or SIGINT.
pub async fn run(store: Store, opts: ExporterOptions) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let exporter = Arc::new(Exporter {
        gauges: Arc::default(),
        started: chrono::Utc::now().timestamp(),
        interval: opts.interval,
    });
    http::serve(exporter.clone(), opts.listen).await?;
    tracing::info!(
        repo = store.url(),
        interval_s = opts.interval.as_secs(),
        "exporter started"
    );
    exporter.gauges.spawn(store, opts.interval);
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("exporter stopped");
    Ok(())
}
