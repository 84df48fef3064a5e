//! Softmax attention (the teacher): o_t = Σ_{i≤t} softmax_i(q_t·k_i/√d) v_i, with GQA and RoPE.
//!
//! Forms, side by side: [`naive`] (the definition in f64, for tests); the score matrix in candle
//! ops (differentiable: training, and tensors other than f32); and for inference, prefill and
//! the single-token step alike, [`blockwise`]: an online softmax (FlashAttention's loop on the
//! CPU) that never holds more than a block of scores. At 32k tokens of context a 1,024-token
//! chunk's scores are 400 MB per layer, which the candle form writes and rereads four times
//! (mask, softmax, product).

use crate::attention::{kv_head, repeat_kv, Exec, Projections};
use crate::model::gemm::{gemm, Strided};
use crate::model::rope::Rope;
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, Device, Layout, Storage, Tensor};
use candle_nn::kv_cache::KvCache;
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct SoftmaxAttention {
    pub proj: Projections,
    pub rope: Rope,
}

/// Additive mask for `t` new queries at positions offset..offset+t over offset+t keys.
fn causal_mask(t: usize, offset: usize, device: &candle_core::Device) -> Result<Tensor> {
    let total = t + offset;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?)
}

impl SoftmaxAttention {
    /// `x`: (batch, seq, hidden) at positions offset..offset+seq. With a cache, keys and values of
    /// earlier positions come from it and the new ones are appended.
    pub fn forward(
        &self,
        x: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        exec: Exec,
    ) -> Result<Tensor> {
        let y = self.heads_output(x, offset, cache, exec)?;
        self.proj.output(&y, exec)
    }

    /// Per-head attention output (batch, heads, seq, head_dim), before Wo.
    pub fn heads_output(
        &self,
        x: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        exec: Exec,
    ) -> Result<Tensor> {
        let (q, k, v) = self.proj.heads(x, exec)?;
        self.attend(q, k, v, offset, cache, exec)
    }

    /// One token of one sequence from its q, k and v rows (all heads side by side), its keys
    /// and values appended to `cache`. Returns the per-head outputs (H·d) before Wo. A batched
    /// decoding step runs this row by row, so a sequence's output does not depend on the others.
    pub fn step(
        &self,
        [q, k, v]: [Vec<f32>; 3],
        offset: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let (h, hkv, d) = (self.proj.n_heads, self.proj.n_kv_heads, self.proj.head_dim);
        let heads = |x: Vec<f32>, n: usize| Tensor::from_vec(x, (1, n, 1, d), &Device::Cpu);
        let y = self.attend(
            heads(q, h)?,
            heads(k, hkv)?,
            heads(v, hkv)?,
            offset,
            Some(cache),
            Exec::Infer,
        )?;
        Ok(y.flatten_all()?.to_vec1()?)
    }

    /// Attention of q (B, H, T, d) at positions offset.. over k and v (B, H_kv, T, d) before
    /// RoPE, after what `cache` holds: (B, H, T, d).
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        exec: Exec,
    ) -> Result<Tensor> {
        let (h, t, d) = (self.proj.n_heads, q.dim(2)?, self.proj.head_dim);
        let (q, k) = (
            self.rope.apply(&q, offset, exec)?,
            self.rope.apply(&k, offset, exec)?,
        );
        // The cache hands back views into its buffer; both forms read them strided.
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        if exec == Exec::Infer {
            if let Some(y) = blockwise(&q, &k, &v)? {
                return Ok(y);
            }
        }
        // The score matrix in candle ops: differentiable, and the form for what the blockwise
        // kernel does not take (tensors other than f32).
        let (k, v) = (repeat_kv(&k, h)?, repeat_kv(&v, h)?);
        let scale = 1.0 / (d as f64).sqrt();
        let mut att = (q * scale)?.matmul(&k.t()?)?;
        if t > 1 {
            let mask = causal_mask(t, k.dim(2)? - t, att.device())?.to_dtype(att.dtype())?;
            att = att.broadcast_add(&mask)?;
        }
        // The fused softmax has no backward.
        let att = match exec {
            Exec::Train => candle_nn::ops::softmax(&att, candle_core::D::Minus1)?,
            Exec::Infer => candle_nn::ops::softmax_last_dim(&att)?,
        };
        Ok(att.matmul(&v.contiguous()?)?)
    }
}

/// Query positions per block of [`blockwise`] (times the group's query heads: the rows that
/// share one pass over the keys) and keys per block: a block's scores, (3·32) × 256 floats,
/// and its output rows stay in L2.
const BLOCK_QUERIES: usize = 32;
const BLOCK_KEYS: usize = 256;

/// A (batch, heads, seq, d) f32 CPU tensor with unit stride on d (a KV cache's views qualify).
struct View<'a> {
    data: &'a [f32],
    /// Strides of batch, head and position.
    strides: [usize; 3],
}

impl<'a> View<'a> {
    fn new(storage: &'a Storage, layout: &Layout) -> Option<Self> {
        let Storage::Cpu(CpuStorage::F32(data)) = storage else {
            return None;
        };
        let s = layout.stride();
        (s.len() == 4 && s[3] == 1).then(|| View {
            data: &data[layout.start_offset()..],
            strides: [s[0], s[1], s[2]],
        })
    }

    /// Offset of (batch, head, position, 0).
    fn at(&self, b: usize, h: usize, p: usize) -> usize {
        b * self.strides[0] + h * self.strides[1] + p * self.strides[2]
    }
}

/// Causal softmax attention of `q` (b, h, t, d) at the last t positions of `k`, `v`
/// (b, h_kv, offset + t, d), without the score matrix: each block of query rows walks the keys
/// up to its last position in blocks, keeping per row the running max m and sum l of
/// exp(score − m) and rescaling its output when m grows. `None` when the tensors are not f32
/// on the CPU (the candle form serves them).
pub fn blockwise(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    let (b, h, t, d) = q.dims4()?;
    let (_, hkv, len, _) = k.dims4()?;
    ensure!(
        len >= t && h % hkv == 0 && v.dims4()? == (b, hkv, len, d),
        "attention shapes: q {:?}, k {:?}, v {:?}",
        q.dims(),
        k.dims(),
        v.dims()
    );
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Some(qv), Some(kv), Some(vv)) =
        (View::new(&qs, ql), View::new(&ks, kl), View::new(&vs, vl))
    else {
        return Ok(None);
    };
    // The query heads of each key/value head, once per call.
    let groups: Vec<Vec<usize>> = (0..hkv)
        .map(|g| (0..h).filter(|&i| kv_head(i, h, hkv) == g).collect())
        .collect();
    let blocks = t.div_ceil(BLOCK_QUERIES);
    let scale = 1.0 / (d as f32).sqrt();
    let items: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..hkv).flat_map(move |g| (0..blocks).map(move |blk| (bi, g, blk))))
        .collect();
    let outputs: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(bi, g, blk)| {
            let p0 = blk * BLOCK_QUERIES;
            let p1 = (p0 + BLOCK_QUERIES).min(t);
            let group = Group {
                q: &qv,
                k: &kv,
                v: &vv,
                b: bi,
                heads: &groups[g],
                kv_head: g,
                d,
                offset: len - t,
            };
            group.attend(p0..p1, scale)
        })
        .collect();
    // Rows of a block are its heads' positions, head-major.
    let mut out = vec![0f32; b * h * t * d];
    for (&(bi, g, blk), o) in items.iter().zip(&outputs) {
        let p0 = blk * BLOCK_QUERIES;
        let tq = o.len() / (groups[g].len() * d);
        for (&head, row) in groups[g].iter().zip(o.chunks_exact(tq * d)) {
            let at = ((bi * h + head) * t + p0) * d;
            out[at..at + tq * d].copy_from_slice(row);
        }
    }
    Ok(Some(Tensor::from_vec(out, (b, h, t, d), q.device())?))
}

/// The query heads of one key/value head, in one batch row.
struct Group<'a> {
    q: &'a View<'a>,
    k: &'a View<'a>,
    v: &'a View<'a>,
    b: usize,
    /// The query heads that read `kv_head`.
    heads: &'a [usize],
    kv_head: usize,
    d: usize,
    /// Position of the first query.
    offset: usize,
}

impl Group<'_> {
    /// Outputs (heads × positions, d) of the queries at `positions` (relative to `offset`).
    fn attend(&self, positions: std::ops::Range<usize>, scale: f32) -> Vec<f32> {
        let (d, tq) = (self.d, positions.len());
        let rows = self.heads.len() * tq;
        let mut q = Vec::with_capacity(rows * d);
        for &h in self.heads {
            for p in positions.clone() {
                let at = self.q.at(self.b, h, p);
                q.extend(self.q.data[at..at + d].iter().map(|x| x * scale));
            }
        }
        let mut o = vec![0f32; rows * d];
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut s = vec![0f32; rows * BLOCK_KEYS];
        let first = self.offset + positions.start;
        let end = self.offset + positions.end;
        for j0 in (0..end).step_by(BLOCK_KEYS) {
            let n = BLOCK_KEYS.min(end - j0);
            let (k, v) = (
                self.k.at(self.b, self.kv_head, j0),
                self.v.at(self.b, self.kv_head, j0),
            );
            let s = &mut s[..rows * n];
            let keys = Strided::transposed_rows(&self.k.data[k..], self.k.strides[2]);
            gemm(s, (rows, n, d), Strided::rows(&q, d), keys, None, 1.0);
            // Keys after a row's own position, in the blocks that reach past the first query.
            if j0 + n > first + 1 {
                for (r, row) in s.chunks_exact_mut(n).enumerate() {
                    let own = first + r % tq;
                    for x in row.iter_mut().skip((own + 1).saturating_sub(j0)) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            for (r, row) in s.chunks_exact_mut(n).enumerate() {
                // Key 0 is in every row's first block, so the running max is finite from there.
                let m = max[r].max(row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)));
                let rescale = (max[r] - m).exp();
                sum[r] = sum[r] * rescale + exp_shifted(row, m);
                if rescale != 1.0 {
                    o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= rescale);
                }
                max[r] = m;
            }
            let values = Strided::rows(&self.v.data[v..], self.v.strides[2]);
            gemm(
                &mut o,
                (rows, d, n),
                Strided::rows(s, n),
                values,
                Some(1.0),
                1.0,
            );
        }
        for (row, l) in o.chunks_exact_mut(d).zip(&sum) {
            row.iter_mut().for_each(|x| *x /= l);
        }
        o
    }
}

/// x ← exp(x − m) over `row`, returning Σ. The scores are most of the work at long contexts,
/// and libm's exp one at a time cost as much as the two products.
pub(crate) fn exp_shifted(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { exp_shifted_avx2(row, m) };
    }
    exp_shifted_portable(row, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], m: f32) -> f32 {
    exp_shifted_portable(row, m)
}

/// Lanes of eight so the compiler keeps [`exp`] in vector registers.
#[inline(always)]
fn exp_shifted_portable(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = exp(c[i] - m);
            acc[i] += c[i];
        }
    }
    let mut total: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - m);
        total += *x;
    }
    total + acc.iter().sum::<f32>()
}

/// e^x to about 2 ulp (Cephes' expf: x = n ln 2 + r, |r| ≤ ln2/2, a degree-6 polynomial in r,
/// 2^n from the exponent bits); 0 below about −87.7 (n = −127 gives the bits of 0.0), so −∞
/// gives 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: n·C1 is exact for the n that occur.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-88.376_26, 88.376_26);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1 - n * C2;
    // Plain products and sums: mul_add without FMA hardware is a libm call.
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2^n from the bits of n + 127 + 2^23, whose low mantissa bits are n + 127: a float → int
    // cast would saturate lane by lane, in scalar code.
    y * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

/// The definition, in f64: the output of the queries `q` (b, h, t, d) at the last t positions
/// of the keys and values `k`, `v` (b, h_kv, len, d), each query head reading key/value head
/// h / (h / h_kv) — written out here, not through [`kv_head`], so that tests check the mapping
/// too. The reference the tests hold both forms to.
pub fn naive(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Vec<f64>> {
    let (b, h, t, d) = q.dims4()?;
    let (_, hkv, len, _) = k.dims4()?;
    let data = |x: &Tensor| -> Result<Vec<f64>> {
        Ok(x.to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let (q, k, v) = (data(q)?, data(k)?, data(v)?);
    let mut out = Vec::with_capacity(b * h * t * d);
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / (h / hkv);
            let kv = |x: &[f64], j: usize, c: usize| x[((bi * hkv + g) * len + j) * d + c];
            for i in 0..t {
                let qi = &q[((bi * h + hi) * t + i) * d..][..d];
                let own = len - t + i;
                let scores: Vec<f64> = (0..=own)
                    .map(|j| (0..d).map(|c| qi[c] * kv(&k, j, c)).sum::<f64>() / (d as f64).sqrt())
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for c in 0..d {
                    out.push((0..=own).map(|j| w[j] * kv(&v, j, c)).sum::<f64>() / z);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linear::Linear;
    use candle_core::Device;

    fn max_err(got: &Tensor, want: &[f64]) -> f64 {
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max)
    }

    fn randn(shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::randn(0f32, 2.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn blockwise_matches_the_definition_across_blocks_and_groups() {
        // Queries over two query blocks, keys over two key blocks, 3 query heads per kv head.
        let (b, h, hkv, t, d) = (2, 6, 2, 70, 16);
        for offset in [0, 230] {
            let q = randn((b, h, t, d));
            let k = randn((b, hkv, offset + t, d));
            let v = randn((b, hkv, offset + t, d));
            let got = blockwise(&q, &k, &v).unwrap().expect("f32 CPU tensors");
            let err = max_err(&got, &naive(&q, &k, &v).unwrap());
            assert!(err < 1e-5, "offset {offset}: max error {err}");
        }
    }

    #[test]
    fn blockwise_reads_the_kv_cache_views_in_place() {
        // The cache hands back narrowed views of a longer buffer: strided rows per head.
        let (h, hkv, d) = (4, 2, 8);
        let mut cache = KvCache::new(2, 1024);
        let (k0, v0) = (randn((1, hkv, 300, d)), randn((1, hkv, 300, d)));
        cache.append(&k0, &v0).unwrap();
        let (k1, v1) = (randn((1, hkv, 45, d)), randn((1, hkv, 45, d)));
        let (k, v) = cache.append(&k1, &v1).unwrap();
        assert!(!k.is_contiguous(), "the test wants a strided view");
        let q = randn((1, h, 45, d));
        let got = blockwise(&q, &k, &v).unwrap().unwrap();
        let want = naive(&q, &k, &v).unwrap();
        let err = max_err(&got, &want);
        assert!(err < 1e-5, "max error {err}");
    }

    /// The layer's training form and its inference form (one pass, and a prefill continued
    /// one token at a time through a KV cache) give the same output, with GQA.
    #[test]
    fn layer_forms_agree() {
        let dev = Device::Cpu;
        let (h, hkv, d, hidden, t) = (6, 2, 8, 24, 40);
        let w = |r: usize, c: usize| {
            Linear::new(
                Tensor::randn(0f32, (1.0 / c as f32).sqrt(), (r, c), &dev).unwrap(),
                None,
            )
        };
        let layer = SoftmaxAttention {
            proj: Projections {
                q: w(h * d, hidden),
                k: w(hkv * d, hidden),
                v: w(hkv * d, hidden),
                o: w(hidden, h * d),
                n_heads: h,
                n_kv_heads: hkv,
                head_dim: d,
            },
            rope: Rope::new(d, 10_000.0, 64, &dev).unwrap(),
        };
        let x = Tensor::randn(0f32, 1.0, (2, t, hidden), &dev).unwrap();
        let train = layer.forward(&x, 0, None, Exec::Train).unwrap();
        let infer = layer.forward(&x, 0, None, Exec::Infer).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&train, &infer) < 1e-5, "{}", diff(&train, &infer));
        let mut cache = KvCache::new(2, 8);
        let x0 = x.narrow(0, 0, 1).unwrap();
        let mut outs = vec![layer
            .forward(
                &x0.narrow(1, 0, 25).unwrap(),
                0,
                Some(&mut cache),
                Exec::Infer,
            )
            .unwrap()];
        for i in 25..t {
            let xi = x0.narrow(1, i, 1).unwrap();
            outs.push(
                layer
                    .forward(&xi, i, Some(&mut cache), Exec::Infer)
                    .unwrap(),
            );
        }
        let stepped = Tensor::cat(&outs, 1).unwrap();
        let d = diff(&stepped, &train.narrow(0, 0, 1).unwrap());
        assert!(d < 1e-5, "prefill + steps: {d}");
    }

    #[test]
    fn fast_exp_is_close_to_libm_and_zero_far_below() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max((exp(x) as f64 - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        let mut row = [
            0.0f32,
            -1.0,
            2.0,
            f32::NEG_INFINITY,
            0.5,
            1.0,
            -3.0,
            0.25,
            4.0,
            -0.5,
        ];
        let want: Vec<f32> = row.iter().map(|x| (x - 4.0).exp()).collect();
        let sum = exp_shifted(&mut row, 4.0);
        for (g, w) in row.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.max(1e-30), "{g} vs {w}");
        }
        assert!((sum - want.iter().sum::<f32>()).abs() < 1e-6);
    }
}
