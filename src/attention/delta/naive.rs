//! The definition, literally, in f64: the reference the other forms are tested against.

use super::make_unit;
use crate::attention::supra::Dims;

/// q (B, H, T, d'), k (B, H_kv, T, d') the key features (not yet unit), v (B, H_kv, T, d_v);
/// `params` (H, d' + 1) β's weights and bias per head; γ per head. Returns o (B, H, T, d_v).
pub fn naive(q: &[f64], k: &[f64], v: &[f64], params: &[f64], gammas: &[f64], d: Dims) -> Vec<f64> {
    let (t, f, dv) = (d.len, d.feature_dim, d.value_dim);
    let mut out = vec![0.0; d.batch * d.heads * t * dv];
    for b in 0..d.batch {
        for h in 0..d.heads {
            let (bh, bg) = (b * d.heads + h, b * d.kv_heads + h / (d.heads / d.kv_heads));
            let (w, bias) = (&params[h * (f + 1)..][..f], params[h * (f + 1) + f]);
            let g = gammas[h];
            // Z as f rows of d_v.
            let mut z = vec![0.0; f * dv];
            for n in 0..t {
                let mut unit = k[(bg * t + n) * f..][..f].to_vec();
                make_unit(&mut unit, f);
                let logit = unit.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() + bias;
                let beta = 1.0 / (1.0 + (-logit).exp());
                let value = &v[(bg * t + n) * dv..][..dv];
                // Z_{t−1}ᵀ k̂, then u, then the update.
                let read: Vec<f64> = (0..dv)
                    .map(|c| (0..f).map(|i| z[i * dv + c] * unit[i]).sum())
                    .collect();
                let u: Vec<f64> = (0..dv).map(|c| beta * (value[c] - g * read[c])).collect();
                for i in 0..f {
                    for c in 0..dv {
                        z[i * dv + c] = g * z[i * dv + c] + unit[i] * u[c];
                    }
                }
                let query = &q[(bh * t + n) * f..][..f];
                for c in 0..dv {
                    out[(bh * t + n) * dv + c] = (0..f).map(|i| z[i * dv + c] * query[i]).sum();
                }
            }
        }
    }
    out
}
