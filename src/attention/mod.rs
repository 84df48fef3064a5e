//! Attention cells. One module per kind ([`softmax`], [`supra`]); each holds its forms side by
//! side: the naive f64 reference the tests compare against, the differentiable training form,
//! and the prefill and single-token step on plain slices. [`Cell`] is all the decoder sees:
//! forward with an optional [`CellState`], the state's size, the projections.
//!
//! A new kind is one more module and one more variant here; the decoder does not change.

pub mod softmax;
pub mod supra;

use crate::model::linear::Linear;
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;
use softmax::SoftmaxAttention;
use std::collections::HashMap;
use supra::SupraAttention;

/// Whether a pass trains or infers, chosen once by the command and passed down. Training takes
/// the differentiable forms (candle ops with a backward); inference takes the fused kernels on
/// plain slices, which have none. Nothing guesses it from the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    Train,
    Infer,
}

/// Grouped-query attention: the key/value head that query head `h` reads. Adjacent query heads
/// share one, as transformers' `repeat_kv` lays them out. Every form maps heads through this.
pub fn kv_head(h: usize, n_heads: usize, n_kv_heads: usize) -> usize {
    h / (n_heads / n_kv_heads)
}

/// (b, h_kv, t, d) → (b, h, t, d): each query head's keys or values, in the layout
/// [`kv_head`] names (each kv head repeated for its adjacent query heads; a test holds the two
/// together). Differentiable: the training forms use it. Expand and reshape, not a gather:
/// the gather's backward (a scatter-add) cost the training step 5-10 % of its attention time.
pub fn repeat_kv(x: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (b, n_kv, t, d) = x.dims4()?;
    if n_kv == n_heads {
        return Ok(x.clone());
    }
    Ok(x.unsqueeze(2)?
        .expand((b, n_kv, n_heads / n_kv, t, d))?
        .reshape((b, n_heads, t, d))?)
}

/// One layer's attention, of any kind.
#[derive(Debug, Clone)]
pub enum Cell {
    Softmax(SoftmaxAttention),
    Supra(SupraAttention),
}

/// What one layer keeps between calls.
#[derive(Debug, Clone)]
pub enum CellState {
    /// Softmax: keys and values of every position so far.
    Kv(KvCache),
    /// SUPRA: the (B, H, d', d_v) state, of constant size; `None` before the first token.
    Rnn(Option<Tensor>),
}

impl Cell {
    /// `x` (batch, seq, hidden) at positions offset..offset+seq → (batch, seq, hidden). With a
    /// state, continues from it and leaves it after the last token.
    pub fn forward(
        &self,
        x: &Tensor,
        offset: usize,
        state: Option<&mut CellState>,
        exec: Exec,
    ) -> Result<Tensor> {
        match (self, state) {
            (Cell::Softmax(a), None) => a.forward(x, offset, None, exec),
            (Cell::Softmax(a), Some(CellState::Kv(kv))) => a.forward(x, offset, Some(kv), exec),
            (Cell::Supra(a), None) => a.forward(x, offset, None, exec),
            (Cell::Supra(a), Some(CellState::Rnn(s))) => a.forward(x, offset, Some(s), exec),
            _ => bail!("the state does not belong to this kind of attention layer"),
        }
    }

    /// An empty state; a KV cache starts with room for `capacity` positions and grows.
    pub fn new_state(&self, capacity: usize) -> CellState {
        match self {
            Cell::Softmax(_) => CellState::Kv(KvCache::new(2, capacity)),
            Cell::Supra(_) => CellState::Rnn(None),
        }
    }

    /// Whether the state grows with the context (a KV cache) rather than staying fixed.
    pub fn state_grows(&self) -> bool {
        matches!(self, Cell::Softmax(_))
    }

    /// Tokens per chunk of the chunked forms (no effect on softmax attention).
    pub fn set_chunk_size(&mut self, chunk: usize) {
        if let Cell::Supra(a) = self {
            a.chunk_size = chunk;
        }
    }

    /// A single-sequence state at position `pos` from saved tensors (named as
    /// [`CellState::named_tensors`] writes them under `prefix`), each checked against this
    /// layer's shapes.
    pub fn state_from_tensors(
        &self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        pos: usize,
    ) -> Result<CellState> {
        let get = |name: &str, want: &[usize]| -> Result<Option<Tensor>> {
            let key = format!("{prefix}.{name}");
            let Some(t) = tensors.get(&key) else {
                return Ok(None);
            };
            if t.dims() != want {
                bail!(
                    "'{key}' has shape {:?}; this model needs {want:?}",
                    t.dims()
                );
            }
            Ok(Some(t.clone()))
        };
        match self {
            Cell::Softmax(a) => {
                let want = [1, a.n_kv_heads, pos, a.head_dim];
                let mut kv = KvCache::new(2, pos.max(1));
                match (get("k", &want)?, get("v", &want)?) {
                    (Some(k), Some(v)) => {
                        kv.append(&k, &v)?;
                    }
                    (None, None) if pos == 0 => {}
                    _ => bail!("{prefix} (softmax) needs both '{prefix}.k' and '.v'"),
                }
                Ok(CellState::Kv(kv))
            }
            Cell::Supra(a) => {
                let s = get("state", &[1, a.n_heads, a.feature_dim, a.head_dim])?;
                if s.is_none() && pos > 0 {
                    bail!("{prefix} (SUPRA) needs '{prefix}.state'");
                }
                Ok(CellState::Rnn(s))
            }
        }
    }

    /// Every projection, for quantization.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Cell::Softmax(a) => vec![&mut a.q, &mut a.k, &mut a.v, &mut a.o],
            Cell::Supra(a) => {
                let mut l = vec![&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut a.phi_q];
                l.extend(a.phi_k.as_mut());
                l
            }
        }
    }
}

impl CellState {
    /// `n` copies of this single-sequence state as one batch of `n` sequences (deep copies: a
    /// KV cache is written in place).
    pub fn repeat(&self, n: usize) -> Result<CellState> {
        let rows = |t: &Tensor| -> Result<Tensor> {
            if t.dim(0)? != 1 {
                bail!("only a single-sequence state repeats (batch {})", t.dim(0)?);
            }
            Ok(t.repeat((n, 1, 1, 1))?.contiguous()?)
        };
        Ok(match self {
            CellState::Kv(c) => {
                let mut kv = KvCache::new(2, c.current_seq_len().max(1));
                if let (Some(k), Some(v)) = (c.k()?, c.v()?) {
                    kv.append(&rows(&k)?, &rows(&v)?)?;
                }
                CellState::Kv(kv)
            }
            CellState::Rnn(s) => CellState::Rnn(s.as_ref().map(rows).transpose()?),
        })
    }

    /// The tensors by name (under `prefix`), for saving: `k` and `v` (1, kv heads, pos, head
    /// dim) of a KV cache, `state` (1, heads, d', d_v) of a SUPRA layer.
    pub fn named_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        Ok(match self {
            CellState::Kv(c) => match (c.k()?, c.v()?) {
                (Some(k), Some(v)) => vec![(format!("{prefix}.k"), k), (format!("{prefix}.v"), v)],
                _ => Vec::new(),
            },
            CellState::Rnn(Some(s)) => vec![(format!("{prefix}.state"), s.clone())],
            CellState::Rnn(None) => Vec::new(),
        })
    }

    /// Bytes held: a KV cache grows with the context, a SUPRA state does not.
    pub fn bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let cached =
            |t: candle_core::Result<Option<Tensor>>| t.ok().flatten().map_or(0, |t| bytes(&t));
        match self {
            CellState::Kv(c) => cached(c.k()) + cached(c.v()),
            CellState::Rnn(s) => s.as_ref().map_or(0, bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn repeat_kv_lays_heads_out_as_kv_head_says() {
        // 6 query heads over 2 kv heads: 0,1,2 read kv 0 and 3,4,5 read kv 1.
        assert_eq!(
            (0..6).map(|h| kv_head(h, 6, 2)).collect::<Vec<_>>(),
            [0, 0, 0, 1, 1, 1]
        );
        for (h, n_kv) in [(6, 2), (9, 3), (4, 1), (4, 4)] {
            let x = Tensor::arange(0f32, n_kv as f32, &Device::Cpu)
                .unwrap()
                .reshape((1, n_kv, 1, 1))
                .unwrap();
            let r = repeat_kv(&x, h).unwrap().flatten_all().unwrap();
            let want: Vec<f32> = (0..h).map(|i| kv_head(i, h, n_kv) as f32).collect();
            assert_eq!(r.to_vec1::<f32>().unwrap(), want);
        }
    }
}
