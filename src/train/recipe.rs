//! What is trained, on which loss.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::io::LoadedModel;
use crate::model::llama::Llama;
use crate::model::weights::Weights;

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

/// The objective's loss on a batch of windows (batch, seq_len + 1).
pub fn loss(model: &Llama, objective: Objective, windows: &Tensor) -> Result<Tensor> {
    let t = windows.dim(1)? - 1;
    let inputs = windows.narrow(1, 0, t)?;
    match objective {
        Objective::Transfer => model.transfer_loss(&inputs),
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

/// Scales each SUPRA layer's Wo, per head, by the teacher's average per-head output RMS on
/// `batches`. A SUPRA layer GroupNorms each head to unit RMS before Wo; the teacher's heads are
/// far smaller, so without this even a perfect φ would feed the residual stream outputs of the
/// wrong size (SmolLM2, 1k held-out tokens: teacher perplexity 20.5; teacher with GroupNorm'd
/// heads 1.1e7; GroupNorm'd and rescaled 44.8). Returns the factors, per layer and head.
pub fn calibrate_output_scale(
    model: &mut LoadedModel,
    batches: &[Tensor],
) -> Result<Vec<Option<Vec<f32>>>> {
    let llama = Llama::new(&model.config, &model.weights)?;
    let mut sums: Vec<Option<Vec<f64>>> = vec![None; model.config.num_hidden_layers];
    for tokens in batches {
        for (acc, r) in sums.iter_mut().zip(llama.teacher_head_rms(tokens)?) {
            match (acc.as_mut(), r) {
                (Some(acc), Some(r)) => acc.iter_mut().zip(r).for_each(|(a, x)| *a += x),
                (None, r) => *acc = r,
                (Some(_), None) => {}
            }
        }
    }
    let scales: Vec<Option<Vec<f32>>> = sums
        .into_iter()
        .map(|s| {
            s.map(|s| {
                s.iter()
                    .map(|x| (x / batches.len() as f64) as f32)
                    .collect()
            })
        })
        .collect();
    for (layer, s) in scales.iter().enumerate() {
        if let Some(s) = s {
            let name = format!("model.layers.{layer}.self_attn.o_proj.weight");
            let w = model.weights[&name].broadcast_mul(&head_columns(s, model.config.head_dim)?)?;
            model.weights.insert(name, w);
        }
    }
    Ok(scales)
}

/// Per-head factors spread over Wo's input columns: shape (1, heads · head_dim).
pub fn head_columns(scales: &[f32], head_dim: usize) -> Result<Tensor> {
    let cols: Vec<f32> = scales
        .iter()
        .flat_map(|&s| std::iter::repeat_n(s, head_dim))
        .collect();
    let n = cols.len();
    Ok(Tensor::from_vec(cols, (1, n), &candle_core::Device::Cpu)?)
}
