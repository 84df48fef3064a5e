//! `supra serve`: the OpenAI-compatible HTTP server.

use anyhow::{bail, Result};
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
    /// Generations running at once (each uses every core for its matrix products).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) concurrency: u64,
    /// Requests that may wait for a free slot; more get 503 with Retry-After.
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
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub(crate) max_body_bytes: usize,
    /// States the prompt cache keeps (0 turns it off).
    #[arg(long, default_value_t = 8)]
    pub(crate) prompt_cache: usize,
    /// The model's name in the API [default: the file or directory name].
    #[arg(long)]
    pub(crate) model_id: Option<String>,
}

pub(crate) fn serve(a: &ServeArgs) -> Result<()> {
    use supra::serve::{api::Limits, ServeOptions};
    let default_max_tokens = a.default_max_tokens.unwrap_or(a.max_tokens.min(256));
    if default_max_tokens == 0 || default_max_tokens > a.max_tokens {
        bail!(
            "--default-max-tokens {default_max_tokens} must be between 1 and --max-tokens {}",
            a.max_tokens
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
    let model_id = match (&a.model_id, &a.model.model.model) {
        (Some(id), _) => id.clone(),
        (None, Some(p)) => p
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        (None, None) => fetch::DEFAULT_MODEL_NAME.to_string(),
    };
    supra::serve::warm_up(&model)?;
    let opts = ServeOptions {
        addr: std::net::SocketAddr::new(a.host, a.port),
        concurrency: a.concurrency as usize,
        queue: a.queue,
        limits: Limits {
            max_tokens: a.max_tokens,
            default_max_tokens,
            max_prompt_tokens,
        },
        prompt_cache: a.prompt_cache,
        max_body_bytes: a.max_body_bytes,
        model_id,
    };
    supra::serve::run(model, loaded.tokenizer, opts)
}
