//! Block-quantized weight matrices for inference, in ggml's two simplest formats: Q8_0 (blocks
//! of 32 weights as int8 with one scale: x ≈ d·q) and Q4_0 (blocks of 32 as 4-bit q with one
//! scale: x ≈ d·(q − 8)). Each row is quantized on its own, so a row is a run of blocks.
//!
//! Decoding reads every weight once per step: Q8_0 reads 4× fewer bytes than f32, Q4_0 7×. The
//! kernel for a few input rows (one decoding step of one sequence or of a batch) does what
//! llama.cpp does: it quantizes the inputs to 8-bit blocks too and takes integer dot products of
//! blocks (AVX-512 VNNI's `vpdpbusd` over up to four inputs at once where the CPU has it, else
//! AVX2 `maddubs`), one float multiply-add per block. A prompt's rows take the same kernel: each
//! group of four weight rows meets every input row while it is in L1, so the matrix is read
//! once per call whatever the number of rows, and never dequantized.
//!
//! Scales are kept as f32 (ggml stores f16): 1/32 more memory for exactly the block values.
//! Rows are stored in groups of four with their blocks interleaved (row 0 block 0, row 1 block 0,
//! …, row 0 block 1, …), as llama.cpp repacks them: the kernel runs four independent dot
//! products while reading memory in order.

use crate::model::spin;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// How a model's matrices are stored for inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    #[default]
    F32,
    /// 8-bit blocks of 32 (8.5 bits per weight in ggml, 9 here with f32 scales).
    Q8_0,
    /// 4-bit blocks of 32.
    Q4_0,
}

impl std::str::FromStr for WeightFormat {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown weight format '{s}' (known: f32, q8_0, q4_0)"))
    }
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 3] = [Self::F32, Self::Q8_0, Self::Q4_0];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }
}

pub const BLOCK: usize = 32;
/// Rows whose blocks are interleaved.
const GROUP: usize = 4;
/// Inputs a kernel takes against one group of rows at once.
const TILE: usize = 4;

#[derive(Debug, Clone)]
pub struct QMatrix {
    format: WeightFormat,
    rows: usize,
    cols: usize,
    /// One per block, in block order (see [`QMatrix::block_index`]).
    scales: Vec<f32>,
    /// Q8_0: 32 signed bytes a block. Q4_0: 16 bytes a block; byte j holds element j in its
    /// low nibble and element j + 16 in its high one (ggml's order).
    quants: Vec<u8>,
}

impl QMatrix {
    /// Quantizes a (rows, cols) f32 matrix; cols must be a multiple of 32.
    pub fn quantize(w: &Tensor, format: WeightFormat) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        if format == WeightFormat::F32 {
            bail!("f32 is not a block format");
        }
        if cols % BLOCK != 0 {
            bail!(
                "cannot quantize a matrix of {cols} columns to {}: blocks are {BLOCK} wide",
                format.name()
            );
        }
        let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let nb = cols / BLOCK;
        let bb = Self::block_bytes(format);
        let mut m = Self {
            format,
            rows,
            cols,
            scales: vec![0f32; rows * nb],
            quants: vec![0u8; rows * nb * bb],
        };
        // Row by row into a plain layout, then moved into block order.
        let mut plain_s = vec![0f32; rows * nb];
        let mut plain_q = vec![0u8; rows * nb * bb];
        plain_s
            .par_chunks_mut(nb)
            .zip(plain_q.par_chunks_mut(nb * bb))
            .zip(data.par_chunks(cols))
            .for_each(|((s, q), x)| {
                for b in 0..nb {
                    let xb = &x[b * BLOCK..(b + 1) * BLOCK];
                    let qb = &mut q[b * bb..(b + 1) * bb];
                    s[b] = match format {
                        WeightFormat::Q8_0 => quantize_q8(xb, qb),
                        _ => quantize_q4(xb, qb),
                    };
                }
            });
        for row in 0..rows {
            for b in 0..nb {
                let (from, to) = (row * nb + b, m.block_index(row, b));
                m.scales[to] = plain_s[from];
                m.quants[to * bb..(to + 1) * bb]
                    .copy_from_slice(&plain_q[from * bb..(from + 1) * bb]);
            }
        }
        Ok(m)
    }

    fn block_bytes(format: WeightFormat) -> usize {
        match format {
            WeightFormat::Q4_0 => BLOCK / 2,
            _ => BLOCK,
        }
    }

    /// Where block `b` of `row` is stored: rows in whole groups of four have their blocks
    /// interleaved, the last `rows % 4` rows follow one after another.
    fn block_index(&self, row: usize, b: usize) -> usize {
        let nb = self.cols / BLOCK;
        let grouped = self.rows / GROUP * GROUP;
        if row < grouped {
            (row / GROUP * nb + b) * GROUP + row % GROUP
        } else {
            grouped * nb + (row - grouped) * nb + b
        }
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn bytes(&self) -> usize {
        self.scales.len() * 4 + self.quants.len()
    }

    /// The f32 matrix the blocks stand for.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let bb = Self::block_bytes(self.format);
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(row, y)| {
                for (b, yb) in y.chunks_mut(BLOCK).enumerate() {
                    let k = self.block_index(row, b);
                    let qb = &self.quants[k * bb..(k + 1) * bb];
                    for (j, v) in yb.iter_mut().enumerate() {
                        *v = self.scales[k] * block_value(self.format, qb, j);
                    }
                }
            });
        Ok(Tensor::from_vec(out, (self.rows, self.cols), device)?)
    }

    /// y = x Wᵀ for `n` input rows of `cols` values each (row-major in `xs`); returns
    /// `n × rows` values, row-major. The inputs are quantized to 8-bit blocks first.
    pub fn product(&self, xs: &[f32], n: usize) -> Vec<f32> {
        assert!(n >= 1 && xs.len() == n * self.cols);
        let nb = self.cols / BLOCK;
        let mut x_scales = vec![0f32; n * nb];
        let mut x_quants = vec![0u8; n * self.cols];
        if n > 64 {
            // A prompt's rows: quantized on both cores (on one, the other core waits for it);
            // a decoding step's few rows are not worth waking the pool for.
            x_scales
                .par_chunks_mut(nb)
                .zip(x_quants.par_chunks_mut(self.cols))
                .zip(xs.par_chunks(self.cols))
                .with_min_len(8)
                .for_each(|((s, q), x)| quantize_q8_row(x, s, q));
        } else {
            quantize_q8_row(xs, &mut x_scales, &mut x_quants);
        }
        let inputs: Vec<Input> = (0..n)
            .map(|r| Input {
                scales: &x_scales[r * nb..(r + 1) * nb],
                quants: &x_quants[r * self.cols..(r + 1) * self.cols],
            })
            .collect();
        // Rows split across the cores; each group of four rows meets every input row while its
        // blocks are in L1, so a batch of decoding steps reads the weights once.
        let mut out = vec![0f32; n * self.rows];
        let dst = spin::OutPtr(out.as_mut_ptr());
        spin::for_each_part(&|part| {
            let rows = spin::split(self.rows, GROUP, part);
            let len = rows.len();
            let mut y = vec![0f32; n * len];
            self.dot_rows(rows.clone(), &inputs, &mut y);
            for r in 0..n {
                // SAFETY: the parts' row ranges are disjoint and inside `out`, which outlives
                // the call.
                unsafe { dst.write(r * self.rows + rows.start, &y[r * len..(r + 1) * len]) };
            }
        });
        out
    }

    /// out[r · len + i] = dot(row rows.start + i, xs[r]) for a range of len rows that starts on
    /// a group boundary.
    fn dot_rows(&self, rows: std::ops::Range<usize>, xs: &[Input], out: &mut [f32]) {
        let len = rows.len();
        let grouped_end = (self.rows / GROUP * GROUP).min(rows.end);
        let bb = Self::block_bytes(self.format);
        let mut row = rows.start;
        while row + GROUP <= grouped_end {
            let first = self.block_index(row, 0);
            for (t, tile) in xs.chunks(TILE).enumerate() {
                let mut o = [[0f32; GROUP]; TILE];
                dot_group(
                    self.format,
                    &self.scales[first..],
                    &self.quants[first * bb..],
                    tile,
                    &mut o[..tile.len()],
                );
                for (i, o) in o[..tile.len()].iter().enumerate() {
                    let at = (t * TILE + i) * len + row - rows.start;
                    out[at..at + GROUP].copy_from_slice(o);
                }
            }
            row += GROUP;
        }
        for row in row..rows.end {
            for (r, x) in xs.iter().enumerate() {
                out[r * len + row - rows.start] = self.dot_row_portable(row, x);
            }
        }
    }

    /// One row's dot product, in integers per block as the kernel computes it.
    fn dot_row_portable(&self, row: usize, x: &Input) -> f32 {
        let bb = Self::block_bytes(self.format);
        (0..self.cols / BLOCK)
            .map(|b| {
                let k = self.block_index(row, b);
                let qb = &self.quants[k * bb..(k + 1) * bb];
                let xq = &x.quants[b * BLOCK..(b + 1) * BLOCK];
                let sum: i32 = (0..BLOCK)
                    .map(|j| block_value(self.format, qb, j) as i32 * xq[j] as i8 as i32)
                    .sum();
                self.scales[k] * x.scales[b] * sum as f32
            })
            .sum()
    }
}

/// One input row as Q8_0 blocks.
struct Input<'a> {
    scales: &'a [f32],
    quants: &'a [u8],
}

/// Blocks of Q8_0 for rows of inputs (whole blocks): [`quantize_q8`]'s values, with AVX2
/// where the CPU has it (a decoding step quantizes a thousand rows; one value at a time that
/// cost as much as a good part of the products).
fn quantize_q8_row(x: &[f32], scales: &mut [f32], quants: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        for ((s, q), x) in scales
            .iter_mut()
            .zip(quants.chunks_mut(BLOCK))
            .zip(x.chunks(BLOCK))
        {
            // SAFETY: the CPU has AVX2; x and q are whole blocks.
            *s = unsafe { avx2::quantize_q8(x, q) };
        }
        return;
    }
    for ((s, q), x) in scales
        .iter_mut()
        .zip(quants.chunks_mut(BLOCK))
        .zip(x.chunks(BLOCK))
    {
        *s = quantize_q8(x, q);
    }
}

/// ggml's quantize_row_q8_0: d = max|x| / 127, q = round(x / d).
#[inline(always)]
fn quantize_q8(x: &[f32], q: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = round_half_away(v * id) as i8 as u8;
    }
    d
}

/// `f32::round` (halves away from zero) in a form that vectorizes: `round` itself is a libm
/// call per value, which made quantizing a decoding step's inputs cost more than some of its
/// products. `x − trunc(x)` is exact, so this is `round` for every finite x.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// ggml's quantize_row_q4_0: the value of largest magnitude maps to −8, d = max / −8,
/// q = clamp(x / d + 8.5, 0, 15).
fn quantize_q4(x: &[f32], q: &mut [u8]) -> f32 {
    let max = x
        .iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let level = |v: f32| ((v * id + 8.5) as u8).min(15);
    for j in 0..BLOCK / 2 {
        q[j] = level(x[j]) | (level(x[j + BLOCK / 2]) << 4);
    }
    d
}

/// Element `j` of a block, before its scale.
#[inline(always)]
fn block_value(format: WeightFormat, q: &[u8], j: usize) -> f32 {
    match format {
        WeightFormat::Q4_0 => {
            let byte = q[j % (BLOCK / 2)];
            let nib = if j < BLOCK / 2 {
                byte & 0x0F
            } else {
                byte >> 4
            };
            nib as f32 - 8.0
        }
        _ => q[j] as i8 as f32,
    }
}

/// The four dot products of one interleaved group of rows (its blocks from the start of `s`
/// and `q`) with `x`.
/// A group of four rows against up to [`TILE`] inputs: out[r][j] = dot(row j, xs[r]). Every
/// kernel computes each (row, input) pair the same way whatever the others, so a sequence's
/// products do not depend on the batch it is in.
fn dot_group(format: WeightFormat, s: &[f32], q: &[u8], xs: &[Input], out: &mut [[f32; GROUP]]) {
    #[cfg(target_arch = "x86_64")]
    {
        if vnni::available() {
            // SAFETY: the CPU has the features the function is compiled for; `s` and `q` hold
            // at least the group's 4·nb blocks and each input its nb blocks.
            unsafe { vnni::dot_group(format, s, q, xs, out) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            for (x, o) in xs.iter().zip(out.iter_mut()) {
                // SAFETY: as above.
                unsafe { avx2::dot_group(format, s, q, x, o) };
            }
            return;
        }
    }
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        dot_group_portable(format, s, q, x, o);
    }
}

fn dot_group_portable(
    format: WeightFormat,
    s: &[f32],
    q: &[u8],
    x: &Input,
    out: &mut [f32; GROUP],
) {
    let bb = QMatrix::block_bytes(format);
    *out = [0.0; GROUP];
    for (b, (xs, xq)) in x.scales.iter().zip(x.quants.chunks(BLOCK)).enumerate() {
        for (j, o) in out.iter_mut().enumerate() {
            let k = b * GROUP + j;
            let qb = &q[k * bb..(k + 1) * bb];
            let sum: i32 = (0..BLOCK)
                .map(|i| block_value(format, qb, i) as i32 * xq[i] as i8 as i32)
                .sum();
            *o += s[k] * xs * sum as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Input, WeightFormat, BLOCK, GROUP};
    use std::arch::x86_64::*;

    /// [`super::quantize_q8`] on one block, the same values: max|x| and the products are exact
    /// in any order, and halves round away from zero as `f32::round` does.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_q8(x: &[f32], q: &mut [u8]) -> f32 {
        assert!(x.len() == BLOCK && q.len() == BLOCK);
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let abs = |a| _mm256_andnot_ps(sign, a);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let y = _mm256_mul_ps(v[i], id);
            let t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let up = _mm256_cmp_ps(abs(_mm256_sub_ps(y, t)), half, _CMP_GE_OQ);
            // ±1 with y's sign where the fraction is at least a half.
            let step = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(y, sign)));
            _mm256_cvtps_epi32(_mm256_add_ps(t, step))
        });
        // 32-bit → 16-bit → 8-bit; the packs interleave 128-bit lanes, the permute restores
        // the order.
        let w = _mm256_packs_epi32(ints[0], ints[1]);
        let z = _mm256_packs_epi32(ints[2], ints[3]);
        let b = _mm256_packs_epi16(w, z);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
        d
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_group(
        format: WeightFormat,
        s: &[f32],
        q: &[u8],
        x: &Input,
        out: &mut [f32; GROUP],
    ) {
        let low = _mm256_set1_epi8(0x0F);
        let eight = _mm256_set1_epi8(8);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); GROUP];
        for b in 0..x.scales.len() {
            let xv = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK) as *const __m256i);
            let xd = *x.scales.get_unchecked(b);
            for (j, a) in acc.iter_mut().enumerate() {
                let k = b * GROUP + j;
                // The block's 32 weights as signed bytes.
                let w = match format {
                    WeightFormat::Q4_0 => {
                        let v = _mm_loadu_si128(q.as_ptr().add(k * BLOCK / 2) as *const __m128i);
                        // Elements 0..16 are the low nibbles, 16..32 the high ones.
                        let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
                        _mm256_sub_epi8(_mm256_and_si256(both, low), eight)
                    }
                    _ => _mm256_loadu_si256(q.as_ptr().add(k * BLOCK) as *const __m256i),
                };
                // maddubs multiplies unsigned by signed bytes: |w| times x with w's sign.
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                let scale = _mm256_set1_ps(*s.get_unchecked(k) * xd);
                *a = _mm256_fmadd_ps(scale, sums, *a);
            }
        }
        for (a, o) in acc.iter().zip(out.iter_mut()) {
            let h = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            *o = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        }
    }
}

/// The same sums with AVX-512 VNNI's `vpdpbusd` (on 256-bit registers), up to [`TILE`] inputs
/// per pass over the group's blocks. `vpdpbusd` multiplies unsigned by signed bytes, so the
/// inputs go in offset by 128 (x + 128, unsigned) and each lane starts from −128·Σw over its four
/// weights: a lane then holds the same four products' sum as the AVX2 kernel's `maddubs` +
/// `madd` lane, so both give the same integers and the same floats. Per (block, row, input)
/// that leaves three instructions (`vpdpbusd`, convert, multiply-add with the block's scale
/// product, read broadcast from a small table), with every accumulator in a register.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Input, WeightFormat, BLOCK, GROUP, TILE};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn dot_group(
        format: WeightFormat,
        s: &[f32],
        q: &[u8],
        xs: &[Input],
        out: &mut [[f32; GROUP]],
    ) {
        match xs.len() {
            1 => tile::<1>(format, s, q, xs, out),
            2 => tile::<2>(format, s, q, xs, out),
            3 => tile::<3>(format, s, q, xs, out),
            _ => tile::<TILE>(format, s, q, xs, out),
        }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn tile<const R: usize>(
        format: WeightFormat,
        s: &[f32],
        q: &[u8],
        xs: &[Input],
        out: &mut [[f32; GROUP]],
    ) {
        let low = _mm256_set1_epi8(0x0F);
        let eight = _mm256_set1_epi8(8);
        let offset = _mm256_set1_epi8(-128);
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); GROUP]; R];
        // scale[r][j]: row j's block scale times input r's.
        let mut scale = [[0f32; GROUP]; R];
        for b in 0..xs[0].scales.len() {
            let mut w = [zero; GROUP];
            let mut start = [zero; GROUP];
            for j in 0..GROUP {
                let k = b * GROUP + j;
                w[j] = match format {
                    WeightFormat::Q4_0 => {
                        let v = _mm_loadu_si128(q.as_ptr().add(k * BLOCK / 2) as *const __m128i);
                        let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
                        _mm256_sub_epi8(_mm256_and_si256(both, low), eight)
                    }
                    _ => _mm256_loadu_si256(q.as_ptr().add(k * BLOCK) as *const __m256i),
                };
                // 128·Σw per lane (offset read as unsigned 128), negated.
                start[j] = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, offset, w[j]));
            }
            let ws = _mm_loadu_ps(s.as_ptr().add(b * GROUP));
            for r in 0..R {
                let xd = _mm_set1_ps(*xs[r].scales.get_unchecked(b));
                _mm_storeu_ps(scale[r].as_mut_ptr(), _mm_mul_ps(ws, xd));
            }
            for r in 0..R {
                let xq = _mm256_loadu_si256(xs[r].quants.as_ptr().add(b * BLOCK) as *const __m256i);
                let xu = _mm256_xor_si256(xq, offset);
                for j in 0..GROUP {
                    let p = _mm256_dpbusd_epi32(start[j], xu, w[j]);
                    let d = _mm256_set1_ps(scale[r][j]);
                    acc[r][j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r][j]);
                }
            }
        }
        for r in 0..R {
            for j in 0..GROUP {
                let a = acc[r][j];
                let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                out[r][j] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap()
    }

    fn values(m: &QMatrix) -> Vec<f32> {
        let d = m.dequantize(&Device::Cpu).unwrap();
        d.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Hand-made blocks: values that each format stores exactly come back exactly.
    #[test]
    fn exact_values_round_trip() {
        let q8: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) * 0.5).collect();
        let w = Tensor::from_vec(q8.clone(), (2, 32), &Device::Cpu).unwrap();
        let m = QMatrix::quantize(&w, WeightFormat::Q8_0).unwrap();
        // Block maxima 16 and 15.5 over 127 levels are not exact; the values are within d/2.
        let back = values(&m);
        for (a, b) in back.iter().zip(&q8) {
            assert!((a - b).abs() <= 16.0 / 127.0 / 2.0 + 1e-6, "{a} vs {b}");
        }
        // Q4_0: −8·d … 7·d with d = 0.25 are exact.
        let q4: Vec<f32> = (0..32).map(|i| ((i % 16) as f32 - 8.0) * 0.25).collect();
        let w = Tensor::from_vec(q4.clone(), (1, 32), &Device::Cpu).unwrap();
        let m = QMatrix::quantize(&w, WeightFormat::Q4_0).unwrap();
        let back = values(&m);
        assert_eq!(back, q4);
    }

    #[test]
    fn quantization_error_is_what_the_format_allows() {
        let w = matrix(64, 256);
        for (format, tol) in [(WeightFormat::Q8_0, 0.006), (WeightFormat::Q4_0, 0.12)] {
            let m = QMatrix::quantize(&w, format).unwrap();
            let d = m.dequantize(&Device::Cpu).unwrap();
            // Relative RMS error: about 1/(√12·127·0.4) for Q8_0 and 1/(√12·7·0.4) for Q4_0.
            let err = ((&d - &w)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                / w.sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap())
            .sqrt();
            assert!(err < tol, "{format:?}: relative error {err}");
        }
    }

    /// The kernel against the dequantized f32 product (the inputs' own 8-bit rounding is
    /// the difference) and against the portable integer path, which it must equal.
    #[test]
    fn product_equals_the_dequantized_product() {
        // 70 rows: 17 interleaved groups and 2 rows after them.
        let w = matrix(70, 96);
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
            let m = QMatrix::quantize(&w, format).unwrap();
            let wd = m.dequantize(&Device::Cpu).unwrap();
            // Up to five rows (a batch of steps) and a prompt's rows, quantized on both cores.
            for n in (1..=5).chain([16, 70]) {
                let x = matrix(n, 96);
                let want: Vec<f32> = x
                    .matmul(&wd.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let got = m.product(&xs, n);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = crate::testing::max_diff(&got, &want);
                assert!(
                    d < 0.02 * scale,
                    "{format:?} {n} rows: differ by {d} (scale {scale})"
                );

                for r in 0..n {
                    let mut s = [0f32; 3];
                    let mut q = [0u8; 96];
                    for ((s, q), xb) in s
                        .iter_mut()
                        .zip(q.chunks_mut(BLOCK))
                        .zip(xs[r * 96..].chunks(BLOCK))
                    {
                        *s = quantize_q8(xb, q);
                    }
                    let input = Input {
                        scales: &s,
                        quants: &q,
                    };
                    for g in 0..17 {
                        let first = m.block_index(g * GROUP, 0);
                        let mut out = [0f32; GROUP];
                        dot_group_portable(
                            format,
                            &m.scales[first..],
                            &m.quants[first * QMatrix::block_bytes(format)..],
                            &input,
                            &mut out,
                        );
                        for (j, p) in out.iter().enumerate() {
                            assert_eq!(*p, m.dot_row_portable(g * GROUP + j, &input));
                        }
                    }
                    for row in 0..70 {
                        let (p, k) = (m.dot_row_portable(row, &input), got[r * 70 + row]);
                        assert!(
                            (p - k).abs() <= 1e-5 * (1.0 + k.abs()),
                            "{format:?}: {p} vs {k}"
                        );
                    }
                }
            }
        }
    }

    /// A batch's products are each row's alone, bit for bit (the tiles of several inputs and
    /// one input alike), and the VNNI kernel's are the AVX2 kernel's where both run.
    #[test]
    fn a_rows_products_do_not_depend_on_the_other_rows() {
        let w = matrix(70, 96);
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
            let m = QMatrix::quantize(&w, format).unwrap();
            let x = matrix(9, 96);
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let alone: Vec<f32> = xs.chunks(96).flat_map(|r| m.product(r, 1)).collect();
            for n in 1..=9 {
                assert_eq!(
                    m.product(&xs[..n * 96], n),
                    alone[..n * 70],
                    "{format:?}, {n} rows"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if vnni::available() {
                let (mut s, mut q) = (vec![0f32; 27], vec![0u8; 9 * 96]);
                quantize_q8_row(&xs, &mut s, &mut q);
                let inputs: Vec<Input> = (0..9)
                    .map(|r| Input {
                        scales: &s[r * 3..(r + 1) * 3],
                        quants: &q[r * 96..(r + 1) * 96],
                    })
                    .collect();
                let bb = QMatrix::block_bytes(format);
                for g in 0..17 {
                    let first = m.block_index(g * GROUP, 0);
                    let (sg, qg) = (&m.scales[first..], &m.quants[first * bb..]);
                    let mut tiled = [[0f32; GROUP]; TILE];
                    unsafe { vnni::dot_group(format, sg, qg, &inputs[..TILE], &mut tiled) };
                    for (x, t) in inputs.iter().zip(tiled) {
                        let mut one = [0f32; GROUP];
                        unsafe { avx2::dot_group(format, sg, qg, x, &mut one) };
                        assert_eq!(t, one, "{format:?}, group {g}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_vector_quantizer_gives_the_scalar_values() {
        let mut x: Vec<f32> = Tensor::randn(0f32, 3.0, 32 * 64, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        // Exact halves after scaling (max 127: d = 1), zeros and a zero block.
        x[..32].copy_from_slice(&std::array::from_fn::<f32, 32, _>(|i| i as f32 - 15.5));
        x[0] = 127.0;
        x[64..96].fill(0.0);
        let (mut s1, mut q1) = (vec![0f32; 64], vec![0u8; 32 * 64]);
        quantize_q8_row(&x, &mut s1, &mut q1);
        let (mut s2, mut q2) = (vec![0f32; 64], vec![0u8; 32 * 64]);
        for ((s, q), x) in s2.iter_mut().zip(q2.chunks_mut(BLOCK)).zip(x.chunks(BLOCK)) {
            *s = quantize_q8(x, q);
        }
        assert_eq!(s1, s2);
        assert_eq!(q1, q2);
    }

    #[test]
    fn rounding_is_f32_round() {
        let mut x = vec![
            0.5f32,
            -0.5,
            1.5,
            -2.5,
            0.49999997,
            -0.49999997,
            126.5,
            -126.5,
            0.0,
            -0.0,
        ];
        x.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 0.0127));
        for v in x {
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
    }

    #[test]
    fn columns_not_a_multiple_of_32_are_refused() {
        let err = QMatrix::quantize(&matrix(4, 40), WeightFormat::Q8_0).unwrap_err();
        assert!(err.to_string().contains("40 columns"), "{err}");
    }
}
