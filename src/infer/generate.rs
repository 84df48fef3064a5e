//! Autoregressive generation: read the prompt into a [`State`] (in chunks), then one token per
//! step. The state may come from a file or the server's prompt cache.

use crate::infer::sampler::Sampler;
use crate::infer::state::State;
use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::Llama;
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use std::time::{Duration, Instant};

/// Why generation ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (end of turn or of text) came; it is not emitted.
    Stop,
    /// `max_tokens` were generated.
    #[default]
    Length,
    /// The model's context is full.
    Context,
    /// The caller's callback asked to stop (a stop string, a client that went away).
    Halted,
}

#[derive(Debug, Clone, Default)]
pub struct GenStats {
    /// Tokens of the prompt read in this call (not those already in the state).
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub finish: Finish,
    /// The last token sampled and not read into the state: the last emitted one, or the stop
    /// token. Read it to carry the state on past the emitted text.
    pub unread: Option<u32>,
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

/// The choice of each next token, the same for `supra generate` and for each request in
/// `supra serve`'s batch: sample from the last logits; a stop token ends the generation unseen;
/// after an emitted token, `max_tokens` or the end of the model's context ends it.
pub struct Picker {
    pub sampler: Sampler,
    pub stop_ids: Vec<u32>,
    pub max_tokens: usize,
    /// Tokens emitted so far.
    pub generated: usize,
}

/// What [`Picker::pick`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// `max_tokens` were already emitted: nothing was sampled.
    Limit,
    /// A stop token, not emitted.
    Stop(u32),
    /// A token to emit.
    Token(u32),
}

impl Picker {
    pub fn new(sampler: Sampler, stop_ids: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            sampler,
            stop_ids,
            max_tokens,
            generated: 0,
        }
    }

    /// The next token after `logits` (1, vocab).
    pub fn pick(&mut self, logits: &Tensor) -> Result<Pick> {
        if self.generated >= self.max_tokens {
            return Ok(Pick::Limit);
        }
        let next = self.sampler.sample(&logits.squeeze(0)?.to_vec1::<f32>()?);
        if self.stop_ids.contains(&next) {
            return Ok(Pick::Stop(next));
        }
        self.generated += 1;
        Ok(Pick::Token(next))
    }

    /// Once a token is emitted with `read` tokens in the state: why the generation ends
    /// there rather than reading it, if it does.
    pub fn ends_after(&self, read: usize, ctx: usize) -> Option<Finish> {
        if read + 1 >= ctx {
            Some(Finish::Context)
        } else if self.generated >= self.max_tokens {
            Some(Finish::Length)
        } else {
            None
        }
    }
}

pub struct Generation<'a> {
    pub model: &'a Llama,
    pub picker: Picker,
}

impl<'a> Generation<'a> {
    pub fn new(model: &'a Llama, sampler: Sampler, stop_ids: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            model,
            picker: Picker::new(sampler, stop_ids, max_tokens),
        }
    }

    /// Generates after `prompt` from an empty state, calling `on_token` with each new token id
    /// as soon as it exists. Stops at a stop id (not emitted), after `max_tokens`, or at the
    /// context length.
    pub fn run(
        &mut self,
        prompt: &[u32],
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<GenStats> {
        if prompt.is_empty() {
            bail!("the prompt is empty after tokenization");
        }
        let mut state = State::new(self.model);
        self.resume(&mut state, prompt, |id| on_token(id).map(|()| true))
    }

    /// Reads `prompt` after what `state` holds, then generates up to `max_tokens`; `on_token`
    /// returns false to stop. With an empty `prompt` the state's own logits give the first
    /// token. Leaves in `state` everything read: the prompt and every generated token but the
    /// last ([`GenStats::unread`]).
    pub fn resume(
        &mut self,
        state: &mut State,
        prompt: &[u32],
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<GenStats> {
        let ctx = self.model.context_limit().unwrap_or(usize::MAX);
        let total = state.cache.pos + prompt.len();
        if total >= ctx {
            bail!("the prompt needs {total} tokens of context; the model's context is {ctx}");
        }
        let mut stats = GenStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let t0 = Instant::now();
        state.feed(self.model, prompt)?;
        if state.logits.is_none() {
            bail!("nothing to continue from: the prompt and state are empty");
        }
        stats.prefill_time = t0.elapsed();

        let t1 = Instant::now();
        let device = self.model.device().clone();
        self.picker.generated = 0;
        while let Some(logits) = &state.logits {
            let next = match self.picker.pick(logits)? {
                Pick::Limit => break,
                Pick::Stop(id) => {
                    stats.unread = Some(id);
                    stats.finish = Finish::Stop;
                    break;
                }
                Pick::Token(id) => id,
            };
            stats.unread = Some(next);
            stats.generated_tokens += 1;
            if !on_token(next)? {
                stats.finish = Finish::Halted;
                break;
            }
            if let Some(finish) = self.picker.ends_after(state.cache.pos, ctx) {
                stats.finish = finish;
                break;
            }
            let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            state.logits = Some(self.model.forward_last(&input, &mut state.cache)?);
            state.tokens.push(next);
        }
        stats.decode_time = t1.elapsed();
        stats.state_bytes = state.cache.bytes();
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
