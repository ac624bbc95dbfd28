//! The probe: one OpenAI chat completion over mTLS, multimodal (an image drawn here with known
//! content) or text only. Shared by `cathedralctl probe`, the canary watcher and the deploy
//! health gate, so all three judge a runtime the same way.
use base64::Engine as _;
use chrono::{DateTime, Utc};
use image::{ImageFormat, Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Cursor;
use std::time::{Duration, Instant};

/// What a probe exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// Text and an image: the vision tower, the merger and the language model.
    Vision,
    /// Text only: the path the kill switch never touches.
    Text,
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeKind::Vision => "vision",
            ProbeKind::Text => "text",
        })
    }
}

/// Why a probe failed, coarse enough to count and chart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "class", content = "code")]
pub enum ErrorClass {
    /// TCP connection refused, reset or unreachable: the runtime is down.
    Connect,
    /// The TLS handshake failed: certificates, CA, protocol.
    Tls,
    /// No complete answer within the probe timeout.
    Timeout,
    /// The runtime answered with a non-success HTTP status.
    HttpStatus(u16),
    /// A 200 whose body is not a chat completion with an answer.
    BadBody,
    /// The answer does not contain the expected text (`--expect` only).
    WrongAnswer,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorClass::Connect => f.write_str("connect"),
            ErrorClass::Tls => f.write_str("tls"),
            ErrorClass::Timeout => f.write_str("timeout"),
            ErrorClass::HttpStatus(code) => write!(f, "http_{code}"),
            ErrorClass::BadBody => f.write_str("bad_body"),
            ErrorClass::WrongAnswer => f.write_str("wrong_answer"),
        }
    }
}

/// Token counts the runtime reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The result of one probe. A failed probe still carries its latency (time to the failure).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    pub kind: ProbeKind,
    /// When the request was sent (wall clock): the probe belongs to this instant's window.
    pub at: DateTime<Utc>,
    /// HTTP status, when the runtime answered at all.
    pub status: Option<u16>,
    #[serde(with = "duration_ms")]
    pub latency: Duration,
    pub error_class: Option<ErrorClass>,
    /// The error's text: an OpenAI error `code` and message, or the transport error.
    pub error: Option<String>,
    pub usage: Option<Usage>,
    pub answer: Option<String>,
}

impl ProbeOutcome {
    pub fn is_success(&self) -> bool {
        self.error_class.is_none()
    }
}

/// What a probe sends. The defaults keep a probe cheap: a 256×256 image (64 image tokens
/// after the 2×2 merge) and a few greedy tokens.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// The `model` field; `None` leaves it out (the runtime serves one model and checks a
    /// given id against it).
    pub model: Option<String>,
    pub max_tokens: u32,
    pub timeout: Duration,
    /// PNG/JPEG/WebP bytes for the vision probe; `None` draws [`builtin_image`].
    pub image: Option<ImageBytes>,
    /// Case-insensitive text the answer must contain (useful with a real checkpoint only).
    pub expect: Option<String>,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            model: None,
            max_tokens: 8,
            timeout: Duration::from_secs(10),
            image: None,
            expect: None,
        }
    }
}

/// An encoded image and its media type, ready for a data URL.
#[derive(Debug, Clone)]
pub struct ImageBytes {
    pub media_type: &'static str,
    pub bytes: Vec<u8>,
}

impl ImageBytes {
    /// Reads an image file; the media type comes from its content, not its name.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ProbeSetupError> {
        let bytes = std::fs::read(path).map_err(|source| ProbeSetupError::ReadImage {
            path: path.to_owned(),
            source,
        })?;
        let media_type = match image::guess_format(&bytes) {
            Ok(ImageFormat::Png) => "image/png",
            Ok(ImageFormat::Jpeg) => "image/jpeg",
            Ok(ImageFormat::WebP) => "image/webp",
            Ok(ImageFormat::Gif) => "image/gif",
            _ => return Err(ProbeSetupError::NotAnImage(path.to_owned())),
        };
        Ok(Self { media_type, bytes })
    }

    fn data_url(&self) -> String {
        format!(
            "data:{};base64,{}",
            self.media_type,
            base64::engine::general_purpose::STANDARD.encode(&self.bytes)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeSetupError {
    #[error("cannot read probe image {path}: {source}")]
    ReadImage {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a PNG, JPEG, WebP or GIF image")]
    NotAnImage(std::path::PathBuf),
    #[error("target {0:?} is not an http(s) URL")]
    BadTarget(String),
    #[error("cannot build the mTLS client: {0}")]
    Client(String),
}

/// The colours of the built-in image's quadrants: top-left, top-right, bottom-left, bottom-right.
pub const BUILTIN_QUADRANTS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 180, 60]),
    ("blue", [30, 60, 220]),
    ("yellow", [240, 220, 40]),
];

/// Side of the built-in image: exactly the processor's minimum area (256² = 65,536 px), so
/// it is not resized and costs 64 image tokens.
pub const BUILTIN_SIDE: u32 = 256;

/// The built-in probe image: four solid quadrants in the [`BUILTIN_QUADRANTS`] colours, as PNG.
pub fn builtin_image() -> ImageBytes {
    let half = BUILTIN_SIDE / 2;
    let img = RgbImage::from_fn(BUILTIN_SIDE, BUILTIN_SIDE, |x, y| {
        let quadrant = usize::from(y >= half) * 2 + usize::from(x >= half);
        Rgb(BUILTIN_QUADRANTS[quadrant].1)
    });
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .expect("encoding an in-memory RGB image as PNG cannot fail");
    ImageBytes {
        media_type: "image/png",
        bytes,
    }
}

const VISION_QUESTION: &str =
    "What colour is the top-left quadrant of this image? Answer with one word.";
const TEXT_QUESTION: &str = "Reply with the single word: ready";

/// The chat completion request body of a probe.
pub fn request_body(kind: ProbeKind, spec: &ProbeSpec) -> serde_json::Value {
    let content = match kind {
        ProbeKind::Text => serde_json::json!(TEXT_QUESTION),
        ProbeKind::Vision => {
            let image = spec.image.clone().unwrap_or_else(builtin_image);
            serde_json::json!([
                {"type": "text", "text": VISION_QUESTION},
                {"type": "image_url", "image_url": {"url": image.data_url()}},
            ])
        }
    };
    let mut body = serde_json::json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "seed": 0,
    });
    if let Some(model) = &spec.model {
        body["model"] = serde_json::json!(model);
    }
    body
}

/// Sends probes to one runtime with one client (built by `cathedral_runtime::client`).
#[derive(Debug, Clone)]
pub struct Prober {
    client: reqwest::Client,
    endpoint: String,
    spec: ProbeSpec,
}

impl Prober {
    /// `target` is the runtime's base URL, e.g. `https://mini.local:1337`.
    pub fn new(
        client: reqwest::Client,
        target: &str,
        spec: ProbeSpec,
    ) -> Result<Self, ProbeSetupError> {
        let base = target.trim_end_matches('/');
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(ProbeSetupError::BadTarget(target.to_owned()));
        }
        Ok(Self {
            client,
            endpoint: format!("{base}/v1/chat/completions"),
            spec,
        })
    }

    /// A prober over the one mTLS client builder (`cathedral_runtime::client::mtls_client`).
    pub fn mtls(
        target: &str,
        tls: &cathedral_runtime::client::ClientTls,
        spec: ProbeSpec,
    ) -> Result<Self, ProbeSetupError> {
        // The client's own limit sits above the probe's, which classifies a timeout itself.
        let client =
            cathedral_runtime::client::mtls_client(tls, spec.timeout + Duration::from_secs(1))
                .map_err(|e| ProbeSetupError::Client(e.to_string()))?;
        Self::new(client, target, spec)
    }

    pub fn spec(&self) -> &ProbeSpec {
        &self.spec
    }

    /// Sends one probe and classifies the result; never fails itself.
    pub async fn probe(&self, kind: ProbeKind) -> ProbeOutcome {
        let body = request_body(kind, &self.spec);
        let at = Utc::now();
        let started = Instant::now();
        let exchange = async {
            // no-cache: the runtime must run the vision tower every time, not reuse the
            // features it cached for this same image a minute ago.
            let response = self
                .client
                .post(&self.endpoint)
                .header(reqwest::header::CACHE_CONTROL, "no-cache")
                .json(&body)
                .send()
                .await?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        };
        let result = tokio::time::timeout(self.spec.timeout, exchange).await;
        let latency = started.elapsed();
        let mut outcome = ProbeOutcome {
            kind,
            at,
            status: None,
            latency,
            error_class: None,
            error: None,
            usage: None,
            answer: None,
        };
        match result {
            Err(_) => {
                outcome.error_class = Some(ErrorClass::Timeout);
                outcome.error = Some(format!("no answer within {:?}", self.spec.timeout));
            }
            Ok(Err(e)) => {
                outcome.error_class = Some(classify_transport(&e));
                outcome.error = Some(error_chain(&e));
            }
            Ok(Ok((status, bytes))) => {
                outcome.status = Some(status);
                judge_answer(&mut outcome, &bytes, self.spec.expect.as_deref());
            }
        }
        outcome
    }
}

/// Fills answer, usage and error fields from an HTTP answer.
fn judge_answer(outcome: &mut ProbeOutcome, body: &[u8], expect: Option<&str>) {
    let status = outcome.status.unwrap_or(0);
    if !(200..300).contains(&status) {
        outcome.error_class = Some(ErrorClass::HttpStatus(status));
        outcome.error = Some(openai_error_text(body));
        return;
    }
    match parse_completion(body) {
        Ok((answer, usage)) => {
            outcome.usage = usage;
            if let Some(want) = expect {
                if !answer.to_lowercase().contains(&want.to_lowercase()) {
                    outcome.error_class = Some(ErrorClass::WrongAnswer);
                    outcome.error = Some(format!("answer does not contain {want:?}"));
                }
            }
            outcome.answer = Some(answer);
        }
        Err(why) => {
            outcome.error_class = Some(ErrorClass::BadBody);
            outcome.error = Some(why);
        }
    }
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
}

/// The first choice's text and the usage of a chat completion body.
pub fn parse_completion(body: &[u8]) -> Result<(String, Option<Usage>), String> {
    let completion: Completion = serde_json::from_slice(body)
        .map_err(|e| format!("not a chat completion: {e}: {}", snippet(body)))?;
    let choice = completion
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| "chat completion without choices".to_owned())?;
    let answer = choice
        .message
        .content
        .ok_or_else(|| "first choice has no message content".to_owned())?;
    Ok((answer, completion.usage))
}

/// `code: message` of an OpenAI error body, or a snippet of whatever came back.
fn openai_error_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        message: Option<String>,
        code: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error }) => {
            let code = match error.code {
                Some(serde_json::Value::String(s)) => s,
                Some(other) if !other.is_null() => other.to_string(),
                _ => "error".to_owned(),
            };
            format!("{code}: {}", error.message.unwrap_or_default())
        }
        Err(_) => snippet(body),
    }
}

/// The OpenAI error `code` in a recorded probe error (`code: message`).
pub fn error_code(error: &str) -> &str {
    error.split_once(':').map_or(error, |(code, _)| code)
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        s.push('…');
    }
    s
}

/// Connect, TLS or timeout, from a transport error's source chain.
fn classify_transport(e: &reqwest::Error) -> ErrorClass {
    if e.is_timeout() {
        return ErrorClass::Timeout;
    }
    if chain_has_tls_error(e) {
        return ErrorClass::Tls;
    }
    if e.is_connect() {
        return ErrorClass::Connect;
    }
    // The request was sent but the connection died before an answer: the runtime went away.
    ErrorClass::Connect
}

fn chain_has_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if err.is::<rustls::Error>() {
            return true;
        }
        // io::Error::source skips the wrapped error itself; look at it directly.
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if inner.is::<rustls::Error>() {
                    return true;
                }
            }
        }
        next = err.source();
    }
    false
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(err) = next {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = err.source();
    }
    text
}

/// Serialises a `Duration` as milliseconds with microsecond resolution.
pub mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_micros() as f64 / 1000.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        if !(ms.is_finite() && ms >= 0.0) {
            return Err(serde::de::Error::custom(
                "latency must be a finite non-negative number",
            ));
        }
        // Microsecond resolution, like the value written.
        Ok(Duration::from_micros((ms * 1000.0).round() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_image_has_its_quadrants() {
        let image = builtin_image();
        let decoded = image::load_from_memory(&image.bytes).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (BUILTIN_SIDE, BUILTIN_SIDE));
        let q = BUILTIN_SIDE / 4;
        let corners = [(q, q), (3 * q, q), (q, 3 * q), (3 * q, 3 * q)];
        for ((x, y), (_, rgb)) in corners.into_iter().zip(BUILTIN_QUADRANTS) {
            assert_eq!(decoded.get_pixel(x, y).0, rgb);
        }
    }

    #[test]
    fn vision_body_carries_a_png_data_url() {
        let body = request_body(ProbeKind::Vision, &ProbeSpec::default());
        let url = body["messages"][0]["content"][1]["image_url"]["url"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("data:image/png;base64,"));
        let text = request_body(ProbeKind::Text, &ProbeSpec::default());
        assert!(text["messages"][0]["content"].is_string());
    }

    fn outcome(status: u16) -> ProbeOutcome {
        ProbeOutcome {
            kind: ProbeKind::Vision,
            at: Utc::now(),
            status: Some(status),
            latency: Duration::from_millis(5),
            error_class: None,
            error: None,
            usage: None,
            answer: None,
        }
    }

    #[test]
    fn answers_are_classified() {
        let mut ok = outcome(200);
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"Red"}}],"usage":{"prompt_tokens":90,"completion_tokens":1,"total_tokens":91}}"#;
        judge_answer(&mut ok, body, Some("red"));
        assert!(ok.is_success(), "{ok:?}");
        assert_eq!(ok.answer.as_deref(), Some("Red"));
        assert_eq!(ok.usage.unwrap().prompt_tokens, 90);

        let mut wrong = outcome(200);
        judge_answer(&mut wrong, body, Some("blue"));
        assert_eq!(wrong.error_class, Some(ErrorClass::WrongAnswer));

        let mut gated = outcome(503);
        judge_answer(
            &mut gated,
            br#"{"error":{"message":"vision is off","type":"service_unavailable","code":"vision_disabled_by_kill_switch"}}"#,
            None,
        );
        assert_eq!(gated.error_class, Some(ErrorClass::HttpStatus(503)));
        assert_eq!(
            error_code(gated.error.as_deref().unwrap()),
            "vision_disabled_by_kill_switch"
        );

        let mut bad = outcome(200);
        judge_answer(&mut bad, b"<html>", None);
        assert_eq!(bad.error_class, Some(ErrorClass::BadBody));
    }

    #[test]
    fn outcome_round_trips_through_json() {
        let mut o = outcome(503);
        o.error_class = Some(ErrorClass::HttpStatus(503));
        o.latency = Duration::from_micros(12_345);
        let line = serde_json::to_string(&o).unwrap();
        let back: ProbeOutcome = serde_json::from_str(&line).unwrap();
        assert_eq!(back, o);
    }
}
