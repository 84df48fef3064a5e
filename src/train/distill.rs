//! Distillation: the student's next-token distribution pulled toward its teacher's over the
//! whole vocabulary, with the teacher run online on the same windows. Only the full
//! distribution is an unbiased target: caching the teacher's top-k probabilities is not
//! (Sparse Logit Sampling, ACL 2025).
//!
//! loss = (1/N) Σᵢ aᵢ [T² · KL(pᵢ ‖ qᵢ) + w · CEᵢ],  pᵢ = softmax(tᵢ/T), qᵢ = softmax(sᵢ/T)
//! ∂loss/∂sᵢ = aᵢ (T · (qᵢ − pᵢ) + w · (softmax(sᵢ) − onehot(yᵢ))) / N
//!
//! (t the teacher's logits, s the student's, y the data's next token, aᵢ a constant weight
//! per token, 1 unless [`GapWeights`] sets it; T² keeps the gradient's size independent of
//! the temperature, as Hinton et al. 2015 scale it.) With Lₜ, Lₛ the
//! log-sum-exps of t/T and s/T and mₜ the row's max of t,
//! KL = Σᵥ e^{(tᵥ − mₜ)/T} (tᵥ − sᵥ) / (T · Σᵥ e^{(tᵥ − mₜ)/T}) − Lₜ + Lₛ,
//! so [`loss`] reads each pair of rows twice forward (maxima, then every sum in one pass) and
//! once backward, where a composition of candle ops ([`naive`], the tests' reference) makes a
//! dozen passes over (N, vocab) tensors of 100 MB each at seq 512.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::sync::Mutex;

use crate::attention::supra::fused::slice;
use crate::attention::window::Branches;
use crate::config::AttentionKind;
use crate::io::LoadedModel;
use crate::model::expf::exp_map;
use crate::model::llama::Llama;

/// Mean distillation loss of `student` logits (N, V) against `teacher` logits (N, V) at
/// `temperature`, plus `ce_weight` × the cross-entropy against `targets` (N, u32); with
/// `weights` (N, constants), each token's term times its weight.
pub fn loss(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    temperature: f64,
    ce_weight: f64,
    weights: Option<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    let valid = temperature > 0.0 && temperature.is_finite() && ce_weight >= 0.0;
    if !valid {
        candle_core::bail!(
            "distillation: temperature {temperature} must be positive and the cross-entropy weight {ce_weight} non-negative"
        );
    }
    if let Some(w) = &weights {
        if w.len() != student.dim(0)? || w.iter().any(|w| !w.is_finite() || *w < 0.0) {
            candle_core::bail!(
                "distillation: {} token weights for {} tokens (each finite and non-negative)",
                w.len(),
                student.dim(0)?
            );
        }
    }
    let op = FusedDistill {
        temperature: temperature as f32,
        ce_weight: ce_weight as f32,
        weights,
        rows: Mutex::default(),
    };
    student.apply_op3(&teacher.detach(), targets, op)
}

/// The reference: the same loss composed of candle ops (log-softmax, exp, gather, sums);
/// `weights` (N) in the student's dtype.
pub fn naive(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    temperature: f64,
    ce_weight: f64,
    weights: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    use candle_nn::ops::log_softmax;
    let log_q = log_softmax(&(student / temperature)?, 1)?;
    let log_p = log_softmax(&(teacher.detach() / temperature)?, 1)?;
    let kl = (log_p.exp()? * (log_p - log_q)?)?.sum(1)?;
    let mut rows = (kl * (temperature * temperature))?;
    if ce_weight > 0.0 {
        let picked = log_softmax(student, 1)?.gather(&targets.unsqueeze(1)?, 1)?;
        rows = (rows - (picked.squeeze(1)? * ce_weight)?)?;
    }
    match weights {
        Some(w) => (rows * w.detach())?.mean_all(),
        None => rows.mean_all(),
    }
}

/// What the backward pass needs of each row: maxima and log-sums of s/T and t/T, and the
/// log-sum-exp of s itself (for the cross-entropy term).
#[derive(Clone, Copy, Default)]
struct Row {
    max_s: f32,
    log_zs: f32,
    max_t: f32,
    log_zt: f32,
    lse1: f32,
}

struct FusedDistill {
    temperature: f32,
    ce_weight: f32,
    /// Per token, the constant its term is multiplied by (None: 1).
    weights: Option<Vec<f32>>,
    rows: Mutex<Vec<Row>>,
}

impl FusedDistill {
    /// Row statistics and the row's loss term T²·KL + w·CE.
    /// `buf` holds the row's exps (of s/T, t/T and, for the cross-entropy term at T ≠ 1, of s),
    /// summed in order afterwards.
    fn row(&self, s: &[f32], t: &[f32], y: u32, buf: &mut [Vec<f32>; 3]) -> (Row, f64) {
        let inv_t = 1.0 / self.temperature;
        let max_s = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let max_t = t.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (mut zs, mut zt, mut cross, mut z1) = (0f64, 0f64, 0f64, 0f64);
        let one = self.temperature == 1.0;
        let plain = !one && self.ce_weight > 0.0;
        let [es, et, e1] = buf;
        for b in [&mut *es, &mut *et] {
            b.resize(s.len(), 0.0);
        }
        exp_map(et, t, |t| (t - max_t) * inv_t);
        exp_map(es, s, |s| (s - max_s) * inv_t);
        if plain {
            e1.resize(s.len(), 0.0);
            exp_map(e1, s, |s| s - max_s);
        }
        for i in 0..s.len() {
            let et = et[i] as f64;
            zt += et;
            cross += et * (t[i] - s[i]) as f64;
            zs += es[i] as f64;
            if plain {
                z1 += e1[i] as f64;
            }
        }
        let temp = self.temperature as f64;
        let lse_s = max_s as f64 * inv_t as f64 + zs.ln();
        let lse_t = max_t as f64 * inv_t as f64 + zt.ln();
        let kl = cross / (temp * zt) - lse_t + lse_s;
        let lse1 = if one { lse_s } else { max_s as f64 + z1.ln() };
        let ce = if self.ce_weight > 0.0 {
            lse1 - s[y as usize] as f64
        } else {
            0.0
        };
        let row = Row {
            max_s,
            log_zs: zs.ln() as f32,
            max_t,
            log_zt: zt.ln() as f32,
            lse1: lse1 as f32,
        };
        (row, temp * temp * kl + self.ce_weight as f64 * ce)
    }
}

impl CustomOp3 for FusedDistill {
    fn name(&self) -> &'static str {
        "fused-distillation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if !matches!(
            (s1, s2, s3),
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::U32(_))
        ) {
            candle_core::bail!(
                "distillation: expected f32 student and teacher logits and u32 targets"
            );
        }
        let (n, v) = l1.shape().dims2()?;
        if l2.shape().dims() != [n, v] || l3.shape().dims1()? != n {
            candle_core::bail!(
                "distillation: student logits {:?}, teacher logits {:?} and targets {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let (s, t, y) = (
            slice::<f32>(s1, l1)?,
            slice::<f32>(s2, l2)?,
            slice::<u32>(s3, l3)?,
        );
        if let Some(&bad) = y.iter().find(|&&y| y as usize >= v) {
            candle_core::bail!("distillation: target {bad} outside a vocabulary of {v}");
        }
        let (rows, terms): (Vec<Row>, Vec<f64>) = s
            .par_chunks(v)
            .zip(t.par_chunks(v))
            .zip(y.par_iter())
            .map_init(Default::default, |buf, ((s, t), &y)| self.row(s, t, y, buf))
            .unzip();
        *self.rows.lock().expect("rows lock") = rows;
        let total: f64 = match &self.weights {
            Some(w) => terms.iter().zip(w).map(|(x, &w)| x * w as f64).sum(),
            None => terms.iter().sum(),
        };
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, v) = student.dims2()?;
        let scale = grad_res.to_scalar::<f32>()? / n as f32;
        let y = targets.to_vec1::<u32>()?;
        let (student, teacher) = (student.contiguous()?, teacher.contiguous()?);
        let (ss, sl) = student.storage_and_layout();
        let (ts, tl) = teacher.storage_and_layout();
        let (candle_core::Storage::Cpu(ss), candle_core::Storage::Cpu(ts)) = (&*ss, &*ts) else {
            candle_core::bail!("distillation: expected CPU logits");
        };
        let (s, t) = (slice::<f32>(ss, sl)?, slice::<f32>(ts, tl)?);
        let rows = self.rows.lock().expect("rows lock");
        let (temp, inv_t, w) = (self.temperature, 1.0 / self.temperature, self.ce_weight);
        let one = temp == 1.0;
        let mut grad = vec![0f32; n * v];
        let weight = |i: usize| self.weights.as_ref().map_or(1.0, |w| w[i]);
        grad.par_chunks_mut(v)
            .zip(s.par_chunks(v).zip(t.par_chunks(v)))
            .zip(rows.par_iter().zip(y.par_iter()))
            .enumerate()
            .for_each_init(
                || [Vec::new(), Vec::new()],
                |[p, e1], (row, ((g, (s, t)), (r, &y)))| {
                    let scale = scale * weight(row);
                    // g holds q until overwritten.
                    exp_map(g, s, |s| (s - r.max_s) * inv_t - r.log_zs);
                    p.resize(v, 0.0);
                    exp_map(p, t, |t| (t - r.max_t) * inv_t - r.log_zt);
                    let plain = w > 0.0 && !one;
                    if plain {
                        e1.resize(v, 0.0);
                        exp_map(e1, s, |s| s - r.lse1);
                    }
                    for i in 0..v {
                        let q = g[i];
                        let mut d = temp * (q - p[i]);
                        if w > 0.0 {
                            d += w * if one { q } else { e1[i] };
                        }
                        g[i] = scale * d;
                    }
                    if w > 0.0 {
                        g[y as usize] -= scale * w;
                    }
                },
            );
        let grad = Tensor::from_vec(grad, (n, v), student.device())?;
        Ok((Some(grad), None, None))
    }
}

/// The teacher of distillation: the model the run started from with every layer softmax
/// attention (on its own q, k, v and Wo), in its inference form, so its forward builds no
/// graph. Its weights are copies the optimizer never touches.
pub struct Teacher {
    model: Llama,
    fingerprint: String,
}

impl Teacher {
    /// The teacher in `source`: a pretrained model, or one converted from it whose Wo no
    /// transfer run has rescaled yet (its softmax layers are then the original's).
    pub fn new(source: &LoadedModel) -> Result<Self> {
        if source.config.lora.is_some() {
            bail!("the distillation teacher carries unmerged LoRA adapters; give a merged model (a run's final/)");
        }
        let mut config = source.config.clone();
        config.layer_kinds = vec![AttentionKind::Softmax; config.num_hidden_layers];
        config.supra = None;
        let mut hash = Sha256::new();
        hash.update(serde_json::to_vec(&config.to_hf_json())?);
        let mut names: Vec<String> = crate::model::params::table(&config)
            .into_iter()
            .map(|p| p.name)
            .collect();
        names.sort();
        for name in &names {
            let Some(w) = source.weights.get(name) else {
                bail!("the distillation teacher has no tensor '{name}'");
            };
            hash.update(name.as_bytes());
            let values = w
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            hash.update(&bytes);
        }
        Ok(Self {
            model: Llama::new(&config, &source.weights)?,
            fingerprint: format!("{:x}", hash.finalize()),
        })
    }

    /// `teacher`, a model other than the `student` trained (the original model when a trained
    /// one is trained on): its logits must index the student's vocabulary.
    pub fn other(teacher: &LoadedModel, student: &LoadedModel) -> Result<Self> {
        let (t, s) = (teacher.config.vocab_size, student.config.vocab_size);
        if t != s || !teacher.tokenizer.same_vocabulary(&student.tokenizer) {
            bail!(
                "--teacher: its vocabulary ({t} logits) is not the trained model's ({s}); distillation compares the two distributions token by token"
            );
        }
        Self::new(teacher)
    }

    /// A digest of the teacher's config and weights: a resumed run must distil from the same.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Logits (batch · seq, vocab) for `inputs` (batch, seq), outside any graph.
    pub fn logits(&self, inputs: &Tensor) -> Result<Tensor> {
        let hidden = self.model.forward_hidden(inputs, None)?;
        let logits = self.model.logits(&hidden)?;
        Ok(logits.reshape(((), self.model.config.vocab_size))?.detach())
    }
}

/// Per row of `teacher` and `other` logits (N, V): KL(softmax(teacher) ‖ softmax(other)),
/// with the loss's own row arithmetic (at T = 1, no cross-entropy).
pub fn row_kl(teacher: &Tensor, other: &Tensor) -> Result<Vec<f32>> {
    let v = teacher.dim(1)?;
    if other.dims() != teacher.dims() {
        bail!(
            "row_kl: logits {:?} and {:?} do not match",
            teacher.dims(),
            other.dims()
        );
    }
    let op = FusedDistill {
        temperature: 1.0,
        ce_weight: 0.0,
        weights: None,
        rows: Mutex::default(),
    };
    let (t, o) = (teacher.flatten_all()?, other.flatten_all()?);
    let (t, o) = (t.to_vec1::<f32>()?, o.to_vec1::<f32>()?);
    Ok(t.par_chunks(v)
        .zip(o.par_chunks(v))
        .map_init(Default::default, |buf, (t, o)| {
            op.row(o, t, 0, buf).1 as f32
        })
        .collect())
}

/// Distillation weighted toward the tokens that need the long context. Most of what the
/// teacher gains over its own window comes from a few tokens (long-range copies: on
/// text/valid at window 128, 5 % of the tokens carry 86 % of the gain), which plain
/// distillation weighs like any other; the linear state is what can win them back. Each
/// token's weight is `(1 − share) + share · gᵢ / ḡ`, with gᵢ = KL(teacher ‖ local) at that
/// token, ḡ its mean over the micro-batch, and `local` the model the run starts from with
/// its linear branch off (for a converted model: the teacher restricted to its window and
/// sinks), so the weights are constants of the data and average 1.
pub struct GapWeights {
    local: Llama,
    share: f64,
}

impl GapWeights {
    /// `start`: the model the run starts from, with window layers; `share` in 0..=1.
    pub fn new(start: &LoadedModel, share: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&share) {
            bail!("--gap-weight {share} must be between 0 and 1");
        }
        let c = &start.config;
        if !c.layer_kinds.contains(&AttentionKind::Window) {
            bail!("--gap-weight applies to models with window layers (it weighs tokens by what the window misses); this one has none");
        }
        if c.lora.is_some() {
            bail!("--gap-weight: the model carries unmerged LoRA adapters; give a merged model (a run's final/)");
        }
        let mut local = Llama::new(c, &start.weights)?;
        local.set_branches(Branches::Window);
        Ok(Self { local, share })
    }

    /// The weights of the tokens of `inputs` (batch, seq), given the teacher's logits on them
    /// (batch · seq, vocab).
    pub fn weights(&self, inputs: &Tensor, teacher: &Tensor) -> Result<Vec<f32>> {
        let local = self
            .local
            .logits(&self.local.forward_hidden(inputs, None)?)?;
        let local = local.reshape(teacher.dims())?;
        let gap: Vec<f64> = row_kl(teacher, &local)?
            .into_iter()
            .map(|g| g.max(0.0) as f64)
            .collect();
        let mean = gap.iter().sum::<f64>() / gap.len().max(1) as f64;
        if mean <= 0.0 {
            // The window sees the whole history of every token here: nothing to weigh by.
            return Ok(vec![1.0; gap.len()]);
        }
        Ok(gap
            .iter()
            .map(|&g| ((1.0 - self.share) + self.share * g / mean) as f32)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn case(t: f64, w: f64, weights: Option<Vec<f32>>) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, v) = (6, 257);
        let s = Var::from_tensor(&Tensor::randn(0f32, 3.0, (n, v), &dev)?)?;
        // A teacher near the student, as late in training, and one far from it.
        let near = (s.as_tensor() + Tensor::randn(0f32, 0.3, (n, v), &dev)?)?;
        let far = Tensor::randn(0f32, 4.0, (n, v), &dev)?;
        let y = Tensor::new(&[0u32, 256, 5, 5, 100, 1], &dev)?;
        for teacher in [near, far] {
            let fused = loss(&s, &teacher, &y, t, w, weights.clone())?;
            // The reference in f64, so that what is compared is this op's own rounding.
            let f64 = candle_core::DType::F64;
            let a = match &weights {
                Some(a) => Some(Tensor::new(a.as_slice(), &dev)?.to_dtype(f64)?),
                None => None,
            };
            let (s64, t64) = (s.to_dtype(f64)?, teacher.to_dtype(f64)?);
            let reference =
                naive(&s64, &t64, &y, t, w, a.as_ref())?.to_dtype(candle_core::DType::F32)?;
            let (a, b) = (fused.to_scalar::<f32>()?, reference.to_scalar::<f32>()?);
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "T {t}, w {w}, {weights:?}: loss {a} vs {b}"
            );
            // Scaled, so the incoming gradient is not 1 and the op must use it.
            let gf = (fused * 3.0)?.backward()?;
            let gr = (reference * 3.0)?.backward()?;
            let (gf, gr) = (gf.get(&s).unwrap(), gr.get(&s).unwrap());
            let d = crate::testing::max_abs_diff(gf, gr);
            let size = gr.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                d <= 1e-5 * size,
                "T {t}, w {w}, {weights:?}: gradients differ by {d} (max {size})"
            );
        }
        Ok(())
    }

    #[test]
    fn matches_its_composition_at_every_setting() -> candle_core::Result<()> {
        // Token weights as the gap weighting gives them: mean 1, one token left out.
        let weights = vec![0.2f32, 3.0, 1.0, 0.0, 0.5, 1.3];
        for (t, w) in [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5), (0.5, 0.25)] {
            case(t, w, None)?;
            case(t, w, Some(weights.clone()))?;
        }
        Ok(())
    }

    #[test]
    fn row_kl_is_each_rows_composed_kl() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f32, 3.0, (5, 300), &dev)?;
        let o = (&t + Tensor::randn(0f32, 1.0, (5, 300), &dev)?)?;
        let y = Tensor::zeros(1, candle_core::DType::U32, &dev)?;
        let kl = row_kl(&t, &o)?;
        assert_eq!(kl.len(), 5);
        let f64 = candle_core::DType::F64;
        for (i, &k) in kl.iter().enumerate() {
            let one = |x: &Tensor| x.narrow(0, i, 1)?.to_dtype(f64);
            let want = naive(&one(&o)?, &one(&t)?, &y, 1.0, 0.0, None)?.to_scalar::<f64>()?;
            assert!(
                (k as f64 - want).abs() <= 1e-5 * want.max(1.0),
                "row {i}: {k} vs {want}"
            );
        }
        let same = row_kl(&t, &t)?.iter().map(|k| k.abs()).fold(0f32, f32::max);
        assert!(same < 1e-5, "KL of a distribution to itself: {same}");
        Ok(())
    }

    #[test]
    fn is_zero_with_no_gradient_when_the_student_is_the_teacher() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let s = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 100), &dev)?)?;
        let y = Tensor::new(&[0u32, 1, 2, 3], &dev)?;
        let l = loss(&s, &s.as_tensor().copy()?, &y, 1.5, 0.0, None)?;
        assert!(l.to_scalar::<f32>()?.abs() < 1e-5);
        let g = l.backward()?;
        let m = g.get(&s).unwrap().abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(m < 1e-7, "gradient {m}");
        Ok(())
    }

    #[test]
    fn rejects_bad_operands() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &dev)?;
        let y = Tensor::new(&[1u32, 4], &dev)?;
        let e = loss(&x, &x, &y, 1.0, 0.0, None).unwrap_err().to_string();
        assert!(e.contains("target 4 outside a vocabulary of 4"), "{e}");
        let wide = Tensor::zeros((2, 5), candle_core::DType::F32, &dev)?;
        let y = Tensor::new(&[1u32, 2], &dev)?;
        let e = loss(&x, &wide, &y, 1.0, 0.0, None).unwrap_err().to_string();
        assert!(e.contains("do not match"), "{e}");
        let e = loss(&x, &x, &y, 0.0, 0.0, None).unwrap_err().to_string();
        assert!(e.contains("must be positive"), "{e}");
        let e = loss(&x, &x, &y, 1.0, 0.0, Some(vec![1.0])).unwrap_err();
        assert!(
            e.to_string().contains("1 token weights for 2 tokens"),
            "{e}"
        );
        let e = loss(&x, &x, &y, 1.0, 0.0, Some(vec![1.0, -1.0])).unwrap_err();
        assert!(e.to_string().contains("non-negative"), "{e}");
        Ok(())
    }
}
