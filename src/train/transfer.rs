//! Attention transfer (LoLCATs stage 1): each SUPRA layer learns, through its φ alone, to give
//! the per-head output that the teacher's softmax attention gives on the same input.
//!
//! The teacher is the model itself with each SUPRA layer run as softmax attention on its own
//! q, k, v and Wo: it needs no second copy of the weights. The decoder knows nothing of this; it
//! runs the teacher through [`Llama::forward_with`], its per-layer hook.

use crate::attention::supra::group_norm::group_norm;
use crate::attention::{Cell, Exec};
use crate::io::LoadedModel;
use crate::model::linear::Linear;
use crate::model::llama::Llama;
use crate::model::rope::Rope;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// What a SUPRA layer's per-head output is compared with (window layers always compare raw
/// outputs: they normalise as softmax does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The teacher's per-head output GroupNorm'd to unit RMS per token, as the layer's own.
    #[default]
    Normalized,
    /// The teacher's per-head output as it is (LoLCATs), against the layer's output times its
    /// head's calibration factor, which is what reaches Wo's teacher columns.
    Raw,
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "normalized" => Ok(Self::Normalized),
            "raw" => Ok(Self::Raw),
            other => bail!("unknown transfer target '{other}' (known: normalized, raw)"),
        }
    }
}

/// What the teacher needs beyond the model: RoPE over the head dimension, and per layer the
/// teacher's own Wo where calibration ([`calibrate_output_scale`]) changed the model's.
pub struct Teacher {
    rope: Rope,
    /// Per layer, the teacher's Wo: the model's divided by the calibration's per-head factors
    /// (`None`: the layer's Wo is the teacher's).
    wo: Vec<Option<Linear>>,
    target: Target,
    /// Per layer, the calibration's per-head factors shaped (1, heads, 1, 1), for the raw
    /// target (`None`: factor 1).
    head_scales: Vec<Option<Tensor>>,
}

impl Teacher {
    /// For `model` as calibrated with `wo_scales` (what [`calibrate_output_scale`] returned;
    /// empty: no calibration).
    pub fn new(
        model: &LoadedModel,
        wo_scales: &[Option<Vec<f32>>],
        target: Target,
    ) -> Result<Self> {
        let c = &model.config;
        let wo = wo_scales
            .iter()
            .enumerate()
            .map(|(layer, s)| {
                let Some(s) = s else { return Ok(None) };
                let w = &model.weights[&format!("model.layers.{layer}.self_attn.o_proj.weight")];
                let w = w.detach().broadcast_div(&head_columns(s, c.head_dim)?)?;
                Ok(Some(Linear::new(w, None)))
            })
            .collect::<Result<_>>()?;
        let head_scales = wo_scales
            .iter()
            .map(|s| {
                s.as_ref()
                    .map(|s| Tensor::from_slice(s, (1, s.len(), 1, 1), &Device::Cpu))
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            rope: Rope::new(
                c.head_dim,
                c.rope_theta,
                c.max_position_embeddings,
                &Device::Cpu,
            )?,
            wo,
            target,
            head_scales,
        })
    }

    /// Runs the teacher over `tokens` and shows every layer with a linear branch (by index) its
    /// input and the teacher's per-head output there. Nothing here needs gradients: the teacher
    /// runs in its inference forms, and its outputs are detached.
    fn walk(
        &self,
        model: &Llama,
        tokens: &Tensor,
        mut visit: impl FnMut(usize, &Cell, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let (b, t) = tokens.dims2()?;
        model.forward_with(tokens, Exec::Infer, |i, cell, xn| {
            let xn = xn.detach();
            let teacher = match cell {
                Cell::Softmax(a) => return a.forward(&xn, 0, None, Exec::Infer),
                Cell::Supra(a) => a.teacher(&self.rope),
                Cell::Window(a) => a.teacher(),
            };
            let y = teacher.heads_output(&xn, 0, None, Exec::Infer)?.detach();
            visit(i, cell, &xn, &y)?;
            let y = y.transpose(1, 2)?.reshape((b, t, ()))?;
            let wo = self
                .wo
                .get(i)
                .and_then(Option::as_ref)
                .unwrap_or(&teacher.proj.o);
            Ok(wo.forward(&y, Exec::Infer)?.detach())
        })?;
        Ok(())
    }

    /// For each layer with a linear branch, the mean squared error between its per-head output
    /// (before Wo) and the teacher's softmax output on the same input. A SUPRA layer can only
    /// produce per-head normalized outputs (GroupNorm): by default its target is the teacher's
    /// output GroupNorm'd the same way, with [`Target::Raw`] the teacher's output as it is
    /// against the layer's scaled by its calibration factors. A window layer's output is
    /// normalised like softmax's and matches the teacher's as it is. Each layer's loss reaches
    /// only that layer's φ (and mix). Returns the mean over those layers.
    pub fn loss(&self, model: &Llama, tokens: &Tensor) -> Result<Tensor> {
        let mut losses = Vec::new();
        self.walk(model, tokens, |i, cell, xn, y| {
            let (student, target) = match cell {
                Cell::Supra(a) => {
                    let out = a.heads_output(xn, 0, None, Exec::Train)?;
                    match (
                        self.target,
                        self.head_scales.get(i).and_then(Option::as_ref),
                    ) {
                        (Target::Normalized, _) => (out, group_norm(y)?),
                        (Target::Raw, Some(s)) => (out.broadcast_mul(s)?, y.clone()),
                        (Target::Raw, None) => (out, y.clone()),
                    }
                }
                Cell::Window(a) => (a.heads_output(xn, 0, None, Exec::Train)?, y.clone()),
                Cell::Softmax(_) => unreachable!("walk visits layers with a linear branch"),
            };
            losses.push((student - target)?.sqr()?.mean_all()?);
            Ok(())
        })?;
        if losses.is_empty() {
            bail!("attention transfer needs SUPRA or window layers; this model has none (run `supra convert` first)");
        }
        let n = losses.len() as f64;
        Ok((Tensor::stack(&losses, 0)?.sum_all()? / n)?)
    }

    /// For each SUPRA layer, the teacher's per-head attention output RMS (before Wo) averaged
    /// over batch and tokens; `None` for other layers (a window layer's output is at the
    /// teacher's scale already).
    pub fn head_rms(&self, model: &Llama, tokens: &Tensor) -> Result<Vec<Option<Vec<f64>>>> {
        let mut out = vec![None; model.config.num_hidden_layers];
        self.walk(model, tokens, |i, cell, _, y| {
            if !matches!(cell, Cell::Supra(_)) {
                return Ok(());
            }
            // (b, h, t, d) → per-token RMS (b, h, t) → mean over batch and tokens (h).
            let rms = y.sqr()?.mean(3)?.sqrt()?.mean(2)?.mean(0)?;
            out[i] = Some(rms.to_vec1::<f32>()?.into_iter().map(f64::from).collect());
            Ok(())
        })?;
        Ok(out)
    }
}

/// Scales each SUPRA layer's Wo, per head, by the teacher's average per-head output RMS on
/// `batches`. A SUPRA layer GroupNorms each head to unit RMS before Wo; the teacher's heads are
/// far smaller, so without this even a perfect φ would feed the residual stream outputs of the
/// wrong size (SmolLM2, 1k held-out tokens: teacher perplexity 20.5; teacher with GroupNorm'd
/// heads 1.1e7; GroupNorm'd and rescaled 44.8). Returns the factors, per layer and head.
pub fn calibrate_output_scale(
    model: &mut LoadedModel,
    batches: &[Tensor],
) -> Result<Vec<Option<Vec<f32>>>> {
    let llama = Llama::new(&model.config, &model.weights)?;
    let teacher = Teacher::new(model, &[], Target::Normalized)?;
    let mut sums: Vec<Option<Vec<f64>>> = vec![None; model.config.num_hidden_layers];
    for tokens in batches {
        for (acc, r) in sums.iter_mut().zip(teacher.head_rms(&llama, tokens)?) {
            match (acc.as_mut(), r) {
                (Some(acc), Some(r)) => acc.iter_mut().zip(r).for_each(|(a, x)| *a += x),
                (None, r) => *acc = r,
                (Some(_), None) => {}
            }
        }
    }
    let scales: Vec<Option<Vec<f32>>> = sums
        .into_iter()
        .map(|s| {
            s.map(|s| {
                s.iter()
                    .map(|x| (x / batches.len() as f64) as f32)
                    .collect()
            })
        })
        .collect();
    for (layer, s) in scales.iter().enumerate() {
        if let Some(s) = s {
            let name = format!("model.layers.{layer}.self_attn.o_proj.weight");
            let w = model.weights[&name].broadcast_mul(&head_columns(s, model.config.head_dim)?)?;
            model.weights.insert(name, w);
        }
    }
    Ok(scales)
}

/// Per-head factors spread over Wo's input columns: shape (1, heads · head_dim).
fn head_columns(scales: &[f32], head_dim: usize) -> Result<Tensor> {
    let cols: Vec<f32> = scales
        .iter()
        .flat_map(|&s| std::iter::repeat_n(s, head_dim))
        .collect();
    let n = cols.len();
    Ok(Tensor::from_vec(cols, (1, n), &Device::Cpu)?)
}
