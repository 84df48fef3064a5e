//! GroupNorm with one group per head and no affine: each token's per-head output to zero mean
//! and unit variance over its d_v values. One implementation, [`normalize_rows`]: the slice
//! forms call it directly, the training form through a candle op with its own backward, which
//! runs blocks of rows as tasks on rayon's threads both ways.

use super::fused::with_slices;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

/// Rows (one head's d_v values of one token) per rayon task of the training op.
const ROWS_PER_TASK: usize = 64;

pub const EPS: f64 = 1e-5;

/// A row's mean and σ = sqrt(var + ε), in the element type, with the operations in the order
/// candle's composed form took them (the mean as a sum times 1/d), so that models score
/// exactly as they did before this kernel. The forward and the backward both use it.
fn stats<T: WithDType>(row: &[T]) -> (T, T) {
    let inv_d = T::from_f64(1.0 / row.len() as f64);
    let mut sum = T::from_f64(0.0);
    row.iter().for_each(|&a| sum += a);
    let mean = sum * inv_d;
    let mut squares = T::from_f64(0.0);
    row.iter().for_each(|&a| squares += (a - mean) * (a - mean));
    // sqrt through f64 rounds to the same f32 as an f32 sqrt would.
    let sigma = T::from_f64((squares * inv_d + T::from_f64(EPS)).to_f64().sqrt());
    (mean, sigma)
}

/// Normalizes every row of `d` values in place: (x − mean) / σ, the division last.
pub fn normalize_rows<T: WithDType>(x: &mut [T], d: usize) {
    for row in x.chunks_exact_mut(d) {
        let (mean, sigma) = stats(row);
        row.iter_mut().for_each(|a| *a = (*a - mean) / sigma);
    }
}

/// The gradient of [`normalize_rows`]: for y = (x − μ)/σ and incoming g,
/// dx = (g − mean(g) − y·mean(g·y)) / σ, row by row in one pass.
fn normalize_rows_grad<T: WithDType>(x: &[T], y: &[T], g: &[T], d: usize, dx: &mut [T]) {
    let rows = x
        .chunks_exact(d)
        .zip(y.chunks_exact(d))
        .zip(g.chunks_exact(d));
    for (((xr, yr), gr), dxr) in rows.zip(dx.chunks_exact_mut(d)) {
        let (_, sigma) = stats(xr);
        let sigma = sigma.to_f64();
        let g_mean = gr.iter().map(|a| a.to_f64()).sum::<f64>() / d as f64;
        let gy_mean = gr
            .iter()
            .zip(yr)
            .map(|(a, b)| a.to_f64() * b.to_f64())
            .sum::<f64>()
            / d as f64;
        for ((o, a), b) in dxr.iter_mut().zip(gr).zip(yr) {
            *o = T::from_f64((a.to_f64() - g_mean - b.to_f64() * gy_mean) / sigma);
        }
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
            y.par_chunks_mut(d * ROWS_PER_TASK)
                .for_each(|rows| normalize_rows(rows, d));
            y
        }
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(run(&x[start..end], d)),
            CpuStorage::F64(x) => CpuStorage::F64(run(&x[start..end], d)),
            _ => candle_core::bail!("group norm: only f32 and f64 tensors"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = x.dim(D::Minus1)?;
        let g = g.contiguous()?;
        fn run<T: WithDType>(x: &[T], y: &[T], g: &[T], d: usize) -> Vec<T> {
            let n = d * ROWS_PER_TASK;
            let mut dx = vec![T::zero(); x.len()];
            dx.par_chunks_mut(n)
                .zip(x.par_chunks(n).zip(y.par_chunks(n)).zip(g.par_chunks(n)))
                .for_each(|(dx, ((x, y), g))| normalize_rows_grad(x, y, g, d, dx));
            dx
        }
        fn grad<T: WithDType>(ts: [&Tensor; 3], d: usize) -> candle_core::Result<Tensor> {
            let dx = with_slices(ts, |[x, y, g]: [&[T]; 3]| run(x, y, g, d))?;
            Tensor::from_vec(dx, ts[0].shape(), ts[0].device())
        }
        let dx = match x.dtype() {
            DType::F32 => grad::<f32>([x, y, &g], d)?,
            DType::F64 => grad::<f64>([x, y, &g], d)?,
            dt => candle_core::bail!("group norm: unsupported dtype {dt:?}"),
        };
        Ok(Some(dx))
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
