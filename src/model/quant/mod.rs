//! Block-quantized weight matrices for inference, in ggml's two simplest formats: Q8_0 (blocks
//! of 32 weights as int8 with one scale: x ≈ d·q) and Q4_0 (blocks of 32 as 4-bit q with one
//! scale: x ≈ d·(q − 8)). Each row is quantized on its own, so a row is a run of blocks.
//!
//! Decoding reads every weight once per step: Q8_0 reads 4× fewer bytes than f32, Q4_0 7×. The
//! kernel for a few input rows (one decoding step of one sequence or of a batch) does what
//! llama.cpp does: it quantizes the inputs to 8-bit blocks too and takes integer dot products of
//! blocks, one float multiply-add per block. A prompt's rows take the same kernel: each group of
//! weight rows meets every input row while it is in L1, so the matrix is read once per call
//! whatever the number of rows, and never dequantized.
//!
//! Scales are kept as f32 (ggml stores f16): 1/32 more memory for exactly the block values.
//! Rows are stored in groups of sixteen, each block of the sixteen as one panel whose 32-bit
//! words go row by row (row 0's bytes 0..4, row 1's bytes 0..4, …, row 15's, then every row's
//! bytes 4..8, …), as llama.cpp repacks its weights for batched products: one 512-bit load holds
//! four weights of each of the sixteen rows, so a SIMD lane is a row and an integer multiply-add
//! of the load with four input bytes broadcast advances sixteen dot products at once; a block's
//! sums then come out one row per lane, and its scales (one per row, read as one vector) apply
//! with one multiply-add for the group. (AVX2 takes a panel as two halves of eight rows.) Q8_0's
//! bytes are stored offset by 128 (unsigned, what `vpdpbusd` multiplies), Q4_0's nibbles as
//! they are (0..16); the zero point (128 or 8) times the input block's sum is taken off each
//! sum. (Groups of eight on 256-bit registers issued as many `vpdpbusd` for half the products:
//! at eight inputs, a batch's decoding step, the kernel was bound by that issue rate, not by
//! reading the weights.) Rows after the last whole group take the portable code, one value at
//! a time: every matrix of the models we convert has a multiple of sixteen rows (SmolLM2's 576,
//! 192, 1,536 and 49,152; φ's 64 or 128).

use crate::model::spin;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

mod kernel;

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

    /// Bytes of one block's weights.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => BLOCK / 2,
            _ => BLOCK,
        }
    }

    /// What the stored level of a weight exceeds its signed value by.
    fn zero_point(self) -> i32 {
        match self {
            Self::Q4_0 => 8,
            _ => 128,
        }
    }
}

pub const BLOCK: usize = 32;
/// Rows in one panel: one per 32-bit lane of a 512-bit register.
const GROUP: usize = 16;
/// Inputs a kernel takes against one group of rows at once (a batch of eight decoding steps
/// in one pass over the group's blocks).
const TILE: usize = 8;

#[derive(Debug, Clone)]
pub struct QMatrix {
    format: WeightFormat,
    rows: usize,
    cols: usize,
    /// One per block, in block order (see [`QMatrix::block_index`]).
    scales: Vec<f32>,
    /// Q8_0: 32 bytes a block, each the weight + 128. Q4_0: 16 bytes a block; byte j holds
    /// element j in its low nibble and element j + 16 in its high one (ggml's order). Grouped
    /// rows' blocks are panels (see [`QMatrix::word_offset`]).
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
        let bb = format.block_bytes();
        let mut m = Self {
            format,
            rows,
            cols,
            scales: vec![0f32; rows * nb],
            quants: vec![0u8; rows * nb * bb],
        };
        // Row by row into a plain layout, then moved into panels.
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
                        WeightFormat::Q8_0 => {
                            let d = quantize_q8(xb, qb);
                            for v in qb.iter_mut() {
                                *v ^= 0x80; // the signed byte + 128
                            }
                            d
                        }
                        _ => quantize_q4(xb, qb),
                    };
                }
            });
        for row in 0..rows {
            for b in 0..nb {
                let from = row * nb + b;
                let k = m.block_index(row, b);
                m.scales[k] = plain_s[from];
                for w in 0..bb / 4 {
                    let at = m.word_offset(row, b, w);
                    let src = from * bb + 4 * w;
                    m.quants[at..at + 4].copy_from_slice(&plain_q[src..src + 4]);
                }
            }
        }
        Ok(m)
    }

    /// Where block `b` of `row` is counted (its scale's index): a group's blocks one after
    /// another, each with its sixteen rows; the last `rows % 16` rows follow one after another.
    fn block_index(&self, row: usize, b: usize) -> usize {
        let nb = self.cols / BLOCK;
        let grouped = self.rows / GROUP * GROUP;
        if row < grouped {
            (row / GROUP * nb + b) * GROUP + row % GROUP
        } else {
            grouped * nb + (row - grouped) * nb + b
        }
    }

    /// Where the 32-bit word `w` (bytes 4w..4w + 4) of block `b` of `row` is stored: in a
    /// group's panel the words go row by row for each w; after the groups, plainly.
    fn word_offset(&self, row: usize, b: usize, w: usize) -> usize {
        let bb = self.format.block_bytes();
        let grouped = self.rows / GROUP * GROUP;
        if row < grouped {
            let panel = self.block_index(row - row % GROUP, b) * bb;
            panel + (w * GROUP + row % GROUP) * 4
        } else {
            self.block_index(row, b) * bb + 4 * w
        }
    }

    /// The stored level of element `i` of block `b` of `row` (the weight + the zero point).
    fn level(&self, row: usize, b: usize, i: usize) -> i32 {
        let p = i % self.format.block_bytes();
        let byte = self.quants[self.word_offset(row, b, p / 4) + p % 4];
        match self.format {
            WeightFormat::Q4_0 if i < BLOCK / 2 => (byte & 0x0F) as i32,
            WeightFormat::Q4_0 => (byte >> 4) as i32,
            _ => byte as i32,
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
        let zero = self.format.zero_point();
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(row, y)| {
                for (b, yb) in y.chunks_mut(BLOCK).enumerate() {
                    let d = self.scales[self.block_index(row, b)];
                    for (i, v) in yb.iter_mut().enumerate() {
                        *v = d * (self.level(row, b, i) - zero) as f32;
                    }
                }
            });
        Ok(Tensor::from_vec(out, (self.rows, self.cols), device)?)
    }

    /// y = x Wᵀ for `n` input rows of `cols` values each (row-major in `xs`); returns
    /// `n × rows` values, row-major. The inputs are quantized to 8-bit blocks first.
    pub fn product(&self, xs: &[f32], n: usize) -> Vec<f32> {
        let mut ys = Self::products(&[self], xs, n);
        ys.pop().expect("one matrix gives one product")
    }

    /// [`QMatrix::product`] of the same inputs with several matrices of one width (a layer's
    /// q, k and v; its gate and up): the inputs quantized once and every matrix's rows split
    /// across the cores in one fork-join, where separate calls would repeat both for each
    /// matrix (a decoding step makes seven products a layer). Each value is what `product`
    /// gives.
    pub fn products(mats: &[&QMatrix], xs: &[f32], n: usize) -> Vec<Vec<f32>> {
        let cols = mats.first().map_or(0, |m| m.cols);
        assert!(n >= 1 && xs.len() == n * cols && mats.iter().all(|m| m.cols == cols));
        let nb = cols / BLOCK;
        let mut x_scales = vec![0f32; n * nb];
        let mut x_sums = vec![0i32; n * nb];
        let mut x_quants = vec![0u8; n * cols];
        if n > 64 {
            // A prompt's rows: quantized on both cores (on one, the other core waits for it);
            // a decoding step's few rows are not worth waking the pool for.
            x_scales
                .par_chunks_mut(nb)
                .zip(x_sums.par_chunks_mut(nb))
                .zip(x_quants.par_chunks_mut(cols))
                .zip(xs.par_chunks(cols))
                .with_min_len(8)
                .for_each(|(((s, sums), q), x)| quantize_q8_row(x, s, sums, q));
        } else {
            quantize_q8_row(xs, &mut x_scales, &mut x_sums, &mut x_quants);
        }
        let inputs = Input::rows(&x_scales, &x_sums, &x_quants, nb);
        // Rows split across the cores; each group of rows meets every input row while its
        // blocks are in L1, so a batch of decoding steps reads the weights once.
        let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; n * m.rows]).collect();
        let dsts: Vec<spin::OutPtr> = ys
            .iter_mut()
            .map(|y| spin::OutPtr(y.as_mut_ptr()))
            .collect();
        spin::for_each_part(&|part| {
            for (m, dst) in mats.iter().zip(&dsts) {
                let rows = spin::split(m.rows, GROUP, part);
                m.dot_rows(rows, &inputs, &mut |r, row, y| {
                    // SAFETY: the parts' row ranges are disjoint and inside this matrix's
                    // output, which outlives the call.
                    unsafe { dst.write(r * m.rows + row, y) }
                });
            }
        });
        ys
    }

    /// Hands `put(r, row, y)` the dot products of rows row.. with xs[r] (sixteen at a time for a
    /// group, one for the rows after the groups), for a range of rows that starts on a group
    /// boundary.
    fn dot_rows(
        &self,
        rows: std::ops::Range<usize>,
        xs: &[Input],
        put: &mut dyn FnMut(usize, usize, &[f32]),
    ) {
        let grouped_end = (self.rows / GROUP * GROUP).min(rows.end);
        let bb = self.format.block_bytes();
        let mut row = rows.start;
        while row + GROUP <= grouped_end {
            let first = self.block_index(row, 0);
            let (s, q) = (&self.scales[first..], &self.quants[first * bb..]);
            for (t, tile) in xs.chunks(TILE).enumerate() {
                let mut o = [[0f32; GROUP]; TILE];
                let o = &mut o[..tile.len()];
                if !kernel::dot_group(self.format, s, q, tile, o) {
                    for (x, o) in tile.iter().zip(o.iter_mut()) {
                        for (j, o) in o.iter_mut().enumerate() {
                            *o = self.dot_row_portable(row + j, x);
                        }
                    }
                }
                for (i, o) in o.iter().enumerate() {
                    put(t * TILE + i, row, o);
                }
            }
            row += GROUP;
        }
        for row in row..rows.end {
            for (r, x) in xs.iter().enumerate() {
                put(r, row, &[self.dot_row_portable(row, x)]);
            }
        }
    }

    /// One row's dot product, the definition every kernel computes to the bit: per block the
    /// integer sum of levels times input bytes less the zero point times the inputs' sum (the
    /// weights' own integer products), then `acc += (weight scale · input scale) · sum` with one
    /// rounding for the product of scales and one for the multiply-add, block after block.
    fn dot_row_portable(&self, row: usize, x: &Input) -> f32 {
        let zero = self.format.zero_point();
        (0..self.cols / BLOCK).fold(0f32, |acc, b| {
            let xq = &x.quants[b * BLOCK..(b + 1) * BLOCK];
            let sum: i32 = (0..BLOCK)
                .map(|i| self.level(row, b, i) * xq[i] as i8 as i32)
                .sum::<i32>()
                - zero * x.sums[b];
            let d = self.scales[self.block_index(row, b)] * x.scales[b];
            d.mul_add(sum as f32, acc)
        })
    }
}

/// One input row as Q8_0 blocks, with each block's sum of its quantized values (for the
/// weights' zero point).
struct Input<'a> {
    scales: &'a [f32],
    sums: &'a [i32],
    quants: &'a [u8],
}

impl<'a> Input<'a> {
    /// Each row's blocks out of [`quantize_q8_row`]'s output for rows of `nb` blocks.
    fn rows(scales: &'a [f32], sums: &'a [i32], quants: &'a [u8], nb: usize) -> Vec<Self> {
        scales
            .chunks(nb)
            .zip(sums.chunks(nb))
            .zip(quants.chunks(nb * BLOCK))
            .map(|((scales, sums), quants)| Input {
                scales,
                sums,
                quants,
            })
            .collect()
    }
}

/// Blocks of Q8_0 for rows of inputs (whole blocks): [`quantize_q8`]'s values, with AVX2
/// where the CPU has it (a decoding step quantizes a thousand rows; one value at a time that
/// cost as much as a good part of the products), and each block's sum.
fn quantize_q8_row(x: &[f32], scales: &mut [f32], sums: &mut [i32], quants: &mut [u8]) {
    let blocks = scales
        .iter_mut()
        .zip(sums.iter_mut())
        .zip(quants.chunks_mut(BLOCK))
        .zip(x.chunks(BLOCK));
    for (((s, sum), q), x) in blocks {
        *s = kernel::quantize_q8(x, q);
        *sum = q.iter().map(|&v| v as i8 as i32).sum();
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

    /// The inputs of `n` rows of `x` as the product quantizes them.
    fn quantized(x: &[f32], n: usize) -> (Vec<f32>, Vec<i32>, Vec<u8>) {
        let nb = x.len() / n / BLOCK;
        let (mut s, mut sums, mut q) = (vec![0f32; n * nb], vec![0i32; n * nb], vec![0u8; x.len()]);
        quantize_q8_row(x, &mut s, &mut sums, &mut q);
        (s, sums, q)
    }

    /// The kernel against the dequantized f32 product (the inputs' own 8-bit rounding is
    /// the difference) and against the portable definition, which it must equal to the bit.
    #[test]
    fn product_equals_the_dequantized_product() {
        // 70 rows: 8 groups of panels and 6 rows after them.
        let (rows, cols) = (70, 96);
        let w = matrix(rows, cols);
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
            let m = QMatrix::quantize(&w, format).unwrap();
            let wd = m.dequantize(&Device::Cpu).unwrap();
            // Up to five rows (a batch of steps) and a prompt's rows, quantized on both cores.
            for n in (1..=5).chain([16, 70]) {
                let x = matrix(n, cols);
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
                let (s, sums, q) = quantized(&xs, n);
                for (r, input) in Input::rows(&s, &sums, &q, cols / BLOCK).iter().enumerate() {
                    for row in 0..rows {
                        let want = m.dot_row_portable(row, input);
                        assert_eq!(
                            got[r * rows + row],
                            want,
                            "{format:?}: row {row}, input {r}"
                        );
                    }
                }
            }
        }
    }

    /// A batch's products are each row's alone, bit for bit (the tiles of several inputs and
    /// one input alike), and every kernel this CPU has computes the portable definition.
    #[test]
    fn a_rows_products_do_not_depend_on_the_other_rows() {
        let (rows, cols) = (70, 96);
        let w = matrix(rows, cols);
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
            let m = QMatrix::quantize(&w, format).unwrap();
            let x = matrix(9, cols);
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let alone: Vec<f32> = xs.chunks(cols).flat_map(|r| m.product(r, 1)).collect();
            for n in 1..=9 {
                assert_eq!(
                    m.product(&xs[..n * cols], n),
                    alone[..n * rows],
                    "{format:?}, {n} rows"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if kernel::avx2::available() {
                // The dispatcher picks VNNI where the CPU has it; the AVX2 kernel is checked
                // here on its own.
                let (s, sums, q) = quantized(&xs, 9);
                let inputs = Input::rows(&s, &sums, &q, cols / BLOCK);
                let bb = format.block_bytes();
                for g in 0..rows / GROUP {
                    let first = m.block_index(g * GROUP, 0);
                    let (sg, qg) = (&m.scales[first..], &m.quants[first * bb..]);
                    for tile in inputs.chunks(TILE) {
                        let mut out = vec![[0f32; GROUP]; tile.len()];
                        unsafe { kernel::avx2::dot_group(format, sg, qg, tile, &mut out) };
                        for (x, o) in tile.iter().zip(&out) {
                            for (j, v) in o.iter().enumerate() {
                                let want = m.dot_row_portable(g * GROUP + j, x);
                                assert_eq!(*v, want, "{format:?}, group {g}, row {j}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Several matrices' products of one input in one call (a layer's q, k and v) are each
    /// matrix's portable definition, bit for bit, whatever their heights (groups and leftover
    /// rows); `product` is the one-matrix case.
    #[test]
    fn products_of_one_input_are_each_matrixs_own() {
        let cols = 64;
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
            let ms: Vec<QMatrix> = [24, 13, 8]
                .into_iter()
                .map(|rows| QMatrix::quantize(&matrix(rows, cols), format).unwrap())
                .collect();
            let refs: Vec<&QMatrix> = ms.iter().collect();
            for n in [1, 5] {
                let xs: Vec<f32> = matrix(n, cols).flatten_all().unwrap().to_vec1().unwrap();
                let (s, sums, q) = quantized(&xs, n);
                let inputs = Input::rows(&s, &sums, &q, cols / BLOCK);
                let ys = QMatrix::products(&refs, &xs, n);
                for (m, y) in ms.iter().zip(&ys) {
                    let want: Vec<f32> = inputs
                        .iter()
                        .flat_map(|x| (0..m.rows).map(|row| m.dot_row_portable(row, x)))
                        .collect();
                    assert_eq!(*y, want, "{format:?}, {} rows, {n} inputs", m.rows);
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
        let (s1, sums, q1) = quantized(&x, 1);
        let (mut s2, mut q2) = (vec![0f32; 64], vec![0u8; 32 * 64]);
        for ((s, q), x) in s2.iter_mut().zip(q2.chunks_mut(BLOCK)).zip(x.chunks(BLOCK)) {
            *s = quantize_q8(x, q);
        }
        assert_eq!(s1, s2);
        assert_eq!(q1, q2);
        let want: Vec<i32> = q2
            .chunks(BLOCK)
            .map(|b| b.iter().map(|&v| v as i8 as i32).sum())
            .collect();
        assert_eq!(sums, want);
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
