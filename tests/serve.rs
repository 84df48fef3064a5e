//! `supra serve` over real HTTP on 127.0.0.1 with tiny models: answers in OpenAI's shapes,
//! streaming, errors, concurrency, overload, disconnects and the prompt cache.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_supra"))
            .args(["serve", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start supra serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let base = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("supra serve exited before listening: {seen}");
            };
            seen.push_str(&line);
            if let Some(at) = line.find("http://") {
                break line[at..].split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so that the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Server { child, base, agent }
    }

    fn post(&self, path: &str, body: &str) -> (u16, String, Option<String>) {
        let mut r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body)
            .expect("request failed");
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.body_mut().read_to_string().unwrap();
        (r.status().as_u16(), text, retry)
    }

    fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text, _) = self.post(path, &body.to_string());
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, v)
    }

    fn get(&self, path: &str) -> Value {
        let mut r = self
            .agent
            .get(format!("{}{path}", self.base))
            .call()
            .unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    /// Waits until /health satisfies `ok`.
    fn wait_health(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let h = self.get("/health");
            if ok(&h) {
                return h;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{what}: {h}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tiny softmax teacher (context 256) as GGUF, and its SUPRA conversion (no context limit:
/// generations as long as a test needs) as an HF directory.
fn models(dir: &Path) -> (PathBuf, PathBuf) {
    let teacher = dir.join("tiny.gguf");
    common::testing::write_tiny_gguf(&teacher, 11).unwrap();
    let converted = common::testing::tiny_loaded(dir, 11, Some(&[])).unwrap();
    let linear = dir.join("tiny-supra");
    supra::io::hf_dir::save(&converted, &linear).unwrap();
    (teacher, linear)
}

/// The JSON chunks of a server-sent event stream, and its last `data:` payload.
fn sse_chunks(body: &str) -> (Vec<Value>, String) {
    let mut data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let last = data.pop().expect("an empty event stream").to_string();
    let chunks = data
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    (chunks, last)
}

#[test]
fn completions_and_chat_answer_in_openai_shapes_streamed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, _) = models(dir.path());
    let s = Server::start(&teacher, &["--model-id", "tiny"]);
    assert_eq!(s.get("/v1/models")["data"][0]["id"], "tiny");
    assert_eq!(s.get("/health")["status"], "ok");

    let req = json!({"model": "tiny", "prompt": "the cat", "max_tokens": 6, "temperature": 0});
    let (status, v) = s.post_json("/v1/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let usage = &v["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 6, "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));

    // Streamed: the same greedy text in pieces, a finish reason, usage on request, [DONE].
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (status, body, _) = s.post("/v1/completions", &sreq.to_string());
    assert_eq!(status, 200, "{body}");
    let (chunks, last) = sse_chunks(&body);
    assert_eq!(last, "[DONE]");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
    // The second identical prompt came whole from the prompt cache.
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"],
        usage["prompt_tokens"]
    );

    let chat = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
                      "temperature": 0});
    let (status, v) = s.post_json("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    let (_, body, _) = s.post("/v1/chat/completions", &schat.to_string());
    let (chunks, _) = sse_chunks(&body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answer);
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
}

#[test]
fn bad_requests_get_openai_error_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, _) = models(dir.path());
    let s = Server::start(
        &teacher,
        &[
            "--served-model-name",
            "tiny,gpt-4o-mini",
            "--max-body-bytes",
            "2000",
            "--max-prompt-tokens",
            "20",
            "--max-tokens",
            "50",
        ],
    );
    let error = |status: u16, body: &str, want: u16, needle: &str| {
        assert_eq!(status, want, "{body}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {body}"));
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        v
    };
    let (st, b, _) = s.post("/v1/completions", "{\"prompt\": ");
    error(st, &b, 400, "not valid JSON");
    let (st, b, _) = s.post("/v1/chat/completions", r#"{"messages": "hi"}"#);
    error(st, &b, 400, "not valid JSON");
    let (st, b, _) = s.post("/v1/completions", r#"{"prompt": "a", "best_of": 3}"#);
    error(st, &b, 400, "best_of");
    let (st, b, _) = s.post("/v1/completions", r#"{"prompt": "a", "frobnicate": true}"#);
    error(st, &b, 400, "frobnicate");
    let (st, b, _) = s.post("/v1/completions", r#"{"prompt": "a", "max_tokens": 51}"#);
    error(st, &b, 400, "max_tokens");
    let (st, b, _) = s.post("/v1/completions", r#"{"prompt": "a", "model": "gpt-4"}"#);
    error(st, &b, 404, "this server serves 'tiny', 'gpt-4o-mini'");
    // An alias is this model; responses carry the first name.
    let (st, v) = s.post_json(
        "/v1/completions",
        &json!({"prompt": "a", "model": "gpt-4o-mini", "max_tokens": 2}),
    );
    assert_eq!((st, &v["model"]), (200, &json!("tiny")), "{v}");
    let models = s.get("/v1/models");
    let ids: Vec<&Value> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["id"])
        .collect();
    assert_eq!(ids, [&json!("tiny"), &json!("gpt-4o-mini")]);
    let long = json!({"prompt": "the ".repeat(30)}).to_string();
    let (st, b, _) = s.post("/v1/completions", &long);
    let v = error(st, &b, 413, "at most 20");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let huge = json!({"prompt": "x".repeat(3000)}).to_string();
    let (st, b, _) = s.post("/v1/completions", &huge);
    error(st, &b, 413, "too large");
    let (st, b, _) = s.post("/v1/nothing", "{}");
    error(st, &b, 404, "no such endpoint");
    // Still serving.
    let (st, b, _) = s.post("/v1/completions", r#"{"prompt": "a", "max_tokens": 2}"#);
    assert_eq!(st, 200, "{b}");
}

#[test]
fn concurrent_requests_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, _) = models(dir.path());
    let s = Server::start(&teacher, &["--concurrency", "2", "--queue", "8"]);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let req =
                        json!({"prompt": format!("request {i}"), "max_tokens": 20, "seed": i});
                    s.post_json("/v1/completions", &req).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![200; 8]);
    let h = s.get("/health");
    assert_eq!(
        (h["completed"].as_u64(), h["rejected"].as_u64()),
        (Some(8), Some(0)),
        "{h}"
    );
}

/// Continuous batching: a greedy request gets the same answer alone and inside a batch of 8
/// mixed requests (prompts of different lengths read in pieces, sampled and greedy ones, one
/// stream cancelled midway, one whose prompt starts with a cached one), and /health shows the
/// batch it ran in.
#[test]
fn a_greedy_request_answers_the_same_alone_and_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (_, linear) = models(dir.path());
    let flags = [
        "--max-batch",
        "8",
        "--prefill-chunk",
        "3",
        "--max-tokens",
        "1000000",
    ];
    let greedy = json!({"prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 48,
                        "temperature": 0});
    let alone = Server::start(&linear, &flags);
    let (status, want) = alone.post_json("/v1/completions", &greedy);
    assert_eq!(status, 200, "{want}");
    assert_eq!(alone.get("/health")["batch"]["largest"], 1);

    let s = Server::start(&linear, &flags);
    let (status, _) = s.post_json(
        "/v1/completions",
        &json!({"prompt": "a shared beginning", "max_tokens": 1}),
    );
    assert_eq!(status, 200);
    // Runs through the whole batch; cancelled once the others are done.
    let long = json!({"prompt": "once upon a time", "max_tokens": 1000000, "temperature": 0,
                      "stream": true});
    let sock = open_stream(&s.base, &long);
    let mut others: Vec<Value> = (0..5)
        .map(|i| {
            json!({"prompt": "word ".repeat(1 + 4 * i), "max_tokens": 20 + 7 * i,
                   "temperature": 0.9, "top_k": 5 + i, "seed": i})
        })
        .collect();
    others.push(json!({"prompt": "a shared beginning and more after it", "max_tokens": 16}));
    let (got, rest): (Value, Vec<Value>) = std::thread::scope(|scope| {
        let s = &s;
        let handles: Vec<_> = others
            .iter()
            .map(|r| scope.spawn(move || s.post_json("/v1/completions", r)))
            .collect();
        let mine = s.post_json("/v1/completions", &greedy);
        assert_eq!(mine.0, 200, "{}", mine.1);
        let rest = handles
            .into_iter()
            .map(|h| {
                let (status, v) = h.join().unwrap();
                assert_eq!(status, 200, "{v}");
                v
            })
            .collect();
        (mine.1, rest)
    });
    assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"]);
    assert_eq!(got["usage"]["completion_tokens"], 48, "{got}");
    assert_eq!(
        got["usage"]["completion_tokens"],
        want["usage"]["completion_tokens"]
    );
    assert!(
        rest[5]["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0),
        "the shared beginning was not read from the prompt cache: {}",
        rest[5]
    );
    drop(sock);
    let h = s.wait_health("the cancelled stream should leave the batch", |h| {
        h["cancelled"] == 1 && h["running"] == 0
    });
    assert_eq!(h["completed"], 8, "{h}");
    assert!(h["batch"]["largest"].as_u64().unwrap() >= 3, "{h}");
}

/// A streaming request on a raw socket, read up to its first event.
fn open_stream(base: &str, body: &Value) -> std::net::TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = sock.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream closed: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    sock
}

#[test]
fn overload_gets_503_with_retry_after_and_a_disconnect_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let (_, linear) = models(dir.path());
    let s = Server::start(
        &linear,
        &[
            "--concurrency",
            "1",
            "--queue",
            "0",
            "--max-tokens",
            "1000000",
        ],
    );
    // Far more tokens than the test will wait for; the SUPRA model has no context limit.
    let long = json!({"prompt": "once upon a time", "max_tokens": 1000000, "temperature": 0,
                      "stream": true});
    let sock = open_stream(&s.base, &long);
    let (status, body, retry) = s.post("/v1/completions", r#"{"prompt": "a", "max_tokens": 2}"#);
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "server_overloaded");

    drop(sock);
    let h = s.wait_health("the disconnected generation should end", |h| {
        h["cancelled"] == 1 && h["running"] == 0
    });
    assert_eq!(h["completed"], 0, "{h}");
    let (status, body, _) = s.post("/v1/completions", r#"{"prompt": "a", "max_tokens": 2}"#);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn prompt_cache_serves_the_next_turn_with_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (_, linear) = models(dir.path());
    let cached = Server::start(&linear, &[]);
    let fresh = Server::start(&linear, &["--prompt-cache", "0"]);
    let turn1 = json!({"messages": [{"role": "system", "content": "You answer in riddles."},
                                    {"role": "user", "content": "the weather"}],
                       "max_tokens": 12, "temperature": 0});
    let (status, v1) = cached.post_json("/v1/chat/completions", &turn1);
    assert_eq!(status, 200, "{v1}");
    let answer = v1["choices"][0]["message"]["content"].as_str().unwrap();
    let prompt1 = v1["usage"]["prompt_tokens"].as_u64().unwrap();
    let mut turn2 = turn1.clone();
    let msgs = turn2["messages"].as_array_mut().unwrap();
    msgs.push(json!({"role": "assistant", "content": answer}));
    msgs.push(json!({"role": "user", "content": "and tomorrow"}));
    let (_, v2) = cached.post_json("/v1/chat/completions", &turn2);
    let hit = v2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        hit >= prompt1,
        "turn 2 read {hit} cached tokens, turn 1's prompt has {prompt1}"
    );
    let (_, w2) = fresh.post_json("/v1/chat/completions", &turn2);
    assert_eq!(w2["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(v2["choices"][0]["message"], w2["choices"][0]["message"]);
    assert!(
        cached.get("/health")["prompt_cache"]["hits"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

/// Slow and stalled clients: half-sent headers are cut off after `--client-timeout`, those
/// beyond `--max-connections` wait for a slot and are cut off in their turn, a body announced
/// longer than it is gets 408, and the server keeps answering.
#[test]
fn slow_clients_are_cut_off_and_the_server_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, _) = models(dir.path());
    let s = Server::start(
        &teacher,
        &["--client-timeout", "1", "--max-connections", "4"],
    );
    let addr = s.base.trim_start_matches("http://").to_string();
    let t0 = Instant::now();
    let mut slow: Vec<std::net::TcpStream> = (0..6)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            c
        })
        .collect();
    for (i, c) in slow.iter_mut().enumerate() {
        // The server closes the connection (or answers 408 and closes it).
        let mut got = Vec::new();
        let closed = c.read_to_end(&mut got).is_ok();
        let text = String::from_utf8_lossy(&got);
        assert!(
            closed && (got.is_empty() || text.starts_with("HTTP/1.1 408")),
            "connection {i}: {text:?} after {:?}",
            t0.elapsed()
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());

    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100000\r\n\r\n{\"prompt\": \"a\",",
    )
    .unwrap();
    let mut head = [0u8; 64];
    let n = c.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head:?}");

    let (st, b, _) = s.post("/v1/completions", r#"{"prompt": "a", "max_tokens": 2}"#);
    assert_eq!(st, 200, "{b}");
}
