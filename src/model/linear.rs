//! y = x Wᵀ + b, with a matrix-vector kernel for the few-rows case (decoding).
//!
//! candle's gemm packs the whole weight matrix on every call; with one input row that packing
//! costs more than the product itself. Rows of W are contiguous, so a decode step is a set of
//! independent dot products over memory read once: split them across cores.

use crate::attention::Exec;
use crate::model::linear_grad::{add_bias, add_bias_relu, matmul_wt};
use crate::model::quant::{QMatrix, WeightFormat};
use crate::model::spin;
use anyhow::Result;
use candle_core::{Module, Storage, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// LoRA adapter (A: rank × in, B: out × rank, scale): adds scale · x Aᵀ Bᵀ.
    lora: Option<(Tensor, Tensor, f64)>,
    /// Block-quantized weights for inference; `inner` then holds an empty weight.
    quant: Option<Arc<QMatrix>>,
}

/// At most this many input rows take the matrix-vector path: a decoding step of up to this
/// many sequences ([`crate::model::llama::Llama::decode_step`] runs larger batches in groups of
/// this size, so that every row takes the same kernel as a lone sequence's step).
pub const GEMV_MAX_ROWS: usize = 16;

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
            lora: None,
            quant: None,
        }
    }

    pub fn with_lora(mut self, a: Tensor, b: Tensor, scale: f64) -> Self {
        self.lora = Some((a, b, scale));
        self
    }

    /// The f32 weight (dequantized for a quantized layer).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => q.dequantize(self.inner.weight().device()),
            None => Ok(self.inner.weight().clone()),
        }
    }

    /// This layer with its weight (LoRA merged in) stored as `format`, for inference. The f32
    /// weight is dropped; a matrix whose width is not a multiple of the block stays f32.
    pub fn quantized(&self, format: WeightFormat) -> Result<Self> {
        let w = self.merged_weight()?;
        let bias = self.inner.bias().cloned();
        if format == WeightFormat::F32 || w.dim(1)? % crate::model::quant::BLOCK != 0 {
            return Ok(Self::new(w, bias));
        }
        let q = QMatrix::quantize(&w, format)?;
        let empty = Tensor::zeros((0, 0), w.dtype(), w.device())?;
        Ok(Self {
            inner: candle_nn::Linear::new(empty, bias),
            lora: None,
            quant: Some(Arc::new(q)),
        })
    }

    /// Whether the product takes the blocks' integer kernel, whose every output row is the
    /// same whatever rows it runs with (f32 takes candle's product past [`GEMV_MAX_ROWS`]).
    pub fn is_quantized(&self) -> bool {
        self.quant.is_some()
    }

    fn merged_weight(&self) -> Result<Tensor> {
        let w = self.weight()?;
        Ok(match &self.lora {
            Some((a, b, scale)) => (w + (b.matmul(a)? * *scale)?)?,
            None => w,
        })
    }

    /// Training takes candle's (differentiable) product; inference the quantized or
    /// matrix-vector kernels where they apply, which work on raw slices.
    pub fn forward(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        if let Some(q) = &self.quant {
            anyhow::ensure!(exec == Exec::Infer, "a quantized layer cannot be trained");
            let mut y = Self::forward_quantized(&[self], &[q], x)?;
            return Ok(y.remove(0));
        }
        if exec == Exec::Train {
            return self.train_forward(x, false);
        }
        if let Some((a, b, scale)) = &self.lora {
            let base = self.inner.forward(x)?;
            let low = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
            return Ok((base + (low * *scale)?)?);
        }
        if rows <= GEMV_MAX_ROWS {
            if let Some(y) = self.gemv(x, rows)? {
                return Ok(y);
            }
        }
        Ok(self.inner.forward(x)?)
    }

    /// The differentiable form: products whose backward computes only the gradients that
    /// reach a variable, each in its weight's own layout ([`matmul_wt`]).
    fn train_forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let mut y = matmul_wt(x, self.inner.weight())?;
        if let Some((a, b, scale)) = &self.lora {
            y = (y + (matmul_wt(&matmul_wt(x, a)?, b)? * *scale)?)?;
        }
        Ok(match (self.inner.bias(), relu) {
            (Some(bias), false) => add_bias(&y, bias)?,
            (Some(bias), true) => add_bias_relu(&y, bias)?,
            (None, false) => y,
            (None, true) => y.relu()?,
        })
    }

    /// ReLU(`forward`): the bias and the ReLU one op in training (φ of the SUPRA cell).
    pub fn forward_relu(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        match exec == Exec::Train && self.quant.is_none() {
            true => self.train_forward(x, true),
            false => Ok(self.forward(x, exec)?.relu()?),
        }
    }

    /// Any number of rows takes the blocks' integer kernel: a prompt's rows too, so that the
    /// matrix is never dequantized on a call (that cost more than the product for a prompt of
    /// a few hundred tokens) and a prompt read in pieces gets the projections that steps get.
    /// `layers[i]`'s matrix is `qs[i]`.
    fn forward_quantized(layers: &[&Linear], qs: &[&QMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        layers
            .iter()
            .zip(qs)
            .zip(QMatrix::products(qs, &xs, rows))
            .map(|((l, q), y)| l.quantized_output(q, y, x))
            .collect()
    }

    /// The layer's output for input `x` from the values `y` of its product `q`: shaped like
    /// `x` with q's width, plus the bias.
    fn quantized_output(&self, q: &QMatrix, y: Vec<f32>, x: &Tensor) -> Result<Tensor> {
        let mut shape = x.dims().to_vec();
        *shape.last_mut().unwrap() = q.dims().0;
        let y = Tensor::from_vec(y, shape, x.device())?;
        Ok(match self.inner.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Each of `layers` applied to the same `x` (a layer's q, k and v; gate and up). Quantized
    /// layers in inference take one [`QMatrix::products`] call: the input quantized once and
    /// one fork-join for all, the values each layer's own `forward` gives.
    pub fn forward_each(layers: &[&Linear], x: &Tensor, exec: Exec) -> Result<Vec<Tensor>> {
        let quant: Option<Vec<&QMatrix>> = layers.iter().map(|l| l.quant.as_deref()).collect();
        match quant {
            Some(qs)
                if exec == Exec::Infer && qs.windows(2).all(|w| w[0].dims().1 == w[1].dims().1) =>
            {
                Self::forward_quantized(layers, &qs, x)
            }
            _ => layers.iter().map(|l| l.forward(x, exec)).collect(),
        }
    }

    /// `None` when the weight is not a contiguous f32 CPU tensor.
    fn gemv(&self, x: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        let w = self.inner.weight();
        let (n_out, n_in) = w.dims2()?;
        let (storage, layout) = w.storage_and_layout();
        let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let Ok(w) = cpu.as_slice::<f32>() else {
            return Ok(None);
        };
        let w = &w[start..end];
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        // Output features split across the cores; each part reads its weight rows once for
        // all input rows.
        let mut out = vec![0f32; rows * n_out];
        let dst = spin::OutPtr(out.as_mut_ptr());
        spin::for_each_part(&|part| {
            let features = spin::split(n_out, 16, part);
            let len = features.len();
            let mut y = vec![0f32; rows * len];
            for (j, o) in features.clone().enumerate() {
                let w_row = &w[o * n_in..(o + 1) * n_in];
                for r in 0..rows {
                    y[r * len + j] = dot(w_row, &xs[r * n_in..(r + 1) * n_in]);
                }
            }
            for r in 0..rows {
                // SAFETY: the parts' feature ranges are disjoint and inside `out`.
                unsafe { dst.write(r * n_out + features.start, &y[r * len..(r + 1) * len]) };
            }
        });
        let mut shape = x.dims().to_vec();
        *shape.last_mut().unwrap() = n_out;
        let mut y = Tensor::from_vec(out, shape, x.device())?;
        if let Some(b) = self.inner.bias() {
            y = y.broadcast_add(b)?;
        }
        Ok(Some(y))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

/// Eight independent partial sums so the compiler keeps them in one vector register.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len() / 8 * 8;
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            s0,
        );
        s1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i + 8)),
            _mm256_loadu_ps(b.as_ptr().add(i + 8)),
            s1,
        );
        i += 16;
    }
    if i < n {
        s0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            s0,
        );
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0, s1));
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gemv_path_matches_matmul() {
        let dev = Device::Cpu;
        // Odd sizes exercise the vector tails and a partial last block.
        let w = Tensor::randn(0f32, 1.0, (131, 77), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 131, &dev).unwrap();
        let lin = Linear::new(w.clone(), Some(b.clone()));
        for rows in [1, 3, 4, 5] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 77), &dev).unwrap();
            let want = x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let got = lin.forward(&x, crate::attention::Exec::Infer).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = crate::testing::max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{rows} rows: differ by {d}");
        }
    }
}
