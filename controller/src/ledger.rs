//! The deploy ledger: one JSON line per deploy or rollback (when, who, from, to, flags,
//! outcome, step timings), appended and fsynced; never rewritten.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The new definition is live and passed the health gate.
    Deployed,
    /// The new definition failed; the backup is live again and serves.
    RolledBack,
    /// The new definition failed and the old one did not come back: an operator is needed.
    RollbackFailed,
    /// Refused before anything changed (bad binary, corrupt plist, rollback streak...).
    Refused,
    /// The definition already said what was asked: nothing written, nothing restarted.
    Unchanged,
    /// An operator's `cathedralctl rollback`.
    ManualRollback,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub when: chrono::DateTime<chrono::Local>,
    pub who: String,
    pub plist: PathBuf,
    pub label: String,
    pub from: PathBuf,
    pub to: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<String>,
    pub flags_before: Vec<String>,
    pub flags_after: Vec<String>,
    pub edits: Vec<String>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<PathBuf>,
    pub steps: Vec<StepTiming>,
    pub total_seconds: f64,
}

pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join("deploys.jsonl")
}

pub fn append(path: &Path, entry: &LedgerEntry) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
    atomic::append_line(path, &line)
}

/// Every readable entry, oldest first; a torn last line (a crash mid-append) is skipped.
pub fn read(path: &Path) -> std::io::Result<Vec<LedgerEntry>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// How many deploys in a row, counting back from the newest, ended in an automatic
/// rollback (attempts that were refused before changing anything do not break the run).
pub fn rollback_streak(entries: &[LedgerEntry], label: &str) -> usize {
    entries
        .iter()
        .rev()
        .filter(|e| e.label == label && !matches!(e.outcome, Outcome::Refused | Outcome::Unchanged))
        .take_while(|e| matches!(e.outcome, Outcome::RolledBack | Outcome::RollbackFailed))
        .count()
}

/// `user@host` for the ledger.
pub fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid{}", rustix::process::getuid().as_raw()));
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(outcome: Outcome) -> LedgerEntry {
        LedgerEntry {
            when: chrono::Local::now(),
            who: who(),
            plist: "/x.plist".into(),
            label: "l".into(),
            from: "/a".into(),
            to: "/b".into(),
            to_version: None,
            flags_before: vec![],
            flags_after: vec![],
            edits: vec![],
            outcome,
            reason: None,
            backup: None,
            steps: vec![StepTiming {
                step: "write".into(),
                seconds: 0.01,
            }],
            total_seconds: 1.0,
        }
    }

    #[test]
    fn append_read_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_in(dir.path());
        append(&p, &entry(Outcome::Deployed)).unwrap();
        append(&p, &entry(Outcome::RolledBack)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"when\":"))
            .unwrap();
        let got = read(&p).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].outcome, Outcome::RolledBack);
    }

    #[test]
    fn streak_counts_consecutive_rollbacks_only() {
        use Outcome::*;
        let es: Vec<_> = [RolledBack, Deployed, RolledBack, Refused, RolledBack]
            .into_iter()
            .map(entry)
            .collect();
        assert_eq!(rollback_streak(&es, "l"), 2);
        assert_eq!(rollback_streak(&es, "other"), 0);
    }
}
