//! `supra serve`: the OpenAI-compatible HTTP server.

use anyhow::{bail, Context, Result};
use clap::Args;
use supra::io::fetch;

use super::model::InferModelArg;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: InferModelArg,
    /// Address to listen on; 127.0.0.1 keeps the server private to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: std::net::IpAddr,
    /// Port (0 picks a free one; the address is printed on start).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Generations advanced together, one decoding step for all of them per pass (the weights
    /// read once per step whatever their number); a request beyond them waits in the queue.
    #[arg(long, visible_alias = "concurrency", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub(crate) max_batch: u64,
    /// Prompt tokens read per pass: a prompt is read in pieces of this size between the other
    /// generations' decoding steps, so that their streams do not stall behind it. Smaller keeps
    /// their inter-token latency steadier, larger reads prompts faster under load (the default
    /// from docs/results/inference.md's measurements; alone, the size barely matters).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) prefill_chunk: u64,
    /// Requests that may wait for a place in the batch; more get 503 with Retry-After.
    #[arg(long, default_value_t = 8)]
    pub(crate) queue: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub(crate) max_tokens: usize,
    /// max_tokens of a request that does not say [default: 256, or --max-tokens if lower].
    #[arg(long)]
    pub(crate) default_max_tokens: Option<usize>,
    /// Longest prompt in tokens; longer ones get 413 [default: the model's context minus one,
    /// 32768 for models without softmax layers].
    #[arg(long)]
    pub(crate) max_prompt_tokens: Option<usize>,
    /// Connections open at once; more wait until one closes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_connections: u64,
    /// Seconds a client has to send a request's headers, and then its body; a connection that
    /// stalls is closed (headers) or answered 408 (body).
    #[arg(long, default_value_t = 30.0)]
    pub(crate) client_timeout: f64,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub(crate) max_body_bytes: usize,
    /// States the prompt cache keeps (0 turns it off).
    #[arg(long, default_value_t = 8)]
    pub(crate) prompt_cache: usize,
    /// Memory the prompt cache's states may hold in all, in MiB; the least recently used go
    /// first. A softmax layer's state grows with its prompt (SmolLM2: about 45 KiB per token),
    /// a SUPRA state does not.
    #[arg(long, default_value_t = 512)]
    pub(crate) prompt_cache_mib: usize,
    /// The names the server answers to, comma-separated: a request's "model" may be any of
    /// them (clients that send a fixed name such as gpt-4o-mini work unchanged); responses and
    /// /health report the first [default: the file or directory name].
    #[arg(long, visible_alias = "model-id", value_delimiter = ',', num_args = 1..)]
    pub(crate) served_model_name: Vec<String>,
    /// Read control-token strings (`<|im_end|>`) inside chat messages as control tokens, as
    /// tokenizing transformers' rendered template does. Off by default: a user could then end
    /// their own turn and write the assistant's.
    #[arg(long)]
    pub(crate) allow_special_in_content: bool,
}

pub(crate) fn serve(a: &ServeArgs) -> Result<()> {
    use supra::serve::{
        api::{Limits, ServedNames},
        ConnectionLimits, ServeOptions,
    };
    let default_max_tokens = a.default_max_tokens.unwrap_or(a.max_tokens.min(256));
    if default_max_tokens == 0 || default_max_tokens > a.max_tokens {
        bail!(
            "--default-max-tokens {default_max_tokens} must be between 1 and --max-tokens {}",
            a.max_tokens
        );
    }
    if !(a.client_timeout > 0.0 && a.client_timeout <= 86_400.0) {
        bail!(
            "--client-timeout {} must be a number of seconds above 0 and at most a day",
            a.client_timeout
        );
    }
    let (loaded, model) = a.model.load()?;
    let context = model.context_limit().map_or(32_768, |c| c - 1);
    let max_prompt_tokens = a.max_prompt_tokens.unwrap_or(context);
    if max_prompt_tokens == 0 || max_prompt_tokens > context {
        bail!(
            "--max-prompt-tokens must be between 1 and {context} (the model's context minus one)"
        );
    }
    let names = match (a.served_model_name.is_empty(), &a.model.model.model) {
        (false, _) => a.served_model_name.clone(),
        (true, Some(p)) => vec![p
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())],
        (true, None) => vec![fetch::DEFAULT_MODEL_NAME.to_string()],
    };
    let names = ServedNames::new(names).context("--served-model-name")?;
    supra::serve::warm_up(&model)?;
    let opts = ServeOptions {
        addr: std::net::SocketAddr::new(a.host, a.port),
        batch: supra::serve::worker::BatchOptions {
            max_batch: a.max_batch as usize,
            prefill_chunk: a.prefill_chunk as usize,
        },
        queue: a.queue,
        limits: Limits {
            max_tokens: a.max_tokens,
            default_max_tokens,
            max_prompt_tokens,
        },
        prompt_cache: a.prompt_cache,
        prompt_cache_bytes: a.prompt_cache_mib.saturating_mul(1 << 20),
        max_body_bytes: a.max_body_bytes,
        names,
        special_in_content: a.allow_special_in_content,
        connections: ConnectionLimits {
            max: a.max_connections as usize,
            timeout: std::time::Duration::from_secs_f64(a.client_timeout),
        },
    };
    supra::serve::run(model, loaded.tokenizer, opts)
}
