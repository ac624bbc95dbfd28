//! OpenAI chat-completion request and response shapes, and the validation that turns a request
//! into something the engine can run (or into a 400 that says what to fix).
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;

/// Stop strings: OpenAI allows at most 4.
pub const MAX_STOP: usize = 4;
pub const MAX_STOP_CHARS: usize = 256;

/// The request as sent. Fields whose JSON shape varies (`content`, `stop`) stay `Value` and are
/// checked by hand so that errors name the exact place and the accepted shapes.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<RequestMessage>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: RequestRole,
    #[serde(default)]
    pub content: Option<Value>,
}

/// A validated message part; images are still URLs here (resolved and decoded later).
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    ImageUrl(String),
}

#[derive(Debug, Clone)]
pub struct Message {
    /// `developer` is folded into `system` (the chat template knows no other).
    pub role: RequestRole,
    pub parts: Vec<Part>,
}

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

impl ChatRequest {
    pub fn image_count(&self) -> usize {
        self.messages
            .iter()
            .flat_map(|m| &m.parts)
            .filter(|p| matches!(p, Part::ImageUrl(_)))
            .count()
    }
}

/// Parses the body: UTF-8, JSON, then the typed shape; errors name the offending field.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "invalid_json",
            "the request body is empty; send a JSON object with `messages`",
        ));
    }
    if let Err(e) = std::str::from_utf8(body) {
        return Err(ApiError::invalid(
            "invalid_encoding",
            format!(
                "the request body is not valid UTF-8 (invalid byte at offset {}); encode the JSON as UTF-8",
                e.valid_up_to()
            ),
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "invalid_json",
            "the request body must be a JSON object with `messages`",
        ));
    }
    let req: ChatCompletionRequest = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let param = if path == "." { None } else { Some(path) };
        let message = match &param {
            Some(p) => format!("invalid value for `{p}`: {inner}"),
            None => format!("invalid request: {inner}"),
        };
        let err = ApiError::invalid("invalid_value", message);
        match param {
            Some(p) => err.with_param(p),
            None => err,
        }
    })?;
    validate(req)
}

fn validate(req: ChatCompletionRequest) -> Result<ChatRequest, ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported(
            "n",
            "only n=1 is supported; send one request per completion you need",
        ));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "tools",
            "tool calling is not supported by this server; remove `tools`",
        ));
    }
    if let Some(choice) = &req.tool_choice {
        if !(choice.is_null() || choice == "none") {
            return Err(ApiError::unsupported(
                "tool_choice",
                "tool calling is not supported by this server; remove `tool_choice`",
            ));
        }
    }
    if req.logprobs == Some(true) || req.top_logprobs.is_some() {
        return Err(ApiError::unsupported(
            "logprobs",
            "log probabilities are not supported; remove `logprobs`/`top_logprobs`",
        ));
    }
    if let Some(rf) = &req.response_format {
        let kind = rf.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::unsupported(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    for (name, v) in [
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::unsupported(
                name,
                format!("`{name}` is not supported; omit it or send 0"),
            ));
        }
    }
    if req.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::unsupported(
            "logit_bias",
            "`logit_bias` is not supported; omit it",
        ));
    }
    let stream = req.stream.unwrap_or(false);
    if req.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let max_tokens = match (req.max_tokens, req.max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid_param(
                "max_completion_tokens",
                format!(
                    "`max_tokens` ({a}) and `max_completion_tokens` ({b}) disagree; send only one"
                ),
            ))
        }
        (a, b) => b.or(a),
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    check_range("temperature", req.temperature, 0.0, 2.0, true)?;
    check_range("top_p", req.top_p, 0.0, 1.0, false)?;
    check_range("min_p", req.min_p, 0.0, 1.0, true)?;
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 && k <= i64::from(u32::MAX) => Some(k as u32),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be a positive integer, or 0/-1 to disable it (got {k})"),
            ))
        }
    };
    let stop = parse_stop(req.stop.as_ref())?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    let messages = req
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| convert_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ChatRequest {
        model: req.model,
        messages,
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k,
        min_p: req.min_p,
        seed: req.seed,
        stop,
        stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn check_range(
    name: &str,
    v: Option<f32>,
    lo: f32,
    hi: f32,
    lo_inclusive: bool,
) -> Result<(), ApiError> {
    if let Some(v) = v {
        let ok = v.is_finite() && (if lo_inclusive { v >= lo } else { v > lo }) && v <= hi;
        if !ok {
            let open = if lo_inclusive { "[" } else { "(" };
            return Err(ApiError::invalid_param(
                name,
                format!("`{name}` must be in {open}{lo}, {hi}] (got {v})"),
            ));
        }
    }
    Ok(())
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = |msg: String| ApiError::invalid_param("stop", msg);
    let list: Vec<String> = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("`stop` must be a string or an array of strings".into()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`stop` must be a string or an array of strings".into())),
    };
    if list.len() > MAX_STOP {
        return Err(bad(format!(
            "`stop` holds {} strings; at most {MAX_STOP} are allowed",
            list.len()
        )));
    }
    for s in &list {
        if s.is_empty() {
            return Err(bad("`stop` strings must not be empty".into()));
        }
        if s.chars().count() > MAX_STOP_CHARS {
            return Err(bad(format!(
                "each `stop` string must be at most {MAX_STOP_CHARS} characters"
            )));
        }
    }
    Ok(list)
}

fn convert_message(i: usize, m: RequestMessage) -> Result<Message, ApiError> {
    let role = match m.role {
        RequestRole::Developer => RequestRole::System,
        r => r,
    };
    let at = format!("messages[{i}].content");
    let parts = match m.content {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                at.clone(),
                format!("`{at}` is required (a string or an array of content parts)"),
            ))
        }
        Some(Value::String(s)) => vec![Part::Text(s)],
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::invalid_param(
                    at.clone(),
                    format!("`{at}` must not be an empty array"),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(j, item)| convert_part(&format!("{at}[{j}]"), item))
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                at.clone(),
                format!("`{at}` must be a string or an array of content parts"),
            ))
        }
    };
    if role != RequestRole::User {
        if let Some(j) = parts.iter().position(|p| matches!(p, Part::ImageUrl(_))) {
            return Err(ApiError::invalid_param(
                format!("{at}[{j}]"),
                format!("`{at}[{j}]`: images are accepted in user messages only"),
            ));
        }
    }
    Ok(Message { role, parts })
}

fn convert_part(at: &str, item: &Value) -> Result<Part, ApiError> {
    let bad = |msg: String| ApiError::invalid_param(at.to_string(), msg);
    let Some(obj) = item.as_object() else {
        return Err(bad(format!(
            "`{at}` must be an object like {{\"type\": \"text\", \"text\": \"...\"}}"
        )));
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => match obj.get("text") {
            Some(Value::String(s)) => Ok(Part::Text(s.clone())),
            _ => Err(bad(format!("`{at}.text` must be a string"))),
        },
        Some("image_url") => {
            let url = match obj.get("image_url") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => match o.get("url") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(bad(format!("`{at}.image_url.url` must be a string"))),
                },
                _ => {
                    return Err(bad(format!(
                        "`{at}.image_url` must be an object like {{\"url\": \"data:image/png;base64,...\"}}"
                    )))
                }
            };
            if url.is_empty() {
                return Err(bad(format!("`{at}.image_url.url` is empty")));
            }
            Ok(Part::ImageUrl(url))
        }
        Some(other) => Err(bad(format!(
            "content part type `{other}` is not supported; use `text` or `image_url`"
        ))),
        None => Err(bad(format!(
            "`{at}.type` is required: `text` or `image_url`"
        ))),
    }
}

// ---- responses ----

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
    pub context_length: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse_request(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn good_request_parses() {
        let r = parse_request(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AA=="}}]}],"stream":true,"stream_options":{"include_usage":true},"stop":"x","max_completion_tokens":5,"top_k":-1}"#,
        )
        .unwrap();
        assert_eq!(r.image_count(), 1);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.top_k, None);
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(r#"{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = err(r#"{"messages":[{"role":"wizard","content":"hi"}]}"#);
        assert!(e.message.contains("wizard"), "{}", e.message);
        let e = err(r#"{"messages":[]}"#);
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = err(r#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#);
        assert_eq!(e.code, "unsupported_parameter");
        let e = err(
            r#"{"messages":[{"role":"assistant","content":[{"type":"image_url","image_url":{"url":"data:,"}}]}]}"#,
        );
        assert!(e.message.contains("user messages only"), "{}", e.message);
        assert_eq!(err("\u{0}").code, "invalid_json");
        assert_eq!(
            parse_request(b"{\"a\":\"\xff\"}").unwrap_err().code,
            "invalid_encoding"
        );
    }
}
