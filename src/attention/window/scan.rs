//! Inference on plain slices: prefill and the single-token step (a step is a prefill of one
//! token). The exact part walks the queries in blocks, all query heads of a key/value head
//! together, over the few keys their windows and the sinks reach (two small products per
//! block, as the softmax cell's blockwise kernel); the linear part is SUPRA's slice scan over
//! the keys leaving the window, so the state update is SUPRA's own, with z carried as one
//! more value column of ones.

use super::{Span, EPS};
use crate::attention::delta::{make_unit, scan::scan as delta_scan};
use crate::attention::softmax::exp_shifted;
use crate::attention::supra::{group_norm::normalize_rows, scan::scan as linear_scan, Dims};
use crate::config::{LinearRule, Mix};
use crate::model::gemm::{gemm, Strided};
use rayon::prelude::*;

/// Query positions per block of the exact part (times the query heads of a group).
const BLOCK_QUERIES: usize = 32;

/// What a window layer keeps between calls, for B sequences. Its size depends on w, s and the
/// model, never on the context: the keys, values and key features of the sinks and of a ring
/// of w slots (position m ≥ s lives in slot s + m mod w), and S with z.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowState {
    pub batch: usize,
    pub dims: StateDims,
    /// Tokens read so far.
    pub len: usize,
    /// (B, H_kv, s + w, d) keys and values, (B, H_kv, s + w, d') key features, by slot.
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    pub features: Vec<f32>,
    /// S and z side by side, (B, H, d', d + 1): z is the last column; the delta rule's S alone
    /// (B, H, d', d) ([`StateDims::linear_width`]).
    pub linear: Vec<f32>,
}

/// The shapes a window state is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub feature_dim: usize,
    pub span: Span,
    pub rule: LinearRule,
}

impl StateDims {
    /// Columns of S per feature: d and z for the additive rule, d for the delta rule (its
    /// output has no normaliser).
    pub fn linear_width(&self) -> usize {
        match self.rule {
            LinearRule::Add => self.head_dim + 1,
            LinearRule::Delta => self.head_dim,
        }
    }

    fn slots(&self) -> usize {
        self.span.sinks + self.span.window
    }

    /// The slot of a kept position.
    fn slot(&self, m: usize) -> usize {
        if m < self.span.sinks {
            m
        } else {
            self.span.sinks + m % self.span.window
        }
    }
}

impl WindowState {
    /// The state before the first token.
    pub fn empty(batch: usize, dims: StateDims) -> Self {
        let (slots, kv) = (dims.slots(), batch * dims.kv_heads);
        Self {
            batch,
            dims,
            len: 0,
            keys: vec![0.0; kv * slots * dims.head_dim],
            values: vec![0.0; kv * slots * dims.head_dim],
            features: vec![0.0; kv * slots * dims.feature_dim],
            linear: vec![0.0; batch * dims.heads * dims.feature_dim * dims.linear_width()],
        }
    }

    pub fn bytes(&self) -> usize {
        4 * (self.keys.len() + self.values.len() + self.features.len() + self.linear.len())
    }

    /// The kept tokens' keys, values and features (B, H_kv, kept, ·) in position order
    /// ([`Span::kept`]): the layout states are saved in.
    pub fn kept_rows(&self) -> [Vec<f32>; 3] {
        let kept = self.dims.span.kept(self.len);
        let (d, f) = (self.dims.head_dim, self.dims.feature_dim);
        let gather = |all: &[f32], c: usize| -> Vec<f32> {
            let slots = self.dims.slots();
            let mut out = Vec::with_capacity(self.batch * self.dims.kv_heads * kept.len() * c);
            for bk in 0..self.batch * self.dims.kv_heads {
                for &m in &kept {
                    out.extend_from_slice(&all[(bk * slots + self.dims.slot(m)) * c..][..c]);
                }
            }
            out
        };
        [
            gather(&self.keys, d),
            gather(&self.values, d),
            gather(&self.features, f),
        ]
    }

    /// The inverse of [`Self::kept_rows`]: a single-sequence state after `len` tokens.
    pub fn from_kept_rows(
        dims: StateDims,
        len: usize,
        [keys, values, features]: [&[f32]; 3],
        linear: Vec<f32>,
    ) -> Self {
        let mut s = Self::empty(1, dims);
        let kept = dims.span.kept(len);
        let slots = dims.slots();
        let scatter = |all: &mut [f32], rows: &[f32], c: usize| {
            for bk in 0..dims.kv_heads {
                for (i, &m) in kept.iter().enumerate() {
                    all[(bk * slots + dims.slot(m)) * c..][..c]
                        .copy_from_slice(&rows[(bk * kept.len() + i) * c..][..c]);
                }
            }
        };
        scatter(&mut s.keys, keys, dims.head_dim);
        scatter(&mut s.values, values, dims.head_dim);
        scatter(&mut s.features, features, dims.feature_dim);
        s.linear = linear;
        s.len = len;
        s
    }
}

/// One call's inputs, row-major: q (B, H, T, d), k, v (B, H_kv, T, d) RoPE'd; φq (B, H, T, d'),
/// φk (B, H_kv, T, d').
pub struct Inputs<'a> {
    pub q: &'a [f32],
    /// q̃, the queries the sinks' logits read ([`naive::Inputs`](super::naive::Inputs));
    /// `None`: q itself (absolute sink positions, or no query past s + w − 1).
    pub qs: Option<&'a [f32]>,
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub fq: &'a [f32],
    pub fk: &'a [f32],
    /// The delta rule's parameters (H, d' + 1); `None`: the additive rule.
    pub delta: Option<&'a [f32]>,
}

/// Rows of position m, from the state (m before this call) or from this call's inputs.
struct Rows<'a> {
    state: &'a [f32],
    new: &'a [f32],
    width: usize,
    dims: StateDims,
    /// Position of the first new row; new rows per sequence and kv head.
    first: usize,
    len: usize,
}

impl Rows<'_> {
    fn get(&self, bk: usize, m: usize) -> &[f32] {
        let c = self.width;
        if m >= self.first {
            &self.new[(bk * self.len + m - self.first) * c..][..c]
        } else {
            &self.state[(bk * self.dims.slots() + self.dims.slot(m)) * c..][..c]
        }
    }
}

/// Reads T new tokens (`d.len`) after `state.len`, leaves the state after the last, returns
/// y (B, H, T, d). `weights` are the per-head mix (α or g); all zero skips the linear part.
pub fn prefill(
    x: &Inputs,
    state: &mut WindowState,
    gammas: &[f64],
    weights: &[f32],
    mix: Mix,
    chunk: usize,
    d: Dims,
) -> Vec<f32> {
    let (t, f, dv) = (d.len, d.feature_dim, d.value_dim);
    let (nb, nh, nkv) = (d.batch, d.heads, d.kv_heads);
    let sd = state.dims;
    let span = sd.span;
    assert!(
        state.batch == nb
            && (sd.heads, sd.kv_heads, sd.head_dim, sd.feature_dim) == (nh, nkv, dv, f)
            && x.q.len() == nb * nh * t * dv
            && x.qs.is_none_or(|qs| qs.len() == x.q.len())
            && x.k.len() == nb * nkv * t * dv
            && x.v.len() == nb * nkv * t * dv
            && x.fq.len() == nb * nh * t * f
            && x.fk.len() == nb * nkv * t * f
            && (x.delta.is_some() == (sd.rule == LinearRule::Delta))
            && mix.refuses(sd.rule).is_none(),
        "window prefill: operands do not match {d:?}"
    );
    let p = state.len;
    let rows = |from, new, width| Rows {
        state: from,
        new,
        width,
        dims: sd,
        first: p,
        len: t,
    };
    let (keys, values, features) = (
        rows(&state.keys[..], x.k, dv),
        rows(&state.values[..], x.v, dv),
        rows(&state.features[..], x.fk, f),
    );

    // The linear part: token p + i reads the keys up to p + i − w, so the state takes in the
    // key at p + i − w (if it is past the sinks) just before it.
    let mut lin = Vec::new();
    // The additive rule carries z as one more value column of ones.
    let lw = sd.linear_width();
    if weights.iter().any(|&w| w != 0.0) {
        let mut ks = vec![0f32; nb * nkv * t * f];
        let mut vs = vec![0f32; nb * nkv * t * lw];
        for i in 0..t {
            let Some(m) = (p + i)
                .checked_sub(span.window)
                .filter(|&m| m >= span.sinks)
            else {
                continue;
            };
            for bk in 0..nb * nkv {
                ks[(bk * t + i) * f..][..f].copy_from_slice(features.get(bk, m));
                let row = &mut vs[(bk * t + i) * lw..][..lw];
                row[..dv].copy_from_slice(values.get(bk, m));
                if lw > dv {
                    row[dv] = 1.0;
                }
            }
        }
        let dims = Dims { value_dim: lw, ..d };
        lin = match x.delta {
            Some(params) => {
                // The value mix asks with unit queries: a key matched exactly answers its value.
                let mut unit;
                let fq = match mix {
                    Mix::Value => {
                        unit = x.fq.to_vec();
                        make_unit(&mut unit, f);
                        &unit[..]
                    }
                    _ => x.fq,
                };
                delta_scan(fq, &ks, &vs, params, &mut state.linear, gammas, dims)
            }
            None => linear_scan(x.fq, &ks, &vs, &mut state.linear, gammas, chunk, dims),
        };
    }

    // The exact part and the combination, per (sequence, kv head, block of queries).
    let group = nh / nkv;
    let blocks = t.div_ceil(BLOCK_QUERIES);
    let items: Vec<(usize, usize, usize)> = (0..nb)
        .flat_map(|b| (0..nkv).flat_map(move |g| (0..blocks).map(move |blk| (b, g, blk))))
        .collect();
    let block = |&(b, g, blk): &(usize, usize, usize)| -> Vec<f32> {
        let bk = b * nkv + g;
        let (i0, i1) = (blk * BLOCK_QUERIES, ((blk + 1) * BLOCK_QUERIES).min(t));
        let (n0, n1) = (p + i0, p + i1);
        // The keys any of these queries reaches exactly: sinks, then n0 − w + 1 .. n1.
        let lo = (n0 + 1).saturating_sub(span.window).min(n1);
        let positions: Vec<usize> = (0..span.sinks.min(lo)).chain(lo..n1).collect();
        let nk = positions.len();
        let tq = i1 - i0;
        let nrows = group * tq;
        let mut a_out = vec![0f32; nrows * dv];
        let mut sums = vec![0f32; nrows];
        if nk > 0 {
            let mut kbuf = Vec::with_capacity(nk * dv);
            let mut vbuf = Vec::with_capacity(nk * dv);
            for &m in &positions {
                kbuf.extend_from_slice(keys.get(bk, m));
                vbuf.extend_from_slice(values.get(bk, m));
            }
            let scale = 1.0 / (dv as f32).sqrt();
            let mut qbuf = Vec::with_capacity(nrows * dv);
            for h in g * group..(g + 1) * group {
                let bh = b * nh + h;
                qbuf.extend_from_slice(&x.q[(bh * t + i0) * dv..(bh * t + i1) * dv]);
            }
            let mut scores = vec![0f32; nrows * nk];
            let (qm, km) = (
                Strided::rows(&qbuf, dv),
                Strided::transposed_rows(&kbuf, dv),
            );
            gemm(&mut scores, (nrows, nk, dv), qm, km, None, scale);
            // The sinks' logits from q̃ (the sinks lead `positions`).
            let nsk = positions.iter().take_while(|&&m| m < span.sinks).count();
            if let (Some(qs), true) = (x.qs, nsk > 0) {
                let mut qsbuf = Vec::with_capacity(nrows * dv);
                for h in g * group..(g + 1) * group {
                    let bh = b * nh + h;
                    qsbuf.extend_from_slice(&qs[(bh * t + i0) * dv..(bh * t + i1) * dv]);
                }
                let mut sink_scores = vec![0f32; nrows * nsk];
                gemm(
                    &mut sink_scores,
                    (nrows, nsk, dv),
                    Strided::rows(&qsbuf, dv),
                    Strided::transposed_rows(&kbuf[..nsk * dv], dv),
                    None,
                    scale,
                );
                for (row, s) in scores
                    .chunks_exact_mut(nk)
                    .zip(sink_scores.chunks_exact(nsk))
                {
                    row[..nsk].copy_from_slice(s);
                }
            }
            for (r, row) in scores.chunks_exact_mut(nk).enumerate() {
                let n = n0 + r % tq;
                for (s, &m) in row.iter_mut().zip(&positions) {
                    if !span.exact(n, m) {
                        *s = f32::NEG_INFINITY;
                    }
                }
                let c = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if c == f32::NEG_INFINITY {
                    // No key reachable exactly (a span without window or sinks).
                    row.fill(0.0);
                } else {
                    sums[r] = exp_shifted(row, c);
                }
            }
            let vm = Strided::rows(&vbuf, dv);
            gemm(
                &mut a_out,
                (nrows, dv, nk),
                Strided::rows(&scores, nk),
                vm,
                None,
                1.0,
            );
        }
        // Combine: rows are head-major within the group.
        for (r, y) in a_out.chunks_exact_mut(dv).enumerate() {
            let h = g * group + r / tq;
            let i = i0 + r % tq;
            let (w, a) = (weights[h], sums[r]);
            let lin_row = (!lin.is_empty()).then(|| &lin[((b * nh + h) * t + i) * lw..][..lw]);
            match (mix, lin_row) {
                (Mix::Shared, None) => {
                    let den = a + EPS as f32;
                    y.iter_mut().for_each(|y| *y /= den);
                }
                (Mix::Gated | Mix::Value, None) => {
                    let den = a + 1e-30;
                    y.iter_mut().for_each(|y| *y = (1.0 - w) * *y / den);
                }
                (Mix::Shared, Some(l)) => {
                    let den = a + w * l[dv] + EPS as f32;
                    y.iter_mut()
                        .zip(&l[..dv])
                        .for_each(|(y, q)| *y = (*y + w * q) / den);
                }
                (Mix::Gated | Mix::Value, Some(l)) => {
                    let mut norm = l[..dv].to_vec();
                    if mix == Mix::Gated {
                        normalize_rows(&mut norm, dv);
                    }
                    let den = a + 1e-30;
                    y.iter_mut()
                        .zip(&norm)
                        .for_each(|(y, q)| *y = (1.0 - w) * *y / den + w * q);
                }
            }
        }
        a_out
    };
    let outputs: Vec<Vec<f32>> = if items.len() > 1 {
        items.par_iter().map(block).collect()
    } else {
        items.iter().map(block).collect()
    };
    let mut out = vec![0f32; nb * nh * t * dv];
    for (&(b, g, blk), o) in items.iter().zip(&outputs) {
        let i0 = blk * BLOCK_QUERIES;
        let tq = o.len() / (group * dv);
        for (hi, rows) in o.chunks_exact(tq * dv).enumerate() {
            let bh = b * nh + g * group + hi;
            out[(bh * t + i0) * dv..][..tq * dv].copy_from_slice(rows);
        }
    }

    // What the next call keeps: the new rows among the kept positions go to their slots (the
    // slots they take held positions no longer kept).
    let kept_after = span.kept(p + t);
    let slots = sd.slots();
    let write = |all: &mut [f32], new: &[f32], c: usize| {
        for bk in 0..nb * nkv {
            for &m in kept_after.iter().filter(|&&m| m >= p) {
                all[(bk * slots + sd.slot(m)) * c..][..c]
                    .copy_from_slice(&new[(bk * t + m - p) * c..][..c]);
            }
        }
    };
    write(&mut state.keys, x.k, dv);
    write(&mut state.values, x.v, dv);
    write(&mut state.features, x.fk, f);
    state.len = p + t;
    out
}
