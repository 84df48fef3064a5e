//! Loading and saving models: GGUF files and HF-layout directories.

pub mod fetch;
pub mod gguf;
pub mod hf_dir;
pub mod tokenizer;

use crate::config::ModelConfig;
use crate::model::weights::Weights;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;
use tokenizer::TextTokenizer;

/// A model in memory: config, f32 tensors in HF naming and layout, tokenizer.
#[derive(Clone)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: TextTokenizer,
}

impl LoadedModel {
    /// The same model with every weight in `dtype` (f64: the reference the f32 forms are
    /// checked against).
    pub fn to_dtype(&self, dtype: candle_core::DType) -> Result<LoadedModel> {
        let weights = self
            .weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        Ok(LoadedModel {
            config: self.config.clone(),
            weights,
            tokenizer: self.tokenizer.clone(),
        })
    }
}

/// Loads a GGUF file or an HF-layout directory.
pub fn load(path: &Path) -> Result<LoadedModel> {
    if !path.exists() {
        bail!(
            "model path '{}' does not exist (expected a .gguf file or a directory with config.json)",
            path.display()
        );
    }
    let model = if path.is_dir() {
        hf_dir::load(path)?
    } else {
        load_gguf(path)?
    };
    check_vocab(&model, path)?;
    Ok(model)
}

/// Every id the tokenizer can produce must index the embedding: a tokenizer larger than the
/// model failed deep inside the forward (`index-select invalid index`), on the first rare word.
fn check_vocab(model: &LoadedModel, path: &Path) -> Result<()> {
    let vocab = model.config.vocab_size;
    if let Some(max) = model.tokenizer.max_id() {
        if max as usize >= vocab {
            bail!(
                "{}: the tokenizer has ids up to {max} but the model's vocabulary (its embedding) has {vocab} rows",
                path.display()
            );
        }
    }
    Ok(())
}

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let mut magic = [0u8; 4];
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = std::io::Read::read(&mut f, &mut magic)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if n < 4 || &magic != b"GGUF" {
        bail!(
            "{}: not a GGUF file (expected magic 'GGUF', found {:?}); a MODEL is a .gguf file or an HF directory",
            path.display(),
            String::from_utf8_lossy(&magic[..n])
        );
    }
    gguf::load(path)
}

/// Writes `bytes` to `path` so that readers see either the old file or the whole new one:
/// temp file in the same directory, fsync, rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |f| Ok(f.write_all(bytes)?))
}

/// Like [`atomic_write`], for writers that produce a file at a path (safetensors). The temp
/// file (tempfile's, in the same directory) is removed if anything fails.
pub fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // tempfile makes files private (0600); a model or report is as readable as any file.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    write(tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
