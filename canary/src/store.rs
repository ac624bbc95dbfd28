//! The durable record of everything the canary saw and did: one JSON object per line,
//! appended and fsynced before the watcher goes on, so a crash loses nothing it acted on.
use crate::policy::KillSwitchEvent;
use crate::probe::ProbeOutcome;
use crate::window::WindowVerdict;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The store's file inside `--state DIR`.
pub const STORE_FILE: &str = "canary.jsonl";

/// One line of the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// A watcher started (or restarted) with these settings.
    Start(StartRecord),
    Probe(ProbeOutcome),
    /// Wall-clock time in which the watcher did not run (machine asleep, process stopped).
    Gap(GapRecord),
    Verdict(WindowVerdict),
    KillSwitch(KillSwitchEvent),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartRecord {
    pub at: DateTime<Utc>,
    pub target: String,
    pub interval_ms: u64,
    pub window_ms: u64,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GapRecord {
    /// Last moment the watcher was known to run.
    pub from: DateTime<Utc>,
    /// When it noticed it had not.
    pub to: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use state directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is in use by another canary watcher (pid in its last start record); stop it or use another --state")]
    Locked { path: PathBuf },
    #[error("cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The store opened for appending (one watcher at a time, enforced with a lock).
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    file: File,
    records: Vec<Record>,
    skipped: usize,
}

impl Store {
    /// Opens (creating) the store in `dir`, takes its lock, loads it, and cuts a torn last
    /// line (a write that a crash interrupted was never acknowledged).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        let path = dir.join(STORE_FILE);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        lock_exclusive(&file).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => StoreError::Locked { path: path.clone() },
            _ => io(e),
        })?;
        if !existed {
            sync_dir(dir).map_err(io)?;
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let (records, skipped, intact_len) = parse(&mut BufReader::new(&file), &path)?;
        let len = file.metadata().map_err(io)?.len();
        if intact_len < len {
            tracing::warn!(path = %path.display(), "cutting a torn last record ({} bytes)", len - intact_len);
            file.set_len(intact_len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok(Self {
            path,
            file,
            records,
            skipped,
        })
    }

    /// Reads a store without locking it (for reports while a watcher runs).
    pub fn read(dir: &Path) -> Result<Vec<Record>, StoreError> {
        let path = dir.join(STORE_FILE);
        let file = File::open(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(parse(&mut BufReader::new(file), &path)?.0)
    }

    /// Appends a record and waits until it is on disk.
    pub fn append(&mut self, record: Record) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.records.push(record);
        Ok(())
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Lines that could not be read (corruption inside the file; logged when opened).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Parses the lines; returns the records, the count of unreadable complete lines, and the
/// length of the file up to the end of its last complete line.
fn parse(reader: &mut impl BufRead, path: &Path) -> Result<(Vec<Record>, usize, u64), StoreError> {
    let mut records = Vec::new();
    let mut skipped = 0;
    let mut intact = 0u64;
    let mut line = Vec::new();
    let mut number = 0usize;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| StoreError::Io {
                path: path.to_owned(),
                source,
            })?;
        if n == 0 {
            break;
        }
        number += 1;
        if line.last() != Some(&b'\n') {
            // Torn tail: not acknowledged, not counted.
            break;
        }
        intact += n as u64;
        let text = &line[..line.len() - 1];
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Record>(text) {
            Ok(r) => records.push(r),
            Err(e) => {
                skipped += 1;
                tracing::warn!(path = %path.display(), line = number, "unreadable record skipped: {e}");
            }
        }
    }
    Ok((records, skipped, intact))
}

fn lock_exclusive(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor this File owns; no memory is shared with the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes a new directory entry durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{ErrorClass, ProbeKind};
    use std::time::Duration;

    fn probe(i: u32) -> Record {
        Record::Probe(ProbeOutcome {
            kind: ProbeKind::Vision,
            at: DateTime::from_timestamp(1_800_000_000 + i64::from(i), 0).unwrap(),
            status: None,
            latency: Duration::from_millis(u64::from(i)),
            error_class: Some(ErrorClass::Connect),
            error: Some("connection refused".into()),
            usage: None,
            answer: None,
        })
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path()).unwrap();
            for i in 0..5 {
                s.append(probe(i)).unwrap();
            }
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.records().len(), 5);
        assert_eq!(s.records()[3], probe(3));
        assert_eq!(Store::read(dir.path()).unwrap(), s.records());
    }

    #[test]
    fn a_torn_tail_is_cut_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path()).unwrap();
            s.append(probe(1)).unwrap();
        }
        let path = dir.path().join(STORE_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"record":"probe","kind":"vis"#).unwrap();
        drop(f);
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.records().len(), 1);
        s.append(probe(2)).unwrap();
        drop(s);
        let records = Store::read(dir.path()).unwrap();
        assert_eq!(records, vec![probe(1), probe(2)]);
    }

    #[test]
    fn a_corrupt_line_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let good = serde_json::to_string(&probe(1)).unwrap();
        std::fs::write(&path, format!("{good}\nnot json\n{good}\n")).unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.records().len(), 2);
        assert_eq!(s.skipped(), 1);
    }

    #[test]
    fn one_watcher_per_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked { .. })
        ));
    }
}
