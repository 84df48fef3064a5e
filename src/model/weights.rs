//! The named tensors of a model in HF naming, and the list every loader checks against.

use crate::config::{AttentionKind, ModelConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

pub type Weights = HashMap<String, Tensor>;

/// Every tensor a model with this config must have, in HF names, with its (out, in) shape.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let q_dim = cfg.num_attention_heads * d;
    let kv_dim = cfg.num_key_value_heads * d;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q_dim, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv_dim, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv_dim, h]));
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q_dim]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv_dim]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv_dim]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q_dim]));
        if let (AttentionKind::Supra, Some(sc)) = (cfg.layer_kinds[i], &cfg.supra) {
            let fq = cfg.num_attention_heads * sc.feature_dim;
            out.push((format!("{p}.self_attn.phi_q.weight"), vec![fq, q_dim]));
            out.push((format!("{p}.self_attn.phi_q.bias"), vec![fq]));
            if cfg.separate_key_phi() {
                let fk = cfg.num_key_value_heads * sc.feature_dim;
                out.push((format!("{p}.self_attn.phi_k.weight"), vec![fk, kv_dim]));
                out.push((format!("{p}.self_attn.phi_k.bias"), vec![fk]));
            }
        }
        if let Some(l) = &cfg.lora {
            for (target, out_dim, in_dim) in [
                ("q_proj", q_dim, h),
                ("k_proj", kv_dim, h),
                ("v_proj", kv_dim, h),
                ("o_proj", h, q_dim),
            ] {
                out.push((
                    format!("{p}.self_attn.{target}.lora_A"),
                    vec![l.rank, in_dim],
                ));
                out.push((
                    format!("{p}.self_attn.{target}.lora_B"),
                    vec![out_dim, l.rank],
                ));
            }
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![cfg.intermediate_size, h],
        ));
        out.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![cfg.intermediate_size, h],
        ));
        out.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![h, cfg.intermediate_size],
        ));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// Checks names and shapes against [`expected_tensors`]. `display` maps an HF name to the name the
/// user sees in the source file (GGUF names differ), so errors point into the file itself.
pub fn check_weights(
    cfg: &ModelConfig,
    weights: &Weights,
    source: &str,
    display: impl Fn(&str) -> String,
) -> Result<()> {
    let expected = expected_tensors(cfg);
    for (name, shape) in &expected {
        let Some(t) = weights.get(name) else {
            bail!("{source}: missing tensor '{}'", display(name));
        };
        if t.dims() != shape.as_slice() {
            bail!(
                "{source}: tensor '{}' has shape {:?}, expected {:?} from the model config",
                display(name),
                t.dims(),
                shape
            );
        }
    }
    if weights.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<_> = weights
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .map(|k| display(k))
            .collect();
        extra.sort();
        bail!(
            "{source}: unexpected tensors {extra:?} (not part of a {} model with this config)",
            cfg.arch.name()
        );
    }
    Ok(())
}
