//! `POST /v1/chat/completions`: validation, the vision gate, images, admission, then the engine
//! thread; answered whole or as SSE chunks of OpenAI's shape ending in `data: [DONE]`.
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::state::AppState;
use super::types::{
    parse_request, AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatRequest, Choice,
    ChunkChoice, Delta, Part, RequestRole, Usage,
};
use crate::engine::{EngineError, FeatureReuse, FinishReason, SamplingParams};
use crate::prompt::{ChatMessage, ContentPart, Role};
use crate::server::images::fetch_image_bytes;
use crate::server::worker::{Admission, Job, JobEnd, JobError, JobEvent};
use crate::vision::preprocess::{decode_image, ImageLimits};

/// `Cache-Control: no-cache` (or `no-store`) makes the vision tower run even for an image whose
/// features are cached: what a probe of the vision pipeline needs.
fn feature_reuse(headers: &axum::http::HeaderMap) -> FeatureReuse {
    let bypass = headers
        .get_all(axum::http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .any(|d| d == "no-cache" || d == "no-store");
    if bypass {
        FeatureReuse::Recompute
    } else {
        FeatureReuse::Allow
    }
}

/// Sets the job's cancel flag when the request goes away (client disconnect drops the future
/// or the stream holding this).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match handle(state, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    state.refuse_if_draining()?;
    let image_features = feature_reuse(req.headers());
    let limit = state.limits.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {limit} bytes (--max-body-bytes); send smaller images or fewer messages"),
        )
    };
    // A body trickled in slower than the request timeout holds a connection for nothing.
    let body = tokio::time::timeout(
        state.limits.request_timeout,
        read_body(req.into_body(), limit),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            "the request body did not arrive within --request-timeout; send it in one go",
        )
    })?
    .map_err(|_| too_large())?;
    let request = parse_request(&body)?;
    drop(body);
    if let Some(model) = &request.model {
        if model != &state.engine.info.id {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "model `{model}` is not served here; this server serves `{}` (see GET /v1/models)",
                    state.engine.info.id
                ),
            )
            .with_param("model"));
        }
    }
    let images = request.image_count();
    if images > state.limits.max_images {
        return Err(ApiError::invalid(
            "too_many_images",
            format!(
                "the request holds {images} images; at most {} are accepted per request",
                state.limits.max_images
            ),
        )
        .with_param("messages"));
    }
    if images > 0 {
        state.vision_gate()?;
    }
    let admission = state.engine.admit().ok_or_else(|| state.too_busy())?;
    let messages = resolve_messages(&state, &request).await?;
    let deadline = arrived + state.limits.request_timeout;
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        messages,
        max_tokens: request.max_tokens.map(|m| m as usize),
        params: sampling(&request),
        events: tx,
        cancel: cancel.clone(),
        deadline,
        image_features,
    };
    state.metrics.queue_depth().inc();
    if !state.engine.submit(job) {
        state.metrics.queue_depth().dec();
        return Err(state.too_busy());
    }
    let guard = CancelOnDrop(cancel);
    // Wait until the prompt is prepared: its errors still get a proper status code.
    match wait_event(&mut rx, deadline, &state).await? {
        JobEvent::Started { .. } => {}
        JobEvent::Failed(e) => return Err(job_error(e, &state)),
        other => {
            return Err(ApiError::internal(format!(
                "unexpected engine event before start: {other:?}"
            )))
        }
    }
    let ctx = Ctx {
        id: format!("chatcmpl-{}", random_id()),
        created: chrono::Utc::now().timestamp(),
        model: state.engine.info.id.clone(),
        arrived,
        deadline,
    };
    if request.stream {
        Ok(stream_response(
            state,
            ctx,
            request.include_usage,
            rx,
            guard,
            admission,
        ))
    } else {
        let resp = complete_sync(&state, &ctx, &mut rx).await;
        drop(guard);
        drop(admission);
        resp
    }
}

/// Smaller images carry no usable content (ARCHITECTURE §4: sides < 10 px are rejected).
const MIN_IMAGE_SIDE: u32 = 10;

/// Past the limit the rest of an upload is read and dropped (bounded in bytes and time) so that
/// the client, still sending, gets the 413 instead of a reset connection.
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ()> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    let drain_until = tokio::time::Instant::now() + DRAIN_TIME;
    while let Some(chunk) = if seen <= limit {
        stream.next().await
    } else {
        tokio::time::timeout_at(drain_until, stream.next())
            .await
            .ok()
            .flatten()
    } {
        let chunk = chunk.map_err(|_| ())?;
        seen += chunk.len();
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else {
            buf = Vec::new();
            if seen > limit + DRAIN_BYTES {
                break;
            }
        }
    }
    if seen > limit {
        Err(())
    } else {
        Ok(Bytes::from(buf))
    }
}

fn sampling(r: &ChatRequest) -> SamplingParams {
    let mut p = SamplingParams::default();
    if let Some(t) = r.temperature {
        p.temperature = t;
    }
    if let Some(v) = r.top_p {
        p.top_p = v;
    }
    if let Some(k) = r.top_k {
        p.top_k = k as usize;
    }
    if let Some(v) = r.min_p {
        p.min_p = v;
    }
    p.seed = r.seed;
    p.stop = r.stop.clone();
    p
}

/// Decodes every image (off the async threads) and builds the engine's messages.
async fn resolve_messages(
    state: &AppState,
    request: &ChatRequest,
) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        let role = match m.role {
            RequestRole::System | RequestRole::Developer => Role::System,
            RequestRole::User => Role::User,
            RequestRole::Assistant => Role::Assistant,
            RequestRole::Tool => Role::Tool,
        };
        let mut content = Vec::with_capacity(m.parts.len());
        for (j, part) in m.parts.iter().enumerate() {
            match part {
                Part::Text(t) => content.push(ContentPart::Text(t.clone())),
                Part::ImageUrl(url) => {
                    let param = format!("messages[{i}].content[{j}].image_url.url");
                    let bytes = fetch_image_bytes(
                        url,
                        state.limits.max_body_bytes,
                        state.remote_images.as_ref(),
                        &param,
                    )
                    .await?;
                    let limits = ImageLimits {
                        max_pixels_decoded: state.limits.max_image_pixels,
                        ..ImageLimits::default()
                    };
                    let decoded =
                        tokio::task::spawn_blocking(move || decode_image(&bytes, &limits))
                            .await
                            .map_err(|e| {
                                ApiError::internal(format!("image decoding panicked: {e}"))
                            })?
                            .map_err(|e| {
                                ApiError::invalid("invalid_image", format!("{param}: {e}"))
                                    .with_param(param.clone())
                            })?;
                    if decoded.width() < MIN_IMAGE_SIDE || decoded.height() < MIN_IMAGE_SIDE {
                        return Err(ApiError::invalid(
                            "invalid_image",
                            format!(
                                "{param}: the image is {}x{} pixels; each side must be at least {MIN_IMAGE_SIDE}",
                                decoded.width(),
                                decoded.height()
                            ),
                        )
                        .with_param(param));
                    }
                    content.push(ContentPart::Image(decoded));
                }
            }
        }
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

async fn wait_event(
    rx: &mut mpsc::UnboundedReceiver<JobEvent>,
    deadline: Instant,
    state: &AppState,
) -> Result<JobEvent, ApiError> {
    // A little past the deadline: the engine thread enforces it between tokens; this catches a
    // job stuck behind a long one.
    let until = tokio::time::Instant::from_std(deadline + Duration::from_secs(1));
    match tokio::time::timeout_at(until, rx.recv()).await {
        Ok(Some(ev)) => Ok(ev),
        Ok(None) => Err(ApiError::internal("the engine dropped the request")),
        Err(_) => Err(timeout_error(state)),
    }
}

fn timeout_error(state: &AppState) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "server_error",
        "request_timeout",
        format!(
            "the request did not finish within {} s (--request-timeout); ask for fewer tokens with max_tokens, or retry",
            state.limits.request_timeout.as_secs()
        ),
    )
}

fn job_error(e: JobError, state: &AppState) -> ApiError {
    match e {
        JobError::ContextOverflow {
            prompt_tokens,
            max_tokens,
            limit,
        } => ApiError::invalid(
            "context_length_exceeded",
            format!(
                "the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {limit} tokens; shorten the messages or lower max_tokens"
            ),
        )
        .with_param("messages"),
        JobError::TimedOutInQueue => timeout_error(state),
        JobError::ShuttingDown => ApiError::unavailable(
            "server_shutting_down",
            "the server is shutting down; retry shortly",
        )
        .with_retry_after(5),
        JobError::Engine(e) => engine_error(e),
    }
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::PromptTooLong { tokens, limit } => ApiError::invalid(
            "context_length_exceeded",
            format!(
                "the prompt is {tokens} tokens; the model's context is {limit}; shorten the messages"
            ),
        )
        .with_param("messages"),
        EngineError::Image(e) => ApiError::invalid("invalid_image", e.to_string()),
        EngineError::InvalidParams(m) => ApiError::invalid("invalid_value", m),
        EngineError::Prompt(e) => ApiError::invalid("invalid_prompt", e.to_string()),
        EngineError::VisionUnavailable(e) => ApiError::unavailable(
            "vision_pipeline_not_yet_wired",
            format!("image input is unavailable ({e:?}); send text only"),
        ),
        other => {
            tracing::error!(error = %other, "engine error");
            ApiError::internal(format!("the engine failed: {other}"))
        }
    }
}

struct Ctx {
    id: String,
    created: i64,
    model: String,
    arrived: Instant,
    deadline: Instant,
}

fn finish_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

async fn complete_sync(
    state: &AppState,
    ctx: &Ctx,
    rx: &mut mpsc::UnboundedReceiver<JobEvent>,
) -> Result<Response, ApiError> {
    let mut first = true;
    loop {
        match wait_event(rx, ctx.deadline, state).await? {
            JobEvent::Delta(_) => {
                if first {
                    state.metrics.time_to_first_token(ctx.arrived.elapsed());
                    first = false;
                }
            }
            JobEvent::Finished { output, end } => {
                match end {
                    JobEnd::Timeout => return Err(timeout_error(state)),
                    JobEnd::Shutdown => {
                        return Err(job_error(JobError::ShuttingDown, state));
                    }
                    JobEnd::Natural | JobEnd::ClientGone => {}
                }
                let body = ChatCompletion {
                    id: ctx.id.clone(),
                    object: "chat.completion",
                    created: ctx.created,
                    model: ctx.model.clone(),
                    choices: vec![Choice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: output.text,
                        },
                        logprobs: None,
                        finish_reason: finish_str(output.finish_reason),
                    }],
                    usage: Usage::new(output.prompt_tokens, output.completion_tokens),
                };
                return Ok(json_response(StatusCode::OK, &body));
            }
            JobEvent::Failed(e) => return Err(job_error(e, state)),
            JobEvent::Started { .. } => {}
        }
    }
}

pub fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    let mut resp = (
        status,
        serde_json::to_string(body).expect("response types serialise"),
    )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn chunk(ctx: &Ctx, delta: Delta<'_>, finish: Option<&'static str>, usage: bool) -> Bytes {
    let c = ChatCompletionChunk {
        id: &ctx.id,
        object: "chat.completion.chunk",
        created: ctx.created,
        model: &ctx.model,
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        }],
        usage: usage.then_some(None),
    };
    sse(&serde_json::to_string(&c).expect("chunk serialises"))
}

fn stream_response(
    state: Arc<AppState>,
    ctx: Ctx,
    include_usage: bool,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
    admission: Admission,
) -> Response {
    let (frames_tx, frames_rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let _guard = guard; // dropped (cancelling the job) if this task ends early
        let _admission = admission;
        let send = |b: Bytes| frames_tx.send(b);
        let role = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        if send(chunk(&ctx, role, None, include_usage)).await.is_err() {
            return;
        }
        let mut first = true;
        loop {
            let ev = match wait_event(&mut rx, ctx.deadline, &state).await {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = send(sse(&e.to_json())).await;
                    break;
                }
            };
            match ev {
                JobEvent::Delta(text) => {
                    if first {
                        state.metrics.time_to_first_token(ctx.arrived.elapsed());
                        first = false;
                    }
                    let d = Delta {
                        role: None,
                        content: Some(&text),
                    };
                    if send(chunk(&ctx, d, None, include_usage)).await.is_err() {
                        return; // client gone: dropping the guard cancels the generation
                    }
                }
                JobEvent::Finished { output, end } => {
                    match end {
                        JobEnd::Timeout => {
                            let _ = send(sse(&timeout_error(&state).to_json())).await;
                        }
                        JobEnd::Shutdown => {
                            let e = ApiError::unavailable(
                                "server_shutting_down",
                                format!(
                                    "the server is shutting down; the answer was cut short after {} tokens",
                                    output.completion_tokens
                                ),
                            );
                            let _ = send(sse(&e.to_json())).await;
                        }
                        JobEnd::ClientGone => return,
                        JobEnd::Natural => {
                            let fin = finish_str(output.finish_reason);
                            if send(chunk(&ctx, Delta::default(), Some(fin), include_usage))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            if include_usage {
                                let c = ChatCompletionChunk {
                                    id: &ctx.id,
                                    object: "chat.completion.chunk",
                                    created: ctx.created,
                                    model: &ctx.model,
                                    choices: vec![],
                                    usage: Some(Some(Usage::new(
                                        output.prompt_tokens,
                                        output.completion_tokens,
                                    ))),
                                };
                                let json = serde_json::to_string(&c).expect("chunk serialises");
                                if send(sse(&json)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    break;
                }
                JobEvent::Failed(e) => {
                    let _ = send(sse(&job_error(e, &state).to_json())).await;
                    break;
                }
                JobEvent::Started { .. } => {}
            }
        }
        let _ = send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let stream = futures_util::stream::unfold(frames_rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn random_id() -> String {
    let n: u128 = rand::random();
    format!("{n:032x}")
}
