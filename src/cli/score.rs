//! `supra score`: per-token log-probabilities, or held-out perplexity over windows.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use supra::model::llama::{Form, Llama};

use super::model::{BranchesArg, ModelArg};
use super::read_text;

#[derive(Args)]
pub(crate) struct ScoreArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// Score these files: .txt, .txt.gz or .jsonl (a "text" field per line), or directories of
    /// them. Several documents need --window.
    #[arg(long, num_args = 1.., conflicts_with = "prompt", required_unless_present = "prompt")]
    pub(crate) text: Vec<PathBuf>,
    /// Score this text.
    #[arg(long)]
    pub(crate) prompt: Option<String>,
    /// Print one JSON object {token_ids, logprobs, nll, ppl}; logprobs[i] = log p(token_ids[i+1] | token_ids[..=i]).
    #[arg(long)]
    pub(crate) json: bool,
    /// How the sequence is read: parallel (the training form in one chunk), chunked (the
    /// inference form) or recurrent (one token at a time through the state). All three agree;
    /// only SUPRA and window layers compute differently.
    #[arg(long, default_value = "chunked", value_parser = ["parallel", "chunked", "recurrent"])]
    pub(crate) mode: String,
    /// Held-out perplexity: score each document in non-overlapping windows of this many tokens
    /// (each window's first token is not scored). --json then prints {files, documents, window,
    /// tokens, nll, ppl} without per-token log-probs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    pub(crate) window: Option<u64>,
    /// With --window: score at most the first N tokens of each document.
    #[arg(long, requires = "window")]
    pub(crate) max_tokens: Option<usize>,
    #[command(flatten)]
    pub(crate) branches: BranchesArg,
    /// Run the model with every weight and activation in f64: the definition, against which
    /// the f32 forward and other implementations (the PyTorch package) are checked. With
    /// --mode parallel (the definition's form; the fast forms are f32 only).
    #[arg(long, conflicts_with = "window")]
    pub(crate) f64: bool,
}

pub(crate) fn score(a: &ScoreArgs) -> Result<()> {
    if let Some(window) = a.window {
        return score_windows(a, window as usize);
    }
    let text = match (a.text.as_slice(), &a.prompt) {
        ([p], _) => read_text(p)?,
        ([], Some(t)) => t.clone(),
        ([], None) => bail!("give --text FILE or --prompt TEXT"),
        (files, _) => bail!(
            "{} files given: score several documents with --window N",
            files.len()
        ),
    };
    let form: Form = a.mode.parse()?;
    let (loaded, mut model) = a.model.load()?;
    if a.f64 {
        if !matches!(form, Form::Parallel) {
            bail!("--f64 runs the parallel form only (--mode parallel): the fast forms are f32");
        }
        let m64 = loaded.to_dtype(candle_core::DType::F64)?;
        model = Llama::new(&m64.config, &m64.weights)?;
    }
    a.branches.apply(&mut model)?;
    let ids = loaded.tokenizer.encode(&text)?;
    if ids.len() < 2 {
        bail!(
            "the text has {} token(s); scoring needs at least 2",
            ids.len()
        );
    }
    let spinner =
        indicatif::ProgressBar::new_spinner().with_message(format!("scoring {} tokens", ids.len()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let logprobs = model.score_with(&ids, form)?;
    spinner.finish_and_clear();
    let nll = -logprobs.iter().map(|&x| x as f64).sum::<f64>() / logprobs.len() as f64;
    if a.json {
        let v = serde_json::json!({ "token_ids": ids, "logprobs": logprobs, "nll": nll, "ppl": nll.exp(),
            "branches": a.branches.branches });
        println!("{v}");
    } else {
        println!("tokens      {}", ids.len());
        println!("nll         {nll:.4} nats/token");
        println!("perplexity  {:.3}", nll.exp());
    }
    Ok(())
}

/// Perplexity over every document of `a.text` (or the prompt) in windows of `window` tokens.
pub(crate) fn score_windows(a: &ScoreArgs, window: usize) -> Result<()> {
    let (files, docs) = if a.text.is_empty() {
        let prompt = a
            .prompt
            .clone()
            .context("give --text PATH... or --prompt TEXT")?;
        (Vec::new(), vec![prompt])
    } else {
        let (files, _skipped) = supra::train::data::list_files(&a.text)?;
        let mut docs = Vec::new();
        for f in &files {
            docs.extend(supra::train::data::read_documents(f)?);
        }
        (files, docs)
    };
    let form: Form = a.mode.parse()?;
    let (loaded, mut model) = a.model.load()?;
    a.branches.apply(&mut model)?;
    // Each window's pass allocates and frees the same buffers: keep their pages (as eval).
    supra::heap::keep_freed_for_reuse();
    let limit = a.max_tokens.unwrap_or(usize::MAX);
    let docs: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| {
            Ok(loaded
                .tokenizer
                .encode(d)?
                .into_iter()
                .take(limit)
                .collect())
        })
        .collect::<Result<_>>()?;
    let windows: usize = docs.iter().map(|d| d.len().div_ceil(window)).sum();
    let bar = indicatif::ProgressBar::new(windows as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "scoring {bar:30} {pos}/{len} windows [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    let (mut nll_sum, mut tokens) = (0.0f64, 0usize);
    for ids in docs.iter().filter(|d| d.len() >= 2) {
        let done = bar.position();
        let p = supra::eval::perplexity::perplexity(&model, form, ids, window, 1, |n| {
            bar.set_position(done + n as u64)
        })?;
        nll_sum += p.nll * p.tokens as f64;
        tokens += p.tokens;
    }
    bar.finish_and_clear();
    if tokens == 0 {
        bail!("nothing to score: every document has fewer than 2 tokens");
    }
    let nll = nll_sum / tokens as f64;
    if a.json {
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let v = serde_json::json!({ "files": files, "documents": docs.len(), "window": window,
            "tokens": tokens, "nll": nll, "ppl": nll.exp(), "branches": a.branches.branches });
        println!("{v}");
    } else {
        println!("documents   {}", docs.len());
        println!("tokens      {tokens} (windows of {window})");
        println!("nll         {nll:.4} nats/token");
        println!("perplexity  {:.3}", nll.exp());
    }
    Ok(())
}
