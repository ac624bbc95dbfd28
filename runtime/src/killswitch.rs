//! The kill switch file: who engaged it, when, why.
//!
//! Present = engaged (vision off; the text path is untouched), absent = released. The server
//! reads it on every multimodal request and at start, so engaging takes effect on the next
//! request, needs no restart and survives restarts. Written atomically; one small JSON object:
//! `{"engaged_by": "canary", "engaged_at": "2026-05-03T13:50:06Z", "reason": "..."}`.
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::atomic_file::{remove_durable, write_atomic};

/// The reason is for humans reading status pages and logs: keep it bounded.
pub const MAX_REASON_CHARS: usize = 1000;

/// The default file, shared by the server, `cathedralctl killswitch` and the canary:
/// `$CATHEDRAL_HOME/kill-switch.json`, with `CATHEDRAL_HOME` defaulting to `~/.cathedral`.
pub fn default_path() -> PathBuf {
    let home = std::env::var_os("CATHEDRAL_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cathedral")))
        .unwrap_or_else(|| PathBuf::from(".cathedral"));
    home.join("kill-switch.json")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillSwitchState {
    pub engaged_by: String,
    pub engaged_at: DateTime<Utc>,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    #[error("cannot read kill switch file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kill switch file {path} is not valid JSON ({source}); treat the switch as engaged and rewrite it with `cathedralctl killswitch engage` or remove it with `release`")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write kill switch file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillSwitch {
    path: PathBuf,
}

impl KillSwitch {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok(None)` when released. A file that cannot be parsed is an error: callers that gate
    /// vision must treat it as engaged (fail safe), and say so.
    pub fn read(&self) -> Result<Option<KillSwitchState>, KillSwitchError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(KillSwitchError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| KillSwitchError::Corrupt {
                path: self.path.clone(),
                source,
            })
    }

    /// Engages (or re-engages, replacing who/when/why) the switch.
    pub fn engage(&self, by: &str, reason: &str) -> Result<KillSwitchState, KillSwitchError> {
        let by = by.trim();
        let reason = reason.trim();
        if by.is_empty() {
            return Err(KillSwitchError::Invalid(
                "engaged_by must name who engages the kill switch".into(),
            ));
        }
        if reason.is_empty() {
            return Err(KillSwitchError::Invalid(
                "a reason is required to engage the kill switch".into(),
            ));
        }
        if reason.chars().count() > MAX_REASON_CHARS {
            return Err(KillSwitchError::Invalid(format!(
                "reason is longer than {MAX_REASON_CHARS} characters"
            )));
        }
        let state = KillSwitchState {
            engaged_by: by.to_string(),
            engaged_at: Utc::now(),
            reason: reason.to_string(),
        };
        let mut json = serde_json::to_vec_pretty(&state).expect("plain struct serialises");
        json.push(b'\n');
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| KillSwitchError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        write_atomic(&self.path, &json, Some(0o644)).map_err(|source| KillSwitchError::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(state)
    }

    /// Releases the switch; returns the state it had (`None` if it was not engaged).
    pub fn release(&self) -> Result<Option<KillSwitchState>, KillSwitchError> {
        let previous = self.read().unwrap_or(None);
        remove_durable(&self.path).map_err(|source| KillSwitchError::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engage_read_release() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KillSwitch::new(dir.path().join("state/kill-switch.json"));
        assert_eq!(ks.read().unwrap(), None);
        let st = ks.engage("canary", "3 breached windows").unwrap();
        assert_eq!(ks.read().unwrap(), Some(st.clone()));
        assert_eq!(ks.release().unwrap(), Some(st));
        assert_eq!(ks.read().unwrap(), None);
        assert_eq!(ks.release().unwrap(), None);
        assert!(ks.engage("", "x").is_err());
        assert!(ks.engage("a", " ").is_err());
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = KillSwitch::new(&path).read().unwrap_err();
        assert!(matches!(err, KillSwitchError::Corrupt { .. }), "{err}");
    }
}
