//! One controller at a time per state directory: an exclusive `flock` on a lock file,
//! released by the kernel when the process ends however it ends (no stale lock to clean).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another cathedralctl is running ({holder}); wait for it to finish (lock: {path})")]
    Held { path: PathBuf, holder: String },
    #[error("cannot open the controller lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held for the life of the value.
#[derive(Debug)]
pub struct ControllerLock {
    _file: File,
    path: PathBuf,
}

impl ControllerLock {
    /// Takes the lock without waiting; `purpose` is shown to a refused second controller.
    pub fn acquire(state_dir: &Path, purpose: &str) -> Result<Self, LockError> {
        let path = state_dir.join("controller.lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        if !file.try_lock_exclusive().map_err(io)? {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LockError::Held {
                path: path.clone(),
                holder: if holder.is_empty() {
                    "holder unknown".into()
                } else {
                    holder.to_string()
                },
            });
        }
        let note = format!(
            "pid {} `{purpose}` since {}",
            std::process::id(),
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S")
        );
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(note.as_bytes()).map_err(io)?;
        Ok(ControllerLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_ones_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let first = ControllerLock::acquire(dir.path(), "deploy").unwrap();
        match ControllerLock::acquire(dir.path(), "rollback") {
            Err(LockError::Held { holder, .. }) => {
                assert!(holder.contains("`deploy`"), "{holder}");
                assert!(holder.contains(&std::process::id().to_string()));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        ControllerLock::acquire(dir.path(), "rollback").unwrap();
    }
}
