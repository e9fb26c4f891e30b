//! `key add|remove|list`: the user keys that open an encrypted repository. Rotating a key
//! rewraps the repository's master key; no data is re-encrypted (FORMAT.md 17.3).

use anyhow::{Context, Result};
use tidemark_core::cli::RepoArgs;
use tidemark_core::encryption;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Let another key open the repository (the current key is needed)
    Add(AddArgs),
    /// Stop a key from opening the repository; run it with a key that stays
    Remove(RemoveArgs),
    /// List the keyring; with a key given, which entry it opens
    List(ListArgs),
}

#[derive(clap::Args)]
struct AddArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// File holding the new key; it may also come from TIDEMARK_NEW_KEY or --new-key-command
    #[arg(
        long = "new-key-file",
        env = "TIDEMARK_NEW_KEY_FILE",
        value_name = "PATH"
    )]
    new_key_file: Option<std::path::PathBuf>,
    /// Command whose standard output is the new key
    #[arg(
        long = "new-key-command",
        env = "TIDEMARK_NEW_KEY_COMMAND",
        value_name = "COMMAND",
        hide_env_values = true
    )]
    new_key_command: Option<String>,
}

#[derive(clap::Args)]
struct RemoveArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The keyring entry to remove (its id, as `key list` shows it)
    key_id: String,
}

#[derive(clap::Args)]
struct ListArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> Result<()> {
    match a.cmd {
        Cmd::Add(a) => {
            let store = a.repo.open()?;
            let new = encryption::read_user_key(
                a.new_key_file.as_deref(),
                "TIDEMARK_NEW_KEY",
                a.new_key_command.as_deref(),
                "new key",
            )?
            .context("no new key given\nhint: --new-key-file PATH, TIDEMARK_NEW_KEY or --new-key-command")?;
            let id = encryption::add_key(&store, &new).await?;
            println!("{id}");
            eprintln!("added keyring entry {id}; remove the old key's entry with `tidemark-agent key remove <id>` run with the new key");
        }
        Cmd::Remove(a) => {
            let store = a.repo.open()?;
            encryption::remove_key(&store, &a.key_id).await?;
            eprintln!("removed keyring entry {}", a.key_id);
        }
        Cmd::List(a) => {
            let store = a.repo.open()?;
            let keys = encryption::list_keys(&store).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "{:<34} {:<34} {:>10}  opens with the given key",
                    "key id", "created", "iterations"
                );
                for k in keys {
                    let opens = match k.opens_with_given_key {
                        Some(true) => "yes",
                        Some(false) => "no",
                        None => "-",
                    };
                    println!(
                        "{:<34} {:<34} {:>10}  {opens}",
                        k.key_id, k.created, k.iterations
                    );
                }
            }
        }
    }
    Ok(())
}
