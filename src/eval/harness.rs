//! The log-likelihood engine: requests (context, continuation) → (Σ log p(continuation |
//! context), whether greedy decoding would produce the continuation), lm-evaluation-harness's
//! `loglikelihood` request type, which every multiple-choice task reduces to.
//!
//! Consecutive requests with the same context (the choices of one question) read the context
//! once: its generation state — the constant-size RNN state of SUPRA layers, the KV cache of
//! softmax layers — is cloned for each continuation. `share_prefix: false` runs each request as
//! one whole sequence instead: the reference the tests compare against.

use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::Llama;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLikelihood {
    /// Σ log p over the continuation's tokens.
    pub logprob: f64,
    /// Every continuation token is the argmax of its distribution.
    pub greedy: bool,
    pub tokens: usize,
}

/// lm-evaluation-harness's `_encode_pair`: trailing whitespace of the context moves to the
/// continuation, the pair is encoded whole, and the continuation is what follows the context's
/// own tokens. An empty context is the end-of-text token alone.
pub fn encode_pair(
    tokenizer: &TextTokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let (context, continuation) = (
        trimmed,
        format!("{}{continuation}", &context[trimmed.len()..]),
    );
    let whole = tokenizer.encode(&format!("{context}{continuation}"))?;
    let context_ids = if context.is_empty() {
        let Some(eos) = tokenizer.eos_id else {
            bail!("an empty context needs an end-of-text token; the tokenizer has none");
        };
        vec![eos]
    } else {
        tokenizer.encode(context)?
    };
    let start = if context.is_empty() {
        0
    } else {
        context_ids.len().min(whole.len())
    };
    let continuation_ids = whole[start..].to_vec();
    if continuation_ids.is_empty() {
        bail!("continuation {continuation:?} encodes to no tokens after context {context:?}");
    }
    Ok((context_ids, continuation_ids))
}

pub struct Engine<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a TextTokenizer,
    /// Read a context shared by consecutive requests once (see the module docs).
    pub share_prefix: bool,
}

impl Engine<'_> {
    /// Answers `requests` in order, calling `progress` with the number answered so far.
    pub fn run(
        &self,
        requests: &[Request],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<LogLikelihood>> {
        let mut out = Vec::with_capacity(requests.len());
        let mut i = 0;
        while i < requests.len() {
            let n = if self.share_prefix {
                requests[i..]
                    .iter()
                    .take_while(|r| r.context == requests[i].context)
                    .count()
            } else {
                1
            };
            out.extend(self.group(&requests[i..i + n])?);
            i += n;
            progress(i);
        }
        Ok(out)
    }

    /// Requests that share one context.
    fn group(&self, group: &[Request]) -> Result<Vec<LogLikelihood>> {
        let pairs = group
            .iter()
            .map(|r| encode_pair(self.tokenizer, &r.context, &r.continuation))
            .collect::<Result<Vec<_>>>()?;
        let dev = self.model.device();
        if !self.share_prefix {
            return pairs
                .iter()
                .map(|(ctx, cont)| {
                    let ids: Vec<u32> = ctx.iter().chain(cont).copied().collect();
                    let input = Tensor::new(&ids[..ids.len() - 1], dev)?.unsqueeze(0)?;
                    let hidden = self.model.forward_hidden(&input, None)?.squeeze(0)?;
                    let scored = hidden.narrow(0, ctx.len() - 1, cont.len())?;
                    score(self.model, &scored, cont)
                })
                .collect();
        }
        // Each request's context tokens are the same (they come from the same string).
        let ctx = &pairs[0].0;
        let mut state = self.model.new_cache();
        let input = Tensor::new(ctx.as_slice(), dev)?.unsqueeze(0)?;
        let last = self
            .model
            .forward_hidden(&input, Some(&mut state))?
            .squeeze(0)?
            .narrow(0, ctx.len() - 1, 1)?;
        pairs
            .iter()
            .map(|(_, cont)| {
                // Continuations run one after another: each clone of a softmax layer's KV
                // cache may write past the context into storage the clones share, but only
                // ever reads the context and its own positions.
                let hidden = if cont.len() > 1 {
                    let mut s = state.clone();
                    let input = Tensor::new(&cont[..cont.len() - 1], dev)?.unsqueeze(0)?;
                    let h = self
                        .model
                        .forward_hidden(&input, Some(&mut s))?
                        .squeeze(0)?;
                    Tensor::cat(&[&last, &h], 0)?
                } else {
                    last.clone()
                };
                score(self.model, &hidden, cont)
            })
            .collect()
    }
}

/// Log-probability and greedy match of `targets` from the hidden states that predict them.
fn score(model: &Llama, hidden: &Tensor, targets: &[u32]) -> Result<LogLikelihood> {
    let logits = model.logits(hidden)?;
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let t = Tensor::new(targets, hidden.device())?;
    let picked = lsm
        .gather(&t.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .to_vec1::<f32>()?;
    let best = lsm.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(LogLikelihood {
        logprob: picked.iter().map(|&x| x as f64).sum(),
        greedy: best == targets,
        tokens: targets.len(),
    })
}
