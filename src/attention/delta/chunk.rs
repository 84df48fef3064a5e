//! The training form, differentiable: chunks of C tokens, the state Z (d' × d_v) carried across
//! them. Inside a chunk the recurrence's new values solve one triangular system (the WY form of
//! DeltaNet's chunked algorithm): with rows i = 1..C, Z₀ the state before the chunk,
//!
//! ```text
//! A_ij = β_i γ^(i−j) k̂_i·k̂_j  (j < i, else 0)        T = (I + A)⁻¹   (unit lower triangular)
//! U = T (β ⊙ V) − T (β γ^i ⊙ K̂) Z₀                    (row i is u_i)
//! O = (γ^i ⊙ Q) Z₀ + ((Q K̂ᵀ) ⊙ M) U                   M_ij = γ^(i−j) for j ≤ i, else 0
//! Z ← γ^C Z₀ + (γ^(C−i) ⊙ K̂)ᵀ U
//! ```
//!
//! (expanding u_i = β_i (v_i − γ Z_{i−1}ᵀ k̂_i) with Z_{i−1} written from Z₀ and u_1..u_(i−1)).
//! T is found by forward substitution in one op with its own backward ([`unit_lower_inverse`]):
//! the product form Π (I + (−A)^(2^k)) needs only matmuls, but with similar keys A's powers
//! reach C-choose-C/2 and cancel catastrophically in f32.

use super::KEY_EPS;
use crate::attention::repeat_kv;
use crate::attention::supra::chunk::{decay_mask, decay_powers};
use crate::attention::supra::HeadDecays;
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

/// x / sqrt(‖x‖² + ε) over the last dimension ([`super::make_unit`], differentiable): the
/// unit keys, and the value mix's queries.
pub fn unit_rows(k: &Tensor) -> Result<Tensor> {
    let norm = (k.sqr()?.sum_keepdim(D::Minus1)? + KEY_EPS)?.sqrt()?;
    Ok(k.broadcast_div(&norm)?)
}

/// Both training forms' start: the unit keys at their kv heads (B, H_kv, T, d'), the same
/// repeated to the `heads` query heads (B, H, T, d'), and β (B, H, T, 1) at the query heads.
pub fn unit_keys_and_betas(
    k: &Tensor,
    params: &Tensor,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let unit = unit_rows(k)?;
    let repeated = repeat_kv(&unit, heads)?;
    let beta = betas(&repeated, params)?;
    Ok((unit, repeated, beta))
}

/// β (B, H, T, 1) = sigmoid(w_h·k̂ + b_h) for unit keys at the query heads (B, H, T, d') and
/// `params` (H, d' + 1).
fn betas(unit: &Tensor, params: &Tensor) -> Result<Tensor> {
    let (_, h, _, f) = unit.dims4()?;
    let params = params.to_dtype(unit.dtype())?;
    let w = params.narrow(1, 0, f)?.reshape((1, h, 1, f))?;
    let b = params.narrow(1, f, 1)?.reshape((1, h, 1, 1))?;
    let logit = unit
        .broadcast_mul(&w)?
        .sum_keepdim(D::Minus1)?
        .broadcast_add(&b)?;
    Ok((logit.neg()?.exp()? + 1.0)?.recip()?)
}

/// q (B, H, T, d'), k (B, H_kv, T, d') key features (made unit here), v (B, H_kv, T, d_v),
/// `params` (H, d' + 1) β's weights and bias. Returns o (B, H, T, d_v) from a zero state.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: &Tensor,
    decays: &HeadDecays,
    chunk: usize,
) -> Result<Tensor> {
    let (b, h, t, f) = q.dims4()?;
    let dv = v.dim(3)?;
    ensure!(
        k.dim(3)? == f && params.dims() == [h, f + 1] && decays.heads()? == h && chunk > 0,
        "delta rule: q {:?}, k {:?}, β parameters {:?}, {} decays, chunk {chunk}",
        q.dims(),
        k.dims(),
        params.dims(),
        decays.heads()?
    );
    let (dtype, dev) = (q.dtype(), q.device());
    let (_, unit, beta) = unit_keys_and_betas(k, params, h)?;
    let v = repeat_kv(v, h)?;
    let mut z = Tensor::zeros((b, h, f, dv), dtype, dev)?;
    let mut outs = Vec::with_capacity(t.div_ceil(chunk));
    let mut start = 0;
    while start < t {
        let len = chunk.min(t - start);
        let part = |x: &Tensor| -> Result<Tensor> { Ok(x.narrow(2, start, len)?.contiguous()?) };
        let (qc, kc, vc, bc) = (part(q)?, part(&unit)?, part(&v)?, part(&beta)?);
        let mask = decay_mask(decays, len, dtype, dev)?;
        let below = strictly_below(len, dtype, dev)?.reshape((1, 1, len, len))?;
        let a = kc
            .matmul(&kc.t()?)?
            .broadcast_mul(&mask.broadcast_mul(&below)?)?
            .broadcast_mul(&bc)?;
        let tri = unit_lower_inverse(&a)?;
        let rise = decay_powers(decays, (1..=len).map(|i| i as f64), dtype, dev)?;
        let w = tri.matmul(&kc.broadcast_mul(&bc.broadcast_mul(&rise)?)?)?;
        let u = (tri.matmul(&vc.broadcast_mul(&bc)?)? - w.matmul(&z)?)?;
        let scores = qc.matmul(&kc.t()?)?.broadcast_mul(&mask)?;
        outs.push((qc.broadcast_mul(&rise)?.matmul(&z)? + scores.matmul(&u)?)?);
        let fall = decay_powers(decays, (0..len).rev().map(|i| i as f64), dtype, dev)?;
        let whole = decay_powers(decays, std::iter::once(len as f64), dtype, dev)?;
        z = (z.broadcast_mul(&whole)? + kc.broadcast_mul(&fall)?.t()?.matmul(&u)?)?;
        start += len;
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// (I + A)⁻¹ for every (…, C, C) matrix of `a`, reading only its strictly lower triangle;
/// differentiable (for Y = (I + A)⁻¹, dA = −Yᵀ dY Yᵀ on the strictly lower triangle).
pub fn unit_lower_inverse(a: &Tensor) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op1(UnitLowerInverse)?)
}

struct UnitLowerInverse;

/// Forward substitution for one C × C matrix: row i of Y is e_i − Σ_(j<i) A_ij Y_j, and Y_j is
/// zero past column j.
pub(super) fn invert<T: WithDType>(a: &[T], y: &mut [T], c: usize) {
    for i in 0..c {
        let (done, row) = y.split_at_mut(i * c);
        let row = &mut row[..c];
        row.fill(T::zero());
        row[i] = T::one();
        for j in 0..i {
            let aij = a[i * c + j];
            for (o, &yj) in row[..=j].iter_mut().zip(&done[j * c..j * c + j + 1]) {
                *o -= aij * yj;
            }
        }
    }
}

impl CustomOp1 for UnitLowerInverse {
    fn name(&self) -> &'static str {
        "supra-unit-lower-inverse"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = *layout.dims().last().unwrap_or(&1);
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("unit lower inverse: not contiguous".into()))?;
        fn run<T: WithDType>(a: &[T], c: usize) -> Vec<T> {
            let mut y = vec![T::zero(); a.len()];
            y.par_chunks_mut(c * c)
                .zip(a.par_chunks(c * c))
                .for_each(|(y, a)| invert(a, y, c));
            y
        }
        let out = match storage {
            CpuStorage::F32(a) => CpuStorage::F32(run(&a[start..end], c)),
            CpuStorage::F64(a) => CpuStorage::F64(run(&a[start..end], c)),
            _ => candle_core::bail!("unit lower inverse: only f32 and f64 tensors"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let yt = y.t()?.contiguous()?;
        let full = yt.matmul(&g.contiguous()?)?.matmul(&yt)?.neg()?;
        // Only the strictly lower triangle was read.
        let below = strictly_below(y.dim(D::Minus1)?, y.dtype(), y.device())?;
        Ok(Some(full.broadcast_mul(&below)?))
    }
}

/// The C × C mask of 1s below the diagonal.
fn strictly_below(c: usize, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::tril2(c, dtype, dev)? - Tensor::eye(c, dtype, dev)?
}
