//! The whole job on one model: convert, attention transfer, held-out perplexity of teacher vs
//! linear model, and a sample from the linear model.

use crate::convert::{convert, ConvertOptions};
use crate::eval::perplexity::{perplexity, Perplexity};
use crate::infer::generate::{Generation, TextStream};
use crate::infer::sampler::{Sampler, SamplingParams};
use crate::io::LoadedModel;
use crate::model::llama::Llama;
use crate::train::run::{train, TrainConfig, TrainInputs};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct LinearizeOptions {
    pub out: PathBuf,
    pub train: TrainConfig,
    pub data: Vec<PathBuf>,
    pub valid: Option<Vec<PathBuf>>,
    /// Held-out text for perplexity.
    pub test: PathBuf,
    pub eval_tokens: usize,
    pub prompt: String,
    pub token_cache: PathBuf,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub teacher: Perplexity,
    pub converted: Perplexity,
    pub linear: Perplexity,
    pub train_tokens: u64,
    pub sample: String,
}

fn heading(step: usize, text: &str) {
    eprintln!("\n[{step}/5] {text}");
}

fn held_out_ppl(
    model: &LoadedModel,
    ids: &[u32],
    window: usize,
    label: &str,
) -> Result<Perplexity> {
    let llama = Llama::new(&model.config, &model.weights)?;
    let n = ids.len().div_ceil(window) as u64;
    let bar = indicatif::ProgressBar::new(n).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>22} {bar:30} {pos}/{len} windows [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    bar.set_message(label.to_string());
    let p = perplexity(
        &llama,
        crate::model::llama::Form::Chunked,
        ids,
        window,
        1,
        |done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    eprintln!(
        "{label:>22}: perplexity {:.2} over {} tokens",
        p.ppl, p.tokens
    );
    Ok(p)
}

/// Text files of `path` (a file or a directory, sorted), concatenated up to about `max_chars`.
fn read_held_out(path: &Path, max_chars: usize) -> Result<String> {
    let mut files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        bail!("no .txt files in {}", path.display());
    }
    let mut text = String::new();
    for f in files.drain(..) {
        text.push_str(
            &std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?,
        );
        if text.len() >= max_chars {
            break;
        }
    }
    Ok(text)
}

pub fn linearize(teacher: LoadedModel, opts: &LinearizeOptions) -> Result<Report> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    heading(
        1,
        "convert: softmax attention → SUPRA linear attention in every layer",
    );
    let converted = convert(&teacher, &ConvertOptions::default())?;
    let converted_dir = opts.out.join("converted");
    crate::io::hf_dir::save(&converted, &converted_dir)?;
    eprintln!(
        "{:.2} M new parameters (φ); saved to {}",
        converted.config.new_param_count() as f64 / 1e6,
        converted_dir.display()
    );

    heading(
        2,
        &format!(
            "attention transfer on {} tokens (φ trains; Wo is calibrated once)",
            opts.train.steps * (opts.train.windows_per_step() * opts.train.seq_len) as u64
        ),
    );
    let run_dir = opts.out.join("run");
    let resume = !crate::train::checkpoint::list(&run_dir)?.is_empty();
    if resume {
        eprintln!("continuing the run in {}", run_dir.display());
    }
    let inputs = TrainInputs {
        data: &opts.data,
        valid: opts.valid.as_deref(),
        out: &run_dir,
        resume,
        stop_after: None,
        token_cache: &opts.token_cache,
    };
    let summary = train(converted.clone(), &opts.train, &inputs)?;
    let final_dir = summary
        .final_dir
        .context("training stopped before the end")?;
    let linear = crate::io::load(&final_dir)?;

    heading(3, &format!("held-out perplexity ({})", opts.test.display()));
    let text = read_held_out(&opts.test, opts.eval_tokens * 8)?;
    let mut ids = teacher.tokenizer.encode(&text)?;
    ids.truncate(opts.eval_tokens);
    let window = opts.train.seq_len;
    let teacher_ppl = held_out_ppl(&teacher, &ids, window, "teacher (softmax)")?;
    let converted_ppl = held_out_ppl(&converted, &ids, window, "converted (untrained)")?;
    let linear_ppl = held_out_ppl(&linear, &ids, window, "linear (transfer)")?;

    heading(4, "sample from the linear model");
    let llama = Llama::new(&linear.config, &linear.weights)?;
    let prompt = linear.tokenizer.encode(&opts.prompt)?;
    let mut g = Generation {
        model: &llama,
        sampler: Sampler::new(
            SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
            },
            42,
        ),
        stop_ids: linear.tokenizer.stop_ids(None),
        max_tokens: 60,
    };
    let mut stream = TextStream::new(&linear.tokenizer);
    let mut sample = String::new();
    let mut out = std::io::stderr().lock();
    write!(out, "{}", opts.prompt)?;
    g.run(&prompt, |id| {
        if let Some(piece) = stream.push(id)? {
            write!(out, "{piece}")?;
            out.flush()?;
            sample.push_str(&piece);
        }
        Ok(())
    })?;
    sample.push_str(&stream.finish()?);
    writeln!(out)?;

    heading(5, "report");
    let report = Report {
        teacher: teacher_ppl,
        converted: converted_ppl,
        linear: linear_ppl,
        train_tokens: summary.last.as_ref().map_or(0, |m| m.tokens),
        sample,
    };
    crate::io::atomic_write(
        &opts.out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}
