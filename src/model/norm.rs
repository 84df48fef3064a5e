//! RMSNorm: x / sqrt(mean(x²) + eps) · w.

use crate::attention::Exec;
use anyhow::Result;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    /// candle's fused kernel has no backward: training composes it from differentiable ops.
    pub fn forward(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        if exec == Exec::Train {
            let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            let inv = (ms + self.eps as f64)?.sqrt()?.recip()?;
            return Ok(x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)?);
        }
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn composed_path_equals_fused_kernel() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 5, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let norm = RmsNorm::new(w, 1e-5);
        let fused = norm.forward(&x, Exec::Infer).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        let composed = norm.forward(tracked.as_tensor(), Exec::Train).unwrap();
        assert!(composed.track_op());
        let d = crate::testing::max_abs_diff(&fused, &composed);
        assert!(d < 1e-5, "{d}");
    }
}
