//! Writes the golden test vectors to `format-spec/vectors/`.
//!
//! Run with `cargo run -p tidemark-format --example gen_vectors`. The output is deterministic for
//! a given zstd library version; `tests/vectors.rs` fails if a file and its generator disagree.

#[path = "../tests/golden/mod.rs"]
mod golden;

use std::path::Path;

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in golden::all() {
        let path = dir.join(name);
        std::fs::write(&path, &bytes)?;
        println!("{:>6} bytes  {}", bytes.len(), path.display());
    }
    Ok(())
}
