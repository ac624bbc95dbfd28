//! What every handler shares: the engine handle, limits, the kill switch, metrics.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::certs::Identity;
use crate::engine::VisionAvailability;
use crate::killswitch::{KillSwitch, KillSwitchState};
use crate::metrics::Metrics;
use crate::server::images::RemoteImages;
use crate::server::worker::{EngineHandle, ShutdownFlags};

use super::ApiError;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_images: usize,
    pub max_image_pixels: u64,
    pub request_timeout: Duration,
}

pub struct AppState {
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    pub kill_switch: KillSwitch,
    pub admins: Vec<Identity>,
    pub limits: Limits,
    pub remote_images: Option<RemoteImages>,
    pub shutdown: Arc<ShutdownFlags>,
    pub started: Instant,
}

/// The vision state a client sees, in the words `/health` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisionState {
    Ready,
    NotWired,
    Unsupported,
    DisabledByKillSwitch(Option<KillSwitchState>),
}

impl VisionState {
    pub fn as_str(&self) -> &'static str {
        match self {
            VisionState::Ready => "ready",
            VisionState::NotWired => "not_wired",
            VisionState::Unsupported => "unsupported",
            VisionState::DisabledByKillSwitch(_) => "disabled_by_kill_switch",
        }
    }
}

/// Kill switch reading for the gate: an unreadable file counts as engaged (fail safe).
#[derive(Debug, Clone)]
pub enum SwitchReading {
    Released,
    Engaged(KillSwitchState),
    Unreadable(String),
}

impl AppState {
    pub fn read_kill_switch(&self) -> SwitchReading {
        let reading = match self.kill_switch.read() {
            Ok(None) => SwitchReading::Released,
            Ok(Some(st)) => SwitchReading::Engaged(st),
            Err(e) => {
                tracing::warn!(error = %e, "kill switch file unreadable: vision stays off");
                SwitchReading::Unreadable(e.to_string())
            }
        };
        self.metrics
            .set_kill_switch(!matches!(reading, SwitchReading::Released));
        reading
    }

    pub fn vision_state(&self) -> VisionState {
        match self.engine.info.vision {
            VisionAvailability::Unsupported => VisionState::Unsupported,
            VisionAvailability::NotWired => VisionState::NotWired,
            VisionAvailability::Ready => match self.read_kill_switch() {
                SwitchReading::Released => VisionState::Ready,
                SwitchReading::Engaged(st) => VisionState::DisabledByKillSwitch(Some(st)),
                SwitchReading::Unreadable(_) => VisionState::DisabledByKillSwitch(None),
            },
        }
    }

    /// The gate every request with images passes; text-only requests never reach it.
    pub fn vision_gate(&self) -> Result<(), ApiError> {
        match self.vision_state() {
            VisionState::Ready => Ok(()),
            VisionState::Unsupported => Err(ApiError::unavailable(
                "vision_unsupported_backend",
                format!(
                    "model {} has no vision tower (text-only checkpoint); send text only",
                    self.engine.info.id
                ),
            )),
            VisionState::NotWired => Err(ApiError::unavailable(
                "vision_pipeline_not_yet_wired",
                "image input is not enabled on this server (it runs without --vision-enabled); send text only",
            )),
            VisionState::DisabledByKillSwitch(st) => {
                let why = match st {
                    Some(st) => format!(
                        "engaged by {} at {}: {}",
                        st.engaged_by,
                        st.engaged_at.to_rfc3339(),
                        st.reason
                    ),
                    None => "the kill switch file is unreadable, which counts as engaged".into(),
                };
                Err(ApiError::unavailable(
                    "vision_disabled_by_kill_switch",
                    format!("image input is disabled by the kill switch ({why}); text requests still work"),
                ))
            }
        }
    }

    /// New work is refused once shutdown has begun.
    pub fn refuse_if_draining(&self) -> Result<(), ApiError> {
        if self.shutdown.draining.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable(
                "server_shutting_down",
                "the server is shutting down; retry shortly",
            )
            .with_retry_after(5));
        }
        Ok(())
    }

    pub fn too_busy(&self) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "queue_full",
            format!(
                "the server is busy ({} requests admitted, the most it queues); retry after the Retry-After seconds",
                self.engine.capacity()
            ),
        )
        .with_retry_after(self.engine.retry_after_secs())
    }
}
