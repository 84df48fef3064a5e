//! A generation state that outlives one call: the cache after some tokens, the logits for the
//! next one, and the tokens themselves. `supra generate --save-state/--load-state` keeps it in a
//! file, the server's prompt cache keeps it in memory, and [`State::fork`] starts several
//! continuations from one. For SUPRA layers it is a few fixed-size matrices, however long the
//! text it has read; softmax layers carry their whole KV cache.

use crate::model::llama::{Cache, Llama};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Tokens per forward pass when reading a prompt.
pub const PREFILL_CHUNK: usize = 512;

const FORMAT: &str = "supra-state/1";

#[derive(Debug)]
pub struct State {
    pub cache: Cache,
    /// Logits (1, vocab) after the last token; `None` before the first.
    pub logits: Option<Tensor>,
    /// Every token read so far, in order.
    pub tokens: Vec<u32>,
}

impl State {
    pub fn new(model: &Llama) -> Self {
        Self {
            cache: model.new_cache(),
            logits: None,
            tokens: Vec::new(),
        }
    }

    /// An independent copy to continue from.
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            cache: self.cache.fork()?,
            logits: self.logits.clone(),
            tokens: self.tokens.clone(),
        })
    }

    /// Bytes held: the cache, the logits and the tokens.
    pub fn bytes(&self) -> usize {
        let logits = self
            .logits
            .as_ref()
            .map_or(0, |l| l.elem_count() * l.dtype().size_in_bytes());
        self.cache.bytes() + logits + 4 * self.tokens.len()
    }

    /// Reads `ids` (in chunks of [`PREFILL_CHUNK`]).
    pub fn feed(&mut self, model: &Llama, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.logits = Some(model.prefill(&mut self.cache, ids, PREFILL_CHUNK)?);
        self.tokens.extend_from_slice(ids);
        Ok(())
    }

    /// Writes the state as safetensors (tensors of [`Cache::named_tensors`] plus `logits`; the
    /// tokens, position and model fingerprint in the metadata), atomically.
    pub fn save(&self, model: &Llama, path: &Path) -> Result<()> {
        let mut tensors = self.cache.named_tensors()?;
        if let Some(l) = &self.logits {
            tensors.push(("logits".to_string(), l.clone()));
        }
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("pos".to_string(), self.cache.pos.to_string()),
            ("tokens".to_string(), serde_json::to_string(&self.tokens)?),
            ("model".to_string(), fingerprint(model)?),
        ]);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
                .with_context(|| format!("cannot serialize the state for {}", path.display()))?;
        crate::io::atomic_write(path, &bytes)
    }

    /// Reads a state written by [`State::save`] for this same model.
    pub fn load(model: &Llama, path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let what = || format!("{} is not a supra state file", path.display());
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(what)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| -> Result<&String> {
            meta.get(k)
                .with_context(|| format!("{}: metadata field '{k}' missing", what()))
        };
        if field("format")? != FORMAT {
            bail!(
                "{}: format '{}', expected '{FORMAT}'",
                what(),
                field("format")?
            );
        }
        if field("model")? != &fingerprint(model)? {
            bail!(
                "{} was saved from a model with another configuration (layers, sizes or \
                 attention kinds differ); load it with the model that wrote it",
                path.display()
            );
        }
        let pos: usize = field("pos")?
            .parse()
            .with_context(|| format!("{}: 'pos' is not a number", path.display()))?;
        let tokens: Vec<u32> = serde_json::from_str(field("tokens")?)
            .with_context(|| format!("{}: 'tokens' is not a list of ids", path.display()))?;
        if tokens.len() != pos {
            bail!(
                "{}: {} tokens recorded for position {pos}",
                path.display(),
                tokens.len()
            );
        }
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("{}: cannot read its tensors", path.display()))?;
        let logits = tensors.remove("logits");
        if let Some(l) = &logits {
            let want = [1, model.config.vocab_size];
            if l.dims() != want {
                bail!(
                    "{}: 'logits' has shape {:?}, expected {want:?}",
                    path.display(),
                    l.dims()
                );
            }
        }
        let cache = model
            .cache_from_tensors(&tensors, pos)
            .with_context(|| format!("{}: state does not fit the model", path.display()))?;
        Ok(Self {
            cache,
            logits: logits.map(|l| l.to_device(model.device())).transpose()?,
            tokens,
        })
    }
}

/// Identifies a model's architecture (not its weights): a state only makes sense in a model
/// with the same layers and shapes.
fn fingerprint(model: &Llama) -> Result<String> {
    let json = serde_json::to_string(&model.config.to_hf_json())?;
    Ok(format!("{:x}", Sha256::digest(json.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_loaded;

    fn model(dir: &Path, softmax_layers: Option<&[usize]>) -> Llama {
        let m = tiny_loaded(dir, 3, softmax_layers).unwrap();
        Llama::new(&m.config, &m.weights).unwrap()
    }

    #[test]
    fn fork_save_and_load_continue_exactly_like_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let model = model(dir.path(), Some(&[1]));
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 50) as u32 + 3).collect();
        let mut whole = State::new(&model);
        whole.feed(&model, &ids).unwrap();

        let mut first = State::new(&model);
        first.feed(&model, &ids[..25]).unwrap();
        let path = dir.path().join("s.safetensors");
        first.save(&model, &path).unwrap();
        let mut loaded = State::load(&model, &path).unwrap();
        let mut forked = first.fork().unwrap();
        // Continuing the original must not disturb the fork (KV buffers are written in place).
        first.feed(&model, &ids[25..30]).unwrap();
        for s in [&mut loaded, &mut forked] {
            s.feed(&model, &ids[25..]).unwrap();
            assert_eq!(s.tokens, ids);
            let d = crate::testing::max_abs_diff(
                s.logits.as_ref().unwrap(),
                whole.logits.as_ref().unwrap(),
            );
            assert!(d < 1e-4, "logits differ by {d}");
        }
    }

    #[test]
    fn a_state_from_another_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hybrid = model(dir.path(), Some(&[1]));
        let mut s = State::new(&hybrid);
        s.feed(&hybrid, &[3, 4, 5]).unwrap();
        let path = dir.path().join("s.safetensors");
        s.save(&hybrid, &path).unwrap();
        let teacher = model(dir.path(), None);
        let err = State::load(&teacher, &path).unwrap_err().to_string();
        assert!(err.contains("another configuration"), "{err}");
        std::fs::write(&path, b"not a state").unwrap();
        let err = format!("{:#}", State::load(&hybrid, &path).unwrap_err());
        assert!(err.contains("not a supra state file"), "{err}");
    }
}
