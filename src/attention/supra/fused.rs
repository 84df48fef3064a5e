//! The training form on plain slices: [`scan`](super::scan)'s chunked sums forward, and their
//! gradients backward, as one candle op with fixed decays and no state carried in or out.
//!
//! Composed from candle ops ([`chunk`](super::chunk)) the chunked form is a dozen small ops per
//! chunk, each a fresh tensor on one core, and about twice as many backward: 13.4 ms forward
//! and backward per layer at 512 tokens (9 heads, d' = d_v = 64, chunks of 64), for 0.45 GFLOP.
//! Here each (sequence, query head) is one task on rayon's threads both ways, keys and values
//! read in place at their own heads. The backward recomputes the state before each chunk,
//! then walks the chunks last to first with dS, the gradient of the state after the chunk:
//!
//! ```text
//! dA = (dO Vᵀ ⊙ D)/√d'          dQ = dA K̃ + (γ^(i+1) dO_i) S_cᵀ
//! dK̃ = dAᵀ Q̃ + (γ^(len−1−j)/√d') V dSᵀ      dV = Aᵀ dO + (γ^(len−1−j)/√d') K̃ dS
//! dS ← γ^len dS + (γ^(i+1) q̃_i)ᵀ dO
//! ```
//!
//! with A = (Q̃K̃ᵀ/√d') ⊙ D as in the forward. A key/value head's gradient is the sum over its
//! query heads, added in head order after the parallel part.

use super::scan::{self, Buffers, Chunk};
use super::Dims;
use crate::model::gemm::{gemm, Strided};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// O (B, H, T, d_v) for q̃ (B, H, T, d'), k̃ (B, H_kv, T, d'), v (B, H_kv, T, d_v), from a zero
/// state; differentiable in all three. f32 or f64.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gammas: &[f64],
    chunk: usize,
) -> anyhow::Result<Tensor> {
    let op = ChunkedSums {
        gammas: gammas.to_vec(),
        chunk,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct ChunkedSums {
    gammas: Vec<f64>,
    chunk: usize,
}

impl ChunkedSums {
    /// The sizes, checked against each other and the decays.
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Dims> {
        let (&[b, h, t, dk], &[b2, hkv, t2, dk2], &[b3, hkv3, t3, dv]) = (q, k, v) else {
            candle_core::bail!("supra chunked: q̃, k̃, v must be 4-d, got {q:?}, {k:?}, {v:?}");
        };
        if (b2, t2, dk2) != (b, t, dk)
            || (b3, hkv3, t3) != (b, hkv, t)
            || hkv == 0
            || h % hkv != 0
            || self.gammas.len() != h
            || self.chunk == 0
        {
            candle_core::bail!(
                "supra chunked: q̃ {q:?}, k̃ {k:?}, v {v:?}, {} decays, chunk {}",
                self.gammas.len(),
                self.chunk
            );
        }
        Ok(Dims {
            batch: b,
            heads: h,
            kv_heads: hkv,
            len: t,
            feature_dim: dk,
            value_dim: dv,
        })
    }
}

/// The contiguous elements of `s` under `l`.
pub(crate) fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("operands must be contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

impl CustomOp3 for ChunkedSums {
    fn name(&self) -> &'static str {
        "supra-chunked"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        fn run<T: WithDType>(
            op: &ChunkedSums,
            d: Dims,
            (qs, ql): (&CpuStorage, &Layout),
            (ks, kl): (&CpuStorage, &Layout),
            (vs, vl): (&CpuStorage, &Layout),
        ) -> candle_core::Result<Vec<T>> {
            let mut state = vec![T::zero(); d.batch * d.heads * d.feature_dim * d.value_dim];
            Ok(scan::scan(
                slice(qs, ql)?,
                slice(ks, kl)?,
                slice(vs, vl)?,
                &mut state,
                &op.gammas,
                op.chunk,
                d,
            ))
        }
        let args = ((qs, ql), (ks, kl), (vs, vl));
        let o = match (qs, ks, vs) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(run(self, d, args.0, args.1, args.2)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(run(self, d, args.0, args.1, args.2)?)
            }
            _ => candle_core::bail!(
                "supra chunked: q̃, k̃, v are {:?}, {:?}, {:?}; all f32 or all f64",
                qs.dtype(),
                ks.dtype(),
                vs.dtype()
            ),
        };
        let shape = (d.batch, d.heads, d.len, d.value_dim);
        Ok((o, shape.into()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.dims(), k.dims(), v.dims())?;
        let (gammas, chunk) = (&self.gammas, self.chunk);
        op3_grads(
            [q, k, v],
            d_o,
            "supra chunked",
            |[q, k, v, d_o]| backward(q, k, v, d_o, gammas, chunk, d),
            |[q, k, v, d_o]| backward(q, k, v, d_o, gammas, chunk, d),
        )
    }
}

/// The backward of a three-operand op computed on slices: `f32s` or `f64s` (by the operands'
/// type) gets the operands and the output's gradient, contiguous, and returns the operands'
/// gradients, each of its operand's shape; those of operands outside the graph are dropped.
pub(crate) fn op3_grads(
    ops: [&Tensor; 3],
    grad: &Tensor,
    what: &str,
    f32s: impl FnOnce([&[f32]; 4]) -> [Vec<f32>; 3],
    f64s: impl FnOnce([&[f64]; 4]) -> [Vec<f64>; 3],
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    fn tensors<T: WithDType>(
        grads: [Vec<T>; 3],
        ops: [&Tensor; 3],
    ) -> candle_core::Result<[Tensor; 3]> {
        let [a, b, c] = grads;
        let tensor = |g: Vec<T>, like: &Tensor| Tensor::from_vec(g, like.shape(), like.device());
        Ok([tensor(a, ops[0])?, tensor(b, ops[1])?, tensor(c, ops[2])?])
    }
    let grad = grad.contiguous()?;
    let ts = [ops[0], ops[1], ops[2], &grad];
    let [a, b, c] = match ops[0].dtype() {
        candle_core::DType::F32 => tensors(with_slices(ts, f32s)?, ops)?,
        candle_core::DType::F64 => tensors(with_slices(ts, f64s)?, ops)?,
        dt => candle_core::bail!("{what}: {dt:?} operands"),
    };
    let tracked = |g: Tensor, like: &Tensor| like.track_op().then_some(g);
    Ok((tracked(a, ops[0]), tracked(b, ops[1]), tracked(c, ops[2])))
}

/// Calls `f` with the elements of each tensor in `ts` (contiguous, on the CPU, of type T),
/// read in place.
pub(crate) fn with_slices<T: WithDType, R, const N: usize>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[T]; N]) -> R,
) -> candle_core::Result<R> {
    let guards = ts.map(|t| t.storage_and_layout());
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(s) = &**storage else {
            candle_core::bail!("CPU tensors only");
        };
        slices.push(slice::<T>(s, layout)?);
    }
    let Ok(slices) = slices.try_into() else {
        unreachable!("one slice per tensor");
    };
    Ok(f(slices))
}

/// (dQ̃, dK̃, dV) of the chunked sums from dO, shapes as q̃, k̃, v.
pub fn backward<T: WithDType>(
    q: &[T],
    k: &[T],
    v: &[T],
    d_o: &[T],
    gammas: &[f64],
    chunk: usize,
    d: Dims,
) -> [Vec<T>; 3] {
    let (t, dk, dv) = (d.len, d.feature_dim, d.value_dim);
    let chunk = chunk.min(t.max(1));
    let pows = scan::powers::<T>(gammas, chunk);
    let heads = d.batch * d.heads;
    let mut dq = vec![T::zero(); heads * t * dk];
    // Keys' and values' gradients per query head, summed into their kv heads below.
    let mut dk_h = vec![T::zero(); heads * t * dk];
    let mut dv_h = vec![T::zero(); heads * t * dv];
    let per_head = dq
        .par_chunks_mut(t * dk)
        .zip(dk_h.par_chunks_mut(t * dk))
        .zip(dv_h.par_chunks_mut(t * dv))
        .enumerate();
    per_head.for_each(|(bh, ((dq, dkh), dvh))| {
        let starts: Vec<usize> = (0..t).step_by(chunk).collect();
        let one = |c0: usize| Chunk::at((q, k, v), bh, (c0, chunk), d, &pows);
        // The state before each chunk.
        let mut bufs = Buffers::default();
        let mut states = vec![T::zero(); starts.len() * dk * dv];
        for i in 1..starts.len() {
            let (before, after) = states.split_at_mut(i * dk * dv);
            after[..dk * dv].copy_from_slice(&before[(i - 1) * dk * dv..]);
            one(starts[i - 1]).update(&mut after[..dk * dv], &mut bufs);
        }
        let sc = scan::scale::<T>(dk);
        // dS, the gradient of the state after the chunk, is zero after the last one (the
        // composed form has none there: nothing reads the final state).
        let mut ds: Option<Vec<T>> = None;
        let (mut dp, mut da, mut term, mut du) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let add = |dst: &mut [T], src: &[T]| dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
        for (i, &c0) in starts.iter().enumerate().rev() {
            let c = one(c0);
            let len = c.len;
            let d_oc = &d_o[(bh * t + c0) * dv..][..len * dv];
            let s_c = &states[i * dk * dv..][..dk * dv];
            let (dq, dkh, dvh) = (
                &mut dq[c0 * dk..][..len * dk],
                &mut dkh[c0 * dk..][..len * dk],
                &mut dvh[c0 * dv..][..len * dv],
            );
            // Through O += (q̃_i S) γ^(i+1): dP = dO_i γ^(i+1); dQ̃ gets dP Sᵀ.
            c.query_decayed(d_oc, dv, &mut dp);
            gemm(
                dq,
                (len, dk, dv),
                Strided::rows(&dp, dv),
                Strided::transposed_rows(s_c, dv),
                None,
                T::one(),
            );
            // Through A: dA = ((dO Vᵀ) ⊙ D)/√d'; dQ̃ gets dA K̃, dK̃ gets dAᵀ Q̃.
            da.resize(len * len, T::zero());
            gemm(
                &mut da,
                (len, len, dv),
                Strided::rows(d_oc, dv),
                Strided::transposed_rows(c.v, dv),
                None,
                T::one(),
            );
            for (r, row) in da.chunks_exact_mut(len).enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j <= r {
                        *x * c.pow.mask[r - j] * sc
                    } else {
                        T::zero()
                    };
                }
            }
            term.resize(len * dk, T::zero());
            gemm(
                &mut term,
                (len, dk, len),
                Strided::rows(&da, len),
                Strided::rows(c.k, dk),
                None,
                T::one(),
            );
            add(dq, &term);
            gemm(
                dkh,
                (len, dk, len),
                Strided::transposed_rows(&da, len),
                Strided::rows(c.q, dk),
                None,
                T::one(),
            );
            // Through O = A V: dV gets Aᵀ dO.
            c.scores(&mut bufs.scores);
            gemm(
                dvh,
                (len, dv, len),
                Strided::transposed_rows(&bufs.scores, len),
                Strided::rows(d_oc, dv),
                None,
                T::one(),
            );
            // Through the state update, with dU = dS/√d': dK̃_j gets (V dUᵀ)_j γ^(len−1−j),
            // dV gets (K̃ ⊙ γ^(len−1−j)) dU.
            if let Some(ds) = &ds {
                du.clear();
                du.extend(ds.iter().map(|&x| x * sc));
                term.resize(len * dk, T::zero());
                gemm(
                    &mut term,
                    (len, dk, dv),
                    Strided::rows(c.v, dv),
                    Strided::transposed_rows(&du, dv),
                    None,
                    T::one(),
                );
                c.key_decayed(&term, dk, &mut bufs.decayed);
                add(dkh, &bufs.decayed);
                c.key_decayed(c.k, dk, &mut bufs.decayed);
                term.resize(len * dv, T::zero());
                gemm(
                    &mut term,
                    (len, dv, dk),
                    Strided::rows(&bufs.decayed, dk),
                    Strided::rows(&du, dv),
                    None,
                    T::one(),
                );
                add(dvh, &term);
            }
            // The state before the chunk: dS ← Q̃ᵀ dP + γ^len dS (none before the first).
            if i > 0 {
                let mut next = vec![T::zero(); dk * dv];
                gemm(
                    &mut next,
                    (dk, dv, len),
                    Strided::transposed_rows(c.q, dk),
                    Strided::rows(&dp, dv),
                    None,
                    T::one(),
                );
                if let Some(ds) = &ds {
                    let whole = c.pow.rows[len];
                    next.iter_mut().zip(ds).for_each(|(n, &d)| *n += d * whole);
                }
                ds = Some(next);
            }
        }
    });
    [dq, sum_groups(&dk_h, dk, d), sum_groups(&dv_h, dv, d)]
}

/// Each kv head's gradient from per-query-head ones (B, H, T, `width`): the sum over its
/// query heads, in head order.
pub(crate) fn sum_groups<T: WithDType>(per_head: &[T], width: usize, d: Dims) -> Vec<T> {
    let (t, group) = (d.len, d.heads / d.kv_heads);
    let mut out = vec![T::zero(); d.batch * d.kv_heads * t * width];
    out.par_chunks_mut(t * width)
        .enumerate()
        .for_each(|(bkv, o)| {
            let first = (bkv / d.kv_heads) * d.heads + (bkv % d.kv_heads) * group;
            for h in first..first + group {
                let src = &per_head[h * t * width..][..t * width];
                o.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::repeat_kv;
    use crate::attention::supra::{chunk, Decay, HeadDecays};
    use crate::testing::{assert_matches_composed, check_grad, randn_in};
    use candle_core::{DType, Var};

    /// The op against the composed training form, values and the three gradients to the bit,
    /// f32 and f64: 2 sequences, 6 query heads over 2 kv heads, 13 tokens in chunks of 4 (a short last
    /// chunk), d' ≠ d_v; and with one chunk longer than the sequence.
    #[test]
    fn matches_the_composed_form_and_its_gradients() {
        let gammas = Decay::Lightning.gammas(6).unwrap();
        for dtype in [DType::F32, DType::F64] {
            let var = |dims: &[usize]| Var::from_tensor(&randn_in(dtype, 0.0, 1.0, dims)).unwrap();
            let (q, k, v) = (
                var(&[2, 6, 13, 5]),
                var(&[2, 2, 13, 5]),
                var(&[2, 2, 13, 3]),
            );
            let r = randn_in(dtype, 0.0, 1.0, &[2, 6, 13, 3]);
            for chunk_size in [4, 64] {
                let ours = chunked(&q, &k, &v, &gammas, chunk_size).unwrap();
                let (kr, vr) = (repeat_kv(&k, 6).unwrap(), repeat_kv(&v, 6).unwrap());
                let fixed = HeadDecays::Fixed(gammas.clone());
                let (want, _) = chunk::chunked(&q, &kr, &vr, &fixed, chunk_size, None).unwrap();
                // Identical to the bit: every value rounds as the composed ops round it.
                let what = format!("{dtype:?}, chunks of {chunk_size}");
                let exact = (f64::MIN_POSITIVE, f64::MIN_POSITIVE);
                assert_matches_composed((ours, want), &[&q, &k, &v], &r, exact, &what);
            }
        }
    }

    /// Central differences through the op, for each operand.
    #[test]
    fn gradients_match_finite_differences() {
        let gammas = Decay::Lightning.gammas(4).unwrap();
        let var = |dims: &[usize]| Var::from_tensor(&randn_in(DType::F64, 0.0, 1.0, dims)).unwrap();
        let (q, k, v) = (var(&[1, 4, 7, 3]), var(&[1, 2, 7, 3]), var(&[1, 2, 7, 2]));
        let r = randn_in(DType::F64, 0.0, 1.0, &[1, 4, 7, 2]);
        let loss = || {
            let o = chunked(&q, &k, &v, &gammas, 3).unwrap();
            (o * &r).unwrap().sum_all().unwrap()
        };
        for (x, name) in [(&q, "q"), (&k, "k"), (&v, "v")] {
            check_grad(x, loss, name);
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let t = |dims: &[usize], dtype| randn_in(dtype, 0.0, 1.0, dims);
        let g = Decay::Lightning.gammas(4).unwrap();
        let (q, v) = (t(&[1, 4, 7, 3], DType::F32), t(&[1, 2, 7, 2], DType::F32));
        // 3 kv heads do not divide 4 query heads; a key of another width; f64 among f32.
        assert!(chunked(&q, &t(&[1, 3, 7, 3], DType::F32), &v, &g, 3).is_err());
        assert!(chunked(&q, &t(&[1, 2, 7, 4], DType::F32), &v, &g, 3).is_err());
        assert!(chunked(&q, &t(&[1, 2, 7, 3], DType::F64), &v, &g, 3).is_err());
        assert!(chunked(&q, &t(&[1, 2, 7, 3], DType::F32), &v, &g[..3], 3).is_err());
    }
}
