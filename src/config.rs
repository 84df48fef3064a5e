//! Model configuration: one struct for every source format (HF `config.json`, GGUF metadata).

pub use crate::attention::supra::Decay;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Decoder families we can run. They share one forward pass; they differ in details recorded in
/// [`ModelConfig`] (Qwen2: q/k/v biases; GGUF llama: permuted Wq/Wk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2";

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// The attention of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Softmax attention with a KV cache (the teacher's).
    Softmax,
    /// SUPRA linear attention with a constant-size recurrent state.
    Supra,
    /// Exact softmax over a sliding window and the first few tokens, linear attention over
    /// everything older ([`WindowConfig`]); also a constant-size state.
    Window,
}

impl AttentionKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "softmax" => Ok(Self::Softmax),
            "supra" => Ok(Self::Supra),
            "window" => Ok(Self::Window),
            other => bail!("unknown attention kind '{other}' (known: softmax, supra, window)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Softmax => "softmax",
            Self::Supra => "supra",
            Self::Window => "window",
        }
    }

    /// Whether the layer has a linear branch (and so the SUPRA hyper-parameters apply).
    pub fn is_linear(self) -> bool {
        matches!(self, Self::Supra | Self::Window)
    }
}

/// The feature map φ of the linear branches ([`crate::attention::feature_map`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// SUPRA's ReLU(W x + b), RoPE after it.
    #[default]
    Relu,
    /// Hedgehog's [softmax(xW), softmax(−xW)] per head on the RoPE'd q and k; d' = 2d.
    Hedgehog,
    /// Based's second-order Taylor features [1, y, y⊗y/√2] of a per-head projection y = xW
    /// (p dims) of the RoPE'd q and k, so φ(q)·φ(k) = 1 + u + u²/2 with u = y_q·y_k;
    /// d' = 1 + p + p(p+1)/2 (153 for p = 16).
    Taylor,
}

impl std::str::FromStr for FeatureKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "relu" => Ok(Self::Relu),
            "hedgehog" => Ok(Self::Hedgehog),
            "taylor" => Ok(Self::Taylor),
            other => bail!("unknown feature map '{other}' (known: relu, hedgehog, taylor)"),
        }
    }
}

impl FeatureKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Relu => "relu",
            Self::Hedgehog => "hedgehog",
            Self::Taylor => "taylor",
        }
    }

    /// Whether φ reads the RoPE'd q and k (its own per-head maps, one set for queries and one
    /// for keys) rather than the raw ones with RoPE rotating its output (relu, SUPRA's order).
    pub fn per_head(self) -> bool {
        self != Self::Relu
    }
}

/// How a window layer combines its two branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    /// One normaliser over both (LoLCATs): the linear branch's weights, scaled by a learned
    /// per-head α, sit beside the window's exp-scores in one softmax-like sum.
    #[default]
    Shared,
    /// Each branch normalised on its own (the window's softmax; the linear branch GroupNorm'd,
    /// as SUPRA does) and blended by a learned per-head gate (as Liger does).
    Gated,
    /// Gated as [`Mix::Gated`], but the linear branch is the delta rule's answer to the unit
    /// query φq/‖φq‖ as it is: a key matched exactly recalls its value, at the window's own
    /// scale, where GroupNorm would lift a state with nothing to say to unit variance. Only
    /// with the delta rule (the additive state's answer to a unit query is a sum, not a value).
    Value,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Gated => "gated",
            Self::Value => "value",
        }
    }

    /// Why this mix cannot go with `rule`, if it cannot: the delta rule's state has no
    /// normaliser to share with the window, and the value mix reads its answer as a value.
    pub fn refuses(self, rule: LinearRule) -> Option<&'static str> {
        match (self, rule) {
            (Self::Shared, LinearRule::Delta) => {
                Some("the delta rule needs the gated or value mix: its state has no normaliser to share with the window")
            }
            (Self::Value, LinearRule::Add) => {
                Some("the value mix needs the delta rule: the additive state's answer is a sum, not a value")
            }
            _ => None,
        }
    }
}

impl std::str::FromStr for Mix {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "shared" => Ok(Self::Shared),
            "gated" => Ok(Self::Gated),
            "value" => Ok(Self::Value),
            other => bail!("unknown mix '{other}' (known: shared, gated, value)"),
        }
    }
}

/// How a window layer's linear state takes in a key that leaves the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearRule {
    /// S ← γS + φ(k) vᵀ (SUPRA's, linear attention's).
    #[default]
    Add,
    /// The delta rule: first replace a learned share β of what S holds under the unit key,
    /// so a recalled value is the last one written ([`crate::attention::delta`]). Needs the
    /// gated or value mix: its output has no normaliser of its own to share.
    Delta,
}

impl LinearRule {
    pub fn name(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Delta => "delta",
        }
    }

    /// The rule a layer follows from its delta parameters (present: the delta rule).
    pub fn of<T>(delta_params: Option<T>) -> Self {
        match delta_params {
            Some(_) => Self::Delta,
            None => Self::Add,
        }
    }

    fn is_add(&self) -> bool {
        *self == Self::Add
    }
}

impl std::str::FromStr for LinearRule {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "add" => Ok(Self::Add),
            "delta" => Ok(Self::Delta),
            other => bail!("unknown linear rule '{other}' (known: add, delta)"),
        }
    }
}

/// Where a window layer's queries see the attention sinks, for RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkPositions {
    /// At their own positions 0..s: a query at n sees sink j at distance n − j, which passes
    /// the teacher's context on long inputs (models converted before cache positions).
    #[default]
    Absolute,
    /// At their place in the cache, just before the window (StreamingLLM): no query sees sink
    /// j farther than s + w − 1 − j, so the exact part never leaves the teacher's distances.
    Cache,
}

impl SinkPositions {
    pub fn name(self) -> &'static str {
        match self {
            Self::Absolute => "absolute",
            Self::Cache => "cache",
        }
    }
}

impl std::str::FromStr for SinkPositions {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "absolute" => Ok(Self::Absolute),
            "cache" => Ok(Self::Cache),
            other => bail!("unknown sink positions '{other}' (known: absolute, cache)"),
        }
    }
}

/// The window of the window layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// w: each token attends exactly to itself and the w − 1 tokens before it.
    pub window: usize,
    /// s: and to the first s tokens of the sequence (attention sinks).
    pub sinks: usize,
    pub mix: Mix,
    /// Absent in configs written before the option: the positions those models had.
    #[serde(default)]
    pub sink_positions: SinkPositions,
    /// Absent for the additive rule (every model before the option).
    #[serde(default, skip_serializing_if = "LinearRule::is_add")]
    pub rule: LinearRule,
}

/// How φ's parameters start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhiInit {
    /// PyTorch's default `nn.Linear` init, U(−1/√fan_in, 1/√fan_in) for W and b (the paper's).
    Random,
    /// W = I, b = 0: φ(x) = ReLU(x). Needs feature dim = head dim.
    Identity,
}

impl std::str::FromStr for PhiInit {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Self::Random),
            "identity" => Ok(Self::Identity),
            other => bail!("unknown φ init '{other}' (known: random, identity)"),
        }
    }
}

/// Hyper-parameters of the SUPRA layers of a model (shared by all of them).
#[derive(Debug, Clone, PartialEq)]
pub struct SupraConfig {
    /// d', the feature dimension per head.
    pub feature_dim: usize,
    pub decay: Decay,
    /// How φ was initialized at conversion (recorded for provenance).
    pub phi_init: PhiInit,
    /// Chunk length C of the chunked form.
    pub chunk_size: usize,
    pub feature_map: FeatureKind,
    /// Present when some layer is [`AttentionKind::Window`].
    pub window: Option<WindowConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2). The output projection never has one.
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The attention kind of each layer (all softmax for a pretrained model).
    pub layer_kinds: Vec<AttentionKind>,
    /// Present when some layer is [`AttentionKind::Supra`].
    pub supra: Option<SupraConfig>,
    /// Unmerged LoRA adapters on q, k, v and o of every layer (training checkpoints).
    pub lora: Option<LoraConfig>,
}

/// Low-rank adapters: W + (alpha / rank) · B A on the attention projections.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The most layers a model file may declare. Far above any model that runs on one machine
/// (405B-class models have 126), and checked before anything is sized by the count: a corrupt
/// count of 2^32 layers otherwise allocates per-layer tables for minutes before failing.
pub const MAX_LAYERS: usize = 1 << 12;

pub fn check_layer_count(layers: usize) -> Result<()> {
    if layers > MAX_LAYERS {
        bail!("{layers} layers is beyond the {MAX_LAYERS} that supra supports");
    }
    Ok(())
}

/// The subset of HF `config.json` we read. Required fields have no default so that a missing one
/// is reported by name.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rms_norm_eps: f64,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    /// Written by `supra train` checkpoints that carry unmerged LoRA adapters.
    #[serde(default)]
    lora: Option<LoraConfig>,
    /// Written by `supra convert`; absent in pretrained checkpoints.
    #[serde(default)]
    supra: Option<HfSupra>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HfSupra {
    attention_kinds: Vec<String>,
    feature_dim: usize,
    decay: HfDecay,
    phi_init: PhiInit,
    chunk_size: usize,
    #[serde(default)]
    feature_map: FeatureKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<WindowConfig>,
}

/// `"lightning" | "retnet" | "none"` or an explicit list of per-head decays.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum HfDecay {
    Named(String),
    Explicit(Vec<f64>),
}

/// HF allows `eos_token_id` to be one id or a list of them; the first one is the canonical EOS.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn first(self) -> Option<u32> {
        match self {
            Self::One(id) => Some(id),
            Self::Many(ids) => ids.first().copied(),
        }
    }
}

impl ModelConfig {
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: HfConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid model config.json", path.display()))?;
        let Some(arch) = Arch::parse(&raw.model_type) else {
            bail!(
                "{}: unsupported model_type '{}' (supported: {})",
                path.display(),
                raw.model_type,
                Arch::SUPPORTED
            );
        };
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            bail!(
                "{}: rope_scaling {scaling} is not supported (only plain RoPE)",
                path.display()
            );
        }
        let heads = raw.num_attention_heads;
        if heads == 0 || (!raw.hidden_size.is_multiple_of(heads) && raw.head_dim.is_none()) {
            bail!(
                "{}: hidden_size {} is not divisible by num_attention_heads {heads}",
                path.display(),
                raw.hidden_size
            );
        }
        let n_layers = raw.num_hidden_layers;
        check_layer_count(n_layers)
            .with_context(|| format!("{}: num_hidden_layers", path.display()))?;
        let (layer_kinds, supra) = match raw.supra {
            None => (vec![AttentionKind::Softmax; n_layers], None),
            Some(sp) => {
                let kinds = sp
                    .attention_kinds
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        AttentionKind::parse(k).with_context(|| {
                            format!("{}: supra.attention_kinds[{i}]", path.display())
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let decay = match sp.decay {
                    HfDecay::Named(n) => Decay::parse(&n)
                        .with_context(|| format!("{}: supra.decay", path.display()))?,
                    HfDecay::Explicit(g) => Decay::Explicit(g),
                };
                let sc = SupraConfig {
                    feature_dim: sp.feature_dim,
                    decay,
                    phi_init: sp.phi_init,
                    chunk_size: sp.chunk_size,
                    feature_map: sp.feature_map,
                    window: sp.window,
                };
                (kinds, Some(sc))
            }
        };
        let cfg = Self {
            layer_kinds,
            supra,
            lora: raw.lora,
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / heads),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: raw.rms_norm_eps,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            bos_token_id: raw.bos_token_id.and_then(TokenIds::first),
            eos_token_id: raw.eos_token_id.and_then(TokenIds::first),
        };
        cfg.validate()
            .with_context(|| format!("{}: inconsistent config", path.display()))?;
        Ok(cfg)
    }

    /// Checks the relations between sizes that the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in positive {
            if value == 0 {
                bail!("{name} must be positive");
            }
        }
        // Far above any released model's, and checked before anything is sized by them: a
        // corrupt head count once asked for a per-head table of 2^64 entries.
        let bounds = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 19),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("num_key_value_heads", self.num_key_value_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
        ];
        for (name, value, max) in bounds {
            if value > max {
                bail!("{name} {value} is beyond the {max} that supra supports");
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if self.max_position_embeddings == 0 {
            bail!("the context length (max_position_embeddings, GGUF context_length) must be positive");
        }
        check_layer_count(self.num_hidden_layers)?;
        // A NaN or non-positive base makes every rotation angle NaN; a negative or NaN epsilon
        // makes RMSNorm divide by the square root of a negative number. Both ran and printed NaN.
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "the RoPE base (rope_theta, GGUF rope.freq_base) {} must be a positive number",
                self.rope_theta
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            bail!(
                "the RMSNorm epsilon (rms_norm_eps, GGUF attention.layer_norm_rms_epsilon) {} must be a non-negative number",
                self.rms_norm_eps
            );
        }
        if self.layer_kinds.len() != self.num_hidden_layers {
            bail!(
                "{} attention kinds for {} layers",
                self.layer_kinds.len(),
                self.num_hidden_layers
            );
        }
        let has_supra = self.layer_kinds.iter().any(|k| k.is_linear());
        match (&self.supra, has_supra) {
            (None, true) => bail!("SUPRA layers without SUPRA hyper-parameters"),
            (Some(s), _) => {
                if self.layer_kinds.contains(&AttentionKind::Window) && s.window.is_none() {
                    bail!("window layers without supra.window (window, sinks, mix)");
                }
                if s.window.is_some_and(|w| w.window == 0) {
                    bail!("supra.window.window must be at least 1 (the token itself)");
                }
                if let Some(why) = s.window.and_then(|w| w.mix.refuses(w.rule)) {
                    bail!("supra.window (mix, rule): {why}");
                }
                // Window states are sized by these, and nothing in the file backs them.
                if let Some(w) = s.window.filter(|w| w.window > 1 << 20 || w.sinks > 1 << 20) {
                    bail!(
                        "supra.window: window {} and sinks {} must be at most {}",
                        w.window,
                        w.sinks,
                        1 << 20
                    );
                }
                if s.feature_dim > 1 << 14 || s.chunk_size > 1 << 16 {
                    bail!(
                        "supra feature_dim {} (at most {}) or chunk_size {} (at most {}) is out of range",
                        s.feature_dim,
                        1 << 14,
                        s.chunk_size,
                        1 << 16
                    );
                }
                if s.feature_map == FeatureKind::Hedgehog && s.feature_dim != 2 * self.head_dim {
                    bail!(
                        "the hedgehog feature map has 2 × head_dim = {} features, not feature_dim {}",
                        2 * self.head_dim,
                        s.feature_dim
                    );
                }
                if s.feature_map == FeatureKind::Taylor
                    && crate::attention::feature_map::taylor_projection(s.feature_dim).is_none()
                {
                    bail!(
                        "the taylor feature map has 1 + p + p(p+1)/2 features (45, 153, 561 for p = 8, 16, 32), not feature_dim {}",
                        s.feature_dim
                    );
                }
                // Only relu's output is rotated; taylor's 1 + p + p(p+1)/2 may be odd.
                if s.feature_map == FeatureKind::Relu
                    && (s.feature_dim == 0 || !s.feature_dim.is_multiple_of(2))
                {
                    bail!(
                        "supra feature_dim {} must be positive and even (RoPE rotates pairs)",
                        s.feature_dim
                    );
                }
                if s.chunk_size == 0 {
                    bail!("supra chunk_size must be positive");
                }
                s.decay.gammas(self.num_attention_heads)?;
            }
            (None, false) => {}
        }
        if self.lora.is_some_and(|l| l.rank == 0) {
            bail!("lora rank must be positive");
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        Ok(())
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        });
        if let Some(sc) = &self.supra {
            let decay = match &sc.decay {
                Decay::Explicit(g) => HfDecay::Explicit(g.clone()),
                named => HfDecay::Named(named.name().to_string()),
            };
            let sp = HfSupra {
                attention_kinds: self
                    .layer_kinds
                    .iter()
                    .map(|k| k.name().to_string())
                    .collect(),
                feature_dim: sc.feature_dim,
                decay,
                phi_init: sc.phi_init,
                chunk_size: sc.chunk_size,
                feature_map: sc.feature_map,
                window: sc.window,
            };
            v["supra"] = serde_json::to_value(sp).expect("serializable");
        }
        if let Some(l) = &self.lora {
            v["lora"] = serde_json::to_value(l).expect("serializable");
        }
        v
    }

    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Number of parameters, counting a tied head once.
    pub fn param_count(&self) -> usize {
        self.teacher_param_count() + self.new_param_count()
    }

    /// Parameters a pretrained checkpoint of this shape has (kept by conversion).
    pub fn teacher_param_count(&self) -> usize {
        let (h, d) = (self.hidden_size, self.head_dim);
        let q = h * self.num_attention_heads * d;
        let kv = 2 * h * self.num_key_value_heads * d;
        let bias = if self.attention_bias {
            (self.num_attention_heads + 2 * self.num_key_value_heads) * d
        } else {
            0
        };
        let attn = q + kv + q + bias;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * layer + h
    }

    /// Parameters added by conversion (φ, and the window layers' mix), from the table.
    pub fn new_param_count(&self) -> usize {
        crate::model::params::table(self)
            .iter()
            .filter(|p| p.group == crate::model::params::ParamGroup::Phi)
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }

    /// Keys have their own φ under GQA, and always with the per-head maps (LoLCATs learns
    /// separate query and key maps); otherwise q and k share φ.
    pub fn separate_key_phi(&self) -> bool {
        self.num_key_value_heads != self.num_attention_heads
            || self
                .supra
                .as_ref()
                .is_some_and(|s| s.feature_map.per_head())
    }
}
