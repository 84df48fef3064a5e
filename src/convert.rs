//! Teacher → linear model: keep every pretrained weight, switch the chosen layers to SUPRA
//! attention and add their φ parameters.

use crate::config::{AttentionKind, Decay, PhiInit, SupraConfig};
use crate::io::LoadedModel;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// d'; `None` means the head dim.
    pub feature_dim: Option<usize>,
    pub decay: Decay,
    pub phi_init: PhiInit,
    pub chunk_size: usize,
    /// Layers that keep softmax attention (a hybrid); all others become SUPRA.
    pub softmax_layers: Vec<usize>,
    pub seed: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            feature_dim: None,
            decay: Decay::Lightning,
            phi_init: PhiInit::Random,
            chunk_size: 64,
            softmax_layers: Vec::new(),
            seed: 0,
        }
    }
}

/// φ's (weight, bias) for `heads` heads: W is (heads·d', heads·d).
fn phi_params(
    init: PhiInit,
    heads: usize,
    d: usize,
    f: usize,
    rng: &mut StdRng,
) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = (heads * f, heads * d);
    let dev = Device::Cpu;
    Ok(match init {
        PhiInit::Identity => {
            if f != d {
                bail!(
                    "--phi-init identity needs the feature dim ({f}) to equal the head dim ({d})"
                );
            }
            (
                Tensor::eye(rows, candle_core::DType::F32, &dev)?,
                Tensor::zeros(rows, candle_core::DType::F32, &dev)?,
            )
        }
        PhiInit::Random => {
            // torch.nn.Linear's default: kaiming_uniform(a=√5) for W and U(±1/√fan_in) for b,
            // both of which come to U(−1/√fan_in, 1/√fan_in).
            let bound = 1.0 / (cols as f32).sqrt();
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            (
                Tensor::from_vec(draw(rows * cols), (rows, cols), &dev)?,
                Tensor::from_vec(draw(rows), rows, &dev)?,
            )
        }
    })
}

/// A converted copy of `teacher`. Converting an already converted model is refused: its φ
/// would be silently replaced.
pub fn convert(teacher: &LoadedModel, opts: &ConvertOptions) -> Result<LoadedModel> {
    let cfg = &teacher.config;
    if cfg.supra.is_some() {
        bail!("this model is already converted (its config has SUPRA layers); convert the teacher instead");
    }
    let n = cfg.num_hidden_layers;
    if let Some(bad) = opts.softmax_layers.iter().find(|&&l| l >= n) {
        bail!(
            "--softmax-layers: layer {bad} does not exist (the model has layers 0..{})",
            n - 1
        );
    }
    let d = cfg.head_dim;
    let f = opts.feature_dim.unwrap_or(d);
    let mut out_cfg = cfg.clone();
    out_cfg.layer_kinds = (0..n)
        .map(|i| {
            if opts.softmax_layers.contains(&i) {
                AttentionKind::Softmax
            } else {
                AttentionKind::Supra
            }
        })
        .collect();
    out_cfg.supra = Some(SupraConfig {
        feature_dim: f,
        decay: opts.decay.clone(),
        phi_init: opts.phi_init,
        chunk_size: opts.chunk_size,
    });
    out_cfg.validate()?;
    let mut weights = teacher.weights.clone();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    for i in (0..n).filter(|i| out_cfg.layer_kinds[*i] == AttentionKind::Supra) {
        let p = format!("model.layers.{i}.self_attn");
        let (w, b) = phi_params(opts.phi_init, cfg.num_attention_heads, d, f, &mut rng)?;
        weights.insert(format!("{p}.phi_q.weight"), w);
        weights.insert(format!("{p}.phi_q.bias"), b);
        if out_cfg.separate_key_phi() {
            let (w, b) = phi_params(opts.phi_init, cfg.num_key_value_heads, d, f, &mut rng)?;
            weights.insert(format!("{p}.phi_k.weight"), w);
            weights.insert(format!("{p}.phi_k.bias"), b);
        }
    }
    crate::model::weights::check_weights(&out_cfg, &weights, "converted model", str::to_string)?;
    Ok(LoadedModel {
        config: out_cfg,
        weights,
        tokenizer: teacher.tokenizer.clone(),
    })
}
