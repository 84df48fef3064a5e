//! Mean next-token cross-entropy as one fused op, with an optional z-loss (PaLM; open_lm's
//! `--z-loss-coefficient`, which the SUPRA paper trains with) that keeps log Z near 0:
//!
//! loss = (1/N) Σᵢ (Lᵢ − xᵢ[tᵢ] + z·Lᵢ²),  Lᵢ = logsumexp(xᵢ)
//! ∂loss/∂xᵢ = (softmax(xᵢ)·(1 + 2z·Lᵢ) − onehot(tᵢ)) / N
//!
//! candle-nn's `cross_entropy` (log_softmax, gather, mean) makes about five full passes over
//! the (N, vocab) logits forward and as many backward, each into a fresh tensor: at seq 512 and
//! SmolLM2's 49,152-token vocabulary that is 100 MB per pass. This op reads the logits twice
//! forward (max, then Σ exp), keeps one log-sum-exp per row, and writes the gradient in one
//! pass, on both cores. `naive` (candle-nn's composition) is the reference the tests check.

use crate::model::expf::exp_map;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Mean cross-entropy of `logits` (N, V) f32 against `targets` (N) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    cross_entropy_z(logits, targets, 0.0)
}

/// [`cross_entropy`] plus `z_loss` · mean(logsumexp²).
pub fn cross_entropy_z(
    logits: &Tensor,
    targets: &Tensor,
    z_loss: f64,
) -> candle_core::Result<Tensor> {
    let op = FusedCrossEntropy {
        z_loss: z_loss as f32,
        lse: Mutex::default(),
    };
    logits.apply_op2(targets, op)
}

/// The reference: candle-nn's log_softmax / gather / mean.
pub fn naive(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, targets)
}

struct FusedCrossEntropy {
    z_loss: f32,
    /// Per-row log-sum-exp from the forward pass, reused by the backward pass.
    lse: Mutex<Vec<f32>>,
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused cross-entropy: {what} must be contiguous"),
    }
}

fn dims(logits: &Layout, targets: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, v) = logits.shape().dims2()?;
    if targets.shape().dims1()? != n {
        candle_core::bail!(
            "fused cross-entropy: {n} rows of logits but {} targets",
            targets.shape().elem_count()
        );
    }
    Ok((n, v))
}

/// log Σ e^x over a row; `scratch` holds the row's e^(x − max), summed in order afterwards.
fn log_sum_exp(row: &[f32], scratch: &mut Vec<f32>) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scratch.resize(row.len(), 0.0);
    exp_map(scratch, row, |x| x - max);
    let sum: f32 = scratch.iter().sum();
    max + sum.ln()
}

impl CustomOp2 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::U32(t)) = (s1, s2) else {
            candle_core::bail!("fused cross-entropy: expected f32 logits and u32 targets");
        };
        let (n, v) = dims(l1, l2)?;
        let (x, t) = (contiguous(x, l1, "logits")?, contiguous(t, l2, "targets")?);
        if let Some(&bad) = t.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("fused cross-entropy: target {bad} outside a vocabulary of {v}");
        }
        let lse: Vec<f32> = x
            .par_chunks(v)
            .map_init(Vec::new, |scratch, row| log_sum_exp(row, scratch))
            .collect();
        let total: f64 = lse
            .iter()
            .zip(x.chunks(v).zip(t))
            .map(|(&l, (row, &t))| (l - row[t as usize] + self.z_loss * l * l) as f64)
            .sum();
        *self.lse.lock().expect("lse lock") = lse;
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = logits.dims2()?;
        let scale = grad_res.to_scalar::<f32>()? / n as f32;
        let targets = targets.to_vec1::<u32>()?;
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(x)) = &*storage else {
            candle_core::bail!("fused cross-entropy: expected f32 CPU logits");
        };
        let x = contiguous(x, layout, "logits")?;
        let lse = self.lse.lock().expect("lse lock");
        let mut grad = vec![0f32; n * v];
        grad.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(lse.par_iter().zip(targets.par_iter()))
            .for_each(|((g, row), (&l, &t))| {
                let p_scale = scale * (1.0 + 2.0 * self.z_loss * l);
                exp_map(g, row, |x| x - l);
                for g in g.iter_mut() {
                    *g *= p_scale;
                }
                g[t as usize] -= scale;
            });
        let grad = Tensor::from_vec(grad, (n, v), logits.device())?;
        Ok((Some(grad), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_nn_value_and_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, v) = (7, 300);
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (n, v), &dev)?))?;
        let t = Tensor::new(&[0u32, 299, 5, 5, 150, 1, 298], &dev)?;
        let (fused, reference) = (cross_entropy(&x, &t)?, naive(&x, &t)?);
        let diff = (fused.to_scalar::<f32>()? - reference.to_scalar::<f32>()?).abs();
        assert!(diff < 1e-5, "loss differs by {diff}");
        // Scaled, so the incoming gradient is not 1 and the op must use it.
        let (gf, gr) = ((fused * 3.0)?.backward()?, (reference * 3.0)?.backward()?);
        let d = crate::testing::max_abs_diff(gf.get(&x).unwrap(), gr.get(&x).unwrap());
        assert!(d < 1e-6, "gradients differ by {d}");
        Ok(())
    }

    /// With a z-loss: the value and gradient of the composition CE + z·mean(logsumexp²).
    #[test]
    fn z_loss_matches_its_composition() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (5, 40), &dev)?))?;
        let t = Tensor::new(&[0u32, 39, 5, 5, 17], &dev)?;
        let z = 0.05;
        let fused = cross_entropy_z(&x, &t, z)?;
        let lse = x.as_tensor().exp()?.sum(1)?.log()?;
        let reference = (naive(&x, &t)? + (lse.sqr()?.mean_all()? * z)?)?;
        let diff = (fused.to_scalar::<f32>()? - reference.to_scalar::<f32>()?).abs();
        assert!(diff < 1e-5, "loss differs by {diff}");
        let (gf, gr) = (fused.backward()?, reference.backward()?);
        let d = crate::testing::max_abs_diff(gf.get(&x).unwrap(), gr.get(&x).unwrap());
        assert!(d < 1e-6, "gradients differ by {d}");
        Ok(())
    }

    #[test]
    fn rejects_targets_outside_the_vocabulary() -> candle_core::Result<()> {
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu)?;
        let t = Tensor::new(&[1u32, 4], &Device::Cpu)?;
        let err = cross_entropy(&x, &t).unwrap_err().to_string();
        assert!(err.contains("target 4 outside a vocabulary of 4"), "{err}");
        Ok(())
    }
}
