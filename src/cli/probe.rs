//! `supra probe`: long-context and in-context-learning probes over several models.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use supra::eval::long_context::Buckets;
use supra::io::{self};

use super::model::{set_branches, ModelArg};
use super::{data_dir, parse_tokens};

#[derive(Args)]
pub(crate) struct ProbeModels {
    /// GGUF files or HF directories [default: SmolLM2-135M-Instruct, fetched if missing].
    /// Softmax models run past their trained context here on purpose.
    pub(crate) models: Vec<PathBuf>,
    /// Window + linear models only: which branches each model runs (both, window or linear;
    /// one for all models or one per model, comma-separated). Give one model several times
    /// with different branches to report it window-only, linear-only and whole.
    #[arg(long, value_delimiter = ',', value_parser = ["both", "window", "linear"])]
    pub(crate) branches: Vec<String>,
    /// Names for the models in tables and plots, comma-separated [default: file or directory
    /// names].
    #[arg(long, value_delimiter = ',')]
    pub(crate) names: Vec<String>,
    /// The plot.
    #[arg(long)]
    pub(crate) png: PathBuf,
    /// Also write the results to this JSON file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Shared data directory holding text/ [default: $SUPRA_DATA_DIR or ../shared/data].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Continue an interrupted run: reuse the prompts, windows and points journaled beside
    /// the --json report (REPORT.partial.jsonl, removed once the report is written).
    #[arg(long, requires = "json")]
    pub(crate) resume: bool,
}

#[derive(Args)]
pub(crate) struct RetrievalArgs {
    #[command(flatten)]
    pub(crate) models: ProbeModels,
    /// Prompt lengths in tokens (a k suffix multiplies by 1024).
    #[arg(long, value_delimiter = ',', value_parser = parse_tokens, default_value = "1k,2k,4k,8k,16k,32k")]
    pub(crate) lengths: Vec<usize>,
    /// Depths of the key in the haystack, in % (0: its start, 100: its end).
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    pub(crate) depths: Vec<f64>,
    /// Prompts (random keys) per cell.
    #[arg(long, default_value_t = 2)]
    pub(crate) trials: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

#[derive(Subcommand)]
pub(crate) enum ProbeCommand {
    /// A random 5-digit pass key hidden in repeated filler text; greedy decoding must say it.
    Passkey(RetrievalArgs),
    /// A "special magic number" sentence hidden in a held-out book; greedy decoding must say it.
    Needle {
        #[command(flatten)]
        args: RetrievalArgs,
        /// The book (text file) [default: DATA_DIR/text/test/pg2701.txt, Moby Dick].
        #[arg(long)]
        book: Option<PathBuf>,
    },
    /// Perplexity by position bucket in long books, several models on one plot.
    Position {
        #[command(flatten)]
        models: ProbeModels,
        /// Books: text files or directories (files named in capitals, like SOURCE.txt, are
        /// skipped) [default: DATA_DIR/text/longctx].
        #[arg(long)]
        text: Vec<PathBuf>,
        /// Tokens per window (a k suffix multiplies by 1024).
        #[arg(long, value_parser = parse_tokens, default_value = "32k")]
        length: usize,
        /// Windows in all, spread over the books.
        #[arg(long, default_value_t = 4)]
        sequences: usize,
        /// Positions per bucket (a k suffix multiplies by 1024).
        #[arg(long, value_parser = parse_tokens, default_value = "1k")]
        bucket: usize,
        /// Buckets at these positions instead, e.g. 128,512,1k,2k: 0–128, 128–512, 512–1k,
        /// 1k–2k, 2k–end.
        #[arg(long, value_delimiter = ',', value_parser = parse_tokens, conflicts_with = "bucket")]
        edges: Vec<usize>,
    },
    /// Multi-query associative recall: key-value pairs, then queries; accuracy against the
    /// number of pairs.
    Recall {
        #[command(flatten)]
        models: ProbeModels,
        #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64,128")]
        pairs: Vec<usize>,
        /// Queries per prompt.
        #[arg(long, default_value_t = 8)]
        queries: usize,
        /// Prompts per number of pairs.
        #[arg(long, default_value_t = 25)]
        prompts: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub(crate) fn probe(cmd: ProbeCommand) -> Result<()> {
    use supra::eval::journal::Journal;
    use supra::eval::probe::{self, Probe, Subject};
    let retrieval = |a: &RetrievalArgs, book: Option<PathBuf>| -> Result<Probe> {
        if let Some(d) = a.depths.iter().find(|d| !(0.0..=100.0).contains(*d)) {
            bail!("--depths are percentages from 0 to 100, not {d}");
        }
        Ok(Probe::Retrieval {
            book,
            grid: supra::eval::long_context::Grid {
                lengths: a.lengths.clone(),
                depths: a.depths.iter().map(|d| d / 100.0).collect(),
                trials: a.trials.max(1),
                seed: a.seed,
            },
        })
    };
    let (m, probe) = match &cmd {
        ProbeCommand::Passkey(a) => (&a.models, retrieval(a, None)?),
        ProbeCommand::Needle { args, book } => {
            let book = book
                .clone()
                .unwrap_or_else(|| data_dir(&args.models.data_dir).join("text/test/pg2701.txt"));
            if !book.exists() {
                bail!(
                    "{} does not exist (give --book, or --data-dir)",
                    book.display()
                );
            }
            (&args.models, retrieval(args, Some(book))?)
        }
        ProbeCommand::Position {
            models,
            text,
            length,
            sequences,
            bucket,
            edges,
        } => {
            if !edges.windows(2).all(|w| w[0] < w[1]) {
                bail!("--edges must increase: {edges:?}");
            }
            let buckets = if edges.is_empty() {
                Buckets::Every(*bucket)
            } else {
                Buckets::Edges(edges.clone())
            };
            let texts = if text.is_empty() {
                vec![data_dir(&models.data_dir).join("text/longctx")]
            } else {
                text.clone()
            };
            (
                models,
                Probe::Position {
                    texts,
                    length: *length,
                    sequences: (*sequences).max(1),
                    buckets,
                },
            )
        }
        ProbeCommand::Recall {
            models,
            pairs,
            queries,
            prompts,
            seed,
        } => (
            models,
            Probe::Recall {
                pairs: pairs.clone(),
                queries: (*queries).max(1),
                prompts: (*prompts).max(1),
                seed: *seed,
            },
        ),
    };
    let paths: Vec<Option<PathBuf>> = if m.models.is_empty() {
        vec![None]
    } else {
        m.models.iter().cloned().map(Some).collect()
    };
    if !m.names.is_empty() && m.names.len() != paths.len() {
        bail!(
            "--names gives {} names for {} models",
            m.names.len(),
            paths.len()
        );
    }
    if m.branches.len() > 1 && m.branches.len() != paths.len() {
        bail!(
            "--branches gives {} settings for {} models (give one, or one per model)",
            m.branches.len(),
            paths.len()
        );
    }
    let mut loaded = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let (l, mut model) = ModelArg { model: p.clone() }.load()?;
        model.past_context = true;
        if let Some(b) = m.branches.get(i).or(m.branches.first()) {
            set_branches(&mut model, b.parse()?)?;
        }
        let name = m.names.get(i).cloned().unwrap_or_else(|| match p {
            Some(p) => p.file_stem().map_or(p.display().to_string(), |s| {
                s.to_string_lossy().into_owned()
            }),
            None => "SmolLM2-135M-Instruct".into(),
        });
        loaded.push((name, l, model));
    }
    let subjects: Vec<Subject> = loaded
        .iter()
        .map(|(name, l, model)| Subject {
            name: name.clone(),
            model,
            tokenizer: &l.tokenizer,
        })
        .collect();
    let names: Vec<&str> = subjects.iter().map(|s| s.name.as_str()).collect();
    let mut journal = match &m.json {
        Some(path) => Some(Journal::open(
            &Journal::path_for(path),
            &{
                let mut header = serde_json::json!({"probe": format!("{probe:?}"), "models": format!("{paths:?}"), "names": names});
                // Only when given, so journals written before --branches still resume.
                if !m.branches.is_empty() {
                    header["branches"] = serde_json::json!(m.branches);
                }
                header.to_string()
            },
            m.resume,
        )?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let outcome = probe::run(&probe, &subjects, &m.png, journal.as_mut())?;
    print!("{}", outcome.markdown);
    eprintln!(
        "wrote {} ({:.0} s)",
        m.png.display(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(path) = &m.json {
        let v = serde_json::json!({
            "probe": format!("{probe:?}"),
            "models": paths.iter().map(|p| p.as_ref().map_or("SmolLM2-135M-Instruct (default)".to_string(), |p| p.display().to_string())).collect::<Vec<_>>(),
            "branches": m.branches,
            "supra_version": env!("CARGO_PKG_VERSION"),
            "seconds": t0.elapsed().as_secs_f64(),
            "results": outcome.json,
        });
        io::atomic_write(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if let Some(j) = journal {
        j.remove()?;
    }
    Ok(())
}
