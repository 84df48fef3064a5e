//! Rotary position embeddings, HF "rotate-half" convention: the two halves of each head are the
//! (x, y) of d/2 rotating pairs.

use crate::attention::Exec;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

#[derive(Debug, Clone)]
pub struct Rope {
    dim: usize,
    theta: f64,
    cos: Tensor,
    sin: Tensor,
}

/// cos and sin tables (len, dim/2) for positions start..start+len.
fn tables(
    dim: usize,
    theta: f64,
    start: usize,
    len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / dim as f64)) as f32)
        .collect();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in start..start + len {
        for f in &inv_freq {
            // transformers multiplies f32 positions by f32 inverse frequencies.
            let a = (p as f32 * f) as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (len, half), device)?,
        Tensor::from_vec(sin, (len, half), device)?,
    ))
}

impl Rope {
    /// Precomputed tables for positions `0..max_len`; later positions are computed on demand
    /// (linear-attention models run past the teacher's context).
    pub fn new(dim: usize, theta: f64, max_len: usize, device: &Device) -> Result<Self> {
        let (cos, sin) = tables(dim, theta, 0, max_len, device)?;
        Ok(Self {
            dim,
            theta,
            cos,
            sin,
        })
    }

    /// cos and sin (dim/2 each) at one position.
    pub fn row(&self, pos: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (cos, sin) = if pos < self.cos.dim(0)? {
            (self.cos.get(pos)?, self.sin.get(pos)?)
        } else {
            let (c, s) = tables(self.dim, self.theta, pos, 1, &Device::Cpu)?;
            (c.get(0)?, s.get(0)?)
        };
        Ok((cos.to_vec1()?, sin.to_vec1()?))
    }

    /// Rotates one head's vector in place, as [`Rope::apply`] does, with a [`Rope::row`].
    pub fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at_mut(half);
        for j in 0..half {
            let (a, b) = (x1[j], x2[j]);
            x1[j] = a * cos[j] - b * sin[j];
            x2[j] = b * cos[j] + a * sin[j];
        }
    }

    /// Rotates `x` of shape (batch, heads, seq, dim) whose first position is `offset`.
    /// Training composes it from differentiable ops (candle's fused rope has no backward);
    /// inference takes the fused kernel for f32.
    pub fn apply(&self, x: &Tensor, offset: usize, exec: Exec) -> Result<Tensor> {
        let t = x.dim(2)?;
        let (cos, sin) = if offset + t <= self.cos.dim(0)? {
            (
                self.cos.narrow(0, offset, t)?,
                self.sin.narrow(0, offset, t)?,
            )
        } else {
            tables(self.dim, self.theta, offset, t, x.device())?
        };
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        if exec == Exec::Train || x.dtype() != DType::F32 {
            let half = self.dim / 2;
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
            let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
            return Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?);
        }
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composed_rope_equals_fused_and_extends_past_the_table() {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 10_000.0, 16, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev).unwrap();
        let fused = rope.apply(&x, 3, Exec::Infer).unwrap();
        let composed = rope.apply(&x, 3, Exec::Train).unwrap();
        let d = crate::testing::max_abs_diff(&fused, &composed);
        assert!(d < 1e-6);
        // Positions 14..19 cross the end of the 16-entry table.
        let long = Rope::new(8, 10_000.0, 64, &dev)
            .unwrap()
            .apply(&x, 14, Exec::Infer)
            .unwrap();
        let d = crate::testing::max_abs_diff(&long, &rope.apply(&x, 14, Exec::Infer).unwrap());
        assert!(d < 1e-6);
    }
}
