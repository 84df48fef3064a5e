//! The parameter table: every tensor a model with a given config has, with its shape and what
//! it is for. Freezing (`--freeze`), the optimizer's weight decay and LoRA's targets all read
//! it; nothing decides a parameter's role from its name elsewhere.

use crate::attention::feature_map::taylor_projection;
use crate::config::{AttentionKind, FeatureKind, LinearRule, ModelConfig};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// What a parameter is, for the code that trains it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamGroup {
    /// The token embedding (also the LM head when the two are tied).
    Embedding,
    /// The pretrained attention projections q, k, v, o, kept from the teacher.
    Attention,
    /// The feature maps φ of SUPRA layers (new at conversion).
    Phi,
    /// Feed-forward blocks.
    Mlp,
    /// RMSNorm weights.
    Norm,
    /// The LM head, when it is not tied to the embedding.
    Head,
    /// LoRA adapters (A and B) on the attention projections.
    Lora,
}

impl ParamGroup {
    pub const ALL: [ParamGroup; 7] = [
        Self::Embedding,
        Self::Attention,
        Self::Phi,
        Self::Mlp,
        Self::Norm,
        Self::Head,
        Self::Lora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Embedding => "embedding",
            Self::Attention => "attention",
            Self::Phi => "phi",
            Self::Mlp => "mlp",
            Self::Norm => "norm",
            Self::Head => "head",
            Self::Lora => "lora",
        }
    }

    /// Comma-separated group names; `embeddings` is the embedding and the head together, and
    /// `norms` the norms (the names `--freeze` has always taken).
    pub fn parse_list(s: &str) -> Result<Vec<ParamGroup>> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "embeddings" => out.extend([Self::Embedding, Self::Head]),
                "norms" => out.push(Self::Norm),
                _ => match Self::ALL.iter().find(|g| g.name() == name) {
                    Some(&g) => out.push(g),
                    None => bail!(
                        "unknown parameter group '{name}' (known: embeddings, embedding, head, attention, phi, mlp, norms, lora)"
                    ),
                },
            }
        }
        out.dedup();
        Ok(out)
    }
}

/// One parameter of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// HF name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub group: ParamGroup,
    /// Whether AdamW's decoupled weight decay applies: not to norms, biases and the token
    /// embedding, which open_lm (the paper's trainer) exempts: decay would pull a norm's gain,
    /// a bias or a rarely seen token's row toward 0, not toward a simpler function.
    pub weight_decay: bool,
    /// Whether a LoRA adapter may sit on it (the attention projections' weights).
    pub lora_target: bool,
}

/// Every parameter a model with this config has, in a fixed order.
pub fn table(cfg: &ModelConfig) -> Vec<Param> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let q_dim = cfg.num_attention_heads * d;
    let kv_dim = cfg.num_key_value_heads * d;
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, group: ParamGroup| {
        // Vectors are norms' gains, biases and per-head scalars: never decayed.
        let vector = shape.len() == 1;
        let lora_target = group == ParamGroup::Attention && !vector;
        out.push(Param {
            weight_decay: group != ParamGroup::Embedding && !vector,
            lora_target,
            name,
            shape,
            group,
        });
    };
    use ParamGroup::*;
    add(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
        Embedding,
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![h], Norm);
        let projections = [
            ("q_proj", q_dim, h),
            ("k_proj", kv_dim, h),
            ("v_proj", kv_dim, h),
            ("o_proj", h, q_dim),
        ];
        for (proj, out_dim, in_dim) in projections {
            add(
                format!("{p}.self_attn.{proj}.weight"),
                vec![out_dim, in_dim],
                Attention,
            );
            if cfg.attention_bias && proj != "o_proj" {
                add(
                    format!("{p}.self_attn.{proj}.bias"),
                    vec![out_dim],
                    Attention,
                );
            }
        }
        if let (true, Some(sc)) = (cfg.layer_kinds[i].is_linear(), &cfg.supra) {
            let (hq, hk) = (cfg.num_attention_heads, cfg.num_key_value_heads);
            let mut phi = |role: &str, heads: usize, in_dim: usize| match sc.feature_map {
                FeatureKind::Relu => {
                    let f = heads * sc.feature_dim;
                    add(format!("{p}.self_attn.{role}.weight"), vec![f, in_dim], Phi);
                    add(format!("{p}.self_attn.{role}.bias"), vec![f], Phi);
                }
                FeatureKind::Hedgehog => add(
                    format!("{p}.self_attn.{role}.weight"),
                    vec![heads, d, d],
                    Phi,
                ),
                FeatureKind::Taylor => add(
                    format!("{p}.self_attn.{role}.weight"),
                    vec![heads, d, taylor_projection(sc.feature_dim).unwrap_or(0)],
                    Phi,
                ),
            };
            phi("phi_q", hq, q_dim);
            if cfg.separate_key_phi() {
                phi("phi_k", hk, kv_dim);
            }
            if sc.decay == crate::config::Decay::Learnable {
                // Per head: θ of the decay, γ = sigmoid(θ).
                add(format!("{p}.self_attn.decay_logit"), vec![hq], Phi);
            }
            if cfg.layer_kinds[i] == AttentionKind::Window {
                // Per head: θ of the linear branch's share, α = sigmoid(θ).
                add(format!("{p}.self_attn.window_mix"), vec![hq], Phi);
                if sc.window.is_some_and(|w| w.rule == LinearRule::Delta) {
                    // Per head: the delta rule's write strength, β = sigmoid(w·k̂ + b), [w | b].
                    let f = sc.feature_dim + 1;
                    add(format!("{p}.self_attn.window_beta"), vec![hq, f], Phi);
                }
            }
        }
        if let Some(l) = &cfg.lora {
            for (proj, out_dim, in_dim) in projections {
                let base = format!("{p}.self_attn.{proj}");
                add(format!("{base}.lora_A"), vec![l.rank, in_dim], Lora);
                add(format!("{base}.lora_B"), vec![out_dim, l.rank], Lora);
            }
        }
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Norm,
        );
        let ff = cfg.intermediate_size;
        add(format!("{p}.mlp.gate_proj.weight"), vec![ff, h], Mlp);
        add(format!("{p}.mlp.up_proj.weight"), vec![ff, h], Mlp);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, ff], Mlp);
    }
    add("model.norm.weight".into(), vec![h], Norm);
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), vec![cfg.vocab_size, h], Head);
    }
    out
}

/// The table by name.
pub fn by_name(cfg: &ModelConfig) -> std::collections::HashMap<String, Param> {
    table(cfg)
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LoraConfig, SupraConfig};

    fn linear_config() -> ModelConfig {
        let mut c = crate::testing::tiny_config();
        c.tie_word_embeddings = false;
        c.attention_bias = true;
        c.layer_kinds = vec![AttentionKind::Supra, AttentionKind::Softmax];
        c.supra = Some(SupraConfig {
            feature_dim: 8,
            decay: crate::attention::supra::Decay::Lightning,
            phi_init: crate::config::PhiInit::Random,
            chunk_size: 64,
            feature_map: crate::config::FeatureKind::Relu,
            window: None,
        });
        c.lora = Some(LoraConfig {
            rank: 2,
            alpha: 4.0,
        });
        c
    }

    /// Each parameter's group, decay and LoRA flag, and the table as the loaders' list.
    #[test]
    fn every_parameter_has_its_role() {
        let c = linear_config();
        let t = by_name(&c);
        let role = |n: &str| {
            let p = &t[n];
            (p.group, p.weight_decay, p.lora_target)
        };
        use ParamGroup::*;
        assert_eq!(role("model.embed_tokens.weight"), (Embedding, false, false));
        assert_eq!(role("lm_head.weight"), (Head, true, false));
        assert_eq!(role("model.norm.weight"), (Norm, false, false));
        assert_eq!(
            role("model.layers.0.input_layernorm.weight"),
            (Norm, false, false)
        );
        assert_eq!(
            role("model.layers.0.self_attn.q_proj.weight"),
            (Attention, true, true)
        );
        assert_eq!(
            role("model.layers.0.self_attn.q_proj.bias"),
            (Attention, false, false)
        );
        assert_eq!(
            role("model.layers.1.self_attn.o_proj.weight"),
            (Attention, true, true)
        );
        assert_eq!(
            role("model.layers.0.self_attn.phi_q.weight"),
            (Phi, true, false)
        );
        assert_eq!(
            role("model.layers.0.self_attn.phi_k.bias"),
            (Phi, false, false)
        );
        assert_eq!(
            role("model.layers.0.mlp.down_proj.weight"),
            (Mlp, true, false)
        );
        assert_eq!(
            role("model.layers.1.self_attn.v_proj.lora_B"),
            (Lora, true, false)
        );
        // Only the SUPRA layer has φ; LoRA sits on q, k, v, o of every layer.
        assert!(!t.contains_key("model.layers.1.self_attn.phi_q.weight"));
        assert_eq!(table(&c).iter().filter(|p| p.lora_target).count(), 8);
        assert_eq!(table(&c).iter().filter(|p| p.group == Lora).count(), 16);
        assert_eq!(
            t["model.layers.0.self_attn.phi_q.weight"].shape,
            vec![4 * 8, 4 * 16]
        );
        // Names are unique.
        assert_eq!(t.len(), table(&c).len());
    }

    #[test]
    fn freeze_lists_parse_with_the_old_names() {
        use ParamGroup::*;
        assert_eq!(
            ParamGroup::parse_list("embeddings,norms").unwrap(),
            vec![Embedding, Head, Norm]
        );
        assert_eq!(ParamGroup::parse_list("mlp, phi").unwrap(), vec![Mlp, Phi]);
        let err = ParamGroup::parse_list("mlp,brain").unwrap_err().to_string();
        assert!(
            err.contains("'brain'") && err.contains("embeddings"),
            "{err}"
        );
    }
}
