//! The training loop: batches, gradient accumulation, clipping, schedule, validation,
//! metrics, checkpoints and exact resume.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{AttentionKind, LinearRule, WindowConfig};
use crate::io::LoadedModel;
use crate::model::llama::Llama;
use crate::model::params::{self, Param, ParamGroup};
use crate::model::weights::Weights;
use crate::train::checkpoint::{self, Progress};
use crate::train::data::{TokenStream, Windows};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::recipe::{self, Objective, Recipe, Targets};
use crate::train::schedule::Schedule;
use crate::train::{distill, transfer};

/// Everything that defines a run; a resumed run must match it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub recipe: Recipe,
    /// The preset the values started from ([`crate::train::preset`]).
    #[serde(default)]
    pub preset: String,
    pub seq_len: usize,
    /// Tokens per optimizer update (rounded down to whole windows).
    pub batch_tokens: usize,
    /// Windows per forward/backward pass; gradients accumulate up to `batch_tokens`.
    pub micro_batch: usize,
    pub steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_adam_eps")]
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub clip: f64,
    /// Weight of the z-loss added to the cross-entropy.
    #[serde(default)]
    pub z_loss: f64,
    pub eval_every: u64,
    pub eval_windows: usize,
    pub checkpoint_every: u64,
    pub keep: usize,
    pub seed: u64,
    pub freeze: Vec<ParamGroup>,
    pub max_bad_steps: usize,
    /// Two-phase recipes: updates of attention transfer before the next objective starts.
    #[serde(default)]
    pub transfer_steps: u64,
    /// Two-phase recipes: peak learning rate of the transfer phase, its floor and warmup.
    #[serde(default)]
    pub transfer_lr: f64,
    #[serde(default)]
    pub transfer_min_lr: f64,
    #[serde(default)]
    pub transfer_warmup_steps: u64,
    /// What SUPRA layers match in attention transfer (left out of run.json at its default).
    #[serde(default, skip_serializing_if = "is_default")]
    pub transfer_target: transfer::Target,
    /// The fine-tuning recipes: LoRA rank (0: all parameters).
    #[serde(default)]
    pub lora_rank: usize,
    #[serde(default)]
    pub lora_alpha: f64,
    /// Distillation's temperature and the weight of the cross-entropy added to its KL (left
    /// out of run.json at their defaults, so runs that predate them still resume).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub temperature: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ce_weight: f64,
    /// Window layers: each update trains at a window drawn uniformly from this many tokens
    /// up to the model's own (seeded by the update), so the linear state must carry what a
    /// shorter window drops; validation and the saved model keep the model's window. None:
    /// always the model's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_window: Option<usize>,
    /// Distilling recipes on window models: the share of each token's distillation weight
    /// that follows what the teacher gains over its own window there ([`distill::GapWeights`];
    /// 0: every token weighs the same).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gap_weight: f64,
    /// Window layers: the mix θ's learning rate as a multiple of every other parameter's.
    /// At the presets' rates Adam moves θ about one learning rate per update, so a short run
    /// leaves the linear branch's share where it started.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub mix_lr_scale: f64,
    /// Window layers with the delta rule: the write strength β's parameters' learning rate
    /// as a multiple of every other parameter's (as `mix_lr_scale`: at the presets' rates a
    /// short run leaves β at its start).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub beta_lr_scale: f64,
}

fn one() -> f64 {
    1.0
}
fn is_one(x: &f64) -> bool {
    *x == 1.0
}
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}
fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

// AdamW's settings before run.json recorded them.
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_adam_eps() -> f64 {
    1e-8
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
    /// Distillation's teacher when it is not the model trained (the distilling recipes only).
    pub teacher: Option<&'a LoadedModel>,
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
    /// The window the update trained at, when `--min-window` draws it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
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
    targets: &Targets,
    objective: Objective,
    stream: &TokenStream,
    cfg: &TrainConfig,
) -> Result<f64> {
    let available = stream.len().saturating_sub(1) / cfg.seq_len;
    let n = cfg.eval_windows.min(available);
    let mut total = 0.0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(cfg.micro_batch) {
        let starts: Vec<usize> = chunk.iter().map(|i| i * cfg.seq_len).collect();
        let windows = batch(stream, &starts, cfg.seq_len)?;
        let l = recipe::loss(model, targets, objective, &windows, false)?;
        total += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
    }
    Ok(total / n as f64)
}

/// Trains `model` (a fresh start) or the latest checkpoint under `inputs.out` (`resume`).
pub fn train(model: LoadedModel, cfg: &TrainConfig, inputs: &TrainInputs) -> Result<Summary> {
    check_settings(cfg, &model)?;
    crate::heap::keep_freed_for_reuse();
    let run_config = serde_json::to_value(cfg)?;
    // Distillation's teacher is the model the run starts from, before calibration and any
    // update, unless one is given (a run continuing a trained model must still distil from
    // the original); a resumed run gets it from the same arguments, which must be those.
    let distill_teacher = match (cfg.recipe.distills(), inputs.teacher) {
        (true, None) => Some(distill::Teacher::new(&model)?),
        (true, Some(teacher)) => Some(distill::Teacher::other(teacher, &model)?),
        (false, Some(_)) => bail!(
            "--teacher: the {} recipe does not distil (distill and transfer+distill do)",
            cfg.recipe.name()
        ),
        (false, None) => None,
    };
    // From the model given, before any update, as the teacher: a resume weighs as the start.
    let gap = if cfg.gap_weight == 0.0 {
        None
    } else {
        Some(distill::GapWeights::new(&model, cfg.gap_weight)?)
    };
    let (mut model, opt_state, mut progress) = start_or_resume(model, cfg, inputs, &run_config)?;
    if let Some(t) = &distill_teacher {
        if !inputs.resume {
            progress.teacher = t.fingerprint().to_string();
        } else if progress.teacher != t.fingerprint() {
            bail!("--resume: the teacher is not the one this run started distilling from; resume with the same model argument (and --teacher)");
        }
    }
    if cfg.recipe.adapts() && cfg.lora_rank > 0 && !inputs.resume {
        crate::train::lora::add(&mut model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)?;
    }
    let trained = recipe::trainable(&model, cfg.recipe, &cfg.freeze)?;
    check_memory(&model, &trained, cfg)?;
    std::fs::create_dir_all(inputs.out)
        .with_context(|| format!("cannot create {}", inputs.out.display()))?;
    let mut data = Data::open(cfg, inputs, &model, &mut progress)?;
    if cfg.recipe.uses_transfer() && !inputs.resume {
        progress.wo_scales = calibrate(&mut model, &mut data, cfg)?;
    }
    let mut trainer = Trainer::new(&model, &trained, cfg, &progress, distill_teacher, gap)?;
    if let Some(state) = &opt_state {
        trainer.opt.load_state(state)?;
    }
    eprintln!(
        "training {:.2} M of {:.2} M parameters ({} recipe) on {} tokens ({} windows of {}), {} windows per update",
        trained.iter().map(|p| p.shape.iter().product::<usize>()).sum::<usize>() as f64 / 1e6,
        model.config.param_count() as f64 / 1e6,
        cfg.recipe.name(),
        data.stream.len(),
        data.windows.count,
        cfg.seq_len,
        cfg.windows_per_step()
    );
    let snapshot = |weights: &Weights| LoadedModel {
        config: model.config.clone(),
        weights: weights.clone(),
        tokenizer: model.tokenizer.clone(),
    };
    let mut log = MetricsLog::open(inputs, &progress, cfg)?;
    let end = inputs
        .stop_after
        .map_or(cfg.steps, |n| (progress.step + n).min(cfg.steps));
    let mut bad_in_a_row = 0;
    while progress.step < end {
        let mut m = trainer.update(&mut data, &mut progress)?;
        if m.skipped {
            bad_in_a_row += 1;
            log.bar.println(format!(
                "step {}: loss {}, gradient norm {}: update skipped",
                m.step, m.loss, m.grad_norm
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
        }
        if let Some(v) = &data.valid {
            if progress.step % cfg.eval_every == 0 || progress.step == cfg.steps {
                m.val_loss = Some(trainer.validate(v, m.objective)?);
            }
        }
        log.record(m)?;
        if progress.step % cfg.checkpoint_every == 0 || progress.step == end {
            checkpoint::save(
                inputs.out,
                &snapshot(&trainer.weights),
                &trainer.opt.state()?,
                &progress,
                &run_config,
                cfg.keep,
            )?;
        }
    }
    log.bar.finish();
    let final_dir = if progress.step == cfg.steps {
        let dir = inputs.out.join("final");
        let merged = crate::train::lora::merge(&snapshot(&trainer.weights))?;
        crate::io::hf_dir::save(&merged, &dir)?;
        Some(dir)
    } else {
        None
    };
    Ok(Summary {
        steps_done: progress.step,
        last: log.history.last().cloned(),
        final_dir,
        history: log.history,
    })
}

fn check_settings(cfg: &TrainConfig, model: &LoadedModel) -> Result<()> {
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
    if let Some(min) = cfg.min_window {
        let Some(w) = model_window(model).map(|w| w.window) else {
            bail!("--min-window applies to models with window layers; this one has none");
        };
        if min == 0 || min > w {
            bail!("--min-window {min} must be between 1 and the model's window, {w}");
        }
    }
    for (flag, k) in [
        ("--mix-lr-scale", cfg.mix_lr_scale),
        ("--beta-lr-scale", cfg.beta_lr_scale),
    ] {
        if !(k.is_finite() && k > 0.0) {
            bail!("{flag} {k} must be a positive number");
        }
    }
    let window = model_window(model);
    if cfg.mix_lr_scale != 1.0 && window.is_none() {
        bail!("--mix-lr-scale applies to models with window layers; this one has none");
    }
    if cfg.beta_lr_scale != 1.0 && window.is_none_or(|w| w.rule != LinearRule::Delta) {
        bail!("--beta-lr-scale applies to window layers with the delta rule; this model has none");
    }
    if cfg.gap_weight != 0.0 && !cfg.recipe.distills() {
        bail!(
            "--gap-weight: the {} recipe does not distil (distill and transfer+distill do)",
            cfg.recipe.name()
        );
    }
    Ok(())
}

/// The settings of the model's window layers, if it has any.
fn model_window(model: &LoadedModel) -> Option<WindowConfig> {
    let c = &model.config;
    c.layer_kinds
        .contains(&AttentionKind::Window)
        .then(|| c.supra.as_ref()?.window)
        .flatten()
}

/// The window update `step` trains at under `--min-window min` for a model window of `full`:
/// uniform over min..=full, from the run's seed and the step alone, so a resumed run draws
/// the same ones.
fn drawn_window(seed: u64, step: u64, min: usize, full: usize) -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    rng.random_range(min..=full)
}

/// AdamW's moments and step counts, by name, as a checkpoint holds them.
type OptimizerState = HashMap<String, Tensor>;

/// The model, optimizer state and progress to start from: `model` at step 0, or the latest
/// checkpoint of the run (whose settings must be these).
fn start_or_resume(
    model: LoadedModel,
    cfg: &TrainConfig,
    inputs: &TrainInputs,
    run_config: &serde_json::Value,
) -> Result<(LoadedModel, Option<OptimizerState>, Progress)> {
    checkpoint::sweep_temporaries(inputs.out)?;
    if inputs.resume {
        let ck = checkpoint::load_latest(inputs.out)?;
        if ck.run_config != *run_config {
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
        return Ok((ck.model, Some(ck.optimizer), ck.progress));
    }
    if !checkpoint::list(inputs.out)?.is_empty() {
        bail!(
            "{} already holds checkpoints; pass --resume to continue that run, or choose another --out",
            inputs.out.display()
        );
    }
    let progress = Progress {
        step: 0,
        cursor: 0,
        tokens: 0,
        seed: cfg.seed,
        wo_scales: Vec::new(),
        data: String::new(),
        teacher: String::new(),
    };
    Ok((model, None, progress))
}

fn check_memory(model: &LoadedModel, trained: &[Param], cfg: &TrainConfig) -> Result<()> {
    let n_trained: usize = trained
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let need = memory_estimate(model, n_trained, cfg);
    if let Some(avail) = mem_available_bytes().filter(|&a| need > a) {
        bail!(
            "this run needs about {:.1} GiB of memory, only {:.1} GiB is available: lower --micro-batch or --seq-len",
            need as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

/// The training windows in their seeded order, and the validation text.
struct Data {
    stream: TokenStream,
    windows: Windows,
    valid: Option<TokenStream>,
    seq_len: usize,
}

impl Data {
    fn open(
        cfg: &TrainConfig,
        inputs: &TrainInputs,
        model: &LoadedModel,
        progress: &mut Progress,
    ) -> Result<Self> {
        let stream = TokenStream::build(inputs.data, &model.tokenizer, inputs.token_cache)?;
        let windows = Windows::new(&stream, cfg.seq_len, cfg.seed)?;
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
        Ok(Self {
            stream,
            windows,
            valid,
            seq_len: cfg.seq_len,
        })
    }

    /// Windows number `cursor..cursor + n` of the data order, as one batch.
    fn batch(&mut self, cursor: u64, n: usize) -> Result<Tensor> {
        let starts: Vec<usize> = (0..n as u64)
            .map(|i| self.windows.start(cursor + i))
            .collect();
        batch(&self.stream, &starts, self.seq_len)
    }
}

/// Scales Wo to the teacher's per-head output (the transfer recipes), measured on the first
/// windows of the data order: deterministic, before any update.
fn calibrate(
    model: &mut LoadedModel,
    data: &mut Data,
    cfg: &TrainConfig,
) -> Result<Vec<Option<Vec<f32>>>> {
    if !model
        .config
        .layer_kinds
        .contains(&crate::config::AttentionKind::Supra)
    {
        // Window layers normalise as softmax does: their output is at the teacher's scale.
        return Ok(vec![None; model.config.num_hidden_layers]);
    }
    let n = CALIBRATION_WINDOWS.min(data.windows.count);
    let batches = (0..n as u64)
        .map(|i| Ok(data.batch(i, 1)?.narrow(1, 0, cfg.seq_len)?))
        .collect::<Result<Vec<_>>>()?;
    let scales = transfer::calibrate_output_scale(model, &batches)?;
    let all: Vec<f32> = scales.iter().flatten().flatten().copied().collect();
    let mean = all.iter().sum::<f32>() / all.len().max(1) as f32;
    eprintln!("calibrated Wo to the teacher's per-head output scale on {n} windows (mean factor {mean:.3})");
    Ok(scales)
}

/// The trained weights, the model built over them for each objective, the optimizer and the
/// schedules.
struct Trainer<'a> {
    cfg: &'a TrainConfig,
    /// Every weight; the trained ones share storage with the optimizer's variables.
    weights: Weights,
    opt: AdamW,
    targets: Targets,
    transfer_model: Llama,
    /// The model for the objective after transfer (cross-entropy or distillation).
    tune_model: Llama,
    /// Two-phase recipes run two schedules: one over the transfer updates, one over the rest.
    transfer_schedule: Schedule,
    schedule: Schedule,
    /// Updates of the transfer schedule before the cross-entropy one starts.
    offset: u64,
    /// The window layers' own window, restored after an update trained at a drawn one.
    full_window: Option<usize>,
}

impl<'a> Trainer<'a> {
    fn new(
        model: &LoadedModel,
        trained: &[Param],
        cfg: &'a TrainConfig,
        progress: &Progress,
        distill: Option<distill::Teacher>,
        gap: Option<distill::GapWeights>,
    ) -> Result<Self> {
        let (weights, vars) = recipe::with_variables(model, trained)?;
        let table = params::by_name(&model.config);
        // One view of the weights per objective, in which only what that phase trains is a
        // variable: in the transfer phase of a two-phase recipe the LoRA adapters (trained
        // later) would otherwise drag the backward pass through every layer's value path.
        let phase_model = |objective| -> Result<Llama> {
            let view: Weights = weights
                .iter()
                .map(|(n, t)| {
                    let trains = table
                        .get(n)
                        .is_some_and(|p| recipe::phase_trains(objective, p.group));
                    (n.clone(), if trains { t.clone() } else { t.detach() })
                })
                .collect();
            Llama::for_training(&model.config, &view)
        };
        let mut opt = AdamW::new(
            vars,
            AdamWConfig {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.adam_eps,
                weight_decay: cfg.weight_decay,
            },
        );
        opt.set_lr_scale(|name| {
            if name.ends_with(".window_mix") {
                cfg.mix_lr_scale
            } else if name.ends_with(".window_beta") {
                cfg.beta_lr_scale
            } else {
                1.0
            }
        });
        let offset = if cfg.recipe.has_transfer_phase() {
            cfg.transfer_steps.min(cfg.steps)
        } else {
            0
        };
        Ok(Self {
            cfg,
            opt,
            targets: Targets {
                // The teacher's hidden states must not see the calibration.
                transfer: transfer::Teacher::new(model, &progress.wo_scales, cfg.transfer_target)?,
                distill,
                gap,
                z_loss: cfg.z_loss,
                temperature: cfg.temperature,
                ce_weight: cfg.ce_weight,
            },
            transfer_model: phase_model(Objective::Transfer)?,
            tune_model: phase_model(cfg.recipe.objective(u64::MAX, 0))?,
            weights,
            transfer_schedule: Schedule {
                max_lr: cfg.transfer_lr,
                min_lr: cfg.transfer_min_lr,
                warmup_steps: cfg.transfer_warmup_steps,
                total_steps: cfg.transfer_steps,
            },
            schedule: Schedule {
                max_lr: cfg.lr,
                min_lr: cfg.min_lr,
                warmup_steps: cfg.warmup_steps,
                total_steps: cfg.steps - offset,
            },
            offset,
            full_window: model_window(model).map(|w| w.window),
        })
    }

    /// Runs the window layers of both phases' models at `window` tokens.
    fn set_window(&mut self, window: usize) {
        self.transfer_model.set_window(window);
        self.tune_model.set_window(window);
    }

    fn model(&self, objective: Objective) -> &Llama {
        match objective {
            Objective::Transfer => &self.transfer_model,
            Objective::Ce | Objective::Distill => &self.tune_model,
        }
    }

    /// One optimizer update: forward and backward over the update's windows, micro-batch by
    /// micro-batch, then the clipped step (or none, when the loss or gradient is not finite).
    fn update(&mut self, data: &mut Data, progress: &mut Progress) -> Result<Metrics> {
        let (cfg, t0) = (self.cfg, Instant::now());
        let objective = cfg.recipe.objective(progress.step, cfg.transfer_steps);
        self.opt
            .set_active(|group| recipe::phase_trains(objective, group));
        let lr = if progress.step < self.offset {
            self.transfer_schedule.lr(progress.step)
        } else {
            self.schedule.lr(progress.step - self.offset)
        };
        let per_step = cfg.windows_per_step();
        let full = self.full_window;
        let drawn = cfg
            .min_window
            .zip(full)
            .map(|(min, full)| drawn_window(cfg.seed, progress.step, min, full));
        if let Some(w) = drawn {
            self.set_window(w);
        }
        let summed = self.accumulate(data, progress, objective);
        if let (Some(_), Some(full)) = (drawn, full) {
            self.set_window(full);
        }
        let loss = summed? / per_step as f64;
        let grad_norm = self.opt.grad_norm()?;
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if skipped {
            self.opt.zero_grad();
        } else {
            self.opt.step(lr, clip_scale(grad_norm, cfg.clip))?;
        }
        progress.step += 1;
        progress.tokens += (per_step * cfg.seq_len) as u64;
        Ok(Metrics {
            step: progress.step,
            tokens: progress.tokens,
            objective,
            loss,
            val_loss: None,
            lr,
            grad_norm,
            tokens_per_s: (per_step * cfg.seq_len) as f64 / t0.elapsed().as_secs_f64(),
            skipped,
            window: drawn,
        })
    }

    /// Forward and backward over the update's windows, micro-batch by micro-batch, into the
    /// optimizer's gradient; returns the loss summed over windows.
    fn accumulate(
        &mut self,
        data: &mut Data,
        progress: &mut Progress,
        objective: Objective,
    ) -> Result<f64> {
        let per_step = self.cfg.windows_per_step();
        let (mut loss_sum, mut done) = (0.0, 0);
        while done < per_step {
            let n = self.cfg.micro_batch.min(per_step - done);
            let windows = data.batch(progress.cursor, n)?;
            let model = self.model(objective);
            let loss = recipe::loss(model, &self.targets, objective, &windows, true)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
            let grads = loss.backward()?;
            self.opt.accumulate(&grads, n as f32 / per_step as f32)?;
            progress.cursor += n as u64;
            done += n;
        }
        Ok(loss_sum)
    }

    /// The objective's mean loss over the first `eval_windows` windows of `valid`.
    fn validate(&self, valid: &TokenStream, objective: Objective) -> Result<f64> {
        evaluate(
            self.model(objective),
            &self.targets,
            objective,
            valid,
            self.cfg,
        )
    }
}

/// The factor that brings a gradient of norm `grad_norm` within `clip`.
fn clip_scale(grad_norm: f64, clip: f64) -> f64 {
    if grad_norm > clip {
        clip / grad_norm
    } else {
        1.0
    }
}

/// metrics.jsonl (kept up to the resumed step), the loss plot and the progress bar.
struct MetricsLog<'a> {
    file: std::fs::File,
    path: PathBuf,
    out: &'a Path,
    cfg: &'a TrainConfig,
    bar: indicatif::ProgressBar,
    history: Vec<Metrics>,
}

impl<'a> MetricsLog<'a> {
    fn open(inputs: &'a TrainInputs, progress: &Progress, cfg: &'a TrainConfig) -> Result<Self> {
        let path = inputs.out.join("metrics.jsonl");
        // Lines after the resumed step belong to work that the checkpoint does not hold.
        let kept: Vec<String> = match std::fs::read_to_string(&path) {
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
        crate::io::atomic_write(&path, kept.concat().as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        let bar = indicatif::ProgressBar::new(cfg.steps).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps {msg} [{elapsed}<{eta}]",
            )
            .expect("valid template"),
        );
        bar.set_position(progress.step);
        Ok(Self {
            file,
            path,
            out: inputs.out,
            cfg,
            bar,
            history: Vec::new(),
        })
    }

    fn record(&mut self, m: Metrics) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(&m)?)?;
        self.file.flush()?;
        self.bar.set_position(m.step);
        self.bar.set_message(format!(
            "loss {:.4}{} lr {:.1e} {:.0} tok/s",
            m.loss,
            m.val_loss.map_or(String::new(), |v| format!(" val {v:.4}")),
            m.lr,
            m.tokens_per_s
        ));
        if m.val_loss.is_some() {
            // A plot is a convenience: never stop a run for it.
            if let Err(e) = plot_all(self.out, &self.path, self.cfg) {
                self.bar
                    .println(format!("warning: loss plot not updated: {e:#}"));
            }
        }
        self.history.push(m);
        Ok(())
    }
}
