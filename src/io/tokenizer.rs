//! Text ↔ token ids, built from `tokenizer.json` or from GGUF metadata, plus the chat template.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF `tokenizer.ggml.token_type` value of control tokens (`<|im_start|>` and friends).
const TOKEN_TYPE_CONTROL: i32 = 3;

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: &str) -> Self {
        Self {
            role,
            content: content.to_string(),
        }
    }
}

/// The chat formats we can render. Detected from the model's Jinja template rather than running
/// Jinja: the templates in the wild are a handful of fixed formats.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2). Some templates insert a default
    /// system message when none is given.
    ChatMl { default_system: Option<String> },
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (Llama 3).
    Llama3,
}

/// A rendered chat prompt in pieces: the template's own text, whose control-token strings
/// (`<|im_start|>`) are the control tokens, and the messages' content, which is plain text
/// whatever it contains, so that a user who types `<|im_end|>` cannot forge a turn boundary.
/// [`TextTokenizer::encode_prompt`] encodes it; [`Prompt::text`] is the string transformers'
/// `apply_chat_template` renders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    pieces: Vec<(Piece, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Piece {
    Template,
    Content,
}

impl Prompt {
    fn push(&mut self, kind: Piece, text: &str) -> &mut Self {
        match self.pieces.last_mut() {
            Some((k, t)) if *k == kind => t.push_str(text),
            _ if text.is_empty() => {}
            _ => self.pieces.push((kind, text.to_string())),
        }
        self
    }

    fn template(&mut self, text: &str) -> &mut Self {
        self.push(Piece::Template, text)
    }

    fn content(&mut self, text: &str) -> &mut Self {
        self.push(Piece::Content, text)
    }

    /// The whole prompt as one string.
    pub fn text(&self) -> String {
        self.pieces.iter().map(|(_, t)| t.as_str()).collect()
    }
}

impl ChatFormat {
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<|im_start|>") {
            Some(Self::ChatMl {
                default_system: chatml_default_system(template),
            })
        } else if template.contains("<|start_header_id|>") {
            Some(Self::Llama3)
        } else {
            None
        }
    }

    /// The prompt for one user turn, ending where the assistant's answer starts.
    pub fn render_user_turn(&self, user: &str, system: Option<&str>) -> Prompt {
        let mut messages: Vec<Message> = system
            .map(|s| Message::new(Role::System, s))
            .into_iter()
            .collect();
        messages.push(Message::new(Role::User, user));
        self.render(&messages)
    }

    /// A conversation, ending where the assistant's next answer starts.
    pub fn render(&self, messages: &[Message]) -> Prompt {
        let mut p = self.render_turns(messages);
        self.open_answer(&mut p);
        p
    }

    fn open_answer(&self, p: &mut Prompt) {
        p.template(match self {
            Self::ChatMl { .. } => "<|im_start|>assistant\n",
            Self::Llama3 => "<|start_header_id|>assistant<|end_header_id|>\n\n",
        });
    }

    /// The turns alone, without the opening of the assistant's answer: the prefix that
    /// [`Self::render`] of a longer conversation starts with.
    pub fn render_turns(&self, messages: &[Message]) -> Prompt {
        let mut p = Prompt::default();
        if let Self::ChatMl {
            default_system: Some(sys),
        } = self
        {
            if messages.first().is_none_or(|m| m.role != Role::System) {
                // The template's own literal: template text, not a message.
                p.template(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
            }
        }
        if *self == Self::Llama3 {
            p.template("<|begin_of_text|>");
        }
        for m in messages {
            self.turn(&mut p, m);
        }
        p
    }

    /// A user turn that continues a conversation already read up to and including the end of
    /// the assistant's last turn (a state saved with `--save-state`).
    pub fn render_next_turn(&self, user: &str) -> Prompt {
        let mut p = Prompt::default();
        if let Self::ChatMl { .. } = self {
            p.template("\n");
        }
        self.turn(&mut p, &Message::new(Role::User, user));
        self.open_answer(&mut p);
        p
    }

    fn turn(&self, p: &mut Prompt, m: &Message) {
        match self {
            Self::ChatMl { .. } => p
                .template(&format!("<|im_start|>{}\n", m.role.name()))
                .content(&m.content)
                .template("<|im_end|>\n"),
            Self::Llama3 => p
                .template(&format!(
                    "<|start_header_id|>{}<|end_header_id|>\n\n",
                    m.role.name()
                ))
                .content(&m.content)
                .template("<|eot_id|>"),
        };
    }

    fn end_of_turn(&self) -> &'static str {
        match self {
            Self::ChatMl { .. } => "<|im_end|>",
            Self::Llama3 => "<|eot_id|>",
        }
    }
}

/// SmolLM2's template hard-codes `'<|im_start|>system\nYou are ...<|im_end|>\n'` as a string
/// literal for conversations without a system turn.
fn chatml_default_system(template: &str) -> Option<String> {
    let start = template.find("'<|im_start|>system")? + "'<|im_start|>system".len();
    let rest = &template[start..];
    let rest = rest
        .strip_prefix("\\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let end = rest.find("<|im_end|>")?;
    let text = &rest[..end];
    // A literal, not an expression such as `' + message['content'] + '`.
    (!text.is_empty() && !text.contains(['\'', '{', '+'])).then(|| text.to_string())
}

#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// The model's chat template as shipped (Jinja source), kept to write it back on save.
    pub chat_template: Option<String>,
    /// `inner` with control-token strings read as plain text, for message content; built on
    /// first use.
    plain: std::sync::OnceLock<Tokenizer>,
}

impl TextTokenizer {
    /// Builds the gpt2-style BPE tokenizer described by GGUF metadata.
    pub fn from_gguf(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
        source: &str,
    ) -> Result<Self> {
        use crate::io::gguf::{md_get, md_str};
        let model = md_str(md, "tokenizer.ggml.model", source)?;
        if model != "gpt2" {
            bail!(
                "{source}: tokenizer model '{model}' is not supported (only 'gpt2' byte-level BPE)"
            );
        }
        let tokens = md_get(md, "tokenizer.ggml.tokens", source)?
            .to_vec()
            .map_err(|e| anyhow!("{source}: tokenizer.ggml.tokens: {e}"))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<Vec<String>>>()
            .map_err(|e| anyhow!("{source}: tokenizer.ggml.tokens: {e}"))?;
        let merges = match md.get("tokenizer.ggml.merges") {
            Some(v) => v
                .to_vec()
                .map_err(|e| anyhow!("{source}: tokenizer.ggml.merges: {e}"))?
                .iter()
                .map(|m| {
                    let m = m.to_string().map_err(|e| anyhow!("{e}"))?;
                    let (a, b) = m
                        .split_once(' ')
                        .ok_or_else(|| anyhow!("merge '{m}' is not two tokens"))?;
                    Ok((a.to_string(), b.to_string()))
                })
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("{source}: tokenizer.ggml.merges"))?,
            None => Vec::new(),
        };
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| anyhow!("{e}"))?
                .iter()
                .map(|t| t.to_i32())
                .collect::<candle_core::Result<_>>()
                .map_err(|e| anyhow!("{source}: tokenizer.ggml.token_type: {e}"))?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "{source}: tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}",
                types.len(),
                tokens.len()
            );
        }
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("{source}: building BPE tokenizer: {e}"))?;
        let mut tok = Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".to_string());
        tok.with_pre_tokenizer(Some(
            pre_tokenizer(&pre).with_context(|| source.to_string())?,
        ));
        tok.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        tok.add_special_tokens(&specials);

        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        if add_bos {
            let bos = bos_id.and_then(|i| tokens.get(i as usize)).ok_or_else(|| {
                anyhow!("{source}: add_bos_token is set but bos_token_id is not a valid token")
            })?;
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .map_err(|e| anyhow!("{e}"))?
                .special_tokens(vec![(bos.clone(), bos_id.unwrap())])
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            tok.with_post_processor(Some(post));
        }
        let chat_template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        Ok(Self {
            inner: tok,
            bos_id,
            eos_id,
            chat_template,
            plain: Default::default(),
        })
    }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` (chat template) from an
    /// HF-layout directory. The EOS/BOS ids come from the model config.
    pub fn from_hf_dir(dir: &Path, bos_id: Option<u32>, eos_id: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!(
                "{}: missing (an HF model directory needs tokenizer.json)",
                path.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        // JSON syntax first: the tokenizers crate panics (`expect("Helper")`) on a syntax
        // error inside the decoder section instead of returning it (found by `supra fuzz`).
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        let inner = text
            .parse::<Tokenizer>()
            .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let chat_template = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
            v.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        } else {
            None
        };
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            chat_template,
            plain: Default::default(),
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow!("serializing tokenizer: {e}"))?;
        crate::io::atomic_write(&dir.join("tokenizer.json"), json.as_bytes())?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let cfg = serde_json::json!({
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_id),
            "chat_template": self.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        crate::io::atomic_write(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )
    }

    /// Token ids of `text`, with BOS when the model's tokenizer adds one. Special-token strings in
    /// the text (`<|im_start|>`) become their ids, as in transformers.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a chat prompt: the template's text with its control tokens, each
    /// message's content as plain text (its `<|im_end|>` is the characters, not the token),
    /// then BOS where the tokenizer adds one, as [`Self::encode`] does. With
    /// `special_in_content`, the whole text is encoded as one string instead (transformers'
    /// `apply_chat_template` then tokenize), control-token strings in content included.
    pub fn encode_prompt(&self, prompt: &Prompt, special_in_content: bool) -> Result<Vec<u32>> {
        if special_in_content {
            return self.encode(&prompt.text());
        }
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let pieces = prompt
            .pieces
            .iter()
            .map(|(kind, text)| match kind {
                Piece::Template => self.inner.encode(text.as_str(), false),
                Piece::Content => plain.encode(text.as_str(), false),
            })
            .collect::<tokenizers::Result<Vec<_>>>()
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let whole = self
            .inner
            .post_process(tokenizers::Encoding::merge(pieces, true), None, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(whole.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The longest token's text in UTF-8 bytes: at least as many bytes as any token stands
    /// for (byte-level BPE spells one byte as one or two, SentencePiece a space as three).
    pub fn max_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(0)
    }

    /// Whether `other` maps every token string to the same id (added tokens included): two
    /// models' logits can only be compared position by position when it does.
    pub fn same_vocabulary(&self, other: &TextTokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    /// The largest id any text can tokenize to (added tokens included).
    pub fn max_id(&self) -> Option<u32> {
        self.inner.get_vocab(true).into_values().max()
    }

    pub fn chat_format(&self) -> Result<ChatFormat> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            anyhow!("this model has no chat template; use a plain --prompt without --chat")
        })?;
        ChatFormat::detect(template)
            .ok_or_else(|| anyhow!("unsupported chat template (known: ChatML, Llama 3)"))
    }

    /// Tokens that end generation: EOS, and the end-of-turn marker in chat mode.
    pub fn stop_ids(&self, chat: Option<&ChatFormat>) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id.into_iter().collect();
        if let Some(id) = chat.and_then(|c| self.inner.token_to_id(c.end_of_turn())) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// The pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names, as the HF tokenizer.json of the
/// same model defines it.
fn pre_tokenizer(name: &str) -> Result<PreTokenizerWrapper> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("{e}"))?
        .into())
    };
    Ok(match name {
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
        }
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "llama-bpe" | "llama3" => Sequence::new(vec![split(LLAMA3)?, byte_level(false)]).into(),
        "qwen2" => Sequence::new(vec![split(QWEN2)?, byte_level(false)]).into(),
        other => bail!(
            "tokenizer.ggml.pre '{other}' is not supported (known: smollm, starcoder, refact, gpt2, llama-bpe, qwen2)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_chat_template_default_system() {
        let t = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}";
        let f = ChatFormat::detect(t).unwrap();
        assert_eq!(
            f.render_user_turn("Hi", None).text(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            f.render_user_turn("Hi", Some("Be brief.")).text(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn qwen_style_template_has_no_literal_default() {
        let t = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}";
        assert_eq!(
            ChatFormat::detect(t),
            Some(ChatFormat::ChatMl {
                default_system: None
            })
        );
    }
}
