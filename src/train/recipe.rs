//! What is trained, on which loss.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::io::LoadedModel;
use crate::model::llama::Llama;
use crate::model::weights::Weights;
use crate::train::transfer::Teacher;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// The paper's: next-token cross-entropy through the whole model.
    Supra,
    /// Attention transfer: only φ, each SUPRA layer matching the teacher's attention output.
    Transfer,
    /// Transfer for the first `--transfer-tokens`, then cross-entropy on LoRA adapters (q, k,
    /// v, o) plus φ, or on all parameters with `--lora-rank 0`.
    #[serde(rename = "transfer+finetune")]
    #[value(name = "transfer+finetune")]
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

/// Whether an update with `objective` changes parameter `name` (of those the recipe trains).
pub fn phase_trains(objective: Objective, name: &str) -> bool {
    objective == Objective::Ce || Group::of(name) == Group::Phi
}

/// Parameter groups that `--freeze` can hold fixed (the `supra` recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    /// Token embedding and LM head.
    Embeddings,
    /// Feed-forward blocks.
    Mlp,
    /// The pretrained attention projections q, k, v, o.
    Attention,
    /// The feature maps φ.
    Phi,
    /// RMSNorm weights.
    Norms,
}

impl Group {
    pub fn of(name: &str) -> Self {
        if name.contains("embed_tokens") || name.starts_with("lm_head") {
            Self::Embeddings
        } else if name.contains(".mlp.") {
            Self::Mlp
        } else if name.contains(".phi_") {
            Self::Phi
        } else if name.contains("norm") {
            Self::Norms
        } else {
            Self::Attention
        }
    }
}

/// The names of the parameters `recipe` trains, sorted.
pub fn trainable(model: &LoadedModel, recipe: Recipe, frozen: &[Group]) -> Result<Vec<String>> {
    let mut names: Vec<String> = model
        .weights
        .keys()
        .filter(|n| match recipe {
            Recipe::Transfer => Group::of(n) == Group::Phi,
            Recipe::TransferFinetune if model.config.lora.is_some() => {
                Group::of(n) == Group::Phi || n.contains(".lora_")
            }
            Recipe::Supra | Recipe::TransferFinetune => !frozen.contains(&Group::of(n)),
        })
        .cloned()
        .collect();
    names.sort();
    if names.is_empty() {
        match recipe {
            Recipe::Transfer | Recipe::TransferFinetune => bail!("the transfer recipe trains φ, and this model has none: convert it first (`supra convert`)"),
            Recipe::Supra => bail!("--freeze leaves nothing to train"),
        }
    }
    Ok(names)
}

/// The model with `names` as variables (gradients tracked) and everything else constant.
/// The returned weights share storage with the variables, so they always hold current values.
pub fn with_variables(
    model: &LoadedModel,
    names: &[String],
) -> Result<(Weights, Vec<(String, Var)>)> {
    let mut weights = model.weights.clone();
    let mut vars = Vec::with_capacity(names.len());
    for n in names {
        let var = Var::from_tensor(&model.weights[n])?;
        weights.insert(n.clone(), var.as_tensor().clone());
        vars.push((n.clone(), var));
    }
    Ok((weights, vars))
}

/// The objective's loss on a batch of windows (batch, seq_len + 1). `model` is built for
/// training; `teacher` serves the transfer objective.
pub fn loss(
    model: &Llama,
    teacher: &Teacher,
    objective: Objective,
    windows: &Tensor,
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
            Ok(crate::train::cross_entropy::cross_entropy(
                &logits, &targets,
            )?)
        }
    }
}
