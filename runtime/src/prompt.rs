//! Chat prompts: the checkpoint chat template, image placeholders.
//!
//! Templates are Jinja, rendered the way the Hugging Face tokenizer renders them (trim_blocks,
//! lstrip_blocks, loop controls, `raise_exception`, Python string methods, `tojson` without
//! HTML escaping), so a checkpoint's own template gives the same text here as in Python.

use std::path::Path;

use minijinja::value::Value;
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::tokenizer::CHAT_TEMPLATE;
use crate::vision::preprocess::DecodedImage;

/// Marks where an image's tokens go; expanded to one pad per image token.
pub const IMAGE_PAD: &str = "<|image_pad|>";
pub const VISION_START: &str = "<|vision_start|>";
pub const VISION_END: &str = "<|vision_end|>";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    Text(String),
    Image(DecodedImage),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: vec![ContentPart::Text(text.into())],
        }
    }

    /// The images of this message, in order.
    pub fn images(&self) -> impl Iterator<Item = &DecodedImage> {
        self.content.iter().filter_map(|p| match p {
            ContentPart::Image(img) => Some(img),
            ContentPart::Text(_) => None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read the chat template from {path}: {message}")]
    Read { path: String, message: String },
    #[error("the chat template is invalid: {0}")]
    Template(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    #[error("the prompt has {markers} image markers but {images} images were given")]
    ImageCountMismatch { markers: usize, images: usize },
    #[error("message text must not contain the reserved marker {IMAGE_PAD}")]
    ReservedMarker,
}

/// A message as the template sees it: text-only content as a string, otherwise a list of
/// `{type: text, text}` / `{type: image}` parts (the shape OpenAI-style clients send).
#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: TemplateContent<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum TemplateContent<'a> {
    Text(&'a str),
    Parts(Vec<TemplatePart<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum TemplatePart<'a> {
    Text { text: &'a str },
    Image {},
}

impl<'a> From<&'a ChatMessage> for TemplateMessage<'a> {
    fn from(m: &'a ChatMessage) -> Self {
        let content = match m.content.as_slice() {
            [] => TemplateContent::Text(""),
            [ContentPart::Text(t)] => TemplateContent::Text(t),
            parts => TemplateContent::Parts(
                parts
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text(text) => TemplatePart::Text { text },
                        ContentPart::Image(_) => TemplatePart::Image {},
                    })
                    .collect(),
            ),
        };
        Self {
            role: m.role.as_str(),
            content,
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bytes", &self.source.len())
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles a Jinja chat template.
    pub fn new(source: impl Into<String>) -> Result<Self, PromptError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_filter("tojson", py_tojson);
        env.set_formatter(py_formatter);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| PromptError::Template(describe(&e)))?;
        Ok(Self { env, source })
    }

    /// The built-in ChatML template ([`CHAT_TEMPLATE`]).
    pub fn builtin() -> Self {
        Self::new(CHAT_TEMPLATE).expect("the built-in chat template compiles")
    }

    /// The checkpoint's template: `tokenizer_config.json` `chat_template` (a string, or a list
    /// of named templates of which `default` is used), else `chat_template.jinja`, else the
    /// built-in one.
    pub fn from_checkpoint(dir: &Path) -> Result<Self, PromptError> {
        let read = |name: &str| -> Result<Option<String>, PromptError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(PromptError::Read {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }),
            }
        };
        if let Some(text) = read("tokenizer_config.json")? {
            let config: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| PromptError::Read {
                    path: dir.join("tokenizer_config.json").display().to_string(),
                    message: e.to_string(),
                })?;
            if let Some(template) = template_from_config(&config) {
                return Self::new(template);
            }
        }
        if let Some(template) = read("chat_template.jinja")? {
            return Self::new(template);
        }
        Ok(Self::builtin())
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; each image becomes one `<|image_pad|>` between the vision
    /// markers (see [`expand_image_pads`]).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, PromptError> {
        let reserved = messages.iter().flat_map(|m| &m.content).any(|p| match p {
            ContentPart::Text(t) => t.contains(IMAGE_PAD),
            ContentPart::Image(_) => false,
        });
        if reserved {
            return Err(PromptError::ReservedMarker);
        }
        let messages: Vec<TemplateMessage> = messages.iter().map(TemplateMessage::from).collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| PromptError::Template(describe(&e)))?;
        template
            .render(context! {
                messages => Value::from_serialize(&messages),
                add_generation_prompt => add_generation_prompt,
                tools => Value::from(()),
                documents => Value::from(()),
            })
            .map_err(|e| PromptError::Render(describe(&e)))
    }
}

fn template_from_config(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => {
            let template = |entry: &serde_json::Value| {
                entry
                    .get("template")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            };
            named
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(template)
                .or_else(|| named.first().and_then(template))
        }
        _ => None,
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Prints `{{ value }}` as Jinja2 does: Python's `str()` for booleans, none and containers
/// (`True`, `None`, `['a', 1]`); everything else as usual.
fn py_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    match value.kind() {
        K::Bool | K::None | K::Seq | K::Map => {
            let mut text = String::new();
            py_repr(&mut text, value)?;
            out.write_str(&text)
                .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn py_repr(out: &mut String, v: &Value) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    match v.kind() {
        K::Undefined | K::None => out.push_str("None"),
        K::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        K::String => py_str_repr(out, v.as_str().unwrap_or_default()),
        K::Seq | K::Iterable => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &item)?;
            }
            out.push(']');
        }
        K::Map => {
            out.push('{');
            for (i, key) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &key)?;
                out.push_str(": ");
                py_repr(out, &v.get_item(&key)?)?;
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
    Ok(())
}

/// Python's `str.isprintable` for the characters chat text carries: controls, format
/// characters, separators other than the space, and private use are escaped by `repr`.
fn py_printable(c: char) -> bool {
    let n = c as u32;
    !(c.is_control()
        || matches!(
            n,
            0xa0 | 0xad
                | 0x600..=0x605
                | 0x61c
                | 0x6dd
                | 0x70f
                | 0x1680
                | 0x180e
                | 0x2000..=0x200f
                | 0x2028..=0x202f
                | 0x205f..=0x2064
                | 0x2066..=0x206f
                | 0x3000
                | 0xe000..=0xf8ff
                | 0xfeff
                | 0xfff9..=0xfffb
                | 0xf0000..
        ))
}

/// Python's `repr(str)`: single quotes unless only double quotes avoid escaping.
fn py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let n = c as u32;
                out.push_str(&match n {
                    0..=0xff => format!("\\x{n:02x}"),
                    0x100..=0xffff => format!("\\u{n:04x}"),
                    _ => format!("\\U{n:08x}"),
                });
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// `json.dumps` as the Hugging Face renderer calls it: no HTML escaping, non-ASCII kept,
/// `", "` / `": "` separators (`","` between items when indenting), keys in insertion order.
fn py_tojson(value: &Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(&mut out, value, indent, sort_keys.unwrap_or(false), 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_py_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number => match v.as_i64() {
            Some(i) if !v.to_string().contains('.') => out.push_str(&i.to_string()),
            _ => {
                let f = f64::try_from(v.clone())?;
                out.push_str(&serde_json::to_string(&f).unwrap_or_else(|_| "NaN".into()));
            }
        },
        K::String => out.push_str(&quote(v.as_str().unwrap_or_default())),
        K::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&quote(&k.to_string()));
                out.push_str(": ");
                write_py_json(out, &v.get_item(k)?, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        K::Seq | K::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(out, item, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialise a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

/// The messages exactly as the template receives them, as JSON (same key order).
pub fn template_messages_json(messages: &[ChatMessage]) -> String {
    let messages: Vec<TemplateMessage> = messages.iter().map(TemplateMessage::from).collect();
    serde_json::to_string(&messages).expect("template messages serialise")
}

/// Expands each image's single `<|image_pad|>` (between the vision markers, in document order)
/// to `counts[k]` pads.
pub fn expand_image_pads(text: &str, counts: &[usize]) -> Result<String, PromptError> {
    let marker = format!("{VISION_START}{IMAGE_PAD}{VISION_END}");
    let markers = text.matches(marker.as_str()).count();
    let pads = text.matches(IMAGE_PAD).count();
    if markers != counts.len() || pads != markers {
        return Err(PromptError::ImageCountMismatch {
            markers: pads,
            images: counts.len(),
        });
    }
    let extra: usize = counts
        .iter()
        .map(|c| c.saturating_sub(1) * IMAGE_PAD.len())
        .sum();
    let mut out = String::with_capacity(text.len() + extra);
    let mut pieces = text.split(marker.as_str());
    out.push_str(pieces.next().unwrap_or_default());
    for (piece, &count) in pieces.zip(counts) {
        out.push_str(VISION_START);
        for _ in 0..count {
            out.push_str(IMAGE_PAD);
        }
        out.push_str(VISION_END);
        out.push_str(piece);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> DecodedImage {
        DecodedImage::from_rgb(image::RgbImage::new(2, 2))
    }

    #[test]
    fn builtin_template_renders_chatml_with_image_markers() {
        let t = ChatTemplate::builtin();
        let messages = [
            ChatMessage::text(Role::System, "Be brief."),
            ChatMessage {
                role: Role::User,
                content: vec![
                    ContentPart::Text("What is this?".into()),
                    ContentPart::Image(image()),
                ],
            },
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is this?\
             <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn pads_expand_per_image_in_order() {
        let text = "a<|vision_start|><|image_pad|><|vision_end|>b<|vision_start|><|image_pad|><|vision_end|>";
        let out = expand_image_pads(text, &[2, 3]).unwrap();
        assert_eq!(
            out,
            format!(
                "a{VISION_START}{}{VISION_END}b{VISION_START}{}{VISION_END}",
                IMAGE_PAD.repeat(2),
                IMAGE_PAD.repeat(3)
            )
        );
        assert!(matches!(
            expand_image_pads(text, &[1]),
            Err(PromptError::ImageCountMismatch {
                markers: 2,
                images: 1
            })
        ));
    }

    #[test]
    fn reserved_marker_in_text_is_refused() {
        let t = ChatTemplate::builtin();
        let m = [ChatMessage::text(Role::User, "sneaky <|image_pad|>")];
        assert!(matches!(
            t.render(&m, true),
            Err(PromptError::ReservedMarker)
        ));
    }

    #[test]
    fn raise_exception_surfaces_as_render_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}").unwrap();
        let err = t.render(&[], false).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }
}
