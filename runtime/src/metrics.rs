//! Prometheus metrics (OpenMetrics text on `GET /metrics`): requests by route and status,
//! time to first token, time per output token, queue depth, vision tower time, kill switch
//! state, resident memory.
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    /// `tower` (computed) or `cache` (features of an image seen before).
    pub features: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabels {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    finished: Family<FinishLabels, Counter>,
    ttft: Histogram,
    per_token: Histogram,
    vision_tower: Histogram,
    images: Family<ImageLabels, Counter>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    queue_depth: Gauge,
    in_flight: Gauge,
    kill_switch: Gauge,
    resident_memory: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cathedral");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let finished = Family::<FinishLabels, Counter>::default();
        registry.register(
            "generations",
            "Generations finished, by finish reason (stop, length, cancelled, timeout, shutdown)",
            finished.clone(),
        );
        // 5 ms .. ~82 s
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        registry.register(
            "time_to_first_token_seconds",
            "From request arrival to the first generated token",
            ttft.clone(),
        );
        // 1 ms .. ~4 s
        let per_token = Histogram::new(exponential_buckets(0.001, 2.0, 13));
        registry.register(
            "time_per_output_token_seconds",
            "Decode time divided by generated tokens, per generation",
            per_token.clone(),
        );
        let vision_tower = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "vision_tower_seconds",
            "Vision tower time per multimodal request",
            vision_tower.clone(),
        );
        let images = Family::<ImageLabels, Counter>::default();
        registry.register(
            "images",
            "Images in generation requests, by where their features came from (tower, cache)",
            images.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        let completion_tokens = Counter::default();
        registry.register(
            "completion_tokens",
            "Tokens generated",
            completion_tokens.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Admitted requests waiting for the engine",
            queue_depth.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Admitted generation requests (waiting or running)",
            in_flight.clone(),
        );
        let kill_switch = Gauge::default();
        registry.register(
            "kill_switch_engaged",
            "1 when the vision kill switch is engaged",
            kill_switch.clone(),
        );
        let resident_memory = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "resident_memory_bytes",
            "Resident set size of the server process",
            resident_memory.clone(),
        );
        Self {
            registry,
            requests,
            finished,
            ttft,
            per_token,
            vision_tower,
            images,
            prompt_tokens,
            completion_tokens,
            queue_depth,
            in_flight,
            kill_switch,
            resident_memory,
        }
    }

    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    pub fn finished(&self, reason: &str) {
        self.finished
            .get_or_create(&FinishLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn time_to_first_token(&self, d: Duration) {
        self.ttft.observe(d.as_secs_f64());
    }

    pub fn tokens(&self, prompt: usize, completion: usize, decode: Duration) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.completion_tokens.inc_by(completion as u64);
        if completion > 0 {
            self.per_token
                .observe(decode.as_secs_f64() / completion as f64);
        }
    }

    pub fn vision_tower(&self, d: Duration) {
        self.vision_tower.observe(d.as_secs_f64());
    }

    /// Images of one request: `computed` through the tower, `cached` from the feature cache.
    pub fn images(&self, computed: usize, cached: usize) {
        for (source, n) in [("tower", computed), ("cache", cached)] {
            if n > 0 {
                self.images
                    .get_or_create(&ImageLabels {
                        features: source.to_string(),
                    })
                    .inc_by(n as u64);
            }
        }
    }

    pub fn queue_depth(&self) -> &Gauge {
        &self.queue_depth
    }

    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    pub fn set_kill_switch(&self, engaged: bool) {
        self.kill_switch.set(i64::from(engaged));
    }

    /// Resident set size now, if the platform tells it.
    pub fn resident_memory_bytes() -> Option<u64> {
        memory_stats::memory_stats().map(|m| m.physical_mem as u64)
    }

    /// The exposition text; samples resident memory first.
    pub fn render(&self) -> String {
        if let Some(rss) = Self::resident_memory_bytes() {
            self.resident_memory.set(rss as f64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.request("/v1/chat/completions", 200);
        m.time_to_first_token(Duration::from_millis(20));
        m.tokens(10, 4, Duration::from_millis(40));
        m.set_kill_switch(true);
        let text = m.render();
        for name in [
            "cathedral_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
            "cathedral_time_to_first_token_seconds_bucket",
            "cathedral_time_per_output_token_seconds_count 1",
            "cathedral_queue_depth 0",
            "cathedral_vision_tower_seconds_count 0",
            "cathedral_kill_switch_engaged 1",
            "cathedral_resident_memory_bytes",
            "# EOF",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
