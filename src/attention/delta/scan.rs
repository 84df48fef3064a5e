//! Inference on plain slices: the recurrence token by token, once per (sequence, query head),
//! keys and values read in place at their own heads. Prefill and the single-token step both run
//! it; each token costs three d' × d_v passes over the state (read, write, answer), where the
//! additive state's costs two.

use super::make_unit;
use crate::attention::kv_head;
use crate::attention::supra::Dims;
use rayon::prelude::*;

/// q (B, H, T, d'), k (B, H_kv, T, d') key features (made unit here), v (B, H_kv, T, d_v),
/// row-major; `params` (H, d' + 1) β's weights and bias; `state` (B, H, d', d_v) holds Z before
/// the first token and is left holding Z after the last. Returns o (B, H, T, d_v).
pub fn scan(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    params: &[f32],
    state: &mut [f32],
    gammas: &[f64],
    d: Dims,
) -> Vec<f32> {
    let (t, f, dv) = (d.len, d.feature_dim, d.value_dim);
    assert!(
        q.len() == d.batch * d.heads * t * f
            && k.len() == d.batch * d.kv_heads * t * f
            && v.len() == d.batch * d.kv_heads * t * dv
            && params.len() == d.heads * (f + 1)
            && state.len() == d.batch * d.heads * f * dv
            && gammas.len() == d.heads,
        "delta scan: operands do not match {d:?}"
    );
    let mut out = vec![0f32; d.batch * d.heads * t * dv];
    let head = |bh: usize, z: &mut [f32], o: &mut [f32]| {
        let h = bh % d.heads;
        let bg = (bh / d.heads) * d.kv_heads + kv_head(h, d.heads, d.kv_heads);
        let (w, bias) = (&params[h * (f + 1)..][..f], params[h * (f + 1) + f]);
        let g = gammas[h] as f32;
        let (mut unit, mut u) = (vec![0f32; f], vec![0f32; dv]);
        for n in 0..t {
            unit.copy_from_slice(&k[(bg * t + n) * f..][..f]);
            make_unit(&mut unit, f);
            let logit = unit.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + bias;
            let beta = 1.0 / (1.0 + (-logit).exp());
            // u = β (v − γ Zᵀ k̂).
            u.fill(0.0);
            for (row, &ki) in z.chunks_exact(dv).zip(&unit) {
                u.iter_mut().zip(row).for_each(|(a, zi)| *a += ki * zi);
            }
            let value = &v[(bg * t + n) * dv..][..dv];
            u.iter_mut()
                .zip(value)
                .for_each(|(a, x)| *a = beta * (x - g * *a));
            // Z ← γ Z + k̂ uᵀ, then o = Zᵀ q.
            let y = &mut o[n * dv..][..dv];
            let query = &q[(bh * t + n) * f..][..f];
            for ((row, &ki), &qi) in z.chunks_exact_mut(dv).zip(&unit).zip(query) {
                for ((zi, a), yi) in row.iter_mut().zip(&u).zip(y.iter_mut()) {
                    *zi = g * *zi + ki * a;
                    *yi += qi * *zi;
                }
            }
        }
    };
    let heads = state.chunks_mut(f * dv).zip(out.chunks_mut(t * dv));
    if t > 1 {
        let heads: Vec<_> = heads.enumerate().collect();
        heads
            .into_par_iter()
            .for_each(|(bh, (z, o))| head(bh, z, o));
    } else {
        // One token: less work per head than a task costs.
        heads.enumerate().for_each(|(bh, (z, o))| head(bh, z, o));
    }
    out
}
