//! Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus).

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
    /// Every token's weight for the unfiltered draw, kept from call to call: a fresh buffer of
    /// the vocabulary's size a token was an allocation and its page faults each time.
    weights: Vec<f64>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            weights: Vec::new(),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weight = |l: f32| ((l as f64 - max) * inv_t).exp();
        if self.params.top_k == 0 && self.params.top_p >= 1.0 {
            // No filter: every token a candidate, in id order.
            self.weights.clear();
            self.weights.extend(logits.iter().map(|&l| weight(l)));
            let total: f64 = self.weights.iter().sum();
            return draw(
                &mut self.rng,
                total,
                self.weights.iter().copied().enumerate(),
            )
            .unwrap_or(logits.len().saturating_sub(1)) as u32;
        }
        let mut cands: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, weight(l)))
            .collect();
        // The filters need the candidates in order (sorting the vocabulary costs milliseconds
        // a token, which is why the unfiltered draw above does not).
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            cands.truncate(self.params.top_k);
        }
        if self.params.top_p < 1.0 {
            let total: f64 = cands.iter().map(|c| c.1).sum();
            let mut acc = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                acc += c.1 / total;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
        }
        let total: f64 = cands.iter().map(|c| c.1).sum();
        let picked = draw(
            &mut self.rng,
            total,
            cands.iter().map(|&(id, p)| (id as usize, p)),
        );
        picked.map_or_else(|| cands.last().map_or(0, |c| c.0), |id| id as u32)
    }
}

/// A candidate drawn with probability weight / total from (id, weight) pairs: one uniform
/// number; `None` when rounding leaves it past the last candidate.
fn draw(rng: &mut StdRng, total: f64, cands: impl Iterator<Item = (usize, f64)>) -> Option<usize> {
    let mut r = rng.random::<f64>() * total;
    for (id, p) in cands {
        if r < p {
            return Some(id);
        }
        r -= p;
    }
    None
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

    /// The unfiltered draw is the plain definition: softmax weights at temperature t in id
    /// order, one uniform number scaled by their sum.
    #[test]
    fn unfiltered_draw_is_the_definition() {
        let logits: Vec<f32> = (0..300).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let t = 0.7;
        let mut s = Sampler::new(
            SamplingParams {
                temperature: t,
                top_k: 0,
                top_p: 1.0,
            },
            11,
        );
        let mut rng = StdRng::seed_from_u64(11);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) * (1.0 / t)).exp())
            .collect();
        let total: f64 = w.iter().sum();
        for _ in 0..200 {
            let mut r = rng.random::<f64>() * total;
            let want = w
                .iter()
                .position(|&p| {
                    let hit = r < p;
                    r -= p;
                    hit
                })
                .unwrap_or(w.len() - 1);
            assert_eq!(s.sample(&logits), want as u32);
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
