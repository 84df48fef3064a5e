//! One generation on a blocking thread: take the longest cached state the prompt starts with,
//! read the rest, generate, and send text pieces to the request's handler as they come. A
//! handler that goes away (its client disconnected) ends the generation at the next token.

use crate::infer::generate::{Finish, Generation, TextStream};
use crate::infer::sampler::{Sampler, SamplingParams};
use crate::infer::state::{State, PREFILL_CHUNK};
use crate::serve::api::{PromptDetails, Settings, Usage};
use crate::serve::Shared;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

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
    pub events: mpsc::Sender<Event>,
}

pub fn run(shared: &Shared, job: Job) {
    let counters = &shared.counters;
    match generate(shared, &job) {
        Ok(Some(done)) => {
            counters.completed.fetch_add(1, Ordering::Relaxed);
            let _ = job.events.blocking_send(done);
        }
        Ok(None) => {
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            let _ = job.events.blocking_send(Event::Failed(format!("{e:#}")));
        }
    }
}

/// The final event, or `None` when the client went away.
fn generate(shared: &Shared, job: &Job) -> Result<Option<Event>> {
    let model = &shared.model;
    let cached = shared
        .prompt_cache
        .lock()
        .map_err(|_| anyhow::anyhow!("the prompt cache lock is poisoned"))?
        .lookup(&job.prompt)?;
    let mut state = cached.unwrap_or_else(|| State::new(model));
    let cached_tokens = state.tokens.len();
    if cached_tokens > 0 {
        shared.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .cached_tokens
            .fetch_add(cached_tokens, Ordering::Relaxed);
    }
    // Read the prompt a chunk at a time so that a client gone during a long prompt stops it.
    let checkpoint = job.checkpoint.filter(|&at| at > cached_tokens);
    while state.tokens.len() < job.prompt.len() {
        if job.cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let from = state.tokens.len();
        let to = match checkpoint {
            Some(at) if from < at => at,
            _ => job.prompt.len(),
        }
        .min(from + PREFILL_CHUNK);
        state.feed(model, &job.prompt[from..to])?;
        if Some(to) == checkpoint {
            remember(shared, &state)?;
        }
    }
    remember(shared, &state)?;

    let s = &job.settings;
    let params = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
    };
    let seed = s.seed.unwrap_or_else(rand::random);
    let mut g = Generation {
        model,
        sampler: Sampler::new(params, seed),
        stop_ids: job.stop_ids.clone(),
        max_tokens: s.max_tokens,
    };
    let mut text = TextStream::new(&shared.tokenizer);
    let mut scan = StopScan::new(s.stop.clone());
    let mut gone = false;
    let mut stopped_by_string = false;
    let mut send = |piece: String| {
        if !piece.is_empty() && job.events.blocking_send(Event::Text(piece)).is_err() {
            gone = true;
        }
        !gone
    };
    let stats = g.resume(&mut state, &[], |id| {
        if job.cancel.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let Some(piece) = text.push(id)? else {
            return Ok(true);
        };
        let (out, hit) = scan.push(&piece);
        stopped_by_string = hit;
        Ok(send(out) && !hit)
    })?;
    if !stopped_by_string && !job.cancel.load(Ordering::Relaxed) {
        let (out, hit) = scan.push(&text.finish()?);
        let rest = if hit { String::new() } else { scan.finish() };
        send(out + &rest);
    }
    if gone || job.cancel.load(Ordering::Relaxed) {
        return Ok(None);
    }
    remember(shared, &state)?;
    let finish_reason = match stats.finish {
        Finish::Stop | Finish::Halted => "stop",
        Finish::Length | Finish::Context => "length",
    };
    Ok(Some(Event::Done {
        finish_reason,
        usage: Usage {
            prompt_tokens: job.prompt.len(),
            completion_tokens: stats.generated_tokens,
            total_tokens: job.prompt.len() + stats.generated_tokens,
            prompt_tokens_details: PromptDetails { cached_tokens },
        },
    }))
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
