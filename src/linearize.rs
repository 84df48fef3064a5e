//! The whole job on one model: convert, train (attention transfer, then distillation by
//! default), held-out perplexity of teacher, window-only control and linear model, and a
//! sample from the linear model.

use crate::attention::window::Branches;
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
    /// The conversion: which cell, with or without a window.
    pub convert: ConvertOptions,
    pub train: TrainConfig,
    pub data: Vec<PathBuf>,
    pub valid: Option<Vec<PathBuf>>,
    /// Held-out text for perplexity.
    pub test: PathBuf,
    pub eval_tokens: usize,
    /// Tokens per perplexity window (each scored with no history before it).
    pub eval_window: usize,
    pub prompt: String,
    pub token_cache: PathBuf,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub teacher: Perplexity,
    /// The converted model with its window layers' linear branch off: the teacher restricted
    /// to its window and sinks, what the linear state has to beat (window models only).
    pub control: Option<Perplexity>,
    pub converted: Perplexity,
    pub linear: Perplexity,
    /// The linear model's perplexity over the teacher's (and the control's over the teacher's).
    pub ratio: f64,
    pub control_ratio: Option<f64>,
    pub recipe: String,
    pub train_tokens: u64,
    pub sample: String,
}

fn heading(step: usize, text: &str) {
    eprintln!("\n[{step}/5] {text}");
}

fn held_out_ppl(
    model: &LoadedModel,
    branches: Branches,
    ids: &[u32],
    window: usize,
    label: &str,
) -> Result<Perplexity> {
    let mut llama = Llama::new(&model.config, &model.weights)?;
    llama.set_branches(branches);
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
    let cell = match &opts.convert.window {
        Some(w) => format!(
            "a window of {} + {} sinks and {} linear attention",
            w.window,
            w.sinks,
            opts.convert.feature_map.name()
        ),
        None => format!("{} linear attention", opts.convert.feature_map.name()),
    };
    heading(
        1,
        &format!("convert: softmax attention → {cell} in every layer"),
    );
    let converted = convert(&teacher, &opts.convert)?;
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
            "train: {} on {} tokens",
            opts.train.recipe.name(),
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
        teacher: None,
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
    let window = opts.eval_window;
    let both = Branches::Both;
    let teacher_ppl = held_out_ppl(&teacher, both, &ids, window, "teacher (softmax)")?;
    let control = match opts.convert.window {
        Some(_) => Some(held_out_ppl(
            &converted,
            Branches::Window,
            &ids,
            window,
            "window-only control",
        )?),
        None => None,
    };
    let converted_ppl = held_out_ppl(&converted, both, &ids, window, "converted (untrained)")?;
    let linear_ppl = held_out_ppl(&linear, both, &ids, window, "linear (trained)")?;

    heading(4, "sample from the linear model");
    let llama = Llama::new(&linear.config, &linear.weights)?;
    let prompt = linear.tokenizer.encode(&opts.prompt)?;
    let mut g = Generation::new(
        &llama,
        Sampler::new(
            SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
            },
            42,
        ),
        linear.tokenizer.stop_ids(None),
        60,
    );
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
        ratio: linear_ppl.ppl / teacher_ppl.ppl,
        control_ratio: control.as_ref().map(|c| c.ppl / teacher_ppl.ppl),
        teacher: teacher_ppl,
        control,
        converted: converted_ppl,
        linear: linear_ppl,
        recipe: opts.train.recipe.name().to_string(),
        train_tokens: summary.last.as_ref().map_or(0, |m| m.tokens),
        sample,
    };
    crate::io::atomic_write(
        &opts.out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}
