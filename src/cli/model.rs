//! The MODEL argument: which model a command loads, and in what weight format.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use supra::attention::window::Branches;
use supra::config::AttentionKind;
use supra::io::{self, fetch, LoadedModel};
use supra::model::llama::Llama;
use supra::model::quant::WeightFormat;

#[derive(Args)]
pub(crate) struct ModelArg {
    /// GGUF file or HF directory [default: SmolLM2-135M-Instruct, fetched if missing]
    pub(crate) model: Option<PathBuf>,
}

impl ModelArg {
    pub(crate) fn load(&self) -> Result<(LoadedModel, Llama)> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => fetch::ensure_default_model()?,
        };
        let loaded = io::load(&path)?;
        let model = Llama::new(&loaded.config, &loaded.weights)
            .with_context(|| format!("building the model from {}", path.display()))?;
        Ok((loaded, model))
    }
}

/// Which branches the window layers run (`--branches`): a control for hybrids.
#[derive(Args)]
pub(crate) struct BranchesArg {
    /// Window + linear layers only: run both branches (the model), the window and sinks alone
    /// (`window`; for an untrained model, the teacher restricted to its window) or the linear
    /// branch alone over every earlier token (`linear`). The single-branch runs are controls.
    #[arg(long, default_value = "both", value_parser = ["both", "window", "linear"])]
    pub(crate) branches: String,
}

impl BranchesArg {
    /// Sets the branches of `model`'s window layers; refuses a control on a model without any.
    pub(crate) fn apply(&self, model: &mut Llama) -> Result<()> {
        set_branches(model, self.branches.parse()?)
    }
}

/// Sets the branches of `model`'s window layers; refuses a control on a model without any.
pub(crate) fn set_branches(model: &mut Llama, branches: Branches) -> Result<()> {
    let has_window = model.config.layer_kinds.contains(&AttentionKind::Window);
    if branches != Branches::Both && !has_window {
        bail!(
            "--branches {branches:?}: the model has no window layers",
            branches = branches
        );
    }
    model.set_branches(branches);
    Ok(())
}

/// A model to run (not train), with the format of its weight matrices.
#[derive(Args)]
pub(crate) struct InferModelArg {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// Store the weight matrices as f32, q8_0 or q4_0 (quantized at load; decoding reads
    /// 4× or 7× fewer bytes).
    #[arg(long, default_value = "f32", value_parser = weight_format())]
    pub(crate) weights: WeightFormat,
}

impl InferModelArg {
    /// Loads the model with its projections stored as `weights`; the f32 tensors are let go
    /// once quantized (the config and tokenizer stay).
    pub(crate) fn load(&self) -> Result<(LoadedModel, Llama)> {
        let (mut loaded, mut model) = self.model.load()?;
        store_weights_as(&mut loaded, &mut model, self.weights)?;
        Ok((loaded, model))
    }
}

/// Quantizes `model` to `weights` and lets the f32 tensors go.
pub(crate) fn store_weights_as(
    loaded: &mut LoadedModel,
    model: &mut Llama,
    weights: WeightFormat,
) -> Result<()> {
    if weights != WeightFormat::F32 {
        loaded.weights.clear();
        model.quantize(weights)?;
    }
    Ok(())
}

/// f32, q8_0 or q4_0, listed in `--help`.
pub(crate) fn weight_format() -> impl clap::builder::TypedValueParser<Value = WeightFormat> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(WeightFormat::ALL.map(WeightFormat::name))
        .map(|s| s.parse::<WeightFormat>().expect("a listed format"))
}
