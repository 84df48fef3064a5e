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
            // An integer tensor converts to floats without complaint (and ran with nll 1e12).
            if !t.dtype().is_float() {
                bail!(
                    "{}: tensor '{name}' is stored as {:?}; model weights must be floating point (F32, F16, BF16)",
                    file.display(),
                    t.dtype()
                );
            }
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
///
/// The directory appears whole or not at all, whenever the process is killed: it is written
/// under a temporary name beside it (`.NAME.tmp-PID`) and renamed into place. A directory
/// already at `dir` is moved aside (`.NAME.old-PID`) first; files in it that a model does not
/// write (notes, a README) then move into the new one, so nothing of the user's is lost.
/// What a killed writer left is put right first (see [`recover`]).
pub fn save(model: &LoadedModel, dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .with_context(|| format!("{}: not a directory name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    recover(&parent, &name)?;
    if dir.exists() && !dir.is_dir() {
        bail!("{}: exists and is not a directory", dir.display());
    }
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    write_files(model, &tmp)?;
    let old = parent.join(format!(".{name}.old-{pid}"));
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_context(|| format!("cannot move {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot write {}", dir.display()))?;
    if old.exists() {
        keep_other_files(&old, dir)?;
    }
    std::fs::File::open(&parent)?.sync_all()?;
    Ok(())
}

/// Moves the entries of `old` that `new` lacks into it, then removes `old`.
fn keep_other_files(old: &Path, new: &Path) -> Result<()> {
    for entry in std::fs::read_dir(old)? {
        let entry = entry?;
        let target = new.join(entry.file_name());
        if !target.exists() {
            std::fs::rename(entry.path(), &target).with_context(|| {
                format!(
                    "cannot move {} into {}",
                    entry.path().display(),
                    new.display()
                )
            })?;
        }
    }
    std::fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))
}

/// Puts right what a writer killed inside [`save`] left beside `NAME`: a half-written
/// `.NAME.tmp-*` goes; a `.NAME.old-*` is the previous directory, which comes back if `NAME`
/// never appeared, or gives the new one the user's files it still holds. (Two processes
/// writing one directory at once was never supported.)
fn recover(parent: &Path, name: &str) -> Result<()> {
    let (tmp, old) = (format!(".{name}.tmp-"), format!(".{name}.old-"));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    let dir = parent.join(name);
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if n.starts_with(&tmp) {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        } else if n.starts_with(&old) {
            if dir.exists() {
                keep_other_files(&path, &dir)?;
            } else {
                std::fs::rename(&path, &dir)
                    .with_context(|| format!("cannot restore {}", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// The model as transformers code (python/supra_torch/modeling_supra.py), written beside every
/// config.json, which points to it (`auto_map`): `AutoModelForCausalLM.from_pretrained(dir,
/// trust_remote_code=True)` then loads any directory supra writes, with no other step.
const MODELING_FILE: &str = "modeling_supra.py";
const MODELING_CODE: &str = include_str!("../../python/supra_torch/modeling_supra.py");

fn write_files(model: &LoadedModel, dir: &Path) -> Result<()> {
    let mut json = model.config.to_hf_json();
    json["auto_map"] = serde_json::json!({
        "AutoConfig": "modeling_supra.SupraConfig",
        "AutoModelForCausalLM": "modeling_supra.SupraForCausalLM",
    });
    atomic_write(&dir.join(MODELING_FILE), MODELING_CODE.as_bytes())?;
    let cfg = serde_json::to_string_pretty(&json)?;
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
