//! The log-likelihood engine: requests (context, continuation) → (Σ log p(continuation |
//! context), whether greedy decoding would produce the continuation), lm-evaluation-harness's
//! `loglikelihood` request type, which every multiple-choice task reduces to.
//!
//! Requests run as rows of right-padded batches, longest first. A long context prefix that
//! consecutive requests share (MMLU's few-shot header) is read once: its generation state —
//! the constant-size RNN state of SUPRA layers, the KV cache of softmax layers — is copied
//! into every row that continues it. Rows with the same tokens (choices that are single
//! tokens) are read once. `share_prefix: false, batch_tokens: 1` runs each request alone as
//! one whole sequence: the reference the tests compare against.

use crate::io::tokenizer::TextTokenizer;
use crate::model::llama::{log_softmax_f64, Cache, Llama};
use anyhow::{bail, Result};
use candle_core::{IndexOp, Tensor, D};

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
    /// Read a context prefix shared by consecutive requests once (see the module docs).
    pub share_prefix: bool,
    /// Rows of one forward pass: right-padded to the longest, at most this many tokens in all
    /// (at least one row). 1 runs every request alone.
    pub batch_tokens: usize,
    /// Longest window of rolling (perplexity) scoring, in tokens.
    pub max_length: usize,
}

/// Contexts sharing fewer tokens than this are read whole: a saved state costs a copy per row
/// and a forward pass of its own, while whole rows batch across questions (on hellaswag,
/// 128 tokens measured best of 32, 64 and 128).
pub const MIN_SHARED_PREFIX: usize = 128;

/// Consecutive requests whose contexts all start with the same `prefix` tokens.
struct Group {
    requests: Vec<usize>,
    prefix: usize,
}

/// One row of a forward pass: the tokens after its group's prefix, and the requests it
/// answers, each with the position from which on the hidden states predict its continuation
/// (several when choices are single tokens: MMLU's letters).
struct Row {
    tokens: Vec<u32>,
    uses: Vec<(usize, usize)>,
}

impl Engine<'_> {
    /// Answers `requests`, skipping those `known` already holds (a resumed run), and calls
    /// `answered` after each forward pass with the requests it answered, by index.
    pub fn run(
        &self,
        requests: &[Request],
        known: &[Option<LogLikelihood>],
        mut answered: impl FnMut(&[(usize, LogLikelihood)]) -> Result<()>,
    ) -> Result<Vec<LogLikelihood>> {
        self.check_lengths(requests)?;
        let encoded = requests
            .iter()
            .map(|r| encode_pair(self.tokenizer, &r.context, &r.continuation))
            .collect::<Result<Vec<_>>>()?;
        let mut out: Vec<Option<LogLikelihood>> = (0..requests.len())
            .map(|i| known.get(i).copied().flatten())
            .collect();
        for g in self.groups(&encoded) {
            let mut rows: Vec<Row> = Vec::new();
            for i in g.requests.into_iter().filter(|&i| out[i].is_none()) {
                let (ctx, cont) = &encoded[i];
                let tokens: Vec<u32> = ctx[g.prefix..]
                    .iter()
                    .chain(&cont[..cont.len() - 1])
                    .copied()
                    .collect();
                let from = ctx.len() - g.prefix - 1;
                match rows.last_mut() {
                    Some(r) if r.tokens == tokens => r.uses.push((i, from)),
                    _ => rows.push(Row {
                        tokens,
                        uses: vec![(i, from)],
                    }),
                }
            }
            if rows.is_empty() {
                continue;
            }
            let state = if g.prefix > 0 {
                let ctx = &encoded[rows[0].uses[0].0].0;
                let mut state = self.model.new_cache();
                let input = Tensor::new(&ctx[..g.prefix], self.model.device())?.unsqueeze(0)?;
                self.model.forward_hidden(&input, Some(&mut state))?;
                Some(state)
            } else {
                None
            };
            for batch in self.batches(rows) {
                let scored = self.batch(&batch, state.as_ref(), &encoded)?;
                for (i, ll) in &scored {
                    out[*i] = Some(*ll);
                }
                answered(&scored)?;
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.expect("every request answered"))
            .collect())
    }

    /// Consecutive requests sharing at least [`MIN_SHARED_PREFIX`] context tokens form a group
    /// read from one prefix state (keeping the last context token of each in its row: it
    /// predicts the continuation's first token); the others, with no prefix, form one group and
    /// batch freely.
    fn groups(&self, encoded: &[(Vec<u32>, Vec<u32>)]) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for (i, (ctx, _)) in encoded.iter().enumerate() {
            let joined = groups.last_mut().and_then(|g| {
                let first = &encoded[g.requests[0]].0;
                let n = common_prefix(first, ctx).min(ctx.len() - 1).min(g.prefix);
                (self.share_prefix && n >= MIN_SHARED_PREFIX).then_some((g, n))
            });
            match joined {
                Some((g, n)) => {
                    g.requests.push(i);
                    g.prefix = n;
                }
                None => groups.push(Group {
                    requests: vec![i],
                    prefix: ctx.len() - 1,
                }),
            }
        }
        let (mut groups, alone): (Vec<Group>, Vec<Group>) =
            groups.into_iter().partition(|g| g.requests.len() > 1);
        if !alone.is_empty() {
            groups.push(Group {
                requests: alone.into_iter().flat_map(|g| g.requests).collect(),
                prefix: 0,
            });
        }
        groups
    }

    /// Rows longest first, cut into forward passes of at most `batch_tokens` padded tokens.
    fn batches(&self, mut rows: Vec<Row>) -> Vec<Vec<Row>> {
        rows.sort_by_key(|r| std::cmp::Reverse(r.tokens.len()));
        let mut out: Vec<Vec<Row>> = Vec::new();
        for row in rows {
            match out.last_mut() {
                // Sorted longest first: the batch's first row sets its padded length.
                Some(b) if (b.len() + 1) * b[0].tokens.len() <= self.batch_tokens => b.push(row),
                _ => out.push(vec![row]),
            }
        }
        out
    }

    /// One forward pass over `rows` (right-padded: causal attention keeps padding out of real
    /// positions), continuing from a copy of `state` for each row.
    fn batch(
        &self,
        rows: &[Row],
        state: Option<&Cache>,
        encoded: &[(Vec<u32>, Vec<u32>)],
    ) -> Result<Vec<(usize, LogLikelihood)>> {
        let dev = self.model.device();
        let len = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        let pad = self.tokenizer.eos_id.unwrap_or(0);
        let flat: Vec<u32> = rows
            .iter()
            .flat_map(|r| {
                r.tokens
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, len - r.tokens.len()))
            })
            .collect();
        let input = Tensor::from_vec(flat, (rows.len(), len), dev)?;
        let hidden = match state {
            Some(s) => {
                let mut s = s.repeat(rows.len())?;
                self.model.forward_hidden(&input, Some(&mut s))?
            }
            None => self.model.forward_hidden(&input, None)?,
        };
        let mut picked = Vec::new();
        let mut targets = Vec::new();
        for (b, r) in rows.iter().enumerate() {
            for &(i, from) in &r.uses {
                let cont = &encoded[i].1;
                picked.push(hidden.i(b)?.narrow(0, from, cont.len())?);
                targets.extend_from_slice(cont);
            }
        }
        let mut lls = score(self.model, &Tensor::cat(&picked, 0)?, &targets)?.into_iter();
        Ok(rows
            .iter()
            .flat_map(|r| &r.uses)
            .map(|&(i, _)| {
                let n = encoded[i].1.len();
                let (logprob, greedy) = lls
                    .by_ref()
                    .take(n)
                    .fold((0.0, true), |(s, g), (lp, best)| (s + lp, g && best));
                (
                    i,
                    LogLikelihood {
                        logprob,
                        greedy,
                        tokens: n,
                    },
                )
            })
            .collect())
    }

    /// Refuses, before tokenizing anything, a request whose text cannot fit the model's
    /// context: a token covers at most [`TextTokenizer::max_token_bytes`] bytes of its text
    /// (four times that leaves room for normalizers that shrink the text), so more bytes than
    /// that many per position of the context are more tokens than it holds. One 50 MB query
    /// line once took 7 GB and minutes of tokenizing before the forward pass refused it.
    fn check_lengths(&self, requests: &[Request]) -> Result<()> {
        let Some(limit) = self.model.context_limit() else {
            return Ok(());
        };
        let bound = limit.saturating_mul(4 * self.tokenizer.max_token_bytes().max(1));
        for (i, r) in requests.iter().enumerate() {
            let bytes = r.context.len() + r.continuation.len();
            if bytes > bound {
                let start: String = r.context.chars().take(40).collect();
                bail!(
                    "request {} ({start:?}…) has {bytes} bytes of text, more than the model's context of {limit} tokens can hold",
                    i + 1
                );
            }
        }
        Ok(())
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
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Per target, its log-probability and whether it is the argmax, from the hidden states
/// (n, hidden) that predict them.
fn score(model: &Llama, hidden: &Tensor, targets: &[u32]) -> Result<Vec<(f64, bool)>> {
    let logits = model.logits(hidden)?;
    let lsm = log_softmax_f64(&logits)?;
    let t = Tensor::new(targets, hidden.device())?;
    let picked = lsm
        .gather(&t.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .to_vec1::<f64>()?;
    let best = lsm.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(picked
        .iter()
        .zip(best.iter().zip(targets))
        .map(|(&lp, (b, t))| (lp, b == t))
        .collect())
}
