//! SUPRA linear attention (Mercat et al. 2024, DESIGN.md §1.2).
//!
//! Per layer: q, k, v from the pretrained projections; a learned feature map
//! φ(x) = ReLU(W x + b) over all heads at once (keys through their own φ under GQA); RoPE after
//! φ; a fixed decay γ_h per head; no denominator; GroupNorm per head; then the pretrained Wo:
//!
//! ```text
//! o_t = Σ_{i≤t} γ^(t−i) (q̃_t · k̃_i / √d') v_i          q̃ = RoPE(φ(q)), k̃ = RoPE(φ(k))
//! S_t = γ S_{t−1} + k̃_tᵀ v_t / √d',  o_t = q̃_t S_t       (the same sum as a recurrence)
//! ```
//!
//! Its forms, side by side:
//! - [`naive`]: the definition in f64, the reference tests compare against;
//! - [`chunk`]: the training form, differentiable (with one chunk, the parallel form);
//! - [`fused`]: the same form as one op on slices with its own backward, rounding as the
//!   composed form does; training runs it ([`training_sums`], the window hybrids' linear
//!   branch too) when the decays are fixed and no state comes in or goes out;
//! - [`scan`]: prefill and the single-token step on plain slices, with the one state update of
//!   the inference side;
//! - [`group_norm`]: the one GroupNorm, for both.
//!
//! The state has shape (B, H, d', d_v) and already includes the 1/√d' scale.

pub mod chunk;
pub mod fused;
pub mod group_norm;
pub mod naive;
pub mod scan;

use crate::attention::feature_map::{FeatureMap, Role};
use crate::attention::softmax::SoftmaxAttention;
use crate::attention::{repeat_kv, split_heads, Exec, Projections};
use crate::model::rope::Rope;
use crate::model::spin;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};

/// A SUPRA layer's state between calls, S (B, H, d', d_v) as plain values that the inference
/// scan updates in place. (As a tensor it was copied out and back on every token: 4.4 MiB a
/// decoding step of the default model, per sequence, the largest per-sequence cost of a
/// batched step after the products.)
#[derive(Debug, Clone, PartialEq)]
pub struct RnnState {
    /// (B, H, d', d_v).
    pub dims: [usize; 4],
    pub values: Vec<f32>,
}

impl RnnState {
    fn zeros(dims: [usize; 4]) -> Self {
        Self {
            dims,
            values: vec![0f32; dims.iter().product()],
        }
    }

    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (b, h, f, d) = t.dims4()?;
        Ok(Self {
            dims: [b, h, f, d],
            values: t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        })
    }

    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.values.clone(),
            self.dims.to_vec(),
            &candle_core::Device::Cpu,
        )?)
    }

    /// `n` copies of a single-sequence state as one batch.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        ensure!(
            self.dims[0] == 1,
            "only a single-sequence state repeats (batch {})",
            self.dims[0]
        );
        let [_, h, f, d] = self.dims;
        Ok(Self {
            dims: [n, h, f, d],
            values: self.values.repeat(n),
        })
    }

    pub fn bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<f32>()
    }
}

/// Sizes of one call of the sums: B sequences, H query heads over H_kv key/value heads, T
/// tokens, feature dim d', value dim d_v.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub len: usize,
    pub feature_dim: usize,
    pub value_dim: usize,
}

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
    /// Learned per head, γ_h = sigmoid(θ_h), starting at the Lightning values and trained with
    /// φ (the parameter `self_attn.decay_logit`).
    Learnable,
}

impl Decay {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            // "fixed": the paper's fixed decays.
            "lightning" | "fixed" => Ok(Self::Lightning),
            "retnet" => Ok(Self::RetNet),
            "none" => Ok(Self::None),
            "learnable" => Ok(Self::Learnable),
            other => bail!("unknown decay '{other}' (known: lightning (= fixed), retnet, none, learnable, or a list of per-head values)"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Lightning => "lightning",
            Self::RetNet => "retnet",
            Self::None => "none",
            Self::Explicit(_) => "explicit",
            Self::Learnable => "learnable",
        }
    }

    pub fn gammas(&self, n_heads: usize) -> Result<Vec<f64>> {
        let h = n_heads as f64;
        let g: Vec<f64> = match self {
            Self::Lightning | Self::Learnable => (0..n_heads)
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

/// The decays a layer runs with: fixed values, or learned per head as γ_h = sigmoid(θ_h).
#[derive(Debug, Clone)]
pub enum HeadDecays {
    Fixed(Vec<f64>),
    /// θ (H): a parameter, differentiable in the training form.
    Learned(Tensor),
}

impl HeadDecays {
    pub fn heads(&self) -> Result<usize> {
        Ok(match self {
            Self::Fixed(g) => g.len(),
            Self::Learned(theta) => theta.dim(0)?,
        })
    }

    /// γ per head now, for the forms on slices (read from θ at each call: a training run
    /// updates θ in place between its validations).
    pub fn gammas(&self) -> Result<Vec<f64>> {
        Ok(match self {
            Self::Fixed(g) => g.clone(),
            Self::Learned(theta) => theta
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .map(|t| 1.0 / (1.0 + (-t).exp()))
                .collect(),
        })
    }
}

/// The training form's sums from a zero state, the state after them not kept: q̃ (B, H, T, d'),
/// k̃ and v at their own (B, H_kv, T, ·) heads → O (B, H, T, d_v). The fused op
/// ([`fused`]) where it applies (fixed decays, f32 or f64, more than one chunk), else the
/// composed form; with one chunk that is the parallel form (`score --mode parallel`), kept
/// composed as the reference the others are held to.
pub fn training_sums(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    decays: &HeadDecays,
    chunk: usize,
) -> Result<Tensor> {
    let (h, t) = (q.dim(1)?, q.dim(2)?);
    match decays {
        HeadDecays::Fixed(g) if chunk < t && matches!(q.dtype(), DType::F32 | DType::F64) => {
            fused::chunked(q, k, v, g, chunk)
        }
        _ => {
            let (k, v) = (repeat_kv(k, h)?, repeat_kv(v, h)?);
            Ok(chunk::chunked(q, &k, &v, decays, chunk, None)?.0)
        }
    }
}

/// θ = logit(γ): the learned decays' parameters that start at `gammas`.
pub fn decay_logits(gammas: &[f64]) -> Vec<f64> {
    gammas.iter().map(|g| (g / (1.0 - g)).ln()).collect()
}

/// A SUPRA attention layer: the teacher's projections plus φ.
#[derive(Debug, Clone)]
pub struct SupraAttention {
    pub proj: Projections,
    pub phi: FeatureMap,
    pub feature_dim: usize,
    pub gammas: HeadDecays,
    /// Tokens per chunk of the chunked forms.
    pub chunk_size: usize,
    /// RoPE over φ's d' features (relu: RoPE after φ), or over the head dim (hedgehog: φ
    /// reads the RoPE'd q and k).
    pub rope: Rope,
}

impl SupraAttention {
    /// q̃ (B, H, T, d'), and k̃ (B, H_kv, T, d') and v (B, H_kv, T, d) at the key/value heads,
    /// for `x` (B, T, hidden) at positions offset.. .
    pub fn features(
        &self,
        x: &Tensor,
        offset: usize,
        exec: Exec,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let p = &self.proj;
        let (h, hkv, d, f) = (p.n_heads, p.n_kv_heads, p.head_dim, self.feature_dim);
        let [q, k, v] = p.qkv(x, exec)?;
        let v = split_heads(&v, hkv, d)?;
        let phi = |y: &Tensor, role: Role, n: usize| -> Result<Tensor> {
            split_heads(&self.phi.apply(y, role, exec)?, n, f)
        };
        if self.phi.rope_after() {
            // RoPE acts per head, so rotating keys before any GQA repeat is the same and cheaper.
            let q = phi(&q, Role::Query, h)?;
            let k = phi(&k, Role::Key, hkv)?;
            return Ok((
                self.rope.apply(&q, offset, exec)?,
                self.rope.apply(&k, offset, exec)?,
                v,
            ));
        }
        let (b, t, _) = x.dims3()?;
        let roped = |y: &Tensor, n: usize| -> Result<Tensor> {
            let r = self.rope.apply(&split_heads(y, n, d)?, offset, exec)?;
            Ok(r.transpose(1, 2)?.reshape((b, t, n * d))?)
        };
        let q = phi(&roped(&q, h)?, Role::Query, h)?;
        let k = phi(&roped(&k, hkv)?, Role::Key, hkv)?;
        Ok((q, k, v))
    }

    /// `x` (B, T, hidden) → (B, T, hidden). With a `state`, continues from it and leaves the
    /// state after the last token there; without one, starts from zeros.
    pub fn forward(
        &self,
        x: &Tensor,
        offset: usize,
        state: Option<&mut Option<RnnState>>,
        exec: Exec,
    ) -> Result<Tensor> {
        self.proj
            .output(&self.heads_output(x, offset, state, exec)?, exec)
    }

    /// Per-head output after GroupNorm (B, H, T, d_v), before Wo.
    pub fn heads_output(
        &self,
        x: &Tensor,
        offset: usize,
        state: Option<&mut Option<RnnState>>,
        exec: Exec,
    ) -> Result<Tensor> {
        let (q, k, v) = self.features(x, offset, exec)?;
        let (b, h, t, _) = q.dims4()?;
        let d = self.proj.head_dim;
        match exec {
            Exec::Train => {
                let o = match state {
                    None => training_sums(&q, &k, &v, &self.gammas, self.chunk_size)?,
                    Some(st) => {
                        // A state carried between training calls is plain values: the
                        // gradient stops at it (truncated backpropagation).
                        let (k, v) = (repeat_kv(&k, h)?, repeat_kv(&v, h)?);
                        let s0 = st.as_ref().map(RnnState::to_tensor).transpose()?;
                        let s0 = s0.map(|t| t.to_dtype(q.dtype())).transpose()?;
                        let (o, s) =
                            chunk::chunked(&q, &k, &v, &self.gammas, self.chunk_size, s0.as_ref())?;
                        *st = Some(RnnState::from_tensor(&s)?);
                        o
                    }
                };
                group_norm::group_norm(&o)
            }
            Exec::Infer => {
                ensure!(
                    q.dtype() == DType::F32,
                    "SUPRA inference runs in f32 (got {:?})",
                    q.dtype()
                );
                let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1()?) };
                let mut scratch = None;
                let state = state.unwrap_or(&mut scratch);
                let o = self.scan(&flat(&q)?, &flat(&k)?, &flat(&v)?, (b, t), state)?;
                Ok(Tensor::from_vec(o, (b, h, t, d), x.device())?)
            }
        }
    }

    /// One token of each of several sequences from their q, k and v rows (row r: sequence r's
    /// heads side by side, at position `offsets[r]`), φ and RoPE on plain slices too: a
    /// decoding step would otherwise spend more time in a dozen small tensor operations per
    /// layer than in the products. Returns the per-head outputs (H·d_v a row) before Wo. Each
    /// row's values are what it gets alone: a sequence's step does not depend on the batch.
    pub fn step(
        &self,
        [mut q, mut k, v]: [Vec<f32>; 3],
        offsets: &[usize],
        states: &mut [&mut Option<RnnState>],
    ) -> Result<Vec<f32>> {
        let rows = offsets.len();
        if !self.phi.rope_after() {
            self.rope
                .rotate_rows([&mut q, &mut k], offsets, self.proj.head_dim)?;
        }
        let (mut q, mut k) = (
            self.phi.apply_rows(&q, rows, Role::Query)?,
            self.phi.apply_rows(&k, rows, Role::Key)?,
        );
        if self.phi.rope_after() {
            self.rope
                .rotate_rows([&mut q, &mut k], offsets, self.feature_dim)?;
        }
        let (lq, lk, lv) = (q.len() / rows, k.len() / rows, v.len() / rows);
        let outs = spin::map_rows(states, &|r, state| {
            let (qr, kr) = (&q[r * lq..(r + 1) * lq], &k[r * lk..(r + 1) * lk]);
            self.scan(qr, kr, &v[r * lv..(r + 1) * lv], (1, 1), state)
        });
        Ok(outs.into_iter().collect::<Result<Vec<_>>>()?.concat())
    }

    /// The inference side's sums over q̃ (B, H, T, d'), k̃ and v (B, H_kv, T, ·) on slices,
    /// from `state` (zeros when `None`), then GroupNorm; leaves the state after the last token
    /// in `state`. Returns the per-head outputs (B, H, T, d_v).
    fn scan(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (batch, len): (usize, usize),
        state: &mut Option<RnnState>,
    ) -> Result<Vec<f32>> {
        let (h, f, d) = (self.proj.n_heads, self.feature_dim, self.proj.head_dim);
        let st = state.get_or_insert_with(|| RnnState::zeros([batch, h, f, d]));
        ensure!(
            st.dims == [batch, h, f, d],
            "a SUPRA state of shape {:?} does not fit this layer's ({batch}, {h}, {f}, {d})",
            st.dims
        );
        let dims = Dims {
            batch,
            heads: h,
            kv_heads: self.proj.n_kv_heads,
            len,
            feature_dim: f,
            value_dim: d,
        };
        let mut o = scan::scan(
            q,
            k,
            v,
            &mut st.values,
            &self.gammas.gammas()?,
            self.chunk_size,
            dims,
        );
        group_norm::normalize_rows(&mut o, d);
        Ok(o)
    }

    /// The teacher's softmax attention on the same q, k, v and o projections.
    pub fn teacher(&self, rope: &Rope) -> SoftmaxAttention {
        SoftmaxAttention {
            proj: self.proj.clone(),
            rope: rope.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FeatureKind;
    use crate::model::linear::Linear;
    use crate::testing::{check_grad, flat_f64 as flat, rel_err};
    use candle_core::{Device, Var};

    /// Non-negative q̃ (B, H, T, d'), k̃ (B, H_kv, T, d') as φ produces them, and v.
    fn inputs(d: Dims, dtype: DType) -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let relu = |shape: (usize, usize, usize, usize)| {
            Tensor::randn(0f32, 1.0, shape, &dev)
                .unwrap()
                .relu()
                .unwrap()
        };
        let q = relu((d.batch, d.heads, d.len, d.feature_dim));
        let k = relu((d.batch, d.kv_heads, d.len, d.feature_dim));
        let v = Tensor::randn(0f32, 1.0, (d.batch, d.kv_heads, d.len, d.value_dim), &dev).unwrap();
        let to = |x: Tensor| x.to_dtype(dtype).unwrap();
        (to(q), to(k), to(v))
    }

    fn dims(batch: usize, heads: usize, kv_heads: usize, len: usize) -> Dims {
        Dims {
            batch,
            heads,
            kv_heads,
            len,
            feature_dim: 16,
            value_dim: 12,
        }
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

    /// For a power-of-two head count the decays are exp(−slope) with the ALiBi slopes that the
    /// reference code (Lightning Attention's `get_slopes_power_of_2`) computes: start = 2^(−8/n),
    /// slope_i = start^(i+1). Written from that formula, not from ours.
    #[test]
    fn lightning_decays_for_power_of_two_heads_follow_get_slopes_power_of_2() {
        for n in [1usize, 2, 4, 8, 16, 32] {
            let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
            let want: Vec<f64> = (0..n).map(|i| (-start.powi(i as i32 + 1)).exp()).collect();
            let got = Decay::Lightning.gammas(n).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "{n} heads: {got:?} vs {want:?}");
            }
        }
    }

    /// Both forms against the definition, from zero and from a state, with and without GQA,
    /// at lengths around the chunk sizes: the training form (keys and values repeated per
    /// query head; one chunk is the parallel form) and the slice form of prefill and step
    /// (shared key/value heads read in place), outputs and final states.
    #[test]
    fn forms_agree_with_the_definition() {
        let f32s = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let widen = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
        for (h, hkv) in [(9, 3), (6, 2), (4, 4)] {
            let gammas = Decay::Lightning.gammas(h).unwrap();
            for t in [1, 7, 64, 65, 300] {
                let d = dims(2, h, hkv, t);
                let (q, k, v) = inputs(d, DType::F32);
                let s0 = Tensor::randn(0f32, 1.0, (2, h, 16, 12), &Device::Cpu).unwrap();
                for start in [None, Some(&s0)] {
                    let s0_flat = start.map(flat).unwrap_or_default();
                    let (want_o, want_s) =
                        naive::naive(&flat(&q), &flat(&k), &flat(&v), &s0_flat, &gammas, d);
                    let check = |o: &[f64], s: &[f64], form: &str| {
                        let (eo, es) = (rel_err(o, &want_o), rel_err(s, &want_s));
                        assert!(
                            eo <= 1e-5 && es <= 1e-5,
                            "H={h}/{hkv} T={t} {form}: {eo} {es}"
                        );
                    };
                    let (kr, vr) = (repeat_kv(&k, h).unwrap(), repeat_kv(&v, h).unwrap());
                    for c in [16, 64, usize::MAX] {
                        let fixed = HeadDecays::Fixed(gammas.clone());
                        let (o, s) = chunk::chunked(&q, &kr, &vr, &fixed, c, start).unwrap();
                        check(&flat(&o), &flat(&s), &format!("training C={c}"));
                    }
                    for c in [1, 16, 64] {
                        let mut s = start.map_or(vec![0.0; 2 * h * 16 * 12], f32s);
                        let o = scan::scan(&f32s(&q), &f32s(&k), &f32s(&v), &mut s, &gammas, c, d);
                        check(&widen(&o), &widen(&s), &format!("slices C={c}"));
                    }
                }
            }
        }
    }

    #[test]
    fn no_decay_is_plain_causal_linear_attention() {
        // γ = 1: o_t = Σ_{i≤t} (q̃_t·k̃_i/√d') v_i, summed here without any decay at all.
        let gammas = Decay::None.gammas(1).unwrap();
        let d = dims(1, 1, 1, 20);
        let (q, k, v) = inputs(d, DType::F32);
        let (q, k, v) = (flat(&q), flat(&k), flat(&v));
        let (o, _) = naive::naive(&q, &k, &v, &[], &gammas, d);
        for t in [0, 7, 19] {
            for c in 0..12 {
                let want: f64 = (0..=t)
                    .map(|i| {
                        let dot: f64 = (0..16).map(|j| q[t * 16 + j] * k[i * 16 + j]).sum();
                        dot / 4.0 * v[i * 12 + c]
                    })
                    .sum();
                assert!((o[t * 12 + c] - want).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn chunked_form_gradients_match_finite_differences() {
        let gammas = Decay::Lightning.gammas(2).unwrap();
        let (q, k, v) = inputs(
            Dims {
                batch: 1,
                heads: 2,
                kv_heads: 2,
                len: 11,
                feature_dim: 4,
                value_dim: 3,
            },
            DType::F64,
        );
        let (q, k, v) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let r = Tensor::randn(0f64, 1.0, (1, 2, 11, 3), &Device::Cpu).unwrap();
        let loss = || {
            let (o, _) = chunk::chunked(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &HeadDecays::Fixed(gammas.clone()),
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

    fn random_layer(
        shape: (usize, usize, usize, usize, usize),
        dtype: DType,
        var: &mut dyn FnMut(Tensor) -> Tensor,
    ) -> SupraAttention {
        let (h, hkv, d, f, hidden) = shape;
        let dev = Device::Cpu;
        let mut w = |r: usize, c: usize| {
            let t = Tensor::randn(0f32, (1.0 / c as f64).sqrt() as f32, (r, c), &dev).unwrap();
            var(t.to_dtype(dtype).unwrap())
        };
        let (q, k, v, o) = (
            w(h * d, hidden),
            w(hkv * d, hidden),
            w(hkv * d, hidden),
            w(hidden, h * d),
        );
        let (pq, pk) = (w(h * f, h * d), w(hkv * f, hkv * d));
        let mut b = |r: usize| {
            var(Tensor::randn(0f32, 0.1, r, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap())
        };
        let (bq, bk) = (b(h * f), b(hkv * f));
        SupraAttention {
            proj: Projections {
                q: Linear::new(q, None),
                k: Linear::new(k, None),
                v: Linear::new(v, None),
                o: Linear::new(o, None),
                n_heads: h,
                n_kv_heads: hkv,
                head_dim: d,
            },
            phi: FeatureMap::Relu {
                q: Linear::new(pq, Some(bq)),
                k: (hkv != h).then(|| Linear::new(pk, Some(bk))),
            },
            feature_dim: f,
            gammas: HeadDecays::Fixed(Decay::Lightning.gammas(h).unwrap()),
            chunk_size: 4,
            rope: Rope::new(f, 10_000.0, 512, &dev).unwrap(),
        }
    }

    /// The whole layer in f64: φ's weight and bias (queries' and keys' own, under GQA) get
    /// the gradients finite differences measure, through RoPE, the decay and GroupNorm.
    #[test]
    fn layer_gradients_match_finite_differences_for_phi() {
        let dev = Device::Cpu;
        let mut vars = Vec::new();
        let layer = random_layer((4, 2, 4, 6, 8), DType::F64, &mut |t| {
            let v = Var::from_tensor(&t).unwrap();
            vars.push(v.clone());
            v.as_tensor().clone()
        });
        // q, k, v, o, φ_q, φ_k weights, then φ_q, φ_k biases.
        let x = Tensor::randn(0f64, 1.0, (1, 9, 8), &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (1, 9, 8), &dev).unwrap();
        let loss = || {
            let y = layer.forward(&x, 0, None, Exec::Train).unwrap();
            (y * &r).unwrap().sum_all().unwrap()
        };
        check_grad(&vars[4], loss, "phi_q.weight");
        check_grad(&vars[6], loss, "phi_q.bias");
        check_grad(&vars[5], loss, "phi_k.weight");
        check_grad(&vars[7], loss, "phi_k.bias");
    }

    /// The layer (φ, GQA, RoPE, GroupNorm) in its training form (one chunk: the parallel form;
    /// and chunks of 16) and its inference form, with GQA as in SmolLM2 and without; and an
    /// inference prefill continued one step at a time at the right RoPE positions.
    /// The training form in chunks of 16 and 64 and inference prefill against the training
    /// form in one chunk, on `x`; returns that one-chunk output.
    fn chunked_forms_agree(layer: &mut SupraAttention, x: &Tensor, label: &str) -> Vec<f64> {
        layer.chunk_size = usize::MAX;
        let want = flat(&layer.forward(x, 0, None, Exec::Train).unwrap());
        for c in [16, 64] {
            layer.chunk_size = c;
            for exec in [Exec::Train, Exec::Infer] {
                let e = rel_err(&flat(&layer.forward(x, 0, None, exec).unwrap()), &want);
                assert!(e <= 1e-5, "{label} C={c} {exec:?}: {e}");
            }
        }
        want
    }

    #[test]
    fn layer_forms_agree_with_and_without_gqa() {
        let dev = Device::Cpu;
        for (h, hkv) in [(9, 3), (4, 4)] {
            let mut layer = random_layer((h, hkv, 8, 8, 32), DType::F32, &mut |t| t);
            for t in [1, 7, 64, 65, 300] {
                let x = Tensor::randn(0f32, 1.0, (2, t, 32), &dev).unwrap();
                let want = chunked_forms_agree(&mut layer, &x, &format!("H={h}/{hkv} T={t}"));
                if t < 8 {
                    continue;
                }
                // One sequence: the step form serves single tokens of a single sequence.
                let x0 = x.narrow(0, 0, 1).unwrap();
                let want0 = &want[..want.len() / 2];
                let (cont, state) = prefill_then_steps(&layer, &x0, t * 2 / 3);
                let e = rel_err(&cont, want0);
                assert!(e <= 1e-5, "H={h}/{hkv} T={t} prefill + steps: {e}");
                assert_eq!(state.unwrap().dims, [1, h, 8, 8]);
            }
        }
    }

    /// One sequence `x0` (1, T, hidden) read as a prefill of `split` tokens, then one token at a
    /// time at the right positions (the step form); the outputs, and the state at the end.
    fn prefill_then_steps(
        layer: &SupraAttention,
        x0: &Tensor,
        split: usize,
    ) -> (Vec<f64>, Option<RnnState>) {
        let t = x0.dim(1).unwrap();
        let mut state = None;
        let prefix = x0.narrow(1, 0, split).unwrap();
        let mut outs = vec![layer
            .forward(&prefix, 0, Some(&mut state), Exec::Infer)
            .unwrap()];
        for i in split..t {
            let xi = x0.narrow(1, i, 1).unwrap();
            outs.push(
                layer
                    .forward(&xi, i, Some(&mut state), Exec::Infer)
                    .unwrap(),
            );
        }
        (flat(&Tensor::cat(&outs, 1).unwrap()), state)
    }

    /// `layer` with per-head maps of `kind` (matrices from `w`: hedgehog's d × d, taylor's
    /// d × 3) in place of its relu φ, RoPE before φ.
    fn with_per_head(
        mut layer: SupraAttention,
        kind: FeatureKind,
        w: &mut dyn FnMut(&[usize]) -> Tensor,
    ) -> SupraAttention {
        let p = &layer.proj;
        let (h, hkv, d) = (p.n_heads, p.n_kv_heads, p.head_dim);
        (layer.phi, layer.feature_dim) = match kind {
            FeatureKind::Hedgehog => (
                FeatureMap::Hedgehog {
                    q: w(&[h, d, d]),
                    k: w(&[hkv, d, d]),
                },
                2 * d,
            ),
            FeatureKind::Taylor => (
                FeatureMap::Taylor {
                    q: w(&[h, d, 3]),
                    k: w(&[hkv, d, 3]),
                },
                crate::attention::feature_map::taylor_features(3),
            ),
            FeatureKind::Relu => unreachable!("relu is random_layer's own map"),
        };
        layer.rope = Rope::new(d, 10_000.0, 512, &Device::Cpu).unwrap();
        layer
    }

    /// A SUPRA layer with each per-head φ (hedgehog, taylor): its training form in one chunk
    /// and in chunks, prefill, and prefill continued token by token agree; φ's matrices get
    /// finite differences' gradients.
    #[test]
    fn per_head_layer_forms_agree_and_their_gradients_are_right() {
        let dev = Device::Cpu;
        for kind in [FeatureKind::Hedgehog, FeatureKind::Taylor] {
            let mut randn = |s: &[usize]| Tensor::randn(0f32, 0.5, s, &dev).unwrap();
            let mut layer = with_per_head(
                random_layer((9, 3, 8, 8, 32), DType::F32, &mut |t| t),
                kind,
                &mut randn,
            );
            let t = 70;
            let x = Tensor::randn(0f32, 1.0, (2, t, 32), &dev).unwrap();
            let want = chunked_forms_agree(&mut layer, &x, &format!("{kind:?}"));
            let (cont, _) = prefill_then_steps(&layer, &x.narrow(0, 0, 1).unwrap(), 40);
            let e = rel_err(&cont, &want[..want.len() / 2]);
            assert!(e <= 1e-5, "{kind:?} prefill + steps: {e}");

            let mut vars = Vec::new();
            let mut var = |s: &[usize]| {
                let v = Var::from_tensor(&Tensor::randn(0f64, 0.5, s, &dev).unwrap()).unwrap();
                vars.push(v.clone());
                v.as_tensor().clone()
            };
            let layer = with_per_head(
                random_layer((4, 2, 4, 6, 8), DType::F64, &mut |t| t),
                kind,
                &mut var,
            );
            let x = Tensor::randn(0f64, 1.0, (1, 9, 8), &dev).unwrap();
            let r = Tensor::randn(0f64, 1.0, (1, 9, 8), &dev).unwrap();
            let loss = || {
                let y = layer.forward(&x, 0, None, Exec::Train).unwrap();
                (y * &r).unwrap().sum_all().unwrap()
            };
            check_grad(&vars[0], loss, &format!("{kind:?} q"));
            check_grad(&vars[1], loss, &format!("{kind:?} k"));
        }
    }

    /// Learned decays: θ = logit(γ) runs exactly as the fixed γ in every form, and θ gets the
    /// gradient finite differences measure.
    #[test]
    fn learned_decays_equal_fixed_ones_and_get_gradients() {
        let gammas = Decay::Lightning.gammas(3).unwrap();
        let theta = Tensor::new(decay_logits(&gammas), &Device::Cpu).unwrap();
        let learned = HeadDecays::Learned(theta.clone());
        for (a, b) in learned.gammas().unwrap().iter().zip(&gammas) {
            assert!((a - b).abs() < 1e-12);
        }
        let d = Dims {
            batch: 1,
            heads: 3,
            kv_heads: 3,
            len: 13,
            feature_dim: 4,
            value_dim: 3,
        };
        let (q, k, v) = inputs(d, DType::F64);
        for c in [4, usize::MAX] {
            let (fixed, s1) =
                chunk::chunked(&q, &k, &v, &HeadDecays::Fixed(gammas.clone()), c, None).unwrap();
            let (ours, s2) = chunk::chunked(&q, &k, &v, &learned, c, None).unwrap();
            assert!(rel_err(&flat(&ours), &flat(&fixed)) < 1e-12);
            assert!(rel_err(&flat(&s2), &flat(&s1)) < 1e-12);
        }
        let theta = Var::from_tensor(&theta).unwrap();
        let r = Tensor::randn(0f64, 1.0, (1, 3, 13, 3), &Device::Cpu).unwrap();
        let loss = || {
            let decays = HeadDecays::Learned(theta.as_tensor().clone());
            let (o, s) = chunk::chunked(&q, &k, &v, &decays, 4, None).unwrap();
            ((o * &r).unwrap().sum_all().unwrap() + s.sum_all().unwrap()).unwrap()
        };
        check_grad(&theta, loss, "decay θ");
    }
}
