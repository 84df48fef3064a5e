//! The training loop: batches, gradient accumulation, clipping, schedule, validation,
//! metrics, checkpoints and exact resume.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::io::LoadedModel;
use crate::model::llama::Llama;
use crate::train::checkpoint::{self, Progress};
use crate::train::data::{TokenStream, Windows};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::recipe::{self, Group, Objective, Recipe};
use crate::train::schedule::Schedule;
use crate::train::transfer::{self, Teacher};

/// Everything that defines a run; a resumed run must match it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub recipe: Recipe,
    pub seq_len: usize,
    /// Tokens per optimizer update (rounded down to whole windows).
    pub batch_tokens: usize,
    /// Windows per forward/backward pass; gradients accumulate up to `batch_tokens`.
    pub micro_batch: usize,
    pub steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub clip: f64,
    pub eval_every: u64,
    pub eval_windows: usize,
    pub checkpoint_every: u64,
    pub keep: usize,
    pub seed: u64,
    pub freeze: Vec<Group>,
    pub max_bad_steps: usize,
    /// transfer+finetune: updates of attention transfer before cross-entropy starts.
    #[serde(default)]
    pub transfer_steps: u64,
    /// transfer+finetune: peak learning rate of the transfer phase.
    #[serde(default)]
    pub transfer_lr: f64,
    /// transfer+finetune: LoRA rank of the fine-tuning phase (0: all parameters).
    #[serde(default)]
    pub lora_rank: usize,
    #[serde(default)]
    pub lora_alpha: f64,
}

impl TrainConfig {
    pub fn windows_per_step(&self) -> usize {
        (self.batch_tokens / self.seq_len).max(1)
    }
}

pub struct TrainInputs<'a> {
    pub data: &'a [PathBuf],
    pub valid: Option<&'a [PathBuf]>,
    pub out: &'a Path,
    pub resume: bool,
    /// Stop after this many updates in this invocation (the schedule still spans `steps`).
    pub stop_after: Option<u64>,
    pub token_cache: &'a Path,
}

/// Redraws OUT/loss.png from the whole metrics file (earlier invocations of a resumed run too).
fn plot_all(out: &Path, metrics_path: &Path, cfg: &TrainConfig) -> Result<()> {
    let text = std::fs::read_to_string(metrics_path)?;
    let all: Vec<Metrics> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let title = format!(
        "{} recipe, seq {}, {} tokens/update",
        cfg.recipe.name(),
        cfg.seq_len,
        cfg.windows_per_step() * cfg.seq_len
    );
    crate::train::plot::loss_plot(&all, &title, &out.join("loss.png"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub step: u64,
    pub tokens: u64,
    pub objective: Objective,
    pub loss: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

pub struct Summary {
    pub steps_done: u64,
    pub last: Option<Metrics>,
    pub final_dir: Option<PathBuf>,
    pub history: Vec<Metrics>,
}

/// Windows of training data used to calibrate Wo in the transfer recipe.
const CALIBRATION_WINDOWS: usize = 8;

fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// A rough upper estimate of the run's memory: weights, AdamW state and gradient buffers for
/// the trained parameters, and the activations candle keeps for one micro-batch's backward.
pub fn memory_estimate(model: &LoadedModel, n_trained: usize, cfg: &TrainConfig) -> u64 {
    let c = &model.config;
    let weights = c.param_count() as u64 * 4;
    let trained = n_trained as u64 * 4 * 4; // grad accumulator, candle's grad, m, v
    let tokens = (cfg.micro_batch.min(cfg.windows_per_step()) * cfg.seq_len) as u64;
    let per_layer = (12 * c.hidden_size
        + 4 * c.intermediate_size
        + 6 * c.num_attention_heads * c.head_dim) as u64
        + (c.num_attention_heads * 64 * 3) as u64; // chunk-local attention matrices
    let activations =
        tokens * 4 * (c.num_hidden_layers as u64 * per_layer + 3 * c.vocab_size as u64);
    weights + trained + activations
}

fn batch(stream: &TokenStream, starts: &[usize], seq_len: usize) -> Result<Tensor> {
    let flat: Vec<u32> = starts
        .iter()
        .flat_map(|&s| stream.get(s, seq_len + 1))
        .collect();
    Ok(Tensor::from_vec(
        flat,
        (starts.len(), seq_len + 1),
        &Device::Cpu,
    )?)
}

fn evaluate(
    model: &Llama,
    teacher: &Teacher,
    objective: Objective,
    stream: &TokenStream,
    cfg: &TrainConfig,
) -> Result<f64> {
    let available = stream.len().saturating_sub(1) / cfg.seq_len;
    let n = cfg.eval_windows.min(available);
    let mut total = 0.0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(cfg.micro_batch) {
        let starts: Vec<usize> = chunk.iter().map(|i| i * cfg.seq_len).collect();
        let l = recipe::loss(
            model,
            teacher,
            objective,
            &batch(stream, &starts, cfg.seq_len)?,
        )?;
        total += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
    }
    Ok(total / n as f64)
}

/// Trains `model` (a fresh start) or the latest checkpoint under `inputs.out` (`resume`).
pub fn train(model: LoadedModel, cfg: &TrainConfig, inputs: &TrainInputs) -> Result<Summary> {
    if cfg.seq_len == 0 || cfg.micro_batch == 0 || cfg.steps == 0 {
        bail!("--seq-len, --micro-batch and the number of steps must be positive");
    }
    let ctx = model.config.max_position_embeddings;
    if cfg.seq_len > ctx {
        bail!(
            "--seq-len {} exceeds the model's context length {ctx}",
            cfg.seq_len
        );
    }
    if cfg.batch_tokens < cfg.seq_len {
        bail!(
            "--batch-tokens {} is smaller than one window of --seq-len {}",
            cfg.batch_tokens,
            cfg.seq_len
        );
    }
    let run_config = serde_json::to_value(cfg)?;
    let existing = checkpoint::list(inputs.out)?;
    let (model, opt_state, mut progress) = if inputs.resume {
        let ck = checkpoint::load_latest(inputs.out)?;
        if ck.run_config != run_config {
            bail!(
                "--resume: the settings differ from the run's ({}); resume with the same settings",
                ck.dir.join("run.json").display()
            );
        }
        eprintln!(
            "resuming from {} (step {})",
            ck.dir.display(),
            ck.progress.step
        );
        (ck.model, Some(ck.optimizer), ck.progress)
    } else {
        if !existing.is_empty() {
            bail!(
                "{} already holds checkpoints; pass --resume to continue that run, or choose another --out",
                inputs.out.display()
            );
        }
        let p = Progress {
            step: 0,
            cursor: 0,
            tokens: 0,
            seed: cfg.seed,
            wo_scales: Vec::new(),
            data: String::new(),
        };
        (model, None, p)
    };
    let mut model = model;
    if cfg.recipe == Recipe::TransferFinetune && cfg.lora_rank > 0 && !inputs.resume {
        crate::train::lora::add(&mut model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)?;
    }
    let names = recipe::trainable(&model, cfg.recipe, &cfg.freeze)?;
    let n_trained: usize = names.iter().map(|n| model.weights[n].elem_count()).sum();
    let need = memory_estimate(&model, n_trained, cfg);
    if let Some(avail) = mem_available_bytes().filter(|&a| need > a) {
        bail!(
            "this run needs about {:.1} GiB of memory, only {:.1} GiB is available: lower --micro-batch or --seq-len",
            need as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        );
    }
    std::fs::create_dir_all(inputs.out)
        .with_context(|| format!("cannot create {}", inputs.out.display()))?;

    let stream = TokenStream::build(inputs.data, &model.tokenizer, inputs.token_cache)?;
    let mut windows = Windows::new(&stream, cfg.seq_len, cfg.seed)?;
    let data_key = stream.key();
    if inputs.resume && progress.data != data_key {
        bail!("--resume: the training data (or tokenizer) changed since the run started; resume with the same --data");
    }
    progress.data = data_key;
    let valid = match inputs.valid {
        Some(v) => Some(TokenStream::build(v, &model.tokenizer, inputs.token_cache)?),
        None => None,
    };
    if let Some(v) = &valid {
        if v.len() <= cfg.seq_len {
            bail!(
                "the validation data has {} tokens, fewer than one window of --seq-len {}",
                v.len(),
                cfg.seq_len
            );
        }
    }

    if cfg.recipe.uses_transfer() && !inputs.resume {
        // Deterministic: the first windows of the data order, before any update.
        let n = CALIBRATION_WINDOWS.min(windows.count);
        let batches = (0..n as u64)
            .map(|i| {
                Ok(batch(&stream, &[windows.start(i)], cfg.seq_len)?.narrow(1, 0, cfg.seq_len)?)
            })
            .collect::<Result<Vec<_>>>()?;
        progress.wo_scales = transfer::calibrate_output_scale(&mut model, &batches)?;
        let all: Vec<f32> = progress
            .wo_scales
            .iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        let mean = all.iter().sum::<f32>() / all.len().max(1) as f32;
        eprintln!("calibrated Wo to the teacher's per-head output scale on {n} windows (mean factor {mean:.3})");
    }
    let (weights, vars) = recipe::with_variables(&model, &names)?;
    // One view of the weights per objective, in which only what that phase trains is a
    // variable: in the transfer phase of transfer+finetune the LoRA adapters (trained later)
    // would otherwise drag the backward pass through every layer's value path.
    let phase_model = |objective| -> Result<Llama> {
        let view: crate::model::weights::Weights = weights
            .iter()
            .map(|(n, t)| {
                let t = if recipe::phase_trains(objective, n) {
                    t.clone()
                } else {
                    t.detach()
                };
                (n.clone(), t)
            })
            .collect();
        Llama::for_training(&model.config, &view)
    };
    // The teacher's hidden states must not see the calibration.
    let teacher = Teacher::new(&model.config, &progress.wo_scales)?;
    let transfer_model = phase_model(Objective::Transfer)?;
    let ce_model = phase_model(Objective::Ce)?;
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    );
    if let Some(state) = &opt_state {
        opt.load_state(state)?;
    }
    eprintln!(
        "training {:.2} M of {:.2} M parameters ({} recipe) on {} tokens ({} windows of {}), {} windows per update",
        n_trained as f64 / 1e6,
        model.config.param_count() as f64 / 1e6,
        cfg.recipe.name(),
        stream.len(),
        windows.count,
        cfg.seq_len,
        cfg.windows_per_step()
    );
    let snapshot = |weights: &crate::model::weights::Weights| LoadedModel {
        config: model.config.clone(),
        weights: weights.clone(),
        tokenizer: model.tokenizer.clone(),
    };

    let metrics_path = inputs.out.join("metrics.jsonl");
    // Lines after the resumed step belong to work that the checkpoint does not hold.
    let kept: Vec<String> = match std::fs::read_to_string(&metrics_path) {
        Ok(text) if inputs.resume => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= progress.step)
            })
            .map(|l| format!("{l}\n"))
            .collect(),
        _ => Vec::new(),
    };
    crate::io::atomic_write(&metrics_path, kept.concat().as_bytes())?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)?;

    // transfer+finetune runs two schedules: one over the transfer updates, one over the rest.
    let offset = if cfg.recipe == Recipe::TransferFinetune {
        cfg.transfer_steps.min(cfg.steps)
    } else {
        0
    };
    let schedule = Schedule {
        max_lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: cfg.warmup_steps,
        total_steps: cfg.steps - offset,
    };
    let transfer_schedule = Schedule {
        max_lr: cfg.transfer_lr,
        min_lr: cfg.transfer_lr / 10.0,
        warmup_steps: cfg.transfer_steps / 20,
        total_steps: cfg.transfer_steps,
    };
    let per_step = cfg.windows_per_step();
    let bar = indicatif::ProgressBar::new(cfg.steps).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    bar.set_position(progress.step);
    let mut history = Vec::new();
    let mut bad_in_a_row = 0;
    let end = inputs
        .stop_after
        .map_or(cfg.steps, |n| (progress.step + n).min(cfg.steps));
    while progress.step < end {
        let t0 = Instant::now();
        let objective = cfg.recipe.objective(progress.step, cfg.transfer_steps);
        opt.set_active(|n| recipe::phase_trains(objective, n));
        let llama = match objective {
            Objective::Transfer => &transfer_model,
            Objective::Ce => &ce_model,
        };
        let lr = if progress.step < offset {
            transfer_schedule.lr(progress.step)
        } else {
            schedule.lr(progress.step - offset)
        };
        let mut loss_sum = 0.0;
        let mut done = 0;
        while done < per_step {
            let n = cfg.micro_batch.min(per_step - done);
            let starts: Vec<usize> = (0..n as u64)
                .map(|i| windows.start(progress.cursor + i))
                .collect();
            let windows = batch(&stream, &starts, cfg.seq_len)?;
            let loss = recipe::loss(llama, &teacher, objective, &windows)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
            let grads = loss.backward()?;
            opt.accumulate(&grads, n as f32 / per_step as f32)?;
            progress.cursor += n as u64;
            done += n;
        }
        let loss = loss_sum / per_step as f64;
        let grad_norm = opt.grad_norm();
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if skipped {
            opt.zero_grad();
            bad_in_a_row += 1;
            bar.println(format!(
                "step {}: loss {loss}, gradient norm {grad_norm}: update skipped",
                progress.step + 1
            ));
            if bad_in_a_row >= cfg.max_bad_steps {
                let last = checkpoint::list(inputs.out)?.pop();
                bail!(
                    "{bad_in_a_row} updates in a row had a non-finite loss or gradient; stopping. Last good checkpoint: {}",
                    last.map_or("none".to_string(), |p| p.display().to_string())
                );
            }
        } else {
            bad_in_a_row = 0;
            let scale = if grad_norm > cfg.clip {
                cfg.clip / grad_norm
            } else {
                1.0
            };
            opt.step(lr, scale)?;
        }
        progress.step += 1;
        progress.tokens += (per_step * cfg.seq_len) as u64;
        let tokens_per_s = (per_step * cfg.seq_len) as f64 / t0.elapsed().as_secs_f64();
        let last_step = progress.step == cfg.steps;
        let val_loss = match &valid {
            Some(v) if progress.step % cfg.eval_every == 0 || last_step => {
                Some(evaluate(llama, &teacher, objective, v, cfg)?)
            }
            _ => None,
        };
        let m = Metrics {
            step: progress.step,
            tokens: progress.tokens,
            objective,
            loss,
            val_loss,
            lr,
            grad_norm,
            tokens_per_s,
            skipped,
        };
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
        metrics_file.flush()?;
        bar.set_position(progress.step);
        bar.set_message(format!(
            "loss {loss:.4}{} lr {lr:.1e} {tokens_per_s:.0} tok/s",
            val_loss.map_or(String::new(), |v| format!(" val {v:.4}"))
        ));
        let evaluated = m.val_loss.is_some();
        history.push(m);
        if evaluated {
            // A plot is a convenience: never stop a run for it.
            if let Err(e) = plot_all(inputs.out, &metrics_path, cfg) {
                bar.println(format!("warning: loss plot not updated: {e:#}"));
            }
        }
        if progress.step % cfg.checkpoint_every == 0 || progress.step == end {
            checkpoint::save(
                inputs.out,
                &snapshot(&weights),
                &opt.state()?,
                &progress,
                &run_config,
                cfg.keep,
            )?;
        }
    }
    bar.finish();
    let final_dir = if progress.step == cfg.steps {
        let dir = inputs.out.join("final");
        crate::io::hf_dir::save(&crate::train::lora::merge(&snapshot(&weights))?, &dir)?;
        Some(dir)
    } else {
        None
    };
    Ok(Summary {
        steps_done: progress.step,
        last: history.last().cloned(),
        final_dir,
        history,
    })
}
