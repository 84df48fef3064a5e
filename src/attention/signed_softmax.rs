//! [softmax(y), softmax(−y)] over the last dimension: Hedgehog's φ after its per-head
//! projection, as one op with a one-pass backward.
//!
//! Composed from candle ops it was two softmaxes (max, shift, exp, sum, divide), a negation and
//! a concatenation, each a fresh tensor on one core, and about twice as many ops backward, on
//! every query and key of every layer. Here each row is one task on rayon's threads both ways;
//! the backward reads only the output s and its gradient g:
//! dy = s⁺ ⊙ (g⁺ − ⟨s⁺, g⁺⟩) − s⁻ ⊙ (g⁻ − ⟨s⁻, g⁻⟩).

use crate::attention::softmax::exp_shifted;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// y (…, d) → (…, 2d); f32 or f64.
pub fn signed_softmax(y: &Tensor) -> anyhow::Result<Tensor> {
    Ok(y.contiguous()?.apply_op1(SignedSoftmax)?)
}

/// One row: out[..d] = softmax(y), out[d..] = softmax(−y). `exp_sum` replaces x by exp(x − m)
/// and returns the sum.
pub fn signed_softmax_row<T: WithDType>(y: &[T], out: &mut [T], exp_sum: fn(&mut [T], T) -> T) {
    let (pos, neg) = out.split_at_mut(y.len());
    pos.copy_from_slice(y);
    neg.iter_mut().zip(y).for_each(|(n, &v)| *n = T::zero() - v);
    for half in [pos, neg] {
        let m = half
            .iter()
            .copied()
            .fold(half[0], |a, b| if b > a { b } else { a });
        let sum = exp_sum(half, m);
        half.iter_mut().for_each(|a| *a /= sum);
    }
}

fn exp_sum_f64(row: &mut [f64], m: f64) -> f64 {
    row.iter_mut()
        .map(|a| {
            *a = (*a - m).exp();
            *a
        })
        .sum()
}

/// Rows per rayon task: a row is 2d values, too little work alone.
const ROWS_PER_TASK: usize = 64;

struct SignedSoftmax;

/// The last dimension and the element range of a contiguous input.
fn rows(l: &Layout) -> candle_core::Result<(usize, (usize, usize))> {
    let d = *l.shape().dims().last().unwrap_or(&0);
    match l.contiguous_offsets() {
        Some(range) if d > 0 => Ok((d, range)),
        _ => {
            candle_core::bail!("signed_softmax: a contiguous input with a non-empty last dimension")
        }
    }
}

fn forward<T: WithDType>(y: &[T], d: usize, exp_sum: fn(&mut [T], T) -> T) -> Vec<T> {
    let mut out = vec![T::zero(); 2 * y.len()];
    out.par_chunks_mut(2 * d * ROWS_PER_TASK)
        .zip(y.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(o, y)| {
            for (o, y) in o.chunks_exact_mut(2 * d).zip(y.chunks_exact(d)) {
                signed_softmax_row(y, o, exp_sum);
            }
        });
    out
}

impl CustomOp1 for SignedSoftmax {
    fn name(&self) -> &'static str {
        "signed-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (d, (a, b)) = rows(l)?;
        let out = match s {
            CpuStorage::F32(y) => CpuStorage::F32(forward(&y[a..b], d, exp_shifted)),
            CpuStorage::F64(y) => CpuStorage::F64(forward(&y[a..b], d, exp_sum_f64)),
            other => candle_core::bail!("signed_softmax: {:?}, not f32 or f64", other.dtype()),
        };
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("checked non-empty") *= 2;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, _y: &Tensor, s: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(s.apply_op2_no_bwd(&g.contiguous()?, &Backward)?))
    }
}

/// (s, g) of the forward's output → dy.
struct Backward;

fn backward<T: WithDType>(s: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut dy = vec![T::zero(); s.len() / 2];
    let dot = |a: &[T], b: &[T]| a.iter().zip(b).fold(T::zero(), |acc, (&x, &y)| acc + x * y);
    dy.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(
            s.par_chunks(2 * d * ROWS_PER_TASK)
                .zip(g.par_chunks(2 * d * ROWS_PER_TASK)),
        )
        .for_each(|(dy, (s, g))| {
            for (dy, (s, g)) in dy
                .chunks_exact_mut(d)
                .zip(s.chunks_exact(2 * d).zip(g.chunks_exact(2 * d)))
            {
                let ((sp, sn), (gp, gn)) = (s.split_at(d), g.split_at(d));
                let (cp, cn) = (dot(sp, gp), dot(sn, gn));
                for i in 0..d {
                    dy[i] = sp[i] * (gp[i] - cp) - sn[i] * (gn[i] - cn);
                }
            }
        });
    dy
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "signed-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        sl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (two_d, (a, b)) = rows(sl)?;
        let (_, (c, e)) = rows(gl)?;
        if sl.shape() != gl.shape() || two_d % 2 != 0 {
            candle_core::bail!(
                "signed_softmax backward: s {:?}, g {:?}",
                sl.shape(),
                gl.shape()
            );
        }
        let d = two_d / 2;
        let dy = match (s, g) {
            (CpuStorage::F32(s), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward(&s[a..b], &g[c..e], d))
            }
            (CpuStorage::F64(s), CpuStorage::F64(g)) => {
                CpuStorage::F64(backward(&s[a..b], &g[c..e], d))
            }
            _ => candle_core::bail!(
                "signed_softmax backward: s {:?}, g {:?}",
                s.dtype(),
                g.dtype()
            ),
        };
        let mut dims = sl.shape().dims().to_vec();
        *dims.last_mut().expect("checked non-empty") = d;
        Ok((dy, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_matches_composed, randn_in};
    use candle_core::{DType, Var, D};

    /// Values and gradients against candle's composed softmaxes, f32 and f64, with rows that
    /// do not fill a task.
    #[test]
    fn matches_the_composed_softmaxes_and_their_gradients() {
        for dtype in [DType::F32, DType::F64] {
            let y = Var::from_tensor(&randn_in(dtype, 0.0, 3.0, &[3, 67, 8])).unwrap();
            let r = randn_in(dtype, 0.0, 1.0, &[3, 67, 16]);
            let ours = signed_softmax(y.as_tensor()).unwrap();
            let sm = |t: &Tensor| candle_nn::ops::softmax(t, D::Minus1).unwrap();
            let theirs =
                Tensor::cat(&[sm(y.as_tensor()), sm(&y.as_tensor().neg().unwrap())], 2).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-13 };
            let what = format!("{dtype:?}");
            assert_matches_composed((ours, theirs), &[&y], &r, (tol, tol * 10.0), &what);
        }
    }
}
