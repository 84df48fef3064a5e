//! The delta rule as a linear state that overwrites (DeltaNet: Schlag et al. 2021, Yang et al.
//! 2024, arXiv 2406.06484; with a decay, as Gated DeltaNet, arXiv 2412.06464, but SUPRA's fixed
//! per-head γ rather than a learned gate per token).
//!
//! Additive linear attention only adds: a key written twice holds the sum of its values, and
//! every write blurs every other. The delta rule first reads what the state holds under the new
//! key and replaces a share β of it, so a recalled value is the last one written. Per query head
//! h (reading key/value head g), from Z = 0 (d' × d_v):
//!
//! ```text
//! unit key        k̂_t = φk_t / sqrt(‖φk_t‖² + ε)         (a zero key writes nothing)
//! write strength  β_t = sigmoid(w_h·k̂_t + b_h)           (parameters (H, d' + 1): [w_h | b_h])
//! new value       u_t = β_t (v_t − γ_h Z_{t−1}ᵀ k̂_t)
//! state           Z_t = γ_h Z_{t−1} + k̂_t u_tᵀ = γ_h (I − β_t k̂_t k̂_tᵀ) Z_{t−1} + β_t k̂_t v_tᵀ
//! output          o_t = Z_tᵀ q_t
//! ```
//!
//! β reads the key itself, so a window layer can take it from the key features it keeps anyway
//! and its state gains nothing per token. The output is not normalised here: a window layer's
//! gated mix GroupNorms it, as it does the additive branch; its value mix asks with unit
//! queries instead ([`make_unit`]), so a key matched exactly answers with its value.
//!
//! Forms side by side: [`naive`] (the recurrence in f64), [`chunk`] (training: the WY form per
//! chunk, composed from candle ops, differentiable), [`fused`] (the same on slices as one op,
//! what training runs where the decays are fixed), [`scan`] (the recurrence on f32 slices,
//! prefill and step).

pub mod chunk;
pub mod fused;
pub mod naive;
pub mod scan;

use crate::attention::supra::HeadDecays;
use candle_core::{DType, Tensor, WithDType};

/// The training form, arguments as [`chunk::chunked`]: the fused op ([`fused`]) where it
/// applies (fixed decays, f32 or f64, more than one chunk), else the composed form; with one
/// chunk that is the parallel form, kept composed as the reference the others are held to.
pub fn training(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: &Tensor,
    decays: &HeadDecays,
    chunk: usize,
) -> anyhow::Result<Tensor> {
    match decays {
        HeadDecays::Fixed(g)
            if chunk < q.dim(2)? && matches!(q.dtype(), DType::F32 | DType::F64) =>
        {
            fused::chunked(q, k, v, params, g, chunk)
        }
        _ => chunk::chunked(q, k, v, params, decays, chunk),
    }
}

/// ε under ‖φk‖² of the unit key.
pub const KEY_EPS: f64 = 1e-12;

/// Rows of `width` made unit in place, x / sqrt(‖x‖² + ε) (summed in f64): the rule's keys,
/// and the value mix's queries.
pub fn make_unit<T: WithDType>(rows: &mut [T], width: usize) {
    for row in rows.chunks_exact_mut(width) {
        let sq: f64 = row.iter().map(|x| x.to_f64() * x.to_f64()).sum();
        let norm = (sq + KEY_EPS).sqrt();
        row.iter_mut()
            .for_each(|x| *x = T::from_f64(x.to_f64() / norm));
    }
}

/// The write strength's starting value, sigmoid(b_h) with w_h = 0: half of what the state held
/// under a key is replaced.
pub const INITIAL_BETA: f64 = 0.5;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::supra::{decay_logits, Decay, Dims, HeadDecays};
    use crate::testing::{check_grad, flat_f64 as flat, rel_err};
    use candle_core::{DType, Device, Tensor, Var};

    fn dims(heads: usize, kv_heads: usize, len: usize) -> Dims {
        Dims {
            batch: 2,
            heads,
            kv_heads,
            len,
            feature_dim: 6,
            value_dim: 5,
        }
    }

    /// Non-negative φq, φk (every third key zero: such a key writes nothing), v, β's parameters.
    fn inputs(d: Dims) -> [Tensor; 4] {
        let dev = Device::Cpu;
        let n = |shape: &[usize]| Tensor::randn(0f64, 1.0, shape, &dev).unwrap();
        let (t, f) = (d.len, d.feature_dim);
        let zeros: Vec<f64> = (0..t).map(|i| f64::from(u8::from(i % 3 != 2))).collect();
        let keep = Tensor::from_vec(zeros, (1, 1, t, 1), &dev).unwrap();
        [
            n(&[d.batch, d.heads, t, f]).relu().unwrap(),
            n(&[d.batch, d.kv_heads, t, f])
                .relu()
                .unwrap()
                .broadcast_mul(&keep)
                .unwrap(),
            n(&[d.batch, d.kv_heads, t, d.value_dim]),
            n(&[d.heads, f + 1]),
        ]
    }

    /// The training form in chunks below, at and above the length, and the slices in pieces
    /// (state carried; single-token steps at the end), against the recurrence: GQA and none.
    #[test]
    fn forms_agree_with_the_definition() {
        for (h, hkv) in [(4, 2), (3, 3)] {
            let gammas = Decay::Lightning.gammas(h).unwrap();
            for t in [1, 5, 37] {
                let d = dims(h, hkv, t);
                let [q, k, v, p] = inputs(d);
                let want = naive::naive(&flat(&q), &flat(&k), &flat(&v), &flat(&p), &gammas, d);
                let decays = HeadDecays::Fixed(gammas.clone());
                for c in [1, 4, 16, usize::MAX] {
                    let got = chunk::chunked(&q, &k, &v, &p, &decays, c).unwrap();
                    let e = rel_err(&flat(&got), &want);
                    assert!(e < 1e-10, "H={h}/{hkv} T={t} C={c}: {e}");
                }
                let f32s = |x: &Tensor| -> Vec<f32> {
                    let x = x.to_dtype(DType::F32).unwrap();
                    x.flatten_all().unwrap().to_vec1().unwrap()
                };
                let cuts: Vec<usize> = [0, t / 2].into_iter().chain(t / 2 + 1..=t).collect();
                let mut state = vec![0f32; 2 * h * 6 * 5];
                let mut got = vec![0f64; want.len()];
                for piece in cuts.windows(2).filter(|p| p[1] > p[0]) {
                    let (a, n) = (piece[0], piece[1] - piece[0]);
                    let part = |x: &Tensor| f32s(&x.narrow(2, a, n).unwrap());
                    let y = scan::scan(
                        &part(&q),
                        &part(&k),
                        &part(&v),
                        &f32s(&p),
                        &mut state,
                        &gammas,
                        Dims { len: n, ..d },
                    );
                    for bh in 0..2 * h {
                        for i in 0..n * 5 {
                            got[(bh * t + a) * 5 + i] = f64::from(y[bh * n * 5 + i]);
                        }
                    }
                }
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "H={h}/{hkv} T={t} slices: {e}");
            }
        }
    }

    /// The rule overwrites: a key written twice answers with its last value (β = 1, no decay,
    /// orthogonal keys), where an additive state would answer with the sum.
    #[test]
    fn a_key_written_twice_recalls_its_last_value() {
        let d = Dims {
            batch: 1,
            heads: 1,
            kv_heads: 1,
            len: 3,
            feature_dim: 2,
            value_dim: 1,
        };
        // Keys e0, e1, e0 with values 1, 2, 3; the last query asks for e0. β = sigmoid(40).
        let (q, k, v) = (
            [0., 0., 0., 0., 1., 0.],
            [1., 0., 0., 1., 1., 0.],
            [1., 2., 3.],
        );
        let o = naive::naive(&q, &k, &v, &[0.0, 0.0, 40.0], &[1.0], d);
        assert!((o[2] - 3.0).abs() < 1e-9, "{o:?}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let d = dims(4, 2, 11);
        let [q, k, v, p] = inputs(d);
        // Keys away from zero: at a zero key the unit key turns on a scale of √ε.
        let k = (k + 0.1).unwrap();
        let theta = decay_logits(&Decay::Lightning.gammas(4).unwrap());
        let theta = Tensor::new(theta, &Device::Cpu).unwrap();
        let vars = [q, k, v, p, theta].map(|x| Var::from_tensor(&x).unwrap());
        let r = Tensor::randn(0f64, 1.0, (2, 4, 11, 5), &Device::Cpu).unwrap();
        let decays = HeadDecays::Learned(vars[4].as_tensor().clone());
        let loss = || {
            let [q, k, v, p] = [0, 1, 2, 3].map(|i| vars[i].as_tensor());
            let o = chunk::chunked(q, k, v, p, &decays, 4).unwrap();
            (o * &r).unwrap().sum_all().unwrap()
        };
        for (v, name) in vars.iter().zip(["q", "k", "v", "β parameters", "decay θ"]) {
            check_grad(v, loss, name);
        }
    }

    /// Forward substitution inverts I + A whatever A holds on and above its diagonal, and stays
    /// exact in f32 where A's powers would not (similar keys, β = 1: A all ones below).
    #[test]
    fn unit_lower_inverse_inverts() {
        let dev = Device::Cpu;
        let c = 64;
        let a = Tensor::randn(0f64, 0.3, (3, c, c), &dev).unwrap();
        let y = chunk::unit_lower_inverse(&a).unwrap();
        let below = (Tensor::tril2(c, DType::F64, &dev).unwrap()
            - Tensor::eye(c, DType::F64, &dev).unwrap())
        .unwrap();
        let i_plus_a = a
            .broadcast_mul(&below)
            .unwrap()
            .broadcast_add(&Tensor::eye(c, DType::F64, &dev).unwrap())
            .unwrap();
        let eye = Tensor::eye(c, DType::F64, &dev)
            .unwrap()
            .repeat((3, 1, 1))
            .unwrap();
        let e = rel_err(&flat(&y.matmul(&i_plus_a).unwrap()), &flat(&eye));
        assert!(e < 1e-10, "random: {e}");
        let ones = below.to_dtype(DType::F32).unwrap().unsqueeze(0).unwrap();
        let y = chunk::unit_lower_inverse(&ones).unwrap();
        // (I + L)⁻¹ for L all ones below: 1 on the diagonal, −1 just below it, 0 elsewhere.
        let want: Vec<f64> = (0..c * c)
            .map(|x| match (x / c) as i64 - (x % c) as i64 {
                0 => 1.0,
                1 => -1.0,
                _ => 0.0,
            })
            .collect();
        assert_eq!(flat(&y), want);
    }
}
