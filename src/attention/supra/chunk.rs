//! The training form: chunks of C tokens, the masked (parallel) form inside each and the
//! d'×d_v state across them, in differentiable candle ops. O(T·C) time, no T×T matrix. With
//! C ≥ T it is the parallel form ((Q̃K̃ᵀ/√d') ⊙ D) V in one piece.

use super::HeadDecays;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

/// γ_h^e for every head h and exponent e in `exps`, shape (1, H, len(exps), 1).
pub(crate) fn decay_powers(
    decays: &HeadDecays,
    exps: impl Iterator<Item = f64> + Clone,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    match decays {
        HeadDecays::Fixed(gammas) => {
            let vals: Vec<f64> = gammas
                .iter()
                .flat_map(|g| exps.clone().map(move |e| g.powf(e)))
                .collect();
            let n = vals.len() / gammas.len();
            Ok(Tensor::from_vec(vals, (1, gammas.len(), n, 1), dev)?.to_dtype(dtype)?)
        }
        HeadDecays::Learned(theta) => {
            // exp(e · log γ_h), differentiable in θ.
            let e: Vec<f64> = exps.collect();
            let n = e.len();
            let e = Tensor::from_vec(e, (1, 1, n, 1), dev)?.to_dtype(dtype)?;
            let log_gamma = log_sigmoid(theta)?.to_dtype(dtype)?;
            let h = log_gamma.dim(0)?;
            Ok(e.broadcast_mul(&log_gamma.reshape((1, h, 1, 1))?)?.exp()?)
        }
    }
}

/// log sigmoid(θ) = −log(1 + e^(−θ)).
fn log_sigmoid(theta: &Tensor) -> Result<Tensor> {
    Ok((theta.neg()?.exp()? + 1.0)?.log()?.neg()?)
}

/// D[h, t, i] = γ_h^(t−i) for i ≤ t, else 0; shape (1, H, T, T).
pub(crate) fn decay_mask(
    decays: &HeadDecays,
    t: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    match decays {
        HeadDecays::Fixed(gammas) => {
            let mut vals = Vec::with_capacity(gammas.len() * t * t);
            for g in gammas {
                for row in 0..t {
                    for col in 0..t {
                        vals.push(if col <= row {
                            g.powi((row - col) as i32)
                        } else {
                            0.0
                        });
                    }
                }
            }
            Ok(Tensor::from_vec(vals, (1, gammas.len(), t, t), dev)?.to_dtype(dtype)?)
        }
        HeadDecays::Learned(theta) => {
            // exp((t − i) · log γ_h) below the diagonal, 0 above.
            let (dist, causal): (Vec<f64>, Vec<f64>) = (0..t)
                .flat_map(|row| {
                    (0..t).map(move |col| {
                        if col <= row {
                            ((row - col) as f64, 1.0)
                        } else {
                            (0.0, 0.0)
                        }
                    })
                })
                .unzip();
            let dist = Tensor::from_vec(dist, (1, 1, t, t), dev)?.to_dtype(dtype)?;
            let causal = Tensor::from_vec(causal, (1, 1, t, t), dev)?.to_dtype(dtype)?;
            let log_gamma = log_sigmoid(theta)?.to_dtype(dtype)?;
            let h = log_gamma.dim(0)?;
            Ok(dist
                .broadcast_mul(&log_gamma.reshape((1, h, 1, 1))?)?
                .exp()?
                .broadcast_mul(&causal)?)
        }
    }
}

/// q̃, k̃ (B, H, T, d') and v (B, H, T, d_v), keys and values already at their query heads.
/// `state` is S before the first token (zeros when `None`); returns (O, S after the last token).
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    decays: &HeadDecays,
    chunk: usize,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    ensure!(
        k.dims() == q.dims() && v.dims4()? == (b, h, t, dv) && decays.heads()? == h && chunk > 0,
        "q̃ {:?}, k̃ {:?}, v {:?}, {} decays, chunk {chunk}",
        q.dims(),
        k.dims(),
        v.dims(),
        decays.heads()?
    );
    let (dtype, dev) = (q.dtype(), q.device());
    let scale = 1.0 / (dk as f64).sqrt();
    let mut s = match state {
        Some(s) => s.clone(),
        None => Tensor::zeros((b, h, dk, dv), dtype, dev)?,
    };
    let mut outs = Vec::with_capacity(t.div_ceil(chunk));
    let mut start = 0;
    while start < t {
        let len = chunk.min(t - start);
        let qc = q.narrow(2, start, len)?.contiguous()?;
        let kc = k.narrow(2, start, len)?.contiguous()?;
        let vc = v.narrow(2, start, len)?.contiguous()?;
        // Inside the chunk: the parallel form on len × len.
        let intra = ((qc.matmul(&kc.t()?)? * scale)?
            .broadcast_mul(&decay_mask(decays, len, dtype, dev)?)?)
        .matmul(&vc)?;
        // From earlier chunks: q̃_t S γ^(j+1) for local position j.
        let inter = qc.matmul(&s)?.broadcast_mul(&decay_powers(
            decays,
            (1..=len).map(|j| j as f64),
            dtype,
            dev,
        )?)?;
        outs.push((intra + inter)?);
        // S ← γ^len S + Σ_j γ^(len−1−j) k̃_jᵀ v_j / √d'.
        let k_decayed = kc.broadcast_mul(&decay_powers(
            decays,
            (0..len).rev().map(|j| j as f64),
            dtype,
            dev,
        )?)?;
        let whole = decay_powers(decays, std::iter::once(len as f64), dtype, dev)?;
        s = (s.broadcast_mul(&whole)? + (k_decayed.t()?.matmul(&vc)? * scale)?)?;
        start += len;
    }
    Ok((Tensor::cat(&outs, 2)?, s))
}
