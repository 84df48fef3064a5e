//! Checkpoints: model (an HF directory every command loads), optimizer state, counters and the
//! run config, written to a temporary directory and renamed into place, last K kept.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::io::LoadedModel;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Optimizer updates done.
    pub step: u64,
    /// Windows consumed (the data cursor).
    pub cursor: u64,
    /// Training tokens seen.
    pub tokens: u64,
    /// Seed of the data order (the only randomness in a run).
    pub seed: u64,
    /// Per layer, the per-head factors the transfer recipe folded into Wo (`None` for layers
    /// it did not touch); the teacher's own Wo is this model's divided by them.
    #[serde(default)]
    pub wo_scales: Vec<Option<Vec<f32>>>,
    /// Identity of the training token stream (tokenizer and file contents): a resumed run must
    /// read the same data for its cursor to mean the same windows.
    #[serde(default)]
    pub data: String,
    /// Digest of the distillation teacher's config and weights (distilling recipes only): a
    /// resumed run must distil from the same teacher.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub teacher: String,
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn step_dir(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(format!("step-{step:08}"))
}

/// Removes what writers killed mid-write left in a run directory: temporary files and
/// directories (`.NAME.….tmp`, `.final.tmp-PID`, `checkpoints/.tmp-step-N`). Every name
/// without a leading dot is complete (each is renamed into place whole), so nothing else goes;
/// a previous `final/` moved aside (`.final.old-PID`) is put back by the next save of `final/`.
pub fn sweep_temporaries(run: &Path) -> Result<()> {
    let temporary = |name: &str, dir: &Path| {
        if dir == run {
            name.starts_with('.')
                && (name.ends_with(".tmp") || name.ends_with(".tmp.png") || name.contains(".tmp-"))
        } else {
            name.starts_with(".tmp-step-")
        }
    };
    for dir in [run.to_path_buf(), checkpoints_dir(run)] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !temporary(&name, &dir) {
                continue;
            }
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Completed checkpoints, oldest first.
pub fn list(run: &Path) -> Result<Vec<PathBuf>> {
    let dir = checkpoints_dir(run);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .filter(|p| p.join("progress.json").exists())
        .collect();
    out.sort();
    Ok(out)
}

pub fn save(
    run: &Path,
    model: &LoadedModel,
    optimizer: &HashMap<String, Tensor>,
    progress: &Progress,
    run_config: &serde_json::Value,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = step_dir(run, progress.step);
    let tmp = checkpoints_dir(run).join(format!(".tmp-step-{:08}", progress.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    crate::io::hf_dir::save(model, &tmp.join("model"))?;
    crate::io::atomic_write_with(&tmp.join("optimizer.safetensors"), |f| {
        let bytes = safetensors::serialize(optimizer.iter().map(|(k, v)| (k.as_str(), v)), None)?;
        std::io::Write::write_all(f, &bytes)?;
        Ok(())
    })?;
    crate::io::atomic_write(
        &tmp.join("run.json"),
        serde_json::to_string_pretty(run_config)?.as_bytes(),
    )?;
    // Written last: a directory with progress.json is complete.
    crate::io::atomic_write(
        &tmp.join("progress.json"),
        serde_json::to_string_pretty(progress)?.as_bytes(),
    )?;
    if final_dir.exists() {
        let doomed = checkpoints_dir(run).join(format!(".tmp-step-{:08}.old", progress.step));
        std::fs::rename(&final_dir, &doomed)?;
        std::fs::remove_dir_all(&doomed)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint to {}", final_dir.display()))?;
    std::fs::File::open(checkpoints_dir(run))?.sync_all()?;
    let all = list(run)?;
    for old in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        // Renamed first, so that a kill during the removal leaves a temporary name, not a
        // `step-*` directory missing half its files.
        let name = old.file_name().unwrap_or_default().to_string_lossy();
        let doomed = checkpoints_dir(run).join(format!(".tmp-{name}.old"));
        std::fs::rename(old, &doomed)
            .with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
        std::fs::remove_dir_all(&doomed)
            .with_context(|| format!("cannot remove old checkpoint {}", doomed.display()))?;
    }
    Ok(final_dir)
}

pub struct Loaded {
    pub model: LoadedModel,
    pub optimizer: HashMap<String, Tensor>,
    pub progress: Progress,
    pub run_config: serde_json::Value,
    pub dir: PathBuf,
}

pub fn load_latest(run: &Path) -> Result<Loaded> {
    let Some(dir) = list(run)?.pop() else {
        bail!(
            "--resume: no checkpoint in {}",
            checkpoints_dir(run).display()
        );
    };
    let read_json = |name: &str| -> Result<serde_json::Value> {
        let p = dir.join(name);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", p.display()))
    };
    let progress: Progress = serde_json::from_value(read_json("progress.json")?)
        .with_context(|| format!("{}: bad progress.json", dir.display()))?;
    let run_config = read_json("run.json")?;
    let model = crate::io::load(&dir.join("model"))?;
    let opt_path = dir.join("optimizer.safetensors");
    let optimizer = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", opt_path.display()))?;
    Ok(Loaded {
        model,
        optimizer,
        progress,
        run_config,
        dir,
    })
}
