//! Held-out perplexity over non-overlapping windows.

use crate::model::llama::{Form, Llama};
use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Perplexity {
    /// Tokens predicted (each window's first token has no context and is not scored).
    pub tokens: usize,
    pub nll: f64,
    pub ppl: f64,
}

/// Scores `ids` in windows of `window` tokens through `form`, `batch` windows per forward pass
/// (chunked form), calling `progress` with the number of windows done.
pub fn perplexity(
    model: &Llama,
    form: Form,
    ids: &[u32],
    window: usize,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Perplexity> {
    if window < 2 || ids.len() < 2 {
        bail!("perplexity needs windows of at least 2 tokens and a text of at least 2 tokens");
    }
    let windows: Vec<Vec<u32>> = ids
        .chunks(window)
        .filter(|w| w.len() >= 2)
        .map(<[u32]>::to_vec)
        .collect();
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (i, group) in windows.chunks(batch.max(1)).enumerate() {
        let scored = match form {
            Form::Chunked => model.score_batch(group)?,
            _ => group
                .iter()
                .map(|w| model.score_with(w, form))
                .collect::<Result<_>>()?,
        };
        for lps in scored {
            sum -= lps.iter().map(|&x| x as f64).sum::<f64>();
            n += lps.len();
        }
        progress((i + 1) * batch.max(1));
    }
    let nll = sum / n as f64;
    Ok(Perplexity {
        tokens: n,
        nll,
        ppl: nll.exp(),
    })
}
