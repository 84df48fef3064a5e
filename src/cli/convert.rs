//! `supra convert`, `supra export` and `supra fetch`: model files in and out.

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use supra::config::{FeatureKind, PhiInit, WindowConfig};
use supra::convert::ConvertOptions;
use supra::io::{self, fetch};

use super::model::ModelArg;

#[derive(Args)]
pub(crate) struct ConvertArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// Output directory.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Feature dimension d' of φ per head [default: the head dim].
    #[arg(long)]
    pub(crate) feature_dim: Option<usize>,
    /// Per-head decay: lightning (ALiBi slopes, the paper's), retnet (1 − 2^(−5−h)), none (γ = 1),
    /// learnable (starts at lightning, trained with φ), or comma-separated values.
    #[arg(long, default_value = "lightning")]
    pub(crate) decay: supra::config::Decay,
    /// Initial relu φ: random (PyTorch's Linear init, the paper's) or identity (W = I, b = 0).
    /// Hedgehog's maps always start as the identity, taylor's as random projections.
    #[arg(long, value_parser = ["random", "identity"])]
    pub(crate) phi_init: Option<String>,
    /// Feature map of the linear branches: relu (SUPRA's ReLU(Wx + b), RoPE after it),
    /// hedgehog ([softmax(xW), softmax(−xW)] per head on the RoPE'd q and k, W = I at first;
    /// feature dim 2 × head dim) or taylor (Based's [1, y, y⊗y/√2] of a per-head projection
    /// y = xW of the RoPE'd q and k, W random at first; feature dim 1 + p + p(p+1)/2, default
    /// 153 for p = 16).
    #[arg(long, default_value = "relu")]
    pub(crate) feature_map: supra::config::FeatureKind,
    /// Give every converted layer exact softmax attention over its last W tokens beside the
    /// linear state (window + linear attention, LoLCATs); the state stays constant in the
    /// context. Without it, layers become pure SUPRA layers.
    #[arg(long)]
    pub(crate) window: Option<usize>,
    /// With --window: the first S tokens of a sequence stay in every window (attention sinks).
    #[arg(long, default_value_t = 4, requires = "window")]
    pub(crate) sinks: usize,
    /// With --window: where queries see the sinks for RoPE: cache (StreamingLLM: at their place
    /// just before the window, so no distance passes the teacher's, at any length) or absolute
    /// (at positions 0..S; past the teacher's context the window path breaks).
    #[arg(long, default_value = "cache", requires = "window")]
    pub(crate) sink_positions: supra::config::SinkPositions,
    /// With --window: shared (one normaliser over both branches, LoLCATs), gated (each
    /// normalised on its own, the linear one GroupNorm'd, blended by a learned per-head gate)
    /// or value (gated, the linear branch the delta rule's answer to a unit query as it is, at
    /// the values' scale; needs --linear-rule delta).
    #[arg(long, default_value = "shared", requires = "window")]
    pub(crate) mix: supra::config::Mix,
    /// With --window: how the linear state takes in a key leaving the window: add (linear
    /// attention's sum) or delta (the delta rule: replace a learned share β of what the state
    /// holds under the key first, so it recalls the last value written; needs --mix gated or
    /// value).
    #[arg(long, default_value = "add", requires = "window")]
    pub(crate) linear_rule: supra::config::LinearRule,
    /// With --window: the linear branch's starting share in each head (α or the gate,
    /// sigmoid(θ); learned in training) [default: 0.001 for relu, 0.5 for hedgehog with the
    /// shared mix; 0.001 gated or value: an untrained hybrid then reads as its window alone].
    #[arg(long, requires = "window")]
    pub(crate) mix_share: Option<f64>,
    /// Layers that keep softmax attention, e.g. 0,15 (a hybrid).
    #[arg(long, value_delimiter = ',')]
    pub(crate) softmax_layers: Vec<usize>,
    /// With --window: layers that become pure SUPRA layers (no window), e.g. 3,7.
    #[arg(long, value_delimiter = ',', requires = "window")]
    pub(crate) supra_layers: Vec<usize>,
    /// Chunk length of the chunked form (training and prefill).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) chunk_size: u64,
    /// Seed for φ's random init.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// Output directory (created; existing model files in it are replaced).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn convert(a: &ConvertArgs) -> Result<()> {
    let (teacher, _) = a.model.load()?;
    let phi_init = match (a.feature_map, a.phi_init.as_deref()) {
        (FeatureKind::Hedgehog, Some("random")) => {
            bail!("--phi-init random: hedgehog's maps start as the identity")
        }
        (FeatureKind::Hedgehog, _) => PhiInit::Identity,
        (FeatureKind::Taylor, Some("identity")) => {
            bail!("--phi-init identity: the taylor map's projections start random")
        }
        (FeatureKind::Taylor, _) => PhiInit::Random,
        (FeatureKind::Relu, init) => init.unwrap_or("random").parse()?,
    };
    let opts = ConvertOptions {
        feature_dim: a.feature_dim,
        decay: a.decay.clone(),
        phi_init,
        chunk_size: a.chunk_size as usize,
        softmax_layers: a.softmax_layers.clone(),
        feature_map: a.feature_map,
        window: a.window.map(|window| WindowConfig {
            window,
            sinks: a.sinks,
            mix: a.mix,
            sink_positions: a.sink_positions,
            rule: a.linear_rule,
        }),
        supra_layers: a.supra_layers.clone(),
        mix_share: a.mix_share,
        seed: a.seed,
    };
    let converted = supra::convert::convert(&teacher, &opts)?;
    io::hf_dir::save(&converted, &a.out)?;
    let c = &converted.config;
    eprintln!(
        "wrote {}: {}; {:.2} M new parameters",
        a.out.display(),
        super::info::layer_kinds_summary(&c.layer_kinds),
        c.new_param_count() as f64 / 1e6
    );
    Ok(())
}

pub(crate) fn export(a: &ExportArgs) -> Result<()> {
    let (loaded, _) = a.model.load()?;
    io::hf_dir::save(&loaded, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

pub(crate) fn fetch() -> Result<()> {
    let p = fetch::ensure_default_model()?;
    println!("{}", p.display());
    Ok(())
}
