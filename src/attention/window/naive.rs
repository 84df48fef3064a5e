//! The definition, literally, in f64: the reference every other form is tested against.
//!
//! For token n of query head h (reading key/value head h / (H / H_kv), written out here):
//!
//! ```text
//! exact keys  E(n) = { m ≤ n : m < s  or  m > n − w }          logits l_m = q_n·k_m/√d
//!                                              (a sink's, m < s: l_m = q̃_n·k_m/√d)
//! linear keys L(n) = { s ≤ m ≤ n − w }                        c_n = max_{m∈E(n)} l_m
//! A = Σ_{E} exp(l_m − c_n) v_m        a = Σ_{E} exp(l_m − c_n)
//! B = Σ_{L} γ^(n−w−m) (φq_n·φk_m/√d') v_m     b = Σ_{L} γ^(n−w−m) φq_n·φk_m/√d'
//! shared: y = (A + α B) / (a + α b + ε)
//! gated:  y = (1 − g) A/a + g GroupNorm(B)      (A/a = 0 when E(n) is empty)
//! value:  y = (1 − g) A/a + g B
//! ```
//!
//! With the delta rule (gated or value mix), B is the delta state's answer to φq_n (the value
//! mix: to the unit φq_n/‖φq_n‖) after it took in the keys of L(n) in order, key m at step
//! m + w ([`crate::attention::delta::naive`]).

use super::{Span, EPS};
use crate::attention::delta::{self, make_unit};
use crate::attention::supra::naive::group_norm;
use crate::attention::supra::{group_norm::EPS as GN_EPS, Dims};
use crate::config::{LinearRule, Mix};

/// One call's inputs: q (B, H, T, d), k and v (B, H_kv, T, d) RoPE'd as the teacher's;
/// q̃ (B, H, T, d), the queries the sinks' logits read (q RoPE'd at
/// [`Span::sink_query_position`]; q itself with absolute sink positions); φq (B, H, T, d'),
/// φk (B, H_kv, T, d'); per head γ and the mix weight (α or g).
pub struct Inputs<'a> {
    pub q: &'a [f64],
    pub qs: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub fq: &'a [f64],
    pub fk: &'a [f64],
    pub gammas: &'a [f64],
    pub weights: &'a [f64],
    /// The delta rule's parameters (H, d' + 1); `None`: the additive rule.
    pub delta: Option<&'a [f64]>,
}

/// Returns y (B, H, T, d). `d.feature_dim` is d', `d.value_dim` the head dim d.
pub fn naive(x: &Inputs, span: Span, mix: Mix, d: Dims) -> Vec<f64> {
    let (t, f, dv) = (d.len, d.feature_dim, d.value_dim);
    let mut out = vec![0.0; d.batch * d.heads * t * dv];
    let rule = LinearRule::of(x.delta);
    assert!(mix.refuses(rule).is_none(), "{mix:?} mix, {rule:?} rule");
    // The delta rule's B for every token at once: step n takes in key n − w when it is past
    // the sinks (no key otherwise).
    let delta = x.delta.map(|params| {
        let shift = |x: &[f64], c: usize| -> Vec<f64> {
            let mut s = vec![0.0; x.len()];
            for bk in 0..d.batch * d.kv_heads {
                for n in span.sinks + span.window..t {
                    let m = n - span.window;
                    s[(bk * t + n) * c..][..c].copy_from_slice(&x[(bk * t + m) * c..][..c]);
                }
            }
            s
        };
        let (fk, v) = (shift(x.fk, f), shift(x.v, dv));
        let mut fq = x.fq.to_vec();
        if mix == Mix::Value {
            make_unit(&mut fq, f);
        }
        delta::naive::naive(&fq, &fk, &v, params, x.gammas, d)
    });
    for b in 0..d.batch {
        for h in 0..d.heads {
            let bh = b * d.heads + h;
            let kv = b * d.kv_heads + h / (d.heads / d.kv_heads);
            let row = |x: &'_ [f64], head: usize, i: usize, n: usize| -> Vec<f64> {
                x[(head * t + i) * n..][..n].to_vec()
            };
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            for n in 0..t {
                let (q, qs) = (row(x.q, bh, n, dv), row(x.qs, bh, n, dv));
                let exact: Vec<usize> = (0..=n).filter(|&m| span.exact(n, m)).collect();
                let logits: Vec<f64> = exact
                    .iter()
                    .map(|&m| {
                        let q = if m < span.sinks { &qs } else { &q };
                        dot(q, &row(x.k, kv, m, dv)) / (dv as f64).sqrt()
                    })
                    .collect();
                let c = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let (mut big_a, mut a) = (vec![0.0; dv], 0.0);
                for (&m, l) in exact.iter().zip(&logits) {
                    let e = (l - c).exp();
                    a += e;
                    for (o, vv) in big_a.iter_mut().zip(row(x.v, kv, m, dv)) {
                        *o += e * vv;
                    }
                }
                let fq = row(x.fq, bh, n, f);
                let (mut big_b, mut lin_b) = (vec![0.0; dv], 0.0);
                if let Some(delta) = &delta {
                    big_b.copy_from_slice(&delta[(bh * t + n) * dv..][..dv]);
                }
                for m in (0..=n).filter(|&m| delta.is_none() && span.linear(n, m)) {
                    let w = x.gammas[h].powi((n - span.window - m) as i32)
                        * dot(&fq, &row(x.fk, kv, m, f))
                        / (f as f64).sqrt();
                    lin_b += w;
                    for (o, vv) in big_b.iter_mut().zip(row(x.v, kv, m, dv)) {
                        *o += w * vv;
                    }
                }
                let wgt = x.weights[h];
                let y = &mut out[(bh * t + n) * dv..][..dv];
                match mix {
                    Mix::Shared => {
                        let den = a + wgt * lin_b + EPS;
                        for ((y, p), q) in y.iter_mut().zip(&big_a).zip(&big_b) {
                            *y = (p + wgt * q) / den;
                        }
                    }
                    Mix::Gated | Mix::Value => {
                        let norm = match mix {
                            Mix::Value => big_b,
                            _ => group_norm(&big_b, dv, GN_EPS),
                        };
                        for ((y, p), q) in y.iter_mut().zip(&big_a).zip(&norm) {
                            let win = if a > 0.0 { p / a } else { 0.0 };
                            *y = (1.0 - wgt) * win + wgt * q;
                        }
                    }
                }
            }
        }
    }
    out
}
