//! The log-likelihood engine: requests (context, continuation) → (Σ log p(continuation |
//! context), whether greedy decoding would produce the continuation), lm-evaluation-harness's
//! `loglikelihood` request type, which every multiple-choice task reduces to.
//!
//! Consecutive requests with the same context (the choices of one question) read the context
//! once: its generation state — the constant-size RNN state of SUPRA layers, the KV cache of
//! softmax layers — is cloned for each continuation. Likewise the part of a context that the
//! next context starts with (MMLU's few-shot header) is read once and its state kept.
//! `share_prefix: false` runs each request as one whole sequence instead: the reference the
//! tests compare against.

use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::{Cache, Llama};
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
    /// Longest window of rolling (perplexity) scoring, in tokens.
    pub max_length: usize,
}

/// Contexts sharing fewer tokens than this are read whole: a saved state costs a clone.
pub const MIN_SHARED_PREFIX: usize = 32;

/// The generation state after the first `tokens.len()` tokens of some context.
struct Prefix {
    tokens: Vec<u32>,
    state: Cache,
}

impl Engine<'_> {
    /// Answers `requests` in order, calling `progress` with the number answered so far.
    pub fn run(
        &self,
        requests: &[Request],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<LogLikelihood>> {
        let encoded = requests
            .iter()
            .map(|r| encode_pair(self.tokenizer, &r.context, &r.continuation))
            .collect::<Result<Vec<_>>>()?;
        if !self.share_prefix {
            let mut out = Vec::with_capacity(requests.len());
            for (i, (ctx, cont)) in encoded.iter().enumerate() {
                out.push(self.whole(ctx, cont)?);
                progress(i + 1);
            }
            return Ok(out);
        }
        // Groups of consecutive requests with the same context (one question's choices).
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if requests[g.start].context == r.context => g.end = i + 1,
                _ => groups.push(i..i + 1),
            }
        }
        let mut out = Vec::with_capacity(requests.len());
        let mut saved: Option<Prefix> = None;
        for (k, g) in groups.iter().enumerate() {
            let ctx = &encoded[g.start].0;
            // What this context shares with the next one (a few-shot header): worth keeping.
            let next = groups.get(k + 1).map(|n| encoded[n.start].0.as_slice());
            let shared = next.map_or(0, |n| common_prefix(ctx, n)).min(ctx.len() - 1);
            let conts: Vec<&[u32]> = encoded[g.clone()]
                .iter()
                .map(|(_, c)| c.as_slice())
                .collect();
            out.extend(self.group(ctx, &conts, shared, &mut saved)?);
            progress(g.end);
        }
        Ok(out)
    }

    /// Σ log p of every token of `text`, lm-eval's `loglikelihood_rolling`: the first window
    /// starts after an end-of-text token, each later one after the last token of the one
    /// before, and each predicts up to `max_length` new tokens. Returns (Σ log p, tokens).
    pub fn rolling(&self, text: &str) -> Result<(f64, usize)> {
        let ids = self.tokenizer.encode(text)?;
        let Some(eot) = self.tokenizer.eos_id else {
            bail!("rolling log-likelihood needs an end-of-text token; the tokenizer has none");
        };
        let window = self.max_length.max(1);
        let mut sum = 0.0;
        for start in (0..ids.len()).step_by(window) {
            let end = (start + window).min(ids.len());
            let prev = if start == 0 { eot } else { ids[start - 1] };
            let seq: Vec<u32> = std::iter::once(prev)
                .chain(ids[start..end].iter().copied())
                .collect();
            let input = Tensor::new(&seq[..seq.len() - 1], self.model.device())?.unsqueeze(0)?;
            let hidden = self.model.forward_hidden(&input, None)?.squeeze(0)?;
            let lps = self.model.next_token_logprobs(&hidden, &seq)?;
            sum += lps.iter().map(|&x| x as f64).sum::<f64>();
        }
        Ok((sum, ids.len()))
    }

    /// One request as a single sequence: the reference.
    fn whole(&self, ctx: &[u32], cont: &[u32]) -> Result<LogLikelihood> {
        let ids: Vec<u32> = ctx.iter().chain(cont).copied().collect();
        let input = Tensor::new(&ids[..ids.len() - 1], self.model.device())?.unsqueeze(0)?;
        let hidden = self.model.forward_hidden(&input, None)?.squeeze(0)?;
        score(
            self.model,
            &hidden.narrow(0, ctx.len() - 1, cont.len())?,
            cont,
        )
    }

    /// Continuations `conts` of one context `ctx`, of which the first `shared` tokens start the
    /// next context too. Starts from `saved` when it is a prefix of `ctx`, and leaves the state
    /// after `ctx[..shared]` there for the next context.
    fn group(
        &self,
        ctx: &[u32],
        conts: &[&[u32]],
        shared: usize,
        saved: &mut Option<Prefix>,
    ) -> Result<Vec<LogLikelihood>> {
        let dev = self.model.device();
        let (mut state, mut done) = match saved.as_ref() {
            Some(p) if ctx.starts_with(&p.tokens) => (p.state.clone(), p.tokens.len()),
            _ => (self.model.new_cache(), 0),
        };
        if shared >= MIN_SHARED_PREFIX && shared > done {
            let input = Tensor::new(&ctx[done..shared], dev)?.unsqueeze(0)?;
            self.model.forward_hidden(&input, Some(&mut state))?;
            done = shared;
            *saved = Some(Prefix {
                tokens: ctx[..shared].to_vec(),
                state: state.clone(),
            });
        }
        let input = Tensor::new(&ctx[done..], dev)?.unsqueeze(0)?;
        let h = self
            .model
            .forward_hidden(&input, Some(&mut state))?
            .squeeze(0)?;
        let last = h.narrow(0, h.dim(0)? - 1, 1)?;
        conts
            .iter()
            .map(|cont| {
                // Clones run one after another: a softmax layer's KV-cache clones may write
                // past their common positions into storage they share, but each only ever
                // reads the positions before its own and those it wrote itself.
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

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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
