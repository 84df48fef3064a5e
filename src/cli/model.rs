//! The MODEL argument: which model a command loads, and in what weight format.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
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
