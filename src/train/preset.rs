//! Training presets: every hyperparameter of a recipe in one place, as data. `supra train
//! --recipe NAME` starts from one; each flag overrides a value; `run.json` records the result.
//!
//! `supra-paper` is the paper's setting (Mercat et al. 2024, §4, and the open_lm code it trained
//! with). The others are for small budgets on a CPU, and say how they differ from it.

use crate::model::params::ParamGroup;
use crate::train::recipe::Recipe;
use crate::train::run::TrainConfig;
use anyhow::{bail, Result};

/// Linear warmup length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    Steps(u64),
    /// This percentage of the run's updates (rounded down).
    Percent(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub recipe: Recipe,
    pub about: &'static str,
    pub seq_len: usize,
    /// Tokens per optimizer update.
    pub batch_tokens: usize,
    /// Training tokens when the run does not say.
    pub tokens: u64,
    /// Peak learning rate, and the cosine schedule's floor.
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: Warmup,
    /// AdamW: β₁, β₂, ε and the decoupled weight decay (on the parameters the parameter table
    /// marks for it: not norms, biases or the embedding, as open_lm excludes them).
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping.
    pub clip: f64,
    /// Weight of the z-loss, mean(log Z)², added to the cross-entropy.
    pub z_loss: f64,
    /// Two-phase recipes: the transfer phase's share of the tokens and its peak learning rate
    /// (its floor is a tenth of it, its warmup 5 % of its updates).
    pub transfer_percent: u64,
    pub transfer_lr: f64,
    /// The fine-tuning recipes (after transfer, or distillation alone): LoRA rank (0: all
    /// parameters).
    pub lora_rank: usize,
    /// Distillation: temperature, and the weight of the data's cross-entropy added to the KL.
    pub temperature: f64,
    pub ce_weight: f64,
    /// How it departs from `supra-paper`; empty for the paper's own.
    pub deviations: &'static [&'static str],
}

const PAPER: Preset = Preset {
    name: "supra-paper",
    recipe: Recipe::Supra,
    about: "the paper's uptraining: cross-entropy through the whole model",
    seq_len: 2048,
    batch_tokens: 8192,
    tokens: 262_144,
    lr: 3e-5,
    min_lr: 1e-5,
    warmup: Warmup::Steps(1000),
    betas: (0.9, 0.95),
    eps: 1e-8,
    weight_decay: 0.1,
    clip: 1.0,
    z_loss: 1e-4,
    transfer_percent: 0,
    transfer_lr: 0.0,
    lora_rank: 0,
    temperature: 1.0,
    ce_weight: 0.0,
    deviations: &[
        "batch 8,192 tokens per update: the paper's global batch of many GPUs does not fit one CPU",
    ],
};

pub const PRESETS: [Preset; 6] = [
    PAPER,
    Preset {
        name: "supra",
        about: "the paper's recipe at a small budget",
        seq_len: 512,
        batch_tokens: 4096,
        lr: 3e-4,
        min_lr: 3e-5,
        warmup: Warmup::Percent(5),
        z_loss: 0.0,
        deviations: &[
            "lr 3e-4 → 3e-5 (paper 3e-5 → 1e-5): ten times higher, to move in a few hundred updates",
            "warmup 5 % of the updates (paper 1,000 steps, longer than a small run)",
            "sequence 512 tokens (paper 2,048), batch 4,096 tokens",
            "no z-loss (paper 1e-4)",
        ],
        ..PAPER
    },
    Preset {
        name: "transfer",
        recipe: Recipe::Transfer,
        about: "attention transfer: only φ, each SUPRA layer matching the teacher's attention output",
        seq_len: 512,
        batch_tokens: 4096,
        tokens: 262_144,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup: Warmup::Percent(5),
        z_loss: 0.0,
        deviations: &[
            "not in the paper: LoLCATs' stage 1 (per-layer MSE to the teacher's attention output), φ only",
            "lr 1e-3 → 1e-4, warmup 5 % of the updates, sequence 512, batch 4,096 tokens",
        ],
        ..PAPER
    },
    Preset {
        name: "transfer+finetune",
        recipe: Recipe::TransferFinetune,
        about: "transfer for a share of the tokens, then cross-entropy on LoRA adapters (q, k, v, o) plus φ",
        seq_len: 512,
        batch_tokens: 4096,
        tokens: 262_144,
        lr: 3e-4,
        min_lr: 3e-5,
        warmup: Warmup::Percent(5),
        z_loss: 0.0,
        transfer_percent: 50,
        transfer_lr: 1e-3,
        lora_rank: 16,
        deviations: &[
            "not in the paper: half the tokens of attention transfer (lr 1e-3), then LoRA rank 16 on q, k, v, o plus φ",
            "fine-tuning lr 3e-4 → 3e-5, warmup 5 % of its updates, sequence 512, batch 4,096 tokens, no z-loss",
        ],
        ..PAPER
    },
    Preset {
        name: "distill",
        recipe: Recipe::Distill,
        about: "distillation: KL to the teacher's next-token distribution (full vocabulary, computed online), on LoRA adapters (q, k, v, o) plus φ",
        seq_len: 512,
        batch_tokens: 4096,
        tokens: 262_144,
        lr: 3e-4,
        min_lr: 3e-5,
        warmup: Warmup::Percent(5),
        z_loss: 0.0,
        lora_rank: 16,
        deviations: &[
            "not in the paper: the teacher's logits as the target instead of the data's next token (as the end-to-end stage of Mamba-in-the-Llama and RADLADS), LoRA rank 16 on q, k, v, o plus φ",
            "lr 3e-4 → 3e-5, warmup 5 % of the updates, sequence 512, batch 4,096 tokens",
        ],
        ..PAPER
    },
    Preset {
        name: "transfer+distill",
        recipe: Recipe::TransferDistill,
        about: "transfer for a share of the tokens, then distillation on LoRA adapters (q, k, v, o) plus φ",
        seq_len: 512,
        batch_tokens: 4096,
        tokens: 262_144,
        lr: 3e-4,
        min_lr: 3e-5,
        warmup: Warmup::Percent(5),
        z_loss: 0.0,
        transfer_percent: 50,
        transfer_lr: 1e-3,
        lora_rank: 16,
        deviations: &[
            "not in the paper: half the tokens of attention transfer (lr 1e-3), then distillation (KL to the teacher's logits) on LoRA rank 16 on q, k, v, o plus φ",
            "distillation lr 3e-4 → 3e-5, warmup 5 % of its updates, sequence 512, batch 4,096 tokens",
        ],
        ..PAPER
    },
];

pub fn find(name: &str) -> Result<&'static Preset> {
    match PRESETS.iter().find(|p| p.name == name) {
        Some(p) => Ok(p),
        None => bail!(
            "unknown recipe '{name}' (known: {})",
            PRESETS.map(|p| p.name).join(", ")
        ),
    }
}

/// What the adapting recipes train besides φ: LoRA adapters on q, k, v, o, or every parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    Lora,
    All,
}

impl std::str::FromStr for Trainable {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lora" => Ok(Self::Lora),
            "all" => Ok(Self::All),
            other => bail!("unknown --train '{other}' (known: lora, all)"),
        }
    }
}

/// Whether a setting applies to a recipe.
type RecipeTest = fn(Recipe) -> bool;

/// What a run sets on top of its preset; `None` keeps the preset's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub seq_len: Option<usize>,
    pub batch_tokens: Option<usize>,
    pub tokens: Option<u64>,
    pub steps: Option<u64>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub weight_decay: Option<f64>,
    pub clip: Option<f64>,
    pub z_loss: Option<f64>,
    pub transfer_tokens: Option<u64>,
    pub transfer_lr: Option<f64>,
    pub transfer_target: Option<crate::train::transfer::Target>,
    pub train: Option<Trainable>,
    pub lora_rank: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub temperature: Option<f64>,
    pub ce_weight: Option<f64>,
    pub min_window: Option<usize>,
    pub gap_weight: Option<f64>,
    pub mix_lr_scale: Option<f64>,
    pub beta_lr_scale: Option<f64>,
    pub freeze: Vec<ParamGroup>,
}

/// How a run is managed, apart from what it learns.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub micro_batch: usize,
    pub eval_every: u64,
    pub eval_windows: usize,
    pub checkpoint_every: u64,
    pub keep: usize,
    pub seed: u64,
    pub max_bad_steps: usize,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            micro_batch: 1,
            eval_every: 25,
            eval_windows: 8,
            checkpoint_every: 50,
            keep: 2,
            seed: 0,
            max_bad_steps: 5,
        }
    }
}

impl Preset {
    /// The run's every hyperparameter: this preset's, with `o` on top.
    pub fn resolve(&self, o: &Overrides, run: &RunSettings) -> Result<TrainConfig> {
        let seq_len = o.seq_len.unwrap_or(self.seq_len);
        let batch_tokens = o.batch_tokens.unwrap_or(self.batch_tokens);
        if seq_len == 0 {
            bail!("--seq-len must be positive");
        }
        let per_step = (batch_tokens / seq_len).max(1) as u64 * seq_len as u64;
        let steps = match (o.steps, o.tokens) {
            (Some(s), _) => s,
            (None, t) => t.unwrap_or(self.tokens).div_ceil(per_step).max(1),
        };
        let r = self.recipe;
        let transfer_steps = if r.has_transfer_phase() {
            let t = o
                .transfer_tokens
                .map_or(steps * self.transfer_percent / 100, |t| {
                    t.div_ceil(per_step)
                });
            if t >= steps {
                bail!("--transfer-tokens leaves no updates after the transfer phase (the run has {steps} updates of {per_step} tokens)");
            }
            t
        } else {
            0
        };
        // Settings a recipe has no use for are refused, not silently ignored.
        let refused: [(&str, bool, RecipeTest); 9] = [
            (
                "--transfer-tokens",
                o.transfer_tokens.is_some(),
                Recipe::has_transfer_phase,
            ),
            (
                "--transfer-lr",
                o.transfer_lr.is_some(),
                Recipe::has_transfer_phase,
            ),
            (
                "--transfer-target",
                o.transfer_target.is_some(),
                Recipe::uses_transfer,
            ),
            ("--train", o.train.is_some(), Recipe::adapts),
            ("--lora-rank", o.lora_rank.is_some(), Recipe::adapts),
            ("--lora-alpha", o.lora_alpha.is_some(), Recipe::adapts),
            ("--temperature", o.temperature.is_some(), Recipe::distills),
            ("--ce-weight", o.ce_weight.is_some(), Recipe::distills),
            ("--z-loss", o.z_loss.is_some(), |r| {
                matches!(r, Recipe::Supra | Recipe::TransferFinetune)
            }),
        ];
        if let Some((flag, _, applies)) =
            refused.iter().find(|(_, set, applies)| *set && !applies(r))
        {
            let which: Vec<&str> = Recipe::ALL
                .into_iter()
                .filter(|&x| applies(x))
                .map(Recipe::name)
                .collect();
            bail!("{flag} applies to --recipe {}", which.join(", "));
        }
        if r == Recipe::Transfer && !o.freeze.is_empty() {
            bail!("--recipe transfer trains φ alone on the transfer loss: --freeze applies to full fine-tuning");
        }
        let lora_rank = match (o.train, o.lora_rank) {
            (Some(Trainable::All), Some(n)) if n > 0 => {
                bail!("--train all fine-tunes every parameter; --lora-rank {n} asks for adapters")
            }
            (Some(Trainable::All), _) => 0,
            (Some(Trainable::Lora), Some(0)) => {
                bail!("--train lora needs a positive --lora-rank (0 means --train all)")
            }
            (_, n) => n.unwrap_or(self.lora_rank),
        };
        if r.adapts() && lora_rank > 0 && !o.freeze.is_empty() {
            bail!("--freeze applies to full fine-tuning; with LoRA only the adapters and φ train (use --train all)");
        }
        let temperature = o.temperature.unwrap_or(self.temperature);
        let ce_weight = o.ce_weight.unwrap_or(self.ce_weight);
        if !(temperature > 0.0 && temperature.is_finite()) {
            bail!("--temperature must be positive, not {temperature}");
        }
        if !(ce_weight >= 0.0 && ce_weight.is_finite()) {
            bail!("--ce-weight must be zero or positive, not {ce_weight}");
        }
        let lr = o.lr.unwrap_or(self.lr);
        let min_lr = match (o.min_lr, o.lr) {
            (Some(m), _) => m,
            // A new peak keeps the preset's ratio to the floor.
            (None, Some(lr)) => lr * self.min_lr / self.lr,
            (None, None) => self.min_lr,
        };
        let warmup_steps = o.warmup_steps.unwrap_or(match self.warmup {
            Warmup::Steps(s) => s,
            Warmup::Percent(p) => steps * p / 100,
        });
        let transfer_lr = o.transfer_lr.unwrap_or(self.transfer_lr);
        Ok(TrainConfig {
            recipe: self.recipe,
            preset: self.name.to_string(),
            seq_len,
            batch_tokens,
            micro_batch: run.micro_batch.max(1),
            steps,
            lr,
            min_lr,
            warmup_steps,
            beta1: self.betas.0,
            beta2: self.betas.1,
            adam_eps: self.eps,
            weight_decay: o.weight_decay.unwrap_or(self.weight_decay),
            clip: o.clip.unwrap_or(self.clip),
            z_loss: o.z_loss.unwrap_or(self.z_loss),
            eval_every: run.eval_every.max(1),
            eval_windows: run.eval_windows.max(1),
            checkpoint_every: run.checkpoint_every.max(1),
            keep: run.keep.max(1),
            seed: run.seed,
            freeze: o.freeze.clone(),
            max_bad_steps: run.max_bad_steps.max(1),
            transfer_steps,
            transfer_lr,
            transfer_min_lr: transfer_lr / 10.0,
            transfer_warmup_steps: transfer_steps / 20,
            transfer_target: o.transfer_target.unwrap_or_default(),
            lora_rank,
            lora_alpha: o.lora_alpha.unwrap_or(lora_rank as f64),
            temperature,
            ce_weight,
            min_window: o.min_window,
            gap_weight: o.gap_weight.unwrap_or(0.0),
            mix_lr_scale: o.mix_lr_scale.unwrap_or(1.0),
            beta_lr_scale: o.beta_lr_scale.unwrap_or(1.0),
        })
    }
}

/// `supra train --help`'s list of presets.
pub fn help() -> String {
    let mut out = String::from("Recipes (presets; each flag above overrides one value):\n");
    for p in &PRESETS {
        let warmup = match p.warmup {
            Warmup::Steps(s) => format!("{s} warmup steps"),
            Warmup::Percent(p) => format!("warmup {p} % of the updates"),
        };
        let z_loss = if p.z_loss > 0.0 {
            format!("z-loss {:e}", p.z_loss)
        } else {
            "no z-loss".to_string()
        };
        out += &format!(
            "  {}: {}. lr {:e} → {:e}, {warmup}, sequence {}, {} tokens/update, weight decay {}, clip {}, {z_loss}\n",
            p.name, p.about, p.lr, p.min_lr, p.seq_len, p.batch_tokens, p.weight_decay, p.clip
        );
        for d in p.deviations {
            out += &format!("      differs from the paper: {d}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paper_preset_is_the_papers_setting() {
        let p = find("supra-paper").unwrap();
        let c = p
            .resolve(&Overrides::default(), &RunSettings::default())
            .unwrap();
        assert_eq!((c.lr, c.min_lr, c.warmup_steps), (3e-5, 1e-5, 1000));
        assert_eq!((c.seq_len, c.z_loss, c.weight_decay), (2048, 1e-4, 0.1));
        assert_eq!((c.beta1, c.beta2, c.clip), (0.9, 0.95, 1.0));
        assert_eq!(c.recipe, Recipe::Supra);
    }

    #[test]
    fn small_presets_say_how_they_differ_and_flags_override() {
        for p in &PRESETS[1..] {
            assert!(!p.deviations.is_empty(), "{} lists no deviation", p.name);
            assert!(help().contains(p.name));
        }
        let p = find("transfer+finetune").unwrap();
        let o = Overrides {
            tokens: Some(40_960),
            lr: Some(1e-4),
            ..Default::default()
        };
        let c = p.resolve(&o, &RunSettings::default()).unwrap();
        // 10 updates of 4,096 tokens, half of them transfer; the floor keeps the preset's ratio.
        assert_eq!((c.steps, c.transfer_steps), (10, 5));
        assert!((c.min_lr - 1e-5).abs() < 1e-15);
        assert_eq!((c.lora_rank, c.lora_alpha), (16, 16.0));
        assert!(find("nope").is_err());
        let too_much = Overrides {
            tokens: Some(40_960),
            transfer_tokens: Some(40_960),
            ..Default::default()
        };
        assert!(p.resolve(&too_much, &RunSettings::default()).is_err());
        // What a recipe would not use is refused.
        let lora = Overrides {
            lora_rank: Some(8),
            ..Default::default()
        };
        let z = Overrides {
            z_loss: Some(1e-4),
            ..Default::default()
        };
        let run = RunSettings::default();
        assert!(find("supra").unwrap().resolve(&lora, &run).is_err());
        assert!(find("transfer").unwrap().resolve(&z, &run).is_err());
        assert!(find("supra").unwrap().resolve(&z, &run).is_ok());
    }

    #[test]
    fn train_all_is_lora_rank_zero_and_contradictions_are_refused() {
        let run = RunSettings::default();
        let p = find("transfer+distill").unwrap();
        let with = |train, lora_rank| Overrides {
            train,
            lora_rank,
            ..Default::default()
        };
        let rank = |o: Overrides| p.resolve(&o, &run).map(|c| c.lora_rank);
        assert_eq!(rank(with(Some(Trainable::All), None)).unwrap(), 0);
        assert_eq!(rank(with(Some(Trainable::All), Some(0))).unwrap(), 0);
        assert_eq!(rank(with(Some(Trainable::Lora), None)).unwrap(), 16);
        assert_eq!(rank(with(Some(Trainable::Lora), Some(4))).unwrap(), 4);
        assert!(rank(with(Some(Trainable::All), Some(4))).is_err());
        assert!(rank(with(Some(Trainable::Lora), Some(0))).is_err());
        let all = with(Some(Trainable::All), None);
        assert!(find("supra").unwrap().resolve(&all, &run).is_err());
    }
}
