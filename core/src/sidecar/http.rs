//! The HTTP endpoints of the sidecar and of `exporter` (`crate::health`): `GET /healthz` (200
//! `ok`, or 503 `unhealthy` when the daemon has stalled or is stopping) and `GET /metrics`
//! (OpenMetrics text). Every other path is 404. Nothing here changes the daemon's state.

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;

/// What the endpoints ask of the daemon.
pub(crate) trait Status: Send + Sync + 'static {
    /// The metrics, encoded as OpenMetrics text.
    fn metrics_text(&self) -> String;
    /// False once the scan loop has stalled or the daemon is stopping.
    fn healthy(&self) -> bool;
}

/// Listens on `addr` and serves the endpoints in the background.
pub(crate) async fn serve<S: Status>(status: Arc<S>, addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "serving /healthz and /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let status = status.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (code, ctype, body) = respond(status.as_ref(), req.uri().path());
                        async move {
                            Response::builder()
                                .status(code)
                                .header("content-type", ctype)
                                .body(Full::new(Bytes::from(body)))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// Status code, content type and body for a request of `path`.
fn respond<S: Status>(status: &S, path: &str) -> (StatusCode, &'static str, String) {
    match path {
        "/metrics" => (
            StatusCode::OK,
            // prometheus-client encodes OpenMetrics text.
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            status.metrics_text(),
        ),
        "/healthz" if status.healthy() => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/healthz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "unhealthy\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    }
}
