//! y = x·Wᵀ for training, with a backward of its own.
//!
//! candle's product broadcasts W over the batch and transposes it, so its backward computes
//! W's gradient as (1, in, out), sums it over that batch of one and copies it transposed, each a
//! pass over the whole matrix on one core into fresh pages; and it computes W's gradient even
//! when W is frozen (every base weight under LoRA). Here the backward writes dW = dyᵀ·x straight
//! in W's (out, in) layout and computes only the gradients that reach a variable.

use crate::attention::supra::fused::{slice, with_slices};
use crate::model::gemm::{product_threaded, transposed_product_threaded, Strided};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

struct MatmulWt;

/// x (…, in) · Wᵀ for W (out, in): (…, out); f32 or f64.
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> anyhow::Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, MatmulWt)?)
}

/// y (rows × out) = x (rows × in) · Wᵀ for W (out × in), both row-major, on rayon's threads.
fn product<T: WithDType>(x: &[T], w: &[T], (rows, out, inp): (usize, usize, usize)) -> Vec<T> {
    let (lhs, rhs) = (Strided::rows(x, inp), Strided::transposed_rows(w, inp));
    product_threaded((rows, out, inp), lhs, rhs)
}

/// The wanted gradients of y = x·Wᵀ from dy (rows × out): dx = dy·W (rows × in) and
/// dW = dyᵀ·x (out × in), straight in W's layout.
fn gradients<T: WithDType>(
    [dy, x, w]: [&[T]; 3],
    (rows, out, inp): (usize, usize, usize),
    (want_dx, want_dw): (bool, bool),
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let dx = want_dx.then(|| {
        let (lhs, rhs) = (Strided::rows(dy, out), Strided::rows(w, inp));
        product_threaded((rows, inp, out), lhs, rhs)
    });
    let dw =
        want_dw.then(|| transposed_product_threaded((out, inp, rows), dy, Strided::rows(x, inp)));
    (dx, dw)
}

/// (dx, dW) as tensors of x's and W's shapes.
fn as_tensors<T: WithDType>(
    x: &Tensor,
    w: &Tensor,
    (dx, dw): (Option<Vec<T>>, Option<Vec<T>>),
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), x.device()));
    let dw = dw.map(|v| Tensor::from_vec(v, w.shape(), w.device()));
    Ok((dx.transpose()?, dw.transpose()?))
}

impl CustomOp2 for MatmulWt {
    fn name(&self) -> &'static str {
        "matmul-wt"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, inp) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("matmul_wt: operands must be contiguous")
        };
        if dims.last() != Some(&inp) {
            candle_core::bail!("matmul_wt: x {dims:?} against W ({out}, {inp})");
        }
        let rows = xl.shape().elem_count() / inp.max(1);
        let sizes = (rows, out, inp);
        let y = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(product(&x[x0..x1], &w[w0..w1], sizes))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(product(&x[x0..x1], &w[w0..w1], sizes))
            }
            _ => candle_core::bail!(
                "matmul_wt: x is {:?} and W {:?}; both f32 or both f64",
                xs.dtype(),
                ws.dtype()
            ),
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = out;
        Ok((y, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let dims = (x.elem_count() / inp.max(1), out, inp);
        let want = (x.track_op(), w.track_op());
        let dy = dy.contiguous()?;
        let ts = [&dy, x, w];
        // Products into vectors of our own (candle's zeroes its output first), which build
        // no graph.
        match dy.dtype() {
            DType::F32 => {
                let grads = with_slices(ts, |s: [&[f32]; 3]| gradients(s, dims, want))?;
                as_tensors(x, w, grads)
            }
            DType::F64 => {
                let grads = with_slices(ts, |s: [&[f64]; 3]| gradients(s, dims, want))?;
                as_tensors(x, w, grads)
            }
            other => candle_core::bail!("matmul_wt: gradients in f32 or f64, got {other:?}"),
        }
    }
}

/// y + b, then ReLU where `relu`.
struct BiasAdd {
    relu: bool,
}

/// y + b for b (out) along y's last dimension (…, out); f32 or f64. candle's broadcast sums
/// b's gradient on one core while the other waits (a fifth of a cross-entropy step's serial
/// work, from φ's biases); here the rows' blocks are summed on rayon's threads.
pub fn add_bias(y: &Tensor, b: &Tensor) -> anyhow::Result<Tensor> {
    Ok(y.contiguous()?
        .apply_op2(&b.contiguous()?, BiasAdd { relu: false })?)
}

/// ReLU(y + b), the values and gradients of `add_bias(y, b)?.relu()`. candle's ReLU runs on
/// one core both ways and its backward builds a zero tensor, a comparison, a conversion and a
/// product, one pass each, while the other core waits; here each way is one pass on rayon's
/// threads.
pub fn add_bias_relu(y: &Tensor, b: &Tensor) -> anyhow::Result<Tensor> {
    Ok(y.contiguous()?
        .apply_op2(&b.contiguous()?, BiasAdd { relu: true })?)
}

/// Rows a task of the forward, columns a task of the backward.
const BIAS_ROWS: usize = 64;
const BIAS_COLUMNS: usize = 64;

/// candle's ReLU: `max(v, 0)`, NaN to 0.
fn relu<T: WithDType>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

/// Every row of `y` (rows × b.len()) plus `b`, then ReLU where `relu`.
fn plus_rows<T: WithDType>(y: &[T], b: &[T], relu_after: bool) -> Vec<T> {
    let mut out = y.to_vec();
    out.par_chunks_mut(b.len() * BIAS_ROWS).for_each(|block| {
        for row in block.chunks_mut(b.len()) {
            for (o, &c) in row.iter_mut().zip(b) {
                *o += c;
                if relu_after {
                    *o = relu(*o);
                }
            }
        }
    });
    out
}

/// ReLU's backward: `dy` where y + b ≥ 0, else 0 (times 1 or 0, as candle's backward: the
/// same bits, signed zeros included).
fn relu_grad<T: WithDType>(dy: &[T], y: &[T], b: &[T]) -> Vec<T> {
    let mut dx = dy.to_vec();
    let block = b.len() * BIAS_ROWS;
    dx.par_chunks_mut(block)
        .zip(y.par_chunks(block))
        .for_each(|(dx, y)| {
            for (dx, y) in dx.chunks_mut(b.len()).zip(y.chunks(b.len())) {
                for ((d, &y), &c) in dx.iter_mut().zip(y).zip(b) {
                    let open = if y + c >= T::zero() {
                        T::one()
                    } else {
                        T::zero()
                    };
                    *d *= open;
                }
            }
        });
    dx
}

/// The column sums of `dy` (rows × out), the columns split among rayon's threads, each
/// summed over the rows in order from zero: the order of candle's sum, so the same bits.
fn column_sums<T: WithDType>(dy: &[T], out: usize) -> Vec<T> {
    let mut sums = vec![T::zero(); out];
    sums.par_chunks_mut(BIAS_COLUMNS)
        .enumerate()
        .for_each(|(part, sums)| {
            let from = part * BIAS_COLUMNS;
            for row in dy.chunks(out) {
                for (s, &x) in sums.iter_mut().zip(&row[from..]) {
                    *s += x;
                }
            }
        });
    sums
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        match self.relu {
            false => "bias-add",
            true => "bias-add-relu",
        }
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = bl.shape().dims1()?;
        if yl.shape().dims().last() != Some(&out) {
            candle_core::bail!("add_bias: y {:?} against a bias of {out}", yl.shape());
        }
        let relu = self.relu;
        let y = match (ys.dtype(), bs.dtype()) {
            (DType::F32, DType::F32) => {
                CpuStorage::F32(plus_rows(slice::<f32>(ys, yl)?, slice(bs, bl)?, relu))
            }
            (DType::F64, DType::F64) => {
                CpuStorage::F64(plus_rows(slice::<f64>(ys, yl)?, slice(bs, bl)?, relu))
            }
            _ => candle_core::bail!(
                "add_bias: y is {:?} and b {:?}; both f32 or both f64",
                ys.dtype(),
                bs.dtype()
            ),
        };
        Ok((y, yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _sum: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let want = (y.track_op(), b.track_op());
        match dy.dtype() {
            DType::F32 => self.gradients::<f32>(y, b, &dy, want),
            DType::F64 => self.gradients::<f64>(y, b, &dy, want),
            other => candle_core::bail!("add_bias: gradients in f32 or f64, got {other:?}"),
        }
    }
}

impl BiasAdd {
    /// (dy, db) as tensors of y's and b's shapes. Without the ReLU, y's gradient is the
    /// output's as it is: no pass over it.
    fn gradients<T: WithDType>(
        &self,
        y: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        (want_dy, want_db): (bool, bool),
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (masked, db) = with_slices([dy, y, b], |[dy, y, b]: [&[T]; 3]| {
            let masked = (self.relu && (want_dy || want_db)).then(|| relu_grad(dy, y, b));
            let db = want_db.then(|| column_sums(masked.as_deref().unwrap_or(dy), b.len()));
            (masked, db)
        })?;
        let dy = match (want_dy, masked) {
            (false, _) => None,
            (true, Some(m)) => Some(Tensor::from_vec(m, y.shape(), y.device())?),
            (true, None) => Some(dy.clone()),
        };
        let db = db
            .map(|v| Tensor::from_vec(v, b.shape(), b.device()))
            .transpose()?;
        Ok((dy, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_matches_composed, randn_in};
    use candle_core::{DType, Device, Var};

    /// Forward and both gradients against candle's composed product, f32 and f64, on a
    /// (batch, rows, in) input; loss = Σ y ⊙ r for a fixed random r.
    #[test]
    fn matches_candles_product_and_its_gradients() {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&randn_in(dtype, 0.0, 1.0, &[2, 7, 5])).unwrap();
            let w = Var::from_tensor(&randn_in(dtype, 0.0, 1.0, &[3, 5])).unwrap();
            let r = randn_in(dtype, 0.0, 1.0, &[2, 7, 3]);
            let ours = matmul_wt(x.as_tensor(), w.as_tensor()).unwrap();
            let theirs = x
                .as_tensor()
                .broadcast_matmul(&w.as_tensor().t().unwrap())
                .unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-13 };
            let what = format!("{dtype:?}");
            assert_matches_composed((ours, theirs), &[&x, &w], &r, (tol, tol), &what);
        }
    }

    /// The bias op's value and both gradients against candle's broadcast sum, f32 and f64,
    /// with more rows than one block and more columns than one task, the last ones partial.
    #[test]
    fn bias_matches_candles_broadcast_sum() {
        for dtype in [DType::F32, DType::F64] {
            let y = Var::from_tensor(&randn_in(dtype, 0.0, 1.0, &[3, 50, 70])).unwrap();
            let b = Var::from_tensor(&randn_in(dtype, 0.0, 1.0, &[70])).unwrap();
            let r = randn_in(dtype, 0.0, 1.0, &[3, 50, 70]);
            let ours = add_bias(y.as_tensor(), b.as_tensor()).unwrap();
            let theirs = y.as_tensor().broadcast_add(b.as_tensor()).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-13 };
            let what = format!("bias {dtype:?}");
            let grad_b = |t: &Tensor| {
                let g = t.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                let g = g.get(b.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
                g.to_vec1::<f64>().unwrap()
            };
            // The same order of sums as candle's: the same bits, not just close ones.
            assert_eq!(grad_b(&ours), grad_b(&theirs), "{what}");
            assert_matches_composed((ours, theirs), &[&y, &b], &r, (tol, tol), &what);
        }
        let dev = Device::Cpu;
        let y = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(add_bias(&y, &Tensor::zeros(5, DType::F32, &dev).unwrap()).is_err());
    }

    /// The fused ReLU's value and both gradients equal candle's `broadcast_add` then `relu`
    /// to the bit, f32 and f64, with some y + b exactly zero (where candle's backward lets the
    /// gradient through) and some NaN (where it does not).
    #[test]
    fn bias_relu_equals_candles_composition_to_the_bit() {
        let bits = |t: &Tensor| -> Vec<u64> {
            let t = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            t.to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        for dtype in [DType::F32, DType::F64] {
            let (rows, out) = (150, 70);
            let b = randn_in(dtype, 0.0, 1.0, &[out]);
            // Row 3 is −b (exact zeros after the add), one element NaN.
            let mut y = randn_in(dtype, 0.0, 1.0, &[rows, out]);
            let minus_b = b.neg().unwrap().unsqueeze(0).unwrap();
            y = y.slice_assign(&[3..4, 0..out], &minus_b).unwrap();
            let nan = Tensor::full(f32::NAN, (1, 1), &Device::Cpu).unwrap();
            y = y
                .slice_assign(&[5..6, 2..3], &nan.to_dtype(dtype).unwrap())
                .unwrap();
            let (y, b) = (Var::from_tensor(&y).unwrap(), Var::from_tensor(&b).unwrap());
            let r = randn_in(dtype, 0.0, 1.0, &[rows, out]);
            let ours = add_bias_relu(y.as_tensor(), b.as_tensor()).unwrap();
            let theirs = y
                .as_tensor()
                .broadcast_add(b.as_tensor())
                .unwrap()
                .relu()
                .unwrap();
            assert_eq!(bits(&ours), bits(&theirs), "{dtype:?} values");
            // Σ r ⊙ out without the NaN's row, which would make every sum NaN.
            let keep = Tensor::ones((rows, out), dtype, &Device::Cpu).unwrap();
            let zero_row = Tensor::zeros((1, out), dtype, &Device::Cpu).unwrap();
            let r = (r * keep.slice_assign(&[5..6, 0..out], &zero_row).unwrap()).unwrap();
            let grads = |t: &Tensor| t.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let (g1, g2) = (grads(&ours), grads(&theirs));
            for v in [&y, &b] {
                let (a, c) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert_eq!(bits(a), bits(c), "{dtype:?} gradient of {:?}", v.dims());
            }
            let dy = g1.get(&y).unwrap().to_dtype(DType::F64).unwrap();
            let r3 = r.get(3).unwrap().to_dtype(DType::F64).unwrap();
            assert_eq!(
                dy.get(3).unwrap().to_vec1::<f64>().unwrap(),
                r3.to_vec1::<f64>().unwrap(),
                "{dtype:?}: y + b = 0 passes the gradient"
            );
        }
    }

    /// A frozen operand gets no gradient computed: the backward returns None for it.
    #[test]
    fn frozen_operands_get_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.0], [0.5, 2.0], [1.0, 1.0]], &dev).unwrap();
        let y = matmul_wt(x.as_tensor(), &w).unwrap();
        let dy = Tensor::ones_like(&y).unwrap();
        let (dx, dw) = MatmulWt.bwd(x.as_tensor(), &w, &y, &dy).unwrap();
        assert!(dx.is_some() && dw.is_none());
        let (dx, dw) = MatmulWt
            .bwd(
                &x.as_tensor().detach(),
                &Var::from_tensor(&w).unwrap(),
                &y,
                &dy,
            )
            .unwrap();
        assert!(dx.is_none() && dw.is_some());
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(matmul_wt(&x, &Tensor::zeros((3, 5), DType::F32, &dev).unwrap()).is_err());
        assert!(matmul_wt(&x, &Tensor::zeros((3, 4), DType::F64, &dev).unwrap()).is_err());
    }
}
