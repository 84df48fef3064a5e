//! `supra eval` and `supra compare`.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use supra::io::{self};

use super::model::{BranchesArg, ModelArg};
use super::{data_dir, read_text};

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    #[command(flatten)]
    pub(crate) branches: BranchesArg,
    /// Tasks: hellaswag, piqa, winogrande, arc_easy, arc_challenge, lambada_openai, mmlu (5-shot),
    /// mmlu_0shot, wikitext, all; or paths: .jsonl files of {"query": str, "choices": [str, ...],
    /// "gold": int} lines (multiple choice), .txt files (word and byte perplexity).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub(crate) tasks: Vec<String>,
    /// Score only the first N items of each task.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Shared data directory holding eval/ [default: $SUPRA_DATA_DIR or ../shared/data].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Also write the results, the model's config, versions and timings to this JSON file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Score every choice as a whole sequence instead of reading a context shared by
    /// consecutive requests (a question's choices, a few-shot header) once and copying its
    /// state (slower; the two agree).
    #[arg(long)]
    pub(crate) no_share_prefix: bool,
    /// Tokens per forward pass: requests are right-padded into batches of at most this many
    /// tokens (1: one request at a time).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) batch_tokens: u64,
    /// Continue an interrupted run: reuse the answers journaled beside the --json report
    /// (REPORT.partial.jsonl, removed once the report is written).
    #[arg(long, requires = "json")]
    pub(crate) resume: bool,
    /// Window of the perplexity tasks (wikitext, .txt files), in tokens [default: the model's
    /// context length].
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    pub(crate) max_length: Option<u64>,
}

pub(crate) fn eval(a: &EvalArgs) -> Result<()> {
    use supra::eval::{harness::Engine, journal::Journal, report, tasks::Task};
    let mut tasks: Vec<Task> = Vec::new();
    for name in &a.tasks {
        for t in Task::parse(name)? {
            if !tasks.contains(&t) {
                tasks.push(t);
            }
        }
    }
    let dir = data_dir(&a.data_dir);
    let (loaded, mut model) = a.model.load()?;
    a.branches.apply(&mut model)?;
    // Every forward pass allocates and frees the same buffers (its logits alone are tens of
    // MB): kept in the process, their pages are not faulted in and zeroed again each pass.
    supra::heap::keep_freed_for_reuse();
    let engine = Engine {
        model: &model,
        tokenizer: &loaded.tokenizer,
        share_prefix: !a.no_share_prefix,
        batch_tokens: a.batch_tokens as usize,
        max_length: a
            .max_length
            .map_or(loaded.config.max_position_embeddings, |n| n as usize),
    };
    let model_name = a
        .model
        .model
        .as_ref()
        .map_or("SmolLM2-135M-Instruct (default)".to_string(), |p| {
            p.display().to_string()
        });
    let mut journal = match &a.json {
        Some(path) => Some(Journal::open(
            &Journal::path_for(path),
            &{
                let mut header = serde_json::json!({"model": model_name, "limit": a.limit, "max_length": engine.max_length});
                // Only for a control, so that journals written before --branches still resume.
                if a.branches.branches != "both" {
                    header["branches"] = a.branches.branches.clone().into();
                }
                header.to_string()
            },
            a.resume,
        )?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let mut results = Vec::new();
    for task in &tasks {
        let r = report::run_task(&engine, task, &dir, a.limit, journal.as_mut())
            .with_context(|| format!("task {}", task.name()))?;
        eprintln!("{}: {} items in {:.1} s", r.task, r.items, r.seconds);
        results.push(r);
    }
    print!("{}", report::markdown(&results));
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "model": model_name,
            "branches": a.branches.branches,
            "config": loaded.config.to_hf_json(),
            "supra_version": env!("CARGO_PKG_VERSION"),
            "limit": a.limit,
            "share_prefix": engine.share_prefix,
            "batch_tokens": engine.batch_tokens,
            "max_length": engine.max_length,
            "seconds": t0.elapsed().as_secs_f64(),
            "results": results,
        });
        io::atomic_write(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if let Some(j) = journal {
        j.remove()?;
    }
    Ok(())
}

pub(crate) fn compare(reports: &[PathBuf]) -> Result<()> {
    let loaded = reports
        .iter()
        .map(|p| {
            let text = read_text(p)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", p.display()))?;
            let name = p.file_stem().map_or_else(
                || p.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            );
            Ok((name, v))
        })
        .collect::<Result<Vec<_>>>()?;
    print!("{}", supra::eval::report::compare(&loaded)?);
    Ok(())
}
