//! The training form on plain slices: [`chunk`](super::chunk)'s WY form forward, and its
//! gradients backward, as one candle op with fixed decays and no state carried in or out.
//!
//! Composed from candle ops the chunked form is about thirty small ops per chunk, each a fresh
//! tensor, and more backward; at SmolLM2-135M's shapes a delta-rule model distilled at about
//! 0.7 of the additive state's tokens/s. This op follows the additive state's own fused op
//! ([`supra::fused`](crate::attention::supra::fused)): each (sequence, query head) is one task
//! on rayon's threads both ways, keys and values read in place at their own heads. The unit
//! keys and β come in from candle ops (they are elementwise per token); β rides as one more
//! column of the queries, since a candle op takes at most three operands.
//!
//! Per chunk of L rows (i, j from 0), with r_i = γ^(i+1), f_i = γ^(L−1−i), Z₀ the state before
//! it, the forward of [`chunk`](super::chunk):
//!
//! ```text
//! G = K̂K̂ᵀ      A_ij = β_i γ^(i−j) G_ij (j < i)      T = (I + A)⁻¹
//! K_b = (β r) ⊙ K̂    W = T K_b    V_b = β ⊙ V    U = T V_b − W Z₀
//! S = (QK̂ᵀ) ⊙ M (M_ij = γ^(i−j), j ≤ i)    O = (r ⊙ Q) Z₀ + S U    Z₁ = γ^L Z₀ + (f ⊙ K̂)ᵀ U
//! ```
//!
//! and backward, from dO and dZ₁ (zero after the last chunk), each piece kept from the forward:
//!
//! ```text
//! dU = Sᵀ dO + (f ⊙ K̂) dZ₁        dK̂ += f ⊙ (U dZ₁ᵀ)         dQ += r ⊙ (dO Z₀ᵀ)
//! dS = (dO Uᵀ) ⊙ M                dQ += dS K̂                 dK̂ += dSᵀ Q
//! dW = −dU Z₀ᵀ     dT = dU V_bᵀ + dW K_bᵀ     dV_b = Tᵀ dU     dK_b = Tᵀ dW
//! dA = −Tᵀ dT Tᵀ (strictly lower)   dβ_i += Σ_j dA_ij γ^(i−j) G_ij   dG = β γ^(i−j) dA
//! dK̂ += (dG + dGᵀ) K̂    dV += β ⊙ dV_b    dβ_i += dV_b,i·v_i    dK̂ += (β r) ⊙ dK_b
//! dβ_i += r_i dK_b,i·k̂_i    dZ₀ = γ^L dZ₁ + (r ⊙ Q)ᵀ dO − Wᵀ dU
//! ```
//!
//! A key/value head's gradient is the sum over its query heads, added in head order after the
//! parallel part.

use super::chunk::{invert, unit_keys_and_betas};
use crate::attention::kv_head;
use crate::attention::supra::fused::{op3_grads, slice, sum_groups};
use crate::attention::supra::Dims;
use crate::model::gemm::{gemm, Strided};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// As [`chunk::chunked`](super::chunk::chunked) for fixed decays `gammas` (one per query
/// head): q (B, H, T, d'), k (B, H_kv, T, d') key features (made unit here), v (B, H_kv, T,
/// d_v), `params` (H, d' + 1); o (B, H, T, d_v) from a zero state. f32 or f64.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: &Tensor,
    gammas: &[f64],
    chunk: usize,
) -> anyhow::Result<Tensor> {
    let (unit, _, beta) = unit_keys_and_betas(k, params, q.dim(1)?)?;
    let qb = Tensor::cat(&[q, &beta], 3)?;
    let op = DeltaChunks {
        gammas: gammas.to_vec(),
        chunk,
    };
    Ok(qb.apply_op3(&unit.contiguous()?, &v.contiguous()?, op)?)
}

struct DeltaChunks {
    gammas: Vec<f64>,
    chunk: usize,
}

impl DeltaChunks {
    /// The sizes (feature_dim without β's column), checked against each other and the decays.
    fn dims(&self, qb: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Dims> {
        let (&[b, h, t, fb], &[b2, hkv, t2, f], &[b3, hkv3, t3, dv]) = (qb, k, v) else {
            candle_core::bail!("delta chunked: q|β, k̂, v must be 4-d, got {qb:?}, {k:?}, {v:?}");
        };
        if (b2, t2, fb) != (b, t, f + 1)
            || (b3, hkv3, t3) != (b, hkv, t)
            || hkv == 0
            || h % hkv != 0
            || self.gammas.len() != h
            || self.chunk == 0
        {
            candle_core::bail!(
                "delta chunked: q|β {qb:?}, k̂ {k:?}, v {v:?}, {} decays, chunk {}",
                self.gammas.len(),
                self.chunk
            );
        }
        Ok(Dims {
            batch: b,
            heads: h,
            kv_heads: hkv,
            len: t,
            feature_dim: f,
            value_dim: dv,
        })
    }
}

/// The chunk both passes use and γ^e for e in 0..=chunk, per query head. A chunk longer than
/// the sequence is the sequence: γ's powers go no further.
fn chunk_and_powers<T: WithDType>(gammas: &[f64], chunk: usize, t: usize) -> (usize, Vec<Vec<T>>) {
    let chunk = chunk.min(t.max(1));
    let pows = gammas
        .iter()
        .map(|g| (0..=chunk).map(|e| T::from_f64(g.powi(e as i32))).collect())
        .collect();
    (chunk, pows)
}

/// One chunk of one (sequence, query head): its rows read in place.
struct Rows<'a, T> {
    /// Queries with β as the last column: rows d' + 1 apart.
    qb: &'a [T],
    k: &'a [T],
    v: &'a [T],
    len: usize,
    f: usize,
    dv: usize,
    /// γ^e of this head, e = 0..=chunk.
    pw: &'a [T],
}

impl<'a, T: WithDType> Rows<'a, T> {
    fn at(
        (qb, k, v): (&'a [T], &'a [T], &'a [T]),
        bh: usize,
        (c0, chunk): (usize, usize),
        d: Dims,
        pw: &'a [T],
    ) -> Self {
        let (t, f, dv) = (d.len, d.feature_dim, d.value_dim);
        let h = bh % d.heads;
        let bg = (bh / d.heads) * d.kv_heads + kv_head(h, d.heads, d.kv_heads);
        let len = chunk.min(t - c0);
        Rows {
            qb: &qb[(bh * t + c0) * (f + 1)..][..len * (f + 1)],
            k: &k[(bg * t + c0) * f..][..len * f],
            v: &v[(bg * t + c0) * dv..][..len * dv],
            len,
            f,
            dv,
            pw,
        }
    }

    fn q(&self) -> Strided<'a, T> {
        Strided::rows(self.qb, self.f + 1)
    }

    fn beta(&self, i: usize) -> T {
        self.qb[i * (self.f + 1) + self.f]
    }
}

/// What the forward computes for one chunk and the backward reads (see the module's doc).
struct Pieces<T> {
    g: Vec<T>,
    tri: Vec<T>,
    kb: Vec<T>,
    w: Vec<T>,
    vb: Vec<T>,
    u: Vec<T>,
    s: Vec<T>,
}

impl<T> Default for Pieces<T> {
    fn default() -> Self {
        let e = Vec::new;
        Pieces {
            g: e(),
            tri: e(),
            kb: e(),
            w: e(),
            vb: e(),
            u: e(),
            s: e(),
        }
    }
}

/// Row i of `dst` (rows `width` apart) ← `scale(i)` · row i of `src`.
fn scale_rows<T: WithDType>(dst: &mut Vec<T>, src: &[T], width: usize, scale: impl Fn(usize) -> T) {
    dst.clear();
    dst.extend(src.chunks_exact(width).enumerate().flat_map(|(i, row)| {
        let si = scale(i);
        row.iter().map(move |&x| x * si)
    }));
}

impl<T: WithDType> Pieces<T> {
    /// The chunk's pieces for the state `z` before it.
    fn solve(&mut self, c: &Rows<T>, z: &[T]) {
        let (l, f, dv, pw) = (c.len, c.f, c.dv, c.pw);
        let one = T::one();
        self.g.resize(l * l, T::zero());
        gemm(
            &mut self.g,
            (l, l, f),
            Strided::rows(c.k, f),
            Strided::transposed_rows(c.k, f),
            None,
            one,
        );
        // A in `s` for the moment (invert reads only its strictly lower triangle).
        self.s.clear();
        self.s.extend((0..l * l).map(|n| {
            let (i, j) = (n / l, n % l);
            if j < i {
                c.beta(i) * pw[i - j] * self.g[n]
            } else {
                T::zero()
            }
        }));
        self.tri.resize(l * l, T::zero());
        invert(&self.s, &mut self.tri, l);
        scale_rows(&mut self.kb, c.k, f, |i| c.beta(i) * pw[i + 1]);
        self.w.resize(l * f, T::zero());
        gemm(
            &mut self.w,
            (l, f, l),
            Strided::rows(&self.tri, l),
            Strided::rows(&self.kb, f),
            None,
            one,
        );
        scale_rows(&mut self.vb, c.v, dv, |i| c.beta(i));
        self.u.resize(l * dv, T::zero());
        gemm(
            &mut self.u,
            (l, dv, l),
            Strided::rows(&self.tri, l),
            Strided::rows(&self.vb, dv),
            None,
            one,
        );
        gemm(
            &mut self.u,
            (l, dv, f),
            Strided::rows(&self.w, f),
            Strided::rows(z, dv),
            Some(one),
            T::zero() - one,
        );
        self.s.resize(l * l, T::zero());
        gemm(
            &mut self.s,
            (l, l, f),
            c.q(),
            Strided::transposed_rows(c.k, f),
            None,
            one,
        );
        mask_causal(&mut self.s, l, pw);
    }

    /// O = (r ⊙ Q) Z₀ + S U into `o` (L × d_v), for the state `z` before the chunk.
    fn output(&self, c: &Rows<T>, z: &[T], o: &mut [T]) {
        let (l, dv, pw) = (c.len, c.dv, c.pw);
        gemm(o, (l, dv, c.f), c.q(), Strided::rows(z, dv), None, T::one());
        for (i, row) in o.chunks_exact_mut(dv).enumerate() {
            row.iter_mut().for_each(|x| *x *= pw[i + 1]);
        }
        gemm(
            o,
            (l, dv, l),
            Strided::rows(&self.s, l),
            Strided::rows(&self.u, dv),
            Some(T::one()),
            T::one(),
        );
    }

    /// Z ← γ^L Z + (f ⊙ K̂)ᵀ U.
    fn update(&self, c: &Rows<T>, z: &mut [T], decayed: &mut Vec<T>) {
        let (l, f, pw) = (c.len, c.f, c.pw);
        scale_rows(decayed, c.k, f, |i| pw[l - 1 - i]);
        gemm(
            z,
            (f, c.dv, l),
            Strided::transposed_rows(decayed, f),
            Strided::rows(&self.u, c.dv),
            Some(pw[l]),
            T::one(),
        );
    }
}

/// x_ij ← x_ij γ^(i−j) on and below the diagonal, 0 above.
fn mask_causal<T: WithDType>(x: &mut [T], l: usize, pw: &[T]) {
    for (i, row) in x.chunks_exact_mut(l).enumerate() {
        for (j, e) in row.iter_mut().enumerate() {
            *e = if j <= i { *e * pw[i - j] } else { T::zero() };
        }
    }
}

/// The chunk starts of a sequence of `t` tokens.
fn starts(t: usize, chunk: usize) -> Vec<usize> {
    (0..t).step_by(chunk).collect()
}

fn forward<T: WithDType>(
    qb: &[T],
    k: &[T],
    v: &[T],
    gammas: &[f64],
    chunk: usize,
    d: Dims,
) -> Vec<T> {
    let (t, f, dv) = (d.len, d.feature_dim, d.value_dim);
    let (chunk, pows) = chunk_and_powers::<T>(gammas, chunk, t);
    let mut out = vec![T::zero(); d.batch * d.heads * t * dv];
    out.par_chunks_mut(t * dv).enumerate().for_each(|(bh, o)| {
        let pw = &pows[bh % d.heads];
        let (mut z, mut p, mut decayed) = (vec![T::zero(); f * dv], Pieces::default(), Vec::new());
        for c0 in starts(t, chunk) {
            let c = Rows::at((qb, k, v), bh, (c0, chunk), d, pw);
            p.solve(&c, &z);
            p.output(&c, &z, &mut o[c0 * dv..][..c.len * dv]);
            p.update(&c, &mut z, &mut decayed);
        }
    });
    out
}

/// (d(q|β), dk̂, dv) from dO, shapes as the operands.
fn backward<T: WithDType>(
    [qb, k, v, d_o]: [&[T]; 4],
    gammas: &[f64],
    chunk: usize,
    d: Dims,
) -> [Vec<T>; 3] {
    let (t, f, dv) = (d.len, d.feature_dim, d.value_dim);
    let (chunk, pows) = chunk_and_powers::<T>(gammas, chunk, t);
    let heads = d.batch * d.heads;
    let mut dqb = vec![T::zero(); heads * t * (f + 1)];
    // Keys' and values' gradients per query head, summed into their kv heads below.
    let mut dk_h = vec![T::zero(); heads * t * f];
    let mut dv_h = vec![T::zero(); heads * t * dv];
    let per_head = dqb
        .par_chunks_mut(t * (f + 1))
        .zip(dk_h.par_chunks_mut(t * f))
        .zip(dv_h.par_chunks_mut(t * dv))
        .enumerate();
    per_head.for_each(|(bh, ((dqb, dkh), dvh))| {
        let pw = &pows[bh % d.heads];
        let (one, zero) = (T::one(), T::zero());
        let starts = starts(t, chunk);
        let rows = |c0: usize| Rows::at((qb, k, v), bh, (c0, chunk), d, pw);
        // The forward again, keeping each chunk's pieces and the state before it.
        let mut states = vec![zero; starts.len() * f * dv];
        let mut pieces: Vec<Pieces<T>> = Vec::with_capacity(starts.len());
        let mut decayed = Vec::new();
        for (n, &c0) in starts.iter().enumerate() {
            let c = rows(c0);
            let (before, after) = states.split_at_mut(n * f * dv);
            if n > 0 {
                after[..f * dv].copy_from_slice(&before[(n - 1) * f * dv..]);
                pieces[n - 1].update(&rows(starts[n - 1]), &mut after[..f * dv], &mut decayed);
            }
            let mut p = Pieces::default();
            p.solve(&c, &after[..f * dv]);
            pieces.push(p);
        }
        // dZ after the chunk: none after the last (nothing reads the final state).
        let mut dz: Option<Vec<T>> = None;
        let mut b = Grads::default();
        for (n, &c0) in starts.iter().enumerate().rev() {
            let c = rows(c0);
            let p = &pieces[n];
            let (l, z0) = (c.len, &states[n * f * dv..][..f * dv]);
            let d_oc = &d_o[(bh * t + c0) * dv..][..l * dv];
            let dqb = &mut dqb[c0 * (f + 1)..][..l * (f + 1)];
            let (dk, dvc) = (&mut dkh[c0 * f..][..l * f], &mut dvh[c0 * dv..][..l * dv]);
            b.dbeta.clear();
            b.dbeta.resize(l, zero);
            b.dq.clear();
            b.dq.resize(l * f, zero);
            // dU = Sᵀ dO + (f ⊙ K̂) dZ₁; dK̂ gets f ⊙ (U dZ₁ᵀ).
            b.du.resize(l * dv, zero);
            gemm(
                &mut b.du,
                (l, dv, l),
                Strided::transposed_rows(&p.s, l),
                Strided::rows(d_oc, dv),
                None,
                one,
            );
            if let Some(dz) = &dz {
                scale_rows(&mut decayed, c.k, f, |i| pw[l - 1 - i]);
                gemm(
                    &mut b.du,
                    (l, dv, f),
                    Strided::rows(&decayed, f),
                    Strided::rows(dz, dv),
                    Some(one),
                    one,
                );
                b.tmp.resize(l * f, zero);
                gemm(
                    &mut b.tmp,
                    (l, f, dv),
                    Strided::rows(&p.u, dv),
                    Strided::transposed_rows(dz, dv),
                    None,
                    one,
                );
                for (i, (dst, src)) in dk
                    .chunks_exact_mut(f)
                    .zip(b.tmp.chunks_exact(f))
                    .enumerate()
                {
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(a, &x)| *a += x * pw[l - 1 - i]);
                }
            }
            // dQ gets r ⊙ (dO Z₀ᵀ).
            b.tmp.resize(l * f, zero);
            gemm(
                &mut b.tmp,
                (l, f, dv),
                Strided::rows(d_oc, dv),
                Strided::transposed_rows(z0, dv),
                None,
                one,
            );
            for (i, (dst, src)) in
                b.dq.chunks_exact_mut(f)
                    .zip(b.tmp.chunks_exact(f))
                    .enumerate()
            {
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(a, &x)| *a += x * pw[i + 1]);
            }
            // dS = (dO Uᵀ) ⊙ M; dQ gets dS K̂, dK̂ gets dSᵀ Q.
            b.ds.resize(l * l, zero);
            gemm(
                &mut b.ds,
                (l, l, dv),
                Strided::rows(d_oc, dv),
                Strided::transposed_rows(&p.u, dv),
                None,
                one,
            );
            mask_causal(&mut b.ds, l, pw);
            gemm(
                &mut b.dq,
                (l, f, l),
                Strided::rows(&b.ds, l),
                Strided::rows(c.k, f),
                Some(one),
                one,
            );
            gemm(
                dk,
                (l, f, l),
                Strided::transposed_rows(&b.ds, l),
                c.q(),
                Some(one),
                one,
            );
            // dW = −dU Z₀ᵀ; dT = dU V_bᵀ + dW K_bᵀ; dV_b = Tᵀ dU; dK_b = Tᵀ dW.
            b.dw.resize(l * f, zero);
            gemm(
                &mut b.dw,
                (l, f, dv),
                Strided::rows(&b.du, dv),
                Strided::transposed_rows(z0, dv),
                None,
                T::zero() - one,
            );
            b.dt.resize(l * l, zero);
            gemm(
                &mut b.dt,
                (l, l, dv),
                Strided::rows(&b.du, dv),
                Strided::transposed_rows(&p.vb, dv),
                None,
                one,
            );
            gemm(
                &mut b.dt,
                (l, l, f),
                Strided::rows(&b.dw, f),
                Strided::transposed_rows(&p.kb, f),
                Some(one),
                one,
            );
            b.dvb.resize(l * dv, zero);
            gemm(
                &mut b.dvb,
                (l, dv, l),
                Strided::transposed_rows(&p.tri, l),
                Strided::rows(&b.du, dv),
                None,
                one,
            );
            b.dkb.resize(l * f, zero);
            gemm(
                &mut b.dkb,
                (l, f, l),
                Strided::transposed_rows(&p.tri, l),
                Strided::rows(&b.dw, f),
                None,
                one,
            );
            // dA = −Tᵀ dT Tᵀ on the strictly lower triangle (dS's buffer is free again).
            gemm(
                &mut b.ds,
                (l, l, l),
                Strided::transposed_rows(&p.tri, l),
                Strided::rows(&b.dt, l),
                None,
                one,
            );
            gemm(
                &mut b.dt,
                (l, l, l),
                Strided::rows(&b.ds, l),
                Strided::transposed_rows(&p.tri, l),
                None,
                T::zero() - one,
            );
            // β's share of A, then dG = β_i γ^(i−j) dA_ij, and dK̂ gets (dG + dGᵀ) K̂.
            for (i, (row, g)) in
                b.dt.chunks_exact_mut(l)
                    .zip(p.g.chunks_exact(l))
                    .enumerate()
            {
                let mut sum = zero;
                for j in 0..l {
                    row[j] = if j < i {
                        sum += row[j] * pw[i - j] * g[j];
                        row[j] * pw[i - j] * c.beta(i)
                    } else {
                        zero
                    };
                }
                b.dbeta[i] += sum;
            }
            for dg in [Strided::rows(&b.dt, l), Strided::transposed_rows(&b.dt, l)] {
                gemm(dk, (l, f, l), dg, Strided::rows(c.k, f), Some(one), one);
            }
            // Through V_b = β ⊙ V and K_b = (β r) ⊙ K̂.
            for i in 0..l {
                let beta = c.beta(i);
                let (dvb, vi) = (&b.dvb[i * dv..][..dv], &c.v[i * dv..][..dv]);
                let mut sum = zero;
                for ((a, &g), &x) in dvc[i * dv..][..dv].iter_mut().zip(dvb).zip(vi) {
                    *a += beta * g;
                    sum += g * x;
                }
                let (dkb, ki) = (&b.dkb[i * f..][..f], &c.k[i * f..][..f]);
                let mut along = zero;
                for ((a, &g), &x) in dk[i * f..][..f].iter_mut().zip(dkb).zip(ki) {
                    *a += beta * pw[i + 1] * g;
                    along += g * x;
                }
                b.dbeta[i] += sum + pw[i + 1] * along;
            }
            for i in 0..l {
                let row = &mut dqb[i * (f + 1)..][..f + 1];
                row[..f].copy_from_slice(&b.dq[i * f..][..f]);
                row[f] = b.dbeta[i];
            }
            // The state before the chunk: dZ₀ = γ^L dZ₁ + (r ⊙ Q)ᵀ dO − Wᵀ dU (none before
            // the first).
            if n > 0 {
                // (r ⊙ Q)ᵀ dO as Qᵀ (r ⊙ dO): Q's rows are read in place.
                let mut next = vec![zero; f * dv];
                scale_rows(&mut decayed, d_oc, dv, |i| pw[i + 1]);
                gemm(
                    &mut next,
                    (f, dv, l),
                    Strided::transposed_rows(c.qb, f + 1),
                    Strided::rows(&decayed, dv),
                    None,
                    one,
                );
                gemm(
                    &mut next,
                    (f, dv, l),
                    Strided::transposed_rows(&p.w, f),
                    Strided::rows(&b.du, dv),
                    Some(one),
                    T::zero() - one,
                );
                if let Some(dz) = &dz {
                    for (a, &x) in next.iter_mut().zip(dz) {
                        *a += pw[l] * x;
                    }
                }
                dz = Some(next);
            }
        }
    });
    [dqb, sum_groups(&dk_h, f, d), sum_groups(&dv_h, dv, d)]
}

/// The backward's scratch, reused chunk to chunk.
struct Grads<T> {
    dq: Vec<T>,
    du: Vec<T>,
    ds: Vec<T>,
    dw: Vec<T>,
    dt: Vec<T>,
    dvb: Vec<T>,
    dkb: Vec<T>,
    dbeta: Vec<T>,
    tmp: Vec<T>,
}

impl<T> Default for Grads<T> {
    fn default() -> Self {
        let e = Vec::new;
        Grads {
            dq: e(),
            du: e(),
            ds: e(),
            dw: e(),
            dt: e(),
            dvb: e(),
            dkb: e(),
            dbeta: e(),
            tmp: e(),
        }
    }
}

impl CustomOp3 for DeltaChunks {
    fn name(&self) -> &'static str {
        "supra-delta-chunked"
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
        let o = match (qs, ks, vs) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(forward(
                    slice(qs, ql)?,
                    slice(ks, kl)?,
                    slice(vs, vl)?,
                    &self.gammas,
                    self.chunk,
                    d,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(forward(
                    slice(qs, ql)?,
                    slice(ks, kl)?,
                    slice(vs, vl)?,
                    &self.gammas,
                    self.chunk,
                    d,
                ))
            }
            _ => candle_core::bail!(
                "delta chunked: q|β, k̂, v are {:?}, {:?}, {:?}; all f32 or all f64",
                qs.dtype(),
                ks.dtype(),
                vs.dtype()
            ),
        };
        Ok((o, (d.batch, d.heads, d.len, d.value_dim).into()))
    }

    fn bwd(
        &self,
        qb: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(qb.dims(), k.dims(), v.dims())?;
        let (gammas, chunk) = (&self.gammas, self.chunk);
        op3_grads(
            [qb, k, v],
            d_o,
            "delta chunked",
            |s| backward(s, gammas, chunk, d),
            |s| backward(s, gammas, chunk, d),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::delta::chunk;
    use crate::attention::supra::{Decay, HeadDecays};
    use crate::testing::{assert_matches_composed, check_grad, randn_in};
    use candle_core::{DType, Var};

    /// Relu key features with some rows zero (a key of no features: its unit row is 0).
    fn keys(dtype: DType, dims: &[usize]) -> Var {
        let k = randn_in(dtype, 0.0, 1.0, dims).relu().unwrap();
        Var::from_tensor(&k).unwrap()
    }

    /// The op against the composed training form, values and the four gradients, f32 and
    /// f64: 2 sequences, 6 query heads over 2 kv heads, 13 tokens in chunks of 4 (a short
    /// last chunk) and of 64 (one chunk), d' ≠ d_v, with decays and without.
    #[test]
    fn matches_the_composed_form_and_its_gradients() {
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-11)] {
            let var = |dims: &[usize]| Var::from_tensor(&randn_in(dtype, 0.0, 1.0, dims)).unwrap();
            let (q, k, v, p) = (
                var(&[2, 6, 13, 5]),
                keys(dtype, &[2, 2, 13, 5]),
                var(&[2, 2, 13, 3]),
                var(&[6, 6]),
            );
            let r = randn_in(dtype, 0.0, 1.0, &[2, 6, 13, 3]);
            for gammas in [Decay::Lightning.gammas(6).unwrap(), vec![1.0; 6]] {
                for chunk_size in [4, 64, usize::MAX] {
                    let ours = chunked(&q, &k, &v, &p, &gammas, chunk_size).unwrap();
                    let fixed = HeadDecays::Fixed(gammas.clone());
                    let want = chunk::chunked(&q, &k, &v, &p, &fixed, chunk_size).unwrap();
                    let what = format!("{dtype:?}, γ {:.3}, chunks of {chunk_size}", gammas[0]);
                    assert_matches_composed((ours, want), &[&q, &k, &v, &p], &r, (tol, tol), &what);
                }
            }
        }
    }

    /// Central differences through the op, for each operand.
    #[test]
    fn gradients_match_finite_differences() {
        let gammas = Decay::Lightning.gammas(4).unwrap();
        let var = |dims: &[usize]| Var::from_tensor(&randn_in(DType::F64, 0.0, 1.0, dims)).unwrap();
        let (q, v, p) = (var(&[1, 4, 7, 3]), var(&[1, 2, 7, 2]), var(&[4, 4]));
        let k = Var::from_tensor(
            &(randn_in(DType::F64, 0.0, 1.0, &[1, 2, 7, 3])
                .relu()
                .unwrap()
                + 0.1)
                .unwrap(),
        )
        .unwrap();
        let r = randn_in(DType::F64, 0.0, 1.0, &[1, 4, 7, 2]);
        let loss = || {
            let o = chunked(&q, &k, &v, &p, &gammas, 3).unwrap();
            (o * &r).unwrap().sum_all().unwrap()
        };
        for (x, name) in [(&q, "q"), (&k, "k"), (&v, "v"), (&p, "β parameters")] {
            check_grad(x, loss, name);
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let t = |dims: &[usize], dtype| randn_in(dtype, 0.0, 1.0, dims);
        let g = Decay::Lightning.gammas(4).unwrap();
        let (q, v, p) = (
            t(&[1, 4, 7, 3], DType::F32),
            t(&[1, 2, 7, 2], DType::F32),
            t(&[4, 4], DType::F32),
        );
        // 3 kv heads do not divide 4 query heads; a key of another width; f64 among f32;
        // decays for 3 heads.
        assert!(chunked(&q, &t(&[1, 3, 7, 3], DType::F32), &v, &p, &g, 3).is_err());
        assert!(chunked(&q, &t(&[1, 2, 7, 4], DType::F32), &v, &p, &g, 3).is_err());
        assert!(chunked(
            &q,
            &t(&[1, 2, 7, 3], DType::F32),
            &v.to_dtype(DType::F64).unwrap(),
            &p,
            &g,
            3
        )
        .is_err());
        assert!(chunked(&q, &t(&[1, 2, 7, 3], DType::F32), &v, &p, &g[..3], 3).is_err());
    }
}
