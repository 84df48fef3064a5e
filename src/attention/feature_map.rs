//! Feature maps φ of the linear branches: what turns a query or key head into non-negative
//! features whose dot products stand in for exp(q·k/√d).
//!
//! - `relu` (SUPRA): φ(x) = ReLU(W x + b), one matrix over all heads at once (keys through
//!   their own under GQA), d' features per head. The SUPRA cell applies it to the raw q and k
//!   and rotates its output (RoPE after φ, as the paper does).
//! - `hedgehog` (Zhang et al. 2024, arXiv 2402.04347): per head y = x W_h, then
//!   φ(x) = [softmax(y), softmax(−y)] over the d features, 2d in all; W_h starts as the
//!   identity. It reads the RoPE'd q and k (as LoLCATs applies it) and is not rotated after.
//!
//! Both take and give rows of all heads side by side, (B, T, n·d) → (B, T, n·d').

use crate::attention::signed_softmax::{signed_softmax, signed_softmax_row};
use crate::attention::softmax::exp_shifted;
use crate::attention::Exec;
use crate::config::FeatureKind;
use crate::model::linear::Linear;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// The query map and the key map of one layer.
#[derive(Debug, Clone)]
pub enum FeatureMap {
    Relu {
        q: Linear,
        /// Keys' own map under GQA (H_kv·d → H_kv·d'); `None` when keys share `q`'s.
        k: Option<Linear>,
    },
    /// Per-head matrices, (H, d, d) for queries and (H_kv, d, d) for keys.
    Hedgehog { q: Tensor, k: Tensor },
}

/// Which projection a map is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Query,
    Key,
}

impl FeatureMap {
    pub fn kind(&self) -> FeatureKind {
        match self {
            Self::Relu { .. } => FeatureKind::Relu,
            Self::Hedgehog { .. } => FeatureKind::Hedgehog,
        }
    }

    /// Whether RoPE rotates φ's output (relu, SUPRA's order) rather than its input.
    pub fn rope_after(&self) -> bool {
        matches!(self, Self::Relu { .. })
    }

    /// `x` (B, T, n·d) → φ(x) (B, T, n·d') for the n heads of `role`.
    pub fn apply(&self, x: &Tensor, role: Role, exec: Exec) -> Result<Tensor> {
        match self {
            Self::Relu { q, k } => {
                let lin = relu_linear(q, k, role);
                lin.forward_relu(x, exec)
            }
            Self::Hedgehog { q, k } => {
                let w = if role == Role::Query { q } else { k };
                let (n, d, _) = w.dims3()?;
                let (b, t, _) = x.dims3()?;
                // (B·T, n, d) → per head (n, B·T, d) · W_h → back to (B·T, n, d).
                let y = x
                    .reshape((b * t, n, d))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .matmul(w)?
                    .transpose(0, 1)?
                    .contiguous()?;
                Ok(signed_softmax(&y)?.reshape((b, t, n * 2 * d))?)
            }
        }
    }

    /// φ of `rows` tokens, each's heads side by side (n·d values a row), on plain slices, for
    /// decoding steps, where a dozen small tensor operations would cost more than the
    /// arithmetic. Each row's values are what it gets alone (the products take every row the
    /// same way).
    pub fn apply_rows(&self, x: &[f32], rows: usize, role: Role) -> Result<Vec<f32>> {
        match self {
            Self::Relu { q, k } => {
                let lin = relu_linear(q, k, role);
                let t = Tensor::from_vec(x.to_vec(), (rows, x.len() / rows), &Device::Cpu)?;
                let mut y: Vec<f32> = lin.forward(&t, Exec::Infer)?.flatten_all()?.to_vec1()?;
                y.iter_mut().for_each(|a| *a = a.max(0.0));
                Ok(y)
            }
            Self::Hedgehog { q, k } => {
                let w = if role == Role::Query { q } else { k };
                let (n, d, _) = w.dims3()?;
                let (storage, layout) = w.storage_and_layout();
                let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
                    (&*storage, layout.contiguous_offsets())
                else {
                    anyhow::bail!("hedgehog weights are not a contiguous CPU tensor");
                };
                let w = &cpu.as_slice::<f32>()?[start..end];
                let mut out = vec![0f32; 2 * x.len()];
                let mut y = vec![0f32; d];
                let heads = out.chunks_exact_mut(2 * d).zip(x.chunks_exact(d));
                for (i, (o, xh)) in heads.enumerate().take(n * rows) {
                    let wh = &w[i % n * d * d..][..d * d];
                    y.fill(0.0);
                    // y = x W_h, row by row of W_h.
                    for (xi, wrow) in xh.iter().zip(wh.chunks_exact(d)) {
                        y.iter_mut().zip(wrow).for_each(|(a, b)| *a += xi * b);
                    }
                    signed_softmax_row(&y, o, exp_shifted);
                }
                Ok(out)
            }
        }
    }

    /// The projections among the map's parameters, for quantization (hedgehog's per-head
    /// matrices are small and stay f32).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Relu { q, k } => {
                let mut l = vec![q];
                l.extend(k.as_mut());
                l
            }
            Self::Hedgehog { .. } => Vec::new(),
        }
    }
}

/// The relu map's projection for `role`: keys' own, or the queries' where keys share it.
fn relu_linear<'a>(q: &'a Linear, k: &'a Option<Linear>, role: Role) -> &'a Linear {
    match (role, k) {
        (Role::Key, Some(k)) => k,
        _ => q,
    }
}

/// The definition in f64 for one head's row `x` (d values): the references' φ.
pub fn naive_hedgehog(x: &[f64], w: &[f64]) -> Vec<f64> {
    let d = x.len();
    let y: Vec<f64> = (0..d)
        .map(|j| (0..d).map(|i| x[i] * w[i * d + j]).sum())
        .collect();
    let softmax = |sign: f64| {
        let m = y.iter().map(|a| sign * a).fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = y.iter().map(|a| (sign * a - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(move |a| a / s)
    };
    softmax(1.0).chain(softmax(-1.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The tensor form against the definition, per head, with distinct matrices per head.
    #[test]
    fn hedgehog_matches_its_definition() {
        let dev = Device::Cpu;
        let (n, d) = (3, 4);
        let w = Tensor::randn(0f64, 1.0, (n, d, d), &dev).unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 5, n * d), &dev).unwrap();
        let map = FeatureMap::Hedgehog {
            q: w.clone(),
            k: w.clone(),
        };
        for exec in [Exec::Train, Exec::Infer] {
            let got = map.apply(&x, Role::Query, exec).unwrap();
            assert_eq!(got.dims(), &[2, 5, n * 2 * d]);
            let got: Vec<f64> = got.flatten_all().unwrap().to_vec1().unwrap();
            let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
            let ws: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
            for (row, out) in xs.chunks(n * d).zip(got.chunks(n * 2 * d)) {
                for h in 0..n {
                    let want = naive_hedgehog(&row[h * d..][..d], &ws[h * d * d..][..d * d]);
                    for (a, b) in out[h * 2 * d..][..2 * d].iter().zip(&want) {
                        assert!((a - b).abs() < 1e-12, "{exec:?} head {h}: {a} vs {b}");
                    }
                }
            }
        }
        // The identity start: φ(x) is softmax(x) beside softmax(−x).
        let eye = Tensor::eye(d, DType::F64, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((n, 1, 1))
            .unwrap();
        let id = FeatureMap::Hedgehog {
            q: eye.clone(),
            k: eye,
        };
        let y = id.apply(&x, Role::Key, Exec::Infer).unwrap();
        let first = y.narrow(2, 0, d).unwrap();
        let want =
            candle_nn::ops::softmax(&x.narrow(2, 0, d).unwrap(), candle_core::D::Minus1).unwrap();
        let diff = (first - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12);
    }
}
