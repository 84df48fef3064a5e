//! What is trained, on which loss.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::io::LoadedModel;
use crate::model::llama::Llama;
use crate::model::params::{self, Param, ParamGroup};
use crate::model::weights::Weights;
use crate::train::transfer::Teacher;

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
}

/// What one update optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Per-layer MSE to the teacher's attention output (φ only).
    Transfer,
    /// Next-token cross-entropy.
    Ce,
}

impl std::str::FromStr for Recipe {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        [Self::Supra, Self::Transfer, Self::TransferFinetune]
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown recipe '{s}' (known: supra, transfer, transfer+finetune)")
            })
    }
}

impl Recipe {
    pub fn objective(self, step: u64, transfer_steps: u64) -> Objective {
        match self {
            Self::Supra => Objective::Ce,
            Self::Transfer => Objective::Transfer,
            Self::TransferFinetune if step < transfer_steps => Objective::Transfer,
            Self::TransferFinetune => Objective::Ce,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Supra => "supra",
            Self::Transfer => "transfer",
            Self::TransferFinetune => "transfer+finetune",
        }
    }

    pub fn uses_transfer(self) -> bool {
        self != Self::Supra
    }
}

/// Whether an update with `objective` changes parameters of `group` (of those the recipe
/// trains): transfer reaches only φ.
pub fn phase_trains(objective: Objective, group: ParamGroup) -> bool {
    objective == Objective::Ce || group == ParamGroup::Phi
}

/// The parameters `recipe` trains (entries of the parameter table), sorted by name.
pub fn trainable(model: &LoadedModel, recipe: Recipe, frozen: &[ParamGroup]) -> Result<Vec<Param>> {
    let mut params: Vec<Param> = params::table(&model.config)
        .into_iter()
        .filter(|p| match recipe {
            Recipe::Transfer => p.group == ParamGroup::Phi,
            Recipe::TransferFinetune if model.config.lora.is_some() => {
                matches!(p.group, ParamGroup::Phi | ParamGroup::Lora)
            }
            Recipe::Supra | Recipe::TransferFinetune => !frozen.contains(&p.group),
        })
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    if params.is_empty() {
        match recipe {
            Recipe::Transfer | Recipe::TransferFinetune => bail!("the transfer recipe trains φ, and this model has none: convert it first (`supra convert`)"),
            Recipe::Supra => bail!("--freeze leaves nothing to train"),
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

/// The objective's loss on a batch of windows (batch, seq_len + 1). `model` is built for
/// training; `teacher` serves the transfer objective; `z_loss` weighs the cross-entropy's.
pub fn loss(
    model: &Llama,
    teacher: &Teacher,
    objective: Objective,
    windows: &Tensor,
    z_loss: f64,
) -> Result<Tensor> {
    let t = windows.dim(1)? - 1;
    let inputs = windows.narrow(1, 0, t)?;
    match objective {
        Objective::Transfer => teacher.loss(model, &inputs),
        Objective::Ce => {
            let targets = windows.narrow(1, 1, t)?.flatten_all()?;
            let hidden = model.forward_hidden(&inputs, None)?;
            let logits = model.logits(&hidden)?;
            let logits = logits.reshape((targets.dim(0)?, ()))?;
            Ok(crate::train::cross_entropy::cross_entropy_z(
                &logits, &targets, z_loss,
            )?)
        }
    }
}
