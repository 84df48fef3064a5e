//! `supra convert`, `supra export` and `supra fetch`: model files in and out.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use supra::config::AttentionKind;
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
    /// Per-head decay: lightning (ALiBi slopes, the paper's), retnet, none, or comma-separated values.
    #[arg(long, default_value = "lightning")]
    pub(crate) decay: supra::config::Decay,
    /// Initial φ: random (PyTorch's Linear init, the paper's) or identity (W = I, b = 0).
    #[arg(long, default_value = "random", value_parser = ["random", "identity"])]
    pub(crate) phi_init: String,
    /// Layers that keep softmax attention, e.g. 0,15 (a hybrid).
    #[arg(long, value_delimiter = ',')]
    pub(crate) softmax_layers: Vec<usize>,
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
    let opts = ConvertOptions {
        feature_dim: a.feature_dim,
        decay: a.decay.clone(),
        phi_init: a.phi_init.parse()?,
        chunk_size: a.chunk_size as usize,
        softmax_layers: a.softmax_layers.clone(),
        seed: a.seed,
    };
    let converted = supra::convert::convert(&teacher, &opts)?;
    io::hf_dir::save(&converted, &a.out)?;
    let c = &converted.config;
    let count = |kind| c.layer_kinds.iter().filter(|k| **k == kind).count();
    eprintln!(
        "wrote {}: {} SUPRA and {} softmax layers, {:.2} M new parameters",
        a.out.display(),
        count(AttentionKind::Supra),
        count(AttentionKind::Softmax),
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
