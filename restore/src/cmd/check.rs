//! `check [--read-data [--sample F]]`: is everything a restore needs present and sound?

use anyhow::{bail, Result};
use tidemark_core::check;
use tidemark_core::cli::{RepoArgs, SystemArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    system: SystemArgs,
    /// Also read, decompress and verify chunks against their sha256
    #[arg(long)]
    read_data: bool,
    /// Fraction of chunks read with --read-data (0 < F <= 1), so a nightly check stays cheap
    #[arg(long, default_value_t = 1.0)]
    sample: f64,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> Result<()> {
    if !(a.sample > 0.0 && a.sample <= 1.0) {
        bail!(
            "--sample {} is outside (0, 1]\nhint: --sample 0.05 reads one chunk in twenty",
            a.sample
        );
    }
    let store = a.system.select(&a.repo.open()?).await?.store;
    let r = check::run(&store, a.read_data, a.sample).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", check::render(&r));
    }
    if !r.problems.is_empty() {
        bail!(
            "{} problems found in repository {}",
            r.problems.len(),
            store.url()
        );
    }
    Ok(())
}
