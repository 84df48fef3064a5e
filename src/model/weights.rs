//! The named tensors of a model in HF naming, and the list every loader checks against.

use crate::config::ModelConfig;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

pub type Weights = HashMap<String, Tensor>;

/// Every tensor a model with this config must have, in HF names, with its shape: the
/// [parameter table](crate::model::params::table) without its roles.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    crate::model::params::table(cfg)
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect()
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
