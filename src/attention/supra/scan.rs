//! Inference on plain slices: the chunked form once per (sequence, query head), keys and values
//! read in place at their own heads ([`kv_head`]). Prefill and the single-token step both run
//! it (a step is a chunk of one token); the state update below is the only one on this side.
//! At evaluation's shapes (tens of rows of ~100 tokens) and in decoding, a dozen small candle
//! operations per chunk cost more than the products themselves.

use super::Dims;
use crate::attention::kv_head;
use crate::model::gemm::{gemm, Strided};
use rayon::prelude::*;

/// q̃ (B, H, T, d'), k̃ (B, H_kv, T, d'), v (B, H_kv, T, d_v), row-major; `state` (B, H, d', d_v)
/// holds S before the first token and is left holding S after the last. Returns O (B, H, T, d_v).
pub fn scan(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    state: &mut [f32],
    gammas: &[f64],
    chunk: usize,
    d: Dims,
) -> Vec<f32> {
    let (t, dk, dv) = (d.len, d.feature_dim, d.value_dim);
    assert!(
        q.len() == d.batch * d.heads * t * dk
            && k.len() == d.batch * d.kv_heads * t * dk
            && v.len() == d.batch * d.kv_heads * t * dv
            && state.len() == d.batch * d.heads * dk * dv
            && gammas.len() == d.heads
            && chunk > 0,
        "scan: operands do not match {d:?}"
    );
    let chunk = chunk.min(t.max(1));
    // Per head, γ^e for e = 0..=chunk, each power from f64 as the training form computes them.
    let pows: Vec<Vec<f32>> = gammas
        .iter()
        .map(|g| (0..=chunk).map(|e| g.powi(e as i32) as f32).collect())
        .collect();
    let mut out = vec![0f32; d.batch * d.heads * t * dv];
    let head = |bh: usize, s: &mut [f32], o: &mut [f32]| {
        let (b, h) = (bh / d.heads, bh % d.heads);
        let kv = b * d.kv_heads + kv_head(h, d.heads, d.kv_heads);
        let mut bufs = Buffers::default();
        for c0 in (0..t).step_by(chunk) {
            let len = chunk.min(t - c0);
            let one = Chunk {
                q: &q[(bh * t + c0) * dk..][..len * dk],
                k: &k[(kv * t + c0) * dk..][..len * dk],
                v: &v[(kv * t + c0) * dv..][..len * dv],
                len,
                dk,
                dv,
                pow: &pows[h],
            };
            one.run(s, &mut o[c0 * dv..(c0 + len) * dv], &mut bufs);
        }
    };
    let heads = state.chunks_mut(dk * dv).zip(out.chunks_mut(t * dv));
    if t > 1 {
        let heads: Vec<_> = heads.enumerate().collect();
        heads
            .into_par_iter()
            .for_each(|(bh, (s, o))| head(bh, s, o));
    } else {
        // One token: less work per head than a task costs.
        heads.enumerate().for_each(|(bh, (s, o))| head(bh, s, o));
    }
    out
}

#[derive(Default)]
struct Buffers {
    scores: Vec<f32>,
    q_decayed: Vec<f32>,
    k_decayed: Vec<f32>,
}

/// One chunk of one head.
struct Chunk<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    len: usize,
    dk: usize,
    dv: usize,
    /// γ^e, e = 0..=len at least.
    pow: &'a [f32],
}

impl Chunk<'_> {
    /// o (len × d_v) ← (Q̃K̃ᵀ/√d' ⊙ D) V + (γ^(i+1) q̃_i) S, then
    /// S ← γ^len S + Σ_j γ^(len−1−j) k̃_jᵀ v_j / √d'.
    fn run(&self, s: &mut [f32], o: &mut [f32], bufs: &mut Buffers) {
        let (len, dk, dv, pow) = (self.len, self.dk, self.dv, self.pow);
        let scale = 1.0 / (dk as f32).sqrt();
        let v = Strided::rows(self.v, dv);
        // Inside the chunk: A = (Q̃ K̃ᵀ/√d') ⊙ D, O = A V.
        let a = &mut bufs.scores;
        a.resize(len * len, 0.0);
        let (qm, km) = (
            Strided::rows(self.q, dk),
            Strided::transposed_rows(self.k, dk),
        );
        gemm(a, (len, len, dk), qm, km, None, scale);
        for (i, row) in a.chunks_exact_mut(len).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = if j <= i { *x * pow[i - j] } else { 0.0 };
            }
        }
        gemm(o, (len, dv, len), Strided::rows(a, len), v, None, 1.0);
        // From earlier chunks: O += (γ^(i+1) q̃_i) S.
        let qd = &mut bufs.q_decayed;
        qd.clear();
        for (i, row) in self.q.chunks_exact(dk).enumerate() {
            qd.extend(row.iter().map(|x| x * pow[i + 1]));
        }
        let sm = Strided::rows(s, dv);
        gemm(o, (len, dv, dk), Strided::rows(qd, dk), sm, Some(1.0), 1.0);
        // The state update.
        let kd = &mut bufs.k_decayed;
        kd.clear();
        for (j, row) in self.k.chunks_exact(dk).enumerate() {
            let w = pow[len - 1 - j] * scale;
            kd.extend(row.iter().map(|x| x * w));
        }
        let kdm = Strided::transposed_rows(kd, dk);
        gemm(s, (dk, dv, len), kdm, v, Some(pow[len]), 1.0);
    }
}
