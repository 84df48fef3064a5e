//! AdamW over the trainable parameters, fused: gradients accumulate into one flat buffer per
//! parameter, and one pass over (param, grad, m, v) updates everything in place on both cores.
//! candle-nn's AdamW allocates several tensors per parameter per step (DESIGN.md §2). An update
//! of one backward pass reads that pass's gradients where they are, never copying them into
//! the buffer: the optimizer is memory-bound, and the copy was three of its eleven passes over
//! the parameters' size.

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;

use crate::model::params::{Param as TableEntry, ParamGroup};

const CHUNK: usize = 1 << 14;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

pub struct Param {
    pub name: String,
    pub var: Var,
    pub group: ParamGroup,
    /// From the parameter table: norm weights and biases get no weight decay.
    decay: bool,
    /// Whether the current phase trains this parameter (see [`AdamW::set_active`]).
    active: bool,
    /// Its learning rate as a multiple of the update's (see [`AdamW::set_lr_scale`]).
    lr_scale: f64,
    /// Updates this parameter has received (its bias correction).
    t: u64,
    /// This update's gradient so far.
    pending: Pending,
    /// The sum of several passes' gradients ([`Pending::Summed`]); zeros otherwise.
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// What a parameter's gradient for the coming update is.
enum Pending {
    /// No pass has reached the parameter yet: zeros.
    None,
    /// One backward pass's gradient times a scale, read where the pass left it. Its values are
    /// 0 + scale·g, as the first addition into the zeroed buffer rounded them (the sign of a
    /// zero included).
    Pass(Tensor, f32),
    /// Several passes', summed into the buffer.
    Summed,
}

/// buf += scale·g.
fn add_scaled(buf: &mut [f32], g: &[f32], scale: f32) {
    buf.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .for_each(|(acc, g)| {
            for (a, x) in acc.iter_mut().zip(g) {
                *a += scale * x;
            }
        })
}

/// `f` on an update's gradient: values and, for a pass's own tensor, the scale to apply as
/// 0 + scale·g (None: the values are the gradient). `buf` is the parameter's buffer.
fn with_grad<R>(
    pending: &Pending,
    buf: &[f32],
    f: impl FnOnce(&[f32], Option<f32>) -> R,
) -> Result<R> {
    match pending {
        Pending::Pass(t, scale) => with_slice(t, |g| f(g, Some(*scale))),
        Pending::None | Pending::Summed => Ok(f(buf, None)),
    }
}

fn square(x: f32) -> f64 {
    (x as f64) * (x as f64)
}

impl Param {
    /// Back to no gradient.
    fn clear(&mut self) {
        if let Pending::Summed = self.pending {
            self.grad.par_iter_mut().for_each(|x| *x = 0.0);
        }
        self.pending = Pending::None;
    }
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub cfg: AdamWConfig,
}

/// A contiguous f32 CPU tensor's values.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        bail!("expected a contiguous f32 CPU tensor");
    };
    Ok(f(&data[a..b]))
}

impl AdamW {
    /// The parameters with their entries of the parameter table.
    pub fn new(params: Vec<(TableEntry, Var)>, cfg: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(entry, var)| {
                let n = var.elem_count();
                Param {
                    name: entry.name,
                    var,
                    group: entry.group,
                    decay: entry.weight_decay,
                    active: true,
                    lr_scale: 1.0,
                    t: 0,
                    pending: Pending::None,
                    grad: vec![0.0; n],
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            })
            .collect();
        Self { params, cfg }
    }

    /// Restricts gradient accumulation and updates to the parameters `train` accepts (a
    /// training phase that trains a subset); the others keep their values and moments.
    pub fn set_active(&mut self, train: impl Fn(ParamGroup) -> bool) {
        for p in &mut self.params {
            p.active = train(p.group);
        }
    }

    /// Each parameter's learning rate (and so its weight decay) as `scale(name)` times the
    /// update's: a parameter that a schedule made for the others would barely move.
    pub fn set_lr_scale(&mut self, scale: impl Fn(&str) -> f64) {
        for p in &mut self.params {
            p.lr_scale = scale(&p.name);
        }
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.grad.len()).sum()
    }

    /// Adds this backward pass's gradients, times `scale`, to the accumulators. A parameter the
    /// loss does not reach simply gets nothing.
    pub fn accumulate(&mut self, grads: &GradStore, scale: f32) -> Result<()> {
        for p in self.params.iter_mut().filter(|p| p.active) {
            let Some(g) = grads.get(&p.var) else {
                continue;
            };
            match std::mem::replace(&mut p.pending, Pending::Summed) {
                Pending::None => {
                    with_slice(g, |_| ())?;
                    p.pending = Pending::Pass(g.clone(), scale);
                }
                Pending::Pass(first, s) => {
                    with_slice(&first, |first| add_scaled(&mut p.grad, first, s))?;
                    with_slice(g, |g| add_scaled(&mut p.grad, g, scale))?;
                }
                Pending::Summed => with_slice(g, |g| add_scaled(&mut p.grad, g, scale))?,
            }
        }
        Ok(())
    }

    /// L2 norm of the accumulated gradient over all parameters (fixed summation order, so the
    /// same gradients give the same bits).
    pub fn grad_norm(&self) -> Result<f64> {
        let mut total = Vec::with_capacity(self.params.len());
        for p in &self.params {
            total.push(with_grad(&p.pending, &p.grad, |g, first| {
                let partial: Vec<f64> = g
                    .par_chunks(CHUNK)
                    .map(|c| match first {
                        Some(s) => c.iter().map(|&x| square(0.0 + s * x)).sum(),
                        None => c.iter().map(|&x| square(x)).sum(),
                    })
                    .collect();
                partial.iter().sum::<f64>()
            })?);
        }
        Ok(total.iter().sum::<f64>().sqrt())
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.clear();
        }
    }

    /// One update with learning rate `lr`, the accumulated gradient scaled by `grad_scale`
    /// (for clipping); then clears the accumulators.
    pub fn step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        let c = self.cfg;
        for p in self.params.iter_mut().filter(|p| p.active) {
            let lr = lr * p.lr_scale;
            p.t += 1;
            let bc1 = 1.0 - c.beta1.powi(p.t as i32);
            let bc2 = 1.0 - c.beta2.powi(p.t as i32);
            let decay = match p.decay {
                true => (lr * c.weight_decay) as f32,
                false => 0.0,
            };
            let (var, m, v) = (&p.var, &mut p.m, &mut p.v);
            with_grad(&p.pending, &p.grad, |grad, first| {
                var.as_tensor().inplace_op1(&Update {
                    grad,
                    first,
                    m: std::sync::Mutex::new(m),
                    v: std::sync::Mutex::new(v),
                    lr: lr as f32,
                    decay,
                    b1: c.beta1 as f32,
                    b2: c.beta2 as f32,
                    eps: c.eps as f32,
                    bc1: bc1 as f32,
                    bc2: bc2 as f32,
                    scale: grad_scale as f32,
                })
            })??;
        }
        self.zero_grad();
        Ok(())
    }

    /// Optimizer state as named tensors (`m.NAME`, `v.NAME`, `t.NAME`) for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            let shape = p.var.shape().clone();
            let dev = p.var.device();
            out.insert(
                format!("m.{}", p.name),
                Tensor::from_slice(&p.m, shape.clone(), dev)?,
            );
            out.insert(
                format!("v.{}", p.name),
                Tensor::from_slice(&p.v, shape, dev)?,
            );
            out.insert(format!("t.{}", p.name), Tensor::new(&[p.t as f64], dev)?);
        }
        Ok(out)
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            let key = format!("t.{}", p.name);
            let Some(t) = state.get(&key) else {
                bail!("optimizer state has no '{key}'");
            };
            p.t = t.flatten_all()?.to_vec1::<f64>()?[0] as u64;
            for (key, buf) in [
                (format!("m.{}", p.name), &mut p.m),
                (format!("v.{}", p.name), &mut p.v),
            ] {
                let Some(s) = state.get(&key) else {
                    bail!("optimizer state has no '{key}' (was it saved by a different recipe?)");
                };
                let vals: Vec<f32> = s.flatten_all()?.to_vec1()?;
                if vals.len() != buf.len() {
                    bail!(
                        "optimizer state '{key}' has {} values, expected {}",
                        vals.len(),
                        buf.len()
                    );
                }
                buf.copy_from_slice(&vals);
            }
        }
        Ok(())
    }
}

/// The in-place AdamW update of one parameter (PyTorch's AdamW, decoupled weight decay).
struct Update<'a> {
    grad: &'a [f32],
    /// A pass's own gradient: its values are 0 + first·grad (see [`Pending::Pass`]).
    first: Option<f32>,
    m: std::sync::Mutex<&'a mut Vec<f32>>,
    v: std::sync::Mutex<&'a mut Vec<f32>>,
    lr: f32,
    decay: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    scale: f32,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("adamw: parameters must be f32");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("adamw: parameters must be contiguous");
        };
        let mut m = self.m.lock().expect("not poisoned");
        let mut v = self.v.lock().expect("not poisoned");
        let s = self;
        data[a..b]
            .par_chunks_mut(CHUNK)
            .zip(s.grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| match s.first {
                Some(first) => s.apply(p, m, v, |i| 0.0 + first * g[i]),
                None => s.apply(p, m, v, |i| g[i]),
            });
        Ok(())
    }
}

impl Update<'_> {
    /// The update of one chunk, `grad(i)` its i-th gradient value.
    #[inline(always)]
    fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], grad: impl Fn(usize) -> f32) {
        let s = self;
        for i in 0..p.len() {
            let g = grad(i) * s.scale;
            p[i] -= s.decay * p[i];
            m[i] = s.b1 * m[i] + (1.0 - s.b1) * g;
            v[i] = s.b2 * v[i] + (1.0 - s.b2) * g * g;
            let m_hat = m[i] / s.bc1;
            let v_hat = v[i] / s.bc2;
            p[i] -= s.lr * m_hat / (v_hat.sqrt() + s.eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused update equals PyTorch's AdamW written out, over a few steps.
    #[test]
    fn matches_reference_adamw() {
        let dev = Device::Cpu;
        let init = vec![0.5f32, -1.0, 2.0, 0.0, 3.0];
        let w = Var::from_vec(init.clone(), 5, &dev).unwrap();
        let b = Var::from_vec(vec![0.1f32, 0.2], 2, &dev).unwrap();
        let cfg = AdamWConfig::default();
        let entry = |name: &str, weight_decay| TableEntry {
            name: name.into(),
            shape: vec![5],
            group: ParamGroup::Attention,
            weight_decay,
            lora_target: false,
        };
        let mut opt = AdamW::new(
            vec![
                (entry("w", true), w.clone()),
                (entry("l.bias", false), b.clone()),
            ],
            cfg,
        );
        let (mut p, mut m, mut v) = (
            init.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            vec![0f64; 5],
            vec![0f64; 5],
        );
        let lr = 0.01;
        for t in 1..=4 {
            // loss = Σ w³ + Σ b: grad 3w², 1
            let loss = (w.as_tensor().powf(3.0).unwrap().sum_all().unwrap()
                + b.as_tensor().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            opt.accumulate(&grads, 1.0).unwrap();
            opt.step(lr, 1.0).unwrap();
            for i in 0..5 {
                let g = 3.0 * p[i] * p[i];
                p[i] -= lr * 0.1 * p[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.95 * v[i] + 0.05 * g * g;
                let (mh, vh) = (
                    m[i] / (1.0 - 0.9f64.powi(t)),
                    v[i] / (1.0 - 0.95f64.powi(t)),
                );
                p[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        for (g, want) in got.iter().zip(&p) {
            assert!((*g as f64 - want).abs() < 1e-5, "{got:?} vs {p:?}");
        }
        // No weight decay on biases: with a constant gradient of 1, Adam moves it by lr per step.
        let bias: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        assert!((bias[0] - (0.1 - 4.0 * 0.01)).abs() < 1e-5, "{bias:?}");
        assert_eq!(opt.grad_norm().unwrap(), 0.0);

        // Its own learning rate: with the bias's rate 5 times the update's, the same constant
        // gradient moves it 5 times as far; the other parameter keeps the update's rate.
        opt.set_lr_scale(|name| if name == "l.bias" { 5.0 } else { 1.0 });
        let before: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        let loss =
            (w.as_tensor().sum_all().unwrap() * 0.0 + b.as_tensor().sum_all().unwrap()).unwrap();
        opt.accumulate(&loss.backward().unwrap(), 1.0).unwrap();
        opt.step(lr, 1.0).unwrap();
        let moved: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        assert!(
            (moved[0] - (bias[0] - 5.0 * 0.01)).abs() < 1e-5,
            "{moved:?}"
        );
        let after: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        for (a, b) in after.iter().zip(&before) {
            // Zero gradient: the moment's remainder and decay at the update's own rate.
            assert!((a - b).abs() < 0.02, "{after:?} vs {before:?}");
        }
    }

    /// An update of one pass (its gradient read in place) and one of the same gradient in
    /// passes summed in the buffer (halves and quarters, so the sums are exact) give the same
    /// bits: norms, parameters and moments, over a few updates.
    #[test]
    fn one_pass_read_in_place_equals_passes_summed() {
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..40_000)
            .map(|i| ((i * 7919) % 1000) as f32 / 300.0 - 1.5)
            .collect();
        let entry = TableEntry {
            name: "w".into(),
            shape: vec![init.len()],
            group: ParamGroup::Attention,
            weight_decay: true,
            lora_target: false,
        };
        let run = |scales: &[f32]| {
            let w = Var::from_vec(init.clone(), init.len(), &dev).unwrap();
            let mut opt = AdamW::new(vec![(entry.clone(), w.clone())], AdamWConfig::default());
            let mut norms = Vec::new();
            for _ in 0..3 {
                for &scale in scales {
                    let loss = w.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
                    opt.accumulate(&loss.backward().unwrap(), scale).unwrap();
                }
                let norm = opt.grad_norm().unwrap();
                norms.push(norm.to_bits());
                opt.step(0.01, 0.5).unwrap();
            }
            let w: Vec<u32> = w
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            let m: Vec<u32> = opt.params[0].m.iter().map(|x| x.to_bits()).collect();
            (norms, w, m)
        };
        let one = run(&[1.0]);
        assert_eq!(one, run(&[0.5, 0.5]));
        assert_eq!(one, run(&[0.25, 0.25, 0.5]));
    }
}
