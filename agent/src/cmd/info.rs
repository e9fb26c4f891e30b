//! `info`: backups and archived WAL per timeline, for every database system of the repository.

use anyhow::Result;
use tidemark_core::cli::RepoArgs;
use tidemark_core::info;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let store = a.repo.open()?;
    let i = info::collect_all(&store).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        print!("{}", info::render(&i));
    }
    Ok(())
}
