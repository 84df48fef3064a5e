//! The exact part of the training form on plain slices, as one candle op with its own
//! backward: for each query n, over the keys it reaches exactly ([`Span::exact`]), with
//! s_nm = q_n·k_m/√d and c_n = max_m s_nm,
//!
//! ```text
//! A_n = Σ_m e_nm v_m      a_n = Σ_m e_nm      e_nm = exp(s_nm − c_n)
//! ```
//!
//! side by side in one (B, H, T, d + 1) output, a in the last column. The combination with the
//! linear branch needs A and a apart, and c_n does not cancel there (the linear branch is not
//! shifted by it), so its gradient is kept: it flows to the keys at the row's max, as candle's
//! `max` gives it to every element equal to the max.
//!
//! Composed from candle ops ([`chunk`](super::chunk)) this is a dozen small tensors per chunk
//! each way, gathered keys included, on one core. Here each (sequence, query head, chunk) is a
//! task on rayon's threads both ways; keys and values are read at their own kv heads. Backward,
//! with g = [dA, da]:
//!
//! ```text
//! dE = dA Vᵀ + da          dS = (dE ⊙ E + [s = c] (−Σ_m dE ⊙ E)) / √d
//! dQ = dS K      dK = dSᵀ Q      dV = Eᵀ dA
//! ```
//!
//! With the sinks at cache positions their columns of S are scored from q̃_n, q_n turned
//! back to the position [`Span::sink_query_position`] gives it; the op turns the rows itself,
//! and turns their share of dQ forward again, so that q̃ is never a tensor of its own.
//!
//! Each task's key and value gradients are added to their positions afterwards in task order,
//! so the result does not depend on the thread count.

use super::Span;
use crate::attention::supra::fused::{op3_grads, slice};
use crate::model::gemm::{gemm, Strided};
use crate::model::rope::Rotation;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

/// [A, a] (B, H, T, d + 1) for q (B, H, T, d) and k, v (B, H_kv, T, d) RoPE'd as the teacher's,
/// queries taken `chunk` at a time; differentiable in all three. `sinks`, where given, turns
/// each q row into the query that scores the sinks (q̃, [`Span::sink_query_position`]). f32
/// or f64.
pub fn exact(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    sinks: Option<&Rotation>,
    span: Span,
    chunk: usize,
) -> anyhow::Result<Tensor> {
    let op = Exact {
        span,
        chunk,
        sinks: sinks.cloned(),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Exact {
    span: Span,
    chunk: usize,
    /// q_n → q̃_n, for the sinks' columns; `None`: q scores them.
    sinks: Option<Rotation>,
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    len: usize,
    head_dim: usize,
}

impl Dims {
    /// The (sequence, kv head) row of a (sequence, query head).
    fn kv_of(&self, bh: usize) -> usize {
        (bh / self.heads) * self.kv_heads + (bh % self.heads) / (self.heads / self.kv_heads)
    }
}

impl Exact {
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Dims> {
        let (&[b, h, t, d], &[b2, hkv, t2, d2]) = (q, k) else {
            candle_core::bail!("window exact: q, k must be 4-d, got {q:?}, {k:?}");
        };
        let turned = self.sinks.as_ref().is_none_or(|r| r.covers(t, d));
        if (b2, t2, d2) != (b, t, d)
            || v != k
            || hkv == 0
            || h % hkv != 0
            || self.chunk == 0
            || !turned
        {
            candle_core::bail!(
                "window exact: q {q:?}, k {k:?}, v {v:?}, chunk {} (or the sinks' turn for another length)",
                self.chunk
            );
        }
        Ok(Dims {
            batch: b,
            heads: h,
            kv_heads: hkv,
            len: t,
            head_dim: d,
        })
    }

    /// The (sequence·head, first query) of every task.
    fn tasks(&self, d: Dims) -> Vec<(usize, usize)> {
        let starts: Vec<usize> = (0..d.len).step_by(self.chunk).collect();
        (0..d.batch * d.heads)
            .flat_map(|bh| starts.iter().map(move |&c0| (bh, c0)))
            .collect()
    }
}

/// One task's chunk of queries and the keys they reach, gathered, with E = exp(S − c).
struct Block<T> {
    /// The number of query rows.
    len: usize,
    /// The reached key positions (sinks, then a run up to the chunk's last query).
    positions: Vec<usize>,
    /// How many of them, from the first, are sinks that q̃ scores (0 without q̃), and q̃'s
    /// rows (len × d) where there are any.
    sink_columns: usize,
    sink_queries: Vec<T>,
    keys: Vec<T>,
    values: Vec<T>,
    /// S (len × keys), masked keys at −∞, and E; a row with no key is all zeros in E.
    scores: Vec<T>,
    e: Vec<T>,
    /// Each row's max (−∞ for a row with no key).
    c: Vec<T>,
}

impl<T: WithDType + Float> Block<T> {
    fn new(op: &Exact, d: Dims, (q, k, v): (&[T], &[T], &[T]), (bh, c0): (usize, usize)) -> Self {
        let (t, dh, span) = (d.len, d.head_dim, op.span);
        let len = op.chunk.min(t - c0);
        let lo = (c0 + 1).saturating_sub(span.window).min(c0 + len);
        let positions: Vec<usize> = (0..span.sinks.min(lo)).chain(lo..c0 + len).collect();
        // The sinks lead `positions` (in the window's run too, while it still reaches them).
        let sink_columns = if op.sinks.is_some() {
            positions.iter().take_while(|&&m| m < span.sinks).count()
        } else {
            0
        };
        let nk = positions.len();
        let kv = d.kv_of(bh);
        let gather = |x: &[T]| -> Vec<T> {
            let mut out = Vec::with_capacity(nk * dh);
            for &m in &positions {
                out.extend_from_slice(&x[(kv * t + m) * dh..][..dh]);
            }
            out
        };
        let (keys, values) = (gather(k), gather(v));
        let qc = &q[(bh * t + c0) * dh..][..len * dh];
        let scale = T::from_f64(1.0 / (dh as f64).sqrt());
        let mut scores = vec![T::zero(); len * nk];
        let mut e = vec![T::zero(); len * nk];
        let mut c = vec![T::neg_infinity(); len];
        if nk > 0 {
            gemm(
                &mut scores,
                (len, nk, dh),
                Strided::rows(qc, dh),
                Strided::transposed_rows(&keys, dh),
                None,
                scale,
            );
        }
        let mut sink_queries = Vec::new();
        if let (Some(turn), true) = (&op.sinks, sink_columns > 0) {
            // The sinks' columns again, from q̃.
            sink_queries = qc.to_vec();
            for (r, row) in sink_queries.chunks_exact_mut(dh).enumerate() {
                turn.rotate_row(c0 + r, row, false);
            }
            let mut sinks = vec![T::zero(); len * sink_columns];
            gemm(
                &mut sinks,
                (len, sink_columns, dh),
                Strided::rows(&sink_queries, dh),
                Strided::transposed_rows(&keys, dh),
                None,
                scale,
            );
            for (row, from) in scores
                .chunks_exact_mut(nk)
                .zip(sinks.chunks_exact(sink_columns))
            {
                row[..sink_columns].copy_from_slice(from);
            }
        }
        for (r, (row, erow)) in scores
            .chunks_exact_mut(nk.max(1))
            .zip(e.chunks_exact_mut(nk.max(1)))
            .enumerate()
        {
            for (s, &m) in row.iter_mut().zip(&positions) {
                if !span.exact(c0 + r, m) {
                    *s = T::neg_infinity();
                }
            }
            c[r] = row.iter().copied().fold(T::neg_infinity(), Float::max);
            if c[r] > T::neg_infinity() {
                for (x, &s) in erow.iter_mut().zip(row.iter()) {
                    *x = (s - c[r]).exp();
                }
            }
        }
        Self {
            len,
            positions,
            sink_columns,
            sink_queries,
            keys,
            values,
            scores,
            e,
            c,
        }
    }
}

impl CustomOp3 for Exact {
    fn name(&self) -> &'static str {
        "window-exact"
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
        fn run<T: WithDType + Float>(op: &Exact, d: Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
            let (t, dh) = (d.len, d.head_dim);
            let w = dh + 1;
            let mut out = vec![T::zero(); d.batch * d.heads * t * w];
            let tasks = op.tasks(d);
            // Each task's rows are a contiguous run of the output.
            let mut parts: Vec<&mut [T]> = Vec::with_capacity(tasks.len());
            let mut rest = &mut out[..];
            for &(_, c0) in &tasks {
                let (part, tail) = rest.split_at_mut(op.chunk.min(t - c0) * w);
                parts.push(part);
                rest = tail;
            }
            tasks.par_iter().zip(parts).for_each(|(&task, o)| {
                let blk = Block::new(op, d, (q, k, v), task);
                let nk = blk.positions.len();
                if nk == 0 {
                    return;
                }
                // A into the first d columns (rows d + 1 apart), a into the last.
                let mut a = vec![T::zero(); blk.len * dh];
                gemm(
                    &mut a,
                    (blk.len, dh, nk),
                    Strided::rows(&blk.e, nk),
                    Strided::rows(&blk.values, dh),
                    None,
                    T::one(),
                );
                for (r, row) in o.chunks_exact_mut(w).enumerate() {
                    row[..dh].copy_from_slice(&a[r * dh..][..dh]);
                    row[dh] = blk.e[r * nk..][..nk].iter().fold(T::zero(), |s, &x| s + x);
                }
            });
            out
        }
        let o = match (qs, ks, vs) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(run(self, d, slice(qs, ql)?, slice(ks, kl)?, slice(vs, vl)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(run(self, d, slice(qs, ql)?, slice(ks, kl)?, slice(vs, vl)?))
            }
            _ => candle_core::bail!(
                "window exact: q, k, v are {:?}, {:?}, {:?}; all f32 or all f64",
                qs.dtype(),
                ks.dtype(),
                vs.dtype()
            ),
        };
        Ok((o, (d.batch, d.heads, d.len, d.head_dim + 1).into()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.dims(), k.dims(), v.dims())?;
        op3_grads(
            [q, k, v],
            g,
            "window exact",
            |[q, k, v, g]| backward(self, d, (q, k, v), g),
            |[q, k, v, g]| backward(self, d, (q, k, v), g),
        )
    }
}

/// One task's share of the gradients: its queries' rows, and its gathered keys' and values'
/// (at the block's positions).
struct TaskGrads<T> {
    dq: Vec<T>,
    positions: Vec<usize>,
    dk: Vec<T>,
    dv: Vec<T>,
}

/// (dQ, dK, dV) from g = [dA, da] (B, H, T, d + 1), shapes as q, k, v.
fn backward<T: WithDType + Float>(
    op: &Exact,
    d: Dims,
    (q, k, v): (&[T], &[T], &[T]),
    g: &[T],
) -> [Vec<T>; 3] {
    let (t, dh) = (d.len, d.head_dim);
    let w = dh + 1;
    let scale = T::from_f64(1.0 / (dh as f64).sqrt());
    let tasks = op.tasks(d);
    let per_task: Vec<TaskGrads<T>> = tasks
        .par_iter()
        .map(|&(bh, c0)| {
            let blk = Block::new(op, d, (q, k, v), (bh, c0));
            let (len, nk) = (blk.len, blk.positions.len());
            if nk == 0 {
                return TaskGrads {
                    dq: vec![T::zero(); len * dh],
                    positions: blk.positions,
                    dk: Vec::new(),
                    dv: Vec::new(),
                };
            }
            let gc = &g[(bh * t + c0) * w..][..len * w];
            // dE = dA Vᵀ + da, then through exp and the shift by c.
            let mut ds = vec![T::zero(); len * nk];
            gemm(
                &mut ds,
                (len, nk, dh),
                Strided::rows(gc, w),
                Strided::transposed_rows(&blk.values, dh),
                None,
                T::one(),
            );
            for (r, row) in ds.chunks_exact_mut(nk.max(1)).enumerate() {
                let da = gc[r * w + dh];
                let erow = &blk.e[r * nk..][..nk];
                let mut shift = T::zero();
                for (x, &e) in row.iter_mut().zip(erow) {
                    *x = (*x + da) * e;
                    shift -= *x;
                }
                let srow = &blk.scores[r * nk..][..nk];
                for (x, &s) in row.iter_mut().zip(srow) {
                    if s == blk.c[r] {
                        *x += shift;
                    }
                    *x *= scale;
                }
            }
            // dQ from the columns q scored, and from the sinks' (which q̃ scored) dQ̃ turned
            // forward again: q̃_n = R q_n gives dq_n += Rᵀ dq̃_n, R orthogonal.
            let sc = blk.sink_columns;
            let product = |dst: &mut [T], cols: std::ops::Range<usize>| {
                if !cols.is_empty() {
                    gemm(
                        dst,
                        (len, dh, cols.len()),
                        Strided::rows(&ds[cols.start..], nk),
                        Strided::rows(&blk.keys[cols.start * dh..], dh),
                        None,
                        T::one(),
                    );
                }
            };
            let mut dq = vec![T::zero(); len * dh];
            product(&mut dq, sc..nk);
            if let (Some(turn), true) = (&op.sinks, sc > 0) {
                let mut dqs = vec![T::zero(); len * dh];
                product(&mut dqs, 0..sc);
                let rows = dqs.chunks_exact_mut(dh).zip(dq.chunks_exact_mut(dh));
                for (r, (from, to)) in rows.enumerate() {
                    turn.rotate_row(c0 + r, from, true);
                    to.iter_mut().zip(from.iter()).for_each(|(a, &b)| *a += b);
                }
            }
            let qc = &q[(bh * t + c0) * dh..][..len * dh];
            let mut dk = vec![T::zero(); nk * dh];
            gemm(
                &mut dk,
                (nk, dh, len),
                Strided::transposed_rows(&ds, nk),
                Strided::rows(qc, dh),
                None,
                T::one(),
            );
            if sc > 0 {
                // The sinks' rows, which q̃ scored.
                gemm(
                    &mut dk[..sc * dh],
                    (sc, dh, len),
                    Strided::transposed_rows(&ds, nk),
                    Strided::rows(&blk.sink_queries, dh),
                    None,
                    T::one(),
                );
            }
            let mut dv = vec![T::zero(); nk * dh];
            gemm(
                &mut dv,
                (nk, dh, len),
                Strided::transposed_rows(&blk.e, nk),
                Strided::rows(gc, w),
                None,
                T::one(),
            );
            TaskGrads {
                dq,
                positions: blk.positions,
                dk,
                dv,
            }
        })
        .collect();
    let mut dq = vec![T::zero(); d.batch * d.heads * t * dh];
    let mut dk = vec![T::zero(); d.batch * d.kv_heads * t * dh];
    let mut dv = vec![T::zero(); d.batch * d.kv_heads * t * dh];
    for (&(bh, c0), part) in tasks.iter().zip(&per_task) {
        dq[(bh * t + c0) * dh..][..part.dq.len()].copy_from_slice(&part.dq);
        let kv = d.kv_of(bh);
        for (i, &m) in part.positions.iter().enumerate() {
            let at = (kv * t + m) * dh;
            let add =
                |dst: &mut [T], src: &[T]| dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
            add(&mut dk[at..][..dh], &part.dk[i * dh..][..dh]);
            add(&mut dv[at..][..dh], &part.dv[i * dh..][..dh]);
        }
    }
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::repeat_kv;
    use crate::attention::window::chunk::exact_composed;
    use crate::config::SinkPositions;
    use crate::testing::{assert_matches_composed, check_grad, randn_in};
    use candle_core::{DType, Var};

    const SPAN: Span = Span::absolute(5, 2);

    /// The turn of 13 rows of head dimension 4 into the sinks' queries under `span`.
    fn turn(span: Span) -> Rotation {
        let rope = crate::model::rope::Rope::new(4, 10_000.0, 64, &candle_core::Device::Cpu);
        let backs: Vec<usize> = (0..13).map(|n| n - span.sink_query_position(n)).collect();
        rope.unwrap().turning_back(&backs).unwrap()
    }

    /// Window 3 and 2 sinks at cache positions: rows past 4 score the sinks with q̃ ≠ q.
    const CACHE: Span = Span {
        sink_positions: SinkPositions::Cache,
        ..Span::absolute(3, 2)
    };

    /// The op against the composed exact part, values and the three gradients, f32 and f64:
    /// 2 sequences, 6 query heads over 2 kv heads, 13 tokens in chunks of 4 (a short last
    /// chunk) and 16 (one chunk); sinks and window, the window alone, the sinks alone, and the
    /// sinks at cache positions (q̃ turned inside the op, against the composed form's q̃).
    #[test]
    fn matches_the_composed_form_and_its_gradients() {
        let spans = [SPAN, Span::absolute(3, 0), Span::absolute(1, 4), CACHE];
        for dtype in [DType::F32, DType::F64] {
            // Logits of a few units, so the exponentials spread as real attention's do.
            let var = |dims: &[usize]| Var::from_tensor(&randn_in(dtype, 0.0, 2.0, dims)).unwrap();
            let (q, k, v) = (
                var(&[2, 6, 13, 4]),
                var(&[2, 2, 13, 4]),
                var(&[2, 2, 13, 4]),
            );
            let r = randn_in(dtype, 0.0, 1.0, &[2, 6, 13, 5]);
            let (tol, grad_tol) = match dtype {
                DType::F32 => (f64::MIN_POSITIVE, 1e-6),
                _ => (f64::MIN_POSITIVE, 1e-14),
            };
            let (kr, vr) = (repeat_kv(&k, 6).unwrap(), repeat_kv(&v, 6).unwrap());
            for span in spans {
                let turn = (span == CACHE).then(|| turn(span));
                for chunk in [4, 16] {
                    let ours = exact((&q, &k, &v), turn.as_ref(), span, chunk).unwrap();
                    let qs = turn.as_ref().map(|t| t.apply(&q).unwrap());
                    let want = exact_composed((&q, qs.as_ref(), &kr, &vr), span, chunk).unwrap();
                    let what = format!("{dtype:?}, {span:?}, chunks of {chunk}");
                    assert_matches_composed(
                        (ours, want),
                        &[&q, &k, &v],
                        &r,
                        (tol, grad_tol),
                        &what,
                    );
                }
            }
        }
    }

    /// Central differences through the op, for each operand, with the sinks at both
    /// positions; the weight on a (the last column) differs from A's, so the shift by each
    /// row's max does not cancel.
    #[test]
    fn gradients_match_finite_differences() {
        let var = |dims: &[usize]| Var::from_tensor(&randn_in(DType::F64, 0.0, 1.0, dims)).unwrap();
        let (q, k, v) = (
            var(&[1, 4, 13, 4]),
            var(&[1, 2, 13, 4]),
            var(&[1, 2, 13, 4]),
        );
        let r = randn_in(DType::F64, 0.0, 1.0, &[1, 4, 13, 5]);
        for span in [SPAN, CACHE] {
            let turn = (span == CACHE).then(|| turn(span));
            let loss = || {
                let o = exact((&q, &k, &v), turn.as_ref(), span, 3).unwrap();
                (o * &r).unwrap().sum_all().unwrap()
            };
            for (x, name) in [(&q, "q"), (&k, "k"), (&v, "v")] {
                check_grad(x, loss, &format!("{name}, {span:?}"));
            }
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let t = |dims: &[usize], dtype| randn_in(dtype, 0.0, 1.0, dims);
        let (q, k) = (t(&[1, 4, 7, 4], DType::F32), t(&[1, 2, 7, 4], DType::F32));
        // 3 kv heads do not divide 4; a value of another width; f64 among f32; no chunk.
        let k3 = t(&[1, 3, 7, 4], DType::F32);
        let op = |q: &Tensor, k: &Tensor, v: &Tensor, chunk| exact((q, k, v), None, SPAN, chunk);
        assert!(op(&q, &k3, &k3, 3).is_err());
        assert!(op(&q, &k, &t(&[1, 2, 7, 6], DType::F32), 3).is_err());
        assert!(op(&q, &k, &t(&[1, 2, 7, 4], DType::F64), 3).is_err());
        assert!(op(&q, &k, &k, 0).is_err());
        // A turn of 13 rows for 7.
        assert!(exact((&q, &k, &k), Some(&turn(CACHE)), CACHE, 3).is_err());
    }
}
