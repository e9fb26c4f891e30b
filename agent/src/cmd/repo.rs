//! `repo init`: create a repository before any database writes into it. Only needed for an
//! encrypted one made ahead of time (a repository is otherwise created by the first `wal-push`
//! or `backup`, encrypted when a key is given).

use anyhow::{bail, Result};
use tidemark_core::cli::RepoArgs;
use tidemark_core::encryption;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Create an encrypted repository (its keyring); the first writer binds it to its database
    Init(InitArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Encrypt the repository with the key given by --key-file, TIDEMARK_KEY or --key-command
    #[arg(long)]
    encryption: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let Cmd::Init(a) = a.cmd;
    if !a.encryption {
        bail!("`repo init` creates encrypted repositories only\nhint: add --encryption and a key; an unencrypted repository is created by the first wal-push or backup");
    }
    let store = a.repo.open()?;
    let id = encryption::init(&store).await?;
    println!("{id}");
    eprintln!("created encrypted repository {} (keyring entry {id}); keep the key safe: without it nothing in the repository can be restored", store.url());
    Ok(())
}
