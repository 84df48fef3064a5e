//! `supra train` and `supra linearize`.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use supra::io::fetch;
use supra::train::preset;
use supra::train::run::{TrainConfig, TrainInputs};

use super::data_dir;
use super::model::ModelArg;

#[derive(Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// Training text: .txt, .txt.gz or .jsonl files, or directories of them.
    #[arg(long, required = true, num_args = 1..)]
    pub(crate) data: Vec<PathBuf>,
    /// Run directory (checkpoints, metrics, final model).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// The recipe's preset (listed below): what trains, on which loss, and every
    /// hyperparameter the flags below do not set.
    #[arg(long, default_value = "transfer", value_parser = PRESET_NAMES)]
    pub(crate) recipe: String,
    /// Validation text [default: DATA_DIR/text/valid when it exists].
    #[arg(long, num_args = 1..)]
    pub(crate) valid: Vec<PathBuf>,
    /// Do not validate.
    #[arg(long, conflicts_with = "valid")]
    pub(crate) no_valid: bool,
    /// Shared data directory [default: $SUPRA_DATA_DIR or ../shared/data].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Tokens per training window [default: the recipe's].
    #[arg(long)]
    pub(crate) seq_len: Option<usize>,
    /// Tokens per optimizer update (whole windows; gradients accumulate) [default: the
    /// recipe's].
    #[arg(long)]
    pub(crate) batch_tokens: Option<usize>,
    /// Windows per forward/backward pass.
    #[arg(long, default_value_t = 1)]
    pub(crate) micro_batch: usize,
    /// Training tokens in all, both phases of transfer+finetune included (sets the number of
    /// updates) [default: the recipe's, 262,144].
    #[arg(long, conflicts_with = "steps")]
    pub(crate) tokens: Option<u64>,
    /// transfer+finetune, transfer+distill: tokens of the transfer phase [default: half of
    /// the run].
    #[arg(long)]
    pub(crate) transfer_tokens: Option<u64>,
    /// transfer+finetune, transfer+distill: peak learning rate of the transfer phase
    /// [default: the recipe's].
    #[arg(long)]
    pub(crate) transfer_lr: Option<f64>,
    /// transfer, transfer+finetune, transfer+distill: what a SUPRA layer's per-head output
    /// matches, normalized (the teacher's GroupNorm'd like the layer's own) or raw (the
    /// teacher's as it is, against the layer's times its Wo calibration factor, as LoLCATs
    /// compares outputs) [default: normalized]. Window layers always match the raw output.
    #[arg(long)]
    pub(crate) transfer_target: Option<supra::train::transfer::Target>,
    /// transfer+finetune, distill, transfer+distill: what trains besides φ, lora (adapters on
    /// q, k, v, o, merged into the weights of the final model) or all (every parameter, less
    /// --freeze) [default: lora].
    #[arg(long)]
    pub(crate) train: Option<preset::Trainable>,
    /// transfer+finetune, distill, transfer+distill: LoRA rank; 0 is --train all [default: 16].
    #[arg(long)]
    pub(crate) lora_rank: Option<usize>,
    /// LoRA alpha (the adapter is scaled by alpha / rank) [default: the rank].
    #[arg(long)]
    pub(crate) lora_alpha: Option<f64>,
    /// distill, transfer+distill: temperature T of the KL to the teacher (the loss is scaled
    /// by T², so the gradient's size does not depend on it) [default: 1].
    #[arg(long)]
    pub(crate) temperature: Option<f64>,
    /// distill, transfer+distill: the teacher whose next-token distribution is learnt (GGUF
    /// file or HF directory; the same vocabulary) [default: MODEL with every layer softmax
    /// attention]. Give the original model when MODEL is an already trained one.
    #[arg(long)]
    pub(crate) teacher: Option<PathBuf>,
    /// distill, transfer+distill: weight of the data's cross-entropy added to the KL
    /// [default: 0, pure distillation].
    #[arg(long)]
    pub(crate) ce_weight: Option<f64>,
    /// Window layers: each update trains at a window drawn uniformly from N tokens up to the
    /// model's window (the same draws on a resume), so that the linear state must carry what
    /// a shorter window drops; validation and the final model keep the model's window
    /// [default: always the model's window].
    #[arg(long, value_name = "N")]
    pub(crate) min_window: Option<usize>,
    /// distill, transfer+distill on window models: the share (0 to 1) of each token's weight
    /// in the KL that follows how much the teacher's prediction there gains over its own
    /// window (KL(teacher ‖ the starting model with its linear branch off)), the rest even;
    /// weights average 1 and validation stays even. Pushes the linear state toward the
    /// tokens that need the long context [default: 0, every token the same].
    #[arg(long, value_name = "SHARE")]
    pub(crate) gap_weight: Option<f64>,
    /// Window models: the mix θ (each head's linear share α = sigmoid(θ)) learns K times the
    /// learning rate of every other parameter. At the presets' rates Adam moves θ about one
    /// learning rate per update, so a short run leaves α where it started [default: 1].
    #[arg(long, value_name = "K")]
    pub(crate) mix_lr_scale: Option<f64>,
    /// Window models with the delta rule: the write strength β's parameters (β =
    /// sigmoid(w·k̂ + b) per head) learn K times the learning rate of every other parameter;
    /// at the presets' rates β stays near its start, 0.5, in a short run [default: 1].
    #[arg(long, value_name = "K")]
    pub(crate) beta_lr_scale: Option<f64>,
    /// Number of updates (instead of --tokens).
    #[arg(long)]
    pub(crate) steps: Option<u64>,
    /// Peak learning rate [default: the recipe's].
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Final learning rate of the cosine schedule [default: the recipe's ratio to its peak].
    #[arg(long)]
    pub(crate) min_lr: Option<f64>,
    /// Linear warmup updates [default: the recipe's].
    #[arg(long)]
    pub(crate) warmup_steps: Option<u64>,
    /// AdamW's decoupled weight decay (norms, biases and the embedding are exempt)
    /// [default: the recipe's].
    #[arg(long)]
    pub(crate) weight_decay: Option<f64>,
    /// Global gradient-norm clipping threshold [default: the recipe's].
    #[arg(long)]
    pub(crate) clip: Option<f64>,
    /// Weight of the z-loss mean(log Z)² added to the cross-entropy [default: the recipe's].
    #[arg(long)]
    pub(crate) z_loss: Option<f64>,
    /// Validate every N updates (and at the end).
    #[arg(long, default_value_t = 25)]
    pub(crate) eval_every: u64,
    /// Validation windows.
    #[arg(long, default_value_t = 8)]
    pub(crate) eval_windows: usize,
    /// Checkpoint every N updates (and at the end).
    #[arg(long, default_value_t = 50)]
    pub(crate) checkpoint_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    pub(crate) keep: usize,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Parameter groups held fixed in full fine-tuning, comma-separated: embeddings
    /// (embedding and head), embedding, head, attention, phi, mlp, norms.
    #[arg(long)]
    pub(crate) freeze: Option<String>,
    /// Non-finite updates in a row before the run stops.
    #[arg(long, default_value_t = 5)]
    pub(crate) max_bad_steps: usize,
    /// Continue the run in --out from its latest checkpoint (same settings).
    #[arg(long)]
    pub(crate) resume: bool,
    /// Stop after this many updates in this invocation (resume later with --resume).
    #[arg(long)]
    pub(crate) stop_after: Option<u64>,
}

/// `supra linearize`'s training budget: about 15 minutes of the default recipe on 2 cores.
const DEFAULT_TOKENS: u64 = 131_072;

const PRESET_NAMES: [&str; 6] = [
    "supra-paper",
    "supra",
    "transfer",
    "transfer+finetune",
    "distill",
    "transfer+distill",
];

impl TrainArgs {
    /// Every hyperparameter: the preset's, with the flags on top.
    fn config(&self) -> Result<TrainConfig> {
        let o = preset::Overrides {
            seq_len: self.seq_len,
            batch_tokens: self.batch_tokens,
            tokens: self.tokens,
            steps: self.steps,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            clip: self.clip,
            z_loss: self.z_loss,
            transfer_tokens: self.transfer_tokens,
            transfer_lr: self.transfer_lr,
            transfer_target: self.transfer_target,
            train: self.train,
            lora_rank: self.lora_rank,
            lora_alpha: self.lora_alpha,
            temperature: self.temperature,
            ce_weight: self.ce_weight,
            min_window: self.min_window,
            gap_weight: self.gap_weight,
            mix_lr_scale: self.mix_lr_scale,
            beta_lr_scale: self.beta_lr_scale,
            freeze: match &self.freeze {
                Some(s) => supra::model::params::ParamGroup::parse_list(s)?,
                None => Vec::new(),
            },
        };
        let run = preset::RunSettings {
            micro_batch: self.micro_batch,
            eval_every: self.eval_every,
            eval_windows: self.eval_windows,
            checkpoint_every: self.checkpoint_every,
            keep: self.keep,
            seed: self.seed,
            max_bad_steps: self.max_bad_steps,
        };
        preset::find(&self.recipe)?.resolve(&o, &run)
    }
}

pub(crate) fn train(a: &TrainArgs) -> Result<()> {
    let cfg = a.config()?;
    let (loaded, _) = a.model.load()?;
    let default_valid = data_dir(&a.data_dir).join("text/valid");
    let valid: Option<Vec<PathBuf>> = if a.no_valid {
        None
    } else if !a.valid.is_empty() {
        Some(a.valid.clone())
    } else if default_valid.exists() {
        Some(vec![default_valid])
    } else {
        eprintln!(
            "no validation data ({} does not exist; use --valid or --data-dir)",
            default_valid.display()
        );
        None
    };
    let teacher = match &a.teacher {
        Some(p) => Some(supra::io::load(p).with_context(|| format!("--teacher {}", p.display()))?),
        None => None,
    };
    let token_cache = fetch::cache_dir().join("tokens");
    let inputs = TrainInputs {
        data: &a.data,
        valid: valid.as_deref(),
        out: &a.out,
        resume: a.resume,
        stop_after: a.stop_after,
        token_cache: &token_cache,
        teacher: teacher.as_ref(),
    };
    let summary = supra::train::run::train(loaded, &cfg, &inputs)?;
    if let Some(m) = &summary.last {
        eprintln!(
            "step {}/{}: loss {:.4}{}",
            summary.steps_done,
            cfg.steps,
            m.loss,
            m.val_loss
                .map_or(String::new(), |v| format!(", validation loss {v:.4}"))
        );
    }
    match &summary.final_dir {
        Some(d) => eprintln!("final model: {}", d.display()),
        None => eprintln!(
            "stopped at step {}; continue with --resume",
            summary.steps_done
        ),
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct LinearizeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// Output directory: converted/, run/ (checkpoints, metrics), run/final (the linear model),
    /// report.json. Running again continues an unfinished run.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Training tokens, both phases of a two-phase recipe together.
    #[arg(long, default_value_t = DEFAULT_TOKENS)]
    pub(crate) tokens: u64,
    /// The training recipe (a preset of `supra train`, at this command's budget).
    #[arg(long, default_value = "transfer+distill", value_parser = PRESET_NAMES)]
    pub(crate) recipe: String,
    /// Exact softmax attention over the last W tokens (and 4 sinks) beside each layer's linear
    /// state, which stays constant in the context; 0 converts to pure linear layers (the
    /// paper's RNN, further from the teacher at this budget). 256 reads the teacher's held-out
    /// perplexity after 131,072 tokens where 64 reads 1.11× (docs/results/quality.md).
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// Feature map of the linear branch (see `supra convert --help`; relu and hedgehog tie on
    /// text/valid after 262,144 tokens of transfer+distill, docs/results/quality.md, and relu
    /// trains in less time; taylor's state carried less at window 128 and trains slower).
    #[arg(long, default_value = "relu")]
    pub(crate) feature_map: supra::config::FeatureKind,
    /// Training text [default: DATA_DIR/text/train].
    #[arg(long, num_args = 1..)]
    pub(crate) data: Vec<PathBuf>,
    /// Shared data directory [default: $SUPRA_DATA_DIR or ../shared/data].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Tokens per training window: longer than the attention window, so that the linear state
    /// learns to carry what falls out of it (2,048 moved the long positions most).
    #[arg(long, default_value_t = 2048)]
    pub(crate) seq_len: usize,
    /// Tokens per optimizer update.
    #[arg(long, default_value_t = 4096)]
    pub(crate) batch_tokens: usize,
    /// Held-out tokens for perplexity (from DATA_DIR/text/test).
    #[arg(long, default_value_t = 8192)]
    pub(crate) eval_tokens: usize,
    /// Tokens per perplexity window (each window starts with no history, as `supra score
    /// --window` scores; docs/results/quality.md uses 512).
    #[arg(long, default_value_t = 512)]
    pub(crate) eval_window: usize,
    /// Prompt for the sample.
    #[arg(long, default_value = "The old house at the end of the lane")]
    pub(crate) prompt: String,
}

pub(crate) fn linearize(a: &LinearizeArgs) -> Result<()> {
    // Checked before training, not after it.
    if a.eval_window < 2 || a.eval_tokens < 2 {
        bail!(
            "--eval-window {} and --eval-tokens {}: perplexity needs at least 2 of each",
            a.eval_window,
            a.eval_tokens
        );
    }
    let dir = data_dir(&a.data_dir);
    let data = if a.data.is_empty() {
        vec![dir.join("text/train")]
    } else {
        a.data.clone()
    };
    let valid = dir.join("text/valid");
    let test = dir.join("text/test");
    for p in data.iter().chain([&test]) {
        if !p.exists() {
            bail!("{} does not exist (give --data-dir, or set SUPRA_DATA_DIR, to the shared data directory)", p.display());
        }
    }
    // The recipe's preset at this command's budget, validated and checkpointed four times.
    let o = preset::Overrides {
        seq_len: Some(a.seq_len),
        batch_tokens: Some(a.batch_tokens),
        tokens: Some(a.tokens),
        ..Default::default()
    };
    let recipe = preset::find(&a.recipe)?;
    let mut run = preset::RunSettings {
        eval_windows: 4,
        ..Default::default()
    };
    let quarter = (recipe.resolve(&o, &run)?.steps / 4).max(1);
    (run.eval_every, run.checkpoint_every) = (quarter, quarter);
    let cfg = recipe.resolve(&o, &run)?;
    let convert = supra::convert::ConvertOptions {
        feature_map: a.feature_map,
        phi_init: match a.feature_map {
            supra::config::FeatureKind::Hedgehog => supra::config::PhiInit::Identity,
            supra::config::FeatureKind::Relu | supra::config::FeatureKind::Taylor => {
                supra::config::PhiInit::Random
            }
        },
        window: (a.window > 0).then_some(supra::config::WindowConfig {
            window: a.window,
            sinks: 4,
            mix: supra::config::Mix::Shared,
            sink_positions: supra::config::SinkPositions::Cache,
            rule: supra::config::LinearRule::Add,
        }),
        ..Default::default()
    };
    eprintln!("loading the teacher");
    let (teacher, _) = a.model.load()?;
    let opts = supra::linearize::LinearizeOptions {
        out: a.out.clone(),
        convert,
        train: cfg,
        data,
        valid: valid.exists().then(|| vec![valid]),
        test,
        eval_tokens: a.eval_tokens,
        eval_window: a.eval_window,
        prompt: a.prompt.clone(),
        token_cache: fetch::cache_dir().join("tokens"),
    };
    let r = supra::linearize::linearize(teacher, &opts)?;
    println!("| model | held-out perplexity | × teacher | tokens scored |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, p: &supra::eval::perplexity::Perplexity| {
        println!(
            "| {name} | {:.2} | {:.2} | {} |",
            p.ppl,
            p.ppl / r.teacher.ppl,
            p.tokens
        )
    };
    row("teacher (softmax attention)", &r.teacher);
    if let Some(c) = &r.control {
        row("window-only control (untrained, linear branch off)", c);
    }
    row("converted, untrained", &r.converted);
    row(
        &format!("linear, after {} on {} tokens", r.recipe, r.train_tokens),
        &r.linear,
    );
    println!("\nlinear model: {}", a.out.join("run/final").display());
    Ok(())
}
