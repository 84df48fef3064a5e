//! GroupNorm with one group per head and no affine: each token's per-head output to zero mean
//! and unit variance over its d_v values. One implementation, [`normalize_rows`]: the slice
//! forms call it directly, the training form through a candle op with its own backward.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType, D};

pub const EPS: f64 = 1e-5;

/// Normalizes every row of `d` values in place. In the element type, with the operations in
/// the order candle's composed form took them (the mean as a sum times 1/d, the division last),
/// so that models score exactly as they did before this kernel.
pub fn normalize_rows<T: WithDType>(x: &mut [T], d: usize) {
    let inv_d = T::from_f64(1.0 / d as f64);
    let eps = T::from_f64(EPS);
    for row in x.chunks_exact_mut(d) {
        let mut sum = T::from_f64(0.0);
        row.iter().for_each(|&a| sum += a);
        let mean = sum * inv_d;
        row.iter_mut().for_each(|a| *a -= mean);
        let mut squares = T::from_f64(0.0);
        row.iter().for_each(|&a| squares += a * a);
        // sqrt through f64 rounds to the same f32 as an f32 sqrt would.
        let sigma = T::from_f64((squares * inv_d + eps).to_f64().sqrt());
        row.iter_mut().for_each(|a| *a /= sigma);
    }
}

/// [`normalize_rows`] over the last dimension of `x`, differentiable.
pub fn group_norm(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GroupNorm)?)
}

struct GroupNorm;

impl CustomOp1 for GroupNorm {
    fn name(&self) -> &'static str {
        "supra-group-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *layout.dims().last().unwrap_or(&1);
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("group norm: input not contiguous".into()))?;
        fn run<T: WithDType>(x: &[T], d: usize) -> Vec<T> {
            let mut y = x.to_vec();
            normalize_rows(&mut y, d);
            y
        }
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(run(&x[start..end], d)),
            CpuStorage::F64(x) => CpuStorage::F64(run(&x[start..end], d)),
            _ => candle_core::bail!("group norm: only f32 and f64 tensors"),
        };
        Ok((out, layout.shape().clone()))
    }

    /// y = (x − μ)/σ ⇒ dx = (g − mean(g) − y·mean(g·y)) / σ.
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_sigma = (var + EPS)?.sqrt()?.recip()?;
        let g_mean = g.mean_keepdim(D::Minus1)?;
        let gy_mean = (g * y)?.mean_keepdim(D::Minus1)?;
        let dx = (g.broadcast_sub(&g_mean)? - y.broadcast_mul(&gy_mean)?)?;
        Ok(Some(dx.broadcast_mul(&inv_sigma)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::supra::naive;
    use candle_core::{Device, Var};

    #[test]
    fn forward_matches_the_definition_and_backward_finite_differences() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (2, 3, 5, 6), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f64, 1.0, (2, 3, 5, 6), &dev).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let want = naive::group_norm(&flat(x.as_tensor()), 6, EPS);
        let got = flat(&group_norm(x.as_tensor()).unwrap());
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "forward {err}");

        let loss = |x: &Tensor| {
            (group_norm(x).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (group_norm(x.as_tensor()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = flat(grads.get(&x).unwrap());
        let base = flat(x.as_tensor());
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, (2, 3, 5, 6), &dev).unwrap())
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!(
                (numeric - analytic[i]).abs() < 1e-6 * numeric.abs().max(1.0),
                "element {i}: {numeric} vs {}",
                analytic[i]
            );
        }
    }
}
