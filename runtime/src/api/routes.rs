//! The router: OpenAI routes, health, metrics, admin; JSON errors for unknown routes and
//! methods; request counting by route and status.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;
use serde_json::json;

use super::chat::{chat_completions, json_response};
use super::error::ApiError;
use super::state::{AppState, SwitchReading};
use super::types::{ModelCard, ModelList};
use crate::metrics::{Metrics, CONTENT_TYPE};
use crate::server::tls::Peer;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/status", get(admin_status))
        .route(
            "/admin/kill-switch",
            post(engage_kill_switch).delete(release_kill_switch),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    state.metrics.request(&route, resp.status().as_u16());
    resp
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route for {method} {}; this server offers POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let info = &state.engine.info;
    let created = (chrono::Utc::now()
        - chrono::Duration::from_std(state.started.elapsed()).unwrap_or_default())
    .timestamp();
    json_response(
        StatusCode::OK,
        &ModelList {
            object: "list",
            data: vec![ModelCard {
                id: info.id.clone(),
                object: "model",
                created,
                owned_by: "cathedral",
                context_length: info.context_length,
            }],
        },
    )
}

fn kill_switch_json(reading: &SwitchReading) -> serde_json::Value {
    match reading {
        SwitchReading::Released => json!({"engaged": false}),
        SwitchReading::Engaged(st) => json!({
            "engaged": true,
            "engaged_by": st.engaged_by,
            "engaged_at": st.engaged_at,
            "reason": st.reason,
        }),
        SwitchReading::Unreadable(e) => json!({"engaged": true, "error": e}),
    }
}

/// Liveness and readiness: 200 while serving (the model is loaded before the listeners open),
/// 503 once shutdown has begun.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let draining = state.shutdown.draining.load(Ordering::Relaxed);
    let vision = state.vision_state();
    let reading = state.read_kill_switch();
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json_response(
        status,
        &json!({
            "status": if draining { "draining" } else { "ok" },
            "model": state.engine.info.id,
            "loaded": true,
            "vision": vision.as_str(),
            "kill_switch": kill_switch_json(&reading),
        }),
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.read_kill_switch();
    state
        .metrics
        .in_flight()
        .set(state.engine.admitted() as i64);
    let mut resp = (StatusCode::OK, state.metrics.render()).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    resp
}

fn require_admin(state: &AppState, peer: &Peer) -> Result<String, ApiError> {
    match peer.identity() {
        Some(id) if state.admins.contains(id) => Ok(id.to_string()),
        Some(id) => Err(ApiError::forbidden(format!(
            "client identity `{id}` is not an admin; admin routes need a certificate named in --admin-identity"
        ))),
        None => Err(ApiError::forbidden(
            "admin routes need a client certificate whose CN is named in --admin-identity",
        )),
    }
}

async fn admin_status(
    State(state): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Response, ApiError> {
    let who = require_admin(&state, &peer)?;
    let reading = state.read_kill_switch();
    let vision = state.vision_state();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "model": state.engine.info.id,
            "context_length": state.engine.info.context_length,
            "model_load_seconds": state.engine.info.load_time.as_secs_f64(),
            "vision": vision.as_str(),
            "kill_switch": kill_switch_json(&reading),
            "kill_switch_path": state.kill_switch.path(),
            "queue": {
                "admitted": state.engine.admitted(),
                "capacity": state.engine.capacity(),
            },
            "uptime_seconds": state.started.elapsed().as_secs(),
            "resident_memory_bytes": Metrics::resident_memory_bytes(),
            "draining": state.shutdown.draining.load(Ordering::Relaxed),
            "you": who,
        }),
    ))
}

#[derive(Deserialize)]
struct EngageBody {
    reason: String,
}

async fn engage_kill_switch(
    State(state): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let who = require_admin(&state, &peer)?;
    let parsed: EngageBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("send a JSON object like {{\"reason\": \"...\"}} ({e})"),
        )
        .with_param("reason")
    })?;
    let st = state
        .kill_switch
        .engage(&who, &parsed.reason)
        .map_err(|e| match e {
            crate::killswitch::KillSwitchError::Invalid(m) => ApiError::invalid_param("reason", m),
            other => ApiError::internal(other.to_string()),
        })?;
    tracing::warn!(by = %who, reason = %st.reason, "kill switch engaged: image input off");
    state.metrics.set_kill_switch(true);
    Ok(json_response(
        StatusCode::OK,
        &json!({"kill_switch": kill_switch_json(&SwitchReading::Engaged(st))}),
    ))
}

async fn release_kill_switch(
    State(state): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Response, ApiError> {
    let who = require_admin(&state, &peer)?;
    let previous = state
        .kill_switch
        .release()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    tracing::warn!(by = %who, "kill switch released");
    state.metrics.set_kill_switch(false);
    let vision = state.vision_state();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kill_switch": {"engaged": false},
            "was_engaged": previous.is_some(),
            "vision": vision.as_str(),
        }),
    ))
}
