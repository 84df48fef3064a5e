//! Attention cells. One module per kind ([`softmax`], [`supra`]); each holds its forms side by
//! side: the naive f64 reference the tests compare against, the differentiable training form,
//! and the prefill and single-token step on plain slices. [`Cell`] is all the decoder sees:
//! forward with an optional [`CellState`], the state's size, the projections.
//!
//! A new kind is one more module and one more variant here; the decoder does not change.

pub mod delta;
pub mod feature_map;
pub mod signed_softmax;
pub mod softmax;
pub mod supra;
pub mod window;

use crate::model::linear::Linear;
use crate::model::spin;
use anyhow::{anyhow, bail, ensure, Result};
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;
use softmax::SoftmaxAttention;
use std::collections::HashMap;
use supra::SupraAttention;
use window::{WindowAttention, WindowState};

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

/// The teacher's attention projections, which every kind of cell keeps, and their heads.
#[derive(Debug, Clone)]
pub struct Projections {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Projections {
    /// q (B, H, T, d), k and v (B, H_kv, T, d) for `x` (B, T, hidden), before RoPE.
    pub fn heads(&self, x: &Tensor, exec: Exec) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, hkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let [q, k, v] = self.qkv(x, exec)?;
        Ok((
            split_heads(&q, h, d)?,
            split_heads(&k, hkv, d)?,
            split_heads(&v, hkv, d)?,
        ))
    }

    /// q, k and v (B, T, heads·d) for `x` (B, T, hidden), all heads side by side, before RoPE:
    /// one call of the three products (quantized, the input is quantized once for the three).
    pub fn qkv(&self, x: &Tensor, exec: Exec) -> Result<[Tensor; 3]> {
        Linear::forward_each(&[&self.q, &self.k, &self.v], x, exec)?
            .try_into()
            .map_err(|_| anyhow!("three products give three outputs"))
    }

    /// One token's q, k and v (all heads side by side) on slices, for decoding steps: a
    /// dozen small tensor operations per layer would cost more than the products.
    pub fn token(&self, x: &Tensor) -> Result<[Vec<f32>; 3]> {
        let [q, k, v] = self.qkv(x, Exec::Infer)?;
        let row = |y: Tensor| -> Result<Vec<f32>> { Ok(y.flatten_all()?.to_vec1()?) };
        Ok([row(q)?, row(k)?, row(v)?])
    }

    /// Per-head outputs (B, H, T, d) through Wo: (B, T, hidden).
    pub fn output(&self, y: &Tensor, exec: Exec) -> Result<Tensor> {
        let (b, h, t, d) = y.dims4()?;
        self.o
            .forward(&y.transpose(1, 2)?.reshape((b, t, h * d))?, exec)
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.q, &mut self.k, &mut self.v, &mut self.o]
    }
}

/// (B, T, n·d) → (B, n, T, d), contiguous.
pub fn split_heads(y: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let (b, t, _) = y.dims3()?;
    Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
}

/// One layer's attention, of any kind.
#[derive(Debug, Clone)]
pub enum Cell {
    Softmax(SoftmaxAttention),
    Supra(SupraAttention),
    Window(WindowAttention),
}

/// What one layer keeps between calls.
#[derive(Debug, Clone)]
pub enum CellState {
    /// Softmax: keys and values of every position so far.
    Kv(KvCache),
    /// SUPRA: the (B, H, d', d_v) state, of constant size; `None` before the first token.
    Rnn(Option<supra::RnnState>),
    /// Window + linear: sinks, window and the linear state; `None` before the first token.
    Window(Option<WindowState>),
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
        if exec == Exec::Infer && x.dims()[..2] == [1, 1] {
            if let Some(state) = state {
                return self.step_batch(x, &[offset], &mut [state]);
            }
        }
        match (self, state) {
            (Cell::Softmax(a), None) => a.forward(x, offset, None, exec),
            (Cell::Softmax(a), Some(CellState::Kv(kv))) => a.forward(x, offset, Some(kv), exec),
            (Cell::Supra(a), None) => a.forward(x, offset, None, exec),
            (Cell::Supra(a), Some(CellState::Rnn(s))) => a.forward(x, offset, Some(s), exec),
            (Cell::Window(a), None) => a.forward(x, offset, None, exec),
            (Cell::Window(a), Some(CellState::Window(s))) => a.forward(x, offset, Some(s), exec),
            _ => bail!("the state does not belong to this kind of attention layer"),
        }
    }

    /// One decoding step of several sequences: row b of `x` (B, 1, hidden) is the next token of
    /// the sequence whose state is `states[b]`, at position `offsets[b]`. The projections run
    /// once for all rows (a step reads the weights once, whatever B); each row's attention runs
    /// on its own state, the same code a lone sequence's step runs, so its output does not
    /// depend on the other rows. Returns (B, 1, hidden).
    pub fn step_batch(
        &self,
        x: &Tensor,
        offsets: &[usize],
        states: &mut [&mut CellState],
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        ensure!(
            t == 1 && offsets.len() == b && states.len() == b,
            "a decoding step takes one token for each of its {} states (got {b} × {t} tokens, {} positions)",
            states.len(),
            offsets.len()
        );
        let proj = self.proj();
        let [q, k, v] = proj.token(x)?;
        let (wq, wkv) = (
            proj.n_heads * proj.head_dim,
            proj.n_kv_heads * proj.head_dim,
        );
        let y = match self {
            Cell::Softmax(a) => {
                let outs = spin::map_rows(states, &|i, state| {
                    let CellState::Kv(kv) = &mut **state else {
                        bail!("the state does not belong to this kind of attention layer");
                    };
                    let rows = [
                        q[i * wq..(i + 1) * wq].to_vec(),
                        k[i * wkv..(i + 1) * wkv].to_vec(),
                        v[i * wkv..(i + 1) * wkv].to_vec(),
                    ];
                    a.step(rows, offsets[i], kv)
                });
                outs.into_iter().collect::<Result<Vec<_>>>()?.concat()
            }
            Cell::Supra(a) => {
                let mut st = each_state(states, |s| match s {
                    CellState::Rnn(s) => Some(s),
                    _ => None,
                })?;
                a.step([q, k, v], offsets, &mut st)?
            }
            Cell::Window(a) => {
                let mut st = each_state(states, |s| match s {
                    CellState::Window(s) => Some(s),
                    _ => None,
                })?;
                a.step([q, k, v], offsets, &mut st)?
            }
        };
        let y = Tensor::from_vec(y, (b, 1, wq), x.device())?;
        proj.o.forward(&y, Exec::Infer)
    }

    /// The teacher's projections, which every kind keeps.
    fn proj(&self) -> &Projections {
        match self {
            Cell::Softmax(a) => &a.proj,
            Cell::Supra(a) => &a.proj,
            Cell::Window(a) => &a.proj,
        }
    }

    /// An empty state; a KV cache starts with room for `capacity` positions and grows.
    pub fn new_state(&self, capacity: usize) -> CellState {
        match self {
            Cell::Softmax(_) => CellState::Kv(KvCache::new(2, capacity)),
            Cell::Supra(_) => CellState::Rnn(None),
            Cell::Window(_) => CellState::Window(None),
        }
    }

    /// Whether the state grows with the context (a KV cache) rather than staying fixed.
    pub fn state_grows(&self) -> bool {
        matches!(self, Cell::Softmax(_))
    }

    /// Bytes of one sequence's state after `len` tokens (f32), as [`CellState::bytes`] counts
    /// them: a KV cache grows with `len`; the others are the same size from the first token.
    pub fn state_bytes(&self, len: usize) -> usize {
        4 * match self {
            Cell::Softmax(a) => 2 * a.proj.n_kv_heads * len * a.proj.head_dim,
            Cell::Supra(a) => a.proj.n_heads * a.feature_dim * a.proj.head_dim,
            Cell::Window(a) => {
                let sd = a.state_dims();
                (sd.span.sinks + sd.span.window) * sd.kv_heads * (2 * sd.head_dim + sd.feature_dim)
                    + sd.heads * sd.feature_dim * sd.linear_width()
            }
        }
    }

    /// Tokens per chunk of the chunked forms (no effect on softmax attention).
    pub fn set_chunk_size(&mut self, chunk: usize) {
        match self {
            Cell::Supra(a) => a.chunk_size = chunk,
            Cell::Window(a) => a.chunk_size = chunk,
            Cell::Softmax(_) => {}
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
                let want = [1, a.proj.n_kv_heads, pos, a.proj.head_dim];
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
                let (h, d) = (a.proj.n_heads, a.proj.head_dim);
                let s = get("state", &[1, h, a.feature_dim, d])?;
                if s.is_none() && pos > 0 {
                    bail!("{prefix} (SUPRA) needs '{prefix}.state'");
                }
                Ok(CellState::Rnn(
                    s.as_ref().map(supra::RnnState::from_tensor).transpose()?,
                ))
            }
            Cell::Window(a) => {
                if pos == 0 {
                    return Ok(CellState::Window(None));
                }
                let sd = a.state_dims();
                let (h, hkv, d, f) = (sd.heads, sd.kv_heads, sd.head_dim, sd.feature_dim);
                let kept = sd.span.kept(pos).len();
                let need = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
                    match get(name, shape)? {
                        Some(t) => Ok(t.flatten_all()?.to_vec1()?),
                        None => bail!("{prefix} (window) needs '{prefix}.{name}'"),
                    }
                };
                let (k, v) = (
                    need("k", &[1, hkv, kept, d])?,
                    need("v", &[1, hkv, kept, d])?,
                );
                let features = need("features", &[1, hkv, kept, f])?;
                let linear = need("linear", &[1, h, f, sd.linear_width()])?;
                Ok(CellState::Window(Some(WindowState::from_kept_rows(
                    sd,
                    pos,
                    [&k, &v, &features],
                    linear,
                ))))
            }
        }
    }

    /// Every projection, for quantization.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Cell::Softmax(a) => a.proj.linears_mut(),
            Cell::Supra(a) => {
                let mut l = a.proj.linears_mut();
                l.extend(a.phi.linears_mut());
                l
            }
            Cell::Window(a) => {
                let mut l = a.proj.linears_mut();
                l.extend(a.phi.linears_mut());
                l
            }
        }
    }
}

/// Each sequence's state of the kind `pick` takes out, or an error for a state of another kind.
fn each_state<'a, T>(
    states: &'a mut [&mut CellState],
    pick: impl Fn(&'a mut CellState) -> Option<&'a mut T>,
) -> Result<Vec<&'a mut T>> {
    states
        .iter_mut()
        .map(|s| {
            pick(s)
                .ok_or_else(|| anyhow!("the state does not belong to this kind of attention layer"))
        })
        .collect()
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
            CellState::Rnn(s) => CellState::Rnn(s.as_ref().map(|s| s.repeat(n)).transpose()?),
            CellState::Window(s) => CellState::Window(match s {
                None => None,
                Some(s) => {
                    if s.batch != 1 {
                        bail!("only a single-sequence state repeats (batch {})", s.batch);
                    }
                    let rep = |x: &Vec<f32>| x.repeat(n);
                    Some(WindowState {
                        batch: n,
                        keys: rep(&s.keys),
                        values: rep(&s.values),
                        features: rep(&s.features),
                        linear: rep(&s.linear),
                        ..s.clone()
                    })
                }
            }),
        })
    }

    /// The tensors by name (under `prefix`), for saving: `k` and `v` (1, kv heads, pos, head
    /// dim) of a KV cache, `state` (1, heads, d', d_v) of a SUPRA layer; of a window layer `k`,
    /// `v` and `features` of its kept tokens (1, kv heads, kept, ·) and `linear` (1, heads, d',
    /// d_v + 1), S with z as its last column (the delta rule's: (1, heads, d', d_v), S alone).
    pub fn named_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        Ok(match self {
            CellState::Kv(c) => match (c.k()?, c.v()?) {
                (Some(k), Some(v)) => vec![(format!("{prefix}.k"), k), (format!("{prefix}.v"), v)],
                _ => Vec::new(),
            },
            CellState::Rnn(Some(s)) => {
                ensure!(s.dims[0] == 1, "only a single-sequence state is saved");
                vec![(format!("{prefix}.state"), s.to_tensor()?)]
            }
            CellState::Rnn(None) => Vec::new(),
            CellState::Window(None) => Vec::new(),
            CellState::Window(Some(s)) => {
                ensure!(s.batch == 1, "only a single-sequence state is saved");
                let sd = s.dims;
                let kept = sd.span.kept(s.len).len();
                let [k, v, features] = s.kept_rows();
                let t = |x: Vec<f32>, c: usize| {
                    Tensor::from_vec(x, (1, sd.kv_heads, kept, c), &candle_core::Device::Cpu)
                };
                let linear = Tensor::from_vec(
                    s.linear.clone(),
                    (1, sd.heads, sd.feature_dim, sd.linear_width()),
                    &candle_core::Device::Cpu,
                )?;
                vec![
                    (format!("{prefix}.k"), t(k, sd.head_dim)?),
                    (format!("{prefix}.v"), t(v, sd.head_dim)?),
                    (format!("{prefix}.features"), t(features, sd.feature_dim)?),
                    (format!("{prefix}.linear"), linear),
                ]
            }
        })
    }

    /// Bytes held: a KV cache grows with the context, a SUPRA state does not.
    pub fn bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let cached =
            |t: candle_core::Result<Option<Tensor>>| t.ok().flatten().map_or(0, |t| bytes(&t));
        match self {
            CellState::Kv(c) => cached(c.k()) + cached(c.v()),
            CellState::Rnn(s) => s.as_ref().map_or(0, supra::RnnState::bytes),
            CellState::Window(s) => s.as_ref().map_or(0, WindowState::bytes),
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
