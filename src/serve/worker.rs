//! The one thread that runs the model, batching continuously: up to `max_batch` generations
//! are active at once. Each pass advances every generation past its prompt by one token in a
//! single decoding step, which reads the weights once for all of them, and reads one piece of
//! a waiting prompt (at most `prefill_chunk` tokens, so that a long prompt does not freeze the
//! others' streams) in the same pass over the weights where that changes no row's values
//! ([`Llama::step_and_read`]; else right before the step). New requests join at the next
//! pass; finished and cancelled ones leave without stopping the others. A sequence's tokens do
//! not depend on its company: its prompt is read in the same pieces and each of its steps
//! takes the same kernels alone or batched ([`Llama::decode_step`]).

use crate::infer::generate::{Pick, Picker, TextStream};
use crate::infer::sampler::{Sampler, SamplingParams};
use crate::infer::state::State;
use crate::model::linear::GEMV_MAX_ROWS;
use crate::model::llama::{Cache, Llama};
use crate::model::spin;
use crate::serve::api::{PromptDetails, Settings, Usage};
use crate::serve::Shared;
use anyhow::Result;
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        finish_reason: &'static str,
        usage: Usage,
    },
    Failed(String),
}

pub struct Job {
    pub prompt: Vec<u32>,
    /// A prompt length after which the prompt cache keeps a state too.
    pub checkpoint: Option<usize>,
    pub settings: Settings,
    pub stop_ids: Vec<u32>,
    /// Set by the handler when its client is gone.
    pub cancel: Arc<AtomicBool>,
    /// Unbounded: a client that reads slowly must not hold up the batch (what it has not read
    /// is at most its max_tokens of text).
    pub events: UnboundedSender<Event>,
    /// Held until the generation ends (its place among the admitted requests).
    pub admission: Box<dyn Send>,
}

/// How the batch runs.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Generations active at once; more wait in the queue.
    pub max_batch: usize,
    /// Prompt tokens read per pass while others decode.
    pub prefill_chunk: usize,
}

/// Runs jobs from `jobs` until every sender is gone (the server itself holds one, so: until
/// it is dropped). Holds the server only while it has work.
pub fn run(shared: Weak<Shared>, jobs: Receiver<Job>, opts: BatchOptions) {
    // Idle: block until a job comes.
    while let Ok(job) = jobs.recv() {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut batch = Batch::new(&shared, opts);
        batch.admit(job);
        while !batch.active.is_empty() {
            while batch.active.len() < opts.max_batch.max(1) {
                match jobs.try_recv() {
                    Ok(j) => batch.admit(j),
                    Err(_) => break,
                }
            }
            batch.pass();
        }
        // Nothing active: wait for the next job without holding the server.
        drop(batch);
        drop(shared);
    }
}

/// One generation in the batch.
struct Active<'a> {
    job: Job,
    state: State,
    cached_tokens: usize,
    checkpoint: Option<usize>,
    picker: Picker,
    text: TextStream<'a>,
    scan: StopScan,
    /// Set when it ended.
    ended: Option<End>,
    /// Its stream was cut by a stop string (the rest of the text is dropped).
    stopped_by_string: bool,
}

impl Active<'_> {
    fn prompt_read(&self) -> bool {
        self.state.tokens.len() >= self.job.prompt.len()
    }

    fn cancelled(&self) -> bool {
        self.job.cancel.load(Ordering::Relaxed)
    }

    /// Sends a piece of text; false when the client is gone.
    fn send(&self, piece: String) -> bool {
        piece.is_empty() || self.job.events.send(Event::Text(piece)).is_ok()
    }

    /// Takes the next token from the state's logits and emits it. Returns the token when the
    /// generation goes on (it is then read in the next decoding step).
    fn sample(&mut self, ctx: usize) -> Result<Option<u32>> {
        let logits = self
            .state
            .logits
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("nothing to continue from: the prompt is empty"))?;
        let next = match self.picker.pick(logits)? {
            Pick::Limit => {
                self.ended = Some(End::Finished("length"));
                return Ok(None);
            }
            Pick::Stop(_) => {
                self.ended = Some(End::Finished("stop"));
                return Ok(None);
            }
            Pick::Token(id) => id,
        };
        if let Some(piece) = self.text.push(next)? {
            let (out, hit) = self.scan.push(&piece);
            if !self.send(out) || self.cancelled() {
                self.ended = Some(End::Gone);
                return Ok(None);
            }
            if hit {
                self.stopped_by_string = true;
                self.ended = Some(End::Finished("stop"));
                return Ok(None);
            }
        }
        // The end of the context and max_tokens are both "length" to a client.
        if self.picker.ends_after(self.state.cache.pos, ctx).is_some() {
            self.ended = Some(End::Finished("length"));
            return Ok(None);
        }
        Ok(Some(next))
    }
}

/// How a generation ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// With this finish reason ("stop" or "length").
    Finished(&'static str),
    /// Its client went away.
    Gone,
    /// With an error, already sent to its client and counted.
    Failed,
}

struct Batch<'a> {
    shared: &'a Shared,
    model: &'a Llama,
    opts: BatchOptions,
    active: Vec<Active<'a>>,
}

impl<'a> Batch<'a> {
    fn new(shared: &'a Shared, opts: BatchOptions) -> Self {
        Self {
            shared,
            model: &shared.model,
            opts,
            active: Vec::new(),
        }
    }

    fn admit(&mut self, mut job: Job) {
        let counters = &self.shared.counters;
        let cached = match self.shared.prompt_cache.lock() {
            Ok(mut c) => c.lookup(&job.prompt),
            Err(_) => Err(anyhow::anyhow!("the prompt cache lock is poisoned")),
        };
        let cached = match cached {
            Ok(c) => c,
            Err(e) => return fail(counters, &job, &e),
        };
        let state = cached.unwrap_or_else(|| State::new(self.model));
        let cached_tokens = state.tokens.len();
        if cached_tokens > 0 {
            counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            counters
                .cached_tokens
                .fetch_add(cached_tokens, Ordering::Relaxed);
        }
        let s = &job.settings;
        let params = SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
        };
        let sampler = Sampler::new(params, s.seed.unwrap_or_else(rand::random));
        // The picker holds the stop ids from here on.
        let picker = Picker::new(sampler, std::mem::take(&mut job.stop_ids), s.max_tokens);
        self.active.push(Active {
            checkpoint: job.checkpoint.filter(|&at| at > cached_tokens),
            scan: StopScan::new(s.stop.clone()),
            job,
            state,
            cached_tokens,
            picker,
            text: TextStream::new(&self.shared.tokenizer),
            ended: None,
            stopped_by_string: false,
        });
        counters.running.store(self.active.len(), Ordering::Relaxed);
    }

    /// One pass: one token for every generation past its prompt and a piece of the first
    /// unread prompt, in one pass over the weights where the model allows it
    /// ([`Llama::step_and_read`]); then those that ended leave.
    fn pass(&mut self) {
        for a in &mut self.active {
            if a.cancelled() {
                a.ended = Some(End::Gone);
            }
        }
        let reader = self
            .active
            .iter()
            .position(|a| a.ended.is_none() && !a.prompt_read());
        let (ids, rows) = self.pick();
        let piece = reader.map(|i| (i, self.next_piece(i)));
        let together = match &piece {
            Some((_, piece)) => {
                !ids.is_empty()
                    && ids.len() <= GEMV_MAX_ROWS
                    && self.model.can_read_beside_steps(ids.len() + piece.len())
            }
            None => false,
        };
        if together {
            let (i, piece) = piece.expect("a piece to read beside the step");
            if let Err(e) = self.step_and_read(&ids, &rows, i, piece) {
                // Every state the pass touched is unusable.
                for r in rows.iter().chain([&i]) {
                    let a = &mut self.active[*r];
                    fail(&self.shared.counters, &a.job, &e);
                    a.ended = Some(End::Failed);
                }
            }
        } else {
            if let Some((i, piece)) = piece {
                if let Err(e) = self.read_prompt(i, piece) {
                    fail(&self.shared.counters, &self.active[i].job, &e);
                    self.active[i].ended = Some(End::Failed);
                }
            }
            if let Err(e) = self.step(&ids, &rows) {
                // A failed step leaves its sequences' states unusable: all of them fail.
                for &r in &rows {
                    let a = &mut self.active[r];
                    fail(&self.shared.counters, &a.job, &e);
                    a.ended = Some(End::Failed);
                }
            }
        }
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].ended.is_some() {
                let a = self.active.remove(i);
                self.finish(a);
            } else {
                i += 1;
            }
        }
        let c = &self.shared.counters;
        c.running.store(self.active.len(), Ordering::Relaxed);
    }

    /// The next piece of generation `i`'s prompt: up to the checkpoint (where the prompt cache
    /// keeps a state) or `prefill_chunk` tokens, whichever comes first.
    fn next_piece(&self, i: usize) -> std::ops::Range<usize> {
        let a = &self.active[i];
        let from = a.state.tokens.len();
        let to = match a.checkpoint {
            Some(at) if from < at => at,
            _ => a.job.prompt.len(),
        }
        .min(from + self.opts.prefill_chunk.max(1));
        from..to
    }

    /// Reads `piece` of generation `i`'s prompt on its own.
    fn read_prompt(&mut self, i: usize, piece: std::ops::Range<usize>) -> Result<()> {
        let a = &mut self.active[i];
        a.state.feed(self.model, &a.job.prompt[piece])?;
        self.remember_at_marks(i)
    }

    /// Keeps generation `i`'s state in the prompt cache where its prompt ends or reaches the
    /// checkpoint.
    fn remember_at_marks(&self, i: usize) -> Result<()> {
        let a = &self.active[i];
        let read = a.state.tokens.len();
        if Some(read) == a.checkpoint || read == a.job.prompt.len() {
            remember(self.shared, &a.state)?;
        }
        Ok(())
    }

    /// The next token of every generation past its prompt that goes on (sampled from its
    /// logits, sent to its client): the tokens and the generations' indices. Those that end
    /// here are marked.
    fn pick(&mut self) -> (Vec<u32>, Vec<usize>) {
        let ctx = self.model.context_limit().unwrap_or(usize::MAX);
        let mut live: Vec<(usize, &mut Active)> = self
            .active
            .iter_mut()
            .enumerate()
            .filter(|(_, a)| a.ended.is_none() && a.prompt_read())
            .collect();
        // Each row's sampling (a softmax over the vocabulary) and text on both cores: one
        // after another they took a good part of a large batch's step.
        let picks = spin::map_rows(&mut live, &|_, (_, a)| a.sample(ctx));
        let mut ids = Vec::new();
        let mut rows = Vec::new();
        for ((i, a), pick) in live.into_iter().zip(picks) {
            match pick {
                Ok(Some(id)) => {
                    ids.push(id);
                    rows.push(i);
                }
                Ok(None) => {}
                Err(e) => {
                    fail(&self.shared.counters, &a.job, &e);
                    a.ended = Some(End::Failed);
                }
            }
        }
        (ids, rows)
    }

    /// The decoding step that reads `ids[r]` into generation `rows[r]`.
    fn step(&mut self, ids: &[u32], rows: &[usize]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let model = self.model;
        let (mut caches, _) = split_states(&mut self.active, rows, None);
        let logits = model.decode_step(ids, &mut caches)?;
        self.stepped(ids, rows, &logits)
    }

    /// [`Batch::step`] and generation `i`'s `piece` of prompt in one pass.
    fn step_and_read(
        &mut self,
        ids: &[u32],
        rows: &[usize],
        i: usize,
        piece: std::ops::Range<usize>,
    ) -> Result<()> {
        let model = self.model;
        let (mut caches, reader) = split_states(&mut self.active, rows, Some(i));
        let reader = reader.expect("the reader's state");
        let prompt = &reader.job.prompt[piece];
        let (logits, last) =
            model.step_and_read(ids, &mut caches, prompt, &mut reader.state.cache)?;
        reader.state.tokens.extend_from_slice(prompt);
        reader.state.logits = Some(last);
        self.remember_at_marks(i)?;
        self.stepped(ids, rows, &logits)
    }

    /// Counts a step and hands each of its generations its logits and token.
    fn stepped(&mut self, ids: &[u32], rows: &[usize], logits: &Tensor) -> Result<()> {
        let c = &self.shared.counters;
        c.decode_steps.fetch_add(1, Ordering::Relaxed);
        c.decode_rows.fetch_add(ids.len(), Ordering::Relaxed);
        c.largest_batch.fetch_max(ids.len(), Ordering::Relaxed);
        for (r, (&i, &id)) in rows.iter().zip(ids).enumerate() {
            let a = &mut self.active[i];
            a.state.logits = Some(logits.narrow(0, r, 1)?.contiguous()?);
            a.state.tokens.push(id);
        }
        Ok(())
    }

    /// Ends a generation: the held-back text, the prompt cache, the final event.
    fn finish(&self, mut a: Active) {
        let counters = &self.shared.counters;
        let finish_reason = match a.ended {
            Some(End::Finished(reason)) => reason,
            Some(End::Gone) => {
                counters.cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(End::Failed) | None => return,
        };
        if !a.stopped_by_string {
            let rest = a.text.finish().map(|t| {
                let (out, hit) = a.scan.push(&t);
                if hit {
                    out
                } else {
                    out + &a.scan.finish()
                }
            });
            match rest {
                Ok(t) => {
                    if !a.send(t) {
                        counters.cancelled.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                Err(e) => return fail(counters, &a.job, &e),
            }
        }
        if let Err(e) = remember(self.shared, &a.state) {
            return fail(counters, &a.job, &e);
        }
        let prompt_tokens = a.job.prompt.len();
        let done = Event::Done {
            finish_reason,
            usage: Usage {
                prompt_tokens,
                completion_tokens: a.picker.generated,
                total_tokens: prompt_tokens + a.picker.generated,
                prompt_tokens_details: PromptDetails {
                    cached_tokens: a.cached_tokens,
                },
            },
        };
        // Counted before it is sent: a client that has its answer finds it counted.
        counters.completed.fetch_add(1, Ordering::Relaxed);
        let _ = a.job.events.send(done);
    }
}

/// The states of generations `rows`, in that order, and generation `reader` (not among them)
/// itself.
fn split_states<'s, 'a>(
    active: &'s mut [Active<'a>],
    rows: &[usize],
    reader: Option<usize>,
) -> (Vec<&'s mut Cache>, Option<&'s mut Active<'a>>) {
    let mut by_index: Vec<Option<&mut Active<'a>>> = active.iter_mut().map(Some).collect();
    let reader = reader.map(|i| by_index[i].take().expect("the reader does not step"));
    let caches = rows
        .iter()
        .map(|&r| {
            &mut by_index[r]
                .take()
                .expect("each generation steps once")
                .state
                .cache
        })
        .collect();
    (caches, reader)
}

fn fail(counters: &crate::serve::Counters, job: &Job, e: &anyhow::Error) {
    counters.failed.fetch_add(1, Ordering::Relaxed);
    let _ = job.events.send(Event::Failed(format!("{e:#}")));
}

fn remember(shared: &Shared, state: &State) -> Result<()> {
    shared
        .prompt_cache
        .lock()
        .map_err(|_| anyhow::anyhow!("the prompt cache lock is poisoned"))?
        .insert(state)
}

/// Finds stop strings in streamed text, holding back a tail that may be the start of one.
struct StopScan {
    stops: Vec<String>,
    held: String,
}

impl StopScan {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text that is safe to emit and whether a stop string came (the
    /// text from it on is dropped).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..=s.len().min(self.held.len()))
                    .rev()
                    .find(|&k| {
                        let cut = self.held.len() - k;
                        self.held.is_char_boundary(cut) && s.starts_with(&self.held[cut..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let out: String = self.held.drain(..self.held.len() - keep).collect();
        (out, false)
    }

    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopScan;

    #[test]
    fn stop_strings_split_across_pieces_are_found_and_nothing_else_is_held() {
        let mut s = StopScan::new(vec!["\n\nQ:".to_string(), "END".to_string()]);
        assert_eq!(s.push("Paris."), ("Paris.".to_string(), false));
        assert_eq!(s.push(" Yes\n"), (" Yes".to_string(), false));
        assert_eq!(s.push("\nQ"), (String::new(), false));
        assert_eq!(s.push(": next"), (String::new(), true));
        let mut s = StopScan::new(vec!["END".to_string()]);
        assert_eq!(s.push("héE"), ("hé".to_string(), false));
        assert_eq!(s.push("x"), ("Ex".to_string(), false));
        assert_eq!(s.push("EN"), (String::new(), false));
        assert_eq!(s.finish(), "EN");
        let mut none = StopScan::new(Vec::new());
        assert_eq!(none.push("abc"), ("abc".to_string(), false));
    }
}
