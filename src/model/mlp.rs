//! SwiGLU feed-forward: down(silu(gate(x)) ⊙ up(x)).
//!
//! Training runs silu(g) ⊙ u as one op with its own backward: composed from candle ops it was
//! a silu (exp, add, divide) and a product forward, about eight passes backward, each a fresh
//! tensor on one core, over the widest activations of the model. Here both ways are one pass on
//! rayon's threads, each value rounded as the composed ops rounded it (training's losses do not
//! move); with s = sigmoid(g) the backward writes dg = dy ⊙ u ⊙ (s·(1 − silu(g)) + silu(g))
//! and du = dy ⊙ silu(g).

use crate::attention::Exec;
use crate::model::expf::exp_in_place;
use crate::model::linear::Linear;
use crate::model::spin;
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        let [g, u]: [Tensor; 2] = Linear::forward_each(&[&self.gate, &self.up], x, exec)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("two products give two outputs"))?;
        let h = match exec {
            Exec::Train => g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)?,
            Exec::Infer => swiglu_infer(&g, &u)?,
        };
        self.down.forward(&h, exec)
    }
}

/// Inference's silu(g) ⊙ u with the composed candle ops' values, split across the cores by
/// the spin pool: candle's two ops ran one after the other on one core while the other core
/// waited (in a decoding step of a batch, a few percent of the step), and rayon's wake-up would
/// cost as much as a step's few rows.
fn swiglu_infer(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dtype() != candle_core::DType::F32 || g.shape() != u.shape() {
        return Ok((candle_nn::ops::silu(g)? * u)?);
    }
    let (gv, uv): (Vec<f32>, Vec<f32>) = (g.flatten_all()?.to_vec1()?, u.flatten_all()?.to_vec1()?);
    let mut h = vec![0f32; gv.len()];
    let dst = spin::OutPtr(h.as_mut_ptr());
    spin::for_each_part(&|part| {
        let at = spin::split(gv.len(), 16, part);
        let mut y = vec![0f32; at.len()];
        swiglu_into(&mut y, &gv[at.clone()], &uv[at.clone()]);
        // SAFETY: the parts' ranges are disjoint and inside `h`, which outlives the call.
        unsafe { dst.write(at.start, &y) };
    });
    Ok(Tensor::from_vec(h, g.shape(), g.device())?)
}

/// Values per rayon task.
const PER_TASK: usize = 8192;

/// The element types the fused op runs on.
trait Float: WithDType {
    /// x ← e^x over a slice.
    fn exp_all(xs: &mut [Self]);
}

impl Float for f32 {
    /// libm's own values, in vector lanes.
    fn exp_all(xs: &mut [Self]) {
        exp_in_place(xs)
    }
}

impl Float for f64 {
    fn exp_all(xs: &mut [Self]) {
        for x in xs {
            *x = x.exp();
        }
    }
}

/// e ← e^(−g): the one exp of silu(g) = g / (1 + e^(−g)) and of sigmoid(g) = 1 / (e^(−g) + 1),
/// both as candle computes them.
fn exp_neg<T: Float>(e: &mut [T], g: &[T]) {
    for (e, &g) in e.iter_mut().zip(g) {
        *e = T::zero() - g;
    }
    T::exp_all(e);
}

/// (g, u) → silu(g) ⊙ u.
struct SwiGlu;

/// The element ranges of two contiguous operands of the same shape.
fn same_shape(a: &Layout, b: &Layout) -> candle_core::Result<((usize, usize), (usize, usize))> {
    match (a.contiguous_offsets(), b.contiguous_offsets()) {
        (Some(ra), Some(rb)) if a.shape() == b.shape() => Ok((ra, rb)),
        _ => candle_core::bail!(
            "swiglu: operands must be contiguous and of one shape, got {:?} and {:?}",
            a.shape(),
            b.shape()
        ),
    }
}

fn forward<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let mut h = vec![T::zero(); g.len()];
    h.par_chunks_mut(PER_TASK)
        .zip(g.par_chunks(PER_TASK).zip(u.par_chunks(PER_TASK)))
        .for_each(|(h, (g, u))| swiglu_into(h, g, u));
    h
}

/// h = silu(g) ⊙ u, value by value: both forms' one definition.
fn swiglu_into<T: Float>(h: &mut [T], g: &[T], u: &[T]) {
    exp_neg(h, g);
    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
        *h = g / (T::one() + *h) * u;
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((a, b), (c, d)) = same_shape(gl, ul)?;
        let h = match (gs, us) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(forward(&g[a..b], &u[c..d]))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u)) => {
                CpuStorage::F64(forward(&g[a..b], &u[c..d]))
            }
            _ => candle_core::bail!(
                "swiglu: g is {:?} and u {:?}; both f32 or both f64",
                gs.dtype(),
                us.dtype()
            ),
        };
        Ok((h, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass writes dg and du stacked: (2, …).
        let both = g.apply_op3_no_bwd(&u.detach(), &dh.contiguous()?, &Backward)?;
        let grad = |i: usize, of: &Tensor| -> candle_core::Result<Option<Tensor>> {
            match of.track_op() {
                true => Ok(Some(both.get(i)?.reshape(of.shape())?)),
                false => Ok(None),
            }
        };
        Ok((grad(0, g)?, grad(1, u)?))
    }
}

/// (g, u, dh) → (2, n): dg, then du.
struct Backward;

fn backward<T: Float>(g: &[T], u: &[T], dh: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(PER_TASK)
        .zip(du.par_chunks_mut(PER_TASK))
        .zip(
            g.par_chunks(PER_TASK)
                .zip(u.par_chunks(PER_TASK).zip(dh.par_chunks(PER_TASK))),
        )
        .for_each(|((dg, du), (g, (u, dh)))| {
            // Rounded as candle's backward of silu and of the product: s = 1 / (e^(−g) + 1),
            // silu'(g) = s·(1 − silu(g)) + silu(g). dg holds e^(−g) until overwritten.
            exp_neg(dg, g);
            for i in 0..g.len() {
                let h = g[i] / (T::one() + dg[i]);
                let s = T::one() / (dg[i] + T::one());
                dg[i] = dh[i] * u[i] * (s * (T::one() - h) + h);
                du[i] = dh[i] * h;
            }
        });
    out
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((a, b), (c, d)) = same_shape(gl, ul)?;
        let (_, (e, f)) = same_shape(gl, hl)?;
        let out = match (gs, us, hs) {
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(h)) => {
                CpuStorage::F32(backward(&g[a..b], &u[c..d], &h[e..f]))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u), CpuStorage::F64(h)) => {
                CpuStorage::F64(backward(&g[a..b], &u[c..d], &h[e..f]))
            }
            _ => candle_core::bail!("swiglu backward: mixed dtypes"),
        };
        let mut dims = vec![2];
        dims.extend_from_slice(gl.shape().dims());
        Ok((out, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_matches_composed, randn_in};
    use candle_core::{DType, Device, Var};

    /// The op against candle's composed silu and product, values and both gradients, f32 and
    /// f64, on a size that does not fill a task.
    #[test]
    fn matches_candles_silu_product_and_its_gradients() {
        for dtype in [DType::F32, DType::F64] {
            let g = Var::from_tensor(&randn_in(dtype, 0.0, 3.0, &[3, 41, 97])).unwrap();
            let u = Var::from_tensor(&randn_in(dtype, 0.0, 3.0, &[3, 41, 97])).unwrap();
            let r = randn_in(dtype, 0.0, 3.0, &[3, 41, 97]);
            let ours = g.as_tensor().apply_op2(u.as_tensor(), SwiGlu).unwrap();
            let want = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-13 };
            let what = format!("{dtype:?}");
            assert_matches_composed((ours, want), &[&g, &u], &r, (tol, tol * 10.0), &what);
        }
    }

    /// Inference's form gives the composed candle ops' values to the bit (a decoding step's
    /// few rows and a prompt's many).
    #[test]
    fn inference_form_is_candles_values() {
        for dims in [[1usize, 3, 1536], [2, 37, 97]] {
            let g = randn_in(DType::F32, 0.0, 3.0, &dims);
            let u = randn_in(DType::F32, 0.0, 3.0, &dims);
            let ours: Vec<f32> = swiglu_infer(&g, &u)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = (g.silu().unwrap() * &u)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(ours, want, "{dims:?}");
        }
    }

    /// A frozen operand gets no gradient.
    #[test]
    fn frozen_operands_get_no_gradient() {
        let dev = Device::Cpu;
        let g = Var::new(&[1f32, -2.0, 0.5], &dev).unwrap();
        let u = Tensor::new(&[0.3f32, 1.0, -1.0], &dev).unwrap();
        let h = g.as_tensor().apply_op2(&u, SwiGlu).unwrap();
        let dh = Tensor::ones_like(&h).unwrap();
        let (dg, du) = SwiGlu.bwd(g.as_tensor(), &u, &h, &dh).unwrap();
        assert!(dg.is_some() && du.is_none());
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let dev = Device::Cpu;
        let g = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(g
            .apply_op2(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap(), SwiGlu)
            .is_err());
        assert!(g
            .apply_op2(&Tensor::zeros((2, 4), DType::F64, &dev).unwrap(), SwiGlu)
            .is_err());
    }
}
