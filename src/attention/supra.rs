//! SUPRA linear attention (Mercat et al. 2024, DESIGN.md §1.2).
//!
//! Per layer: q, k, v from the pretrained projections; a learned feature map
//! φ(x) = ReLU(W x + b) over all heads at once; GQA repeat after φ; RoPE after φ; a fixed decay
//! γ_h per head; no denominator; GroupNorm per head; then the pretrained Wo:
//!
//! ```text
//! o_t = Σ_{i≤t} γ^(t−i) (q̃_t · k̃_i / √d') v_i          q̃ = RoPE(φ(q)), k̃ = RoPE(φ(k))
//! ```
//!
//! The sum has three forms that compute the same function, side by side below:
//! - [`parallel`]: ((Q̃K̃ᵀ/√d') ⊙ D) V with D[t,i] = γ^(t−i) — the O(T²) reference;
//! - [`chunked`]: the masked form inside chunks of C tokens and a d'×d_v state across them —
//!   O(T·C), differentiable, the training and prefill form;
//! - [`recurrent`]: S_t = γ S_{t−1} + k̃_tᵀ v_t/√d', o_t = q̃_t S_t — O(1) per token, generation;
//! - [`chunked_inference`]: the chunked form again on plain slices, without gradients, reading
//!   each query head's key/value head in place — prefill and evaluation.
//!
//! The first three take featurized, rotated inputs q̃, k̃ of shape (B, H, T, d') and v of shape
//! (B, H, T, d_v), and the per-head decays. The recurrent state has shape (B, H, d', d_v) and
//! already includes the 1/√d' scale.

use crate::attention::softmax::{repeat_kv, SoftmaxAttention};
use crate::model::gemm::{gemm, Strided};
use crate::model::linear::Linear;
use crate::model::rope::Rope;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

/// How the per-head decay γ_h is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Decay {
    /// γ_h = exp(−2^(−8(h+1)/H)): ALiBi / Lightning-Attention slopes (the paper's choice).
    Lightning,
    /// γ_h = 1 − 2^(−5−h) (RetNet).
    RetNet,
    /// γ = 1: plain causal linear attention.
    None,
    /// One γ per head, each in (0, 1].
    Explicit(Vec<f64>),
}

impl Decay {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "lightning" => Ok(Self::Lightning),
            "retnet" => Ok(Self::RetNet),
            "none" => Ok(Self::None),
            other => bail!("unknown decay '{other}' (known: lightning, retnet, none, or a list of per-head values)"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Lightning => "lightning",
            Self::RetNet => "retnet",
            Self::None => "none",
            Self::Explicit(_) => "explicit",
        }
    }

    pub fn gammas(&self, n_heads: usize) -> Result<Vec<f64>> {
        let h = n_heads as f64;
        let g: Vec<f64> = match self {
            Self::Lightning => (0..n_heads)
                .map(|i| (-(2f64.powf(-8.0 * (i as f64 + 1.0) / h))).exp())
                .collect(),
            Self::RetNet => (0..n_heads)
                .map(|i| 1.0 - 2f64.powi(-5 - i as i32))
                .collect(),
            Self::None => vec![1.0; n_heads],
            Self::Explicit(g) => {
                ensure!(
                    g.len() == n_heads,
                    "explicit decay has {} values for {n_heads} heads",
                    g.len()
                );
                g.clone()
            }
        };
        if let Some(bad) = g.iter().find(|&&x| !(x > 0.0 && x <= 1.0)) {
            bail!("decay {bad} is outside (0, 1]");
        }
        Ok(g)
    }
}

impl std::str::FromStr for Decay {
    type Err = anyhow::Error;

    /// A name, or comma-separated per-head values ("0.9,0.95,0.99").
    fn from_str(s: &str) -> Result<Self> {
        if s.contains(',') || s.parse::<f64>().is_ok() {
            let vals = s
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse::<f64>()
                        .map_err(|_| anyhow::anyhow!("'{x}' is not a number"))
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(Self::Explicit(vals));
        }
        Self::parse(s)
    }
}

/// γ_h^e for every head h and exponent e in `exps`, shape (1, H, len(exps), 1).
fn decay_powers(
    gammas: &[f64],
    exps: impl Iterator<Item = f64> + Clone,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let vals: Vec<f64> = gammas
        .iter()
        .flat_map(|g| exps.clone().map(move |e| g.powf(e)))
        .collect();
    let n = vals.len() / gammas.len();
    Ok(Tensor::from_vec(vals, (1, gammas.len(), n, 1), dev)?.to_dtype(dtype)?)
}

/// D[h, t, i] = γ_h^(t−i) for i ≤ t, else 0; shape (1, H, T, T).
fn decay_mask(gammas: &[f64], t: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut vals = Vec::with_capacity(gammas.len() * t * t);
    for g in gammas {
        for row in 0..t {
            for col in 0..t {
                vals.push(if col <= row {
                    g.powi((row - col) as i32)
                } else {
                    0.0
                });
            }
        }
    }
    Ok(Tensor::from_vec(vals, (1, gammas.len(), t, t), dev)?.to_dtype(dtype)?)
}

fn check_shapes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gammas: &[f64],
) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, h, t, dk) = q.dims4()?;
    ensure!(
        k.dims() == q.dims(),
        "q̃ {:?} and k̃ {:?} differ in shape",
        q.dims(),
        k.dims()
    );
    let (vb, vh, vt, dv) = v.dims4()?;
    ensure!(
        (vb, vh, vt) == (b, h, t),
        "v {:?} does not match q̃ {:?}",
        v.dims(),
        q.dims()
    );
    ensure!(gammas.len() == h, "{} decays for {h} heads", gammas.len());
    Ok((b, h, t, dk, dv))
}

/// The O(T²) reference: O = ((Q̃K̃ᵀ/√d') ⊙ D) V.
pub fn parallel(q: &Tensor, k: &Tensor, v: &Tensor, gammas: &[f64]) -> Result<Tensor> {
    let (_, _, t, dk, _) = check_shapes(q, k, v, gammas)?;
    let scores = (q.matmul(&k.t()?)? / (dk as f64).sqrt())?;
    let scores = scores.broadcast_mul(&decay_mask(gammas, t, q.dtype(), q.device())?)?;
    Ok(scores.matmul(&v.contiguous()?)?)
}

/// Chunks of `chunk` tokens: masked attention inside each, the state S across them.
/// `state` is S before the first token (zeros when `None`); returns (O, S after the last token).
/// Memory is O(T·C + d'·d_v): no T×T matrix is formed.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gammas: &[f64],
    chunk: usize,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, h, t, dk, dv) = check_shapes(q, k, v, gammas)?;
    ensure!(chunk > 0, "chunk size must be positive");
    let (dtype, dev) = (q.dtype(), q.device());
    let scale = 1.0 / (dk as f64).sqrt();
    let mut s = match state {
        Some(s) => s.clone(),
        None => Tensor::zeros((b, h, dk, dv), dtype, dev)?,
    };
    let mut outs = Vec::with_capacity(t.div_ceil(chunk));
    let mut start = 0;
    while start < t {
        let len = chunk.min(t - start);
        let qc = q.narrow(2, start, len)?.contiguous()?;
        let kc = k.narrow(2, start, len)?.contiguous()?;
        let vc = v.narrow(2, start, len)?.contiguous()?;
        // Inside the chunk: the parallel form on len × len.
        let intra = ((qc.matmul(&kc.t()?)? * scale)?
            .broadcast_mul(&decay_mask(gammas, len, dtype, dev)?)?)
        .matmul(&vc)?;
        // From earlier chunks: q̃_t S γ^(j+1) for local position j.
        let inter = qc.matmul(&s)?.broadcast_mul(&decay_powers(
            gammas,
            (1..=len).map(|j| j as f64),
            dtype,
            dev,
        )?)?;
        outs.push((intra + inter)?);
        // S ← γ^len S + Σ_j γ^(len−1−j) k̃_jᵀ v_j / √d'.
        let k_decayed = kc.broadcast_mul(&decay_powers(
            gammas,
            (0..len).rev().map(|j| j as f64),
            dtype,
            dev,
        )?)?;
        let whole = decay_powers(gammas, std::iter::once(len as f64), dtype, dev)?;
        s = (s.broadcast_mul(&whole)? + (k_decayed.t()?.matmul(&vc)? * scale)?)?;
        start += len;
    }
    Ok((Tensor::cat(&outs, 2)?, s))
}

/// [`chunked`] for inference: the same sums per (sequence, query head) on plain slices, one
/// task each, with k and v at their own key/value heads (B, H_kv, T, ·) — query head i reads
/// head i / (H / H_kv) — and the decays as a table. At evaluation's shapes (tens of rows of
/// ~100 tokens) the candle form's repeated keys and a dozen small tensor operations per chunk
/// cost more than its products. f32 only; `state` (B, H, d', d_v) as in [`chunked`].
pub fn chunked_inference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gammas: &[f64],
    chunk: usize,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, h, t, dk) = q.dims4()?;
    let (_, hkv, _, dv) = v.dims4()?;
    ensure!(
        k.dims4()? == (b, hkv, t, dk)
            && v.dims4()? == (b, hkv, t, dv)
            && hkv > 0
            && h % hkv == 0
            && gammas.len() == h
            && chunk > 0,
        "q̃ {:?}, k̃ {:?}, v {:?}, {} decays, chunk {chunk}",
        q.dims(),
        k.dims(),
        v.dims(),
        gammas.len()
    );
    let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
    let (qs, ks, vs) = (flat(q)?, flat(k)?, flat(v)?);
    let s0 = state.map(flat).transpose()?;
    let scale = 1.0 / (dk as f32).sqrt();
    // Per head, γ^e for e = 0..=chunk, each power from f64 as the candle forms compute them.
    let pows: Vec<Vec<f32>> = gammas
        .iter()
        .map(|g| (0..=chunk).map(|e| g.powi(e as i32) as f32).collect())
        .collect();
    let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..b * h)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / h, bh % h);
            let kv = bi * hkv + hi / (h / hkv);
            let pow = &pows[hi];
            let mut s = match &s0 {
                Some(s) => s[bh * dk * dv..(bh + 1) * dk * dv].to_vec(),
                None => vec![0f32; dk * dv],
            };
            let mut o = vec![0f32; t * dv];
            let (mut a, mut qd, mut kd) = (Vec::new(), Vec::new(), Vec::new());
            for c0 in (0..t).step_by(chunk) {
                let len = chunk.min(t - c0);
                let qc = &qs[(bh * t + c0) * dk..][..len * dk];
                let kc = &ks[(kv * t + c0) * dk..][..len * dk];
                let vc = &vs[(kv * t + c0) * dv..][..len * dv];
                let oc = &mut o[c0 * dv..(c0 + len) * dv];
                // Inside the chunk: A = (Q̃ K̃ᵀ/√d') ⊙ D, O = A V.
                a.resize(len * len, 0.0);
                let (qm, km, vm) = (
                    Strided::rows(qc, dk),
                    Strided::transposed_rows(kc, dk),
                    Strided::rows(vc, dv),
                );
                gemm(&mut a, (len, len, dk), qm, km, None, scale);
                for (i, row) in a.chunks_exact_mut(len).enumerate() {
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if j <= i { *x * pow[i - j] } else { 0.0 };
                    }
                }
                gemm(oc, (len, dv, len), Strided::rows(&a, len), vm, None, 1.0);
                // From earlier chunks: O += (γ^(i+1) q̃_i) S.
                qd.clear();
                for (i, row) in qc.chunks_exact(dk).enumerate() {
                    qd.extend(row.iter().map(|x| x * pow[i + 1]));
                }
                let (qdm, sm) = (Strided::rows(&qd, dk), Strided::rows(&s, dv));
                gemm(oc, (len, dv, dk), qdm, sm, Some(1.0), 1.0);
                // S ← γ^len S + Σ_j γ^(len−1−j) k̃_jᵀ v_j / √d'.
                kd.clear();
                for (j, row) in kc.chunks_exact(dk).enumerate() {
                    let w = pow[len - 1 - j] * scale;
                    kd.extend(row.iter().map(|x| x * w));
                }
                let kdm = Strided::transposed_rows(&kd, dk);
                gemm(&mut s, (dk, dv, len), kdm, vm, Some(pow[len]), 1.0);
            }
            (o, s)
        })
        .collect();
    let (o, s): (Vec<Vec<f32>>, Vec<Vec<f32>>) = heads.into_iter().unzip();
    Ok((
        Tensor::from_vec(o.concat(), (b, h, t, dv), q.device())?,
        Tensor::from_vec(s.concat(), (b, h, dk, dv), q.device())?,
    ))
}

/// One token at a time: S_t = γ S_{t−1} + k̃_tᵀ v_t / √d', o_t = q̃_t S_t.
/// `state` is S before the first token (zeros when `None`); returns (O, S after the last token).
pub fn recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gammas: &[f64],
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, h, t, dk, dv) = check_shapes(q, k, v, gammas)?;
    let (dtype, dev) = (q.dtype(), q.device());
    let scale = 1.0 / (dk as f64).sqrt();
    let gamma = decay_powers(gammas, std::iter::once(1.0), dtype, dev)?;
    let mut s = match state {
        Some(s) => s.clone(),
        None => Tensor::zeros((b, h, dk, dv), dtype, dev)?,
    };
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let qi = q.narrow(2, i, 1)?;
        let ki = k.narrow(2, i, 1)?;
        let vi = v.narrow(2, i, 1)?;
        s = (s.broadcast_mul(&gamma)? + (ki.t()?.matmul(&vi)? * scale)?)?;
        outs.push(qi.matmul(&s)?);
    }
    Ok((Tensor::cat(&outs, 2)?, s))
}

/// GroupNorm with one group per head and no affine: normalizes each token's per-head output
/// over its d_v values. Built from differentiable ops (training goes through it).
pub fn group_norm_heads(o: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = o.mean_keepdim(D::Minus1)?;
    let centered = o.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centered.broadcast_div(&(var + eps)?.sqrt()?)?)
}

pub const GROUP_NORM_EPS: f64 = 1e-5;

/// Which form computes the sum (they agree to float tolerance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Parallel,
    Chunked,
    Recurrent,
}

/// A SUPRA attention layer: the teacher's projections plus φ.
#[derive(Debug, Clone)]
pub struct SupraAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub phi_q: Linear,
    /// Keys' own φ under GQA (H_kv·d → H_kv·d'); `None` when keys share `phi_q`.
    pub phi_k: Option<Linear>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub feature_dim: usize,
    pub gammas: Vec<f64>,
    pub chunk_size: usize,
}

impl SupraAttention {
    /// q̃ (B, H, T, d'), and k̃ (B, H_kv, T, d') and v (B, H_kv, T, d) at the key/value heads,
    /// for `x` (B, T, hidden) at positions offset.. .
    pub fn features(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize, d: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let phi = |lin: &Linear, y: Tensor| -> Result<Tensor> { Ok(lin.forward(&y)?.relu()?) };
        let (h, hkv, f) = (self.n_heads, self.n_kv_heads, self.feature_dim);
        let q = heads(phi(&self.phi_q, self.q.forward(x)?)?, h, f)?;
        let k = heads(
            phi(
                self.phi_k.as_ref().unwrap_or(&self.phi_q),
                self.k.forward(x)?,
            )?,
            hkv,
            f,
        )?;
        let v = heads(self.v.forward(x)?, hkv, self.head_dim)?;
        // RoPE acts per head, so rotating keys before any GQA repeat is the same and cheaper.
        Ok((rope.apply(&q, offset)?, rope.apply(&k, offset)?, v))
    }

    /// With a `state`, continues from it and leaves the state after the last token there
    /// (prefill in chunks, then one token at a time; `Parallel` keeps no state, so prefill
    /// uses the chunked form). Without one, runs `mode` from an empty state.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        mode: Mode,
        state: Option<&mut Option<Tensor>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let o = self.heads_output(x, rope, offset, mode, state)?;
        let o = o
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_dim))?;
        self.o.forward(&o)
    }

    /// Per-head output after GroupNorm (batch, heads, seq, head_dim), before Wo.
    pub fn heads_output(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        mode: Mode,
        state: Option<&mut Option<Tensor>>,
    ) -> Result<Tensor> {
        let t = x.dim(1)?;
        let (q, k, v) = self.features(x, rope, offset)?;
        let g = &self.gammas;
        let chunked_form = match &state {
            Some(_) => t > 1 && mode != Mode::Recurrent,
            None => mode == Mode::Chunked,
        };
        let no_grad = !(q.track_op() || k.track_op() || v.track_op());
        if chunked_form && no_grad && q.dtype() == DType::F32 {
            let st = state.as_ref().and_then(|s| s.as_ref());
            let (o, s) = chunked_inference(&q, &k, &v, g, self.chunk_size, st)?;
            if let Some(st) = state {
                *st = Some(s);
            }
            return group_norm_heads(&o, GROUP_NORM_EPS);
        }
        // The candle forms take keys and values per query head.
        let n_rep = self.n_heads / self.n_kv_heads;
        let (k, v) = (repeat_kv(&k, n_rep)?, repeat_kv(&v, n_rep)?);
        let o = match state {
            Some(st) => {
                let (o, s) = if t == 1 || mode == Mode::Recurrent {
                    recurrent(&q, &k, &v, g, st.as_ref())?
                } else {
                    chunked(&q, &k, &v, g, self.chunk_size, st.as_ref())?
                };
                *st = Some(s);
                o
            }
            None => match mode {
                Mode::Parallel => parallel(&q, &k, &v, g)?,
                Mode::Chunked => chunked(&q, &k, &v, g, self.chunk_size, None)?.0,
                Mode::Recurrent => recurrent(&q, &k, &v, g, None)?.0,
            },
        };
        group_norm_heads(&o, GROUP_NORM_EPS)
    }

    /// One token of one sequence in the recurrent form, on plain slices: what [`Self::forward`]
    /// computes for t = 1 with a state, without the dozen small tensor operations per layer
    /// that dominate a decoding step's time otherwise.
    pub fn decode_step(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        state: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let (h, hkv, f, d) = (
            self.n_heads,
            self.n_kv_heads,
            self.feature_dim,
            self.head_dim,
        );
        let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let phi = |lin: &Linear, y: Tensor| -> Result<Vec<f32>> {
            let mut out = flat(lin.forward(&y)?)?;
            out.iter_mut().for_each(|a| *a = a.max(0.0));
            Ok(out)
        };
        let mut fq = phi(&self.phi_q, self.q.forward(x)?)?;
        let phi_k = self.phi_k.as_ref().unwrap_or(&self.phi_q);
        let mut fk = phi(phi_k, self.k.forward(x)?)?;
        let v = flat(self.v.forward(x)?)?;
        let (cos, sin) = rope.row(offset)?;
        for head in fq.chunks_mut(f).chain(fk.chunks_mut(f)) {
            Rope::rotate(head, &cos, &sin);
        }
        let mut s = match state.take() {
            Some(t) => flat(t)?,
            None => vec![0f32; h * f * d],
        };
        let scale = 1.0 / (f as f32).sqrt();
        let mut o = vec![0f32; h * d];
        for (i, (si, oi)) in s.chunks_mut(f * d).zip(o.chunks_mut(d)).enumerate() {
            // Query head i reads key/value head i / (h / hkv), as repeat_kv lays them out.
            let kv = i / (h / hkv);
            let (ki, vi) = (&fk[kv * f..(kv + 1) * f], &v[kv * d..(kv + 1) * d]);
            let g = self.gammas[i] as f32;
            for ((row, &ka), &qa) in si.chunks_mut(d).zip(ki).zip(&fq[i * f..(i + 1) * f]) {
                let ka = ka * scale;
                for ((r, &vc), oc) in row.iter_mut().zip(vi).zip(oi.iter_mut()) {
                    *r = g * *r + ka * vc;
                    *oc += qa * *r;
                }
            }
            // GroupNorm, one group per head.
            let mean = oi.iter().sum::<f32>() / d as f32;
            let var = oi.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + GROUP_NORM_EPS as f32).sqrt();
            oi.iter_mut().for_each(|a| *a = (*a - mean) * inv);
        }
        *state = Some(Tensor::from_vec(s, (1, h, f, d), x.device())?);
        self.o
            .forward(&Tensor::from_vec(o, (1, 1, h * d), x.device())?)
    }

    /// The teacher's softmax attention on the same q, k, v and o projections.
    pub fn teacher(&self) -> SoftmaxAttention {
        SoftmaxAttention {
            q: self.q.clone(),
            k: self.k.clone(),
            v: self.v.clone(),
            o: self.o.clone(),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The definition, literally, in f64: o_t = Σ_{i≤t} γ^(t−i) (q_t·k_i/√d') v_i.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, gammas: &[f64]) -> Vec<f64> {
        let (b, h, t, dk) = q.dims4().unwrap();
        let dv = v.dim(3).unwrap();
        let flat = |x: &Tensor| {
            x.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (q, k, v) = (flat(q), flat(k), flat(v));
        let mut out = vec![0.0; b * h * t * dv];
        for bh in 0..b * h {
            let g = gammas[bh % h];
            for ti in 0..t {
                for i in 0..=ti {
                    let dot: f64 = (0..dk)
                        .map(|c| q[(bh * t + ti) * dk + c] * k[(bh * t + i) * dk + c])
                        .sum();
                    let w = g.powi((ti - i) as i32) * dot / (dk as f64).sqrt();
                    for c in 0..dv {
                        out[(bh * t + ti) * dv + c] += w * v[(bh * t + i) * dv + c];
                    }
                }
            }
        }
        out
    }

    fn rel_err(got: &Tensor, want: &[f64]) -> f64 {
        let got: Vec<f64> = got
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// Non-negative q̃, k̃ as φ produces them (ReLU features).
    fn inputs(
        b: usize,
        h: usize,
        t: usize,
        dk: usize,
        dv: usize,
        dtype: DType,
    ) -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, h, t, dk), &dev)
            .unwrap()
            .relu()
            .unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, h, t, dk), &dev)
            .unwrap()
            .relu()
            .unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, t, dv), &dev).unwrap();
        (
            q.to_dtype(dtype).unwrap(),
            k.to_dtype(dtype).unwrap(),
            v.to_dtype(dtype).unwrap(),
        )
    }

    #[test]
    fn lightning_slopes_for_smollm2() {
        let g = Decay::Lightning.gammas(9).unwrap();
        assert!((g[0] - 0.58273).abs() < 1e-4, "{g:?}");
        assert!((g[8] - 0.99610).abs() < 1e-4, "{g:?}");
        assert!(g.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            Decay::RetNet.gammas(2).unwrap(),
            vec![1.0 - 1.0 / 32.0, 1.0 - 1.0 / 64.0]
        );
        assert!(Decay::Explicit(vec![0.5, 1.5]).gammas(2).is_err());
        assert!(Decay::Explicit(vec![0.5]).gammas(2).is_err());
    }

    #[test]
    fn three_forms_agree_with_the_definition() {
        let gammas = Decay::Lightning.gammas(9).unwrap();
        for t in [1, 7, 64, 65, 300] {
            let (q, k, v) = inputs(2, 9, t, 16, 12, DType::F32);
            let want = naive(&q, &k, &v, &gammas);
            let p = parallel(&q, &k, &v, &gammas).unwrap();
            assert!(
                rel_err(&p, &want) <= 1e-5,
                "parallel T={t}: {}",
                rel_err(&p, &want)
            );
            for c in [16, 64] {
                let (o, _) = chunked(&q, &k, &v, &gammas, c, None).unwrap();
                assert!(
                    rel_err(&o, &want) <= 1e-5,
                    "chunked T={t} C={c}: {}",
                    rel_err(&o, &want)
                );
            }
            let (o, _) = recurrent(&q, &k, &v, &gammas, None).unwrap();
            assert!(
                rel_err(&o, &want) <= 1e-5,
                "recurrent T={t}: {}",
                rel_err(&o, &want)
            );
        }
    }

    #[test]
    fn inference_form_agrees_with_the_definition() {
        let gammas = Decay::Lightning.gammas(9).unwrap();
        for t in [1, 7, 64, 65, 300] {
            let (q, k, v) = inputs(2, 9, t, 16, 12, DType::F32);
            let want = naive(&q, &k, &v, &gammas);
            for c in [16, 64] {
                let (o, _) = chunked_inference(&q, &k, &v, &gammas, c, None).unwrap();
                let err = rel_err(&o, &want);
                assert!(err <= 1e-5, "T={t} C={c}: {err}");
            }
        }
    }

    #[test]
    fn inference_form_reads_shared_kv_heads_and_continues_a_state() {
        // 6 query heads over 2 key/value heads, from a state left by an earlier prefix.
        let gammas = Decay::Lightning.gammas(6).unwrap();
        let (q, _, _) = inputs(2, 6, 50, 16, 12, DType::F32);
        let (_, k, v) = inputs(2, 2, 50, 16, 12, DType::F32);
        let (q0, k0, v0) = inputs(2, 6, 20, 16, 12, DType::F32);
        let (_, s0) = chunked(&q0, &k0, &v0, &gammas, 8, None).unwrap();
        let (k3, v3) = (repeat_kv(&k, 3).unwrap(), repeat_kv(&v, 3).unwrap());
        let (want_o, want_s) = chunked(&q, &k3, &v3, &gammas, 16, Some(&s0)).unwrap();
        let (o, s) = chunked_inference(&q, &k, &v, &gammas, 16, Some(&s0)).unwrap();
        let flat = |x: &Tensor| -> Vec<f64> {
            x.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert!(rel_err(&o, &flat(&want_o)) <= 1e-5, "output");
        assert!(rel_err(&s, &flat(&want_s)) <= 1e-5, "state");
        assert!(chunked_inference(&q, &k, &v, &gammas[..5], 16, None).is_err());
    }

    #[test]
    fn no_decay_is_plain_causal_linear_attention() {
        let gammas = Decay::None.gammas(3).unwrap();
        let (q, k, v) = inputs(1, 3, 50, 8, 8, DType::F32);
        let want = naive(&q, &k, &v, &gammas);
        let (o, _) = chunked(&q, &k, &v, &gammas, 16, None).unwrap();
        assert!(rel_err(&o, &want) <= 1e-5);
    }

    /// Prefill by chunks, continue one token at a time: the same as one parallel pass.
    #[test]
    fn chunked_prefill_then_recurrent_continues_the_state() {
        let gammas = Decay::Lightning.gammas(4).unwrap();
        let (q, k, v) = inputs(1, 4, 100, 8, 8, DType::F32);
        let want = naive(&q, &k, &v, &gammas);
        let split = 70;
        let part = |x: &Tensor, a: usize, n: usize| x.narrow(2, a, n).unwrap();
        let (o1, s) = chunked(
            &part(&q, 0, split),
            &part(&k, 0, split),
            &part(&v, 0, split),
            &gammas,
            16,
            None,
        )
        .unwrap();
        let mut outs = vec![o1];
        let mut s = s;
        for i in split..100 {
            let (o, s2) = recurrent(
                &part(&q, i, 1),
                &part(&k, i, 1),
                &part(&v, i, 1),
                &gammas,
                Some(&s),
            )
            .unwrap();
            outs.push(o);
            s = s2;
        }
        let all = Tensor::cat(&outs, 2).unwrap();
        assert!(rel_err(&all, &want) <= 1e-5);
        // The chunked form's final state equals the recurrent one's.
        let (_, s_rec) = recurrent(&q, &k, &v, &gammas, None).unwrap();
        let want_s: Vec<f64> = s_rec
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(rel_err(&s, &want_s) <= 1e-5);
    }

    /// Central differences in f64 against candle's backward through the chunked form.
    fn check_grad(var: &Var, loss: impl Fn() -> Tensor, name: &str) {
        let grads = loss().backward().unwrap();
        let analytic: Vec<f64> = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.as_tensor().shape().clone();
        let eps = 1e-6;
        let mut max_err: f64 = 0.0;
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut x = base.clone();
                x[i] += delta;
                var.set(&Tensor::from_vec(x, shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let scale = numeric.abs().max(analytic[i].abs()).max(1e-3);
            max_err = max_err.max((numeric - analytic[i]).abs() / scale);
        }
        var.set(&Tensor::from_vec(base, shape, &Device::Cpu).unwrap())
            .unwrap();
        assert!(max_err < 1e-5, "{name}: relative gradient error {max_err}");
    }

    #[test]
    fn chunked_form_gradients_match_finite_differences() {
        let gammas = Decay::Lightning.gammas(2).unwrap();
        let (q, k, v) = inputs(1, 2, 11, 4, 3, DType::F64);
        let (q, k, v) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let r = Tensor::randn(0f64, 1.0, (1, 2, 11, 3), &Device::Cpu).unwrap();
        let loss = || {
            let (o, _) = chunked(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &gammas,
                4,
                None,
            )
            .unwrap();
            (o * &r).unwrap().sum_all().unwrap()
        };
        check_grad(&q, loss, "q");
        check_grad(&k, loss, "k");
        check_grad(&v, loss, "v");
    }

    /// The whole layer in f64: φ's weight and bias (queries' and keys' own, under GQA) get
    /// the gradients finite differences measure, through RoPE, the decay and GroupNorm.
    #[test]
    fn layer_gradients_match_finite_differences_for_phi() {
        let dev = Device::Cpu;
        let (h, hkv, d, f, hidden, t) = (4, 2, 4, 6, 8, 9);
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f64, 0.5, shape, &dev).unwrap()).unwrap()
        };
        let lin = |w: &Var, b: Option<&Var>| {
            Linear::new(w.as_tensor().clone(), b.map(|b| b.as_tensor().clone()))
        };
        let (wq, wk, wv, wo) = (
            var(&[h * d, hidden]),
            var(&[hkv * d, hidden]),
            var(&[hkv * d, hidden]),
            var(&[hidden, h * d]),
        );
        let (pq_w, pq_b) = (var(&[h * f, h * d]), var(&[h * f]));
        let (pk_w, pk_b) = (var(&[hkv * f, hkv * d]), var(&[hkv * f]));
        let layer = || SupraAttention {
            q: lin(&wq, None),
            k: lin(&wk, None),
            v: lin(&wv, None),
            o: lin(&wo, None),
            phi_q: lin(&pq_w, Some(&pq_b)),
            phi_k: Some(lin(&pk_w, Some(&pk_b))),
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
            feature_dim: f,
            gammas: Decay::Lightning.gammas(h).unwrap(),
            chunk_size: 4,
        };
        let rope = Rope::new(f, 10_000.0, 32, &dev).unwrap();
        let x = Tensor::randn(0f64, 1.0, (1, t, hidden), &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (1, t, hidden), &dev).unwrap();
        let loss = || {
            let y = layer().forward(&x, &rope, 0, Mode::Chunked, None).unwrap();
            (y * &r).unwrap().sum_all().unwrap()
        };
        check_grad(&pq_w, loss, "phi_q.weight");
        check_grad(&pq_b, loss, "phi_q.bias");
        check_grad(&pk_w, loss, "phi_k.weight");
        check_grad(&pk_b, loss, "phi_k.bias");
    }
    fn random_layer(h: usize, hkv: usize, d: usize, f: usize, hidden: usize) -> SupraAttention {
        let dev = Device::Cpu;
        let w = |r: usize, c: usize| {
            Tensor::randn(0f32, (1.0 / c as f64).sqrt() as f32, (r, c), &dev).unwrap()
        };
        let b = |r: usize| Tensor::randn(0f32, 0.1, r, &dev).unwrap();
        SupraAttention {
            q: Linear::new(w(h * d, hidden), None),
            k: Linear::new(w(hkv * d, hidden), None),
            v: Linear::new(w(hkv * d, hidden), None),
            o: Linear::new(w(hidden, h * d), None),
            phi_q: Linear::new(w(h * f, h * d), Some(b(h * f))),
            phi_k: (hkv != h).then(|| Linear::new(w(hkv * f, hkv * d), Some(b(hkv * f)))),
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
            feature_dim: f,
            gammas: Decay::Lightning.gammas(h).unwrap(),
            chunk_size: 16,
        }
    }

    /// The layer (φ, GQA, RoPE, GroupNorm) in all three modes, with GQA as in SmolLM2 and
    /// without, for every length and chunk size; and a chunked prefill continued recurrently at
    /// the right RoPE positions.
    #[test]
    fn layer_modes_agree_with_and_without_gqa() {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 10_000.0, 512, &dev).unwrap();
        for (h, hkv) in [(9, 3), (4, 4)] {
            let mut layer = random_layer(h, hkv, 8, 8, 32);
            for t in [1, 7, 64, 65, 300] {
                let x = Tensor::randn(0f32, 1.0, (2, t, 32), &dev).unwrap();
                let want: Vec<f64> = layer
                    .forward(&x, &rope, 0, Mode::Parallel, None)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let rec = layer.forward(&x, &rope, 0, Mode::Recurrent, None).unwrap();
                assert!(
                    rel_err(&rec, &want) <= 1e-5,
                    "H={h} H_kv={hkv} T={t} recurrent"
                );
                for c in [16, 64] {
                    layer.chunk_size = c;
                    let ch = layer.forward(&x, &rope, 0, Mode::Chunked, None).unwrap();
                    assert!(
                        rel_err(&ch, &want) <= 1e-5,
                        "H={h} H_kv={hkv} T={t} C={c} chunked"
                    );
                }
                if t < 8 {
                    continue;
                }
                let split = t * 2 / 3;
                let mut state = None;
                let mut outs = vec![layer
                    .forward(
                        &x.narrow(1, 0, split).unwrap(),
                        &rope,
                        0,
                        Mode::Chunked,
                        Some(&mut state),
                    )
                    .unwrap()];
                for i in split..t {
                    let xi = x.narrow(1, i, 1).unwrap();
                    outs.push(
                        layer
                            .forward(&xi, &rope, i, Mode::Chunked, Some(&mut state))
                            .unwrap(),
                    );
                }
                let cont = Tensor::cat(&outs, 1).unwrap();
                assert!(
                    rel_err(&cont, &want) <= 1e-5,
                    "H={h} H_kv={hkv} T={t} prefill + recurrent"
                );
                assert_eq!(state.unwrap().dims(), &[2, h, 8, 8]);
            }
        }
    }
}
