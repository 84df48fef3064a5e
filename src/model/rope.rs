//! Rotary position embeddings, HF "rotate-half" convention: the two halves of each head are the
//! (x, y) of d/2 rotating pairs.
//!
//! One rotation, [`Rope::rotate`]: decoding steps call it on a head's slice, training through a
//! candle op whose backward is the rotation by the opposite angles (composed from candle ops it
//! was eight ops forward on one core, each a fresh tensor, and more backward, on every query
//! and key of every layer). Inference's prefill takes candle's fused kernel.

use crate::attention::Exec;
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

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

/// The most positions [`Rope::new`] precomputes (8 MiB of tables at head dim 64); later ones
/// are computed on demand, with the same values. A model declaring a context of 10^9 asked for
/// 128 GB of tables here and aborted.
const MAX_TABLE_LEN: usize = 1 << 15;

impl Rope {
    /// Precomputed tables for positions `0..max_len` (at most [`MAX_TABLE_LEN`]); later
    /// positions are computed on demand (linear-attention models run past the teacher's
    /// context).
    pub fn new(dim: usize, theta: f64, max_len: usize, device: &Device) -> Result<Self> {
        let (cos, sin) = tables(dim, theta, 0, max_len.min(MAX_TABLE_LEN), device)?;
        Ok(Self {
            dim,
            theta,
            cos,
            sin,
        })
    }

    /// cos and sin (len, dim/2) at positions start..start + len: the precomputed tables' rows
    /// where they reach, else computed (on `device`).
    fn at(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        if start + len <= self.cos.dim(0)? {
            Ok((
                self.cos.narrow(0, start, len)?,
                self.sin.narrow(0, start, len)?,
            ))
        } else {
            tables(self.dim, self.theta, start, len, device)
        }
    }

    /// cos and sin (dim/2 each) at one position.
    pub fn row(&self, pos: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (cos, sin) = self.at(pos, 1, &Device::Cpu)?;
        Ok((cos.get(0)?.to_vec1()?, sin.get(0)?.to_vec1()?))
    }

    /// Rotates the heads (`width` values each) of several tokens in place, each row of `xs`
    /// (its tokens' heads side by side) at its own position: a batched decoding step's q and k.
    pub fn rotate_rows(
        &self,
        mut xs: [&mut [f32]; 2],
        positions: &[usize],
        width: usize,
    ) -> Result<()> {
        let rows = positions.len();
        for (r, &p) in positions.iter().enumerate() {
            let (cos, sin) = self.row(p)?;
            for x in xs.iter_mut() {
                let len = x.len() / rows;
                for head in x[r * len..(r + 1) * len].chunks_mut(width) {
                    Self::rotate(head, &cos, &sin);
                }
            }
        }
        Ok(())
    }

    /// Rotates one head's vector in place, as [`Rope::apply`] does, with a [`Rope::row`].
    pub fn rotate<T: WithDType>(x: &mut [T], cos: &[T], sin: &[T]) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at_mut(half);
        for j in 0..half {
            let (a, b) = (x1[j], x2[j]);
            x1[j] = a * cos[j] - b * sin[j];
            x2[j] = b * cos[j] + a * sin[j];
        }
    }

    /// Rotates `x` of shape (batch, heads, seq, dim) whose first position is `offset`.
    /// Training runs the differentiable op (candle's fused rope has no backward); inference
    /// takes candle's kernel.
    pub fn apply(&self, x: &Tensor, offset: usize, exec: Exec) -> Result<Tensor> {
        let (cos, sin) = self.at(offset, x.dim(2)?, x.device())?;
        if exec == Exec::Train {
            let flat = |t: Tensor| -> Result<Vec<f64>> {
                Ok(t.to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1()?)
            };
            let op = Rotation {
                cos: flat(cos)?,
                sin: flat(sin)?,
            };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }

    /// The rotation that turns row t of a RoPE'd (…, T, dim) back by `backs[t]` positions
    /// (R(−b) undoes b positions of RoPE).
    pub fn turning_back(&self, backs: &[usize]) -> Result<Rotation> {
        // One read of the tables up to the largest turn, not one per row.
        let reach = backs.iter().max().map_or(0, |&b| b + 1);
        let (c, s) = self.at(0, reach, &Device::Cpu)?;
        let (c, s): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (c.to_vec2()?, s.to_vec2()?);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &b in backs {
            cos.extend(c[b].iter().map(|&v| f64::from(v)));
            sin.extend(s[b].iter().map(|&v| -f64::from(v)));
        }
        Ok(Rotation { cos, sin })
    }
}

/// A rotation of (…, T, dim) by the angles of T positions: cos and sin (T, dim/2), read in the
/// tables' f32 values whatever the element type. Training's RoPE, and the turn back of
/// [`Rope::turning_back`].
#[derive(Debug, Clone)]
pub struct Rotation {
    cos: Vec<f64>,
    sin: Vec<f64>,
}

/// Rows per rayon task (a row is one head's vector at one position).
const ROWS_PER_TASK: usize = 64;

impl Rotation {
    /// Rotates `x` (…, T, dim), differentiable.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(self.clone())?)
    }

    /// Whether this rotates `rows` positions of `dim` values each.
    pub fn covers(&self, rows: usize, dim: usize) -> bool {
        dim.is_multiple_of(2) && self.cos.len() == rows * dim / 2
    }

    /// Rotates one head's vector `x` at position t in place, by the rotation or (`inverse`)
    /// back.
    pub fn rotate_row<T: WithDType>(&self, t: usize, x: &mut [T], inverse: bool) {
        let half = x.len() / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        let cos: Vec<T> = self.cos[t * half..][..half]
            .iter()
            .map(|&c| T::from_f64(c))
            .collect();
        let sin: Vec<T> = self.sin[t * half..][..half]
            .iter()
            .map(|&s| T::from_f64(sign * s))
            .collect();
        Rope::rotate(x, &cos, &sin);
    }

    fn rotate<T: WithDType>(&self, x: &[T], dim: usize) -> Vec<T> {
        let half = dim / 2;
        let positions = self.cos.len() / half;
        let (cos, sin): (Vec<T>, Vec<T>) = self
            .cos
            .iter()
            .zip(&self.sin)
            .map(|(&c, &s)| (T::from_f64(c), T::from_f64(s)))
            .unzip();
        let mut out = x.to_vec();
        out.par_chunks_mut(dim * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, rows)| {
                for (i, row) in rows.chunks_exact_mut(dim).enumerate() {
                    let p = (task * ROWS_PER_TASK + i) % positions;
                    let at = p * half..(p + 1) * half;
                    Rope::rotate(row, &cos[at.clone()], &sin[at]);
                }
            });
        out
    }
}

impl CustomOp1 for Rotation {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let (Some(&dim), Some((a, b))) = (dims.last(), l.contiguous_offsets()) else {
            candle_core::bail!("rope: a contiguous input, got {:?}", l.shape());
        };
        let t = if dims.len() >= 2 {
            dims[dims.len() - 2]
        } else {
            0
        };
        if dim % 2 != 0 || t * dim / 2 != self.cos.len() {
            candle_core::bail!(
                "rope: input {:?} against tables for {} values",
                l.shape(),
                self.cos.len()
            );
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.rotate(&x[a..b], dim)),
            CpuStorage::F64(x) => CpuStorage::F64(self.rotate(&x[a..b], dim)),
            _ => candle_core::bail!("rope: f32 or f64, got {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    /// The rotation is orthogonal: its gradient is the rotation by −angle.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Rotation {
            cos: self.cos.clone(),
            sin: self.sin.iter().map(|s| -s).collect(),
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_matches_composed, randn_in, tensor_rel_err};
    use candle_core::{DType, Var, D};

    /// The rotation in candle ops, differentiable: x·cos + rotate_half(x)·sin.
    fn composed(rope: &Rope, x: &Tensor, offset: usize) -> Tensor {
        let (t, half) = (x.dim(2).unwrap(), rope.dim / 2);
        let (cos, sin) = tables(rope.dim, rope.theta, offset, t, x.device()).unwrap();
        let (cos, sin) = (
            cos.to_dtype(x.dtype()).unwrap(),
            sin.to_dtype(x.dtype()).unwrap(),
        );
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let cos = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap();
        let sin = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap();
        (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
    }

    /// Training's op and inference's kernel against the definition, values and gradient, f32
    /// and f64, within the table and past its end (positions 14..19 of a 16-entry table), with
    /// more rows than one task holds.
    #[test]
    fn matches_the_definition_and_extends_past_the_table() {
        let rope = Rope::new(8, 10_000.0, 16, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&randn_in(dtype, 0.0, 1.0, &[2, 7, 5, 8])).unwrap();
            let r = randn_in(dtype, 0.0, 1.0, &[2, 7, 5, 8]);
            for offset in [3, 14] {
                let want = composed(&rope, &x, offset);
                let fused = rope.apply(&x, offset, Exec::Infer).unwrap();
                assert!(tensor_rel_err(&fused, &want) < 1e-6);
                let ours = rope.apply(&x, offset, Exec::Train).unwrap();
                // The op rounds as the composed ops did.
                let what = format!("{dtype:?} at {offset}");
                assert_matches_composed((ours, want), &[&x], &r, (1e-15, 1e-15), &what);
            }
        }
    }

    #[test]
    fn tables_of_another_length_are_errors() {
        let op = Rotation {
            cos: vec![1.0; 8],
            sin: vec![0.0; 8],
        };
        let x = randn_in(DType::F32, 0.0, 1.0, &[1, 2, 5, 8]);
        assert!(x.apply_op1(op).is_err());
    }
}
