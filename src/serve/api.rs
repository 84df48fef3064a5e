//! The OpenAI wire format: request bodies (checked strictly: an option we do not implement is
//! an error, not silently ignored), response bodies and the error envelope.

use crate::io::tokenizer::{Message, Role};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// An error as OpenAI sends it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after: None,
        }
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some(code),
            ..Self::invalid(None, message)
        }
    }

    pub fn overloaded(retry_after: u64) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is busy: every generation slot and queue place is taken; \
                      retry later"
                .to_string(),
            kind: "server_overloaded",
            param: None,
            code: Some("server_overloaded"),
            retry_after: Some(retry_after),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Text or a list of one text (what OpenAI clients send as `prompt` or `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The options both endpoints share.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI's; llama.cpp's server and others take it.
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<usize>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logprobs: Option<serde_json::Value>,
    /// An end-user id for abuse monitoring: accepted, nothing to do with it here.
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(default)]
    pub echo: bool,
    pub best_of: Option<usize>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: Common,
    /// Whatever `Common` did not take: refused by name in [`refuse_unknown`].
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    pub common: Common,
    /// Whatever `Common` did not take: refused by name in [`refuse_unknown`].
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
    pub name: Option<String>,
}

/// A message's content: text, or a list of parts of which we take the text ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// Sampling and stopping, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// The names a server answers to (vLLM's `--served-model-name`): a request's `model` may be any
/// of them, since many clients send a fixed name; responses carry the first.
#[derive(Debug, Clone)]
pub struct ServedNames(Vec<String>);

impl ServedNames {
    pub fn new(names: Vec<String>) -> anyhow::Result<Self> {
        if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
            anyhow::bail!("a served model name must not be empty (got {names:?})");
        }
        Ok(Self(names))
    }

    /// The name responses and /health report.
    pub fn primary(&self) -> &str {
        &self.0[0]
    }

    pub fn all(&self) -> &[String] {
        &self.0
    }

    fn listed(&self) -> String {
        let quoted: Vec<String> = self.0.iter().map(|n| format!("'{n}'")).collect();
        quoted.join(", ")
    }
}

/// What the server allows; requests beyond are refused, not trimmed.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub max_prompt_tokens: usize,
}

impl Common {
    /// Checks the options against what we implement and the server's limits.
    pub fn settings(&self, limits: &Limits, served: &ServedNames) -> Result<Settings, ApiError> {
        if let Some(m) = self
            .model
            .as_deref()
            .filter(|m| !served.all().iter().any(|n| n == m))
        {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                code: Some("model_not_found"),
                ..ApiError::invalid(
                    Some("model"),
                    format!(
                        "the model '{m}' is not served here; this server serves {}",
                        served.listed()
                    ),
                )
            });
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    Some(name),
                    format!("{name} is not supported (only 0)"),
                ));
            }
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !(v.is_null() || *v == json!(false)))
        {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs are not supported",
            ));
        }
        let max_tokens = self.max_tokens.unwrap_or(limits.default_max_tokens);
        if max_tokens == 0 || max_tokens > limits.max_tokens {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "max_tokens must be between 1 and {} (this server's limit), got {max_tokens}",
                    limits.max_tokens
                ),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                Some("stop"),
                "stop takes up to 4 non-empty strings",
            ));
        }
        Ok(Settings {
            max_tokens,
            temperature,
            top_p,
            top_k: self.top_k.unwrap_or(0),
            seed: self.seed,
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// Fields we do not know are an error rather than silently ignored.
pub fn refuse_unknown(
    unknown: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ApiError> {
    match unknown.keys().next() {
        None => Ok(()),
        Some(k) => Err(ApiError::invalid(
            None,
            format!("unknown or unsupported field '{k}'"),
        )),
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<&str, ApiError> {
        refuse_unknown(&self.unknown)?;
        if self.echo || self.best_of.is_some_and(|b| b != 1) || self.suffix.is_some() {
            return Err(ApiError::invalid(
                None,
                "echo, best_of and suffix are not supported",
            ));
        }
        match &self.prompt {
            OneOrMany::One(s) => Ok(s),
            OneOrMany::Many(v) if v.len() == 1 => Ok(&v[0]),
            OneOrMany::Many(_) => Err(ApiError::invalid(
                Some("prompt"),
                "only one prompt per request is supported",
            )),
        }
    }
}

impl ChatRequest {
    pub fn messages(&self) -> Result<Vec<Message>, ApiError> {
        refuse_unknown(&self.unknown)?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid(Some("messages"), "messages is empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            format!(
                                "messages[{i}].role '{other}' is not supported \
                                 (system, developer, user, assistant)"
                            ),
                        ))
                    }
                };
                let content = match &m.content {
                    Content::Text(t) => t.clone(),
                    Content::Parts(parts) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::invalid(
                                        Some("messages"),
                                        format!(
                                            "messages[{i}]: content part of type '{kind}' is \
                                             not supported (text only)"
                                        ),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message { role, content })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
}

/// How many prompt tokens the prompt cache supplied (read in an earlier request).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptDetails {
    pub cached_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_tokens: 100,
            default_max_tokens: 16,
            max_prompt_tokens: 1000,
        }
    }

    fn names() -> ServedNames {
        ServedNames::new(vec!["m".into(), "gpt-4o-mini".into()]).unwrap()
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        let parse = |s: &str| serde_json::from_str::<CompletionRequest>(s);
        let r = parse(r#"{"prompt": "a", "frobnicate": 1}"#).unwrap();
        assert!(r.prompt().unwrap_err().message.contains("'frobnicate'"));
        let r = parse(r#"{"prompt": "a", "n": 2}"#).unwrap();
        assert_eq!(
            r.common.settings(&limits(), &names()).unwrap_err().param,
            Some("n")
        );
        let r = parse(r#"{"prompt": "a", "max_tokens": 101}"#).unwrap();
        let e = r.common.settings(&limits(), &names()).unwrap_err();
        assert_eq!(
            (e.status, e.param),
            (StatusCode::BAD_REQUEST, Some("max_tokens"))
        );
        let r = parse(r#"{"prompt": "a", "model": "gpt-4"}"#).unwrap();
        assert_eq!(
            r.common.settings(&limits(), &names()).unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        // Any of the served names is this model.
        let r = parse(r#"{"prompt": "a", "model": "gpt-4o-mini"}"#).unwrap();
        assert!(r.common.settings(&limits(), &names()).is_ok());
        assert!(ServedNames::new(vec![]).is_err());
        assert!(ServedNames::new(vec!["m".into(), " ".into()]).is_err());
        let r = parse(r#"{"prompt": ["a"], "model": "m", "stop": "x", "user": "u"}"#).unwrap();
        let s = r.common.settings(&limits(), &names()).unwrap();
        assert_eq!(
            (s.max_tokens, s.stop.as_slice()),
            (16, ["x".to_string()].as_slice())
        );
        assert_eq!(r.prompt().unwrap(), "a");
    }

    #[test]
    fn chat_messages_take_text_parts_and_known_roles() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"messages": [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages().unwrap(),
            vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "Hi")
            ]
        );
        let r: ChatRequest =
            serde_json::from_str(r#"{"messages": [{"role": "tool", "content": "x"}]}"#).unwrap();
        assert!(r.messages().unwrap_err().message.contains("'tool'"));
    }
}
