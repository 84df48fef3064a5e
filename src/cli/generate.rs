//! `supra generate`: text from a prompt, streamed as it is produced.

use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use supra::infer::generate::{Finish, Generation, TextStream};
use supra::infer::sampler::{Sampler, SamplingParams};
use supra::infer::state::State;

use super::model::InferModelArg;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: InferModelArg,
    /// The prompt text (with --chat: the user's message). May be empty with --load-state:
    /// generation then continues the saved text.
    #[arg(long)]
    pub(crate) prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.2)]
    pub(crate) temperature: f64,
    /// Sample only among the k most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) top_p: f64,
    /// Random seed for sampling (same seed, same output).
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub(crate) chat: bool,
    /// System message for --chat (default: the template's own, if any).
    #[arg(long, requires = "chat")]
    pub(crate) system: Option<String>,
    /// Print timing figures to stderr when done.
    #[arg(long)]
    pub(crate) stats: bool,
    /// Start from a state saved by --save-state (the same model): the prompt continues the
    /// text it read, which is not read again. With --chat the prompt is the next user turn.
    #[arg(long)]
    pub(crate) load_state: Option<PathBuf>,
    /// Save the state after the prompt and the generated text (for SUPRA models a few MiB,
    /// however long the text) to continue later with --load-state.
    #[arg(long)]
    pub(crate) save_state: Option<PathBuf>,
}

pub(crate) fn generate(a: &GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    params.validate()?;
    let (loaded, model) = a.model.load()?;
    let tok = &loaded.tokenizer;
    let chat = if a.chat {
        Some(tok.chat_format()?)
    } else {
        None
    };
    let mut state = match &a.load_state {
        Some(p) => State::load(&model, p)?,
        None => State::new(&model),
    };
    let continuing = !state.tokens.is_empty();
    if continuing && a.system.is_some() {
        bail!("--system cannot change a loaded state's conversation; it was read already");
    }
    // A chat message is plain text (as the server reads it); a raw prompt is read as written,
    // control-token strings included.
    let prompt = match &chat {
        Some(f) if continuing => tok.encode_prompt(&f.render_next_turn(&a.prompt), false)?,
        Some(f) => tok.encode_prompt(&f.render_user_turn(&a.prompt, a.system.as_deref()), false)?,
        None if a.prompt.is_empty() => Vec::new(),
        None => tok.encode(&a.prompt)?,
    };
    if prompt.is_empty() && !continuing {
        bail!("the prompt is empty after tokenization");
    }
    let mut g = Generation::new(
        &model,
        Sampler::new(params, a.seed),
        tok.stop_ids(chat.as_ref()),
        a.max_tokens,
    );
    let mut stream = TextStream::new(tok);
    let mut out = std::io::stdout().lock();
    let stats = g.resume(&mut state, &prompt, |id| {
        if let Some(piece) = stream.push(id)? {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        Ok(true)
    })?;
    writeln!(out, "{}", stream.finish()?)?;
    if let Some(p) = &a.save_state {
        // The last sampled token (the last shown, or the end-of-turn marker) is not read yet.
        if let Some(id) = stats.unread {
            state.feed(&model, &[id])?;
        }
        state.save(&model, p)?;
        eprintln!(
            "saved the state after {} tokens to {} ({:.1} MiB)",
            state.tokens.len(),
            p.display(),
            std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / (1u64 << 20) as f64)
        );
    }
    if a.stats {
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s; generated: {} tokens, {:.1} tokens/s{}",
            stats.prompt_tokens,
            stats.prefill_tps(),
            stats.generated_tokens,
            stats.decode_tps(),
            if stats.finish == Finish::Stop {
                " (stopped at end of turn)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
