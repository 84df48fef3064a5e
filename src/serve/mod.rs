//! `supra serve`: OpenAI's HTTP API over one model. One thread runs the model and batches
//! continuously ([`worker`]): up to `max_batch` generations advance together, one decoding step
//! for all of them per pass; up to `queue` more wait for a place and the rest are turned away at
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
use api::{ApiError, ChatRequest, CompletionRequest, Limits, ServedNames, Settings};
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
use tokio::sync::{mpsc, Semaphore};
use worker::{BatchOptions, Event, Job};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// Generations in the batch at once, and prompt tokens read per pass.
    pub batch: BatchOptions,
    /// Requests waiting for a place in the batch beyond those running.
    pub queue: usize,
    pub limits: Limits,
    /// States kept by the prompt cache (0: none).
    pub prompt_cache: usize,
    /// Bytes those states may hold in all.
    pub prompt_cache_bytes: usize,
    pub max_body_bytes: usize,
    /// The names clients see in /v1/models and may send as `model`.
    pub names: ServedNames,
    pub connections: ConnectionLimits,
    /// Chat messages' control-token strings are control tokens (they are plain text unless
    /// this is set: a user could otherwise forge turn boundaries).
    pub special_in_content: bool,
}

#[derive(Default)]
pub struct Counters {
    pub completed: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub failed: AtomicUsize,
    pub rejected: AtomicUsize,
    pub cache_hits: AtomicUsize,
    pub cached_tokens: AtomicUsize,
    /// Generations in the batch now.
    pub running: AtomicUsize,
    /// Decoding steps run, the rows they advanced in all, and the most in one.
    pub decode_steps: AtomicUsize,
    pub decode_rows: AtomicUsize,
    pub largest_batch: AtomicUsize,
}

/// What every request handler and worker shares.
pub struct Shared {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    chat: Option<ChatFormat>,
    opts: ServeOptions,
    /// To the batching thread.
    jobs: std::sync::mpsc::Sender<Job>,
    /// Requests running or waiting for a place in the batch.
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
        let id = opts.names.primary().to_string();
        let limits = opts.connections;
        let app = router(shared(model, tokenizer, opts));
        eprintln!("supra serve: '{id}' listening on http://{addr} (Ctrl-C stops)");
        serve_connections(listener, app, limits).await
    })
}

/// What a server allows each client: `max` connections open at once (more wait in the
/// listen backlog until one closes), and `timeout` to send a request's headers and then as
/// long for its body. Without them, 20 sockets holding half-sent headers stayed open
/// indefinitely, and a body announced longer than sent held its handler forever.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max: usize,
    pub timeout: std::time::Duration,
}

/// Accepts connections until Ctrl-C, each served by hyper's HTTP/1 with the header timeout,
/// then lets those open finish.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let open = Arc::new(Semaphore::new(limits.max.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let permit = tokio::select! {
            p = open.clone().acquire_owned() => p.context("the connection slots closed")?,
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait for some to close.
                    eprintln!("supra serve: cannot accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that misbehaves ends its own connection, nothing else.
            let _ = conn.await;
            drop(permit);
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Reads a request's whole body within the client timeout before any handler runs: a body
/// that stalls gets 408, one over `--max-body-bytes` 413.
async fn read_body(
    State(s): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let (limit, timeout) = (s.opts.max_body_bytes, s.opts.connections.timeout);
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: Some("request_timeout"),
            ..ApiError::invalid(
                None,
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs_f64()
                ),
            )
        }
        .into_response(),
        Ok(Err(e)) => {
            let e = e.into_inner();
            if over_limit(e.as_ref()) {
                ApiError::too_large(
                    "request_too_large",
                    format!("the request body is too large (over {limit} bytes)"),
                )
            } else {
                ApiError::invalid(None, format!("cannot read the request body: {e}"))
            }
            .into_response()
        }
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(parts, bytes.into()))
                .await
        }
    }
}

fn over_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(e);
    while let Some(e) = at {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        at = e.source();
    }
    false
}

fn shared(model: Llama, tokenizer: TextTokenizer, opts: ServeOptions) -> Arc<Shared> {
    let chat = tokenizer.chat_format().ok();
    let (jobs, queue) = std::sync::mpsc::channel();
    let batch = opts.batch;
    let shared = Arc::new(Shared {
        model,
        tokenizer,
        chat,
        jobs,
        admitted: AtomicUsize::new(0),
        prompt_cache: Mutex::new(PromptCache::new(opts.prompt_cache, opts.prompt_cache_bytes)),
        counters: Counters::default(),
        next_id: AtomicU64::new(1),
        opts,
    });
    let weak = Arc::downgrade(&shared);
    std::thread::Builder::new()
        .name("supra-batch".into())
        .spawn(move || worker::run(weak, queue, batch))
        .expect("cannot start the batching thread");
    shared
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
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            read_body,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    let data: Vec<Value> = s
        .opts
        .names
        .all()
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "supra"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn health(State(s): State<Arc<Shared>>) -> Json<Value> {
    let c = &s.counters;
    let n = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    let running = n(&c.running);
    let steps = n(&c.decode_steps);
    let (cache_entries, cache_bytes) = s
        .prompt_cache
        .lock()
        .map_or((0, 0), |c| (c.len(), c.bytes()));
    Json(json!({
        "status": "ok",
        "model": s.opts.names.primary(),
        "running": running,
        "queued": n(&s.admitted).saturating_sub(running),
        "completed": n(&c.completed),
        "cancelled": n(&c.cancelled),
        "failed": n(&c.failed),
        "rejected": n(&c.rejected),
        "batch": {
            "max": s.opts.batch.max_batch,
            "running": running,
            "decode_steps": steps,
            "mean": if steps == 0 { 0.0 } else { n(&c.decode_rows) as f64 / steps as f64 },
            "largest": n(&c.largest_batch),
        },
        "prompt_cache": {
            "entries": cache_entries,
            "bytes": cache_bytes,
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
        let settings = req.common.settings(&s.opts.limits, &s.opts.names)?;
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
        let settings = common.settings(&s.opts.limits, &s.opts.names)?;
        let Some(chat) = &s.chat else {
            return Err(ApiError::invalid(
                None,
                "this model has no chat template; use /v1/completions",
            ));
        };
        let messages = req.messages()?;
        let special = s.opts.special_in_content;
        let prompt = s.check_prompt(s.tokenizer.encode_prompt(&chat.render(&messages), special))?;
        // The state before the last message serves every request that shares the earlier
        // turns (a fixed system prompt, a regenerated answer).
        let earlier = &messages[..messages.len() - 1];
        let checkpoint = match earlier.is_empty() {
            true => None,
            false => s
                .tokenizer
                .encode_prompt(&chat.render_turns(earlier), special)
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
    /// A completion's prompt: raw text, control-token strings included (as the client wrote it).
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.check_prompt(self.tokenizer.encode(text))
    }

    /// A tokenized prompt, refused when empty or longer than the server takes.
    fn check_prompt(&self, ids: anyhow::Result<Vec<u32>>) -> Result<Vec<u32>, ApiError> {
        let ids =
            ids.map_err(|e| ApiError::invalid(Some("prompt"), format!("cannot tokenize: {e:#}")))?;
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
    let capacity = s.opts.batch.max_batch.max(1) + s.opts.queue;
    if s.admitted.fetch_add(1, Ordering::SeqCst) >= capacity {
        s.admitted.fetch_sub(1, Ordering::SeqCst);
        s.counters.rejected.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::overloaded(1));
    }
    let admission = Admission(s.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job {
        prompt,
        checkpoint,
        settings: settings.clone(),
        stop_ids,
        cancel: cancel.clone(),
        events: tx,
        admission: Box::new(admission),
    };
    s.jobs
        .send(job)
        .map_err(|_| ApiError::internal("the server is shutting down"))?;
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
        model: s.opts.names.primary().to_string(),
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
    mut rx: mpsc::UnboundedReceiver<Event>,
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
    rx: mpsc::UnboundedReceiver<Event>,
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
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).flat_map(move |e| {
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
