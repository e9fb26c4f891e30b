//! `exporter --listen ADDR`: the repository's health gauges (`tidemark_core::health`) at
//! `GET /metrics`, for setups without a sidecar (one exporter per repository).

use anyhow::{anyhow, bail, Result};
use std::net::SocketAddr;
use std::time::Duration;
use tidemark_core::cli::RepoArgs;
use tidemark_core::health::{self, ExporterOptions};
use tidemark_core::retention::parse_duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Address for GET /metrics and GET /healthz
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:9188")]
    listen: SocketAddr,
    /// Time between two reads of the repository (listings and manifest headers only), e.g. 5m
    /// (units s, m, h, d, w)
    #[arg(long, env = "TIDEMARK_HEALTH_INTERVAL", default_value = "5m")]
    interval: String,
}

/// A duration option in retention's units (`5m`, `30s`); `0s` is zero.
pub fn interval(flag: &str, v: &str) -> Result<Duration> {
    let us = parse_duration(v).ok_or_else(|| {
        anyhow!("{flag} {v:?} is not a duration\nhint: write a number and a unit: 30s, 5m, 1h")
    })?;
    Ok(Duration::from_micros(us.max(0) as u64))
}

pub async fn run(a: Args) -> Result<()> {
    let store = a.repo.open()?;
    let every = interval("--interval", &a.interval)?;
    if every.is_zero() {
        bail!("--interval {:?} is zero\nhint: give the time between two reads of the repository, e.g. 5m", a.interval);
    }
    health::run_exporter(
        store,
        ExporterOptions {
            listen: a.listen,
            interval: every,
        },
    )
    .await
}
