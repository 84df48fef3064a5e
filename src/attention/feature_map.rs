//! Feature maps φ of the linear branches: what turns a query or key head into non-negative
//! features whose dot products stand in for exp(q·k/√d).
//!
//! - `relu` (SUPRA): φ(x) = ReLU(W x + b), one matrix over all heads at once (keys through
//!   their own under GQA), d' features per head. The SUPRA cell applies it to the raw q and k
//!   and rotates its output (RoPE after φ, as the paper does).
//! - `hedgehog` (Zhang et al. 2024, arXiv 2402.04347): per head y = x W_h, then
//!   φ(x) = [softmax(y), softmax(−y)] over the d features, 2d in all; W_h starts as the
//!   identity. It reads the RoPE'd q and k (as LoLCATs applies it) and is not rotated after.
//! - `taylor` (Based, Arora et al. 2024, arXiv 2402.18668): per head y = x W_h (p dims), then
//!   φ(x) = [1, y, y_i y_j for i < j, y_i²/√2], 1 + p + p(p+1)/2 features, so that
//!   φ(q)·φ(k) = 1 + u + u²/2 with u = y_q·y_k: exp's second-order Taylor polynomial, whose
//!   quadratic term lets the state sharpen onto the keys a query matches (Based's recall). It
//!   reads the RoPE'd q and k, as hedgehog does; W_h carries the 1/√d of the logits.
//!
//! All take and give rows of all heads side by side, (B, T, n·d) → (B, T, n·d').

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
    /// Per-head projections, (H, d, p) for queries and (H_kv, d, p) for keys.
    Taylor { q: Tensor, k: Tensor },
}

/// The taylor map's feature count for a projection of `p` dims: 1 + p + p(p+1)/2.
pub fn taylor_features(p: usize) -> usize {
    1 + p + p * (p + 1) / 2
}

/// The projection dims p of a taylor map with `f` features, if `f` is such a count.
pub fn taylor_projection(f: usize) -> Option<usize> {
    (1..=f)
        .take_while(|&p| taylor_features(p) <= f)
        .find(|&p| taylor_features(p) == f)
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
            Self::Taylor { .. } => FeatureKind::Taylor,
        }
    }

    /// Whether RoPE rotates φ's output (relu, SUPRA's order) rather than its input.
    pub fn rope_after(&self) -> bool {
        !self.kind().per_head()
    }

    /// `x` (B, T, n·d) → φ(x) (B, T, n·d') for the n heads of `role`.
    pub fn apply(&self, x: &Tensor, role: Role, exec: Exec) -> Result<Tensor> {
        match self {
            Self::Relu { q, k } => {
                let lin = relu_linear(q, k, role);
                lin.forward_relu(x, exec)
            }
            Self::Hedgehog { q, k } => {
                let (b, t, _) = x.dims3()?;
                let y = per_head(x, if role == Role::Query { q } else { k })?;
                let (_, n, d) = y.dims3()?;
                Ok(signed_softmax(&y)?.reshape((b, t, n * 2 * d))?)
            }
            Self::Taylor { q, k } => {
                let (b, t, _) = x.dims3()?;
                let y = per_head(x, if role == Role::Query { q } else { k })?;
                let (_, n, p) = y.dims3()?;
                Ok(taylor(&y)?.reshape((b, t, n * taylor_features(p)))?)
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
                let d = w.dim(2)?;
                per_head_rows(x, rows, w, 2 * d, |y, o| {
                    signed_softmax_row(y, o, exp_shifted)
                })
            }
            Self::Taylor { q, k } => {
                let w = if role == Role::Query { q } else { k };
                let p = w.dim(2)?;
                per_head_rows(x, rows, w, taylor_features(p), taylor_row)
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
            Self::Hedgehog { .. } | Self::Taylor { .. } => Vec::new(),
        }
    }
}

/// y = x W_h for each head h: `x` (B, T, n·d), `w` (n, d, p) → (B·T, n, p).
fn per_head(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, d, _) = w.dims3()?;
    let (b, t, _) = x.dims3()?;
    // (B·T, n, d) → per head (n, B·T, d) · W_h → back to (B·T, n, p).
    Ok(x.reshape((b * t, n, d))?
        .transpose(0, 1)?
        .contiguous()?
        .matmul(w)?
        .transpose(0, 1)?
        .contiguous()?)
}

/// [`per_head`] then `map` (p values → `f` features) on slices: `rows` rows of n·d values.
fn per_head_rows(
    x: &[f32],
    rows: usize,
    w: &Tensor,
    f: usize,
    map: impl Fn(&[f32], &mut [f32]),
) -> Result<Vec<f32>> {
    let (n, d, p) = w.dims3()?;
    let (storage, layout) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        anyhow::bail!("per-head φ weights are not a contiguous CPU tensor");
    };
    let w = &cpu.as_slice::<f32>()?[start..end];
    let mut out = vec![0f32; x.len() / d * f];
    let mut y = vec![0f32; p];
    let heads = out.chunks_exact_mut(f).zip(x.chunks_exact(d));
    for (i, (o, xh)) in heads.enumerate().take(n * rows) {
        let wh = &w[i % n * d * p..][..d * p];
        y.fill(0.0);
        // y = x W_h, row by row of W_h.
        for (xi, wrow) in xh.iter().zip(wh.chunks_exact(p)) {
            y.iter_mut().zip(wrow).for_each(|(a, b)| *a += xi * b);
        }
        map(&y, o);
    }
    Ok(out)
}

/// The quadratic features' pairs (i ≤ j, row by row of y⊗y) and their factors: 1 off the
/// diagonal, where y_i y_j stands for both (i, j) and (j, i), and 1/√2 on it, so that their
/// dot products sum to u²/2.
fn pairs(p: usize) -> impl Iterator<Item = (usize, usize, f64)> {
    (0..p).flat_map(move |i| {
        (i..p).map(move |j| {
            let c = if i == j {
                std::f64::consts::FRAC_1_SQRT_2
            } else {
                1.0
            };
            (i, j, c)
        })
    })
}

/// [1, y, the quadratic features] of `y` (R, n, p) → (R, n, 1 + p + p(p+1)/2).
fn taylor(y: &Tensor) -> Result<Tensor> {
    let (r, n, p) = y.dims3()?;
    let dev = y.device();
    let (idx, c): (Vec<u32>, Vec<f64>) = pairs(p).map(|(i, j, c)| ((i * p + j) as u32, c)).unzip();
    let outer = y
        .unsqueeze(3)?
        .broadcast_mul(&y.unsqueeze(2)?)?
        .reshape((r, n, p * p))?;
    let c = Tensor::new(c, dev)?.to_dtype(y.dtype())?;
    let quad = outer
        .index_select(&Tensor::new(idx, dev)?, 2)?
        .broadcast_mul(&c)?;
    let one = Tensor::ones((r, n, 1), y.dtype(), dev)?;
    Ok(Tensor::cat(&[&one, y, &quad], 2)?)
}

/// [`taylor`] of one head's `y` into `o`.
fn taylor_row(y: &[f32], o: &mut [f32]) {
    let p = y.len();
    o[0] = 1.0;
    o[1..=p].copy_from_slice(y);
    for (o, (i, j, c)) in o[1 + p..].iter_mut().zip(pairs(p)) {
        *o = y[i] * y[j] * c as f32;
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

/// The definition in f64 for one head's row `x` (d values) and its projection `w` (d × p):
/// [1, y, y_i y_j (i < j), y_i²/√2] with y = x W, the quadratic terms in row order.
pub fn naive_taylor(x: &[f64], w: &[f64]) -> Vec<f64> {
    let p = w.len() / x.len();
    let y: Vec<f64> = (0..p)
        .map(|j| x.iter().enumerate().map(|(i, xi)| xi * w[i * p + j]).sum())
        .collect();
    let mut out = vec![1.0];
    out.extend(&y);
    for i in 0..p {
        out.push(y[i] * y[i] / 2f64.sqrt());
        out.extend((i + 1..p).map(|j| y[i] * y[j]));
    }
    out
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

    /// The taylor map, tensor form and slice form, against its definition, and its point:
    /// φ(a)·φ(b) = 1 + u + u²/2 with u = (aW)·(bW).
    #[test]
    fn taylor_matches_its_definition_and_its_dot_products_are_exps_polynomial() {
        let dev = Device::Cpu;
        let (n, d, p) = (3, 4, 5);
        let f = taylor_features(p);
        assert_eq!((f, taylor_features(16)), (21, 153));
        assert_eq!(
            [21, 153, 154, 1].map(taylor_projection),
            [Some(5), Some(16), None, None]
        );
        let w = Tensor::randn(0f64, 1.0, (n, d, p), &dev).unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 5, n * d), &dev).unwrap();
        let map = FeatureMap::Taylor {
            q: w.clone(),
            k: w.clone(),
        };
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ws: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f64> = xs
            .chunks(d)
            .enumerate()
            .flat_map(|(i, xh)| naive_taylor(xh, &ws[i % n * d * p..][..d * p]))
            .collect();
        for exec in [Exec::Train, Exec::Infer] {
            let got = map.apply(&x, Role::Key, exec).unwrap();
            assert_eq!(got.dims(), &[2, 5, n * f]);
            let got: Vec<f64> = got.flatten_all().unwrap().to_vec1().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{exec:?}: {a} vs {b}");
            }
        }
        let map32 = FeatureMap::Taylor {
            q: w.to_dtype(DType::F32).unwrap(),
            k: w.to_dtype(DType::F32).unwrap(),
        };
        let xs32: Vec<f32> = xs.iter().map(|&a| a as f32).collect();
        let rows = map32.apply_rows(&xs32, 10, Role::Query).unwrap();
        assert_eq!(rows.len(), want.len());
        for (a, b) in rows.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                "rows: {a} vs {b}"
            );
        }
        // Two heads' rows a and b of the same head's map.
        let (a, b) = (&want[..f], &want[n * f..][..f]);
        let u: f64 = a[1..=p].iter().zip(&b[1..=p]).map(|(x, y)| x * y).sum();
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(
            (dot - (1.0 + u + u * u / 2.0)).abs() < 1e-9,
            "{dot} vs u = {u}"
        );
    }
}
