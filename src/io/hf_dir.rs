//! HF-layout model directories: `config.json`, `model.safetensors` (or a sharded index),
//! `tokenizer.json`.

use crate::config::ModelConfig;
use crate::io::tokenizer::TextTokenizer;
use crate::io::{atomic_write, atomic_write_with, LoadedModel};
use crate::model::weights::{check_weights, Weights};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: missing field 'weight_map'", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

pub fn load(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        bail!(
            "{}: missing (an HF model directory needs config.json)",
            cfg_path.display()
        );
    }
    let config = ModelConfig::from_hf_json(&cfg_path)?;
    let mut weights = Weights::new();
    for file in safetensors_files(dir)? {
        if !file.exists() {
            bail!("{}: missing (named by the shard index)", file.display());
        }
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", file.display()))?;
        for (name, t) in tensors {
            let t = t.to_dtype(DType::F32)?;
            weights.insert(name, t);
        }
    }
    // Some exporters write a tied head anyway; it is the embedding, so drop it.
    if config.tie_word_embeddings {
        weights.remove("lm_head.weight");
    }
    check_weights(
        &config,
        &weights,
        &dir.display().to_string(),
        str::to_string,
    )?;
    let tokenizer = TextTokenizer::from_hf_dir(dir, config.bos_token_id, config.eos_token_id)?;
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
    })
}

/// Writes `model` as an HF directory that every command (and transformers) loads.
pub fn save(model: &LoadedModel, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cfg = serde_json::to_string_pretty(&model.config.to_hf_json())?;
    atomic_write(&dir.join("config.json"), cfg.as_bytes())?;
    atomic_write_with(&dir.join("model.safetensors"), |f| {
        let data: Vec<(&str, &candle_core::Tensor)> =
            model.weights.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let bytes = safetensors::serialize(data, None)?;
        std::io::Write::write_all(f, &bytes)?;
        Ok(())
    })?;
    model.tokenizer.save(dir)
}
