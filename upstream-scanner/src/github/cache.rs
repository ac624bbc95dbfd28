//! ETag cache on disk behind octocrab's HTTP cache layer: the layer sends `If-None-Match`
//! for a URI we hold, and on `304 Not Modified` (which costs no rate limit) serves the body
//! stored here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{header, HeaderMap, HeaderValue, Uri};
use octocrab::service::middleware::cache::{CacheKey, CacheStorage, CacheWriter, CachedResponse};
use serde::{Deserialize, Serialize};

use crate::fsio::write_atomic;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    last_modified: Option<String>,
    /// Headers a 304 lacks but the caller reads: content type and pagination links.
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    link: Option<String>,
    body: String,
}

#[derive(Debug, Default)]
struct Counters {
    /// URIs asked for or stored in this process: what a prune keeps.
    touched: Mutex<std::collections::BTreeSet<String>>,
    /// Requests sent with a validator (`If-None-Match` / `If-Modified-Since`).
    conditional: AtomicU64,
    /// `304 Not Modified` answers served from the cache.
    not_modified: AtomicU64,
}

/// A persistent ETag cache. Clones share one store.
#[derive(Clone)]
pub struct DiskCache {
    path: PathBuf,
    data: Arc<Mutex<CacheFile>>,
    counters: Arc<Counters>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("ETag cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DiskCache {
    /// Loads the cache; an unreadable or foreign file starts an empty cache (it only
    /// costs conditional hits).
    pub fn open(path: &Path) -> Self {
        let data = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<CacheFile>(&bytes).ok())
            .filter(|f| f.version == FORMAT_VERSION)
            .unwrap_or(CacheFile {
                version: FORMAT_VERSION,
                entries: BTreeMap::new(),
            });
        Self {
            path: path.to_owned(),
            data: Arc::new(Mutex::new(data)),
            counters: Arc::default(),
        }
    }

    /// Writes the cache. With `prune`, entries no request touched since `open` are
    /// dropped (pull requests long closed, labels no longer watched); prune only after a
    /// scan that asked for everything it wanted.
    pub fn save(&self, prune: bool) -> Result<(), CacheError> {
        let bytes = {
            let mut data = self.lock();
            if prune {
                let touched = self.touched();
                data.entries.retain(|uri, _| touched.contains(uri));
            }
            serde_json::to_vec(&*data).expect("cache entries serialise")
        };
        write_atomic(&self.path, &bytes).map_err(|source| CacheError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Drops a URI's entry: its last answer was an error or arrived incomplete.
    pub fn forget(&self, uri: &str) {
        self.lock().entries.remove(uri);
    }

    fn touched(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.counters
            .touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn conditional_sent(&self) -> u64 {
        self.counters.conditional.load(Ordering::Relaxed)
    }

    pub fn not_modified(&self) -> u64 {
        self.counters.not_modified.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheFile> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CacheStorage for DiskCache {
    fn try_hit(&self, uri: &Uri) -> Option<CacheKey> {
        let uri = uri.to_string();
        self.touched().insert(uri.clone());
        let data = self.lock();
        let entry = data.entries.get(&uri)?;
        let key = match (&entry.etag, &entry.last_modified) {
            (Some(etag), _) => CacheKey::ETag(etag.clone()),
            (None, Some(lm)) => CacheKey::LastModified(lm.clone()),
            (None, None) => return None,
        };
        self.counters.conditional.fetch_add(1, Ordering::Relaxed);
        Some(key)
    }

    fn load(&self, uri: &Uri) -> Option<CachedResponse> {
        let data = self.lock();
        let entry = data.entries.get(&uri.to_string())?;
        self.counters.not_modified.fetch_add(1, Ordering::Relaxed);
        let mut headers = HeaderMap::new();
        let mut put = |name, value: &Option<String>| {
            if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(name, v);
            }
        };
        put(header::CONTENT_TYPE, &entry.content_type);
        put(header::LINK, &entry.link);
        put(header::CONTENT_LENGTH, &Some(entry.body.len().to_string()));
        Some(CachedResponse {
            body: entry.body.clone().into_bytes(),
            headers,
        })
    }

    fn writer(&self, uri: &Uri, key: CacheKey, headers: HeaderMap) -> Box<dyn CacheWriter> {
        Box::new(EntryWriter {
            cache: self.clone(),
            uri: uri.to_string(),
            key,
            headers,
            body: Vec::new(),
        })
    }
}

struct EntryWriter {
    cache: DiskCache,
    uri: String,
    key: CacheKey,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl CacheWriter for EntryWriter {
    fn write_body(&mut self, data: &[u8]) {
        self.body.extend_from_slice(data);
    }
}

impl Drop for EntryWriter {
    /// The layer drops the writer once the body is consumed: store it then, unless it is
    /// shorter than announced (a broken transfer) or not text.
    fn drop(&mut self) {
        let header = |name| {
            self.headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        if let Some(len) = header(header::CONTENT_LENGTH).and_then(|l| l.parse::<usize>().ok()) {
            if len != self.body.len() {
                return;
            }
        }
        let Ok(body) = String::from_utf8(std::mem::take(&mut self.body)) else {
            return;
        };
        let (etag, last_modified) = match &self.key {
            CacheKey::ETag(e) => (Some(e.clone()), None),
            CacheKey::LastModified(l) => (None, Some(l.clone())),
            _ => return,
        };
        let entry = Entry {
            etag,
            last_modified,
            content_type: header(header::CONTENT_TYPE),
            link: header(header::LINK),
            body,
        };
        self.cache
            .lock()
            .entries
            .insert(std::mem::take(&mut self.uri), entry);
    }
}
