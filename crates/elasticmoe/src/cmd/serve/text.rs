//! Text in and out: the model's `tokenizer.json` (through the `tokenizers` crate) and its chat
//! template.
//!
//! # Chat templates
//!
//! `tokenizer_config.json`'s `chat_template` is Jinja. We render a small, documented subset, enough
//! for ChatML-style templates such as the one `gen-model` writes:
//!
//! - literal text;
//! - `{% for message in messages %} ... {% endfor %}` (one loop, not nested);
//! - `{% if add_generation_prompt %} ... {% endif %}` (always true for chat completions);
//! - inside the loop, `{{ message['role'] }}`, `{{ message["content"] }}`, `{{ message.role }}` and
//!   `{{ message.content }}`;
//! - whitespace control markers (`{%-`, `-%}`, `{{-`, `-}}`) trim neighbouring whitespace.
//!
//! A template that uses anything else (filters, conditions on roles, `raise_exception`, ...) is
//! not guessed at: the server falls back to the plain template below and says so at startup.
//!
//! **Plain fallback** (no template, or an unsupported one): each message becomes
//! `"{role}: {content}\n"`, followed by `"assistant: "`.

use std::path::Path;

use anyhow::{Context, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Role,
    Content,
    ForMessages(Vec<Piece>),
    IfGenerationPrompt(Vec<Piece>),
}

/// How chat messages become a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// A template from `tokenizer_config.json`, in the supported subset.
    Jinja(PieceList),
    /// The plain fallback (see the module docs).
    Plain,
}

/// A parsed template body (kept opaque).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceList(Vec<Piece>);

impl ChatTemplate {
    /// Parses a Jinja chat template in the supported subset, or says what it does not support.
    pub fn parse(src: &str) -> Result<ChatTemplate, String> {
        let tokens = lex(src)?;
        let mut pos = 0;
        let body = parse_block(&tokens, &mut pos, None)?;
        Ok(ChatTemplate::Jinja(PieceList(body)))
    }

    /// Renders `messages`, with the generation prompt (the assistant's turn) at the end.
    pub fn render(&self, messages: &[ChatMessage]) -> String {
        match self {
            ChatTemplate::Plain => {
                let mut out = String::new();
                for m in messages {
                    out.push_str(&m.role);
                    out.push_str(": ");
                    out.push_str(&m.content);
                    out.push('\n');
                }
                out.push_str("assistant: ");
                out
            }
            ChatTemplate::Jinja(list) => {
                let mut out = String::new();
                render(&list.0, messages, None, &mut out);
                out
            }
        }
    }
}

fn render(pieces: &[Piece], messages: &[ChatMessage], msg: Option<&ChatMessage>, out: &mut String) {
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Role => out.push_str(msg.map_or("", |m| m.role.as_str())),
            Piece::Content => out.push_str(msg.map_or("", |m| m.content.as_str())),
            Piece::ForMessages(body) => {
                for m in messages {
                    render(body, messages, Some(m), out);
                }
            }
            Piece::IfGenerationPrompt(body) => render(body, messages, msg, out),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Text(String),
    /// `{{ expr }}`
    Expr(String),
    /// `{% stmt %}`
    Stmt(String),
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while !rest.is_empty() {
        let next = [rest.find("{{"), rest.find("{%"), rest.find("{#")]
            .into_iter()
            .flatten()
            .min();
        let Some(start) = next else {
            push_text(&mut out, rest, trim_next, false);
            break;
        };
        let opener = &rest[start..start + 2];
        let close = match opener {
            "{{" => "}}",
            "{%" => "%}",
            _ => "#}",
        };
        let inner_start = start + 2;
        let trim_before = rest[inner_start..].starts_with('-');
        push_text(&mut out, &rest[..start], trim_next, trim_before);
        let Some(end_rel) = rest[inner_start..].find(close) else {
            return Err(format!("unclosed {opener} in the chat template"));
        };
        let end = inner_start + end_rel;
        let mut inner = &rest[inner_start..end];
        if let Some(s) = inner.strip_prefix('-') {
            inner = s;
        }
        trim_next = inner.ends_with('-');
        if let Some(s) = inner.strip_suffix('-') {
            inner = s;
        }
        let inner = inner.trim().to_string();
        match opener {
            "{{" => out.push(Tok::Expr(inner)),
            "{%" => out.push(Tok::Stmt(inner)),
            _ => {}
        }
        rest = &rest[end + 2..];
    }
    Ok(out)
}

fn push_text(out: &mut Vec<Tok>, text: &str, trim_start: bool, trim_end: bool) {
    let mut t = text;
    if trim_start {
        t = t.trim_start();
    }
    if trim_end {
        t = t.trim_end();
    }
    if !t.is_empty() {
        out.push(Tok::Text(t.to_string()));
    }
}

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

fn parse_block(toks: &[Tok], pos: &mut usize, until: Option<&str>) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    while *pos < toks.len() {
        let tok = &toks[*pos];
        *pos += 1;
        match tok {
            Tok::Text(t) => pieces.push(Piece::Text(t.clone())),
            Tok::Expr(e) => pieces.push(match field_of(e) {
                Some("role") => Piece::Role,
                Some("content") => Piece::Content,
                _ => return Err(format!("unsupported expression {{{{ {e} }}}}")),
            }),
            Tok::Stmt(s) => match words(s).as_slice() {
                ["for", "message", "in", "messages"] => {
                    if until.is_some() {
                        return Err("nested blocks are not supported".into());
                    }
                    let body = parse_block(toks, pos, Some("endfor"))?;
                    pieces.push(Piece::ForMessages(body));
                }
                ["if", "add_generation_prompt"] => {
                    if until.is_some() {
                        return Err("nested blocks are not supported".into());
                    }
                    let body = parse_block(toks, pos, Some("endif"))?;
                    pieces.push(Piece::IfGenerationPrompt(body));
                }
                [end] if Some(*end) == until => return Ok(pieces),
                _ => return Err(format!("unsupported statement {{% {s} %}}")),
            },
        }
    }
    match until {
        Some(end) => Err(format!("missing {{% {end} %}}")),
        None => Ok(pieces),
    }
}

/// `message['role']`, `message["role"]` or `message.role` → `role`.
fn field_of(expr: &str) -> Option<&str> {
    let e = expr.trim();
    if let Some(f) = e.strip_prefix("message.") {
        return Some(f.trim());
    }
    let inner = e.strip_prefix("message[")?.strip_suffix(']')?.trim();
    inner
        .strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
}

/// The model's tokenizer and chat template.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    /// How chat messages become a prompt.
    pub template: ChatTemplate,
    /// Why the plain fallback is used, if it is.
    pub template_note: Option<String>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

impl TextCodec {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<TextCodec> {
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
        let (template, template_note) = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", cfg_path.display()))?;
            match v.get("chat_template").and_then(|t| t.as_str()) {
                Some(src) => match ChatTemplate::parse(src) {
                    Ok(t) => (t, None),
                    Err(e) => (
                        ChatTemplate::Plain,
                        Some(format!(
                            "the chat template in {} is outside the supported subset ({e}); \
                             using the plain template",
                            cfg_path.display()
                        )),
                    ),
                },
                None => (
                    ChatTemplate::Plain,
                    Some(format!(
                        "{} has no chat_template; using the plain template",
                        cfg_path.display()
                    )),
                ),
            }
        } else {
            (
                ChatTemplate::Plain,
                Some("no tokenizer_config.json; using the plain chat template".into()),
            )
        };
        Ok(TextCodec {
            tokenizer,
            template,
            template_note,
        })
    }

    /// Token ids of `text` (special tokens written in the text, such as `<|im_start|>`, are
    /// recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("the prompt could not be tokenized: {e}"))
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}

/// Turns a growing list of generated ids into text deltas, holding back an incomplete UTF-8
/// sequence (shown as U+FFFD) until the tokens that finish it arrive.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    sent: usize,
}

impl Detokenizer {
    /// Adds a token and returns the new text, if any is complete.
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> String {
        self.ids.push(id);
        let text = codec.decode(&self.ids);
        if text.ends_with('\u{FFFD}') {
            return String::new();
        }
        self.take(text)
    }

    /// The text held back, at the end of the stream.
    pub fn finish(&mut self, codec: &TextCodec) -> String {
        let text = codec.decode(&self.ids);
        self.take(text)
    }

    fn take(&mut self, text: String) -> String {
        if text.len() < self.sent || !text.is_char_boundary(self.sent) {
            return String::new();
        }
        let delta = text[self.sent..].to_string();
        self.sent = text.len();
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ]
    }

    #[test]
    fn renders_gen_models_chatml_template() {
        let t = ChatTemplate::parse(moe_model::synth::CHAT_TEMPLATE).unwrap();
        assert_eq!(
            t.render(&msgs()),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn whitespace_control_and_attribute_access() {
        let t = ChatTemplate::parse(
            "{%- for message in messages -%}\n  [{{- message.role -}}] {{ message[\"content\"] }}\n\
             {%- endfor %}{% if add_generation_prompt %}>{% endif %}",
        )
        .unwrap();
        assert_eq!(t.render(&msgs()), "[system] Be brief.[user] Hi>");
    }

    #[test]
    fn unsupported_templates_are_refused_not_guessed() {
        for bad in [
            "{{ bos_token }}",
            "{% for m in messages %}{% endfor %}",
            "{% for message in messages %}{% if message.role == 'user' %}x{% endif %}{% endfor %}",
            "{% for message in messages %}",
            "{{ message.content | trim }",
        ] {
            assert!(ChatTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_fallback_is_documented_format() {
        assert_eq!(
            ChatTemplate::Plain.render(&msgs()),
            "system: Be brief.\nuser: Hi\nassistant: "
        );
    }
}
