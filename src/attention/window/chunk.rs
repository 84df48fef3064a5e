//! The training form, differentiable: queries in chunks of C, each chunk's exact part over the
//! keys its windows and the sinks can reach (C × (C + w − 1 + s) scores, never T × T), and the
//! linear part as SUPRA's chunked form over the keys *shifted by w*: token n reads the state
//! that holds keys up to n − w, which is plain causal linear attention between q_n and
//! k'_n = k_{n−w} (zero where n − w is a sink or before the start). With C ≥ T it is the
//! parallel form.

use super::{fused, Span, EPS};
use crate::attention::supra::{group_norm::group_norm, training_sums, HeadDecays};
use crate::attention::{delta, repeat_kv};
use crate::config::{LinearRule, Mix};
use crate::model::rope::Rotation;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// Rows n of `x` (B, H, T, c) moved to n + w, the sinks' rows dropped: row n of the result is
/// x[n − w] when n − w ≥ s, else zeros.
fn shifted(x: &Tensor, span: Span) -> Result<Tensor> {
    let (b, h, t, c) = x.dims4()?;
    let lead = (span.sinks + span.window).min(t);
    let zeros = Tensor::zeros((b, h, lead, c), x.dtype(), x.device())?;
    if lead == t {
        return Ok(zeros);
    }
    let moved = x.narrow(2, span.sinks, t - lead)?;
    Ok(Tensor::cat(&[&zeros, &moved], 2)?)
}

/// q (B, H, T, d), k and v (B, H_kv, T, d) RoPE'd as the teacher's, `sinks` the turn of q
/// into the queries that score the sinks (none: q scores them); φq (B, H, T, d') and φk
/// (B, H_kv, T, d'); `weights` (1, H, 1, 1) the mix (α or g), with the delta rule's
/// parameters (H, d' + 1) where the state follows it (gated or value mix only). Returns y
/// (B, H, T, d).
pub fn chunked(
    ((q, k, v), sinks): ((&Tensor, &Tensor, &Tensor), Option<&Rotation>),
    (fq, fk): (&Tensor, &Tensor),
    (weights, delta): (&Tensor, Option<&Tensor>),
    decays: &HeadDecays,
    span: Span,
    mix: Mix,
    chunk: usize,
) -> Result<Tensor> {
    let (b, hkv, t, d) = k.dims4()?;
    if let Some(why) = mix.refuses(LinearRule::of(delta)) {
        bail!("window layer: {why}");
    }
    // The linear branch: B and, for the shared normaliser, b as one more value column of ones.
    let (fk_out, v_out) = (&shifted(fk, span)?, &shifted(v, span)?);
    let lin = match delta {
        Some(params) => {
            // The value mix asks with unit queries: a key matched exactly answers its value.
            let fq = match mix {
                Mix::Value => delta::chunk::unit_rows(fq)?,
                _ => fq.clone(),
            };
            delta::training(&fq, fk_out, v_out, params, decays, chunk)?
        }
        None if mix == Mix::Shared => {
            let ones = Tensor::ones((b, hkv, t, 1), v.dtype(), v.device())?;
            let v1 = Tensor::cat(&[v_out, &ones], 3)?;
            training_sums(fq, fk_out, &v1, decays, chunk)?
        }
        None => training_sums(fq, fk_out, v_out, decays, chunk)?,
    };
    let ex = exact_sums(((q, k, v), sinks), span, chunk)?;
    let (big_a, a) = (ex.narrow(3, 0, d)?, ex.narrow(3, d, 1)?);
    Ok(match mix {
        Mix::Shared => {
            let (big_b, lb) = (lin.narrow(3, 0, d)?, lin.narrow(3, d, 1)?);
            let num = (big_a + big_b.broadcast_mul(weights)?)?;
            let den = ((a + lb.broadcast_mul(weights)?)? + EPS)?;
            num.broadcast_div(&den)?
        }
        Mix::Gated | Mix::Value => {
            // a ≥ 1 wherever a key is allowed (its largest term is exp(0)); the tiny addend
            // only turns rows with none into 0 rather than 0/0.
            let win = big_a.broadcast_div(&(a + 1e-30)?)?;
            let keep = weights.affine(-1.0, 1.0)?;
            let lin = match mix {
                Mix::Value => lin,
                _ => group_norm(&lin)?,
            };
            (win.broadcast_mul(&keep)? + lin.broadcast_mul(weights)?)?
        }
    })
}

/// The exact part's sums [A, a] (B, H, T, d + 1) ([`fused`] spells them out): the fused op
/// where it applies (f32 or f64, more than one chunk), else composed; with one chunk that is
/// the parallel form (`score --mode parallel`), kept composed as the reference the others are
/// held to.
pub fn exact_sums(
    ((q, k, v), sinks): ((&Tensor, &Tensor, &Tensor), Option<&Rotation>),
    span: Span,
    chunk: usize,
) -> Result<Tensor> {
    let (_, h, t, _) = q.dims4()?;
    if chunk < t && matches!(q.dtype(), DType::F32 | DType::F64) {
        return fused::exact((q, k, v), sinks, span, chunk);
    }
    let qs = sinks.map(|r| r.apply(q)).transpose()?;
    let kv = (repeat_kv(k, h)?, repeat_kv(v, h)?);
    exact_composed((q, qs.as_ref(), &kv.0, &kv.1), span, chunk)
}

/// [`exact_sums`] from candle ops, keys and values at the query heads.
pub fn exact_composed(
    (q, qs, k, v): (&Tensor, Option<&Tensor>, &Tensor, &Tensor),
    span: Span,
    chunk: usize,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (dtype, dev) = (q.dtype(), q.device());
    let scale = 1.0 / (d as f64).sqrt();
    let chunk = chunk.min(t).max(1);
    let mut outs = Vec::with_capacity(t.div_ceil(chunk));
    for c0 in (0..t).step_by(chunk) {
        let len = chunk.min(t - c0);
        // Keys any query of the chunk may see exactly: the sinks, then c0 − w + 1 .. c0 + len.
        let lo = (c0 + 1).saturating_sub(span.window).min(c0 + len);
        let sinks = span.sinks.min(lo);
        let positions: Vec<usize> = (0..sinks).chain(lo..c0 + len).collect();
        let keys = positions.len();
        if keys == 0 {
            outs.push(Tensor::zeros((b, h, len, d + 1), dtype, dev)?);
            continue;
        }
        let pick = |x: &Tensor| -> Result<Tensor> {
            let win = x.narrow(2, lo, c0 + len - lo)?;
            Ok(if sinks > 0 {
                Tensor::cat(&[&x.narrow(2, 0, sinks)?, &win], 2)?
            } else {
                win
            })
        };
        let (kc, vc) = (pick(k)?, pick(v)?.contiguous()?);
        let qc = q.narrow(2, c0, len)?.contiguous()?;
        let allowed: Vec<f64> = (c0..c0 + len)
            .flat_map(|n| {
                positions
                    .iter()
                    .map(move |&m| f64::from(u8::from(span.exact(n, m))))
            })
            .collect();
        let allowed = Tensor::from_vec(allowed, (1, 1, len, keys), dev)?.to_dtype(dtype)?;
        // Masked logits far below any real one, so the max is over allowed keys only; the exp
        // is multiplied by the mask as well, for rows that allow none.
        let kt = kc.contiguous()?.t()?;
        let mut logits = qc.matmul(&kt)?;
        if let Some(qs) = qs.filter(|_| positions[0] < span.sinks) {
            // The sinks' columns (positions below s, a prefix) from q̃.
            let sink: Vec<f64> = positions
                .iter()
                .map(|&m| f64::from(u8::from(m < span.sinks)))
                .collect();
            let sink = Tensor::from_vec(sink, (1, 1, 1, keys), dev)?.to_dtype(dtype)?;
            let from_qs = qs.narrow(2, c0, len)?.contiguous()?.matmul(&kt)?;
            logits = (logits.broadcast_mul(&sink.affine(-1.0, 1.0)?)?
                + from_qs.broadcast_mul(&sink)?)?;
        }
        let masked = ((logits * scale)?.broadcast_add(&((&allowed - 1.0)? * 1e30)?))?;
        let c = masked.max_keepdim(D::Minus1)?;
        let e = masked.broadcast_sub(&c)?.exp()?.broadcast_mul(&allowed)?;
        outs.push(Tensor::cat(
            &[e.matmul(&vc)?, e.sum_keepdim(D::Minus1)?],
            3,
        )?);
    }
    Ok(Tensor::cat(&outs, 2)?)
}
