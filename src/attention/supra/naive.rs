//! The definition, literally, in f64: the reference every other form is tested against.
//!
//! o_t = Σ_{i≤t} γ^(t−i) (q̃_t · k̃_i / √d') v_i, for query head h reading key/value head
//! h / (H / H_kv) — written out here, not through [`kv_head`](crate::attention::kv_head), so
//! that tests check the mapping too.

use super::Dims;

/// q̃ (B, H, T, d'), k̃ (B, H_kv, T, d'), v (B, H_kv, T, d_v), `s0` (B, H, d', d_v) or empty
/// → (O (B, H, T, d_v), S after the last token).
pub fn naive(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s0: &[f64],
    gammas: &[f64],
    d: Dims,
) -> (Vec<f64>, Vec<f64>) {
    let (t, dk, dv) = (d.len, d.feature_dim, d.value_dim);
    let scale = 1.0 / (dk as f64).sqrt();
    let mut out = vec![0.0; d.batch * d.heads * t * dv];
    let mut state = vec![0.0; d.batch * d.heads * dk * dv];
    for b in 0..d.batch {
        for (h, &g) in gammas.iter().enumerate().take(d.heads) {
            let bh = b * d.heads + h;
            let kv = b * d.kv_heads + h / (d.heads / d.kv_heads);
            let qrow = |i: usize| &q[(bh * t + i) * dk..][..dk];
            let krow = |i: usize| &k[(kv * t + i) * dk..][..dk];
            let vrow = |i: usize| &v[(kv * t + i) * dv..][..dv];
            for ti in 0..t {
                let o = &mut out[(bh * t + ti) * dv..][..dv];
                for i in 0..=ti {
                    let dot: f64 = qrow(ti).iter().zip(krow(i)).map(|(a, b)| a * b).sum();
                    let w = g.powi((ti - i) as i32) * dot * scale;
                    o.iter_mut().zip(vrow(i)).for_each(|(o, v)| *o += w * v);
                }
                // The initial state, decayed to t: q̃_t S0 γ^(t+1).
                if !s0.is_empty() {
                    let s = &s0[bh * dk * dv..][..dk * dv];
                    let w = g.powi(ti as i32 + 1);
                    for (a, srow) in qrow(ti).iter().zip(s.chunks_exact(dv)) {
                        o.iter_mut().zip(srow).for_each(|(o, s)| *o += w * a * s);
                    }
                }
            }
            // S_T = γ^T S0 + Σ_i γ^(T−1−i) k̃_iᵀ v_i / √d'.
            let s = &mut state[bh * dk * dv..][..dk * dv];
            if !s0.is_empty() {
                let g_t = g.powi(t as i32);
                s.iter_mut()
                    .zip(&s0[bh * dk * dv..][..dk * dv])
                    .for_each(|(s, s0)| *s = g_t * s0);
            }
            for i in 0..t {
                let w = g.powi((t - 1 - i) as i32) * scale;
                for (a, srow) in krow(i).iter().zip(s.chunks_exact_mut(dv)) {
                    srow.iter_mut()
                        .zip(vrow(i))
                        .for_each(|(s, v)| *s += w * a * v);
                }
            }
        }
    }
    (out, state)
}

/// GroupNorm with one group per head, no affine: each row of `d` values to zero mean, unit
/// variance.
pub fn group_norm(x: &[f64], d: usize, eps: f64) -> Vec<f64> {
    x.chunks_exact(d)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter().map(move |a| (a - mean) * inv)
        })
        .collect()
}
