//! Text in and out: the model's `tokenizer.json` (through the `tokenizers` crate), its chat
//! template (rendered by `minijinja`), incremental detokenisation and stop strings.
//!
//! # Chat templates
//!
//! `tokenizer_config.json`'s `chat_template` (or `--chat-template FILE`) is rendered as
//! transformers renders it (`apply_chat_template`): Jinja with `trim_blocks` and
//! `lstrip_blocks`, loop controls (`break`, `continue`), `namespace`, Python's string and dict
//! methods (`strip`, `split`, `startswith`, `items`, ... through `minijinja-contrib`'s pycompat),
//! and transformers' extensions `raise_exception(msg)`, `tojson` (Python's `json.dumps`, non-ASCII
//! kept) and `strftime_now(format)`. Its variables are `messages`, `add_generation_prompt`,
//! `tools` (none), the tokenizer's special tokens (`bos_token`, `eos_token`, `pad_token`,
//! `unk_token`) and the request's `chat_template_kwargs` (such as Qwen3's `enable_thinking`).
//! A template that does not compile stops the server at startup; one that fails for a
//! conversation (`raise_exception`, a type error) is that request's 400, with the renderer's
//! message. The real Qwen3, DeepSeek-V2 and Mixtral templates render exactly what transformers
//! renders (`tests/fixtures/chat_templates.json`).
//!
//! **Plain fallback** (no `tokenizer_config.json` template and no `--chat-template`): each message
//! becomes `"{role}: {content}\n"`, followed by `"assistant: "`.
//!
//! # Control tokens come only from the template
//!
//! Before rendering, every spelling of a special token in what the client sent (roles and
//! contents) is replaced by a placeholder: a character of Unicode's Supplementary Private Use
//! Area-B that the template passes through as text. So are any such characters the client sent
//! itself, a head of the text that could end a special token begun by the template, and a tail that
//! could begin one. The rendered prompt is tokenised with special tokens recognised; each
//! placeholder is tokenised back from the client's original text with special-token parsing
//! off. So `<|im_end|>` typed by a user becomes the bytes of that string and cannot close its
//! turn or open a system one, while the template's own `<|im_end|>` is one control token; a
//! conversation without special-token spellings tokenises exactly as transformers tokenises the
//! rendered text. `/v1/completions` text prompts are client text too; a client that means to
//! send control tokens sends token ids.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};

/// One chat message, its content already flattened to text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message.
    #[cfg(test)]
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How a conversation is rendered, besides its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    /// Open the assistant's turn at the end (`add_generation_prompt`).
    pub add_generation_prompt: bool,
    /// Extra template variables (`chat_template_kwargs`, such as `enable_thinking`).
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            add_generation_prompt: true,
            kwargs: serde_json::Map::new(),
        }
    }
}

/// Why text could not become a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// The chat template failed for this conversation (its own `raise_exception`, or an error).
    #[error("the chat template failed to render this conversation: {0}")]
    Render(String),
    /// The tokenizer failed.
    #[error("the prompt could not be tokenized: {0}")]
    Tokenize(String),
    /// More special-token spellings than placeholders.
    #[error(
        "the messages spell special tokens more than {MAX_SHIELDED} times; send fewer of them"
    )]
    TooManySpecials,
}

/// Placeholders one prompt may use.
pub const MAX_SHIELDED: usize = 0xFFFE;
/// The first placeholder character (Supplementary Private Use Area-B).
const SHIELD_BASE: u32 = 0x10_0000;

fn is_shield_char(c: char) -> bool {
    u32::from(c) >= SHIELD_BASE
}

/// Client text with its special-token spellings replaced by placeholders, and the originals.
#[derive(Debug, Default)]
struct Shield<'a> {
    specials: &'a [String],
    originals: Vec<String>,
}

impl Shield<'_> {
    fn placeholder(&mut self, original: &str, out: &mut String) -> Result<(), TextError> {
        if self.originals.len() >= MAX_SHIELDED {
            return Err(TextError::TooManySpecials);
        }
        let c = char::from_u32(SHIELD_BASE + self.originals.len() as u32)
            .ok_or(TextError::TooManySpecials)?;
        self.originals.push(original.to_string());
        out.push(c);
        Ok(())
    }

    /// `s` with every special-token spelling, every placeholder-range character, a head that
    /// could end a special token and a tail that could begin one replaced by placeholders.
    fn shield(&mut self, s: &str) -> Result<String, TextError> {
        // A head that is a proper suffix of a special token, a tail that is a proper prefix.
        let head = self
            .specials
            .iter()
            .flat_map(|sp| {
                (1..sp.len())
                    .filter(|&k| sp.is_char_boundary(k))
                    .map(move |k| &sp[k..])
            })
            .filter(|suffix| s.starts_with(suffix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let tail = self
            .specials
            .iter()
            .flat_map(|sp| {
                (1..sp.len())
                    .filter(|&k| sp.is_char_boundary(k))
                    .map(move |k| &sp[..k])
            })
            .filter(|prefix| s.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let mut out = String::with_capacity(s.len());
        if head + tail >= s.len() && head + tail > 0 {
            self.placeholder(s, &mut out)?;
            return Ok(out);
        }
        if head > 0 {
            self.placeholder(&s[..head], &mut out)?;
        }
        let middle = &s[head..s.len() - tail];
        let mut i = 0;
        while i < middle.len() {
            let rest = &middle[i..];
            let special = self
                .specials
                .iter()
                .filter(|sp| rest.starts_with(sp.as_str()))
                .map(String::len)
                .max();
            if let Some(n) = special {
                self.placeholder(&rest[..n], &mut out)?;
                i += n;
                continue;
            }
            let c = rest.chars().next().expect("i is below the length");
            if is_shield_char(c) {
                self.placeholder(&rest[..c.len_utf8()], &mut out)?;
            } else {
                out.push(c);
            }
            i += c.len_utf8();
        }
        if tail > 0 {
            self.placeholder(&s[s.len() - tail..], &mut out)?;
        }
        Ok(out)
    }

    /// Splits rendered text into template text and (restored) client text.
    fn pieces(&self, rendered: &str) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for c in rendered.chars() {
            let index = u32::from(c)
                .checked_sub(SHIELD_BASE)
                .map(|i| i as usize)
                .filter(|&i| i < self.originals.len());
            match (index, out.last_mut()) {
                (Some(i), Some(Piece::Client(s))) => s.push_str(&self.originals[i]),
                (Some(i), _) => out.push(Piece::Client(self.originals[i].clone())),
                (None, Some(Piece::Template(s))) => s.push(c),
                (None, _) => out.push(Piece::Template(c.to_string())),
            }
        }
        out
    }
}

/// A piece of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Rendered text: special tokens in it are control tokens.
    Template(String),
    /// A special-token spelling (or a part of one) that the client sent: it stays text.
    Client(String),
}

/// How chat messages become a prompt.
pub enum ChatTemplate {
    /// A Jinja template.
    Jinja(Box<Environment<'static>>),
    /// The plain fallback (see the module docs).
    Plain,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChatTemplate::Jinja(_) => f.write_str("ChatTemplate::Jinja"),
            ChatTemplate::Plain => f.write_str("ChatTemplate::Plain"),
        }
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles a Jinja chat template, or says why it does not compile.
    pub fn parse(src: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, src.to_string())
            .map_err(|e| describe(&e))?;
        Ok(ChatTemplate::Jinja(Box::new(env)))
    }

    /// Renders `messages` to text (placeholders and all) with `vars` as extra variables.
    fn render_raw(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
        vars: &BTreeMap<String, String>,
    ) -> Result<String, TextError> {
        match self {
            ChatTemplate::Plain => {
                let mut out = String::new();
                for m in messages {
                    out.push_str(&m.role);
                    out.push_str(": ");
                    out.push_str(&m.content);
                    out.push('\n');
                }
                if opts.add_generation_prompt {
                    out.push_str("assistant: ");
                }
                Ok(out)
            }
            ChatTemplate::Jinja(env) => {
                let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
                ctx.insert("messages".into(), Value::from_serialize(messages));
                ctx.insert("tools".into(), Value::from(()));
                ctx.insert("documents".into(), Value::from(()));
                ctx.insert(
                    "add_generation_prompt".into(),
                    Value::from(opts.add_generation_prompt),
                );
                for (k, v) in vars {
                    ctx.insert(k.clone(), Value::from(v.as_str()));
                }
                for (k, v) in &opts.kwargs {
                    ctx.insert(k.clone(), Value::from_serialize(v));
                }
                let t = env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| TextError::Render(describe(&e)))?;
                t.render(ctx).map_err(|e| TextError::Render(describe(&e)))
            }
        }
    }
}

/// A renderer error in one line: what went wrong and where.
fn describe(e: &JinjaError) -> String {
    let mut msg = match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

/// transformers' `raise_exception(message)`: fails the render with the template's message.
fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `strftime_now(format)`: the current UTC time, formatted as C's `strftime`
/// formats it (`%Y %m %d %H %M %S %y %j %b %B %a %A %p %I %e %%`).
fn strftime_now(format: String) -> Result<String, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(&format, secs)
}

/// Formats Unix time `secs` (UTC) with a `strftime` pattern.
fn strftime(format: &str, secs: u64) -> Result<String, JinjaError> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem / 60 % 60, rem % 60);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = DAYS[(days.rem_euclid(7)) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        match spec {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            'm' => out.push_str(&format!("{month:02}")),
            'd' => out.push_str(&format!("{day:02}")),
            'e' => out.push_str(&format!("{day:>2}")),
            'j' => out.push_str(&format!("{yday:03}")),
            'H' => out.push_str(&format!("{hour:02}")),
            'I' => out.push_str(&format!("{hour12:02}")),
            'M' => out.push_str(&format!("{minute:02}")),
            'S' => out.push_str(&format!("{second:02}")),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'b' => out.push_str(&month_name[..3]),
            'B' => out.push_str(month_name),
            'a' => out.push_str(&weekday[..3]),
            'A' => out.push_str(weekday),
            '%' => out.push('%'),
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{other}"),
                ))
            }
        }
    }
    Ok(out)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// Python's `json.dumps`, with its `", "` and `": "` separators and non-ASCII text kept.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    let opts = JsonStyle {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_str(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(
    v: &Value,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> Result<(), JinjaError> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if style.indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_finite() {
                    // Python writes floats with a fraction or an exponent (`1.0`, `1e+20`).
                    let s = format!("{f:?}");
                    out.push_str(&s);
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f > 0.0 {
                    out.push_str("Infinity");
                } else {
                    out.push_str("-Infinity");
                }
            }
        }
        ValueKind::String => {
            write_json_str(v.as_str().unwrap_or_default(), style.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, style, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => k.to_string(),
                };
                write_json_str(&key, style.ensure_ascii, out);
                out.push_str(": ");
                write_json(&v.get_item(k)?, style, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

/// The model's tokenizer and chat template.
pub struct TextCodec {
    /// Recognises special tokens (for template text and decoding).
    tokenizer: tokenizers::Tokenizer,
    /// Treats special-token strings as plain text (for client text).
    client_tokenizer: tokenizers::Tokenizer,
    /// How chat messages become a prompt.
    pub template: ChatTemplate,
    /// Why the plain fallback is used, if it is.
    pub template_note: Option<String>,
    /// The special tokens' spellings, as template variables (`bos_token`, `eos_token`, ...).
    vars: BTreeMap<String, String>,
    /// Spellings of the tokenizer's special tokens.
    specials: Vec<String>,
    /// The longest token of the vocabulary, in bytes of its spelling.
    max_token_bytes: usize,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

/// A special token's spelling in `tokenizer_config.json`: a string, or `{"content": ...}`.
fn token_spelling(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .or_else(|| v.get("content").and_then(serde_json::Value::as_str))
        .map(str::to_string)
}

impl TextCodec {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a model directory;
    /// `template_file` (`--chat-template`) replaces the configured chat template.
    pub fn from_dir(dir: &Path, template_file: Option<&Path>) -> Result<TextCodec> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            anyhow::bail!(
                "{} is missing: serving text needs the model's tokenizer (gen-model writes one)",
                path.display()
            );
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("reading {}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", cfg_path.display()))?
        } else {
            serde_json::Value::Null
        };
        let mut vars = BTreeMap::new();
        for name in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(s) = cfg.get(name).and_then(token_spelling) {
                vars.insert(name.to_string(), s);
            }
        }
        let (source, origin) = match template_file {
            Some(f) => (
                Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading --chat-template {}", f.display()))?,
                ),
                format!("--chat-template {}", f.display()),
            ),
            None => (
                cfg.get("chat_template")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string),
                format!("the chat_template of {}", cfg_path.display()),
            ),
        };
        let (template, template_note) = match source {
            Some(src) => (
                ChatTemplate::parse(&src).map_err(|e| {
                    anyhow::anyhow!(
                        "{origin} does not compile: {e}; fix it or give another with \
                         --chat-template FILE"
                    )
                })?,
                None,
            ),
            None => (
                ChatTemplate::Plain,
                Some(format!(
                    "{} has no chat template; using the plain one (role: content lines); give \
                     one with --chat-template FILE",
                    if cfg.is_null() {
                        "the model (no tokenizer_config.json)".to_string()
                    } else {
                        cfg_path.display().to_string()
                    }
                )),
            ),
        };
        let mut client_tokenizer = tokenizer.clone();
        client_tokenizer.set_encode_special_tokens(true);
        let mut specials: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content.clone())
            .collect();
        specials.sort();
        specials.dedup();
        let max_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(TextCodec {
            tokenizer,
            client_tokenizer,
            template,
            template_note,
            vars,
            specials,
            max_token_bytes,
        })
    }

    /// Fewer tokens than `bytes` of text can never make: a quarter of what the longest token
    /// allows (the quarter leaves room for normalisers that shorten text). A prompt whose bound
    /// is already over the context is refused without tokenising it.
    pub fn min_tokens(&self, bytes: usize) -> usize {
        bytes / (self.max_token_bytes * 4)
    }

    /// Token ids of client text: special-token strings in it (such as `<|im_start|>`) stay
    /// text and never become control tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        encode_with(&self.client_tokenizer, text)
    }

    /// Token ids of trusted text (a command line's prompt): special-token spellings in it are
    /// control tokens, as in transformers' `tokenizer(text)`.
    pub fn encode_trusted(&self, text: &str) -> Result<Vec<u32>, TextError> {
        encode_with(&self.tokenizer, text)
    }

    /// `messages` rendered by the chat template, as pieces of template text and client text.
    pub fn render_pieces(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
    ) -> Result<Vec<Piece>, TextError> {
        let mut shield = Shield {
            specials: &self.specials,
            originals: Vec::new(),
        };
        let shielded = messages
            .iter()
            .map(|m| {
                Ok(ChatMessage {
                    role: shield.shield(&m.role)?,
                    content: shield.shield(&m.content)?,
                })
            })
            .collect::<Result<Vec<_>, TextError>>()?;
        let rendered = self.template.render_raw(&shielded, opts, &self.vars)?;
        Ok(shield.pieces(&rendered))
    }

    /// `messages` rendered by the chat template, as text (what transformers renders).
    #[cfg(test)]
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
    ) -> Result<String, TextError> {
        Ok(self
            .render_pieces(messages, opts)?
            .iter()
            .map(|p| match p {
                Piece::Template(s) | Piece::Client(s) => s.as_str(),
            })
            .collect())
    }

    /// Token ids of `messages` rendered by the chat template: only the template's own text
    /// yields control tokens.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
    ) -> Result<Vec<u32>, TextError> {
        let mut ids = Vec::new();
        for p in self.render_pieces(messages, opts)? {
            ids.extend(match &p {
                Piece::Template(t) => encode_with(&self.tokenizer, t)?,
                Piece::Client(t) => encode_with(&self.client_tokenizer, t)?,
            });
        }
        Ok(ids)
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The text of one token as logprobs report it (special tokens spelled out).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

fn encode_with(t: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, TextError> {
    t.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| TextError::Tokenize(e.to_string()))
}

/// Turns generated ids into text deltas incrementally, as transformers' and TGI's streaming
/// decoders do: each step decodes only the window from the last emitted boundary (`prefix`) to
/// the newest token, and emits what the newest tokens added to the text of the window's first
/// part. An incomplete UTF-8 sequence (decoded as U+FFFD at the end) is held back until the
/// tokens that finish it arrive. The window only grows while text is held back, so each step
/// costs O(1) amortised tokens, not the whole output.
#[derive(Debug, Default)]
pub struct Detokenizer {
    /// The window's tokens: `ids[..read]` were emitted, `ids[read..]` not yet.
    ids: Vec<u32>,
    read: usize,
}

impl Detokenizer {
    /// Adds a token and returns the new text, if any is complete.
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> String {
        self.ids.push(id);
        self.step(codec, false)
    }

    /// The text held back, at the end of the stream.
    pub fn finish(&mut self, codec: &TextCodec) -> String {
        self.step(codec, true)
    }

    fn step(&mut self, codec: &TextCodec, last: bool) -> String {
        let prefix_text = codec.decode(&self.ids[..self.read]);
        let new_text = codec.decode(&self.ids);
        if new_text.len() <= prefix_text.len()
            || !new_text.is_char_boundary(prefix_text.len())
            || (!last && new_text.ends_with('\u{FFFD}'))
        {
            return String::new();
        }
        let delta = new_text[prefix_text.len()..].to_string();
        // The newest tokens become the next window's prefix (they give the decoder the
        // context it needs, such as a leading space).
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        delta
    }
}

/// Most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// What [`StopMatcher::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStep {
    /// Text that can go out (possibly empty); generation goes on.
    Emit(String),
    /// A stop string matched: this text (before it, or through it with `include_stop`) goes out
    /// and generation ends.
    Stopped(String),
}

/// Matches stop strings across token boundaries. It holds back only the longest tail of the
/// text that could still begin a stop string, so no stop text is ever emitted and nothing else
/// is withheld. The stop string that completes first ends the text, wherever the token
/// boundaries fall.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    include_stop: bool,
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (non-empty strings); `include_stop` keeps the matched stop string
    /// in the output (vLLM's `include_stop_str_in_output`).
    pub fn new(stops: Vec<String>, include_stop: bool) -> StopMatcher {
        StopMatcher {
            stops,
            include_stop,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, delta: &str) -> StopStep {
        if self.stopped {
            return StopStep::Stopped(String::new());
        }
        if self.stops.is_empty() {
            return StopStep::Emit(delta.to_string());
        }
        self.pending.push_str(delta);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s.len())))
            // The stop string completed first wins (as if the text came a character at a
            // time), then the one that began first.
            .min_by_key(|&(at, len)| (at + len, at));
        if let Some((at, len)) = first {
            self.stopped = true;
            let end = if self.include_stop { at + len } else { at };
            let out = self.pending[..end].to_string();
            self.pending.clear();
            return StopStep::Stopped(out);
        }
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let out = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        StopStep::Emit(out)
    }

    /// The text held back, at the end of generation (no stop string matched).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests;
