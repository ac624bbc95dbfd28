//! The GitHub REST client: octocrab underneath (auth, base URI, TLS, the ETag cache
//! layer), with our own bounded retries, because rate-limit handling needs the response
//! headers that octocrab's typed calls drop.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use http::{HeaderMap, StatusCode};
use octocrab::Octocrab;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::cache::DiskCache;
use crate::config::{GitHubConfig, GitHubToken};

pub const DEFAULT_API: &str = "https://api.github.com";

/// What one scan cost in API calls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiStats {
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Requests that got an HTTP answer (transport failures never reached GitHub).
    pub answered: u64,
    /// Requests that carried an ETag validator.
    pub conditional: u64,
    /// Answers `304 Not Modified`: free of rate limit.
    pub not_modified: u64,
    /// Requests repeated after a 5xx, a transport error or a rate-limit wait.
    pub retries: u64,
    /// `x-ratelimit-remaining` of the last answer that had it.
    pub rate_limit_remaining: Option<u64>,
}

impl ApiStats {
    /// Requests that counted against the rate limit: answered, and not a 304.
    pub fn charged(&self) -> u64 {
        self.answered.saturating_sub(self.not_modified)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("rate limited (HTTP {status}) until {}", until.format("%Y-%m-%d %H:%M:%S UTC"))]
    RateLimited { status: u16, until: DateTime<Utc> },
    #[error("not requested: the rate limit is exhausted until {}", .0.format("%Y-%m-%d %H:%M:%S UTC"))]
    Skipped(DateTime<Utc>),
    #[error("HTTP {status} after {attempts} attempts")]
    ServerError { status: u16, attempts: u32 },
    #[error("not found (HTTP 404)")]
    NotFound,
    #[error("HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("transport error after {attempts} attempts: {message}")]
    Transport { message: String, attempts: u32 },
    #[error("unexpected response body: {0}")]
    Decode(String),
}

/// A paginated listing.
#[derive(Debug)]
pub struct Paged<T> {
    pub items: Vec<T>,
    /// `Some(pages)` when more pages existed than the configured limit allowed reading.
    pub truncated_after: Option<u32>,
}

impl<T> Paged<T> {
    /// Why the listing is incomplete, if it is.
    pub fn shortfall(&self) -> Option<String> {
        self.truncated_after
            .map(|n| format!("more than {n} page(s) of 100; only the first {n} were read"))
    }
}

/// A GitHub API client bound to one scan's statistics.
pub struct GitHub {
    octo: Octocrab,
    cache: DiskCache,
    config: GitHubConfig,
    /// Path prefix of the API root (`/api/v3` on GitHub Enterprise), stripped from
    /// pagination links so that every request goes through the same relative URIs.
    base_path: String,
    stats: Mutex<ApiStats>,
    blocked_until: Mutex<Option<DateTime<Utc>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid GitHub API base `{0}`")]
    BaseUri(String),
    #[error("building the GitHub client: {0}")]
    Build(String),
}

impl GitHub {
    pub fn new(
        config: &GitHubConfig,
        token: Option<&GitHubToken>,
        cache: DiskCache,
    ) -> Result<Self, ClientError> {
        let base = config.api_base.as_deref().unwrap_or(DEFAULT_API);
        let base_uri: http::Uri = base
            .parse()
            .map_err(|_| ClientError::BaseUri(base.to_owned()))?;
        let base_path = base_uri.path().trim_end_matches('/').to_owned();
        let timeout = Some(Duration::from_secs(config.timeout_s.max(1)));
        let mut builder = Octocrab::builder()
            .set_connect_timeout(timeout)
            .set_read_timeout(timeout)
            .add_header(
                http::HeaderName::from_static("x-github-api-version"),
                "2022-11-28".into(),
            )
            .add_header(http::header::ACCEPT, "application/vnd.github+json".into())
            .base_uri(base_uri)
            .map_err(|_| ClientError::BaseUri(base.to_owned()))?
            .cache(cache.clone());
        if let Some(token) = token {
            builder = builder.personal_token(token.expose().to_owned());
        }
        let octo = builder
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Self {
            octo,
            cache,
            config: config.clone(),
            base_path,
            stats: Mutex::new(ApiStats::default()),
            blocked_until: Mutex::new(None),
        })
    }

    pub fn stats(&self) -> ApiStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn cache(&self) -> &DiskCache {
        &self.cache
    }

    fn bump(&self, f: impl FnOnce(&mut ApiStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// GETs `path_and_query` (relative to the API root) and decodes the JSON body; also
    /// returns the `rel="next"` page, if any, as a relative URI.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path_and_query: &str,
    ) -> Result<(T, Option<String>), FetchError> {
        let (headers, body) = self.get(path_and_query).await?;
        let value = serde_json::from_str(&body).map_err(|e| FetchError::Decode(e.to_string()))?;
        Ok((value, self.next_link(&headers)))
    }

    /// Follows pagination up to the configured page count; `items` pulls the list out
    /// of each page.
    pub async fn get_all<P: DeserializeOwned, T>(
        &self,
        first: &str,
        mut items: impl FnMut(P) -> Vec<T>,
    ) -> Result<Paged<T>, FetchError> {
        let mut out = Vec::new();
        let mut next = Some(first.to_owned());
        let mut pages = 0;
        let max_pages = self.config.max_pages.max(1);
        while let Some(uri) = next.take() {
            let (page, link) = self.get_json::<P>(&uri).await?;
            out.extend(items(page));
            pages += 1;
            if pages >= max_pages && link.is_some() {
                return Ok(Paged {
                    items: out,
                    truncated_after: Some(pages),
                });
            }
            next = link;
        }
        Ok(Paged {
            items: out,
            truncated_after: None,
        })
    }

    async fn get(&self, uri: &str) -> Result<(HeaderMap, String), FetchError> {
        let max = self.config.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Some(until) = *self.blocked_until.lock().unwrap_or_else(|p| p.into_inner()) {
                if until > Utc::now() {
                    return Err(FetchError::Skipped(until));
                }
            }
            let conditional_before = self.cache.conditional_sent();
            let not_modified_before = self.cache.not_modified();
            self.bump(|s| s.requests += 1);
            let sent = self.octo._get(uri).await;
            let conditional = self.cache.conditional_sent() - conditional_before;
            self.bump(|s| s.conditional += conditional);

            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%uri, attempt, error = %e, "GitHub request failed");
                    if attempt < max {
                        self.backoff(attempt).await;
                        continue;
                    }
                    return Err(FetchError::Transport {
                        message: e.to_string(),
                        attempts: attempt,
                    });
                }
            };
            self.bump(|s| s.answered += 1);
            let status = response.status();
            let headers = response.headers().clone();
            if let Some(remaining) = header_u64(&headers, "x-ratelimit-remaining") {
                self.bump(|s| s.rate_limit_remaining = Some(remaining));
            }
            let body = match self.octo.body_to_string(response).await {
                Ok(b) => b,
                Err(e) => {
                    self.cache.forget(uri);
                    if attempt < max {
                        self.backoff(attempt).await;
                        continue;
                    }
                    return Err(FetchError::Transport {
                        message: e.to_string(),
                        attempts: attempt,
                    });
                }
            };
            let not_modified = self.cache.not_modified() - not_modified_before;
            self.bump(|s| s.not_modified += not_modified);
            if status.is_success() {
                tracing::debug!(%uri, %status, not_modified = not_modified > 0, "GitHub");
                return Ok((headers, body));
            }
            // An error answer must never be served later as a cached 304 body.
            self.cache.forget(uri);
            tracing::warn!(%uri, %status, attempt, "GitHub answered with an error");

            if let Some(until) = rate_limit_until(status, &headers, &body) {
                let wait = (until - Utc::now()).to_std().unwrap_or_default();
                if attempt < max && wait <= Duration::from_secs(self.config.max_rate_limit_wait_s) {
                    self.bump(|s| s.retries += 1);
                    tokio::time::sleep(wait).await;
                    continue;
                }
                *self.blocked_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
                return Err(FetchError::RateLimited {
                    status: status.as_u16(),
                    until,
                });
            }
            if status.is_server_error() {
                if attempt < max {
                    self.backoff(attempt).await;
                    continue;
                }
                return Err(FetchError::ServerError {
                    status: status.as_u16(),
                    attempts: attempt,
                });
            }
            if status == StatusCode::NOT_FOUND {
                return Err(FetchError::NotFound);
            }
            return Err(FetchError::Http {
                status: status.as_u16(),
                message: error_message(&body),
            });
        }
    }

    /// Exponential backoff: base, 2×base, 4×base, …
    async fn backoff(&self, attempt: u32) {
        self.bump(|s| s.retries += 1);
        let factor = 1u64 << (attempt - 1).min(6);
        tokio::time::sleep(Duration::from_millis(self.config.backoff_ms * factor)).await;
    }

    fn next_link(&self, headers: &HeaderMap) -> Option<String> {
        let link = headers.get(http::header::LINK)?.to_str().ok()?;
        let target = next_from_link_header(link)?;
        let uri: http::Uri = target.parse().ok()?;
        let pq = uri.path_and_query()?.as_str();
        Some(
            pq.strip_prefix(self.base_path.as_str())
                .filter(|rest| rest.starts_with('/'))
                .unwrap_or(pq)
                .to_owned(),
        )
    }
}

/// The `rel="next"` target of an RFC 8288 `Link` header.
pub fn next_from_link_header(link: &str) -> Option<&str> {
    link.split(',').find_map(|part| {
        let mut pieces = part.split(';');
        let target = pieces.next()?.trim();
        let is_next = pieces.any(|p| {
            let p = p.trim();
            p == "rel=\"next\"" || p == "rel=next"
        });
        is_next.then(|| target.trim_start_matches('<').trim_end_matches('>'))
    })
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// When a 403/429 is a rate limit, the instant it lifts: `retry-after` (secondary limits),
/// else `x-ratelimit-reset` (primary), else one minute as GitHub advises.
pub fn rate_limit_until(
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
) -> Option<DateTime<Utc>> {
    if status != StatusCode::FORBIDDEN && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let now = Utc::now();
    let retry_after = header_u64(headers, "retry-after");
    let exhausted = header_u64(headers, "x-ratelimit-remaining") == Some(0);
    let says_so = body.to_ascii_lowercase().contains("rate limit");
    if status == StatusCode::FORBIDDEN && retry_after.is_none() && !exhausted && !says_so {
        return None;
    }
    if let Some(secs) = retry_after {
        return Some(now + chrono::Duration::seconds(secs as i64));
    }
    if let Some(reset) = header_u64(headers, "x-ratelimit-reset") {
        if let chrono::LocalResult::Single(t) = Utc.timestamp_opt(reset as i64, 0) {
            return Some(t.max(now));
        }
    }
    Some(now + chrono::Duration::seconds(60))
}

fn error_message(body: &str) -> String {
    #[derive(Deserialize)]
    struct Message {
        message: String,
    }
    serde_json::from_str::<Message>(body)
        .map(|m| m.message)
        .unwrap_or_else(|_| body.chars().take(200).collect())
}
