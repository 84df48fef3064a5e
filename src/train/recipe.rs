//! What is trained, on which loss.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::io::LoadedModel;
use crate::model::llama::Llama;
use crate::model::params::{self, Param, ParamGroup};
use crate::model::weights::Weights;
use crate::train::{cross_entropy, distill, transfer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// The paper's: next-token cross-entropy through the whole model.
    Supra,
    /// Attention transfer: only φ, each SUPRA layer matching the teacher's attention output.
    Transfer,
    /// Transfer for the first `--transfer-tokens`, then cross-entropy on LoRA adapters (q, k,
    /// v, o) plus φ, or on all parameters with `--lora-rank 0`.
    #[serde(rename = "transfer+finetune")]
    TransferFinetune,
    /// Distillation against the teacher's logits (KL over the whole vocabulary) on LoRA
    /// adapters plus φ, or all parameters with `--lora-rank 0`.
    Distill,
    /// Transfer for the first `--transfer-tokens`, then distillation as [`Recipe::Distill`].
    #[serde(rename = "transfer+distill")]
    TransferDistill,
}

/// What one update optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Per-layer MSE to the teacher's attention output (φ only).
    Transfer,
    /// Next-token cross-entropy.
    Ce,
    /// KL to the teacher's next-token distribution (plus a share of cross-entropy).
    Distill,
}

impl std::str::FromStr for Recipe {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|r| r.name()).collect();
                anyhow::anyhow!("unknown recipe '{s}' (known: {})", known.join(", "))
            })
    }
}

impl Recipe {
    pub const ALL: [Recipe; 5] = [
        Self::Supra,
        Self::Transfer,
        Self::TransferFinetune,
        Self::Distill,
        Self::TransferDistill,
    ];

    pub fn objective(self, step: u64, transfer_steps: u64) -> Objective {
        match self {
            Self::Supra => Objective::Ce,
            Self::Transfer => Objective::Transfer,
            Self::TransferFinetune | Self::TransferDistill if step < transfer_steps => {
                Objective::Transfer
            }
            Self::TransferFinetune => Objective::Ce,
            Self::Distill | Self::TransferDistill => Objective::Distill,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Supra => "supra",
            Self::Transfer => "transfer",
            Self::TransferFinetune => "transfer+finetune",
            Self::Distill => "distill",
            Self::TransferDistill => "transfer+distill",
        }
    }

    /// Whether some updates run attention transfer (and so Wo is calibrated first).
    pub fn uses_transfer(self) -> bool {
        matches!(
            self,
            Self::Transfer | Self::TransferFinetune | Self::TransferDistill
        )
    }

    /// Whether transfer comes first and another objective takes over after `--transfer-tokens`.
    pub fn has_transfer_phase(self) -> bool {
        matches!(self, Self::TransferFinetune | Self::TransferDistill)
    }

    /// Whether it fine-tunes through LoRA adapters plus φ (all parameters at rank 0).
    pub fn adapts(self) -> bool {
        matches!(
            self,
            Self::TransferFinetune | Self::Distill | Self::TransferDistill
        )
    }

    /// Whether some updates distil from the teacher's logits.
    pub fn distills(self) -> bool {
        matches!(self, Self::Distill | Self::TransferDistill)
    }
}

/// Whether an update with `objective` changes parameters of `group` (of those the recipe
/// trains): transfer reaches only φ.
pub fn phase_trains(objective: Objective, group: ParamGroup) -> bool {
    objective != Objective::Transfer || group == ParamGroup::Phi
}

/// The parameters `recipe` trains (entries of the parameter table), sorted by name.
pub fn trainable(model: &LoadedModel, recipe: Recipe, frozen: &[ParamGroup]) -> Result<Vec<Param>> {
    let mut params: Vec<Param> = params::table(&model.config)
        .into_iter()
        .filter(|p| match recipe {
            Recipe::Transfer => p.group == ParamGroup::Phi,
            r if r.adapts() && model.config.lora.is_some() => {
                matches!(p.group, ParamGroup::Phi | ParamGroup::Lora)
            }
            _ => !frozen.contains(&p.group),
        })
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    if params.is_empty() {
        match recipe {
            Recipe::Supra => bail!("--freeze leaves nothing to train"),
            r => bail!("the {} recipe trains φ, and this model has none: convert it first (`supra convert`)", r.name()),
        }
    }
    Ok(params)
}

/// The model with `params` as variables (gradients tracked) and everything else constant.
/// The returned weights share storage with the variables, so they always hold current values.
pub fn with_variables(
    model: &LoadedModel,
    params: &[Param],
) -> Result<(Weights, Vec<(Param, Var)>)> {
    let mut weights = model.weights.clone();
    let mut vars = Vec::with_capacity(params.len());
    for p in params {
        let Some(t) = model.weights.get(&p.name) else {
            bail!("the model has no tensor '{}'", p.name);
        };
        let var = Var::from_tensor(t)?;
        weights.insert(p.name.clone(), var.as_tensor().clone());
        vars.push((p.clone(), var));
    }
    Ok((weights, vars))
}

/// What the objectives compare the model with, and their settings.
pub struct Targets {
    /// Attention transfer's per-layer teacher.
    pub transfer: transfer::Teacher,
    /// Distillation's teacher (the distilling recipes only).
    pub distill: Option<distill::Teacher>,
    /// Distillation's token weights in training updates (`--gap-weight`; None: even).
    pub gap: Option<distill::GapWeights>,
    /// Weight of the cross-entropy's z-loss.
    pub z_loss: f64,
    /// Distillation's temperature and the weight of the cross-entropy added to it.
    pub temperature: f64,
    pub ce_weight: f64,
}

/// The objective's loss on a batch of windows (batch, seq_len + 1). `model` is built for
/// training. `update`: the loss of a training update, where distillation weighs tokens as
/// `targets.gap` says; validation weighs them evenly, so that runs compare.
pub fn loss(
    model: &Llama,
    targets: &Targets,
    objective: Objective,
    windows: &Tensor,
    update: bool,
) -> Result<Tensor> {
    let t = windows.dim(1)? - 1;
    let inputs = windows.narrow(1, 0, t)?;
    if objective == Objective::Transfer {
        return targets.transfer.loss(model, &inputs);
    }
    let next = windows.narrow(1, 1, t)?.flatten_all()?;
    let logits = model.logits(&model.forward_hidden(&inputs, None)?)?;
    let logits = logits.reshape((next.dim(0)?, ()))?;
    Ok(match objective {
        Objective::Ce => cross_entropy::cross_entropy_z(&logits, &next, targets.z_loss)?,
        Objective::Distill => {
            let Some(teacher) = &targets.distill else {
                bail!("the distillation objective needs a teacher");
            };
            let teacher = teacher.logits(&inputs)?;
            let weights = match (&targets.gap, update) {
                (Some(gap), true) => Some(gap.weights(&inputs, &teacher)?),
                _ => None,
            };
            distill::loss(
                &logits,
                &teacher,
                &next,
                targets.temperature,
                targets.ce_weight,
                weights,
            )?
        }
        Objective::Transfer => unreachable!("handled above"),
    })
}
