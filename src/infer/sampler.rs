//! Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus).

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::attention::softmax::exp_shifted;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "--temperature must be a finite number ≥ 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Every token's weight, kept from call to call: a fresh buffer of the vocabulary's size a
    /// token was an allocation and its page faults each time.
    weights: Vec<f32>,
    /// The weights' sums over blocks of [`BLOCK`] tokens: the draw walks these first.
    block_sums: Vec<f64>,
}

/// Tokens a block: the draw walks a 49,152-token vocabulary's 192 block sums, then at most one
/// block, where one token at a time cost more than the whole exp pass.
const BLOCK: usize = 256;

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            weights: Vec::new(),
            block_sums: Vec::new(),
        }
    }

    /// A token drawn with probability ∝ exp((logit − max) / temperature), among the top-k
    /// and top-p candidates where those filters are set; the largest logit when greedy.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        self.weigh(logits);
        let pick = if self.params.top_k == 0 && self.params.top_p >= 1.0 {
            self.draw_unfiltered()
        } else {
            self.draw_filtered(logits)
        };
        pick.unwrap_or(logits.len().saturating_sub(1)) as u32
    }

    /// weights ← exp((logits − max) / temperature) in f32, in vector lanes (the f64 libm exp
    /// a token took 160 µs a token, most of a batched server's sampling), and their block sums.
    fn weigh(&mut self, logits: &[f32]) {
        // Clamped so that a tiny temperature gives 0 · MAX = 0 for the largest logit, not NaN.
        let inv_t = (1.0 / self.params.temperature).min(f32::MAX as f64) as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.weights.clear();
        self.weights
            .extend(logits.iter().map(|&l| (l - max) * inv_t));
        self.block_sums.clear();
        for block in self.weights.chunks_mut(BLOCK) {
            self.block_sums.push(exp_shifted(block, 0.0) as f64);
        }
    }

    /// Every token a candidate, in id order: the block holding the uniform number's share of
    /// the total, then the token inside it.
    fn draw_unfiltered(&mut self) -> Option<usize> {
        let total: f64 = self.block_sums.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (b, &sum) in self.block_sums.iter().enumerate() {
            if r < sum {
                let block = &self.weights[b * BLOCK..((b + 1) * BLOCK).min(self.weights.len())];
                let w = block.iter().map(|&w| w as f64);
                // Rounding can leave r past the block's tokens summed one by one: its last
                // token with weight then.
                return walk(r, w.enumerate())
                    .or_else(|| block.iter().rposition(|&w| w > 0.0))
                    .map(|i| b * BLOCK + i);
            }
            r -= sum;
        }
        None
    }

    /// The top-k tokens by logit (ties to the lower id), cut to the smallest prefix whose
    /// share of the mass reaches top-p, then a draw in that order. Without top-k the prefix is
    /// looked for among the 64 heaviest, then 4× more at a time: the nucleus is usually small,
    /// and sorting the whole vocabulary cost milliseconds a token.
    fn draw_filtered(&mut self, logits: &[f32]) -> Option<usize> {
        let n = self.weights.len();
        let top_p = self.params.top_p;
        let mut k = match self.params.top_k {
            0 => 64.min(n),
            k => k.min(n),
        };
        let cands = loop {
            let mut cands = largest(logits, k);
            if top_p >= 1.0 {
                break cands;
            }
            // The top-p share is of the top-k candidates' mass, or of every token's.
            let total: f64 = if self.params.top_k > 0 {
                cands.iter().map(|&i| self.weights[i as usize] as f64).sum()
            } else {
                self.block_sums.iter().sum()
            };
            let mut acc = 0.0;
            if let Some(keep) = cands.iter().position(|&i| {
                acc += self.weights[i as usize] as f64 / total;
                acc >= top_p
            }) {
                cands.truncate(keep + 1);
                break cands;
            }
            if self.params.top_k > 0 || k == n {
                break cands;
            }
            k = (4 * k).min(n);
        };
        let total: f64 = cands.iter().map(|&i| self.weights[i as usize] as f64).sum();
        let r = self.rng.random::<f64>() * total;
        let w = cands
            .iter()
            .map(|&i| (i as usize, self.weights[i as usize] as f64));
        walk(r, w).or_else(|| cands.last().map(|&i| i as usize))
    }
}

/// The first candidate whose weight holds `r` once the weights before it are taken off;
/// `None` when rounding leaves `r` past the last.
fn walk(mut r: f64, cands: impl Iterator<Item = (usize, f64)>) -> Option<usize> {
    for (id, p) in cands {
        if r < p {
            return Some(id);
        }
        r -= p;
    }
    None
}

/// The ids of the `k` largest values, largest first, ties to the lower id (one total order,
/// so the result does not depend on how it is found). Taken on the logits, not the weights:
/// the order is the weights' too, without the ties that rounding the exp in f32 makes. While
/// k is at most the number of blocks, the k-th largest block maximum bounds the k-th largest
/// value from below (those are k different values), and only the values at or above it are
/// compared.
fn largest(values: &[f32], k: usize) -> Vec<u32> {
    let order = |&a: &u32, &b: &u32| {
        let (va, vb) = (values[a as usize], values[b as usize]);
        vb.total_cmp(&va).then(a.cmp(&b))
    };
    let blocks = values.len().div_ceil(BLOCK);
    let mut ids: Vec<u32> = if k > 0 && k <= blocks {
        let mut maxima: Vec<f32> = values
            .chunks(BLOCK)
            .map(|b| b.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect();
        let (_, &mut bound, _) = maxima.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        (0..values.len() as u32)
            .filter(|&i| values[i as usize] >= bound)
            .collect()
    } else {
        (0..values.len() as u32).collect()
    };
    if k < ids.len() {
        ids.select_nth_unstable_by(k, order);
        ids.truncate(k);
    }
    ids.sort_unstable_by(order);
    ids
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_max() {
        let mut s = Sampler::new(SamplingParams::greedy(), 0);
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_restricts() {
        let logits = [0.0, 5.0, 4.9, -2.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                top_p: 1.0,
            },
            7,
        );
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // Tokens 1 and 2 hold ~99.7% of the mass: top-p 0.9 never picks 0 or 3.
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.9,
            },
            7,
        );
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }

    /// The definition in f64: weights exp((l − max) / t) from libm; the candidates in id order
    /// without filters, else by logit (ties to the lower id), cut to top-k, then to the
    /// smallest prefix whose share reaches top-p; one uniform number `u` scaled by the
    /// candidates' sum. Returns the pick and how near `u` fell to its edges, as a share of it.
    fn definition(logits: &[f32], p: SamplingParams, u: f64) -> (u32, f64) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / p.temperature).exp())
            .collect();
        let mut ids: Vec<usize> = (0..w.len()).collect();
        if p.top_k > 0 || p.top_p < 1.0 {
            ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            if p.top_k > 0 {
                ids.truncate(p.top_k);
            }
            let total: f64 = ids.iter().map(|&i| w[i]).sum();
            let mut acc = 0.0;
            let keep = ids.iter().position(|&i| {
                acc += w[i] / total;
                acc >= p.top_p
            });
            ids.truncate(keep.map_or(ids.len(), |k| k + 1));
        }
        let total: f64 = ids.iter().map(|&i| w[i]).sum();
        let (r, mut below) = (u * total, 0.0);
        for &i in &ids {
            if r < below + w[i] {
                return (i as u32, (r - below).min(below + w[i] - r) / total);
            }
            below += w[i];
        }
        (*ids.last().unwrap() as u32, 0.0)
    }

    /// Every path of the sampler against the definition, draw by draw (the same seed, so the
    /// same uniform numbers): across blocks and a last partial block, top-k below and above the
    /// number of blocks, nuclei inside the first 64 candidates, past them and past the blocks,
    /// ties. The weights are f32 where the definition's are f64: a draw whose number falls
    /// within 1e-6 of a candidate's edge may go either way and is not compared.
    #[test]
    fn every_draw_is_the_definition() {
        let wavy: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let peaked: Vec<f32> = (0..1000)
            .map(|i| (i as f32 * 0.37).sin() * 2.0 + if i % 97 == 5 { 9.0 } else { 0.0 })
            .collect();
        let flat: Vec<f32> = (0..20_000)
            .map(|i| (i as f32 * 0.013).sin() * 0.3)
            .collect();
        let ties: Vec<f32> = (0..600).map(|i| (i % 7) as f32).collect();
        let params = |temperature, top_k, top_p| SamplingParams {
            temperature,
            top_k,
            top_p,
        };
        let cases = [
            (&wavy, params(0.7, 0, 1.0)),
            (&flat, params(1.0, 0, 1.0)),
            (&wavy, params(1.0, 40, 1.0)),
            (&peaked, params(0.8, 0, 0.9)),
            (&wavy, params(1.3, 0, 0.95)),
            (&flat, params(1.0, 0, 0.95)),
            (&flat, params(0.9, 500, 0.8)),
            (&ties, params(1.0, 3, 1.0)),
            (&ties, params(1.0, 0, 0.5)),
        ];
        for (case, (logits, p)) in cases.into_iter().enumerate() {
            let mut s = Sampler::new(p, case as u64);
            let mut rng = StdRng::seed_from_u64(case as u64);
            let mut compared = 0;
            for draw in 0..300 {
                let (want, margin) = definition(logits, p, rng.random::<f64>());
                let got = s.sample(logits);
                if margin > 1e-6 {
                    assert_eq!(got, want, "case {case} ({p:?}), draw {draw}");
                    compared += 1;
                }
            }
            assert!(
                compared >= 290,
                "case {case}: only {compared} draws compared"
            );
        }
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
        };
        let run = |seed| {
            let mut s = Sampler::new(p, seed);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
