//! `supra bench`: throughput of inference, generation, training and one attention layer.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use supra::convert::ConvertOptions;
use supra::io::{self, fetch, LoadedModel};
use supra::model::llama::{Form, Llama};
use supra::model::quant::WeightFormat;
use supra::train::recipe::Recipe;

use super::model::{store_weights_as, InferModelArg, ModelArg};
use super::parse_tokens;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// One SUPRA layer (SmolLM2-135M shapes) forward + backward: parallel vs chunked form,
    /// time and peak memory; or, with --rule delta, the delta rule's training form composed
    /// from candle ops vs its fused op.
    Attention {
        /// Sequence length.
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// Runs per form; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// add: the SUPRA layer (its additive state); delta: the delta rule's chunked form
        /// alone (9 query, 3 key/value heads, d' = d_v = 64, chunks of 64).
        #[arg(long, default_value = "add")]
        rule: supra::config::LinearRule,
    },
    /// Training throughput of each recipe on a converted model: tokens/s, the split between
    /// forward, backward and optimizer, and achieved GFLOP/s against this machine's matmul peak.
    Train {
        /// A converted model (SUPRA layers) [default: the default model, converted in memory].
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Timed steps per recipe (after one warm-up step); the median is reported.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Recipes to time (supra, transfer, transfer+finetune, distill, transfer+distill); the
        /// two-phase ones time their phase after transfer, distill and transfer+distill the
        /// same update (LoRA rank 16 + φ, the teacher's forward included).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "supra,transfer,transfer+finetune,distill"
        )]
        recipes: Vec<Recipe>,
        /// Time each recipe in PyTorch too, right after supra's, with this Python (torch and
        /// safetensors installed) running scripts/bench/train_torch.py on the same model,
        /// shapes and threads; prints both and their ratio.
        #[arg(long, value_name = "PYTHON")]
        against_pytorch: Option<PathBuf>,
        /// The PyTorch side's script [default: scripts/bench/train_torch.py of this checkout].
        #[arg(long, requires = "against_pytorch")]
        pytorch_script: Option<PathBuf>,
        /// Times each recipe this many times in a row (with --against-pytorch: supra then
        /// PyTorch, back to back, each round a pair); the row shows the medians and, beside
        /// them, every round's figure. The ratio is the median of the rounds' own ratios, so a
        /// slow spell of the machine in one round does not set it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
    },
    /// Inference speed against context length, teacher and linear side by side: prefill and
    /// decode tokens/s and peak memory at each context, for each weight format; a markdown
    /// table, optionally CSV and a PNG of decode speed. Softmax models run past their trained
    /// context here on purpose.
    Infer {
        /// GGUF files or HF directories [default: SmolLM2-135M-Instruct and its SUPRA
        /// conversion, made in memory (untrained φ: the speed is the same)].
        models: Vec<PathBuf>,
        /// Names for the models in the table and plot, comma-separated.
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
        /// Contexts to measure at (a k suffix multiplies by 1024).
        #[arg(long, value_delimiter = ',', value_parser = parse_tokens, default_value = "512,2k,8k,32k,64k")]
        contexts: Vec<usize>,
        /// Models with softmax layers stop at this context (their KV cache and attention grow
        /// with it).
        #[arg(long, value_parser = parse_tokens, default_value = "32k")]
        softmax_max: usize,
        #[arg(long, value_delimiter = ',', default_value = "f32,q8_0", value_parser = super::model::weight_format())]
        weights: Vec<WeightFormat>,
        /// Tokens decoded at each context.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(2..))]
        gen: u64,
        /// Decode runs at each context; the median rate is reported. Each is paired with a run
        /// from the first context's state right after it (the ratio column: the context's own
        /// effect on decode speed, with the machine's drift over a long prefill taken out).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        repeats: u64,
        /// Also write the rows as CSV.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Also plot decode tokens/s against context.
        #[arg(long)]
        png: Option<PathBuf>,
    },
    /// Decoding steps of several sequences at once (what `supra serve` runs for concurrent
    /// requests): milliseconds per step and generated tokens/s for each batch size, against
    /// one sequence's.
    Batch {
        #[command(flatten)]
        model: InferModelArg,
        /// Sequences per step (a comma-separated list runs each).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
        batch: Vec<usize>,
        /// Tokens each sequence has read before the timed steps.
        #[arg(long, default_value_t = 128)]
        context: usize,
        /// Timed steps per batch size (the median is reported).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
        steps: u64,
    },
    /// Prompt processing and generation speed, and peak memory, of `supra generate`.
    Generate {
        #[command(flatten)]
        model: InferModelArg,
        /// Tokens of context to prefill before generating (a comma-separated list runs each).
        #[arg(long, value_delimiter = ',', default_value = "512")]
        context: Vec<usize>,
        /// Tokens to generate after the context.
        #[arg(long, default_value_t = 128)]
        gen: usize,
    },
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn bench_infer(
    models: &[PathBuf],
    names: &[String],
    mut contexts: Vec<usize>,
    softmax_max: usize,
    weights: &[WeightFormat],
    (gen, repeats): (usize, usize),
    csv: Option<PathBuf>,
    png: Option<PathBuf>,
) -> Result<()> {
    contexts.sort_unstable();
    contexts.dedup();
    let paths: Vec<Option<PathBuf>> = if models.is_empty() {
        vec![None, None]
    } else {
        models.iter().cloned().map(Some).collect()
    };
    if !names.is_empty() && names.len() != paths.len() {
        bail!(
            "--names gives {} names for {} models",
            names.len(),
            paths.len()
        );
    }
    let name = |i: usize, p: &Option<PathBuf>| match (names.get(i), p) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => p
            .file_name()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        (None, None) if i == 0 => "teacher".to_string(),
        (None, None) => "supra".to_string(),
    };
    // Loads model `i` afresh for each format (quantizing drops the f32 weights).
    let load = |i: usize, p: &Option<PathBuf>| -> Result<(LoadedModel, Llama)> {
        let (loaded, model) = ModelArg { model: p.clone() }.load()?;
        if p.is_some() || i == 0 {
            return Ok((loaded, model));
        }
        let converted = supra::convert::convert(&loaded, &ConvertOptions::default())?;
        let model = Llama::new(&converted.config, &converted.weights)?;
        Ok((converted, model))
    };
    println!("| model | weights | context | prefill tokens/s | decode tokens/s | decode at the first context, same moment | ratio | state (MiB) | peak RSS (MiB) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        for &w in weights {
            let (mut loaded, mut model) = load(i, p)?;
            model.past_context = true;
            store_weights_as(&mut loaded, &mut model, w)?;
            let limit = if model.has_softmax_layers() {
                softmax_max
            } else {
                usize::MAX
            };
            let these: Vec<usize> = contexts.iter().copied().filter(|&c| c <= limit).collect();
            supra::bench::infer(
                &model,
                &loaded.tokenizer,
                &name(i, p),
                w.name(),
                &these,
                (gen, repeats),
                |r: &supra::bench::InferPoint| {
                    println!(
                        "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {} |",
                        r.model,
                        r.weights,
                        r.context,
                        r.prefill_tps,
                        r.decode_tps,
                        r.decode_tps_first,
                        r.decode_tps / r.decode_tps_first,
                        r.state_mib,
                        r.peak_rss_mib.map_or("n/a".into(), |m| format!("{m:.0}"))
                    );
                    rows.push(r.clone());
                    Ok(())
                },
            )?;
        }
    }
    if let Some(path) = &csv {
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in &rows {
            w.serialize(r)?;
        }
        io::atomic_write(path, &w.into_inner()?)?;
    }
    if let Some(path) = &png {
        let mut series: Vec<supra::plot::Series> = Vec::new();
        for r in &rows {
            let key = format!("{} {}", r.model, r.weights);
            let point = (r.context as f64, r.decode_tps);
            match series.iter_mut().find(|s| s.name == key) {
                Some(s) => s.points.push(point),
                None => series.push(supra::plot::Series::points(key, vec![point])),
            }
        }
        let spec = supra::plot::Lines {
            title: "decode speed against context",
            x_desc: "tokens of context",
            y_desc: "decode tokens/s",
            x_scale: supra::plot::Scale::Log2,
            y_scale: supra::plot::Scale::Log10,
            marker: None,
            y_range: None,
        };
        supra::plot::lines(&spec, &series, path)?;
    }
    Ok(())
}

pub(crate) fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate {
            model,
            context,
            gen,
        } => generate(&model, &context, gen),
        BenchCommand::Batch {
            model,
            batch,
            context,
            steps,
        } => decode_batch(&model, &batch, context, steps as usize),
        BenchCommand::Train {
            model,
            seq_len,
            steps,
            recipes,
            against_pytorch,
            pytorch_script,
            rounds,
        } => {
            let torch = against_pytorch.map(|python| TorchSide {
                python,
                script: pytorch_script.unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/train_torch.py")
                }),
            });
            train(
                model,
                (seq_len, steps, rounds as usize),
                &recipes,
                torch.as_ref(),
            )
        }
        BenchCommand::Infer {
            models,
            names,
            contexts,
            softmax_max,
            weights,
            gen,
            repeats,
            csv,
            png,
        } => bench_infer(
            &models,
            &names,
            contexts,
            softmax_max,
            &weights,
            (gen as usize, repeats as usize),
            csv,
            png,
        ),
        BenchCommand::Attention { seq, repeats, rule } => attention(seq, repeats, rule),
    }
}

fn decode_batch(
    model: &InferModelArg,
    batch: &[usize],
    context: usize,
    steps: usize,
) -> Result<()> {
    if batch.contains(&0) {
        bail!("--batch sizes must be at least 1");
    }
    let (loaded, llama) = model.load()?;
    if let Some(limit) = llama.context_limit().filter(|&l| context + steps + 2 > l) {
        bail!("--context {context} and {steps} steps do not fit the model's context ({limit})");
    }
    println!("| sequences | ms per step | generated tokens/s | × one sequence |");
    println!("|---:|---:|---:|---:|");
    // The ratio needs one sequence's figure first: rows before it (or without it) say "–".
    let mut one = None;
    for &b in batch {
        let step = supra::bench::decode_batch(&llama, &loaded.tokenizer, b, context, steps)?;
        let tps = b as f64 / step;
        if b == 1 {
            one.get_or_insert(tps);
        }
        let ratio = one.map_or("–".to_string(), |base| format!("{:.2}", tps / base));
        println!("| {b} | {:.1} | {tps:.1} | {ratio} |", 1e3 * step);
    }
    Ok(())
}

fn generate(model: &InferModelArg, context: &[usize], gen: usize) -> Result<()> {
    let (loaded, llama) = model.load()?;
    println!(
        "| context | prefill tokens/s | decode tokens/s | state at end (MiB) | peak RSS (MiB) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for &ctx in context {
        if let Some(limit) = llama.context_limit().filter(|&l| ctx + gen > l) {
            println!("| {ctx} | beyond the model's context ({limit}) | | | |");
            continue;
        }
        supra::bench::reset_peak_rss();
        let s = supra::bench::generate(&llama, &loaded.tokenizer, ctx, gen)?;
        let rss = supra::bench::peak_rss_bytes().map_or("n/a".to_string(), |b| {
            format!("{:.0}", supra::bench::mib(b))
        });
        println!(
            "| {ctx} | {:.1} | {:.1} | {:.1} | {rss} |",
            s.prefill_tps(),
            s.decode_tps(),
            supra::bench::mib(s.state_bytes as u64)
        );
    }
    Ok(())
}

/// How to run the PyTorch side of `bench train`.
struct TorchSide {
    python: PathBuf,
    script: PathBuf,
}

/// One recipe's figures from scripts/bench/train_torch.py --json.
#[derive(serde::Deserialize)]
struct TorchRow {
    recipe: String,
    tokens_per_s: f64,
    forward_s: f64,
    backward_s: f64,
    optimizer_s: f64,
}

impl TorchSide {
    /// Times `recipe` on the model in `dir` with the same sequence length, steps and threads.
    fn time(
        &self,
        dir: &std::path::Path,
        recipe: Recipe,
        seq_len: usize,
        steps: usize,
    ) -> Result<TorchRow> {
        let out = std::process::Command::new(&self.python)
            .arg(&self.script)
            .arg(dir)
            .args([
                "--seq-len",
                &seq_len.to_string(),
                "--steps",
                &steps.to_string(),
            ])
            .args(["--recipes", recipe.name(), "--json"])
            .args(["--threads", &rayon::current_num_threads().to_string()])
            .output()
            .with_context(|| format!("cannot run {}", self.python.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            bail!(
                "{} {} failed ({}):\n{}",
                self.python.display(),
                self.script.display(),
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<TorchRow>(l).ok())
            .find(|r| r.recipe == recipe.name())
            .with_context(|| {
                format!(
                    "{} printed no figures for {}:\n{stdout}",
                    self.script.display(),
                    recipe.name()
                )
            })
    }
}

/// The middle value (the upper of the two middle ones for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One round of one recipe: supra's figures and, with a PyTorch side, its figures right after.
struct Round {
    ours: supra::bench::TrainBench,
    theirs: Option<TorchRow>,
}

fn train(
    model: Option<PathBuf>,
    (seq_len, steps, rounds): (usize, usize, usize),
    recipes: &[Recipe],
    torch: Option<&TorchSide>,
) -> Result<()> {
    if let Some(t) = torch.filter(|t| !t.script.exists()) {
        bail!(
            "the PyTorch side's script {} does not exist (give --pytorch-script)",
            t.script.display()
        );
    }
    let steps = steps.max(1);
    let loaded = match &model {
        Some(p) => io::load(p)?,
        None => supra::convert::convert(
            &io::load(&fetch::ensure_default_model()?)?,
            &ConvertOptions::default(),
        )?,
    };
    // The PyTorch side reads an HF directory: the one given, or this model written to a
    // temporary one.
    let tmp;
    let dir = match (torch, &model) {
        (None, _) => None,
        (Some(_), Some(p)) if p.join("model.safetensors").exists() => Some(p.clone()),
        (Some(_), _) => {
            tmp = tempfile::tempdir()?;
            io::hf_dir::save(&loaded, tmp.path())?;
            Some(tmp.path().to_path_buf())
        }
    };
    let torch = torch.zip(dir.as_deref());
    // The machine's speed drifts over a run (other tenants of the host): the peak is measured
    // before and again after each round, and each row is against the best so far.
    let mut peak = supra::bench::matmul_peak_gflops()?;
    let n = loaded.config.param_count() as f64;
    println!(
        "matmul peak (f32, 1024³): {peak:.1} GFLOP/s; model: {:.2} M parameters; seq {seq_len}; {} threads{}",
        n / 1e6,
        rayon::current_num_threads(),
        if rounds > 1 { format!("; medians of {rounds} rounds") } else { String::new() }
    );
    let split = |f: f64, b: f64, o: f64| format!("{f:.2} / {b:.2} / {o:.2}");
    let by_round = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut header = "| recipe | trained params | tokens/s | forward / backward / optimizer (s) | GFLOP/s (6·N per token) | % of peak |".to_string();
    let mut rule = "|---|---:|---:|---:|---:|---:|".to_string();
    if torch.is_some() {
        header +=
            " PyTorch tokens/s | PyTorch forward / backward / optimizer (s) | supra / PyTorch |";
        rule += "---:|---:|---:|";
    }
    if rounds > 1 {
        header += if torch.is_some() {
            " supra / PyTorch by round |"
        } else {
            " tokens/s by round |"
        };
        rule += "---|";
    }
    println!("{header}\n{rule}");
    for &recipe in recipes {
        let mut done = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let ours = supra::bench::train_step(&loaded, recipe, seq_len, steps)?;
            peak = peak.max(supra::bench::matmul_peak_gflops()?);
            let theirs = match torch {
                Some((t, dir)) => Some(t.time(dir, recipe, seq_len, steps)?),
                None => None,
            };
            done.push(Round { ours, theirs });
        }
        let ours = |f: fn(&supra::bench::TrainBench) -> f64| {
            median(&done.iter().map(|r| f(&r.ours)).collect::<Vec<_>>())
        };
        let tokens_per_s = ours(|b| b.tokens_per_s);
        // 6·N FLOPs per token is the full forward + backward of cross-entropy training;
        // transfer runs a forward and backpropagates only into φ, so it has no such figure.
        let flops = match recipe {
            Recipe::Supra => {
                let g = 6.0 * n * tokens_per_s / 1e9;
                format!("{g:.1} | {:.0} %", 100.0 * g / peak)
            }
            _ => "— | —".to_string(),
        };
        let theirs: Vec<&TorchRow> = done.iter().filter_map(|r| r.theirs.as_ref()).collect();
        let mut row = format!(
            "| {} | {:.2} M | {tokens_per_s:.1} | {} | {flops} |",
            match recipe {
                r if r.adapts() => format!("{} (LoRA 16 + φ)", r.name()),
                r => r.name().to_string(),
            },
            done[0].ours.trained_params as f64 / 1e6,
            split(
                ours(|b| b.forward_s),
                ours(|b| b.backward_s),
                ours(|b| b.optimizer_s)
            ),
        );
        let ratios: Vec<f64> = done
            .iter()
            .filter_map(|r| Some(r.ours.tokens_per_s / r.theirs.as_ref()?.tokens_per_s))
            .collect();
        if !theirs.is_empty() {
            let m =
                |f: fn(&TorchRow) -> f64| median(&theirs.iter().map(|r| f(r)).collect::<Vec<_>>());
            row += &format!(
                " {:.1} | {} | {:.2} |",
                m(|r| r.tokens_per_s),
                split(
                    m(|r| r.forward_s),
                    m(|r| r.backward_s),
                    m(|r| r.optimizer_s)
                ),
                median(&ratios)
            );
        }
        if rounds > 1 {
            let each = if theirs.is_empty() {
                done.iter().map(|r| r.ours.tokens_per_s).collect()
            } else {
                ratios
            };
            row += &format!(" {} |", by_round(&each));
        }
        println!("{row}");
    }
    println!(
        "matmul peak, best of the measurements before and after each round: {peak:.1} GFLOP/s"
    );
    Ok(())
}

fn attention(seq: usize, repeats: usize, rule: supra::config::LinearRule) -> Result<()> {
    if repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    println!("| form | T | forward (s) | backward (s) | peak RSS (MiB) |");
    println!("|---|---:|---:|---:|---:|");
    let row = |form: &str, b: supra::bench::AttentionBench| {
        let rss = b.peak_rss.map_or("n/a".to_string(), |x| {
            format!("{:.0}", supra::bench::mib(x))
        });
        println!(
            "| {form} | {seq} | {:.3} | {:.3} | {rss} |",
            b.forward.as_secs_f64(),
            b.backward.as_secs_f64()
        );
    };
    match rule {
        // Chunked first: memory the parallel form frees may stay resident.
        supra::config::LinearRule::Add => {
            for form in [Form::Chunked, Form::Parallel] {
                row(
                    &format!("{form:?}"),
                    supra::bench::attention(seq, form, repeats)?,
                );
            }
        }
        supra::config::LinearRule::Delta => {
            for (name, fused) in [("delta, fused", true), ("delta, composed", false)] {
                row(name, supra::bench::delta_rule(seq, fused, repeats)?);
            }
        }
    }
    Ok(())
}
