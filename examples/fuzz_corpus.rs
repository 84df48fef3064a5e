//! Writes the corpus `supra fuzz` mutates: `cargo run --release --example fuzz_corpus -- DIR`
//! (scripts/fuzz.sh runs it).

#[path = "../tests/common/testing.rs"]
#[allow(dead_code)]
mod testing;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).context("usage: fuzz_corpus DIR")?;
    testing::write_fuzz_corpus(std::path::Path::new(&dir))
}
