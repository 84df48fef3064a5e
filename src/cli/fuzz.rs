//! `supra fuzz`: mutation fuzzing of every reader of user files (see `supra::fuzz`).

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use supra::fuzz::Target;

#[derive(Args)]
pub(crate) struct FuzzArgs {
    /// Corpus directory of real inputs: model.gguf, hf/, state.safetensors, task.jsonl,
    /// journal.jsonl, data/ (`cargo run --release --example fuzz_corpus -- DIR` writes one).
    pub(crate) corpus: PathBuf,
    /// Mutated inputs to read, spread evenly over the targets.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) iterations: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Working directory (a copy of the corpus; inputs that panicked are kept in
    /// SCRATCH/failures) [default: a temporary directory, kept only if something panicked].
    #[arg(long)]
    pub(crate) scratch: Option<PathBuf>,
    /// Only these readers, comma-separated (gguf, safetensors, config_json, tokenizer_json,
    /// state, task, journal, token_cache) [default: all].
    #[arg(long, value_delimiter = ',', value_parser = parse_target)]
    pub(crate) targets: Vec<Target>,
    /// Also write the report as JSON.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

fn parse_target(s: &str) -> std::result::Result<Target, String> {
    Target::ALL
        .into_iter()
        .find(|t| {
            serde_json::to_value(t)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                == Some(s.to_string())
        })
        .ok_or_else(|| format!("unknown fuzz target {s:?}"))
}

pub(crate) fn fuzz(a: &FuzzArgs) -> Result<()> {
    let targets = if a.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        a.targets.clone()
    };
    let tmp = tempfile::tempdir()?;
    let scratch = a
        .scratch
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let report = supra::fuzz::run(&a.corpus, &scratch, &targets, a.iterations, a.seed)?;
    println!("| reader | tried | accepted | refused | panicked |\n|---|---:|---:|---:|---:|");
    for (t, c) in &report.targets {
        println!(
            "| {} | {} | {} | {} | {} |",
            serde_json::to_value(t)?.as_str().unwrap_or_default(),
            c.tried,
            c.accepted,
            c.refused,
            c.panicked
        );
    }
    eprintln!(
        "{} inputs in {:.1} s (seed {}), peak memory {:.0} MiB",
        a.iterations, report.seconds, report.seed, report.peak_rss_mib
    );
    if let Some(p) = &a.json {
        supra::io::atomic_write(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if !report.panics.is_empty() {
        if a.scratch.is_none() {
            // Keep the inputs that panicked.
            let _ = tmp.keep();
        }
        for (t, msg, input) in &report.panics {
            eprintln!("panic reading {t:?} ({}): {msg}", input.display());
        }
        bail!("{} inputs panicked", report.panics.len());
    }
    Ok(())
}
