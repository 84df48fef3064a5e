//! RMSNorm: x / sqrt(mean(x²) + eps) · w.
//!
//! Training runs it as one op with its own backward: composed from candle ops it was seven
//! passes forward (each a fresh tensor on one core) and about twice that backward, w's gradient
//! a strided reduction over every row, on the input of every attention and MLP. Here rows are
//! tasks on rayon's threads both ways; the backward reads x, w and dy, recomputes each row's
//! 1/rms r, and writes dx = r·(dy ⊙ w) − x·r³·⟨dy ⊙ w, x⟩/D and dw = Σ_rows dy ⊙ x·r. Every
//! value is rounded as the composed ops rounded it and summed in their order, so training is
//! unchanged to the bit (20-step losses of `--recipe supra` and `transfer+finetune`).

use crate::attention::Exec;
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    pub fn forward(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        let x = x.contiguous()?;
        // candle-nn's kernel has no f64 (models run in f64 as references): ours has.
        if exec == Exec::Train || x.dtype() == candle_core::DType::F64 {
            let op = Fused {
                eps: f64::from(self.eps),
            };
            // x enters twice: its gradient's two parts (through x/rms and through rms) come
            // back separately, added to the rest of x's gradient in the order the composed
            // ops added them, so training's losses stay the same to the bit.
            return Ok(x.apply_op3(&x, &self.weight.contiguous()?, op)?);
        }
        Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?)
    }
}

/// Rows per rayon task (a row is the hidden size, a few hundred values), and columns per task
/// of w's gradient.
const ROWS_PER_TASK: usize = 16;
const COLUMNS_PER_TASK: usize = 64;

/// Σ a ⊙ b in index order, as candle's reductions add.
fn dot<T: WithDType>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
}

/// Per row, what the composed form computed, rounded as it rounded each step: s = sqrt(Σx²·(1/D)
/// + eps) and 1/s. The scale and eps are f32 in f32 as candle's affine makes them.
fn rms<T: WithDType>(x: &[T], eps: f64) -> (T, T) {
    let scale = T::from_f64(1.0 / x.len() as f64);
    let s = T::from_f64((dot(x, x) * scale + T::from_f64(eps)).to_f64().sqrt());
    (s, T::one() / s)
}

/// Training's RMSNorm: (x, x, w) → y.
struct Fused {
    eps: f64,
}

/// The last dimension and element range of a contiguous operand.
fn rows(l: &Layout, what: &str) -> candle_core::Result<(usize, (usize, usize))> {
    let d = *l.shape().dims().last().unwrap_or(&0);
    match l.contiguous_offsets() {
        Some(range) if d > 0 => Ok((d, range)),
        _ => candle_core::bail!(
            "rms_norm: {what} must be contiguous with a non-empty last dimension"
        ),
    }
}

fn forward<T: WithDType>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(y, x)| {
            for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (_, inv) = rms(x, eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * inv * w;
                }
            }
        });
    y
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        _: &CpuStorage,
        _: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (d, (a, b)) = rows(xl, "x")?;
        let (_, (c, e)) = rows(wl, "w")?;
        if wl.shape().dims() != [d] {
            candle_core::bail!("rms_norm: x {:?} against w {:?}", xl.shape(), wl.shape());
        }
        let y = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(forward(&x[a..b], &w[c..e], self.eps))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(forward(&x[a..b], &w[c..e], self.eps))
            }
            _ => candle_core::bail!(
                "rms_norm: x is {:?} and w {:?}; both f32 or both f64",
                xs.dtype(),
                ws.dtype()
            ),
        };
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _x2: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let rows = x.elem_count() / d;
        let all =
            x.apply_op3_no_bwd(&w.detach(), &dy.contiguous()?, &Backward { eps: self.eps })?;
        let part = |i: usize| -> candle_core::Result<Option<Tensor>> {
            match x.track_op() {
                true => Ok(Some(all.narrow(0, i * rows, rows)?.reshape(x.shape())?)),
                false => Ok(None),
            }
        };
        let dw = match w.track_op() {
            true => Some(all.narrow(0, 2 * rows, 1)?.reshape(d)?),
            false => None,
        };
        Ok((part(0)?, part(1)?, dw))
    }
}

/// (x, w, dy) → (2·rows + 1, D): x's gradient through x/rms, then through rms, then dw.
struct Backward {
    eps: f64,
}

fn backward<T: WithDType>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let n = x.len();
    let mut out = vec![T::zero(); 2 * n + d];
    let (dx, dw) = out.split_at_mut(2 * n);
    let (dx, dx2) = dx.split_at_mut(n);
    let (half, two, scale) = (
        T::from_f64(0.5),
        T::from_f64(2.0),
        T::from_f64(1.0 / d as f64),
    );
    // The composed form's backward, step by step: g = dy ⊙ w; through 1/s, sqrt, the affines
    // and the sum to x², rounded in the same order.
    dx.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(dx2.par_chunks_mut(d * ROWS_PER_TASK))
        .zip(
            x.par_chunks(d * ROWS_PER_TASK)
                .zip(dy.par_chunks(d * ROWS_PER_TASK)),
        )
        .for_each(|((dx, dx2), (x, dy))| {
            let mut g = vec![T::zero(); d];
            for ((dx, dx2), (x, dy)) in dx
                .chunks_exact_mut(d)
                .zip(dx2.chunks_exact_mut(d))
                .zip(x.chunks_exact(d).zip(dy.chunks_exact(d)))
            {
                let (s, inv) = rms(x, eps);
                g.iter_mut()
                    .zip(dy.iter().zip(w))
                    .for_each(|(g, (&dy, &w))| *g = dy * w);
                let d_inv = dot(&g, x);
                let d_s = T::zero() - d_inv / (s * s);
                let d_sum = d_s / s * half * scale;
                for i in 0..d {
                    dx[i] = g[i] * inv;
                    dx2[i] = x[i] * d_sum * two;
                }
            }
        });
    // dw = Σ_rows dy ⊙ (x / rms), each column summed over the rows in order, as candle's
    // reduction over the broadcast dimensions adds; columns in blocks on rayon's threads.
    let inv: Vec<T> = x.par_chunks_exact(d).map(|x| rms(x, eps).1).collect();
    dw.par_chunks_mut(COLUMNS_PER_TASK)
        .enumerate()
        .for_each(|(blk, dw)| {
            let c0 = blk * COLUMNS_PER_TASK;
            for (r, &inv) in inv.iter().enumerate() {
                let (x, dy) = (&x[r * d + c0..], &dy[r * d + c0..]);
                for (j, dw) in dw.iter_mut().enumerate() {
                    *dw += dy[j] * (x[j] * inv);
                }
            }
        });
    out
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (d, (a, b)) = rows(xl, "x")?;
        let (_, (c, e)) = rows(wl, "w")?;
        let (_, (f, h)) = rows(gl, "dy")?;
        if xl.shape() != gl.shape() || wl.shape().dims() != [d] {
            candle_core::bail!(
                "rms_norm backward: x {:?}, w {:?}, dy {:?}",
                xl.shape(),
                wl.shape(),
                gl.shape()
            );
        }
        let out = match (xs, ws, gs) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward(&x[a..b], &w[c..e], &g[f..h], self.eps))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(g)) => {
                CpuStorage::F64(backward(&x[a..b], &w[c..e], &g[f..h], self.eps))
            }
            _ => candle_core::bail!("rms_norm backward: mixed dtypes"),
        };
        let rows = (b - a) / d;
        Ok((out, Shape::from((2 * rows + 1, d))))
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_matches_composed, randn_in, tensor_rel_err};
    use candle_core::{DType, Device, Var};

    /// The definition in candle ops, differentiable.
    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let ms = x
            .sqr()
            .unwrap()
            .mean_keepdim(candle_core::D::Minus1)
            .unwrap();
        let inv = (ms + eps).unwrap().sqrt().unwrap().recip().unwrap();
        x.broadcast_mul(&inv).unwrap().broadcast_mul(w).unwrap()
    }

    /// Training's op against the definition, values and both gradients, f32 and f64, with a
    /// row count that does not fill a task and a width that is not a multiple of 8; and the
    /// inference kernel against it.
    #[test]
    fn matches_the_definition_and_its_gradients() {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&randn_in(dtype, 0.0, 2.0, &[2, 37, 21])).unwrap();
            let w = Var::from_tensor(&randn_in(dtype, 1.0, 2.0, &[21])).unwrap();
            let r = randn_in(dtype, 0.0, 2.0, &[2, 37, 21]);
            let norm = RmsNorm::new(w.as_tensor().clone(), 1e-5);
            let ours = norm.forward(x.as_tensor(), Exec::Train).unwrap();
            let want = composed(x.as_tensor(), w.as_tensor(), 1e-5);
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-13 };
            if dtype == DType::F32 {
                let fused = norm.forward(x.as_tensor(), Exec::Infer).unwrap();
                assert!(tensor_rel_err(&fused, &want) < tol);
            }
            let what = format!("{dtype:?}");
            assert_matches_composed((ours, want), &[&x, &w], &r, (tol, tol * 10.0), &what);
        }
    }

    /// A frozen weight gets no gradient computed, and a frozen input none either.
    #[test]
    fn frozen_operands_get_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::new(&[[1f32, 2.0, 3.0], [3.0, 4.0, -1.0]], &dev).unwrap();
        let w = Tensor::new(&[1f32, 0.5, 2.0], &dev).unwrap();
        let op = Fused { eps: 1e-5 };
        let xt = x.as_tensor();
        let y = xt.apply_op3(xt, &w, Fused { eps: 1e-5 }).unwrap();
        let dy = Tensor::ones_like(&y).unwrap();
        let (dx, dx2, dw) = op.bwd(xt, xt, &w, &y, &dy).unwrap();
        assert!(dx.is_some() && dx2.is_some() && dw.is_none());
        let w = Var::from_tensor(&w).unwrap();
        let x = xt.detach();
        let (dx, dx2, dw) = op.bwd(&x, &x, &w, &y, &dy).unwrap();
        assert!(dx.is_none() && dx2.is_none() && dw.is_some());
        assert!(dx.is_none() && dw.is_some());
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let norm = |w: Tensor| RmsNorm::new(w, 1e-5).forward(&x, Exec::Train);
        assert!(norm(Tensor::zeros(5, DType::F32, &dev).unwrap()).is_err());
        assert!(norm(Tensor::zeros(4, DType::F64, &dev).unwrap()).is_err());
    }
}
