//! Autoregressive generation with a KV cache: one prefill pass over the prompt, then one token
//! per step.

use crate::infer::sampler::Sampler;
use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::{Cache, Llama};
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub stopped_at_eos: bool,
    /// Bytes of generation state at the end: KV caches grow with the context, SUPRA states not.
    pub state_bytes: usize,
}

impl GenStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Tokens per second over the decode steps (the first generated token comes from prefill).
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

pub struct Generation<'a> {
    pub model: &'a Llama,
    pub sampler: Sampler,
    pub stop_ids: Vec<u32>,
    pub max_tokens: usize,
}

impl Generation<'_> {
    /// Generates after `prompt`, calling `on_token` with each new token id as soon as it exists.
    /// Stops at a stop id (not emitted), after `max_tokens`, or at the context length.
    pub fn run(
        &mut self,
        prompt: &[u32],
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<GenStats> {
        if prompt.is_empty() {
            bail!("the prompt is empty after tokenization");
        }
        let ctx = self.model.context_limit().unwrap_or(usize::MAX);
        if prompt.len() >= ctx {
            bail!(
                "the prompt has {} tokens; the model's context is {ctx}",
                prompt.len()
            );
        }
        let device = self.model.device().clone();
        let mut cache: Cache = self.model.new_cache();
        let mut stats = GenStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };

        let t0 = Instant::now();
        let input = Tensor::new(prompt, &device)?.unsqueeze(0)?;
        let mut logits = self.model.forward_last(&input, &mut cache)?;
        stats.prefill_time = t0.elapsed();

        let t1 = Instant::now();
        for _ in 0..self.max_tokens {
            let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
            let next = self.sampler.sample(&row);
            if self.stop_ids.contains(&next) {
                stats.stopped_at_eos = true;
                break;
            }
            stats.generated_tokens += 1;
            on_token(next)?;
            if cache.pos + 1 >= ctx || stats.generated_tokens == self.max_tokens {
                break;
            }
            let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            logits = self.model.forward_last(&input, &mut cache)?;
        }
        stats.decode_time = t1.elapsed();
        stats.state_bytes = cache.bytes();
        Ok(stats)
    }
}

/// Turns token ids into text pieces as they arrive, holding back bytes of an unfinished UTF-8
/// character (byte-level BPE splits multi-byte characters across tokens).
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return Ok(None);
        }
        let piece = text
            .get(self.emitted..)
            .ok_or_else(|| anyhow!("decoded text changed under the stream"))?
            .to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }

    /// Whatever is left, including a trailing replacement character.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        let rest = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(rest)
    }
}
