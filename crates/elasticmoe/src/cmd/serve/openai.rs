//! OpenAI request shapes and their validation into generations.
//!
//! Every top-level field of a request is either implemented, refused with a 400 naming it
//! (unless it holds the value that means "off"), or unknown (also a 400 naming it): nothing is
//! silently ignored. The lists are [`SHARED_FIELDS`], [`COMPLETION_FIELDS`], [`CHAT_FIELDS`] and
//! [`REFUSED_FIELDS`]; docs/serve.md shows them.

use serde_json::{json, Map, Value};

use moe_engine::{FinishReason, RequestLimits, SamplingParams, TokenId};

use super::text::{
    ChatMessage, RenderOptions, TextCodec, TextError, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};

/// An OpenAI-style error: HTTP status, `type`, `param` and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// The offending field, if any.
    pub param: Option<String>,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            param: param.map(str::to_string),
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

impl From<TextError> for ApiError {
    fn from(e: TextError) -> ApiError {
        let param = match e {
            TextError::Render(_) | TextError::TooManySpecials => "messages",
            _ => "prompt",
        };
        ApiError::bad(Some(param), e.to_string())
    }
}

/// Fields both endpoints implement.
pub const SHARED_FIELDS: [&str; 15] = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stream",
    "stream_options",
    "n",
    "stop",
    "stop_token_ids",
    "logprobs",
    "user",
    "ignore_eos",
    "include_stop_str_in_output",
    "echo",
];
/// Fields only `/v1/completions` implements.
pub const COMPLETION_FIELDS: [&str; 1] = ["prompt"];
/// Fields only `/v1/chat/completions` implements.
pub const CHAT_FIELDS: [&str; 5] = [
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "chat_template_kwargs",
    "add_generation_prompt",
];
/// Fields refused with a 400 unless they hold the value that turns them off (given here).
pub const REFUSED_FIELDS: [(&str, &str); 24] = [
    ("suffix", "null"),
    ("best_of", "null or 1"),
    ("logit_bias", "null or {}"),
    ("presence_penalty", "null or 0"),
    ("frequency_penalty", "null or 0"),
    ("repetition_penalty", "null or 1"),
    ("top_k", "null, 0 or -1"),
    ("min_p", "null or 0"),
    ("tools", "null or []"),
    ("tool_choice", "null or \"none\""),
    ("parallel_tool_calls", "null"),
    ("functions", "null or []"),
    ("function_call", "null or \"none\""),
    ("response_format", "null or {\"type\": \"text\"}"),
    ("service_tier", "null or \"auto\""),
    ("store", "null or false"),
    ("metadata", "null"),
    ("modalities", "null or [\"text\"]"),
    ("audio", "null"),
    ("prediction", "null"),
    ("reasoning_effort", "null"),
    ("web_search_options", "null"),
    ("guided_json", "null"),
    ("guided_regex", "null"),
];

/// Most choices per request (`n`).
pub const MAX_N: u64 = 16;
/// Most `top_logprobs` in chat (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most `logprobs` in completions (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// Whether `v` is the value that turns refused field `name` off.
fn is_off(name: &str, v: &Value) -> bool {
    match (name, v) {
        (_, Value::Null) => true,
        ("best_of", v) => v.as_u64() == Some(1),
        ("logit_bias", Value::Object(m)) => m.is_empty(),
        ("presence_penalty" | "frequency_penalty" | "min_p", v) => v.as_f64() == Some(0.0),
        ("repetition_penalty", v) => v.as_f64() == Some(1.0),
        ("top_k", v) => matches!(v.as_i64(), Some(0 | -1)),
        ("tools" | "functions", Value::Array(a)) => a.is_empty(),
        ("tool_choice" | "function_call", Value::String(s)) => s == "none",
        ("response_format", v) => v.get("type").and_then(Value::as_str) == Some("text"),
        ("service_tier", Value::String(s)) => s == "auto",
        ("store", Value::Bool(b)) => !b,
        ("modalities", Value::Array(a)) => a.len() == 1 && a[0] == "text",
        _ => false,
    }
}

/// The endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// Checks that every field of `obj` is implemented by `endpoint` or refused in its off value.
pub fn check_fields(obj: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    for (k, v) in obj {
        let own = match endpoint {
            Endpoint::Completions => COMPLETION_FIELDS.contains(&k.as_str()),
            Endpoint::Chat => CHAT_FIELDS.contains(&k.as_str()),
        };
        if own || SHARED_FIELDS.contains(&k.as_str()) {
            continue;
        }
        if let Some((_, off)) = REFUSED_FIELDS.iter().find(|(n, _)| n == k) {
            if is_off(k, v) {
                continue;
            }
            return Err(ApiError::bad(
                Some(k),
                format!("{k} is not supported by this server (send {off}, or leave it out)"),
            ));
        }
        let other = match endpoint {
            Endpoint::Completions => CHAT_FIELDS.contains(&k.as_str()),
            Endpoint::Chat => COMPLETION_FIELDS.contains(&k.as_str()),
        };
        return Err(ApiError::bad(
            Some(k),
            if other {
                format!("{k} belongs to the other endpoint, not this one")
            } else {
                format!("unknown parameter {k}; docs/serve.md lists the supported ones")
            },
        ));
    }
    Ok(())
}

/// A validated generation request (both endpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Prompt token ids.
    pub prompt: Vec<TokenId>,
    /// Tokens to generate per choice.
    pub max_tokens: usize,
    /// Sampling of choice 0; choice `i` adds `i` to the seed.
    pub sampling: SamplingParams,
    /// Whether to stop at the model's end-of-sequence tokens.
    pub stop_at_eos: bool,
    /// More token ids that end generation (`stop_token_ids`).
    pub stop_token_ids: Vec<TokenId>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Keep the matched stop string in the text.
    pub include_stop: bool,
    /// Choices.
    pub n: usize,
    /// Report logprobs: `Some(k)` with `k` alternatives per token.
    pub logprobs: Option<usize>,
    /// Echo the prompt's text before the completion (completions only).
    pub echo: bool,
    /// Stream SSE.
    pub stream: bool,
    /// Usage chunk at the end of a stream.
    pub include_usage: bool,
    /// The client's `user` tag (logged).
    pub user: Option<String>,
}

impl Generation {
    /// The sampling of choice `i`.
    pub fn sampling_of(&self, i: usize) -> SamplingParams {
        match self.sampling {
            SamplingParams::Random {
                temperature,
                top_p,
                seed,
            } => SamplingParams::Random {
                temperature,
                top_p,
                seed: seed.wrapping_add(i as u64),
            },
            other => other,
        }
    }

    /// The sampling seed (of choice 0), for sampled generations.
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

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// Default `max_tokens` of `/v1/chat/completions` (capped by the room left in the context).
pub const DEFAULT_CHAT_TOKENS: usize = 128;

/// Parses a JSON body into an object, turning serde's error into a 400.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match parse_body::<Value>(body)? {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad(
            None,
            "the request body must be a JSON object",
        )),
    }
}

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

/// Parses `messages`: each an object with a `role` from [`ROLES`] and a `content` that is a
/// string, null, or a list of `{"type": "text", "text": ...}` parts (joined with newlines).
pub fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |msg: String| ApiError::bad(Some("messages"), msg);
    let Some(Value::Array(list)) = v else {
        return Err(bad(
            "messages must be a list of {role, content} objects".into()
        ));
    };
    if list.is_empty() {
        return Err(bad("messages is empty: send at least one message".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(bad(format!("messages[{i}] must be an object")));
        };
        for k in obj.keys() {
            if !matches!(k.as_str(), "role" | "content") {
                return Err(bad(format!(
                    "messages[{i}].{k} is not supported (tool calls and names are not); send \
                     role and content"
                )));
            }
        }
        let role = match obj.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            Some(Value::String(r)) => {
                return Err(bad(format!(
                    "messages[{i}].role is {r:?}; use one of {}",
                    ROLES.join(", ")
                )))
            }
            _ => {
                return Err(bad(format!(
                    "messages[{i}].role is missing or not a string"
                )))
            }
        };
        let content = match obj.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None if role == "assistant" => String::new(),
            None => return Err(bad(format!("messages[{i}].content is missing"))),
            Some(Value::Null) => return Err(bad(format!("messages[{i}].content is null"))),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    let ty = p.get("type").and_then(Value::as_str);
                    match (ty, p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                        (Some("text"), _) => {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}] is a text part without a text string"
                            )))
                        }
                        (Some(other), _) => {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}] has type {other:?}; only text parts \
                                 are supported"
                            )))
                        }
                        (None, _) => {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}] must be an object with a type"
                            )))
                        }
                    }
                }
                texts.join("\n")
            }
            Some(other) => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or a list of text parts, not {other}"
                )))
            }
        };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// The chat rendering options of a chat request (`add_generation_prompt`,
/// `chat_template_kwargs`).
pub fn render_options(obj: &Map<String, Value>) -> Result<RenderOptions, ApiError> {
    let mut opts = RenderOptions::default();
    match obj.get("add_generation_prompt") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => opts.add_generation_prompt = *b,
        Some(_) => {
            return Err(ApiError::bad(
                Some("add_generation_prompt"),
                "add_generation_prompt must be true or false",
            ))
        }
    }
    match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for k in m.keys() {
                if matches!(
                    k.as_str(),
                    "messages" | "add_generation_prompt" | "tools" | "documents"
                ) {
                    return Err(ApiError::bad(
                        Some("chat_template_kwargs"),
                        format!("chat_template_kwargs may not set {k}"),
                    ));
                }
            }
            opts.kwargs = m.clone();
        }
        Some(_) => {
            return Err(ApiError::bad(
                Some("chat_template_kwargs"),
                "chat_template_kwargs must be an object",
            ))
        }
    }
    Ok(opts)
}

/// Text bytes of a completion prompt (0 for token ids).
pub fn prompt_text_bytes(obj: &Map<String, Value>) -> usize {
    match obj.get("prompt") {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::len).sum(),
        _ => 0,
    }
}

/// The token ids of a completion's `prompt`: text, token ids, or a batch of exactly one of either.
pub fn prompt_ids(obj: &Map<String, Value>, codec: &TextCodec) -> Result<Vec<TokenId>, ApiError> {
    let bad = |m: String| ApiError::bad(Some("prompt"), m);
    let ids_of = |a: &[Value]| -> Result<Vec<TokenId>, ApiError> {
        a.iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| TokenId::try_from(n).ok())
                    .ok_or_else(|| bad(format!("prompt token {v} is not a token id")))
            })
            .collect()
    };
    match obj.get("prompt") {
        Some(Value::String(s)) => Ok(codec.encode(s)?),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) && !a.is_empty() => ids_of(a),
        Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
            Value::String(s) => Ok(codec.encode(s)?),
            Value::Array(ids) => ids_of(ids),
            other => Err(bad(format!(
                "prompt[0] must be text or token ids, not {other}"
            ))),
        },
        Some(Value::Array(a)) if a.is_empty() => {
            Err(bad("the prompt is empty: give at least one token".into()))
        }
        Some(Value::Array(a)) => Err(bad(format!(
            "send one prompt per request (got a batch of {}); use n for several choices",
            a.len()
        ))),
        None | Some(Value::Null) => Err(bad("prompt is missing".into())),
        Some(other) => Err(bad(format!(
            "prompt must be text, token ids, or a batch of one of either, not {other}"
        ))),
    }
}

fn u64_field(obj: &Map<String, Value>, k: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                Some(k),
                format!("{k} must be a non-negative integer, not {v}"),
            )
        }),
    }
}

fn f64_field(obj: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(Some(k), format!("{k} must be a number, not {v}"))),
    }
}

fn bool_field(obj: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::bad(
            Some(k),
            format!("{k} must be true or false, not {v}"),
        )),
    }
}

/// Parses `stop`: a string or a list of at most [`MAX_STOP_STRINGS`] non-empty strings of at most
/// [`MAX_STOP_BYTES`] bytes.
fn stop_strings(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError::bad(Some("stop"), m);
    let list: Vec<String> = match obj.get("stop") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("stop must hold strings, not {v}")))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(bad(format!("stop must be a string or a list, not {v}"))),
    };
    if list.len() > MAX_STOP_STRINGS {
        return Err(bad(format!(
            "stop has {} strings; at most {MAX_STOP_STRINGS} are allowed",
            list.len()
        )));
    }
    for s in &list {
        if s.is_empty() {
            return Err(bad("stop strings must not be empty".into()));
        }
        if s.len() > MAX_STOP_BYTES {
            return Err(bad(format!(
                "a stop string is {} bytes; at most {MAX_STOP_BYTES} are allowed",
                s.len()
            )));
        }
    }
    Ok(list)
}

/// Checks the fields both endpoints share and builds a [`Generation`] for `prompt`.
pub fn generation(
    obj: &Map<String, Value>,
    endpoint: Endpoint,
    prompt: Vec<TokenId>,
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
                "the prompt has {} tokens but the model's context holds {}; shorten it to at \
                 most {} tokens",
                prompt.len(),
                limits.max_context,
                limits.max_context - 1
            ),
        ));
    }
    let n = u64_field(obj, "n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad(
            Some("n"),
            format!("n is {n}; it must be between 1 and {MAX_N}"),
        ));
    }
    let stop = stop_strings(obj)?;
    let stop_token_ids = match obj.get("stop_token_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| TokenId::try_from(n).ok())
                    .filter(|&t| (t as usize) < limits.vocab_size)
                    .ok_or_else(|| {
                        ApiError::bad(
                            Some("stop_token_ids"),
                            format!(
                                "stop_token_ids holds {v}, not a token id of the vocabulary \
                                 (0..{})",
                                limits.vocab_size
                            ),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::bad(
                Some("stop_token_ids"),
                format!("stop_token_ids must be a list of token ids, not {v}"),
            ))
        }
    };
    let logprobs = match endpoint {
        Endpoint::Completions => match obj.get("logprobs") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(k) if k <= MAX_COMPLETION_LOGPROBS => Some(k as usize),
                _ => {
                    return Err(ApiError::bad(
                        Some("logprobs"),
                        format!(
                            "logprobs is {v}; give an integer from 0 to \
                             {MAX_COMPLETION_LOGPROBS} (alternatives per token)"
                        ),
                    ))
                }
            },
        },
        Endpoint::Chat => {
            let on = bool_field(obj, "logprobs")?.unwrap_or(false);
            let top = u64_field(obj, "top_logprobs")?;
            if top.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
                return Err(ApiError::bad(
                    Some("top_logprobs"),
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
                ));
            }
            if top.is_some_and(|k| k > 0) && !on {
                return Err(ApiError::bad(
                    Some("top_logprobs"),
                    "top_logprobs needs logprobs: true",
                ));
            }
            on.then(|| top.unwrap_or(0) as usize)
        }
    };
    let echo = bool_field(obj, "echo")?.unwrap_or(false);
    if echo && endpoint == Endpoint::Chat {
        return Err(ApiError::bad(
            Some("echo"),
            "echo is only for /v1/completions",
        ));
    }
    let room = limits.max_context - prompt.len();
    let default_max = match endpoint {
        Endpoint::Completions => DEFAULT_COMPLETION_TOKENS,
        Endpoint::Chat => DEFAULT_CHAT_TOKENS,
    };
    let (max_name, max_field) = match (obj.get("max_tokens"), obj.get("max_completion_tokens")) {
        (Some(v), _) if !v.is_null() => ("max_tokens", Some(v)),
        (_, Some(v)) if !v.is_null() => ("max_completion_tokens", Some(v)),
        _ => ("max_tokens", None),
    };
    let max_tokens = match max_field {
        None => default_max.min(room),
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| {
                ApiError::bad(
                    Some(max_name),
                    format!("{max_name} must be an integer, not {v}"),
                )
            })?;
            if n < 1 || n as u64 > limits.max_context as u64 {
                return Err(ApiError::bad(
                    Some(max_name),
                    format!(
                        "{max_name} is {n}; it must be between 1 and the model's context ({})",
                        limits.max_context
                    ),
                ));
            }
            n as usize
        }
    };
    let temperature = f64_field(obj, "temperature")?;
    let top_p = f64_field(obj, "top_p")?;
    let seed = u64_field(obj, "seed")?;
    if let Some(p) = top_p {
        if !p.is_finite() || p <= 0.0 || p > 1.0 {
            return Err(ApiError::bad(
                Some("top_p"),
                format!("top_p is {p}; it must be in (0, 1]"),
            ));
        }
    }
    let sampling = match temperature {
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
            top_p: top_p.unwrap_or(1.0) as f32,
            seed: seed.unwrap_or_else(fresh_seed),
        },
    };
    let stream = bool_field(obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| k.as_str() != "include_usage") {
                return Err(ApiError::bad(
                    Some("stream_options"),
                    format!("stream_options.{k} is not supported; only include_usage is"),
                ));
            }
            bool_field(o, "include_usage")
                .map_err(|_| {
                    ApiError::bad(
                        Some("stream_options"),
                        "stream_options.include_usage must be true or false",
                    )
                })?
                .unwrap_or(false)
        }
        Some(v) => {
            return Err(ApiError::bad(
                Some("stream_options"),
                format!("stream_options must be an object, not {v}"),
            ))
        }
    };
    if include_usage && !stream {
        return Err(ApiError::bad(
            Some("stream_options"),
            "stream_options is only allowed with stream: true",
        ));
    }
    let user = match obj.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.chars().take(256).collect()),
        Some(v) => {
            return Err(ApiError::bad(
                Some("user"),
                format!("user must be a string, not {v}"),
            ))
        }
    };
    if let Some(Value::String(_)) | None | Some(Value::Null) = obj.get("model") {
    } else {
        return Err(ApiError::bad(Some("model"), "model must be a string"));
    }
    Ok(Generation {
        prompt,
        max_tokens,
        sampling,
        stop_at_eos: !bool_field(obj, "ignore_eos")?.unwrap_or(false),
        stop_token_ids,
        stop,
        include_stop: bool_field(obj, "include_stop_str_in_output")?.unwrap_or(false),
        n: n as usize,
        logprobs,
        echo,
        stream,
        include_usage,
        user,
    })
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

    fn gen(v: Value, prompt: Vec<TokenId>) -> Result<Generation, ApiError> {
        let obj = v.as_object().unwrap().clone();
        check_fields(&obj, Endpoint::Completions)?;
        generation(&obj, Endpoint::Completions, prompt, &LIMITS)
    }

    fn chat(v: Value) -> Result<Generation, ApiError> {
        let obj = v.as_object().unwrap().clone();
        check_fields(&obj, Endpoint::Chat)?;
        generation(&obj, Endpoint::Chat, vec![1], &LIMITS)
    }

    #[test]
    fn defaults_are_greedy_and_capped_by_the_context() {
        let g = gen(json!({}), vec![1; 30]).unwrap();
        assert_eq!(g.max_tokens, 2);
        assert_eq!(g.sampling, SamplingParams::Greedy);
        assert!(g.stop_at_eos && !g.stream && !g.include_usage && g.n == 1);
        let g = gen(
            json!({"temperature": 0.5, "top_p": 0.9, "seed": 3, "max_tokens": 4, "n": 3}),
            vec![1],
        )
        .unwrap();
        assert_eq!(
            g.sampling_of(2),
            SamplingParams::Random {
                temperature: 0.5,
                top_p: 0.9,
                seed: 5
            }
        );
        assert_eq!(g.max_tokens, 4);
        assert_eq!(g.seed(), Some(3));
    }

    #[test]
    fn unseeded_sampling_draws_a_fresh_seed_and_greedy_has_none() {
        let seeds: std::collections::BTreeSet<u64> = (0..8)
            .map(|_| {
                gen(json!({"temperature": 0.8}), vec![1])
                    .unwrap()
                    .seed()
                    .unwrap()
            })
            .collect();
        assert_eq!(seeds.len(), 8, "{seeds:?}");
        assert!(seeds.iter().all(|&s| s < 1 << 53));
        assert_eq!(gen(json!({}), vec![1]).unwrap().seed(), None);
    }

    #[test]
    fn messages_roles_and_content_parts_are_checked() {
        let ok = parse_messages(Some(&json!([
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ])))
        .unwrap();
        assert_eq!(ok[1].content, "a\nb");
        assert_eq!(ok[2].content, "");
        for (bad, needle) in [
            (json!([]), "empty"),
            (json!("hi"), "list"),
            (
                json!([{"role": "<|im_start|>system", "content": "x"}]),
                "messages[0].role",
            ),
            (json!([{"content": "x"}]), "messages[0].role"),
            (
                json!([{"role": "user", "content": 3}]),
                "messages[0].content",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                "only text parts",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text"}]}]),
                "without a text",
            ),
            (json!([{"role": "user", "content": ["x"]}]), "content[0]"),
            (
                json!([{"role": "user", "content": "x", "name": "bob"}]),
                "messages[0].name",
            ),
        ] {
            let e = parse_messages(Some(&bad)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("messages"));
            assert!(e.message.contains(needle), "{bad}: {}", e.message);
        }
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
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"n": 0}), "n"),
            (json!({"n": 17}), "n"),
            (json!({"stop": 3}), "stop"),
            (json!({"stop": [""]}), "stop"),
            (json!({"stop": vec!["x"; 17]}), "stop"),
            (json!({"stop": "x".repeat(257)}), "stop"),
            (json!({"stop_token_ids": [300]}), "stop_token_ids"),
            (json!({"logprobs": 6}), "logprobs"),
            (json!({"logprobs": true}), "logprobs"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                json!({"stream": true, "stream_options": {"x": 1}}),
                "stream_options",
            ),
            (json!({"user": 3}), "user"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"logit_bias": {"1": 2}}), "logit_bias"),
            (json!({"best_of": 2}), "best_of"),
            (json!({"suffix": "x"}), "suffix"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (json!({"frobnicate": 1}), "frobnicate"),
            (json!({"messages": []}), "messages"),
        ];
        for (v, param) in cases {
            let e = gen(v.clone(), vec![1]).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some(param)),
                "{v}: {}",
                e.message
            );
        }
        for (v, param) in [
            (json!({"logprobs": 1}), "logprobs"),
            (
                json!({"top_logprobs": 21, "logprobs": true}),
                "top_logprobs",
            ),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (json!({"echo": true}), "echo"),
            (json!({"chat_template_kwargs": 3}), "chat_template_kwargs"),
            (json!({"prompt": "x"}), "prompt"),
        ] {
            let obj = v.as_object().unwrap().clone();
            let e = check_fields(&obj, Endpoint::Chat)
                .and_then(|()| render_options(&obj))
                .and_then(|_| generation(&obj, Endpoint::Chat, vec![1], &LIMITS))
                .unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}: {}", e.message);
        }
        let e = gen(json!({}), vec![1; 32]).unwrap_err();
        assert!(e.message.contains("at most 31"), "{}", e.message);
    }

    #[test]
    fn off_values_of_refused_fields_pass() {
        let g = gen(
            json!({"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                   "best_of": 1, "suffix": null, "tools": [], "tool_choice": "none",
                   "response_format": {"type": "text"}, "store": false, "top_k": -1}),
            vec![1],
        );
        assert!(g.is_ok(), "{g:?}");
        let g = chat(json!({"logprobs": true, "top_logprobs": 3, "user": "u1",
            "stop": ["a", "b"], "stream": true, "stream_options": {"include_usage": true},
            "max_completion_tokens": 5}))
        .unwrap();
        assert_eq!(g.logprobs, Some(3));
        assert_eq!(g.max_tokens, 5);
        assert_eq!(g.stop, ["a", "b"]);
        assert_eq!(g.user.as_deref(), Some("u1"));
        assert!(g.include_usage);
    }
}
