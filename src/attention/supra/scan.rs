//! Inference on plain slices: the chunked form once per (sequence, query head), keys and values
//! read in place at their own heads ([`kv_head`]). Prefill and the single-token step both run
//! it (a step is a chunk of one token, with loops for its 1-row products: [`Chunk::run_one`]);
//! the state update below is the only one on this side.
//! At evaluation's shapes (tens of rows of ~100 tokens) and in decoding, a dozen small candle
//! operations per chunk cost more than the products themselves.

use super::Dims;
use crate::attention::kv_head;
use crate::model::gemm::{gemm, Strided};
use candle_core::WithDType;
use rayon::prelude::*;

/// q̃ (B, H, T, d'), k̃ (B, H_kv, T, d'), v (B, H_kv, T, d_v), row-major; `state` (B, H, d', d_v)
/// holds S before the first token and is left holding S after the last. Returns O (B, H, T, d_v).
pub fn scan<T: WithDType>(
    q: &[T],
    k: &[T],
    v: &[T],
    state: &mut [T],
    gammas: &[f64],
    chunk: usize,
    d: Dims,
) -> Vec<T> {
    let (t, dk, dv) = (d.len, d.feature_dim, d.value_dim);
    assert!(
        q.len() == d.batch * d.heads * t * dk
            && k.len() == d.batch * d.kv_heads * t * dk
            && v.len() == d.batch * d.kv_heads * t * dv
            && state.len() == d.batch * d.heads * dk * dv
            && gammas.len() == d.heads
            && chunk > 0,
        "scan: operands do not match {d:?}"
    );
    let chunk = chunk.min(t.max(1));
    let pows = powers(gammas, chunk);
    let mut out = vec![T::zero(); d.batch * d.heads * t * dv];
    let head = |bh: usize, s: &mut [T], o: &mut [T]| {
        let mut bufs = Buffers::default();
        for c0 in (0..t).step_by(chunk) {
            let one = Chunk::at((q, k, v), bh, (c0, chunk), d, &pows);
            let o = &mut o[c0 * dv..(c0 + one.len) * dv];
            if t == 1 {
                one.run_one(s, o, &mut bufs);
            } else {
                one.run(s, o, &mut bufs);
            }
        }
    };
    let heads = state.chunks_mut(dk * dv).zip(out.chunks_mut(t * dv));
    if t > 1 {
        let heads: Vec<_> = heads.enumerate().collect();
        heads
            .into_par_iter()
            .for_each(|(bh, (s, o))| head(bh, s, o));
    } else {
        // One token: less work per head than a task costs.
        heads.enumerate().for_each(|(bh, (s, o))| head(bh, s, o));
    }
    out
}

/// One head's decay powers for chunks of up to `chunk` tokens, e = 0..=chunk, each computed
/// in f64 as the composed training form computes it: the in-chunk mask from `powi`, the
/// per-row decays and the state's from `powf`.
pub(super) struct Powers<T> {
    pub mask: Vec<T>,
    pub rows: Vec<T>,
}

pub(super) fn powers<T: WithDType>(gammas: &[f64], chunk: usize) -> Vec<Powers<T>> {
    gammas
        .iter()
        .map(|g| Powers {
            mask: (0..=chunk).map(|e| T::from_f64(g.powi(e as i32))).collect(),
            rows: (0..=chunk).map(|e| T::from_f64(g.powf(e as f64))).collect(),
        })
        .collect()
}

/// 1/√d', as the composed form scales.
pub(super) fn scale<T: WithDType>(dk: usize) -> T {
    T::from_f64(1.0 / (dk as f64).sqrt())
}

pub(super) struct Buffers<T> {
    pub scores: Vec<T>,
    pub product: Vec<T>,
    pub decayed: Vec<T>,
}

impl<T> Default for Buffers<T> {
    fn default() -> Self {
        Self {
            scores: Vec::new(),
            product: Vec::new(),
            decayed: Vec::new(),
        }
    }
}

/// One chunk of one head. Every value is rounded as the composed form
/// ([`chunk`](super::chunk)) rounds it, step by step, so that the forms agree to the bit
/// where their products do, and training through [`fused`](super::fused) takes the same
/// steps as through the composed form.
pub(super) struct Chunk<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub len: usize,
    pub dk: usize,
    pub dv: usize,
    pub pow: &'a Powers<T>,
}

/// dst ← lhs·rhs, no scaling.
fn product<T: WithDType>(
    dst: &mut Vec<T>,
    dims: (usize, usize, usize),
    l: Strided<T>,
    r: Strided<T>,
) {
    dst.resize(dims.0 * dims.1, T::zero());
    gemm(dst, dims, l, r, None, T::one());
}

impl<'a, T: WithDType> Chunk<'a, T> {
    /// Tokens c0..c0 + chunk (fewer at the end) of row `bh` = sequence·H + head of q̃, with
    /// the keys and values of that head's kv head.
    pub fn at(
        (q, k, v): (&'a [T], &'a [T], &'a [T]),
        bh: usize,
        (c0, chunk): (usize, usize),
        d: Dims,
        pows: &'a [Powers<T>],
    ) -> Self {
        let (t, dk, dv) = (d.len, d.feature_dim, d.value_dim);
        let (b, h) = (bh / d.heads, bh % d.heads);
        let kv = b * d.kv_heads + kv_head(h, d.heads, d.kv_heads);
        let len = chunk.min(t - c0);
        Chunk {
            q: &q[(bh * t + c0) * dk..][..len * dk],
            k: &k[(kv * t + c0) * dk..][..len * dk],
            v: &v[(kv * t + c0) * dv..][..len * dv],
            len,
            dk,
            dv,
            pow: &pows[h],
        }
    }

    /// A = ((Q̃ K̃ᵀ)·(1/√d')) ⊙ D into `a` (len × len), D[i, j] = γ^(i−j) for j ≤ i, else 0.
    pub fn scores(&self, a: &mut Vec<T>) {
        let (len, dk, mask) = (self.len, self.dk, &self.pow.mask);
        let (qm, km) = (
            Strided::rows(self.q, dk),
            Strided::transposed_rows(self.k, dk),
        );
        product(a, (len, len, dk), qm, km);
        let sc = scale::<T>(dk);
        for (i, row) in a.chunks_exact_mut(len).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = if j <= i {
                    *x * sc * mask[i - j]
                } else {
                    T::zero()
                };
            }
        }
    }

    /// Rows of `x` (len × width), row i times γ^(i+1): how q̃_i reads the state before the
    /// chunk.
    pub fn query_decayed(&self, x: &[T], width: usize, out: &mut Vec<T>) {
        out.clear();
        for (i, row) in x.chunks_exact(width).enumerate() {
            out.extend(row.iter().map(|&a| a * self.pow.rows[i + 1]));
        }
    }

    /// Rows of `x` (len × width), row j times γ^(len−1−j): how k̃_j enters the state after
    /// the chunk.
    pub fn key_decayed(&self, x: &[T], width: usize, out: &mut Vec<T>) {
        out.clear();
        for (j, row) in x.chunks_exact(width).enumerate() {
            out.extend(row.iter().map(|&a| a * self.pow.rows[self.len - 1 - j]));
        }
    }

    /// o (len × d_v) ← (Q̃K̃ᵀ/√d' ⊙ D) V + (q̃_i S) γ^(i+1), then the state update.
    pub fn run(&self, s: &mut [T], o: &mut [T], bufs: &mut Buffers<T>) {
        let (len, dk, dv) = (self.len, self.dk, self.dv);
        // Inside the chunk: O = A V.
        self.scores(&mut bufs.scores);
        let (a, v) = (Strided::rows(&bufs.scores, len), Strided::rows(self.v, dv));
        gemm(o, (len, dv, len), a, v, None, T::one());
        // From earlier chunks: O += (q̃_i S) γ^(i+1).
        let p = &mut bufs.product;
        product(
            p,
            (len, dv, dk),
            Strided::rows(self.q, dk),
            Strided::rows(s, dv),
        );
        for (i, (o, p)) in o.chunks_exact_mut(dv).zip(p.chunks_exact(dv)).enumerate() {
            let g = self.pow.rows[i + 1];
            o.iter_mut().zip(p).for_each(|(o, &p)| *o += p * g);
        }
        self.update(s, bufs);
    }

    /// [`Self::run`] for a decoding step's one token, with loops instead of the three product
    /// calls, each of which packed its operands for a 1 × 1, 1 × d_v or 1 × d' product: a
    /// batched step makes them once per sequence, head and layer. The sums over d' run in
    /// index order, so a step's values may differ from the chunked form's in the last bits
    /// (both are held to the definition); the training form (`fused`), held to the composed
    /// one to the bit, keeps [`Self::run`].
    ///
    /// The read q̃S and the update go over the state once, row by row (each row read before
    /// it is rewritten): at a batch of 8 the states are tens of MB a step, and a second pass
    /// over them cost as much as the arithmetic. The values are those of a read followed by
    /// [`Self::update`] (a test holds them to the bit).
    fn run_one(&self, s: &mut [T], o: &mut [T], bufs: &mut Buffers<T>) {
        let (dk, dv) = (self.dk, self.dv);
        let sc = scale::<T>(dk);
        let dot = self
            .q
            .iter()
            .zip(self.k)
            .fold(T::zero(), |a, (&q, &k)| a + q * k);
        let a = dot * sc * self.pow.mask[0];
        let p = &mut bufs.product;
        p.clear();
        p.resize(dv, T::zero());
        for ((&qi, &ki), row) in self.q.iter().zip(self.k).zip(s.chunks_exact_mut(dv)) {
            p.iter_mut()
                .zip(row.iter())
                .for_each(|(p, &sij)| *p += qi * sij);
            self.update_row(row, ki, sc);
        }
        let g = self.pow.rows[1];
        for ((o, &v), &p) in o.iter_mut().zip(self.v).zip(p.iter()) {
            *o = a * v + p * g;
        }
    }

    /// The state update S ← γ^len S + (Σ_j γ^(len−1−j) k̃_jᵀ v_j)/√d'.
    pub fn update(&self, s: &mut [T], bufs: &mut Buffers<T>) {
        if self.len == 1 {
            let sc = scale::<T>(self.dk);
            // A decoding step's rank-one update without the product's call and packing (a
            // good part of a batched step's per-sequence work): each k̃_i·v_j is one rounded
            // product either way (γ^0 = 1), so the state is the same to the bit.
            for (row, &ki) in s.chunks_exact_mut(self.dv).zip(self.k) {
                self.update_row(row, ki, sc);
            }
            return;
        }
        self.update_by_product(s, bufs);
    }

    /// A one-token chunk's update of the state's row for feature i: s_i ← γ s_i + (k̃_i γ^0) v / √d'.
    fn update_row(&self, row: &mut [T], ki: T, sc: T) {
        let (whole, ki) = (self.pow.rows[1], ki * self.pow.rows[0]);
        row.iter_mut()
            .zip(self.v)
            .for_each(|(s, &vj)| *s = *s * whole + ki * vj * sc);
    }

    /// [`Self::update`] through the product, for any chunk length.
    fn update_by_product(&self, s: &mut [T], bufs: &mut Buffers<T>) {
        let (len, dk, dv) = (self.len, self.dk, self.dv);
        let (whole, sc) = (self.pow.rows[len], scale::<T>(dk));
        self.key_decayed(self.k, dk, &mut bufs.decayed);
        let kdt = Strided::transposed_rows(&bufs.decayed, dk);
        product(
            &mut bufs.product,
            (dk, dv, len),
            kdt,
            Strided::rows(self.v, dv),
        );
        s.iter_mut()
            .zip(&bufs.product)
            .for_each(|(s, &u)| *s = *s * whole + u * sc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic test values in [−1.3, 1.35).
    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 377.0 - 1.3)
            .collect()
    }

    /// One sequence, one head, one token; d' = 12 in the tests, where 1/√12 is not a power of
    /// two, so the order of rounding shows.
    fn one_token(dk: usize, dv: usize) -> Dims {
        Dims {
            batch: 1,
            heads: 1,
            kv_heads: 1,
            len: 1,
            feature_dim: dk,
            value_dim: dv,
        }
    }

    /// A step's rank-one update gives the state the product gives, to the bit.
    #[test]
    fn one_token_update_is_the_products() {
        let (dk, dv) = (12, 8);
        let (q, k, v) = (vals(dk, 1), vals(dk, 2), vals(dv, 3));
        let pows = powers::<f32>(&[0.93], 1);
        let d = one_token(dk, dv);
        let one = Chunk::at((&q, &k, &v), 0, (0, 1), d, &pows);
        let s0 = vals(dk * dv, 4);
        let (mut fast, mut general) = (s0.clone(), s0);
        one.update(&mut fast, &mut Buffers::default());
        one.update_by_product(&mut general, &mut Buffers::default());
        assert_eq!(fast, general);
    }

    /// A step's one pass over the state gives what reading it and then updating it give, to
    /// the bit: the output from the old state, the state from [`Chunk::update`].
    #[test]
    fn one_token_step_reads_then_updates() {
        let (dk, dv) = (12, 8);
        let (q, k, v) = (vals(dk, 5), vals(dk, 6), vals(dv, 7));
        let pows = powers::<f32>(&[0.9], 1);
        let d = one_token(dk, dv);
        let one = Chunk::at((&q, &k, &v), 0, (0, 1), d, &pows);
        let s0 = vals(dk * dv, 8);
        // The definition: o = (q̃·k̃/√d') v + (q̃ S) γ, then S ← γ S + k̃ᵀv/√d'.
        let a = q.iter().zip(&k).fold(0f32, |a, (&q, &k)| a + q * k)
            * scale::<f32>(dk)
            * pows[0].mask[0];
        let mut read = vec![0f32; dv];
        for (&qi, row) in q.iter().zip(s0.chunks_exact(dv)) {
            read.iter_mut()
                .zip(row)
                .for_each(|(p, &sij)| *p += qi * sij);
        }
        let want: Vec<f32> = v
            .iter()
            .zip(&read)
            .map(|(&v, &p)| a * v + p * pows[0].rows[1])
            .collect();
        let mut want_state = s0.clone();
        one.update(&mut want_state, &mut Buffers::default());
        let (mut state, mut o) = (s0, vec![0f32; dv]);
        one.run_one(&mut state, &mut o, &mut Buffers::default());
        assert_eq!(o, want);
        assert_eq!(state, want_state);
    }
}
