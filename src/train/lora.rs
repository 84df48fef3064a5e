//! LoRA adapters on the attention projections: added for training, merged into the weights
//! for the final model.

use crate::config::LoraConfig;
use crate::io::LoadedModel;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The layers that carry adapters, by the parameter table: `{name}.weight` is a LoRA target.
fn targets(model: &LoadedModel) -> Vec<String> {
    crate::model::params::table(&model.config)
        .into_iter()
        .filter(|p| p.lora_target)
        .filter_map(|p| p.name.strip_suffix(".weight").map(str::to_string))
        .collect()
}

/// Adds rank-`rank` adapters to q, k, v and o of every layer: A ~ U(±1/√in) (peft's init),
/// B = 0, so the model's function is unchanged until B trains.
pub fn add(model: &mut LoadedModel, rank: usize, alpha: f64, seed: u64) -> Result<()> {
    if model.config.lora.is_some() {
        bail!("the model already has LoRA adapters");
    }
    if rank == 0 {
        bail!("--lora-rank must be positive (0 means full fine-tuning, without adapters)");
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for name in targets(model) {
        let (out_dim, in_dim) = model.weights[&format!("{name}.weight")].dims2()?;
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..rank * in_dim)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        model.weights.insert(
            format!("{name}.lora_A"),
            Tensor::from_vec(a, (rank, in_dim), &Device::Cpu)?,
        );
        model.weights.insert(
            format!("{name}.lora_B"),
            Tensor::zeros((out_dim, rank), candle_core::DType::F32, &Device::Cpu)?,
        );
    }
    model.config.lora = Some(LoraConfig { rank, alpha });
    Ok(())
}

/// W ← W + (alpha / rank) · B A for every adapter; the result has no adapters.
pub fn merge(model: &LoadedModel) -> Result<LoadedModel> {
    let Some(l) = model.config.lora else {
        return Ok(model.clone());
    };
    let mut out = model.clone();
    for name in targets(model) {
        let a = out
            .weights
            .remove(&format!("{name}.lora_A"))
            .expect("checked at load");
        let b = out
            .weights
            .remove(&format!("{name}.lora_B"))
            .expect("checked at load");
        let w = format!("{name}.weight");
        let merged = (&out.weights[&w] + (b.matmul(&a)? * l.scale())?)?;
        out.weights.insert(w, merged);
    }
    out.config.lora = None;
    Ok(out)
}
