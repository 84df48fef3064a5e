//! Softmax attention (the teacher): o_t = Σ_{i≤t} softmax_i(q_t·k_i/√d) v_i, with GQA and RoPE.

use crate::model::linear::Linear;
use crate::model::rope::Rope;
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;

#[derive(Debug, Clone)]
pub struct SoftmaxAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// (b, h_kv, t, d) → (b, h_kv·n_rep, t, d), each kv head repeated for its group of query heads.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, h, n_rep, t, d))?
        .reshape((b, h * n_rep, t, d))?)
}

/// Additive mask for `t` new queries at positions offset..offset+t over offset+t keys.
fn causal_mask(t: usize, offset: usize, device: &candle_core::Device) -> Result<Tensor> {
    let total = t + offset;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?)
}

impl SoftmaxAttention {
    /// `x`: (batch, seq, hidden) at positions offset..offset+seq. With a cache, keys and values of
    /// earlier positions come from it and the new ones are appended.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let y = self.heads_output(x, rope, offset, cache)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_dim))?;
        self.o.forward(&y)
    }

    /// Per-head attention output (batch, heads, seq, head_dim), before Wo.
    pub fn heads_output(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, hkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope.apply(&heads(self.q.forward(x)?, h)?, offset)?;
        let k = rope.apply(&heads(self.k.forward(x)?, hkv)?, offset)?;
        let v = heads(self.v.forward(x)?, hkv)?;
        // The cache hands back views into its buffer; matmul reads them strided.
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        // Grouped-query attention without copying keys and values per query head: the
        // n_rep query heads of a key/value head (adjacent, as repeat_kv would lay them out)
        // become n_rep·t rows against that head's keys.
        let n_rep = h / hkv;
        // Scaling q rather than the scores: one pass over (seq, head_dim) instead of over
        // (seq, keys), which at long contexts is the bigger tensor by far.
        let scale = 1.0 / (d as f64).sqrt();
        let q = (q * scale)?.reshape((b, hkv, n_rep * t, d))?;
        let mut att = q.matmul(&k.t()?)?;
        if t > 1 {
            let mask = causal_mask(t, k.dim(2)? - t, x.device())?;
            att = att.broadcast_add(&mask.repeat((n_rep, 1))?)?;
        }
        // The fused softmax has no backward.
        let att = if att.track_op() {
            candle_nn::ops::softmax(&att, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        Ok(att.matmul(&v)?.reshape((b, h, t, d))?)
    }
}
