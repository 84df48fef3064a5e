//! Teacher → linear model: keep every pretrained weight, switch the chosen layers to SUPRA
//! attention (or window + linear attention) and add their φ parameters (and mix).

use crate::attention::delta::INITIAL_BETA;
use crate::attention::feature_map::{taylor_features, taylor_projection};
use crate::config::{
    AttentionKind, Decay, FeatureKind, LinearRule, Mix, PhiInit, SupraConfig, WindowConfig,
};
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
    /// Layers that keep softmax attention (a hybrid); all others become SUPRA (or window
    /// layers, with `window`).
    pub softmax_layers: Vec<usize>,
    pub feature_map: FeatureKind,
    /// With a window, every converted layer is a window + linear layer, except `supra_layers`.
    pub window: Option<WindowConfig>,
    /// Layers that become pure SUPRA layers when the others get a window.
    pub supra_layers: Vec<usize>,
    /// The window layers' starting linear share sigmoid(θ); `None`: [`initial_share`].
    pub mix_share: Option<f64>,
    pub seed: u64,
}

/// The linear branch's starting share sigmoid(θ) in a new window layer, for the default φ
/// init. An untrained hybrid should read as its window-only control does (the teacher restricted
/// to its window, 1.17× the teacher's perplexity at w = 64), not worse: LoLCATs also starts its
/// linear factor small. How small depends on the branch's raw scale. The random ReLU map's
/// weights φ(q)·φ(k), summed over hundreds of tokens, reach the hundreds beside the window's
/// exp-scores (largest 1), Hedgehog's features sum to 2 per head, and the gated mix adds a
/// GroupNorm'd branch of unit scale to outputs of the teacher's much smaller one. Chosen on
/// `text/valid` (docs/results/window.md, "Where the linear branch starts"): the largest of
/// 0.5, 0.1, 0.01, 0.003, 0.001, 0.0001 whose untrained hybrid scores within 1 % of its
/// window-only control.
pub fn initial_share(feature_map: FeatureKind, mix: Mix) -> f64 {
    match (feature_map, mix) {
        (FeatureKind::Relu, Mix::Shared) => 1e-3,
        (FeatureKind::Hedgehog, Mix::Shared) => 0.5,
        (FeatureKind::Relu | FeatureKind::Hedgehog, Mix::Gated | Mix::Value) => 1e-3,
        (FeatureKind::Taylor, Mix::Shared) => TAYLOR_SHARED_SHARE,
        (FeatureKind::Taylor, Mix::Gated | Mix::Value) => 1e-3,
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            feature_dim: None,
            decay: Decay::Lightning,
            phi_init: PhiInit::Random,
            chunk_size: 64,
            softmax_layers: Vec::new(),
            feature_map: FeatureKind::Relu,
            window: None,
            supra_layers: Vec::new(),
            mix_share: None,
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

/// One layer's new φ parameters, named within its `self_attn`: each role's (queries', and
/// keys' where `separate`) relu weight and bias or hedgehog identity, or taylor's pair.
fn phi_weights(
    opts: &ConvertOptions,
    cfg: &crate::config::ModelConfig,
    separate: bool,
    f: usize,
    rng: &mut StdRng,
) -> Result<Vec<(String, Tensor)>> {
    let d = cfg.head_dim;
    let roles = [
        ("phi_q", cfg.num_attention_heads),
        ("phi_k", cfg.num_key_value_heads),
    ];
    let roles = roles.into_iter().take(if separate { 2 } else { 1 });
    let mut out = Vec::new();
    match opts.feature_map {
        FeatureKind::Relu => {
            for (role, heads) in roles {
                let (w, b) = phi_params(opts.phi_init, heads, d, f, rng)?;
                out.push((format!("{role}.weight"), w));
                out.push((format!("{role}.bias"), b));
            }
        }
        FeatureKind::Hedgehog => {
            let eye = Tensor::eye(d, candle_core::DType::F32, &Device::Cpu)?.unsqueeze(0)?;
            for (role, heads) in roles {
                out.push((format!("{role}.weight"), eye.repeat((heads, 1, 1))?));
            }
        }
        FeatureKind::Taylor => {
            let (q, k) = taylor_params(cfg, f, rng)?;
            out.push(("phi_q.weight".into(), q));
            out.push(("phi_k.weight".into(), k));
        }
    }
    Ok(out)
}

/// The taylor map's starting share in the shared mix. Its scores 1 + u + u²/2 are at least
/// 1/2 for every token, so the untrained branch's weight grows with the context about as
/// relu's does, and more where the teacher's logits are large; chosen on `text/valid` by the
/// others' rule (docs/results/window.md, "Where the linear branch starts").
const TAYLOR_SHARED_SHARE: f64 = 1e-4;

/// A taylor layer's projections: the keys' (H_kv, d, p) and each query head the same as its
/// key head's (H, d, p), entries U(±√(3/p)) times d^(-1/4). So y_q·y_k = q P Pᵀ k / √d with
/// E[P Pᵀ] = I: at the start u is a random projection's estimate of the teacher's own logit
/// q·k/√d, and φ(q)·φ(k) = 1 + u + u²/2 its exp's Taylor polynomial.
fn taylor_params(
    cfg: &crate::config::ModelConfig,
    f: usize,
    rng: &mut StdRng,
) -> Result<(Tensor, Tensor)> {
    let (h, hkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let p =
        taylor_projection(f).ok_or_else(|| anyhow::anyhow!("no taylor map has {f} features"))?;
    let bound = (3.0 / p as f32).sqrt();
    let scale = (d as f32).powf(-0.25);
    let k: Vec<f32> = (0..hkv * d * p)
        .map(|_| rng.random_range(-bound..bound) * scale)
        .collect();
    let group = h / hkv;
    let q: Vec<f32> = (0..h)
        .flat_map(|i| k[i / group * d * p..][..d * p].iter().copied())
        .collect();
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(q, (h, d, p), &dev)?,
        Tensor::from_vec(k, (hkv, d, p), &dev)?,
    ))
}

/// A converted copy of `teacher`. Converting an already converted model is refused: its φ
/// would be silently replaced.
pub fn convert(teacher: &LoadedModel, opts: &ConvertOptions) -> Result<LoadedModel> {
    let cfg = &teacher.config;
    if cfg.supra.is_some() {
        bail!("this model is already converted (its config has SUPRA layers); convert the teacher instead");
    }
    let n = cfg.num_hidden_layers;
    for (flag, layers) in [
        ("--softmax-layers", &opts.softmax_layers),
        ("--supra-layers", &opts.supra_layers),
    ] {
        if let Some(bad) = layers.iter().find(|&&l| l >= n) {
            bail!(
                "{flag}: layer {bad} does not exist (the model has layers 0..{})",
                n - 1
            );
        }
    }
    if let Some(both) = opts
        .supra_layers
        .iter()
        .find(|l| opts.softmax_layers.contains(l))
    {
        bail!("layer {both} is in both --softmax-layers and --supra-layers");
    }
    if !opts.supra_layers.is_empty() && opts.window.is_none() {
        bail!("--supra-layers picks the layers without a window; it needs --window");
    }
    if opts.window.is_some_and(|w| w.window == 0) {
        bail!("--window must be at least 1 (the token itself)");
    }
    if let Some(w) = opts.window {
        if let Some(why) = w.mix.refuses(w.rule) {
            bail!(
                "--mix {} with --linear-rule {}: {why}",
                w.mix.name(),
                w.rule.name()
            );
        }
    }
    let d = cfg.head_dim;
    let f = match (opts.feature_map, opts.feature_dim) {
        (FeatureKind::Relu, f) => f.unwrap_or(d),
        (FeatureKind::Hedgehog, None) => 2 * d,
        (FeatureKind::Hedgehog, Some(f)) if f == 2 * d => f,
        (FeatureKind::Hedgehog, Some(f)) => bail!(
            "--feature-dim {f}: the hedgehog map has 2 × head dim = {} features",
            2 * d
        ),
        (FeatureKind::Taylor, f) => {
            let f = f.unwrap_or(taylor_features(16));
            if taylor_projection(f).is_none() {
                bail!(
                    "--feature-dim {f}: the taylor map has 1 + p + p(p+1)/2 features for a \
                     projection of p dims (45, 153, 561 for p = 8, 16, 32)"
                );
            }
            f
        }
    };
    if opts.feature_map == FeatureKind::Taylor && opts.phi_init != PhiInit::Random {
        bail!("--phi-init identity: the taylor map's projections start random");
    }
    let mut out_cfg = cfg.clone();
    out_cfg.layer_kinds = (0..n)
        .map(|i| {
            if opts.softmax_layers.contains(&i) {
                AttentionKind::Softmax
            } else if opts.window.is_some() && !opts.supra_layers.contains(&i) {
                AttentionKind::Window
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
        feature_map: opts.feature_map,
        window: opts.window,
    });
    out_cfg.validate()?;
    // θ of the window layers' mix, when there are any.
    let mix_theta = match (opts.window, opts.mix_share) {
        (_, Some(share)) if !(share > 0.0 && share < 1.0) => {
            bail!("the linear branch's starting share must be in (0, 1), not {share}")
        }
        (Some(w), share) => {
            let share = share.unwrap_or_else(|| initial_share(opts.feature_map, w.mix));
            Some((share / (1.0 - share)).ln())
        }
        (None, Some(_)) => bail!("a starting linear share needs window layers (--window)"),
        (None, None) => None,
    };
    let mut weights = teacher.weights.clone();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    for i in (0..n).filter(|i| out_cfg.layer_kinds[*i].is_linear()) {
        let p = format!("model.layers.{i}.self_attn");
        for (name, w) in phi_weights(opts, cfg, out_cfg.separate_key_phi(), f, &mut rng)? {
            weights.insert(format!("{p}.{name}"), w);
        }
        if opts.decay == Decay::Learnable {
            let gammas = opts.decay.gammas(cfg.num_attention_heads)?;
            let theta = crate::attention::supra::decay_logits(&gammas);
            let theta = Tensor::from_vec(theta, cfg.num_attention_heads, &Device::Cpu)?;
            weights.insert(
                format!("{p}.decay_logit"),
                theta.to_dtype(candle_core::DType::F32)?,
            );
        }
        if let (AttentionKind::Window, Some(theta)) = (out_cfg.layer_kinds[i], mix_theta) {
            let theta = Tensor::full(theta as f32, cfg.num_attention_heads, &Device::Cpu)?;
            weights.insert(format!("{p}.window_mix"), theta);
            if opts.window.is_some_and(|w| w.rule == LinearRule::Delta) {
                // w = 0: every key starts at the same write strength, sigmoid(b).
                let b0 = (INITIAL_BETA / (1.0 - INITIAL_BETA)).ln() as f32;
                let h = cfg.num_attention_heads;
                let mut params = vec![0f32; h * (f + 1)];
                params
                    .iter_mut()
                    .skip(f)
                    .step_by(f + 1)
                    .for_each(|b| *b = b0);
                weights.insert(
                    format!("{p}.window_beta"),
                    Tensor::from_vec(params, (h, f + 1), &Device::Cpu)?,
                );
            }
        }
    }
    crate::model::weights::check_weights(&out_cfg, &weights, "converted model", str::to_string)?;
    Ok(LoadedModel {
        config: out_cfg,
        weights,
        tokenizer: teacher.tokenizer.clone(),
    })
}
