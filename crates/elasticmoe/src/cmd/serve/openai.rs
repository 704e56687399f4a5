//! OpenAI request and response shapes, and their validation into engine requests.

use serde::Deserialize;
use serde_json::{json, Value};

use moe_engine::{FinishReason, RequestLimits, SamplingParams, TokenId};

use super::text::{ChatMessage, TextCodec};

/// An OpenAI-style error: HTTP status, `type`, `param` and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// The offending field, if any.
    pub param: Option<&'static str>,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            param,
            message: message.into(),
        }
    }

    /// Another status.
    pub fn with_status(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            param: None,
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        })
    }
}

/// `prompt` of `/v1/completions`: text, token ids, or a batch of one of either.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<TokenId>),
    /// A batch of texts (one is accepted).
    Texts(Vec<String>),
    /// A batch of id lists (one is accepted).
    IdLists(Vec<Vec<TokenId>>),
}

/// The sampling and length fields both endpoints share.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CommonParams {
    /// The model name (optional; any value is accepted and echoed).
    #[serde(default)]
    pub model: Option<String>,
    /// Tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<Value>,
    /// Chat's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<Value>,
    /// 0 or absent: greedy.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stream SSE chunks.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `{"include_usage": true}` adds a usage chunk before `[DONE]`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Choices per prompt (only 1).
    #[serde(default)]
    pub n: Option<u64>,
    /// Stop strings (not supported; null or empty only).
    #[serde(default)]
    pub stop: Option<Value>,
    /// Logprobs (not supported; null, false or 0 only).
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Do not stop at the model's end-of-sequence tokens (a vLLM extension).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `/v1/completions` body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: PromptInput,
    /// The rest.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// `/v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// The rest.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// A validated generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Prompt token ids.
    pub prompt: Vec<TokenId>,
    /// Tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Whether to stop at end-of-sequence tokens.
    pub stop_at_eos: bool,
    /// Stream SSE.
    pub stream: bool,
    /// Usage chunk at the end of a stream.
    pub include_usage: bool,
}

impl Generation {
    /// The sampling seed, for sampled generations.
    pub fn seed(&self) -> Option<u64> {
        match self.sampling {
            SamplingParams::Random { seed, .. } => Some(seed),
            _ => None,
        }
    }
}

/// A fresh sampling seed, for sampled requests that did not give one.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    // JSON numbers above 2^53 lose precision in JavaScript clients; keep seeds below it.
    h.finish() >> 11
}

/// Chat roles a message may have.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks that `messages` is not empty and every role is one of [`ROLES`].
pub fn check_messages(messages: &[ChatMessage]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad(
            Some("messages"),
            "messages is empty: send at least one message",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad(
                Some("messages"),
                format!(
                    "messages[{i}].role is {:?}; use one of {}",
                    m.role,
                    ROLES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// Default `max_tokens` of `/v1/chat/completions` (capped by the room left in the context).
pub const DEFAULT_CHAT_TOKENS: usize = 128;

/// Parses a JSON body into `T`, turning serde's error into a 400.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad(
            None,
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(
            None,
            format!("the request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

impl CompletionRequest {
    /// Bytes of text in the prompt (0 for token ids).
    pub fn text_bytes(&self) -> usize {
        match &self.prompt {
            PromptInput::Text(t) => t.len(),
            PromptInput::Texts(ts) => ts.iter().map(String::len).sum(),
            PromptInput::Ids(_) | PromptInput::IdLists(_) => 0,
        }
    }

    /// The prompt's token ids.
    pub fn prompt_ids(&self, codec: &TextCodec) -> Result<Vec<TokenId>, ApiError> {
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(ApiError::bad(
                    Some("prompt"),
                    format!("send one prompt per request (got a batch of {n})"),
                ))
            }
        };
        match &self.prompt {
            PromptInput::Text(t) => codec
                .encode(t)
                .map_err(|e| ApiError::bad(Some("prompt"), e)),
            PromptInput::Ids(ids) => Ok(ids.clone()),
            PromptInput::Texts(ts) => {
                one(ts.len())?;
                codec
                    .encode(&ts[0])
                    .map_err(|e| ApiError::bad(Some("prompt"), e))
            }
            PromptInput::IdLists(ls) => {
                one(ls.len())?;
                Ok(ls[0].clone())
            }
        }
    }
}

impl CommonParams {
    /// Checks the fields and builds a [`Generation`] for `prompt`.
    pub fn generation(
        &self,
        prompt: Vec<TokenId>,
        default_max: usize,
        limits: &RequestLimits,
    ) -> Result<Generation, ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::bad(
                Some("prompt"),
                "the prompt is empty: give at least one token",
            ));
        }
        if prompt.len() >= limits.max_context {
            return Err(ApiError::bad(
                Some("prompt"),
                format!(
                    "the prompt has {} tokens but the model's context holds {}; shorten it to \
                     at most {} tokens",
                    prompt.len(),
                    limits.max_context,
                    limits.max_context - 1
                ),
            ));
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad(
                    Some("n"),
                    format!("n is {n}; only n = 1 is supported"),
                ));
            }
        }
        match &self.stop {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(ApiError::bad(
                    Some("stop"),
                    "stop strings are not supported by this server; the model's end-of-sequence \
                     tokens stop generation",
                ))
            }
        }
        match &self.logprobs {
            None | Some(Value::Null | Value::Bool(false)) => {}
            Some(Value::Number(n)) if n.as_u64() == Some(0) => {}
            Some(_) => {
                return Err(ApiError::bad(
                    Some("logprobs"),
                    "logprobs are not supported by this server",
                ))
            }
        }
        let room = limits.max_context - prompt.len();
        let max_field = self
            .max_tokens
            .as_ref()
            .or(self.max_completion_tokens.as_ref());
        let max_tokens = match max_field {
            None | Some(Value::Null) => default_max.min(room),
            Some(v) => {
                let n = v.as_i64().ok_or_else(|| {
                    ApiError::bad(
                        Some("max_tokens"),
                        format!("max_tokens must be an integer, not {v}"),
                    )
                })?;
                if n < 1 || n as u64 > limits.max_context as u64 {
                    return Err(ApiError::bad(
                        Some("max_tokens"),
                        format!(
                            "max_tokens is {n}; it must be between 1 and the model's context ({})",
                            limits.max_context
                        ),
                    ));
                }
                n as usize
            }
        };
        let sampling = match self.temperature {
            Some(t) if !t.is_finite() || !(0.0..=2.0).contains(&t) => {
                return Err(ApiError::bad(
                    Some("temperature"),
                    format!("temperature is {t}; it must be between 0 and 2"),
                ))
            }
            None => SamplingParams::Greedy,
            Some(t) if t <= 0.0 => SamplingParams::Greedy,
            Some(t) => SamplingParams::Random {
                temperature: t as f32,
                top_p: self.top_p.unwrap_or(1.0) as f32,
                seed: self.seed.unwrap_or_else(fresh_seed),
            },
        };
        if let Some(p) = self.top_p {
            if !p.is_finite() || p <= 0.0 || p > 1.0 {
                return Err(ApiError::bad(
                    Some("top_p"),
                    format!("top_p is {p}; it must be in (0, 1]"),
                ));
            }
        }
        Ok(Generation {
            prompt,
            max_tokens,
            sampling,
            stop_at_eos: !self.ignore_eos.unwrap_or(false),
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        })
    }
}

/// OpenAI's `finish_reason` for an engine finish: `stop`, `length`, `abort` (cancelled at
/// shutdown) or `error` (the engine failed, or the KV cache ran out mid-stream).
pub fn finish_reason(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Stop(_) => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::Cancelled => "abort",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        vocab_size: 300,
        max_context: 32,
    };

    fn common(v: Value) -> CommonParams {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_are_greedy_and_capped_by_the_context() {
        let g = common(json!({}))
            .generation(vec![1; 30], 16, &LIMITS)
            .unwrap();
        assert_eq!(g.max_tokens, 2);
        assert_eq!(g.sampling, SamplingParams::Greedy);
        assert!(g.stop_at_eos && !g.stream && !g.include_usage);
        let g = common(json!({"temperature": 0.5, "top_p": 0.9, "seed": 3, "max_tokens": 4}))
            .generation(vec![1], 16, &LIMITS)
            .unwrap();
        assert_eq!(
            g.sampling,
            SamplingParams::Random {
                temperature: 0.5,
                top_p: 0.9,
                seed: 3
            }
        );
        assert_eq!(g.max_tokens, 4);
        assert_eq!(g.seed(), Some(3));
    }

    #[test]
    fn unseeded_sampling_draws_a_fresh_seed_and_greedy_has_none() {
        let seeds: std::collections::BTreeSet<u64> = (0..8)
            .map(|_| {
                common(json!({"temperature": 0.8}))
                    .generation(vec![1], 16, &LIMITS)
                    .unwrap()
                    .seed()
                    .unwrap()
            })
            .collect();
        assert_eq!(seeds.len(), 8, "{seeds:?}");
        assert!(seeds.iter().all(|&s| s < 1 << 53));
        let g = common(json!({})).generation(vec![1], 16, &LIMITS).unwrap();
        assert_eq!(g.seed(), None);
    }

    #[test]
    fn roles_are_checked() {
        let m = |role: &str| ChatMessage {
            role: role.into(),
            content: "x".into(),
        };
        assert!(check_messages(&[m("system"), m("user")]).is_ok());
        assert_eq!(check_messages(&[]).unwrap_err().param, Some("messages"));
        let e = check_messages(&[m("user"), m("<|im_start|>system")]).unwrap_err();
        assert!(e.message.contains("messages[1].role"), "{}", e.message);
    }

    #[test]
    fn bad_fields_name_the_parameter() {
        let cases = [
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": -3}), "max_tokens"),
            (json!({"max_tokens": 33}), "max_tokens"),
            (json!({"max_tokens": "ten"}), "max_tokens"),
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"n": 2}), "n"),
            (json!({"stop": ["x"]}), "stop"),
            (json!({"logprobs": 3}), "logprobs"),
        ];
        for (v, param) in cases {
            let e = common(v.clone())
                .generation(vec![1], 16, &LIMITS)
                .unwrap_err();
            assert_eq!(
                (e.status, e.param),
                (400, Some(param)),
                "{v}: {}",
                e.message
            );
        }
        let e = common(json!({}))
            .generation(vec![1; 32], 16, &LIMITS)
            .unwrap_err();
        assert!(e.message.contains("at most 31"), "{}", e.message);
    }
}
