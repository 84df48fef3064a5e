//! `supra serve`: OpenAI's HTTP API over one model. Generations run on blocking threads, at most
//! `concurrency` at once; up to `queue` more wait for a slot and the rest are turned away at
//! once (503 with Retry-After). A client that disconnects ends its generation. A prompt cache
//! keeps the state after recent prompts and answers so that a conversation's next turn reads
//! only its new tokens.

pub mod api;
pub mod prompt_cache;
pub mod worker;

use crate::infer::state::State as GenState;
use crate::io::tokenizer::{ChatFormat, TextTokenizer};
use crate::model::llama::Llama;
use anyhow::{Context, Result};
use api::{ApiError, ChatRequest, CompletionRequest, Limits, Settings};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prompt_cache::PromptCache;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use worker::{Event, Job};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// Generations running at once.
    pub concurrency: usize,
    /// Requests waiting for a generation slot beyond those running.
    pub queue: usize,
    pub limits: Limits,
    /// States kept by the prompt cache (0: none).
    pub prompt_cache: usize,
    pub max_body_bytes: usize,
    /// The name clients see in /v1/models and send as `model`.
    pub model_id: String,
}

#[derive(Default)]
pub struct Counters {
    pub completed: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub failed: AtomicUsize,
    pub rejected: AtomicUsize,
    pub cache_hits: AtomicUsize,
    pub cached_tokens: AtomicUsize,
}

/// What every request handler and worker shares.
pub struct Shared {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    chat: Option<ChatFormat>,
    opts: ServeOptions,
    slots: Arc<Semaphore>,
    /// Requests running or waiting for a slot.
    admitted: AtomicUsize,
    pub prompt_cache: Mutex<PromptCache>,
    pub counters: Counters,
    next_id: AtomicU64,
}

/// Binds `opts.addr`, prints the address it listens on to stderr, and serves until Ctrl-C.
pub fn run(model: Llama, tokenizer: TextTokenizer, opts: ServeOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .with_context(|| format!("cannot listen on {}", opts.addr))?;
        let addr = listener.local_addr()?;
        let id = opts.model_id.clone();
        let app = router(shared(model, tokenizer, opts));
        eprintln!("supra serve: '{id}' listening on http://{addr} (Ctrl-C stops)");
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("the server failed")
    })
}

fn shared(model: Llama, tokenizer: TextTokenizer, opts: ServeOptions) -> Arc<Shared> {
    let chat = tokenizer.chat_format().ok();
    Arc::new(Shared {
        model,
        tokenizer,
        chat,
        slots: Arc::new(Semaphore::new(opts.concurrency.max(1))),
        admitted: AtomicUsize::new(0),
        prompt_cache: Mutex::new(PromptCache::new(opts.prompt_cache)),
        counters: Counters::default(),
        next_id: AtomicU64::new(1),
        opts,
    })
}

fn router(shared: Arc<Shared>) -> Router {
    let max_body = shared.opts.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::invalid(
                    None,
                    "no such endpoint (POST /v1/completions, POST /v1/chat/completions, \
                     GET /v1/models, GET /health)",
                )
            }
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.opts.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "supra",
    }]}))
}

async fn health(State(s): State<Arc<Shared>>) -> Json<Value> {
    let c = &s.counters;
    let n = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    let running = s.opts.concurrency.max(1) - s.slots.available_permits();
    let cache_entries = s.prompt_cache.lock().map_or(0, |c| c.len());
    Json(json!({
        "status": "ok",
        "model": s.opts.model_id,
        "running": running,
        "queued": n(&s.admitted).saturating_sub(running),
        "completed": n(&c.completed),
        "cancelled": n(&c.cancelled),
        "failed": n(&c.failed),
        "rejected": n(&c.rejected),
        "prompt_cache": {
            "entries": cache_entries,
            "hits": n(&c.cache_hits),
            "cached_tokens": n(&c.cached_tokens),
        },
    }))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let req: CompletionRequest = parse(body)?;
        let settings = req.common.settings(&s.opts.limits, &s.opts.model_id)?;
        let job = Request {
            prompt: s.tokenize(req.prompt()?)?,
            checkpoint: None,
            stop_ids: s.tokenizer.stop_ids(None),
            settings,
        };
        start(s, Kind::Completion, job).await
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let req: ChatRequest = parse(body)?;
        let mut common = req.common.clone();
        if req.max_completion_tokens.is_some() {
            common.max_tokens = req.max_completion_tokens;
        }
        let settings = common.settings(&s.opts.limits, &s.opts.model_id)?;
        let Some(chat) = &s.chat else {
            return Err(ApiError::invalid(
                None,
                "this model has no chat template; use /v1/completions",
            ));
        };
        let messages = req.messages()?;
        let prompt = s.tokenize(&chat.render(&messages))?;
        // The state before the last message serves every request that shares the earlier
        // turns (a fixed system prompt, a regenerated answer).
        let earlier = &messages[..messages.len() - 1];
        let checkpoint = match earlier.is_empty() {
            true => None,
            false => s
                .tokenizer
                .encode(&chat.render_turns(earlier))
                .ok()
                .filter(|ids| !ids.is_empty() && prompt.starts_with(ids))
                .map(|ids| ids.len()),
        };
        let stop_ids = s.tokenizer.stop_ids(Some(chat));
        let job = Request {
            prompt,
            checkpoint,
            stop_ids,
            settings,
        };
        start(s.clone(), Kind::Chat, job).await
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(
                "request_too_large",
                format!("the request body is too large: {e}"),
            )
        } else {
            ApiError::invalid(None, format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(
            None,
            format!("the request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

impl Shared {
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let ids = self
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::invalid(Some("prompt"), format!("cannot tokenize: {e:#}")))?;
        if ids.is_empty() {
            return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
        }
        let limit = self.opts.limits.max_prompt_tokens;
        if ids.len() > limit {
            return Err(ApiError::too_large(
                "context_length_exceeded",
                format!(
                    "the prompt has {} tokens; this server takes at most {limit}",
                    ids.len()
                ),
            ));
        }
        Ok(ids)
    }
}

/// Holds a request's place among those admitted; gives it back when dropped.
struct Admission(Arc<Shared>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tells the worker its client is gone when the handler (or its response stream) is dropped
/// before the generation ended.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A checked request, ready to run.
struct Request {
    prompt: Vec<u32>,
    /// A prompt length at which the prompt cache should keep a state too.
    checkpoint: Option<usize>,
    stop_ids: Vec<u32>,
    settings: Settings,
}

async fn start(s: Arc<Shared>, kind: Kind, req: Request) -> Result<Response, ApiError> {
    let Request {
        prompt,
        checkpoint,
        stop_ids,
        settings,
    } = req;
    let capacity = s.opts.concurrency.max(1) + s.opts.queue;
    if s.admitted.fetch_add(1, Ordering::SeqCst) >= capacity {
        s.admitted.fetch_sub(1, Ordering::SeqCst);
        s.counters.rejected.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::overloaded(1));
    }
    let admission = Admission(s.clone());
    let permit: OwnedSemaphorePermit = s
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("the server is shutting down"))?;
    let (tx, rx) = mpsc::channel(64);
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job {
        prompt,
        checkpoint,
        settings: settings.clone(),
        stop_ids,
        cancel: cancel.clone(),
        events: tx,
    };
    let worker_shared = s.clone();
    tokio::task::spawn_blocking(move || {
        let _held = (admission, permit);
        worker::run(&worker_shared, job);
    });
    let reply = Reply {
        kind,
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            s.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: s.opts.model_id.clone(),
    };
    let guard = CancelOnDrop(cancel);
    if settings.stream {
        Ok(stream(reply, rx, guard, settings.include_usage).into_response())
    } else {
        collect(reply, rx, guard).await
    }
}

/// Builds response bodies and stream chunks in OpenAI's shapes.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn envelope(&self, choices: Value) -> Value {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": choices})
    }

    fn chunk(&self, text: Option<&str>, finish_reason: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({"index": 0, "text": text.unwrap_or(""),
                                       "logprobs": null, "finish_reason": finish_reason}),
            Kind::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({"index": 0, "delta": delta, "logprobs": null,
                       "finish_reason": finish_reason})
            }
        };
        self.envelope(json!([choice]))
    }

    fn whole(&self, text: String, finish_reason: &str, usage: api::Usage) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null,
                                       "finish_reason": finish_reason}),
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": null, "finish_reason": finish_reason}),
        };
        let mut v = self.envelope(json!([choice]));
        if self.kind == Kind::Chat {
            v["object"] = json!("chat.completion");
        }
        v["usage"] = json!(usage);
        v
    }
}

async fn collect(
    reply: Reply,
    mut rx: mpsc::Receiver<Event>,
    _guard: CancelOnDrop,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish_reason,
                usage,
            } => return Ok(Json(reply.whole(text, finish_reason, usage)).into_response()),
            Event::Failed(m) => return Err(ApiError::internal(m)),
        }
    }
    Err(ApiError::internal("the generation ended without a result"))
}

fn stream(
    reply: Reply,
    rx: mpsc::Receiver<Event>,
    guard: CancelOnDrop,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    use futures_util::StreamExt;
    let data = |v: Value| SseEvent::default().data(v.to_string());
    // Chat streams open with the assistant's role, as OpenAI's do.
    let opening: Vec<SseEvent> = match reply.kind {
        Kind::Chat => {
            let mut v = reply.chunk(Some(""), None);
            v["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
            vec![data(v)]
        }
        Kind::Completion => Vec::new(),
    };
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).flat_map(move |e| {
        let _alive = &guard;
        let out: Vec<SseEvent> = match e {
            Event::Text(t) => vec![data(reply.chunk(Some(&t), None))],
            Event::Done {
                finish_reason,
                usage,
            } => {
                let mut out = vec![data(reply.chunk(None, Some(finish_reason)))];
                if include_usage {
                    let mut v = reply.envelope(json!([]));
                    v["usage"] = json!(usage);
                    out.push(data(v));
                }
                out.push(SseEvent::default().data("[DONE]"));
                out
            }
            Event::Failed(m) => vec![data(ApiError::internal(m).body())],
        };
        futures_util::stream::iter(out)
    });
    let all = futures_util::stream::iter(opening).chain(events).map(Ok);
    Sse::new(all).keep_alive(KeepAlive::default())
}

/// Runs `prompt` through the model once so that the first request does not pay for warming up
/// (allocations, page faults of the weights).
pub fn warm_up(model: &Llama) -> Result<()> {
    let mut s = GenState::new(model);
    s.feed(model, &[model.config.bos_token_id.unwrap_or(0)])
}
